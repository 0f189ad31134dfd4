//! Multi-node test network: one network namespace per host, each joined by a
//! veth pair to a bridge that lives in a namespace of the test's own;
//! processes run inside a host's *network* namespace only (same mount
//! namespace as the test); link faults; teardown on drop, even on panic.
//!
//! It must never touch the root namespace's interfaces, addresses or routes,
//! assign addresses outside the namespaces it created (all from
//! 198.18.0.0/15), signal a process it did not start, or delete a namespace
//! whose name does not follow its own naming scheme exactly.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, Weak, mpsc};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

/// Every namespace this harness creates is named
/// `swn<pid hex>.<net 2 hex>b` (the bridge) or `swn<pid hex>.<net>h<host 2 hex>`,
/// at most 15 characters, `pid` being the test process's.
pub const PREFIX: &str = "swn";
/// The port node agents listen on: every host has its own network
/// namespace, so one fixed port serves them all.
pub const AGENT_PORT: u16 = 7443;
/// How long `terminate` waits after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);
/// Upper bound for one `ip` command.
const IP_LIMIT: Duration = Duration::from_secs(20);
/// Upper bound for a SIGKILLed process to become reapable.
const REAP_LIMIT: Duration = Duration::from_secs(10);
/// Upper bound for the spawner thread to answer a spawn request.
const SPAWN_LIMIT: Duration = Duration::from_secs(20);
/// Polling interval of every bounded wait.
const POLL: Duration = Duration::from_millis(10);
/// Where `ip netns add` puts its namespace files.
const NETNS_DIR: &str = "/run/netns";
/// Interface name of a host's end of its veth pair, inside its namespace.
pub const HOST_IFACE: &str = "eth0";
/// The bridge's name inside the bridge namespace.
const BRIDGE: &str = "br0";

/// Log directories are `/tmp/stowage-netns-<pid hex>-<random>`.
const LOG_DIR_PREFIX: &str = "stowage-netns-";

static NEXT_NET: AtomicU32 = AtomicU32::new(0);
static STALE_SWEEP: Once = Once::new();

// ---------------------------------------------------------------- names

fn bridge_ns_name(pid: u32, net: u8) -> String {
    format!("{PREFIX}{pid:x}.{net:02x}b")
}

fn host_ns_name(pid: u32, net: u8, host: u8) -> String {
    format!("{PREFIX}{pid:x}.{net:02x}h{host:02x}")
}

/// The pid embedded in `name` if, and only if, `name` follows this
/// harness's naming scheme exactly; `None` for every other name.
pub fn parse_ns_name(name: &str) -> Option<u32> {
    fn lower_hex(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, tail) = rest.split_once('.')?;
    // `{:x}` never writes a leading zero, and pids fit 6 hex digits.
    if !lower_hex(pid) || pid.len() > 6 || pid.starts_with('0') {
        return None;
    }
    let ok = match tail.len() {
        3 => lower_hex(&tail[..2]) && &tail[2..] == "b",
        5 => lower_hex(&tail[..2]) && &tail[2..3] == "h" && lower_hex(&tail[3..]),
        _ => false,
    };
    if !ok {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

/// The names `ip netns list` shows, in its order.
pub fn namespaces() -> Vec<String> {
    let out = ip(&["netns", "list"]).unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Whether a namespace of that name exists.
pub fn ns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// The namespaces whose names follow this harness's scheme and carry the
/// pid of the running test process.
pub fn own_namespaces() -> Vec<String> {
    let me = std::process::id();
    namespaces()
        .into_iter()
        .filter(|n| parse_ns_name(n) == Some(me))
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // EPERM means it exists (and is someone else's): alive.
    !matches!(kill(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

/// Deletes namespaces left by crashed runs: those whose names follow this
/// harness's scheme exactly and carry the pid of a process that no longer
/// exists. Any other namespace is left alone, including ours and those of
/// other live test processes (a reused pid keeps a stale one: harmless).
/// Processes still inside a stale namespace are not signalled (nothing
/// proves they are ours); they keep the namespace alive, nameless.
/// Returns the names deleted.
pub fn remove_stale_namespaces() -> Vec<String> {
    let mut removed = Vec::new();
    for name in namespaces() {
        let Some(pid) = parse_ns_name(&name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        // Direct children died with the crashed run (PR_SET_PDEATHSIG);
        // grandchildren may not have.
        if let Ok(pids) = ip(&["netns", "pids", &name])
            && !pids.trim().is_empty()
        {
            let pids: Vec<&str> = pids.split_whitespace().collect();
            eprintln!("netns: stale namespace {name} still holds processes {pids:?}; left running");
        }
        match ip(&["netns", "del", &name]) {
            Ok(_) => removed.push(name),
            Err(e) => eprintln!("netns: could not remove stale namespace {name}: {e}"),
        }
    }
    removed
}

/// Removes the log directories crashed runs left in /tmp (named with this
/// harness's prefix and the pid of a process that no longer exists).
/// Returns the paths removed.
pub fn remove_stale_log_dirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(LOG_DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok())
        else {
            continue;
        };
        // A real directory only (never follow a symlink), of a dead pid.
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !pid_alive(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

// ---------------------------------------------------------------- ip

/// A failed `ip` command: its arguments, exit status and stderr.
#[derive(Debug)]
pub struct IpError {
    pub args: Vec<String>,
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl std::fmt::Display for IpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(
                f,
                "ip {} failed ({s}): {}",
                self.args.join(" "),
                self.stderr
            ),
            None => write!(f, "ip {}: {}", self.args.join(" "), self.stderr),
        }
    }
}

/// Runs `ip ARGS` and returns its stdout; killed after `IP_LIMIT`.
pub fn ip(args: &[&str]) -> Result<String, IpError> {
    let err = |status, stderr: String| IpError {
        args: args.iter().map(|s| s.to_string()).collect(),
        status,
        stderr,
    };
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(None, format!("spawn: {e}")))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let errs = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + IP_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(None, format!("no exit within {IP_LIMIT:?}")));
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = errs.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(err(Some(status), stderr.trim().to_owned()))
    }
}

// ---------------------------------------------------------------- Net

/// What the hosts and processes of one `Net` share.
struct Shared {
    /// Sends commands to the spawner thread; `None` once torn down.
    spawner: Mutex<Option<mpsc::Sender<SpawnRequest>>>,
    /// Every process started in this network, to kill on teardown.
    procs: Mutex<Vec<Weak<Mutex<ProcState>>>>,
    logs: PathBuf,
    next_log: AtomicU32,
}

struct SpawnRequest {
    cmd: Command,
    /// Open until the child has called setns(2) with its descriptor.
    _netns: File,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// A test network: a bridge namespace and `n` host namespaces, each host
/// wired to the bridge by a veth pair and addressed `198.18.<net>.<i+1>/24`.
/// Dropping it kills every process started in it, then deletes its
/// namespaces (their interfaces go with them).
pub struct Net {
    pid: u32,
    net: u8,
    bridge_ns: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, in creation order (deleted in reverse).
    created: Vec<String>,
    shared: Arc<Shared>,
    spawner: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("bridge_ns", &self.bridge_ns)
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl Net {
    /// Builds a network of `n_hosts` hosts (1..=250). The first `Net` of a
    /// test process first removes stale namespaces of crashed runs. Panics
    /// if an `ip` command fails, after deleting what it had made.
    pub fn new(n_hosts: usize) -> Net {
        assert!(
            (1..=250).contains(&n_hosts),
            "a Net has 1..=250 hosts, not {n_hosts}"
        );
        STALE_SWEEP.call_once(|| {
            let removed = remove_stale_namespaces();
            if !removed.is_empty() {
                eprintln!("netns: removed stale namespaces {removed:?}");
            }
            let removed = remove_stale_log_dirs();
            if !removed.is_empty() {
                eprintln!("netns: removed stale log directories {removed:?}");
            }
        });
        let pid = std::process::id();
        // A name already taken can only be a leftover of a dead process
        // whose pid we now carry: skip to the next number.
        let net = (0..256)
            .map(|_| (NEXT_NET.fetch_add(1, Ordering::Relaxed) % 256) as u8)
            .find(|&n| {
                !ns_exists(&bridge_ns_name(pid, n))
                    && (0..n_hosts).all(|i| !ns_exists(&host_ns_name(pid, n, i as u8)))
            })
            .expect("a free network number");

        let logs = tempfile::Builder::new()
            .prefix(&format!("{LOG_DIR_PREFIX}{pid:x}-"))
            .tempdir_in("/tmp")
            .expect("make log dir")
            .keep();
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        // The thread that forks every child: PR_SET_PDEATHSIG fires when the
        // forking *thread* ends, so it must live exactly as long as the Net.
        let spawner = std::thread::Builder::new()
            .name(format!("netns-spawner-{net:02x}"))
            .spawn(move || {
                while let Ok(mut req) = rx.recv() {
                    let _ = req.reply.send(req.cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        let shared = Arc::new(Shared {
            spawner: Mutex::new(Some(tx)),
            procs: Mutex::new(Vec::new()),
            logs,
            next_log: AtomicU32::new(0),
        });
        let mut me = Net {
            pid,
            net,
            bridge_ns: bridge_ns_name(pid, net),
            hosts: Vec::new(),
            created: Vec::new(),
            shared,
            spawner: Some(spawner),
        };
        if let Err(e) = me.build(n_hosts) {
            panic!("building the test network failed: {e}");
        }
        me
    }

    fn build(&mut self, n_hosts: usize) -> Result<(), IpError> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        self.created.push(br.clone());
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", BRIDGE, "up"])?;
        for i in 0..n_hosts {
            let name = host_ns_name(self.pid, self.net, i as u8);
            debug_assert!(name.len() <= 15);
            let port = format!("h{i:02x}");
            let ip_addr = Ipv4Addr::new(198, 18, self.net, i as u8 + 1);
            ip(&["netns", "add", &name])?;
            self.created.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            // Both ends are made inside namespaces of ours: the pair never
            // exists in the root namespace, not even for a moment.
            ip(&[
                "-n", &name, "link", "add", HOST_IFACE, "type", "veth", "peer", "name", &port,
                "netns", &br,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", BRIDGE])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ip_addr}/24"),
                "dev",
                HOST_IFACE,
            ])?;
            ip(&["-n", &name, "link", "set", HOST_IFACE, "up"])?;
            self.hosts.push(Host {
                index: i,
                name,
                ip: ip_addr,
                bridge_port: port,
                shared: self.shared.clone(),
            });
        }
        Ok(())
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The namespace holding the bridge.
    pub fn bridge_namespace(&self) -> &str {
        &self.bridge_ns
    }

    /// Every namespace this network created (bridge first).
    pub fn namespace_names(&self) -> Vec<String> {
        self.created.clone()
    }

    /// This network's subnet, `198.18.<net>.0/24`.
    pub fn subnet(&self) -> String {
        format!("198.18.{}.0/24", self.net)
    }

    /// Where process logs are written (removed on drop).
    pub fn log_dir(&self) -> &Path {
        &self.shared.logs
    }

    fn own(&self, host: &Host) -> &Host {
        let h = &self.hosts[host.index];
        assert_eq!(h.name, host.name, "{} is not a host of this Net", host.name);
        h
    }

    /// Cuts `host` off the bridge: its bridge-side veth end goes down (the
    /// host's own end loses carrier). Idempotent.
    pub fn partition(&self, host: &Host) {
        let h = self.own(host);
        ip(&["-n", &self.bridge_ns, "link", "set", &h.bridge_port, "down"])
            .unwrap_or_else(|e| panic!("partition {}: {e}", h.name));
    }

    /// Reconnects `host` to the bridge. Idempotent.
    pub fn heal(&self, host: &Host) {
        let h = self.own(host);
        ip(&["-n", &self.bridge_ns, "link", "set", &h.bridge_port, "up"])
            .unwrap_or_else(|e| panic!("heal {}: {e}", h.name));
    }

    /// Whether `host`'s bridge port is up.
    pub fn is_connected(&self, host: &Host) -> bool {
        let h = self.own(host);
        let out = ip(&["-n", &self.bridge_ns, "-o", "link", "show", &h.bridge_port])
            .unwrap_or_else(|e| panic!("{e}"));
        // The flags, e.g. `<BROADCAST,MULTICAST,UP,LOWER_UP>`.
        out.split(['<', '>'])
            .nth(1)
            .is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let procs = std::mem::take(&mut *lock(&self.shared.procs));
        for p in procs.iter().filter_map(Weak::upgrade) {
            let mut st = lock(&p);
            if panicking {
                st.report();
            }
            st.kill9();
        }
        // Closing the channel ends the spawner thread.
        lock(&self.shared.spawner).take();
        if let Some(t) = self.spawner.take() {
            let _ = t.join();
        }
        for name in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("netns: teardown could not delete namespace {name}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.shared.logs);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- Host

/// One host: a network namespace with `eth0` at `ip` on the bridge.
pub struct Host {
    index: usize,
    name: String,
    ip: Ipv4Addr,
    /// Its veth end in the bridge namespace.
    bridge_port: String,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .finish()
    }
}

impl Host {
    /// The network namespace's name (`ip netns` name, at most 15 chars).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }

    /// `ip:AGENT_PORT`.
    pub fn agent_addr(&self) -> SocketAddr {
        self.addr(AGENT_PORT)
    }

    /// `/run/netns/NAME`, for `nsenter --net=` or setns(2).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    fn open_netns(&self) -> io::Result<File> {
        File::open(self.netns_path())
    }

    /// Starts `cmd`'s program, arguments, environment changes and working
    /// directory inside this host's network namespace only: it keeps the
    /// test's mount namespace, so mounts it makes are the test's. Its own
    /// process group; stdin is /dev/null, stdout and stderr go to one log
    /// file; SIGKILLed if the test process dies (PR_SET_PDEATHSIG: the
    /// process itself, not helpers it started, which only `kill9` and
    /// teardown reach). Stdio settings on `cmd` are ignored, and so is
    /// `env_clear` (not observable on a Command).
    pub fn spawn(&self, cmd: &mut Command) -> Proc {
        let spec = Spec {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(|a| a.to_owned()).collect(),
            envs: cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                .collect(),
            cwd: cmd.get_current_dir().map(Path::to_owned),
        };
        let seq = self.shared.next_log.fetch_add(1, Ordering::Relaxed);
        let prog = Path::new(&spec.program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let label = format!("h{}-{prog}-{seq}", self.index);
        let log = self.shared.logs.join(format!("{label}.log"));
        let state = Arc::new(Mutex::new(ProcState {
            child: None,
            exit: None,
            pid: 0,
            log: log.clone(),
            label: label.clone(),
            reported: false,
        }));
        lock(&self.shared.procs).push(Arc::downgrade(&state));
        let p = Proc {
            state,
            spec,
            netns: self.netns_path(),
            shared: self.shared.clone(),
            log,
            label,
        };
        p.start();
        p
    }

    /// Runs `f` on a fresh thread that has entered this host's network
    /// namespace (only that thread; it ends with `f`). Sockets made there
    /// stay in this namespace wherever they are used afterwards. Blocks the
    /// calling thread until `f` returns.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self
            .open_netns()
            .unwrap_or_else(|e| panic!("open {}: {e}", self.netns_path().display()));
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                // SAFETY: setns(2) on a valid open descriptor; it changes
                // only this scoped thread's network namespace, and the
                // thread runs nothing but `f`.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
                drop(ns);
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// An unconnected tokio socket of this namespace: `connect` it from any
    /// async context (e.g. inside a tonic connector).
    pub fn tokio_socket(&self) -> io::Result<tokio::net::TcpSocket> {
        self.run_in(tokio::net::TcpSocket::new_v4)
    }

    /// An async connection from this namespace to `to`, given up after
    /// `limit`. Needs a tokio runtime with IO and time enabled.
    pub async fn tokio_connect(
        &self,
        to: SocketAddr,
        limit: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self.tokio_socket()?;
        match tokio::time::timeout(limit, socket.connect(to)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect to {to} from {}: no answer within {limit:?}",
                    self.name
                ),
            )),
        }
    }

    /// A listener on `ip:port` in this namespace.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        let addr = self.addr(port);
        self.run_in(move || TcpListener::bind(addr))
    }

    /// A connection from this namespace to `to`, given up after `limit`.
    pub fn connect(&self, to: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
        self.run_in(move || TcpStream::connect_timeout(&to, limit))
    }

    /// Connects from this namespace to `to`, sends `msg`, and reads as many
    /// bytes back (an echo); every step bounded by `limit`.
    pub fn roundtrip(&self, to: SocketAddr, msg: &[u8], limit: Duration) -> io::Result<Vec<u8>> {
        let mut s = self.connect(to, limit)?;
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        s.write_all(msg)?;
        let mut back = vec![0; msg.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    }

    /// Waits at most `limit` for something to accept connections on this
    /// host's `port` (tried from inside the host).
    pub fn wait_listening(&self, port: u16, limit: Duration) -> bool {
        let to = self.addr(port);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.connect(to, Duration::from_millis(500)).is_ok() {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }
}

// ---------------------------------------------------------------- Proc

/// How to start a process again.
#[derive(Debug, Clone)]
struct Spec {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
}

#[derive(Debug)]
struct ProcState {
    /// The running (or exited but not yet reaped) child.
    child: Option<Child>,
    /// Exit status of the last run, once reaped.
    exit: Option<ExitStatus>,
    /// Pid of the last run.
    pid: u32,
    log: PathBuf,
    label: String,
    /// Its log tail was printed for a failing test.
    reported: bool,
}

impl ProcState {
    /// Once, for a failed test: the tail of its log on stderr, and the
    /// whole log kept ([`keep_log`]).
    fn report(&mut self) {
        if !self.reported {
            self.reported = true;
            eprintln!("{}", tail_report(&self.log, &self.label, 30));
            keep_log(&self.log);
        }
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// Reaps the child if it has exited. Before reaping, SIGKILLs what is
    /// left of its process group: while the leader is an unreaped zombie its
    /// pid, hence the group id, cannot be reused, so the signal can only
    /// reach processes it started.
    fn settle(&mut self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
            Ok(_) => {
                let _ = killpg(pid, Signal::SIGKILL);
                if let Some(mut c) = self.child.take() {
                    self.exit = c.wait().ok();
                }
            }
            // Not our child any more (cannot happen: only we reap it), so
            // its pid may be anyone's: no signal.
            Err(e) => {
                eprintln!("netns: waitid({pid}) of {}: {e}", self.label);
                self.child = None;
            }
        }
    }

    fn running(&mut self) -> bool {
        self.settle();
        self.child.is_some()
    }

    /// Polls until the child is reaped or `limit` passes.
    fn wait_reaped(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if !self.running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL to the process group (the leader is unreaped, so the group is
    /// ours), then reap.
    fn kill9(&mut self) -> Option<ExitStatus> {
        if let Some(pid) = self.pid() {
            let _ = killpg(pid, Signal::SIGKILL);
            if !self.wait_reaped(REAP_LIMIT) {
                eprintln!(
                    "netns: {} (pid {pid}) not reapable {REAP_LIMIT:?} after SIGKILL",
                    self.label
                );
            }
        }
        self.exit
    }
}

/// A process started in a host's network namespace. Dropping it kills it
/// (and its process group); so does dropping its `Net`.
pub struct Proc {
    state: Arc<Mutex<ProcState>>,
    spec: Spec,
    netns: PathBuf,
    shared: Arc<Shared>,
    log: PathBuf,
    label: String,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &lock(&self.state).pid)
            .finish()
    }
}

/// In the child between fork and exec: enter the network namespace, die
/// with the spawner thread, and refuse to run if the test already died.
/// Only async-signal-safe calls; no allocation.
fn child_setup(netns: RawFd, parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: setns(2) on a descriptor the parent keeps open until spawn
    // returns; it changes the namespace of this single-threaded child only.
    if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid(2) has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

impl Proc {
    fn start(&self) {
        let sender = lock(&self.shared.spawner)
            .clone()
            .unwrap_or_else(|| panic!("{}: its Net is torn down", self.label));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", self.log.display()));
        let netns = File::open(&self.netns)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.netns.display()));
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args);
        for (k, v) in &self.spec.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(d) = &self.spec.cwd {
            cmd.current_dir(d);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .process_group(0);
        let fd = netns.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the hook runs between fork and exec and makes only
        // async-signal-safe system calls (see child_setup).
        unsafe {
            cmd.pre_exec(move || child_setup(fd, parent));
        }
        let (tx, rx) = mpsc::channel();
        sender
            .send(SpawnRequest {
                cmd,
                _netns: netns,
                reply: tx,
            })
            .unwrap_or_else(|_| panic!("{}: the spawner thread is gone", self.label));
        let child = match rx.recv_timeout(SPAWN_LIMIT) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!(
                "spawn {:?} in {}: {e}",
                self.spec.program,
                self.netns.display()
            ),
            Err(e) => panic!(
                "spawn {:?}: no answer from the spawner: {e}",
                self.spec.program
            ),
        };
        let mut st = lock(&self.state);
        st.pid = child.id();
        st.exit = None;
        st.child = Some(child);
    }

    /// Pid of the current (or last) run.
    pub fn pid(&self) -> u32 {
        lock(&self.state).pid
    }

    /// Whether it is still running (reaps it if it has exited).
    pub fn is_running(&self) -> bool {
        lock(&self.state).running()
    }

    /// Exit status of the last run, once it has ended and been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut st = lock(&self.state);
        st.settle();
        st.exit
    }

    /// SIGKILL to the process and its process group (helpers it started),
    /// then reaped. Returns the exit status (None only if it could not be
    /// reaped within a bound); a no-op returning the old status if it had
    /// already ended.
    pub fn kill9(&self) -> Option<ExitStatus> {
        lock(&self.state).kill9()
    }

    /// SIGTERM, then at most `TERM_GRACE` for it to exit, then `kill9`.
    pub fn terminate(&self) -> Option<ExitStatus> {
        self.terminate_within(TERM_GRACE)
    }

    /// SIGTERM, then at most `grace` for it to exit, then `kill9`.
    pub fn terminate_within(&self, grace: Duration) -> Option<ExitStatus> {
        let mut st = lock(&self.state);
        if let Some(pid) = st.pid() {
            let _ = kill(pid, Signal::SIGTERM);
            if !st.wait_reaped(grace) {
                eprintln!(
                    "netns: {} ignored SIGTERM for {grace:?}: SIGKILL",
                    self.label
                );
            }
        }
        st.kill9()
    }

    /// Waits at most `limit` for it to exit by itself; its status, or None
    /// if it is still running.
    pub fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let mut st = lock(&self.state);
        if st.wait_reaped(limit) { st.exit } else { None }
    }

    /// Starts the same command again, in the same namespace, appending to
    /// the same log. Panics if it is still running.
    pub fn restart(&self) {
        assert!(
            !self.is_running(),
            "{}: stop it before restarting",
            self.label
        );
        self.start();
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it wrote to stdout and stderr, across restarts.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        last_lines(&self.log_text(), n)
    }

    /// Waits at most `limit` for `needle` to appear in its log.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if std::thread::panicking() {
            st.report();
        }
        st.kill9();
    }
}

/// With `STOWAGE_TEST_LOGS=DIR`, a failed test's process logs are kept
/// whole in DIR (the report above shows only their tails).
fn keep_log(log: &Path) {
    let Some(dir) = std::env::var_os("STOWAGE_TEST_LOGS") else {
        return;
    };
    // The logs' own directory is one per network: kept under its name.
    let (Some(net), Some(name)) = (log.parent().and_then(Path::file_name), log.file_name()) else {
        return;
    };
    let dir = Path::new(&dir).join(net);
    let kept = std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(log, dir.join(name)));
    if let Err(e) = kept {
        eprintln!(
            "netns: cannot keep {} in {}: {e}",
            log.display(),
            dir.display()
        );
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn tail_report(log: &Path, label: &str, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    format!(
        "---- {label}: last {n} log lines ----\n{}\n---- end {label} ----",
        last_lines(&text, n)
    )
}

// ---------------------------------------------------------------- echo

/// A TCP echo server on `host:port`, served by a tokio runtime of its own;
/// records the address of every peer it accepted. Stops on drop.
pub struct EchoServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EchoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl EchoServer {
    pub fn start(host: &Host, port: u16) -> EchoServer {
        let listener = host
            .listen(port)
            .unwrap_or_else(|e| panic!("listen on {}: {e}", host.addr(port)));
        listener.set_nonblocking(true).expect("nonblocking");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("netns-echo")
            .enable_io()
            .build()
            .expect("echo runtime");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let listener = {
            let _ctx = runtime.enter();
            tokio::net::TcpListener::from_std(listener).expect("register listener")
        };
        runtime.spawn(accept_loop(listener, peers.clone()));
        EchoServer {
            addr: host.addr(port),
            peers,
            runtime: Some(runtime),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peer addresses of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Blocking is not allowed inside an async context.
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(5));
            }
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, peers: Arc<Mutex<Vec<SocketAddr>>>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                lock(&peers).push(peer);
                tokio::spawn(echo(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                eprintln!("netns: echo server stops accepting: {e}");
                return;
            }
        }
    }
}

async fn echo(stream: tokio::net::TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let n = match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            if stream.writable().await.is_err() {
                return;
            }
            match stream.try_write(data) {
                Ok(w) => data = &data[w..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
}
