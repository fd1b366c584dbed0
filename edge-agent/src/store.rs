//! The durable store: outbox, local DLQ, device state and counters, in one sled tree.
//!
//! Everything a batch changes goes into one `sled::Batch`, which sled applies atomically, and
//! the batch is flushed before [`Store::commit`] returns. One tree with key prefixes (rather than
//! one tree per concept) is what makes the whole batch atomic without sled's slower
//! multi-tree transactions: after a crash a batch is either entirely there or entirely absent,
//! so a result, its device state and the gateway counters never disagree.
//!
//! Durability, honestly: `flush` writes sled's log and calls `fsync`, which survives a process
//! crash (`kill -9`) and an OS crash on a drive that honours flushes. A drive with a volatile
//! write cache that ignores flush requests can still lose the last writes on a power cut.

use std::path::{Path, PathBuf};

use engine::DeviceState;
use proto::{DlqEntry, EventResult};
use serde::de::DeserializeOwned;

/// Key prefixes of the one tree. Keys sort by prefix, then big-endian number or name.
mod key {
    pub const OUTBOX: u8 = b'o';
    pub const DLQ: u8 = b'q';
    pub const STATE: u8 = b's';
    pub const META: u8 = b'm';

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
}

/// Gateway-wide counters kept beside the data they count, so they survive restarts exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// The next outbox entry gets this `edge_seq` (starts at 1).
    pub next_edge_seq: u64,
    pub next_dlq_id: u64,
    pub outbox_entries: u64,
    pub outbox_bytes: u64,
    pub dlq_entries: u64,
}

const COUNTERS: &str = "counters";

/// What one group commit writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// `edge_seq` is assigned by the store, in order.
    pub results: Vec<EventResult>,
    /// `id` is assigned by the store.
    pub dlq: Vec<DlqEntry>,
    pub states: Vec<(String, DeviceState)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.results.is_empty() && self.dlq.is_empty() && self.states.is_empty()
    }
}

pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    counters: Counters,
}

impl Store {
    /// Opens (or creates) the store under `data_dir/store`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("store");
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
        let counters = match tree.get(key::named(key::META, COUNTERS))? {
            Some(v) => decode(&v, COUNTERS)?,
            None => Counters {
                next_edge_seq: 1,
                next_dlq_id: 1,
                ..Counters::default()
            },
        };
        Ok(Store { db, tree, counters })
    }

    pub fn counters(&self) -> Counters {
        self.counters
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
        for d in &mut commit.dlq {
            d.id = next.next_dlq_id;
            next.next_dlq_id += 1;
            next.dlq_entries += 1;
            batch.insert(&key::numbered(key::DLQ, d.id)[..], proto::wire::encode(d));
        }
        for (device, state) in &commit.states {
            batch.insert(key::named(key::STATE, device), proto::wire::encode(state));
        }
        batch.insert(key::named(key::META, COUNTERS), proto::wire::encode(&next));
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.counters = next;
        Ok(())
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
                states: vec![],
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
