//! The correction policy both tiers follow: an event is corrected **at most once**.
//!
//! A detection (a [`Verdict`](crate::verify::Verdict) that says incorrect, a gap filled late, a
//! DLQ entry) raises a correction request for a stored record. [`decide`] turns the record and
//! the correction history into one of three answers, and [`apply`] makes the corrected record.
//! The history itself is I/O and lives with the caller (sled on the gateway; a DynamoDB item
//! written with `attribute_not_exists` in the cloud, so of two racing bridges exactly one
//! wins). The policy is why corrections cannot loop: a corrected record carries its
//! `correction`, and a record that has one is never corrected again: it goes to the DLQ for a
//! person.

use proto::{CorrectedBy, Correction, EventResult, Status};

use crate::engine::{Engine, Rejection};
use crate::state::Reading;

/// What to do with a correction request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Never corrected: recalculate and overwrite the stored record.
    Correct,
    /// The history has a correction of this event although the record in hand has none:
    /// another instance corrected it after the record was read. Nothing to do.
    Superseded,
    /// Corrected once already and detected again: dead-letter it (stage `correction`) for
    /// manual review. The reason says both what was done and what was found.
    DeadLetter { reason: String },
}

/// Decides a correction request for `record` given whether the history holds a correction of
/// its `event_id` (`corrected_before`) and the new detection's `reason`.
pub fn decide(record: &EventResult, corrected_before: bool, reason: &str) -> Decision {
    if let Some(c) = &record.correction {
        let by = match c.by {
            CorrectedBy::Edge => "edge",
            CorrectedBy::Cloud => "cloud",
        };
        return Decision::DeadLetter {
            reason: format!(
                "already corrected once (by {by}: {}); detected again: {reason}",
                c.reason
            ),
        };
    }
    if record.status == Status::Corrected {
        return Decision::DeadLetter {
            reason: format!("status is corrected (no correction record); detected again: {reason}"),
        };
    }
    if corrected_before {
        Decision::Superseded
    } else {
        Decision::Correct
    }
}

/// The corrected record: recalculated with the engine's current calculation against
/// `previous` (the reading the event should have seen), `status = corrected`, the old values
/// in `correction.previous_result`. Everything else (ids, input, `edge_seq`, flags, anomaly
/// score) stays, so the record replaces the old one in place.
#[allow(clippy::result_large_err)] // the error is a DLQ entry's content, used by value
pub fn apply(
    engine: &Engine,
    record: &EventResult,
    previous: Option<&Reading>,
    reason: &str,
    at: i64,
    by: CorrectedBy,
) -> Result<EventResult, Rejection> {
    let fields = engine.recompute(record, previous)?;
    let mut out = record.clone();
    out.calc_version = engine
        .calc_version(&record.event_type)
        .unwrap_or(&record.calc_version)
        .to_string();
    out.correction = Some(Correction {
        reason: reason.to_string(),
        previous_result: std::mem::replace(&mut out.result, fields),
        at,
        by,
    });
    out.status = Status::Corrected;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::EngineSpec;
    use crate::verify::{Previous, Verdict, verify};

    fn engine() -> Engine {
        let spec: EngineSpec = toml::from_str(
            r#"
            [event_types.plain.fields]
            x = { type = "number", required = true }
            [[event_types.plain.calc]]
            name = "double"
            expr = "x * 2"
            "#,
        )
        .unwrap();
        Engine::new(&spec).unwrap()
    }

    fn record(e: &Engine) -> EventResult {
        let mut input = proto::Fields::new();
        input.insert("x".into(), 4.into());
        let mut result = proto::Fields::new();
        result.insert("double".into(), 9.into());
        EventResult {
            event_id: "p/1".into(),
            device: "p".into(),
            event_type: "plain".into(),
            seq: 1,
            ts: 1000,
            gateway: "g".into(),
            via: proto::Via::Gateway,
            edge_seq: 7,
            input,
            result,
            calc_version: e.calc_version("plain").unwrap().into(),
            status: Status::Ok,
            flags: vec!["first_reading".into()],
            anomaly_score: 0.0,
            processed_at: 1000,
            correction: None,
        }
    }

    #[test]
    fn corrects_once_then_dead_letters() {
        let e = engine();
        let wrong = record(&e);
        let v = verify(&e, &wrong, Previous::Known(None), 1e-9);
        assert!(v.is_incorrect());
        assert_eq!(decide(&wrong, false, &v.reason()), Decision::Correct);
        let fixed = apply(&e, &wrong, None, &v.reason(), 5000, CorrectedBy::Cloud).unwrap();
        assert_eq!(fixed.status, Status::Corrected);
        assert_eq!(fixed.result["double"], 8.0);
        let c = fixed.correction.as_ref().unwrap();
        assert_eq!(c.previous_result["double"], 9);
        assert_eq!((c.at, c.by), (5000, CorrectedBy::Cloud));
        assert_eq!(fixed.edge_seq, 7);
        assert_eq!(
            verify(&e, &fixed, Previous::Known(None), 1e-9),
            Verdict::Consistent
        );

        // Detected again (whatever the history says): manual review, never a second correction.
        for seen in [false, true] {
            let Decision::DeadLetter { reason } = decide(&fixed, seen, "result mismatch: x") else {
                panic!()
            };
            assert!(reason.starts_with("already corrected once (by cloud: result mismatch"));
            assert!(reason.ends_with("detected again: result mismatch: x"));
        }
    }

    #[test]
    fn a_concurrent_correction_supersedes_the_request() {
        let e = engine();
        assert_eq!(decide(&record(&e), true, "r"), Decision::Superseded);
    }

    #[test]
    fn an_outdated_version_is_replaced_by_the_current_one() {
        let e = engine();
        let mut old = record(&e);
        old.calc_version = "plain-0000".into();
        old.result.insert("double".into(), 8.0.into());
        let fixed = apply(&e, &old, None, "outdated", 1, CorrectedBy::Edge).unwrap();
        assert_eq!(fixed.calc_version, e.calc_version("plain").unwrap());
        assert_eq!(fixed.correction.unwrap().by, CorrectedBy::Edge);
    }
}
