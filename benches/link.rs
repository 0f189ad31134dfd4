//! The data link's round trip against the floor this machine allows
//! (issue 14: the 3-copy random write QD1 target). One 4 KiB write at a
//! time, as fio's QD1 job sends them, in four shapes measured in the same
//! run and process, the order rotating from round to round:
//!
//! - `tcp`: a bare ping-pong over loopback TCP between two threads, 4 KiB
//!   out and 32 bytes back, blocking sockets with `TCP_NODELAY`: the least
//!   any remote copy can add.
//! - `tls`: the same over mutual TLS 1.3 with the link's own rustls
//!   configurations (the cluster CA), on blocking sockets.
//! - `link`: one `Write` to a copy served by [`link::serve`] on a real
//!   [`ReplicaStore`] (TLS on and, for `link-plain`, off), sent the way the
//!   engine driver sends a write from a FUSE worker once the link is
//!   connected: [`LinkClient::send_now`] on a plain thread, the answer
//!   coming back from the connection's reading thread.
//! - `link×2`: the 3-copy shape: that thread sends to two other copies,
//!   then writes its own copy in place (`ReplicaStore::call`), and the
//!   write is done when all three are.
//! - `link-task×2`: the same, each call made by [`LinkClient::calls`] on a
//!   task that thread spawns on a two-worker runtime (how the driver sends
//!   when the link is not yet connected, and how it sent every call before
//!   `send_now`).
//! - `link-server`: the copy's side alone: a blocking TLS client on this
//!   thread writes the link's call frames to that copy itself and reads
//!   each answer (`link` minus `link-server` is what the engine's side of
//!   the link costs).
//!
//! `store` (the copy's own work, `ReplicaStore::call` on the caller's
//! thread) is printed too. Each shape reports its median and p99 over the
//! calls of a round (the median of the rounds counts) and the median's
//! ratio to `tcp`'s and `tls`'s: what the link adds beyond the transport
//! is where it can still get faster; what the transport costs on two
//! cores shared by every process is not.
//!
//! Then the bulk path, as a sequential write streams it: 1 MiB writes
//! (a whole region each), [`BULK_IN_FLIGHT`] in flight, `--bulk-mib` MiB
//! a round after [`WARM_MIB`] unmeasured, in MiB/s (median of the rounds)
//! with the process's minor page faults per MiB written:
//!
//! - `tls-stream`: those bytes pushed one way over a rustls stream with
//!   the link's configurations to a thread reading them: the transport;
//! - `store-bulk`: the copy's own work, `ReplicaStore::call` on this
//!   thread;
//! - `link-bulk`: the writes sent to a copy over the link (TLS on), the
//!   next one as each answer comes back.
//!
//! ```text
//! cargo bench --bench link -- [--calls N] [--rounds N] [--bulk-mib N] [--dir DIR]
//! ```
//!
//! `--dir` holds the stores' pools (default: a scratch dir under /tmp).

#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use stowage::backend::replicated::protocol::{Io, Request, Tag};
use stowage::backend::replicated::record::{Member, ReplicaRecord};
use stowage::backend::replicated::store::ReplicaStore;
use stowage::backend::replicated::wire::Call;
use stowage::cluster::link::{self, LinkClient, ServeThreads};
use stowage::cluster::tls::{self, SERVER_NAME, TlsMaterial};
use stowage::volume::id::Uuid;

const SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;
const ANSWER: usize = 32;
const EPOCH: u64 = 3;
/// Bulk writes in flight, as fio's sequential jobs keep (QD8).
const BULK_IN_FLIGHT: usize = 8;
const REGION: usize = stowage::backend::replicated::REGION_BYTES as usize;
/// MiB each bulk shape writes unmeasured before its measured round.
const WARM_MIB: usize = 64;

fn arg(flag: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

fn num(flag: &str, default: usize) -> usize {
    arg(flag).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{flag}: not a number: {v}"))
    })
}

/// Median and p99 of a round, in microseconds.
fn quantiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Reads one 4 KiB "call" and answers 32 bytes, until the peer closes.
fn pong(mut s: impl Read + Write) {
    let mut buf = vec![0u8; BLOCK];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf[..ANSWER])
            .and_then(|()| s.flush())
            .is_err()
        {
            return;
        }
    }
}

/// `calls` round trips, each to every one of `peers` at once (all sent,
/// then all answers read).
fn ping<S: Read + Write>(peers: &mut [S], calls: usize) -> Vec<Duration> {
    let out = vec![7u8; BLOCK];
    let mut back = [0u8; ANSWER];
    (0..calls)
        .map(|_| {
            let t = Instant::now();
            for s in peers.iter_mut() {
                s.write_all(&out).expect("ping");
                s.flush().expect("ping");
            }
            for s in peers.iter_mut() {
                s.read_exact(&mut back).expect("pong");
            }
            t.elapsed()
        })
        .collect()
}

/// A bare TCP connection to a thread that answers every call.
fn tcp_pair() -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        pong(s);
    });
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

type TlsServer = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// The same over mutual TLS with the link's configurations.
fn tls_pair(server: &TlsMaterial, client: &TlsMaterial) -> TlsClient {
    tls_served(server, client, pong)
}

/// A TLS client of a connection a thread serves with `serve`, over
/// mutual TLS with the link's configurations.
fn tls_served(
    server: &TlsMaterial,
    client: &TlsMaterial,
    serve: impl FnOnce(TlsServer) + Send + 'static,
) -> TlsClient {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let config = server.link_server_config().expect("server config");
    std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let c = rustls::ServerConnection::new(config).expect("server");
        serve(rustls::StreamOwned::new(c, s));
    });
    tls_client(&addr.to_string(), client)
}

/// A blocking TLS client of `addr` with `client`'s certificate and the
/// link's client configuration. Over a link it speaks the link's frames
/// itself (their format is in `src/cluster/link.rs`): the copy's side of
/// the link alone.
fn tls_client(addr: &str, client: &TlsMaterial) -> TlsClient {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).expect("name");
    let c = rustls::ClientConnection::new(client.link_client_config().expect("client"), name)
        .expect("client");
    rustls::StreamOwned::new(c, s)
}

/// `calls` writes over a [`tls_client`] of a link, one at a time, each framed and
/// its answer read on this thread.
fn raw_round(s: &mut TlsClient, volume: Uuid, seq: &mut u64, calls: usize) -> Vec<Duration> {
    (0..calls)
        .map(|_| {
            *seq += 1;
            let call = write(*seq);
            let t = Instant::now();
            let json = serde_json::to_vec(&call.request).expect("request");
            let body = 8 + 32 + 12 + json.len() + call.data.len();
            let mut f = Vec::with_capacity(4 + body);
            f.extend_from_slice(&(body as u32).to_le_bytes());
            f.extend_from_slice(&seq.to_le_bytes());
            f.extend_from_slice(volume.to_hex().as_bytes());
            f.extend_from_slice(&call.offset.to_le_bytes());
            f.extend_from_slice(&call.len.to_le_bytes());
            f.extend_from_slice(&(json.len() as u32).to_le_bytes());
            f.extend_from_slice(&json);
            f.extend_from_slice(&call.data);
            s.write_all(&f).expect("call");
            s.flush().expect("call");
            let mut len = [0u8; 4];
            s.read_exact(&mut len).expect("answer");
            let mut answer = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut answer).expect("answer");
            let took = t.elapsed();
            let code = u32::from_le_bytes(answer[8..12].try_into().expect("4 bytes"));
            assert_eq!(code, 0, "the copy refused a write: {answer:?}");
            took
        })
        .collect()
}

/// Copies of one volume on nodes n2 and n3 of members n1..n3, each served
/// by the link; n1 (the engine's node) has its own store in the caller.
struct Copies {
    _dir: tempfile::TempDir,
    volume: Uuid,
    here: Arc<ReplicaStore>,
    addrs: Vec<String>,
    stop: tokio::sync::watch::Sender<bool>,
    ca: std::path::PathBuf,
    client_certs: std::path::PathBuf,
}

impl Copies {
    fn start(rt: &tokio::runtime::Runtime, under: Option<&str>) -> Copies {
        let dir = match under {
            Some(d) => tempfile::tempdir_in(d),
            None => tempfile::tempdir(),
        }
        .expect("scratch dir");
        let ca = dir.path().join("ca");
        tls::init(&ca).expect("CA");
        let client_certs = dir.path().join("n1");
        tls::issue_node(&ca, "n1", &client_certs).expect("n1 certificate");
        let volume = Uuid::new_random();
        let nodes = ["n1", "n2", "n3"];
        let boots: BTreeMap<String, u64> = nodes.iter().map(|n| ((*n).to_owned(), 1)).collect();
        let mut record = ReplicaRecord::new(
            volume,
            SIZE,
            nodes.iter().map(|n| Member::copy(n)).collect(),
            &boots,
        )
        .expect("record");
        record.epoch = EPOCH;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut stores = Vec::new();
        let mut addrs = Vec::new();
        for n in nodes {
            let pool = dir.path().join(format!("pool-{n}"));
            std::fs::create_dir(&pool).expect("pool");
            let store = Arc::new(ReplicaStore::open(&pool, n).expect("store"));
            store.create(&record).expect("copy");
            if n != "n1" {
                let server = TlsMaterial::load(&ca)
                    .expect("CA")
                    .link_server_config()
                    .expect("server config");
                let plain = Arc::clone(&store);
                for tls_on in [true, false] {
                    let listener = rt
                        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                        .expect("bind");
                    addrs.push(format!(
                        "{}{}",
                        if tls_on { "" } else { "plain:" },
                        listener.local_addr().expect("addr")
                    ));
                    rt.spawn(link::serve(
                        listener,
                        tls_on.then(|| Arc::clone(&server)),
                        Arc::clone(&plain),
                        rx.clone(),
                        ServeThreads::default(),
                    ));
                }
            }
            stores.push(store);
        }
        Copies {
            _dir: dir,
            volume,
            here: stores.swap_remove(0),
            addrs,
            stop,
            ca,
            client_certs,
        }
    }

    /// Clients of n2 and n3, over TLS or in plaintext.
    fn clients(&self, tls_on: bool) -> Vec<Arc<LinkClient>> {
        let config = TlsMaterial::load(&self.client_certs)
            .expect("n1 certificate")
            .link_client_config()
            .expect("client config");
        self.addrs
            .iter()
            .filter(|a| a.starts_with("plain:") != tls_on)
            .zip(["n2", "n3"])
            .map(|(a, n)| {
                Arc::new(LinkClient::new(
                    n,
                    a.trim_start_matches("plain:"),
                    tls_on.then(|| Arc::clone(&config)),
                    Duration::from_secs(5),
                ))
            })
            .collect()
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A write of 4 KiB to region `seq % regions` with a fresh tag.
fn write(seq: u64) -> Call {
    Call {
        offset: ((seq * 8192) % stowage::backend::replicated::REGION_BYTES) as u32,
        ..write_region(seq, &vec![(seq % 251) as u8; BLOCK].into())
    }
}

/// `calls` writes, one at a time, each sent to `remote` (from this thread
/// when `direct`, as the engine driver does from a FUSE worker once the
/// link is connected; else from a task it spawns) while this thread writes
/// `here` (when given); each waits for every copy.
fn link_round(
    rt: &tokio::runtime::Runtime,
    copies: &Copies,
    remote: &[Arc<LinkClient>],
    (here, direct): (bool, bool),
    seq: &mut u64,
    calls: usize,
) -> Vec<Duration> {
    (0..calls)
        .map(|_| {
            *seq += 1;
            let call = write(*seq);
            let t = Instant::now();
            let (tx, rx) = mpsc::channel();
            for c in remote {
                let (c, tx, call, volume) =
                    (Arc::clone(c), tx.clone(), call.clone(), copies.volume);
                if direct {
                    let done = Box::new(move |r| {
                        let _ = tx.send(r);
                    });
                    let sent = c.send_now(volume, std::slice::from_ref(&call), done);
                    assert!(sent.is_ok(), "no open connection to send on");
                    continue;
                }
                rt.spawn(async move {
                    let r = c.calls(volume, &[call]).await;
                    let _ = tx.send(r);
                });
            }
            if here {
                copies.here.call(copies.volume, call).expect("own copy");
            }
            for _ in remote {
                let r = rx.recv().expect("answer");
                assert!(r.iter().all(Result::is_ok), "a copy refused a write: {r:?}");
            }
            t.elapsed()
        })
        .collect()
}

/// This process's minor page faults so far (`/proc/self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    after_name
        .split(' ')
        .nth(7)
        .and_then(|f| f.parse().ok())
        .expect("minflt")
}

/// A bulk shape's round: MiB/s and minor faults per MiB of `f(mib)`,
/// after `f(WARM_MIB)` unmeasured (a connection quiet for a second lets
/// its spare buffers go: what a stream costs once it flows is measured).
fn bulk_measure(mib: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
    f(WARM_MIB);
    let faults = minor_faults();
    let t = Instant::now();
    f(mib);
    let took = t.elapsed().as_secs_f64();
    let faults = minor_faults() - faults;
    (mib as f64 / took, faults as f64 / mib as f64)
}

/// A write of `data` at the start of region `seq % regions` (all of it
/// for a region's worth) with a fresh tag.
fn write_region(seq: u64, data: &bytes::Bytes) -> Call {
    let regions = SIZE / stowage::backend::replicated::REGION_BYTES;
    Call {
        request: Request::Write {
            io: Io {
                epoch: EPOCH,
                boot: 1,
                conn: 1,
            },
            region: (seq % regions) as u32,
            tag: Tag { epoch: EPOCH, seq },
        },
        offset: 0,
        len: 0,
        data: data.clone().into(),
    }
}

/// A thread reading everything a rustls stream sends and answering one
/// byte per `REGION` bytes read, until the peer closes.
fn tls_sink(server: &TlsMaterial, client: &TlsMaterial) -> TlsClient {
    tls_served(server, client, |mut s| {
        let mut buf = vec![0u8; REGION];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&[1]).and_then(|()| s.flush()).is_err() {
                return;
            }
        }
    })
}

/// `mib` MiB pushed over `s` in `REGION` writes, [`BULK_IN_FLIGHT`] ahead
/// of their acknowledgements.
fn tls_bulk(s: &mut TlsClient, mib: usize) {
    let data = vec![5u8; REGION];
    let mut ack = [0u8; 1];
    for i in 0..mib {
        s.write_all(&data).expect("bulk");
        s.flush().expect("bulk");
        if i >= BULK_IN_FLIGHT {
            s.read_exact(&mut ack).expect("ack");
        }
    }
    for _ in 0..mib.min(BULK_IN_FLIGHT) {
        s.read_exact(&mut ack).expect("ack");
    }
}

/// `mib` whole-region writes to the copy behind `c`, [`BULK_IN_FLIGHT`]
/// at a time, each answer sending the next.
fn link_bulk(c: &LinkClient, volume: Uuid, seq: &mut u64, data: &bytes::Bytes, mib: usize) {
    let (tx, rx) = mpsc::channel();
    let send = |seq: &mut u64| {
        *seq += 1;
        let tx = tx.clone();
        let done = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let sent = c.send_now(volume, &[write_region(*seq, data)], done);
        assert!(sent.is_ok(), "no open connection to send on");
    };
    for _ in 0..mib.min(BULK_IN_FLIGHT) {
        send(seq);
    }
    for i in 0..mib {
        let r = rx.recv().expect("answer");
        assert!(r.iter().all(Result::is_ok), "a copy refused a write: {r:?}");
        if i + BULK_IN_FLIGHT < mib {
            send(seq);
        }
    }
}

type Shape = &'static str;

/// `measure` of every shape in each of `rounds` rounds, the order
/// rotating from round to round: each shape's figures, a round each.
fn interleaved<T>(
    shapes: &[Shape],
    rounds: usize,
    mut measure: impl FnMut(Shape) -> T,
) -> BTreeMap<Shape, Vec<T>> {
    let mut results: BTreeMap<Shape, Vec<T>> = BTreeMap::new();
    for round in 0..rounds {
        for i in 0..shapes.len() {
            let s = shapes[(i + round) % shapes.len()];
            let m = measure(s);
            results.entry(s).or_default().push(m);
        }
    }
    results
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let calls = num("--calls", 20_000).max(100);
    let rounds = num("--rounds", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let copies = Copies::start(&rt, arg("--dir").as_deref());
    let server = TlsMaterial::load(&copies.ca).expect("CA");
    let client = TlsMaterial::load(&copies.client_certs).expect("n1");
    let mut tcp = [tcp_pair()];
    let mut tls = [tls_pair(&server, &client), tls_pair(&server, &client)];
    let mut raw = tls_client(&copies.addrs[0], &client);
    let tls_clients = copies.clients(true);
    let plain_clients = copies.clients(false);
    let mut seq = 0u64;

    const SHAPES: [Shape; 9] = [
        "tcp",
        "tls",
        "tls×2",
        "store",
        "link-server",
        "link",
        "link-plain",
        "link×2",
        "link-task×2",
    ];
    let mut run = |shape: Shape, n: usize, seq: &mut u64| -> Vec<Duration> {
        match shape {
            "tcp" => ping(&mut tcp, n),
            "tls" => ping(&mut tls[..1], n),
            "tls×2" => ping(&mut tls, n),
            "store" => (0..n)
                .map(|_| {
                    *seq += 1;
                    let call = write(*seq);
                    let t = Instant::now();
                    copies.here.call(copies.volume, call).expect("own copy");
                    t.elapsed()
                })
                .collect(),
            "link-server" => raw_round(&mut raw, copies.volume, seq, n),
            "link" => link_round(&rt, &copies, &tls_clients[..1], (false, true), seq, n),
            "link-plain" => link_round(&rt, &copies, &plain_clients[..1], (false, true), seq, n),
            "link×2" => link_round(&rt, &copies, &tls_clients, (true, true), seq, n),
            "link-task×2" => link_round(&rt, &copies, &tls_clients, (true, false), seq, n),
            _ => unreachable!("listed above"),
        }
    };
    // Connections made (sending at once needs an open one), pages
    // touched, threads started.
    for c in tls_clients.iter().chain(&plain_clients) {
        seq += 1;
        let r = rt.block_on(c.calls(copies.volume, &[write(seq)]));
        assert!(r.iter().all(Result::is_ok), "a copy refused a write: {r:?}");
    }
    for s in SHAPES {
        run(s, 500, &mut seq);
    }
    let results = interleaved(&SHAPES, rounds, |s| quantiles(run(s, calls, &mut seq)));
    let p50 = |s: Shape| median(results[s].iter().map(|q| q.0).collect());
    let p99 = |s: Shape| median(results[s].iter().map(|q| q.1).collect());
    println!(
        "data link round trip, one 4 KiB write at a time: {calls} calls × {rounds} rounds, median of the rounds"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9}",
        "shape", "p50 µs", "p99 µs", "÷ tcp", "÷ tls"
    );
    for s in SHAPES {
        println!(
            "{:<12} {:>9.1} {:>9.1} {:>9.2} {:>9.2}",
            s,
            p50(s),
            p99(s),
            p50(s) / p50("tcp"),
            p50(s) / p50("tls")
        );
    }
    println!(
        "link adds {:.1} µs at the median over a bare TLS round trip plus the copy's own work ({:.1} µs)",
        p50("link") - p50("tls") - p50("store"),
        p50("store")
    );

    let mib = num("--bulk-mib", 2048).max(BULK_IN_FLIGHT);
    let data = bytes::Bytes::from(vec![9u8; REGION]);
    let mut sink = tls_sink(&server, &client);
    const BULK: [Shape; 3] = ["tls-stream", "store-bulk", "link-bulk"];
    let mut bulk = |shape: Shape, n: usize, seq: &mut u64| match shape {
        "tls-stream" => bulk_measure(n, |n| tls_bulk(&mut sink, n)),
        "store-bulk" => bulk_measure(n, |n| {
            for _ in 0..n {
                *seq += 1;
                let call = write_region(*seq, &data);
                copies.here.call(copies.volume, call).expect("own copy");
            }
        }),
        "link-bulk" => bulk_measure(n, |n| {
            link_bulk(&tls_clients[0], copies.volume, seq, &data, n);
        }),
        _ => unreachable!("listed above"),
    };
    let measured = interleaved(&BULK, rounds, |s| bulk(s, mib, &mut seq));
    let rate = |s: Shape| median(measured[s].iter().map(|m| m.0).collect());
    let faults = |s: Shape| median(measured[s].iter().map(|m| m.1).collect());
    println!(
        "bulk: {mib} MiB a round in 1 MiB writes after {WARM_MIB} MiB unmeasured, {BULK_IN_FLIGHT} in flight, {rounds} rounds, median of the rounds"
    );
    println!(
        "{:<12} {:>9} {:>12} {:>13}",
        "shape", "MiB/s", "÷ tls-stream", "faults / MiB"
    );
    for s in BULK {
        println!(
            "{:<12} {:>9.0} {:>12.2} {:>13.2}",
            s,
            rate(s),
            rate(s) / rate("tls-stream"),
            faults(s)
        );
    }
}
