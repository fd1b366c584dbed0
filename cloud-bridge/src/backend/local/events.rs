//! Events as EventBridge would deliver them, one JSON line each, appended to
//! `dir/eventbridge/dt=YYYY-MM-DD/{detail-type}.ndjson`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::backend::{BoxFuture, Entry, EventPublisher};

/// Events appended as JSON lines, one file per day and detail-type.
#[derive(Debug)]
pub struct LocalEvents {
    dir: PathBuf,
    source: String,
    bus: String,
    lock: Mutex<()>,
}

impl LocalEvents {
    pub fn new(dir: &Path, source: &str, bus: &str) -> anyhow::Result<LocalEvents> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(LocalEvents {
            dir: dir.to_path_buf(),
            source: source.into(),
            bus: bus.into(),
            lock: Mutex::new(()),
        })
    }

    fn append(&self, entries: &[Entry]) -> anyhow::Result<()> {
        let now = crate::now_ms();
        let day = self.dir.join(format!("dt={}", crate::layout::date_of(now)));
        std::fs::create_dir_all(&day).with_context(|| format!("creating {}", day.display()))?;
        let mut by_type: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for (t, detail) in entries {
            let detail: Value =
                serde_json::from_str(detail).unwrap_or(Value::String(detail.clone()));
            let line = json!({
                "time": now,
                "source": self.source,
                "event-bus": self.bus,
                "detail-type": t.as_str(),
                "detail": detail,
            });
            let buf = by_type.entry(t.as_str()).or_default();
            serde_json::to_writer(&mut *buf, &line)?;
            buf.push(b'\n');
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        for (t, lines) in by_type {
            let path = day.join(format!("{t}.ndjson"));
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(&lines))
                .with_context(|| format!("appending to {}", path.display()))?;
        }
        Ok(())
    }
}

impl EventPublisher for LocalEvents {
    fn put_events(&self, entries: Vec<Entry>) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.append(&entries) })
    }
}
