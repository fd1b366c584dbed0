//! The syncs sled 0.34 leaves out of a durable commit.
//!
//! sled's `flush` ends in `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)` on Linux: the pages
//! go to the device queue, but neither the drive's write cache nor the file's metadata (its
//! grown size) is committed, and no directory is ever synced. A power cut then loses every
//! acknowledged message since start-up (`tests/powercut.rs` shows it with this module turned
//! off). So the store keeps its own handles on sled's log file and directory and ends each
//! group commit with `fdatasync(db)` + `fsync(store/)`; at open it syncs every file and
//! directory sled may have created, up to the data dir's parent.
//!
//! [`Durable`] is where that happens for every commit, on whichever thread syncs it.
//!
//! Also here: in-process reopening. sled releases its file lock when the last handle to the
//! database drops, which may be a background thread a moment after the `Store` is dropped;
//! [`reopen_guard`] waits for that release instead of failing with `Locked`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::StoreError;
use super::outbox::Outbox;
use super::watermark::{Mark, Watermark};

/// sled's log (and heap) file inside the store directory, the one its lock is taken on.
const LOG_FILE: &str = "db";

/// Handles that make a flushed sled commit durable.
pub(super) struct Syncer {
    log: File,
    dir: File,
}

impl Syncer {
    /// Syncs what sled created under `store_dir` (files, `blobs/`, the directory entries up to
    /// `store_dir`'s grandparent) and keeps the handles the commits sync.
    pub(super) fn open(store_dir: &Path) -> io::Result<Syncer> {
        sync_dir_tree(store_dir)?;
        let dir = File::open(store_dir)?;
        let mut up = store_dir.parent();
        for _ in 0..2 {
            let Some(parent) = up.filter(|p| !p.as_os_str().is_empty()) else {
                break;
            };
            File::open(parent)?.sync_all()?;
            up = parent.parent();
        }
        Ok(Syncer {
            log: File::open(store_dir.join(LOG_FILE))?,
            dir,
        })
    }

    /// After `sled::Db::flush`: the log's data and size, and the directory (a snapshot sled
    /// renamed into place, a blob it created).
    pub(super) fn sync(&self) -> io::Result<()> {
        self.log.sync_data()?;
        self.dir.sync_all()
    }
}

/// How far a commit applied to sled reaches: what [`Durable::sync_through`] publishes once
/// it is on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPoint {
    pub(super) mark: Mark,
    /// Encoded bytes ever appended to the outbox by then.
    pub(super) outbox_bytes: u64,
}

/// Makes applied commits durable and only then tells the readers (the watermark, the
/// outbox and so the uplink). Shared by the store's own commits and the pipeline's commit
/// stage, which syncs on a thread of its own while the engine runs on the next batch.
///
/// Invariant: what the watermark and the outbox's head say was committed has been synced;
/// neither ever moves back.
pub struct Durable {
    db: sled::Db,
    syncer: Syncer,
    path: PathBuf,
    watermark: Watermark,
    /// The furthest point published.
    synced: Mutex<SyncPoint>,
    outbox: OnceLock<Outbox>,
}

impl Durable {
    pub(super) fn new(
        db: sled::Db,
        syncer: Syncer,
        path: PathBuf,
        watermark: Watermark,
        at: SyncPoint,
    ) -> Durable {
        Durable {
            db,
            syncer,
            path,
            watermark,
            synced: Mutex::new(at),
            outbox: OnceLock::new(),
        }
    }

    /// The outbox told of each durable commit (the store opens it after itself).
    pub(super) fn set_outbox(&self, outbox: Outbox) {
        // A second outbox of one store would be a second queue view of the same tree.
        let _ = self.outbox.set(outbox);
    }

    /// Makes everything applied so far durable: sled's flush, then the syncs it leaves out.
    pub fn flush(&self) -> Result<(), StoreError> {
        let slow = crate::fault::slow_sync();
        if !slow.is_zero() {
            std::thread::sleep(slow);
        }
        self.db.flush()?;
        if crate::fault::skip_sync() {
            return Ok(());
        }
        self.syncer
            .sync()
            .map_err(|e| StoreError::sync(&self.path, e))
    }

    /// Syncs (everything applied so far, so also `point`'s commit) and then publishes
    /// `point` unless a later one was published meanwhile. Only after this returns may the
    /// commit's messages be acknowledged.
    pub fn sync_through(&self, point: SyncPoint) -> Result<(), StoreError> {
        self.flush()?;
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if synced.mark != point.mark && synced.mark.covers(point.mark) {
            return Ok(()); // behind what another sync published
        }
        if synced.mark != point.mark {
            self.watermark
                .set(point.mark)
                .map_err(|e| StoreError::sync(&self.path, e))?;
        }
        *synced = point;
        if let Some(outbox) = self.outbox.get() {
            outbox.committed(point.mark.next_edge_seq - 1, point.outbox_bytes);
        }
        Ok(())
    }
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

/// Store directories this process closed: their lock may still be held by one of sled's
/// threads for a moment.
static CLOSED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// How long a reopen waits for this process's own sled threads to let go of the lock. Far
/// beyond what they take (they finish the write in hand); a lock still held then belongs to
/// something else and is reported as `Locked`.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Marks `store_dir` as closed by this process (called when the `Store` drops).
pub(super) fn closed(store_dir: &Path) {
    CLOSED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(store_dir.to_path_buf());
}

/// Before sled opens `store_dir`: if this process closed it, waits until sled's lock on it is
/// released (so a reopen never races sled's background threads).
pub(super) fn reopen_guard(store_dir: &Path) {
    let was_closed = CLOSED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(store_dir);
    if !was_closed {
        return;
    }
    let Ok(log) = File::open(store_dir.join(LOG_FILE)) else {
        return;
    };
    let until = Instant::now() + RELEASE_WAIT;
    // flock locks belong to the open file description, so ours conflicts with sled's.
    while log.try_lock().is_err() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = log.unlock();
}
