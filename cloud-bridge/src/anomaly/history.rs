//! Reading the stored results back: the `events/` objects of a date range (by their `dt=`
//! partition), each parsed line by line.

use std::sync::Arc;

use proto::EventResult;
use serde::Serialize;
use tracing::warn;

use super::AnomalyError;
use super::progress::Progress;
use crate::backend::ObjectStore;
use crate::layout::{self, ObjectKey};

/// Ranges from `--since` up to this many days are listed one partition at a time (cheaper than
/// listing the whole history); longer ranges, or none, list `events/` once and filter.
const MAX_DAYS_LISTED_SEPARATELY: i64 = 400;

/// Partitions `since..=until` (inclusive, `YYYY-MM-DD`), either end open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DateRange {
    pub since: Option<String>,
    pub until: Option<String>,
}

const DATE: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

/// Checks a `YYYY-MM-DD` argument.
pub fn parse_date(what: &str, s: &str) -> Result<time::Date, AnomalyError> {
    time::Date::parse(s, DATE).map_err(|e| {
        AnomalyError::InvalidArgument(format!("{what}: '{s}' is not YYYY-MM-DD ({e})"))
    })
}

impl DateRange {
    pub fn new(since: Option<&str>, until: Option<&str>) -> Result<DateRange, AnomalyError> {
        let s = since.map(|s| parse_date("--since", s)).transpose()?;
        let u = until.map(|u| parse_date("--until", u)).transpose()?;
        if let (Some(s), Some(u)) = (s, u)
            && u < s
        {
            return Err(AnomalyError::InvalidArgument(format!(
                "--until {u} is before --since {s}"
            )));
        }
        Ok(DateRange {
            since: since.map(str::to_string),
            until: until.map(str::to_string),
        })
    }

    /// Whether the partition `dt` is in the range (dates in this format sort as strings).
    pub fn contains(&self, dt: &str) -> bool {
        self.since.as_deref().is_none_or(|s| dt >= s)
            && self.until.as_deref().is_none_or(|u| dt <= u)
    }

    /// Every day of a short range; an open end is `latest` (tomorrow: a result's `dt` is
    /// its device's clock, which may run a little ahead).
    fn days(&self, latest: time::Date) -> Option<Vec<String>> {
        let s = parse_date("since", self.since.as_deref()?).ok()?;
        let u = match &self.until {
            Some(u) => parse_date("until", u).ok()?,
            None => latest,
        };
        if (u - s).whole_days() > MAX_DAYS_LISTED_SEPARATELY {
            return None;
        }
        let mut out = Vec::new();
        let mut d = s;
        while d <= u {
            out.push(d.format(DATE).expect("a date formats"));
            d = d.next_day()?;
        }
        Some(out)
    }
}

/// The NDJSON objects under `{prefix}events/` in the range, in key order.
pub async fn keys(
    objects: &dyn ObjectStore,
    prefix: &str,
    range: &DateRange,
) -> Result<Vec<String>, AnomalyError> {
    let events = layout::events(prefix);
    let tomorrow = time::OffsetDateTime::now_utc().date().next_day();
    let days = tomorrow.and_then(|t| range.days(t));
    let listings: Vec<String> = match days {
        Some(days) => days
            .iter()
            .map(|d| layout::events_of_day(prefix, d))
            .collect(),
        None => vec![events],
    };
    let mut keys = Vec::new();
    for p in listings {
        let listed = objects
            .list(&p)
            .await
            .map_err(|e| AnomalyError::store("list", &p, e))?;
        keys.extend(listed.into_iter().filter(|k| {
            k.ends_with(".ndjson")
                && ObjectKey::parse(prefix, k).is_some_and(|o| range.contains(&o.date))
        }));
    }
    keys.sort();
    Ok(keys)
}

/// What reading the history met besides results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadStats {
    pub objects: usize,
    pub records: usize,
    /// Lines that were not a result (logged, skipped).
    pub bad_lines: usize,
    /// Objects listed but gone when read (an abandoned claim's object being collected).
    pub vanished: usize,
}

/// Reads `keys` (`concurrency` at a time) and hands every result to `each` in key and line
/// order. A line that is not a result is logged and skipped; a failing read is an error.
pub async fn read(
    objects: &Arc<dyn ObjectStore>,
    keys: &[String],
    concurrency: usize,
    progress: &Progress,
    mut each: impl FnMut(&str, EventResult),
) -> Result<ReadStats, AnomalyError> {
    let mut stats = ReadStats::default();
    progress.start(keys.len() as u64);
    for window in keys.chunks(concurrency.max(1)) {
        let tasks: Vec<_> = window
            .iter()
            .map(|k| {
                let (o, k) = (Arc::clone(objects), k.clone());
                tokio::spawn(async move { o.get(&k).await })
            })
            .collect();
        for (key, task) in window.iter().zip(tasks) {
            let body = task
                .await
                .map_err(|e| AnomalyError::store("get", key, e.into()))?
                .map_err(|e| AnomalyError::store("get", key, e))?;
            let Some(body) = body else {
                stats.vanished += 1;
                progress.object_done(0);
                continue;
            };
            stats.objects += 1;
            let mut n = 0u64;
            for (i, line) in body.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<EventResult>(line) {
                    Ok(r) => {
                        n += 1;
                        each(key, r);
                    }
                    Err(e) => {
                        stats.bad_lines += 1;
                        warn!("{key}:{}: not a result: {e}", i + 1);
                    }
                }
            }
            stats.records += n as usize;
            progress.object_done(n);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_partitions() {
        let r = DateRange::new(Some("2026-11-02"), Some("2026-11-04")).unwrap();
        assert!(r.contains("2026-11-02") && r.contains("2026-11-04"));
        assert!(!r.contains("2026-11-01") && !r.contains("2026-11-05"));
        let latest = time::macros::date!(2026 - 11 - 30);
        assert_eq!(
            r.days(latest).unwrap(),
            ["2026-11-02", "2026-11-03", "2026-11-04"]
        );
        assert!(DateRange::default().contains("1999-01-01"));
        assert!(DateRange::default().days(latest).is_none());
        let open = DateRange::new(Some("2026-11-28"), None).unwrap();
        assert_eq!(open.days(latest).unwrap().len(), 3);
        let long = DateRange::new(Some("2020-01-01"), None).unwrap();
        assert!(long.days(latest).is_none(), "listed whole and filtered");
        let e = DateRange::new(Some("2026-11-5"), None).unwrap_err();
        assert!(e.to_string().starts_with("--since: '2026-11-5'"), "{e}");
        let e = DateRange::new(Some("2026-11-05"), Some("2026-11-01")).unwrap_err();
        assert!(e.to_string().contains("before"), "{e}");
    }
}
