//! Targets `device_json` and `device_cbor`: [`decode_message`] on arbitrary bytes.
//! Properties: no panic; an accepted message respects the limits and round-trips: encoded again
//! (JSON, and CBOR for the CBOR target) it decodes to itself, and JSON and CBOR forms of one
//! message decode alike.

use serde_json::{Value, json};

use crate::decode::MAX_ID_CHARS;
use crate::timestamp::MAX_EPOCH_MS;
use crate::{DeviceMessage, Limits, decode_message};

/// The JSON path: the bytes as they are and behind a `{` (so the JSON parser sees them).
pub fn device_json(data: &[u8]) {
    let limits = Limits::default();
    for payload in [data, &[b"{", data].concat()[..]] {
        if let Ok(msg) = decode_message(payload, &limits) {
            check_message(&msg, &limits);
            assert_json_round_trip(&msg, &limits);
        }
    }
}

/// The CBOR path: the bytes as they are and behind the self-describe tag some devices send.
pub fn device_cbor(data: &[u8]) {
    let limits = Limits::default();
    for payload in [data, &[&[0xd9, 0xd9, 0xf7][..], data].concat()[..]] {
        if let Ok(msg) = decode_message(payload, &limits) {
            check_message(&msg, &limits);
            let mut cbor = Vec::new();
            ciborium::ser::into_writer(&envelope(&msg), &mut cbor).expect("CBOR encodes");
            let back = decode_message(&cbor, &limits)
                .unwrap_or_else(|e| panic!("re-encoded CBOR refused: {e}"));
            assert_eq!(back, msg, "CBOR round trip changed the message");
            assert_json_round_trip(&msg, &limits);
        }
    }
}

fn assert_json_round_trip(msg: &DeviceMessage, limits: &Limits) {
    let json = serde_json::to_vec(&envelope(msg)).expect("JSON encodes");
    let back = decode_message(&json, limits).unwrap_or_else(|e| {
        panic!(
            "re-encoded JSON refused: {e}: {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(&back, msg, "JSON round trip changed the message");
}

/// The message as a device would send it again (ts as epoch ms).
fn envelope(m: &DeviceMessage) -> Value {
    json!({
        "id": m.id, "seq": m.seq, "ts": m.ts, "device": m.device, "type": m.event_type,
        "data": m.data,
    })
}

/// What an accepted message must satisfy whatever the bytes were.
fn check_message(m: &DeviceMessage, l: &Limits) {
    assert!(!m.id.is_empty() && m.id.chars().count() <= MAX_ID_CHARS);
    assert!((0..=MAX_EPOCH_MS).contains(&m.ts), "ts {}", m.ts);
    for s in [&m.device, &m.event_type].into_iter().flatten() {
        assert!(s.chars().count() <= l.max_string_len);
    }
    assert!(m.data.len() <= l.max_fields);
    for (k, v) in &m.data {
        assert!(k.chars().count() <= l.max_string_len);
        check_value(v, 2, l);
    }
}

fn check_value(v: &Value, depth: usize, l: &Limits) {
    match v {
        Value::String(s) => assert!(s.chars().count() <= l.max_string_len),
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite)),
        Value::Array(items) => {
            assert!(depth <= l.max_depth && items.len() <= l.max_fields);
            items.iter().for_each(|i| check_value(i, depth + 1, l));
        }
        Value::Object(map) => {
            assert!(depth <= l.max_depth && map.len() <= l.max_fields);
            for (k, v) in map {
                assert!(k.chars().count() <= l.max_string_len);
                check_value(v, depth + 1, l);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::replay;

    #[test]
    fn the_device_json_corpus_replays() {
        replay("device_json", device_json);
    }

    #[test]
    fn the_device_cbor_corpus_replays() {
        replay("device_cbor", device_cbor);
    }
}
