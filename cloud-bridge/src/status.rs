//! Gateway status messages (`gateways/{g}/status`, JSON
//! [`GatewayStatus`](proto::uplink::GatewayStatus), checked by [`proto::accept::status`]) in
//! `cloud-bridge run`: the gateway's tail check and its missed-event records.
//!
//! - **Tail.** A lost batch shows as a gap only when a later batch arrives; the last batches of
//!   a stream have none. The status says how far the cloud broker acknowledged the gateway's
//!   results (`released`). The gateway's worker keeps the highest `released` it has seen;
//!   when everything it holds is stored and the stored hwm is still below it, the range
//!   `hwm+1..=released` becomes a gap like any other ([`with_tail`]): held for `gap_hold_ms`
//!   (another bridge may be storing it), then `ReplayRequest`s, then MissedEvents + skip.
//!   A stale status (released ≤ hwm) changes nothing.
//! - **Missed-event records.** Each record (a device's seqs the gateway gave up on) is
//!   announced once as a `MissedEvents` event with `"kind": "device"`, across redeliveries
//!   and bridges: a conditional write in the state table ([`StateStore::begin_announce`])
//!   decides who announces it; the status message is acknowledged only after its records are.

use std::collections::BTreeMap;

use proto::uplink::{MissedReport, QuarantineReport};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::backend::{Announce, Notice};
use crate::detail::DetailType;
use crate::layout::{Object, ObjectKey, date_of};
use crate::now_ms;
use crate::pipeline::{Pipeline, Progress};

/// The tail check: where `advance` stopped, with the gateway's highest reported `released`
/// taken into account. A gap already waited on stays as it is (it covers the tail or comes
/// before it); when everything held is stored but the hwm is below `released`, the rest is
/// a gap.
pub fn with_tail(progress: Progress, released: u64) -> Progress {
    match progress {
        Progress::Done { hwm } if released > hwm => Progress::Missing {
            hwm,
            from: hwm + 1,
            to: released,
        },
        p => p,
    }
}

/// The MissedEvents detail of a gateway's missed-event record.
pub fn device_detail(gateway: &str, r: &MissedReport) -> Value {
    json!({
        "kind": "device",
        "gateway": gateway,
        "id": r.id,
        "device": r.device,
        "first_seq": r.first_seq,
        "last_seq": r.last_seq,
        "count": r.count,
        "ranges": r.ranges,
        "declared_at": r.declared_at,
    })
}

/// Announces `notice` once across redeliveries and bridges: `announce` runs only on this
/// bridge's turn ([`Announce::Mine`]), and the notice is marked sent once it succeeded.
async fn once(
    p: &Pipeline,
    gateway: &str,
    notice: Notice,
    announce: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Announce> {
    let now = now_ms();
    let stale_before = now - p.cfg.pipeline.claim_timeout_ms as i64;
    let turn = p
        .state
        .begin_announce(gateway, notice, p.owner(), now, stale_before)
        .await?;
    if turn == Announce::Mine {
        announce.await?;
        p.state.end_announce(gateway, notice).await?;
    }
    Ok(turn)
}

/// Announces the records in `pending` (each once, see the module doc), removing each one
/// that is announced or was announced before. An error leaves the rest for a later call.
pub async fn announce(
    p: &Pipeline,
    gateway: &str,
    pending: &mut BTreeMap<u64, MissedReport>,
) -> anyhow::Result<()> {
    while let Some((&id, r)) = pending.first_key_value() {
        let event = (
            DetailType::MissedEvents,
            device_detail(gateway, r).to_string(),
        );
        match once(
            p,
            gateway,
            Notice::Missed(id),
            p.sink.put_events(vec![event]),
        )
        .await?
        {
            Announce::Mine => {
                p.metrics.missed_records_announced.increment(1);
                warn!(gateway, id, device = %r.device, first_seq = r.first_seq,
                    last_seq = r.last_seq, count = r.count,
                    "the gateway gave up on a device's seqs: announced as MissedEvents");
            }
            Announce::Done => info!(
                gateway,
                id, "missed-event record was announced before: skipped"
            ),
            Announce::Busy => info!(
                gateway,
                id, "another bridge is announcing this missed-event record"
            ),
        }
        pending.remove(&id);
    }
    Ok(())
}

/// The MissedEvents detail of a gateway's store quarantine: the results the store held but
/// had not sent are only in the copy at `moved_to`, on the gateway, until someone salvages it.
pub fn quarantine_detail(gateway: &str, q: &QuarantineReport, object_key: &str) -> Value {
    json!({
        "kind": "quarantine",
        "gateway": gateway,
        "at": q.at,
        "moved_to": q.moved_to,
        "reason": q.reason,
        "object_key": object_key,
        "action": format!(
            "results not yet sent are in {} on the gateway: `edge-agent store salvage` re-sends them",
            q.moved_to
        ),
    })
}

/// Announces the gateway's store quarantines in `pending`, each once (like the missed-event
/// records): stored under `failures/` for a person, then a MissedEvents event with
/// `"kind": "quarantine"`. An error leaves the rest for a later call.
pub async fn announce_quarantines(
    p: &Pipeline,
    gateway: &str,
    pending: &mut BTreeMap<i64, QuarantineReport>,
) -> anyhow::Result<()> {
    while let Some((&at, q)) = pending.first_key_value() {
        let key = ObjectKey {
            date: date_of(at),
            gateway: gateway.to_string(),
            object: Object::Quarantine { at },
        }
        .to_key(&p.cfg.aws.prefix);
        let detail = quarantine_detail(gateway, q, &key);
        // The same key and body on a retry: in effect the object is written once.
        let announce = async {
            p.sink
                .put_object(
                    &key,
                    serde_json::to_vec_pretty(&detail)?,
                    "application/json",
                )
                .await?;
            p.sink
                .put_events(vec![(DetailType::MissedEvents, detail.to_string())])
                .await
        };
        match once(p, gateway, Notice::Quarantine(at), announce).await? {
            Announce::Mine => {
                p.metrics.quarantines_announced.increment(1);
                warn!(gateway, at, moved_to = %q.moved_to, reason = %q.reason, %key,
                    "the gateway moved a damaged store aside: stored under failures/ and announced as MissedEvents");
            }
            Announce::Done => info!(
                gateway,
                at, "store quarantine was announced before: skipped"
            ),
            Announce::Busy => info!(
                gateway,
                at, "another bridge is announcing this store quarantine"
            ),
        }
        pending.remove(&at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::uplink::SeqSpan;

    #[test]
    fn the_tail_counts_only_when_nothing_else_is_waited_on() {
        // Stale or equal: nothing to do.
        assert_eq!(
            with_tail(Progress::Done { hwm: 10 }, 10),
            Progress::Done { hwm: 10 }
        );
        assert_eq!(
            with_tail(Progress::Done { hwm: 10 }, 3),
            Progress::Done { hwm: 10 }
        );
        // Everything held is stored, the gateway released more: a tail gap.
        assert_eq!(
            with_tail(Progress::Done { hwm: 10 }, 25),
            Progress::Missing {
                hwm: 10,
                from: 11,
                to: 25
            }
        );
        // A gap already waited on stays the gap (its later batch covers what follows).
        let gap = Progress::Missing {
            hwm: 10,
            from: 11,
            to: 14,
        };
        assert_eq!(with_tail(gap, 25), gap);
        assert_eq!(with_tail(gap, 0), gap);
    }

    #[test]
    fn missed_records_keep_their_shape() {
        let r = MissedReport {
            id: 2,
            device: "m".into(),
            first_seq: 3,
            last_seq: 9,
            count: 5,
            ranges: vec![SeqSpan { first: 3, last: 4 }, SeqSpan { first: 7, last: 9 }],
            declared_at: 7,
        };
        assert_eq!(
            device_detail("gw-1", &r),
            json!({"kind": "device", "gateway": "gw-1", "id": 2, "device": "m",
                "first_seq": 3, "last_seq": 9, "count": 5,
                "ranges": [{"first": 3, "last": 4}, {"first": 7, "last": 9}],
                "declared_at": 7})
        );
    }

    #[tokio::test]
    async fn a_record_is_announced_once_by_the_local_backend() {
        let dir = tempfile::tempdir().unwrap();
        let st = crate::backend::local::LocalState::open(dir.path()).unwrap();
        let st: &dyn crate::backend::StateStore = &st;
        assert_eq!(
            st.begin_announce("g/1", Notice::Missed(4), "b", 0, 0)
                .await
                .unwrap(),
            Announce::Mine
        );
        // Not finished (PutEvents failed, or a crash): the one process takes it again.
        assert_eq!(
            st.begin_announce("g/1", Notice::Missed(4), "b", 0, 0)
                .await
                .unwrap(),
            Announce::Mine
        );
        st.end_announce("g/1", Notice::Missed(4)).await.unwrap();
        assert_eq!(
            st.begin_announce("g/1", Notice::Missed(4), "b", 0, 0)
                .await
                .unwrap(),
            Announce::Done
        );
        assert_eq!(
            st.begin_announce("g/1", Notice::Missed(5), "b", 0, 0)
                .await
                .unwrap(),
            Announce::Mine
        );
    }
}
