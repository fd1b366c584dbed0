//! Dead-letter entries: every message that could not become a result, with the reason.

use serde::{Deserialize, Serialize};

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
        f.write_str(self.as_str())
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
