//! Re-verification of gateway results before they are stored: the bridge recalculates each
//! result (or a sample) with the engine the gateways run and corrects what it finds wrong.
//!
//! A stateful calculation (`delta`, `rate`, `prev.x`) needs the previous reading the edge
//! used. Results of one gateway arrive in `edge_seq` order, which is the order the edge
//! processed them in, so the bridge keeps each device's last reading while it sees a gateway's
//! results without a break; after a break (a restart, or another bridge storing part of the
//! range) it knows nothing of a device until it sees one of its results again, and such
//! results are counted as unverified rather than guessed at. Memory is bounded by
//! `verify.max_devices`.
//!
//! Like the edge, it keeps a few earlier readings per device and type (and where each result
//! is stored). A **late arrival** — older than the device's latest reading — is verified
//! against the reading just before it, and it makes the result just after it stale: that one
//! was calculated across the gap, against an older reading. The bridge recalculates it
//! against the late one and, if the values change, corrects it (at most once, like every
//! correction) — in the range being stored, or in the object it was stored in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use engine::verify::{Previous, Verdict, needs_previous, verify};
use engine::{Engine, Reading};
use proto::{EventResult, Stage};
use tracing::{info, warn};

use crate::config::VerifyConfig;
use crate::correction::{Applied, Corrector, Restatement, rewrite_record};
use crate::detail::DetailType;
use crate::dlq::DlqMessage;
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::window::Window;

/// What one gateway's stream has taught this bridge.
#[derive(Debug, Default)]
struct Stream {
    /// The `edge_seq` that continues what was seen (0: nothing seen).
    next: u64,
    /// Seen from the gateway's first result on, without a break: a device not in `readings`
    /// has no previous reading at all.
    complete: bool,
    /// (device, type) → its recent readings.
    readings: HashMap<(String, String), Window>,
}

/// A stored result made stale by a late arrival.
struct Stale {
    edge_seq: u64,
    key: String,
    late: Reading,
    late_event: String,
}

#[derive(Debug)]
pub struct Verifier {
    pub corrector: Corrector,
    sample: f64,
    tolerance: f64,
    max_devices: usize,
    streams: Mutex<HashMap<String, Stream>>,
    /// Gateways with incorrect results since the monitor last asked.
    discrepant: Mutex<std::collections::BTreeSet<String>>,
}

/// What [`Verifier::review`] did to a claimed range.
#[derive(Debug, Default)]
pub struct Review {
    pub dead_letters: Vec<DlqMessage>,
}

impl Verifier {
    pub fn new(
        engine: Arc<Engine>,
        history: Arc<dyn crate::backend::CorrectionHistory>,
        cfg: &VerifyConfig,
        owner: String,
    ) -> Verifier {
        Verifier {
            corrector: Corrector {
                engine,
                history,
                owner,
            },
            sample: cfg.sample,
            tolerance: cfg.tolerance,
            max_devices: cfg.max_devices,
            streams: Mutex::new(HashMap::new()),
            discrepant: Mutex::new(Default::default()),
        }
    }

    /// The gateways that had incorrect results since the last call.
    pub fn take_discrepant(&self) -> Vec<String> {
        std::mem::take(&mut *self.discrepant.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }

    pub fn tolerance(&self) -> f64 {
        self.tolerance
    }

    /// Whether `event_id` is in the sample (the same answer on every bridge).
    fn sampled(&self, event_id: &str) -> bool {
        if self.sample >= 1.0 {
            return true;
        }
        (crate::fnv1a(event_id.as_bytes()) as f64 / u64::MAX as f64) < self.sample
    }

    /// Verifies `records` (one gateway's contiguous range, ascending `edge_seq`, about to be
    /// stored in `key`), replacing each incorrect one by its correction where the policy
    /// allows, and returns the DLQ messages for the rest.
    pub async fn review(
        &self,
        gateway: &str,
        records: &mut [EventResult],
        key: &str,
        sink: &Sink,
        metrics: &Metrics,
        now: i64,
    ) -> anyhow::Result<Review> {
        // Verdicts first (pure, under the lock), then the corrections (I/O, without it).
        let mut findings = Vec::new();
        let mut stale = Vec::new();
        {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            let s = streams.entry(gateway.to_string()).or_default();
            let Some(first) = records.first() else {
                return Ok(Review::default());
            };
            if first.edge_seq != s.next {
                if s.next != 0 {
                    info!(
                        gateway,
                        expected = s.next,
                        got = first.edge_seq,
                        "a break in the gateway's edge_seq: its devices' readings count only where their seq confirms them"
                    );
                }
                for w in s.readings.values_mut() {
                    w.doubt();
                }
                s.complete = first.edge_seq == 1;
            }
            for (i, r) in records.iter().enumerate() {
                let k = (r.device.clone(), r.event_type.clone());
                let window = s.readings.get(&k);
                let prev = window.and_then(|w| w.previous_of(r));
                if let Some(next) = window.and_then(|w| w.successor_of(r)) {
                    stale.push(Stale {
                        edge_seq: next.edge_seq,
                        key: next.key.clone(),
                        late: Reading::from_result(r),
                        late_event: r.event_id.clone(),
                    });
                }
                if self.sampled(&r.event_id) {
                    let known = if prev.is_some() || s.complete {
                        Previous::Known(prev)
                    } else {
                        Previous::Unknown
                    };
                    let v = verify(&self.corrector.engine, r, known, self.tolerance);
                    match &v {
                        Verdict::Consistent => metrics.verified.increment(1),
                        Verdict::Unverifiable => metrics.unverified.increment(1),
                        _ => {
                            metrics.verified.increment(1);
                            findings.push((i, v, known_reading(known)));
                        }
                    }
                }
                s.readings.entry(k).or_default().keep(r, key);
            }
            s.next = records.last().map_or(s.next, |r| r.edge_seq + 1);
            if s.readings.len() > self.max_devices {
                warn!(
                    gateway,
                    max = self.max_devices,
                    "verify.max_devices reached: previous readings forgotten"
                );
                s.readings.clear();
                s.complete = false;
            }
        }

        let mut review = Review::default();
        for (i, verdict, previous) in findings {
            let r = &records[i];
            let reason = verdict.reason();
            let prev = previous.as_ref().and_then(Option::as_ref);
            let dead = |stage, reason: String| {
                DlqMessage::for_record(stage, reason, r, Some(key), prev, now)
            };
            if let Verdict::Rejected(rej) = &verdict {
                review
                    .dead_letters
                    .push(dead(Stage::Cloud, reason).about(&rej.subject));
                continue;
            }
            metrics.incorrect.increment(1);
            self.discrepant
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(gateway.to_string());
            if previous.is_none() && needs_previous(&self.corrector.engine, r) {
                review.dead_letters.push(dead(
                    Stage::Correction,
                    format!("{reason}; cannot recalculate: this bridge does not know the previous reading"),
                ));
                continue;
            }
            let request = format!("verify:{gateway}:{}", r.edge_seq);
            match self
                .corrector
                .correct(r, prev, &reason, &request, now)
                .await?
            {
                Applied::Corrected(fixed) => {
                    info!(gateway, event_id = %r.event_id, %reason, "corrected");
                    metrics.corrected.increment(1);
                    records[i] = *fixed;
                }
                Applied::Superseded(by) => {
                    warn!(gateway, event_id = %r.event_id, request = %by.request,
                        "already corrected by another request: stored as received");
                }
                Applied::DeadLetter(reason) => {
                    review.dead_letters.push(dead(Stage::Correction, reason))
                }
                Applied::Failed(rej) => review.dead_letters.push(
                    dead(
                        Stage::Cloud,
                        format!("{reason}; recalculation failed: {}", rej.reason),
                    )
                    .about(&rej.subject),
                ),
            }
        }
        for st in stale {
            self.correct_stale(gateway, st, records, sink, metrics, now, &mut review)
                .await?;
        }
        Ok(review)
    }

    /// Recalculates the result a late arrival made stale against it, and corrects it (in
    /// `records`, or where it is stored) if its values change.
    #[allow(clippy::too_many_arguments)]
    async fn correct_stale(
        &self,
        gateway: &str,
        st: Stale,
        records: &mut [EventResult],
        sink: &Sink,
        metrics: &Metrics,
        now: i64,
        review: &mut Review,
    ) -> anyhow::Result<()> {
        let here = records.iter().position(|x| x.edge_seq == st.edge_seq);
        let record = match here {
            Some(i) => records[i].clone(),
            None => match stored_record(sink, &st.key, |r| r.edge_seq == st.edge_seq).await? {
                Some(r) => r,
                None => {
                    warn!(gateway, key = %st.key, edge_seq = st.edge_seq,
                        "a result made stale by a late arrival is not where it was stored");
                    return Ok(());
                }
            },
        };
        let request = format!("late:{gateway}:{}", st.edge_seq);
        match self
            .corrector
            .restate(
                &record,
                &st.late,
                &st.late_event,
                &request,
                self.tolerance,
                metrics,
                now,
            )
            .await?
        {
            Restatement::Unchanged => {}
            Restatement::Corrected(fixed) => match here {
                Some(i) => records[i] = *fixed,
                None => {
                    if rewrite_record(&*sink.objects, &st.key, &fixed).await? {
                        sink.put_events(vec![(
                            DetailType::EventCorrected,
                            serde_json::to_string(&*fixed)?,
                        )])
                        .await?;
                    }
                }
            },
            Restatement::DeadLetter(reason) => review.dead_letters.push(DlqMessage::for_record(
                Stage::Correction,
                reason,
                &record,
                Some(&st.key),
                Some(&st.late),
                now,
            )),
        }
        Ok(())
    }
}

/// The first record of the stored object `key` that `which` picks; `None` if the object or
/// the record is gone.
pub(crate) async fn stored_record(
    sink: &Sink,
    key: &str,
    which: impl Fn(&EventResult) -> bool,
) -> anyhow::Result<Option<EventResult>> {
    let Some((body, _)) = sink.objects.get_versioned(key).await? else {
        return Ok(None);
    };
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| serde_json::from_str::<EventResult>(l).ok())
        .find(|r| which(r)))
}

/// `None`: unknown; `Some(None)`: known to be none.
fn known_reading(p: Previous<'_>) -> Option<Option<Reading>> {
    match p {
        Previous::Known(r) => Some(r.cloned()),
        Previous::Unknown => None,
    }
}
