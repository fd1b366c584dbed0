//! Gateway-less ingest throughput: `cloud-bridge run` with `[ingest]` + `[http]` (release
//! build of the bench's own binary is not used: the bench starts the binary cargo built) on
//! the local emulator (moto). Devices post their readings one after the other (each waits for
//! its 202, as an app does), all devices at once; prints events/s from the first request to
//! the last answer, and p50/p99 request latency, with EventBridge on and off.
//!
//! `AWS_ENDPOINT_URL=$(bash tests/aws-emulator.sh start) cargo bench -p cloud-bridge --bench http_ingest`
//! Knobs: BENCH_DEVICES (8), BENCH_EVENTS per device (50).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::{BodyExt as _, Full};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run_once(endpoint: &str, label: &str, detail_types: Option<&str>) {
    let devices = env_or("BENCH_DEVICES", 8);
    let per_device = env_or("BENCH_EVENTS", 50);
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("benchhttp");
    let keys: Vec<(String, String)> = (0..devices)
        .map(|i| {
            let d = format!("meter-bench-{i}");
            let (k, _) = cloud_bridge::ingest::auth::new_key(&d).unwrap();
            (d, k)
        })
        .collect();
    let key_file = dir.path().join("api-keys");
    let lines: Vec<String> = keys
        .iter()
        .map(|(d, k)| cloud_bridge::ingest::auth::key_line(d, k))
        .collect();
    std::fs::write(&key_file, lines.join("\n")).unwrap();
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let mut text = format!(
        "{}\n[dlq]\nprocess = false\n\n[ingest]\nengine_config = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:0\"\napi_keys = \"{}\"\n",
        bridge_config(endpoint, &names, None, "unused"),
        engine.display(),
        key_file.display()
    );
    if let Some(t) = detail_types {
        text = text.replace("[aws]\n", &format!("[aws]\ndetail_types = {t}\n"));
    }
    let cfg = write_config(dir.path(), "bridge.toml", &text);
    provision(&cfg);
    let bridge = Bridge::start(&cfg, dir.path().join("bridge.log"), &[("RUST_LOG", "info")]);
    bridge.wait_log("http listening", Duration::from_secs(30));
    let log = bridge.log_text();
    let addr = log
        .lines()
        .find_map(|l| l.split("addr=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let t0 = cloud_bridge::now_ms() - per_device as i64 * 60_000 - 60_000;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (device, key) in keys {
        let (client, addr) = (client.clone(), addr.clone());
        tasks.spawn(async move {
            let url = format!("http://{addr}/v1/devices/{device}/events/meter");
            let mut lat = Vec::with_capacity(per_device as usize);
            for seq in 1..=per_device {
                let body = serde_json::json!({"id": format!("e{seq}"), "seq": seq,
                    "ts": t0 + seq as i64 * 60_000,
                    "data": {"energy_kwh": 100.0 + seq as f64 * 0.25, "voltage_v": 230.0, "current_a": 2.0}})
                .to_string();
                let req = http::Request::post(&url)
                    .header("x-api-key", &key)
                    .header("content-type", "application/json")
                    .body(Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let at = Instant::now();
                let resp = client.request(req).await.unwrap();
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                assert_eq!(status, 202, "{device} seq {seq}");
                lat.push(at.elapsed());
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(l) = tasks.join_next().await {
        lat.extend(l.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let n = lat.len();
    println!(
        "http ingest ({label}): {n} events from {devices} devices in {secs:.2} s = {:.0} events/s; request p50 {:.1} ms, p99 {:.1} ms",
        n as f64 / secs,
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    drop(bridge);
}

fn main() {
    let Some(endpoint) = aws_endpoint() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        run_once(&endpoint, "S3 + EventBridge", None).await;
        run_once(&endpoint, "S3 only", Some("[]")).await;
    });
}
