//! Progress of a long `anomaly train|scan` on stderr: an indicatif bar over the objects when
//! stderr is a terminal, otherwise a plain line every few seconds (logs, CI), and nothing at
//! all for library callers ([`Progress::hidden`]).

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Plain lines at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Mode {
    Hidden,
    Bar(ProgressBar),
    Plain { last: Mutex<Instant> },
}

#[derive(Debug)]
pub struct Progress {
    label: String,
    mode: Mode,
    total: AtomicU64,
    objects: AtomicU64,
    records: AtomicU64,
    started: Instant,
}

impl Progress {
    /// Reports nothing.
    pub fn hidden() -> Progress {
        Progress::with_mode("", Mode::Hidden)
    }

    /// A bar if stderr is a terminal, plain lines otherwise.
    pub fn stderr(label: &str) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:20}] {pos}/{len} objects, eta {eta}: {wide_msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            Progress::with_mode(label, Mode::Bar(bar))
        } else {
            Progress::plain(label)
        }
    }

    /// Plain lines on stderr whatever stderr is.
    pub fn plain(label: &str) -> Progress {
        Progress::with_mode(
            label,
            Mode::Plain {
                last: Mutex::new(Instant::now()),
            },
        )
    }

    fn with_mode(label: &str, mode: Mode) -> Progress {
        Progress {
            label: label.to_string(),
            mode,
            total: AtomicU64::new(0),
            objects: AtomicU64::new(0),
            records: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The number of objects to read (known after the listing).
    pub fn start(&self, objects: u64) {
        self.total.store(objects, Ordering::Relaxed);
        match &self.mode {
            Mode::Bar(b) => b.set_length(objects),
            Mode::Plain { .. } => self.line(&format!("{objects} objects to read")),
            Mode::Hidden => {}
        }
    }

    /// One more object read, with its records.
    pub fn object_done(&self, records: u64) {
        let n = self.objects.fetch_add(1, Ordering::Relaxed) + 1;
        let r = self.records.fetch_add(records, Ordering::Relaxed) + records;
        match &self.mode {
            Mode::Bar(b) => {
                b.set_position(n);
                b.set_message(format!("{r} records"));
            }
            Mode::Plain { last } => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= PLAIN_EVERY {
                    *last = Instant::now();
                    drop(last);
                    self.line(&self.status());
                }
            }
            Mode::Hidden => {}
        }
    }

    /// A phase after the reading (fitting, publishing).
    pub fn note(&self, what: &str) {
        match &self.mode {
            Mode::Bar(b) => b.set_message(what.to_string()),
            Mode::Plain { .. } => self.line(what),
            Mode::Hidden => {}
        }
    }

    pub fn finish(&self) {
        match &self.mode {
            Mode::Bar(b) => b.finish_and_clear(),
            Mode::Plain { .. } => self.line(&format!("done: {}", self.status())),
            Mode::Hidden => {}
        }
    }

    fn status(&self) -> String {
        let n = self.objects.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let pct = (n * 100).checked_div(total).unwrap_or(100);
        format!(
            "{n}/{total} objects ({pct}%), {} records, {:.1} s",
            self.records.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64()
        )
    }

    fn line(&self, what: &str) {
        let _ = writeln!(std::io::stderr(), "{}: {what}", self.label);
    }
}
