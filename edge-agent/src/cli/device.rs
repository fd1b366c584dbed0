//! `edge-agent device add|list|remove|rotate`: the device registry of `auth = "password"`.
//!
//! The registry is a file in the data dir ([`crate::devices`]), edited under a lock whether the
//! agent runs or not; a running agent sees the change at the next CONNECT. A secret is shown
//! once, when it is made, and never stored or printed again.

use std::process::ExitCode;

use clap::Subcommand;
use serde::Serialize;

use super::StoreArgs;
use crate::devices::{self, Registry};
use crate::ingest::now_ms;

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device; prints its generated secret once unless --password is given.
    Add {
        /// The device id: its MQTT user name and its `{device}` topic level.
        id: String,
        /// Use this secret (at least 12 characters) instead of a generated one.
        #[arg(long)]
        password: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The registered devices (never their secrets).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove a device: it can no longer connect, and an open connection is closed.
    Remove {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Give a device a new secret; the old one stops working for new connections at once.
    Rotate {
        id: String,
        #[arg(long)]
        password: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Serialize)]
struct Row {
    id: String,
    #[serde(with = "proto::timestamp::rfc3339")]
    added_at: i64,
    #[serde(with = "proto::timestamp::rfc3339_opt")]
    rotated_at: Option<i64>,
}

pub fn device(cmd: DeviceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DeviceCommand::Add {
            id,
            password,
            store,
        } => {
            let (dir, _) = store.load()?;
            let secret = devices::edit(&dir, |r| r.add(&id, password.as_deref(), now_ms()))?;
            announce("added", &id, password.is_none().then_some(&secret));
        }
        DeviceCommand::Rotate {
            id,
            password,
            store,
        } => {
            let (dir, _) = store.load()?;
            let secret = devices::edit(&dir, |r| r.rotate(&id, password.as_deref(), now_ms()))?;
            announce("rotated", &id, password.is_none().then_some(&secret));
        }
        DeviceCommand::Remove { id, store } => {
            let (dir, _) = store.load()?;
            devices::edit(&dir, |r| r.remove(&id))?;
            println!("removed device {id}");
        }
        DeviceCommand::List { json, store } => {
            let (dir, _) = store.load()?;
            let rows: Vec<Row> = Registry::load(&dir)?
                .devices
                .into_iter()
                .map(|(id, d)| Row {
                    id,
                    added_at: d.added_at,
                    rotated_at: d.rotated_at,
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no devices registered (edge-agent device add ID)");
            } else {
                let mut t = super::render::table(&["DEVICE", "ADDED", "SECRET CHANGED"]);
                for r in &rows {
                    t.add_row(vec![
                        r.id.clone(),
                        proto::timestamp::format_rfc3339(r.added_at),
                        r.rotated_at
                            .map_or("-".into(), proto::timestamp::format_rfc3339),
                    ]);
                }
                println!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Says what was done; a generated secret goes to stdout alone on its line, once.
fn announce(what: &str, id: &str, secret: Option<&String>) {
    match secret {
        Some(secret) => {
            eprintln!("{what} device {id}; its secret (shown only now, store it on the device):");
            println!("{secret}");
        }
        None => eprintln!("{what} device {id} with the given password"),
    }
}
