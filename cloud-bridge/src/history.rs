//! The correction history: which events the cloud has corrected, one record per `event_id`.
//!
//! It is what makes a correction happen **at most once** across any number of bridges and
//! Lambda instances: a record is written only if none exists for the event (DynamoDB
//! `attribute_not_exists(pk)`, in the bridge's table under `correction#{event_id}`; a file
//! created with `O_EXCL` in the local backend), and only the writer of the record overwrites
//! the stored result. The request id lets the same request (a redelivered batch, a DLQ message
//! received twice) finish its own correction instead of mistaking it for a second one.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};

use crate::aws::{conditional, err, get_u64, n, s};
use crate::backend::BoxFuture;

/// One corrected event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorrectionRecord {
    pub event_id: String,
    /// Who asked: `verify:{gateway}:{edge_seq}` for the bridge's own check, the DLQ message id
    /// for the DLQ processor, `run:{…}` for a correction run.
    pub request: String,
    pub gateway: String,
    pub edge_seq: u64,
    pub reason: String,
    /// When it was corrected (epoch ms); also the `correction.at` of the record.
    pub at: i64,
    /// The bridge instance (diagnostics).
    pub owner: String,
}

/// The outcome of [`CorrectionHistory::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Written: this request corrects the event.
    New,
    /// A record of the same request exists (an earlier attempt of it): finish that one.
    Again(CorrectionRecord),
    /// Another request corrected the event.
    Other(CorrectionRecord),
}

pub trait CorrectionHistory: Send + Sync + Debug {
    /// Writes `rec` unless a record of its event exists (then nothing is written).
    fn put_new<'a>(&'a self, rec: &'a CorrectionRecord) -> BoxFuture<'a, bool>;
    fn get<'a>(&'a self, event_id: &'a str) -> BoxFuture<'a, Option<CorrectionRecord>>;
}

impl dyn CorrectionHistory {
    /// Records the correction `rec` describes, or tells who did.
    pub async fn record(&self, rec: &CorrectionRecord) -> anyhow::Result<Recorded> {
        if self.put_new(rec).await? {
            return Ok(Recorded::New);
        }
        let existing = self.get(&rec.event_id).await?.with_context(|| {
            format!(
                "correction history of {}: the conditional write failed but no record exists",
                rec.event_id
            )
        })?;
        Ok(if existing.request == rec.request {
            Recorded::Again(existing)
        } else {
            Recorded::Other(existing)
        })
    }
}

/// The history in the bridge's DynamoDB table (the same one as the gateway state).
#[derive(Clone, Debug)]
pub struct DynamoHistory {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

fn key(event_id: &str) -> AttributeValue {
    s(format!("correction#{event_id}"))
}

impl DynamoHistory {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DynamoHistory {
            client,
            table: table.into(),
        }
    }

    async fn put_new_item(&self, r: &CorrectionRecord) -> anyhow::Result<bool> {
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", key(&r.event_id))
            .item("event_id", s(&r.event_id))
            .item("request", s(&r.request))
            .item("gateway", s(&r.gateway))
            .item("edge_seq", n(r.edge_seq))
            .item("reason", s(&r.reason))
            .item("at", n(r.at))
            .item("owner", s(&r.owner))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        conditional(res).with_context(|| format!("DynamoDB PutItem correction#{}", r.event_id))
    }

    async fn get_item(&self, event_id: &str) -> anyhow::Result<Option<CorrectionRecord>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", key(event_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("DynamoDB GetItem correction#{event_id}"))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let text = |k: &str| -> String {
            match item.get(k) {
                Some(AttributeValue::S(v)) => v.clone(),
                _ => String::new(),
            }
        };
        let num = |m: &HashMap<String, AttributeValue>, k: &str| get_u64(m, k);
        Ok(Some(CorrectionRecord {
            event_id: text("event_id"),
            request: text("request"),
            gateway: text("gateway"),
            edge_seq: num(&item, "edge_seq")?.unwrap_or(0),
            reason: text("reason"),
            at: num(&item, "at")?.unwrap_or(0) as i64,
            owner: text("owner"),
        }))
    }
}

impl CorrectionHistory for DynamoHistory {
    fn put_new<'a>(&'a self, rec: &'a CorrectionRecord) -> BoxFuture<'a, bool> {
        Box::pin(self.put_new_item(rec))
    }
    fn get<'a>(&'a self, event_id: &'a str) -> BoxFuture<'a, Option<CorrectionRecord>> {
        Box::pin(self.get_item(event_id))
    }
}

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
