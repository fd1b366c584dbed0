//! The missed events' part of the store: each device's tracked gaps, the missed records, their
//! cap and which of them reached the cloud.

use std::collections::BTreeSet;

use crate::missed::{DeviceGaps, MissedFilter, MissedListing, MissedRecord, over_cap};

use super::{Commit, Counters, Store, StoreError, StoreReader, decode, key};

impl StoreReader {
    pub fn missed_record(&self, id: u64) -> Result<Option<MissedRecord>, StoreError> {
        self.tree
            .get(key::numbered(key::MISSED, id))?
            .map(|v| decode(&v, &format!("x{id}")))
            .transpose()
    }

    /// Missed records in id order (oldest first).
    pub fn missed(&self) -> impl Iterator<Item = Result<MissedRecord, StoreError>> + '_ {
        self.tree
            .range(key::numbered(key::MISSED, 0)..key::numbered(key::MISSED + 1, 0))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &format!("x{}", key::number_of(&k)))
            })
    }

    /// `missed list`: the matching records, oldest first, up to the filter's limit.
    pub fn missed_list(&self, filter: &MissedFilter) -> Result<MissedListing, StoreError> {
        let total = self.counters()?.missed_records;
        let mut matching = 0u64;
        let mut records = Vec::new();
        for r in self.missed() {
            let r = r?;
            if !filter.matches(&r) {
                continue;
            }
            matching += 1;
            if filter.limit.is_none_or(|l| records.len() < l) {
                records.push(r);
            }
        }
        Ok(MissedListing {
            total,
            matching,
            records,
        })
    }

    /// Up to `limit` missed records not yet reported to the cloud, oldest first.
    pub fn missed_unreported(&self, limit: usize) -> Result<Vec<MissedRecord>, StoreError> {
        let mut out = Vec::new();
        for r in self.missed() {
            if out.len() >= limit {
                break;
            }
            let r = r?;
            if !self
                .tree
                .contains_key(key::numbered(key::MISSED_REPORTED, r.id))?
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Marks records reported (the cloud broker acknowledged the status message that carried
    /// them). Not flushed: the next group commit's flush makes it durable, and a mark lost to
    /// a crash only means a record is reported twice, which the cloud de-duplicates by id.
    /// Marks of records that no longer exist (filled late, dropped by the cap) are removed.
    pub fn mark_missed_reported(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for &id in ids {
            batch.insert(&key::numbered(key::MISSED_REPORTED, id), &[][..]);
        }
        for kv in self.tree.range(
            key::numbered(key::MISSED_REPORTED, 0)..key::numbered(key::MISSED_REPORTED + 1, 0),
        ) {
            let (k, _) = kv?;
            let id = key::number_of(&k);
            if !ids.contains(&id) && !self.tree.contains_key(key::numbered(key::MISSED, id))? {
                batch.remove(k);
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Every device's tracked gaps.
    pub fn gaps(&self) -> impl Iterator<Item = Result<(String, DeviceGaps), StoreError>> + '_ {
        self.tree.scan_prefix([key::GAPS]).map(|kv| {
            let (k, v) = kv?;
            let device = String::from_utf8_lossy(&k[1..]).into_owned();
            let gaps = decode(&v, &format!("g{device}"))?;
            Ok((device, gaps))
        })
    }
}

impl Store {
    /// The cap on stored missed records, applied from the next commit on (default: none).
    pub fn set_missed_cap(&mut self, cap: u64) {
        self.missed_cap = cap;
    }

    /// The missed-events part of [`Store::commit`]: tracked gaps, record writes and removals,
    /// then the cap (oldest records first).
    pub(super) fn missed_apply(
        &self,
        batch: &mut sled::Batch,
        next: &mut Counters,
        commit: &Commit,
        dropped: &mut Vec<MissedRecord>,
    ) -> Result<(), StoreError> {
        for (device, gaps) in &commit.gaps {
            let k = key::named(key::GAPS, device);
            match gaps {
                Some(g) => batch.insert(k, proto::wire::encode(g)),
                None => batch.remove(k),
            }
        }
        let rec_key = |id| key::numbered(key::MISSED, id);
        let mut stored: BTreeSet<u64> = BTreeSet::new();
        for &id in &commit.missed_removals {
            if commit.missed.contains_key(&id) {
                continue;
            }
            if self.tree.contains_key(rec_key(id))? {
                batch.remove(&rec_key(id)[..]);
                next.missed_records -= 1;
            }
        }
        for (&id, r) in &commit.missed {
            if !self.tree.contains_key(rec_key(id))? {
                next.missed_records += 1;
            }
            stored.insert(id);
            next.next_missed_id = next.first_free_missed_id().max(id + 1);
            batch.insert(&rec_key(id)[..], proto::wire::encode(r));
        }
        next.missed_seqs += commit.missed_declared_seqs;
        next.missed_filled_late += commit.missed_filled_late;
        if next.missed_records <= self.missed_cap {
            return Ok(());
        }
        // Oldest first: the stored ids (less this commit's removals) merged with this
        // commit's writes, in id order.
        let excess = next.missed_records - self.missed_cap;
        let mut ids = Vec::new();
        for kv in self
            .tree
            .range(rec_key(0)..key::numbered(key::MISSED + 1, 0))
        {
            let (k, _) = kv?;
            let id = key::number_of(&k);
            if !commit.missed_removals.contains(&id) && !stored.contains(&id) {
                ids.push(id);
            }
            if ids.len() as u64 >= excess {
                break;
            }
        }
        ids.extend(stored.iter().copied());
        ids.sort_unstable();
        let keep = ids.len() as u64 - excess.min(ids.len() as u64);
        for &id in over_cap(&ids, keep) {
            let record = match commit.missed.get(&id) {
                Some(r) => Some(r.clone()),
                None => self.reader().missed_record(id)?,
            };
            batch.remove(&rec_key(id)[..]);
            next.missed_records -= 1;
            next.missed_dropped += 1;
            dropped.extend(record);
        }
        Ok(())
    }
}
