//! Correction runs over stored objects (a monitor's alarm, the Lambda's alarm handler,
//! `cloud-bridge correct`): each record is verified (the previous reading known from the same
//! object, in `edge_seq` order) and an incorrect one corrected at most once, its record
//! replaced in place. Any number of runs may race over the same objects: the history lets one
//! correct each event, `If-Match` keeps every rewrite.

use std::collections::HashMap;

use anyhow::{Context as _, bail};
use engine::verify::{Previous, Verdict, needs_previous, verify};
use proto::{EventResult, Stage};

use super::{Applied, rewrite_record};
use crate::backend::{DeadLetterQueue, DlqMessage, ObjectStore};
use crate::detail::DetailType;
use crate::layout::{self, ObjectKey};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::verify::Verifier;
use crate::window::Window;

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

/// The parts a run reads and writes through (borrowed, so a run is cheap to make and to copy).
#[derive(Clone, Copy)]
pub struct CorrectionRun<'a> {
    pub verifier: &'a Verifier,
    /// Objects are read and rewritten, `EventCorrected`/`EventDeadLettered` published.
    pub sink: &'a Sink,
    pub dlq: &'a dyn DeadLetterQueue,
    pub metrics: &'a Metrics,
    /// `aws.prefix` of the bucket layout.
    pub prefix: &'a str,
}

/// One device's readings in a run, by (gateway, device, event type).
type Readings = HashMap<(String, String, String), Window>;

impl CorrectionRun<'_> {
    /// A run over the days `since..=until` (and one gateway, if given), named `{tag}-{now}` in
    /// the history.
    pub async fn days(
        self,
        since: &str,
        until: Option<&str>,
        gateway: Option<&str>,
        tag: &str,
    ) -> anyhow::Result<RunReport> {
        let keys = select_objects(&*self.sink.objects, self.prefix, since, until, gateway).await?;
        self.over(&keys, &format!("{tag}-{}", crate::now_ms()))
            .await
    }

    /// A run over the objects `keys`, named `run_id` in the history.
    pub async fn over(self, keys: &[String], run_id: &str) -> anyhow::Result<RunReport> {
        let mut report = RunReport::default();
        let mut dead = Vec::new();
        // In each gateway's edge_seq order, so a device's previous reading carries over from
        // one object to the next; after a break (a range not in `keys`) it is trusted only
        // where the device's own seq shows nothing came in between.
        let mut ordered: Vec<(String, u64, &String)> = keys
            .iter()
            .map(|k| {
                let parsed = ObjectKey::parse(self.prefix, k);
                let from = parsed.as_ref().and_then(ObjectKey::first_seq).unwrap_or(0);
                (parsed.map(|p| p.gateway).unwrap_or_default(), from, k)
            })
            .collect();
        ordered.sort();
        let mut readings = Readings::default();
        let mut next_from: HashMap<String, u64> = HashMap::new();
        for (gw, from, key) in ordered {
            let Some(records) = self.records(key).await? else {
                continue;
            };
            report.objects += 1;
            if next_from.get(&gw) != Some(&from) {
                for ((g, _, _), w) in readings.iter_mut() {
                    if *g == gw {
                        w.doubt();
                    }
                }
            }
            if let Some(last) = records.last() {
                next_from.insert(gw.clone(), last.edge_seq + 1);
            }
            for r in &records {
                self.check(r, key, run_id, &mut readings, &mut report, &mut dead)
                    .await?;
            }
        }
        let events = crate::dlq::send(self.dlq, &dead).await?;
        self.sink.put_events(events).await?;
        self.metrics.dead_lettered.increment(dead.len() as u64);
        Ok(report)
    }

    /// The records of one object in `edge_seq` order; `None` if it is gone.
    async fn records(&self, key: &str) -> anyhow::Result<Option<Vec<EventResult>>> {
        let Some((body, _)) = self.sink.objects.get_versioned(key).await? else {
            return Ok(None);
        };
        let mut records: Vec<EventResult> = String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).with_context(|| format!("{key}: a line is not a result"))
            })
            .collect::<anyhow::Result<_>>()?;
        records.sort_by_key(|r| r.edge_seq);
        Ok(Some(records))
    }

    /// Verifies one record and corrects it at most once if it is incorrect.
    async fn check(
        &self,
        r: &EventResult,
        key: &str,
        run_id: &str,
        readings: &mut Readings,
        report: &mut RunReport,
        dead: &mut Vec<DlqMessage>,
    ) -> anyhow::Result<()> {
        let engine = &self.verifier.corrector.engine;
        report.records += 1;
        let w = readings
            .entry((r.gateway.clone(), r.device.clone(), r.event_type.clone()))
            .or_default();
        let prev = w.previous_of(r).cloned();
        let known = match &prev {
            Some(p) => Previous::Known(Some(p)),
            None => Previous::Unknown,
        };
        let verdict = verify(engine, r, known, self.verifier.tolerance());
        w.keep(r, key);
        match &verdict {
            Verdict::Consistent | Verdict::Rejected(_) => {
                report.verified += 1;
                return Ok(());
            }
            Verdict::Unverifiable => {
                report.unverifiable += 1;
                return Ok(());
            }
            _ => {}
        }
        report.verified += 1;
        report.incorrect += 1;
        if prev.is_none() && needs_previous(engine, r) {
            report.unverifiable += 1;
            return Ok(());
        }
        let request = format!("{run_id}:{}:{}", r.gateway, r.edge_seq);
        let now = crate::now_ms();
        let reason = verdict.reason();
        let dead_letter =
            |stage, reason| DlqMessage::for_record(stage, reason, r, Some(key), prev.as_ref(), now);
        match self
            .verifier
            .corrector
            .correct(r, prev.as_ref(), &reason, &request, now)
            .await?
        {
            Applied::Corrected(fixed) => {
                if rewrite_record(&*self.sink.objects, key, &fixed).await? {
                    report.corrected += 1;
                    self.metrics.corrected.increment(1);
                    self.sink
                        .put_events(vec![(
                            DetailType::EventCorrected,
                            serde_json::to_string(&*fixed)?,
                        )])
                        .await?;
                }
            }
            Applied::Superseded(_) => report.superseded += 1,
            Applied::DeadLetter(why) => {
                report.dead_lettered += 1;
                dead.push(dead_letter(Stage::Correction, why));
            }
            Applied::Failed(rej) => {
                report.dead_lettered += 1;
                dead.push(
                    dead_letter(
                        Stage::Cloud,
                        format!("{reason}; recalculation failed: {}", rej.reason),
                    )
                    .about(&rej.subject),
                );
            }
        }
        Ok(())
    }
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
            && !layout::is_day(d)
        {
            bail!("{what}: '{d}' is not a YYYY-MM-DD day");
        }
    }
    let keys = objects.list(&layout::events(prefix)).await?;
    Ok(keys
        .into_iter()
        .filter(|k| {
            ObjectKey::parse(prefix, k).is_some_and(|o| {
                o.date.as_str() >= since
                    && until.is_none_or(|u| o.date.as_str() <= u)
                    && gateway.is_none_or(|g| o.gateway == g)
            })
        })
        .collect())
}
