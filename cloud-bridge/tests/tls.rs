//! Mutual TLS with the cloud broker: the bridge refuses a broker whose certificate its CA did
//! not sign, and the broker (configured as the tests and AWS IoT Core do) refuses clients
//! without a valid certificate. No AWS calls happen here, so these run without the emulator.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

fn names() -> AwsNames {
    AwsNames::unique("tls")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_refuses_a_broker_certificate_from_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = Pki::new(dir.path(), "trusted");
    let rogue = Pki::new(dir.path(), "rogue");
    // The broker's server certificate comes from the rogue CA; it accepts the trusted CA's
    // client certificates, so only the server check can fail.
    let broker = Broker::start_tls(dir.path(), &rogue, &trusted.ca);
    let (c, k) = trusted.issue("bridge-tls", false);
    let cfg = write_config(
        dir.path(),
        "bridge.toml",
        &bridge_config(
            "http://127.0.0.1:9",
            &names(),
            Some((broker.port, &trusted.ca, &c, &k)),
            "bridge-tls",
        ),
    );
    let mut bridge = Bridge::start(&cfg, dir.path().join("bridge.log"), &[]);
    bridge.wait_log("cannot connect to the broker", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    let log = bridge.log_text();
    assert!(
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate"),
        "the refusal names the certificate problem:\n{log}"
    );
    assert!(!log.contains("subscribed"), "{log}");
    assert!(bridge.is_running(), "it keeps retrying rather than exiting");

    // The same with a plain test client.
    let client = TestClient::connect(
        "probe",
        broker.port,
        Tls {
            ca: &trusted.ca,
            cert: Some((&c, &k)),
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.connected.load(Ordering::SeqCst), 0);
    assert!(!client.errors.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refuses_clients_without_a_valid_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let rogue = Pki::new(dir.path(), "rogue");
    let broker = Broker::start_tls(dir.path(), &pki, &pki.ca);

    let good = pki.issue("gw-good", false);
    let bad = rogue.issue("gw-bad", false);
    let no_cert = TestClient::connect(
        "no-cert",
        broker.port,
        Tls {
            ca: &pki.ca,
            cert: None,
        },
    );
    let wrong_ca = TestClient::connect(
        "wrong-ca",
        broker.port,
        Tls {
            ca: &pki.ca,
            cert: Some((&bad.0, &bad.1)),
        },
    );
    let valid = TestClient::connect(
        "valid",
        broker.port,
        Tls {
            ca: &pki.ca,
            cert: Some((&good.0, &good.1)),
        },
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        valid.connected.load(Ordering::SeqCst),
        1,
        "sanity: a valid client connects"
    );
    for (name, c) in [("no certificate", &no_cert), ("rogue CA", &wrong_ca)] {
        assert_eq!(c.connected.load(Ordering::SeqCst), 0, "{name}: connected");
        assert!(
            !c.errors.lock().unwrap().is_empty(),
            "{name}: no error seen"
        );
    }

    // And the bridge with a certificate from the wrong CA never gets its subscription.
    let cfg = write_config(
        dir.path(),
        "bridge.toml",
        &bridge_config(
            "http://127.0.0.1:9",
            &names(),
            Some((broker.port, &pki.ca, &bad.0, &bad.1)),
            "bridge-badcert",
        ),
    );
    let mut bridge = Bridge::start(&cfg, dir.path().join("bridge.log"), &[]);
    std::thread::sleep(Duration::from_secs(3));
    let log = bridge.log_text();
    assert!(!log.contains("subscribed"), "{log}");
    assert!(
        log.contains("cannot connect to the broker") || log.contains("lost the broker connection"),
        "{log}"
    );
    assert!(bridge.is_running());
}

#[test]
fn config_requires_tls_material_unless_tls_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "bad.toml",
        "[mqtt]\nhost = \"h\"\nclient_id = \"c\"\n[aws]\nbucket = \"b\"\nevent_bus = \"e\"\ntable = \"t\"\ndlq_queue = \"q\"\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.ca: required with TLS"), "{err}");

    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cloud-bridge.toml");
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
