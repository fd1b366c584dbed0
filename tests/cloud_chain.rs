//! The whole chain against real parts: `mosquitto_pub` devices → the real `edge-agent`
//! (embedded endpoint, engine, durable outbox and DLQ) → uplink over mutual TLS → a TLS
//! mosquitto as the cloud broker (certificates made at test time) → the real
//! `cloud-bridge run` → the AWS emulator (moto): S3, DynamoDB, and EventBridge with a rule that
//! forwards to an SQS queue the test reads.
//!
//! - `valid_events_arrive_once_with_their_results_invalid_ones_stay_in_the_dlq`: every valid
//!   reading is in S3 exactly once with the engine's derived fields (recomputed here), every
//!   invalid one is in the agent's DLQ and nowhere in the cloud, duplicates vanish, and each
//!   stored result was announced as EventProcessed.
//! - `a_cloud_outage_under_load_loses_nothing`: while devices keep publishing, the AWS link
//!   (a TCP proxy in front of a private moto) and the cloud broker go down and come back; the
//!   backlog drains in order and every acknowledged reading is in S3 exactly once.
//! - `uplink_batches_lost_in_flight_are_replayed`: the agent's fault hook sends a range of
//!   batches where nobody listens; the bridge notices the gap, asks for a replay, and the range
//!   arrives from the agent's replay window: nothing missing, nothing twice, no MissedEvents.
//! - `a_lost_tail_is_noticed_through_the_gateway_status`: the fault hook drops the *last*
//!   batches of a stream, so no later batch shows a gap; the gateway's status message
//!   (`released`) makes the bridge ask for the range, and it arrives: every event in S3 once.
//! - `a_device_gap_declared_missed_reaches_eventbridge_once`: device sequence gaps the agent
//!   declares missed (`missed_after_s = 1`) travel in its status message and come out of the
//!   EventBridge rule's queue as `MissedEvents` with `kind: device`, once per record id, also
//!   when the status is delivered again.
//! - `a_store_quarantine_reaches_eventbridge_and_failures_once`: a status carrying a store the
//!   gateway moved aside comes out as one `MissedEvents` with `kind: quarantine` and one
//!   object under `failures/`, also when it is delivered twice.
//!
//! Tests 1 and 3 use the shared emulator at `AWS_ENDPOINT_URL` (unique names per test); without
//! it they print SKIPPED. Test 2 starts its own moto from the venv `tests/aws-emulator.sh` makes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::aws::{AwsNames, TestAws, aws_endpoint};
use e2e::{Agent, Mosquitto, Moto, Pki, Publisher, TcpProxy, mosquitto_pub, set, wait_for};
use proto::EventResult;
use serde_json::{Value, json};

const SOURCE: &str = "iot.edge-pipeline";

// ---------------------------------------------------------------- AWS side

/// The shared AWS helper ([`TestAws`], async), driven from these synchronous tests through a
/// runtime of their own: `cloud.block_on(cloud.hwm(table, gw))`.
struct Cloud {
    rt: tokio::runtime::Runtime,
    aws: TestAws,
}

impl Cloud {
    fn new(endpoint: &str) -> Cloud {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let aws = rt.block_on(TestAws::new(endpoint));
        Cloud { rt, aws }
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

impl std::ops::Deref for Cloud {
    type Target = TestAws;

    fn deref(&self) -> &TestAws {
        &self.aws
    }
}

/// Asserts every result is in S3 once (by event_id and by edge_seq), that the edge_seqs are
/// exactly 1..=n, and that the objects hold contiguous ascending ranges (stored in order).
/// Returns the results by event_id.
fn assert_stored_once(stored: &[(String, EventResult)], n: u64) -> HashMap<String, EventResult> {
    let mut by_id = HashMap::new();
    let mut by_seq = BTreeMap::new();
    for (key, r) in stored {
        if let Some(prev) = by_seq.insert(r.edge_seq, key.clone()) {
            panic!("edge_seq {} stored twice: {prev} and {key}", r.edge_seq);
        }
        assert!(
            by_id.insert(r.event_id.clone(), r.clone()).is_none(),
            "event_id {} stored twice",
            r.event_id
        );
    }
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "every edge_seq once"
    );
    // Object keys are events/dt=…/gateway=…/{from:020}-{to:020}-{nonce}.ndjson: sorted, the
    // objects' ranges follow each other without a hole or an overlap.
    let mut next = 1;
    let mut ranges: Vec<(u64, u64)> = stored
        .iter()
        .map(|(key, _)| {
            let name = key.rsplit('/').next().unwrap();
            let mut parts = name.split('-');
            let from = parts.next().unwrap().parse().unwrap();
            let to = parts.next().unwrap().parse().unwrap();
            (from, to)
        })
        .collect();
    ranges.dedup();
    ranges.sort();
    for (from, to) in ranges {
        assert_eq!(from, next, "objects cover contiguous ranges");
        next = to + 1;
    }
    by_id
}

// ---------------------------------------------------------------- the bridge

fn bridge_config(
    dir: &Path,
    endpoint: &str,
    names: &AwsNames,
    broker: &Mosquitto,
    pki: &Pki,
) -> PathBuf {
    let (cert, key) = pki.issue("bridge-chain", false);
    let text = format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"bridge-chain\"\n\
         share_group = \"bridges\"\nkeep_alive_s = 5\nca = \"{ca}\"\ncert = \"{cert}\"\n\
         key = \"{key}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\
         shutdown_grace_ms = 5000\n\n\
         [aws]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nbucket = \"{bucket}\"\n\
         event_bus = \"{bus}\"\nsource = \"{SOURCE}\"\ntable = \"{table}\"\n\
         dlq_queue = \"{dlq}\"\n\n\
         [pipeline]\ngap_hold_ms = 500\ngap_recheck_ms = 50\nreplay_timeout_ms = 3000\n\
         replay_attempts = 5\nclaim_timeout_ms = 10000\n\n[metrics]\ninterval_s = 1\n",
        port = broker.tls_port.unwrap(),
        ca = pki.ca.display(),
        cert = cert.display(),
        key = key.display(),
        bucket = names.bucket,
        bus = names.bus,
        table = names.table,
        dlq = names.dlq,
    );
    let path = dir.join("cloud-bridge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `cloud-bridge provision --json` against `endpoint`; every resource is created.
fn provision(config: &Path, endpoint: &str) {
    let report = e2e::aws::provision(&e2e::cloud_bridge_bin(), config, Some(endpoint));
    for what in ["bucket", "event_bus", "table", "dlq_queue"] {
        assert_eq!(report[what]["state"], "created", "{what}: {report}");
    }
}

/// A running `cloud-bridge run`: logs on stderr, EMF metric lines on stdout. Killed on drop.
struct Bridge {
    child: Option<Child>,
    log: PathBuf,
    stdout: PathBuf,
}

impl Bridge {
    /// Starts it with `endpoint` as its AWS endpoint and waits for its subscription.
    fn start(dir: &Path, config: &Path, endpoint: &str) -> Bridge {
        let log = dir.join("cloud-bridge.log");
        let stdout = dir.join("cloud-bridge.stdout");
        let child = Command::new(e2e::cloud_bridge_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,cloud_bridge::service=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cloud-bridge");
        let mut b = Bridge {
            child: Some(child),
            log,
            stdout,
        };
        wait_for("the bridge's subscription", Duration::from_secs(30), || {
            if let Some(s) = b.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cloud-bridge exited ({s}):\n{}", b.log_text());
            }
            b.log_text().contains("subscribed")
        });
        b
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sums an EMF counter over the stdout lines.
    fn emf_sum(&self, name: &str) -> u64 {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v[name].as_u64())
            .sum()
    }

    /// SIGTERM and wait: it drains, acks, flushes its metrics and exits cleanly.
    fn stop(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "{status:?}\n{}", self.log_text());
    }

    fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("cloud-bridge did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- the edge

/// The agent's uplink to the cloud broker's TLS port, as gateway `gateway`.
fn uplink_to(cfg: &mut toml::Table, gateway: &str, broker: &Mosquitto, pki: &Pki) {
    // Long enough that a loaded machine never drops the link by itself (a reconnect re-sends
    // unacknowledged batches, which would shift the fault hook's batch count).
    e2e::uplink_to(cfg, gateway, broker, pki, true, 10);
}

/// One cloud: a TLS mosquitto (certificates made here) and the names of the AWS resources.
struct CloudSide {
    dir: tempfile::TempDir,
    pki: Pki,
    broker: Mosquitto,
    names: AwsNames,
}

impl CloudSide {
    fn new(tag: &str) -> CloudSide {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "cloud");
        let broker_dir = dir.path().join("broker");
        std::fs::create_dir_all(&broker_dir).unwrap();
        let broker = Mosquitto::start_tls(&broker_dir, &pki);
        CloudSide {
            dir,
            pki,
            broker,
            names: AwsNames::unique(tag),
        }
    }

    fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Provisions with the real binary (directly on `moto`) and starts the bridge with `aws`
    /// as its AWS endpoint (the same, or a proxy in front of it).
    fn bridge(&self, moto: &str, aws: &str) -> Bridge {
        let dir = self.subdir("bridge");
        let cfg = bridge_config(&dir, aws, &self.names, &self.broker, &self.pki);
        provision(&cfg, moto);
        Bridge::start(&dir, &cfg, aws)
    }

    fn agent(&self, gateway: &str, env: &[(&str, &str)]) -> Agent {
        self.agent_with(gateway, env, |_| {})
    }

    /// [`CloudSide::agent`] with more config changes.
    fn agent_with(
        &self,
        gateway: &str,
        env: &[(&str, &str)],
        tweak: impl FnOnce(&mut toml::Table),
    ) -> Agent {
        let dir = self.subdir("agent");
        Agent::embedded_with_env(&dir, env, |c| {
            uplink_to(c, gateway, &self.broker, &self.pki);
            tweak(c);
        })
    }
}

impl Drop for CloudSide {
    /// A failed test keeps its directory (configs, the broker's, bridge's and agent's logs);
    /// so does every test with `E2E_KEEP=1`.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("E2E_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {} for inspection", self.dir.path().display());
        }
    }
}

/// The agent's first `n` results were published and the broker acknowledged them all. (The
/// depth gauge alone can lag a device's PUBACK: the agent acks right after its commit and
/// updates the gauge a moment later.)
fn uplinked(agent: &Agent, n: u64) -> bool {
    agent.metric("edge_uplink_results_total") >= n as f64
        && agent.metric("edge_outbox_entries") == 0.0
}

/// A test on the shared emulator: its SDK clients, a cloud side, the running bridge, and the
/// queue behind a rule that captures the bridge's EventBridge events. None (after saying
/// SKIPPED) when `AWS_ENDPOINT_URL` is unset.
fn shared_chain(tag: &str) -> Option<(Cloud, CloudSide, Bridge, String)> {
    let endpoint = aws_endpoint()?;
    let cloud = Cloud::new(&endpoint);
    let side = CloudSide::new(tag);
    let bridge = side.bridge(&endpoint, &endpoint);
    let queue = cloud.block_on(cloud.capture_events(&side.names.bus, SOURCE));
    Some((cloud, side, bridge, queue))
}

/// The event_ids of the EventProcessed events among `events`.
fn processed_ids(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["detail-type"] == "EventProcessed")
        .map(|e| e["detail"]["event_id"].as_str().unwrap().to_string())
        .collect()
}

/// Reads the capture queue until every event_id of `want` was announced as EventProcessed (or
/// a minute has passed).
fn wait_processed(cloud: &Cloud, queue: &str, want: &BTreeSet<String>) -> Vec<Value> {
    cloud.block_on(cloud.read_events(queue, Duration::from_secs(60), |ev| {
        processed_ids(ev).len() >= want.len()
    }))
}

// ---------------------------------------------------------------- 1. the chain

const T0: i64 = 1_764_000_000_000;

fn reading(id: &str, seq: u64, data: Value) -> Vec<u8> {
    json!({ "id": id, "seq": seq, "ts": T0 + seq as i64 * 60_000, "data": data })
        .to_string()
        .into_bytes()
}

/// What a valid reading must come out as (the engine's maths redone here).
struct Expected {
    device: &'static str,
    event_type: &'static str,
    seq: u64,
    first: bool,
    result: Vec<(&'static str, Value)>,
}

#[test]
fn valid_events_arrive_once_with_their_results_invalid_ones_stay_in_the_dlq() {
    let Some((cloud, side, mut bridge, queue)) = shared_chain("e2e") else {
        return;
    };
    let gw = "gw-chain";
    let mut agent = side.agent(gw, &[]);

    // (device, type, seq, data, valid). Readings go one at a time (mosquitto_pub waits for
    // the agent's PUBACK), so the engine sees them in this order.
    let meter =
        |kwh: f64, v: f64, a: f64| json!({"energy_kwh": kwh, "voltage_v": v, "current_a": a});
    let env = |t: f64, h: f64| json!({"temperature_c": t, "humidity_pct": h});
    let plan: Vec<(&str, &str, u64, Value, bool)> = vec![
        ("meter-1", "meter", 1, meter(100.0, 230.0, 4.0), true),
        ("meter-2", "meter", 1, meter(50.0, 231.0, 2.5), true),
        ("env-1", "environment", 1, env(21.5, 55.0), true),
        ("meter-1", "meter", 2, meter(100.25, 229.0, 5.0), true),
        ("meter-2", "meter", 2, meter(50.5, 232.0, 3.0), true),
        ("meter-1", "meter", 3, meter(100.75, 230.0, 4.5), true),
        // Invalid: above the voltage field's max (schema).
        ("meter-1", "meter", 4, meter(100.9, 900.0, 4.0), false),
        // Invalid: the kWh register went backwards (rule counter_monotonic).
        ("meter-2", "meter", 3, meter(49.0, 230.0, 3.0), false),
        ("env-1", "environment", 2, env(22.0, 60.0), true),
        // Invalid: 0 % humidity (rule humidity_measurable).
        ("env-1", "environment", 3, env(22.0, 0.0), false),
        ("meter-1", "meter", 5, meter(101.0, 230.0, 4.0), true),
        ("meter-2", "meter", 4, meter(50.75, 230.0, 3.5), true),
        ("env-1", "environment", 4, env(19.0, 90.0), true),
        ("meter-1", "meter", 6, meter(101.5, 228.0, 6.0), true),
    ];
    let topic = |device: &str, ty: &str| format!("devices/{device}/events/{ty}");
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let mut invalid_ids = Vec::new();
    // The previous valid reading per device: (ts, data).
    let mut prev: HashMap<&str, (i64, Value)> = HashMap::new();
    let mut payloads = HashMap::new();
    for (device, ty, seq, data, valid) in &plan {
        let id = format!("r{seq}");
        let payload = reading(&id, *seq, data.clone());
        mosquitto_pub(agent.mqtt_port, &topic(device, ty), &payload, 1);
        payloads.insert((*device, *seq), payload);
        let event_id = format!("{device}/{id}");
        if !valid {
            invalid_ids.push(event_id);
            continue;
        }
        let ts = T0 + *seq as i64 * 60_000;
        let p = prev.get(device).cloned();
        let f = |k: &str| data[k].as_f64().unwrap();
        let result = if *ty == "meter" {
            let (dt_s, delta) = match &p {
                Some((pts, pd)) => (
                    (ts - pts) as f64 / 1000.0,
                    f("energy_kwh") - pd["energy_kwh"].as_f64().unwrap(),
                ),
                None => (0.0, 0.0),
            };
            let avg = if dt_s > 0.0 {
                delta / dt_s * 3_600_000.0
            } else {
                0.0
            };
            vec![
                ("consumption_kwh", json!(delta)),
                ("power_w", json!(f("voltage_v") * f("current_a"))),
                ("avg_power_w", json!(avg)),
                (
                    "cost_eur",
                    json!((delta * 0.28 * 10_000.0).round() / 10_000.0),
                ),
            ]
        } else {
            let (t, h) = (f("temperature_c"), f("humidity_pct"));
            let gamma = (h / 100.0).ln() + 17.62 * t / (243.12 + t);
            let dew = 243.12 * gamma / (17.62 - gamma);
            let trend = match &p {
                Some((pts, pd)) => {
                    (t - pd["temperature_c"].as_f64().unwrap()) / ((ts - pts) as f64 / 1000.0)
                        * 3600.0
                }
                None => 0.0,
            };
            vec![
                ("dew_point_c", json!(dew)),
                ("dew_point_spread_c", json!(t - dew)),
                ("condensation_risk", json!(t - dew < 2.0)),
                ("temperature_trend_c_per_h", json!(trend)),
            ]
        };
        expected.insert(
            event_id,
            Expected {
                device,
                event_type: ty,
                seq: *seq,
                first: p.is_none(),
                result,
            },
        );
        prev.insert(*device, (ts, data.clone()));
    }
    // Invalid: not JSON (decode), and a device the meter type does not allow.
    mosquitto_pub(agent.mqtt_port, &topic("meter-3", "meter"), b"{not json", 1);
    mosquitto_pub(
        agent.mqtt_port,
        &topic("pump-1", "meter"),
        &reading("r1", 1, meter(1.0, 230.0, 1.0)),
        1,
    );
    invalid_ids.push("pump-1/r1".into());
    // Duplicates: QoS 1 redeliveries of readings already taken.
    mosquitto_pub(
        agent.mqtt_port,
        &topic("meter-1", "meter"),
        &payloads[&("meter-1", 2)],
        1,
    );
    mosquitto_pub(
        agent.mqtt_port,
        &topic("env-1", "environment"),
        &payloads[&("env-1", 1)],
        1,
    );
    let n = expected.len() as u64;
    assert_eq!(n, 11);

    wait_for("the outbox to drain", Duration::from_secs(30), || {
        uplinked(&agent, n)
    });
    cloud.block_on(cloud.wait_hwm(&side.names.table, gw, n, Duration::from_secs(60)));
    let want_ids: BTreeSet<String> = expected.keys().cloned().collect();
    let events = wait_processed(&cloud, &queue, &want_ids);
    // The bridge drains, acks and exits cleanly; nothing more is stored after that.
    bridge.stop();
    assert!(agent.stop().success());

    // S3: every valid reading once, with the engine's derived fields.
    let stored = assert_stored_once(&cloud.block_on(cloud.stored(&side.names.bucket)), n);
    assert_eq!(
        stored.keys().cloned().collect::<BTreeSet<_>>(),
        want_ids,
        "exactly the valid readings are in S3"
    );
    for (event_id, want) in &expected {
        let r = &stored[event_id];
        assert_eq!(r.device, want.device, "{event_id}");
        assert_eq!(r.event_type, want.event_type, "{event_id}");
        assert_eq!(r.seq, want.seq, "{event_id}");
        assert_eq!(r.ts, T0 + want.seq as i64 * 60_000, "{event_id}");
        assert_eq!(r.gateway, gw);
        assert_eq!(r.status, proto::Status::Ok, "{event_id}: {r:?}");
        assert_eq!(
            r.flags.iter().any(|f| f == "first_reading"),
            want.first,
            "{event_id}: {:?}",
            r.flags
        );
        assert!(r.calc_version.starts_with(want.event_type), "{event_id}");
        for (field, value) in &want.result {
            let got = &r.result[*field];
            match (got.as_f64(), value.as_f64()) {
                (Some(g), Some(w)) => assert!(
                    (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                    "{event_id}.{field}: {g} != {w}"
                ),
                _ => assert_eq!(got, value, "{event_id}.{field}"),
            }
        }
    }
    // The results keep the order the agent committed them in (= the publish order here).
    let mut by_seq: Vec<&EventResult> = stored.values().collect();
    by_seq.sort_by_key(|r| r.edge_seq);
    let order: Vec<(String, u64)> = by_seq.iter().map(|r| (r.device.clone(), r.seq)).collect();
    let published: Vec<(String, u64)> = plan
        .iter()
        .filter(|p| p.4)
        .map(|p| (p.0.to_string(), p.2))
        .collect();
    assert_eq!(order, published);
    assert!(
        cloud
            .block_on(cloud.objects(&side.names.bucket, "failures/"))
            .is_empty(),
        "nothing dead-lettered in the cloud"
    );

    // The invalid readings are in the agent's DLQ with their stage, and only there.
    let dlq = agent.dlq();
    assert_eq!(dlq.len(), 5, "{dlq:#?}");
    let stage_of = |event_id: &str| {
        dlq.iter()
            .find(|e| e["event_id"] == event_id)
            .unwrap_or_else(|| panic!("{event_id} not in the DLQ: {dlq:#?}"))["stage"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(stage_of("meter-1/r4"), "schema");
    assert_eq!(stage_of("meter-2/r3"), "rule");
    assert_eq!(stage_of("env-1/r3"), "rule");
    stage_of("pump-1/r1");
    assert!(
        dlq.iter()
            .any(|e| e["stage"] == "decode" && e["topic"] == "devices/meter-3/events/meter"),
        "{dlq:#?}"
    );
    for id in &invalid_ids {
        assert!(!stored.contains_key(id), "{id} reached S3");
    }

    // EventBridge → SQS: an EventProcessed for every stored result (at-least-once: repeats
    // are allowed, strangers are not).
    assert_eq!(
        processed_ids(&events),
        want_ids,
        "EventProcessed for every valid reading"
    );
    for e in &events {
        assert_eq!(e["source"], SOURCE);
        assert!(
            !["MissedEvents", "EventDeadLettered"].contains(&e["detail-type"].as_str().unwrap()),
            "{e}"
        );
    }
    assert_eq!(bridge.emf_sum("processed"), n);
    assert_eq!(bridge.emf_sum("decode_errors"), 0);
}

// ---------------------------------------------------------------- 2. the outage

/// Devices that keep publishing until told to stop: round after round of readings of three
/// meters, each round waiting for all its PUBACKs (it reconnects and resends as a device does).
struct Devices {
    stop: Arc<AtomicBool>,
    /// Readings acknowledged so far.
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Devices {
    fn start(port: u16) -> Devices {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, count) = (stop.clone(), count.clone());
            move || {
                let mut acked = Vec::new();
                let mut p = Publisher::new(port, "load");
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let mut round = Vec::new();
                    let mut ids = Vec::new();
                    for _ in 0..10 {
                        seq += 1;
                        for d in 1..=3u16 {
                            let kwh = 1000.0 + seq as f64 * 0.01 * f64::from(d);
                            round.push((
                                u16::try_from(round.len() + 1).unwrap(),
                                format!("devices/meter-{d}/events/meter"),
                                e2e::meter(&format!("r{seq}"), seq, kwh),
                            ));
                            ids.push(format!("meter-{d}/r{seq}"));
                        }
                    }
                    p.publish_all(round, 30, Duration::from_secs(60), |_| {});
                    acked.extend(ids);
                    count.store(acked.len() as u64, Ordering::SeqCst);
                    // A steady rate rather than a flood: 2 cores are shared with other tests.
                    std::thread::sleep(Duration::from_millis(100));
                }
                acked
            }
        });
        Devices {
            stop,
            acked: count,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops after the current round; the event_ids of every acknowledged reading.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("devices")
    }
}

#[test]
fn a_cloud_outage_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A private emulator: the shared one stays untouched. The bridge reaches it through a
    // proxy the test cuts (the emulator keeps its state in memory: stopping it would lose the
    // bucket and the table, which an AWS outage does not).
    let Some(moto) = Moto::start(dir.path()) else {
        return;
    };
    let proxy = TcpProxy::start(moto.port);
    let cloud = Cloud::new(&moto.url());
    let mut side = CloudSide::new("outage");
    let mut bridge = side.bridge(&moto.url(), &proxy.url());
    let gw = "gw-outage";
    let mut agent = side.agent(gw, &[]);

    let devices = Devices::start(agent.mqtt_port);
    wait_for("results in the cloud", Duration::from_secs(60), || {
        cloud.block_on(cloud.hwm(&side.names.table, gw)) >= 30
    });

    // AWS goes away: the bridge cannot store, holds what it has unacked and retries.
    proxy.cut();
    wait_for(
        "the bridge to retry in vain",
        Duration::from_secs(60),
        || bridge.log_text().matches("storing failed").count() >= 3,
    );
    let hwm_at_cut = cloud.block_on(cloud.hwm(&side.names.table, gw));
    // Then the cloud broker: the uplink loses its link and the outbox grows.
    side.broker.stop();
    wait_for("the uplink to notice", Duration::from_secs(30), || {
        agent.metric("edge_uplink_connected") == 0.0
    });
    let at_cut = agent.metric("edge_outbox_entries");
    let backlog = at_cut + 300.0;
    wait_for("a backlog on the gateway", Duration::from_secs(60), || {
        agent.metric("edge_outbox_entries") >= backlog
    });
    // The broker comes back first: the gateway drains into it while AWS is still away, so
    // the broker queues for the bridge's persistent session.
    side.broker.restart();
    wait_for(
        "the backlog to reach the broker",
        Duration::from_secs(60),
        || {
            agent.metric("edge_uplink_connected") == 1.0
                && agent.metric("edge_outbox_entries") <= 60.0
        },
    );
    let hwm_in_outage = cloud.block_on(cloud.hwm(&side.names.table, gw));
    assert_eq!(
        hwm_in_outage, hwm_at_cut,
        "nothing stored while AWS was unreachable"
    );
    proxy.restore();

    // The devices keep publishing until everything acknowledged before the recovery is
    // stored. (mosquitto drops what the gateway publishes after the restart and before the
    // bridge's `$share` subscription is back; it shows as a gap only when a later batch
    // arrives, or at the gateway's next status message (every 30 s by default), and the
    // bridge then asks for a replay: see README, "Tests". The steady load keeps it quick.)
    let produced = devices.acked();
    wait_for(
        "the outage's backlog to be stored",
        Duration::from_secs(120),
        || cloud.block_on(cloud.hwm(&side.names.table, gw)) >= produced,
    );
    let acked = devices.finish();
    let n = acked.len() as u64;
    wait_for(
        "the backlog to leave the gateway",
        Duration::from_secs(60),
        || uplinked(&agent, n),
    );
    cloud.block_on(cloud.wait_hwm(&side.names.table, gw, n, Duration::from_secs(120)));
    bridge.stop();

    let stored = assert_stored_once(&cloud.block_on(cloud.stored(&side.names.bucket)), n);
    let want: BTreeSet<String> = acked.into_iter().collect();
    assert_eq!(want.len() as u64, n);
    assert_eq!(
        stored.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "every acknowledged reading's result is in S3"
    );
    // Each meter's readings were stored in the order it sent them.
    let mut by_seq: Vec<&EventResult> = stored.values().collect();
    by_seq.sort_by_key(|r| r.edge_seq);
    let mut last: HashMap<&str, u64> = HashMap::new();
    for r in by_seq {
        let l = last.entry(&r.device).or_default();
        assert!(r.seq > *l, "{} seq {} after {}", r.device, r.seq, l);
        *l = r.seq;
    }
    assert!(bridge.emf_sum("aws_errors") > 0, "the outage was felt");
    // The broker kept the bridge's session (and what it had not acknowledged) across its
    // restart, as a cloud broker does.
    assert!(
        bridge.log_text().contains("session_present=true"),
        "{}",
        bridge.log_text()
    );
    assert_eq!(bridge.emf_sum("missed_events"), 0);
    assert!(agent.metric("edge_uplink_reconnects_total") >= 1.0);
    assert!(agent.stop().success());
    assert!(agent.dlq().is_empty());
    eprintln!(
        "outage: {n} readings, {hwm_in_outage} stored before AWS came back, backlog on the \
         gateway >= {backlog}; bridge: {} AWS errors, {} replays requested, {} S3 objects",
        bridge.emf_sum("aws_errors"),
        bridge.emf_sum("replays_requested"),
        bridge.emf_sum("s3_objects"),
    );
}

// ---------------------------------------------------------------- 3. replay

/// `field=N` in a tracing text log line (ANSI colours or not).
fn field(line: &str, name: &str) -> Option<u64> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let line = plain.as_str();
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Publishes `waves` waves of `per_wave` readings of meter-1 (seqs 1, 2, ... throughout), all
/// of a wave in flight at once; the waves stay apart: each leaves the gateway before the next
/// one is published. Returns how many readings were published.
fn publish_waves(agent: &Agent, waves: u64, per_wave: u64) -> u64 {
    for w in 0..waves {
        let messages = (1..=per_wave)
            .map(|i| {
                let seq = w * per_wave + i;
                (
                    u16::try_from(i).unwrap(),
                    "devices/meter-1/events/meter".to_string(),
                    e2e::meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.1),
                )
            })
            .collect();
        Publisher::new(agent.mqtt_port, &format!("meter-1-w{w}")).publish_all(
            messages,
            usize::try_from(per_wave).unwrap(),
            Duration::from_secs(60),
            |_| {},
        );
        wait_for(
            "the wave to leave the gateway",
            Duration::from_secs(30),
            || uplinked(agent, (w + 1) * per_wave),
        );
    }
    waves * per_wave
}

/// The (`first`, `last`) fields of the log lines that contain `needle`: the ranges the agent's
/// fault hook diverted, or those the bridge asked the gateway to replay.
fn logged_ranges(log: &str, needle: &str, [first, last]: [&str; 2]) -> Vec<(u64, u64)> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(|l| (field(l, first).unwrap(), field(l, last).unwrap()))
        .collect()
}

/// The end of a replay test: waits until meter-1's readings 1..=n were all announced as
/// EventProcessed, stops the bridge, and asserts each is in S3 once, the bridge asked for a
/// replay, gave no range up, and no MissedEvents came out. The events read and the event_ids.
fn assert_replayed_in_full(
    cloud: &Cloud,
    side: &CloudSide,
    bridge: &mut Bridge,
    queue: &str,
    n: u64,
) -> (Vec<Value>, BTreeSet<String>) {
    let want_ids: BTreeSet<String> = (1..=n).map(|s| format!("meter-1/r{s}")).collect();
    let events = wait_processed(cloud, queue, &want_ids);
    bridge.stop();

    let stored = assert_stored_once(&cloud.block_on(cloud.stored(&side.names.bucket)), n);
    assert_eq!(stored.keys().cloned().collect::<BTreeSet<_>>(), want_ids);
    assert!(bridge.emf_sum("replays_requested") >= 1);
    assert_eq!(bridge.emf_sum("missed_events"), 0, "no range given up");
    assert!(
        !events.iter().any(|e| e["detail-type"] == "MissedEvents"),
        "no MissedEvents: {events:#?}"
    );
    (events, want_ids)
}

#[test]
fn uplink_batches_lost_in_flight_are_replayed() {
    let Some((cloud, side, mut bridge, queue)) = shared_chain("replay") else {
        return;
    };
    let gw = "gw-replay";
    // The 2nd and 3rd batches go where nobody listens, but the broker acknowledges them.
    let mut agent = side.agent(gw, &[("EDGE_AGENT_FAULT_DROP_UPLINK", "2..3")]);

    // Four waves, each sent after the previous one left the outbox: at least four batches,
    // so at least one arrives after the lost ones and shows the gap.
    let n = publish_waves(&agent, 4, 25);

    // The lost range, from the agent's fault-hook lines.
    let lost = logged_ranges(&agent.log_text(), "fault hook", ["first", "last"]);
    assert_eq!(lost.len(), 2, "{}", agent.log_text());
    assert_eq!(lost[0].1 + 1, lost[1].0, "two consecutive batches");
    let (from, to) = (lost[0].0, lost[1].1);
    assert!(to < n);

    cloud.block_on(cloud.wait_hwm(&side.names.table, gw, n, Duration::from_secs(60)));
    let requests = logged_ranges(&bridge.log_text(), "requested a replay", ["from", "to"]);
    assert_eq!(
        requests.first(),
        Some(&(from, to)),
        "the bridge asked for exactly the lost range: {requests:?}"
    );
    assert!(
        agent.log_text().contains("cloud asked for a replay"),
        "{}",
        agent.log_text()
    );
    let (events, want_ids) = assert_replayed_in_full(&cloud, &side, &mut bridge, &queue, n);
    assert_eq!(bridge.emf_sum("gaps"), 1);
    assert_eq!(processed_ids(&events), want_ids);
    assert!(agent.metric("edge_replay_requests_total") >= 1.0);
    assert_eq!(agent.metric("edge_replay_unavailable_total"), 0.0);
    assert!(agent.stop().success());
}

// ---------------------------------------------------------------- 4. the lost tail

#[test]
fn a_lost_tail_is_noticed_through_the_gateway_status() {
    let started = Instant::now();
    let Some((cloud, side, mut bridge, queue)) = shared_chain("tail") else {
        return;
    };
    let gw = "gw-tail";
    // Every batch after the first goes where nobody listens (acknowledged by the broker): the
    // end of the stream is lost in flight and no later batch will ever reveal the gap.
    let mut agent = side.agent_with(gw, &[("EDGE_AGENT_FAULT_DROP_UPLINK", "2..1000000")], |c| {
        set(c, &["uplink", "status_interval_s"], 1.into());
    });
    let n = publish_waves(&agent, 2, 20);
    // What was lost: the batches the fault hook diverted, up to the very last result.
    let lost = logged_ranges(&agent.log_text(), "fault hook", ["first", "last"]);
    assert!(!lost.is_empty(), "{}", agent.log_text());
    assert_eq!(lost.last().unwrap().1, n, "the tail is lost: {lost:?}");
    let first_lost = lost[0].0;
    assert!(first_lost > 1, "the first batch arrived: {lost:?}");

    cloud.block_on(cloud.wait_hwm(&side.names.table, gw, n, Duration::from_secs(60)));
    let requests = logged_ranges(&bridge.log_text(), "requested a replay", ["from", "to"]);
    assert_eq!(
        requests.first().map(|r| r.0),
        Some(first_lost),
        "the bridge asked for the lost tail: {requests:?}"
    );
    assert!(requests.iter().all(|r| r.1 <= n), "{requests:?}");
    assert_replayed_in_full(&cloud, &side, &mut bridge, &queue, n);
    assert!(bridge.emf_sum("gaps") >= 1);
    assert!(agent.metric("edge_uplink_status_total") >= 1.0);
    assert!(agent.metric("edge_replay_requests_total") >= 1.0);
    assert_eq!(agent.metric("edge_replay_unavailable_total"), 0.0);
    assert!(agent.stop().success());
    eprintln!(
        "tail: {n} results, lost {lost:?}, replays {requests:?}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- 5. device gaps

#[test]
fn a_device_gap_declared_missed_reaches_eventbridge_once() {
    let started = Instant::now();
    let Some((cloud, side, mut bridge, queue)) = shared_chain("devgap") else {
        return;
    };
    let gw = "gw-devgap";
    let mut agent = side.agent_with(gw, &[], |c| {
        set(c, &["uplink", "status_interval_s"], 1.into());
        set(c, &["pipeline", "missed_after_s"], 1.into());
    });
    // meter-1 skips 3..=4, meter-2 skips 2: two records once a second has passed.
    let topic = "devices/meter-1/events/meter";
    for seq in [1u64, 2, 5] {
        let payload = e2e::meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.1);
        mosquitto_pub(agent.mqtt_port, topic, &payload, 1);
    }
    for seq in [1u64, 3] {
        let payload = e2e::meter(&format!("r{seq}"), seq, 500.0 + seq as f64 * 0.1);
        mosquitto_pub(agent.mqtt_port, "devices/meter-2/events/meter", &payload, 1);
    }
    let missed = |ev: &[Value]| -> Vec<Value> {
        ev.iter()
            .filter(|e| e["detail-type"] == "MissedEvents")
            .map(|e| e["detail"].clone())
            .collect()
    };
    let mut events = cloud
        .block_on(cloud.read_events(&queue, Duration::from_secs(60), |ev| missed(ev).len() >= 2));
    let records = missed(&events);
    assert_eq!(records.len(), 2, "{events:#?}");
    let by_device: BTreeMap<String, Value> = records
        .iter()
        .map(|r| (r["device"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    let m1 = &by_device["meter-1"];
    assert_eq!(m1["kind"], "device");
    assert_eq!(m1["gateway"], gw);
    assert_eq!(
        (m1["first_seq"].as_u64(), m1["last_seq"].as_u64()),
        (Some(3), Some(4))
    );
    assert_eq!(m1["count"], 2);
    assert_eq!(m1["ranges"], json!([{"first": 3, "last": 4}]));
    assert!(m1["declared_at"].as_i64().unwrap() > T0);
    let m2 = &by_device["meter-2"];
    assert_eq!(
        (m2["first_seq"].as_u64(), m2["count"].as_u64()),
        (Some(2), Some(1))
    );
    assert_ne!(m1["id"], m2["id"]);
    // The agent marked them reported (the broker acknowledged the status that carried them).
    wait_for(
        "the records marked reported",
        Duration::from_secs(30),
        || agent.metric("edge_missed_reported_total") >= 2.0,
    );

    // A redelivery of a status with the same records (as after a bridge crash, or to another
    // bridge of the group) announces nothing again.
    let again = json!({
        "gateway": gw, "released": 0, "at": 1,
        "missed": records.iter().map(|r| json!({
            "id": r["id"], "device": r["device"], "first_seq": r["first_seq"],
            "last_seq": r["last_seq"], "count": r["count"], "ranges": r["ranges"],
            "declared_at": r["declared_at"],
        })).collect::<Vec<_>>(),
    });
    let before = bridge.log_text().matches("was announced before").count();
    mosquitto_pub(
        side.broker.port,
        &format!("gateways/{gw}/status"),
        again.to_string().as_bytes(),
        1,
    );
    wait_for("the redelivery handled", Duration::from_secs(30), || {
        bridge.log_text().matches("was announced before").count() >= before + 2
    });
    // Whatever else reaches the queue in the next seconds (statuses keep coming every second).
    events.extend(cloud.block_on(cloud.read_events(&queue, Duration::from_secs(4), |_| false)));
    let ids: Vec<u64> = missed(&events)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "each record exactly once: {events:#?}");
    // The results themselves all arrived.
    cloud.block_on(cloud.wait_hwm(&side.names.table, gw, 5, Duration::from_secs(30)));
    bridge.stop();
    assert_eq!(bridge.emf_sum("missed_records_announced"), 2);
    assert_eq!(
        bridge.emf_sum("missed_events"),
        0,
        "no edge_seq range missed"
    );
    assert!(agent.stop().success());
    assert!(agent.dlq().is_empty(), "{:#?}", agent.dlq());
    eprintln!("device gaps: {:.1} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------- 6. store quarantines

#[test]
fn a_store_quarantine_reaches_eventbridge_and_failures_once() {
    let Some((cloud, side, mut bridge, queue)) = shared_chain("quarantine") else {
        return;
    };
    let gw = "gw-quarantine";
    // What an agent sends after it moved a damaged store aside (edge_damaged_store.rs shows
    // the agent's side), delivered twice: a redelivery must not announce it again.
    let status = json!({
        "gateway": gw, "released": 0, "at": 1,
        "missed": [],
        "quarantines": [{
            "at": 1_764_064_800_000_i64,
            "moved_to": "/var/lib/edge-agent/quarantine/20251125T100000Z/store",
            "reason": "store check exited 1: committed records are missing",
        }],
    });
    let publish = || {
        mosquitto_pub(
            side.broker.port,
            &format!("gateways/{gw}/status"),
            status.to_string().as_bytes(),
            1,
        )
    };
    publish();
    wait_for("the quarantine announced", Duration::from_secs(60), || {
        bridge.log_text().contains("moved a damaged store aside")
    });
    publish();
    let quarantines = |ev: &[Value]| -> Vec<Value> {
        ev.iter()
            .filter(|e| e["detail-type"] == "MissedEvents" && e["detail"]["kind"] == "quarantine")
            .map(|e| e["detail"].clone())
            .collect()
    };
    wait_for("the redelivery handled", Duration::from_secs(60), || {
        bridge
            .log_text()
            .contains("store quarantine was announced before")
    });
    let events = cloud.block_on(cloud.read_events(&queue, Duration::from_secs(10), |ev| {
        quarantines(ev).len() >= 2
    }));
    let found = quarantines(&events);
    assert_eq!(found.len(), 1, "exactly once: {events:#?}");
    let q = &found[0];
    assert_eq!(q["gateway"], gw);
    assert_eq!(q["at"], 1_764_064_800_000_i64);
    assert!(
        q["action"].as_str().unwrap().contains("store salvage"),
        "{q}"
    );
    let key = q["object_key"].as_str().unwrap();
    assert_eq!(
        key,
        format!("failures/dt=2025-11-25/gateway={gw}/quarantine-1764064800000.json")
    );
    let objects = cloud.block_on(cloud.objects(&side.names.bucket, "failures/"));
    let stored: Value = serde_json::from_str(&objects[key]).unwrap();
    assert_eq!(stored["moved_to"], q["moved_to"]);
    bridge.stop();
    assert_eq!(bridge.emf_sum("quarantines_announced"), 1);
}
