//! The `cloud-bridge` command line: `run`, `lambda`, `provision`, `check-config`, `dlq`,
//! `correct`, `api-key`, `anomaly train|scan`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloud_bridge::config::{Config, LogConfig};
use cloud_bridge::render;
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
    /// The bridge as a long-running service (MQTT shared subscription, and the HTTP listener
    /// for gateway-less devices when `[http]` is configured).
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
    /// Gateway-less devices that went silent: declare their gaps open longer than
    /// `ingest.missed_after_s`, publish what a crashed instance left unpublished (what `run`
    /// does every `ingest.sweep_every_s`, and the Lambda on its `IngestSweep` schedule).
    Sweep {
        #[arg(long, short)]
        config: PathBuf,
        /// Most devices to visit (the rest stay due for the next sweep).
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// A new API key for a gateway-less device: prints the key (give it to the device) and
    /// the line for the `http.api_keys` file (only the hash is stored).
    ApiKey {
        #[arg(long)]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// The anomaly model: train it from the stored history, rescore the history with it.
    Anomaly {
        #[command(subcommand)]
        command: AnomalyCommand,
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

/// Where the history and the models are: the config's bucket, or a local directory.
#[derive(clap::Args)]
struct Store {
    #[arg(long, short)]
    config: PathBuf,
    /// Read and write a local backend directory (the demo's cloud) instead of S3.
    #[arg(long, value_name = "DIR")]
    local: Option<PathBuf>,
    /// First date partition (dt=YYYY-MM-DD), inclusive.
    #[arg(long, value_name = "YYYY-MM-DD")]
    since: Option<String>,
    /// Last date partition, inclusive.
    #[arg(long, value_name = "YYYY-MM-DD")]
    until: Option<String>,
    /// Only this event type.
    #[arg(long = "type", value_name = "T")]
    event_type: Option<String>,
    /// Print one JSON summary on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AnomalyCommand {
    /// Fit a model per event type on {prefix}events/ and store {prefix}models/anomaly/{type}.json.
    Train {
        #[command(flatten)]
        store: Store,
    },
    /// Rescore stored history with the stored models: counts per type, top anomalies.
    Scan {
        #[command(flatten)]
        store: Store,
        /// Anomalies listed (most unusual first).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Send an AnomalyDetected event per anomaly found.
        #[arg(long)]
        publish: bool,
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
    // Lambda's provided.al2023 runtime starts `/var/task/bootstrap` (this binary, see
    // cross/build.sh) with no arguments: that is `cloud-bridge lambda`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 1 && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        args.push("lambda".into());
    }
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(cfg) => {
                // The credential files are read at start-up; check them here too.
                if let Some(h) = &cfg.http
                    && let Err(e) = cloud_bridge::ingest::auth::Auth::load(h)
                {
                    eprintln!("cloud-bridge: invalid config: {}: {e:#}", config.display());
                    return ExitCode::from(2);
                }
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
        Command::ApiKey { device, json } => match cloud_bridge::ingest::auth::new_key(&device) {
            Ok((key, line)) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "device": device, "key": key, "line": line })
                    );
                } else {
                    println!(
                        "key:  {key}\nline: {line}\n(add the line to the http.api_keys file; the key is not stored anywhere)"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cloud-bridge api-key: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Lambda { config } => {
            // The deployed stack names its resources: CLOUD_BRIDGE_BUCKET etc. override the
            // packaged file's (cloud-bridge/deploy/template.yaml sets them).
            let cfg = match load(&config).and_then(|c| {
                c.with_env(|k| std::env::var(k).ok()).map_err(|e| {
                    eprintln!("cloud-bridge: invalid config: {}: {e}", config.display());
                    ExitCode::from(2)
                })
            }) {
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
                move |p, _| async move {
                    Ok(match command {
                        DlqCommand::List { limit, .. } => {
                            let l = cloud_bridge::dlq::report::list(&p, limit).await?;
                            (serde_json::to_value(&l)?, render::dlq_list(&l))
                        }
                        DlqCommand::Stats { .. } => {
                            let st = cloud_bridge::dlq::report::stats(&p, 1000).await?;
                            (serde_json::to_value(&st)?, render::dlq_stats(&st))
                        }
                        DlqCommand::Process { .. } => {
                            let d = cloud_bridge::dlq::processor::drain(&p).await?;
                            (serde_json::to_value(d)?, render::dlq_drained(&d))
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
            move |p, _| async move {
                let r = p
                    .correction_run()?
                    .days(&since, until.as_deref(), gateway.as_deref(), "cli")
                    .await?;
                let text = render::correction_run(&r);
                Ok((serde_json::to_value(r)?, text))
            },
            json,
        ),
        Command::Sweep {
            config,
            limit,
            json,
        } => tool(
            &config,
            "sweep",
            move |p, _| async move {
                let ingest = p
                    .ingest
                    .clone()
                    .context("[ingest]: required to sweep gateway-less devices")?;
                let r = ingest.sweep(cloud_bridge::now_ms(), limit).await?;
                let text = format!(
                    "{} devices due: {} gaps declared missed, {} events published, {} busy{}\n",
                    r.due,
                    r.declared,
                    r.published,
                    r.busy,
                    if r.more {
                        " (more are due: run again)"
                    } else {
                        ""
                    }
                );
                Ok((serde_json::to_value(r)?, text))
            },
            json,
        ),
        Command::Provision { config, json } => tool(
            &config,
            "provision",
            move |p, aws| async move {
                let report = cloud_bridge::provision::provision(&p.cfg, &aws).await?;
                let mut text = String::new();
                for (what, v) in report.as_object().into_iter().flatten() {
                    text.push_str(&format!(
                        "{what} {}: {}\n",
                        v["name"].as_str().unwrap_or(""),
                        v["state"].as_str().unwrap_or("")
                    ));
                }
                Ok((report, text))
            },
            json,
        ),
        Command::Anomaly { command } => {
            let (store, what) = match &command {
                AnomalyCommand::Train { store } => (store, "train"),
                AnomalyCommand::Scan { store, .. } => (store, "scan"),
            };
            let cfg = match load(&store.config) {
                Ok(c) => Arc::new(c),
                Err(code) => return code,
            };
            cloud_bridge::init_logging(&LogConfig {
                level: "warn".into(),
                ..cfg.log.clone()
            });
            match runtime().block_on(anomaly::run(cfg, command)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("cloud-bridge anomaly {what}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

mod anomaly {
    //! `anomaly train|scan`: the library's `anomaly::{train, scan}` and their summaries.

    use std::process::ExitCode;
    use std::sync::Arc;

    use anyhow::{Context as _, bail};
    use cloud_bridge::anomaly::history::DateRange;
    use cloud_bridge::anomaly::progress::Progress;
    use cloud_bridge::anomaly::scan::ScanOptions;
    use cloud_bridge::anomaly::train::TrainOptions;
    use cloud_bridge::anomaly::{self as an, AnomalyModels};
    use cloud_bridge::backend::{EventPublisher, ObjectStore};
    use cloud_bridge::config::Config;
    use serde_json::json;

    use super::{AnomalyCommand, Store, render};

    pub async fn run(cfg: Arc<Config>, command: AnomalyCommand) -> anyhow::Result<ExitCode> {
        match command {
            AnomalyCommand::Train { store } => train(cfg, store).await,
            AnomalyCommand::Scan {
                store,
                limit,
                publish,
            } => scan(cfg, store, limit, publish).await,
        }
    }

    async fn backend(
        cfg: &Arc<Config>,
        store: &Store,
    ) -> anyhow::Result<(Arc<dyn ObjectStore>, Arc<dyn EventPublisher>)> {
        Ok(match &store.local {
            Some(dir) => (
                Arc::new(cloud_bridge::backend::local::LocalObjects::new(dir)?),
                Arc::new(cloud_bridge::backend::local::LocalEvents::new(
                    &dir.join("eventbridge"),
                    &cfg.aws.source,
                    &cfg.aws.event_bus,
                )?),
            ),
            None => {
                let aws = cloud_bridge::backend::aws::Aws::connect(&cfg.aws).await;
                (
                    Arc::new(cloud_bridge::backend::aws::S3Objects::new(
                        aws.s3.clone(),
                        cfg.aws.bucket.clone(),
                    )),
                    Arc::new(cloud_bridge::backend::aws::EventBridge::new(
                        aws.eventbridge,
                        Arc::clone(cfg),
                        Arc::new(cloud_bridge::metrics::Metrics::default()),
                    )),
                )
            }
        })
    }

    fn range(store: &Store) -> anyhow::Result<DateRange> {
        Ok(DateRange::new(
            store.since.as_deref(),
            store.until.as_deref(),
        )?)
    }

    async fn train(cfg: Arc<Config>, store: Store) -> anyhow::Result<ExitCode> {
        let range = range(&store)?;
        let (objects, _) = backend(&cfg, &store).await?;
        let a = &cfg.anomaly;
        let opts = TrainOptions {
            range,
            event_type: store.event_type.clone(),
            fit: a.fit_params(),
            exclude: a.exclude_fields.clone(),
            max_samples: a.max_samples,
            concurrency: a.read_concurrency,
        };
        let progress = Progress::stderr("anomaly train");
        let report = an::train::train(&objects, &cfg.aws.prefix, &opts, &progress).await;
        progress.finish();
        let report = report?;
        if store.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", render::trained(&report, &objects.location()));
        }
        for t in report.types.iter().filter(|t| t.error.is_some()) {
            eprintln!(
                "cloud-bridge anomaly train: {}: no model: {}",
                t.event_type,
                t.error.as_deref().unwrap_or("")
            );
        }
        Ok(if report.trained() == 0 {
            if report.types.is_empty() {
                eprintln!("cloud-bridge anomaly train: no results in the range");
            }
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }

    async fn scan(
        cfg: Arc<Config>,
        store: Store,
        limit: usize,
        publish: bool,
    ) -> anyhow::Result<ExitCode> {
        if store.since.is_none() {
            bail!("--since YYYY-MM-DD is required");
        }
        if publish && !cfg.sends(an::DETAIL_TYPE) {
            bail!(
                "--publish: {} is not in aws.detail_types of {}",
                an::DETAIL_TYPE,
                store.config.display()
            );
        }
        let range = range(&store)?;
        let (objects, events) = backend(&cfg, &store).await?;
        let models = AnomalyModels::load(objects.as_ref(), &cfg.aws.prefix)
            .await
            .context("loading the models")?;
        if models.is_empty() {
            bail!(
                "no models under {}/{}: run `cloud-bridge anomaly train` first",
                objects.location(),
                cloud_bridge::layout::models(&cfg.aws.prefix)
            );
        }
        if let Some(t) = &store.event_type
            && models.get(t).is_none()
        {
            bail!("--type {t}: no model for this type");
        }
        let opts = ScanOptions {
            range,
            event_type: store.event_type.clone(),
            concurrency: cfg.anomaly.read_concurrency,
        };
        let progress = Progress::stderr("anomaly scan");
        let report = an::scan::scan(
            &objects,
            &cfg.aws.prefix,
            &models,
            &opts,
            publish.then_some(events.as_ref()),
            &progress,
        )
        .await;
        progress.finish();
        let report = report?;
        if store.json {
            let mut v = serde_json::to_value(&report)?;
            v["anomalies_total"] = json!(report.anomalies.len());
            v["anomalies"] =
                serde_json::to_value(&report.anomalies[..limit.min(report.anomalies.len())])?;
            v["models"] = json!(models.types().collect::<Vec<_>>());
            println!("{v}");
        } else {
            print!(
                "{}",
                render::scanned(&report, &objects.location(), limit, publish)
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs a one-shot command over the AWS pipeline: JSON or human text on stdout.
fn tool<F, Fut>(config: &std::path::Path, name: &str, f: F, json: bool) -> ExitCode
where
    F: FnOnce(cloud_bridge::pipeline::Pipeline, cloud_bridge::backend::aws::Aws) -> Fut,
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
        let aws = cloud_bridge::backend::aws::Aws::connect(&cfg.aws).await;
        let metrics = Arc::new(cloud_bridge::metrics::Metrics::default());
        let p =
            cloud_bridge::pipeline::Pipeline::new(aws.clone(), cfg, metrics, format!("cli-{name}"));
        match f(p, aws).await {
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
