//! store-engines: measures the candidate storage engines for the edge agent's store.
//!
//! ```text
//! store-engines bench  --engine E --dir D --batch N --seconds S   one line of figures
//! store-engines write  --engine E --dir D [--batch N]              commits forever, "acked <seq>"
//! store-engines verify --engine E --dir D [--acked SEQ]            exit 0 iff nothing acked is lost
//! store-engines engines                                            the engines built in
//! ```
//!
//! `write` prints `acked <seq>` (the highest sequence number of the batch) only after the
//! commit returned, i.e. once the engine says it is durable; a power-cut driver kills it, cuts
//! the filesystem, and asks `verify` whether every record up to the last acked one survived.

mod engines;

use std::collections::HashMap;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use engines::Commit;

/// Bytes per outbox record, about a CBOR-encoded result.
const RECORD_BYTES: usize = 300;
/// Devices the device-state updates rotate over.
const DEVICES: u64 = 64;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("store-engines: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct Args {
    cmd: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut it = std::env::args().skip(1);
        let cmd = it
            .next()
            .context("missing subcommand (bench|write|verify|engines)")?;
        let mut flags = HashMap::new();
        while let Some(flag) = it.next() {
            let Some(name) = flag.strip_prefix("--") else {
                bail!("unexpected argument {flag:?}");
            };
            let value = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            flags.insert(name.to_string(), value);
        }
        Ok(Args { cmd, flags })
    }

    fn get(&self, name: &str) -> Result<&str> {
        self.flags
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("missing --{name}"))
    }

    fn num(&self, name: &str, default: Option<u64>) -> Result<u64> {
        match (self.flags.get(name), default) {
            (Some(v), _) => v.parse().with_context(|| format!("--{name} {v:?}")),
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("missing --{name}"),
        }
    }
}

fn run() -> Result<ExitCode> {
    let args = Args::parse()?;
    match args.cmd.as_str() {
        "engines" => {
            println!("{}", engines::names().join(" "));
            Ok(ExitCode::SUCCESS)
        }
        "bench" => bench(
            args.get("engine")?,
            &PathBuf::from(args.get("dir")?),
            args.num("batch", None)?,
            Duration::from_secs(args.num("seconds", Some(10))?),
        ),
        "write" => write(
            args.get("engine")?,
            &PathBuf::from(args.get("dir")?),
            args.num("batch", Some(16))?,
        ),
        "verify" => {
            let acked = match args.flags.get("acked") {
                Some(v) => Some(v.parse::<u64>().with_context(|| format!("--acked {v:?}"))?),
                None => None,
            };
            verify(args.get("engine")?, &PathBuf::from(args.get("dir")?), acked)
        }
        other => bail!("unknown subcommand {other:?}"),
    }
}

/// The record stored under `seq`: its number, then bytes derived from it, so `verify` can tell
/// a record that survived whole from a torn or stale one.
fn record(seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_BYTES);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend((8..RECORD_BYTES).map(|i| (seq as u8).wrapping_mul(31) ^ i as u8));
    v
}

/// Commits one batch of `n` records starting at `first`; returns the next sequence number.
fn commit_batch(store: &mut dyn engines::Store, first: u64, n: u64) -> Result<u64> {
    let records: Vec<(u64, Vec<u8>)> = (first..first + n).map(|s| (s, record(s))).collect();
    let next = first + n;
    // The device's state: its last sequence number and some calculation state, ~64 bytes.
    let mut state = next.to_be_bytes().to_vec();
    state.resize(64, 0xa5);
    store.commit(&Commit {
        records: &records,
        device: (first % DEVICES) as u32,
        state: &state,
        next_seq: next,
    })?;
    Ok(next)
}

/// Peak resident set size of this process, in MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn bench(engine: &str, dir: &Path, batch: u64, seconds: Duration) -> Result<ExitCode> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut store = engines::open(engine, dir)?;
    let mut next = store.scan()?.next_seq.unwrap_or(0);
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < seconds {
        let t = Instant::now();
        next = commit_batch(store.as_mut(), next, batch)?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    let commits = latencies.len() as f64;
    println!(
        "engine={engine} batch={batch} commits={} seconds={elapsed:.1} commits_s={:.1} \
         events_s={:.0} p50_ms={:.2} p99_ms={:.2} peak_rss_mb={:.1}",
        latencies.len(),
        commits / elapsed,
        commits * batch as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        peak_rss_mib(),
    );
    Ok(ExitCode::SUCCESS)
}

fn write(engine: &str, dir: &Path, batch: u64) -> Result<ExitCode> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut store = engines::open(engine, dir)?;
    let mut next = store.scan()?.next_seq.unwrap_or(0);
    let stdout = std::io::stdout();
    loop {
        let first = next;
        next = commit_batch(store.as_mut(), first, batch)?;
        let mut out = stdout.lock();
        writeln!(out, "acked {}", next - 1)?;
        out.flush()?;
    }
}

/// Opens the store and checks it against what was acknowledged. Prints one `verify ...` line
/// (for the driver) after the human-readable findings.
fn verify(engine: &str, dir: &Path, acked: Option<u64>) -> Result<ExitCode> {
    // Quiet the default hook: the panic is reported below as the store failing to open.
    std::panic::set_hook(Box::new(|_| {}));
    let scanned = catch_unwind(AssertUnwindSafe(|| {
        engines::open(engine, dir).and_then(|s| s.scan())
    }));
    let scan = match scanned {
        Ok(Ok(scan)) => scan,
        Ok(Err(e)) => {
            println!("FAIL: store would not open: {e:#}");
            println!("verify ok=0 opened=0 records=0 missing=0");
            return Ok(ExitCode::FAILURE);
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            println!("FAIL: store would not open: panic: {msg}");
            println!("verify ok=0 opened=0 records=0 missing=0");
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut problems = Vec::new();
    // Keys are unique, so "exactly once" means: contiguous from 0 and each record intact.
    let mut expected = 0u64;
    let mut gaps = 0u64;
    for (seq, value) in &scan.records {
        if *seq != expected {
            if gaps == 0 {
                problems.push(format!("gap: expected seq {expected}, found {seq}"));
            }
            gaps += 1;
        }
        if *value != record(*seq) {
            problems.push(format!("record {seq} damaged ({} bytes)", value.len()));
        }
        expected = seq + 1;
    }
    let present = scan.records.len() as u64;
    let missing = match acked {
        Some(a) => {
            let wanted = a + 1;
            let have = scan.records.iter().filter(|(s, _)| *s < wanted).count() as u64;
            if have < wanted {
                let first = (0..wanted)
                    .zip(
                        scan.records
                            .iter()
                            .map(|(s, _)| *s)
                            .chain(std::iter::repeat(u64::MAX)),
                    )
                    .find(|(want, got)| want != got)
                    .map_or(0, |(want, _)| want);
                problems.push(format!(
                    "lost {} acked records (acked up to {a}, first missing {first})",
                    wanted - have
                ));
            }
            wanted - have
        }
        None => 0,
    };
    // The counter is committed in the same batch as the records: if they disagree, a batch
    // was applied in part.
    if scan.next_seq.unwrap_or(0) != present {
        problems.push(format!(
            "counter says {} records, outbox holds {present} (batch applied in part)",
            scan.next_seq.unwrap_or(0)
        ));
    }
    let ok = problems.is_empty();
    if ok {
        println!(
            "ok: {present} records, seq 0..{present} without gap, acked {}",
            acked.map_or("none".into(), |a| a.to_string())
        );
    }
    for p in &problems {
        println!("FAIL: {p}");
    }
    println!(
        "verify ok={} opened=1 records={present} missing={missing}",
        u8::from(ok)
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
