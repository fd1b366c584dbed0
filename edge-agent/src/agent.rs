//! `edge-agent run`: wires ingest, the pipeline thread, the store and telemetry together.
//!
//! Start-up order makes readiness honest: the store opens (and its state loads) before any
//! socket accepts a message. Shutdown runs the other way: ingest stops taking messages, the
//! pipeline drains and commits what it holds and releases its acks, then the store flushes.

use anyhow::Context;
use tokio::sync::mpsc;

use crate::admin;
use crate::config::AgentConfig;
use crate::ingest;
use crate::pipeline::Pipeline;
use crate::store::Store;
use crate::telemetry;
use crate::uplink::{self, LinkStatus};
use tokio_util::sync::CancellationToken;

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let engine = cfg.engine().map_err(anyhow::Error::msg)?;
    // Metrics first: the store and outbox publish their gauges as they open.
    telemetry::init_metrics(&cfg.metrics)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;
    let store = Store::open(&cfg.data_dir)?;
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
    let (admin_tx, admin_rx) = mpsc::channel(16);
    let admin_server = admin::server::Server {
        reader: pipeline.reader(),
        calls: admin_tx,
        live: pipeline.live(),
        outbox: outbox.clone(),
        dlq: cfg.dlq.clone(),
        uplink: None,
    };

    let (tx, rx) = mpsc::channel(cfg.pipeline.queue_capacity);
    let pipeline = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || pipeline.run_with_admin(rx, admin_rx))
        .context("starting the pipeline thread")?;

    let link = LinkStatus::default();
    let uplink_stop = CancellationToken::new();
    let uplink = cfg.uplink.enabled.then(|| {
        tokio::spawn(uplink::run(
            cfg.uplink.clone(),
            cfg.gateway_id.clone(),
            outbox.clone(),
            link.clone(),
            uplink_stop.clone(),
        ))
    });
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(
        admin::server::Server {
            uplink: cfg.uplink.enabled.then(|| link.clone()),
            ..admin_server
        }
        .serve(admin_listener, admin_path, admin_stop.clone()),
    );

    let shutdown = ingest::Shutdown::new();
    let mut ingest = ingest::start(&cfg.broker, tx, shutdown.clone()).await?;
    tracing::info!(
        gateway = %cfg.gateway_id,
        data_dir = %cfg.data_dir.display(),
        outbox = outbox.depth().entries,
        dlq = counters.dlq_entries,
        "edge-agent ready"
    );

    let stopped_by = tokio::select! {
        signal = termination() => signal?,
        result = ingest.wait() => {
            result.context("ingest stopped")?;
            "ingest"
        }
    };
    tracing::info!(by = stopped_by, "shutting down: draining the pipeline");
    shutdown.trigger();
    ingest.stopped().await;
    let store = tokio::task::spawn_blocking(move || pipeline.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))??;
    admin_stop.cancel();
    admin.await?;
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

async fn termination() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
