//! A test hook for replay tests: `EDGE_AGENT_FAULT_DROP_UPLINK=N..M` (or `N`) makes the uplink
//! publish its N-th to M-th batches (1-based, counted per process; replays are neither counted
//! nor dropped) to [`SINK_TOPIC`] instead of `gateways/{g}/results`. The broker acknowledges
//! them, so the agent releases the range into its replay window exactly as if the batches had
//! been lost after the broker took them; the cloud sees the gap and asks for a replay.
//! Unset (always, in production) it costs one cached environment lookup per batch.
//!
//! The power-cut test's negative control: `EDGE_AGENT_FAULT_SKIP_SYNC=1` leaves out the store's
//! own syncs (`store::sync`), so a commit ends at sled's `sync_file_range`, as before the fix;
//! the test then expects acknowledged messages to be lost.
//!
//! `EDGE_AGENT_FAULT_SLOW_SYNC_MS=N` makes each sync of the store wait N ms first (a slow SD
//! card): the power-cut tests then cut while commits are applied but not yet durable, where
//! an ack released too early would be lost.

use std::ops::RangeInclusive;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where dropped batches go: nothing subscribes to it.
pub const SINK_TOPIC: &str = "fault/dropped-uplink";

fn range() -> Option<&'static RangeInclusive<u64>> {
    static RANGE: OnceLock<Option<RangeInclusive<u64>>> = OnceLock::new();
    RANGE
        .get_or_init(|| parse(&std::env::var("EDGE_AGENT_FAULT_DROP_UPLINK").ok()?))
        .as_ref()
}

/// `N..M` (inclusive) or `N`.
fn parse(v: &str) -> Option<RangeInclusive<u64>> {
    let (a, b) = v.split_once("..").unwrap_or((v, v));
    Some(a.trim().parse().ok()?..=b.trim().parse().ok()?)
}

/// Whether the next (non-replay) batch, `edge_seq` `first..=last`, is to be lost in flight.
pub fn drop_next_batch(first: u64, last: u64) -> bool {
    static N: AtomicU64 = AtomicU64::new(0);
    let Some(r) = range() else { return false };
    let n = N.fetch_add(1, Ordering::Relaxed) + 1;
    let drop = r.contains(&n);
    if drop {
        tracing::warn!(
            batch = n,
            first,
            last,
            "fault hook: uplink batch sent to {SINK_TOPIC}"
        );
    }
    drop
}

/// Whether the store should skip its syncs (the power-cut test's control run).
pub fn skip_sync() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| {
        let skip = std::env::var_os("EDGE_AGENT_FAULT_SKIP_SYNC").is_some_and(|v| v == "1");
        if skip {
            tracing::warn!("fault hook: the store does not sync its commits");
        }
        skip
    })
}

/// How long each store sync waits before it starts (zero unless the test hook is set).
pub fn slow_sync() -> std::time::Duration {
    static MS: OnceLock<u64> = OnceLock::new();
    let ms = *MS.get_or_init(|| {
        let ms = std::env::var("EDGE_AGENT_FAULT_SLOW_SYNC_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ms > 0 {
            tracing::warn!(ms, "fault hook: every store sync waits first");
        }
        ms
    });
    std::time::Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges() {
        assert_eq!(super::parse("2..3"), Some(2..=3));
        assert_eq!(super::parse("4"), Some(4..=4));
        assert_eq!(super::parse("x..3"), None);
    }
}
