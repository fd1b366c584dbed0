//! Reloading the config without a restart (`SIGHUP`, `systemctl reload edge-agent`).
//!
//! The file is read and validated as `check-config` does it, the engine compiled; a bad file
//! is refused with the field named and the running config stays. A good one is applied where
//! it can be while running: the engine (event types, rules, calculations, detectors) is
//! swapped by the pipeline thread between two batches, so every result is made by exactly one
//! engine and says which (`calc_version`); the uplink reconnects with its new settings. What
//! only a restart can change (the listeners, the store, the gateway's name) is named in the
//! log and in `status`, and keeps its old value until then.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

/// The agent's own top-level sections that only take effect at a restart; every other
/// top-level key but `uplink` belongs to the engine.
const RESTART_KEYS: [&str; 8] = [
    "gateway_id",
    "data_dir",
    "broker",
    "pipeline",
    "outbox",
    "dlq",
    "metrics",
    "log",
];

/// A config file as read and validated, with what reloads compare.
#[derive(Debug)]
pub struct Loaded {
    pub cfg: AgentConfig,
    pub engine: engine::Engine,
    table: toml::Table,
    /// FNV-1a of the file's bytes (hex): which file the agent runs, for `status`.
    pub hash: String,
}

impl Loaded {
    /// Reads, validates and compiles `path`; the error names the file and the field.
    pub fn read(path: &Path) -> Result<Loaded, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let cfg = AgentConfig::load(path).map_err(|e| e.to_string())?;
        let engine = cfg
            .engine()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Loaded {
            cfg,
            engine,
            table,
            hash: hash(text.as_bytes()),
        })
    }

    /// What differs from `self` (running) in `next`; refused when it changes what a running
    /// agent cannot (the topic pattern: the endpoint's ACL and the broker subscription use it).
    pub fn changes(&self, next: &Loaded) -> Result<Changes, String> {
        if self.cfg.engine.topic != next.cfg.engine.topic {
            return Err(format!(
                "topic: '{}' → '{}' changes the device ACL and the broker subscription: \
                 restart the agent to change it (the running config stays)",
                self.cfg.engine.topic, next.cfg.engine.topic
            ));
        }
        Ok(changes(&self.table, &next.table))
    }

    /// Takes `running`'s sections that only a restart changes, so the next reload still sees
    /// them as changed (and `status` as pending) until the agent restarts.
    pub fn keep_running(&mut self, running: &Loaded) {
        for k in RESTART_KEYS {
            match running.table.get(k) {
                Some(v) => self.table.insert(k.to_string(), v.clone()),
                None => self.table.remove(k),
            };
        }
    }

    /// The calculation versions of the engine, `type=version` in type order.
    pub fn calc_versions(&self) -> Vec<String> {
        let mut types: Vec<&String> = self.cfg.engine.event_types.keys().collect();
        types.sort();
        types
            .into_iter()
            .filter_map(|t| Some(format!("{t}={}", self.engine.calc_version(t)?)))
            .collect()
    }
}

/// What a reload changes, by top-level section.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The engine's part (topic, limits, event types, detectors): swapped between batches.
    pub engine: bool,
    /// `[uplink]`: the uplink reconnects.
    pub uplink: bool,
    /// Sections that take effect at the next restart.
    pub restart: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.engine && !self.uplink && self.restart.is_empty()
    }
}

fn changes(old: &toml::Table, new: &toml::Table) -> Changes {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Changes::default();
    for k in keys {
        if old.get(k) == new.get(k) {
            continue;
        }
        match k.as_str() {
            "uplink" => out.uplink = true,
            k if RESTART_KEYS.contains(&k) => out.restart.push(k.to_string()),
            _ => out.engine = true,
        }
    }
    out
}

/// The config the agent runs and how its reloads went, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigInfo {
    /// FNV-1a of the running file's bytes.
    pub hash: String,
    #[serde(with = "proto::timestamp::rfc3339")]
    pub loaded_at: i64,
    /// Reloads applied and refused since start.
    pub reloads: u64,
    pub refused: u64,
    /// The last refusal's reason (the field named), while the old config runs.
    pub last_refusal: Option<String>,
    /// Changed sections that wait for a restart.
    pub pending_restart: Vec<String>,
}

fn hash(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn sections_are_told_apart() {
        let old = table(
            "gateway_id = \"gw\"\ntopic = \"d/{device}/e/{type}\"\n[uplink]\nhost = \"a\"\n\
             [broker]\nmode = \"embedded\"\n[event_types.m.fields]\nx = { type = \"number\" }\n",
        );
        assert!(changes(&old, &old).is_empty());
        let mut new = old.clone();
        new["uplink"]["host"] = "b".into();
        assert_eq!(
            changes(&old, &new),
            Changes {
                uplink: true,
                ..Changes::default()
            }
        );
        let mut new = old.clone();
        new["event_types"]["m"]["fields"]
            .as_table_mut()
            .unwrap()
            .insert("y".into(), table("type = \"number\"").into());
        new["broker"]["mode"] = "external".into();
        let c = changes(&old, &new);
        assert!(c.engine && !c.uplink, "{c:?}");
        assert_eq!(c.restart, ["broker"]);
        // A section added or removed counts as changed.
        let mut new = old.clone();
        new.insert("log".into(), table("level = \"debug\"").into());
        new.remove("topic");
        let c = changes(&old, &new);
        assert!(c.engine);
        assert_eq!(c.restart, ["log"]);
    }

    #[test]
    fn the_hash_is_the_file_s() {
        assert_eq!(hash(b""), "cbf29ce484222325");
        assert_ne!(hash(b"a = 1\n"), hash(b"a = 2\n"));
    }
}
