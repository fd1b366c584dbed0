//! The demo as a user runs it (`edge-demo`, or `edge-agent demo`, which runs it): the real
//! binary for a few seconds, then its files.
//!
//! Checks the exit status and the final summary, that every record in the NDJSON objects
//! under `DIR/events/dt=…/gateway=…/` appears once by `event_id` and that their number equals
//! the accepted results the demo reports, and that the DLQ (by stage) is exactly what the
//! simulated devices got wrong on purpose, within the configured invalid share.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{agent_bin, demo_bin};
use serde_json::Value;

fn ndjson_objects(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            ndjson_objects(&p, out);
        } else if p.extension().is_some_and(|x| x == "ndjson") {
            out.push(p);
        }
    }
}

/// The contract's `edge-agent demo …` is `edge-demo …` from beside the agent.
#[test]
fn edge_agent_demo_runs_the_demo_binary() {
    let bin = agent_bin();
    let help = Command::new(&bin)
        .args(["demo", "--help"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&help.stdout);
    if std::env::var_os("EDGE_AGENT_BIN").is_some() && !help.status.success() {
        // A gateway build (e.g. an ARM package): no `demo-alias`, and no demo beside it.
        eprintln!("skipped: {} has no `demo` subcommand", bin.display());
        return;
    }
    assert!(help.status.success(), "{help:?}");
    assert!(
        stdout.contains("Usage: edge-demo") && stdout.contains("--duration"),
        "edge-agent demo --help should be the demo's help:\n{stdout}"
    );
}

#[test]
fn demo_runs_the_whole_pipeline_and_stores_each_result_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let started = Instant::now();
    let run = Command::new(demo_bin())
        .args(["--duration", "8", "--out"])
        .arg(&out)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        run.status
    );
    // It stops by itself after its duration (a hang would still end here, not at CI's timeout).
    assert!(took < Duration::from_secs(120), "took {took:?}");
    assert!(
        stdout.contains("published"),
        "live summary lines:\n{stdout}"
    );
    assert!(stdout.contains("── final summary"), "{stdout}");
    assert!(
        stdout.contains("every message accounted for"),
        "the demo's own check:\n{stdout}"
    );

    let s: Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    let accepted = n(&s["agent"]["accepted"]);
    let published = n(&s["published"]);
    assert!(published >= 50, "9 devices × 2/s × 8 s: {published}");
    assert!(accepted > 0);
    assert_eq!(s["drained"], true, "{s:#}");
    assert_eq!(n(&s["agent"]["outbox_pending"]), 0);

    // The cloud's objects: each accepted result exactly once, by event_id.
    let mut objects = Vec::new();
    ndjson_objects(&out.join("events"), &mut objects);
    assert!(!objects.is_empty());
    let mut ids = HashSet::new();
    let mut records = 0u64;
    let mut phone_records = 0u64;
    for p in &objects {
        let rel = p.strip_prefix(&out).unwrap().to_string_lossy().into_owned();
        if rel.contains("/gateway=cloud/dev-") {
            // The phone app's events, one object each, no gateway.
            for line in std::fs::read_to_string(p).unwrap().lines() {
                let r: Value = serde_json::from_str(line).unwrap();
                assert_eq!(
                    (r["via"].as_str(), r["edge_seq"].as_u64()),
                    (Some("http"), Some(0))
                );
                assert!(ids.insert(r["event_id"].as_str().unwrap().to_string()));
                phone_records += 1;
            }
            continue;
        }
        assert!(
            rel.starts_with("events/dt=") && rel.contains("/gateway=gw-001/"),
            "S3 layout: {rel}"
        );
        for line in std::fs::read_to_string(p).unwrap().lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            let id = r["event_id"].as_str().unwrap().to_string();
            assert!(ids.insert(id.clone()), "{id} stored twice");
            records += 1;
        }
    }
    assert_eq!(
        records, accepted,
        "records in the objects = accepted results"
    );
    assert_eq!(n(&s["cloud"]["records"]), records);
    // The phone app: every reading answered is stored once, refused, or a recognised re-send.
    let phone = &s["phone"];
    assert!(n(&phone["stored"]) > 0, "{s:#}");
    assert_eq!(phone_records, n(&phone["stored"]));
    assert_eq!(
        n(&phone["posted"]),
        n(&phone["stored"]) + n(&phone["refused"]) + n(&phone["duplicates"])
    );

    // Every message ends as a result, a DLQ entry or a recognised duplicate, and the DLQ is
    // exactly what the devices got wrong on purpose.
    let dlq = n(&s["agent"]["dlq"]);
    let dups = n(&s["agent"]["duplicates"]);
    assert_eq!(published, accepted + dlq + dups, "{s:#}");
    assert_eq!(s["agent"]["dlq_by_stage"], s["injected"]["expected_dlq"]);
    assert_eq!(dups, n(&s["injected"]["duplicates"]));
    assert_eq!(accepted, n(&s["injected"]["valid"]));
    // 8 % invalid + 3 % spikes (about two thirds rejected by checks): a loose bound.
    assert!(
        dlq > 0 && dlq * 100 <= published * 30,
        "DLQ share {dlq}/{published}"
    );
    // The broken uplink message the demo injects is in the cloud's DLQ (beside the phone
    // app's refused readings that the DLQ processor gave up on by then).
    let mut failures = Vec::new();
    let mut stack = vec![out.join("failures")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                failures.push(p);
            }
        }
    }
    let uplink = failures
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("uplink-")
        })
        .count();
    assert_eq!(uplink, 1, "{failures:?}");
    assert!(
        failures.len() as u64 <= 1 + n(&phone["refused"]),
        "{failures:?}"
    );
    assert!(
        out.join("eventbridge").read_dir().unwrap().next().is_some(),
        "events appended under eventbridge/"
    );
}
