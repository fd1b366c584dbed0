//! Numeric feature vectors from a result: every top-level number (and boolean, as 0/1) of its
//! `input` and `result`, named `input.{field}` / `result.{field}`, standardized with the
//! training data's mean and standard deviation.
//!
//! Which features a type's model uses is decided at training time: the fields present in at
//! least [`MIN_COVERAGE`] of the training records, minus the configured exclusions (cumulative
//! counters such as `input.energy_kwh` only grow, so they would make every new reading look
//! anomalous) and minus constant fields (no spread to standardize by). A field missing when a
//! result is scored is imputed with the training mean (z = 0).

use std::collections::BTreeMap;

use proto::EventResult;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A field must be in this share of the training records to become a feature.
pub const MIN_COVERAGE: f64 = 0.95;
/// A standard deviation below this (relative to the mean's magnitude, or absolute near 0)
/// makes the field constant.
const MIN_STD: f64 = 1e-9;

/// The named numeric fields of a result (`input.x`, `result.y`); non-finite numbers, strings,
/// arrays and objects are left out.
pub fn raw_fields(r: &EventResult) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (section, fields) in [("input", &r.input), ("result", &r.result)] {
        for (k, v) in fields {
            let x = match v {
                Value::Number(n) => n.as_f64(),
                Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
                _ => None,
            };
            if let Some(x) = x.filter(|x| x.is_finite()) {
                out.insert(format!("{section}.{k}"), x);
            }
        }
    }
    out
}

/// The features of one event type and how to standardize them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub names: Vec<String>,
    pub means: Vec<f64>,
    pub stds: Vec<f64>,
}

/// Why no feature set could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureError {
    #[error("no training records")]
    Empty,
    #[error(
        "no usable numeric field (present in ≥ {:.0}% of the records, not excluded, not constant); fields seen: {seen}",
        MIN_COVERAGE * 100.0
    )]
    NoFeatures { seen: String },
}

impl FeatureSpec {
    /// Chooses the features and their mean and (population) standard deviation. `exclude`
    /// names fields (`input.energy_kwh`) that never become features.
    pub fn fit(
        rows: &[BTreeMap<String, f64>],
        exclude: &[String],
    ) -> Result<FeatureSpec, FeatureError> {
        if rows.is_empty() {
            return Err(FeatureError::Empty);
        }
        let mut stats: BTreeMap<&str, (usize, f64, f64)> = BTreeMap::new();
        for row in rows {
            for (k, &x) in row {
                let s = stats.entry(k.as_str()).or_insert((0, 0.0, 0.0));
                // Welford's running mean and sum of squared deviations.
                s.0 += 1;
                let d = x - s.1;
                s.1 += d / s.0 as f64;
                s.2 += d * (x - s.1);
            }
        }
        let n = rows.len() as f64;
        let mut spec = FeatureSpec {
            names: Vec::new(),
            means: Vec::new(),
            stds: Vec::new(),
        };
        for (k, (count, mean, m2)) in &stats {
            if (*count as f64) < MIN_COVERAGE * n || exclude.iter().any(|e| e == k) {
                continue;
            }
            let std = (m2 / *count as f64).sqrt();
            if !std.is_finite() || std <= MIN_STD * mean.abs().max(1.0) {
                continue;
            }
            spec.names.push(k.to_string());
            spec.means.push(*mean);
            spec.stds.push(std);
        }
        if spec.names.is_empty() {
            let seen: Vec<&str> = stats.keys().copied().collect();
            return Err(FeatureError::NoFeatures {
                seen: if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                },
            });
        }
        Ok(spec)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The standardized vector of `fields`; `None` if none of the features is present.
    pub fn standardize(&self, fields: &BTreeMap<String, f64>) -> Option<Vec<f64>> {
        let mut present = false;
        let z = self
            .names
            .iter()
            .zip(self.means.iter().zip(&self.stds))
            .map(|(name, (mean, std))| match fields.get(name) {
                Some(x) => {
                    present = true;
                    (x - mean) / std
                }
                None => 0.0,
            })
            .collect();
        present.then_some(z)
    }

    /// [`Self::standardize`] of a result.
    pub fn vector(&self, r: &EventResult) -> Option<Vec<f64>> {
        self.standardize(&raw_fields(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn raw_fields_takes_numbers_and_booleans_of_input_and_result() {
        let mut r: EventResult = serde_json::from_value(json!({
            "event_id": "d/1", "device": "d", "type": "t", "seq": 1, "ts": 0, "gateway": "g",
            "edge_seq": 1, "input": {"v": 230.5, "on": true, "name": "x", "n": {"a": 1}},
            "result": {"p": 12, "list": [1, 2]}, "calc_version": "c", "status": "ok",
            "flags": [], "anomaly_score": 0.0, "processed_at": 0, "correction": null
        }))
        .unwrap();
        let f = raw_fields(&r);
        assert_eq!(
            f,
            row(&[("input.v", 230.5), ("input.on", 1.0), ("result.p", 12.0)])
        );
        r.input.insert("v".into(), json!(null));
        assert!(!raw_fields(&r).contains_key("input.v"));
    }

    #[test]
    fn fit_standardizes_and_drops_rare_constant_and_excluded_fields() {
        let rows: Vec<_> = (0..100)
            .map(|i| {
                let mut r = row(&[
                    ("input.a", i as f64),
                    ("input.const", 5.0),
                    ("input.counter", 1000.0 + i as f64),
                ]);
                if i % 10 == 0 {
                    r.insert("input.rare".into(), 1.0);
                }
                r
            })
            .collect();
        let spec = FeatureSpec::fit(&rows, &["input.counter".to_string()]).unwrap();
        assert_eq!(spec.names, vec!["input.a"]);
        assert!((spec.means[0] - 49.5).abs() < 1e-9);
        let var: f64 = (0..100).map(|i| (i as f64 - 49.5).powi(2)).sum::<f64>() / 100.0;
        assert!((spec.stds[0] - var.sqrt()).abs() < 1e-9);
        let z = spec.standardize(&row(&[("input.a", 49.5)])).unwrap();
        assert_eq!(z, vec![0.0]);
        // A missing feature is imputed with the mean; nothing present → no vector.
        assert_eq!(spec.standardize(&row(&[("input.other", 1.0)])), None);
    }

    #[test]
    fn no_usable_field_is_an_error_naming_what_was_seen() {
        let rows = vec![row(&[("input.c", 1.0)]); 10];
        let e = FeatureSpec::fit(&rows, &[]).unwrap_err();
        assert!(e.to_string().contains("input.c"), "{e}");
        assert_eq!(FeatureSpec::fit(&[], &[]).unwrap_err(), FeatureError::Empty);
    }
}
