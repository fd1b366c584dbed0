//! The agent's TOML configuration, and the checks that run before anything starts.
//!
//! A bad config must stop start-up with a message naming the field, so parsing goes through
//! `serde_path_to_error` (the path of a type error) and then [`engine::Engine::new`] (the path
//! of a bad schema, rule or expression).

use std::path::{Path, PathBuf};

use engine::{Engine, EngineSpec};
use serde::Deserialize;

use crate::dlq::DlqConfig;
use crate::ingest::IngestConfig;
use crate::outbox::OutboxConfig;
use crate::pipeline::PipelineConfig;
use crate::telemetry::{LogConfig, MetricsConfig};
use crate::uplink::UplinkConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Names this gateway in every result (`gateway`) and in the uplink topics.
    pub gateway_id: String,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub broker: IngestConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub uplink: UplinkConfig,
    /// The local dead-letter queue: cap, full policy, automatic retries.
    #[serde(default)]
    pub dlq: DlqConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Topic pattern, limits and event types: what the engine validates and calculates.
    #[serde(flatten)]
    pub engine: EngineSpec,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and validates; the error names the field (`broker.embedded.listen: ...`).
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
        let cfg: AgentConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().message().to_string();
            if path == "." || path.is_empty() {
                inner
            } else {
                format!("{path}: {inner}")
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.gateway_id.is_empty() || self.gateway_id.contains(['/', '+', '#']) {
            return Err(format!(
                "gateway_id: '{}' must be non-empty and must not contain '/', '+' or '#' (it is an MQTT topic level)",
                self.gateway_id
            ));
        }
        self.broker.validate().map_err(|e| e.to_string())?;
        self.uplink.validate()?;
        self.pipeline.validate()?;
        self.dlq.validate()?;
        self.engine()?;
        Ok(())
    }

    pub fn engine(&self) -> Result<Engine, String> {
        Engine::new(&self.engine).map_err(|e| e.to_string())
    }
}
