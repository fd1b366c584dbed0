//! systemd integration: readiness (`Type=notify`), stopping, and the watchdog.
//!
//! The unit (`cross/debian/edge-agent.service`) runs the agent as `Type=notify` with
//! `WatchdogSec=`, so systemd considers the agent started only when it says `READY=1`, and
//! restarts it when it stops saying `WATCHDOG=1`. Everything here speaks the `sd_notify`
//! datagram protocol directly (a few lines of std, no libsystemd) and is a **no-op when the
//! agent is not run by systemd** (`NOTIFY_SOCKET` unset: a terminal, the tests, a container),
//! so callers never need to check.
//!
//! When to call what (see `agent::run`):
//! 1. [`notify_ready`] once, after the store is open (device state loaded), the ingest endpoint
//!    is bound or the external broker session is up, and the metrics listener is serving —
//!    i.e. where the agent logs "edge-agent ready". Nothing that `After=edge-agent.service`
//!    should start before that point.
//! 2. [`Heartbeat`]: the pipeline thread calls [`Heartbeat::batch_started`] when it has taken a
//!    batch off the queue and [`Heartbeat::batch_done`] after that batch's commit and ack
//!    release. [`spawn_watchdog`] (a tokio task, started next to `notify_ready`) pets the
//!    watchdog every `WatchdogSec/4` **unless a batch has been in flight for longer than
//!    `WatchdogSec`**: a pipeline stuck in the engine or in a commit that never returns (a dead
//!    SD card's `fsync`, a deadlock) stops the petting and systemd restarts the agent. An idle
//!    pipeline (blocked waiting for messages) is healthy and needs no tick. Because the petting
//!    runs on the tokio runtime, a wedged runtime (ingest) stops it too.
//! 3. [`notify_stopping`] when shutdown begins (before the drain), so `systemctl` shows
//!    "deactivating" while the pipeline commits what it holds. The watchdog task keeps running
//!    during the drain, so a drain that makes progress is not killed by the watchdog
//!    (`TimeoutStopSec=` still bounds it).
//!
//! [`pet_watchdog`] and [`watchdog_interval`] are public for callers that want to pet from a
//! loop of their own.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The environment variable systemd sets to the notification socket's path (`/run/...`) or
/// abstract name (`@...`).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the agent is up (`READY=1`): store open, ingest accepting, metrics serving.
/// Call once. Under `Type=notify`, units ordered after the agent start only now, and
/// `systemctl start edge-agent` returns only now (or fails after `TimeoutStartSec=`).
pub fn notify_ready() {
    notify_logged("READY=1\nSTATUS=ready: ingesting");
}

/// Tells systemd the agent is shutting down and draining (`STOPPING=1`). Call once, when the
/// shutdown begins (SIGTERM received or ingest stopped), before the pipeline drains.
pub fn notify_stopping() {
    notify_logged("STOPPING=1\nSTATUS=draining the pipeline");
}

/// A free-form status line for `systemctl status edge-agent` (e.g. the outbox depth).
pub fn notify_status(status: &str) {
    // STATUS is one line in the protocol; a newline would start a new assignment.
    let status = status.replace('\n', " ");
    notify_logged(&format!("STATUS={status}"));
}

/// One watchdog keep-alive (`WATCHDOG=1`). Prefer [`spawn_watchdog`], which pets only while the
/// pipeline's [`Heartbeat`] is healthy. A no-op without `NOTIFY_SOCKET`.
pub fn pet_watchdog() {
    notify_logged("WATCHDOG=1");
}

/// The watchdog timeout systemd enforces on this process (`WatchdogSec=` of the unit, passed as
/// `WATCHDOG_USEC`), or `None` when no watchdog is armed for this process (not under systemd,
/// `WatchdogSec=0`, or `WATCHDOG_PID` names another process). Pet at least twice per interval.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os(NOTIFY_SOCKET)?;
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Sends one notification (`KEY=VALUE` lines) to `NOTIFY_SOCKET`. `Ok(false)` when not under
/// systemd (nothing sent), `Ok(true)` when sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        None => Ok(false),
        Some(path) if path.is_empty() => Ok(false),
        Some(path) => send_to(&path.to_string_lossy(), state).map(|()| true),
    }
}

fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        // Not fatal by itself; under Type=notify a lost READY=1 makes systemd time the start out
        // and a lost WATCHDOG=1 may restart the agent, so say why loudly.
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// Sends `state` to the notification socket `socket`: a filesystem path, or an abstract socket
/// name when it starts with `@`.
fn send_to(socket: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let sent = if let Some(name) = socket.strip_prefix('@') {
        send_abstract(&sock, name, state.as_bytes())?
    } else if socket.starts_with('/') {
        sock.send_to(state.as_bytes(), socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET}={socket:?} is neither an absolute path nor @abstract"),
        ));
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to NOTIFY_SOCKET",
        ));
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &str, msg: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(msg, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &str, _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract NOTIFY_SOCKET needs Linux",
    ))
}

/// `WATCHDOG_USEC` / `WATCHDOG_PID` as `sd_watchdog_enabled(3)` reads them.
fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok()? != my_pid
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// The pipeline's liveness, shared between the pipeline thread (which marks each batch's start
/// and end) and the watchdog task (which pets systemd only while no batch is overdue).
///
/// Cheap to clone (an `Arc`), and two relaxed atomic stores per batch: nothing on the hot path
/// makes a system call.
#[derive(Clone, Debug)]
pub struct Heartbeat(Arc<Beat>);

#[derive(Debug)]
struct Beat {
    origin: Instant,
    /// Milliseconds since `origin` (+1) when the batch in flight was taken; 0 while idle.
    busy_since: AtomicU64,
    /// Batches completed, for the log line when the watchdog gives up.
    batches: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat(Arc::new(Beat {
            origin: Instant::now(),
            busy_since: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }))
    }

    /// The pipeline took a batch off the queue and starts the engine on it.
    pub fn batch_started(&self) {
        let ms = self.0.origin.elapsed().as_millis() as u64 + 1;
        self.0.busy_since.store(ms, Ordering::Relaxed);
    }

    /// The batch is committed and its acks are released; the pipeline waits for more (idle is
    /// healthy however long it lasts).
    pub fn batch_done(&self) {
        self.0.busy_since.store(0, Ordering::Relaxed);
        self.0.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// How long the batch in flight has been running, or `None` while idle.
    pub fn busy_for(&self) -> Option<Duration> {
        match self.0.busy_since.load(Ordering::Relaxed) {
            0 => None,
            since => {
                let now = self.0.origin.elapsed().as_millis() as u64 + 1;
                Some(Duration::from_millis(now.saturating_sub(since)))
            }
        }
    }

    /// Healthy unless one batch has been in flight for longer than `limit`.
    pub fn healthy(&self, limit: Duration) -> bool {
        self.busy_for().is_none_or(|d| d <= limit)
    }

    /// Batches completed so far.
    pub fn batches(&self) -> u64 {
        self.0.batches.load(Ordering::Relaxed)
    }
}

/// Starts the watchdog task when systemd armed a watchdog for this process (see
/// [`watchdog_interval`]); `None` (and nothing started) otherwise. Must be called inside the
/// tokio runtime. The task pets every `interval/4` while `heartbeat` is healthy with the limit
/// `interval`, and stops petting (logging why, once) while a batch is overdue, so systemd
/// restarts a stuck agent between one and two intervals after the batch got stuck. Abort the
/// handle, or let the runtime end, to stop it.
pub fn spawn_watchdog(heartbeat: Heartbeat) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let socket = std::env::var(NOTIFY_SOCKET).ok()?;
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog armed"
    );
    Some(tokio::spawn(watchdog_loop(heartbeat, interval, socket)))
}

async fn watchdog_loop(heartbeat: Heartbeat, interval: Duration, socket: String) {
    let mut tick = tokio::time::interval((interval / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withholding = false;
    loop {
        tick.tick().await;
        if heartbeat.healthy(interval) {
            if withholding {
                tracing::info!("pipeline progressing again; petting the systemd watchdog");
                withholding = false;
            }
            if let Err(e) = send_to(&socket, "WATCHDOG=1") {
                tracing::warn!(error = %e, "sd_notify WATCHDOG=1 failed");
            }
        } else if !withholding {
            withholding = true;
            tracing::error!(
                busy_ms = heartbeat.busy_for().unwrap_or_default().as_millis() as u64,
                batches = heartbeat.batches(),
                "pipeline stuck on one batch; no longer petting the systemd watchdog (systemd will restart the agent)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(dir: &std::path::Path) -> (UnixDatagram, String) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (sock, path.display().to_string())
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, path) = listener(dir.path());
        send_to(&path, "READY=1\nSTATUS=ready").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=ready");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("edge-agent-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        send_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn rejects_a_relative_socket_and_reports_a_missing_one() {
        assert!(send_to("relative/sock", "READY=1").is_err());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody-listens").display().to_string();
        assert!(send_to(&missing, "READY=1").is_err());
    }

    #[test]
    fn watchdog_env_as_sd_watchdog_enabled_reads_it() {
        let s = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), s);
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), s);
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }

    #[test]
    fn heartbeat_is_healthy_when_idle_and_overdue_when_a_batch_hangs() {
        let hb = Heartbeat::new();
        assert!(hb.healthy(Duration::ZERO), "idle forever is healthy");
        hb.batch_started();
        assert!(hb.healthy(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!hb.healthy(Duration::from_millis(10)), "overdue batch");
        hb.batch_done();
        assert!(hb.healthy(Duration::ZERO));
        assert_eq!(hb.batches(), 1);
    }

    #[tokio::test]
    async fn watchdog_pets_while_healthy_and_withholds_while_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, path) = listener(dir.path());
        sock.set_nonblocking(true).unwrap();
        let hb = Heartbeat::new();
        let interval = Duration::from_millis(200);
        let task = tokio::spawn(watchdog_loop(hb.clone(), interval, path));

        let drain = |sock: &UnixDatagram| {
            let mut buf = [0u8; 64];
            let mut pets = 0;
            while let Ok(n) = sock.recv(&mut buf) {
                assert_eq!(&buf[..n], b"WATCHDOG=1");
                pets += 1;
            }
            pets
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(drain(&sock) >= 2, "pets about every interval/4 while idle");

        // A batch that never finishes: after `interval` the petting stops.
        hb.batch_started();
        tokio::time::sleep(interval + Duration::from_millis(100)).await;
        drain(&sock);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(drain(&sock), 0, "no pets while the batch is overdue");

        // The batch completes: petting resumes.
        hb.batch_done();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(drain(&sock) >= 1, "petting resumes");
        task.abort();
    }
}
