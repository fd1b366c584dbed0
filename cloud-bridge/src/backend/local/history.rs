//! The correction history as one JSON file per event under a directory, created with
//! `O_EXCL`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::backend::{BoxFuture, CorrectionHistory, CorrectionRecord};

/// The history as one JSON file per event under a directory (the local backend).
#[derive(Clone, Debug)]
pub struct DirHistory {
    dir: PathBuf,
}

impl DirHistory {
    pub fn open(dir: &Path) -> anyhow::Result<DirHistory> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(DirHistory {
            dir: dir.to_path_buf(),
        })
    }

    /// Event ids hold `/` (`{device}/{id}`): hex keeps every id one safe file name.
    fn path(&self, event_id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", crate::hex_name(event_id)))
    }

    fn put_new_sync(&self, rec: &CorrectionRecord) -> anyhow::Result<bool> {
        let path = self.path(&rec.event_id);
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        // The record must be whole before anyone reads it: write, then sync.
        f.write_all(&serde_json::to_vec(rec)?)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(true)
    }

    fn get_sync(&self, event_id: &str) -> anyhow::Result<Option<CorrectionRecord>> {
        let path = self.path(event_id);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

impl CorrectionHistory for DirHistory {
    fn put_new<'a>(&'a self, rec: &'a CorrectionRecord) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.put_new_sync(rec) })
    }
    fn get<'a>(&'a self, event_id: &'a str) -> BoxFuture<'a, Option<CorrectionRecord>> {
        Box::pin(async move { self.get_sync(event_id) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Recorded;
    use std::sync::Arc;

    fn rec(request: &str) -> CorrectionRecord {
        CorrectionRecord {
            event_id: "meter-1/42".into(),
            request: request.into(),
            gateway: "g".into(),
            edge_seq: 7,
            reason: "result mismatch".into(),
            at: 1,
            owner: "b1".into(),
        }
    }

    #[tokio::test]
    async fn the_first_request_wins_and_a_repeat_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let h: Arc<dyn CorrectionHistory> = Arc::new(DirHistory::open(dir.path()).unwrap());
        assert_eq!(h.record(&rec("a")).await.unwrap(), Recorded::New);
        assert_eq!(
            h.record(&rec("a")).await.unwrap(),
            Recorded::Again(rec("a"))
        );
        assert_eq!(
            h.record(&rec("b")).await.unwrap(),
            Recorded::Other(rec("a"))
        );
        assert_eq!(h.get("meter-1/43").await.unwrap(), None);
    }
}
