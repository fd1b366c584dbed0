//! The event engine: one pure, deterministic library that both tiers run.
//!
//! ```text
//! device ──MQTT──▶ edge-agent ──▶ Engine::process ──▶ Accepted → outbox → cloud-bridge ──▶ Engine::recompute
//!                                       │                                  (re-verify with the same engine)
//!                                       ├──▶ Duplicate → acknowledged, dropped
//!                                       └──▶ Rejected  → DLQ (stage + reason naming the field or rule)
//! ```
//!
//! The agent hands every inbound MQTT message to [`Engine::process`] together with the
//! [`State`] it owns; the engine parses the topic, decodes the payload (via
//! [`proto::decode_message`]), checks the envelope against the topic, tracks the device's
//! sequence ([`seq`]), validates `data` against the event type's schema ([`schema`]), applies
//! the rules ([`rules`]), computes the derived fields ([`calc`]) and checks them ([`check`]),
//! runs the type's streaming anomaly detectors over the watched fields ([`anomaly`]: spike,
//! drift, stuck; they set `status`, `flags` and `anomaly_score`, never the values), and
//! returns an [`Outcome`]: an [`EventResult`](proto::EventResult), a duplicate, or a
//! [`Rejection`] for the DLQ. The bridge recomputes results with [`Engine::recompute`] and
//! compares; [`Engine::calc_version`] names the calculation that produced a result.
//!
//! # Invariants
//! - **Pure.** No I/O, no clock (`received_at` is an input and becomes `processed_at`), no
//!   randomness (not even hash seeds: maps use a fixed FNV hasher or are B-trees). The same spec, state and input always give
//!   the same outcome and the same new state, on the edge and in the cloud.
//! - **Total.** Every input yields an outcome; nothing a device sends can make it panic.
//! - **Explained.** Every rejection names the stage and the field or rule
//!   (`data.voltage: 612 is above max 500`,
//!   `rule counter_monotonic: cumulative kWh must not decrease (kwh=10, prev.kwh=12)`).
//! - **Checked up front.** [`Engine::new`] compiles every expression and resolves every name;
//!   a typo is a [`SpecError`] with its path, never a runtime failure.
//! - **State only moves forward on purpose.** A message's `seq` is recorded as soon as its
//!   envelope is valid (so a rejected message is "in the DLQ", not "missed"); the previous
//!   reading changes only when an event is accepted and is newer than the stored one.
//! - **Bounded.** Per device the state is the sequence tracker, a [`Window`] of the latest
//!   readings per type (the previous one and [`EARLIER_READINGS`] before it) and one fixed-size [`anomaly::FieldDetector`] per watched field: nothing grows with the
//!   stream.
//! - **Cheap.** Expressions are parsed once; per event the work is a handful of small
//!   allocations and tree walks (a few microseconds).
//!
//! The expression language (variables, `delta`/`rate`/`prev`/`dt`/`has`, pure functions) is
//! documented in [`expr`] and [`functions`]; the config format in [`spec`].

pub mod anomaly;
pub mod calc;
pub mod check;
pub mod correct;
mod engine;
pub mod expr;
mod fnv;
pub mod functions;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod missed;
pub mod names;
pub mod rules;
pub mod schema;
pub mod seq;
pub mod spec;
pub mod state;
pub mod topic;
mod value;
pub mod verify;
pub mod window;

pub use calc::calc_version;
pub use engine::{Engine, Input, Outcome, Rejection, flags};
pub use functions::haversine_m;
pub use seq::{SeqClass, SeqRange, SeqTracker};
pub use spec::{
    AnomalySpec, CalcSpec, EngineSpec, EventTypeSpec, FieldSpec, FieldType, RuleSpec, SpecError,
};
pub use state::{DeviceState, Reading, State};
pub use topic::{TopicError, TopicPattern};
pub use value::Scalar;
pub use window::{EARLIER_READINGS, Timed, Window};
