//! Counters, published as CloudWatch embedded metric format (EMF) lines on stdout.
//!
//! EMF is how a Lambda publishes metrics (its stdout goes to CloudWatch Logs, which extracts
//! them) and works for the service too (CloudWatch agent or any log shipper). The emulator
//! cannot take `aws-sdk-cloudwatch` calls (shared/recipes/aws-emulator.md), and EMF needs no
//! extra API call on the hot path. Each line carries the counts since the previous line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};

use crate::config::{EmfTarget, MetricsConfig};

/// Every counter, by its EMF metric name.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Results stored in S3 for the first time.
    pub processed: AtomicU64,
    /// Results received again (edge_seq already stored, or a repeated event_id).
    pub duplicates: AtomicU64,
    /// Times a batch started past the stored sequence.
    pub gaps: AtomicU64,
    pub replays_requested: AtomicU64,
    /// Ranges given up on after the replay attempts (reported as MissedEvents).
    pub missed_events: AtomicU64,
    pub s3_objects: AtomicU64,
    pub eventbridge_entries: AtomicU64,
    /// Entries PutEvents reported as failed (each retry counts again).
    pub eventbridge_failed_entries: AtomicU64,
    /// Uplink messages that were not a valid batch (stored under `failures/`).
    pub decode_errors: AtomicU64,
    /// AWS calls that failed after the SDK's retries (the batch stays unacknowledged).
    pub aws_errors: AtomicU64,
    /// Another bridge claimed or stored the range first.
    pub claim_conflicts: AtomicU64,
    /// Stale claims of a crashed or stuck bridge taken over.
    pub claim_takeovers: AtomicU64,
    /// MQTT messages acknowledged to the broker.
    pub acked_messages: AtomicU64,
    /// Results recalculated and compared (`[verify]`).
    pub verified: AtomicU64,
    /// Results not verifiable here (previous reading unknown to this bridge).
    pub unverified: AtomicU64,
    /// Verified results found incorrectly processed (mismatch or outdated calc_version).
    pub incorrect: AtomicU64,
    /// Corrections made (pipeline, DLQ processor, correction runs).
    pub corrected: AtomicU64,
    /// Messages sent to the cloud DLQ.
    pub dead_lettered: AtomicU64,
    /// DLQ messages stored under `failures/` for a person.
    pub failures_stored: AtomicU64,
    /// Results stored with status `anomaly`.
    pub anomalies: AtomicU64,
    /// Gateways' missed-event records announced as MissedEvents (kind `device`), each once.
    pub missed_records_announced: AtomicU64,
    /// The totals at the last EMF line: each line carries the difference, while the
    /// counters themselves only grow (the monitor reads them too).
    emitted: std::sync::Mutex<Vec<u64>>,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn fields(&self) -> [(&'static str, &AtomicU64); 21] {
        [
            ("processed", &self.processed),
            ("duplicates", &self.duplicates),
            ("gaps", &self.gaps),
            ("replays_requested", &self.replays_requested),
            ("missed_events", &self.missed_events),
            ("s3_objects", &self.s3_objects),
            ("eventbridge_entries", &self.eventbridge_entries),
            (
                "eventbridge_failed_entries",
                &self.eventbridge_failed_entries,
            ),
            ("decode_errors", &self.decode_errors),
            ("aws_errors", &self.aws_errors),
            ("claim_conflicts", &self.claim_conflicts),
            ("claim_takeovers", &self.claim_takeovers),
            ("acked_messages", &self.acked_messages),
            ("verified", &self.verified),
            ("unverified", &self.unverified),
            ("incorrect", &self.incorrect),
            ("corrected", &self.corrected),
            ("dead_lettered", &self.dead_lettered),
            ("failures_stored", &self.failures_stored),
            ("anomalies", &self.anomalies),
            ("missed_records_announced", &self.missed_records_announced),
        ]
    }

    /// Current totals (for tests, the bench and the shutdown log line).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.fields()
            .iter()
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }

    /// One EMF document with the counts since the last call, or None if nothing was counted.
    pub fn take_emf(&self, namespace: &str, mode: &str, now_ms: i64) -> Option<Value> {
        let mut values = Map::new();
        let mut defs = Vec::new();
        let mut emitted = self.emitted.lock().unwrap_or_else(|p| p.into_inner());
        emitted.resize(self.fields().len(), 0);
        for (i, (name, c)) in self.fields().into_iter().enumerate() {
            let total = c.load(Ordering::Relaxed);
            let v = total - emitted[i].min(total);
            emitted[i] = total;
            defs.push(json!({"Name": name, "Unit": "Count"}));
            values.insert(name.into(), json!(v));
        }
        if values.values().all(|v| v == &json!(0)) {
            return None;
        }
        // What the monitor (and a CloudWatch alarm) watches: incorrect share of verified.
        let verified = values["verified"].as_u64().unwrap_or(0);
        if verified > 0 {
            let rate = values["incorrect"].as_u64().unwrap_or(0) as f64 * 100.0 / verified as f64;
            defs.push(json!({"Name": "discrepancy_rate", "Unit": "Percent"}));
            values.insert("discrepancy_rate".into(), json!(rate));
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
        Metrics::add(&m.processed, 5);
        Metrics::add(&m.duplicates, 2);
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
            "processed",
            "duplicates",
            "gaps",
            "replays_requested",
            "s3_objects",
            "eventbridge_failed_entries",
        ] {
            assert!(names.iter().any(|x| x == n), "{n}");
        }
        assert!(m.take_emf("NS", "service", 2).is_none(), "counts reset");
    }
}
