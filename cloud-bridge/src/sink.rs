//! Object and event writes as the pipeline, the DLQ processor and correction runs see them:
//! events filtered by the configured detail-types (`aws.detail_types`).

use std::sync::Arc;

use crate::backend::{Entry, EventPublisher, ObjectStore};
use crate::config::Config;

#[derive(Clone, Debug)]
pub struct Sink {
    pub objects: Arc<dyn ObjectStore>,
    pub events: Arc<dyn EventPublisher>,
    pub cfg: Arc<Config>,
}

impl Sink {
    pub async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> anyhow::Result<()> {
        self.objects.put(key, body, content_type).await
    }

    pub async fn delete_object(&self, key: &str) -> anyhow::Result<()> {
        self.objects.delete(key).await
    }

    /// Sends the entries whose detail-type the config selects.
    pub async fn put_events(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|(t, _)| self.cfg.sends(*t))
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.events.put_events(entries).await
    }
}
