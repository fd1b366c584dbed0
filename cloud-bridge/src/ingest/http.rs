//! The HTTP entry point (axum), served by `cloud-bridge run` (`[http] listen`) and, through
//! the same router, by the Lambda for API Gateway HTTP API events.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/devices/{device}/events/{type}` (the message: JSON or CBOR) | `202` stored (or stored before: `"duplicate": true`), `400` refused (dead-lettered; the reason names the field or rule), `401`/`403` credentials, `413` over `max_body_bytes`, `503` the backend failed: nothing was committed, send it again |
//! | `POST /v1/events:batch` (`{"events": [message with device and type, …]}`) | `202` when every event is stored, `207` with each event's status when some were refused, `400` when the body is not a batch |
//! | `GET /healthz` | `200` |
//!
//! `202` is sent only once the event is in S3 and its device's state committed, so a client
//! that got one never resends, and one that got nothing resends the same message safely.
//! Credentials are checked before the body is read.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::auth::{Auth, AuthError};
use super::source::{self, Element};
use super::{Ingest, Message, Reply};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct Api {
    pub ingest: Arc<Ingest>,
    pub auth: Arc<Auth>,
    pub max_body_bytes: usize,
    pub max_batch: usize,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/devices/{device}/events/{event_type}", post(one))
        .route("/v1/events:batch", post(batch))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(api)
}

/// Serves `router` on `listener` until `shutdown`; requests in progress finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "http listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn refused(api: &Api, e: &AuthError) -> Response {
    api.ingest.metrics.http_unauthorized.increment(1);
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    let mut r = answer(status, json!({ "error": e.to_string() }));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn unavailable(e: &anyhow::Error) -> Response {
    warn!(error = %format!("{e:#}"), "http: backend failure; the client is told to resend");
    let mut r = answer(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "error": format!("{e:#}"), "retry": true }),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// The body, or `413` beyond the limit.
async fn read_body(api: &Api, body: Body) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(body, api.max_body_bytes)
        .await
        .map_err(|_| {
            answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": format!("the body is over {} bytes", api.max_body_bytes) }),
            )
        })
}

/// One event's answer: its HTTP status and JSON.
fn reply_json(reply: &Reply) -> (StatusCode, Value) {
    match reply {
        Reply::Stored {
            event_id,
            status,
            flags,
            ..
        } => (
            StatusCode::ACCEPTED,
            json!({ "event_id": event_id, "stored": true, "status": status, "flags": flags }),
        ),
        Reply::Duplicate { event_id, reason } => (
            StatusCode::ACCEPTED,
            json!({ "event_id": event_id, "stored": true, "duplicate": true, "reason": reason }),
        ),
        Reply::Rejected {
            stage,
            reason,
            subject,
            event_id,
        } => (
            StatusCode::BAD_REQUEST,
            json!({ "error": reason, "stage": stage, "subject": subject, "event_id": event_id,
                    "dead_lettered": true }),
        ),
    }
}

async fn one(
    State(api): State<Api>,
    Path((device, event_type)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received_at = crate::now_ms();
    if let Err(e) = api.auth.device_is(&headers, &device) {
        return refused(&api, &e);
    }
    let body = match read_body(&api, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let m = Message {
        device: &device,
        event_type: &event_type,
        payload: &body,
        via: proto::Via::Http,
        received_at,
        replay: false,
    };
    match api.ingest.handle(&m).await {
        Ok(reply) => {
            let (status, body) = reply_json(&reply);
            answer(status, body)
        }
        Err(e) => unavailable(&e),
    }
}

async fn batch(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let received_at = crate::now_ms();
    let device = match api.auth.device(&headers) {
        Ok(d) => d,
        Err(e) => return refused(&api, &e),
    };
    let body = match read_body(&api, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let cbor = source::is_cbor(content_type, &body);
    let elements = match source::batch(&body, cbor, api.max_batch) {
        Ok(e) => e,
        Err(reason) => {
            // Not a batch at all: the body is dead-lettered as one message of the device.
            return match api
                .ingest
                .refuse(&device, "", &body, proto::Via::Http, received_at, &reason)
                .await
            {
                Ok(reply) => {
                    let (status, body) = reply_json(&reply);
                    answer(status, body)
                }
                Err(e) => unavailable(&e),
            };
        }
    };
    let mut results = Vec::with_capacity(elements.len());
    let mut all_stored = true;
    // In order: a device's events are processed in the order it sent them.
    for (index, el) in elements.into_iter().enumerate() {
        let (status, mut body) = match el {
            Element::Ok(item) if item.device != device => {
                let e = AuthError::OtherDevice {
                    allowed: device.clone(),
                    asked: item.device,
                };
                api.ingest.metrics.http_unauthorized.increment(1);
                (StatusCode::FORBIDDEN, json!({ "error": e.to_string() }))
            }
            Element::Ok(item) => {
                let m = Message {
                    device: &item.device,
                    event_type: &item.event_type,
                    payload: &item.payload,
                    via: proto::Via::Http,
                    received_at,
                    replay: false,
                };
                match api.ingest.handle(&m).await {
                    Ok(reply) => reply_json(&reply),
                    // What came before is stored; the client resends the whole batch.
                    Err(e) => return unavailable(&e),
                }
            }
            Element::Err(u) => match api
                .ingest
                .refuse(
                    &device,
                    "",
                    &u.payload,
                    proto::Via::Http,
                    received_at,
                    &u.reason,
                )
                .await
            {
                Ok(reply) => reply_json(&reply),
                Err(e) => return unavailable(&e),
            },
        };
        all_stored &= status == StatusCode::ACCEPTED;
        if let Some(o) = body.as_object_mut() {
            o.insert("index".into(), json!(index));
            o.insert("status_code".into(), json!(status.as_u16()));
        }
        results.push(body);
    }
    let status = if all_stored {
        StatusCode::ACCEPTED
    } else {
        StatusCode::MULTI_STATUS
    };
    answer(status, json!({ "results": results }))
}
