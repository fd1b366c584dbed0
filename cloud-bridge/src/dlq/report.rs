//! `cloud-bridge dlq list|stats`: what is waiting in the DLQ and what was given up on under
//! `failures/`, for a person at a terminal (aligned text) or a script (`--json`).
//!
//! Listing the queue receives its messages with a visibility timeout of 0 (they stay
//! available to the processor), which SQS counts as a receive.

use std::collections::{BTreeMap, HashSet};

use proto::{Stage, Subject};
use serde::Serialize;
use serde_json::Value;

use super::DlqMessage;
use crate::layout::{self, ObjectKey};
use crate::pipeline::Pipeline;

/// One queued message, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageBrief {
    pub id: String,
    pub stage: Stage,
    pub event_id: Option<String>,
    pub device: Option<String>,
    pub reason: String,
    pub first_seen: String,
    pub object_key: Option<String>,
    /// The field or rule the engine refused, when the sender recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
}

/// One object under `failures/`: an uplink message that was not a batch, or a DLQ message
/// given up on.
#[derive(Debug, Clone, Serialize)]
pub struct FailureBrief {
    pub key: String,
    pub reason: Option<String>,
    pub event_id: Option<String>,
    pub stored_at: Option<String>,
}

/// `dlq list`: queued messages and the newest `failures/` entries.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub queue: String,
    pub messages: Vec<MessageBrief>,
    pub failures: Vec<FailureBrief>,
}

/// `dlq stats`: depth, counts by stage and reason, and the failures by day.
#[derive(Debug, Clone, Serialize)]
pub struct DlqStats {
    pub queue: String,
    pub waiting: u64,
    pub in_flight: u64,
    pub sampled: usize,
    pub by_stage: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    pub oldest: Option<String>,
    pub failures: usize,
    pub failures_by_day: BTreeMap<String, u64>,
}

/// Up to `limit` queued messages (de-duplicated across receives) and `failures/` entries.
pub async fn list(p: &Pipeline, limit: usize) -> anyhow::Result<Listing> {
    let queued = peek(p, limit).await?;
    let keys = p
        .sink
        .objects
        .list(&layout::failures(&p.cfg.aws.prefix))
        .await?;
    let mut failures = Vec::new();
    for key in keys.iter().rev().take(limit) {
        let doc = match p.sink.objects.get_versioned(key).await? {
            Some((b, _)) => serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            None => continue,
        };
        let text = |v: &Value| v.as_str().map(String::from);
        failures.push(FailureBrief {
            key: key.clone(),
            reason: text(&doc["reason"]).or_else(|| text(&doc["message"]["reason"])),
            event_id: text(&doc["message"]["event_id"]).or_else(|| text(&doc["event_id"])),
            // A given-up DLQ message says when it was stored; an uplink entry, when it came.
            stored_at: text(&doc["stored_at"]).or_else(|| text(&doc["last_seen"])),
        });
    }
    Ok(Listing {
        queue: p.dlq.location(),
        messages: queued
            .into_iter()
            .map(|m| MessageBrief {
                id: m.id,
                stage: m.stage,
                event_id: m.event_id,
                device: m.device,
                reason: m.reason,
                first_seen: m.first_seen,
                object_key: m.object_key,
                subject: m.subject,
            })
            .collect(),
        failures,
    })
}

/// Depth, counts by stage and reason (of up to `sample` queued messages), and the failures
/// by day.
pub async fn stats(p: &Pipeline, sample: usize) -> anyhow::Result<DlqStats> {
    let (waiting, in_flight) = p.dlq.depth().await?;
    let queued = peek(p, sample).await?;
    let mut by_stage: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for m in &queued {
        *by_stage.entry(m.stage.to_string()).or_default() += 1;
        *by_reason.entry(group(m)).or_default() += 1;
    }
    let oldest = queued.iter().map(|m| m.first_seen.clone()).min();
    let prefix = &p.cfg.aws.prefix;
    let keys = p.sink.objects.list(&layout::failures(prefix)).await?;
    let mut failures_by_day: BTreeMap<String, u64> = BTreeMap::new();
    for k in &keys {
        let day = ObjectKey::parse(prefix, k).map_or_else(|| "?".to_string(), |o| o.date);
        *failures_by_day.entry(day).or_default() += 1;
    }
    Ok(DlqStats {
        queue: p.dlq.location(),
        waiting,
        in_flight,
        sampled: queued.len(),
        by_stage,
        by_reason,
        oldest,
        failures: keys.len(),
        failures_by_day,
    })
}

/// A queued message's group in `dlq stats`: the field or rule its subject names
/// ([`Subject::group`]), else (messages from before the subject existed, or about no field or
/// rule) the first clause of its reason.
fn group(m: &DlqMessage) -> String {
    m.subject
        .as_ref()
        .and_then(|s| s.group(m.stage))
        .unwrap_or_else(|| reason_group(&m.reason))
}

/// The first clause of a reason: what kind of problem, without the values.
fn reason_group(reason: &str) -> String {
    let head = reason.split([';', '(']).next().unwrap_or(reason).trim();
    head.split(':').next().unwrap_or(head).trim().to_string()
}

/// Receives without hiding (visibility 0) until `limit` distinct messages or nothing new.
async fn peek(p: &Pipeline, limit: usize) -> anyhow::Result<Vec<DlqMessage>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut idle = 0;
    while out.len() < limit && idle < 3 {
        let got = p.dlq.receive(10, 0, 0).await?;
        let mut new = false;
        for m in got {
            if seen.insert(m.message_id.clone())
                && let Ok(msg) = serde_json::from_str::<DlqMessage>(&m.body)
            {
                out.push(msg);
                new = true;
            }
        }
        idle = if new { 0 } else { idle + 1 };
    }
    out.truncate(limit);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_group_by_their_first_clause() {
        assert_eq!(
            reason_group("result mismatch: cost is 3 (expected 2)"),
            "result mismatch"
        );
        assert_eq!(
            reason_group("already corrected once (by cloud: x); detected again: y"),
            "already corrected once"
        );
    }

    fn queued(subject: Option<serde_json::Value>) -> DlqMessage {
        let mut body = serde_json::json!({
            "id": "cloud:gw-1:7", "event_id": "m-1/e-7", "device": "m-1", "stage": "cloud",
            "reason": "rule counter_monotonic: cumulative kWh must not decrease (kwh=1)",
            "attempts": 1, "first_seen": "2026-12-01T00:00:00.000Z",
            "last_seen": "2026-12-01T00:00:00.000Z", "payload": "{}", "gateway": "gw-1",
            "edge_seq": 7, "object_key": null,
        });
        if let Some(s) = subject {
            body["subject"] = s;
        }
        serde_json::from_str(&body.to_string()).unwrap()
    }

    #[test]
    fn messages_group_by_their_subject_when_they_carry_one() {
        // From before the subject existed: the first clause of the reason.
        let old = queued(None);
        assert_eq!(old.subject, None);
        assert_eq!(old.edge_seq, Some(7));
        assert_eq!(group(&old), "rule counter_monotonic");
        // With one: the rule it names, whatever the text says.
        let new = queued(Some(serde_json::json!({"rule": "counter_monotonic"})));
        assert_eq!(new.subject, Some(Subject::Rule("counter_monotonic".into())));
        assert_eq!(group(&new), "rule counter_monotonic");
        let field = queued(Some(serde_json::json!({"field": "data.kwh"})));
        assert_eq!(group(&field), "data.kwh");
        // About the whole document: the reason says what kind of problem.
        let doc = queued(Some(serde_json::json!("document")));
        assert_eq!(group(&doc), "rule counter_monotonic");
    }
}
