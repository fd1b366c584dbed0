//! The pipeline: one device message in, one [`Outcome`] out.

use std::collections::BTreeMap;

use proto::{EventResult, Fields, Limits, Stage, Status, Subject};

use crate::anomaly::Detectors;
use crate::calc::{self, Calc, CalcError};
use crate::check::Checks;
use crate::expr::{Frame, Scope, Slots};
use crate::fnv::FnvMap;
use crate::names;
use crate::rules::{AssertionFailed, RuleError, Rules};
use crate::schema::{Schema, SchemaError};
use crate::seq::{DuplicateKind, SeqClass, SeqRange};
use crate::spec::{EngineSpec, EventTypeSpec, SpecError};
use crate::state::{MAX_DEVICE_ID_BYTES, MAX_DEVICES_RULE, Reading, ScalarRef, State};
use crate::topic::{TopicPattern, is_topic_level};
use crate::value::{EvalValue, truncate};
use crate::window::Window;

/// Result flags (in `EventResult::flags`), in this order when several apply.
pub mod flags {
    /// No previous reading of this device and type: stateful functions saw none.
    pub const FIRST_READING: &str = "first_reading";
    /// Older than the previous reading, and calculated against the kept earlier reading just
    /// before it (see [`crate::window::EARLIER_READINGS`]).
    pub const EARLIER_PREVIOUS: &str = "earlier_previous";
    /// Corrected against a reading that arrived after it (a late event came before it).
    pub const PREVIOUS_ARRIVED_LATE: &str = "previous_arrived_late";
    /// The previous reading is not older than this event (`ts`): computed as if there were
    /// none, and the stored previous reading was left as it is.
    pub const OUT_OF_ORDER: &str = "out_of_order";
    /// Filled a gap in the device's sequence.
    pub const LATE: &str = "late";
    /// The device restarted its sequence counter.
    pub const SEQ_RESET: &str = "seq_reset";
    /// Processed as a replay (a DLQ retry).
    pub const REPLAY: &str = "replay";
}

/// One message as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// Arrival time, epoch ms (the caller's clock; the engine reads none).
    pub received_at: i64,
    /// This gateway's id, copied into the result.
    pub gateway: &'a str,
    /// How the message arrived, copied into the result.
    pub via: proto::Via,
    /// A DLQ retry: exempt from the duplicate checks.
    pub replay: bool,
}

/// What became of a message.
// `Accepted` is much larger than the others, but an outcome is moved once and consumed at
// once; boxing the result would cost an allocation per accepted event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted {
        /// `edge_seq` is 0: the caller assigns it.
        result: EventResult,
        /// Sequence numbers this message showed to be missing.
        gap: Option<SeqRange>,
        /// It filled a gap.
        late: bool,
    },
    /// Already seen: drop it (acknowledge, store nothing).
    Duplicate {
        event_id: String,
        device: String,
        reason: String,
    },
    Rejected(Rejection),
}

/// A message that could not become a result: a DLQ entry's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub stage: Stage,
    /// Names the field or rule.
    pub reason: String,
    /// The field or rule the reason names, or the message as a whole, so that nobody has to
    /// read it back out of the text.
    pub subject: Subject,
    pub device: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    /// Sequence numbers this message showed to be missing (its seq was recorded before it
    /// was rejected), so missed events are reported whatever became of the message.
    pub gap: Option<SeqRange>,
    /// Retrying later may succeed with nothing changed by a person: the calculation or a
    /// check failed while the device had no usable previous reading of this type, and the
    /// type's expressions read that reading (`prev`, `delta`, `rate`, `dt`, `has_prev`). An
    /// earlier reading that arrives late (a device catching up after an outage) supplies
    /// it. Every other rejection is permanent: the same input and config fail the same way.
    pub transient: bool,
}

impl Rejection {
    /// The message as a whole, refused before its device is known (stage `decode`).
    pub fn of_message(reason: String) -> Rejection {
        Rejection {
            stage: Stage::Decode,
            reason,
            subject: Subject::Document,
            device: None,
            event_id: None,
            event_type: None,
            gap: None,
            transient: false,
        }
    }
}

/// Why a type's evaluation refused an event: the error of the stage that refused it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Schema(SchemaError),
    #[error(transparent)]
    Rule(RuleError),
    #[error(transparent)]
    Calc(CalcError),
    #[error(transparent)]
    Check(AssertionFailed),
}

impl Failure {
    fn stage(&self) -> Stage {
        match self {
            Failure::Schema(_) => Stage::Schema,
            Failure::Rule(_) => Stage::Rule,
            Failure::Calc(_) => Stage::Calc,
            Failure::Check(_) => Stage::Check,
        }
    }

    fn subject(&self) -> Subject {
        match self {
            Failure::Schema(e) => e.subject(),
            Failure::Rule(e) => Subject::Rule(e.rule().to_string()),
            Failure::Calc(e) => Subject::Field(e.field.clone()),
            Failure::Check(e) => Subject::Rule(e.name.clone()),
        }
    }
}

/// One compiled event type.
#[derive(Debug, Clone)]
struct TypeEngine {
    name: String,
    schema: Schema,
    slots: Slots,
    rules: Rules,
    calc: Calc,
    checks: Checks,
    /// `None`: no `anomaly` table.
    anomaly: Option<Detectors>,
}

/// What a type's evaluation needs besides the type.
struct Event<'a> {
    device: &'a str,
    data: &'a Fields,
    ts: i64,
    seq: u64,
    received_at: i64,
    prev: Option<&'a Reading>,
    seq_reset: bool,
    late: bool,
}

impl TypeEngine {
    fn compile(name: &str, spec: &EventTypeSpec) -> Result<TypeEngine, SpecError> {
        let path = format!("event_types.{name}");
        if !is_topic_level(name) {
            return Err(SpecError::new(
                path,
                "an event type name must be one non-empty topic level (no '/', '+', '#')",
            ));
        }
        let schema = Schema::compile(&path, &spec.fields)?;
        let mut constants = BTreeMap::new();
        for (k, v) in &spec.constants {
            let at = || format!("{path}.constants.{k}");
            if !names::is_identifier(k) || names::is_reserved(k) {
                return Err(SpecError::new(
                    at(),
                    "a constant's name must be an identifier and not a built-in variable",
                ));
            }
            if schema.index_of(k).is_some() {
                return Err(SpecError::new(at(), format!("'{k}' is also a data field")));
            }
            let value = match v {
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(x) if x.is_finite() => EvalValue::Float(x),
                    _ => return Err(SpecError::new(at(), "must be a finite number")),
                },
                serde_json::Value::String(s) => EvalValue::String(s.clone()),
                serde_json::Value::Bool(b) => EvalValue::Boolean(*b),
                _ => {
                    return Err(SpecError::new(
                        at(),
                        "a constant must be a number, a string or a boolean",
                    ));
                }
            };
            constants.insert(k.clone(), value);
        }
        let derived = calc::derived_names(&path, spec, &schema, &constants)?;
        let scope = Scope {
            schema: &schema,
            derived: &derived,
            constants: &constants,
        };
        let mut slots = Slots::new(&schema, &derived);
        let rules = Rules::compile(&path, spec, &scope, &mut slots)?;
        let calc = Calc::compile(&path, name, spec, &scope, &mut slots)?;
        let checks = Checks::compile(&path, &spec.checks, &scope, &mut slots)?;
        let anomaly = spec
            .anomaly
            .as_ref()
            .map(|a| Detectors::compile(&path, a, &schema, &derived))
            .transpose()?;
        Ok(TypeEngine {
            name: name.to_string(),
            schema,
            slots,
            rules,
            calc,
            checks,
            anomaly,
        })
    }

    /// Schema → allow-list → clock skew → rules → calc → checks. The derived values.
    fn evaluate(&self, ev: &Event<'_>) -> Result<Vec<EvalValue>, Failure> {
        let mut present = Vec::with_capacity(self.schema.fields.len());
        self.schema
            .validate(ev.data, &mut present)
            .map_err(Failure::Schema)?;
        self.rules
            .check_device(ev.device, &self.name)
            .map_err(Failure::Rule)?;
        self.rules
            .check_clock(ev.ts, ev.received_at)
            .map_err(Failure::Rule)?;
        let frame = Frame {
            data: &present,
            ts: ev.ts,
            seq: ev.seq,
            received_at: ev.received_at,
            device: ev.device,
            prev: ev.prev,
            seq_reset: ev.seq_reset,
            late: ev.late,
        };
        let mut values = Vec::with_capacity(self.slots.len());
        self.slots.materialize(&frame, &mut values);
        self.rules
            .eval(&self.slots, &values, &frame)
            .map_err(Failure::Rule)?;
        let mut derived = Vec::with_capacity(self.calc.len());
        self.calc
            .run(&self.slots, &mut values, &frame, &mut derived)
            .map_err(Failure::Calc)?;
        self.checks
            .eval(&self.slots, &values, &frame)
            .map_err(Failure::Check)?;
        Ok(derived)
    }

    /// The scalar data fields, in schema order, for the previous reading.
    fn data_items<'a>(
        &'a self,
        data: &'a Fields,
    ) -> impl Iterator<Item = (&'a str, ScalarRef<'a>)> {
        self.schema.fields.iter().filter_map(move |f| {
            let v = match data.get(&f.name)? {
                serde_json::Value::Number(n) => ScalarRef::Number(n.as_f64()?),
                serde_json::Value::String(s) => ScalarRef::Text(s),
                serde_json::Value::Bool(b) => ScalarRef::Bool(*b),
                _ => return None,
            };
            Some((f.name.as_str(), v))
        })
    }
}

/// The compiled engine: immutable, shareable between threads, cheap to call.
#[derive(Debug, Clone)]
pub struct Engine {
    topic: TopicPattern,
    limits: Limits,
    types: FnvMap<String, TypeEngine>,
    /// Sorted, for messages.
    type_names: Vec<String>,
}

impl Engine {
    /// Compiles and validates the whole spec; the error names the offending path.
    pub fn new(spec: &EngineSpec) -> Result<Engine, SpecError> {
        let topic =
            TopicPattern::parse(&spec.topic).map_err(|e| SpecError::new("topic", e.to_string()))?;
        spec.limits
            .validate()
            .map_err(|e| SpecError::new(format!("limits.{}", e.field), e.problem.to_string()))?;
        if spec.event_types.is_empty() {
            return Err(SpecError::new(
                "event_types",
                "no event types are defined: every message would be rejected",
            ));
        }
        let mut types = FnvMap::default();
        for (name, t) in &spec.event_types {
            types.insert(name.clone(), TypeEngine::compile(name, t)?);
        }
        Ok(Engine {
            topic,
            limits: spec.limits,
            types,
            type_names: spec.event_types.keys().cloned().collect(),
        })
    }

    /// Runs one message through the pipeline, updating the device's state in `state`.
    ///
    /// Stages: topic → decode → envelope agreement → (a new device: a known type that allows
    /// it, and room under `max_devices`) → sequence/duplicate check → event type known →
    /// schema → allow-list, clock skew → rules → calc → checks. The sequence check comes
    /// before the type lookup because sequences are per device: a known device's message of
    /// an unknown type still takes its seq. Deterministic, and never panics.
    pub fn process(&self, state: &mut State, input: &Input<'_>) -> Outcome {
        let Some((device, etype)) = self.topic.matches(input.topic) else {
            return Outcome::Rejected(Rejection::of_message(format!(
                "topic '{}' does not match the pattern '{}'",
                truncate(input.topic),
                self.topic
            )));
        };
        if device.len() > MAX_DEVICE_ID_BYTES {
            // Before anything is kept under it: a device id is a state key and part of every
            // event id. (The embedded endpoint's `max_topic_bytes` stops most such topics
            // earlier; an external broker's topics only meet this check.)
            return Outcome::Rejected(Rejection {
                stage: Stage::Decode,
                reason: format!(
                    "device id '{}' is {} bytes, over the limit of {MAX_DEVICE_ID_BYTES}",
                    truncate(device),
                    device.len()
                ),
                subject: Subject::Field("device".to_string()),
                device: None,
                event_id: None,
                event_type: Some(etype.to_string()),
                gap: None,
                transient: false,
            });
        }
        let reject = |stage, reason, subject, event_id, gap| {
            Outcome::Rejected(Rejection {
                stage,
                reason,
                subject,
                device: Some(device.to_string()),
                event_id,
                event_type: Some(etype.to_string()),
                gap,
                transient: false,
            })
        };
        let msg = match proto::decode_message(input.payload, &self.limits) {
            Ok(m) => m,
            Err(e) => {
                let event_id = e.id.as_deref().map(|id| EventResult::event_id(device, id));
                return reject(e.stage(), e.to_string(), e.kind.subject(), event_id, None);
            }
        };
        let event_id = EventResult::event_id(device, &msg.id);
        for (field, said, topic) in [
            ("device", msg.device.as_deref(), device),
            ("type", msg.event_type.as_deref(), etype),
        ] {
            if let Some(said) = said.filter(|s| *s != topic) {
                let reason = format!(
                    "{field}: the payload says '{}' but the topic says '{topic}'",
                    truncate(said)
                );
                let subject = Subject::Field(field.to_string());
                return reject(Stage::Schema, reason, subject, Some(event_id), None);
            }
        }

        let unknown_type = || {
            format!(
                "unknown event type '{}' (known: {})",
                truncate(etype),
                self.type_names.join(", ")
            )
        };
        // A device gets state only with a message it may send (a known type whose
        // allowed_devices admit it), so ids that no type accepts take neither memory nor
        // max_devices places. A known device's rejected messages still take their seq.
        if state.device(device).is_none() {
            let allowed = match self.types.get(etype) {
                None => Err((Stage::Schema, unknown_type(), Subject::Document)),
                Some(t) => t.rules.check_device(device, etype).map_err(|e| {
                    let f = Failure::Rule(e);
                    (f.stage(), f.to_string(), f.subject())
                }),
            };
            if let Err((stage, reason, subject)) = allowed {
                return reject(stage, reason, subject, Some(event_id), None);
            }
        }
        if !state.admits(device) {
            let reason = format!(
                "device '{}' is new and the gateway already tracks its maximum of {} devices ({})",
                truncate(device),
                state.len(),
                MAX_DEVICES_RULE
            );
            let subject = Subject::Rule(MAX_DEVICES_RULE.to_string());
            return reject(Stage::Rule, reason, subject, Some(event_id), None);
        }
        let mut entry = state.entry(device);
        let class = entry.state.seq.observe(msg.seq, &msg.id, input.replay);
        let (gap, late, seq_reset) = match class {
            SeqClass::Duplicate(kind) => {
                let reason = match kind {
                    DuplicateKind::RecentId => {
                        format!("id '{}' was seen recently", truncate(&msg.id))
                    }
                    DuplicateKind::SeqSeen { highest } => {
                        format!("seq {} was already seen (highest {highest})", msg.seq)
                    }
                };
                return Outcome::Duplicate {
                    event_id,
                    device: device.to_string(),
                    reason,
                };
            }
            SeqClass::Gap(r) => (Some(r), false, false),
            SeqClass::Late => (None, true, false),
            SeqClass::Reset { .. } => (None, false, true),
            SeqClass::First | SeqClass::InOrder | SeqClass::Replayed => (None, false, false),
        };
        entry.mark_dirty(device);

        let Some(t) = self.types.get(etype) else {
            let reason = unknown_type();
            return reject(
                Stage::Schema,
                reason,
                Subject::Document,
                Some(event_id),
                gap,
            );
        };

        let window = entry.state.readings(etype);
        let stored = window.and_then(Window::latest);
        let out_of_order = stored.is_some_and(|p| p.ts >= msg.ts);
        // Older than the latest reading: the kept reading just before it, if there is one.
        let earlier = if out_of_order {
            window.and_then(|w| w.before(msg.ts))
        } else {
            None
        };
        let ev = Event {
            device,
            data: &msg.data,
            ts: msg.ts,
            seq: msg.seq,
            received_at: input.received_at,
            prev: if out_of_order { earlier } else { stored },
            seq_reset,
            late,
        };
        let derived = match t.evaluate(&ev) {
            Ok(d) => d,
            Err(failure) => {
                let stage = failure.stage();
                let reason = failure.to_string();
                let mut out = reject(stage, reason, failure.subject(), Some(event_id), gap);
                if let Outcome::Rejected(r) = &mut out {
                    r.transient = matches!(stage, Stage::Calc | Stage::Check)
                        && ev.prev.is_none()
                        && t.slots.uses_previous();
                }
                return out;
            }
        };

        let mut flags = Vec::new();
        let from_earlier = earlier.is_some();
        if stored.is_none() {
            flags.push(flags::FIRST_READING.to_string());
        } else if from_earlier {
            flags.push(flags::EARLIER_PREVIOUS.to_string());
        } else if out_of_order {
            flags.push(flags::OUT_OF_ORDER.to_string());
        }
        if late {
            flags.push(flags::LATE.to_string());
        }
        if seq_reset {
            flags.push(flags::SEQ_RESET.to_string());
        }
        if input.replay {
            flags.push(flags::REPLAY.to_string());
        }
        // Detectors learn only from events in order: a late, out-of-order or replayed event
        // is scored against the current baselines and leaves them as they are.
        let (mut status, mut anomaly_score) = (Status::Ok, 0.0);
        if let Some(d) = &t.anomaly {
            let learn = !out_of_order && !late && !input.replay;
            let verdict = d.run(
                entry.state.detectors_mut(etype),
                &msg.data,
                &derived,
                learn,
                msg.seq,
            );
            if !verdict.flags.is_empty() {
                status = Status::Anomaly;
                flags.extend(verdict.flags);
            }
            anomaly_score = verdict.score;
        } else if !entry.state.anomaly.is_empty() {
            // The type's anomaly table was removed from the config: drop its detectors.
            entry.state.anomaly.remove(etype);
        }
        let items = || {
            t.data_items(&msg.data)
                .chain(t.calc.reading_items(&derived))
        };
        if !out_of_order {
            entry
                .state
                .readings_mut(etype)
                .advance_with(|r| r.overwrite(msg.ts, msg.seq, items()));
        } else if !input.replay {
            let mut r = Reading::default();
            r.overwrite(msg.ts, msg.seq, items());
            entry.state.readings_mut(etype).insert(r);
        }

        let result = EventResult {
            event_id,
            device: device.to_string(),
            event_type: etype.to_string(),
            seq: msg.seq,
            ts: msg.ts,
            gateway: input.gateway.to_string(),
            via: input.via,
            edge_seq: 0,
            result: t.calc.result_fields(&derived),
            input: msg.data,
            calc_version: t.calc.version().to_string(),
            status,
            flags,
            anomaly_score,
            processed_at: input.received_at,
            correction: None,
        };
        Outcome::Accepted { result, gap, late }
    }

    /// Recomputes a result's derived fields from its input, as the edge did — for the cloud
    /// to re-verify a result, or to recalculate it under a new calc version.
    ///
    /// `previous` is the reading the edge used: build it with [`Reading::from_result`] from
    /// the previous accepted result of the same device and type (`None` for the first). It
    /// is ignored when the result is flagged `first_reading` or `out_of_order`, or when it is
    /// not older than the result. `late` and `seq_reset` come from the result's flags and
    /// `received_at` is its `processed_at`, so rules and checks see what the edge saw.
    /// Compare the returned fields with `result.result` (and the type's
    /// [`calc_version`](Self::calc_version) with `result.calc_version`).
    #[allow(clippy::result_large_err)] // the error is the DLQ entry's content, used by value
    pub fn recompute(
        &self,
        result: &EventResult,
        previous: Option<&Reading>,
    ) -> Result<Fields, Rejection> {
        let has_flag = |f: &str| result.flags.iter().any(|x| x == f);
        let reject = |stage, reason, subject| Rejection {
            stage,
            reason,
            subject,
            device: Some(result.device.clone()),
            event_id: Some(result.event_id.clone()),
            event_type: Some(result.event_type.clone()),
            gap: None,
            transient: false,
        };
        let Some(t) = self.types.get(&result.event_type) else {
            return Err(reject(
                Stage::Schema,
                format!("unknown event type '{}'", truncate(&result.event_type)),
                Subject::Document,
            ));
        };
        let no_prev = has_flag(flags::FIRST_READING) || has_flag(flags::OUT_OF_ORDER);
        let ev = Event {
            device: &result.device,
            data: &result.input,
            ts: result.ts,
            seq: result.seq,
            received_at: result.processed_at,
            prev: previous.filter(|p| !no_prev && p.ts < result.ts),
            seq_reset: has_flag(flags::SEQ_RESET),
            late: has_flag(flags::LATE),
        };
        match t.evaluate(&ev) {
            Ok(derived) => Ok(t.calc.result_fields(&derived)),
            Err(failure) => Err(reject(
                failure.stage(),
                failure.to_string(),
                failure.subject(),
            )),
        }
    }

    /// The calculation version of `event_type` (see [`crate::calc_version`]).
    pub fn calc_version(&self, event_type: &str) -> Option<&str> {
        self.types.get(event_type).map(|t| t.calc.version())
    }

    /// Whether `event_type`'s rules, calculation or checks read the previous reading.
    pub fn uses_previous(&self, event_type: &str) -> bool {
        self.types
            .get(event_type)
            .is_some_and(|t| t.slots.uses_previous())
    }

    /// The configured event types, sorted.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.type_names.iter().map(String::as_str)
    }

    pub fn topic(&self) -> &TopicPattern {
        &self.topic
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

#[cfg(test)]
mod tests;
