//! The pipeline thread: batches of inbound messages → engine → one durable commit → acks.
//!
//! It runs on a thread of its own because both halves of its work block: the engine is pure
//! CPU and the commit waits for `fsync`. Batching is natural group commit: while one batch is
//! being flushed the ingest side keeps filling the channel, so under load the next batch is
//! larger and the fsync cost per message falls, while a lone message is committed at once.
//!
//! Invariant: a message's ack is released only after the commit that holds its outcome (result
//! or DLQ entry) returned, and commits happen in arrival order.
//!
//! The thread also owns every DLQ write while the agent runs: between batches it serves
//! [`AdminCall`]s (a technician's `dlq retry`/`dlq purge` from the admin socket) and the
//! automatic retries of transient failures that are due, so the store's counters stay exact
//! and a retried message takes the same engine and group-commit path as live traffic. A
//! stopped agent's CLI runs the very same [`Pipeline::retry`] / [`Pipeline::purge`] in-process.
//!
//! Missed events ([`crate::missed`]): after each message the device's tracked gaps are brought
//! in line with the engine's tracker in the same commit, and between batches a timer declares
//! the gaps open longer than `missed_after_s` missed (one commit for all that are due).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use engine::{Engine, Input, Outcome, Reading, State, correct, flags, verify};
use proto::{CorrectedBy, DlqEntry};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::dlq::{
    self, DlqConfig, FullPolicy, PurgeReport, RetryItem, RetryOutcome, RetryReport, Selection,
};
use crate::ingest::{AckSet, Inbound, now_ms};
use crate::missed::{DeviceGaps, MissedRecord};
use crate::status::{Live, describe_rejection};
use crate::store::outbox::Outbox;
use crate::store::{Commit, Committed, CorrectionMark, Store, StoreError};
use crate::telemetry as m;

/// A DLQ write for the pipeline thread, from the admin socket; the reply goes back on the
/// oneshot (an `Err` is a store failure, after which the pipeline stops).
pub enum AdminCall {
    Retry(Selection, oneshot::Sender<Result<RetryReport, String>>),
    Purge(Selection, oneshot::Sender<Result<PurgeReport, String>>),
}

/// Why the pipeline woke up.
enum Wake {
    Admin(Option<AdminCall>),
    /// An automatic DLQ retry or a missed-events check is due.
    Timer,
    Ingest(usize),
    /// Intake is blocked (DLQ full): look again whether ingest has closed.
    Tick,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Auto,
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Auto => "auto",
            Trigger::Manual => "manual",
        }
    }
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
}

impl PipelineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 {
            return Err("pipeline.max_batch: must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return Err("pipeline.queue_capacity: must be at least 1".into());
        }
        // Beyond a year a gap is as good as never declared; the bound keeps ms arithmetic safe.
        if self.missed_after_s > 366 * 24 * 3600 {
            return Err(format!(
                "pipeline.missed_after_s: {} is more than a year (366 days = 31622400 s)",
                self.missed_after_s
            ));
        }
        if self.missed_max_records == 0 {
            return Err("pipeline.missed_max_records: must be at least 1".into());
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
    dlq: DlqConfig,
    /// When the earliest automatic DLQ retry is due (epoch ms).
    next_auto_retry: Option<i64>,
    /// Devices' open sequence gaps (only devices that have some), as last committed plus
    /// this batch's changes; `gaps_dirty` are the devices to write with the next commit.
    gaps: BTreeMap<String, DeviceGaps>,
    gaps_dirty: BTreeSet<String>,
    missed_after_ms: i64,
    /// The next missed record's id.
    next_missed_id: u64,
    /// When the earliest open gap falls due (epoch ms).
    next_missed_check: Option<i64>,
    live: Arc<Live>,
    /// `disk_reserve_mb` in bytes.
    disk_reserve: u64,
    /// Shows systemd's watchdog that batches keep finishing.
    heartbeat: crate::systemd::Heartbeat,
}

impl Pipeline {
    /// Loads every device's state from the store so sequence tracking and stateful
    /// calculations continue exactly where the last run stopped.
    pub fn new(
        engine: Engine,
        store: Store,
        outbox: Outbox,
        gateway: String,
        cfg: &PipelineConfig,
    ) -> Result<Pipeline, StoreError> {
        let mut state = State::default();
        for (device, s) in store.device_states()? {
            state.insert(device, s);
        }
        let mut gaps = BTreeMap::new();
        for g in store.reader().gaps() {
            let (device, g) = g?;
            gaps.insert(device, g);
        }
        let mut store = store;
        store.set_missed_cap(cfg.missed_max_records.max(1));
        let next_missed_id = store.counters().first_free_missed_id();
        let mut p = Pipeline {
            engine,
            state,
            store,
            outbox,
            gateway,
            max_batch: cfg.max_batch.max(1),
            dlq: DlqConfig::default(),
            next_auto_retry: None,
            gaps,
            gaps_dirty: BTreeSet::new(),
            missed_after_ms: cfg.missed_after_ms(),
            next_missed_id,
            next_missed_check: None,
            live: Arc::new(Live::new(now_ms())),
            disk_reserve: cfg.disk_reserve_mb.saturating_mul(1 << 20),
            heartbeat: crate::systemd::Heartbeat::new(),
        };
        // Gaps the engine knows but the agent does not (a store written before missed
        // records existed): tracked from now, written with the next commit.
        let now = now_ms();
        let devices: Vec<String> = p
            .state
            .devices()
            .filter(|(d, s)| !s.seq().missing().is_empty() && !p.gaps.contains_key(*d))
            .map(|(d, _)| d.to_string())
            .collect();
        let mut ignored = Commit::default();
        for d in devices {
            p.track(&d, now, &mut ignored)?;
        }
        p.reschedule_missed();
        p.publish_gauges();
        Ok(p)
    }

    pub fn heartbeat(&self) -> crate::systemd::Heartbeat {
        self.heartbeat.clone()
    }

    /// Applies the `[dlq]` config (cap, full policy, automatic retries) and loads the retry
    /// schedule. Without it the DLQ has the default settings.
    pub fn with_dlq(mut self, cfg: DlqConfig) -> Result<Pipeline, StoreError> {
        self.store.set_dlq_cap(cfg.cap());
        self.dlq = cfg;
        self.reschedule()?;
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
        mut admin: mpsc::Receiver<AdminCall>,
    ) -> Result<Store, StoreError> {
        // A small runtime of this thread's own, only to wait on several channels and a timer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| StoreError::Io(sled::Error::Io(e)))?;
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut acks = AckSet::default();
        let mut admin_open = true;
        // Set once ingest has closed while intake was blocked: drain what is queued anyway.
        let mut draining = false;
        loop {
            let blocked = !draining && self.intake_blocked();
            let due = match (self.next_auto_retry, self.next_missed_check) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
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
                    call = admin.recv(), if admin_open => Wake::Admin(call),
                    _ = timer => Wake::Timer,
                    n = rx.recv_many(&mut batch, max), if !blocked => Wake::Ingest(n),
                    _ = tokio::time::sleep(Duration::from_millis(200)), if blocked => Wake::Tick,
                }
            });
            self.heartbeat.batch_started();
            match wake {
                Wake::Admin(Some(call)) => self.serve(call)?,
                Wake::Admin(None) => admin_open = false,
                Wake::Timer => self.timers()?,
                Wake::Ingest(0) => break,
                Wake::Ingest(_) => {
                    self.process(&mut batch, &mut acks)?;
                    // Under constant load the timer branch may not get its turn.
                    self.timers()?;
                }
                Wake::Tick => draining = rx.is_closed(),
            }
            self.heartbeat.batch_done();
        }
        Ok(self.store)
    }

    /// Runs what is due: automatic DLQ retries, the missed-events check.
    fn timers(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        if self.next_auto_retry.is_some_and(|t| t <= now) {
            self.auto_retry()?;
        }
        if self.next_missed_check.is_some_and(|t| t <= now) {
            self.declare_missed(now)?;
        }
        Ok(())
    }

    /// Brings the device's tracked gaps in line with the engine's tracker after one of its
    /// messages: new gaps are remembered with `now`, late fills shrink them (and the missed
    /// record they were declared as), gaps the tracker dropped (restart, eviction) are
    /// declared missed at once. Everything goes into `commit`.
    fn track(&mut self, device: &str, now: i64, commit: &mut Commit) -> Result<(), StoreError> {
        let Some(seq) = self.state.device(device).map(|d| d.seq()) else {
            return Ok(());
        };
        let change = match self.gaps.get_mut(device) {
            Some(g) if g.in_sync(seq) => return Ok(()),
            Some(g) => g.reconcile(seq, now),
            None if seq.missing().is_empty() => return Ok(()),
            None => {
                let mut g = DeviceGaps::new(seq);
                let change = g.reconcile(seq, now);
                self.gaps.insert(device.to_string(), g);
                change
            }
        };
        if self.gaps.get(device).is_some_and(|g| g.gaps.is_empty()) {
            self.gaps.remove(device);
        }
        self.gaps_dirty.insert(device.to_string());
        if let Some(t) = change
            .opened
            .iter()
            .map(|g| g.first_seen.saturating_add(self.missed_after_ms))
            .min()
        {
            self.next_missed_check = Some(self.next_missed_check.map_or(t, |n| n.min(t)));
        }
        for piece in &change.filled {
            let Some(id) = piece.missed else { continue };
            let record = match commit.missed.remove(&id) {
                Some(r) => Some(r),
                None => self.store.reader().missed_record(id)?,
            };
            // Gone: dropped by the cap (it was counted then).
            let Some(mut record) = record else { continue };
            let n = record.fill(piece.range());
            commit.missed_filled_late += n;
            tracing::info!(
                device,
                missed_id = id,
                seqs = %piece.range(),
                still_missing = record.count,
                "a seq declared missed arrived late: processed normally, missed record updated"
            );
            if record.is_filled() {
                commit.missed_removals.insert(id);
            } else {
                commit.missed.insert(id, record);
            }
        }
        for piece in change.lost.iter().filter(|p| p.missed.is_none()) {
            let id = self.take_missed_id();
            let record = MissedRecord::new(id, device, piece.range(), piece.first_seen, now);
            tracing::warn!(
                device,
                missed_id = id,
                seqs = %piece.range(),
                count = record.count,
                "missed events: the device restarted its sequence (or too many gaps were \
                 open) before these arrived"
            );
            commit.missed_declared_seqs += record.count;
            commit.missed.insert(id, record);
        }
        Ok(())
    }

    fn take_missed_id(&mut self) -> u64 {
        let id = self.next_missed_id;
        self.next_missed_id += 1;
        id
    }

    /// Adds the changed devices' gaps to `commit`.
    fn stage_gaps(&mut self, commit: &mut Commit) {
        for device in std::mem::take(&mut self.gaps_dirty) {
            let g = self.gaps.get(&device).cloned();
            commit.gaps.push((device, g));
        }
    }

    /// Declares every gap open for `missed_after_s` or longer missed, in one commit.
    fn declare_missed(&mut self, now: i64) -> Result<(), StoreError> {
        let mut commit = Commit::default();
        let after = self.missed_after_ms;
        let mut next_id = self.next_missed_id;
        for (device, g) in &mut self.gaps {
            let declared = g.declare_due(after, now, || {
                next_id += 1;
                next_id - 1
            });
            if declared.is_empty() {
                continue;
            }
            self.gaps_dirty.insert(device.clone());
            for gap in declared {
                let id = gap.missed.unwrap_or_default();
                let record = MissedRecord::new(id, device, gap.range(), gap.first_seen, now);
                tracing::warn!(
                    device = device.as_str(),
                    missed_id = id,
                    seqs = %gap.range(),
                    count = record.count,
                    open_s = (now - gap.first_seen) / 1000,
                    "missed events: a sequence gap stayed open past missed_after_s"
                );
                commit.missed_declared_seqs += record.count;
                commit.missed.insert(id, record);
            }
        }
        self.next_missed_id = next_id;
        self.stage_gaps(&mut commit);
        if !commit.is_empty() {
            let receipt = self.store.commit(&commit)?;
            self.after_commit(&commit, &receipt);
        }
        self.reschedule_missed();
        self.publish_gauges();
        Ok(())
    }

    /// Recomputes when the next open gap falls due.
    fn reschedule_missed(&mut self) {
        let after = self.missed_after_ms;
        self.next_missed_check = self.gaps.values().filter_map(|g| g.next_due(after)).min();
    }

    /// Intake stops while the disk is short of `disk_reserve_mb`, or (with `full_policy =
    /// "block"`) while the DLQ is full.
    fn intake_blocked(&self) -> bool {
        let disk_full = self.disk_full();
        self.dlq_blocked() || disk_full
    }

    /// Whether the store's filesystem has less free space than the reserve; says so when that
    /// changes. A failed look-up counts as room (the commit itself will report a real error).
    fn disk_full(&self) -> bool {
        let free = self.store.free_bytes().unwrap_or(u64::MAX);
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
    fn dlq_blocked(&self) -> bool {
        let blocked = self.dlq.full_policy == FullPolicy::Block && self.store.dlq_full();
        if self.live.intake_blocked.swap(blocked, Ordering::Relaxed) != blocked {
            metrics::gauge!(m::DLQ_BLOCKED).set(f64::from(u8::from(blocked)));
            let c = self.store.counters();
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

    fn serve(&mut self, call: AdminCall) -> Result<(), StoreError> {
        match call {
            AdminCall::Retry(sel, reply) => {
                let r = self.retry(&sel);
                let _ = reply.send(r.as_ref().map(Clone::clone).map_err(ToString::to_string));
                r.map(drop)
            }
            AdminCall::Purge(sel, reply) => {
                let r = self.purge(&sel);
                let _ = reply.send(r.as_ref().map(Clone::clone).map_err(ToString::to_string));
                r.map(drop)
            }
        }
    }

    /// `dlq retry`: re-injects the selected entries (the same engine and group commit as live
    /// traffic, as replays); an entry that becomes a result leaves the DLQ in the same commit.
    pub fn retry(&mut self, sel: &Selection) -> Result<RetryReport, StoreError> {
        let ids = dlq::resolve(&self.store.reader(), sel)?;
        self.retry_ids(&ids, Trigger::Manual)
    }

    /// `dlq purge`: deletes the selected entries.
    pub fn purge(&mut self, sel: &Selection) -> Result<PurgeReport, StoreError> {
        let report = dlq::purge(&mut self.store, sel)?;
        self.reschedule()?;
        self.publish_gauges();
        Ok(report)
    }

    /// Retries the transient failures that are due.
    fn auto_retry(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        let due: Vec<u64> = self
            .store
            .reader()
            .dlq_schedule()
            .filter_map(|s| match s {
                Ok((id, at)) if at <= now => Some(Ok(id)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .take(self.max_batch)
            .collect::<Result<_, _>>()?;
        if due.is_empty() {
            self.reschedule()?;
            return Ok(());
        }
        let report = self.retry_ids(&due, Trigger::Auto)?;
        for item in &report.items {
            match &item.outcome {
                RetryOutcome::Reprocessed { event_id, edge_seq } => tracing::info!(
                    dlq_id = item.id,
                    event_id,
                    edge_seq,
                    "automatic DLQ retry: reprocessed"
                ),
                RetryOutcome::Failed {
                    reason,
                    attempts,
                    auto_retry_at,
                    ..
                } => tracing::info!(
                    dlq_id = item.id,
                    attempts,
                    reason,
                    next = ?auto_retry_at.map(proto::timestamp::format_rfc3339),
                    "automatic DLQ retry: failed again{}",
                    if auto_retry_at.is_none() { "; it now waits for a person" } else { "" }
                ),
                _ => {}
            }
        }
        Ok(())
    }

    fn retry_ids(&mut self, ids: &[u64], trigger: Trigger) -> Result<RetryReport, StoreError> {
        let mut report = RetryReport::default();
        for chunk in ids.chunks(self.max_batch) {
            let now = now_ms();
            let mut commit = self.store.begin();
            for &id in chunk {
                let Some(e) = self.store.reader().dlq_entry(id)? else {
                    // Clear any schedule left for it, so a due retry cannot come back forever.
                    commit.dlq_schedule.push((id, None));
                    report.items.push(RetryItem {
                        id,
                        outcome: RetryOutcome::NotFound,
                    });
                    continue;
                };
                let outcome = self.replay(e, now, &mut commit)?;
                report.items.push(RetryItem { id, outcome });
            }
            commit.states = self.state.take_dirty();
            self.stage_gaps(&mut commit);
            if commit.is_empty() {
                continue;
            }
            self.outbox.make_room()?;
            let receipt = self.store.commit(&commit)?;
            self.after_commit(&commit, &receipt);
        }
        let ok = report.count(|o| matches!(o, RetryOutcome::Reprocessed { .. })) as u64;
        let failed = report.count(|o| matches!(o, RetryOutcome::Failed { .. })) as u64;
        metrics::counter!(m::ACCEPTED).increment(ok);
        self.live.accepted.fetch_add(ok, Ordering::Relaxed);
        metrics::counter!(m::DLQ_RETRIES, "trigger" => trigger.as_str(), "outcome" => "reprocessed")
            .increment(ok);
        metrics::counter!(m::DLQ_RETRIES, "trigger" => trigger.as_str(), "outcome" => "failed")
            .increment(failed);
        self.reschedule()?;
        self.publish_gauges();
        Ok(report)
    }

    /// Runs one DLQ entry through the engine again and records the outcome in `commit`.
    fn replay(
        &mut self,
        e: DlqEntry,
        now: i64,
        commit: &mut Commit,
    ) -> Result<RetryOutcome, StoreError> {
        let input = Input {
            topic: &e.topic,
            payload: &e.payload,
            // As on arrival: clock rules judge the message as they would have then.
            received_at: e.first_seen,
            gateway: &self.gateway,
            replay: true,
        };
        let outcome = self.engine.process(&mut self.state, &input);
        if let Some(device) = outcome_device(&outcome) {
            // A replay inside a missing range fills it, as a live late arrival does.
            self.track(device, now, commit)?;
        }
        Ok(match outcome {
            Outcome::Accepted { result, .. } => {
                let event_id = result.event_id.clone();
                let edge_seq = commit.push_result(result);
                commit.dlq_removals.push(e.id);
                RetryOutcome::Reprocessed { event_id, edge_seq }
            }
            Outcome::Duplicate { reason, .. } => {
                commit.dlq_removals.push(e.id);
                RetryOutcome::Duplicate { reason }
            }
            Outcome::Rejected(r) => {
                let attempts = e.attempts.saturating_add(1);
                let auto_retry_at = if r.transient {
                    self.dlq.auto_retry.next_at(attempts, now)
                } else {
                    None
                };
                let outcome = RetryOutcome::Failed {
                    stage: r.stage,
                    reason: r.reason.clone(),
                    attempts,
                    auto_retry_at,
                };
                commit.dlq_schedule.push((e.id, auto_retry_at));
                commit.dlq_updates.push(DlqEntry {
                    event_id: r.event_id.or(e.event_id),
                    device: r.device.or(e.device),
                    stage: r.stage,
                    reason: r.reason,
                    attempts,
                    last_seen: now,
                    ..e
                });
                outcome
            }
        })
    }

    /// Recomputes when the next automatic retry is due.
    fn reschedule(&mut self) -> Result<(), StoreError> {
        let mut next: Option<i64> = None;
        for s in self.store.reader().dlq_schedule() {
            let (_, at) = s?;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        self.next_auto_retry = next;
        Ok(())
    }

    /// After any commit: count its anomalies and corrections, report what the caps evicted.
    fn after_commit(&self, commit: &Commit, receipt: &Committed) {
        // Counted after the commit, like every other outcome: a result flagged by the
        // engine's anomaly detectors is durable in the outbox by now.
        let anomalies = commit
            .results()
            .iter()
            .filter(|r| r.status == proto::Status::Anomaly)
            .count() as u64;
        if anomalies > 0 {
            metrics::counter!(m::ANOMALIES).increment(anomalies);
        }
        if !commit.corrections.is_empty() {
            metrics::counter!(m::CORRECTED).increment(commit.corrections.len() as u64);
        }
        metrics::counter!(m::MISSED).increment(commit.missed_declared_seqs);
        metrics::counter!(m::MISSED_FILLED_LATE).increment(commit.missed_filled_late);
        if !receipt.missed_dropped.is_empty() {
            metrics::counter!(m::MISSED_DROPPED).increment(receipt.missed_dropped.len() as u64);
            let oldest = &receipt.missed_dropped[0];
            tracing::warn!(
                dropped = receipt.missed_dropped.len(),
                oldest_id = oldest.id,
                oldest_device = oldest.device.as_str(),
                "missed records over pipeline.missed_max_records: dropped the oldest"
            );
        }
        let dropped = &receipt.dlq_dropped;
        if dropped.is_empty() {
            return;
        }
        metrics::counter!(m::DLQ_DROPPED).increment(dropped.len() as u64);
        for d in dropped.iter().take(5) {
            tracing::warn!(
                dlq_id = d.id,
                device = d.device.as_deref().unwrap_or("-"),
                stage = %d.stage,
                reason = %d.reason,
                "DLQ full: dropped the oldest entry (full_policy = drop_oldest)"
            );
        }
        if dropped.len() > 5 {
            tracing::warn!(
                dropped = dropped.len(),
                "DLQ full: dropped {} more of the oldest entries",
                dropped.len() - 5
            );
        }
        self.live.set_last_error(
            now_ms(),
            format!("DLQ full: dropped {} oldest entries", dropped.len()),
        );
    }

    /// A late result (the last one in `commit`) makes the device's next result stale: that one
    /// was calculated across the gap. If it is in this batch (not yet durable, not yet sent),
    /// it is recalculated against the late one and corrected here, at most once (the sled
    /// correction history); once it is in the outbox, the cloud corrects it where it stores
    /// it (cloud-bridge `verify.rs`), so each tier corrects only what it holds.
    fn correct_successor(&mut self, commit: &mut Commit, now: i64) -> Result<(), StoreError> {
        let Some(late) = commit.results().last() else {
            return Ok(());
        };
        let Some(next_seq) = self.state.device(&late.device).and_then(|d| {
            d.earlier(&late.event_type)
                .iter()
                .chain(d.previous(&late.event_type))
                .filter(|r| r.ts > late.ts)
                .min_by_key(|r| r.ts)
                .map(|r| r.seq)
        }) else {
            return Ok(());
        };
        let n = commit.results().len() - 1;
        let Some(i) = commit.results()[..n].iter().rposition(|r| {
            r.device == late.device && r.event_type == late.event_type && r.seq == next_seq
        }) else {
            return Ok(());
        };
        let reading = Reading::from_result(late);
        let late_id = late.event_id.clone();
        let stale = &commit.results()[i];
        // Refused against it: the cloud dead-letters it for a person.
        let verify::Restated::Changed { reason } =
            verify::against_late(&self.engine, stale, &reading, &late_id, 1e-9)
        else {
            return Ok(());
        };
        let before = self.store.corrected(&stale.event_id)?
            || commit
                .corrections
                .iter()
                .any(|(id, _)| *id == stale.event_id);
        if correct::decide(stale, before, &reason) != correct::Decision::Correct {
            return Ok(());
        }
        let Ok(mut fixed) = correct::apply(
            &self.engine,
            stale,
            Some(&reading),
            &reason,
            now,
            CorrectedBy::Edge,
        ) else {
            return Ok(());
        };
        fixed.flags.push(flags::PREVIOUS_ARRIVED_LATE.to_string());
        tracing::info!(event_id = %fixed.event_id, %reason, "corrected at the edge");
        commit
            .corrections
            .push((fixed.event_id.clone(), CorrectionMark { reason, at: now }));
        commit.replace_result(i, fixed);
        Ok(())
    }

    /// One group commit. Public for benchmarks and tests that drive the pipeline directly.
    pub fn process(
        &mut self,
        batch: &mut Vec<Inbound>,
        acks: &mut AckSet,
    ) -> Result<(), StoreError> {
        let n = batch.len();
        let started = Instant::now();
        let mut commit = self.store.begin();
        let (mut dups, mut gaps, mut missed, mut late) = (0u64, 0u64, 0u64, 0u64);
        for inbound in batch.drain(..) {
            let input = Input {
                topic: &inbound.topic,
                payload: &inbound.payload,
                received_at: inbound.received_at,
                gateway: &self.gateway,
                replay: false,
            };
            let outcome = self.engine.process(&mut self.state, &input);
            if let Some(device) = outcome_device(&outcome) {
                self.track(device, inbound.received_at, &mut commit)?;
            }
            match outcome {
                Outcome::Accepted {
                    result,
                    gap,
                    late: was_late,
                } => {
                    if let Some(g) = gap {
                        gaps += 1;
                        missed += g.len();
                    }
                    late += u64::from(was_late);
                    let older = result
                        .flags
                        .iter()
                        .any(|f| f == flags::EARLIER_PREVIOUS || f == flags::OUT_OF_ORDER);
                    commit.push_result(result);
                    if older {
                        self.correct_successor(&mut commit, inbound.received_at)?;
                    }
                }
                Outcome::Duplicate { .. } => dups += 1,
                Outcome::Rejected(r) => {
                    metrics::counter!(m::REJECTED, "stage" => r.stage.as_str()).increment(1);
                    if let Some(g) = r.gap {
                        gaps += 1;
                        missed += g.len();
                    }
                    let transient = r.transient;
                    let id = commit.push_dlq(DlqEntry {
                        id: 0,
                        event_id: r.event_id,
                        device: r.device,
                        topic: inbound.topic,
                        stage: r.stage,
                        reason: r.reason,
                        attempts: 1,
                        first_seen: inbound.received_at,
                        last_seen: inbound.received_at,
                        payload: inbound.payload.to_vec(),
                    });
                    if transient
                        && let Some(at) = self.dlq.auto_retry.next_at(1, inbound.received_at)
                    {
                        commit.dlq_schedule.push((id, Some(at)));
                        self.next_auto_retry = Some(self.next_auto_retry.map_or(at, |n| n.min(at)));
                    }
                }
            }
            acks.push(inbound.ack);
        }
        commit.states = self.state.take_dirty();
        self.stage_gaps(&mut commit);
        let engine_done = Instant::now();
        let accepted = commit.results().len() as u64;
        // A full outbox blocks here (policy `block`) with the batch's acks still held, so
        // devices see back-pressure instead of loss; `drop_oldest` makes room instead.
        self.outbox.make_room()?;
        let receipt = self.store.commit(&commit)?;
        acks.release();
        let committed = Instant::now();
        self.after_commit(&commit, &receipt);
        let live = &self.live;
        live.ingested.fetch_add(n as u64, Ordering::Relaxed);
        live.accepted.fetch_add(accepted, Ordering::Relaxed);
        live.rejected
            .fetch_add(commit.dlq().len() as u64, Ordering::Relaxed);
        live.duplicates.fetch_add(dups, Ordering::Relaxed);
        live.gaps.fetch_add(gaps, Ordering::Relaxed);
        live.missed.fetch_add(missed, Ordering::Relaxed);
        live.late.fetch_add(late, Ordering::Relaxed);
        live.corrected
            .fetch_add(commit.corrections.len() as u64, Ordering::Relaxed);
        if let Some(d) = commit.dlq().last() {
            let what = describe_rejection(d.stage, &d.reason, d.device.as_deref());
            live.set_last_error(d.last_seen, what);
        }

        metrics::counter!(m::INGESTED).increment(n as u64);
        metrics::counter!(m::ACCEPTED).increment(accepted);
        metrics::counter!(m::DUPLICATES).increment(dups);
        metrics::counter!(m::GAPS).increment(gaps);
        metrics::counter!(m::GAP_SEQS).increment(missed);
        metrics::counter!(m::LATE).increment(late);
        metrics::histogram!(m::BATCH_SIZE).record(n as f64);
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "engine")
            .record((engine_done - started).as_secs_f64());
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "commit")
            .record((committed - engine_done).as_secs_f64());
        self.publish_gauges();
        Ok(())
    }

    fn publish_gauges(&self) {
        let c = self.store.counters();
        metrics::gauge!(m::DLQ_ENTRIES).set(c.dlq_entries as f64);
        metrics::gauge!(m::DLQ_BYTES).set(c.dlq_bytes as f64);
        metrics::gauge!(m::MISSED_RECORDS).set(c.missed_records as f64);
        let open: usize = self.gaps.values().map(DeviceGaps::open).sum();
        metrics::gauge!(m::GAPS_OPEN).set(open as f64);
    }
}

/// The device whose state an outcome may have changed.
fn outcome_device(o: &Outcome) -> Option<&str> {
    match o {
        Outcome::Accepted { result, .. } => Some(&result.device),
        Outcome::Duplicate { .. } => None,
        Outcome::Rejected(r) => r.device.as_deref(),
    }
}

#[cfg(test)]
#[path = "pipeline_dlq_tests.rs"]
mod dlq_tests;

#[cfg(test)]
#[path = "pipeline_missed_tests.rs"]
mod missed_tests;

#[cfg(test)]
#[path = "pipeline_correction_tests.rs"]
mod correction_tests;
