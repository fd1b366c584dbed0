//! The endpoint's caps on what a client can make it hold: connections in all and per client
//! address (a connection beyond a cap is closed at once, before it costs a task or a buffer),
//! and the topic length of a PUBLISH, read from its header before the codec parses it. The
//! per-connection in-flight cap lives with the connection's output ([`super::ConnIo`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Longest client id a CONNECT may carry (CONNACK 0x02 beyond): it is kept in the take-over
/// map for the connection's life and written in its log lines. MQTT 3.1.1 only requires 23.
pub(super) const MAX_CLIENT_ID_BYTES: usize = 256;

/// Why an accepted socket was closed unserved (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    Total,
    Address,
}

impl Full {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Full::Total => "max_connections",
            Full::Address => "max_connections_per_address",
        }
    }
}

/// The open connections, in all and by address.
pub(super) struct Slots {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One connection's place; freed when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    pub(super) fn new(max_total: usize, max_per_address: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max_total,
            max_per_address,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub(super) fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 >= self.max_total {
            return Err(Full::Total);
        }
        let here = g.1.entry(ip).or_insert(0);
        if *here >= self.max_per_address {
            return Err(Full::Address);
        }
        *here += 1;
        g.0 += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// The topic length a PUBLISH at the front of `buf` declares, once its fixed header and the
/// two length bytes are buffered (`None` for another packet type or too few bytes yet), so an
/// oversized topic is refused before its bytes are awaited, parsed or copied.
pub(super) fn publish_topic_len(buf: &[u8]) -> Option<usize> {
    if buf.first()? >> 4 != 3 {
        return None;
    }
    // The remaining length takes 1–4 bytes, each but the last with its high bit set.
    let len_bytes = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let at = 1 + len_bytes;
    let hi = *buf.get(at)?;
    let lo = *buf.get(at + 1)?;
    Some(usize::from(u16::from_be_bytes([hi, lo])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_length_is_read_from_a_partial_publish_header() {
        use rumqttc::mqttbytes::{QoS, v4::Publish};
        let mut out = bytes::BytesMut::new();
        let topic = "t".repeat(300);
        let mut p = Publish::new(topic.as_str(), QoS::AtLeastOnce, vec![0u8; 200]);
        p.pkid = 1;
        p.write(&mut out).unwrap();
        // 1 type byte, 2 remaining-length bytes (> 127), then the topic length.
        assert_eq!(publish_topic_len(&out[..5]), Some(300));
        assert_eq!(publish_topic_len(&out), Some(300));
        assert_eq!(
            publish_topic_len(&out[..4]),
            None,
            "length not buffered yet"
        );
        assert_eq!(publish_topic_len(&[0xC0, 0x00]), None, "PINGREQ");
        assert_eq!(
            publish_topic_len(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),
            None
        );
    }

    #[test]
    fn caps_hold_and_freed_slots_come_back() {
        let slots = Slots::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Full::Address));
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).err(), Some(Full::Total));
        drop(a1);
        let _b2 = slots.take(b).unwrap();
        assert_eq!(slots.open.lock().unwrap().1.len(), 2);
    }
}
