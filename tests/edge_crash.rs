//! Crash safety: `kill -9` the agent mid-stream, several times, and check that every message
//! a broker acknowledged to its publisher ends in the outbox exactly once.

use std::time::Duration;

use e2e::{Agent, Mosquitto, Publisher, assert_stream_stored_once, meter_stream, wait_for};

const DEVICES: u64 = 4;

fn messages(n: u64) -> Vec<(u16, String, Vec<u8>)> {
    meter_stream(n, DEVICES)
}

fn assert_exactly_once(agent: &Agent, n: u64) {
    assert_stream_stored_once(agent, n, DEVICES);
}

#[test]
fn embedded_broker_kill9_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    let n = 8000;
    let mut publisher = Publisher::new(agent.mqtt_port, "crash-meter");
    let mut kills = vec![6000usize, 4000, 2000];
    publisher.publish_all(messages(n), 256, Duration::from_secs(120), |acked| {
        if kills.last().is_some_and(|k| acked >= *k) {
            kills.pop();
            agent.kill9();
            agent.restart();
        }
    });
    assert!(kills.is_empty(), "every planned kill happened");
    assert_eq!(publisher.acked.len() as u64, n);
    assert!(
        publisher.reconnects >= 4,
        "the publisher lived through the kills"
    );
    assert!(agent.stop().success());
    assert_exactly_once(&agent, n);
}

#[test]
fn external_broker_kill9_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut agent = Agent::external(dir.path(), broker.port, |_| {});
    let n = 20000;
    let port = broker.port;
    let publishing = std::thread::spawn(move || {
        let mut publisher = Publisher::new(port, "crash-meter");
        publisher.publish_all(messages(n), 512, Duration::from_secs(120), |_| {});
        publisher.acked.len() as u64
    });
    // Kill at a quarter, half and three quarters of the stream, as seen in the outbox.
    let mut mid_stream = 0;
    for quarter in 1..=3 {
        wait_for("progress", Duration::from_secs(60), || {
            agent.metric("edge_outbox_entries") as u64 >= n * quarter / 4
        });
        mid_stream += usize::from((agent.metric("edge_outbox_entries") as u64) < n);
        agent.kill9();
        agent.restart();
    }
    assert!(mid_stream > 0, "at least one kill hit the agent mid-stream");
    assert_eq!(publishing.join().unwrap(), n, "mosquitto acknowledged all");
    wait_for(
        "the outbox to hold every event",
        Duration::from_secs(60),
        || agent.metric("edge_outbox_entries") as u64 >= n,
    );
    assert!(agent.stop().success());
    assert_exactly_once(&agent, n);
}
