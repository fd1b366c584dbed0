//! The cloud DLQ: results the bridge could not store as correct, in an SQS queue
//! (`aws.dlq_queue`; a directory in the local backend), and the processor that empties it.
//!
//! What goes in: a result the current engine refuses (stage `cloud`), a correction that
//! cannot be made here (stage `correction`: corrected once already and detected again, or the
//! previous reading it needs is unknown). The record itself is stored as the gateway sent it
//! (nothing is lost); the message says where (`object_key`). [`processor`] takes each
//! message: never corrected → recalculated and the stored record replaced; corrected before,
//! or not recalculable → `{prefix}failures/` for a person; then the message is deleted.
//! [`report`] is `cloud-bridge dlq list|stats`.

use tracing::warn;

use crate::backend::{DeadLetterQueue, Entry};
use crate::detail::DetailType;

pub mod processor;
pub mod report;

pub use crate::backend::DlqMessage;

/// Sends `messages` to the DLQ; returns their `EventDeadLettered` events, to be published
/// once the messages are in the queue.
pub async fn send(
    dlq: &dyn DeadLetterQueue,
    messages: &[DlqMessage],
) -> anyhow::Result<Vec<Entry>> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    dlq.send(messages).await?;
    let mut entries = Vec::with_capacity(messages.len());
    for m in messages {
        warn!(gateway = ?m.gateway, event_id = ?m.event_id, stage = %m.stage, reason = %m.reason, "dead-lettered");
        entries.push((DetailType::EventDeadLettered, serde_json::to_string(m)?));
    }
    Ok(entries)
}
