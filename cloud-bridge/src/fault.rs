//! A test hook for crash tests: `CLOUD_BRIDGE_FAULT_PAUSE_AFTER_PUT_MS=N` makes the bridge
//! sleep N ms after each S3 PUT and before its PutEvents and commit, so a test can `kill -9`
//! it inside that window deterministically. Unset (always, in production) it costs one
//! cached environment lookup.

use std::sync::OnceLock;
use std::time::Duration;

fn pause() -> Option<Duration> {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    *PAUSE.get_or_init(|| {
        std::env::var("CLOUD_BRIDGE_FAULT_PAUSE_AFTER_PUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    })
}

pub async fn after_put() {
    if let Some(d) = pause() {
        tracing::warn!("fault hook: pausing {d:?} after an S3 PUT");
        tokio::time::sleep(d).await;
    }
}
