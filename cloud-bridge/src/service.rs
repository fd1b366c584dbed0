//! `cloud-bridge run`: the pipeline behind an MQTT shared subscription.
//!
//! One task owns the MQTT connection (rumqttc, persistent session, manual acks) and hands each
//! uplink message to its gateway's worker task; the worker coalesces what has arrived for that
//! gateway, stores it through [`Pipeline::advance`], and hands back the acks of the messages
//! whose every result is stored. Only then does the connection task send the PUBACK, so the
//! broker redelivers anything a crash interrupted. A packet id is only meaningful on the
//! connection that delivered it: acks carry their connection's generation and stale ones are
//! dropped (the broker redelivers those messages; they are recognised as stored and acked).
//!
//! A batch that starts past the stored sequence is held (unacked) and re-checked: with shared
//! subscriptions another bridge is usually storing the range in between. After `gap_hold_ms`
//! the worker publishes a `ReplayRequest` for the missing range to `gateways/{g}/replay`, again
//! every `replay_timeout_ms`, and after `replay_attempts` it reports MissedEvents and skips the
//! range.
//!
//! Gateway status messages (`$share/{group}/gateways/+/status`, see [`crate::status`]) go to
//! the same worker: a `released` above what is stored, with nothing held that covers it, is a
//! tail gap handled exactly like the gap above; the status's missed-event records are
//! announced (each once) before the status is acked, and the status itself is acked in order
//! with the results once the stored hwm reaches its `released` (or the range was skipped).
//!
//! Messages that are not a valid batch are written under `{prefix}failures/` (the DLQ entry
//! JSON, original bytes included), announced as EventDeadLettered, and then acked.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use proto::uplink::{
    GatewayStatus, MissedReport, QuarantineReport, ReplayRequest, gateway_of, replay_topic,
};
use proto::{Batch, DlqEntry, Stage};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode, TlsConfiguration,
    Transport,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backend::Backend;
use crate::backend::aws::Aws;
use crate::config::{Config, MqttConfig};
use crate::detail::DetailType;
use crate::layout::{Object, ObjectKey, date_of};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::pipeline::{Held, Pipeline, Progress};

const REQUEST_CAP: usize = 16 * 1024;

/// A delivered message's ack, valid only on the connection (`generation`) that delivered it.
#[derive(Debug)]
struct Delivery {
    generation: u64,
    publish: Publish,
    /// Released when the message is acked or abandoned: bounds messages held in memory.
    _permit: OwnedSemaphorePermit,
}

/// One uplink message for a gateway's worker.
struct Message {
    kind: Kind,
    delivery: Delivery,
}

enum Kind {
    Results(Batch),
    Status(GatewayStatus),
}

/// Runs until `shutdown`; then stops taking messages, lets the workers finish what they are
/// storing (up to `shutdown_grace_ms`), sends the acks and disconnects, keeping the session.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let aws = Aws::connect(&cfg.aws).await;
    let metrics = Arc::new(Metrics::default());
    let backend = crate::backend::aws::backend(aws, &cfg, &metrics);
    run_with(cfg, backend, metrics, shutdown).await
}

/// [`run`] over any backend (`edge-agent demo`: a local directory), counting into `metrics`.
/// The MQTT side (`[mqtt]`) and the HTTP listener (`[http]`) each run when configured.
pub async fn run_with(
    cfg: Arc<Config>,
    backend: Backend,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_on(cfg, backend, metrics, shutdown, None).await
}

/// [`run_with`], serving `[http]` on `listener` when given (bound by the caller, so it knows
/// the port before the bridge starts: the demo binds port 0) instead of binding `http.listen`.
pub async fn run_on(
    cfg: Arc<Config>,
    backend: Backend,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    listener: Option<tokio::net::TcpListener>,
) -> anyhow::Result<()> {
    if cfg.mqtt.is_none() && cfg.http.is_none() {
        anyhow::bail!("[mqtt]: required by `cloud-bridge run` (or an [http] listener)");
    }
    let owner = match &cfg.mqtt {
        Some(m) => m.client_id.clone(),
        None => format!("cloud-bridge-{}", std::process::id()),
    };
    let pipeline = Pipeline::with_backend(backend, Arc::clone(&cfg), Arc::clone(&metrics), owner);
    if cfg.ingest.is_some() && pipeline.ingest.is_none() {
        anyhow::bail!("[ingest]: the engine config did not compile (see the error above)");
    }

    let http = match (&cfg.http, &pipeline.ingest) {
        (Some(h), Some(ingest)) => {
            let listener = match listener {
                Some(l) => l,
                None => tokio::net::TcpListener::bind(h.listen)
                    .await
                    .with_context(|| format!("http.listen: cannot listen on {}", h.listen))?,
            };
            let api = crate::ingest::http::Api {
                ingest: Arc::clone(ingest),
                auth: Arc::new(crate::ingest::auth::Auth::load(h)?),
                max_body_bytes: h.max_body_bytes,
                max_batch: h.max_batch,
            };
            let router = crate::ingest::http::router(api);
            Some(tokio::spawn(crate::ingest::http::serve(
                listener,
                router,
                shutdown.clone(),
            )))
        }
        _ => None,
    };

    let dlq_processor = cfg.dlq.process.then(|| {
        tokio::spawn(crate::dlq::processor::run(
            pipeline.clone(),
            shutdown.clone(),
        ))
    });

    let sweeper = pipeline
        .ingest
        .clone()
        .zip(cfg.ingest.as_ref().map(|i| i.sweep_every_s))
        .filter(|(_, every)| *every > 0)
        .map(|(ingest, every)| tokio::spawn(sweep_loop(ingest, every, shutdown.clone())));

    let monitor = cfg
        .monitor
        .enabled
        .then(|| crate::monitor::Monitor::new(pipeline.clone()))
        .flatten()
        .map(|m| tokio::spawn(m.run(shutdown.clone())));

    let flusher = tokio::spawn({
        let metrics = Arc::clone(&metrics);
        let mcfg = cfg.metrics.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(mcfg.interval_s));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.flush(&mcfg, "service"),
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    });

    match &cfg.mqtt {
        Some(mqtt) => mqtt_loop(mqtt, &pipeline, &metrics, &shutdown).await?,
        None => shutdown.cancelled().await,
    }
    if let Some(h) = http {
        // It stops at the same token, once the requests in progress are answered.
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(Err(e))) => error!("http listener: {e:#}"),
            Ok(_) => {}
            Err(_) => warn!("http requests still running 10 s after shutdown; stopped"),
        }
    }
    flusher.abort();
    if let Some(t) = monitor {
        t.abort();
    }
    if let Some(t) = sweeper {
        // A sweep cut short leaves its devices due: the next sweep (any bridge's) takes them.
        t.abort();
    }
    if let Some(t) = dlq_processor {
        // It stops at the shutdown token; a message it was handling is retried later.
        t.abort();
    }
    metrics.flush(&cfg.metrics, "service");
    info!("cloud-bridge stopped");
    Ok(())
}

/// Devices swept per pass; a full pass is followed by the next at once.
const SWEEP_LIMIT: usize = 1000;

/// Sweeps for silent gateway-less devices every `every_s` (see [`crate::ingest::Ingest::sweep`]).
async fn sweep_loop(ingest: Arc<crate::ingest::Ingest>, every_s: u64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(every_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        loop {
            match ingest.sweep(crate::now_ms(), SWEEP_LIMIT).await {
                // Go on at once only while passes make progress (a busy device stays due).
                Ok(r) if r.more && (r.declared > 0 || r.published > 0) => continue,
                Ok(_) => break,
                Err(e) => {
                    ingest.metrics.aws_errors.increment(1);
                    warn!(error = %format!("{e:#}"), "sweep of gateway-less devices failed; retried at the next tick");
                    break;
                }
            }
        }
    }
}

/// The MQTT side of `run`: the shared subscriptions, the gateways' workers, the acks.
async fn mqtt_loop(
    mqtt: &MqttConfig,
    pipeline: &Pipeline,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let opts = mqtt_options(mqtt, &mqtt.client_id, false)?;
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAP);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<Delivery>>();
    let inflight = Arc::new(Semaphore::new(mqtt.max_inflight));
    let worker_stop = CancellationToken::new();
    let mut workers: HashMap<String, mpsc::UnboundedSender<Message>> = HashMap::new();
    // Gateway-less devices on the broker: one worker each, so a device's messages are
    // processed in the order they arrived.
    let mut devices: HashMap<String, mpsc::UnboundedSender<Delivery>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut pending_acks: Vec<Publish> = Vec::new();
    let mut generation = 0u64;
    let mut connected = false;
    let mut draining = false;
    let mut drain_deadline = None;
    let mut retry_at: Option<Instant> = None;
    let backoff_min = Duration::from_millis(mqtt.reconnect_min_ms);
    let backoff_max = Duration::from_millis(mqtt.reconnect_max_ms);
    let mut backoff = backoff_min;
    let filter = mqtt.subscription();
    let status_filter = mqtt.status_subscription();
    // Gateway-less devices on this broker (`ingest.mqtt`): the engine's topic, shared.
    let device_filter = pipeline
        .ingest
        .as_ref()
        .filter(|_| pipeline.cfg.ingest.as_ref().is_some_and(|i| i.mqtt))
        .map(|i| {
            format!(
                "$share/{}/{}",
                mqtt.share_group,
                i.engine.topic().subscription_filter()
            )
        });
    info!(host = %mqtt.host, port = mqtt.port, client_id = %mqtt.client_id, %filter, tls = mqtt.tls,
        "cloud-bridge connecting");

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !draining => {
                info!("draining: finishing the batches being stored");
                draining = true;
                drain_deadline = Some(Instant::now() + Duration::from_millis(mqtt.shutdown_grace_ms));
                workers.clear();
                devices.clear();
                worker_stop.cancel();
            }
            _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                warn!("workers still busy after shutdown_grace_ms; their batches stay unacked");
                break;
            }
            Some(acks) = ack_rx.recv() => {
                for d in acks {
                    if d.generation == generation && connected {
                        pending_acks.push(d.publish);
                    } else {
                        debug!(pkid = d.publish.pkid, "dropping an ack of an earlier connection");
                    }
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    error!("a gateway worker panicked: {e}");
                }
            }
            _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                retry_at = None;
            }
            ev = eventloop.poll(), if retry_at.is_none() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                    connected = true;
                    backoff = backoff_min;
                    info!(session_present = ca.session_present, "connected to the broker");
                    if !draining {
                        for f in [Some(&filter), Some(&status_filter), device_filter.as_ref()].into_iter().flatten() {
                            if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                                error!(error = %e, "could not queue SUBSCRIBE");
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes.contains(&SubscribeReasonCode::Failure) {
                        error!(%filter, %status_filter, "the broker refused a subscription");
                    } else {
                        info!(%filter, %status_filter, "subscribed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if draining {
                        continue; // left unacked: redelivered to the next session
                    }
                    // Bounded: at the limit, stop reading from the broker until acks free room.
                    let permit = Arc::clone(&inflight).acquire_owned().await.expect("semaphore open");
                    let delivery = Delivery { generation, publish: p, _permit: permit };
                    dispatch(delivery, pipeline, &client, &ack_tx, &worker_stop, &mut workers, &mut devices, &mut tasks);
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        warn!(error = %e, "lost the broker connection");
                    } else {
                        error!(error = %e, "cannot connect to the broker; retrying in {backoff:?}");
                    }
                    connected = false;
                    generation += 1;
                    pending_acks.clear();
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(backoff_max);
                }
            },
        }
        if draining && tasks.is_empty() {
            // The last acks: whatever the workers released before ending.
            while let Ok(acks) = ack_rx.try_recv() {
                pending_acks.extend(
                    acks.into_iter()
                        .filter(|d| d.generation == generation && connected)
                        .map(|d| d.publish),
                );
            }
        }
        if connected {
            flush_acks(&client, &mut pending_acks, metrics);
        }
        if draining && tasks.is_empty() {
            break;
        }
    }

    if connected {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
    worker_stop.cancel();
    tasks.abort_all();
    Ok(())
}

/// Queues acks to the client; what does not fit stays for the next round.
fn flush_acks(client: &AsyncClient, pending: &mut Vec<Publish>, metrics: &Metrics) {
    let mut sent = 0;
    for p in pending.iter() {
        if client.try_ack(p).is_err() {
            break;
        }
        sent += 1;
    }
    pending.drain(..sent);
    metrics.acked_messages.increment(sent as u64);
}

/// Decodes a message and hands it to its gateway's worker (started on first use), or
/// dead-letters it.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    d: Delivery,
    pipeline: &Pipeline,
    client: &AsyncClient,
    ack_tx: &mpsc::UnboundedSender<Vec<Delivery>>,
    stop: &CancellationToken,
    workers: &mut HashMap<String, mpsc::UnboundedSender<Message>>,
    devices: &mut HashMap<String, mpsc::UnboundedSender<Delivery>>,
    tasks: &mut JoinSet<()>,
) {
    let topic = d.publish.topic.clone();
    if let Some(ingest) = &pipeline.ingest
        && let Some((device, _)) = ingest.engine.topic().matches(&topic)
    {
        let d = match devices.get(device) {
            Some(tx) => match tx.send(d) {
                Ok(()) => return,
                Err(mpsc::error::SendError(d)) => d,
            },
            None => d,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Delivery>();
        let _ = tx.send(d);
        devices.insert(device.to_string(), tx);
        let (ingest, ack_tx, stop) = (Arc::clone(ingest), ack_tx.clone(), stop.clone());
        tasks.spawn(async move {
            while let Some(d) = rx.recv().await {
                device_message(Arc::clone(&ingest), d, ack_tx.clone(), stop.clone()).await;
                if stop.is_cancelled() {
                    return;
                }
            }
        });
        return;
    }
    let parsed = if proto::uplink::status_gateway_of(&topic).is_some() {
        proto::accept::status(&topic, &d.publish.payload).map(Kind::Status)
    } else {
        proto::accept::batch(&topic, &d.publish.payload).map(Kind::Results)
    };
    let kind = match parsed {
        Ok(k) => k,
        Err(reason) => {
            pipeline.metrics.decode_errors.increment(1);
            warn!(%topic, %reason, "not a valid uplink batch: dead-lettered under failures/");
            let (p, tx, stop) = (pipeline.clone(), ack_tx.clone(), stop.clone());
            tasks.spawn(async move {
                let payload = d.publish.payload.clone();
                let mut backoff = Duration::from_millis(200);
                loop {
                    match dead_letter(&p, &topic, &payload, &reason.to_string()).await {
                        Ok(()) => {
                            let _ = tx.send(vec![d]);
                            return;
                        }
                        Err(e) => {
                            p.metrics.aws_errors.increment(1);
                            error!(error = %format!("{e:#}"), "could not store a dead letter; retrying");
                        }
                    }
                    tokio::select! {
                        _ = sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            });
            return;
        }
    };
    let gateway = match &kind {
        Kind::Results(b) => b.gateway.clone(),
        Kind::Status(s) => s.gateway.clone(),
    };
    let msg = Message { kind, delivery: d };
    let msg = match workers.get(&gateway) {
        Some(tx) => match tx.send(msg) {
            Ok(()) => return,
            Err(mpsc::error::SendError(m)) => m,
        },
        None => msg,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(msg);
    workers.insert(gateway.clone(), tx);
    tasks.spawn(worker(
        gateway,
        rx,
        pipeline.clone(),
        client.clone(),
        ack_tx.clone(),
        stop.clone(),
    ));
}

/// A gateway-less device's message from the cloud broker: processed (stored, or refused and
/// dead-lettered), then acked; a backend failure is retried with backoff, unacked meanwhile.
async fn device_message(
    ingest: Arc<crate::ingest::Ingest>,
    d: Delivery,
    ack_tx: mpsc::UnboundedSender<Vec<Delivery>>,
    stop: CancellationToken,
) {
    let Some((device, event_type)) = ingest
        .engine
        .topic()
        .matches(&d.publish.topic)
        .map(|(a, b)| (a.to_string(), b.to_string()))
    else {
        return;
    };
    let received_at = now_ms();
    let mut backoff = Duration::from_millis(200);
    loop {
        let m = crate::ingest::Message {
            device: &device,
            event_type: &event_type,
            payload: &d.publish.payload,
            via: proto::Via::Iot,
            received_at,
            replay: false,
        };
        match ingest.handle(&m).await {
            Ok(reply) => {
                debug!(%device, ?reply, "device message handled");
                let _ = ack_tx.send(vec![d]);
                return;
            }
            Err(e) => {
                ingest.metrics.aws_errors.increment(1);
                error!(%device, error = %format!("{e:#}"), "device message not stored; retrying");
            }
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Writes a DLQ entry for a bad uplink message to `{prefix}failures/` and announces it.
async fn dead_letter(
    p: &Pipeline,
    topic: &str,
    payload: &Bytes,
    reason: &str,
) -> anyhow::Result<()> {
    // Stable across builds and bridges (std's DefaultHasher is not), so a message redelivered
    // to another bridge is stored under the same key.
    let id = crate::fnv1a(&[topic.as_bytes(), &[0], payload].concat());
    let now = now_ms();
    let entry = DlqEntry {
        id,
        event_id: None,
        device: None,
        topic: topic.to_string(),
        stage: Stage::Cloud,
        reason: reason.to_string(),
        subject: None,
        attempts: 1,
        first_seen: now,
        last_seen: now,
        payload: payload.to_vec(),
    };
    let json = entry.to_json().to_string();
    let gw = gateway_of(topic).unwrap_or("unknown");
    let key = ObjectKey {
        date: date_of(now),
        gateway: gw.to_string(),
        object: Object::Uplink { hash: id },
    }
    .to_key(&p.cfg.aws.prefix);
    p.sink
        .put_object(&key, json.clone().into_bytes(), "application/json")
        .await?;
    p.sink
        .put_events(vec![(DetailType::EventDeadLettered, json)])
        .await
}

/// A gap a worker is waiting on.
struct Gap {
    from: u64,
    to: u64,
    attempts: u32,
    next_action: Instant,
}

/// What a worker took from its gateway's status messages.
#[derive(Default)]
struct StatusSeen {
    released: u64,
    reports: BTreeMap<u64, MissedReport>,
    quarantines: BTreeMap<i64, QuarantineReport>,
}

/// Stores one gateway's messages in order; see the module doc.
async fn worker(
    gateway: String,
    mut rx: mpsc::UnboundedReceiver<Message>,
    p: Pipeline,
    client: AsyncClient,
    ack_tx: mpsc::UnboundedSender<Vec<Delivery>>,
    stop: CancellationToken,
) {
    let pc = p.cfg.pipeline.clone();
    let mut held = Held::new();
    let mut waiting: Vec<(u64, Delivery)> = Vec::new();
    let mut gap: Option<Gap> = None;
    let mut wake_at: Option<Instant> = None;
    let mut err_backoff = Duration::from_millis(200);
    // The highest `released` of the gateway's status messages, and their records to announce.
    let mut seen = StatusSeen::default();
    let add = |m: Message,
               held: &mut Held,
               waiting: &mut Vec<(u64, Delivery)>,
               seen: &mut StatusSeen| match m.kind {
        Kind::Results(batch) => {
            let last = batch.results.iter().map(|r| r.edge_seq).max().unwrap_or(0);
            for r in batch.results {
                held.entry(r.edge_seq).or_insert(r);
            }
            waiting.push((last, m.delivery));
        }
        Kind::Status(s) => {
            seen.released = seen.released.max(s.released);
            for r in s.missed {
                seen.reports.entry(r.id).or_insert(r);
            }
            for q in s.quarantines {
                seen.quarantines.entry(q.at).or_insert(q);
            }
            // Acked once the hwm covers what it reports as released.
            waiting.push((s.released, m.delivery));
        }
    };
    loop {
        if stop.is_cancelled() {
            return;
        }
        if waiting.is_empty() && gap.is_none() {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => add(m, &mut held, &mut waiting, &mut seen),
                    None => return,
                },
                _ = stop.cancelled() => return,
            }
            // Idle until now: let more of the gateway's messages come for a moment, so a
            // slow stream makes fewer, larger objects (S3 charges per PUT).
            let until = Instant::now() + Duration::from_millis(pc.object_linger_ms);
            while (held.len() as u64) < pc.max_object_records {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => add(m, &mut held, &mut waiting, &mut seen),
                        None => break,
                    },
                    _ = sleep_until(until) => break,
                    _ = stop.cancelled() => return,
                }
            }
        } else if let Some(at) = wake_at {
            tokio::select! {
                m = rx.recv() => if let Some(m) = m { add(m, &mut held, &mut waiting, &mut seen) },
                _ = sleep_until(at) => {}
                _ = stop.cancelled() => return,
            }
        }
        while let Ok(m) = rx.try_recv() {
            add(m, &mut held, &mut waiting, &mut seen);
        }
        let tail = seen.released;
        wake_at = None;
        // Before anything is acked: a status is acked only after its records are announced.
        let reported = !seen.reports.is_empty() || !seen.quarantines.is_empty();
        if reported
            && let Err(e) = async {
                crate::status::announce(&p, &gateway, &mut seen.reports).await?;
                crate::status::announce_quarantines(&p, &gateway, &mut seen.quarantines).await
            }
            .await
        {
            p.metrics.aws_errors.increment(1);
            error!(%gateway, error = %format!("{e:#}"),
                "announcing missed-event records or store quarantines failed; retrying in {err_backoff:?}");
            wake_at = Some(Instant::now() + err_backoff);
            err_backoff = (err_backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        let progress = match p.advance(&gateway, &mut held).await {
            Ok(pr) => {
                err_backoff = Duration::from_millis(200);
                pr
            }
            Err(e) => {
                p.metrics.aws_errors.increment(1);
                error!(%gateway, error = %format!("{e:#}"),
                    "storing failed; the batches stay unacked and are retried in {err_backoff:?}");
                wake_at = Some(Instant::now() + err_backoff);
                err_backoff = (err_backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let hwm = progress.hwm();
        // In the order the messages arrived (MQTT 3.1.1 §4.6 asks for PUBACKs in order; some
        // brokers, rumqttd among them, drop a client that acks out of order).
        let (done, rest): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(last, _)| *last <= hwm);
        waiting = rest;
        let acks: Vec<Delivery> = done.into_iter().map(|(_, d)| d).collect();
        if !acks.is_empty() && ack_tx.send(acks).is_err() {
            return;
        }
        // The tail check: a released range that nothing held covers is a gap too.
        let progress = crate::status::with_tail(progress, tail);
        let Progress::Missing { from, to, .. } = progress else {
            gap = None;
            continue;
        };
        let now = Instant::now();
        match &mut gap {
            Some(g) if g.from == from => g.to = to,
            _ => {
                p.metrics.gaps.increment(1);
                debug!(%gateway, from, to, "holding a batch until edge_seq {from}..={to} is stored");
                gap = Some(Gap {
                    from,
                    to,
                    attempts: 0,
                    next_action: now + Duration::from_millis(pc.gap_hold_ms),
                });
            }
        }
        let g = gap.as_mut().expect("set above");
        if now >= g.next_action {
            if g.attempts < pc.replay_attempts {
                g.attempts += 1;
                let req = ReplayRequest {
                    from: g.from,
                    to: g.to,
                };
                let body = serde_json::to_vec(&req).expect("a ReplayRequest encodes");
                match client.try_publish(replay_topic(&gateway), QoS::AtLeastOnce, false, body) {
                    Ok(()) => {
                        p.metrics.replays_requested.increment(1);
                        info!(%gateway, from = g.from, to = g.to, attempt = g.attempts, "requested a replay");
                    }
                    Err(e) => warn!(%gateway, error = %e, "could not queue a replay request"),
                }
                g.next_action = now + Duration::from_millis(pc.replay_timeout_ms);
            } else {
                let (from, to) = (g.from, g.to);
                match p.skip_missing(&gateway, from, to).await {
                    Ok(_) => gap = None,
                    Err(e) => {
                        p.metrics.aws_errors.increment(1);
                        error!(%gateway, error = %format!("{e:#}"), "could not record missed events; retrying");
                    }
                }
                wake_at = Some(Instant::now());
                continue;
            }
        }
        let next = gap.as_ref().map_or(now, |g| g.next_action);
        wake_at = Some((now + Duration::from_millis(pc.gap_recheck_ms)).min(next));
    }
}

/// Makes aws-lc (the AWS SDK's) rustls's process-wide provider, which rumqttc builds its TLS
/// config with. A whole-workspace build links ring too (the agent's), and with two providers
/// rustls would not choose; a second call is a no-op.
pub fn install_tls_provider() {
    let _ = rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// rumqttc options: persistent session and manual acks for the service, TLS (mutual when a
/// client certificate is configured) unless `tls = false`.
pub fn mqtt_options(m: &MqttConfig, client_id: &str, clean: bool) -> anyhow::Result<MqttOptions> {
    let mut o = MqttOptions::new(client_id, m.host.clone(), m.port);
    o.set_clean_session(clean)
        .set_manual_acks(!clean)
        .set_keep_alive(Duration::from_secs(u64::from(m.keep_alive_s.max(5))))
        .set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes);
    if m.tls {
        install_tls_provider();
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let ca = read(m.ca.as_deref().context("mqtt.ca: required with TLS")?)?;
        let client_auth = match (&m.cert, &m.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

/// Publishes one message at QoS 1 on a short-lived connection and waits for its PUBACK (the
/// Lambda's way to ask a gateway for a replay).
pub async fn publish_once(m: &MqttConfig, topic: String, payload: Vec<u8>) -> anyhow::Result<()> {
    let id = format!(
        "{}-{:08x}",
        m.client_id,
        now_ms() as u32 ^ std::process::id()
    );
    let opts = mqtt_options(m, &id, true)?;
    let (client, mut el) = AsyncClient::new(opts, 16);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await?;
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await? {
                Event::Incoming(Packet::PubAck(_)) => return Ok::<_, anyhow::Error>(()),
                _ => continue,
            }
        }
    })
    .await
    .context("no PUBACK within 10 s")?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    r
}
