//! `cloud-bridge anomaly train`: read the history, fit one model per event type, store each
//! under `{prefix}models/anomaly/{type}.json`.
//!
//! Training uses only results that look normal by the edge's own account: status `ok` and no
//! flags (a first reading, a late or out-of-order event, a replay or a sequence reset has
//! derived fields computed without a proper previous reading). Results with status `anomaly`
//! or `corrected` are left out as well. A type with more usable records than `max_samples`
//! is trained on a uniform sample of them (reservoir sampling, deterministic).

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::{EventResult, Status};
use serde::Serialize;

use super::AnomalyError;
use super::features::raw_fields;
use super::history::{self, DateRange, ReadStats};
use super::model::{FitParams, TypeModel};
use super::progress::Progress;
use crate::backend::ObjectStore;

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub range: DateRange,
    /// Only this event type.
    pub event_type: Option<String>,
    pub fit: FitParams,
    /// Fields that never become features (`input.energy_kwh`).
    pub exclude: Vec<String>,
    /// Records per type fitted at most (a uniform sample beyond).
    pub max_samples: usize,
    /// Objects read at once.
    pub concurrency: usize,
}

/// One type's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TypeReport {
    pub event_type: String,
    /// Results of this type read.
    pub read: usize,
    /// Left out of training (status, flags).
    pub skipped: usize,
    /// Fitted on.
    pub samples: usize,
    pub features: Vec<String>,
    pub components: usize,
    pub threshold: Option<f64>,
    /// Where the model was stored (absent when training failed).
    pub key: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub range: DateRange,
    #[serde(flatten)]
    pub read: ReadStats,
    pub types: Vec<TypeReport>,
    /// The trained models (not in the JSON summary).
    #[serde(skip)]
    pub models: Vec<TypeModel>,
}

impl TrainReport {
    pub fn trained(&self) -> usize {
        self.types.iter().filter(|t| t.error.is_none()).count()
    }
}

/// splitmix64: the reservoir's deterministic random numbers.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One type's training data as it is read.
struct Collected {
    read: usize,
    skipped: usize,
    /// Usable records seen (the reservoir's denominator).
    seen: usize,
    rows: Vec<BTreeMap<String, f64>>,
    ts: Option<(i64, i64)>,
    rng: SplitMix,
}

/// Whether a result may train the model.
pub fn usable(r: &EventResult) -> bool {
    r.status == Status::Ok && r.flags.is_empty()
}

/// Reads the history in `opts.range`, fits and stores a model per type. A type that cannot be
/// trained (too few records, no numeric field) is reported with its error and the others go on.
pub async fn train(
    objects: &Arc<dyn ObjectStore>,
    prefix: &str,
    opts: &TrainOptions,
    progress: &Progress,
) -> Result<TrainReport, AnomalyError> {
    if let Some(t) = &opts.event_type
        && (t.is_empty() || t.contains('/'))
    {
        return Err(AnomalyError::InvalidArgument(format!(
            "--type: '{t}' is not an event type"
        )));
    }
    let keys = history::keys(objects.as_ref(), prefix, &opts.range).await?;
    let max = opts.max_samples.max(1);
    let mut by_type: BTreeMap<String, Collected> = BTreeMap::new();
    let read = history::read(objects, &keys, opts.concurrency, progress, |_, r| {
        if opts.event_type.as_ref().is_some_and(|t| *t != r.event_type)
            || r.event_type.is_empty()
            || r.event_type.contains('/')
        {
            return;
        }
        let c = by_type
            .entry(r.event_type.clone())
            .or_insert_with(|| Collected {
                read: 0,
                skipped: 0,
                seen: 0,
                rows: Vec::new(),
                ts: None,
                rng: SplitMix(0x5EED),
            });
        c.read += 1;
        if !usable(&r) {
            c.skipped += 1;
            return;
        }
        c.seen += 1;
        c.ts = Some(c.ts.map_or((r.ts, r.ts), |(a, b)| (a.min(r.ts), b.max(r.ts))));
        let row = raw_fields(&r);
        if c.rows.len() < max {
            c.rows.push(row);
        } else {
            let j = (c.rng.next() % c.seen as u64) as usize;
            if j < max {
                c.rows[j] = row;
            }
        }
    })
    .await?;

    let trained_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut report = TrainReport {
        range: opts.range.clone(),
        read,
        types: Vec::new(),
        models: Vec::new(),
    };
    if let Some(t) = &opts.event_type
        && !by_type.contains_key(t)
    {
        report.types.push(TypeReport {
            event_type: t.clone(),
            read: 0,
            skipped: 0,
            samples: 0,
            features: vec![],
            components: 0,
            threshold: None,
            key: None,
            error: Some("no results of this type in the range".into()),
        });
    }
    for (event_type, c) in by_type {
        progress.note(&format!("fitting {event_type} ({} records)", c.rows.len()));
        let mut tr = TypeReport {
            event_type: event_type.clone(),
            read: c.read,
            skipped: c.skipped,
            samples: 0,
            features: vec![],
            components: 0,
            threshold: None,
            key: None,
            error: None,
        };
        // Fitting is CPU-bound: off the async workers.
        let (et, rows, exclude, fit) = (
            event_type.clone(),
            c.rows,
            opts.exclude.clone(),
            opts.fit.clone(),
        );
        let fitted =
            tokio::task::spawn_blocking(move || TypeModel::fit(&et, &rows, &exclude, &fit))
                .await
                .map_err(|e| AnomalyError::InvalidArgument(format!("fitting {event_type}: {e}")))?;
        match fitted {
            Err(e) => tr.error = Some(e.to_string()),
            Ok(mut m) => {
                let t = &mut m.training;
                t.n_read = c.read;
                t.n_skipped = c.skipped;
                t.ts_from = c.ts.map(|t| t.0);
                t.ts_to = c.ts.map(|t| t.1);
                t.since = opts.range.since.clone();
                t.until = opts.range.until.clone();
                t.objects = report.read.objects;
                t.trained_at = trained_at.clone();
                let key = crate::layout::model(prefix, &event_type);
                objects
                    .put(&key, m.to_json(), "application/json")
                    .await
                    .map_err(|e| AnomalyError::store("put", &key, e))?;
                tr.samples = m.training.n_samples;
                tr.features = m.features.names.clone();
                tr.components = m.components.len();
                tr.threshold = Some(m.threshold);
                tr.key = Some(key);
                report.models.push(m);
            }
        }
        report.types.push(tr);
    }
    Ok(report)
}
