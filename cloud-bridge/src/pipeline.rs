//! The one pipeline both transports (`run` over MQTT, `lambda`) use: results in, each stored
//! exactly once in S3 and announced on EventBridge.
//!
//! # Exactly-once in S3: claim, write, commit
//! Per gateway, one DynamoDB item holds `hwm` (every `edge_seq` ≤ hwm is stored) and at most
//! one **claim**: a range `from..=to` (from = hwm + 1) with the S3 key its object has. Storing
//! the held results of a gateway is a loop:
//!
//! 1. Read the item (strongly consistent). Results ≤ hwm are duplicates: dropped.
//! 2. If the held results do not start at hwm + 1, that is a gap: return
//!    [`Progress::Missing`] (the transport holds them, re-checks, asks for a replay).
//! 3. No claim: claim `hwm+1 ..= end of the contiguous run` (capped) with a fresh key, by a
//!    conditional write (hwm unchanged, no claim). Losing the race → back to 1.
//! 4. PUT the object (NDJSON, one result per line), PutEvents, then **commit**: hwm = to and
//!    the claim removed, conditional on the claim still being this one.
//! 5. A claim that exists when we arrive (its bridge crashed, or is still at work) fixes the
//!    range and the key: if we hold the whole range we complete it ourselves (the same key,
//!    the same content), so a crash between PUT and commit leaves nothing behind that the
//!    redelivered batch does not finish. If we do not hold it, we wait (step 2); a claim not
//!    finished within `claim_timeout_ms` is taken over: removed, with its key moved to the
//!    item's `garbage` set in the same write, and garbage objects are deleted before anything
//!    else is claimed.
//!
//! Why claim before writing (rather than write, then advance hwm conditionally and delete the
//! loser's object): two bridges never write overlapping objects, so there is no window with
//! duplicates in S3 and no cleanup that a crash could skip; recovery needs no LIST; and each
//! key is used by exactly one claim, so deleting a garbage key can never hit a live object.
//! The cost is one more DynamoDB write per object. A bridge does not start a PUT for a claim
//! older than half of `claim_timeout_ms` and the SDK bounds a PUT's duration, so an object of
//! a taken-over claim cannot appear after its takeover (assuming the bridges' clocks agree to
//! well within a quarter of `claim_timeout_ms`).
//!
//! Exactly-once is keyed on (gateway, edge_seq): the gateway assigns each stored result one
//! `edge_seq`, so that is one record per `event_id`; a repeated `event_id` inside one object
//! is dropped as well. EventBridge is at-least-once: a crash after PutEvents and before the
//! commit sends those events again, so consumers de-duplicate by `event_id`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::{EventResult, Status};
use serde_json::json;
use tracing::{info, warn};

use crate::anomaly::live::LiveModels;
use crate::backend::DeadLetterQueue;
use crate::backend::aws::Aws;
use crate::backend::{Backend, Claim, Entry, StateStore};
use crate::config::Config;
use crate::correction::run::CorrectionRun;
use crate::detail::DetailType;
use crate::layout::ObjectKey;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::sink::Sink;
use crate::verify::Verifier;

/// A gateway's results not yet stored, by `edge_seq`.
pub type Held = BTreeMap<u64, EventResult>;

/// Where [`Pipeline::advance`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything held is stored; every `edge_seq` ≤ `hwm` is.
    Done { hwm: u64 },
    /// Some results are held but `from..=to` must be stored first and is not held here.
    Missing { hwm: u64, from: u64, to: u64 },
}

impl Progress {
    pub fn hwm(self) -> u64 {
        match self {
            Progress::Done { hwm } | Progress::Missing { hwm, .. } => hwm,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Pipeline {
    pub sink: Sink,
    pub state: Arc<dyn StateStore>,
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Recalculates results before they are stored (`[verify]`), correcting what is wrong.
    pub verifier: Option<Arc<Verifier>>,
    pub dlq: Arc<dyn DeadLetterQueue>,
    /// The anomaly models results are scored with (`anomaly.score`).
    pub models: Option<Arc<LiveModels>>,
    /// Gateway-less device messages (`[ingest]`).
    pub ingest: Option<Arc<crate::ingest::Ingest>>,
    /// Names this bridge in its claims (diagnostics only).
    owner: String,
}

impl Pipeline {
    /// The AWS backend (S3, DynamoDB, EventBridge).
    pub fn new(aws: Aws, cfg: Arc<Config>, metrics: Arc<Metrics>, owner: String) -> Pipeline {
        let backend = crate::backend::aws::backend(aws, &cfg, &metrics);
        Pipeline::with_backend(backend, cfg, metrics, owner)
    }

    /// Any backend: the same exactly-once logic over its objects, state and events.
    pub fn with_backend(
        backend: Backend,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        owner: String,
    ) -> Pipeline {
        let verifier = cfg.verify.as_ref().and_then(|v| {
            let spec = v.spec.as_ref()?;
            // Config::load compiled it already; a spec that does not compile never gets here.
            let engine = engine::Engine::new(spec).ok()?;
            Some(Arc::new(Verifier::new(
                Arc::new(engine),
                Arc::clone(&backend.history),
                v,
                owner.clone(),
            )))
        });
        let models = cfg
            .anomaly
            .score
            .then(|| Arc::new(LiveModels::new(Duration::from_secs(cfg.anomaly.reload_s))));
        let sink = Sink {
            objects: Arc::clone(&backend.objects),
            events: Arc::clone(&backend.events),
            cfg: Arc::clone(&cfg),
        };
        let ingest = cfg.ingest.as_ref().and_then(|i| {
            // Config::load compiled its engine config already.
            crate::ingest::Ingest::new(
                i,
                &backend,
                sink.clone(),
                models.clone(),
                Arc::clone(&metrics),
                &owner,
            )
            .map_err(|e| tracing::error!("ingest: {e:#}"))
            .ok()
            .map(Arc::new)
        });
        Pipeline {
            verifier,
            models,
            ingest,
            dlq: backend.dlq,
            state: backend.state,
            sink,
            cfg,
            metrics,
            owner,
        }
    }

    /// Stores what it can of `held` (see the module doc); removes what is stored or a duplicate.
    /// An error leaves the state consistent: the caller keeps the batch unacknowledged and
    /// calls again later.
    pub async fn advance(&self, gateway: &str, held: &mut Held) -> anyhow::Result<Progress> {
        let claim_timeout = self.cfg.pipeline.claim_timeout_ms as i64;
        let mut rounds = 0u32;
        loop {
            // Each round either stores something or saw another bridge change the state; a
            // bound keeps a persistent inconsistency from spinning (the caller backs off).
            rounds += 1;
            if rounds > 100 {
                bail!("gateway {gateway}: the state kept changing under this bridge (100 rounds)");
            }
            let st = self.state.read(gateway).await?;
            if !st.garbage.is_empty() {
                self.collect_garbage(gateway, &st.garbage).await?;
                continue;
            }
            let stored = held.split_off(&(st.hwm + 1));
            let dups = held.len();
            *held = stored;
            self.metrics.duplicates.increment(dups as u64);
            let Some(&first) = held.keys().next() else {
                return Ok(Progress::Done { hwm: st.hwm });
            };
            let expect = st.hwm + 1;
            if first > expect {
                return Ok(Progress::Missing {
                    hwm: st.hwm,
                    from: expect,
                    to: first - 1,
                });
            }
            let run_end = contiguous_end(held, expect);
            let now = now_ms();
            if let Some(c) = &st.claim {
                if run_end >= c.to {
                    // Complete it: ours from a failed attempt, or a crashed bridge's.
                    if !self.state.refresh(gateway, c, now).await? {
                        self.metrics.claim_conflicts.increment(1);
                        continue;
                    }
                    let c = Claim {
                        at: now,
                        ..c.clone()
                    };
                    info!(gateway, from = c.from, to = c.to, owner = %c.owner, key = %c.key,
                        "completing an unfinished claimed range (its bridge crashed or failed mid-way)");
                    if self.store_claimed(gateway, &c, held).await? {
                        held.retain(|&k, _| k > c.to);
                        rounds = 0;
                    }
                    continue;
                }
                if now - c.at > claim_timeout {
                    if self.state.take_over(gateway, c).await? {
                        self.metrics.claim_takeovers.increment(1);
                        warn!(gateway, from = c.from, to = c.to, owner = %c.owner, key = %c.key,
                            "took over a stale claim; its object (if any) is deleted");
                    }
                    continue;
                }
                return Ok(Progress::Missing {
                    hwm: st.hwm,
                    from: run_end + 1,
                    to: c.to,
                });
            }
            let to = run_end.min(st.hwm + self.cfg.pipeline.max_object_records);
            let claim = Claim {
                from: expect,
                to,
                key: self.object_key(gateway, &held[&expect], expect, to),
                at: now,
                owner: self.owner.clone(),
            };
            if !self.state.claim(gateway, &st, &claim).await? {
                self.metrics.claim_conflicts.increment(1);
                continue;
            }
            if self.store_claimed(gateway, &claim, held).await? {
                // Stored: what is left in `held` past the hwm is only ever a redelivery.
                held.retain(|&k, _| k > claim.to);
                rounds = 0;
            }
        }
    }

    /// Writes the object and the events of a claimed range, then commits it. False if the
    /// commit found the claim gone (taken over, or completed by another bridge).
    async fn store_claimed(&self, gateway: &str, c: &Claim, held: &Held) -> anyhow::Result<bool> {
        let half = self.cfg.pipeline.claim_timeout_ms as i64 / 2;
        let mut records: Vec<EventResult> =
            held.range(c.from..=c.to).map(|(_, r)| r.clone()).collect();
        let dead_letters = match &self.verifier {
            Some(v) => {
                v.review(
                    gateway,
                    &mut records,
                    &c.key,
                    &self.sink,
                    &self.metrics,
                    now_ms(),
                )
                .await?
                .dead_letters
            }
            None => Vec::new(),
        };
        if let Some(live) = &self.models {
            let models = live.get(&*self.sink.objects, &self.cfg.aws.prefix).await;
            if !models.is_empty() {
                for r in &mut records {
                    crate::anomaly::live::apply(&models, r);
                }
            }
        }
        let mut body = Vec::new();
        let mut entries: Vec<Entry> = Vec::new();
        let mut seen = HashSet::new();
        let mut repeated = 0u64;
        let mut anomalies = 0u64;
        for r in &records {
            if !seen.insert(r.event_id.as_str()) {
                repeated += 1;
                continue;
            }
            let line = serde_json::to_string(r).context("encoding a result as JSON")?;
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
            entries.push((DetailType::EventProcessed, line.clone()));
            match r.status {
                Status::Anomaly => {
                    anomalies += 1;
                    entries.push((DetailType::AnomalyDetected, line));
                }
                Status::Corrected => entries.push((DetailType::EventCorrected, line)),
                Status::Ok => {}
            }
        }
        if now_ms() - c.at > half {
            bail!("claim {} is too old to start writing it; retrying", c.key);
        }
        self.sink
            .put_object(&c.key, body, "application/x-ndjson")
            .await?;
        crate::fault::after_put().await;
        // Before the commit: a crash resends them (same ids), never loses them.
        entries.extend(crate::dlq::send(&*self.dlq, &dead_letters).await?);
        self.sink.put_events(entries).await?;
        if !self.state.commit(gateway, c).await? {
            self.metrics.claim_conflicts.increment(1);
            return Ok(false);
        }
        self.metrics.s3_objects.increment(1);
        self.metrics
            .processed
            .increment(c.to - c.from + 1 - repeated);
        self.metrics.duplicates.increment(repeated);
        self.metrics.anomalies.increment(anomalies);
        self.metrics
            .dead_lettered
            .increment(dead_letters.len() as u64);
        Ok(true)
    }

    /// The parts a correction run over stored objects needs (`[verify]` must be configured).
    pub fn correction_run(&self) -> anyhow::Result<CorrectionRun<'_>> {
        let verifier = self
            .verifier
            .as_deref()
            .context("a correction run needs [verify] (the engine config)")?;
        Ok(CorrectionRun {
            verifier,
            sink: &self.sink,
            dlq: &*self.dlq,
            metrics: &self.metrics,
            prefix: &self.cfg.aws.prefix,
        })
    }

    async fn collect_garbage(&self, gateway: &str, keys: &[String]) -> anyhow::Result<()> {
        for k in keys {
            self.sink.delete_object(k).await?;
            info!(gateway, key = %k, "deleted the object of an abandoned claim");
        }
        self.state.clear_garbage(gateway, keys).await
    }

    /// Names this bridge (claims, missed-record announcements).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Gives up on `from..=to` (after the replay requests): reports MissedEvents and moves
    /// the gateway's hwm past it. False if the state moved on in between (nothing done).
    pub async fn skip_missing(&self, gateway: &str, from: u64, to: u64) -> anyhow::Result<bool> {
        let st = self.state.read(gateway).await?;
        if st.hwm + 1 != from || st.claim.is_some() {
            return Ok(false);
        }
        if !self.state.skip(gateway, &st, from, to, now_ms()).await? {
            return Ok(false);
        }
        let count = to - from + 1;
        self.metrics.missed_events.increment(count);
        warn!(
            gateway,
            from,
            to,
            count,
            "edge_seq range never arrived after the replay requests: reported as MissedEvents and skipped"
        );
        let detail = json!({
            "kind": "edge_seq",
            "gateway": gateway,
            "from_edge_seq": from,
            "to_edge_seq": to,
            "count": count,
            "reason": format!(
                "edge_seq {from}..={to} of gateway {gateway} did not arrive after {} replay requests",
                self.cfg.pipeline.replay_attempts
            ),
            "at": now_ms(),
        });
        self.sink
            .put_events(vec![(DetailType::MissedEvents, detail.to_string())])
            .await?;
        Ok(true)
    }

    /// `{prefix}events/dt=YYYY-MM-DD/gateway={g}/{from:020}-{to:020}-{nonce}.ndjson`; the date
    /// is that of the first result's `ts` (UTC), the nonce makes every claim's key unique.
    pub fn object_key(&self, gateway: &str, first: &EventResult, from: u64, to: u64) -> String {
        ObjectKey::range(gateway, first.ts, from, to, nonce()).to_key(&self.cfg.aws.prefix)
    }

    /// Stores `held`, re-checking for up to `hold` when it is waiting for a range that another
    /// bridge may be storing. Returns the last progress.
    pub async fn advance_holding(
        &self,
        gateway: &str,
        held: &mut Held,
        hold: Duration,
    ) -> anyhow::Result<Progress> {
        let deadline = tokio::time::Instant::now() + hold;
        let recheck = Duration::from_millis(self.cfg.pipeline.gap_recheck_ms);
        let mut counted = false;
        loop {
            let p = self.advance(gateway, held).await?;
            match p {
                Progress::Done { .. } => return Ok(p),
                Progress::Missing { .. } => {
                    if !counted {
                        self.metrics.gaps.increment(1);
                        counted = true;
                    }
                    if tokio::time::Instant::now() + recheck > deadline {
                        return Ok(p);
                    }
                    tokio::time::sleep(recheck).await;
                }
            }
        }
    }
}

/// The last `edge_seq` of the run of consecutive keys starting at `start` (which is held).
fn contiguous_end(held: &Held, start: u64) -> u64 {
    let mut end = start;
    for &k in held.range(start + 1..).map(|(k, _)| k) {
        if k != end + 1 {
            break;
        }
        end = k;
    }
    end
}

/// A random 64-bit value (std's per-process random hash keys, mixed with time and a counter).
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_runs() {
        let mut h = Held::new();
        for k in [3u64, 4, 5, 7, 8] {
            h.insert(k, sample(k));
        }
        assert_eq!(contiguous_end(&h, 3), 5);
        assert_eq!(contiguous_end(&h, 7), 8);
        assert_ne!(nonce(), nonce());
    }

    pub(crate) fn sample(edge_seq: u64) -> EventResult {
        EventResult {
            event_id: format!("d/{edge_seq}"),
            device: "d".into(),
            event_type: "t".into(),
            seq: edge_seq,
            ts: 1_764_064_800_000,
            gateway: "g".into(),
            via: proto::Via::Gateway,
            edge_seq,
            input: Default::default(),
            result: Default::default(),
            calc_version: "v".into(),
            status: Status::Ok,
            flags: vec![],
            anomaly_score: 0.0,
            processed_at: 1_764_064_800_000,
            correction: None,
        }
    }
}
