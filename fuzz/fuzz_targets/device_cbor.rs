//! The body and its properties: `proto::fuzzing::device_cbor`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proto::fuzzing::device_cbor(data));
