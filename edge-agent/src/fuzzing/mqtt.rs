//! Target `mqtt_packets`: the embedded endpoint's packet reading on raw socket bytes, as a
//! connection does it: the first packet is framed (`mqttbytes::check`), prechecked as an MQTT
//! 3.1.1 CONNECT and read; then every buffered packet is read until the buffer runs dry or the
//! reader would close the connection.
//! Properties: no panic (the handshake's `unreachable!` included); every packet read consumes
//! bytes; `InsufficientBytes` leaves the buffer untouched; nothing over `max_packet_bytes` is
//! returned; a PUBLISH written again reads back the same.

use bytes::BytesMut;
use rumqttc::mqttbytes::Error;
use rumqttc::mqttbytes::v4::Packet;

use crate::ingest::embedded::{Precheck, precheck_connect, read_packet};

/// The first byte picks the packet size limit (small ones make the limit path reachable); the
/// rest is what the socket delivered.
pub fn mqtt_packets(data: &[u8]) {
    let Some((&m, data)) = data.split_first() else {
        return;
    };
    let max = 8 + usize::from(m) * 16;
    let mut buf = BytesMut::from(data);

    // Handshake.
    if rumqttc::mqttbytes::check(buf.iter(), max).is_err()
        || precheck_connect(&buf) != Precheck::Mqtt311
    {
        return;
    }
    match read_packet(&mut buf, max) {
        Ok(Packet::Connect(_)) => {}
        Ok(other) => panic!("prechecked CONNECT parsed as {other:?}"),
        Err(_) => return,
    }

    // Read loop.
    loop {
        let before = buf.clone();
        match read_packet(&mut buf, max) {
            Ok(p) => {
                let used = before.len() - buf.len();
                assert!(used > 0, "a packet consumed no bytes: {p:?}");
                assert!(used <= max + 5, "{used} bytes read under a {max} limit");
                if let Packet::Publish(p) = p {
                    let mut out = BytesMut::new();
                    if p.write(&mut out).is_ok() {
                        match read_packet(&mut out, usize::MAX) {
                            Ok(Packet::Publish(q)) => assert_eq!(p, q),
                            other => panic!("re-written PUBLISH read as {other:?}"),
                        }
                    }
                }
            }
            Err(Error::InsufficientBytes(_)) => {
                assert_eq!(buf, before, "InsufficientBytes consumed input");
                return;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_mqtt_packets_corpus_replays() {
        proto::fuzzing::replay("mqtt_packets", super::mqtt_packets);
    }
}
