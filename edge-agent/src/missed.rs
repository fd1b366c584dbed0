//! Missed events on the gateway: the gap tracking and records are the engine's
//! ([`engine::missed`], shared with the bridge's gateway-less ingest); this module adds what
//! only the agent has: its defaults, the `missed list` filter and listing, and the cap on
//! stored records.
//!
//! The pipeline thread persists [`DeviceGaps`] and [`MissedRecord`]s in the same sled commit
//! as the message that changed them (`store.rs`, prefixes `g` and `x`), and declares due gaps
//! between batches.

use serde::{Deserialize, Serialize};

pub use engine::missed::{Change, DeviceGaps, Gap, MissedRecord};

/// Default wait before an open gap is declared missed.
pub const DEFAULT_AFTER_S: u64 = 300;
/// Default cap on stored missed records.
pub const DEFAULT_MAX_RECORDS: u64 = 10_000;

/// Which records `missed list` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MissedFilter {
    /// Exact device id, or a prefix ending in `*`.
    pub device: Option<String>,
    /// Declared at or after this time (epoch ms).
    pub since: Option<i64>,
    /// Most records (oldest first).
    pub limit: Option<usize>,
}

impl MissedFilter {
    pub fn matches(&self, r: &MissedRecord) -> bool {
        if let Some(d) = &self.device {
            let ok = match d.strip_suffix('*') {
                Some(prefix) => r.device.starts_with(prefix),
                None => r.device == *d,
            };
            if !ok {
                return false;
            }
        }
        self.since.is_none_or(|s| r.declared_at >= s)
    }
}

/// `missed list`: matching records, oldest first, up to the limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissedListing {
    /// Records stored.
    pub total: u64,
    /// Records matching the filter.
    pub matching: u64,
    pub records: Vec<MissedRecord>,
}

/// The records to drop so that at most `cap` remain, oldest (lowest id) first: the ids of
/// `ids` (ascending) beyond the newest `cap`.
pub fn over_cap(ids: &[u64], cap: u64) -> &[u64] {
    let keep = usize::try_from(cap).unwrap_or(usize::MAX).min(ids.len());
    &ids[..ids.len() - keep]
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::SeqRange;

    fn r(a: u64, b: u64) -> SeqRange {
        SeqRange::new(a, b)
    }

    #[test]
    fn the_cap_drops_the_oldest() {
        assert_eq!(over_cap(&[1, 2, 3, 4], 2), [1, 2]);
        assert!(over_cap(&[1, 2], 2).is_empty());
        assert!(over_cap(&[], 0).is_empty());
        assert_eq!(over_cap(&[5, 6], 0), [5, 6]);
    }

    #[test]
    fn filter_by_device_and_time() {
        let m = MissedRecord::new(1, "meter-1", r(3, 4), 10, 20);
        assert!(MissedFilter::default().matches(&m));
        let f = |device: Option<&str>, since| MissedFilter {
            device: device.map(Into::into),
            since,
            limit: None,
        };
        assert!(f(Some("meter-*"), Some(20)).matches(&m));
        assert!(!f(Some("meter-2"), None).matches(&m));
        assert!(!f(None, Some(21)).matches(&m));
    }
}
