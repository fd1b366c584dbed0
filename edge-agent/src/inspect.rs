//! Read-only commands over the store: `status`, `outbox list`, `dlq list|show`.
//!
//! They open the store directly, so they work while the agent is stopped; while it runs, sled's
//! lock makes them fail with a message that says so.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use proto::timestamp::format_rfc3339;

use crate::config::AgentConfig;
use crate::store::Store;

#[derive(Args)]
pub struct StoreArgs {
    /// Agent config (its `data_dir` is used).
    #[arg(long, env = "EDGE_AGENT_CONFIG", conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// Data directory, when no config is given.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Store> {
        let dir = match &self.config {
            Some(path) => AgentConfig::load(path)?.data_dir,
            None => self.data_dir.clone(),
        };
        if !dir.join("store").exists() {
            anyhow::bail!("no store under {} (has the agent run here?)", dir.display());
        }
        Ok(Store::open(&dir)?)
    }
}

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Results in edge_seq order.
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
pub enum DlqCommand {
    /// Dead-lettered messages, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

pub fn status(args: &StoreArgs, json: bool) -> anyhow::Result<()> {
    let store = args.open()?;
    let c = store.counters();
    if json {
        let doc = serde_json::json!({
            "outbox": { "entries": c.outbox_entries, "bytes": c.outbox_bytes },
            "dlq": { "entries": c.dlq_entries },
            "next_edge_seq": c.next_edge_seq,
            "agent": "stopped",
        });
        println!("{doc}");
    } else {
        println!("agent        stopped (store opened directly)");
        println!(
            "outbox       {} entries, {} bytes",
            c.outbox_entries, c.outbox_bytes
        );
        println!("dlq          {} entries", c.dlq_entries);
        println!("next seq     {}", c.next_edge_seq);
    }
    Ok(())
}

pub fn outbox(cmd: OutboxCommand) -> anyhow::Result<()> {
    let OutboxCommand::List {
        store,
        from,
        limit,
        json,
    } = cmd;
    let store = store.open()?;
    let results = store
        .outbox(from)
        .take(limit.unwrap_or(usize::MAX))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &results)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{:>8}  {:<24}  {:<12}  {:>8}  {:<8}  RESULT",
            "EDGE_SEQ", "EVENT_ID", "TYPE", "SEQ", "STATUS"
        )?;
        for r in &results {
            let result = serde_json::to_string(&r.result)?;
            writeln!(
                out,
                "{:>8}  {:<24}  {:<12}  {:>8}  {:<8}  {}",
                r.edge_seq,
                r.event_id,
                r.event_type,
                r.seq,
                format!("{:?}", r.status).to_lowercase(),
                result
            )?;
        }
    }
    Ok(())
}

pub fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    let DlqCommand::List { store, limit, json } = cmd;
    let store = store.open()?;
    let entries = store
        .dlq(0)
        .take(limit.unwrap_or(usize::MAX))
        .collect::<Result<Vec<_>, _>>()
        .context("reading the DLQ")?;
    let mut out = std::io::stdout().lock();
    if json {
        let docs: Vec<_> = entries.iter().map(|e| e.to_json()).collect();
        serde_json::to_writer(&mut out, &docs)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{:>6}  {:<24}  {:<7}  {:<16}  REASON",
            "ID", "FIRST_SEEN", "STAGE", "DEVICE"
        )?;
        for e in &entries {
            writeln!(
                out,
                "{:>6}  {:<24}  {:<7}  {:<16}  {}",
                e.id,
                format_rfc3339(e.first_seen),
                e.stage,
                e.device.as_deref().unwrap_or("-"),
                e.reason
            )?;
        }
    }
    Ok(())
}
