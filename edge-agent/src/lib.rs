//! The gateway agent (see the crate's `main.rs` for the binary).

pub mod ingest;
