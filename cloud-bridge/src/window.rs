//! A device's recent readings of one event type as the edge keeps them (the latest plus
//! [`engine::state::EARLIER_READINGS`] earlier ones), with where each result is stored: what
//! the bridge's verifier and correction runs recalculate against.

use engine::verify::advances_previous;
use engine::{Reading, flags};
use proto::EventResult;

/// A device's recent readings of one type, oldest first by `ts` (the latest last), at most
/// [`engine::state::EARLIER_READINGS`] + 1, as the edge keeps them.
#[derive(Debug, Default)]
pub struct Window(Vec<Kept>);

#[derive(Debug)]
pub struct Kept {
    pub reading: Reading,
    pub edge_seq: u64,
    /// The object the result is stored in.
    pub key: String,
    /// Surely what the edge had (false after a break in `edge_seq`: the missing range may
    /// hold newer readings).
    pub sure: bool,
}

impl Window {
    pub fn latest(&self) -> Option<&Kept> {
        self.0.last()
    }

    /// The reading `r` was calculated against: the latest (or, for a late event calculated
    /// against an earlier reading, the newest one older than it). An unsure reading counts
    /// when the device's seq shows nothing came in between.
    pub fn previous_of(&self, r: &EventResult) -> Option<&Reading> {
        let earlier = r.flags.iter().any(|f| f == flags::EARLIER_PREVIOUS);
        let k = if earlier {
            self.0.iter().rev().find(|k| k.reading.ts < r.ts)?
        } else {
            self.latest()?
        };
        (k.sure || k.reading.seq + 1 == r.seq).then_some(&k.reading)
    }

    /// The kept result just after `r` by `ts`, when `r` is older than the latest: it was
    /// calculated without `r`.
    pub fn successor_of(&self, r: &EventResult) -> Option<&Kept> {
        if self.latest().is_none_or(|l| l.reading.ts <= r.ts) {
            return None;
        }
        self.0
            .iter()
            .find(|k| k.reading.ts > r.ts)
            .filter(|k| k.sure)
    }

    /// After a break in `edge_seq`: the missing range may hold newer readings.
    pub fn doubt(&mut self) {
        for k in &mut self.0 {
            k.sure = false;
        }
    }

    pub fn keep(&mut self, r: &EventResult, key: &str) {
        let kept = Kept {
            reading: Reading::from_result(r),
            edge_seq: r.edge_seq,
            key: key.to_string(),
            sure: true,
        };
        if advances_previous(r, self.latest().map(|k| &k.reading)) {
            self.0.push(kept);
        } else if r.flags.iter().all(|f| f != flags::REPLAY) {
            let at = self.0.partition_point(|k| k.reading.ts < r.ts);
            // Older than the edge's latest reading but newer than all kept here: the edge's
            // latest is one this bridge never saw, so this one is not surely the previous.
            let last = at == self.0.len();
            self.0.insert(
                at,
                Kept {
                    sure: !last,
                    ..kept
                },
            );
        }
        if self.0.len() > engine::state::EARLIER_READINGS + 1 {
            self.0.remove(0);
        }
    }
}
