//! Per-device sequence tracking: gaps (missed events), late arrivals, duplicates, restarts.
//!
//! A pure state machine over one device's `seq` numbers (devices count per device, not per
//! event type). It keeps the highest `seq` seen, the open *missing ranges* below it (at most
//! [`MAX_MISSING_RANGES`]; beyond that the oldest is evicted and counted), and a small ring of
//! recently seen message ids (in memory only, never persisted).
//!
//! Classification of an incoming `seq` against the highest seen, `h`:
//!
//! | case                                          | class       | effect                          |
//! |-----------------------------------------------|-------------|---------------------------------|
//! | id is in the recent ring (not a replay)       | duplicate   | none                            |
//! | nothing seen yet                              | first       | `h = seq`                       |
//! | `seq == h + 1`                                | in order    | `h = seq`                       |
//! | `seq > h + 1`                                 | gap         | `h = seq`, `h+1..=seq-1` missing |
//! | `seq <= h`, inside a missing range            | late        | the range shrinks or splits     |
//! | `seq <= h`, replay (DLQ retry)                | replayed    | none                            |
//! | `seq <= 1 < h` (device restart)               | reset       | ranges cleared, `h = seq`       |
//! | `seq <= h`, otherwise                         | duplicate   | none                            |
//!
//! Every class but duplicate marks the id as recent. The engine observes a message's `seq`
//! right after its envelope is checked, before its content is validated: a message that is
//! rejected later still took its `seq` (it is in the DLQ, not missed).

use serde::{Deserialize, Serialize};

use crate::fnv;

/// Open missing ranges kept per device; beyond this the oldest is evicted (and counted).
pub const MAX_MISSING_RANGES: usize = 64;

/// Message ids remembered per device (in memory only) to catch a re-sent id under a new seq.
pub const RECENT_IDS: usize = 32;

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl SeqRange {
    pub fn new(first: u64, last: u64) -> SeqRange {
        SeqRange { first, last }
    }

    /// How many sequence numbers the range holds.
    #[allow(clippy::len_without_is_empty)] // a range always holds at least one
    pub fn len(&self) -> u64 {
        self.last.saturating_sub(self.first).saturating_add(1)
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.first <= seq && seq <= self.last
    }
}

impl std::fmt::Display for SeqRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}..={}", self.first, self.last)
        }
    }
}

/// Why a message is a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateKind {
    /// The same id was seen recently (whatever its seq).
    RecentId,
    /// The seq is at or below the highest seen and not missing.
    SeqSeen { highest: u64 },
}

/// What one observed `seq` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqClass {
    /// The first message seen from this device.
    First,
    InOrder,
    /// Ahead of the next expected seq: the range between is now missing.
    Gap(SeqRange),
    /// Filled a missing seq.
    Late,
    /// `seq <= 1` after higher ones: the device restarted its counter.
    Reset {
        previous_highest: u64,
    },
    /// A replay (DLQ retry) of a seq already seen.
    Replayed,
    Duplicate(DuplicateKind),
}

/// A fixed ring of id hashes (FNV-1a; a collision would need 2^32 ids per device).
#[derive(Debug, Clone, Default)]
struct RecentIds {
    ids: [u64; RECENT_IDS],
    len: usize,
    next: usize,
}

impl RecentIds {
    fn contains(&self, h: u64) -> bool {
        self.ids.iter().take(self.len).any(|&x| x == h)
    }

    fn push(&mut self, h: u64) {
        if let Some(slot) = self.ids.get_mut(self.next) {
            *slot = h;
        }
        self.next = (self.next + 1) % RECENT_IDS;
        self.len = (self.len + 1).min(RECENT_IDS);
    }

    fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
    }
}

/// One device's sequence state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeqTracker {
    highest: Option<u64>,
    /// Sorted, disjoint, all below `highest`.
    #[serde(default)]
    missing: Vec<SeqRange>,
    #[serde(default)]
    evicted_ranges: u64,
    #[serde(default)]
    evicted_seqs: u64,
    #[serde(default)]
    resets: u64,
    #[serde(skip)]
    recent: RecentIds,
}

impl SeqTracker {
    /// Classifies `seq` (with the message's `id`) and updates the state accordingly.
    /// `replay`: a DLQ retry, exempt from the duplicate checks.
    pub fn observe(&mut self, seq: u64, id: &str, replay: bool) -> SeqClass {
        let h = fnv::hash_str(id);
        if !replay && self.recent.contains(h) {
            return SeqClass::Duplicate(DuplicateKind::RecentId);
        }
        let class = match self.highest {
            None => {
                self.highest = Some(seq);
                SeqClass::First
            }
            Some(high) if seq > high => {
                self.highest = Some(seq);
                if seq == high + 1 {
                    SeqClass::InOrder
                } else {
                    let gap = SeqRange::new(high + 1, seq - 1);
                    self.missing.push(gap);
                    self.enforce_cap();
                    SeqClass::Gap(gap)
                }
            }
            Some(high) => {
                if self.fill(seq) {
                    SeqClass::Late
                } else if replay {
                    SeqClass::Replayed
                } else if seq <= 1 && high > 1 {
                    self.missing.clear();
                    self.recent.clear();
                    self.highest = Some(seq);
                    self.resets += 1;
                    SeqClass::Reset {
                        previous_highest: high,
                    }
                } else {
                    return SeqClass::Duplicate(DuplicateKind::SeqSeen { highest: high });
                }
            }
        };
        self.recent.push(h);
        class
    }

    /// Removes `seq` from the missing ranges, if it is in one.
    fn fill(&mut self, seq: u64) -> bool {
        let idx = self.missing.partition_point(|r| r.last < seq);
        let Some(r) = self.missing.get(idx).copied() else {
            return false;
        };
        if !r.contains(seq) {
            return false;
        }
        if r.first == r.last {
            self.missing.remove(idx);
        } else if seq == r.first {
            self.missing[idx].first = seq + 1;
        } else if seq == r.last {
            self.missing[idx].last = seq - 1;
        } else {
            self.missing[idx].last = seq - 1;
            self.missing.insert(idx + 1, SeqRange::new(seq + 1, r.last));
            self.enforce_cap();
        }
        true
    }

    fn enforce_cap(&mut self) {
        while self.missing.len() > MAX_MISSING_RANGES {
            let oldest = self.missing.remove(0);
            self.evicted_ranges += 1;
            self.evicted_seqs = self.evicted_seqs.saturating_add(oldest.len());
        }
    }

    /// The highest seq seen, if any.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Open missing ranges, oldest first.
    pub fn missing(&self) -> &[SeqRange] {
        &self.missing
    }

    /// How many seqs the open ranges hold.
    pub fn missing_count(&self) -> u64 {
        self.missing
            .iter()
            .fold(0u64, |n, r| n.saturating_add(r.len()))
    }

    /// Ranges dropped because more than [`MAX_MISSING_RANGES`] were open.
    pub fn evicted_ranges(&self) -> u64 {
        self.evicted_ranges
    }

    /// Seqs in the evicted ranges (missed and no longer tracked).
    pub fn evicted_seqs(&self) -> u64 {
        self.evicted_seqs
    }

    /// Device restarts detected.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(t: &mut SeqTracker, seq: u64) -> SeqClass {
        t.observe(seq, &format!("id-{seq}-{}", t.resets), false)
    }

    fn r(a: u64, b: u64) -> SeqRange {
        SeqRange::new(a, b)
    }

    #[test]
    fn in_order() {
        let mut t = SeqTracker::default();
        assert_eq!(obs(&mut t, 5), SeqClass::First);
        assert_eq!(obs(&mut t, 6), SeqClass::InOrder);
        assert_eq!(obs(&mut t, 7), SeqClass::InOrder);
        assert_eq!(t.highest(), Some(7));
        assert!(t.missing().is_empty());
    }

    #[test]
    fn gap_records_range() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        assert_eq!(obs(&mut t, 5), SeqClass::Gap(r(2, 4)));
        assert_eq!(t.missing(), &[r(2, 4)]);
        assert_eq!(t.missing_count(), 3);
        assert_eq!(obs(&mut t, 7), SeqClass::Gap(r(6, 6)));
        assert_eq!(t.missing(), &[r(2, 4), r(6, 6)]);
        assert_eq!(r(2, 4).len(), 3);
        assert_eq!(r(2, 4).to_string(), "2..=4");
    }

    #[test]
    fn late_fill_shrinks_and_splits() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 10); // missing 2..=9
        assert_eq!(obs(&mut t, 2), SeqClass::Late);
        assert_eq!(t.missing(), &[r(3, 9)]);
        assert_eq!(obs(&mut t, 9), SeqClass::Late);
        assert_eq!(t.missing(), &[r(3, 8)]);
        assert_eq!(obs(&mut t, 5), SeqClass::Late);
        assert_eq!(t.missing(), &[r(3, 4), r(6, 8)]);
        assert_eq!(obs(&mut t, 7), SeqClass::Late);
        assert_eq!(t.missing(), &[r(3, 4), r(6, 6), r(8, 8)]);
        for s in [3, 4, 6, 8] {
            assert_eq!(obs(&mut t, s), SeqClass::Late, "{s}");
        }
        assert!(t.missing().is_empty());
        assert_eq!(t.highest(), Some(10));
    }

    #[test]
    fn duplicates() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 2);
        obs(&mut t, 3);
        // Same seq, new id: a duplicate by seq.
        assert_eq!(
            t.observe(2, "other", false),
            SeqClass::Duplicate(DuplicateKind::SeqSeen { highest: 3 })
        );
        // Same id, new seq: a duplicate by id.
        assert_eq!(
            t.observe(4, "id-3-0", false),
            SeqClass::Duplicate(DuplicateKind::RecentId)
        );
        // Neither changed the state.
        assert_eq!(t.highest(), Some(3));
        assert_eq!(obs(&mut t, 4), SeqClass::InOrder);
    }

    #[test]
    fn late_fill_is_not_a_duplicate_but_its_repeat_is() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 4);
        assert_eq!(t.observe(2, "x", false), SeqClass::Late);
        assert_eq!(
            t.observe(2, "y", false),
            SeqClass::Duplicate(DuplicateKind::SeqSeen { highest: 4 })
        );
    }

    #[test]
    fn replay_bypasses_duplicate_checks() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 2);
        obs(&mut t, 3);
        assert_eq!(t.observe(2, "id-2-0", true), SeqClass::Replayed);
        assert_eq!(
            t.observe(1, "id-1-0", true),
            SeqClass::Replayed,
            "no reset on replay"
        );
        assert_eq!(t.resets(), 0);
        assert_eq!(t.highest(), Some(3));
        // A replay inside a missing range still fills it.
        obs(&mut t, 6);
        assert_eq!(t.observe(5, "id-5-0", true), SeqClass::Late);
        assert_eq!(t.missing(), &[r(4, 4)]);
        // A replay ahead is ordinary.
        assert_eq!(t.observe(7, "id-7-0", true), SeqClass::InOrder);
    }

    #[test]
    fn reset_on_restart() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 2);
        obs(&mut t, 10); // missing 3..=9
        assert_eq!(
            t.observe(1, "boot2-1", false),
            SeqClass::Reset {
                previous_highest: 10
            }
        );
        assert!(t.missing().is_empty());
        assert_eq!(t.highest(), Some(1));
        assert_eq!(t.resets(), 1);
        assert_eq!(t.observe(2, "boot2-2", false), SeqClass::InOrder);
        // Ids from before the restart may be reused after it.
        assert_eq!(t.observe(3, "id-3-0", false), SeqClass::InOrder);
        // seq 0 also counts as a restart.
        let mut t = SeqTracker::default();
        obs(&mut t, 0);
        obs(&mut t, 1);
        obs(&mut t, 2);
        assert!(matches!(t.observe(0, "b", false), SeqClass::Reset { .. }));
    }

    #[test]
    fn no_reset_when_recent_id_or_low_highest() {
        let mut t = SeqTracker::default();
        obs(&mut t, 0);
        obs(&mut t, 1);
        // highest is 1: seq 1 again is a duplicate, not a restart.
        assert!(matches!(
            t.observe(1, "new", false),
            SeqClass::Duplicate(DuplicateKind::SeqSeen { .. })
        ));
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 2);
        obs(&mut t, 3);
        // The id of seq 1 re-sent: a duplicate, not a restart.
        assert_eq!(
            t.observe(1, "id-1-0", false),
            SeqClass::Duplicate(DuplicateKind::RecentId)
        );
    }

    #[test]
    fn missing_seq_1_is_late_not_reset() {
        let mut t = SeqTracker::default();
        obs(&mut t, 0);
        obs(&mut t, 5); // missing 1..=4
        assert_eq!(obs(&mut t, 1), SeqClass::Late);
        assert_eq!(t.resets(), 0);
    }

    #[test]
    fn range_eviction_is_bounded_and_counted() {
        let mut t = SeqTracker::default();
        obs(&mut t, 0);
        // Every other seq: each arrival opens a one-seq gap.
        for i in 1..=(MAX_MISSING_RANGES as u64 + 10) {
            assert_eq!(obs(&mut t, 2 * i), SeqClass::Gap(r(2 * i - 1, 2 * i - 1)));
        }
        assert_eq!(t.missing().len(), MAX_MISSING_RANGES);
        assert_eq!(t.evicted_ranges(), 10);
        assert_eq!(t.evicted_seqs(), 10);
        // The oldest went first: seq 3 is no longer tracked, so it is a duplicate.
        assert_eq!(t.missing()[0], r(21, 21));
        assert!(matches!(obs(&mut t, 3), SeqClass::Duplicate(_)));
        assert_eq!(obs(&mut t, 21), SeqClass::Late);
    }

    #[test]
    fn split_respects_the_cap() {
        let mut t = SeqTracker::default();
        obs(&mut t, 0);
        obs(&mut t, 1000); // missing 1..=999
        for i in 1..=(MAX_MISSING_RANGES as u64 - 1) {
            obs(&mut t, 1000 + 2 * i); // one-seq gaps
        }
        assert_eq!(t.missing().len(), MAX_MISSING_RANGES);
        assert_eq!(obs(&mut t, 500), SeqClass::Late); // splits 1..=999 in two
        assert_eq!(t.missing().len(), MAX_MISSING_RANGES);
        assert_eq!(t.evicted_ranges(), 1);
        assert_eq!(t.missing()[0], r(501, 999));
        assert_eq!(t.evicted_seqs(), 499);
    }

    #[test]
    fn ring_forgets_old_ids() {
        let mut t = SeqTracker::default();
        for s in 1..=(RECENT_IDS as u64 + 1) {
            obs(&mut t, s);
        }
        // "id-1-0" fell out of the ring; seq 40 with that id is new.
        assert_eq!(t.observe(40, "id-1-0", false), SeqClass::Gap(r(34, 39)));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut t = SeqTracker::default();
        obs(&mut t, 0);
        assert_eq!(obs(&mut t, u64::MAX), SeqClass::Gap(r(1, u64::MAX - 1)));
        assert_eq!(t.missing_count(), u64::MAX - 1);
        assert!(matches!(obs(&mut t, u64::MAX), SeqClass::Duplicate(_)));
        assert_eq!(obs(&mut t, 7), SeqClass::Late);
    }

    #[test]
    fn serde_keeps_ranges_not_ring() {
        let mut t = SeqTracker::default();
        obs(&mut t, 1);
        obs(&mut t, 4);
        let json = serde_json::to_string(&t).unwrap();
        let mut back: SeqTracker = serde_json::from_str(&json).unwrap();
        assert_eq!(back.highest(), Some(4));
        assert_eq!(back.missing(), &[r(2, 3)]);
        // The ring is not persisted: only the seq check remains after a restart.
        assert!(matches!(
            back.observe(5, "id-4-0", false),
            SeqClass::InOrder
        ));
    }
}
