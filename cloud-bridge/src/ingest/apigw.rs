//! API Gateway HTTP API (payload format 2.0) events as requests to the [`super::http`]
//! router, and its responses as API Gateway response objects: the Lambda answers exactly as
//! `run`'s listener does.

use axum::body::Body;
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;

use anyhow::Context as _;

/// One request through `router`; the API Gateway response object.
pub async fn handle(router: &axum::Router, event: Value) -> anyhow::Result<Value> {
    let req = request(&event)?;
    let resp = router
        .clone()
        .oneshot(req)
        .await
        .context("the HTTP router failed")?;
    let status = resp.status().as_u16();
    let mut headers = Map::new();
    for (k, v) in resp.headers() {
        if let Ok(v) = v.to_str() {
            headers.insert(k.as_str().to_string(), json!(v));
        }
    }
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .context("reading the router's response")?;
    let (body, b64) = match String::from_utf8(body.to_vec()) {
        Ok(text) => (text, false),
        Err(e) => (
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            true,
        ),
    };
    Ok(json!({
        "statusCode": status,
        "headers": headers,
        "body": body,
        "isBase64Encoded": b64,
    }))
}

/// The `http::Request` an API Gateway 2.0 event describes.
pub fn request(event: &Value) -> anyhow::Result<http::Request<Body>> {
    let method = event["requestContext"]["http"]["method"]
        .as_str()
        .context("requestContext.http.method: required")?;
    let path = event["rawPath"].as_str().context("rawPath: required")?;
    let uri = match event["rawQueryString"].as_str() {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    if let Some(Value::Object(h)) = event.get("headers") {
        for (k, v) in h {
            if let Some(v) = v.as_str() {
                b = b.header(k.as_str(), v);
            }
        }
    }
    let body = match event.get("body").and_then(Value::as_str) {
        None => Vec::new(),
        Some(text) if event["isBase64Encoded"].as_bool() == Some(true) => {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .context("body: isBase64Encoded but not base64")?
        }
        Some(text) => text.as_bytes().to_vec(),
    };
    b.body(Body::from(body)).context("not a valid HTTP request")
}
