//! `cloud-bridge`: the cloud tier of the pipeline.
//!
//! ```text
//! edge-agent outbox ──MQTT/TLS (CBOR Batch, QoS 1)──▶ cloud-bridge ──▶ S3  {prefix}events/dt=…/gateway=…/*.ndjson
//!   gateways/{g}/results      $share/{group}/…        (service: run,  ──▶ EventBridge PutEvents (≤10 entries, ≤256 KB)
//!   gateways/{g}/replay ◀── ReplayRequest (gaps) ──    or lambda)     ──▶ DynamoDB: per-gateway hwm + claim
//! ```
//!
//! Gateways publish `proto::Batch`es of results (contiguous, ascending `edge_seq`). The bridge
//! de-duplicates by `(gateway, edge_seq)`, holds a batch that starts past what is stored and
//! asks the gateway to replay the missing range, writes each result exactly once to S3 (one
//! NDJSON object per claimed range, see [`pipeline`]) and publishes it to EventBridge. Two
//! transports share that one pipeline: [`service`] (`run`, an MQTT shared subscription with
//! manual acks) and [`lambda`] (`lambda_runtime`).
//! In `run`, each gateway's status message (`gateways/{g}/status`, [`status`]) checks the
//! stored tail against what the gateway's broker acknowledged and carries the gateway's
//! missed-event records, each announced once as `MissedEvents` (`kind: device`).
//!
//! Devices with no gateway send their messages straight to the cloud ([`ingest`]: HTTP,
//! AWS IoT Core, EventBridge): the bridge runs the gateways' engine on them, with each
//! device's state in DynamoDB, and stores each result once in S3 like a gateway's.
//!
//! # Invariants
//! - A message is acknowledged to the broker (or an invocation answered with success) only
//!   after every result in it is in S3, its events were accepted by EventBridge and the
//!   gateway's `hwm` covers it. Failures leave it unacknowledged; nothing is dropped silently:
//!   an invalid message goes to `{prefix}failures/` (and EventDeadLettered), a range that never
//!   arrives after the replay requests is reported as MissedEvents, recorded in the table and
//!   counted.
//! - After any number of redeliveries, crashes and concurrent bridges, each `edge_seq` of a
//!   gateway is in exactly one object under `events/`: objects are written only for ranges
//!   claimed in DynamoDB, claims never overlap, and an abandoned claim's object is deleted
//!   before the next claim.
//! - No state that only one instance can have: everything shared is in DynamoDB, so any
//!   number of bridges (and Lambda instances) can run side by side.
//! - EventBridge delivery is at-least-once (a crash between PutEvents and the commit resends);
//!   consumers de-duplicate by `event_id`.
//! - A gateway-less event is answered as stored only once its object is in S3 and its
//!   device's state is committed; each is in exactly one object, and a device's events commit
//!   one at a time against the state before them.

pub mod anomaly;
pub mod backend;
pub mod config;
pub mod correction;
pub mod detail;
pub mod dlq;
mod fault;
pub mod ingest;
pub mod lambda;
pub mod layout;
pub mod metrics;
pub mod monitor;
pub mod pipeline;
pub mod provision;
pub mod render;
pub mod service;
pub mod sink;
pub mod status;
pub mod verify;
pub mod window;

/// FNV-1a: a stable hash (the same on every bridge and build) for sampling and file names.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Any id (event ids hold `/`, gateway ids anything but MQTT wildcards) as one safe file name
/// or S3 key segment: its bytes in lowercase hex.
pub(crate) fn hex_name(id: &str) -> String {
    use std::fmt::Write as _;
    id.bytes()
        .fold(String::with_capacity(id.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The inverse of [`hex_name`]; `None` if `hex` is not one.
pub(crate) fn unhex_name(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Wall-clock epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Logs to stderr (stdout carries the EMF metric lines): text or JSON; `RUST_LOG` wins.
pub fn init_logging(cfg: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},aws_smithy_runtime=warn,aws_config=warn",
            cfg.level
        ))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        config::LogFormat::Json => b.json().try_init(),
        config::LogFormat::Text => b.with_ansi(false).try_init(),
    };
}
