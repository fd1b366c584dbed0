//! The body and its properties: `edge_agent::fuzzing::store_records`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::fuzzing::store_records(data));
