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

/// What a rejection is about, as the engine knew it: a field, a rule (or check), or the message
/// as a whole. Lets the DLQ group and filter its entries without reading the reason text back.
///
/// Serialized snake_case, externally tagged: `{"field": "data.voltage"}`, `{"rule":
/// "counter_monotonic"}`, `"document"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// A field, by its path in the message (`data.voltage`, `data` for undeclared fields,
    /// `seq`, `device`); at stage `calc`, the derived field's name (`power_w`).
    Field(String),
    /// A rule or check, by name: a configured one (`counter_monotonic`) or a built-in
    /// (`allowed_devices`, `max_clock_skew_s`, `max_age_s`).
    Rule(String),
    /// The message as a whole: its bytes, its topic, its event type.
    Document,
}

impl Subject {
    /// The group of a DLQ entry with this subject at `stage`, as `dlq stats` counts it, in
    /// the words its reason starts with: the field (`data.voltage`; `calc power_w` at stage
    /// `calc`) or the rule (`rule counter_monotonic`; `check x` at stage `check`). `None` for
    /// [`Subject::Document`]: then the kind of problem is in the reason text.
    pub fn group(&self, stage: Stage) -> Option<String> {
        match self {
            Subject::Field(f) if stage == Stage::Calc => Some(format!("calc {f}")),
            Subject::Field(f) => Some(f.clone()),
            Subject::Rule(r) if stage == Stage::Check => Some(format!("check {r}")),
            Subject::Rule(r) => Some(format!("rule {r}")),
            Subject::Document => None,
        }
    }
}

/// One dead-lettered message (INTERFACES.md "DLQ entries"), as stored (CBOR, raw payload).
///
/// Contract: `subject` was added after the INTERFACES.md shape (2026-12). It is optional both
/// ways: entries stored or sent before it existed read with `subject: None` (the reason text
/// is then all there is), and an entry without one is written without the key, so the shape
/// only grows and older readers are unaffected.
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
    /// What the reason is about, when the engine said (see the contract note above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
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
    /// Unknown `event_id`/`device` are `null`; `subject` is there only when known.
    pub fn to_json(&self) -> Value {
        let (payload, encoding) = match std::str::from_utf8(&self.payload) {
            Ok(text) => (text.to_owned(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&self.payload),
                "base64",
            ),
        };
        let mut j = json!({
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
        });
        if let (Some(s), Value::Object(m)) = (&self.subject, &mut j) {
            m.insert("subject".into(), json!(s));
        }
        j
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
            subject: None,
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
    fn subject_is_optional_both_ways() {
        // Written without a subject: no key, in JSON and in the stored CBOR.
        let old = entry(b"{}");
        assert!(old.to_json().get("subject").is_none());
        let mut cbor = Vec::new();
        ciborium::into_writer(&old, &mut cbor).unwrap();
        let as_map: ciborium::Value = ciborium::from_reader(cbor.as_slice()).unwrap();
        let keys: Vec<_> = as_map
            .as_map()
            .unwrap()
            .iter()
            .filter_map(|(k, _)| k.as_text())
            .collect();
        assert!(!keys.contains(&"subject"), "{keys:?}");
        // A record from before the field existed (its JSON has no subject) still reads.
        let j = serde_json::to_value(&old).unwrap();
        assert!(j.get("subject").is_none());
        assert_eq!(serde_json::from_value::<DlqEntry>(j).unwrap(), old);

        let mut new = entry(b"{}");
        new.subject = Some(Subject::Field("seq".into()));
        assert_eq!(new.to_json()["subject"], json!({"field": "seq"}));
        let mut cbor = Vec::new();
        ciborium::into_writer(&new, &mut cbor).unwrap();
        assert_eq!(
            ciborium::from_reader::<DlqEntry, _>(cbor.as_slice()).unwrap(),
            new
        );
    }

    #[test]
    fn subjects_serialize_snake_case_and_group() {
        assert_eq!(
            serde_json::to_value(Subject::Rule("counter_monotonic".into())).unwrap(),
            json!({"rule": "counter_monotonic"})
        );
        assert_eq!(
            serde_json::to_value(Subject::Document).unwrap(),
            json!("document")
        );
        let field = Subject::Field("data.voltage".into());
        assert_eq!(field.group(Stage::Schema).as_deref(), Some("data.voltage"));
        let calc = Subject::Field("power_w".into());
        assert_eq!(calc.group(Stage::Calc).as_deref(), Some("calc power_w"));
        let check = Subject::Rule("non_negative".into());
        assert_eq!(
            check.group(Stage::Check).as_deref(),
            Some("check non_negative")
        );
        let rule = Subject::Rule("max_age_s".into());
        assert_eq!(rule.group(Stage::Rule).as_deref(), Some("rule max_age_s"));
        // A rule refused again in the cloud is still that rule.
        assert_eq!(rule.group(Stage::Cloud).as_deref(), Some("rule max_age_s"));
        assert_eq!(Subject::Document.group(Stage::Decode), None);
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
