//! A loopback TCP proxy a test can cut and restore: a network outage between a client and a
//! server that both keep running (the AWS emulator keeps its state in memory, so stopping it
//! would lose the buckets and tables; cutting the link is what an outage looks like to the
//! client anyway). While cut, every open connection is shut down and new ones are closed as
//! soon as they are accepted; the listening port stays bound, so no other test can take it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct TcpProxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    closing: AtomicBool,
    /// Both ends of every proxied connection, to shut them down on `cut`.
    conns: Mutex<Vec<TcpStream>>,
}

impl TcpProxy {
    /// Forwards a free loopback port to `127.0.0.1:target`.
    pub fn start(target: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let accept = std::thread::spawn({
            let shared = shared.clone();
            move || {
                for client in listener.incoming() {
                    if shared.closing.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    // Under the lock `cut` takes: a connection is either refused or registered
                    // (and then torn down by `cut`), never let through an outage.
                    let mut conns = shared.conns.lock().unwrap();
                    if shared.cut.load(Ordering::SeqCst) {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    conns.retain(|s| s.peer_addr().is_ok());
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                    drop(conns);
                    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                    pipe(server, client);
                }
            }
        });
        TcpProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The outage: open connections are torn down, new ones closed at once.
    pub fn cut(&self) {
        let mut conns = self.shared.conns.lock().unwrap();
        self.shared.cut.store(true, Ordering::SeqCst);
        for s in conns.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The link is back.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` → `to` on its own thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `closing`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
