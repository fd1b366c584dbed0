//! Scoring shared by the labelled anomaly data sets (`anomaly_detection.rs`, `anomaly_fleet.rs`):
//! precision and recall per detector kind and per event type, printed as one table.
//!
//! - **recall** (per kind, per type): labelled episodes with a flagged event (status
//!   `anomaly`, any kind) in their detection range / episodes; "kind" counts those whose flags
//!   include the episode's own kind.
//! - **precision** (per kind): events flagged with that kind (`anomaly:{kind}:*`) that lie in a
//!   labelled window of their device / events flagged with that kind; per type: flagged events
//!   of that type in a window / flagged events of that type.

#![allow(dead_code)]

use std::ops::Range;

pub const KINDS: [&str; 3] = ["spike", "drift", "stuck"];

/// One labelled anomaly of one device.
#[derive(Debug, Clone)]
pub struct Label {
    /// Index into [`KINDS`].
    pub kind: usize,
    /// Readings in which a flag detects it.
    pub detect: Range<usize>,
    /// Readings in which a flag is a true positive.
    pub window: Range<usize>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Row {
    pub episodes: usize,
    pub detected: usize,
    pub right_kind: usize,
    pub flagged: usize,
    pub true_flagged: usize,
}

impl Row {
    pub fn precision(&self) -> f64 {
        ratio(self.true_flagged, self.flagged)
    }
    pub fn recall(&self) -> f64 {
        ratio(self.detected, self.episodes)
    }
}

/// The tallies of one data set.
#[derive(Debug, Default, Clone)]
pub struct Table {
    pub kinds: [Row; 3],
    /// By event type name, in first-seen order.
    pub types: Vec<(String, Row)>,
    pub all: Row,
    pub events: usize,
}

pub fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

/// The kinds among an event's flags (`anomaly:{kind}:{field}`).
pub fn kinds_of(flags: &[String]) -> [bool; 3] {
    let mut k = [false; 3];
    for f in flags {
        for (i, name) in KINDS.iter().enumerate() {
            if f.strip_prefix("anomaly:")
                .is_some_and(|r| r.starts_with(name) && r[name.len()..].starts_with(':'))
            {
                k[i] = true;
            }
        }
    }
    k
}

impl Table {
    fn type_row(&mut self, ty: &str) -> &mut Row {
        if let Some(i) = self.types.iter().position(|(t, _)| t == ty) {
            &mut self.types[i].1
        } else {
            self.types.push((ty.to_string(), Row::default()));
            &mut self.types.last_mut().expect("pushed").1
        }
    }

    /// Adds one device: `flags[i]` is reading i's anomaly flags (empty: not flagged or not
    /// accepted). Returns the readings flagged outside every window (for debugging).
    pub fn add(&mut self, ty: &str, flags: &[Vec<String>], labels: &[Label]) -> Vec<usize> {
        self.events += flags.len();
        let mut false_at = Vec::new();
        for l in labels {
            let hits: Vec<[bool; 3]> = l
                .detect
                .clone()
                .filter(|&i| i < flags.len() && !flags[i].is_empty())
                .map(|i| kinds_of(&flags[i]))
                .collect();
            let detected = !hits.is_empty();
            let right = hits.iter().any(|k| k[l.kind]);
            for row in [&mut self.kinds[l.kind], &mut self.all] {
                row.episodes += 1;
                row.detected += usize::from(detected);
                row.right_kind += usize::from(right);
            }
            let row = self.type_row(ty);
            row.episodes += 1;
            row.detected += usize::from(detected);
            row.right_kind += usize::from(right);
        }
        for (i, f) in flags.iter().enumerate() {
            if f.is_empty() {
                continue;
            }
            let labelled = labels.iter().any(|l| l.window.contains(&i));
            if !labelled {
                false_at.push(i);
            }
            for (k, on) in kinds_of(f).iter().enumerate() {
                if *on {
                    self.kinds[k].flagged += 1;
                    self.kinds[k].true_flagged += usize::from(labelled);
                }
            }
            self.all.flagged += 1;
            self.all.true_flagged += usize::from(labelled);
            let row = self.type_row(ty);
            row.flagged += 1;
            row.true_flagged += usize::from(labelled);
        }
        false_at
    }

    /// Sums another table into this one.
    pub fn merge(&mut self, other: &Table) {
        let add = |a: &mut Row, b: &Row| {
            a.episodes += b.episodes;
            a.detected += b.detected;
            a.right_kind += b.right_kind;
            a.flagged += b.flagged;
            a.true_flagged += b.true_flagged;
        };
        for k in 0..3 {
            add(&mut self.kinds[k], &other.kinds[k]);
        }
        for (t, r) in &other.types {
            add(self.type_row(t), r);
        }
        add(&mut self.all, &other.all);
        self.events += other.events;
    }

    /// The table as markdown rows (the README's format).
    pub fn render(&self, name: &str) -> String {
        let mut out = format!(
            "{name}: {} events\n\n| {:<16} | episodes | detected | right kind | recall | flagged | precision |\n|---|---:|---:|---:|---:|---:|---:|\n",
            self.events, "kind / type"
        );
        let line = |label: &str, r: &Row| {
            format!(
                "| {:<16} | {:>8} | {:>8} | {:>10} | {:>6.3} | {:>7} | {:>9.3} |\n",
                label,
                r.episodes,
                r.detected,
                r.right_kind,
                r.recall(),
                r.flagged,
                r.precision()
            )
        };
        for (k, r) in KINDS.iter().zip(&self.kinds) {
            out += &line(k, r);
        }
        for (t, r) in &self.types {
            out += &line(&format!("type {t}"), r);
        }
        out += &line("all", &self.all);
        out
    }
}
