//! One event type's anomaly model: a Gaussian mixture (full covariance) fitted by linfa over
//! the standardized features; a result's score is its negative log-likelihood under the
//! mixture, and it is anomalous above the threshold (a quantile of the out-of-fold scores of
//! the training records: each scored by a mixture fitted without it).
//!
//! The stored JSON holds everything scoring needs in plain numbers (features with their
//! means and standard deviations, each component's weight, mean and covariance) plus the
//! training statistics; scoring is this module's own arithmetic (a Cholesky factor per
//! component, computed once at load), so it needs neither linfa nor any I/O.

use std::collections::BTreeMap;

use linfa::prelude::*;
use linfa_clustering::{GaussianMixtureModel, GmmError};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::features::{FeatureError, FeatureSpec};

/// The JSON format's version (`format` in the object).
pub const FORMAT: u32 = 1;
pub const ALGORITHM: &str = "linfa-clustering 0.8 GaussianMixtureModel (full covariance, EM, k-means init); components chosen by BIC";
pub const SCORE: &str = "negative log-likelihood of the standardized features under the mixture";

/// How a model is fitted.
#[derive(Debug, Clone, PartialEq)]
pub struct FitParams {
    /// Mixture sizes tried: 1..=max_components (fewer when samples are few), best BIC wins.
    pub max_components: usize,
    /// Added to the covariance diagonals (standardized units): keeps collinear features (a
    /// result computed from the inputs) from making a covariance singular.
    pub reg_covariance: f64,
    /// The threshold is this quantile of the training scores.
    pub threshold_quantile: f64,
    /// Fewer usable training records than this: no model.
    pub min_samples: usize,
}

impl Default for FitParams {
    fn default() -> Self {
        FitParams {
            max_components: 3,
            reg_covariance: 1e-3,
            threshold_quantile: 0.995,
            min_samples: 50,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error("{n} usable training records, at least {min} needed")]
    NotEnoughSamples { n: usize, min: usize },
    #[error("fitting the Gaussian mixture failed: {0}")]
    Fit(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    /// One mixture fit (one k, one fold); the search over k reports the last of these as `Fit`.
    #[error(transparent)]
    Mixture(#[from] GmmError),
}

/// One mixture component, in standardized feature space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub weight: f64,
    pub mean: Vec<f64>,
    pub covariance: Vec<Vec<f64>>,
}

/// What the model was trained on; filled by training (`train.rs`), informative only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingStats {
    /// Records the model was fitted on.
    pub n_samples: usize,
    /// Records read for this type (before skipping and sampling).
    #[serde(default)]
    pub n_read: usize,
    /// Records left out: status `anomaly`/`corrected`, or flags.
    #[serde(default)]
    pub n_skipped: usize,
    pub n_components: usize,
    pub bic: f64,
    pub reg_covariance: f64,
    pub threshold_quantile: f64,
    /// How the threshold was set from the scores (out-of-fold, or in-sample for small data).
    #[serde(default)]
    pub threshold_method: String,
    /// Quantiles of the training scores (`p50`, `p90`, `p99`, `p99.5`, `max`) and their mean.
    pub score_quantiles: BTreeMap<String, f64>,
    pub score_mean: f64,
    /// The results' `ts` range (epoch ms) and the date partitions asked for.
    #[serde(default)]
    pub ts_from: Option<i64>,
    #[serde(default)]
    pub ts_to: Option<i64>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    #[serde(default)]
    pub objects: usize,
    /// RFC 3339.
    #[serde(default)]
    pub trained_at: String,
}

/// The stored model of one event type (`{prefix}models/anomaly/{type}.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TypeModel {
    pub format: u32,
    pub event_type: String,
    pub algorithm: String,
    pub score: String,
    pub features: FeatureSpec,
    pub components: Vec<Component>,
    pub threshold: f64,
    pub training: TrainingStats,
    #[serde(skip)]
    prepared: Vec<Prepared>,
}

/// A component ready to score: ln(weight), mean, the lower Cholesky factor of the covariance
/// and ln det(covariance).
#[derive(Debug, Clone)]
struct Prepared {
    log_weight: f64,
    mean: Vec<f64>,
    chol: Vec<Vec<f64>>,
    log_det: f64,
}

/// The lower-triangular L with L·Lᵀ = a; `None` unless `a` is symmetric positive definite.
fn cholesky(a: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let n = a.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        if a[i].len() != n {
            return None;
        }
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = a[i][i] - s;
                if d.is_nan() || d <= 0.0 {
                    return None;
                }
                l[i][j] = d.sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}

fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// The q-quantile of sorted values (linear interpolation between the closest ranks).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Folds of the cross-validated threshold.
const FOLDS: usize = 5;

/// One linfa Gaussian mixture of `k` components on standardized rows, as a scorable model.
fn mixture(
    event_type: &str,
    spec: &FeatureSpec,
    x: &Array2<f64>,
    k: usize,
    params: &FitParams,
) -> Result<TypeModel, ModelError> {
    let d = spec.len();
    let dataset = DatasetBase::from(x.clone());
    let gmm = GaussianMixtureModel::params(k)
        .reg_covariance(params.reg_covariance)
        .tolerance(1e-4)
        .max_n_iterations(500)
        .fit(&dataset)?;
    let components = (0..k)
        .map(|c| Component {
            weight: gmm.weights()[c],
            mean: gmm.means().row(c).to_vec(),
            covariance: (0..d)
                .map(|i| (0..d).map(|j| gmm.covariances()[[c, i, j]]).collect())
                .collect(),
        })
        .collect();
    let mut model = TypeModel {
        format: FORMAT,
        event_type: event_type.to_string(),
        algorithm: ALGORITHM.into(),
        score: SCORE.into(),
        features: spec.clone(),
        components,
        threshold: f64::INFINITY,
        training: TrainingStats::default(),
        prepared: Vec::new(),
    };
    model.prepare()?;
    Ok(model)
}

impl TypeModel {
    /// Fits the model of `event_type` on raw feature rows (see [`super::features`]): features,
    /// mixtures of 1..=max_components components (best BIC), threshold (the quantile of
    /// 5-fold out-of-fold scores). Deterministic (linfa's fixed seed). The training statistics about the data's origin are left for the caller.
    pub fn fit(
        event_type: &str,
        rows: &[BTreeMap<String, f64>],
        exclude: &[String],
        params: &FitParams,
    ) -> Result<TypeModel, ModelError> {
        if rows.len() < params.min_samples.max(2) {
            return Err(ModelError::NotEnoughSamples {
                n: rows.len(),
                min: params.min_samples.max(2),
            });
        }
        let spec = FeatureSpec::fit(rows, exclude)?;
        let d = spec.len();
        let xs: Vec<Vec<f64>> = rows.iter().filter_map(|r| spec.standardize(r)).collect();
        let n = xs.len();
        let x = Array2::from_shape_vec((n, d), xs.iter().flatten().copied().collect())
            .map_err(|e| ModelError::Fit(e.to_string()))?;
        // At least ~10 samples per free parameter of a component's mean and covariance.
        let per_component = 10 * (d + d * (d + 1) / 2);
        let k_max = params.max_components.clamp(1, (n / per_component).max(1));
        let mut best: Option<(f64, TypeModel)> = None;
        let mut last_err = None;
        for k in 1..=k_max {
            let mut model = match mixture(event_type, &spec, &x, k, params) {
                Ok(m) => m,
                Err(e) => {
                    last_err = Some(format!("{k} components: {e}"));
                    continue;
                }
            };
            let nll: f64 = xs.iter().map(|z| model.score_standardized(z)).sum();
            let free = k * (d + d * (d + 1) / 2) + (k - 1);
            let bic = 2.0 * nll + free as f64 * (n as f64).ln();
            if !bic.is_finite() {
                last_err = Some(format!("{k} components: non-finite likelihood"));
                continue;
            }
            model.training.bic = bic;
            if best.as_ref().is_none_or(|(b, _)| bic < *b) {
                best = Some((bic, model));
            }
        }
        let Some((_, mut model)) = best else {
            return Err(ModelError::Fit(
                last_err.unwrap_or_else(|| "no mixture could be fitted".into()),
            ));
        };
        let k = model.components.len();
        let mut scores: Vec<f64> = xs.iter().map(|z| model.score_standardized(z)).collect();
        scores.sort_by(f64::total_cmp);
        // The threshold from out-of-fold scores: each record scored by a mixture fitted
        // without it, as new results will be. In-sample scores are optimistic (the mixture
        // fitted those very points), which would flag more fresh normal results than the
        // quantile promises.
        let mut oof = Vec::with_capacity(n);
        let mut method = format!("{FOLDS}-fold out-of-fold score quantile");
        if n >= FOLDS * params.min_samples.max(2) {
            for f in 0..FOLDS {
                let train_rows: Vec<usize> = (0..n).filter(|i| i % FOLDS != f).collect();
                let fold = x.select(ndarray::Axis(0), &train_rows);
                match mixture(event_type, &spec, &fold, k, params) {
                    Ok(m) => oof.extend(
                        (0..n)
                            .filter(|i| i % FOLDS == f)
                            .map(|i| m.score_standardized(&xs[i])),
                    ),
                    Err(_) => {
                        oof.clear();
                        break;
                    }
                }
            }
        }
        if oof.len() != n {
            method = "in-sample score quantile".into();
            oof = scores.clone();
        }
        oof.sort_by(f64::total_cmp);
        model.threshold = quantile(&oof, params.threshold_quantile);
        model.training.threshold_method = method;
        let t = &mut model.training;
        t.n_samples = n;
        t.n_components = model.components.len();
        t.reg_covariance = params.reg_covariance;
        t.threshold_quantile = params.threshold_quantile;
        t.score_mean = scores.iter().sum::<f64>() / n as f64;
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.5", 0.995)] {
            t.score_quantiles.insert(name.into(), quantile(&scores, q));
        }
        t.score_quantiles
            .insert("max".into(), *scores.last().expect("n ≥ 2"));
        Ok(model)
    }

    /// Checks the parameters and computes what scoring needs (after deserializing).
    fn prepare(&mut self) -> Result<(), ModelError> {
        let d = self.features.len();
        let f = &self.features;
        if d == 0 || f.means.len() != d || f.stds.len() != d {
            return Err(ModelError::Invalid(
                "features, means and stds differ in length".into(),
            ));
        }
        if f.stds.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ModelError::Invalid("a std is not positive".into()));
        }
        if self.components.is_empty() {
            return Err(ModelError::Invalid("no components".into()));
        }
        if self.threshold.is_nan() {
            return Err(ModelError::Invalid("threshold is not a number".into()));
        }
        self.prepared = self
            .components
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if c.mean.len() != d || !(c.weight > 0.0 && c.weight <= 1.0 + 1e-9) {
                    return Err(ModelError::Invalid(format!(
                        "component {i}: bad weight or mean"
                    )));
                }
                let chol = cholesky(&c.covariance).ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "component {i}: covariance is not positive definite"
                    ))
                })?;
                let log_det = 2.0 * (0..d).map(|j| chol[j][j].ln()).sum::<f64>();
                Ok(Prepared {
                    log_weight: c.weight.ln(),
                    mean: c.mean.clone(),
                    chol,
                    log_det,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Parses and checks a stored model.
    pub fn from_json(bytes: &[u8]) -> Result<TypeModel, ModelError> {
        let mut m: TypeModel =
            serde_json::from_slice(bytes).map_err(|e| ModelError::Invalid(e.to_string()))?;
        if m.format != FORMAT {
            return Err(ModelError::Invalid(format!(
                "format {} (this bridge reads {FORMAT})",
                m.format
            )));
        }
        m.prepare()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a model serializes")
    }

    /// The negative log-likelihood of a standardized vector (its length must be the number
    /// of features).
    pub fn score_standardized(&self, z: &[f64]) -> f64 {
        let d = z.len();
        let c0 = d as f64 * (2.0 * std::f64::consts::PI).ln();
        let per_component = self.prepared.iter().map(|p| {
            // Solve L·y = z - mean; the squared Mahalanobis distance is |y|².
            let mut y = vec![0.0; d];
            let mut maha = 0.0;
            for i in 0..d {
                let s: f64 = (0..i).map(|k| p.chol[i][k] * y[k]).sum();
                y[i] = (z[i] - p.mean[i] - s) / p.chol[i][i];
                maha += y[i] * y[i];
            }
            p.log_weight - 0.5 * (c0 + p.log_det + maha)
        });
        -log_sum_exp(per_component)
    }

    /// The score of a raw feature map; `None` if none of the model's features is present.
    pub fn score_fields(&self, fields: &BTreeMap<String, f64>) -> Option<f64> {
        self.features
            .standardize(fields)
            .map(|z| self.score_standardized(&z))
    }

    /// The feature that is furthest from its training mean (name, z-score), to explain a score.
    pub fn largest_deviation(&self, fields: &BTreeMap<String, f64>) -> Option<(String, f64)> {
        let z = self.features.standardize(fields)?;
        z.iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, z)| (self.features.names[i].clone(), *z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator (xorshift64*) with Box–Muller normals.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.max(1))
        }
        pub fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        pub fn normal(&mut self, mean: f64, std: f64) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            mean + std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    fn row(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// Voltage, current and their product (a result computed from the inputs: collinear-ish).
    fn meter(rng: &mut Rng) -> BTreeMap<String, f64> {
        let v = rng.normal(230.0, 3.0);
        let i = rng.normal(10.0, 2.0);
        row(&[
            ("input.voltage_v", v),
            ("input.current_a", i),
            ("result.power_w", v * i),
        ])
    }

    #[test]
    fn cholesky_and_quantile() {
        let l = cholesky(&[vec![4.0, 2.0], vec![2.0, 3.0]]).unwrap();
        assert_eq!(l[0][0], 2.0);
        assert_eq!(l[1][0], 1.0);
        assert!((l[1][1] - 2f64.sqrt()).abs() < 1e-12);
        assert!(cholesky(&[vec![1.0, 2.0], vec![2.0, 1.0]]).is_none());
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert_eq!(quantile(&s, 0.875), 4.5);
        assert_eq!(quantile(&s, 1.0), 5.0);
    }

    #[test]
    fn one_gaussian_scores_like_the_closed_form() {
        // One component with identity covariance: NLL = d/2·ln 2π + |z|²/2.
        let mut m = TypeModel {
            format: FORMAT,
            event_type: "t".into(),
            algorithm: ALGORITHM.into(),
            score: SCORE.into(),
            features: FeatureSpec {
                names: vec!["input.a".into(), "input.b".into()],
                means: vec![10.0, 0.0],
                stds: vec![2.0, 1.0],
            },
            components: vec![Component {
                weight: 1.0,
                mean: vec![0.0, 0.0],
                covariance: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            }],
            threshold: 5.0,
            training: TrainingStats::default(),
            prepared: vec![],
        };
        m.prepare().unwrap();
        let s = m
            .score_fields(&row(&[("input.a", 14.0), ("input.b", 1.0)]))
            .unwrap();
        let want = (2.0 * std::f64::consts::PI).ln() + (4.0 + 1.0) / 2.0;
        assert!((s - want).abs() < 1e-12, "{s} vs {want}");
        // JSON round trip scores the same; a broken covariance is refused.
        let back = TypeModel::from_json(&m.to_json()).unwrap();
        assert_eq!(
            back.score_fields(&row(&[("input.a", 14.0), ("input.b", 1.0)])),
            Some(s)
        );
        m.components[0].covariance[1][1] = -1.0;
        let e = TypeModel::from_json(&m.to_json()).unwrap_err();
        assert!(e.to_string().contains("positive definite"), "{e}");
    }

    #[test]
    fn fit_separates_outliers_from_normal_readings() {
        let mut rng = Rng::new(7);
        let rows: Vec<_> = (0..2000).map(|_| meter(&mut rng)).collect();
        let m = TypeModel::fit("meter", &rows, &[], &FitParams::default()).unwrap();
        assert_eq!(m.features.len(), 3);
        assert_eq!(m.training.n_samples, 2000);
        assert!((1..=3).contains(&m.training.n_components));
        let w: f64 = m.components.iter().map(|c| c.weight).sum();
        assert!((w - 1.0).abs() < 1e-6, "weights sum to {w}");
        assert!(m.threshold > m.training.score_quantiles["p50"]);

        // Fresh normal readings: about 0.5 % above the threshold.
        let fresh: Vec<_> = (0..2000).map(|_| meter(&mut rng)).collect();
        let fp = fresh
            .iter()
            .filter(|r| m.score_fields(r).unwrap() > m.threshold)
            .count();
        assert!(fp <= 40, "{fp} of 2000 normal readings flagged");

        // A current spike, a voltage sag, and a power that does not fit volts × amps (each
        // value alone within the normal range): all flagged.
        for r in [
            row(&[
                ("input.voltage_v", 230.0),
                ("input.current_a", 25.0),
                ("result.power_w", 5750.0),
            ]),
            row(&[
                ("input.voltage_v", 190.0),
                ("input.current_a", 10.0),
                ("result.power_w", 1900.0),
            ]),
            row(&[
                ("input.voltage_v", 230.0),
                ("input.current_a", 7.0),
                ("result.power_w", 2900.0),
            ]),
        ] {
            let s = m.score_fields(&r).unwrap();
            assert!(s > m.threshold, "{r:?}: {s} ≤ {}", m.threshold);
        }
        let (name, z) = m
            .largest_deviation(&row(&[("input.current_a", 25.0)]))
            .unwrap();
        assert_eq!(name, "input.current_a");
        assert!(z > 5.0);
    }

    #[test]
    fn two_clusters_and_too_few_samples() {
        let mut rng = Rng::new(3);
        // Two operating modes (idle and load): a mixture fits them better than one Gaussian.
        let rows: Vec<_> = (0..1500)
            .map(|i| {
                let (c, s) = if i % 3 == 0 { (0.5, 0.1) } else { (12.0, 1.0) };
                row(&[
                    ("input.current_a", rng.normal(c, s)),
                    ("input.temp_c", rng.normal(40.0, 2.0)),
                ])
            })
            .collect();
        let m = TypeModel::fit("pump", &rows, &[], &FitParams::default()).unwrap();
        assert!(m.training.n_components >= 2, "{:?}", m.training);
        // Between the modes is anomalous although within the overall range.
        let s = m
            .score_fields(&row(&[("input.current_a", 6.0), ("input.temp_c", 40.0)]))
            .unwrap();
        assert!(s > m.threshold, "{s} ≤ {}", m.threshold);

        let e = TypeModel::fit("pump", &rows[..10], &[], &FitParams::default()).unwrap_err();
        assert!(
            matches!(e, ModelError::NotEnoughSamples { n: 10, .. }),
            "{e}"
        );
    }
}
