//! The bridge's TOML configuration (`cloud-bridge run --config FILE`).
//!
//! A bad config stops start-up with a message naming the field (`mqtt.port: invalid type ...`),
//! through `serde_path_to_error`, like the agent's `check-config`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use settings::Invalid;

use crate::detail::DetailType;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cloud broker. Required by `run`; `lambda` uses it only to publish replay requests.
    pub mqtt: Option<MqttConfig>,
    pub aws: AwsConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Re-verification of gateway results with the engine (absent: not verified).
    pub verify: Option<VerifyConfig>,
    #[serde(default)]
    pub dlq: DlqConfig,
    #[serde(default)]
    pub monitor: MonitorConfig,
    /// `cloud-bridge anomaly train|scan` and the model the bridge scores with.
    #[serde(default)]
    pub anomaly: AnomalyConfig,
    /// Device messages straight to the cloud, with no gateway (absent: not accepted).
    pub ingest: Option<IngestConfig>,
    /// The HTTP listener of `run` for gateway-less devices (needs `[ingest]`).
    pub http: Option<HttpConfig>,
}

/// `[ingest]`: the cloud runs the gateways' engine on device messages that come without a
/// gateway (HTTP, AWS IoT Core, EventBridge, the cloud broker's device topics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The `gateway` of their results and the `gateway=` folder of their objects. A gateway
    /// of the same name would share that folder: pick one no gateway uses.
    #[serde(default = "default_ingest_name")]
    pub name: String,
    /// The engine config (the format of `verify.engine_config`). Default: that one.
    pub engine_config: Option<PathBuf>,
    /// `run` also takes device messages from the cloud broker's device topics (the engine
    /// config's `topic`, as a shared subscription of `mqtt.share_group`).
    #[serde(default)]
    pub mqtt: bool,
    /// A gap in a device's `seq` still open after this long is reported as MissedEvents
    /// (the agent's `missed_after_s`): at the device's next message, or by the sweep if the
    /// device went silent.
    #[serde(default = "default_missed_after")]
    pub missed_after_s: u64,
    /// How often `run` sweeps for silent devices with a gap due (0: never; the Lambda is
    /// swept by a scheduled `IngestSweep` event, or `cloud-bridge sweep` by hand).
    #[serde(default = "default_sweep_every")]
    pub sweep_every_s: u64,
    /// The parsed engine spec (filled by [`Config::load`]).
    #[serde(skip)]
    pub spec: Option<engine::EngineSpec>,
}

fn default_ingest_name() -> String {
    "cloud".into()
}
fn default_missed_after() -> u64 {
    300
}
fn default_sweep_every() -> u64 {
    60
}

/// `[http]`: `POST /v1/devices/{device}/events/{type}` and `POST /v1/events:batch`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `run` listens (the Lambda takes API Gateway's requests instead). Port 0 picks a
    /// free one (logged at start-up: `http listening addr=…`).
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// Larger request bodies are refused with 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most events in one batch request.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Per-device API keys: lines `DEVICE sha256:HEX` (`cloud-bridge api-key` makes one).
    /// Relative to this file.
    pub api_keys: Option<PathBuf>,
    /// A JWKS file (RFC 7517) whose keys verify bearer JWTs. Relative to this file.
    pub jwks: Option<PathBuf>,
    /// Required `iss` of a JWT, when set.
    pub jwt_issuer: Option<String>,
    /// Required `aud` of a JWT, when set.
    pub jwt_audience: Option<String>,
    /// The JWT claim that names the device the token speaks for.
    #[serde(default = "default_device_claim")]
    pub device_claim: String,
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body() -> usize {
    256 * 1024
}
fn default_max_batch() -> usize {
    500
}
fn default_device_claim() -> String {
    "sub".into()
}

/// `[monitor]`: when a discrepancy rate starts a correction run (see `monitor.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    pub enabled: bool,
    pub interval_s: u64,
    /// Incorrect share of the results verified in an interval that starts a run (0..=1).
    pub discrepancy_threshold: f64,
    /// Fewer verified results than this in an interval say nothing.
    pub min_verified: u64,
    /// At most one run per gateway in this long.
    pub cooldown_s: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            enabled: true,
            interval_s: 60,
            discrepancy_threshold: 0.01,
            min_verified: 20,
            cooldown_s: 600,
        }
    }
}

/// `[verify]`: the bridge recalculates results with the same engine the gateways run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// A TOML file with the engine's `topic`, `limits` and `event_types` at its top level: the
    /// gateways' own agent config works as it is. Relative to this file.
    pub engine_config: PathBuf,
    /// Share of results recalculated, 0..=1, chosen by a hash of `event_id` (so every bridge
    /// picks the same ones).
    #[serde(default = "one")]
    pub sample: f64,
    /// Relative tolerance for numbers (`|a-b| <= tol * max(1,|a|,|b|)`).
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Devices whose previous reading one bridge remembers (bounded memory; a device it does
    /// not know is verified only where its calculation needs no previous reading).
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// The parsed engine spec (filled by [`Config::load`]).
    #[serde(skip)]
    pub spec: Option<engine::EngineSpec>,
}

fn one() -> f64 {
    1.0
}
fn default_tolerance() -> f64 {
    1e-9
}
fn default_max_devices() -> usize {
    100_000
}

/// `[dlq]`: the cloud DLQ (the SQS queue `aws.dlq_queue`) and its processor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Run the DLQ processor inside `cloud-bridge run`.
    pub process: bool,
    /// At most this many DLQ messages handled per second, so a flood of failures cannot
    /// starve the main path.
    pub max_per_s: f64,
    /// How long a received message stays invisible to other processors.
    pub visibility_timeout_s: i32,
    /// A message that failed this many receives is stored under `failures/` and deleted.
    pub max_receives: u32,
}

impl Default for DlqConfig {
    fn default() -> Self {
        DlqConfig {
            process: true,
            max_per_s: 20.0,
            visibility_timeout_s: 60,
            max_receives: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Must be stable per bridge instance: the broker keeps this client's session (and the
    /// messages it has not acknowledged) under this id across restarts.
    pub client_id: String,
    /// Bridges with the same group share the load (`$share/{group}/gateways/+/results` and
    /// `…/status`).
    #[serde(default = "default_share_group")]
    pub share_group: String,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u16,
    /// TLS with the broker (the default). Plain TCP only when `tls = false` is written out.
    #[serde(default = "yes")]
    pub tls: bool,
    /// PEM file with the CA(s) that signed the broker's certificate (required with TLS).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key (mutual TLS, as AWS IoT Core expects).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Messages delivered but not yet acknowledged, across all gateways; at the limit the
    /// bridge stops reading from the broker until some are stored.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// On SIGTERM/SIGINT: how long to wait for batches being stored before disconnecting.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
}

fn default_port() -> u16 {
    8883
}
fn default_share_group() -> String {
    "cloud-bridge".into()
}
fn default_keep_alive() -> u16 {
    30
}
fn yes() -> bool {
    true
}
fn default_max_inflight() -> usize {
    10_000
}
fn default_max_packet() -> usize {
    16 * 1024 * 1024
}
fn default_reconnect_min() -> u64 {
    200
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_grace() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Default: the SDK's chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// An endpoint override (the local emulator). `AWS_ENDPOINT_URL` in the environment wins
    /// over this, as environment variables win over config files in the AWS tools.
    pub endpoint_url: Option<String>,
    pub bucket: String,
    /// Prepended to every S3 key (`prod/` → `prod/events/...`). Empty by default.
    #[serde(default)]
    pub prefix: String,
    pub event_bus: String,
    #[serde(default = "default_source")]
    pub source: String,
    /// Which detail-types are sent (cost control). Default: all of them.
    #[serde(default = "all_detail_types")]
    pub detail_types: Vec<String>,
    /// DynamoDB table (partition key `pk`, string): per-gateway stored-sequence state, and
    /// later the correction history.
    pub table: String,
    /// SQS queue for the cloud DLQ (created by `provision`; its processor is issue 5).
    pub dlq_queue: String,
    /// Path-style S3 URLs; default: on when an endpoint override is in use.
    pub s3_force_path_style: Option<bool>,
    /// Concurrent PutEvents calls per stored object.
    #[serde(default = "default_eb_concurrency")]
    pub eventbridge_concurrency: usize,
    /// Attempts for the entries PutEvents reports as failed, with exponential backoff.
    #[serde(default = "default_eb_attempts")]
    pub eventbridge_attempts: u32,
}

fn default_source() -> String {
    "iot.edge-pipeline".into()
}
fn all_detail_types() -> Vec<String> {
    DetailType::ALL.iter().map(|t| t.to_string()).collect()
}
fn default_eb_concurrency() -> usize {
    8
}
fn default_eb_attempts() -> u32 {
    8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Upper bound of results in one S3 object.
    pub max_object_records: u64,
    /// How long a gateway's first message after a quiet spell waits for more before its
    /// object is written (`run` only): fewer, larger objects for slow streams, at the cost
    /// of that much ack latency. 0: write at once.
    pub object_linger_ms: u64,
    /// How long a batch that starts past the stored sequence is held (another bridge may be
    /// storing the range in between) before a replay is requested.
    pub gap_hold_ms: u64,
    /// How often a held batch re-reads the stored sequence.
    pub gap_recheck_ms: u64,
    /// How long to wait for a requested replay before asking again.
    pub replay_timeout_ms: u64,
    /// Replay requests per gap; after that the range is reported as MissedEvents and skipped.
    pub replay_attempts: u32,
    /// A range claimed by a bridge that has not stored it after this long is taken over.
    /// Must exceed twice the longest S3 PUT (the SDK's 30 s operation timeout): a bridge does
    /// not start a PUT for a claim older than half of this.
    pub claim_timeout_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_object_records: 10_000,
            object_linger_ms: 500,
            gap_hold_ms: 2_000,
            gap_recheck_ms: 100,
            replay_timeout_ms: 10_000,
            replay_attempts: 3,
            claim_timeout_ms: 120_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EmfTarget {
    /// EMF JSON lines on stdout (Lambda's and the CloudWatch agent's way).
    #[default]
    Stdout,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub emf: EmfTarget,
    pub namespace: String,
    /// Service mode: seconds between EMF lines (Lambda: one per invocation).
    pub interval_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            emf: EmfTarget::Stdout,
            namespace: "EdgePipeline/CloudBridge".into(),
            interval_s: 60,
        }
    }
}

pub use settings::{LogConfig, LogFormat};

/// The anomaly model (`[anomaly]`, all optional). Models live under
/// `{aws.prefix}models/anomaly/{type}.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// The threshold is this quantile of the training scores (0.5 < q < 1).
    pub threshold_quantile: f64,
    /// Gaussian mixture sizes tried: 1..=max_components (best BIC).
    pub max_components: usize,
    /// Added to the covariance diagonals (standardized units), > 0.
    pub reg_covariance: f64,
    /// A type with fewer usable training records gets no model.
    pub min_samples: usize,
    /// Records per type fitted at most (a uniform sample beyond).
    pub max_samples: usize,
    /// Fields that are never features: cumulative counters, ids (`input.energy_kwh`).
    pub exclude_fields: Vec<String>,
    /// S3 objects read at once by train and scan.
    pub read_concurrency: usize,
    /// The bridge scores incoming results with the stored models (when there are any).
    pub score: bool,
    /// How often the bridge looks for newly trained models.
    pub reload_s: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            threshold_quantile: 0.995,
            max_components: 3,
            reg_covariance: 1e-3,
            min_samples: 50,
            max_samples: 200_000,
            exclude_fields: Vec::new(),
            read_concurrency: 8,
            score: true,
            reload_s: 300,
        }
    }
}

impl AnomalyConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let q = self.threshold_quantile;
        if !(q > 0.5 && q < 1.0) {
            return Err(Invalid::at(
                "anomaly.threshold_quantile",
                format!("{q} must be between 0.5 and 1 (exclusive)"),
            ));
        }
        if !(1..=10).contains(&self.max_components) {
            return Err(Invalid::at(
                "anomaly.max_components",
                "must be between 1 and 10",
            ));
        }
        if !(self.reg_covariance.is_finite() && self.reg_covariance > 0.0) {
            return Err(Invalid::at(
                "anomaly.reg_covariance",
                "must be a positive number",
            ));
        }
        if self.min_samples < 2 {
            return Err(Invalid::at("anomaly.min_samples", "must be at least 2"));
        }
        if self.max_samples < self.min_samples {
            return Err(Invalid::at(
                "anomaly.max_samples",
                "must be at least anomaly.min_samples",
            ));
        }
        for (i, f) in self.exclude_fields.iter().enumerate() {
            let ok = ["input.", "result."]
                .iter()
                .any(|p| f.strip_prefix(p).is_some_and(|n| !n.is_empty()));
            if !ok {
                return Err(Invalid::at(
                    format!("anomaly.exclude_fields[{i}]"),
                    format!("'{f}' must be input.FIELD or result.FIELD"),
                ));
            }
        }
        if self.read_concurrency == 0 {
            return Err(Invalid::at(
                "anomaly.read_concurrency",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The model fitting parameters.
    pub fn fit_params(&self) -> crate::anomaly::model::FitParams {
        crate::anomaly::model::FitParams {
            max_components: self.max_components,
            reg_covariance: self.reg_covariance,
            threshold_quantile: self.threshold_quantile,
            min_samples: self.min_samples,
        }
    }
}

pub use settings::ConfigError;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg = settings::load(path, Self::parse)?;
        if let Some(v) = cfg.verify.as_mut() {
            if v.engine_config.is_relative()
                && let Some(dir) = path.parent()
            {
                v.engine_config = dir.join(&v.engine_config);
            }
            let spec = load_engine_spec(&v.engine_config).map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("verify.engine_config: {e}"),
            })?;
            v.spec = Some(spec);
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(h) = cfg.http.as_mut() {
            for p in [&mut h.api_keys, &mut h.jwks].into_iter().flatten() {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        if let Some(i) = cfg.ingest.as_mut() {
            let spec = match &mut i.engine_config {
                Some(p) => {
                    if p.is_relative() {
                        *p = dir.join(&*p);
                    }
                    load_engine_spec(p).map_err(|e| ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message: format!("ingest.engine_config: {e}"),
                    })?
                }
                None => cfg
                    .verify
                    .as_ref()
                    .and_then(|v| v.spec.clone())
                    .ok_or_else(|| ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message: "ingest.engine_config: required (or a [verify] engine_config)"
                            .into(),
                    })?,
            };
            i.spec = Some(spec);
        }
        // Relative TLS paths are relative to the config file.
        if let (Some(m), Some(dir)) = (cfg.mqtt.as_mut(), path.parent()) {
            for p in [&mut m.ca, &mut m.cert, &mut m.key].into_iter().flatten() {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(cfg)
    }

    /// The environment variables that override the config's resource names (`lambda`: the
    /// deployed stack names its bucket, bus, table and queue; the packaged file cannot know
    /// them), each with the field it replaces.
    pub const ENV_OVERRIDES: [(&'static str, &'static str); 6] = [
        ("CLOUD_BRIDGE_BUCKET", "aws.bucket"),
        ("CLOUD_BRIDGE_PREFIX", "aws.prefix"),
        ("CLOUD_BRIDGE_EVENT_BUS", "aws.event_bus"),
        ("CLOUD_BRIDGE_TABLE", "aws.table"),
        ("CLOUD_BRIDGE_DLQ_QUEUE", "aws.dlq_queue"),
        ("CLOUD_BRIDGE_METRICS_NAMESPACE", "metrics.namespace"),
    ];

    /// This config with [`Config::ENV_OVERRIDES`] applied from `get` (set ones only), checked
    /// again; an error names the variable and its field.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Result<Config, Invalid> {
        for (var, field) in Self::ENV_OVERRIDES {
            let Some(v) = get(var) else { continue };
            let slot = match field {
                "aws.bucket" => &mut self.aws.bucket,
                "aws.prefix" => &mut self.aws.prefix,
                "aws.event_bus" => &mut self.aws.event_bus,
                "aws.table" => &mut self.aws.table,
                "aws.dlq_queue" => &mut self.aws.dlq_queue,
                _ => &mut self.metrics.namespace,
            };
            *slot = v;
        }
        self.validate().map_err(|e| {
            let var = Self::ENV_OVERRIDES
                .iter()
                .find(|(v, f)| get(v).is_some() && e.field() == Some(*f))
                .map(|(v, _)| *v);
            match (var, &e) {
                (
                    Some(v),
                    Invalid::Field {
                        field: Some(f),
                        message,
                        ..
                    },
                ) => Invalid::at(f.clone(), format!("{message} (from {v})")),
                _ => e,
            }
        })?;
        Ok(self)
    }

    /// Parses and validates; the error names the field (`aws.detail_types[1]: ...`).
    pub fn parse(text: &str) -> Result<Config, Invalid> {
        let cfg: Config = settings::from_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Invalid> {
        if let Some(m) = &self.mqtt {
            m.validate()?;
        }
        let a = &self.aws;
        for (name, v) in [
            ("aws.bucket", &a.bucket),
            ("aws.event_bus", &a.event_bus),
            ("aws.table", &a.table),
            ("aws.dlq_queue", &a.dlq_queue),
            ("aws.source", &a.source),
        ] {
            if v.is_empty() {
                return Err(Invalid::at(name, "must not be empty"));
            }
        }
        if !a.prefix.is_empty() && !a.prefix.ends_with('/') {
            return Err(Invalid::at(
                "aws.prefix",
                format!(
                    "'{}' must end with '/' (it is a key prefix folder)",
                    a.prefix
                ),
            ));
        }
        for (i, t) in a.detail_types.iter().enumerate() {
            if DetailType::parse(t).is_none() {
                return Err(Invalid::at(
                    format!("aws.detail_types[{i}]"),
                    format!(
                        "unknown detail-type '{t}' (expected one of {})",
                        DetailType::ALL.map(DetailType::as_str).join(", ")
                    ),
                ));
            }
        }
        if a.eventbridge_concurrency == 0 {
            return Err(Invalid::at(
                "aws.eventbridge_concurrency",
                "must be at least 1",
            ));
        }
        if a.eventbridge_attempts == 0 {
            return Err(Invalid::at(
                "aws.eventbridge_attempts",
                "must be at least 1",
            ));
        }
        let p = &self.pipeline;
        if p.max_object_records == 0 {
            return Err(Invalid::at(
                "pipeline.max_object_records",
                "must be at least 1",
            ));
        }
        if p.gap_recheck_ms == 0 {
            return Err(Invalid::at("pipeline.gap_recheck_ms", "must be at least 1"));
        }
        if p.claim_timeout_ms < 10_000 {
            return Err(Invalid::at(
                "pipeline.claim_timeout_ms",
                "must be at least 10000",
            ));
        }
        if let Some(v) = &self.verify
            && !(0.0..=1.0).contains(&v.sample)
        {
            return Err(Invalid::at(
                "verify.sample",
                format!("{} is not within 0..=1", v.sample),
            ));
        }
        if let Some(v) = &self.verify
            && !(v.tolerance >= 0.0 && v.tolerance.is_finite())
        {
            return Err(Invalid::at(
                "verify.tolerance",
                format!("{} must be a finite number ≥ 0", v.tolerance),
            ));
        }
        if !(self.dlq.max_per_s > 0.0 && self.dlq.max_per_s.is_finite()) {
            return Err(Invalid::at("dlq.max_per_s", "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&self.monitor.discrepancy_threshold) {
            return Err(Invalid::at(
                "monitor.discrepancy_threshold",
                format!("{} is not within 0..=1", self.monitor.discrepancy_threshold),
            ));
        }
        if self.monitor.interval_s == 0 {
            return Err(Invalid::at("monitor.interval_s", "must be at least 1"));
        }
        if self.dlq.max_receives == 0 {
            return Err(Invalid::at("dlq.max_receives", "must be at least 1"));
        }
        if self.metrics.interval_s == 0 {
            return Err(Invalid::at("metrics.interval_s", "must be at least 1"));
        }
        self.anomaly.validate()?;
        if let Some(i) = &self.ingest {
            let topic_level = !i.name.is_empty() && !i.name.contains(['/', '+', '#']);
            if !topic_level {
                return Err(Invalid::at(
                    "ingest.name",
                    format!("'{}' must be one topic level (no '/', '+', '#')", i.name),
                ));
            }
            if i.mqtt && self.mqtt.is_none() {
                return Err(Invalid::at("ingest.mqtt", "needs an [mqtt] broker"));
            }
        }
        if let Some(h) = &self.http {
            if self.ingest.is_none() {
                return Err(Invalid::at(
                    "http",
                    "needs [ingest] (the engine config the events are processed with)",
                ));
            }
            if h.api_keys.is_none() && h.jwks.is_none() {
                return Err(Invalid::at(
                    "http.api_keys",
                    "an HTTP listener needs api_keys or jwks: it never takes anonymous events",
                ));
            }
            if h.max_body_bytes == 0 {
                return Err(Invalid::at("http.max_body_bytes", "must be at least 1"));
            }
            if h.max_batch == 0 {
                return Err(Invalid::at("http.max_batch", "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Whether events of this detail-type are sent.
    pub fn sends(&self, detail_type: DetailType) -> bool {
        self.aws
            .detail_types
            .iter()
            .any(|t| t == detail_type.as_str())
    }
}

/// The engine part of an agent config (or of a file with just that part): `topic`, `limits`
/// and `event_types` at the top level, every other table ignored. Compiled once here so a typo
/// in an expression stops start-up with its path.
pub fn load_engine_spec(path: &Path) -> Result<engine::EngineSpec, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    table.retain(|k, _| matches!(k, "topic" | "limits" | "event_types"));
    let spec: engine::EngineSpec =
        settings::from_toml_value(toml::Value::Table(table)).map_err(|e| invalid(e.to_string()))?;
    engine::Engine::new(&spec).map_err(|e| invalid(e.to_string()))?;
    Ok(spec)
}

impl MqttConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if self.host.is_empty() {
            return Err(Invalid::at("mqtt.host", "must not be empty"));
        }
        if self.client_id.is_empty() {
            return Err(Invalid::at("mqtt.client_id", "must not be empty"));
        }
        if self.share_group.is_empty() || self.share_group.contains(['/', '+', '#']) {
            return Err(Invalid::at(
                "mqtt.share_group",
                format!(
                    "'{}' must be non-empty and must not contain '/', '+' or '#'",
                    self.share_group
                ),
            ));
        }
        if self.tls {
            if self.ca.is_none() {
                return Err(Invalid::at(
                    "mqtt.ca",
                    "required with TLS (set `tls = false` for plain TCP)",
                ));
            }
            match (&self.cert, &self.key) {
                (Some(_), Some(_)) | (None, None) => {}
                (Some(_), None) => return Err(Invalid::at("mqtt.key", "required with mqtt.cert")),
                (None, Some(_)) => return Err(Invalid::at("mqtt.cert", "required with mqtt.key")),
            }
        }
        if self.max_inflight == 0 {
            return Err(Invalid::at("mqtt.max_inflight", "must be at least 1"));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(Invalid::at(
                "mqtt.reconnect_max_ms",
                "must be at least reconnect_min_ms (which must be > 0)",
            ));
        }
        Ok(())
    }

    /// `$share/{group}/gateways/+/results`.
    pub fn subscription(&self) -> String {
        format!(
            "$share/{}/{}",
            self.share_group,
            proto::uplink::RESULTS_FILTER
        )
    }

    /// `$share/{group}/gateways/+/status` (`run` only: the Lambda takes results alone).
    pub fn status_subscription(&self) -> String {
        format!(
            "$share/{}/{}",
            self.share_group,
            proto::uplink::STATUS_FILTER
        )
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn env_overrides_name_the_stacks_resources() {
        let text = "[aws]\nbucket = \"b\"\nevent_bus = \"e\"\ntable = \"t\"\ndlq_queue = \"q\"\n";
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = Config::parse(text)
            .unwrap()
            .with_env(env(&[
                ("CLOUD_BRIDGE_BUCKET", "stack-results"),
                ("CLOUD_BRIDGE_TABLE", "stack-state"),
                ("CLOUD_BRIDGE_DLQ_QUEUE", "stack-dlq"),
                ("CLOUD_BRIDGE_EVENT_BUS", "stack-bus"),
                ("CLOUD_BRIDGE_PREFIX", "prod/"),
                ("CLOUD_BRIDGE_METRICS_NAMESPACE", "Stack/Bridge"),
            ]))
            .unwrap();
        assert_eq!(
            (
                c.aws.bucket.as_str(),
                c.aws.table.as_str(),
                c.aws.dlq_queue.as_str()
            ),
            ("stack-results", "stack-state", "stack-dlq")
        );
        assert_eq!(
            (c.aws.event_bus.as_str(), c.aws.prefix.as_str()),
            ("stack-bus", "prod/")
        );
        assert_eq!(c.metrics.namespace, "Stack/Bridge");
        // Unset variables leave the file's values.
        let c = Config::parse(text).unwrap().with_env(env(&[])).unwrap();
        assert_eq!(c.aws.bucket, "b");
        // A bad value is refused like the file's would be, naming the variable.
        let e = Config::parse(text)
            .unwrap()
            .with_env(env(&[("CLOUD_BRIDGE_PREFIX", "prod")]))
            .unwrap_err();
        assert_eq!(e.field(), Some("aws.prefix"));
        assert!(e.to_string().contains("CLOUD_BRIDGE_PREFIX"), "{e}");
    }

    use super::*;

    const BASE: &str = r#"
[aws]
bucket = "b"
event_bus = "bus"
table = "t"
dlq_queue = "q"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(BASE).unwrap();
        assert!(c.mqtt.is_none());
        assert_eq!(c.aws.source, "iot.edge-pipeline");
        assert_eq!(c.aws.detail_types.len(), 5);
        assert!(c.sends(DetailType::MissedEvents));
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse(&format!(
            "{BASE}detail_types = [\"EventProcessed\", \"Nope\"]"
        ))
        .unwrap_err();
        assert_eq!(e.field(), Some("aws.detail_types[1]"), "{e}");
        let e = Config::parse(&format!(
            "{BASE}\n[mqtt]\nhost = \"h\"\nclient_id = \"c\"\nport = \"x\""
        ))
        .unwrap_err();
        assert_eq!(e.field(), Some("mqtt.port"), "{e}");
        let e =
            Config::parse(&format!("{BASE}\n[mqtt]\nhost = \"h\"\nclient_id = \"c\"")).unwrap_err();
        assert!(
            e.to_string().starts_with("mqtt.ca: required with TLS"),
            "{e}"
        );
        let e = Config::parse(&format!("{BASE}\n[pipeline]\nbogus = 1")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(&BASE.replace("bucket = \"b\"", "bucket = \"\"")).unwrap_err();
        assert_eq!(e.field(), Some("aws.bucket"), "{e}");
    }

    #[test]
    fn anomaly_section_is_optional_and_checked() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.anomaly.threshold_quantile, 0.995);
        let c = Config::parse(&format!(
            "{BASE}\n[anomaly]\nthreshold_quantile = 0.999\nexclude_fields = [\"input.energy_kwh\"]"
        ))
        .unwrap();
        assert_eq!(c.anomaly.fit_params().threshold_quantile, 0.999);
        assert_eq!(c.anomaly.exclude_fields, ["input.energy_kwh"]);
        for (bad, field) in [
            ("threshold_quantile = 1.5", "anomaly.threshold_quantile:"),
            ("threshold_quantile = \"x\"", "anomaly.threshold_quantile:"),
            ("max_components = 0", "anomaly.max_components:"),
            (
                "exclude_fields = [\"energy_kwh\"]",
                "anomaly.exclude_fields[0]:",
            ),
            ("bogus = 1", "anomaly"),
        ] {
            let e = Config::parse(&format!("{BASE}\n[anomaly]\n{bad}")).unwrap_err();
            assert!(e.to_string().starts_with(field), "{bad}: {e}");
        }
    }

    #[test]
    fn plain_tcp_only_when_explicit() {
        let c = Config::parse(&format!(
            "{BASE}\n[mqtt]\nhost = \"h\"\nclient_id = \"c\"\ntls = false"
        ))
        .unwrap();
        let m = c.mqtt.unwrap();
        assert!(!m.tls);
        assert_eq!(m.subscription(), "$share/cloud-bridge/gateways/+/results");
    }
}
