//! The embedded endpoint over real sockets: rumqttc and raw-byte clients, and mosquitto_pub.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::mqttbytes::v4::Connect;
use rumqttc::{Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::*;
use crate::ingest::AckSet;
use crate::ingest::testutil::{
    Raw, TestClient, WAIT, assert_quiet, encode, find_bin, publish, recv, release,
};

struct Server {
    addr: SocketAddr,
    rx: mpsc::Receiver<Inbound>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start_with(cap: usize, tweak: impl FnOnce(&mut EmbeddedConfig)) -> Server {
    let mut cfg = EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    tweak(&mut cfg);
    let server = EmbeddedServer::bind(cfg).await.unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(cap);
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(tx, stop.clone()));
    Server {
        addr,
        rx,
        stop,
        task,
    }
}

async fn start() -> Server {
    start_with(1024, |_| {}).await
}

const TOPIC: &str = "devices/d1/events/reading";

#[tokio::test]
async fn qos1_puback_is_sent_only_after_release_and_in_order() {
    let mut s = start().await;
    let mut c = TestClient::connect(s.addr, "dev-q1").await;
    for i in 0..5 {
        c.publish(TOPIC, QoS::AtLeastOnce, &format!("m{i}")).await;
    }
    let before = crate::ingest::now_ms();
    let mut got = Vec::new();
    for i in 0..5 {
        let inb = recv(&mut s.rx).await;
        assert_eq!(inb.topic, TOPIC);
        assert_eq!(&inb.payload[..], format!("m{i}").as_bytes());
        assert!(!inb.ack.is_none());
        assert!((inb.received_at - before).abs() < 10_000);
        got.push(inb);
    }
    // Processing "takes" a while: no PUBACK may leak out before the release.
    assert_eq!(c.next(Duration::from_millis(400)).await, None);

    let rest = got.split_off(2);
    let mut set = AckSet::new();
    for i in got {
        set.push(i.ack);
    }
    assert_eq!(set.len(), 2);
    set.release();
    assert!(set.is_empty());
    assert_eq!(c.pubacks(2).await, vec![1, 2]);
    assert_eq!(c.next(Duration::from_millis(300)).await, None);

    release(rest);
    assert_eq!(c.pubacks(3).await, vec![3, 4, 5]);
    s.stop.cancel();
    timeout(WAIT, s.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn one_release_acks_each_connection_in_its_own_order() {
    let mut s = start().await;
    let mut a = TestClient::connect(s.addr, "dev-a").await;
    let mut b = TestClient::connect(s.addr, "dev-b").await;
    for i in 0..4 {
        a.publish("devices/a/events/x", QoS::AtLeastOnce, &format!("a{i}"))
            .await;
        b.publish("devices/b/events/x", QoS::AtLeastOnce, &format!("b{i}"))
            .await;
    }
    let mut set = AckSet::new();
    for _ in 0..8 {
        set.push(recv(&mut s.rx).await.ack);
    }
    assert_eq!(set.len(), 8);
    assert_eq!(a.next(Duration::from_millis(200)).await, None);
    set.release();
    assert_eq!(a.pubacks(4).await, vec![1, 2, 3, 4]);
    assert_eq!(b.pubacks(4).await, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn qos0_needs_no_ack_and_qos2_gets_pubrec_after_release_then_pubcomp() {
    let mut s = start().await;
    let mut c = TestClient::connect(s.addr, "dev-q02").await;

    c.publish(TOPIC, QoS::AtMostOnce, "zero").await;
    let inb = recv(&mut s.rx).await;
    assert_eq!(&inb.payload[..], b"zero");
    assert!(inb.ack.is_none());
    let mut set = AckSet::new();
    set.push(inb.ack);
    assert!(set.is_empty());
    set.release();

    c.publish(TOPIC, QoS::ExactlyOnce, "two").await;
    let inb = recv(&mut s.rx).await;
    assert_eq!(&inb.payload[..], b"two");
    assert_eq!(
        c.next(Duration::from_millis(400)).await,
        None,
        "PUBREC before release"
    );
    release([inb]);
    match c.next(WAIT).await {
        Some(Packet::PubRec(r)) => assert_eq!(r.pkid, 1),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // rumqttc answers PUBREC with PUBREL; the server completes the flow.
    match c.next(WAIT).await {
        Some(Packet::PubComp(r)) => assert_eq!(r.pkid, 1),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test]
async fn pipelined_packets_in_one_write_are_all_parsed_and_acked_in_one_piece() {
    let mut s = start().await;
    let mut raw = Raw::connect(s.addr).await;
    let mut bytes = encode(&Packet::Connect(Connect::new("dev-raw")));
    for pkid in 1..=3u16 {
        bytes.extend(publish(TOPIC, QoS::AtLeastOnce, pkid, b"x"));
    }
    bytes.extend([0xC0, 0x00]); // PINGREQ
    raw.send(&bytes).await;
    assert_eq!(raw.read_exact(4).await, [0x20, 0x02, 0x00, 0x00]);
    assert_eq!(raw.read_exact(2).await, [0xD0, 0x00]);
    let inbounds = vec![
        recv(&mut s.rx).await,
        recv(&mut s.rx).await,
        recv(&mut s.rx).await,
    ];
    release(inbounds);
    assert_eq!(
        raw.read_exact(12).await,
        [
            0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3 // PUBACK 1, 2, 3
        ]
    );
    // PUBREL for an unknown id still gets its PUBCOMP.
    raw.send(&[0x62, 0x02, 0x00, 0x09]).await;
    assert_eq!(raw.read_exact(4).await, [0x70, 0x02, 0x00, 0x09]);
}

#[tokio::test]
async fn keep_alive_expiry_closes_an_idle_connection() {
    let s = start().await;
    let mut raw = Raw::connect(s.addr).await;
    let mut connect = Connect::new("dev-idle");
    connect.keep_alive = 1;
    assert_eq!(raw.mqtt_connect(connect).await, 0);
    // Traffic resets the timer: a ping at 0.7 s moves the deadline to 2.2 s.
    let t0 = Instant::now();
    sleep(Duration::from_millis(700)).await;
    raw.send(&[0xC0, 0x00]).await;
    assert_eq!(raw.read_exact(2).await, [0xD0, 0x00]);
    raw.expect_closed(Duration::from_secs(5)).await;
    let idle = t0.elapsed();
    assert!(
        idle >= Duration::from_millis(2000),
        "closed too early: {idle:?}"
    );
}

#[tokio::test]
async fn connect_must_arrive_within_the_timeout() {
    let s = start_with(16, |c| c.connect_timeout_ms = 300).await;
    let mut raw = Raw::connect(s.addr).await;
    raw.expect_closed(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn connect_refusals_follow_the_spec() {
    let s = start_with(16, |c| {
        c.username = Some("dev".into());
        c.password = Some("s3cret".into());
    })
    .await;

    // MQTT 3.1 ("MQIsdp", level 3): unacceptable protocol version.
    let mut raw = Raw::connect(s.addr).await;
    raw.send(&[
        0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 1, b'x',
    ])
    .await;
    assert_eq!(raw.read_exact(4).await, [0x20, 2, 0, 1]);
    raw.expect_closed(WAIT).await;

    // Empty client id without clean session: identifier rejected.
    let mut raw = Raw::connect(s.addr).await;
    let mut c = Connect::new("");
    c.clean_session = false;
    c.set_login("dev", "s3cret");
    assert_eq!(raw.mqtt_connect(c).await, 2);
    raw.expect_closed(WAIT).await;
    // A client id over 256 bytes: the same (it would be kept and logged).
    let mut raw = Raw::connect(s.addr).await;
    let mut c = Connect::new("c".repeat(257));
    c.set_login("dev", "s3cret");
    assert_eq!(raw.mqtt_connect(c).await, 2);
    raw.expect_closed(WAIT).await;

    // No credentials: not authorized; wrong ones: bad user name or password.
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("d")).await, 5);
    raw.expect_closed(WAIT).await;
    let mut raw = Raw::connect(s.addr).await;
    let mut c = Connect::new("d");
    c.set_login("dev", "guess");
    assert_eq!(raw.mqtt_connect(c).await, 4);
    raw.expect_closed(WAIT).await;

    // Right ones, and an empty id with clean session (the server assigns one).
    let mut raw = Raw::connect(s.addr).await;
    let mut c = Connect::new("");
    c.set_login("dev", "s3cret");
    assert_eq!(raw.mqtt_connect(c).await, 0);
    raw.send(&[0xC0, 0x00]).await;
    assert_eq!(raw.read_exact(2).await, [0xD0, 0x00]);
}

#[tokio::test]
async fn a_second_connect_with_the_same_client_id_takes_over() {
    let mut s = start().await;
    let mut old = Raw::connect(s.addr).await;
    assert_eq!(old.mqtt_connect(Connect::new("dev-twin")).await, 0);
    old.send(&publish(TOPIC, QoS::AtLeastOnce, 1, b"old")).await;
    let pending = recv(&mut s.rx).await;

    let mut new = Raw::connect(s.addr).await;
    assert_eq!(new.mqtt_connect(Connect::new("dev-twin")).await, 0);
    old.expect_closed(WAIT).await;
    // The old connection's ack is dropped quietly; the new one works.
    release([pending]);
    new.send(&publish(TOPIC, QoS::AtLeastOnce, 1, b"new")).await;
    let inb = recv(&mut s.rx).await;
    assert_eq!(&inb.payload[..], b"new");
    release([inb]);
    assert_eq!(new.read_exact(4).await, [0x40, 2, 0, 1]);
}

#[tokio::test]
async fn subscribe_is_refused_and_unsubscribe_acked() {
    let s = start().await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-sub")).await, 0);
    let sub = rumqttc::Subscribe {
        pkid: 7,
        filters: vec![
            rumqttc::SubscribeFilter::new("a/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("b".into(), QoS::AtMostOnce),
        ],
    };
    raw.send(&encode(&Packet::Subscribe(sub))).await;
    assert_eq!(raw.read_exact(6).await, [0x90, 4, 0, 7, 0x80, 0x80]);
    let unsub = rumqttc::Unsubscribe {
        pkid: 8,
        topics: vec!["a/#".into()],
    };
    raw.send(&encode(&Packet::Unsubscribe(unsub))).await;
    assert_eq!(raw.read_exact(4).await, [0xB0, 2, 0, 8]);
    raw.send(&[0xE0, 0x00]).await; // DISCONNECT
    raw.expect_closed(WAIT).await;
}

#[tokio::test]
async fn oversized_packets_and_wildcard_topics_close_the_connection() {
    let mut s = start_with(16, |c| c.max_packet_bytes = 1024).await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-big")).await, 0);
    raw.send(&publish(TOPIC, QoS::AtLeastOnce, 1, &[7u8; 2000]))
        .await;
    raw.expect_closed(WAIT).await;

    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-wild")).await, 0);
    raw.send(&publish("devices/+/events/x", QoS::AtMostOnce, 0, b"w"))
        .await;
    raw.expect_closed(WAIT).await;
    assert_quiet(&mut s.rx, Duration::from_millis(200)).await;

    // Just under the limit passes.
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-fits")).await, 0);
    raw.send(&publish(TOPIC, QoS::AtMostOnce, 0, &[7u8; 900]))
        .await;
    assert_eq!(recv(&mut s.rx).await.payload.len(), 900);
}

#[tokio::test]
async fn a_topic_over_max_topic_bytes_closes_the_connection_unacknowledged() {
    let mut s = start_with(16, |c| c.max_topic_bytes = 32).await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-long")).await, 0);
    let long = format!("devices/{}/events/e", "x".repeat(40));
    // The header alone is enough to refuse it: the rest of the packet is never sent.
    let packet = publish(&long, QoS::AtLeastOnce, 1, b"p");
    raw.send(&packet[..6]).await;
    raw.expect_closed(WAIT).await;
    assert_quiet(&mut s.rx, Duration::from_millis(200)).await;

    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-short")).await, 0);
    raw.send(&publish("devices/d/events/e", QoS::AtMostOnce, 0, b"ok"))
        .await;
    assert_eq!(recv(&mut s.rx).await.topic, "devices/d/events/e");
}

#[tokio::test]
async fn max_inflight_pauses_a_connection_until_its_acks_are_written() {
    let mut s = start_with(64, |c| c.max_inflight = 3).await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-inflight")).await, 0);
    let mut all = Vec::new();
    for pkid in 1..=8u16 {
        all.extend(publish(TOPIC, QoS::AtLeastOnce, pkid, b"m"));
    }
    // A QoS 0 publish is never held back by the cap, but it queues behind the paused ones.
    all.extend(publish(TOPIC, QoS::AtMostOnce, 0, b"q0"));
    raw.send(&all).await;
    let first: Vec<Inbound> = vec![
        recv(&mut s.rx).await,
        recv(&mut s.rx).await,
        recv(&mut s.rx).await,
    ];
    assert_quiet(&mut s.rx, Duration::from_millis(200)).await;
    release(first);
    assert_eq!(
        raw.read_exact(12).await,
        [0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3]
    );
    let next: Vec<Inbound> = vec![
        recv(&mut s.rx).await,
        recv(&mut s.rx).await,
        recv(&mut s.rx).await,
    ];
    assert_eq!(next[0].payload, &b"m"[..]);
    release(next);
    let rest: Vec<Inbound> = vec![recv(&mut s.rx).await, recv(&mut s.rx).await];
    assert_eq!(recv(&mut s.rx).await.payload, &b"q0"[..]);
    release(rest);
}

#[tokio::test]
async fn max_buffered_bytes_pauses_reading_until_the_pipeline_releases() {
    let mut s = start_with(64, |c| {
        c.max_packet_bytes = 1024;
        c.max_buffered_bytes = 2048;
    })
    .await;
    // Two connections share the budget: 900-byte payloads, two fit (with their topics).
    let (mut a, mut b) = (Raw::connect(s.addr).await, Raw::connect(s.addr).await);
    assert_eq!(a.mqtt_connect(Connect::new("dev-buf-a")).await, 0);
    assert_eq!(b.mqtt_connect(Connect::new("dev-buf-b")).await, 0);
    let big = [b'x'; 900];
    a.send(
        &[
            publish(TOPIC, QoS::AtLeastOnce, 1, &big),
            publish(TOPIC, QoS::AtMostOnce, 0, &big),
        ]
        .concat(),
    )
    .await;
    let first = vec![recv(&mut s.rx).await, recv(&mut s.rx).await];
    b.send(&publish(TOPIC, QoS::AtLeastOnce, 7, &big)).await;
    assert_quiet(&mut s.rx, Duration::from_millis(200)).await;
    // Released (after a commit), their bytes come back and the waiting reader goes on.
    release(first);
    assert_eq!(a.read_exact(4).await, [0x40, 2, 0, 1]);
    let third = recv(&mut s.rx).await;
    assert_eq!(third.payload.len(), 900);
    release([third]);
    assert_eq!(b.read_exact(4).await, [0x40, 2, 0, 7]);
}

#[tokio::test]
async fn a_full_pipeline_channel_pauses_reading_without_losing_messages() {
    let mut s = start_with(1, |_| {}).await;
    let c = TestClient::connect(s.addr, "dev-bp").await;
    for i in 0..50 {
        c.publish(TOPIC, QoS::AtMostOnce, &format!("{i}")).await;
    }
    sleep(Duration::from_millis(300)).await;
    for i in 0..50 {
        assert_eq!(recv(&mut s.rx).await.payload, format!("{i}").as_bytes());
    }
}

#[tokio::test]
async fn acks_for_a_closed_connection_are_dropped() {
    let mut s = start().await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-gone")).await, 0);
    raw.send(&publish(TOPIC, QoS::AtLeastOnce, 3, b"bye")).await;
    let inb = recv(&mut s.rx).await;
    drop(raw);
    sleep(Duration::from_millis(200)).await;
    release([inb]); // must neither panic nor block
}

#[tokio::test]
async fn shutdown_waits_for_outstanding_acks_then_closes() {
    let mut s = start().await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(raw.mqtt_connect(Connect::new("dev-drain")).await, 0);
    raw.send(&publish(TOPIC, QoS::AtLeastOnce, 9, b"last"))
        .await;
    let inb = recv(&mut s.rx).await;

    s.stop.cancel();
    // Every sender is gone: the pipeline's recv() ends …
    assert!(timeout(WAIT, s.rx.recv()).await.unwrap().is_none());
    // … but the endpoint waits for the release of what it handed out.
    sleep(Duration::from_millis(300)).await;
    assert!(!s.task.is_finished());
    release([inb]);
    assert_eq!(raw.read_exact(4).await, [0x40, 2, 0, 9]);
    raw.expect_closed(WAIT).await;
    timeout(WAIT, s.task).await.unwrap().unwrap().unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(s.addr).await.is_err());
}

#[tokio::test]
async fn serve_fails_when_the_pipeline_goes_away() {
    let s = start().await;
    drop(s.rx);
    let r = timeout(WAIT, s.task).await.unwrap().unwrap();
    assert!(r.is_err());
}

#[tokio::test]
async fn mosquitto_pub_qos1_exits_only_after_release() {
    let Some(bin) = find_bin("mosquitto_pub") else {
        eprintln!("SKIPPED: mosquitto_pub is not installed (apt-get install mosquitto-clients)");
        return;
    };
    let mut s = start().await;
    let mut child = std::process::Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &s.addr.port().to_string()])
        .args(["-V", "mqttv311", "-q", "1", "-i", "mosq-pub"])
        .args(["-t", "devices/m1/events/reading", "-m", "{\"id\":\"1\"}"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let inb = recv(&mut s.rx).await;
    assert_eq!(inb.topic, "devices/m1/events/reading");
    assert_eq!(&inb.payload[..], b"{\"id\":\"1\"}");
    sleep(Duration::from_millis(400)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "mosquitto_pub finished before its PUBACK was released"
    );
    release([inb]);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mosquitto_pub did not exit after the release");
        }
        sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "mosquitto_pub: {status}");
}
