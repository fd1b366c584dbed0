//! Device identity on the embedded endpoint (`auth = "password" | "certificate" |
//! "password_or_certificate"`): who may connect, what each device may publish, and how
//! refusals are slowed down and reported without flooding the log.
//!
//! With a password, the MQTT user name is the device id and the password its secret in the
//! device registry ([`crate::devices`]). With a certificate (TLS listener, verified against
//! `tls.client_ca` during the handshake, [`super::tls`]) the id is the certificate's CN (else
//! its one SAN); a user name in CONNECT, if any, must be that same id (a device that claims to
//! be another is refused, not silently renamed) and a password is not looked at. A
//! certificate is not in the registry: the CA is the authority, so `device remove` does not
//! apply to it (revoke by re-issuing the CA). An identified device may publish only on topics
//! whose `{device}` level is its own id; MQTT 3.1.1 has no negative PUBACK, so a refused
//! publish closes the connection (MQTT-3.3.5-2) rather than be acknowledged as if it were
//! stored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use engine::TopicPattern;
use rumqttc::mqttbytes::v4::Login;

use crate::devices::{Verdict, Watch};
use crate::ingest::config::Auth;

/// The registry and the topic pattern a device's publishes must match.
pub struct DeviceAuth {
    pub registry: Watch,
    pub topics: TopicPattern,
}

/// Why a CONNECT or a PUBLISH was refused (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    NoCredentials,
    UnknownDevice,
    BadPassword,
    /// A publish outside the device's own topics.
    NotOwnTopic,
    /// The device was removed from the registry while connected.
    Revoked,
    /// `auth = "certificate"` and the connection has no client certificate.
    NoCertificate,
    /// A verified certificate without a usable id (no CN and not exactly one SAN, or not a
    /// valid device id).
    NoIdentity,
    /// A certificate-identified device whose CONNECT user name names another device.
    UsernameMismatch,
}

/// Who an accepted connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    pub id: String,
    /// Identified by its registry password, so it must stay registered (a removed device is
    /// disconnected); a certificate's device is not in the registry.
    pub registered: bool,
}

impl Refusal {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no_credentials",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::BadPassword => "bad_password",
            Refusal::NotOwnTopic => "not_own_topic",
            Refusal::Revoked => "revoked",
            Refusal::NoCertificate => "no_certificate",
            Refusal::NoIdentity => "no_identity",
            Refusal::UsernameMismatch => "username_mismatch",
        }
    }
}

impl DeviceAuth {
    /// Who a CONNECT is under `auth`. `cert` is the device id read from the connection's
    /// verified client certificate (`None`: none presented, or the plain listener): with a
    /// certificate mode it wins, otherwise the registry password decides.
    pub(super) async fn authenticate(
        &self,
        auth: Auth,
        cert: Option<&Result<String, Refusal>>,
        login: Option<&Login>,
    ) -> Result<Identity, Refusal> {
        match cert {
            Some(cert) if auth.uses_certificates() => {
                let id = cert.clone()?;
                if let Some(login) = login
                    && !login.username.is_empty()
                    && login.username != id
                {
                    return Err(Refusal::UsernameMismatch);
                }
                Ok(Identity {
                    id,
                    registered: false,
                })
            }
            // The handshake requires a certificate and the plain listener is off; this only
            // keeps a future path from falling through to passwords.
            _ if auth == Auth::Certificate => Err(Refusal::NoCertificate),
            _ => self.connect(login).await.map(|id| Identity {
                id,
                registered: true,
            }),
        }
    }

    /// Checks a CONNECT's credentials off the async threads (argon2 costs tens of ms by
    /// design). `Ok` carries the device id.
    pub(super) async fn connect(&self, login: Option<&Login>) -> Result<String, Refusal> {
        let Some(login) = login else {
            return Err(Refusal::NoCredentials);
        };
        let registry = self.registry.registry().map_err(|e| {
            tracing::error!(error = %e, "device registry unreadable: refusing the CONNECT");
            Refusal::UnknownDevice
        })?;
        let (id, password) = (login.username.clone(), login.password.clone());
        let verdict = tokio::task::spawn_blocking(move || {
            let v = registry.verify(&id, password.as_bytes());
            (id, v)
        })
        .await;
        match verdict {
            Ok((id, Verdict::Accepted)) => Ok(id),
            Ok((_, Verdict::UnknownDevice)) | Err(_) => Err(Refusal::UnknownDevice),
            Ok((_, Verdict::BadPassword)) => Err(Refusal::BadPassword),
        }
    }

    /// Whether `device` may publish on `topic`.
    pub(super) fn may_publish(&self, device: &str, topic: &str) -> bool {
        self.topics.matches(topic).is_some_and(|(d, _)| d == device)
    }

    /// Whether `device` is still registered.
    pub(super) fn still_registered(&self, device: &str) -> bool {
        self.registry
            .registry()
            .is_ok_and(|r| r.devices.contains_key(device))
    }
}

/// Most addresses (and devices) remembered; beyond it the quiet ones are forgotten first, and
/// while all are recent (a flood) a new one is not remembered: its failure waits the longest
/// and its refusal is counted but not logged.
const MAX_TRACKED: usize = 4096;
/// A refusal is logged at most once per device (or address) in this window.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The longest a failed CONNECT waits for its answer.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Failures from one address are forgotten after this long without one.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Longest client-supplied name (a user name that is not a device, a certificate CN) kept in
/// these maps or written to a log line: a CONNECT may carry a user name of up to
/// `max_packet_bytes`, and 4096 of those would be a gigabyte. Device ids are no longer than
/// the engine's `MAX_DEVICE_ID_BYTES` (128) anyway.
const MAX_NAME_BYTES: usize = 128;

/// `name` cut to [`MAX_NAME_BYTES`] (on a character boundary).
pub(super) fn clip(name: &str) -> &str {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let mut end = MAX_NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Slows down repeated failed CONNECTs and TLS handshakes from one address, and keeps the log
/// to one line per device per minute however fast a device misbehaves.
#[derive(Default)]
pub(super) struct Refusals {
    inner: Mutex<RefusalsInner>,
}

#[derive(Default)]
struct RefusalsInner {
    /// Address → (failures in a row, last failure).
    failures: HashMap<IpAddr, (u32, Instant)>,
    /// Device id or address → when a refusal of it was last logged.
    logged: HashMap<String, Instant>,
}

impl Refusals {
    /// Records a failed CONNECT from `ip`; returns how long to wait before answering it:
    /// 100 ms doubled per failure in a row, at most 5 s.
    pub(super) fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.failures.len() >= MAX_TRACKED && !g.failures.contains_key(&ip) {
            g.failures
                .retain(|_, (_, last)| now.duration_since(*last) < LOG_EVERY);
            if g.failures.len() >= MAX_TRACKED {
                return MAX_DELAY;
            }
        }
        let entry = g.failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) > FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        wait_after(entry.0)
    }

    /// How long a new attempt from `ip` waits before it is served: what its failures so far
    /// earned (nothing without one). The TLS listener's handshake refusals are answered by
    /// rustls inside the handshake, so the wait comes before the next one.
    pub(super) fn delay(&self, ip: IpAddr, now: Instant) -> Duration {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.failures.get(&ip) {
            Some(&(n, last)) if now.duration_since(last) <= FORGET_AFTER => wait_after(n),
            _ => Duration::ZERO,
        }
    }

    /// A good CONNECT from `ip` clears its failures.
    pub(super) fn succeeded(&self, ip: IpAddr) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.failures.remove(&ip);
    }

    /// Whether a refusal of `who` should be logged now (once per minute each).
    pub(super) fn should_log(&self, who: &str, now: Instant) -> bool {
        let who = clip(who);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.logged.len() >= MAX_TRACKED && !g.logged.contains_key(who) {
            g.logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
            if g.logged.len() >= MAX_TRACKED {
                return false;
            }
        }
        match g.logged.get(who) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                g.logged.insert(who.to_string(), now);
                true
            }
        }
    }
}

/// 100 ms doubled per failure in a row, at most 5 s.
fn wait_after(failures: u32) -> Duration {
    let n = failures.clamp(1, 7);
    Duration::from_millis(100 << (n - 1)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_and_are_forgotten() {
        let r = Refusals::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        let t = Instant::now();
        let waits: Vec<u128> = (0..9).map(|_| r.failed(ip, t).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(r.delay(ip, t).as_millis(), 5000);
        assert_eq!(r.delay(ip, t + FORGET_AFTER * 2), Duration::ZERO);
        assert_eq!(r.failed(ip, t + FORGET_AFTER * 2).as_millis(), 100);
        r.succeeded(ip);
        assert_eq!(r.delay(ip, t), Duration::ZERO);
        assert_eq!(r.failed(ip, t).as_millis(), 100);
    }

    #[test]
    fn long_names_are_clipped_before_they_are_kept() {
        let r = Refusals::default();
        let t = Instant::now();
        let long = format!("{}é{}", "u".repeat(127), "x".repeat(100_000));
        assert_eq!(clip(&long), "u".repeat(127), "cut on a character boundary");
        assert!(r.should_log(&long, t));
        assert!(
            !r.should_log(&format!("{long}y"), t),
            "the same first 128 bytes"
        );
        let g = r.inner.lock().unwrap();
        assert!(g.logged.keys().all(|k| k.len() <= MAX_NAME_BYTES));
    }

    #[test]
    fn a_device_is_logged_once_a_minute() {
        let r = Refusals::default();
        let t = Instant::now();
        assert!(r.should_log("meter-1", t));
        assert!(!r.should_log("meter-1", t + Duration::from_secs(30)));
        assert!(r.should_log("meter-2", t));
        assert!(r.should_log("meter-1", t + LOG_EVERY));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let r = Refusals::default();
        let t = Instant::now();
        for i in 0..(MAX_TRACKED as u32 * 3) {
            let ip: IpAddr = std::net::Ipv4Addr::from(i).into();
            r.failed(ip, t + LOG_EVERY * (i / MAX_TRACKED as u32 * 2));
        }
        assert!(r.inner.lock().unwrap().failures.len() <= MAX_TRACKED);

        // All at once (a flood within a minute): the maps stop at the cap.
        let r = Refusals::default();
        for i in 0..(MAX_TRACKED as u32 * 2) {
            let ip: IpAddr = std::net::Ipv4Addr::from(i).into();
            r.failed(ip, t);
            r.should_log(&format!("dev-{i}"), t);
        }
        let g = r.inner.lock().unwrap();
        assert_eq!(
            (g.failures.len(), g.logged.len()),
            (MAX_TRACKED, MAX_TRACKED)
        );
    }

    #[test]
    fn a_device_publishes_only_under_its_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let auth = DeviceAuth {
            registry: Watch::new(dir.path()).unwrap(),
            topics: TopicPattern::parse("devices/{device}/events/{type}").unwrap(),
        };
        assert!(auth.may_publish("m1", "devices/m1/events/meter"));
        assert!(!auth.may_publish("m1", "devices/m2/events/meter"));
        assert!(!auth.may_publish("m1", "devices/m1/events/meter/extra"));
        assert!(!auth.may_publish("m1", "gateways/m1/results"));
    }
}
