//! The body and its properties: `edge_agent::fuzzing::mqtt_packets`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::fuzzing::mqtt_packets(data));
