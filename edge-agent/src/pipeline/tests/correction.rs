//! Edge corrections through the pipeline: a late arrival makes the device's next result in
//! the same batch stale; it is recalculated against the late one, stored corrected (once,
//! with its history in sled) and the late one itself is calculated against its predecessor.

use bytes::Bytes;
use engine::EngineSpec;
use proto::{EventResult, Status};
use serde_json::json;

use crate::ingest::Ack;
use crate::pipeline::*;
use crate::store::outbox::OutboxConfig;

const SPEC: &str = r#"
topic = "devices/{device}/events/{type}"
[event_types.meter.fields]
kwh = { type = "number", required = true }
[[event_types.meter.calc]]
name = "used"
expr = 'delta("kwh")'
"#;

const T0: i64 = 1_764_000_000_000;

fn open(dir: &std::path::Path) -> (Pipeline, Outbox) {
    let mut store = Store::open(dir).unwrap();
    let outbox = store.open_outbox(OutboxConfig::default()).unwrap();
    let spec: EngineSpec = toml::from_str(SPEC).unwrap();
    let p = Pipeline::new(
        Engine::new(&spec).unwrap(),
        store,
        outbox.clone(),
        "gw".into(),
        &PipelineConfig::default(),
    )
    .unwrap();
    (p, outbox)
}

fn meter(seq: u64, kwh: f64) -> Inbound {
    let body = json!({"id": format!("e{seq}"), "seq": seq, "ts": T0 + seq as i64 * 1000, "data": {"kwh": kwh}});
    Inbound {
        topic: "devices/m1/events/meter".into(),
        payload: Bytes::from(body.to_string()),
        received_at: T0 + 60_000,
        ack: Ack::none(),
    }
}

fn feed(p: &mut Pipeline, msgs: Vec<Inbound>) {
    let mut batch = msgs;
    p.process(&mut batch, &mut AckSet::default()).unwrap();
}

fn outbox(o: &Outbox) -> Vec<EventResult> {
    o.read(1, 1000, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, v)| proto::wire::decode(&v).unwrap())
        .collect()
}

#[test]
fn a_late_arrival_corrects_the_result_it_made_stale_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, o) = open(dir.path());
    feed(&mut p, vec![meter(1, 10.0)]);
    // seq 3 overtakes seq 2 in the same batch.
    feed(&mut p, vec![meter(3, 16.0), meter(2, 12.0)]);
    let r = outbox(&o);
    assert_eq!(r.len(), 3);
    let (s3, s2) = (&r[1], &r[2]);
    assert_eq!((s3.seq, s2.seq), (3, 2));
    // The late one: against seq 1.
    assert_eq!(s2.result["used"], 2.0);
    assert!(s2.flags.iter().any(|f| f == "earlier_previous"));
    // The stale one: corrected against seq 2 (it was 6 kWh across the gap).
    assert_eq!(s3.status, Status::Corrected);
    assert_eq!(s3.result["used"], 4.0);
    let c = s3.correction.as_ref().unwrap();
    assert_eq!(c.previous_result["used"], 6.0);
    assert_eq!(c.by, proto::CorrectedBy::Edge);
    assert!(
        c.reason.starts_with("late arrival m1/e2 comes before it"),
        "{}",
        c.reason
    );
    assert!(s3.flags.iter().any(|f| f == "previous_arrived_late"));
    assert!(p.store.corrected("m1/e3").unwrap());
    assert_eq!(p.store.counters().corrected, 1);

    // Reopened: the history and the count are durable.
    drop((p, o));
    let (p, _) = open(dir.path());
    assert!(p.store.corrected("m1/e3").unwrap());
    assert_eq!(p.store.counters().corrected, 1);
}

#[test]
fn a_stale_result_already_in_the_outbox_is_left_to_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, o) = open(dir.path());
    feed(&mut p, vec![meter(1, 10.0)]);
    feed(&mut p, vec![meter(3, 16.0)]);
    feed(&mut p, vec![meter(2, 12.0)]);
    let r = outbox(&o);
    assert_eq!(
        r[1].status,
        Status::Ok,
        "durable before the late one came: not rewritten"
    );
    assert_eq!(r[1].result["used"], 6.0);
    assert_eq!(r[2].result["used"], 2.0);
    assert!(!p.store.corrected("m1/e3").unwrap());
}
