//! What the gateway makes of a device message, and what the cloud stores.

use serde::{Deserialize, Serialize};

use crate::Fields;

/// One processed event (INTERFACES.md "Results"). Timestamps are epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventResult {
    /// `{device}/{id}`: unique across the fleet because a device id is one MQTT topic level.
    pub event_id: String,
    pub device: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub seq: u64,
    pub ts: i64,
    pub gateway: String,
    /// How the event reached the engine. Records written before it existed are gateway ones.
    #[serde(default)]
    pub via: Via,
    /// Gateway-wide, gap-free order of results in the outbox; 0 for an event that reached
    /// the cloud without a gateway (`via` other than `gateway`), which has no such order.
    pub edge_seq: u64,
    pub input: Fields,
    pub result: Fields,
    /// Names the exact calculation that produced `result` (a hash of its definition).
    pub calc_version: String,
    pub status: Status,
    pub flags: Vec<String>,
    pub anomaly_score: f64,
    pub processed_at: i64,
    pub correction: Option<Correction>,
}

impl EventResult {
    pub fn event_id(device: &str, id: &str) -> String {
        format!("{device}/{id}")
    }
}

/// Where an event entered the system: a gateway's edge-agent, or straight into the cloud
/// for devices without one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    #[default]
    Gateway,
    /// `POST /v1/devices/{device}/events/{type}` or `/v1/events:batch` (the bridge's HTTP
    /// listener or API Gateway).
    Http,
    /// MQTT to the cloud: AWS IoT Core (through a topic rule) or the bridge's own broker.
    Iot,
    /// An EventBridge event whose detail is the device message.
    #[serde(rename = "eventbridge")]
    EventBridge,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Gateway => "gateway",
            Via::Http => "http",
            Via::Iot => "iot",
            Via::EventBridge => "eventbridge",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Anomaly,
    Corrected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Correction {
    pub reason: String,
    pub previous_result: Fields,
    pub at: i64,
    pub by: CorrectedBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectedBy {
    Edge,
    Cloud,
}
