//! Floods against the agent's caps, one per cap: the real agent, real MQTT clients (rumqtt's
//! codec over plain sockets), and the agent's RSS (VmRSS) sampled through each flood. Each test
//! states the bound it holds the agent to and checks that the cap's metric moved.
//!
//! The bounds are for the debug build the tests run (a freshly started agent is ~40 MiB there,
//! measured on a 2-core CI machine); each is at least 1.5× the peak measured, so that they
//! catch growth with the flood (the large-payload flood peaked at 613 MiB before
//! max_buffered_bytes), not noise on a loaded machine.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use e2e::{Agent, Publisher, RssPeak, meter, set, wait_for};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use socket2::{Domain, Socket, Type};

const MIB: u64 = 1024;

/// A socket from `source` (any 127.0.0.0/8 address is loopback) to the agent, with a small
/// receive buffer when asked (so that a client that does not read stalls soon).
fn socket(agent: &Agent, source: Ipv4Addr, rcvbuf: Option<usize>) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    let to = SocketAddr::from(([127, 0, 0, 1], agent.mqtt_port));
    s.connect(&to.into()).unwrap();
    s.into()
}

/// CONNECT and its CONNACK (return code 0).
fn mqtt_connect(stream: &mut TcpStream, client_id: &str) {
    let mut out = BytesMut::new();
    Connect::new(client_id).write(&mut out).unwrap();
    stream.write_all(&out).unwrap();
    let mut ack = [0u8; 4];
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK");
}

fn publish_bytes(topic: &str, pkid: u16, payload: &[u8], out: &mut BytesMut) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = pkid;
    Packet::Publish(p).write(out, usize::MAX).unwrap();
}

/// Waits until `name` reads `value`: a batch's acks go out just before its counters move.
fn wait_metric(agent: &Agent, name: &str, value: u64) {
    wait_for(name, Duration::from_secs(30), || {
        agent.metric(name) == value as f64
    });
}

/// Whether the agent closed the connection (EOF or reset) within the socket's read timeout.
fn closed(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 64];
    matches!(stream.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn a_flood_of_new_device_ids_stops_at_max_devices() {
    const MAX_DEVICES: u64 = 500;
    const FLOOD: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |c| {
        set(c, &["pipeline", "max_devices"], (MAX_DEVICES as i64).into());
    });
    let peak = RssPeak::start(agent.pid());
    // Long ids (the engine's longest, 128 bytes) make each device's state as costly as it can
    // be.
    let pad = "x".repeat(128 - "meter-00000-".len());
    let messages = (0..FLOOD)
        .map(|i| {
            let topic = format!("devices/meter-{i:05}-{pad}/events/meter");
            (u16::try_from(i + 1).unwrap(), topic, meter("r1", 1, 1.0))
        })
        .collect();
    Publisher::new(agent.mqtt_port, "flood-ids").publish_all(
        messages,
        500,
        Duration::from_secs(300),
        |_| {},
    );
    // Every message was acknowledged, so each is a result or a DLQ entry by now.
    wait_metric(&agent, "edge_ingested_total", FLOOD);
    let peak = peak.stop();
    assert_eq!(agent.metric("edge_devices"), MAX_DEVICES as f64);
    assert_eq!(
        agent.metric("edge_devices_refused_total"),
        (FLOOD - MAX_DEVICES) as f64
    );
    assert_eq!(agent.metric("edge_accepted_total"), MAX_DEVICES as f64);
    println!("device flood: peak RSS {} MiB", peak / MIB);
    assert!(peak < 128 * MIB, "RSS {peak} KiB over 128 MiB");

    // The cap holds across a restart (the devices come back from the store); a known device
    // goes on, and the refusals are in the DLQ with their reason.
    agent.stop();
    agent.restart();
    let known = format!("devices/meter-00000-{pad}/events/meter");
    let new = format!("devices/meter-new-{pad}/events/meter");
    let mut p = Publisher::new(agent.mqtt_port, "after-restart");
    p.publish_all(
        vec![
            (1, known, meter("r2", 2, 1.1)),
            (2, new, meter("r1", 1, 1.0)),
        ],
        2,
        Duration::from_secs(30),
        |_| {},
    );
    wait_metric(&agent, "edge_ingested_total", 2);
    assert_eq!(agent.metric("edge_accepted_total"), 1.0);
    assert_eq!(agent.metric("edge_devices_refused_total"), 1.0);
    agent.stop();
    let refused = agent.cli_json(&["dlq", "list", "--reason", "max_devices", "--json"]);
    assert_eq!(refused.len() as u64, FLOOD - MAX_DEVICES + 1);
    let reason = refused[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("is new and the gateway already tracks its maximum of 500 devices"),
        "{reason}"
    );
}

#[test]
fn a_client_that_never_reads_its_pubacks_stalls_itself_not_the_agent() {
    const MAX_INFLIGHT: i64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |c| {
        set(
            c,
            &["broker", "embedded", "max_inflight"],
            MAX_INFLIGHT.into(),
        );
    });
    let peak = RssPeak::start(agent.pid());
    let mut s = socket(&agent, Ipv4Addr::LOCALHOST, Some(4096));
    mqtt_connect(&mut s, "never-reads");
    // Publish until the agent stops taking bytes: its PUBACKs fill this socket's small receive
    // buffer, so its writer blocks, its in-flight count reaches the cap and it stops reading.
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let payload = meter("r1", 1, 1.0);
    let mut sent = 0u64;
    let stalled = loop {
        let mut out = BytesMut::new();
        for _ in 0..100 {
            sent += 1;
            let pkid = u16::try_from(sent % 65_535 + 1).unwrap();
            publish_bytes("devices/meter-1/events/meter", pkid, &payload, &mut out);
        }
        match s.write_all(&out) {
            Ok(()) if sent < 2_000_000 => {}
            Ok(()) => break false,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break true;
            }
            Err(e) => panic!("write failed: {e}"),
        }
    };
    assert!(stalled, "the agent kept reading {sent} publishes");
    wait_for("the in-flight cap", Duration::from_secs(30), || {
        agent.metric("ingest_inflight_full_total") >= 1.0
    });
    let ingested = agent.metric("edge_ingested_total");
    assert!(ingested < sent as f64, "{ingested} of {sent} ingested");
    let peak = peak.stop();
    println!(
        "unread PUBACKs: {sent} publishes sent, {ingested} ingested, peak RSS {} MiB",
        peak / MIB
    );
    assert!(peak < 96 * MIB, "RSS {peak} KiB over 96 MiB");
}

#[test]
fn topics_over_max_topic_bytes_are_refused_from_the_header() {
    const CONNECTIONS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    let peak = RssPeak::start(agent.pid());
    // Each declares a 65 000-byte topic (in a packet under max_packet_bytes) and sends only
    // the first kilobyte of it: the agent must refuse it without waiting for the rest.
    let topic = format!("devices/{}/events/meter", "d".repeat(65_000));
    let mut packet = BytesMut::new();
    publish_bytes(&topic, 1, b"{}", &mut packet);
    for i in 0..CONNECTIONS {
        let mut s = socket(&agent, Ipv4Addr::LOCALHOST, None);
        mqtt_connect(&mut s, &format!("long-topic-{i}"));
        s.write_all(&packet[..1024]).unwrap();
        assert!(closed(&mut s), "connection {i} was not closed");
    }
    assert_eq!(
        agent.metric("ingest_topic_too_long_total"),
        CONNECTIONS as f64
    );
    assert_eq!(agent.metric("edge_ingested_total"), 0.0);
    let peak = peak.stop();
    println!("long topics: peak RSS {} MiB", peak / MIB);
    assert!(peak < 96 * MIB, "RSS {peak} KiB over 96 MiB");
    agent.stop();
    assert!(agent.outbox().is_empty() && agent.dlq().is_empty());
}

#[test]
fn a_connection_flood_stops_at_the_connection_caps() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |c| {
        set(c, &["broker", "embedded", "max_connections"], 100.into());
        set(
            c,
            &["broker", "embedded", "max_connections_per_address"],
            40.into(),
        );
        // Held open without a CONNECT for the whole test.
        set(
            c,
            &["broker", "embedded", "connect_timeout_ms"],
            120_000.into(),
        );
    });
    let peak = RssPeak::start(agent.pid());
    let mut open = Vec::new();
    // 45 from one address (5 over its cap), 40 from a second, then 415 from a third, of which
    // 20 fit under the total cap.
    for (source, n) in [
        ([127, 0, 0, 1], 45),
        ([127, 0, 0, 2], 40),
        ([127, 0, 0, 3], 415),
    ] {
        for _ in 0..n {
            open.push(socket(&agent, Ipv4Addr::from(source), None));
        }
    }
    wait_for("the refusals", Duration::from_secs(30), || {
        agent.metric("ingest_connections_refused_total") == 400.0
    });
    assert_eq!(agent.metric("ingest_connections"), 100.0);
    let body = e2e::http_get(agent.metrics_port, "/metrics");
    for (reason, n) in [("max_connections_per_address", 5), ("max_connections", 395)] {
        let line = format!("ingest_connections_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(body.contains(&line), "no `{line}` in:\n{body}");
    }
    let peak = peak.stop();
    println!("connection flood: peak RSS {} MiB", peak / MIB);
    assert!(peak < 96 * MIB, "RSS {peak} KiB over 96 MiB");
    drop(open);
}

#[test]
fn a_flood_of_gaps_and_duplicates_stays_within_the_dedupe_window_and_missed_cap() {
    const FLOOD: u64 = 20_000;
    const MISSED_MAX: u64 = 500;
    // engine::seq::MAX_MISSING_RANGES: open gaps kept per device.
    const RANGES: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |c| {
        set(
            c,
            &["pipeline", "missed_max_records"],
            (MISSED_MAX as i64).into(),
        );
    });
    let peak = RssPeak::start(agent.pid());
    // Every other seq, so each reading after the first opens a gap: the tracker keeps the
    // newest RANGES, each older one becomes a missed record at once, and those stop at
    // missed_max_records (the oldest dropped, counted).
    let topic = "devices/meter-1/events/meter";
    let gaps = (0..FLOOD)
        .map(|i| {
            let seq = 2 * i + 1;
            let payload = meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.1);
            (u16::try_from(i + 1).unwrap(), topic.to_string(), payload)
        })
        .collect();
    let mut p = Publisher::new(agent.mqtt_port, "flood-gaps");
    p.publish_all(gaps, 500, Duration::from_secs(300), |_| {});
    wait_metric(&agent, "edge_accepted_total", FLOOD);
    assert_eq!(agent.metric("edge_gaps_total"), (FLOOD - 1) as f64);
    assert!(agent.metric("edge_gaps_open") <= RANGES as f64);
    assert_eq!(agent.metric("edge_missed_records"), MISSED_MAX as f64);
    assert_eq!(
        agent.metric("edge_missed_records_dropped_total"),
        (FLOOD - 1 - RANGES - MISSED_MAX) as f64
    );
    // The last reading again and again, under new packet ids: the recent-id ring and the
    // seq tracker (fixed size) catch every copy.
    let last = 2 * FLOOD - 1;
    let dups = (0..FLOOD / 2)
        .map(|i| {
            let payload = meter(&format!("r{last}"), last, 1000.0 + last as f64 * 0.1);
            (u16::try_from(i + 1).unwrap(), topic.to_string(), payload)
        })
        .collect();
    p.publish_all(dups, 500, Duration::from_secs(300), |_| {});
    wait_metric(&agent, "edge_duplicates_total", FLOOD / 2);
    assert_eq!(agent.metric("edge_accepted_total"), FLOOD as f64);
    let peak = peak.stop();
    println!("gap and duplicate flood: peak RSS {} MiB", peak / MIB);
    // The metrics above are the proof (a gap costs a few bytes, so RSS cannot show one);
    // this bound is the agent's ordinary footprint under a fast stream (~60 MiB measured).
    assert!(peak < 128 * MIB, "RSS {peak} KiB over 128 MiB");
}

#[test]
fn a_flood_of_large_payloads_is_held_to_max_buffered_bytes_in_flight() {
    const CLIENTS: u64 = 8;
    const EACH: u64 = 150;
    const PAYLOAD: usize = 200 * 1024;
    let dir = tempfile::tempdir().unwrap();
    // The DLQ small too: sled keeps much of what it recently stored resident, so the DLQ's
    // byte cap is an RSS cap of its own (measured: ~300 MiB RSS with 240 MiB of large DLQ
    // entries); this test is about the bytes between ingest and the commit.
    let agent = Agent::embedded(dir.path(), |c| {
        set(c, &["dlq", "max_bytes"], (8i64 << 20).into());
    });
    let peak = RssPeak::start(agent.pid());
    // Payloads far over the engine's limit (limits.max_payload_bytes) but under the packet
    // limit: each is read, queued and dead-lettered (the DLQ drops the oldest at its cap).
    let payload = vec![b'x'; PAYLOAD];
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (port, payload) = (agent.mqtt_port, payload.clone());
            std::thread::spawn(move || {
                let messages = (0..EACH)
                    .map(|i| {
                        let topic = format!("devices/meter-{c}/events/meter");
                        (u16::try_from(i + 1).unwrap(), topic, payload.clone())
                    })
                    .collect();
                Publisher::new(port, &format!("big-{c}")).publish_all(
                    messages,
                    EACH as usize,
                    Duration::from_secs(300),
                    |_| {},
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_metric(&agent, "edge_ingested_total", CLIENTS * EACH);
    let peak = peak.stop();
    assert!(agent.metric("ingest_buffer_full_total") >= 1.0);
    // Without max_buffered_bytes (8 MiB by default) the queue and the batch held up to 3072
    // such messages: 613 MiB peak measured; with it ~100 MiB.
    println!("large payloads: peak RSS {} MiB", peak / MIB);
    assert!(peak < 192 * MIB, "RSS {peak} KiB over 192 MiB");
}

/// `[outbox] max_age_s`: pending results older than that are dropped, counted exactly (metric,
/// `status`) and logged; without it nothing is dropped for its age.
#[test]
fn results_older_than_max_age_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        e2e::set(cfg, &["uplink", "enabled"], false.into());
        e2e::set(cfg, &["outbox", "max_age_s"], 1.into());
    });
    for seq in 1..=5 {
        e2e::mosquitto_pub(
            agent.mqtt_port,
            "devices/meter-1/events/meter",
            &meter(&format!("x{seq}"), seq, 100.0 + seq as f64 * 0.1),
            1,
        );
    }
    wait_for("the five to expire", Duration::from_secs(30), || {
        agent.metric("edge_outbox_expired_total") == 5.0
    });
    let out = agent.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&status["outbox"]["entries"], &status["outbox"]["expired"]),
        (&serde_json::json!(0), &serde_json::json!(5)),
        "{status}"
    );
    assert!(agent.log_text().contains("older than outbox.max_age_s"));
    assert!(agent.stop().success());
    assert!(agent.outbox().is_empty());

    // Without the limit, results wait as long as it takes.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, text.replace("max_age_s = 1\n", "")).unwrap();
    agent.restart();
    e2e::mosquitto_pub(
        agent.mqtt_port,
        "devices/meter-1/events/meter",
        &meter("x6", 6, 100.6),
        1,
    );
    assert!(agent.stop().success());
    assert_eq!(agent.outbox().len(), 1);
}
