//! Helpers shared by the ingest tests: free ports, a real mosquitto process, an MQTT test
//! client (rumqttc) that reports what the server sends it, and raw-socket MQTT helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::{AckSet, Inbound};

pub const WAIT: Duration = Duration::from_secs(10);

/// Starts of mosquitto tried when its port turns out to be taken.
const BIND_ATTEMPTS: u32 = 5;

/// A port that was free a moment ago (bind to 0, read, release): another process may take it
/// before mosquitto binds it. Only for [`Mosquitto`], which cannot listen on port 0 and report
/// the port (its `listener 0` is a Unix socket), and whose start is retried on another port when
/// it is taken; the endpoints under test bind port 0 themselves.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Finds an executable on PATH or in the usual sbin/bin directories (mosquitto lives in
/// /usr/sbin, which a non-root PATH may lack).
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/sbin",
                "/usr/bin",
                "/usr/local/sbin",
                "/usr/local/bin",
                "/sbin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A mosquitto broker on 127.0.0.1:`port`, killed when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto on a free port; `None` (after printing a notice) if it is not installed.
    pub async fn start() -> Option<Mosquitto> {
        let Some(_) = find_bin("mosquitto") else {
            eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        };
        let mut m = Mosquitto {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        // Taken before mosquitto bound it: another port.
        for _ in 1..BIND_ATTEMPTS {
            if m.spawn().await {
                return Some(m);
            }
            m.port = free_port();
        }
        assert!(
            m.spawn().await,
            "mosquitto: no free port in {BIND_ATTEMPTS} attempts"
        );
        Some(m)
    }

    /// Starts mosquitto on `self.port` and waits until it says it is running (its listener is
    /// open, so a connect cannot reach another process holding the port); false when it exits
    /// because the port is taken.
    async fn spawn(&mut self) -> bool {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n\
                 persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                 log_type information\n",
                self.port
            ),
        )
        .unwrap();
        let path = self.dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&path).unwrap();
        let child = Command::new(find_bin("mosquitto").unwrap())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text
                .lines()
                .any(|l| l.contains("mosquitto version") && l.ends_with(" running"))
            {
                return true;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                if text.contains("Address already in use") {
                    return false;
                }
                panic!("mosquitto exited with {status}: {text}");
            }
            assert!(Instant::now() < deadline, "mosquitto did not start: {text}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the broker (its sessions are lost: persistence is off).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh broker process on the same port (the client under test reconnects to
    /// it); if another process took the port meanwhile, tries again with a short backoff.
    pub async fn restart(&mut self) {
        self.kill();
        let mut pause = Duration::from_millis(100);
        for _ in 1..BIND_ATTEMPTS {
            if self.spawn().await {
                return;
            }
            sleep(pause).await;
            pause *= 2;
        }
        assert!(
            self.spawn().await,
            "mosquitto: port {} stayed taken",
            self.port
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A rumqttc client whose received packets (PubAck, PubRec, PubComp, …) land in `events`.
pub struct TestClient {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
}

impl TestClient {
    /// Connects with a clean session and waits for CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> TestClient {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(_) => return,
                }
            }
        });
        match timeout(WAIT, events.recv()).await {
            Ok(Some(Packet::ConnAck(_))) => {}
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
        TestClient {
            client,
            events,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, qos: QoS, payload: &str) {
        self.client
            .publish(topic, qos, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// The next packet from the server within `within`, skipping PINGRESP.
    pub async fn next(&mut self, within: Duration) -> Option<Packet> {
        let deadline = Instant::now() + within;
        loop {
            match timeout(deadline - Instant::now(), self.events.recv()).await {
                Ok(Some(Packet::PingResp)) => continue,
                Ok(p) => return p,
                Err(_) => return None,
            }
        }
    }

    /// Collects `n` PUBACK packet ids.
    pub async fn pubacks(&mut self, n: usize) -> Vec<u16> {
        let mut ids = Vec::new();
        while ids.len() < n {
            match self.next(WAIT).await {
                Some(Packet::PubAck(a)) => ids.push(a.pkid),
                Some(_) => {}
                None => panic!("only {} of {n} PUBACKs arrived: {ids:?}", ids.len()),
            }
        }
        ids
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Receives the next inbound within [`WAIT`].
pub async fn recv(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    timeout(WAIT, rx.recv())
        .await
        .expect("no inbound in time")
        .expect("channel closed")
}

/// Asserts that nothing arrives on `rx` for `within`.
pub async fn assert_quiet(rx: &mut mpsc::Receiver<Inbound>, within: Duration) {
    if let Ok(Some(i)) = timeout(within, rx.recv()).await {
        panic!("unexpected inbound on {}: {:?}", i.topic, i.payload);
    }
}

/// Releases the acks of `inbounds` as one batch.
pub fn release(inbounds: impl IntoIterator<Item = Inbound>) {
    let mut set = AckSet::default();
    for i in inbounds {
        set.push(i.ack);
    }
    set.release();
}

/// A raw MQTT connection for protocol-level tests.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends a v3.1.1 CONNECT and returns the CONNACK return code.
    pub async fn mqtt_connect(&mut self, c: rumqttc::mqttbytes::v4::Connect) -> u8 {
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        self.send(&b).await;
        let ack = self.read_exact(4).await;
        assert_eq!(&ack[..2], &[0x20, 0x02], "not a CONNACK: {ack:?}");
        ack[3]
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        timeout(WAIT, self.stream.read_exact(&mut v))
            .await
            .expect("read timed out")
            .expect("read failed");
        v
    }

    /// Waits until the server closes the connection (EOF or reset); panics on data or timeout.
    pub async fn expect_closed(&mut self, within: Duration) {
        let mut b = [0u8; 64];
        match timeout(within, self.stream.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("expected close, got {:?}", &b[..n]),
            Err(_) => panic!("connection still open after {within:?}"),
        }
    }
}

/// Encodes one packet.
pub fn encode(p: &Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b.to_vec()
}

/// A PUBLISH packet.
pub fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = rumqttc::Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    encode(&Packet::Publish(p))
}
