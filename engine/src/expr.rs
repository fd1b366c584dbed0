//! Expressions: compiled once per config, evaluated per event over a table of slots.
//!
//! # Language
//! [evalexpr](https://docs.rs/evalexpr) syntax (`+ - * / % ^`, comparisons, `&& || !`,
//! string literals in double quotes, `f(a, b)` calls), with these engine rules:
//!
//! - **Every number is a 64-bit float.** JSON numbers (integer fields too) and integer
//!   literals in the expression alike, so `1/2` is `0.5` and `seq == 5` compares floats.
//! - **Both sides of `&&`/`||` and all arguments of `if` are evaluated** (evalexpr does not
//!   short-circuit). Nothing the engine provides fails on evaluation, so this only matters for
//!   NaN: an unused NaN branch is harmless, a used one makes a calc fail.
//! - Assignments and `;` chains are refused.
//!
//! # Variables
//! | name | value |
//! |------|-------|
//! | a data field, e.g. `kwh` | its value; absent optional fields: the field's `default`, else NaN / `""` / `false` |
//! | an earlier derived field | its value (in calc: only fields defined above; in checks: all) |
//! | a constant | from `[event_types.X.constants]` |
//! | `ts`, `received_at` | event time and arrival time, epoch ms |
//! | `seq` | the message's sequence number |
//! | `device` | the device id (string) |
//! | `has_prev` | a usable previous reading exists (see below) |
//! | `prev.x` | `x` in the previous reading (data or derived field) |
//! | `prev.ts` | the previous reading's `ts` (= `ts` without one) |
//! | `seq_reset`, `late` | the device restarted its counter / this event filled a gap |
//! | `math::pi`, `math::e` | constants |
//!
//! # Stateful functions (argument: a field name in quotes)
//! | call | value |
//! |------|-------|
//! | `prev("x")` | same as `prev.x` |
//! | `delta("x")` | `x - prev.x`; **0** without a previous value |
//! | `rate("x")` | `delta("x") / dt()`, per second; **0** without a previous value |
//! | `dt()` | seconds since the previous reading's `ts`; **0** without one |
//! | `has("x")` | the data field `x` is present (and not null) |
//!
//! The *previous reading* is the last accepted event of the same device and type. It is
//! usable only if its `ts` is earlier than this event's; otherwise (an out-of-order event)
//! the event is computed as if there were none. Without a previous value for `x` (first
//! reading, out-of-order, or the previous reading lacked `x`), `prev.x` is the current `x`,
//! so differences come out 0 — except for a derived field not computed yet at that point
//! (its own definition, a later one, or any derived field in a rule), where it is NaN.
//!
//! Pure functions: see [`crate::functions`].
//!
//! # Cost
//! Parsing, name resolution and type checks happen once, at [`Engine::new`](crate::Engine::new).
//! Per event, the slots an event type's expressions use are filled once into a vector (one
//! allocation; strings only for string-valued slots) and the trees are evaluated against it
//! with a [`Context`] that maps an identifier to its slot.

use std::collections::BTreeMap;

use crate::fnv::FnvMap;
use crate::functions::{self, Arity};
use crate::names::{BUILTIN_VARIABLES, STATEFUL_FUNCTIONS};
use crate::schema::Schema;
use crate::spec::FieldType;
use crate::state::Reading;
use crate::value::{EvalValue, Scalar, json_to_eval, show};
use evalexpr::{
    Context, DefaultNumericTypes, EvalexprError, EvalexprResult, Node, Operator,
    build_operator_tree,
};

/// Why an expression does not compile. The text is what a config error shows after the path
/// (`event_types.meter.calc[1].expr: unknown variable 'volts' (did you mean 'voltage'?)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("empty expression")]
    Empty,
    /// evalexpr's parser refused it (its message).
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("assignment to '{0}' is not allowed: an expression only computes a value")]
    Assignment(String),
    #[error("';' is not allowed: an expression is a single value")]
    Chain,
    /// evalexpr parses `a *` as a product with one operand and fails only when it evaluates,
    /// which would send every event to the DLQ; refused here instead.
    #[error("syntax error: '{0}' is missing an operand")]
    MissingOperand(String),
    #[error("too many variables in one event type")]
    TooManyVariables,
    #[error("unknown variable '{name}'{hint}")]
    UnknownVariable { name: String, hint: Hint },
    /// `prev.x` where `x` has no previous value.
    #[error("unknown variable '{name}': '{field}' is not a scalar data or derived field{hint}")]
    NoPrevious {
        name: String,
        field: String,
        hint: Hint,
    },
    #[error(
        "field '{0}' is an {1}: only number, integer, string and boolean fields can be used in \
         expressions (has(\"{0}\") tests presence)"
    )]
    NotScalar(String, FieldType),
    /// A derived field this phase cannot see yet.
    #[error("{0}")]
    Unavailable(Unavailable),
    #[error("unknown function '{name}'{hint}")]
    UnknownFunction { name: String, hint: Hint },
    #[error("{function}() takes {expected} argument{}, got {got}", if *.expected == 1 { "" } else { "s" })]
    Arity {
        function: String,
        expected: usize,
        got: usize,
    },
    #[error("{function}() takes at least {min} argument(s), got {got}")]
    TooFewArguments {
        function: String,
        min: usize,
        got: usize,
    },
    #[error("dt() takes no arguments")]
    DtArguments,
    /// A stateful function called without one quoted field name.
    #[error("{0}() takes one field name in double quotes, e.g. {0}(\"kwh\")")]
    FieldArgument(String),
    #[error("has(\"{field}\"): '{field}' is not a data field{hint}")]
    NotDataField { field: String, hint: Hint },
    #[error("{function}(\"{field}\"): unknown field '{field}'{hint}")]
    UnknownField {
        function: String,
        field: String,
        hint: Hint,
    },
    #[error("{function}(\"{field}\"): '{field}' is a {ty} field; {function} needs a number")]
    NotNumeric {
        function: String,
        field: String,
        ty: FieldType,
    },
    #[error(
        "{function}(\"{field}\"): '{field}' is an {ty} field; only number, integer, string and \
         boolean fields have previous values"
    )]
    NoPreviousValues {
        function: String,
        field: String,
        ty: FieldType,
    },
    #[error("{function}(\"{field}\"): {reason}")]
    ArgumentUnavailable {
        function: String,
        field: String,
        reason: Unavailable,
    },
}

/// Why a derived field cannot be read where an expression reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("derived field '{0}' is not available in rules (rules run before calc; use a check)")]
    InRules(String),
    #[error("'{0}' cannot use its own value (prev.{0} is its previous value)")]
    Own(String),
    #[error(
        "derived field '{name}' is defined later (calc[{index}]); a calc entry can only use the \
         ones above it"
    )]
    Later { name: String, index: usize },
}

/// What a compile error suggests instead of an unknown name; displays as its tail.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Hint {
    #[default]
    None,
    /// ` (did you mean 'voltage'?)`
    DidYouMean(String),
    /// A function named like a variable: ` ('dt' is a function: write it like dt())`.
    Function { name: String, example: String },
}

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hint::None => Ok(()),
            Hint::DidYouMean(c) => write!(f, " (did you mean '{c}'?)"),
            Hint::Function { name, example } => {
                write!(f, " ('{name}' is a function: write it like {example})")
            }
        }
    }
}

/// An expression failed while evaluated (a function refused its arguments, a type mismatch):
/// evalexpr's message, or the engine function's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(String);

/// The variables an expression read and their values (`kwh=10, prev.kwh=12`), for a reason;
/// displays as ` (kwh=10, prev.kwh=12)`, or as nothing when it read none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadValues(String);

impl std::fmt::Display for ReadValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", self.0)
        }
    }
}

/// A data or derived field, as the target of `prev`/`delta`/`rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    Data(usize),
    Derived(usize),
}

/// Where a slot's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Const(usize),
    Data(usize),
    Derived(usize),
    Ts,
    Seq,
    ReceivedAt,
    Device,
    HasPrev,
    SeqReset,
    Late,
    PrevTs,
    Dt,
    Prev(Target),
    Delta(Target),
    Rate(Target),
    Has(usize),
}

impl Source {
    /// The derived field whose computation changes this slot.
    fn derived_dependency(self) -> Option<usize> {
        match self {
            Source::Derived(j)
            | Source::Prev(Target::Derived(j))
            | Source::Delta(Target::Derived(j))
            | Source::Rate(Target::Derived(j)) => Some(j),
            _ => None,
        }
    }
}

/// Where in the pipeline an expression runs: what it may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Rule,
    /// Computing derived field `i`.
    Calc(usize),
    Check,
}

impl Phase {
    /// Whether the current value of derived field `j` is known in this phase.
    fn derived_available(self, j: usize) -> bool {
        match self {
            Phase::Rule => false,
            Phase::Calc(i) => j < i,
            Phase::Check => true,
        }
    }
}

/// What names mean in one event type.
pub(crate) struct Scope<'a> {
    pub schema: &'a Schema,
    /// Calc names, in order.
    pub derived: &'a [String],
    pub constants: &'a BTreeMap<String, EvalValue>,
}

/// The per-event inputs to the slots.
pub(crate) struct Frame<'a> {
    /// By schema field index: the value, or `None` if absent/null.
    pub data: &'a [Option<&'a serde_json::Value>],
    pub ts: i64,
    pub seq: u64,
    pub received_at: i64,
    pub device: &'a str,
    /// A usable previous reading (its `ts` is earlier).
    pub prev: Option<&'a Reading>,
    pub seq_reset: bool,
    pub late: bool,
}

/// The variables of one event type: each a slot with a source, filled per event.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slots {
    sources: Vec<Source>,
    /// Display name per slot (for reasons).
    names: Vec<String>,
    /// Identifier → slot; several identifiers may share one (`prev.x`, `prev("x")`).
    index: FnvMap<Box<str>, u16>,
    consts: Vec<EvalValue>,
    data_names: Vec<String>,
    data_absent: Vec<EvalValue>,
    derived_names: Vec<String>,
    /// By derived field: the slots to recompute once it is known.
    refresh: Vec<Vec<u16>>,
}

impl Slots {
    pub fn new(schema: &Schema, derived: &[String]) -> Slots {
        Slots {
            data_names: schema.fields.iter().map(|f| f.name.clone()).collect(),
            data_absent: schema.fields.iter().map(|f| f.absent.clone()).collect(),
            derived_names: derived.to_vec(),
            refresh: vec![Vec::new(); derived.len()],
            ..Slots::default()
        }
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether any expression reads the previous reading (`prev.x`, `prev.ts`, `has_prev`,
    /// `delta`, `rate`, `dt`): then a failure without one may pass once one exists.
    pub fn uses_previous(&self) -> bool {
        self.sources.iter().any(|s| {
            matches!(
                s,
                Source::HasPrev
                    | Source::PrevTs
                    | Source::Dt
                    | Source::Prev(_)
                    | Source::Delta(_)
                    | Source::Rate(_)
            )
        })
    }

    fn intern(&mut self, name: &str, src: Source) -> Result<u16, CompileError> {
        if let Some(&i) = self.index.get(name) {
            return Ok(i);
        }
        let slot = match self.sources.iter().position(|s| *s == src) {
            Some(i) => i,
            None => {
                let i = self.sources.len();
                if i >= usize::from(u16::MAX) {
                    return Err(CompileError::TooManyVariables);
                }
                self.sources.push(src);
                self.names.push(name.to_string());
                if let Some(r) = src
                    .derived_dependency()
                    .and_then(|j| self.refresh.get_mut(j))
                {
                    r.push(i as u16);
                }
                i
            }
        };
        self.index.insert(name.into(), slot as u16);
        Ok(slot as u16)
    }

    fn add_const(&mut self, name: &str, value: EvalValue) -> Result<u16, CompileError> {
        if let Some(&i) = self.index.get(name) {
            return Ok(i);
        }
        self.consts.push(value);
        self.intern(name, Source::Const(self.consts.len() - 1))
    }

    /// Fills every slot for a new event (derived ones as far as known: not yet).
    pub fn materialize(&self, f: &Frame<'_>, out: &mut Vec<EvalValue>) {
        out.clear();
        out.extend(self.sources.iter().map(|&s| self.value_of(s, f, &[])));
    }

    /// Updates the slots that depend on derived field `j`, now that `derived[j]` is known.
    pub fn derived_known(
        &self,
        j: usize,
        f: &Frame<'_>,
        derived: &[EvalValue],
        out: &mut [EvalValue],
    ) {
        let Some(slots) = self.refresh.get(j) else {
            return;
        };
        for &s in slots {
            let s = usize::from(s);
            if let (Some(&src), Some(v)) = (self.sources.get(s), out.get_mut(s)) {
                *v = self.value_of(src, f, derived);
            }
        }
    }

    fn target_name(&self, t: Target) -> &str {
        let name = match t {
            Target::Data(i) => self.data_names.get(i),
            Target::Derived(j) => self.derived_names.get(j),
        };
        name.map(String::as_str).unwrap_or("")
    }

    /// The current value of a target, if known yet.
    fn current(&self, t: Target, f: &Frame<'_>, derived: &[EvalValue]) -> Option<EvalValue> {
        match t {
            Target::Data(i) => Some(match f.data.get(i).copied().flatten() {
                Some(v) => json_to_eval(v),
                None => self.data_absent.get(i).cloned().unwrap_or(EvalValue::Empty),
            }),
            Target::Derived(j) => derived.get(j).cloned(),
        }
    }

    fn previous<'f>(&self, t: Target, f: &Frame<'f>) -> Option<&'f Scalar> {
        f.prev.and_then(|p| p.get(self.target_name(t)))
    }

    fn dt_s(f: &Frame<'_>) -> f64 {
        match f.prev {
            Some(p) => f.ts.saturating_sub(p.ts) as f64 / 1000.0,
            None => 0.0,
        }
    }

    fn delta(&self, t: Target, f: &Frame<'_>, derived: &[EvalValue]) -> Option<f64> {
        let prev = self.previous(t, f)?;
        let cur = match self.current(t, f, derived) {
            Some(EvalValue::Float(x)) => x,
            _ => f64::NAN,
        };
        Some(match prev {
            Scalar::Number(p) => cur - p,
            _ => f64::NAN,
        })
    }

    fn value_of(&self, src: Source, f: &Frame<'_>, derived: &[EvalValue]) -> EvalValue {
        match src {
            Source::Const(k) => self.consts.get(k).cloned().unwrap_or(EvalValue::Empty),
            Source::Data(i) => self
                .current(Target::Data(i), f, derived)
                .unwrap_or(EvalValue::Empty),
            Source::Derived(j) => derived.get(j).cloned().unwrap_or(EvalValue::Empty),
            Source::Ts => EvalValue::Float(f.ts as f64),
            Source::Seq => EvalValue::Float(f.seq as f64),
            Source::ReceivedAt => EvalValue::Float(f.received_at as f64),
            Source::Device => EvalValue::String(f.device.to_string()),
            Source::HasPrev => EvalValue::Boolean(f.prev.is_some()),
            Source::SeqReset => EvalValue::Boolean(f.seq_reset),
            Source::Late => EvalValue::Boolean(f.late),
            Source::PrevTs => EvalValue::Float(f.prev.map_or(f.ts, |p| p.ts) as f64),
            Source::Dt => EvalValue::Float(Self::dt_s(f)),
            Source::Has(i) => EvalValue::Boolean(f.data.get(i).copied().flatten().is_some()),
            Source::Prev(t) => match self.previous(t, f) {
                Some(s) => s.to_eval(),
                None => self
                    .current(t, f, derived)
                    .unwrap_or(EvalValue::Float(f64::NAN)),
            },
            Source::Delta(t) => EvalValue::Float(self.delta(t, f, derived).unwrap_or(0.0)),
            Source::Rate(t) => {
                let dt = Self::dt_s(f);
                EvalValue::Float(match self.delta(t, f, derived) {
                    Some(d) if dt > 0.0 => d / dt,
                    _ => 0.0,
                })
            }
        }
    }
}

/// The evaluation context: identifiers → slots, function calls → [`functions`].
struct Ctx<'a> {
    slots: &'a Slots,
    values: &'a [EvalValue],
}

impl Context for Ctx<'_> {
    type NumericTypes = DefaultNumericTypes;

    fn get_value(&self, identifier: &str) -> Option<&EvalValue> {
        let &i = self.slots.index.get(identifier)?;
        self.values.get(usize::from(i))
    }

    fn call_function(&self, identifier: &str, argument: &EvalValue) -> EvalexprResult<EvalValue> {
        functions::call(identifier, argument)
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        true
    }

    fn set_builtin_functions_disabled(&mut self, disabled: bool) -> EvalexprResult<()> {
        if disabled {
            Ok(())
        } else {
            Err(EvalexprError::BuiltinFunctionsCannotBeEnabled)
        }
    }
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub(crate) struct Expr {
    tree: Node<DefaultNumericTypes>,
    /// Slots it reads, in order of first appearance, for reasons.
    reads: Vec<u16>,
}

impl Expr {
    /// Parses and checks `text` for `phase`, registering its variables in `slots`.
    pub fn compile(
        text: &str,
        phase: Phase,
        scope: &Scope<'_>,
        slots: &mut Slots,
    ) -> Result<Expr, CompileError> {
        if text.trim().is_empty() {
            return Err(CompileError::Empty);
        }
        let mut tree = build_operator_tree::<DefaultNumericTypes>(text)
            .map_err(|e| CompileError::Syntax(e.to_string()))?;
        if let Some(w) = tree.iter_write_variable_identifiers().next() {
            return Err(CompileError::Assignment(w.to_string()));
        }
        let mut c = Compiler {
            phase,
            scope,
            slots,
        };
        c.rewrite(&mut tree)?;
        let mut reads = Vec::new();
        let names: Vec<String> = tree.iter_variable_identifiers().map(String::from).collect();
        for name in names {
            let slot = match c.slots.index.get(name.as_str()) {
                // Already resolved by `rewrite` (a stateful call) — or by an earlier
                // expression, in which case resolve again: what is visible depends on phase.
                Some(&s) if name.contains('(') => s,
                _ => c.resolve(&name)?,
            };
            if !reads.contains(&slot) {
                reads.push(slot);
            }
        }
        Ok(Expr { tree, reads })
    }

    pub fn eval(&self, slots: &Slots, values: &[EvalValue]) -> Result<EvalValue, EvalError> {
        self.tree
            .eval_with_context(&Ctx { slots, values })
            .map_err(|e| {
                EvalError(match e {
                    EvalexprError::CustomMessage(m) => m,
                    other => other.to_string(),
                })
            })
    }

    /// `name=value` for every variable read (constants left out), for a reason.
    pub fn describe(&self, slots: &Slots, values: &[EvalValue], f: &Frame<'_>) -> ReadValues {
        let mut parts = Vec::new();
        for &s in &self.reads {
            let s = usize::from(s);
            let (Some(src), Some(name), Some(v)) =
                (slots.sources.get(s), slots.names.get(s), values.get(s))
            else {
                continue;
            };
            let shown = match src {
                Source::Const(_) => continue,
                Source::Data(i) if f.data.get(*i).copied().flatten().is_none() => match v {
                    EvalValue::Float(x) if x.is_nan() => "absent".to_string(),
                    other => format!("{} (absent, default)", show(other)),
                },
                _ => show(v),
            };
            parts.push(format!("{name}={shown}"));
        }
        ReadValues(parts.join(", "))
    }
}

struct Compiler<'c, 'a> {
    phase: Phase,
    scope: &'c Scope<'a>,
    slots: &'c mut Slots,
}

/// The argument nodes of a function call node's child.
fn call_args(children: &[Node<DefaultNumericTypes>]) -> &[Node<DefaultNumericTypes>] {
    let [first] = children else {
        return children;
    };
    let mut n = first;
    loop {
        match n.operator() {
            Operator::RootNode => match n.children() {
                [] => return &[],
                [one] => n = one,
                many => return many,
            },
            Operator::Tuple => return n.children(),
            _ => return std::slice::from_ref(n),
        }
    }
}

/// How many operands an operator takes, for those with a fixed number.
fn operands(op: &Operator<DefaultNumericTypes>) -> Option<usize> {
    use Operator::*;
    match op {
        Add | Sub | Mul | Div | Mod | Exp | Eq | Neq | Gt | Lt | Geq | Leq | And | Or => Some(2),
        Not | Neg => Some(1),
        _ => None,
    }
}

/// The string literal a node holds, looking through parentheses.
fn string_literal(n: &Node<DefaultNumericTypes>) -> Option<&str> {
    match n.operator() {
        Operator::Const {
            value: EvalValue::String(s),
        } => Some(s),
        Operator::RootNode => match n.children() {
            [one] => string_literal(one),
            _ => None,
        },
        _ => None,
    }
}

impl Compiler<'_, '_> {
    /// Integer literals → floats; stateful calls → variables; function names and arities
    /// checked; `;` refused.
    fn rewrite(&mut self, node: &mut Node<DefaultNumericTypes>) -> Result<(), CompileError> {
        if let Some(n) = operands(node.operator())
            && node.children().len() != n
        {
            return Err(CompileError::MissingOperand(
                node.operator().to_string().trim().to_string(),
            ));
        }
        let mut replace_with = None;
        match node.operator() {
            Operator::Const {
                value: EvalValue::Int(i),
            } => {
                let x = *i as f64;
                *node.operator_mut() = Operator::Const {
                    value: EvalValue::Float(x),
                };
            }
            Operator::Chain => {
                return Err(CompileError::Chain);
            }
            Operator::FunctionIdentifier { identifier } => {
                let f = identifier.clone();
                if STATEFUL_FUNCTIONS.contains(&f.as_str()) {
                    replace_with = Some(self.stateful(&f, call_args(node.children()))?);
                } else {
                    check_call(&f, call_args(node.children()).len())?;
                }
            }
            _ => {}
        }
        if let Some(name) = replace_with {
            *node.operator_mut() = Operator::VariableIdentifierRead { identifier: name };
            node.children_mut().clear();
            return Ok(());
        }
        for child in node.children_mut() {
            self.rewrite(child)?;
        }
        Ok(())
    }

    /// Resolves `prev("x")`, `delta("x")`, `rate("x")`, `has("x")`, `dt()` to a slot and
    /// returns the identifier that now stands for it.
    fn stateful(
        &mut self,
        f: &str,
        args: &[Node<DefaultNumericTypes>],
    ) -> Result<String, CompileError> {
        if f == "dt" {
            if !args.is_empty() {
                return Err(CompileError::DtArguments);
            }
            self.slots.intern("dt()", Source::Dt)?;
            return Ok("dt()".to_string());
        }
        let field = match args {
            [one] => string_literal(one),
            _ => None,
        };
        let Some(field) = field else {
            return Err(CompileError::FieldArgument(f.to_string()));
        };
        let schema = self.scope.schema;
        let (name, src) = match f {
            "has" => {
                let Some(i) = schema.index_of(field) else {
                    return Err(CompileError::NotDataField {
                        field: field.to_string(),
                        hint: self.suggest(field, false),
                    });
                };
                (format!("has(\"{field}\")"), Source::Has(i))
            }
            "prev" => {
                let t = self.target(f, field, false)?;
                (format!("prev.{field}"), Source::Prev(t))
            }
            _ => {
                let t = self.target(f, field, true)?;
                let src = if f == "delta" {
                    Source::Delta(t)
                } else {
                    Source::Rate(t)
                };
                (format!("{f}(\"{field}\")"), src)
            }
        };
        self.slots.intern(&name, src)?;
        Ok(name)
    }

    /// The field `prev`/`delta`/`rate` refers to.
    fn target(&self, f: &str, field: &str, numeric: bool) -> Result<Target, CompileError> {
        let (function, field_name) = (f.to_string(), field.to_string());
        if let Some(i) = self.scope.schema.index_of(field) {
            let ty = self.scope.schema.fields[i].ty;
            if numeric && !ty.is_numeric() {
                return Err(CompileError::NotNumeric {
                    function,
                    field: field_name,
                    ty,
                });
            }
            if !ty.is_scalar() {
                return Err(CompileError::NoPreviousValues {
                    function,
                    field: field_name,
                    ty,
                });
            }
            return Ok(Target::Data(i));
        }
        if let Some(j) = self.scope.derived.iter().position(|d| d == field) {
            // prev of a derived field is stored, so always known; delta/rate also need its
            // current value.
            if numeric && !self.phase.derived_available(j) {
                return Err(CompileError::ArgumentUnavailable {
                    function,
                    field: field_name,
                    reason: self.unavailable(field, j),
                });
            }
            return Ok(Target::Derived(j));
        }
        Err(CompileError::UnknownField {
            function,
            field: field_name,
            hint: self.suggest(field, false),
        })
    }

    fn unavailable(&self, name: &str, j: usize) -> Unavailable {
        let name = name.to_string();
        match self.phase {
            Phase::Rule => Unavailable::InRules(name),
            Phase::Calc(i) if i == j => Unavailable::Own(name),
            _ => Unavailable::Later { name, index: j },
        }
    }

    /// Resolves a variable name to a slot.
    fn resolve(&mut self, name: &str) -> Result<u16, CompileError> {
        let src = match name {
            "ts" => Source::Ts,
            "seq" => Source::Seq,
            "received_at" => Source::ReceivedAt,
            "device" => Source::Device,
            "has_prev" => Source::HasPrev,
            "seq_reset" => Source::SeqReset,
            "late" => Source::Late,
            "prev.ts" => Source::PrevTs,
            "math::pi" => {
                return self
                    .slots
                    .add_const(name, EvalValue::Float(std::f64::consts::PI));
            }
            "math::e" => {
                return self
                    .slots
                    .add_const(name, EvalValue::Float(std::f64::consts::E));
            }
            _ => {
                if let Some(field) = name.strip_prefix("prev.") {
                    Source::Prev(self.target("prev", field, false).map_err(|_| {
                        CompileError::NoPrevious {
                            name: name.to_string(),
                            field: field.to_string(),
                            hint: self.suggest(name, true),
                        }
                    })?)
                } else if let Some(v) = self.scope.constants.get(name) {
                    return self.slots.add_const(name, v.clone());
                } else if let Some(i) = self.scope.schema.index_of(name) {
                    let ty = self.scope.schema.fields[i].ty;
                    if !ty.is_scalar() {
                        return Err(CompileError::NotScalar(name.to_string(), ty));
                    }
                    Source::Data(i)
                } else if let Some(j) = self.scope.derived.iter().position(|d| d == name) {
                    if !self.phase.derived_available(j) {
                        return Err(CompileError::Unavailable(self.unavailable(name, j)));
                    }
                    Source::Derived(j)
                } else {
                    return Err(CompileError::UnknownVariable {
                        name: name.to_string(),
                        hint: self.suggest(name, true),
                    });
                }
            }
        };
        self.slots.intern(name, src)
    }

    /// The closest known name (` (did you mean 'x'?)`), or nothing.
    fn suggest(&self, name: &str, variables: bool) -> Hint {
        let mut candidates: Vec<String> = self.scope.schema.names().map(String::from).collect();
        candidates.extend(self.scope.derived.iter().cloned());
        if variables {
            candidates.extend(self.scope.constants.keys().cloned());
            candidates.extend(BUILTIN_VARIABLES.iter().map(|s| s.to_string()));
            candidates.push("prev.ts".to_string());
            let prevs: Vec<String> = candidates
                .iter()
                .filter(|c| !c.contains('.') && !BUILTIN_VARIABLES.contains(&c.as_str()))
                .map(|c| format!("prev.{c}"))
                .collect();
            candidates.extend(prevs);
            if STATEFUL_FUNCTIONS.contains(&name) {
                let example = if name == "dt" {
                    "dt()".to_string()
                } else {
                    format!("{name}(\"field\")")
                };
                return Hint::Function {
                    name: name.to_string(),
                    example,
                };
            }
        }
        closest(name, candidates.iter().map(String::as_str))
            .map(|c| Hint::DidYouMean(c.to_string()))
            .unwrap_or_default()
    }
}

/// Checks a call of a pure function: known name, right number of arguments.
fn check_call(f: &str, n: usize) -> Result<(), CompileError> {
    let Some(arity) = functions::arity(f) else {
        let names = functions::FUNCTIONS
            .iter()
            .map(|(n, _, _)| *n)
            .chain(STATEFUL_FUNCTIONS.iter().copied());
        // `ln` → `math::ln` first, then typos.
        let hint = functions::FUNCTIONS
            .iter()
            .map(|(n, _, _)| *n)
            .find(|n| n.rsplit("::").next() == Some(f))
            .or_else(|| closest(f, names))
            .map(|c| Hint::DidYouMean(c.to_string()))
            .unwrap_or_default();
        return Err(CompileError::UnknownFunction {
            name: f.to_string(),
            hint,
        });
    };
    match arity {
        Arity::Exactly(k) if n != k => Err(CompileError::Arity {
            function: f.to_string(),
            expected: k,
            got: n,
        }),
        Arity::AtLeast(k) if n < k => Err(CompileError::TooFewArguments {
            function: f.to_string(),
            min: k,
            got: n,
        }),
        _ => Ok(()),
    }
}

/// The candidate within a small edit distance of `name`, if any.
fn closest<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    let limit = (name.chars().count() / 3).clamp(1, 3);
    candidates
        .filter(|c| *c != name)
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FieldSpec;
    use serde_json::json;

    struct Fixture {
        schema: Schema,
        derived: Vec<String>,
        constants: BTreeMap<String, EvalValue>,
    }

    fn fixture() -> Fixture {
        let fields: BTreeMap<String, FieldSpec> = serde_json::from_value(json!({
            "kwh": {"type": "number", "required": true},
            "voltage": {"type": "number"},
            "state": {"type": "string"},
            "loc": {"type": "object"},
        }))
        .unwrap();
        let mut constants = BTreeMap::new();
        constants.insert("tariff".to_string(), EvalValue::Float(0.25));
        Fixture {
            schema: Schema::compile("t", &fields).unwrap(),
            derived: vec!["a".into(), "b".into()],
            constants,
        }
    }

    fn compile(fx: &Fixture, text: &str, phase: Phase) -> Result<(Expr, Slots), CompileError> {
        let scope = Scope {
            schema: &fx.schema,
            derived: &fx.derived,
            constants: &fx.constants,
        };
        let mut slots = Slots::new(&fx.schema, &fx.derived);
        Expr::compile(text, phase, &scope, &mut slots).map(|e| (e, slots))
    }

    fn eval(
        fx: &Fixture,
        text: &str,
        data: serde_json::Value,
        prev: Option<&Reading>,
    ) -> EvalValue {
        let (e, slots) = compile(fx, text, Phase::Check).unwrap();
        let serde_json::Value::Object(m) = data else {
            panic!()
        };
        let mut present = Vec::new();
        fx.schema.validate(&m, &mut present).unwrap();
        let f = Frame {
            data: &present,
            ts: 10_000,
            seq: 7,
            received_at: 10_500,
            device: "dev-1",
            prev,
            seq_reset: false,
            late: false,
        };
        let mut values = Vec::new();
        slots.materialize(&f, &mut values);
        e.eval(&slots, &values).unwrap()
    }

    fn err(fx: &Fixture, text: &str, phase: Phase) -> String {
        compile(fx, text, phase).err().unwrap().to_string()
    }

    #[test]
    fn integers_are_floats() {
        let fx = fixture();
        assert_eq!(
            eval(&fx, "1/2", json!({"kwh": 1}), None),
            EvalValue::Float(0.5)
        );
        assert_eq!(
            eval(&fx, "seq == 7", json!({"kwh": 1}), None),
            EvalValue::Boolean(true)
        );
        assert_eq!(
            eval(&fx, "kwh == 1", json!({"kwh": 1}), None),
            EvalValue::Boolean(true)
        );
        assert_eq!(
            eval(
                &fx,
                "len(state) == 2",
                json!({"kwh": 1, "state": "on"}),
                None
            ),
            EvalValue::Boolean(true)
        );
    }

    #[test]
    fn builtins_and_constants() {
        let fx = fixture();
        let data = json!({"kwh": 2});
        assert_eq!(
            eval(&fx, "ts", data.clone(), None),
            EvalValue::Float(10_000.0)
        );
        assert_eq!(
            eval(&fx, "received_at - ts", data.clone(), None),
            EvalValue::Float(500.0)
        );
        assert_eq!(
            eval(&fx, "device", data.clone(), None),
            EvalValue::from("dev-1")
        );
        assert_eq!(
            eval(&fx, "kwh * tariff", data.clone(), None),
            EvalValue::Float(0.5)
        );
        assert_eq!(
            eval(&fx, "math::pi", data.clone(), None),
            EvalValue::Float(std::f64::consts::PI)
        );
        assert_eq!(eval(&fx, "has_prev", data, None), EvalValue::Boolean(false));
    }

    #[test]
    fn absent_optional_fields() {
        let fx = fixture();
        let EvalValue::Float(x) = eval(&fx, "voltage * 2", json!({"kwh": 1}), None) else {
            panic!()
        };
        assert!(x.is_nan());
        assert_eq!(
            eval(
                &fx,
                "if(has(\"voltage\"), voltage, 230)",
                json!({"kwh": 1}),
                None
            ),
            EvalValue::Float(230.0)
        );
        assert_eq!(
            eval(&fx, "has(\"loc\")", json!({"kwh": 1, "loc": {}}), None),
            EvalValue::Boolean(true)
        );
        assert_eq!(
            eval(&fx, "state == \"\"", json!({"kwh": 1}), None),
            EvalValue::Boolean(true)
        );
    }

    #[test]
    fn stateful_without_previous() {
        let fx = fixture();
        let d = json!({"kwh": 5});
        assert_eq!(
            eval(&fx, "delta(\"kwh\")", d.clone(), None),
            EvalValue::Float(0.0)
        );
        assert_eq!(
            eval(&fx, "rate(\"kwh\")", d.clone(), None),
            EvalValue::Float(0.0)
        );
        assert_eq!(eval(&fx, "dt()", d.clone(), None), EvalValue::Float(0.0));
        assert_eq!(
            eval(&fx, "prev.kwh", d.clone(), None),
            EvalValue::Float(5.0)
        );
        assert_eq!(
            eval(&fx, "prev(\"kwh\")", d.clone(), None),
            EvalValue::Float(5.0)
        );
        assert_eq!(
            eval(&fx, "prev.ts", d.clone(), None),
            EvalValue::Float(10_000.0)
        );
        // Short-circuit-free `||` still works on the first reading.
        assert_eq!(
            eval(&fx, "!has_prev || kwh >= prev.kwh", d, None),
            EvalValue::Boolean(true)
        );
    }

    #[test]
    fn stateful_with_previous() {
        let fx = fixture();
        let prev = Reading {
            ts: 6_000,
            seq: 6,
            values: vec![
                ("kwh".into(), Scalar::Number(3.0)),
                ("a".into(), Scalar::Number(1.5)),
            ],
        };
        let d = json!({"kwh": 5, "voltage": 230});
        assert_eq!(
            eval(&fx, "delta(\"kwh\")", d.clone(), Some(&prev)),
            EvalValue::Float(2.0)
        );
        assert_eq!(
            eval(&fx, "dt()", d.clone(), Some(&prev)),
            EvalValue::Float(4.0)
        );
        assert_eq!(
            eval(&fx, "rate(\"kwh\")", d.clone(), Some(&prev)),
            EvalValue::Float(0.5)
        );
        assert_eq!(
            eval(&fx, "prev.a", d.clone(), Some(&prev)),
            EvalValue::Float(1.5)
        );
        assert_eq!(
            eval(&fx, "has_prev", d.clone(), Some(&prev)),
            EvalValue::Boolean(true)
        );
        // The previous reading lacked voltage: prev.voltage falls back to the current value.
        assert_eq!(
            eval(&fx, "delta(\"voltage\")", d.clone(), Some(&prev)),
            EvalValue::Float(0.0)
        );
        assert_eq!(
            eval(&fx, "prev.voltage", d, Some(&prev)),
            EvalValue::Float(230.0)
        );
    }

    #[test]
    fn compile_errors() {
        let fx = fixture();
        let e = err(&fx, "volts * 2", Phase::Check);
        assert_eq!(e, "unknown variable 'volts'");
        let e = err(&fx, "voltag * 2", Phase::Check);
        assert_eq!(e, "unknown variable 'voltag' (did you mean 'voltage'?)");
        let e = err(&fx, "prev.kwhh", Phase::Check);
        assert!(e.contains("did you mean 'prev.kwh'"), "{e}");
        let e = err(&fx, "delta(\"kwhh\")", Phase::Check);
        assert!(
            e.starts_with("delta(\"kwhh\"): unknown field 'kwhh' (did you mean 'kwh'"),
            "{e}"
        );
        let e = err(&fx, "delta(kwh)", Phase::Check);
        assert!(e.contains("in double quotes"), "{e}");
        let e = err(&fx, "delta(\"state\")", Phase::Check);
        assert!(e.contains("is a string field"), "{e}");
        let e = err(&fx, "dt", Phase::Check);
        assert!(e.contains("dt()"), "{e}");
        let e = err(&fx, "loc", Phase::Check);
        assert!(e.contains("is an object"), "{e}");
        let e = err(&fx, "ln(kwh)", Phase::Check);
        assert_eq!(e, "unknown function 'ln' (did you mean 'math::ln'?)");
        let e = err(&fx, "math::pow(kwh)", Phase::Check);
        assert_eq!(e, "math::pow() takes 2 arguments, got 1");
        let e = err(&fx, "kwh = 3", Phase::Check);
        assert!(e.starts_with("assignment to 'kwh'"), "{e}");
        let e = err(&fx, "1; 2", Phase::Check);
        assert!(e.contains("';'"), "{e}");
        for text in ["kwh *", "kwh * voltage +", "!", "kwh == ", "(kwh -) * 2"] {
            let e = err(&fx, text, Phase::Check);
            assert!(e.contains("is missing an operand"), "{text}: {e}");
        }
        let e = err(&fx, "(kwh", Phase::Check);
        assert!(e.starts_with("syntax error"), "{e}");
        assert_eq!(err(&fx, "  ", Phase::Check), "empty expression");
    }

    #[test]
    fn compile_errors_are_typed() {
        let fx = fixture();
        let e = compile(&fx, "voltag * 2", Phase::Check).err().unwrap();
        assert_eq!(
            e,
            CompileError::UnknownVariable {
                name: "voltag".into(),
                hint: Hint::DidYouMean("voltage".into()),
            }
        );
        let e = compile(&fx, "a > 0", Phase::Rule).err().unwrap();
        assert_eq!(
            e,
            CompileError::Unavailable(Unavailable::InRules("a".into()))
        );
        let e = compile(&fx, "delta(\"b\")", Phase::Calc(0)).err().unwrap();
        assert_eq!(
            e,
            CompileError::ArgumentUnavailable {
                function: "delta".into(),
                field: "b".into(),
                reason: Unavailable::Later {
                    name: "b".into(),
                    index: 1
                },
            }
        );
        assert_eq!(
            e.to_string(),
            "delta(\"b\"): derived field 'b' is defined later (calc[1]); a calc entry can only \
             use the ones above it"
        );
        let e = compile(&fx, "dt", Phase::Check).err().unwrap();
        assert_eq!(
            e.to_string(),
            "unknown variable 'dt' ('dt' is a function: write it like dt())"
        );
        let e = compile(&fx, "max()", Phase::Check).err().unwrap();
        assert_eq!(e.to_string(), "max() takes at least 1 argument(s), got 0");
    }

    #[test]
    fn derived_visibility_by_phase() {
        let fx = fixture();
        let e = err(&fx, "a > 0", Phase::Rule);
        assert!(e.contains("not available in rules"), "{e}");
        let e = err(&fx, "b + 1", Phase::Calc(0));
        assert!(e.contains("defined later (calc[1])"), "{e}");
        let e = err(&fx, "a + 1", Phase::Calc(0));
        assert!(e.contains("cannot use its own value"), "{e}");
        compile(&fx, "a + 1", Phase::Calc(1)).unwrap();
        compile(&fx, "a + b", Phase::Check).unwrap();
        // Previous values of derived fields are always available.
        compile(&fx, "prev.a + prev.b", Phase::Rule).unwrap();
        compile(&fx, "prev.a", Phase::Calc(0)).unwrap();
        let e = err(&fx, "delta(\"a\")", Phase::Calc(0));
        assert!(e.contains("cannot use its own value"), "{e}");
        compile(&fx, "delta(\"a\")", Phase::Calc(1)).unwrap();
    }

    #[test]
    fn describe_names_values() {
        let fx = fixture();
        let (e, slots) = compile(
            &fx,
            "kwh >= prev.kwh && voltage < 1 && tariff > 0",
            Phase::Rule,
        )
        .unwrap();
        let serde_json::Value::Object(m) = json!({"kwh": 10}) else {
            panic!()
        };
        let mut present = Vec::new();
        fx.schema.validate(&m, &mut present).unwrap();
        let prev = Reading {
            ts: 1,
            seq: 1,
            values: vec![("kwh".into(), Scalar::Number(12.0))],
        };
        let f = Frame {
            data: &present,
            ts: 10,
            seq: 2,
            received_at: 10,
            device: "d",
            prev: Some(&prev),
            seq_reset: false,
            late: false,
        };
        let mut values = Vec::new();
        slots.materialize(&f, &mut values);
        assert_eq!(
            e.describe(&slots, &values, &f).to_string(),
            " (kwh=10, prev.kwh=12, voltage=absent)"
        );
    }

    #[test]
    fn closest_within_a_third_of_the_length() {
        assert_eq!(closest("volts", ["voltage"].into_iter()), None);
        assert_eq!(
            closest("voltge", ["voltage", "kwh"].into_iter()),
            Some("voltage")
        );
        // Characters, not bytes, are counted; the name itself is no suggestion; the nearest
        // wins, the first of equals.
        assert_eq!(
            closest("tempé", ["temp", "tempo"].into_iter()),
            Some("temp")
        );
        assert_eq!(closest("ab", ["abc", "ab"].into_iter()), Some("abc"));
        assert_eq!(closest("kwhh", ["kw", "kwh"].into_iter()), Some("kwh"));
    }
}
