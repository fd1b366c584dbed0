//! The commit stage: a thread of its own syncs each applied batch and only then releases its
//! acks, so the engine runs on batch N+1 while batch N waits for the disk.
//!
//! Before, the pipeline thread ran the engine, then waited out sled's flush, `fdatasync` and
//! the directory `fsync`, then took the next batch: the CPU and the disk never overlapped,
//! and at moderate rates the fixed cost of each sync set the latency. Batches that arrive
//! while a sync runs share the next one (group commit across batches).
//!
//! Invariant: an ack is released (and the batch shown to `edge-agent tap`) only after a sync
//! that began after its batch was applied returned. A failed sync releases nothing (devices
//! send again) and stops the stage; the pipeline meets the error at its next batch, or when
//! it finishes.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use super::batch::Applied;
use crate::ingest::AckSet;
use crate::store::{Durable, StoreError};
use crate::tap::Tap;
use crate::telemetry as m;

/// Applied batches waiting for their sync at most; beyond it the pipeline waits (their acks
/// hold the devices' byte budgets, so ingest slows down before memory grows). A batch or
/// two ahead is what overlaps the engine with the disk (with 8, the quick bench's peak RSS
/// was 47 MB against 33 MB without the stage).
const IN_FLIGHT: usize = 2;

/// An applied batch and the acks it releases once synced.
struct Ticket {
    applied: Applied,
    acks: AckSet,
}

pub(super) struct CommitStage {
    tx: Option<SyncSender<Ticket>>,
    /// Released (emptied) ack sets, for the pipeline to fill again.
    spare: Receiver<AckSet>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
}

impl CommitStage {
    pub(super) fn start(durable: Arc<Durable>, tap: Tap) -> std::io::Result<CommitStage> {
        let (tx, rx) = sync_channel::<Ticket>(IN_FLIGHT);
        let (spare_tx, spare) = sync_channel::<AckSet>(IN_FLIGHT + 1);
        let thread = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || run(&durable, &tap, &rx, &spare_tx))?;
        Ok(CommitStage {
            tx: Some(tx),
            spare,
            thread: Some(thread),
        })
    }

    /// Hands an applied batch to the stage with its acks; `acks` is left as an empty set to
    /// fill next.
    pub(super) fn submit(&mut self, applied: Applied, acks: &mut AckSet) -> Result<(), StoreError> {
        let next = self.spare.try_recv().unwrap_or_default();
        let ticket = Ticket {
            applied,
            acks: std::mem::replace(acks, next),
        };
        let sent = self.tx.as_ref().map(|tx| tx.send(ticket).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The stage stopped: its error is the reason.
        self.finish()
    }

    /// Waits until every submitted batch is synced and acknowledged.
    pub(super) fn finish(&mut self) -> Result<(), StoreError> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for CommitStage {
    fn drop(&mut self) {
        // Waits for the syncs in flight, so a pipeline that stops on an error still releases
        // the acks of what it had made durable.
        let _ = self.finish();
    }
}

fn run(
    durable: &Durable,
    tap: &Tap,
    rx: &Receiver<Ticket>,
    spare: &SyncSender<AckSet>,
) -> Result<(), StoreError> {
    let mut tickets = Vec::with_capacity(IN_FLIGHT);
    while let Ok(first) = rx.recv() {
        tickets.push(first);
        tickets.extend(rx.try_iter());
        let last = tickets.last().expect("one ticket at least").applied.point;
        // On failure the tickets drop here with their acks unreleased.
        durable.sync_through(last)?;
        let synced = Instant::now();
        for mut t in tickets.drain(..) {
            t.acks.release();
            tap.send(t.applied.tapped);
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "commit")
                .record((synced - t.applied.started).as_secs_f64());
            let _ = spare.try_send(t.acks);
        }
    }
    Ok(())
}
