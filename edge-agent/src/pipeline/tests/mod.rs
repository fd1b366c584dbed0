//! The pipeline driven directly (no ingest), one file per concern.

mod correction;
mod dlq;
mod missed;
