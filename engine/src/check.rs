//! Output checks: invariants on the calculated result.
//!
//! Checks run after the calculation and see everything: data, built-in variables, the
//! previous reading and every derived field. A failing check rejects the event under stage
//! `check` (a wrong result must never be sent on as if it were right), naming the check, its
//! message and the values it read: `check delta_non_negative: consumption must not be
//! negative (consumption_kwh=-2)`.

use crate::expr::{Frame, Phase, Scope, Slots};
use crate::rules::{
    Assertion, AssertionFailed, AssertionKind, compile_assertions, eval_assertions,
};
use crate::spec::{RuleSpec, SpecError};
use crate::value::EvalValue;

/// The checks of one event type.
#[derive(Debug, Clone)]
pub(crate) struct Checks {
    list: Vec<Assertion>,
}

impl Checks {
    /// `path` is the event type's, e.g. `event_types.meter`.
    pub fn compile(
        path: &str,
        specs: &[RuleSpec],
        scope: &Scope<'_>,
        slots: &mut Slots,
    ) -> Result<Checks, SpecError> {
        let list =
            compile_assertions(&format!("{path}.checks"), specs, Phase::Check, scope, slots)?;
        Ok(Checks { list })
    }

    pub fn eval(
        &self,
        slots: &Slots,
        values: &[EvalValue],
        frame: &Frame<'_>,
    ) -> Result<(), AssertionFailed> {
        eval_assertions(AssertionKind::Check, &self.list, slots, values, frame)
    }
}
