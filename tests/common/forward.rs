//! A TCP forwarder for tests: accepts on a listener (which may live in a
//! test network namespace) and relays each connection to one address
//! (e.g. a server on the test's loopback), byte for byte in both
//! directions. Stops accepting and closes every relayed connection on
//! drop; its threads end by themselves.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Forward {
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
    pub local: SocketAddr,
}

impl Forward {
    /// Relays every connection `listener` accepts to `to`.
    pub fn start(listener: TcpListener, to: SocketAddr) -> io::Result<Forward> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, o) = (Arc::clone(&stop), Arc::clone(&open));
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                {
                    let mut open = o.lock().unwrap_or_else(|e| e.into_inner());
                    open.retain(|st| st.peer_addr().is_ok());
                    for st in [&client, &server] {
                        if let Ok(c) = st.try_clone() {
                            open.push(c);
                        }
                    }
                }
                relay(client, s2);
                relay(server, c2);
            }
        });
        Ok(Forward {
            stop,
            open,
            accept: Some(accept),
            local,
        })
    }
}

/// Copies `from` to `to` on a thread of its own until either side ends.
fn relay(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
