//! The demo's cloud side: an in-process MQTT broker, the bridge's config, a broken gateway's
//! message, and counting what reached the local "bucket".

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::DemoArgs;

/// The in-process cloud broker: rumqttd with one MQTT 3.1.1 listener on loopback, plain TCP;
/// returns its port.
///
/// rumqttd binds its listener inside its own server thread and reports neither the address nor
/// a failure to bind (the thread logs it and ends), so the port is one that was free a moment
/// ago: if another process takes it first, the server thread ends and the broker is started
/// again on another port (a few times). The agent binds port 0 itself.
pub fn start_cloud_broker() -> anyhow::Result<u16> {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let port = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .context("finding a free port")?;
            l.local_addr()?.port()
        };
        if start_broker_on(port)? {
            return Ok(port);
        }
        tracing::warn!(port, "the cloud broker's port was taken: another port");
    }
    bail!("the cloud broker found no free port in {ATTEMPTS} attempts")
}

/// Starts rumqttd on `port`; false if its server ended before it accepted a connection (the
/// port was taken).
fn start_broker_on(port: u16) -> anyhow::Result<bool> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.cloud]
name = "cloud"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.cloud.connections]
connection_timeout_ms = 10000
max_payload_size = 4194304
max_inflight_count = 500
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = toml::from_str(&text).context("the cloud broker's config")?;
    // `Broker::start` returns only when its server threads have ended: a failed bind.
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("cloud-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the cloud broker stopped");
            }
            let _ = ended_tx.send(());
        })
        .context("starting the cloud broker")?;
    // Ready when it accepts connections.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ended.try_recv().is_ok() {
            return Ok(false);
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("the cloud broker did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The demo's bridge: local broker and backend (or `--cloud-config`), and it re-verifies
/// every result with the engine the agent runs.
pub fn bridge_config(
    args: &DemoArgs,
    cloud_port: u16,
    engine: &engine::EngineSpec,
    http_port: u16,
    api_keys: &Path,
) -> anyhow::Result<cloud_bridge::config::Config> {
    let local = cloud_bridge::config::Config::parse(&format!(
        r#"
[mqtt]
host = "127.0.0.1"
port = {cloud_port}
client_id = "demo-bridge"
tls = false
[aws]
bucket = "local"
event_bus = "local"
table = "local"
dlq_queue = "local"
[metrics]
emf = "off"
[ingest]
[http]
listen = "127.0.0.1:{http_port}"
api_keys = "{}"
"#,
        api_keys.display()
    ))
    .map_err(anyhow::Error::msg)?;
    let mut c = match &args.cloud_config {
        None => local,
        Some(p) => {
            let mut c = cloud_bridge::config::Config::load(p)
                .map_err(|e| anyhow::anyhow!("--cloud-config: {e}"))?;
            c.mqtt = local.mqtt;
            c.metrics = local.metrics;
            c.ingest = c.ingest.or(local.ingest);
            c.http = local.http;
            c
        }
    };
    // The phone app's events go through the engine the agent runs.
    if let Some(i) = c.ingest.as_mut()
        && i.spec.is_none()
    {
        i.spec = Some(engine.clone());
    }
    if c.verify.is_none() {
        c.verify = Some(cloud_bridge::config::VerifyConfig {
            engine_config: "(the agent's config)".into(),
            sample: 1.0,
            tolerance: 1e-9,
            max_devices: 100_000,
            spec: Some(engine.clone()),
        });
    }
    Ok(c)
}

/// Sends one message that is not a batch to the cloud broker, as a broken gateway would: the
/// bridge dead-letters it under `failures/` (the cloud side's DLQ).
pub async fn inject_bad_uplink(port: u16, gateway: &str) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let opts = MqttOptions::new("demo-broken-gateway", "127.0.0.1", port);
    let (client, mut el) = AsyncClient::new(opts, 8);
    client
        .publish(
            proto::uplink::results_topic(gateway),
            QoS::AtLeastOnce,
            false,
            b"\xff this is not a CBOR batch".to_vec(),
        )
        .await?;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Incoming::PubAck(_)) = el.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await
    .context("no PUBACK from the cloud broker")??;
    let _ = client.disconnect().await;
    Ok(())
}

/// The records of the NDJSON objects `keys` under `root`: (records, distinct event ids).
pub fn count_records(root: &Path, keys: &[String]) -> anyhow::Result<(u64, u64)> {
    let mut ids = HashSet::new();
    let mut records = 0;
    for k in keys {
        let text = std::fs::read_to_string(root.join(k))?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            records += 1;
            ids.insert(v["event_id"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok((records, ids.len() as u64))
}
