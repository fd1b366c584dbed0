//! Gateway-less devices: `cloud-bridge run` with `[ingest]` and `[http]` (no broker), on the
//! AWS emulator. Requests go through curl and through a Rust HTTP client (hyper); the outcome
//! is read back from S3, the SQS DLQ and (through a rule) EventBridge.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use proto::{EventResult, Via};
use serde_json::{Value, json};

const KEY: &str = "test-key-phone-1-0123456789abcdef";
/// Readings a minute apart (the meter's power check allows 50 kW: 0.5 kWh a minute is 30).
const MIN: i64 = 60_000;
const OTHER_KEY: &str = "test-key-phone-2-0123456789abcdef";

fn now_ms() -> i64 {
    cloud_bridge::now_ms()
}

/// A bridge config for HTTP ingest: the repository's engine config, gaps reported at once,
/// two devices' API keys, port 0.
fn ingest_config(dir: &Path, endpoint: &str, names: &AwsNames, name: &str) -> PathBuf {
    ingest_config_with(dir, endpoint, names, name, "missed_after_s = 0")
}

/// [`ingest_config`] with `settings` in its `[ingest]` table.
fn ingest_config_with(
    dir: &Path,
    endpoint: &str,
    names: &AwsNames,
    name: &str,
    settings: &str,
) -> PathBuf {
    let keys = dir.join("api-keys");
    std::fs::write(
        &keys,
        format!(
            "# device  hash\n{}\n{}\n",
            cloud_bridge::ingest::auth::key_line("meter-p1", KEY),
            cloud_bridge::ingest::auth::key_line("meter-p2", OTHER_KEY),
        ),
    )
    .unwrap();
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let text = format!(
        "{}\n[ingest]\nengine_config = \"{}\"\n{settings}\n\n\
         [dlq]\nprocess = false\n\n[http]\nlisten = \"127.0.0.1:0\"\napi_keys = \"{}\"\nmax_body_bytes = 4096\nmax_batch = 20\n",
        bridge_config(endpoint, names, None, "unused"),
        engine.display(),
        keys.display()
    );
    write_config(dir, &format!("{name}.toml"), &text)
}

/// Starts the bridge and reads the port it listens on from its log.
fn start(dir: &Path, config: &Path, name: &str, env: &[(&str, &str)]) -> (Bridge, String) {
    let b = Bridge::start(config, dir.join(format!("{name}.log")), env);
    b.wait_log("http listening", Duration::from_secs(30));
    let log = b.log_text();
    let line = log.lines().find(|l| l.contains("http listening")).unwrap();
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (b, format!("http://{addr}"))
}

/// `cloud-bridge ARGS --config CFG` (a tool command), its JSON output.
fn bridge_json(cfg: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `curl -X POST` with the headers; (status, JSON body or Null).
fn curl(url: &str, headers: &[&str], body: &[u8]) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
        "--data-binary",
        "@-",
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("curl is installed");
    {
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(body).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn key_header(key: &str) -> String {
    format!("X-Api-Key: {key}")
}

/// A meter message of `device` (cumulative `kwh`).
fn meter(id: &str, seq: u64, ts: i64, kwh: f64) -> Value {
    json!({"id": id, "seq": seq, "ts": ts,
           "data": {"energy_kwh": kwh, "voltage_v": 230.0, "current_a": 2.0}})
}

fn post_one(base: &str, key: &str, device: &str, msg: &Value) -> (u16, Value) {
    curl(
        &format!("{base}/v1/devices/{device}/events/meter"),
        &[&key_header(key), "Content-Type: application/json"],
        msg.to_string().as_bytes(),
    )
}

/// The stored gateway-less results, by event id (asserting each is there once).
async fn stored(aws: &TestAws, bucket: &str) -> std::collections::BTreeMap<String, EventResult> {
    let mut out = std::collections::BTreeMap::new();
    for (key, r) in aws.stored(bucket).await {
        assert!(key.contains("/gateway=cloud/dev-"), "{key}");
        assert!(
            out.insert(r.event_id.clone(), r).is_none(),
            "{key}: stored twice"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_events_are_processed_stored_once_and_refused_with_reasons() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("ingest");
    let cfg = ingest_config(dir.path(), &endpoint, &names, "b1");
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;
    let queue = aws.capture_events(&names.bus, "iot.edge-pipeline").await;
    let (_bridge, base) = start(dir.path(), &cfg, "b1", &[]);
    let t0 = now_ms() - 3_600_000;

    // Valid, then its successor: the delta is taken against the first.
    let (code, body) = post_one(&base, KEY, "meter-p1", &meter("e1", 1, t0, 100.0));
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["event_id"], "meter-p1/e1");
    let (code, _) = post_one(&base, KEY, "meter-p1", &meter("e2", 2, t0 + MIN, 100.5));
    assert_eq!(code, 202);
    // A resend: answered as stored, nothing written twice.
    let (code, body) = post_one(&base, KEY, "meter-p1", &meter("e2", 2, t0 + MIN, 100.5));
    assert_eq!(
        (code, body["duplicate"].clone()),
        (202, json!(true)),
        "{body}"
    );

    // Invalid: 400 naming the field, and dead-lettered.
    let mut bad = meter("e3", 3, t0 + 2 * MIN, 101.0);
    bad["data"]["voltage_v"] = json!(612.0);
    let (code, body) = post_one(&base, KEY, "meter-p1", &bad);
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["stage"], "schema");
    assert!(
        body["error"].as_str().unwrap().contains("voltage_v"),
        "{body}"
    );
    assert_eq!(body["dead_lettered"], true);

    // Credentials: none, unknown, another device's.
    let url = format!("{base}/v1/devices/meter-p1/events/meter");
    let msg = meter("e9", 9, t0, 1.0).to_string();
    assert_eq!(curl(&url, &[], msg.as_bytes()).0, 401);
    assert_eq!(curl(&url, &[&key_header("nope")], msg.as_bytes()).0, 401);
    assert_eq!(curl(&url, &[&key_header(OTHER_KEY)], msg.as_bytes()).0, 403);
    assert_eq!(
        curl(&url, &["Authorization: Bearer a.b.c"], msg.as_bytes()).0,
        401,
        "a JWT where only API keys are configured"
    );
    // Oversized.
    let big = vec![b' '; 5000];
    assert_eq!(curl(&url, &[&key_header(KEY)], &big).0, 413);

    // Out of order: seq 6 after 3 opens 4..=5 (reported at once here), 4 fills part late.
    let (code, _) = post_one(&base, KEY, "meter-p1", &meter("e6", 6, t0 + 5 * MIN, 103.0));
    assert_eq!(code, 202);
    let (code, body) = post_one(&base, KEY, "meter-p1", &meter("e4", 4, t0 + 3 * MIN, 101.5));
    assert_eq!(code, 202, "{body}");
    assert!(
        body["flags"].as_array().unwrap().contains(&json!("late")),
        "{body}"
    );

    // A batch: two good, one without a device, one of another device.
    let batch = json!({"events": [
        {"device": "meter-p1", "type": "meter", "id": "e7", "seq": 7, "ts": t0 + 6 * MIN,
         "data": {"energy_kwh": 103.5, "voltage_v": 230.0, "current_a": 2.0}},
        {"type": "meter", "id": "x"},
        {"device": "meter-p2", "type": "meter", "id": "y", "seq": 1, "ts": t0,
         "data": {"energy_kwh": 1.0, "voltage_v": 230.0, "current_a": 2.0}},
        {"device": "meter-p1", "type": "meter", "id": "e8", "seq": 8, "ts": t0 + 7 * MIN,
         "data": {"energy_kwh": 104.0, "voltage_v": 230.0, "current_a": 2.0}},
    ]});
    let (code, body) = curl(
        &format!("{base}/v1/events:batch"),
        &[&key_header(KEY)],
        batch.to_string().as_bytes(),
    );
    assert_eq!(code, 207, "{body}");
    let codes: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [202, 400, 403, 202], "{body}");
    // Not a batch at all.
    let (code, body) = curl(
        &format!("{base}/v1/events:batch"),
        &[&key_header(KEY)],
        b"[1]",
    );
    assert_eq!(code, 400, "{body}");

    // S3: each accepted event exactly once, as a gateway-less result.
    let results = stored(&aws, &names.bucket).await;
    let ids: Vec<&str> = results.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        [
            "meter-p1/e1",
            "meter-p1/e2",
            "meter-p1/e4",
            "meter-p1/e6",
            "meter-p1/e7",
            "meter-p1/e8"
        ]
    );
    for r in results.values() {
        assert_eq!(
            (r.via, r.gateway.as_str(), r.edge_seq),
            (Via::Http, "cloud", 0)
        );
    }
    assert_eq!(results["meter-p1/e1"].result["consumption_kwh"], json!(0.0));
    assert_eq!(results["meter-p1/e2"].result["consumption_kwh"], json!(0.5));
    assert!(
        results["meter-p1/e1"]
            .flags
            .contains(&"first_reading".to_string())
    );

    // The DLQ (its processor is off here): the invalid event, the element without a
    // device, the non-batch body, each with the message to replay.
    let listing = bridge_json(&cfg, &["dlq", "list", "--json"]);
    let mut reasons: Vec<String> = listing["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["reason"].as_str().unwrap().to_string())
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{listing}");
    assert!(reasons[0].contains("voltage_v"), "{reasons:?}");
    assert!(reasons[1].contains("events: required"), "{reasons:?}");
    assert!(reasons[2].contains("events[1].device"), "{reasons:?}");
    // The final retry replays each through the engine: refused again, so each is stored
    // under failures/ with both reasons, and nothing goes back into the queue.
    let drained = bridge_json(&cfg, &["dlq", "process", "--json"]);
    assert_eq!(drained["failures"], 3, "{drained}");
    let failures = aws.objects(&names.bucket, "failures/").await;
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(
        failures
            .values()
            .any(|f| f.contains("refused again on replay") && f.contains("voltage_v")),
        "{failures:?}"
    );
    let after = bridge_json(&cfg, &["dlq", "list", "--json"]);
    assert_eq!(after["messages"], json!([]), "{after}");

    // EventBridge: every stored event, the dead letters, and the missed seq 5.
    let events = aws
        .read_events(&queue, Duration::from_secs(30), |ev| {
            let n = |t: &str| ev.iter().filter(|e| e["detail-type"] == t).count();
            n("EventProcessed") >= 6 && n("EventDeadLettered") >= 3 && n("MissedEvents") >= 1
        })
        .await;
    let n = |t: &str| events.iter().filter(|e| e["detail-type"] == t).count();
    assert_eq!(n("EventProcessed"), 6);
    assert_eq!(n("EventDeadLettered"), 3);
    let missed: Vec<&Value> = events
        .iter()
        .filter(|e| e["detail-type"] == "MissedEvents")
        .map(|e| &e["detail"])
        .collect();
    assert_eq!(missed.len(), 1, "{missed:?}");
    assert_eq!(missed[0]["kind"], "device");
    assert_eq!(missed[0]["device"], "meter-p1");
    assert_eq!(
        (
            missed[0]["first_seq"].clone(),
            missed[0]["last_seq"].clone()
        ),
        (json!(4), json!(5))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_between_the_s3_write_and_the_commit_loses_and_duplicates_nothing() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("ingestkill");
    let cfg = ingest_config(dir.path(), &endpoint, &names, "k");
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;
    let t0 = now_ms() - 3_600_000;
    {
        let (_b, base) = start(dir.path(), &cfg, "k0", &[]);
        assert_eq!(
            post_one(&base, KEY, "meter-p1", &meter("e1", 1, t0, 10.0)).0,
            202
        );
    }
    // The bridge pauses after its PUT, before the commit; it is killed there.
    let (mut b, base) = start(
        dir.path(),
        &cfg,
        "k1",
        &[("CLOUD_BRIDGE_FAULT_PAUSE_AFTER_PUT_MS", "60000")],
    );
    let url = format!("{base}/v1/devices/meter-p1/events/meter");
    let msg = meter("e2", 2, t0 + MIN, 10.75).to_string();
    let client = std::thread::spawn(move || curl(&url, &[&key_header(KEY)], msg.as_bytes()));
    b.wait_log("fault hook: pausing", Duration::from_secs(30));
    b.kill9();
    let (code, _) = client.join().unwrap();
    assert_eq!(code, 0, "the client got no answer");
    // The object is there, uncommitted.
    assert_eq!(stored(&aws, &names.bucket).await.len(), 2);

    // The client resends to a fresh bridge: stored (not a duplicate: nothing was committed),
    // under the same key; then the next event's delta is against it.
    let (_b2, base) = start(dir.path(), &cfg, "k2", &[]);
    let (code, body) = post_one(&base, KEY, "meter-p1", &meter("e2", 2, t0 + MIN, 10.75));
    assert_eq!(code, 202, "{body}");
    assert_eq!(body.get("duplicate"), None, "{body}");
    let (code, _) = post_one(&base, KEY, "meter-p1", &meter("e3", 3, t0 + 2 * MIN, 11.0));
    assert_eq!(code, 202);
    let results = stored(&aws, &names.bucket).await;
    assert_eq!(results.len(), 3, "{:?}", results.keys());
    assert_eq!(
        results["meter-p1/e2"].result["consumption_kwh"],
        json!(0.75)
    );
    assert_eq!(
        results["meter-p1/e3"].result["consumption_kwh"],
        json!(0.25)
    );
}

/// POST through hyper (the Rust client): (status, JSON).
async fn hyper_post(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    url: &str,
    key: &str,
    body: String,
) -> (u16, Value) {
    use http_body_util::BodyExt as _;
    let req = http::Request::post(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_share_one_device_exactly_once() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("ingest2");
    let cfg = ingest_config(dir.path(), &endpoint, &names, "two");
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;
    let (_a, base_a) = start(dir.path(), &cfg, "a", &[]);
    let (_b, base_b) = start(dir.path(), &cfg, "b", &[]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let t0 = now_ms() - 7_200_000;
    const N: u64 = 30;
    // Each event goes to both bridges at once (a client retrying on another instance), and
    // the events follow one another: every pair races for the same device item.
    for seq in 1..=N {
        let msg = meter(
            &format!("e{seq}"),
            seq,
            t0 + seq as i64 * MIN,
            50.0 + seq as f64 * 0.5,
        )
        .to_string();
        let url = |base: &str| format!("{base}/v1/devices/meter-p1/events/meter");
        let (url_a, url_b) = (url(&base_a), url(&base_b));
        let (ra, rb) = tokio::join!(
            hyper_post(&client, &url_a, KEY, msg.clone()),
            hyper_post(&client, &url_b, KEY, msg)
        );
        assert_eq!((ra.0, rb.0), (202, 202), "seq {seq}: {ra:?} {rb:?}");
        let dups = [&ra.1, &rb.1]
            .iter()
            .filter(|b| b["duplicate"] == true)
            .count();
        assert!(
            dups <= 1,
            "seq {seq}: at least one of them stored it: {ra:?} {rb:?}"
        );
    }
    let results = stored(&aws, &names.bucket).await;
    assert_eq!(results.len() as u64, N);
    for seq in 2..=N {
        let r = &results[&format!("meter-p1/e{seq}")];
        assert_eq!(r.result["consumption_kwh"], json!(0.5), "seq {seq}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_the_cloud_broker_are_taken_from_their_topics() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let broker = Broker::start_tls(dir.path(), &pki, &pki.ca);
    let names = AwsNames::unique("ingestmqtt");
    let (c, k) = pki.issue("bridge-mqtt", false);
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let text = format!(
        "{}\n[dlq]\nprocess = false\n\n[ingest]\nengine_config = \"{}\"\nmqtt = true\n",
        bridge_config(
            &endpoint,
            &names,
            Some((broker.port, &pki.ca, &c, &k)),
            "bridge-mqtt"
        ),
        engine.display()
    );
    let cfg = write_config(dir.path(), "mqtt.toml", &text);
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;
    let bridge = Bridge::start(&cfg, dir.path().join("mqtt.log"), &[]);
    bridge.wait_log("subscribed", Duration::from_secs(30));

    let (dc, dk) = pki.issue("meter-cell1", false);
    let device = TestClient::connect(
        "meter-cell1",
        broker.port,
        Tls {
            ca: &pki.ca,
            cert: Some((&dc, &dk)),
        },
    );
    let t0 = now_ms() - 3_600_000;
    let mut bad = meter("c3", 3, t0 + 2 * MIN, 20.5);
    bad["data"]["current_a"] = json!("lots");
    for msg in [
        meter("c1", 1, t0, 20.0),
        meter("c2", 2, t0 + MIN, 20.25),
        meter("c2", 2, t0 + MIN, 20.25),
        bad,
    ] {
        device
            .client
            .publish(
                "devices/meter-cell1/events/meter",
                rumqttc::QoS::AtLeastOnce,
                false,
                msg.to_string(),
            )
            .await
            .unwrap();
    }
    device.wait_acked(4).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let results = loop {
        let r = stored(&aws, &names.bucket).await;
        if r.len() >= 2 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids: Vec<&str> = results.keys().map(String::as_str).collect();
    assert_eq!(ids, ["meter-cell1/c1", "meter-cell1/c2"]);
    assert!(results.values().all(|r| r.via == Via::Iot));
    assert_eq!(
        results["meter-cell1/c2"].result["consumption_kwh"],
        json!(0.25)
    );
    // The refused one is in the DLQ (its processor is off here). The device's PUBACKs come
    // from the broker, not the bridge, so both outcomes are polled for.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listing = bridge_json(&cfg, &["dlq", "list", "--json"]);
        let reasons: Vec<String> = listing["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["reason"].as_str().unwrap().to_string())
            .collect();
        if reasons.iter().any(|r| r.contains("current_a")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listing}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_speaks_for_its_subject() {
    use base64::Engine as _;
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("ingestjwt");
    // An ES256 key pair: its public half in the JWKS, the private half signs the tokens.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "app-1",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let text = format!(
        "{}\n[ingest]\nengine_config = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:0\"\njwks = \"{}\"\n\
         jwt_audience = \"edge-pipeline\"\n",
        bridge_config(&endpoint, &names, None, "unused"),
        engine.display(),
        dir.path().join("jwks.json").display()
    );
    let cfg = write_config(dir.path(), "jwt.toml", &text);
    provision(&cfg);
    let aws = TestAws::new(&endpoint).await;
    let (_b, base) = start(dir.path(), &cfg, "jwt", &[]);
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let token = |sub: &str, aud: &str| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("app-1".into());
        let claims = json!({"sub": sub, "aud": aud, "exp": now_ms() / 1000 + 600});
        jsonwebtoken::encode(&h, &claims, &enc).unwrap()
    };
    let url = format!("{base}/v1/devices/meter-j1/events/meter");
    let msg = meter("j1", 1, now_ms() - 60_000, 5.0).to_string();
    let bearer = |t: String| format!("Authorization: Bearer {t}");
    let (code, body) = curl(
        &url,
        &[&bearer(token("meter-j1", "edge-pipeline"))],
        msg.as_bytes(),
    );
    assert_eq!(code, 202, "{body}");
    let (code, _) = curl(
        &url,
        &[&bearer(token("meter-j2", "edge-pipeline"))],
        msg.as_bytes(),
    );
    assert_eq!(code, 403, "another device's token");
    let (code, body) = curl(&url, &[&bearer(token("meter-j1", "other"))], msg.as_bytes());
    assert_eq!(code, 401, "wrong audience: {body}");
    assert_eq!(stored(&aws, &names.bucket).await.len(), 1);
}

/// `cloud-bridge sweep --json` on two processes at once (two bridges' schedules firing
/// together); their reports.
fn two_sweeps(cfg: &Path) -> [Value; 2] {
    let spawn = || {
        Command::new(BIN)
            .args(["sweep", "--json", "--config"])
            .arg(cfg)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    [a, b].map(|c| {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sweep: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    })
}

/// A device that goes silent with a gap open: nothing of its own declares the gap, the sweep
/// does, once, though two sweeps run at once; and not before `missed_after_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_s_gap_is_declared_by_the_sweep_exactly_once() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("sweep");
    let cfg = ingest_config_with(
        dir.path(),
        &endpoint,
        &names,
        "sweep",
        "missed_after_s = 2\nsweep_every_s = 0",
    );
    assert_eq!(provision(&cfg)["table"]["state"], "created");
    let aws = TestAws::new(&endpoint).await;
    let queue = aws.capture_events(&names.bus, "iot.edge-pipeline").await;
    let (_bridge, base) = start(dir.path(), &cfg, "sweep", &[]);
    let t0 = now_ms() - 3_600_000;
    let sent = now_ms();
    assert_eq!(
        post_one(&base, KEY, "meter-p1", &meter("e1", 1, t0, 10.0)).0,
        202
    );
    assert_eq!(
        post_one(&base, KEY, "meter-p1", &meter("e3", 3, t0 + 2 * MIN, 11.0)).0,
        202
    );
    // The device says nothing more. Sweep until the gap falls due.
    let declared = loop {
        let reports = two_sweeps(&cfg);
        let declared: u64 = reports
            .iter()
            .map(|r| r["declared"].as_u64().unwrap())
            .sum();
        if declared > 0 {
            assert!(
                now_ms() >= sent + 2000,
                "declared before missed_after_s: {reports:?}"
            );
            break declared;
        }
        assert!(now_ms() < sent + 60_000, "never declared: {reports:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(declared, 1, "two sweeps at once declare a gap once");
    let events = aws
        .read_events(&queue, Duration::from_secs(30), |ev| {
            ev.iter().any(|e| e["detail-type"] == "MissedEvents")
        })
        .await;
    let missed: Vec<&Value> = events
        .iter()
        .filter(|e| e["detail-type"] == "MissedEvents")
        .map(|e| &e["detail"])
        .collect();
    assert_eq!(missed.len(), 1, "{missed:?}");
    assert_eq!(
        (
            &missed[0]["device"],
            &missed[0]["first_seq"],
            &missed[0]["last_seq"]
        ),
        (&json!("meter-p1"), &json!(2), &json!(2))
    );
    // Nothing is due any more.
    let again = bridge_json(&cfg, &["sweep", "--json"]);
    assert_eq!(
        (&again["due"], &again["declared"]),
        (&json!(0), &json!(0)),
        "{again}"
    );
}

/// EventBridge refuses the events of a stored message: the answer is still 202 (the event is
/// committed), and the sweep publishes them though the device sends nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_eventbridge_refused_are_published_by_the_sweep() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("unsent");
    let cfg = ingest_config_with(dir.path(), &endpoint, &names, "good", "sweep_every_s = 0");
    provision(&cfg);
    // The same, but on an event bus that does not exist.
    let broken = write_config(
        dir.path(),
        "broken.toml",
        &std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("event_bus = \"{}\"", names.bus),
            "event_bus = \"no-such-bus\"",
        ),
    );
    let aws = TestAws::new(&endpoint).await;
    let queue = aws.capture_events(&names.bus, "iot.edge-pipeline").await;
    let (bridge, base) = start(dir.path(), &broken, "broken", &[]);
    let (code, body) = post_one(&base, KEY, "meter-p1", &meter("e1", 1, now_ms() - MIN, 5.0));
    assert_eq!(code, 202, "{body}");
    assert_eq!(stored(&aws, &names.bucket).await.len(), 1);
    bridge.wait_log("not published yet", Duration::from_secs(30));
    drop(bridge);

    let report = bridge_json(&cfg, &["sweep", "--json"]);
    assert_eq!(
        (&report["due"], &report["published"]),
        (&json!(1), &json!(1)),
        "{report}"
    );
    let events = aws
        .read_events(&queue, Duration::from_secs(30), |ev| {
            ev.iter().any(|e| e["detail-type"] == "EventProcessed")
        })
        .await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e["detail-type"] == "EventProcessed")
            .map(|e| e["detail"]["event_id"].clone())
            .collect::<Vec<_>>(),
        vec![json!("meter-p1/e1")]
    );
    let again = bridge_json(&cfg, &["sweep", "--json"]);
    assert_eq!(again["due"], 0, "{again}");
}

/// A table provisioned by an older bridge (no sweep index) gets the index from `provision`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_adds_the_sweep_index_to_an_older_table() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("oldtable");
    let cfg = ingest_config_with(dir.path(), &endpoint, &names, "old", "sweep_every_s = 0");
    let aws = TestAws::new(&endpoint).await;
    aws.ddb
        .create_table()
        .table_name(&names.table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
    assert_eq!(provision(&cfg)["table"]["state"], "index added");
    assert_eq!(provision(&cfg)["table"]["state"], "exists");
    let report = bridge_json(&cfg, &["sweep", "--json"]);
    assert_eq!(report["due"], 0, "{report}");
}

/// A bad deploy of the ingest's engine config (a wrong tariff, a too strict power check),
/// then the fix: the DLQ processor replays the refused event into `events/`, and a correction
/// run corrects the wrongly computed gateway-less results, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_less_results_are_corrected_once_and_refusals_replayed_after_a_fix() {
    let Some(endpoint) = require_aws!() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = AwsNames::unique("fix");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let good = std::fs::read_to_string(&example).unwrap();
    let bad = good
        .replace("tariff_eur_per_kwh = 0.28", "tariff_eur_per_kwh = 0.31")
        .replace(
            "power_w <= 50000 && avg_power_w <= 50000",
            "power_w <= 1000 && avg_power_w <= 1000",
        );
    assert_ne!(bad, good);
    std::fs::write(dir.path().join("bad-engine.toml"), &bad).unwrap();
    let fixed = ingest_config_with(dir.path(), &endpoint, &names, "fixed", "sweep_every_s = 0");
    let text = std::fs::read_to_string(&fixed).unwrap();
    // The cloud verifies with the right config; the ingest ran the bad one.
    let text = format!(
        "{}\n[verify]\nengine_config = \"{}\"\n",
        text,
        example.display()
    );
    let fixed = write_config(dir.path(), "fixed.toml", &text);
    let broken = write_config(
        dir.path(),
        "broken.toml",
        &text.replace(
            &format!("engine_config = \"{}\"\nsweep_every_s", example.display()),
            &format!(
                "engine_config = \"{}\"\nsweep_every_s",
                dir.path().join("bad-engine.toml").display()
            ),
        ),
    );
    assert_ne!(
        std::fs::read_to_string(&broken).unwrap(),
        text,
        "the ingest engine was swapped"
    );
    provision(&fixed);
    let aws = TestAws::new(&endpoint).await;
    let (bridge, base) = start(dir.path(), &broken, "broken", &[]);
    let t0 = now_ms() - 3_600_000;
    // 0.01 kWh a minute is 600 W; 2 A at 230 V is 460 W; 10 A is 2300 W.
    let reading = |id: &str, seq: u64, kwh: f64, amps: f64| {
        json!({"id": id, "seq": seq, "ts": t0 + seq as i64 * MIN,
               "data": {"energy_kwh": kwh, "voltage_v": 230.0, "current_a": amps}})
    };
    for (msg, want) in [
        (reading("f1", 1, 100.0, 2.0), 202),
        (reading("f2", 2, 100.01, 2.0), 202),
        (reading("f3", 3, 100.02, 10.0), 400),
        (reading("f4", 4, 100.03, 2.0), 202),
    ] {
        let (code, body) = post_one(&base, KEY, "meter-p1", &msg);
        assert_eq!(code, want, "{msg}: {body}");
    }
    drop(bridge);
    let before = stored(&aws, &names.bucket).await;
    assert_eq!(before.len(), 3);

    // The fix is deployed: the refused event is replayed through the right engine.
    let drained = bridge_json(&fixed, &["dlq", "process", "--json"]);
    let listed = bridge_json(&fixed, &["dlq", "list", "--json"]);
    assert_eq!(listed["messages"], json!([]), "{drained} {listed}");
    assert!(
        aws.objects(&names.bucket, "failures/").await.is_empty(),
        "{drained}"
    );
    let after = stored(&aws, &names.bucket).await;
    assert_eq!(after.len(), 4, "{drained}");
    let f3 = &after["meter-p1/f3"];
    assert_eq!(f3.result["power_w"], json!(2300.0), "{f3:?}");
    // f4 was calculated across f3 (against f2): the late f3 corrects it where it is stored.
    let f4 = &after["meter-p1/f4"];
    assert_eq!(f4.status, proto::Status::Corrected, "{f4:?}");
    assert!(
        f4.flags.iter().any(|f| f == "previous_arrived_late"),
        "{f4:?}"
    );
    let kwh = f4.result["consumption_kwh"].as_f64().unwrap();
    assert!((kwh - 0.01).abs() < 1e-9, "{f4:?}");
    assert_eq!(f4.result["cost_eur"], json!(0.0028), "{f4:?}");

    // The wrong tariff: what the bad engine calculated is corrected, once.
    let day = proto::timestamp::format_rfc3339(now_ms())[..10].to_string();
    let first = bridge_json(&fixed, &["correct", "--since", &day, "--json"]);
    let results = stored(&aws, &names.bucket).await;
    for id in ["meter-p1/f1", "meter-p1/f2"] {
        let r = &results[id];
        assert_eq!(r.status, proto::Status::Corrected, "{id}: {r:?} {first}");
    }
    assert_eq!(results["meter-p1/f2"].result["cost_eur"], json!(0.0028));
    assert_eq!(results["meter-p1/f3"].status, proto::Status::Ok);
    assert_eq!(first["corrected"], 2, "{first}");
    let second = bridge_json(&fixed, &["correct", "--since", &day, "--json"]);
    assert_eq!(second["corrected"], 0, "at most once: {second}");
}
