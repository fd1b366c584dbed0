//! `cloud-bridge lambda`: the same [`Pipeline`] as an AWS Lambda function (`lambda_runtime`).
//!
//! # Payloads
//! - **A batch** (IoT rule or direct invoke), either as JSON —
//!   `{"gateway": "gw-1", "results": [ {EventResult JSON}, ... ]}` — or as the uplink's CBOR,
//!   base64-encoded: `{"cbor": "<base64 of the CBOR Batch>"}` (optionally with `"gateway"`,
//!   which must then agree). An AWS IoT rule forwards the binary uplink with
//!   `SELECT encode(*, 'base64') AS cbor, topic(2) AS gateway FROM 'gateways/+/results'`.
//!   Response: `{"gateway", "results", "hwm"}` once every result is stored (or was already).
//! - **SQS events** (the cloud DLQ as an event source): each record goes through the DLQ
//!   processor ([`crate::dlq::processor`]); the response lists the records that failed
//!   (`{"batchItemFailures": [{"itemIdentifier": messageId}]}`, with `ReportBatchItemFailures`
//!   on the event source mapping) so only those are retried.
//! - **EventBridge events that trigger a correction run**: a CloudWatch alarm entering `ALARM`
//!   (`detail-type: "CloudWatch Alarm State Change"`, e.g. on the `discrepancy_rate` metric)
//!   re-verifies the objects of the alarm's day and the day before; `CorrectionRequested` with
//!   `detail: {"since", "until"?, "gateway"?}` runs over the days asked for. The response is the
//!   run's report. Other detail-types are refused with an error.
//!
//! - **Gateway-less device messages** (`[ingest]`, see [`crate::ingest`]):
//!   - API Gateway HTTP API (payload format 2.0) requests on the routes of
//!     [`crate::ingest::http`], answered by the same router as `run`'s listener (`[http]`
//!     gives the credentials); the response is the API Gateway response object.
//!   - AWS IoT Core rule events: `{"topic": "devices/{d}/events/{t}", …the message}` (rule
//!     `SELECT *, topic() AS topic FROM 'devices/+/events/+'`) or, for CBOR devices,
//!     `{"topic", "payload": "<base64>"}` (`SELECT encode(*, 'base64') AS payload, topic()
//!     AS topic …`). IoT Core authenticated the device; the topic names it.
//!   - EventBridge events with `detail-type: "DeviceEvent"` whose detail is a device message
//!     with its `device` and `type`.
//!   - `detail-type: "IngestSweep"` (a scheduled rule's constant input): declares the overdue
//!     gaps of devices that went silent ([`crate::ingest::Ingest::sweep`]); the response is
//!     the sweep's report.
//!
//!   A stored or duplicate message answers `{"event_id", "stored": true}`, a refused one
//!   `{"error", "stage", "dead_lettered": true}` (it is in the DLQ: not an invocation
//!   failure, so it is not retried); a backend failure fails the invocation (retried).
//!
//! A gap (the batch starts past the stored sequence) is held for `gap_hold_ms` re-checking;
//! if it is still there, a `ReplayRequest` is published (when `[mqtt]` is configured) and the
//! invocation fails, so Lambda retries it (async invoke) after the replay has arrived.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use lambda_runtime::{LambdaEvent, service_fn};
use proto::Batch;
use proto::accept::check_batch;
use proto::uplink::{ReplayRequest, replay_topic};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::backend::Received;
use crate::backend::aws::Aws;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{Held, Pipeline, Progress};
use crate::service::publish_once;

/// What an invocation carries.
#[derive(Debug)]
pub enum Payload {
    Batch(Batch),
    /// An SQS event: `queue` is the source queue's name (from `eventSourceARN`).
    Sqs {
        queue: String,
        records: Vec<Received>,
    },
    EventBridge {
        detail_type: String,
        detail: Value,
        time: Option<String>,
    },
    /// An API Gateway HTTP API (2.0) request.
    Http(Value),
    /// An AWS IoT Core rule's event from a device topic.
    Iot(serde_json::Map<String, Value>),
}

/// Tells the payload kinds apart (see the module doc).
pub fn classify(v: Value) -> anyhow::Result<Payload> {
    let Value::Object(mut o) = v else {
        bail!("unrecognised payload: expected a JSON object");
    };
    if let Some(Value::Array(records)) = o.get("Records") {
        if records
            .iter()
            .all(|r| r.get("eventSource").and_then(Value::as_str) == Some("aws:sqs"))
        {
            let text = |r: &Value, k: &str| {
                r.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            // One event source mapping, one queue: `arn:aws:sqs:{region}:{account}:{name}`.
            let queue = records
                .first()
                .and_then(|r| r.get("eventSourceARN"))
                .and_then(Value::as_str)
                .and_then(|arn| arn.rsplit(':').next())
                .unwrap_or_default()
                .to_string();
            return Ok(Payload::Sqs {
                queue,
                records: records
                    .iter()
                    .map(|r| Received {
                        body: text(r, "body"),
                        receipt: text(r, "receiptHandle"),
                        receive_count: r["attributes"]["ApproximateReceiveCount"]
                            .as_str()
                            .and_then(|c| c.parse().ok())
                            .unwrap_or(1),
                        message_id: text(r, "messageId"),
                    })
                    .collect(),
            });
        }
        bail!("unrecognised payload: a Records array that is not an SQS event");
    }
    if o.contains_key("detail-type") && o.contains_key("source") {
        let detail_type = o["detail-type"].as_str().unwrap_or_default().to_string();
        return Ok(Payload::EventBridge {
            detail_type,
            detail: o.remove("detail").unwrap_or(Value::Null),
            time: o.get("time").and_then(Value::as_str).map(String::from),
        });
    }
    if o.get("version").and_then(Value::as_str) == Some("2.0") && o.contains_key("requestContext") {
        return Ok(Payload::Http(Value::Object(o)));
    }
    if o.get("topic").is_some_and(Value::is_string) {
        return Ok(Payload::Iot(o));
    }
    if let Some(c) = o.remove("cbor") {
        let Value::String(b64) = c else {
            bail!("cbor: expected a base64 string");
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .context("cbor: invalid base64")?;
        let batch: Batch = proto::wire::decode(&bytes).context("cbor: not a CBOR batch")?;
        if let Some(g) = o.get("gateway").and_then(Value::as_str)
            && g != batch.gateway
        {
            bail!(
                "gateway: '{g}' differs from the batch's gateway '{}'",
                batch.gateway
            );
        }
        return Ok(Payload::Batch(batch));
    }
    if o.contains_key("gateway") && o.contains_key("results") {
        let batch: Batch = serde_path_to_error::deserialize(Value::Object(o))
            .map_err(|e| anyhow!("{}: {}", e.path(), e.inner()))?;
        return Ok(Payload::Batch(batch));
    }
    bail!(
        "unrecognised payload: expected a batch ({{\"gateway\", \"results\"}} or {{\"cbor\"}}), \
         an SQS event, an EventBridge event, an API Gateway request or an IoT rule event"
    )
}

/// Handles one invocation's payload.
pub async fn handle(p: &Pipeline, payload: Value) -> anyhow::Result<Value> {
    handle_with(p, None, payload).await
}

/// [`handle`], with the HTTP router built once for the process (else per request).
pub async fn handle_with(
    p: &Pipeline,
    router: Option<&axum::Router>,
    payload: Value,
) -> anyhow::Result<Value> {
    let batch = match classify(payload)? {
        Payload::Batch(b) => b,
        Payload::Sqs { queue, records } => return handle_sqs(p, &queue, records).await,
        Payload::EventBridge {
            detail_type,
            detail,
            ..
        } if detail_type == DEVICE_EVENT => {
            return handle_device_event(p, &detail).await;
        }
        Payload::EventBridge { detail_type, .. } if detail_type == INGEST_SWEEP => {
            let report = ingest(p)?.sweep(crate::now_ms(), SWEEP_LIMIT).await?;
            return Ok(serde_json::to_value(report)?);
        }
        Payload::EventBridge {
            detail_type,
            detail,
            time,
        } => return handle_trigger(p, &detail_type, &detail, time.as_deref()).await,
        Payload::Http(request) => {
            let owned;
            let router = match router {
                Some(r) => r,
                None => {
                    owned = http_router(p)?;
                    &owned
                }
            };
            return crate::ingest::apigw::handle(router, request).await;
        }
        Payload::Iot(event) => return handle_iot(p, event).await,
    };
    store_batch(p, batch).await
}

/// Stores one gateway batch (a direct invoke, an IoT rule, or an SQS record of one).
async fn store_batch(p: &Pipeline, batch: Batch) -> anyhow::Result<Value> {
    check_batch(&batch)?;
    let gateway = batch.gateway.clone();
    let n = batch.results.len();
    let mut held: Held = Held::new();
    for r in batch.results {
        held.entry(r.edge_seq).or_insert(r);
    }
    let hold = Duration::from_millis(p.cfg.pipeline.gap_hold_ms);
    match p.advance_holding(&gateway, &mut held, hold).await? {
        Progress::Done { hwm } => {
            info!(%gateway, results = n, hwm, "batch stored");
            Ok(json!({ "gateway": gateway, "results": n, "hwm": hwm }))
        }
        Progress::Missing { hwm, from, to } => {
            let replay = match &p.cfg.mqtt {
                Some(m) => {
                    let body = serde_json::to_vec(&ReplayRequest { from, to })?;
                    match publish_once(m, replay_topic(&gateway), body).await {
                        Ok(()) => {
                            p.metrics.replays_requested.increment(1);
                            "replay requested"
                        }
                        Err(e) => {
                            warn!(%gateway, error = %format!("{e:#}"), "could not publish the replay request");
                            "the replay request could not be published"
                        }
                    }
                }
                None => "no [mqtt] configured to request a replay",
            };
            bail!(
                "gap: gateway {gateway} has edge_seq up to {hwm} stored; {from}..={to} is missing \
                 ({replay}); the batch was not stored, retry the invocation"
            )
        }
    }
}

/// The detail-type of an EventBridge event that carries a device message.
pub const DEVICE_EVENT: &str = "DeviceEvent";

/// The detail-type of the scheduled event that sweeps for silent gateway-less devices.
pub const INGEST_SWEEP: &str = "IngestSweep";

/// Devices one sweep invocation visits at most (the schedule's next one takes the rest).
const SWEEP_LIMIT: usize = 1000;

fn ingest(p: &Pipeline) -> anyhow::Result<&crate::ingest::Ingest> {
    p.ingest
        .as_deref()
        .context("a device message, but this bridge has no [ingest] (the engine config)")
}

/// The router of `[http]` over this pipeline's ingest.
pub fn http_router(p: &Pipeline) -> anyhow::Result<axum::Router> {
    let ingest = p
        .ingest
        .clone()
        .context("an API Gateway request, but this bridge has no [ingest]")?;
    let h = p
        .cfg
        .http
        .as_ref()
        .context("an API Gateway request, but this bridge has no [http] (its credentials)")?;
    Ok(crate::ingest::http::router(crate::ingest::http::Api {
        ingest,
        auth: Arc::new(crate::ingest::auth::Auth::load(h)?),
        max_body_bytes: h.max_body_bytes,
        max_batch: h.max_batch,
    }))
}

/// The invocation's answer for one device message (a refusal is an answer, not a failure:
/// the message is in the DLQ and a retry would only refuse it again).
fn device_answer(reply: &crate::ingest::Reply) -> Value {
    use crate::ingest::Reply;
    match reply {
        Reply::Stored {
            event_id, status, ..
        } => {
            json!({ "event_id": event_id, "stored": true, "status": status })
        }
        Reply::Duplicate { event_id, .. } => {
            json!({ "event_id": event_id, "stored": true, "duplicate": true })
        }
        Reply::Rejected {
            stage,
            reason,
            event_id,
            ..
        } => {
            json!({ "error": reason, "stage": stage, "event_id": event_id, "dead_lettered": true })
        }
    }
}

async fn handle_iot(p: &Pipeline, event: serde_json::Map<String, Value>) -> anyhow::Result<Value> {
    let ing = ingest(p)?;
    let received_at = crate::now_ms();
    let raw = Value::Object(event.clone()).to_string();
    // An event that names no device topic is dead-lettered, not failed: a retry of the same
    // event could only fail again.
    let (topic, payload) = match crate::ingest::source::iot_rule(event) {
        Ok(t) => t,
        Err(reason) => {
            let reason = format!("IoT rule event: {reason}");
            let r = ing
                .refuse(
                    "unknown",
                    "",
                    raw.as_bytes(),
                    proto::Via::Iot,
                    received_at,
                    &reason,
                )
                .await?;
            return Ok(device_answer(&r));
        }
    };
    let Some((device, event_type)) = ing.engine.topic().matches(&topic) else {
        let reason = format!(
            "IoT rule event: topic '{topic}' is not a device topic ({})",
            ing.engine.topic().as_str()
        );
        let r = ing
            .refuse(
                "unknown",
                "",
                &payload,
                proto::Via::Iot,
                received_at,
                &reason,
            )
            .await?;
        return Ok(device_answer(&r));
    };
    let m = crate::ingest::Message {
        device,
        event_type,
        payload: &payload,
        via: proto::Via::Iot,
        received_at,
        replay: false,
    };
    Ok(device_answer(&ing.handle(&m).await?))
}

async fn handle_device_event(p: &Pipeline, detail: &Value) -> anyhow::Result<Value> {
    let ing = ingest(p)?;
    let received_at = crate::now_ms();
    let reply = match crate::ingest::source::eventbridge_detail(detail) {
        Ok(item) => {
            let m = crate::ingest::Message {
                device: &item.device,
                event_type: &item.event_type,
                payload: &item.payload,
                via: proto::Via::EventBridge,
                received_at,
                replay: false,
            };
            ing.handle(&m).await?
        }
        Err(u) => {
            let device = detail
                .get("device")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            ing.refuse(
                device,
                "",
                &u.payload,
                proto::Via::EventBridge,
                received_at,
                &u.reason,
            )
            .await?
        }
    };
    Ok(device_answer(&reply))
}

/// An SQS record's body that is a gateway batch (what the IoT rule on `gateways/+/results`
/// puts on the results queue: `{"cbor", "gateway"}`, or a JSON batch), decoded; `None` for
/// any other body (a DLQ message).
fn uplink_body(body: &str) -> Option<anyhow::Result<Batch>> {
    let v: Value = serde_json::from_str(body).ok()?;
    let o = v.as_object()?;
    let uplink = o.contains_key("cbor") || (o.contains_key("gateway") && o.contains_key("results"));
    if !uplink {
        return None;
    }
    Some(match classify(v) {
        Ok(Payload::Batch(b)) => Ok(b),
        Ok(_) => Err(anyhow!("not a gateway batch")),
        Err(e) => Err(e),
    })
}

/// The queue name in `aws.dlq_queue` (a name, or a queue URL ending in it).
fn queue_name(q: &str) -> &str {
    q.rsplit('/').next().unwrap_or(q)
}

/// An SQS event's records: gateway batches from the results queue (the IoT rule's), and DLQ
/// messages from `aws.dlq_queue`. The response lists the records that failed
/// (`ReportBatchItemFailures`), so only those come back after the visibility timeout.
///
/// Batches are stored in `edge_seq` order per gateway whatever order SQS delivered them in
/// (a standard queue does not keep it); after one of a gateway's batches failed (a gap still
/// open after `gap_hold_ms`, an AWS error), its later ones in the event fail at once, so
/// nothing is held twice. A batch that reached the DLQ (the results queue's redrive policy)
/// is tried once more per receive; after `dlq.max_receives` it is stored under `failures/`.
async fn handle_sqs(p: &Pipeline, queue: &str, records: Vec<Received>) -> anyhow::Result<Value> {
    let from_dlq = !queue.is_empty() && queue == queue_name(&p.cfg.aws.dlq_queue);
    let mut failed = Vec::new();
    let mut batches: Vec<(&Received, Batch)> = Vec::new();
    for r in &records {
        match uplink_body(&r.body) {
            Some(Ok(b)) => batches.push((r, b)),
            Some(Err(e)) => {
                if let Err(e) = give_up_or_fail(p, from_dlq, r, e).await {
                    warn!(message_id = %r.message_id, "uplink message not stored: {e:#}");
                    failed.push(r.message_id.clone());
                }
            }
            None => {
                if let Err(e) = crate::dlq::processor::settle(p, r).await {
                    warn!(message_id = %r.message_id, "DLQ message not handled: {e:#}");
                    failed.push(r.message_id.clone());
                }
            }
        }
    }
    batches.sort_by_key(|(_, b)| {
        let first = b.results.iter().map(|r| r.edge_seq).min().unwrap_or(0);
        (b.gateway.clone(), first)
    });
    let mut failed_gateways = std::collections::BTreeSet::new();
    for (r, b) in batches {
        let gateway = b.gateway.clone();
        let outcome = if failed_gateways.contains(&gateway) {
            Err(anyhow!(
                "an earlier batch of gateway {gateway} in this event was not stored"
            ))
        } else {
            store_batch(p, b).await.map(|_| ())
        };
        if let Err(e) = outcome {
            failed_gateways.insert(gateway);
            if let Err(e) = give_up_or_fail(p, from_dlq, r, e).await {
                warn!(message_id = %r.message_id, "batch not stored: {e:#}");
                failed.push(r.message_id.clone());
            }
        }
    }
    let failed: Vec<Value> = records
        .iter()
        .filter(|r| failed.contains(&r.message_id))
        .map(|r| json!({ "itemIdentifier": r.message_id }))
        .collect();
    Ok(json!({ "batchItemFailures": failed }))
}

/// A batch that could not be stored: on the DLQ after `dlq.max_receives` receives it is put
/// under `failures/` (Ok), else the error stands (the record is retried).
async fn give_up_or_fail(
    p: &Pipeline,
    from_dlq: bool,
    r: &Received,
    e: anyhow::Error,
) -> anyhow::Result<()> {
    if from_dlq && r.receive_count >= p.cfg.dlq.max_receives {
        let reason = format!(
            "a gateway batch that reached the DLQ was not stored after {} receives; last error: {e:#}",
            r.receive_count
        );
        crate::dlq::processor::store_failure(p, None, &r.body, reason).await?;
        return Ok(());
    }
    Err(e)
}

/// A correction run for an alarm or an explicit request (see the module doc).
async fn handle_trigger(
    p: &Pipeline,
    detail_type: &str,
    detail: &Value,
    time: Option<&str>,
) -> anyhow::Result<Value> {
    let (since, until, gateway) = match detail_type {
        "CloudWatch Alarm State Change" => {
            let state = detail["state"]["value"].as_str().unwrap_or_default();
            if state != "ALARM" {
                return Ok(json!({ "ignored": format!("alarm state {state}") }));
            }
            let now = time
                .and_then(|t| proto::timestamp::parse_rfc3339(t).ok())
                .unwrap_or_else(crate::now_ms);
            let day = crate::layout::date_of(now);
            (crate::layout::date_of(now - 86_400_000), Some(day), None)
        }
        "CorrectionRequested" => (
            detail["since"]
                .as_str()
                .context("detail.since: required (YYYY-MM-DD)")?
                .to_string(),
            detail["until"].as_str().map(String::from),
            detail["gateway"].as_str().map(String::from),
        ),
        ANOMALY_SCAN | ANOMALY_TRAIN => {
            return handle_anomaly(p, detail_type, detail, time).await;
        }
        other => bail!(
            "EventBridge event '{other}' is not a correction trigger (expected \
             'CloudWatch Alarm State Change' or 'CorrectionRequested')"
        ),
    };
    let report = p
        .correction_run()?
        .days(&since, until.as_deref(), gateway.as_deref(), detail_type)
        .await?;
    info!(?report, %since, "correction run finished");
    Ok(serde_json::to_value(report)?)
}

/// The detail-type of a scheduled `anomaly scan` (see [`handle_anomaly`]).
pub const ANOMALY_SCAN: &str = "AnomalyScanRequested";
/// The detail-type of a scheduled `anomaly train` (see [`handle_anomaly`]).
pub const ANOMALY_TRAIN: &str = "AnomalyTrainRequested";

/// A scheduled anomaly run. The template's EventBridge schedules send
/// `{"source", "detail-type": ANOMALY_SCAN | ANOMALY_TRAIN, "time": <the schedule's time>,
/// "detail": {"days": N, "publish"?: bool, "type"?: T}}`: a scan rescores the `dt=`
/// partitions of the `days` (default 1) days before `time`'s day and that day, publishing
/// `AnomalyDetected` unless `publish` is false; a training run fits the models on the `days`
/// (default 30) days before `time`'s day. The answer is the run's report; a scan with no
/// trained models yet answers `{"skipped"}` (nothing to score with is not a failure to retry).
async fn handle_anomaly(
    p: &Pipeline,
    detail_type: &str,
    detail: &Value,
    time: Option<&str>,
) -> anyhow::Result<Value> {
    use crate::anomaly::{self as an, history::DateRange, progress::Progress};
    let now = time
        .and_then(|t| proto::timestamp::parse_rfc3339(t).ok())
        .unwrap_or_else(crate::now_ms);
    let default_days = if detail_type == ANOMALY_SCAN { 1 } else { 30 };
    let days = match detail.get("days") {
        None | Some(Value::Null) => default_days,
        Some(d) => d
            .as_u64()
            .filter(|d| (1..=3660).contains(d))
            .context("detail.days: a whole number of days, 1 to 3660")?,
    };
    let event_type = detail.get("type").and_then(Value::as_str).map(String::from);
    let day = |back: u64| crate::layout::date_of(now - back as i64 * 86_400_000);
    let a = &p.cfg.anomaly;
    let objects = &p.sink.objects;
    let prefix = &p.cfg.aws.prefix;
    let progress = Progress::hidden();
    if detail_type == ANOMALY_TRAIN {
        let range = DateRange::new(Some(&day(days)), Some(&day(1)))?;
        let opts = an::train::TrainOptions {
            range,
            event_type,
            fit: a.fit_params(),
            exclude: a.exclude_fields.clone(),
            max_samples: a.max_samples,
            concurrency: a.read_concurrency,
        };
        let report = an::train::train(objects, prefix, &opts, &progress).await?;
        info!(
            trained = report.trained(),
            "scheduled anomaly training finished"
        );
        return Ok(serde_json::to_value(report)?);
    }
    let publish = detail
        .get("publish")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if publish && !p.cfg.sends(an::DETAIL_TYPE) {
        bail!(
            "detail.publish: {} is not in aws.detail_types",
            an::DETAIL_TYPE
        );
    }
    let models = an::AnomalyModels::load(objects.as_ref(), prefix).await?;
    if models.is_empty() {
        return Ok(
            json!({ "skipped": "no anomaly models yet (the training schedule makes them)" }),
        );
    }
    let opts = an::scan::ScanOptions {
        range: DateRange::new(Some(&day(days)), Some(&day(0)))?,
        event_type,
        concurrency: a.read_concurrency,
    };
    let report = an::scan::scan(
        objects,
        prefix,
        &models,
        &opts,
        publish.then_some(p.sink.events.as_ref()),
        &progress,
    )
    .await?;
    info!(
        anomalies = report.anomalies.len(),
        published = report.published,
        "scheduled anomaly scan finished"
    );
    let mut v = serde_json::to_value(&report)?;
    // The full list is in S3 (and on EventBridge when published); keep the answer small.
    v["anomalies_total"] = json!(report.anomalies.len());
    v["anomalies"] = serde_json::to_value(&report.anomalies[..report.anomalies.len().min(20)])?;
    Ok(v)
}

/// Runs the Lambda runtime loop (`AWS_LAMBDA_RUNTIME_API` names the Runtime API).
pub async fn run(cfg: Arc<Config>) -> Result<(), lambda_runtime::Error> {
    let aws = Aws::connect(&cfg.aws).await;
    let metrics = Arc::new(Metrics::default());
    let owner = format!(
        "lambda:{}",
        std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "cloud-bridge".into())
    );
    let pipeline = Pipeline::new(aws, Arc::clone(&cfg), metrics, owner);
    let router = match (&cfg.http, &pipeline.ingest) {
        (Some(_), Some(_)) => Some(http_router(&pipeline).map_err(|e| format!("{e:#}"))?),
        _ => None,
    };
    let (pipeline, router) = (&pipeline, router.as_ref());
    lambda_runtime::run(service_fn(move |ev: LambdaEvent<Value>| async move {
        let r = handle_with(pipeline, router, ev.payload).await;
        pipeline.metrics.flush(&pipeline.cfg.metrics, "lambda");
        r.map_err(|e| lambda_runtime::Error::from(format!("{e:#}")))
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_payloads() {
        let sqs = json!({"Records": [{"eventSource": "aws:sqs", "body": "{}",
            "eventSourceARN": "arn:aws:sqs:eu-central-1:123456789012:edge-dlq"}]});
        assert!(matches!(classify(sqs).unwrap(),
            Payload::Sqs { queue, records } if records.len() == 1 && queue == "edge-dlq"));
        let eb = json!({"detail-type": "EventCorrected", "source": "x", "detail": {}});
        assert!(matches!(classify(eb).unwrap(), Payload::EventBridge { .. }));
        let batch = Batch {
            gateway: "g".into(),
            results: vec![],
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(proto::wire::encode(&batch));
        assert!(matches!(
            classify(json!({"cbor": b64, "gateway": "g"})).unwrap(),
            Payload::Batch(_)
        ));
        assert!(classify(json!({"cbor": b64, "gateway": "other"})).is_err());
        assert!(matches!(
            classify(json!({"gateway": "g", "results": []})).unwrap(),
            Payload::Batch(_)
        ));
        let e = classify(json!({"gateway": "g", "results": [{"event_id": 1}]})).unwrap_err();
        assert!(e.to_string().starts_with("results[0]"), "{e}");
        assert!(classify(json!({"hello": 1})).is_err());
    }
}
