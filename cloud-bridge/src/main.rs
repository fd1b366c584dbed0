//! The `cloud-bridge` command line: `run`, `lambda`, `provision`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use cloud_bridge::config::{Config, LogConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cloud-bridge",
    version,
    about = "Cloud tier: gateway results over MQTT (or Lambda) → S3 (exactly once) and EventBridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The bridge as a long-running service (MQTT shared subscription).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The bridge as an AWS Lambda bootstrap (lambda_runtime; AWS_LAMBDA_RUNTIME_API).
    Lambda {
        #[arg(long, short, env = "CLOUD_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Create the bucket, event bus, table and queue named in the config if missing.
    Provision {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the outcome as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config; names the bad field (exit 2).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("cloud-bridge: invalid config: {e}");
        ExitCode::from(2)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => Arc::new(c),
                Err(code) => return code,
            };
            cloud_bridge::init_logging(&cfg.log);
            runtime().block_on(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(signals(shutdown.clone()));
                match cloud_bridge::service::run(cfg, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        eprintln!("cloud-bridge run: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Lambda { config } => {
            let cfg = match load(&config) {
                Ok(c) => Arc::new(c),
                Err(code) => return code,
            };
            cloud_bridge::init_logging(&cfg.log);
            match runtime().block_on(cloud_bridge::lambda::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cloud-bridge lambda: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Provision { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            cloud_bridge::init_logging(&LogConfig {
                level: "warn".into(),
                ..cfg.log.clone()
            });
            runtime().block_on(async move {
                let aws = cloud_bridge::aws::Aws::connect(&cfg.aws).await;
                match cloud_bridge::provision::provision(&cfg, &aws).await {
                    Ok(report) => {
                        if json {
                            println!("{report}");
                        } else {
                            for (what, v) in report.as_object().into_iter().flatten() {
                                println!(
                                    "{what} {}: {}",
                                    v["name"].as_str().unwrap_or(""),
                                    v["state"].as_str().unwrap_or("")
                                );
                            }
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("cloud-bridge provision: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: shutting down");
    shutdown.cancel();
}
