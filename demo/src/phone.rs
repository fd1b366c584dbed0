//! A simulated phone app without a gateway: it posts its meter readings straight to the
//! bridge's HTTP listener (`POST /v1/devices/{device}/events/meter`, an API key of its own),
//! with a share of invalid readings (refused with 400 and dead-lettered in the cloud) and of
//! re-sends (answered as already stored). A reading that got no answer is sent again, as a
//! real app would: the bridge makes that safe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The app's device id (`meter-*`: the meter type's allow-list).
pub const DEVICE: &str = "meter-phone-1";

/// What the app sent and what it was told.
#[derive(Debug, Default)]
pub struct PhoneStats {
    /// Readings sent and answered (202 or 400); one cut off by the stop is not counted.
    pub posted: AtomicU64,
    /// 202, stored now.
    pub stored: AtomicU64,
    /// 202, stored before (a re-send).
    pub duplicates: AtomicU64,
    /// 400: refused, dead-lettered in the cloud.
    pub refused: AtomicU64,
    /// Invalid readings it sent on purpose.
    pub invalid_sent: AtomicU64,
    /// Requests that failed or got another status (sent again).
    pub retries: AtomicU64,
}

/// Posts a reading every `interval` until `stop`.
pub async fn run(
    base: String,
    key: String,
    interval: Duration,
    stats: std::sync::Arc<PhoneStats>,
    stop: CancellationToken,
) {
    let client: Client<_, Full<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let url = format!("{base}/v1/devices/{DEVICE}/events/meter");
    let mut kwh = 1200.0_f64;
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        seq += 1;
        kwh += 0.004 + fastrand::f64() * 0.002;
        let invalid = seq.is_multiple_of(10);
        let voltage = if invalid {
            612.0
        } else {
            228.0 + fastrand::f64() * 4.0
        };
        let msg = json!({
            "id": format!("p{seq}"), "seq": seq, "ts": crate::simulator::now_ms(),
            "data": {"energy_kwh": (kwh * 1000.0).round() / 1000.0, "voltage_v": voltage, "current_a": 1.1},
        })
        .to_string();
        if invalid {
            stats.invalid_sent.fetch_add(1, Ordering::Relaxed);
        }
        let sends = if seq.is_multiple_of(15) { 2 } else { 1 };
        for _ in 0..sends {
            post(&client, &url, &key, &msg, &stats, &stop).await;
        }
    }
}

/// One reading, sent until the bridge answers 202 or 400 (or the app stops).
async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>,
    url: &str,
    key: &str,
    msg: &str,
    stats: &PhoneStats,
    stop: &CancellationToken,
) {
    loop {
        let req = http::Request::post(url)
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(msg.to_string())));
        let Ok(req) = req else { return };
        let answer = async {
            let resp = client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            Some((status, v))
        };
        match answer.await {
            Some((202, v)) if v["duplicate"] == true => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                stats.posted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some((202, _)) => {
                stats.stored.fetch_add(1, Ordering::Relaxed);
                stats.posted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some((400, _)) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                stats.posted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            other => {
                stats.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    ?other,
                    "phone app: no usable answer; sending the reading again"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
