//! Device identity on the embedded endpoint (`auth = "password"`), with a real client
//! (`mosquitto_pub`): only registered devices with their own secret connect, a device
//! publishes only under its own id, refusals are counted, and no secret ever shows up in the
//! agent's log or in a command's output.

use e2e::mosquitto_pub::Client;
use e2e::{Agent, meter, set};

/// `mosquitto_pub` as `user`/`password` (QoS 1); whether the broker took the message.
fn publish(agent: &Agent, login: Option<(&str, &str)>, topic: &str, payload: &[u8]) -> bool {
    let client = Client {
        login,
        ..Client::default()
    };
    e2e::mosquitto_pub::publish(agent.mqtt_port, client, topic, payload)
}

fn device(agent: &Agent, args: &[&str]) -> std::process::Output {
    let mut all = vec!["device"];
    all.extend_from_slice(args);
    let out = agent.cli(&all);
    assert!(
        out.status.success(),
        "device {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn only_registered_devices_connect_and_each_publishes_only_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["broker", "embedded", "auth"], "password".into());
    });
    let topic = |d: &str| format!("devices/{d}/events/meter");
    let mut outputs = String::new();

    // Registered while the agent runs; the secret is printed once, on stdout alone.
    let added = device(&agent, &["add", "meter-1"]);
    let secret = String::from_utf8(added.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(secret.len(), 32, "{}", text(&added));
    outputs += &text(&added);
    let fixed = device(
        &agent,
        &["add", "meter-2", "--password", "meter two's passphrase"],
    );
    outputs += &text(&fixed);
    assert!(!text(&fixed).contains("passphrase"), "{}", text(&fixed));

    assert!(
        !publish(&agent, None, &topic("meter-1"), &meter("a", 1, 1.0)),
        "no credentials"
    );
    assert!(!publish(
        &agent,
        Some(("meter-1", "wrong")),
        &topic("meter-1"),
        &meter("a", 1, 1.0)
    ));
    assert!(!publish(
        &agent,
        Some(("nobody", &secret)),
        &topic("nobody"),
        &meter("a", 1, 1.0)
    ));
    assert!(publish(
        &agent,
        Some(("meter-1", &secret)),
        &topic("meter-1"),
        &meter("a", 1, 1.0)
    ));
    let m2 = ("meter-2", "meter two's passphrase");
    assert!(publish(
        &agent,
        Some(m2),
        &topic("meter-2"),
        &meter("b", 1, 2.0)
    ));
    // meter-1 publishing as meter-2: refused, the connection closed, nothing stored.
    assert!(!publish(
        &agent,
        Some(("meter-1", &secret)),
        &topic("meter-2"),
        &meter("c", 2, 2.01)
    ));
    assert_eq!(agent.metric("ingest_publish_refused_total"), 1.0);
    assert_eq!(agent.metric("ingest_auth_refused_total"), 3.0);

    // A new secret: the old one stops working, the new one works.
    let rotated = device(&agent, &["rotate", "meter-1"]);
    outputs += &text(&rotated);
    let new = String::from_utf8(rotated.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(new, secret);
    assert!(!publish(
        &agent,
        Some(("meter-1", &secret)),
        &topic("meter-1"),
        &meter("d", 2, 1.01)
    ));
    assert!(publish(
        &agent,
        Some(("meter-1", &new)),
        &topic("meter-1"),
        &meter("d", 2, 1.01)
    ));
    // Removed: refused.
    outputs += &text(&device(&agent, &["remove", "meter-2"]));
    assert!(!publish(
        &agent,
        Some(m2),
        &topic("meter-2"),
        &meter("e", 2, 2.01)
    ));

    let list = agent.cli(&["device", "list", "--json"]);
    outputs += &text(&list);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], "meter-1");
    outputs += &text(&agent.cli(&["status", "--json"]));
    outputs += &text(&agent.cli(&["check-config"]));
    assert!(agent.stop().success());

    let stored: Vec<String> = agent
        .outbox()
        .iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stored, ["meter-1/a", "meter-2/b", "meter-1/d"]);
    // No secret anywhere: not in the log, not in any output after the one that made it.
    let log = agent.log_text();
    let registry = std::fs::read_to_string(dir.path().join("data/devices.json")).unwrap();
    for s in [&secret, &new, &"meter two's passphrase".to_string()] {
        assert!(!log.contains(s.as_str()), "a secret in the log");
        assert!(!registry.contains(s.as_str()), "a secret in the registry");
    }
    let after_add = outputs.replacen(&secret, "", 1).replacen(&new, "", 1);
    assert!(
        !after_add.contains(&secret) && !after_add.contains(&new),
        "{after_add}"
    );
}

#[test]
fn a_device_publishing_as_another_is_logged_once_a_minute_not_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["broker", "embedded", "auth"], "password".into());
    });
    let added = device(
        &agent,
        &["add", "meter-1", "--password", "a long passphrase"],
    );
    drop(added);
    let login = Some(("meter-1", "a long passphrase"));
    for i in 0..5 {
        assert!(!publish(
            &agent,
            login,
            "devices/meter-9/events/meter",
            &meter("x", i, 1.0)
        ));
    }
    assert_eq!(agent.metric("ingest_publish_refused_total"), 5.0);
    assert!(agent.stop().success());
    assert_eq!(agent.log_text().matches("publish refused").count(), 1);
    assert!(agent.outbox().is_empty());
}
