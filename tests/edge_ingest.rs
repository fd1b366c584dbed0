//! Valid, invalid, duplicate and out-of-order events published with `mosquitto_pub`, to the
//! embedded endpoint and through an external mosquitto; the outbox and the DLQ must then hold
//! exactly the expected entries.

use std::time::Duration;

use e2e::{Agent, Mosquitto, meter, mosquitto_pub, wait_for};
use serde_json::{Value, json};

const METER: &str = "devices/meter-1/events/meter";

/// What is published, in order: (topic, payload).
fn scenario() -> Vec<(&'static str, Vec<u8>)> {
    let env = |id: &str, seq: u64, t: f64, rh: f64| {
        json!({"id": id, "seq": seq, "ts": "2026-11-25T10:00:00Z",
               "data": {"temperature_c": t, "humidity_pct": rh}})
        .to_string()
        .into_bytes()
    };
    let gps = |id: &str, seq: u64, ts: i64, lat: f64, lon: f64| {
        json!({"id": id, "seq": seq, "ts": ts, "data": {"lat": lat, "lon": lon}})
            .to_string()
            .into_bytes()
    };
    vec![
        (METER, meter("a1", 1, 100.0)),
        (METER, meter("a2", 2, 100.25)),
        // a redelivery of a2: recognised, not stored twice
        (METER, meter("a2", 2, 100.25)),
        // seq 3 is skipped: a gap...
        (METER, meter("a4", 4, 100.75)),
        // ...that this late arrival fills
        (METER, meter("a3", 3, 100.5)),
        // truncated JSON
        (METER, br#"{"id": "a5", "seq": 5, "ts": 17640"#.to_vec()),
        // wrong type
        (
            METER,
            json!({"id": "a6", "seq": 6, "ts": 1_764_000_400_000i64,
                   "data": {"energy_kwh": "lots", "voltage_v": 230.0, "current_a": 4.0}})
            .to_string()
            .into_bytes(),
        ),
        // unknown event type
        (
            "devices/meter-1/events/toaster",
            json!({"id": "t1", "seq": 7, "ts": 1_764_000_400_000i64, "data": {}})
                .to_string()
                .into_bytes(),
        ),
        // payload names another device than its topic
        (
            METER,
            json!({"id": "a8", "seq": 8, "device": "meter-9", "ts": 1_764_000_400_000i64,
                   "data": {"energy_kwh": 110.0, "voltage_v": 230.0, "current_a": 4.0}})
            .to_string()
            .into_bytes(),
        ),
        ("devices/env-1/events/environment", env("e1", 1, 20.0, 50.0)),
        (
            "devices/truck-1/events/gps",
            gps("g1", 1, 1_764_000_000_000, 52.5200, 13.4050),
        ),
        (
            "devices/truck-1/events/gps",
            gps("g2", 2, 1_764_000_060_000, 52.5300, 13.4050),
        ),
    ]
}

fn publish(port: u16) {
    for (topic, payload) in scenario() {
        mosquitto_pub(port, topic, &payload, 1);
    }
}

fn assert_outcome(agent: &Agent) {
    let outbox = agent.outbox();
    let ids: Vec<&str> = outbox
        .iter()
        .map(|r| r["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "meter-1/a1",
            "meter-1/a2",
            "meter-1/a4",
            "meter-1/a3",
            "env-1/e1",
            "truck-1/g1",
            "truck-1/g2"
        ]
    );
    let seqs: Vec<u64> = outbox
        .iter()
        .map(|r| r["edge_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7], "gap-free edge_seq");
    let by_id = |id: &str| -> &Value {
        outbox
            .iter()
            .find(|r| r["event_id"] == id)
            .unwrap_or_else(|| panic!("{id} in outbox"))
    };
    let a2 = by_id("meter-1/a2");
    assert_eq!(a2["gateway"], "gw-test");
    assert_eq!(a2["status"], "ok");
    assert!(a2["calc_version"].as_str().unwrap().starts_with("meter-"));
    assert!((a2["result"]["consumption_kwh"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    assert!((a2["result"]["power_w"].as_f64().unwrap() - 920.0).abs() < 1e-9);
    let a3 = by_id("meter-1/a3");
    assert!(
        a3["flags"].as_array().unwrap().iter().any(|f| f == "late"),
        "late arrival flagged: {a3}"
    );
    let dew = by_id("env-1/e1")["result"]["dew_point_c"].as_f64().unwrap();
    assert!(
        (dew - 9.26).abs() < 0.05,
        "dew point of 20 °C at 50 % is ~9.3 °C, got {dew}"
    );
    let km = by_id("truck-1/g2")["result"]["distance_m"]
        .as_f64()
        .unwrap();
    assert!(
        (km - 1112.0).abs() < 5.0,
        "0.01° of latitude is ~1112 m, got {km}"
    );

    let dlq = agent.dlq();
    let got: Vec<(String, String)> = dlq
        .iter()
        .map(|e| {
            (
                e["stage"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got.len(), 4, "DLQ: {got:#?}");
    assert_eq!(got[0].0, "decode", "{got:?}");
    assert_eq!(got[1].0, "schema");
    assert!(
        got[1].1.contains("data.energy_kwh"),
        "names the field: {}",
        got[1].1
    );
    assert_eq!(got[2].0, "schema");
    assert!(got[2].1.contains("toaster"), "{}", got[2].1);
    assert_eq!(got[3].0, "schema");
    assert!(got[3].1.contains("device"), "{}", got[3].1);
    // The original bytes are kept for a technician (and for a retry).
    assert_eq!(dlq[0]["payload"], r#"{"id": "a5", "seq": 5, "ts": 17640"#);
    assert_eq!(dlq[0]["topic"], METER);
}

fn test_config(cfg: &mut toml::Table) {
    e2e::set(cfg, &["gateway_id"], "gw-test".into());
}

#[test]
fn embedded_endpoint_stores_exactly_the_expected_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), test_config);
    publish(agent.mqtt_port);
    // mosquitto_pub returned after each PUBACK, so everything is durable by now.
    wait_for("metrics to count all", Duration::from_secs(10), || {
        agent.metric("edge_ingested_total") == 12.0
    });
    assert_eq!(agent.metric("edge_accepted_total"), 7.0);
    assert_eq!(agent.metric("edge_duplicates_total"), 1.0);
    assert_eq!(agent.metric("edge_rejected_total"), 4.0);
    // seq 3 (filled late), and seq 5: its bytes are undecodable, so its seq is unknown and
    // seq 6 (rejected at schema, after its seq was recorded) reveals the gap.
    assert_eq!(agent.metric("edge_gaps_total"), 2.0);
    assert_eq!(agent.metric("edge_gaps_open"), 1.0);
    assert_eq!(agent.metric("edge_late_arrivals_total"), 1.0);
    assert_eq!(agent.metric("edge_outbox_entries"), 7.0);
    assert!(agent.stop().success(), "SIGTERM drains and exits 0");
    assert_outcome(&agent);

    // A restart keeps the device state: a redelivery from before the restart is still a
    // duplicate, and the next reading continues the delta.
    agent.restart();
    mosquitto_pub(agent.mqtt_port, METER, &meter("a2", 2, 100.25), 1);
    mosquitto_pub(agent.mqtt_port, METER, &meter("a9", 9, 102.0), 1);
    assert!(agent.stop().success());
    let outbox = agent.outbox();
    assert_eq!(outbox.len(), 8);
    assert_eq!(outbox[7]["event_id"], "meter-1/a9");
    assert!((outbox[7]["result"]["consumption_kwh"].as_f64().unwrap() - 1.25).abs() < 1e-9);
}

#[test]
fn external_mosquitto_stores_exactly_the_expected_entries() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut agent = Agent::external(dir.path(), broker.port, test_config);
    publish(broker.port);
    // mosquitto acknowledged to mosquitto_pub; wait until the agent has taken everything.
    wait_for("the agent to process all", Duration::from_secs(20), || {
        agent.metric("edge_ingested_total") == 12.0
    });
    assert!(agent.stop().success());
    assert_outcome(&agent);
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = e2e::example_config();
    e2e::set(&mut cfg, &["pipeline", "max_batch"], "many".into());
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let out = std::process::Command::new(e2e::agent_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pipeline.max_batch"), "{err}");

    let good = std::process::Command::new(e2e::agent_bin())
        .args(["check-config", "--config"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml"))
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
}

#[test]
fn a_flood_of_sockets_from_one_address_is_capped_and_others_still_connect() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        e2e::set(
            cfg,
            &["broker", "embedded", "max_connections_per_address"],
            4.into(),
        );
        e2e::set(
            cfg,
            &["broker", "embedded", "connect_timeout_ms"],
            60_000.into(),
        );
    });
    let addr = ("127.0.0.1", agent.mqtt_port);
    // Four idle sockets (no CONNECT) hold every slot of this address.
    let mut idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    wait_for("the four to be served", Duration::from_secs(10), || {
        agent.metric("ingest_connections") == 4.0
    });
    // The next ones are closed unserved.
    for _ in 0..3 {
        let mut extra = std::net::TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(extra.read(&mut byte).unwrap_or(0), 0, "closed at once");
    }
    assert_eq!(agent.metric("ingest_connections_refused_total"), 3.0);
    assert_eq!(agent.metric("ingest_connections"), 4.0);
    // One goes: its slot comes back, and a device can publish again.
    drop(idle.pop());
    wait_for("the slot to free", Duration::from_secs(10), || {
        agent.metric("ingest_connections") == 3.0
    });
    mosquitto_pub(
        agent.mqtt_port,
        "devices/meter-1/events/meter",
        &meter("r1", 1, 1.0),
        1,
    );
    // Counted just after the ack goes out.
    wait_for("the message to be counted", Duration::from_secs(10), || {
        agent.metric("edge_accepted_total") == 1.0
    });
    assert_eq!(agent.log_text().matches("too many open").count(), 1);
    drop(idle);
    assert!(agent.stop().success());
}

/// The agent binds port 0 and reports what it got; a restart binds the same ports again, and
/// when another process holds one meanwhile, the start is tried again until it is free.
#[test]
fn a_restart_keeps_the_reported_ports_and_waits_out_a_taken_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    let (mqtt, metrics) = (agent.mqtt_port, agent.metrics_port);
    assert!(mqtt != 0 && metrics != 0 && mqtt != metrics);
    mosquitto_pub(mqtt, METER, &meter("a1", 1, 100.0), 1);
    // Counted just after the ack goes out.
    wait_for("a1 to be counted", Duration::from_secs(10), || {
        agent.metric("edge_accepted_total") == 1.0
    });
    assert!(agent.stop().success());

    // Someone else listens on the agent's MQTT port while it is down.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", mqtt)).unwrap();
    std::thread::scope(|s| {
        let log = dir.path().join("agent.log");
        let before = std::fs::read_to_string(&log).unwrap().len();
        let restart = s.spawn(|| agent.restart());
        // The first start fails on the taken port; then the port is given back.
        wait_for(
            "a start refused on the taken port",
            Duration::from_secs(30),
            || std::fs::read_to_string(&log).unwrap()[before..].contains("Address already in use"),
        );
        drop(squatter);
        restart.join().unwrap();
    });
    assert_eq!((agent.mqtt_port, agent.metrics_port), (mqtt, metrics));
    mosquitto_pub(mqtt, METER, &meter("a2", 2, 100.25), 1);
    wait_for(
        "a2 to be counted by the fresh process",
        Duration::from_secs(10),
        || agent.metric("edge_accepted_total") == 1.0,
    );
    assert!(agent.stop().success());
    assert_eq!(agent.outbox().len(), 2);
}
