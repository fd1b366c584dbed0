//! Streaming anomaly detectors: per device, event type and watched numeric field, a fixed
//! small [`FieldDetector`] that flags **spikes**, **drifts** and **stuck** sensors.
//!
//! Configured per event type (`[event_types.X.anomaly]`, [`AnomalySpec`]); run by
//! [`Engine::process`](crate::Engine::process) after calc and checks for accepted events.
//!
//! # Model
//! Each field keeps two baselines and a scale, all updated in O(1) with no window:
//! - a **fast** baseline, Holt's linear model (level + trend, gains `alpha` and `alpha/10`),
//!   so a daily cycle sampled every minute or so is followed and does not look anomalous;
//! - a robust **scale** σ = 1.2533 · the exponentially weighted mean absolute residual of the
//!   fast baseline (for Gaussian noise E|e| = σ·√(2/π); 1.2533 = √(π/2));
//! - a **slow** baseline: a level with gain `drift_alpha` extrapolated by a slowly smoothed
//!   copy of the fast trend, so it follows a cycle's slope but not a sudden ramp.
//!
//! Detectors, each a statistic over its threshold (the detector's *score*; ≥ 1 fires):
//! - **spike**: `|x − fast forecast| / σ` over `z_threshold`.
//! - **drift**: a two-sided CUSUM of standardized slow-baseline residuals (each clipped to
//!   ±[`CLIP`] so a single spike adds at most `CLIP − DRIFT_K`), over `drift_threshold`. On
//!   an alarm the slow baseline adopts the fast one's level (the new level is accepted) and
//!   the sums restart, so one shift raises one or a few flags, not a flag per event forever.
//! - **stuck**: the current run of bit-identical values over `max(stuck_repeats, r)`, where
//!   r is the run length that the field's own change rate p makes unlikely by chance,
//!   `(1 − p)^(r−1) ≤ 1e-6` (a humidity reported in whole percent repeats often; a voltage in
//!   mV does not). A field that changes in fewer than [`MIN_CHANGE_RATE`] of its samples is
//!   never called stuck.
//!
//! Rules that keep legitimate behaviour from reading as an anomaly (issue 17, measured on
//! `tests/anomaly_fleet.rs`):
//! - σ is floored at half the field's resolution (the smallest change seen);
//! - a **level step** (two readings in a row off the forecast on the same side and agreeing
//!   with each other) moves the baselines to the new level at once; on a *steppy* field (one
//!   that made such steps lately, `STEPPY_RATE`) an outlier is held for the next reading
//!   and flagged as a spike only when that one came back;
//! - a reading whose previous one is missing (gap, rejected or late message) is not judged;
//! - a drift in two watched fields at once is a change of regime, accepted.
//!
//! The event's `anomaly_score` is the maximum score over fields and detectors (0 during
//! warm-up and when nothing is configured; at most [`HELD_SCORE`] for readings not judged or
//! held); it is ≥ 1 exactly when a detector fires, and each firing detector adds the flag
//! `anomaly:{spike|drift|stuck}:{field}`.
//!
//! # Invariants
//! - **Bounded.** A [`FieldDetector`] is 17 numbers whatever the stream's length.
//! - **Not poisoned.** Residuals update the baselines clipped to ±[`CLIP`]·σ (winsorized), and
//!   while a field is stuck the baselines only extrapolate.
//! - **Deterministic and total.** No clock, no randomness; a non-finite value is ignored (no
//!   score, no update), and every stored number stays finite.
//! - **Forward only.** Events that are out of order, late or replayed are scored against the
//!   current state without changing it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schema::Schema;
use crate::spec::{AnomalySpec, SpecError};
use crate::value::EvalValue;

/// Residuals are clipped to this many σ when they update a baseline or enter the CUSUM.
pub const CLIP: f64 = 4.0;
/// The CUSUM's allowance per sample, in σ: it looks for shifts of about twice this.
pub const DRIFT_K: f64 = 1.0;
/// Below this fraction of samples that change value a field is "constant", never stuck.
pub const MIN_CHANGE_RATE: f64 = 0.2;
/// The chance probability below which a run of repeats counts as stuck.
const STUCK_CHANCE: f64 = 1e-6;
/// Trend gain relative to the level gain (Holt's β).
const TREND_BETA: f64 = 0.1;
/// Gain of the scale and of the change rate.
const SCALE_GAIN: f64 = 0.02;
/// Scores are capped here so that a zero scale cannot produce infinities.
const MAX_SCORE: f64 = 1e6;
/// The score of a reading the detectors do not judge (after a missing or late reading, out
/// of order) or hold for confirmation: just below 1, so it never flags but a user's lower
/// cut-off still sees it.
pub const HELD_SCORE: f64 = 0.99;
/// A level step: two readings in a row at least this fraction of `z_threshold` off the
/// forecast on the same side, and within it of each other.
const STEP_Z: f64 = 0.5;
/// Gain of the step rate: about the last thousand samples.
const STEP_GAIN: f64 = 1e-3;
/// Above this rate of accepted level steps a field is *steppy* (a meter's power as appliances
/// switch, a receiver's accuracy at covered stops): an outlier is held until the next reading
/// says whether it came back (a spike, flagged then) or stayed (a step, accepted). One step
/// makes a field steppy for about a thousand samples.
const STEPPY_RATE: f64 = 0.35 * STEP_GAIN;
/// A drift seen at once in another watched field of the same event (its drift score at least
/// this) is a change of regime (a heater: the temperature rises and the humidity falls), not
/// one sensor's drift: it is accepted, not flagged.
const REGIME_DRIFT: f64 = 0.3;

/// What kind of anomaly a detector looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Spike,
    Drift,
    Stuck,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spike => "spike",
            Kind::Drift => "drift",
            Kind::Stuck => "stuck",
        }
    }
}

/// The detectors' knobs, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub warmup: u32,
    pub alpha: f64,
    pub drift_alpha: f64,
    pub z_threshold: f64,
    pub drift_threshold: f64,
    pub stuck_repeats: u32,
}

impl Params {
    /// `path` names the `anomaly` table, e.g. `event_types.meter.anomaly`.
    pub fn from_spec(path: &str, spec: &AnomalySpec) -> Result<Params, SpecError> {
        let bad = |knob: &str, m: &str| Err(SpecError::new(format!("{path}.{knob}"), m));
        let open01 = |x: f64| x.is_finite() && x > 0.0 && x < 1.0;
        if !open01(spec.alpha) {
            return bad("alpha", "must be between 0 and 1 (exclusive)");
        }
        if !open01(spec.drift_alpha) || spec.drift_alpha >= spec.alpha {
            return bad(
                "drift_alpha",
                "must be between 0 and alpha (exclusive): the drift baseline is the slow one",
            );
        }
        if !(spec.z_threshold.is_finite() && spec.z_threshold > 0.0) {
            return bad("z_threshold", "must be a positive number");
        }
        if !(spec.drift_threshold.is_finite() && spec.drift_threshold > 0.0) {
            return bad("drift_threshold", "must be a positive number");
        }
        if spec.stuck_repeats < 2 {
            return bad("stuck_repeats", "must be at least 2");
        }
        if spec.warmup < 2 {
            return bad("warmup", "must be at least 2 samples");
        }
        Ok(Params {
            warmup: spec.warmup,
            alpha: spec.alpha,
            drift_alpha: spec.drift_alpha,
            z_threshold: spec.z_threshold,
            drift_threshold: spec.drift_threshold,
            stuck_repeats: spec.stuck_repeats,
        })
    }
}

impl Default for Params {
    fn default() -> Params {
        #[allow(clippy::expect_used)] // the defaults are valid (tested)
        Params::from_spec("", &AnomalySpec::new(["x"])).expect("defaults are valid")
    }
}

/// One field's detector state: a fixed handful of numbers (persisted with the device).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldDetector {
    /// Samples learned from (saturating).
    n: u32,
    level: f64,
    trend: f64,
    /// EW mean absolute residual of the fast baseline.
    mad: f64,
    slow_level: f64,
    slow_trend: f64,
    cusum_hi: f64,
    cusum_lo: f64,
    /// The last value and how many times in a row it has been seen.
    last: f64,
    run: u32,
    /// EW fraction of samples that differed from the one before (runs are folded in when
    /// they end, so a stuck run does not lower it while it lasts).
    change_rate: f64,
    // Added in issue 17; states written before load them as 0 (`serde(default)`); short
    // keys keep a persisted detector within its 200 bytes of CBOR.
    /// The smallest change between consecutive values seen (0: none yet): the field's
    /// resolution, a floor under σ so that a coarse sensor's 1-unit steps are not spikes.
    #[serde(default, rename = "q")]
    quantum: f64,
    /// The last outlier's value and its signed z (0: the last reading was no outlier), so the
    /// next reading can tell a spike (it came back) from a level step (it stayed).
    #[serde(default, rename = "h")]
    held: f64,
    #[serde(default, rename = "hz")]
    held_z: f64,
    /// The held outlier is the jump back at the end of a stuck run.
    #[serde(default, rename = "hs")]
    held_after_stuck: bool,
    /// EW rate of accepted level steps per sample.
    #[serde(default, rename = "sr")]
    step_rate: f64,
    /// The seq of the last reading learned from (0: none): a reading whose predecessor is
    /// missing (a gap, a rejected or late message) is scored but not judged.
    #[serde(default, rename = "sq")]
    seq: u64,
}

/// One field's verdict on one sample: each detector's statistic over its threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    pub spike: f64,
    pub drift: f64,
    pub stuck: f64,
    /// The CUSUM sums after this sample (before any alarm reset).
    cusum_hi: f64,
    cusum_lo: f64,
    /// False during warm-up: the scores are for information, nothing fires.
    pub armed: bool,
    /// This reading confirms the held outlier before it as a level step: the baselines move
    /// to the new level.
    step: bool,
    /// This reading is an outlier (|z| ≥ `z_threshold`): kept for the next one to judge.
    outlier_z: f64,
    /// A change of regime across fields: the slow baseline adopts the fast one.
    regime: bool,
}

impl Scores {
    /// The detectors that fire, in flag order.
    pub fn fired(&self) -> impl Iterator<Item = Kind> + '_ {
        [
            (Kind::Spike, self.spike),
            (Kind::Drift, self.drift),
            (Kind::Stuck, self.stuck),
        ]
        .into_iter()
        .filter(move |(_, s)| self.armed && *s >= 1.0)
        .map(|(k, _)| k)
    }

    /// Not judged (see [`Detectors::run`]): every score capped just below 1.
    fn hold(&mut self) {
        self.spike = self.spike.min(HELD_SCORE);
        self.drift = self.drift.min(HELD_SCORE);
        self.stuck = self.stuck.min(HELD_SCORE);
    }

    /// A drift shared with another field: a change of regime, accepted (the slow baseline
    /// adopts the fast one, as after an alarm) and not flagged.
    fn regime(&mut self) {
        self.drift = self.drift.min(HELD_SCORE);
        self.cusum_hi = 0.0;
        self.cusum_lo = 0.0;
        self.regime = true;
    }

    /// The largest score (0 while not armed).
    pub fn max(&self) -> f64 {
        if self.armed {
            self.spike.max(self.drift).max(self.stuck)
        } else {
            0.0
        }
    }
}

fn ratio(stat: f64, threshold: f64) -> f64 {
    let r = stat / threshold;
    if r.is_nan() { 0.0 } else { r.min(MAX_SCORE) }
}

impl FieldDetector {
    /// The robust noise scale σ, floored at half the field's resolution (a sensor that
    /// reports whole percent cannot be more precise than that, however often it repeats) and
    /// so that a field that never varied still gives finite scores.
    fn sigma(&self) -> f64 {
        (1.2533 * self.mad)
            .max(0.5 * self.quantum)
            .max(1e-9 * self.level.abs().max(1.0))
    }

    /// Whether level steps are this field's nature (see [`STEPPY_RATE`]).
    fn steppy(&self) -> bool {
        self.step_rate > STEPPY_RATE
    }

    /// Whether the reading numbered `seq` directly follows the last one learned from.
    pub fn follows(&self, seq: u64) -> bool {
        self.seq == 0 || seq == self.seq.wrapping_add(1)
    }

    fn forecast(&self) -> f64 {
        self.level + self.trend
    }

    fn slow_forecast(&self) -> f64 {
        self.slow_level + self.slow_trend
    }

    /// The run length a field with change rate `p` reaches by chance with probability
    /// [`STUCK_CHANCE`]; `None` for a field that hardly changes.
    fn stuck_needed(&self, p: &Params) -> Option<f64> {
        let rate = self.change_rate;
        if rate < MIN_CHANGE_RATE {
            return None;
        }
        let by_chance = if rate >= 1.0 {
            0.0
        } else {
            1.0 + (STUCK_CHANCE.ln() / (1.0 - rate).ln()).ceil()
        };
        Some(by_chance.max(f64::from(p.stuck_repeats)))
    }

    /// Scores `x` against the current state without changing it. `x` must be finite.
    pub fn score(&self, x: f64, p: &Params) -> Scores {
        if self.n == 0 {
            return Scores::default();
        }
        let sigma = self.sigma();
        let z = (x - self.forecast()) / sigma;
        let mut spike = ratio(z.abs(), p.z_threshold);
        // Held for the next reading to judge from half the spike threshold on: a step too
        // small to be a spike still outruns the baselines and would read as a drift.
        let mut outlier_z = if z.abs() >= STEP_Z * p.z_threshold {
            z
        } else {
            0.0
        };
        let mut step = false;
        if self.held_z != 0.0 {
            // The reading before was an outlier: did this one stay with it or come back?
            let from_held = (x - self.held) / sigma;
            if z.signum() == self.held_z.signum()
                && z.abs() >= STEP_Z * p.z_threshold
                && from_held.abs() < STEP_Z * p.z_threshold
            {
                // It stayed: a level step, the new level is the process.
                step = true;
                outlier_z = 0.0;
                spike = ratio(from_held.abs(), p.z_threshold);
            } else if self.steppy()
                && self.held_z.abs() >= p.z_threshold
                && z.abs() < STEP_Z * p.z_threshold
            {
                // It came back: the held outlier was a spike, flagged now.
                spike = spike.max(ratio(self.held_z.abs(), p.z_threshold));
            }
        } else if self.steppy() && z.abs() >= p.z_threshold {
            spike = spike.min(HELD_SCORE);
        }
        let armed = self.n >= p.warmup;
        // An outlier held for the next reading to judge does not enter the sums: it is a
        // spike or the first reading of a step, and neither is evidence of a creep.
        let (cusum_hi, cusum_lo) = if armed && outlier_z != 0.0 {
            (self.cusum_hi, self.cusum_lo)
        } else if armed && !step {
            let z = ((x - self.slow_forecast()) / sigma).clamp(-CLIP, CLIP);
            (
                (self.cusum_hi + z - DRIFT_K).max(0.0),
                (self.cusum_lo - z - DRIFT_K).max(0.0),
            )
        } else {
            (0.0, 0.0)
        };
        let drift = ratio(cusum_hi.max(cusum_lo), p.drift_threshold);
        let run = if x.to_bits() == self.last.to_bits() {
            self.run.saturating_add(1)
        } else {
            1
        };
        let stuck = self
            .stuck_needed(p)
            .map_or(0.0, |needed| ratio(f64::from(run), needed));
        Scores {
            spike,
            drift,
            stuck,
            cusum_hi,
            cusum_lo,
            armed,
            step,
            outlier_z,
            regime: false,
        }
    }

    /// Learns from `x`, the reading numbered `seq`, which [`score`](Self::score) gave `s`.
    /// `x` must be finite.
    pub fn update_seq(&mut self, x: f64, seq: u64, s: &Scores, p: &Params) {
        self.update(x, s, p);
        self.seq = seq;
    }

    /// Learns from `x`, which [`score`](Self::score) gave `s`. `x` must be finite.
    pub fn update(&mut self, x: f64, s: &Scores, p: &Params) {
        self.n = self.n.saturating_add(1);
        let n = f64::from(self.n);
        if self.n == 1 {
            *self = FieldDetector {
                n: 1,
                level: x,
                slow_level: x,
                last: x,
                run: 1,
                ..FieldDetector::default()
            };
            return;
        }

        // Stuck run and change rate.
        let repeat = x.to_bits() == self.last.to_bits();
        let change = (x - self.last).abs();
        if !repeat && change > 0.0 && (self.quantum == 0.0 || change < self.quantum) {
            self.quantum = change;
        }
        let rate_gain = SCALE_GAIN.max(1.0 / n);
        let mut ended_stuck = false;
        if repeat {
            self.run = self.run.saturating_add(1);
        } else {
            // Fold the run that just ended in: run − 1 repeats, then this change. A run that
            // was flagged stuck was a fault, not the field's nature: it is left out.
            let was_stuck = s.armed
                && self
                    .stuck_needed(p)
                    .is_some_and(|needed| f64::from(self.run) >= needed);
            ended_stuck = was_stuck;
            let repeats = if was_stuck {
                0
            } else {
                self.run.saturating_sub(1).min(10_000) as i32
            };
            self.change_rate *= (1.0 - rate_gain).powi(repeats);
            self.change_rate += rate_gain * (1.0 - self.change_rate);
            self.run = 1;
            self.last = x;
        }
        let stuck = s.armed && s.stuck >= 1.0;

        // Baselines. While stuck, only extrapolate: the frozen value is not the process.
        // Clip once the scale means something (a few samples in), not only once armed: an
        // outlier early in the warm-up must not inflate the scale for hundreds of samples.
        let sigma = self.sigma();
        let clip_on = s.armed || self.n > 10;
        let clip = |e: f64| {
            if clip_on {
                e.clamp(-CLIP * sigma, CLIP * sigma)
            } else {
                e
            }
        };
        let a = p.alpha.max(1.0 / n);
        let e = x - self.forecast();
        // A stuck run ends in a jump back to the process: a step, but not the field's nature.
        let counted = s.step && !self.held_after_stuck;
        self.step_rate += STEP_GAIN * (f64::from(u8::from(counted)) - self.step_rate);
        self.held_z = if stuck { 0.0 } else { s.outlier_z };
        self.held = x;
        self.held_after_stuck = ended_stuck;
        if s.step && !stuck {
            // The held outlier and this reading agree on a new level: move there at once
            // rather than creep towards it at CLIP·σ per sample (and flag all the way).
            self.level = x;
            self.trend = 0.0;
            self.slow_level = x;
            self.slow_trend = 0.0;
            self.cusum_hi = 0.0;
            self.cusum_lo = 0.0;
            self.sanitize();
            return;
        }
        if stuck {
            self.level += self.trend;
            self.slow_level += self.slow_trend;
        } else {
            let ec = clip(e);
            self.level += self.trend + a * ec;
            self.trend += p.alpha * TREND_BETA * ec;
            self.mad += SCALE_GAIN.max(1.0 / n) * (ec.abs() - self.mad);
            let es = clip(x - self.slow_forecast());
            self.slow_level += self.slow_trend + p.drift_alpha.max(1.0 / n) * es;
            self.slow_trend += p.drift_alpha.max(1.0 / n) * (self.trend - self.slow_trend);
        }

        // Drift: until warm-up ends the slow baseline shadows the fast one.
        if !s.armed || ((s.drift >= 1.0 || s.regime) && !stuck) {
            self.adopt_fast();
        } else if !stuck {
            self.cusum_hi = s.cusum_hi;
            self.cusum_lo = s.cusum_lo;
        }
        self.sanitize();
    }

    /// The slow baseline takes the fast one's level (its trend stays the smoothed one: the
    /// fast trend still carries the ramp that just ended); the drift sums restart.
    fn adopt_fast(&mut self) {
        self.slow_level = self.level;
        self.cusum_hi = 0.0;
        self.cusum_lo = 0.0;
    }

    /// Belt and braces: finite inputs keep every number finite, but a state must never
    /// become NaN for good (an overflow near f64::MAX): start over instead.
    fn sanitize(&mut self) {
        let all_finite = [
            self.level,
            self.trend,
            self.mad,
            self.slow_level,
            self.slow_trend,
            self.cusum_hi,
            self.cusum_lo,
            self.change_rate,
            self.quantum,
            self.held,
            self.held_z,
            self.step_rate,
        ]
        .iter()
        .all(|v| v.is_finite());
        if !all_finite {
            *self = FieldDetector::default();
        }
    }

    /// Samples learned from.
    pub fn samples(&self) -> u32 {
        self.n
    }
}

/// Where a watched field's value comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Data,
    /// Index into the derived values.
    Derived(usize),
}

#[derive(Debug, Clone)]
struct Watched {
    name: String,
    source: Source,
}

/// The compiled `anomaly` table of one event type.
#[derive(Debug, Clone)]
pub(crate) struct Detectors {
    fields: Vec<Watched>,
    params: Params,
}

/// The detectors' verdict on one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Verdict {
    /// `anomaly:{kind}:{field}`, in field order then spike, drift, stuck.
    pub flags: Vec<String>,
    /// Max over fields and detectors of statistic/threshold; ≥ 1 iff a flag was raised.
    pub score: f64,
}

/// Per event type: field name → detector. Bounded by the configured field list.
pub type TypeDetectors = BTreeMap<String, FieldDetector>;

impl Detectors {
    /// `path` is the event type's, e.g. `event_types.meter`; `derived` the calc names.
    pub fn compile(
        path: &str,
        spec: &AnomalySpec,
        schema: &Schema,
        derived: &[String],
    ) -> Result<Detectors, SpecError> {
        let path = format!("{path}.anomaly");
        let params = Params::from_spec(&path, spec)?;
        if spec.fields.is_empty() {
            return Err(SpecError::new(
                format!("{path}.fields"),
                "lists no field: name the numeric fields to watch",
            ));
        }
        let mut fields: Vec<Watched> = Vec::with_capacity(spec.fields.len());
        for (i, name) in spec.fields.iter().enumerate() {
            let err = |m: String| Err(SpecError::new(format!("{path}.fields[{i}]"), m));
            if fields.iter().any(|w| &w.name == name) {
                return err(format!("'{name}' is listed twice"));
            }
            let source = if let Some(f) = schema.index_of(name).map(|j| &schema.fields[j]) {
                if !f.ty.is_numeric() {
                    return err(format!(
                        "'{name}' is a {} field: only numeric fields can be watched",
                        f.ty
                    ));
                }
                Source::Data
            } else if let Some(j) = derived.iter().position(|d| d == name) {
                Source::Derived(j)
            } else {
                let numeric: Vec<&str> = schema
                    .fields
                    .iter()
                    .filter(|f| f.ty.is_numeric())
                    .map(|f| f.name.as_str())
                    .chain(derived.iter().map(String::as_str))
                    .collect();
                return err(format!(
                    "unknown field '{name}' (data and derived fields: {})",
                    numeric.join(", ")
                ));
            };
            fields.push(Watched {
                name: name.clone(),
                source,
            });
        }
        Ok(Detectors { fields, params })
    }

    /// Scores the event's watched fields and, when `learn`, updates their detectors in
    /// `state`. A field that is absent, non-numeric (a derived string or boolean) or not
    /// finite is skipped. `seq` is the event's: an in-order event whose field's last learned
    /// reading is not the one just before it (a gap, a rejected or late message in between:
    /// the baselines may be stale) is scored but not judged, its score capped at
    /// [`HELD_SCORE`]. Events not learned from (late, replayed) are judged against the
    /// current state as before.
    pub fn run(
        &self,
        state: &mut TypeDetectors,
        data: &proto::Fields,
        derived: &[EvalValue],
        learn: bool,
        seq: u64,
    ) -> Verdict {
        let mut verdict = Verdict::default();
        if learn && state.len() > self.fields.len() {
            // The config lost fields since the state was written: keep memory bounded.
            state.retain(|k, _| self.fields.iter().any(|w| &w.name == k));
        }
        // Score every field first: the regime rule looks across them.
        let mut scored: Vec<(&Watched, f64, Scores)> = Vec::with_capacity(self.fields.len());
        for w in &self.fields {
            let x = match w.source {
                Source::Data => data.get(&w.name).and_then(serde_json::Value::as_f64),
                Source::Derived(j) => match derived.get(j) {
                    Some(EvalValue::Float(x)) => Some(*x),
                    Some(EvalValue::Int(n)) => Some(*n as f64),
                    _ => None,
                },
            };
            let Some(x) = x.filter(|x| x.is_finite()) else {
                continue;
            };
            let s = match state.get(&w.name) {
                Some(d) => {
                    let mut s = d.score(x, &self.params);
                    if learn && !d.follows(seq) {
                        s.hold();
                    }
                    s
                }
                None => Scores::default(),
            };
            scored.push((w, x, s));
        }
        let drifting = scored
            .iter()
            .filter(|(_, _, s)| s.armed && s.drift >= REGIME_DRIFT)
            .count();
        if drifting >= 2 {
            for (_, _, s) in &mut scored {
                s.regime();
            }
        }
        for (w, x, s) in scored {
            for kind in s.fired() {
                verdict
                    .flags
                    .push(format!("anomaly:{}:{}", kind.as_str(), w.name));
            }
            verdict.score = verdict.score.max(s.max());
            if learn {
                match state.get_mut(&w.name) {
                    Some(d) => d.update_seq(x, seq, &s, &self.params),
                    None => {
                        let mut d = FieldDetector::default();
                        d.update_seq(x, seq, &s, &self.params);
                        state.insert(w.name.clone(), d);
                    }
                }
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests;
