//! The AWS backend: S3 objects, the per-gateway state, the gateway-less devices' state and the
//! correction history in one DynamoDB table, EventBridge, and the SQS DLQ. Any number of bridges (and Lambda instances)
//! share it; every condition is one conditional write.

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::Config;
use crate::metrics::Metrics;

mod client;
pub mod devices;
mod eventbridge;
mod history;
mod s3;
mod sqs;
mod state;

pub use client::{ATTEMPT_TIMEOUT, Aws, OPERATION_TIMEOUT, SDK_ATTEMPTS, err};
pub use devices::DeviceTable;
pub use eventbridge::{EventBridge, PUT_EVENTS_MAX_BYTES, PUT_EVENTS_MAX_ENTRIES, chunk_entries};
pub use history::DynamoHistory;
pub use s3::S3Objects;
pub use sqs::SqsQueue;
pub use state::StateTable;

/// S3 (`aws.bucket`), DynamoDB (`aws.table`: state and history), EventBridge
/// (`aws.event_bus`), SQS (`aws.dlq_queue`).
pub fn backend(aws: Aws, cfg: &Arc<Config>, metrics: &Arc<Metrics>) -> Backend {
    Backend {
        objects: Arc::new(S3Objects::new(aws.s3.clone(), cfg.aws.bucket.clone())),
        state: Arc::new(StateTable::new(aws.dynamodb.clone(), cfg.aws.table.clone())),
        devices: Arc::new(DeviceTable::new(
            aws.dynamodb.clone(),
            cfg.aws.table.clone(),
        )),
        events: Arc::new(EventBridge::new(
            aws.eventbridge,
            Arc::clone(cfg),
            Arc::clone(metrics),
        )),
        history: Arc::new(DynamoHistory::new(aws.dynamodb, cfg.aws.table.clone())),
        dlq: Arc::new(SqsQueue::new(aws.sqs, cfg.aws.dlq_queue.clone())),
    }
}
