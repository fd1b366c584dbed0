//! The pipeline thread: batches of inbound messages → engine → one durable commit → acks.
//!
//! It runs on a thread of its own because both halves of its work block: the engine is pure
//! CPU and the commit waits for `fsync`. Batching is natural group commit: while one batch is
//! being flushed the ingest side keeps filling the channel, so under load the next batch is
//! larger and the fsync cost per message falls, while a lone message is committed at once.
//!
//! Invariant: a message's ack is released only after the commit that holds its outcome (result
//! or DLQ entry) returned, and commits happen in arrival order.

use std::time::Instant;

use engine::{Engine, Input, Outcome, State};
use proto::DlqEntry;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::ingest::{AckSet, Inbound};
use crate::store::{Commit, Store, StoreError};
use crate::telemetry as m;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most messages in one group commit.
    pub max_batch: usize,
    /// Messages buffered between ingest and the pipeline; when full, ingest stops reading
    /// sockets (devices see back-pressure, nothing is dropped).
    pub queue_capacity: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_batch: 4096,
            queue_capacity: 16384,
        }
    }
}

pub struct Pipeline {
    engine: Engine,
    state: State,
    store: Store,
    gateway: String,
    max_batch: usize,
}

impl Pipeline {
    /// Loads every device's state from the store so sequence tracking and stateful
    /// calculations continue exactly where the last run stopped.
    pub fn new(
        engine: Engine,
        store: Store,
        gateway: String,
        cfg: &PipelineConfig,
    ) -> Result<Pipeline, StoreError> {
        let mut state = State::default();
        for (device, s) in store.device_states()? {
            state.insert(device, s);
        }
        let p = Pipeline {
            engine,
            state,
            store,
            gateway,
            max_batch: cfg.max_batch.max(1),
        };
        p.publish_gauges();
        Ok(p)
    }

    /// Runs until every sender of `rx` is gone and the queue is drained; returns the store so
    /// the caller can close it after the last commit.
    pub fn run(mut self, mut rx: mpsc::Receiver<Inbound>) -> Result<Store, StoreError> {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut acks = AckSet::default();
        while rx.blocking_recv_many(&mut batch, self.max_batch) > 0 {
            self.process(&mut batch, &mut acks)?;
        }
        Ok(self.store)
    }

    /// One group commit. Public for benchmarks and tests that drive the pipeline directly.
    pub fn process(
        &mut self,
        batch: &mut Vec<Inbound>,
        acks: &mut AckSet,
    ) -> Result<(), StoreError> {
        let n = batch.len();
        let started = Instant::now();
        let mut commit = Commit::default();
        let (mut dups, mut gaps, mut missed, mut late) = (0u64, 0u64, 0u64, 0u64);
        for inbound in batch.drain(..) {
            let input = Input {
                topic: &inbound.topic,
                payload: &inbound.payload,
                received_at: inbound.received_at,
                gateway: &self.gateway,
                replay: false,
            };
            match self.engine.process(&mut self.state, &input) {
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
                    commit.results.push(result);
                }
                Outcome::Duplicate { .. } => dups += 1,
                Outcome::Rejected(r) => {
                    metrics::counter!(m::REJECTED, "stage" => r.stage.as_str()).increment(1);
                    commit.dlq.push(DlqEntry {
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
                }
            }
            acks.push(inbound.ack);
        }
        commit.states = self.state.take_dirty();
        let engine_done = Instant::now();
        let accepted = commit.results.len() as u64;
        self.store.commit(&mut commit)?;
        acks.release();
        let committed = Instant::now();

        metrics::counter!(m::INGESTED).increment(n as u64);
        metrics::counter!(m::ACCEPTED).increment(accepted);
        metrics::counter!(m::DUPLICATES).increment(dups);
        metrics::counter!(m::GAPS).increment(gaps);
        metrics::counter!(m::MISSED).increment(missed);
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
        metrics::gauge!(m::OUTBOX_DEPTH).set(c.outbox_entries as f64);
        metrics::gauge!(m::OUTBOX_BYTES).set(c.outbox_bytes as f64);
        metrics::gauge!(m::DLQ_ENTRIES).set(c.dlq_entries as f64);
    }
}
