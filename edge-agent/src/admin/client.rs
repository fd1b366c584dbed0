//! The CLI's side of the admin socket.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;

use super::{Reply, Request, socket_path};
use crate::dlq::Filter;

pub struct Client {
    path: PathBuf,
    /// The connection opened by [`Client::connect`], used by the first request.
    first: Option<UnixStream>,
}

impl Client {
    /// Connects to the running agent's admin socket; `None` when no agent answers there (no
    /// socket, or a stale one left by a crash).
    pub fn connect(data_dir: &Path) -> anyhow::Result<Option<Client>> {
        let path = socket_path(data_dir);
        match UnixStream::connect(&path) {
            Ok(s) => Ok(Some(Client {
                path,
                first: Some(s),
            })),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                bail!(
                    "permission denied on the agent's admin socket {}: run this as {} or root",
                    path.display(),
                    owner(&path)
                )
            }
            Err(e) => Err(e).with_context(|| format!("connecting to {}", path.display())),
        }
    }

    fn send(&mut self, req: &Request) -> anyhow::Result<BufReader<UnixStream>> {
        let stream = match self.first.take() {
            Some(s) => s,
            None => UnixStream::connect(&self.path)
                .with_context(|| format!("connecting to {}", self.path.display()))?,
        };
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        // A failed write is reported only if no answer follows (a refusal may come first).
        if let Err(e) = (&stream).write_all(&line) {
            let mut r = BufReader::new(stream);
            let mut answer = String::new();
            if r.read_line(&mut answer).unwrap_or(0) > 0
                && let Ok(Reply::Error(msg)) = serde_json::from_str::<Reply>(&answer)
            {
                bail!("{msg}");
            }
            return Err(e).context("sending the request to the agent");
        }
        Ok(BufReader::new(stream))
    }

    fn reply(r: &mut BufReader<UnixStream>) -> anyhow::Result<Reply> {
        let mut line = String::new();
        r.read_line(&mut line)
            .context("reading the agent's answer")?;
        if line.is_empty() {
            bail!("the agent closed the admin connection without answering");
        }
        serde_json::from_str(&line).context("the agent's answer is not a reply")
    }

    /// One request, one typed answer; the agent's error message becomes the error.
    pub fn request<T: DeserializeOwned>(&mut self, req: &Request) -> anyhow::Result<T> {
        let mut r = self.send(req)?;
        match Self::reply(&mut r)? {
            Reply::Ok(v) => serde_json::from_value(v).context("unexpected answer from the agent"),
            Reply::Error(e) => bail!("{e}"),
            Reply::End { .. } => bail!("unexpected end of answer from the agent"),
        }
    }

    /// `dlq export`: `total` once, then every entry's JSON line; returns the count.
    pub fn export(
        &mut self,
        filter: &Filter,
        total: impl FnOnce(u64),
        mut line: impl FnMut(&str) -> std::io::Result<()>,
    ) -> anyhow::Result<u64> {
        let mut r = self.send(&Request::DlqExport {
            filter: filter.clone(),
        })?;
        match Self::reply(&mut r)? {
            Reply::Ok(v) => total(v["total"].as_u64().unwrap_or(0)),
            Reply::Error(e) => bail!("{e}"),
            Reply::End { .. } => bail!("unexpected end of answer from the agent"),
        }
        let mut buf = String::new();
        loop {
            buf.clear();
            if r.read_line(&mut buf)? == 0 {
                bail!("the agent closed the connection in the middle of the export");
            }
            // Entries are objects with an "id"; the stream ends with a Reply line.
            if !buf.starts_with("{\"id\":") {
                match serde_json::from_str::<Reply>(&buf) {
                    Ok(Reply::End { count }) => return Ok(count),
                    Ok(Reply::Error(e)) => bail!("{e}"),
                    _ => {}
                }
            }
            line(buf.trim_end_matches('\n')).context("writing the export")?;
        }
    }
}

impl Client {
    /// `tap`: `started` once the agent taps, then every line it streams, until it stops or
    /// `each` fails (the reader went).
    pub fn tap(
        &mut self,
        filter: &crate::tap::TapFilter,
        started: impl FnOnce(),
        mut each: impl FnMut(serde_json::Value) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let mut started = Some(started);
        let mut r = self.send(&Request::Tap {
            filter: filter.clone(),
        })?;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).context("reading the tap")? == 0 {
                return Ok(()); // the agent stopped
            }
            match serde_json::from_str::<Reply>(&line).context("the agent's tap line")? {
                Reply::Ok(v) if v.get("tapping").is_some() => {
                    if let Some(f) = started.take() {
                        f();
                    }
                }
                Reply::Ok(v) => match each(v) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(e).context("writing the tap"),
                },
                Reply::Error(e) => bail!("{e}"),
                Reply::End { .. } => return Ok(()),
            }
        }
    }
}

/// "user edge-agent (uid 998)", for messages about the socket's owner.
fn owner(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => match nix::unistd::User::from_uid(m.uid().into()) {
            Ok(Some(u)) => format!("user {} (uid {})", u.name, m.uid()),
            _ => format!("uid {}", m.uid()),
        },
        Err(_) => "the agent's user".into(),
    }
}
