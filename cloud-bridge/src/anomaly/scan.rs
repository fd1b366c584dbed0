//! `cloud-bridge anomaly scan`: rescore stored history with the stored models; counts per
//! type, every anomaly found (most unusual first), and optionally `AnomalyDetected` events.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::history::{self, DateRange, ReadStats};
use super::progress::Progress;
use super::{AnomalyError, AnomalyModels, DETAIL_TYPE, Score, detail, features, scorable};
use crate::backend::{Entry, EventPublisher, ObjectStore};

/// Events per PutEvents round (the publisher splits them into calls of ≤ 10).
const PUBLISH_CHUNK: usize = 500;

#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub range: DateRange,
    pub event_type: Option<String>,
    pub concurrency: usize,
}

/// Counts of one event type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeCounts {
    pub scanned: usize,
    /// Scored by the type's model.
    pub scored: usize,
    pub anomalies: usize,
    /// No model for the type.
    pub no_model: usize,
    /// Not scored: none of the model's fields present, or a flag of `UNSCORED_FLAGS`.
    pub unscorable: usize,
    pub threshold: Option<f64>,
}

/// One anomaly found.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub event_id: String,
    pub event_type: String,
    pub gateway: String,
    pub device: String,
    pub ts: i64,
    pub score: f64,
    pub threshold: f64,
    /// The feature furthest from its training mean, and its z-score.
    pub feature: Option<String>,
    pub z: Option<f64>,
    /// The object it is stored in.
    pub key: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScanReport {
    pub range: DateRange,
    #[serde(flatten)]
    pub read: ReadStats,
    pub types: BTreeMap<String, TypeCounts>,
    /// Every anomaly, highest `score - threshold` first.
    pub anomalies: Vec<Found>,
    /// `AnomalyDetected` events sent.
    pub published: usize,
}

/// Scores every result in `opts.range` (of `opts.event_type`, if given) with `models`; with a
/// publisher, sends an `AnomalyDetected` event per anomaly (at least once: a failed run sends
/// again when repeated).
pub async fn scan(
    objects: &Arc<dyn ObjectStore>,
    prefix: &str,
    models: &AnomalyModels,
    opts: &ScanOptions,
    publisher: Option<&dyn EventPublisher>,
    progress: &Progress,
) -> Result<ScanReport, AnomalyError> {
    let keys = history::keys(objects.as_ref(), prefix, &opts.range).await?;
    let mut types: BTreeMap<String, TypeCounts> = BTreeMap::new();
    let mut anomalies = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let read = history::read(objects, &keys, opts.concurrency, progress, |key, r| {
        if opts.event_type.as_ref().is_some_and(|t| *t != r.event_type) {
            return;
        }
        let c = types.entry(r.event_type.clone()).or_default();
        c.scanned += 1;
        let Some(model) = models.get(&r.event_type) else {
            c.no_model += 1;
            return;
        };
        c.threshold = Some(model.threshold);
        let fields = features::raw_fields(&r);
        let value = scorable(&r).then(|| model.score_fields(&fields)).flatten();
        let Some(value) = value else {
            c.unscorable += 1;
            return;
        };
        c.scored += 1;
        if value <= model.threshold {
            return;
        }
        c.anomalies += 1;
        let score = Score {
            value,
            threshold: model.threshold,
            anomalous: true,
        };
        if publisher.is_some() {
            entries.push((DETAIL_TYPE, detail(&r, &score)));
        }
        let dev = model.largest_deviation(&fields);
        anomalies.push(Found {
            event_id: r.event_id,
            event_type: r.event_type,
            gateway: r.gateway,
            device: r.device,
            ts: r.ts,
            score: value,
            threshold: model.threshold,
            feature: dev.as_ref().map(|d| d.0.clone()),
            z: dev.map(|d| d.1),
            key: key.to_string(),
        });
    })
    .await?;
    anomalies.sort_by(|a, b| {
        (b.score - b.threshold)
            .total_cmp(&(a.score - a.threshold))
            .then_with(|| a.event_id.cmp(&b.event_id))
    });
    let mut published = 0;
    if let Some(p) = publisher {
        progress.note(&format!(
            "publishing {} {DETAIL_TYPE} events",
            entries.len()
        ));
        for chunk in entries.chunks(PUBLISH_CHUNK) {
            p.put_events(chunk.to_vec())
                .await
                .map_err(|e| AnomalyError::Publish(format!("{e:#}")))?;
            published += chunk.len();
        }
    }
    Ok(ScanReport {
        range: opts.range.clone(),
        read,
        types,
        anomalies,
        published,
    })
}
