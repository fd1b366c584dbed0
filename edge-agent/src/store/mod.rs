//! The durable store: outbox, local DLQ, device state and counters, in one sled tree.
//!
//! Everything a batch changes goes into one `sled::Batch`, which sled applies atomically, and
//! the batch is flushed before [`Store::commit`] returns (or, split in two, [`Store::apply`]
//! now and [`Durable::sync_through`] on the pipeline's commit stage). One tree with key prefixes (rather than
//! one tree per concept) is what makes the whole batch atomic without sled's slower
//! multi-tree transactions: after a crash a batch is either entirely there or entirely absent,
//! so a result, its device state and the gateway counters never disagree.
//!
//! Durability: a commit is flushed by sled and then synced by [`sync`] (`fdatasync` of sled's
//! log, `fsync` of the store directory), because sled's own flush stops at `sync_file_range`.
//! That survives a process crash and a power cut (`tests/powercut.rs`, torn writes included)
//! on a drive that honours flushes; a drive whose volatile write cache ignores them can still
//! lose the last commits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::DeviceState;
use proto::{DlqEntry, EventResult};

use crate::missed::{DeviceGaps, MissedRecord};

pub use dlq::DlqCap;
pub use outbox::{Outbox, OutboxConfig};
use serde::de::DeserializeOwned;

mod dlq;
pub(crate) mod key;
mod missed;
pub mod outbox;
pub mod quarantine;
pub mod salvage;
mod sync;
mod watermark;

pub use quarantine::Quarantine;
pub use sync::{Durable, SyncPoint};

/// Cloneable (the sources are shared), so one failure can both stop the pipeline and answer
/// the admin request that met it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store at {0} is in use by another process (is the agent running? stop it, or use its admin socket)"
    )]
    Locked(PathBuf),
    #[error("store at {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: Arc<sled::Error>,
    },
    #[error("store: {0}")]
    Io(Arc<sled::Error>),
    /// The filesystem is full (ENOSPC, or a quota): not damage. What was committed stays;
    /// the failed commit acknowledged nothing.
    #[error(
        "disk full: {0} (the store keeps everything committed so far; free some space on the data dir's filesystem)"
    )]
    NoSpace(#[source] Arc<std::io::Error>),
    #[error("store record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store at {path}: syncing to disk: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The store opened with less than it had committed (sled read its log as shorter than
    /// it was): damage, though sled itself reports none.
    #[error(
        "store at {path}: committed records are missing: it holds edge_seq up to {has_seq} and DLQ ids up to {has_dlq}, but had committed up to {had_seq} and {had_dlq} (watermark)"
    )]
    Lost {
        path: PathBuf,
        has_seq: u64,
        has_dlq: u64,
        had_seq: u64,
        had_dlq: u64,
    },
    /// A commit begun before another was written (a bug in the caller, caught before it
    /// could reuse an `edge_seq` or DLQ id).
    #[error("commit out of order: {what} {got} where {expected} was next")]
    Numbering {
        what: &'static str,
        expected: u64,
        got: u64,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if no_space(&io) => StoreError::NoSpace(Arc::new(io)),
            other => StoreError::Io(Arc::new(other)),
        }
    }
}

impl StoreError {
    /// A failed `fsync`/`fdatasync` of the store at `path`.
    fn sync(path: &Path, e: std::io::Error) -> StoreError {
        if no_space(&e) {
            StoreError::NoSpace(Arc::new(e))
        } else {
            StoreError::Sync {
                path: path.to_path_buf(),
                source: Arc::new(e),
            }
        }
    }
}

/// ENOSPC or EDQUOT: the disk (or the user's quota) is full.
fn no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded
}

/// Gateway-wide counters kept beside the data they count, so they survive restarts exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// The next outbox entry gets this `edge_seq` (starts at 1).
    pub next_edge_seq: u64,
    pub next_dlq_id: u64,
    /// Results ever appended to the outbox, and their encoded bytes. What is still pending is
    /// these minus what the uplink released: see [`crate::store::outbox::Outbox::depth`].
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

fn quarantine_key(at: i64) -> Vec<u8> {
    key::named(key::META, &format!("{QUARANTINE}{at:020}"))
}

/// What `store check` read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub records: u64,
    pub outbox: u64,
    pub dlq: u64,
    pub devices: u64,
    pub next_edge_seq: u64,
}

/// What one group commit writes. [`Store::begin`] starts one numbered from the store's head:
/// [`Commit::push_result`] and [`Commit::push_dlq`] give each new result its `edge_seq` and
/// each new DLQ entry its id, so the caller knows them before the commit and the store only
/// checks them.
#[derive(Debug, Default)]
pub struct Commit {
    next_edge_seq: u64,
    next_dlq_id: u64,
    results: Vec<EventResult>,
    dlq: Vec<DlqEntry>,
    pub states: Vec<(String, DeviceState)>,
    /// DLQ entries rewritten in place, by `id` (a retry that failed again).
    pub dlq_updates: Vec<DlqEntry>,
    /// DLQ entries deleted (a retry that succeeded, a purge); unknown ids are ignored.
    pub dlq_removals: Vec<u64>,
    /// Automatic-retry schedule: the entry's id and its next retry (epoch ms), or `None`.
    pub dlq_schedule: Vec<(u64, Option<i64>)>,
    /// Devices whose tracked gaps changed: the new gaps, or `None` when none are left.
    pub gaps: Vec<(String, Option<DeviceGaps>)>,
    /// Missed records written (new or updated), by id (ids assigned by the pipeline).
    pub missed: BTreeMap<u64, MissedRecord>,
    /// Missed records deleted (every seq arrived late); unknown ids are ignored.
    pub missed_removals: BTreeSet<u64>,
    /// Seqs declared missed, and seqs of missed records filled late, in this commit.
    pub missed_declared_seqs: u64,
    pub missed_filled_late: u64,
    /// Results corrected at the edge in this commit (the correction history).
    pub corrections: Vec<(String, CorrectionMark)>,
}

/// A commit written into sled but not yet synced ([`Store::apply`]).
#[derive(Debug)]
pub struct Applied {
    pub receipt: Committed,
    pub point: SyncPoint,
}

/// The receipt of a commit: where the outbox stands now and what the caps evicted to make it
/// fit. Once the commit is synced the outbox (and so the uplink) is told.
#[derive(Debug, Default)]
pub struct Committed {
    /// The last `edge_seq` in the outbox.
    pub head: u64,
    /// Encoded bytes ever appended to the outbox.
    pub outbox_bytes: u64,
    /// DLQ entries evicted to keep the DLQ under its cap (`drop_oldest`), oldest first.
    pub dlq_dropped: Vec<DlqEntry>,
    /// Missed records evicted to keep under their cap, oldest first.
    pub missed_dropped: Vec<MissedRecord>,
}

/// The edge's correction history entry of one event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorrectionMark {
    pub reason: String,
    pub at: i64,
}

impl Commit {
    /// Adds a result numbered with the next `edge_seq`, which it returns.
    pub fn push_result(&mut self, mut r: EventResult) -> u64 {
        r.edge_seq = self.next_edge_seq + self.results.len() as u64;
        let seq = r.edge_seq;
        self.results.push(r);
        seq
    }

    /// The new results, in `edge_seq` order.
    pub fn results(&self) -> &[EventResult] {
        &self.results
    }

    /// The new DLQ entries, in id order.
    pub fn dlq(&self) -> &[DlqEntry] {
        &self.dlq
    }

    /// Replaces the `i`-th new result (an edge correction), keeping its `edge_seq`.
    pub fn replace_result(&mut self, i: usize, mut r: EventResult) {
        r.edge_seq = self.results[i].edge_seq;
        self.results[i] = r;
    }

    /// Adds a DLQ entry numbered with the next id, which it returns.
    pub fn push_dlq(&mut self, mut e: DlqEntry) -> u64 {
        e.id = self.next_dlq_id + self.dlq.len() as u64;
        let id = e.id;
        self.dlq.push(e);
        id
    }

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
    tree: sled::Tree,
    /// `data_dir/store`.
    path: PathBuf,
    /// Syncs commits, then tells the watermark and the outbox (the uplink waits on it).
    durable: Arc<Durable>,
    /// The numbering of the last applied commit (synced or not).
    counters: Counters,
    dlq_cap: DlqCap,
    /// Most missed records kept (the oldest go first).
    missed_cap: u64,
}

impl Store {
    /// Opens (or creates) the store under `data_dir/store`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(data_dir, true)
    }

    /// Opens a damaged store to read what is left (`store salvage`): a store behind its
    /// watermark is read all the same, and the watermark is left as it was.
    pub fn open_for_salvage(data_dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(data_dir, false)
    }

    fn open_with(data_dir: &Path, trust_watermark: bool) -> Result<Store, StoreError> {
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
                sled::Error::Io(io) if no_space(&io) => StoreError::NoSpace(Arc::new(io)),
                other => StoreError::Sled {
                    path: path.clone(),
                    source: Arc::new(other),
                },
            })?;
        let tree = db.open_tree("pipeline")?;
        let syncer = sync::Syncer::open(&path).map_err(|e| StoreError::sync(&path, e))?;
        let counters = match tree.get(key::named(key::META, COUNTERS))? {
            Some(v) => decode(&v, COUNTERS)?,
            None => Counters {
                next_edge_seq: 1,
                next_dlq_id: 1,
                ..Counters::default()
            },
        };
        let (watermark, had) =
            watermark::Watermark::open(&path).map_err(|e| StoreError::sync(&path, e))?;
        let has = watermark::Mark {
            next_edge_seq: counters.next_edge_seq,
            next_dlq_id: counters.next_dlq_id,
        };
        match had {
            _ if !trust_watermark => {}
            Some(had) if !has.covers(had) => {
                return Err(StoreError::Lost {
                    path,
                    has_seq: has.next_edge_seq - 1,
                    has_dlq: has.next_dlq_id - 1,
                    had_seq: had.next_edge_seq - 1,
                    had_dlq: had.next_dlq_id - 1,
                });
            }
            Some(had) if had == has => {}
            _ => watermark.set(has).map_err(|e| StoreError::sync(&path, e))?,
        }
        let at = SyncPoint {
            mark: has,
            outbox_bytes: counters.outbox_bytes,
        };
        let durable = Arc::new(Durable::new(db, syncer, path.clone(), watermark, at));
        let mut store = Store {
            tree,
            path,
            durable,
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
    pub fn open_outbox(&mut self, cfg: OutboxConfig) -> Result<Outbox, StoreError> {
        let outbox = Outbox::open(
            self.tree.clone(),
            cfg,
            self.counters.next_edge_seq - 1,
            self.counters.outbox_bytes,
        )?;
        self.durable.set_outbox(outbox.clone());
        Ok(outbox)
    }

    /// A new commit, numbered from the store's head.
    pub fn begin(&self) -> Commit {
        Commit {
            next_edge_seq: self.counters.next_edge_seq,
            next_dlq_id: self.counters.next_dlq_id,
            ..Commit::default()
        }
    }

    /// Writes the commit atomically and makes it durable, then tells the outbox. Only after
    /// this returns may the commit's messages be acknowledged.
    pub fn commit(&mut self, commit: &Commit) -> Result<Committed, StoreError> {
        let applied = self.apply(commit)?;
        self.durable.sync_through(applied.point)?;
        Ok(applied.receipt)
    }

    /// Writes the commit atomically into sled, not yet durable: nothing in it may be
    /// acknowledged before [`Durable::sync_through`] of its point returned. The pipeline's
    /// commit stage syncs on a thread of its own, so the engine runs on the next batch
    /// meanwhile; commits applied later are numbered after this one all the same.
    pub fn apply(&mut self, commit: &Commit) -> Result<Applied, StoreError> {
        self.check_numbering(commit)?;
        let mut batch = sled::Batch::default();
        let mut next = self.counters;
        let mut receipt = Committed::default();
        for r in &commit.results {
            next.next_edge_seq += 1;
            let bytes = proto::wire::encode(r);
            next.outbox_entries += 1;
            next.outbox_bytes += bytes.len() as u64;
            batch.insert(&key::numbered(key::OUTBOX, r.edge_seq)[..], bytes);
        }
        self.dlq_apply(&mut batch, &mut next, commit, &mut receipt.dlq_dropped)?;
        for (device, state) in &commit.states {
            batch.insert(key::named(key::STATE, device), proto::wire::encode(state));
        }
        self.missed_apply(&mut batch, &mut next, commit, &mut receipt.missed_dropped)?;
        for (event_id, mark) in &commit.corrections {
            batch.insert(
                key::named(key::CORRECTED, event_id),
                proto::wire::encode(mark),
            );
            next.corrected += 1;
        }
        batch.insert(key::named(key::META, COUNTERS), proto::wire::encode(&next));
        self.tree.apply_batch(batch)?;
        self.counters = next;
        receipt.head = next.next_edge_seq - 1;
        receipt.outbox_bytes = next.outbox_bytes;
        let point = SyncPoint {
            mark: watermark::Mark {
                next_edge_seq: next.next_edge_seq,
                next_dlq_id: next.next_dlq_id,
            },
            outbox_bytes: next.outbox_bytes,
        };
        Ok(Applied { receipt, point })
    }

    /// What syncs this store's commits (the pipeline's commit stage holds it).
    pub fn durable(&self) -> Arc<Durable> {
        Arc::clone(&self.durable)
    }

    /// New results and DLQ entries must continue the store's numbering without a gap: a
    /// commit begun before another one was written would reuse its numbers.
    fn check_numbering(&self, commit: &Commit) -> Result<(), StoreError> {
        let numbered = |what, first: u64, got: &mut dyn Iterator<Item = u64>| {
            for (i, n) in got.enumerate() {
                let expected = first + i as u64;
                if n != expected {
                    return Err(StoreError::Numbering {
                        what,
                        expected,
                        got: n,
                    });
                }
            }
            Ok(())
        };
        numbered(
            "edge_seq",
            self.counters.next_edge_seq,
            &mut commit.results.iter().map(|r| r.edge_seq),
        )?;
        numbered(
            "DLQ id",
            self.counters.next_dlq_id,
            &mut commit.dlq.iter().map(|e| e.id),
        )
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
        self.tree
            .insert(quarantine_key(q.at), proto::wire::encode(q))?;
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
        self.durable.flush()
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

    /// Quarantines the cloud has not been told of, oldest first.
    pub fn quarantines_unreported(&self) -> Result<Vec<Quarantine>, StoreError> {
        let mut all = self.quarantines()?;
        all.retain(|q| !q.reported);
        Ok(all)
    }

    /// Marks these quarantines (by `at`) reported: the cloud broker acknowledged them. Not
    /// synced: a mark lost in a power cut only means one more report.
    pub fn mark_quarantines_reported(&self, ats: &[i64]) -> Result<(), StoreError> {
        for q in self.quarantines()? {
            if ats.contains(&q.at) && !q.reported {
                let k = quarantine_key(q.at);
                let marked = Quarantine {
                    reported: true,
                    ..q
                };
                self.tree.insert(k, proto::wire::encode(&marked))?;
            }
        }
        Ok(())
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
}

impl Store {
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            tree: self.tree.clone(),
        }
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

    /// A plain result (also the outbox tests' fixture).
    pub(super) fn result(device: &str, seq: u64) -> EventResult {
        EventResult {
            event_id: EventResult::event_id(device, &seq.to_string()),
            device: device.into(),
            event_type: "meter".into(),
            seq,
            ts: 1_764_000_000_000,
            gateway: "gw".into(),
            via: proto::Via::Gateway,
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

    pub(super) fn dlq_entry(reason: &str) -> DlqEntry {
        DlqEntry {
            id: 0,
            event_id: None,
            device: Some("m1".into()),
            topic: "devices/m1/events/meter".into(),
            stage: Stage::Schema,
            reason: reason.into(),
            subject: None,
            attempts: 1,
            first_seen: 1,
            last_seen: 1,
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_store_that_lost_its_log_is_not_taken_for_an_empty_one() {
        let (had, empty) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        {
            let mut store = Store::open(had.path()).unwrap();
            let mut c = store.begin();
            c.push_result(result("m1", 1));
            c.push_dlq(dlq_entry("data.kwh: missing"));
            store.commit(&c).unwrap();
        }
        drop(Store::open(empty.path()).unwrap());
        // sled's files say "empty", the watermark says one result and one DLQ entry.
        std::fs::copy(
            had.path().join("store/watermark"),
            empty.path().join("store/watermark"),
        )
        .unwrap();
        match Store::open(empty.path()) {
            Err(e @ StoreError::Lost { .. }) => {
                assert!(e.to_string().contains("up to 0"), "{e}");
            }
            Err(e) => panic!("expected Lost, got {e}"),
            Ok(_) => panic!("expected Lost, got an open store"),
        }
        // Salvage still reads what is there; the sound store reopens as before.
        drop(Store::open_for_salvage(empty.path()).unwrap());
        assert_eq!(Store::open(had.path()).unwrap().counters().next_edge_seq, 2);
    }

    #[test]
    fn a_full_disk_is_told_apart_from_damage() {
        let enospc = || std::io::Error::from_raw_os_error(28);
        assert!(matches!(
            StoreError::from(sled::Error::Io(enospc())),
            StoreError::NoSpace(_)
        ));
        assert!(matches!(
            StoreError::sync(Path::new("s"), enospc()),
            StoreError::NoSpace(_)
        ));
        let eio = std::io::Error::from_raw_os_error(5);
        assert!(matches!(
            StoreError::from(sled::Error::Io(eio)),
            StoreError::Io(_)
        ));
    }

    #[test]
    fn commit_assigns_gap_free_sequence_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path()).unwrap();
            let mut c = store.begin();
            assert_eq!(c.push_result(result("m1", 1)), 1);
            assert_eq!(c.push_result(result("m1", 2)), 2);
            assert_eq!(c.push_dlq(dlq_entry("data.kwh: missing")), 1);
            assert_eq!(store.commit(&c).unwrap().head, 2);
            let mut c = store.begin();
            assert_eq!(c.push_result(result("m2", 1)), 3);
            store.commit(&c).unwrap();
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
        store.commit(&c).unwrap();
        let reader = store.reader();
        let ids = |v: Vec<MissedRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(reader.missed_unreported(2).unwrap()), [1, 2]);
        reader.mark_missed_reported(&[1, 2]).unwrap();
        assert_eq!(ids(reader.missed_unreported(100).unwrap()), [3]);
        // Record 1 filled late (deleted): its mark goes with the next marking.
        let mut c = Commit::default();
        c.missed_removals.insert(1);
        store.commit(&c).unwrap();
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
