//! Getting what is readable out of a damaged store and into a sound one.
//!
//! [`StoreReader::salvage`] writes each readable outbox result and DLQ entry of a store (one
//! the agent moved to `quarantine/`, say) as a JSON line; [`Store::import`] adds such lines to
//! another store. Imported results re-enter the outbox under new `edge_seq`s (the new store
//! has its own numbering); the cloud keeps an `event_id` only once, so a result that was
//! delivered before the damage is not stored twice. DLQ entries get new ids. A line the store
//! already holds (same `event_id`; a DLQ entry with the same topic, payload and first arrival)
//! is skipped, so an import that is run again, or cut short and rerun, adds nothing twice.

use std::collections::HashSet;
use std::io::BufRead;

use proto::{DlqEntry, EventResult};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, StoreReader, key};

/// One salvaged record: `{"outbox": result}` or `{"dlq": entry}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Salvaged {
    Outbox(EventResult),
    Dlq(DlqEntry),
}

/// What `store salvage` exported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SalvageReport {
    pub exported: u64,
    pub unreadable: u64,
}

/// What `store import` added.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    pub results: u64,
    pub dlq: u64,
    /// Lines the store already held.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {line}: not a salvaged record ({source})")]
    Line {
        line: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading the salvaged records: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Records per commit: an import of a large outbox neither holds it all in memory nor loses
/// what was committed when it is cut short.
const IMPORT_CHUNK: usize = 1000;

/// Identifies a DLQ entry across stores (its id is the store's own).
type DlqIdentity = (String, Vec<u8>, i64);

fn dlq_identity(e: &DlqEntry) -> DlqIdentity {
    (e.topic.clone(), e.payload.clone(), e.first_seen)
}

impl StoreReader {
    /// Every outbox result and DLQ entry that can still be read, one [`Salvaged`] JSON line
    /// each; unreadable records are counted, not fatal.
    pub fn salvage(&self, out: &mut dyn std::io::Write) -> std::io::Result<SalvageReport> {
        let mut report = SalvageReport::default();
        for kv in self.tree.iter() {
            let Ok((k, v)) = kv else {
                // sled cannot step past a record it cannot read.
                report.unreadable += 1;
                break;
            };
            let record = match k.first() {
                Some(&key::OUTBOX) => proto::wire::decode(&v).map(Salvaged::Outbox),
                Some(&key::DLQ) => proto::wire::decode(&v).map(Salvaged::Dlq),
                _ => continue,
            };
            match record {
                Ok(record) => {
                    serde_json::to_writer(&mut *out, &record)?;
                    out.write_all(b"\n")?;
                    report.exported += 1;
                }
                Err(_) => report.unreadable += 1,
            }
        }
        Ok(report)
    }
}

impl Store {
    /// Adds salvaged records (the lines [`StoreReader::salvage`] writes) to this store, in
    /// durable commits of [`IMPORT_CHUNK`] records. A line that is not a record stops the
    /// import before anything of its chunk is written, naming the line.
    pub fn import(&mut self, lines: impl BufRead) -> Result<ImportReport, ImportError> {
        let mut results: HashSet<String> = HashSet::new();
        for r in self.outbox(0) {
            results.insert(r?.event_id);
        }
        let mut entries: HashSet<DlqIdentity> = HashSet::new();
        for e in self.dlq(0) {
            entries.insert(dlq_identity(&e?));
        }
        let mut report = ImportReport::default();
        let mut commit = self.begin();
        for (n, line) in lines.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str(&line).map_err(|source| ImportError::Line {
                line: n as u64 + 1,
                source,
            })?;
            match record {
                Salvaged::Outbox(r) if results.insert(r.event_id.clone()) => {
                    commit.push_result(r);
                    report.results += 1;
                }
                Salvaged::Dlq(e) if entries.insert(dlq_identity(&e)) => {
                    commit.push_dlq(e);
                    report.dlq += 1;
                }
                _ => report.skipped += 1,
            }
            if commit.results().len() + commit.dlq().len() == IMPORT_CHUNK {
                self.commit(&commit)?;
                commit = self.begin();
            }
        }
        if !commit.is_empty() {
            self.commit(&commit)?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{dlq_entry, result};

    fn filled(dir: &std::path::Path) -> Store {
        let mut store = Store::open(dir).unwrap();
        let mut c = store.begin();
        c.push_result(result("m1", 1));
        c.push_result(result("m1", 2));
        c.push_dlq(dlq_entry("not JSON"));
        store.commit(&c).unwrap();
        store
    }

    #[test]
    fn salvaged_records_import_into_a_fresh_store_once() {
        let old = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        let exported = filled(old.path()).reader().salvage(&mut lines).unwrap();
        assert_eq!(
            exported,
            SalvageReport {
                exported: 3,
                unreadable: 0
            }
        );

        let new = tempfile::tempdir().unwrap();
        let mut store = Store::open(new.path()).unwrap();
        // The fresh store already took a result of its own.
        let mut c = store.begin();
        c.push_result(result("m1", 3));
        store.commit(&c).unwrap();

        let report = store.import(lines.as_slice()).unwrap();
        assert_eq!(
            report,
            ImportReport {
                results: 2,
                dlq: 1,
                skipped: 0
            }
        );
        let outbox: Vec<(u64, u64)> = store
            .outbox(0)
            .map(|r| r.unwrap())
            .map(|r| (r.edge_seq, r.seq))
            .collect();
        assert_eq!(
            outbox,
            [(1, 3), (2, 1), (3, 2)],
            "imported results are numbered after the new store's own"
        );
        let dlq: Vec<DlqEntry> = store.dlq(0).map(|e| e.unwrap()).collect();
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].reason, "not JSON");

        let again = store.import(lines.as_slice()).unwrap();
        assert_eq!(
            again,
            ImportReport {
                results: 0,
                dlq: 0,
                skipped: 3
            }
        );
        assert_eq!(store.counters().next_edge_seq, 4);
    }

    #[test]
    fn a_line_that_is_no_record_names_itself_and_writes_nothing_of_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let good = serde_json::to_string(&Salvaged::Outbox(result("m1", 1))).unwrap();
        let input = format!("{good}\n\n{{\"outbox\": 3}}\n");
        match store.import(input.as_bytes()) {
            Err(ImportError::Line { line: 3, .. }) => {}
            other => panic!("expected an error at line 3, got {other:?}"),
        }
        assert_eq!(store.outbox(0).count(), 0);
    }
}
