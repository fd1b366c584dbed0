//! Target `store_records`: the CBOR record codec (`proto::wire`) on arbitrary bytes, for every
//! record the store and the uplink frame with it: outbox results, DLQ entries, uplink batches,
//! missed records and gap trackers (this crate's store), replay requests and gateway status.
//! Properties: those of [`round_trip`] for each record type; a batch framed from stored
//! results (`encode_batch_raw`, what the uplink sends) decodes like the batch itself.

use proto::fuzzing::round_trip;
use proto::uplink::{GatewayStatus, ReplayRequest};
use proto::{Batch, DlqEntry, EventResult, wire};

use crate::missed::{DeviceGaps, MissedRecord};

pub fn store_records(data: &[u8]) {
    if let Some(r) = round_trip::<EventResult>(data) {
        // The uplink frames stored results as they are.
        let stored = wire::encode(&r);
        let mut buf = Vec::new();
        wire::encode_batch_raw(&r.gateway, [stored.as_slice(), data].into_iter(), &mut buf);
        let b: Batch = wire::decode(&buf).expect("raw-framed batch decodes");
        assert_eq!(b.gateway, r.gateway);
        // As printed, so a NaN a damaged record may hold equals itself.
        assert_eq!(format!("{:?}", b.results), format!("{:?}", [&r, &r]));
    }
    round_trip::<DlqEntry>(data);
    round_trip::<Batch>(data);
    round_trip::<MissedRecord>(data);
    round_trip::<DeviceGaps>(data);
    round_trip::<ReplayRequest>(data);
    round_trip::<GatewayStatus>(data);
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_store_records_corpus_replays() {
        proto::fuzzing::replay("store_records", super::store_records);
    }
}
