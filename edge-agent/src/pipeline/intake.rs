//! The intake gate: when the pipeline stops taking messages rather than meet a full disk or
//! (with `full_policy = "block"`) a full DLQ. Devices keep what is not acknowledged, so a
//! closed gate loses nothing; it opens again by itself when there is room.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::ingest::now_ms;
use crate::status::Live;
use crate::store::Store;
use crate::telemetry as m;

pub(super) struct IntakeGate {
    /// `disk_reserve_mb` in bytes.
    disk_reserve: u64,
    /// `full_policy = "block"`: a full DLQ closes the gate.
    block_on_full_dlq: bool,
    live: Arc<Live>,
}

impl IntakeGate {
    pub(super) fn new(disk_reserve_mb: u64, live: Arc<Live>) -> IntakeGate {
        IntakeGate {
            disk_reserve: disk_reserve_mb.saturating_mul(1 << 20),
            block_on_full_dlq: false,
            live,
        }
    }

    pub(super) fn block_on_full_dlq(&mut self, block: bool) {
        self.block_on_full_dlq = block;
    }

    /// Whether intake must stop now; says so (log, metric, status) when that changes.
    pub(super) fn closed(&self, store: &Store) -> bool {
        let disk_full = self.disk_full(store);
        self.dlq_full(store) || disk_full
    }

    /// Whether the store's filesystem has less free space than the reserve. A failed look-up
    /// counts as room (the commit itself will report a real error).
    fn disk_full(&self, store: &Store) -> bool {
        let free = store.free_bytes().unwrap_or(u64::MAX);
        let full = free < self.disk_reserve;
        if self.live.disk_full.swap(full, Ordering::Relaxed) != full {
            metrics::gauge!(m::DISK_FULL).set(f64::from(u8::from(full)));
            if full {
                tracing::error!(
                    free_bytes = free,
                    reserve_bytes = self.disk_reserve,
                    "disk full: intake stopped (devices keep their messages) until the data \
                     dir's filesystem has pipeline.disk_reserve_mb free again"
                );
                self.live
                    .set_last_error(now_ms(), "disk full: intake stopped".into());
            } else {
                tracing::info!(free_bytes = free, "disk has room again: intake resumed");
            }
        }
        full
    }

    /// With `full_policy = "block"`, a full DLQ stops intake until someone makes room.
    fn dlq_full(&self, store: &Store) -> bool {
        let blocked = self.block_on_full_dlq && store.dlq_full();
        if self.live.intake_blocked.swap(blocked, Ordering::Relaxed) != blocked {
            metrics::gauge!(m::DLQ_BLOCKED).set(f64::from(u8::from(blocked)));
            let c = store.counters();
            if blocked {
                tracing::error!(
                    entries = c.dlq_entries,
                    bytes = c.dlq_bytes,
                    "DLQ full: intake stopped (devices keep their messages) until room is made \
                     with `edge-agent dlq retry` or `dlq export` + `dlq purge`"
                );
                self.live
                    .set_last_error(now_ms(), "DLQ full: intake stopped".into());
            } else {
                tracing::info!(
                    entries = c.dlq_entries,
                    "DLQ has room again: intake resumed"
                );
            }
        }
        blocked
    }
}
