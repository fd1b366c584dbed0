//! The body and its properties: `proto::fuzzing::uplink_batch`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proto::fuzzing::uplink_batch(data));
