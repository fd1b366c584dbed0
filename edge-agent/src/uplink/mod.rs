//! Store-and-forward to the cloud: drains the outbox in `edge_seq` order over MQTT (TLS with a
//! client certificate, as AWS IoT Core expects) and serves the cloud's replay requests.
//!
//! A result is released from the outbox only when the broker's PUBACK for the very packet that
//! carried it arrives: the packet id each publish got is learnt from the event loop's
//! `Outgoing::Publish` events (in request order) and matched against `Incoming::PubAck`.
//! `publish()` returning means nothing, and rumqttc's own in-flight list is not trusted across
//! connections: every connection starts a fresh client and re-sends everything unacknowledged
//! from the outbox, so nothing depends on the client's memory. The cloud de-duplicates re-sent
//! results by `event_id`.
//!
//! Every `status_interval_s`, and right after each connect, the uplink publishes a
//! [`GatewayStatus`] on `gateways/{g}/status`: `released` (how far the broker acknowledged the
//! results, so the cloud can notice a lost tail that no later batch would reveal) and up to
//! [`MAX_MISSED_PER_STATUS`] missed-event records not yet reported, and any store quarantine not
//! yet reported (a damaged store moved aside at start-up: the cloud must hear of it, since the
//! results it held are not coming). A record is marked reported only when the PUBACK of the very
//! status packet that carried it arrives (the same packet-id matching as for results).
//!
//! A PUBACK that refuses (MQTT 5 reason code ≥ 0x80, [`refusal`]) releases nothing: a refused
//! batch is re-sent from the outbox after a hold with backoff, a refused status message's
//! records stay unreported for the next one, and a refused replay is dropped (the cloud asks
//! again). On MQTT 3.1.1 ([`mqtt`]) no refusal can be seen.

mod mqtt;
pub mod refusal;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use proto::uplink::{
    GatewayStatus, MAX_MISSED_PER_STATUS, MissedReport, QuarantineReport, ReplayRequest, SeqSpan,
    replay_topic, results_topic, status_topic,
};
use rumqttc::{TlsConfiguration, Transport};
use serde::Deserialize;
use settings::Invalid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use mqtt::Protocol;
use mqtt::{Event, Session, Settings};
use refusal::{LastRefusal, Refusal, Refusals};

use crate::ingest::now_ms;
use crate::missed::MissedRecord;
use crate::store::outbox::Outbox;
use crate::store::{Quarantine, StoreReader};
use crate::telemetry as m;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// Off by default: the example config runs without a cloud.
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// `"5"` (default) or `"3.1.1"`: only MQTT 5 lets the broker refuse a publish (its ACL),
    /// so that the results stay in the outbox; on 3.1.1 such a drop looks like delivery.
    pub protocol: Protocol,
    /// Defaults to the gateway id.
    pub client_id: Option<String>,
    /// TLS is on unless explicitly turned off (plain TCP only for local set-ups).
    pub tls: bool,
    /// CA certificate(s) (PEM) that sign the cloud broker's certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// ALPN protocol, e.g. `x-amzn-mqtt-ca` for AWS IoT Core on port 443.
    pub alpn: Option<String>,
    /// Short, so a dead link is noticed within about 1.5× this.
    pub keep_alive_s: u16,
    pub max_batch_results: usize,
    /// Keep under the broker's message limit (AWS IoT Core: 128 KiB).
    pub max_batch_bytes: usize,
    /// Batches published and not yet released: handed to the client, waiting for their PUBACK,
    /// or acknowledged out of order behind one that is (`edge_uplink_in_flight`). The outbox
    /// is read only while there is room, so memory stays at about this many batches.
    pub max_in_flight: u16,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Seconds between status messages on `gateways/{g}/status` (one is also sent right
    /// after each connect).
    pub status_interval_s: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 8883,
            protocol: Protocol::default(),
            client_id: None,
            tls: true,
            ca: None,
            cert: None,
            key: None,
            alpn: None,
            keep_alive_s: 10,
            max_batch_results: 256,
            max_batch_bytes: 120 * 1024,
            max_in_flight: 16,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            status_interval_s: 30,
        }
    }
}

impl UplinkConfig {
    /// Errors name the field under `uplink`.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.enabled {
            return Ok(());
        }
        if self.host.is_empty() {
            return Err(Invalid::at("uplink.host", "must not be empty"));
        }
        if self.tls && self.ca.is_none() {
            return Err(Invalid::at(
                "uplink.ca",
                "required with TLS (the CA that signs the cloud broker's \
                 certificate); set uplink.tls = false only for a local plain-TCP broker",
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(Invalid::at("uplink.cert/uplink.key", "set both or neither"));
        }
        if !self.tls && self.cert.is_some() {
            return Err(Invalid::at(
                "uplink.cert",
                "a client certificate needs tls = true",
            ));
        }
        if self.max_batch_results == 0 || self.max_in_flight == 0 {
            return Err(Invalid::at(
                "uplink.max_batch_results/max_in_flight",
                "must be at least 1",
            ));
        }
        if self.keep_alive_s == 0 {
            return Err(Invalid::at("uplink.keep_alive_s", "must be at least 1"));
        }
        if self.protocol == Protocol::V5 && self.keep_alive_s < mqtt::MIN_KEEP_ALIVE_V5_S {
            return Err(Invalid::at(
                "uplink.keep_alive_s",
                format!(
                    "must be at least {} with protocol = \"5\"",
                    mqtt::MIN_KEEP_ALIVE_V5_S
                ),
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(Invalid::at(
                "uplink.reconnect_min_ms/reconnect_max_ms",
                "need 0 < min <= max",
            ));
        }
        if self.status_interval_s == 0 {
            return Err(Invalid::at(
                "uplink.status_interval_s",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn settings(&self, gateway: &str) -> anyhow::Result<Settings> {
        let mut s = Settings {
            protocol: self.protocol,
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| gateway.to_string()),
            host: self.host.clone(),
            port: self.port,
            keep_alive: Duration::from_secs(u64::from(self.keep_alive_s)),
            max_in_flight: self.max_in_flight,
            capacity: usize::from(self.max_in_flight) * 2 + 8,
            // Replay requests are tiny; a batch is at most max_batch_bytes plus one result
            // (a batch always takes at least one).
            max_incoming: 64 * 1024,
            max_outgoing: self.max_batch_bytes * 2 + 64 * 1024,
            transport: None,
        };
        if self.tls {
            let read = |what: &str, p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("uplink.{what}: reading {}", p.display()))
            };
            let ca = read("ca", self.ca.as_ref().expect("validated"))?;
            let client_auth = match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some((read("cert", c)?, read("key", k)?)),
                _ => None,
            };
            s.transport = Some(Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn: self.alpn.clone().map(|a| vec![a.into_bytes()]),
                client_auth,
            }));
        }
        Ok(s)
    }
}

/// What `status` shows about the link.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkState {
    pub connected: bool,
    pub last_error: Option<String>,
    /// Epoch ms of the last acknowledgement from the cloud broker (that accepted a publish).
    pub last_ack_at: Option<i64>,
    /// Publishes the broker refused since start, by reason (MQTT 5 PUBACK reason codes).
    pub refused: BTreeMap<String, u64>,
    pub last_refusal: Option<LastRefusal>,
    /// Results are held back: the broker refused the last batch sent.
    pub refusing: bool,
}

/// Shared view of the link for status reporting.
#[derive(Clone, Default)]
pub struct LinkStatus(Arc<Mutex<LinkState>>);

impl LinkStatus {
    pub fn get(&self) -> LinkState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn refused(&self, why: Refusal, topic: &str, at: i64) {
        self.update(|s| {
            *s.refused.entry(why.reason().to_string()).or_default() += 1;
            s.last_refusal = Some(LastRefusal {
                at,
                reason: why.to_string(),
                topic: topic.to_string(),
            });
        });
    }

    fn set_refusing(&self, refusing: bool) {
        self.update(|s| s.refusing = refusing);
    }
}

/// One publish: a contiguous `edge_seq` range, or a status message.
#[derive(Debug, Clone)]
struct Sent {
    first: u64,
    last: u64,
    bytes: u64,
    /// A replay of already-released results: its ack releases nothing.
    replay: bool,
    /// A status message: its ack marks what it carried reported.
    status: Option<Carried>,
    /// The refusal round it was sent in ([`Refusals`]).
    round: u64,
}

/// What one status message reported: missed-record ids, quarantines (by `at`).
#[derive(Debug, Clone, Default)]
struct Carried {
    missed: Vec<u64>,
    quarantines: Vec<i64>,
}

impl Carried {
    /// Drops what `done` carried: its status message was answered, either way.
    fn remove(&mut self, done: &Carried) {
        self.missed.retain(|id| !done.missed.contains(id));
        self.quarantines.retain(|at| !done.quarantines.contains(at));
    }
}

/// The status message the uplink sends: `released` and the records to report.
pub fn status_message(
    gateway: &str,
    released: u64,
    at: i64,
    records: &[MissedRecord],
    quarantines: &[Quarantine],
) -> GatewayStatus {
    GatewayStatus {
        quarantines: quarantines
            .iter()
            .map(|q| QuarantineReport {
                at: q.at,
                moved_to: q.moved_to.display().to_string(),
                reason: q.reason.clone(),
            })
            .collect(),
        gateway: gateway.to_string(),
        released,
        at,
        missed: records
            .iter()
            .map(|r| MissedReport {
                id: r.id,
                device: r.device.clone(),
                first_seq: r.first_seq,
                last_seq: r.last_seq,
                count: r.count,
                ranges: r
                    .ranges
                    .iter()
                    .map(|s| SeqSpan {
                        first: s.first,
                        last: s.last,
                    })
                    .collect(),
                declared_at: r.declared_at,
            })
            .collect(),
    }
}

/// Runs until `shutdown`; reconnects with exponential backoff and full jitter.
pub async fn run(
    cfg: UplinkConfig,
    gateway: String,
    outbox: Outbox,
    missed: StoreReader,
    status: LinkStatus,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(cfg.reconnect_min_ms);
    let max_backoff = Duration::from_millis(cfg.reconnect_max_ms);
    let protocol = match cfg.protocol {
        Protocol::V5 => "5",
        Protocol::V311 => "3.1.1",
    };
    tracing::info!(host = %cfg.host, port = cfg.port, tls = cfg.tls, protocol, "uplink starting");
    let mut refusals = Refusals::new(
        Duration::from_millis(cfg.reconnect_min_ms),
        max_backoff,
        status.clone(),
    );
    loop {
        let session = Session::new(cfg.settings(&gateway)?);
        let mut link = Link::new(&cfg, &gateway, &outbox, &missed, session, &mut refusals);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = link.run(&status) => Some(r),
        };
        status.update(|s| s.connected = false);
        metrics::gauge!(m::UPLINK_CONNECTED).set(0.0);
        let Some(err) = outcome else {
            link.session.disconnect();
            return Ok(());
        };
        if link.acked_any {
            backoff = Duration::from_millis(cfg.reconnect_min_ms);
        }
        let delay = jitter(backoff);
        tracing::warn!(error = format!("{err:#}"), retry_in = ?delay, "uplink disconnected");
        status.update(|s| s.last_error = Some(format!("{err:#}")));
        metrics::counter!(m::UPLINK_RECONNECTS).increment(1);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// A delay drawn uniformly from [d/2, d]: spreads a fleet's reconnects after a cloud outage.
pub(crate) fn jitter(d: Duration) -> Duration {
    d / 2 + d.mul_f64(fastrand::f64() / 2.0)
}

/// Replay requests waiting at once; one more is dropped and counted
/// (`edge_replay_requests_dropped_total`): the cloud asks again when its gap hold expires.
pub const MAX_PENDING_REPLAYS: usize = 64;

/// One connection's worth of state; dropped (with the client) when the connection fails.
struct Link<'a> {
    cfg: &'a UplinkConfig,
    gateway: &'a str,
    topic: String,
    replay_topic: String,
    status_topic: String,
    outbox: &'a Outbox,
    missed: &'a StoreReader,
    session: Session,
    refusals: &'a mut Refusals,
    connected: bool,
    acked_any: bool,
    /// Next `edge_seq` to send.
    cursor: u64,
    /// Publishes handed to the client, waiting for their packet id.
    queued: VecDeque<Sent>,
    by_pkid: HashMap<u16, Sent>,
    /// Acknowledged ranges not yet contiguous with what was released: first → (last, bytes).
    /// They count against `max_in_flight` with `queued` and `by_pkid`.
    acked: BTreeMap<u64, (u64, u64)>,
    /// Ranges the broker refused, sent again before anything new: first → last.
    refused: BTreeMap<u64, u64>,
    /// Replay requests not yet served, at most [`MAX_PENDING_REPLAYS`].
    replays: VecDeque<(u64, u64)>,
    /// Missed-record ids and quarantines in a status message not yet acknowledged.
    reporting: Carried,
    buf: Vec<u8>,
}

impl<'a> Link<'a> {
    fn new(
        cfg: &'a UplinkConfig,
        gateway: &'a str,
        outbox: &'a Outbox,
        missed: &'a StoreReader,
        session: Session,
        refusals: &'a mut Refusals,
    ) -> Self {
        Link {
            cfg,
            gateway,
            topic: results_topic(gateway),
            replay_topic: replay_topic(gateway),
            status_topic: status_topic(gateway),
            outbox,
            missed,
            session,
            refusals,
            connected: false,
            acked_any: false,
            cursor: outbox.first_pending(),
            queued: VecDeque::new(),
            by_pkid: HashMap::new(),
            acked: BTreeMap::new(),
            refused: BTreeMap::new(),
            replays: VecDeque::new(),
            reporting: Carried::default(),
            buf: Vec::new(),
        }
    }

    /// Returns only with the error that ended the connection.
    async fn run(&mut self, status: &LinkStatus) -> anyhow::Error {
        let period = Duration::from_secs(self.cfg.status_interval_s.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hold = self.refusals.hold_ends(Instant::now());
            let event = tokio::select! {
                ev = self.session.poll() => ev,
                // The hold after a refusal is over: offer results again.
                _ = tokio::time::sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => {
                    if let Err(e) = self.fill() {
                        return e;
                    }
                    continue;
                }
                _ = self.outbox.wait_appended(), if self.connected => {
                    if let Err(e) = self.fill() {
                        return e;
                    }
                    continue;
                }
                _ = tick.tick(), if self.connected => {
                    if let Err(e) = self.send_status() {
                        return e;
                    }
                    continue;
                }
            };
            let result = match event {
                Ok(ev) => self.on_event(ev, status),
                Err(e) => return anyhow::Error::new(e).context("uplink connection"),
            };
            if let Err(e) = result.and_then(|()| self.fill()) {
                return e;
            }
        }
    }

    fn on_event(&mut self, ev: Event, status: &LinkStatus) -> anyhow::Result<()> {
        match ev {
            Event::Connected => {
                tracing::info!(host = %self.cfg.host, "uplink connected");
                self.connected = true;
                status.update(|s| {
                    s.connected = true;
                    s.last_error = None;
                });
                metrics::gauge!(m::UPLINK_CONNECTED).set(1.0);
                self.session.subscribe(self.replay_topic.clone())?;
                // Right away: what the broker acknowledged before a disconnect may not have
                // reached the cloud, and no later batch may come to show it.
                self.send_status()?;
            }
            Event::Sent(pkid) => {
                let sent = self
                    .queued
                    .pop_front()
                    .context("the MQTT client sent a publish the uplink did not queue")?;
                self.by_pkid.insert(pkid, sent);
            }
            Event::Acked(pkid, refusal) => {
                if let Some(sent) = self.by_pkid.remove(&pkid) {
                    self.acked_any = true;
                    match refusal {
                        None => self.accepted(sent, status)?,
                        Some(why) => self.refused(sent, why),
                    }
                }
            }
            Event::SubscribeRefused => tracing::warn!(
                topic = %self.replay_topic,
                "the cloud broker refused the replay subscription: replay requests will not arrive"
            ),
            Event::Message { topic, payload } if topic == self.replay_topic.as_bytes() => {
                match serde_json::from_slice::<ReplayRequest>(&payload) {
                    Ok(r) => self.on_replay(r),
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed replay request"),
                }
            }
            Event::Message { .. } | Event::Other => {}
        }
        Ok(())
    }

    /// The broker took `sent`: results are released, a status's records reported.
    fn accepted(&mut self, sent: Sent, status: &LinkStatus) -> anyhow::Result<()> {
        status.update(|s| s.last_ack_at = Some(now_ms()));
        if let Some(carried) = sent.status {
            return self.reported(&carried);
        }
        self.refusals.accepted(sent.round);
        if !sent.replay {
            self.acked.insert(sent.first, (sent.last, sent.bytes));
            self.release()?;
        }
        Ok(())
    }

    /// The broker dropped `sent`: nothing is released or reported.
    fn refused(&mut self, sent: Sent, why: Refusal) {
        let now = Instant::now();
        let topic = match sent.status {
            Some(_) => &self.status_topic,
            None => &self.topic,
        };
        self.refusals.count(why, topic, now);
        match sent.status {
            // Its records go in the next status message.
            Some(carried) => {
                self.reporting.remove(&carried);
            }
            None => {
                if !sent.replay {
                    self.refused.insert(sent.first, sent.last);
                }
                self.refusals.hold(sent.round, now);
            }
        }
    }

    /// Releases the longest acknowledged run that starts right after what is released.
    fn release(&mut self) -> anyhow::Result<()> {
        let mut through = self.outbox.first_pending() - 1;
        let mut bytes = 0;
        while let Some(entry) = self.acked.first_entry() {
            let first = *entry.key();
            let (last, b) = *entry.get();
            if first > through + 1 {
                break;
            }
            entry.remove();
            if last > through {
                through = last;
                bytes += b;
            }
        }
        if bytes > 0 {
            self.outbox.release(through, bytes)?;
        }
        Ok(())
    }

    /// Publishes a status message (QoS 1) with the records not yet reported.
    fn send_status(&mut self) -> anyhow::Result<()> {
        let released = self.outbox.first_pending() - 1;
        let in_flight = &self.reporting;
        let records: Vec<MissedRecord> = self
            .missed
            .missed_unreported(MAX_MISSED_PER_STATUS + in_flight.missed.len())?
            .into_iter()
            .filter(|r| !in_flight.missed.contains(&r.id))
            .take(MAX_MISSED_PER_STATUS)
            .collect();
        let mut quarantines = self.missed.quarantines_unreported()?;
        quarantines.retain(|q| !in_flight.quarantines.contains(&q.at));
        let msg = status_message(self.gateway, released, now_ms(), &records, &quarantines);
        let body = serde_json::to_vec(&msg).context("encoding the status message")?;
        self.session.publish(self.status_topic.clone(), body)?;
        let carried = Carried {
            missed: records.iter().map(|r| r.id).collect(),
            quarantines: quarantines.iter().map(|q| q.at).collect(),
        };
        self.reporting.missed.extend(&carried.missed);
        self.reporting.quarantines.extend(&carried.quarantines);
        self.queued.push_back(Sent {
            first: 0,
            last: 0,
            bytes: 0,
            replay: false,
            status: Some(carried),
            round: self.refusals.round(),
        });
        metrics::counter!(m::UPLINK_STATUS).increment(1);
        tracing::debug!(
            released,
            missed = records.len(),
            quarantines = quarantines.len(),
            "status sent"
        );
        Ok(())
    }

    /// The broker acknowledged a status message: its records are reported.
    fn reported(&mut self, carried: &Carried) -> anyhow::Result<()> {
        self.reporting.remove(carried);
        if !carried.quarantines.is_empty() {
            self.missed
                .mark_quarantines_reported(&carried.quarantines)?;
            tracing::info!(
                quarantines = carried.quarantines.len(),
                "store quarantines reported to the cloud"
            );
        }
        let ids = &carried.missed;
        if ids.is_empty() {
            return Ok(());
        }
        self.missed.mark_missed_reported(ids)?;
        metrics::counter!(m::MISSED_REPORTED).increment(ids.len() as u64);
        tracing::info!(
            records = ids.len(),
            "missed-event records reported to the cloud"
        );
        if ids.len() >= MAX_MISSED_PER_STATUS {
            // More may be waiting: the next status right away rather than in a period.
            self.send_status()?;
        }
        Ok(())
    }

    fn on_replay(&mut self, r: ReplayRequest) {
        metrics::counter!(m::REPLAY_REQUESTS).increment(1);
        // Pending results are sent anyway; only released ones need replaying.
        let to = r.to.min(self.outbox.first_pending() - 1);
        tracing::info!(from = r.from, to = r.to, "cloud asked for a replay");
        if r.from > to || self.replays.contains(&(r.from, to)) {
            return;
        }
        if self.replays.len() >= MAX_PENDING_REPLAYS {
            metrics::counter!(m::REPLAY_DROPPED).increment(1);
            tracing::warn!(
                from = r.from,
                to,
                "replay request dropped: {MAX_PENDING_REPLAYS} already wait"
            );
            return;
        }
        self.replays.push_back((r.from, to));
    }

    /// Batches (and status messages) not yet released, of `max_in_flight`.
    fn in_flight(&self) -> usize {
        self.queued.len() + self.by_pkid.len() + self.acked.len()
    }

    /// Publishes batches while the in-flight window has room.
    fn fill(&mut self) -> anyhow::Result<()> {
        let r = self.fill_window();
        metrics::gauge!(m::UPLINK_IN_FLIGHT).set(self.in_flight() as f64);
        r
    }

    fn fill_window(&mut self) -> anyhow::Result<()> {
        if !self.connected {
            return Ok(());
        }
        self.cursor = self.cursor.max(self.outbox.first_pending());
        loop {
            let window = self
                .refusals
                .window(Instant::now(), usize::from(self.cfg.max_in_flight));
            if self.in_flight() >= window {
                return Ok(());
            }
            // A refused range first (it blocks the release of everything after it), then
            // replays, then what was never sent.
            if let Some((first, last)) = self.refused.pop_first() {
                let rows = self.outbox.read(
                    first,
                    self.cfg.max_batch_results,
                    self.cfg.max_batch_bytes,
                )?;
                let rows: Vec<_> = rows.into_iter().filter(|(s, _)| *s <= last).collect();
                // Gone (drop_oldest) if empty.
                self.send(&rows, false)?;
                continue;
            }
            let (from, replay) = match self.replays.front() {
                Some(&(from, _)) => (from, true),
                None => (self.cursor, false),
            };
            let rows =
                self.outbox
                    .read(from, self.cfg.max_batch_results, self.cfg.max_batch_bytes)?;
            let rows: Vec<_> = match self.replays.front_mut() {
                Some((_, to)) => {
                    let to = *to;
                    let rows: Vec<_> = rows.into_iter().filter(|(s, _)| *s <= to).collect();
                    let last = rows.last().map_or(to, |(s, _)| *s);
                    // Results already trimmed from the window cannot be replayed.
                    let unavailable = rows.first().map_or(to + 1 - from, |(s, _)| s - from);
                    metrics::counter!(m::REPLAY_UNAVAILABLE).increment(unavailable);
                    if last >= to || rows.is_empty() {
                        self.replays.pop_front();
                    } else if let Some(front) = self.replays.front_mut() {
                        front.0 = last + 1;
                    }
                    rows
                }
                None => rows,
            };
            let Some(last) = self.send(&rows, replay)? else {
                if replay {
                    continue;
                }
                return Ok(());
            };
            if !replay {
                self.cursor = last + 1;
            }
        }
    }

    /// Publishes `rows` as one batch; the last `edge_seq` it carried, `None` if empty.
    fn send(&mut self, rows: &[(u64, sled::IVec)], replay: bool) -> anyhow::Result<Option<u64>> {
        let (Some(&(first, _)), Some(&(last, _))) = (rows.first(), rows.last()) else {
            return Ok(None);
        };
        let bytes: u64 = rows.iter().map(|(_, v)| v.len() as u64).sum();
        self.buf.clear();
        proto::wire::encode_batch_raw(
            self.gateway,
            rows.iter().map(|(_, v)| v.as_ref()),
            &mut self.buf,
        );
        let topic = if !replay && crate::fault::drop_next_batch(first, last) {
            crate::fault::SINK_TOPIC.to_string()
        } else {
            self.topic.clone()
        };
        self.session.publish(topic, self.buf.clone())?;
        self.queued.push_back(Sent {
            first,
            last,
            bytes,
            replay,
            status: None,
            round: self.refusals.round(),
        });
        metrics::counter!(m::UPLINK_BATCHES).increment(1);
        metrics::counter!(m::UPLINK_RESULTS).increment(rows.len() as u64);
        metrics::counter!(m::UPLINK_BYTES).increment(self.buf.len() as u64);
        Ok(Some(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn tls_needs_a_ca_and_plain_must_be_explicit() {
        let mut c = UplinkConfig {
            enabled: true,
            ..UplinkConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), Some("uplink.ca"));
        c.tls = false;
        c.validate().unwrap();
        c.cert = Some("c.pem".into());
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("uplink.cert/uplink.key")
        );
    }

    #[test]
    fn the_status_carries_released_and_the_records() {
        let mut r = MissedRecord::new(4, "meter-1", engine::SeqRange::new(3, 9), 10, 20);
        r.fill(engine::SeqRange::new(5, 5));
        let s = status_message("gw", 17, 99, std::slice::from_ref(&r), &[]);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["gateway"], "gw");
        assert_eq!(v["released"], 17);
        assert_eq!(v["at"], 99);
        assert_eq!(
            v["missed"][0],
            serde_json::json!({"id": 4, "device": "meter-1", "first_seq": 3, "last_seq": 9,
                "count": 6, "ranges": [{"first": 3, "last": 4}, {"first": 6, "last": 9}],
                "declared_at": 20})
        );
        assert_eq!(
            UplinkConfig::default().status_interval_s,
            30,
            "the documented default"
        );
    }
}
