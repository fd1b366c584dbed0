//! Soak: the real agent (embedded endpoint) and a real cloud broker (mosquitto, mutual TLS) at a
//! steady load, with the uplink cut periodically (the broker stopped and started), the agent
//! restarted (SIGTERM and SIGKILL in turn) and a client that sends garbage. At the end every
//! published event is accounted for (delivered to the cloud, in the DLQ, pending in the outbox,
//! or a counted drop), and the agent's RSS and its data dir stayed under stated bounds.
//!
//! `soak_short` (≈ 40 s of load) runs with the other tests; `soak_long` is the ≤ 10 minute form:
//! `scripts/soak [SECONDS]` (or `SOAK_SECONDS=N cargo test -p e2e --test soak -- --ignored`).
//!
//! One cycle of [`CYCLE`]: load all along; the uplink is down from [`OUTAGE`].0 to .1 into the
//! cycle; at [`RESTART_AT`] the agent is stopped (odd cycles SIGTERM, even ones SIGKILL) and
//! started again. The publisher is a device: it keeps its unacknowledged messages and sends them
//! again after a reconnect, so an agent restart costs nothing but time. Waits are polls of a
//! condition with a generous deadline; the only sleeps pace the schedule.
//!
//! Bounds (the debug build, an idle agent ~15 MiB): RSS under [`RSS_BOUND_MIB`] and, so that
//! growth over the run shows, the last third's peak within 1.5× + 16 MiB of the first third's;
//! the data dir under [`DISK_BOUND_MIB`] (the replay window is [`REPLAY_WINDOW`] results, so the
//! outbox stops growing once it is full; the DLQ grows only by the garbage that parses as MQTT).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use e2e::{Agent, Mosquitto, Pki, Publisher, Subscriber, dir_bytes, meter, rss_kib, set};
use proto::Batch;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};

const RATE_PER_S: u64 = 100;
const DEVICES: u64 = 10;
const CYCLE: Duration = Duration::from_secs(20);
const OUTAGE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(10));
const RESTART_AT: Duration = Duration::from_secs(15);
const GARBAGE_EVERY: Duration = Duration::from_millis(250);
const REPLAY_WINDOW: i64 = 2000;
const RSS_BOUND_MIB: u64 = 128;
const DISK_BOUND_MIB: u64 = 256;
const GATEWAY: &str = "gw-test";
const MIB: u64 = 1024 * 1024;

#[test]
fn soak_short() {
    soak(Duration::from_secs(40));
}

#[test]
#[ignore = "the long form (≤ 10 minutes): scripts/soak [SECONDS]"]
fn soak_long() {
    let secs = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(600);
    soak(Duration::from_secs(secs.clamp(20, 600)));
}

/// One sample of the agent: seconds into the run, RSS (KiB), data dir (bytes).
struct Sample {
    t: f64,
    rss_kib: u64,
    disk: u64,
}

fn soak(load_for: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let mut broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-soak", "gateways/+/results");
    let mut agent = Agent::embedded(dir.path(), |c| {
        e2e::uplink_to(c, GATEWAY, &broker, &pki, true, 5);
        set(c, &["outbox", "replay_window"], REPLAY_WINDOW.into());
    });
    let data = dir.path().join("data");
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(agent.mqtt_port, stop.clone());
    let garbage = start_garbage(agent.mqtt_port, stop.clone());

    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let (mut outages, mut restarts) = (0u32, 0u32);
    let mut broker_down = false;
    let mut restarted_in = None;
    while start.elapsed() < load_for {
        let t = start.elapsed();
        let cycle = (t.as_secs_f64() / CYCLE.as_secs_f64()) as u32;
        let into = t - CYCLE * cycle;
        let want_down = into >= OUTAGE.0 && into < OUTAGE.1;
        if want_down && !broker_down {
            broker.stop();
            broker_down = true;
            outages += 1;
        } else if !want_down && broker_down {
            broker.restart();
            broker_down = false;
        }
        if into >= RESTART_AT && restarted_in != Some(cycle) {
            restarted_in = Some(cycle);
            if cycle.is_multiple_of(2) {
                assert!(agent.stop().success(), "{}", agent.log_text());
            } else {
                agent.kill9();
            }
            agent.restart();
            restarts += 1;
        }
        if t >= next_sample {
            samples.push(Sample {
                t: t.as_secs_f64(),
                rss_kib: rss_kib(agent.pid()),
                disk: dir_bytes(&data),
            });
            next_sample += Duration::from_secs(1);
        }
        // Paces the schedule (one step per 50 ms); nothing waits on it.
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let published = load.join().expect("the load thread");
    let junk = garbage.join().expect("the garbage thread");
    if broker_down {
        broker.restart();
    }

    // Drain: the broker has acknowledged every result, then the cloud side has them all.
    let deadline = Duration::from_secs(180);
    e2e::wait_for("the outbox to drain", deadline, || {
        agent.metric("edge_outbox_entries") == 0.0
    });
    samples.push(Sample {
        t: start.elapsed().as_secs_f64(),
        rss_kib: rss_kib(agent.pid()),
        disk: dir_bytes(&data),
    });
    let want: BTreeSet<String> = (0..published).map(event_id).collect();
    let delivered = poll_delivered(&sub, &want, deadline);
    assert!(agent.stop().success(), "{}", agent.log_text());

    // The ledger, from the stopped agent's store.
    let status = agent.cli(&["status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let results = status["next_edge_seq"].as_u64().unwrap() - 1;
    let pending = status["outbox"]["entries"].as_u64().unwrap();
    let outbox_dropped = status["outbox"]["dropped"].as_u64().unwrap();
    let dlq_dropped = status["dlq"]["dropped_total"].as_u64().unwrap();
    let dlq = agent.dlq();
    let dlq_ids: BTreeSet<String> = dlq
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_string))
        .collect();
    let junk_in_dlq = dlq
        .iter()
        .filter(|e| e["topic"].as_str().is_some_and(|t| t.starts_with(JUNK)))
        .count() as u64;

    print_samples(&samples);
    println!(
        "soak {:?}: published {published}, delivered {} (results {results}), DLQ {} (junk {junk_in_dlq}), \
         pending {pending}, dropped {} + {}; {outages} outages, {restarts} restarts; garbage: {} \
         connections, {} junk publishes sent, {} acknowledged",
        load_for,
        delivered.len(),
        dlq.len(),
        outbox_dropped,
        dlq_dropped,
        junk.connections,
        junk.sent,
        junk.acked
    );

    // Every published reading is exactly one of: delivered, in the DLQ, pending, dropped.
    let lost: Vec<&String> = want
        .iter()
        .filter(|id| !delivered.contains_key(*id) && !dlq_ids.contains(*id))
        .collect();
    assert!(
        lost.len() as u64 <= pending + outbox_dropped + dlq_dropped,
        "{} readings neither delivered nor in the DLQ nor counted (first: {:?})",
        lost.len(),
        lost.first()
    );
    // No drops are expected here (outbox policy block, DLQ far from its cap): all delivered.
    assert_eq!(
        (pending, outbox_dropped, dlq_dropped),
        (0, 0, 0),
        "nothing pending or dropped"
    );
    assert!(lost.is_empty());
    assert!(
        dlq_ids.iter().all(|id| !want.contains(id)),
        "valid readings were dead-lettered"
    );
    // Each reading became one result (one edge_seq, however often it was re-sent), and every
    // result the agent made reached the cloud.
    let twice: Vec<_> = delivered.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "a reading under two edge_seqs: {twice:?}");
    assert_eq!(results, published, "one result per reading, no more");
    let seqs: BTreeSet<u64> = delivered.values().flatten().copied().collect();
    assert_eq!(seqs, (1..=results).collect(), "every edge_seq delivered");
    // The junk that parsed as MQTT: each acknowledged one is in the DLQ, none went elsewhere.
    assert!(
        junk.acked <= junk_in_dlq && junk_in_dlq <= junk.sent,
        "junk: {} acknowledged, {junk_in_dlq} in the DLQ, {} sent",
        junk.acked,
        junk.sent
    );
    assert_eq!(dlq.len() as u64, junk_in_dlq, "only junk in the DLQ");
    assert!(outages >= 1 && restarts >= 1, "the schedule ran");

    // Memory and disk.
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap() * 1024;
    assert!(
        peak < RSS_BOUND_MIB * MIB,
        "RSS peaked at {} MiB, over {RSS_BOUND_MIB} MiB",
        peak / MIB
    );
    let third = samples.len() / 3;
    let first = samples[..third].iter().map(|s| s.rss_kib).max().unwrap();
    let last = samples[samples.len() - third..]
        .iter()
        .map(|s| s.rss_kib)
        .max()
        .unwrap();
    assert!(
        last <= first * 3 / 2 + 16 * 1024,
        "RSS grew over the run: first third's peak {first} KiB, last third's {last} KiB"
    );
    let disk = samples.iter().map(|s| s.disk).max().unwrap();
    assert!(
        disk < DISK_BOUND_MIB * MIB,
        "data dir reached {} MiB, over {DISK_BOUND_MIB} MiB",
        disk / MIB
    );
}

/// The event id of the `i`-th reading the load sends.
fn event_id(i: u64) -> String {
    format!("meter-{}/r{}", i % DEVICES, i / DEVICES + 1)
}

/// A steady `RATE_PER_S` of meter readings over `DEVICES` devices until `stop`; returns how
/// many were published (each acknowledged by the agent).
fn start_load(port: u16, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut p = Publisher::new(port, "soak-load");
        let start = Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * RATE_PER_S as f64) as u64;
            if due <= sent {
                // Paces the load; nothing waits on it.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let n = (due - sent).min(1000);
            let messages = (0..n)
                .map(|k| {
                    let i = sent + k;
                    let (device, seq) = (i % DEVICES, i / DEVICES + 1);
                    let topic = format!("devices/meter-{device}/events/meter");
                    let payload = meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.1);
                    (u16::try_from(k + 1).unwrap(), topic, payload)
                })
                .collect();
            // Until every one is acknowledged, across agent restarts.
            p.publish_all(messages, 200, Duration::from_secs(120), |_| {});
            sent += n;
        }
        sent
    })
}

/// Topic prefix of the garbage client's publishes (its DLQ entries).
const JUNK: &str = "devices/junk-";

#[derive(Debug, Default)]
struct Junk {
    connections: u64,
    /// PUBLISHes of random payloads on a valid topic.
    sent: u64,
    /// Those the agent acknowledged (so they are in the DLQ).
    acked: u64,
}

/// Every `GARBAGE_EVERY` a new connection that does one of: random bytes before any CONNECT;
/// CONNECT then random bytes; CONNECT then a QoS 1 PUBLISH of random bytes on a device topic
/// (a DLQ entry); a topic over `max_topic_bytes`; a packet declaring more than
/// `max_packet_bytes`. A connection the agent refuses (restarting) just counts as tried.
fn start_garbage(port: u16, stop: Arc<AtomicBool>) -> JoinHandle<Junk> {
    std::thread::spawn(move || {
        let mut junk = Junk::default();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect()
        };
        let mut next = Instant::now();
        let mut kind = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() < next {
                // Paces the garbage; nothing waits on it.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            next += GARBAGE_EVERY;
            kind += 1;
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            junk.connections += 1;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = BytesMut::new();
            let id = format!("junk-{kind}");
            if !kind.is_multiple_of(5) {
                Connect::new(id.clone()).write(&mut out).unwrap();
            }
            match kind % 5 {
                0 | 1 => out.extend_from_slice(&random(64 + (kind as usize % 512))),
                2 => {
                    let mut p = Publish::new(
                        format!("{JUNK}{kind}/events/meter"),
                        QoS::AtLeastOnce,
                        random(1 + kind as usize % 300),
                    );
                    p.pkid = 7;
                    p.write(&mut out).unwrap();
                    junk.sent += 1;
                }
                3 => {
                    let topic = format!("devices/{}/events/meter", "t".repeat(4000));
                    let mut p = Publish::new(topic, QoS::AtLeastOnce, b"{}".to_vec());
                    p.pkid = 1;
                    p.write(&mut out).unwrap();
                }
                _ => out.extend_from_slice(&[0x32, 0xff, 0xff, 0xff, 0x7f, 0, 1, b'x']),
            }
            if s.write_all(&out).is_err() {
                continue;
            }
            if kind % 5 == 2 && puback(&mut s, 7) {
                junk.acked += 1;
            }
        }
        junk
    })
}

/// Reads until the PUBACK of `pkid`, the connection's end or the read timeout.
fn puback(s: &mut TcpStream, pkid: u16) -> bool {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 1024];
    loop {
        loop {
            match Packet::read(&mut buf, 1 << 16) {
                Ok(Packet::PubAck(a)) if a.pkid == pkid => return true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Event id → the edge_seqs it arrived under, once the cloud side has every one of `want`
/// (polled, at most `deadline`).
fn poll_delivered(
    sub: &Subscriber,
    want: &BTreeSet<String>,
    deadline: Duration,
) -> HashMap<String, BTreeSet<u64>> {
    let start = Instant::now();
    loop {
        let mut got: HashMap<String, BTreeSet<u64>> = HashMap::new();
        for (topic, payload) in sub.received() {
            assert_eq!(topic, format!("gateways/{GATEWAY}/results"));
            let batch: Batch = proto::wire::decode(&payload).expect("a CBOR batch");
            for r in batch.results {
                got.entry(r.event_id).or_default().insert(r.edge_seq);
            }
        }
        let missing = want.iter().filter(|id| !got.contains_key(*id)).count();
        if missing == 0 {
            return got;
        }
        assert!(
            start.elapsed() < deadline,
            "{missing} of {} readings never reached the cloud side",
            want.len()
        );
        // The poll's interval: decoding everything received is not free.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The samples as a table: one row per 5 s (and the last), then the peaks.
fn print_samples(samples: &[Sample]) {
    println!("{:>7} {:>9} {:>11}", "t (s)", "RSS MiB", "disk MiB");
    let mut rows: BTreeMap<u64, &Sample> = BTreeMap::new();
    for s in samples {
        rows.entry(s.t as u64 / 5).or_insert(s);
    }
    if let Some(last) = samples.last() {
        rows.insert(u64::MAX, last);
    }
    for s in rows.values() {
        println!(
            "{:>7.1} {:>9.1} {:>11.1}",
            s.t,
            s.rss_kib as f64 / 1024.0,
            s.disk as f64 / MIB as f64
        );
    }
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_disk = samples.iter().map(|s| s.disk).max().unwrap_or(0);
    println!(
        "peaks: RSS {:.1} MiB, disk {:.1} MiB over {} samples",
        peak_rss as f64 / 1024.0,
        peak_disk as f64 / MIB as f64,
        samples.len()
    );
}
