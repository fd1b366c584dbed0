//! Where the pipeline keeps things, behind three small traits: objects ([`ObjectStore`]: S3 or
//! a local directory), the per-gateway `hwm` + claim state ([`StateStore`]: DynamoDB or a local
//! file) and events ([`EventPublisher`]: EventBridge or local NDJSON files).
//!
//! The exactly-once logic lives only in [`crate::pipeline`]; a backend only performs each
//! operation with the condition the trait documents, atomically. Two backends: [`Backend::aws`]
//! (`aws.rs`, any number of bridges) and [`Backend::local`] (`local.rs`, one process: the
//! `edge-agent demo`'s cloud on the same machine).

use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::aws::Aws;
use crate::config::Config;
use crate::dlq::DeadLetterQueue;
use crate::history::CorrectionHistory;
use crate::metrics::Metrics;

/// A boxed, sendable future of a fallible result (the traits are used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// One event before it is sent: (detail-type, detail JSON).
pub type Entry = (&'static str, String);

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

/// Where an announcement of a gateway's missed-event record stands
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
    /// Starts announcing the gateway's missed-event record `id` (DynamoDB item
    /// `missed-dev#{gateway}#{id}` written with `attribute_not_exists`): [`Announce::Mine`] if
    /// there is no such item, or its announcement by `owner` (or one older than
    /// `stale_before`, epoch ms) never finished.
    fn begin_announce<'a>(
        &'a self,
        gateway: &'a str,
        id: u64,
        owner: &'a str,
        now: i64,
        stale_before: i64,
    ) -> BoxFuture<'a, Announce>;
    /// The record's MissedEvents was accepted by EventBridge: never announce it again.
    fn end_announce<'a>(&'a self, gateway: &'a str, id: u64) -> BoxFuture<'a, ()>;
}

/// Sends events (at least once). Errors if any entry could not be sent.
pub trait EventPublisher: Send + Sync + Debug {
    fn put_events(&self, entries: Vec<Entry>) -> BoxFuture<'_, ()>;
}

/// The parts a [`crate::pipeline::Pipeline`] stores through.
#[derive(Clone, Debug)]
pub struct Backend {
    pub objects: Arc<dyn ObjectStore>,
    pub state: Arc<dyn StateStore>,
    pub events: Arc<dyn EventPublisher>,
    /// Which events were corrected (at most once each).
    pub history: Arc<dyn CorrectionHistory>,
    /// The cloud DLQ.
    pub dlq: Arc<dyn DeadLetterQueue>,
}

impl Backend {
    /// S3 (`aws.bucket`), DynamoDB (`aws.table`), EventBridge (`aws.event_bus`).
    pub fn aws(aws: Aws, cfg: &Arc<Config>, metrics: &Arc<Metrics>) -> Backend {
        Backend {
            objects: Arc::new(crate::aws::S3Objects::new(
                aws.s3.clone(),
                cfg.aws.bucket.clone(),
            )),
            state: Arc::new(crate::aws::StateTable::new(
                aws.dynamodb.clone(),
                cfg.aws.table.clone(),
            )),
            events: Arc::new(crate::aws::EventBridge::new(
                aws.eventbridge,
                Arc::clone(cfg),
                Arc::clone(metrics),
            )),
            history: Arc::new(crate::history::DynamoHistory::new(
                aws.dynamodb.clone(),
                cfg.aws.table.clone(),
            )),
            dlq: Arc::new(crate::dlq::SqsQueue::new(
                aws.sqs,
                cfg.aws.dlq_queue.clone(),
            )),
        }
    }

    /// A local directory with S3's layout (`dir/events/…`, `dir/failures/…`), the state in
    /// `dir/state/bridge-state.json`, the correction history in `dir/state/corrections/`, the
    /// DLQ in `dir/dlq/` and events appended to `dir/eventbridge/…ndjson`. For one
    /// bridge process only (the state is guarded by an in-process lock).
    pub fn local(dir: &Path, cfg: &Arc<Config>) -> anyhow::Result<Backend> {
        Ok(Backend {
            objects: Arc::new(crate::local::LocalObjects::new(dir)?),
            state: Arc::new(crate::local::LocalState::open(&dir.join("state"))?),
            events: Arc::new(crate::local::LocalEvents::new(
                &dir.join("eventbridge"),
                &cfg.aws.source,
                &cfg.aws.event_bus,
            )?),
            history: Arc::new(crate::history::DirHistory::open(
                &dir.join("state").join("corrections"),
            )?),
            dlq: Arc::new(crate::dlq::DirQueue::open(&dir.join("dlq"))?),
        })
    }
}

/// Object and event writes as the pipeline sees them: events filtered by the configured
/// detail-types.
#[derive(Clone, Debug)]
pub struct Sink {
    pub objects: Arc<dyn ObjectStore>,
    pub events: Arc<dyn EventPublisher>,
    pub cfg: Arc<Config>,
}

impl Sink {
    pub async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> anyhow::Result<()> {
        self.objects.put(key, body, content_type).await
    }

    pub async fn delete_object(&self, key: &str) -> anyhow::Result<()> {
        self.objects.delete(key).await
    }

    /// Sends the entries whose detail-type the config selects.
    pub async fn put_events(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|(t, _)| self.cfg.sends(t))
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.events.put_events(entries).await
    }
}
