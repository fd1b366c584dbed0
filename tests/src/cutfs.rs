//! The power-cut filesystem (`tests/powercut/cutfs.py`, FUSE) as a test handle.
//!
//! Writes stay in the filesystem's own cache until the file is fsynced; a [`CutFs::cut`]
//! drops (or, torn, half-keeps) everything unsynced, as pulling a gateway's plug does. The
//! python it runs on comes from `CUTFS_PYTHON` (set by `tests/run.sh` after
//! `cutfs_install`), else `python3`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

/// How names become durable (see cutfs.py): at any later fsync (ext4-like), or only when
/// their directory is fsynced (strict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    Ext4,
    Strict,
}

pub struct CutFs {
    child: Option<Child>,
    pub mount: PathBuf,
    log: PathBuf,
}

impl CutFs {
    /// Mounts a fresh cutfs at `dir/mnt` (backing files under `dir/backing`).
    pub fn mount(dir: &Path, mode: Metadata, seed: u64) -> CutFs {
        let (backing, mount, log) = (dir.join("backing"), dir.join("mnt"), dir.join("cutfs.log"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("powercut/cutfs.py");
        let python = std::env::var("CUTFS_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .arg("--seed")
            .arg(seed.to_string());
        if mode == Metadata::Strict {
            cmd.arg("--strict");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cutfs.py (bash tests/run.sh installs its python)");
        let mut fs = CutFs {
            child: Some(child),
            mount,
            log,
        };
        wait_for("cutfs to mount", Duration::from_secs(30), || {
            if let Some(status) = fs.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cutfs exited ({status}):\n{}", fs.log_text());
            }
            is_mounted(&fs.mount)
        });
        fs
    }

    /// Pulls the plug: every unsynced write and name change is dropped (`torn`: some unsynced
    /// pages are kept, at random). Whatever had files open must be dead already.
    pub fn cut(&self, torn: bool) {
        let word = if torn { "cut-torn" } else { "cut" };
        std::fs::write(self.mount.join(".cutfs"), word)
            .unwrap_or_else(|e| panic!("cutfs {word}: {e}\n{}", self.log_text()));
    }

    /// The filesystem's counters (cuts, syncs, dropped pages, torn pages kept, dropped names).
    pub fn stats(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.mount.join(".cutfs")).unwrap();
        serde_json::from_str(text.trim()).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mount)
            .status();
        if let Some(mut child) = self.child.take() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let target = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == target)
}
