//! Per-event cost of `Engine::process` with and without the anomaly detectors, and of
//! `verify::verify` (what the cloud bridge pays per result it re-verifies).
//!
//! `cargo bench -p engine` (harness = false): prints ns/event for the example config's meter
//! and environment types as they are (with their `anomaly` tables) and with the tables
//! removed. Payloads are encoded up front; the timing covers decode → … → detectors.

use std::hint::black_box;
use std::time::Instant;

use engine::{Engine, EngineSpec, Input, Outcome, State};
use serde_json::json;

const EXAMPLE: &str = include_str!("../tests/example_types.toml");
const T0: i64 = 1_764_000_000_000;
const DEVICES: usize = 50;
const PER_DEVICE: usize = 2000;

fn messages() -> Vec<(String, Vec<u8>, i64)> {
    let mut out = Vec::with_capacity(2 * DEVICES * PER_DEVICE);
    for i in 0..PER_DEVICE {
        let ts = T0 + i as i64 * 60_000;
        let wobble = ((i * 7919) % 100) as f64 / 100.0;
        for d in 0..DEVICES {
            let meter = json!({"id": format!("m{i}"), "seq": i + 1, "ts": ts, "data": {
                "energy_kwh": 1000.0 + i as f64 * 0.03,
                "voltage_v": 230.0 + wobble,
                "current_a": 8.0 + wobble,
            }});
            out.push((
                format!("devices/meter-{d}/events/meter"),
                meter.to_string().into_bytes(),
                ts,
            ));
            let env = json!({"id": format!("e{i}"), "seq": i + 1, "ts": ts, "data": {
                "temperature_c": 21.0 + wobble,
                "humidity_pct": 45.0 + wobble,
            }});
            out.push((
                format!("devices/env-{d}/events/environment"),
                env.to_string().into_bytes(),
                ts,
            ));
        }
    }
    out
}

fn run(engine: &Engine, msgs: &[(String, Vec<u8>, i64)]) -> f64 {
    let mut state = State::new();
    let started = Instant::now();
    let mut anomalies = 0usize;
    for (topic, payload, ts) in msgs {
        let input = Input {
            topic,
            payload,
            received_at: ts + 250,
            gateway: "gw-bench",
            via: proto::Via::Gateway,
            replay: false,
        };
        match black_box(engine.process(&mut state, &input)) {
            Outcome::Accepted { result, .. } => {
                anomalies += usize::from(result.status == proto::Status::Anomaly)
            }
            other => panic!("{other:?}"),
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / msgs.len() as f64;
    black_box(anomalies);
    ns
}

fn main() {
    let with: EngineSpec = toml::from_str(EXAMPLE).expect("example parses");
    let mut without = with.clone();
    for t in without.event_types.values_mut() {
        t.anomaly = None;
    }
    let with = Engine::new(&with).expect("compiles");
    let without = Engine::new(&without).expect("compiles");
    let msgs = messages();
    // Warm up, then best of 3 to damp a shared machine's noise.
    run(&with, &msgs[..msgs.len() / 10]);
    let best = |e: &Engine| (0..3).map(|_| run(e, &msgs)).fold(f64::INFINITY, f64::min);
    let a = best(&without);
    let b = best(&with);
    println!(
        "process, {} events (meter + environment, {} devices each):",
        msgs.len(),
        DEVICES
    );
    println!("  without detectors  {a:>8.0} ns/event");
    println!(
        "  with detectors     {b:>8.0} ns/event  (+{:.0} ns, 2 fields per type)",
        b - a
    );

    // Verification: the results with the previous reading each was computed against.
    let mut state = State::new();
    let mut last: std::collections::HashMap<(String, String), engine::Reading> = Default::default();
    let mut pairs = Vec::with_capacity(msgs.len());
    for (topic, payload, ts) in &msgs {
        let input = Input {
            topic,
            payload,
            received_at: ts + 250,
            gateway: "gw-bench",
            via: proto::Via::Gateway,
            replay: false,
        };
        let Outcome::Accepted { result, .. } = with.process(&mut state, &input) else {
            panic!()
        };
        let k = (result.device.clone(), result.event_type.clone());
        let prev = last.insert(k, engine::Reading::from_result(&result));
        pairs.push((result, prev));
    }
    let verify_all = || {
        let started = Instant::now();
        for (r, prev) in &pairs {
            let v = engine::verify::verify(
                &with,
                r,
                engine::verify::Previous::Known(prev.as_ref()),
                1e-9,
            );
            assert_eq!(black_box(v), engine::verify::Verdict::Consistent);
        }
        started.elapsed().as_nanos() as f64 / pairs.len() as f64
    };
    let v = (0..3).map(|_| verify_all()).fold(f64::INFINITY, f64::min);
    println!(
        "verify (recompute + compare) {v:>8.0} ns/result  (≈ {:.0}k results/s on one core)",
        1e6 / v
    );
}
