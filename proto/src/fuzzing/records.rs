//! The property every CBOR record codec has, shared by the record targets (`store_records`
//! in edge-agent, `uplink_batch`).

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire;

/// Decodes `data` as a `T`; a record that decodes re-encodes to bytes that decode to the same
/// record, and re-encoding is stable (encode∘decode∘encode = encode).
pub fn round_trip<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) -> Option<T> {
    let v: T = wire::decode(data).ok()?;
    let bytes = wire::encode(&v);
    let back: T = wire::decode(&bytes)
        .unwrap_or_else(|e| panic!("re-encoded {} refused: {e}", std::any::type_name::<T>()));
    // Compared as printed, so a NaN (which a damaged record may hold) equals itself.
    assert_eq!(
        format!("{back:?}"),
        format!("{v:?}"),
        "round trip changed the record"
    );
    assert_eq!(wire::encode(&back), bytes, "encoding is not stable");
    Some(v)
}
