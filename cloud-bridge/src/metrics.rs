//! The bridge's counters, kept through the `metrics` facade (the API the agent uses too) by an
//! [`EmfRecorder`], and published as CloudWatch embedded metric format (EMF) lines on stdout.
//!
//! EMF is how a Lambda publishes metrics (its stdout goes to CloudWatch Logs, which extracts
//! them) and works for the service too (CloudWatch agent or any log shipper). The emulator
//! cannot take `aws-sdk-cloudwatch` calls (shared/recipes/aws-emulator.md), and EMF needs no
//! extra API call on the hot path. Each line carries the counts since the previous line.
//!
//! Each [`Metrics`] has a recorder of its own rather than the process-wide one: a process may
//! run several pipelines (the demo, the tests), and each line must carry one bridge's counts.
//! Metric names are part of the bridge's interface (dashboards and alarms key on them), so
//! they are all declared here, once.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde_json::{Map, Value, json};

use crate::config::{EmfTarget, MetricsConfig};

/// Results stored in S3 for the first time.
pub const PROCESSED: &str = "processed";
/// Results received again (edge_seq already stored, or a repeated event_id).
pub const DUPLICATES: &str = "duplicates";
/// Times a batch started past the stored sequence.
pub const GAPS: &str = "gaps";
pub const REPLAYS_REQUESTED: &str = "replays_requested";
/// Ranges given up on after the replay attempts (reported as MissedEvents).
pub const MISSED_EVENTS: &str = "missed_events";
pub const S3_OBJECTS: &str = "s3_objects";
pub const EVENTBRIDGE_ENTRIES: &str = "eventbridge_entries";
/// Entries PutEvents reported as failed (each retry counts again).
pub const EVENTBRIDGE_FAILED_ENTRIES: &str = "eventbridge_failed_entries";
/// Uplink messages that were not a valid batch (stored under `failures/`).
pub const DECODE_ERRORS: &str = "decode_errors";
/// AWS calls that failed after the SDK's retries (the batch stays unacknowledged).
pub const AWS_ERRORS: &str = "aws_errors";
/// Another bridge claimed or stored the range first.
pub const CLAIM_CONFLICTS: &str = "claim_conflicts";
/// Stale claims of a crashed or stuck bridge taken over.
pub const CLAIM_TAKEOVERS: &str = "claim_takeovers";
/// MQTT messages acknowledged to the broker.
pub const ACKED_MESSAGES: &str = "acked_messages";
/// Results recalculated and compared (`[verify]`).
pub const VERIFIED: &str = "verified";
/// Results not verifiable here (previous reading unknown to this bridge).
pub const UNVERIFIED: &str = "unverified";
/// Verified results found incorrectly processed (mismatch or outdated calc_version).
pub const INCORRECT: &str = "incorrect";
/// Corrections made (pipeline, DLQ processor, correction runs).
pub const CORRECTED: &str = "corrected";
/// Messages sent to the cloud DLQ.
pub const DEAD_LETTERED: &str = "dead_lettered";
/// DLQ messages stored under `failures/` for a person.
pub const FAILURES_STORED: &str = "failures_stored";
/// Results stored with status `anomaly`.
pub const ANOMALIES: &str = "anomalies";
/// Gateways' missed-event records announced as MissedEvents (kind `device`), each once.
pub const MISSED_RECORDS_ANNOUNCED: &str = "missed_records_announced";
/// Gateways' store quarantines announced (MissedEvents `kind: quarantine`), each once.
pub const QUARANTINES_ANNOUNCED: &str = "quarantines_announced";
/// Gateway-less device messages stored (S3 object written, device state committed).
pub const INGESTED: &str = "ingested";
/// Gateway-less device messages the engine refused (dead-lettered, answered 400).
pub const INGEST_REJECTED: &str = "ingest_rejected";
/// Gateway-less device messages seen before (answered as stored, nothing written).
pub const INGEST_DUPLICATES: &str = "ingest_duplicates";
/// Another instance committed an event of the same device first (recomputed).
pub const DEVICE_CONFLICTS: &str = "device_conflicts";
pub const DEVICE_STATES_QUARANTINED: &str = "device_states_quarantined";
/// HTTP requests refused for their credentials (401/403).
pub const HTTP_UNAUTHORIZED: &str = "http_unauthorized";
/// Derived on each line: incorrect share of verified, what the monitor and an alarm watch.
pub const DISCREPANCY_RATE: &str = "discrepancy_rate";

/// A `metrics` recorder of counters: running totals by name, in the order they were first
/// registered (the order of the EMF line). Gauges and histograms are not kept: every figure
/// the bridge publishes is a count.
#[derive(Debug, Default)]
pub struct EmfRecorder {
    totals: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl EmfRecorder {
    /// Every counter's total.
    pub fn totals(&self) -> Vec<(String, u64)> {
        let totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals
            .iter()
            .map(|(n, c)| (n.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }

    fn total(&self, name: &str) -> u64 {
        let totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| c.load(Ordering::Relaxed))
    }
}

impl Recorder for EmfRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let total = match totals.iter().find(|(n, _)| n == key.name()) {
            Some((_, c)) => Arc::clone(c),
            None => {
                let c = Arc::new(AtomicU64::new(0));
                totals.push((key.name().to_string(), Arc::clone(&c)));
                c
            }
        };
        Counter::from_arc(total)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// One bridge's counters, as `metrics` handles registered with its own [`EmfRecorder`].
pub struct Metrics {
    recorder: EmfRecorder,
    pub processed: Counter,
    pub duplicates: Counter,
    pub gaps: Counter,
    pub replays_requested: Counter,
    pub missed_events: Counter,
    pub s3_objects: Counter,
    pub eventbridge_entries: Counter,
    pub eventbridge_failed_entries: Counter,
    pub decode_errors: Counter,
    pub aws_errors: Counter,
    pub claim_conflicts: Counter,
    pub claim_takeovers: Counter,
    pub acked_messages: Counter,
    pub verified: Counter,
    pub unverified: Counter,
    pub incorrect: Counter,
    pub corrected: Counter,
    pub dead_lettered: Counter,
    pub failures_stored: Counter,
    pub anomalies: Counter,
    pub missed_records_announced: Counter,
    pub quarantines_announced: Counter,
    pub ingested: Counter,
    pub ingest_rejected: Counter,
    pub ingest_duplicates: Counter,
    pub device_conflicts: Counter,
    /// Gateway-less devices whose stored state did not decode (moved to failures/).
    pub device_states_quarantined: Counter,
    pub http_unauthorized: Counter,
    /// The totals at the last EMF line: each line carries the difference, while the
    /// counters themselves only grow (the monitor reads them too).
    emitted: Mutex<HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.snapshot()).finish()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = EmfRecorder::default();
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let c = |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &meta);
        Metrics {
            processed: c(PROCESSED),
            duplicates: c(DUPLICATES),
            gaps: c(GAPS),
            replays_requested: c(REPLAYS_REQUESTED),
            missed_events: c(MISSED_EVENTS),
            s3_objects: c(S3_OBJECTS),
            eventbridge_entries: c(EVENTBRIDGE_ENTRIES),
            eventbridge_failed_entries: c(EVENTBRIDGE_FAILED_ENTRIES),
            decode_errors: c(DECODE_ERRORS),
            aws_errors: c(AWS_ERRORS),
            claim_conflicts: c(CLAIM_CONFLICTS),
            claim_takeovers: c(CLAIM_TAKEOVERS),
            acked_messages: c(ACKED_MESSAGES),
            verified: c(VERIFIED),
            unverified: c(UNVERIFIED),
            incorrect: c(INCORRECT),
            corrected: c(CORRECTED),
            dead_lettered: c(DEAD_LETTERED),
            failures_stored: c(FAILURES_STORED),
            anomalies: c(ANOMALIES),
            missed_records_announced: c(MISSED_RECORDS_ANNOUNCED),
            quarantines_announced: c(QUARANTINES_ANNOUNCED),
            ingested: c(INGESTED),
            ingest_rejected: c(INGEST_REJECTED),
            ingest_duplicates: c(INGEST_DUPLICATES),
            device_conflicts: c(DEVICE_CONFLICTS),
            device_states_quarantined: c(DEVICE_STATES_QUARANTINED),
            http_unauthorized: c(HTTP_UNAUTHORIZED),
            recorder,
            emitted: Mutex::default(),
        }
    }

    /// The total of the counter `name` (0 for a name that is not a counter).
    pub fn get(&self, name: &str) -> u64 {
        self.recorder.total(name)
    }

    /// Current totals (for tests, the bench and the shutdown log line).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.recorder.totals()
    }

    /// One EMF document with the counts since the last call, or None if nothing was counted.
    pub fn take_emf(&self, namespace: &str, mode: &str, now_ms: i64) -> Option<Value> {
        let mut values = Map::new();
        let mut defs = Vec::new();
        let mut emitted = self.emitted.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, total) in self.recorder.totals() {
            let last = emitted.insert(name.clone(), total).unwrap_or(0);
            defs.push(json!({"Name": name, "Unit": "Count"}));
            values.insert(name, json!(total - last.min(total)));
        }
        if values.values().all(|v| v == &json!(0)) {
            return None;
        }
        let verified = values[VERIFIED].as_u64().unwrap_or(0);
        if verified > 0 {
            let rate = values[INCORRECT].as_u64().unwrap_or(0) as f64 * 100.0 / verified as f64;
            defs.push(json!({"Name": DISCREPANCY_RATE, "Unit": "Percent"}));
            values.insert(DISCREPANCY_RATE.into(), json!(rate));
        }
        let mut doc = Map::new();
        doc.insert(
            "_aws".into(),
            json!({
                "Timestamp": now_ms,
                "CloudWatchMetrics": [{
                    "Namespace": namespace,
                    "Dimensions": [["Service", "Mode"]],
                    "Metrics": defs,
                }],
            }),
        );
        doc.insert("Service".into(), json!("cloud-bridge"));
        doc.insert("Mode".into(), json!(mode));
        doc.extend(values);
        Some(Value::Object(doc))
    }

    /// Writes one EMF line to stdout (if enabled and anything was counted).
    pub fn flush(&self, cfg: &MetricsConfig, mode: &str) {
        if cfg.emf == EmfTarget::Off {
            return;
        }
        if let Some(doc) = self.take_emf(&cfg.namespace, mode, crate::now_ms()) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{doc}");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_document_shape_and_reset() {
        let m = Metrics::default();
        assert!(m.take_emf("NS", "service", 1).is_none());
        m.processed.increment(5);
        m.duplicates.increment(2);
        let doc = m.take_emf("NS", "service", 1_000).unwrap();
        assert_eq!(doc["_aws"]["Timestamp"], 1_000);
        assert_eq!(doc["_aws"]["CloudWatchMetrics"][0]["Namespace"], "NS");
        assert_eq!(doc["processed"], 5);
        assert_eq!(doc["duplicates"], 2);
        assert_eq!(doc["Service"], "cloud-bridge");
        let names: Vec<_> = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect();
        for n in [
            PROCESSED,
            DUPLICATES,
            GAPS,
            REPLAYS_REQUESTED,
            S3_OBJECTS,
            EVENTBRIDGE_FAILED_ENTRIES,
        ] {
            assert!(names.iter().any(|x| x == n), "{n}");
        }
        assert!(m.take_emf("NS", "service", 2).is_none(), "counts reset");
        m.processed.increment(1);
        let doc = m.take_emf("NS", "service", 3).unwrap();
        assert_eq!(doc["processed"], 1, "each line carries the difference");
        assert_eq!(m.get(PROCESSED), 6, "totals only grow");
    }

    #[test]
    fn two_bridges_in_one_process_count_apart() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.verified.increment(3);
        a.incorrect.increment(1);
        assert_eq!((a.get(VERIFIED), b.get(VERIFIED)), (3, 0));
        let doc = a.take_emf("NS", "lambda", 1).unwrap();
        assert!((doc[DISCREPANCY_RATE].as_f64().unwrap() - 100.0 / 3.0).abs() < 1e-9);
    }
}
