//! The outbox as a queue: results waiting for the cloud, a replay window of sent ones, and the
//! disk cap with its policy.
//!
//! The pipeline appends (inside its group commit, see [`crate::store`]) and announces each
//! commit here; the uplink reads pending results in `edge_seq` order and releases them once the
//! cloud broker acknowledged them. Released results stay as a replay window (the cloud may ask
//! for a range again) and are trimmed behind it. Release marks are written without a flush:
//! the next group commit's flush makes them durable, and losing one to a crash only means a
//! range is sent twice, which the cloud de-duplicates by `event_id`.
//!
//! Invariant: a result leaves the pending range only by an acknowledgement from the cloud
//! broker, by `drop_oldest` (counted exactly in `edge_outbox_dropped_total`) or by growing
//! older than `max_age_s` (counted exactly in `edge_outbox_expired_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{StoreError, key};
use crate::telemetry as m;

/// What to do when pending results reach `max_bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Stop taking device messages (they stay unacknowledged on the devices) until the
    /// uplink frees space. Nothing is lost; devices see back-pressure.
    #[default]
    Block,
    /// Delete the oldest pending results to make room, counting each one.
    DropOldest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Cap on the encoded size of pending (not yet acknowledged) results.
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    /// Sent results kept so the cloud can ask for them again (`gateways/{id}/replay`).
    pub replay_window: u64,
    /// Pending results older than this (since they were processed) are dropped, counted
    /// and logged: data worth nothing after a while, said so in the config. None: kept.
    pub max_age_s: Option<u64>,
}

impl OutboxConfig {
    /// `max_age_s` in milliseconds.
    pub fn max_age_ms(&self) -> Option<i64> {
        self.max_age_s
            .map(|s| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX))
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: 1 << 30,
            full_policy: FullPolicy::Block,
            replay_window: 100_000,
            max_age_s: None,
        }
    }
}

/// The uplink's progress, persisted under the meta key `uplink`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Released {
    /// Every result up to here was acknowledged by the cloud broker (or dropped).
    through: u64,
    bytes: u64,
    dropped: u64,
    /// First `edge_seq` still stored (the replay window starts here).
    window_from: u64,
    /// Dropped for their age (`max_age_s`), ever.
    #[serde(default)]
    expired: u64,
}

const RELEASED: &str = "uplink";

/// Pending results' size, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub entries: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// Dropped for their age (`max_age_s`), ever.
    pub expired: u64,
    /// Last committed `edge_seq`.
    pub head: u64,
    pub acked_through: u64,
}

/// A cheap, cloneable handle shared by the pipeline and the uplink.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Tree,
    cfg: OutboxConfig,
    /// Last committed `edge_seq` and total bytes ever appended, published after each commit.
    head: AtomicU64,
    appended_bytes: AtomicU64,
    released: Mutex<Released>,
    /// Signalled when pending space is freed (the `block` policy waits on it).
    freed: Condvar,
    /// Signalled after each commit (the uplink waits on it).
    appended: tokio::sync::Notify,
}

impl Outbox {
    /// `head` and `appended_bytes` are the store's counters at start-up.
    pub(crate) fn open(
        tree: sled::Tree,
        cfg: OutboxConfig,
        head: u64,
        appended_bytes: u64,
    ) -> Result<Outbox, StoreError> {
        let released = match tree.get(key::named(key::META, RELEASED))? {
            Some(v) => proto::wire::decode(&v).map_err(|e| StoreError::Corrupt {
                key: RELEASED.into(),
                reason: e.to_string(),
            })?,
            None => Released {
                window_from: 1,
                ..Released::default()
            },
        };
        let outbox = Outbox {
            inner: Arc::new(Inner {
                tree,
                cfg,
                head: AtomicU64::new(head),
                appended_bytes: AtomicU64::new(appended_bytes),
                released: Mutex::new(released),
                freed: Condvar::new(),
                appended: tokio::sync::Notify::new(),
            }),
        };
        outbox.publish_gauges();
        Ok(outbox)
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.inner.cfg
    }

    pub fn depth(&self) -> Depth {
        let r = *self.released();
        let head = self.inner.head.load(Ordering::Acquire);
        Depth {
            entries: head.saturating_sub(r.through),
            bytes: self
                .inner
                .appended_bytes
                .load(Ordering::Acquire)
                .saturating_sub(r.bytes),
            dropped: r.dropped,
            expired: r.expired,
            head,
            acked_through: r.through,
        }
    }

    /// Called once a commit that appended up to `head` is durable (`store::Durable`).
    pub(crate) fn committed(&self, head: u64, appended_bytes: u64) {
        self.inner.head.store(head, Ordering::Release);
        self.inner
            .appended_bytes
            .store(appended_bytes, Ordering::Release);
        self.inner.appended.notify_one();
        self.publish_gauges();
    }

    /// Resolves after the next commit (or at once if one happened since the last call).
    pub async fn wait_appended(&self) {
        self.inner.appended.notified().await
    }

    /// Applies the cap before a commit: waits for space (`block`) or drops the oldest pending
    /// results (`drop_oldest`). Returns how long intake was blocked.
    pub(crate) fn make_room(&self) -> Result<Duration, StoreError> {
        let cap = self.inner.cfg.max_bytes;
        if self.depth().bytes < cap {
            return Ok(Duration::ZERO);
        }
        match self.inner.cfg.full_policy {
            FullPolicy::DropOldest => {
                // Down to 90 % so the next batches do not each drop a few.
                self.drop_oldest(cap / 10 * 9)?;
                Ok(Duration::ZERO)
            }
            FullPolicy::Block => {
                let started = std::time::Instant::now();
                metrics::gauge!(m::OUTBOX_BLOCKED).set(1.0);
                tracing::warn!(
                    max_bytes = cap,
                    "outbox full: intake blocked until the uplink frees space"
                );
                let mut released = self.released();
                while self.pending_bytes(&released) >= cap {
                    released = self
                        .inner
                        .freed
                        .wait_timeout(released, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                metrics::gauge!(m::OUTBOX_BLOCKED).set(0.0);
                Ok(started.elapsed())
            }
        }
    }

    fn pending_bytes(&self, r: &Released) -> u64 {
        self.inner
            .appended_bytes
            .load(Ordering::Acquire)
            .saturating_sub(r.bytes)
    }

    /// Deletes the oldest pending results until at most `target` bytes are pending.
    fn drop_oldest(&self, target: u64) -> Result<(), StoreError> {
        let mut r = self.released();
        let mut pending = self.pending_bytes(&r);
        let head = self.inner.head.load(Ordering::Acquire);
        let mut batch = sled::Batch::default();
        let mut next = *r;
        for kv in self.range(r.through + 1, head) {
            if pending <= target {
                break;
            }
            let (k, v) = kv?;
            batch.remove(k);
            pending -= v.len() as u64;
            next.through += 1;
            next.bytes += v.len() as u64;
            next.dropped += 1;
        }
        // Dropped results are gone, not part of the replay window.
        next.window_from = next.window_from.max(next.through + 1);
        let n = next.dropped - r.dropped;
        batch.insert(key::named(key::META, RELEASED), proto::wire::encode(&next));
        self.inner.tree.apply_batch(batch)?;
        *r = next;
        drop(r);
        metrics::counter!(m::OUTBOX_DROPPED).increment(n);
        tracing::warn!(
            dropped = n,
            "outbox full: dropped the oldest pending results"
        );
        self.publish_gauges();
        Ok(())
    }

    /// Drops the pending results processed before `now - max_age_s`, oldest first (they are
    /// in `edge_seq` order, so in processing order); returns how many, and when the oldest
    /// one left falls due. A no-op without `max_age_s`.
    pub(crate) fn expire(&self, now: i64) -> Result<(u64, Option<i64>), StoreError> {
        let (Some(max_age_s), Some(max_age)) =
            (self.inner.cfg.max_age_s, self.inner.cfg.max_age_ms())
        else {
            return Ok((0, None));
        };
        let mut r = self.released();
        let head = self.inner.head.load(Ordering::Acquire);
        let mut batch = sled::Batch::default();
        let mut next = *r;
        let mut due = None;
        for kv in self.range(r.through + 1, head) {
            let (k, v) = kv?;
            let processed_at = proto::wire::decode::<proto::EventResult>(&v)
                .map(|res| res.processed_at)
                .map_err(|e| StoreError::Corrupt {
                    key: format!("outbox {}", key::number_of(&k)),
                    reason: e.to_string(),
                })?;
            let at = processed_at.saturating_add(max_age);
            if at > now {
                due = Some(at);
                break;
            }
            batch.remove(k);
            next.through += 1;
            next.bytes += v.len() as u64;
            next.expired += 1;
        }
        let n = next.expired - r.expired;
        if n == 0 {
            return Ok((0, due));
        }
        next.window_from = next.window_from.max(next.through + 1);
        batch.insert(key::named(key::META, RELEASED), proto::wire::encode(&next));
        self.inner.tree.apply_batch(batch)?;
        let (from, to) = (r.through + 1, next.through);
        *r = next;
        drop(r);
        metrics::counter!(m::OUTBOX_EXPIRED).increment(n);
        tracing::warn!(
            expired = n,
            from_edge_seq = from,
            to_edge_seq = to,
            max_age_s,
            "outbox: dropped pending results older than outbox.max_age_s"
        );
        self.inner.freed.notify_all();
        self.publish_gauges();
        Ok((n, due))
    }

    /// Pending results from `from` (inclusive), at most `max_n` of them and about `max_bytes`
    /// (at least one, whatever its size).
    pub fn read(
        &self,
        from: u64,
        max_n: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, sled::IVec)>, StoreError> {
        let from = from.max(self.released().window_from);
        let head = self.inner.head.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut size = 0;
        for kv in self.range(from, head) {
            let (k, v) = kv?;
            if !out.is_empty() && (out.len() >= max_n || size + v.len() > max_bytes) {
                break;
            }
            size += v.len();
            out.push((key::number_of(&k), v));
        }
        Ok(out)
    }

    /// First result that still needs sending (after a reconnect, everything from here).
    pub fn first_pending(&self) -> u64 {
        self.released().through + 1
    }

    /// The cloud broker acknowledged every result up to `through`; `bytes` is their encoded
    /// size. Results behind the replay window are trimmed.
    pub fn release(&self, through: u64, bytes: u64) -> Result<(), StoreError> {
        let mut r = self.released();
        if through <= r.through {
            return Ok(()); // a late ack of a range already dropped or re-sent
        }
        let mut next = *r;
        next.through = through;
        next.bytes += bytes;
        let mut batch = sled::Batch::default();
        let keep_from = through.saturating_sub(self.inner.cfg.replay_window) + 1;
        // Trim in bounded steps so one release never holds the lock for long.
        if keep_from > next.window_from {
            for kv in self.range(next.window_from, keep_from - 1).take(10_000) {
                let (k, _) = kv?;
                next.window_from = key::number_of(&k) + 1;
                batch.remove(k);
            }
        }
        batch.insert(key::named(key::META, RELEASED), proto::wire::encode(&next));
        self.inner.tree.apply_batch(batch)?;
        *r = next;
        drop(r);
        self.inner.freed.notify_all();
        self.publish_gauges();
        Ok(())
    }

    fn range(&self, from: u64, to: u64) -> sled::Iter {
        self.inner
            .tree
            .range(key::numbered(key::OUTBOX, from)..=key::numbered(key::OUTBOX, to.max(from)))
    }

    fn released(&self) -> std::sync::MutexGuard<'_, Released> {
        self.inner
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn publish_gauges(&self) {
        let d = self.depth();
        metrics::gauge!(m::OUTBOX_DEPTH).set(d.entries as f64);
        metrics::gauge!(m::OUTBOX_BYTES).set(d.bytes as f64);
        metrics::gauge!(m::OUTBOX_OLDEST).set(self.oldest_pending_s().unwrap_or(0.0));
    }

    /// When the oldest pending result was processed (epoch seconds), `None` with nothing
    /// pending. A gauge of a time rather than an age: Prometheus takes the age as
    /// `time() - edge_outbox_oldest_pending_timestamp_seconds`, and the agent needs no timer.
    pub fn oldest_pending_s(&self) -> Option<f64> {
        let first = self.first_pending();
        let head = self.inner.head.load(Ordering::Acquire);
        if first > head {
            return None;
        }
        let (_, v) = self.range(first, head).next()?.ok()?;
        let r: proto::EventResult = proto::wire::decode(&v).ok()?;
        Some(r.processed_at as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use proto::EventResult;

    fn result(seq: u64) -> EventResult {
        crate::store::tests::result("m1", seq)
    }

    fn store_with(dir: &std::path::Path, n: u64, cfg: OutboxConfig) -> (Store, Outbox) {
        let mut store = Store::open(dir).unwrap();
        let outbox = store.open_outbox(cfg).unwrap();
        let mut c = store.begin();
        for i in 1..=n {
            c.push_result(result(i));
        }
        store.commit(&c).unwrap();
        (store, outbox)
    }

    #[test]
    fn the_oldest_pending_result_is_the_first_not_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let outbox = store.open_outbox(OutboxConfig::default()).unwrap();
        assert_eq!(outbox.oldest_pending_s(), None);
        let mut c = store.begin();
        for i in 1..=3 {
            let mut r = result(i);
            r.processed_at = 1_764_000_000_000 + i as i64 * 1000;
            c.push_result(r);
        }
        store.commit(&c).unwrap();
        assert_eq!(outbox.oldest_pending_s(), Some(1_764_000_001.0));
        outbox.release(2, 0).unwrap();
        assert_eq!(outbox.oldest_pending_s(), Some(1_764_000_003.0));
        outbox.release(3, 0).unwrap();
        assert_eq!(outbox.oldest_pending_s(), None);
    }

    #[test]
    fn release_keeps_a_replay_window_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            replay_window: 3,
            ..OutboxConfig::default()
        };
        {
            let (_store, outbox) = store_with(dir.path(), 10, cfg.clone());
            let first = outbox.read(1, 4, usize::MAX).unwrap();
            assert_eq!(
                first.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                [1, 2, 3, 4]
            );
            let bytes: usize = first.iter().map(|(_, v)| v.len()).sum();
            outbox.release(4, bytes as u64).unwrap();
            outbox.release(8, 0).unwrap();
            let d = outbox.depth();
            assert_eq!((d.entries, d.acked_through, d.head), (2, 8, 10));
            // 6, 7, 8 stay for replays; 1..=5 are gone.
            let window: Vec<u64> = outbox
                .read(1, 100, usize::MAX)
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect();
            assert_eq!(window, [6, 7, 8, 9, 10]);
        }
        let mut store = Store::open(dir.path()).unwrap();
        let outbox = store.open_outbox(cfg).unwrap();
        assert_eq!(outbox.first_pending(), 9);
        assert_eq!(outbox.depth().entries, 2);
    }

    #[test]
    fn a_window_larger_than_the_history_trims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, outbox) = store_with(dir.path(), 5, OutboxConfig::default());
        outbox.release(2, 0).unwrap();
        outbox.release(5, 0).unwrap();
        assert_eq!(outbox.read(1, 100, usize::MAX).unwrap().len(), 5);
    }

    #[test]
    fn drop_oldest_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let probe = proto::wire::encode(&{
            let mut r = result(1);
            r.edge_seq = 1;
            r
        })
        .len() as u64;
        let cfg = OutboxConfig {
            max_bytes: probe * 10,
            full_policy: FullPolicy::DropOldest,
            replay_window: 100,
            max_age_s: None,
        };
        let (_store, outbox) = store_with(dir.path(), 20, cfg);
        assert!(outbox.make_room().unwrap().is_zero());
        let d = outbox.depth();
        assert!(d.bytes <= probe * 9, "{d:?}");
        assert_eq!(d.dropped, 20 - d.entries);
        assert_eq!(outbox.first_pending(), d.dropped + 1);
        // The survivors are the newest ones, in order.
        let left: Vec<u64> = outbox
            .read(1, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(left, ((d.dropped + 1)..=20).collect::<Vec<_>>());
    }

    #[test]
    fn block_waits_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            max_bytes: 1,
            ..OutboxConfig::default()
        };
        let (_store, outbox) = store_with(dir.path(), 3, cfg);
        let waiter = {
            let outbox = outbox.clone();
            std::thread::spawn(move || outbox.make_room().unwrap())
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "intake blocks while the outbox is full"
        );
        let bytes = outbox.depth().bytes;
        outbox.release(3, bytes).unwrap();
        assert!(waiter.join().unwrap() > Duration::ZERO, "it waited");
    }

    #[test]
    fn expire_drops_exactly_the_results_older_than_max_age() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            max_age_s: Some(60),
            ..OutboxConfig::default()
        };
        let mut store = Store::open(dir.path()).unwrap();
        let outbox = store.open_outbox(cfg).unwrap();
        let mut c = store.begin();
        for i in 1..=10u64 {
            let mut r = result(i);
            r.processed_at = 1_000_000 + i as i64 * 10_000; // one every 10 s
            c.push_result(r);
        }
        store.commit(&c).unwrap();
        // At 1 070 000 the first one is exactly 60 s old and seqs 1..=1 go; seq 2 is due at 1 080 000.
        assert_eq!(outbox.expire(1_070_000).unwrap(), (1, Some(1_080_000)));
        assert_eq!(outbox.expire(1_070_000).unwrap(), (0, Some(1_080_000)));
        assert_eq!(outbox.expire(1_125_000).unwrap(), (5, Some(1_130_000)));
        let d = outbox.depth();
        assert_eq!((d.entries, d.expired, d.dropped), (4, 6, 0));
        assert_eq!(outbox.first_pending(), 7);
        assert_eq!(outbox.read(1, 100, usize::MAX).unwrap()[0].0, 7);
        drop(outbox);
        drop(store);
        // Counted durably.
        let mut store = Store::open(dir.path()).unwrap();
        let outbox = store.open_outbox(OutboxConfig::default()).unwrap();
        assert_eq!(outbox.depth().expired, 6);
        assert_eq!(
            outbox.expire(i64::MAX).unwrap(),
            (0, None),
            "no max_age: kept"
        );
    }
}
