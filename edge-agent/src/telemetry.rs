//! Logs (tracing, text or JSON on stderr) and the Prometheus endpoint.
//!
//! Metric names are part of the agent's interface (dashboards and alerts key on them), so
//! they are all declared here, once, with their help text.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

pub const INGESTED: &str = "edge_ingested_total";
pub const ACCEPTED: &str = "edge_accepted_total";
pub const REJECTED: &str = "edge_rejected_total";
pub const DUPLICATES: &str = "edge_duplicates_total";
pub const GAPS: &str = "edge_gaps_total";
pub const MISSED: &str = "edge_missed_events_total";
pub const LATE: &str = "edge_late_arrivals_total";
pub const OUTBOX_DEPTH: &str = "edge_outbox_entries";
pub const OUTBOX_BYTES: &str = "edge_outbox_bytes";
pub const DLQ_ENTRIES: &str = "edge_dlq_entries";
pub const BATCH_SIZE: &str = "edge_batch_size";
pub const STAGE_SECONDS: &str = "edge_stage_seconds";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9898)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `edge_agent=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

pub fn init_logs(cfg: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cfg.level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Starts the `/metrics` endpoint. Must run inside the tokio runtime.
pub fn init_metrics(cfg: &MetricsConfig) -> anyhow::Result<()> {
    if !cfg.enabled {
        return Ok(());
    }
    PrometheusBuilder::new()
        .with_http_listener(cfg.listen)
        .set_buckets_for_metric(
            Matcher::Full(STAGE_SECONDS.into()),
            &[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SIZE.into()),
            &[1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0],
        )?
        .install()
        .with_context(|| format!("metrics.listen: cannot serve metrics on {}", cfg.listen))?;
    describe();
    Ok(())
}

fn describe() {
    describe_counter!(INGESTED, "Device messages received");
    describe_counter!(ACCEPTED, "Messages that became a result in the outbox");
    describe_counter!(REJECTED, "Messages dead-lettered, by stage");
    describe_counter!(DUPLICATES, "Redelivered messages recognised and dropped");
    describe_counter!(GAPS, "Sequence gaps detected (device seq jumped ahead)");
    describe_counter!(MISSED, "Events missing inside detected gaps");
    describe_counter!(LATE, "Late arrivals that filled a gap");
    describe_gauge!(OUTBOX_DEPTH, "Results waiting in the outbox");
    describe_gauge!(OUTBOX_BYTES, "Encoded size of the outbox");
    describe_gauge!(DLQ_ENTRIES, "Entries in the local dead-letter queue");
    describe_histogram!(BATCH_SIZE, "Messages per group commit");
    describe_histogram!(
        STAGE_SECONDS,
        "Time per batch in each stage (engine, commit)"
    );
}
