//! `edge-agent run`: wires ingest, the pipeline thread, the store and telemetry together.
//!
//! Start-up order makes readiness honest: the store opens (and its state loads) before any
//! socket accepts a message. Shutdown runs the other way: ingest stops taking messages, the
//! pipeline drains and commits what it holds and releases its acks, then the store flushes.

use anyhow::Context;
use tokio::sync::mpsc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::admin;
use crate::config::AgentConfig;
use crate::ingest;
use crate::pipeline::AdminCall;
use crate::pipeline::Pipeline;
use crate::reload;
use crate::status::Live;
use crate::store::outbox::Outbox;
use crate::store::{Store, StoreReader};
use crate::systemd;
use crate::telemetry;
use crate::uplink::{self, LinkStatus};
use tokio_util::sync::CancellationToken;

/// How an embedding (`edge-agent demo`) drives the agent; `Hooks::default()` is `run`.
#[derive(Default)]
pub struct Hooks {
    /// Stops the agent like SIGTERM does; when set, the agent installs no signal handlers.
    pub stop: Option<CancellationToken>,
    /// Receives the running agent's handles once it is ready.
    pub ready: Option<tokio::sync::oneshot::Sender<Handles>>,
    /// On shutdown, wait up to this long for the uplink to send every pending result.
    pub uplink_drain: Option<Duration>,
    /// The file the config was read from: `SIGHUP` reloads it ([`crate::reload`]).
    pub config_path: Option<std::path::PathBuf>,
}

/// A running agent's handles, read-only: for a live summary.
///
/// The addresses are the bound ones, so a port 0 in the config reads here as the port it got
/// (the same addresses the `edge-agent ready` log line reports).
pub struct Handles {
    /// The embedded endpoint's address: its plain listener's, or its TLS listener's when it
    /// serves TLS only (`None` with an external broker).
    pub ingest_addr: Option<SocketAddr>,
    /// The embedded endpoint's TLS listener (`None` without `[broker.embedded.tls]`).
    pub ingest_tls_addr: Option<SocketAddr>,
    /// The Prometheus endpoint (`None` with `metrics.enabled = false`).
    pub metrics_addr: Option<SocketAddr>,
    pub live: Arc<Live>,
    pub outbox: Outbox,
    pub reader: StoreReader,
    pub link: LinkStatus,
}

/// Opens the store once a child process has shown it can be read; a damaged one is moved
/// aside (`store::quarantine`) and the agent starts on a fresh store, loudly.
fn open_store(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    let exe = std::env::current_exe().context("locating the edge-agent binary for the probe")?;
    let now = crate::ingest::now_ms();
    let made = crate::store::quarantine::probe(&exe, data_dir, now)?;
    let store = Store::open(data_dir)?;
    if let Some(q) = &made {
        tracing::error!(
            moved_to = %q.moved_to.display(),
            reason = %q.reason,
            "the store was damaged: moved aside, starting on a fresh store (export what is \
             left with `edge-agent store salvage --from {}`)",
            q.moved_to.display()
        );
        store.record_quarantine(q)?;
    }
    let quarantined = store.reader().quarantines()?;
    metrics::gauge!(telemetry::STORE_QUARANTINED).set(quarantined.len() as f64);
    Ok(store)
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    run_with(cfg, Hooks::default()).await
}

pub async fn run_with(cfg: AgentConfig, hooks: Hooks) -> anyhow::Result<()> {
    crate::ingest::embedded::tls::install_provider();
    let engine = cfg.engine()?;
    // Metrics first: the store and outbox publish their gauges as they open.
    let metrics_addr = telemetry::init_metrics(&cfg.metrics)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;
    let mut store = open_store(&cfg.data_dir)?;
    let counters = store.counters();
    let outbox = store.open_outbox(cfg.outbox.clone())?;
    let pipeline = Pipeline::new(
        engine,
        store,
        outbox.clone(),
        cfg.gateway_id.clone(),
        &cfg.pipeline,
    )?
    .with_dlq(cfg.dlq.clone())?;
    // The admin socket (status, dlq …): reads from the store, writes via the pipeline thread.
    let (admin_listener, admin_path) = admin::server::bind(&cfg.data_dir)?;
    let admin_stop = CancellationToken::new();
    let (admin_tx, admin_rx) = mpsc::channel(16);
    let reload_tx = admin_tx.clone();
    let refused = ingest::Refused::default();
    let admin_server = admin::server::Server {
        reader: pipeline.reader(),
        calls: admin_tx,
        live: pipeline.live(),
        outbox: outbox.clone(),
        dlq: cfg.dlq.clone(),
        uplink: None,
        refused: refused.clone(),
        tap: pipeline.tap(),
        stop: admin_stop.clone(),
    };

    let (live, reader) = (pipeline.live(), pipeline.reader());
    let heartbeat = pipeline.heartbeat();
    let (tx, rx) = mpsc::channel(cfg.pipeline.queue_capacity);
    let pipeline = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || pipeline.run_with_admin(rx, admin_rx))
        .context("starting the pipeline thread")?;

    let link = LinkStatus::default();
    let uplink_task = |ucfg: &uplink::UplinkConfig| {
        let stop = CancellationToken::new();
        let task = ucfg.enabled.then(|| {
            tokio::spawn(uplink::run(
                ucfg.clone(),
                cfg.gateway_id.clone(),
                outbox.clone(),
                reader.clone(),
                link.clone(),
                stop.clone(),
            ))
        });
        (task, stop)
    };
    let (mut uplink, mut uplink_stop) = uplink_task(&cfg.uplink);
    let admin = tokio::spawn(
        admin::server::Server {
            uplink: cfg.uplink.enabled.then(|| link.clone()),
            ..admin_server
        }
        .serve(admin_listener, admin_path, admin_stop.clone()),
    );

    let shutdown = ingest::Shutdown::new();
    let devices = match cfg.broker.embedded.auth.identifies_devices() {
        false => None,
        true => Some(ingest::embedded::auth::DeviceAuth {
            registry: crate::devices::Watch::new(&cfg.data_dir)?,
            topics: engine::TopicPattern::parse(&cfg.engine.topic).map_err(anyhow::Error::msg)?,
        }),
    };
    let mut ingest = ingest::start(&cfg.broker, devices, refused, tx, shutdown.clone()).await?;
    // What SIGHUP reloads: the file as it was read at start.
    let mut running = match &hooks.config_path {
        Some(path) => {
            let loaded = reload::Loaded::read(path).map_err(anyhow::Error::msg)?;
            live.set_config(reload::ConfigInfo {
                hash: loaded.hash.clone(),
                loaded_at: crate::ingest::now_ms(),
                ..reload::ConfigInfo::default()
            });
            Some((path.clone(), loaded))
        }
        None => None,
    };
    let signals = hooks.stop.is_none();
    let mut hangup = match (signals, &running) {
        (true, Some(_)) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("installing the SIGHUP handler")?,
        ),
        _ => None,
    };
    // Installed before the agent says it is ready: a signal sent on seeing the ready line
    // must find its handler (the default action of both is to kill the process).
    let terminated = match signals {
        true => Some(termination()?),
        false => None,
    };
    let terminated = async move {
        match terminated {
            Some(t) => t.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(terminated);
    // The bound addresses (a port 0 in the config is the free port it got), each only when
    // that listener runs: `mqtt` (plain), `mqtt_tls`, `metrics`.
    tracing::info!(
        gateway = %cfg.gateway_id,
        data_dir = %cfg.data_dir.display(),
        mqtt = ingest.plain_addr().map(tracing::field::display),
        mqtt_tls = ingest.tls_addr().map(tracing::field::display),
        metrics = metrics_addr.map(tracing::field::display),
        outbox = outbox.depth().entries,
        dlq = counters.dlq_entries,
        "edge-agent ready"
    );
    // Store, ingest, metrics and admin socket are up: tell systemd (no-op elsewhere).
    systemd::notify_ready();
    let _watchdog = systemd::spawn_watchdog(heartbeat);
    if let Some(ready) = hooks.ready {
        let _ = ready.send(Handles {
            ingest_addr: ingest.local_addr(),
            ingest_tls_addr: ingest.tls_addr(),
            metrics_addr,
            live: live.clone(),
            outbox: outbox.clone(),
            reader: reader.clone(),
            link: link.clone(),
        });
    }

    let stop = hooks.stop.clone().unwrap_or_default();
    let stopped_by = loop {
        tokio::select! {
            signal = &mut terminated => break signal,
            _ = stop.cancelled() => break "stop requested",
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some((path, current)) = running.as_mut() else { continue };
                let Some(next) = reload(path, current, &reload_tx, &live).await else { continue };
                if next.uplink {
                    tracing::info!("uplink settings changed: reconnecting");
                    uplink_stop.cancel();
                    if let Some(task) = uplink.take() {
                        match task.await {
                            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "uplink stopped with an error"),
                            Err(e) => tracing::warn!(error = %e, "the uplink task failed"),
                            Ok(Ok(())) => {}
                        }
                    }
                    (uplink, uplink_stop) = uplink_task(&current.cfg.uplink);
                }
            }
            result = ingest.wait() => {
                if let Err(e) = result {
                    // Ingest stops when the pipeline has gone: its error is the cause to report.
                    return Err(match tokio::task::spawn_blocking(move || pipeline.join()).await? {
                        Ok(Err(store)) => anyhow::Error::new(store).context("the pipeline stopped"),
                        _ => e.context("ingest stopped"),
                    });
                }
                break "ingest";
            }
        }
    };
    tracing::info!(by = stopped_by, "shutting down: draining the pipeline");
    systemd::notify_stopping();
    shutdown.trigger();
    ingest.stopped().await;
    let store = tokio::task::spawn_blocking(move || pipeline.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))??;
    admin_stop.cancel();
    admin.await?;
    if let (Some(limit), Some(_)) = (hooks.uplink_drain, &uplink) {
        drain_uplink(&outbox, limit).await;
    }
    uplink_stop.cancel();
    if let Some(task) = uplink {
        task.await?.context("uplink")?;
    }
    store.flush()?;
    let c = store.counters();
    drop(store);
    tracing::info!(
        outbox = outbox.depth().entries,
        dlq = c.dlq_entries,
        "stopped cleanly"
    );
    Ok(())
}

/// Reloads `path` over `current` (see [`crate::reload`]): refused, it logs and counts why and
/// leaves `current` as it is; applied, the engine is swapped (when it changed) and `current`
/// becomes the new file. What the caller still has to apply: `uplink`.
async fn reload(
    path: &std::path::Path,
    current: &mut reload::Loaded,
    pipeline: &mpsc::Sender<AdminCall>,
    live: &crate::status::Live,
) -> Option<reload::Changes> {
    let refuse = |reason: String| {
        tracing::error!(%reason, "config reload refused: the running config stays");
        metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "refused").increment(1);
        live.update_config(|c| {
            c.refused += 1;
            c.last_refusal = Some(reason);
        });
        None
    };
    let next = match reload::Loaded::read(path) {
        Ok(n) => n,
        Err(reason) => return refuse(reason),
    };
    let changes = match current.changes(&next) {
        Ok(c) => c,
        Err(reason) => return refuse(reason),
    };
    if changes.engine {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let swapped = pipeline
            .send(AdminCall::Engine(Box::new(next.engine.clone()), tx))
            .await
            .is_ok()
            && matches!(rx.await, Ok(Ok(())));
        if !swapped {
            return refuse("the pipeline is stopping: the engine was not swapped".into());
        }
    }
    if !changes.restart.is_empty() {
        tracing::warn!(sections = ?changes.restart, "config sections changed that take effect at the next restart");
    }
    tracing::info!(
        hash = %next.hash,
        engine = changes.engine,
        uplink = changes.uplink,
        calc_versions = %next.calc_versions().join(","),
        "config reloaded"
    );
    metrics::counter!(telemetry::CONFIG_RELOADS, "result" => "applied").increment(1);
    live.update_config(|c| {
        c.hash = next.hash.clone();
        c.loaded_at = crate::ingest::now_ms();
        c.reloads += 1;
        c.last_refusal = None;
        c.pending_restart = changes.restart.clone();
    });
    // What waits for a restart keeps its running value.
    let mut next = next;
    next.keep_running(current);
    *current = next;
    Some(changes)
}

/// Waits (up to `limit`) until the uplink has sent every pending result.
async fn drain_uplink(outbox: &Outbox, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while outbox.depth().entries > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = outbox.depth().entries;
    if left > 0 {
        tracing::warn!(
            pending = left,
            "uplink drain: results still pending, kept in the outbox"
        );
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves at the first of them.
fn termination() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
