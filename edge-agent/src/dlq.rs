//! The local dead-letter queue: its cap, automatic retries of transient failures, and the
//! queries behind `edge-agent dlq …` (one implementation, whether the agent runs or not).
//!
//! Every message that cannot become a result lands here as a [`DlqEntry`] with its stage,
//! the reason (naming the field or rule), attempts, first/last seen and the original bytes.
//!
//! **Transient or permanent.** The engine marks a rejection transient
//! ([`engine::Rejection::transient`]) when the calculation or a check failed for want of the
//! device's previous reading, e.g. a rate computed before the reading it is relative to has
//! arrived (a device catching up after an outage, newest first). Only those are retried
//! automatically, [`AutoRetry::attempts`] times with doubling delays; decode, schema and rule
//! failures fail the same way every time, so they wait for a person (`dlq retry` after fixing
//! the config or the device). `attempts` counts every try, automatic or manual.
//!
//! **Cap.** `max_entries` and `max_bytes` (encoded size) bound the DLQ. `full_policy`:
//! - `drop_oldest` (default): each new entry over the cap evicts the oldest ones in the same
//!   atomic commit; every eviction is counted (`edge_dlq_dropped_total`, persisted in the
//!   store's counters and shown by `dlq stats`) and logged with its reason. Ingest never stops
//!   because of bad data, and the newest failures — what a technician needs — are kept.
//! - `block`: when the DLQ is full the pipeline stops taking device messages (they stay
//!   unacknowledged, so devices and the broker keep them: back-pressure, nothing lost) until a
//!   technician makes room (`dlq retry`, `dlq export` + `dlq purge`). Admin commands and
//!   automatic retries keep running meanwhile; the DLQ may exceed the cap by at most one
//!   batch. A message cannot be "rejected" instead: it was already received and, with QoS 1,
//!   its sequence number recorded, so not storing it would lose it silently.
//!
//! Retries re-inject the original bytes through the same engine and group commit as live
//! traffic, as a replay (exempt from duplicate detection; the result is flagged `replay`),
//! with the original arrival time (`first_seen`) as `received_at`, so clock rules judge the
//! message as they would have on arrival and a retry a week later is not "too old". A success
//! removes the entry in the same atomic commit that stores the result.

use std::collections::{HashMap, HashSet};

use proto::timestamp::{rfc3339, rfc3339_opt};
use proto::{DlqEntry, Stage};
use serde::{Deserialize, Serialize};
use settings::Invalid;

use crate::store::{DlqCap, Store, StoreError, StoreReader};

/// `[dlq]` in the agent config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Most entries kept.
    pub max_entries: u64,
    /// Most encoded bytes kept (entries hold the original payload).
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    pub auto_retry: AutoRetry,
}

impl Default for DlqConfig {
    fn default() -> Self {
        DlqConfig {
            max_entries: 100_000,
            max_bytes: 64 << 20,
            full_policy: FullPolicy::DropOldest,
            auto_retry: AutoRetry::default(),
        }
    }
}

/// What to do when a new entry would exceed the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Evict the oldest entries, counting each (`edge_dlq_dropped_total`).
    #[default]
    DropOldest,
    /// Stop taking device messages until someone makes room (nothing is lost).
    Block,
}

impl FullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FullPolicy::DropOldest => "drop_oldest",
            FullPolicy::Block => "block",
        }
    }
}

/// `[dlq.auto_retry]`: automatic retries of transient failures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoRetry {
    /// Automatic retries per entry (0 disables them); then it waits for a person.
    pub attempts: u32,
    /// Delay before the first automatic retry; it doubles after each failed one…
    pub first_delay_ms: u64,
    /// …up to this.
    pub max_delay_ms: u64,
}

impl Default for AutoRetry {
    fn default() -> Self {
        AutoRetry {
            attempts: 5,
            first_delay_ms: 30_000,
            max_delay_ms: 30 * 60_000,
        }
    }
}

impl AutoRetry {
    /// When to retry an entry that has failed `attempts` times (the first failure is 1), or
    /// `None` once its automatic retries are used up.
    pub fn next_at(&self, attempts: u32, now: i64) -> Option<i64> {
        if attempts == 0 || attempts > self.attempts {
            return None;
        }
        let factor = 1u64.checked_shl(attempts - 1).unwrap_or(u64::MAX);
        let delay = self
            .first_delay_ms
            .saturating_mul(factor)
            .min(self.max_delay_ms);
        Some(now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)))
    }
}

impl DlqConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_entries == 0 {
            return Err(Invalid::at("dlq.max_entries", "must be at least 1"));
        }
        if self.max_bytes < 4096 {
            return Err(Invalid::at("dlq.max_bytes", "must be at least 4096"));
        }
        let r = &self.auto_retry;
        if r.attempts > 0 && r.first_delay_ms == 0 {
            return Err(Invalid::at(
                "dlq.auto_retry.first_delay_ms",
                "must be at least 1",
            ));
        }
        if r.max_delay_ms < r.first_delay_ms {
            return Err(Invalid::at(
                "dlq.auto_retry.max_delay_ms",
                "must not be below first_delay_ms",
            ));
        }
        Ok(())
    }

    /// The cap as the store enforces it.
    pub fn cap(&self) -> DlqCap {
        DlqCap {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            drop_oldest: self.full_policy == FullPolicy::DropOldest,
        }
    }
}

/// Which entries a listing, export or `--all` retry/purge covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Filter {
    /// Case-insensitive substring of the reason (`counter_monotonic`, `data.kwh`).
    pub reason: Option<String>,
    /// Exact device id, or a prefix ending in `*` (`meter-*`).
    pub device: Option<String>,
    /// Entries last seen at or after this time (epoch ms).
    pub since: Option<i64>,
    /// Most entries (oldest first).
    pub limit: Option<usize>,
}

impl Filter {
    pub fn matches(&self, e: &DlqEntry) -> bool {
        if let Some(r) = &self.reason
            && !e.reason.to_lowercase().contains(&r.to_lowercase())
        {
            return false;
        }
        if let Some(d) = &self.device {
            let dev = e.device.as_deref().unwrap_or("");
            let ok = match d.strip_suffix('*') {
                Some(prefix) => e.device.is_some() && dev.starts_with(prefix),
                None => dev == d,
            };
            if !ok {
                return false;
            }
        }
        self.since.is_none_or(|s| e.last_seen >= s)
    }
}

/// The entries a retry or purge applies to: the listed ids, or every entry the filter matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Selection {
    pub ids: Vec<u64>,
    pub all: bool,
    pub filter: Filter,
}

/// One entry as the CLI, the admin socket and `dlq export` show it: the DLQ entry shape of
/// INTERFACES.md plus `auto_retry_at` (when the next automatic retry is due, if any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryView {
    pub id: u64,
    pub event_id: Option<String>,
    pub device: Option<String>,
    pub topic: String,
    pub stage: Stage,
    pub reason: String,
    pub attempts: u32,
    #[serde(with = "rfc3339")]
    pub first_seen: i64,
    #[serde(with = "rfc3339")]
    pub last_seen: i64,
    /// The original bytes: UTF-8 text as is, anything else base64 (`payload_encoding`).
    pub payload: String,
    pub payload_encoding: String,
    #[serde(with = "rfc3339_opt")]
    pub auto_retry_at: Option<i64>,
}

impl EntryView {
    pub fn new(e: &DlqEntry, auto_retry_at: Option<i64>) -> EntryView {
        // Built from proto's JSON form so the shape and the payload encoding are the contract's.
        let j = e.to_json();
        let text = |k: &str| j[k].as_str().unwrap_or_default().to_string();
        EntryView {
            id: e.id,
            event_id: e.event_id.clone(),
            device: e.device.clone(),
            topic: e.topic.clone(),
            stage: e.stage,
            reason: e.reason.clone(),
            attempts: e.attempts,
            first_seen: e.first_seen,
            last_seen: e.last_seen,
            payload: text("payload"),
            payload_encoding: text("payload_encoding"),
            auto_retry_at,
        }
    }
}

/// `dlq list`: the matching entries (oldest first, up to the limit) and how many matched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    /// Entries in the DLQ.
    pub total: u64,
    /// Entries matching the filter (the listing may be shorter: `limit`).
    pub matching: u64,
    pub entries: Vec<EntryView>,
}

/// A count of entries sharing a stage, reason or device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub key: String,
    pub count: u64,
    /// The most recent `last_seen` among them.
    #[serde(with = "rfc3339")]
    pub last_seen: i64,
}

/// `dlq stats`: what is wrong with a site, at a glance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqStats {
    pub entries: u64,
    pub bytes: u64,
    /// The cap, when known (from the running agent or the config given).
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
    pub full_policy: Option<FullPolicy>,
    /// Entries evicted by `drop_oldest`, ever.
    pub dropped_total: u64,
    pub oldest: Option<EntryBrief>,
    pub newest: Option<EntryBrief>,
    /// Entries waiting for an automatic retry, and when the next is due.
    pub auto_retry_pending: u64,
    #[serde(with = "rfc3339_opt")]
    pub next_auto_retry: Option<i64>,
    /// Largest groups first; `by_reason` groups reasons by their field or rule (see
    /// [`reason_key`]); `by_device` "-" is "device unknown" (e.g. a topic that did not match).
    pub by_stage: Vec<Count>,
    pub by_reason: Vec<Count>,
    pub by_device: Vec<Count>,
}

/// Enough of an entry to point at it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryBrief {
    pub id: u64,
    #[serde(with = "rfc3339")]
    pub first_seen: i64,
    pub device: Option<String>,
    pub stage: Stage,
    pub reason: String,
}

impl EntryBrief {
    fn of(e: &DlqEntry) -> EntryBrief {
        EntryBrief {
            id: e.id,
            first_seen: e.first_seen,
            device: e.device.clone(),
            stage: e.stage,
            reason: e.reason.clone(),
        }
    }
}

/// What a retry did with one entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RetryOutcome {
    /// Became a result (in the outbox as `edge_seq`); the entry is gone.
    Reprocessed {
        event_id: String,
        edge_seq: u64,
    },
    /// Failed again; the entry stays with the new stage/reason and one more attempt.
    Failed {
        stage: Stage,
        reason: String,
        attempts: u32,
        #[serde(with = "rfc3339_opt")]
        auto_retry_at: Option<i64>,
    },
    /// Already processed (not expected for a replay); the entry is gone.
    Duplicate {
        reason: String,
    },
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryItem {
    pub id: u64,
    #[serde(flatten)]
    pub outcome: RetryOutcome,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryReport {
    pub items: Vec<RetryItem>,
}

impl RetryReport {
    pub fn count(&self, f: impl Fn(&RetryOutcome) -> bool) -> usize {
        self.items.iter().filter(|i| f(&i.outcome)).count()
    }

    /// Every selected entry left the DLQ.
    pub fn all_ok(&self) -> bool {
        self.items.iter().all(|i| {
            matches!(
                i.outcome,
                RetryOutcome::Reprocessed { .. } | RetryOutcome::Duplicate { .. }
            )
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    pub purged: Vec<u64>,
    pub not_found: Vec<u64>,
}

/// An entry's group for `dlq stats`: the field or rule it is about. An entry that carries the
/// engine's [`Subject`](proto::Subject) is grouped by it (`data.voltage_v`, `rule
/// counter_monotonic`, `calc per_min`: [`Subject::group`](proto::Subject::group)); one about
/// the whole document, or stored before entries carried a subject, by its reason text
/// ([`reason_text_key`]), which gives the same groups for the engine's reasons.
pub fn reason_key(e: &DlqEntry) -> String {
    e.subject
        .as_ref()
        .and_then(|s| s.group(e.stage))
        .unwrap_or_else(|| reason_text_key(&e.reason))
}

/// A reason's group read out of its text: the field or rule it names, without the values —
/// the text before the first `": "` or `" ("`, with standalone numbers replaced by `N`
/// (`data.voltage_v: 612 is above max 500` → `data.voltage_v`;
/// `syntax error at byte 17: …` → `syntax error at byte N`).
pub fn reason_text_key(reason: &str) -> String {
    let cut = [": ", " ("]
        .iter()
        .filter_map(|sep| reason.find(sep))
        .min()
        .unwrap_or(reason.len());
    reason[..cut]
        .split(' ')
        .map(|w| {
            if !w.is_empty() && w.parse::<f64>().is_ok() {
                "N"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `dlq list`.
pub fn list(reader: &StoreReader, filter: &Filter) -> Result<Listing, StoreError> {
    let schedule: HashMap<u64, i64> = reader.dlq_schedule().collect::<Result<_, _>>()?;
    let limit = filter.limit.unwrap_or(usize::MAX);
    let (mut total, mut matching) = (0u64, 0u64);
    let mut entries = Vec::new();
    for e in reader.dlq(0) {
        let e = e?;
        total += 1;
        if filter.matches(&e) {
            matching += 1;
            if entries.len() < limit {
                entries.push(EntryView::new(&e, schedule.get(&e.id).copied()));
            }
        }
    }
    Ok(Listing {
        total,
        matching,
        entries,
    })
}

/// `dlq show ID`.
pub fn show(reader: &StoreReader, id: u64) -> Result<Option<EntryView>, StoreError> {
    Ok(match reader.dlq_entry(id)? {
        Some(e) => Some(EntryView::new(&e, reader.dlq_retry_at(id)?)),
        None => None,
    })
}

/// `dlq export`: every matching entry, oldest first, to `sink`; returns how many.
pub fn export(
    reader: &StoreReader,
    filter: &Filter,
    mut sink: impl FnMut(&EntryView) -> std::io::Result<()>,
) -> Result<u64, ExportError> {
    let schedule: HashMap<u64, i64> = reader.dlq_schedule().collect::<Result<_, _>>()?;
    let limit = filter.limit.unwrap_or(usize::MAX) as u64;
    let mut n = 0u64;
    for e in reader.dlq(0) {
        let e = e?;
        if n >= limit {
            break;
        }
        if filter.matches(&e) {
            sink(&EntryView::new(&e, schedule.get(&e.id).copied()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The ids a selection names, in order: the listed ones (each once; ids not in the DLQ are
/// kept, for the caller to report) or every entry the filter matches, oldest first.
pub fn resolve(reader: &StoreReader, sel: &Selection) -> Result<Vec<u64>, StoreError> {
    if !sel.all {
        let mut seen = HashSet::new();
        return Ok(sel
            .ids
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect());
    }
    let limit = sel.filter.limit.unwrap_or(usize::MAX);
    let mut ids = Vec::new();
    for e in reader.dlq(0) {
        if ids.len() >= limit {
            break;
        }
        let e = e?;
        if sel.filter.matches(&e) {
            ids.push(e.id);
        }
    }
    Ok(ids)
}

/// `dlq purge`: deletes the selected entries (and their retry schedule), in commits of at
/// most 10 000.
pub fn purge(store: &mut Store, sel: &Selection) -> Result<PurgeReport, StoreError> {
    let reader = store.reader();
    let mut report = PurgeReport::default();
    for id in resolve(&reader, sel)? {
        if reader.dlq_entry(id)?.is_some() {
            report.purged.push(id);
        } else {
            report.not_found.push(id);
        }
    }
    for chunk in report.purged.chunks(10_000) {
        let mut commit = store.begin();
        commit.dlq_removals = chunk.to_vec();
        store.commit(&commit)?;
    }
    Ok(report)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// How many groups `dlq stats` lists per dimension before "N others".
pub const STATS_TOP: usize = 8;

/// `dlq stats`. `cap` is the configured cap when known.
pub fn stats(reader: &StoreReader, cap: Option<&DlqConfig>) -> Result<DlqStats, StoreError> {
    let counters = reader.counters()?;
    let mut by_stage: HashMap<String, (u64, i64)> = HashMap::new();
    let mut by_reason: HashMap<String, (u64, i64)> = HashMap::new();
    let mut by_device: HashMap<String, (u64, i64)> = HashMap::new();
    let (mut oldest, mut newest) = (None, None);
    let mut entries = 0u64;
    for e in reader.dlq(0) {
        let e = e?;
        entries += 1;
        for (map, key) in [
            (&mut by_stage, e.stage.as_str().to_string()),
            (&mut by_reason, reason_key(&e)),
            (
                &mut by_device,
                e.device.clone().unwrap_or_else(|| "-".into()),
            ),
        ] {
            let slot = map.entry(key).or_insert((0, e.last_seen));
            slot.0 += 1;
            slot.1 = slot.1.max(e.last_seen);
        }
        if oldest.is_none() {
            oldest = Some(EntryBrief::of(&e));
        }
        newest = Some(e);
    }
    let schedule: Vec<(u64, i64)> = reader.dlq_schedule().collect::<Result<_, _>>()?;
    Ok(DlqStats {
        entries,
        bytes: counters.dlq_bytes,
        max_entries: cap.map(|c| c.max_entries),
        max_bytes: cap.map(|c| c.max_bytes),
        full_policy: cap.map(|c| c.full_policy),
        dropped_total: counters.dlq_dropped,
        oldest,
        newest: newest.as_ref().map(EntryBrief::of),
        auto_retry_pending: schedule.len() as u64,
        next_auto_retry: schedule.iter().map(|s| s.1).min(),
        by_stage: ranked(by_stage, usize::MAX),
        by_reason: ranked(by_reason, STATS_TOP),
        by_device: ranked(by_device, STATS_TOP),
    })
}

/// Largest first (ties: most recent first, then by key); beyond `top`, one "(N others)" row.
fn ranked(map: HashMap<String, (u64, i64)>, top: usize) -> Vec<Count> {
    let mut v: Vec<Count> = map
        .into_iter()
        .map(|(key, (count, last_seen))| Count {
            key,
            count,
            last_seen,
        })
        .collect();
    v.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.last_seen.cmp(&a.last_seen))
            .then(a.key.cmp(&b.key))
    });
    if v.len() > top {
        let rest = v.split_off(top);
        v.push(Count {
            key: match rest.len() {
                1 => "(1 other)".to_string(),
                n => format!("({n} others)"),
            },
            count: rest.iter().map(|c| c.count).sum(),
            last_seen: rest.iter().map(|c| c.last_seen).max().unwrap_or(0),
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Subject;

    fn entry(id: u64, device: Option<&str>, reason: &str, last_seen: i64) -> DlqEntry {
        DlqEntry {
            id,
            event_id: None,
            device: device.map(Into::into),
            topic: "devices/x/events/meter".into(),
            stage: Stage::Schema,
            reason: reason.into(),
            subject: None,
            attempts: 1,
            first_seen: last_seen,
            last_seen,
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn reason_keys_name_the_field_or_rule() {
        for (reason, key) in [
            ("data.voltage_v: 612 is above max 500", "data.voltage_v"),
            (
                "rule counter_monotonic: the cumulative kWh register must not decrease",
                "rule counter_monotonic",
            ),
            ("calc per_min: result is NaN (count=3)", "calc per_min"),
            (
                "unknown event type 'toaster' (known: environment, gps, meter)",
                "unknown event type 'toaster'",
            ),
            (
                "syntax error at byte 17: expected value",
                "syntax error at byte N",
            ),
            ("truncated: unexpected end of input at byte 30", "truncated"),
            (
                "payload is 20000 bytes, over the 16384-byte limit",
                "payload is N bytes, over the 16384-byte limit",
            ),
        ] {
            assert_eq!(reason_text_key(reason), key, "{reason}");
            // An entry stored before entries carried a subject is grouped by its text.
            assert_eq!(reason_key(&entry(1, None, reason, 0)), key, "{reason}");
        }
    }

    #[test]
    fn entries_with_a_subject_group_by_it() {
        let with = |stage, subject, reason: &str| DlqEntry {
            stage,
            subject: Some(subject),
            ..entry(1, None, reason, 0)
        };
        // A data key with ": " in it: the text would be cut inside the path.
        let e = with(
            Stage::Schema,
            Subject::Field("data[\"a: b\"]".into()),
            "data[\"a: b\"]: string of 5000 characters is over the 4096-character limit",
        );
        assert_eq!(reason_text_key(&e.reason), "data[\"a");
        assert_eq!(reason_key(&e), "data[\"a: b\"]");
        let e = with(
            Stage::Calc,
            Subject::Field("per_min".into()),
            "calc per_min: result is NaN (count=3)",
        );
        assert_eq!(reason_key(&e), "calc per_min");
        let e = with(
            Stage::Check,
            Subject::Rule("cost_bounded".into()),
            "check cost_bounded: cost is implausibly high (cost=250)",
        );
        assert_eq!(reason_key(&e), "check cost_bounded");
        // About the whole document: the text says what kind of problem.
        let e = with(
            Stage::Decode,
            Subject::Document,
            "syntax error at byte 17: expected value",
        );
        assert_eq!(reason_key(&e), "syntax error at byte N");
    }

    /// The engine's own rejections group the same way by subject as by text, so `dlq stats`
    /// over a store holding entries from before and after subjects existed has one group each.
    #[test]
    fn engine_subjects_group_as_their_reasons_read() {
        use serde_json::{Value, json};
        let spec: engine::EngineSpec = toml::from_str(
            r#"
            [event_types.meter]
            allowed_devices = ["meter-*"]
            max_clock_skew_s = 300
            [event_types.meter.fields]
            kwh = { type = "number", required = true, min = 0 }
            [[event_types.meter.rules]]
            name = "counter_monotonic"
            expr = "!has_prev || kwh >= prev.kwh"
            [[event_types.meter.calc]]
            name = "inv"
            expr = "1 / (kwh - 100)"
            [[event_types.meter.checks]]
            name = "small"
            expr = "inv < 100"
            "#,
        )
        .unwrap();
        let engine = engine::Engine::new(&spec).unwrap();
        let mut state = engine::State::new();
        let mut seq = 0;
        // Each message one second after the last, `ahead_ms` ahead of its arrival.
        let mut run = |device: &str, body: Value, ahead_ms: i64| {
            seq += 1;
            let at = 1_764_000_000_000 + 1000 * seq;
            let mut msg = json!({"id": format!("e{seq}"), "seq": seq, "ts": at + ahead_ms});
            if let (Value::Object(m), Value::Object(b)) = (&mut msg, body) {
                m.extend(b);
            }
            let topic = format!("devices/{device}/events/meter");
            let payload = msg.to_string();
            let input = engine::Input {
                topic: &topic,
                payload: payload.as_bytes(),
                received_at: at,
                gateway: "gw",
                via: proto::Via::Gateway,
                replay: false,
            };
            match engine.process(&mut state, &input) {
                engine::Outcome::Rejected(r) => Some(r),
                _ => None,
            }
        };
        assert!(run("meter-1", json!({"data": {"kwh": 5}}), 0).is_none());
        let rejections = [
            run("meter-1", json!({"data": {}}), 0),
            run("meter-1", json!({"data": {"kwh": -1, "x": 1}}), 0),
            run("meter-1", json!({"data": {"kwh": 6, "x": 1}}), 0),
            run("meter-1", json!({"ts": "x", "data": {}}), 0),
            run("meter-1", json!({"device": "m", "data": {"kwh": 6}}), 0),
            run("other-1", json!({"data": {"kwh": 6}}), 0),
            run("meter-1", json!({"data": {"kwh": 6}}), 400_000),
            run("meter-1", json!({"data": {"kwh": 4}}), 0),
            run("meter-1", json!({"data": {"kwh": 100}}), 0),
            run("meter-1", json!({"data": {"kwh": 100.001}}), 0),
        ];
        let mut stages = HashSet::new();
        for r in rejections {
            let r = r.expect("rejected");
            stages.insert(r.stage);
            assert_ne!(r.subject, Subject::Document, "{}", r.reason);
            let e = DlqEntry {
                stage: r.stage,
                subject: Some(r.subject.clone()),
                ..entry(1, None, &r.reason, 0)
            };
            assert_eq!(
                reason_key(&e),
                reason_text_key(&r.reason),
                "{:?} {}",
                r.subject,
                r.reason
            );
        }
        assert_eq!(
            stages,
            HashSet::from([Stage::Schema, Stage::Rule, Stage::Calc, Stage::Check])
        );
    }

    #[test]
    fn filters() {
        let e = entry(
            1,
            Some("meter-7"),
            "data.kwh: required field is missing",
            1000,
        );
        let f = |reason: Option<&str>, device: Option<&str>, since: Option<i64>| Filter {
            reason: reason.map(Into::into),
            device: device.map(Into::into),
            since,
            limit: None,
        };
        assert!(f(None, None, None).matches(&e));
        assert!(f(Some("DATA.KWH"), None, None).matches(&e));
        assert!(!f(Some("voltage"), None, None).matches(&e));
        assert!(f(None, Some("meter-7"), None).matches(&e));
        assert!(f(None, Some("meter-*"), None).matches(&e));
        assert!(!f(None, Some("meter-"), None).matches(&e));
        assert!(!f(None, Some("env-*"), None).matches(&e));
        assert!(f(None, None, Some(1000)).matches(&e));
        assert!(!f(None, None, Some(1001)).matches(&e));
        let anon = entry(2, None, "topic 'x' does not match", 5);
        assert!(!f(None, Some("*"), None).matches(&anon));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_then_stops() {
        let r = AutoRetry {
            attempts: 4,
            first_delay_ms: 1000,
            max_delay_ms: 3000,
        };
        assert_eq!(r.next_at(1, 0), Some(1000));
        assert_eq!(r.next_at(2, 0), Some(2000));
        assert_eq!(r.next_at(3, 0), Some(3000));
        assert_eq!(r.next_at(4, 10), Some(3010));
        assert_eq!(
            r.next_at(5, 0),
            None,
            "four automatic retries, then a person"
        );
        let off = AutoRetry {
            attempts: 0,
            ..r.clone()
        };
        assert_eq!(off.next_at(1, 0), None);
        let huge = AutoRetry {
            attempts: 200,
            first_delay_ms: u64::MAX / 2,
            max_delay_ms: u64::MAX,
        };
        assert!(huge.next_at(100, 5).is_some(), "no overflow");
    }

    #[test]
    fn entry_view_json_is_the_contract_shape_plus_auto_retry_at() {
        let e = entry(3, Some("m"), "r", 1_764_000_000_000);
        let v = serde_json::to_value(EntryView::new(&e, Some(1_764_000_001_000))).unwrap();
        let mut contract = e.to_json();
        contract["auto_retry_at"] = "2025-11-24T16:00:01.000Z".into();
        assert_eq!(v, contract);
        let back: EntryView = serde_json::from_value(v).unwrap();
        assert_eq!(back, EntryView::new(&e, Some(1_764_000_001_000)));
    }

    #[test]
    fn ranked_folds_the_tail() {
        let map: HashMap<String, (u64, i64)> = (0..12)
            .map(|i| (format!("k{i:02}"), (i as u64 + 1, i)))
            .collect();
        let v = ranked(map, 3);
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].key, "k11");
        assert_eq!(v[3].key, "(9 others)");
        assert_eq!(v[3].count, (1..=9).sum::<u64>());
    }
}
