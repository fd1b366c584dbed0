//! The admin socket inside `edge-agent run`.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{AdminError, MAX_REQUEST, Reply, Request, authorized, socket_path};
use crate::dlq::{self, DlqConfig};
use crate::pipeline::AdminCall;
use crate::status::{self, Live, Sources};
use crate::store::outbox::Outbox;
use crate::store::{StoreError, StoreReader};
use crate::uplink::LinkStatus;

/// What the admin socket serves from.
pub struct Server {
    pub reader: StoreReader,
    /// DLQ writes go to the pipeline thread.
    pub calls: mpsc::Sender<AdminCall>,
    pub live: Arc<Live>,
    pub outbox: Outbox,
    pub dlq: DlqConfig,
    /// The uplink's state, when it is enabled.
    pub uplink: Option<LinkStatus>,
    /// What the embedded endpoint refused.
    pub refused: crate::ingest::Refused,
    /// Committed results and DLQ entries, for `tap`.
    pub tap: crate::tap::Tap,
    /// Cancelled when the agent stops: ends the taps.
    pub stop: CancellationToken,
}

/// Binds `<data_dir>/admin.sock`, mode 0600. Call with the store open: its lock proves that no
/// other agent uses this data dir, so a socket file already there is stale (a crash) and goes.
pub fn bind(data_dir: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed a stale admin socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("admin socket: cannot remove {}", path.display()));
        }
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("admin socket: cannot listen on {}", path.display()))?;
    // Connections in the moment before this are still checked by peer uid.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("admin socket: cannot chmod 0600 {}", path.display()))?;
    Ok((listener, path))
}

impl Server {
    /// Serves until `shutdown`, then removes the socket file.
    pub async fn serve(self, listener: UnixListener, path: PathBuf, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let own_uid = nix::unistd::geteuid().as_raw();
        let sampler = {
            let live = Arc::clone(&me.live);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    live.sample();
                }
            })
        };
        tracing::info!(path = %path.display(), "admin socket ready");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = Arc::clone(&me);
            tokio::spawn(async move {
                if let Err(e) = me.connection(stream, own_uid).await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
        sampler.abort();
        let _ = std::fs::remove_file(&path);
    }

    async fn connection(
        self: Arc<Self>,
        stream: tokio::net::UnixStream,
        own_uid: u32,
    ) -> std::io::Result<()> {
        let cred = stream.peer_cred()?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        let peer_uid = cred.uid();
        if !authorized(peer_uid, own_uid) {
            tracing::warn!(
                uid = peer_uid,
                pid = cred.pid(),
                "admin socket: refused a connection from another user"
            );
            let refusal = Reply::Error(format!(
                "refused: uid {peer_uid} may not use the agent's admin socket (only uid {own_uid}, \
                 the agent's user, and root may)"
            ));
            return tokio::task::spawn_blocking(move || {
                // Take the request first, so the client is not cut off mid-write.
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut ignored = String::new();
                let _ = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut ignored);
                write_line(&mut &stream, &refusal)
            })
            .await
            .map_err(std::io::Error::other)?;
        }
        // Reads scan sled and writes wait for the pipeline: a blocking thread per connection
        // (a technician's command, not a hot path).
        tokio::task::spawn_blocking(move || self.handle(stream))
            .await
            .map_err(std::io::Error::other)?
    }

    fn handle(&self, stream: std::os::unix::net::UnixStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = String::new();
        BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
        let mut out = BufWriter::new(&stream);
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                return write_line(&mut out, &Reply::Error(format!("bad request: {e}")));
            }
        };
        tracing::debug!(?req, "admin request");
        let reply = match req {
            Request::DlqExport { filter } => return self.export(&filter, &mut out),
            Request::Tap { filter } => return self.stream_tap(&filter, &stream, &mut out),
            Request::Status => answer(status::report(Sources {
                reader: &self.reader,
                outbox: Some(self.outbox.depth()),
                dlq: Some(&self.dlq),
                live: Some(&self.live),
                uplink: Some(match &self.uplink {
                    Some(link) => status::UplinkInfo::of(&link.get()),
                    None => status::UplinkInfo::state("not configured"),
                }),
                refused: Some(&self.refused),
            })),
            Request::DlqList { filter } => answer(dlq::list(&self.reader, &filter)),
            Request::MissedList { filter } => answer(self.reader.missed_list(&filter)),
            Request::DlqShow { id } => answer(dlq::show(&self.reader, id)),
            Request::DlqStats => answer(dlq::stats(&self.reader, Some(&self.dlq))),
            Request::DlqRetry { select } => answer(self.call(|tx| AdminCall::Retry(select, tx))),
            Request::DlqPurge { select } => answer(self.call(|tx| AdminCall::Purge(select, tx))),
        };
        let reply = match reply {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Error(e.to_string()),
        };
        write_line(&mut out, &reply)
    }

    /// Hands a DLQ write to the pipeline thread and waits for its answer.
    fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> AdminCall,
    ) -> Result<T, AdminError> {
        let (tx, rx) = oneshot::channel();
        self.calls
            .blocking_send(make(tx))
            .map_err(|_| AdminError::ShuttingDown)?;
        Ok(rx
            .blocking_recv()
            .map_err(|_| AdminError::PipelineStopped)??)
    }

    fn export(&self, filter: &dlq::Filter, out: &mut impl Write) -> std::io::Result<()> {
        let unfiltered = dlq::Filter {
            limit: filter.limit,
            ..dlq::Filter::default()
        } == *filter;
        let total = match self.reader.counters() {
            Ok(c) if unfiltered => Ok(c.dlq_entries.min(filter.limit.unwrap_or(usize::MAX) as u64)),
            Ok(_) => dlq::list(
                &self.reader,
                &dlq::Filter {
                    limit: Some(0),
                    ..filter.clone()
                },
            )
            .map(|l| l.matching.min(filter.limit.unwrap_or(usize::MAX) as u64)),
            Err(e) => Err(e),
        };
        let total = match total {
            Ok(t) => t,
            Err(e) => return write_line(out, &Reply::Error(e.to_string())),
        };
        write_line(out, &Reply::Ok(serde_json::json!({ "total": total })))?;
        let mut buf = Vec::with_capacity(1024);
        let result = dlq::export(&self.reader, filter, |entry| {
            buf.clear();
            serde_json::to_writer(&mut buf, entry)?;
            buf.push(b'\n');
            out.write_all(&buf)
        });
        match result {
            Ok(count) => write_line(out, &Reply::End { count }),
            Err(dlq::ExportError::Io(e)) => Err(e),
            Err(e) => write_line(out, &Reply::Error(e.to_string())),
        }
    }
}

impl Server {
    /// `tap`: one `{"tapping": true}` line, then a line per matching committed item, until
    /// the client goes (the next write fails) or the agent stops. A client too slow to keep
    /// up gets `{"lagged": n}` for what it missed.
    fn stream_tap(
        &self,
        filter: &crate::tap::TapFilter,
        stream: &std::os::unix::net::UnixStream,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        use tokio::sync::broadcast::error::RecvError;
        let mut rx = self.tap.subscribe();
        // A client that stops reading must not hold a thread forever.
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        write_line(out, &Reply::Ok(serde_json::json!({ "tapping": true })))?;
        out.flush()?;
        let rt = tokio::runtime::Handle::current();
        loop {
            let next = rt.block_on(async {
                tokio::select! {
                    r = rx.recv() => Some(r),
                    _ = self.stop.cancelled() => None,
                }
            });
            let line = match next {
                None | Some(Err(RecvError::Closed)) => return Ok(()),
                Some(Err(RecvError::Lagged(n))) => serde_json::json!({ "lagged": n }),
                Some(Ok(t)) if filter.matches(&t) => crate::tap::line(&t),
                Some(Ok(_)) => continue,
            };
            write_line(out, &Reply::Ok(line))?;
            out.flush()?;
        }
    }
}

/// A request's outcome as the `ok` value of its reply.
fn answer<T: serde::Serialize>(
    outcome: Result<T, impl Into<AdminError>>,
) -> Result<serde_json::Value, AdminError> {
    Ok(serde_json::to_value(outcome.map_err(Into::into)?)?)
}

fn write_line(out: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, reply)?;
    out.write_all(b"\n")?;
    out.flush()
}
