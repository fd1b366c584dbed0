//! Target `uplink_batch`: what the cloud does with a message from a gateway,
//! [`accept::batch`] on `gateways/{g}/results` and [`accept::status`] on
//! `gateways/{g}/status`. The first input byte picks the gateway name length, so both matching
//! and mismatching topics are reached.
//! Properties: no panic; an accepted batch names the topic's gateway, every result is that
//! gateway's with an `edge_seq` > 0, and it round-trips through the wire codec and is accepted
//! again; an accepted status names the topic's gateway and round-trips through JSON.

use crate::accept;
use crate::uplink::{results_topic, status_topic};
use crate::wire;

pub fn uplink_batch(data: &[u8]) {
    let Some((&n, payload)) = data.split_first() else {
        return;
    };
    let gw = &"gw-1gw-2gw-3"[..usize::from(n % 8) + 1];
    let topic = results_topic(gw);
    if let Ok(batch) = accept::batch(&topic, payload) {
        assert_eq!(batch.gateway, gw);
        for r in &batch.results {
            assert_eq!(r.gateway, gw);
            assert!(r.edge_seq > 0);
        }
        let back = accept::batch(&topic, &wire::encode(&batch))
            .unwrap_or_else(|e| panic!("re-encoded batch refused: {e}"));
        assert_eq!(back, batch);
    }
    let topic = status_topic(gw);
    if let Ok(s) = accept::status(&topic, payload) {
        assert_eq!(s.gateway, gw);
        let again = serde_json::to_vec(&s).expect("JSON encodes");
        let back = accept::status(&topic, &again)
            .unwrap_or_else(|e| panic!("re-encoded status refused: {e}"));
        assert_eq!(back, s);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_uplink_batch_corpus_replays() {
        crate::fuzzing::replay("uplink_batch", super::uplink_batch);
    }
}
