//! The test harness's fault-injecting TCP relay (`common::forward`), which
//! the multi-node fault tests put between nodes: it must carry bytes
//! intact and in order whatever it delays or stalls, hold everything while
//! told to and let it through afterwards, and cut and refuse connections.
//! On loopback, against an echo server of the test's own.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::forward::{FaultConfig, Forward};

/// An echo server on 127.0.0.1 (one thread per connection; they end when
/// their client closes).
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn proxy(seed: u64) -> Forward {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    Forward::with_seed(l, echo_server(), seed).unwrap()
}

fn connect(f: &Forward) -> TcpStream {
    let s = TcpStream::connect_timeout(&f.local, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends `data` in chunks and reads the echo back (a writer thread, so
/// neither side's buffers fill up).
fn round_trip(s: &TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let out = data.to_vec();
    let writer = std::thread::spawn(move || {
        for chunk in out.chunks(1000) {
            w.write_all(chunk).unwrap();
        }
    });
    let mut back = vec![0u8; data.len()];
    (&*s).read_exact(&mut back).unwrap();
    writer.join().unwrap();
    back
}

#[test]
fn stalled_and_delayed_bytes_arrive_intact_and_in_order() {
    let f = proxy(7);
    f.faults.set(FaultConfig {
        delay: Duration::from_micros(200),
        stall_share: 0.3,
        stall: Duration::from_millis(2),
        ..Default::default()
    });
    let s = connect(&f);
    let data = common::pattern(3, 300_000);
    assert!(round_trip(&s, &data) == data, "the echo differs");
    let (passed, stalled) = f.faults.counts();
    assert!(passed > 0, "nothing went through the fault path");
    assert!(
        stalled > 0 && stalled < passed,
        "a share of 0.3 stalled {stalled} of {passed} chunks"
    );
}

#[test]
fn held_bytes_wait_then_arrive_in_order() {
    let f = proxy(1);
    let s = connect(&f);
    assert_eq!(round_trip(&s, b"before"), b"before");
    f.faults.set(FaultConfig {
        hold: true,
        ..Default::default()
    });
    (&s).write_all(b"held").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4];
    match (&s).read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a held relay let something through: {other:?}"),
    }
    f.faults.set(FaultConfig::default());
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (&s).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"held");
    assert_eq!(round_trip(&s, b"after"), b"after");
}

#[test]
fn cut_closes_connections_and_refuse_turns_new_ones_away() {
    let f = proxy(2);
    let s = connect(&f);
    assert_eq!(round_trip(&s, b"x"), b"x");
    f.cut();
    let mut buf = [0u8; 1];
    match (&s).read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("a cut connection still read {n} bytes"),
    }
    f.faults.set(FaultConfig {
        refuse: true,
        ..Default::default()
    });
    let s = connect(&f);
    let _ = (&s).write_all(b"y");
    match (&s).read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("a refused connection read {n} bytes"),
    }
    let _ = s.shutdown(Shutdown::Both);
    f.faults.set(FaultConfig::default());
    let s = connect(&f);
    assert_eq!(round_trip(&s, b"z"), b"z", "healed");
}
