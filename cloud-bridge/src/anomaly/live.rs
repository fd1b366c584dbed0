//! The models the running bridge scores with: loaded from S3 on first use and looked for
//! again every `anomaly.reload_s`, so a `cloud-bridge anomaly train` reaches running bridges
//! without a restart. A failed reload keeps the models it had.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{EventResult, Status};
use tracing::{info, warn};

use super::{AnomalyModels, FLAG};
use crate::backend::ObjectStore;

#[derive(Debug)]
pub struct LiveModels {
    reload: Duration,
    /// The models and when they were (last tried to be) loaded.
    current: Mutex<(Arc<AnomalyModels>, Option<Instant>)>,
}

impl LiveModels {
    pub fn new(reload: Duration) -> LiveModels {
        LiveModels {
            reload,
            current: Mutex::new((Arc::new(AnomalyModels::default()), None)),
        }
    }

    /// The models, reloaded first if they are older than `reload`.
    pub async fn get(&self, objects: &dyn ObjectStore, prefix: &str) -> Arc<AnomalyModels> {
        let (models, stale) = {
            let c = self.current.lock().unwrap_or_else(|p| p.into_inner());
            (
                Arc::clone(&c.0),
                c.1.is_none_or(|t| t.elapsed() >= self.reload),
            )
        };
        if !stale {
            return models;
        }
        let fresh = match AnomalyModels::load(objects, prefix).await {
            Ok(m) => {
                if m.len() != models.len() {
                    info!(types = m.len(), "anomaly models loaded");
                }
                Arc::new(m)
            }
            Err(e) => {
                warn!(
                    "anomaly models not reloaded (keeping {}): {e}",
                    models.len()
                );
                models
            }
        };
        let mut c = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *c = (Arc::clone(&fresh), Some(Instant::now()));
        fresh
    }
}

/// Scores `r` with `models`; an anomalous result gets status `anomaly` (unless it is
/// `corrected`, which stays), the flag `cloud_anomaly`, and an `anomaly_score` that is the
/// larger of the edge's and the model's (score ÷ threshold, so ≥ 1 means anomalous on both
/// tiers). True if it was anomalous.
pub fn apply(models: &AnomalyModels, r: &mut EventResult) -> bool {
    let Some(s) = models.score(r) else {
        return false;
    };
    if !s.anomalous {
        return false;
    }
    if r.status == Status::Ok {
        r.status = Status::Anomaly;
    }
    // A log-likelihood threshold can be ≤ 0; the stored score still says "≥ 1: anomalous".
    let ratio = if s.threshold > 0.0 && s.value.is_finite() {
        s.value / s.threshold
    } else {
        1.0
    };
    r.anomaly_score = r.anomaly_score.max(ratio.max(1.0));
    if !r.flags.iter().any(|f| f == FLAG) {
        r.flags.push(FLAG.to_string());
    }
    true
}
