//! A real Garage S3 server for tests: one node (`Garage::start`) or a
//! cluster of loopback processes (`Garage::cluster`), each on free ports in
//! its own temp dir, with a ready access key; torn down on drop, even when
//! the test panics.
//!
//! It must never signal a process it did not start (only the PIDs of its
//! own children), put a secret on the command line of the servers, or skip:
//! without a `garage` binary every test using it fails with a clear message.
//! Admin calls go through `garage json-api ENDPOINT -` with the JSON body
//! (which may hold a secret) on stdin. `STOWAGE_GARAGE_KEEP=1` keeps the
//! temp dirs (configs, data, server logs) for debugging.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The region every harness node serves (`s3_region`).
pub const REGION: &str = "garage";
/// The version the harness is written against (scripts/test.sh installs it).
pub const VERSION: &str = "2.5.0";
/// Where scripts/test.sh installs Garage when nothing else is given.
pub const CI_BINARY: &str = "/opt/stowage-ci/bin/garage";
/// Upper bound for a node to come up, the cluster to get healthy, or one
/// CLI call to return.
pub const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long drop and `stop` wait after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);
/// How many times a node start is retried when a port picked as free was
/// taken in the meantime (by a test running in parallel).
const BIND_ATTEMPTS: usize = 4;
const POLL: Duration = Duration::from_millis(20);

/// The `garage` binary: `$STOWAGE_GARAGE`, else `garage` on PATH, else
/// [`CI_BINARY`]. Panics (never skips) when none exists.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("STOWAGE_GARAGE") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "STOWAGE_GARAGE={} is not a file; install Garage {VERSION} (scripts/test.sh does)",
            p.display()
        );
        return p;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("garage");
            if p.is_file() {
                return p;
            }
        }
    }
    let p = PathBuf::from(CI_BINARY);
    assert!(
        p.is_file(),
        "no Garage binary: set STOWAGE_GARAGE, put `garage` on PATH, or install it at {CI_BINARY} \
         (`cargo install --locked --root /opt/stowage-ci garage --version {VERSION}`; scripts/test.sh does)"
    );
    p
}

/// An S3 access key. Debug never shows the secret.
#[derive(Clone)]
pub struct S3Key {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Key")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl S3Key {
    /// A fresh key in Garage's format (`GK` + 24 hex, 64 hex secret).
    fn random() -> S3Key {
        S3Key {
            access_key_id: format!("GK{}", &random_hex(12)),
            secret_access_key: random_hex(32),
        }
    }
}

/// `n` random bytes from the kernel, hex-encoded.
fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// One Garage process: its config, ports and log.
#[derive(Debug)]
pub struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    /// Environment for `garage server` (may hold the default key's secret:
    /// env, never argv).
    env: Vec<(String, String)>,
    server_args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// `http://127.0.0.1:PORT`, this node's S3 API.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The PID of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn write_config(&self, rpc_secret: &str, replication: usize) {
        let d = self.dir.display();
        let text = format!(
            "metadata_dir = \"{d}/meta\"\n\
             data_dir = \"{d}/data\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = {replication}\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{rpc_secret}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n",
            rpc = self.rpc_port,
            s3 = self.s3_port,
        );
        write_private(&self.config, text.as_bytes());
    }

    /// Starts the server and waits until its RPC answers. Err(log) if it
    /// exited (e.g. a port was taken) or did not answer within the limit.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(
            self.child.is_none(),
            "node {} already runs",
            self.dir.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open garage log");
        // What this start logs (the log is appended to).
        let logged_before = log.metadata().map_or(0, |m| m.len()) as usize;
        let mut cmd = Command::new(binary());
        cmd.arg("-c")
            .arg(&self.config)
            .arg("server")
            .args(&self.server_args)
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // SAFETY: the closure only calls prctl(2) and getppid(2), which are
        // async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(die_with_parent);
        }
        self.child = Some(spawn_from_keeper(cmd).expect("spawn garage server"));
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("garage server exited with {status}"));
            }
            // Garage itself on both ports: with a port another process
            // took meanwhile, it keeps running without that server.
            let pid = self.child.as_ref().map_or(0, |c| c.id());
            if listens(pid, self.rpc_port)
                && listens(pid, self.s3_port)
                && self.cli(&["node", "id", "-q"], None).is_ok()
            {
                return Ok(());
            }
            let logged = self.log_text();
            let logged = logged.get(logged_before..).unwrap_or_default();
            if logged.contains("server exited with error") {
                return Err(format!(
                    "a garage server stopped (port in use?): {}",
                    tail(logged)
                ));
            }
            if start.elapsed() > READY_LIMIT {
                return Err(format!("garage server not ready within {READY_LIMIT:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL and reap (only our own child).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after [`TERM_GRACE`]; reaped either way.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + TERM_GRACE;
        loop {
            match c.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
            }
        }
    }

    /// Runs `garage -c CONFIG ARGS` once (stdin from `input`), bounded by
    /// [`READY_LIMIT`]; its stdout, or a message with its stderr.
    pub fn cli(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new(binary());
        cmd.arg("-c").arg(&self.config).args(args);
        run_bounded(cmd, input).map_err(|e| format!("garage {}: {e}", args.join(" ")))
    }

    /// `garage json-api ENDPOINT -` with `body` on stdin, parsed; a `Null`
    /// body calls an endpoint that takes none.
    pub fn json_api(&self, endpoint: &str, body: &serde_json::Value) -> serde_json::Value {
        let out = if body.is_null() {
            self.cli(&["json-api", endpoint], None)
        } else {
            self.cli(&["json-api", endpoint, "-"], Some(&body.to_string()))
        };
        let out = out.unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", tail(&self.log_text())));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("garage json-api {endpoint}: bad JSON ({e}): {out}"))
    }

    /// The `<id>@127.0.0.1:<port>` this node answers `node id -q` with.
    fn node_id(&self) -> String {
        self.cli(&["node", "id", "-q"], None)
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned()
    }
}

/// Makes the child die with the test process (SIGKILL). PR_SET_PDEATHSIG
/// fires when the forking *thread* ends, hence [`spawn_from_keeper`].
fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died before prctl: then init adopted us.
    // SAFETY: getppid(2) has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

type SpawnReq = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns on one thread that lives as long as the test process, so that
/// PR_SET_PDEATHSIG means "the test process died", not "the test thread
/// that happened to start this node ended".
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnReq>>> = OnceLock::new();
    let tx = KEEPER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnReq>();
            std::thread::Builder::new()
                .name("garage-spawner".into())
                .spawn(move || {
                    while let Ok((mut cmd, reply)) = rx.recv() {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .expect("start the garage spawner thread");
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (reply, answer) = mpsc::channel();
    tx.send((cmd, reply)).expect("garage spawner thread alive");
    answer.recv().expect("garage spawner thread answers")
}

/// Runs a one-shot command with a bound; stdout, or "status: stderr".
fn run_bounded(mut cmd: Command, input: Option<&str>) -> Result<String, String> {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped");
        let _ = stdin.write_all(text.as_bytes());
    }
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + READY_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no exit within {READY_LIMIT:?}"));
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("{status}: {}", stderr.trim()))
    }
}

fn write_private(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .expect("create private file");
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600");
    f.write_all(data).expect("write private file");
}

/// A loopback port free right now. A parallel test may take it before the
/// server binds it: `Node::spawn` failing is then retried with new ports.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Whether process `pid` listens on loopback TCP `port` (`ss`, iproute2).
fn listens(pid: u32, port: u16) -> bool {
    Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("pid={pid},")))
}

fn tail(log: &str) -> &str {
    let cut = log.len().saturating_sub(8000);
    let cut = (cut..log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(0);
    &log[cut..]
}

/// A running Garage: one node or a cluster. `key` may create buckets and
/// owns `bucket`. Dropping it stops every process it started and removes
/// its temp dir.
pub struct Garage {
    /// S3 endpoint of node 0, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub region: String,
    pub key: S3Key,
    /// A bucket that exists and that `key` owns.
    pub bucket: String,
    pub nodes: Vec<Node>,
    pub root: PathBuf,
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Garage")
            .field("endpoint", &self.endpoint)
            .field("key", &self.key)
            .field("nodes", &self.nodes.len())
            .field("root", &self.root)
            .finish()
    }
}

impl Garage {
    /// One node, replication factor 1, laid out by `--single-node`; its
    /// key (with create-bucket rights) and bucket come from the
    /// `GARAGE_DEFAULT_*` environment of the server.
    pub fn start() -> Garage {
        let root = make_root();
        let key = S3Key::random();
        let bucket = "harness-default".to_owned();
        let secret = random_hex(32);
        let dir = root.join("n0");
        let mut node = new_node(&dir);
        node.server_args = vec!["--single-node".into(), "--default-bucket".into()];
        node.env = vec![
            (
                "GARAGE_DEFAULT_ACCESS_KEY".into(),
                key.access_key_id.clone(),
            ),
            (
                "GARAGE_DEFAULT_SECRET_KEY".into(),
                key.secret_access_key.clone(),
            ),
            ("GARAGE_DEFAULT_BUCKET".into(), bucket.clone()),
        ];
        let mut g = Garage {
            endpoint: String::new(),
            region: REGION.into(),
            key,
            bucket,
            nodes: vec![],
            root,
        };
        g.nodes.push(node);
        g.spawn_node(0, &secret, 1);
        g.endpoint = g.nodes[0].endpoint();
        g.wait_healthy();
        // The default key and bucket are made at start-up; wait for both.
        let start = Instant::now();
        loop {
            let ok = g.nodes[0]
                .cli(
                    &["json-api", "GetKeyInfo", "-"],
                    Some(&format!("{{\"id\":\"{}\"}}", g.key.access_key_id)),
                )
                .is_ok_and(|o| o.contains(&g.bucket));
            if ok {
                break;
            }
            g.check_time(start, "the default key and bucket");
            std::thread::sleep(POLL);
        }
        g
    }

    /// `n` nodes on loopback, replication factor `n`, connected, every one
    /// given a role in zone `dc1` and the layout applied; a key with
    /// create-bucket rights owning a fresh bucket.
    pub fn cluster(n: usize) -> Garage {
        assert!((1..=7).contains(&n), "a harness cluster has 1..=7 nodes");
        let root = make_root();
        let secret = random_hex(32);
        let mut g = Garage {
            endpoint: String::new(),
            region: REGION.into(),
            key: S3Key::random(),
            bucket: "harness-default".into(),
            nodes: (0..n)
                .map(|i| new_node(&root.join(format!("n{i}"))))
                .collect(),
            root,
        };
        for i in 0..n {
            g.spawn_node(i, &secret, n);
        }
        g.endpoint = g.nodes[0].endpoint();
        let ids: Vec<String> = g.nodes.iter().map(Node::node_id).collect();
        for id in &ids[1..] {
            g.admin(&["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().expect("node id");
            g.admin(&["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        g.admin(&["layout", "apply", "--version", "1"]);
        g.wait_healthy();
        let key = g.key.clone();
        g.import_key(&key, true);
        let bucket = g.bucket.clone();
        g.create_bucket_for(&bucket, &key);
        g
    }

    fn spawn_node(&mut self, i: usize, rpc_secret: &str, replication: usize) {
        let mut last = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let node = &mut self.nodes[i];
            node.s3_port = free_port();
            node.rpc_port = free_port();
            if node.s3_port == node.rpc_port {
                continue;
            }
            node.write_config(rpc_secret, replication);
            match node.spawn() {
                Ok(()) => return,
                Err(e) => {
                    node.kill9();
                    last = format!("{e}\nserver log:\n{}", tail(&node.log_text()));
                    if !node.log_text().contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!("garage node {i} did not start: {last}");
    }

    fn check_time(&self, start: Instant, what: &str) {
        if start.elapsed() > READY_LIMIT {
            let logs: Vec<String> = self
                .nodes
                .iter()
                .map(|n| format!("--- {}:\n{}", n.log.display(), tail(&n.log_text())))
                .collect();
            panic!(
                "garage: {what} not ready within {READY_LIMIT:?}\n{}",
                logs.join("\n")
            );
        }
    }

    /// Waits until every running node reports the cluster `healthy` (all
    /// storage nodes up, every partition with all its copies).
    pub fn wait_healthy(&self) {
        let start = Instant::now();
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let healthy = n
                    .cli(&["json-api", "GetClusterHealth"], None)
                    .ok()
                    .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                    .is_some_and(|v| v["status"] == "healthy");
                if healthy {
                    break;
                }
                self.check_time(start, "a healthy cluster");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// A CLI admin call on the first running node; panics with its error.
    pub fn admin(&self, args: &[&str]) -> String {
        let n = self.running_node();
        n.cli(args, None)
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", tail(&n.log_text())))
    }

    /// `garage json-api` on the first running node.
    pub fn json_api(&self, endpoint: &str, body: serde_json::Value) -> serde_json::Value {
        self.running_node().json_api(endpoint, &body)
    }

    fn running_node(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running garage node")
    }

    fn import_key(&self, key: &S3Key, create_bucket: bool) {
        self.json_api(
            "ImportKey",
            serde_json::json!({
                "accessKeyId": key.access_key_id,
                "secretAccessKey": key.secret_access_key,
                "name": format!("harness-{}", key.access_key_id),
            }),
        );
        if create_bucket {
            self.json_api(
                "UpdateKey",
                serde_json::json!({
                    "id": key.access_key_id,
                    "body": {"allow": {"createBucket": true}},
                }),
            );
        }
    }

    /// A new key with no rights on anything (not even creating buckets).
    pub fn key_without_rights(&self) -> S3Key {
        let key = S3Key::random();
        self.import_key(&key, false);
        key
    }

    /// Creates bucket `name` (global alias) owned by a new key with no other
    /// rights, and returns that key: `self.key` then has no access to it.
    pub fn bucket_of_other_key(&self, name: &str) -> S3Key {
        let other = self.key_without_rights();
        self.create_bucket_for(name, &other);
        other
    }

    /// Creates bucket `name` and gives `key` read, write and owner on it.
    pub fn create_bucket_for(&self, name: &str, key: &S3Key) {
        let b = self.json_api("CreateBucket", serde_json::json!({"globalAlias": name}));
        let id = b["id"]
            .as_str()
            .unwrap_or_else(|| panic!("CreateBucket {name}: no id in {b}"))
            .to_owned();
        self.json_api(
            "AllowBucketKey",
            serde_json::json!({
                "bucketId": id,
                "accessKeyId": key.access_key_id,
                "permissions": {"read": true, "write": true, "owner": true},
            }),
        );
    }

    /// `GetClusterHealth` as seen by the first running node.
    pub fn health(&self) -> serde_json::Value {
        self.json_api("GetClusterHealth", serde_json::Value::Null)
    }

    /// S3 endpoint of node `i`.
    pub fn endpoint_of(&self, i: usize) -> String {
        self.nodes[i].endpoint()
    }

    /// SIGKILLs node `i` (the PID this harness started) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_some(), "node {i} is not running");
        self.nodes[i].kill9();
    }

    /// Starts node `i` again with its config, data and ports, and waits
    /// until the cluster is healthy again.
    pub fn restart(&mut self, i: usize) {
        if let Err(e) = self.nodes[i].spawn() {
            self.nodes[i].kill9();
            panic!(
                "garage node {i} did not restart: {e}\nserver log:\n{}",
                tail(&self.nodes[i].log_text())
            );
        }
        // Its peers gave up dialling it and back off for long: connect
        // both ways now.
        let me = self.nodes[i].node_id();
        for j in (0..self.nodes.len()).filter(|&j| j != i) {
            if self.nodes[j].child.is_some() {
                let peer = self.nodes[j].node_id();
                for (from, to) in [(i, &peer), (j, &me)] {
                    self.nodes[from]
                        .cli(&["node", "connect", to], None)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
        self.wait_healthy();
    }

    /// PIDs of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(Node::pid).collect()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        // SIGTERM all first so they shut down in parallel, then reap.
        for n in &self.nodes {
            if let Some(pid) = n.pid() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for n in &mut self.nodes {
            n.stop();
        }
        if std::env::var_os("STOWAGE_GARAGE_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn make_root() -> PathBuf {
    tempfile::Builder::new()
        .prefix("stowage-garage-")
        .tempdir_in("/tmp")
        .expect("make garage temp dir")
        .keep()
}

fn new_node(dir: &Path) -> Node {
    std::fs::create_dir_all(dir.join("meta")).expect("mkdir meta");
    std::fs::create_dir_all(dir.join("data")).expect("mkdir data");
    Node {
        dir: dir.to_owned(),
        config: dir.join("garage.toml"),
        log: dir.join("server.log"),
        s3_port: 0,
        rpc_port: 0,
        env: vec![],
        server_args: vec![],
        child: None,
    }
}
