//! Missed events, end to end: the real agent with `missed_after_s = 1`, devices publishing
//! through mosquitto_pub. A gap becomes a missed-event record after the wait; a late arrival
//! is still a result (in the outbox) and shrinks the record; `missed list` and `status` show
//! the same thing whether they ask the running agent (admin socket) or the stopped one's
//! store.

use std::time::Duration;

use e2e::{Agent, meter, mosquitto_pub, set, wait_for};
use serde_json::Value;

const METER: &str = "devices/meter-1/events/meter";

fn publish(agent: &Agent, seq: u64) {
    let id = format!("m{seq}");
    mosquitto_pub(
        agent.mqtt_port,
        METER,
        &meter(&id, seq, 100.0 + seq as f64 * 0.01),
        1,
    );
}

/// (device, first_seq, last_seq, count, filled_late) of each record.
fn records(agent: &Agent, extra: &[&str]) -> Vec<(String, u64, u64, u64, u64)> {
    let mut args = vec!["missed", "list", "--json"];
    args.extend_from_slice(extra);
    agent
        .cli_json(&args)
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
            (
                r["device"].as_str().unwrap().to_string(),
                n("first_seq"),
                n("last_seq"),
                n("count"),
                n("filled_late"),
            )
        })
        .collect()
}

fn rec(first: u64, last: u64, filled_late: u64) -> (String, u64, u64, u64, u64) {
    ("meter-1".into(), first, last, last - first + 1, filled_late)
}

fn assert_fits_80(text: &str) {
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "wider than 80: {line:?}");
    }
}

fn human(agent: &Agent, args: &[&str]) -> String {
    let out = agent.cli(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_fits_80(&text);
    if std::env::var_os("SHOW_SCREENS").is_some() {
        eprintln!("$ edge-agent {}\n{text}", args.join(" "));
    }
    text
}

#[test]
fn a_gap_becomes_a_missed_record_and_a_late_arrival_shrinks_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["pipeline", "missed_after_s"], 1.into());
    });
    for seq in [1, 2, 5, 6] {
        publish(&agent, seq);
    }
    // Declared after the wait (the pipeline's timer; nothing else is published meanwhile).
    wait_for("the missed record 3..=4", Duration::from_secs(20), || {
        !records(&agent, &[]).is_empty()
    });
    assert_eq!(records(&agent, &[]), [rec(3, 4, 0)]);
    assert_eq!(agent.metric("edge_missed_events_total"), 2.0);
    assert_eq!(agent.metric("edge_missed_records"), 1.0);
    assert_eq!(agent.metric("edge_gaps_open"), 0.0);
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["agent"]["state"], "running");
    assert_eq!(st["missed"]["records"], 1, "{st}");
    assert_eq!(st["missed"]["missing"], 2, "{st}");
    assert_eq!(st["missed"]["declared_total"], 2, "{st}");
    let table = human(&agent, &["missed", "list"]);
    assert!(
        table.contains("3..=4") && table.contains("meter-1"),
        "{table}"
    );
    let status = human(&agent, &["status"]);
    assert!(status.contains("1 record (2 seqs)"), "{status}");
    // Filters: by device, by declaration time.
    assert!(records(&agent, &["--device", "meter-2"]).is_empty());
    assert_eq!(records(&agent, &["--device", "meter-*"]).len(), 1);
    assert!(records(&agent, &["--since", "2999-01-01T00:00:00Z"]).is_empty());

    // seq 3 arrives late: processed normally, and the record shrinks to 4..=4.
    publish(&agent, 3);
    assert_eq!(records(&agent, &[]), [rec(4, 4, 1)]);
    assert_eq!(agent.metric("edge_missed_filled_late_total"), 1.0);
    assert_eq!(
        agent.metric("edge_missed_events_total"),
        2.0,
        "counted once"
    );

    // The same through the stopped agent's store, and the late result is in the outbox.
    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(records(&agent, &[]), [rec(4, 4, 1)]);
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["agent"]["state"], "stopped");
    assert_eq!(
        (&st["missed"]["records"], &st["missed"]["filled_late_total"]),
        (&Value::from(1), &Value::from(1)),
        "{st}"
    );
    let table = human(&agent, &["missed", "list"]);
    assert!(table.contains("4 ") && !table.contains("3..=4"), "{table}");
    let outbox = agent.outbox();
    let seqs: Vec<u64> = outbox.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 5, 6, 3]);
    let late = &outbox[4];
    assert_eq!(late["event_id"], "meter-1/m3");
    assert!(
        late["flags"].as_array().unwrap().contains(&"late".into()),
        "{late}"
    );

    // After a restart the last missing seq arrives: the record is gone, the result is stored.
    agent.restart();
    publish(&agent, 4);
    assert!(records(&agent, &[]).is_empty());
    assert_eq!(agent.stop().code(), Some(0));
    assert!(records(&agent, &[]).is_empty());
    assert_eq!(agent.outbox().len(), 6);
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["missed"]["records"], 0, "{st}");
    assert_eq!(st["missed"]["declared_total"], 2, "{st}");
    assert_eq!(st["missed"]["filled_late_total"], 2, "{st}");
}

#[test]
fn a_gap_filled_before_the_wait_is_never_declared() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["pipeline", "missed_after_s"], 3.into());
    });
    for seq in [1, 3] {
        publish(&agent, seq);
    }
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["missed"]["open_gaps"], 1, "{st}");
    assert_eq!(agent.metric("edge_gaps_open"), 1.0);
    publish(&agent, 2);
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["missed"]["open_gaps"], 0, "{st}");
    assert_eq!(agent.metric("edge_gaps_open"), 0.0);
    // Past the wait: still nothing (the check that was scheduled finds nothing to declare).
    std::thread::sleep(Duration::from_secs(4));
    assert!(records(&agent, &[]).is_empty());
    assert_eq!(agent.metric("edge_missed_events_total"), 0.0);
    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(agent.outbox().len(), 3);
}
