//! The benches' load generator (`benches/ingest.rs`, `benches/side_by_side.rs`, `bench/run`):
//! meter readings published at QoS 1 over raw MQTT 3.1.1 (rumqtt's codec on a blocking
//! socket, so the generator costs little beside the server it drives), either
//!
//! - **closed loop** ([`Pace::Window`]): a window of messages in flight per connection, the
//!   next one sent as soon as an ack frees a place: the sustained rate the server can take;
//! - **open loop** ([`Pace::Rate`]): every message has a send time scheduled at a fixed rate,
//!   whatever the server does, and its latency runs from that scheduled time to its PUBACK, so
//!   a server that stalls cannot hide the stall by slowing the generator down (no coordinated
//!   omission).
//!
//! Payloads are the example config's meter readings (~100 B); a larger `payload_bytes` pads
//! them with a `trace` array of strings, a field the bench config declares (`type = "array"`:
//! validated for size only), within the default `[limits]` (strings ≤ 4096 chars, ≤ 256
//! elements, `max_payload_bytes` 16384).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};

/// How messages are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// At most this many unacknowledged messages per connection, as fast as acks come back.
    Window(usize),
    /// This many messages per second in all, each sent at its scheduled time.
    Rate(f64),
}

/// One load run.
#[derive(Debug, Clone)]
pub struct Load {
    pub port: u16,
    pub events: usize,
    pub conns: usize,
    /// Distinct devices in all, spread evenly over the connections (at least one each; with
    /// fewer devices than connections, as many connections as devices).
    pub devices: usize,
    /// The size each payload is padded up to (about; never below the plain reading's ~100 B).
    pub payload_bytes: usize,
    pub pace: Pace,
    /// Client ids and device ids start with this, so two runs against one server differ.
    pub name: String,
}

impl Load {
    /// Closed loop, 4 connections × 1000 in flight, 100 devices, plain ~100 B readings.
    pub fn new(port: u16, events: usize) -> Load {
        Load {
            port,
            events,
            conns: 4,
            devices: 100,
            payload_bytes: 0,
            pace: Pace::Window(1000),
            name: "b".into(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every message's publish→PUBACK latency in microseconds (open loop: from its scheduled
    /// send time), sorted.
    pub latencies_us: Vec<u32>,
    /// From the first send to the last PUBACK.
    pub elapsed: Duration,
}

impl Outcome {
    /// Events per second over the whole run.
    pub fn rate(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p` quantile (0..=1) of the latencies, in milliseconds.
    pub fn pct_ms(&self, p: f64) -> f64 {
        let l = &self.latencies_us;
        if l.is_empty() {
            return f64::NAN;
        }
        l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    }
}

/// Runs `load` to the end: every message acknowledged.
pub fn run(load: &Load) -> Outcome {
    let conns = load.conns.min(load.devices.max(1)).max(1);
    let per_conn_devices = (load.devices / conns).max(1);
    let per = load.events / conns;
    let start = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let n = if c == conns - 1 {
                load.events - per * (conns - 1)
            } else {
                per
            };
            let stream = Stream {
                port: load.port,
                client: format!("{}-{c}", load.name),
                device_prefix: format!("meter-{}{c}d", load.name),
                devices: per_conn_devices,
                payload_bytes: load.payload_bytes,
                n,
            };
            let pace = match load.pace {
                Pace::Window(w) => Pace::Window(w),
                Pace::Rate(r) => Pace::Rate(r / conns as f64),
            };
            std::thread::spawn(move || match pace {
                Pace::Window(w) => stream.closed_loop(w),
                Pace::Rate(r) => stream.open_loop(r),
            })
        })
        .collect();
    let mut latencies_us: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a load thread panicked"))
        .collect();
    let elapsed = start.elapsed();
    latencies_us.sort_unstable();
    Outcome {
        latencies_us,
        elapsed,
    }
}

/// One meter reading of device `device`, padded to about `payload_bytes`.
pub fn reading(seq: u64, payload_bytes: usize) -> String {
    let mut p = format!(
        r#"{{"id":"r{seq}","seq":{seq},"ts":{},"data":{{"energy_kwh":{:.3},"voltage_v":230.1,"current_a":4.25"#,
        1_764_000_000_000i64 + seq as i64 * 1000,
        1000.0 + seq as f64 * 0.001
    );
    // `,"trace":[` + `]}}` is 14 bytes; each element is `"` + 60 chars + `",`.
    const ELEMENT: usize = 60;
    if payload_bytes > p.len() + 14 + ELEMENT + 3 {
        let room = payload_bytes - p.len() - 14;
        let elements = (room / (ELEMENT + 3)).clamp(1, 256);
        p.push_str(r#","trace":["#);
        for i in 0..elements {
            if i > 0 {
                p.push(',');
            }
            p.push('"');
            p.extend(std::iter::repeat_n('x', ELEMENT));
            p.push('"');
        }
        p.push(']');
    }
    p.push_str("}}");
    p
}

struct Stream {
    port: u16,
    client: String,
    device_prefix: String,
    devices: usize,
    payload_bytes: usize,
    n: usize,
}

impl Stream {
    /// The `i`-th message of this stream: (topic, payload). Each device's seq counts up.
    fn message(&self, i: usize) -> (String, String) {
        let d = i % self.devices;
        let seq = (i / self.devices) as u64 + 1;
        (
            format!("devices/{}{d}/events/meter", self.device_prefix),
            reading(seq, self.payload_bytes),
        )
    }

    fn encode(&self, i: usize, pkid: u16, out: &mut BytesMut) {
        let (topic, payload) = self.message(i);
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.pkid = pkid;
        p.write(out).expect("encode PUBLISH");
    }

    fn closed_loop(self, window: usize) -> Vec<u32> {
        let mut stream = connect(self.port, &self.client);
        let mut sent_at: Vec<Option<Instant>> = vec![None; 65536];
        let mut latencies = Vec::with_capacity(self.n);
        let (mut next, mut in_flight, mut pkid) = (0usize, 0usize, 0u16);
        let mut out = BytesMut::with_capacity(256 * 1024);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        while latencies.len() < self.n {
            let now = Instant::now();
            while in_flight < window && next < self.n {
                pkid = next_pkid(pkid);
                self.encode(next, pkid, &mut out);
                sent_at[pkid as usize] = Some(now);
                in_flight += 1;
                next += 1;
            }
            if !out.is_empty() {
                stream.write_all(&out).expect("write to the server");
                out.clear();
            }
            let got = stream.read(&mut chunk).expect("server connection");
            assert!(got > 0, "connection closed");
            buf.extend_from_slice(&chunk[..got]);
            let acked_at = Instant::now();
            for pkid in read_acks(&mut buf) {
                let t = sent_at[pkid as usize].take().expect("ack of a sent packet");
                latencies.push((acked_at - t).as_micros() as u32);
                in_flight -= 1;
            }
        }
        latencies
    }

    fn open_loop(self, rate: f64) -> Vec<u32> {
        let mut stream = connect(self.port, &self.client);
        let mut reader = stream.try_clone().expect("clone the socket");
        let start = Instant::now();
        // Scheduled send time of each packet id in flight, in ns since `start`, plus 1 (0 =
        // none in flight).
        let scheduled: Arc<Vec<AtomicU64>> =
            Arc::new((0..65536).map(|_| AtomicU64::new(0)).collect());
        let n = self.n;
        let acks = {
            let scheduled = scheduled.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(n);
                let mut buf = BytesMut::with_capacity(64 * 1024);
                let mut chunk = vec![0u8; 64 * 1024];
                while latencies.len() < n {
                    let got = reader.read(&mut chunk).expect("server connection");
                    assert!(got > 0, "connection closed");
                    buf.extend_from_slice(&chunk[..got]);
                    let now = start.elapsed().as_nanos() as u64;
                    for pkid in read_acks(&mut buf) {
                        let at = scheduled[pkid as usize].swap(0, Ordering::AcqRel);
                        assert!(at > 0, "ack of packet {pkid}, which is not in flight");
                        latencies.push(((now.saturating_sub(at - 1)) / 1000) as u32);
                    }
                }
                latencies
            })
        };
        let interval_ns = 1e9 / rate;
        let mut out = BytesMut::with_capacity(256 * 1024);
        let (mut next, mut pkid) = (0usize, 0u16);
        while next < n {
            let now = start.elapsed().as_nanos() as u64;
            let due = (next as f64 * interval_ns) as u64;
            if due > now {
                std::thread::sleep(Duration::from_nanos(due - now));
                continue;
            }
            // Everything due by now goes out in one write.
            while next < n && ((next as f64 * interval_ns) as u64) <= now {
                pkid = next_pkid(pkid);
                let at = (next as f64 * interval_ns) as u64 + 1;
                let before = scheduled[pkid as usize].swap(at, Ordering::AcqRel);
                assert!(before == 0, "65535 messages in flight on one connection");
                self.encode(next, pkid, &mut out);
                next += 1;
            }
            stream.write_all(&out).expect("write to the server");
            out.clear();
        }
        acks.join().expect("the ack reader panicked")
    }
}

fn next_pkid(pkid: u16) -> u16 {
    if pkid == u16::MAX { 1 } else { pkid + 1 }
}

/// The packet ids of the PUBACKs complete in `buf` (consumed).
fn read_acks(buf: &mut BytesMut) -> Vec<u16> {
    let mut ids = Vec::new();
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(Packet::PubAck(ack)) => ids.push(ack.pkid),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return ids,
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// An MQTT 3.1.1 connection (clean session) that got its CONNACK.
pub fn connect(port: u16, id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c.write(&mut out).unwrap();
    stream.write_all(&out).unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before CONNACK");
        buf.extend_from_slice(&chunk[..n]);
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::ConnAck(_)) => return stream,
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => continue,
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// A process's CPU time so far (user + system, /proc/PID/stat), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A process's peak resident set (VmHWM in /proc/PID/status), in KiB; 0 once it has exited.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_padded_to_about_their_size_within_the_default_limits() {
        let plain = reading(7, 0);
        let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(v["seq"], 7);
        assert!(v["data"].get("trace").is_none());
        for size in [1024usize, 8 * 1024] {
            let p = reading(7, size);
            let v: serde_json::Value = serde_json::from_str(&p).unwrap();
            let trace = v["data"]["trace"].as_array().unwrap();
            assert!(trace.len() <= 256, "proto's default max_fields");
            assert!(
                p.len() <= size && p.len() + 64 >= size,
                "{size}: {}",
                p.len()
            );
            assert!(p.len() <= 16384, "the example config's max_payload_bytes");
        }
    }
}
