//! `proto::decode_message` on arbitrary bytes (the JSON path when they start with `{`).
//! Properties: no panic; an accepted message respects the limits and round-trips: encoded again
//! as JSON (ts as RFC 3339 when it came that way is fine: ms are exact) it decodes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::{Limits, decode_message};

mod common;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    // Every JSON payload the endpoint sees goes through here; force the JSON path too.
    for payload in [data, &[b"{", data].concat()[..]] {
        if let Ok(msg) = decode_message(payload, &limits) {
            common::check_message(&msg, &limits);
            let again = serde_json::to_vec(&common::envelope(&msg)).unwrap();
            let back = decode_message(&again, &limits).unwrap_or_else(|e| {
                panic!(
                    "re-encoded JSON refused: {e}: {}",
                    String::from_utf8_lossy(&again)
                )
            });
            assert_eq!(back, msg, "JSON round trip changed the message");
        }
    }
});
