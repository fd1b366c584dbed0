//! The agent's command line as the tests drive it: JSON documents, config edits, another user,
//! and a real terminal (tmux) for what a person sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::{Agent, agent_bin};

impl Agent {
    /// `edge-agent ARGS --config …` that must succeed and print one JSON document.
    pub fn cli_doc(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "edge-agent {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "edge-agent {args:?}: not one JSON document ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Rewrites the config file (e.g. a technician's fix); a running agent sees it on restart.
    pub fn edit_config(&self, edit: impl FnOnce(&mut toml::Table)) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let mut cfg: toml::Table = text.parse().unwrap();
        edit(&mut cfg);
        std::fs::write(&self.config, toml::to_string(&cfg).unwrap()).unwrap();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

/// The exit code, stdout and stderr of a command, for assertions.
pub fn outcome(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `edge-agent ARGS` as another user (uid/gid) via util-linux `setpriv`; the binary is
/// copied to `dir` (which must be reachable by that user) first. `None` when `setpriv` is
/// missing or this process is not root.
pub fn run_as(uid: u32, dir: &Path, args: &[&str]) -> Option<Output> {
    let root = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        return None;
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let bin = dir.join("edge-agent");
    if !bin.exists() {
        std::fs::copy(agent_bin(), &bin).unwrap();
    }
    Some(
        Command::new(setpriv)
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ])
            .arg(&bin)
            .args(args)
            .output()
            .unwrap(),
    )
}

/// A detached tmux session running one shell command in a terminal of a given size, for
/// looking at the screen a person would see.
pub struct Tmux {
    name: String,
}

impl Tmux {
    /// Starts `command` (through `sh -c`) in a `cols`×`rows` terminal. The session stays open
    /// after the command ends (it prints `__DONE__` then sleeps), so the screen can be read.
    pub fn run(name: &str, cols: u16, rows: u16, command: &str) -> Tmux {
        let name = format!("{name}-{}", std::process::id());
        let script = format!("{command}; echo __DONE__; sleep 600");
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-s", &name])
            .args(["-x", &cols.to_string(), "-y", &rows.to_string()])
            .args(["sh", "-c", &script])
            .status()
            .expect("tmux must be installed");
        assert!(status.success(), "tmux new-session failed");
        Tmux { name }
    }

    /// The screen and its scrollback, wrapped lines joined back (`-J`): a line longer than
    /// the terminal shows up here as one long line.
    pub fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-S", "-", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen as the terminal shows it: one line per row, nothing joined. (A progress
    /// bar fills its row to the last column and lets the terminal wrap, so joining rows would
    /// glue the next output line to it.)
    pub fn rows(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the command has finished; returns the screen.
    pub fn wait_done(&self, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if s.contains("__DONE__") {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "tmux command did not finish; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}
