//! The uplink contract: which MQTT topics carry what between a gateway and the cloud.
//!
//! - `gateways/{gateway}/results` (gateway → cloud, QoS 1): one CBOR [`Batch`](crate::Batch),
//!   results contiguous and ascending in `edge_seq`.
//! - `gateways/{gateway}/replay` (cloud → gateway, QoS 1): one JSON [`ReplayRequest`]; the
//!   gateway re-sends that `edge_seq` range from its replay window.

use serde::{Deserialize, Serialize};

pub fn results_topic(gateway: &str) -> String {
    format!("gateways/{gateway}/results")
}

pub fn replay_topic(gateway: &str) -> String {
    format!("gateways/{gateway}/replay")
}

/// The filter a bridge subscribes to for every gateway's results.
pub const RESULTS_FILTER: &str = "gateways/+/results";

/// The gateway id in a results or replay topic, if it is one.
pub fn gateway_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("gateways/")?;
    let (gateway, kind) = rest.split_once('/')?;
    (matches!(kind, "results" | "replay") && !gateway.is_empty()).then_some(gateway)
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
    }
}
