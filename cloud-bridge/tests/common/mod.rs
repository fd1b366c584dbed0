//! Harness for the cloud-bridge tests: the local AWS emulator (moto, `AWS_ENDPOINT_URL`), a TLS
//! mosquitto with a CA and certificates generated at test time (`e2e::Pki`), the real
//! `cloud-bridge` binary, an MQTT test client and SDK clients to read the outcome back.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proto::{Batch, EventResult, Status};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::Value;
use tokio::sync::mpsc;

pub const BIN: &str = env!("CARGO_BIN_EXE_cloud-bridge");

/// `let Some(endpoint) = require_aws!() else { return };`
#[macro_export]
macro_rules! require_aws {
    () => {
        common::aws_endpoint()
    };
}

/// A port that was free a moment ago; see [`e2e::free_port`] for why only mosquitto's start
/// uses it, and with a retry.
pub use e2e::free_port;

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- certificates

/// The test CA (one implementation, shared with the end-to-end tests).
pub use e2e::Pki;

// ---------------------------------------------------------------- mosquitto

/// A TLS mosquitto on a free port that requires a client certificate from `client_ca`.
pub struct Broker {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Broker {
    pub fn start_tls(dir: &Path, server_pki: &Pki, client_ca: &Path) -> Broker {
        Self::start(dir, server_pki, client_ca, None)
    }

    /// As a cloud broker should run: the certificate's CN is the user name, and `acl`
    /// (mosquitto's `acl_file` format) says what each may publish and read.
    pub fn start_tls_acl(dir: &Path, server_pki: &Pki, client_ca: &Path, acl: &str) -> Broker {
        Self::start(dir, server_pki, client_ca, Some(acl))
    }

    /// mosquitto cannot listen on port 0 and report the port, so it gets a [`free_port`]; when
    /// another process takes that port first, mosquitto exits saying so and is started again on
    /// another one.
    fn start(dir: &Path, server_pki: &Pki, client_ca: &Path, acl: Option<&str>) -> Broker {
        let (cert, key) = server_pki.issue("broker", true);
        let mut taken = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.join(format!("mosquitto-{port}.conf"));
            let log = dir.join(format!("mosquitto-{port}.log"));
            let mut f = std::fs::File::create(&conf).unwrap();
            // `information` too: the "running" line the start waits for.
            writeln!(
                f,
                "listener {port} 127.0.0.1\n\
                 cafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n\
                 max_inflight_messages 0\nmax_queued_messages 1000000\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
                 log_type information",
                client_ca.display(),
                cert.display(),
                key.display()
            )
            .unwrap();
            if let Some(acl) = acl {
                let file = dir.join(format!("mosquitto-{port}.acl"));
                std::fs::write(&file, acl).unwrap();
                writeln!(f, "\nacl_file {}", file.display()).unwrap();
            }
            drop(f);
            match e2e::spawn_mosquitto(&conf, &log) {
                Ok(child) => return Broker { child, port, log },
                Err(text) => taken.push(text),
            }
        }
        panic!("mosquitto: no free port in 5 attempts: {taken:?}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- MQTT test client

/// A test MQTT client (a gateway's stand-in) over mutual TLS.
pub struct TestClient {
    pub client: AsyncClient,
    pub incoming: mpsc::UnboundedReceiver<rumqttc::Publish>,
    pub acked: Arc<AtomicUsize>,
    pub connected: Arc<AtomicUsize>,
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Tls<'a> {
    pub ca: &'a Path,
    pub cert: Option<(&'a Path, &'a Path)>,
}

impl TestClient {
    pub fn connect(id: &str, port: u16, tls: Tls<'_>) -> TestClient {
        cloud_bridge::service::install_tls_provider();
        let mut o = MqttOptions::new(id, "localhost", port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(16 << 20, 16 << 20);
        let client_auth = tls
            .cert
            .map(|(c, k)| (std::fs::read(c).unwrap(), std::fs::read(k).unwrap()));
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: std::fs::read(tls.ca).unwrap(),
            alpn: None,
            client_auth,
        }));
        let (client, mut el) = AsyncClient::new(o, 1024);
        let (tx, incoming) = mpsc::unbounded_channel();
        let acked = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, c, e) = (acked.clone(), connected.clone(), errors.clone());
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(err) => {
                        e.lock().unwrap().push(format!("{err:?}"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        TestClient {
            client,
            incoming,
            acked,
            connected,
            errors,
            task,
        }
    }

    pub async fn publish_batch(&self, batch: &Batch) {
        let topic = proto::uplink::results_topic(&batch.gateway);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, proto::wire::encode(batch))
            .await
            .unwrap();
    }

    pub async fn wait_acked(&self, n: usize) {
        let acked = self.acked.clone();
        wait_for_async("PUBACKs from the broker", Duration::from_secs(30), || {
            let ok = acked.load(Ordering::SeqCst) >= n;
            async move { ok }
        })
        .await;
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- results

pub fn result(gateway: &str, edge_seq: u64) -> EventResult {
    let mut input = serde_json::Map::new();
    input.insert("kwh".into(), Value::from(1000.0 + edge_seq as f64));
    let mut result = serde_json::Map::new();
    result.insert("consumption_kwh".into(), Value::from(0.25));
    EventResult {
        event_id: EventResult::event_id(
            &format!("meter-{}", edge_seq % 7),
            &format!("{gateway}-e{edge_seq}"),
        ),
        device: format!("meter-{}", edge_seq % 7),
        event_type: "meter".into(),
        seq: edge_seq,
        ts: 1_764_064_800_000 + edge_seq as i64 * 1000,
        gateway: gateway.into(),
        via: proto::Via::Gateway,
        edge_seq,
        input,
        result,
        calc_version: "sha256:test".into(),
        status: Status::Ok,
        flags: vec![],
        anomaly_score: 0.0,
        processed_at: 1_764_064_800_500 + edge_seq as i64 * 1000,
        correction: None,
    }
}

pub fn batch(gateway: &str, range: std::ops::RangeInclusive<u64>) -> Batch {
    Batch {
        gateway: gateway.into(),
        results: range.map(|s| result(gateway, s)).collect(),
    }
}

// ---------------------------------------------------------------- AWS

/// Names, SDK clients and read-back helpers (one implementation, shared with the end-to-end
/// tests). Each test file uses a part of it (as of the rest of this module: `dead_code`).
#[allow(unused_imports)]
pub use e2e::aws::{AwsNames, TestAws, aws_endpoint};

// ---------------------------------------------------------------- the bridge

/// Test defaults: short gap/replay timers, EMF every second.
pub fn bridge_config(
    endpoint: &str,
    names: &AwsNames,
    mqtt: Option<(u16, &Path, &Path, &Path)>,
    client_id: &str,
) -> String {
    let mqtt = match mqtt {
        Some((port, ca, cert, key)) => format!(
            "[mqtt]\nhost = \"localhost\"\nport = {port}\nclient_id = \"{client_id}\"\n\
             share_group = \"bridges\"\nkeep_alive_s = 10\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             reconnect_min_ms = 100\nreconnect_max_ms = 1000\nshutdown_grace_ms = 3000\n\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    format!(
        "{mqtt}[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nbucket = \"{}\"\n\
         event_bus = \"{}\"\ntable = \"{}\"\ndlq_queue = \"{}\"\n\n\
         [pipeline]\ngap_hold_ms = 500\ngap_recheck_ms = 50\nreplay_timeout_ms = 1500\n\
         replay_attempts = 2\nclaim_timeout_ms = 10000\n\n[metrics]\ninterval_s = 1\n",
        names.bucket, names.bus, names.table, names.dlq
    )
}

pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `cloud-bridge provision --json`.
pub fn provision(config: &Path) -> Value {
    e2e::aws::provision(Path::new(BIN), config, None)
}

/// A running `cloud-bridge run`; killed (SIGKILL) on drop.
pub struct Bridge {
    child: Option<Child>,
    pub log: PathBuf,
    pub stdout: PathBuf,
}

impl Bridge {
    pub fn start(config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Bridge {
        let stdout = log.with_extension("stdout");
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "info,cloud_bridge=debug")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        Bridge {
            child: Some(cmd.spawn().expect("start cloud-bridge")),
            log,
            stdout,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("'{needle}' in {}", self.log.display()),
            timeout,
            || self.log_text().contains(needle),
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "bridge did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill9();
    }
}
