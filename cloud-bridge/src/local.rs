//! The local backend: the bridge's cloud in a directory, for `edge-agent demo` and for trying
//! the pipeline without an AWS account.
//!
//! - objects: `dir/{key}` — the same layout as the S3 bucket (`events/dt=…/gateway=…/….ndjson`,
//!   `failures/…`), each written to a temporary file and renamed, so a reader never sees half
//!   an object;
//! - state: `dir/state/bridge-state.json`, the DynamoDB item of every gateway (hwm, claim,
//!   garbage) and the missed ranges, rewritten (temporary file + rename) on every change, under
//!   an in-process lock: one bridge process per directory; the announced missed-event records
//!   of gateways as files `dir/state/missed-devices/{gateway hex}-{id}` created with `O_EXCL`
//!   (`pending`, then `sent` once EventBridge took the MissedEvents);
//! - events: one JSON line per event, as EventBridge would deliver it, appended to
//!   `dir/eventbridge/dt=YYYY-MM-DD/{detail-type}.ndjson`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::backend::{
    Announce, BoxFuture, Claim, Entry, EventPublisher, GatewayState, ObjectStore, StateStore,
};

/// Objects as files under a directory.
#[derive(Debug)]
pub struct LocalObjects {
    root: PathBuf,
    /// Serialises conditional rewrites (one process owns the directory).
    rewrite: std::sync::Mutex<()>,
}

impl LocalObjects {
    pub fn new(root: &Path) -> anyhow::Result<LocalObjects> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(LocalObjects {
            root: root.to_path_buf(),
            rewrite: std::sync::Mutex::new(()),
        })
    }

    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            bail!("object key '{key}' is not a relative path");
        }
        Ok(self.root.join(key))
    }

    fn put_sync(&self, key: &str, body: &[u8]) -> anyhow::Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing {}", path.display()))
    }

    fn delete_sync(&self, key: &str) -> anyhow::Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("deleting {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    fn list_sync(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // temporary files
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if e.file_type()?.is_dir() {
                    walk(&e.path(), &key, out)?;
                } else {
                    out.push(key);
                }
            }
            Ok(())
        }
        let mut keys = Vec::new();
        walk(&self.root, "", &mut keys)
            .with_context(|| format!("listing {}", self.root.display()))?;
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
        Ok(keys)
    }
}

impl ObjectStore for LocalObjects {
    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.put_sync(key, &body) })
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.delete_sync(key) })
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move { self.list_sync(prefix) })
    }
    fn location(&self) -> String {
        self.root.display().to_string()
    }
    fn get_versioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<(Vec<u8>, String)>> {
        Box::pin(async move { self.get_versioned_sync(key) })
    }
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        _: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let _one = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
            match self.get_versioned_sync(key)? {
                Some((_, now)) if now == etag => self.put_sync(key, &body).map(|()| true),
                _ => Ok(false),
            }
        })
    }
}

impl LocalObjects {
    fn get_versioned_sync(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, String)>> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(body) => {
                // A version tag from the content, as S3's ETag of a one-part upload is its MD5.
                let etag = format!("{:016x}", crate::fnv1a(&body));
                Ok(Some((body, etag)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// One gateway's item, as in the DynamoDB table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Item {
    hwm: u64,
    claim: Option<Claim>,
    #[serde(default)]
    garbage: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Missed {
    gateway: String,
    from: u64,
    to: u64,
    at: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    gateways: BTreeMap<String, Item>,
    #[serde(default)]
    missed: Vec<Missed>,
}

/// The per-gateway state in a JSON file, with DynamoDB's conditions (see [`StateStore`]).
#[derive(Debug)]
pub struct LocalState {
    path: PathBuf,
    state: Mutex<StateFile>,
}

impl LocalState {
    /// Opens (or starts) `dir/bridge-state.json`.
    pub fn open(dir: &Path) -> anyhow::Result<LocalState> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("bridge-state.json");
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{}: not a bridge state file", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(LocalState {
            path,
            state: Mutex::new(state),
        })
    }

    /// Runs `f` on the state under the lock; saves the file when `f` returns true.
    fn update(&self, f: impl FnOnce(&mut StateFile) -> bool) -> anyhow::Result<bool> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !f(&mut st) {
            return Ok(false);
        }
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&*st)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().with_context(|| format!("writing {}", self.path.display()))?;
        Ok(true)
    }

    fn read_sync(&self, gateway: &str) -> GatewayState {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.gateways.get(gateway) {
            None => GatewayState::default(),
            Some(i) => GatewayState {
                hwm: i.hwm,
                exists: true,
                claim: i.claim.clone(),
                garbage: i.garbage.clone(),
            },
        }
    }
}

/// The condition of `claim` and `skip`: the state is still what was seen, with no claim and
/// no garbage (or still absent).
fn unchanged(item: Option<&Item>, seen: &GatewayState) -> bool {
    match (item, seen.exists) {
        (None, false) => true,
        (Some(i), true) => i.hwm == seen.hwm && i.claim.is_none() && i.garbage.is_empty(),
        _ => false,
    }
}

fn holds(item: Option<&Item>, claim: &Claim) -> bool {
    item.and_then(|i| i.claim.as_ref())
        .is_some_and(|c| c.key == claim.key)
}

impl StateStore for LocalState {
    fn read<'a>(&'a self, gateway: &'a str) -> BoxFuture<'a, GatewayState> {
        Box::pin(async move { Ok(self.read_sync(gateway)) })
    }

    fn claim<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        claim: &'a Claim,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.update(|st| {
                if !unchanged(st.gateways.get(gateway), seen) {
                    return false;
                }
                let item = st.gateways.entry(gateway.to_string()).or_insert(Item {
                    hwm: seen.hwm,
                    ..Item::default()
                });
                item.claim = Some(claim.clone());
                true
            })
        })
    }

    fn refresh<'a>(&'a self, gateway: &'a str, claim: &'a Claim, at: i64) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.update(|st| match st.gateways.get_mut(gateway) {
                Some(i) if holds(Some(i), claim) => {
                    if let Some(c) = &mut i.claim {
                        c.at = at;
                    }
                    true
                }
                _ => false,
            })
        })
    }

    fn commit<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.update(|st| match st.gateways.get_mut(gateway) {
                Some(i) if holds(Some(i), claim) && i.hwm + 1 == claim.from => {
                    i.hwm = claim.to;
                    i.claim = None;
                    true
                }
                _ => false,
            })
        })
    }

    fn take_over<'a>(&'a self, gateway: &'a str, claim: &'a Claim) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.update(|st| match st.gateways.get_mut(gateway) {
                Some(i)
                    if i.claim
                        .as_ref()
                        .is_some_and(|c| c.key == claim.key && c.at == claim.at) =>
                {
                    i.claim = None;
                    if !i.garbage.contains(&claim.key) {
                        i.garbage.push(claim.key.clone());
                    }
                    true
                }
                _ => false,
            })
        })
    }

    fn clear_garbage<'a>(&'a self, gateway: &'a str, keys: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.update(|st| match st.gateways.get_mut(gateway) {
                Some(i) => {
                    i.garbage.retain(|k| !keys.contains(k));
                    true
                }
                None => false,
            })
            .map(|_| ())
        })
    }

    fn skip<'a>(
        &'a self,
        gateway: &'a str,
        seen: &'a GatewayState,
        from: u64,
        to: u64,
        now: i64,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.update(|st| {
                if !unchanged(st.gateways.get(gateway), seen) {
                    return false;
                }
                st.gateways.entry(gateway.to_string()).or_default().hwm = to;
                st.missed.push(Missed {
                    gateway: gateway.to_string(),
                    from,
                    to,
                    at: now,
                });
                true
            })
        })
    }

    /// One process: a `pending` file is a failed or crashed attempt of this bridge, so it is
    /// taken over at once.
    fn begin_announce<'a>(
        &'a self,
        gateway: &'a str,
        id: u64,
        _owner: &'a str,
        _now: i64,
        _stale_before: i64,
    ) -> BoxFuture<'a, Announce> {
        Box::pin(async move {
            let path = self.announce_path(gateway, id)?;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(b"pending")
                        .and_then(|()| f.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    Ok(Announce::Mine)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let body = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Ok(if body == b"sent" {
                        Announce::Done
                    } else {
                        Announce::Mine
                    })
                }
                Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
            }
        })
    }

    fn end_announce<'a>(&'a self, gateway: &'a str, id: u64) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let path = self.announce_path(gateway, id)?;
            let tmp = path.with_extension("tmp");
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(b"sent")?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            write().with_context(|| format!("writing {}", path.display()))
        })
    }
}

impl LocalState {
    /// `missed-devices/{hex of the gateway id}-{id}`: any gateway id is one safe file name.
    fn announce_path(&self, gateway: &str, id: u64) -> anyhow::Result<PathBuf> {
        let dir = self
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join("missed-devices");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!("{}-{id}", crate::hex_name(gateway))))
    }
}

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
        let day = self
            .dir
            .join(format!("dt={}", crate::pipeline::date_of(now)));
        std::fs::create_dir_all(&day).with_context(|| format!("creating {}", day.display()))?;
        let mut by_type: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for (t, detail) in entries {
            let detail: Value =
                serde_json::from_str(detail).unwrap_or(Value::String(detail.clone()));
            let line = json!({
                "time": now,
                "source": self.source,
                "event-bus": self.bus,
                "detail-type": t,
                "detail": detail,
            });
            let buf = by_type.entry(t).or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(from: u64, to: u64, key: &str) -> Claim {
        Claim {
            from,
            to,
            key: key.into(),
            at: 1,
            owner: "t".into(),
        }
    }

    #[tokio::test]
    async fn state_conditions_match_the_dynamodb_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalState::open(dir.path()).unwrap();
        let fresh = s.read("g").await.unwrap();
        assert!(!fresh.exists);
        let c1 = claim(1, 10, "k1");
        assert!(s.claim("g", &fresh, &c1).await.unwrap());
        assert!(!s.claim("g", &fresh, &c1).await.unwrap(), "state changed");
        let st = s.read("g").await.unwrap();
        assert_eq!(st.claim.as_ref(), Some(&c1));
        assert!(
            !s.claim("g", &st, &claim(1, 5, "k2")).await.unwrap(),
            "claimed"
        );
        assert!(!s.commit("g", &claim(1, 10, "other")).await.unwrap());
        assert!(s.commit("g", &c1).await.unwrap());
        assert!(!s.commit("g", &c1).await.unwrap(), "claim gone");
        let st = s.read("g").await.unwrap();
        assert_eq!((st.hwm, st.claim.is_none()), (10, true));

        // A stale claim taken over: its key becomes garbage, which blocks the next claim.
        let c2 = claim(11, 20, "k2");
        assert!(s.claim("g", &st, &c2).await.unwrap());
        assert!(s.take_over("g", &c2).await.unwrap());
        let st = s.read("g").await.unwrap();
        assert_eq!(st.garbage, vec!["k2".to_string()]);
        assert!(!s.claim("g", &st, &claim(11, 12, "k3")).await.unwrap());
        s.clear_garbage("g", &st.garbage).await.unwrap();
        let st = s.read("g").await.unwrap();
        assert!(s.skip("g", &st, 11, 15, 7).await.unwrap());
        drop(s);

        // It survives a restart.
        let s = LocalState::open(dir.path()).unwrap();
        let st = s.read("g").await.unwrap();
        assert_eq!((st.hwm, st.exists), (15, true));
    }

    #[tokio::test]
    async fn objects_round_trip_and_refuse_escaping_keys() {
        let dir = tempfile::tempdir().unwrap();
        let o = LocalObjects::new(dir.path()).unwrap();
        o.put(
            "events/dt=2026-01-01/gateway=g/a.ndjson",
            b"x\n".to_vec(),
            "t",
        )
        .await
        .unwrap();
        o.put("failures/b.json", b"{}".to_vec(), "t").await.unwrap();
        assert_eq!(
            o.list("events/").await.unwrap(),
            vec!["events/dt=2026-01-01/gateway=g/a.ndjson".to_string()]
        );
        assert_eq!(
            o.get("failures/b.json").await.unwrap().as_deref(),
            Some(&b"{}"[..])
        );
        o.delete("failures/b.json").await.unwrap();
        o.delete("failures/b.json").await.unwrap();
        assert!(o.get("failures/b.json").await.unwrap().is_none());
        assert!(o.list("failures/").await.unwrap().is_empty());
        assert!(o.put("../x", vec![], "t").await.is_err());
        assert!(o.put("/x", vec![], "t").await.is_err());
    }
}
