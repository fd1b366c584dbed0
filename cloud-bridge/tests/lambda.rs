//! `cloud-bridge lambda` through a test Lambda Runtime API server (next / response / error),
//! end to end into the AWS emulator.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the function sent back for an invocation.
#[derive(Debug)]
struct Outcome {
    request_id: String,
    /// "response" or "error".
    kind: String,
    body: Value,
}

/// A minimal Lambda Runtime API: hands out the queued events on `GET .../invocation/next`
/// (and then blocks, like the real one with no work), captures `POST .../response|error`.
struct RuntimeApi {
    addr: String,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
}

impl RuntimeApi {
    async fn start(events: Vec<Value>) -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let queue = Arc::new(Mutex::new(
            events
                .into_iter()
                .enumerate()
                .map(|(i, e)| (format!("req-{i}"), e))
                .collect::<VecDeque<_>>(),
        ));
        let (tx, outcomes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(sock, Arc::clone(&queue), tx.clone()));
            }
        });
        RuntimeApi { addr, outcomes }
    }

    async fn next_outcome(&mut self) -> Outcome {
        tokio::time::timeout(Duration::from_secs(60), self.outcomes.recv())
            .await
            .expect("the function answered in time")
            .unwrap()
    }
}

async fn serve(
    sock: TcpStream,
    queue: Arc<Mutex<VecDeque<(String, Value)>>>,
    tx: mpsc::UnboundedSender<Outcome>,
) {
    let mut r = BufReader::new(sock);
    loop {
        // Request line and headers.
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut len = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await.unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => len = value.trim().parse().unwrap(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).await.unwrap();
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(len, 0);
            r.read_exact(&mut body).await.unwrap();
        }

        let sock = r.get_mut();
        if method == "GET" && path.ends_with("/runtime/invocation/next") {
            let next = queue.lock().unwrap().pop_front();
            let Some((id, event)) = next else {
                // No more work: hold the request, as the real API does.
                futures_pending().await;
                return;
            };
            let payload = event.to_string();
            let deadline = common_now_ms() + 60_000;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Lambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:cloud-bridge\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1\r\n\
                 Content-Length: {}\r\n\r\n{payload}",
                payload.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
        } else if method == "POST" && path.contains("/runtime/invocation/") {
            let rest = path.split("/runtime/invocation/").nth(1).unwrap();
            let (id, kind) = rest.split_once('/').unwrap();
            let _ = tx.send(Outcome {
                request_id: id.to_string(),
                kind: kind.to_string(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            });
            sock.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"status\":\"OK\"}\n")
                .await
                .unwrap();
        } else {
            sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        }
    }
}

/// `cloud-bridge lambda` against the test Runtime API at `addr`, as Lambda starts it.
fn start_lambda(cfg: &std::path::Path, addr: &str, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(BIN)
        .arg("lambda")
        .env("CLOUD_BRIDGE_CONFIG", cfg)
        .env("AWS_LAMBDA_RUNTIME_API", addr)
        .env("AWS_LAMBDA_FUNCTION_NAME", "cloud-bridge")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/cloud-bridge")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdout(std::fs::File::create(dir.join("lambda.stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("lambda.log")).unwrap())
        .spawn()
        .unwrap()
}

async fn futures_pending() {
    std::future::pending::<()>().await
}

fn common_now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_runtime_loop_end_to_end() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("lambda");
    let cfg = write_config(
        dir.path(),
        "lambda.toml",
        &bridge_config(&endpoint, &names, None, "unused"),
    );
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;
    let queue = aws.capture_events(&names.bus, "iot.edge-pipeline").await;

    let gw = "gw-lambda";
    let cbor =
        base64::engine::general_purpose::STANDARD.encode(proto::wire::encode(&batch(gw, 1..=20)));
    let json_batch = serde_json::to_value(batch(gw, 11..=30)).unwrap();
    let events = vec![
        // (a) an IoT rule's base64 CBOR
        json!({ "cbor": cbor, "gateway": gw }),
        // (a) a JSON batch overlapping the first (a redelivery plus new results)
        json_batch,
        // a gap: nothing stored, an error so that Lambda retries
        serde_json::to_value(batch(gw, 41..=45)).unwrap(),
        // (b) an SQS (DLQ) record that is not a DLQ message: stored under failures/
        json!({ "Records": [{ "eventSource": "aws:sqs", "messageId": "m1", "body": "{}" }] }),
        // (c) an EventBridge event that is not a correction trigger: refused
        json!({ "detail-type": "EventCorrected", "source": "iot.edge-pipeline", "detail": {} }),
        json!({ "what": "ever" }),
    ];
    let mut api = RuntimeApi::start(events).await;

    let mut child = start_lambda(&cfg, &api.addr, dir.path());

    let first = api.next_outcome().await;
    assert_eq!(
        (first.request_id.as_str(), first.kind.as_str()),
        ("req-0", "response"),
        "{first:?}"
    );
    assert_eq!(
        first.body,
        json!({ "gateway": gw, "results": 20, "hwm": 20 })
    );
    let second = api.next_outcome().await;
    assert_eq!(second.kind, "response", "{second:?}");
    assert_eq!(second.body["hwm"], 30);

    let gap = api.next_outcome().await;
    assert_eq!(gap.kind, "error", "{gap:?}");
    let msg = gap.body["errorMessage"].as_str().unwrap();
    assert!(msg.contains("gap") && msg.contains("31..=40"), "{msg}");

    let sqs = api.next_outcome().await;
    assert_eq!(sqs.kind, "response", "{sqs:?}");
    assert_eq!(sqs.body, json!({ "batchItemFailures": [] }));
    let failures = aws.objects(&names.bucket, "failures/").await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures
            .values()
            .next()
            .unwrap()
            .contains("not a DLQ message")
    );

    for what in ["not a correction trigger", "unrecognised"] {
        let o = api.next_outcome().await;
        assert_eq!(o.kind, "error", "{what}: {o:?}");
        let msg = o.body["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(what), "{what}: {msg}");
    }

    assert_eq!(aws.hwm(&names.table, gw).await, 30);
    assert_eq!(
        aws.stored_edge_seqs(&names.bucket, gw).await,
        (1..=30).collect::<Vec<_>>()
    );
    let events = aws
        .read_events(&queue, Duration::from_secs(30), |ev| ev.len() >= 30)
        .await;
    assert_eq!(events.len(), 30);

    let _ = child.kill();
    let _ = child.wait();
    // One EMF line per invocation that counted something.
    let emf = std::fs::read_to_string(dir.path().join("lambda.stdout")).unwrap();
    let processed: u64 = emf
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["Mode"] == "lambda")
        .filter_map(|v| v["processed"].as_u64())
        .sum();
    assert_eq!(processed, 30, "{emf}");
}

/// A recorded event of `tests/events/`.
fn recorded(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/events")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_takes_device_messages_from_api_gateway_iot_rules_and_eventbridge() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("lambdadev");
    let keys = dir.path().join("api-keys");
    std::fs::write(
        &keys,
        cloud_bridge::ingest::auth::key_line("meter-p1", "test-key-phone-1-0123456789abcdef"),
    )
    .unwrap();
    let engine = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let cfg = write_config(
        dir.path(),
        "lambda.toml",
        &format!(
            "{}\n[ingest]\nengine_config = \"{}\"\n\n[http]\napi_keys = \"{}\"\n",
            bridge_config(&endpoint, &names, None, "unused"),
            engine.display(),
            keys.display()
        ),
    );
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;

    let apigw = recorded("apigw-v2-device-event.json");
    let mut unauthenticated = apigw.clone();
    unauthenticated["headers"]
        .as_object_mut()
        .unwrap()
        .remove("x-api-key");
    let iot = recorded("iot-rule-device-event.json");
    // The same device publishing CBOR: the rule base64-encodes the payload.
    let mut cbor = Vec::new();
    ciborium::into_writer(
        &json!({"id": "i2", "seq": 2, "ts": 1_764_064_860_000_i64,
                "data": {"energy_kwh": 70.25, "voltage_v": 229.0, "current_a": 0.8}}),
        &mut cbor,
    )
    .unwrap();
    let iot_cbor = json!({
        "topic": "devices/meter-iot1/events/meter",
        "payload": base64::engine::general_purpose::STANDARD.encode(&cbor),
    });
    let eb = recorded("eventbridge-device-event.json");
    let mut api = RuntimeApi::start(vec![
        apigw.clone(),
        apigw,
        unauthenticated,
        iot,
        iot_cbor,
        eb,
        // Not a device topic: dead-lettered (an answer, not a failure Lambda would retry).
        json!({"topic": "sensors/x", "id": "z"}),
        // The schedule's sweep for silent devices (none has a gap due).
        recorded("scheduled-ingest-sweep.json"),
    ])
    .await;
    let mut child = start_lambda(&cfg, &api.addr, dir.path());

    let http_body = |o: &Outcome| -> Value {
        serde_json::from_str(o.body["body"].as_str().unwrap_or("null")).unwrap()
    };
    let stored = api.next_outcome().await;
    assert_eq!(stored.kind, "response", "{stored:?}");
    assert_eq!(stored.body["statusCode"], 202, "{stored:?}");
    assert_eq!(http_body(&stored)["event_id"], "meter-p1/a1");
    let again = api.next_outcome().await;
    assert_eq!(again.body["statusCode"], 202, "{again:?}");
    assert_eq!(http_body(&again)["duplicate"], true, "{again:?}");
    let refused = api.next_outcome().await;
    assert_eq!(refused.body["statusCode"], 401, "{refused:?}");
    for (what, id) in [
        ("iot json", "meter-iot1/i1"),
        ("iot cbor", "meter-iot1/i2"),
        ("eventbridge", "meter-eb1/b1"),
    ] {
        let o = api.next_outcome().await;
        assert_eq!(o.kind, "response", "{what}: {o:?}");
        assert_eq!(o.body["stored"], true, "{what}: {o:?}");
        assert_eq!(o.body["event_id"], id, "{what}: {o:?}");
    }
    let stray = api.next_outcome().await;
    assert_eq!(stray.kind, "response", "{stray:?}");
    assert_eq!(stray.body["dead_lettered"], true, "{stray:?}");
    assert!(
        stray.body["error"]
            .as_str()
            .unwrap()
            .contains("not a device topic"),
        "{stray:?}"
    );
    let sweep = api.next_outcome().await;
    assert_eq!(sweep.kind, "response", "{sweep:?}");
    assert_eq!(
        (&sweep.body["due"], &sweep.body["declared"]),
        (&json!(0), &json!(0)),
        "{sweep:?}"
    );
    let _ = child.kill();
    let _ = child.wait();

    let mut via: Vec<(String, String)> = aws
        .stored(&names.bucket)
        .await
        .into_iter()
        .map(|(_, r)| (r.event_id, r.via.as_str().to_string()))
        .collect();
    via.sort();
    assert_eq!(
        via,
        [
            ("meter-eb1/b1".to_string(), "eventbridge".to_string()),
            ("meter-iot1/i1".to_string(), "iot".to_string()),
            ("meter-iot1/i2".to_string(), "iot".to_string()),
            ("meter-p1/a1".to_string(), "http".to_string()),
        ]
    );
    let i2 = aws
        .stored(&names.bucket)
        .await
        .into_iter()
        .find(|(_, r)| r.event_id == "meter-iot1/i2")
        .unwrap()
        .1;
    assert_eq!(
        i2.result["consumption_kwh"],
        json!(0.25),
        "the CBOR event's delta is against the JSON one"
    );
}

/// A recorded SQS event whose record bodies are replaced by `bodies` (the IoT rule's
/// `{"cbor", "gateway"}` of batches made here), each from queue `queue`.
fn sqs_event(name: &str, queue: &str, bodies: &[String]) -> Value {
    let mut ev = recorded(name);
    let records = ev["Records"].as_array_mut().unwrap();
    assert_eq!(records.len(), bodies.len(), "{name}");
    for (r, body) in records.iter_mut().zip(bodies) {
        r["body"] = json!(body);
        r["eventSourceARN"] = json!(format!("arn:aws:sqs:us-east-1:123456789012:{queue}"));
    }
    ev
}

/// The body the template's IoT rule on `gateways/+/results` puts on the results queue.
fn iot_rule_body(b: &proto::Batch) -> String {
    let cbor = base64::engine::general_purpose::STANDARD.encode(proto::wire::encode(b));
    json!({ "cbor": cbor, "gateway": b.gateway }).to_string()
}

/// Every event shape `cloud-bridge/deploy/template.yaml` wires to the function, as recorded
/// in `tests/events/`: the results queue's SQS batches (out of order, one with a gap), the
/// DLQ's (a redriven batch, one given up on, a DLQ message), the anomaly schedules, the
/// discrepancy alarm's state changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_takes_the_events_the_template_wires_up() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("lambdatpl");
    let engine = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let cfg = write_config(
        dir.path(),
        "lambda.toml",
        &format!(
            "{}\n[verify]\nengine_config = \"{}\"\n\n[anomaly]\nmin_samples = 5\n",
            bridge_config(&endpoint, &names, None, "unused"),
            engine.display(),
        ),
    );
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;

    // SQS keeps no order: 4..=6 arrives before 1..=3; gw-sqs2's batch has a gap.
    let results = sqs_event(
        "sqs-iot-results.json",
        "edge-pipeline-results",
        &[
            iot_rule_body(&batch("gw-sqs", 4..=6)),
            iot_rule_body(&batch("gw-sqs", 1..=3)),
            iot_rule_body(&batch("gw-sqs2", 10..=12)),
        ],
    );
    let gap_id = results["Records"][2]["messageId"].clone();
    // The DLQ: a batch redriven there (stored now), one that failed its last receive
    // (given up on: failures/), and a DLQ message that is not one (failures/).
    let mut dlq = sqs_event(
        "sqs-dlq.json",
        &names.dlq,
        &[
            iot_rule_body(&batch("gw-sqs", 7..=8)),
            iot_rule_body(&batch("gw-sqs2", 10..=12)),
            "{}".to_string(),
        ],
    );
    dlq["Records"][2]["body"] = json!("{}");
    let mut alarm_ok = recorded("cloudwatch-alarm-state-change.json");
    alarm_ok["detail"]["state"]["value"] = json!("OK");
    let mut api = RuntimeApi::start(vec![
        results,
        dlq,
        recorded("scheduled-anomaly-scan.json"), // before any training: skipped
        recorded("scheduled-anomaly-train.json"),
        recorded("scheduled-anomaly-scan.json"),
        recorded("cloudwatch-alarm-state-change.json"),
        alarm_ok,
    ])
    .await;
    let mut child = start_lambda(&cfg, &api.addr, dir.path());

    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert_eq!(
        o.body,
        json!({ "batchItemFailures": [{ "itemIdentifier": gap_id }] })
    );
    assert_eq!(aws.hwm(&names.table, "gw-sqs").await, 6);

    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert_eq!(o.body, json!({ "batchItemFailures": [] }), "{o:?}");
    assert_eq!(aws.hwm(&names.table, "gw-sqs").await, 8);
    assert_eq!(
        aws.stored_edge_seqs(&names.bucket, "gw-sqs").await,
        (1..=8).collect::<Vec<_>>()
    );
    assert!(
        aws.stored_edge_seqs(&names.bucket, "gw-sqs2")
            .await
            .is_empty()
    );
    let failures = aws.objects(&names.bucket, "failures/").await;
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(
        failures
            .values()
            .any(|f| f.contains("not stored after 5 receives") && f.contains("1..=9 is missing")),
        "{failures:?}"
    );

    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert!(o.body["skipped"].is_string(), "{o:?}");

    // Training: the 30 days before the schedule's day, which hold gw-sqs's 8 results.
    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert_eq!(o.body["range"]["since"], "2025-10-27", "{o:?}");
    assert_eq!(o.body["range"]["until"], "2025-11-25", "{o:?}");
    assert_eq!(o.body["types"][0]["event_type"], "meter", "{o:?}");
    assert_eq!(o.body["types"][0]["samples"], 8, "{o:?}");

    // The scan: the schedule's day and the one before, scored with that model.
    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert_eq!(o.body["range"]["since"], "2025-11-25", "{o:?}");
    assert_eq!(o.body["types"]["meter"]["scanned"], 8, "{o:?}");

    // The alarm: a correction run over the alarm's day and the day before.
    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert_eq!(o.body["records"], 8, "{o:?}");
    assert!(o.body["objects"].as_u64().unwrap() >= 1, "{o:?}");
    let o = api.next_outcome().await;
    assert_eq!(o.body, json!({ "ignored": "alarm state OK" }), "{o:?}");

    let _ = child.kill();
    let _ = child.wait();
}

/// Lambda's provided.al2023 runtime starts the bootstrap with no arguments: with
/// `AWS_LAMBDA_RUNTIME_API` set that is `cloud-bridge lambda`, and the stack's resource names
/// come from the environment over the packaged config's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_without_arguments_is_the_lambda_with_the_stacks_names() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("lambdaboot");
    // The packaged config names other resources; the environment names the provisioned ones.
    let packaged = AwsNames::unique("packaged");
    let cfg = write_config(
        dir.path(),
        "lambda.toml",
        &bridge_config(&endpoint, &packaged, None, "unused"),
    );
    let real = write_config(
        dir.path(),
        "real.toml",
        &bridge_config(&endpoint, &names, None, "unused"),
    );
    provision(&real);
    let aws = TestAws::new(&endpoint).await;
    let mut api = RuntimeApi::start(vec![json!({
        "cbor": base64::engine::general_purpose::STANDARD
            .encode(proto::wire::encode(&batch("gw-boot", 1..=3))),
        "gateway": "gw-boot",
    })])
    .await;
    let mut child = std::process::Command::new(BIN)
        .env("CLOUD_BRIDGE_CONFIG", &cfg)
        .env("CLOUD_BRIDGE_BUCKET", &names.bucket)
        .env("CLOUD_BRIDGE_TABLE", &names.table)
        .env("CLOUD_BRIDGE_EVENT_BUS", &names.bus)
        .env("CLOUD_BRIDGE_DLQ_QUEUE", &names.dlq)
        .env("AWS_LAMBDA_RUNTIME_API", &api.addr)
        .env("AWS_LAMBDA_FUNCTION_NAME", "cloud-bridge")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/cloud-bridge")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdout(std::fs::File::create(dir.path().join("lambda.stdout")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("lambda.log")).unwrap())
        .spawn()
        .unwrap();
    let o = api.next_outcome().await;
    assert_eq!(o.kind, "response", "{o:?}");
    assert_eq!(o.body["hwm"], 3, "{o:?}");
    assert_eq!(
        aws.stored_edge_seqs(&names.bucket, "gw-boot").await,
        vec![1, 2, 3]
    );
    let _ = child.kill();
    let _ = child.wait();
}
