//! EventBridge PutEvents to `aws.event_bus`. Partial failures (`FailedEntryCount > 0`, which
//! the SDK does not retry) are retried here, only the failed entries, with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::client::err;
use crate::backend::{BoxFuture, Entry, EventPublisher};
use crate::config::Config;
use crate::metrics::Metrics;

/// PutEvents limits (AWS): entries per call and request size.
pub const PUT_EVENTS_MAX_ENTRIES: usize = 10;
pub const PUT_EVENTS_MAX_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct EventBridge {
    client: aws_sdk_eventbridge::Client,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl EventPublisher for EventBridge {
    fn put_events(&self, entries: Vec<Entry>) -> BoxFuture<'_, ()> {
        Box::pin(EventBridge::put_events(self, entries))
    }
}

impl EventBridge {
    pub fn new(
        client: aws_sdk_eventbridge::Client,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Self {
        EventBridge {
            client,
            cfg,
            metrics,
        }
    }

    /// Sends `entries` in PutEvents calls of at most 10 entries and 256 KB, several calls at
    /// once; retries only the failed entries, with backoff. Errors if any entry still fails
    /// after the configured attempts.
    pub async fn put_events(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let chunks = chunk_entries(&self.cfg.aws.source, entries)?;
        let sem = Arc::new(Semaphore::new(self.cfg.aws.eventbridge_concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in chunks {
            let sink = self.clone();
            let sem = Arc::clone(&sem);
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                sink.put_events_chunk(chunk).await
            });
        }
        let mut first_err = None;
        while let Some(r) = tasks.join_next().await {
            let r = r.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = r
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn put_events_chunk(&self, mut chunk: Vec<Entry>) -> anyhow::Result<()> {
        let a = &self.cfg.aws;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=a.eventbridge_attempts {
            let req: Vec<PutEventsRequestEntry> = chunk
                .iter()
                .map(|(t, d)| {
                    PutEventsRequestEntry::builder()
                        .source(&a.source)
                        .detail_type(t.as_str())
                        .detail(d)
                        .event_bus_name(&a.event_bus)
                        .build()
                })
                .collect();
            let out = self
                .client
                .put_events()
                .set_entries(Some(req))
                .send()
                .await
                .map_err(err)
                .with_context(|| format!("EventBridge PutEvents to bus {}", a.event_bus))?;
            let failed = out.failed_entry_count();
            if failed == 0 {
                self.metrics
                    .eventbridge_entries
                    .increment(chunk.len() as u64);
                return Ok(());
            }
            self.metrics
                .eventbridge_failed_entries
                .increment(failed as u64);
            // The result entries are in request order; keep only the failed ones.
            let results = out.entries();
            let mut codes = Vec::new();
            let mut retry = Vec::new();
            for (i, e) in chunk.into_iter().enumerate() {
                match results.get(i) {
                    Some(r) if r.error_code().is_none() && r.event_id().is_some() => {
                        self.metrics.eventbridge_entries.increment(1);
                    }
                    r => {
                        codes.push(
                            r.and_then(|r| r.error_code())
                                .unwrap_or("missing result entry")
                                .to_string(),
                        );
                        retry.push(e);
                    }
                }
            }
            chunk = retry;
            if chunk.is_empty() {
                return Ok(());
            }
            warn!(attempt, failed = chunk.len(), codes = ?codes,
                "PutEvents: some entries failed; retrying only those");
            if attempt < a.eventbridge_attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        Err(anyhow!(
            "EventBridge PutEvents: {} entries still failed after {} attempts",
            chunk.len(),
            a.eventbridge_attempts
        ))
    }
}

/// The size AWS counts for an entry: Source, DetailType, Detail (UTF-8 bytes), plus
/// EventBusName to be safe.
fn entry_size(source: &str, (t, d): &Entry) -> usize {
    source.len() + t.as_str().len() + d.len() + 64
}

/// Splits entries into PutEvents calls of at most 10 entries and 256 KB. An entry that alone
/// exceeds the limit is an error (it cannot be sent at all).
pub fn chunk_entries(source: &str, entries: Vec<Entry>) -> anyhow::Result<Vec<Vec<Entry>>> {
    let mut chunks = Vec::new();
    let mut cur: Vec<Entry> = Vec::new();
    let mut cur_size = 0;
    for e in entries {
        let size = entry_size(source, &e);
        if size > PUT_EVENTS_MAX_BYTES {
            return Err(anyhow!(
                "an EventBridge {} entry of {size} bytes exceeds the 256 KB PutEvents limit",
                e.0
            ));
        }
        if cur.len() == PUT_EVENTS_MAX_ENTRIES || cur_size + size > PUT_EVENTS_MAX_BYTES {
            chunks.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur_size += size;
        cur.push(e);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    debug!(calls = chunks.len(), "PutEvents chunks");
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detail::DetailType;

    #[test]
    fn chunks_respect_count_and_size() {
        let small: Vec<Entry> = (0..25)
            .map(|i| (DetailType::EventProcessed, format!("{i}")))
            .collect();
        let c = chunk_entries("src", small).unwrap();
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);

        let big = "x".repeat(100 * 1024);
        let entries: Vec<Entry> = (0..5)
            .map(|_| (DetailType::EventProcessed, big.clone()))
            .collect();
        let c = chunk_entries("src", entries).unwrap();
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        for chunk in &c {
            let total: usize = chunk.iter().map(|e| entry_size("src", e)).sum();
            assert!(total <= PUT_EVENTS_MAX_BYTES);
        }

        let huge = vec![(DetailType::EventProcessed, "x".repeat(300 * 1024))];
        assert!(chunk_entries("src", huge).is_err());
    }
}
