//! The durable store: outbox, local DLQ, device state and counters, in one sled tree.
//!
//! Everything a batch changes goes into one `sled::Batch`, which sled applies atomically, and
//! the batch is flushed before [`Store::commit`] returns. One tree with key prefixes (rather than
//! one tree per concept) is what makes the whole batch atomic without sled's slower
//! multi-tree transactions: after a crash a batch is either entirely there or entirely absent,
//! so a result, its device state and the gateway counters never disagree.
//!
//! Durability: a commit is flushed by sled and then synced by [`sync`] (`fdatasync` of sled's
//! log, `fsync` of the store directory), because sled's own flush stops at `sync_file_range`.
//! That survives a process crash and a power cut (`tests/powercut.rs`, torn writes included)
//! on a drive that honours flushes; a drive whose volatile write cache ignores them can still
//! lose the last commits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use engine::DeviceState;
use proto::{DlqEntry, EventResult};

use crate::dlq::DlqCap;
use crate::missed::{DeviceGaps, MissedFilter, MissedListing, MissedRecord, over_cap};
use crate::outbox::{Outbox, OutboxConfig};
use serde::de::DeserializeOwned;

pub mod quarantine;
mod sync;

pub use quarantine::Quarantine;

/// Key prefixes of the one tree. Keys sort by prefix, then big-endian number or name.
pub(crate) mod key {
    pub const OUTBOX: u8 = b'o';
    pub const DLQ: u8 = b'q';
    /// DLQ id → when its next automatic retry is due (transient failures only).
    pub const DLQ_RETRY: u8 = b'r';
    pub const STATE: u8 = b's';
    pub const META: u8 = b'm';
    /// Device → its open sequence gaps as the agent tracks them (`missed::DeviceGaps`).
    pub const GAPS: u8 = b'g';
    /// Missed-event record id → `missed::MissedRecord`.
    pub const MISSED: u8 = b'x';
    /// Missed-event record id → empty: the record reached the cloud broker in a status
    /// message (written by the uplink, never by the pipeline, so neither overwrites the other).
    pub const MISSED_REPORTED: u8 = b'y';
    /// Event id → `CorrectionMark`: the edge corrected this result (at most once, ever).
    pub const CORRECTED: u8 = b'c';

    pub fn numbered(prefix: u8, n: u64) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = prefix;
        k[1..].copy_from_slice(&n.to_be_bytes());
        k
    }

    pub fn named(prefix: u8, name: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + name.len());
        k.push(prefix);
        k.extend_from_slice(name.as_bytes());
        k
    }

    pub fn number_of(k: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&k[1..9]);
        u64::from_be_bytes(b)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store at {0} is in use by another process (is the agent running? stop it, or use its admin socket)"
    )]
    Locked(PathBuf),
    #[error("store at {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store: {0}")]
    Io(#[from] sled::Error),
    #[error("store record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store at {path}: syncing to disk: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Gateway-wide counters kept beside the data they count, so they survive restarts exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// The next outbox entry gets this `edge_seq` (starts at 1).
    pub next_edge_seq: u64,
    pub next_dlq_id: u64,
    /// Results ever appended to the outbox, and their encoded bytes. What is still pending is
    /// these minus what the uplink released: see [`crate::outbox::Outbox::depth`].
    pub outbox_entries: u64,
    pub outbox_bytes: u64,
    pub dlq_entries: u64,
    /// Encoded size of the DLQ entries.
    #[serde(default)]
    pub dlq_bytes: u64,
    /// DLQ entries ever evicted to stay under the cap (`full_policy = "drop_oldest"`).
    #[serde(default)]
    pub dlq_dropped: u64,
    /// The next missed record gets this id (0 in stores written before missed records: read
    /// as 1).
    #[serde(default)]
    pub next_missed_id: u64,
    /// Missed records stored.
    #[serde(default)]
    pub missed_records: u64,
    /// Seqs ever declared missed.
    #[serde(default)]
    pub missed_seqs: u64,
    /// Seqs declared missed that arrived later (and were processed normally).
    #[serde(default)]
    pub missed_filled_late: u64,
    /// Missed records evicted to stay under the cap.
    #[serde(default)]
    pub missed_dropped: u64,
    /// Results corrected at the edge.
    #[serde(default)]
    pub corrected: u64,
}

impl Counters {
    pub fn first_free_missed_id(&self) -> u64 {
        self.next_missed_id.max(1)
    }
}

const COUNTERS: &str = "counters";
/// Meta key prefix of the quarantine records (`quarantine/{at:020}`).
const QUARANTINE: &str = "quarantine/";

/// What `store check` read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub records: u64,
    pub outbox: u64,
    pub dlq: u64,
    pub devices: u64,
    pub next_edge_seq: u64,
}

/// What `store salvage` exported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SalvageReport {
    pub exported: u64,
    pub unreadable: u64,
}

/// What one group commit writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// `edge_seq` is assigned by the store, in order.
    pub results: Vec<EventResult>,
    /// `id` is assigned by the store.
    pub dlq: Vec<DlqEntry>,
    pub states: Vec<(String, DeviceState)>,
    /// DLQ entries rewritten in place, by `id` (a retry that failed again).
    pub dlq_updates: Vec<DlqEntry>,
    /// DLQ entries deleted (a retry that succeeded, a purge); unknown ids are ignored.
    pub dlq_removals: Vec<u64>,
    /// Automatic-retry schedule: the entry and its next retry (epoch ms), or `None` for none.
    pub dlq_schedule: Vec<(DlqRef, Option<i64>)>,
    /// Set by the store: entries evicted to keep the DLQ under its cap (`drop_oldest`).
    pub dlq_dropped: Vec<DlqEntry>,
    /// Devices whose tracked gaps changed: the new gaps, or `None` when none are left.
    pub gaps: Vec<(String, Option<DeviceGaps>)>,
    /// Missed records written (new or updated), by id (ids assigned by the pipeline).
    pub missed: BTreeMap<u64, MissedRecord>,
    /// Missed records deleted (every seq arrived late); unknown ids are ignored.
    pub missed_removals: BTreeSet<u64>,
    /// Seqs declared missed, and seqs of missed records filled late, in this commit.
    pub missed_declared_seqs: u64,
    pub missed_filled_late: u64,
    /// Set by the store: records evicted to keep under the cap (oldest first).
    pub missed_dropped: Vec<MissedRecord>,
    /// Results corrected at the edge in this commit (the correction history).
    pub corrections: Vec<(String, CorrectionMark)>,
}

/// The edge's correction history entry of one event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorrectionMark {
    pub reason: String,
    pub at: i64,
}

/// A DLQ entry in a [`Commit`]: an existing one, or the `i`-th of `Commit::dlq` (whose id the
/// commit assigns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqRef {
    Id(u64),
    New(usize),
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
            && self.dlq.is_empty()
            && self.states.is_empty()
            && self.dlq_updates.is_empty()
            && self.dlq_removals.is_empty()
            && self.dlq_schedule.is_empty()
            && self.gaps.is_empty()
            && self.missed.is_empty()
            && self.missed_removals.is_empty()
            && self.corrections.is_empty()
    }
}

pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// `data_dir/store`.
    path: PathBuf,
    syncer: sync::Syncer,
    counters: Counters,
    dlq_cap: DlqCap,
    /// Most missed records kept (the oldest go first).
    missed_cap: u64,
}

impl Store {
    /// Opens (or creates) the store under `data_dir/store`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("store");
        sync::reopen_guard(&path);
        let db = sled::Config::new()
            .path(&path)
            // Group commit flushes explicitly; the background flusher would only add fsyncs.
            .flush_every_ms(None)
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(|e| match e {
                // sled reports a held lock only through the message text.
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(path.clone())
                }
                other => StoreError::Sled {
                    path: path.clone(),
                    source: other,
                },
            })?;
        let tree = db.open_tree("pipeline")?;
        let syncer = sync::Syncer::open(&path).map_err(|source| StoreError::Sync {
            path: path.clone(),
            source,
        })?;
        let counters = match tree.get(key::named(key::META, COUNTERS))? {
            Some(v) => decode(&v, COUNTERS)?,
            None => Counters {
                next_edge_seq: 1,
                next_dlq_id: 1,
                ..Counters::default()
            },
        };
        let mut store = Store {
            db,
            tree,
            path,
            syncer,
            counters,
            dlq_cap: DlqCap::UNLIMITED,
            missed_cap: u64::MAX,
        };
        store.dlq_open()?;
        Ok(store)
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The queue view of the outbox, shared by the pipeline and the uplink.
    pub fn open_outbox(&self, cfg: OutboxConfig) -> Result<Outbox, StoreError> {
        Outbox::open(
            self.tree.clone(),
            cfg,
            self.counters.next_edge_seq - 1,
            self.counters.outbox_bytes,
        )
    }

    /// Assigns `edge_seq`s and DLQ ids, writes the batch atomically and flushes it to disk.
    /// Only after this returns may the batch's messages be acknowledged.
    pub fn commit(&mut self, commit: &mut Commit) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut next = self.counters;
        for r in &mut commit.results {
            r.edge_seq = next.next_edge_seq;
            next.next_edge_seq += 1;
            let bytes = proto::wire::encode(r);
            next.outbox_entries += 1;
            next.outbox_bytes += bytes.len() as u64;
            batch.insert(&key::numbered(key::OUTBOX, r.edge_seq)[..], bytes);
        }
        self.dlq_apply(&mut batch, &mut next, commit)?;
        for (device, state) in &commit.states {
            batch.insert(key::named(key::STATE, device), proto::wire::encode(state));
        }
        self.missed_apply(&mut batch, &mut next, commit)?;
        for (event_id, mark) in &commit.corrections {
            batch.insert(
                key::named(key::CORRECTED, event_id),
                proto::wire::encode(mark),
            );
            next.corrected += 1;
        }
        batch.insert(key::named(key::META, COUNTERS), proto::wire::encode(&next));
        self.tree.apply_batch(batch)?;
        self.flush()?;
        self.counters = next;
        Ok(())
    }

    /// Free space on the store's filesystem, as an unprivileged writer sees it.
    // The block counts are u32 on 32-bit ARM gateways, u64 here.
    #[allow(clippy::useless_conversion)]
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.path).map_err(std::io::Error::from)?;
        Ok(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
    }

    /// Remembers, durably, that a damaged store was moved aside (shown by `status`).
    pub fn record_quarantine(&self, q: &Quarantine) -> Result<(), StoreError> {
        let k = key::named(key::META, &format!("{QUARANTINE}{:020}", q.at));
        self.tree.insert(k, proto::wire::encode(q))?;
        self.flush()
    }

    /// Whether the edge corrected this event before (its correction history).
    pub fn corrected(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .contains_key(key::named(key::CORRECTED, event_id))?)
    }

    /// Makes everything written so far durable (the uplink's release marks are written
    /// without a flush of their own).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        if crate::fault::skip_sync() {
            return Ok(());
        }
        self.syncer.sync().map_err(|source| StoreError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// Every device's persisted engine state, for the engine to resume where it stopped.
    pub fn device_states(&self) -> Result<Vec<(String, DeviceState)>, StoreError> {
        self.tree
            .scan_prefix([key::STATE])
            .map(|kv| {
                let (k, v) = kv?;
                let device = String::from_utf8_lossy(&k[1..]).into_owned();
                let state = decode(&v, &device)?;
                Ok((device, state))
            })
            .collect()
    }

    /// Outbox entries in `edge_seq` order, starting at `from`.
    pub fn outbox(&self, from: u64) -> impl Iterator<Item = Result<EventResult, StoreError>> + '_ {
        self.numbered(key::OUTBOX, from)
    }

    /// DLQ entries in id order, starting at `from`.
    pub fn dlq(&self, from: u64) -> impl Iterator<Item = Result<DlqEntry, StoreError>> + '_ {
        self.numbered(key::DLQ, from)
    }

    fn numbered<T: DeserializeOwned>(
        &self,
        prefix: u8,
        from: u64,
    ) -> impl Iterator<Item = Result<T, StoreError>> + '_ {
        let end = key::numbered(prefix + 1, 0);
        self.tree
            .range(key::numbered(prefix, from)..end)
            .map(move |kv| {
                let (k, v) = kv?;
                decode(&v, &format!("{}{}", prefix as char, key::number_of(&k)))
            })
    }
}

// DLQ
/// A read-only view of the store for the admin socket and the CLI: a clone of the tree (sled is
/// thread-safe), so it reads what the pipeline committed without going through its thread.
#[derive(Clone)]
pub struct StoreReader {
    tree: sled::Tree,
}

impl StoreReader {
    /// Stores this data dir moved aside as damaged, oldest first.
    pub fn quarantines(&self) -> Result<Vec<Quarantine>, StoreError> {
        self.tree
            .scan_prefix(key::named(key::META, QUARANTINE))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&v, &String::from_utf8_lossy(&k))
            })
            .collect()
    }

    /// Reads and decodes every record; the first that fails is the error. What `store check`
    /// (the start-up probe) runs.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let mut report = CheckReport::default();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let name = || format!("{:?}", String::from_utf8_lossy(&k));
            match k.first() {
                Some(&key::OUTBOX) => {
                    decode::<EventResult>(&v, &name())?;
                    report.outbox += 1;
                }
                Some(&key::DLQ) => {
                    decode::<DlqEntry>(&v, &name())?;
                    report.dlq += 1;
                }
                Some(&key::STATE) => {
                    decode::<DeviceState>(&v, &name())?;
                    report.devices += 1;
                }
                Some(&key::MISSED) => {
                    decode::<MissedRecord>(&v, &name())?;
                }
                _ => {}
            }
            report.records += 1;
        }
        let c = self.counters()?;
        report.next_edge_seq = c.next_edge_seq;
        Ok(report)
    }

    /// Every outbox result and DLQ entry that can still be read, as JSON lines
    /// (`{"outbox": …}` / `{"dlq": …}`); unreadable records are counted, not fatal.
    pub fn salvage(&self, out: &mut dyn std::io::Write) -> std::io::Result<SalvageReport> {
        let mut report = SalvageReport::default();
        for kv in self.tree.iter() {
            let Ok((k, v)) = kv else {
                report.unreadable += 1;
                break;
            };
            let line = match k.first() {
                Some(&key::OUTBOX) => proto::wire::decode::<EventResult>(&v)
                    .map(|r| serde_json::json!({ "outbox": r })),
                Some(&key::DLQ) => {
                    proto::wire::decode::<DlqEntry>(&v).map(|e| serde_json::json!({ "dlq": e }))
                }
                _ => continue,
            };
            match line {
                Ok(line) => {
                    serde_json::to_writer(&mut *out, &line)?;
                    out.write_all(b"\n")?;
                    report.exported += 1;
                }
                Err(_) => report.unreadable += 1,
            }
        }
        Ok(report)
    }

    /// The counters as of the last commit.
    pub fn counters(&self) -> Result<Counters, StoreError> {
        match self.tree.get(key::named(key::META, COUNTERS))? {
            Some(v) => decode(&v, COUNTERS),
            None => Ok(Counters {
                next_edge_seq: 1,
                next_dlq_id: 1,
                ..Counters::default()
            }),
        }
    }

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

// Missed events
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

// Missed events
impl Store {
    /// The cap on stored missed records, applied from the next commit on (default: none).
    pub fn set_missed_cap(&mut self, cap: u64) {
        self.missed_cap = cap;
    }

    /// The missed-events part of [`Store::commit`]: tracked gaps, record writes and removals,
    /// then the cap (oldest records first).
    fn missed_apply(
        &self,
        batch: &mut sled::Batch,
        next: &mut Counters,
        commit: &mut Commit,
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
            commit.missed_dropped.extend(record);
        }
        Ok(())
    }
}

// DLQ
impl Store {
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            tree: self.tree.clone(),
        }
    }

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
    fn dlq_open(&mut self) -> Result<(), StoreError> {
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
    fn dlq_apply(
        &self,
        batch: &mut sled::Batch,
        next: &mut Counters,
        commit: &mut Commit,
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
        for d in &mut commit.dlq {
            d.id = next.next_dlq_id;
            next.next_dlq_id += 1;
            let bytes = proto::wire::encode(d);
            next.dlq_entries += 1;
            next.dlq_bytes += bytes.len() as u64;
            sizes.insert(d.id, bytes.len() as u64);
            batch.insert(&entry_key(d.id)[..], bytes);
        }
        for (r, at) in &commit.dlq_schedule {
            let id = match *r {
                DlqRef::Id(id) => id,
                DlqRef::New(i) => match commit.dlq.get(i) {
                    Some(d) => d.id,
                    None => continue,
                },
            };
            if gone.contains(&id) {
                continue;
            }
            match at {
                Some(t) => batch.insert(&retry_key(id)[..], proto::wire::encode(t)),
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
                commit.dlq_dropped.push(e);
            }
        }
        // A batch with more new entries than the cap holds: the oldest new ones go too.
        for d in &commit.dlq {
            if !cap.exceeded(next.dlq_entries, next.dlq_bytes) {
                break;
            }
            evict(d.id, sizes[&d.id], batch, next);
            commit.dlq_dropped.push(d.clone());
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        sync::closed(&self.path);
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8], key: &str) -> Result<T, StoreError> {
    proto::wire::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Stage, Status};

    fn result(device: &str, seq: u64) -> EventResult {
        EventResult {
            event_id: EventResult::event_id(device, &seq.to_string()),
            device: device.into(),
            event_type: "meter".into(),
            seq,
            ts: 1_764_000_000_000,
            gateway: "gw".into(),
            edge_seq: 0,
            input: Default::default(),
            result: Default::default(),
            calc_version: "meter-000000000000".into(),
            status: Status::Ok,
            flags: vec![],
            anomaly_score: 0.0,
            processed_at: 1_764_000_000_001,
            correction: None,
        }
    }

    fn dlq_entry(reason: &str) -> DlqEntry {
        DlqEntry {
            id: 0,
            event_id: None,
            device: Some("m1".into()),
            topic: "devices/m1/events/meter".into(),
            stage: Stage::Schema,
            reason: reason.into(),
            attempts: 1,
            first_seen: 1,
            last_seen: 1,
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn commit_assigns_gap_free_sequence_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            let mut c = Commit {
                results: vec![result("m1", 1), result("m1", 2)],
                dlq: vec![dlq_entry("data.kwh: missing")],
                ..Commit::default()
            };
            store.commit(&mut c).unwrap();
            assert_eq!(c.results[1].edge_seq, 2);
            let mut c = Commit {
                results: vec![result("m2", 1)],
                ..Commit::default()
            };
            store.commit(&mut c).unwrap();
            assert_eq!(c.results[0].edge_seq, 3);
        }
        let store = Store::open(dir.path()).unwrap();
        let seqs: Vec<u64> = store.outbox(0).map(|r| r.unwrap().edge_seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let counters = store.counters();
        assert_eq!(counters.next_edge_seq, 4);
        assert_eq!(counters.outbox_entries, 3);
        assert!(counters.outbox_bytes > 0);
        assert_eq!(counters.dlq_entries, 1);
        let dlq: Vec<DlqEntry> = store.dlq(0).map(|d| d.unwrap()).collect();
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].id, 1);
        assert_eq!(dlq[0].reason, "data.kwh: missing");
    }

    #[test]
    fn missed_records_are_reported_once_and_stale_marks_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let rec =
            |id| MissedRecord::new(id, "m1", engine::SeqRange::new(id * 10, id * 10 + 1), 1, 2);
        let mut c = Commit::default();
        for id in 1..=3 {
            c.missed.insert(id, rec(id));
        }
        store.commit(&mut c).unwrap();
        let reader = store.reader();
        let ids = |v: Vec<MissedRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(reader.missed_unreported(2).unwrap()), [1, 2]);
        reader.mark_missed_reported(&[1, 2]).unwrap();
        assert_eq!(ids(reader.missed_unreported(100).unwrap()), [3]);
        // Record 1 filled late (deleted): its mark goes with the next marking.
        let mut c = Commit::default();
        c.missed_removals.insert(1);
        store.commit(&mut c).unwrap();
        reader.mark_missed_reported(&[3]).unwrap();
        assert!(reader.missed_unreported(100).unwrap().is_empty());
        let marks = reader
            .tree
            .scan_prefix([key::MISSED_REPORTED])
            .map(|kv| key::number_of(&kv.unwrap().0))
            .collect::<Vec<_>>();
        assert_eq!(marks, [2, 3]);
    }

    #[test]
    fn a_second_process_gets_a_clear_locked_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path()).unwrap();
        // flock locks belong to the open file, so a second open conflicts even in-process.
        match Store::open(dir.path()) {
            Err(e @ StoreError::Locked(_)) => assert!(e.to_string().contains("in use")),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("a second open of a held store must fail"),
        }
    }
}
