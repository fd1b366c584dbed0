//! Harness for the end-to-end tests: starts the real `edge-agent` binary (and a real
//! mosquitto where a test needs one) on free loopback ports in a temporary directory, and
//! reads the outcome back through the agent's own CLI.
//!
//! The agent binds port 0 and says which ports it got in its `edge-agent ready` line, so no
//! other process can take them between our choice and its bind; a restart keeps them. mosquitto
//! cannot report a port 0, so it gets a free port and its start is retried on another one when
//! that turns out to be taken. (moto, `src/moto.rs`, binds port 0 and says which it got.)
//!
//! `EDGE_AGENT_BIN` overrides the binary (e.g. an ARM build run under qemu-user).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod aws;
pub mod cli;
pub mod cutfs;
pub mod load;
pub mod mosquitto_pub;
pub mod moto;
pub mod pki;
pub mod proxy;
pub mod publisher;
pub mod subscriber;

pub use cli::Tmux;
pub use moto::Moto;
pub use pki::Pki;
pub use proxy::TcpProxy;
pub use publisher::Publisher;
pub use subscriber::Subscriber;

/// The workspace's example config, the base of every test config.
pub fn example_config() -> toml::Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
    let text = std::fs::read_to_string(&path).expect("config/edge-agent.toml");
    text.parse().expect("example config is TOML")
}

pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("edge-agent")
}

/// The `cloud-bridge` binary of this build (`CLOUD_BRIDGE_BIN` overrides it).
pub fn cloud_bridge_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CLOUD_BRIDGE_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("cloud-bridge")
}

/// The demo's binary, `edge-demo` (`EDGE_DEMO_BIN` overrides it).
pub fn demo_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGE_DEMO_BIN") {
        return PathBuf::from(p);
    }
    workspace_bin("edge-demo")
}

fn workspace_bin(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; `cargo test --workspace` builds the
    // binaries next to that folder.
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p {name}` (or the whole workspace's tests) first",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago (bind to 0, read, release): another process may take it
/// before whoever it is meant for binds it. Only for servers that cannot bind port 0 and report
/// the port they got (mosquitto: its `listener 0` is a Unix socket), and then with a retry of
/// the start when the port is taken ([`Mosquitto`]); the agent binds port 0 itself.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How often a start whose port was taken in the meantime is tried again, and the first pause
/// (doubling) between tries.
const BIND_ATTEMPTS: u32 = 5;
const BIND_BACKOFF: Duration = Duration::from_millis(100);

/// Whether a server's start-up output says a port was taken (EADDRINUSE).
fn addr_in_use(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("os error 98")
}

/// The value of field `name` in a tracing line: text (`name=value`) or JSON (`"name":"value"`).
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let text = format!("{name}=");
    let json = format!("\"{name}\":\"");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(text.as_str()))
        .or_else(|| {
            let at = line.find(&json)? + json.len();
            line[at..].split('"').next()
        })
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `edge-agent run`, with its config and data under `dir`.
///
/// Its listeners start on port 0: the ports it got come from its `edge-agent ready` line and
/// are then written into its config, so a restart (or a test that edits the config) keeps
/// them and publishers reconnect to the same port.
pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The embedded endpoint's plain listener (0 when it serves TLS only), or with an external
    /// broker that broker's port.
    pub mqtt_port: u16,
    /// The embedded endpoint's TLS listener, when it has one.
    pub tls_port: Option<u16>,
    pub metrics_port: u16,
    log: PathBuf,
    /// The log line that says the agent takes messages: with an external broker that is the
    /// subscription, since a fresh session gets nothing published before it.
    ready_line: &'static str,
    /// Extra environment for the process (e.g. a fault hook).
    env: Vec<(String, String)>,
    /// Where this start's lines begin in the log.
    log_offset: usize,
}

impl Agent {
    /// Embedded broker on a free port. `tweak` may change anything in the config.
    pub fn embedded(dir: &Path, tweak: impl FnOnce(&mut toml::Table)) -> Agent {
        Self::embedded_with_env(dir, &[], tweak)
    }

    /// [`Agent::embedded`] with extra environment variables for the process.
    pub fn embedded_with_env(
        dir: &Path,
        env: &[(&str, &str)],
        tweak: impl FnOnce(&mut toml::Table),
    ) -> Agent {
        // Port 0: the agent reports the port it got (`Agent::mqtt_port` after the start).
        Self::start(dir, 0, env, |cfg| {
            set(cfg, &["broker", "mode"], "embedded".into());
            set(cfg, &["broker", "embedded", "listen"], "127.0.0.1:0".into());
            tweak(cfg);
        })
    }

    /// A client of the external broker at `broker_port`.
    pub fn external(dir: &Path, broker_port: u16, tweak: impl FnOnce(&mut toml::Table)) -> Agent {
        Self::start(dir, broker_port, &[], |cfg| {
            set(cfg, &["broker", "mode"], "external".into());
            set(cfg, &["broker", "external", "host"], "127.0.0.1".into());
            set(
                cfg,
                &["broker", "external", "port"],
                i64::from(broker_port).into(),
            );
            set(
                cfg,
                &["broker", "external", "client_id"],
                "edge-agent-test".into(),
            );
            tweak(cfg);
        })
    }

    fn start(
        dir: &Path,
        mqtt_port: u16,
        env: &[(&str, &str)],
        tweak: impl FnOnce(&mut toml::Table),
    ) -> Agent {
        let mut cfg = example_config();
        set(
            &mut cfg,
            &["data_dir"],
            dir.join("data").display().to_string().into(),
        );
        set(&mut cfg, &["metrics", "listen"], "127.0.0.1:0".into());
        tweak(&mut cfg);
        let external = cfg["broker"]["mode"].as_str() == Some("external");
        let config = dir.join("edge-agent.toml");
        std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
        let mut agent = Agent {
            child: None,
            dir: dir.to_path_buf(),
            config,
            mqtt_port,
            tls_port: None,
            metrics_port: 0,
            log: dir.join("agent.log"),
            ready_line: if external {
                "subscribed"
            } else {
                "edge-agent ready"
            },
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_offset: 0,
        };
        agent.restart();
        agent
    }

    /// (Re)starts the process with the same config, data and ports, and waits until it is
    /// ready.
    ///
    /// A restart binds the ports of the first start again; if another process took one while
    /// the agent was down (unlikely, but a parallel run makes many ephemeral ports), the start
    /// is tried again a few times, with a short backoff, for that error only.
    pub fn restart(&mut self) {
        let mut pause = BIND_BACKOFF;
        for attempt in 1..=BIND_ATTEMPTS {
            self.spawn();
            let Err(status) = self.wait_ready() else {
                self.learn_ports();
                return;
            };
            let this_start = self.log_text()[self.log_offset..].to_string();
            if attempt == BIND_ATTEMPTS || !addr_in_use(&this_start) {
                panic!("edge-agent exited early ({status}):\n{}", self.log_text());
            }
            eprintln!(
                "edge-agent: a port is taken (attempt {attempt}), starting again: {this_start}"
            );
            std::thread::sleep(pause);
            pause *= 2;
        }
    }

    /// Waits for this start's ready lines; the exit status if the process ends first.
    fn wait_ready(&mut self) -> Result<(), ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(status);
            }
            let log = self.log_text();
            let this_start = &log[self.log_offset.min(log.len())..];
            // With an external broker `ready_line` is the subscription; the ports are on the
            // `edge-agent ready` line either way.
            if this_start.contains(self.ready_line) && this_start.contains("edge-agent ready") {
                return Ok(());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {}:\n{log}",
                self.ready_line
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads the bound ports from this start's `edge-agent ready` line and writes them into
    /// the config in place of port 0, so the next start binds them again.
    fn learn_ports(&mut self) {
        let log = self.log_text();
        let line = log[self.log_offset..]
            .lines()
            .find(|l| l.contains("edge-agent ready"))
            .expect("the ready line")
            .to_string();
        let port = |name: &str| {
            log_field(&line, name).map(|addr| {
                let port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                (
                    addr.to_string(),
                    port.unwrap_or_else(|| panic!("{name} in: {line}")),
                )
            })
        };
        let (plain, tls, metrics) = (port("mqtt"), port("mqtt_tls"), port("metrics"));
        let text = std::fs::read_to_string(&self.config).unwrap();
        let mut cfg: toml::Table = text.parse().unwrap();
        let embedded = cfg["broker"]["mode"].as_str() != Some("external");
        if embedded {
            self.mqtt_port = plain.as_ref().map_or(0, |p| p.1);
            self.tls_port = tls.as_ref().map(|p| p.1);
            if let Some((addr, _)) = &plain {
                set(
                    &mut cfg,
                    &["broker", "embedded", "listen"],
                    addr.as_str().into(),
                );
            }
            if let Some((addr, _)) = &tls {
                set(
                    &mut cfg,
                    &["broker", "embedded", "tls", "listen"],
                    addr.as_str().into(),
                );
            }
        }
        if let Some((addr, port)) = &metrics {
            self.metrics_port = *port;
            set(&mut cfg, &["metrics", "listen"], addr.as_str().into());
        }
        let pinned = toml::to_string(&cfg).unwrap();
        if pinned != text {
            std::fs::write(&self.config, pinned).unwrap();
        }
    }

    /// Starts the process expecting it to refuse to run; returns how it exited and what it
    /// logged on this start.
    pub fn start_refused(&mut self) -> (ExitStatus, String) {
        self.spawn();
        let status = self.exited(Duration::from_secs(30));
        (status, self.log_text()[self.log_offset..].to_string())
    }

    /// Waits for the process to end by itself.
    pub fn exited(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "edge-agent did not exit by itself:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let offset = log.metadata().unwrap().len() as usize;
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edge-agent");
        self.child = Some(child);
        self.log_offset = offset;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The process's resident set (VmRSS in /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// SIGTERM, then wait for the drain; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("edge-agent did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no flush, no goodbye.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// One metric's value from the Prometheus endpoint (sum over its label sets).
    pub fn metric(&self, name: &str) -> f64 {
        let body = http_get(self.metrics_port, "/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `edge-agent outbox list --json` (the agent must be stopped).
    pub fn outbox(&self) -> Vec<serde_json::Value> {
        self.cli_json(&["outbox", "list", "--json"])
    }

    /// `edge-agent dlq list --json` (the agent must be stopped).
    pub fn dlq(&self) -> Vec<serde_json::Value> {
        self.cli_json(&["dlq", "list", "--json"])
    }

    pub fn cli_json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "edge-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .expect("--json prints one JSON document")
            .as_array()
            .cloned()
            .expect("a JSON array")
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process's resident set (VmRSS in /proc/PID/status), in KiB.
/// 0 once the process has exited.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RSS every 20 ms on a thread of its own until dropped or `stop`ped: the
/// peak of a flood, which one reading after it could miss.
pub struct RssPeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPeak {
    pub fn start(pid: u32) -> RssPeak {
        use std::sync::atomic::Ordering;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(pid)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (peak, stop) = (peak.clone(), stop.clone());
            move || {
                // An exited process reads as 0, which leaves the peak as it was.
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        RssPeak {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The highest RSS seen, in KiB; stops sampling.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Bytes of every file under `dir` (what a store takes on disk).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Sets `path` in a TOML table, creating intermediate tables.
pub fn set(cfg: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().unwrap();
    let mut t = cfg;
    for p in parents {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .unwrap();
    }
    t.insert(last.to_string(), value);
}

/// Points an agent config's uplink at `broker`'s TLS port with `pki`'s CA, and its client
/// certificate if `with_cert`; short reconnects, `keep_alive_s` to notice a dead link.
pub fn uplink_to(
    cfg: &mut toml::Table,
    gateway: &str,
    broker: &Mosquitto,
    pki: &Pki,
    with_cert: bool,
    keep_alive_s: i64,
) {
    let path = |p: &Path| toml::Value::from(p.display().to_string());
    set(cfg, &["gateway_id"], gateway.into());
    set(cfg, &["uplink", "enabled"], true.into());
    set(cfg, &["uplink", "host"], "127.0.0.1".into());
    let port = broker.tls_port.expect("the broker listens with TLS");
    set(cfg, &["uplink", "port"], i64::from(port).into());
    set(cfg, &["uplink", "ca"], path(&pki.ca));
    if with_cert {
        set(cfg, &["uplink", "cert"], path(&pki.client_cert));
        set(cfg, &["uplink", "key"], path(&pki.client_key));
    }
    set(cfg, &["uplink", "keep_alive_s"], keep_alive_s.into());
    set(cfg, &["uplink", "reconnect_min_ms"], 100.into());
    set(cfg, &["uplink", "reconnect_max_ms"], 1000.into());
}

pub fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// `mosquitto_pub` one message; panics with its stderr if it fails.
pub fn mosquitto_pub(port: u16, topic: &str, payload: &[u8], qos: u8) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-q", &qos.to_string(), "-s"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub -t {topic} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real mosquitto broker on a free loopback port, for the agent's external-broker mode and
/// as the cloud broker of the uplink tests.
pub struct Mosquitto {
    child: Option<Child>,
    /// Plain MQTT, anonymous: for test clients.
    pub port: u16,
    /// Mutual TLS (a client certificate signed by the test CA is required), when started so.
    pub tls_port: Option<u16>,
    conf: PathBuf,
    log: PathBuf,
    /// The ACL file, when started with one.
    acl: Option<PathBuf>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Self::with_config(dir, None, None)
    }

    /// Adds a TLS listener that requires a client certificate signed by `pki`'s CA, and keeps
    /// sessions on disk across a restart (as a cloud broker does).
    pub fn start_tls(dir: &Path, pki: &pki::Pki) -> Mosquitto {
        Self::with_config(dir, Some(pki), None)
    }

    /// [`Mosquitto::start_tls`] as a cloud broker should run: a certificate's CN is its user
    /// name, and `acl` (mosquitto's `acl_file` format) says what each may publish and read.
    /// The anonymous clients of the plain port are users too: give them a `topic` line before
    /// the first `user` line.
    pub fn start_tls_acl(dir: &Path, pki: &pki::Pki, acl: &str) -> Mosquitto {
        Self::with_config(dir, Some(pki), Some(acl))
    }

    /// Replaces the ACL: a running broker reloads it (SIGHUP), a stopped one reads it when
    /// [`Mosquitto::restart`]ed.
    pub fn set_acl(&self, acl: &str) {
        let file = self.acl.as_ref().expect("started with an ACL");
        std::fs::write(file, acl).unwrap();
        if let Some(child) = &self.child {
            let hup = Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(hup.success());
        }
    }

    /// mosquitto cannot listen on port 0 and say which port it got (`listener 0` is a Unix
    /// socket), so its ports are [`free_port`]s: if one is taken before mosquitto binds it, it
    /// exits saying so, and it is started again on new ports.
    fn with_config(dir: &Path, pki: Option<&pki::Pki>, acl: Option<&str>) -> Mosquitto {
        for attempt in 1..=BIND_ATTEMPTS {
            let mut m = Self::configure(dir, pki, acl);
            match m.try_start() {
                Ok(()) => return m,
                Err(log) if attempt < BIND_ATTEMPTS => {
                    eprintln!("mosquitto: a port is taken (attempt {attempt}), new ports: {log}");
                }
                Err(log) => panic!("mosquitto: no free port in {BIND_ATTEMPTS} attempts: {log}"),
            }
        }
        unreachable!()
    }

    fn configure(dir: &Path, pki: Option<&pki::Pki>, acl: Option<&str>) -> Mosquitto {
        let port = free_port();
        // Started as root, mosquitto drops to the `mosquitto` user, which cannot write its
        // persistence file into our temporary directory (sessions would be lost on restart):
        // it stays the user we are (a no-op for anyone else). A large queue rather than 0
        // ("unlimited"): mosquitto 2.0 compares its queue with the limit after answering a
        // publish its ACL denies, and with 0 drops the connection instead.
        let user = Command::new("id").arg("-un").output().unwrap();
        let user = String::from_utf8(user.stdout).unwrap();
        let mut conf_text = format!(
            "per_listener_settings false\nallow_anonymous true\nmax_inflight_messages 0\n\
             max_queued_messages 1000000\nlog_dest stderr\nuser {}\nlistener {port} 127.0.0.1\n",
            user.trim()
        );
        let tls_port = pki.map(|pki| {
            let tls_port = free_port();
            conf_text += &format!(
                "persistence true\npersistence_location {}/\nlistener {tls_port} 127.0.0.1\n\
                 cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                dir.display(),
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            );
            tls_port
        });
        if pki.is_none() {
            conf_text += "persistence false\n";
        }
        let acl = acl.map(|text| {
            let file = dir.join("mosquitto.acl");
            std::fs::write(&file, text).unwrap();
            conf_text += &format!(
                "use_identity_as_username true\nacl_file {}\n",
                file.display()
            );
            file
        });
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, conf_text).unwrap();
        Mosquitto {
            child: None,
            port,
            tls_port,
            conf,
            log: dir.join("mosquitto.log"),
            acl,
        }
    }

    /// Starts it again on the same ports (after [`Mosquitto::stop`]). If another process took
    /// one meanwhile, tries again a few times with a short backoff (only for that error).
    pub fn restart(&mut self) {
        let mut pause = BIND_BACKOFF;
        for attempt in 1..=BIND_ATTEMPTS {
            match self.try_start() {
                Ok(()) => return,
                Err(log) if attempt < BIND_ATTEMPTS => {
                    eprintln!("mosquitto: a port is taken (attempt {attempt}), again: {log}");
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(log) => panic!("mosquitto: its ports stayed taken: {log}"),
            }
        }
    }

    /// One start; `Err(this start's log)` if a port was taken.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none());
        self.child = Some(spawn_mosquitto(&self.conf, &self.log)?);
        Ok(())
    }

    /// SIGTERM (mosquitto saves its sessions) and wait.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        child.wait().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts mosquitto with `conf`, its output appended to `log`, and waits until it says it is
/// running, i.e. every listener is open (so a connect cannot reach another process that holds
/// the port). `Err(this start's log)` when it exits because a port is taken; panics on any
/// other early exit. The config must log `information` (mosquitto's default without
/// `log_type`), which is where the "running" line is.
pub fn spawn_mosquitto(conf: &Path, log: &Path) -> Result<Child, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let offset = file.metadata().unwrap().len() as usize;
    let mut child = Command::new(mosquitto_binary())
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("mosquitto (Debian package mosquitto) must be installed");
    let this_start = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.get(offset..).unwrap_or_default().to_string()
    };
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = this_start();
            if addr_in_use(&text) {
                return Err(text);
            }
            panic!("mosquitto exited ({status}):\n{text}");
        }
        if this_start()
            .lines()
            .any(|l| l.contains("mosquitto version") && l.ends_with(" running"))
        {
            return Ok(child);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mosquitto did not start:\n{}", this_start());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` meter readings over `devices` devices (`meter-0`…), in per-device seq order, ids
/// `r{seq}`, packet ids 1..=n: the crash and power-cut tests' stream.
pub fn meter_stream(n: u64, devices: u64) -> Vec<(u16, String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let device = i % devices;
            let seq = i / devices + 1;
            let topic = format!("devices/meter-{device}/events/meter");
            let pkid = u16::try_from(i + 1).expect("fits a packet id");
            (
                pkid,
                topic,
                meter(&format!("r{seq}"), seq, 1000.0 + seq as f64 * 0.1),
            )
        })
        .collect()
}

/// Every reading of `meter_stream(n, devices)` exactly once in the (stopped) agent's outbox,
/// `edge_seq` 1..=n without a gap, and nothing in the DLQ.
pub fn assert_stream_stored_once(agent: &Agent, n: u64, devices: u64) {
    let outbox = agent.outbox();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for r in &outbox {
        *seen
            .entry(r["event_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let lost: Vec<String> = (0..n)
        .map(|i| format!("meter-{}/r{}", i % devices, i / devices + 1))
        .filter(|id| !seen.contains_key(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert_eq!(outbox.len() as u64, n);
    for (i, r) in outbox.iter().enumerate() {
        assert_eq!(r["edge_seq"].as_u64(), Some(i as u64 + 1), "edge_seq gap");
    }
    assert!(agent.dlq().is_empty(), "nothing here is invalid");
}

/// A meter reading as a device would send it.
pub fn meter(id: &str, seq: u64, kwh: f64) -> Vec<u8> {
    serde_json::json!({
        "id": id,
        "seq": seq,
        "ts": 1_764_000_000_000i64 + seq as i64 * 60_000,
        "data": { "energy_kwh": kwh, "voltage_v": 230.0, "current_a": 4.0 }
    })
    .to_string()
    .into_bytes()
}
