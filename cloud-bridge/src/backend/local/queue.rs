//! The DLQ as a directory of JSON files (the local backend: one process).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::backend::{BoxFuture, DeadLetterQueue, Received};
use crate::dlq::DlqMessage;

#[derive(Debug)]
pub struct DirQueue {
    dir: PathBuf,
    /// File name → (invisible until, times received), in this process.
    seen: Mutex<HashMap<String, (Instant, u32)>>,
}

impl DirQueue {
    pub fn open(dir: &Path) -> anyhow::Result<DirQueue> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(DirQueue {
            dir: dir.to_path_buf(),
            seen: Mutex::new(HashMap::new()),
        })
    }

    fn names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort();
        Ok(names)
    }

    fn send_sync(&self, messages: &[DlqMessage]) -> anyhow::Result<()> {
        for m in messages {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let name = format!("{now:024}-{}.json", crate::hex_name(&m.id));
            let tmp = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(m)?)
                .and_then(|()| std::fs::rename(&tmp, self.dir.join(&name)))
                .with_context(|| format!("writing {}", self.dir.join(&name).display()))?;
        }
        Ok(())
    }

    fn receive_sync(&self, max: i32, visibility_s: i32) -> anyhow::Result<Vec<Received>> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for name in self.names()? {
            if out.len() >= max.max(1) as usize {
                break;
            }
            let slot = seen.entry(name.clone()).or_insert((now, 0));
            if slot.0 > now {
                continue;
            }
            let body = match std::fs::read_to_string(self.dir.join(&name)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {name}")),
            };
            *slot = (
                now + Duration::from_secs(visibility_s.max(0) as u64),
                slot.1 + 1,
            );
            out.push(Received {
                body,
                receipt: name.clone(),
                receive_count: slot.1,
                message_id: name,
            });
        }
        Ok(out)
    }
}

impl DeadLetterQueue for DirQueue {
    fn send<'a>(&'a self, messages: &'a [DlqMessage]) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.send_sync(messages) })
    }
    fn receive(&self, max: i32, wait_s: i32, visibility_s: i32) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            let got = self.receive_sync(max, visibility_s)?;
            if got.is_empty() && wait_s > 0 {
                // A short poll stands in for SQS's long poll.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(got)
        })
    }
    fn delete<'a>(&'a self, receipt: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(receipt);
            match std::fs::remove_file(self.dir.join(receipt)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("deleting {receipt}"))
                }
                _ => Ok(()),
            }
        })
    }
    fn depth(&self) -> BoxFuture<'_, (u64, u64)> {
        Box::pin(async move {
            let now = Instant::now();
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let names = self.names()?;
            let hidden = names
                .iter()
                .filter(|n| seen.get(*n).is_some_and(|s| s.0 > now))
                .count() as u64;
            Ok((names.len() as u64 - hidden, hidden))
        })
    }
    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}
