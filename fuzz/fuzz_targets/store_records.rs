//! The CBOR record codec (`proto::wire`) on arbitrary bytes, for every record the store and the
//! uplink frame with it: outbox results, DLQ entries, uplink batches, missed records and gap
//! trackers (edge-agent's store), replay requests and gateway status.
//! Properties: no panic; a record that decodes re-encodes to bytes that decode to the same
//! record, and re-encoding is stable (encode∘decode∘encode = encode); a batch framed from stored
//! results (`encode_batch_raw`, what the uplink sends) decodes like the batch itself.
#![no_main]
use std::fmt::Debug;

use edge_agent::missed::{DeviceGaps, MissedRecord};
use libfuzzer_sys::fuzz_target;
use proto::uplink::{GatewayStatus, ReplayRequest};
use proto::{Batch, DlqEntry, EventResult, wire};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let v: T = wire::decode(data).ok()?;
    let bytes = wire::encode(&v);
    let back: T = wire::decode(&bytes)
        .unwrap_or_else(|e| panic!("re-encoded {} refused: {e}", std::any::type_name::<T>()));
    assert_eq!(back, v, "round trip changed the record");
    assert_eq!(wire::encode(&back), bytes, "encoding is not stable");
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    if let Some(r) = round_trip::<EventResult>(data) {
        // The uplink frames stored results as they are.
        let stored = wire::encode(&r);
        let mut buf = Vec::new();
        wire::encode_batch_raw(&r.gateway, [stored.as_slice(), data].into_iter(), &mut buf);
        let b: Batch = wire::decode(&buf).expect("raw-framed batch decodes");
        assert_eq!(b.gateway, r.gateway);
        assert_eq!(b.results, vec![r.clone(), r]);
    }
    round_trip::<DlqEntry>(data);
    round_trip::<Batch>(data);
    round_trip::<MissedRecord>(data);
    round_trip::<DeviceGaps>(data);
    round_trip::<ReplayRequest>(data);
    round_trip::<GatewayStatus>(data);
});
