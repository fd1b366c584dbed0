//! The three candidate engines (and the no-sync control) behind one small trait: an atomic,
//! durable commit of outbox records + a device state + the counter, and a full scan for
//! `verify`. Every engine keeps one keyspace/table/tree, as the agent keeps one sled tree.

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::{Result, bail};

/// One atomic batch, shaped like the agent's `Commit`: N outbox records, one device's state,
/// and the counter (the next sequence number).
pub struct Commit<'a> {
    pub records: &'a [(u64, Vec<u8>)],
    pub device: u32,
    pub state: &'a [u8],
    pub next_seq: u64,
}

/// What `verify` reads back.
pub struct Scan {
    /// Outbox records by sequence number, in key order.
    pub records: Vec<(u64, Vec<u8>)>,
    /// The counter, if one was ever committed.
    pub next_seq: Option<u64>,
}

pub trait Store {
    /// Returns once the batch is durable (this is what "acked" means).
    fn commit(&mut self, commit: &Commit<'_>) -> Result<()>;
    fn scan(&self) -> Result<Scan>;
}

const OUTBOX: u8 = b'o';
const STATE: u8 = b's';
const COUNTER: &[u8] = b"m/next_seq";

fn outbox_key(seq: u64) -> [u8; 9] {
    let mut k = [OUTBOX; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn state_key(device: u32) -> [u8; 5] {
    let mut k = [STATE; 5];
    k[1..].copy_from_slice(&device.to_be_bytes());
    k
}

/// Sorts one scanned key/value pair into `scan`.
fn collect(scan: &mut Scan, key: &[u8], value: &[u8]) -> Result<()> {
    if key == COUNTER {
        let Ok(bytes) = <[u8; 8]>::try_from(value) else {
            bail!("counter has {} bytes, not 8", value.len());
        };
        scan.next_seq = Some(u64::from_be_bytes(bytes));
    } else if key.first() == Some(&OUTBOX) {
        let Ok(bytes) = <[u8; 8]>::try_from(&key[1..]) else {
            bail!("outbox key of {} bytes", key.len());
        };
        scan.records
            .push((u64::from_be_bytes(bytes), value.to_vec()));
    }
    Ok(())
}

/// The engines this binary was built with (cargo features), by CLI name.
pub fn names() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "sled") {
        v.extend(["sled", "sled-nosync"]);
    }
    if cfg!(feature = "redb") {
        v.push("redb");
    }
    if cfg!(feature = "fjall") {
        v.push("fjall");
    }
    v
}

/// Opens (creating if needed) the store `engine` keeps in `dir`.
///
/// Every engine gets the same one-time sync at open that the agent's `Syncer::open` does for
/// sled (every file and directory under `dir`, and `dir`'s parent): making the store's own
/// directory entry durable is the integrator's job whatever the engine. Per commit, only
/// `sled` adds syncs of its own; redb and fjall rely on their own durability modes.
pub fn open(engine: &str, dir: &Path) -> Result<Box<dyn Store>> {
    std::fs::create_dir_all(dir)?;
    let store: Box<dyn Store> = match engine {
        #[cfg(feature = "sled")]
        "sled" => Box::new(sled_engine::SledStore::open(dir, true)?),
        #[cfg(feature = "sled")]
        "sled-nosync" => Box::new(sled_engine::SledStore::open(dir, false)?),
        #[cfg(feature = "redb")]
        "redb" => Box::new(redb_engine::RedbStore::open(dir)?),
        #[cfg(feature = "fjall")]
        "fjall" => Box::new(fjall_engine::FjallStore::open(dir)?),
        other => bail!(
            "unknown engine {other:?} (built with: {})",
            names().join(", ")
        ),
    };
    sync_dir_tree(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    Ok(store)
}

fn sync_dir_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_dir_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

#[cfg(feature = "sled")]
mod sled_engine {
    //! sled 0.34 as the agent runs it (`edge-agent/src/store`): explicit flush per commit, no
    //! background flusher, 8 MiB cache, then (unless the control) `fdatasync` of the log and
    //! `fsync` of the directory, because sled's flush stops at `sync_file_range`.

    use super::*;

    pub struct SledStore {
        db: sled::Db,
        tree: sled::Tree,
        /// `None` for the control: sled's flush alone.
        syncer: Option<(File, File)>,
    }

    impl SledStore {
        pub fn open(dir: &Path, sync: bool) -> Result<SledStore> {
            let db = sled::Config::new()
                .path(dir)
                .flush_every_ms(None)
                .cache_capacity(8 * 1024 * 1024)
                .open()?;
            let tree = db.open_tree("pipeline")?;
            let syncer = if sync {
                Some((File::open(dir.join("db"))?, File::open(dir)?))
            } else {
                None
            };
            Ok(SledStore { db, tree, syncer })
        }
    }

    impl Store for SledStore {
        fn commit(&mut self, c: &Commit<'_>) -> Result<()> {
            let mut batch = sled::Batch::default();
            for (seq, value) in c.records {
                batch.insert(&outbox_key(*seq), value.as_slice());
            }
            batch.insert(&state_key(c.device), c.state);
            batch.insert(COUNTER, &c.next_seq.to_be_bytes());
            self.tree.apply_batch(batch)?;
            self.db.flush()?;
            if let Some((log, dir)) = &self.syncer {
                log.sync_data()?;
                dir.sync_all()?;
            }
            Ok(())
        }

        fn scan(&self) -> Result<Scan> {
            let mut scan = Scan {
                records: Vec::new(),
                next_seq: None,
            };
            for kv in self.tree.iter() {
                let (k, v) = kv?;
                collect(&mut scan, &k, &v)?;
            }
            Ok(scan)
        }
    }
}

#[cfg(feature = "redb")]
mod redb_engine {
    //! redb: one file, copy-on-write B-tree, `Durability::Immediate` (its default) per write
    //! transaction.

    use super::*;
    use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

    const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pipeline");

    pub struct RedbStore {
        db: Database,
    }

    impl RedbStore {
        pub fn open(dir: &Path) -> Result<RedbStore> {
            let db = Database::create(dir.join("store.redb"))?;
            // The table exists from the first open on, so a scan never meets "no such table".
            let tx = db.begin_write()?;
            tx.open_table(TABLE)?;
            tx.commit()?;
            Ok(RedbStore { db })
        }
    }

    impl Store for RedbStore {
        fn commit(&mut self, c: &Commit<'_>) -> Result<()> {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut table = tx.open_table(TABLE)?;
                for (seq, value) in c.records {
                    table.insert(outbox_key(*seq).as_slice(), value.as_slice())?;
                }
                table.insert(state_key(c.device).as_slice(), c.state)?;
                table.insert(COUNTER, c.next_seq.to_be_bytes().as_slice())?;
            }
            tx.commit()?;
            Ok(())
        }

        fn scan(&self) -> Result<Scan> {
            let mut scan = Scan {
                records: Vec::new(),
                next_seq: None,
            };
            let tx = self.db.begin_read()?;
            let table = tx.open_table(TABLE)?;
            for kv in table.iter()? {
                let (k, v) = kv?;
                collect(&mut scan, k.value(), v.value())?;
            }
            Ok(scan)
        }
    }
}

#[cfg(feature = "fjall")]
mod fjall_engine {
    //! fjall: LSM tree with a journal; each commit is one `WriteBatch` persisted with
    //! `PersistMode::SyncAll` (fsync of the journal) before it returns.

    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct FjallStore {
        db: Database,
        ks: Keyspace,
    }

    impl FjallStore {
        pub fn open(dir: &Path) -> Result<FjallStore> {
            let db = Database::builder(dir).open()?;
            let ks = db.keyspace("pipeline", KeyspaceCreateOptions::default)?;
            Ok(FjallStore { db, ks })
        }
    }

    impl Store for FjallStore {
        fn commit(&mut self, c: &Commit<'_>) -> Result<()> {
            let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
            for (seq, value) in c.records {
                batch.insert(&self.ks, outbox_key(*seq).as_slice(), value.as_slice());
            }
            batch.insert(&self.ks, state_key(c.device).as_slice(), c.state);
            batch.insert(&self.ks, COUNTER, c.next_seq.to_be_bytes().as_slice());
            batch.commit()?;
            Ok(())
        }

        fn scan(&self) -> Result<Scan> {
            let mut scan = Scan {
                records: Vec::new(),
                next_seq: None,
            };
            for guard in self.ks.iter() {
                let (k, v) = guard.into_inner()?;
                collect(&mut scan, &k, &v)?;
            }
            Ok(scan)
        }
    }
}
