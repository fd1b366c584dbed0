//! Uplink drain benchmark: fills the release agent's outbox with a backlog while the cloud is
//! unreachable, then turns the uplink on (plain MQTT to a local mosquitto) and times how fast
//! the backlog drains, i.e. until every result is released by a broker PUBACK.
//!
//! Run: `cargo build --release -p edge-agent && cargo bench -p e2e --bench uplink`
//! Knobs: BENCH_BACKLOG (default 1000000).

use std::time::{Duration, Instant};

use e2e::{Agent, Mosquitto, Publisher, meter, set, wait_for};

fn main() {
    let backlog: u64 = std::env::var("BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base = std::env::current_exe().unwrap();
    let scratch = base.parent().unwrap().join("bench-scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let dir = tempfile::tempdir_in(&scratch).unwrap();
    let broker = Mosquitto::start(dir.path());

    println!("uplink drain benchmark: a backlog of {backlog} results");
    // Phase 1: the cloud is away (uplink off); devices keep publishing.
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["log", "level"], "warn".into());
        set(cfg, &["gateway_id"], "gw-bench".into());
    });
    let started = Instant::now();
    let devices = 50u64;
    let mut sent = 0u64;
    while sent < backlog {
        let chunk = (backlog - sent).min(60_000);
        let messages = (0..chunk)
            .map(|i| {
                let n = sent + i;
                let (d, seq) = (n % devices, n / devices + 1);
                let pkid = u16::try_from(i + 1).unwrap();
                let topic = format!("devices/meter-{d}/events/meter");
                (
                    pkid,
                    topic,
                    meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.01),
                )
            })
            .collect();
        let mut p = Publisher::new(agent.mqtt_port, &format!("bench-{sent}"));
        p.publish_all(messages, 1000, Duration::from_secs(600), |_| {});
        sent += chunk;
    }
    println!("backlog filled in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(agent.metric("edge_outbox_entries") as u64, backlog);
    assert!(agent.stop().success());

    // Phase 2: the cloud is back.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let mut cfg: toml::Table = text.parse().unwrap();
    set(&mut cfg, &["uplink", "enabled"], true.into());
    set(&mut cfg, &["uplink", "tls"], false.into());
    set(&mut cfg, &["uplink", "host"], "127.0.0.1".into());
    set(&mut cfg, &["uplink", "port"], i64::from(broker.port).into());
    std::fs::write(&agent.config, toml::to_string(&cfg).unwrap()).unwrap();
    let started = Instant::now();
    agent.restart();
    wait_for("the backlog to drain", Duration::from_secs(1800), || {
        agent.metric("edge_outbox_entries") == 0.0
    });
    let secs = started.elapsed().as_secs_f64();
    let bytes = agent.metric("edge_uplink_bytes_total");
    let batches = agent.metric("edge_uplink_batches_total");
    println!(
        "drained {backlog} results in {secs:.1} s: {:.0} results/s, {:.1} MB/s, {batches} batches",
        backlog as f64 / secs,
        bytes / secs / 1e6
    );
    assert!(agent.stop().success());
}
