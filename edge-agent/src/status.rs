//! `edge-agent status`: what the agent is doing, in one look — the same report whether it comes
//! from the running agent (admin socket) or from the store of a stopped one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dlq::{DlqConfig, FullPolicy};
use crate::store::outbox::Depth;
use crate::store::{Counters, StoreError, StoreReader};
use crate::uplink::LinkState;
use crate::uplink::refusal::LastRefusal;
use proto::timestamp::{rfc3339, rfc3339_opt};

/// Live figures the pipeline thread updates and the admin socket reads.
#[derive(Debug)]
pub struct Live {
    pub started_at: i64,
    started: Instant,
    pub ingested: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicates: AtomicU64,
    /// Device sequence gaps detected, and the events missing inside them.
    pub gaps: AtomicU64,
    pub missed: AtomicU64,
    /// Late arrivals (they filled a gap), and results they made stale that were corrected
    /// at the edge.
    pub late: AtomicU64,
    pub corrected: AtomicU64,
    /// Intake stopped because the DLQ is full (`full_policy = "block"`).
    pub intake_blocked: AtomicBool,
    /// The disk is short of `pipeline.disk_reserve_mb`: intake stopped.
    pub disk_full: AtomicBool,
    last_error: Mutex<Option<LastError>>,
    samples: Mutex<VecDeque<Sample>>,
    /// The config file running and its reloads (`None` when it was not read from a file).
    config: Mutex<Option<crate::reload::ConfigInfo>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    ingested: u64,
    accepted: u64,
    rejected: u64,
}

/// The window `status` computes rates over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

impl Live {
    pub fn new(now_ms: i64) -> Live {
        let started = Instant::now();
        Live {
            started_at: now_ms,
            started,
            ingested: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            late: AtomicU64::new(0),
            corrected: AtomicU64::new(0),
            intake_blocked: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            last_error: Mutex::new(None),
            config: Mutex::new(None),
            samples: Mutex::new(VecDeque::from([Sample {
                at: started,
                ingested: 0,
                accepted: 0,
                rejected: 0,
            }])),
        }
    }

    pub fn set_last_error(&self, at: i64, what: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastError { at, what });
    }

    pub fn set_config(&self, info: crate::reload::ConfigInfo) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// Changes the config info in place (a no-op before [`Live::set_config`]).
    pub fn update_config(&self, f: impl FnOnce(&mut crate::reload::ConfigInfo)) {
        if let Some(c) = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            f(c);
        }
    }

    pub fn config(&self) -> Option<crate::reload::ConfigInfo> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn now_sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            ingested: self.ingested.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Records the totals now (the admin server calls this every few seconds) and keeps the
    /// samples of the last [`RATE_WINDOW`].
    pub fn sample(&self) {
        let s = self.now_sample();
        let mut q = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(s);
        // Keep one sample at least RATE_WINDOW old as the window's start.
        while q.len() > 2 && q.get(1).is_some_and(|x| s.at - x.at >= RATE_WINDOW) {
            q.pop_front();
        }
    }

    /// Messages per second over the last minute (or since start, if shorter).
    pub fn rates(&self) -> Rates {
        let now = self.now_sample();
        let q = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let from = q
            .iter()
            .find(|x| now.at - x.at <= RATE_WINDOW + Duration::from_secs(5))
            .copied()
            .unwrap_or(Sample {
                at: self.started,
                ingested: 0,
                accepted: 0,
                rejected: 0,
            });
        let secs = (now.at - from.at).as_secs_f64().max(0.001);
        let per_s = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 / secs * 100.0).round() / 100.0;
        Rates {
            window_s: secs.round() as u64,
            ingested_per_s: per_s(now.ingested, from.ingested),
            accepted_per_s: per_s(now.accepted, from.accepted),
            rejected_per_s: per_s(now.rejected, from.rejected),
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            ingested: self.ingested.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    #[serde(with = "rfc3339")]
    pub at: i64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Seconds the rates are averaged over.
    pub window_s: u64,
    pub ingested_per_s: f64,
    pub accepted_per_s: f64,
    pub rejected_per_s: f64,
}

/// Since the agent started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub ingested: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent: AgentInfo,
    /// "taking messages", "blocked: disk full", "blocked: DLQ full" or "stopped".
    pub intake: String,
    /// Results waiting for the cloud.
    pub outbox: OutboxInfo,
    pub uplink: UplinkInfo,
    pub dlq: DlqInfo,
    pub missed: MissedInfo,
    /// Results the agent corrected, ever (a late arrival's stale successor in its batch).
    #[serde(default)]
    pub corrected_total: u64,
    pub next_edge_seq: u64,
    /// Only while running.
    pub rates: Option<Rates>,
    pub totals: Option<Totals>,
    /// The most recent failure: while running, the last rejection or error since start; when
    /// stopped, the newest DLQ entry.
    pub last_error: Option<LastError>,
    /// Damaged stores moved aside at start-up (the agent went on with a fresh store).
    #[serde(default)]
    pub quarantined: Vec<crate::store::Quarantine>,
    /// Connections the embedded endpoint refused since start (only while running).
    #[serde(default)]
    pub refused: RefusedInfo,
}

/// Refusals by reason, as the `ingest_tls_refused_total` and `ingest_auth_refused_total`
/// metrics count them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefusedInfo {
    /// TLS handshakes (unknown_issuer, revoked, no_certificate, …).
    pub tls: BTreeMap<String, u64>,
    /// CONNECTs refused for the device's identity (bad_password, unknown_device, …).
    pub auth: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// "running" or "stopped".
    pub state: String,
    pub version: String,
    pub pid: Option<u32>,
    #[serde(with = "rfc3339_opt")]
    pub started_at: Option<i64>,
    pub uptime_s: Option<u64>,
    /// The config running (hash, reloads), while running from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::reload::ConfigInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxInfo {
    /// Pending: not yet acknowledged by the cloud.
    pub entries: u64,
    pub bytes: u64,
    /// Evicted by the outbox's `drop_oldest`, ever.
    pub dropped: u64,
    /// Dropped for being older than `outbox.max_age_s`, ever.
    #[serde(default)]
    pub expired: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkInfo {
    pub state: String,
    /// Publishes the cloud broker refused since start, by reason (MQTT 5 only).
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
    #[serde(default)]
    pub last_refusal: Option<LastRefusal>,
}

impl UplinkInfo {
    /// Only a state (no link to ask: not configured, or the agent is stopped).
    pub fn state(state: &str) -> UplinkInfo {
        UplinkInfo {
            state: state.into(),
            refused: BTreeMap::new(),
            last_refusal: None,
        }
    }

    /// The running link: "connected (last ack 2026-11-25T10:00:00.000Z)",
    /// "disconnected: <why>", and whether results are held after a refusal.
    pub fn of(l: &LinkState) -> UplinkInfo {
        let ack = l
            .last_ack_at
            .map(|t| format!(" (last ack {})", proto::timestamp::format_rfc3339(t)))
            .unwrap_or_default();
        let mut state = match (l.connected, &l.last_error) {
            (true, _) => format!("connected{ack}"),
            (false, Some(e)) => format!("disconnected{ack}: {e}"),
            (false, None) => format!("connecting{ack}"),
        };
        if l.refusing {
            state.push_str("; results held: the broker refuses them, retrying with backoff");
        }
        UplinkInfo {
            state,
            refused: l.refused.clone(),
            last_refusal: l.last_refusal.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqInfo {
    pub entries: u64,
    pub bytes: u64,
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
    pub full_policy: Option<FullPolicy>,
    /// Entries waiting for an automatic retry.
    pub auto_retry_pending: u64,
    /// Evicted by `drop_oldest`, ever.
    pub dropped_total: u64,
}

/// Missed events: sequence gaps still open, and those declared missed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissedInfo {
    /// Open gaps not yet declared missed (waiting `missed_after_s`).
    pub open_gaps: u64,
    /// Missed-event records stored (`edge-agent missed list`).
    pub records: u64,
    /// Seqs still missing in those records.
    pub missing: u64,
    /// Seqs ever declared missed, and how many of them arrived late after all.
    pub declared_total: u64,
    pub filled_late_total: u64,
    /// Records dropped by the cap, ever.
    pub dropped_total: u64,
}

/// What the report is built from; `live` is `None` for a stopped agent.
pub struct Sources<'a> {
    pub reader: &'a StoreReader,
    pub outbox: Option<Depth>,
    pub dlq: Option<&'a DlqConfig>,
    pub live: Option<&'a Live>,
    pub uplink: Option<UplinkInfo>,
    /// What the running endpoint refused.
    pub refused: Option<&'a crate::ingest::Refused>,
}

pub fn report(src: Sources<'_>) -> Result<StatusReport, StoreError> {
    let c: Counters = src.reader.counters()?;
    let scheduled = src.reader.dlq_schedule().count() as u64;
    let outbox = match src.outbox {
        Some(d) => OutboxInfo {
            entries: d.entries,
            bytes: d.bytes,
            dropped: d.dropped,
            expired: d.expired,
        },
        None => OutboxInfo {
            entries: c.outbox_entries,
            bytes: c.outbox_bytes,
            dropped: 0,
            expired: 0,
        },
    };
    let dlq = DlqInfo {
        entries: c.dlq_entries,
        bytes: c.dlq_bytes,
        max_entries: src.dlq.map(|d| d.max_entries),
        max_bytes: src.dlq.map(|d| d.max_bytes),
        full_policy: src.dlq.map(|d| d.full_policy),
        auto_retry_pending: scheduled,
        dropped_total: c.dlq_dropped,
    };
    let mut missing = 0u64;
    for r in src.reader.missed() {
        missing += r?.count;
    }
    let mut open_gaps = 0u64;
    for g in src.reader.gaps() {
        open_gaps += g?.1.open() as u64;
    }
    let missed = MissedInfo {
        open_gaps,
        records: c.missed_records,
        missing,
        declared_total: c.missed_seqs,
        filled_late_total: c.missed_filled_late,
        dropped_total: c.missed_dropped,
    };
    let uplink = src
        .uplink
        .unwrap_or_else(|| UplinkInfo::state("not configured"));
    let quarantined = src.reader.quarantines()?;
    let refused = src
        .refused
        .map(|r| RefusedInfo {
            tls: r.tls.get(),
            auth: r.auth.get(),
        })
        .unwrap_or_default();
    Ok(match src.live {
        Some(live) => StatusReport {
            agent: AgentInfo {
                state: "running".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: Some(std::process::id()),
                started_at: Some(live.started_at),
                uptime_s: Some(live.uptime().as_secs()),
                config: live.config(),
            },
            intake: if live.disk_full.load(Ordering::Relaxed) {
                "blocked: disk full".into()
            } else if live.intake_blocked.load(Ordering::Relaxed) {
                "blocked: DLQ full".into()
            } else {
                "taking messages".into()
            },
            outbox,
            uplink,
            dlq,
            missed,
            corrected_total: c.corrected,
            next_edge_seq: c.next_edge_seq,
            rates: Some(live.rates()),
            totals: Some(live.totals()),
            last_error: live.last_error(),
            quarantined,
            refused,
        },
        None => {
            let newest = src.reader.dlq_newest()?;
            StatusReport {
                agent: AgentInfo {
                    state: "stopped".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: None,
                    started_at: None,
                    uptime_s: None,
                    config: None,
                },
                intake: "stopped".into(),
                outbox,
                uplink,
                dlq,
                missed,
                corrected_total: c.corrected,
                next_edge_seq: c.next_edge_seq,
                rates: None,
                totals: None,
                last_error: newest.map(|e| LastError {
                    at: e.last_seen,
                    what: describe_rejection(e.stage, &e.reason, e.device.as_deref()),
                }),
                quarantined,
                refused,
            }
        }
    })
}

/// "schema: data.kwh: required field is missing (device meter-1)".
pub fn describe_rejection(stage: proto::Stage, reason: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{stage}: {reason} (device {d})"),
        None => format!("{stage}: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_window() {
        let live = Live::new(0);
        live.ingested.store(100, Ordering::Relaxed);
        let r = live.rates();
        assert!(r.ingested_per_s > 0.0);
        live.sample();
        live.sample();
        let r = live.rates();
        assert_eq!(r.window_s, 0);
    }
}
