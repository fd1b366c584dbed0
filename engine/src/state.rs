//! The engine's memory between events: per device, its sequence tracker and, per event type,
//! its latest accepted readings (a [`Window`]: the previous one for `prev.x`, `delta`, `rate`,
//! `dt`, the earlier ones for late events) and the anomaly detectors of its watched fields (a
//! fixed-size struct each).
//!
//! The engine mutates a [`State`] the caller owns; the caller persists the devices each batch
//! touched ([`State::take_dirty`]; `DeviceState` is serde, e.g. CBOR) and loads them back at
//! start-up ([`State::insert`]). Nothing here is shared between devices, so the state of one
//! device is all that one event can change.

use std::collections::BTreeMap;

use proto::{EventResult, Fields};
use serde::{Deserialize, Serialize};

use crate::anomaly::TypeDetectors;
use crate::seq::{SeqRange, SeqTracker};
use crate::value::Scalar;
use crate::window::{Timed, Window};

/// An accepted reading of one device and event type: its time, seq and scalar data
/// and derived fields (intermediate calc fields included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub ts: i64,
    pub seq: u64,
    /// Field name → value, data fields first (schema order), then derived fields (calc
    /// order). Kept as a vector so that a new reading overwrites the old one in place.
    pub values: Vec<(String, Scalar)>,
}

/// A borrowed scalar, to update a [`Reading`] without allocating.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ScalarRef<'a> {
    Number(f64),
    Text(&'a str),
    Bool(bool),
}

impl Reading {
    /// The value of `name`, if the reading has it.
    pub fn get(&self, name: &str) -> Option<&Scalar> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The reading a result represents: its `ts`, `seq` and the scalar fields of its input
    /// and result (a calc field with `output = false` is not in a result, so not here either).
    /// The bridge uses this to recompute an event against the previous result.
    pub fn from_result(result: &EventResult) -> Reading {
        let scalars = |f: &Fields| {
            f.iter()
                .filter_map(|(k, v)| Scalar::from_json(v).map(|s| (k.clone(), s)))
                .collect::<Vec<_>>()
        };
        let mut values = scalars(&result.input);
        values.extend(scalars(&result.result));
        Reading {
            ts: result.ts,
            seq: result.seq,
            values,
        }
    }

    /// Replaces the reading. When the field names come in the same order as last time (the
    /// usual case), values are overwritten in place and nothing is allocated beyond string
    /// growth.
    pub(crate) fn overwrite<'a>(
        &mut self,
        ts: i64,
        seq: u64,
        items: impl Iterator<Item = (&'a str, ScalarRef<'a>)>,
    ) {
        self.ts = ts;
        self.seq = seq;
        let mut i = 0;
        for (name, value) in items {
            match self.values.get_mut(i) {
                Some((n, slot)) if n == name => match (slot, value) {
                    (Scalar::Text(s), ScalarRef::Text(t)) => {
                        s.clear();
                        s.push_str(t);
                    }
                    (slot, value) => *slot = value.to_owned(),
                },
                _ => {
                    self.values.truncate(i);
                    self.values.push((name.to_string(), value.to_owned()));
                }
            }
            i += 1;
        }
        self.values.truncate(i);
    }
}

impl ScalarRef<'_> {
    fn to_owned(self) -> Scalar {
        match self {
            ScalarRef::Number(x) => Scalar::Number(x),
            ScalarRef::Text(t) => Scalar::Text(t.to_string()),
            ScalarRef::Bool(b) => Scalar::Bool(b),
        }
    }
}

/// Everything the engine remembers about one device.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct DeviceState {
    pub(crate) seq: SeqTracker,
    /// Event type → the latest accepted readings, the previous one last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) readings: BTreeMap<String, Window<Reading>>,
    /// Event type → watched field → anomaly detector. Absent in states written before the
    /// detectors existed (hence the default); bounded by the configured fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) anomaly: BTreeMap<String, TypeDetectors>,
    #[serde(skip)]
    dirty: bool,
}

/// A device state as a gateway may have stored it: today's shape, or the one before the
/// reading window, which kept the previous reading and the earlier ones apart. Read both
/// until no gateway has a state that old (each is rewritten with its device's next event).
#[derive(Deserialize)]
struct Stored {
    seq: SeqTracker,
    #[serde(default)]
    readings: BTreeMap<String, Window<Reading>>,
    #[serde(default)]
    anomaly: BTreeMap<String, TypeDetectors>,
    #[serde(default)]
    previous: BTreeMap<String, Reading>,
    #[serde(default)]
    earlier: BTreeMap<String, Vec<Reading>>,
}

impl From<Stored> for DeviceState {
    fn from(s: Stored) -> DeviceState {
        let mut readings = s.readings;
        let mut earlier = s.earlier;
        for (event_type, latest) in s.previous {
            let w = readings.entry(event_type.clone()).or_default();
            // Stored oldest first, the previous one after them.
            for r in earlier.remove(&event_type).unwrap_or_default() {
                w.advance(r);
            }
            w.advance(latest);
        }
        DeviceState {
            seq: s.seq,
            readings,
            anomaly: s.anomaly,
            dirty: false,
        }
    }
}

impl Timed for Reading {
    fn ts(&self) -> i64 {
        self.ts
    }
}

impl DeviceState {
    pub fn seq(&self) -> &SeqTracker {
        &self.seq
    }

    /// The latest accepted readings of `event_type`.
    pub fn readings(&self, event_type: &str) -> Option<&Window<Reading>> {
        self.readings.get(event_type)
    }

    /// The previous accepted reading of `event_type`: the latest in its window.
    pub fn previous(&self, event_type: &str) -> Option<&Reading> {
        self.readings.get(event_type)?.latest()
    }

    /// The anomaly detectors of `event_type`, by field.
    pub fn detectors(&self, event_type: &str) -> Option<&TypeDetectors> {
        self.anomaly.get(event_type)
    }

    pub(crate) fn detectors_mut(&mut self, event_type: &str) -> &mut TypeDetectors {
        if !self.anomaly.contains_key(event_type) {
            self.anomaly
                .insert(event_type.to_string(), TypeDetectors::new());
        }
        // Present: inserted just above (see `readings_mut`).
        #[allow(clippy::expect_used)]
        self.anomaly.get_mut(event_type).expect("inserted above")
    }

    pub(crate) fn readings_mut(&mut self, event_type: &str) -> &mut Window<Reading> {
        if !self.readings.contains_key(event_type) {
            self.readings
                .insert(event_type.to_string(), Window::default());
        }
        // Present: inserted just above. (A `match get_mut` with an insert in the `None` arm
        // would need Polonius; `entry()` would allocate the key on every call.)
        #[allow(clippy::expect_used)]
        self.readings.get_mut(event_type).expect("inserted above")
    }
}

/// All devices' state. Owned by the caller, mutated by [`Engine::process`](crate::Engine::process).
#[derive(Debug, Default)]
pub struct State {
    devices: BTreeMap<String, DeviceState>,
    /// Devices changed since the last `take_dirty`, each once.
    dirty: Vec<String>,
    /// Most devices the engine may add (see [`State::set_max_devices`]); `None`: no cap.
    max_devices: Option<usize>,
}

/// Longest device id (the topic's `{device}` level) the engine keeps state under, in bytes;
/// a longer one is rejected at the decode stage before anything is allocated for it. As long
/// as the longest message `id` ([`proto::decode::MAX_ID_CHARS`]): both are keys, and an event id joins
/// them.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// The rule name ([`proto::Subject::Rule`]) of a message refused because its device would be
/// one more than [`State::set_max_devices`] allows.
pub const MAX_DEVICES_RULE: &str = "max_devices";

/// A device's state plus the means to mark it changed.
pub(crate) struct Entry<'s> {
    pub state: &'s mut DeviceState,
    dirty: &'s mut Vec<String>,
}

impl Entry<'_> {
    pub fn mark_dirty(&mut self, device: &str) {
        if !self.state.dirty {
            self.state.dirty = true;
            self.dirty.push(device.to_string());
        }
    }
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// Loads one device's persisted state (at start-up). It is not marked dirty.
    pub fn insert(&mut self, device: String, mut state: DeviceState) {
        state.dirty = false;
        self.devices.insert(device, state);
    }

    /// Takes one device's state out (the cloud keeps each device's state in an item of its
    /// own and loads only the one a message needs).
    pub fn remove(&mut self, device: &str) -> Option<DeviceState> {
        self.dirty.retain(|d| d != device);
        let mut s = self.devices.remove(device)?;
        s.dirty = false;
        Some(s)
    }

    pub fn device(&self, device: &str) -> Option<&DeviceState> {
        self.devices.get(device)
    }

    /// All devices, ordered by id.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &DeviceState)> {
        self.devices.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Caps how many devices the engine tracks: a message from a device not yet in the state
    /// is refused (stage `rule`, rule [`MAX_DEVICES_RULE`]) once `max` are, before anything
    /// is allocated for it. Known devices are never evicted: their state is what keeps their
    /// next results right (duplicates, gaps, the previous reading). Devices loaded with
    /// [`State::insert`] count but are never refused, so lowering the cap loses nothing.
    pub fn set_max_devices(&mut self, max: Option<usize>) {
        self.max_devices = max;
    }

    pub fn max_devices(&self) -> Option<usize> {
        self.max_devices
    }

    /// Whether a message from `device` may have (or create) state.
    pub fn admits(&self, device: &str) -> bool {
        self.max_devices
            .is_none_or(|max| self.devices.len() < max || self.devices.contains_key(device))
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The devices changed since the last call, with a copy of their state, in the order
    /// they were first changed; clears the dirty marks.
    pub fn take_dirty(&mut self) -> Vec<(String, DeviceState)> {
        let names = std::mem::take(&mut self.dirty);
        names
            .into_iter()
            .filter_map(|name| {
                let s = self.devices.get_mut(&name)?;
                s.dirty = false;
                let copy = s.clone();
                Some((name, copy))
            })
            .collect()
    }

    /// Like [`take_dirty`](Self::take_dirty) without the copies: the caller borrows each
    /// state with [`device`](Self::device).
    pub fn take_dirty_names(&mut self) -> Vec<String> {
        let names = std::mem::take(&mut self.dirty);
        for name in &names {
            if let Some(s) = self.devices.get_mut(name) {
                s.dirty = false;
            }
        }
        names
    }

    /// Every open missing range, by device.
    pub fn open_gaps(&self) -> impl Iterator<Item = (&str, SeqRange)> {
        self.devices
            .iter()
            .flat_map(|(d, s)| s.seq.missing().iter().map(move |r| (d.as_str(), *r)))
    }

    /// Missing seqs over all devices (open ranges only).
    pub fn missing_total(&self) -> u64 {
        self.devices
            .values()
            .fold(0u64, |n, s| n.saturating_add(s.seq.missing_count()))
    }

    /// The device's state, created if new.
    pub(crate) fn entry(&mut self, device: &str) -> Entry<'_> {
        if !self.devices.contains_key(device) {
            self.devices
                .insert(device.to_string(), DeviceState::default());
        }
        // Present: inserted just above (see `DeviceState::readings_mut`).
        #[allow(clippy::expect_used)]
        let state = self.devices.get_mut(device).expect("inserted above");
        Entry {
            state,
            dirty: &mut self.dirty,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The top-level keys of a stored (CBOR) device state, in order.
    pub(crate) fn stored_keys(bytes: &[u8]) -> Vec<String> {
        let v: ciborium::Value = ciborium::from_reader(bytes).unwrap();
        v.as_map()
            .unwrap()
            .iter()
            .filter_map(|(k, _)| k.as_text().map(str::to_string))
            .collect()
    }

    #[test]
    fn overwrite_in_place_and_on_layout_change() {
        let mut r = Reading::default();
        r.overwrite(
            1,
            1,
            [("a", ScalarRef::Number(1.0)), ("s", ScalarRef::Text("x"))].into_iter(),
        );
        assert_eq!(r.get("a"), Some(&Scalar::Number(1.0)));
        r.overwrite(
            2,
            2,
            [("a", ScalarRef::Number(2.0)), ("s", ScalarRef::Text("yy"))].into_iter(),
        );
        assert_eq!(r.ts, 2);
        assert_eq!(r.get("s"), Some(&Scalar::Text("yy".into())));
        // An optional field absent this time: dropped.
        r.overwrite(3, 3, [("s", ScalarRef::Bool(true))].into_iter());
        assert_eq!(r.values, vec![("s".to_string(), Scalar::Bool(true))]);
        assert_eq!(r.get("a"), None);
    }

    #[test]
    fn device_state_round_trips_through_cbor() {
        let mut s = State::new();
        let e = s.entry("d");
        e.state.seq.observe(1, "a", false);
        e.state.seq.observe(5, "b", false);
        e.state.readings_mut("meter").advance_with(|r| {
            r.overwrite(
                7,
                5,
                [
                    ("kwh", ScalarRef::Number(12.5)),
                    ("whole", ScalarRef::Number(3.0)),
                    ("state", ScalarRef::Text("on")),
                    ("ok", ScalarRef::Bool(true)),
                ]
                .into_iter(),
            )
        });
        let ds = s.device("d").unwrap().clone();
        let mut bytes = Vec::new();
        ciborium::into_writer(&ds, &mut bytes).unwrap();
        let back: DeviceState = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back.previous("meter"), ds.previous("meter"));
        assert_eq!(
            back.previous("meter").unwrap().get("whole"),
            Some(&Scalar::Number(3.0))
        );
        assert_eq!(back.seq().highest(), Some(5));
        assert_eq!(back.seq().missing(), &[SeqRange::new(2, 4)]);
    }

    /// A state stored before the window (previous reading and earlier ones apart) loads as
    /// the same readings in the same order, so a gateway upgraded mid-stream calculates its
    /// next late event as before.
    #[test]
    fn a_state_stored_before_the_window_loads_into_it() {
        #[derive(Serialize)]
        struct Old {
            seq: SeqTracker,
            previous: BTreeMap<String, Reading>,
            earlier: BTreeMap<String, Vec<Reading>>,
        }
        let reading = |ts: i64| Reading {
            ts,
            seq: ts as u64,
            values: vec![("kwh".into(), Scalar::Number(ts as f64))],
        };
        let mut seq = SeqTracker::default();
        seq.observe(3, "c", false);
        let old = Old {
            seq,
            previous: [("meter".to_string(), reading(3))].into(),
            earlier: [("meter".to_string(), vec![reading(1), reading(2)])].into(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&old, &mut bytes).unwrap();
        let back: DeviceState = ciborium::from_reader(bytes.as_slice()).unwrap();
        let w = back.readings("meter").unwrap();
        assert_eq!(w.iter().map(|r| r.ts).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(back.previous("meter"), Some(&reading(3)));
        assert_eq!(back.seq().highest(), Some(3));
        // Written again, it has the new shape only.
        let mut again = Vec::new();
        ciborium::into_writer(&back, &mut again).unwrap();
        assert_eq!(stored_keys(&again), ["seq", "readings"]);
    }

    #[test]
    fn dirty_tracking() {
        let mut s = State::new();
        s.insert("loaded".into(), DeviceState::default());
        assert!(s.take_dirty().is_empty());
        s.entry("a").mark_dirty("a");
        s.entry("b").mark_dirty("b");
        s.entry("a").mark_dirty("a");
        let d = s.take_dirty();
        assert_eq!(
            d.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(s.take_dirty().is_empty());
        s.entry("b").mark_dirty("b");
        assert_eq!(s.take_dirty_names(), ["b"]);
        assert_eq!(s.len(), 3);
    }
}
