//! A private moto server (the AWS emulator `tests/aws-emulator.sh` installs) on a free port, for
//! a test that must not disturb the shared one at `AWS_ENDPOINT_URL`.

use std::io::{Read, Write};
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
    /// Starts `moto_server` from `$AWS_EMULATOR_VENV` (default
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
        if !bin.exists() {
            eprintln!(
                "SKIPPED: no moto in {} (tests/aws-emulator.sh installs it)",
                venv.display()
            );
            println!("SKIPPED: no moto in {}", venv.display());
            return None;
        }
        let port = crate::free_port();
        let log = dir.join(format!("moto-{port}.log"));
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start moto_server");
        let mut moto = Moto { child, port, log };
        crate::wait_for("moto to answer", Duration::from_secs(60), || {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!(
                    "moto_server exited ({status}):\n{}",
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
