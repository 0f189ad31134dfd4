//! A TCP forwarder for tests, and the fault injector of multi-node tests
//! (these kernels have no `netem`): it accepts on a listener (which may live
//! in a test network namespace) and relays each connection to one address,
//! byte for byte in both directions, through [`Faults`] that can delay
//! every chunk, stall a share of chunks (a lost packet's retransmission, as
//! the endpoints see it), hold everything (a blackhole that heals), or cut
//! every connection and refuse new ones. Stops accepting and closes every
//! relayed connection on drop; its threads end by themselves. It may dial
//! from a network namespace of its own choosing ([`Forward::start_in`]), so
//! it can stand in front of a process in a test host's namespace.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the relay does to the bytes it carries now.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Every chunk waits this long before it is passed on.
    pub delay: Duration,
    /// This share (0.0–1.0) of chunks also waits `stall` (a dropped packet
    /// and its retransmission, as TCP's ends see it).
    pub stall_share: f64,
    pub stall: Duration,
    /// While set, nothing is passed on (data waits, in order); clearing it
    /// lets everything through again.
    pub hold: bool,
    /// While set, new connections are refused (closed at once).
    pub refuse: bool,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            delay: Duration::ZERO,
            stall_share: 0.0,
            stall: Duration::ZERO,
            hold: false,
            refuse: false,
        }
    }
}

/// Shared, changeable faults of one forwarder; a seeded generator decides
/// which chunks stall, so a run can be repeated.
#[derive(Debug)]
pub struct Faults {
    config: Mutex<FaultConfig>,
    rng: Mutex<u64>,
    /// Chunks passed on, and of them stalled (for a test's report).
    counts: Mutex<(u64, u64)>,
}

/// Longest single sleep while holding: a changed config is seen this soon.
const HOLD_POLL: Duration = Duration::from_millis(5);

impl Faults {
    fn new(seed: u64) -> Self {
        Faults {
            config: Mutex::new(FaultConfig::default()),
            rng: Mutex::new(seed | 1),
            counts: Mutex::new((0, 0)),
        }
    }

    pub fn set(&self, c: FaultConfig) {
        *lock(&self.config) = c;
    }

    pub fn get(&self) -> FaultConfig {
        lock(&self.config).clone()
    }

    /// (chunks passed on, of them stalled).
    pub fn counts(&self) -> (u64, u64) {
        *lock(&self.counts)
    }

    /// xorshift64*: uniform in [0, 1).
    fn draw(&self) -> f64 {
        let mut x = lock(&self.rng);
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Waits as the faults say before a chunk goes on; false once `stop`
    /// is set (the chunk is dropped with its connection).
    fn pass(&self, stop: &AtomicBool) -> bool {
        let c = self.get();
        let stalled = c.stall_share > 0.0 && self.draw() < c.stall_share;
        let mut wait = c.delay;
        if stalled {
            wait += c.stall;
        }
        let until = Instant::now() + wait;
        loop {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            let held = self.get().hold;
            if !held && now >= until {
                break;
            }
            let left = if held { HOLD_POLL } else { until - now };
            std::thread::sleep(left.min(HOLD_POLL));
        }
        let mut n = lock(&self.counts);
        n.0 += 1;
        n.1 += u64::from(stalled);
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Forward {
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
    pub local: SocketAddr,
    pub faults: Arc<Faults>,
    /// Connections relayed so far, per route (in the order given).
    pub accepted: Arc<Vec<AtomicU64>>,
    /// Bytes relayed so far (both ways), per route.
    pub bytes: Arc<Vec<AtomicU64>>,
}

impl Forward {
    /// Relays every connection `listener` accepts to `to`, with no faults
    /// until [`Forward::faults`] sets some.
    pub fn start(listener: TcpListener, to: SocketAddr) -> io::Result<Forward> {
        Self::with_seed(listener, to, 0x5eed)
    }

    /// [`Forward::start`] with the seed that decides which chunks stall.
    pub fn with_seed(listener: TcpListener, to: SocketAddr, seed: u64) -> io::Result<Forward> {
        Self::spawn(vec![(listener, to)], seed, None)
    }

    /// [`Forward::start`], dialling `to` from the network namespace at
    /// `netns` (e.g. `/run/netns/NAME`): its accepting thread enters that
    /// namespace (only that thread and the relays it starts).
    pub fn start_in(listener: TcpListener, to: SocketAddr, netns: &Path) -> io::Result<Forward> {
        Self::spawn(vec![(listener, to)], 0x5eed, Some(File::open(netns)?))
    }

    /// [`Forward::start_in`] for several listeners, each relayed to its own
    /// address, all through the same [`Forward::faults`] (e.g. a node's
    /// agent port and its data link). `local` is the first listener's.
    pub fn start_many_in(
        routes: Vec<(TcpListener, SocketAddr)>,
        netns: &Path,
    ) -> io::Result<Forward> {
        Self::spawn(routes, 0x5eed, Some(File::open(netns)?))
    }

    fn spawn(
        routes: Vec<(TcpListener, SocketAddr)>,
        seed: u64,
        netns: Option<File>,
    ) -> io::Result<Forward> {
        for (l, _) in &routes {
            l.set_nonblocking(true)?;
        }
        let local = routes
            .first()
            .ok_or_else(|| io::Error::other("no route to forward"))?
            .0
            .local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let faults = Arc::new(Faults::new(seed));
        let accepted: Arc<Vec<AtomicU64>> =
            Arc::new(routes.iter().map(|_| AtomicU64::new(0)).collect());
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&open), Arc::clone(&faults));
        let counts = Arc::clone(&accepted);
        let bytes: Arc<Vec<AtomicU64>> =
            Arc::new(routes.iter().map(|_| AtomicU64::new(0)).collect());
        let relayed = Arc::clone(&bytes);
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let accept = std::thread::spawn(move || {
            if let Some(ns) = netns {
                // SAFETY: setns(2) on a valid open descriptor; it changes
                // only this thread's network namespace (and that of the
                // relay threads it starts), which dial and relay nothing
                // but this forwarder's connections.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let failed = entered.is_err();
                let _ = entered_tx.send(entered);
                if failed {
                    return;
                }
            } else {
                let _ = entered_tx.send(Ok(()));
            }
            while !s.load(Ordering::Relaxed) {
                let next = routes
                    .iter()
                    .enumerate()
                    .find_map(|(i, (l, to))| match l.accept() {
                        Ok((c, _)) => Some((c, *to, i)),
                        Err(_) => None,
                    });
                let Some((client, to, route)) = next else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if f.get().refuse {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                    continue;
                };
                counts[route].fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                {
                    let mut open = lock(&o);
                    open.retain(|st| st.peer_addr().is_ok());
                    for st in [&client, &server] {
                        if let Ok(c) = st.try_clone() {
                            open.push(c);
                        }
                    }
                }
                let count = |route| (Arc::clone(&relayed), route);
                relay(client, s2, Arc::clone(&f), Arc::clone(&s), count(route));
                relay(server, c2, Arc::clone(&f), Arc::clone(&s), count(route));
            }
        });
        entered_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the accepting thread died")))?;
        Ok(Forward {
            stop,
            open,
            accept: Some(accept),
            local,
            faults,
            accepted,
            bytes,
        })
    }

    /// Closes every relayed connection now (both ways); new ones are
    /// accepted unless [`FaultConfig::refuse`] is set.
    pub fn cut(&self) {
        for s in lock(&self.open).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` through `faults` on a thread of its own until
/// either side ends or the forwarder stops.
/// Relays `from` to `to` until either ends, adding what it relayed to
/// `count` (bytes per route, and this relay's route).
fn relay(
    mut from: TcpStream,
    mut to: TcpStream,
    faults: Arc<Faults>,
    stop: Arc<AtomicBool>,
    count: (Arc<Vec<AtomicU64>>, usize),
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !faults.pass(&stop) || to.write_all(&buf[..n]).is_err() {
                break;
            }
            count.0[count.1].fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.cut();
    }
}
