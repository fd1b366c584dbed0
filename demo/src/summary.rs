//! The live line every 2 s and the final summary, with the check that every message is
//! accounted for.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use cloud_bridge::backend::Backend;
use cloud_bridge::metrics::{self, Metrics};
use edge_agent::agent::Handles;
use serde_json::json;

use crate::cloud::count_records;
use crate::phone::PhoneStats;
use crate::simulator::{self, DLQ_STAGES, SimStats};

/// Figures for a summary line, read from the parts as they run.
pub struct Parts<'a> {
    pub sim: &'a SimStats,
    /// The gateway-less phone app.
    pub phone: &'a PhoneStats,
    pub agent: &'a Handles,
    pub bridge: &'a Metrics,
    /// The outbox's acknowledged mark at start (a re-used `--out` has history).
    pub acked_base: u64,
    /// Nothing was pending in the outbox at start: what reaches the cloud is this run's.
    pub fresh: bool,
}

pub fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Parts<'_> {
    pub fn dlq_by_stage(&self) -> BTreeMap<String, u64> {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for e in self.agent.reader.dlq(0).flatten() {
            if e.first_seen >= self.agent.live.started_at {
                *by.entry(e.stage.as_str().to_string()).or_default() += 1;
            }
        }
        by
    }

    pub fn line(&self, elapsed: Duration) -> String {
        let live = &self.agent.live;
        let depth = self.agent.outbox.depth();
        let by = self.dlq_by_stage();
        let dlq: u64 = by.values().sum();
        let stages = by
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[{:>4}s] devices {} | published {} | accepted {} | DLQ {dlq}{} | dup {} | gaps {} | outbox {} | uplinked {} | cloud {} stored, {} objects | phone {} stored, {} refused",
            elapsed.as_secs(),
            load(&self.sim.connected),
            load(&self.sim.acked),
            load(&live.accepted),
            if stages.is_empty() {
                String::new()
            } else {
                format!(" ({stages})")
            },
            load(&live.duplicates),
            load(&live.gaps),
            depth.entries,
            depth.acked_through.saturating_sub(self.acked_base),
            self.bridge.get(metrics::PROCESSED),
            self.bridge.get(metrics::S3_OBJECTS),
            self.bridge.get(metrics::INGESTED),
            self.bridge.get(metrics::INGEST_REJECTED),
        )
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn finish(
    parts: &Parts<'_>,
    backend: &Backend,
    out: &Path,
    local: bool,
    events_before: &HashSet<String>,
    head: u64,
    hwm: u64,
    ran: Duration,
) -> anyhow::Result<()> {
    let sim = parts.sim;
    let live = &parts.agent.live;
    let depth = parts.agent.outbox.depth();
    let by = parts.dlq_by_stage();
    let dlq: u64 = by.values().sum();
    let (published, accepted, dups, gaps) = (
        load(&sim.acked),
        load(&live.accepted),
        load(&live.duplicates),
        load(&live.gaps),
    );
    let expect: BTreeMap<String, u64> = DLQ_STAGES
        .iter()
        .zip(&sim.expect_dlq)
        .map(|(s, c)| (s.to_string(), load(c)))
        .filter(|(_, c)| *c > 0)
        .collect();
    let uplinked = depth.acked_through.saturating_sub(parts.acked_base);
    let b = parts.bridge;
    // The gateway's objects and the phone app's (one object per gateway-less event, `dev-…`).
    let (phone_objects, new_objects): (Vec<String>, Vec<String>) = backend
        .objects
        .list("events/")
        .await?
        .into_iter()
        .filter(|k| !events_before.contains(k))
        .partition(|k| k.rsplit('/').next().is_some_and(|n| n.starts_with("dev-")));
    let failures = backend.objects.list("failures/").await?.len() as u64;
    let (records, distinct) = if local {
        count_records(out, &new_objects)?
    } else {
        (b.get(metrics::PROCESSED), b.get(metrics::PROCESSED))
    };
    let stages = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let mut problems = Vec::new();
    if published != accepted + dlq + dups {
        problems.push(format!(
            "published {published} ≠ accepted {accepted} + DLQ {dlq} + duplicates {dups}"
        ));
    }
    if by != expect {
        problems.push(format!(
            "DLQ by stage ({}) ≠ what the devices got wrong ({})",
            stages(&by),
            stages(&expect)
        ));
    }
    if load(&sim.duplicates) != dups {
        problems.push(format!(
            "duplicates: {dups} recognised, {} re-sent",
            load(&sim.duplicates)
        ));
    }
    let phone = parts.phone;
    let (p_posted, p_stored, p_dups, p_refused) = (
        load(&phone.posted),
        load(&phone.stored),
        load(&phone.duplicates),
        load(&phone.refused),
    );
    if p_posted != p_stored + p_dups + p_refused {
        problems.push(format!(
            "phone: {p_posted} answered ≠ {p_stored} stored + {p_dups} duplicates + {p_refused} refused"
        ));
    }
    for (what, app, bridge) in [
        ("stored", p_stored, b.get(metrics::INGESTED)),
        ("refused", p_refused, b.get(metrics::INGEST_REJECTED)),
        ("duplicates", p_dups, b.get(metrics::INGEST_DUPLICATES)),
    ] {
        if app != bridge {
            problems.push(format!(
                "phone: the app saw {app} {what}, the bridge counted {bridge}"
            ));
        }
    }
    if local {
        let (records, distinct) = count_records(out, &phone_objects)?;
        if records != p_stored || distinct != records {
            problems.push(format!(
                "phone: {records} records ({distinct} distinct) in the cloud for {p_stored} stored"
            ));
        }
    }
    let drained = depth.entries == 0 && hwm >= head;
    if drained && parts.fresh && (records != accepted || distinct != records) {
        problems.push(format!(
            "cloud: {records} records ({distinct} distinct event ids) for {accepted} accepted results"
        ));
    }

    println!("── final summary ({:.1} s) ──", ran.as_secs_f64());
    println!(
        "  devices  {} simulated, {published} messages published and acknowledged",
        simulator::DEVICES.len()
    );
    println!(
        "           injected: {} invalid, {} spikes, {} re-sent (duplicates), {} skipped seq (gaps), {} sent late",
        sim.expected_dlq() - load(&sim.expect_dlq[3]),
        load(&sim.spikes),
        load(&sim.duplicates),
        load(&sim.gaps),
        load(&sim.late),
    );
    println!(
        "  agent    {accepted} accepted, {dlq} dead-lettered ({}), {dups} duplicates, {gaps} gaps ({} events missing)",
        stages(&by),
        load(&live.missed),
    );
    println!(
        "           {} late arrivals: the results they made stale are corrected here while still in the same batch ({}), else by the cloud",
        load(&live.late),
        load(&live.corrected),
    );
    println!(
        "  uplink   {uplinked} results acknowledged by the cloud broker, {} pending in the outbox",
        depth.entries
    );
    println!(
        "  cloud    {records} results stored once each in {} objects, {failures} under failures/ (cloud DLQ)",
        new_objects.len(),
    );
    println!(
        "           re-verified {} ({} not verifiable), {} incorrect, {} corrected; {} anomalies stored",
        b.get(metrics::VERIFIED),
        b.get(metrics::UNVERIFIED),
        b.get(metrics::INCORRECT),
        b.get(metrics::CORRECTED),
        b.get(metrics::ANOMALIES),
    );
    println!(
        "  phone    {p_posted} readings posted over HTTP without a gateway: {p_stored} stored once each, {p_refused} refused (400, dead-lettered; {} invalid sent), {p_dups} re-sends answered as stored",
        load(&phone.invalid_sent),
    );
    if local {
        println!(
            "           {0}/events/dt=…/gateway=…/*.ndjson, events in {0}/eventbridge/",
            out.display()
        );
    }
    let verdict = if !drained {
        format!(
            "not fully drained (outbox {} pending, cloud at edge_seq {hwm} of {head})",
            depth.entries
        )
    } else if problems.is_empty() {
        "every message accounted for; each accepted result stored once in the cloud".to_string()
    } else {
        format!("MISMATCH: {}", problems.join("; "))
    };
    println!("  check    {verdict}");

    let summary = json!({
        "seconds": ran.as_secs_f64(),
        "devices": simulator::DEVICES.len(),
        "published": published,
        "injected": {
            "valid": load(&sim.valid),
            "expected_dlq": expect,
            "spikes": load(&sim.spikes),
            "duplicates": load(&sim.duplicates),
            "gaps": load(&sim.gaps),
            "late": load(&sim.late),
        },
        "agent": {
            "accepted": accepted,
            "dlq": dlq,
            "dlq_by_stage": by,
            "duplicates": dups,
            "gaps": gaps,
            "missed": load(&live.missed),
            "late": load(&live.late),
            "corrected": load(&live.corrected),
            "outbox_pending": depth.entries,
            "uplinked": uplinked,
        },
        "cloud": {
            "stored": b.get(metrics::PROCESSED),
            "objects": b.get(metrics::S3_OBJECTS),
            "new_objects": new_objects,
            "records": records,
            "distinct_event_ids": distinct,
            "failures": failures,
            "decode_errors": b.get(metrics::DECODE_ERRORS),
            "verified": b.get(metrics::VERIFIED),
            "unverified": b.get(metrics::UNVERIFIED),
            "incorrect": b.get(metrics::INCORRECT),
            "corrected": b.get(metrics::CORRECTED),
            "anomalies": b.get(metrics::ANOMALIES),
            "hwm": hwm,
        },
        "phone": {
            "posted": p_posted,
            "stored": p_stored,
            "duplicates": p_dups,
            "refused": p_refused,
            "invalid_sent": load(&phone.invalid_sent),
            "retries": load(&phone.retries),
            "objects": phone_objects.len(),
        },
        "drained": drained,
        "problems": problems,
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!("  summary  {}", out.join("summary.json").display());
    if drained && !problems.is_empty() {
        bail!("the demo's counts do not add up: {}", problems.join("; "));
    }
    Ok(())
}
