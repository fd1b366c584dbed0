//! Device messages in: the embedded MQTT front or a client of an external broker.
//!
//! Whatever the source, a message becomes an [`Inbound`] carrying an [`Ack`]. The pipeline
//! hands every `Ack` of a batch to an [`AckSet`] and releases the set only after the batch's
//! outcomes are durable, so a device (or the external broker) never hears "received" for a
//! message that a crash could still lose.
//!
//! # Cost model
//! An `Ack` is a reference-counted handle to its connection plus the four bytes of its
//! PUBACK/PUBREC, so creating and pushing one costs an atomic increment/decrement and a small
//! copy. [`AckSet::push`] groups acks per connection as they come (one hash lookup only when the
//! connection differs from the previous push's); [`AckSet::release`] then hands each connection
//! ONE buffer, which that connection's writer sends with one `write` — no per-message channel
//! sends and no per-message syscalls. (For an external broker, `rumqttc` takes one request per
//! ack on its own channel; the set still costs the pipeline one channel send per release.)
//!
//! # Shutdown
//! Both sources take a [`CancellationToken`]. When it fires they stop reading, drop their
//! `Sender`s (so the pipeline's `recv()` yields `None` once the channel is drained), wait —
//! bounded by `shutdown_grace_ms` — until every `Ack` they handed out was released or dropped,
//! send those acks, close their connections and return. So the pipeline must: cancel the token,
//! keep receiving until `None`, commit, release, drop everything; meanwhile the caller awaits
//! `serve` (or [`Ingest::stopped`]). The pipeline runs concurrently (its own thread), so
//! nothing waits in a circle.

pub mod config;
pub mod embedded;
pub mod external;
#[cfg(test)]
mod testutil;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
pub use tokio_util::sync::CancellationToken;

pub use config::{EmbeddedConfig, ExternalConfig, IngestConfig, Mode};

/// One device message as it came off the wire.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// Epoch milliseconds at which the gateway received it.
    pub received_at: i64,
    pub ack: Ack,
}

/// What must happen once the message's outcome is durable (nothing for QoS 0).
///
/// Dropping an `Ack` without releasing it means the message is never acknowledged: the device
/// (or the external broker) delivers it again after its next reconnect, and the engine's
/// de-duplication absorbs the repeat.
#[derive(Debug)]
pub struct Ack {
    kind: AckKind,
    /// The message's share of its source's `max_buffered_bytes`, given back when the ack is
    /// released after the commit (or dropped).
    bytes: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
enum AckKind {
    /// QoS 0, or a message that did not come from MQTT.
    None,
    /// The encoded PUBACK (QoS 1) or PUBREC (QoS 2) for a connection of the embedded front.
    Embedded {
        conn: Arc<embedded::AckTarget>,
        frame: [u8; 4],
    },
    /// A manual ack through the external-broker client.
    External {
        link: Arc<external::AckTarget>,
        ack: external::PendingAck,
    },
}

impl Ack {
    /// An ack with nothing to do (QoS 0; messages injected by tests or a DLQ retry).
    pub fn none() -> Ack {
        Ack::new(AckKind::None)
    }

    fn new(kind: AckKind) -> Ack {
        Ack { kind, bytes: None }
    }

    /// Whether releasing this ack sends nothing.
    pub fn is_none(&self) -> bool {
        matches!(self.kind, AckKind::None)
    }

    /// Holds `bytes` of the source's [`Budget`] until the ack is released or dropped.
    fn hold(&mut self, bytes: OwnedSemaphorePermit) {
        self.bytes = Some(bytes);
    }
}

/// A source's `max_buffered_bytes`: the topic and payload bytes of the messages it has handed
/// to the pipeline whose acks are not yet released, i.e. queued, in the batch, or copied into
/// a commit. A message that does not fit waits (its connection's reads pause, as with a full
/// queue), so the queue's memory is bounded in bytes as well as in messages: `queue_capacity`
/// messages of up to `max_packet_bytes` each would be far more.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    max: usize,
}

impl Budget {
    /// `max` must be at least the largest packet (the config checks it); a larger message is
    /// charged `max`, so it never waits forever.
    pub(crate) fn new(max: usize) -> Budget {
        let max = max.clamp(1, u32::MAX as usize);
        Budget {
            bytes: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    fn permits(&self, inbound: &Inbound) -> u32 {
        let n = (inbound.payload.len() + inbound.topic.len()).clamp(1, self.max);
        // `max` fits a u32 (see `new`).
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Charges `inbound` at once if there is room; false if it has to [`Budget::charge`].
    pub(crate) fn try_charge(&self, inbound: &mut Inbound) -> bool {
        match self
            .bytes
            .clone()
            .try_acquire_many_owned(self.permits(inbound))
        {
            Ok(p) => {
                inbound.ack.hold(p);
                true
            }
            Err(_) => false,
        }
    }

    /// Charges `inbound`, waiting until the pipeline has released enough.
    pub(crate) async fn charge(&self, inbound: &mut Inbound) {
        let n = self.permits(inbound);
        // The semaphore is never closed.
        if let Ok(p) = self.bytes.clone().acquire_many_owned(n).await {
            inbound.ack.hold(p);
        }
    }
}

/// The acknowledgements of one committed batch, released together.
///
/// Reusable: `release` empties the set but keeps its allocations. Dropping a set without
/// releasing it acknowledges nothing (see [`Ack`]).
#[derive(Debug, Default)]
pub struct AckSet {
    groups: Vec<Group>,
    /// The batch's shares of the sources' [`Budget`]s, given back on release.
    held: Vec<OwnedSemaphorePermit>,
    /// Connection handle address → index in `groups`.
    index: HashMap<usize, usize>,
    /// Group the previous push went to (consecutive messages mostly share a connection).
    last: usize,
    count: usize,
}

#[derive(Debug)]
enum Group {
    Embedded {
        conn: Arc<embedded::AckTarget>,
        frames: Vec<u8>,
    },
    External {
        link: Arc<external::AckTarget>,
        acks: Vec<external::PendingAck>,
    },
}

impl Group {
    fn key(&self) -> usize {
        match self {
            Group::Embedded { conn, .. } => Arc::as_ptr(conn) as usize,
            Group::External { link, .. } => Arc::as_ptr(link) as usize,
        }
    }
}

impl AckSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of acks (QoS 0 ones not counted) waiting for `release`.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn push(&mut self, ack: Ack) {
        let Ack { kind, bytes } = ack;
        if let Some(b) = bytes {
            self.held.push(b);
        }
        let key = match &kind {
            AckKind::None => return,
            AckKind::Embedded { conn, .. } => Arc::as_ptr(conn) as usize,
            AckKind::External { link, .. } => Arc::as_ptr(link) as usize,
        };
        self.count += 1;
        let i = match self.groups.get(self.last) {
            Some(g) if g.key() == key => self.last,
            _ => match self.index.get(&key) {
                Some(&i) => i,
                None => {
                    let i = self.groups.len();
                    self.groups.push(match &kind {
                        AckKind::Embedded { conn, .. } => Group::Embedded {
                            conn: Arc::clone(conn),
                            frames: Vec::with_capacity(64),
                        },
                        AckKind::External { link, .. } => Group::External {
                            link: Arc::clone(link),
                            acks: Vec::with_capacity(16),
                        },
                        AckKind::None => unreachable!(),
                    });
                    self.index.insert(key, i);
                    i
                }
            },
        };
        self.last = i;
        match (&mut self.groups[i], kind) {
            (Group::Embedded { frames, .. }, AckKind::Embedded { frame, .. }) => {
                frames.extend_from_slice(&frame)
            }
            (Group::External { acks, .. }, AckKind::External { ack, .. }) => acks.push(ack),
            _ => unreachable!("group key matched an ack of another kind"),
        }
    }

    /// Sends every acknowledgement (per connection, in arrival order, in as few writes as
    /// possible). Call only after the batch is durable.
    ///
    /// Never blocks: each connection's frames are appended to its output buffer and its writer
    /// task is woken. Acks for a connection that has closed since are dropped (the device will
    /// retransmit after reconnecting).
    pub fn release(&mut self) {
        self.held.clear();
        if self.count == 0 {
            return;
        }
        let (mut sent, mut dropped) = (0u64, 0u64);
        for group in self.groups.drain(..) {
            match group {
                Group::Embedded { conn, frames } => {
                    let n = (frames.len() / 4) as u64;
                    if conn.release(&frames) {
                        sent += n;
                    } else {
                        dropped += n;
                    }
                }
                Group::External { link, acks } => {
                    let n = acks.len() as u64;
                    if link.release(acks) {
                        sent += n;
                    } else {
                        dropped += n;
                    }
                }
            }
        }
        self.index.clear();
        self.last = 0;
        self.count = 0;
        metrics::counter!(crate::telemetry::INGEST_ACKS_RELEASED_TOTAL).increment(sent);
        if dropped > 0 {
            metrics::counter!(crate::telemetry::INGEST_ACKS_DROPPED_TOTAL).increment(dropped);
        }
    }
}

/// Runs the configured source until `shutdown` fires (see the module docs for the protocol).
pub async fn serve(
    cfg: IngestConfig,
    tx: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match cfg.mode {
        Mode::Embedded => embedded::serve(cfg.embedded, tx, shutdown).await,
        Mode::External => external::serve(cfg.external, tx, shutdown).await,
    }
}

/// The stop signal for [`start`]: a clonable [`CancellationToken`].
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks ingest to stop (idempotent); see the module docs for what follows.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    pub fn token(&self) -> CancellationToken {
        self.0.clone()
    }
}

/// A running source, from [`start`].
#[derive(Debug)]
pub struct Ingest {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    finished: bool,
    /// The embedded endpoint's bound plain and TLS listeners (none with an external broker).
    plain_addr: Option<std::net::SocketAddr>,
    tls_addr: Option<std::net::SocketAddr>,
}

/// What the embedded endpoint refused, by reason: TLS handshakes
/// (`ingest_tls_refused_total`) and CONNECTs for the device's identity
/// (`ingest_auth_refused_total`).
#[derive(Debug, Clone)]
pub struct Refused {
    pub tls: crate::tally::Tally,
    pub auth: crate::tally::Tally,
}

impl Default for Refused {
    fn default() -> Refused {
        Refused {
            tls: crate::tally::Tally::new(crate::telemetry::INGEST_TLS_REFUSED_TOTAL),
            auth: crate::tally::Tally::new(crate::telemetry::INGEST_AUTH_REFUSED_TOTAL),
        }
    }
}

/// Binds the embedded endpoint (or checks the external client's configuration and reads its
/// TLS files) — so a port in use or a bad file fails here, before the agent reports ready —
/// then runs the source on a task of its own.
pub async fn start(
    cfg: &IngestConfig,
    devices: Option<embedded::auth::DeviceAuth>,
    refused: Refused,
    tx: mpsc::Sender<Inbound>,
    shutdown: Shutdown,
) -> anyhow::Result<Ingest> {
    let token = shutdown.token();
    let (task, plain_addr, tls_addr) = match cfg.mode {
        Mode::Embedded => {
            let server = embedded::EmbeddedServer::bind(cfg.embedded.clone())
                .await?
                .with_devices(devices)
                .with_refused(refused);
            let (plain, tls) = (server.plain_local_addr(), server.tls_local_addr());
            (tokio::spawn(server.run(tx, token)), plain, tls)
        }
        Mode::External => {
            let client = external::ExternalClient::new(cfg.external.clone())?;
            (tokio::spawn(client.run(tx, token)), None, None)
        }
    };
    Ok(Ingest {
        task,
        finished: false,
        plain_addr,
        tls_addr,
    })
}

impl Ingest {
    /// The embedded endpoint's bound address: the plain listener's, or the TLS listener's
    /// when there is no plain one (`None` in external mode).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.plain_addr.or(self.tls_addr)
    }

    /// The embedded endpoint's plain TCP listener, as bound (so a configured port 0 reads as
    /// the port it got); `None` when it serves TLS only, or in external mode.
    pub fn plain_addr(&self) -> Option<std::net::SocketAddr> {
        self.plain_addr
    }

    /// The embedded endpoint's TLS listener, as bound; `None` without one.
    pub fn tls_addr(&self) -> Option<std::net::SocketAddr> {
        self.tls_addr
    }

    /// Resolves when the source stops: after a [`Shutdown::trigger`], or on its own with the
    /// error that stopped it (the pipeline went away). Cancel-safe, so it can sit in a
    /// `select!` next to the signal handlers.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        if self.finished {
            return Ok(());
        }
        let r = (&mut self.task).await;
        self.finished = true;
        match r {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the ingest task failed: {e}")),
        }
    }

    /// After [`Shutdown::trigger`]: resolves once every connection is closed, i.e. after the
    /// acks the pipeline released were sent (errors are logged, not returned: shutdown goes on).
    pub async fn stopped(mut self) {
        if let Err(e) = self.wait().await {
            tracing::warn!(error = %e, "ingest ended with an error");
        }
    }
}

/// Wall-clock epoch milliseconds (taken once per socket read, not per message).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::testutil::{Raw, WAIT, recv, release};
    use rumqttc::mqttbytes::v4::Connect;

    #[test]
    fn messages_and_ack_sets_may_cross_threads() {
        fn send<T: Send>() {}
        send::<Inbound>();
        send::<AckSet>();
        send::<Ingest>();
    }

    #[tokio::test]
    async fn start_reports_bind_errors_and_stops_on_trigger() {
        let mut cfg = IngestConfig::default();
        cfg.embedded.listen = "127.0.0.1:0".parse().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let shutdown = Shutdown::new();
        let mut ingest = start(&cfg, None, Refused::default(), tx.clone(), shutdown.clone())
            .await
            .unwrap();
        let addr = ingest.local_addr().unwrap();

        // The port is taken now: a second start fails up front.
        cfg.embedded.listen = addr;
        assert!(
            start(&cfg, None, Refused::default(), tx, Shutdown::new())
                .await
                .is_err()
        );

        let mut raw = Raw::connect(addr).await;
        assert_eq!(raw.mqtt_connect(Connect::new("dev-h")).await, 0);
        raw.send(&crate::ingest::testutil::publish(
            "devices/h/events/e",
            rumqttc::QoS::AtLeastOnce,
            5,
            b"h",
        ))
        .await;
        let inb = recv(&mut rx).await;
        // `wait` is cancel-safe: it can lose a select and be polled again.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), ingest.wait())
                .await
                .is_err()
        );
        shutdown.trigger();
        assert!(shutdown.is_triggered());
        assert!(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .is_none()
        );
        release([inb]);
        assert_eq!(raw.read_exact(4).await, [0x40, 2, 0, 5]);
        tokio::time::timeout(WAIT, ingest.stopped()).await.unwrap();
    }
}
