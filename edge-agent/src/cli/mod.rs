//! The field technician's commands: `status`, `dlq list|show|retry|export|purge|stats`,
//! `missed list`, `outbox list` and `device add|list|remove|rotate` ([`device`]).
//!
//! One implementation, two transports: while the agent runs, a command goes through its admin
//! socket ([`crate::admin`]) and the agent does the work (DLQ writes on its pipeline thread);
//! while it is stopped, the command opens the store itself and runs the same functions
//! ([`crate::dlq`], [`crate::status`], [`Pipeline::retry`]) in-process. `--json` prints one JSON
//! document on stdout; otherwise output is for people and fits 80 columns.
//!
//! Exit codes: 0 done; 1 failed, or a `retry`/`purge` left some selected entries in the DLQ
//! (failed again, not found); 2 a usage error (e.g. `purge` without `--yes`).

pub mod device;
mod render;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{ArgGroup, Args, Subcommand};

use crate::admin::Request;
use crate::admin::client::Client;
use crate::config::AgentConfig;
use crate::dlq::{
    self, DlqConfig, DlqStats, EntryView, Filter, Listing, PurgeReport, RetryReport, Selection,
};
use crate::missed::{MissedFilter, MissedListing};
use crate::pipeline::Pipeline;
use crate::status::{self, Sources, StatusReport};
use crate::store::outbox::Outbox;
use crate::store::{Store, StoreError, StoreReader};

/// Where the agent's data is: `--config` (its `data_dir`) or `--data-dir`.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Agent config (its `data_dir` is used; `dlq retry` on a stopped agent needs its engine).
    #[arg(long, env = "EDGE_AGENT_CONFIG", conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// Data directory, when no config is given.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
}

/// `--reason`, `--device`, `--since`.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only entries whose reason contains this (case-insensitive), e.g. a field or rule name.
    #[arg(long)]
    reason: Option<String>,
    /// Only this device (or a prefix ending in '*', e.g. 'meter-*').
    #[arg(long)]
    device: Option<String>,
    /// Only entries last seen at or after this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long, value_parser = parse_since)]
    since: Option<i64>,
}

impl FilterArgs {
    fn filter(&self, limit: Option<usize>) -> Filter {
        Filter {
            reason: self.reason.clone(),
            device: self.device.clone(),
            since: self.since,
            limit,
        }
    }
}

fn parse_since(s: &str) -> Result<i64, String> {
    proto::timestamp::parse_rfc3339(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Results in edge_seq order (reads the store: the agent must be stopped).
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// First edge_seq to show.
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        limit: Option<usize>,
        /// One JSON document (an array) on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Open the store and read every record (the agent's start-up probe). Exit 0 when sound,
    /// 3 when another process holds it, 1 (or a crash) when it is damaged.
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Export what can still be read from a store (e.g. one moved to
    /// `data_dir/quarantine/<time>/store`) as JSON lines: `{"outbox": result}` and
    /// `{"dlq": entry}`.
    Salvage {
        /// The store directory to read (a `store` directory, e.g. from `status`).
        #[arg(long)]
        from: PathBuf,
        /// Where to write the JSON lines ('-': stdout).
        #[arg(long, default_value = "-")]
        to: PathBuf,
    },
    /// Add salvaged records (`store salvage` output) to this agent's store, the agent
    /// stopped: results re-enter the outbox under new edge_seqs (the cloud stores an event_id
    /// once), DLQ entries get new ids; records the store already holds are skipped, so a rerun
    /// adds nothing twice.
    Import {
        /// The JSON lines to read ('-': stdin).
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
pub enum MissedCommand {
    /// Sequence gaps declared missed (open longer than `pipeline.missed_after_s`), oldest
    /// first; a late arrival shrinks or splits its record.
    List {
        /// Only this device (or a prefix ending in '*', e.g. 'meter-*').
        #[arg(long)]
        device: Option<String>,
        /// Only records declared at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Most records to show (default 50 in the table, all with --json; 0 = all).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Entries shown by `dlq list` without `--limit` (human output only; `--json` lists all).
const DEFAULT_LIST_LIMIT: usize = 50;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Dead-lettered messages, oldest first (a table; --json for all fields).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Most entries to show (default 50 in the table, all with --json; 0 = all).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// One entry in full, with its original payload.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-process entries through the pipeline (after fixing the config or the device); those
    /// that succeed leave the DLQ and their result goes to the outbox.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Retry {
        /// Entry ids.
        ids: Vec<u64>,
        /// Every entry (narrow it with --reason/--device/--since).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write entries as JSON lines (one DLQ entry per line) to a file.
    Export {
        /// The file to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete entries for good (consider `dlq export` first). Needs --yes.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Purge {
        ids: Vec<u64>,
        /// Every entry (narrow it with --reason/--device/--since).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: FilterArgs,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Counts by stage, reason and device, the oldest entry, the cap: what is wrong, at a glance.
    Stats {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The agent over its socket, or the store opened here.
enum Backend {
    Agent(Client),
    Store(Box<Local>),
}

/// A stopped agent's store, opened by this process.
struct Local {
    reader: StoreReader,
    outbox: Outbox,
    dlq: Option<DlqConfig>,
    /// The config enables the uplink (for `status`).
    uplink: bool,
    /// With a config, the whole pipeline (engine included), so `retry` works; without, the
    /// store alone.
    inner: LocalInner,
}

enum LocalInner {
    Store(Box<Store>),
    Pipeline(Box<Pipeline>),
}

/// The `data_dir` of a config file that does not validate (its TOML still parses).
fn data_dir_of(path: &std::path::Path) -> Option<PathBuf> {
    let table: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
    Some(match table.get("data_dir") {
        Some(toml::Value::String(d)) => PathBuf::from(d),
        Some(_) => return None,
        None => PathBuf::from("./data"),
    })
}

impl StoreArgs {
    fn load(&self) -> anyhow::Result<(PathBuf, Option<AgentConfig>)> {
        match &self.config {
            Some(path) => {
                let cfg = AgentConfig::load(path)?;
                Ok((cfg.data_dir.clone(), Some(cfg)))
            }
            None => Ok((self.data_dir.clone(), None)),
        }
    }

    /// The running agent if it answers on its socket, else the store itself.
    /// The data dir, also from a config file that does not validate (being edited).
    fn dir(&self) -> anyhow::Result<PathBuf> {
        match self.load() {
            Ok((dir, _)) => Ok(dir),
            Err(e) => self.config.as_deref().and_then(data_dir_of).ok_or(e),
        }
    }

    fn backend(&self) -> anyhow::Result<Backend> {
        let (dir, cfg) = match self.load() {
            Ok(loaded) => loaded,
            // A config being edited (before a reload) must not lock a technician out of the
            // running agent, which answers with the config it runs.
            Err(e) => match self.config.as_deref().and_then(data_dir_of) {
                Some(dir) if let Some(client) = Client::connect(&dir)? => {
                    eprintln!(
                        "edge-agent: warning: {e:#}\n(the running agent answers, with the config it runs)"
                    );
                    return Ok(Backend::Agent(client));
                }
                _ => return Err(e),
            },
        };
        if let Some(client) = Client::connect(&dir)? {
            return Ok(Backend::Agent(client));
        }
        let mut store = open_store(&dir)?;
        let outbox_cfg = cfg.as_ref().map(|c| c.outbox.clone()).unwrap_or_default();
        let outbox = store.open_outbox(outbox_cfg)?;
        let reader = store.reader();
        let uplink = cfg.as_ref().is_some_and(|c| c.uplink.enabled);
        let (inner, dlq) = match cfg {
            Some(cfg) => {
                let engine = cfg.engine()?;
                let pipeline = Pipeline::new(
                    engine,
                    store,
                    outbox.clone(),
                    cfg.gateway_id.clone(),
                    &cfg.pipeline,
                )?
                .with_dlq(cfg.dlq.clone())?;
                (LocalInner::Pipeline(Box::new(pipeline)), Some(cfg.dlq))
            }
            None => (LocalInner::Store(Box::new(store)), None),
        };
        Ok(Backend::Store(Box::new(Local {
            reader,
            outbox,
            dlq,
            uplink,
            inner,
        })))
    }
}

fn open_store(dir: &std::path::Path) -> anyhow::Result<Store> {
    if !dir.join("store").exists() {
        bail!("no store under {} (has the agent run here?)", dir.display());
    }
    Store::open(dir).map_err(|e| match e {
        StoreError::Locked(path) => anyhow!(
            "the store at {} is in use by another process, and no agent answers on {}: an \
             agent starting or stopping, or another edge-agent command; try again in a moment",
            path.display(),
            crate::admin::socket_path(dir).display()
        ),
        other => other.into(),
    })
}

impl Backend {
    fn status(&mut self) -> anyhow::Result<StatusReport> {
        match self {
            Backend::Agent(c) => c.request(&Request::Status),
            Backend::Store(l) => Ok(status::report(Sources {
                reader: &l.reader,
                outbox: Some(l.outbox.depth()),
                dlq: l.dlq.as_ref(),
                live: None,
                uplink: l
                    .uplink
                    .then(|| status::UplinkInfo::state("enabled (agent stopped)")),
                refused: None,
            })?),
        }
    }

    fn list(&mut self, filter: &Filter) -> anyhow::Result<Listing> {
        match self {
            Backend::Agent(c) => c.request(&Request::DlqList {
                filter: filter.clone(),
            }),
            Backend::Store(l) => Ok(dlq::list(&l.reader, filter)?),
        }
    }

    fn missed(&mut self, filter: &MissedFilter) -> anyhow::Result<MissedListing> {
        match self {
            Backend::Agent(c) => c.request(&Request::MissedList {
                filter: filter.clone(),
            }),
            Backend::Store(l) => Ok(l.reader.missed_list(filter)?),
        }
    }

    fn show(&mut self, id: u64) -> anyhow::Result<Option<EntryView>> {
        match self {
            Backend::Agent(c) => c.request(&Request::DlqShow { id }),
            Backend::Store(l) => Ok(dlq::show(&l.reader, id)?),
        }
    }

    fn stats(&mut self) -> anyhow::Result<DlqStats> {
        match self {
            Backend::Agent(c) => c.request(&Request::DlqStats),
            Backend::Store(l) => Ok(dlq::stats(&l.reader, l.dlq.as_ref())?),
        }
    }

    fn retry(&mut self, select: &Selection) -> anyhow::Result<RetryReport> {
        match self {
            Backend::Agent(c) => c.request(&Request::DlqRetry {
                select: select.clone(),
            }),
            Backend::Store(l) => match &mut l.inner {
                LocalInner::Pipeline(p) => Ok(p.retry(select)?),
                LocalInner::Store(_) => bail!(
                    "dlq retry runs the engine, so with the agent stopped it needs the agent's \
                     config: pass --config FILE (or set EDGE_AGENT_CONFIG)"
                ),
            },
        }
    }

    fn purge(&mut self, select: &Selection) -> anyhow::Result<PurgeReport> {
        match self {
            Backend::Agent(c) => c.request(&Request::DlqPurge {
                select: select.clone(),
            }),
            Backend::Store(l) => match &mut l.inner {
                LocalInner::Pipeline(p) => Ok(p.purge(select)?),
                LocalInner::Store(s) => Ok(dlq::purge(s, select)?),
            },
        }
    }

    fn export(
        &mut self,
        filter: &Filter,
        total: impl FnOnce(u64),
        mut line: impl FnMut(&str) -> std::io::Result<()>,
    ) -> anyhow::Result<u64> {
        match self {
            Backend::Agent(c) => c.export(filter, total, line),
            Backend::Store(l) => {
                let unfiltered = *filter == Filter::default();
                total(if unfiltered {
                    l.reader.counters()?.dlq_entries
                } else {
                    dlq::list(
                        &l.reader,
                        &Filter {
                            limit: Some(0),
                            ..filter.clone()
                        },
                    )?
                    .matching
                });
                let mut buf = String::new();
                Ok(dlq::export(&l.reader, filter, |e| {
                    buf.clear();
                    buf.push_str(&serde_json::to_string(e)?);
                    line(&buf)
                })
                .map_err(|e| match e {
                    dlq::ExportError::Io(e) => anyhow::Error::new(e).context("writing the export"),
                    other => other.into(),
                })?)
            }
        }
    }

    fn is_agent(&self) -> bool {
        matches!(self, Backend::Agent(_))
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn print_text(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        writeln!(out)?;
    }
    Ok(())
}

/// `edge-agent status`.
pub fn status(args: &StoreArgs, json: bool) -> anyhow::Result<ExitCode> {
    let report = args.backend()?.status()?;
    if json {
        print_json(&report)?;
    } else {
        print_text(&render::status(&report, now_ms()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `edge-agent tap`: what the running agent commits, as it commits it, until interrupted.
pub fn tap(
    args: &StoreArgs,
    filter: crate::tap::TapFilter,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = args.dir()?;
    let Some(mut client) = Client::connect(&dir)? else {
        bail!(
            "no agent is running on {}: the tap shows what a running agent commits",
            dir.display()
        );
    };
    let mut out = std::io::stdout().lock();
    let started = || eprintln!("tapping the agent on {} (Ctrl-C to stop)", dir.display());
    client.tap(&filter, started, |v| {
        if json {
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", render::tap_line(&v))?;
        }
        out.flush()
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `edge-agent outbox list` (store opened directly).
pub fn outbox(cmd: OutboxCommand) -> anyhow::Result<ExitCode> {
    let OutboxCommand::List {
        store,
        from,
        limit,
        json,
    } = cmd;
    let (dir, _) = store.load()?;
    if Client::connect(&dir)?.is_some() {
        bail!(
            "the agent is running: `outbox list` reads the store directly, so stop the agent \
             first (`edge-agent status` shows the outbox depth while it runs)"
        );
    }
    let store = open_store(&dir)?;
    let results = store
        .outbox(from)
        .take(limit.unwrap_or(usize::MAX))
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&results)?;
    } else {
        print_text(&render::outbox(&results)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `edge-agent store check|salvage` (the store opened directly).
pub fn store(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Check { store } => {
            let (dir, _) = store.load()?;
            println!(
                "{} at {}",
                crate::store::quarantine::CHECK_STARTED,
                dir.join("store").display()
            );
            std::io::stdout().flush()?;
            let store = match Store::open(&dir) {
                Ok(s) => s,
                Err(StoreError::Locked(path)) => {
                    eprintln!("edge-agent: the store at {} is in use", path.display());
                    return Ok(ExitCode::from(crate::store::quarantine::CHECK_LOCKED as u8));
                }
                Err(e @ StoreError::NoSpace(_)) => {
                    eprintln!("edge-agent: {e}");
                    return Ok(ExitCode::from(
                        crate::store::quarantine::CHECK_NO_SPACE as u8,
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            let report = store.reader().check()?;
            println!(
                "store ok: {} records ({} outbox, {} dlq, {} devices), next edge_seq {}",
                report.records, report.outbox, report.dlq, report.devices, report.next_edge_seq
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Salvage { from, to } => {
            // The store is `<dir>/store`; Store::open takes `<dir>`.
            let parent = match from.file_name() {
                Some(name) if name == "store" => from.parent().unwrap_or(Path::new(".")),
                _ => bail!(
                    "--from: expected a `store` directory, got {}",
                    from.display()
                ),
            };
            let store = Store::open_for_salvage(parent)?;
            let mut out: Box<dyn Write> = if to.as_os_str() == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&to)
                        .with_context(|| format!("--to: cannot create {}", to.display()))?,
                ))
            };
            let report = store.reader().salvage(&mut out)?;
            out.flush()?;
            eprintln!(
                "salvaged {} records ({} unreadable) from {}",
                report.exported,
                report.unreadable,
                from.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Import { from, store } => {
            let (dir, _) = store.load()?;
            if Client::connect(&dir)?.is_some() {
                bail!(
                    "the agent is running on {}: stop it first (an import writes the store \
                     directly)",
                    dir.display()
                );
            }
            let mut store = open_store(&dir)?;
            let input: Box<dyn std::io::BufRead> = if from.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&from)
                        .with_context(|| format!("--from: cannot open {}", from.display()))?,
                ))
            };
            let report = store
                .import(input)
                .with_context(|| format!("importing {}", from.display()))?;
            eprintln!(
                "imported {} results and {} DLQ entries ({} already in the store) into {}",
                report.results,
                report.dlq,
                report.skipped,
                dir.join("store").display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `edge-agent missed …`.
pub fn missed(cmd: MissedCommand) -> anyhow::Result<ExitCode> {
    let MissedCommand::List {
        device,
        since,
        limit,
        json,
        store,
    } = cmd;
    let limit = match (limit, json) {
        (Some(0), _) | (None, true) => None,
        (Some(n), _) => Some(n),
        (None, false) => Some(DEFAULT_LIST_LIMIT),
    };
    let filter = MissedFilter {
        device,
        since,
        limit,
    };
    let listing = store.backend()?.missed(&filter)?;
    if json {
        print_json(&listing.records)?;
    } else {
        print_text(&render::missed(&listing))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `edge-agent dlq …`.
pub fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCommand::List {
            filter,
            limit,
            json,
            store,
        } => {
            let limit = match (limit, json) {
                (Some(0), _) | (None, true) => None,
                (Some(n), _) => Some(n),
                (None, false) => Some(DEFAULT_LIST_LIMIT),
            };
            let listing = store.backend()?.list(&filter.filter(limit))?;
            if json {
                print_json(&listing.entries)?;
            } else {
                print_text(&render::list(&listing, limit))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id, json, store } => match store.backend()?.show(id)? {
            Some(e) if json => print_json(&e).map(|()| ExitCode::SUCCESS),
            Some(e) => print_text(&render::show(&e)).map(|()| ExitCode::SUCCESS),
            None => {
                eprintln!("edge-agent: no DLQ entry {id}");
                Ok(ExitCode::FAILURE)
            }
        },
        DlqCommand::Retry {
            ids,
            all,
            filter,
            json,
            store,
        } => {
            let select = selection(ids, all, &filter)?;
            let mut backend = store.backend()?;
            let report = backend.retry(&select)?;
            if json {
                print_json(&report)?;
            } else {
                print_text(&render::retry(&report, backend.is_agent()))?;
            }
            Ok(if report.all_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DlqCommand::Purge {
            ids,
            all,
            filter,
            yes,
            json,
            store,
        } => {
            let select = selection(ids, all, &filter)?;
            if !yes {
                eprintln!(
                    "edge-agent: dlq purge deletes entries for good; add --yes to confirm \
                     (`edge-agent dlq export --out FILE` keeps a copy)"
                );
                return Ok(ExitCode::from(2));
            }
            let report = store.backend()?.purge(&select)?;
            if json {
                print_json(&report)?;
            } else {
                print_text(&render::purge(&report))?;
            }
            Ok(if report.not_found.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DlqCommand::Stats { json, store } => {
            let stats = store.backend()?.stats()?;
            if json {
                print_json(&stats)?;
            } else {
                print_text(&render::stats(&stats, now_ms()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Export { out, filter, store } => export(&store, &out, &filter.filter(None)),
    }
}

fn selection(ids: Vec<u64>, all: bool, filter: &FilterArgs) -> anyhow::Result<Selection> {
    let filter = filter.filter(None);
    if !all && filter != Filter::default() {
        bail!("--reason, --device and --since select entries with --all, not with ids");
    }
    Ok(Selection { ids, all, filter })
}

fn export(store: &StoreArgs, out: &std::path::Path, filter: &Filter) -> anyhow::Result<ExitCode> {
    let mut backend = store.backend()?;
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    // Draws on stderr only when it is a terminal; scripts see nothing but the summary.
    let bar = indicatif::ProgressBar::hidden();
    let count = backend.export(
        filter,
        |total| {
            bar.set_length(total);
            bar.set_style(
                // `wide_bar` takes what the terminal has left, so the line never wraps.
                indicatif::ProgressStyle::with_template(
                    "exporting {human_pos}/{human_len} entries [{wide_bar}] {eta} left",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        },
        |line| {
            w.write_all(line.as_bytes())?;
            w.write_all(b"\n")?;
            bar.inc(1);
            Ok(())
        },
    )?;
    w.flush()
        .and_then(|()| w.get_ref().sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    bar.finish();
    println!("exported {count} entries to {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> i64 {
    crate::ingest::now_ms()
}
