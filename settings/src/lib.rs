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

/// A config text that does not make a config, saying where: the line of a syntax error, the
/// field of a value that does not fit its type or breaks a binary's own rule. Its text is what
/// a person reads at start-up (`mqtt.port: invalid type: string "x", expected u16`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not TOML at all; the parser's own message, which names the line and column.
    #[error("{message}")]
    Syntax {
        /// 1-based, when the parser says where.
        line: Option<usize>,
        message: String,
    },
    /// Well-formed TOML whose value at `field` does not fit the config.
    #[error("{}", at_field(field.as_deref(), message))]
    Field {
        /// The path (`aws.detail_types[1]`); `None` for the top level.
        field: Option<String>,
        /// 1-based, when the value came from a text and the parser says where.
        line: Option<usize>,
        message: String,
    },
}

impl Invalid {
    /// A value that deserialized but breaks a rule of the binary reading it
    /// (`Invalid::at("uplink.host", "must not be empty")`).
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid::Field {
            field: Some(field.into()),
            line: None,
            message: message.into(),
        }
    }

    /// The path of the field at fault, if it is one field's.
    pub fn field(&self) -> Option<&str> {
        match self {
            Invalid::Field { field, .. } => field.as_deref(),
            Invalid::Syntax { .. } => None,
        }
    }

    /// The 1-based line at fault, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Invalid::Syntax { line, .. } | Invalid::Field { line, .. } => *line,
        }
    }
}

fn at_field(field: Option<&str>, message: &str) -> String {
    match field {
        Some(f) => format!("{f}: {message}"),
        None => message.to_string(),
    }
}

/// Reads `path` and hands its text to `parse` (which names the field of any problem).
pub fn load<T, E: std::fmt::Display>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Deserializes TOML text; an error names the field (`aws.detail_types[1]: ...`) or the line.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, Invalid> {
    let line = |e: &toml::de::Error| {
        e.span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let de = toml::Deserializer::parse(text).map_err(|e| Invalid::Syntax {
        line: line(&e),
        message: e.to_string(),
    })?;
    named(serde_path_to_error::deserialize(de), line)
}

/// Deserializes a TOML value (a part of a file); an error names the field.
pub fn from_toml_value<T: DeserializeOwned>(value: toml::Value) -> Result<T, Invalid> {
    named(serde_path_to_error::deserialize(value), |_| None)
}

fn named<T>(
    r: Result<T, serde_path_to_error::Error<toml::de::Error>>,
    line: impl Fn(&toml::de::Error) -> Option<usize>,
) -> Result<T, Invalid> {
    r.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Invalid::Field {
            field: (path != "." && !path.is_empty()).then_some(path),
            line: line(&inner),
            message: inner.message().to_string(),
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
        assert!(e.to_string().starts_with("port: invalid type"), "{e}");
        assert_eq!((e.field(), e.line()), (Some("port"), Some(1)));
        let e = from_toml::<Cfg>("port = 1\n[log]\nformat = \"xml\"").unwrap_err();
        assert!(
            e.to_string().starts_with("log.format: unknown variant"),
            "{e}"
        );
        assert_eq!((e.field(), e.line()), (Some("log.format"), Some(3)));
        let c: Cfg = from_toml("port = 1").unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        let e = load(Path::new("/nonexistent.toml"), from_toml::<Cfg>).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read /nonexistent.toml"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("settings-test-{}", std::process::id()));
        std::fs::write(&dir, "port = 70000").unwrap();
        let e = load(&dir, from_toml::<Cfg>).unwrap_err();
        assert!(e.to_string().contains(": port: invalid value"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = from_toml::<Cfg>("port = 1\n[log\n").unwrap_err();
        assert!(matches!(e, Invalid::Syntax { .. }), "{e:?}");
        assert_eq!(e.line(), Some(2));
        assert!(e.to_string().contains("line 2"), "{e}");
        assert_eq!(e.field(), None);
    }

    #[test]
    fn values_name_the_field_without_a_line() {
        let v: toml::Value = toml::from_str("port = -1").unwrap();
        let e = from_toml_value::<Cfg>(v).unwrap_err();
        assert_eq!(e.field(), Some("port"));
        assert_eq!(e.line(), None);
        assert!(e.to_string().starts_with("port: invalid value"), "{e}");
        // A problem of the whole document names no field and reads as the bare message.
        let v: toml::Value = toml::from_str("log = {}").unwrap();
        let e = from_toml_value::<Cfg>(v).unwrap_err();
        assert_eq!(e.field(), None);
        assert_eq!(e.to_string(), "missing field `port`");
    }
}
