//! `mosquitto_pub` (Debian's mosquitto-clients) as a device: a real, independent MQTT client
//! for the embedded endpoint's auth and TLS tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// How a test client connects.
#[derive(Default, Clone, Copy)]
pub struct Client<'a> {
    /// TLS, trusting this CA for the endpoint's certificate.
    pub ca: Option<&'a Path>,
    /// A client certificate and its key.
    pub cert: Option<(&'a Path, &'a Path)>,
    pub login: Option<(&'a str, &'a str)>,
}

/// `mosquitto_pub` one QoS 1 message; whether the endpoint took it (PUBACK).
pub fn publish(port: u16, c: Client<'_>, topic: &str, payload: &[u8]) -> bool {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", topic, "-q", "1", "-s", "-i", "e2e-device"]);
    if let Some(ca) = c.ca {
        cmd.arg("--cafile").arg(ca);
    }
    if let Some((cert, key)) = c.cert {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if let Some((user, password)) = c.login {
        cmd.args(["-u", user, "-P", password]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
    child.stdin.take().unwrap().write_all(payload).unwrap();
    child.wait().unwrap().success()
}
