//! `cloud-bridge`: the cloud tier of the pipeline.
//!
//! It will receive the results that gateways' outboxes send (MQTT service or AWS Lambda),
//! re-verify them with the shared `engine`, and forward them to EventBridge and S3. Not built
//! yet: every command says so and exits non-zero rather than pretending to work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cloud-bridge",
    version,
    about = "Cloud tier: gateway results → EventBridge and S3 (not implemented yet)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The bridge as a long-running service.
    Run,
    /// The bridge as an AWS Lambda bootstrap.
    Lambda,
    /// Create the bucket, bus, table and queues named in the config.
    Provision,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Run => "run",
        Command::Lambda => "lambda",
        Command::Provision => "provision",
    };
    eprintln!("cloud-bridge {name}: not implemented yet (the cloud tier is the next milestone)");
    ExitCode::from(3)
}
