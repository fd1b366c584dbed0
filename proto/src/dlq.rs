//! Dead-letter entries: every message that could not become a result, with the reason.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::timestamp::format_rfc3339;

/// Where in the flow a message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Bytes → document: size, encoding, syntax, nesting, non-finite numbers.
    Decode,
    /// Envelope (id, seq, ts, topic agreement) and the event type's field schema.
    Schema,
    /// A business rule over the event and the device's state.
    Rule,
    /// The calculation itself failed (e.g. division by zero, missing state).
    Calc,
    /// An invariant on the calculated result does not hold.
    Check,
    Uplink,
    Cloud,
    Correction,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Schema => "schema",
            Stage::Rule => "rule",
            Stage::Calc => "calc",
            Stage::Check => "check",
            Stage::Uplink => "uplink",
            Stage::Cloud => "cloud",
            Stage::Correction => "correction",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One dead-lettered message (INTERFACES.md "DLQ entries"), as stored (CBOR, raw payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    pub id: u64,
    pub event_id: Option<String>,
    pub device: Option<String>,
    /// The MQTT topic it arrived on: needed to re-inject it on retry.
    pub topic: String,
    pub stage: Stage,
    /// Human-readable; names the field or rule.
    pub reason: String,
    pub attempts: u32,
    pub first_seen: i64,
    pub last_seen: i64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl DlqEntry {
    /// The JSON shape of INTERFACES.md ("DLQ entries"), for `--json` output, `dlq export` and
    /// EventBridge: people read it, so timestamps are RFC 3339 and a payload that is text stays
    /// readable; only binary payloads (CBOR, corrupt bytes) are base64 (standard alphabet),
    /// and `payload_encoding` says which, so the original bytes can always be restored.
    /// Unknown `event_id`/`device` are `null`.
    pub fn to_json(&self) -> Value {
        let (payload, encoding) = match std::str::from_utf8(&self.payload) {
            Ok(text) => (text.to_owned(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&self.payload),
                "base64",
            ),
        };
        json!({
            "id": self.id,
            "event_id": self.event_id,
            "device": self.device,
            "topic": self.topic,
            "stage": self.stage.as_str(),
            "reason": self.reason,
            "attempts": self.attempts,
            "first_seen": format_rfc3339(self.first_seen),
            "last_seen": format_rfc3339(self.last_seen),
            "payload": payload,
            "payload_encoding": encoding,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(payload: &[u8]) -> DlqEntry {
        DlqEntry {
            id: 17,
            event_id: Some("dev-1/e-1".into()),
            device: Some("dev-1".into()),
            topic: "devices/dev-1/events/reading".into(),
            stage: Stage::Schema,
            reason: "seq: expected a non-negative integer, found a string (\"x\")".into(),
            attempts: 3,
            first_seen: 1_795_600_800_000,
            last_seen: 1_795_600_801_500,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn to_json_utf8_payload() {
        let j = entry(br#"{"id":"e-1","seq":"x"}"#).to_json();
        assert_eq!(
            j,
            json!({
                "id": 17,
                "event_id": "dev-1/e-1",
                "device": "dev-1",
                "topic": "devices/dev-1/events/reading",
                "stage": "schema",
                "reason": "seq: expected a non-negative integer, found a string (\"x\")",
                "attempts": 3,
                "first_seen": "2026-11-25T10:00:00.000Z",
                "last_seen": "2026-11-25T10:00:01.500Z",
                "payload": "{\"id\":\"e-1\",\"seq\":\"x\"}",
                "payload_encoding": "utf8",
            })
        );
    }

    #[test]
    fn to_json_binary_payload_is_base64() {
        let raw = [0xa1, 0x62, b'i', b'd', 0xff, 0x00];
        let mut e = entry(&raw);
        e.event_id = None;
        e.device = None;
        e.stage = Stage::Decode;
        let j = e.to_json();
        assert_eq!(j["payload_encoding"], "base64");
        assert_eq!(j["payload"], "oWJpZP8A");
        assert_eq!(j["event_id"], Value::Null);
        assert_eq!(j["device"], Value::Null);
        assert_eq!(j["stage"], "decode");
        let back = base64::engine::general_purpose::STANDARD
            .decode(j["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(back, raw);
    }

    #[test]
    fn stage_serde_matches_as_str() {
        for s in [
            Stage::Decode,
            Stage::Schema,
            Stage::Rule,
            Stage::Calc,
            Stage::Check,
            Stage::Uplink,
            Stage::Cloud,
            Stage::Correction,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
