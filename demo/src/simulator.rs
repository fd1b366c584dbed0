//! Simulated devices for `edge-agent demo`: energy meters, environment sensors and GPS trucks
//! of `config/edge-agent.toml`, each its own MQTT client (rumqttc, QoS 1) publishing to the
//! agent's endpoint at a modest rate.
//!
//! Besides plausible readings a device sends, at random and counted by kind:
//! - **invalid** payloads the agent must dead-letter: malformed JSON (stage `decode`), a missing
//!   or out-of-range field or an unknown event type (`schema`), a broken business rule
//!   (`rule`: a meter counter going backwards, 0 % humidity, a GPS tracker without a fix);
//! - **spikes**: a meter register jump or a GPS position jump (the calculation's checks reject
//!   them: `check`), a temperature jump (plausible, accepted);
//! - **duplicates**: its previous reading sent again (same id and seq);
//! - **gaps**: a sequence number skipped (an event that never comes);
//! - **late**: a reading held back and sent right after the next one, so it arrives late
//!   (the next one, calculated across it, is then corrected by the agent or the bridge).
//!
//! [`SimStats`] counts what was published (acknowledged by the endpoint) and what the agent
//! should make of it, so the demo can set the agent's figures against it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What the simulated fleet looks like.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The agent's embedded endpoint.
    pub addr: SocketAddr,
    /// Messages per second per device.
    pub rate: f64,
    /// Per mille of messages that are invalid, spikes, duplicates and gaps.
    pub invalid_pm: u32,
    pub spike_pm: u32,
    pub duplicate_pm: u32,
    pub gap_pm: u32,
    pub late_pm: u32,
    /// Makes a run repeatable (each device derives its own generator from it).
    pub seed: u64,
}

impl SimConfig {
    pub fn new(addr: SocketAddr) -> SimConfig {
        SimConfig {
            addr,
            rate: 2.0,
            invalid_pm: 80,
            spike_pm: 30,
            duplicate_pm: 40,
            gap_pm: 30,
            late_pm: 20,
            seed: 7,
        }
    }
}

/// The fleet: (device, event type). The names match the types' `allowed_devices`.
pub const DEVICES: [(&str, &str); 9] = [
    ("meter-001", "meter"),
    ("meter-002", "meter"),
    ("meter-003", "meter"),
    ("env-1", "environment"),
    ("env-2", "environment"),
    ("env-3", "environment"),
    ("truck-1", "gps"),
    ("truck-2", "gps"),
    ("van-1", "gps"),
];

/// Counts, shared with the demo's summary.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Devices connected to the endpoint now.
    pub connected: AtomicU64,
    /// Publishes handed to the MQTT clients, and those the endpoint acknowledged.
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Plausible readings (each should become a result), spikes included.
    pub valid: AtomicU64,
    /// What the agent should dead-letter, by stage: decode, schema, rule, check.
    pub expect_dlq: [AtomicU64; 4],
    pub spikes: AtomicU64,
    pub duplicates: AtomicU64,
    /// Sequence numbers skipped.
    pub gaps: AtomicU64,
    /// Readings sent after the next one.
    pub late: AtomicU64,
}

/// The stages of [`SimStats::expect_dlq`].
pub const DLQ_STAGES: [&str; 4] = ["decode", "schema", "rule", "check"];

impl SimStats {
    pub fn expected_dlq(&self) -> u64 {
        self.expect_dlq
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the fleet until `stop`, then lets every device's outstanding publishes be
/// acknowledged (up to a few seconds) and disconnects.
pub async fn run(cfg: SimConfig, stats: Arc<SimStats>, stop: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (name, kind)) in DEVICES.into_iter().enumerate() {
        let dev = Device::new(name, kind, cfg.seed.wrapping_add(i as u64 * 7919));
        tasks.spawn(dev.run(cfg.clone(), Arc::clone(&stats), stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// One message about to be sent, and what the agent should make of it.
enum Outcome {
    Valid,
    Dlq(usize),
    Duplicate,
}

struct Device {
    name: &'static str,
    kind: &'static str,
    rng: fastrand::Rng,
    seq: u64,
    /// The last reading sent that the agent accepts (its state: what the next one is relative to).
    last: Option<(i64, Reading)>,
    last_payload: Option<Vec<u8>>,
    /// A reading held back, sent right after the next message (it then arrives late).
    held: Option<(String, Vec<u8>)>,
    topic: String,
}

#[derive(Debug, Clone, Copy)]
enum Reading {
    Meter { kwh: f64 },
    Env { temp: f64, hum: f64 },
    Gps { lat: f64, lon: f64, heading: f64 },
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

impl Device {
    fn new(name: &'static str, kind: &'static str, seed: u64) -> Device {
        Device {
            name,
            kind,
            rng: fastrand::Rng::with_seed(seed),
            seq: 0,
            last: None,
            last_payload: None,
            held: None,
            topic: format!("devices/{name}/events/{kind}"),
        }
    }

    async fn run(mut self, cfg: SimConfig, stats: Arc<SimStats>, stop: CancellationToken) {
        let mut opts = MqttOptions::new(self.name, cfg.addr.ip().to_string(), cfg.addr.port());
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let poller = tokio::spawn({
            let (stats, acked) = (Arc::clone(&stats), Arc::clone(&acked));
            async move {
                let mut connected = false;
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                            connected = true;
                            stats.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Incoming::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                            stats.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "simulated device: connection error");
                            if connected {
                                connected = false;
                                stats.connected.fetch_sub(1, Ordering::Relaxed);
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                if connected {
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                }
            }
        });

        let period = Duration::from_secs_f64(1.0 / cfg.rate.max(0.01));
        // Devices start spread over one period, not in lockstep.
        let first = period.mul_f64(self.rng.f64());
        let mut next = tokio::time::Instant::now() + first;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
            next += period.mul_f64(0.8 + 0.4 * self.rng.f64());
            let Some((topic, payload, outcome)) = self.next_message(&cfg, &stats) else {
                continue;
            };
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            SimStats::add(&stats.sent);
            match outcome {
                Outcome::Valid => SimStats::add(&stats.valid),
                Outcome::Dlq(stage) => SimStats::add(&stats.expect_dlq[stage]),
                Outcome::Duplicate => SimStats::add(&stats.duplicates),
            }
            // A held-back reading goes right after the one that overtook it.
            if let Some((topic, payload)) = self.held.take() {
                if client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                SimStats::add(&stats.sent);
                SimStats::add(&stats.valid);
            }
        }
        // Let the endpoint acknowledge what is in flight, then leave.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while acked.load(Ordering::Relaxed) < sent.load(Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    }

    /// The next message: mostly a plausible reading, sometimes one of the faults.
    /// `None`: a reading was taken and held back (it goes after the next message).
    fn next_message(
        &mut self,
        cfg: &SimConfig,
        stats: &SimStats,
    ) -> Option<(String, Vec<u8>, Outcome)> {
        let roll = self.rng.u32(0..1000);
        let mut t = cfg.invalid_pm;
        if roll < t {
            return Some(self.invalid());
        }
        t += cfg.duplicate_pm;
        if roll < t
            && let Some(p) = self.last_payload.clone()
        {
            return Some((self.topic.clone(), p, Outcome::Duplicate));
        }
        t += cfg.spike_pm;
        if roll < t
            && let Some(m) = self.spike()
        {
            SimStats::add(&stats.spikes);
            return Some(m);
        }
        t += cfg.late_pm;
        if roll < t && self.last.is_some() && self.held.is_none() {
            // Taken now, sent after the next reading.
            let (topic, held, _) = self.reading();
            self.held = Some((topic, held));
            SimStats::add(&stats.late);
            return None;
        }
        t += cfg.gap_pm;
        if roll < t && self.last.is_some() {
            self.seq += 1; // this one never comes
            SimStats::add(&stats.gaps);
        }
        Some(self.reading())
    }

    fn envelope(&mut self, ts: i64, data: serde_json::Value) -> Vec<u8> {
        self.seq += 1;
        let id = format!("{}-{}", self.name, self.seq);
        json!({"id": id, "seq": self.seq, "ts": ts, "data": data})
            .to_string()
            .into_bytes()
    }

    /// A plausible reading relative to the last accepted one.
    fn reading(&mut self) -> (String, Vec<u8>, Outcome) {
        let ts = now_ms();
        let dt_s = self.last.map_or(0.0, |(t, _)| (ts - t) as f64 / 1000.0);
        let r = &mut self.rng;
        let (reading, data) = match (self.kind, self.last.map(|(_, r)| r)) {
            ("meter", prev) => {
                let kwh = match prev {
                    Some(Reading::Meter { kwh }) => kwh + (0.5 + 4.0 * r.f64()) * dt_s / 3600.0,
                    _ => 1000.0 + 9000.0 * r.f64(),
                };
                let data = json!({
                    "energy_kwh": round(kwh, 6),
                    "voltage_v": round(228.0 + 4.0 * r.f64(), 1),
                    "current_a": round(2.0 + 15.0 * r.f64(), 2),
                    "power_factor": round(0.9 + 0.1 * r.f64(), 3),
                });
                (Reading::Meter { kwh: round(kwh, 6) }, data)
            }
            ("environment", prev) => {
                let (temp, hum) = match prev {
                    Some(Reading::Env { temp, hum }) => (
                        (temp + r.f64() - 0.5).clamp(-10.0, 40.0),
                        (hum + 2.0 * r.f64() - 1.0).clamp(20.0, 90.0),
                    ),
                    _ => (15.0 + 10.0 * r.f64(), 40.0 + 30.0 * r.f64()),
                };
                let data = json!({
                    "temperature_c": round(temp, 2),
                    "humidity_pct": round(hum, 1),
                    "pressure_hpa": round(1000.0 + 25.0 * r.f64(), 1),
                    "battery_v": round(3.0 + 0.3 * r.f64(), 2),
                });
                (Reading::Env { temp, hum }, data)
            }
            (_, prev) => {
                let (lat, lon, heading) = match prev {
                    Some(Reading::Gps { lat, lon, heading }) => {
                        let heading = heading + (r.f64() - 0.5) * 0.6;
                        // 20–90 km/h
                        let m = (20.0 + 70.0 * r.f64()) / 3.6 * dt_s;
                        let dlat = m * heading.cos() / 111_320.0;
                        let dlon = m * heading.sin() / (111_320.0 * lat.to_radians().cos());
                        (lat + dlat, lon + dlon, heading)
                    }
                    _ => (
                        52.4 + 0.2 * r.f64(),
                        13.3 + 0.2 * r.f64(),
                        r.f64() * std::f64::consts::TAU,
                    ),
                };
                let data = json!({
                    "lat": round(lat, 6),
                    "lon": round(lon, 6),
                    "accuracy_m": round(2.0 + 8.0 * r.f64(), 1),
                    "fix": "3d",
                });
                let (lat, lon) = (round(lat, 6), round(lon, 6));
                (Reading::Gps { lat, lon, heading }, data)
            }
        };
        let payload = self.envelope(ts, data);
        self.last = Some((ts, reading));
        self.last_payload = Some(payload.clone());
        (self.topic.clone(), payload, Outcome::Valid)
    }

    /// An anomalous value; `None` before the device's first reading (nothing to spike from).
    fn spike(&mut self) -> Option<(String, Vec<u8>, Outcome)> {
        let (t0, prev) = self.last?;
        let ts = now_ms().max(t0 + 1);
        let (data, outcome) = match prev {
            // A register jump of hundreds of kWh in seconds: avg_power_w breaks the check.
            Reading::Meter { kwh } => (
                json!({"energy_kwh": round(kwh + 500.0, 6), "voltage_v": 230, "current_a": 5}),
                Outcome::Dlq(3),
            ),
            // A jump of ~50 km: faster than any road vehicle, the plausible_speed check.
            Reading::Gps { lat, lon, .. } => (
                json!({"lat": round(lat + 0.45, 6), "lon": lon, "fix": "3d"}),
                Outcome::Dlq(3),
            ),
            // A heat spike: plausible to the schema, accepted (and the next reading is
            // relative to it, as on a real sensor).
            Reading::Env { temp, hum } => {
                let temp = (temp + 25.0).min(80.0);
                let payload = self.envelope(
                    ts,
                    json!({"temperature_c": round(temp, 2), "humidity_pct": round(hum, 1)}),
                );
                self.last = Some((ts, Reading::Env { temp, hum }));
                self.last_payload = Some(payload.clone());
                return Some((self.topic.clone(), payload, Outcome::Valid));
            }
        };
        Some((self.topic.clone(), self.envelope(ts, data), outcome))
    }

    /// A message the agent must dead-letter (stage index into [`DLQ_STAGES`]).
    fn invalid(&mut self) -> (String, Vec<u8>, Outcome) {
        let ts = now_ms();
        let topic = self.topic.clone();
        let choice = self.rng.u8(0..5);
        match choice {
            // Cut off mid-document: never decodes, so its seq is not seen (and not consumed).
            0 => {
                let p = format!("{{\"id\":\"{}-x\",\"seq\":{},", self.name, self.seq + 1);
                (topic, p.into_bytes(), Outcome::Dlq(0))
            }
            // A required field missing.
            1 => {
                let data = match self.kind {
                    "meter" => json!({"voltage_v": 230, "current_a": 4}),
                    "environment" => json!({"humidity_pct": 50}),
                    _ => json!({"lon": 13.4, "fix": "3d"}),
                };
                (topic, self.envelope(ts, data), Outcome::Dlq(1))
            }
            // A value out of its range.
            2 => {
                let data = match self.kind {
                    "meter" => json!({"energy_kwh": 1, "voltage_v": 900, "current_a": 4}),
                    "environment" => json!({"temperature_c": 150, "humidity_pct": 50}),
                    _ => json!({"lat": 95.0, "lon": 13.4, "fix": "3d"}),
                };
                (topic, self.envelope(ts, data), Outcome::Dlq(1))
            }
            // An event type the gateway does not know.
            3 => {
                let topic = format!("devices/{}/events/toaster", self.name);
                (
                    topic,
                    self.envelope(ts, json!({"crumbs": 3})),
                    Outcome::Dlq(1),
                )
            }
            // A broken business rule.
            _ => {
                let data = match (self.kind, self.last.map(|(_, r)| r)) {
                    ("meter", Some(Reading::Meter { kwh })) => {
                        json!({"energy_kwh": round(kwh - 5.0, 6), "voltage_v": 230, "current_a": 4})
                    }
                    ("meter", _) => {
                        // No previous reading yet: the rule cannot fail; make it a schema error.
                        let data = json!({"energy_kwh": -1, "voltage_v": 230, "current_a": 4});
                        return (topic, self.envelope(ts, data), Outcome::Dlq(1));
                    }
                    ("environment", _) => json!({"temperature_c": 20, "humidity_pct": 0}),
                    _ => json!({"lat": 52.5, "lon": 13.4, "fix": "none"}),
                };
                (topic, self.envelope(ts, data), Outcome::Dlq(2))
            }
        }
    }
}
