//! The embedded MQTT 3.1.1 endpoint devices publish to (the default source).
//!
//! # Why not rumqttd
//! rumqttd's router sends the PUBACK as soon as a publish is in its in-memory log, and its
//! protocol types keep `Publish::pkid` crate-private, so it cannot hold a device's PUBACK until
//! the message's outcome is durable. This module is therefore a thin, ingest-only server on
//! rumqtt's own codec (`rumqttc::mqttbytes::v4`, public fields) and tokio:
//!
//! * CONNECT within `connect_timeout_ms`; wrong protocol → CONNACK 0x01, empty client id with
//!   `clean_session = false` or one over 256 bytes → 0x02, bad credentials → 0x04 / none when required → 0x05.
//! * CONNACK always says `session_present = false`: no server-side session is kept. A device
//!   retransmits its unacknowledged QoS 1/2 publishes after reconnecting and the engine
//!   de-duplicates them, so nothing is lost by forgetting a session.
//! * A CONNECT with the client id of a live connection closes the old one (take-over, MQTT-3.1.4-2).
//! * Keep-alive: a connection that sends nothing for 1.5 × its keep-alive is closed.
//! * PUBLISH QoS 0 → no ack; QoS 1 → PUBACK and QoS 2 → PUBREC only when the pipeline releases
//!   the [`Ack`]; PUBREL → PUBCOMP at once (the engine, not this front, de-duplicates).
//! * SUBSCRIBE → SUBACK with failure codes (0x80), UNSUBSCRIBE → UNSUBACK: this endpoint only
//!   ingests. PINGREQ → PINGRESP. DISCONNECT → close (the will, if any, is discarded).
//! * A packet larger than `max_packet_bytes`, or a PUBLISH whose topic is longer than
//!   `max_topic_bytes`, closes the connection before its body is read.
//! * At most `max_inflight` QoS 1/2 publishes per connection are read and not yet acknowledged
//!   on the wire; at the cap the connection's reads pause until its acks are written.
//! * At most `max_buffered_bytes` of topics and payloads, over all connections, are handed to
//!   the pipeline and not yet committed; a reader whose next message does not fit waits.
//! * `auth = "password"` ([`auth`]): the user name is the device id, checked against the device
//!   registry; a device may publish only under its own id (else the connection is closed).
//! * `[broker.embedded.tls]` ([`tls`]) adds a TLS listener; `auth = "certificate"` identifies a
//!   device by its client certificate (CN, else its one SAN), verified at the handshake against
//!   `tls.client_ca`, and `"password_or_certificate"` takes either. The plain listener on
//!   `listen` runs only without TLS unless `plain = true` (never with `"certificate"`). A TLS
//!   connection has the connect timeout for its handshake, then again for its CONNECT.
//!
//! # Data path
//! Each connection has a reader (this task) and a writer task. The reader reads into a
//! `BytesMut` and parses every packet buffered per read syscall; payloads are zero-copy slices
//! of that buffer. Each publish is handed to the pipeline channel; when the channel is full the
//! reader awaits the send, so a slow pipeline stops socket reads (TCP backpressure) instead of
//! buffering without bound. Responses produced while parsing one read (PINGRESP, PUBCOMP, …)
//! and the acks of one [`AckSet::release`](super::AckSet::release) are each appended to the
//! connection's output buffer as one piece; the writer swaps the buffer out and sends it with
//! one write, so several releases that land while a write is in flight share the next write.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::BytesMut;
use metrics::{Counter, Gauge};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub mod auth;
mod limits;
pub mod tls;

use auth::{DeviceAuth, Identity, Refusal, Refusals};
use limits::{MAX_CLIENT_ID_BYTES, Slot, Slots, publish_topic_len};

use super::config::EmbeddedConfig;
use super::{Ack, AckKind, Budget, Inbound, Refused, now_ms};
use crate::telemetry;

/// The kernel send buffer of a device connection. The endpoint writes only acks and pings,
/// so this is plenty; fixed, it bounds the kernel memory a client that never reads can pin
/// (autotuning would let it grow to `tcp_wmem`'s maximum, 4 MiB by default, per connection),
/// and `max_inflight` engages after a few thousand unread acks instead of a million.
const SEND_BUFFER: usize = 32 * 1024;
/// Spare capacity ensured before each socket read.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to flush its last bytes.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// How long a closing connection keeps reading (and discarding) until the peer closes too.
const LINGER: Duration = Duration::from_secs(1);

/// Runs the embedded endpoint on its listeners until `shutdown` fires.
///
/// Equivalent to [`EmbeddedServer::bind`] followed by [`EmbeddedServer::run`]; use those to learn
/// the bound address first (port 0 in tests).
pub async fn serve(
    cfg: EmbeddedConfig,
    tx: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    EmbeddedServer::bind(cfg).await?.run(tx, shutdown).await
}

/// A bound, not yet serving, embedded endpoint.
pub struct EmbeddedServer {
    /// The plain TCP listener on `listen` (off with TLS unless `plain = true`).
    listener: Option<TcpListener>,
    /// The TLS listener on `tls.listen`, and its acceptor.
    tls: Option<(TcpListener, TlsAcceptor)>,
    cfg: EmbeddedConfig,
    devices: Option<DeviceAuth>,
    refused: Refused,
}

impl EmbeddedServer {
    /// Checks the config, reads the TLS files and binds the listeners, so a bad file or a port
    /// in use stops start-up here with the field named.
    pub async fn bind(cfg: EmbeddedConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let tls = match &cfg.tls {
            None => None,
            Some(t) => {
                let acceptor = TlsAcceptor::from(tls::server_config(t, cfg.auth)?);
                let listener = TcpListener::bind(t.listen).await.with_context(|| {
                    format!(
                        "broker.embedded.tls.listen: binding the TLS listener on {}",
                        t.listen
                    )
                })?;
                Some((listener, acceptor))
            }
        };
        let listener = match cfg.serves_plain() {
            false => None,
            true => Some(TcpListener::bind(cfg.listen).await.with_context(|| {
                format!("binding the embedded MQTT endpoint on {}", cfg.listen)
            })?),
        };
        Ok(Self {
            listener,
            tls,
            cfg,
            devices: None,
            refused: Refused::default(),
        })
    }

    /// Where refused handshakes and CONNECTs are counted (`status` reads them).
    pub fn with_refused(mut self, refused: Refused) -> Self {
        self.refused = refused;
        self
    }

    /// The device registry and topic pattern the `auth` modes that identify devices check
    /// against.
    pub fn with_devices(mut self, devices: Option<DeviceAuth>) -> Self {
        self.devices = devices;
        self
    }

    /// The plain listener's address, or the TLS listener's when there is no plain one.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match (&self.listener, &self.tls) {
            (Some(l), _) | (None, Some((l, _))) => l.local_addr(),
            (None, None) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The plain listener's address, if there is one.
    pub fn plain_local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Accepts and serves connections until `shutdown` fires, then stops accepting and reading,
    /// drops every `Sender` clone, lets each connection wait (up to `shutdown_grace_ms`) until
    /// the acks it handed out are released or dropped, flushes them and closes. Returns when all
    /// connections are closed. Returns an error if the pipeline's receiver is dropped first.
    pub async fn run(
        self,
        tx: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let EmbeddedServer {
            listener,
            tls,
            cfg,
            devices,
            refused,
        } = self;
        if cfg.auth.identifies_devices() && devices.is_none() {
            anyhow::bail!(
                "broker.embedded.auth = \"{}\" needs the device registry",
                cfg.auth.as_str()
            );
        }
        let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let tls_addr = tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        describe_metrics();
        let ctx = Arc::new(Ctx {
            devices: devices.filter(|_| cfg.auth.identifies_devices()),
            slots: Slots::new(cfg.max_connections, cfg.max_connections_per_address),
            budget: Budget::new(cfg.max_buffered_bytes),
            refusals: Refusals::default(),
            refused,
            cfg,
            m: Metrics::new(),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            subscribe_logged: AtomicBool::new(false),
        });
        // Connections stop on `stop`: the caller's shutdown, or the pipeline going away.
        let stop = shutdown.child_token();
        let tracker = TaskTracker::new();
        let auth = ctx.cfg.auth.as_str();
        if let Some(addr) = addr {
            info!(%addr, auth, "embedded MQTT endpoint listening (plain TCP)");
        }
        if let Some(addr) = tls_addr {
            info!(%addr, auth, "embedded MQTT endpoint listening (TLS)");
        }
        let (tls_listener, acceptor) = tls.unzip();
        let result = loop {
            let (accepted, is_tls) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = tx.closed() => break Err(anyhow::anyhow!("the pipeline closed its channel")),
                r = accept(listener.as_ref()) => (r, false),
                r = accept(tls_listener.as_ref()) => (r, true),
            };
            match accepted {
                Ok((stream, peer)) => {
                    let slot = match ctx.slots.take(peer.ip()) {
                        Ok(slot) => slot,
                        Err(full) => {
                            metrics::counter!(telemetry::INGEST_CONNECTIONS_REFUSED_TOTAL, "reason" => full.as_str())
                                .increment(1);
                            if ctx
                                .refusals
                                .should_log(&peer.ip().to_string(), std::time::Instant::now())
                            {
                                warn!(%peer, cap = full.as_str(), "connection refused: too many open (logged once a minute per address)");
                            }
                            drop(stream);
                            continue;
                        }
                    };
                    if let Err(e) =
                        socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER)
                    {
                        debug!(error = %e, "SO_SNDBUF not set");
                    }
                    let (ctx, tx, stop) = (Arc::clone(&ctx), tx.clone(), stop.clone());
                    match (is_tls, &acceptor) {
                        (true, Some(acceptor)) => {
                            tracker.spawn(tls_connection(
                                slot,
                                stream,
                                peer,
                                acceptor.clone(),
                                ctx,
                                tx,
                                stop,
                            ));
                        }
                        _ => {
                            let _ = stream.set_nodelay(true);
                            tracker.spawn(connection(slot, stream, peer, ctx, tx, stop, None));
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    sleep(Duration::from_millis(100)).await;
                }
            }
        };
        drop(listener);
        drop(tls_listener);
        drop(tx);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        info!("embedded MQTT endpoint stopped");
        result
    }
}

/// Accepts on `listener`; never resolves without one (a listener that is off).
async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A connection on the TLS listener: the handshake (within `connect_timeout_ms`; failures
/// counted by reason, logged once a minute per address, and slowing the address's next
/// handshakes down as failed CONNECTs do), then MQTT as on the plain one, with the device id
/// of the client certificate, if it presented one.
async fn tls_connection(
    slot: Slot,
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
    tx: mpsc::Sender<Inbound>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let wait = ctx.refusals.delay(peer.ip(), std::time::Instant::now());
    if !wait.is_zero() {
        tokio::select! {
            _ = sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
    let limit = Duration::from_millis(ctx.cfg.connect_timeout_ms);
    let handshake = tokio::select! {
        r = timeout(limit, acceptor.accept(stream)) => r,
        _ = stop.cancelled() => return,
    };
    let failed = |reason: &'static str, error: &dyn std::fmt::Display| {
        ctx.refused.tls.add(reason);
        let now = std::time::Instant::now();
        // A client that only opens and closes the socket (a TCP health check) costs nothing
        // and must not slow the devices behind its address.
        if reason != "closed" {
            ctx.refusals.failed(peer.ip(), now);
        }
        let key = format!("tls/{}", peer.ip());
        if ctx.refusals.should_log(&key, now) {
            info!(%peer, reason, %error, "TLS handshake failed (logged once a minute per address)");
        }
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return failed(tls::failure_reason(&e), &e),
        Err(_) => return failed("timeout", &format_args!("no handshake within {limit:?}")),
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(tls::device_id);
    connection(slot, stream, peer, ctx, tx, stop, cert).await;
}

/// A connection's byte stream, split into its reading and writing halves: plain TCP without a
/// lock between them, TLS through tokio's split (one session state for both directions).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split(self) -> (Self::Read, Self::Write);
}

impl Stream for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
}

impl Stream for TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

struct Ctx {
    cfg: EmbeddedConfig,
    /// Set with an `auth` that identifies devices.
    devices: Option<DeviceAuth>,
    refusals: Refusals,
    refused: Refused,
    slots: Arc<Slots>,
    budget: Budget,
    m: Metrics,
    /// client id → (connection id, its take-over token).
    sessions: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_id: AtomicU64,
    subscribe_logged: AtomicBool,
}

/// Metric handles, resolved once so the per-read path does no registry lookups.
struct Metrics {
    connections_total: Counter,
    connections: Gauge,
    messages: Counter,
    bytes: Counter,
    connect_refused: Counter,
    protocol_errors: Counter,
    oversized: Counter,
    keepalive_timeouts: Counter,
    takeovers: Counter,
    subscribe_refused: Counter,
    inflight_full: Counter,
    topic_too_long: Counter,
    buffer_full: Counter,
}

impl Metrics {
    fn new() -> Self {
        Self {
            connections_total: metrics::counter!(telemetry::INGEST_CONNECTIONS_TOTAL),
            connections: metrics::gauge!(telemetry::INGEST_CONNECTIONS),
            messages: metrics::counter!(telemetry::INGEST_MESSAGES_TOTAL),
            bytes: metrics::counter!(telemetry::INGEST_PAYLOAD_BYTES_TOTAL),
            connect_refused: metrics::counter!(telemetry::INGEST_CONNECT_REFUSED_TOTAL),
            protocol_errors: metrics::counter!(telemetry::INGEST_PROTOCOL_ERRORS_TOTAL),
            oversized: metrics::counter!(telemetry::INGEST_OVERSIZED_PACKETS_TOTAL),
            keepalive_timeouts: metrics::counter!(telemetry::INGEST_KEEPALIVE_TIMEOUTS_TOTAL),
            takeovers: metrics::counter!(telemetry::INGEST_TAKEOVERS_TOTAL),
            subscribe_refused: metrics::counter!(telemetry::INGEST_SUBSCRIBE_REFUSED_TOTAL),
            inflight_full: metrics::counter!(telemetry::INGEST_INFLIGHT_FULL_TOTAL),
            topic_too_long: metrics::counter!(telemetry::INGEST_TOPIC_TOO_LONG_TOTAL),
            buffer_full: metrics::counter!(telemetry::INGEST_BUFFER_FULL_TOTAL),
        }
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        telemetry::INGEST_CONNECTIONS_TOTAL,
        "MQTT connections accepted"
    );
    describe_gauge!(telemetry::INGEST_CONNECTIONS, "MQTT connections open now");
    describe_counter!(
        telemetry::INGEST_MESSAGES_TOTAL,
        "PUBLISH packets handed to the pipeline"
    );
    describe_counter!(
        telemetry::INGEST_PAYLOAD_BYTES_TOTAL,
        "payload bytes handed to the pipeline"
    );
    describe_counter!(
        telemetry::INGEST_CONNECT_REFUSED_TOTAL,
        "CONNECTs refused or timed out"
    );
    describe_counter!(
        telemetry::INGEST_PROTOCOL_ERRORS_TOTAL,
        "connections closed for a protocol error"
    );
    describe_counter!(
        telemetry::INGEST_OVERSIZED_PACKETS_TOTAL,
        "connections closed for a packet over max_packet_bytes"
    );
    describe_counter!(
        telemetry::INGEST_TOPIC_TOO_LONG_TOTAL,
        "connections closed for a PUBLISH topic over max_topic_bytes"
    );
    describe_counter!(
        telemetry::INGEST_INFLIGHT_FULL_TOTAL,
        "times a connection paused reading with max_inflight publishes unacknowledged"
    );
    describe_counter!(
        telemetry::INGEST_BUFFER_FULL_TOTAL,
        "times a reader paused with max_buffered_bytes of messages not yet committed"
    );
    describe_counter!(
        telemetry::INGEST_KEEPALIVE_TIMEOUTS_TOTAL,
        "connections closed for keep-alive"
    );
    describe_counter!(
        telemetry::INGEST_TAKEOVERS_TOTAL,
        "connections closed by a CONNECT with their client id"
    );
    describe_counter!(
        telemetry::INGEST_SUBSCRIBE_REFUSED_TOTAL,
        "SUBSCRIBE filters refused (ingest-only endpoint)"
    );
    describe_counter!(
        telemetry::INGEST_AUTH_REFUSED_TOTAL,
        "CONNECTs refused for the device's identity, by reason"
    );
    describe_counter!(
        telemetry::INGEST_PUBLISH_REFUSED_TOTAL,
        "connections closed for a publish the device may not make, by reason"
    );
    describe_counter!(
        telemetry::INGEST_TLS_REFUSED_TOTAL,
        "TLS handshakes that failed on the TLS listener, by reason"
    );
    describe_counter!(
        telemetry::INGEST_ACKS_RELEASED_TOTAL,
        "acks sent after a durable commit"
    );
    describe_counter!(
        telemetry::INGEST_ACKS_DROPPED_TOTAL,
        "acks dropped because their connection had closed"
    );
}

/// The output side of one connection, shared by its reader, its writer and every
/// [`AckSet`](super::AckSet) that holds one of its acks.
///
/// It also counts the connection's in-flight publishes: `unacked` goes up when the reader hands
/// a QoS 1/2 publish over and down when the writer has written its ack, so an ack sitting in
/// `out` because the client does not read still counts (`broker.embedded.max_inflight`).
#[derive(Debug, Default)]
struct ConnIo {
    out: Mutex<Out>,
    wake: Notify,
    unacked: AtomicUsize,
    /// Woken after each write that sent acks.
    drained: Notify,
}

#[derive(Debug, Default)]
struct Out {
    buf: BytesMut,
    /// Acks (4-byte frames) in `buf`.
    acks: usize,
    closed: bool,
}

impl ConnIo {
    /// Appends `bytes` for the writer; false if the connection has closed.
    fn push(&self, bytes: &[u8]) -> bool {
        self.append(bytes, 0)
    }

    /// Appends released ack frames (4 bytes each); false if the connection has closed.
    fn push_acks(&self, frames: &[u8]) -> bool {
        self.append(frames, frames.len() / 4)
    }

    fn append(&self, bytes: &[u8], acks: usize) -> bool {
        {
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            if out.closed {
                return false;
            }
            out.buf.extend_from_slice(bytes);
            out.acks += acks;
        }
        self.wake.notify_one();
        true
    }

    /// After the writer sent `acks` of them.
    fn acks_written(&self, acks: usize) {
        if acks > 0 {
            self.unacked.fetch_sub(acks, Ordering::AcqRel);
            self.drained.notify_one();
        }
    }

    /// Refuses further output; the writer sends what is buffered and shuts the socket.
    fn close(&self) {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.wake.notify_one();
    }
}

/// What an [`Ack`] of the embedded endpoint points to. Its last reference going away (every ack
/// released or dropped, and the reader done) drops `_outstanding`, which tells a connection that
/// is shutting down that it may close.
#[derive(Debug)]
pub(crate) struct AckTarget {
    io: Arc<ConnIo>,
    _outstanding: oneshot::Sender<()>,
}

impl AckTarget {
    pub(crate) fn release(&self, frames: &[u8]) -> bool {
        self.io.push_acks(frames)
    }
}

/// Why a connection's read loop ended.
#[derive(Debug)]
enum End {
    Disconnect,
    Eof,
    Io(io::Error),
    KeepAlive,
    Protocol(String),
    TooLarge(usize),
    /// A PUBLISH topic over `max_topic_bytes` (its length).
    TopicTooLong(usize),
    TakenOver,
    Shutdown,
    PipelineGone,
    /// A publish the device may not make (and its topic).
    Refused(Refusal, String),
}

/// Decrements the open-connections gauge however the connection task ends.
struct OpenGuard<'a>(&'a Metrics);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections.decrement(1.0);
    }
}

/// Serves one connection. `cert`: the device id of the TLS client certificate, if one was
/// presented (and verified).
async fn connection<S: Stream>(
    _slot: Slot,
    mut stream: S,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    tx: mpsc::Sender<Inbound>,
    stop: CancellationToken,
    cert: Option<Result<String, Refusal>>,
) {
    ctx.m.connections_total.increment(1);
    ctx.m.connections.increment(1.0);
    let _open = OpenGuard(&ctx.m);
    let conn_id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);

    let connect_timeout = Duration::from_millis(ctx.cfg.connect_timeout_ms);
    let accepted = tokio::select! {
        r = timeout(connect_timeout, handshake(&mut stream, peer, cert.as_ref(), &mut buf, &ctx, conn_id)) => match r {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => return, // refused; already logged and answered
            Ok(Err(e)) => {
                ctx.m.connect_refused.increment(1);
                debug!(%peer, error = %e, "connection closed before CONNECT completed");
                return;
            }
            Err(_) => {
                ctx.m.connect_refused.increment(1);
                debug!(%peer, "no CONNECT within {connect_timeout:?}");
                return;
            }
        },
        _ = stop.cancelled() => return,
    };
    let Accepted {
        client_id,
        keep_alive,
        kick,
        registered,
        device,
    } = accepted;
    debug!(%peer, %client_id, keep_alive, "connected");

    let (mut rd, wr) = stream.split();
    let io = Arc::new(ConnIo::default());
    let (outstanding_tx, outstanding_rx) = oneshot::channel();
    let target = Arc::new(AckTarget {
        io: Arc::clone(&io),
        _outstanding: outstanding_tx,
    });
    let mut writer = tokio::spawn(write_loop(wr, Arc::clone(&io)));

    let conn = Conn {
        keep_alive,
        device: device.as_ref(),
        kick: &kick,
        stop: &stop,
    };
    let end = read_loop(&mut rd, buf, &ctx, &tx, &target, &conn).await;
    // Stop producing: the pipeline's recv() can end once every sender is gone.
    drop(tx);
    drop(target);
    match &end {
        End::Disconnect | End::Eof => debug!(%peer, %client_id, "disconnected"),
        End::Io(e) => debug!(%peer, %client_id, error = %e, "connection error"),
        End::KeepAlive => {
            ctx.m.keepalive_timeouts.increment(1);
            info!(%peer, %client_id, keep_alive, "keep-alive expired, closing");
        }
        End::Protocol(what) => {
            ctx.m.protocol_errors.increment(1);
            warn!(%peer, %client_id, "protocol error, closing: {what}");
        }
        End::TooLarge(n) => {
            ctx.m.oversized.increment(1);
            warn!(
                %peer, %client_id, size = n, max = ctx.cfg.max_packet_bytes,
                "packet larger than max_packet_bytes, closing"
            );
        }
        End::TopicTooLong(n) => {
            ctx.m.topic_too_long.increment(1);
            warn!(
                %peer, %client_id, topic_bytes = n, max = ctx.cfg.max_topic_bytes,
                "PUBLISH topic longer than max_topic_bytes, closing"
            );
        }
        End::TakenOver => {
            ctx.m.takeovers.increment(1);
            info!(%peer, %client_id, "closed: a new connection took over this client id");
        }
        End::Shutdown => {
            // Let the pipeline release what it already has from this connection.
            let grace = Duration::from_millis(ctx.cfg.shutdown_grace_ms);
            if timeout(grace, outstanding_rx).await.is_err() {
                warn!(%peer, %client_id, "acks still outstanding after {grace:?}; closing anyway");
            }
        }
        End::PipelineGone => debug!(%peer, %client_id, "pipeline gone, closing"),
        End::Refused(why, topic) => {
            metrics::counter!(telemetry::INGEST_PUBLISH_REFUSED_TOTAL, "reason" => why.as_str())
                .increment(1);
            let device = device.as_ref().map_or("", |d| d.id.as_str());
            if ctx.refusals.should_log(device, std::time::Instant::now()) {
                warn!(
                    %peer, device, %topic, reason = why.as_str(),
                    "publish refused, connection closed (logged once a minute per device)"
                );
            }
        }
    }
    io.close();
    if timeout(FINAL_FLUSH, &mut writer).await.is_err() {
        writer.abort();
    }
    if !matches!(end, End::Eof | End::Io(_)) {
        linger(&mut rd).await;
    }
    if registered {
        let mut sessions = ctx.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.get(&client_id).map(|s| s.0) == Some(conn_id) {
            sessions.remove(&client_id);
        }
    }
}

struct Accepted {
    client_id: String,
    keep_alive: u16,
    kick: CancellationToken,
    /// Whether `client_id` is in the take-over registry (not for server-assigned ids).
    registered: bool,
    /// The identified device (an `auth` other than `none`).
    device: Option<Identity>,
}

/// What the read loop needs to know of its connection.
struct Conn<'a> {
    keep_alive: u16,
    device: Option<&'a Identity>,
    kick: &'a CancellationToken,
    stop: &'a CancellationToken,
}

/// Reads and answers CONNECT. `Ok(None)`: refused (CONNACK sent when the spec asks for one).
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    cert: Option<&Result<String, Refusal>>,
    buf: &mut BytesMut,
    ctx: &Ctx,
    conn_id: u64,
) -> io::Result<Option<Accepted>> {
    let max = ctx.cfg.max_packet_bytes;
    let peer = Some(peer);
    // Frame the first packet.
    loop {
        match rumqttc::mqttbytes::check(buf.iter(), max) {
            Ok(_) => break,
            Err(MqttError::InsufficientBytes(n)) => {
                buf.reserve(n.max(256));
                if stream.read_buf(buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Err(e) => {
                ctx.m.connect_refused.increment(1);
                warn!(?peer, error = %e, "bad first packet, closing");
                return Ok(None);
            }
        }
    }
    match precheck_connect(buf) {
        Precheck::Mqtt311 => {}
        Precheck::NotConnect => {
            ctx.m.connect_refused.increment(1);
            warn!(?peer, "first packet is not CONNECT, closing");
            return Ok(None);
        }
        Precheck::UnsupportedLevel(level) => {
            refuse(stream, ctx, ConnectReturnCode::RefusedProtocolVersion).await;
            info!(?peer, level, "refused: only MQTT 3.1.1 is supported");
            return Ok(None);
        }
    }
    let connect = match read_packet(buf, max) {
        Ok(Packet::Connect(c)) => c,
        Ok(other) => unreachable!("prechecked CONNECT parsed as {other:?}"),
        Err(e) => {
            ctx.m.connect_refused.increment(1);
            warn!(?peer, error = %e, "malformed CONNECT, closing");
            return Ok(None);
        }
    };
    if connect.client_id.len() > MAX_CLIENT_ID_BYTES {
        refuse(stream, ctx, ConnectReturnCode::BadClientId).await;
        info!(
            ?peer,
            bytes = connect.client_id.len(),
            "refused: client id over {MAX_CLIENT_ID_BYTES} bytes"
        );
        return Ok(None);
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        refuse(stream, ctx, ConnectReturnCode::BadClientId).await;
        info!(?peer, "refused: empty client id needs clean_session");
        return Ok(None);
    }
    if let Some(user) = &ctx.cfg.username {
        let code = match &connect.login {
            None => Some(ConnectReturnCode::NotAuthorized),
            Some(login) => {
                let user_ok = ct_eq(login.username.as_bytes(), user.as_bytes());
                let pass_ok = ctx
                    .cfg
                    .password
                    .as_ref()
                    .is_none_or(|p| ct_eq(login.password.as_bytes(), p.as_bytes()));
                (!(user_ok && pass_ok)).then_some(ConnectReturnCode::BadUserNamePassword)
            }
        };
        if let Some(code) = code {
            refuse(stream, ctx, code).await;
            info!(?peer, client_id = %connect.client_id, ?code, "refused: credentials");
            return Ok(None);
        }
    }
    let device = match &ctx.devices {
        None => None,
        Some(devices) => match devices
            .authenticate(ctx.cfg.auth, cert, connect.login.as_ref())
            .await
        {
            Ok(id) => {
                if let Some(ip) = peer.map(|p| p.ip()) {
                    ctx.refusals.succeeded(ip);
                }
                Some(id)
            }
            Err(why) => {
                ctx.refused.auth.add(why.as_str());
                let now = std::time::Instant::now();
                if let Some(ip) = peer.map(|p| p.ip()) {
                    // Repeated failures from one address wait longer for their answer.
                    sleep(ctx.refusals.failed(ip, now)).await;
                }
                let code = match why {
                    Refusal::BadPassword | Refusal::UnknownDevice => {
                        ConnectReturnCode::BadUserNamePassword
                    }
                    _ => ConnectReturnCode::NotAuthorized,
                };
                refuse(stream, ctx, code).await;
                let who = auth::clip(match cert {
                    Some(Ok(id)) => id.as_str(),
                    _ => connect.login.as_ref().map_or("", |l| l.username.as_str()),
                });
                let key = peer.map_or_else(|| who.to_string(), |p| format!("{}/{who}", p.ip()));
                if ctx.refusals.should_log(&key, now) {
                    info!(
                        ?peer,
                        device = who,
                        reason = why.as_str(),
                        "refused: device credentials (logged once a minute per device and address)"
                    );
                }
                return Ok(None);
            }
        },
    };

    let kick = CancellationToken::new();
    let (client_id, registered) = if connect.client_id.is_empty() {
        (format!("auto-{conn_id}"), false)
    } else {
        let old = ctx
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(connect.client_id.clone(), (conn_id, kick.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
        (connect.client_id, true)
    };
    let mut out = BytesMut::with_capacity(4);
    let _ = ConnAck::new(ConnectReturnCode::Success, false).write(&mut out);
    stream.write_all(&out).await?;
    Ok(Some(Accepted {
        client_id,
        keep_alive: connect.keep_alive,
        kick,
        registered,
        device,
    }))
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, ctx: &Ctx, code: ConnectReturnCode) {
    ctx.m.connect_refused.increment(1);
    let mut out = BytesMut::with_capacity(4);
    let _ = ConnAck::new(code, false).write(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

/// What [`precheck_connect`] makes of a first packet (public for the fuzz target).
#[derive(Debug, PartialEq, Eq)]
pub enum Precheck {
    Mqtt311,
    NotConnect,
    UnsupportedLevel(u8),
}

/// Looks at the protocol name and level of a fully buffered first packet before parsing it:
/// the v4 codec would misparse an MQTT 5 CONNECT, and the spec wants CONNACK 0x01 for a level we
/// do not speak (including MQTT 3.1's "MQIsdp").
pub fn precheck_connect(frame: &[u8]) -> Precheck {
    if frame.first().map(|b| b >> 4) != Some(1) {
        return Precheck::NotConnect;
    }
    // Skip the fixed header: type byte, then 1–4 remaining-length bytes.
    let mut i = 1;
    while i < frame.len() && frame[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let name_len = match frame.get(i..i + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
        None => return Precheck::NotConnect,
    };
    let name = frame.get(i + 2..i + 2 + name_len);
    let level = frame.get(i + 2 + name_len).copied();
    match (name, level) {
        (Some(b"MQTT"), Some(4)) => Precheck::Mqtt311,
        (Some(b"MQTT" | b"MQIsdp"), Some(level)) => Precheck::UnsupportedLevel(level),
        _ => Precheck::NotConnect,
    }
}

/// Takes the next whole packet off a connection's buffer: what the reader (and the handshake,
/// after [`precheck_connect`]) does with the bytes a socket delivered. `InsufficientBytes` leaves
/// `buf` as it was; a packet over `max_packet_bytes` is refused before its body is read. Public
/// for the fuzz target `mqtt_packets` (fuzz/), which feeds it raw socket bytes.
pub fn read_packet(buf: &mut BytesMut, max_packet_bytes: usize) -> Result<Packet, MqttError> {
    Packet::read(buf, max_packet_bytes)
}

/// Constant-time comparison for credentials.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut buf: BytesMut,
    ctx: &Ctx,
    tx: &mpsc::Sender<Inbound>,
    target: &Arc<AckTarget>,
    conn: &Conn<'_>,
) -> End {
    let Conn {
        keep_alive,
        device,
        kick,
        stop,
    } = *conn;
    let max = ctx.cfg.max_packet_bytes;
    // MQTT-3.1.2-24: close after 1.5 × keep-alive without any packet. 0 disables it.
    let ka = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let idle = sleep(ka.unwrap_or(Duration::from_secs(365 * 86_400)));
    tokio::pin!(idle);
    // Responses produced while parsing one read, pushed to the writer as one piece.
    let mut ctrl: Vec<u8> = Vec::new();
    loop {
        // A device removed from the registry is disconnected at its next read.
        if let (Some(d), Some(devices)) = (device, &ctx.devices)
            && d.registered
            && !buf.is_empty()
            && !devices.still_registered(&d.id)
        {
            return End::Refused(Refusal::Revoked, String::new());
        }
        // Parse everything that is buffered (CONNECT may have been followed by more packets).
        let received_at = now_ms();
        let (mut msgs, mut bytes) = (0u64, 0u64);
        let end = loop {
            if let Some(n) = publish_topic_len(&buf).filter(|n| *n > ctx.cfg.max_topic_bytes) {
                break Some(End::TopicTooLong(n));
            }
            match read_packet(&mut buf, max) {
                Ok(Packet::Publish(p)) => {
                    if p.topic.is_empty() || p.topic.contains(['+', '#']) {
                        break Some(End::Protocol(format!("invalid topic name {:?}", p.topic)));
                    }
                    if let (Some(d), Some(devices)) = (device, &ctx.devices)
                        && !devices.may_publish(&d.id, &p.topic)
                    {
                        break Some(End::Refused(Refusal::NotOwnTopic, p.topic));
                    }
                    if p.qos != QoS::AtMostOnce
                        && target.io.unacked.load(Ordering::Acquire) >= ctx.cfg.max_inflight
                    {
                        ctx.m.inflight_full.increment(1);
                        if !ctrl.is_empty() {
                            target.io.push(&ctrl);
                            ctrl.clear();
                        }
                        if let Some(end) =
                            inflight_room(&target.io, ctx.cfg.max_inflight, conn).await
                        {
                            break Some(end);
                        }
                    }
                    let ack = match p.qos {
                        QoS::AtMostOnce => Ack::none(),
                        qos => {
                            target.io.unacked.fetch_add(1, Ordering::AcqRel);
                            let [hi, lo] = p.pkid.to_be_bytes();
                            let kind = if qos == QoS::AtLeastOnce { 0x40 } else { 0x50 };
                            Ack::new(AckKind::Embedded {
                                conn: Arc::clone(target),
                                frame: [kind, 0x02, hi, lo],
                            })
                        }
                    };
                    msgs += 1;
                    bytes += p.payload.len() as u64;
                    let mut inbound = Inbound {
                        topic: p.topic,
                        payload: p.payload,
                        received_at,
                        ack,
                    };
                    if !ctx.budget.try_charge(&mut inbound) {
                        // max_buffered_bytes: stop reading until the pipeline releases some.
                        ctx.m.buffer_full.increment(1);
                        if !ctrl.is_empty() {
                            target.io.push(&ctrl);
                            ctrl.clear();
                        }
                        tokio::select! {
                            biased;
                            () = ctx.budget.charge(&mut inbound) => {}
                            _ = stop.cancelled() => break Some(End::Shutdown),
                            _ = kick.cancelled() => break Some(End::TakenOver),
                        }
                    }
                    match tx.try_send(inbound) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(inbound)) => {
                            // Backpressure: stop reading until the pipeline takes it.
                            if !ctrl.is_empty() {
                                target.io.push(&ctrl);
                                ctrl.clear();
                            }
                            tokio::select! {
                                biased;
                                r = tx.send(inbound) => if r.is_err() {
                                    break Some(End::PipelineGone);
                                },
                                _ = stop.cancelled() => break Some(End::Shutdown),
                                _ = kick.cancelled() => break Some(End::TakenOver),
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break Some(End::PipelineGone),
                    }
                }
                Ok(Packet::PubRel(r)) => {
                    let [hi, lo] = r.pkid.to_be_bytes();
                    ctrl.extend_from_slice(&[0x70, 0x02, hi, lo]);
                }
                Ok(Packet::PingReq) => ctrl.extend_from_slice(&[0xD0, 0x00]),
                Ok(Packet::Subscribe(s)) => {
                    ctx.m.subscribe_refused.increment(s.filters.len() as u64);
                    if !ctx.subscribe_logged.swap(true, Ordering::Relaxed) {
                        info!(
                            filters = ?s.filters.iter().map(|f| &f.path).collect::<Vec<_>>(),
                            "SUBSCRIBE refused: the embedded endpoint only ingests (logged once)"
                        );
                    }
                    let codes = vec![SubscribeReasonCode::Failure; s.filters.len()];
                    let mut out = BytesMut::new();
                    let _ = SubAck::new(s.pkid, codes).write(&mut out);
                    ctrl.extend_from_slice(&out);
                }
                Ok(Packet::Unsubscribe(u)) => {
                    let mut out = BytesMut::new();
                    let _ = UnsubAck::new(u.pkid).write(&mut out);
                    ctrl.extend_from_slice(&out);
                }
                Ok(Packet::Disconnect) => break Some(End::Disconnect),
                // We never publish to clients, so acks from them refer to nothing; ignore them.
                Ok(Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)) => {}
                Ok(other) => {
                    break Some(End::Protocol(format!(
                        "unexpected {:?}",
                        packet_name(&other)
                    )));
                }
                Err(MqttError::InsufficientBytes(n)) => {
                    buf.reserve(n);
                    break None;
                }
                Err(MqttError::PayloadSizeLimitExceeded(n)) => break Some(End::TooLarge(n)),
                Err(e) => break Some(End::Protocol(e.to_string())),
            }
        };
        if msgs > 0 {
            ctx.m.messages.increment(msgs);
            ctx.m.bytes.increment(bytes);
        }
        if !ctrl.is_empty() {
            target.io.push(&ctrl);
            ctrl.clear();
        }
        if let Some(end) = end {
            return end;
        }

        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return End::Shutdown,
            _ = kick.cancelled() => return End::TakenOver,
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return End::Eof,
                Ok(_) => {
                    if let Some(ka) = ka {
                        idle.as_mut().reset(Instant::now() + ka);
                    }
                }
                Err(e) => return End::Io(e),
            },
            _ = &mut idle, if ka.is_some() => return End::KeepAlive,
        }
    }
}

/// Waits until fewer than `max` of the connection's publishes are unacknowledged on the wire
/// (`None`), or the connection has to end.
async fn inflight_room(io: &ConnIo, max: usize, conn: &Conn<'_>) -> Option<End> {
    while io.unacked.load(Ordering::Acquire) >= max {
        tokio::select! {
            biased;
            _ = conn.stop.cancelled() => return Some(End::Shutdown),
            _ = conn.kick.cancelled() => return Some(End::TakenOver),
            _ = io.drained.notified() => {}
        }
    }
    None
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "second CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "packet",
    }
}

/// After our FIN, reads and discards until the peer closes (bounded by [`LINGER`]). Closing a
/// socket with unread input makes the kernel send RST instead of FIN, and a RST can make the
/// peer's kernel discard our last PUBACKs before the device has read them — the device would
/// then send those messages again for nothing.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut sink = [0u8; 4096];
    let _ = timeout(LINGER, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Sends whatever the reader and releases append, one write per wake-up.
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, io: Arc<ConnIo>) {
    let mut spare = BytesMut::with_capacity(256);
    loop {
        io.wake.notified().await;
        let (closed, acks) = {
            let mut out = io.out.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut out.buf, &mut spare);
            (out.closed, std::mem::take(&mut out.acks))
        };
        if !spare.is_empty() {
            if let Err(e) = wr.write_all(&spare).await {
                debug!(error = %e, "write failed");
                io.out.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                break;
            }
            spare.clear();
            io.acks_written(acks);
        }
        if closed {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests;
