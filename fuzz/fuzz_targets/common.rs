//! Shared property checks of the device-decoder targets.
#![allow(dead_code)]
use proto::{DeviceMessage, Limits};
use serde_json::{Value, json};

/// The message as a device would send it again (ts as epoch ms).
pub fn envelope(m: &DeviceMessage) -> Value {
    json!({
        "id": m.id, "seq": m.seq, "ts": m.ts, "device": m.device, "type": m.event_type,
        "data": m.data,
    })
}

/// What an accepted message must satisfy whatever the bytes were.
pub fn check_message(m: &DeviceMessage, l: &Limits) {
    assert!(!m.id.is_empty() && m.id.chars().count() <= proto::decode::MAX_ID_CHARS);
    assert!(
        (0..=proto::timestamp::MAX_EPOCH_MS).contains(&m.ts),
        "ts {}",
        m.ts
    );
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
