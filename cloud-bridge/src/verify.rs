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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use engine::verify::{Previous, Verdict, advances_previous, needs_previous, verify};
use engine::{Engine, Reading};
use proto::{EventResult, Stage};
use tracing::{info, warn};

use crate::config::VerifyConfig;
use crate::correction::{Applied, Corrector};
use crate::dlq::DlqMessage;
use crate::metrics::Metrics;

/// What one gateway's stream has taught this bridge.
#[derive(Debug, Default)]
struct Stream {
    /// The `edge_seq` that continues what was seen (0: nothing seen).
    next: u64,
    /// Seen from the gateway's first result on, without a break: a device not in `readings`
    /// has no previous reading at all.
    complete: bool,
    /// (device, type) → the last reading seen, and whether it is surely the one the edge
    /// used next (false after a break in `edge_seq`: the missing range may hold a newer one).
    readings: HashMap<(String, String), (Reading, bool)>,
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
        history: Arc<dyn crate::history::CorrectionHistory>,
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
        metrics: &Metrics,
        now: i64,
    ) -> anyhow::Result<Review> {
        // Verdicts first (pure, under the lock), then the corrections (I/O, without it).
        let mut findings = Vec::new();
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
                        "verifier lost the gateway's thread: previous readings forgotten until seen again"
                    );
                }
                for (_, sure) in s.readings.values_mut() {
                    *sure = false;
                }
                s.complete = first.edge_seq == 1;
            }
            for (i, r) in records.iter().enumerate() {
                let k = (r.device.clone(), r.event_type.clone());
                // An unsure reading is still the previous one if the device's seq says nothing
                // came in between.
                let prev = s
                    .readings
                    .get(&k)
                    .filter(|(p, sure)| *sure || p.seq + 1 == r.seq)
                    .map(|(p, _)| p);
                if self.sampled(&r.event_id) {
                    let known = if prev.is_some() || s.complete {
                        Previous::Known(prev)
                    } else {
                        Previous::Unknown
                    };
                    let v = verify(&self.corrector.engine, r, known, self.tolerance);
                    match &v {
                        Verdict::Consistent => Metrics::add(&metrics.verified, 1),
                        Verdict::Unverifiable => Metrics::add(&metrics.unverified, 1),
                        _ => {
                            Metrics::add(&metrics.verified, 1);
                            findings.push((i, v, known_reading(known)));
                        }
                    }
                }
                let last = s.readings.get(&k).map(|(p, _)| p);
                if advances_previous(r, last) {
                    s.readings.insert(k, (Reading::from_result(r), true));
                }
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
            if let Verdict::Rejected(_) = verdict {
                review.dead_letters.push(dead(Stage::Cloud, reason));
                continue;
            }
            Metrics::add(&metrics.incorrect, 1);
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
                    Metrics::add(&metrics.corrected, 1);
                    records[i] = *fixed;
                }
                Applied::Superseded(by) => {
                    warn!(gateway, event_id = %r.event_id, request = %by.request,
                        "already corrected by another request: stored as received");
                }
                Applied::DeadLetter(reason) => {
                    review.dead_letters.push(dead(Stage::Correction, reason))
                }
                Applied::Failed(rej) => review.dead_letters.push(dead(
                    Stage::Cloud,
                    format!("{reason}; recalculation failed: {}", rej.reason),
                )),
            }
        }
        Ok(review)
    }
}

/// `None`: unknown; `Some(None)`: known to be none.
fn known_reading(p: Previous<'_>) -> Option<Option<Reading>> {
    match p {
        Previous::Known(r) => Some(r.cloned()),
        Previous::Unknown => None,
    }
}
