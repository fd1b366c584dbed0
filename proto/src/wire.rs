//! CBOR records between components: outbox entries, DLQ entries, uplink batches.
//!
//! CBOR rather than JSON because results carry raw bytes and floats exactly and are smaller on
//! a metered uplink; one helper pair so every store and link frames records the same way.

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::EventResult;

/// Results sent from one gateway to the cloud in one uplink message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Batch {
    /// Gateway id, so the cloud can track `edge_seq` per gateway.
    pub gateway: String,
    /// In `edge_seq` order.
    pub results: Vec<EventResult>,
}

/// A record that could not be encoded or decoded.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("truncated CBOR record ({len} bytes)")]
    Truncated { len: usize },
    #[error("invalid CBOR at byte {offset}")]
    Syntax { offset: usize },
    #[error("CBOR record does not match the expected shape{}: {message}", at_byte(.offset))]
    Shape {
        offset: Option<usize>,
        message: String,
    },
    #[error("trailing data after the CBOR record at byte {offset}")]
    TrailingData { offset: usize },
    #[error("CBOR record nested too deeply")]
    TooDeep,
    #[error("could not encode CBOR record: {0}")]
    Encode(String),
    #[error("I/O error while reading CBOR record: {0}")]
    Io(std::io::Error),
}

fn at_byte(offset: &Option<usize>) -> String {
    offset.map(|o| format!(" at byte {o}")).unwrap_or_default()
}

/// Encodes `value` as one CBOR item.
///
/// # Panics
/// Only if `T`'s `Serialize` implementation itself fails, which none of this crate's types do
/// (writing to a `Vec` cannot fail); use [`encode_into`] for foreign types.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Err(e) = encode_into(value, &mut buf) {
        panic!("encoding a proto record cannot fail: {e}");
    }
    buf
}

/// Appends `value` as one CBOR item to `buf`, so callers can reuse one buffer per batch.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Result<(), WireError> {
    ciborium::ser::into_writer(value, &mut *buf).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes exactly one CBOR item; trailing bytes are an error because a record with extra bytes
/// is a corrupt or mis-framed record, not a valid one.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    use ciborium::de::Error as E;
    let mut rest = bytes;
    let value = ciborium::de::from_reader(&mut rest).map_err(|e| match e {
        E::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            WireError::Truncated { len: bytes.len() }
        }
        E::Io(e) => WireError::Io(e),
        E::Syntax(offset) => WireError::Syntax { offset },
        E::Semantic(offset, message) => WireError::Shape { offset, message },
        E::RecursionLimitExceeded => WireError::TooDeep,
    })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingData {
            offset: bytes.len() - rest.len(),
        });
    }
    Ok(value)
}

/// Frames already-encoded results (as the outbox stores them) into a [`Batch`] without decoding
/// them: a CBOR array is a length header followed by its items, so the uplink can ship stored
/// bytes as they are. The output decodes as a `Batch` exactly like `encode(&Batch{..})`.
pub fn encode_batch_raw<'a>(
    gateway: &str,
    results: impl ExactSizeIterator<Item = &'a [u8]>,
    buf: &mut Vec<u8>,
) {
    header(buf, 5, 2); // map of two entries
    text(buf, "gateway");
    text(buf, gateway);
    text(buf, "results");
    header(buf, 4, results.len() as u64);
    for r in results {
        buf.extend_from_slice(r);
    }
}

fn text(buf: &mut Vec<u8>, s: &str) {
    header(buf, 3, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

/// A CBOR item header: major type and length/argument, in the shortest form.
fn header(buf: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => buf.push(m | n as u8),
        24..=0xff => buf.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            buf.push(m | 25);
            buf.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            buf.push(m | 26);
            buf.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            buf.push(m | 27);
            buf.extend_from_slice(&n.to_be_bytes());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dlq::{DlqEntry, Stage};
    use crate::result::{CorrectedBy, Correction, Status};
    use serde_json::json;

    fn fields(v: serde_json::Value) -> crate::Fields {
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    pub(crate) fn sample_result() -> EventResult {
        EventResult {
            event_id: EventResult::event_id("dev-1", "e-42"),
            device: "dev-1".into(),
            event_type: "reading".into(),
            seq: 42,
            ts: 1_795_600_800_000,
            gateway: "gw-1".into(),
            via: crate::Via::Gateway,
            edge_seq: 7,
            input: fields(json!({"temp": 21.5, "tags": ["a", "b"], "n": -3, "ok": true})),
            result: fields(json!({"temp_f": 70.7, "nested": {"x": null}})),
            calc_version: "sha256:abc".into(),
            status: Status::Corrected,
            flags: vec!["late".into()],
            anomaly_score: 0.25,
            processed_at: 1_795_600_800_123,
            correction: Some(Correction {
                reason: "rule r1".into(),
                previous_result: fields(json!({"temp_f": 99.0})),
                at: 1_795_600_900_000,
                by: CorrectedBy::Cloud,
            }),
        }
    }

    #[test]
    fn a_result_stored_before_via_decodes_as_a_gateway_one() {
        let mut v = serde_json::to_value(sample_result()).unwrap();
        v.as_object_mut().unwrap().remove("via");
        let back: EventResult = decode(&encode(&v)).unwrap();
        assert_eq!(back.via, crate::Via::Gateway);
        assert_eq!(
            serde_json::to_value(crate::Via::Http).unwrap(),
            json!("http")
        );
    }

    #[test]
    fn event_result_round_trip() {
        let r = sample_result();
        let bytes = encode(&r);
        assert_eq!(decode::<EventResult>(&bytes).unwrap(), r);
        let plain = EventResult {
            correction: None,
            status: Status::Ok,
            ..r
        };
        assert_eq!(decode::<EventResult>(&encode(&plain)).unwrap(), plain);
    }

    #[test]
    fn dlq_entry_round_trip_keeps_raw_bytes() {
        let e = DlqEntry {
            id: 9,
            event_id: None,
            device: Some("dev-1".into()),
            topic: "devices/dev-1/events/reading".into(),
            stage: Stage::Decode,
            reason: "invalid UTF-8 at byte 3".into(),
            subject: Some(crate::dlq::Subject::Document),
            attempts: 2,
            first_seen: 1,
            last_seen: 2,
            payload: vec![0xff, 0x00, b'{', 0x80],
        };
        let bytes = encode(&e);
        assert_eq!(decode::<DlqEntry>(&bytes).unwrap(), e);
    }

    #[test]
    fn batch_round_trip_and_buffer_reuse() {
        let b = Batch {
            gateway: "gw-1".into(),
            results: vec![sample_result(), sample_result()],
        };
        let mut buf = Vec::new();
        encode_into(&b, &mut buf).unwrap();
        assert_eq!(buf, encode(&b));
        assert_eq!(decode::<Batch>(&buf).unwrap(), b);
    }

    #[test]
    fn decode_errors() {
        let bytes = encode(&sample_result());
        let err = decode::<EventResult>(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, WireError::Truncated { .. }), "{err:?}");

        let mut extra = bytes.clone();
        extra.push(0x00);
        let err = decode::<EventResult>(&extra).unwrap_err();
        assert!(
            matches!(err, WireError::TrailingData { offset } if offset == bytes.len()),
            "{err:?}"
        );

        let err = decode::<EventResult>(&encode(&json!({"event_id": 1}))).unwrap_err();
        assert!(matches!(err, WireError::Shape { .. }), "{err:?}");
        assert!(err.to_string().contains("expected shape"), "{err}");

        let err = decode::<EventResult>(&[]).unwrap_err();
        assert!(matches!(err, WireError::Truncated { len: 0 }), "{err:?}");
    }

    #[test]
    fn raw_batch_framing_decodes_like_a_batch() {
        for n in [0usize, 1, 23, 24, 300] {
            let results: Vec<EventResult> = (0..n)
                .map(|i| {
                    let mut r = sample_result();
                    r.edge_seq = i as u64 + 1;
                    r
                })
                .collect();
            let stored: Vec<Vec<u8>> = results.iter().map(encode).collect();
            let mut buf = Vec::new();
            let gateway = "g".repeat(n % 40 + 1);
            encode_batch_raw(&gateway, stored.iter().map(Vec::as_slice), &mut buf);
            let batch: Batch = decode(&buf).unwrap();
            assert_eq!(batch, Batch { gateway, results });
        }
    }
}
