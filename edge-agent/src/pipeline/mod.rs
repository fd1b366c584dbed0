//! The pipeline thread: batches of inbound messages → engine → one durable commit → acks.
//!
//! It runs on a thread of its own because the engine is pure CPU, and its commits' `fsync`s
//! wait on a second one (the commit stage). Batching is natural group commit: while one batch is
//! being flushed the ingest side keeps filling the channel, so under load the next batch is
//! larger and the fsync cost per message falls, while a lone message is committed at once.
//!
//! The thread owns every store write while the agent runs. Its parts, one file each:
//! - [`batch`]: the engine driver and group commit (and the edge's own corrections);
//! - [`commit`]: the commit stage, a thread that syncs each applied batch and then releases
//!   its acks, so the engine works on the next batch while the disk syncs this one;
//! - [`admin`]: DLQ writes from the admin socket, served between batches;
//! - [`retry`]: the automatic-retry scheduler and the retry/purge runs (a stopped agent's CLI
//!   runs the very same [`Pipeline::retry`] / [`Pipeline::purge`] in-process);
//! - [`gaps`]: the missed-gap timer ([`crate::missed`]): after each message the device's
//!   tracked gaps follow the engine's tracker in the same commit, and when due the gaps open
//!   longer than `missed_after_s` are declared missed (one commit for all that are due);
//! - [`intake`]: the gate that stops intake rather than meet a full disk or a full DLQ.
//!
//! Invariant: a message's ack is released only after the commit that holds its outcome (result
//! or DLQ entry) returned, and commits happen in arrival order.

mod admin;
mod batch;
mod commit;
mod gaps;
mod intake;
mod retry;

use std::sync::Arc;
use std::time::Duration;

use engine::{Engine, State};
use serde::Deserialize;
use settings::Invalid;
use tokio::sync::mpsc;

pub use admin::AdminCall;
use admin::AdminInbox;
use commit::CommitStage;
use gaps::GapTimer;
use intake::IntakeGate;
use retry::RetryScheduler;

use crate::dlq::{DlqConfig, FullPolicy};
use crate::ingest::{AckSet, Inbound, now_ms};
use crate::status::Live;
use crate::store::outbox::Outbox;
use crate::store::{Store, StoreError};
use crate::telemetry as m;

/// Why the pipeline woke up.
enum Wake {
    Admin(AdminCall),
    /// An automatic DLQ retry or a missed-events check is due.
    Timer,
    Ingest(usize),
    /// Intake is blocked: look again whether ingest has closed.
    Tick,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most messages in one group commit.
    pub max_batch: usize,
    /// Messages buffered between ingest and the pipeline; when full, ingest stops reading
    /// sockets (devices see back-pressure, nothing is dropped). It bounds memory: a queued
    /// message keeps its slice of the socket's read buffer alive.
    pub queue_capacity: usize,
    /// Seconds a device's sequence gap may stay open before it becomes a missed-event record
    /// (a late arrival after that is still processed normally and shrinks the record).
    pub missed_after_s: u64,
    /// Most missed-event records kept; beyond it the oldest are dropped (counted).
    pub missed_max_records: u64,
    /// Intake stops (devices keep their messages, nothing is acknowledged) while the data
    /// dir's filesystem has less free space than this, and resumes by itself when there is
    /// room again: a commit never has to meet a full disk.
    pub disk_reserve_mb: u64,
    /// Most devices the gateway keeps state for (in memory and in the store). A message from
    /// a device beyond it goes to the DLQ (stage `rule`, rule `max_devices`; counted in
    /// `edge_devices_refused_total`) and is acknowledged then; known devices are never
    /// evicted, since their state is what keeps their next results right. Raising the cap and
    /// `edge-agent dlq retry --reason max_devices` admits the refused ones.
    pub max_devices: usize,
}

impl PipelineConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_batch == 0 {
            return Err(Invalid::at("pipeline.max_batch", "must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(Invalid::at("pipeline.queue_capacity", "must be at least 1"));
        }
        // Beyond a year a gap is as good as never declared; the bound keeps ms arithmetic safe.
        if self.missed_after_s > 366 * 24 * 3600 {
            return Err(Invalid::at(
                "pipeline.missed_after_s",
                format!(
                    "{} is more than a year (366 days = 31622400 s)",
                    self.missed_after_s
                ),
            ));
        }
        if self.max_devices == 0 {
            return Err(Invalid::at("pipeline.max_devices", "must be at least 1"));
        }
        if self.missed_max_records == 0 {
            return Err(Invalid::at(
                "pipeline.missed_max_records",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn missed_after_ms(&self) -> i64 {
        i64::try_from(self.missed_after_s.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            // Measured (cargo bench -p e2e --bench ingest): 4096/16384 gave no more
            // throughput than this, at six times the peak RSS.
            max_batch: 1024,
            queue_capacity: 2048,
            missed_after_s: crate::missed::DEFAULT_AFTER_S,
            missed_max_records: crate::missed::DEFAULT_MAX_RECORDS,
            disk_reserve_mb: 64,
            // A few KiB each in memory (see tests/edge_caps.rs), so tens of MiB at the cap.
            max_devices: 10_000,
        }
    }
}

pub struct Pipeline {
    engine: Engine,
    state: State,
    store: Store,
    outbox: Outbox,
    gateway: String,
    max_batch: usize,
    retries: RetryScheduler,
    gaps: GapTimer,
    intake: IntakeGate,
    live: Arc<Live>,
    /// Shows systemd's watchdog that batches keep finishing.
    heartbeat: crate::systemd::Heartbeat,
    /// Committed results and DLQ entries for `edge-agent tap`.
    tap: crate::tap::Tap,
    /// When the oldest pending result grows older than `outbox.max_age_s` (None: no limit).
    expire_due: Option<i64>,
}

impl Pipeline {
    /// Loads every device's state from the store so sequence tracking and stateful
    /// calculations continue exactly where the last run stopped.
    pub fn new(
        engine: Engine,
        mut store: Store,
        outbox: Outbox,
        gateway: String,
        cfg: &PipelineConfig,
    ) -> Result<Pipeline, StoreError> {
        let mut state = State::default();
        for (device, s) in store.device_states()? {
            state.insert(device, s);
        }
        state.set_max_devices(Some(cfg.max_devices));
        store.set_missed_cap(cfg.missed_max_records.max(1));
        let mut gaps = GapTimer::load(&store, cfg.missed_after_ms())?;
        gaps.adopt(&state, now_ms(), &store.reader())?;
        let live = Arc::new(Live::new(now_ms()));
        let expire_due = outbox.config().max_age_s.map(|_| now_ms());
        let p = Pipeline {
            engine,
            state,
            store,
            outbox,
            gateway,
            max_batch: cfg.max_batch.max(1),
            retries: RetryScheduler::new(DlqConfig::default().auto_retry),
            gaps,
            intake: IntakeGate::new(cfg.disk_reserve_mb, Arc::clone(&live)),
            live,
            heartbeat: crate::systemd::Heartbeat::new(),
            tap: crate::tap::Tap::default(),
            expire_due,
        };
        p.publish_gauges();
        Ok(p)
    }

    /// The tap its commits go to (`edge-agent tap` through the admin socket).
    pub fn tap(&self) -> crate::tap::Tap {
        self.tap.clone()
    }

    pub fn heartbeat(&self) -> crate::systemd::Heartbeat {
        self.heartbeat.clone()
    }

    /// Applies the `[dlq]` config (cap, full policy, automatic retries) and loads the retry
    /// schedule. Without it the DLQ has the default settings.
    pub fn with_dlq(mut self, cfg: DlqConfig) -> Result<Pipeline, StoreError> {
        self.store.set_dlq_cap(cfg.cap());
        self.intake
            .block_on_full_dlq(cfg.full_policy == FullPolicy::Block);
        self.retries = RetryScheduler::new(cfg.auto_retry);
        self.retries.reschedule(&self.store.reader())?;
        Ok(self)
    }

    /// A read-only view of the store (for the admin socket).
    pub fn reader(&self) -> crate::store::StoreReader {
        self.store.reader()
    }

    /// Live figures for `edge-agent status`.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
    }

    /// Runs until every sender of `rx` is gone and the queue is drained; returns the store so
    /// the caller can close it after the last commit.
    pub fn run(self, rx: mpsc::Receiver<Inbound>) -> Result<Store, StoreError> {
        let (_keep, admin) = mpsc::channel(1);
        self.run_with_admin(rx, admin)
    }

    /// [`run`](Self::run), also serving DLQ writes from the admin socket and the automatic
    /// retries, between batches. Group commit is unchanged: each wake-up takes everything
    /// queued (up to `max_batch`) into one commit.
    pub fn run_with_admin(
        mut self,
        mut rx: mpsc::Receiver<Inbound>,
        admin: mpsc::Receiver<AdminCall>,
    ) -> Result<Store, StoreError> {
        // A small runtime of this thread's own, only to wait on several channels and a timer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| StoreError::from(sled::Error::Io(e)))?;
        let mut admin = AdminInbox::new(admin);
        let mut stage = CommitStage::start(self.store.durable(), self.tap.clone())
            .map_err(|e| StoreError::from(sled::Error::Io(e)))?;
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut acks = AckSet::default();
        // Set once ingest has closed while intake was blocked: drain what is queued anyway.
        let mut draining = false;
        loop {
            let blocked = !draining && self.intake.closed(&self.store);
            let due = [self.retries.due(), self.gaps.due(), self.expire_due]
                .into_iter()
                .flatten()
                .min();
            let max = self.max_batch;
            let wake = rt.block_on(async {
                let timer = async {
                    match due {
                        Some(t) => {
                            let wait = u64::try_from(t.saturating_sub(now_ms())).unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(wait)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    call = admin.next() => Wake::Admin(call),
                    _ = timer => Wake::Timer,
                    n = rx.recv_many(&mut batch, max), if !blocked => Wake::Ingest(n),
                    _ = tokio::time::sleep(Duration::from_millis(200)), if blocked => Wake::Tick,
                }
            });
            self.heartbeat.batch_started();
            match wake {
                Wake::Admin(call) => self.serve(call)?,
                Wake::Timer => self.timers()?,
                Wake::Ingest(0) => break,
                Wake::Ingest(_) => {
                    let applied = self.apply(&mut batch, &mut acks)?;
                    stage.submit(applied, &mut acks)?;
                    // Under constant load the timer branch may not get its turn.
                    self.timers()?;
                }
                Wake::Tick => draining = rx.is_closed(),
            }
            self.heartbeat.batch_done();
        }
        stage.finish()?;
        Ok(self.store)
    }

    /// Runs what is due: automatic DLQ retries, the missed-events check, the outbox's age
    /// limit.
    fn timers(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        if self.retries.due().is_some_and(|t| t <= now) {
            self.auto_retry(now)?;
        }
        if self.gaps.due().is_some_and(|t| t <= now) {
            self.declare_missed(now)?;
        }
        if self.expire_due.is_some_and(|t| t <= now)
            && let Some(max_age) = self.outbox.config().max_age_ms()
        {
            // The oldest pending result's time, or a new one's (processed from now on).
            let (_, due) = self.outbox.expire(now)?;
            self.expire_due = Some(due.unwrap_or(now.saturating_add(max_age)));
        }
        Ok(())
    }

    /// Declares every gap open for `missed_after_s` or longer missed, in one commit.
    fn declare_missed(&mut self, now: i64) -> Result<(), StoreError> {
        let mut commit = self.store.begin();
        self.gaps.declare_due(now, &mut commit);
        if !commit.is_empty() {
            let receipt = self.store.commit(&commit)?;
            self.after_commit(&commit, &receipt);
        }
        self.publish_gauges();
        Ok(())
    }

    fn publish_gauges(&self) {
        let c = self.store.counters();
        metrics::gauge!(m::DLQ_ENTRIES).set(c.dlq_entries as f64);
        metrics::gauge!(m::DLQ_BYTES).set(c.dlq_bytes as f64);
        metrics::gauge!(m::MISSED_RECORDS).set(c.missed_records as f64);
        metrics::gauge!(m::GAPS_OPEN).set(self.gaps.open() as f64);
        metrics::gauge!(m::DEVICES).set(self.state.len() as f64);
    }
}

#[cfg(test)]
mod tests;
