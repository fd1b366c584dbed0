//! The pure functions expressions may call.
//!
//! evalexpr's own built-in functions are disabled: this table is the whole library, so every
//! function works on 64-bit floats (there are no integers in the engine's expressions), its
//! arity is checked when the config is loaded, and nothing depends on evalexpr's defaults.
//! The stateful functions (`delta`, `rate`, `prev`, `dt`, `has`) are not here: they are
//! resolved at compile time into per-event variables (see [`crate::expr`]).

use evalexpr::{EvalexprError, Value};

type R = Result<Value, EvalexprError>;

/// How many arguments a function takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arity {
    Exactly(usize),
    AtLeast(usize),
}

/// Mean Earth radius (IUGG), metres, used by `haversine_m`.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Name, arity, one-line description (for error hints and docs).
pub(crate) const FUNCTIONS: &[(&str, Arity, &str)] = &[
    (
        "if",
        Arity::Exactly(3),
        "if(cond, a, b): a when cond is true, else b",
    ),
    (
        "min",
        Arity::AtLeast(1),
        "smallest argument (NaN if any is NaN)",
    ),
    (
        "max",
        Arity::AtLeast(1),
        "largest argument (NaN if any is NaN)",
    ),
    ("clamp", Arity::Exactly(3), "clamp(x, lo, hi)"),
    ("floor", Arity::Exactly(1), "round down"),
    ("ceil", Arity::Exactly(1), "round up"),
    ("round", Arity::Exactly(1), "round half away from zero"),
    ("len", Arity::Exactly(1), "characters of a string"),
    (
        "haversine_m",
        Arity::Exactly(4),
        "haversine_m(lat1, lon1, lat2, lon2): great-circle distance in metres",
    ),
    ("math::abs", Arity::Exactly(1), "absolute value"),
    ("math::sqrt", Arity::Exactly(1), "square root"),
    ("math::cbrt", Arity::Exactly(1), "cube root"),
    ("math::pow", Arity::Exactly(2), "math::pow(x, y) = x^y"),
    ("math::exp", Arity::Exactly(1), "e^x"),
    ("math::exp2", Arity::Exactly(1), "2^x"),
    ("math::ln", Arity::Exactly(1), "natural logarithm"),
    ("math::log", Arity::Exactly(2), "math::log(x, base)"),
    ("math::log2", Arity::Exactly(1), "base-2 logarithm"),
    ("math::log10", Arity::Exactly(1), "base-10 logarithm"),
    ("math::hypot", Arity::Exactly(2), "sqrt(x² + y²)"),
    ("math::sin", Arity::Exactly(1), "sine (radians)"),
    ("math::cos", Arity::Exactly(1), "cosine (radians)"),
    ("math::tan", Arity::Exactly(1), "tangent (radians)"),
    ("math::asin", Arity::Exactly(1), "arc sine"),
    ("math::acos", Arity::Exactly(1), "arc cosine"),
    ("math::atan", Arity::Exactly(1), "arc tangent"),
    ("math::atan2", Arity::Exactly(2), "math::atan2(y, x)"),
    ("math::sinh", Arity::Exactly(1), "hyperbolic sine"),
    ("math::cosh", Arity::Exactly(1), "hyperbolic cosine"),
    ("math::tanh", Arity::Exactly(1), "hyperbolic tangent"),
    ("math::to_radians", Arity::Exactly(1), "degrees → radians"),
    ("math::to_degrees", Arity::Exactly(1), "radians → degrees"),
    (
        "math::is_nan",
        Arity::Exactly(1),
        "true if x is NaN (e.g. an absent optional field)",
    ),
    (
        "math::is_finite",
        Arity::Exactly(1),
        "true if x is neither NaN nor infinite",
    ),
    (
        "str::to_lowercase",
        Arity::Exactly(1),
        "lower-case a string",
    ),
    (
        "str::to_uppercase",
        Arity::Exactly(1),
        "upper-case a string",
    ),
    (
        "str::trim",
        Arity::Exactly(1),
        "strip surrounding whitespace",
    ),
    ("str::from", Arity::Exactly(1), "any value as a string"),
];

pub(crate) fn arity(name: &str) -> Option<Arity> {
    FUNCTIONS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, a, _)| *a)
}

fn err(msg: String) -> EvalexprError {
    EvalexprError::CustomMessage(msg)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Float(_) | Value::Int(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Tuple(_) => "a tuple",
        Value::Empty => "nothing",
    }
}

fn number(f: &str, v: &Value) -> Result<f64, EvalexprError> {
    match v {
        Value::Float(x) => Ok(*x),
        Value::Int(i) => Ok(*i as f64),
        other => Err(err(format!(
            "{f}: expected a number, got {}",
            type_name(other)
        ))),
    }
}

fn string<'v>(f: &str, v: &'v Value) -> Result<&'v str, EvalexprError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(err(format!(
            "{f}: expected a string, got {}",
            type_name(other)
        ))),
    }
}

/// The arguments as a slice: a tuple for two or more, one value otherwise.
fn args(v: &Value) -> &[Value] {
    match v {
        Value::Tuple(t) => t,
        Value::Empty => &[],
        one => std::slice::from_ref(one),
    }
}

fn fixed<'v, const N: usize>(f: &str, v: &'v Value) -> Result<&'v [Value; N], EvalexprError> {
    args(v).try_into().map_err(|_| {
        err(format!(
            "{f}: expected {N} arguments, got {}",
            args(v).len()
        ))
    })
}

fn num1(f: &str, v: &Value, op: fn(f64) -> f64) -> R {
    let [a] = fixed::<1>(f, v)?;
    Ok(Value::Float(op(number(f, a)?)))
}

fn num2(f: &str, v: &Value, op: fn(f64, f64) -> f64) -> R {
    let [a, b] = fixed::<2>(f, v)?;
    Ok(Value::Float(op(number(f, a)?, number(f, b)?)))
}

/// Great-circle distance between two WGS-84 coordinates in degrees, in metres.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    // Rounding can push `a` a hair outside [0, 1]; clamp so antipodes give π·R, not NaN.
    let a = a.clamp(0.0, 1.0);
    2.0 * EARTH_RADIUS_M * a.sqrt().asin()
}

fn extreme(f: &str, v: &Value, pick_max: bool) -> R {
    let mut best: Option<f64> = None;
    for a in args(v) {
        let x = number(f, a)?;
        if x.is_nan() {
            return Ok(Value::Float(f64::NAN));
        }
        best = Some(match best {
            None => x,
            Some(b) if pick_max => b.max(x),
            Some(b) => b.min(x),
        });
    }
    best.map(Value::Float)
        .ok_or_else(|| err(format!("{f}: expected at least one argument")))
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Float(x) => format!("{x}"),
        Value::Int(i) => format!("{i}"),
        Value::Boolean(b) => format!("{b}"),
        Value::Tuple(t) => format!(
            "({})",
            t.iter().map(fmt_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Empty => String::new(),
    }
}

/// Calls function `f`. Never panics; a bad argument is an error naming the function.
pub(crate) fn call(f: &str, v: &Value) -> R {
    match f {
        "if" => {
            let [c, a, b] = fixed::<3>(f, v)?;
            match c {
                Value::Boolean(true) => Ok(a.clone()),
                Value::Boolean(false) => Ok(b.clone()),
                other => Err(err(format!(
                    "if: the condition must be a boolean, got {}",
                    type_name(other)
                ))),
            }
        }
        "min" => extreme(f, v, false),
        "max" => extreme(f, v, true),
        "clamp" => {
            let [x, lo, hi] = fixed::<3>(f, v)?;
            let (x, lo, hi) = (number(f, x)?, number(f, lo)?, number(f, hi)?);
            if lo > hi || lo.is_nan() || hi.is_nan() {
                return Err(err(format!("clamp: bounds {lo} > {hi}")));
            }
            Ok(Value::Float(if x < lo {
                lo
            } else if x > hi {
                hi
            } else {
                x
            }))
        }
        "floor" => num1(f, v, f64::floor),
        "ceil" => num1(f, v, f64::ceil),
        "round" => num1(f, v, f64::round),
        "len" => {
            let [s] = fixed::<1>(f, v)?;
            Ok(Value::Float(string(f, s)?.chars().count() as f64))
        }
        "haversine_m" => {
            let [a, b, c, d] = fixed::<4>(f, v)?;
            Ok(Value::Float(haversine_m(
                number(f, a)?,
                number(f, b)?,
                number(f, c)?,
                number(f, d)?,
            )))
        }
        "math::abs" => num1(f, v, f64::abs),
        "math::sqrt" => num1(f, v, f64::sqrt),
        "math::cbrt" => num1(f, v, f64::cbrt),
        "math::pow" => num2(f, v, f64::powf),
        "math::exp" => num1(f, v, f64::exp),
        "math::exp2" => num1(f, v, f64::exp2),
        "math::ln" => num1(f, v, f64::ln),
        "math::log" => num2(f, v, f64::log),
        "math::log2" => num1(f, v, f64::log2),
        "math::log10" => num1(f, v, f64::log10),
        "math::hypot" => num2(f, v, f64::hypot),
        "math::sin" => num1(f, v, f64::sin),
        "math::cos" => num1(f, v, f64::cos),
        "math::tan" => num1(f, v, f64::tan),
        "math::asin" => num1(f, v, f64::asin),
        "math::acos" => num1(f, v, f64::acos),
        "math::atan" => num1(f, v, f64::atan),
        "math::atan2" => num2(f, v, f64::atan2),
        "math::sinh" => num1(f, v, f64::sinh),
        "math::cosh" => num1(f, v, f64::cosh),
        "math::tanh" => num1(f, v, f64::tanh),
        "math::to_radians" => num1(f, v, f64::to_radians),
        "math::to_degrees" => num1(f, v, f64::to_degrees),
        "math::is_nan" => {
            let [a] = fixed::<1>(f, v)?;
            Ok(Value::Boolean(number(f, a)?.is_nan()))
        }
        "math::is_finite" => {
            let [a] = fixed::<1>(f, v)?;
            Ok(Value::Boolean(number(f, a)?.is_finite()))
        }
        "str::to_lowercase" => {
            let [a] = fixed::<1>(f, v)?;
            Ok(Value::String(string(f, a)?.to_lowercase()))
        }
        "str::to_uppercase" => {
            let [a] = fixed::<1>(f, v)?;
            Ok(Value::String(string(f, a)?.to_uppercase()))
        }
        "str::trim" => {
            let [a] = fixed::<1>(f, v)?;
            Ok(Value::String(string(f, a)?.trim().to_string()))
        }
        "str::from" => {
            let [a] = fixed::<1>(f, v)?;
            Ok(Value::String(fmt_value(a)))
        }
        _ => Err(EvalexprError::FunctionIdentifierNotFound(f.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<Value>) -> Value {
        Value::Tuple(v)
    }

    fn fl(x: f64) -> Value {
        Value::Float(x)
    }

    #[test]
    fn haversine_known_distances() {
        // One degree of latitude along a meridian is R·π/180.
        let d = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!(
            (d - EARTH_RADIUS_M * std::f64::consts::PI / 180.0).abs() < 1e-6,
            "{d}"
        );
        assert!((d - 111_195.08).abs() < 0.01, "{d}");
        assert_eq!(haversine_m(48.1, 11.5, 48.1, 11.5), 0.0);
        // Antipodes: half the circumference, not NaN.
        let d = haversine_m(0.0, 0.0, 0.0, 180.0);
        assert!(
            (d - EARTH_RADIUS_M * std::f64::consts::PI).abs() < 1e-6,
            "{d}"
        );
        // Berlin → Paris, about 878 km.
        let d = haversine_m(52.5200, 13.4050, 48.8566, 2.3522);
        assert!((d - 877_500.0).abs() < 1_500.0, "{d}");
    }

    #[test]
    fn every_listed_function_is_callable() {
        for (name, arity, _) in FUNCTIONS {
            let n = match arity {
                Arity::Exactly(n) | Arity::AtLeast(n) => *n,
            };
            let arg = match (*name, n) {
                ("if", _) => t(vec![Value::Boolean(true), fl(1.0), fl(2.0)]),
                (n, _) if n.starts_with("str::") || n == "len" => Value::from("Ab "),
                (_, 1) => Value::Float(0.5),
                (_, n) => t(vec![Value::Float(0.5); n]),
            };
            call(name, &arg).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(matches!(
            call("nope", &Value::Empty),
            Err(EvalexprError::FunctionIdentifierNotFound(_))
        ));
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        assert!(call("math::ln", &Value::from("x")).is_err());
        assert!(call("math::pow", &Value::Float(1.0)).is_err());
        assert!(call("haversine_m", &Value::Empty).is_err());
        assert!(call("if", &t(vec![fl(1.0), fl(1.0), fl(2.0)])).is_err());
        assert!(call("clamp", &t(vec![fl(1.0), fl(5.0), fl(2.0)])).is_err());
        assert!(call("clamp", &t(vec![fl(1.0), fl(f64::NAN), fl(2.0)])).is_err());
        assert!(call("min", &Value::Empty).is_err());
        assert!(call("len", &Value::Float(1.0)).is_err());
    }

    #[test]
    fn values() {
        assert_eq!(
            call("max", &t(vec![fl(1.0), fl(3.0), fl(2.0)])).unwrap(),
            Value::Float(3.0)
        );
        assert_eq!(call("min", &Value::Float(4.0)).unwrap(), Value::Float(4.0));
        let Value::Float(x) = call("min", &t(vec![fl(1.0), fl(f64::NAN)])).unwrap() else {
            panic!()
        };
        assert!(x.is_nan());
        assert_eq!(
            call("clamp", &t(vec![fl(7.0), fl(0.0), fl(5.0)])).unwrap(),
            Value::Float(5.0)
        );
        assert_eq!(
            call("len", &Value::from("héllo")).unwrap(),
            Value::Float(5.0)
        );
        assert_eq!(
            call("str::from", &Value::Float(10.0)).unwrap(),
            Value::from("10")
        );
        assert_eq!(
            call("round", &Value::Float(2.5)).unwrap(),
            Value::Float(3.0)
        );
        assert_eq!(
            call("math::log", &t(vec![fl(8.0), fl(2.0)])).unwrap(),
            Value::Float(3.0)
        );
    }
}
