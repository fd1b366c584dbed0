//! The calculation: derived fields, computed in order, and the calculation version.
//!
//! Each `[[event_types.X.calc]]` entry is an expression over the data, the built-in variables,
//! the previous reading, the constants and the derived fields above it (see [`crate::expr`]).
//! A result must be a finite number, a string or a boolean; anything else (NaN, ±inf, a tuple,
//! an evaluation error) rejects the event under stage `calc`, naming the field and the values
//! it read: `calc power_w: result is NaN (voltage=absent, current=2)`.
//!
//! # Calculation version
//! [`calc_version`] names exactly which calculation produced a result: `{type}-` followed by
//! 12 hex digits of SHA-256 over a canonical, length-prefixed encoding of everything that
//! decides the derived values — the calc entries (name, expression text, `output`), the
//! type's constants and its fields' defaults — plus an engine semantics tag that changes
//! whenever the engine's own evaluation rules do. Rules, checks and descriptions are not part
//! of it. The same spec always gives the same version, on any machine.

use proto::Fields;
use sha2::{Digest, Sha256};

use crate::expr::{EvalError, Expr, Frame, Phase, ReadValues, Scope, Slots};
use crate::names;
use crate::schema::Schema;
use crate::spec::{EventTypeSpec, SpecError};
use crate::state::ScalarRef;
use crate::value::{EvalValue, show};

/// Bumped whenever the engine's evaluation semantics change (so old versions never match).
const SEMANTICS: &str = "edge-engine calc v1";

/// A derived field that could not be computed (stage `calc`), with the values it read:
/// `calc power_w: result is NaN (voltage=absent, current=2)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("calc {field}: {problem}{values}")]
pub struct CalcError {
    /// The calc entry's name.
    pub field: String,
    pub problem: CalcProblem,
    pub values: ReadValues,
}

/// What went wrong computing a derived field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalcProblem {
    #[error("evaluation failed: {0}")]
    Eval(EvalError),
    /// NaN or ±inf.
    #[error("result is {0}")]
    NotFinite(f64),
    /// A tuple or empty value (shown).
    #[error("result {0} is not a number, string or boolean")]
    NotScalar(String),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    output: bool,
    expr: Expr,
}

/// The compiled calculation of one event type.
#[derive(Debug, Clone)]
pub(crate) struct Calc {
    entries: Vec<Entry>,
    version: String,
}

/// Checks the calc names of `spec` and returns them in order.
pub(crate) fn derived_names(
    path: &str,
    spec: &EventTypeSpec,
    schema: &Schema,
    constants: &std::collections::BTreeMap<String, EvalValue>,
) -> Result<Vec<String>, SpecError> {
    let mut names: Vec<String> = Vec::with_capacity(spec.calc.len());
    for (i, c) in spec.calc.iter().enumerate() {
        let at = || format!("{path}.calc[{i}].name");
        let name = c.name.as_str();
        let problem = if !names::is_identifier(name) {
            Some(format!(
                "'{name}' is not an identifier (letters, digits and '_', not starting with a digit)"
            ))
        } else if names::is_reserved(name) {
            Some(format!("'{name}' is a built-in variable"))
        } else if schema.index_of(name).is_some() {
            Some(format!("'{name}' is also a data field"))
        } else if constants.contains_key(name) {
            Some(format!("'{name}' is also a constant"))
        } else if names.iter().any(|n| n == name) {
            Some(format!("'{name}' is used twice"))
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(SpecError::new(at(), p));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

impl Calc {
    /// `path` is the event type's, e.g. `event_types.meter`.
    pub fn compile(
        path: &str,
        type_name: &str,
        spec: &EventTypeSpec,
        scope: &Scope<'_>,
        slots: &mut Slots,
    ) -> Result<Calc, SpecError> {
        let mut entries = Vec::with_capacity(spec.calc.len());
        for (i, c) in spec.calc.iter().enumerate() {
            let expr = Expr::compile(&c.expr, Phase::Calc(i), scope, slots)
                .map_err(|e| SpecError::new(format!("{path}.calc[{i}].expr"), e.to_string()))?;
            entries.push(Entry {
                name: c.name.clone(),
                output: c.output,
                expr,
            });
        }
        Ok(Calc {
            entries,
            version: calc_version(type_name, spec),
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Computes every derived field into `derived`, keeping the slots in `values` current.
    pub fn run(
        &self,
        slots: &Slots,
        values: &mut [EvalValue],
        frame: &Frame<'_>,
        derived: &mut Vec<EvalValue>,
    ) -> Result<(), CalcError> {
        derived.clear();
        for (i, e) in self.entries.iter().enumerate() {
            let fail = |problem| CalcError {
                field: e.name.clone(),
                problem,
                values: e.expr.describe(slots, values, frame),
            };
            let v = match e.expr.eval(slots, values) {
                Ok(EvalValue::Float(x)) if x.is_finite() => EvalValue::Float(x),
                Ok(EvalValue::Float(x)) => return Err(fail(CalcProblem::NotFinite(x))),
                Ok(EvalValue::Int(n)) => EvalValue::Float(n as f64),
                Ok(v @ (EvalValue::String(_) | EvalValue::Boolean(_))) => v,
                Ok(other) => return Err(fail(CalcProblem::NotScalar(show(&other)))),
                Err(m) => return Err(fail(CalcProblem::Eval(m))),
            };
            derived.push(v);
            slots.derived_known(i, frame, derived, values);
        }
        Ok(())
    }

    /// The result's fields: the derived fields with `output = true`.
    pub fn result_fields(&self, derived: &[EvalValue]) -> Fields {
        let mut out = Fields::new();
        for (e, v) in self.entries.iter().zip(derived) {
            if !e.output {
                continue;
            }
            let json = match v {
                EvalValue::Float(x) => serde_json::Number::from_f64(*x)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null),
                EvalValue::String(s) => serde_json::Value::String(s.clone()),
                EvalValue::Boolean(b) => serde_json::Value::Bool(*b),
                _ => serde_json::Value::Null,
            };
            out.insert(e.name.clone(), json);
        }
        out
    }

    /// Every derived field (intermediates too), for the device's previous reading.
    pub fn reading_items<'a>(
        &'a self,
        derived: &'a [EvalValue],
    ) -> impl Iterator<Item = (&'a str, ScalarRef<'a>)> {
        self.entries.iter().zip(derived).filter_map(|(e, v)| {
            let s = match v {
                EvalValue::Float(x) => ScalarRef::Number(*x),
                EvalValue::String(s) => ScalarRef::Text(s),
                EvalValue::Boolean(b) => ScalarRef::Bool(*b),
                _ => return None,
            };
            Some((e.name.as_str(), s))
        })
    }
}

/// The calculation version of an event type: `{type}-` + 12 hex digits (see the module docs).
pub fn calc_version(type_name: &str, spec: &EventTypeSpec) -> String {
    fn put(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    /// Numbers by value, so `1` and `1.0` are the same constant.
    fn canonical(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(x) => format!("n{x:?}"),
                None => format!("n{n}"),
            },
            other => format!("j{other}"),
        }
    }
    let mut h = Sha256::new();
    put(&mut h, SEMANTICS);
    put(&mut h, "constants");
    for (k, v) in &spec.constants {
        put(&mut h, k);
        put(&mut h, &canonical(v));
    }
    put(&mut h, "defaults");
    for (k, f) in &spec.fields {
        if let Some(d) = &f.default {
            put(&mut h, k);
            put(&mut h, &canonical(d));
        }
    }
    put(&mut h, "calc");
    for c in &spec.calc {
        put(&mut h, &c.name);
        put(&mut h, c.expr.trim());
        put(&mut h, if c.output { "out" } else { "internal" });
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(type_name.len() + 13);
    out.push_str(type_name);
    out.push('-');
    for b in digest.iter().take(6) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{CalcSpec, FieldSpec, FieldType, RuleSpec};

    fn spec() -> EventTypeSpec {
        let mut s = EventTypeSpec::default();
        s.fields
            .insert("kwh".into(), FieldSpec::new(FieldType::Number));
        s.constants.insert("tariff".into(), serde_json::json!(0.25));
        s.calc.push(CalcSpec {
            name: "d".into(),
            expr: "delta(\"kwh\")".into(),
            output: true,
            unit: None,
            description: None,
        });
        s.calc.push(CalcSpec {
            name: "cost".into(),
            expr: "d * tariff".into(),
            output: true,
            unit: None,
            description: None,
        });
        s
    }

    #[test]
    fn version_is_stable_and_shaped() {
        let v = calc_version("meter", &spec());
        assert_eq!(v, calc_version("meter", &spec()));
        assert!(v.starts_with("meter-"));
        assert_eq!(v.len(), "meter-".len() + 12);
        assert!(v["meter-".len()..].chars().all(|c| c.is_ascii_hexdigit()));
        // Pinned: a change here means every stored result's version changes. Only ever
        // update it together with `SEMANTICS`.
        assert_eq!(v, PINNED);
    }

    const PINNED: &str = "meter-07e6188cc2ec";

    #[test]
    fn version_follows_what_decides_the_values() {
        let base = calc_version("meter", &spec());
        let mut s = spec();
        s.calc[1].expr = "d * tariff * 2".into();
        assert_ne!(calc_version("meter", &s), base, "expression");
        let mut s = spec();
        s.calc[1].name = "cost2".into();
        assert_ne!(calc_version("meter", &s), base, "name");
        let mut s = spec();
        s.calc.swap(0, 1);
        assert_ne!(calc_version("meter", &s), base, "order");
        let mut s = spec();
        s.constants.insert("tariff".into(), serde_json::json!(0.3));
        assert_ne!(calc_version("meter", &s), base, "constant");
        let mut s = spec();
        s.calc[0].output = false;
        assert_ne!(calc_version("meter", &s), base, "output");
        let mut s = spec();
        s.fields.get_mut("kwh").unwrap().default = Some(serde_json::json!(1));
        assert_ne!(calc_version("meter", &s), base, "default");
        assert_ne!(calc_version("meter2", &spec()), base, "type name");

        // Not: rules, checks, docs, surrounding whitespace, 0.25 vs 0.250, 1 vs 1.0.
        let mut s = spec();
        s.rules.push(RuleSpec {
            name: "r".into(),
            expr: "true".into(),
            message: None,
        });
        s.description = Some("doc".into());
        s.calc[0].unit = Some("kWh".into());
        s.calc[0].expr = "  delta(\"kwh\") ".into();
        s.constants
            .insert("tariff".into(), serde_json::json!(0.250));
        assert_eq!(calc_version("meter", &s), base);
        let mut a = spec();
        a.constants.insert("k".into(), serde_json::json!(1));
        let mut b = spec();
        b.constants.insert("k".into(), serde_json::json!(1.0));
        assert_eq!(calc_version("meter", &a), calc_version("meter", &b));
    }
}
