//! The bodies of the fuzz targets in `fuzz/` that exercise this crate, and [`replay`], which
//! runs a target's committed corpus and regressions through its body under plain `cargo test`
//! (so a regression is caught without nightly or libFuzzer). Each target is one function here,
//! called by both. Built for tests and with the `fuzzing` feature only.

mod corpus;
mod device;
mod records;
mod uplink;

pub use corpus::replay;
pub use device::{device_cbor, device_json};
pub use records::round_trip;
pub use uplink::uplink_batch;
