//! A device-like MQTT 3.1.1 publisher that survives its broker dying.
//!
//! It keeps a window of QoS 1 messages in flight, remembers which ones the broker
//! acknowledged, and after a lost connection reconnects and retransmits every unacknowledged
//! message (DUP set), as a real device does. Built on rumqtt's codec so the test talks the
//! same wire protocol as the product, over a plain blocking socket it fully controls.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};

pub struct Publisher {
    port: u16,
    client_id: String,
    /// Messages not yet acknowledged, by packet id: (topic, payload).
    unacked: BTreeMap<u16, (String, Vec<u8>)>,
    /// Packet ids the broker acknowledged, in order.
    pub acked: Vec<u16>,
    pub reconnects: usize,
}

impl Publisher {
    pub fn new(port: u16, client_id: &str) -> Publisher {
        Publisher {
            port,
            client_id: client_id.into(),
            unacked: BTreeMap::new(),
            acked: Vec::new(),
            reconnects: 0,
        }
    }

    /// Publishes `messages` (packet id, topic, payload) with at most `window` in flight, until
    /// every one is acknowledged. `between` runs after each send batch (e.g. to kill the agent).
    pub fn publish_all(
        &mut self,
        messages: Vec<(u16, String, Vec<u8>)>,
        window: usize,
        timeout: Duration,
        mut between: impl FnMut(usize),
    ) {
        let start = Instant::now();
        let mut queue = messages.into_iter().peekable();
        let mut conn: Option<(TcpStream, BytesMut)> = None;
        loop {
            assert!(
                start.elapsed() < timeout,
                "publisher timed out with {} unacknowledged",
                self.unacked.len()
            );
            if queue.peek().is_none() && self.unacked.is_empty() {
                return;
            }
            let (stream, buf) = match conn.as_mut() {
                Some(c) => c,
                None => match self.connect() {
                    Some(c) => conn.insert(c),
                    None => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                },
            };
            let mut out = BytesMut::new();
            while self.unacked.len() < window {
                let Some((pkid, topic, payload)) = queue.next() else {
                    break;
                };
                let mut p = Publish::new(topic.clone(), QoS::AtLeastOnce, payload.clone());
                p.pkid = pkid;
                p.write(&mut out).unwrap();
                self.unacked.insert(pkid, (topic, payload));
            }
            if !out.is_empty() && stream.write_all(&out).is_err() {
                conn = None;
                continue;
            }
            between(self.acked.len());
            if self.read_acks(stream, buf).is_err() {
                conn = None;
            }
        }
    }

    fn connect(&mut self) -> Option<(TcpStream, BytesMut)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut connect = Connect::new(self.client_id.clone());
        connect.keep_alive = 30;
        connect.clean_session = false;
        let mut out = BytesMut::new();
        connect.write(&mut out).unwrap();
        // Retransmit everything the last connection left unacknowledged.
        for (pkid, (topic, payload)) in &self.unacked {
            let mut p = Publish::new(topic.clone(), QoS::AtLeastOnce, payload.clone());
            p.pkid = *pkid;
            p.dup = true;
            p.write(&mut out).unwrap();
        }
        stream.write_all(&out).ok()?;
        let mut buf = BytesMut::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::ConnAck(_)) => break,
                Ok(other) => panic!("expected CONNACK, got {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from broker: {e:?}"),
            }
            if Instant::now() > deadline || fill(&mut stream, &mut buf).is_err() {
                return None;
            }
        }
        self.reconnects += 1;
        Some((stream, buf))
    }

    fn read_acks(&mut self, stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<()> {
        fill(stream, buf)?;
        loop {
            match Packet::read(buf, 1 << 20) {
                Ok(Packet::PubAck(ack)) => {
                    if self.unacked.remove(&ack.pkid).is_some() {
                        self.acked.push(ack.pkid);
                    }
                }
                Ok(Packet::PingResp) => {}
                Ok(other) => panic!("unexpected packet from broker: {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => panic!("bad packet from broker: {e:?}"),
            }
        }
    }
}

/// Reads what is available; a read timeout is not an error, a closed socket is.
fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) => Err(ErrorKind::UnexpectedEof.into()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
        Err(e) => Err(e),
    }
}
