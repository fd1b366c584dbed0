//! The gateway agent: the first tier of the pipeline.
//!
//! Devices publish over MQTT to the gateway; [`ingest`] takes each message off the wire, the
//! [`pipeline`] thread runs it through the shared [`engine`] (decode, schema, rules, sequence
//! tracking, calculation, output checks) and [`store`]s its outcome — a result in the outbox or
//! an entry in the local DLQ — durably, and only then releases the message's acknowledgement.
//! The outbox is what the uplink later drains to the cloud.
//!
//! Invariants:
//! - nothing is acknowledged before its outcome is durable (result or DLQ entry, never neither);
//! - outbox entries carry a gap-free, gateway-wide `edge_seq` in commit order;
//! - all business logic lives in `engine`; this crate only moves bytes and keeps them.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod devices;
pub mod dlq;
pub mod fault;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod ingest;
pub mod missed;
pub mod pipeline;
pub mod reload;
pub mod status;
pub mod store;
pub mod systemd;
pub mod tally;
pub mod tap;
pub mod telemetry;
pub mod uplink;
