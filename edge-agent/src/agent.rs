//! `edge-agent run`: wires ingest, the pipeline thread, the store and telemetry together.
//!
//! Start-up order makes readiness honest: the store opens (and its state loads) before any
//! socket accepts a message. Shutdown runs the other way: ingest stops taking messages, the
//! pipeline drains and commits what it holds and releases its acks, then the store flushes.

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::ingest;
use crate::pipeline::Pipeline;
use crate::store::Store;
use crate::telemetry;

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let engine = cfg.engine().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;
    let store = Store::open(&cfg.data_dir)?;
    let counters = store.counters();
    let pipeline = Pipeline::new(engine, store, cfg.gateway_id.clone(), &cfg.pipeline)?;
    telemetry::init_metrics(&cfg.metrics)?;

    let (tx, rx) = mpsc::channel(cfg.pipeline.queue_capacity);
    let pipeline = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || pipeline.run(rx))
        .context("starting the pipeline thread")?;

    let shutdown = ingest::Shutdown::new();
    let mut ingest = ingest::start(&cfg.broker, tx, shutdown.clone()).await?;
    tracing::info!(
        gateway = %cfg.gateway_id,
        data_dir = %cfg.data_dir.display(),
        outbox = counters.outbox_entries,
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
    let c = store.counters();
    drop(store);
    tracing::info!(
        outbox = c.outbox_entries,
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
