//! The agent's TOML configuration, and the checks that run before anything starts.
//!
//! A bad config must stop start-up with a message naming the field, so parsing goes through
//! `serde_path_to_error` (the path of a type error) and then [`engine::Engine::new`] (the path
//! of a bad schema, rule or expression).

use std::path::{Path, PathBuf};

use engine::{Engine, EngineSpec};
use serde::Deserialize;
use settings::Invalid;

use crate::dlq::DlqConfig;
use crate::ingest::{IngestConfig, Mode};
use crate::pipeline::PipelineConfig;
use crate::store::outbox::OutboxConfig;
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

/// The agent's own top-level keys; the rest of the file is the engine's (flattened in).
const AGENT_KEYS: [&str; 9] = [
    "gateway_id",
    "data_dir",
    "broker",
    "pipeline",
    "outbox",
    "uplink",
    "dlq",
    "metrics",
    "log",
];

/// serde loses the field path inside a flattened struct: an error in the engine's part comes
/// without one. Reading that part alone names the field.
fn name_engine_field(text: &str, e: Invalid) -> Invalid {
    let Invalid::Field {
        field: None, line, ..
    } = &e
    else {
        return e;
    };
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return e;
    };
    table.retain(|k, _| !AGENT_KEYS.contains(&k));
    match settings::from_toml_value::<EngineSpec>(toml::Value::Table(table)) {
        Err(Invalid::Field {
            field: Some(field),
            message,
            ..
        }) => Invalid::Field {
            field: Some(field),
            line: *line,
            message,
        },
        _ => e,
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

pub use settings::ConfigError;

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        settings::load(path, Self::parse)
    }

    /// Parses and validates; the error names the field (`broker.embedded.listen: ...`).
    pub fn parse(text: &str) -> Result<AgentConfig, Invalid> {
        let cfg: AgentConfig = settings::from_toml(text).map_err(|e| name_engine_field(text, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.gateway_id.is_empty() || self.gateway_id.contains(['/', '+', '#']) {
            return Err(Invalid::at(
                "gateway_id",
                format!(
                    "'{}' must be non-empty and must not contain '/', '+' or '#' (it is an MQTT topic level)",
                    self.gateway_id
                ),
            ));
        }
        self.broker.validate()?;
        // The TLS files too, so `check-config` catches a missing or mismatched one (here, not
        // in `broker.validate`: the listener's builder reads the config types it would check).
        if let (Mode::Embedded, Some(tls)) = (self.broker.mode, &self.broker.embedded.tls) {
            crate::ingest::embedded::tls::server_config(tls, self.broker.embedded.auth)?;
        }
        self.uplink.validate()?;
        self.pipeline.validate()?;
        self.dlq.validate()?;
        self.engine()?;
        Ok(())
    }

    /// The engine the config describes; a bad schema, rule or expression names its path.
    pub fn engine(&self) -> Result<Engine, Invalid> {
        Engine::new(&self.engine).map_err(|e| Invalid::at(e.path, e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pipeline: &str) -> Result<AgentConfig, Invalid> {
        AgentConfig::parse(&format!(
            "gateway_id = \"gw\"\ntopic = \"devices/{{device}}/events/{{type}}\"\n\
             [pipeline]\n{pipeline}\n[event_types.m.fields]\nx = {{ type = \"number\" }}\n"
        ))
    }

    #[test]
    fn an_error_in_the_engine_part_names_its_field() {
        let e = AgentConfig::parse(
            "gateway_id = \"gw\"\ntopic = \"d/{device}/e/{type}\"\n\
             [event_types.m.fields]\nx = { type = \"numbr\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("event_types.m.fields.x.type: "), "{e}");
    }

    #[test]
    fn missed_settings_are_validated_by_name() {
        let ok = parse("").unwrap();
        assert_eq!(ok.pipeline.missed_after_s, 300);
        assert_eq!(ok.pipeline.missed_max_records, 10_000);
        assert_eq!(ok.pipeline.max_devices, 10_000);
        assert_eq!(
            parse("missed_after_s = 1").unwrap().pipeline.missed_after_s,
            1
        );
        for (bad, field) in [
            ("missed_max_records = 0", "pipeline.missed_max_records"),
            ("max_devices = 0", "pipeline.max_devices"),
            ("missed_after_s = 99999999", "pipeline.missed_after_s"),
            ("missed_after_s = -1", "pipeline.missed_after_s"),
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.field(), Some(field), "{bad}: {err}");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
    }

    #[test]
    fn an_engine_error_names_its_path() {
        let err = AgentConfig::parse(
            "gateway_id = \"gw\"\ntopic = \"devices/{device}/events/{type}\"\n\
             [event_types.m.fields]\nx = { type = \"number\" }\n\
             [[event_types.m.calc]]\nname = \"y\"\nexpr = \"nope * 2\"\n",
        )
        .unwrap_err();
        assert!(
            err.field()
                .is_some_and(|f| f.starts_with("event_types.m.calc")),
            "{err}"
        );
    }
}
