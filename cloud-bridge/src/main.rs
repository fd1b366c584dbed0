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
    /// The cloud DLQ: what waits in the queue, what was given up on under failures/.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// A correction run: re-verify stored results and correct the incorrect ones (at most
    /// once each; safe to run on several bridges at once).
    Correct {
        #[arg(long, short)]
        config: PathBuf,
        /// First day (YYYY-MM-DD, UTC) of `events/dt=…` to go over.
        #[arg(long)]
        since: String,
        /// Last day (inclusive); default: every day from --since on.
        #[arg(long)]
        until: Option<String>,
        /// Only this gateway's objects.
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Queued messages and recent failures/ entries.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Queue depth, counts by stage and reason, failures by day.
    Stats {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run the DLQ processor once over everything queued now, then exit.
    Process {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
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
        Command::Dlq { command } => {
            let (config, json) = match &command {
                DlqCommand::List { config, json, .. }
                | DlqCommand::Stats { config, json }
                | DlqCommand::Process { config, json } => (config.clone(), *json),
            };
            tool(
                &config,
                "dlq",
                move |p| async move {
                    Ok(match command {
                        DlqCommand::List { limit, .. } => {
                            let v = cloud_bridge::dlq::report::list(&p, limit).await?;
                            (v.clone(), cloud_bridge::dlq::report::render_list(&v))
                        }
                        DlqCommand::Stats { .. } => {
                            let v = cloud_bridge::dlq::report::stats(&p, 1000).await?;
                            (v.clone(), cloud_bridge::dlq::report::render_stats(&v))
                        }
                        DlqCommand::Process { .. } => {
                            let d = cloud_bridge::dlq::processor::drain(&p).await?;
                            let v = serde_json::json!({
                                "corrected": d.corrected, "failures": d.failures,
                                "retried_later": d.retried_later,
                            });
                            let text = format!(
                                "corrected {}, stored under failures/ {}, left for a later retry {}\n",
                                d.corrected, d.failures, d.retried_later
                            );
                            (v, text)
                        }
                    })
                },
                json,
            )
        }
        Command::Correct {
            config,
            since,
            until,
            gateway,
            json,
        } => tool(
            &config,
            "correct",
            move |p| async move {
                let keys = cloud_bridge::correction::select_objects(
                    &*p.sink.objects,
                    &p.cfg.aws.prefix,
                    &since,
                    until.as_deref(),
                    gateway.as_deref(),
                )
                .await?;
                let run_id = format!("run-{}", cloud_bridge::now_ms());
                let r = cloud_bridge::correction::run_over(&p, &keys, &run_id).await?;
                let text = format!(
                    "{} objects, {} records: {} verified, {} unverifiable, {} incorrect → {} corrected, {} already corrected elsewhere, {} to the DLQ\n",
                    r.objects,
                    r.records,
                    r.verified,
                    r.unverifiable,
                    r.incorrect,
                    r.corrected,
                    r.superseded,
                    r.dead_lettered
                );
                Ok((serde_json::to_value(r)?, text))
            },
            json,
        ),
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

/// Runs a one-shot command over the AWS pipeline: JSON or human text on stdout.
fn tool<F, Fut>(config: &std::path::Path, name: &str, f: F, json: bool) -> ExitCode
where
    F: FnOnce(cloud_bridge::pipeline::Pipeline) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(serde_json::Value, String)>>,
{
    let cfg = match load(config) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    cloud_bridge::init_logging(&LogConfig {
        level: "warn".into(),
        ..cfg.log.clone()
    });
    runtime().block_on(async move {
        let aws = cloud_bridge::aws::Aws::connect(&cfg.aws).await;
        let metrics = Arc::new(cloud_bridge::metrics::Metrics::default());
        let p = cloud_bridge::pipeline::Pipeline::new(aws, cfg, metrics, format!("cli-{name}"));
        match f(p).await {
            Ok((v, text)) => {
                if json {
                    println!("{v}");
                } else {
                    print!("{text}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cloud-bridge {name}: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
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
