//! `edge-agent demo`: the whole pipeline on one machine, no cloud account.
//!
//! ```text
//! simulator (9 devices, rumqttc) ─MQTT─▶ agent (agent::run_with: embedded endpoint, pipeline,
//!   sled outbox/DLQ) ─uplink, MQTT plain TCP─▶ "cloud" broker (rumqttd, in-process, loopback)
//!   ─$share/…/results─▶ cloud-bridge (service::run_with) ─▶ local directory (S3 layout) or AWS
//! ```
//!
//! Everything binds to loopback on ports the OS picks, and keeps its files under one directory
//! (`--out`, or a new one under the temp dir), so a demo never collides with a running agent.
//! The agent is the real one (`agent::run_with`, the same wiring as `edge-agent run`); the
//! bridge is the real one (`cloud_bridge::service::run_with`) over the local backend
//! (`cloud_bridge::backend::Backend::local`), or over AWS/the emulator with `--cloud-config`.
//!
//! Stops after `--duration` or on Ctrl-C/SIGTERM, in order: the devices (their in-flight
//! messages acknowledged), the agent (ingest, pipeline, then the uplink sends what is pending),
//! the bridge (once it has stored everything uplinked). Then it prints the final summary,
//! writes it to `DIR/summary.json` and checks the counts against each other.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_bridge::backend::Backend;
use cloud_bridge::metrics::Metrics;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, Handles, Hooks};
use crate::config::AgentConfig;
use crate::ingest::Mode;
use crate::simulator::{self, DLQ_STAGES, SimConfig, SimStats};

/// The example configuration, embedded: its event types, rules and calculations.
const EXAMPLE_CONFIG: &str = include_str!("../../config/edge-agent.toml");

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Directory for everything the demo writes (agent store, cloud objects, log, summary).
    /// Default: a new directory under the system temp dir, kept after the demo.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// An agent config to use instead of the embedded config/edge-agent.toml (its event types
    /// and settings; the demo sets its own ports, data dir and uplink).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A cloud-bridge config: store into its S3 bucket, DynamoDB table and EventBridge bus
    /// (AWS or the emulator; `AWS_ENDPOINT_URL` wins) instead of the local directory. Its
    /// `[mqtt]` section is replaced by the demo's broker.
    #[arg(long, value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,
    /// Messages per second per simulated device.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
}

pub fn main(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-demo")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

/// A port the OS considers free on loopback now (for the servers that cannot report theirs).
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn init_logs(path: &Path) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rumqttd=warn,aws_smithy_runtime=warn,aws_config=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// The in-process cloud broker: rumqttd with one MQTT 3.1.1 listener on loopback, plain TCP.
fn start_cloud_broker(port: u16) -> anyhow::Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.cloud]
name = "cloud"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.cloud.connections]
connection_timeout_ms = 10000
max_payload_size = 4194304
max_inflight_count = 500
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = toml::from_str(&text).context("the cloud broker's config")?;
    std::thread::Builder::new()
        .name("cloud-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the cloud broker stopped");
            }
        })
        .context("starting the cloud broker")?;
    // Ready when it accepts connections.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("the cloud broker did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn agent_config(
    args: &DemoArgs,
    data_dir: PathBuf,
    cloud_port: u16,
) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &args.config {
        Some(p) => AgentConfig::load(p).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?,
        None => AgentConfig::parse(EXAMPLE_CONFIG)
            .map_err(|e| anyhow::anyhow!("the embedded example config: {e}"))?,
    };
    cfg.data_dir = data_dir;
    cfg.broker.mode = Mode::Embedded;
    cfg.broker.embedded.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    cfg.broker.embedded.username = None;
    cfg.broker.embedded.password = None;
    cfg.metrics.enabled = true;
    cfg.metrics.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    cfg.uplink = crate::uplink::UplinkConfig {
        enabled: true,
        host: "127.0.0.1".into(),
        port: cloud_port,
        client_id: None,
        tls: false,
        ca: None,
        cert: None,
        key: None,
        alpn: None,
        reconnect_min_ms: 200,
        ..cfg.uplink
    };
    cfg.uplink.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// The demo's bridge: local broker and backend (or `--cloud-config`), and it re-verifies
/// every result with the engine the agent runs.
fn bridge_config(
    args: &DemoArgs,
    cloud_port: u16,
    engine: &engine::EngineSpec,
) -> anyhow::Result<cloud_bridge::config::Config> {
    let local = cloud_bridge::config::Config::parse(&format!(
        r#"
[mqtt]
host = "127.0.0.1"
port = {cloud_port}
client_id = "demo-bridge"
tls = false
[aws]
bucket = "local"
event_bus = "local"
table = "local"
dlq_queue = "local"
[metrics]
emf = "off"
"#
    ))
    .map_err(anyhow::Error::msg)?;
    let mut c = match &args.cloud_config {
        None => local,
        Some(p) => {
            let mut c = cloud_bridge::config::Config::load(p)
                .map_err(|e| anyhow::anyhow!("--cloud-config: {e}"))?;
            c.mqtt = local.mqtt;
            c.metrics = local.metrics;
            c
        }
    };
    if c.verify.is_none() {
        c.verify = Some(cloud_bridge::config::VerifyConfig {
            engine_config: "(the agent's config)".into(),
            sample: 1.0,
            tolerance: 1e-9,
            max_devices: 100_000,
            spec: Some(engine.clone()),
        });
    }
    Ok(c)
}

/// Figures for a summary line, read from the parts as they run.
struct Parts<'a> {
    sim: &'a SimStats,
    agent: &'a Handles,
    bridge: &'a Metrics,
    /// The outbox's acknowledged mark at start (a re-used `--out` has history).
    acked_base: u64,
    /// Nothing was pending in the outbox at start: what reaches the cloud is this run's.
    fresh: bool,
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Parts<'_> {
    fn dlq_by_stage(&self) -> BTreeMap<String, u64> {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for e in self.agent.reader.dlq(0).flatten() {
            if e.first_seen >= self.agent.live.started_at {
                *by.entry(e.stage.as_str().to_string()).or_default() += 1;
            }
        }
        by
    }

    fn line(&self, elapsed: Duration) -> String {
        let live = &self.agent.live;
        let depth = self.agent.outbox.depth();
        let by = self.dlq_by_stage();
        let dlq: u64 = by.values().sum();
        let stages = by
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[{:>4}s] devices {} | published {} | accepted {} | DLQ {dlq}{} | dup {} | gaps {} | outbox {} | uplinked {} | cloud {} stored, {} objects",
            elapsed.as_secs(),
            load(&self.sim.connected),
            load(&self.sim.acked),
            load(&live.accepted),
            if stages.is_empty() {
                String::new()
            } else {
                format!(" ({stages})")
            },
            load(&live.duplicates),
            load(&live.gaps),
            depth.entries,
            depth.acked_through.saturating_sub(self.acked_base),
            load(&self.bridge.processed),
            load(&self.bridge.s3_objects),
        )
    }
}

/// Sends one message that is not a batch to the cloud broker, as a broken gateway would: the
/// bridge dead-letters it under `failures/` (the cloud side's DLQ).
async fn inject_bad_uplink(port: u16, gateway: &str) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let opts = MqttOptions::new("demo-broken-gateway", "127.0.0.1", port);
    let (client, mut el) = AsyncClient::new(opts, 8);
    client
        .publish(
            proto::uplink::results_topic(gateway),
            QoS::AtLeastOnce,
            false,
            b"\xff this is not a CBOR batch".to_vec(),
        )
        .await?;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Incoming::PubAck(_)) = el.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await
    .context("no PUBACK from the cloud broker")??;
    let _ = client.disconnect().await;
    Ok(())
}

/// Marks a directory as the demo's, so a later demo may replace what it wrote there.
const MARKER: &str = ".edge-agent-demo";
/// Everything a demo writes in its directory.
const WRITES: [&str; 8] = [
    "agent",
    "events",
    "failures",
    "eventbridge",
    "state",
    "summary.json",
    "demo.log",
    MARKER,
];

/// Creates `--out`; a previous demo's files there are removed (a demo starts with new devices
/// and a new gateway state), anything else there makes the demo refuse.
fn prepare_out(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut entries = std::fs::read_dir(dir)?.peekable();
    if entries.peek().is_some() {
        if !dir.join(MARKER).exists() {
            bail!(
                "--out {}: the directory is not empty and not a previous demo's; choose a new or empty one",
                dir.display()
            );
        }
        for name in WRITES {
            let p = dir.join(name);
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p).or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
            }
            .with_context(|| format!("removing the previous demo's {}", p.display()))?;
        }
    }
    std::fs::write(
        dir.join(MARKER),
        "written by `edge-agent demo`; the next demo replaces this directory's demo files\n",
    )?;
    Ok(())
}

/// The records of the NDJSON objects `keys` under `root`: (records, distinct event ids).
fn count_records(root: &Path, keys: &[String]) -> anyhow::Result<(u64, u64)> {
    let mut ids = HashSet::new();
    let mut records = 0;
    for k in keys {
        let text = std::fs::read_to_string(root.join(k))?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            records += 1;
            ids.insert(v["event_id"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok((records, ids.len() as u64))
}

async fn stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "Ctrl-C",
    })
}

async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let out = match &args.out {
        Some(d) => {
            prepare_out(d)?;
            d.clone()
        }
        None => {
            let d = tempfile::Builder::new()
                .prefix("edge-agent-demo-")
                .tempdir()
                .context("creating a directory for the demo")?
                .keep();
            prepare_out(&d)?;
            d
        }
    };
    let out = out.canonicalize()?;
    init_logs(&out.join("demo.log"))?;

    let cloud_port = free_port()?;
    let mut cfg = agent_config(&args, out.join("agent"), cloud_port)?;
    if args.cloud_config.is_some() {
        // The cloud keeps its per-gateway state across demos; each demo's agent starts a new
        // edge_seq series, so it is a new gateway there.
        cfg.gateway_id = format!("{}-demo-{}", cfg.gateway_id, crate::ingest::now_ms() / 1000);
    }
    let gateway = cfg.gateway_id.clone();
    let metrics_url = format!("http://{}/metrics", cfg.metrics.listen);
    let bcfg = Arc::new(bridge_config(&args, cloud_port, &cfg.engine)?);

    start_cloud_broker(cloud_port)?;

    // The bridge's backend: the local directory, or AWS/the emulator.
    let bridge_metrics = Arc::new(Metrics::default());
    let backend = match &args.cloud_config {
        None => Backend::local(&out, &bcfg)?,
        Some(_) => {
            let aws = cloud_bridge::aws::Aws::connect(&bcfg.aws).await;
            cloud_bridge::provision::provision(&bcfg, &aws)
                .await
                .context("provisioning the cloud resources")?;
            Backend::aws(aws, &bcfg, &bridge_metrics)
        }
    };
    let local = args.cloud_config.is_none();
    let events_before: HashSet<String> =
        backend.objects.list("events/").await?.into_iter().collect();
    let bridge_stop = CancellationToken::new();
    let bridge = tokio::spawn(cloud_bridge::service::run_with(
        Arc::clone(&bcfg),
        backend.clone(),
        Arc::clone(&bridge_metrics),
        bridge_stop.clone(),
    ));

    // A broken gateway's message first, and dead-lettered before the agent's results flow:
    // rumqttd drops a subscriber that acknowledges out of order, and the bridge stores dead
    // letters on a task of their own.
    // Sent again until the bridge has it: the broker drops it while the bridge is not yet
    // subscribed. Its failures/ key is a hash of the message, so a second copy is the same
    // object.
    for _ in 0..20 {
        if let Err(e) = inject_bad_uplink(cloud_port, &gateway).await {
            tracing::warn!(error = %format!("{e:#}"), "could not inject the broken uplink message");
            break;
        }
        let until = Instant::now() + Duration::from_millis(500);
        while load(&bridge_metrics.acked_messages) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if load(&bridge_metrics.acked_messages) > 0 {
            break;
        }
    }

    let agent_stop = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut agent = tokio::spawn(agent::run_with(
        cfg,
        Hooks {
            stop: Some(agent_stop.clone()),
            ready: Some(ready_tx),
            uplink_drain: Some(Duration::from_secs(15)),
        },
    ));
    let handles = tokio::select! {
        h = ready_rx => match h {
            Ok(h) => h,
            Err(_) => {
                agent.await??;
                bail!("the agent stopped before it was ready");
            }
        },
        r = &mut agent => {
            r??;
            bail!("the agent stopped before it was ready");
        }
    };
    let endpoint = handles
        .ingest_addr
        .context("the demo needs the embedded endpoint")?;
    let start_depth = handles.outbox.depth();

    let data_dir = out.join("agent");
    println!(
        "edge-agent demo: simulated devices → agent '{gateway}' → cloud broker → cloud-bridge"
    );
    println!("  device endpoint  mqtt://{endpoint}  (the agent's embedded MQTT endpoint)");
    println!(
        "  agent store      {}  (`edge-agent status --data-dir {}`)",
        data_dir.display(),
        data_dir.display()
    );
    println!("  agent metrics    {metrics_url}");
    println!("  cloud broker     mqtt://127.0.0.1:{cloud_port}  (rumqttd in-process, plain TCP)");
    if local {
        println!(
            "  cloud storage    {0}/events/ (results), {0}/failures/ (cloud DLQ), {0}/eventbridge/ (events)",
            out.display()
        );
    } else {
        println!(
            "  cloud storage    {} (+ DynamoDB table {}, EventBridge bus {})",
            backend.objects.location(),
            bcfg.aws.table,
            bcfg.aws.event_bus
        );
    }
    println!("  log              {}", out.join("demo.log").display());
    match args.duration {
        Some(d) => println!("running for {d} s (Ctrl-C stops earlier)"),
        None => println!("running until Ctrl-C"),
    }
    let _ = std::io::stdout().flush();

    let sim_stats = Arc::new(SimStats::default());
    let sim_stop = CancellationToken::new();
    let sim = tokio::spawn(simulator::run(
        SimConfig {
            rate: args.rate,
            ..SimConfig::new(endpoint)
        },
        Arc::clone(&sim_stats),
        sim_stop.clone(),
    ));

    let parts = Parts {
        sim: &sim_stats,
        agent: &handles,
        bridge: &bridge_metrics,
        acked_base: start_depth.acked_through,
        fresh: start_depth.entries == 0,
    };
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|d| tokio::time::Instant::now() + Duration::from_secs(d));
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    let signal = stop_signal();
    tokio::pin!(signal);
    let stopped_by = loop {
        tokio::select! {
            _ = tick.tick() => {
                println!("{}", parts.line(started.elapsed()));
                let _ = std::io::stdout().flush();
            }
            s = &mut signal => break s?,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break "duration",
            r = &mut agent => {
                r??;
                bail!("the agent stopped unexpectedly (see {})", out.join("demo.log").display());
            }
        }
    };
    let ran = started.elapsed();
    println!(
        "stopping ({stopped_by}): devices, then the agent (the uplink drains), then the bridge…"
    );
    let _ = std::io::stdout().flush();

    sim_stop.cancel();
    sim.await?;
    agent_stop.cancel();
    agent.await?.context("the agent")?;
    // The bridge stops once it has stored everything the agent committed (or after a while).
    let head = handles.outbox.depth().head;
    let wait_until = Instant::now() + Duration::from_secs(15);
    let mut hwm = backend.state.read(&gateway).await?.hwm;
    while hwm < head && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        hwm = backend.state.read(&gateway).await?.hwm;
    }
    // The broken uplink message is dead-lettered on its own task; give it a moment.
    let wait_until = Instant::now() + Duration::from_secs(5);
    while load(&bridge_metrics.decode_errors) > 0
        && backend.objects.list("failures/").await?.is_empty()
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bridge_stop.cancel();
    bridge.await?.context("the cloud bridge")?;

    finish(
        &parts,
        &backend,
        &out,
        local,
        &events_before,
        head,
        hwm,
        ran,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    parts: &Parts<'_>,
    backend: &Backend,
    out: &Path,
    local: bool,
    events_before: &HashSet<String>,
    head: u64,
    hwm: u64,
    ran: Duration,
) -> anyhow::Result<()> {
    let sim = parts.sim;
    let live = &parts.agent.live;
    let depth = parts.agent.outbox.depth();
    let by = parts.dlq_by_stage();
    let dlq: u64 = by.values().sum();
    let (published, accepted, dups, gaps) = (
        load(&sim.acked),
        load(&live.accepted),
        load(&live.duplicates),
        load(&live.gaps),
    );
    let expect: BTreeMap<String, u64> = DLQ_STAGES
        .iter()
        .zip(&sim.expect_dlq)
        .map(|(s, c)| (s.to_string(), load(c)))
        .filter(|(_, c)| *c > 0)
        .collect();
    let uplinked = depth.acked_through.saturating_sub(parts.acked_base);
    let b = parts.bridge;
    let new_objects: Vec<String> = backend
        .objects
        .list("events/")
        .await?
        .into_iter()
        .filter(|k| !events_before.contains(k))
        .collect();
    let failures = backend.objects.list("failures/").await?.len() as u64;
    let (records, distinct) = if local {
        count_records(out, &new_objects)?
    } else {
        (load(&b.processed), load(&b.processed))
    };
    let stages = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let mut problems = Vec::new();
    if published != accepted + dlq + dups {
        problems.push(format!(
            "published {published} ≠ accepted {accepted} + DLQ {dlq} + duplicates {dups}"
        ));
    }
    if by != expect {
        problems.push(format!(
            "DLQ by stage ({}) ≠ what the devices got wrong ({})",
            stages(&by),
            stages(&expect)
        ));
    }
    if load(&sim.duplicates) != dups {
        problems.push(format!(
            "duplicates: {dups} recognised, {} re-sent",
            load(&sim.duplicates)
        ));
    }
    let drained = depth.entries == 0 && hwm >= head;
    if drained && parts.fresh && (records != accepted || distinct != records) {
        problems.push(format!(
            "cloud: {records} records ({distinct} distinct event ids) for {accepted} accepted results"
        ));
    }

    println!("── final summary ({:.1} s) ──", ran.as_secs_f64());
    println!(
        "  devices  {} simulated, {published} messages published and acknowledged",
        simulator::DEVICES.len()
    );
    println!(
        "           injected: {} invalid, {} spikes, {} re-sent (duplicates), {} skipped seq (gaps), {} sent late",
        sim.expected_dlq() - load(&sim.expect_dlq[3]),
        load(&sim.spikes),
        load(&sim.duplicates),
        load(&sim.gaps),
        load(&sim.late),
    );
    println!(
        "  agent    {accepted} accepted, {dlq} dead-lettered ({}), {dups} duplicates, {gaps} gaps ({} events missing)",
        stages(&by),
        load(&live.missed),
    );
    println!(
        "           {} late arrivals: the results they made stale are corrected here while still in the same batch ({}), else by the cloud",
        load(&live.late),
        load(&live.corrected),
    );
    println!(
        "  uplink   {uplinked} results acknowledged by the cloud broker, {} pending in the outbox",
        depth.entries
    );
    println!(
        "  cloud    {records} results stored once each in {} objects, {failures} under failures/ (cloud DLQ)",
        new_objects.len(),
    );
    println!(
        "           re-verified {} ({} not verifiable), {} incorrect, {} corrected; {} anomalies stored",
        load(&b.verified),
        load(&b.unverified),
        load(&b.incorrect),
        load(&b.corrected),
        load(&b.anomalies),
    );
    if local {
        println!(
            "           {0}/events/dt=…/gateway=…/*.ndjson, events in {0}/eventbridge/",
            out.display()
        );
    }
    let verdict = if !drained {
        format!(
            "not fully drained (outbox {} pending, cloud at edge_seq {hwm} of {head})",
            depth.entries
        )
    } else if problems.is_empty() {
        "every message accounted for; each accepted result stored once in the cloud".to_string()
    } else {
        format!("MISMATCH: {}", problems.join("; "))
    };
    println!("  check    {verdict}");

    let summary = json!({
        "seconds": ran.as_secs_f64(),
        "devices": simulator::DEVICES.len(),
        "published": published,
        "injected": {
            "valid": load(&sim.valid),
            "expected_dlq": expect,
            "spikes": load(&sim.spikes),
            "duplicates": load(&sim.duplicates),
            "gaps": load(&sim.gaps),
            "late": load(&sim.late),
        },
        "agent": {
            "accepted": accepted,
            "dlq": dlq,
            "dlq_by_stage": by,
            "duplicates": dups,
            "gaps": gaps,
            "missed": load(&live.missed),
            "late": load(&live.late),
            "corrected": load(&live.corrected),
            "outbox_pending": depth.entries,
            "uplinked": uplinked,
        },
        "cloud": {
            "stored": load(&b.processed),
            "objects": load(&b.s3_objects),
            "new_objects": new_objects,
            "records": records,
            "distinct_event_ids": distinct,
            "failures": failures,
            "decode_errors": load(&b.decode_errors),
            "verified": load(&b.verified),
            "unverified": load(&b.unverified),
            "incorrect": load(&b.incorrect),
            "corrected": load(&b.corrected),
            "anomalies": load(&b.anomalies),
            "hwm": hwm,
        },
        "drained": drained,
        "problems": problems,
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!("  summary  {}", out.join("summary.json").display());
    if drained && !problems.is_empty() {
        bail!("the demo's counts do not add up: {}", problems.join("; "));
    }
    Ok(())
}
