//! Logs (tracing, text or JSON on stderr) and the Prometheus endpoint.
//!
//! Metric names are part of the agent's interface (dashboards and alerts key on them), so
//! they are all declared here, once, with their help text.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

pub const INGESTED: &str = "edge_ingested_total";
pub const ACCEPTED: &str = "edge_accepted_total";
pub const REJECTED: &str = "edge_rejected_total";
pub const DUPLICATES: &str = "edge_duplicates_total";
pub const GAPS: &str = "edge_gaps_total";
pub const MISSED: &str = "edge_missed_events_total";
pub const LATE: &str = "edge_late_arrivals_total";
pub const GAP_SEQS: &str = "edge_gap_seqs_total";
pub const GAPS_OPEN: &str = "edge_gaps_open";
pub const DEVICES: &str = "edge_devices";
pub const DEVICES_REFUSED: &str = "edge_devices_refused_total";
pub const MISSED_RECORDS: &str = "edge_missed_records";
pub const MISSED_FILLED_LATE: &str = "edge_missed_filled_late_total";
pub const MISSED_DROPPED: &str = "edge_missed_records_dropped_total";
pub const ANOMALIES: &str = "edge_anomalies_total";
pub const CORRECTED: &str = "edge_corrected_total";
pub const CONFIG_RELOADS: &str = "edge_config_reloads_total";
pub const OUTBOX_DEPTH: &str = "edge_outbox_entries";
pub const STORE_QUARANTINED: &str = "edge_store_quarantined";
pub const DISK_FULL: &str = "edge_disk_full";
pub const OUTBOX_BYTES: &str = "edge_outbox_bytes";
/// `processed_at` of the oldest result waiting for the cloud (epoch s; 0 when none waits).
pub const OUTBOX_OLDEST: &str = "edge_outbox_oldest_pending_timestamp_seconds";
pub const OUTBOX_DROPPED: &str = "edge_outbox_dropped_total";
pub const OUTBOX_EXPIRED: &str = "edge_outbox_expired_total";
pub const OUTBOX_BLOCKED: &str = "edge_outbox_blocked";
pub const DLQ_ENTRIES: &str = "edge_dlq_entries";
pub const DLQ_BYTES: &str = "edge_dlq_bytes";
pub const DLQ_DROPPED: &str = "edge_dlq_dropped_total";
pub const DLQ_BLOCKED: &str = "edge_dlq_blocked";
pub const DLQ_RETRIES: &str = "edge_dlq_retries_total";
pub const UPLINK_CONNECTED: &str = "edge_uplink_connected";
pub const UPLINK_RECONNECTS: &str = "edge_uplink_reconnects_total";
pub const UPLINK_BATCHES: &str = "edge_uplink_batches_total";
pub const UPLINK_RESULTS: &str = "edge_uplink_results_total";
pub const UPLINK_BYTES: &str = "edge_uplink_bytes_total";
pub const REPLAY_REQUESTS: &str = "edge_replay_requests_total";
pub const UPLINK_STATUS: &str = "edge_uplink_status_total";
pub const UPLINK_REFUSED: &str = "edge_uplink_refused_total";
pub const MISSED_REPORTED: &str = "edge_missed_reported_total";
pub const REPLAY_UNAVAILABLE: &str = "edge_replay_unavailable_total";
pub const REPLAY_DROPPED: &str = "edge_replay_requests_dropped_total";
pub const UPLINK_IN_FLIGHT: &str = "edge_uplink_in_flight";
pub const BATCH_SIZE: &str = "edge_batch_size";
pub const STAGE_SECONDS: &str = "edge_stage_seconds";
// The ingest endpoint and the external-broker client (`ingest/`).
pub const INGEST_ACKS_DROPPED_TOTAL: &str = "ingest_acks_dropped_total";
pub const INGEST_ACKS_RELEASED_TOTAL: &str = "ingest_acks_released_total";
pub const INGEST_ACKS_STALE_TOTAL: &str = "ingest_acks_stale_total";
pub const INGEST_AUTH_REFUSED_TOTAL: &str = "ingest_auth_refused_total";
pub const INGEST_BUFFER_FULL_TOTAL: &str = "ingest_buffer_full_total";
pub const INGEST_CONNECT_REFUSED_TOTAL: &str = "ingest_connect_refused_total";
pub const INGEST_CONNECTIONS: &str = "ingest_connections";
pub const INGEST_CONNECTIONS_REFUSED_TOTAL: &str = "ingest_connections_refused_total";
pub const INGEST_CONNECTIONS_TOTAL: &str = "ingest_connections_total";
pub const INGEST_EXTERNAL_CONNECTED: &str = "ingest_external_connected";
pub const INGEST_EXTERNAL_CONNECTION_ERRORS_TOTAL: &str = "ingest_external_connection_errors_total";
pub const INGEST_EXTERNAL_UNHANDED_TOTAL: &str = "ingest_external_unhanded_total";
pub const INGEST_INFLIGHT_FULL_TOTAL: &str = "ingest_inflight_full_total";
pub const INGEST_KEEPALIVE_TIMEOUTS_TOTAL: &str = "ingest_keepalive_timeouts_total";
pub const INGEST_MESSAGES_TOTAL: &str = "ingest_messages_total";
pub const INGEST_OVERSIZED_PACKETS_TOTAL: &str = "ingest_oversized_packets_total";
pub const INGEST_PAYLOAD_BYTES_TOTAL: &str = "ingest_payload_bytes_total";
pub const INGEST_PROTOCOL_ERRORS_TOTAL: &str = "ingest_protocol_errors_total";
pub const INGEST_PUBLISH_REFUSED_TOTAL: &str = "ingest_publish_refused_total";
pub const INGEST_SUBSCRIBE_REFUSED_TOTAL: &str = "ingest_subscribe_refused_total";
pub const INGEST_TAKEOVERS_TOTAL: &str = "ingest_takeovers_total";
pub const INGEST_TLS_REFUSED_TOTAL: &str = "ingest_tls_refused_total";
pub const INGEST_TOPIC_TOO_LONG_TOTAL: &str = "ingest_topic_too_long_total";

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

pub use settings::{LogConfig, LogFormat};

pub fn init_logs(cfg: &LogConfig) {
    // rustls warns once per connection about devices that send an IP address as SNI (which
    // mosquitto_pub and most MQTT clients do when given one); the endpoint counts and logs
    // the handshake failures that matter itself. RUST_LOG still shows everything it names.
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rustls=error", cfg.level.as_str())));
    // rumqttc's MQTT 5 client warns on every refused PUBACK; the uplink counts them and logs
    // once a minute itself. Unless RUST_LOG asks for rumqttc by name.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rumqttc")) {
        filter = filter.add_directive(
            "rumqttc::v5::state=error"
                .parse()
                .expect("a valid log directive"),
        );
    }
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

/// Starts the `/metrics` endpoint and returns the address it is bound to (`None` when metrics
/// are off); port 0 in `metrics.listen` picks a free port, which this address reports. Must run
/// inside the tokio runtime.
///
/// The listener is bound here (not by the exporter, whose own listener cannot say which port
/// it got) and served with hyper, as the exporter would: `/health` answers `OK`, any other path
/// the text exposition.
pub fn init_metrics(cfg: &MetricsConfig) -> anyhow::Result<Option<SocketAddr>> {
    if !cfg.enabled {
        return Ok(None);
    }
    let context = || format!("metrics.listen: cannot serve metrics on {}", cfg.listen);
    let listener = std::net::TcpListener::bind(cfg.listen)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .with_context(context)?;
    let addr = listener.local_addr().with_context(context)?;
    let handle = PrometheusBuilder::new()
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
        .install_recorder()
        .context("installing the metrics recorder")?;
    // What the exporter's own runtime would do: drain histograms now and then.
    tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        }
    });
    tokio::spawn(serve_metrics(listener, handle));
    describe();
    register();
    Ok(Some(addr))
}

/// The `/metrics` endpoint: one hyper HTTP/1 connection per accepted socket.
async fn serve_metrics(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: try again shortly rather than spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| metrics_reply(req, handle.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

async fn metrics_reply(
    req: hyper::Request<hyper::body::Incoming>,
    handle: PrometheusHandle,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let body = match req.uri().path() {
        "/health" => "OK".to_string(),
        _ => tokio::task::spawn_blocking(move || handle.render())
            .await
            .unwrap_or_default(),
    };
    let mut reply = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(reply)
}

/// Every pipeline metric with its value, so a dashboard and `rate()` see each series from
/// the start rather than only after its first event (and the DLQ panel has every stage).
/// `increment(0)` registers a series without changing a value already set.
fn register() {
    for c in [
        INGESTED,
        ACCEPTED,
        DUPLICATES,
        GAPS,
        GAP_SEQS,
        MISSED,
        DEVICES_REFUSED,
        MISSED_FILLED_LATE,
        MISSED_DROPPED,
        LATE,
        ANOMALIES,
        CORRECTED,
        OUTBOX_DROPPED,
        DLQ_DROPPED,
        UPLINK_RECONNECTS,
        UPLINK_BATCHES,
        UPLINK_RESULTS,
        UPLINK_BYTES,
        REPLAY_REQUESTS,
        UPLINK_STATUS,
        MISSED_REPORTED,
        REPLAY_UNAVAILABLE,
        REPLAY_DROPPED,
    ] {
        metrics::counter!(c).increment(0);
    }
    // The stages the agent's engine dead-letters at (`uplink`, `cloud`, `correction` are
    // the cloud's).
    for stage in [
        proto::Stage::Decode,
        proto::Stage::Schema,
        proto::Stage::Rule,
        proto::Stage::Calc,
        proto::Stage::Check,
    ] {
        metrics::counter!(REJECTED, "stage" => stage.as_str()).increment(0);
    }
    for trigger in ["auto", "manual"] {
        for outcome in ["reprocessed", "failed"] {
            metrics::counter!(DLQ_RETRIES, "trigger" => trigger, "outcome" => outcome).increment(0);
        }
    }
    for g in [
        GAPS_OPEN,
        DEVICES,
        MISSED_RECORDS,
        OUTBOX_DEPTH,
        OUTBOX_BYTES,
        OUTBOX_OLDEST,
        OUTBOX_BLOCKED,
        DLQ_ENTRIES,
        DLQ_BYTES,
        DLQ_BLOCKED,
        UPLINK_CONNECTED,
        UPLINK_IN_FLIGHT,
        DISK_FULL,
        STORE_QUARANTINED,
    ] {
        metrics::gauge!(g).increment(0.0);
    }
}

fn describe() {
    describe_counter!(INGESTED, "Device messages received");
    describe_counter!(ACCEPTED, "Messages that became a result in the outbox");
    describe_counter!(REJECTED, "Messages dead-lettered, by stage");
    describe_counter!(DUPLICATES, "Redelivered messages recognised and dropped");
    describe_counter!(GAPS, "Sequence gaps detected (device seq jumped ahead)");
    describe_counter!(
        GAP_SEQS,
        "Seqs missing inside detected gaps (when detected)"
    );
    describe_gauge!(
        GAPS_OPEN,
        "Open sequence gaps not yet declared missed (waiting for missed_after_s)"
    );
    describe_counter!(
        MISSED,
        "Seqs declared missed (a gap still open after pipeline.missed_after_s)"
    );
    describe_gauge!(MISSED_RECORDS, "Missed-event records stored");
    describe_gauge!(
        DEVICES,
        "Devices the gateway keeps state for (at most pipeline.max_devices)"
    );
    describe_counter!(
        DEVICES_REFUSED,
        "Messages dead-lettered because their device would exceed pipeline.max_devices"
    );
    describe_counter!(
        MISSED_FILLED_LATE,
        "Seqs declared missed that arrived later (processed normally)"
    );
    describe_counter!(
        MISSED_DROPPED,
        "Missed-event records dropped to stay under pipeline.missed_max_records"
    );
    describe_counter!(LATE, "Late arrivals that filled a gap");
    describe_counter!(
        ANOMALIES,
        "Results the engine's anomaly detectors flagged (status anomaly)"
    );
    describe_counter!(
        CORRECTED,
        "Results corrected at the edge (made stale by a late arrival in the same batch)"
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Config reloads (SIGHUP), by result: applied or refused"
    );
    describe_counter!(
        OUTBOX_EXPIRED,
        "Pending results dropped for being older than outbox.max_age_s"
    );
    describe_gauge!(OUTBOX_DEPTH, "Results waiting in the outbox for the cloud");
    describe_gauge!(
        DISK_FULL,
        "1 while the data dir's filesystem is short of pipeline.disk_reserve_mb (intake stopped)"
    );
    describe_gauge!(
        STORE_QUARANTINED,
        "Damaged stores moved aside to data_dir/quarantine (the agent started on a fresh one)"
    );
    describe_gauge!(
        OUTBOX_BYTES,
        "Encoded size of the results waiting in the outbox"
    );
    describe_counter!(
        OUTBOX_DROPPED,
        "Pending results deleted unsent by the drop_oldest policy"
    );
    describe_gauge!(
        OUTBOX_OLDEST,
        "processed_at of the oldest result waiting for the cloud, epoch seconds (0: none waits)"
    );
    describe_gauge!(OUTBOX_BLOCKED, "1 while a full outbox blocks intake");
    describe_gauge!(DLQ_ENTRIES, "Entries in the local dead-letter queue");
    describe_gauge!(DLQ_BYTES, "Encoded size of the local dead-letter queue");
    describe_counter!(
        DLQ_DROPPED,
        "DLQ entries evicted to stay under the cap (full_policy = drop_oldest)"
    );
    describe_gauge!(
        DLQ_BLOCKED,
        "1 while intake is stopped because the DLQ is full (full_policy = block)"
    );
    describe_counter!(
        DLQ_RETRIES,
        "DLQ entries retried, by trigger (auto, manual) and outcome (reprocessed, failed)"
    );
    describe_gauge!(UPLINK_CONNECTED, "1 while the uplink is connected");
    describe_counter!(UPLINK_RECONNECTS, "Uplink connections lost");
    describe_counter!(
        UPLINK_BATCHES,
        "Batches published to the cloud (re-sends included)"
    );
    describe_counter!(
        UPLINK_RESULTS,
        "Results published to the cloud (re-sends included)"
    );
    describe_counter!(UPLINK_BYTES, "Bytes published to the cloud");
    describe_counter!(REPLAY_REQUESTS, "Replay requests received from the cloud");
    describe_counter!(
        UPLINK_REFUSED,
        "Publishes the cloud broker refused (MQTT 5 PUBACK reason code), by reason"
    );
    describe_counter!(
        UPLINK_STATUS,
        "Status messages published on gateways/{g}/status"
    );
    describe_counter!(
        MISSED_REPORTED,
        "Missed-event records the cloud broker acknowledged in a status message"
    );
    describe_counter!(
        REPLAY_UNAVAILABLE,
        "Requested results no longer in the replay window"
    );
    describe_counter!(
        REPLAY_DROPPED,
        "Replay requests dropped because uplink::MAX_PENDING_REPLAYS already waited"
    );
    describe_gauge!(
        UPLINK_IN_FLIGHT,
        "Uplink batches and status messages not yet released (at most uplink.max_in_flight)"
    );
    describe_histogram!(BATCH_SIZE, "Messages per group commit");
    describe_histogram!(
        STAGE_SECONDS,
        "Time per batch in each stage: engine, then commit (from its apply to its acks, after the sync)"
    );
}
