//! Corrections in the cloud: the engine's at-most-once policy ([`engine::correct`]) over the
//! shared correction history ([`crate::backend::CorrectionHistory`]), and the rewrite of a
//! stored record. [`run`] is a correction run over stored objects.
//!
//! Used by the pipeline (a result found incorrect before it is stored), the DLQ processor and
//! correction runs (records already stored: [`rewrite_record`] replaces the record's line in
//! its NDJSON object with S3 `If-Match`, so two rewrites of one object cannot lose each other's
//! change).

use std::sync::Arc;

use anyhow::{Context as _, bail};
use engine::correct::{self, Decision};
use engine::{Engine, Reading, Rejection};
use proto::{CorrectedBy, EventResult};

use crate::backend::{CorrectionHistory, CorrectionRecord, ObjectStore, Recorded};

pub mod run;

/// What became of a correction request.
#[derive(Debug)]
pub enum Applied {
    /// This request corrected it (or finishes its own earlier attempt): store this record.
    Corrected(Box<EventResult>),
    /// Another request corrected the event after this record was read: nothing to do.
    Superseded(CorrectionRecord),
    /// Corrected once already and detected again: for manual review (stage `correction`).
    DeadLetter(String),
    /// The current engine cannot recalculate it (the one correction is not used up).
    Failed(Rejection),
}

#[derive(Debug, Clone)]
pub struct Corrector {
    pub engine: Arc<Engine>,
    pub history: Arc<dyn CorrectionHistory>,
    /// Names this bridge in the history (diagnostics).
    pub owner: String,
}

impl Corrector {
    /// Corrects `record` at most once: recalculates it against `previous`, then records the
    /// correction in the history; only the request that wrote the history record (or a repeat
    /// of that same `request`) gets [`Applied::Corrected`].
    pub async fn correct(
        &self,
        record: &EventResult,
        previous: Option<&Reading>,
        reason: &str,
        request: &str,
        now: i64,
    ) -> anyhow::Result<Applied> {
        if let Decision::DeadLetter { reason } = correct::decide(record, false, reason) {
            return Ok(Applied::DeadLetter(reason));
        }
        // Recalculate first: a recalculation that fails must not use up the one correction.
        if let Err(r) = correct::apply(
            &self.engine,
            record,
            previous,
            reason,
            now,
            CorrectedBy::Cloud,
        ) {
            return Ok(Applied::Failed(r));
        }
        let rec = CorrectionRecord {
            event_id: record.event_id.clone(),
            request: request.to_string(),
            gateway: record.gateway.clone(),
            edge_seq: record.edge_seq,
            reason: reason.to_string(),
            at: now,
            owner: self.owner.clone(),
        };
        let (reason, at) = match self.history.record(&rec).await? {
            Recorded::New => (rec.reason, rec.at),
            // The same request again: the same correction (its reason and time), so a
            // rewritten object comes out byte for byte the same.
            Recorded::Again(first) => (first.reason, first.at),
            Recorded::Other(first) => {
                return Ok(match correct::decide(record, true, reason) {
                    Decision::DeadLetter { reason } => Applied::DeadLetter(reason),
                    _ => Applied::Superseded(first),
                });
            }
        };
        match correct::apply(
            &self.engine,
            record,
            previous,
            &reason,
            at,
            CorrectedBy::Cloud,
        ) {
            Ok(fixed) => Ok(Applied::Corrected(Box::new(fixed))),
            Err(r) => Ok(Applied::Failed(r)),
        }
    }
}

/// What a late arrival does to the result calculated just after it (see [`Corrector::restate`]).
#[derive(Debug)]
pub enum Restatement {
    /// The same values against the late reading, corrected by another request already, or
    /// not recalculable (logged): nothing to write.
    Unchanged,
    /// This request corrected it: store this record in its place.
    Corrected(Box<EventResult>),
    /// For a person (stage `correction`): refused against the late reading, or corrected once
    /// already.
    DeadLetter(String),
}

impl Corrector {
    /// Recalculates `record` — calculated across a gap, before `late` (event `late_event`)
    /// arrived — against the late reading, and corrects it at most once if its values change
    /// (`request` names this attempt in the history). The gateways' late results and the
    /// gateway-less devices' go through here alike.
    #[allow(clippy::too_many_arguments)]
    pub async fn restate(
        &self,
        record: &EventResult,
        late: &Reading,
        late_event: &str,
        request: &str,
        tolerance: f64,
        metrics: &crate::metrics::Metrics,
        now: i64,
    ) -> anyhow::Result<Restatement> {
        use engine::verify::{Restated, against_late};
        let reason = match against_late(&self.engine, record, late, late_event, tolerance) {
            Restated::Holds => return Ok(Restatement::Unchanged),
            Restated::Changed { reason } => reason,
            // Right as calculated across the gap, refused against the late reading.
            Restated::Refused { reason } => {
                metrics.incorrect.increment(1);
                return Ok(Restatement::DeadLetter(reason));
            }
        };
        metrics.incorrect.increment(1);
        Ok(
            match self
                .correct(record, Some(late), &reason, request, now)
                .await?
            {
                Applied::Corrected(mut fixed) => {
                    // Calculated against a reading that arrived after it: a verifier going
                    // in order cannot know that reading.
                    fixed
                        .flags
                        .push(engine::flags::PREVIOUS_ARRIVED_LATE.to_string());
                    metrics.corrected.increment(1);
                    tracing::info!(event_id = %fixed.event_id, %reason, "corrected after a late arrival");
                    Restatement::Corrected(fixed)
                }
                Applied::Superseded(_) => Restatement::Unchanged,
                Applied::DeadLetter(reason) => Restatement::DeadLetter(reason),
                Applied::Failed(rej) => {
                    tracing::warn!(event_id = %record.event_id,
                        "recalculation after a late arrival failed: {}", rej.reason);
                    Restatement::Unchanged
                }
            },
        )
    }
}

/// Attempts at a conditional rewrite before giving up (each conflict means another writer
/// changed the object in between; the caller retries later).
const REWRITE_ATTEMPTS: u32 = 8;

/// Replaces the line of `record.event_id` in the NDJSON object `key` with `record`. False if
/// the object or the line is not there.
pub async fn rewrite_record(
    objects: &dyn ObjectStore,
    key: &str,
    record: &EventResult,
) -> anyhow::Result<bool> {
    let line = serde_json::to_string(record).context("encoding a result as JSON")?;
    for _ in 0..REWRITE_ATTEMPTS {
        let Some((body, etag)) = objects.get_versioned(key).await? else {
            return Ok(false);
        };
        let text = String::from_utf8(body).with_context(|| format!("{key}: not UTF-8"))?;
        let Some(new) = replace_line(&text, &record.event_id, &line) else {
            return Ok(false);
        };
        if new == text {
            return Ok(true);
        }
        if objects
            .put_if_match(key, new.into_bytes(), "application/x-ndjson", &etag)
            .await?
        {
            return Ok(true);
        }
    }
    bail!("{key}: changed under {REWRITE_ATTEMPTS} rewrite attempts in a row")
}

/// `text` with the NDJSON line whose `event_id` is `event_id` replaced by `line`.
fn replace_line(text: &str, event_id: &str, line: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + line.len());
    let mut found = false;
    for l in text.lines() {
        let is_it = !found
            && serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .is_some_and(|v| v["event_id"] == event_id);
        out.push_str(if is_it { line } else { l });
        out.push('\n');
        found |= is_it;
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_line_of_the_event() {
        let text = "{\"event_id\":\"a/1\",\"x\":1}\n{\"event_id\":\"a/2\",\"x\":2}\n";
        let out = replace_line(text, "a/2", "{\"event_id\":\"a/2\",\"x\":3}").unwrap();
        assert_eq!(
            out,
            "{\"event_id\":\"a/1\",\"x\":1}\n{\"event_id\":\"a/2\",\"x\":3}\n"
        );
        assert_eq!(replace_line(text, "a/9", "{}"), None);
    }
}
