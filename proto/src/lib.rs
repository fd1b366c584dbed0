//! The contract between the tiers.
//!
//! Devices publish [`DeviceMessage`]s (JSON or CBOR) to the gateway; the gateway turns each one
//! into an [`EventResult`] (CBOR on the wire to the cloud, NDJSON in S3) or a [`DlqEntry`].
//! Both `edge-agent` and `cloud-bridge` depend on this crate and nothing here does I/O: it is
//! types, hard input limits and codecs, so that the two tiers can never disagree on a shape.

pub mod accept;
pub mod decode;
pub mod dlq;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod limits;
pub mod message;
pub mod result;
pub mod timestamp;
pub mod uplink;
pub mod wire;

pub use decode::{DecodeError, DecodeErrorKind, decode_message};
pub use dlq::{DlqEntry, Stage, Subject};
pub use limits::{LimitProblem, Limits, LimitsError};
pub use message::{DeviceMessage, Fields};
pub use result::{CorrectedBy, Correction, EventResult, Status, Via};
pub use wire::{Batch, WireError};
