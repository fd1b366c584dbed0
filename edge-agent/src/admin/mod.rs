//! The local admin API: `edge-agent status` and `edge-agent dlq …` against a running agent.
//!
//! A Unix socket at `<data_dir>/admin.sock`, mode 0600 (owner only), and every connection's
//! peer is checked with `SO_PEERCRED`: only the agent's own user and root are served (root can
//! read the store anyway; refusing it would only lock out `sudo edge-agent …`). The check also
//! covers the moment between `bind` and `chmod`.
//!
//! Protocol: one request per connection, JSON lines. The client sends one [`Request`] line; the
//! server answers one [`Reply`] line (`{"ok": …}` or `{"error": "…"}`). `dlq_export` streams:
//! `{"ok": {"total": N}}`, then one DLQ entry (JSON object) per line, then `{"end": {"count": n}}`
//! (or `{"error": …}` if it failed midway).
//!
//! Reads (status, list, show, stats, export) read the store directly through a clone of its
//! tree; writes (retry, purge) are handed to the pipeline thread ([`crate::pipeline::AdminCall`])
//! so they go through the same engine and group commit as live traffic. A stopped agent's CLI
//! runs the same functions in-process ([`crate::cli`]).

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dlq::{Filter, Selection};
use crate::missed::MissedFilter;
use crate::store::StoreError;

/// The socket's file name in the data dir.
pub const SOCKET: &str = "admin.sock";

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    DlqList {
        filter: Filter,
    },
    DlqShow {
        id: u64,
    },
    DlqStats,
    DlqRetry {
        select: Selection,
    },
    DlqPurge {
        select: Selection,
    },
    DlqExport {
        filter: Filter,
    },
    MissedList {
        filter: MissedFilter,
    },
    /// Streams committed results and DLQ entries until the client goes (`edge-agent tap`).
    Tap {
        filter: crate::tap::TapFilter,
    },
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(serde_json::Value),
    Error(String),
    /// Closes a `dlq_export` stream.
    End {
        count: u64,
    },
}

/// Why a request failed; its text is the `{"error": …}` the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("the pipeline stopped before answering")]
    PipelineStopped,
    #[error("cannot encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Whether a peer may use the socket: the agent's own user, or root.
pub fn authorized(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_and_root_are_authorized() {
        assert!(authorized(1000, 1000));
        assert!(authorized(0, 1000));
        assert!(authorized(0, 0));
        assert!(!authorized(65534, 1000));
        assert!(!authorized(1000, 0), "root's agent serves root only");
    }

    #[test]
    fn wire_shapes() {
        let r = Request::DlqRetry {
            select: Selection {
                ids: vec![],
                all: true,
                filter: Filter {
                    reason: Some("kwh".into()),
                    ..Filter::default()
                },
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.starts_with(r#"{"op":"dlq_retry","select":{"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        assert_eq!(
            serde_json::to_string(&Reply::Error("x".into())).unwrap(),
            r#"{"error":"x"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::End { count: 3 }).unwrap(),
            r#"{"end":{"count":3}}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::Ok(serde_json::json!({"total": 1}))).unwrap(),
            r#"{"ok":{"total":1}}"#
        );
    }
}
