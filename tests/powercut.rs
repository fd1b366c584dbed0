//! Power cuts: the agent's data dir on cutfs (`tests/powercut/cutfs.py`), a filesystem that
//! keeps every write in its own cache until fsync and drops (or tears) the rest when the plug
//! is pulled. `kill -9` + cut at random moments, remount, restart, repeatedly: every message
//! the agent acknowledged is in the outbox exactly once, with `edge_seq` gap-free.
//! The control run leaves the store's syncs out (`EDGE_AGENT_FAULT_SKIP_SYNC=1`) and must
//! lose acknowledged messages, or the test proves nothing.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use e2e::cutfs::{CutFs, Metadata};
use e2e::{
    Agent, Mosquitto, Publisher, assert_stream_stored_once, meter, meter_stream, set, wait_for,
};

const DEVICES: u64 = 4;

fn messages(n: u64) -> Vec<(u16, String, Vec<u8>)> {
    meter_stream(n, DEVICES)
}

/// Reproducible cut points: `cuts` distinct ack counts in `(0, n)`, ascending.
fn cut_points(seed: u64, n: u64, cuts: usize) -> Vec<usize> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut points: Vec<usize> = (0..cuts)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (1 + (x >> 33) % (n - 2)) as usize
        })
        .collect();
    points.sort_unstable();
    points.dedup();
    points
}

/// An agent whose config and log are on an ordinary disk and whose data dir is on `fs`.
fn agent_on(dir: &Path, fs: &CutFs, env: &[(&str, &str)]) -> Agent {
    let data = fs.mount.join("data");
    Agent::embedded_with_env(dir, env, |cfg| {
        set(cfg, &["data_dir"], data.display().to_string().into());
    })
}

/// Every one of the `n` events exactly once (see `e2e::assert_stream_stored_once`), and no
/// device gap left open (device state agrees with the outbox).
fn assert_exactly_once(agent: &Agent, n: u64) {
    assert_stream_stored_once(agent, n, DEVICES);
    let missed = agent.cli_json(&["missed", "list", "--json"]);
    assert!(missed.is_empty(), "no seq is missing: {missed:?}");
}

/// Streams `n` messages to an agent on cutfs from a device thread while the power is cut at
/// random points of the stream (torn: under the running agent, some unsynced pages kept), and
/// checks the outcome at the end.
fn cuts_lose_nothing(mode: Metadata, seed: u64, torn: bool) {
    let dir = tempfile::tempdir().unwrap();
    let fs = CutFs::mount(dir.path(), mode, seed);
    // Untorn cuts on a slow card: each sync waits 15 ms first, so most cuts land while a
    // commit is applied but not yet durable (its acks must still be held). Torn cuts keep the
    // syncs fast, so they meet writes in flight.
    let slow: &[(&str, &str)] = if torn {
        &[]
    } else {
        &[("EDGE_AGENT_FAULT_SLOW_SYNC_MS", "15")]
    };
    let mut agent = agent_on(dir.path(), &fs, slow);
    let n = 3000;
    let port = agent.mqtt_port;
    // The cuts follow the device's acks, not the agent's metrics: a metric is published after
    // a sync, so a cut timed by it would always land just after one, where an ack released
    // ahead of its sync could never be caught.
    let acked = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&acked);
    let device = std::thread::spawn(move || {
        let mut publisher = Publisher::new(port, "powercut-meter");
        publisher.publish_all(messages(n), 64, Duration::from_secs(300), |a| {
            seen.store(a, Ordering::Relaxed)
        });
        publisher.acked.len() as u64
    });
    let cuts = cut_points(seed, n, 4);
    for at in &cuts {
        wait_for(
            "the device's acks to reach the cut",
            Duration::from_secs(120),
            || acked.load(Ordering::Relaxed) >= *at,
        );
        if torn {
            // The power fails under the running agent: a commit in flight meets the cut (its
            // unsynced pages torn, its handles dead), then the process is gone.
            fs.cut(true);
            agent.kill9();
        } else {
            agent.kill9();
            fs.cut(false);
        }
        agent.restart();
    }
    assert_eq!(
        device.join().unwrap(),
        n,
        "the agent acknowledged every message"
    );
    wait_for(
        "the outbox to hold every event",
        Duration::from_secs(60),
        || agent.metric("edge_outbox_entries") as u64 >= n,
    );
    assert!(agent.stop().success());
    assert_exactly_once(&agent, n);
    // Whether a cut finds unsynced pages depends on where it lands (mid-commit or between
    // commits); that cuts do drop them is the control test's business.
    let stats = fs.stats();
    assert_eq!(stats["cuts"].as_u64(), Some(cuts.len() as u64), "{stats}");
    assert!(
        stats["syncs"].as_u64() > Some(0),
        "the agent syncs: {stats}"
    );
    eprintln!(
        "{mode:?} seed {seed}{}: {} cuts, {n} acknowledged, 0 lost; cutfs {stats}",
        if torn { " torn" } else { "" },
        cuts.len()
    );
}

#[test]
fn power_cuts_lose_nothing_acknowledged_ext4_metadata() {
    cuts_lose_nothing(Metadata::Ext4, 1, false);
}

#[test]
fn power_cuts_lose_nothing_acknowledged_strict_metadata() {
    cuts_lose_nothing(Metadata::Strict, 2, false);
}

#[test]
fn torn_power_cuts_lose_nothing_and_the_store_opens() {
    cuts_lose_nothing(Metadata::Ext4, 3, true);
    cuts_lose_nothing(Metadata::Strict, 4, true);
}

/// The external-broker mode: mosquitto (on an ordinary disk, the broker is another box's
/// business) redelivers what the agent had not acknowledged; what it had must survive the cut.
#[test]
fn external_broker_power_cuts_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let fs = CutFs::mount(dir.path(), Metadata::Strict, 5);
    let data = fs.mount.join("data");
    let mut agent = Agent::external(dir.path(), broker.port, |cfg| {
        set(cfg, &["data_dir"], data.display().to_string().into());
    });
    let n = 3000;
    let port = broker.port;
    let publishing = std::thread::spawn(move || {
        let mut publisher = Publisher::new(port, "powercut-meter");
        publisher.publish_all(messages(n), 256, Duration::from_secs(300), |_| {});
        publisher.acked.len() as u64
    });
    for quarter in 1..=3 {
        wait_for("progress", Duration::from_secs(120), || {
            agent.metric("edge_outbox_entries") as u64 >= n * quarter / 4
        });
        agent.kill9();
        fs.cut(quarter == 2);
        agent.restart();
    }
    assert_eq!(publishing.join().unwrap(), n, "mosquitto acknowledged all");
    wait_for(
        "the outbox to hold every event",
        Duration::from_secs(120),
        || agent.metric("edge_outbox_entries") as u64 >= n,
    );
    assert!(agent.stop().success());
    assert_exactly_once(&agent, n);
}

/// The control: without the store's syncs (sled's own flush only), a cut loses messages the
/// agent acknowledged. If this ever passes with nothing lost, cutfs no longer models a cut.
#[test]
fn without_syncs_a_power_cut_loses_acknowledged_messages() {
    let dir = tempfile::tempdir().unwrap();
    let fs = CutFs::mount(dir.path(), Metadata::Ext4, 6);
    let mut agent = agent_on(dir.path(), &fs, &[("EDGE_AGENT_FAULT_SKIP_SYNC", "1")]);
    let n = 800;
    let mut publisher = Publisher::new(agent.mqtt_port, "powercut-meter");
    publisher.publish_all(messages(n), 64, Duration::from_secs(120), |_| {});
    assert_eq!(publisher.acked.len() as u64, n);
    agent.kill9();
    fs.cut(false);
    agent.restart();
    assert!(agent.stop().success());
    let kept = agent.outbox().len() as u64;
    eprintln!("without syncs: {n} acknowledged, {kept} kept after the cut");
    assert!(
        kept < n,
        "a cut must lose unsynced commits ({kept} of {n} kept)"
    );
}

/// Torn writes all over an unsynced store (the control agent, which never syncs, then a torn
/// cut under it): whatever sled makes of it on the next start, panic included, the gateway
/// comes up and takes messages, on the recovered store or, quarantined, on a fresh one.
#[test]
fn a_torn_unsynced_store_never_bricks_the_gateway() {
    let mut quarantined = 0;
    for seed in 11..14 {
        let dir = tempfile::tempdir().unwrap();
        let fs = CutFs::mount(dir.path(), Metadata::Ext4, seed);
        let mut agent = agent_on(dir.path(), &fs, &[("EDGE_AGENT_FAULT_SKIP_SYNC", "1")]);
        let mut publisher = Publisher::new(agent.mqtt_port, "torn-meter");
        publisher.publish_all(messages(1200), 64, Duration::from_secs(120), |_| {});
        fs.cut(true);
        agent.kill9();
        let stats = fs.stats();
        assert!(stats["torn_pages_kept"].as_u64() > Some(0), "torn: {stats}");
        // Restarted as a gateway would be, syncing again.
        let mut agent = agent_on(dir.path(), &fs, &[]);
        let mut later = Publisher::new(agent.mqtt_port, "after-cut");
        let fresh = (0..40u64)
            .map(|i| {
                let pkid = u16::try_from(i + 1).unwrap();
                let seq = 10_000 + i;
                let topic = "devices/meter-9/events/meter".to_string();
                (
                    pkid,
                    topic,
                    meter(&format!("r{seq}"), seq, 5.0 + seq as f64 * 0.1),
                )
            })
            .collect();
        later.publish_all(fresh, 16, Duration::from_secs(60), |_| {});
        quarantined += agent.metric("edge_store_quarantined") as u64;
        assert!(agent.stop().success());
        let stored = agent
            .outbox()
            .iter()
            .filter(|r| r["device"] == "meter-9")
            .count();
        assert_eq!(stored, 40, "seed {seed}: the gateway took new messages");
        eprintln!("seed {seed}: cutfs {stats}");
    }
    eprintln!("torn unsynced stores: {quarantined} of 3 quarantined, the rest recovered");
}
