//! The per-gateway state in `dir/state/bridge-state.json`: the DynamoDB item of every gateway
//! (hwm, claim, garbage) and the missed ranges, rewritten (temporary file + rename) on every
//! change, under an in-process lock: one bridge process per directory. The announced
//! missed-event records of gateways are files `dir/state/missed-devices/{gateway hex}-{id}`
//! created with `O_EXCL` (`pending`, then `sent` once EventBridge took the MissedEvents).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::backend::{Announce, BoxFuture, Claim, GatewayState, Notice, StateStore};

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
        notice: Notice,
        _owner: &'a str,
        _now: i64,
        _stale_before: i64,
    ) -> BoxFuture<'a, Announce> {
        Box::pin(async move {
            let path = self.announce_path(gateway, notice)?;
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

    fn end_announce<'a>(&'a self, gateway: &'a str, notice: Notice) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let path = self.announce_path(gateway, notice)?;
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
    /// `missed-devices/{hex of the gateway id}-{id}` (a missed-event record) or
    /// `quarantines/{hex}-{at}`: any gateway id is one safe file name.
    fn announce_path(&self, gateway: &str, notice: Notice) -> anyhow::Result<PathBuf> {
        let folder = match notice {
            Notice::Missed(_) => "missed-devices",
            Notice::Quarantine(_) => "quarantines",
        };
        let dir = self.path.parent().unwrap_or(Path::new(".")).join(folder);
        let id = notice.number();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!("{}-{id}", crate::hex_name(gateway))))
    }
}
