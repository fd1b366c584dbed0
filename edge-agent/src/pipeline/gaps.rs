//! The missed-gap timer: the devices' open sequence gaps as the agent tracks them, and when the
//! oldest falls due to be declared missed.
//!
//! The engine's tracker knows which seqs are missing; only the agent knows since when (a gap's
//! age is wall-clock, kept in the store) and which missed record a gap was declared as. Each
//! change goes into the commit of the message that caused it, so the store's gaps never run
//! ahead of or behind the device states written with them.

use std::collections::{BTreeMap, BTreeSet};

use engine::{SeqTracker, State};

use crate::missed::{DeviceGaps, MissedRecord};
use crate::store::{Commit, Store, StoreError, StoreReader};

pub(super) struct GapTimer {
    /// Devices' open gaps (only devices that have some), as last committed plus this batch's
    /// changes; `dirty` are the devices to write with the next commit.
    gaps: BTreeMap<String, DeviceGaps>,
    dirty: BTreeSet<String>,
    /// `missed_after_s` in ms.
    after_ms: i64,
    /// The next missed record's id.
    next_id: u64,
    /// When the earliest open gap falls due (epoch ms).
    due: Option<i64>,
}

impl GapTimer {
    /// The gaps as the store last committed them.
    pub(super) fn load(store: &Store, after_ms: i64) -> Result<GapTimer, StoreError> {
        let mut gaps = BTreeMap::new();
        for g in store.reader().gaps() {
            let (device, g) = g?;
            gaps.insert(device, g);
        }
        Ok(GapTimer {
            gaps,
            dirty: BTreeSet::new(),
            after_ms,
            next_id: store.counters().first_free_missed_id(),
            due: None,
        })
    }

    /// Gaps the engine knows but the agent does not (a store written before missed records
    /// existed): tracked from `now`, written with the next commit.
    pub(super) fn adopt(
        &mut self,
        state: &State,
        now: i64,
        reader: &StoreReader,
    ) -> Result<(), StoreError> {
        let untracked: Vec<(&str, &SeqTracker)> = state
            .devices()
            .map(|(d, s)| (d, s.seq()))
            .filter(|(d, seq)| !seq.missing().is_empty() && !self.gaps.contains_key(*d))
            .collect();
        let mut ignored = Commit::default();
        for (device, seq) in untracked {
            self.track(device, seq, now, &mut ignored, reader)?;
        }
        self.reschedule();
        Ok(())
    }

    /// When the earliest open gap falls due (epoch ms).
    pub(super) fn due(&self) -> Option<i64> {
        self.due
    }

    /// Seqs missing right now, over all devices.
    pub(super) fn open(&self) -> usize {
        self.gaps.values().map(DeviceGaps::open).sum()
    }

    /// Brings the device's tracked gaps in line with the engine's tracker after one of its
    /// messages: new gaps are remembered with `now`, late fills shrink them (and the missed
    /// record they were declared as), gaps the tracker dropped (restart, eviction) are
    /// declared missed at once. Everything goes into `commit`.
    pub(super) fn track(
        &mut self,
        device: &str,
        seq: &SeqTracker,
        now: i64,
        commit: &mut Commit,
        reader: &StoreReader,
    ) -> Result<(), StoreError> {
        let change = match self.gaps.get_mut(device) {
            Some(g) if g.in_sync(seq) => return Ok(()),
            Some(g) => g.reconcile(seq, now),
            None if seq.missing().is_empty() => return Ok(()),
            None => {
                let mut g = DeviceGaps::new(seq);
                let change = g.reconcile(seq, now);
                self.gaps.insert(device.to_string(), g);
                change
            }
        };
        if self.gaps.get(device).is_some_and(|g| g.gaps.is_empty()) {
            self.gaps.remove(device);
        }
        self.dirty.insert(device.to_string());
        if let Some(t) = change
            .opened
            .iter()
            .map(|g| g.first_seen.saturating_add(self.after_ms))
            .min()
        {
            self.due = Some(self.due.map_or(t, |n| n.min(t)));
        }
        for piece in &change.filled {
            let Some(id) = piece.missed else { continue };
            let record = match commit.missed.remove(&id) {
                Some(r) => Some(r),
                None => reader.missed_record(id)?,
            };
            // Gone: dropped by the cap (it was counted then).
            let Some(mut record) = record else { continue };
            let n = record.fill(piece.range());
            commit.missed_filled_late += n;
            tracing::info!(
                device,
                missed_id = id,
                seqs = %piece.range(),
                still_missing = record.count,
                "a seq declared missed arrived late: processed normally, missed record updated"
            );
            if record.is_filled() {
                commit.missed_removals.insert(id);
            } else {
                commit.missed.insert(id, record);
            }
        }
        for piece in change.lost.iter().filter(|p| p.missed.is_none()) {
            let id = self.next_id;
            self.next_id += 1;
            let record = MissedRecord::new(id, device, piece.range(), piece.first_seen, now);
            tracing::warn!(
                device,
                missed_id = id,
                seqs = %piece.range(),
                count = record.count,
                "missed events: the device restarted its sequence (or too many gaps were \
                 open) before these arrived"
            );
            commit.missed_declared_seqs += record.count;
            commit.missed.insert(id, record);
        }
        Ok(())
    }

    /// Adds the changed devices' gaps to `commit`.
    pub(super) fn stage(&mut self, commit: &mut Commit) {
        for device in std::mem::take(&mut self.dirty) {
            let g = self.gaps.get(&device).cloned();
            commit.gaps.push((device, g));
        }
    }

    /// Declares every gap open for `missed_after_s` or longer missed, into `commit` (with the
    /// gaps it changed), and looks again when the next one falls due.
    pub(super) fn declare_due(&mut self, now: i64, commit: &mut Commit) {
        let after = self.after_ms;
        let mut next_id = self.next_id;
        for (device, g) in &mut self.gaps {
            let declared = g.declare_due(after, now, || {
                next_id += 1;
                next_id - 1
            });
            if declared.is_empty() {
                continue;
            }
            self.dirty.insert(device.clone());
            for gap in declared {
                let id = gap.missed.unwrap_or_default();
                let record = MissedRecord::new(id, device, gap.range(), gap.first_seen, now);
                tracing::warn!(
                    device = device.as_str(),
                    missed_id = id,
                    seqs = %gap.range(),
                    count = record.count,
                    open_s = (now - gap.first_seen) / 1000,
                    "missed events: a sequence gap stayed open past missed_after_s"
                );
                commit.missed_declared_seqs += record.count;
                commit.missed.insert(id, record);
            }
        }
        self.next_id = next_id;
        self.stage(commit);
        self.reschedule();
    }

    /// Recomputes when the next open gap falls due.
    fn reschedule(&mut self) {
        let after = self.after_ms;
        self.due = self.gaps.values().filter_map(|g| g.next_due(after)).min();
    }
}
