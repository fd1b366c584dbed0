//! Re-verification of a stored result: recompute its derived fields from its input with the
//! current calculation and compare.
//!
//! The cloud runs this on what gateways send (all of it, or a sample); a correction run runs it
//! over stored history. A result is *incorrectly processed* when its values differ from the
//! recomputation ([`Verdict::Mismatch`]) or when it was made by another calculation than the
//! current one ([`Verdict::Outdated`], even if the numbers happen to agree: the version is
//! what a consumer trusts). Stateful calculations (`delta`, `rate`, `prev.x`) need the
//! previous reading the edge used; a verifier that does not know it says so
//! ([`Verdict::Unverifiable`]) rather than guess.

use proto::{EventResult, Fields};
use serde_json::Value;

use crate::engine::{Engine, Rejection, flags};
use crate::state::Reading;

/// What the verifier knows of the reading the edge computed `result` against.
#[derive(Debug, Clone, Copy)]
pub enum Previous<'a> {
    /// The device's previous accepted reading of this type (`None`: there was none).
    Known(Option<&'a Reading>),
    /// Not known here (e.g. a bridge that did not see the device's earlier results).
    Unknown,
}

/// One field whose stored value differs from the recomputed one.
#[derive(Debug, Clone, PartialEq)]
pub struct Discrepancy {
    pub field: String,
    /// `None`: the field is missing from the stored result.
    pub stored: Option<Value>,
    /// `None`: the current calculation does not produce it.
    pub expected: Option<Value>,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Same calculation version, same values (within the tolerance).
    Consistent,
    /// The calculation needs the previous reading and the verifier does not know it.
    Unverifiable,
    /// Made by another calculation version than the current one. `fields` lists the values
    /// that differ (empty when they agree, or when the previous reading is unknown).
    Outdated {
        stored: String,
        current: String,
        fields: Vec<Discrepancy>,
    },
    /// Current calculation version, but the values differ: processed incorrectly.
    Mismatch { fields: Vec<Discrepancy> },
    /// The current engine does not accept the event at all (rule, check, unknown type).
    Rejected(Rejection),
}

impl Verdict {
    /// Whether this is an incorrectly processed event (a correction request).
    pub fn is_incorrect(&self) -> bool {
        matches!(self, Verdict::Outdated { .. } | Verdict::Mismatch { .. })
    }

    /// A human-readable reason naming the fields (for the correction record and the DLQ).
    pub fn reason(&self) -> String {
        match self {
            Verdict::Consistent => "consistent".into(),
            Verdict::Unverifiable => "previous reading unknown: not verified".into(),
            Verdict::Outdated {
                stored,
                current,
                fields,
            } => {
                let mut s = format!("outdated calc_version {stored} (current {current})");
                if !fields.is_empty() {
                    s.push_str("; ");
                    s.push_str(&describe(fields));
                }
                s
            }
            Verdict::Mismatch { fields } => format!("result mismatch: {}", describe(fields)),
            Verdict::Rejected(r) => format!("{} stage refuses it now: {}", r.stage, r.reason),
        }
    }
}

fn describe(fields: &[Discrepancy]) -> String {
    let show = |v: &Option<Value>| v.as_ref().map_or("missing".to_string(), |v| v.to_string());
    fields
        .iter()
        .map(|d| {
            format!(
                "{} is {} (expected {})",
                d.field,
                show(&d.stored),
                show(&d.expected)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Recomputes `result` with `engine` (see [`Engine::recompute`]) and compares. Numbers agree
/// when `|a - b| <= tolerance * max(1, |a|, |b|)`; everything else must be equal.
pub fn verify(
    engine: &Engine,
    result: &EventResult,
    previous: Previous<'_>,
    tolerance: f64,
) -> Verdict {
    let Some(current) = engine.calc_version(&result.event_type) else {
        // Unknown type: recompute names it.
        return match engine.recompute(result, None) {
            Err(r) => Verdict::Rejected(r),
            Ok(_) => Verdict::Consistent,
        };
    };
    let outdated = current != result.calc_version;
    // Calculated against an earlier reading than the latest (a late event): a verifier that
    // offers the latest one does not know the reading that was used.
    let earlier = result.flags.iter().any(|f| f == flags::EARLIER_PREVIOUS);
    let arrived_late = result
        .flags
        .iter()
        .any(|f| f == flags::PREVIOUS_ARRIVED_LATE);
    let previous = match previous {
        Previous::Known(p) if earlier && p.is_none_or(|p| p.ts >= result.ts) => Previous::Unknown,
        // Corrected against a late reading: whoever goes in edge_seq order offers another.
        Previous::Known(_) if arrived_late => Previous::Unknown,
        other => other,
    };
    let prev = match previous {
        Previous::Known(p) => p,
        Previous::Unknown if needs_previous(engine, result) => {
            return if outdated {
                Verdict::Outdated {
                    stored: result.calc_version.clone(),
                    current: current.to_string(),
                    fields: vec![],
                }
            } else {
                Verdict::Unverifiable
            };
        }
        Previous::Unknown => None,
    };
    let expected = match engine.recompute(result, prev) {
        Ok(f) => f,
        Err(r) => return Verdict::Rejected(r),
    };
    let fields = compare(&result.result, &expected, tolerance);
    if outdated {
        Verdict::Outdated {
            stored: result.calc_version.clone(),
            current: current.to_string(),
            fields,
        }
    } else if fields.is_empty() {
        Verdict::Consistent
    } else {
        Verdict::Mismatch { fields }
    }
}

/// What a late arrival says about the result calculated just after it (before it arrived).
#[derive(Debug, Clone, PartialEq)]
pub enum Restated {
    /// The same values against the late reading (a calculation that does not look back).
    Holds,
    /// Different values: the result is stale; `reason` names the late event and the fields.
    Changed { reason: String },
    /// Recalculated against the late reading, the engine refuses it (a check fails).
    Refused { reason: String },
}

/// Recalculates `stale` — calculated across a gap, against an older reading — against `late`,
/// the reading of `late_event` that arrived after it and comes just before it.
pub fn against_late(
    engine: &Engine,
    stale: &EventResult,
    late: &Reading,
    late_event: &str,
    tolerance: f64,
) -> Restated {
    match engine.recompute(stale, Some(late)) {
        Err(r) => Restated::Refused {
            reason: format!(
                "late arrival {late_event} comes before it; recalculated against it, the {} stage refuses it: {}",
                r.stage, r.reason
            ),
        },
        Ok(expected) => {
            let fields = compare(&stale.result, &expected, tolerance);
            if fields.is_empty() {
                Restated::Holds
            } else {
                Restated::Changed {
                    reason: format!(
                        "late arrival {late_event} comes before it: recalculated against it ({})",
                        Verdict::Mismatch { fields }.reason()
                    ),
                }
            }
        }
    }
}

/// Whether recomputing `result` depends on the previous reading.
pub fn needs_previous(engine: &Engine, result: &EventResult) -> bool {
    let has = |f: &str| result.flags.iter().any(|x| x == f);
    engine.uses_previous(&result.event_type)
        && !has(flags::FIRST_READING)
        && !has(flags::OUT_OF_ORDER)
}

/// The fields of `stored` and `expected` that differ, in field order.
pub fn compare(stored: &Fields, expected: &Fields, tolerance: f64) -> Vec<Discrepancy> {
    let mut out = Vec::new();
    for (k, want) in expected {
        let have = stored.get(k);
        if !have.is_some_and(|h| same(h, want, tolerance)) {
            out.push(Discrepancy {
                field: k.clone(),
                stored: have.cloned(),
                expected: Some(want.clone()),
            });
        }
    }
    for (k, have) in stored {
        if !expected.contains_key(k) {
            out.push(Discrepancy {
                field: k.clone(),
                stored: Some(have.clone()),
                expected: None,
            });
        }
    }
    out
}

fn same(a: &Value, b: &Value, tolerance: f64) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= tolerance * 1f64.max(x.abs()).max(y.abs()),
        _ => a == b,
    }
}

/// Keeps the reading a verifier should use for the next result of the same device and type,
/// mirroring the edge: a result becomes the previous reading unless it was out of order.
pub fn advances_previous(result: &EventResult, current: Option<&Reading>) -> bool {
    // Flagged as older than the edge's latest reading: the edge kept its latest, even if the
    // verifier never saw that one.
    !result
        .flags
        .iter()
        .any(|f| f == flags::OUT_OF_ORDER || f == flags::EARLIER_PREVIOUS)
        && current.is_none_or(|p| p.ts < result.ts)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Input, Outcome};
    use crate::spec::EngineSpec;
    use crate::state::State;

    const SPEC: &str = r#"
        [event_types.meter.fields]
        kwh = { type = "number", required = true }
        [[event_types.meter.calc]]
        name = "consumption_kwh"
        expr = 'delta("kwh")'
        [[event_types.meter.calc]]
        name = "cost"
        expr = "kwh * 0.25"
        [event_types.plain.fields]
        x = { type = "number", required = true }
        [[event_types.plain.calc]]
        name = "double"
        expr = "x * 2"
    "#;

    fn engine(spec: &str) -> Engine {
        Engine::new(&toml::from_str::<EngineSpec>(spec).unwrap()).unwrap()
    }

    fn run(
        e: &Engine,
        state: &mut State,
        device: &str,
        ty: &str,
        seq: u64,
        data: &str,
    ) -> EventResult {
        let payload = format!(
            r#"{{"id":"{seq}","seq":{seq},"ts":{},"data":{data}}}"#,
            1_000_000 + seq * 1000
        );
        let topic = format!("devices/{device}/events/{ty}");
        match e.process(
            state,
            &Input {
                topic: &topic,
                payload: payload.as_bytes(),
                received_at: 1_000_000 + seq as i64 * 1000,
                gateway: "g",
                via: proto::Via::Gateway,
                replay: false,
            },
        ) {
            Outcome::Accepted { result, .. } => result,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn consistent_results_pass_and_tampered_ones_are_named() {
        let e = engine(SPEC);
        let mut st = State::new();
        let a = run(&e, &mut st, "m1", "meter", 1, r#"{"kwh":10}"#);
        let b = run(&e, &mut st, "m1", "meter", 2, r#"{"kwh":12.5}"#);
        assert_eq!(
            verify(&e, &a, Previous::Known(None), 1e-9),
            Verdict::Consistent
        );
        let prev = Reading::from_result(&a);
        assert_eq!(
            verify(&e, &b, Previous::Known(Some(&prev)), 1e-9),
            Verdict::Consistent
        );

        let mut wrong = b.clone();
        wrong.result.insert("consumption_kwh".into(), 3.0.into());
        let v = verify(&e, &wrong, Previous::Known(Some(&prev)), 1e-9);
        assert!(v.is_incorrect());
        assert_eq!(
            v.reason(),
            "result mismatch: consumption_kwh is 3.0 (expected 2.5)"
        );

        // A rounding difference is not a mismatch.
        let mut close = b.clone();
        close
            .result
            .insert("cost".into(), (12.5 * 0.25 + 1e-13).into());
        assert_eq!(
            verify(&e, &close, Previous::Known(Some(&prev)), 1e-9),
            Verdict::Consistent
        );
    }

    #[test]
    fn unknown_previous_is_unverifiable_unless_the_version_already_tells() {
        let e = engine(SPEC);
        let mut st = State::new();
        run(&e, &mut st, "m1", "meter", 1, r#"{"kwh":10}"#);
        let b = run(&e, &mut st, "m1", "meter", 2, r#"{"kwh":12}"#);
        assert_eq!(
            verify(&e, &b, Previous::Unknown, 1e-9),
            Verdict::Unverifiable
        );
        let mut old = b.clone();
        old.calc_version = "meter-00000000".into();
        assert!(matches!(
            verify(&e, &old, Previous::Unknown, 1e-9),
            Verdict::Outdated { fields, .. } if fields.is_empty()
        ));
        // A stateless type needs no previous reading.
        let p = run(&e, &mut st, "p1", "plain", 1, r#"{"x":2}"#);
        let p2 = run(&e, &mut st, "p1", "plain", 2, r#"{"x":3}"#);
        assert_eq!(verify(&e, &p, Previous::Unknown, 1e-9), Verdict::Consistent);
        assert_eq!(
            verify(&e, &p2, Previous::Unknown, 1e-9),
            Verdict::Consistent
        );
    }

    #[test]
    fn an_outdated_version_is_incorrect_even_with_equal_values() {
        let e = engine(SPEC);
        let mut st = State::new();
        let mut p = run(&e, &mut st, "p1", "plain", 1, r#"{"x":2}"#);
        p.calc_version = "plain-deadbeef".into();
        let v = verify(&e, &p, Previous::Known(None), 1e-9);
        assert!(v.is_incorrect(), "{v:?}");
        assert!(
            v.reason()
                .starts_with("outdated calc_version plain-deadbeef")
        );
    }

    #[test]
    fn missing_extra_and_rejected() {
        let e = engine(SPEC);
        let mut st = State::new();
        let mut p = run(&e, &mut st, "p1", "plain", 1, r#"{"x":2}"#);
        p.result.remove("double");
        p.result.insert("bogus".into(), true.into());
        let Verdict::Mismatch { fields } = verify(&e, &p, Previous::Known(None), 1e-9) else {
            panic!()
        };
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0].stored, None);
        assert_eq!(fields[1].expected, None);
        let mut unknown = p.clone();
        unknown.event_type = "nope".into();
        assert!(matches!(
            verify(&e, &unknown, Previous::Known(None), 1e-9),
            Verdict::Rejected(_)
        ));
    }

    #[test]
    fn a_late_event_calculated_against_an_earlier_reading_needs_that_reading() {
        let e = engine(SPEC);
        let mut st = State::new();
        let a = run(&e, &mut st, "m1", "meter", 1, r#"{"kwh":10}"#);
        let c = run(&e, &mut st, "m1", "meter", 3, r#"{"kwh":13}"#);
        // seq 2 arrives after seq 3: the edge used seq 1.
        let payload = format!(
            r#"{{"id":"2","seq":2,"ts":{},"data":{{"kwh":11}}}}"#,
            1_002_000
        );
        let Outcome::Accepted { result: b, .. } = e.process(
            &mut st,
            &Input {
                topic: "devices/m1/events/meter",
                payload: payload.as_bytes(),
                received_at: 1_010_000,
                gateway: "g",
                via: proto::Via::Gateway,
                replay: false,
            },
        ) else {
            panic!()
        };
        assert!(b.flags.iter().any(|f| f == flags::EARLIER_PREVIOUS));
        let latest = Reading::from_result(&c);
        assert_eq!(
            verify(&e, &b, Previous::Known(Some(&latest)), 1e-9),
            Verdict::Unverifiable
        );
        let used = Reading::from_result(&a);
        assert_eq!(
            verify(&e, &b, Previous::Known(Some(&used)), 1e-9),
            Verdict::Consistent
        );
    }

    #[test]
    fn a_late_arrival_restates_the_result_after_it() {
        let e = engine(SPEC);
        let mut st = State::new();
        run(&e, &mut st, "m1", "meter", 1, r#"{"kwh":10}"#);
        let s3 = run(&e, &mut st, "m1", "meter", 3, r#"{"kwh":16}"#);
        let mut other = State::new();
        let s2 = run(&e, &mut other, "m1", "meter", 2, r#"{"kwh":12}"#);
        let late = Reading::from_result(&s2);
        let Restated::Changed { reason } = against_late(&e, &s3, &late, "m1/2", 1e-9) else {
            panic!()
        };
        assert_eq!(
            reason,
            "late arrival m1/2 comes before it: recalculated against it \
             (result mismatch: consumption_kwh is 6.0 (expected 4.0))"
        );
        // A calculation that does not look back holds.
        let p1 = run(&e, &mut st, "p1", "plain", 1, r#"{"x":2}"#);
        let p0 = run(&e, &mut other, "p1", "plain", 1, r#"{"x":1}"#);
        let before = Reading {
            ts: p1.ts - 1,
            ..Reading::from_result(&p0)
        };
        assert_eq!(
            against_late(&e, &p1, &before, "p1/0", 1e-9),
            Restated::Holds
        );
    }

    #[test]
    fn the_previous_reading_advances_like_the_edge() {
        let e = engine(SPEC);
        let mut st = State::new();
        let a = run(&e, &mut st, "m1", "meter", 1, r#"{"kwh":10}"#);
        let prev = Reading::from_result(&a);
        assert!(advances_previous(&a, None));
        assert!(!advances_previous(&a, Some(&prev)));
        let mut late = a.clone();
        late.ts += 5000;
        late.flags.push(flags::OUT_OF_ORDER.into());
        assert!(!advances_previous(&late, Some(&prev)));
    }
}
