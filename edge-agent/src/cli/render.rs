//! Human output: aligned tables and key/value blocks that fit an 80-column terminal. Long
//! values (reasons) are cut to one line with an ellipsis in tables and wrapped in blocks.

use std::fmt::Write as _;
use std::time::Duration;

use comfy_table::{
    Cell, CellAlignment, ColumnConstraint, ContentArrangement, Row, Table, Width, presets,
};
use indicatif::{HumanBytes, HumanDuration};
use proto::EventResult;
use proto::timestamp::format_rfc3339;

use crate::dlq::{
    Count, DlqStats, EntryBrief, EntryView, Listing, PurgeReport, RetryOutcome, RetryReport,
};
use crate::missed::MissedListing;
use crate::status::StatusReport;

/// Everything printed fits this many columns.
pub const WIDTH: u16 = 80;

/// A borderless table, `WIDTH` wide, two spaces between columns.
pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH)
        .set_truncation_indicator("…")
        .set_header(row(header.iter().map(Cell::new).collect()));
    let n = header.len();
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i + 1 == n { 0 } else { 2 }));
    }
    t
}

/// A row cut to one line (long cells end in "…").
fn row(cells: Vec<Cell>) -> Row {
    let mut r = Row::from(cells);
    r.max_height(1);
    r
}

/// Right-aligns the columns (numbers), header included.
fn right(t: &mut Table, cols: &[usize]) {
    for &i in cols {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn fixed(t: &mut Table, col: usize, width: u16) {
    if let Some(c) = t.column_mut(col) {
        c.set_constraint(ColumnConstraint::Absolute(Width::Fixed(width)));
    }
}

fn upto(t: &mut Table, col: usize, width: u16) {
    if let Some(c) = t.column_mut(col) {
        c.set_constraint(ColumnConstraint::UpperBoundary(Width::Fixed(width)));
    }
}

fn finish(t: &Table) -> String {
    let mut s = t.trim_fmt();
    s.push('\n');
    s
}

/// `11-25 10:00` (UTC): compact, for table cells (`show` has the full time).
fn short_time(ms: i64) -> String {
    let full = format_rfc3339(ms);
    format!("{} {}", &full[5..10], &full[11..16])
}

/// `2026-11-25 10:00:05 UTC`.
fn long_time(ms: i64) -> String {
    let full = format_rfc3339(ms);
    format!("{} {} UTC", &full[..10], &full[11..19])
}

fn age(now: i64, then: i64) -> String {
    let ms = u64::try_from(now.saturating_sub(then)).unwrap_or(0);
    if ms < 1000 {
        "just now".into()
    } else {
        format!("{} ago", HumanDuration(Duration::from_millis(ms)))
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `not_authorized 12, quota_exceeded 1`.
fn by_reason(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{r} {n}")).collect();
    parts.join(", ")
}

/// Key/value lines; values wrap within `WIDTH`.
fn block(rows: &[(&str, String)]) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH);
    for (k, v) in rows {
        t.add_row(vec![Cell::new(k), Cell::new(v)]);
    }
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == 0 { 2 } else { 0 }));
    }
    finish(&t)
}

pub fn list(l: &Listing, limit: Option<usize>) -> String {
    if l.total == 0 {
        return "The DLQ is empty.\n".into();
    }
    if l.matching == 0 {
        return format!("No entries match (the DLQ holds {}).\n", l.total);
    }
    let mut t = table(&["ID", "LAST SEEN", "STAGE", "DEVICE", "TRIES", "REASON"]);
    for e in &l.entries {
        let tries = match e.auto_retry_at {
            Some(_) => format!("{}+", e.attempts),
            None => e.attempts.to_string(),
        };
        t.add_row(row(vec![
            Cell::new(e.id),
            Cell::new(short_time(e.last_seen)),
            Cell::new(e.stage),
            Cell::new(e.device.as_deref().unwrap_or("-")),
            Cell::new(tries),
            Cell::new(&e.reason),
        ]));
    }
    right(&mut t, &[0, 4]);
    upto(&mut t, 3, 14);
    let mut s = finish(&t);
    listing_footer(
        &mut s,
        l.entries.len() as u64,
        l.matching,
        l.total,
        ("entry", "entries"),
    );
    if l.entries.iter().any(|e| e.auto_retry_at.is_some()) {
        let _ = writeln!(s, "TRIES n+: an automatic retry is scheduled.");
    }
    let _ = limit;
    s
}

pub fn show(e: &EntryView) -> String {
    let retry = match e.auto_retry_at {
        Some(at) => format!("automatic, next at {}", long_time(at)),
        None => "waits for a person (edge-agent dlq retry)".into(),
    };
    let mut s = block(&[
        ("id", e.id.to_string()),
        ("stage", e.stage.to_string()),
        ("reason", e.reason.clone()),
        ("device", e.device.clone().unwrap_or_else(|| "-".into())),
        ("event", e.event_id.clone().unwrap_or_else(|| "-".into())),
        ("topic", e.topic.clone()),
        ("attempts", e.attempts.to_string()),
        ("first seen", long_time(e.first_seen)),
        ("last seen", long_time(e.last_seen)),
        ("retry", retry),
    ]);
    let pretty = (e.payload_encoding == "utf8")
        .then(|| serde_json::from_str::<serde_json::Value>(&e.payload).ok())
        .flatten()
        .and_then(|v| serde_json::to_string_pretty(&v).ok());
    match &pretty {
        Some(p) => {
            let _ = writeln!(
                s,
                "\npayload (JSON, reformatted; --json has the original bytes):"
            );
            s.push_str(p);
        }
        None => {
            let _ = writeln!(s, "\npayload ({}):", e.payload_encoding);
            s.push_str(&e.payload);
        }
    }
    s.push('\n');
    s
}

pub fn retry(r: &RetryReport, via_agent: bool) -> String {
    if r.items.is_empty() {
        return "Nothing to retry: no entry matches.\n".into();
    }
    let mut t = table(&["ID", "RESULT", "DETAIL"]);
    right(&mut t, &[0]);
    for item in &r.items {
        let (result, detail) = match &item.outcome {
            RetryOutcome::Reprocessed { event_id, edge_seq } => (
                "reprocessed",
                format!("in the outbox as edge_seq {edge_seq} ({event_id})"),
            ),
            RetryOutcome::Failed {
                stage,
                reason,
                auto_retry_at,
                ..
            } => (
                "failed",
                match auto_retry_at {
                    Some(_) => format!("{stage}: {reason} (will retry automatically)"),
                    None => format!("{stage}: {reason}"),
                },
            ),
            RetryOutcome::Duplicate { reason } => ("duplicate", format!("removed: {reason}")),
            RetryOutcome::NotFound => ("not found", "no such entry".into()),
        };
        t.add_row(row(vec![
            Cell::new(item.id),
            Cell::new(result),
            Cell::new(detail),
        ]));
    }
    let mut s = finish(&t);
    let n = |f: fn(&RetryOutcome) -> bool| r.count(f);
    let ok = n(|o| matches!(o, RetryOutcome::Reprocessed { .. }))
        + n(|o| matches!(o, RetryOutcome::Duplicate { .. }));
    let failed = n(|o| matches!(o, RetryOutcome::Failed { .. }));
    let missing = n(|o| matches!(o, RetryOutcome::NotFound));
    let _ = write!(
        s,
        "Retried {}{}: {ok} reprocessed (removed from the DLQ)",
        plural(r.items.len() as u64, "entry", "entries"),
        if via_agent {
            " in the running agent"
        } else {
            ""
        },
    );
    if failed > 0 {
        let _ = write!(s, ", {failed} failed again (kept)");
    }
    if missing > 0 {
        let _ = write!(s, ", {missing} not found");
    }
    s.push_str(".\n");
    s
}

pub fn purge(r: &PurgeReport) -> String {
    let mut s = format!(
        "Purged {}.\n",
        plural(r.purged.len() as u64, "entry", "entries")
    );
    if !r.not_found.is_empty() {
        let ids: Vec<String> = r.not_found.iter().map(u64::to_string).collect();
        let _ = writeln!(s, "Not found: {}.", ids.join(", "));
    }
    s
}

fn brief(b: &EntryBrief, now: i64) -> String {
    format!(
        "#{} {} ({}), {}, {}: {}",
        b.id,
        long_time(b.first_seen),
        age(now, b.first_seen),
        b.device.as_deref().unwrap_or("device unknown"),
        b.stage,
        b.reason
    )
}

fn counts(title: &str, counts: &[Count]) -> String {
    let mut t = table(&[title, "COUNT", "LAST SEEN (UTC)"]);
    right(&mut t, &[1]);
    for c in counts {
        t.add_row(row(vec![
            Cell::new(&c.key),
            Cell::new(c.count),
            Cell::new(short_time(c.last_seen)),
        ]));
    }
    fixed(&mut t, 1, 9);
    fixed(&mut t, 2, 15);
    finish(&t)
}

pub fn stats(st: &DlqStats, now: i64) -> String {
    let mut rows = vec![(
        "entries",
        format!(
            "{}, {}",
            plural(st.entries, "entry", "entries"),
            HumanBytes(st.bytes)
        ),
    )];
    if let (Some(n), Some(b), Some(p)) = (st.max_entries, st.max_bytes, st.full_policy) {
        rows.push((
            "cap",
            format!(
                "{:.0} % used of {n} entries or {}; when full: {}",
                (st.entries as f64 / n as f64).max(st.bytes as f64 / b as f64) * 100.0,
                HumanBytes(b),
                p.as_str()
            ),
        ));
    }
    if st.dropped_total > 0 {
        rows.push((
            "dropped",
            format!("{} evicted by the cap, ever", st.dropped_total),
        ));
    }
    if let Some(o) = &st.oldest {
        rows.push(("oldest", brief(o, now)));
    }
    if let Some(n) = &st.newest {
        rows.push(("newest", brief(n, now)));
    }
    rows.push((
        "auto-retry",
        match st.next_auto_retry {
            Some(at) => format!(
                "{} waiting, next at {}",
                plural(st.auto_retry_pending, "entry", "entries"),
                long_time(at)
            ),
            None => "none waiting (the rest wait for a person: dlq retry)".into(),
        },
    ));
    let mut s = block(&rows);
    if st.entries == 0 {
        return s;
    }
    for (title, c) in [
        ("STAGE", &st.by_stage),
        ("REASON (field or rule)", &st.by_reason),
        ("DEVICE", &st.by_device),
    ] {
        s.push('\n');
        s.push_str(&counts(title, c));
    }
    s
}

pub fn status(r: &StatusReport, now: i64) -> String {
    let agent = match (r.agent.pid, r.agent.uptime_s) {
        (Some(pid), Some(up)) => format!(
            "running (pid {pid}, up {}, v{})",
            HumanDuration(Duration::from_secs(up)),
            r.agent.version
        ),
        _ => "stopped (store opened directly)".into(),
    };
    let dlq_cap = match (r.dlq.max_entries, r.dlq.max_bytes, r.dlq.full_policy) {
        (Some(n), Some(b), Some(p)) => format!(" (cap {n} / {}, {})", HumanBytes(b), p.as_str()),
        _ => String::new(),
    };
    let mut dlq = format!(
        "{}, {}{dlq_cap}",
        plural(r.dlq.entries, "entry", "entries"),
        HumanBytes(r.dlq.bytes)
    );
    if r.dlq.auto_retry_pending > 0 {
        let _ = write!(
            dlq,
            "; {} awaiting automatic retry",
            r.dlq.auto_retry_pending
        );
    }
    if r.dlq.dropped_total > 0 {
        let _ = write!(dlq, "; {} dropped by the cap", r.dlq.dropped_total);
    }
    let mut outbox = format!(
        "{} pending, {}",
        plural(r.outbox.entries, "result", "results"),
        HumanBytes(r.outbox.bytes)
    );
    if r.outbox.dropped > 0 {
        let _ = write!(outbox, "; {} dropped by the cap", r.outbox.dropped);
    }
    if r.outbox.expired > 0 {
        let _ = write!(outbox, "; {} expired (max_age_s)", r.outbox.expired);
    }
    let mut rows = vec![
        ("agent", agent),
        ("intake", r.intake.clone()),
        ("outbox", outbox),
        ("uplink", r.uplink.state.clone()),
        ("dlq", dlq),
    ];
    if let Some(c) = &r.agent.config {
        let mut line = format!(
            "{} loaded {} ({})",
            c.hash,
            long_time(c.loaded_at),
            age(now, c.loaded_at)
        );
        if c.reloads + c.refused > 0 {
            let _ = write!(line, "; {} reloads, {} refused", c.reloads, c.refused);
        }
        if let Some(why) = &c.last_refusal {
            let _ = write!(line, "; last refused: {why}");
        }
        if !c.pending_restart.is_empty() {
            let _ = write!(
                line,
                "; at the next restart: {}",
                c.pending_restart.join(", ")
            );
        }
        rows.push(("config", line));
    }
    let refused: Vec<String> = [("TLS", &r.refused.tls), ("CONNECT", &r.refused.auth)]
        .into_iter()
        .filter(|(_, counts)| !counts.is_empty())
        .map(|(what, counts)| format!("{what}: {}", by_reason(counts)))
        .collect();
    if !refused.is_empty() {
        rows.push(("refused", refused.join("; ")));
    }
    if let Some(last) = &r.uplink.last_refusal {
        rows.push((
            "cloud refused",
            format!(
                "{}; last {} ({}) on {}: {}",
                by_reason(&r.uplink.refused),
                long_time(last.at),
                age(now, last.at),
                last.topic,
                last.reason
            ),
        ));
    }
    if let (Some(rates), Some(totals)) = (&r.rates, &r.totals) {
        rows.push((
            "rates",
            format!(
                "{}/s in, {}/s accepted, {}/s rejected (last {} s)",
                rates.ingested_per_s, rates.accepted_per_s, rates.rejected_per_s, rates.window_s
            ),
        ));
        rows.push((
            "since start",
            format!(
                "{} in, {} accepted, {} rejected, {} duplicates",
                totals.ingested, totals.accepted, totals.rejected, totals.duplicates
            ),
        ));
    }
    let m = &r.missed;
    let mut missed = format!(
        "{} ({} seqs); {} open gaps waiting",
        plural(m.records, "record", "records"),
        m.missing,
        m.open_gaps
    );
    if m.filled_late_total > 0 {
        let _ = write!(missed, "; {} arrived late", m.filled_late_total);
    }
    if m.dropped_total > 0 {
        let _ = write!(missed, "; {} dropped by the cap", m.dropped_total);
    }
    rows.push(("missed", missed));
    if r.corrected_total > 0 {
        rows.push((
            "corrected",
            format!(
                "{} made stale by a late arrival",
                plural(r.corrected_total, "result", "results")
            ),
        ));
    }
    if let Some(q) = r.quarantined.last() {
        rows.push((
            "STORE DAMAGED",
            format!(
                "{} moved aside {} ({}), agent restarted on a fresh store; `edge-agent store \
                 salvage --from {}` exports what is left. Reason: {}",
                plural(r.quarantined.len() as u64, "store", "stores"),
                long_time(q.at),
                age(now, q.at),
                q.moved_to.display(),
                q.reason
            ),
        ));
    }
    rows.push((
        "last error",
        match &r.last_error {
            Some(e) => format!("{} ({}): {}", long_time(e.at), age(now, e.at), e.what),
            None => "none".into(),
        },
    ));
    block(&rows)
}

/// `missed list`.
pub fn missed(l: &MissedListing) -> String {
    if l.total == 0 {
        return "No missed events.\n".into();
    }
    if l.matching == 0 {
        return format!("No records match (of {}).\n", l.total);
    }
    let mut t = table(&[
        "ID",
        "DEVICE",
        "SEQS",
        "COUNT",
        "LATE",
        "FIRST SEEN",
        "DECLARED",
    ]);
    for r in &l.records {
        let seqs = r
            .ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        t.add_row(row(vec![
            Cell::new(r.id),
            Cell::new(&r.device),
            Cell::new(seqs),
            Cell::new(r.count),
            Cell::new(r.filled_late),
            Cell::new(short_time(r.first_seen)),
            Cell::new(short_time(r.declared_at)),
        ]));
    }
    right(&mut t, &[0, 3, 4]);
    upto(&mut t, 1, 16);
    let mut s = finish(&t);
    listing_footer(
        &mut s,
        l.records.len() as u64,
        l.matching,
        l.total,
        ("record", "records"),
    );
    let _ = writeln!(s, "LATE: seqs that arrived after being declared missed.");
    s
}

/// How much of a filtered, limited listing is shown, and how to see more.
fn listing_footer(
    s: &mut String,
    shown: u64,
    matching: u64,
    total: u64,
    (one, many): (&str, &str),
) {
    let what = if matching == total {
        plural(total, one, many)
    } else {
        format!("{matching} matching (of {total})")
    };
    if shown < matching {
        let _ = writeln!(s, "{shown} of {what} shown, oldest first. Times UTC.");
        let _ = writeln!(s, "--limit N shows more, --limit 0 all.");
    } else {
        let _ = writeln!(s, "{what}, oldest first. Times UTC.");
    }
}

pub fn outbox(results: &[EventResult]) -> anyhow::Result<String> {
    if results.is_empty() {
        return Ok("The outbox is empty.\n".into());
    }
    let mut t = table(&["EDGE_SEQ", "EVENT_ID", "TYPE", "SEQ", "STATUS", "RESULT"]);
    right(&mut t, &[0, 3]);
    for r in results {
        t.add_row(row(vec![
            Cell::new(r.edge_seq),
            Cell::new(&r.event_id),
            Cell::new(&r.event_type),
            Cell::new(r.seq),
            Cell::new(format!("{:?}", r.status).to_lowercase()),
            Cell::new(serde_json::to_string(&r.result)?),
        ]));
    }
    upto(&mut t, 1, 20);
    Ok(finish(&t))
}

/// One `tap` line: `10:00:05.120 meter-1/a3 meter ok seq 3 cost_eur=0.07 …` (cut at 80
/// columns), `10:00:06.004 DLQ #4 meter-1 schema: …` (whole: the reason is the point), or what
/// the tap missed.
pub fn tap_line(v: &serde_json::Value) -> String {
    let time = |ms: Option<i64>| {
        ms.map(|ms| format_rfc3339(ms)[11..23].to_string())
            .unwrap_or_else(|| "--:--:--.---".into())
    };
    if let Some(r) = v.get("result") {
        let mut l = format!(
            "{} {} {} {} seq {}",
            time(r["processed_at"].as_i64()),
            r["event_id"].as_str().unwrap_or("?"),
            r["event_type"].as_str().unwrap_or("?"),
            r["status"].as_str().unwrap_or("?"),
            r["seq"]
        );
        for f in r["flags"].as_array().into_iter().flatten() {
            let _ = write!(l, " [{}]", f.as_str().unwrap_or("?"));
        }
        for (k, x) in r["result"].as_object().into_iter().flatten() {
            let _ = write!(l, " {k}={x}");
        }
        if l.chars().count() > 80 {
            l = l.chars().take(79).collect::<String>() + "…";
        }
        l
    } else if let Some(e) = v.get("dlq") {
        format!(
            "{} DLQ #{} {} {}: {}",
            time(
                e["last_seen"]
                    .as_str()
                    .and_then(|t| proto::timestamp::parse_rfc3339(t).ok())
            ),
            e["id"],
            e["device"].as_str().unwrap_or("-"),
            e["stage"].as_str().unwrap_or("?"),
            e["reason"].as_str().unwrap_or("")
        )
    } else if let Some(n) = v.get("lagged") {
        format!("… {n} items not shown: the tap fell behind")
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::FullPolicy;
    use proto::Stage;

    fn view(id: u64, device: &str, reason: &str) -> EntryView {
        EntryView {
            id,
            event_id: Some(format!("{device}/e{id}")),
            device: Some(device.into()),
            topic: format!("devices/{device}/events/meter"),
            stage: Stage::Rule,
            reason: reason.into(),
            attempts: 1,
            first_seen: 1_795_600_800_000,
            last_seen: 1_795_600_805_000,
            payload: r#"{"id":"e1"}"#.into(),
            payload_encoding: "utf8".into(),
            auto_retry_at: None,
        }
    }

    fn assert_fits(s: &str) {
        for line in s.lines() {
            assert!(
                line.chars().count() <= WIDTH as usize,
                "{} columns: {line:?}",
                line.chars().count()
            );
        }
    }

    #[test]
    fn list_fits_80_columns_and_cuts_long_reasons() {
        let long = "rule counter_monotonic: the cumulative kWh register must not decrease \
                    (energy_kwh=1100, prev.energy_kwh=1201.25) and this goes on and on";
        let l = Listing {
            total: 3,
            matching: 2,
            entries: vec![
                view(1, "meter-001", long),
                view(1234567, "a-device-with-a-very-long-name-indeed", "short"),
            ],
        };
        let s = list(&l, Some(50));
        assert_fits(&s);
        assert!(s.contains('…'), "{s}");
        assert!(s.trim_start().starts_with("ID"), "{s}");
        assert!(s.contains("2 matching (of 3), oldest first"), "{s}");
        let header = s.lines().next().unwrap();
        let row = s.lines().nth(1).unwrap();
        assert_eq!(
            header.find("REASON"),
            row.find("rule counter"),
            "columns align:\n{s}"
        );
    }

    #[test]
    fn show_wraps_the_reason() {
        let s = show(&view(7, "meter-1", &"very long reason ".repeat(12)));
        let head: String = s.split("\npayload").next().unwrap().into();
        assert_fits(&head);
        assert!(
            s.contains("\"id\": \"e1\""),
            "payload is pretty-printed: {s}"
        );
    }

    #[test]
    fn stats_fit_80_columns() {
        let count = |k: &str, n| Count {
            key: k.into(),
            count: n,
            last_seen: 1_795_600_800_000,
        };
        let st = DlqStats {
            entries: 1500,
            bytes: 3 << 20,
            max_entries: Some(100_000),
            max_bytes: Some(64 << 20),
            full_policy: Some(FullPolicy::DropOldest),
            dropped_total: 12,
            oldest: Some(EntryBrief {
                id: 1,
                first_seen: 1_795_600_000_000,
                device: Some("meter-001".into()),
                stage: Stage::Schema,
                reason: "data.energy_kwh: required field is missing and a long tail of words"
                    .into(),
            }),
            newest: None,
            auto_retry_pending: 2,
            next_auto_retry: Some(1_795_600_900_000),
            by_stage: vec![count("schema", 1000), count("rule", 500)],
            by_reason: vec![
                count(
                    "unknown event type 'a-really-long-event-type-name-from-a-misconfigured-device'",
                    900,
                ),
                count("data.energy_kwh", 600),
            ],
            by_device: vec![count("meter-001", 1500)],
        };
        let s = stats(&st, 1_795_600_900_000);
        assert_fits(&s);
        assert!(s.contains("REASON"), "{s}");
        assert!(s.contains("13 minutes ago") || s.contains("ago"), "{s}");
    }

    #[test]
    fn missed_list_fits_80_columns() {
        use crate::missed::MissedRecord;
        use engine::SeqRange;
        let mut split = MissedRecord::new(
            2,
            "a-very-long-device-identifier-0001",
            SeqRange::new(100_000, 100_900),
            1_795_600_800_000,
            1_795_601_100_000,
        );
        split.fill(SeqRange::new(100_500, 100_500));
        let l = MissedListing {
            total: 3,
            matching: 2,
            records: vec![
                MissedRecord::new(
                    1,
                    "meter-1",
                    SeqRange::new(3, 4),
                    1_795_600_800_000,
                    1_795_601_100_000,
                ),
                split,
            ],
        };
        let s = missed(&l);
        assert_fits(&s);
        assert!(s.contains("3..=4"), "{s}");
        assert!(s.contains("2 matching (of 3)"), "{s}");
        let empty = MissedListing {
            total: 0,
            matching: 0,
            records: vec![],
        };
        assert_eq!(missed(&empty), "No missed events.\n");
    }

    #[test]
    fn tap_lines_fit_80_columns() {
        let r = serde_json::json!({"result": {"processed_at": 1_764_064_805_120_i64,
            "event_id": "meter-1/a3", "event_type": "meter", "status": "ok", "seq": 3,
            "flags": ["late"], "result": {"consumption_kwh": 0.25, "cost_eur": 0.07,
            "power_w": 920.0, "avg_power_w": 15000.0}}});
        let line = tap_line(&r);
        assert!(
            line.starts_with("10:00:05.120 meter-1/a3 meter ok seq 3 [late] "),
            "{line}"
        );
        assert!(line.chars().count() <= 80, "{line}");
        let d = serde_json::json!({"dlq": {"id": 4, "device": "meter-1", "stage": "schema",
            "reason": "field 'voltage_v': 612 is above the maximum 300", "last_seen": "2025-11-25T10:00:06.004Z"}});
        assert_eq!(
            tap_line(&d),
            "10:00:06.004 DLQ #4 meter-1 schema: field 'voltage_v': 612 is above the maximum 300"
        );
        assert!(tap_line(&serde_json::json!({"lagged": 7})).contains("7 items not shown"));
    }
}
