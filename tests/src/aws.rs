//! The AWS side of the tests that reach the emulator (moto at `AWS_ENDPOINT_URL`, or a private
//! one): unique resource names and SDK clients that read the outcome back (S3 objects, the
//! gateway's high-water mark in DynamoDB, and EventBridge events through a rule that forwards
//! them to an SQS queue). One implementation for the cloud-bridge tests and the end-to-end
//! chain; it is async (a synchronous test drives it through its own runtime).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::types::AttributeValue;
use proto::EventResult;
use serde_json::Value;

/// The emulator's endpoint, or None (after saying so loudly) when `AWS_ENDPOINT_URL` is unset.
pub fn aws_endpoint() -> Option<String> {
    match std::env::var("AWS_ENDPOINT_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("SKIPPED: no AWS emulator (set AWS_ENDPOINT_URL)");
            println!("SKIPPED: no AWS emulator (set AWS_ENDPOINT_URL)");
            None
        }
    }
}

/// A name unique to this test run: lowercase, valid for buckets, tables, queues, buses and
/// rules.
pub fn unique(base: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!(
        "{base}-{}-{}-{t}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `bin provision --json --config config` (the `cloud-bridge` binary) with the test
/// credentials, and with `endpoint` as `AWS_ENDPOINT_URL` when given (else the inherited one);
/// asserts it succeeded and returns its report.
pub fn provision(bin: &Path, config: &Path, endpoint: Option<&str>) -> Value {
    let mut cmd = Command::new(bin);
    cmd.args(["provision", "--json", "--config"])
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test");
    if let Some(endpoint) = endpoint {
        cmd.env("AWS_ENDPOINT_URL", endpoint);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "provision failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The names of the AWS resources one test provisions.
pub struct AwsNames {
    pub bucket: String,
    pub bus: String,
    pub table: String,
    pub dlq: String,
}

impl AwsNames {
    pub fn unique(tag: &str) -> AwsNames {
        AwsNames {
            bucket: unique(&format!("cb-{tag}")),
            bus: unique(&format!("bus-{tag}")),
            table: unique(&format!("tbl-{tag}")),
            dlq: unique(&format!("dlq-{tag}")),
        }
    }
}

/// SDK clients on one endpoint (static test credentials, path-style S3).
pub struct TestAws {
    pub s3: aws_sdk_s3::Client,
    pub ddb: aws_sdk_dynamodb::Client,
    pub eb: aws_sdk_eventbridge::Client,
    pub sqs: aws_sdk_sqs::Client,
}

impl TestAws {
    pub async fn new(endpoint: &str) -> TestAws {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "static",
            ))
            .load()
            .await;
        TestAws {
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&conf)
                    .force_path_style(true)
                    .build(),
            ),
            ddb: aws_sdk_dynamodb::Client::new(&conf),
            eb: aws_sdk_eventbridge::Client::new(&conf),
            sqs: aws_sdk_sqs::Client::new(&conf),
        }
    }

    /// The gateway's stored high-water mark (0 if none yet).
    pub async fn hwm(&self, table: &str, gateway: &str) -> u64 {
        let out = self
            .ddb
            .get_item()
            .table_name(table)
            .key("pk", AttributeValue::S(format!("gw#{gateway}")))
            .consistent_read(true)
            .send()
            .await;
        match out.ok().and_then(|o| o.item) {
            Some(item) => match item.get("hwm") {
                Some(AttributeValue::N(n)) => n.parse().unwrap(),
                _ => 0,
            },
            None => 0,
        }
    }

    pub async fn wait_hwm(&self, table: &str, gateway: &str, want: u64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let h = self.hwm(table, gateway).await;
            if h >= want {
                assert_eq!(h, want, "hwm went past what was sent");
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for hwm {want} of {gateway} (at {h})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every object under `prefix`: key → body.
    pub async fn objects(&self, bucket: &str, prefix: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut token = None;
        loop {
            let r = self
                .s3
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            for o in r.contents() {
                let key = o.key().unwrap().to_string();
                let body = self
                    .s3
                    .get_object()
                    .bucket(bucket)
                    .key(&key)
                    .send()
                    .await
                    .unwrap()
                    .body
                    .collect()
                    .await
                    .unwrap()
                    .into_bytes();
                out.insert(key, String::from_utf8(body.to_vec()).unwrap());
            }
            if r.is_truncated() == Some(true) {
                token = r.next_continuation_token().map(str::to_string);
            } else {
                return out;
            }
        }
    }

    /// Every result stored under `events/`, with its object key, in key order.
    pub async fn stored(&self, bucket: &str) -> Vec<(String, EventResult)> {
        let mut out = Vec::new();
        for (key, body) in self.objects(bucket, "events/").await {
            assert!(key.ends_with(".ndjson"), "{key}");
            for line in body.lines() {
                let r: EventResult = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{key}: not a result: {e}: {line}"));
                out.push((key.clone(), r));
            }
        }
        out
    }

    /// All records in the gateway's `events/` objects: asserts each edge_seq and event_id is
    /// there at most once, and returns the edge_seqs in order.
    pub async fn stored_edge_seqs(&self, bucket: &str, gateway: &str) -> Vec<u64> {
        let objects = self.objects(bucket, "events/").await;
        let mut seqs = BTreeMap::new();
        let mut ids = std::collections::HashSet::new();
        for (key, body) in &objects {
            if !key.contains(&format!("/gateway={gateway}/")) {
                continue;
            }
            assert!(key.ends_with(".ndjson"), "{key}");
            assert!(body.ends_with('\n'), "{key}: NDJSON ends with a newline");
            for line in body.lines() {
                let r: EventResult = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{key}: not a result: {e}: {line}"));
                assert!(
                    ids.insert(r.event_id.clone()),
                    "event_id {} stored twice ({key})",
                    r.event_id
                );
                let date = key.split("dt=").nth(1).unwrap().split('/').next().unwrap();
                assert_eq!(date.len(), 10, "{key}");
                if let Some(prev) = seqs.insert(r.edge_seq, key.clone()) {
                    panic!("edge_seq {} stored twice: {prev} and {key}", r.edge_seq);
                }
            }
        }
        seqs.into_keys().collect()
    }

    /// An SQS queue that receives every event on `bus` with `source` (rule + target), to prove
    /// events went through EventBridge.
    pub async fn capture_events(&self, bus: &str, source: &str) -> String {
        let q = unique("capture");
        let url = self
            .sqs
            .create_queue()
            .queue_name(&q)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        let rule = unique("all");
        self.eb
            .put_rule()
            .name(&rule)
            .event_bus_name(bus)
            .event_pattern(serde_json::json!({ "source": [source] }).to_string())
            .send()
            .await
            .unwrap();
        self.eb
            .put_targets()
            .rule(&rule)
            .event_bus_name(bus)
            .targets(
                aws_sdk_eventbridge::types::Target::builder()
                    .id("capture")
                    .arn(arn)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        url
    }

    /// Reads the capture queue until `want` returns true for what was read (or the timeout).
    pub async fn read_events(
        &self,
        url: &str,
        timeout: Duration,
        want: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let start = Instant::now();
        let mut all = Vec::new();
        while !want(&all) && start.elapsed() < timeout {
            let r = self
                .sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            for m in r.messages() {
                all.push(serde_json::from_str(m.body().unwrap()).unwrap());
                self.sqs
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
        all
    }
}
