//! The demo's output directory: created, or a previous demo's files replaced.

use std::path::Path;

use anyhow::{Context as _, bail};

/// Marks a directory as the demo's, so a later demo may replace what it wrote there.
const MARKER: &str = ".edge-agent-demo";
/// Everything a demo writes in its directory.
const WRITES: [&str; 8] = [
    "agent",
    "events",
    "failures",
    "eventbridge",
    "state",
    "summary.json",
    "demo.log",
    MARKER,
];

/// Creates `--out`; a previous demo's files there are removed (a demo starts with new devices
/// and a new gateway state), anything else there makes the demo refuse.
pub fn prepare_out(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut entries = std::fs::read_dir(dir)?.peekable();
    if entries.peek().is_some() {
        if !dir.join(MARKER).exists() {
            bail!(
                "--out {}: the directory is not empty and not a previous demo's; choose a new or empty one",
                dir.display()
            );
        }
        for name in WRITES {
            let p = dir.join(name);
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p).or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
            }
            .with_context(|| format!("removing the previous demo's {}", p.display()))?;
        }
    }
    std::fs::write(
        dir.join(MARKER),
        "written by `edge-agent demo`; the next demo replaces this directory's demo files\n",
    )?;
    Ok(())
}
