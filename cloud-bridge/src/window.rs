//! A device's recent readings of one event type as the edge keeps them (the engine's
//! [`engine::Window`]: the latest plus [`engine::EARLIER_READINGS`] earlier ones), with where
//! each result is stored: what the bridge's verifier and correction runs recalculate against.

use engine::verify::advances_previous;
use engine::{Reading, Timed, flags};
use proto::EventResult;

/// A device's recent readings of one type, in the engine's window so the bridge keeps the same
/// ones as the edge, oldest first by `ts`.
#[derive(Debug, Default)]
pub struct Window(engine::Window<Kept>);

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

impl Timed for Kept {
    fn ts(&self) -> i64 {
        self.reading.ts
    }
}

impl Window {
    pub fn latest(&self) -> Option<&Kept> {
        self.0.latest()
    }

    /// The reading `r` was calculated against: the latest (or, for a late event calculated
    /// against an earlier reading, the newest one older than it). An unsure reading counts
    /// when the device's seq shows nothing came in between.
    pub fn previous_of(&self, r: &EventResult) -> Option<&Reading> {
        let earlier = r.flags.iter().any(|f| f == flags::EARLIER_PREVIOUS);
        let k = if earlier {
            self.0.before(r.ts)?
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
        self.0.after(r.ts).filter(|k| k.sure)
    }

    /// After a break in `edge_seq`: the missing range may hold newer readings.
    pub fn doubt(&mut self) {
        for k in self.0.iter_mut() {
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
            self.0.advance(kept);
        } else if r.flags.iter().all(|f| f != flags::REPLAY)
            && let Some(at) = self.0.insert(kept)
            && at + 1 == self.0.len()
            && let Some(k) = self.0.get_mut(at)
        {
            // Older than the edge's latest reading but newer than all kept here: the edge's
            // latest is one this bridge never saw, so this one is not surely the previous.
            k.sure = false;
        }
    }
}
