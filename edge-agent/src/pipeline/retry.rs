//! DLQ retries: the scheduler of automatic retries of transient failures, and the retry and
//! purge runs (manual from `dlq retry|purge`, automatic when due).
//!
//! A retried entry goes through the same engine and group commit as live traffic, as a
//! replay, and leaves the DLQ in the commit that stores its result, so the store's counters
//! stay exact whichever way an entry leaves.

use std::sync::atomic::Ordering;

use engine::{Input, Outcome};
use proto::DlqEntry;

use super::Pipeline;
use super::batch::outcome_device;
use crate::dlq::{self, AutoRetry, PurgeReport, RetryItem, RetryOutcome, RetryReport, Selection};
use crate::ingest::now_ms;
use crate::store::{Commit, StoreError, StoreReader};
use crate::telemetry as m;

/// When the next automatic retry is due, and when each new failure's first one will be.
pub(super) struct RetryScheduler {
    policy: AutoRetry,
    /// The earliest scheduled retry (epoch ms).
    due: Option<i64>,
}

impl RetryScheduler {
    pub(super) fn new(policy: AutoRetry) -> RetryScheduler {
        RetryScheduler { policy, due: None }
    }

    pub(super) fn due(&self) -> Option<i64> {
        self.due
    }

    /// Schedules the first retry of a new transient failure `id`, seen at `now`.
    pub(super) fn schedule_new(&mut self, id: u64, now: i64, commit: &mut Commit) {
        if let Some(at) = self.policy.next_at(1, now) {
            commit.dlq_schedule.push((id, Some(at)));
            self.due = Some(self.due.map_or(at, |n| n.min(at)));
        }
    }

    /// The next retry after `attempts` failed ones, if the policy allows another.
    fn next_at(&self, attempts: u32, now: i64) -> Option<i64> {
        self.policy.next_at(attempts, now)
    }

    /// Up to `max` entries whose retry is due at `now`, oldest schedule first.
    fn due_ids(&self, reader: &StoreReader, now: i64, max: usize) -> Result<Vec<u64>, StoreError> {
        reader
            .dlq_schedule()
            .filter_map(|s| match s {
                Ok((id, at)) if at <= now => Some(Ok(id)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .take(max)
            .collect()
    }

    /// Recomputes when the next retry is due, from the schedule as stored.
    pub(super) fn reschedule(&mut self, reader: &StoreReader) -> Result<(), StoreError> {
        let mut next: Option<i64> = None;
        for s in reader.dlq_schedule() {
            let (_, at) = s?;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        self.due = next;
        Ok(())
    }
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

impl Pipeline {
    /// `dlq retry`: re-injects the selected entries (the same engine and group commit as live
    /// traffic, as replays); an entry that becomes a result leaves the DLQ in the same commit.
    pub fn retry(&mut self, sel: &Selection) -> Result<RetryReport, StoreError> {
        let ids = dlq::resolve(&self.store.reader(), sel)?;
        self.retry_ids(&ids, Trigger::Manual)
    }

    /// `dlq purge`: deletes the selected entries.
    pub fn purge(&mut self, sel: &Selection) -> Result<PurgeReport, StoreError> {
        let report = dlq::purge(&mut self.store, sel)?;
        self.retries.reschedule(&self.store.reader())?;
        self.publish_gauges();
        Ok(report)
    }

    /// Retries the transient failures that are due.
    pub(super) fn auto_retry(&mut self, now: i64) -> Result<(), StoreError> {
        let due = self
            .retries
            .due_ids(&self.store.reader(), now, self.max_batch)?;
        if due.is_empty() {
            return self.retries.reschedule(&self.store.reader());
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
            self.gaps.stage(&mut commit);
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
        self.retries.reschedule(&self.store.reader())?;
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
            via: proto::Via::Gateway,
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
                    self.retries.next_at(attempts, now)
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
                    subject: Some(r.subject),
                    attempts,
                    last_seen: now,
                    ..e
                });
                outcome
            }
        })
    }
}
