//! The anomaly model end to end: synthetic history of two event types (normal readings, some
//! labelled `anomaly` or flagged, and unlabelled anomalies injected into a later day) written
//! as the bridge writes `events/` objects; `train` on the earlier days, `scan` of the later one,
//! recall and precision on the injected anomalies. Against the local backend (a tempdir) and
//! against S3 on the moto emulator (`AWS_ENDPOINT_URL`), through the library and the binary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use cloud_bridge::anomaly::history::DateRange;
use cloud_bridge::anomaly::model::FitParams;
use cloud_bridge::anomaly::progress::Progress;
use cloud_bridge::anomaly::scan::{ScanOptions, ScanReport, scan};
use cloud_bridge::anomaly::train::{TrainOptions, train};
use cloud_bridge::anomaly::{AnomalyModels, TypeModel};
use cloud_bridge::backend::{EventPublisher, ObjectStore};
use cloud_bridge::layout::model as model_key;
use proto::{EventResult, Status};
use serde_json::{Value, json};

const TRAIN_DAYS: [&str; 3] = ["2026-11-01", "2026-11-02", "2026-11-03"];
const SCAN_DAY: &str = "2026-11-04";
/// Normal readings per type, per day and gateway.
const NORMAL: usize = 150;
/// Injected (unlabelled) anomalies per type and gateway on the scan day.
const INJECTED: usize = 8;
const GATEWAYS: [&str; 2] = ["gw-a", "gw-b"];

/// xorshift64* with Box–Muller normals: the same history on every run.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.uniform()
    }
    fn normal(&mut self, mean: f64, std: f64) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        mean + std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn map(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// A meter reading (config/edge-agent.toml's `meter`): the cumulative register (excluded from
/// the features), voltage, current, power factor; consumption over the minute since the last
/// reading, power, average power, cost. `kind` > 0 makes it anomalous.
fn meter(rng: &mut Rng, register: &mut f64, kind: u32) -> (Value, Value) {
    let mut v = rng.normal(230.0, 3.0);
    let mut i = rng.normal(10.0, 1.5).max(0.5);
    let pf = rng.range(0.92, 1.0);
    match kind {
        1 => i = rng.range(24.0, 30.0),   // current spike
        2 => v = rng.range(180.0, 195.0), // voltage sag
        _ => {}
    }
    let power = v * i * pf;
    let mut kwh = power * 60.0 / 3_600_000.0 * rng.range(0.97, 1.03);
    if kind == 3 {
        kwh *= rng.range(3.0, 5.0); // the register jumped: consumption does not fit the power
    }
    *register += kwh;
    let input = json!({"energy_kwh": *register, "voltage_v": v, "current_a": i, "power_factor": pf, "relay": "on"});
    let result = json!({
        "consumption_kwh": kwh, "power_w": power, "avg_power_w": kwh * 60_000.0,
        "cost_eur": (kwh * 0.28 * 10000.0).round() / 10000.0
    });
    (input, result)
}

/// An environment reading: temperature, humidity, pressure, battery → dew point (Magnus).
fn environment(rng: &mut Rng, kind: u32) -> (Value, Value) {
    let mut t = rng.normal(21.0, 1.5);
    let mut h = rng.normal(45.0, 5.0);
    let p = rng.normal(1013.0, 4.0);
    let mut b = rng.normal(3.6, 0.04);
    match kind {
        1 => t = rng.range(33.0, 38.0), // heat
        2 => h = rng.range(88.0, 95.0), // condensation
        3 => b = rng.range(2.9, 3.1),   // battery failing
        _ => {}
    }
    let g = (h / 100.0).ln() + 17.62 * t / (243.12 + t);
    let mut dp = 243.12 * g / (17.62 - g);
    if kind == 4 {
        dp += rng.range(5.0, 7.0); // a wrong dew point for these inputs
    }
    let input = json!({"temperature_c": t, "humidity_pct": h, "pressure_hpa": p, "battery_v": b});
    let result = json!({"dew_point_c": dp, "dew_point_spread_c": t - dp});
    (input, result)
}

/// The synthetic history: `events/` objects (key → NDJSON) and the injected anomalies' ids.
struct History {
    objects: BTreeMap<String, Vec<u8>>,
    injected: BTreeSet<String>,
    /// Scan-day results per type.
    scan_day: BTreeMap<String, usize>,
}

fn day_ms(day: &str) -> i64 {
    let d = time::Date::parse(
        day,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .unwrap();
    d.midnight().assume_utc().unix_timestamp() * 1000
}

fn history(prefix: &str) -> History {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut objects = BTreeMap::new();
    let mut injected = BTreeSet::new();
    let mut scan_day = BTreeMap::new();
    let mut registers = [0.0f64; 10];
    for gw in GATEWAYS {
        let mut edge_seq = 0u64;
        for day in TRAIN_DAYS.iter().chain([&SCAN_DAY]) {
            let scanning = *day == SCAN_DAY;
            // (type, kind, status, flags) of each record of the day, shuffled by position.
            let mut plan: Vec<(&str, u32, Status, Vec<String>)> = Vec::new();
            for t in ["meter", "environment"] {
                plan.extend((0..NORMAL).map(|_| (t, 0, Status::Ok, vec![])));
                if scanning {
                    let kinds = if t == "meter" { 3 } else { 4 };
                    plan.extend(
                        (0..INJECTED).map(|i| (t, 1 + i as u32 % kinds, Status::Ok, vec![])),
                    );
                } else {
                    // Known anomalies and flagged readings: left out of training.
                    plan.extend((0..3).map(|i| (t, 1 + i as u32, Status::Anomaly, vec![])));
                    plan.extend((0..3).map(|_| (t, 1, Status::Ok, vec!["late".to_string()])));
                }
            }
            for i in (1..plan.len()).rev() {
                let j = (rng.uniform() * (i + 1) as f64) as usize;
                plan.swap(i, j.min(i));
            }
            let base = day_ms(day);
            let step = 86_400_000 / plan.len() as i64;
            let mut records = Vec::new();
            for (n, (t, kind, status, flags)) in plan.into_iter().enumerate() {
                edge_seq += 1;
                let dev_n = (edge_seq % 10) as usize;
                let (device, (input, result)) = if t == "meter" {
                    (
                        format!("meter-{gw}-{dev_n}"),
                        meter(&mut rng, &mut registers[dev_n], kind),
                    )
                } else {
                    (format!("env-{gw}-{dev_n}"), environment(&mut rng, kind))
                };
                let ts = base + n as i64 * step;
                let r = EventResult {
                    event_id: EventResult::event_id(&device, &format!("{gw}-{edge_seq}")),
                    device,
                    event_type: t.into(),
                    seq: edge_seq,
                    ts,
                    gateway: gw.into(),
                    via: proto::Via::Gateway,
                    edge_seq,
                    input: map(input),
                    result: map(result),
                    calc_version: "sha256:test".into(),
                    status,
                    flags,
                    anomaly_score: 0.0,
                    processed_at: ts + 500,
                    correction: None,
                };
                if scanning {
                    *scan_day.entry(t.to_string()).or_insert(0) += 1;
                    if kind > 0 {
                        injected.insert(r.event_id.clone());
                    }
                }
                records.push(r);
            }
            // Objects of at most 100 results, as the bridge writes them.
            for chunk in records.chunks(100) {
                let (from, to) = (chunk[0].edge_seq, chunk[chunk.len() - 1].edge_seq);
                let key = format!(
                    "{prefix}events/dt={day}/gateway={gw}/{from:020}-{to:020}-{:016x}.ndjson",
                    from * 7919
                );
                let mut body = Vec::new();
                for r in chunk {
                    serde_json::to_writer(&mut body, r).unwrap();
                    body.push(b'\n');
                }
                objects.insert(key, body);
            }
        }
    }
    // A line that is not a result, and objects that are not history.
    let first = objects.keys().next().unwrap().clone();
    objects
        .get_mut(&first)
        .unwrap()
        .extend_from_slice(b"{\"not\": \"a result\"}\n");
    objects.insert(format!("{prefix}failures/x.json"), b"{}".to_vec());
    objects.insert(
        format!("{prefix}events/dt={SCAN_DAY}/gateway=gw-a/README.txt"),
        b"not ndjson".to_vec(),
    );
    History {
        objects,
        injected,
        scan_day,
    }
}

async fn upload(objects: &dyn ObjectStore, h: &History) {
    for (k, body) in &h.objects {
        objects
            .put(k, body.clone(), "application/x-ndjson")
            .await
            .unwrap();
    }
}

fn train_options() -> TrainOptions {
    TrainOptions {
        range: DateRange::new(None, Some(TRAIN_DAYS[2])).unwrap(),
        event_type: None,
        fit: FitParams::default(),
        exclude: vec!["input.energy_kwh".into()],
        max_samples: 200_000,
        concurrency: 8,
    }
}

fn scan_options() -> ScanOptions {
    ScanOptions {
        range: DateRange::new(Some(SCAN_DAY), None).unwrap(),
        event_type: None,
        concurrency: 8,
    }
}

/// Recall and precision of the scan on the injected anomalies, printed, overall and per type.
fn measure(label: &str, h: &History, report: &ScanReport) -> (f64, f64) {
    let found: BTreeSet<&str> = report
        .anomalies
        .iter()
        .map(|f| f.event_id.as_str())
        .collect();
    let tp = found.iter().filter(|id| h.injected.contains(**id)).count();
    let recall = tp as f64 / h.injected.len() as f64;
    let precision = tp as f64 / found.len().max(1) as f64;
    println!(
        "{label}: injected {}, flagged {}, true positives {tp}: recall {recall:.3}, precision {precision:.3}",
        h.injected.len(),
        found.len()
    );
    for (t, c) in &report.types {
        let inj = h
            .injected
            .iter()
            .filter(|id| id.starts_with(if t == "meter" { "meter-" } else { "env-" }))
            .count();
        let tp_t = report
            .anomalies
            .iter()
            .filter(|f| &f.event_type == t && h.injected.contains(&f.event_id))
            .count();
        println!(
            "  {t}: scanned {}, anomalies {}, injected {inj}, recall {:.3}, precision {:.3}, threshold {:.3}",
            c.scanned,
            c.anomalies,
            tp_t as f64 / inj.max(1) as f64,
            tp_t as f64 / c.anomalies.max(1) as f64,
            c.threshold.unwrap_or(f64::NAN)
        );
    }
    for f in report
        .anomalies
        .iter()
        .filter(|f| !h.injected.contains(&f.event_id))
    {
        println!(
            "  false positive: {} {} score {:.2} > {:.2} ({:?} z {:?})",
            f.event_id,
            f.event_type,
            f.score,
            f.threshold,
            f.feature,
            f.z.map(|z| (z * 10.0).round() / 10.0),
        );
    }
    for f in report.anomalies.iter().take(5) {
        println!(
            "  top: {} {} score {:.2} > {:.2} ({:?} z {:?}) injected={}",
            f.event_id,
            f.event_type,
            f.score,
            f.threshold,
            f.feature,
            f.z.map(|z| (z * 10.0).round() / 10.0),
            h.injected.contains(&f.event_id)
        );
    }
    (recall, precision)
}

/// train → stored models with sane stats → load → scan: recall and precision ≥ 0.8.
async fn train_and_scan(
    label: &str,
    objects: Arc<dyn ObjectStore>,
    prefix: &str,
    publisher: Option<&dyn EventPublisher>,
) -> (History, ScanReport) {
    let h = history(prefix);
    upload(objects.as_ref(), &h).await;

    // No models yet: an empty set, not an error.
    let none = AnomalyModels::load(objects.as_ref(), prefix).await.unwrap();
    assert!(none.is_empty());

    let report = train(&objects, prefix, &train_options(), &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(report.read.bad_lines, 1);
    assert_eq!(report.trained(), 2, "{:?}", report.types);
    for t in &report.types {
        let per_type = TRAIN_DAYS.len() * GATEWAYS.len();
        assert_eq!(t.read, per_type * (NORMAL + 6), "{t:?}");
        assert_eq!(t.skipped, per_type * 6, "{t:?}");
        assert_eq!(t.samples, per_type * NORMAL, "{t:?}");
        assert!(!t.features.iter().any(|f| f == "input.energy_kwh"), "{t:?}");
    }

    // The stored objects: parameters and training stats.
    for t in ["meter", "environment"] {
        let body = objects
            .get(&model_key(prefix, t))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no model object for {t}"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        let m = TypeModel::from_json(&body).unwrap();
        let s = &m.training;
        println!(
            "{label}: model {t}: {} samples, {} features {:?}, {} components, threshold {:.3} (p50 {:.3}, max {:.3}), algorithm {}",
            s.n_samples,
            m.features.len(),
            m.features.names,
            s.n_components,
            m.threshold,
            s.score_quantiles["p50"],
            s.score_quantiles["max"],
            m.algorithm
        );
        assert_eq!(m.event_type, t);
        assert_eq!(s.n_samples, TRAIN_DAYS.len() * GATEWAYS.len() * NORMAL);
        let want = if t == "meter" { 7 } else { 6 };
        assert_eq!(m.features.len(), want, "{:?}", m.features.names);
        assert!(m.features.stds.iter().all(|s| *s > 0.0));
        assert!(m.threshold.is_finite());
        assert!(m.threshold > s.score_quantiles["p50"] && m.threshold <= s.score_quantiles["max"]);
        assert_eq!(s.threshold_quantile, 0.995);
        assert_eq!(s.until.as_deref(), Some(TRAIN_DAYS[2]));
        assert!(s.ts_from.unwrap() >= day_ms(TRAIN_DAYS[0]));
        assert!(s.ts_to.unwrap() < day_ms(SCAN_DAY));
        assert!(!s.trained_at.is_empty());
        assert!(m.algorithm.contains("GaussianMixture"));
        for field in ["features", "components", "threshold", "training"] {
            assert!(v.get(field).is_some(), "{field} missing");
        }
    }

    let models = AnomalyModels::load(objects.as_ref(), prefix).await.unwrap();
    assert_eq!(models.types().collect::<Vec<_>>(), ["environment", "meter"]);

    let report = scan(
        &objects,
        prefix,
        &models,
        &scan_options(),
        publisher,
        &Progress::hidden(),
    )
    .await
    .unwrap();
    for (t, n) in &h.scan_day {
        assert_eq!(report.types[t].scanned, *n, "{t}");
        assert_eq!(report.types[t].scored, *n, "{t}");
    }
    let (recall, precision) = measure(label, &h, &report);
    assert!(recall >= 0.8, "{label}: recall {recall}");
    assert!(precision >= 0.8, "{label}: precision {precision}");

    // The live scorer agrees with the scan.
    let flagged: BTreeSet<&str> = report
        .anomalies
        .iter()
        .map(|f| f.event_id.as_str())
        .collect();
    let mut checked = 0;
    for body in h
        .objects
        .iter()
        .filter(|(k, _)| k.contains(SCAN_DAY) && k.ends_with(".ndjson"))
    {
        for line in body.1.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(r) = serde_json::from_slice::<EventResult>(line) else {
                continue;
            };
            let s = models.score(&r).unwrap();
            assert_eq!(s.anomalous, flagged.contains(r.event_id.as_str()));
            checked += 1;
        }
    }
    assert_eq!(checked, h.scan_day.values().sum::<usize>());

    // A first reading (derived fields without a previous reading) is not scored.
    let f = &report.anomalies[0];
    let body = objects.get(&f.key).await.unwrap().unwrap();
    let mut r: EventResult = body
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<EventResult>(l).ok())
        .find(|r| r.event_id == f.event_id)
        .unwrap();
    assert!(models.score(&r).unwrap().anomalous);
    r.flags.push("first_reading".into());
    assert_eq!(models.score(&r), None);
    r.event_type = "pump".into();
    r.flags.clear();
    assert_eq!(models.score(&r), None, "no model for the type");
    (h, report)
}

#[tokio::test]
async fn local_backend_train_scan_publish() {
    let dir = tempfile::tempdir().unwrap();
    let objects: Arc<dyn ObjectStore> =
        Arc::new(cloud_bridge::backend::local::LocalObjects::new(dir.path()).unwrap());
    let events = cloud_bridge::backend::local::LocalEvents::new(
        &dir.path().join("eventbridge"),
        "src",
        "bus",
    )
    .unwrap();
    let (_, report) = train_and_scan("local", objects, "", Some(&events)).await;
    assert_eq!(report.published, report.anomalies.len());
    // The events as EventBridge would deliver them: the result, marked.
    let mut lines = Vec::new();
    for day in std::fs::read_dir(dir.path().join("eventbridge")).unwrap() {
        let f = day.unwrap().path().join("AnomalyDetected.ndjson");
        lines.extend(
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    assert_eq!(lines.len(), report.anomalies.len());
    let d = &lines[0]["detail"];
    assert_eq!(d["status"], "anomaly");
    assert!(d["anomaly_score"].as_f64().unwrap() > 0.0);
    assert!(
        d["flags"]
            .as_array()
            .unwrap()
            .contains(&json!("cloud_anomaly"))
    );
}

#[tokio::test]
async fn a_prefix_and_one_type() {
    let dir = tempfile::tempdir().unwrap();
    let objects: Arc<dyn ObjectStore> =
        Arc::new(cloud_bridge::backend::local::LocalObjects::new(dir.path()).unwrap());
    let h = history("prod/");
    upload(objects.as_ref(), &h).await;
    let mut opts = train_options();
    opts.event_type = Some("environment".into());
    let r = train(&objects, "prod/", &opts, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(r.types.len(), 1);
    assert!(
        objects
            .get("prod/models/anomaly/environment.json")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        objects
            .get("prod/models/anomaly/meter.json")
            .await
            .unwrap()
            .is_none()
    );
    // Too few samples: reported, no model.
    opts.event_type = Some("meter".into());
    opts.fit.min_samples = 1_000_000;
    opts.max_samples = 1_000_000;
    let r = train(&objects, "prod/", &opts, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(r.trained(), 0);
    assert!(
        r.types[0]
            .error
            .as_ref()
            .unwrap()
            .contains("at least 1000000")
    );
    // An unknown type in the range.
    opts.event_type = Some("pump".into());
    let r = train(&objects, "prod/", &opts, &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(
        r.types[0].error.as_deref(),
        Some("no results of this type in the range")
    );
    // A model that is not one is an error naming its key.
    objects
        .put(
            "prod/models/anomaly/bad.json",
            b"{}".to_vec(),
            "application/json",
        )
        .await
        .unwrap();
    let e = AnomalyModels::load(objects.as_ref(), "prod/")
        .await
        .unwrap_err();
    assert!(
        e.to_string().starts_with("prod/models/anomaly/bad.json:"),
        "{e}"
    );
}

// ---------------------------------------------------------------- the binary

fn config_text(extra_aws: &str) -> String {
    format!(
        "[aws]\nbucket = \"b\"\nevent_bus = \"bus\"\ntable = \"t\"\ndlq_queue = \"q\"\n{extra_aws}\n\
         [anomaly]\nexclude_fields = [\"input.energy_kwh\"]\n"
    )
}

/// Runs the binary with no terminal anywhere (pipes); (exit ok, stdout, stderr).
fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(common::BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn cli_train_and_scan(config: &Path, local: Option<&Path>, env: &[(&str, &str)], h: &History) {
    let cfg = config.to_str().unwrap();
    let mut base = vec!["--config", cfg];
    if let Some(d) = local {
        base.extend(["--local", d.to_str().unwrap()]);
    }
    let mut args = vec!["anomaly", "train"];
    args.extend(&base);
    args.extend(["--until", TRAIN_DAYS[2], "--json"]);
    let (ok, out, err) = run_cli(&args, env);
    assert!(ok, "train failed: {err}");
    println!("anomaly train --json: {out}");
    println!("stderr: {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON document on stdout");
    assert_eq!(v["types"].as_array().unwrap().len(), 2);
    assert_eq!(v["bad_lines"], 1);
    // No terminal: plain progress lines, no bar.
    assert!(
        err.contains("anomaly train: ") && err.contains("done: "),
        "{err}"
    );
    assert!(
        !err.contains('\x1b'),
        "escape codes without a terminal: {err:?}"
    );

    let mut args = vec!["anomaly", "scan"];
    args.extend(&base);
    args.extend(["--since", SCAN_DAY, "--json", "--limit", "5", "--publish"]);
    let (ok, out, err) = run_cli(&args, env);
    assert!(ok, "scan failed: {err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON document on stdout");
    println!("anomaly scan --json: {v:#}");
    let total = v["anomalies_total"].as_u64().unwrap() as usize;
    assert_eq!(v["anomalies"].as_array().unwrap().len(), 5);
    assert_eq!(v["published"].as_u64().unwrap() as usize, total);
    let found: BTreeSet<&str> = v["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["event_id"].as_str().unwrap())
        .collect();
    assert!(found.iter().all(|id| h.injected.contains(*id)), "{found:?}");
    assert!(total >= h.injected.len() * 8 / 10);

    // The human summary.
    let mut args = vec!["anomaly", "scan"];
    args.extend(&base);
    args.extend(["--since", SCAN_DAY, "--limit", "3"]);
    let (ok, out, err) = run_cli(&args, env);
    assert!(ok, "scan failed: {err}");
    println!("{out}");
    assert!(
        out.contains(&format!("top 3 of {total} anomalies")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("meter ") || l.starts_with("meter  "))
    );
}

#[test]
fn cli_local_backend_json_and_progress() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cloud");
    let h = history("");
    for (k, body) in &h.objects {
        let p = data.join(k);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let config = common::write_config(dir.path(), "bridge.toml", &config_text(""));
    cli_train_and_scan(&config, Some(&data), &[], &h);
    assert!(data.join("models/anomaly/meter.json").exists());
    assert!(data.join("eventbridge").exists());

    // Usage errors: exit non-zero, a message naming the argument.
    let cfg = config.to_str().unwrap();
    let d = data.to_str().unwrap();
    let (ok, _, err) = run_cli(&["anomaly", "scan", "--config", cfg, "--local", d], &[]);
    assert!(!ok && err.contains("--since"), "{err}");
    let (ok, _, err) = run_cli(
        &[
            "anomaly",
            "train",
            "--config",
            cfg,
            "--local",
            d,
            "--since",
            "2026-13-01",
        ],
        &[],
    );
    assert!(!ok && err.contains("--since: '2026-13-01'"), "{err}");

    // Under a terminal (util-linux `script` gives the command a pty): the bar goes to the
    // terminal, the JSON summary (stdout redirected to a file) still parses.
    if Command::new("script").arg("--version").output().is_err() {
        println!("SKIPPED the pty check: no `script`");
        return;
    }
    let out_json = dir.path().join("train.json");
    let typescript = dir.path().join("typescript");
    let line = format!(
        "{} anomaly train --config {cfg} --local {d} --until {} --json > {}",
        common::BIN,
        TRAIN_DAYS[2],
        out_json.display()
    );
    let st = Command::new("script")
        .args(["-qec", &line])
        .arg(&typescript)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let v: Value = serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    assert_eq!(v["types"].as_array().unwrap().len(), 2);
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(
        !screen.contains("done: "),
        "plain lines on a terminal: {screen}"
    );
}

// ---------------------------------------------------------------- S3 (moto)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_s3_train_scan_and_cli() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let aws = common::TestAws::new(&endpoint).await;
    let names = common::AwsNames::unique("anomaly");
    aws.s3
        .create_bucket()
        .bucket(&names.bucket)
        .send()
        .await
        .unwrap();
    let objects: Arc<dyn ObjectStore> = Arc::new(cloud_bridge::backend::aws::S3Objects::new(
        aws.s3.clone(),
        names.bucket.clone(),
    ));
    assert!(objects.get("nope/x.json").await.unwrap().is_none());
    let (h, _) = train_and_scan("moto S3", Arc::clone(&objects), "p/", None).await;

    // The binary against the same bucket (GetObject/PutObject through the SDK as configured),
    // publishing to a real bus.
    aws.eb
        .create_event_bus()
        .name(&names.bus)
        .send()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("prefix = \"p/\"\nregion = \"us-east-1\"")
        .replace("bucket = \"b\"", &format!("bucket = \"{}\"", names.bucket))
        .replace(
            "event_bus = \"bus\"",
            &format!("event_bus = \"{}\"", names.bus),
        );
    let config = common::write_config(dir.path(), "bridge.toml", &text);
    let h2 = tokio::task::spawn_blocking(move || {
        let env = [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ];
        cli_train_and_scan(&config, None, &env, &h);
        h
    })
    .await
    .unwrap();
    assert!(!h2.injected.is_empty());
}

/// The bridge scores what arrives with the trained models: the scan day's results sent again
/// as a new gateway's stream are stored with the injected anomalies marked.
#[tokio::test]
async fn the_bridge_scores_incoming_results_with_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let objects: Arc<dyn ObjectStore> =
        Arc::new(cloud_bridge::backend::local::LocalObjects::new(dir.path()).unwrap());
    let (h, _) = train_and_scan("live", Arc::clone(&objects), "", None).await;

    let cfg = Arc::new(
        cloud_bridge::config::Config::parse(
            "[aws]\nbucket = \"b\"\nevent_bus = \"bus\"\ntable = \"t\"\ndlq_queue = \"q\"\n",
        )
        .unwrap(),
    );
    let backend = cloud_bridge::backend::local::backend(dir.path(), &cfg).unwrap();
    let metrics = Arc::new(cloud_bridge::metrics::Metrics::default());
    let p = cloud_bridge::pipeline::Pipeline::with_backend(
        backend,
        cfg,
        Arc::clone(&metrics),
        "t".into(),
    );
    let mut held = cloud_bridge::pipeline::Held::new();
    for (key, body) in &h.objects {
        if !key.contains(&format!("dt={SCAN_DAY}")) {
            continue;
        }
        for line in String::from_utf8_lossy(body).lines() {
            let Ok(mut r) = serde_json::from_str::<EventResult>(line) else {
                continue;
            };
            if r.status != Status::Ok || !r.flags.is_empty() {
                continue;
            }
            r.gateway = "gw-live".into();
            r.edge_seq = held.len() as u64 + 1;
            held.insert(r.edge_seq, r);
        }
    }
    let n = held.len() as u64;
    let injected_sent = held
        .values()
        .filter(|r| h.injected.contains(&r.event_id))
        .count();
    assert!(injected_sent > 0);
    p.advance("gw-live", &mut held).await.unwrap();

    let mut flagged = BTreeSet::new();
    let mut stored = 0u64;
    for key in objects.list("events/").await.unwrap() {
        if !key.contains("gateway=gw-live") {
            continue;
        }
        let body = objects.get(&key).await.unwrap().unwrap();
        for line in String::from_utf8_lossy(&body).lines() {
            let r: EventResult = serde_json::from_str(line).unwrap();
            stored += 1;
            if r.status == Status::Anomaly {
                assert!(r.flags.iter().any(|f| f == "cloud_anomaly"));
                assert!(r.anomaly_score >= 1.0, "{}", r.anomaly_score);
                flagged.insert(r.event_id);
            }
        }
    }
    assert_eq!(stored, n);
    let hits = flagged.iter().filter(|id| h.injected.contains(*id)).count();
    println!(
        "bridge scoring: {hits}/{injected_sent} injected flagged, {} flagged in all",
        flagged.len()
    );
    assert!(hits as f64 >= 0.8 * injected_sent as f64);
    assert!(hits as f64 >= 0.8 * flagged.len() as f64);
    assert_eq!(
        metrics
            .snapshot()
            .into_iter()
            .find(|(k, _)| *k == "anomalies")
            .unwrap()
            .1,
        flagged.len() as u64
    );
}
