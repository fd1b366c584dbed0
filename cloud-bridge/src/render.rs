//! Human output of the one-shot commands (`dlq`, `correct`, `anomaly`): borderless tables
//! within 80 columns (comfy-table, as the agent's CLI), long cells cut with "…". Every report
//! is a typed value first; `--json` prints that value instead.

use std::fmt::Write as _;

use comfy_table::{Cell, CellAlignment, ContentArrangement, Row, Table, presets};

use crate::anomaly::history::DateRange;
use crate::anomaly::scan::ScanReport;
use crate::anomaly::train::TrainReport;
use crate::correction::run::RunReport;
use crate::dlq::processor::Drained;
use crate::dlq::report::{DlqStats, Listing};

/// Everything printed fits this many columns.
pub const WIDTH: u16 = 80;

/// A borderless table, `WIDTH` wide, two spaces between columns; `numbers` are the columns
/// aligned right.
fn table(header: &[&str], numbers: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH)
        .set_truncation_indicator("…")
        .set_header(header.iter().map(Cell::new).collect::<Vec<_>>());
    let n = header.len();
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i + 1 == n { 0 } else { 2 }));
        if numbers.contains(&i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Adds a row cut to one line.
fn add(t: &mut Table, cells: Vec<String>) {
    let mut r = Row::from(cells);
    r.max_height(1);
    t.add_row(r);
}

/// The table's lines, without trailing blanks, each ending in a newline.
fn finish(t: &Table) -> String {
    t.lines().fold(String::new(), |mut s, l| {
        let _ = writeln!(s, "{}", l.trim_end());
        s
    })
}

fn num(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.3}"))
}

fn range_text(r: &DateRange) -> String {
    format!(
        "dt {}..{}",
        r.since.as_deref().unwrap_or(""),
        r.until.as_deref().unwrap_or("")
    )
}

/// `cloud-bridge dlq list`.
pub fn dlq_list(l: &Listing) -> String {
    let mut s = format!("DLQ {}: {} message(s)\n", l.queue, l.messages.len());
    if !l.messages.is_empty() {
        let mut t = table(&["STAGE", "EVENT", "REASON"], &[]);
        for m in &l.messages {
            add(
                &mut t,
                vec![
                    m.stage.to_string(),
                    m.event_id.clone().unwrap_or_else(|| "-".into()),
                    m.reason.clone(),
                ],
            );
        }
        s.push_str(&finish(&t));
    }
    let _ = writeln!(s, "\nfailures/: {} shown", l.failures.len());
    if !l.failures.is_empty() {
        let mut t = table(&["STORED", "EVENT", "REASON"], &[]);
        for f in &l.failures {
            add(
                &mut t,
                vec![
                    f.stored_at.clone().unwrap_or_else(|| "-".into()),
                    f.event_id.clone().unwrap_or_else(|| "-".into()),
                    f.reason.clone().unwrap_or_default(),
                ],
            );
        }
        s.push_str(&finish(&t));
    }
    s
}

/// `cloud-bridge dlq stats`.
pub fn dlq_stats(st: &DlqStats) -> String {
    let mut s = format!(
        "DLQ {}: {} waiting, {} in flight; oldest {}\nfailures/: {}\n",
        st.queue,
        st.waiting,
        st.in_flight,
        st.oldest.as_deref().unwrap_or("-"),
        st.failures
    );
    for (title, counts) in [
        ("STAGE", &st.by_stage),
        ("REASON", &st.by_reason),
        ("FAILURES BY DAY", &st.failures_by_day),
    ] {
        if counts.is_empty() {
            continue;
        }
        let mut t = table(&["COUNT", title], &[0]);
        for (k, n) in counts {
            add(&mut t, vec![n.to_string(), k.clone()]);
        }
        s.push('\n');
        s.push_str(&finish(&t));
    }
    s
}

/// `cloud-bridge dlq process`.
pub fn dlq_drained(d: &Drained) -> String {
    format!(
        "corrected {}, stored under failures/ {}, left for a later retry {}\n",
        d.corrected, d.failures, d.retried_later
    )
}

/// `cloud-bridge correct`.
pub fn correction_run(r: &RunReport) -> String {
    format!(
        "{} objects, {} records: {} verified, {} unverifiable, {} incorrect → {} corrected, {} already corrected elsewhere, {} to the DLQ\n",
        r.objects,
        r.records,
        r.verified,
        r.unverifiable,
        r.incorrect,
        r.corrected,
        r.superseded,
        r.dead_lettered
    )
}

/// `cloud-bridge anomaly train`.
pub fn trained(r: &TrainReport, location: &str) -> String {
    let mut s = format!(
        "anomaly train: {location}, {}, {} objects, {} records ({} bad lines)\n",
        range_text(&r.range),
        r.read.objects,
        r.read.records,
        r.read.bad_lines
    );
    if let Some(dir) = r
        .types
        .iter()
        .find_map(|t| t.key.as_deref()?.rsplit_once('/'))
    {
        let _ = writeln!(s, "models stored under {}/", dir.0);
    }
    let mut t = table(
        &[
            "TYPE",
            "READ",
            "SKIPPED",
            "SAMPLES",
            "FEATURES",
            "COMPONENTS",
            "THRESHOLD",
            "MODEL",
        ],
        &[1, 2, 3, 4, 5, 6],
    );
    for ty in &r.types {
        let model = match (&ty.key, &ty.error) {
            // `{folder}/{type}.json`: the header line names the folder.
            (Some(_), _) => "stored".to_string(),
            (None, e) => format!("error: {}", e.as_deref().unwrap_or("")),
        };
        add(
            &mut t,
            vec![
                ty.event_type.clone(),
                ty.read.to_string(),
                ty.skipped.to_string(),
                ty.samples.to_string(),
                ty.features.len().to_string(),
                ty.components.to_string(),
                num(ty.threshold),
                model,
            ],
        );
    }
    s.push_str(&finish(&t));
    s
}

/// `cloud-bridge anomaly scan`: counts by type, then the `limit` highest anomalies.
pub fn scanned(r: &ScanReport, location: &str, limit: usize, publish: bool) -> String {
    let mut s = format!(
        "anomaly scan: {location}, {}, {} objects, {} records ({} bad lines)\n",
        range_text(&r.range),
        r.read.objects,
        r.read.records,
        r.read.bad_lines
    );
    let mut t = table(
        &[
            "TYPE",
            "SCANNED",
            "SCORED",
            "ANOMALIES",
            "NO MODEL",
            "THRESHOLD",
        ],
        &[1, 2, 3, 4, 5],
    );
    for (ty, c) in &r.types {
        add(
            &mut t,
            vec![
                ty.clone(),
                c.scanned.to_string(),
                c.scored.to_string(),
                c.anomalies.to_string(),
                c.no_model.to_string(),
                num(c.threshold),
            ],
        );
    }
    s.push_str(&finish(&t));
    let top = &r.anomalies[..limit.min(r.anomalies.len())];
    if !top.is_empty() {
        let _ = writeln!(s, "\ntop {} of {} anomalies:", top.len(), r.anomalies.len());
        let mut t = table(
            &[
                "EVENT",
                "TYPE",
                "SCORE",
                "THRESHOLD",
                "MOST UNUSUAL FIELD (Z)",
            ],
            &[2, 3],
        );
        for f in top {
            let why = match (&f.feature, f.z) {
                (Some(n), Some(z)) => format!("{n} ({z:+.1})"),
                _ => String::new(),
            };
            add(
                &mut t,
                vec![
                    f.event_id.clone(),
                    f.event_type.clone(),
                    format!("{:.3}", f.score),
                    format!("{:.3}", f.threshold),
                    why,
                ],
            );
        }
        s.push_str(&finish(&t));
    }
    if publish {
        let _ = writeln!(
            s,
            "\npublished {} {} events",
            r.published,
            crate::anomaly::DETAIL_TYPE
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::report::{FailureBrief, MessageBrief};
    use proto::Stage;

    #[test]
    fn long_reasons_stay_on_one_line_within_the_width() {
        let l = Listing {
            queue: "sqs://q".into(),
            messages: vec![MessageBrief {
                id: "cloud:g:1".into(),
                stage: Stage::Cloud,
                event_id: Some("meter-1/42".into()),
                device: Some("meter-1".into()),
                reason: "result mismatch: ".repeat(20),
                first_seen: "2026-12-07T00:00:00Z".into(),
                object_key: None,
                subject: None,
            }],
            failures: vec![FailureBrief {
                key: "failures/x".into(),
                reason: Some("never stored".into()),
                event_id: None,
                stored_at: Some("2026-12-07T00:00:00Z".into()),
            }],
        };
        let out = dlq_list(&l);
        assert!(out.contains("meter-1/42") && out.contains('…'), "{out}");
        assert!(
            out.lines().all(|l| l.chars().count() <= WIDTH as usize),
            "{out}"
        );
        assert_eq!(
            out.lines()
                .filter(|l| l.contains("result mismatch"))
                .count(),
            1
        );
    }
}
