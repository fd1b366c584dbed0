//! The pipeline's side of the admin socket: DLQ writes (`dlq retry`, `dlq purge`) handed to
//! the pipeline thread, which owns every store write while the agent runs, and served between
//! batches so they take the same group-commit path as live traffic; and a reloaded config's
//! engine, swapped between batches for the same reason (no batch is made by two engines).

use tokio::sync::{mpsc, oneshot};

use engine::Engine;

use super::Pipeline;
use crate::dlq::{PurgeReport, RetryReport, Selection};
use crate::store::StoreError;

/// A DLQ write for the pipeline thread, from the admin socket; the reply goes back on the
/// oneshot (an `Err` is a store failure, after which the pipeline stops).
pub enum AdminCall {
    Retry(Selection, oneshot::Sender<Result<RetryReport, StoreError>>),
    Purge(Selection, oneshot::Sender<Result<PurgeReport, StoreError>>),
    /// A reloaded config's engine (`crate::reload`): used from the next batch on.
    Engine(Box<Engine>, oneshot::Sender<Result<(), StoreError>>),
}

/// The calls still to come; once every sender is gone it stays quiet instead of waking the
/// pipeline with `None` forever.
pub(super) struct AdminInbox {
    rx: mpsc::Receiver<AdminCall>,
    open: bool,
}

impl AdminInbox {
    pub(super) fn new(rx: mpsc::Receiver<AdminCall>) -> AdminInbox {
        AdminInbox { rx, open: true }
    }

    /// The next call; pending forever once the admin side is gone.
    pub(super) async fn next(&mut self) -> AdminCall {
        if self.open {
            match self.rx.recv().await {
                Some(call) => return call,
                None => self.open = false,
            }
        }
        std::future::pending().await
    }
}

impl Pipeline {
    /// Runs one call and replies; a store failure is also returned, to stop the pipeline.
    pub(super) fn serve(&mut self, call: AdminCall) -> Result<(), StoreError> {
        match call {
            AdminCall::Retry(sel, reply) => answer(reply, self.retry(&sel)),
            AdminCall::Purge(sel, reply) => answer(reply, self.purge(&sel)),
            AdminCall::Engine(engine, reply) => {
                self.engine = *engine;
                answer(reply, Ok(()))
            }
        }
    }
}

/// Replies with the outcome and hands a failure back too, to stop the pipeline.
fn answer<T>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    outcome: Result<T, StoreError>,
) -> Result<(), StoreError> {
    let failed = outcome.as_ref().err().cloned();
    let _ = reply.send(outcome);
    failed.map_or(Ok(()), Err)
}
