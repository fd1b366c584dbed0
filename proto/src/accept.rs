//! What the cloud accepts from a gateway: an uplink message is decoded and checked against the
//! topic it arrived on before anything of it is stored. Pure (no I/O), so every cloud transport
//! (`cloud-bridge run`, the Lambda) and the fuzz target run the same checks.

use crate::uplink::{GatewayStatus, gateway_of, status_gateway_of};
use crate::wire::{self, Batch, WireError};

/// An uplink message (results batch or gateway status) that cannot be taken. Its text is the
/// `reason` of the DLQ entry the bridge stores under `failures/`.
#[derive(Debug, thiserror::Error)]
pub enum InvalidUplink {
    #[error("topic '{0}' is not gateways/{{gateway}}/results")]
    ResultsTopic(String),
    #[error("topic '{0}' is not gateways/{{gateway}}/status")]
    StatusTopic(String),
    #[error("undecodable CBOR batch: {0}")]
    Batch(#[from] WireError),
    #[error("not a status message: {0}")]
    Status(#[from] serde_json::Error),
    /// The message names another gateway than its topic: refused, never stored as either.
    #[error("{what} names gateway '{named}' but arrived on the topic of '{topic}'")]
    WrongGateway {
        what: &'static str,
        named: String,
        topic: String,
    },
    #[error("batch.gateway: must not be empty")]
    NoGateway,
    #[error("results[{index}].gateway: '{found}' differs from the batch's '{batch}'")]
    ForeignResult {
        index: usize,
        found: String,
        batch: String,
    },
    #[error("results[{0}].edge_seq: must be at least 1")]
    ZeroSeq(usize),
    /// JSON has no NaN or infinity: stored in S3 it would read back as `null`, which no
    /// result record can be, and every later read of that object would fail.
    #[error("results[{0}].anomaly_score: must be a finite number")]
    NotFinite(usize),
}

/// The batch in a message on `gateways/{g}/results`, or why it is not one.
pub fn batch(topic: &str, payload: &[u8]) -> Result<Batch, InvalidUplink> {
    let Some(gw) = gateway_of(topic) else {
        return Err(InvalidUplink::ResultsTopic(topic.to_string()));
    };
    let batch: Batch = wire::decode(payload)?;
    check_batch(&batch)?;
    if batch.gateway != gw {
        return Err(InvalidUplink::WrongGateway {
            what: "batch",
            named: batch.gateway,
            topic: gw.to_string(),
        });
    }
    Ok(batch)
}

/// Every result must belong to the batch's gateway (the Lambda, which has no topic, checks
/// only this).
pub fn check_batch(batch: &Batch) -> Result<(), InvalidUplink> {
    if batch.gateway.is_empty() {
        return Err(InvalidUplink::NoGateway);
    }
    for (index, r) in batch.results.iter().enumerate() {
        if r.gateway != batch.gateway {
            return Err(InvalidUplink::ForeignResult {
                index,
                found: r.gateway.clone(),
                batch: batch.gateway.clone(),
            });
        }
        if r.edge_seq == 0 {
            return Err(InvalidUplink::ZeroSeq(index));
        }
        if !r.anomaly_score.is_finite() {
            return Err(InvalidUplink::NotFinite(index));
        }
    }
    Ok(())
}

/// The status in a message on `gateways/{g}/status`, or why it is not one.
pub fn status(topic: &str, payload: &[u8]) -> Result<GatewayStatus, InvalidUplink> {
    let gw =
        status_gateway_of(topic).ok_or_else(|| InvalidUplink::StatusTopic(topic.to_string()))?;
    let s: GatewayStatus = serde_json::from_slice(payload)?;
    if s.gateway != gw {
        return Err(InvalidUplink::WrongGateway {
            what: "status",
            named: s.gateway,
            topic: gw.to_string(),
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_checked_against_their_topic() {
        let body = br#"{"gateway":"gw-1","released":5,"at":9,"missed":[{"id":2,"device":"m",
            "first_seq":3,"last_seq":4,"count":2,"ranges":[{"first":3,"last":4}],"declared_at":7}]}"#;
        let s = status("gateways/gw-1/status", body).unwrap();
        assert_eq!((s.released, s.missed.len()), (5, 1));
        let e = status("gateways/gw-2/status", body).unwrap_err();
        assert!(
            matches!(&e, InvalidUplink::WrongGateway { named, topic, .. } if named == "gw-1" && topic == "gw-2")
        );
        assert_eq!(
            e.to_string(),
            "status names gateway 'gw-1' but arrived on the topic of 'gw-2'"
        );
        assert!(status("gateways/gw-1/results", body).is_err());
        assert!(status("gateways/gw-1/status", b"{").is_err());
    }

    #[test]
    fn batches_are_checked_against_their_topic_and_their_results() {
        let empty = |g: &str| Batch {
            gateway: g.into(),
            results: vec![],
        };
        let ok = batch("gateways/gw-1/results", &wire::encode(&empty("gw-1"))).unwrap();
        assert_eq!(ok, empty("gw-1"));
        assert!(matches!(
            batch("gateways/gw-2/results", &wire::encode(&empty("gw-1"))),
            Err(InvalidUplink::WrongGateway { what: "batch", .. })
        ));
        assert!(matches!(
            batch("gateways//results", &wire::encode(&empty(""))),
            Err(InvalidUplink::ResultsTopic(_))
        ));
        assert!(matches!(
            check_batch(&empty("")),
            Err(InvalidUplink::NoGateway)
        ));
        assert!(matches!(
            batch("gateways/gw-1/results", b"\xff"),
            Err(InvalidUplink::Batch(_))
        ));
    }

    #[test]
    fn a_result_with_a_score_json_cannot_hold_is_refused() {
        // Found by the uplink_batch fuzz target: a NaN score would be stored as `null`.
        for score in [f64::NAN, f64::INFINITY] {
            let mut r = crate::wire::tests::sample_result();
            r.anomaly_score = score;
            let b = Batch {
                gateway: r.gateway.clone(),
                results: vec![r],
            };
            let e = check_batch(&b).unwrap_err();
            assert_eq!(
                e.to_string(),
                "results[0].anomaly_score: must be a finite number"
            );
        }
    }
}
