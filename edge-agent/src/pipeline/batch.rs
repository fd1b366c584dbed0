//! The engine driver and group commit: a batch of inbound messages through the engine into
//! one commit, and only once it is durable their acks.
//!
//! Invariant: a message's ack is released only after the commit that holds its outcome
//! (result or DLQ entry) returned, and commits happen in arrival order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use engine::state::MAX_DEVICES_RULE;
use engine::{Input, Outcome, Reading, correct, flags, verify};
use proto::{CorrectedBy, DlqEntry, Subject};

use super::Pipeline;
use crate::ingest::{AckSet, Inbound, now_ms};
use crate::status::describe_rejection;
use crate::store::{Commit, Committed, CorrectionMark, StoreError, SyncPoint};
use crate::tap::Tapped;
use crate::telemetry as m;

/// A batch applied to the store, waiting for its sync.
pub(super) struct Applied {
    pub point: SyncPoint,
    /// Its results and DLQ entries for the tap, shown once it is durable.
    pub tapped: Vec<Arc<Tapped>>,
    /// When its apply began: its commit time runs from there to its acks.
    pub started: Instant,
}

impl Pipeline {
    /// One group commit, synced on this thread before the acks are released. Public for
    /// benchmarks and tests that drive the pipeline directly; the running pipeline applies
    /// here and syncs on its commit stage ([`super::commit`]).
    pub fn process(
        &mut self,
        batch: &mut Vec<Inbound>,
        acks: &mut AckSet,
    ) -> Result<(), StoreError> {
        let applied = self.apply(batch, acks)?;
        self.store.durable().sync_through(applied.point)?;
        acks.release();
        self.tap.send(applied.tapped);
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "commit")
            .record(applied.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The batch through the engine and into the store, applied but not yet synced: `acks`
    /// holds its acks, which may be released (and its items tapped) only once its point is
    /// durable.
    pub(super) fn apply(
        &mut self,
        batch: &mut Vec<Inbound>,
        acks: &mut AckSet,
    ) -> Result<Applied, StoreError> {
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
                via: proto::Via::Gateway,
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
                    if r.subject == Subject::Rule(MAX_DEVICES_RULE.to_string()) {
                        metrics::counter!(m::DEVICES_REFUSED).increment(1);
                    }
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
                        subject: Some(r.subject),
                        attempts: 1,
                        first_seen: inbound.received_at,
                        last_seen: inbound.received_at,
                        payload: inbound.payload.to_vec(),
                    });
                    if transient {
                        self.retries
                            .schedule_new(id, inbound.received_at, &mut commit);
                    }
                }
            }
            acks.push(inbound.ack);
        }
        commit.states = self.state.take_dirty();
        self.gaps.stage(&mut commit);
        let engine_done = Instant::now();
        let accepted = commit.results().len() as u64;
        // A full outbox blocks here (policy `block`) with the batch's acks still held, so
        // devices see back-pressure instead of loss; `drop_oldest` makes room instead.
        self.outbox.make_room()?;
        let applied = self.store.apply(&commit)?;
        self.count_commit(&commit, &applied.receipt);
        let tapped = self.tap.items(&commit);
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
        self.publish_gauges();
        Ok(Applied {
            point: applied.point,
            tapped,
            started: engine_done,
        })
    }

    /// Brings the device's tracked gaps in line with the engine's state after one of its
    /// messages (see [`super::gaps::GapTimer::track`]).
    pub(super) fn track(
        &mut self,
        device: &str,
        now: i64,
        commit: &mut Commit,
    ) -> Result<(), StoreError> {
        let Some(seq) = self.state.device(device).map(|d| d.seq()) else {
            return Ok(());
        };
        self.gaps
            .track(device, seq, now, commit, &self.store.reader())
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
        let Some(next_seq) = self
            .state
            .device(&late.device)
            .and_then(|d| d.readings(&late.event_type)?.after(late.ts))
            .map(|r| r.seq)
        else {
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

    /// After a durable commit: show it to the tap, and [`count_commit`](Self::count_commit).
    pub(super) fn after_commit(&self, commit: &Commit, receipt: &Committed) {
        self.tap.committed(commit);
        self.count_commit(commit, receipt);
    }

    /// After any commit (applied or durable): count its anomalies and corrections, report
    /// what the caps evicted.
    fn count_commit(&self, commit: &Commit, receipt: &Committed) {
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
}

/// The device whose state an outcome may have changed.
pub(super) fn outcome_device(o: &Outcome) -> Option<&str> {
    match o {
        Outcome::Accepted { result, .. } => Some(&result.device),
        Outcome::Duplicate { .. } => None,
        Outcome::Rejected(r) => r.device.as_deref(),
    }
}
