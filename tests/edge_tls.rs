//! The embedded endpoint's TLS listener with a real client (`mosquitto_pub --cafile/--cert/
//! --key`): certificate auth (device id = CN, else the one SAN; a foreign CA is refused at the handshake; a
//! device publishes only as itself; a certificate on the CRL is refused), password over TLS,
//! either of the two, and the TLS files checked by `check-config` with the field named and no
//! secret shown.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::mosquitto_pub::{Client, publish};
use e2e::{Agent, Pki, http_get, meter, set, wait_for};

/// One metric's value for one `reason` label.
fn reason(agent: &Agent, name: &str, why: &str) -> f64 {
    let label = format!("reason=\"{why}\"");
    http_get(agent.metrics_port, "/metrics")
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until a refusal counter reaches `n` (the client may see the refusal before the
/// endpoint has counted it).
fn wait_reason(agent: &Agent, name: &str, why: &str, n: f64) {
    wait_for(
        &format!("{name}{{reason={why}}} = {n}"),
        Duration::from_secs(10),
        || reason(agent, name, why) >= n,
    );
    assert_eq!(reason(agent, name, why), n, "{name}{{reason={why}}}");
}

fn path(p: &Path) -> toml::Value {
    p.display().to_string().into()
}

/// An agent with `auth` and a TLS listener on port 0 (server certificate from `pki`,
/// `client_ca` = `pki`'s CA when `client_ca`); returns it and the TLS port it got.
fn agent_with_tls(
    dir: &Path,
    pki: &Pki,
    auth: &str,
    client_ca: bool,
    tweak: impl FnOnce(&mut toml::Table),
) -> (Agent, u16) {
    let agent = Agent::embedded(dir, |cfg| {
        set(cfg, &["broker", "embedded", "auth"], auth.into());
        let tls = ["broker", "embedded", "tls"];
        let at = |k: &'static str| [tls[0], tls[1], tls[2], k];
        set(cfg, &at("listen"), "127.0.0.1:0".into());
        set(cfg, &at("cert"), path(&pki.server_cert));
        set(cfg, &at("key"), path(&pki.server_key));
        if client_ca {
            set(cfg, &at("client_ca"), path(&pki.ca));
        }
        tweak(cfg);
    });
    let tls_port = agent.tls_port.expect("the TLS listener");
    (agent, tls_port)
}

/// The agent opened no plain TCP listener: its ready line reports none (`mqtt=`), and it
/// logged none. (Its `listen` is port 0, so there is no port to try a connection on.)
fn assert_no_plain_listener(agent: &Agent) {
    assert_eq!(agent.mqtt_port, 0, "a plain listener is reported");
    let log = agent.log_text();
    let ready = log.lines().filter(|l| l.contains("edge-agent ready"));
    assert!(ready.clone().count() > 0, "{log}");
    for line in ready {
        assert!(
            line.contains(" mqtt_tls=") && !line.contains(" mqtt="),
            "{line}"
        );
    }
    assert!(!log.contains("listening (plain TCP)"), "{log}");
}

fn device_add(agent: &Agent, id: &str, password: &str) {
    let out = agent.cli(&["device", "add", id, "--password", password]);
    assert!(
        out.status.success(),
        "device add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stored(agent: &Agent) -> Vec<(String, String)> {
    agent
        .outbox()
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap().to_string(),
                r["device"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

const TLS: &str = "ingest_tls_refused_total";
const AUTH: &str = "ingest_auth_refused_total";
const PUBLISH: &str = "ingest_publish_refused_total";

#[test]
fn certificate_auth_identifies_devices_by_cn_and_refuses_other_cas() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "devices");
    let foreign = Pki::new(dir.path(), "foreign");
    let (m1_cert, m1_key) = pki.issue("meter-1", false);
    let (f_cert, f_key) = foreign.issue("meter-1", false);
    let (mut agent, port) = agent_with_tls(dir.path(), &pki, "certificate", true, |_| {});
    let topic = |d: &str| format!("devices/{d}/events/meter");
    let as_m1 = Client {
        ca: Some(&pki.ca),
        cert: Some((&m1_cert, &m1_key)),
        login: None,
    };

    // The test CA's certificate for meter-1: accepted, stored as meter-1's.
    assert!(publish(port, as_m1, &topic("meter-1"), &meter("a", 1, 1.0)));

    // The same CN from another CA: refused at the handshake.
    let forged = Client {
        cert: Some((&f_cert, &f_key)),
        ..as_m1
    };
    assert!(!publish(
        port,
        forged,
        &topic("meter-1"),
        &meter("f", 2, 1.01)
    ));
    wait_reason(&agent, TLS, "unknown_issuer", 1.0);

    // No certificate at all: refused at the handshake too, with or without a password.
    let bare = Client {
        cert: None,
        ..as_m1
    };
    assert!(!publish(
        port,
        bare,
        &topic("meter-1"),
        &meter("n", 2, 1.01)
    ));
    let with_password = Client {
        login: Some(("meter-1", "any password at all")),
        ..bare
    };
    assert!(!publish(
        port,
        with_password,
        &topic("meter-1"),
        &meter("p", 2, 1.01)
    ));
    wait_reason(&agent, TLS, "no_certificate", 2.0);

    // meter-1's certificate publishing under meter-2's id: the connection closed, nothing
    // stored; claiming meter-2's user name: refused at CONNECT.
    assert!(!publish(
        port,
        as_m1,
        &topic("meter-2"),
        &meter("x", 1, 2.0)
    ));
    wait_reason(&agent, PUBLISH, "not_own_topic", 1.0);
    let claims_m2 = Client {
        login: Some(("meter-2", "")),
        ..as_m1
    };
    assert!(!publish(
        port,
        claims_m2,
        &topic("meter-2"),
        &meter("y", 1, 2.0)
    ));
    wait_reason(&agent, AUTH, "username_mismatch", 1.0);
    // A user name that is its own id is fine (password not looked at).
    let names_itself = Client {
        login: Some(("meter-1", "ignored")),
        ..as_m1
    };
    assert!(publish(
        port,
        names_itself,
        &topic("meter-1"),
        &meter("b", 2, 1.01)
    ));

    // A certificate without a CN is identified by its one SAN.
    let (san_cert, san_key) = pki.issue_san_only("meter-3");
    let as_m3 = Client {
        cert: Some((&san_cert, &san_key)),
        ..as_m1
    };
    assert!(publish(port, as_m3, &topic("meter-3"), &meter("s", 1, 3.0)));

    // Certificate auth has no plain listener.
    assert_no_plain_listener(&agent);

    assert!(agent.stop().success());
    assert_eq!(
        stored(&agent),
        [
            ("meter-1/a".to_string(), "meter-1".to_string()),
            ("meter-1/b".to_string(), "meter-1".to_string()),
            ("meter-3/s".to_string(), "meter-3".to_string())
        ]
    );
    let log = agent.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
    let key = std::fs::read_to_string(&pki.server_key).unwrap();
    let key_body = key.lines().nth(1).unwrap();
    assert!(!log.contains(key_body), "the server key in the log");
}

/// The running agent's `status --json`.
fn status(agent: &Agent) -> serde_json::Value {
    agent.cli_doc(&["status", "--json"])
}

/// `[broker.embedded.tls] crl`: a device certificate the CA revoked fails the handshake,
/// counted as `revoked` (metric and `status`), and nothing it sent is stored; the CA's other
/// certificates still connect.
#[test]
fn a_revoked_device_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "devices");
    let (m1_cert, m1_key) = pki.issue("meter-1", false);
    let (m2_cert, m2_key) = pki.issue("meter-2", false);
    let crl = pki.crl(&["meter-2"]);
    let (mut agent, port) = agent_with_tls(dir.path(), &pki, "certificate", true, |cfg| {
        set(cfg, &["broker", "embedded", "tls", "crl"], path(&crl));
    });
    let topic = |d: &str| format!("devices/{d}/events/meter");
    let as_m1 = Client {
        ca: Some(&pki.ca),
        cert: Some((&m1_cert, &m1_key)),
        login: None,
    };
    let as_m2 = Client {
        cert: Some((&m2_cert, &m2_key)),
        ..as_m1
    };

    assert!(publish(port, as_m1, &topic("meter-1"), &meter("a", 1, 1.0)));
    assert!(!publish(
        port,
        as_m2,
        &topic("meter-2"),
        &meter("r", 1, 2.0)
    ));
    wait_reason(&agent, TLS, "revoked", 1.0);
    // The refusal slows this address down, but does not lock meter-1 out.
    assert!(publish(
        port,
        as_m1,
        &topic("meter-1"),
        &meter("b", 2, 1.01)
    ));

    let s = status(&agent);
    assert_eq!(s["refused"]["tls"]["revoked"], 1, "{s}");
    let text = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(text.contains("TLS: revoked 1"), "{text}");

    assert!(agent.stop().success());
    assert_eq!(
        stored(&agent),
        [
            ("meter-1/a".to_string(), "meter-1".to_string()),
            ("meter-1/b".to_string(), "meter-1".to_string())
        ]
    );
    let log = agent.log_text();
    assert!(log.contains("reason=\"revoked\""), "{log}");
}

/// A CRL from another CA says nothing about the device CA's certificates: they are refused
/// (`revocation_unknown`) rather than let through unchecked.
#[test]
fn a_crl_of_another_ca_lets_no_device_certificate_through() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "devices");
    let other = Pki::new(dir.path(), "other");
    let (m1_cert, m1_key) = pki.issue("meter-1", false);
    let crl = other.crl(&[]);
    let (mut agent, port) = agent_with_tls(dir.path(), &pki, "certificate", true, |cfg| {
        set(cfg, &["broker", "embedded", "tls", "crl"], path(&crl));
    });
    let as_m1 = Client {
        ca: Some(&pki.ca),
        cert: Some((&m1_cert, &m1_key)),
        login: None,
    };
    let topic = "devices/meter-1/events/meter";
    assert!(!publish(port, as_m1, topic, &meter("a", 1, 1.0)));
    wait_reason(&agent, TLS, "revocation_unknown", 1.0);
    assert!(agent.stop().success());
    assert!(stored(&agent).is_empty());
}

#[test]
fn password_over_tls_and_no_plain_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "devices");
    let (mut agent, port) = agent_with_tls(dir.path(), &pki, "password", false, |_| {});
    let secret = "meter one's passphrase";
    device_add(&agent, "meter-1", secret);
    let topic = "devices/meter-1/events/meter";
    let tls = Client {
        ca: Some(&pki.ca),
        ..Client::default()
    };

    let good = Client {
        login: Some(("meter-1", secret)),
        ..tls
    };
    assert!(publish(port, good, topic, &meter("a", 1, 1.0)));
    let wrong = Client {
        login: Some(("meter-1", "not the passphrase")),
        ..tls
    };
    assert!(!publish(port, wrong, topic, &meter("w", 2, 1.01)));
    wait_reason(&agent, AUTH, "bad_password", 1.0);
    assert!(!publish(port, tls, topic, &meter("n", 2, 1.01)));
    wait_reason(&agent, AUTH, "no_credentials", 1.0);

    // TLS on means the clear-text port is off (`plain` unset).
    assert_no_plain_listener(&agent);
    let plain = Client {
        login: Some(("meter-1", secret)),
        ..Client::default()
    };
    // Plain MQTT to the TLS port is a failed handshake, counted.
    assert!(!publish(port, plain, topic, &meter("q", 2, 1.01)));
    wait_reason(&agent, TLS, "not_tls", 1.0);

    assert!(agent.stop().success());
    assert_eq!(
        stored(&agent),
        [("meter-1/a".to_string(), "meter-1".to_string())]
    );
    assert!(!agent.log_text().contains(secret), "a secret in the log");
}

#[test]
fn password_or_certificate_takes_either_and_the_plain_listener_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "devices");
    let foreign = Pki::new(dir.path(), "foreign");
    let (m1_cert, m1_key) = pki.issue("meter-1", false);
    let (f_cert, f_key) = foreign.issue("meter-2", false);
    let (mut agent, port) =
        agent_with_tls(dir.path(), &pki, "password_or_certificate", true, |cfg| {
            set(cfg, &["broker", "embedded", "plain"], true.into());
        });
    let secret = "meter two's passphrase";
    device_add(&agent, "meter-2", secret);
    let topic = |d: &str| format!("devices/{d}/events/meter");
    let tls = Client {
        ca: Some(&pki.ca),
        ..Client::default()
    };

    // A certificate identifies meter-1 (not in the registry).
    let m1 = Client {
        cert: Some((&m1_cert, &m1_key)),
        ..tls
    };
    assert!(publish(port, m1, &topic("meter-1"), &meter("a", 1, 1.0)));
    // No certificate: the registry password, over TLS and on the plain listener.
    let m2 = Client {
        login: Some(("meter-2", secret)),
        ..tls
    };
    assert!(publish(port, m2, &topic("meter-2"), &meter("b", 1, 2.0)));
    let m2_plain = Client { ca: None, ..m2 };
    assert!(publish(
        agent.mqtt_port,
        m2_plain,
        &topic("meter-2"),
        &meter("c", 2, 2.01)
    ));
    // Neither: refused at CONNECT.
    assert!(!publish(port, tls, &topic("meter-2"), &meter("n", 3, 2.02)));
    assert!(!publish(
        agent.mqtt_port,
        Client::default(),
        &topic("meter-2"),
        &meter("n", 3, 2.02)
    ));
    wait_reason(&agent, AUTH, "no_credentials", 2.0);
    // A certificate that does not verify is not a fallback to the password: the handshake fails.
    let forged = Client {
        cert: Some((&f_cert, &f_key)),
        ..m2
    };
    assert!(!publish(
        port,
        forged,
        &topic("meter-2"),
        &meter("f", 3, 2.02)
    ));
    wait_reason(&agent, TLS, "unknown_issuer", 1.0);
    // meter-1's certificate under meter-2's id.
    assert!(!publish(port, m1, &topic("meter-2"), &meter("x", 3, 2.02)));
    wait_reason(&agent, PUBLISH, "not_own_topic", 1.0);

    assert!(agent.stop().success());
    let mut got = stored(&agent);
    got.sort();
    let want: Vec<(String, String)> = [
        ("meter-1/a", "meter-1"),
        ("meter-2/b", "meter-2"),
        ("meter-2/c", "meter-2"),
    ]
    .iter()
    .map(|(e, d)| (e.to_string(), d.to_string()))
    .collect();
    assert_eq!(got, want);
}

/// `config/edge-agent-secure.toml` with its certificate paths pointed at `pki`'s files.
fn secure_config(
    dir: &Path,
    pki: &Pki,
    tweak: impl FnOnce(&mut toml::Table),
) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent-secure.toml"),
    )
    .unwrap();
    let mut cfg: toml::Table = text.parse().unwrap();
    set(&mut cfg, &["data_dir"], path(&dir.join("data")));
    set(
        &mut cfg,
        &["broker", "embedded", "tls", "cert"],
        path(&pki.server_cert),
    );
    set(
        &mut cfg,
        &["broker", "embedded", "tls", "key"],
        path(&pki.server_key),
    );
    tweak(&mut cfg);
    let file = dir.join("secure.toml");
    std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
    file
}

fn check_config(file: &Path) -> (i32, String) {
    let out = Command::new(e2e::agent_bin())
        .args(["check-config", "--config"])
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_config_names_the_bad_tls_field_and_never_shows_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "devices");
    let (_, other_key) = pki.issue("other", true);
    let key_text = std::fs::read_to_string(&pki.server_key).unwrap();

    let ok = secure_config(dir.path(), &pki, |_| {});
    let (code, text) = check_config(&ok);
    assert_eq!(code, 0, "{text}");

    type Tweak<'a> = Box<dyn FnOnce(&mut toml::Table) + 'a>;
    let cases: [(&str, Tweak); 4] = [
        (
            "broker.embedded.tls.key:",
            Box::new(|c| set(c, &["broker", "embedded", "tls", "key"], path(&other_key))),
        ),
        (
            "broker.embedded.tls.cert:",
            Box::new(|c| {
                set(
                    c,
                    &["broker", "embedded", "tls", "cert"],
                    "/nonexistent.pem".into(),
                )
            }),
        ),
        (
            "broker.embedded.tls.client_ca:",
            Box::new(|c| set(c, &["broker", "embedded", "auth"], "certificate".into())),
        ),
        (
            "broker.embedded.tls.key:",
            // A certificate where the key should be: no key in it.
            Box::new(|c| {
                set(
                    c,
                    &["broker", "embedded", "tls", "key"],
                    path(&dir.path().join("devices/ca.pem")),
                )
            }),
        ),
    ];
    for (field, tweak) in cases {
        let file = secure_config(dir.path(), &pki, tweak);
        let (code, text) = check_config(&file);
        assert_eq!(code, 2, "{field}: {text}");
        assert!(text.contains(field), "{field}: {text}");
        for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!text.contains(line), "key material in: {text}");
        }
    }

    // `auth = "certificate"` without any TLS section, at start-up too.
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["broker", "embedded", "auth"], "none".into());
    });
    assert!(agent.stop().success());
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let mut cfg: toml::Table = text.parse().unwrap();
    set(
        &mut cfg,
        &["broker", "embedded", "auth"],
        "certificate".into(),
    );
    std::fs::write(&agent.config, toml::to_string(&cfg).unwrap()).unwrap();
    let (status, log) = agent.start_refused();
    assert!(!status.success());
    assert!(log.contains("broker.embedded.tls:"), "{log}");
}
