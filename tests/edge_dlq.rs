//! The edge DLQ and the field technician's CLI, end to end: every `dlq` command and `status`
//! against a running agent (admin socket) and a stopped one (store opened directly), retries
//! that really re-process (fix the config, retry, entry gone, result in the outbox), automatic
//! retries of transient failures, the cap's policies, the socket's owner-only access, and the
//! screen a person sees in an 80-column terminal.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::cli::{outcome, run_as};
use e2e::{Agent, Publisher, Tmux, agent_bin, meter, mosquitto_pub, set, wait_for};
use serde_json::{Value, json};

const METER: &str = "devices/meter-1/events/meter";

/// One good reading and four failures, one per stage, on two devices:
/// 1 rule (meter-1), 2 decode (meter-1), 3 schema (meter-2), 4 schema: unknown type (meter-1).
fn publish_failures(agent: &Agent) {
    let port = agent.mqtt_port;
    mosquitto_pub(port, METER, &meter("a1", 1, 100.0), 1);
    mosquitto_pub(port, METER, &meter("a2", 2, 90.0), 1);
    mosquitto_pub(port, METER, br#"{"id": "a3", "seq": 3,"#, 1);
    mosquitto_pub(
        port,
        "devices/meter-2/events/meter",
        json!({"id": "b1", "seq": 1, "ts": 1_764_000_000_000i64,
               "data": {"voltage_v": 230.0, "current_a": 4.0}})
        .to_string()
        .as_bytes(),
        1,
    );
    mosquitto_pub(port, "devices/meter-1/events/toaster", &toast(), 1);
}

fn toast() -> Vec<u8> {
    json!({"id": "t1", "seq": 4, "ts": 1_764_000_300_000i64, "data": {"slices": 2}})
        .to_string()
        .into_bytes()
}

/// The technician's fix: the config learns the event type `toaster`.
fn add_toaster(cfg: &mut toml::Table) {
    let field: toml::Table = toml::from_str(r#"type = "number""#).unwrap();
    set(
        cfg,
        &["event_types", "toaster", "fields", "slices"],
        toml::Value::Table(field),
    );
}

fn ids(entries: &[Value]) -> Vec<u64> {
    entries.iter().map(|e| e["id"].as_u64().unwrap()).collect()
}

fn assert_fits_80(text: &str) {
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line:?}\n{text}",
            line.chars().count()
        );
    }
}

/// Every read-only command; `state` is "running" or "stopped".
fn check_reads(agent: &Agent, state: &str) {
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["agent"]["state"], state, "{st}");
    assert_eq!(st["dlq"]["entries"], 4);
    assert_eq!(st["outbox"]["entries"], 1);
    assert_eq!(st["uplink"]["state"], "not configured");
    assert!(
        st["last_error"]["what"]
            .as_str()
            .unwrap()
            .contains("unknown event type 'toaster'"),
        "{st}"
    );
    if state == "running" {
        assert_eq!(st["totals"]["rejected"], 4, "{st}");
        assert_eq!(st["intake"], "taking messages");
        assert!(st["rates"]["ingested_per_s"].as_f64().is_some());
    }
    let (code, human, _) = outcome(&agent.cli(&["status"]));
    assert_eq!(code, Some(0));
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("agent ") && l.contains(state)),
        "{human}"
    );
    assert_fits_80(&human);

    // list, with each filter
    let all = agent.cli_json(&["dlq", "list", "--json"]);
    assert_eq!(ids(&all), vec![1, 2, 3, 4]);
    let stages: Vec<&str> = all.iter().map(|e| e["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, vec!["rule", "decode", "schema", "schema"]);
    let list = |extra: &[&str]| {
        let mut args = vec!["dlq", "list", "--json"];
        args.extend_from_slice(extra);
        ids(&agent.cli_json(&args))
    };
    assert_eq!(list(&["--reason", "COUNTER_MONOTONIC"]), vec![1]);
    assert_eq!(list(&["--device", "meter-2"]), vec![3]);
    assert_eq!(list(&["--device", "meter-*"]), vec![1, 2, 3, 4]);
    assert_eq!(list(&["--limit", "2"]), vec![1, 2]);
    assert_eq!(list(&["--since", "2020-01-01T00:00:00Z"]), vec![1, 2, 3, 4]);
    assert!(list(&["--since", "2999-01-01T00:00:00Z"]).is_empty());
    let (code, _, err) = outcome(&agent.cli(&["dlq", "list", "--since", "yesterday"]));
    assert_eq!(code, Some(2), "a bad --since is a usage error");
    assert!(err.contains("RFC 3339"), "{err}");

    let (code, table, _) = outcome(&agent.cli(&["dlq", "list"]));
    assert_eq!(code, Some(0));
    assert_fits_80(&table);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in ["ID", "LAST SEEN", "STAGE", "DEVICE", "TRIES", "REASON"] {
        assert!(header.contains(col), "{header}");
    }
    let first = lines.next().unwrap();
    assert!(first.contains("rule counter_monotonic"), "{table}");
    assert!(first.ends_with('…'), "a long reason is cut: {first}");
    assert_eq!(
        header.find("REASON"),
        first.find("rule counter"),
        "aligned:\n{table}"
    );
    assert!(table.contains("4 entries, oldest first."), "{table}");

    // show
    let e = agent.cli_doc(&["dlq", "show", "1", "--json"]);
    assert_eq!(e["id"], 1);
    assert_eq!(e["event_id"], "meter-1/a2");
    assert_eq!(e["device"], "meter-1");
    assert_eq!(e["stage"], "rule");
    assert!(e["reason"].as_str().unwrap().contains("counter_monotonic"));
    assert_eq!(
        e["payload"],
        String::from_utf8(meter("a2", 2, 90.0)).unwrap()
    );
    assert_eq!(e["payload_encoding"], "utf8");
    assert!(e["first_seen"].as_str().unwrap().ends_with('Z'));
    let (code, text, _) = outcome(&agent.cli(&["dlq", "show", "2"]));
    assert_eq!(code, Some(0));
    assert!(
        text.contains("truncated: unexpected end of input"),
        "{text}"
    );
    assert!(
        text.contains(r#"{"id": "a3", "seq": 3,"#),
        "raw payload: {text}"
    );
    let (code, _, err) = outcome(&agent.cli(&["dlq", "show", "99"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("no DLQ entry 99"), "{err}");

    // stats
    let s = agent.cli_doc(&["dlq", "stats", "--json"]);
    assert_eq!(s["entries"], 4);
    assert_eq!(s["oldest"]["id"], 1);
    assert_eq!(s["newest"]["id"], 4);
    assert_eq!(
        s["by_stage"][0],
        json!({"key": "schema", "count": 2, "last_seen": s["by_stage"][0]["last_seen"]})
    );
    assert_eq!(s["by_device"][0]["key"], "meter-1");
    assert_eq!(s["by_device"][0]["count"], 3);
    let reasons: Vec<&str> = s["by_reason"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    for r in [
        "rule counter_monotonic",
        "truncated",
        "data.energy_kwh",
        "unknown event type 'toaster'",
    ] {
        assert!(reasons.contains(&r), "{reasons:?}");
    }
    let (code, text, _) = outcome(&agent.cli(&["dlq", "stats"]));
    assert_eq!(code, Some(0));
    assert_fits_80(&text);
    for part in ["oldest", "#1 ", "STAGE", "REASON", "DEVICE", "meter-2"] {
        assert!(text.contains(part), "{part}: {text}");
    }

    // export
    let file = agent.dir.join(format!("export-{state}.jsonl"));
    let (code, out, err) = outcome(&agent.cli(&["dlq", "export", "--out", file.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("exported 4 entries"), "{out}");
    assert!(
        !err.contains("exporting ["),
        "no progress bar without a terminal"
    );
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, all, "the export holds what list --json shows");

    // purge wants --yes
    let (code, _, err) = outcome(&agent.cli(&["dlq", "purge", "--all"]));
    assert_eq!(code, Some(2));
    assert!(err.contains("--yes"), "{err}");
    let (code, _, _) = outcome(&agent.cli(&["dlq", "retry"]));
    assert_eq!(code, Some(2), "retry needs ids or --all");
    assert_eq!(agent.cli_json(&["dlq", "list", "--json"]).len(), 4);
}

#[test]
fn every_dlq_command_against_a_running_and_a_stopped_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    publish_failures(&agent);
    check_reads(&agent, "running");
    assert_eq!(agent.stop().code(), Some(0));
    check_reads(&agent, "stopped");

    // Writes with the agent stopped: a retry that fails again keeps the entry (exit 1).
    let (code, out, _) = outcome(&agent.cli(&["dlq", "retry", "1"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("failed") && out.contains("counter_monotonic"),
        "{out}"
    );
    assert_eq!(
        agent.cli_doc(&["dlq", "show", "1", "--json"])["attempts"],
        2
    );
    let (code, out, _) = outcome(&agent.cli(&["dlq", "purge", "2", "--yes"]));
    assert_eq!(code, Some(0));
    assert!(out.contains("Purged 1 entry"), "{out}");
    // --data-dir instead of --config reads too, and says what retry then needs.
    let data = agent.data_dir();
    let by_dir = |args: &[&str]| {
        Command::new(agent_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let (code, out, _) = outcome(&by_dir(&["dlq", "list", "--json"]));
    assert_eq!(code, Some(0));
    assert_eq!(
        ids(serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()),
        vec![1, 3, 4]
    );
    let (code, _, err) = outcome(&by_dir(&["dlq", "retry", "1"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("needs the agent's config"), "{err}");

    // Writes with the agent running go through its pipeline.
    agent.restart();
    let (code, out, _) = outcome(&agent.cli(&["dlq", "retry", "1", "99", "--json"]));
    assert_eq!(code, Some(1), "not everything left the DLQ");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["items"][0]["outcome"], "failed");
    assert_eq!(r["items"][0]["attempts"], 3);
    assert_eq!(r["items"][1], json!({"id": 99, "outcome": "not_found"}));
    let (code, out, _) = outcome(&agent.cli(&["dlq", "retry", "1"]));
    assert_eq!(code, Some(1));
    assert!(out.contains("in the running agent"), "{out}");
    let (code, _, _) = outcome(&agent.cli(&["dlq", "purge", "3", "--yes"]));
    assert_eq!(code, Some(0));
    let (code, out, _) = outcome(&agent.cli(&["dlq", "purge", "3", "--yes"]));
    assert_eq!(code, Some(1), "already gone: {out}");
    assert!(out.contains("Not found: 3"), "{out}");
    assert_eq!(ids(&agent.cli_json(&["dlq", "list", "--json"])), vec![1, 4]);
    let st = agent.cli_doc(&["status", "--json"]);
    assert_eq!(st["dlq"]["entries"], 2);
    assert_eq!(agent.metric("edge_dlq_entries"), 2.0);
    let (code, _, _) = outcome(&agent.cli(&["dlq", "purge", "--all", "--yes"]));
    assert_eq!(code, Some(0));
    assert!(agent.cli_json(&["dlq", "list", "--json"]).is_empty());
    let (_, out, _) = outcome(&agent.cli(&["dlq", "list"]));
    assert!(out.contains("The DLQ is empty."), "{out}");
    assert_eq!(agent.stop().code(), Some(0));
    assert!(
        !agent.data_dir().join("admin.sock").exists(),
        "socket removed"
    );

    // After a crash the socket file stays behind: the CLI falls back to the store, and the
    // next start replaces the stale socket.
    agent.restart();
    let (code, _, err) = outcome(&agent.cli(&["outbox", "list"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("the agent is running"), "{err}");
    agent.kill9();
    assert!(agent.data_dir().join("admin.sock").exists());
    assert_eq!(
        agent.cli_doc(&["status", "--json"])["agent"]["state"],
        "stopped"
    );
    agent.restart();
    assert_eq!(
        agent.cli_doc(&["status", "--json"])["agent"]["state"],
        "running"
    );
}

#[test]
fn retry_reprocesses_after_the_config_is_fixed_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    mosquitto_pub(agent.mqtt_port, METER, &meter("a1", 1, 100.0), 1);
    mosquitto_pub(
        agent.mqtt_port,
        "devices/meter-1/events/toaster",
        &toast(),
        1,
    );
    assert_eq!(ids(&agent.dlq()), vec![1]);
    // Fix the config, restart, retry through the running agent.
    assert_eq!(agent.stop().code(), Some(0));
    agent.edit_config(add_toaster);
    agent.restart();
    let (code, out, err) = outcome(&agent.cli(&["dlq", "retry", "--all", "--reason", "toaster"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("reprocessed"), "{out}");
    assert!(out.contains("edge_seq 2"), "{out}");
    assert!(agent.dlq().is_empty(), "entry gone");
    assert_eq!(agent.metric("edge_dlq_retries_total"), 1.0);
    // The pipeline goes on with the next edge_seq.
    mosquitto_pub(agent.mqtt_port, METER, &meter("a5", 5, 101.0), 1);
    assert_eq!(agent.stop().code(), Some(0));
    let outbox = agent.outbox();
    let got: Vec<(&str, u64)> = outbox
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap(),
                r["edge_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("meter-1/a1", 1), ("meter-1/t1", 2), ("meter-1/a5", 3)]
    );
    assert!(
        outbox[1]["flags"]
            .as_array()
            .unwrap()
            .contains(&json!("replay"))
    );
    assert_eq!(outbox[1]["input"]["slices"], 2.0);
}

#[test]
fn retry_reprocesses_after_the_config_is_fixed_while_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), |_| {});
    mosquitto_pub(
        agent.mqtt_port,
        "devices/meter-1/events/toaster",
        &toast(),
        1,
    );
    assert_eq!(agent.stop().code(), Some(0));
    agent.edit_config(add_toaster);
    let (code, out, err) = outcome(&agent.cli(&["dlq", "retry", "1"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("reprocessed") && !out.contains("running agent"),
        "{out}"
    );
    assert!(agent.dlq().is_empty());
    let outbox = agent.outbox();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0]["event_id"], "meter-1/t1");
    // The agent starts on the store the CLI wrote and continues from there.
    agent.restart();
    mosquitto_pub(agent.mqtt_port, METER, &meter("a5", 5, 101.0), 1);
    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(agent.outbox()[1]["edge_seq"], 2);
}

/// A pulse counter whose rate needs the previous reading (except on the boot message), with
/// fast automatic retries.
fn pulse_config(cfg: &mut toml::Table) {
    let pulse: toml::Table = toml::from_str(
        r#"
[fields]
count = { type = "number", required = true }
boot = { type = "boolean", default = false }
[[calc]]
name = "per_min"
expr = 'if(boot, 0, delta("count") / dt() * 60)'
"#,
    )
    .unwrap();
    set(cfg, &["event_types", "pulse"], toml::Value::Table(pulse));
    let retry: toml::Table =
        toml::from_str("attempts = 3\nfirst_delay_ms = 500\nmax_delay_ms = 500").unwrap();
    set(cfg, &["dlq", "auto_retry"], toml::Value::Table(retry));
}

fn pulse(
    device: &str,
    id: &str,
    seq: u64,
    minute: i64,
    count: u32,
    boot: bool,
) -> (String, Vec<u8>) {
    (
        format!("devices/{device}/events/pulse"),
        json!({"id": id, "seq": seq, "ts": 1_764_000_000_000i64 + minute * 60_000,
               "data": {"count": count, "boot": boot}})
        .to_string()
        .into_bytes(),
    )
}

#[test]
fn transient_failures_are_retried_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::embedded(dir.path(), pulse_config);
    let publish = |(topic, body): (String, Vec<u8>)| {
        mosquitto_pub(agent.mqtt_port, &topic, &body, 1);
    };
    // p1's seq 2 overtakes its boot message: no previous reading yet → transient.
    publish(pulse("p1", "b", 2, 1, 30, false));
    // p2's boot message never comes: its retries run out.
    publish(pulse("p2", "x", 5, 1, 30, false));
    let dlq = agent.dlq();
    assert_eq!(ids(&dlq), vec![1, 2]);
    assert_eq!(dlq[0]["stage"], "calc");
    assert!(dlq[0]["auto_retry_at"].is_string(), "{}", dlq[0]);
    let (_, table, _) = outcome(&agent.cli(&["dlq", "list"]));
    assert!(table.contains("automatic retry is scheduled"), "{table}");
    publish(pulse("p1", "a", 1, 0, 10, true));
    wait_for("p1's entry to be retried", Duration::from_secs(10), || {
        ids(&agent.dlq()) == vec![2]
    });
    wait_for("p2's retries to run out", Duration::from_secs(10), || {
        agent.dlq()[0]["auto_retry_at"].is_null()
    });
    let left = &agent.dlq()[0];
    assert_eq!(
        left["attempts"], 4,
        "the failure and three automatic retries: {left}"
    );
    let s = agent.cli_doc(&["dlq", "stats", "--json"]);
    assert_eq!(s["auto_retry_pending"], 0);
    assert_eq!(agent.stop().code(), Some(0));
    let outbox = agent.outbox();
    let b = outbox
        .iter()
        .find(|r| r["event_id"] == "p1/b")
        .expect("p1/b in the outbox");
    assert_eq!(b["result"]["per_min"], 20.0);
    assert!(b["flags"].as_array().unwrap().contains(&json!("replay")));
    assert!(
        agent
            .log_text()
            .contains("automatic DLQ retry: reprocessed")
    );
}

#[test]
fn drop_oldest_keeps_the_newest_and_counts_the_drops() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["dlq", "max_entries"], 5.into());
        set(cfg, &["dlq", "full_policy"], "drop_oldest".into());
    });
    for seq in 1..=8 {
        mosquitto_pub(
            agent.mqtt_port,
            METER,
            format!("{{\"id\":\"x{seq}\"").as_bytes(),
            1,
        );
    }
    assert_eq!(ids(&agent.dlq()), vec![4, 5, 6, 7, 8]);
    let s = agent.cli_doc(&["dlq", "stats", "--json"]);
    assert_eq!(s["dropped_total"], 3);
    assert_eq!(s["max_entries"], 5);
    assert_eq!(s["full_policy"], "drop_oldest");
    assert_eq!(agent.metric("edge_dlq_dropped_total"), 3.0);
    assert!(agent.log_text().contains("dropped the oldest entry"));
}

#[test]
fn block_stops_intake_while_the_dlq_is_full_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["dlq", "max_entries"], 2.into());
        set(cfg, &["dlq", "full_policy"], "block".into());
    });
    mosquitto_pub(agent.mqtt_port, METER, b"{1", 1);
    mosquitto_pub(agent.mqtt_port, METER, b"{2", 1);
    // The DLQ is full: the next message is not taken (no PUBACK) until there is room.
    let mut pending = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &agent.mqtt_port.to_string()])
        .args(["-t", METER, "-q", "1", "-m", "{3"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("intake to block", Duration::from_secs(10), || {
        agent.cli_doc(&["status", "--json"])["intake"] == "blocked: DLQ full"
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pending.try_wait().unwrap().is_none(),
        "not acknowledged while full"
    );
    assert_eq!(agent.metric("edge_dlq_blocked"), 1.0);
    let (code, _, _) = outcome(&agent.cli(&["dlq", "purge", "--all", "--yes"]));
    assert_eq!(code, Some(0));
    wait_for(
        "the waiting message to be taken",
        Duration::from_secs(10),
        || pending.try_wait().unwrap().is_some(),
    );
    let dlq = agent.dlq();
    assert_eq!(ids(&dlq), vec![3]);
    assert_eq!(dlq[0]["payload"], "{3");
    assert_eq!(
        agent.cli_doc(&["dlq", "stats", "--json"])["dropped_total"],
        0
    );
}

#[test]
fn the_admin_socket_is_for_the_agents_user_only() {
    let dir = tempfile::tempdir().unwrap();
    // Reachable by other users, so that only the socket's own protection is tested.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::embedded(dir.path(), |_| {});
    publish_failures(&agent);
    let sock = agent.data_dir().join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin.sock mode {mode:o}");
    std::fs::set_permissions(agent.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = agent.data_dir();
    let data = data.to_str().unwrap();
    const NOBODY: u32 = 65534;
    let Some(out) = run_as(NOBODY, dir.path(), &["dlq", "list", "--data-dir", data]) else {
        eprintln!("skipped: needs root and setpriv (the peer check is unit-tested)");
        return;
    };
    let (code, _, err) = outcome(&out);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("permission denied on the agent's admin socket"),
        "{err}"
    );
    assert!(
        err.contains("run this as user root"),
        "names the owner: {err}"
    );
    // Past the file mode (as if it were opened up by mistake), SO_PEERCRED still refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_as(NOBODY, dir.path(), &["dlq", "list", "--data-dir", data]).unwrap();
    let (code, stdout, err) = outcome(&out);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(err.contains("refused: uid 65534"), "{err}");
    assert!(stdout.is_empty());
    assert!(
        agent
            .log_text()
            .contains("refused a connection from another user")
    );
    // The owner is still served.
    assert_eq!(agent.dlq().len(), 4);
}

/// `SHOW_SCREENS=1 cargo test … -- --nocapture` prints what the terminal showed.
fn show_screen(screen: &str) {
    if std::env::var_os("SHOW_SCREENS").is_some() {
        eprintln!("{}\n{screen}{}", "─".repeat(80), "─".repeat(80));
    }
}

#[test]
fn the_cli_in_an_80_column_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::embedded(dir.path(), |_| {});
    publish_failures(&agent);
    // A site with a lot of bad data: 20 000 rejected messages.
    const BULK: u16 = 20_000;
    let messages = (1..=BULK)
        .map(|i| {
            let device = format!("sensor-{:03}", i % 7);
            (
                i,
                format!("devices/{device}/events/meter"),
                json!({"id": format!("s{i}"), "seq": i, "ts": 1_764_000_000_000i64,
                       "data": {"energy_kwh": -1.0, "voltage_v": 230.0, "current_a": 4.0}})
                .to_string()
                .into_bytes(),
            )
        })
        .collect();
    Publisher::new(agent.mqtt_port, "bulk").publish_all(
        messages,
        500,
        Duration::from_secs(120),
        |_| {},
    );
    let bin = agent_bin();
    let cmd = |args: &str| {
        format!(
            "{} {args} --config {}",
            bin.display(),
            agent.config.display()
        )
    };

    let t = Tmux::run("dlq-list", 80, 50, &cmd("dlq list --limit 12"));
    let screen = t.wait_done(Duration::from_secs(30));
    show_screen(&screen);
    let shown: Vec<&str> = screen
        .lines()
        .take_while(|l| !l.contains("__DONE__"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    for line in &shown {
        assert!(
            line.chars().count() <= 80,
            "wider than the terminal: {line:?}"
        );
    }
    assert!(shown[0].trim_start().starts_with("ID"), "{screen}");
    assert!(shown[1].ends_with('…'), "long reason cut: {screen}");
    assert!(
        screen.contains(&format!("12 of {} entries shown", BULK as u64 + 4)),
        "{screen}"
    );

    let t = Tmux::run("dlq-stats", 80, 60, &cmd("dlq stats"));
    let screen = t.wait_done(Duration::from_secs(30));
    show_screen(&screen);
    for line in screen.lines() {
        assert!(
            line.chars().count() <= 80,
            "wider than the terminal: {line:?}"
        );
    }
    assert!(
        screen.contains("data.energy_kwh"),
        "the top reason: {screen}"
    );
    assert!(screen.contains("sensor-00"), "{screen}");

    let out = dir.path().join("all.jsonl");
    let t = Tmux::run(
        "dlq-export",
        80,
        20,
        &cmd(&format!("dlq export --out {}", out.display())),
    );
    t.wait_done(Duration::from_secs(60));
    let screen = t.rows();
    show_screen(&screen);
    let bar = screen
        .lines()
        .find(|l| l.starts_with("exporting "))
        .unwrap_or_else(|| panic!("a progress bar: {screen}"));
    assert!(
        bar.starts_with("exporting 20,004/20,004 entries [====")
            && bar.trim_end().ends_with("left"),
        "the whole bar on one row: {screen}"
    );
    assert!(screen.contains("exported 20004 entries"), "{screen}");
    let lines = std::fs::read_to_string(&out).unwrap().lines().count();
    assert_eq!(lines, BULK as usize + 4);
}
