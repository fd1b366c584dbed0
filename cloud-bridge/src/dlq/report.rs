//! `cloud-bridge dlq list|stats`: what is waiting in the DLQ and what was given up on under
//! `failures/`, for a person at a terminal (aligned text) or a script (`--json`).
//!
//! Listing the queue receives its messages with a visibility timeout of 0 (they stay
//! available to the processor), which SQS counts as a receive.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Value, json};

use super::DlqMessage;
use crate::pipeline::Pipeline;

/// Up to `limit` queued messages (de-duplicated across receives) and `failures/` entries.
pub async fn list(p: &Pipeline, limit: usize) -> anyhow::Result<Value> {
    let queued = peek(p, limit).await?;
    let keys = p
        .sink
        .objects
        .list(&format!("{}failures/", p.cfg.aws.prefix))
        .await?;
    let mut failures = Vec::new();
    for key in keys.iter().rev().take(limit) {
        let doc = match p.sink.objects.get_versioned(key).await? {
            Some((b, _)) => serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            None => continue,
        };
        failures.push(json!({
            "key": key,
            "reason": doc["reason"].as_str().or(doc["message"]["reason"].as_str()),
            "event_id": doc["message"]["event_id"],
            "stored_at": doc["stored_at"],
        }));
    }
    Ok(json!({
        "queue": p.dlq.location(),
        "messages": queued.iter().map(|m| json!({
            "id": m.id, "stage": m.stage, "event_id": m.event_id, "device": m.device,
            "reason": m.reason, "first_seen": m.first_seen, "object_key": m.object_key,
        })).collect::<Vec<_>>(),
        "failures": failures,
    }))
}

/// Depth, counts by stage and reason, and the failures by day.
pub async fn stats(p: &Pipeline, sample: usize) -> anyhow::Result<Value> {
    let (waiting, in_flight) = p.dlq.depth().await?;
    let queued = peek(p, sample).await?;
    let mut by_stage: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for m in &queued {
        *by_stage.entry(m.stage.to_string()).or_default() += 1;
        *by_reason.entry(reason_group(&m.reason)).or_default() += 1;
    }
    let oldest = queued.iter().map(|m| m.first_seen.clone()).min();
    let keys = p
        .sink
        .objects
        .list(&format!("{}failures/", p.cfg.aws.prefix))
        .await?;
    let mut by_day: BTreeMap<String, u64> = BTreeMap::new();
    for k in &keys {
        let day = k
            .split('/')
            .find_map(|s| s.strip_prefix("dt="))
            .unwrap_or("?");
        *by_day.entry(day.to_string()).or_default() += 1;
    }
    Ok(json!({
        "queue": p.dlq.location(),
        "waiting": waiting,
        "in_flight": in_flight,
        "sampled": queued.len(),
        "by_stage": by_stage,
        "by_reason": by_reason,
        "oldest": oldest,
        "failures": keys.len(),
        "failures_by_day": by_day,
    }))
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

/// The human form of [`list`]: two aligned tables within 80 columns.
pub fn render_list(v: &Value) -> String {
    let mut s = format!(
        "DLQ {}: {} message(s)\n",
        v["queue"].as_str().unwrap_or(""),
        v["messages"].as_array().map_or(0, Vec::len)
    );
    for m in v["messages"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "  {:<10} {:<28} {}\n",
            m["stage"].as_str().unwrap_or(""),
            clip(m["event_id"].as_str().unwrap_or("-"), 28),
            clip(m["reason"].as_str().unwrap_or(""), 38)
        ));
    }
    s.push_str(&format!(
        "failures/: {} shown\n",
        v["failures"].as_array().map_or(0, Vec::len)
    ));
    for f in v["failures"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "  {:<28} {}\n",
            clip(f["event_id"].as_str().unwrap_or("-"), 28),
            clip(f["reason"].as_str().unwrap_or(""), 49)
        ));
    }
    s
}

/// The human form of [`stats`].
pub fn render_stats(v: &Value) -> String {
    let mut s = format!(
        "DLQ {}: {} waiting, {} in flight; oldest {}\nfailures/: {}\n",
        v["queue"].as_str().unwrap_or(""),
        v["waiting"],
        v["in_flight"],
        v["oldest"].as_str().unwrap_or("-"),
        v["failures"]
    );
    for (title, field) in [
        ("by stage", "by_stage"),
        ("by reason", "by_reason"),
        ("failures by day", "failures_by_day"),
    ] {
        if let Some(m) = v[field].as_object().filter(|m| !m.is_empty()) {
            s.push_str(&format!("{title}:\n"));
            for (k, n) in m {
                s.push_str(&format!("  {:>6}  {}\n", n, clip(k, 70)));
            }
        }
    }
    s
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
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
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}
