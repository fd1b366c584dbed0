//! A QoS 1 subscriber that stands in for the cloud side in uplink tests: it keeps a persistent
//! session, acknowledges every message, reconnects when the broker goes away, and collects
//! what it receives.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Subscribe};

/// (topic, payload) of every message, in arrival order.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

pub struct Subscriber {
    received: Received,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Subscribes `client_id` (persistent session) to `filter` on the plain port.
    pub fn start(port: u16, client_id: &str, filter: &str) -> Subscriber {
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // The first subscription is made before returning, so nothing published after
        // `start` is missed.
        let first = session(port, client_id, filter).expect("subscriber connects");
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            let (client_id, filter) = (client_id.to_string(), filter.to_string());
            std::thread::spawn(move || {
                let mut stream = Some(first);
                while !stop.load(Ordering::Relaxed) {
                    let s = match stream.take() {
                        Some(s) => s,
                        None => match session(port, &client_id, &filter) {
                            Some(s) => s,
                            None => {
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        },
                    };
                    pump(s, &received, &stop);
                }
            })
        };
        Subscriber {
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// How many messages have arrived (cheap: no copy).
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Everything received so far: (topic, payload).
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn session(port: u16, client_id: &str, filter: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
    let mut out = BytesMut::new();
    let mut c = Connect::new(client_id);
    c.clean_session = false;
    c.keep_alive = 30;
    c.write(&mut out).ok()?;
    let mut sub = Subscribe::new(filter, QoS::AtLeastOnce);
    sub.pkid = 1; // 0 is not a valid packet id
    sub.write(&mut out).ok()?;
    s.write_all(&out).ok()?;
    // Wait for the SUBACK so the subscription exists when this returns.
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..50 {
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
        let mut peek = buf.clone();
        loop {
            match Packet::read(&mut peek, 1 << 24) {
                Ok(Packet::SubAck(_)) => return Some(s),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    None
}

/// Reads until the connection ends or `stop`; acknowledges and records each publish.
fn pump(mut s: TcpStream, received: &Received, stop: &AtomicBool) {
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        let mut acks = BytesMut::new();
        loop {
            match Packet::read(&mut buf, 1 << 24) {
                Ok(Packet::Publish(p)) => {
                    received
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                    if p.qos == QoS::AtLeastOnce {
                        PubAck::new(p.pkid).write(&mut acks).unwrap();
                    }
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => return,
            }
        }
        if !acks.is_empty() && s.write_all(&acks).is_err() {
            return;
        }
    }
}
