//! The AWS side: SDK clients, the per-gateway sequence state in DynamoDB, S3 objects and
//! EventBridge PutEvents.
//!
//! Throttling, 5xx and timeouts are retried by the SDK's standard retry mode (exponential
//! backoff with jitter, [`SDK_ATTEMPTS`] attempts); what still fails is returned as an error and
//! the caller keeps the batch unacknowledged and tries again later. PutEvents' partial failures
//! (`FailedEntryCount > 0`, which the SDK does not retry) are retried here, only the failed
//! entries, with backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_s3::primitives::ByteStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::backend::{Announce, BoxFuture, EventPublisher, ObjectStore, StateStore};
use crate::config::{AwsConfig, Config};
use crate::metrics::Metrics;

/// Attempts per AWS call inside the SDK (throttling, 5xx, timeouts, connection errors).
pub const SDK_ATTEMPTS: u32 = 6;
/// One attempt of an AWS call; the whole call (all attempts) is bounded by
/// [`OPERATION_TIMEOUT`], which the claim fencing in `pipeline` relies on.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// PutEvents limits (AWS): entries per call and request size.
pub const PUT_EVENTS_MAX_ENTRIES: usize = 10;
pub const PUT_EVENTS_MAX_BYTES: usize = 256 * 1024;

/// An SDK error with its whole chain of causes in the message (the SDK's own `Display` says
/// only "service error").
pub fn err<E: std::error::Error>(e: E) -> anyhow::Error {
    anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
}

/// The SDK clients the bridge uses.
#[derive(Clone, Debug)]
pub struct Aws {
    pub s3: aws_sdk_s3::Client,
    pub eventbridge: aws_sdk_eventbridge::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
}

impl Aws {
    /// Clients from the default credential chain and the config's region/endpoint.
    /// `AWS_ENDPOINT_URL` (read by the SDK) wins over `aws.endpoint_url`.
    pub async fn connect(cfg: &AwsConfig) -> Aws {
        let env_endpoint = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|v| !v.is_empty());
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(SDK_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if env_endpoint.is_none()
            && let Some(url) = &cfg.endpoint_url
        {
            loader = loader.endpoint_url(url.clone());
        }
        let overridden = env_endpoint.is_some() || cfg.endpoint_url.is_some();
        let shared = loader.load().await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(cfg.s3_force_path_style.unwrap_or(overridden))
                .build(),
        );
        Aws {
            s3,
            eventbridge: aws_sdk_eventbridge::Client::new(&shared),
            dynamodb: aws_sdk_dynamodb::Client::new(&shared),
            sqs: aws_sdk_sqs::Client::new(&shared),
        }
    }
}

pub use crate::backend::{Claim, Entry, GatewayState};

/// The DynamoDB side: conditional writes on the gateway's item. Every method returns
/// `Ok(false)` when its condition did not hold (someone else changed the state first).
#[derive(Clone, Debug)]
pub struct StateTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn pk(gateway: &str) -> AttributeValue {
    s(format!("gw#{gateway}"))
}

pub(crate) fn get_u64(
    item: &HashMap<String, AttributeValue>,
    k: &str,
) -> anyhow::Result<Option<u64>> {
    match item.get(k) {
        None => Ok(None),
        Some(AttributeValue::N(v)) => Ok(Some(v.parse().with_context(|| format!("{k}: {v}"))?)),
        Some(other) => Err(anyhow!("{k}: expected a number, found {other:?}")),
    }
}

/// ConditionalCheckFailed → `Ok(false)`; any other error is returned.
pub(crate) fn conditional<T, E>(
    r: Result<T, aws_sdk_dynamodb::error::SdkError<E>>,
) -> anyhow::Result<bool>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match r {
        Ok(_) => Ok(true),
        Err(e) => {
            if e.as_service_error()
                .and_then(|se| se.code())
                .is_some_and(|c| c == "ConditionalCheckFailedException")
            {
                Ok(false)
            } else {
                Err(err(e))
            }
        }
    }
}

const CLAIM_ATTRS: &str = "p_from, p_to, p_key, p_at, p_owner";

impl StateTable {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        StateTable {
            client,
            table: table.into(),
        }
    }

    /// Strongly consistent read of the gateway's state.
    pub async fn read(&self, gateway: &str) -> anyhow::Result<GatewayState> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .consistent_read(true)
            .send()
            .await
            .map_err(crate::aws::err)
            .with_context(|| format!("DynamoDB GetItem {}", self.table))?;
        let Some(item) = out.item else {
            return Ok(GatewayState::default());
        };
        let claim = match item.get("p_key") {
            Some(AttributeValue::S(key)) => Some(Claim {
                from: get_u64(&item, "p_from")?.context("p_from missing")?,
                to: get_u64(&item, "p_to")?.context("p_to missing")?,
                key: key.clone(),
                at: get_u64(&item, "p_at")?.unwrap_or(0) as i64,
                owner: match item.get("p_owner") {
                    Some(AttributeValue::S(o)) => o.clone(),
                    _ => String::new(),
                },
            }),
            _ => None,
        };
        let garbage = match item.get("garbage") {
            Some(AttributeValue::Ss(v)) => v.clone(),
            _ => Vec::new(),
        };
        Ok(GatewayState {
            hwm: get_u64(&item, "hwm")?.unwrap_or(0),
            exists: true,
            claim,
            garbage,
        })
    }

    /// Claims `claim` if the state is still `seen` with no claim and no garbage.
    pub async fn claim(
        &self,
        gateway: &str,
        seen: &GatewayState,
        claim: &Claim,
    ) -> anyhow::Result<bool> {
        let cond = if seen.exists {
            "hwm = :hwm AND attribute_not_exists(p_key) AND \
             (attribute_not_exists(garbage) OR size(garbage) = :zero)"
        } else {
            "attribute_not_exists(pk)"
        };
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .update_expression(
                "SET hwm = if_not_exists(hwm, :hwm), p_from = :f, p_to = :t, p_key = :k, \
                 p_at = :at, p_owner = :o",
            )
            .condition_expression(cond)
            .expression_attribute_values(":hwm", n(seen.hwm))
            .expression_attribute_values(":f", n(claim.from))
            .expression_attribute_values(":t", n(claim.to))
            .expression_attribute_values(":k", s(&claim.key))
            .expression_attribute_values(":at", n(claim.at))
            .expression_attribute_values(":o", s(&claim.owner));
        if seen.exists {
            req = req.expression_attribute_values(":zero", n(0));
        }
        conditional(req.send().await)
    }

    /// Renews the claim's timestamp (before completing a claim made earlier).
    pub async fn refresh(&self, gateway: &str, claim: &Claim, at: i64) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(gateway))
                .update_expression("SET p_at = :at")
                .condition_expression("p_key = :k")
                .expression_attribute_values(":k", s(&claim.key))
                .expression_attribute_values(":at", n(at))
                .send()
                .await,
        )
    }

    /// The claimed range is stored: hwm = claim.to, claim removed.
    pub async fn commit(&self, gateway: &str, claim: &Claim) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(gateway))
                .update_expression(format!("SET hwm = :t REMOVE {CLAIM_ATTRS}"))
                .condition_expression("p_key = :k AND hwm = :h")
                .expression_attribute_values(":k", s(&claim.key))
                .expression_attribute_values(":t", n(claim.to))
                .expression_attribute_values(":h", n(claim.from - 1))
                .send()
                .await,
        )
    }

    /// Abandons a stale claim; its object (if it was written) becomes garbage.
    pub async fn take_over(&self, gateway: &str, claim: &Claim) -> anyhow::Result<bool> {
        conditional(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", pk(gateway))
                .update_expression(format!("REMOVE {CLAIM_ATTRS} ADD garbage :g"))
                .condition_expression("p_key = :k AND p_at = :at")
                .expression_attribute_values(":k", s(&claim.key))
                .expression_attribute_values(":at", n(claim.at))
                .expression_attribute_values(":g", AttributeValue::Ss(vec![claim.key.clone()]))
                .send()
                .await,
        )
    }

    /// Forgets garbage keys whose objects were deleted.
    pub async fn clear_garbage(&self, gateway: &str, keys: &[String]) -> anyhow::Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .update_expression("DELETE garbage :g")
            .expression_attribute_values(":g", AttributeValue::Ss(keys.to_vec()))
            .send()
            .await
            .map_err(crate::aws::err)
            .context("DynamoDB UpdateItem (garbage)")?;
        Ok(())
    }

    /// Gives up on `from..=to` (never arrived after the replay requests): hwm = to, and the
    /// range is recorded as its own item (`missed#{gateway}#{from}`) for later correction.
    pub async fn skip(
        &self,
        gateway: &str,
        seen: &GatewayState,
        from: u64,
        to: u64,
        now: i64,
    ) -> anyhow::Result<bool> {
        let cond = if seen.exists {
            "hwm = :hwm AND attribute_not_exists(p_key) AND attribute_not_exists(garbage)"
        } else {
            "attribute_not_exists(pk)"
        };
        // The record first: a crash after it and before the hwm moves leaves a record of a
        // range that is still being waited for, which the next skip overwrites; the other
        // order could skip a range without a trace.
        let missed_pk = s(format!("missed#{gateway}#{from:020}"));
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", missed_pk.clone())
            .item("gateway", s(gateway))
            .item("from", n(from))
            .item("to", n(to))
            .item("at", n(now))
            .send()
            .await
            .map_err(crate::aws::err)
            .context("DynamoDB PutItem (missed range)")?;
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", pk(gateway))
            .update_expression("SET hwm = :to")
            .condition_expression(cond)
            .expression_attribute_values(":to", n(to));
        if seen.exists {
            req = req.expression_attribute_values(":hwm", n(seen.hwm));
        }
        if !conditional(req.send().await)? {
            self.client
                .delete_item()
                .table_name(&self.table)
                .key("pk", missed_pk)
                .send()
                .await
                .map_err(crate::aws::err)
                .context("DynamoDB DeleteItem (missed range)")?;
            return Ok(false);
        }
        Ok(true)
    }
}

impl StateTable {
    fn announce_key(gateway: &str, id: u64) -> AttributeValue {
        s(format!("missed-dev#{gateway}#{id}"))
    }

    /// See [`StateStore::begin_announce`].
    pub async fn begin_announce(
        &self,
        gateway: &str,
        id: u64,
        owner: &str,
        now: i64,
        stale_before: i64,
    ) -> anyhow::Result<Announce> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", Self::announce_key(gateway, id))
            .item("gateway", s(gateway))
            .item("record", n(id))
            .item("state", s("pending"))
            .item("owner", s(owner))
            .item("at", n(now))
            .condition_expression(
                "attribute_not_exists(pk) OR (#s = :pending AND (#o = :owner OR #a < :stale))",
            )
            .expression_attribute_names("#s", "state")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#a", "at")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":stale", n(stale_before))
            .send()
            .await;
        if conditional(put)
            .with_context(|| format!("DynamoDB PutItem missed-dev#{gateway}#{id}"))?
        {
            return Ok(Announce::Mine);
        }
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", Self::announce_key(gateway, id))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("DynamoDB GetItem missed-dev#{gateway}#{id}"))?;
        Ok(match out.item.as_ref().and_then(|i| i.get("state")) {
            Some(AttributeValue::S(v)) if v == "sent" => Announce::Done,
            // Gone in between (nobody deletes them) or pending elsewhere.
            _ => Announce::Busy,
        })
    }

    /// See [`StateStore::end_announce`].
    pub async fn end_announce(&self, gateway: &str, id: u64) -> anyhow::Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", Self::announce_key(gateway, id))
            .update_expression("SET #s = :sent")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":sent", s("sent"))
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("DynamoDB UpdateItem missed-dev#{gateway}#{id}"))?;
        Ok(())
    }
}

impl StateStore for StateTable {
    fn begin_announce<'a>(
        &'a self,
        gateway: &'a str,
        id: u64,
        owner: &'a str,
        now: i64,
        stale_before: i64,
    ) -> BoxFuture<'a, Announce> {
        Box::pin(StateTable::begin_announce(
            self,
            gateway,
            id,
            owner,
            now,
            stale_before,
        ))
    }
    fn end_announce<'a>(&'a self, gateway: &'a str, id: u64) -> BoxFuture<'a, ()> {
        Box::pin(StateTable::end_announce(self, gateway, id))
    }
    fn read<'a>(&'a self, gateway: &'a str) -> BoxFuture<'a, GatewayState> {
        Box::pin(StateTable::read(self, gateway))
    }
    fn claim<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        claim: &'a Claim,
    ) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::claim(self, gateway, seen, claim))
    }
    fn refresh<'a>(&'a self, gateway: &'a str, claim: &'a Claim, at: i64) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::refresh(self, gateway, claim, at))
    }
    fn commit<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::commit(self, gateway, claim))
    }
    fn take_over<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::take_over(self, gateway, claim))
    }
    fn clear_garbage<'a>(&'a self, gateway: &'a str, keys: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(StateTable::clear_garbage(self, gateway, keys))
    }
    fn skip<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        from: u64,
        to: u64,
        now: i64,
    ) -> BoxFuture<'a, bool> {
        Box::pin(StateTable::skip(self, gateway, seen, from, to, now))
    }
}

/// S3: the bridge's objects in `aws.bucket`.
#[derive(Clone, Debug)]
pub struct S3Objects {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Objects {
    pub fn new(s3: aws_sdk_s3::Client, bucket: String) -> Self {
        S3Objects { s3, bucket }
    }

    pub async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> anyhow::Result<()> {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(crate::aws::err)
            .with_context(|| format!("S3 PutObject s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    pub async fn delete_object(&self, key: &str) -> anyhow::Result<()> {
        self.s3
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(crate::aws::err)
            .with_context(|| format!("S3 DeleteObject s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    pub async fn list_objects(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page
                .map_err(crate::aws::err)
                .with_context(|| format!("S3 ListObjectsV2 s3://{}/{prefix}", self.bucket))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys.sort();
        Ok(keys)
    }
}

impl ObjectStore for S3Objects {
    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>, content_type: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.put_object(key, body, content_type))
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.delete_object(key))
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(self.list_objects(prefix))
    }
    fn location(&self) -> String {
        format!("s3://{}", self.bucket)
    }
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<(Vec<u8>, String)>> {
        Box::pin(self.get_object_versioned(key))
    }
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        content_type: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.put_object_if_match(key, body, content_type, etag))
    }
}

impl S3Objects {
    async fn get_object_versioned(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let out = match self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => {
                return Ok(None);
            }
            Err(e) => {
                return Err(err(e))
                    .with_context(|| format!("S3 GetObject s3://{}/{key}", self.bucket));
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let body = out
            .body
            .collect()
            .await
            .with_context(|| format!("S3 GetObject s3://{}/{key}: reading the body", self.bucket))?
            .into_bytes()
            .to_vec();
        Ok(Some((body, etag)))
    }

    async fn put_object_if_match(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        etag: &str,
    ) -> anyhow::Result<bool> {
        let res = self
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .if_match(etag)
            .body(ByteStream::from(body))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(false),
            Err(e) => Err(err(e))
                .with_context(|| format!("S3 PutObject (If-Match) s3://{}/{key}", self.bucket)),
        }
    }
}

/// EventBridge PutEvents to `aws.event_bus`.
#[derive(Clone, Debug)]
pub struct EventBridge {
    client: aws_sdk_eventbridge::Client,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl EventPublisher for EventBridge {
    fn put_events(&self, entries: Vec<Entry>) -> BoxFuture<'_, ()> {
        Box::pin(EventBridge::put_events(self, entries))
    }
}

impl EventBridge {
    pub fn new(
        client: aws_sdk_eventbridge::Client,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Self {
        EventBridge {
            client,
            cfg,
            metrics,
        }
    }

    /// Sends `entries` in PutEvents calls of at most 10 entries and 256 KB, several calls at
    /// once; retries only the failed entries, with backoff. Errors if any entry still fails
    /// after the configured attempts.
    pub async fn put_events(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let chunks = chunk_entries(&self.cfg.aws.source, entries)?;
        let sem = Arc::new(Semaphore::new(self.cfg.aws.eventbridge_concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in chunks {
            let sink = self.clone();
            let sem = Arc::clone(&sem);
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                sink.put_events_chunk(chunk).await
            });
        }
        let mut first_err = None;
        while let Some(r) = tasks.join_next().await {
            let r = r.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = r
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn put_events_chunk(&self, mut chunk: Vec<Entry>) -> anyhow::Result<()> {
        let a = &self.cfg.aws;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=a.eventbridge_attempts {
            let req: Vec<PutEventsRequestEntry> = chunk
                .iter()
                .map(|(t, d)| {
                    PutEventsRequestEntry::builder()
                        .source(&a.source)
                        .detail_type(*t)
                        .detail(d)
                        .event_bus_name(&a.event_bus)
                        .build()
                })
                .collect();
            let out = self
                .client
                .put_events()
                .set_entries(Some(req))
                .send()
                .await
                .map_err(crate::aws::err)
                .with_context(|| format!("EventBridge PutEvents to bus {}", a.event_bus))?;
            let failed = out.failed_entry_count();
            if failed == 0 {
                Metrics::add(&self.metrics.eventbridge_entries, chunk.len() as u64);
                return Ok(());
            }
            Metrics::add(&self.metrics.eventbridge_failed_entries, failed as u64);
            // The result entries are in request order; keep only the failed ones.
            let results = out.entries();
            let mut codes = Vec::new();
            let mut retry = Vec::new();
            for (i, e) in chunk.into_iter().enumerate() {
                match results.get(i) {
                    Some(r) if r.error_code().is_none() && r.event_id().is_some() => {
                        Metrics::add(&self.metrics.eventbridge_entries, 1);
                    }
                    r => {
                        codes.push(
                            r.and_then(|r| r.error_code())
                                .unwrap_or("missing result entry")
                                .to_string(),
                        );
                        retry.push(e);
                    }
                }
            }
            chunk = retry;
            if chunk.is_empty() {
                return Ok(());
            }
            warn!(attempt, failed = chunk.len(), codes = ?codes,
                "PutEvents: some entries failed; retrying only those");
            if attempt < a.eventbridge_attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        Err(anyhow!(
            "EventBridge PutEvents: {} entries still failed after {} attempts",
            chunk.len(),
            a.eventbridge_attempts
        ))
    }
}

/// The size AWS counts for an entry: Source, DetailType, Detail (UTF-8 bytes), plus
/// EventBusName to be safe.
fn entry_size(source: &str, (t, d): &Entry) -> usize {
    source.len() + t.len() + d.len() + 64
}

/// Splits entries into PutEvents calls of at most 10 entries and 256 KB. An entry that alone
/// exceeds the limit is an error (it cannot be sent at all).
pub fn chunk_entries(source: &str, entries: Vec<Entry>) -> anyhow::Result<Vec<Vec<Entry>>> {
    let mut chunks = Vec::new();
    let mut cur: Vec<Entry> = Vec::new();
    let mut cur_size = 0;
    for e in entries {
        let size = entry_size(source, &e);
        if size > PUT_EVENTS_MAX_BYTES {
            return Err(anyhow!(
                "an EventBridge {} entry of {size} bytes exceeds the 256 KB PutEvents limit",
                e.0
            ));
        }
        if cur.len() == PUT_EVENTS_MAX_ENTRIES || cur_size + size > PUT_EVENTS_MAX_BYTES {
            chunks.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur_size += size;
        cur.push(e);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    debug!(calls = chunks.len(), "PutEvents chunks");
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_count_and_size() {
        let small: Vec<Entry> = (0..25)
            .map(|i| ("EventProcessed", format!("{i}")))
            .collect();
        let c = chunk_entries("src", small).unwrap();
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);

        let big = "x".repeat(100 * 1024);
        let entries: Vec<Entry> = (0..5).map(|_| ("EventProcessed", big.clone())).collect();
        let c = chunk_entries("src", entries).unwrap();
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        for chunk in &c {
            let total: usize = chunk.iter().map(|e| entry_size("src", e)).sum();
            assert!(total <= PUT_EVENTS_MAX_BYTES);
        }

        let huge = vec![("EventProcessed", "x".repeat(300 * 1024))];
        assert!(chunk_entries("src", huge).is_err());
    }
}
