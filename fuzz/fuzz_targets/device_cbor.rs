//! `proto::decode_message` on CBOR bytes (anything not starting with `{` after whitespace).
//! Properties: no panic; an accepted message respects the limits; it round-trips through CBOR
//! and through JSON (both formats must decode to the same message).
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::{Limits, decode_message};

mod common;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    // Self-describe tag prefix as some devices send it, and the bytes as they are.
    for payload in [data, &[&[0xd9, 0xd9, 0xf7][..], data].concat()[..]] {
        if let Ok(msg) = decode_message(payload, &limits) {
            common::check_message(&msg, &limits);
            let doc = common::envelope(&msg);
            let mut cbor = Vec::new();
            ciborium::ser::into_writer(&doc, &mut cbor).unwrap();
            let back = decode_message(&cbor, &limits)
                .unwrap_or_else(|e| panic!("re-encoded CBOR refused: {e}"));
            assert_eq!(back, msg, "CBOR round trip changed the message");
            let json = serde_json::to_vec(&doc).unwrap();
            let back = decode_message(&json, &limits)
                .unwrap_or_else(|e| panic!("the same message as JSON refused: {e}"));
            assert_eq!(back, msg, "CBOR and JSON decode differently");
        }
    }
});
