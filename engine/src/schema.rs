//! Structural validation of an event's `data` against its type's field schema.
//!
//! Checks, per declared field: presence (`required`; `null` counts as absent), JSON type,
//! `min`/`max`, `enum`, `min_len`/`max_len`; and that `data` holds no undeclared field. All
//! problems of one message are reported together, each naming its field
//! (`data.voltage: 612 is above max 500`).

use std::collections::BTreeMap;

use proto::{Fields, Subject};
use serde_json::Value;

use crate::fnv::FnvMap;
use crate::names::{self, BUILTIN_VARIABLES};
use crate::spec::{FieldSpec, FieldType, SpecError};
use crate::value::{self, EvalValue, Scalar, truncate, truncate_json};

/// `data` that does not fit its event type's schema (stage `schema`): every problem of the
/// message, in schema order, the undeclared fields last; shown joined with `; `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join(.problems))]
pub struct SchemaError {
    pub problems: Vec<FieldProblem>,
}

/// One problem of `data`, naming its field (`data.voltage: 612 is above max 500`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    #[error("data.{0}: required field is missing")]
    Missing(String),
    #[error("data.{0}: required field is null")]
    Null(String),
    /// The value breaks the field's type, range, enum or length (`detail` says how).
    #[error("data.{field}: {detail}")]
    Invalid { field: String, detail: String },
    /// Fields the schema does not declare (sorted), and those it does.
    #[error(
        "data: undeclared field{} {} (declared: {})",
        if .fields.len() == 1 { "" } else { "s" },
        quoted(.fields),
        if .declared.is_empty() { "none".to_string() } else { .declared.join(", ") }
    )]
    Undeclared {
        fields: Vec<String>,
        declared: Vec<String>,
    },
}

impl FieldProblem {
    /// The path of the field it names: `data.voltage`, or `data` for undeclared fields.
    pub fn path(&self) -> String {
        match self {
            FieldProblem::Missing(f)
            | FieldProblem::Null(f)
            | FieldProblem::Invalid { field: f, .. } => {
                format!("data.{f}")
            }
            FieldProblem::Undeclared { .. } => "data".to_string(),
        }
    }
}

impl SchemaError {
    /// The field of the first problem (the one the reason starts with).
    pub fn subject(&self) -> Subject {
        match self.problems.first() {
            Some(p) => Subject::Field(p.path()),
            None => Subject::Document,
        }
    }
}

fn join(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(FieldProblem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|k| format!("'{}'", truncate(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One compiled field.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub name: String,
    pub ty: FieldType,
    pub required: bool,
    min: Option<f64>,
    max: Option<f64>,
    allowed: Option<Vec<Scalar>>,
    min_len: Option<usize>,
    max_len: Option<usize>,
    /// What expressions see while the field is absent.
    pub absent: EvalValue,
}

/// The compiled schema of one event type.
#[derive(Debug, Clone, Default)]
pub(crate) struct Schema {
    pub fields: Vec<Field>,
    index: FnvMap<String, usize>,
}

impl Schema {
    /// `path` is the event type's path, e.g. `event_types.meter`.
    pub fn compile(path: &str, specs: &BTreeMap<String, FieldSpec>) -> Result<Schema, SpecError> {
        let mut schema = Schema::default();
        for (name, spec) in specs {
            let fpath = format!("{path}.fields.{name}");
            let field = compile_field(name, spec).map_err(|m| SpecError::new(fpath, m))?;
            schema.index.insert(name.clone(), schema.fields.len());
            schema.fields.push(field);
        }
        Ok(schema)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.name.as_str())
    }

    /// Validates `data`; on success `present[i]` is field `i`'s value (`None`: absent or
    /// `null`). On failure, every problem.
    pub fn validate<'d>(
        &self,
        data: &'d Fields,
        present: &mut Vec<Option<&'d Value>>,
    ) -> Result<(), SchemaError> {
        present.clear();
        let mut errors: Vec<FieldProblem> = Vec::new();
        for field in &self.fields {
            let value = data.get(&field.name).filter(|v| !v.is_null());
            match value {
                None => {
                    if field.required {
                        let name = field.name.clone();
                        errors.push(if data.contains_key(&field.name) {
                            FieldProblem::Null(name)
                        } else {
                            FieldProblem::Missing(name)
                        });
                    }
                }
                Some(v) => {
                    if let Err(detail) = field.check(v) {
                        errors.push(FieldProblem::Invalid {
                            field: field.name.clone(),
                            detail,
                        });
                    }
                }
            }
            present.push(value);
        }
        if data.len() > present.iter().filter(|p| p.is_some()).count() {
            let undeclared: Vec<String> = data
                .keys()
                .filter(|k| !self.index.contains_key(k.as_str()))
                .cloned()
                .collect();
            if !undeclared.is_empty() {
                errors.push(FieldProblem::Undeclared {
                    fields: undeclared,
                    declared: self.names().map(String::from).collect(),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SchemaError { problems: errors })
        }
    }
}

impl Field {
    fn check(&self, v: &Value) -> Result<(), String> {
        match self.ty {
            FieldType::Number | FieldType::Integer => {
                let Value::Number(n) = v else {
                    return Err(wrong_type(self.ty, v));
                };
                let Some(x) = n.as_f64().filter(|x| x.is_finite()) else {
                    return Err(format!("{n} is not a finite number"));
                };
                if self.ty == FieldType::Integer && !(n.is_i64() || n.is_u64() || x.fract() == 0.0)
                {
                    return Err(format!("expected an integer, got {n}"));
                }
                if let Some(min) = self.min.filter(|&min| x < min) {
                    return Err(format!("{n} is below min {}", num(min)));
                }
                if let Some(max) = self.max.filter(|&max| x > max) {
                    return Err(format!("{n} is above max {}", num(max)));
                }
                let listed =
                    |a: &Vec<Scalar>| a.iter().any(|a| matches!(a, Scalar::Number(y) if *y == x));
                if let Some(allowed) = self.allowed.as_ref().filter(|a| !listed(a)) {
                    return Err(format!("{n} is not one of {}", list(allowed)));
                }
                Ok(())
            }
            FieldType::String => {
                let Value::String(s) = v else {
                    return Err(wrong_type(self.ty, v));
                };
                self.check_len(|| s.chars().count(), "characters")?;
                let listed =
                    |a: &Vec<Scalar>| a.iter().any(|a| matches!(a, Scalar::Text(t) if t == s));
                if let Some(allowed) = self.allowed.as_ref().filter(|a| !listed(a)) {
                    return Err(format!("'{}' is not one of {}", truncate(s), list(allowed)));
                }
                Ok(())
            }
            FieldType::Boolean => match v {
                Value::Bool(_) => Ok(()),
                _ => Err(wrong_type(self.ty, v)),
            },
            FieldType::Object => match v {
                Value::Object(m) => self.check_len(|| m.len(), "keys"),
                _ => Err(wrong_type(self.ty, v)),
            },
            FieldType::Array => match v {
                Value::Array(a) => self.check_len(|| a.len(), "elements"),
                _ => Err(wrong_type(self.ty, v)),
            },
        }
    }

    fn check_len(&self, len: impl FnOnce() -> usize, unit: &str) -> Result<(), String> {
        if self.min_len.is_none() && self.max_len.is_none() {
            return Ok(());
        }
        let n = len();
        if let Some(min) = self.min_len.filter(|&min| n < min) {
            return Err(format!("{n} {unit}, fewer than min_len {min}"));
        }
        if let Some(max) = self.max_len.filter(|&max| n > max) {
            return Err(format!("{n} {unit}, more than max_len {max}"));
        }
        Ok(())
    }
}

fn compile_field(name: &str, spec: &FieldSpec) -> Result<Field, String> {
    if name.is_empty()
        || name.contains(['.', '"', '(', ')'])
        || name.chars().any(char::is_whitespace)
    {
        return Err(
            "a field name must be non-empty and contain no '.', quotes, parentheses or spaces"
                .to_string(),
        );
    }
    if names::is_reserved(name) {
        return Err(format!(
            "'{name}' is a built-in variable; rename the field (built-ins: {})",
            BUILTIN_VARIABLES.join(", ")
        ));
    }
    let ty = spec.ty;
    if (spec.min.is_some() || spec.max.is_some()) && !ty.is_numeric() {
        return Err(format!(
            "min/max apply to number and integer fields, not {ty}; use min_len/max_len"
        ));
    }
    for (k, v) in [("min", spec.min), ("max", spec.max)] {
        if v.is_some_and(|x| !x.is_finite()) {
            return Err(format!("{k} must be a finite number"));
        }
    }
    match (spec.min, spec.max) {
        (Some(min), Some(max)) if min > max => {
            return Err(format!("min > max ({} > {})", num(min), num(max)));
        }
        _ => {}
    }
    if (spec.min_len.is_some() || spec.max_len.is_some())
        && (ty.is_numeric() || ty == FieldType::Boolean)
    {
        return Err(format!(
            "min_len/max_len apply to string, array and object fields, not {ty}; use min/max"
        ));
    }
    match (spec.min_len, spec.max_len) {
        (Some(min), Some(max)) if min > max => {
            return Err(format!("min_len > max_len ({min} > {max})"));
        }
        _ => {}
    }
    let allowed = match &spec.allowed {
        None => None,
        Some(values) => {
            if !(ty.is_numeric() || ty == FieldType::String) {
                return Err(format!(
                    "enum applies to string, number and integer fields, not {ty}"
                ));
            }
            if values.is_empty() {
                return Err("enum is empty: no value could ever be accepted".to_string());
            }
            let mut out = Vec::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                let s = match (ty, v) {
                    (FieldType::String, Value::String(s)) => Scalar::Text(s.clone()),
                    (FieldType::Number | FieldType::Integer, Value::Number(n)) => {
                        Scalar::Number(n.as_f64().unwrap_or(f64::NAN))
                    }
                    _ => return Err(format!("enum[{i}]: {} is not a {ty}", truncate_json(v))),
                };
                out.push(s);
            }
            Some(out)
        }
    };
    let absent = match &spec.default {
        Some(_) if spec.required => {
            return Err("a required field cannot have a default".to_string());
        }
        Some(d) => {
            let probe = Field {
                name: name.to_string(),
                ty,
                required: false,
                min: spec.min,
                max: spec.max,
                allowed: allowed.clone(),
                min_len: spec.min_len,
                max_len: spec.max_len,
                absent: EvalValue::Empty,
            };
            if !ty.is_scalar() {
                return Err(format!("default applies to scalar fields, not {ty}"));
            }
            probe.check(d).map_err(|e| format!("default: {e}"))?;
            value::json_to_eval(d)
        }
        None => value::absent_value(ty),
    };
    Ok(Field {
        name: name.to_string(),
        ty,
        required: spec.required,
        min: spec.min,
        max: spec.max,
        allowed,
        min_len: spec.min_len,
        max_len: spec.max_len,
        absent,
    })
}

fn wrong_type(ty: FieldType, v: &Value) -> String {
    let got = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let article = if ty == FieldType::Integer || ty == FieldType::Object || ty == FieldType::Array {
        "an"
    } else {
        "a"
    };
    format!("expected {article} {ty}, got {got} {}", truncate_json(v))
}

fn list(allowed: &[Scalar]) -> String {
    allowed
        .iter()
        .map(|a| match a {
            Scalar::Text(t) => format!("'{t}'"),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Formats a config number without a spurious `.0`.
pub(crate) fn num(x: f64) -> String {
    format!("{x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(fields: Value) -> Result<Schema, SpecError> {
        let specs: BTreeMap<String, FieldSpec> = serde_json::from_value(fields).unwrap();
        Schema::compile("event_types.t", &specs)
    }

    fn check(s: &Schema, data: Value) -> Result<(), String> {
        let Value::Object(m) = data else { panic!() };
        let mut present = Vec::new();
        s.validate(&m, &mut present).map_err(|e| e.to_string())
    }

    fn meter() -> Schema {
        schema(json!({
            "kwh": {"type": "number", "required": true, "min": 0},
            "voltage": {"type": "number", "min": 0, "max": 500},
            "state": {"type": "string", "enum": ["on", "off"]},
            "count": {"type": "integer"},
            "name": {"type": "string", "max_len": 4},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "max_len": 2},
            "loc": {"type": "object"},
        }))
        .unwrap()
    }

    #[test]
    fn valid_data_passes_and_reports_presence() {
        let s = meter();
        let Value::Object(m) = json!({"kwh": 1.5, "state": "on", "voltage": null}) else {
            panic!()
        };
        let mut present = Vec::new();
        s.validate(&m, &mut present).unwrap();
        let kwh = s.index_of("kwh").unwrap();
        let voltage = s.index_of("voltage").unwrap();
        assert_eq!(present[kwh], Some(&json!(1.5)));
        assert_eq!(present[voltage], None, "null counts as absent");
    }

    #[test]
    fn missing_and_null_required() {
        let s = meter();
        assert_eq!(
            check(&s, json!({})).unwrap_err(),
            "data.kwh: required field is missing"
        );
        assert_eq!(
            check(&s, json!({"kwh": null})).unwrap_err(),
            "data.kwh: required field is null"
        );
    }

    #[test]
    fn wrong_types() {
        let s = meter();
        let e = check(&s, json!({"kwh": "12"})).unwrap_err();
        assert_eq!(e, "data.kwh: expected a number, got string \"12\"");
        let e = check(&s, json!({"kwh": 1, "count": 1.5})).unwrap_err();
        assert_eq!(e, "data.count: expected an integer, got 1.5");
        check(&s, json!({"kwh": 1, "count": 2.0})).unwrap();
        let e = check(&s, json!({"kwh": 1, "ok": 1})).unwrap_err();
        assert_eq!(e, "data.ok: expected a boolean, got number 1");
        let e = check(&s, json!({"kwh": 1, "loc": []})).unwrap_err();
        assert_eq!(e, "data.loc: expected an object, got array []");
    }

    #[test]
    fn ranges() {
        let s = meter();
        assert_eq!(
            check(&s, json!({"kwh": 1, "voltage": 612})).unwrap_err(),
            "data.voltage: 612 is above max 500"
        );
        assert_eq!(
            check(&s, json!({"kwh": -0.5})).unwrap_err(),
            "data.kwh: -0.5 is below min 0"
        );
        check(&s, json!({"kwh": 0, "voltage": 500})).unwrap();
    }

    #[test]
    fn enums_and_lengths() {
        let s = meter();
        assert_eq!(
            check(&s, json!({"kwh": 1, "state": "idle"})).unwrap_err(),
            "data.state: 'idle' is not one of 'on', 'off'"
        );
        assert_eq!(
            check(&s, json!({"kwh": 1, "name": "abcdé"})).unwrap_err(),
            "data.name: 5 characters, more than max_len 4"
        );
        check(&s, json!({"kwh": 1, "name": "abcé"})).unwrap();
        assert_eq!(
            check(&s, json!({"kwh": 1, "tags": [1, 2, 3]})).unwrap_err(),
            "data.tags: 3 elements, more than max_len 2"
        );
        let n = schema(json!({"mode": {"type": "integer", "enum": [1, 2, 3]}})).unwrap();
        check(&n, json!({"mode": 2})).unwrap();
        assert_eq!(
            check(&n, json!({"mode": 4})).unwrap_err(),
            "data.mode: 4 is not one of 1, 2, 3"
        );
    }

    #[test]
    fn undeclared_fields_are_named() {
        let s = meter();
        let e = check(&s, json!({"kwh": 1, "foo": 1, "bar": 2})).unwrap_err();
        assert!(
            e.starts_with("data: undeclared fields 'bar', 'foo' (declared: "),
            "{e}"
        );
    }

    #[test]
    fn all_problems_are_reported() {
        let s = meter();
        let e = check(&s, json!({"voltage": 900, "x": 1})).unwrap_err();
        assert!(e.contains("data.kwh: required field is missing"), "{e}");
        assert!(e.contains("data.voltage: 900 is above max 500"), "{e}");
        assert!(e.contains("undeclared field 'x'"), "{e}");
    }

    #[test]
    fn problems_are_typed_in_schema_order() {
        let s = meter();
        let Value::Object(m) = json!({"kwh": null, "voltage": 900, "x": 1}) else {
            panic!()
        };
        let e = s.validate(&m, &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.problems,
            [
                FieldProblem::Null("kwh".into()),
                FieldProblem::Invalid {
                    field: "voltage".into(),
                    detail: "900 is above max 500".into()
                },
                FieldProblem::Undeclared {
                    fields: vec!["x".into()],
                    declared: s.names().map(String::from).collect()
                },
            ]
        );
        let empty = schema(json!({})).unwrap();
        let Value::Object(m) = json!({"a": 1, "b": 2}) else {
            panic!()
        };
        let e = empty.validate(&m, &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data: undeclared fields 'a', 'b' (declared: none)"
        );
    }

    #[test]
    fn spec_errors_name_the_field() {
        let e = schema(json!({"v": {"type": "number", "min": 5, "max": 1}})).unwrap_err();
        assert_eq!(e.to_string(), "event_types.t.fields.v: min > max (5 > 1)");
        let e = schema(json!({"v": {"type": "string", "min": 1}})).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("event_types.t.fields.v: min/max apply"),
            "{e}"
        );
        let e = schema(json!({"v": {"type": "number", "max_len": 1}})).unwrap_err();
        assert!(e.message.starts_with("min_len/max_len apply"), "{e}");
        let e = schema(json!({"v": {"type": "string", "enum": ["a", 1]}})).unwrap_err();
        assert_eq!(e.message, "enum[1]: 1 is not a string");
        let e = schema(json!({"v": {"type": "string", "enum": []}})).unwrap_err();
        assert!(e.message.starts_with("enum is empty"), "{e}");
        let e = schema(json!({"ts": {"type": "number"}})).unwrap_err();
        assert!(e.message.contains("built-in"), "{e}");
        let e = schema(json!({"a.b": {"type": "number"}})).unwrap_err();
        assert_eq!(e.path, "event_types.t.fields.a.b");
        let e = schema(json!({"v": {"type": "number", "max": 10, "default": 20}})).unwrap_err();
        assert_eq!(e.message, "default: 20 is above max 10");
        let e =
            schema(json!({"v": {"type": "number", "required": true, "default": 1}})).unwrap_err();
        assert!(e.message.contains("cannot have a default"), "{e}");
    }
}
