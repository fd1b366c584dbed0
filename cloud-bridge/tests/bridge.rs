//! `cloud-bridge run` end to end: a TLS mosquitto (certificates made here), the real binary,
//! the AWS emulator; results are read back from S3, DynamoDB and (through an EventBridge rule)
//! an SQS queue.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use proto::Status;
use proto::uplink::ReplayRequest;
use rumqttc::QoS;
use serde_json::Value;

/// Sums an EMF counter over the bridge's stdout lines.
fn emf_sum(bridge: &Bridge, name: &str) -> u64 {
    std::fs::read_to_string(&bridge.stdout)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v[name].as_u64())
        .sum()
}

fn count(events: &[Value], detail_type: &str) -> usize {
    events
        .iter()
        .filter(|e| e["detail-type"] == detail_type)
        .count()
}

struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    broker: Broker,
    names: AwsNames,
    endpoint: String,
    aws: TestAws,
}

impl Setup {
    async fn new(endpoint: String, tag: &str) -> Setup {
        Self::with_acl(endpoint, tag, None).await
    }

    async fn with_acl(endpoint: String, tag: &str, acl: Option<&str>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "cloud");
        let broker = match acl {
            Some(acl) => Broker::start_tls_acl(dir.path(), &pki, &pki.ca, acl),
            None => Broker::start_tls(dir.path(), &pki, &pki.ca),
        };
        let names = AwsNames::unique(tag);
        let aws = TestAws::new(&endpoint).await;
        Setup {
            dir,
            pki,
            broker,
            names,
            endpoint,
            aws,
        }
    }

    fn bridge_config(&self, client_id: &str) -> std::path::PathBuf {
        let (c, k) = self.pki.issue(client_id, false);
        let text = bridge_config(
            &self.endpoint,
            &self.names,
            Some((self.broker.port, &self.pki.ca, &c, &k)),
            client_id,
        );
        write_config(self.dir.path(), &format!("{client_id}.toml"), &text)
    }

    fn start_bridge(&self, config: &std::path::Path, env: &[(&str, &str)]) -> Bridge {
        let name = config.file_stem().unwrap().to_string_lossy().to_string();
        let b = Bridge::start(config, self.dir.path().join(format!("{name}.log")), env);
        b.wait_log("subscribed", Duration::from_secs(30));
        b
    }

    /// The `failures/` objects, once there is at least one (or after 30 s): the test's own
    /// acks say nothing about when the bridge has written its dead letters.
    async fn failures(&self) -> std::collections::BTreeMap<String, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let failures = self.aws.objects(&self.names.bucket, "failures/").await;
            if !failures.is_empty() || std::time::Instant::now() > deadline {
                return failures;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn gateway(&self, gw: &str) -> TestClient {
        let (c, k) = self.pki.issue(gw, false);
        TestClient::connect(
            gw,
            self.broker.port,
            Tls {
                ca: &self.pki.ca,
                cert: Some((&c, &k)),
            },
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_exactly_once_into_s3_and_eventbridge() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let s = Setup::new(endpoint, "e2e").await;
    let cfg = s.bridge_config("bridge-e2e");

    let first = provision(&cfg);
    for what in ["bucket", "event_bus", "table", "dlq_queue"] {
        assert_eq!(first[what]["state"], "created", "{what}: {first}");
    }
    let again = provision(&cfg);
    for what in ["bucket", "event_bus", "table", "dlq_queue"] {
        assert_eq!(again[what]["state"], "exists", "{what}: {again}");
    }
    let queue = s
        .aws
        .capture_events(&s.names.bus, "iot.edge-pipeline")
        .await;
    let mut bridge = s.start_bridge(&cfg, &[]);

    let gw = "gw-e2e";
    let pubr = s.gateway(gw);
    for i in 0..5u64 {
        let mut b = batch(gw, i * 20 + 1..=i * 20 + 20);
        if i == 0 {
            b.results[6].status = Status::Anomaly;
        }
        pubr.publish_batch(&b).await;
    }
    pubr.wait_acked(5).await;
    s.aws
        .wait_hwm(&s.names.table, gw, 100, Duration::from_secs(60))
        .await;

    // Redeliveries and an overlapping batch: still each result once.
    pubr.publish_batch(&batch(gw, 21..=40)).await;
    pubr.publish_batch(&batch(gw, 1..=20)).await;
    pubr.publish_batch(&batch(gw, 91..=110)).await;
    // Not a batch: dead-lettered under failures/, not lost and not blocking.
    pubr.client
        .publish(
            proto::uplink::results_topic(gw),
            QoS::AtLeastOnce,
            false,
            b"not CBOR".to_vec(),
        )
        .await
        .unwrap();
    pubr.wait_acked(9).await;
    s.aws
        .wait_hwm(&s.names.table, gw, 110, Duration::from_secs(60))
        .await;

    let seqs = s.aws.stored_edge_seqs(&s.names.bucket, gw).await;
    assert_eq!(seqs, (1..=110).collect::<Vec<_>>());
    let objects = s.aws.objects(&s.names.bucket, "events/").await;
    for key in objects.keys() {
        assert!(
            key.starts_with("events/dt=2025-11-25/gateway=gw-e2e/0000000000000000"),
            "{key}"
        );
    }

    let failures = s.failures().await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    let dlq: Value = serde_json::from_str(failures.values().next().unwrap()).unwrap();
    assert_eq!(dlq["stage"], "cloud");
    assert_eq!(dlq["payload"], "not CBOR");
    assert!(dlq["reason"].as_str().unwrap().contains("CBOR"), "{dlq}");

    let events = s
        .aws
        .read_events(&queue, Duration::from_secs(60), |ev| {
            count(ev, "EventProcessed") >= 110
                && count(ev, "AnomalyDetected") >= 1
                && count(ev, "EventDeadLettered") >= 1
        })
        .await;
    let processed: HashSet<String> = events
        .iter()
        .filter(|e| e["detail-type"] == "EventProcessed")
        .map(|e| {
            assert_eq!(e["source"], "iot.edge-pipeline");
            e["detail"]["event_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(processed.len(), 110, "every result announced");
    let anomaly: Vec<_> = events
        .iter()
        .filter(|e| e["detail-type"] == "AnomalyDetected")
        .collect();
    assert_eq!(anomaly[0]["detail"]["edge_seq"], 7);
    assert_eq!(anomaly[0]["detail"]["status"], "anomaly");

    // Everything acknowledged; SIGTERM drains and exits 0, with the EMF counters flushed.
    let status = bridge.terminate();
    assert!(status.success(), "{status:?}\n{}", bridge.log_text());
    assert_eq!(emf_sum(&bridge, "processed"), 110);
    assert_eq!(emf_sum(&bridge, "acked_messages"), 9);
    assert!(emf_sum(&bridge, "duplicates") >= 50);
    assert_eq!(emf_sum(&bridge, "decode_errors"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_requests_a_replay_and_reports_missed_events() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let s = Setup::new(endpoint, "gap").await;
    let cfg = s.bridge_config("bridge-gap");
    provision(&cfg);
    let queue = s
        .aws
        .capture_events(&s.names.bus, "iot.edge-pipeline")
        .await;
    let _bridge = s.start_bridge(&cfg, &[]);

    let gw = "gw-gap";
    let mut gateway = s.gateway(gw);
    gateway
        .client
        .subscribe(proto::uplink::replay_topic(gw), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    gateway.publish_batch(&batch(gw, 1..=10)).await;
    s.aws
        .wait_hwm(&s.names.table, gw, 10, Duration::from_secs(30))
        .await;
    gateway.publish_batch(&batch(gw, 21..=30)).await;
    let req = tokio::time::timeout(Duration::from_secs(15), gateway.incoming.recv())
        .await
        .expect("a replay request")
        .unwrap();
    let req: ReplayRequest = serde_json::from_slice(&req.payload).unwrap();
    assert_eq!(req, ReplayRequest { from: 11, to: 20 });
    assert_eq!(s.aws.hwm(&s.names.table, gw).await, 10, "held, not stored");

    // The gateway answers the replay: everything lands, once.
    gateway.publish_batch(&batch(gw, 11..=20)).await;
    s.aws
        .wait_hwm(&s.names.table, gw, 30, Duration::from_secs(30))
        .await;

    // A range that never comes: after the replay attempts it is reported and skipped.
    gateway.publish_batch(&batch(gw, 41..=50)).await;
    s.aws
        .wait_hwm(&s.names.table, gw, 50, Duration::from_secs(30))
        .await;
    let seqs = s.aws.stored_edge_seqs(&s.names.bucket, gw).await;
    let want: Vec<u64> = (1..=30).chain(41..=50).collect();
    assert_eq!(seqs, want);
    let events = s
        .aws
        .read_events(&queue, Duration::from_secs(30), |ev| {
            count(ev, "MissedEvents") >= 1
        })
        .await;
    let missed: Vec<_> = events
        .iter()
        .filter(|e| e["detail-type"] == "MissedEvents")
        .collect();
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0]["detail"]["from_edge_seq"], 31);
    assert_eq!(missed[0]["detail"]["to_edge_seq"], 40);
    assert_eq!(missed[0]["detail"]["gateway"], gw);
    // Two more requests were made for 31..=40 before giving up.
    let mut more = Vec::new();
    while let Ok(Some(p)) =
        tokio::time::timeout(Duration::from_millis(200), gateway.incoming.recv()).await
    {
        more.push(serde_json::from_slice::<ReplayRequest>(&p.payload).unwrap());
    }
    assert!(
        more.iter()
            .all(|r| *r == ReplayRequest { from: 31, to: 40 })
            && more.len() == 2,
        "{more:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_batch_redelivers_without_duplicates() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let s = Setup::new(endpoint, "crash").await;
    let cfg = s.bridge_config("bridge-crash");
    provision(&cfg);
    let gw = "gw-crash";
    let pubr = s.gateway(gw);

    // 1. Deterministic: killed after the S3 PUT, before PutEvents and the commit.
    let mut bridge = s.start_bridge(&cfg, &[("CLOUD_BRIDGE_FAULT_PAUSE_AFTER_PUT_MS", "5000")]);
    pubr.publish_batch(&batch(gw, 1..=50)).await;
    pubr.wait_acked(1).await;
    bridge.wait_log("fault hook: pausing", Duration::from_secs(30));
    bridge.kill9();
    let orphan = s.aws.objects(&s.names.bucket, "events/").await;
    assert_eq!(orphan.len(), 1, "the object was written before the kill");
    assert_eq!(s.aws.hwm(&s.names.table, gw).await, 0, "but not committed");

    let restarted = s.start_bridge(&cfg, &[]);
    s.aws
        .wait_hwm(&s.names.table, gw, 50, Duration::from_secs(60))
        .await;
    assert!(
        restarted
            .log_text()
            .contains("completing an unfinished claimed range"),
        "{}",
        restarted.log_text()
    );
    let after = s.aws.objects(&s.names.bucket, "events/").await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        orphan.keys().collect::<Vec<_>>(),
        "the redelivered batch completed the same claim, no second object"
    );
    assert_eq!(
        s.aws.stored_edge_seqs(&s.names.bucket, gw).await,
        (1..=50).collect::<Vec<_>>()
    );
    drop(restarted);

    // 2. Repeated kills at arbitrary points while a stream is being stored.
    let mut next = 51u64;
    for _ in 0..40 {
        pubr.publish_batch(&batch(gw, next..=next + 24)).await;
        next += 25;
    }
    let last = next - 1;
    for round in 0..3 {
        let mut b = s.start_bridge(&cfg, &[("CLOUD_BRIDGE_FAULT_PAUSE_AFTER_PUT_MS", "300")]);
        tokio::time::sleep(Duration::from_millis(700 + round * 400)).await;
        b.kill9();
    }
    let _bridge = s.start_bridge(&cfg, &[]);
    s.aws
        .wait_hwm(&s.names.table, gw, last, Duration::from_secs(90))
        .await;
    assert_eq!(
        s.aws.stored_edge_seqs(&s.names.bucket, gw).await,
        (1..=last).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_share_the_load_exactly_once() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let s = Setup::new(endpoint, "share").await;
    let cfg1 = s.bridge_config("bridge-share-1");
    let cfg2 = s.bridge_config("bridge-share-2");
    provision(&cfg1);
    let mut b1 = s.start_bridge(&cfg1, &[]);
    let mut b2 = s.start_bridge(&cfg2, &[]);

    let gws = ["gw-s1", "gw-s2"];
    let clients: Vec<_> = gws.iter().map(|g| s.gateway(g)).collect();
    for i in 0..30u64 {
        for (g, c) in gws.iter().zip(&clients) {
            c.publish_batch(&batch(g, i * 10 + 1..=i * 10 + 10)).await;
        }
    }
    for g in gws {
        s.aws
            .wait_hwm(&s.names.table, g, 300, Duration::from_secs(90))
            .await;
        assert_eq!(
            s.aws.stored_edge_seqs(&s.names.bucket, g).await,
            (1..=300).collect::<Vec<_>>()
        );
    }
    assert!(b1.terminate().success());
    assert!(b2.terminate().success());
    let (a1, a2) = (
        emf_sum(&b1, "acked_messages"),
        emf_sum(&b2, "acked_messages"),
    );
    assert!(a1 > 0 && a2 > 0, "both bridges took messages: {a1} / {a2}");
    assert_eq!(a1 + a2, 60, "every message acked once");
    assert_eq!(emf_sum(&b1, "processed") + emf_sum(&b2, "processed"), 600);
}

/// A gateway may speak only for itself, checked twice: the broker's ACL keys each gateway's
/// topics to its certificate (what an AWS IoT policy does with `${iot:ClientId}`), and the
/// bridge refuses a batch whose body names another gateway than its topic, dead-lettered
/// under `failures/` and never stored as either gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cannot_deliver_results_for_another() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let acl = "user bridge-acl\ntopic readwrite #\n\n\
               pattern write gateways/%u/results\npattern write gateways/%u/status\n\
               pattern read gateways/%u/replay\n";
    let s = Setup::with_acl(endpoint, "acl", Some(acl)).await;
    let cfg = s.bridge_config("bridge-acl");
    provision(&cfg);
    let mut bridge = s.start_bridge(&cfg, &[]);

    let pubr = s.gateway("gw-a");
    // Another gateway's topic: the broker drops it (MQTT 3.1.1 has no negative PUBACK).
    pubr.publish_batch(&batch("gw-b", 1..=5)).await;
    // Its own topic, but a body that names gw-b: the bridge refuses it.
    let forged = batch("gw-b", 1..=5);
    pubr.client
        .publish(
            proto::uplink::results_topic("gw-a"),
            QoS::AtLeastOnce,
            false,
            proto::wire::encode(&forged),
        )
        .await
        .unwrap();
    // And its own results, which go through.
    pubr.publish_batch(&batch("gw-a", 1..=5)).await;
    pubr.wait_acked(3).await;
    s.aws
        .wait_hwm(&s.names.table, "gw-a", 5, Duration::from_secs(60))
        .await;

    let failures = s.failures().await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    let dlq: Value = serde_json::from_str(failures.values().next().unwrap()).unwrap();
    let reason = dlq["reason"].as_str().unwrap();
    assert!(
        reason.contains("names gateway 'gw-b'") && reason.contains("'gw-a'"),
        "{dlq}"
    );

    // Drained: the bridge saw exactly the two messages on gw-a's topic, and gw-b has nothing.
    let status = bridge.terminate();
    assert!(status.success(), "{status:?}\n{}", bridge.log_text());
    assert_eq!(emf_sum(&bridge, "acked_messages"), 2);
    assert!(
        s.aws
            .stored_edge_seqs(&s.names.bucket, "gw-b")
            .await
            .is_empty()
    );
    assert_eq!(
        s.aws.stored_edge_seqs(&s.names.bucket, "gw-a").await,
        (1..=5).collect::<Vec<_>>()
    );
}
