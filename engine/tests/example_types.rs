//! The example config (`example_types.toml`, also the agent's example): three realistic event
//! types, checked numerically end to end through `Engine::process`.

use engine::{Engine, EngineSpec, Input, Outcome, Reading, State, haversine_m};
use proto::{EventResult, Stage};
use serde_json::{Value, json};

const EXAMPLE: &str = include_str!("example_types.toml");
const T0: i64 = 1_764_000_000_000;

struct Gateway {
    engine: Engine,
    state: State,
}

impl Gateway {
    fn new() -> Gateway {
        let spec: EngineSpec = toml::from_str(EXAMPLE).expect("example parses");
        Gateway {
            engine: Engine::new(&spec).expect("example compiles"),
            state: State::new(),
        }
    }

    fn send(&mut self, device: &str, ty: &str, seq: u64, ts: i64, data: Value) -> Outcome {
        let payload = json!({"id": format!("{device}-{seq}"), "seq": seq, "ts": ts, "data": data});
        let payload = payload.to_string();
        let topic = format!("devices/{device}/events/{ty}");
        let input = Input {
            topic: &topic,
            payload: payload.as_bytes(),
            received_at: ts + 250,
            gateway: "gw-test",
            via: proto::Via::Gateway,
            replay: false,
        };
        self.engine.process(&mut self.state, &input)
    }

    fn ok(&mut self, device: &str, ty: &str, seq: u64, ts: i64, data: Value) -> EventResult {
        match self.send(device, ty, seq, ts, data) {
            Outcome::Accepted { result, .. } => result,
            other => panic!("expected Accepted, got {other:?}"),
        }
    }

    fn rejected(
        &mut self,
        device: &str,
        ty: &str,
        seq: u64,
        ts: i64,
        data: Value,
    ) -> (Stage, String) {
        match self.send(device, ty, seq, ts, data) {
            Outcome::Rejected(r) => (r.stage, r.reason),
            other => panic!("expected Rejected, got {other:?}"),
        }
    }
}

fn f(r: &EventResult, k: &str) -> f64 {
    r.result
        .get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{k} missing or not a number in {:?}", r.result))
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn example_compiles_with_versions() {
    let gw = Gateway::new();
    assert_eq!(
        gw.engine.event_types().collect::<Vec<_>>(),
        ["environment", "gps", "meter"]
    );
    for t in ["environment", "gps", "meter"] {
        let v = gw.engine.calc_version(t).unwrap();
        assert!(
            v.starts_with(&format!("{t}-")) && v.len() == t.len() + 13,
            "{v}"
        );
    }
    assert_eq!(
        gw.engine.topic().subscription_filter(),
        "devices/+/events/+"
    );
}

#[test]
fn energy_meter() {
    let mut gw = Gateway::new();
    let r = gw.ok(
        "meter-17",
        "meter",
        1,
        T0,
        json!({"energy_kwh": 1000.0, "voltage_v": 230.0, "current_a": 10.0, "relay": "on"}),
    );
    assert_eq!(r.flags, ["first_reading"]);
    assert_eq!(f(&r, "consumption_kwh"), 0.0);
    assert_eq!(f(&r, "avg_power_w"), 0.0);
    assert_eq!(f(&r, "cost_eur"), 0.0);
    // power_factor absent → its default 1.
    assert_eq!(f(&r, "power_w"), 2300.0);

    // 15 minutes later, 0.575 kWh more: 2.3 kW on average.
    let r = gw.ok(
        "meter-17",
        "meter",
        2,
        T0 + 900_000,
        json!({"energy_kwh": 1000.575, "voltage_v": 230.0, "current_a": 10.0, "power_factor": 0.9}),
    );
    assert!(r.flags.is_empty(), "{:?}", r.flags);
    assert!(close(f(&r, "consumption_kwh"), 0.575, 1e-9));
    assert!(
        close(f(&r, "avg_power_w"), 2300.0, 1e-6),
        "{}",
        f(&r, "avg_power_w")
    );
    assert!(close(f(&r, "power_w"), 2070.0, 1e-9));
    assert_eq!(f(&r, "cost_eur"), 0.161); // 0.575 kWh × 0.28 €/kWh, rounded to 0.1 cent/10
    assert_eq!(r.calc_version, gw.engine.calc_version("meter").unwrap());

    // The register going backwards is a rule violation, naming the values.
    let (stage, reason) = gw.rejected(
        "meter-17",
        "meter",
        3,
        T0 + 1_800_000,
        json!({"energy_kwh": 999.0, "voltage_v": 230.0, "current_a": 10.0}),
    );
    assert_eq!(stage, Stage::Rule);
    assert_eq!(
        reason,
        "rule counter_monotonic: the cumulative kWh register must not decrease \
         (has_prev=true, energy_kwh=999, prev.energy_kwh=1000.575)"
    );

    // 60 kWh in 15 minutes = 240 kW average: over the connection rating.
    let (stage, reason) = gw.rejected(
        "meter-17",
        "meter",
        4,
        T0 + 1_800_000,
        json!({"energy_kwh": 1060.575, "voltage_v": 230.0, "current_a": 10.0}),
    );
    assert_eq!(stage, Stage::Check);
    assert!(
        reason.starts_with("check power_within_rating: power exceeds the 50 kW"),
        "{reason}"
    );

    // Only meters may send meter readings.
    let (stage, reason) = gw.rejected(
        "env-1",
        "meter",
        1,
        T0,
        json!({"energy_kwh": 1.0, "voltage_v": 230.0, "current_a": 1.0}),
    );
    assert_eq!(stage, Stage::Rule);
    assert!(
        reason.starts_with("rule allowed_devices: device 'env-1'"),
        "{reason}"
    );

    // Schema: voltage out of range, relay not in the enum, an undeclared field.
    let (stage, reason) = gw.rejected(
        "meter-18",
        "meter",
        1,
        T0,
        json!({"energy_kwh": 1.0, "voltage_v": 612, "current_a": 1.0, "relay": "auto", "temp": 3}),
    );
    assert_eq!(stage, Stage::Schema);
    assert_eq!(
        reason,
        "data.relay: 'auto' is not one of 'on', 'off'; data.voltage_v: 612 is above max 500; \
         data: undeclared field 'temp' (declared: current_a, energy_kwh, power_factor, relay, \
         voltage_v)"
    );
}

/// Magnus formula, written out independently of the config.
fn dew_point(t: f64, rh: f64) -> f64 {
    let (b, c) = (17.62, 243.12);
    let g = (rh / 100.0).ln() + b * t / (c + t);
    c * g / (b - g)
}

#[test]
fn environment_sensor() {
    let mut gw = Gateway::new();
    let r = gw.ok(
        "env-3",
        "environment",
        10,
        T0,
        json!({"temperature_c": 20.0, "humidity_pct": 50.0, "pressure_hpa": 1013.2}),
    );
    let dp = f(&r, "dew_point_c");
    assert!(close(dp, dew_point(20.0, 50.0), 1e-12));
    assert!(close(dp, 9.26, 0.01), "{dp}"); // the textbook value
    assert!(close(f(&r, "dew_point_spread_c"), 20.0 - dp, 1e-12));
    assert_eq!(r.result["condensation_risk"], json!(false));
    assert_eq!(f(&r, "temperature_trend_c_per_h"), 0.0);
    assert!(
        !r.result.contains_key("magnus_gamma"),
        "intermediate, not output"
    );

    // Saturated air: the dew point is the temperature; 1.5 °C warmer in 10 minutes = 9 °C/h.
    let r = gw.ok(
        "env-3",
        "environment",
        11,
        T0 + 600_000,
        json!({"temperature_c": 21.5, "humidity_pct": 100.0}),
    );
    assert!(close(f(&r, "dew_point_c"), 21.5, 1e-9));
    assert_eq!(r.result["condensation_risk"], json!(true));
    assert!(close(f(&r, "temperature_trend_c_per_h"), 9.0, 1e-9));

    // Cold and dry.
    let r = gw.ok(
        "env-3",
        "environment",
        12,
        T0 + 1_200_000,
        json!({"temperature_c": -10.0, "humidity_pct": 30.0}),
    );
    assert!(close(f(&r, "dew_point_c"), dew_point(-10.0, 30.0), 1e-12));
    assert!(
        close(f(&r, "dew_point_c"), -24.3, 0.1),
        "{}",
        f(&r, "dew_point_c")
    );

    // 0 % RH would make ln() -inf: caught by the rule with an explanation.
    let (stage, reason) = gw.rejected(
        "env-3",
        "environment",
        13,
        T0 + 1_800_000,
        json!({"temperature_c": 20.0, "humidity_pct": 0}),
    );
    assert_eq!(stage, Stage::Rule);
    assert_eq!(
        reason,
        "rule humidity_measurable: 0 % relative humidity is a sensor fault \
         (the dew point is undefined) (humidity_pct=0)"
    );
}

#[test]
fn gps_tracker() {
    let mut gw = Gateway::new();
    let r = gw.ok(
        "truck-42",
        "gps",
        1,
        T0,
        json!({"lat": 48.1374, "lon": 11.5755, "fix": "3d", "accuracy_m": 4.5}),
    );
    assert_eq!(r.flags, ["first_reading"]);
    assert_eq!(f(&r, "distance_m"), 0.0);
    assert_eq!(f(&r, "speed_kmh"), 0.0);
    assert_eq!(r.result["moving"], json!(false));

    // 0.009° north in 60 s: about 1 km at about 60 km/h.
    let r = gw.ok(
        "truck-42",
        "gps",
        2,
        T0 + 60_000,
        json!({"lat": 48.1464, "lon": 11.5755}),
    );
    let d = f(&r, "distance_m");
    assert!(close(
        d,
        haversine_m(48.1374, 11.5755, 48.1464, 11.5755),
        1e-9
    ));
    assert!(close(d, 0.009 * 111_195.08, 0.05), "{d}");
    assert!(close(f(&r, "speed_kmh"), d / 60.0 * 3.6, 1e-9));
    assert!(
        close(f(&r, "speed_kmh"), 60.05, 0.01),
        "{}",
        f(&r, "speed_kmh")
    );
    assert_eq!(r.result["moving"], json!(true));

    // A 1° jump in 60 s is ~6700 km/h: the output check rejects it …
    let (stage, reason) = gw.rejected(
        "truck-42",
        "gps",
        3,
        T0 + 120_000,
        json!({"lat": 49.1464, "lon": 11.5755}),
    );
    assert_eq!(stage, Stage::Check);
    assert!(
        reason.starts_with("check plausible_speed: faster than any road vehicle"),
        "{reason}"
    );
    // … and the next fix is measured from the last good one (seq 2), 120 s earlier.
    let r = gw.ok(
        "truck-42",
        "gps",
        4,
        T0 + 180_000,
        json!({"lat": 48.1464, "lon": 11.5885}),
    );
    let d = haversine_m(48.1464, 11.5755, 48.1464, 11.5885);
    assert!(close(f(&r, "distance_m"), d, 1e-9));
    assert!(close(f(&r, "speed_kmh"), d / 120.0 * 3.6, 1e-9));

    // No fix: a rule.
    let (stage, reason) = gw.rejected(
        "truck-42",
        "gps",
        5,
        T0 + 240_000,
        json!({"lat": 0, "lon": 0, "fix": "none"}),
    );
    assert_eq!(stage, Stage::Rule);
    assert_eq!(
        reason,
        "rule has_fix: the tracker reports no satellite fix (fix=\"none\")"
    );

    // The cloud recomputes the accepted fix from its input and the previous result.
    let prev = gw.ok(
        "truck-42",
        "gps",
        6,
        T0 + 300_000,
        json!({"lat": 48.15, "lon": 11.59}),
    );
    let last = gw.ok(
        "truck-42",
        "gps",
        7,
        T0 + 360_000,
        json!({"lat": 48.155, "lon": 11.595}),
    );
    let again = gw
        .engine
        .recompute(&last, Some(&Reading::from_result(&prev)))
        .unwrap();
    assert_eq!(again, last.result);
}

#[test]
fn devices_are_independent() {
    let mut gw = Gateway::new();
    gw.ok("van-1", "gps", 1, T0, json!({"lat": 10.0, "lon": 10.0}));
    let r = gw.ok(
        "van-2",
        "gps",
        1,
        T0 + 1000,
        json!({"lat": 11.0, "lon": 10.0}),
    );
    assert_eq!(
        r.flags,
        ["first_reading"],
        "van-2 has its own previous reading"
    );
    assert_eq!(f(&r, "distance_m"), 0.0);
}
