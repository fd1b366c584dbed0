//! How the binaries (`edge-agent`, `cloud-bridge`) read their TOML config files.
//!
//! A bad config stops start-up with a message that names the file and the field
//! (`config.toml: mqtt.port: invalid type: string "x", expected u16`): TOML is deserialized
//! through `serde_path_to_error`, and each binary's own checks name their fields the same way.
//! The `[log]` section has the same shape in both.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

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

/// Reads `path` and hands its text to `parse` (which names the field of any problem).
pub fn load<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

/// Deserializes TOML text; an error names the field (`aws.detail_types[1]: ...`).
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    named(serde_path_to_error::deserialize(de))
}

/// Deserializes a TOML value (a part of a file); an error names the field.
pub fn from_toml_value<T: DeserializeOwned>(value: toml::Value) -> Result<T, String> {
    named(serde_path_to_error::deserialize(value))
}

fn named<T>(r: Result<T, serde_path_to_error::Error<toml::de::Error>>) -> Result<T, String> {
    r.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().message().to_string();
        if path == "." || path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`: logs go to stderr.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[allow(dead_code)]
        port: u16,
        #[serde(default)]
        log: LogConfig,
    }

    #[test]
    fn errors_name_the_field_and_the_file() {
        let e = from_toml::<Cfg>("port = \"x\"").unwrap_err();
        assert!(e.starts_with("port: invalid type"), "{e}");
        let e = from_toml::<Cfg>("port = 1\n[log]\nformat = \"xml\"").unwrap_err();
        assert!(e.starts_with("log.format: unknown variant"), "{e}");
        let c: Cfg = from_toml("port = 1").unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        let e = load::<Cfg>(Path::new("/nonexistent.toml"), from_toml).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read /nonexistent.toml"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("settings-test-{}", std::process::id()));
        std::fs::write(&dir, "port = 70000").unwrap();
        let e = load::<Cfg>(&dir, from_toml).unwrap_err();
        assert!(e.to_string().contains(": port: invalid value"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }
}
