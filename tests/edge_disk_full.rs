//! Disk full: the agent's data dir on a small tmpfs that the test fills up under load. Intake
//! stops before a commit could meet a full disk (devices keep their messages, nothing new is
//! acknowledged), `status` and `edge_disk_full` say so, and when room returns the agent
//! resumes by itself; every message ends in the outbox exactly once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::{Agent, Publisher, meter, set, wait_for};

/// A size-limited tmpfs, unmounted on drop (the test runs as root, as CI does).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size_mb: u64) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        SmallFs(at.to_path_buf())
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn messages(from_seq: u64, n: u64) -> Vec<(u16, String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let seq = from_seq + i;
            let pkid = u16::try_from(i + 1).unwrap();
            let topic = "devices/meter-1/events/meter".to_string();
            (
                pkid,
                topic,
                meter(&format!("r{seq}"), seq, 100.0 + seq as f64 * 0.1),
            )
        })
        .collect()
}

fn intake(agent: &Agent) -> String {
    let out = agent.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["intake"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_full_disk_stops_intake_loses_nothing_and_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("small"), 48);
    let data = fs.0.join("data");
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["data_dir"], data.display().to_string().into());
        set(cfg, &["pipeline", "disk_reserve_mb"], 8.into());
    });
    let mut first = Publisher::new(agent.mqtt_port, "before");
    first.publish_all(messages(1, 300), 32, Duration::from_secs(60), |_| {});
    assert_eq!(agent.metric("edge_disk_full"), 0.0);

    // Fill the disk to 2 MiB short of full: below the reserve.
    let filler = fs.0.join("filler");
    let fill = fs.free_bytes().saturating_sub(2 << 20);
    std::fs::write(&filler, vec![0u8; usize::try_from(fill).unwrap()]).unwrap();
    let port = agent.mqtt_port;
    let later = std::thread::spawn(move || {
        let mut p = Publisher::new(port, "during");
        p.publish_all(messages(301, 200), 32, Duration::from_secs(120), |_| {});
        p.acked.len()
    });
    wait_for(
        "intake to stop on disk full",
        Duration::from_secs(30),
        || agent.metric("edge_disk_full") == 1.0,
    );
    assert_eq!(intake(&agent), "blocked: disk full");
    // A batch taken before the check may have gone through; nothing after it.
    let accepted = agent.metric("edge_accepted_total");
    assert!(accepted < 500.0, "intake stopped short: {accepted}");
    assert_eq!(intake(&agent), "blocked: disk full");
    assert_eq!(
        agent.metric("edge_accepted_total"),
        accepted,
        "nothing committed while full"
    );
    assert!(!later.is_finished(), "the device still holds its messages");

    // Room again: the agent resumes by itself and takes everything.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        later.join().unwrap(),
        200,
        "every held message acknowledged"
    );
    assert_eq!(agent.metric("edge_disk_full"), 0.0);
    assert_eq!(intake(&agent), "taking messages");
    assert!(agent.log_text().contains("disk full: intake stopped"));
    assert!(agent.stop().success());
    let outbox = agent.outbox();
    assert_eq!(outbox.len(), 500);
    for (i, r) in outbox.iter().enumerate() {
        assert_eq!(r["edge_seq"].as_u64(), Some(i as u64 + 1));
        assert_eq!(r["event_id"], format!("meter-1/r{}", i + 1));
    }
}

/// Fills the filesystem to the last byte (a file that grows until ENOSPC).
fn fill_up(fs: &SmallFs) -> PathBuf {
    use std::io::Write;
    let path = fs.0.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 1 << 16];
    while f.write_all(&chunk).is_ok() {}
    // The last partial chunk: byte by byte.
    while f.write_all(&[0]).is_ok() {}
    path
}

#[test]
fn no_space_inside_a_commit_loses_nothing_acknowledged_and_never_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("small"), 48);
    let data = fs.0.join("data");
    // No reserve: the commit itself meets the full disk, as on a filesystem that another
    // process filled between the agent's look and its write.
    let mut agent = Agent::embedded(dir.path(), |cfg| {
        set(cfg, &["data_dir"], data.display().to_string().into());
        set(cfg, &["pipeline", "disk_reserve_mb"], 0.into());
    });
    let mut first = Publisher::new(agent.mqtt_port, "before");
    first.publish_all(messages(1, 300), 32, Duration::from_secs(60), |_| {});
    let filler = fill_up(&fs);

    // The device keeps publishing (and retransmitting what was not acknowledged) throughout.
    let port = agent.mqtt_port;
    let later = std::thread::spawn(move || {
        let mut p = Publisher::new(port, "during");
        p.publish_all(messages(301, 2000), 32, Duration::from_secs(300), |_| {});
        p.acked.len()
    });
    let status = agent.exited(Duration::from_secs(60));
    assert!(!status.success(), "a failed commit stops the agent");
    let log = agent.log_text();
    assert!(
        log.contains("edge-agent: the pipeline stopped: disk full"),
        "{log}"
    );

    // Started again on the still-full disk: it refuses, says why, and leaves the store be.
    let (status, log) = agent.start_refused();
    assert!(!status.success());
    assert!(log.contains("disk full"), "{log}");
    assert!(!data.join("quarantine").exists(), "{log}");

    // Room again: the store opens as it was, and the device's held messages all come in.
    std::fs::remove_file(&filler).unwrap();
    agent.restart();
    assert!(!data.join("quarantine").exists(), "{}", agent.log_text());
    assert_eq!(
        later.join().unwrap(),
        2000,
        "every held message acknowledged"
    );
    assert!(agent.stop().success());
    let outbox = agent.outbox();
    assert_eq!(outbox.len(), 2300);
    for (i, r) in outbox.iter().enumerate() {
        assert_eq!(r["edge_seq"].as_u64(), Some(i as u64 + 1));
    }
    let mut ids: Vec<String> = outbox
        .iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2300, "each message stored once");
}
