//! Bridge throughput in service mode: gateways publish CBOR batches over mutual TLS to a local
//! mosquitto; `cloud-bridge run` stores them in S3 and sends them to EventBridge on the local
//! emulator (moto). Prints results/s from the first publish until every gateway's hwm covers
//! what it sent, for all detail-types on and for S3 only (no EventBridge).
//!
//! `AWS_ENDPOINT_URL=$(bash tests/aws-emulator.sh start) cargo bench -p cloud-bridge --bench bridge`
//! Knobs: BENCH_GATEWAYS (4), BENCH_BATCHES per gateway (50), BENCH_BATCH_SIZE (100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run_once(endpoint: &str, label: &str, detail_types: Option<&str>) {
    let gateways = env_or("BENCH_GATEWAYS", 4);
    let batches = env_or("BENCH_BATCHES", 50);
    let size = env_or("BENCH_BATCH_SIZE", 100);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "bench");
    let broker = Broker::start_tls(dir.path(), &pki, &pki.ca);
    let names = AwsNames::unique("bench");
    let (c, k) = pki.issue("bridge-bench", false);
    let mut text = bridge_config(
        endpoint,
        &names,
        Some((broker.port, &pki.ca, &c, &k)),
        "bridge-bench",
    );
    if let Some(t) = detail_types {
        text = text.replace("[aws]\n", &format!("[aws]\ndetail_types = {t}\n"));
    }
    let cfg = write_config(dir.path(), "bridge.toml", &text);
    provision(&cfg);
    let aws = TestAws::new(endpoint).await;
    let mut bridge = Bridge::start(&cfg, dir.path().join("bridge.log"), &[("RUST_LOG", "info")]);
    bridge.wait_log("subscribed", Duration::from_secs(30));
    let names_gw: Vec<String> = (0..gateways).map(|i| format!("gw-bench-{i}")).collect();
    let clients: Vec<TestClient> = names_gw
        .iter()
        .map(|g| {
            let (c, k) = pki.issue(g, false);
            TestClient::connect(
                g,
                broker.port,
                Tls {
                    ca: &pki.ca,
                    cert: Some((&c, &k)),
                },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Encode everything first so the clock measures the bridge, not the load generator.
    let payloads: Vec<Vec<proto::Batch>> = names_gw
        .iter()
        .map(|g| {
            (0..batches)
                .map(|b| batch(g, b * size + 1..=b * size + size))
                .collect()
        })
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (client, batches) in clients.iter().zip(payloads) {
        let client = client.client.clone();
        tasks.push(tokio::spawn(async move {
            for b in batches {
                let topic = proto::uplink::results_topic(&b.gateway);
                client
                    .publish(
                        topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        proto::wire::encode(&b),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let last = batches * size;
    for g in &names_gw {
        aws.wait_hwm(&names.table, g, last, Duration::from_secs(900))
            .await;
    }
    let elapsed = start.elapsed();
    let total = gateways * last;
    let objects = aws.objects(&names.bucket, "events/").await.len();
    assert!(bridge.terminate().success());
    let emf = std::fs::read_to_string(&bridge.stdout).unwrap_or_default();
    let sum = |name: &str| -> u64 {
        emf.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v[name].as_u64())
            .sum()
    };
    println!(
        "{label:<28} {total:>7} results from {gateways} gateways ({batches} batches of {size} each) \
         in {:>6.2} s = {:>7.0} results/s; {objects} S3 objects, {} EventBridge entries \
         ({} PutEvents calls min), {} failed entries retried",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        sum("eventbridge_entries"),
        sum("eventbridge_entries").div_ceil(10),
        sum("eventbridge_failed_entries"),
    );
    assert_eq!(sum("processed"), total);
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: only bench when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(endpoint) = aws_endpoint() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("cloud-bridge service mode → moto (S3, EventBridge, DynamoDB) on this machine:");
        run_once(&endpoint, "S3 + EventBridge (all types)", None).await;
        run_once(&endpoint, "S3 only (detail_types = [])", Some("[]")).await;
    });
}
