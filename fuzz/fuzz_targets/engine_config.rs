//! The body and its properties: `engine::fuzzing::engine_config`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzing::engine_config(data));
