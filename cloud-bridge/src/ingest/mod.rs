//! Gateway-less ingest: device messages that reach the cloud without a gateway (a phone app
//! over HTTP, a cellular device on AWS IoT Core, an EventBridge event) go through the same
//! engine the gateways run, with each device's engine state in the [`DeviceStore`].
//!
//! ```text
//! HTTP (http.rs) ─┐                                       ┌─▶ S3 events/…/gateway={ingest}/dev-….ndjson
//! Lambda (API GW, ├─▶ Ingest::handle ─▶ Engine::process ──┼─▶ device item committed (version + 1)
//!  IoT rule, EB)  │   (device state                       ├─▶ EventBridge (EventProcessed, AnomalyDetected, MissedEvents)
//! cloud broker ───┘    from the store)                    └─▶ refused: SQS DLQ (stage, reason) + 400
//! ```
//!
//! # One event, exactly once: compute, write, commit
//! 1. Read the device's item (strongly consistent): version `v`, the engine state, and any
//!    events a crashed instance committed but may not have published (sent now, first).
//! 2. Run the engine on the message against that state: a result, a duplicate, or a
//!    rejection (the message's `seq` is recorded either way, as on a gateway).
//! 3. A result is written to S3 under a key that is a function of the message alone
//!    (device, seq, id, ts: [`ObjectKey::device_event`]), so every attempt at one event
//!    writes the same object; a rejection goes to the SQS DLQ (its id is a function of the
//!    message, so a second attempt is the same DLQ message).
//! 4. Commit the new state, with the events to publish, as version `v + 1`, conditional on
//!    the item still being at `v`. Then publish the events and clear them from the item.
//!
//! Only after the commit is the message answered as stored. A crash before the commit leaves
//! at most an object that the client's resend (or the DLQ processor) writes again under the
//! same key: never two records of one event. A crash after the commit leaves the events in the
//! item, published by the next message of that device. A resend of a committed event is a
//! duplicate for the engine: nothing is written, and it is answered as stored again.
//!
//! # Per-device order
//! The conditional commit serialises a device's events across any number of bridges and
//! Lambda instances. When two events of one device arrive at two instances at once, both
//! compute against version `v`; the first commit wins; the second fails its condition,
//! re-reads, and recomputes against the state that now holds the first event: its `delta`
//! is taken against the reading that is really previous (an older `ts` is handled as the
//! engine handles it on a gateway: `late` or `out_of_order`), and its object is rewritten
//! under its own key before its commit. Events are processed in arrival order, so a device
//! that needs its own order kept sends its next event after the previous answer.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use engine::missed::{DeviceGaps, MissedRecord};
use engine::{DeviceState, Engine, Input, Outcome, Rejection, State};
use proto::{EventResult, Stage, Status, Subject, Via};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::anomaly::live::LiveModels;
use crate::backend::{
    Backend, DeadLetterQueue, DeviceItem, DeviceOrigin, DeviceStore, DlqMessage, Entry,
};
use crate::config::IngestConfig;
use crate::correction::{Corrector, Restatement, rewrite_record};
use crate::detail::DetailType;
use crate::layout::ObjectKey;
use crate::metrics::Metrics;
use crate::sink::Sink;

pub mod apigw;
pub mod auth;
pub mod http;
pub mod source;

/// A device that keeps losing the race for its own item (hundreds of concurrent events) is
/// answered "try again" rather than spinning.
const MAX_ROUNDS: u32 = 50;

/// Values a late arrival changes by less than this are the same (float noise).
const LATE_TOLERANCE: f64 = 1e-9;

/// A sweep gives up on a device after this many lost races (its own messages are arriving).
const SWEEP_ROUNDS: u32 = 3;

/// One device message as it reached the cloud.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub device: &'a str,
    pub event_type: &'a str,
    /// The message as the device sent it (JSON or CBOR, told apart by the engine).
    pub payload: &'a [u8],
    pub via: Via,
    /// Arrival time, epoch ms.
    pub received_at: i64,
    /// A DLQ retry: exempt from the duplicate checks.
    pub replay: bool,
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Stored in S3 and committed.
    Stored {
        event_id: String,
        key: String,
        status: Status,
        flags: Vec<String>,
    },
    /// Seen before (stored or dead-lettered then): nothing written.
    Duplicate { event_id: String, reason: String },
    /// Refused by the engine (or before it): dead-lettered.
    Rejected {
        stage: Stage,
        reason: String,
        subject: Subject,
        event_id: Option<String>,
    },
}

/// What the cloud remembers of one device (CBOR in its item).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Memory {
    state: DeviceState,
    /// Its open `seq` gaps and when each was first seen.
    #[serde(default)]
    gaps: Option<DeviceGaps>,
    /// Missed-event records declared so far (the last id).
    #[serde(default)]
    missed: u64,
}

/// The gateway-less pipeline: one per bridge process or Lambda instance, shared by every
/// entry point.
#[derive(Debug)]
pub struct Ingest {
    pub engine: Arc<Engine>,
    /// Corrects the stored result a late arrival made stale (at most once).
    corrector: Corrector,
    devices: Arc<dyn DeviceStore>,
    sink: Sink,
    dlq: Arc<dyn DeadLetterQueue>,
    models: Option<Arc<LiveModels>>,
    pub metrics: Arc<Metrics>,
    /// `ingest.name`: the results' `gateway`.
    pub name: String,
    missed_after_ms: i64,
}

impl Ingest {
    /// The ingest over `backend`'s device store, DLQ and correction history (`owner` names
    /// this process in the history).
    pub fn new(
        cfg: &IngestConfig,
        backend: &Backend,
        sink: Sink,
        models: Option<Arc<LiveModels>>,
        metrics: Arc<Metrics>,
        owner: &str,
    ) -> anyhow::Result<Ingest> {
        let spec = cfg
            .spec
            .as_ref()
            .context("ingest: the engine config was not loaded")?;
        let engine = Arc::new(Engine::new(spec).context("ingest.engine_config")?);
        Ok(Ingest {
            corrector: Corrector {
                engine: Arc::clone(&engine),
                history: Arc::clone(&backend.history),
                owner: owner.to_string(),
            },
            engine,
            devices: Arc::clone(&backend.devices),
            sink,
            dlq: Arc::clone(&backend.dlq),
            models,
            metrics,
            name: cfg.name.clone(),
            missed_after_ms: (cfg.missed_after_s as i64).saturating_mul(1000),
        })
    }

    /// Processes one message (see the module doc). An error is a failure of the backend
    /// (S3, DynamoDB, SQS, EventBridge): nothing was committed, and the same message may be
    /// sent again.
    pub async fn handle(&self, m: &Message<'_>) -> anyhow::Result<Reply> {
        if let Err(reason) = check_names(m) {
            if m.replay {
                return Ok(rejected(Rejection::of_message(reason)));
            }
            return self.refuse_message(m, reason).await;
        }
        let topic = self.engine.topic().topic_for(m.device, m.event_type);
        for _ in 0..MAX_ROUNDS {
            let item = self.devices.read(&self.name, m.device).await?;
            let memory = self.memory_of(m.device, &item, m.received_at).await?;
            self.publish_unsent(m.device, &item, self.gap_due(&memory))
                .await?;
            let mut state = State::new();
            state.insert(m.device.to_string(), memory.state);
            let outcome = self.engine.process(
                &mut state,
                &Input {
                    topic: &topic,
                    payload: m.payload,
                    received_at: m.received_at,
                    gateway: &self.name,
                    via: m.via,
                    replay: m.replay,
                },
            );
            let new_state = state.remove(m.device).unwrap_or_default();
            let mut memory = Memory {
                state: new_state,
                gaps: memory.gaps,
                missed: memory.missed,
            };
            let (reply, mut entries) = match outcome {
                Outcome::Duplicate {
                    event_id, reason, ..
                } => {
                    self.metrics.ingest_duplicates.increment(1);
                    return Ok(Reply::Duplicate { event_id, reason });
                }
                Outcome::Accepted { mut result, .. } => {
                    let (key, mut entries) = self.write_result(&mut result).await?;
                    entries.extend(self.correct_successor(m, &result, &memory.state).await?);
                    let reply = Reply::Stored {
                        event_id: result.event_id,
                        key,
                        status: result.status,
                        flags: result.flags,
                    };
                    (reply, entries)
                }
                // A replay is the DLQ processor's final retry: it stores a second refusal
                // under failures/ itself, so it is not dead-lettered again (no loop).
                Outcome::Rejected(rej) if m.replay => (rejected(rej), Vec::new()),
                Outcome::Rejected(rej) => {
                    let entries = self.dead_letter(m, &rej).await?;
                    (rejected(rej), entries)
                }
            };
            entries.extend(self.missed_events(m.device, &mut memory, m.received_at)?);
            let bytes = proto::wire::encode(&memory);
            let due = self.gap_due(&memory);
            if !self
                .devices
                .commit(&self.name, m.device, item.version, &bytes, &entries, due)
                .await?
            {
                self.metrics.device_conflicts.increment(1);
                continue;
            }
            match &reply {
                Reply::Stored { status, .. } => {
                    self.metrics.ingested.increment(1);
                    self.metrics.s3_objects.increment(1);
                    if *status == Status::Anomaly {
                        self.metrics.anomalies.increment(1);
                    }
                }
                // A replay's refusal was counted when it was first refused.
                Reply::Rejected { .. } if m.replay => {}
                Reply::Rejected { .. } => {
                    self.metrics.ingest_rejected.increment(1);
                    self.metrics.dead_lettered.increment(1);
                }
                Reply::Duplicate { .. } => {}
            }
            // Committed: the message is safe. Publishing now is the common case; if it fails,
            // the events wait in the item for the device's next message.
            let committed = DeviceItem {
                version: item.version + 1,
                state: Vec::new(),
                unsent: entries,
                due,
            };
            self.publish_committed(m.device, &committed, &memory, m.received_at)
                .await;
            return Ok(reply);
        }
        bail!(
            "device {}: {MAX_ROUNDS} other events of this device were committed first; try again",
            m.device
        )
    }

    /// Dead-letters what is not a device message at all (a batch body that is not a batch, an
    /// element without its device), stage `decode`, as `device`'s.
    pub async fn refuse(
        &self,
        device: &str,
        event_type: &str,
        payload: &[u8],
        via: Via,
        received_at: i64,
        reason: &str,
    ) -> anyhow::Result<Reply> {
        let m = Message {
            device,
            event_type,
            payload,
            via,
            received_at,
            replay: false,
        };
        self.refuse_message(&m, reason.to_string()).await
    }

    async fn refuse_message(&self, m: &Message<'_>, reason: String) -> anyhow::Result<Reply> {
        let rej = Rejection::of_message(reason);
        let entries = self.dead_letter(m, &rej).await?;
        self.sink.put_events(entries).await?;
        self.metrics.ingest_rejected.increment(1);
        self.metrics.dead_lettered.increment(1);
        Ok(rejected(rej))
    }

    /// Scores the result, writes its object; the events to publish with it.
    async fn write_result(&self, r: &mut EventResult) -> anyhow::Result<(String, Vec<Entry>)> {
        if let Some(live) = &self.models {
            let models = live
                .get(&*self.sink.objects, &self.sink.cfg.aws.prefix)
                .await;
            if !models.is_empty() {
                crate::anomaly::live::apply(&models, r);
            }
        }
        let key = ObjectKey::device_event(&self.name, r).to_key(&self.sink.cfg.aws.prefix);
        let line = serde_json::to_string(&*r).context("encoding a result as JSON")?;
        let mut body = Vec::with_capacity(line.len() + 1);
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
        self.sink
            .put_object(&key, body, "application/x-ndjson")
            .await?;
        crate::fault::after_put().await;
        let mut entries = vec![(DetailType::EventProcessed, line.clone())];
        match r.status {
            Status::Anomaly => entries.push((DetailType::AnomalyDetected, line)),
            Status::Corrected => entries.push((DetailType::EventCorrected, line)),
            Status::Ok => {}
        }
        Ok((key, entries))
    }

    /// A late result makes the device's next stored result stale (calculated across the gap,
    /// before this one arrived): it is recalculated against this one and corrected where it
    /// is stored, at most once, as the bridge does for gateways' results. Done before the
    /// commit, so a crash leaves it to the client's resend; the request id (the late event)
    /// lets that resend finish the same correction. The events to publish with the commit.
    async fn correct_successor(
        &self,
        m: &Message<'_>,
        late: &EventResult,
        state: &DeviceState,
    ) -> anyhow::Result<Vec<Entry>> {
        use engine::flags::{EARLIER_PREVIOUS, OUT_OF_ORDER};
        if !late
            .flags
            .iter()
            .any(|f| f == EARLIER_PREVIOUS || f == OUT_OF_ORDER)
        {
            return Ok(Vec::new());
        }
        let Some(next) = state
            .readings(&late.event_type)
            .and_then(|w| w.after(late.ts))
        else {
            return Ok(Vec::new());
        };
        let prefix = ObjectKey::device_event_prefix(
            &self.sink.cfg.aws.prefix,
            &self.name,
            &late.device,
            next.seq,
            next.ts,
        );
        let mut stored = None;
        for key in self.sink.objects.list(&prefix).await? {
            let which =
                |r: &EventResult| r.device == late.device && r.seq == next.seq && r.ts == next.ts;
            if let Some(r) = crate::verify::stored_record(&self.sink, &key, which).await? {
                stored = Some((key, r));
                break;
            }
        }
        let Some((key, stale)) = stored else {
            warn!(device = m.device, seq = next.seq, %prefix,
                "a result made stale by a late arrival is not where it is stored");
            return Ok(Vec::new());
        };
        let request = format!("late:{}:{}", self.name, late.event_id);
        let reading = engine::Reading::from_result(late);
        Ok(
            match self
                .corrector
                .restate(
                    &stale,
                    &reading,
                    &late.event_id,
                    &request,
                    LATE_TOLERANCE,
                    &self.metrics,
                    m.received_at,
                )
                .await?
            {
                Restatement::Unchanged => Vec::new(),
                Restatement::Corrected(fixed) => {
                    if rewrite_record(&*self.sink.objects, &key, &fixed).await? {
                        vec![(DetailType::EventCorrected, serde_json::to_string(&*fixed)?)]
                    } else {
                        Vec::new()
                    }
                }
                Restatement::DeadLetter(reason) => {
                    let msg = DlqMessage::for_record(
                        Stage::Correction,
                        reason,
                        &stale,
                        Some(&key),
                        Some(&reading),
                        m.received_at,
                    );
                    crate::dlq::send(&*self.dlq, std::slice::from_ref(&msg)).await?
                }
            },
        )
    }

    /// Sends the refused message to the DLQ; its `EventDeadLettered` event.
    async fn dead_letter(&self, m: &Message<'_>, rej: &Rejection) -> anyhow::Result<Vec<Entry>> {
        let msg = dlq_message(&self.name, m, rej);
        crate::dlq::send(&*self.dlq, std::slice::from_ref(&msg)).await
    }

    /// Brings the device's gaps up to date with its tracker and declares those open longer
    /// than `missed_after_s` (or that can no longer arrive): their MissedEvents.
    fn missed_events(
        &self,
        device: &str,
        memory: &mut Memory,
        now: i64,
    ) -> anyhow::Result<Vec<Entry>> {
        let seq = memory.state.seq();
        let gaps = memory.gaps.get_or_insert_with(|| DeviceGaps::new(seq));
        let change = gaps.reconcile(seq, now);
        let mut next = memory.missed;
        let mut declared: Vec<(u64, engine::SeqRange, i64)> = change
            .lost
            .iter()
            .map(|g| {
                next += 1;
                (next, g.range(), g.first_seen)
            })
            .collect();
        for g in gaps.declare_due(self.missed_after_ms, now, || {
            next += 1;
            next
        }) {
            declared.push((g.missed.unwrap_or(next), g.range(), g.first_seen));
        }
        memory.missed = next;
        let mut entries = Vec::with_capacity(declared.len());
        for (id, range, first_seen) in declared {
            let record = MissedRecord::new(id, device, range, first_seen, now);
            let mut detail = serde_json::to_value(&record)?;
            if let Some(o) = detail.as_object_mut() {
                o.insert("kind".into(), json!("device"));
                o.insert("gateway".into(), json!(self.name));
            }
            self.metrics.missed_events.increment(range.len());
            info!(
                device,
                first = range.first,
                last = range.last,
                "gateway-less device: seq range reported as MissedEvents"
            );
            entries.push((DetailType::MissedEvents, detail.to_string()));
        }
        Ok(entries)
    }

    /// Publishes what the item holds unpublished and clears it, leaving it due at `due` (a
    /// no-op when nothing is unpublished).
    async fn publish_unsent(
        &self,
        device: &str,
        item: &DeviceItem,
        due: Option<i64>,
    ) -> anyhow::Result<()> {
        if item.unsent.is_empty() {
            return Ok(());
        }
        self.sink.put_events(item.unsent.clone()).await?;
        // False: a newer commit replaced them already; either way they are sent.
        self.devices
            .clear_unsent(&self.name, device, item.version, due)
            .await?;
        Ok(())
    }

    /// The device's memory from its item. A state that does not decode (damage, or a newer
    /// bridge's format after a rollback) would refuse every message of the device forever:
    /// it is moved to `failures/` (the bytes kept, with the error) and the device starts
    /// afresh, as a gateway does with a damaged store. The commit that follows is conditional
    /// on the same version, so one instance's fresh start wins.
    async fn memory_of(&self, device: &str, item: &DeviceItem, now: i64) -> anyhow::Result<Memory> {
        let e = match decode_memory(device, item) {
            Ok(memory) => return Ok(memory),
            Err(e) => e,
        };
        let key = ObjectKey {
            date: crate::layout::date_of(now),
            gateway: self.name.clone(),
            object: crate::layout::Object::DeviceState {
                device: device.to_string(),
                version: item.version,
            },
        }
        .to_key(&self.sink.cfg.aws.prefix);
        let body = json!({
            "device": device,
            "ingest": self.name,
            "version": item.version,
            "error": format!("{e:#}"),
            "state": base64::engine::general_purpose::STANDARD.encode(&item.state),
            "at": proto::timestamp::format_rfc3339(now),
        });
        self.sink
            .put_object(&key, serde_json::to_vec_pretty(&body)?, "application/json")
            .await?;
        self.metrics.device_states_quarantined.increment(1);
        tracing::error!(device, %key, error = %format!("{e:#}"),
            "a gateway-less device's stored state does not decode: moved aside, the device starts afresh");
        Ok(Memory::default())
    }

    /// When the device's earliest undeclared gap falls due.
    fn gap_due(&self, memory: &Memory) -> Option<i64> {
        memory
            .gaps
            .as_ref()
            .and_then(|g| g.next_due(self.missed_after_ms))
    }

    /// After a commit: publishes its events and clears them. If EventBridge fails, the item
    /// is marked due now, so the sweep publishes them even if the device sends nothing more.
    async fn publish_committed(
        &self,
        device: &str,
        committed: &DeviceItem,
        memory: &Memory,
        now: i64,
    ) {
        let Err(e) = self
            .publish_unsent(device, committed, self.gap_due(memory))
            .await
        else {
            return;
        };
        self.metrics.aws_errors.increment(1);
        warn!(device, error = %format!("{e:#}"),
            "events of a commit not published yet; the device's next message or the sweep sends them");
        if let Err(e) = self
            .devices
            .mark_due(&self.name, device, committed.version, now)
            .await
        {
            warn!(device, error = %format!("{e:#}"),
                "could not mark the device due for the sweep either; its next message sends them");
        }
    }

    /// Visits the devices that are due at `now` without a message of their own (up to
    /// `limit`): declares the gaps open longer than `missed_after_s` of devices that went
    /// silent, and publishes the events a crashed instance committed but did not publish.
    /// Safe on any number of bridges and Lambdas at once: a declaration is committed like
    /// a message, conditional on the version read, and only the winner publishes it.
    pub async fn sweep(&self, now: i64, limit: usize) -> anyhow::Result<SweepReport> {
        let devices = self.devices.due(&self.name, now, limit).await?;
        let mut report = SweepReport {
            due: devices.len(),
            more: devices.len() == limit,
            ..SweepReport::default()
        };
        for device in &devices {
            self.sweep_device(device, now, &mut report).await?;
        }
        if report.declared > 0 || report.published > 0 {
            info!(?report, "sweep of gateway-less devices");
        }
        Ok(report)
    }

    async fn sweep_device(
        &self,
        device: &str,
        now: i64,
        report: &mut SweepReport,
    ) -> anyhow::Result<()> {
        // A device whose messages keep winning the race is busy: its own messages declare.
        for _ in 0..SWEEP_ROUNDS {
            let item = self.devices.read(&self.name, device).await?;
            let mut memory = self.memory_of(device, &item, now).await?;
            let before = self.gap_due(&memory);
            if !item.unsent.is_empty() {
                // Unpublished and not marked due: an instance committed them a moment ago
                // and is publishing them (it marks the item if that fails).
                if item.due.is_none_or(|d| d > now) {
                    report.busy += 1;
                    return Ok(());
                }
                self.publish_unsent(device, &item, before).await?;
                report.published += item.unsent.len();
            }
            let entries = self.missed_events(device, &mut memory, now)?;
            if entries.is_empty() {
                // Listed but nothing to declare: a stale `due` (its gaps were filled).
                if item.unsent.is_empty() && item.due != before {
                    self.devices
                        .clear_unsent(&self.name, device, item.version, before)
                        .await?;
                }
                return Ok(());
            }
            let due = self.gap_due(&memory);
            let bytes = proto::wire::encode(&memory);
            if !self
                .devices
                .commit(&self.name, device, item.version, &bytes, &entries, due)
                .await?
            {
                self.metrics.device_conflicts.increment(1);
                continue;
            }
            report.declared += entries.len();
            let committed = DeviceItem {
                version: item.version + 1,
                state: Vec::new(),
                unsent: entries,
                due,
            };
            self.publish_committed(device, &committed, &memory, now)
                .await;
            return Ok(());
        }
        report.busy += 1;
        Ok(())
    }
}

/// What one [`Ingest::sweep`] pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Devices listed as due.
    pub due: usize,
    /// MissedEvents declared.
    pub declared: usize,
    /// Events published that a crashed instance had left unpublished.
    pub published: usize,
    /// Devices another instance was committing at the same time (it publishes and declares).
    pub busy: usize,
    /// The pass stopped at its limit: more devices may be due.
    pub more: bool,
}

fn decode_memory(device: &str, item: &DeviceItem) -> anyhow::Result<Memory> {
    if item.state.is_empty() {
        return Ok(Memory::default());
    }
    proto::wire::decode(&item.state)
        .with_context(|| format!("device {device}: its stored state does not decode"))
}

fn rejected(rej: Rejection) -> Reply {
    Reply::Rejected {
        stage: rej.stage,
        reason: rej.reason,
        subject: rej.subject,
        event_id: rej.event_id,
    }
}

/// The names that become keys (the DynamoDB item, the S3 key, the topic) are checked before
/// anything is read: one topic level each, of a bounded length.
fn check_names(m: &Message<'_>) -> Result<(), String> {
    let level = |what: &str, v: &str| {
        if v.is_empty() || v.contains(['/', '+', '#']) || v.chars().any(char::is_control) {
            return Err(format!(
                "{what} '{}' must be one topic level (no '/', '+', '#', control characters)",
                v.escape_debug()
            ));
        }
        if v.len() > engine::state::MAX_DEVICE_ID_BYTES {
            return Err(format!(
                "{what} is {} bytes long; at most {} are allowed",
                v.len(),
                engine::state::MAX_DEVICE_ID_BYTES
            ));
        }
        Ok(())
    };
    level("device", m.device)?;
    level("event type", m.event_type)
}

/// The DLQ message of a refused device message: its id is a function of the message (the
/// event id when the envelope had one), so a second attempt is the same message.
pub fn dlq_message(ingest: &str, m: &Message<'_>, rej: &Rejection) -> DlqMessage {
    let at = proto::timestamp::format_rfc3339(m.received_at);
    let what = match &rej.event_id {
        Some(e) => e.clone(),
        None => format!(
            "{:016x}",
            crate::fnv1a(
                &[
                    m.device.as_bytes(),
                    &[0],
                    m.event_type.as_bytes(),
                    &[0],
                    m.payload
                ]
                .concat()
            )
        ),
    };
    let bytes = base64::engine::general_purpose::STANDARD.encode(m.payload);
    DlqMessage {
        id: format!("{}:{ingest}:{what}", rej.stage),
        event_id: rej.event_id.clone(),
        device: Some(m.device.to_string()),
        stage: rej.stage,
        reason: rej.reason.clone(),
        attempts: 1,
        first_seen: at.clone(),
        last_seen: at,
        payload: match std::str::from_utf8(m.payload) {
            Ok(text) => text.to_string(),
            Err(_) => bytes.clone(),
        },
        gateway: Some(ingest.to_string()),
        edge_seq: None,
        object_key: None,
        previous: None,
        subject: Some(rej.subject.clone()),
        message: Some(DeviceOrigin {
            device: m.device.to_string(),
            event_type: m.event_type.to_string(),
            via: m.via,
            received_at: m.received_at,
            bytes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MIN: i64 = 60_000;
    const T0: i64 = 1_780_000_000_000;

    /// An ingest over the local backend in `dir`, gaps due after a minute.
    fn ingest(dir: &std::path::Path) -> Arc<Ingest> {
        let engine =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.toml");
        let path = dir.join("bridge.toml");
        std::fs::write(
            &path,
            format!(
                "[aws]\nbucket = \"b\"\nevent_bus = \"bus\"\ntable = \"t\"\ndlq_queue = \"q\"\n\n\
                 [ingest]\nengine_config = \"{}\"\nmissed_after_s = 60\n",
                engine.display()
            ),
        )
        .unwrap();
        let cfg = Arc::new(Config::load(&path).unwrap());
        let backend = crate::backend::local::backend(dir, &cfg).unwrap();
        let p = crate::pipeline::Pipeline::with_backend(
            backend,
            cfg,
            Arc::new(Metrics::default()),
            "test".into(),
        );
        p.ingest.clone().unwrap()
    }

    async fn send(ingest: &Ingest, seq: u64, at: i64) -> Reply {
        let payload = json!({"id": format!("e{seq}"), "seq": seq, "ts": T0 + seq as i64 * MIN,
            "data": {"energy_kwh": 100.0 + seq as f64 * 0.5, "voltage_v": 230.0, "current_a": 2.0}})
        .to_string();
        ingest
            .handle(&Message {
                device: "meter-s1",
                event_type: "meter",
                payload: payload.as_bytes(),
                via: Via::Http,
                received_at: at,
                replay: false,
            })
            .await
            .unwrap()
    }

    /// The MissedEvents published into the local backend's event files.
    fn missed(dir: &std::path::Path) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for day in std::fs::read_dir(dir.join("eventbridge")).unwrap() {
            let Ok(text) = std::fs::read_to_string(day.unwrap().path().join("MissedEvents.ndjson"))
            else {
                continue;
            };
            out.extend(
                text.lines().map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["detail"].clone()
                }),
            );
        }
        out
    }

    #[tokio::test]
    async fn the_sweep_declares_a_silent_device_s_gap_once_and_not_before_it_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let ingest = ingest(dir.path());
        let at = T0 + 10 * MIN;
        assert!(matches!(send(&ingest, 1, at).await, Reply::Stored { .. }));
        // Seq 2 is missing from here on; the device then goes silent.
        assert!(matches!(
            send(&ingest, 3, at + 1000).await,
            Reply::Stored { .. }
        ));
        let item = ingest.devices.read("cloud", "meter-s1").await.unwrap();
        assert_eq!(item.due, Some(at + 1000 + MIN), "due when the gap is");

        let early = ingest.sweep(at + 1000 + MIN - 1, 100).await.unwrap();
        assert_eq!(
            early,
            SweepReport::default(),
            "nothing is due a millisecond early"
        );
        assert!(missed(dir.path()).is_empty());

        let report = ingest.sweep(at + 2 * MIN, 100).await.unwrap();
        assert_eq!((report.due, report.declared), (1, 1), "{report:?}");
        let declared = missed(dir.path());
        assert_eq!(declared.len(), 1, "{declared:?}");
        assert_eq!(
            (
                &declared[0]["device"],
                &declared[0]["first_seq"],
                &declared[0]["last_seq"],
                &declared[0]["kind"]
            ),
            (&json!("meter-s1"), &json!(2), &json!(2), &json!("device"))
        );
        let item = ingest.devices.read("cloud", "meter-s1").await.unwrap();
        assert_eq!(
            (item.due, item.unsent.len()),
            (None, 0),
            "published and no longer due"
        );

        // Later sweeps find nothing; the late seq 2 is stored, flagged late, not declared again.
        assert_eq!(
            ingest.sweep(at + 10 * MIN, 100).await.unwrap(),
            SweepReport::default()
        );
        match send(&ingest, 2, at + 11 * MIN).await {
            Reply::Stored { flags, .. } => assert!(flags.iter().any(|f| f == "late"), "{flags:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(missed(dir.path()).len(), 1);
        // Seq 3 was calculated against seq 1: the late seq 2 corrects it where it is stored.
        let mut e3 = None;
        for key in ingest.sink.objects.list("events/").await.unwrap() {
            let (body, _) = ingest
                .sink
                .objects
                .get_versioned(&key)
                .await
                .unwrap()
                .unwrap();
            let r: EventResult = serde_json::from_slice(&body).unwrap();
            if r.seq == 3 {
                e3 = Some(r);
            }
        }
        let e3 = e3.expect("seq 3 is stored");
        assert_eq!(e3.status, Status::Corrected, "{e3:?}");
        assert_eq!(e3.result["consumption_kwh"], json!(0.5), "{e3:?}");
        // Sent again, the late event is a duplicate: nothing is corrected twice.
        assert!(matches!(
            send(&ingest, 2, at + 12 * MIN).await,
            Reply::Duplicate { .. }
        ));
    }

    #[tokio::test]
    async fn a_state_that_does_not_decode_is_moved_aside_and_the_device_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let ingest = ingest(dir.path());
        let at = T0 + 10 * MIN;
        send(&ingest, 1, at).await;
        let item = ingest.devices.read("cloud", "meter-s1").await.unwrap();
        let garbage = b"\xff\x00 not CBOR".to_vec();
        assert!(
            ingest
                .devices
                .commit("cloud", "meter-s1", item.version, &garbage, &[], None)
                .await
                .unwrap()
        );
        match send(&ingest, 2, at + MIN).await {
            Reply::Stored { flags, .. } => {
                assert!(flags.iter().any(|f| f == "first_reading"), "{flags:?}")
            }
            other => panic!("{other:?}"),
        }
        let moved: Vec<String> = ingest
            .sink
            .objects
            .list("failures/")
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.contains("/gateway=cloud/device-state-"))
            .collect();
        assert_eq!(moved.len(), 1, "{moved:?}");
        let (body, _) = ingest
            .sink
            .objects
            .get_versioned(&moved[0])
            .await
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let state = base64::engine::general_purpose::STANDARD
            .decode(v["state"].as_str().unwrap())
            .unwrap();
        assert_eq!(state, garbage);
        assert!(
            v["error"].as_str().unwrap().contains("does not decode"),
            "{v}"
        );
        assert_eq!(
            ingest
                .metrics
                .get(crate::metrics::DEVICE_STATES_QUARANTINED),
            1
        );
        // The fresh state is a real one: the next event is calculated against seq 2.
        match send(&ingest, 3, at + 2 * MIN).await {
            Reply::Stored { flags, .. } => assert!(flags.is_empty(), "{flags:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stale_due_is_cleared_without_declaring_anything() {
        let dir = tempfile::tempdir().unwrap();
        let ingest = ingest(dir.path());
        let at = T0 + 10 * MIN;
        send(&ingest, 1, at).await;
        let item = ingest.devices.read("cloud", "meter-s1").await.unwrap();
        assert_eq!(item.due, None);
        // As after a publish failure whose retry was then sent by the device's next message.
        assert!(
            ingest
                .devices
                .mark_due("cloud", "meter-s1", item.version, at)
                .await
                .unwrap()
        );
        let report = ingest.sweep(at + MIN, 100).await.unwrap();
        assert_eq!((report.due, report.declared, report.published), (1, 0, 0));
        assert_eq!(
            ingest.devices.read("cloud", "meter-s1").await.unwrap().due,
            None
        );
        assert_eq!(ingest.sweep(at + 2 * MIN, 100).await.unwrap().due, 0);
    }
}
