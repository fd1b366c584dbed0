//! The exactly-once core in-process against the emulator: concurrent bridges on one gateway,
//! completing a crashed bridge's claim, taking over a stale claim and deleting its object.

mod common;

use std::sync::Arc;

use cloud_bridge::backend::Claim;
use cloud_bridge::backend::aws::Aws;
use cloud_bridge::config::Config;
use cloud_bridge::metrics::Metrics;
use cloud_bridge::pipeline::{Held, Pipeline, Progress};
use common::*;

async fn setup(endpoint: &str, tag: &str) -> (Arc<Config>, Aws, AwsNames) {
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique(tag);
    let cfg = write_config(
        dir.path(),
        "c.toml",
        &bridge_config(endpoint, &names, None, "x"),
    );
    provision(&cfg);
    let cfg = Arc::new(Config::load(&cfg).unwrap());
    let aws = Aws::connect(&cfg.aws).await;
    (cfg, aws, names)
}

fn pipeline(cfg: &Arc<Config>, aws: &Aws, owner: &str) -> Pipeline {
    Pipeline::new(
        aws.clone(),
        Arc::clone(cfg),
        Arc::new(Metrics::default()),
        owner.into(),
    )
}

fn held(gw: &str, range: std::ops::RangeInclusive<u64>) -> Held {
    range.map(|s| (s, result(gw, s))).collect()
}

fn creds() {
    // The SDK's default chain reads these; the emulator accepts any.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bridges_store_each_edge_seq_once() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    creds();
    let (cfg, aws, names) = setup(&endpoint, "conc").await;
    let gw = "gw-conc";
    // Four "bridges" get overlapping, out-of-order pieces of the same stream.
    let pieces = [1..=40u64, 21..=60, 1..=80, 41..=100];
    let mut tasks = Vec::new();
    for (i, r) in pieces.into_iter().enumerate() {
        let p = pipeline(&cfg, &aws, &format!("b{i}"));
        tasks.push(tokio::spawn(async move {
            let mut h = held(gw, r);
            loop {
                match p.advance(gw, &mut h).await.unwrap() {
                    Progress::Done { .. } => return,
                    Progress::Missing { .. } => {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let t = TestAws::new(&endpoint).await;
    assert_eq!(t.hwm(&names.table, gw).await, 100);
    assert_eq!(
        t.stored_edge_seqs(&names.bucket, gw).await,
        (1..=100).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_claims_are_completed_or_taken_over() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    creds();
    let (cfg, aws, names) = setup(&endpoint, "claim").await;
    let t = TestAws::new(&endpoint).await;
    let gw = "gw-claim";
    let p = pipeline(&cfg, &aws, "survivor");
    let now = cloud_bridge::now_ms();

    // A bridge claimed 1..=10, wrote its object, and died before committing.
    let st = p.state.read(gw).await.unwrap();
    let dead = Claim {
        from: 1,
        to: 10,
        key: p.object_key(gw, &result(gw, 1), 1, 10),
        at: now,
        owner: "dead".into(),
    };
    assert!(p.state.claim(gw, &st, &dead).await.unwrap());
    t.s3.put_object()
        .bucket(&names.bucket)
        .key(&dead.key)
        .body(b"partial garbage\n".to_vec().into())
        .send()
        .await
        .unwrap();

    // Holding only 1..=5 of it: wait (the claim is fresh; its owner may still finish).
    let mut h = held(gw, 1..=5);
    assert_eq!(
        p.advance(gw, &mut h).await.unwrap(),
        Progress::Missing {
            hwm: 0,
            from: 6,
            to: 10
        }
    );
    // Holding all of it (the redelivery): completed under the same key, content replaced.
    let mut h = held(gw, 1..=12);
    assert_eq!(
        p.advance(gw, &mut h).await.unwrap(),
        Progress::Done { hwm: 12 }
    );
    let objs = t.objects(&names.bucket, "events/").await;
    assert_eq!(objs.len(), 2, "{objs:?}");
    assert_eq!(objs[&dead.key].lines().count(), 10);
    assert_eq!(
        t.stored_edge_seqs(&names.bucket, gw).await,
        (1..=12).collect::<Vec<_>>()
    );

    // A stale claim (13..=30) whose range never fully comes back: taken over, object deleted.
    let st = p.state.read(gw).await.unwrap();
    let stale = Claim {
        from: 13,
        to: 30,
        key: p.object_key(gw, &result(gw, 13), 13, 30),
        at: now - 60_000,
        owner: "dead".into(),
    };
    assert!(p.state.claim(gw, &st, &stale).await.unwrap());
    t.s3.put_object()
        .bucket(&names.bucket)
        .key(&stale.key)
        .body(b"{}\n".to_vec().into())
        .send()
        .await
        .unwrap();
    let mut h = held(gw, 13..=20);
    assert_eq!(
        p.advance(gw, &mut h).await.unwrap(),
        Progress::Done { hwm: 20 }
    );
    let objs = t.objects(&names.bucket, "events/").await;
    assert!(
        !objs.contains_key(&stale.key),
        "the abandoned object is deleted"
    );
    assert_eq!(
        t.stored_edge_seqs(&names.bucket, gw).await,
        (1..=20).collect::<Vec<_>>()
    );
    let st = p.state.read(gw).await.unwrap();
    assert!(st.claim.is_none() && st.garbage.is_empty(), "{st:?}");
}
