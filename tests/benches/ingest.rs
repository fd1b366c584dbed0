//! Ingest benchmark: drives the release `edge-agent` over MQTT at full speed and prints
//! events/s to the durable outbox, publish→PUBACK latency (= ingest→durable, as the device
//! sees it: the agent acks only after the group commit's fsync), and the agent's peak RSS.
//! In the same run it measures mosquitto's own QoS 1 publish→subscribe passthrough with the
//! same load generator (`e2e::load`, closed loop), as the ceiling. `bench/run` measures all
//! this and more (open-loop latency, Node-RED, scaling) side by side (`benches/side_by_side.rs`).
//!
//! Run: `cargo build --release -p edge-agent && cargo bench -p e2e --bench ingest`
//! Knobs: BENCH_EVENTS (default 300000), BENCH_CONNECTIONS (4), BENCH_WINDOW (1000 per
//! connection), BENCH_QUEUE and BENCH_BATCH (the agent's pipeline.queue_capacity / max_batch).

use std::time::{Duration, Instant};

use e2e::load::{self, Load, Pace};
use e2e::{Agent, Mosquitto, Subscriber, wait_for};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let events = env_or("BENCH_EVENTS", 300_000);
    let conns = env_or("BENCH_CONNECTIONS", 4);
    let window = env_or("BENCH_WINDOW", 1000);
    let run = |port| {
        load::run(&Load {
            conns,
            pace: Pace::Window(window),
            ..Load::new(port, events)
        })
    };
    // On disk, not tmpfs: fsync must cost what it costs on a gateway.
    let base = std::env::current_exe().unwrap();
    let scratch = base.parent().unwrap().join("bench-scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    println!("ingest benchmark: {events} events, {conns} connections, window {window}");
    let ceiling = {
        let dir = tempfile::tempdir_in(&scratch).unwrap();
        let broker = Mosquitto::start(dir.path());
        let sub = Subscriber::start(broker.port, "bench-sub", "devices/#");
        let start = Instant::now();
        let _ = run(broker.port);
        wait_for(
            "the subscriber to get everything",
            Duration::from_secs(120),
            || sub.count() >= events,
        );
        let rate = events as f64 / start.elapsed().as_secs_f64();
        drop(sub);
        rate
    };
    println!("mosquitto QoS 1 pub→sub passthrough: {ceiling:>10.0} msg/s (ceiling)");

    let dir = tempfile::tempdir_in(&scratch).unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        e2e::set(cfg, &["log", "level"], "warn".into());
        for (var, key) in [
            ("BENCH_QUEUE", "queue_capacity"),
            ("BENCH_BATCH", "max_batch"),
        ] {
            if let Ok(v) = std::env::var(var) {
                let n: i64 = v.parse().expect("a number");
                e2e::set(cfg, &["pipeline", key], n.into());
            }
        }
    });
    let out = run(agent.mqtt_port);
    let rss_kb = load::peak_rss_kib(agent.pid());
    assert!(agent.stop().success());
    let stored = agent.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&stored.stdout).unwrap();
    let in_outbox = status["outbox"]["entries"].as_u64().unwrap();
    assert_eq!(in_outbox, events as u64, "every event is in the outbox");

    let rate = out.rate();
    println!("edge-agent durable ingest:           {rate:>10.0} events/s");
    println!(
        "ingest→durable latency (pub→PUBACK):  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        out.pct_ms(0.50),
        out.pct_ms(0.99),
        out.pct_ms(1.0)
    );
    println!(
        "edge-agent peak RSS:                  {:.1} MB",
        rss_kb as f64 / 1024.0
    );
    println!(
        "ratio to mosquitto passthrough:       {:.2}x",
        rate / ceiling
    );
}
