//! Several hosts (issue 11): what routing through `serve --mode controller`
//! costs, how fast the controller's registry converges after a restart,
//! and what a large fan-out listing costs the controller.
//!
//! Everything runs on this machine over loopback with mutual TLS: one
//! controller on 127.0.0.1, node agents on other 127.0.0.1 ports, and a
//! `--mode all` server as the baseline, all with their state and pools on
//! one loop-mounted xfs filesystem (same filesystem type for every
//! process). Three parts:
//!
//! 1. Latency. CreateVolume, ControllerPublish, ControllerUnpublish,
//!    GetCapacity (for one node's topology, and without topology: the
//!    controller asks every node) and DeleteVolume, each timed on the
//!    `--mode all` server (direct) and through the controller to node
//!    `n1` (routed), in interleaved rounds so both share the machine's
//!    noise; dir volumes (the routing cost nearly alone) and small raw
//!    block volumes. Measured once with only `n1` registered and once
//!    with every node registered (CreateVolume asks every node whether it
//!    already holds the name). The routing overhead is routed − direct at
//!    the median; the issue allows at most 1 ms.
//! 2. Registry convergence. With every node registered, the controller is
//!    killed with SIGKILL and started again; the time from its restart
//!    until `ListNodes` on its socket shows every node fresh, for each
//!    registration interval asked for (the nodes are restarted with it).
//! 3. Listing. `--volumes` dir volumes spread over the nodes are created
//!    through the controller (concurrently), then listed through it with
//!    each page size; the baseline is listing every node's agent API
//!    directly, one after the other, in the same run. The controller's
//!    VmRSS and VmHWM (peak, reset through /proc/PID/clear_refs before each
//!    listing) are read from /proc.
//!
//! Run as root (loop devices, mounts):
//!
//!     cargo bench --bench cluster -- [--rounds 200] [--nodes 10] [--volumes 10000]
//!         [--create-workers 16] [--register-intervals 1,5] [--restarts 5]
//!         [--page-sizes 0,500] [--list-repeats 3] [--kinds dir,block]
//!         [--block-size 64Mi] [--json]
//!
//! Processes are killed by PID, the pool unmounted, loop devices detached
//! and the scratch directory removed when the bench ends, panics, or is
//! interrupted with Ctrl-C.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Scratch;
use prost::Message;
use stowage::cluster::proto::ListNodesRequest;
use stowage::cluster::proto::admin_client::AdminClient;
use stowage::csi;
use stowage::csi::controller_client::ControllerClient;
use stowage::volume::TOPOLOGY_NODE_KEY;
use support::{Args, Summary, summarize};
use tonic::transport::Channel;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stowage")
}

// ------------------------------------------------------------ processes

/// A `stowage` process of the bench: killed (SIGKILL, by its PID) and
/// reaped when dropped.
struct Proc {
    name: String,
    args: Vec<String>,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `stowage ARGS` and waits until its unix socket answers.
    fn start(name: &str, args: Vec<String>, socket: &Path, logs: &Path) -> Proc {
        let mut p = Proc {
            name: name.to_owned(),
            args,
            socket: socket.to_owned(),
            log: logs.join(format!("{name}.log")),
            child: None,
        };
        p.spawn();
        p.wait_socket();
        p
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(bin())
                .args(&self.args)
                .env("STOWAGE_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn stowage"),
        );
    }

    fn wait_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("{} exited with {st}:\n{}", self.name, self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen within 30 s:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Free TCP ports on 127.0.0.1 (held together while picked, so distinct).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A /proc/PID/status field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Resets a process's peak RSS (VmHWM) to its current RSS.
fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

// ------------------------------------------------------------ the cluster

/// Field order is drop order: every process stops before the pool goes.
struct Bench {
    controller: Proc,
    nodes: Vec<Proc>,
    direct: Proc,
    root: PathBuf,
    pool_fs: PathBuf,
    ctl_port: u16,
    node_ports: Vec<u16>,
    interval: u64,
    _scratch: Scratch,
}

fn node_id(i: usize) -> String {
    format!("n{i}")
}

impl Bench {
    fn setup(nodes: usize, interval: u64) -> Bench {
        let scratch = Scratch::new("bench-cluster");
        let root = scratch.root.clone();
        let pool_fs = common::make_pool_fs(&scratch, "xfs", 16 << 30);
        let out = Command::new(bin())
            .args(["cluster", "init"])
            .arg(root.join("tls"))
            .output()
            .unwrap();
        assert!(out.status.success(), "stowage cluster init: {out:?}");
        std::fs::create_dir(root.join("logs")).unwrap();
        let ports = free_ports(nodes + 1);
        let direct_state = pool_fs.join("direct");
        let direct = Proc::start(
            "direct",
            vec![
                "serve".into(),
                "--endpoint".into(),
                format!("unix://{}", root.join("direct.sock").display()),
                "--node-id".into(),
                "direct".into(),
                "--state-dir".into(),
                direct_state.display().to_string(),
            ],
            &root.join("direct.sock"),
            &root.join("logs"),
        );
        let mut b = Bench {
            controller: Proc {
                name: "controller".into(),
                args: vec![
                    "serve".into(),
                    "--mode".into(),
                    "controller".into(),
                    "--endpoint".into(),
                    format!("unix://{}", root.join("controller.sock").display()),
                    "--listen".into(),
                    format!("127.0.0.1:{}", ports[0]),
                    "--tls-dir".into(),
                    root.join("tls").display().to_string(),
                ],
                socket: root.join("controller.sock"),
                log: root.join("logs/controller.log"),
                child: None,
            },
            nodes: Vec::new(),
            direct,
            root,
            pool_fs,
            ctl_port: ports[0],
            node_ports: ports[1..].to_vec(),
            interval,
            _scratch: scratch,
        };
        b.controller.spawn();
        b.controller.wait_socket();
        b
    }

    fn controller_socket(&self) -> String {
        format!("unix://{}", self.root.join("controller.sock").display())
    }

    fn direct_socket(&self) -> String {
        format!("unix://{}", self.root.join("direct.sock").display())
    }

    fn node_args(&self, i: usize) -> Vec<String> {
        vec![
            "serve".into(),
            "--mode".into(),
            "node".into(),
            "--node-id".into(),
            node_id(i),
            "--endpoint".into(),
            format!("unix://{}", self.root.join(format!("n{i}.sock")).display()),
            "--state-dir".into(),
            self.pool_fs.join(node_id(i)).display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.node_ports[i - 1]),
            "--controller".into(),
            format!("https://127.0.0.1:{}", self.ctl_port),
            "--tls-dir".into(),
            self.root.join("tls").display().to_string(),
            "--register-interval".into(),
            self.interval.to_string(),
        ]
    }

    /// Starts node agents until there are `n`, and waits until all are
    /// registered and fresh.
    async fn grow(&mut self, n: usize) {
        for i in self.nodes.len() + 1..=n {
            let p = Proc::start(
                &node_id(i),
                self.node_args(i),
                &self.root.join(format!("n{i}.sock")),
                &self.root.join("logs"),
            );
            self.nodes.push(p);
        }
        self.wait_fresh(Duration::from_secs(60)).await;
    }

    /// Restarts every node agent with another registration interval.
    async fn set_interval(&mut self, interval: u64) {
        if interval == self.interval {
            return;
        }
        self.interval = interval;
        for i in 1..=self.nodes.len() {
            self.nodes[i - 1].kill9();
            self.nodes[i - 1].args = self.node_args(i);
            self.nodes[i - 1].spawn();
        }
        for n in &mut self.nodes {
            n.wait_socket();
        }
        // A node registers at once when it starts; the registry keeps the
        // old interval until then.
        self.wait_fresh(Duration::from_secs(60)).await;
    }

    async fn admin(&self) -> Option<AdminClient<Channel>> {
        stowage::client::channel(&self.controller_socket())
            .await
            .ok()
            .map(AdminClient::new)
    }

    /// How many of our nodes the controller lists as fresh (None: its
    /// socket does not answer).
    async fn fresh_count(admin: &mut AdminClient<Channel>) -> Option<usize> {
        let nodes = admin
            .list_nodes(ListNodesRequest {})
            .await
            .ok()?
            .into_inner()
            .nodes;
        Some(nodes.iter().filter(|n| n.fresh).count())
    }

    async fn wait_fresh(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let want = self.nodes.len();
        loop {
            if let Some(mut a) = self.admin().await
                && Self::fresh_count(&mut a).await == Some(want)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{want} nodes not all fresh within {limit:?}:\n{}",
                self.controller.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn controller_client(endpoint: &str) -> ControllerClient<Channel> {
    ControllerClient::new(support::connect(endpoint).await).max_decoding_message_size(usize::MAX)
}

fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
    }
}

// ------------------------------------------------------------ part 1: latency

const CALLS: [&str; 6] = [
    "CreateVolume",
    "ControllerPublish",
    "ControllerUnpublish",
    "GetCapacity(topology)",
    "GetCapacity(any node)",
    "DeleteVolume",
];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Dir,
    Block(i64),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Block(_) => "raw block",
        }
    }
    fn capability(self) -> csi::VolumeCapability {
        match self {
            Kind::Dir => common::mount_cap("", common::Mode::SingleNodeWriter),
            Kind::Block(_) => common::block_cap(common::Mode::SingleNodeWriter),
        }
    }
    fn params(self) -> HashMap<String, String> {
        let backend = match self {
            Kind::Dir => "dir",
            Kind::Block(_) => "block",
        };
        [("backend".to_owned(), backend.to_owned())].into()
    }
    fn size(self) -> i64 {
        match self {
            Kind::Dir => 0,
            Kind::Block(s) => s,
        }
    }
}

/// Where calls go: a CSI controller socket and the node volumes land on.
#[derive(Clone)]
struct Target {
    ctl: ControllerClient<Channel>,
    node: String,
}

type Samples = BTreeMap<&'static str, Vec<Duration>>;

async fn timed<T>(
    samples: &mut Samples,
    call: &'static str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> T {
    let t = Instant::now();
    let r = f.await;
    let d = t.elapsed();
    match r {
        Ok(r) => {
            samples.entry(call).or_default().push(d);
            r.into_inner()
        }
        Err(s) => panic!("{call} failed: {s:?}"),
    }
}

/// One round on one target: create, publish, unpublish, capacity twice,
/// delete, each timed.
async fn round(t: &mut Target, kind: Kind, name: &str, s: &mut Samples) {
    let cap = kind.capability();
    let vol = timed(
        s,
        CALLS[0],
        t.ctl.create_volume(csi::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: kind.size(),
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: kind.params(),
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: vec![topo(&t.node)],
                preferred: vec![topo(&t.node)],
            }),
            ..Default::default()
        }),
    )
    .await
    .volume
    .expect("volume");
    let id = vol.volume_id.clone();
    timed(
        s,
        CALLS[1],
        t.ctl
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: t.node.clone(),
                volume_capability: Some(cap.clone()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            }),
    )
    .await;
    timed(
        s,
        CALLS[2],
        t.ctl
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: t.node.clone(),
                ..Default::default()
            }),
    )
    .await;
    let capacity = |topology: Option<csi::Topology>| csi::GetCapacityRequest {
        volume_capabilities: vec![cap.clone()],
        parameters: kind.params(),
        accessible_topology: topology,
    };
    timed(
        s,
        CALLS[3],
        t.ctl.get_capacity(capacity(Some(topo(&t.node)))),
    )
    .await;
    timed(s, CALLS[4], t.ctl.get_capacity(capacity(None))).await;
    timed(
        s,
        CALLS[5],
        t.ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        }),
    )
    .await;
}

#[derive(Debug, serde::Serialize)]
struct CallReport {
    call: &'static str,
    direct: Summary,
    routed: Summary,
    overhead_median_ms: f64,
    overhead_p99_ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct KindLatency {
    kind: &'static str,
    calls: Vec<CallReport>,
}

#[derive(Debug, serde::Serialize)]
struct LatencyReport {
    registered_nodes: usize,
    rounds: usize,
    kinds: Vec<KindLatency>,
}

async fn latency(b: &Bench, kinds: &[Kind], rounds: usize) -> LatencyReport {
    let mut direct = Target {
        ctl: controller_client(&b.direct_socket()).await,
        node: "direct".into(),
    };
    let mut routed = Target {
        ctl: controller_client(&b.controller_socket()).await,
        node: node_id(1),
    };
    let tag = format!("lat{}n", b.nodes.len());
    let mut out = Vec::new();
    for &kind in kinds {
        let (mut sd, mut sr) = (Samples::new(), Samples::new());
        // Warm-up: connections, first allocations, page cache.
        for w in 0..5 {
            let (mut x, mut y) = (Samples::new(), Samples::new());
            round(&mut direct, kind, &format!("{tag}-warm-d{w}"), &mut x).await;
            round(&mut routed, kind, &format!("{tag}-warm-r{w}"), &mut y).await;
        }
        for i in 0..rounds {
            let dn = format!("{tag}-{}-d{i}", kind.name().replace(' ', ""));
            let rn = format!("{tag}-{}-r{i}", kind.name().replace(' ', ""));
            // Alternate who goes first, so neither always follows the other.
            if i % 2 == 0 {
                round(&mut direct, kind, &dn, &mut sd).await;
                round(&mut routed, kind, &rn, &mut sr).await;
            } else {
                round(&mut routed, kind, &rn, &mut sr).await;
                round(&mut direct, kind, &dn, &mut sd).await;
            }
        }
        let calls = CALLS
            .iter()
            .map(|&c| {
                let get = |s: &Samples| summarize(s.get(c).map_or(&[][..], Vec::as_slice));
                let (d, r) = (get(&sd), get(&sr));
                CallReport {
                    call: c,
                    direct: d,
                    routed: r,
                    overhead_median_ms: r.median_ms - d.median_ms,
                    overhead_p99_ms: r.p99_ms - d.p99_ms,
                }
            })
            .collect();
        out.push(KindLatency {
            kind: kind.name(),
            calls,
        });
    }
    LatencyReport {
        registered_nodes: b.nodes.len(),
        rounds,
        kinds: out,
    }
}

// ------------------------------------------------------------ part 2: convergence

#[derive(Debug, serde::Serialize)]
struct ConvergenceReport {
    register_interval_s: u64,
    nodes: usize,
    /// From the restarted controller's exec to its socket answering.
    socket_up_s: Vec<f64>,
    /// From the restarted controller's exec to every node listed fresh.
    converged_s: Vec<f64>,
    median_s: f64,
    max_s: f64,
    /// median / register interval.
    median_over_interval: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

async fn convergence(b: &mut Bench, interval: u64, restarts: usize) -> ConvergenceReport {
    b.set_interval(interval).await;
    let want = b.nodes.len();
    let (mut up, mut conv) = (Vec::new(), Vec::new());
    for k in 0..restarts {
        // Kill at different points of the nodes' registration cycles.
        let offset = Duration::from_secs_f64(interval as f64 * ((k as f64 * 0.37) % 1.0));
        tokio::time::sleep(offset).await;
        b.controller.kill9();
        let t0 = Instant::now();
        b.controller.spawn();
        b.controller.wait_socket();
        up.push(t0.elapsed().as_secs_f64());
        let mut admin = b.admin().await.expect("controller socket answers");
        loop {
            if Bench::fresh_count(&mut admin).await == Some(want) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(interval * 10 + 30),
                "registry did not converge:\n{}",
                b.controller.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        conv.push(t0.elapsed().as_secs_f64());
    }
    let m = median(&conv);
    ConvergenceReport {
        register_interval_s: interval,
        nodes: want,
        socket_up_s: up,
        max_s: conv.iter().cloned().fold(0.0, f64::max),
        median_s: m,
        median_over_interval: m / interval as f64,
        converged_s: conv,
    }
}

// ------------------------------------------------------------ part 3: listing

#[derive(Debug, serde::Serialize)]
struct CreateReport {
    volumes: usize,
    workers: usize,
    seconds: f64,
    per_sec: f64,
    latency: Summary,
    retried: usize,
}

#[derive(Debug, serde::Serialize)]
struct ListingReport {
    page_size: i32,
    pages: usize,
    entries: usize,
    /// Encoded size of the largest page.
    largest_page_bytes: usize,
    seconds: Vec<f64>,
    median_s: f64,
    /// Listing every node's agent API directly, one after the other, with
    /// the same page size (the baseline, same run).
    direct_nodes_median_s: f64,
    overhead_ratio: f64,
    controller_rss_before_mib: f64,
    controller_peak_mib: f64,
}

#[derive(Debug, serde::Serialize)]
struct ListReport {
    nodes: usize,
    create: CreateReport,
    controller_rss_idle_mib: f64,
    controller_rss_after_create_mib: f64,
    listings: Vec<ListingReport>,
}

async fn populate(b: &Bench, volumes: usize, workers: usize) -> CreateReport {
    let n = b.nodes.len();
    let next = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    // A JoinSet aborts its tasks when dropped (a panic elsewhere, Ctrl-C).
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let mut ctl = controller_client(&b.controller_socket()).await;
        let next = Arc::clone(&next);
        let retried = Arc::clone(&retried);
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= volumes {
                    return lat;
                }
                let node = node_id(i % n + 1);
                let req = csi::CreateVolumeRequest {
                    name: format!("list-{i}"),
                    volume_capabilities: vec![Kind::Dir.capability()],
                    parameters: Kind::Dir.params(),
                    accessibility_requirements: Some(csi::TopologyRequirement {
                        requisite: vec![topo(&node)],
                        preferred: vec![topo(&node)],
                    }),
                    ..Default::default()
                };
                let mut tries = 0;
                loop {
                    let t = Instant::now();
                    match ctl.create_volume(req.clone()).await {
                        Ok(_) => {
                            lat.push(t.elapsed());
                            break;
                        }
                        Err(s)
                            if tries < 5
                                && matches!(
                                    s.code(),
                                    tonic::Code::Aborted | tonic::Code::Unavailable
                                ) =>
                        {
                            tries += 1;
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(s) => panic!("CreateVolume list-{i}: {s:?}"),
                    }
                }
            }
        });
    }
    let mut lat = Vec::with_capacity(volumes);
    while let Some(t) = tasks.join_next().await {
        lat.extend(t.expect("create worker"));
    }
    let secs = start.elapsed().as_secs_f64();
    CreateReport {
        volumes,
        workers,
        seconds: secs,
        per_sec: volumes as f64 / secs,
        latency: summarize(&lat),
        retried: retried.load(Ordering::Relaxed),
    }
}

/// Lists everything with `page` entries a page: (entries, pages, largest
/// page's encoded size).
async fn list_all(ctl: &mut ControllerClient<Channel>, page: i32) -> (usize, usize, usize) {
    let (mut entries, mut pages, mut largest) = (0, 0, 0);
    let mut token = String::new();
    loop {
        let r = ctl
            .list_volumes(csi::ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            })
            .await
            .expect("ListVolumes")
            .into_inner();
        pages += 1;
        entries += r.entries.len();
        largest = largest.max(r.encoded_len());
        token = r.next_token;
        if token.is_empty() {
            return (entries, pages, largest);
        }
    }
}

/// Clients of every node's agent API (mutual TLS with the cluster
/// certificate, as the controller dials them).
async fn agent_clients(b: &Bench) -> Vec<ControllerClient<Channel>> {
    let tls = stowage::cluster::tls::TlsMaterial::load(&b.root.join("tls")).expect("TLS material");
    let client = tls.client_tls().expect("client TLS");
    let mut out = Vec::new();
    for (i, port) in b.node_ports[..b.nodes.len()].iter().enumerate() {
        let node = stowage::cluster::tls::ServerRole::Node(node_id(i + 1));
        let ch = stowage::cluster::tls::endpoint(&format!("127.0.0.1:{port}"))
            .unwrap()
            .connect_with_connector(client.connector(node))
            .await
            .expect("connect to a node agent");
        out.push(ControllerClient::new(ch).max_decoding_message_size(usize::MAX));
    }
    out
}

async fn listing(
    b: &Bench,
    volumes: usize,
    workers: usize,
    pages: &[i32],
    repeats: usize,
) -> ListReport {
    let pid = b.controller.pid();
    let idle = status_kib(pid, "VmRSS");
    let create = populate(b, volumes, workers).await;
    let after_create = status_kib(pid, "VmRSS");
    let mut ctl = controller_client(&b.controller_socket()).await;
    let mut agents = agent_clients(b).await;
    let mut listings = Vec::new();
    for &page in pages {
        // Warm-up of both paths.
        let (entries, npages, largest) = list_all(&mut ctl, page).await;
        assert!(
            entries >= volumes,
            "the controller listed {entries} volumes, expected at least {volumes}"
        );
        for a in &mut agents {
            list_all(a, page).await;
        }
        let rss_before = status_kib(pid, "VmRSS");
        reset_hwm(pid);
        let (mut routed, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            let t = Instant::now();
            list_all(&mut ctl, page).await;
            routed.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut n = 0;
            for a in &mut agents {
                n += list_all(a, page).await.0;
            }
            direct.push(t.elapsed().as_secs_f64());
            assert_eq!(n, entries, "the nodes list what the controller lists");
        }
        let peak = status_kib(pid, "VmHWM");
        let (m, d) = (median(&routed), median(&direct));
        listings.push(ListingReport {
            page_size: page,
            pages: npages,
            entries,
            largest_page_bytes: largest,
            seconds: routed,
            median_s: m,
            direct_nodes_median_s: d,
            overhead_ratio: m / d,
            controller_rss_before_mib: mib(rss_before),
            controller_peak_mib: mib(peak),
        });
    }
    ListReport {
        nodes: b.nodes.len(),
        create,
        controller_rss_idle_mib: mib(idle),
        controller_rss_after_create_mib: mib(after_create),
        listings,
    }
}

// ------------------------------------------------------------ report

#[derive(Debug, serde::Serialize)]
struct Report {
    nodes: usize,
    transport: &'static str,
    pool_fs: &'static str,
    latency: Vec<LatencyReport>,
    /// The bound on routing overhead at the median, ms.
    overhead_limit_ms: f64,
    worst_median_overhead_ms: f64,
    list: Option<ListReport>,
    convergence: Vec<ConvergenceReport>,
    controller_rss_end_mib: f64,
    /// The `--mode all` server's RSS at the end, for scale.
    direct_rss_end_mib: f64,
    wall_s: f64,
}

fn print_report(r: &Report) {
    println!(
        "stowage cluster bench: controller + {} node agents over {}, pools on {}",
        r.nodes, r.transport, r.pool_fs
    );
    for l in &r.latency {
        println!();
        println!(
            "routed (controller → n1, {} node(s) registered) vs direct (--mode all), {} interleaved rounds, ms:",
            l.registered_nodes, l.rounds
        );
        for k in &l.kinds {
            println!(
                "  {:<10} {:<22} {:>8} {:>8} {:>8} {:>8} {:>9}",
                k.kind, "call", "direct", "p99", "routed", "p99", "+median"
            );
            for c in &k.calls {
                println!(
                    "  {:<10} {:<22} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>+9.3}",
                    "",
                    c.call,
                    c.direct.median_ms,
                    c.direct.p99_ms,
                    c.routed.median_ms,
                    c.routed.p99_ms,
                    c.overhead_median_ms
                );
            }
        }
    }
    println!();
    println!(
        "worst routing overhead at the median: {:+.3} ms (limit {:.1} ms)",
        r.worst_median_overhead_ms, r.overhead_limit_ms
    );
    for l in &r.latency {
        for k in &l.kinds {
            for c in k
                .calls
                .iter()
                .filter(|c| c.overhead_median_ms > r.overhead_limit_ms)
            {
                println!(
                    "  over the limit: {} {} with {} node(s) registered: {:+.3} ms",
                    k.kind, c.call, l.registered_nodes, c.overhead_median_ms
                );
            }
        }
    }
    if let Some(l) = &r.list {
        println!();
        println!(
            "{} dir volumes over {} nodes, created through the controller by {} workers: {:.1} s = {:.0} creates/s (median {:.3} ms, p99 {:.3} ms; {} retried)",
            l.create.volumes,
            l.nodes,
            l.create.workers,
            l.create.seconds,
            l.create.per_sec,
            l.create.latency.median_ms,
            l.create.latency.p99_ms,
            l.create.retried
        );
        println!(
            "controller RSS: idle {:.1} MiB, after the creates {:.1} MiB",
            l.controller_rss_idle_mib, l.controller_rss_after_create_mib
        );
        for x in &l.listings {
            println!(
                "  ListVolumes page size {:>4}: {} entries in {} page(s) (largest {:.2} MiB): median {:.3} s through the controller vs {:.3} s listing the {} agents directly ({:.2}x); controller RSS {:.1} MiB before, peak {:.1} MiB",
                x.page_size,
                x.entries,
                x.pages,
                x.largest_page_bytes as f64 / (1 << 20) as f64,
                x.median_s,
                x.direct_nodes_median_s,
                l.nodes,
                x.overhead_ratio,
                x.controller_rss_before_mib,
                x.controller_peak_mib
            );
        }
    }
    println!();
    for c in &r.convergence {
        println!(
            "registry convergence after kill -9 + restart, {} nodes, --register-interval {}: median {:.2} s, max {:.2} s ({:.2}x the interval); samples {:?} s; socket up after median {:.3} s",
            c.nodes,
            c.register_interval_s,
            c.median_s,
            c.max_s,
            c.median_over_interval,
            c.converged_s
                .iter()
                .map(|s| (s * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            median(&c.socket_up_s)
        );
    }
    println!();
    println!(
        "controller RSS at the end: {:.1} MiB (the --mode all server: {:.1} MiB); wall time {:.0} s",
        r.controller_rss_end_mib, r.direct_rss_end_mib, r.wall_s
    );
}

fn list_arg<T: std::str::FromStr>(args: &Args, flag: &str, default: &str) -> Vec<T> {
    args.value(flag)
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{flag}: cannot parse {s:?}"))
        })
        .collect()
}

fn num_arg(args: &Args, flag: &str, default: usize) -> usize {
    args.value(flag).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{flag} N"))
    })
}

async fn run(args: &Args) -> Report {
    let wall = Instant::now();
    let nodes = num_arg(args, "--nodes", 10).max(1);
    let rounds = num_arg(args, "--rounds", 200);
    let volumes = num_arg(args, "--volumes", 10_000);
    let workers = num_arg(args, "--create-workers", 16).max(1);
    let restarts = num_arg(args, "--restarts", 5);
    let repeats = num_arg(args, "--list-repeats", 3).max(1);
    let intervals: Vec<u64> = list_arg(args, "--register-intervals", "1,5");
    let pages: Vec<i32> = list_arg(args, "--page-sizes", "0,500");
    let block_size = args
        .value("--block-size")
        .map_or(64 << 20, |s| support::parse_size(&s));
    let kinds: Vec<Kind> = list_arg::<String>(args, "--kinds", "dir,block")
        .iter()
        .map(|k| match k.as_str() {
            "dir" => Kind::Dir,
            "block" => Kind::Block(block_size),
            other => panic!("--kinds: unknown kind {other:?} (dir, block)"),
        })
        .collect();
    assert!(
        intervals.iter().all(|i| (1..=300).contains(i)),
        "--register-intervals: 1..=300 s"
    );

    let mut b = Bench::setup(nodes, intervals.first().copied().unwrap_or(5));
    b.grow(1).await;
    let mut lat = vec![latency(&b, &kinds, rounds).await];
    if nodes > 1 {
        b.grow(nodes).await;
        lat.push(latency(&b, &kinds, rounds).await);
    }
    let list = if volumes > 0 {
        Some(listing(&b, volumes, workers, &pages, repeats).await)
    } else {
        None
    };
    let mut conv = Vec::new();
    if restarts > 0 {
        for &i in &intervals {
            conv.push(convergence(&mut b, i, restarts).await);
        }
    }
    let worst = lat
        .iter()
        .flat_map(|l| l.kinds.iter())
        .flat_map(|k| k.calls.iter())
        .map(|c| c.overhead_median_ms)
        .fold(f64::NEG_INFINITY, f64::max);
    Report {
        nodes,
        transport: "loopback TCP, mutual TLS 1.3",
        pool_fs: "xfs on a loop device (one filesystem for every process)",
        latency: lat,
        overhead_limit_ms: 1.0,
        worst_median_overhead_ms: worst,
        list,
        convergence: conv,
        controller_rss_end_mib: mib(status_kib(b.controller.pid(), "VmRSS")),
        direct_rss_end_mib: mib(status_kib(b.direct.pid(), "VmRSS")),
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

fn main() {
    let args = Args::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        // Ctrl-C drops the bench future, and with it every process, the
        // pool and the scratch directory.
        tokio::select! {
            r = run(&args) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let Some(report) = report else {
        eprintln!("interrupted; cleaned up");
        std::process::exit(130);
    };
    if args.flag("--json") {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print_report(&report);
    }
}
