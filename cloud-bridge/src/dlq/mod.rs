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

use std::fmt::Debug;

use engine::Reading;
use proto::{EventResult, Stage};
use serde::{Deserialize, Serialize};

use crate::backend::BoxFuture;

mod dir;
pub mod processor;
pub mod report;
mod sqs;

pub use dir::DirQueue;
pub use sqs::SqsQueue;

/// One DLQ message: the DLQ entry of INTERFACES.md plus where the record is and what it was
/// computed against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqMessage {
    /// The same failure of the same record has the same id (`{stage}:{gateway}:{edge_seq}`),
    /// so a message sent twice (a redelivered batch) is handled as one.
    pub id: String,
    pub event_id: Option<String>,
    pub device: Option<String>,
    pub stage: Stage,
    /// Names the field, rule or check.
    pub reason: String,
    pub attempts: u32,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
    /// The result record as JSON text, as stored.
    pub payload: String,
    pub gateway: Option<String>,
    pub edge_seq: Option<u64>,
    /// The object under `events/` that holds the record, if it is stored.
    pub object_key: Option<String>,
    /// The previous reading the record was computed against, when the bridge knew it.
    #[serde(default)]
    pub previous: Option<Reading>,
}

impl DlqMessage {
    /// A message about a stored result record.
    pub fn for_record(
        stage: Stage,
        reason: String,
        record: &EventResult,
        object_key: Option<&str>,
        previous: Option<&Reading>,
        now: i64,
    ) -> DlqMessage {
        let at = proto::timestamp::format_rfc3339(now);
        DlqMessage {
            id: format!("{stage}:{}:{}", record.gateway, record.edge_seq),
            event_id: Some(record.event_id.clone()),
            device: Some(record.device.clone()),
            stage,
            reason,
            attempts: 1,
            first_seen: at.clone(),
            last_seen: at,
            payload: serde_json::to_string(record).unwrap_or_default(),
            gateway: Some(record.gateway.clone()),
            edge_seq: Some(record.edge_seq),
            object_key: object_key.map(String::from),
            previous: previous.cloned(),
        }
    }
}

/// A message as received: its body, the handle to delete it, how often it was received.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: String,
    pub receipt: String,
    pub receive_count: u32,
    /// The queue's id of the message (SQS MessageId), for listings.
    pub message_id: String,
}

pub trait DeadLetterQueue: Send + Sync + Debug {
    fn send<'a>(&'a self, messages: &'a [DlqMessage]) -> BoxFuture<'a, ()>;
    /// Up to `max` (≤ 10) messages, waiting up to `wait_s` for the first; each stays invisible
    /// to other receivers for `visibility_s`.
    fn receive(&self, max: i32, wait_s: i32, visibility_s: i32) -> BoxFuture<'_, Vec<Received>>;
    fn delete<'a>(&'a self, receipt: &'a str) -> BoxFuture<'a, ()>;
    /// (messages waiting, messages received and not yet deleted), approximate.
    fn depth(&self) -> BoxFuture<'_, (u64, u64)>;
    /// Where the queue is, for people.
    fn location(&self) -> String;
}
