//! The live tap (`edge-agent tap`): results and DLQ entries as they are committed, for a
//! technician watching a device being fixed.
//!
//! The pipeline hands each commit here after it is durable; with nobody tapping that costs
//! one atomic load. Tappers each get a bounded queue: one that falls behind is told how many
//! it missed (`{"lagged": n}`) instead of slowing the pipeline down.

use std::sync::Arc;

use proto::{DlqEntry, EventResult};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::Commit;

/// How many committed items a tapper may fall behind before it is told it missed some.
const QUEUE: usize = 4096;

/// One committed item.
#[derive(Debug, Clone)]
pub enum Tapped {
    Result(EventResult),
    DeadLetter(DlqEntry),
}

/// The pipeline's side: a cloneable sender.
#[derive(Debug, Clone)]
pub struct Tap(broadcast::Sender<Arc<Tapped>>);

impl Default for Tap {
    fn default() -> Self {
        Tap(broadcast::channel(QUEUE).0)
    }
}

impl Tap {
    /// After a commit is durable: its new results and DLQ entries, in order.
    pub fn committed(&self, commit: &Commit) {
        self.send(self.items(commit));
    }

    /// A commit's new results and DLQ entries, in order, to [`send`](Self::send) once it is
    /// durable (none when nobody taps).
    pub fn items(&self, commit: &Commit) -> Vec<Arc<Tapped>> {
        if self.0.receiver_count() == 0 {
            return Vec::new();
        }
        let results = commit.results().iter().cloned().map(Tapped::Result);
        let dlq = commit.dlq().iter().cloned().map(Tapped::DeadLetter);
        results.chain(dlq).map(Arc::new).collect()
    }

    pub fn send(&self, items: Vec<Arc<Tapped>>) {
        for item in items {
            let _ = self.0.send(item);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Tapped>> {
        self.0.subscribe()
    }
}

/// What a tapper wants to see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFilter {
    #[serde(default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    /// DLQ entries only.
    #[serde(default)]
    pub dlq: bool,
}

impl TapFilter {
    pub fn matches(&self, t: &Tapped) -> bool {
        let (device, event_type) = match t {
            Tapped::Result(_) if self.dlq => return false,
            Tapped::Result(r) => (Some(r.device.as_str()), Some(r.event_type.as_str())),
            Tapped::DeadLetter(e) => (e.device.as_deref(), topic_type(&e.topic)),
        };
        let wanted = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == got)
        };
        wanted(&self.device, device) && wanted(&self.event_type, event_type)
    }
}

/// The event type of a device topic, when its last level names it (`devices/{d}/events/{t}`).
fn topic_type(topic: &str) -> Option<&str> {
    topic.rsplit('/').next().filter(|t| !t.is_empty())
}

/// One tap line: `{"result": …}` or `{"dlq": …}` (the shapes of `outbox list` and `dlq list`).
pub fn line(t: &Tapped) -> serde_json::Value {
    match t {
        Tapped::Result(r) => serde_json::json!({ "result": r }),
        Tapped::DeadLetter(e) => serde_json::json!({ "dlq": e.to_json() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(device: &str, topic: &str) -> Tapped {
        Tapped::DeadLetter(DlqEntry {
            id: 1,
            event_id: None,
            device: Some(device.into()),
            topic: topic.into(),
            stage: proto::Stage::Schema,
            reason: "x".into(),
            subject: None,
            attempts: 1,
            first_seen: 0,
            last_seen: 0,
            payload: Vec::new(),
        })
    }

    #[test]
    fn filters_by_device_type_and_dlq() {
        let d = dead("meter-1", "devices/meter-1/events/meter");
        let all = TapFilter::default();
        assert!(all.matches(&d));
        let f = TapFilter {
            device: Some("meter-1".into()),
            event_type: Some("meter".into()),
            dlq: true,
        };
        assert!(f.matches(&d));
        assert!(!f.matches(&dead("meter-2", "devices/meter-2/events/meter")));
        assert!(!f.matches(&dead("meter-1", "devices/meter-1/events/gps")));
    }

    #[test]
    fn nobody_tapping_costs_nothing_and_a_tapper_gets_what_follows() {
        let tap = Tap::default();
        let mut c = Commit::default();
        c.push_dlq(match dead("m", "devices/m/events/meter") {
            Tapped::DeadLetter(e) => e,
            Tapped::Result(_) => unreachable!(),
        });
        tap.committed(&c);
        let mut rx = tap.subscribe();
        assert!(rx.try_recv().is_err(), "nothing from before");
        tap.committed(&c);
        assert!(matches!(*rx.try_recv().unwrap(), Tapped::DeadLetter(_)));
    }
}
