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
    Sqs(Vec<Received>),
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
            return Ok(Payload::Sqs(
                records
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
            ));
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
        Payload::Sqs(records) => return handle_sqs(p, records).await,
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

/// The DLQ processor over an SQS event's records; failed ones are reported for a retry.
async fn handle_sqs(p: &Pipeline, records: Vec<Received>) -> anyhow::Result<Value> {
    let mut failed = Vec::new();
    for r in &records {
        if let Err(e) = crate::dlq::processor::settle(p, r).await {
            warn!(message_id = %r.message_id, "DLQ message not handled: {e:#}");
            failed.push(json!({ "itemIdentifier": r.message_id }));
        }
    }
    Ok(json!({ "batchItemFailures": failed }))
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
        let sqs = json!({"Records": [{"eventSource": "aws:sqs", "body": "{}"}]});
        assert!(matches!(classify(sqs).unwrap(), Payload::Sqs(r) if r.len() == 1));
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
