//! The side-by-side benchmark behind `bench/run` (issue 14): in one run, with one load
//! generator (`e2e::load`), the same payloads and the same machine,
//!
//! - mosquitto's own QoS 1 publish→subscribe passthrough (the ceiling);
//! - the release `edge-agent` (MQTT → engine → durable outbox, fsync before every PUBACK):
//!   sustained events/s (closed loop), publish→PUBACK percentiles at 50 % and 90 % of that
//!   rate (open loop, latency from the scheduled send time), peak RSS, CPU seconds per 10k
//!   events; with its embedded endpoint and as a client of an external mosquitto;
//! - Node-RED 4 doing the same job (MQTT in QoS 1 → JSON check → meter calculation → append
//!   to a file), from `NODE_RED_DIR` (`bench/run` installs it);
//! - scaling: 1 / 100 / 10k devices, ~100 B / 1 KB / 8 KB payloads, 10k devices at 10k
//!   events/s;
//! - the outbox with a large backlog (1M results, 100k with `--quick`): disk bytes per event,
//!   start-up time and RSS with it queued, then its drain over the uplink to a local mosquitto
//!   (results/s, bytes/s) — what `benches/uplink.rs` measures.
//!
//! Each figure is a line `ROW\t…` (tab-separated, the columns of `HEADER`) for `bench/run` to
//! put in its table, then one `SUMMARY\t…` line. Human-readable progress goes to stderr.
//!
//! `cargo build --release -p edge-agent --no-default-features &&
//!  cargo bench -p e2e --bench side_by_side -- [--quick]` (or `bench/run`).
//! `BENCH_ONLY=ceiling,agent,external,nodered,scaling,outbox` runs only those parts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::load::{self, Load, Outcome, Pace};
use e2e::{Agent, Mosquitto, Subscriber, set, wait_for};

/// The columns of each `ROW` line.
const HEADER: &str =
    "HEADER\tscenario\tevents/s\tp50 ms\tp99 ms\tp999 ms\tpeak RSS MB\tCPU s/10k\tnotes";

struct Sizes {
    /// Closed-loop runs (ceiling, sustained ingest, Node-RED).
    sustained: usize,
    /// Seconds of each open-loop run.
    open_secs: f64,
    /// Events of each scaling run (8 KB payloads: half).
    scaling: usize,
    /// The outbox backlog.
    backlog: usize,
}

fn main() {
    // `cargo test --benches` (and clippy's all-targets build) must not start a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        Sizes {
            sustained: 30_000,
            open_secs: 3.0,
            scaling: 10_000,
            backlog: 60_000,
        }
    } else {
        Sizes {
            sustained: 200_000,
            open_secs: 12.0,
            scaling: 60_000,
            backlog: 1_000_000,
        }
    };
    let only = std::env::var("BENCH_ONLY").ok();
    let part = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == name))
    };
    // On disk, not tmpfs: fsync must cost what it costs on a gateway.
    let exe = std::env::current_exe().unwrap();
    let scratch = exe.parent().unwrap().join("bench-scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    println!("{HEADER}");

    let mut summary = Summary::default();
    if part("ceiling") {
        summary.ceiling = Some(ceiling(&scratch, sizes.sustained));
    }
    if part("agent") {
        let (rate, p99, rss) = agent_embedded(&scratch, &sizes);
        summary.agent = Some(rate);
        summary.p99_ms = Some(p99);
        summary.rss_mb = Some(rss);
    }
    if part("external") {
        agent_external(&scratch, sizes.sustained);
    }
    if part("nodered") {
        summary.nodered = node_red(&scratch, sizes.sustained / 2);
    }
    if part("scaling") {
        scaling(&scratch, &sizes);
    }
    if part("outbox") {
        outbox(&scratch, sizes.backlog);
    }
    let f = |v: Option<f64>, digits: usize| {
        v.filter(|v| v.is_finite())
            .map_or("NA".to_string(), |v| format!("{v:.digits$}"))
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    println!(
        "SUMMARY\tevents_per_s={} vs_mosquitto={} vs_nodered={} p99_ms={} rss_mb={}",
        f(summary.agent, 0),
        f(ratio(summary.agent, summary.ceiling), 2),
        f(ratio(summary.agent, summary.nodered), 1),
        f(summary.p99_ms, 2),
        f(summary.rss_mb, 1),
    );
}

#[derive(Default)]
struct Summary {
    ceiling: Option<f64>,
    agent: Option<f64>,
    nodered: Option<f64>,
    p99_ms: Option<f64>,
    rss_mb: Option<f64>,
}

/// One table row; `None` prints as `-`.
#[allow(clippy::too_many_arguments)]
fn row(
    scenario: &str,
    rate: Option<f64>,
    lat: Option<&Outcome>,
    rss_kib: Option<u64>,
    cpu_per_10k: Option<f64>,
    notes: &str,
) {
    let dash = || "-".to_string();
    let (p50, p99, p999) = lat.map_or((dash(), dash(), dash()), |o| {
        (
            format!("{:.2}", o.pct_ms(0.50)),
            format!("{:.2}", o.pct_ms(0.99)),
            format!("{:.2}", o.pct_ms(0.999)),
        )
    });
    println!(
        "ROW\t{scenario}\t{}\t{p50}\t{p99}\t{p999}\t{}\t{}\t{notes}",
        rate.map_or_else(dash, |r| format!("{r:.0}")),
        rss_kib.map_or_else(dash, |k| format!("{:.1}", k as f64 / 1024.0)),
        cpu_per_10k.map_or_else(dash, |c| format!("{c:.2}")),
    );
    eprintln!("  {scenario}: done");
}

/// The agent's bench config: quiet, and the meter type also takes the `trace` array the
/// generator pads large payloads with.
fn bench_config(cfg: &mut toml::Table) {
    set(cfg, &["log", "level"], "warn".into());
    let mut trace = toml::Table::new();
    trace.insert("type".into(), "array".into());
    set(
        cfg,
        &["event_types", "meter", "fields", "trace"],
        toml::Value::Table(trace),
    );
}

/// The agent's group commits so far: (batches, messages, engine seconds, commit seconds),
/// from its `edge_batch_size` and `edge_stage_seconds` histograms.
fn commits(agent: &Agent) -> [f64; 4] {
    let body = e2e::http_get(agent.metrics_port, "/metrics");
    let get = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    [
        get("edge_batch_size_count"),
        get("edge_batch_size_sum"),
        get("edge_stage_seconds_sum{stage=\"engine\"}"),
        get("edge_stage_seconds_sum{stage=\"commit\"}"),
    ]
}

/// "N commits of M messages, engine a ms + commit b ms each" between two [`commits`].
fn per_commit(before: [f64; 4], after: [f64; 4]) -> String {
    let d: Vec<f64> = (0..4).map(|i| after[i] - before[i]).collect();
    let n = d[0].max(1.0);
    format!(
        "{:.0} commits of {:.0} msgs: engine {:.1} ms + store/fsync {:.1} ms each",
        d[0],
        d[1] / n,
        d[2] / n * 1e3,
        d[3] / n * 1e3
    )
}

fn embedded(dir: &Path) -> Agent {
    Agent::embedded(dir, bench_config)
}

fn ceiling(scratch: &Path, events: usize) -> f64 {
    eprintln!("mosquitto QoS 1 passthrough, {events} events");
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let broker = Mosquitto::start(dir.path());
    let sub = Subscriber::start(broker.port, "bench-sub", "devices/#");
    let start = Instant::now();
    let out = load::run(&Load::new(broker.port, events));
    wait_for(
        "the subscriber to get everything",
        Duration::from_secs(300),
        || sub.count() >= events,
    );
    let rate = events as f64 / start.elapsed().as_secs_f64();
    row(
        "mosquitto QoS1 pub→sub (ceiling)",
        Some(rate),
        Some(&out),
        None,
        None,
        "latency: publisher's PUBACK (in memory, no fsync); rate: until the subscriber has all",
    );
    rate
}

/// Closed-loop sustained run into a fresh embedded agent, then open loop at 50 % and 90 % of
/// the rate it sustained. Returns (sustained events/s, p99 ms at 50 %, peak RSS MB).
fn agent_embedded(scratch: &Path, sizes: &Sizes) -> (f64, f64, f64) {
    eprintln!("edge-agent, embedded endpoint: {} events", sizes.sustained);
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let mut agent = embedded(dir.path());
    let pid = agent.pid();
    let cpu0 = load::cpu_seconds(pid);
    let c0 = commits(&agent);
    let out = load::run(&Load::new(agent.mqtt_port, sizes.sustained));
    let cpu = load::cpu_seconds(pid) - cpu0;
    let rss = load::peak_rss_kib(pid);
    let rate = out.rate();
    row(
        "edge-agent embedded, sustained",
        Some(rate),
        Some(&out),
        Some(rss),
        Some(cpu / sizes.sustained as f64 * 10_000.0),
        &format!(
            "closed loop, 4 conns × 1000 in flight, 100 devices, ~100 B; {}",
            per_commit(c0, commits(&agent))
        ),
    );
    let mut total = sizes.sustained;
    let mut p99_at_half = f64::NAN;
    for share in [0.5, 0.9] {
        let target = rate * share;
        let events = (target * sizes.open_secs) as usize;
        let cpu0 = load::cpu_seconds(pid);
        let c0 = commits(&agent);
        let o = load::run(&Load {
            pace: Pace::Rate(target),
            name: format!("o{}", (share * 100.0) as u32),
            ..Load::new(agent.mqtt_port, events)
        });
        let cpu = load::cpu_seconds(pid) - cpu0;
        total += events;
        if share == 0.5 {
            p99_at_half = o.pct_ms(0.99);
        }
        row(
            &format!("edge-agent embedded, open loop {:.0} %", share * 100.0),
            Some(o.rate()),
            Some(&o),
            Some(load::peak_rss_kib(pid)),
            Some(cpu / events as f64 * 10_000.0),
            &format!(
                "fixed {target:.0}/s for {:.0} s, latency from the scheduled send; {}",
                sizes.open_secs,
                per_commit(c0, commits(&agent))
            ),
        );
    }
    assert_eq!(
        agent.metric("edge_outbox_entries") as usize,
        total,
        "every event is in the outbox"
    );
    assert!(agent.stop().success());
    (rate, p99_at_half, rss as f64 / 1024.0)
}

/// The agent as a client of mosquitto: the generator publishes to the broker (whose PUBACK is
/// not durability), the rate is until the agent's outbox holds everything.
fn agent_external(scratch: &Path, events: usize) {
    eprintln!("edge-agent, external mosquitto: {events} events");
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut agent = Agent::external(dir.path(), broker.port, bench_config);
    let pid = agent.pid();
    let cpu0 = load::cpu_seconds(pid);
    let start = Instant::now();
    load::run(&Load::new(broker.port, events));
    wait_for(
        "the agent to store everything",
        Duration::from_secs(600),
        || agent.metric("edge_outbox_entries") as usize >= events,
    );
    let rate = events as f64 / start.elapsed().as_secs_f64();
    let cpu = load::cpu_seconds(pid) - cpu0;
    row(
        "edge-agent via external mosquitto",
        Some(rate),
        None,
        Some(load::peak_rss_kib(pid)),
        Some(cpu / events as f64 * 10_000.0),
        "until all durable in the outbox; PUBACKs come from mosquitto, so no latency",
    );
    assert!(agent.stop().success());
}

/// Node-RED 4 from `NODE_RED_DIR` (its `node_modules/node-red`): MQTT in at QoS 1 from a
/// mosquitto, JSON, the meter's check and calculation in a function node, appended to a file
/// (no fsync). Rate until the file has every line.
fn node_red(scratch: &Path, events: usize) -> Option<f64> {
    let Some(nr) = std::env::var_os("NODE_RED_DIR").map(PathBuf::from) else {
        row(
            "Node-RED 4 flow",
            None,
            None,
            None,
            None,
            "not measured: NODE_RED_DIR not set (bench/run installs it)",
        );
        return None;
    };
    eprintln!("Node-RED: {events} events");
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let broker = Mosquitto::start(dir.path());
    let user_dir = dir.path().join("nr");
    std::fs::create_dir_all(&user_dir).unwrap();
    let out_file = dir.path().join("out.jsonl");
    std::fs::write(
        user_dir.join("flows.json"),
        serde_json::to_string_pretty(&flow(broker.port, &out_file)).unwrap(),
    )
    .unwrap();
    let log = dir.path().join("node-red.log");
    let mut child = NodeRed(
        Command::new("node")
            .arg(nr.join("node_modules/node-red/red.js"))
            .arg("-u")
            .arg(&user_dir)
            .arg("-p")
            .arg(e2e::free_port().to_string())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("node (Node.js) must be installed"),
    );
    wait_for(
        "Node-RED to connect to the broker",
        Duration::from_secs(120),
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Connected to broker")),
    );
    // Its subscription follows the connect.
    std::thread::sleep(Duration::from_secs(1));
    let pid = child.0.id();
    let cpu0 = load::cpu_seconds(pid);
    let start = Instant::now();
    load::run(&Load::new(broker.port, events));
    let lines = || {
        std::fs::read(&out_file)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while lines() < events && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = lines();
    let rate = got as f64 / start.elapsed().as_secs_f64();
    let cpu = load::cpu_seconds(pid) - cpu0;
    let rss = load::peak_rss_kib(pid);
    let dlq = std::fs::read_to_string(&out_file)
        .map(|t| t.lines().filter(|l| l.contains("\"dlq\"")).count())
        .unwrap_or(0);
    assert_eq!(dlq, 0, "Node-RED's check refused a valid reading");
    row(
        "Node-RED 4 flow",
        Some(rate),
        None,
        Some(rss),
        Some(cpu / got.max(1) as f64 * 10_000.0),
        &format!("{got}/{events} lines appended, no fsync; mqtt in QoS 1 from mosquitto"),
    );
    child.0.kill().ok();
    (got == events).then_some(rate)
}

struct NodeRed(Child);

impl Drop for NodeRed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The flow of `shared/recipes/node-red-baseline.md`, on the agent's meter type.
fn flow(port: u16, out: &Path) -> serde_json::Value {
    let func = r#"const e = msg.payload; const d = e && e.data;
if (!e || typeof e.id !== 'string' || typeof e.seq !== 'number' || !d || typeof d.energy_kwh !== 'number' || typeof d.voltage_v !== 'number' || typeof d.current_a !== 'number' || d.energy_kwh < 0 || d.voltage_v < 0 || d.voltage_v > 500 || d.current_a < 0 || d.current_a > 100) { msg.payload = JSON.stringify({dlq: true, raw: e}) + '\n'; return msg; }
const key = 'prev_' + msg.topic; const prev = context.get(key);
if (prev !== undefined && d.energy_kwh < prev.kwh) { msg.payload = JSON.stringify({dlq: true, rule: 'counter_monotonic', raw: e}) + '\n'; return msg; }
const consumption = prev === undefined ? 0 : d.energy_kwh - prev.kwh;
const dt = prev === undefined ? 0 : (e.ts - prev.ts) / 1000;
context.set(key, {kwh: d.energy_kwh, ts: e.ts});
const power = d.voltage_v * d.current_a * (d.power_factor === undefined ? 1 : d.power_factor);
const avg = dt > 0 ? consumption / dt * 3600000 : 0;
msg.payload = JSON.stringify({event_id: e.id, seq: e.seq, ts: e.ts, input: d, result: {consumption_kwh: consumption, power_w: power, avg_power_w: avg, cost_eur: Math.round(consumption * 0.28 * 10000) / 10000}}) + '\n';
return msg;"#;
    serde_json::json!([
        {"id": "tab1", "type": "tab", "label": "bench"},
        {"id": "broker1", "type": "mqtt-broker", "name": "local", "broker": "127.0.0.1",
         "port": port.to_string(), "clientid": "nodered", "autoConnect": true, "usetls": false,
         "protocolVersion": "4", "keepalive": "60", "cleansession": true},
        {"id": "in1", "type": "mqtt in", "z": "tab1", "name": "", "topic": "devices/#", "qos": "1",
         "datatype": "json", "broker": "broker1", "nl": false, "rap": true, "rh": 0, "inputs": 0,
         "x": 100, "y": 100, "wires": [["fn1"]]},
        {"id": "fn1", "type": "function", "z": "tab1", "name": "verify+calc", "func": func,
         "outputs": 1, "x": 300, "y": 100, "wires": [["file1"]]},
        {"id": "file1", "type": "file", "z": "tab1", "name": "", "filename": out.display().to_string(),
         "filenameType": "str", "appendNewline": false, "createDir": false, "overwriteFile": "false",
         "encoding": "utf8", "x": 500, "y": 100, "wires": []}
    ])
}

/// Devices and payload sizes, each into a fresh agent (closed loop), and 10k devices at a fixed
/// 10k events/s.
fn scaling(scratch: &Path, sizes: &Sizes) {
    for (devices, bytes) in [(1, 0), (100, 0), (10_000, 0), (100, 1024), (100, 8 * 1024)] {
        let events = if bytes > 4096 {
            sizes.scaling / 2
        } else {
            sizes.scaling
        };
        eprintln!("scaling: {devices} devices, {bytes} B payloads, {events} events");
        let dir = tempfile::tempdir_in(scratch).unwrap();
        let mut agent = embedded(dir.path());
        let pid = agent.pid();
        let cpu0 = load::cpu_seconds(pid);
        let c0 = commits(&agent);
        let o = load::run(&Load {
            devices,
            payload_bytes: bytes,
            ..Load::new(agent.mqtt_port, events)
        });
        let cpu = load::cpu_seconds(pid) - cpu0;
        assert_eq!(agent.metric("edge_outbox_entries") as usize, events);
        let size = load::reading(1, bytes).len();
        row(
            &format!("scaling: {devices} devices, {size} B"),
            Some(o.rate()),
            Some(&o),
            Some(load::peak_rss_kib(pid)),
            Some(cpu / events as f64 * 10_000.0),
            &format!(
                "closed loop, {} conn(s) × 1000 in flight; {}",
                4.min(devices),
                per_commit(c0, commits(&agent))
            ),
        );
        assert!(agent.stop().success());
    }
    let rate = 10_000.0;
    let events = (rate * sizes.open_secs) as usize;
    eprintln!("scaling: 10k devices at {rate} events/s");
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let mut agent = embedded(dir.path());
    let pid = agent.pid();
    let cpu0 = load::cpu_seconds(pid);
    let c0 = commits(&agent);
    let o = load::run(&Load {
        devices: 10_000,
        pace: Pace::Rate(rate),
        ..Load::new(agent.mqtt_port, events)
    });
    let cpu = load::cpu_seconds(pid) - cpu0;
    assert_eq!(agent.metric("edge_outbox_entries") as usize, events);
    row(
        "scaling: 10k devices at 10k/s",
        Some(o.rate()),
        Some(&o),
        Some(load::peak_rss_kib(pid)),
        Some(cpu / events as f64 * 10_000.0),
        &format!(
            "open loop, ~100 B, every device's state held; {}",
            per_commit(c0, commits(&agent))
        ),
    );
    assert!(agent.stop().success());
}

/// A backlog of `backlog` results with the uplink off: bytes on disk per event, start-up time
/// and RSS with it queued; then the uplink on (plain MQTT to a local mosquitto) and its drain.
fn outbox(scratch: &Path, backlog: usize) {
    eprintln!("outbox: filling a backlog of {backlog}");
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        bench_config(cfg);
        set(cfg, &["gateway_id"], "gw-bench".into());
    });
    let o = load::run(&Load::new(agent.mqtt_port, backlog));
    assert_eq!(agent.metric("edge_outbox_entries") as usize, backlog);
    let fill_rss = load::peak_rss_kib(agent.pid());
    assert!(agent.stop().success());
    let disk = e2e::dir_bytes(&dir.path().join("data"));
    row(
        &format!("outbox: fill {backlog} results"),
        Some(o.rate()),
        Some(&o),
        Some(fill_rss),
        None,
        &format!(
            "{:.0} disk bytes per event ({:.0} MB store)",
            disk as f64 / backlog as f64,
            disk as f64 / 1e6
        ),
    );

    // Start-up with the backlog queued (the store probe and open, to the ready line).
    let started = Instant::now();
    agent.restart();
    let startup = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss = load::peak_rss_kib(agent.pid());
    row(
        &format!("outbox: start-up with {backlog} queued"),
        None,
        None,
        Some(rss),
        None,
        &format!(
            "{:.2} s from spawn to ready (store probe + open)",
            startup.as_secs_f64()
        ),
    );
    assert!(agent.stop().success());

    // The cloud is back.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let mut cfg: toml::Table = text.parse().unwrap();
    set(&mut cfg, &["uplink", "enabled"], true.into());
    set(&mut cfg, &["uplink", "tls"], false.into());
    set(&mut cfg, &["uplink", "host"], "127.0.0.1".into());
    set(&mut cfg, &["uplink", "port"], i64::from(broker.port).into());
    std::fs::write(&agent.config, toml::to_string(&cfg).unwrap()).unwrap();
    let started = Instant::now();
    agent.restart();
    let pid = agent.pid();
    let cpu0 = load::cpu_seconds(pid);
    wait_for("the backlog to drain", Duration::from_secs(1800), || {
        agent.metric("edge_outbox_entries") == 0.0
    });
    let secs = started.elapsed().as_secs_f64();
    let cpu = load::cpu_seconds(pid) - cpu0;
    let bytes = agent.metric("edge_uplink_bytes_total");
    let batches = agent.metric("edge_uplink_batches_total");
    row(
        &format!("uplink: drain {backlog} to mosquitto"),
        Some(backlog as f64 / secs),
        None,
        Some(load::peak_rss_kib(pid)),
        Some(cpu / backlog as f64 * 10_000.0),
        &format!(
            "results/s from start; {:.1} MB/s CBOR, {batches} batches",
            bytes / secs / 1e6
        ),
    );
    assert!(agent.stop().success());
}
