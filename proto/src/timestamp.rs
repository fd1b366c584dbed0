//! Event timestamps: epoch milliseconds inside the system, RFC 3339 accepted from devices and
//! rendered for humans.
//!
//! One integer representation keeps ordering, partitioning and arithmetic trivial; the string
//! form exists because some devices only have a formatted clock and because people read DLQ
//! listings.

use serde_json::Value;
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// 9999-12-31T23:59:59.999Z: the last instant RFC 3339 (four-digit years) can express. Anything
/// larger is a unit mix-up (micro/nanoseconds) rather than a date.
pub const MAX_EPOCH_MS: i64 = 253_402_300_799_999;

/// 0000-01-01T00:00:00Z: the first instant RFC 3339 can express (only used when formatting).
const MIN_RFC3339_MS: i64 = -62_167_219_200_000;

/// Longest string echoed back in an error, so a hostile payload cannot bloat DLQ reasons.
const ECHO_MAX: usize = 40;

/// Why a value is not an acceptable timestamp. Messages do not name the field: the caller
/// prefixes it (`ts: ...`).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TimestampError {
    #[error("{0} is negative; epoch milliseconds must be >= 0")]
    Negative(i64),
    #[error("{0} is beyond 9999-12-31 (max {MAX_EPOCH_MS}); is it in micro- or nanoseconds?")]
    TooLarge(u64),
    #[error("{0} is not an integer number of epoch milliseconds")]
    NotInteger(f64),
    #[error("\"{input}\" is not an RFC 3339 timestamp: {reason}")]
    BadRfc3339 { input: String, reason: String },
    #[error("\"{0}\" is before 1970-01-01T00:00:00Z")]
    BeforeEpoch(String),
    #[error("expected epoch milliseconds (integer) or an RFC 3339 string, found {0}")]
    WrongType(&'static str),
}

/// Checks an integer already known to be non-negative.
pub fn from_epoch_ms(ms: u64) -> Result<i64, TimestampError> {
    if ms > MAX_EPOCH_MS as u64 {
        return Err(TimestampError::TooLarge(ms));
    }
    Ok(ms as i64)
}

/// Parses an RFC 3339 timestamp (any offset) to epoch milliseconds, truncating sub-millisecond
/// digits.
pub fn parse_rfc3339(s: &str) -> Result<i64, TimestampError> {
    let dt = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| TimestampError::BadRfc3339 {
        input: echo(s),
        reason: e.to_string(),
    })?;
    let ms = dt.unix_timestamp_nanos().div_euclid(1_000_000);
    if ms < 0 {
        return Err(TimestampError::BeforeEpoch(echo(s)));
    }
    // `time` only parses four-digit years, so this cannot exceed MAX_EPOCH_MS.
    Ok(ms as i64)
}

/// Reads a timestamp from a decoded document value: an integer number of milliseconds (floats,
/// even `1.0`, are refused so that seconds-with-fraction never pass as milliseconds) or an
/// RFC 3339 string.
pub fn from_json(v: &Value) -> Result<i64, TimestampError> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                from_epoch_ms(u)
            } else if let Some(i) = n.as_i64() {
                Err(TimestampError::Negative(i))
            } else {
                Err(TimestampError::NotInteger(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => parse_rfc3339(s),
        other => Err(TimestampError::WrongType(type_name(other))),
    }
}

/// `2026-11-25T10:00:00.000Z`: always UTC, always three fractional digits, so the strings sort
/// like the numbers. Values outside the years 0000..=9999 are clamped to that range.
pub fn format_rfc3339(ms: i64) -> String {
    let ms = ms.clamp(MIN_RFC3339_MS, MAX_EPOCH_MS);
    // In range by the clamp above.
    let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// For `#[serde(with = "proto::timestamp::rfc3339")]`: epoch ms as RFC 3339 in JSON (the
/// edge CLI's and status' JSON views).
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// `Option<i64>` epoch ms as RFC 3339 or `null` in JSON.
pub mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => s.serialize_str(&super::format_rfc3339(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse_rfc3339(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn epoch_ms_bounds() {
        assert_eq!(from_json(&json!(0)), Ok(0));
        assert_eq!(
            from_json(&json!(1_764_000_000_000u64)),
            Ok(1_764_000_000_000)
        );
        assert_eq!(from_json(&json!(MAX_EPOCH_MS)), Ok(MAX_EPOCH_MS));
        assert_eq!(
            from_json(&json!(MAX_EPOCH_MS + 1)),
            Err(TimestampError::TooLarge(MAX_EPOCH_MS as u64 + 1))
        );
        let e = from_json(&json!(-1)).unwrap_err();
        assert_eq!(e, TimestampError::Negative(-1));
        assert!(e.to_string().contains("-1 is negative"), "{e}");
    }

    #[test]
    fn floats_are_rejected() {
        let e = from_json(&json!(1.5)).unwrap_err();
        assert_eq!(e, TimestampError::NotInteger(1.5));
        assert!(e.to_string().contains("1.5"), "{e}");
        assert!(matches!(
            from_json(&json!(1_764_000_000_000.0)),
            Err(TimestampError::NotInteger(_))
        ));
    }

    #[test]
    fn rfc3339_variants() {
        assert_eq!(parse_rfc3339("2026-11-25T10:00:00Z"), Ok(1_795_600_800_000));
        assert_eq!(
            parse_rfc3339("2026-11-25T11:00:00+01:00"),
            Ok(1_795_600_800_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-25T10:00:00.123456Z"),
            Ok(1_795_600_800_123)
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
    }

    #[test]
    fn bad_rfc3339() {
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-11-25 10:00:00",
            "2026-11-25",
            "yesterday",
            "",
        ] {
            let e = parse_rfc3339(bad).unwrap_err();
            assert!(
                matches!(e, TimestampError::BadRfc3339 { .. }),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("not an RFC 3339 timestamp"), "{e}");
        }
        let e = parse_rfc3339("1969-12-31T23:59:59Z").unwrap_err();
        assert!(matches!(e, TimestampError::BeforeEpoch(_)), "{e:?}");
    }

    #[test]
    fn long_input_is_not_echoed_whole() {
        let long = "x".repeat(1000);
        let e = parse_rfc3339(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn wrong_types() {
        assert_eq!(
            from_json(&json!(true)),
            Err(TimestampError::WrongType("a boolean"))
        );
        assert_eq!(
            from_json(&json!(null)),
            Err(TimestampError::WrongType("null"))
        );
        assert_eq!(
            from_json(&json!({})),
            Err(TimestampError::WrongType("an object"))
        );
    }

    #[test]
    fn format_round_trips() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_795_600_800_123),
            "2026-11-25T10:00:00.123Z"
        );
        assert_eq!(format_rfc3339(MAX_EPOCH_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_rfc3339(i64::MIN), "0000-01-01T00:00:00.000Z");
        for ms in [0, 1, 999, 1_795_600_800_123, MAX_EPOCH_MS] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Ok(ms));
        }
    }
}
