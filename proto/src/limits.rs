//! Hard limits on what a device may send.
//!
//! A gateway on a small box must survive a misbehaving or hostile device: every payload is
//! bounded before it is parsed (size) and while it is parsed (nesting, string length, fan-out),
//! so one message can never cost more than a known amount of memory and CPU.

use serde::{Deserialize, Serialize};

/// Depth cap that `validate` enforces: both parsers carry their own recursion guards (serde_json
/// stops at 128, ciborium at 256) and a configured limit must stay well below them so that the
/// decoder, not the parser, reports the error (with the field path).
pub const MAX_CONFIGURABLE_DEPTH: usize = 64;

/// A limit that makes no sense, naming it: `max_depth: 1000 is out of range (2..=64)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct LimitsError {
    /// The [`Limits`] field, e.g. `max_depth`.
    pub field: &'static str,
    pub problem: LimitProblem,
}

/// What is wrong with one limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitProblem {
    #[error("{value} is too small (at least {min})")]
    TooSmall { value: usize, min: usize },
    #[error("{value} is out of range ({min}..={max})")]
    OutOfRange {
        value: usize,
        min: usize,
        max: usize,
    },
    #[error("must be at least 1")]
    Zero,
    /// Fewer keys than the envelope itself may have.
    #[error("{0} is too small (the envelope alone has up to 6 keys)")]
    BelowEnvelope(usize),
}

/// Input limits for [`decode_message`](crate::decode_message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Whole payload, checked before any parsing.
    pub max_payload_bytes: usize,
    /// Nesting of objects/arrays; the top-level object is depth 1, so `data` is depth 2.
    pub max_depth: usize,
    /// Characters (not bytes) per string value or object key.
    pub max_string_len: usize,
    /// Keys per object and elements per array (each container separately).
    pub max_fields: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 64 * 1024,
            max_depth: 16,
            max_string_len: 4096,
            max_fields: 256,
        }
    }
}

impl Limits {
    /// Checks that the limits make sense, naming the offending field, so `check-config` can
    /// refuse a config that would reject every message (a zero) or let the parser's own
    /// recursion guard fire before ours.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let err = |field, problem| Err(LimitsError { field, problem });
        // The envelope alone (`{"id":..,"seq":..,"ts":..,"data":{}}`) needs a few dozen bytes,
        // two levels and four keys.
        if self.max_payload_bytes < 64 {
            return err(
                "max_payload_bytes",
                LimitProblem::TooSmall {
                    value: self.max_payload_bytes,
                    min: 64,
                },
            );
        }
        if !(2..=MAX_CONFIGURABLE_DEPTH).contains(&self.max_depth) {
            return err(
                "max_depth",
                LimitProblem::OutOfRange {
                    value: self.max_depth,
                    min: 2,
                    max: MAX_CONFIGURABLE_DEPTH,
                },
            );
        }
        if self.max_string_len == 0 {
            return err("max_string_len", LimitProblem::Zero);
        }
        if self.max_fields < 6 {
            return err("max_fields", LimitProblem::BelowEnvelope(self.max_fields));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let l = Limits::default();
        assert_eq!(l.max_payload_bytes, 65536);
        assert_eq!(l.max_depth, 16);
        assert_eq!(l.max_string_len, 4096);
        assert_eq!(l.max_fields, 256);
        assert_eq!(l.validate(), Ok(()));
    }

    #[test]
    fn partial_config_keeps_other_defaults() {
        let l: Limits = serde_json::from_str(r#"{"max_depth": 8}"#).unwrap();
        assert_eq!(l.max_depth, 8);
        assert_eq!(l.max_fields, 256);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = serde_json::from_str::<Limits>(r#"{"max_dept": 8}"#).unwrap_err();
        assert!(err.to_string().contains("max_dept"), "{err}");
    }

    #[test]
    fn validate_names_the_field() {
        let bad = Limits {
            max_depth: 1000,
            ..Limits::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "max_depth: 1000 is out of range (2..=64)"
        );
        let bad = Limits {
            max_string_len: 0,
            ..Limits::default()
        };
        assert_eq!(
            bad.validate().unwrap_err(),
            LimitsError {
                field: "max_string_len",
                problem: LimitProblem::Zero
            }
        );
        let bad = Limits {
            max_fields: 1,
            ..Limits::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "max_fields: 1 is too small (the envelope alone has up to 6 keys)"
        );
        let bad = Limits {
            max_payload_bytes: 0,
            ..Limits::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "max_payload_bytes: 0 is too small (at least 64)"
        );
    }
}
