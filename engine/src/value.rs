//! Values as the engine holds and shows them: evalexpr's value with the engine's numeric
//! types, the [`Scalar`] a reading stores, how JSON becomes either, and how a value from the
//! input is echoed in a reason (cut to a bounded length).
//!
//! The leaf every other module shares: it imports nothing of the engine but the field types.

use evalexpr::DefaultNumericTypes;
use serde::{Deserialize, Serialize};

use crate::spec::FieldType;

/// Longest piece of input echoed in a rejection reason.
const ECHO_MAX: usize = 40;

/// evalexpr's value with the engine's numeric types.
pub(crate) type EvalValue = evalexpr::Value<DefaultNumericTypes>;

/// A scalar field value: what a previous reading stores, what `enum` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl Scalar {
    /// Numbers, strings and booleans; `None` for null, arrays and objects.
    pub fn from_json(v: &serde_json::Value) -> Option<Scalar> {
        match v {
            serde_json::Value::Number(n) => n.as_f64().map(Scalar::Number),
            serde_json::Value::String(s) => Some(Scalar::Text(s.clone())),
            serde_json::Value::Bool(b) => Some(Scalar::Bool(*b)),
            _ => None,
        }
    }

    /// Non-finite numbers become `null` (JSON has no NaN).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Scalar::Number(x) => serde_json::Number::from_f64(*x)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Scalar::Text(s) => serde_json::Value::String(s.clone()),
            Scalar::Bool(b) => serde_json::Value::Bool(*b),
        }
    }

    pub(crate) fn to_eval(&self) -> EvalValue {
        match self {
            Scalar::Number(x) => EvalValue::Float(*x),
            Scalar::Text(s) => EvalValue::String(s.clone()),
            Scalar::Bool(b) => EvalValue::Boolean(*b),
        }
    }
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Number(x) => write!(f, "{x}"),
            Scalar::Text(s) => write!(f, "\"{}\"", truncate(s)),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A JSON value as expressions see it: numbers as floats; arrays, objects, null as empty.
pub(crate) fn json_to_eval(v: &serde_json::Value) -> EvalValue {
    match v {
        serde_json::Value::Number(n) => EvalValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => EvalValue::String(s.clone()),
        serde_json::Value::Bool(b) => EvalValue::Boolean(*b),
        _ => EvalValue::Empty,
    }
}

/// What an absent optional field without a default evaluates to.
pub(crate) fn absent_value(ty: FieldType) -> EvalValue {
    match ty {
        FieldType::Number | FieldType::Integer => EvalValue::Float(f64::NAN),
        FieldType::String => EvalValue::String(String::new()),
        FieldType::Boolean => EvalValue::Boolean(false),
        FieldType::Object | FieldType::Array => EvalValue::Empty,
    }
}

/// Formats a value for a rejection reason.
pub(crate) fn show(v: &EvalValue) -> String {
    match v {
        EvalValue::Float(x) => format!("{x}"),
        EvalValue::Int(i) => format!("{i}"),
        EvalValue::String(s) => format!("\"{}\"", truncate(s)),
        EvalValue::Boolean(b) => format!("{b}"),
        EvalValue::Tuple(t) => format!("({})", t.iter().map(show).collect::<Vec<_>>().join(", ")),
        EvalValue::Empty => "()".to_string(),
    }
}

/// At most [`ECHO_MAX`] characters of `s`, with `…` when cut.
pub(crate) fn truncate(s: &str) -> String {
    match s.char_indices().nth(ECHO_MAX) {
        None => s.to_string(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// Compact JSON of `v`, cut to [`ECHO_MAX`] characters.
pub(crate) fn truncate_json(v: &serde_json::Value) -> String {
    truncate(&v.to_string())
}
