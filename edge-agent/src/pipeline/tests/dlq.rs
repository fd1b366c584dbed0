//! The DLQ through the pipeline: automatic retries of transient failures, manual retries and
//! purges, the cap and its policies, and counters that stay exact through all of them.

use bytes::Bytes;
use engine::EngineSpec;
use serde_json::json;

use std::sync::atomic::Ordering;

use proto::DlqEntry;
use tokio::sync::oneshot;

use crate::dlq::{AutoRetry, DlqConfig, Filter, FullPolicy, RetryOutcome, Selection};
use crate::ingest::Ack;
use crate::pipeline::*;
use crate::store::outbox::OutboxConfig;

/// A pulse counter whose rate needs the previous reading (except on a boot message), and a
/// meter with a required field.
const SPEC: &str = r#"
topic = "devices/{device}/events/{type}"
[event_types.pulse.fields]
count = { type = "number", required = true }
boot = { type = "boolean", default = false }
[[event_types.pulse.calc]]
name = "per_min"
expr = 'if(boot, 0, delta("count") / dt() * 60)'
[event_types.meter.fields]
kwh = { type = "number", required = true }
"#;

const T0: i64 = 1_764_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    p: Pipeline,
}

fn fixture(dlq: DlqConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let outbox = store.open_outbox(OutboxConfig::default()).unwrap();
    let spec: EngineSpec = toml::from_str(SPEC).unwrap();
    let p = Pipeline::new(
        Engine::new(&spec).unwrap(),
        store,
        outbox,
        "gw".into(),
        &PipelineConfig::default(),
    )
    .unwrap()
    .with_dlq(dlq)
    .unwrap();
    Fixture { _dir: dir, p }
}

fn fast_retry(attempts: u32) -> DlqConfig {
    DlqConfig {
        auto_retry: AutoRetry {
            attempts,
            first_delay_ms: 1,
            max_delay_ms: 1,
        },
        ..DlqConfig::default()
    }
}

fn msg(topic: &str, body: serde_json::Value) -> Inbound {
    Inbound {
        topic: topic.into(),
        payload: Bytes::from(body.to_string()),
        // Arrival time: the clock rules (none configured here) would judge by it.
        received_at: T0,
        ack: Ack::none(),
    }
}

fn pulse(id: &str, seq: u64, ts: i64, count: u32, boot: bool) -> Inbound {
    msg(
        "devices/p1/events/pulse",
        json!({"id": id, "seq": seq, "ts": ts, "data": {"count": count, "boot": boot}}),
    )
}

fn bad_meter(seq: u64) -> Inbound {
    msg(
        "devices/m1/events/meter",
        json!({"id": format!("m{seq}"), "seq": seq, "ts": T0, "data": {}}),
    )
}

impl Fixture {
    fn feed(&mut self, msgs: Vec<Inbound>) {
        let mut batch = msgs;
        self.p.process(&mut batch, &mut AckSet::default()).unwrap();
    }

    fn dlq(&self) -> Vec<DlqEntry> {
        self.p.reader().dlq(0).map(Result::unwrap).collect()
    }

    fn schedule(&self) -> Vec<(u64, i64)> {
        self.p.reader().dlq_schedule().map(Result::unwrap).collect()
    }

    fn outbox(&self) -> Vec<proto::EventResult> {
        self.p.store.outbox(0).map(Result::unwrap).collect()
    }

    /// The counters agree with what is stored.
    fn assert_counters_exact(&self) {
        let c = self.p.store.counters();
        let stored = self.p.reader().counters().unwrap();
        assert_eq!(c, stored, "in-memory and persisted counters");
        let entries = self.dlq();
        let bytes: u64 = entries
            .iter()
            .map(|e| proto::wire::encode(e).len() as u64)
            .sum();
        assert_eq!(c.dlq_entries, entries.len() as u64, "dlq_entries");
        assert_eq!(c.dlq_bytes, bytes, "dlq_bytes");
        for (id, _) in self.schedule() {
            assert!(
                entries.iter().any(|e| e.id == id),
                "schedule entry {id} has no DLQ entry"
            );
        }
    }

    /// Runs the automatic retries as if their time had come.
    fn auto_retry_now(&mut self) {
        self.p.auto_retry(i64::MAX).unwrap();
    }
}

#[test]
fn a_transient_failure_is_retried_automatically_and_succeeds_once_its_state_arrives() {
    let mut f = fixture(fast_retry(3));
    // Seq 2 arrives before the boot message: no previous reading → transient calc failure.
    f.feed(vec![pulse("b", 2, T0 + 60_000, 30, false)]);
    let dlq = f.dlq();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].stage, proto::Stage::Calc);
    assert_eq!(f.schedule().len(), 1, "transient: scheduled for a retry");
    assert!(f.p.retries.due().is_some());
    // A retry before the state exists fails again and is rescheduled.
    f.auto_retry_now();
    assert_eq!(f.dlq()[0].attempts, 2);
    assert_eq!(f.schedule().len(), 1);
    // The late boot message supplies the previous reading; the next retry succeeds.
    f.feed(vec![pulse("a", 1, T0, 10, true)]);
    f.auto_retry_now();
    assert!(f.dlq().is_empty(), "reprocessed and removed");
    assert!(f.schedule().is_empty());
    let out = f.outbox();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].event_id, "p1/b");
    assert_eq!(out[1].result["per_min"], json!(20.0));
    assert!(out[1].flags.contains(&"replay".to_string()));
    assert_eq!(
        out[1].processed_at, T0,
        "replayed with its original arrival time"
    );
    f.assert_counters_exact();
}

#[test]
fn automatic_retries_stop_after_the_configured_attempts() {
    let mut f = fixture(fast_retry(2));
    f.feed(vec![pulse("b", 2, T0 + 60_000, 30, false)]);
    f.auto_retry_now();
    f.auto_retry_now();
    let e = &f.dlq()[0];
    assert_eq!(e.attempts, 3, "the first failure and two automatic retries");
    assert!(f.schedule().is_empty(), "now it waits for a person");
    assert_eq!(f.p.retries.due(), None);
    f.auto_retry_now();
    assert_eq!(f.dlq()[0].attempts, 3, "no further automatic attempt");
    f.assert_counters_exact();
}

#[test]
fn permanent_failures_are_not_retried_automatically() {
    let mut f = fixture(fast_retry(5));
    f.feed(vec![bad_meter(1)]);
    assert_eq!(f.dlq().len(), 1);
    // The entry keeps what the engine said the rejection is about.
    let e = &f.dlq()[0];
    assert!(
        matches!(&e.subject, Some(proto::Subject::Field(p)) if e.reason.starts_with(p.as_str())),
        "{e:?}"
    );
    assert!(f.schedule().is_empty());
    assert_eq!(f.p.retries.due(), None);
}

#[test]
fn manual_retry_reports_each_entry_and_removes_the_successes() {
    let mut f = fixture(DlqConfig::default());
    f.feed(vec![bad_meter(1), pulse("b", 2, T0 + 60_000, 30, false)]);
    f.feed(vec![pulse("a", 1, T0, 10, true)]);
    let report =
        f.p.retry(&Selection {
            ids: vec![1, 2, 2, 42],
            ..Selection::default()
        })
        .unwrap();
    let outcomes: Vec<_> = report.items.iter().map(|i| (i.id, &i.outcome)).collect();
    assert_eq!(outcomes.len(), 3, "ids are deduplicated: {outcomes:?}");
    assert!(
        matches!(outcomes[0], (1, RetryOutcome::Failed { attempts: 2, .. })),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            outcomes[1],
            (2, RetryOutcome::Reprocessed { edge_seq: 2, .. })
        ),
        "{outcomes:?}"
    );
    assert!(matches!(outcomes[2], (42, RetryOutcome::NotFound)));
    assert!(!report.all_ok());
    let dlq = f.dlq();
    assert_eq!(dlq.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(dlq[0].attempts, 2);
    assert!(dlq[0].last_seen >= dlq[0].first_seen);
    f.assert_counters_exact();
}

#[test]
fn retry_all_with_a_reason_filter() {
    let mut f = fixture(DlqConfig::default());
    f.feed(vec![
        bad_meter(1),
        bad_meter(2),
        pulse("b", 2, T0 + 60_000, 30, false),
    ]);
    let report =
        f.p.retry(&Selection {
            all: true,
            filter: Filter {
                reason: Some("KWH".into()),
                ..Filter::default()
            },
            ..Selection::default()
        })
        .unwrap();
    assert_eq!(
        report.items.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn purge_removes_entries_and_their_schedule() {
    let mut f = fixture(fast_retry(5));
    f.feed(vec![bad_meter(1), pulse("b", 2, T0 + 60_000, 30, false)]);
    assert_eq!(f.schedule().len(), 1);
    let r =
        f.p.purge(&Selection {
            ids: vec![2, 7],
            ..Selection::default()
        })
        .unwrap();
    assert_eq!(r.purged, vec![2]);
    assert_eq!(r.not_found, vec![7]);
    assert!(f.schedule().is_empty());
    assert_eq!(f.p.retries.due(), None);
    f.assert_counters_exact();
    let r =
        f.p.purge(&Selection {
            all: true,
            ..Selection::default()
        })
        .unwrap();
    assert_eq!(r.purged, vec![1]);
    assert!(f.dlq().is_empty());
    f.assert_counters_exact();
}

#[test]
fn drop_oldest_keeps_the_newest_entries_and_counts_the_drops() {
    let mut f = fixture(DlqConfig {
        max_entries: 3,
        ..DlqConfig::default()
    });
    f.feed((1..=2).map(bad_meter).collect());
    // One batch that alone overflows the cap.
    f.feed((3..=7).map(bad_meter).collect());
    let ids: Vec<u64> = f.dlq().iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![5, 6, 7]);
    let c = f.p.store.counters();
    assert_eq!(c.dlq_dropped, 4);
    f.assert_counters_exact();
    assert!(!f.p.intake.closed(&f.p.store), "drop_oldest never blocks");
}

#[test]
fn the_byte_cap_counts_too() {
    let mut f = fixture(DlqConfig {
        max_bytes: 4096,
        ..DlqConfig::default()
    });
    f.feed((1..=40).map(bad_meter).collect());
    let c = f.p.store.counters();
    assert!(c.dlq_bytes <= 4096, "{c:?}");
    assert!(c.dlq_dropped > 0);
    assert_eq!(c.dlq_entries + c.dlq_dropped, 40);
    f.assert_counters_exact();
}

#[test]
fn block_stops_intake_while_full_until_room_is_made() {
    let mut f = fixture(DlqConfig {
        max_entries: 3,
        full_policy: FullPolicy::Block,
        ..DlqConfig::default()
    });
    f.feed((1..=2).map(bad_meter).collect());
    assert!(!f.p.intake.closed(&f.p.store));
    f.feed(vec![bad_meter(3), bad_meter(4)]);
    assert_eq!(
        f.dlq().len(),
        4,
        "nothing is dropped: over by at most a batch"
    );
    assert!(f.p.intake.closed(&f.p.store));
    assert!(f.p.live.intake_blocked.load(Ordering::Relaxed));
    f.p.purge(&Selection {
        ids: vec![1, 2],
        ..Selection::default()
    })
    .unwrap();
    assert!(!f.p.intake.closed(&f.p.store));
    assert_eq!(f.p.store.counters().dlq_dropped, 0);
}

#[test]
fn run_serves_admin_calls_between_batches_and_drains_when_blocked() {
    let f = fixture(DlqConfig {
        max_entries: 1,
        full_policy: FullPolicy::Block,
        ..DlqConfig::default()
    });
    let dir = f._dir;
    let (tx, rx) = mpsc::channel(16);
    let (admin_tx, admin_rx) = mpsc::channel(4);
    let pipeline = f.p;
    let live = pipeline.live();
    let handle = std::thread::spawn(move || pipeline.run_with_admin(rx, admin_rx));
    tx.blocking_send(bad_meter(1)).unwrap();
    // Full once message 1 is committed: intake stops, but admin calls are still served.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !live.intake_blocked.load(Ordering::Relaxed) {
        assert!(
            std::time::Instant::now() < deadline,
            "message 1 never filled the DLQ"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    tx.blocking_send(bad_meter(2)).unwrap();
    let (reply_tx, reply_rx) = oneshot::channel();
    admin_tx
        .blocking_send(AdminCall::Purge(
            Selection {
                ids: vec![1],
                ..Selection::default()
            },
            reply_tx,
        ))
        .unwrap();
    let report = reply_rx.blocking_recv().unwrap().unwrap();
    assert_eq!(report.purged, vec![1]);
    // Room again: message 2 is taken; then the DLQ is full again and message 3 waits, but
    // closing ingest drains it anyway (whichever comes first).
    tx.blocking_send(bad_meter(3)).unwrap();
    drop(tx);
    let store = handle.join().unwrap().unwrap();
    let ids: Vec<u64> = store.reader().dlq(0).map(|e| e.unwrap().id).collect();
    assert_eq!(ids, vec![2, 3]);
    drop(store);
    drop(dir);
}
