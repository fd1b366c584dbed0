//! The bodies of the fuzz targets in `fuzz/` that exercise this crate (see `proto::fuzzing`):
//! one function per target, called by the target and by the stable test that replays its
//! committed corpus. Built for tests and with the `fuzzing` feature only.

mod mqtt;
mod records;
#[cfg(test)]
mod seeds;

pub use mqtt::mqtt_packets;
pub use records::store_records;
