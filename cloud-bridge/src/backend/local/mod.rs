//! The local backend: the bridge's cloud in a directory, for the demo and for trying the
//! pipeline without an AWS account. One bridge process per directory (the state is guarded
//! by an in-process lock).
//!
//! - objects: `dir/{key}`, the same layout as the S3 bucket ([`crate::layout`]);
//! - state: `dir/state/bridge-state.json`; gateway-less devices: `dir/state/devices/`;
//!   correction history: `dir/state/corrections/`;
//! - DLQ: `dir/dlq/`; events: `dir/eventbridge/dt=YYYY-MM-DD/{detail-type}.ndjson`.

use std::path::Path;
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::Config;

mod devices;
mod events;
mod history;
mod objects;
mod queue;
mod state;
#[cfg(test)]
mod tests;

pub use devices::DirDevices;
pub use events::LocalEvents;
pub use history::DirHistory;
pub use objects::LocalObjects;
pub use queue::DirQueue;
pub use state::LocalState;

/// Every part under `dir` (see the module doc).
pub fn backend(dir: &Path, cfg: &Config) -> anyhow::Result<Backend> {
    Ok(Backend {
        objects: Arc::new(LocalObjects::new(dir)?),
        state: Arc::new(LocalState::open(&dir.join("state"))?),
        devices: Arc::new(DirDevices::open(&dir.join("state").join("devices"))?),
        events: Arc::new(LocalEvents::new(
            &dir.join("eventbridge"),
            &cfg.aws.source,
            &cfg.aws.event_bus,
        )?),
        history: Arc::new(DirHistory::open(&dir.join("state").join("corrections"))?),
        dlq: Arc::new(DirQueue::open(&dir.join("dlq"))?),
    })
}
