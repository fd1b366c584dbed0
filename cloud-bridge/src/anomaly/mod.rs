//! The cloud's anomaly model (issue 4): per event type, a Gaussian mixture fitted by linfa
//! on the numeric fields of the results stored in S3, kept in S3 as JSON, used to score
//! results (the bridge, live) and stored history (`cloud-bridge anomaly scan`).
//!
//! ```text
//! {prefix}events/dt=…/gateway=…/*.ndjson ──train──▶ {prefix}models/anomaly/{type}.json
//!                                         ──scan───▶ counts, top anomalies, AnomalyDetected
//! ```
//!
//! - [`features`]: numeric feature vectors (`input.*`, `result.*`), standardized.
//! - [`model`]: one type's mixture, its JSON form, its score (negative log-likelihood) and
//!   threshold (a quantile of the training scores).
//! - [`train`] / [`scan`]: the batch commands over the history; [`progress`] reports them.
//! - [`AnomalyModels`]: what the bridge loads once and calls per result ([`AnomalyModels::score`]:
//!   pure, no I/O).

pub mod features;
pub mod history;
pub mod live;
pub mod model;
pub mod progress;
pub mod scan;
pub mod train;

use std::collections::BTreeMap;

use proto::EventResult;
use serde::Serialize;

use crate::backend::ObjectStore;
use crate::detail::DetailType;
pub use model::{ModelError, TypeModel};

/// The EventBridge detail-type of an anomaly.
pub const DETAIL_TYPE: DetailType = DetailType::AnomalyDetected;
/// The flag an `AnomalyDetected` event's result carries when the cloud model found it.
pub const FLAG: &str = "cloud_anomaly";

/// Results with one of these flags (the engine's `flags`) are not scored: their derived fields
/// were computed without a proper previous reading (a consumption of 0 on a first reading is
/// not an anomaly), and training never sees such results either.
pub const UNSCORED_FLAGS: [&str; 3] = ["first_reading", "out_of_order", "seq_reset"];

/// Whether a result is scored at all (see [`UNSCORED_FLAGS`]).
pub fn scorable(r: &EventResult) -> bool {
    !r.flags.iter().any(|f| UNSCORED_FLAGS.contains(&f.as_str()))
}

/// Errors of the anomaly commands and of loading models.
#[derive(Debug, thiserror::Error)]
pub enum AnomalyError {
    /// An object store call failed (the message has the whole cause chain).
    #[error("{op} {key}: {message}")]
    Store {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{key}: {source}")]
    Model { key: String, source: ModelError },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("publishing {DETAIL_TYPE}: {0}")]
    Publish(String),
}

impl AnomalyError {
    pub(crate) fn store(op: &'static str, key: &str, e: anyhow::Error) -> AnomalyError {
        AnomalyError::Store {
            op,
            key: key.to_string(),
            message: format!("{e:#}"),
        }
    }
}

/// A result's score under its type's model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// Negative log-likelihood: higher is more unusual.
    pub value: f64,
    pub threshold: f64,
    /// `value > threshold`.
    pub anomalous: bool,
}

/// Every stored model, by event type.
#[derive(Debug, Clone, Default)]
pub struct AnomalyModels {
    models: BTreeMap<String, TypeModel>,
}

impl AnomalyModels {
    /// Reads every `{prefix}models/anomaly/*.json`. No models is not an error (an empty set
    /// scores nothing); an unreadable or invalid model is.
    pub async fn load(objects: &dyn ObjectStore, prefix: &str) -> Result<Self, AnomalyError> {
        let dir = crate::layout::models(prefix);
        let keys = objects
            .list(&dir)
            .await
            .map_err(|e| AnomalyError::store("list", &dir, e))?;
        let mut models = BTreeMap::new();
        for key in keys {
            let Some(name) = key.strip_prefix(&dir).and_then(|k| k.strip_suffix(".json")) else {
                continue;
            };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let Some(body) = objects
                .get(&key)
                .await
                .map_err(|e| AnomalyError::store("get", &key, e))?
            else {
                continue; // deleted since the listing
            };
            let m = TypeModel::from_json(&body).map_err(|source| AnomalyError::Model {
                key: key.clone(),
                source,
            })?;
            models.insert(m.event_type.clone(), m);
        }
        Ok(AnomalyModels { models })
    }

    pub fn from_models(models: impl IntoIterator<Item = TypeModel>) -> Self {
        AnomalyModels {
            models: models
                .into_iter()
                .map(|m| (m.event_type.clone(), m))
                .collect(),
        }
    }

    /// The score of `r` under its type's model; `None` without a model for the type, when `r`
    /// has none of the model's numeric fields, or when it carries one of [`UNSCORED_FLAGS`].
    /// Pure: no I/O, no clock.
    pub fn score(&self, r: &EventResult) -> Option<Score> {
        let m = self.models.get(&r.event_type)?;
        if !scorable(r) {
            return None;
        }
        let value = m.score_fields(&features::raw_fields(r))?;
        Some(Score {
            value,
            threshold: m.threshold,
            anomalous: value > m.threshold,
        })
    }

    pub fn get(&self, event_type: &str) -> Option<&TypeModel> {
        self.models.get(event_type)
    }

    /// The event types that have a model.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// The `AnomalyDetected` detail: the result as stored, marked as the model sees it (status
/// `anomaly`, `anomaly_score` = the score, flag [`FLAG`]).
pub fn detail(r: &EventResult, score: &Score) -> String {
    let mut r = r.clone();
    r.status = proto::Status::Anomaly;
    r.anomaly_score = score.value;
    if !r.flags.iter().any(|f| f == FLAG) {
        r.flags.push(FLAG.to_string());
    }
    serde_json::to_string(&r).expect("a result serializes")
}
