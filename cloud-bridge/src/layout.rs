//! The bucket layout, both ways: every key the bridge writes is built here and every key it
//! reads back is parsed here, so the layout has one home (INTERFACES.md shows it to users).
//!
//! ```text
//! {prefix}events/dt=YYYY-MM-DD/gateway={g}/{from:020}-{to:020}-{nonce:016x}.ndjson  a claimed range
//! {prefix}events/dt=YYYY-MM-DD/gateway={g}/dlq-{edge_seq:020}.ndjson               recalculated by the DLQ processor, never stored before
//! {prefix}events/dt=YYYY-MM-DD/gateway={ingest}/dev-{device hex}-{seq:020}-{id hex}.ndjson  one gateway-less event
//! {prefix}failures/dt=YYYY-MM-DD/gateway={g}/uplink-{hash:016x}.json               an uplink message that is not a batch
//! {prefix}failures/dt=YYYY-MM-DD/gateway={g}/dlq-{id in hex}.json                  a DLQ message given up on
//! {prefix}failures/dt=YYYY-MM-DD/gateway={g}/quarantine-{at}.json                  a gateway's damaged store, moved aside
//! {prefix}models/anomaly/{event type}.json                                          an anomaly model
//! ```
//!
//! `dt` is the UTC day of the first result's device timestamp under `events/` and of the time
//! of failure under `failures/`. Gateway ids are single MQTT topic levels, so they hold no `/`.
//! A gateway-less event's key is a function of the message alone (device, seq, id, ts), so
//! every attempt to store it writes the same object; in key order a device's events follow
//! its `seq`.

/// What an object under `events/` or `failures/` is, from its file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// The results of a claimed range of `edge_seq`s; the nonce makes every claim's key unique.
    Range { from: u64, to: u64, nonce: u64 },
    /// One record the DLQ processor recalculated that had not been stored (a fixed key, so a
    /// second attempt overwrites the first).
    Recalculated { edge_seq: u64 },
    /// One gateway-less event (`gateway=` is the ingest name), by device, seq and id.
    Device {
        device: String,
        seq: u64,
        id: String,
    },
    /// An uplink message that is not a valid batch, named by a stable hash of topic and payload.
    Uplink { hash: u64 },
    /// A DLQ message given up on, named by its id in hex (or a hash of an unreadable body).
    GivenUp { id: String },
    /// A store the gateway found damaged and moved aside at `at` (epoch ms): the results it
    /// had not sent are only in that copy, on the gateway.
    Quarantine { at: i64 },
    /// A gateway-less device's stored engine state that did not decode, moved aside at
    /// version `version` of its item (the device starts afresh; JSON with the bytes in base64).
    DeviceState { device: String, version: u64 },
    /// A file name the bridge does not write (someone else's object in the bucket).
    Other { name: String },
}

impl Object {
    /// The folder the object lives in.
    fn area(&self) -> &'static str {
        match self {
            Object::Range { .. } | Object::Recalculated { .. } | Object::Device { .. } => EVENTS,
            Object::Uplink { .. }
            | Object::GivenUp { .. }
            | Object::Quarantine { .. }
            | Object::DeviceState { .. } => FAILURES,
            Object::Other { .. } => "",
        }
    }

    fn file_name(&self) -> String {
        match self {
            Object::Range { from, to, nonce } => format!("{from:020}-{to:020}-{nonce:016x}.ndjson"),
            Object::Recalculated { edge_seq } => format!("dlq-{edge_seq:020}.ndjson"),
            Object::Device { device, seq, id } => format!(
                "dev-{}-{seq:020}-{}.ndjson",
                crate::hex_name(device),
                crate::hex_name(id)
            ),
            Object::Uplink { hash } => format!("uplink-{hash:016x}.json"),
            Object::GivenUp { id } => format!("dlq-{id}.json"),
            Object::Quarantine { at } => format!("quarantine-{at}.json"),
            Object::DeviceState { device, version } => format!(
                "device-state-{}-{version:020}.json",
                crate::hex_name(device)
            ),
            Object::Other { name } => name.clone(),
        }
    }

    fn parse(area: &str, name: &str) -> Object {
        let parsed = match area {
            EVENTS => parse_event_name(name),
            _ => parse_failure_name(name),
        };
        parsed.unwrap_or_else(|| Object::Other {
            name: name.to_string(),
        })
    }
}

fn parse_event_name(name: &str) -> Option<Object> {
    let stem = name.strip_suffix(".ndjson")?;
    if let Some(rest) = stem.strip_prefix("dev-") {
        let mut parts = rest.split('-');
        let (device, seq, id) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        return Some(Object::Device {
            device: crate::unhex_name(device)?,
            seq: seq.parse().ok()?,
            id: crate::unhex_name(id)?,
        });
    }
    if let Some(seq) = stem.strip_prefix("dlq-") {
        return Some(Object::Recalculated {
            edge_seq: seq.parse().ok()?,
        });
    }
    let mut parts = stem.split('-');
    let (from, to, nonce) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some(Object::Range {
        from: from.parse().ok()?,
        to: to.parse().ok()?,
        nonce: u64::from_str_radix(nonce, 16).ok()?,
    })
}

fn parse_failure_name(name: &str) -> Option<Object> {
    let stem = name.strip_suffix(".json")?;
    if let Some(hash) = stem.strip_prefix("uplink-") {
        return Some(Object::Uplink {
            hash: u64::from_str_radix(hash, 16).ok()?,
        });
    }
    if let Some(at) = stem.strip_prefix("quarantine-") {
        return Some(Object::Quarantine {
            at: at.parse().ok()?,
        });
    }
    if let Some(rest) = stem.strip_prefix("device-state-") {
        let (device, version) = rest.split_once('-')?;
        return Some(Object::DeviceState {
            device: crate::unhex_name(device)?,
            version: version.parse().ok()?,
        });
    }
    Some(Object::GivenUp {
        id: stem.strip_prefix("dlq-")?.to_string(),
    })
}

const EVENTS: &str = "events/";
const FAILURES: &str = "failures/";

/// One object under `events/` or `failures/`, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    /// `YYYY-MM-DD`, the `dt=` partition.
    pub date: String,
    pub gateway: String,
    pub object: Object,
}

impl ObjectKey {
    /// The key of the results of `from..=to` of `gateway`, first stored at device time `ts`.
    pub fn range(gateway: &str, ts: i64, from: u64, to: u64, nonce: u64) -> ObjectKey {
        ObjectKey {
            date: date_of(ts),
            gateway: gateway.to_string(),
            object: Object::Range { from, to, nonce },
        }
    }

    pub fn to_key(&self, prefix: &str) -> String {
        format!(
            "{prefix}{}dt={}/gateway={}/{}",
            self.object.area(),
            self.date,
            self.gateway,
            self.object.file_name()
        )
    }

    /// The key's parts, if it is under `{prefix}events/` or `{prefix}failures/` in the layout.
    pub fn parse(prefix: &str, key: &str) -> Option<ObjectKey> {
        let rest = key.strip_prefix(prefix)?;
        let area = [EVENTS, FAILURES]
            .into_iter()
            .find(|a| rest.starts_with(a))?;
        let rest = rest[area.len()..].strip_prefix("dt=")?;
        let (date, rest) = rest.split_once('/')?;
        let (gateway, name) = rest.strip_prefix("gateway=")?.split_once('/')?;
        if name.contains('/') {
            return None;
        }
        Some(ObjectKey {
            date: date.to_string(),
            gateway: gateway.to_string(),
            object: Object::parse(area, name),
        })
    }

    /// The key of one gateway-less event (see the module doc).
    pub fn device_event(ingest: &str, r: &proto::EventResult) -> ObjectKey {
        let id = r
            .event_id
            .strip_prefix(r.device.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(&r.event_id);
        ObjectKey {
            date: date_of(r.ts),
            gateway: ingest.to_string(),
            object: Object::Device {
                device: r.device.clone(),
                seq: r.seq,
                id: id.to_string(),
            },
        }
    }

    /// The start of the keys [`ObjectKey::device_event`] gives `device`'s event `seq` of
    /// time `ts` (whatever its id): to find a stored event from a reading.
    pub fn device_event_prefix(
        prefix: &str,
        ingest: &str,
        device: &str,
        seq: u64,
        ts: i64,
    ) -> String {
        format!(
            "{prefix}{EVENTS}dt={}/gateway={ingest}/dev-{}-{seq:020}-",
            date_of(ts),
            crate::hex_name(device)
        )
    }

    /// The first `edge_seq` the object holds, where its name tells.
    pub fn first_seq(&self) -> Option<u64> {
        match self.object {
            Object::Range { from, .. } => Some(from),
            Object::Recalculated { edge_seq } => Some(edge_seq),
            _ => None,
        }
    }
}

/// `{prefix}events/`.
pub fn events(prefix: &str) -> String {
    format!("{prefix}{EVENTS}")
}

/// `{prefix}events/dt={day}/`: one day's partition.
pub fn events_of_day(prefix: &str, day: &str) -> String {
    format!("{prefix}{EVENTS}dt={day}/")
}

/// `{prefix}failures/`.
pub fn failures(prefix: &str) -> String {
    format!("{prefix}{FAILURES}")
}

/// `{prefix}models/anomaly/`.
pub fn models(prefix: &str) -> String {
    format!("{prefix}models/anomaly/")
}

/// `{prefix}models/anomaly/{event_type}.json`.
pub fn model(prefix: &str, event_type: &str) -> String {
    format!("{}{event_type}.json", models(prefix))
}

/// `YYYY-MM-DD` (UTC) of an epoch-ms timestamp; 1970-01-01 if out of range.
pub fn date_of(ts_ms: i64) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .map(|t| t.date())
        .unwrap_or(time::macros::date!(1970 - 01 - 01));
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Whether `s` is a `YYYY-MM-DD` day (the shape of `dt=`; such days sort as strings).
pub fn is_day(s: &str) -> bool {
    time::Date::parse(s, DAY).is_ok()
}

const DAY: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

#[cfg(test)]
mod tests {
    use super::*;

    fn key(object: Object) -> ObjectKey {
        ObjectKey {
            date: "2026-11-25".into(),
            gateway: "gw-1".into(),
            object,
        }
    }

    #[test]
    fn every_object_round_trips() {
        for o in [
            Object::Range {
                from: 1,
                to: 40,
                nonce: 0xdead_beef,
            },
            Object::Recalculated { edge_seq: 7 },
            Object::Device {
                device: "phone-1".into(),
                seq: 42,
                id: "a-b/c".into(),
            },
            Object::Uplink { hash: u64::MAX },
            Object::GivenUp {
                id: "6d3a31".into(),
            },
            Object::Quarantine {
                at: 1_764_064_800_000,
            },
        ] {
            let k = key(o);
            let s = k.to_key("prod/");
            assert_eq!(ObjectKey::parse("prod/", &s), Some(k), "{s}");
        }
    }

    #[test]
    fn keys_read_as_the_bridge_writes_them() {
        let k = ObjectKey::range("gw-1", 1_764_064_800_000, 1, 40, 0xab);
        assert_eq!(
            k.to_key(""),
            "events/dt=2025-11-25/gateway=gw-1/00000000000000000001-00000000000000000040-00000000000000ab.ndjson"
        );
        assert_eq!(k.first_seq(), Some(1));
        let dlq = ObjectKey::parse(
            "",
            "events/dt=2025-11-25/gateway=g/dlq-00000000000000000009.ndjson",
        );
        assert_eq!(dlq.and_then(|k| k.first_seq()), Some(9));
    }

    #[test]
    fn foreign_keys_are_not_taken_for_ours() {
        assert_eq!(
            ObjectKey::parse("p/", "events/dt=2026-01-01/gateway=g/x.ndjson"),
            None
        );
        assert_eq!(ObjectKey::parse("", "models/anomaly/meter.json"), None);
        assert_eq!(ObjectKey::parse("", "events/dt=2026-01-01/x.ndjson"), None);
        let other = ObjectKey::parse("", "events/dt=2026-01-01/gateway=g/notes.txt").unwrap();
        assert_eq!(
            other.object,
            Object::Other {
                name: "notes.txt".into()
            }
        );
        assert_eq!(other.date, "2026-01-01");
    }

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(date_of(1_764_064_800_000), "2025-11-25");
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(i64::MAX), "1970-01-01");
        assert!(is_day("2026-02-28"));
        assert!(!is_day("2026-2-28"));
        assert!(!is_day("2026-02-30"));
    }
}
