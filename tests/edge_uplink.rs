//! The uplink against a real cloud broker (mosquitto with mutual TLS and certificates made at
//! test time): in-order drain, a cloud outage, replay requests, and refused certificates.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::{Agent, Mosquitto, Pki, Publisher, Subscriber, meter, mosquitto_pub, wait_for};
use proto::Batch;

const RESULTS: &str = "gateways/+/results";

/// The gateway's uplink at the test broker; the shortest keep-alive rumqttc's MQTT 5 client allows.
fn uplink_to(cfg: &mut toml::Table, broker: &Mosquitto, pki: &Pki, with_cert: bool) {
    e2e::uplink_to(cfg, "gw-test", broker, pki, with_cert, 5);
}

/// Publishes readings `seqs` of one meter through the agent's embedded endpoint.
fn publish(agent: &Agent, seqs: std::ops::RangeInclusive<u64>) {
    let messages = seqs
        .map(|seq| {
            let pkid = u16::try_from(seq).unwrap();
            (
                pkid,
                "devices/meter-1/events/meter".to_string(),
                meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.1),
            )
        })
        .collect();
    let mut p = Publisher::new(agent.mqtt_port, &format!("meter-{}", e2e::free_port()));
    p.publish_all(messages, 100, Duration::from_secs(60), |_| {});
}

/// Every batch received, decoded.
fn batches(sub: &Subscriber) -> Vec<Batch> {
    sub.received()
        .iter()
        .map(|(topic, payload)| {
            assert_eq!(topic, "gateways/gw-test/results");
            proto::wire::decode::<Batch>(payload).expect("a CBOR batch")
        })
        .collect()
}

/// The first arrival of each edge_seq is in ascending order and covers 1..=n.
fn assert_in_order_and_complete(batches: &[Batch], n: u64) {
    let mut seen = BTreeSet::new();
    let mut last_new = 0;
    for b in batches {
        assert_eq!(b.gateway, "gw-test");
        for r in &b.results {
            if seen.insert(r.edge_seq) {
                assert!(
                    r.edge_seq > last_new,
                    "edge_seq {} after {last_new}",
                    r.edge_seq
                );
                last_new = r.edge_seq;
            }
        }
    }
    assert_eq!(seen, (1..=n).collect::<BTreeSet<_>>());
}

fn drained(agent: &Agent) -> bool {
    agent.metric("edge_outbox_entries") == 0.0
}

#[test]
fn drains_the_outbox_in_order_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    let mut agent = Agent::embedded(dir.path(), |c| uplink_to(c, &broker, &pki, true));
    publish(&agent, 1..=400);
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        drained(&agent)
    });
    wait_for("the subscriber", Duration::from_secs(10), || {
        batches(&sub).iter().map(|b| b.results.len()).sum::<usize>() >= 400
    });
    let got = batches(&sub);
    assert_in_order_and_complete(&got, 400);
    assert!(
        got.iter().all(|b| b.results.len() <= 256),
        "bounded batches"
    );
    let r = &got[0].results[0];
    assert_eq!(r.event_id, "meter-1/r1");
    assert!(r.calc_version.starts_with("meter-"));
    assert_eq!(agent.metric("edge_uplink_connected"), 1.0);

    // The cloud asks for 3..=7 again: it arrives as one batch, from the replay window.
    mosquitto_pub(
        broker.port,
        "gateways/gw-test/replay",
        br#"{"from": 3, "to": 7}"#,
        1,
    );
    wait_for("the replay", Duration::from_secs(10), || {
        batches(&sub).len() > got.len()
    });
    let replay = batches(&sub).pop().unwrap();
    let seqs: Vec<u64> = replay.results.iter().map(|r| r.edge_seq).collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    assert!(agent.stop().success());
}

/// AWS IoT Core's `aws iot create-keys-and-certificate` writes the private key as PKCS#1 PEM
/// (`-----BEGIN RSA PRIVATE KEY-----`, RSA 2048) beside the certificate PEM: the uplink takes
/// those files as they are (README "Connect a gateway to AWS IoT Core").
#[test]
fn an_rsa_pkcs1_key_as_aws_iot_writes_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let pkcs8 = dir.path().join("gw-test.pkcs8.pem");
    let key = dir.path().join("gw-test.private.key");
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "RSA".as_ref(),
        "-pkeyopt".as_ref(),
        "rsa_keygen_bits:2048".as_ref(),
        "-out".as_ref(),
        pkcs8.as_os_str(),
    ]);
    openssl(&[
        "rsa".as_ref(),
        "-in".as_ref(),
        pkcs8.as_os_str(),
        "-traditional".as_ref(),
        "-out".as_ref(),
        key.as_os_str(),
    ]);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{pem}");
    let pair = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&pkcs8).unwrap()).unwrap();
    let cert = pki.issue_client_for_key("gw-test", &pair);

    let broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    let mut agent = Agent::embedded(dir.path(), |c| {
        uplink_to(c, &broker, &pki, false);
        e2e::set(c, &["uplink", "cert"], cert.display().to_string().into());
        e2e::set(c, &["uplink", "key"], key.display().to_string().into());
    });
    publish(&agent, 1..=20);
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        drained(&agent)
    });
    wait_for("the subscriber", Duration::from_secs(10), || {
        batches(&sub).iter().map(|b| b.results.len()).sum::<usize>() >= 20
    });
    assert_in_order_and_complete(&batches(&sub), 20);
    assert!(agent.stop().success());
}

#[test]
fn a_cloud_outage_leaves_a_backlog_that_drains_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let mut broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    let mut agent = Agent::embedded(dir.path(), |c| uplink_to(c, &broker, &pki, true));
    publish(&agent, 1..=200);
    wait_for("the first drain", Duration::from_secs(30), || {
        drained(&agent)
    });

    broker.stop();
    // The gateway keeps taking readings while the cloud is away.
    publish(&agent, 201..=600);
    // The gauge follows the commit a moment after the device's PUBACK: poll it.
    wait_for("a backlog of 400", Duration::from_secs(10), || {
        agent.metric("edge_outbox_entries") == 400.0
    });
    assert_eq!(agent.metric("edge_uplink_connected"), 0.0);
    // And survives its own restart meanwhile.
    assert!(agent.stop().success());
    agent.restart();

    broker.restart();
    wait_for("the backlog to drain", Duration::from_secs(60), || {
        drained(&agent)
    });
    wait_for("the subscriber", Duration::from_secs(20), || {
        batches(&sub)
            .iter()
            .flat_map(|b| &b.results)
            .map(|r| r.edge_seq)
            .collect::<BTreeSet<_>>()
            .len()
            == 600
    });
    assert_in_order_and_complete(&batches(&sub), 600);
    assert!(agent.metric("edge_uplink_reconnects_total") >= 0.0);
    assert!(agent.stop().success());
}

#[test]
fn a_broker_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let impostor = Pki::new(dir.path(), "impostor");
    let broker = Mosquitto::start_tls(dir.path(), &impostor);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    // The agent trusts `cloud`'s CA; the broker presents `impostor`'s certificate.
    let mut agent = Agent::embedded(dir.path(), |c| {
        uplink_to(c, &broker, &pki, true);
    });
    publish(&agent, 1..=5);
    wait_for("a refused handshake", Duration::from_secs(10), || {
        agent.log_text().contains("uplink disconnected")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.metric("edge_uplink_connected"), 0.0);
    assert_eq!(agent.metric("edge_outbox_entries"), 5.0, "nothing left");
    assert!(sub.received().is_empty());
    assert!(agent.stop().success());
}

#[test]
fn a_gateway_without_a_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    let mut agent = Agent::embedded(dir.path(), |c| uplink_to(c, &broker, &pki, false));
    publish(&agent, 1..=5);
    wait_for("a refused connection", Duration::from_secs(10), || {
        agent.log_text().contains("uplink disconnected")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.metric("edge_uplink_connected"), 0.0);
    assert_eq!(agent.metric("edge_outbox_entries"), 5.0);
    assert!(sub.received().is_empty());
    assert!(agent.stop().success());
}

/// The running agent's `status --json`.
fn status(agent: &Agent) -> serde_json::Value {
    agent.cli_doc(&["status", "--json"])
}

/// A gateway's certificate is its broker user; the ACL lets each write only its own topics
/// (the test's anonymous clients on the plain port read everything).
const OWN_TOPICS: &str = "topic readwrite #\n\n\
    pattern write gateways/%u/results\npattern write gateways/%u/status\n\
    pattern read gateways/%u/replay\n";

/// A gateway whose id (gw-7) is not its certificate's (gw-test): the broker's ACL refuses
/// every publish. On MQTT 3.1.1 mosquitto would PUBACK and drop them, and the outbox would
/// be released; on MQTT 5 the PUBACK says "not authorized" (0x87), so nothing is released,
/// the refusals are counted and shown, and once the ACL allows the topic every result
/// arrives, each once.
#[test]
fn results_the_broker_refuses_stay_in_the_outbox_until_it_takes_them() {
    let log = refused_until_the_acl_allows(|broker, acl| broker.set_acl(acl));
    assert!(
        !log.contains("uplink disconnected"),
        "a reload keeps the link"
    );
}

/// The same when the operator restarts the broker with the new ACL: the hold outlives the
/// connection, and the reconnected uplink sends everything, once.
#[test]
fn refused_results_are_delivered_once_after_a_broker_restart_with_the_new_acl() {
    let log = refused_until_the_acl_allows(|broker, acl| {
        broker.stop();
        broker.set_acl(acl);
        broker.restart();
    });
    assert!(log.contains("uplink disconnected"), "{log}");
}

/// 300 results refused by the ACL, then `allow(broker, acl)` installs an ACL that lets
/// gw-test's certificate speak for gw-7; returns the agent's log.
fn refused_until_the_acl_allows(allow: impl FnOnce(&mut Mosquitto, &str)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let mut broker = Mosquitto::start_tls_acl(dir.path(), &pki, OWN_TOPICS);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    let mut agent = Agent::embedded(dir.path(), |c| {
        e2e::uplink_to(c, "gw-7", &broker, &pki, true, 5);
    });
    publish(&agent, 1..=300);
    wait_for(
        "results held after refusals",
        Duration::from_secs(30),
        || {
            let s = status(&agent);
            s["uplink"]["last_refusal"]["topic"] == "gateways/gw-7/results"
                && s["uplink"]["state"]
                    .as_str()
                    .is_some_and(|t| t.contains("results held"))
        },
    );
    let s = status(&agent);
    assert_eq!(s["outbox"]["entries"], 300, "nothing released: {s}");
    assert!(s["uplink"]["refused"]["not_authorized"].as_u64().unwrap() >= 2);
    assert!(agent.metric("edge_uplink_refused_total") >= 2.0);
    let text = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        text.contains("cloud refused") && text.contains("not_authorized"),
        "{text}"
    );
    assert!(sub.received().is_empty());
    assert_eq!(
        agent
            .log_text()
            .matches("the cloud broker refused publishes")
            .count(),
        1,
        "logged once a minute, not per refusal"
    );

    // The cloud's operator lets gw-test's certificate speak for gw-7.
    allow(
        &mut broker,
        &format!(
            "{OWN_TOPICS}\nuser gw-test\ntopic write gateways/gw-7/#\ntopic read gateways/gw-7/replay\n"
        ),
    );
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        drained(&agent)
    });
    let seqs = || -> Vec<u64> {
        let mut seqs: Vec<u64> = sub
            .received()
            .iter()
            .map(|(topic, payload)| {
                assert_eq!(topic, "gateways/gw-7/results");
                proto::wire::decode::<Batch>(payload).expect("a CBOR batch")
            })
            .flat_map(|b| b.results.into_iter().map(|r| r.edge_seq))
            .collect();
        seqs.sort_unstable();
        seqs
    };
    wait_for("the subscriber", Duration::from_secs(10), || {
        seqs().len() >= 300
    });
    assert_eq!(seqs(), (1..=300).collect::<Vec<_>>(), "each result once");
    let s = status(&agent);
    assert!(
        !s["uplink"]["state"].as_str().unwrap().contains("held"),
        "{s}"
    );
    assert!(agent.stop().success());
    agent.log_text()
}

/// `protocol = "3.1.1"` still drains (and cannot see an ACL's refusal: see the README).
#[test]
fn mqtt_3_1_1_still_drains() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let broker = Mosquitto::start_tls(dir.path(), &pki);
    let sub = Subscriber::start(broker.port, "bridge-test", RESULTS);
    let mut agent = Agent::embedded(dir.path(), |c| {
        uplink_to(c, &broker, &pki, true);
        e2e::set(c, &["uplink", "protocol"], "3.1.1".into());
    });
    publish(&agent, 1..=50);
    wait_for("the outbox to drain", Duration::from_secs(30), || {
        drained(&agent)
    });
    wait_for("the subscriber", Duration::from_secs(10), || {
        batches(&sub).iter().map(|b| b.results.len()).sum::<usize>() >= 50
    });
    assert_in_order_and_complete(&batches(&sub), 50);
    assert!(agent.log_text().contains("protocol=\"3.1.1\""));
    assert!(agent.stop().success());
}

/// `SIGHUP` with new uplink settings (`edge-agent/src/reload.rs`): the uplink reconnects, and
/// what the agent stores from then on goes to the new broker, in order, none lost.
#[test]
fn a_reload_moves_the_uplink_to_another_broker() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cloud");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = Mosquitto::start_tls(&da, &pki);
    let b = Mosquitto::start_tls(&db, &pki);
    let (sub_a, sub_b) = (
        Subscriber::start(a.port, "bridge-a", RESULTS),
        Subscriber::start(b.port, "bridge-b", RESULTS),
    );
    let mut agent = Agent::embedded(dir.path(), |c| uplink_to(c, &a, &pki, true));
    publish(&agent, 1..=20);
    wait_for("broker a to get 1..=20", Duration::from_secs(30), || {
        batches(&sub_a)
            .iter()
            .map(|x| x.results.len())
            .sum::<usize>()
            >= 20
    });
    assert_in_order_and_complete(&batches(&sub_a), 20);

    let text = std::fs::read_to_string(&agent.config).unwrap();
    let (from, to) = (
        format!("port = {}", a.tls_port.unwrap()),
        format!("port = {}", b.tls_port.unwrap()),
    );
    assert_eq!(text.matches(&from).count(), 1, "{text}");
    std::fs::write(&agent.config, text.replace(&from, &to)).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for("the reload", Duration::from_secs(20), || {
        agent
            .log_text()
            .contains("uplink settings changed: reconnecting")
    });
    publish(&agent, 21..=40);
    let on_b = || -> BTreeSet<u64> {
        batches(&sub_b)
            .iter()
            .flat_map(|x| x.results.iter().map(|r| r.edge_seq))
            .collect()
    };
    wait_for("broker b to get 21..=40", Duration::from_secs(30), || {
        (21..=40).all(|s| on_b().contains(&s))
    });
    assert!(agent.stop().success());
}
