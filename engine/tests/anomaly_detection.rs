//! The anomaly detectors measured on a labelled synthetic data set.
//!
//! # The data
//! A deterministic generator (splitmix64 + Box-Muller, seeded) makes, per seed, 15 energy
//! meters and 15 environment sensors of the example config (`example_types.toml`, whose
//! `[event_types.*.anomaly]` sections are the agent's), 2000 readings each, one a minute (about
//! a day and a half). Every field is
//!
//! ```text
//! base + daily cycle (period 22–26 h, random phase, a second harmonic)
//!      + slow wander (Ornstein–Uhlenbeck, τ = 5 h, std = the noise's)
//!      + white noise σ, quantized to the sensor's resolution
//! ```
//!
//! | field         | base | cycle amplitude | σ (noise) | resolution |
//! |---------------|------|-----------------|-----------|------------|
//! | voltage_v     | 230  | 3 V             | 0.8 V     | 0.1 V      |
//! | current_a     | 12   | 4 A             | 0.4 A     | 0.01 A     |
//! | temperature_c | 21   | 2.5 °C          | 0.15 °C   | 0.01 °C    |
//! | humidity_pct  | 45   | 8 %             | 0.8 %     | 0.1 %      |
//!
//! The meter's `energy_kwh` integrates V·I; the engine derives `power_w` (watched) from them.
//! After the first 150 readings (the detectors' warm-up is 60) anomalies are injected one at a
//! time, 80–250 readings apart, each labelled with its device, field and readings:
//! - **spike** (60 %): one reading off by ±6–20 σ (voltage, current, temperature, humidity);
//! - **drift** (20 %): a level shift of ±4–10 σ built up linearly over 20–60 readings, which
//!   then persists (voltage, current, temperature, humidity); a channel's next drift goes
//!   back towards its base, so shifts do not pile up into implausible levels;
//! - **stuck** (20 %): the sensor repeats its last value exactly for 15–60 readings (voltage,
//!   temperature, humidity; the current is not watched directly and a frozen current does
//!   not freeze `power_w`).
//!
//! # The scoring
//! An event is *flagged* when its result has status `anomaly`. Per class:
//! - spike: recall = labelled spike readings that were flagged / labelled spike readings;
//! - drift: an episode is detected when a reading in `[start, t3 + 60)` is flagged, where
//!   `t3` is the first reading whose shift reaches 3 σ (an hour to notice);
//! - stuck: an episode is detected when a reading inside the frozen run is flagged.
//!
//! Precision (over all classes) = flagged readings that lie in a labelled window / all flagged
//! readings. Because a stuck run is flagged on every reading once it is long enough, that
//! number flatters; so we also count *alarms* (runs of consecutive flagged readings of one
//! device, what an operator would see as one incident) and require alarm precision = alarms
//! touching a labelled window / all alarms ≥ 0.8 too. Windows: a spike's reading; a drift's `[start, start + ramp + 60)`; a stuck run
//! and the 5 readings after it (the jump back may look like a spike). "Kind" counts detections
//! whose flags include the right kind (`anomaly:drift:*` for a drift, …), for information.
//!
//! Three seeds; each must give recall ≥ 0.8 per class and precision ≥ 0.8.

mod anomaly_common;

use anomaly_common::Table;
use engine::{Engine, EngineSpec, Input, Outcome, State};
use proto::Status;
use serde_json::json;

const EXAMPLE: &str = include_str!("example_types.toml");
const T0: i64 = 1_764_000_000_000;
const EVENTS: usize = 2000;
const DEVICES_PER_TYPE: usize = 15;
const QUIET_START: usize = 150;
const DRIFT_GRACE: usize = 60;
const STUCK_AFTER: usize = 5;

/// splitmix64 + Box-Muller.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    fn int(&mut self, lo: usize, hi_incl: usize) -> usize {
        lo + (self.next_u64() % (hi_incl - lo + 1) as u64) as usize
    }
    fn sign(&mut self) -> f64 {
        if self.next_u64() & 1 == 0 { 1.0 } else { -1.0 }
    }
    fn gauss(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Spike,
    Drift,
    Stuck,
}

const CLASSES: [Class; 3] = [Class::Spike, Class::Drift, Class::Stuck];

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Spike => "spike",
            Class::Drift => "drift",
            Class::Stuck => "stuck",
        }
    }
}

/// One sensor channel's normal behaviour.
#[derive(Debug, Clone, Copy)]
struct Channel {
    name: &'static str,
    base: f64,
    amp: f64,
    sigma: f64,
    resolution: f64,
    min: f64,
    max: f64,
    /// Stuck can be injected (the field is watched as it is).
    can_stick: bool,
}

const METER: [Channel; 2] = [
    Channel {
        name: "voltage_v",
        base: 230.0,
        amp: 3.0,
        sigma: 0.8,
        resolution: 0.1,
        min: 0.0,
        max: 500.0,
        can_stick: true,
    },
    Channel {
        name: "current_a",
        // High enough that cycle + wander + a drift never reach 0 A: a current clamped at
        // 0 would make `power_w` repeat 0 W, a stuck-looking stretch nobody labelled.
        base: 12.0,
        amp: 4.0,
        sigma: 0.4,
        resolution: 0.01,
        min: 0.0,
        max: 100.0,
        can_stick: false,
    },
];

const ENVIRONMENT: [Channel; 2] = [
    Channel {
        name: "temperature_c",
        base: 21.0,
        amp: 2.5,
        sigma: 0.15,
        resolution: 0.01,
        min: -40.0,
        max: 85.0,
        can_stick: true,
    },
    Channel {
        name: "humidity_pct",
        base: 45.0,
        amp: -8.0,
        sigma: 0.8,
        resolution: 0.1,
        min: 0.5,
        max: 100.0,
        can_stick: true,
    },
];

/// One labelled anomaly.
#[derive(Debug, Clone)]
struct Episode {
    class: Class,
    channel: usize,
    start: usize,
    /// Spike 1, drift: the ramp's length, stuck: the run's.
    len: usize,
    /// Spike: offset; drift: final shift (field units).
    size: f64,
    /// Readings in which a flag detects it.
    detect: std::ops::Range<usize>,
    /// Readings in which a flag is a true positive.
    window: std::ops::Range<usize>,
}

/// One device's readings (per channel) and its labels.
struct Stream {
    device: String,
    event_type: &'static str,
    values: Vec<[f64; 2]>,
    episodes: Vec<Episode>,
}

fn quantize(x: f64, res: f64) -> f64 {
    // Round to the resolution and back to the shortest decimal (as a device prints it).
    let q = (x / res).round() * res;
    let digits = (-res.log10()).ceil().max(0.0) as i32;
    let p = 10f64.powi(digits);
    (q * p).round() / p
}

fn generate(rng: &mut Rng, device: String, event_type: &'static str, ch: &[Channel; 2]) -> Stream {
    // Schedule the anomalies first.
    let mut episodes = Vec::new();
    let mut t = QUIET_START;
    loop {
        t += rng.int(80, 250);
        let roll = rng.uniform();
        let class = if roll < 0.6 {
            Class::Spike
        } else if roll < 0.8 {
            Class::Drift
        } else {
            Class::Stuck
        };
        let candidates: Vec<usize> = (0..2)
            .filter(|&c| class != Class::Stuck || ch[c].can_stick)
            .collect();
        let c = candidates[rng.int(0, candidates.len() - 1)];
        let sigma = ch[c].sigma;
        let (len, size) = match class {
            Class::Spike => (1, rng.sign() * rng.range(6.0, 20.0) * sigma),
            Class::Drift => {
                // Away from the base first, then back: stacked shifts stay plausible.
                let shifted: f64 = episodes
                    .iter()
                    .filter(|e: &&Episode| e.class == Class::Drift && e.channel == c)
                    .map(|e| e.size)
                    .sum();
                let sign = if shifted == 0.0 {
                    rng.sign()
                } else {
                    -shifted.signum()
                };
                (rng.int(20, 60), sign * rng.range(4.0, 10.0) * sigma)
            }
            Class::Stuck => (rng.int(15, 60), 0.0),
        };
        let end_of_effect = match class {
            Class::Spike => t + 1,
            Class::Drift => t + len + DRIFT_GRACE,
            Class::Stuck => t + len + STUCK_AFTER,
        };
        if end_of_effect + 20 >= EVENTS {
            break;
        }
        let (detect, window) = match class {
            Class::Spike => (t..t + 1, t..t + 1),
            Class::Drift => {
                // The first reading whose shift reaches 3 σ.
                let t3 = t + ((3.0 * sigma / size.abs()) * len as f64).ceil() as usize;
                (t..t3 + DRIFT_GRACE, t..t + len + DRIFT_GRACE)
            }
            Class::Stuck => (t..t + len, t..t + len + STUCK_AFTER),
        };
        episodes.push(Episode {
            class,
            channel: c,
            start: t,
            len,
            size,
            detect,
            window,
        });
        t = end_of_effect;
    }

    // Then the readings.
    let period: [f64; 2] = [rng.range(1320.0, 1560.0), rng.range(1320.0, 1560.0)];
    let phase: [f64; 2] = [rng.range(0.0, 6.3), rng.range(0.0, 6.3)];
    let mut wander = [0.0f64; 2];
    let tau = 300.0;
    let mut values: Vec<[f64; 2]> = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let mut row = [0.0; 2];
        for c in 0..2 {
            let ph = std::f64::consts::TAU * i as f64 / period[c] + phase[c];
            let k = ch[c];
            wander[c] += -wander[c] / tau + k.sigma * (2.0 / tau).sqrt() * rng.gauss();
            let mut x = k.base
                + k.amp * (ph.sin() + 0.15 * (2.0 * ph + 1.0).sin())
                + wander[c]
                + k.sigma * rng.gauss();
            for e in episodes.iter().filter(|e| e.channel == c && e.start <= i) {
                match e.class {
                    Class::Spike if e.start == i => x += e.size,
                    Class::Drift => {
                        x += e.size * (((i - e.start + 1) as f64) / e.len as f64).min(1.0);
                    }
                    _ => {}
                }
            }
            row[c] = quantize(x.clamp(k.min, k.max), k.resolution);
        }
        // A stuck sensor repeats the reading it had when it froze.
        for e in &episodes {
            if e.class == Class::Stuck && (e.start + 1..e.start + e.len).contains(&i) {
                row[e.channel] = values[e.start][e.channel];
            }
        }
        values.push(row);
    }
    Stream {
        device,
        event_type,
        values,
        episodes,
    }
}

/// What the engine made of every reading: flagged, and the flags.
fn run_engine(engine: &Engine, stream: &Stream) -> Vec<(bool, Vec<String>)> {
    let mut state = State::new();
    let mut energy = 1000.0;
    let topic = format!("devices/{}/events/{}", stream.device, stream.event_type);
    let mut out = Vec::with_capacity(EVENTS);
    for (i, row) in stream.values.iter().enumerate() {
        let ts = T0 + i as i64 * 60_000;
        let data = match stream.event_type {
            "meter" => {
                energy += row[0] * row[1] * 60.0 / 3.6e6;
                json!({
                    "energy_kwh": (energy * 1000.0).round() / 1000.0,
                    "voltage_v": row[0],
                    "current_a": row[1],
                })
            }
            _ => json!({"temperature_c": row[0], "humidity_pct": row[1], "pressure_hpa": 1013.2}),
        };
        let payload = json!({"id": format!("m{i}"), "seq": i + 1, "ts": ts, "data": data});
        let payload = payload.to_string();
        let input = Input {
            topic: &topic,
            payload: payload.as_bytes(),
            received_at: ts + 250,
            gateway: "gw-test",
            via: proto::Via::Gateway,
            replay: false,
        };
        match engine.process(&mut state, &input) {
            Outcome::Accepted { result, .. } => {
                let flags: Vec<String> = result
                    .flags
                    .into_iter()
                    .filter(|f| f.starts_with("anomaly:"))
                    .collect();
                assert_eq!(result.status == Status::Anomaly, !flags.is_empty());
                assert_eq!(result.anomaly_score >= 1.0, !flags.is_empty());
                out.push((result.status == Status::Anomaly, flags));
            }
            other => panic!("{} reading {i}: {other:?}", stream.device),
        }
    }
    out
}

#[derive(Default, Clone, Copy)]
struct Tally {
    episodes: usize,
    detected: usize,
    right_kind: usize,
}

struct Report {
    tally: [Tally; 3],
    flagged: usize,
    true_flags: usize,
    /// Runs of consecutive flagged readings of one device (what an operator sees as one alarm).
    alarms: usize,
    true_alarms: usize,
    readings: usize,
    /// Precision and recall per kind and per event type (`anomaly_common`).
    table: Table,
}

fn measure(seed: u64) -> Report {
    let spec: EngineSpec = toml::from_str(EXAMPLE).expect("example parses");
    let engine = Engine::new(&spec).expect("example compiles");
    let mut rng = Rng(seed);
    let mut report = Report {
        tally: [Tally::default(); 3],
        flagged: 0,
        true_flags: 0,
        alarms: 0,
        true_alarms: 0,
        readings: 0,
        table: Table::default(),
    };
    for d in 0..2 * DEVICES_PER_TYPE {
        let (device, ty, ch) = if d < DEVICES_PER_TYPE {
            (format!("meter-{d:03}"), "meter", &METER)
        } else {
            (format!("env-{d:03}"), "environment", &ENVIRONMENT)
        };
        let stream = generate(&mut rng, device, ty, ch);
        let outcome = run_engine(&engine, &stream);
        report.readings += outcome.len();
        for e in &stream.episodes {
            let k = CLASSES.iter().position(|c| *c == e.class).unwrap_or(0);
            let t = &mut report.tally[k];
            t.episodes += 1;
            let hits: Vec<&Vec<String>> = e
                .detect
                .clone()
                .filter(|&i| outcome[i].0)
                .map(|i| &outcome[i].1)
                .collect();
            if !hits.is_empty() {
                t.detected += 1;
                let kind = format!("anomaly:{}:", e.class.name());
                if hits.iter().any(|f| f.iter().any(|x| x.starts_with(&kind))) {
                    t.right_kind += 1;
                }
            } else if std::env::var_os("ANOMALY_DEBUG").is_some() {
                eprintln!(
                    "missed {:?} {} {} at {} len {} size {:.3}",
                    e.class, stream.device, ch[e.channel].name, e.start, e.len, e.size
                );
            }
        }
        let labels: Vec<anomaly_common::Label> = stream
            .episodes
            .iter()
            .map(|e| anomaly_common::Label {
                kind: CLASSES.iter().position(|c| *c == e.class).unwrap_or(0),
                detect: e.detect.clone(),
                window: e.window.clone(),
            })
            .collect();
        let flags: Vec<Vec<String>> = outcome.iter().map(|(_, f)| f.clone()).collect();
        report.table.add(ty, &flags, &labels);
        let mut alarm_true: Option<bool> = None;
        for (i, (flagged, flags)) in outcome.iter().enumerate() {
            if !flagged {
                if let Some(t) = alarm_true.take() {
                    report.alarms += 1;
                    report.true_alarms += usize::from(t);
                }
                continue;
            }
            report.flagged += 1;
            let labelled = stream.episodes.iter().any(|e| e.window.contains(&i));
            if labelled {
                report.true_flags += 1;
            } else if std::env::var_os("ANOMALY_DEBUG").is_some() {
                eprintln!("false positive {} at {i}: {flags:?}", stream.device);
            }
            alarm_true = Some(alarm_true.unwrap_or(false) || labelled);
        }
        if let Some(t) = alarm_true {
            report.alarms += 1;
            report.true_alarms += usize::from(t);
        }
    }
    report
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

#[test]
fn detectors_find_labelled_anomalies_on_three_seeds() {
    let mut failures = Vec::new();
    // ANOMALY_SEEDS="4,5,6" measures other seeds.
    let seeds: Vec<u64> = std::env::var("ANOMALY_SEEDS").map_or(vec![1, 2, 3], |s| {
        s.split(',')
            .map(|x| x.trim().parse().expect("a seed"))
            .collect()
    });
    let mut all = Table::default();
    for &seed in &seeds {
        let r = measure(seed);
        all.merge(&r.table);
        let precision = ratio(r.true_flags, r.flagged);
        let alarm_precision = ratio(r.true_alarms, r.alarms);
        println!(
            "seed {seed}: {} readings, {} flagged, precision {:.3} ({} in a labelled window); \
             {} alarms (runs of flagged readings), alarm precision {:.3}",
            r.readings, r.flagged, precision, r.true_flags, r.alarms, alarm_precision
        );
        println!("  class  episodes  detected  recall  right kind");
        for (c, t) in CLASSES.iter().zip(r.tally) {
            let recall = ratio(t.detected, t.episodes);
            println!(
                "  {:<5}  {:>8}  {:>8}  {:>6.3}  {:>10}",
                c.name(),
                t.episodes,
                t.detected,
                recall,
                t.right_kind
            );
            if recall < 0.8 {
                failures.push(format!("seed {seed}: {} recall {recall:.3}", c.name()));
            }
            if t.episodes < 20 {
                failures.push(format!(
                    "seed {seed}: only {} {} episodes",
                    t.episodes,
                    c.name()
                ));
            }
        }
        if precision < 0.8 {
            failures.push(format!("seed {seed}: precision {precision:.3}"));
        }
        if alarm_precision < 0.8 {
            failures.push(format!("seed {seed}: alarm precision {alarm_precision:.3}"));
        }
    }
    println!(
        "{}",
        all.render(&format!("anomaly_detection.rs, seeds {seeds:?}"))
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
