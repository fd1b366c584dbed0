//! Corrections in the cloud: the engine's at-most-once policy ([`engine::correct`]) over the
//! shared correction history ([`crate::history`]), and the rewrite of a stored record.
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

use crate::backend::ObjectStore;
use crate::history::{CorrectionHistory, CorrectionRecord, Recorded};

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

/// What a correction run over stored objects did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RunReport {
    pub objects: u64,
    pub records: u64,
    pub verified: u64,
    pub unverifiable: u64,
    pub incorrect: u64,
    pub corrected: u64,
    /// Corrected by another request (another bridge's run) meanwhile.
    pub superseded: u64,
    pub dead_lettered: u64,
}

/// A correction run over stored objects (a monitor's alarm, `cloud-bridge correct`): each
/// record is verified (the previous reading known from the same object, in `edge_seq` order)
/// and an incorrect one corrected at most once, its record replaced in place. Any number of
/// runs may race over the same objects: the history lets one correct each event, `If-Match`
/// keeps every rewrite.
pub async fn run_over(
    p: &crate::pipeline::Pipeline,
    keys: &[String],
    run_id: &str,
) -> anyhow::Result<RunReport> {
    use engine::verify::{Previous, Verdict, needs_previous, verify};
    let v = p
        .verifier
        .as_ref()
        .context("a correction run needs [verify] (the engine config)")?;
    let mut report = RunReport::default();
    let mut dead = Vec::new();
    // In each gateway's edge_seq order, so a device's previous reading carries over from one
    // object to the next; after a break (a range not in `keys`) it is trusted only where the
    // device's own seq shows nothing came in between.
    let mut ordered: Vec<(&str, u64, &String)> = keys
        .iter()
        .map(|k| {
            let gw = k
                .split('/')
                .find_map(|s| s.strip_prefix("gateway="))
                .unwrap_or("");
            let from = k
                .rsplit('/')
                .next()
                .and_then(|f| f.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            (gw, from, k)
        })
        .collect();
    ordered.sort();
    let mut readings: std::collections::HashMap<(String, String, String), crate::window::Window> =
        Default::default();
    let mut next_from: std::collections::HashMap<String, u64> = Default::default();
    for (gw, from, key) in ordered {
        let Some((body, _)) = p.sink.objects.get_versioned(key).await? else {
            continue;
        };
        report.objects += 1;
        let mut records: Vec<EventResult> = Vec::new();
        for line in String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            records.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{key}: a line is not a result"))?,
            );
        }
        records.sort_by_key(|r| r.edge_seq);
        if next_from.get(gw) != Some(&from) {
            for ((g, _, _), w) in readings.iter_mut() {
                if g == gw {
                    w.doubt();
                }
            }
        }
        if let Some(last) = records.last() {
            next_from.insert(gw.to_string(), last.edge_seq + 1);
        }
        for r in &records {
            report.records += 1;
            let k = (r.gateway.clone(), r.device.clone(), r.event_type.clone());
            let w = readings.entry(k).or_default();
            let prev = w.previous_of(r).cloned();
            let known = match &prev {
                Some(p) => Previous::Known(Some(p)),
                None => Previous::Unknown,
            };
            let verdict = verify(&v.corrector.engine, r, known, v.tolerance());
            w.keep(r, key);
            match &verdict {
                Verdict::Consistent => report.verified += 1,
                Verdict::Unverifiable => report.unverifiable += 1,
                Verdict::Rejected(_) => report.verified += 1,
                _ => {
                    report.verified += 1;
                    report.incorrect += 1;
                    if prev.is_none() && needs_previous(&v.corrector.engine, r) {
                        report.unverifiable += 1;
                        continue;
                    }
                    let request = format!("{run_id}:{}:{}", r.gateway, r.edge_seq);
                    let now = crate::now_ms();
                    match v
                        .corrector
                        .correct(r, prev.as_ref(), &verdict.reason(), &request, now)
                        .await?
                    {
                        Applied::Corrected(fixed) => {
                            if rewrite_record(&*p.sink.objects, key, &fixed).await? {
                                report.corrected += 1;
                                crate::metrics::Metrics::add(&p.metrics.corrected, 1);
                                p.sink
                                    .put_events(vec![(
                                        "EventCorrected",
                                        serde_json::to_string(&*fixed)?,
                                    )])
                                    .await?;
                            }
                        }
                        Applied::Superseded(_) => report.superseded += 1,
                        Applied::DeadLetter(reason) => {
                            report.dead_lettered += 1;
                            dead.push(crate::dlq::DlqMessage::for_record(
                                proto::Stage::Correction,
                                reason,
                                r,
                                Some(key),
                                prev.as_ref(),
                                now,
                            ));
                        }
                        Applied::Failed(rej) => {
                            report.dead_lettered += 1;
                            dead.push(crate::dlq::DlqMessage::for_record(
                                proto::Stage::Cloud,
                                format!(
                                    "{}; recalculation failed: {}",
                                    verdict.reason(),
                                    rej.reason
                                ),
                                r,
                                Some(key),
                                prev.as_ref(),
                                now,
                            ));
                        }
                    }
                }
            }
        }
    }
    let events = p.dead_letter(&dead).await?;
    p.sink.put_events(events).await?;
    crate::metrics::Metrics::add(&p.metrics.dead_lettered, dead.len() as u64);
    Ok(report)
}

/// The `events/` objects of the days `since..=until` (YYYY-MM-DD; `until` absent: no end),
/// optionally of one gateway, in key order.
pub async fn select_objects(
    objects: &dyn ObjectStore,
    prefix: &str,
    since: &str,
    until: Option<&str>,
    gateway: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    for (what, d) in [("--since", Some(since)), ("--until", until)] {
        if let Some(d) = d
            && !(d.len() == 10 && d.as_bytes()[4] == b'-' && d.as_bytes()[7] == b'-')
        {
            bail!("{what}: '{d}' is not a YYYY-MM-DD day");
        }
    }
    let keys = objects.list(&format!("{prefix}events/")).await?;
    Ok(keys
        .into_iter()
        .filter(|k| {
            let day = k
                .split('/')
                .find_map(|s| s.strip_prefix("dt="))
                .unwrap_or("");
            let gw = k.split('/').find_map(|s| s.strip_prefix("gateway="));
            day >= since && until.is_none_or(|u| day <= u) && gateway.is_none_or(|g| gw == Some(g))
        })
        .collect())
}

/// A correction run over the days `since..=until` (and one gateway, if given), named
/// `{tag}-{now}` in the history: what `cloud-bridge correct`, the monitor and the Lambda's
/// alarm handler start.
pub async fn run_days(
    p: &crate::pipeline::Pipeline,
    since: &str,
    until: Option<&str>,
    gateway: Option<&str>,
    tag: &str,
) -> anyhow::Result<RunReport> {
    let keys = select_objects(&*p.sink.objects, &p.cfg.aws.prefix, since, until, gateway).await?;
    run_over(p, &keys, &format!("{tag}-{}", crate::now_ms())).await
}
