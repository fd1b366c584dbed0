//! Ingest benchmark: drives the release `edge-agent` over MQTT at full speed and prints
//! events/s to the durable outbox, publish→PUBACK latency (= ingest→durable, as the device
//! sees it: the agent acks only after the group commit's fsync), and the agent's peak RSS.
//! In the same run it measures mosquitto's own QoS 1 publish→subscribe passthrough with the
//! same load generator, as the ceiling.
//!
//! Run: `cargo build --release -p edge-agent && cargo bench -p e2e --bench ingest`
//! Knobs: BENCH_EVENTS (default 300000), BENCH_CONNECTIONS (4), BENCH_WINDOW (1000 per
//! connection), BENCH_QUEUE and BENCH_BATCH (the agent's pipeline.queue_capacity / max_batch).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use e2e::{Agent, Mosquitto, Subscriber, wait_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};

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
        let _ = load(broker.port, events, conns, window);
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
    let start = Instant::now();
    let mut latencies = load(agent.mqtt_port, events, conns, window);
    let elapsed = start.elapsed();
    let rss_kb = peak_rss_kb(agent.pid());
    assert!(agent.stop().success());
    let stored = agent.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&stored.stdout).unwrap();
    let in_outbox = status["outbox"]["entries"].as_u64().unwrap();
    assert_eq!(in_outbox, events as u64, "every event is in the outbox");

    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let rate = events as f64 / elapsed.as_secs_f64();
    println!("edge-agent durable ingest:           {rate:>10.0} events/s");
    println!(
        "ingest→durable latency (pub→PUBACK):  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(0.50),
        pct(0.99),
        pct(1.0)
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

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Publishes `events` meter readings over `conns` connections with `window` QoS 1 messages in
/// flight each; returns every message's publish→PUBACK latency in microseconds.
fn load(port: u16, events: usize, conns: usize, window: usize) -> Vec<u32> {
    let per = events / conns;
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let n = if c == conns - 1 {
                events - per * (conns - 1)
            } else {
                per
            };
            std::thread::spawn(move || publish_stream(port, c, n, window))
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

const DEVICES_PER_CONN: usize = 25;

fn publish_stream(port: u16, conn: usize, n: usize, window: usize) -> Vec<u32> {
    let mut stream = connect(port, &format!("bench-{conn}"));
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65536];
    let mut latencies = Vec::with_capacity(n);
    let mut seqs = [0u64; DEVICES_PER_CONN];
    let (mut next, mut in_flight, mut pkid) = (0usize, 0usize, 0u16);
    let mut out = BytesMut::with_capacity(256 * 1024);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    while latencies.len() < n {
        let now = Instant::now();
        while in_flight < window && next < n {
            let d = next % DEVICES_PER_CONN;
            seqs[d] += 1;
            let seq = seqs[d];
            let payload = format!(
                r#"{{"id":"r{seq}","seq":{seq},"ts":{},"data":{{"energy_kwh":{:.3},"voltage_v":230.1,"current_a":4.25}}}}"#,
                1_764_000_000_000i64 + seq as i64 * 1000,
                1000.0 + seq as f64 * 0.001
            );
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            let mut p = Publish::new(
                format!("devices/meter-c{conn}d{d}/events/meter"),
                QoS::AtLeastOnce,
                payload,
            );
            p.pkid = pkid;
            p.write(&mut out).unwrap();
            sent_at[pkid as usize] = Some(now);
            in_flight += 1;
            next += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out).unwrap();
            out.clear();
        }
        let got = stream.read(&mut chunk).expect("agent connection");
        assert!(got > 0, "connection closed");
        buf.extend_from_slice(&chunk[..got]);
        let acked_at = Instant::now();
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::PubAck(ack)) => {
                    let t = sent_at[ack.pkid as usize]
                        .take()
                        .expect("ack of a sent packet");
                    latencies.push((acked_at - t).as_micros() as u32);
                    in_flight -= 1;
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    latencies
}

fn connect(port: u16, id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.write(&mut out).unwrap();
    stream.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before CONNACK");
        buf.extend_from_slice(&chunk[..n]);
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::ConnAck(_)) => return stream,
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => continue,
            Err(e) => panic!("{e:?}"),
        }
    }
}
