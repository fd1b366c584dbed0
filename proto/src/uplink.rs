//! The uplink contract: which MQTT topics carry what between a gateway and the cloud.
//!
//! - `gateways/{gateway}/results` (gateway → cloud, QoS 1): one CBOR [`Batch`](crate::Batch),
//!   results contiguous and ascending in `edge_seq`.
//! - `gateways/{gateway}/replay` (cloud → gateway, QoS 1): one JSON [`ReplayRequest`]; the
//!   gateway re-sends that `edge_seq` range from its replay window.
//! - `gateways/{gateway}/status` (gateway → cloud, QoS 1): one JSON [`GatewayStatus`], every
//!   `status_interval_s` and right after each (re)connect: how far the broker acknowledged the
//!   gateway's results (`released`, so the cloud notices a lost tail) and the gateway's
//!   missed-event records and store quarantines not yet reported. Only `cloud-bridge run` subscribes to it (the
//!   Lambda transport ignores it).

use serde::{Deserialize, Serialize};

pub fn results_topic(gateway: &str) -> String {
    format!("gateways/{gateway}/results")
}

pub fn replay_topic(gateway: &str) -> String {
    format!("gateways/{gateway}/replay")
}

pub fn status_topic(gateway: &str) -> String {
    format!("gateways/{gateway}/status")
}

/// The filter a bridge subscribes to for every gateway's results.
pub const RESULTS_FILTER: &str = "gateways/+/results";

/// The filter a bridge subscribes to for every gateway's status messages.
pub const STATUS_FILTER: &str = "gateways/+/status";

/// The gateway id in a results, replay or status topic, if it is one.
pub fn gateway_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("gateways/")?;
    let (gateway, kind) = rest.split_once('/')?;
    (matches!(kind, "results" | "replay" | "status") && !gateway.is_empty()).then_some(gateway)
}

/// The gateway id of a status topic (`gateways/{g}/status`), if it is one.
pub fn status_gateway_of(topic: &str) -> Option<&str> {
    let g = topic.strip_prefix("gateways/")?.strip_suffix("/status")?;
    (!g.is_empty() && !g.contains('/')).then_some(g)
}

/// Most missed-event records one status message carries (the rest follow in later ones).
pub const MAX_MISSED_PER_STATUS: usize = 100;

/// A gateway's periodic status on `gateways/{g}/status` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub gateway: String,
    /// Every `edge_seq` up to here was acknowledged by the cloud broker (PUBACK received):
    /// the cloud should have it, or ask for a replay.
    pub released: u64,
    /// When it was sent (epoch ms).
    pub at: i64,
    /// Missed-event records (device sequence gaps given up on) not yet reported, oldest
    /// first, at most [`MAX_MISSED_PER_STATUS`].
    #[serde(default)]
    pub missed: Vec<MissedReport>,
    /// Damaged stores the gateway moved aside and started afresh from, not yet reported
    /// (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantines: Vec<QuarantineReport>,
}

/// A gateway's store found damaged at start-up and moved aside: results it held but had not
/// yet sent are only in the quarantined copy (`edge-agent store salvage` reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineReport {
    /// When it was moved aside (epoch ms); unique per gateway.
    pub at: i64,
    /// Where the damaged store now is, on the gateway.
    pub moved_to: String,
    /// What the start-up probe said.
    pub reason: String,
}

/// One missed-event record of a gateway: seqs of `device` that never arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissedReport {
    /// The record's id on its gateway (unique per gateway).
    pub id: u64,
    pub device: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Seqs still missing.
    pub count: u64,
    /// The seqs still missing, as inclusive ranges.
    pub ranges: Vec<SeqSpan>,
    /// When the gateway declared them missed (epoch ms).
    pub declared_at: i64,
}

/// An inclusive range of device seqs (`{ "first", "last" }`, as the agent's `missed list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSpan {
    pub first: u64,
    pub last: u64,
}

/// Asks a gateway to send `edge_seq` `from..=to` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRequest {
    pub from: u64,
    pub to: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        assert_eq!(gateway_of(&results_topic("gw-1")), Some("gw-1"));
        assert_eq!(gateway_of(&replay_topic("gw-1")), Some("gw-1"));
        assert_eq!(gateway_of("gateways//results"), None);
        assert_eq!(gateway_of("devices/x/events/y"), None);
        let r: ReplayRequest = serde_json::from_str(r#"{"from": 3, "to": 9}"#).unwrap();
        assert_eq!(r, ReplayRequest { from: 3, to: 9 });
        assert_eq!(status_topic("gw-1"), "gateways/gw-1/status");
        assert_eq!(gateway_of(&status_topic("gw-1")), Some("gw-1"));
        assert_eq!(status_gateway_of(&status_topic("gw-1")), Some("gw-1"));
        assert_eq!(status_gateway_of(&results_topic("gw-1")), None);
        assert_eq!(status_gateway_of("gateways//status"), None);
        assert_eq!(status_gateway_of("gateways/a/b/status"), None);
    }

    #[test]
    fn status_json_shape() {
        let s = GatewayStatus {
            gateway: "gw-1".into(),
            released: 42,
            at: 1_795_600_800_000,
            missed: vec![MissedReport {
                id: 7,
                device: "meter-1".into(),
                first_seq: 3,
                last_seq: 9,
                count: 6,
                ranges: vec![SeqSpan { first: 3, last: 5 }, SeqSpan { first: 7, last: 9 }],
                declared_at: 1_795_600_700_000,
            }],
            quarantines: vec![],
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "gateway": "gw-1", "released": 42, "at": 1_795_600_800_000i64,
                "missed": [{ "id": 7, "device": "meter-1", "first_seq": 3, "last_seq": 9,
                    "count": 6, "ranges": [{"first": 3, "last": 5}, {"first": 7, "last": 9}],
                    "declared_at": 1_795_600_700_000i64 }]
            })
        );
        let back: GatewayStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        // `missed` may be left out.
        let bare: GatewayStatus =
            serde_json::from_str(r#"{"gateway":"g","released":0,"at":1}"#).unwrap();
        assert!(bare.missed.is_empty());
        assert!(bare.quarantines.is_empty());
        let q = GatewayStatus {
            quarantines: vec![QuarantineReport {
                at: 5,
                moved_to: "/var/lib/edge-agent/quarantine/x/store".into(),
                reason: "store check exited 1".into(),
            }],
            ..bare
        };
        let v = serde_json::to_value(&q).unwrap();
        assert_eq!(v["quarantines"][0]["reason"], "store check exited 1");
        assert_eq!(serde_json::from_value::<GatewayStatus>(v).unwrap(), q);
    }
}
