//! The `[broker]` section of the agent configuration.
//!
//! Every field has a default, so an empty (or missing) `[broker]` table means "run the embedded
//! MQTT front on 127.0.0.1:1883". Unknown fields are rejected so a typo is reported with its path
//! (by `serde_path_to_error` in the agent's config loader) instead of being silently ignored.
//!
//! ```toml
//! [broker]
//! mode = "embedded"                 # or "external"
//!
//! [broker.embedded]
//! listen = "127.0.0.1:1883"
//! max_packet_bytes = 262144
//! connect_timeout_ms = 10000
//! shutdown_grace_ms = 10000
//! auth = "none"                     # or "password" | "certificate" | "password_or_certificate"
//! max_connections = 1024             # in all, and from one client address:
//! max_connections_per_address = 64
//! max_inflight = 1024               # per connection: QoS 1/2 publishes not yet acknowledged
//! max_topic_bytes = 256             # a longer PUBLISH topic closes the connection
//! max_buffered_bytes = 8388608      # topics + payloads read and not yet committed, in all
//! # username = "devices"            # auth = "none" only: one shared user name (and password)
//! # password = "secret"
//! # plain = false                   # serve plain TCP on `listen` too? (default: only without [tls])
//!
//! # [broker.embedded.tls]           # a TLS listener (rustls)
//! # listen = "0.0.0.0:8883"
//! # cert = "/etc/edge-agent/devices/server.pem"   # this endpoint's certificate chain (PEM)
//! # key = "/etc/edge-agent/devices/server.key"    # and its private key (PEM)
//! # client_ca = "/etc/edge-agent/devices/ca.pem"  # certificate auth only: CA(s) of device certs
//! # crl = "/etc/edge-agent/devices/crl.pem"       # optional: revoked device certs (PEM CRLs)
//!
//! [broker.external]
//! host = "127.0.0.1"
//! port = 1883
//! client_id = "edge-agent"
//! filter = "devices/+/events/+"
//! keep_alive_s = 30
//! max_packet_bytes = 262144
//! max_buffered_bytes = 8388608
//! reconnect_min_ms = 500
//! reconnect_max_ms = 30000
//! shutdown_grace_ms = 10000
//! # username = "agent"
//! # password = "secret"
//! # ca = "/etc/edge-agent/broker-ca.pem"   # setting `ca` switches the connection to TLS
//! # cert = "/etc/edge-agent/agent.pem"
//! # key = "/etc/edge-agent/agent.key"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use settings::Invalid;

/// Where device messages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The agent's own MQTT 3.1.1 endpoint ([`super::embedded`]).
    #[default]
    Embedded,
    /// A client of an existing broker such as mosquitto ([`super::external`]).
    External,
}

/// The `[broker]` table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub mode: Mode,
    pub embedded: EmbeddedConfig,
    pub external: ExternalConfig,
}

/// How devices prove who they are on the embedded endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// Anyone who can reach the listener (optionally one shared user name and password).
    #[default]
    None,
    /// The MQTT user name is the device id, the password its secret from the device registry
    /// ([`crate::devices`]); a device publishes only under its own id.
    Password,
    /// TLS only: a client certificate signed by `tls.client_ca` is required at the handshake,
    /// and its CN (else its one DNS or URI SAN) is the device id.
    Certificate,
    /// A client that presents a certificate (on the TLS listener) is identified by it, any
    /// other must give its registry password, as with `password`.
    PasswordOrCertificate,
}

impl Auth {
    /// The config value, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Password => "password",
            Auth::Certificate => "certificate",
            Auth::PasswordOrCertificate => "password_or_certificate",
        }
    }

    /// Whether client certificates are asked for (and `tls.client_ca` needed).
    pub fn uses_certificates(self) -> bool {
        matches!(self, Auth::Certificate | Auth::PasswordOrCertificate)
    }

    /// Whether devices are identified (registry password or certificate) and held to their
    /// own topics.
    pub fn identifies_devices(self) -> bool {
        self != Auth::None
    }
}

/// `[broker.embedded.tls]`: the TLS listener. Paths are PEM files; they are read (and checked:
/// parseable, key matching the certificate) by `check-config` and at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TCP address of the TLS listener (8883, MQTT over TLS, by default).
    #[serde(default = "default_tls_listen")]
    pub listen: SocketAddr,
    /// This endpoint's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1). Its contents are never logged.
    pub key: PathBuf,
    /// The CA certificate(s) that sign device certificates. Required with
    /// `auth = "certificate" | "password_or_certificate"`, refused otherwise (a CA that is
    /// never consulted would only suggest that certificates are checked).
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation list(s) (PEM, one per CA in `client_ca`) of device
    /// certificates: a revoked one fails the handshake. Read at start-up (restart to take a
    /// new CRL); only the device certificate is checked, and one whose CA has no CRL here is
    /// refused (`revocation_unknown`), so a CRL of the wrong CA cannot pass silently.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

fn default_tls_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8883))
}

/// `[broker.embedded]`: the agent's own MQTT endpoint for devices.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// TCP address to listen on. Loopback by default: expose it deliberately.
    pub listen: SocketAddr,
    /// Largest accepted MQTT packet (remaining length). A larger packet closes the connection:
    /// its bytes are never buffered. The engine applies its own, usually smaller, payload limit
    /// and dead-letters payloads above it.
    pub max_packet_bytes: usize,
    /// A client must send CONNECT within this time after the TCP accept.
    pub connect_timeout_ms: u64,
    /// On shutdown, how long a connection waits for the pipeline to release the acks of
    /// messages it already handed over before it is closed anyway.
    pub shutdown_grace_ms: u64,
    pub auth: Auth,
    /// Most connections open at once, in all and from one client address; one beyond is
    /// closed at once (`ingest_connections_refused_total{reason}`).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// Most QoS 1/2 publishes of one connection read but not yet acknowledged on the wire
    /// (PUBACK/PUBREC written to the socket). At the cap the connection's reads pause until
    /// acks go out (`ingest_inflight_full_total`), so a client that never reads its PUBACKs
    /// stalls itself instead of growing its output buffer, and one connection cannot take the
    /// whole pipeline queue.
    pub max_inflight: usize,
    /// Longest PUBLISH topic name in bytes, checked in the packet's header before the topic
    /// is parsed (or anything allocated for it). A longer one closes the connection
    /// unacknowledged (`ingest_topic_too_long_total`), as a packet over `max_packet_bytes`
    /// does: the topic names the device, whose state, DLQ entries and results carry it.
    pub max_topic_bytes: usize,
    /// Most bytes (topic + payload) of the messages read from all connections and not yet
    /// committed (queued for the pipeline, in its batch, or in the commit). A reader whose
    /// next message does not fit pauses until the pipeline releases some
    /// (`ingest_buffer_full_total`), so a flood of large packets costs at most this, not
    /// `pipeline.queue_capacity` × `max_packet_bytes`. At least `max_packet_bytes`.
    pub max_buffered_bytes: usize,
    /// With `auth = "none"`: when set, a CONNECT must carry this user name (and `password`,
    /// when that is set).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Whether to serve plain TCP on `listen`. Unset: yes without `[broker.embedded.tls]`, no
    /// with it, so turning TLS on never leaves a clear-text port open by accident. `true` with
    /// TLS keeps both (e.g. loopback-only plain for local processes); refused with
    /// `auth = "certificate"`, which has nothing to check on a plain connection.
    pub plain: Option<bool>,
    pub tls: Option<TlsConfig>,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_packet_bytes: 256 * 1024,
            connect_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            auth: Auth::None,
            max_connections: 1024,
            max_connections_per_address: 64,
            max_inflight: 1024,
            max_topic_bytes: 256,
            max_buffered_bytes: DEFAULT_BUFFERED_BYTES,
            username: None,
            password: None,
            plain: None,
            tls: None,
        }
    }
}

/// `[broker.external]`: the agent as a client of an existing broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalConfig {
    pub host: String,
    pub port: u16,
    /// Fixed, so the broker keeps the agent's persistent session (and queues messages for it)
    /// across reconnects and restarts.
    pub client_id: String,
    /// Subscription filter (QoS 1).
    pub filter: String,
    pub keep_alive_s: u16,
    /// Largest accepted incoming packet.
    pub max_packet_bytes: usize,
    /// As `broker.embedded.max_buffered_bytes`: while it is reached the event loop waits, so
    /// the broker keeps what the agent has not read.
    pub max_buffered_bytes: usize,
    /// Reconnect backoff: first delay, doubled per failed attempt up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// On shutdown, how long to wait for the pipeline to release outstanding acks before
    /// disconnecting (unacked messages are redelivered by the broker next session).
    pub shutdown_grace_ms: u64,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file with the CA certificate(s) that sign the broker's certificate. Setting it
    /// switches the connection to TLS (rustls, through rumqttc).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS (both or neither).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for ExternalConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "edge-agent".into(),
            filter: "devices/+/events/+".into(),
            keep_alive_s: 30,
            max_packet_bytes: 256 * 1024,
            max_buffered_bytes: DEFAULT_BUFFERED_BYTES,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            shutdown_grace_ms: 10_000,
            username: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

/// `max_buffered_bytes` by default: 8 MiB, 32 packets of the default largest size and tens of
/// thousands of ordinary readings (far more than the queue holds), so only large packets wait.
const DEFAULT_BUFFERED_BYTES: usize = 8 * 1024 * 1024;

/// Shortest `max_topic_bytes`: room for `devices/{id}/events/{type}` with short names.
const MIN_TOPIC_BYTES: usize = 16;

/// MQTT's largest encodable remaining length.
const MQTT_MAX_PACKET: usize = 268_435_455;

impl IngestConfig {
    /// Checks what serde cannot. Errors name the field by its path under `broker`.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self.mode {
            Mode::Embedded => self.embedded.validate(),
            Mode::External => self.external.validate(),
        }
    }
}

impl EmbeddedConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_packet_size("broker.embedded.max_packet_bytes", self.max_packet_bytes)?;
        check_buffered(
            "broker.embedded.max_buffered_bytes",
            self.max_buffered_bytes,
            self.max_packet_bytes,
        )?;
        if self.connect_timeout_ms == 0 {
            return Err(Invalid::at(
                "broker.embedded.connect_timeout_ms",
                "must be > 0",
            ));
        }
        if self.max_connections == 0 {
            return Err(Invalid::at(
                "broker.embedded.max_connections",
                "must be at least 1",
            ));
        }
        if self.max_connections_per_address == 0 {
            return Err(Invalid::at(
                "broker.embedded.max_connections_per_address",
                "must be at least 1",
            ));
        }
        if !(1..=usize::from(u16::MAX)).contains(&self.max_inflight) {
            return Err(Invalid::at(
                "broker.embedded.max_inflight",
                format!(
                    "must be between 1 and 65535, the packet ids a connection has (got {})",
                    self.max_inflight
                ),
            ));
        }
        if !(MIN_TOPIC_BYTES..=usize::from(u16::MAX)).contains(&self.max_topic_bytes) {
            return Err(Invalid::at(
                "broker.embedded.max_topic_bytes",
                format!(
                    "must be between {MIN_TOPIC_BYTES} and 65535 (got {})",
                    self.max_topic_bytes
                ),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(Invalid::at(
                "broker.embedded.password",
                "set without broker.embedded.username",
            ));
        }
        if self.auth.identifies_devices() && self.username.is_some() {
            return Err(Invalid::at(
                "broker.embedded.username",
                format!(
                    "a shared user name does not go with auth = \"{}\" (each device has its own identity)",
                    self.auth.as_str()
                ),
            ));
        }
        match &self.tls {
            None if self.auth.uses_certificates() => {
                return Err(Invalid::at(
                    "broker.embedded.tls",
                    format!(
                        "auth = \"{}\" needs the TLS listener ([broker.embedded.tls] with listen, cert, key, client_ca)",
                        self.auth.as_str()
                    ),
                ));
            }
            None if self.plain == Some(false) => {
                return Err(Invalid::at(
                    "broker.embedded.plain",
                    "false without [broker.embedded.tls] leaves no listener",
                ));
            }
            None => {}
            Some(tls) => {
                match (&tls.client_ca, self.auth.uses_certificates()) {
                    (None, true) => {
                        return Err(Invalid::at(
                            "broker.embedded.tls.client_ca",
                            format!(
                                "required with auth = \"{}\" (the CA that signs device certificates)",
                                self.auth.as_str()
                            ),
                        ));
                    }
                    (Some(_), false) => {
                        return Err(Invalid::at(
                            "broker.embedded.tls.client_ca",
                            format!(
                                "only used with auth = \"certificate\" or \"password_or_certificate\" (auth is \"{}\")",
                                self.auth.as_str()
                            ),
                        ));
                    }
                    _ => {}
                }
                if tls.crl.is_some() && !self.auth.uses_certificates() {
                    return Err(Invalid::at(
                        "broker.embedded.tls.crl",
                        format!(
                            "only used with auth = \"certificate\" or \"password_or_certificate\" (auth is \"{}\")",
                            self.auth.as_str()
                        ),
                    ));
                }
                if self.auth == Auth::Certificate && self.plain == Some(true) {
                    return Err(Invalid::at(
                        "broker.embedded.plain",
                        "auth = \"certificate\" has no plain listener (a certificate needs TLS)",
                    ));
                }
                // Port 0 is a free port picked at bind time, so two of them never clash.
                if self.serves_plain() && tls.listen.port() != 0 && tls.listen == self.listen {
                    return Err(Invalid::at(
                        "broker.embedded.tls.listen",
                        format!(
                            "{} is also broker.embedded.listen (the plain listener)",
                            tls.listen
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the plain TCP listener on `listen` runs (see [`EmbeddedConfig::plain`]).
    pub fn serves_plain(&self) -> bool {
        self.plain.unwrap_or(self.tls.is_none())
    }
}

impl ExternalConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.host.is_empty() {
            return Err(Invalid::at("broker.external.host", "must not be empty"));
        }
        if self.port == 0 {
            return Err(Invalid::at("broker.external.port", "must not be 0"));
        }
        if self.client_id.is_empty() {
            return Err(Invalid::at(
                "broker.external.client_id",
                "must not be empty (a persistent session needs a fixed id)",
            ));
        }
        if !rumqttc::valid_filter(&self.filter) {
            return Err(Invalid::at(
                "broker.external.filter",
                format!("{:?} is not a valid MQTT topic filter", self.filter),
            ));
        }
        if self.keep_alive_s == 0 {
            return Err(Invalid::at("broker.external.keep_alive_s", "must be >= 1"));
        }
        check_packet_size("broker.external.max_packet_bytes", self.max_packet_bytes)?;
        check_buffered(
            "broker.external.max_buffered_bytes",
            self.max_buffered_bytes,
            self.max_packet_bytes,
        )?;
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(Invalid::at(
                "broker.external.reconnect_min_ms/reconnect_max_ms",
                format!(
                    "need 0 < min <= max (got {} and {})",
                    self.reconnect_min_ms, self.reconnect_max_ms
                ),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(Invalid::at(
                "broker.external.password",
                "set without broker.external.username",
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(Invalid::at(
                "broker.external.cert/key",
                "set both or neither",
            ));
        }
        if self.cert.is_some() && self.ca.is_none() {
            return Err(Invalid::at(
                "broker.external.cert",
                "a client certificate needs `ca` (TLS)",
            ));
        }
        Ok(())
    }

    /// Whether the connection to the broker uses TLS.
    pub fn uses_tls(&self) -> bool {
        self.ca.is_some()
    }
}

/// At least one largest packet, and what the byte budget can count (a u32).
fn check_buffered(path: &str, n: usize, max_packet: usize) -> Result<(), Invalid> {
    if n < max_packet || n > u32::MAX as usize {
        return Err(Invalid::at(
            path,
            format!(
                "must be between max_packet_bytes ({max_packet}) and {} (got {n})",
                u32::MAX
            ),
        ));
    }
    Ok(())
}

fn check_packet_size(path: &str, n: usize) -> Result<(), Invalid> {
    if !(1024..=MQTT_MAX_PACKET).contains(&n) {
        return Err(Invalid::at(
            path,
            format!("must be between 1024 and {MQTT_MAX_PACKET} (got {n})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Agent {
        #[serde(default)]
        broker: IngestConfig,
    }

    #[test]
    fn empty_broker_section_means_embedded_on_loopback_1883() {
        let a: Agent = toml::from_str("[broker]\n").unwrap();
        assert_eq!(a.broker, IngestConfig::default());
        assert_eq!(a.broker.mode, Mode::Embedded);
        assert_eq!(a.broker.embedded.listen.to_string(), "127.0.0.1:1883");
        a.broker.validate().unwrap();
        let none: Agent = toml::from_str("").unwrap();
        assert_eq!(none.broker, IngestConfig::default());
    }

    #[test]
    fn external_section_parses_and_validates() {
        let a: Agent = toml::from_str(
            r#"
            [broker]
            mode = "external"
            [broker.external]
            host = "broker.local"
            port = 8883
            client_id = "gw-7"
            ca = "/etc/ca.pem"
            cert = "/etc/c.pem"
            key = "/etc/c.key"
            "#,
        )
        .unwrap();
        assert_eq!(a.broker.mode, Mode::External);
        assert_eq!(a.broker.external.port, 8883);
        assert!(a.broker.external.uses_tls());
        assert_eq!(a.broker.external.filter, "devices/+/events/+");
        a.broker.validate().unwrap();
    }

    #[test]
    fn typos_and_bad_values_are_rejected_with_their_path() {
        let err = toml::from_str::<Agent>("[broker.embedded]\nlisten_addr = \"x\"\n")
            .err()
            .unwrap();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        assert!(toml::from_str::<Agent>("[broker]\nmode = \"rumqttd\"\n").is_err());
        assert!(
            toml::from_str::<Agent>("[broker.embedded]\nlisten = \"not an address\"\n").is_err()
        );

        let mut c = IngestConfig {
            mode: Mode::External,
            ..Default::default()
        };
        c.external.filter = "devices/#/x".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("broker.external.filter"), "{err}");
        c.external.filter = "devices/+/events/+".into();
        c.external.cert = Some("/c.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("cert/key"));
    }

    #[test]
    fn inflight_and_topic_caps_are_checked_by_field() {
        for (text, field) in [
            ("max_inflight = 0", "broker.embedded.max_inflight"),
            ("max_inflight = 70000", "broker.embedded.max_inflight"),
            ("max_topic_bytes = 8", "broker.embedded.max_topic_bytes"),
            ("max_topic_bytes = 65536", "broker.embedded.max_topic_bytes"),
            (
                "max_buffered_bytes = 100000",
                "broker.embedded.max_buffered_bytes",
            ),
        ] {
            let a: Agent = toml::from_str(&format!("[broker.embedded]\n{text}\n")).unwrap();
            let err = a.broker.embedded.validate().unwrap_err();
            assert_eq!(err.field(), Some(field), "{text}: {err}");
        }
        let d = EmbeddedConfig::default();
        assert_eq!((d.max_inflight, d.max_topic_bytes), (1024, 256));
    }

    fn embedded(toml_text: &str) -> anyhow::Result<EmbeddedConfig> {
        let a: Agent = toml::from_str(toml_text)?;
        a.broker.embedded.validate()?;
        Ok(a.broker.embedded)
    }

    #[test]
    fn tls_and_certificate_auth_are_checked_by_field() {
        let tls = "[broker.embedded.tls]\ncert = \"s.pem\"\nkey = \"s.key\"\n";
        let ca = "client_ca = \"ca.pem\"\n";
        let err = |t: &str| embedded(t).unwrap_err().to_string();

        let e = err("[broker.embedded]\nauth = \"certificate\"\n");
        assert!(e.starts_with("broker.embedded.tls:"), "{e}");
        let e = err(&format!("[broker.embedded]\nauth = \"certificate\"\n{tls}"));
        assert!(e.starts_with("broker.embedded.tls.client_ca:"), "{e}");
        let e = err(&format!(
            "[broker.embedded]\nauth = \"password\"\n{tls}{ca}"
        ));
        assert!(e.starts_with("broker.embedded.tls.client_ca:"), "{e}");
        let e = err(&format!(
            "[broker.embedded]\nauth = \"certificate\"\nplain = true\n{tls}{ca}"
        ));
        assert!(e.starts_with("broker.embedded.plain:"), "{e}");
        let e = err(&format!(
            "[broker.embedded]\nauth = \"password\"\n{tls}crl = \"crl.pem\"\n"
        ));
        assert!(e.starts_with("broker.embedded.tls.crl:"), "{e}");
        let e = err("[broker.embedded]\nplain = false\n");
        assert!(e.starts_with("broker.embedded.plain:"), "{e}");
        let e = err(&format!(
            "[broker.embedded]\nplain = true\nlisten = \"127.0.0.1:8883\"\n{tls}"
        ));
        assert!(e.starts_with("broker.embedded.tls.listen:"), "{e}");
        // Port 0 on both: two free ports picked at bind time, not one address twice.
        let c = embedded(&format!(
            "[broker.embedded]\nplain = true\nlisten = \"127.0.0.1:0\"\n{tls}listen = \"127.0.0.1:0\"\n"
        ))
        .unwrap();
        assert!(c.serves_plain());

        // TLS turns the plain listener off unless it is asked for.
        let c = embedded(&format!("[broker.embedded]\nauth = \"password\"\n{tls}")).unwrap();
        assert!(!c.serves_plain());
        assert_eq!(c.tls.unwrap().listen.to_string(), "127.0.0.1:8883");
        let c = embedded(&format!(
            "[broker.embedded]\nauth = \"password_or_certificate\"\nplain = true\n{tls}{ca}"
        ))
        .unwrap();
        assert!(c.serves_plain());
        assert!(embedded("").unwrap().serves_plain());
    }
}
