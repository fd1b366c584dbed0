//! Gateway-less devices' state in `dir/state/devices/{ingest hex}-{device hex}.json`, one
//! file per device (temporary file + fsync + rename), with DynamoDB's version condition
//! under an in-process lock: one bridge process per directory. The sweep's work list is a scan
//! of the directory (the local backend serves one machine's devices).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::backend::{BoxFuture, DeviceItem, DeviceStore, Entry, decode_entries, encode_entries};
use crate::{hex_name, unhex_name};

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u64,
    /// Base64 of the CBOR state.
    state: String,
    #[serde(default)]
    unsent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due: Option<i64>,
}

#[derive(Debug)]
pub struct DirDevices {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl DirDevices {
    pub fn open(dir: &Path) -> anyhow::Result<DirDevices> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(DirDevices {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    fn path(&self, ingest: &str, device: &str) -> PathBuf {
        self.dir
            .join(format!("{}-{}.json", hex_name(ingest), hex_name(device)))
    }

    /// The file at `path`; `None` if there is none.
    fn read_file(path: &Path) -> anyhow::Result<Option<File>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{}: not a device state file", path.display()))
    }

    fn load(&self, path: &Path) -> anyhow::Result<DeviceItem> {
        let Some(f) = Self::read_file(path)? else {
            return Ok(DeviceItem::default());
        };
        Ok(DeviceItem {
            version: f.version,
            state: base64::engine::general_purpose::STANDARD
                .decode(&f.state)
                .with_context(|| format!("{}: state is not base64", path.display()))?,
            unsent: if f.unsent.is_empty() {
                Vec::new()
            } else {
                decode_entries(&f.unsent)?
            },
            due: f.due,
        })
    }

    fn store(&self, path: &Path, f: &File) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec(f)?;
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&body)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().with_context(|| format!("writing {}", path.display()))
    }
}

impl DeviceStore for DirDevices {
    fn read<'a>(&'a self, ingest: &'a str, device: &'a str) -> BoxFuture<'a, DeviceItem> {
        Box::pin(async move {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.load(&self.path(ingest, device))
        })
    }

    fn commit<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        seen: u64,
        state: &'a [u8],
        unsent: &'a [Entry],
        due: Option<i64>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let path = self.path(ingest, device);
            if self.load(&path)?.version != seen {
                return Ok(false);
            }
            self.store(
                &path,
                &File {
                    version: seen + 1,
                    state: base64::engine::general_purpose::STANDARD.encode(state),
                    unsent: if unsent.is_empty() {
                        String::new()
                    } else {
                        encode_entries(unsent)
                    },
                    due,
                },
            )?;
            Ok(true)
        })
    }

    fn clear_unsent<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
        due: Option<i64>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let path = self.path(ingest, device);
            let item = self.load(&path)?;
            if item.version != version || version == 0 {
                return Ok(false);
            }
            self.store(
                &path,
                &File {
                    version,
                    state: base64::engine::general_purpose::STANDARD.encode(&item.state),
                    unsent: String::new(),
                    due,
                },
            )?;
            Ok(true)
        })
    }

    fn mark_due<'a>(
        &'a self,
        ingest: &'a str,
        device: &'a str,
        version: u64,
        due: i64,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let path = self.path(ingest, device);
            let Some(mut f) = Self::read_file(&path)?.filter(|f| f.version == version) else {
                return Ok(false);
            };
            f.due = Some(due);
            self.store(&path, &f)?;
            Ok(true)
        })
    }

    fn due<'a>(&'a self, ingest: &'a str, now: i64, limit: usize) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let prefix = format!("{}-", hex_name(ingest));
            let entries = std::fs::read_dir(&self.dir)
                .with_context(|| format!("listing {}", self.dir.display()))?;
            let mut out = Vec::new();
            for entry in entries {
                let path = entry?.path();
                let Some(device) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix)?.strip_suffix(".json"))
                    .and_then(unhex_name)
                else {
                    continue;
                };
                if self.load(&path)?.due.is_some_and(|d| d <= now) {
                    out.push(device);
                    if out.len() == limit {
                        break;
                    }
                }
            }
            out.sort();
            Ok(out)
        })
    }
}
