//! The DLQ processor: one final retry per failure, then `failures/` for a person.
//!
//! For each message: a record that was never corrected is recalculated with the current
//! engine (a fixed config, a fixed calculation) and replaces the stored record (status
//! `corrected`, `EventCorrected`); a record that was corrected before, or cannot be
//! recalculated, is stored under `{prefix}failures/` with the reason. Either way the message
//! is then deleted. A message whose handling keeps failing (S3 down, say) stays in the queue
//! and is retried after its visibility timeout; after `dlq.max_receives` receives it goes to
//! `failures/` too. Messages are handled at most `dlq.max_per_s` per second so a flood of
//! failures cannot take the bridge's capacity from the main path.

use std::time::Duration;

use anyhow::Context as _;
use engine::correct::{self, Decision};
use engine::verify::needs_previous;
use proto::EventResult;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::{DlqMessage, Received};
use crate::correction::{Applied, rewrite_record};
use crate::detail::DetailType;
use crate::layout::{Object, ObjectKey, date_of};
use crate::now_ms;
use crate::pipeline::Pipeline;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Recalculated; the record in `key` replaced (or written there if it was never stored).
    Corrected { key: String },
    /// Stored under `failures/` at `key` with `reason`.
    Failure { key: String, reason: String },
}

/// Counts of one [`drain`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Drained {
    pub corrected: u64,
    pub failures: u64,
    /// Left in the queue (handling failed; retried after the visibility timeout).
    pub retried_later: u64,
}

/// Handles one message body (see the module doc). An error means "try again later".
pub async fn handle(p: &Pipeline, body: &str) -> anyhow::Result<Handled> {
    let msg: DlqMessage = match serde_json::from_str(body) {
        Ok(m) => m,
        Err(e) => return store_failure(p, None, body, format!("not a DLQ message: {e}")).await,
    };
    if let Some(origin) = &msg.message {
        return replay(p, &msg, origin, body).await;
    }
    let record: EventResult = match serde_json::from_str(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("{}; payload is not a result record: {e}", msg.reason);
            return store_failure(p, Some(&msg), body, reason).await;
        }
    };
    let Some(corrector) = p.verifier.as_ref().map(|v| &v.corrector) else {
        let reason = format!(
            "{}; cannot recalculate: [verify] is not configured",
            msg.reason
        );
        return store_failure(p, Some(&msg), body, reason).await;
    };
    // Corrected before: the policy's answer, before anything is recalculated. (Corrected by
    // another request meanwhile is the Corrector's answer below.)
    if let Decision::DeadLetter { reason } = correct::decide(&record, false, &msg.reason) {
        return store_failure(p, Some(&msg), body, reason).await;
    }
    if msg.previous.is_none() && needs_previous(&corrector.engine, &record) {
        let reason = format!(
            "{}; cannot recalculate: the previous reading is unknown",
            msg.reason
        );
        return store_failure(p, Some(&msg), body, reason).await;
    }
    let reason = format!("dlq retry: {}", msg.reason);
    let fixed = match corrector
        .correct(&record, msg.previous.as_ref(), &reason, &msg.id, now_ms())
        .await?
    {
        Applied::Corrected(fixed) => fixed,
        Applied::Superseded(by) => {
            let reason = format!("{} (corrected meanwhile by {})", msg.reason, by.request);
            return store_failure(p, Some(&msg), body, reason).await;
        }
        Applied::DeadLetter(reason) => return store_failure(p, Some(&msg), body, reason).await,
        Applied::Failed(rej) => {
            let reason = format!("{}; recalculation failed: {}", msg.reason, rej.reason);
            return store_failure(p, Some(&msg), body, reason).await;
        }
    };
    let key = match &msg.object_key {
        Some(key) => {
            if !rewrite_record(&*p.sink.objects, key, &fixed).await? {
                anyhow::bail!("{key}: the record of {} is not there", record.event_id);
            }
            key.clone()
        }
        None => {
            // Never stored: it gets an object of its own (one record, a deterministic key).
            let key = ObjectKey {
                date: date_of(fixed.ts),
                gateway: fixed.gateway.clone(),
                object: Object::Recalculated {
                    edge_seq: fixed.edge_seq,
                },
            }
            .to_key(&p.cfg.aws.prefix);
            let mut line = serde_json::to_vec(&*fixed)?;
            line.push(b'\n');
            p.sink
                .put_object(&key, line, "application/x-ndjson")
                .await?;
            key
        }
    };
    p.sink
        .put_events(vec![(
            DetailType::EventCorrected,
            serde_json::to_string(&*fixed)?,
        )])
        .await?;
    p.metrics.corrected.increment(1);
    info!(event_id = %fixed.event_id, %key, "DLQ: recalculated and replaced the stored record");
    Ok(Handled::Corrected { key })
}

/// The final retry of a gateway-less device message: through the ingest again, as a replay
/// (exempt from the duplicate checks, its `seq` was recorded when it was refused), as of its
/// arrival time. Stored: done. Refused again: `failures/` with the new reason.
async fn replay(
    p: &Pipeline,
    msg: &DlqMessage,
    origin: &crate::backend::DeviceOrigin,
    body: &str,
) -> anyhow::Result<Handled> {
    use base64::Engine as _;
    let Some(ingest) = p.ingest.as_deref() else {
        let reason = format!("{}; cannot replay: [ingest] is not configured", msg.reason);
        return store_failure(p, Some(msg), body, reason).await;
    };
    let bytes = match base64::engine::general_purpose::STANDARD.decode(&origin.bytes) {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("{}; its message bytes are not base64: {e}", msg.reason);
            return store_failure(p, Some(msg), body, reason).await;
        }
    };
    let m = crate::ingest::Message {
        device: &origin.device,
        event_type: &origin.event_type,
        payload: &bytes,
        via: origin.via,
        received_at: origin.received_at,
        replay: true,
    };
    match ingest.handle(&m).await? {
        crate::ingest::Reply::Stored { key, event_id, .. } => {
            info!(%event_id, %key, "DLQ: a refused device message was processed on replay");
            Ok(Handled::Corrected { key })
        }
        crate::ingest::Reply::Duplicate { event_id, .. } => {
            let reason = format!("{}; {event_id} was processed meanwhile", msg.reason);
            store_failure(p, Some(msg), body, reason).await
        }
        crate::ingest::Reply::Rejected { reason, .. } => {
            let reason = format!("{}; refused again on replay: {reason}", msg.reason);
            store_failure(p, Some(msg), body, reason).await
        }
    }
}

/// `{prefix}failures/dt=…/gateway=…/dlq-{id}.json`: the message and the final reason.
pub(crate) async fn store_failure(
    p: &Pipeline,
    msg: Option<&DlqMessage>,
    body: &str,
    reason: String,
) -> anyhow::Result<Handled> {
    let now = now_ms();
    let gateway = msg.and_then(|m| m.gateway.as_deref()).unwrap_or("unknown");
    let id: String = match msg {
        Some(m) => crate::hex_name(&m.id),
        None => format!("{:016x}", crate::fnv1a(body.as_bytes())),
    };
    let key = ObjectKey {
        date: date_of(now),
        gateway: gateway.to_string(),
        object: Object::GivenUp { id },
    }
    .to_key(&p.cfg.aws.prefix);
    let doc = json!({
        "reason": reason,
        "stored_at": proto::timestamp::format_rfc3339(now),
        "message": msg.map_or_else(|| json!(body), |m| serde_json::to_value(m).unwrap_or_default()),
    });
    p.sink
        .put_object(&key, serde_json::to_vec_pretty(&doc)?, "application/json")
        .await?;
    p.metrics.failures_stored.increment(1);
    warn!(%key, %reason, "DLQ: stored for manual investigation");
    Ok(Handled::Failure { key, reason })
}

/// Handles one received message; a message that failed `dlq.max_receives` times is stored
/// under `failures/` with the last error. The caller deletes it on `Ok` (the Lambda's event
/// source mapping does that itself).
pub async fn settle(p: &Pipeline, m: &Received) -> anyhow::Result<Handled> {
    match handle(p, &m.body).await {
        Ok(h) => Ok(h),
        Err(e) if m.receive_count >= p.cfg.dlq.max_receives => {
            let msg = serde_json::from_str::<DlqMessage>(&m.body).ok();
            let reason = format!(
                "the DLQ processor failed {} times; last error: {e:#}",
                m.receive_count
            );
            store_failure(p, msg.as_ref(), &m.body, reason).await
        }
        Err(e) => Err(e),
    }
}

/// [`settle`], then deletes the message from the queue.
pub async fn process(p: &Pipeline, m: &Received) -> anyhow::Result<Handled> {
    let handled = settle(p, m).await?;
    p.dlq.delete(&m.receipt).await?;
    Ok(handled)
}

/// Handles everything in the queue now (no waiting for new messages); for `cloud-bridge dlq
/// process` and tests.
pub async fn drain(p: &Pipeline) -> anyhow::Result<Drained> {
    let mut d = Drained::default();
    loop {
        let got = p.dlq.receive(10, 0, p.cfg.dlq.visibility_timeout_s).await?;
        if got.is_empty() {
            return Ok(d);
        }
        for m in &got {
            match process(p, m).await {
                Ok(Handled::Corrected { .. }) => d.corrected += 1,
                Ok(Handled::Failure { .. }) => d.failures += 1,
                Err(e) => {
                    warn!(
                        "DLQ message {}: {e:#} (retried after the visibility timeout)",
                        m.message_id
                    );
                    d.retried_later += 1;
                }
            }
        }
    }
}

/// The processor loop of `cloud-bridge run`: long-polls the queue and handles at most
/// `dlq.max_per_s` messages per second until `shutdown`.
pub async fn run(p: Pipeline, shutdown: CancellationToken) {
    let gap = Duration::from_secs_f64(1.0 / p.cfg.dlq.max_per_s);
    let mut next = Instant::now();
    info!(queue = %p.dlq.location(), max_per_s = p.cfg.dlq.max_per_s, "DLQ processor started");
    loop {
        let got = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = p.dlq.receive(10, 10, p.cfg.dlq.visibility_timeout_s) => r,
        };
        let got = match got.context("DLQ receive") {
            Ok(g) => g,
            Err(e) => {
                warn!("{e:#}; retrying in 5 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        for m in &got {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            next = next.max(Instant::now()) + gap;
            if let Err(e) = process(&p, m).await {
                warn!(
                    "DLQ message {}: {e:#} (retried after the visibility timeout)",
                    m.message_id
                );
            }
        }
    }
}
