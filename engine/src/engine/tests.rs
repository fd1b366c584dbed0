//! Pipeline tests: every stage and every rejection class, through `Engine::process`.

use super::*;
use serde_json::{Value, json};

const SPEC: &str = r#"
topic = "devices/{device}/events/{type}"

[event_types.meter]
allowed_devices = ["meter-*"]
max_clock_skew_s = 300

[event_types.meter.constants]
tariff = 0.5

[event_types.meter.fields]
kwh = { type = "number", required = true, min = 0 }
voltage = { type = "number", min = 0, max = 500 }
current = { type = "number", min = 0, default = 0 }
state = { type = "string", enum = ["on", "off"] }
note = { type = "string", max_len = 8 }

[[event_types.meter.rules]]
name = "counter_monotonic"
expr = "!has_prev || kwh >= prev.kwh"
message = "cumulative kWh must not decrease"

[[event_types.meter.calc]]
name = "delta_kwh"
expr = 'delta("kwh")'

[[event_types.meter.calc]]
name = "rate_kwh_s"
expr = 'rate("kwh")'

[[event_types.meter.calc]]
name = "cost"
expr = "delta_kwh * tariff"

[[event_types.meter.calc]]
name = "power_w"
expr = 'if(has("voltage"), voltage * current, 0)'

[[event_types.meter.checks]]
name = "cost_bounded"
expr = "cost < 100"
message = "cost is implausibly high"

[event_types.calcfail.fields]
x = { type = "number", required = true }

[[event_types.calcfail.calc]]
name = "inv"
expr = "1 / x"

[[event_types.calcfail.calc]]
name = "root"
expr = "math::sqrt(x)"

[[event_types.calcfail.calc]]
name = "label"
expr = 'if(x > 10, "big", "small")'
"#;

const T0: i64 = 1_764_000_000_000;

fn engine() -> Engine {
    let spec: EngineSpec = toml::from_str(SPEC).unwrap();
    Engine::new(&spec).unwrap()
}

fn payload(id: &str, seq: u64, ts: i64, data: Value) -> Vec<u8> {
    json!({"id": id, "seq": seq, "ts": ts, "data": data})
        .to_string()
        .into_bytes()
}

struct Run {
    engine: Engine,
    state: State,
}

impl Run {
    fn new() -> Run {
        Run {
            engine: engine(),
            state: State::new(),
        }
    }

    fn raw(&mut self, topic: &str, payload: &[u8], received_at: i64, replay: bool) -> Outcome {
        let input = Input {
            topic,
            payload,
            received_at,
            gateway: "gw-1",
            via: proto::Via::Gateway,
            replay,
        };
        self.engine.process(&mut self.state, &input)
    }

    /// A meter reading from `meter-1`, received 1 s after `ts`.
    fn meter(&mut self, seq: u64, ts: i64, data: Value) -> Outcome {
        let p = payload(&format!("m{seq}"), seq, ts, data);
        self.raw("devices/meter-1/events/meter", &p, ts + 1000, false)
    }
}

fn accepted(o: Outcome) -> (EventResult, Option<SeqRange>, bool) {
    match o {
        Outcome::Accepted { result, gap, late } => (result, gap, late),
        other => panic!("expected Accepted, got {other:?}"),
    }
}

fn rejected(o: Outcome) -> Rejection {
    match o {
        Outcome::Rejected(r) => r,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn num(r: &EventResult, k: &str) -> f64 {
    r.result[k]
        .as_f64()
        .unwrap_or_else(|| panic!("{k}: {:?}", r.result.get(k)))
}

#[test]
fn first_reading_then_deltas() {
    let mut run = Run::new();
    let (r, gap, late) = accepted(run.meter(1, T0, json!({"kwh": 10.0, "voltage": 230})));
    assert_eq!((gap, late), (None, false));
    assert_eq!(r.event_id, "meter-1/m1");
    assert_eq!(r.device, "meter-1");
    assert_eq!(r.event_type, "meter");
    assert_eq!((r.seq, r.ts, r.edge_seq), (1, T0, 0));
    assert_eq!(r.gateway, "gw-1");
    assert_eq!(r.processed_at, T0 + 1000);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.anomaly_score, 0.0);
    assert_eq!(r.correction, None);
    assert_eq!(r.flags, ["first_reading"]);
    assert_eq!(
        Value::Object(r.input.clone()),
        json!({"kwh": 10.0, "voltage": 230})
    );
    assert_eq!(num(&r, "delta_kwh"), 0.0);
    assert_eq!(num(&r, "rate_kwh_s"), 0.0);
    assert_eq!(num(&r, "cost"), 0.0);
    // current absent: its default (0) is used; the input is not changed.
    assert_eq!(num(&r, "power_w"), 0.0);
    assert_eq!(r.calc_version, run.engine.calc_version("meter").unwrap());

    let (r, _, _) = accepted(run.meter(
        2,
        T0 + 60_000,
        json!({"kwh": 12.5, "voltage": 230, "current": 2}),
    ));
    assert!(r.flags.is_empty(), "{:?}", r.flags);
    assert_eq!(num(&r, "delta_kwh"), 2.5);
    assert!((num(&r, "rate_kwh_s") - 2.5 / 60.0).abs() < 1e-12);
    assert_eq!(num(&r, "cost"), 1.25);
    assert_eq!(num(&r, "power_w"), 460.0);
    assert_eq!(
        r.result.keys().collect::<Vec<_>>(),
        ["cost", "delta_kwh", "power_w", "rate_kwh_s"]
    );
}

#[test]
fn topic_mismatch_is_a_decode_rejection() {
    let mut run = Run::new();
    let p = payload("a", 1, T0, json!({"kwh": 1}));
    let r = rejected(run.raw("devices/meter-1/status", &p, T0, false));
    assert_eq!(r.stage, Stage::Decode);
    assert_eq!(
        r.reason,
        "topic 'devices/meter-1/status' does not match the pattern \
         'devices/{device}/events/{type}'"
    );
    assert_eq!(r.subject, Subject::Document);
    assert_eq!((r.device, r.event_id, r.event_type), (None, None, None));
    assert!(run.state.is_empty());
}

#[test]
fn decode_and_envelope_errors() {
    let mut run = Run::new();
    let r = rejected(run.raw("devices/meter-1/events/meter", b"{not json", T0, false));
    assert_eq!(r.stage, Stage::Decode);
    assert_eq!(r.subject, Subject::Document);
    assert_eq!(r.device.as_deref(), Some("meter-1"));
    assert_eq!(r.event_type.as_deref(), Some("meter"));

    let p = json!({"id": "x1", "ts": T0, "data": {}}).to_string();
    let r = rejected(run.raw("devices/meter-1/events/meter", p.as_bytes(), T0, false));
    assert_eq!(r.stage, Stage::Schema);
    assert!(r.reason.contains("seq"), "{}", r.reason);
    assert_eq!(r.subject, Subject::Field("seq".into()));
    assert_eq!(r.event_id.as_deref(), Some("meter-1/x1"));
    // Neither touched the device's sequence.
    assert!(run.state.device("meter-1").is_none());
}

#[test]
fn payload_must_agree_with_topic() {
    let mut run = Run::new();
    let p = json!({"id": "a", "seq": 1, "ts": T0, "device": "meter-2", "data": {"kwh": 1}});
    let r = rejected(run.raw(
        "devices/meter-1/events/meter",
        p.to_string().as_bytes(),
        T0,
        false,
    ));
    assert_eq!(r.stage, Stage::Schema);
    assert_eq!(
        r.reason,
        "device: the payload says 'meter-2' but the topic says 'meter-1'"
    );
    assert_eq!(r.subject, Subject::Field("device".into()));
    assert_eq!(r.event_id.as_deref(), Some("meter-1/a"));
    let p = json!({"id": "a", "seq": 1, "ts": T0, "type": "gps", "data": {"kwh": 1}});
    let r = rejected(run.raw(
        "devices/meter-1/events/meter",
        p.to_string().as_bytes(),
        T0,
        false,
    ));
    assert_eq!(
        r.reason,
        "type: the payload says 'gps' but the topic says 'meter'"
    );
    assert_eq!(r.subject, Subject::Field("type".into()));
    // Agreeing values are fine.
    let p = json!({"id": "a", "seq": 1, "ts": T0, "device": "meter-1", "type": "meter",
                   "data": {"kwh": 1}});
    accepted(run.raw(
        "devices/meter-1/events/meter",
        p.to_string().as_bytes(),
        T0,
        false,
    ));
}

#[test]
fn a_new_device_beyond_max_devices_is_refused_and_known_ones_go_on() {
    let mut run = Run::new();
    run.state.set_max_devices(Some(2));
    let p = |seq| {
        payload(
            &format!("m{seq}"),
            seq,
            T0 + seq as i64 * 1000,
            json!({"kwh": 1}),
        )
    };
    for d in ["meter-1", "meter-2"] {
        accepted(run.raw(
            &format!("devices/{d}/events/meter"),
            &p(1),
            T0 + 5000,
            false,
        ));
    }
    let r = rejected(run.raw("devices/meter-3/events/meter", &p(1), T0 + 5000, false));
    assert_eq!(r.stage, Stage::Rule);
    assert_eq!(r.subject, Subject::Rule(MAX_DEVICES_RULE.to_string()));
    assert!(!r.transient);
    assert_eq!(
        r.reason,
        "device 'meter-3' is new and the gateway already tracks its maximum of 2 devices (max_devices)"
    );
    assert_eq!(
        run.state.len(),
        2,
        "nothing was allocated for the refused device"
    );
    // Known devices are not affected; a higher cap (a DLQ retry after raising it) admits it.
    accepted(run.raw("devices/meter-1/events/meter", &p(2), T0 + 5000, false));
    run.state.set_max_devices(Some(3));
    accepted(run.raw("devices/meter-3/events/meter", &p(1), T0 + 5000, true));
}

#[test]
fn a_device_id_over_the_limit_is_refused_before_it_has_state() {
    let mut run = Run::new();
    let p = payload("m1", 1, T0, json!({"kwh": 1}));
    let long = format!("meter-{}", "x".repeat(MAX_DEVICE_ID_BYTES - 5));
    let r = rejected(run.raw(&format!("devices/{long}/events/meter"), &p, T0, false));
    assert_eq!(r.stage, Stage::Decode);
    assert_eq!(r.subject, Subject::Field("device".to_string()));
    assert!(r.device.is_none(), "the id is not copied into the entry");
    assert!(
        r.reason.contains("129 bytes, over the limit of 128"),
        "{}",
        r.reason
    );
    assert!(run.state.is_empty(), "nothing was allocated for it");
    // At the limit it is an ordinary device.
    let ok = format!("meter-{}", "x".repeat(MAX_DEVICE_ID_BYTES - 6));
    accepted(run.raw(&format!("devices/{ok}/events/meter"), &p, T0, false));
}

#[test]
fn unknown_event_type_still_takes_its_seq() {
    let mut run = Run::new();
    // A new device gets no state for it …
    let p = payload("u1", 1, T0, json!({}));
    let r = rejected(run.raw("devices/meter-9/events/toaster", &p, T0, false));
    assert_eq!(r.stage, Stage::Schema);
    assert!(
        run.state.is_empty(),
        "no state for a type that does not exist"
    );
    // … a known one takes the seq.
    accepted(run.meter(1, T0, json!({"kwh": 1})));
    let p = payload("u2", 2, T0, json!({}));
    let r = rejected(run.raw("devices/meter-1/events/toaster", &p, T0, false));
    assert_eq!(r.stage, Stage::Schema);
    assert_eq!(
        r.reason,
        "unknown event type 'toaster' (known: calcfail, meter)"
    );
    assert_eq!(r.subject, Subject::Document);
    assert_eq!(r.event_type.as_deref(), Some("toaster"));
    // seq 2 is taken: the next one is in order, no gap.
    let (_, gap, _) = accepted(run.meter(3, T0 + 2000, json!({"kwh": 2})));
    assert_eq!(gap, None);
}

fn schema_reason(data: Value) -> String {
    let mut run = Run::new();
    let r = rejected(run.meter(1, T0, data));
    assert_eq!(r.stage, Stage::Schema, "{}", r.reason);
    assert_eq!(r.event_id.as_deref(), Some("meter-1/m1"));
    // The subject is the field the reason starts with.
    let Subject::Field(f) = &r.subject else {
        panic!("{:?}", r.subject)
    };
    assert!(r.reason.starts_with(&format!("{f}: ")), "{f}: {}", r.reason);
    r.reason
}

#[test]
fn schema_rejections_name_the_field() {
    assert_eq!(
        schema_reason(json!({"voltage": 230})),
        "data.kwh: required field is missing"
    );
    assert_eq!(
        schema_reason(json!({"kwh": "10"})),
        "data.kwh: expected a number, got string \"10\""
    );
    assert_eq!(
        schema_reason(json!({"kwh": 1, "voltage": 612})),
        "data.voltage: 612 is above max 500"
    );
    assert_eq!(
        schema_reason(json!({"kwh": -1})),
        "data.kwh: -1 is below min 0"
    );
    assert_eq!(
        schema_reason(json!({"kwh": 1, "state": "idle"})),
        "data.state: 'idle' is not one of 'on', 'off'"
    );
    assert_eq!(
        schema_reason(json!({"kwh": 1, "note": "far too long"})),
        "data.note: 12 characters, more than max_len 8"
    );
    assert_eq!(
        schema_reason(json!({"kwh": 1, "volts": 3})),
        "data: undeclared field 'volts' (declared: current, kwh, note, state, voltage)"
    );
}

#[test]
fn several_schema_problems_have_the_first_one_as_subject() {
    let mut run = Run::new();
    let r = rejected(run.meter(1, T0, json!({"voltage": 900, "volts": 3})));
    assert_eq!(r.subject, Subject::Field("data.kwh".into()));
    let r = rejected(run.meter(2, T0, json!({"kwh": 1, "volts": 3})));
    assert_eq!(r.subject, Subject::Field("data".into()));
}

#[test]
fn rejected_message_still_marks_its_seq() {
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 1})));
    rejected(run.meter(2, T0 + 1000, json!({"kwh": "bad"})));
    // seq 2 is in the DLQ, not missing: a new message with seq 2 is a duplicate …
    let p = payload("other", 2, T0 + 2000, json!({"kwh": 2}));
    let o = run.raw("devices/meter-1/events/meter", &p, T0 + 2000, false);
    let Outcome::Duplicate {
        event_id,
        device,
        reason,
    } = o
    else {
        panic!("{o:?}")
    };
    assert_eq!(event_id, "meter-1/other");
    assert_eq!(device, "meter-1");
    assert_eq!(reason, "seq 2 was already seen (highest 2)");
    // … and seq 3 shows no gap.
    let (_, gap, _) = accepted(run.meter(3, T0 + 3000, json!({"kwh": 3})));
    assert_eq!(gap, None);
    assert!(
        run.state
            .device("meter-1")
            .unwrap()
            .seq()
            .missing()
            .is_empty()
    );
}

#[test]
fn rule_failure_names_rule_and_values() {
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 12})));
    let r = rejected(run.meter(2, T0 + 1000, json!({"kwh": 10})));
    assert_eq!(r.stage, Stage::Rule);
    assert_eq!(
        r.reason,
        "rule counter_monotonic: cumulative kWh must not decrease \
         (has_prev=true, kwh=10, prev.kwh=12)"
    );
    assert_eq!(r.subject, Subject::Rule("counter_monotonic".into()));
    // The rejected reading did not become the previous one.
    let (res, _, _) = accepted(run.meter(3, T0 + 2000, json!({"kwh": 13})));
    assert_eq!(num(&res, "delta_kwh"), 1.0);
}

#[test]
fn allow_list_rejects_other_devices() {
    let mut run = Run::new();
    let p = payload("a", 1, T0, json!({"kwh": 1}));
    let r = rejected(run.raw("devices/sensor-9/events/meter", &p, T0, false));
    assert_eq!(r.stage, Stage::Rule);
    assert_eq!(
        r.reason,
        "rule allowed_devices: device 'sensor-9' may not send 'meter' events (allowed: meter-*)"
    );
    assert_eq!(r.subject, Subject::Rule("allowed_devices".into()));
    // A device no type admits gets no state, so it takes no max_devices place.
    assert!(run.state.is_empty());
    run.state.set_max_devices(Some(1));
    for i in 0..10 {
        let r = rejected(run.raw(&format!("devices/sensor-{i}/events/meter"), &p, T0, false));
        assert_eq!(r.subject, Subject::Rule("allowed_devices".into()));
    }
    accepted(run.meter(1, T0, json!({"kwh": 1})));
}

#[test]
fn clock_skew_rejects() {
    let mut run = Run::new();
    let p = payload("a", 1, T0, json!({"kwh": 1}));
    let r = rejected(run.raw("devices/meter-1/events/meter", &p, T0 - 301_000, false));
    assert_eq!(r.stage, Stage::Rule);
    assert_eq!(
        r.reason,
        "rule max_clock_skew_s: ts is 301 s ahead of received_at (max 300 s)"
    );
    assert_eq!(r.subject, Subject::Rule("max_clock_skew_s".into()));
    accepted(run.raw(
        "devices/meter-1/events/meter",
        &payload("b", 2, T0, json!({"kwh": 1})),
        T0 - 300_000,
        false,
    ));
}

fn calcfail(x: f64) -> Outcome {
    let mut run = Run::new();
    let p = payload("c", 1, T0, json!({"x": x}));
    run.raw("devices/d/events/calcfail", &p, T0, false)
}

#[test]
fn non_finite_calc_results_are_rejected() {
    let r = rejected(calcfail(0.0));
    assert_eq!(r.stage, Stage::Calc);
    assert_eq!(r.reason, "calc inv: result is inf (x=0)");
    assert_eq!(r.subject, Subject::Field("inv".into()));
    let r = rejected(calcfail(-4.0));
    assert_eq!(r.reason, "calc root: result is NaN (x=-4)");
    let (res, _, _) = accepted(calcfail(16.0));
    assert_eq!(res.result["inv"], json!(0.0625));
    assert_eq!(res.result["root"], json!(4.0));
    assert_eq!(res.result["label"], json!("big"));
}

#[test]
fn check_failure_is_rejected() {
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 0})));
    let r = rejected(run.meter(2, T0 + 1000, json!({"kwh": 500})));
    assert_eq!(r.stage, Stage::Check);
    assert_eq!(
        r.reason,
        "check cost_bounded: cost is implausibly high (cost=250)"
    );
    assert_eq!(r.subject, Subject::Rule("cost_bounded".into()));
}

#[test]
fn gap_late_and_out_of_order() {
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 1})));
    let (r, gap, late) = accepted(run.meter(4, T0 + 3000, json!({"kwh": 4})));
    assert_eq!(gap, Some(SeqRange::new(2, 3)));
    assert!(!late);
    assert_eq!(num(&r, "delta_kwh"), 3.0);
    // seq 2 arrives late, older than the stored reading (seq 4): calculated against the
    // reading just before it (seq 1), kept in the earlier-readings window.
    let (r, gap, late) = accepted(run.meter(2, T0 + 1000, json!({"kwh": 2})));
    assert_eq!((gap, late), (None, true));
    assert_eq!(r.flags, ["earlier_previous", "late"]);
    assert_eq!(num(&r, "delta_kwh"), 1.0);
    assert_eq!(
        run.state.device("meter-1").unwrap().seq().missing(),
        &[SeqRange::new(3, 3)]
    );
    // seq 3 then finds seq 2 (a late reading joins the window) as its predecessor.
    let (r, _, late) = accepted(run.meter(3, T0 + 2000, json!({"kwh": 3})));
    assert!(late);
    assert_eq!(num(&r, "delta_kwh"), 1.0);
    // The stored previous reading is still seq 4.
    let (r, _, _) = accepted(run.meter(5, T0 + 4000, json!({"kwh": 6})));
    assert_eq!(num(&r, "delta_kwh"), 2.0);
    let kept: Vec<u64> = run
        .state
        .device("meter-1")
        .unwrap()
        .readings("meter")
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        kept,
        [1, 2, 3, 4, 5],
        "oldest first, the previous reading last, bounded by the window's capacity"
    );
    // A gap is reported on a rejected message too.
    let r = rejected(run.meter(9, T0 + 5000, json!({"kwh": "x"})));
    assert_eq!(r.gap, Some(SeqRange::new(6, 8)));
    assert_eq!(run.state.missing_total(), 3);
    assert_eq!(run.state.open_gaps().count(), 1);
}

#[test]
fn a_late_event_older_than_the_window_has_no_previous_reading() {
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 1})));
    for s in 7..=12u64 {
        accepted(run.meter(s, T0 + s as i64 * 1000, json!({"kwh": s})));
    }
    // seq 2 is older than every kept reading (8..=11 and the latest, 12).
    let (r, _, late) = accepted(run.meter(2, T0 + 2000, json!({"kwh": 2})));
    assert!(late);
    assert_eq!(r.flags, ["out_of_order", "late"]);
    assert_eq!(num(&r, "delta_kwh"), 0.0);
    assert_eq!(
        run.state
            .device("meter-1")
            .unwrap()
            .readings("meter")
            .unwrap()
            .len(),
        crate::window::EARLIER_READINGS + 1
    );
}

#[test]
fn duplicates_and_replay() {
    let mut run = Run::new();
    let p = payload("m1", 1, T0, json!({"kwh": 1}));
    accepted(run.raw("devices/meter-1/events/meter", &p, T0, false));
    assert!(!run.state.take_dirty().is_empty());
    // The same message again (QoS 1 redelivery): a duplicate by id.
    let o = run.raw("devices/meter-1/events/meter", &p, T0, false);
    let Outcome::Duplicate { reason, .. } = o else {
        panic!("{o:?}")
    };
    assert_eq!(reason, "id 'm1' was seen recently");
    assert!(
        run.state.take_dirty().is_empty(),
        "a duplicate changes nothing"
    );
    // A replay (DLQ retry) goes through.
    let (r, _, _) = accepted(run.raw("devices/meter-1/events/meter", &p, T0, true));
    assert_eq!(r.flags, ["out_of_order", "replay"]);
}

#[test]
fn device_restart_resets_sequence() {
    let mut run = Run::new();
    for s in 1..=3 {
        accepted(run.meter(s, T0 + s as i64 * 1000, json!({"kwh": s})));
    }
    let p = payload("boot2-1", 1, T0 + 10_000, json!({"kwh": 5}));
    let (r, gap, _) = accepted(run.raw("devices/meter-1/events/meter", &p, T0 + 10_000, false));
    assert_eq!(gap, None);
    assert_eq!(r.flags, ["seq_reset"]);
    assert_eq!(
        num(&r, "delta_kwh"),
        2.0,
        "the previous reading survives a restart"
    );
    assert_eq!(run.state.device("meter-1").unwrap().seq().resets(), 1);
}

#[test]
fn state_survives_a_restart() {
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 1, "state": "on"})));
    accepted(run.meter(3, T0 + 2000, json!({"kwh": 3, "state": "on"})));
    let dirty = run.state.take_dirty();
    assert_eq!(dirty.len(), 1);
    // Persist and load (JSON here; the agent uses CBOR).
    let mut fresh = State::new();
    for (d, s) in dirty {
        let bytes = serde_json::to_vec(&s).unwrap();
        fresh.insert(d, serde_json::from_slice(&bytes).unwrap());
    }
    let mut run2 = Run {
        engine: engine(),
        state: fresh,
    };
    let a = run.meter(4, T0 + 3000, json!({"kwh": 7}));
    let b = run2.meter(4, T0 + 3000, json!({"kwh": 7}));
    assert_eq!(a, b, "same state + same input → same outcome");
    let (r, _, _) = accepted(b);
    assert_eq!(num(&r, "delta_kwh"), 4.0);
    // The gap (seq 2) is still open; seq 2 is late.
    let (_, _, late) = accepted(run2.meter(2, T0 + 1000, json!({"kwh": 2})));
    assert!(late);
}

#[test]
fn recompute_reproduces_results() {
    let mut run = Run::new();
    let mut results = Vec::new();
    for (s, kwh) in [(1, 1.0), (2, 1.5), (3, 4.0)] {
        let (r, _, _) = accepted(run.meter(
            s,
            T0 + s as i64 * 30_000,
            json!({"kwh": kwh, "voltage": 231, "current": 1.5}),
        ));
        results.push(r);
    }
    for (i, r) in results.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| Reading::from_result(&results[p]));
        let fields = run.engine.recompute(r, prev.as_ref()).unwrap();
        assert_eq!(fields, r.result, "result {i}");
    }
    // A tampered input gives different values.
    let mut bad = results[2].clone();
    bad.input.insert("kwh".into(), json!(5.0));
    let prev = Reading::from_result(&results[1]);
    assert_ne!(run.engine.recompute(&bad, Some(&prev)).unwrap(), bad.result);
    // An invalid one is rejected with the stage.
    bad.input.insert("kwh".into(), json!(-5.0));
    let r = run.engine.recompute(&bad, Some(&prev)).unwrap_err();
    assert_eq!(r.stage, Stage::Schema);
    assert_eq!(r.subject, Subject::Field("data.kwh".into()));
}

#[test]
fn never_panics_on_garbage() {
    let mut run = Run::new();
    // A tiny deterministic generator: no randomness in tests either.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let topics = [
        "devices/meter-1/events/meter",
        "devices/d/events/calcfail",
        "devices/meter-1/events/nope",
        "devices/+/events/#",
        "",
        "devices/meter-1/events/meter/x",
    ];
    let values = [
        json!(null),
        json!(1e308),
        json!(-1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0),
        json!(""),
        json!("on"),
        json!([1, 2]),
        json!({"a": {"b": 1}}),
        json!(true),
    ];
    let keys = ["kwh", "voltage", "current", "state", "note", "x", "zz"];
    for i in 0..3000u64 {
        let topic = topics[(next() % topics.len() as u64) as usize];
        let payload: Vec<u8> = if i % 5 == 0 {
            (0..(next() % 40)).map(|_| next() as u8).collect()
        } else {
            let mut data = serde_json::Map::new();
            for _ in 0..(next() % 4) {
                let k = keys[(next() % keys.len() as u64) as usize];
                data.insert(
                    k.into(),
                    values[(next() % values.len() as u64) as usize].clone(),
                );
            }
            let seq = match next() % 4 {
                0 => 0,
                1 => u64::MAX,
                _ => next() % 20,
            };
            let ts = match next() % 3 {
                0 => i64::MIN,
                1 => i64::MAX,
                _ => T0 + (next() % 100_000) as i64,
            };
            json!({"id": format!("g{}", next() % 50), "seq": seq, "ts": ts, "data": data})
                .to_string()
                .into_bytes()
        };
        let received_at = if i % 7 == 0 { i64::MIN } else { T0 };
        let _ = run.raw(topic, &payload, received_at, i % 11 == 0);
    }
}

#[test]
fn engine_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<State>();
}

fn spec_error(toml_text: &str) -> String {
    let spec: EngineSpec = toml::from_str(toml_text).unwrap();
    Engine::new(&spec).unwrap_err().to_string()
}

#[test]
fn spec_errors_name_the_path() {
    let base = r#"
[event_types.meter.fields]
kwh = { type = "number", required = true }
voltage = { type = "number" }
"#;
    let e = spec_error(&format!(
        "{base}\n[[event_types.meter.calc]]\nname = \"a\"\nexpr = \"kwh\"\n\
         [[event_types.meter.calc]]\nname = \"b\"\nexpr = \"volts * 2\"\n"
    ));
    assert_eq!(
        e,
        "event_types.meter.calc[1].expr: unknown variable 'volts'"
    );
    let e = spec_error(&format!(
        "{base}\n[[event_types.meter.rules]]\nname = \"r\"\nexpr = \"voltag > 1\"\n"
    ));
    assert_eq!(
        e,
        "event_types.meter.rules[0].expr: unknown variable 'voltag' (did you mean 'voltage'?)"
    );
    let e = spec_error(&format!(
        "{base}\n[[event_types.meter.checks]]\nname = \"c\"\nexpr = 'delta(\"kwhh\") > 0'\n"
    ));
    assert!(
        e.starts_with("event_types.meter.checks[0].expr: delta(\"kwhh\"): unknown field 'kwhh'"),
        "{e}"
    );
    let e =
        spec_error("[event_types.meter.fields]\nkwh = { type = \"number\", min = 5, max = 1 }\n");
    assert_eq!(e, "event_types.meter.fields.kwh: min > max (5 > 1)");
    let e = spec_error(&format!("topic = \"devices/{{device}}\"\n{base}"));
    assert!(e.starts_with("topic: "), "{e}");
    let e = spec_error(&format!("[limits]\nmax_depth = 1000\n{base}"));
    assert!(e.starts_with("limits.max_depth: "), "{e}");
    let e = spec_error("");
    assert!(e.starts_with("event_types: "), "{e}");
    let e = spec_error(&format!(
        "{base}\n[[event_types.meter.calc]]\nname = \"kwh\"\nexpr = \"1\"\n"
    ));
    assert_eq!(
        e,
        "event_types.meter.calc[0].name: 'kwh' is also a data field"
    );
    let e = spec_error(&format!(
        "{base}\n[[event_types.meter.calc]]\nname = \"my-field\"\nexpr = \"1\"\n"
    ));
    assert!(
        e.starts_with("event_types.meter.calc[0].name: 'my-field' is not an identifier"),
        "{e}"
    );
    let e = spec_error(&format!(
        "{base}\n[event_types.meter.constants]\ntariff = [1]\n"
    ));
    assert_eq!(
        e,
        "event_types.meter.constants.tariff: a constant must be a number, a string or a boolean"
    );
    let e = spec_error(&format!("{base}\n[event_types.meter.constants]\nkwh = 1\n"));
    assert_eq!(
        e,
        "event_types.meter.constants.kwh: 'kwh' is also a data field"
    );
    let e = spec_error("[event_types.\"a/b\"]\n");
    assert!(e.starts_with("event_types.a/b: "), "{e}");
}

#[test]
fn unknown_config_keys_are_refused() {
    let e = toml::from_str::<EngineSpec>("[event_types.m]\nrulez = []\n").unwrap_err();
    assert!(e.to_string().contains("rulez"), "{e}");
    let e = toml::from_str::<EngineSpec>(
        "[event_types.m.fields]\nk = { type = \"number\", maximum = 3 }\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("maximum"), "{e}");
    let e = toml::from_str::<EngineSpec>("[event_types.m.fields]\nk = { type = \"float64\" }\n")
        .unwrap_err();
    assert!(e.to_string().contains("float64"), "{e}");
}

/// A pulse counter: its rate needs the previous reading, except on a boot message.
const PULSE: &str = r#"
topic = "devices/{device}/events/{type}"
[event_types.pulse.fields]
count = { type = "number", required = true }
boot = { type = "boolean", default = false }
[[event_types.pulse.calc]]
name = "per_min"
expr = 'if(boot, 0, delta("count") / dt() * 60)'
[event_types.inv.fields]
x = { type = "number", required = true }
[[event_types.inv.calc]]
name = "inv"
expr = "1 / x"
"#;

#[test]
fn only_failures_for_want_of_a_previous_reading_are_transient() {
    let spec: EngineSpec = toml::from_str(PULSE).unwrap();
    let mut run = Run {
        engine: Engine::new(&spec).unwrap(),
        state: State::new(),
    };
    let topic = "devices/p/events/pulse";
    // Seq 2 arrives before the boot message: no previous reading, 0/0 → transient.
    let two = payload("b", 2, T0 + 60_000, json!({"count": 30}));
    let r = rejected(run.raw(topic, &two, T0 + 61_000, false));
    assert_eq!(r.stage, Stage::Calc);
    assert!(r.transient, "{r:?}");
    // The late boot message is accepted and becomes the previous reading…
    let one = payload("a", 1, T0, json!({"count": 10, "boot": true}));
    accepted(run.raw(topic, &one, T0 + 62_000, false));
    // …so replaying seq 2 now succeeds.
    let (res, _, _) = accepted(run.raw(topic, &two, T0 + 61_000, true));
    assert_eq!(res.result["per_min"], json!(20.0));
    assert!(res.flags.contains(&flags::REPLAY.to_string()));
    // With a previous reading, the same failure would be permanent; and a failure that does
    // not depend on the previous reading is permanent.
    let r = rejected(run.raw(
        "devices/q/events/inv",
        &payload("c", 1, T0, json!({"x": 0})),
        T0,
        false,
    ));
    assert_eq!(r.stage, Stage::Calc);
    assert!(!r.transient);
    // Decode and schema failures are permanent.
    assert!(!rejected(run.raw(topic, b"{", T0, false)).transient);
    let r = rejected(run.raw(topic, &payload("d", 5, T0, json!({})), T0, false));
    assert_eq!(r.stage, Stage::Schema);
    assert!(!r.transient);
}

// ── Anomaly detectors in the pipeline ─────────────────────────────────────────────────────

fn anomaly_run(extra: &str) -> Run {
    let text = format!(
        "{SPEC}\n[event_types.meter.anomaly]\nfields = [\"voltage\", \"power_w\"]\nwarmup = 10\n{extra}"
    );
    let spec: EngineSpec = toml::from_str(&text).unwrap();
    Run {
        engine: Engine::new(&spec).unwrap(),
        state: State::new(),
    }
}

/// Readings 1..=n at one a second with a little deterministic jitter on the voltage.
fn warm_meter(run: &mut Run, n: u64) {
    for i in 1..=n {
        let v = 230.0 + [0.4, -0.3, 0.1, -0.5, 0.2, 0.6, -0.1][(i % 7) as usize];
        let (r, _, _) = accepted(run.meter(
            i,
            T0 + i as i64 * 1000,
            json!({"kwh": i, "voltage": v, "current": 2}),
        ));
        assert_eq!(r.status, Status::Ok, "reading {i}: {:?}", r.flags);
    }
}

#[test]
fn a_spike_is_flagged_and_scored() {
    let mut run = anomaly_run("");
    warm_meter(&mut run, 40);
    let prev = run
        .state
        .device("meter-1")
        .unwrap()
        .previous("meter")
        .cloned();
    let (r, _, _) = accepted(run.meter(
        41,
        T0 + 41_000,
        json!({"kwh": 41, "voltage": 300, "current": 2}),
    ));
    assert_eq!(r.status, Status::Anomaly);
    assert_eq!(r.flags, ["anomaly:spike:voltage", "anomaly:spike:power_w"]);
    assert!(r.anomaly_score >= 1.0, "{}", r.anomaly_score);
    // The values are untouched and recompute (verification) agrees.
    assert_eq!(num(&r, "power_w"), 600.0);
    assert_eq!(run.engine.recompute(&r, prev.as_ref()).unwrap(), r.result);
    // A normal reading afterwards scores well below 1.
    let (r, _, _) = accepted(run.meter(
        43,
        T0 + 43_000,
        json!({"kwh": 43, "voltage": 230.1, "current": 2}),
    ));
    assert_eq!(r.status, Status::Ok);
    assert!(r.anomaly_score < 1.0);
}

#[test]
fn without_an_anomaly_table_the_score_is_zero() {
    let mut run = Run::new();
    for i in 1..=30 {
        let v = if i == 30 { 400 } else { 230 };
        let (r, _, _) =
            accepted(run.meter(i, T0 + i as i64 * 1000, json!({"kwh": i, "voltage": v})));
        assert_eq!((r.status, r.anomaly_score), (Status::Ok, 0.0));
    }
    assert!(
        run.state
            .device("meter-1")
            .unwrap()
            .detectors("meter")
            .is_none()
    );
}

#[test]
fn late_out_of_order_and_replayed_events_are_scored_but_not_learned() {
    let mut run = anomaly_run("");
    warm_meter(&mut run, 40);
    let before = run
        .state
        .device("meter-1")
        .unwrap()
        .detectors("meter")
        .unwrap()
        .clone();
    // Skip seq 41, then deliver it late (and out of order) with a spike: flagged, not learned.
    accepted(run.meter(
        42,
        T0 + 42_000,
        json!({"kwh": 42, "voltage": 230, "current": 2}),
    ));
    let learned = run
        .state
        .device("meter-1")
        .unwrap()
        .detectors("meter")
        .unwrap()
        .clone();
    assert_ne!(learned, before);
    let (r, _, late) = accepted(run.meter(
        41,
        T0 + 41_000,
        json!({"kwh": 41, "voltage": 300, "current": 2}),
    ));
    assert!(late);
    assert_eq!(r.status, Status::Anomaly);
    assert_eq!(
        run.state
            .device("meter-1")
            .unwrap()
            .detectors("meter")
            .unwrap(),
        &learned
    );
    // A replay of an in-order message: scored, not learned.
    let p = payload(
        "m43",
        43,
        T0 + 43_000,
        json!({"kwh": 43, "voltage": 229.9, "current": 2}),
    );
    let (r, _, _) = accepted(run.raw("devices/meter-1/events/meter", &p, T0 + 43_500, true));
    assert!(r.flags.contains(&"replay".to_string()));
    assert_eq!(
        run.state
            .device("meter-1")
            .unwrap()
            .detectors("meter")
            .unwrap(),
        &learned
    );
}

#[test]
fn anomaly_config_errors_name_the_path_and_leave_calc_version_alone() {
    let base = "[event_types.meter.fields]\nkwh = { type = \"number\" }\nstate = { type = \"string\" }\n\
                [[event_types.meter.calc]]\nname = \"twice\"\nexpr = \"kwh * 2\"\n\
                [event_types.meter.anomaly]\n";
    assert_eq!(
        spec_error(&format!("{base}fields = [\"kwh\", \"volts\"]")),
        "event_types.meter.anomaly.fields[1]: unknown field 'volts' (data and derived fields: kwh, twice)"
    );
    assert_eq!(
        spec_error(&format!("{base}fields = [\"state\"]")),
        "event_types.meter.anomaly.fields[0]: 'state' is a string field: only numeric fields can be watched"
    );
    assert_eq!(
        spec_error(&format!("{base}fields = [\"kwh\"]\nalpha = 2")),
        "event_types.meter.anomaly.alpha: must be between 0 and 1 (exclusive)"
    );
    let e = toml::from_str::<EngineSpec>(&format!("{base}fields = [\"kwh\"]\nz = 3")).unwrap_err();
    assert!(e.to_string().contains("unknown field `z`"), "{e}");

    let with: EngineSpec = toml::from_str(&format!("{base}fields = [\"kwh\", \"twice\"]")).unwrap();
    let without: EngineSpec =
        toml::from_str(base.trim_end_matches("[event_types.meter.anomaly]\n")).unwrap();
    assert_eq!(
        Engine::new(&with).unwrap().calc_version("meter"),
        Engine::new(&without).unwrap().calc_version("meter")
    );
}

#[test]
fn device_state_without_detectors_still_loads() {
    // A state written before the detectors existed: no `anomaly` key.
    let mut run = Run::new();
    accepted(run.meter(1, T0, json!({"kwh": 1})));
    let old = run.state.device("meter-1").unwrap().clone();
    let mut bytes = Vec::new();
    ciborium::into_writer(&old, &mut bytes).unwrap();
    assert_eq!(
        crate::state::tests::stored_keys(&bytes),
        ["seq", "readings"]
    );
    let back: crate::DeviceState = ciborium::from_reader(bytes.as_slice()).unwrap();
    let mut run = anomaly_run("");
    run.state.insert("meter-1".into(), back);
    let (r, _, _) = accepted(run.meter(2, T0 + 1000, json!({"kwh": 2, "voltage": 230})));
    assert_eq!(r.status, Status::Ok);
    assert_eq!(
        run.state
            .device("meter-1")
            .unwrap()
            .detectors("meter")
            .unwrap()["voltage"]
            .samples(),
        1
    );
}
