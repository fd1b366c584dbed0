//! Missed events: per-device sequence gaps that stay open longer than a wait become
//! missed-event records; a late arrival that fills a gap (declared or not) shrinks or splits it.
//! Both tiers run this: the agent for its devices, the bridge for gateway-less devices.
//!
//! One source of truth: the engine's [`SeqTracker`] knows which seqs are still missing. This
//! module only adds what the tracker does not keep: when each gap was first seen, and which
//! missed record (if any) a gap was declared as. [`DeviceGaps::reconcile`] re-derives that
//! view from the tracker after every message of the device, so the two cannot drift: a
//! tracker range inherits the first-seen time and record of the gap it came from; seqs that
//! left the tracker's missing set were filled late (a result or a DLQ entry), unless the
//! tracker reset (device restart) or evicted ranges (its 64-range cap), in which case they
//! can no longer arrive and are missed at once.
//!
//! Pure: no I/O, no clock (the caller passes `now`). The caller persists [`DeviceGaps`] and
//! [`MissedRecord`]s with the message that changed them, and declares due gaps.

use crate::seq::{SeqRange, SeqTracker};
use serde::{Deserialize, Serialize};

use proto::timestamp::rfc3339;

/// One open gap as the agent tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first: u64,
    pub last: u64,
    /// When the message that revealed it was processed (epoch ms).
    pub first_seen: i64,
    /// The missed record it was declared as, once declared.
    pub missed: Option<u64>,
}

impl Gap {
    pub fn range(&self) -> SeqRange {
        SeqRange::new(self.first, self.last)
    }

    fn with_range(self, r: SeqRange) -> Gap {
        Gap {
            first: r.first,
            last: r.last,
            ..self
        }
    }
}

/// A device's open gaps (sorted, disjoint; the engine's missing ranges with their history),
/// plus the tracker's restart/eviction counters as of the last reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGaps {
    pub resets: u64,
    pub evicted_ranges: u64,
    pub gaps: Vec<Gap>,
}

/// What one reconcile found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Gaps newly seen (first_seen = now).
    pub opened: Vec<Gap>,
    /// Pieces filled by a late arrival (with the record they belong to, if declared).
    pub filled: Vec<Gap>,
    /// Pieces that can no longer arrive (tracker reset or evicted them).
    pub lost: Vec<Gap>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty() && self.filled.is_empty() && self.lost.is_empty()
    }
}

impl DeviceGaps {
    /// No gaps yet; the tracker's counters as they are now.
    pub fn new(seq: &SeqTracker) -> DeviceGaps {
        DeviceGaps {
            resets: seq.resets(),
            evicted_ranges: seq.evicted_ranges(),
            gaps: Vec::new(),
        }
    }

    /// Whether the tracker says exactly what this already knows (the common case: nothing to do).
    pub fn in_sync(&self, seq: &SeqTracker) -> bool {
        self.resets == seq.resets()
            && self.evicted_ranges == seq.evicted_ranges()
            && self.gaps.len() == seq.missing().len()
            && self
                .gaps
                .iter()
                .zip(seq.missing())
                .all(|(g, r)| g.range() == *r)
    }

    /// Re-derives the gaps from the tracker (call after each message of this device).
    pub fn reconcile(&mut self, seq: &SeqTracker, now: i64) -> Change {
        let mut change = Change::default();
        let lost_all = seq.resets() != self.resets;
        let evicted = seq.evicted_ranges() != self.evicted_ranges;
        let engine = seq.missing();
        let mut next = Vec::with_capacity(engine.len());
        for r in engine {
            // Engine ranges only shrink or split, so at most one old gap overlaps (a new one
            // lies above everything seen before).
            match self
                .gaps
                .iter()
                .find(|g| g.first <= r.last && r.first <= g.last)
            {
                Some(g) => next.push(g.with_range(*r)),
                None => {
                    let g = Gap {
                        first: r.first,
                        last: r.last,
                        first_seen: now,
                        missed: None,
                    };
                    change.opened.push(g);
                    next.push(g);
                }
            }
        }
        for g in &self.gaps {
            let pieces = subtract(g.range(), engine);
            // Eviction takes whole ranges; a partly present gap lost a seq to a late fill.
            let whole = pieces.len() == 1 && pieces[0] == g.range();
            for p in pieces {
                let piece = g.with_range(p);
                if lost_all || (evicted && whole) {
                    change.lost.push(piece);
                } else {
                    change.filled.push(piece);
                }
            }
        }
        self.gaps = next;
        self.resets = seq.resets();
        self.evicted_ranges = seq.evicted_ranges();
        change
    }

    /// Marks the undeclared gaps open since `after_ms` or longer as missed, giving each the
    /// id `next_id` returns; returns them.
    pub fn declare_due(
        &mut self,
        after_ms: i64,
        now: i64,
        mut next_id: impl FnMut() -> u64,
    ) -> Vec<Gap> {
        let mut out = Vec::new();
        for g in &mut self.gaps {
            if g.missed.is_none() && g.first_seen.saturating_add(after_ms) <= now {
                g.missed = Some(next_id());
                out.push(*g);
            }
        }
        out
    }

    /// When the earliest undeclared gap falls due.
    pub fn next_due(&self, after_ms: i64) -> Option<i64> {
        self.gaps
            .iter()
            .filter(|g| g.missed.is_none())
            .map(|g| g.first_seen.saturating_add(after_ms))
            .min()
    }

    /// Gaps not yet declared missed.
    pub fn open(&self) -> usize {
        self.gaps.iter().filter(|g| g.missed.is_none()).count()
    }
}

/// `r` minus the (sorted, disjoint) `minus` ranges.
pub(crate) fn subtract(r: SeqRange, minus: &[SeqRange]) -> Vec<SeqRange> {
    let mut out = Vec::new();
    let mut from = r.first;
    for m in minus {
        if m.last < from || m.first > r.last {
            continue;
        }
        if m.first > from {
            out.push(SeqRange::new(from, m.first - 1));
        }
        match m.last.checked_add(1) {
            Some(n) => from = n,
            None => return out,
        }
        if from > r.last {
            return out;
        }
    }
    if from <= r.last {
        out.push(SeqRange::new(from, r.last));
    }
    out
}

/// A gap declared missed: `{ device, first_seq, last_seq, count, first_seen, declared_at }`,
/// plus the seqs still missing (`ranges`: a late fill shrinks or splits them) and how many
/// arrived late after the declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissedRecord {
    pub id: u64,
    pub device: String,
    /// Lowest and highest seq still missing.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Seqs still missing.
    pub count: u64,
    /// The seqs still missing, as ranges (more than one after a late arrival split it).
    pub ranges: Vec<SeqRange>,
    #[serde(with = "rfc3339")]
    pub first_seen: i64,
    #[serde(with = "rfc3339")]
    pub declared_at: i64,
    /// Seqs of this record that arrived after it was declared (and were processed normally).
    #[serde(default)]
    pub filled_late: u64,
}

impl MissedRecord {
    pub fn new(id: u64, device: &str, range: SeqRange, first_seen: i64, now: i64) -> Self {
        MissedRecord {
            id,
            device: device.to_string(),
            first_seq: range.first,
            last_seq: range.last,
            count: range.len(),
            ranges: vec![range],
            first_seen,
            declared_at: now,
            filled_late: 0,
        }
    }

    /// Removes the seqs of `filled` (a late arrival); returns how many it held.
    pub fn fill(&mut self, filled: SeqRange) -> u64 {
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for r in &self.ranges {
            kept.extend(subtract(*r, std::slice::from_ref(&filled)));
        }
        let count = kept.iter().fold(0u64, |n, r| n.saturating_add(r.len()));
        let removed = self.count.saturating_sub(count);
        self.ranges = kept;
        self.count = count;
        if let (Some(a), Some(b)) = (self.ranges.first(), self.ranges.last()) {
            self.first_seq = a.first;
            self.last_seq = b.last;
        }
        self.filled_late = self.filled_late.saturating_add(removed);
        removed
    }

    /// Nothing of it is missing any more.
    pub fn is_filled(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u64, b: u64) -> SeqRange {
        SeqRange::new(a, b)
    }

    fn obs(t: &mut SeqTracker, seq: u64) {
        t.observe(seq, &format!("id-{seq}-{}", t.resets()), false);
    }

    fn ranges(g: &DeviceGaps) -> Vec<SeqRange> {
        g.gaps.iter().map(Gap::range).collect()
    }

    #[test]
    fn a_gap_is_remembered_with_its_first_seen_time() {
        let mut t = SeqTracker::default();
        let mut g = DeviceGaps::new(&t);
        for s in [1, 2, 5] {
            obs(&mut t, s);
        }
        assert!(!g.in_sync(&t));
        let c = g.reconcile(&t, 1000);
        assert_eq!(c.opened.len(), 1);
        assert!(c.filled.is_empty() && c.lost.is_empty());
        assert_eq!(ranges(&g), [r(3, 4)]);
        assert_eq!(g.gaps[0].first_seen, 1000);
        obs(&mut t, 6);
        assert!(g.in_sync(&t));
        // A second gap keeps the first one's time.
        obs(&mut t, 9);
        let c = g.reconcile(&t, 2000);
        assert_eq!(c.opened.len(), 1);
        assert_eq!(ranges(&g), [r(3, 4), r(7, 8)]);
        assert_eq!(g.gaps[0].first_seen, 1000);
        assert_eq!(g.gaps[1].first_seen, 2000);
        assert_eq!(g.next_due(500), Some(1500));
    }

    #[test]
    fn late_fill_shrinks_and_splits_keeping_history() {
        let mut t = SeqTracker::default();
        let mut g = DeviceGaps::new(&t);
        obs(&mut t, 1);
        obs(&mut t, 10); // 2..=9
        g.reconcile(&t, 100);
        let declared = g.declare_due(50, 150, || 7);
        assert_eq!(declared.len(), 1);
        obs(&mut t, 5); // splits
        let c = g.reconcile(&t, 200);
        assert!(c.opened.is_empty() && c.lost.is_empty());
        assert_eq!(c.filled.len(), 1);
        assert_eq!(c.filled[0].range(), r(5, 5));
        assert_eq!(c.filled[0].missed, Some(7));
        assert_eq!(ranges(&g), [r(2, 4), r(6, 9)]);
        assert!(
            g.gaps
                .iter()
                .all(|x| x.first_seen == 100 && x.missed == Some(7))
        );
        obs(&mut t, 2); // shrinks
        let c = g.reconcile(&t, 300);
        assert_eq!(c.filled[0].range(), r(2, 2));
        assert_eq!(ranges(&g), [r(3, 4), r(6, 9)]);
        // A one-seq gap filled: gone entirely.
        obs(&mut t, 13); // 11..=12
        g.reconcile(&t, 400);
        obs(&mut t, 11);
        obs(&mut t, 12);
        let c = g.reconcile(&t, 500);
        assert_eq!(
            c.filled.iter().map(Gap::range).collect::<Vec<_>>(),
            [r(11, 12)]
        );
        assert_eq!(c.filled[0].missed, None);
        assert_eq!(ranges(&g), [r(3, 4), r(6, 9)]);
    }

    #[test]
    fn expiry_after_the_wait_declares_each_gap_once() {
        let mut t = SeqTracker::default();
        let mut g = DeviceGaps::new(&t);
        obs(&mut t, 1);
        obs(&mut t, 3);
        g.reconcile(&t, 1_000);
        obs(&mut t, 6);
        g.reconcile(&t, 2_000);
        let mut id = 0;
        let mut ids = || {
            id += 1;
            id
        };
        assert!(g.declare_due(1_000, 1_999, &mut ids).is_empty());
        let d = g.declare_due(1_000, 2_000, &mut ids);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].range(), d[0].missed), (r(2, 2), Some(1)));
        assert_eq!(g.open(), 1);
        assert_eq!(g.next_due(1_000), Some(3_000));
        assert!(g.declare_due(1_000, 2_500, &mut ids).is_empty());
        let d = g.declare_due(1_000, 3_000, &mut ids);
        assert_eq!((d[0].range(), d[0].missed), (r(4, 5), Some(2)));
        assert_eq!(g.next_due(1_000), None);
        assert!(g.declare_due(1_000, 9_000, &mut ids).is_empty());
    }

    #[test]
    fn reset_and_eviction_make_gaps_lost_not_filled() {
        let mut t = SeqTracker::default();
        let mut g = DeviceGaps::new(&t);
        obs(&mut t, 1);
        obs(&mut t, 2);
        obs(&mut t, 10);
        g.reconcile(&t, 0);
        t.observe(1, "boot2", false); // restart
        let c = g.reconcile(&t, 10);
        assert_eq!(c.lost.iter().map(Gap::range).collect::<Vec<_>>(), [r(3, 9)]);
        assert!(c.filled.is_empty());
        assert!(g.gaps.is_empty());
        assert!(g.in_sync(&t));

        // Eviction: the engine keeps at most 64 ranges.
        let mut t = SeqTracker::default();
        let mut g = DeviceGaps::new(&t);
        obs(&mut t, 0);
        for i in 1..=crate::seq::MAX_MISSING_RANGES as u64 {
            obs(&mut t, 2 * i);
            g.reconcile(&t, i as i64);
        }
        obs(&mut t, 200);
        let c = g.reconcile(&t, 999);
        assert_eq!(c.lost.iter().map(Gap::range).collect::<Vec<_>>(), [r(1, 1)]);
        assert_eq!(c.opened.len(), 1);
        assert!(c.filled.is_empty());
        assert_eq!(g.gaps.len(), crate::seq::MAX_MISSING_RANGES);
    }

    #[test]
    fn a_missed_record_shrinks_splits_and_counts_late_fills() {
        let mut m = MissedRecord::new(1, "d", r(3, 9), 10, 20);
        assert_eq!((m.first_seq, m.last_seq, m.count), (3, 9, 7));
        assert_eq!(m.fill(r(6, 6)), 1);
        assert_eq!(m.ranges, [r(3, 5), r(7, 9)]);
        assert_eq!(
            (m.first_seq, m.last_seq, m.count, m.filled_late),
            (3, 9, 6, 1)
        );
        assert_eq!(m.fill(r(3, 3)), 1);
        assert_eq!(m.fill(r(9, 9)), 1);
        assert_eq!((m.first_seq, m.last_seq, m.count), (4, 8, 4));
        assert_eq!(m.fill(r(100, 100)), 0, "not in the record");
        assert_eq!(m.fill(r(4, 8)), 4);
        assert!(m.is_filled());
        assert_eq!(m.filled_late, 7);
    }

    #[test]
    fn subtract_ranges() {
        assert_eq!(subtract(r(1, 10), &[]), [r(1, 10)]);
        assert_eq!(subtract(r(1, 10), &[r(1, 10)]), Vec::<SeqRange>::new());
        assert_eq!(
            subtract(r(1, 10), &[r(3, 4), r(7, 7)]),
            [r(1, 2), r(5, 6), r(8, 10)]
        );
        assert_eq!(subtract(r(5, 6), &[r(0, 5), r(20, 30)]), [r(6, 6)]);
        assert_eq!(subtract(r(5, u64::MAX), &[r(6, u64::MAX)]), [r(5, 5)]);
    }

    #[test]
    fn records_round_trip_through_cbor_and_json() {
        let m = MissedRecord::new(1, "meter-1", r(3, 4), 1_795_600_800_000, 1_795_600_801_000);
        let back: MissedRecord = proto::wire::decode(&proto::wire::encode(&m)).unwrap();
        assert_eq!(back, m);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["first_seq"], 3);
        assert_eq!(json["declared_at"], "2026-11-25T10:00:01.000Z");
        let g = DeviceGaps {
            resets: 1,
            evicted_ranges: 0,
            gaps: vec![Gap {
                first: 3,
                last: 4,
                first_seen: 5,
                missed: Some(2),
            }],
        };
        let back: DeviceGaps = proto::wire::decode(&proto::wire::encode(&g)).unwrap();
        assert_eq!(back, g);
    }
}
