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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use proto::uplink::{
    GatewayStatus, MAX_MISSED_PER_STATUS, MissedReport, QuarantineReport, ReplayRequest, SeqSpan,
    replay_topic, results_topic, status_topic,
};
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, TlsConfiguration,
    Transport,
};
use serde::Deserialize;
use settings::Invalid;
use tokio_util::sync::CancellationToken;

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

    fn options(&self, gateway: &str) -> anyhow::Result<MqttOptions> {
        let id = self
            .client_id
            .clone()
            .unwrap_or_else(|| gateway.to_string());
        let mut o = MqttOptions::new(id, self.host.clone(), self.port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(u64::from(self.keep_alive_s)))
            .set_inflight(self.max_in_flight)
            .set_request_channel_capacity(usize::from(self.max_in_flight) * 2 + 8)
            // (incoming, outgoing): replay requests are tiny; a batch is at most
            // max_batch_bytes plus one result (a batch always takes at least one).
            .set_max_packet_size(64 * 1024, self.max_batch_bytes * 2 + 64 * 1024);
        if self.tls {
            let read = |what: &str, p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("uplink.{what}: reading {}", p.display()))
            };
            let ca = read("ca", self.ca.as_ref().expect("validated"))?;
            let client_auth = match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some((read("cert", c)?, read("key", k)?)),
                _ => None,
            };
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn: self.alpn.clone().map(|a| vec![a.into_bytes()]),
                client_auth,
            }));
        }
        Ok(o)
    }
}

/// What `status` shows about the link.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkState {
    pub connected: bool,
    pub last_error: Option<String>,
    /// Epoch ms of the last acknowledgement from the cloud broker.
    pub last_ack_at: Option<i64>,
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
}

/// What one status message reported: missed-record ids, quarantines (by `at`).
#[derive(Debug, Clone, Default)]
struct Carried {
    missed: Vec<u64>,
    quarantines: Vec<i64>,
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
    tracing::info!(host = %cfg.host, port = cfg.port, tls = cfg.tls, "uplink starting");
    loop {
        let opts = cfg.options(&gateway)?;
        let mut link = Link::new(&cfg, &gateway, &outbox, &missed, opts);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = link.run(&status) => Some(r),
        };
        status.update(|s| s.connected = false);
        metrics::gauge!(m::UPLINK_CONNECTED).set(0.0);
        let Some(err) = outcome else {
            let _ = link.client.try_disconnect();
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
fn jitter(d: Duration) -> Duration {
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
    client: AsyncClient,
    events: EventLoop,
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
        opts: MqttOptions,
    ) -> Self {
        let (client, events) = AsyncClient::new(opts, usize::from(cfg.max_in_flight) * 2 + 8);
        Link {
            cfg,
            gateway,
            topic: results_topic(gateway),
            replay_topic: replay_topic(gateway),
            status_topic: status_topic(gateway),
            outbox,
            missed,
            client,
            events,
            connected: false,
            acked_any: false,
            cursor: outbox.first_pending(),
            queued: VecDeque::new(),
            by_pkid: HashMap::new(),
            acked: BTreeMap::new(),
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
            let event = tokio::select! {
                ev = self.events.poll() => ev,
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
            Event::Incoming(Incoming::ConnAck(_)) => {
                tracing::info!(host = %self.cfg.host, "uplink connected");
                self.connected = true;
                status.update(|s| {
                    s.connected = true;
                    s.last_error = None;
                });
                metrics::gauge!(m::UPLINK_CONNECTED).set(1.0);
                self.client
                    .try_subscribe(self.replay_topic.clone(), QoS::AtLeastOnce)?;
                // Right away: what the broker acknowledged before a disconnect may not have
                // reached the cloud, and no later batch may come to show it.
                self.send_status()?;
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let sent = self
                    .queued
                    .pop_front()
                    .context("the MQTT client sent a publish the uplink did not queue")?;
                self.by_pkid.insert(pkid, sent);
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                if let Some(sent) = self.by_pkid.remove(&ack.pkid) {
                    self.acked_any = true;
                    status.update(|s| s.last_ack_at = Some(now_ms()));
                    if let Some(carried) = sent.status {
                        self.reported(&carried)?;
                    } else if !sent.replay {
                        self.acked.insert(sent.first, (sent.last, sent.bytes));
                        self.release()?;
                    }
                }
            }
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.replay_topic => {
                match serde_json::from_slice::<ReplayRequest>(&p.payload) {
                    Ok(r) => self.on_replay(r),
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed replay request"),
                }
            }
            _ => {}
        }
        Ok(())
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
        self.client
            .try_publish(self.status_topic.clone(), QoS::AtLeastOnce, false, body)?;
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
        self.reporting
            .missed
            .retain(|id| !carried.missed.contains(id));
        self.reporting
            .quarantines
            .retain(|at| !carried.quarantines.contains(at));
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
        while self.in_flight() < usize::from(self.cfg.max_in_flight) {
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
            let (Some(&(first, _)), Some(&(last, _))) = (rows.first(), rows.last()) else {
                if replay {
                    continue;
                }
                return Ok(());
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
            self.client
                .try_publish(topic, QoS::AtLeastOnce, false, self.buf.clone())?;
            self.queued.push_back(Sent {
                first,
                last,
                bytes,
                replay,
                status: None,
            });
            if !replay {
                self.cursor = last + 1;
            }
            metrics::counter!(m::UPLINK_BATCHES).increment(1);
            metrics::counter!(m::UPLINK_RESULTS).increment(rows.len() as u64);
            metrics::counter!(m::UPLINK_BYTES).increment(self.buf.len() as u64);
        }
        Ok(())
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
