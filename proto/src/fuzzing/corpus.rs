//! The committed inputs of a fuzz target: `fuzz/corpus/TARGET/` (seeds and a minimised
//! selection of what the fuzzer found) and `fuzz/regressions/TARGET/` (every crash found, kept
//! once fixed).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// The `fuzz/` folder of the repository this crate was built from.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable corpus folder").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Feeds every committed input of `target` to `body` (the target's own function) and fails
/// naming each input that panics. An empty corpus is a failure too: it would test nothing.
pub fn replay(target: &str, body: fn(&[u8])) {
    let dir = fuzz_dir();
    let inputs: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .flat_map(|kind| files(&dir.join(kind).join(target)))
        .collect();
    assert!(
        !inputs.is_empty(),
        "no committed inputs for {target} under {}",
        dir.display()
    );
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("readable corpus file");
            catch_unwind(AssertUnwindSafe(|| body(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs panic: {failed:#?}",
        failed.len(),
        inputs.len()
    );
}
