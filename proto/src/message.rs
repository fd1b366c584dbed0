//! What a device sends.

use serde::{Deserialize, Serialize};

/// A JSON-like object: the `data` of a device message and the derived `result` fields.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// One device message after decoding, with its envelope checked.
///
/// `device` and `event_type` are what the payload itself said (optional); the topic is the
/// authority and the engine checks that the two agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceMessage {
    /// Unique per device.
    pub id: String,
    /// Increases by one per device; a gap is a missed event.
    pub seq: u64,
    /// Event time, epoch milliseconds (RFC 3339 strings are converted on decode).
    pub ts: i64,
    pub device: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub data: Fields,
}
