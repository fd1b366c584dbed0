//! Business rules: what must hold for an event before it is calculated.
//!
//! Two built-in rules come from plain settings — `allowed_devices` (which devices may send the
//! type), `max_clock_skew_s` (how far `ts` may be ahead of `received_at`) and `max_age_s` (how
//! far behind) — followed by the
//! configured boolean expressions, in order. The first failure rejects the event under stage
//! `rule`, naming the rule, its message and the values it read:
//! `rule counter_monotonic: cumulative kWh must not decrease (kwh=10, prev.kwh=12)`.
//!
//! Rules see the data, the built-in variables and the previous reading, not derived fields
//! (those are computed after the rules; assertions over them are [checks](crate::check)).

use crate::expr::{EvalError, Expr, Frame, Phase, ReadValues, Scope, Slots};
use crate::spec::{EventTypeSpec, RuleSpec, SpecError};
use crate::topic::is_topic_level;
use crate::value::{EvalValue, show, truncate};

/// A rule or a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionKind {
    Rule,
    Check,
}

impl std::fmt::Display for AssertionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AssertionKind::Rule => "rule",
            AssertionKind::Check => "check",
        })
    }
}

/// What a failing rule or check gave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionProblem {
    /// `false`; the configured message, if any.
    #[error("{}", .0.as_deref().unwrap_or("is false"))]
    False(Option<String>),
    /// Something other than a boolean (the value, shown).
    #[error("gave {0}, not true or false")]
    NotBoolean(String),
    #[error("evaluation failed: {0}")]
    Eval(EvalError),
}

/// A configured rule or check that did not hold, with the values it read:
/// `rule counter_monotonic: cumulative kWh must not decrease (kwh=10, prev.kwh=12)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {problem}{values}")]
pub struct AssertionFailed {
    pub kind: AssertionKind,
    pub name: String,
    pub problem: AssertionProblem,
    pub values: ReadValues,
}

/// An event that breaks one of its type's rules (stage `rule`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error(
        "rule allowed_devices: device '{}' may not send '{event_type}' events (allowed: {allowed})",
        truncate(.device)
    )]
    Device {
        device: String,
        event_type: String,
        /// The configured list, as written.
        allowed: String,
    },
    #[error(
        "rule max_clock_skew_s: ts is {} s ahead of received_at (max {} s)",
        *.ahead_ms as f64 / 1000.0,
        .max_ms / 1000
    )]
    ClockSkew { ahead_ms: i128, max_ms: i64 },
    #[error(
        "rule max_age_s: ts is {} s behind received_at (max {} s)",
        *.behind_ms as f64 / 1000.0,
        .max_ms / 1000
    )]
    TooOld { behind_ms: i128, max_ms: i64 },
    #[error(transparent)]
    Failed(AssertionFailed),
}

impl RuleError {
    /// The rule that did not hold: a built-in (`allowed_devices`, `max_clock_skew_s`,
    /// `max_age_s`) or a configured one.
    pub fn rule(&self) -> &str {
        match self {
            RuleError::Device { .. } => "allowed_devices",
            RuleError::ClockSkew { .. } => "max_clock_skew_s",
            RuleError::TooOld { .. } => "max_age_s",
            RuleError::Failed(a) => &a.name,
        }
    }
}

/// A named boolean expression: a rule or a check.
#[derive(Debug, Clone)]
pub(crate) struct Assertion {
    pub name: String,
    message: Option<String>,
    expr: Expr,
}

/// Compiles `specs` (at `path`, e.g. `event_types.meter.rules`).
pub(crate) fn compile_assertions(
    path: &str,
    specs: &[RuleSpec],
    phase: Phase,
    scope: &Scope<'_>,
    slots: &mut Slots,
) -> Result<Vec<Assertion>, SpecError> {
    let mut out: Vec<Assertion> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let name = spec.name.trim();
        if name.is_empty() {
            return Err(SpecError::new(
                format!("{path}[{i}].name"),
                "must not be empty",
            ));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(SpecError::new(
                format!("{path}[{i}].name"),
                format!("'{name}' is used twice"),
            ));
        }
        let expr = Expr::compile(&spec.expr, phase, scope, slots)
            .map_err(|e| SpecError::new(format!("{path}[{i}].expr"), e.to_string()))?;
        out.push(Assertion {
            name: name.to_string(),
            message: spec.message.clone().filter(|m| !m.trim().is_empty()),
            expr,
        });
    }
    Ok(out)
}

/// Evaluates `list` in order; the first one not true is the error.
pub(crate) fn eval_assertions(
    kind: AssertionKind,
    list: &[Assertion],
    slots: &Slots,
    values: &[EvalValue],
    frame: &Frame<'_>,
) -> Result<(), AssertionFailed> {
    for a in list {
        let problem = match a.expr.eval(slots, values) {
            Ok(EvalValue::Boolean(true)) => continue,
            Ok(EvalValue::Boolean(false)) => AssertionProblem::False(a.message.clone()),
            Ok(other) => AssertionProblem::NotBoolean(show(&other)),
            Err(e) => AssertionProblem::Eval(e),
        };
        return Err(AssertionFailed {
            kind,
            name: a.name.clone(),
            problem,
            values: a.expr.describe(slots, values, frame),
        });
    }
    Ok(())
}

/// An `allowed_devices` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DevicePattern {
    Exact(String),
    Prefix(String),
}

impl DevicePattern {
    fn matches(&self, device: &str) -> bool {
        match self {
            DevicePattern::Exact(d) => d == device,
            DevicePattern::Prefix(p) => device.starts_with(p.as_str()),
        }
    }
}

fn seconds_to_ms(path: &str, field: &str, s: Option<u64>) -> Result<Option<i64>, SpecError> {
    s.map(|s| {
        s.checked_mul(1000)
            .and_then(|ms| i64::try_from(ms).ok())
            .ok_or_else(|| SpecError::new(format!("{path}.{field}"), "is too large"))
    })
    .transpose()
}

/// The rules of one event type.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    allowed: Option<Vec<DevicePattern>>,
    allowed_text: String,
    max_skew_ms: Option<i64>,
    max_age_ms: Option<i64>,
    rules: Vec<Assertion>,
}

impl Rules {
    /// `path` is the event type's, e.g. `event_types.meter`.
    pub fn compile(
        path: &str,
        spec: &EventTypeSpec,
        scope: &Scope<'_>,
        slots: &mut Slots,
    ) -> Result<Rules, SpecError> {
        let allowed = match &spec.allowed_devices {
            None => None,
            Some(list) => {
                if list.is_empty() {
                    return Err(SpecError::new(
                        format!("{path}.allowed_devices"),
                        "is empty: no device could send this type (leave it out to allow all)",
                    ));
                }
                let mut out = Vec::with_capacity(list.len());
                for (i, p) in list.iter().enumerate() {
                    let at = || format!("{path}.allowed_devices[{i}]");
                    let (body, prefix) = match p.strip_suffix('*') {
                        Some(b) => (b, true),
                        None => (p.as_str(), false),
                    };
                    if body.contains('*') {
                        return Err(SpecError::new(
                            at(),
                            format!("'{p}': '*' is only allowed at the end (a prefix)"),
                        ));
                    }
                    if !body.is_empty() && !is_topic_level(body) {
                        return Err(SpecError::new(
                            at(),
                            format!("'{p}' can never match a device id (one topic level)"),
                        ));
                    }
                    out.push(if prefix {
                        DevicePattern::Prefix(body.to_string())
                    } else if body.is_empty() {
                        return Err(SpecError::new(at(), "must not be empty"));
                    } else {
                        DevicePattern::Exact(body.to_string())
                    });
                }
                Some(out)
            }
        };
        let max_skew_ms = seconds_to_ms(path, "max_clock_skew_s", spec.max_clock_skew_s)?;
        let max_age_ms = seconds_to_ms(path, "max_age_s", spec.max_age_s)?;
        let rules = compile_assertions(
            &format!("{path}.rules"),
            &spec.rules,
            Phase::Rule,
            scope,
            slots,
        )?;
        Ok(Rules {
            allowed_text: spec.allowed_devices.clone().unwrap_or_default().join(", "),
            allowed,
            max_skew_ms,
            max_age_ms,
            rules,
        })
    }

    /// The `allowed_devices` rule.
    pub fn check_device(&self, device: &str, event_type: &str) -> Result<(), RuleError> {
        match &self.allowed {
            Some(list) if !list.iter().any(|p| p.matches(device)) => Err(RuleError::Device {
                device: device.to_string(),
                event_type: event_type.to_string(),
                allowed: self.allowed_text.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The `max_clock_skew_s` (ts ahead) and `max_age_s` (ts behind) rules.
    pub fn check_clock(&self, ts: i64, received_at: i64) -> Result<(), RuleError> {
        let behind = i128::from(received_at) - i128::from(ts);
        match (self.max_skew_ms, self.max_age_ms) {
            (Some(max_ms), _) if -behind > i128::from(max_ms) => Err(RuleError::ClockSkew {
                ahead_ms: -behind,
                max_ms,
            }),
            (_, Some(max_ms)) if behind > i128::from(max_ms) => Err(RuleError::TooOld {
                behind_ms: behind,
                max_ms,
            }),
            _ => Ok(()),
        }
    }

    /// The configured rules.
    pub fn eval(
        &self,
        slots: &Slots,
        values: &[EvalValue],
        frame: &Frame<'_>,
    ) -> Result<(), RuleError> {
        eval_assertions(AssertionKind::Rule, &self.rules, slots, values, frame)
            .map_err(RuleError::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;
    use std::collections::BTreeMap;

    fn rules(spec: EventTypeSpec) -> Result<Rules, SpecError> {
        let schema = Schema::compile("event_types.t", &spec.fields)?;
        let constants = BTreeMap::new();
        let scope = Scope {
            schema: &schema,
            derived: &[],
            constants: &constants,
        };
        let mut slots = Slots::new(&schema, &[]);
        Rules::compile("event_types.t", &spec, &scope, &mut slots)
    }

    fn allowed(list: &[&str]) -> EventTypeSpec {
        EventTypeSpec {
            allowed_devices: Some(list.iter().map(|s| s.to_string()).collect()),
            ..EventTypeSpec::default()
        }
    }

    #[test]
    fn allow_list() {
        let r = rules(allowed(&["meter-*", "special"])).unwrap();
        r.check_device("meter-1", "meter").unwrap();
        r.check_device("special", "meter").unwrap();
        let e = r.check_device("specialist", "meter").unwrap_err();
        assert_eq!(
            e,
            RuleError::Device {
                device: "specialist".into(),
                event_type: "meter".into(),
                allowed: "meter-*, special".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "rule allowed_devices: device 'specialist' may not send 'meter' events \
             (allowed: meter-*, special)"
        );
        // "*" alone allows everyone.
        rules(allowed(&["*"]))
            .unwrap()
            .check_device("x", "t")
            .unwrap();
    }

    #[test]
    fn allow_list_errors() {
        let e = rules(allowed(&["me*ter"])).unwrap_err();
        assert_eq!(e.path, "event_types.t.allowed_devices[0]");
        let e = rules(allowed(&[])).unwrap_err();
        assert_eq!(e.path, "event_types.t.allowed_devices");
        let e = rules(allowed(&["a", "x/y"])).unwrap_err();
        assert_eq!(e.path, "event_types.t.allowed_devices[1]");
        let e = rules(allowed(&[""])).unwrap_err();
        assert!(e.message.contains("empty"), "{e}");
    }

    #[test]
    fn clock_skew() {
        let r = rules(EventTypeSpec {
            max_clock_skew_s: Some(300),
            ..EventTypeSpec::default()
        })
        .unwrap();
        r.check_clock(1_000_000, 1_300_000).unwrap();
        r.check_clock(1_300_000, 1_000_000).unwrap();
        // Old readings (a device catching up after an outage) are fine without max_age_s.
        r.check_clock(1_000_000, 90_000_000).unwrap();
        assert_eq!(
            r.check_clock(1_412_000, 1_000_000).unwrap_err(),
            RuleError::ClockSkew {
                ahead_ms: 412_000,
                max_ms: 300_000
            }
        );
        assert_eq!(
            r.check_clock(1_412_000, 1_000_000).unwrap_err().to_string(),
            "rule max_clock_skew_s: ts is 412 s ahead of received_at (max 300 s)"
        );
        // No overflow at the extremes.
        assert!(r.check_clock(i64::MAX, i64::MIN).is_err());
        let e = rules(EventTypeSpec {
            max_clock_skew_s: Some(u64::MAX),
            ..EventTypeSpec::default()
        })
        .unwrap_err();
        assert_eq!(e.path, "event_types.t.max_clock_skew_s");
    }

    #[test]
    fn max_age() {
        let r = rules(EventTypeSpec {
            max_age_s: Some(3600),
            ..EventTypeSpec::default()
        })
        .unwrap();
        r.check_clock(1_000_000, 1_000_000 + 3_600_000).unwrap();
        r.check_clock(9_000_000_000, 1_000_000).unwrap();
        assert_eq!(
            r.check_clock(1_000_000, 1_000_000 + 3_612_500)
                .unwrap_err()
                .to_string(),
            "rule max_age_s: ts is 3612.5 s behind received_at (max 3600 s)"
        );
        assert!(r.check_clock(i64::MIN, i64::MAX).is_err());
    }

    #[test]
    fn rule_names_must_be_unique() {
        let rule = |n: &str| RuleSpec {
            name: n.into(),
            expr: "true".into(),
            message: None,
        };
        let e = rules(EventTypeSpec {
            rules: vec![rule("a"), rule("a")],
            ..EventTypeSpec::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "event_types.t.rules[1].name: 'a' is used twice"
        );
        let e = rules(EventTypeSpec {
            rules: vec![rule(" ")],
            ..EventTypeSpec::default()
        })
        .unwrap_err();
        assert_eq!(e.path, "event_types.t.rules[0].name");
    }
}
