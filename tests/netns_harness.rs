//! The multi-node network harness (`common::netns`) tested on its own, with
//! ordinary programs (bash, mount, sleep) standing in for node agents:
//! hosts reach each other over the bridge and nothing else, a spawned
//! process lives in its host's network namespace but the test's mount
//! namespace, partitions cut TCP and healing restores it, processes stop,
//! restart and log as promised, and nothing outlives a test, even one that
//! panics.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use common::KillOnDrop;
use common::netns::{self, AGENT_PORT, EchoServer, Net};

/// Tests that count namespaces take this exclusively; the others share it,
/// so a count is never disturbed by a network another test is building.
static NAMESPACE_COUNT: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    NAMESPACE_COUNT.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    NAMESPACE_COUNT.write().unwrap_or_else(|p| p.into_inner())
}

/// A bound for steps that take milliseconds (never a timing assertion).
const LIMIT: Duration = Duration::from_secs(10);
/// How long a connection attempt across a partition is given to fail.
const CUT: Duration = Duration::from_secs(1);

/// Interface names in the root namespace (read only).
fn root_links() -> BTreeSet<String> {
    let out = netns::ip(&["-o", "link", "show"]).unwrap();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// True once `pid` is gone or a zombie (a reparented grandchild is reaped
/// by init, which may be slow or absent in a container).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The number after `key ` on the last log line that starts with it.
fn logged_number(log: &str, key: &str) -> u32 {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` line in log:\n{log}"))
}

fn bash(script: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c").arg(script);
    c
}

#[test]
fn namespace_names_follow_the_scheme_and_nothing_else_parses() {
    assert_eq!(netns::parse_ns_name("swn1a2b.03b"), Some(0x1a2b));
    assert_eq!(netns::parse_ns_name("swn3fffff.ffhfe"), Some(0x3fffff));
    for not_ours in [
        "swn1a2b.03bx",
        "swn1a2b.3b",
        "swn1a2b.03h1",
        "swn1a2b.03x00",
        "swn01a2b.03b",
        "swn.03b",
        "swn1A2B.03b",
        "swn1234567.03b",
        "xswn1a2b.03b",
        "swn1a2b03b",
        "cni-1234",
        "swn1a2b.03h0g",
    ] {
        assert_eq!(netns::parse_ns_name(not_ours), None, "{not_ours}");
    }
}

/// Every host reaches every other host over the bridge, from its own
/// address; names are short, carry our pid, and addresses are in
/// 198.18.0.0/15 on the Net's own /24.
#[test]
fn hosts_reach_each_other_over_the_bridge() {
    let _g = shared();
    let net = Net::new(3);
    let me = std::process::id();
    let subnet = net.subnet();
    for h in net.hosts() {
        assert!(h.name().len() <= 15, "{}", h.name());
        assert_eq!(netns::parse_ns_name(h.name()), Some(me));
        let o = h.ip().octets();
        assert_eq!((o[0], o[1] & 0xfe), (198, 18), "{}", h.ip());
        assert_eq!(format!("{}.{}.{}.0/24", o[0], o[1], o[2]), subnet);
    }
    assert_eq!(
        netns::parse_ns_name(net.bridge_namespace()),
        Some(me),
        "{}",
        net.bridge_namespace()
    );
    let ips: BTreeSet<Ipv4Addr> = net.hosts().iter().map(|h| h.ip()).collect();
    assert_eq!(ips.len(), 3);

    let servers: Vec<EchoServer> = net
        .hosts()
        .iter()
        .map(|h| EchoServer::start(h, AGENT_PORT))
        .collect();
    for from in net.hosts() {
        for (to, server) in net.hosts().iter().zip(&servers) {
            if from.name() == to.name() {
                continue;
            }
            let msg = format!("{} to {}", from.ip(), to.ip());
            let back = from
                .roundtrip(to.agent_addr(), msg.as_bytes(), LIMIT)
                .unwrap_or_else(|e| panic!("{msg}: {e}"));
            assert_eq!(back, msg.as_bytes());
            assert!(
                server.peers().iter().any(|p| p.ip() == from.ip()),
                "{} saw no connection from {}: {:?}",
                to.ip(),
                from.ip(),
                server.peers()
            );
        }
    }
}

/// A spawned process shares the test's mount namespace (its mount is
/// visible to the test) and has its host's network namespace: the same
/// namespace inode, and it reaches another host from its host's address,
/// an address that does not exist in the root namespace.
#[test]
fn a_spawned_process_has_the_hosts_network_and_the_tests_mounts() {
    let _g = shared();
    let scratch = common::Scratch::new("netns-mount");
    let net = Net::new(2);
    let (a, b) = (net.host(0), net.host(1));

    // The mount is made by a process inside host a's network namespace.
    let target = scratch.root.join("mnt");
    std::fs::create_dir(&target).unwrap();
    let mut mount = Command::new("mount");
    mount
        .args(["-t", "tmpfs", "-o", "size=1m", "netns-test"])
        .arg(&target);
    let m = a.spawn(&mut mount);
    let status = m.wait_exit(LIMIT).expect("mount exits");
    assert!(status.success(), "mount: {status}: {}", m.log_tail(10));
    assert!(common::is_mounted(&target), "mount invisible to the test");

    // Namespace identity, read from /proc.
    let sleeper = a.spawn(Command::new("sleep").arg("300"));
    let ns_of =
        |what: &str| std::fs::metadata(format!("/proc/{}/ns/{what}", sleeper.pid())).unwrap();
    let host_ns = std::fs::metadata(a.netns_path()).unwrap();
    assert_eq!(
        (ns_of("net").dev(), ns_of("net").ino()),
        (host_ns.dev(), host_ns.ino()),
        "the process is not in {}'s network namespace",
        a.name()
    );
    let own_mnt = std::fs::metadata("/proc/self/ns/mnt").unwrap();
    assert_eq!(ns_of("mnt").ino(), own_mnt.ino(), "mount namespace differs");
    let own_net = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_ne!(own_net.ino(), host_ns.ino());

    // Its traffic: a's address, over the bridge to b.
    let server = EchoServer::start(b, AGENT_PORT);
    let to = b.agent_addr();
    let client = a.spawn(&mut bash(&format!(
        "exec 3<>/dev/tcp/{}/{}; printf from-proc >&3; head -c 9 <&3; echo",
        to.ip(),
        to.port()
    )));
    let status = client.wait_exit(LIMIT).expect("client exits");
    assert!(status.success(), "{status}: {}", client.log_tail(10));
    assert_eq!(client.log_tail(1), "from-proc");
    assert_eq!(
        server.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
        vec![a.ip()]
    );

    // The root namespace does not hold the hosts' addresses (checked
    // without sending a packet anywhere); a's namespace does.
    let err = std::net::TcpListener::bind(SocketAddr::from((a.ip(), 0))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable, "{err}");
    a.listen(0).expect("bind a's address inside a");
}

/// A partition (link down at the bridge) makes new connections fail and
/// stalls an established one; healing makes both work again.
#[test]
fn partition_breaks_tcp_and_heal_restores_it() {
    let _g = shared();
    let net = Net::new(2);
    let (a, b) = (net.host(0), net.host(1));
    let _server = EchoServer::start(b, AGENT_PORT);
    let to = b.agent_addr();
    assert_eq!(a.roundtrip(to, b"before", LIMIT).unwrap(), b"before");
    let mut open = a.connect(to, LIMIT).unwrap();

    net.partition(b);
    net.partition(b); // idempotent
    assert!(!net.is_connected(b));
    assert!(net.is_connected(a));
    let cut = a.roundtrip(to, b"during", CUT);
    assert!(cut.is_err(), "reached b across a partition: {cut:?}");
    use std::io::{Read, Write};
    open.set_read_timeout(Some(CUT)).unwrap();
    open.write_all(b"stalled").unwrap();
    let mut buf = [0u8; 7];
    let stalled = open.read(&mut buf);
    assert!(stalled.is_err(), "echo across a partition: {stalled:?}");

    net.heal(b);
    assert!(net.is_connected(b));
    // The stalled segment is retransmitted once the link is back.
    open.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || open
            .read_exact(&mut buf)
            .is_ok()),
        "the established connection did not recover"
    );
    assert_eq!(&buf, b"stalled");
    assert!(
        eventually(LIMIT, || a.roundtrip(to, b"after", CUT).is_ok()),
        "no new connection after heal"
    );

    // A partition of the client side cuts it too.
    net.partition(a);
    assert!(a.roundtrip(to, b"cut-a", CUT).is_err());
    net.heal(a);
    assert!(eventually(LIMIT, || a
        .roundtrip(to, b"a-back", CUT)
        .is_ok()));
}

/// terminate sends SIGTERM first (the trap runs and chooses the exit
/// code), restart runs the same command again appending to the same log,
/// kill9 kills the process and the helper it started, and a process that
/// ignores SIGTERM is SIGKILLed after the grace period.
#[test]
fn a_process_terminates_restarts_and_is_killed_with_its_helpers() {
    let _g = shared();
    let net = Net::new(1);
    let h = net.host(0);
    let script = "echo started $$; sleep 300 & echo helper $!; \
                  trap 'echo got-term; kill $!; exit 7' TERM; wait";
    let p = h.spawn(&mut bash(script));
    assert!(p.wait_log("helper", LIMIT), "{}", p.log_text());
    assert!(p.is_running());
    let first = p.pid();
    assert_eq!(logged_number(&p.log_text(), "started"), first);

    let st = p.terminate().expect("reaped");
    assert_eq!(st.code(), Some(7), "{st}");
    assert!(!p.is_running());
    assert!(p.log_text().contains("got-term"));

    p.restart();
    assert!(p.is_running());
    assert_ne!(p.pid(), first);
    assert!(
        eventually(LIMIT, || p.log_text().matches("helper").count() == 2),
        "{}",
        p.log_text()
    );
    assert_eq!(p.log_text().matches("started").count(), 2);
    let helper = logged_number(&p.log_text(), "helper");
    assert!(!dead(helper));

    let st = p.kill9().expect("reaped");
    assert_eq!(st.signal(), Some(9), "{st}");
    assert!(!p.is_running());
    assert_eq!(p.exit_status().and_then(|s| s.signal()), Some(9));
    assert!(
        eventually(LIMIT, || dead(helper)),
        "helper {helper} outlived kill9"
    );
    assert!(
        !p.log_text().contains("got-term\ngot-term"),
        "kill9 ran the TERM trap"
    );

    let stubborn = h.spawn(&mut bash(
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    ));
    assert!(stubborn.wait_log("ready", LIMIT));
    let st = stubborn
        .terminate_within(Duration::from_millis(300))
        .expect("reaped");
    assert_eq!(st.signal(), Some(9), "{st}");
}

#[test]
fn log_captures_stdout_and_stderr_and_tails() {
    let _g = shared();
    let net = Net::new(1);
    let p = net.host(0).spawn(
        bash("for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2; exit 3")
            .env("UNUSED_BY_TEST", "1"),
    );
    let st = p.wait_exit(LIMIT).expect("exits");
    assert_eq!(st.code(), Some(3));
    assert_eq!(p.log_tail(2), "line5\noops");
    assert_eq!(p.log_tail(100).lines().count(), 6);
    assert!(p.log_path().starts_with(net.log_dir()));
    // Restarting appends.
    p.restart();
    assert_eq!(p.wait_exit(LIMIT).and_then(|s| s.code()), Some(3));
    assert_eq!(p.log_text().matches("line1").count(), 2);
}

/// Sockets made in a host serve async code on the test's own runtime:
/// the echo answers, and a partition cuts an async connect too.
#[test]
fn async_connections_from_a_host_work_on_the_tests_runtime() {
    let _g = shared();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async_connections());
}

async fn async_connections() {
    let net = Net::new(2);
    let (a, b) = (net.host(0), net.host(1));
    let server = EchoServer::start(b, AGENT_PORT);
    let s = a.tokio_connect(b.agent_addr(), LIMIT).await.unwrap();
    assert_eq!(s.local_addr().unwrap().ip(), a.ip());
    let mut sent = &b"tokio"[..];
    while !sent.is_empty() {
        s.writable().await.unwrap();
        if let Ok(n) = s.try_write(sent) {
            sent = &sent[n..];
        }
    }
    let mut back = Vec::new();
    while back.len() < 5 {
        s.readable().await.unwrap();
        let mut buf = [0u8; 16];
        match s.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(back, b"tokio");
    assert_eq!(server.peers().len(), 1);

    net.partition(b);
    let cut = a.tokio_connect(b.agent_addr(), CUT).await;
    assert!(cut.is_err(), "{cut:?}");
    net.heal(b);
    let mut ok = false;
    for _ in 0..20 {
        if a.tokio_connect(b.agent_addr(), CUT).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "no async connection after heal");
}

/// Two networks get different subnets and cannot reach each other.
#[test]
fn two_networks_are_isolated() {
    let _g = shared();
    let (n1, n2) = (Net::new(1), Net::new(1));
    assert_ne!(n1.subnet(), n2.subnet());
    let _server = EchoServer::start(n2.host(0), AGENT_PORT);
    assert!(n2.host(0).wait_listening(AGENT_PORT, LIMIT));
    // No route out of n1's /24: fails at once, no packet leaves.
    let r = n1.host(0).connect(n2.host(0).agent_addr(), CUT);
    assert!(r.is_err(), "{r:?}");
}

/// A test that panics with a network and processes alive leaves nothing:
/// processes (and a helper one of them started) killed, namespaces gone,
/// the root namespace's interfaces unchanged. Dropping a Net before its
/// processes kills them too.
#[test]
fn nothing_outlives_a_test_even_one_that_panics() {
    let _g = exclusive();
    let links_before = root_links();
    let ours_before = netns::own_namespaces();
    assert!(ours_before.is_empty(), "{ours_before:?}");

    let seen = Mutex::new((Vec::<u32>::new(), Vec::<String>::new(), PathBuf::new()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = Net::new(2);
        let p = net.host(0).spawn(Command::new("sleep").arg("300"));
        let q = net
            .host(1)
            .spawn(&mut bash("sleep 300 & echo helper $!; wait"));
        assert!(q.wait_log("helper", LIMIT));
        let helper = logged_number(&q.log_text(), "helper");
        let mut s = seen.lock().unwrap();
        s.0 = vec![p.pid(), q.pid(), helper];
        s.1 = net.namespace_names();
        s.2 = net.log_dir().to_owned();
        assert!(s.2.is_dir());
        assert_eq!(s.1.len(), 3);
        assert!(s.1.iter().all(|n| netns::ns_exists(n)));
        drop(s);
        panic!("deliberate failure with the network up");
    }));
    assert!(r.is_err());
    let (pids, names, logs) = seen.into_inner().unwrap();
    assert!(!logs.exists(), "{} survived", logs.display());
    for pid in &pids {
        assert!(eventually(LIMIT, || dead(*pid)), "pid {pid} survived");
    }
    for n in &names {
        assert!(!netns::ns_exists(n), "{n} survived");
    }
    assert_eq!(netns::own_namespaces(), ours_before);
    assert_eq!(root_links(), links_before);

    // The Net goes first, the process handle later.
    let net = Net::new(1);
    let p = net.host(0).spawn(Command::new("sleep").arg("300"));
    let pid = p.pid();
    drop(net);
    assert!(!p.is_running());
    assert_eq!(p.exit_status().and_then(|s| s.signal()), Some(9));
    assert!(dead(pid));
    drop(p);
    assert_eq!(netns::own_namespaces(), ours_before);
    assert_eq!(root_links(), links_before);
}

/// Removes the directories it names on drop.
struct RemoveDirs(Vec<PathBuf>);

impl Drop for RemoveDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Deletes the namespaces it names on drop (decoys made by this test).
struct MadeNamespaces(Vec<String>);

impl Drop for MadeNamespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            if netns::ns_exists(n) {
                let _ = netns::ip(&["netns", "del", n]);
            }
        }
    }
}

/// Namespaces in our scheme whose pid is dead are removed; one whose pid
/// lives, and names merely resembling the scheme, are kept.
#[test]
fn stale_namespaces_of_dead_runs_are_removed_and_nothing_else() {
    let _g = exclusive();
    let mut child = Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead_pid = child.id();
    let live = KillOnDrop(Command::new("sleep").arg("60").spawn().unwrap());
    let live_pid = live.0.id();
    let stale = vec![
        format!("swn{dead_pid:x}.00b"),
        format!("swn{dead_pid:x}.00h00"),
    ];
    // Names carry pids of this process or its children, so test processes
    // running at the same time never make the same ones.
    let decoys = vec![
        format!("swn{live_pid:x}.00b"), // a live process, not ours
        format!("swn{dead_pid:x}.00bx"),
        format!("swn{dead_pid:x}.0b"),
        format!("xswn{dead_pid:x}.00b"),
        format!("swn{dead_pid:x}.00h0g"),
        format!("swn0{dead_pid:x}.00b"),
    ];
    let _made = MadeNamespaces(stale.iter().chain(&decoys).cloned().collect());
    for n in stale.iter().chain(&decoys) {
        assert!(!netns::ns_exists(n), "{n} exists already");
        netns::ip(&["netns", "add", n]).unwrap();
    }

    let removed = netns::remove_stale_namespaces();
    for n in &stale {
        // Another test process's sweep may have got there first.
        assert!(!netns::ns_exists(n), "{n} not removed: {removed:?}");
    }
    for n in &decoys {
        assert!(!removed.contains(n), "{n} removed");
        assert!(netns::ns_exists(n), "{n} gone");
    }

    // Log directories follow the same rule.
    let stale_logs = PathBuf::from(format!("/tmp/stowage-netns-{dead_pid:x}-t"));
    let live_logs = PathBuf::from(format!("/tmp/stowage-netns-{live_pid:x}-t"));
    let _dirs = RemoveDirs(vec![stale_logs.clone(), live_logs.clone()]);
    for d in [&stale_logs, &live_logs] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("h0-x-0.log"), "log").unwrap();
    }
    let removed = netns::remove_stale_log_dirs();
    assert!(!stale_logs.exists(), "{removed:?}");
    assert!(live_logs.join("h0-x-0.log").exists(), "{removed:?}");

    // Our own live namespaces are never stale.
    let net = Net::new(1);
    let removed = netns::remove_stale_namespaces();
    for n in net.namespace_names() {
        assert!(!removed.contains(&n));
        assert!(netns::ns_exists(&n));
    }
}
