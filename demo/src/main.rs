//! `edge-demo`: the whole pipeline on one machine, no cloud account (`cargo run -p demo`, or
//! `edge-agent demo`, which runs this binary).
//!
//! It sits above both tiers: it depends on `edge-agent` and `cloud-bridge`, neither depends on
//! it, so the gateway build carries none of the cloud tier.
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

use std::collections::HashSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_bridge::metrics::{self, Metrics};
use tokio_util::sync::CancellationToken;

use edge_agent::agent::{self, Hooks};
use edge_agent::config::AgentConfig;
use edge_agent::ingest::Mode;

mod cloud;
mod out;
mod phone;
mod simulator;
mod summary;

use cloud::{bridge_config, inject_bad_uplink, start_cloud_broker};
use out::prepare_out;
use simulator::{SimConfig, SimStats};
use summary::{Parts, finish};

/// The example configuration, embedded: its event types, rules and calculations.
const EXAMPLE_CONFIG: &str = include_str!("../../config/edge-agent.toml");

#[derive(Debug, clap::Parser)]
#[command(
    name = "edge-demo",
    version,
    about = "The whole pipeline on this machine, no cloud account: simulated devices → edge-agent → an in-process cloud broker → cloud-bridge → a local directory with S3's layout"
)]
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

fn main() -> std::process::ExitCode {
    let args = <DemoArgs as clap::Parser>::parse();
    match start(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-demo")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
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
    // Port 0: the agent binds a free port and reports it (`Handles::metrics_addr`).
    cfg.metrics.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    cfg.uplink = edge_agent::uplink::UplinkConfig {
        enabled: true,
        host: "127.0.0.1".into(),
        port: cloud_port,
        // The in-process rumqttd listens with MQTT 3.1.1 only (its MQTT 5 is incomplete).
        protocol: edge_agent::uplink::Protocol::V311,
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

    let cloud_port = start_cloud_broker()?;
    let mut cfg = agent_config(&args, out.join("agent"), cloud_port)?;
    if args.cloud_config.is_some() {
        // The cloud keeps its per-gateway state across demos; each demo's agent starts a new
        // edge_seq series, so it is a new gateway there.
        cfg.gateway_id = format!("{}-demo-{}", cfg.gateway_id, simulator::now_ms() / 1000);
    }
    let gateway = cfg.gateway_id.clone();
    // The phone app's API key: only its hash is in the bridge's key file.
    let (phone_key, key_line) = cloud_bridge::ingest::auth::new_key(phone::DEVICE)?;
    let api_keys = out.join("phone-api-keys");
    std::fs::write(&api_keys, format!("{key_line}\n")).context("writing the phone's API key")?;
    // Bound here, before the bridge starts, so the phone app knows the port.
    let http = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding the bridge's HTTP listener")?;
    let http_port = http.local_addr()?.port();
    let bcfg = Arc::new(bridge_config(
        &args,
        cloud_port,
        &cfg.engine,
        http_port,
        &api_keys,
    )?);

    // The bridge's backend: the local directory, or AWS/the emulator.
    let bridge_metrics = Arc::new(Metrics::default());
    let backend = match &args.cloud_config {
        None => cloud_bridge::backend::local::backend(&out, &bcfg)?,
        Some(_) => {
            let aws = cloud_bridge::backend::aws::Aws::connect(&bcfg.aws).await;
            cloud_bridge::provision::provision(&bcfg, &aws)
                .await
                .context("provisioning the cloud resources")?;
            cloud_bridge::backend::aws::backend(aws, &bcfg, &bridge_metrics)
        }
    };
    let local = args.cloud_config.is_none();
    let events_before: HashSet<String> =
        backend.objects.list("events/").await?.into_iter().collect();
    let bridge_stop = CancellationToken::new();
    let bridge = tokio::spawn(cloud_bridge::service::run_on(
        Arc::clone(&bcfg),
        backend.clone(),
        Arc::clone(&bridge_metrics),
        bridge_stop.clone(),
        Some(http),
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
        while bridge_metrics.get(metrics::ACKED_MESSAGES) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if bridge_metrics.get(metrics::ACKED_MESSAGES) > 0 {
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
            config_path: None,
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
    let metrics_url = match handles.metrics_addr {
        Some(addr) => format!("http://{addr}/metrics"),
        None => "off".into(),
    };
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
    println!(
        "  phone app        http://127.0.0.1:{http_port}/v1/devices/{}/events/meter  (no gateway: straight to the bridge)",
        phone::DEVICE
    );
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

    let phone_stats = Arc::new(phone::PhoneStats::default());
    let phone_stop = CancellationToken::new();
    let phone = tokio::spawn(phone::run(
        format!("http://127.0.0.1:{http_port}"),
        phone_key,
        Duration::from_millis(500),
        Arc::clone(&phone_stats),
        phone_stop.clone(),
    ));

    let parts = Parts {
        sim: &sim_stats,
        phone: &phone_stats,
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
        "stopping ({stopped_by}): devices and the phone app, then the agent (the uplink drains), then the bridge…"
    );
    let _ = std::io::stdout().flush();

    sim_stop.cancel();
    sim.await?;
    phone_stop.cancel();
    phone.await?;
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
    while bridge_metrics.get(metrics::DECODE_ERRORS) > 0
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
