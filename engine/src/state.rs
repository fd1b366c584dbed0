//! The engine's memory between events: per device, its sequence tracker and, per event type,
//! its previous accepted reading (for `prev.x`, `delta`, `rate`, `dt`) and the anomaly
//! detectors of its watched fields (a fixed-size struct each).
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

/// The previous accepted reading of one device and event type: its time, seq and scalar data
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
pub struct DeviceState {
    pub(crate) seq: SeqTracker,
    /// Event type → previous accepted reading.
    #[serde(default)]
    pub(crate) previous: BTreeMap<String, Reading>,
    /// Event type → watched field → anomaly detector. Absent in states written before the
    /// detectors existed (hence the default); bounded by the configured fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) anomaly: BTreeMap<String, TypeDetectors>,
    /// Event type → up to [`EARLIER_READINGS`] accepted readings older than `previous`,
    /// oldest first: a late event is calculated against the one just before it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) earlier: BTreeMap<String, Vec<Reading>>,
    #[serde(skip)]
    dirty: bool,
}

/// How many readings before the latest one a device keeps per event type. A late event older
/// than all of them is calculated as if there were no previous reading (flag `out_of_order`).
/// Small on purpose: the state is rewritten with every event.
pub const EARLIER_READINGS: usize = 4;

impl DeviceState {
    pub fn seq(&self) -> &SeqTracker {
        &self.seq
    }

    /// The previous accepted reading of `event_type`.
    pub fn previous(&self, event_type: &str) -> Option<&Reading> {
        self.previous.get(event_type)
    }

    /// The readings of `event_type` older than [`Self::previous`], oldest first.
    pub fn earlier(&self, event_type: &str) -> &[Reading] {
        self.earlier.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// Before the latest reading is overwritten: keeps a copy in the window (reusing the
    /// allocation of the oldest one when the window is full).
    pub(crate) fn keep_previous(&mut self, event_type: &str) {
        let Some(prev) = self.previous.get(event_type) else {
            return;
        };
        let ring = match self.earlier.get_mut(event_type) {
            Some(r) => r,
            None => self.earlier.entry(event_type.to_string()).or_default(),
        };
        let mut slot = if ring.len() >= EARLIER_READINGS {
            ring.remove(0)
        } else {
            Reading::default()
        };
        slot.clone_from(prev);
        ring.push(slot);
    }

    /// A late reading joins the window in `ts` order (the oldest falls out when it is full),
    /// so a later late event finds it as its predecessor.
    pub(crate) fn insert_earlier(&mut self, event_type: &str, reading: Reading) {
        let ring = self.earlier.entry(event_type.to_string()).or_default();
        let at = ring.partition_point(|r| r.ts < reading.ts);
        ring.insert(at, reading);
        if ring.len() > EARLIER_READINGS {
            ring.remove(0);
        }
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
        // Present: inserted just above (see `previous_mut`).
        #[allow(clippy::expect_used)]
        self.anomaly.get_mut(event_type).expect("inserted above")
    }

    pub(crate) fn previous_mut(&mut self, event_type: &str) -> &mut Reading {
        if !self.previous.contains_key(event_type) {
            self.previous
                .insert(event_type.to_string(), Reading::default());
        }
        // Present: inserted just above. (A `match get_mut` with an insert in the `None` arm
        // would need Polonius; `entry()` would allocate the key on every call.)
        #[allow(clippy::expect_used)]
        self.previous.get_mut(event_type).expect("inserted above")
    }
}

/// All devices' state. Owned by the caller, mutated by [`Engine::process`](crate::Engine::process).
#[derive(Debug, Default)]
pub struct State {
    devices: BTreeMap<String, DeviceState>,
    /// Devices changed since the last `take_dirty`, each once.
    dirty: Vec<String>,
}

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
        // Present: inserted just above (see `DeviceState::previous_mut`).
        #[allow(clippy::expect_used)]
        let state = self.devices.get_mut(device).expect("inserted above");
        Entry {
            state,
            dirty: &mut self.dirty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        e.state.previous_mut("meter").overwrite(
            7,
            5,
            [
                ("kwh", ScalarRef::Number(12.5)),
                ("whole", ScalarRef::Number(3.0)),
                ("state", ScalarRef::Text("on")),
                ("ok", ScalarRef::Bool(true)),
            ]
            .into_iter(),
        );
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
