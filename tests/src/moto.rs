//! A private moto server (the AWS emulator `tests/aws-emulator.sh` installs) on a free port, for
//! a test that must not disturb the shared one at `AWS_ENDPOINT_URL`.
//!
//! It runs `tests/aws-emulator-serve.py` (moto's server, DynamoDB serialized) on port 0, and
//! the script says which port it got, so no other process can take the port first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Moto {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Moto {
    /// Starts moto from `$AWS_EMULATOR_VENV` (default
    /// `~/.cache/edge-pipeline/venv-aws`) and waits until it answers; None, after saying
    /// SKIPPED, when it is not installed.
    pub fn start(dir: &Path) -> Option<Moto> {
        let venv = std::env::var_os("AWS_EMULATOR_VENV")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".cache/edge-pipeline/venv-aws"))
            })?;
        let bin = venv.join("bin/moto_server");
        let python = venv.join("bin/python");
        if !bin.exists() || !python.exists() {
            eprintln!(
                "SKIPPED: no moto in {} (tests/aws-emulator.sh installs it)",
                venv.display()
            );
            println!("SKIPPED: no moto in {}", venv.display());
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("aws-emulator-serve.py");
        let log = tempfile::Builder::new()
            .prefix("moto-")
            .suffix(".log")
            .tempfile_in(dir)
            .unwrap()
            .into_temp_path()
            .keep()
            .unwrap();
        let mut child = Command::new(python)
            .arg(script)
            .args(["127.0.0.1", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start moto");
        // Its first line on stdout, once it listens: "aws-emulator listening on http://H:PORT".
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            // Nothing else comes; read to the end so the pipe stays open while it runs.
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
        let port = line
            .as_deref()
            .and_then(|l| l.strip_prefix("aws-emulator listening on http://127.0.0.1:"))
            .and_then(|p| p.trim().parse::<u16>().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "moto did not say where it listens ({line:?}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let mut moto = Moto { child, port, log };
        crate::wait_for("moto to answer", Duration::from_secs(60), || {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!(
                    "moto exited ({status}):\n{}",
                    std::fs::read_to_string(&moto.log).unwrap_or_default()
                );
            }
            answers(port)
        });
        Some(moto)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = "GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
