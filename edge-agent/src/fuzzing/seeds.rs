//! The fuzz targets' seed inputs, made from the repository's fixtures: the example configs in
//! `config/` and `engine/tests/`, device payloads of their event types, and the records, batches,
//! statuses and MQTT packets the codecs produce from them. The seeds are committed as
//! `fuzz/corpus/TARGET/seed-*`; rewrite them after a format change with
//! `cargo test -p edge-agent write_fuzz_seeds -- --ignored`.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::BytesMut;
use engine::{Engine, EngineSpec, Input, Outcome, SeqRange, SeqTracker, State};
use proto::uplink::{GatewayStatus, ReplayRequest};
use proto::{Batch, DlqEntry, EventResult, wire};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Disconnect, PingReq, Publish, Subscribe};
use serde_json::{Value, json};

use crate::missed::{DeviceGaps, MissedRecord};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The engine configs the seeds come from (their `topic`, `limits` and `event_types`).
const CONFIGS: [&str; 3] = [
    "config/edge-agent.toml",
    "config/edge-agent-secure.toml",
    "engine/tests/example_types.toml",
];
/// The engine_config target's first `received_at`: payload timestamps sit near it.
const T0: i64 = 1_764_000_000_000;
/// The gateway the uplink_batch target's leading byte 3 selects ("gw-1").
const GW: &str = "gw-1";

/// One reading of each example event type (see config/edge-agent.toml).
fn readings() -> Vec<(&'static str, Value)> {
    vec![
        (
            "meter",
            json!({"energy_kwh": 1523.25, "voltage_v": 231.5, "current_a": 4.2,
                "power_factor": 0.97, "relay": "on"}),
        ),
        (
            "environment",
            json!({"temperature_c": 21.4, "humidity_pct": 48.0, "pressure_hpa": 1013.2,
                "battery_v": 3.61}),
        ),
        (
            "gps",
            json!({"lat": 52.5163, "lon": 13.3777, "accuracy_m": 4.5, "fix": "3d"}),
        ),
    ]
}

/// Device messages: each reading as devices send it, and the envelope's other shapes.
fn messages() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (i, (ty, data)) in readings().into_iter().enumerate() {
        let seq = i as u64 + 1;
        out.push((
            ty.to_string(),
            json!({"id": format!("{ty}-{seq}"), "seq": seq, "ts": T0 + 30_000, "data": data}),
        ));
        out.push((
            format!("{ty}-named"),
            json!({"id": format!("{ty}-n{seq}"), "seq": seq + 10, "ts": "2025-11-24T16:00:30.250Z",
                "device": format!("dev-{}", i % 2), "type": ty, "data": data}),
        ));
    }
    out.push((
        "nested".into(),
        json!({"id": "x-1", "seq": 1, "ts": T0, "device": null, "type": null,
            "data": {"list": [1, -2.5, "ünï", true, null], "obj": {"a": {"b": [0]}}}}),
    ));
    out
}

fn cbor(v: &impl serde::Serialize) -> Vec<u8> {
    let mut buf = Vec::new();
    ciborium::ser::into_writer(v, &mut buf).expect("CBOR encodes");
    buf
}

/// `topic`, `limits` and `event_types` of a fixture config, device allow-lists dropped (the
/// target sends as `dev-0` and `dev-1`), as TOML text; and each event type on its own.
fn engine_configs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in CONFIGS {
        let text = std::fs::read_to_string(Path::new(REPO).join(path)).expect("fixture config");
        let mut table: toml::Table = toml::from_str(&text).expect("fixture config parses");
        table.retain(|k, _| ["topic", "limits", "event_types"].contains(&k));
        let Some(types) = table.get_mut("event_types").and_then(|t| t.as_table_mut()) else {
            continue;
        };
        for (_, spec) in types.iter_mut() {
            if let Some(t) = spec.as_table_mut() {
                t.remove("allowed_devices");
            }
        }
        let name = Path::new(path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let types = types.clone();
        out.push((name.clone(), toml::to_string(&table).unwrap()));
        for (ty, spec) in types {
            let one = toml::Table::from_iter([(
                "event_types".to_string(),
                toml::Value::Table(toml::Table::from_iter([(ty.clone(), spec)])),
            )]);
            out.push((format!("{name}-{ty}"), toml::to_string(&one).unwrap()));
        }
    }
    // The fixtures share their event types: keep each distinct config once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(_, text)| seen.insert(text.clone()));
    out
}

/// What the example engine makes of the readings: results (accepted) and DLQ entries.
fn outcomes() -> (Vec<EventResult>, Vec<DlqEntry>) {
    let text = std::fs::read_to_string(Path::new(REPO).join(CONFIGS[2])).unwrap();
    let spec: EngineSpec = toml::from_str(&text).unwrap();
    let engine = Engine::new(&spec).unwrap();
    let mut state = State::new();
    let (mut results, mut dlq) = (Vec::new(), Vec::new());
    let devices = BTreeMap::from([
        ("meter", "meter-1"),
        ("environment", "env-1"),
        ("gps", "truck-1"),
    ]);
    let bad = json!({"id": "meter-bad", "seq": 9, "ts": T0, "data": {"voltage_v": 900}});
    let payloads = readings()
        .into_iter()
        .map(|(ty, data)| {
            (
                ty,
                json!({"id": format!("{ty}-1"), "seq": 1, "ts": T0, "data": data}),
            )
        })
        .chain([("meter", bad)]);
    for (n, (ty, payload)) in payloads.enumerate() {
        let topic = format!("devices/{}/events/{ty}", devices[ty]);
        let payload = payload.to_string();
        let input = Input {
            topic: &topic,
            payload: payload.as_bytes(),
            received_at: T0 + 1_000,
            gateway: GW,
            via: proto::Via::Gateway,
            replay: false,
        };
        match engine.process(&mut state, &input) {
            Outcome::Accepted { mut result, .. } => {
                result.edge_seq = results.len() as u64 + 1;
                results.push(result);
            }
            Outcome::Rejected(r) => dlq.push(DlqEntry {
                id: n as u64,
                event_id: r.event_id,
                device: r.device,
                topic,
                stage: r.stage,
                reason: r.reason,
                subject: Some(r.subject),
                attempts: 1,
                first_seen: T0,
                last_seen: T0 + 5_000,
                payload: payload.into_bytes(),
            }),
            Outcome::Duplicate { .. } => unreachable!("every seed message is new"),
        }
    }
    assert!(
        !results.is_empty() && !dlq.is_empty(),
        "the seeds cover both outcomes"
    );
    (results, dlq)
}

fn status() -> GatewayStatus {
    serde_json::from_value(json!({"gateway": GW, "released": 5, "at": T0, "missed": [
        {"id": 2, "device": "meter-1", "first_seq": 3, "last_seq": 4, "count": 2,
         "ranges": [{"first": 3, "last": 4}], "declared_at": T0}]}))
    .expect("status fixture")
}

/// A device session as the embedded endpoint reads it: CONNECT, SUBSCRIBE, PUBLISHes, PINGREQ,
/// DISCONNECT, behind the target's packet-limit byte (255: 4 KiB).
fn mqtt_sessions() -> Vec<(String, Vec<u8>)> {
    let mut connect = Connect::new("meter-1");
    connect.set_login("meter-1", "s3cret");
    let mut session = BytesMut::new();
    connect.write(&mut session).unwrap();
    Subscribe::new("devices/meter-1/config", QoS::AtLeastOnce)
        .write(&mut session)
        .unwrap();
    for (i, (name, msg)) in messages().into_iter().take(3).enumerate() {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let mut p = Publish::new(
            format!("devices/meter-1/events/{name}"),
            qos,
            msg.to_string(),
        );
        p.pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            i as u16 + 1
        };
        p.write(&mut session).unwrap();
    }
    PingReq.write(&mut session).unwrap();
    Disconnect.write(&mut session).unwrap();
    let mut bare = BytesMut::new();
    Connect::new("").write(&mut bare).unwrap();
    vec![
        ("session".into(), [&[255u8][..], &session].concat()),
        (
            "session-small-limit".into(),
            [&[4u8][..], &session].concat(),
        ),
        ("connect-only".into(), [&[255u8][..], &bare].concat()),
    ]
}

fn seeds() -> BTreeMap<&'static str, Vec<(String, Vec<u8>)>> {
    let messages = messages();
    let (results, dlq) = outcomes();
    let batch = Batch {
        gateway: GW.into(),
        results: results.clone(),
    };
    let mut tracker = SeqTracker::default();
    for seq in [1, 2, 5, 9] {
        tracker.observe(seq, &format!("m-{seq}"), false);
    }
    let mut gaps = DeviceGaps::new(&SeqTracker::default());
    gaps.reconcile(&tracker, T0);
    let missed = MissedRecord::new(7, "meter-1", SeqRange::new(3, 4), T0, T0 + 60_000);
    let payloads = readings().into_iter().map(|(ty, data)| {
        json!({"id": format!("{ty}-1"), "seq": 1, "ts": T0 + 30_000, "data": data}).to_string()
    });
    let payloads: Vec<String> = payloads.collect();

    let mut s: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    s.insert(
        "device_json",
        messages
            .iter()
            .map(|(n, m)| (n.clone(), m.to_string().into_bytes()))
            .collect(),
    );
    let mut device_cbor: Vec<_> = messages.iter().map(|(n, m)| (n.clone(), cbor(m))).collect();
    device_cbor.push((
        "self-described".into(),
        [&[0xd9, 0xd9, 0xf7][..], &cbor(&messages[0].1)].concat(),
    ));
    s.insert("device_cbor", device_cbor);
    s.insert(
        "engine_config",
        engine_configs()
            .into_iter()
            .map(|(n, config)| {
                (
                    n,
                    [config.as_str(), &payloads.join("\0")]
                        .join("\0")
                        .into_bytes(),
                )
            })
            .collect(),
    );
    let mut store: Vec<(String, Vec<u8>)> = results
        .iter()
        .map(|r| (format!("result-{}", r.event_type), wire::encode(r)))
        .collect();
    store.extend(
        dlq.iter()
            .map(|e| (format!("dlq-{}", e.id), wire::encode(e))),
    );
    store.extend([
        ("batch".into(), wire::encode(&batch)),
        ("missed-record".into(), wire::encode(&missed)),
        ("device-gaps".into(), wire::encode(&gaps)),
        (
            "replay-request".into(),
            wire::encode(&ReplayRequest { from: 3, to: 9 }),
        ),
        ("status".into(), wire::encode(&status())),
    ]);
    s.insert("store_records", store);
    // Leading byte 3 selects "gw-1" as the topic's gateway, 2 selects "gw-".
    let json_status = serde_json::to_vec(&status()).unwrap();
    s.insert(
        "uplink_batch",
        vec![
            ("batch".into(), [&[3u8][..], &wire::encode(&batch)].concat()),
            (
                "batch-other-gateway".into(),
                [&[2u8][..], &wire::encode(&batch)].concat(),
            ),
            ("status".into(), [&[3u8][..], &json_status].concat()),
            (
                "status-other-gateway".into(),
                [&[2u8][..], &json_status].concat(),
            ),
        ],
    );
    s.insert("mqtt_packets", mqtt_sessions());
    s
}

#[test]
#[ignore = "writes fuzz/corpus/*/seed-*; run after a format change"]
fn write_fuzz_seeds() {
    for (target, seeds) in seeds() {
        let dir = Path::new(REPO).join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            let old = old.unwrap().path();
            if old
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                std::fs::remove_file(old).unwrap();
            }
        }
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}

/// Every seed is something its target's decoder accepts (a seed the decoder refuses would only
/// teach the fuzzer the error path).
#[test]
fn the_seeds_are_accepted_inputs() {
    let s = seeds();
    let limits = proto::Limits::default();
    for (_, bytes) in &s["device_json"] {
        proto::decode_message(bytes, &limits).unwrap();
    }
    for (_, bytes) in &s["device_cbor"] {
        proto::decode_message(bytes, &limits).unwrap();
    }
    for (_, bytes) in &s["uplink_batch"][..1] {
        proto::accept::batch("gateways/gw-1/results", &bytes[1..]).unwrap();
    }
    for (_, bytes) in &s["engine_config"] {
        let config = bytes.split(|&b| b == 0).next().unwrap();
        let spec: EngineSpec = toml::from_str(std::str::from_utf8(config).unwrap()).unwrap();
        Engine::new(&spec).unwrap();
    }
}
