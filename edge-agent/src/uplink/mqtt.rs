//! The uplink's MQTT session in either protocol version (`[uplink] protocol`), behind one
//! small interface, so the outbox logic in [`super`] is written once.
//!
//! MQTT 5 (the default; AWS IoT Core and mosquitto 2 speak it) is what makes a refused publish
//! visible: its PUBACK carries a reason code, and one ≥ 0x80 (0x87 not authorized, 0x97 quota
//! exceeded, …) means the broker dropped the message. MQTT 3.1.1 has no negative PUBACK: a
//! broker that drops a QoS 1 publish its ACL denies (mosquitto does) acknowledges it all the
//! same, and the uplink cannot tell that from delivery. `"3.1.1"` is only for brokers
//! without MQTT 5.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PubAckReason, SubscribeReasonCode};
use rumqttc::{Outgoing, QoS, Transport};
use serde::{Deserialize, Serialize};

use super::refusal::Refusal;

/// The MQTT version the uplink speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[default]
    #[serde(rename = "5")]
    V5,
}

/// rumqttc's MQTT 5 client refuses a shorter keep-alive.
pub const MIN_KEEP_ALIVE_V5_S: u16 = 5;

/// What a session is opened with (the protocol-neutral part of the options).
pub(super) struct Settings {
    pub protocol: Protocol,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub max_in_flight: u16,
    /// Requests queued for the event loop.
    pub capacity: usize,
    pub max_incoming: usize,
    /// MQTT 3.1.1 only: MQTT 5 learns the broker's limit from its CONNACK.
    pub max_outgoing: usize,
    pub transport: Option<Transport>,
}

/// What the event loop reports, in either version.
#[derive(Debug)]
pub(super) enum Event {
    Connected,
    /// A publish went out with this packet id (these come in request order).
    Sent(u16),
    /// The broker answered the publish with this packet id: `Some` if it refused it.
    Acked(u16, Option<Refusal>),
    /// The broker refused a subscription.
    SubscribeRefused,
    Message {
        topic: Bytes,
        payload: Bytes,
    },
    Other,
}

/// A session's failure: a request the client could not queue, or the connection's end.
/// Boxed: rumqttc's errors carry whole requests, and every `publish` returns this.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Request(Box<rumqttc::ClientError>),
    #[error(transparent)]
    Request5(Box<rumqttc::v5::ClientError>),
    #[error(transparent)]
    Connection(Box<rumqttc::ConnectionError>),
    #[error(transparent)]
    Connection5(Box<rumqttc::v5::ConnectionError>),
}

/// `From` each rumqttc error, boxing it, so `?` works as with `#[from]`.
macro_rules! boxed_from {
    ($($error:ty => $variant:ident),* $(,)?) => {$(
        impl From<$error> for SessionError {
            fn from(e: $error) -> SessionError {
                SessionError::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    rumqttc::ClientError => Request,
    rumqttc::v5::ClientError => Request5,
    rumqttc::ConnectionError => Connection,
    rumqttc::v5::ConnectionError => Connection5,
);

enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Boxed: both event loops are large, and of different sizes.
enum Events {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// One connection's client and event loop (clean start: nothing is kept by the broker).
pub(super) struct Session {
    client: Client,
    events: Events,
}

impl Session {
    pub(super) fn new(s: Settings) -> Session {
        match s.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
                o.set_clean_session(true)
                    .set_keep_alive(s.keep_alive)
                    .set_inflight(s.max_in_flight)
                    .set_request_channel_capacity(s.capacity)
                    .set_max_packet_size(s.max_incoming, s.max_outgoing);
                if let Some(t) = s.transport {
                    o.set_transport(t);
                }
                let (client, events) = rumqttc::AsyncClient::new(o, s.capacity);
                Session {
                    client: Client::V311(client),
                    events: Events::V311(Box::new(events)),
                }
            }
            Protocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(s.client_id, s.host, s.port);
                o.set_clean_start(true)
                    .set_keep_alive(s.keep_alive)
                    .set_outgoing_inflight_upper_limit(s.max_in_flight)
                    .set_request_channel_capacity(s.capacity)
                    .set_max_packet_size(Some(u32::try_from(s.max_incoming).unwrap_or(u32::MAX)));
                if let Some(t) = s.transport {
                    o.set_transport(t);
                }
                let (client, events) = rumqttc::v5::AsyncClient::new(o, s.capacity);
                Session {
                    client: Client::V5(client),
                    events: Events::V5(Box::new(events)),
                }
            }
        }
    }

    /// Queues a QoS 1 publish.
    pub(super) fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), SessionError> {
        match &self.client {
            Client::V311(c) => c.try_publish(topic, QoS::AtLeastOnce, false, payload)?,
            Client::V5(c) => c.try_publish(topic, V5_QOS1, false, payload)?,
        }
        Ok(())
    }

    /// Queues a QoS 1 subscription.
    pub(super) fn subscribe(&self, topic: String) -> Result<(), SessionError> {
        match &self.client {
            Client::V311(c) => c.try_subscribe(topic, QoS::AtLeastOnce)?,
            Client::V5(c) => c.try_subscribe(topic, V5_QOS1)?,
        }
        Ok(())
    }

    /// Best effort: a DISCONNECT if the request queue has room.
    pub(super) fn disconnect(&self) {
        let _ = match &self.client {
            Client::V311(c) => c.try_disconnect().map_err(SessionError::from),
            Client::V5(c) => c.try_disconnect().map_err(SessionError::from),
        };
    }

    /// The next event; an error ends the connection.
    pub(super) async fn poll(&mut self) -> Result<Event, SessionError> {
        use rumqttc::Event as E4;
        use rumqttc::Incoming as I4;
        use rumqttc::v5::Event as E5;
        Ok(match &mut self.events {
            Events::V311(events) => match events.poll().await? {
                E4::Incoming(I4::ConnAck(_)) => Event::Connected,
                E4::Outgoing(Outgoing::Publish(pkid)) => Event::Sent(pkid),
                // MQTT 3.1.1 cannot say no.
                E4::Incoming(I4::PubAck(ack)) => Event::Acked(ack.pkid, None),
                E4::Incoming(I4::SubAck(ack))
                    if ack
                        .return_codes
                        .contains(&rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure) =>
                {
                    Event::SubscribeRefused
                }
                E4::Incoming(I4::Publish(p)) => Event::Message {
                    topic: Bytes::from(p.topic.into_bytes()),
                    payload: p.payload,
                },
                _ => Event::Other,
            },
            Events::V5(events) => match events.poll().await? {
                E5::Incoming(Packet5::ConnAck(_)) => Event::Connected,
                E5::Outgoing(Outgoing::Publish(pkid)) => Event::Sent(pkid),
                E5::Incoming(Packet5::PubAck(ack)) => Event::Acked(ack.pkid, refusal(ack.reason)),
                E5::Incoming(Packet5::SubAck(ack))
                    if !ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))) =>
                {
                    Event::SubscribeRefused
                }
                E5::Incoming(Packet5::Publish(p)) => Event::Message {
                    topic: p.topic,
                    payload: p.payload,
                },
                _ => Event::Other,
            },
        })
    }
}

const V5_QOS1: rumqttc::v5::mqttbytes::QoS = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;

/// `None` for an accepted publish (0x10 "no matching subscribers" is one: the broker took it).
fn refusal(reason: PubAckReason) -> Option<Refusal> {
    let code = match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    };
    Some(Refusal(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reason_codes_are_refusals() {
        assert_eq!(refusal(PubAckReason::Success), None);
        assert_eq!(refusal(PubAckReason::NoMatchingSubscribers), None);
        assert_eq!(
            refusal(PubAckReason::NotAuthorized).map(Refusal::reason),
            Some("not_authorized")
        );
        assert_eq!(
            refusal(PubAckReason::QuotaExceeded).map(|r| r.0),
            Some(0x97)
        );
    }

    #[test]
    fn the_protocol_is_named_as_in_the_spec() {
        #[derive(Deserialize)]
        struct T {
            p: Protocol,
        }
        let p = |s: &str| toml::from_str::<T>(&format!("p = \"{s}\"")).map(|t| t.p);
        assert_eq!(p("5").unwrap(), Protocol::V5);
        assert_eq!(p("3.1.1").unwrap(), Protocol::V311);
        assert!(p("4").is_err());
        assert_eq!(Protocol::default(), Protocol::V5);
    }
}
