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
    pub fn validate(&self) -> Result<(), String> {
        // The envelope alone (`{"id":..,"seq":..,"ts":..,"data":{}}`) needs a few dozen bytes,
        // two levels and four keys.
        if self.max_payload_bytes < 64 {
            return Err(format!(
                "max_payload_bytes: {} is too small (at least 64)",
                self.max_payload_bytes
            ));
        }
        if !(2..=MAX_CONFIGURABLE_DEPTH).contains(&self.max_depth) {
            return Err(format!(
                "max_depth: {} is out of range (2..={MAX_CONFIGURABLE_DEPTH})",
                self.max_depth
            ));
        }
        if self.max_string_len == 0 {
            return Err("max_string_len: must be at least 1".to_string());
        }
        if self.max_fields < 6 {
            return Err(format!(
                "max_fields: {} is too small (the envelope alone has up to 6 keys)",
                self.max_fields
            ));
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
        assert!(bad.validate().unwrap_err().starts_with("max_depth:"));
        let bad = Limits {
            max_string_len: 0,
            ..Limits::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("max_string_len:"));
        let bad = Limits {
            max_fields: 1,
            ..Limits::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("max_fields:"));
        let bad = Limits {
            max_payload_bytes: 0,
            ..Limits::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .starts_with("max_payload_bytes:")
        );
    }
}
