//! The external-broker client against a real mosquitto process.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::*;
use crate::ingest::testutil::{Mosquitto, TestClient, WAIT, assert_quiet, recv, release};

struct Agent {
    rx: mpsc::Receiver<Inbound>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

const PROBE: &str = "devices/probe/events/probe";

impl Agent {
    fn start(port: u16, client_id: &str) -> Agent {
        let cfg = ExternalConfig {
            port,
            client_id: client_id.into(),
            keep_alive_s: 5,
            reconnect_min_ms: 50,
            reconnect_max_ms: 400,
            shutdown_grace_ms: 5_000,
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(cfg, tx, stop.clone()));
        Agent { rx, stop, task }
    }

    /// Publishes probes until one arrives (the subscription is live), acking every probe.
    async fn wait_subscribed(&mut self, publisher: &TestClient) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(tokio::time::Instant::now() < deadline, "never subscribed");
            publisher.publish(PROBE, QoS::AtLeastOnce, "probe").await;
            if let Ok(Some(inb)) = timeout(Duration::from_millis(200), self.rx.recv()).await {
                assert_eq!(inb.topic, PROBE);
                release([inb]);
                break;
            }
        }
        // Late probes: ack them too.
        while let Ok(Some(inb)) = timeout(Duration::from_millis(300), self.rx.recv()).await {
            assert_eq!(inb.topic, PROBE);
            release([inb]);
        }
    }

    /// Shuts down like the pipeline does: cancel, receive until the end, await.
    async fn stop(mut self) {
        self.stop.cancel();
        match timeout(WAIT, self.rx.recv()).await {
            Ok(None) => {}
            Ok(Some(inb)) => panic!("unexpected inbound during shutdown: {:?}", inb.payload),
            Err(_) => panic!("the channel did not close after shutdown"),
        }
        timeout(WAIT, self.task).await.unwrap().unwrap().unwrap();
    }
}

fn addr(m: &Mosquitto) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], m.port))
}

async fn payloads(rx: &mut mpsc::Receiver<Inbound>, n: usize) -> (Vec<String>, Vec<Inbound>) {
    let mut inbounds = Vec::new();
    for _ in 0..n {
        inbounds.push(recv(rx).await);
    }
    let texts = inbounds
        .iter()
        .map(|i| String::from_utf8(i.payload.to_vec()).unwrap())
        .collect();
    (texts, inbounds)
}

#[tokio::test]
async fn receives_acks_and_keeps_its_session_across_restarts() {
    let Some(broker) = Mosquitto::start().await else {
        return;
    };
    let publisher = TestClient::connect(addr(&broker), "pub-e1").await;
    let mut agent = Agent::start(broker.port, "agent-e1");
    agent.wait_subscribed(&publisher).await;

    for m in ["m1", "m2", "m3"] {
        publisher
            .publish("devices/d1/events/t", QoS::AtLeastOnce, m)
            .await;
    }
    let (texts, inbounds) = payloads(&mut agent.rx, 3).await;
    assert_eq!(texts, ["m1", "m2", "m3"]);
    assert_eq!(inbounds[0].topic, "devices/d1/events/t");
    release(inbounds);
    agent.stop().await;

    // Published while the agent is away: the broker queues them in the agent's session.
    let mut publisher = publisher;
    for m in ["m4", "m5", "m6"] {
        publisher
            .publish("devices/d1/events/t", QoS::AtLeastOnce, m)
            .await;
    }
    publisher.pubacks(3).await; // the broker has them

    let mut agent = Agent::start(broker.port, "agent-e1");
    let (texts, inbounds) = payloads(&mut agent.rx, 3).await;
    // m1..m3 were acked, so only the new ones come.
    assert_eq!(texts, ["m4", "m5", "m6"]);
    release(inbounds);
    assert_quiet(&mut agent.rx, Duration::from_millis(500)).await;
    agent.stop().await;
}

#[tokio::test]
async fn unreleased_messages_are_redelivered_next_session() {
    let Some(broker) = Mosquitto::start().await else {
        return;
    };
    let publisher = TestClient::connect(addr(&broker), "pub-e2").await;
    let mut agent = Agent::start(broker.port, "agent-e2");
    agent.wait_subscribed(&publisher).await;

    publisher
        .publish("devices/d2/events/t", QoS::AtLeastOnce, "crash-me")
        .await;
    let inb = recv(&mut agent.rx).await;
    assert_eq!(&inb.payload[..], b"crash-me");
    drop(inb); // "crashed" before the commit: never released
    agent.stop().await;

    let mut agent = Agent::start(broker.port, "agent-e2");
    let inb = recv(&mut agent.rx).await;
    assert_eq!(&inb.payload[..], b"crash-me");
    release([inb]);
    agent.stop().await;

    // Released this time: not delivered again.
    let mut agent = Agent::start(broker.port, "agent-e2");
    assert_quiet(&mut agent.rx, Duration::from_millis(700)).await;
    agent.stop().await;
}

#[tokio::test]
async fn reconnects_and_resubscribes_after_the_broker_restarts() {
    let Some(mut broker) = Mosquitto::start().await else {
        return;
    };
    let publisher = TestClient::connect(addr(&broker), "pub-e3").await;
    let mut agent = Agent::start(broker.port, "agent-e3");
    agent.wait_subscribed(&publisher).await;
    drop(publisher);

    // A fresh broker without persistence has forgotten the session and the subscription.
    broker.restart().await;
    let publisher = TestClient::connect(addr(&broker), "pub-e3").await;
    agent.wait_subscribed(&publisher).await;
    publisher
        .publish("devices/d3/events/t", QoS::AtLeastOnce, "after")
        .await;
    let inb = recv(&mut agent.rx).await;
    assert_eq!(&inb.payload[..], b"after");
    release([inb]);
    agent.stop().await;
}
