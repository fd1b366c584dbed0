//! A damaged store never stops the gateway.
//!
//! A torn log or a bug in the storage library can make the store fail to open, fail to read,
//! or panic inside sled, and the release build aborts on panic. So before the agent trusts its
//! store it probes it in a child process (`edge-agent store check`): the child opens the store
//! and reads and decodes every record. If the child fails in any way (an error, a panic, an
//! abort, a signal), the store directory is moved aside intact to
//! `data_dir/quarantine/<timestamp>/store`, the agent starts on a fresh store and records the
//! quarantine in it (`status`, the `edge_store_quarantined` metric, an error log line).
//! `edge-agent store salvage` exports what can still be read from the quarantined copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// Exit code of `store check` when the store is held by another process (not damage).
pub const CHECK_LOCKED: i32 = 3;

/// Exit code of `store check` when the filesystem is full (not damage either).
pub const CHECK_NO_SPACE: i32 = 4;

/// The first line `store check` prints, before it touches the store.
pub const CHECK_STARTED: &str = "checking the store";

/// One store moved aside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantine {
    /// When (epoch ms).
    pub at: i64,
    /// Where the damaged store now is.
    pub moved_to: PathBuf,
    /// What the probe said (its last lines of output, or how it died).
    pub reason: String,
    /// Whether the cloud broker acknowledged a status message carrying it (the uplink's).
    #[serde(default)]
    pub reported: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the store at {0} is in use by another process (is the agent running?)")]
    Locked(PathBuf),
    #[error(
        "disk full: the filesystem of {0} has no space left; the store is left as it is (nothing is lost): free some space and start the agent again"
    )]
    NoSpace(PathBuf),
    #[error("probing the store at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Probes `data_dir/store` with `exe store check` and quarantines it if the probe fails.
/// Returns the quarantine made, if any. A missing store is not damage (first start).
pub fn probe(exe: &Path, data_dir: &Path, now_ms: i64) -> Result<Option<Quarantine>, ProbeError> {
    let store = data_dir.join("store");
    if !store.exists() {
        return Ok(None);
    }
    let io = |source| ProbeError::Io {
        path: store.clone(),
        source,
    };
    let child = Command::new(exe)
        .args(["store", "check", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .output();
    // Only a child that got as far as the store can call it damaged: one that never started
    // (no binary to run, an ARM build under qemu-user whose child lacks the emulator's
    // sysroot) says nothing about the store.
    let started = |out: &std::process::Output| out.stdout.starts_with(CHECK_STARTED.as_bytes());
    let reason = match child {
        Ok(out) if out.status.success() && started(&out) => return Ok(None),
        Ok(out) if out.status.code() == Some(CHECK_LOCKED) && started(&out) => {
            return Err(ProbeError::Locked(store));
        }
        Ok(out) if out.status.code() == Some(CHECK_NO_SPACE) && started(&out) => {
            return Err(ProbeError::NoSpace(store));
        }
        Ok(out) if started(&out) => failure_reason(&out.status, &out.stderr),
        // The probe could not run: check in-process, which catches every error but not a
        // panic.
        unavailable => {
            let why = match unavailable {
                Ok(out) => failure_reason(&out.status, &out.stderr),
                Err(e) => e.to_string(),
            };
            tracing::warn!(error = %why, "cannot run the store probe as a child: checking in-process");
            match super::Store::open(data_dir).and_then(|s| s.reader().check()) {
                Ok(_) => return Ok(None),
                Err(super::StoreError::Locked(path)) => return Err(ProbeError::Locked(path)),
                Err(super::StoreError::NoSpace(_)) => return Err(ProbeError::NoSpace(store)),
                Err(e) => format!("store check: {e}"),
            }
        }
    };
    let moved_to = move_aside(data_dir, now_ms).map_err(io)?;
    Ok(Some(Quarantine {
        at: now_ms,
        moved_to,
        reason,
        reported: false,
    }))
}

fn failure_reason(status: &std::process::ExitStatus, stderr: &[u8]) -> String {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(stderr);
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("store check exited {code}"),
        (None, Some(sig)) => format!("store check died of signal {sig}"),
        _ => "store check failed".to_string(),
    };
    if tail.is_empty() {
        how
    } else {
        format!("{how}: {tail}")
    }
}

/// Renames `data_dir/store` to `data_dir/quarantine/<timestamp>/store`, durably.
fn move_aside(data_dir: &Path, now_ms: i64) -> std::io::Result<PathBuf> {
    // 2026-11-25T10:00:00.000Z → 20261125T100000.000Z: sortable, and no ':' in a file name.
    let stamp: String = proto::timestamp::format_rfc3339(now_ms)
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let root = data_dir.join("quarantine");
    let mut dir = root.join(&stamp);
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = root.join(format!("{stamp}-{n}"));
    }
    std::fs::create_dir_all(&dir)?;
    let to = dir.join("store");
    std::fs::rename(data_dir.join("store"), &to)?;
    for d in [&dir, &root, &data_dir.to_path_buf()] {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_that_cannot_run_never_quarantines_a_sound_store() {
        let dir = tempfile::tempdir().unwrap();
        drop(crate::store::Store::open(dir.path()).unwrap());
        // `false` exits 1 without printing the start line: not the store's fault.
        let made = probe(Path::new("/bin/false"), dir.path(), 0).unwrap();
        assert_eq!(made, None);
        assert!(dir.path().join("store").exists());
        assert!(!dir.path().join("quarantine").exists());
    }
}
