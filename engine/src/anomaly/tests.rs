use super::*;

/// splitmix64 + Box-Muller: deterministic Gaussian noise for the tests.
struct Noise(u64);

impl Noise {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Feeds `x` (learning) and returns the fired kinds.
fn feed(d: &mut FieldDetector, x: f64, p: &Params) -> Vec<Kind> {
    let s = d.score(x, p);
    d.update(x, &s, p);
    s.fired().collect()
}

/// A detector that has seen `n` samples of 100 + N(0, 1), with a slow daily-ish cycle.
fn warmed(n: usize, noise: &mut Noise, p: &Params) -> (FieldDetector, usize) {
    let mut d = FieldDetector::default();
    for i in 0..n {
        let fired = feed(&mut d, signal(i, noise), p);
        assert!(fired.is_empty(), "noise fired {fired:?} at {i}");
    }
    (d, n)
}

fn signal(i: usize, noise: &mut Noise) -> f64 {
    let cycle = 5.0 * (std::f64::consts::TAU * i as f64 / 1440.0).sin();
    ((100.0 + cycle + noise.gauss()) * 1000.0).round() / 1000.0
}

#[test]
fn defaults_are_valid_and_bad_knobs_name_their_path() {
    let p = Params::default();
    assert_eq!(p.warmup, 60);
    let mut spec = AnomalySpec::new(["x"]);
    spec.alpha = 1.5;
    let e = Params::from_spec("event_types.m.anomaly", &spec).unwrap_err();
    assert_eq!(e.path, "event_types.m.anomaly.alpha");
    let mut spec = AnomalySpec::new(["x"]);
    spec.drift_alpha = 0.5;
    let e = Params::from_spec("a", &spec).unwrap_err();
    assert_eq!(e.path, "a.drift_alpha");
    let mut spec = AnomalySpec::new(["x"]);
    spec.z_threshold = f64::NAN;
    assert_eq!(
        Params::from_spec("a", &spec).unwrap_err().path,
        "a.z_threshold"
    );
    let mut spec = AnomalySpec::new(["x"]);
    spec.stuck_repeats = 1;
    assert_eq!(
        Params::from_spec("a", &spec).unwrap_err().path,
        "a.stuck_repeats"
    );
}

#[test]
fn noise_with_a_cycle_stays_quiet() {
    let p = Params::default();
    let mut noise = Noise(1);
    let (d, _) = warmed(5000, &mut noise, &p);
    // The scale estimate is close to the noise's σ = 1 (the fast forecast adds a little).
    let sigma = d.sigma();
    assert!((0.9..1.3).contains(&sigma), "sigma {sigma}");
}

#[test]
fn spike_fires_once_and_does_not_poison_the_baseline() {
    let p = Params::default();
    let mut noise = Noise(2);
    let (mut d, i) = warmed(500, &mut noise, &p);
    let before = d.clone();
    let x = signal(i, &mut noise) + 40.0;
    assert_eq!(feed(&mut d, x, &p), [Kind::Spike]);
    // The level moved by at most alpha · CLIP · σ, the scale by a few percent.
    assert!((d.level - before.forecast()).abs() < p.alpha * CLIP * before.sigma() + 1e-9);
    assert!(d.mad < before.mad * 1.1);
    for j in 1..200 {
        let fired = feed(&mut d, signal(i + j, &mut noise), &p);
        assert!(fired.is_empty(), "after the spike: {fired:?} at +{j}");
    }
}

#[test]
fn single_spikes_never_raise_drift() {
    let p = Params::default();
    let mut noise = Noise(3);
    let (mut d, i) = warmed(300, &mut noise, &p);
    for j in 0..2000 {
        let mut x = signal(i + j, &mut noise);
        if j % 25 == 0 {
            x += if j % 50 == 0 { 30.0 } else { -30.0 };
        }
        let fired = feed(&mut d, x, &p);
        assert!(!fired.contains(&Kind::Drift), "drift at {j}");
        assert_eq!(fired.contains(&Kind::Spike), j % 25 == 0, "spike at {j}");
    }
}

#[test]
fn gradual_drift_fires_within_tens_of_samples_then_settles() {
    let p = Params::default();
    let mut noise = Noise(4);
    let (mut d, i) = warmed(400, &mut noise, &p);
    // +6 σ over 40 samples, then persisting.
    let mut first = None;
    let mut flags = 0;
    for j in 0..600 {
        let shift = 6.0 * (j as f64 / 40.0).min(1.0);
        let fired = feed(&mut d, signal(i + j, &mut noise) + shift, &p);
        assert!(
            !fired.contains(&Kind::Spike),
            "a gradual shift is no spike ({j})"
        );
        if fired.contains(&Kind::Drift) {
            first.get_or_insert(j);
            flags += 1;
            assert!(j < 100, "still flagging drift at {j}");
        }
    }
    let first = first.expect("drift detected");
    assert!(first < 70, "detected at {first}");
    assert!(flags <= 5, "{flags} drift flags for one shift");
}

#[test]
fn stuck_fires_on_a_frozen_value_and_adapts_to_coarse_resolution() {
    let p = Params::default();
    let mut noise = Noise(5);
    let (mut d, i) = warmed(300, &mut noise, &p);
    let frozen = signal(i, &mut noise);
    let mut fired_at = None;
    for j in 0..30 {
        let fired = feed(&mut d, frozen, &p);
        if fired.contains(&Kind::Stuck) {
            fired_at.get_or_insert(j + 1);
        }
    }
    assert_eq!(fired_at, Some(p.stuck_repeats as usize));
    // Recovers: the baselines only extrapolated while stuck.
    let mut false_alarms = 0;
    for j in 30..300 {
        false_alarms += feed(&mut d, signal(i + j, &mut noise), &p).len();
    }
    assert!(
        false_alarms <= 2,
        "{false_alarms} flags after the sensor recovered"
    );
    // The stuck run did not teach the detector that the field repeats: a second one is
    // caught as fast as the first.
    let frozen = signal(i + 300, &mut noise);
    let mut fired_at = None;
    for j in 0..30 {
        if feed(&mut d, frozen, &p).contains(&Kind::Stuck) {
            fired_at.get_or_insert(j + 1);
        }
    }
    assert_eq!(fired_at, Some(p.stuck_repeats as usize));

    // Whole-number resolution repeats often by chance: no flags on plain noise.
    let mut d = FieldDetector::default();
    for j in 0..20_000 {
        let x = (50.0 + 1.0 * noise.gauss()).round();
        let fired = feed(&mut d, x, &p);
        assert!(!fired.contains(&Kind::Stuck), "coarse noise stuck at {j}");
    }
    // A field that never changes is constant, not stuck.
    let mut d = FieldDetector::default();
    for _ in 0..500 {
        assert!(feed(&mut d, 7.0, &p).is_empty());
    }
}

#[test]
fn warmup_silences_everything() {
    let p = Params::default();
    let mut d = FieldDetector::default();
    for j in 0..p.warmup {
        let x = if j % 7 == 0 { 1e6 } else { 1.0 };
        let s = d.score(x, &p);
        assert_eq!(s.max(), 0.0);
        assert_eq!(s.fired().count(), 0);
        d.update(x, &s, &p);
    }
}

#[test]
fn an_outlier_during_warmup_does_not_blind_the_detector() {
    let p = Params::default();
    let mut noise = Noise(8);
    let mut d = FieldDetector::default();
    for i in 0..p.warmup as usize {
        let x = if i == 20 { 1e6 } else { signal(i, &mut noise) };
        feed(&mut d, x, &p);
    }
    assert!(d.sigma() < 5.0, "sigma {}", d.sigma());
    let i = p.warmup as usize;
    assert_eq!(
        feed(&mut d, signal(i, &mut noise) + 15.0, &p),
        [Kind::Spike]
    );
}

#[test]
fn extreme_values_keep_the_state_finite() {
    let p = Params::default();
    let mut noise = Noise(6);
    let (mut d, _) = warmed(200, &mut noise, &p);
    for x in [f64::MAX, -f64::MAX, 1e308, 0.0, f64::MIN_POSITIVE, -1e308] {
        let s = d.score(x, &p);
        assert!(s.spike.is_finite() && s.drift.is_finite() && s.stuck.is_finite());
        d.update(x, &s, &p);
        let mut bytes = Vec::new();
        ciborium::into_writer(&d, &mut bytes).unwrap();
        let back: FieldDetector = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back, d);
    }
}

fn meter_detectors(fields: &[&str]) -> Detectors {
    use crate::spec::{FieldSpec, FieldType};
    let mut specs = BTreeMap::new();
    specs.insert("v".to_string(), FieldSpec::new(FieldType::Number));
    specs.insert("relay".to_string(), FieldSpec::new(FieldType::String));
    let schema = Schema::compile("event_types.m", &specs).unwrap();
    Detectors::compile(
        "event_types.m",
        &AnomalySpec::new(fields.iter().copied()),
        &schema,
        &["p".to_string()],
    )
    .unwrap()
}

#[test]
fn fields_must_exist_and_be_numeric() {
    use crate::spec::{FieldSpec, FieldType};
    let mut specs = BTreeMap::new();
    specs.insert("v".to_string(), FieldSpec::new(FieldType::Number));
    specs.insert("relay".to_string(), FieldSpec::new(FieldType::String));
    let schema = Schema::compile("event_types.m", &specs).unwrap();
    let derived = ["p".to_string()];
    let compile = |fields: &[&str]| {
        Detectors::compile(
            "event_types.m",
            &AnomalySpec::new(fields.iter().copied()),
            &schema,
            &derived,
        )
    };
    assert!(compile(&["v", "p"]).is_ok());
    let e = compile(&["v", "volts"]).unwrap_err();
    assert_eq!(e.path, "event_types.m.anomaly.fields[1]");
    assert!(e.message.contains("unknown field 'volts'"), "{e}");
    let e = compile(&["relay"]).unwrap_err();
    assert_eq!(e.path, "event_types.m.anomaly.fields[0]");
    assert!(e.message.contains("string field"), "{e}");
    assert_eq!(
        compile(&["v", "v"]).unwrap_err().path,
        "event_types.m.anomaly.fields[1]"
    );
    assert_eq!(
        compile(&[]).unwrap_err().path,
        "event_types.m.anomaly.fields"
    );
}

#[test]
fn run_skips_missing_and_non_numeric_values_and_learns_only_when_asked() {
    let d = meter_detectors(&["v", "p"]);
    let mut state = TypeDetectors::new();
    let data: proto::Fields = serde_json::from_str(r#"{"v": 1.5}"#).unwrap();
    // Derived `p` is a boolean here: skipped.
    let v = d.run(&mut state, &data, &[EvalValue::Boolean(true)], true, 1);
    assert_eq!(v, Verdict::default());
    assert_eq!(state.len(), 1);
    assert_eq!(state["v"].samples(), 1);
    d.run(&mut state, &data, &[EvalValue::Float(2.0)], false, 2);
    assert_eq!(state.len(), 1, "not learning: nothing new");
    d.run(&mut state, &data, &[EvalValue::Float(f64::NAN)], true, 2);
    assert_eq!(state.len(), 1, "NaN is skipped");
    d.run(&mut state, &data, &[EvalValue::Float(2.0)], true, 3);
    assert_eq!(state["p"].samples(), 1);
    assert_eq!(state["v"].samples(), 3);
    // A field dropped from the config is pruned.
    state.insert("gone".into(), FieldDetector::default());
    d.run(&mut state, &data, &[], true, 4);
    assert!(!state.contains_key("gone"));
}

#[test]
fn state_round_trips_through_cbor() {
    let p = Params::default();
    let mut noise = Noise(7);
    let (d, _) = warmed(300, &mut noise, &p);
    let mut state = TypeDetectors::new();
    state.insert("v".into(), d);
    let mut bytes = Vec::new();
    ciborium::into_writer(&state, &mut bytes).unwrap();
    let back: TypeDetectors = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(back, state);
    // Bounded: the same size after 300 samples as after 30 000.
    let (big, _) = warmed(30_000, &mut noise, &p);
    let mut big_bytes = Vec::new();
    ciborium::into_writer(&big, &mut big_bytes).unwrap();
    assert!(big_bytes.len() <= 200, "{} bytes", big_bytes.len());
}
