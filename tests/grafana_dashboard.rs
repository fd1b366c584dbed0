//! `cloud-bridge/deploy/grafana-dashboard.json` against a real agent: the dashboard parses, and
//! every metric it queries is in the running agent's `/metrics` (with the labels it groups by),
//! moving with the messages the agent takes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use e2e::{Agent, http_get, mosquitto_pub, wait_for};
use serde_json::Value;

const METER: &str = "devices/meter-001/events/meter";

fn dashboard() -> Value {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-bridge/deploy/grafana-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every PromQL expression of the dashboard (panels and template variables).
fn queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        out.push(v["query"]["query"].as_str().unwrap().to_string());
    }
    out
}

/// Metric names in an expression: identifiers that are not PromQL's own words.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let promql = [
        "sum",
        "by",
        "rate",
        "increase",
        "time",
        "and",
        "label_values",
        "instance",
        "stage",
    ];
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_lowercase()) {
        rest = &rest[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        // Label values inside quotes and `$variables` are not names.
        let before = expr.len() - rest.len();
        let quoted = expr[..before].matches('"').count() % 2 == 1;
        let variable = expr[..before].ends_with('$') || expr[..before].ends_with("$__");
        if !quoted && !variable && !promql.contains(&word) && !word.starts_with("__") {
            out.insert(word.to_string());
        }
        rest = &rest[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_in_the_agents_metrics() {
    let d = dashboard();
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let titles: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for needed in [
        "Throughput",
        "Outbox depth and age",
        "DLQ by stage",
        "Corrections",
        "Anomalies",
        "Gaps and missed events",
    ] {
        assert!(titles.contains(&needed), "{needed}: {titles:?}");
    }
    let mut wanted = BTreeSet::new();
    for q in queries(&d) {
        let names = metric_names(&q);
        assert!(!names.is_empty(), "{q}");
        wanted.extend(names);
    }
    assert!(wanted.iter().all(|n| n.starts_with("edge_")), "{wanted:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    let ok = br#"{"id":"r1","seq":1,"ts":"2026-11-25T10:00:00Z","data":{"energy_kwh":1200.5,"voltage_v":230,"current_a":4.2}}"#;
    let missing = br#"{"id":"r2","seq":2,"ts":"2026-11-25T10:15:00Z","data":{"voltage_v":230,"current_a":4.2}}"#;
    mosquitto_pub(agent.mqtt_port, METER, ok, 1);
    mosquitto_pub(agent.mqtt_port, METER, missing, 1);
    wait_for("both messages counted", Duration::from_secs(30), || {
        agent.metric("edge_ingested_total") >= 2.0
    });

    let body = http_get(agent.metrics_port, "/metrics");
    let series: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let exposed: BTreeSet<&str> = series
        .iter()
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let absent: Vec<&String> = wanted
        .iter()
        .filter(|n| !exposed.contains(n.as_str()))
        .collect();
    assert!(
        absent.is_empty(),
        "queried but not exposed: {absent:?}\n{body}"
    );

    // The values the panels draw move with what happened: one accepted, one dead-lettered at
    // `schema` (the DLQ panel groups edge_rejected_total by its `stage` label).
    assert_eq!(agent.metric("edge_accepted_total"), 1.0);
    let schema = series
        .iter()
        .find(|l| l.starts_with("edge_rejected_total{") && l.contains("stage=\"schema\""))
        .unwrap_or_else(|| panic!("no edge_rejected_total{{stage=\"schema\"}}\n{body}"));
    assert_eq!(schema.rsplit(' ').next(), Some("1"), "{schema}");
    assert_eq!(agent.metric("edge_outbox_entries"), 1.0);
    let oldest = agent.metric("edge_outbox_oldest_pending_timestamp_seconds");

    // The age panel's gauge is the pending result's processed_at.
    agent.stop();
    let outbox = agent.outbox();
    assert_eq!(outbox.len(), 1);
    let processed_at = outbox[0]["processed_at"].as_i64().unwrap();
    assert_eq!(oldest, processed_at as f64 / 1000.0);
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let n = metric_names(
        r#"time() - edge_outbox_oldest_pending_timestamp_seconds{instance=~"$instance"} and edge_outbox_entries{instance=~"$instance"} > 0"#,
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        [
            "edge_outbox_entries",
            "edge_outbox_oldest_pending_timestamp_seconds"
        ]
    );
    let n = metric_names(
        r#"sum by (stage) (rate(edge_rejected_total{instance=~"$instance"}[$__rate_interval]))"#,
    );
    assert_eq!(n.into_iter().collect::<Vec<_>>(), ["edge_rejected_total"]);
}
