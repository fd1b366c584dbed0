//! Missed events through the pipeline: gaps remembered in the commit that revealed them,
//! declared after `missed_after_s`, shrunk or split by late arrivals (which stay results), the
//! cap, and counters that survive a reopen.

use bytes::Bytes;
use engine::{EngineSpec, SeqRange};
use serde_json::json;

use crate::ingest::Ack;
use crate::missed::{DeviceGaps, MissedFilter, MissedRecord};
use crate::pipeline::*;
use crate::store::outbox::OutboxConfig;

const SPEC: &str = r#"
topic = "devices/{device}/events/{type}"
[event_types.meter.fields]
kwh = { type = "number", required = true }
"#;

const T0: i64 = 1_764_000_000_000;
const AFTER_MS: i64 = 300_000;

fn open(dir: &std::path::Path, max_records: u64) -> Pipeline {
    let mut store = Store::open(dir).unwrap();
    let outbox = store.open_outbox(OutboxConfig::default()).unwrap();
    let spec: EngineSpec = toml::from_str(SPEC).unwrap();
    let cfg = PipelineConfig {
        missed_after_s: 300,
        missed_max_records: max_records,
        ..PipelineConfig::default()
    };
    Pipeline::new(
        Engine::new(&spec).unwrap(),
        store,
        outbox,
        "gw".into(),
        &cfg,
    )
    .unwrap()
}

fn meter(device: &str, seq: u64, at: i64, valid: bool) -> Inbound {
    let data = if valid {
        json!({"kwh": seq})
    } else {
        json!({})
    };
    let body = json!({"id": format!("{device}-{seq}"), "seq": seq, "ts": T0, "data": data});
    Inbound {
        topic: format!("devices/{device}/events/meter"),
        payload: Bytes::from(body.to_string()),
        received_at: at,
        ack: Ack::none(),
    }
}

fn feed(p: &mut Pipeline, device: &str, seqs: &[u64], at: i64) {
    let mut batch = seqs.iter().map(|&s| meter(device, s, at, true)).collect();
    p.process(&mut batch, &mut AckSet::default()).unwrap();
}

fn records(p: &Pipeline) -> Vec<MissedRecord> {
    p.reader().missed().map(Result::unwrap).collect()
}

fn ranges(r: &MissedRecord) -> Vec<(u64, u64)> {
    r.ranges.iter().map(|x| (x.first, x.last)).collect()
}

fn stored_gaps(p: &Pipeline) -> Vec<(String, DeviceGaps)> {
    p.reader().gaps().map(Result::unwrap).collect()
}

#[test]
fn a_gap_is_stored_with_its_message_and_declared_missed_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), 100);
    feed(&mut p, "m1", &[1, 2, 5, 6], T0);
    // Durable with the batch that revealed it.
    let g = stored_gaps(&p);
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].0, "m1");
    assert_eq!(g[0].1.gaps[0].range(), SeqRange::new(3, 4));
    assert_eq!(g[0].1.gaps[0].first_seen, T0);
    assert_eq!(p.gaps.due(), Some(T0 + AFTER_MS));

    p.declare_missed(T0 + AFTER_MS - 1).unwrap();
    assert!(records(&p).is_empty(), "not before the wait");
    p.declare_missed(T0 + AFTER_MS).unwrap();
    let r = records(&p);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (
            r[0].device.as_str(),
            r[0].first_seq,
            r[0].last_seq,
            r[0].count
        ),
        ("m1", 3, 4, 2)
    );
    assert_eq!((r[0].first_seen, r[0].declared_at), (T0, T0 + AFTER_MS));
    assert_eq!(p.gaps.due(), None);
    // Declared once.
    p.declare_missed(T0 + 10 * AFTER_MS).unwrap();
    assert_eq!(records(&p).len(), 1);
    let c = p.store.counters();
    assert_eq!((c.missed_records, c.missed_seqs), (1, 2));
    drop(p);

    // Everything survives a restart, and the gap is not declared again.
    let mut p = open(dir.path(), 100);
    assert_eq!(records(&p).len(), 1);
    assert_eq!(p.gaps.due(), None);
    p.declare_missed(T0 + 20 * AFTER_MS).unwrap();
    assert_eq!(records(&p).len(), 1);
    assert_eq!(p.store.counters().missed_seqs, 2);
}

#[test]
fn a_late_arrival_is_a_result_and_shrinks_then_removes_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), 100);
    feed(&mut p, "m1", &[1, 2, 5, 6], T0);
    p.declare_missed(T0 + AFTER_MS).unwrap();
    let later = T0 + 2 * AFTER_MS;
    feed(&mut p, "m1", &[3], later);
    let out: Vec<_> = p.store.outbox(0).map(Result::unwrap).collect();
    assert_eq!(
        out.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 5, 6, 3]
    );
    assert!(out[4].flags.iter().any(|f| f == "late"));
    let r = records(&p);
    assert_eq!((r[0].first_seq, r[0].last_seq, r[0].count), (4, 4, 1));
    assert_eq!(r[0].filled_late, 1);
    // A late arrival that is rejected fills too: it is in the DLQ, not missed.
    let mut batch = vec![meter("m1", 4, later, false)];
    p.process(&mut batch, &mut AckSet::default()).unwrap();
    assert_eq!(p.reader().dlq(0).count(), 1);
    assert!(records(&p).is_empty());
    assert!(stored_gaps(&p).is_empty());
    let c = p.store.counters();
    assert_eq!(
        (c.missed_records, c.missed_seqs, c.missed_filled_late),
        (0, 2, 2)
    );
}

#[test]
fn a_late_arrival_inside_a_declared_range_splits_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), 100);
    feed(&mut p, "m1", &[1, 10], T0);
    p.declare_missed(T0 + AFTER_MS).unwrap();
    feed(&mut p, "m1", &[5], T0 + AFTER_MS + 1);
    let r = records(&p);
    assert_eq!(ranges(&r[0]), [(2, 4), (6, 9)]);
    assert_eq!((r[0].first_seq, r[0].last_seq, r[0].count), (2, 9, 7));
    // The split pieces stay declared: no second record, nothing to wait for.
    assert_eq!(p.gaps.due(), None);
    p.declare_missed(T0 + 5 * AFTER_MS).unwrap();
    assert_eq!(records(&p).len(), 1);
    // A late arrival before the wait: the gap shrinks and is declared with what is left.
    feed(&mut p, "m1", &[14], T0 + 1000);
    feed(&mut p, "m1", &[12], T0 + 2000);
    p.declare_missed(T0 + 1000 + AFTER_MS).unwrap();
    let r = records(&p);
    assert_eq!(r.len(), 3);
    assert_eq!(ranges(&r[1]), [(11, 11)]);
    assert_eq!(ranges(&r[2]), [(13, 13)]);
    assert_eq!(r[1].filled_late, 0);
    let listed = p
        .reader()
        .missed_list(&MissedFilter {
            device: Some("m1".into()),
            since: Some(T0 + 1000 + AFTER_MS),
            limit: Some(1),
        })
        .unwrap();
    assert_eq!(
        (listed.total, listed.matching, listed.records.len()),
        (3, 2, 1)
    );
}

#[test]
fn a_device_restart_makes_its_open_gaps_missed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), 100);
    feed(&mut p, "m1", &[1, 2, 7], T0);
    let mut batch = vec![{
        let mut m = meter("m1", 1, T0 + 5, true);
        m.payload = Bytes::from(
            json!({"id": "boot2-1", "seq": 1, "ts": T0 + 5, "data": {"kwh": 1}}).to_string(),
        );
        m
    }];
    p.process(&mut batch, &mut AckSet::default()).unwrap();
    let r = records(&p);
    assert_eq!(r.len(), 1);
    assert_eq!(ranges(&r[0]), [(3, 6)]);
    assert_eq!(r[0].declared_at, T0 + 5);
    assert!(stored_gaps(&p).is_empty());
    // The check scheduled for the gap finds nothing left to declare.
    p.declare_missed(T0 + AFTER_MS).unwrap();
    assert_eq!(records(&p).len(), 1);
    assert_eq!(p.gaps.due(), None);
    assert_eq!(p.store.counters().missed_seqs, 4);
}

#[test]
fn the_cap_drops_the_oldest_records_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), 2);
    feed(&mut p, "a", &[1, 3], T0);
    p.declare_missed(T0 + AFTER_MS).unwrap();
    feed(&mut p, "b", &[1, 3, 5, 7], T0 + 1);
    p.declare_missed(T0 + 1 + AFTER_MS).unwrap();
    let r = records(&p);
    assert_eq!(
        r.iter()
            .map(|r| (r.device.as_str(), r.first_seq))
            .collect::<Vec<_>>(),
        [("b", 4), ("b", 6)]
    );
    let c = p.store.counters();
    assert_eq!(
        (c.missed_records, c.missed_dropped, c.missed_seqs),
        (2, 2, 4)
    );
    // A late arrival for a dropped record is still a result; nothing breaks.
    feed(&mut p, "a", &[2], T0 + 2 * AFTER_MS);
    feed(&mut p, "b", &[2], T0 + 2 * AFTER_MS);
    assert_eq!(p.store.outbox(0).count(), 8);
    assert_eq!(records(&p).len(), 2);
    assert_eq!(p.store.counters().missed_filled_late, 0);
}
