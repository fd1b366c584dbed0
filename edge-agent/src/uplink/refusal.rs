//! Publishes the cloud broker refused: an MQTT 5 PUBACK with a reason code ≥ 0x80 means the
//! broker dropped the message (its ACL or policy forbids the topic, a quota, …), so the results
//! it carried stay in the outbox. Each refusal is counted by reason (metric and `status`),
//! logged at most once a minute, and holds results back with a backoff: a broker that keeps
//! refusing is asked again once per period with one batch, not with every batch as it comes.

use std::time::Duration;

use tokio::time::Instant;

use super::{LinkStatus, jitter};
use crate::ingest::now_ms;

/// A refused publish's logs are at most this frequent.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A PUBACK reason code ≥ 0x80 (MQTT 5, section 3.4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub u8);

impl Refusal {
    /// The metric's `reason` label, and how `status` names it.
    pub fn reason(self) -> &'static str {
        match self.0 {
            0x80 => "unspecified_error",
            0x83 => "implementation_specific_error",
            0x87 => "not_authorized",
            0x90 => "topic_name_invalid",
            0x91 => "packet_identifier_in_use",
            0x97 => "quota_exceeded",
            0x99 => "payload_format_invalid",
            _ => "other",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:02x})", self.reason(), self.0)
    }
}

/// The latest refusal, for `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LastRefusal {
    /// Epoch ms.
    pub at: i64,
    pub reason: String,
    pub topic: String,
}

/// The refusal state of the uplink; it outlives connections, so a reconnect does not reset
/// the backoff.
pub(super) struct Refusals {
    min: Duration,
    max: Duration,
    backoff: Duration,
    /// Results publishes carry the round they were sent in; only a refusal or an acceptance
    /// of the current round changes the state (the answers to publishes sent before a refusal
    /// say nothing about whether the broker accepts now).
    round: u64,
    /// From a refusal until a publish sent after it is accepted.
    refusing: bool,
    /// No results are offered before this.
    until: Instant,
    logged_at: Option<Instant>,
    unlogged: u64,
    status: LinkStatus,
}

impl Refusals {
    /// Backs off from `min` to `max` (the reconnect backoff's bounds).
    pub(super) fn new(min: Duration, max: Duration, status: LinkStatus) -> Refusals {
        Refusals {
            min,
            max,
            backoff: min,
            round: 0,
            refusing: false,
            until: Instant::now(),
            logged_at: None,
            unlogged: 0,
            status,
        }
    }

    pub(super) fn round(&self) -> u64 {
        self.round
    }

    /// How many results publishes may be in flight: `max` while the broker accepts, none
    /// during a hold, and one (the probe) after it until the broker accepts again.
    pub(super) fn window(&self, now: Instant, max: usize) -> usize {
        match (self.refusing, now < self.until) {
            (false, _) => max,
            (true, true) => 0,
            (true, false) => 1,
        }
    }

    /// When the running hold ends (the uplink offers results again then).
    pub(super) fn hold_ends(&self, now: Instant) -> Option<Instant> {
        (self.refusing && now < self.until).then_some(self.until)
    }

    /// Counts and (once a minute) logs a refused publish on `topic`.
    pub(super) fn count(&mut self, why: Refusal, topic: &str, now: Instant) {
        metrics::counter!(crate::telemetry::UPLINK_REFUSED, "reason" => why.reason()).increment(1);
        self.status.refused(why, topic, now_ms());
        self.unlogged += 1;
        if self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(
                reason = %why,
                topic,
                refused = self.unlogged,
                "the cloud broker refused publishes: their results stay in the outbox \
                 (logged once a minute)"
            );
            self.logged_at = Some(now);
            self.unlogged = 0;
        }
    }

    /// A results publish of `round` was refused: the first refusal of a round starts a hold.
    pub(super) fn hold(&mut self, round: u64, now: Instant) {
        if round != self.round {
            return;
        }
        self.round += 1;
        self.refusing = true;
        let delay = jitter(self.backoff);
        self.until = now + delay;
        self.backoff = (self.backoff * 2).min(self.max);
        self.status.set_refusing(true);
        tracing::debug!(retry_in = ?delay, "results held after a refusal");
    }

    /// A results publish of `round` was accepted: if it was sent after the last refusal, the
    /// broker accepts again.
    pub(super) fn accepted(&mut self, round: u64) {
        if round != self.round {
            return;
        }
        self.backoff = self.min;
        if self.refusing {
            self.refusing = false;
            self.status.set_refusing(false);
            tracing::info!("the cloud broker accepts the uplink's results again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusals() -> Refusals {
        Refusals::new(
            Duration::from_millis(100),
            Duration::from_millis(400),
            LinkStatus::default(),
        )
    }

    #[test]
    fn a_refusal_holds_results_then_probes_with_one() {
        let mut r = refusals();
        let t = Instant::now();
        assert_eq!(r.window(t, 16), 16);
        let round = r.round();
        r.hold(round, t);
        // Later refusals of the same round (the rest of the window) do not extend the hold.
        r.hold(round, t);
        assert_eq!(r.window(t, 16), 0);
        let ends = r.hold_ends(t).expect("a hold");
        assert!(ends >= t + Duration::from_millis(50) && ends <= t + Duration::from_millis(100));
        assert_eq!(r.window(ends, 16), 1, "one probe after the hold");
        assert_eq!(r.hold_ends(ends), None);
        // An acceptance of a publish sent before the refusal changes nothing.
        r.accepted(round);
        assert_eq!(r.window(ends, 16), 1);
        r.accepted(r.round());
        assert_eq!(r.window(ends, 16), 16);
        assert!(!r.status.get().refusing);
    }

    #[test]
    fn a_persistent_refusal_backs_off_to_the_max() {
        let mut r = refusals();
        let mut t = Instant::now();
        let mut holds = Vec::new();
        for _ in 0..5 {
            r.hold(r.round(), t);
            let ends = r.hold_ends(t).unwrap();
            holds.push(ends - t);
            t = ends;
        }
        assert!(holds[4] >= Duration::from_millis(200), "{holds:?}");
        assert!(holds.iter().all(|h| *h <= Duration::from_millis(400)));
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let mut r = refusals();
        let t = Instant::now();
        r.count(Refusal(0x87), "gateways/gw/results", t);
        r.count(Refusal(0x87), "gateways/gw/results", t);
        r.count(Refusal(0x97), "gateways/gw/status", t);
        let s = r.status.get();
        assert_eq!(s.refused["not_authorized"], 2);
        assert_eq!(s.refused["quota_exceeded"], 1);
        let last = s.last_refusal.unwrap();
        assert_eq!(
            (last.reason.as_str(), last.topic.as_str()),
            ("quota_exceeded (0x97)", "gateways/gw/status")
        );
        assert_eq!(Refusal(0x87).to_string(), "not_authorized (0x87)");
    }
}
