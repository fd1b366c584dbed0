//! The shapes device messages arrive in, taken apart into (device, type, message bytes) before
//! the engine sees them: a batch request's body (JSON or CBOR), an AWS IoT Core rule's event,
//! an EventBridge event's detail. Pure: no I/O.

use base64::Engine as _;
use serde_json::Value;

/// One device message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub device: String,
    pub event_type: String,
    /// The message as the engine decodes it (JSON or CBOR bytes).
    pub payload: Vec<u8>,
}

/// One element of a batch: the message, or why it is not one (with its bytes, for the DLQ).
pub type Element = Result<Item, Unreadable>;

/// A batch element (or event) that does not name its device and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub reason: String,
    pub payload: Vec<u8>,
}

/// Whether a body is CBOR: by its content type, else by its first byte (a JSON document
/// starts with `{`, `[` or whitespace; a CBOR map or array with a major type byte).
pub fn is_cbor(content_type: Option<&str>, body: &[u8]) -> bool {
    match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
        Some("application/cbor") => true,
        Some("application/json") => false,
        _ => body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b != b'{' && b != b'['),
    }
}

/// `POST /v1/events:batch`: `{"events": [{"device", "type", "id", "seq", "ts", "data"}, …]}`
/// (JSON or CBOR). Each element keeps its own encoding for the engine. `Err` when the body is
/// not a batch at all.
pub fn batch(body: &[u8], cbor: bool, max: usize) -> Result<Vec<Element>, String> {
    if cbor {
        let doc: ciborium::Value =
            ciborium::from_reader(body).map_err(|e| format!("not a CBOR document: {e}"))?;
        let events = match doc {
            ciborium::Value::Map(entries) => entries
                .into_iter()
                .find(|(k, _)| k.as_text() == Some("events"))
                .map(|(_, v)| v),
            _ => None,
        };
        let Some(ciborium::Value::Array(events)) = events else {
            return Err("events: required, an array of device messages".into());
        };
        check_len(events.len(), max)?;
        return Ok(events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let mut payload = Vec::new();
                // Writing a value into a Vec cannot fail.
                let _ = ciborium::into_writer(&e, &mut payload);
                let text = |k: &str| match &e {
                    ciborium::Value::Map(m) => m
                        .iter()
                        .find(|(key, _)| key.as_text() == Some(k))
                        .and_then(|(_, v)| v.as_text().map(String::from)),
                    _ => None,
                };
                named(i, text("device"), text("type"), payload)
            })
            .collect());
    }
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON document: {e}"))?;
    let Some(Value::Array(events)) = doc.get("events") else {
        return Err("events: required, an array of device messages".into());
    };
    check_len(events.len(), max)?;
    Ok(events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let text = |k: &str| e.get(k).and_then(Value::as_str).map(String::from);
            named(i, text("device"), text("type"), e.to_string().into_bytes())
        })
        .collect())
}

fn check_len(n: usize, max: usize) -> Result<(), String> {
    if n > max {
        return Err(format!("events: {n} events; at most {max} in one batch"));
    }
    Ok(())
}

fn named(
    i: usize,
    device: Option<String>,
    event_type: Option<String>,
    payload: Vec<u8>,
) -> Element {
    match (device, event_type) {
        (Some(device), Some(event_type)) => Ok(Item {
            device,
            event_type,
            payload,
        }),
        (None, _) => Err(Unreadable {
            reason: format!("events[{i}].device: required (a string)"),
            payload,
        }),
        (_, None) => Err(Unreadable {
            reason: format!("events[{i}].type: required (a string)"),
            payload,
        }),
    }
}

/// An AWS IoT Core rule's event, from a device publishing to the engine's topic:
/// `SELECT *, topic() AS topic FROM 'devices/+/events/+'` (a JSON device) or
/// `SELECT encode(*, 'base64') AS payload, topic() AS topic FROM …` (a CBOR device).
/// `topic` names the device and type, as on a gateway's broker.
pub fn iot_rule(mut event: serde_json::Map<String, Value>) -> Result<(String, Vec<u8>), String> {
    let Some(Value::String(topic)) = event.remove("topic") else {
        return Err("topic: required (the rule's `topic() AS topic`)".into());
    };
    let payload = match event.remove("payload") {
        Some(Value::String(b64)) if event.is_empty() => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("payload: not base64: {e}"))?,
        Some(other) => {
            event.insert("payload".into(), other);
            Value::Object(event).to_string().into_bytes()
        }
        None => Value::Object(event).to_string().into_bytes(),
    };
    Ok((topic, payload))
}

/// An EventBridge event whose detail is a device message naming its device and type
/// (`detail-type: "DeviceEvent"`).
pub fn eventbridge_detail(detail: &Value) -> Element {
    let text = |k: &str| detail.get(k).and_then(Value::as_str).map(String::from);
    let payload = detail.to_string().into_bytes();
    if !detail.is_object() {
        return Err(Unreadable {
            reason: "detail: expected a device message (a JSON object)".into(),
            payload,
        });
    }
    named(0, text("device"), text("type"), payload).map_err(|mut u| {
        u.reason = u.reason.replace("events[0]", "detail");
        u
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_batches_keep_each_message_and_name_what_is_missing() {
        let body = json!({"events": [
            {"device": "p-1", "type": "meter", "id": "a", "seq": 1, "ts": 1, "data": {}},
            {"type": "meter", "id": "b"},
            {"device": "p-1", "id": "c"},
        ]})
        .to_string();
        let out = batch(body.as_bytes(), false, 10).unwrap();
        let first = out[0].as_ref().unwrap();
        assert_eq!(
            (first.device.as_str(), first.event_type.as_str()),
            ("p-1", "meter")
        );
        let msg: Value = serde_json::from_slice(&first.payload).unwrap();
        assert_eq!(msg["id"], "a");
        assert_eq!(
            out[1].as_ref().unwrap_err().reason,
            "events[1].device: required (a string)"
        );
        assert_eq!(
            out[2].as_ref().unwrap_err().reason,
            "events[2].type: required (a string)"
        );
        assert!(
            batch(body.as_bytes(), false, 2)
                .unwrap_err()
                .contains("at most 2")
        );
        assert!(
            batch(b"{\"x\": 1}", false, 2)
                .unwrap_err()
                .starts_with("events:")
        );
        assert!(
            batch(b"nope", false, 2)
                .unwrap_err()
                .starts_with("not a JSON")
        );
    }

    #[test]
    fn cbor_batches_stay_cbor() {
        let doc = json!({"events": [{"device": "p-1", "type": "meter", "id": "a", "seq": 1}]});
        let mut body = Vec::new();
        ciborium::into_writer(&doc, &mut body).unwrap();
        assert!(is_cbor(None, &body));
        assert!(!is_cbor(None, b" {\"events\": []}"));
        assert!(is_cbor(Some("application/cbor"), b"{"));
        let out = batch(&body, true, 10).unwrap();
        let item = out[0].as_ref().unwrap();
        let back: Value = ciborium::from_reader(item.payload.as_slice()).unwrap();
        assert_eq!(back["seq"], 1);
    }

    #[test]
    fn iot_rule_events_json_and_base64() {
        let ev = json!({"topic": "devices/d/events/meter", "id": "a", "seq": 1});
        let (topic, payload) = iot_rule(ev.as_object().unwrap().clone()).unwrap();
        assert_eq!(topic, "devices/d/events/meter");
        let msg: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(msg, json!({"id": "a", "seq": 1}));
        let b64 = base64::engine::general_purpose::STANDARD.encode([0xa1, 0x61, 0x78, 0x01]);
        let ev = json!({"topic": "devices/d/events/meter", "payload": b64});
        let (_, payload) = iot_rule(ev.as_object().unwrap().clone()).unwrap();
        assert_eq!(payload, [0xa1, 0x61, 0x78, 0x01]);
        assert!(
            iot_rule(serde_json::Map::new())
                .unwrap_err()
                .starts_with("topic")
        );
    }

    #[test]
    fn eventbridge_details_name_their_device() {
        let ok = eventbridge_detail(&json!({"device": "d", "type": "meter", "id": "a"}));
        assert_eq!(ok.unwrap().device, "d");
        let bad = eventbridge_detail(&json!({"type": "meter"})).unwrap_err();
        assert_eq!(bad.reason, "detail.device: required (a string)");
    }
}
