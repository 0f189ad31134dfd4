//! A cluster of real processes (issue 11): a `serve --mode controller` and
//! node agents (`serve --mode node`), each in a network namespace of its
//! own on a bridge of the test's own (198.18.0.0/15, nothing else is
//! reached), with mutual TLS from `stowage cluster init`, each node with its
//! own state in one shared pool filesystem. CSI calls go to the
//! controller's unix socket (routed over TCP to the nodes) and to the
//! nodes' own sockets, as a CO would. Everything is torn down on drop, also
//! when a test fails.
//!
//! A node may differ ([`NodeOpts`]): reached by everyone else through a
//! fault-injecting proxy in its namespace (it advertises the proxy's
//! address), or keeping its pool on a small filesystem of its own, whose
//! disk may be one this process serves (and makes fail).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stowage::cluster::proto::admin_client::AdminClient;
use stowage::cluster::proto::{ListNodesRequest, NodeInfo};
use stowage::csi;
use stowage::os::fuse_file::{BlockHandler, FuseLoopDevice, FuseOptions};
use stowage::volume::TOPOLOGY_NODE_KEY;

use super::forward::Forward;
use super::netns::{AGENT_PORT, Net, Proc};
use super::*;

pub const NODES: usize = 3;
/// Where the controller serves `/metrics` and `/healthz` (in its namespace).
pub const METRICS_PORT: u16 = 9810;
/// Where each node serves `/metrics` (in its namespace).
pub const NODE_METRICS_PORT: u16 = 9811;
/// Registration period of the test nodes (seconds): a node is stale after
/// three missed periods.
pub const INTERVAL: u64 = 1;
/// Where a proxied node's proxy listens (in the node's namespace, on its
/// address), relaying to the agent on [`AGENT_PORT`].
pub const PROXY_PORT: u16 = 7444;
/// A proxied node's data link (`--data-listen`), and the proxy's port in
/// front of it (`--data-advertise`).
pub const DATA_PORT: u16 = 7445;
pub const PROXY_DATA_PORT: u16 = 7446;

/// How one node of a [`Cluster`] differs from the others.
#[derive(Debug, Clone, Default)]
pub struct NodeOpts {
    /// The controller and the other nodes reach its agent only through a
    /// [`Forward`] ([`Cluster::proxy`]): the node advertises the proxy.
    pub proxied: bool,
    /// Its pool is an xfs filesystem of its own of this many bytes (at
    /// least 300 MiB, mkfs.xfs's minimum) mounted at `<state>/pool`,
    /// instead of a directory of the shared pool filesystem.
    pub pool_bytes: Option<u64>,
    /// With `pool_bytes`: that filesystem's disk is a FUSE file this
    /// process serves through this handler (a loop device on it), so a
    /// test can make the disk slow or fail.
    pub pool_disk: Option<PoolDisk>,
    /// Added to its `serve` command line.
    pub args: Vec<String>,
}

/// The handler of a node's pool disk ([`NodeOpts::pool_disk`]).
#[derive(Clone)]
pub struct PoolDisk(pub Arc<dyn BlockHandler>);

impl std::fmt::Debug for PoolDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolDisk")
    }
}

/// A node's pool filesystem on a [`PoolDisk`]: dropped after the node's
/// process stopped, it unmounts the filesystem, then closes the disk.
struct OwnDisk {
    pool: PathBuf,
    dev: Option<FuseLoopDevice>,
}

impl OwnDisk {
    fn new(root: &Path, name: &str, at: &Path, bytes: u64, disk: &PoolDisk) -> OwnDisk {
        let dev = FuseLoopDevice::attach(
            &root.join(format!("disk-{name}")),
            bytes,
            Arc::clone(&disk.0),
            &FuseOptions::default(),
        )
        .expect("a node's pool disk");
        let own = OwnDisk {
            pool: at.to_owned(),
            dev: Some(dev),
        };
        let path = own.dev.as_ref().expect("attached").device().path();
        stowage::os::filesystem::make(&path, "xfs").expect("mkfs a node's pool");
        std::fs::create_dir_all(at).unwrap();
        let opts = stowage::os::mount::MountOptions::parse(&[""]).unwrap();
        stowage::os::mount::mount_filesystem(&path, at, "xfs", &opts).expect("mount a node's pool");
        own
    }
}

impl Drop for OwnDisk {
    fn drop(&mut self) {
        cleanup_under(&self.pool);
        let _ = nix::mount::umount2(&self.pool, nix::mount::MntFlags::MNT_DETACH);
        if let Some(dev) = self.dev.take()
            && let Err(e) = dev.close()
        {
            eprintln!("closing the pool disk of {}: {e}", self.pool.display());
        }
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stowage")
}

/// Field order is drop order: processes stop before their pool goes.
pub struct Cluster {
    pub controller: Proc,
    pub nodes: Vec<Proc>,
    /// The pool disks this process serves ([`NodeOpts::pool_disk`]).
    disks: Vec<OwnDisk>,
    /// Node i's proxy at index i - 1, for proxied nodes.
    pub proxies: Vec<Option<Forward>>,
    pub net: Net,
    pub c: Clients,
    pub admin: AdminClient<tonic::transport::Channel>,
    pub root: PathBuf,
    pub _scratch: Scratch,
}

pub fn node_id(i: usize) -> String {
    format!("n{i}")
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(&[]).await
    }

    /// A cluster whose node i is set up as `opts[i - 1]` says (nodes past
    /// the end of `opts` as by default).
    pub async fn start_with(opts: &[NodeOpts]) -> Cluster {
        Self::start_full(NODES, &[], opts).await
    }

    /// `nodes_wanted` node agents (set up as `opts` says, as in
    /// [`Cluster::start_with`]), and `controller_args` added to the
    /// controller's command line.
    pub async fn start_full(
        nodes_wanted: usize,
        controller_args: &[&str],
        opts: &[NodeOpts],
    ) -> Cluster {
        let scratch = Scratch::new("cluster");
        let root = scratch.root.clone();
        let pool_fs = make_pool_fs(&scratch, "xfs", 8 << 30);
        let out = Command::new(bin())
            .args(["cluster", "init"])
            .arg(root.join("tls"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster init: {out:?}");
        let net = Net::new(nodes_wanted + 1);
        let ctl_addr = net.host(0).addr(AGENT_PORT);
        let controller = net.host(0).spawn(
            Command::new(bin())
                .args(["serve", "--mode", "controller", "--endpoint"])
                .arg(format!("unix://{}", root.join("controller.sock").display()))
                .args(["--listen", &ctl_addr.to_string(), "--tls-dir"])
                .arg(root.join("tls"))
                .args([
                    "--metrics-address",
                    &net.host(0).addr(METRICS_PORT).to_string(),
                ])
                .args(controller_args)
                .env("STOWAGE_LOG", "debug"),
        );
        // Declared before the nodes: on a panic here the processes stop
        // before their disks go.
        let mut disks = Vec::new();
        let mut nodes = Vec::new();
        let mut proxies = Vec::new();
        for i in 1..=nodes_wanted {
            let h = net.host(i);
            let state = pool_fs.join(node_id(i));
            let o = opts.get(i - 1).cloned().unwrap_or_default();
            match (o.pool_bytes, &o.pool_disk) {
                (Some(bytes), Some(disk)) => {
                    disks.push(OwnDisk::new(
                        &root,
                        &node_id(i),
                        &state.join("pool"),
                        bytes,
                        disk,
                    ));
                }
                (Some(bytes), None) => own_pool_fs(&root, &node_id(i), &state.join("pool"), bytes),
                (None, Some(_)) => panic!("n{i}: a pool disk needs pool_bytes"),
                (None, None) => {}
            }
            let mut data_args: Vec<String> = Vec::new();
            let advertise = if o.proxied {
                // Both the agent port and the data link go through the
                // proxy (one set of faults).
                let listen = |port| {
                    h.listen(port)
                        .unwrap_or_else(|e| panic!("proxy listener of n{i}: {e}"))
                };
                let f = Forward::start_many_in(
                    vec![
                        (listen(PROXY_PORT), h.agent_addr()),
                        (listen(PROXY_DATA_PORT), h.addr(DATA_PORT)),
                    ],
                    &h.netns_path(),
                )
                .unwrap_or_else(|e| panic!("proxy of n{i}: {e}"));
                proxies.push(Some(f));
                data_args.extend([
                    "--data-listen".to_owned(),
                    h.addr(DATA_PORT).to_string(),
                    "--data-advertise".to_owned(),
                    h.addr(PROXY_DATA_PORT).to_string(),
                ]);
                h.addr(PROXY_PORT)
            } else {
                proxies.push(None);
                h.agent_addr()
            };
            nodes.push(
                h.spawn(
                    Command::new(bin())
                        .args(["serve", "--mode", "node", "--node-id", &node_id(i)])
                        .arg("--endpoint")
                        .arg(format!(
                            "unix://{}",
                            root.join(format!("n{i}.sock")).display()
                        ))
                        .arg("--state-dir")
                        .arg(&state)
                        .args(["--listen", &h.agent_addr().to_string()])
                        .args(["--advertise", &advertise.to_string()])
                        .args(["--controller", &format!("https://{ctl_addr}")])
                        .arg("--tls-dir")
                        .arg(root.join("tls"))
                        .args(["--label", &format!("zone=z{}", i % 2)])
                        .args(["--register-interval", &INTERVAL.to_string()])
                        .args(["--metrics-address", &h.addr(NODE_METRICS_PORT).to_string()])
                        .args(&data_args)
                        .args(&o.args)
                        .env("STOWAGE_LOG", "debug"),
                ),
            );
        }
        let socket = root.join("controller.sock");
        wait_socket(&socket, &controller);
        let c = try_connect(&socket).await.unwrap();
        let admin = AdminClient::new(
            stowage::client::channel(&format!("unix://{}", socket.display()))
                .await
                .unwrap(),
        );
        let mut cl = Cluster {
            controller,
            nodes,
            disks,
            proxies,
            net,
            c,
            admin,
            root,
            _scratch: scratch,
        };
        for i in 1..=nodes_wanted {
            wait_socket(&cl.node_socket(i), &cl.nodes[i - 1]);
        }
        cl.wait_fresh(&(1..=nodes_wanted).map(node_id).collect::<Vec<_>>())
            .await;
        cl
    }

    /// The proxy in front of node `i`'s agent (started with
    /// [`NodeOpts::proxied`]).
    pub fn proxy(&self, i: usize) -> &Forward {
        self.proxies[i - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("n{i} was started without a proxy"))
    }

    /// Node `i`'s state directory (its pool is `pool` in it).
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.root.join("pool-fs").join(node_id(i))
    }

    /// The directory of node `i`'s copy of a replicated volume.
    pub fn copy_dir(&self, i: usize, volume_id: &str) -> PathBuf {
        let hex = volume_id.strip_prefix("replicated:").unwrap();
        self.state_dir(i).join("pool/replicas").join(hex)
    }

    /// Node `i`'s directory of a replicated volume's snapshot.
    pub fn snapshot_dir(&self, i: usize, snapshot_id: &str) -> PathBuf {
        let hex = snapshot_id.rsplit(':').next().unwrap();
        self.state_dir(i).join("pool/replicas/.snapshots").join(hex)
    }

    /// The `data` file of node `i`'s copy of a replicated volume.
    pub fn copy_data(&self, i: usize, volume_id: &str) -> PathBuf {
        self.copy_dir(i, volume_id).join("data")
    }

    /// Whether nodes `i` and `j` hold the same bytes in their copies of a
    /// replicated volume (read from a blocking thread).
    pub async fn same_copies(&self, i: usize, j: usize, volume_id: &str) -> bool {
        let (a, b) = (self.copy_data(i, volume_id), self.copy_data(j, volume_id));
        tokio::task::spawn_blocking(move || std::fs::read(a).unwrap() == std::fs::read(b).unwrap())
            .await
            .unwrap()
    }

    /// The (abnormal, message) of a replicated volume's condition as the
    /// controller reads it from the copies' records (and the engine).
    pub async fn condition(&mut self, volume_id: &str) -> (bool, String) {
        let c = self
            .get(volume_id)
            .await
            .unwrap_or_else(|e| panic!("ControllerGetVolume {volume_id}: {e:?}"))
            .status
            .unwrap()
            .volume_condition
            .unwrap();
        (c.abnormal, c.message)
    }

    /// Waits (bounded) until the volume's condition satisfies `ok`; its
    /// (abnormal, message) then.
    pub async fn wait_condition(
        &mut self,
        volume_id: &str,
        within: Duration,
        what: &str,
        ok: impl Fn(bool, &str) -> bool,
    ) -> (bool, String) {
        let deadline = Instant::now() + within;
        loop {
            let (abnormal, msg) = self.condition(volume_id).await;
            if ok(abnormal, &msg) {
                return (abnormal, msg);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; the condition is (abnormal: {abnormal}) {msg}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (bounded) until every copy of the volume is in sync.
    pub async fn wait_in_sync(&mut self, volume_id: &str, within: Duration) {
        self.wait_condition(volume_id, within, "every copy in sync", |abnormal, _| {
            !abnormal
        })
        .await;
    }

    /// The value of node `i`'s `stowage_replicated_copy_in_sync` sample
    /// for `copy` (from the engine's node), None without one.
    pub fn copy_in_sync_metric(&self, i: usize, copy: &str) -> Option<u64> {
        self.copy_metric(i, "stowage_replicated_copy_in_sync", copy)
    }

    /// Waits (at most 20 s) until node `i`'s engine sees `copy` in sync
    /// (`want` 1) or not (0). The controller's view comes from the chosen
    /// record, which a majority of copies holds a moment before the
    /// engine has counted their answers: right after
    /// [`Self::wait_in_sync`] the engine's own view may still be behind.
    pub async fn wait_copy_in_sync_metric(&self, i: usize, copy: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.copy_in_sync_metric(i, copy);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "n{i}'s engine sees {copy} in sync {got:?}, not {want}, after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s sample of metric `name` for copy `copy` (of the one
    /// replicated volume its engine serves).
    pub fn copy_metric(&self, i: usize, name: &str, copy: &str) -> Option<u64> {
        self.metric_with(i, name, &format!("copy=\"{copy}\""))
    }

    /// Node `i`'s sample of metric `name` (of the one replicated volume
    /// its engine serves, a per-volume metric), None without one.
    pub fn volume_metric(&self, i: usize, name: &str) -> Option<u64> {
        self.metric_with(i, name, "")
    }

    /// Node `i`'s first sample of labelled metric `name` whose labels
    /// contain `label`.
    pub fn metric_with(&self, i: usize, name: &str, label: &str) -> Option<u64> {
        let (_, body) = self.http_get(i, NODE_METRICS_PORT, "/metrics");
        sample(&body, name, label)
    }

    /// The controller's first sample of labelled metric `name` whose
    /// labels contain `label`.
    pub fn controller_metric_with(&self, name: &str, label: &str) -> Option<u64> {
        let (_, body) = self.http_get(0, METRICS_PORT, "/metrics");
        sample(&body, name, label)
    }

    pub fn node_socket(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.sock"))
    }

    pub async fn node(&self, i: usize) -> Clients {
        try_connect(&self.node_socket(i)).await.unwrap()
    }

    pub async fn nodes(&mut self) -> Vec<NodeInfo> {
        self.admin
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
    }

    /// Waits (bounded) until every node in `ids` is registered and fresh.
    pub async fn wait_fresh(&mut self, ids: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = self.nodes().await;
            if ids
                .iter()
                .all(|id| nodes.iter().any(|n| &n.node_id == id && n.fresh))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} not all fresh within 30 s: {nodes:?}\ncontroller log:\n{}",
                self.controller.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until node `id` is registered but no longer fresh.
    pub async fn wait_stale(&mut self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .nodes()
            .await
            .iter()
            .any(|n| n.node_id == id && n.fresh)
        {
            assert!(Instant::now() < deadline, "{id} still fresh after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn reconnect(&mut self) {
        let socket = self.root.join("controller.sock");
        wait_socket(&socket, &self.controller);
        self.c = try_connect(&socket).await.unwrap();
        self.admin = AdminClient::new(
            stowage::client::channel(&format!("unix://{}", socket.display()))
                .await
                .unwrap(),
        );
    }

    pub async fn create(
        &mut self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::Volume, tonic::Status> {
        self.c
            .controller
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    /// DeleteVolume, retried while ABORTED (see [`retry_aborted`]).
    /// DeleteSnapshot of `id` through the controller.
    pub async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        let c = self.c.controller.clone();
        let req = csi::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        };
        retry_aborted(|| {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.delete_volume(req).await.map(drop) }
        })
        .await
    }

    pub async fn get(
        &mut self,
        id: &str,
    ) -> Result<csi::ControllerGetVolumeResponse, tonic::Status> {
        self.c
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.to_owned(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The (abnormal, message) of a volume's condition as ListVolumes
    /// gives it (all in one page).
    pub async fn listed_condition(&mut self, volume_id: &str) -> (bool, String) {
        let r = self
            .c
            .controller
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap_or_else(|e| panic!("ListVolumes: {e:?}"))
            .into_inner();
        let e = r
            .entries
            .into_iter()
            .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == volume_id))
            .unwrap_or_else(|| panic!("ListVolumes has no {volume_id}"));
        let c = e.status.unwrap().volume_condition.unwrap();
        (c.abnormal, c.message)
    }

    /// Every volume ListVolumes returns, page by page.
    pub async fn list_all(&mut self, page: i32) -> Result<Vec<String>, tonic::Status> {
        let (mut out, mut token) = (Vec::new(), String::new());
        for _ in 0..1000 {
            let r = self
                .c
                .controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: page,
                    starting_token: token,
                })
                .await?
                .into_inner();
            out.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
            token = r.next_token;
            if token.is_empty() {
                return Ok(out);
            }
        }
        panic!("ListVolumes never ended");
    }

    /// GET `path` over HTTP from `port` of host `host` (0: the
    /// controller's), from inside that host's namespace: the status line
    /// and the body.
    pub fn http_get(&self, host: usize, port: u16, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let h = self.net.host(host);
        let mut s = h.connect(h.addr(port), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: stowage\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }

    /// A call to node `i`'s agent API with the cluster (controller's)
    /// certificate, from the controller's namespace, as the controller
    /// makes it.
    pub fn as_controller<T: Send + 'static>(
        &self,
        i: usize,
        call: impl FnOnce(
            stowage::cluster::proto::replica_client::ReplicaClient<tonic::transport::Channel>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
        + Send,
    ) -> T {
        let tls = stowage::cluster::tls::TlsMaterial::load(&self.root.join("tls")).unwrap();
        let server = stowage::cluster::tls::ServerRole::Node(node_id(i));
        let to = self.net.host(i).agent_addr();
        self.net.host(0).run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let ch = stowage::cluster::tls::endpoint(&to.to_string())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(10))
                    .timeout(Duration::from_secs(10))
                    .connect_with_connector(tls.client_tls().unwrap().connector(server))
                    .await
                    .expect("connect to the agent");
                call(stowage::cluster::proto::replica_client::ReplicaClient::new(
                    ch,
                ))
                .await
            })
        })
    }

    /// Runs `stowage` (the client) against the controller's socket.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        self.client_command(args).output().unwrap()
    }

    /// `stowage` (the client) against the controller's socket, to run.
    pub fn client_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--endpoint")
            .arg(format!(
                "unix://{}",
                self.root.join("controller.sock").display()
            ))
            .args(args);
        c
    }
}

/// Makes an xfs filesystem of `bytes` in an image under `root` and mounts
/// it at `at` (created): a pool of node `name`'s own. The scratch
/// directory's cleanup unmounts it and detaches its loop device.
fn own_pool_fs(root: &Path, name: &str, at: &Path, bytes: u64) {
    let image = root.join(format!("pool-{name}.img"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let dev = LoopDevice::attach(&image, false).expect("attach a node's pool image");
    stowage::os::filesystem::make(&dev.path(), "xfs").expect("mkfs a node's pool");
    std::fs::create_dir_all(at).unwrap();
    let opts = stowage::os::mount::MountOptions::parse(&[""]).unwrap();
    stowage::os::mount::mount_filesystem(&dev.path(), at, "xfs", &opts)
        .expect("mount a node's pool");
    // Detach on last close: the mount keeps it alive until unmounted.
    let _ = dev.detach();
}

/// A volume staged and published on one node, as a CO leaves it.
pub struct Published {
    pub node: usize,
    pub staging: PathBuf,
    pub target: PathBuf,
    pub ctx: std::collections::HashMap<String, String>,
}

impl Published {
    /// ControllerPublish to node `i` (retried while ABORTED, see
    /// [`retry_aborted`]), then NodeStage and NodePublish there.
    pub async fn up(
        cl: &mut Cluster,
        i: usize,
        v: &csi::Volume,
        cap: &csi::VolumeCapability,
    ) -> Result<Published, tonic::Status> {
        let c = cl.c.controller.clone();
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node_id(i),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        let ctx = retry_aborted(|| {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.controller_publish_volume(req).await }
        })
        .await?
        .into_inner()
        .publish_context;
        let mut node = cl.node(i).await;
        let staging = cl.root.join(format!("stage-{}-n{i}", v.volume_id.len()));
        let target = cl.root.join(format!("pod-{}-n{i}", v.volume_id.len()));
        let _ = std::fs::create_dir(&staging);
        node.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        node.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        Ok(Published {
            node: i,
            staging,
            target,
            ctx,
        })
    }

    /// NodeUnpublish and NodeUnstage on the node, as the kubelet does.
    pub async fn node_down(&self, cl: &mut Cluster, volume_id: &str) {
        let mut node = cl.node(self.node).await;
        node.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_owned(),
                target_path: self.target.display().to_string(),
            })
            .await
            .unwrap();
        node.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.to_owned(),
                staging_target_path: self.staging.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("unstage: {e:?}\n{}", cl.nodes[self.node - 1].log_tail(30)));
    }

    /// [`Published::node_down`], then ControllerUnpublish (retried while
    /// ABORTED, see [`retry_aborted`]).
    pub async fn down(self, cl: &mut Cluster, volume_id: &str) {
        self.node_down(cl, volume_id).await;
        let c = cl.c.controller.clone();
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            node_id: node_id(self.node),
            ..Default::default()
        };
        retry_aborted(|| {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.controller_unpublish_volume(req).await }
        })
        .await
        .unwrap();
    }
}

/// The first sample of labelled metric `name` in a Prometheus text
/// exposition whose labels contain `label`.
fn sample(exposition: &str, name: &str, label: &str) -> Option<u64> {
    exposition
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Calls `call` again while it answers ABORTED, as a CO does: the
/// controller answers so while another call holds the volume, or when a
/// change of the volume's record met another one (a heal's, which runs in
/// the background); never for its round of repairs, which a call waits
/// for (`a_call_waits_for_the_round_of_repairs_instead_of_failing_aborted`).
/// Every 200 ms, at most 150 times (30 s); then the last answer.
pub async fn retry_aborted<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for _ in 1..150 {
        match call().await {
            Err(e) if e.code() == tonic::Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done => return done,
        }
    }
    call().await
}

pub fn wait_socket(socket: &Path, p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            p.is_running(),
            "server exited: {:?}\n{}",
            p.exit_status(),
            p.log_tail(40)
        );
        assert!(
            Instant::now() < deadline,
            "{} not up in 30 s:\n{}",
            socket.display(),
            p.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
    }
}

pub fn on(preferred: &[&str], requisite: &[&str]) -> Option<csi::TopologyRequirement> {
    Some(csi::TopologyRequirement {
        preferred: preferred.iter().map(|n| topo(n)).collect(),
        requisite: requisite.iter().map(|n| topo(n)).collect(),
    })
}

/// CreateVolume of a replicated volume of `replicas` copies of `bytes`.
pub fn replicated_req(
    name: &str,
    replicas: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: [
            ("backend".to_owned(), "replicated".to_owned()),
            ("replicas".to_owned(), replicas.to_owned()),
        ]
        .into(),
        ..Default::default()
    }
}

pub fn node_of(volume_id: &str) -> &str {
    volume_id.split(':').nth(1).unwrap()
}
