//! Counts by reason that `edge-agent status` shows: the same numbers as a Prometheus counter
//! with a `reason` label, kept where the admin socket can read them, so a field technician
//! needs no Prometheus to see why connections are refused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A counter by reason, shared between the task that counts and the admin socket.
#[derive(Debug, Clone)]
pub struct Tally {
    metric: &'static str,
    counts: Arc<Mutex<BTreeMap<&'static str, u64>>>,
}

impl Tally {
    /// Counts into the metric `metric` (label `reason`) too.
    pub fn new(metric: &'static str) -> Tally {
        Tally {
            metric,
            counts: Arc::default(),
        }
    }

    pub fn add(&self, reason: &'static str) {
        metrics::counter!(self.metric, "reason" => reason).increment(1);
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Every reason counted so far.
    pub fn get(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(r, n)| (r.to_string(), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_count_into_one_tally() {
        let t = Tally::new("test_refused_total");
        let t2 = t.clone();
        t.add("revoked");
        t2.add("revoked");
        t2.add("unknown_issuer");
        assert_eq!(
            t.get(),
            BTreeMap::from([("revoked".into(), 2), ("unknown_issuer".into(), 1)])
        );
    }
}
