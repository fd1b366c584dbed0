//! What cloud-bridge does with a message from a gateway: `service::validate` on
//! `gateways/{g}/results` (CBOR batch decode + `check_batch` + the topic's gateway) and
//! `status::parse` on `gateways/{g}/status` (JSON). The first input byte picks the gateway name
//! length, so both matching and mismatching topics are reached.
//! Properties: no panic; an accepted batch names the topic's gateway, every result is that
//! gateway's with an `edge_seq` > 0, and it round-trips through the wire codec and validates
//! again; an accepted status names the topic's gateway and round-trips through JSON.
#![no_main]
use cloud_bridge::service::{check_batch, validate};
use libfuzzer_sys::fuzz_target;
use proto::{Batch, wire};

fuzz_target!(|data: &[u8]| {
    let Some((&n, payload)) = data.split_first() else {
        return;
    };
    let gw = &"gw-1gw-2gw-3"[..usize::from(n % 8) + 1];
    let topic = proto::uplink::results_topic(gw);
    if let Ok(batch) = validate(&topic, payload) {
        assert_eq!(batch.gateway, gw);
        check_batch(&batch).expect("validated batch passes check_batch");
        for r in &batch.results {
            assert_eq!(r.gateway, gw);
            assert!(r.edge_seq > 0);
        }
        let again = wire::encode(&batch);
        let back: Batch = validate(&topic, &again).expect("re-encoded batch validates");
        assert_eq!(back, batch);
    }
    let topic = proto::uplink::status_topic(gw);
    if let Ok(s) = cloud_bridge::status::parse(&topic, payload) {
        assert_eq!(s.gateway, gw);
        let again = serde_json::to_vec(&s).unwrap();
        let back = cloud_bridge::status::parse(&topic, &again).expect("re-encoded status parses");
        assert_eq!(back, s);
    }
});
