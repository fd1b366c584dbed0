//! `SIGHUP` reloads the agent's config without a restart (`edge-agent/src/reload.rs`): a good
//! file swaps the engine between batches (the results say which `calc_version` made them), a
//! bad one is refused with the field named while the old one keeps working, and nothing in
//! flight is lost or made twice by a reload under load.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use e2e::publisher::Publisher;
use e2e::{Agent, meter, meter_stream, mosquitto_pub, wait_for};
use serde_json::Value;

const METER: &str = "devices/meter-1/events/meter";

fn hangup(agent: &Agent) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
}

/// The config file with `from` replaced by `to` (once, asserting it is there).
fn edit(agent: &Agent, from: &str, to: &str) {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    std::fs::write(&agent.config, text.replacen(from, to, 1)).unwrap();
}

fn reloads(agent: &Agent, result: &str) -> f64 {
    let body = e2e::http_get(agent.metrics_port, "/metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("edge_config_reloads_total{")
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_good_config_swaps_the_engine_and_a_bad_one_is_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    let first = status(&agent)["agent"]["config"].clone();
    assert_eq!(first["reloads"], 0, "{first}");
    mosquitto_pub(agent.mqtt_port, METER, &meter("a1", 1, 100.0), 1);
    mosquitto_pub(agent.mqtt_port, METER, &meter("a2", 2, 100.25), 1);

    // A new tariff: a new calc_version from the next batch on.
    edit(
        &agent,
        "tariff_eur_per_kwh = 0.28",
        "tariff_eur_per_kwh = 0.31",
    );
    hangup(&agent);
    wait_for("the reload", Duration::from_secs(20), || {
        reloads(&agent, "applied") == 1.0
    });
    mosquitto_pub(agent.mqtt_port, METER, &meter("a3", 3, 100.5), 1);
    let after = status(&agent)["agent"]["config"].clone();
    assert_ne!(after["hash"], first["hash"], "{after}");
    assert_eq!(after["reloads"], 1, "{after}");

    // A broken one: refused, the field named, the running engine keeps working.
    edit(&agent, "type = \"number\"", "type = \"numbr\"");
    hangup(&agent);
    wait_for("the refusal", Duration::from_secs(20), || {
        reloads(&agent, "refused") == 1.0
    });
    let refused = status(&agent)["agent"]["config"].clone();
    let why = refused["last_refusal"].as_str().unwrap().to_string();
    assert!(
        why.contains("event_types.") && why.contains(".type: unknown variant `numbr`"),
        "{why}"
    );
    assert_eq!(
        refused["hash"], after["hash"],
        "the running config is still the good one"
    );
    assert!(agent.log_text().contains("config reload refused"));
    mosquitto_pub(agent.mqtt_port, METER, &meter("a4", 4, 100.75), 1);
    // The human status names it too.
    let text = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(text.contains("last refused"), "{text}");

    // A section only a restart changes: applied later, named meanwhile.
    edit(&agent, "type = \"numbr\"", "type = \"number\"");
    edit(&agent, "level = \"info\"", "level = \"debug\"");
    hangup(&agent);
    wait_for("the second reload", Duration::from_secs(20), || {
        reloads(&agent, "applied") == 2.0
    });
    let pending = status(&agent)["agent"]["config"].clone();
    // (The harness also wrote the bound ports into the file after the start: broker, metrics.)
    assert!(
        pending["pending_restart"]
            .as_array()
            .unwrap()
            .contains(&"log".into()),
        "{pending}"
    );
    assert!(agent.stop().success());

    let results: BTreeMap<String, Value> = agent
        .outbox()
        .into_iter()
        .map(|r| (r["event_id"].as_str().unwrap().to_string(), r))
        .collect();
    let version = |id: &str| {
        let r = results
            .get(id)
            .unwrap_or_else(|| panic!("{id} not in {:?}", results.keys()));
        r["calc_version"].as_str().unwrap().to_string()
    };
    assert_eq!(version("meter-1/a1"), version("meter-1/a2"));
    assert_ne!(
        version("meter-1/a2"),
        version("meter-1/a3"),
        "the new engine made a3"
    );
    assert_eq!(
        version("meter-1/a3"),
        version("meter-1/a4"),
        "the refused file changed nothing"
    );
    assert_eq!(
        results["meter-1/a2"]["result"]["cost_eur"],
        serde_json::json!(0.07)
    );
    assert_eq!(
        results["meter-1/a3"]["result"]["cost_eur"],
        serde_json::json!(0.0775)
    );
}

#[test]
fn reloads_under_load_lose_nothing_and_make_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |_| {});
    const N: u64 = 3000;
    let mut tariff = 28;
    let mut reloaded = 0;
    let mut p = Publisher::new(agent.mqtt_port, "reload-load");
    p.publish_all(meter_stream(N, 10), 200, Duration::from_secs(120), |sent| {
        // A reload every ~500 messages while the rest are in flight.
        if sent as u64 >= (reloaded + 1) * 500 && reloaded < 4 {
            let from = format!("tariff_eur_per_kwh = 0.{tariff}");
            tariff += 1;
            edit(&agent, &from, &format!("tariff_eur_per_kwh = 0.{tariff}"));
            hangup(&agent);
            reloaded += 1;
            // Swapped: what is sent from here on is the new engine's (in flight: either).
            wait_for("the reload", Duration::from_secs(20), || {
                reloads(&agent, "applied") == reloaded as f64
            });
        }
    });
    assert_eq!(reloaded, 4);
    let mut agent = agent;
    assert!(agent.stop().success());
    e2e::assert_stream_stored_once(&agent, N, 10);
    // Each result was made by one of the five engines, and each engine made some.
    let versions: BTreeSet<String> = agent
        .outbox()
        .iter()
        .map(|r| r["calc_version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions.len(), 5, "{versions:?}");
}
