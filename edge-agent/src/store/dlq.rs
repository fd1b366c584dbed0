//! The DLQ's part of the store: entries, their retry schedule and the cap, applied inside each
//! commit (so an entry, its schedule and the counters never disagree).

use std::collections::{HashMap, HashSet};

use proto::DlqEntry;

use super::{Commit, Counters, Store, StoreError, StoreReader, decode, key};

/// The DLQ's size limits as the store applies them in each commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlqCap {
    pub max_entries: u64,
    pub max_bytes: u64,
    /// Evict the oldest entries over the cap (else the pipeline blocks intake while full).
    pub drop_oldest: bool,
}

impl DlqCap {
    pub const UNLIMITED: DlqCap = DlqCap {
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
        drop_oldest: false,
    };

    pub fn exceeded(&self, entries: u64, bytes: u64) -> bool {
        entries > self.max_entries || bytes > self.max_bytes
    }

    pub fn reached(&self, entries: u64, bytes: u64) -> bool {
        entries >= self.max_entries || bytes >= self.max_bytes
    }
}

impl StoreReader {
    /// DLQ entries in id order (oldest first), starting at `from`.
    pub fn dlq(&self, from: u64) -> impl Iterator<Item = Result<DlqEntry, StoreError>> + '_ {
        self.tree
            .range(key::numbered(key::DLQ, from)..key::numbered(key::DLQ + 1, 0))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &format!("q{}", key::number_of(&k)))
            })
    }

    pub fn dlq_entry(&self, id: u64) -> Result<Option<DlqEntry>, StoreError> {
        self.tree
            .get(key::numbered(key::DLQ, id))?
            .map(|v| decode(&v, &format!("q{id}")))
            .transpose()
    }

    /// The entry with the highest id (the newest failure).
    pub fn dlq_newest(&self) -> Result<Option<DlqEntry>, StoreError> {
        match self
            .tree
            .range(key::numbered(key::DLQ, 0)..key::numbered(key::DLQ + 1, 0))
            .next_back()
        {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(decode(&v, &format!("q{}", key::number_of(&k)))?))
            }
            None => Ok(None),
        }
    }

    /// When the entry's next automatic retry is due, if it has one.
    pub fn dlq_retry_at(&self, id: u64) -> Result<Option<i64>, StoreError> {
        self.tree
            .get(key::numbered(key::DLQ_RETRY, id))?
            .map(|v| decode(&v, &format!("r{id}")))
            .transpose()
    }

    /// Every scheduled automatic retry: (DLQ id, due at), in id order.
    pub fn dlq_schedule(&self) -> impl Iterator<Item = Result<(u64, i64), StoreError>> + '_ {
        self.tree.scan_prefix([key::DLQ_RETRY]).map(|kv| {
            let (k, v) = kv?;
            let id = key::number_of(&k);
            Ok((id, decode(&v, &format!("r{id}"))?))
        })
    }
}

impl Store {
    /// The DLQ's cap, applied from the next commit on (the default is no cap).
    pub fn set_dlq_cap(&mut self, cap: DlqCap) {
        self.dlq_cap = cap;
    }

    /// The DLQ is at its cap (with `full_policy = "block"` the pipeline stops taking messages).
    pub fn dlq_full(&self) -> bool {
        self.dlq_cap
            .reached(self.counters.dlq_entries, self.counters.dlq_bytes)
    }

    /// A store written before `dlq_bytes` was counted: count it once.
    pub(super) fn dlq_open(&mut self) -> Result<(), StoreError> {
        if self.counters.dlq_entries > 0 && self.counters.dlq_bytes == 0 {
            let mut bytes = 0u64;
            for kv in self.tree.scan_prefix([key::DLQ]) {
                bytes += kv?.1.len() as u64;
            }
            self.counters.dlq_bytes = bytes;
        }
        Ok(())
    }

    /// The DLQ part of [`Store::commit`]: removals, in-place updates, new entries (ids
    /// assigned here), the retry schedule, then the cap (`drop_oldest` evicts oldest first).
    pub(super) fn dlq_apply(
        &self,
        batch: &mut sled::Batch,
        next: &mut Counters,
        commit: &Commit,
        dropped: &mut Vec<DlqEntry>,
    ) -> Result<(), StoreError> {
        let entry_key = |id| key::numbered(key::DLQ, id);
        let retry_key = |id| key::numbered(key::DLQ_RETRY, id);
        let mut gone = HashSet::new();
        for &id in &commit.dlq_removals {
            if !gone.insert(id) {
                continue;
            }
            if let Some(old) = self.tree.get(entry_key(id))? {
                next.dlq_entries -= 1;
                next.dlq_bytes = next.dlq_bytes.saturating_sub(old.len() as u64);
                batch.remove(&entry_key(id)[..]);
                batch.remove(&retry_key(id)[..]);
            }
        }
        // Sizes of updated entries, for the cap below.
        let mut sizes = HashMap::new();
        for d in &commit.dlq_updates {
            if gone.contains(&d.id) {
                continue;
            }
            let Some(old) = self.tree.get(entry_key(d.id))? else {
                continue;
            };
            let bytes = proto::wire::encode(d);
            next.dlq_bytes = next.dlq_bytes.saturating_sub(old.len() as u64) + bytes.len() as u64;
            sizes.insert(d.id, bytes.len() as u64);
            batch.insert(&entry_key(d.id)[..], bytes);
        }
        let first_new = next.next_dlq_id;
        for d in commit.dlq() {
            next.next_dlq_id += 1;
            let bytes = proto::wire::encode(d);
            next.dlq_entries += 1;
            next.dlq_bytes += bytes.len() as u64;
            sizes.insert(d.id, bytes.len() as u64);
            batch.insert(&entry_key(d.id)[..], bytes);
        }
        for &(id, at) in &commit.dlq_schedule {
            if gone.contains(&id) {
                continue;
            }
            match at {
                Some(t) => batch.insert(&retry_key(id)[..], proto::wire::encode(&t)),
                None => batch.remove(&retry_key(id)[..]),
            }
        }

        let cap = self.dlq_cap;
        if !cap.drop_oldest || !cap.exceeded(next.dlq_entries, next.dlq_bytes) {
            return Ok(());
        }
        let evict = |id: u64, size: u64, batch: &mut sled::Batch, next: &mut Counters| {
            batch.remove(&entry_key(id)[..]);
            batch.remove(&retry_key(id)[..]);
            next.dlq_entries -= 1;
            next.dlq_bytes = next.dlq_bytes.saturating_sub(size);
            next.dlq_dropped += 1;
        };
        for kv in self.tree.range(entry_key(0)..entry_key(first_new)) {
            if !cap.exceeded(next.dlq_entries, next.dlq_bytes) {
                return Ok(());
            }
            let (k, v) = kv?;
            let id = key::number_of(&k);
            if gone.contains(&id) {
                continue;
            }
            let size = sizes.get(&id).copied().unwrap_or(v.len() as u64);
            evict(id, size, batch, next);
            if let Ok(e) = decode::<DlqEntry>(&v, "") {
                dropped.push(e);
            }
        }
        // A batch with more new entries than the cap holds: the oldest new ones go too.
        for d in commit.dlq() {
            if !cap.exceeded(next.dlq_entries, next.dlq_bytes) {
                break;
            }
            evict(d.id, sizes[&d.id], batch, next);
            dropped.push(d.clone());
        }
        Ok(())
    }
}
