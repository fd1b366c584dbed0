//! A damaged store never stops the gateway: at start-up the agent probes its store in a child
//! process, moves a damaged one aside to `data/quarantine/<time>/store`, starts on a fresh
//! store and says so (status, metric, log); `store salvage` exports what is readable.

use std::path::Path;
use std::time::Duration;

use e2e::{Agent, Mosquitto, Pki, Publisher, Subscriber, agent_bin, meter, set, wait_for};

fn publish(agent: &Agent, client: &str, first_seq: u64, n: u64) {
    let msgs = (0..n)
        .map(|i| {
            let seq = first_seq + i;
            let pkid = u16::try_from(i + 1).unwrap();
            let topic = "devices/meter-1/events/meter".to_string();
            (
                pkid,
                topic,
                meter(&format!("r{seq}"), seq, 100.0 + seq as f64 * 0.1),
            )
        })
        .collect();
    let mut p = Publisher::new(agent.mqtt_port, client);
    p.publish_all(msgs, 32, Duration::from_secs(60), |_| {});
}

/// Damage that makes sled fail or panic on open: garbage over the log's first records, and a
/// log cut short in the middle of a segment.
fn damage(store: &Path, how: &str) {
    let db = store.join("db");
    match how {
        "garbage" => {
            let mut bytes = std::fs::read(&db).unwrap();
            for b in bytes.iter_mut().take(4096) {
                *b = 0xA5;
            }
            std::fs::write(&db, bytes).unwrap();
        }
        "truncated" => {
            let len = std::fs::metadata(&db).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            f.set_len(len / 3).unwrap();
            for snap in std::fs::read_dir(store).unwrap() {
                let p = snap.unwrap().path();
                if p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("snap.")
                {
                    std::fs::write(&p, b"torn").unwrap();
                }
            }
        }
        other => panic!("unknown damage {other}"),
    }
}

/// `edge-agent store salvage --from STORE --to FILE` (no config: it reads any store).
fn salvage(from: impl AsRef<std::ffi::OsStr>, to: &Path) -> std::process::Output {
    std::process::Command::new(agent_bin())
        .args(["store", "salvage", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap()
}

fn quarantines_and_goes_on(how: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    publish(&agent, "before", 1, 200);
    assert!(agent.stop().success());
    let data = dir.path().join("data");
    let check = agent.cli(&["store", "check"]);
    assert!(check.status.success(), "a sound store checks ok");
    damage(&data.join("store"), how);
    let check = agent.cli(&["store", "check"]);
    assert!(!check.status.success(), "{how}: store check must fail");

    // Starts anyway, on a fresh store, and says so.
    agent.restart();
    assert!(
        agent
            .log_text()
            .contains("the store was damaged: moved aside"),
        "{how}: an error line says what happened"
    );
    assert_eq!(agent.metric("edge_store_quarantined"), 1.0);
    publish(&agent, "after", 201, 50);
    let status: serde_json::Value =
        serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap();
    let q = &status["quarantined"];
    assert_eq!(q.as_array().map(Vec::len), Some(1), "{status:?}");
    let moved_to = q[0]["moved_to"].as_str().unwrap().to_string();
    assert!(moved_to.contains("/quarantine/"), "{moved_to}");
    assert!(
        Path::new(&moved_to).join("db").exists(),
        "the damaged store is kept intact"
    );
    assert!(agent.stop().success());
    let outbox = agent.outbox();
    assert_eq!(outbox.len(), 50, "the fresh store took the new messages");

    // Salvage never takes the gateway down; it reports what it could read.
    let out = salvage(&moved_to, &dir.path().join("salvaged.jsonl"));
    eprintln!(
        "{how}: salvage {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A restart keeps the record and does not quarantine again.
    agent.restart();
    assert_eq!(agent.metric("edge_store_quarantined"), 1.0);
    assert!(agent.stop().success());
}

#[test]
fn garbage_in_the_log_is_quarantined_and_the_agent_goes_on() {
    quarantines_and_goes_on("garbage");
}

#[test]
fn a_truncated_log_is_quarantined_and_the_agent_goes_on() {
    quarantines_and_goes_on("truncated");
}

/// The status messages received so far, decoded.
fn statuses(sub: &Subscriber) -> Vec<serde_json::Value> {
    sub.received()
        .iter()
        .map(|(_, body)| serde_json::from_slice(body).unwrap())
        .collect()
}

#[test]
fn a_quarantine_is_reported_to_the_cloud_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-test", "gateways/+/status");
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        e2e::uplink_to(cfg, "gw-test", &broker, &pki, true, 5);
        set(cfg, &["uplink", "status_interval_s"], 1.into());
    });
    publish(&agent, "before", 1, 50);
    assert!(agent.stop().success());
    damage(&dir.path().join("data/store"), "garbage");
    // Before sled's first snapshot: it reads this log as empty, only the watermark knows.
    let check = agent.cli(&["store", "check"]);
    assert!(!check.status.success());
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("committed records are missing"), "{err}");
    let before = sub.count();
    agent.restart();

    let carrying =
        |v: &serde_json::Value| v["quarantines"].as_array().is_some_and(|q| !q.is_empty());
    wait_for(
        "a status carrying the quarantine",
        Duration::from_secs(30),
        || statuses(&sub)[before..].iter().any(carrying),
    );
    let all = statuses(&sub);
    let first = before + all[before..].iter().position(carrying).unwrap();
    let q = &all[first]["quarantines"][0];
    assert_eq!(all[first]["gateway"], "gw-test");
    assert!(
        q["moved_to"].as_str().unwrap().contains("/quarantine/"),
        "{q}"
    );
    assert!(q["reason"].as_str().unwrap().contains("store check"), "{q}");
    assert!(q["at"].as_i64().unwrap() > 0, "{q}");

    // Acknowledged, so the next statuses leave it out, also after a restart.
    wait_for("statuses without it", Duration::from_secs(30), || {
        statuses(&sub)[first + 1..]
            .iter()
            .filter(|v| !carrying(v))
            .count()
            >= 2
    });
    assert!(agent.stop().success());
    let before = sub.count();
    agent.restart();
    wait_for(
        "a status after the restart",
        Duration::from_secs(30),
        || sub.count() > before,
    );
    assert!(!statuses(&sub)[before..].iter().any(carrying));
    assert!(agent.stop().success());
}

#[test]
fn salvage_exports_every_readable_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    publish(&agent, "salvage", 1, 120);
    assert!(agent.stop().success());
    let store = dir.path().join("data/store");
    let to = dir.path().join("out.jsonl");
    let out = salvage(&store, &to);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&to)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 120);
    assert_eq!(lines[0]["outbox"]["edge_seq"], 1);
    assert_eq!(lines[119]["outbox"]["event_id"], "meter-1/r120");
}

#[test]
fn salvaged_records_import_into_another_store_once() {
    let old = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(old.path(), |_| {});
    publish(&agent, "old", 1, 80);
    assert!(agent.stop().success());
    let salvaged = old.path().join("salvaged.jsonl");
    let out = salvage(old.path().join("data/store"), &salvaged);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The gateway's new store has results of its own (later seqs of the same device).
    let new = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(new.path(), |_| {});
    publish(&agent, "new", 81, 20);
    let import = ["store", "import", "--from", salvaged.to_str().unwrap()];
    let refused = agent.cli(&import);
    assert!(
        !refused.status.success(),
        "a running agent's store is not written behind it"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(agent.stop().success());

    let out = agent.cli(&import);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("imported 80 results and 0 DLQ entries"),
        "{said}"
    );
    let again = agent.cli(&import);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("imported 0 results and 0 DLQ entries (80 already"),
        "{said}"
    );

    let outbox = agent.outbox();
    let edge_seqs: Vec<u64> = outbox
        .iter()
        .map(|r| r["edge_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        edge_seqs,
        (1..=100).collect::<Vec<_>>(),
        "gap-free after the import"
    );
    let mut seqs: Vec<u64> = outbox.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "every event once");
    assert!(agent.cli(&["store", "check"]).status.success());
    agent.restart();
    assert!(agent.stop().success());
}
