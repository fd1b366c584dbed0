//! `edge-agent tap`: a technician follows what the running agent commits (results and DLQ
//! entries), filtered by device, type or DLQ, as JSON lines or one human line each.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use e2e::{Agent, agent_bin, meter, mosquitto_pub};
use serde_json::Value;

/// Starts `edge-agent tap ARGS` and returns once it taps; its stdout lines arrive on the channel.
fn tap(agent: &Agent, args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(agent_bin())
        .arg("tap")
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with("tapping the agent on"), "{first}");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

fn next(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a tap line within 30 s")
}

#[test]
fn the_tap_follows_a_device_s_results_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    let (mut json, lines) = tap(&agent, &["--device", "meter-1", "--json"]);
    let (mut human, text) = tap(&agent, &["--dlq"]);
    let port = agent.mqtt_port;
    // Another device first: filtered out, so the first line must be meter-1's.
    mosquitto_pub(
        port,
        "devices/meter-2/events/meter",
        &meter("b1", 1, 5.0),
        1,
    );
    mosquitto_pub(
        port,
        "devices/meter-1/events/meter",
        &meter("a1", 1, 100.0),
        1,
    );
    let mut bad: Value = serde_json::from_slice(&meter("a2", 2, 100.25)).unwrap();
    bad["data"]["voltage_v"] = 612.0.into();
    mosquitto_pub(
        port,
        "devices/meter-1/events/meter",
        bad.to_string().as_bytes(),
        1,
    );

    let first: Value = serde_json::from_str(&next(&lines)).unwrap();
    assert_eq!(first["result"]["event_id"], "meter-1/a1", "{first}");
    assert_eq!(first["result"]["status"], "ok");
    let second: Value = serde_json::from_str(&next(&lines)).unwrap();
    assert_eq!(second["dlq"]["device"], "meter-1", "{second}");
    assert_eq!(second["dlq"]["stage"], "schema", "{second}");
    assert!(
        second["dlq"]["reason"]
            .as_str()
            .unwrap()
            .contains("voltage_v")
    );
    // The DLQ-only tap saw the refusal alone, as one line naming the field.
    let line = next(&text);
    assert!(
        line.contains(" DLQ #") && line.contains("meter-1 schema:"),
        "{line}"
    );
    assert!(line.contains("voltage_v"), "{line}");

    // The agent stops: the taps end by themselves, successfully.
    assert!(agent.stop().success());
    for child in [&mut json, &mut human] {
        assert!(child.wait().unwrap().success());
    }
    assert!(
        lines.try_recv().is_err() && text.try_recv().is_err(),
        "nothing else"
    );
}

#[test]
fn the_tap_needs_a_running_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    assert!(agent.stop().success());
    let out = agent.cli(&["tap"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no agent is running"), "{said}");
}
