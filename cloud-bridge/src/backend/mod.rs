//! Where the pipeline keeps things, behind six small traits: objects ([`ObjectStore`]: S3 or
//! a local directory), the per-gateway `hwm` + claim state ([`StateStore`]: DynamoDB or a local
//! file), the engine state of gateway-less devices ([`DeviceStore`]: DynamoDB or a directory),
//! events ([`EventPublisher`]: EventBridge or local NDJSON files), the correction history
//! ([`CorrectionHistory`]) and the cloud DLQ ([`DeadLetterQueue`]: SQS or a directory).
//!
//! This module holds only the traits and the records they carry. The exactly-once logic lives
//! in [`crate::pipeline`]; a backend only performs each operation with the condition the trait
//! documents, atomically. Two backends, one folder each and one file per part:
//! [`aws::backend`] (any number of bridges) and [`local::backend`] (one process: the demo's
//! cloud on the same machine).
//!
//! The correction history is what makes a correction happen **at most once** across any
//! number of bridges and Lambda instances: a record is written only if none exists for the
//! event, and only the writer of the record overwrites the stored result. The request id lets
//! the same request (a redelivered batch, a DLQ message received twice) finish its own
//! correction instead of mistaking it for a second one.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use engine::Reading;
use proto::{EventResult, Stage, Subject};

use crate::detail::DetailType;

pub mod aws;
pub mod local;

/// A boxed, sendable future of a fallible result (the traits are used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// One event before it is sent: (detail-type, detail JSON).
pub type Entry = (DetailType, String);

/// A range of one gateway's `edge_seq`s that a bridge has claimed and is storing (or died
/// storing) in the object `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub from: u64,
    pub to: u64,
    pub key: String,
    /// When it was claimed (or last refreshed), epoch ms of the claiming bridge.
    pub at: i64,
    pub owner: String,
}

/// A gateway's sequence state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayState {
    /// Every `edge_seq` ≤ hwm is stored (or was declared missed).
    pub hwm: u64,
    /// Whether the gateway has state yet (conditions differ for a fresh gateway).
    pub exists: bool,
    pub claim: Option<Claim>,
    /// Keys of objects of abandoned claims, to delete before anything else is claimed.
    pub garbage: Vec<String>,
}

/// Something a gateway reported that the cloud announces exactly once, across
/// redeliveries and bridges ([`StateStore::begin_announce`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A missed-event record, by its id on the gateway.
    Missed(u64),
    /// A store the gateway found damaged and moved aside, by when (epoch ms).
    Quarantine(i64),
}

impl Notice {
    /// The kind and number that name its state item: `{kind}#{gateway}#{number}`.
    pub fn kind(self) -> &'static str {
        match self {
            Notice::Missed(_) => "missed-dev",
            Notice::Quarantine(_) => "quarantine",
        }
    }

    pub fn number(self) -> i128 {
        match self {
            Notice::Missed(id) => i128::from(id),
            Notice::Quarantine(at) => i128::from(at),
        }
    }
}

/// Where the announcement of a [`Notice`] stands
/// ([`StateStore::begin_announce`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// This bridge announces it now (a new record, a retry of its own attempt, or the stale
    /// attempt of a bridge that died mid-way), then calls [`StateStore::end_announce`].
    Mine,
    /// It was announced already.
    Done,
    /// Another bridge is announcing it right now (its status message stays unacked until it
    /// is done, so a crash there leads to a redelivery that takes over).
    Busy,
}

/// Objects by key (`events/dt=…/gateway=…/….ndjson`, `failures/…`).
pub trait ObjectStore: Send + Sync + Debug {
    /// Writes the whole object (replacing one with the same key).
    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>, content_type: &'a str) -> BoxFuture<'a, ()>;
    /// Deletes it; a missing object is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    /// Every key that starts with `prefix`, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>>;
    /// The whole object, or `None` if there is none with that key (the anomaly model reads
    /// history and models with it; the pipeline never reads objects).
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move { Ok(self.get_versioned(key).await?.map(|(body, _)| body)) })
    }
    /// Where the objects are, for people (`s3://bucket`, a directory).
    fn location(&self) -> String;
    /// The object and its version tag (S3's ETag), or `None` if there is none.
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<(Vec<u8>, String)>>;
    /// Replaces the object only if its version tag is still `etag` (S3 `If-Match`): false,
    /// and nothing written, if someone changed it since it was read.
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        content_type: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, bool>;
}

/// The per-gateway state. Every conditional operation returns `Ok(false)` when its condition
/// did not hold (someone else changed the state first) and then changes nothing.
pub trait StateStore: Send + Sync + Debug {
    /// The current state (strongly consistent).
    fn read<'a>(&'a self, gateway: &'a str) -> BoxFuture<'a, GatewayState>;
    /// Records `claim` if the state is still `seen` (same hwm) with no claim and no garbage
    /// (or, if `seen` did not exist, the gateway still has no state).
    fn claim<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        claim: &'a Claim,
    ) -> BoxFuture<'a, bool>;
    /// Sets the claim's `at` if the claim (by key) is still there.
    fn refresh<'a>(&'a self, gateway: &'a str, claim: &'a Claim, at: i64) -> BoxFuture<'a, bool>;
    /// hwm = claim.to and the claim removed, if the claim (by key) is there and hwm = from - 1.
    fn commit<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool>;
    /// Removes a stale claim (same key and `at`) and adds its key to the garbage.
    fn take_over<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool>;
    /// Forgets garbage keys whose objects were deleted.
    fn clear_garbage<'a>(&'a self, gateway: &'a str, keys: &'a [String]) -> BoxFuture<'a, ()>;
    /// Records `from..=to` as missed and sets hwm = to, under the conditions of `claim`.
    fn skip<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        from: u64,
        to: u64,
        now: i64,
    ) -> BoxFuture<'a, bool>;
    /// Starts announcing the gateway's `notice` (DynamoDB item `{kind}#{gateway}#{number}`
    /// written with `attribute_not_exists`): [`Announce::Mine`] if there is no such item, or
    /// its announcement by `owner` (or one older than `stale_before`, epoch ms) never
    /// finished.
    fn begin_announce<'a>(
        &'a self,
        gateway: &'a str,
        notice: Notice,
        owner: &'a str,
        now: i64,
        stale_before: i64,
    ) -> BoxFuture<'a, Announce>;
    /// The notice's event was accepted by EventBridge: never announce it again.
    fn end_announce<'a>(&'a self, gateway: &'a str, notice: Notice) -> BoxFuture<'a, ()>;
}

/// One gateway-less device's state in the cloud ([`crate::ingest`]): the engine's memory of
/// the device (CBOR, opaque here) under a version every commit increments, and the events
/// committed with it that are not yet known to be published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceItem {
    /// 0: the device has no item yet.
    pub version: u64,
    /// Empty when the device has no item.
    pub state: Vec<u8>,
    pub unsent: Vec<Entry>,
    /// When the item next needs a visit without a message of its device (epoch ms): a gap
    /// falls due, or events wait unpublished. See [`DeviceStore::due`].
    pub due: Option<i64>,
}

/// The state of gateway-less devices, one item per (ingest name, device). Every write is
/// conditional on the version read, so two instances never both commit an event of one
/// device against the same state.
pub trait DeviceStore: Send + Sync + Debug {
    /// The current item (strongly consistent); version 0 if there is none.
    fn read<'a>(&'a self, ingest: &'a str, device: &'a str) -> BoxFuture<'a, DeviceItem>;
    /// Writes `state`, `unsent` and `due` as version `seen + 1` if the item is still at
    /// version `seen` (0: still absent). False, and nothing written, otherwise.
    fn commit<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        seen: u64,
        state: &'a [u8],
        unsent: &'a [Entry],
        due: Option<i64>,
    ) -> BoxFuture<'a, bool>;
    /// Forgets the unsent events (they were published) and sets `due` if the item is still
    /// at `version`; the version stays as it is.
    fn clear_unsent<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
        due: Option<i64>,
    ) -> BoxFuture<'a, bool>;
    /// Marks the item due at `due` if it is still at `version` (its events could not be
    /// published: the sweep retries them).
    fn mark_due<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
        due: i64,
    ) -> BoxFuture<'a, bool>;
    /// Up to `limit` devices of `ingest` whose item is due at `now` or earlier: the devices
    /// that went silent with a gap to declare or events to publish (the sweep's work list).
    fn due<'a>(&'a self, ingest: &'a str, now: i64, limit: usize) -> BoxFuture<'a, Vec<String>>;
}

/// Unsent events as stored in a device item: `[["EventProcessed", "{…}"], …]`.
pub fn encode_entries(entries: &[Entry]) -> String {
    let v: Vec<(&str, &str)> = entries
        .iter()
        .map(|(t, d)| (t.as_str(), d.as_str()))
        .collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

/// The inverse of [`encode_entries`]; an unknown detail-type is an error (a newer bridge's).
pub fn decode_entries(text: &str) -> anyhow::Result<Vec<Entry>> {
    let v: Vec<(String, String)> =
        serde_json::from_str(text).context("unsent events: not a JSON list of pairs")?;
    v.into_iter()
        .map(|(t, d)| {
            DetailType::parse(&t)
                .map(|t| (t, d))
                .with_context(|| format!("unsent events: unknown detail-type '{t}'"))
        })
        .collect()
}

/// Sends events (at least once). Errors if any entry could not be sent.
pub trait EventPublisher: Send + Sync + Debug {
    fn put_events(&self, entries: Vec<Entry>) -> BoxFuture<'_, ()>;
}

/// One corrected event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorrectionRecord {
    pub event_id: String,
    /// Who asked: `verify:{gateway}:{edge_seq}` for the bridge's own check, the DLQ message id
    /// for the DLQ processor, `run:{…}` for a correction run.
    pub request: String,
    pub gateway: String,
    pub edge_seq: u64,
    pub reason: String,
    /// When it was corrected (epoch ms); also the `correction.at` of the record.
    pub at: i64,
    /// The bridge instance (diagnostics).
    pub owner: String,
}

/// The outcome of [`CorrectionHistory::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Written: this request corrects the event.
    New,
    /// A record of the same request exists (an earlier attempt of it): finish that one.
    Again(CorrectionRecord),
    /// Another request corrected the event.
    Other(CorrectionRecord),
}

pub trait CorrectionHistory: Send + Sync + Debug {
    /// Writes `rec` unless a record of its event exists (then nothing is written).
    fn put_new<'a>(&'a self, rec: &'a CorrectionRecord) -> BoxFuture<'a, bool>;
    fn get<'a>(&'a self, event_id: &'a str) -> BoxFuture<'a, Option<CorrectionRecord>>;
}

impl dyn CorrectionHistory {
    /// Records the correction `rec` describes, or tells who did.
    pub async fn record(&self, rec: &CorrectionRecord) -> anyhow::Result<Recorded> {
        if self.put_new(rec).await? {
            return Ok(Recorded::New);
        }
        let existing = self.get(&rec.event_id).await?.with_context(|| {
            format!(
                "correction history of {}: the conditional write failed but no record exists",
                rec.event_id
            )
        })?;
        Ok(if existing.request == rec.request {
            Recorded::Again(existing)
        } else {
            Recorded::Other(existing)
        })
    }
}

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
    /// The field or rule the engine refused, when it did (the DLQ entry's optional
    /// `subject`, see `proto::dlq`): reports group by it without reading the reason text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
    /// A gateway-less device message the cloud's engine refused (then `payload` is the
    /// message itself, not a result): what the DLQ processor replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<DeviceOrigin>,
}

/// Where a refused gateway-less device message came from, and its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOrigin {
    pub device: String,
    pub event_type: String,
    pub via: proto::Via,
    /// When it arrived (epoch ms): a replay is processed as of then.
    pub received_at: i64,
    /// Base64 of the message as received (JSON or CBOR).
    pub bytes: String,
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
            subject: None,
            message: None,
        }
    }

    /// The same message, naming what the engine refused.
    pub fn about(mut self, subject: &Subject) -> DlqMessage {
        self.subject = Some(subject.clone());
        self
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

/// One backend's parts, as [`aws::backend`] and [`local::backend`] build them.
#[derive(Clone, Debug)]
pub struct Backend {
    pub objects: Arc<dyn ObjectStore>,
    pub state: Arc<dyn StateStore>,
    /// Gateway-less devices' engine state.
    pub devices: Arc<dyn DeviceStore>,
    pub events: Arc<dyn EventPublisher>,
    /// Which events were corrected (at most once each).
    pub history: Arc<dyn CorrectionHistory>,
    /// The cloud DLQ.
    pub dlq: Arc<dyn DeadLetterQueue>,
}
