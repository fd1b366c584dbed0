//! The engine's configuration: topic pattern, input limits and event types.
//!
//! These types are embedded in the agent's (and the bridge's) TOML config and are plain data:
//! [`Engine::new`](crate::Engine::new) compiles and validates them, and every problem it finds
//! is a [`SpecError`] naming the path, e.g. `event_types.meter.calc[1].expr: unknown variable
//! 'volts' (did you mean 'voltage'?)`.
//!
//! ```toml
//! topic = "devices/{device}/events/{type}"
//!
//! [event_types.meter]
//! description = "Cumulative energy meter"
//! allowed_devices = ["meter-*"]          # exact names or prefix*
//! max_clock_skew_s = 300                 # ts at most 300 s ahead of received_at
//! # max_age_s = 86400                     # and at most a day behind (absent: any age)
//!
//! [event_types.meter.constants]          # named values usable in expressions
//! tariff_eur_per_kwh = 0.25
//!
//! [event_types.meter.fields]
//! kwh = { type = "number", required = true, min = 0, unit = "kWh" }
//! state = { type = "string", enum = ["on", "off"] }
//!
//! [[event_types.meter.rules]]            # must hold before calculating
//! name = "counter_monotonic"
//! expr = "!has_prev || kwh >= prev.kwh"
//! message = "cumulative kWh must not decrease"
//!
//! [[event_types.meter.calc]]             # derived fields, in order
//! name = "consumption_kwh"
//! expr = "delta(\"kwh\")"
//!
//! [[event_types.meter.checks]]           # must hold for the results
//! name = "consumption_non_negative"
//! expr = "consumption_kwh >= 0"
//!
//! [event_types.meter.anomaly]            # streaming detectors (not part of calc_version)
//! fields = ["kwh"]                       # numeric data or derived fields
//! # warmup = 60, alpha = 0.3, drift_alpha = 0.03, z_threshold = 6, drift_threshold = 12,
//! # stuck_repeats = 8
//! ```

use std::collections::BTreeMap;

use proto::Limits;
use serde::{Deserialize, Serialize};

/// The default topic pattern (INTERFACES.md).
pub const DEFAULT_TOPIC: &str = "devices/{device}/events/{type}";

fn default_topic() -> String {
    DEFAULT_TOPIC.to_string()
}

fn default_true() -> bool {
    true
}

/// Top level: everything the engine needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSpec {
    /// MQTT topic pattern; `{device}` and `{type}` each stand for exactly one topic level.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Hard limits applied while decoding a payload.
    #[serde(default)]
    pub limits: Limits,
    /// Event types by name (the `{type}` topic level).
    #[serde(default)]
    pub event_types: BTreeMap<String, EventTypeSpec>,
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            topic: default_topic(),
            limits: Limits::default(),
            event_types: BTreeMap::new(),
        }
    }
}

/// One event type: its data schema, rules, calculation and output checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTypeSpec {
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Devices allowed to send this type: exact names or a prefix ending in `*`
    /// (`"meter-*"`). Absent = any device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_devices: Option<Vec<String>>,
    /// How far `ts` may be ahead of the gateway's clock (`received_at`), in seconds: a device
    /// clock running ahead is a fault. Absent = not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clock_skew_s: Option<u64>,
    /// How far `ts` may lie behind `received_at`, in seconds. Absent = any age: devices that
    /// buffer readings while offline legitimately send old ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
    /// Named constants (numbers, strings, booleans) usable in every expression of the type,
    /// e.g. a tariff. They are part of the calculation version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constants: BTreeMap<String, serde_json::Value>,
    /// The fields of `data`. A field not declared here is rejected.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// Business rules over the event and the device's previous reading; all must be true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// Derived fields, computed in order; a later one may use earlier ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calc: Vec<CalcSpec>,
    /// Invariants on the calculated result; all must be true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<RuleSpec>,
    /// Streaming anomaly detectors over numeric fields. Not part of the calculation version:
    /// they flag a result, they never change its values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalySpec>,
}

/// `[event_types.X.anomaly]`: which numeric fields to watch, and the detectors' knobs (see
/// [`crate::anomaly`]). Every knob has a default tuned on the labelled synthetic streams in
/// `engine/tests/anomaly_detection.rs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalySpec {
    /// Numeric data fields and/or derived (calc) fields, e.g. `["voltage_v", "power_w"]`.
    pub fields: Vec<String>,
    /// Samples per device and field before any flag: the baselines must settle first.
    #[serde(default = "AnomalySpec::default_warmup")]
    pub warmup: u32,
    /// Weight of a new sample in the fast baseline (spikes, stuck), in (0, 1).
    #[serde(default = "AnomalySpec::default_alpha")]
    pub alpha: f64,
    /// Weight of a new sample in the slow baseline (drift), in (0, `alpha`).
    #[serde(default = "AnomalySpec::default_drift_alpha")]
    pub drift_alpha: f64,
    /// A spike: the robust z-score against the fast baseline exceeds this.
    #[serde(default = "AnomalySpec::default_z_threshold")]
    pub z_threshold: f64,
    /// A drift: the CUSUM of standardized residuals against the slow baseline exceeds this.
    #[serde(default = "AnomalySpec::default_drift_threshold")]
    pub drift_threshold: f64,
    /// Stuck: at least this many identical values in a row (more when the field normally
    /// repeats values, see [`crate::anomaly`]).
    #[serde(default = "AnomalySpec::default_stuck_repeats")]
    pub stuck_repeats: u32,
}

impl AnomalySpec {
    fn default_warmup() -> u32 {
        60
    }
    fn default_alpha() -> f64 {
        0.3
    }
    fn default_drift_alpha() -> f64 {
        0.03
    }
    fn default_z_threshold() -> f64 {
        6.0
    }
    fn default_drift_threshold() -> f64 {
        12.0
    }
    fn default_stuck_repeats() -> u32 {
        8
    }

    /// The given fields with every knob at its default.
    pub fn new<S: Into<String>>(fields: impl IntoIterator<Item = S>) -> AnomalySpec {
        AnomalySpec {
            fields: fields.into_iter().map(Into::into).collect(),
            warmup: Self::default_warmup(),
            alpha: Self::default_alpha(),
            drift_alpha: Self::default_drift_alpha(),
            z_threshold: Self::default_z_threshold(),
            drift_threshold: Self::default_drift_threshold(),
            stuck_repeats: Self::default_stuck_repeats(),
        }
    }
}

/// The JSON type a data field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Any finite number. Expressions see it as a 64-bit float.
    #[serde(alias = "float")]
    Number,
    /// A whole number (`3`, `3.0`). Expressions see it as a 64-bit float.
    #[serde(alias = "int")]
    Integer,
    String,
    #[serde(alias = "bool")]
    Boolean,
    /// A JSON object: validated for presence and size only, not usable in expressions.
    Object,
    /// A JSON array: validated for presence and size only, not usable in expressions.
    Array,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::String => "string",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }

    /// Number, integer, string or boolean: a value expressions can use.
    pub fn is_scalar(self) -> bool {
        !matches!(self, FieldType::Object | FieldType::Array)
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, FieldType::Number | FieldType::Integer)
    }
}

impl std::fmt::Display for FieldType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One data field and its constraints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Absent (or `null`) is an error.
    #[serde(default)]
    pub required: bool,
    /// Smallest allowed value (number, integer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest allowed value (number, integer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The only allowed values (string, number, integer).
    #[serde(rename = "enum", default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<serde_json::Value>>,
    /// Fewest characters (string) or elements/keys (array, object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_len: Option<usize>,
    /// Most characters (string) or elements/keys (array, object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// What expressions see when an optional field is absent. Without a default an absent
    /// number is NaN, an absent string `""` and an absent boolean `false`; `has("field")`
    /// tells absence apart. The stored input is never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl FieldSpec {
    /// A field of type `ty` with no constraints (handy in tests and code-built specs).
    pub fn new(ty: FieldType) -> FieldSpec {
        FieldSpec {
            ty,
            required: false,
            min: None,
            max: None,
            allowed: None,
            min_len: None,
            max_len: None,
            default: None,
            unit: None,
            description: None,
        }
    }
}

/// A rule or a check: a boolean expression that must be true.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Named in every rejection.
    pub name: String,
    pub expr: String,
    /// Explains a failure; the values of the variables the expression read are appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A derived field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalcSpec {
    /// The key in the result; an identifier (`[A-Za-z_][A-Za-z0-9_]*`).
    pub name: String,
    /// Must give a finite number, a string or a boolean.
    pub expr: String,
    /// `false`: an intermediate value later calc entries and checks can use, left out of the
    /// result.
    #[serde(default = "default_true")]
    pub output: bool,
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Documentation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A configuration problem, with the path of the offending entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    /// E.g. `event_types.meter.calc[1].expr`.
    pub path: String,
    pub message: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            path: path.into(),
            message: message.into(),
        }
    }
}
