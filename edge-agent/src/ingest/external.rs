//! The agent as a client of an existing broker (e.g. mosquitto), via `rumqttc`.
//!
//! The client keeps a persistent session (`clean_session = false`, a fixed client id), so the
//! broker queues messages for the agent while it is disconnected or restarting, and uses manual
//! acks: a message's PUBACK goes to the broker only when the pipeline releases its [`Ack`], i.e.
//! after its outcome is durable. Unacked messages are redelivered by the broker when the next
//! session starts.
//!
//! # Broker settings that matter
//! mosquitto's default `max_inflight_messages 20` lets only 20 unacknowledged QoS 1 messages be
//! in flight towards the agent. Since acks wait for a group commit, that caps throughput at
//! about 20 messages per commit interval. Configure the gateway's broker with
//! `max_inflight_messages 0` (unlimited; the agent's bounded pipeline channel and TCP
//! backpressure bound it instead). `max_queued_messages` (default 1000) bounds what the broker
//! keeps for the agent while it is away; raise it to cover the longest expected outage.
//!
//! # Acks across reconnects
//! A packet id is only meaningful on the connection that delivered the message: after a
//! reconnect the broker resends unacked messages and may reuse ids for other messages. Each ack
//! therefore carries the connection generation it was received on; a release for an older
//! generation is dropped (the broker redelivers that message and its new copy is acked).
//! The generation is bumped, under the same lock the acker holds while queueing acks, before the
//! client's request queue is cleaned of stale PUBACKs, so no stale ack can reach a new connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::config::ExternalConfig;
use super::{Ack, AckKind, Budget, Inbound, now_ms};
use crate::telemetry;

/// Capacity of rumqttc's request channel (acks, the subscribe, the disconnect).
const REQUEST_CAP: usize = 4096;

/// One ack to send through the client once released.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingAck {
    generation: u64,
    pkid: u16,
    qos: QoS,
}

/// What an external-broker [`Ack`] points to: the channel to the acker task. When the last
/// reference is gone (every ack released or dropped, and `serve` draining), the acker ends.
#[derive(Debug)]
pub(crate) struct AckTarget {
    tx: mpsc::UnboundedSender<Vec<PendingAck>>,
}

impl AckTarget {
    /// One channel send per release; false if the client has gone.
    pub(crate) fn release(&self, acks: Vec<PendingAck>) -> bool {
        self.tx.send(acks).is_ok()
    }
}

/// Aborts a task when dropped (early returns must not leave the acker spinning).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects (and keeps reconnecting, with exponential backoff) to the configured broker,
/// subscribes to `cfg.filter` at QoS 1 on every connection, and hands each message to `tx`.
///
/// When `shutdown` fires: stops handing out messages (later deliveries stay unacked and are
/// redelivered next session), drops `tx`, waits up to `shutdown_grace_ms` until every handed-out
/// [`Ack`] is released or dropped, sends the released acks, disconnects (keeping the session) and
/// returns. Returns an error if the configuration is unusable or the pipeline's receiver is
/// dropped while running.
///
/// While the pipeline channel is full the event loop is not polled (that is the backpressure),
/// so a pipeline stall longer than 1.5 × `keep_alive_s` makes the broker drop the connection;
/// the session survives and the unacked messages are redelivered after the reconnect.
pub async fn serve(
    cfg: ExternalConfig,
    tx: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    ExternalClient::new(cfg)?.run(tx, shutdown).await
}

/// A configured, not yet connected, external-broker client.
#[derive(Debug)]
pub struct ExternalClient {
    cfg: ExternalConfig,
    opts: MqttOptions,
}

impl ExternalClient {
    /// Validates the configuration and reads the TLS files, so such errors surface before any
    /// connection attempt.
    pub fn new(cfg: ExternalConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let opts = mqtt_options(&cfg)?;
        Ok(Self { cfg, opts })
    }

    /// See [`serve`].
    pub async fn run(
        self,
        tx: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        run(self.cfg, self.opts, tx, shutdown).await
    }
}

async fn run(
    cfg: ExternalConfig,
    opts: MqttOptions,
    tx: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAP);
    let generation = Arc::new(Mutex::new(0u64));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let mut acker = AbortOnDrop(tokio::spawn(ack_loop(
        client.clone(),
        Arc::clone(&generation),
        ack_rx,
    )));
    let mut target = Some(Arc::new(AckTarget { tx: ack_tx }));
    let mut tx = Some(tx);

    let m_connected = metrics::gauge!(telemetry::INGEST_EXTERNAL_CONNECTED);
    let m_reconnects = metrics::counter!(telemetry::INGEST_EXTERNAL_CONNECTION_ERRORS_TOTAL);
    let m_messages = metrics::counter!(telemetry::INGEST_MESSAGES_TOTAL);
    let m_bytes = metrics::counter!(telemetry::INGEST_PAYLOAD_BYTES_TOTAL);
    let m_unhanded = metrics::counter!(telemetry::INGEST_EXTERNAL_UNHANDED_TOTAL);
    let m_buffer_full = metrics::counter!(telemetry::INGEST_BUFFER_FULL_TOTAL);
    let budget = Budget::new(cfg.max_buffered_bytes);

    let backoff_min = Duration::from_millis(cfg.reconnect_min_ms);
    let backoff_max = Duration::from_millis(cfg.reconnect_max_ms);
    let mut backoff = backoff_min;
    let mut retry_at: Option<Instant> = None;
    let mut current_gen = 0u64;
    let mut connected = false;
    let mut drain_deadline: Option<Instant> = None;
    info!(host = %cfg.host, port = cfg.port, client_id = %cfg.client_id, filter = %cfg.filter,
        "connecting to external MQTT broker");

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if tx.is_some() => {
                debug!("external ingest draining");
                tx = None;
                target = None;
                drain_deadline = Some(Instant::now() + Duration::from_millis(cfg.shutdown_grace_ms));
            }
            _ = &mut acker.0, if tx.is_none() => break,
            _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                warn!("acks still outstanding after shutdown_grace_ms; disconnecting anyway");
                break;
            }
            _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                retry_at = None;
            }
            ev = eventloop.poll(), if retry_at.is_none() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                    connected = true;
                    m_connected.set(1.0);
                    backoff = backoff_min;
                    info!(session_present = ca.session_present, "connected to external broker");
                    // Always (re)subscribe: cheap, and correct even if a previous run died
                    // between CONNACK and SUBSCRIBE of a fresh session.
                    if let Err(e) = client.try_subscribe(cfg.filter.clone(), QoS::AtLeastOnce) {
                        error!(error = %e, "could not queue SUBSCRIBE");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes.contains(&SubscribeReasonCode::Failure) {
                        error!(filter = %cfg.filter, "the broker refused the subscription");
                    } else {
                        info!(filter = %cfg.filter, "subscribed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let (Some(tx), Some(target)) = (&tx, &target) else {
                        // Draining: leave it unacked; the broker redelivers it next session.
                        m_unhanded.increment(1);
                        continue;
                    };
                    let ack = match p.qos {
                        QoS::AtMostOnce => Ack::none(),
                        qos => Ack::new(AckKind::External {
                            link: Arc::clone(target),
                            ack: PendingAck { generation: current_gen, pkid: p.pkid, qos },
                        }),
                    };
                    m_messages.increment(1);
                    m_bytes.increment(p.payload.len() as u64);
                    let mut inbound = Inbound {
                        topic: p.topic,
                        payload: p.payload,
                        received_at: now_ms(),
                        ack,
                    };
                    // max_buffered_bytes, then the queue: the event loop waits for both.
                    if !budget.try_charge(&mut inbound) {
                        m_buffer_full.increment(1);
                        budget.charge(&mut inbound).await;
                    }
                    // Backpressure: while the pipeline is full, the event loop is not polled,
                    // so the socket is not read either.
                    if tx.send(inbound).await.is_err() {
                        anyhow::bail!("the pipeline closed its channel");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        warn!(error = %e, "lost the external broker connection");
                    }
                    connected = false;
                    m_connected.set(0.0);
                    m_reconnects.increment(1);
                    // Invalidate acks of the old connection first, then purge the PUBACKs the
                    // acker may have queued between the event loop's own clean-up and now.
                    {
                        let mut g = generation.lock().unwrap_or_else(|e| e.into_inner());
                        *g += 1;
                        current_gen = *g;
                    }
                    eventloop.clean();
                    let level_error = matches!(e, rumqttc::ConnectionError::ConnectionRefused(_));
                    if level_error {
                        error!(error = %e, "external broker refused the connection; retrying in {backoff:?}");
                    } else {
                        info!(error = %e, "reconnecting to external broker in {backoff:?}");
                    }
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(backoff_max);
                }
            },
        }
    }

    drop(target);
    if connected {
        // Requests are sent in order: the released acks go out before the DISCONNECT, which
        // keeps the session (clean_session = false).
        let _ = client.try_disconnect();
        if timeout(Duration::from_secs(2), disconnect(&mut eventloop))
            .await
            .is_err()
        {
            debug!("the broker did not close the connection after DISCONNECT");
        }
    }
    m_connected.set(0.0);
    info!("external ingest stopped");
    Ok(())
}

/// Sends the queued requests up to and including DISCONNECT, then waits for the broker to
/// close the connection, so everything sent (the last PUBACKs) has been processed before a
/// new session with this client id can start.
async fn disconnect(eventloop: &mut EventLoop) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Disconnect)) => debug!("DISCONNECT sent"),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn mqtt_options(cfg: &ExternalConfig) -> anyhow::Result<MqttOptions> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_s)))
        .set_max_packet_size(cfg.max_packet_bytes, 64 * 1024);
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(ca) = &cfg.ca {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let client_auth = match (&cfg.cert, &cfg.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: read(ca)?,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

/// Queues released acks on the client, dropping those of an older connection generation.
///
/// The generation lock is held while queueing (never across an await), so the event loop task
/// cannot bump the generation between the check and the queueing.
async fn ack_loop(
    client: AsyncClient,
    generation: Arc<Mutex<u64>>,
    mut rx: mpsc::UnboundedReceiver<Vec<PendingAck>>,
) {
    let m_stale = metrics::counter!(telemetry::INGEST_ACKS_STALE_TOTAL);
    while let Some(batch) = rx.recv().await {
        let mut rest = &batch[..];
        while !rest.is_empty() {
            let full = {
                let guard = generation.lock().unwrap_or_else(|e| e.into_inner());
                let current = *guard;
                let mut full = false;
                while let Some((a, tail)) = rest.split_first() {
                    if a.generation != current {
                        m_stale.increment(1);
                        rest = tail;
                        continue;
                    }
                    let publish = Publish {
                        dup: false,
                        qos: a.qos,
                        retain: false,
                        topic: String::new(),
                        pkid: a.pkid,
                        payload: Bytes::new(),
                    };
                    match client.try_ack(&publish) {
                        Ok(()) => rest = tail,
                        Err(ClientError::TryRequest(_) | ClientError::Request(_)) => {
                            full = true;
                            break;
                        }
                    }
                }
                drop(guard);
                full
            };
            if full {
                // The request channel is full (or the event loop is gone and this task is
                // about to be aborted): give the event loop time to drain it.
                sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
