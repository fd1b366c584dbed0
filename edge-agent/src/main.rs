//! `edge-agent`: the command line of the gateway agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_agent::config::AgentConfig;
use edge_agent::{agent, cli, telemetry};

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Gateway agent: MQTT ingest, verification, calculation and a durable outbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (SIGTERM/SIGINT drain and exit 0).
    Run {
        #[arg(long, env = "EDGE_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config; prints the problem with the field path, exit 2 when bad.
    CheckConfig {
        #[arg(long, env = "EDGE_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Outbox depth, uplink, DLQ, rates and the last error (running or stopped agent).
    Status {
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: cli::StoreArgs,
    },
    /// Follow the running agent: each result and DLQ entry as it is committed (JSON lines
    /// with --json), until interrupted.
    Tap {
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// DLQ entries only.
        #[arg(long)]
        dlq: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: cli::StoreArgs,
    },
    /// Inspect the outbox (results waiting for the cloud).
    Outbox {
        #[command(subcommand)]
        command: cli::OutboxCommand,
    },
    /// The local dead-letter queue: list, show, retry, export, purge, stats (running or
    /// stopped agent).
    Dlq {
        #[command(subcommand)]
        command: cli::DlqCommand,
    },
    /// Missed events: device sequence gaps still open after `pipeline.missed_after_s`
    /// (running or stopped agent).
    Missed {
        #[command(subcommand)]
        command: cli::MissedCommand,
    },
    /// Devices allowed on the embedded endpoint with `auth = "password"`: add, list, remove,
    /// rotate (running or stopped agent).
    Device {
        #[command(subcommand)]
        command: cli::device::DeviceCommand,
    },
    /// The store itself: `check` (the start-up probe), `salvage` (export a damaged one), `import` (into this store).
    Store {
        #[command(subcommand)]
        command: cli::StoreCommand,
    },
    /// The whole pipeline on this machine, no cloud account: simulated devices → this agent →
    /// an in-process cloud broker → cloud-bridge → a local directory with S3's layout. Prints
    /// a live summary every 2 s and a final one.
    #[cfg(feature = "demo-alias")]
    #[command(disable_help_flag = true)]
    Demo {
        /// Passed on to `edge-demo` (`edge-agent demo --help` shows its options).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => return check_config(config),
        Command::Status { store, json } => return finish(cli::status(&store, json)),
        Command::Tap {
            event_type,
            device,
            dlq,
            json,
            store,
        } => {
            let filter = edge_agent::tap::TapFilter {
                event_type,
                device,
                dlq,
            };
            return finish(cli::tap(&store, filter, json));
        }
        Command::Outbox { command } => return finish(cli::outbox(command)),
        Command::Dlq { command } => return finish(cli::dlq(command)),
        Command::Missed { command } => return finish(cli::missed(command)),
        Command::Store { command } => return finish(cli::store(command)),
        Command::Device { command } => return finish(cli::device::device(command)),
        #[cfg(feature = "demo-alias")]
        Command::Demo { args } => demo(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A field-tech command's outcome: its own exit code, or 1 with the error on stderr.
fn finish(outcome: anyhow::Result<ExitCode>) -> ExitCode {
    outcome.unwrap_or_else(|e| {
        eprintln!("edge-agent: {e:#}");
        ExitCode::FAILURE
    })
}

fn check_config(path: PathBuf) -> ExitCode {
    match AgentConfig::load(&path) {
        Ok(cfg) => {
            let types = cfg.engine.event_types.len();
            println!("{}: ok ({types} event types)", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-agent: invalid config: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = match AgentConfig::load(&path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("edge-agent: invalid config: {e}");
            std::process::exit(2);
        }
    };
    telemetry::init_logs(&cfg.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-agent")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run_with(
        cfg,
        agent::Hooks {
            config_path: Some(path),
            ..agent::Hooks::default()
        },
    ))
}

/// `edge-agent demo …` runs `edge-demo …` from beside this binary (crate `demo/`): the demo
/// needs the cloud tier, which the gateway binary must not carry.
#[cfg(feature = "demo-alias")]
fn demo(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("locating this binary")?;
    let demo = exe.with_file_name("edge-demo");
    if !demo.exists() {
        anyhow::bail!(
            "the demo is its own binary, and {} is not there: run `cargo run -p demo -- …` \
             (or `cargo build` the workspace, then `edge-agent demo` finds it)",
            demo.display()
        );
    }
    let err = std::process::Command::new(&demo).args(args).exec();
    Err(err).with_context(|| format!("running {}", demo.display()))
}
