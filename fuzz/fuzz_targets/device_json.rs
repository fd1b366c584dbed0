//! The body and its properties: `proto::fuzzing::device_json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proto::fuzzing::device_json(data));
