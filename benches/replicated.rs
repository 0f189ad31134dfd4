//! Replicated volumes (issue 14, "Figures"): what one, two and three
//! synchronous copies cost against a local block volume on the same disk,
//! how long publishing, staging and a copy's failure take, and how fast a
//! copy is rebuilt.
//!
//! Everything runs on this machine over loopback with mutual TLS (as
//! benches/cluster.rs does): a `serve --mode controller` and three node
//! agents `n1`..`n3` (`serve --mode node`), all with their state and pools
//! on one loop-mounted xfs filesystem in a scratch directory, so every
//! copy and the baseline share one disk. Volumes are raw block
//! (SINGLE_NODE_WRITER), published and staged on `n1` through CSI calls as
//! a CO makes them. Ten parts:
//!
//! 1. fio (`--direct=1`, io_uring by default, JSON output) on a local
//!    `backend=block` volume pinned to n1 (the baseline) and on
//!    `backend=replicated` volumes of 1, 2 and 3 copies created with
//!    `locality=best-effort` and n1 preferred (where the copies landed is
//!    read from the nodes' pools and printed). Jobs: sequential 1 MiB write
//!    and read (QD8 by default: `--seq-iodepth`), random 4 KiB write and
//!    read at QD1 and QD32. Every volume is written in full once first (no
//!    read of a hole). Each job runs on every volume back to back, the
//!    order rotating from round to round; the median of the rounds counts,
//!    the spread ((max − min) / median) shows the noise. Each figure is
//!    printed as MiB/s and IOPS and as % of local next to the issue's
//!    targets. Every copy's pool is on this one disk, so a write to N
//!    copies is N writes to it: each round of a write job also runs on the
//!    local volume and one, then two more local volumes of n1 at once
//!    (`local2`, `local3`, written only so), and what each of N got is the
//!    ceiling the disk leaves a write to N copies here, printed with the
//!    2- and 3-copy rows as "against local ×N at once".
//! 2. Publish and stage: ControllerPublish, NodeStage, NodeUnstage and
//!    ControllerUnpublish of a small 3-copy replicated volume (NodeStage
//!    starts its engine) and a small block volume, interleaved, medians
//!    over `--publish-repeats`. Then failover: a loop of 4 KiB O_DIRECT
//!    writes, each followed by fdatasync, runs back to back on the
//!    published 3-copy fio volume; after 5 s the agent of a copy other than
//!    n1 gets SIGKILL. The longest write+fsync that ends in the 3 s after
//!    the kill (the engine's call timeout is 2 s) is the gap, its end is
//!    when writes flow again; the longest in the 3 s before the kill is
//!    printed next to it as the noise, with a timeline per 250 ms.
//! 3. Dirty-region rebuild: with that agent still dead, 1 MiB writes at
//!    `--dirty-rate` MB/s for `--dirty-seconds` (the issue says 60 s at
//!    10 MB/s; the default here is 20 s), then the agent is started again
//!    and the time until ControllerGetVolume no longer reports the volume
//!    abnormal (every copy in sync) is measured. Bytes moved are the
//!    regions (1 MiB) written while it was away; where the condition
//!    message carries the engine's own count ("N MiB rebuilt") it is
//!    printed next to it.
//! 4. Full rebuild: a 3-copy volume of `--full-size` is written in full,
//!    the agent of one copy (not n1) is killed, a write marks it out of
//!    sync, the volume is unstaged and unpublished, the dead copy's bytes
//!    are wiped on disk (its `data` file truncated to a hole and its
//!    region tags zeroed: a copy whose data was lost, its record kept;
//!    `--no-wipe` skips this), the agent comes back, and the volume is
//!    published and staged on n1 again: a new engine finds the copy out of
//!    sync and rebuilds every region of it. Timed from NodeStage's return
//!    until every copy is in sync; afterwards the rebuilt copy's bytes are
//!    compared with n1's.
//! 5. Owner failover (run before the full rebuild): a 3-copy volume is
//!    published and staged on n2 and 1 MiB is written and fsynced; n2's
//!    agent gets SIGKILL, and the volume moves to n3 as a CO would move it
//!    (ControllerUnpublish from n2, ControllerPublish to n3, NodeStage and
//!    NodePublish there), each step timed until a first write + fsync on
//!    n3 returns (the CO's own detection of the dead node is not part of
//!    it); the 1 MiB is read back on n3, then n2 comes back and its stale
//!    publication and stage are removed.
//! 6. Snapshot stall (last; alone with `--only-snapshots`): a 3-copy
//!    volume `a` and a 2-copy volume `b` published on n1 with 64 MiB of
//!    data each; a loop of 4 KiB O_DIRECT write + fdatasync runs on `a`
//!    while, `--snapshot-rounds` times, a CreateSnapshot of `a` (the
//!    baseline) and a CreateVolumeGroupSnapshot of `a` and `b` are made
//!    700 ms apart. For each kind: the call's median time and the longest
//!    write that overlapped a call (median over rounds), their ratio, and
//!    the writes' median outside any call.
//! 7. Scrub cost (after the snapshots; alone with `--only-scrub`): a
//!    3-copy volume of `--size`
//!    on n1, written in full; each round runs `--scrub-jobs` (default
//!    seq-write, rand-write-qd1, rand-read-qd1) once with every agent on
//!    `--replica-scrub-every=0` (no scrub, the baseline) and once on
//!    `--replica-scrub-every=1` at `--scrub-rate` MiB/s (default 16, the
//!    agents' default), so a pass runs through every job; the order
//!    alternates from round to round, the volume is staged again after
//!    each restart. Printed: each job's median with and without, their
//!    ratio, and the rate the scrub reached meanwhile (regions checked, as
//!    the engine counts them, over the time).
//! 8. Heal cost (alone with `--only-heal`): the controller heals a
//!    volume nobody publishes (a copy out of sync is rebuilt by an engine
//!    with no mount), and the heal's disk and network traffic competes
//!    with the volumes in use. A 3-copy volume `a` of `--size` is
//!    published on n1 and written in full; a 2-copy volume `b` of
//!    `--heal-size` (default 2 GiB), written in full once, is not
//!    published. For each of `--heal-jobs` (default seq-write,
//!    rand-write-qd1), each round runs the job on `a` three ways, in an
//!    order rotating from round to round: with no heal (the baseline);
//!    during a heal of `b` at the controller's `--replica-heal-rate` of
//!    `--heal-rate` MiB/s (default 32, the controller's default); and
//!    during an unpaced heal (`--replica-heal-rate 0`). A heal is made by
//!    ControllerModifyVolume of `b` to 3 copies (a new copy, rebuilt in
//!    full); the job starts once the condition says it is healing, and
//!    the heal is timed until `b` is back in sync, then `b` goes back to 2
//!    copies. The controller runs with `--replica-replace-after 8` (a
//!    round every 2 s) and is restarted to change the rate. Printed: each
//!    job's median without and with each heal, their ratio, the rate each
//!    heal reached (the copy's size over its time), and whether the heal
//!    outlasted the job (else the ratio flatters it).
//! 9. Membership change (last; alone with `--only-members`): a 2-copy volume of
//!    `--size` published on n1 (its witness on a third node), written in
//!    full. Each round runs each of `--members-jobs` (default seq-write,
//!    rand-write-qd1) on a fresh publication (the baseline), then changes
//!    the volume's members twice with ControllerModifyVolume, to 3 copies
//!    (the witness becomes a copy, rebuilt by the engine) and back to 2,
//!    each time until every copy is in sync, then runs the job again on
//!    the same publication; then the volume is unstaged and staged again
//!    for the next. Printed: each job's median before and after, and their
//!    ratio. An engine that learns of new members must keep its data links
//!    to the copies that stay (writes after the change going over gRPC
//!    instead would show as a ratio well below 100 %).
//! 10. Drain (last; alone with `--only-drain`): what moving a volume off a
//!     draining node costs beyond rebuilding its new copy, with the
//!     controller's defaults (its round of repairs every 30 s, heals at
//!     32 MiB/s; the controller is restarted with them). Each round, for a
//!     volume of one copy of `--drain-size` (default 512 MiB) on n1, once
//!     staged on n1 (its engine rebuilds) and once nobody publishes it (a
//!     heal rebuilds): ControllerModifyVolume to 2 copies, timed until every
//!     copy is in sync (the baseline: the same rebuild with no drain), back
//!     to 1 copy (n1's stays), then `stowage node drain n1 --wait`, timed
//!     until it returns (a copy added elsewhere, rebuilt, n1's removed),
//!     and `uncordon`. Printed: the medians of both, and the drain's time
//!     over the rebuild's.
//!
//! Run as root (loop devices, FUSE, mounts), with fio installed:
//!
//!     cargo bench --bench replicated -- [--size 1Gi] [--runtime 10] [--rounds 2]
//!         [--ramp 1] [--seq-iodepth 8] [--ioengine io_uring|libaio]
//!         [--publish-repeats 5] [--dirty-seconds 20] [--dirty-rate 10]
//!         [--full-size 1Gi] [--no-wipe] [--skip-fio] [--json]
//!         [--replication-tls both|on|off] [--jobs seq-write,...] [--only-fio]
//!         [--fuse-workers N] [--snapshot-rounds 5] [--only-snapshots]
//!         [--only-scrub] [--scrub-rate 16] [--scrub-jobs seq-write,...]
//!         [--only-heal] [--heal-size 2Gi] [--heal-rate 32] [--heal-jobs seq-write,...]
//!         [--only-members] [--members-jobs seq-write,...]
//!         [--only-drain] [--drain-size 512Mi]
//!
//! With the defaults it takes about ten minutes (fio is 6 jobs × 4 volumes
//! × rounds × runtime, and 3 write jobs × 2 at-once runs × rounds ×
//! runtime), and the heal part about 3.5 minutes a round more (`--only-heal
//! --rounds 3`: 623 s). Nothing is asserted about timings: these 2-core
//! machines are noisy, the figures are reported. Processes are killed by
//! PID, mounts unmounted, loop devices detached and the scratch directory
//! removed when the bench ends, panics, or is interrupted with Ctrl-C.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::fio::{JOBS, Job, Measure, median as median_measure, median_bw, spread};

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Scratch;
use serde::Serialize;
use stowage::cluster::proto::ListNodesRequest;
use stowage::cluster::proto::admin_client::AdminClient;
use stowage::csi;
use stowage::csi::controller_client::ControllerClient;
use stowage::csi::group_controller_client::GroupControllerClient;
use stowage::csi::node_client::NodeClient;
use stowage::volume::TOPOLOGY_NODE_KEY;
use support::Args;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
/// A replicated volume's region (src/backend/replicated: REGION_BYTES).
const REGION: u64 = 1 << 20;
const NODES: usize = 3;

/// The stowage binary the bench runs: a copy taken when the cluster
/// starts (the build's own may be replaced meanwhile by another build in
/// the same target directory).
static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn bin() -> &'static Path {
    BIN.get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new(env!("CARGO_BIN_EXE_stowage")))
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
    fn new(name: &str, args: Vec<String>, socket: &Path, logs: &Path) -> Proc {
        Proc {
            name: name.to_owned(),
            args,
            socket: socket.to_owned(),
            log: logs.join(format!("{name}.log")),
            child: None,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        // A killed server leaves its socket file: remove it so that
        // `wait_socket` waits for the new one.
        let _ = std::fs::remove_file(&self.socket);
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
                panic!("{} exited with {st}:\n{}", self.name, self.log_tail(30));
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen within 30 s:\n{}",
                self.name,
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as an operator's restart sends, and at most 30 s for it
    /// to exit; then SIGKILL.
    fn terminate(&mut self) {
        let Some(c) = self.child.as_mut() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} ignored SIGTERM for 30 s: SIGKILL", self.name);
        self.kill9();
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
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

// ------------------------------------------------------------ the cluster

fn node_id(i: usize) -> String {
    format!("n{i}")
}

/// Field order is drop order: every process stops before the pool goes.
struct Cluster {
    controller: Proc,
    nodes: Vec<Proc>,
    ctl: ControllerClient<Channel>,
    group: GroupControllerClient<Channel>,
    root: PathBuf,
    pool_fs: PathBuf,
    /// The agents run with replication TLS on (the default).
    replication_tls: bool,
    _scratch: Scratch,
}

impl Cluster {
    /// `node_args` are added to every agent's command line.
    async fn start(pool_bytes: u64, node_args: &[String]) -> Cluster {
        let scratch = Scratch::new("bench-replicated");
        let root = scratch.root.clone();
        let copy = root.join("stowage");
        std::fs::copy(bin(), &copy).expect("copy the stowage binary");
        let _ = BIN.set(copy);
        let pool_fs = common::make_pool_fs(&scratch, "xfs", pool_bytes);
        let out = Command::new(bin())
            .args(["cluster", "init"])
            .arg(root.join("tls"))
            .output()
            .unwrap();
        assert!(out.status.success(), "stowage cluster init: {out:?}");
        let logs = root.join("logs");
        std::fs::create_dir(&logs).unwrap();
        let ports = free_ports(NODES + 1);
        let tls = root.join("tls").display().to_string();
        let mut controller = Proc::new(
            "controller",
            vec![
                "serve".into(),
                "--mode".into(),
                "controller".into(),
                "--endpoint".into(),
                format!("unix://{}", root.join("controller.sock").display()),
                "--listen".into(),
                format!("127.0.0.1:{}", ports[0]),
                "--tls-dir".into(),
                tls.clone(),
            ],
            &root.join("controller.sock"),
            &logs,
        );
        controller.spawn();
        controller.wait_socket();
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let socket = root.join(format!("n{i}.sock"));
            let mut p = Proc::new(
                &node_id(i),
                vec![
                    "serve".into(),
                    "--mode".into(),
                    "node".into(),
                    "--node-id".into(),
                    node_id(i),
                    "--endpoint".into(),
                    format!("unix://{}", socket.display()),
                    "--state-dir".into(),
                    pool_fs.join(node_id(i)).display().to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", ports[i]),
                    "--controller".into(),
                    format!("https://127.0.0.1:{}", ports[0]),
                    "--tls-dir".into(),
                    tls.clone(),
                    "--register-interval".into(),
                    "1".into(),
                ]
                .into_iter()
                .chain(node_args.iter().cloned())
                .collect(),
                &socket,
                &logs,
            );
            p.spawn();
            nodes.push(p);
        }
        for n in &mut nodes {
            n.wait_socket();
        }
        let channel = support::connect(&format!(
            "unix://{}",
            root.join("controller.sock").display()
        ))
        .await;
        let ctl = ControllerClient::new(channel.clone());
        let group = GroupControllerClient::new(channel);
        let mut cl = Cluster {
            controller,
            nodes,
            ctl,
            group,
            root,
            pool_fs,
            replication_tls: true,
            _scratch: scratch,
        };
        cl.wait_fresh(&(1..=NODES).collect::<Vec<_>>()).await;
        cl
    }

    async fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(
            support::connect(&format!(
                "unix://{}",
                self.root.join(format!("n{i}.sock")).display()
            ))
            .await,
        )
    }

    /// Waits (bounded) until the nodes `which` are registered and fresh.
    async fn wait_fresh(&mut self, which: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ids: Vec<String> = which.iter().map(|&i| node_id(i)).collect();
        loop {
            if let Ok(ch) = stowage::client::channel(&format!(
                "unix://{}",
                self.root.join("controller.sock").display()
            ))
            .await
                && let Ok(r) = AdminClient::new(ch).list_nodes(ListNodesRequest {}).await
            {
                let nodes = r.into_inner().nodes;
                if ids
                    .iter()
                    .all(|id| nodes.iter().any(|n| &n.node_id == id && n.fresh))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} not all fresh within 60 s:\n{}",
                self.controller.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts every node agent with `--replication-tls` `on` or `off`
    /// (no volume may be staged meanwhile) and waits until all are fresh.
    /// The restart is graceful (SIGTERM): the copies close clean and keep
    /// their boots, so no volume is rebuilt after it.
    async fn set_replication_tls(&mut self, on: bool) {
        const OFF: &str = "--replication-tls=off";
        for n in &mut self.nodes {
            n.terminate();
            n.args.retain(|a| a != OFF);
            if !on {
                n.args.push(OFF.into());
            }
            n.spawn();
        }
        for n in &mut self.nodes {
            n.wait_socket();
        }
        self.replication_tls = on;
        self.wait_fresh(&(1..=NODES).collect::<Vec<_>>()).await;
    }

    /// Restarts every node agent with `--NAME=VALUE` in place of any
    /// earlier value of that flag, gracefully as
    /// [`Cluster::set_replication_tls`] does.
    async fn set_node_flag(&mut self, name: &str, value: &str) {
        let prefix = format!("{name}=");
        for n in &mut self.nodes {
            n.terminate();
            n.args.retain(|a| !a.starts_with(&prefix));
            n.args.push(format!("{prefix}{value}"));
            n.spawn();
        }
        for n in &mut self.nodes {
            n.wait_socket();
        }
        self.wait_fresh(&(1..=NODES).collect::<Vec<_>>()).await;
    }

    /// Restarts the controller with `--NAME=VALUE` in place of any earlier
    /// value of that flag (it is stateless: the nodes register again
    /// within a second) and waits until every node is fresh.
    async fn set_controller_flag(&mut self, name: &str, value: &str) {
        let prefix = format!("{name}=");
        self.controller.terminate();
        self.controller.args.retain(|a| !a.starts_with(&prefix));
        self.controller.args.push(format!("{prefix}{value}"));
        self.controller.spawn();
        self.controller.wait_socket();
        let channel = support::connect(&format!(
            "unix://{}",
            self.root.join("controller.sock").display()
        ))
        .await;
        self.ctl = ControllerClient::new(channel.clone());
        self.group = GroupControllerClient::new(channel);
        self.wait_fresh(&(1..=NODES).collect::<Vec<_>>()).await;
    }

    /// The directory of node `i`'s member of a replicated volume.
    fn member_dir(&self, i: usize, volume_id: &str) -> PathBuf {
        let hex = volume_id.strip_prefix("replicated:").expect("replicated");
        self.pool_fs
            .join(node_id(i))
            .join("pool/replicas")
            .join(hex)
    }

    /// Where a replicated volume's members are: "n1 n2 (witness n3)".
    fn placement(&self, volume_id: &str) -> String {
        let (mut copies, mut witnesses) = (Vec::new(), Vec::new());
        for i in 1..=NODES {
            let d = self.member_dir(i, volume_id);
            if d.join("data").exists() {
                copies.push(node_id(i));
            } else if d.exists() {
                witnesses.push(node_id(i));
            }
        }
        let mut s = format!("copies on {}", copies.join(", "));
        if !witnesses.is_empty() {
            s += &format!(" (witness on {})", witnesses.join(", "));
        }
        s
    }

    /// Nodes holding a copy (with data) of a replicated volume.
    fn copy_nodes(&self, volume_id: &str) -> Vec<usize> {
        (1..=NODES)
            .filter(|&i| self.member_dir(i, volume_id).join("data").exists())
            .collect()
    }

    /// The volume's condition as the controller reads it from the copies'
    /// records: (abnormal, message).
    async fn condition(&mut self, volume_id: &str) -> Result<(bool, String), tonic::Status> {
        let r = self
            .ctl
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: volume_id.to_owned(),
            })
            .await?
            .into_inner();
        let c = r
            .status
            .and_then(|s| s.volume_condition)
            .unwrap_or_default();
        Ok((c.abnormal, c.message))
    }

    /// Polls the condition every 50 ms until it is `abnormal` (bounded);
    /// returns when it was first seen so, and the last message.
    async fn wait_condition(
        &mut self,
        volume_id: &str,
        abnormal: bool,
        within: Duration,
    ) -> Result<(Instant, String), String> {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.condition(volume_id).await {
                Ok((a, msg)) if a == abnormal => return Ok((Instant::now(), msg)),
                Ok((_, msg)) => msg,
                Err(e) => format!("ControllerGetVolume: {e}"),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "volume condition not abnormal={abnormal} within {within:?}; last: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
    }
}

fn raw_block() -> csi::VolumeCapability {
    common::block_cap(common::Mode::SingleNodeWriter)
}

/// CreateVolume of a local block volume on n1 (`replicas` None) or a
/// replicated one with one copy preferably on n1.
fn create_request(name: &str, size: u64, replicas: Option<usize>) -> csi::CreateVolumeRequest {
    let parameters: HashMap<String, String> = match replicas {
        None => [("backend", "block"), ("node", "n1")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
        Some(n) => [
            ("backend".to_owned(), "replicated".to_owned()),
            ("replicas".to_owned(), n.to_string()),
            ("locality".to_owned(), "best-effort".to_owned()),
        ]
        .into(),
    };
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![raw_block()],
        parameters,
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: Vec::new(),
            preferred: vec![topo("n1")],
        }),
        ..Default::default()
    }
}

/// A raw block volume as the bench uses it.
#[derive(Debug, Clone)]
struct Vol {
    label: String,
    volume: csi::Volume,
    staging: PathBuf,
    target: PathBuf,
    /// Staged and published on n1.
    up: bool,
}

impl Vol {
    fn id(&self) -> &str {
        &self.volume.volume_id
    }
}

/// How long each step of bringing a volume up took.
#[derive(Debug, Clone, Copy, Default)]
struct UpTimes {
    controller_publish: Duration,
    node_stage: Duration,
    node_publish: Duration,
}

async fn create(cl: &mut Cluster, label: &str, size: u64, replicas: Option<usize>) -> Vol {
    let volume = cl
        .ctl
        .create_volume(create_request(label, size, replicas))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateVolume {label}: {e:?}\n{}",
                cl.controller.log_tail(30)
            )
        })
        .into_inner()
        .volume
        .expect("a volume");
    let work = cl.root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    Vol {
        label: label.to_owned(),
        volume,
        staging: work.join(format!("{label}-staging")),
        target: work.join(format!("{label}-target")),
        up: false,
    }
}

/// ControllerPublish + NodeStage (+ NodePublish when `publish`) on n1,
/// each timed.
async fn up(cl: &mut Cluster, v: &mut Vol, publish: bool) -> Result<UpTimes, String> {
    up_on(cl, v, 1, publish).await
}

/// [`up`] on node `i`.
async fn up_on(cl: &mut Cluster, v: &mut Vol, i: usize, publish: bool) -> Result<UpTimes, String> {
    let mut t = UpTimes::default();
    let start = Instant::now();
    let ctx = cl
        .ctl
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: v.id().to_owned(),
            node_id: node_id(i),
            volume_capability: Some(raw_block()),
            volume_context: v.volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("ControllerPublish {}: {e:?}", v.label))?
        .into_inner()
        .publish_context;
    t.controller_publish = start.elapsed();
    std::fs::create_dir_all(&v.staging).unwrap();
    let mut node = cl.node(i).await;
    let start = Instant::now();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.id().to_owned(),
        publish_context: ctx.clone(),
        staging_target_path: v.staging.display().to_string(),
        volume_capability: Some(raw_block()),
        volume_context: v.volume.volume_context.clone(),
        ..Default::default()
    })
    .await
    .map_err(|e| {
        format!(
            "NodeStage {}: {e:?}\n{}",
            v.label,
            cl.nodes[i - 1].log_tail(30)
        )
    })?;
    t.node_stage = start.elapsed();
    if publish {
        let start = Instant::now();
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.id().to_owned(),
            publish_context: ctx,
            staging_target_path: v.staging.display().to_string(),
            target_path: v.target.display().to_string(),
            volume_capability: Some(raw_block()),
            volume_context: v.volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("NodePublish {}: {e:?}", v.label))?;
        t.node_publish = start.elapsed();
        v.up = true;
    }
    Ok(t)
}

/// How long each step of taking a volume down took.
#[derive(Debug, Clone, Copy, Default)]
struct DownTimes {
    node_unstage: Duration,
    controller_unpublish: Duration,
}

/// [NodeUnpublish +] NodeUnstage + ControllerUnpublish on n1.
async fn down(cl: &mut Cluster, v: &mut Vol) -> Result<DownTimes, String> {
    down_on(cl, v, 1).await
}

/// [`down`] on node `i`.
async fn down_on(cl: &mut Cluster, v: &mut Vol, i: usize) -> Result<DownTimes, String> {
    let mut t = DownTimes::default();
    let mut node = cl.node(i).await;
    if v.up {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.id().to_owned(),
            target_path: v.target.display().to_string(),
        })
        .await
        .map_err(|e| format!("NodeUnpublish {}: {e:?}", v.label))?;
        v.up = false;
    }
    let start = Instant::now();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.id().to_owned(),
        staging_target_path: v.staging.display().to_string(),
    })
    .await
    .map_err(|e| {
        format!(
            "NodeUnstage {}: {e:?}\n{}",
            v.label,
            cl.nodes[i - 1].log_tail(30)
        )
    })?;
    t.node_unstage = start.elapsed();
    let start = Instant::now();
    cl.ctl
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.id().to_owned(),
            node_id: node_id(i),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("ControllerUnpublish {}: {e:?}", v.label))?;
    t.controller_unpublish = start.elapsed();
    Ok(t)
}

/// Takes a volume down and deletes it; failures are printed, not fatal
/// (the scratch teardown removes what is left).
async fn remove(cl: &mut Cluster, mut v: Vol) {
    if let Err(e) = down(cl, &mut v).await {
        eprintln!("teardown of {}: {e}", v.label);
        return;
    }
    if let Err(e) = cl
        .ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.id().to_owned(),
            ..Default::default()
        })
        .await
    {
        eprintln!("DeleteVolume {}: {e:?}", v.label);
    }
}

/// The loop device behind a published raw block target, described from
/// sysfs: "loop3 dio=1".
fn describe_device(target: &Path) -> String {
    let Ok(md) = std::fs::metadata(target) else {
        return "?".into();
    };
    let rdev = md.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let name = std::fs::read_link(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("{major}:{minor}"));
    let dio = std::fs::read_to_string(sys.join("loop/dio"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!("{name} dio={dio}")
}

// ------------------------------------------------------------ fio

/// The issue's target (fraction of local) for `copies` copies and a job;
/// None where the issue sets none.
fn target(copies: usize, job: &str) -> Option<f64> {
    let read_or_one = |job: &str| match job {
        "seq-write" | "seq-read" => Some(0.85),
        "rand-write-qd32" | "rand-read-qd32" => Some(0.50),
        _ => None,
    };
    match (copies, job) {
        (1, j) => read_or_one(j),
        (3, "seq-write") => Some(0.50),
        (3, "rand-write-qd1") => Some(0.50),
        (3, "rand-write-qd32") => Some(0.23),
        (3, j) if j.contains("read") => read_or_one(j),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize)]
struct FioConfig {
    ioengine: String,
    runtime_s: u64,
    ramp_s: u64,
    size_bytes: u64,
    seq_iodepth: u32,
    rounds: usize,
    /// Only these jobs (`--jobs a,b`; empty: all).
    jobs: Vec<String>,
}

/// A fio process, killed by PID when dropped (an interrupted bench).
struct FioChild(Option<Child>);

impl Drop for FioChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs fio with `args` (JSON output to a file) and parses the JSON.
async fn fio(args: &[String], out: &Path) -> Result<serde_json::Value, String> {
    let child = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run fio: {e}"))?;
    let mut guard = FioChild(Some(child));
    let status = loop {
        if let Some(st) = guard
            .0
            .as_mut()
            .unwrap()
            .try_wait()
            .map_err(|e| e.to_string())?
        {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let child = guard.0.take().unwrap();
    let res = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(out).unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "fio {} failed ({status}): {}{}{text}",
            args.join(" "),
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    let start = text
        .find('{')
        .ok_or_else(|| format!("no JSON from fio: {text}"))?;
    serde_json::from_str(&text[start..]).map_err(|e| format!("parse fio JSON: {e}: {text}"))
}

fn fio_common(cfg: &FioConfig, device: &Path) -> Vec<String> {
    vec![
        format!("--filename={}", device.display()),
        format!("--size={}", cfg.size_bytes),
        format!("--ioengine={}", cfg.ioengine),
        "--direct=1".into(),
        "--numjobs=1".into(),
        "--randrepeat=0".into(),
        "--norandommap".into(),
    ]
}

/// Writes the whole device once (1 MiB, QD8) so no read is of a hole.
async fn prefill(cfg: &FioConfig, device: &Path, out: &Path) -> Result<Duration, String> {
    let mut args = fio_common(cfg, device);
    args.extend([
        "--name=prefill".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        "--end_fsync=1".into(),
    ]);
    let t = Instant::now();
    fio(&args, out).await?;
    Ok(t.elapsed())
}

/// `job`'s shape and length, for fio's command line.
fn job_args(cfg: &FioConfig, job: &Job) -> [String; 6] {
    let iodepth = if job.iodepth == 0 {
        cfg.seq_iodepth
    } else {
        job.iodepth
    };
    [
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={iodepth}"),
        "--time_based".into(),
        format!("--runtime={}", cfg.runtime_s),
        format!("--ramp_time={}", cfg.ramp_s),
    ]
}

async fn run_job(cfg: &FioConfig, job: &Job, device: &Path, out: &Path) -> Result<Measure, String> {
    let mut args = fio_common(cfg, device);
    args.push(format!("--name={}", job.name));
    args.extend(job_args(cfg, job));
    let v = fio(&args, out).await?;
    Measure::from_fio(&v, job.read)
        .ok_or_else(|| format!("fio {} on {}: no I/O measured", job.name, device.display()))
}

/// `job` on every one of `devices` at once (one fio process, a job per
/// device, started together): the mean of what each got.
async fn run_job_at_once(
    cfg: &FioConfig,
    job: &Job,
    devices: &[&Path],
    out: &Path,
) -> Result<f64, String> {
    // The options before the first --name apply to every job; each job
    // then names its own device.
    let mut args: Vec<String> = fio_common(cfg, devices[0])
        .into_iter()
        .filter(|a| !a.starts_with("--filename="))
        .collect();
    args.extend(job_args(cfg, job));
    for (k, d) in devices.iter().enumerate() {
        args.push(format!("--name={}-{k}", job.name));
        args.push(format!("--filename={}", d.display()));
    }
    let v = fio(&args, out).await?;
    let mut sum = 0.0;
    for (k, d) in devices.iter().enumerate() {
        let m = Measure::from_fio_job(&v, k, job.read).ok_or_else(|| {
            format!(
                "fio {} at once on {}: no I/O measured",
                job.name,
                d.display()
            )
        })?;
        sum += m.bw_kib_s;
    }
    Ok(sum / devices.len() as f64)
}

#[derive(Debug, Serialize)]
struct FioRow {
    volume: String,
    copies: usize,
    #[serde(flatten)]
    measure: Measure,
    /// Each round's bandwidth, KiB/s.
    rounds_kib_s: Vec<f64>,
    /// Bandwidth / the local volume's bandwidth (medians).
    of_local: f64,
    /// Bandwidth / what each of as many local volumes as this one has
    /// copies got written at once (write jobs, 2 and 3 copies): how near
    /// the volume came to what the one disk under every copy allows.
    of_ceiling: Option<f64>,
    spread: f64,
    target: Option<f64>,
    met: Option<bool>,
}

/// A write job on `volumes` local volumes of one pool at once: what a
/// write to that many copies can reach when every copy is on this one
/// disk (each copy's bytes are one more write to it).
#[derive(Debug, Serialize)]
struct AtOnce {
    volumes: usize,
    /// Each round: the mean of the volumes' bandwidths, KiB/s.
    rounds_kib_s: Vec<f64>,
    /// The median of the rounds, KiB/s.
    per_volume_kib_s: f64,
    /// `per_volume_kib_s` / the local volume's bandwidth alone.
    of_local: f64,
}

#[derive(Debug, Serialize)]
struct FioJob {
    job: &'static str,
    iodepth: u32,
    rows: Vec<FioRow>,
    /// Write jobs: the local volume and more local volumes written at once.
    at_once: Vec<AtOnce>,
}

#[derive(Debug, Serialize)]
struct FioVolume {
    label: String,
    copies: usize,
    placement: String,
    device: String,
    controller_publish_ms: f64,
    node_stage_ms: f64,
    prefill_mib_s: f64,
}

#[derive(Debug, Serialize)]
struct FioReport {
    config: FioConfig,
    volumes: Vec<FioVolume>,
    jobs: Vec<FioJob>,
}

/// The fio volumes: "local" (block on n1), "local2" and "local3" (block
/// on n1, written only at once with "local": see [`AtOnce`]), then
/// "rep1".."rep3".
async fn fio_volumes(cl: &mut Cluster, size: u64) -> Vec<(Vol, usize, UpTimes)> {
    let mut out = Vec::new();
    for (label, replicas) in [
        ("local", None),
        ("local2", None),
        ("local3", None),
        ("rep1", Some(1)),
        ("rep2", Some(2)),
        ("rep3", Some(3)),
    ] {
        let mut v = create(cl, label, size, replicas).await;
        let t = up(cl, &mut v, true).await.unwrap_or_else(|e| panic!("{e}"));
        out.push((v, replicas.unwrap_or(0), t));
    }
    out
}

/// Writes every dirty page of the machine back and waits for it.
async fn settle() {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
}

/// Waits (bounded) until every copy of replicated volume `v` is in sync,
/// saying why and for how long when one was not.
async fn in_sync(cl: &mut Cluster, v: &Vol) -> Result<(), String> {
    let (abnormal, msg) = cl.condition(v.id()).await.map_err(|e| e.to_string())?;
    if abnormal {
        eprintln!("  {} is not in sync before its job: {msg}", v.label);
        let start = Instant::now();
        cl.wait_condition(v.id(), false, Duration::from_secs(600))
            .await?;
        eprintln!("  {} in sync after {:?}", v.label, start.elapsed());
    }
    Ok(())
}

/// fio on `all` (the first is the baseline): prefilled first when
/// `prefill_first` (else they were, in an earlier pass), `cfg.jobs` only. The
/// local volumes after the first are written only at once with it (write
/// jobs: [`AtOnce`]), as many as the most copies of a volume in `all`.
async fn fio_part(
    cl: &mut Cluster,
    cfg: &FioConfig,
    all: &[&(Vol, usize, UpTimes)],
    prefill_first: bool,
) -> Result<FioReport, String> {
    let out = cl.root.join("fio.json");
    let (partners, vols): (Vec<_>, Vec<_>) = all
        .iter()
        .enumerate()
        .partition(|&(k, (_, copies, _))| k > 0 && *copies == 0);
    let partners: Vec<&Vol> = partners.into_iter().map(|(_, (v, _, _))| v).collect();
    let vols: Vec<&(Vol, usize, UpTimes)> = vols.into_iter().map(|(_, &v)| v).collect();
    let most_copies = vols.iter().map(|(_, c, _)| *c).max().unwrap_or(0);
    let mut volumes = Vec::new();
    for &(v, copies, t) in all {
        let took = if prefill_first {
            eprintln!("prefill {} ({} MiB)", v.label, cfg.size_bytes / MIB);
            prefill(cfg, &v.target, &out).await?
        } else {
            Duration::ZERO
        };
        volumes.push(FioVolume {
            label: v.label.clone(),
            copies: *copies,
            placement: if *copies == 0 {
                "block volume on n1".into()
            } else {
                cl.placement(v.id())
            },
            device: describe_device(&v.target),
            controller_publish_ms: ms(t.controller_publish),
            node_stage_ms: ms(t.node_stage),
            prefill_mib_s: if took.is_zero() {
                0.0
            } else {
                cfg.size_bytes as f64 / MIB as f64 / took.as_secs_f64()
            },
        });
    }
    let mut jobs = Vec::new();
    for (i, job) in JOBS.iter().enumerate() {
        if !cfg.jobs.is_empty() && !cfg.jobs.iter().any(|j| j == job.name) {
            continue;
        }
        let mut runs: Vec<Vec<Measure>> = vec![Vec::new(); vols.len()];
        // [k]: k + 2 local volumes at once, a bandwidth per round.
        let mut at_once_runs: Vec<Vec<f64>> = vec![Vec::new(); partners.len()];
        for round in 0..cfg.rounds {
            // Rotate so that no volume always runs first.
            for k in 0..vols.len() {
                let at = (i + round + k) % vols.len();
                let v = &vols[at].0;
                eprintln!(
                    "job {} round {}: {}{}",
                    job.name,
                    round + 1,
                    v.label,
                    if cl.replication_tls {
                        ""
                    } else {
                        " (plaintext)"
                    }
                );
                // No run inherits the one before's dirty pages: copies
                // write through their nodes' page cache, and with every
                // pool on one disk the last run's writeback would land on
                // this one (the local volume's too).
                settle().await;
                // Nor a rebuild: a copy out of sync (a restart, a write
                // that timed out) is rebuilt first, and the log says so.
                if vols[at].1 > 0 {
                    in_sync(cl, v).await?;
                }
                runs[at].push(run_job(cfg, job, &v.target, &out).await?);
            }
            // The one disk's share: the local volume written at once with
            // 1, then 2 more (as many as the copies measured above).
            // (Write jobs: a read takes nothing from the other copies.)
            let n_max = if job.read {
                1
            } else {
                (1 + partners.len()).min(most_copies)
            };
            for (n, rounds) in (2..=n_max).zip(at_once_runs.iter_mut()) {
                eprintln!(
                    "job {} round {}: {n} local volumes at once",
                    job.name,
                    round + 1
                );
                settle().await;
                let devices: Vec<&Path> = std::iter::once(&vols[0].0)
                    .chain(partners.iter().copied())
                    .take(n)
                    .map(|v| v.target.as_path())
                    .collect();
                rounds.push(run_job_at_once(cfg, job, &devices, &out).await?);
            }
        }
        let base = median_measure(&runs[0]).bw_kib_s;
        let at_once: Vec<AtOnce> = at_once_runs
            .into_iter()
            .zip(2..)
            .filter(|(r, _)| !r.is_empty())
            .map(|(rounds_kib_s, volumes)| {
                let per_volume_kib_s = median_bw(&rounds_kib_s);
                AtOnce {
                    volumes,
                    rounds_kib_s,
                    per_volume_kib_s,
                    of_local: per_volume_kib_s / base,
                }
            })
            .collect();
        let rows = vols
            .iter()
            .zip(&runs)
            .map(|((v, copies, _), r)| {
                let m = median_measure(r);
                let of_local = m.bw_kib_s / base;
                let target = target(*copies, job.name);
                FioRow {
                    volume: v.label.clone(),
                    copies: *copies,
                    measure: m,
                    rounds_kib_s: r.iter().map(|m| m.bw_kib_s).collect(),
                    of_local,
                    of_ceiling: at_once
                        .iter()
                        .find(|a| a.volumes == *copies)
                        .map(|a| m.bw_kib_s / a.per_volume_kib_s),
                    spread: spread(r),
                    target,
                    met: target.map(|t| of_local >= t),
                }
            })
            .collect();
        jobs.push(FioJob {
            job: job.name,
            iodepth: if job.iodepth == 0 {
                cfg.seq_iodepth
            } else {
                job.iodepth
            },
            rows,
            at_once,
        });
    }
    Ok(FioReport {
        config: cfg.clone(),
        volumes,
        jobs,
    })
}

// ------------------------------------------------------------ scrub cost

#[derive(Debug, Serialize)]
struct ScrubJob {
    job: &'static str,
    without: Measure,
    with: Measure,
    spread_without: f64,
    spread_with: f64,
    /// Regions the engine checked during the runs with a scrub, per second.
    scrub_mib_s: f64,
}

#[derive(Debug, Serialize)]
struct ScrubReport {
    setup: String,
    rounds: usize,
    rate_mib_s: u64,
    jobs: Vec<ScrubJob>,
}

/// The regions the engine says it checked ("scrub: N passes, M MiB
/// checked" in the volume's condition).
fn scrubbed_mib(message: &str) -> Option<u64> {
    let at = message.find(" passes, ")? + " passes, ".len();
    message[at..].split(' ').next()?.parse().ok()
}

/// A new replicated volume of `size` with `replicas` copies, published on
/// n1 and written in full (fio's output to `out`).
async fn prefilled(
    cl: &mut Cluster,
    cfg: &FioConfig,
    label: &str,
    size: u64,
    replicas: usize,
    out: &Path,
) -> Result<Vol, String> {
    let mut v = create(cl, label, size, Some(replicas)).await;
    up(cl, &mut v, true).await?;
    eprintln!("prefill {} ({} MiB)", v.label, size / MIB);
    let cfg = FioConfig {
        size_bytes: size,
        ..cfg.clone()
    };
    prefill(&cfg, &v.target, out).await?;
    Ok(v)
}

/// The jobs named in `jobs` (the value of `flag`); an error when none is.
fn pick_jobs(jobs: &[String], flag: &str) -> Result<Vec<&'static Job>, String> {
    let picked: Vec<&'static Job> = JOBS
        .iter()
        .filter(|j| jobs.iter().any(|n| n == j.name))
        .collect();
    if picked.is_empty() {
        return Err(format!("{flag} {jobs:?}: no such job"));
    }
    Ok(picked)
}

/// See the module documentation, part 7.
async fn scrub_part(
    cl: &mut Cluster,
    cfg: &FioConfig,
    jobs: &[String],
    rate: u64,
) -> Result<ScrubReport, String> {
    let out = cl.root.join("fio.json");
    let mut v = prefilled(cl, cfg, "rep3-scrub", cfg.size_bytes, 3, &out).await?;
    let setup = format!(
        "a 3-copy volume of {} MiB on n1 ({})",
        cfg.size_bytes / MIB,
        cl.placement(v.id())
    );
    let picked = pick_jobs(jobs, "--scrub-jobs")?;
    // [job][with scrub]: the rounds' measures, and (with) the MiB checked
    // and the seconds they took.
    let mut runs: Vec<[Vec<Measure>; 2]> = vec![[Vec::new(), Vec::new()]; picked.len()];
    let mut checked: Vec<(u64, f64)> = vec![(0, 0.0); picked.len()];
    for round in 0..cfg.rounds {
        for k in 0..2 {
            let with = (round + k) % 2 == 1;
            down(cl, &mut v).await?;
            eprintln!(
                "round {}: agents {} a scrub",
                round + 1,
                if with { "with" } else { "without" }
            );
            cl.set_node_flag("--replica-scrub-every", if with { "1" } else { "0" })
                .await;
            cl.set_node_flag("--replica-scrub-rate", &rate.to_string())
                .await;
            up(cl, &mut v, true).await?;
            in_sync(cl, &v).await?;
            // The first pass starts within 1 s of the engine's start.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            for (j, job) in picked.iter().enumerate() {
                settle().await;
                let before = cl.condition(v.id()).await.map_err(|e| e.to_string())?;
                let t = Instant::now();
                runs[j][usize::from(with)].push(run_job(cfg, job, &v.target, &out).await?);
                let after = cl.condition(v.id()).await.map_err(|e| e.to_string())?;
                if with {
                    let (Some(a), Some(b)) = (scrubbed_mib(&before.1), scrubbed_mib(&after.1))
                    else {
                        return Err(format!("no scrub count in the condition: {}", after.1));
                    };
                    checked[j].0 += b - a;
                    checked[j].1 += t.elapsed().as_secs_f64();
                }
            }
        }
    }
    remove(cl, v).await;
    let jobs = picked
        .iter()
        .zip(runs)
        .zip(checked)
        .map(|((job, [without, with]), (mib, secs))| ScrubJob {
            job: job.name,
            without: median_measure(&without),
            with: median_measure(&with),
            spread_without: spread(&without),
            spread_with: spread(&with),
            scrub_mib_s: mib as f64 / secs.max(f64::MIN_POSITIVE),
        })
        .collect();
    Ok(ScrubReport {
        setup,
        rounds: cfg.rounds,
        rate_mib_s: rate,
        jobs,
    })
}

#[derive(Debug, Serialize)]
struct HealRun {
    /// The job's median during these heals.
    with: Measure,
    spread: f64,
    /// The median rate the heals reached (MiB/s).
    heal_mib_s: f64,
    /// Rounds whose heal ended before the job did.
    ended_early: usize,
}

#[derive(Debug, Serialize)]
struct HealJob {
    job: &'static str,
    without: Measure,
    spread_without: f64,
    paced: HealRun,
    unpaced: HealRun,
}

#[derive(Debug, Serialize)]
struct HealReport {
    setup: String,
    rounds: usize,
    rate_mib_s: u64,
    jobs: Vec<HealJob>,
}

/// `b`'s copies set to `replicas` by ControllerModifyVolume.
async fn set_replicas(cl: &mut Cluster, b: &Vol, replicas: usize) -> Result<(), String> {
    cl.ctl
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: b.id().to_owned(),
            mutable_parameters: [("replicas".to_owned(), replicas.to_string())].into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "ControllerModifyVolume {} to {replicas} copies: {e:?}",
                b.label
            )
        })
}

/// Polls (every 50 ms, bounded) until `volume_id`'s condition says a heal
/// runs (`healing`) or not.
async fn wait_healing(cl: &mut Cluster, volume_id: &str, healing: bool) -> Result<Instant, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, msg) = cl.condition(volume_id).await.map_err(|e| e.to_string())?;
        if msg.contains("healing on") == healing {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(format!("healing={healing} not within 60 s; last: {msg}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// See the module documentation, part 8.
async fn heal_part(
    cl: &mut Cluster,
    cfg: &FioConfig,
    jobs: &[String],
    heal_size: u64,
    rate: u64,
) -> Result<HealReport, String> {
    let out = cl.root.join("fio.json");
    cl.set_controller_flag("--replica-replace-after", "8").await;
    let mut b = prefilled(cl, cfg, "rep2-heal", heal_size, 2, &out).await?;
    down(cl, &mut b).await?;
    let a = prefilled(cl, cfg, "rep3-heal", cfg.size_bytes, 3, &out).await?;
    let setup = format!(
        "a 3-copy volume of {} MiB on n1 ({}); the heal of a new copy of a 2-copy volume of {} MiB nobody publishes ({})",
        cfg.size_bytes / MIB,
        cl.placement(a.id()),
        heal_size / MIB,
        cl.placement(b.id())
    );
    let picked = pick_jobs(jobs, "--heal-jobs")?;
    // [job][none, paced, unpaced]: the rounds' measures; [job][paced,
    // unpaced]: each heal's MiB/s, and the heals that ended first.
    let mut runs: Vec<[Vec<Measure>; 3]> = vec![Default::default(); picked.len()];
    let mut rates: Vec<[Vec<f64>; 2]> = vec![Default::default(); picked.len()];
    let mut early: Vec<[usize; 2]> = vec![[0; 2]; picked.len()];
    let mut current = None;
    for round in 0..cfg.rounds {
        for (j, job) in picked.iter().enumerate() {
            for k in 0..3 {
                let how = (round + k) % 3;
                let want = match how {
                    1 => Some(rate),
                    2 => Some(0),
                    _ => None,
                };
                if let Some(r) = want
                    && current != Some(r)
                {
                    cl.set_controller_flag("--replica-heal-rate", &r.to_string())
                        .await;
                    current = Some(r);
                }
                let Some(r) = want else {
                    settle().await;
                    eprintln!("round {}: {} with no heal", round + 1, job.name);
                    runs[j][0].push(run_job(cfg, job, &a.target, &out).await?);
                    continue;
                };
                set_replicas(cl, &b, 3).await?;
                let started = wait_healing(cl, b.id(), true).await?;
                eprintln!(
                    "round {}: {} during a heal at {}",
                    round + 1,
                    job.name,
                    if r == 0 {
                        "no pace".to_owned()
                    } else {
                        format!("{r} MiB/s")
                    }
                );
                runs[j][how].push(run_job(cfg, job, &a.target, &out).await?);
                let (_, msg) = cl.condition(b.id()).await.map_err(|e| e.to_string())?;
                if !msg.contains("healing on") {
                    early[j][how - 1] += 1;
                }
                let (ended, _) = cl
                    .wait_condition(b.id(), false, Duration::from_secs(900))
                    .await?;
                let secs = ended.duration_since(started).as_secs_f64();
                rates[j][how - 1].push(heal_size as f64 / MIB as f64 / secs);
                set_replicas(cl, &b, 2).await?;
                wait_healing(cl, b.id(), false).await?;
                cl.wait_condition(b.id(), false, Duration::from_secs(120))
                    .await?;
            }
        }
    }
    remove(cl, a).await;
    let _ = cl
        .ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: b.id().to_owned(),
            ..Default::default()
        })
        .await;
    let median_f = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let jobs = picked
        .iter()
        .zip(runs)
        .zip(rates)
        .zip(early)
        .map(
            |(((job, [none, paced, unpaced]), [mut rp, mut ru]), [ep, eu])| HealJob {
                job: job.name,
                without: median_measure(&none),
                spread_without: spread(&none),
                paced: HealRun {
                    with: median_measure(&paced),
                    spread: spread(&paced),
                    heal_mib_s: median_f(&mut rp),
                    ended_early: ep,
                },
                unpaced: HealRun {
                    with: median_measure(&unpaced),
                    spread: spread(&unpaced),
                    heal_mib_s: median_f(&mut ru),
                    ended_early: eu,
                },
            },
        )
        .collect();
    Ok(HealReport {
        setup,
        rounds: cfg.rounds,
        rate_mib_s: rate,
        jobs,
    })
}

#[derive(Debug, Serialize)]
struct MembersJob {
    job: &'static str,
    before: Measure,
    spread_before: f64,
    after: Measure,
    spread_after: f64,
}

#[derive(Debug, Serialize)]
struct MembersReport {
    setup: String,
    rounds: usize,
    jobs: Vec<MembersJob>,
}

/// See the module documentation, part 9.
async fn members_part(
    cl: &mut Cluster,
    cfg: &FioConfig,
    jobs: &[String],
) -> Result<MembersReport, String> {
    let out = cl.root.join("fio.json");
    let mut a = prefilled(cl, cfg, "rep2-members", cfg.size_bytes, 2, &out).await?;
    let setup = format!(
        "a 2-copy volume of {} MiB on n1 ({})",
        cfg.size_bytes / MIB,
        cl.placement(a.id())
    );
    let picked = pick_jobs(jobs, "--members-jobs")?;
    // [job][before, after]: the rounds' measures.
    let mut runs: Vec<[Vec<Measure>; 2]> = vec![Default::default(); picked.len()];
    let in_sync = Duration::from_secs(300);
    for round in 0..cfg.rounds {
        for (j, job) in picked.iter().enumerate() {
            settle().await;
            eprintln!("round {}: {} before a change", round + 1, job.name);
            runs[j][0].push(run_job(cfg, job, &a.target, &out).await?);
            for replicas in [3, 2] {
                set_replicas(cl, &a, replicas).await?;
                cl.wait_condition(a.id(), false, in_sync).await?;
            }
            settle().await;
            eprintln!("round {}: {} after 2 -> 3 -> 2 copies", round + 1, job.name);
            runs[j][1].push(run_job(cfg, job, &a.target, &out).await?);
            down(cl, &mut a).await?;
            up(cl, &mut a, true).await?;
        }
    }
    remove(cl, a).await;
    let jobs = picked
        .iter()
        .zip(runs)
        .map(|(job, [before, after])| MembersJob {
            job: job.name,
            before: median_measure(&before),
            spread_before: spread(&before),
            after: median_measure(&after),
            spread_after: spread(&after),
        })
        .collect();
    Ok(MembersReport {
        setup,
        rounds: cfg.rounds,
        jobs,
    })
}

#[derive(Debug, Serialize)]
struct DrainKind {
    kind: &'static str,
    /// Seconds from ControllerModifyVolume 1 -> 2 until every copy was in
    /// sync (median of the rounds), and their spread.
    rebuild_s: f64,
    spread_rebuild: f64,
    /// Seconds `stowage node drain n1 --wait` took (median), and spread.
    drain_s: f64,
    spread_drain: f64,
}

#[derive(Debug, Serialize)]
struct DrainReport {
    size_mib: u64,
    rounds: usize,
    kinds: Vec<DrainKind>,
}

/// The median of `v` (seconds), and its spread ((max - min) / median).
fn median_spread(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let m = v[v.len() / 2];
    (m, (v[v.len() - 1] - v[0]) / m)
}

/// Runs `stowage ARGS` against the controller's socket; an error with its
/// output when it fails.
async fn stowage_client(cl: &Cluster, args: &[&str]) -> Result<(), String> {
    let mut c = Command::new(bin());
    c.arg("--endpoint")
        .arg(format!(
            "unix://{}",
            cl.root.join("controller.sock").display()
        ))
        .args(args);
    let what = args.join(" ");
    let out = tokio::task::spawn_blocking(move || c.output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("stowage {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "stowage {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Errs unless the only copy of `v` is on n1.
fn only_on_n1(cl: &Cluster, v: &Vol) -> Result<(), String> {
    if cl.copy_nodes(v.id()) == [1] {
        Ok(())
    } else {
        Err(format!(
            "{} is not on n1 alone: {}",
            v.label,
            cl.placement(v.id())
        ))
    }
}

/// See the module documentation, part 10.
async fn drain_part(cl: &mut Cluster, rounds: usize, size: u64) -> Result<DrainReport, String> {
    cl.set_controller_flag("--replica-replace-after", "300")
        .await;
    cl.set_controller_flag("--replica-heal-rate", "32").await;
    let kinds = [
        ("staged on n1 (its engine rebuilds)", true),
        ("nobody publishes it (a heal rebuilds)", false),
    ];
    let in_sync = Duration::from_secs(600);
    // [kind][rebuild, drain]: the rounds' seconds.
    let mut runs: Vec<[Vec<f64>; 2]> = vec![Default::default(); kinds.len()];
    for round in 0..rounds {
        for (k, (kind, staged)) in kinds.iter().enumerate() {
            let mut v = create(cl, &format!("drain-{round}-{k}"), size, Some(1)).await;
            only_on_n1(cl, &v)?;
            if *staged {
                up(cl, &mut v, false).await?;
            }
            settle().await;
            eprintln!("round {}: {kind}: 1 -> 2 copies", round + 1);
            let t = Instant::now();
            set_replicas(cl, &v, 2).await?;
            cl.wait_condition(v.id(), false, in_sync).await?;
            runs[k][0].push(t.elapsed().as_secs_f64());
            set_replicas(cl, &v, 1).await?;
            cl.wait_condition(v.id(), false, in_sync).await?;
            only_on_n1(cl, &v)?;
            settle().await;
            eprintln!("round {}: {kind}: drain n1", round + 1);
            let t = Instant::now();
            stowage_client(cl, &["node", "drain", "n1", "--wait", "--timeout", "900"]).await?;
            runs[k][1].push(t.elapsed().as_secs_f64());
            stowage_client(cl, &["node", "uncordon", "n1"]).await?;
            if cl.copy_nodes(v.id()).contains(&1) {
                return Err(format!("n1 drained, yet {}", cl.placement(v.id())));
            }
            remove(cl, v).await;
        }
    }
    let kinds = kinds
        .iter()
        .zip(runs)
        .map(|((kind, _), [mut rebuild, mut drain])| {
            let (rebuild_s, spread_rebuild) = median_spread(&mut rebuild);
            let (drain_s, spread_drain) = median_spread(&mut drain);
            DrainKind {
                kind,
                rebuild_s,
                spread_rebuild,
                drain_s,
                spread_drain,
            }
        })
        .collect();
    Ok(DrainReport {
        size_mib: size / MIB,
        rounds,
        kinds,
    })
}

fn transport(cl: &Cluster) -> &'static str {
    if cl.replication_tls {
        "loopback TCP, mutual TLS"
    } else {
        "loopback TCP, mutual TLS (engine to copies: plaintext, --replication-tls=off)"
    }
}

/// Takes every volume down, restarts the agents with replication TLS off,
/// brings the volumes up again and runs `cfg`'s jobs on the baseline and
/// the volumes with copies on other nodes; then the same back to TLS on.
async fn plain_pass(
    cl: &mut Cluster,
    cfg: &FioConfig,
    vols: &mut [(Vol, usize, UpTimes)],
) -> Result<FioReport, String> {
    async fn cycle(
        cl: &mut Cluster,
        vols: &mut [(Vol, usize, UpTimes)],
        tls: bool,
    ) -> Result<(), String> {
        for (v, _, _) in vols.iter_mut() {
            down(cl, v).await?;
        }
        cl.set_replication_tls(tls).await;
        for (v, _, t) in vols.iter_mut() {
            *t = up(cl, v, true).await?;
        }
        Ok(())
    }
    eprintln!("restarting the agents with --replication-tls=off");
    cycle(cl, vols, false).await?;
    let some: Vec<_> = vols.iter().filter(|(_, c, _)| *c != 1).collect();
    let report = fio_part(cl, cfg, &some, false).await;
    eprintln!("restarting the agents with replication TLS on");
    cycle(cl, vols, true).await?;
    report
}

// ------------------------------------------------------------ publish/stage latency

#[derive(Debug, Serialize)]
struct StepSummary {
    step: &'static str,
    block: support::Summary,
    replicated: support::Summary,
}

#[derive(Debug, Serialize)]
struct PublishReport {
    repeats: usize,
    volume_bytes: u64,
    replicated_placement: String,
    steps: Vec<StepSummary>,
}

async fn publish_part(cl: &mut Cluster, repeats: usize) -> Result<PublishReport, String> {
    let size = 64 * MIB;
    let mut block = create(cl, "lat-block", size, None).await;
    let mut rep = create(cl, "lat-rep3", size, Some(3)).await;
    let placement = cl.placement(rep.id());
    type Samples = [Vec<Duration>; 4];
    let (mut sb, mut sr): (Samples, Samples) = Default::default();
    for round in 0..repeats {
        // Alternate which goes first.
        for k in 0..2 {
            let (v, s) = if (round + k) % 2 == 0 {
                (&mut block, &mut sb)
            } else {
                (&mut rep, &mut sr)
            };
            let u = up(cl, v, false).await?;
            let d = down(cl, v).await?;
            s[0].push(u.controller_publish);
            s[1].push(u.node_stage);
            s[2].push(d.node_unstage);
            s[3].push(d.controller_unpublish);
        }
    }
    remove(cl, block).await;
    remove(cl, rep).await;
    let steps = [
        "ControllerPublish",
        "NodeStage",
        "NodeUnstage",
        "ControllerUnpublish",
    ]
    .iter()
    .enumerate()
    .map(|(i, step)| StepSummary {
        step,
        block: support::summarize(&sb[i]),
        replicated: support::summarize(&sr[i]),
    })
    .collect();
    Ok(PublishReport {
        repeats,
        volume_bytes: size,
        replicated_placement: placement,
        steps,
    })
}

// ------------------------------------------------------------ writers

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let mut raw = vec![fill; len + 4096];
        let at = raw.as_mut_ptr().align_offset(4096);
        Aligned { raw, at, len }
    }
    fn bytes(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

fn open_direct(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// One write+fsync of the loop: when it started and ended, and whether it
/// failed.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// A thread writing until told to stop; told to stop when dropped.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Writer {
    /// Writes `block` bytes + fdatasync at `offsets` (cycled), one after
    /// the other, `interval` apart at the earliest (ZERO: back to back).
    fn start(device: &Path, block: usize, offsets: Vec<u64>, interval: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let f = open_direct(device).expect("open the published device O_DIRECT");
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = Aligned::new(block, 0);
            let mut samples = Vec::new();
            let mut next = Instant::now();
            for (i, off) in offsets.iter().cycle().enumerate() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                if !interval.is_zero() {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next += interval;
                }
                buf.bytes_mut()[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let start = Instant::now();
                let ok = f.write_all_at(buf.bytes(), *off).is_ok() && f.sync_data().is_ok();
                samples.push(Sample {
                    start,
                    end: Instant::now(),
                    ok,
                });
            }
            samples
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    async fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || t.join().expect("writer thread"))
            .await
            .expect("join")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// "N MiB rebuilt" from a volume condition's message, where the
/// controller reports the engine's rebuild counter (newer versions do).
fn rebuilt_mib(message: &str) -> Option<u64> {
    let at = message.find(" MiB rebuilt")?;
    message[..at].rsplit(' ').next()?.parse().ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ------------------------------------------------------------ failover

/// How long after a kill a stall is attributed to it: the engine's call
/// timeout (2 s) and a record change fit in it.
const FAILOVER_WINDOW: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize)]
struct FailoverReport {
    volume: String,
    killed: String,
    writes_before: usize,
    before_median_ms: f64,
    before_p99_ms: f64,
    /// The longest write+fsync that ended in the window before the kill
    /// (the noise a stall is compared with).
    before_longest_ms: f64,
    /// The longest write+fsync that ended in the window after the kill.
    stall_ms: f64,
    /// From the kill until that write ended: writes flow again.
    kill_to_flowing_ms: f64,
    writes_after: usize,
    after_median_ms: f64,
    after_p99_ms: f64,
    failed_writes: usize,
    /// Per 250 ms from the kill: (start of the bucket in ms after the
    /// kill, writes that ended in it, the longest of them in ms).
    timeline: Vec<(i64, usize, f64)>,
    /// The condition the controller reported after the kill.
    condition: String,
}

async fn failover_part(
    cl: &mut Cluster,
    v: &Vol,
    victim: usize,
    dirty: &mut BTreeSet<u64>,
) -> Result<FailoverReport, String> {
    // 4 KiB writes over the first 64 KiB (region 0).
    let offsets: Vec<u64> = (0..16).map(|i| i * 4096).collect();
    let w = Writer::start(&v.target, 4096, offsets, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kill = Instant::now();
    cl.nodes[victim - 1].kill9();
    eprintln!("killed {} (SIGKILL)", node_id(victim));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let samples = w.finish().await;
    dirty.insert(0);
    let lat = |s: &&Sample| s.end - s.start;
    let before: Vec<&Sample> = samples.iter().filter(|s| s.end < kill).collect();
    let before_lat: Vec<Duration> = before.iter().map(lat).collect();
    let before_longest = before
        .iter()
        .filter(|s| s.end + FAILOVER_WINDOW >= kill)
        .map(lat)
        .max()
        .unwrap_or_default();
    let stalled = samples
        .iter()
        .filter(|s| s.end >= kill && s.end < kill + FAILOVER_WINDOW)
        .max_by_key(|s| s.end - s.start)
        .ok_or("no write ended in the 3 s after the kill")?;
    let after_lat: Vec<Duration> = samples
        .iter()
        .filter(|s| s.start >= stalled.end)
        .map(|s| s.end - s.start)
        .collect();
    let (b, a) = (
        support::summarize(&before_lat),
        support::summarize(&after_lat),
    );
    let last = samples.last().map_or(kill, |s| s.end);
    let rel = |t: Instant| {
        if t >= kill {
            (t - kill).as_millis() as i64
        } else {
            -((kill - t).as_millis() as i64)
        }
    };
    let mut timeline = Vec::new();
    let mut at = -1000i64;
    while at < rel(last) {
        let in_bucket: Vec<f64> = samples
            .iter()
            .filter(|s| (at..at + 250).contains(&rel(s.end)))
            .map(|s| ms(s.end - s.start))
            .collect();
        timeline.push((
            at,
            in_bucket.len(),
            in_bucket.iter().copied().fold(0.0, f64::max),
        ));
        at += 250;
    }
    let condition = match cl.condition(v.id()).await {
        Ok((a, m)) => format!("abnormal={a}: {m}"),
        Err(e) => format!("ControllerGetVolume: {e}"),
    };
    Ok(FailoverReport {
        volume: v.label.clone(),
        killed: node_id(victim),
        writes_before: before.len(),
        before_median_ms: b.median_ms,
        before_p99_ms: b.p99_ms,
        before_longest_ms: ms(before_longest),
        stall_ms: ms(stalled.end - stalled.start),
        kill_to_flowing_ms: ms(stalled.end - kill),
        writes_after: after_lat.len(),
        after_median_ms: a.median_ms,
        after_p99_ms: a.p99_ms,
        failed_writes: samples.iter().filter(|s| !s.ok).count(),
        timeline,
        condition,
    })
}

// ------------------------------------------------------ owner failover

#[derive(Debug, Serialize)]
struct OwnerFailoverReport {
    volume: String,
    from: String,
    to: String,
    controller_unpublish_ms: f64,
    controller_publish_ms: f64,
    node_stage_ms: f64,
    node_publish_ms: f64,
    /// The first 4 KiB O_DIRECT write + fdatasync on the new owner.
    first_write_ms: f64,
    /// From the SIGKILL of the owner's agent until that write returned.
    kill_to_writing_ms: f64,
    /// The 1 MiB written and fsynced before the kill read back the same.
    data_intact: bool,
    /// The old owner's agent restarted: its NodeUnpublish + NodeUnstage.
    old_owner_cleanup: String,
}

/// Writes `data` at `offset` of `path` with O_DIRECT, then fdatasync.
fn write_synced(path: &Path, offset: u64, data: &Aligned) -> std::io::Result<()> {
    let f = open_direct(path)?;
    f.write_all_at(data.bytes(), offset)?;
    f.sync_data()
}

/// The owner dies: a 3-copy volume published and staged on n2, 1 MiB
/// written and fsynced, then n2's agent gets SIGKILL and the CO moves the
/// volume to n3 (ControllerUnpublish from n2, ControllerPublish to n3,
/// NodeStage and NodePublish there), each step timed, until a first
/// write and fsync on n3 returns. The 1 MiB is read back on n3. Then n2
/// comes back and its stale stage is cleaned up as a CO would.
async fn owner_failover_part(cl: &mut Cluster, size: u64) -> Result<OwnerFailoverReport, String> {
    let mut v = create(cl, "owner-fo", size, Some(3)).await;
    let work = cl.root.join("work");
    let on = |v: &mut Vol, i: usize| {
        v.staging = work.join(format!("{}-staging-{}", v.label, node_id(i)));
        v.target = work.join(format!("{}-target-{}", v.label, node_id(i)));
    };
    on(&mut v, 2);
    up_on(cl, &mut v, 2, true).await?;
    let mut pattern = Aligned::new(1 << 20, 0);
    for (i, b) in pattern.bytes_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8 ^ 0x5a;
    }
    let pattern = Arc::new(pattern);
    let (target, p) = (v.target.clone(), Arc::clone(&pattern));
    tokio::task::spawn_blocking(move || write_synced(&target, 0, &p))
        .await
        .unwrap()
        .map_err(|e| format!("write on n2: {e}"))?;
    let (old_staging, old_target) = (v.staging.clone(), v.target.clone());

    let kill = Instant::now();
    cl.nodes[1].kill9();
    eprintln!("killed n2 (SIGKILL), the owner of {}", v.label);
    let start = Instant::now();
    cl.ctl
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.id().to_owned(),
            node_id: "n2".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("ControllerUnpublish from the dead n2: {e:?}"))?;
    let controller_unpublish = start.elapsed();
    v.up = false;
    on(&mut v, 3);
    let t = up_on(cl, &mut v, 3, true).await?;
    let block = Arc::new(Aligned::new(4096, 0xa5));
    let target = v.target.clone();
    let start = Instant::now();
    tokio::task::spawn_blocking(move || write_synced(&target, 1 << 20, &block))
        .await
        .unwrap()
        .map_err(|e| format!("first write on n3: {e}"))?;
    let first_write = start.elapsed();
    let kill_to_writing = kill.elapsed();
    let target = v.target.clone();
    let back = tokio::task::spawn_blocking(move || -> std::io::Result<Aligned> {
        let mut b = Aligned::new(1 << 20, 0);
        open_direct(&target)?.read_exact_at(b.bytes_mut(), 0)?;
        Ok(b)
    })
    .await
    .unwrap()
    .map_err(|e| format!("read back on n3: {e}"))?;
    let data_intact = back.bytes() == pattern.bytes();

    cl.nodes[1].spawn();
    cl.nodes[1].wait_socket();
    cl.wait_fresh(&[2]).await;
    let mut n2 = cl.node(2).await;
    let unpublish = n2
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.id().to_owned(),
            target_path: old_target.display().to_string(),
        })
        .await;
    let unstage = n2
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.id().to_owned(),
            staging_target_path: old_staging.display().to_string(),
        })
        .await;
    let old_owner_cleanup = match (unpublish, unstage) {
        (Ok(_), Ok(_)) => "NodeUnpublish and NodeUnstage ok".to_owned(),
        (a, b) => format!(
            "NodeUnpublish: {:?}; NodeUnstage: {:?}",
            a.err().map(|e| e.message().to_owned()),
            b.err().map(|e| e.message().to_owned())
        ),
    };
    down_on(cl, &mut v, 3).await?;
    let _ = cl
        .ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.id().to_owned(),
            ..Default::default()
        })
        .await;
    Ok(OwnerFailoverReport {
        volume: v.label.clone(),
        from: "n2".into(),
        to: "n3".into(),
        controller_unpublish_ms: ms(controller_unpublish),
        controller_publish_ms: ms(t.controller_publish),
        node_stage_ms: ms(t.node_stage),
        node_publish_ms: ms(t.node_publish),
        first_write_ms: ms(first_write),
        kill_to_writing_ms: ms(kill_to_writing),
        data_intact,
        old_owner_cleanup,
    })
}

// ------------------------------------------------------------ rebuilds

#[derive(Debug, Serialize)]
struct DirtyRebuildReport {
    volume: String,
    node: String,
    dirty_seconds: u64,
    rate_mb_s_asked: f64,
    rate_mb_s_achieved: f64,
    bytes_written: u64,
    failed_writes: usize,
    /// Distinct 1 MiB regions written while the copy was away.
    dirty_regions: usize,
    bytes_moved_estimate: u64,
    /// The engine's own count, when the condition message carries it.
    rebuilt_mib_reported: Option<u64>,
    /// Restart → the agent's socket answers.
    agent_up_ms: f64,
    /// Restart → every copy in sync (ControllerGetVolume).
    restart_to_in_sync_ms: f64,
    /// Agent up → every copy in sync.
    rebuild_ms: f64,
    rebuild_mib_s: f64,
    condition: String,
}

async fn dirty_rebuild_part(
    cl: &mut Cluster,
    v: &Vol,
    victim: usize,
    size: u64,
    seconds: u64,
    rate_mb_s: f64,
    dirty: &mut BTreeSet<u64>,
) -> Result<DirtyRebuildReport, String> {
    let regions = size / REGION;
    // Sequential 1 MiB writes from region 1 on (region 0 took the
    // failover's writes), wrapping around.
    let count = ((seconds as f64 * rate_mb_s * 1e6) / MIB as f64).ceil() as u64;
    let offsets: Vec<u64> = (0..count)
        .map(|i| (1 + i % (regions - 1)) * REGION)
        .collect();
    dirty.extend(offsets.iter().map(|o| o / REGION));
    let interval = Duration::from_secs_f64(MIB as f64 / (rate_mb_s * 1e6));
    eprintln!(
        "writing {count} MiB at {rate_mb_s} MB/s for {seconds} s while {} is down",
        node_id(victim)
    );
    let start = Instant::now();
    let w = Writer::start(&v.target, MIB as usize, offsets.clone(), interval);
    // Stop once every offset was written once.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if w.thread.as_ref().is_none_or(|t| t.is_finished())
            || start.elapsed() >= interval * count as u32
        {
            break;
        }
    }
    let samples = w.finish().await;
    let wrote = samples.len() as u64 * MIB;
    let took = start.elapsed();
    let failed = samples.iter().filter(|s| !s.ok).count();
    let (abnormal, msg) = cl.condition(v.id()).await.map_err(|e| e.to_string())?;
    if !abnormal {
        return Err(format!(
            "the volume is not abnormal with {} down: {msg}",
            node_id(victim)
        ));
    }
    eprintln!("restarting {}", node_id(victim));
    let restart = Instant::now();
    cl.nodes[victim - 1].spawn();
    cl.nodes[victim - 1].wait_socket();
    let agent_up = Instant::now();
    let (synced, condition) = cl
        .wait_condition(v.id(), false, Duration::from_secs(600))
        .await
        .map_err(|e| format!("{e}\nn1 log:\n{}", cl.nodes[0].log_tail(30)))?;
    let moved = dirty.len() as u64 * REGION;
    let rebuild = synced - agent_up;
    Ok(DirtyRebuildReport {
        volume: v.label.clone(),
        node: node_id(victim),
        dirty_seconds: seconds,
        rate_mb_s_asked: rate_mb_s,
        rate_mb_s_achieved: wrote as f64 / 1e6 / took.as_secs_f64(),
        bytes_written: wrote,
        failed_writes: failed,
        dirty_regions: dirty.len(),
        bytes_moved_estimate: moved,
        rebuilt_mib_reported: rebuilt_mib(&condition),
        agent_up_ms: ms(agent_up - restart),
        restart_to_in_sync_ms: ms(synced - restart),
        rebuild_ms: ms(rebuild),
        rebuild_mib_s: moved as f64 / MIB as f64 / rebuild.as_secs_f64(),
        condition,
    })
}

#[derive(Debug, Serialize)]
struct FullRebuildReport {
    volume: String,
    bytes: u64,
    placement: String,
    node: String,
    wiped: bool,
    /// ControllerPublish + NodeStage of the new engine.
    publish_ms: f64,
    stage_ms: f64,
    /// NodeStage's return → every copy in sync.
    rebuild_ms: f64,
    rebuild_mib_s: f64,
    /// The engine's own count, when the condition message carries it.
    rebuilt_mib_reported: Option<u64>,
    condition: String,
    /// After unstaging: the rebuilt copy's bytes equal n1's.
    identical: Option<bool>,
}

/// Empties a dead copy's bytes on disk, keeping its record: its `data`
/// file becomes one hole of the same size and its region tags zero.
fn wipe_copy(dir: &Path) -> std::io::Result<()> {
    for name in ["data", "tags"] {
        let p = dir.join(name);
        let f = std::fs::OpenOptions::new().write(true).open(&p)?;
        let len = f.metadata()?.len();
        f.set_len(0)?;
        f.set_len(len)?;
        f.sync_all()?;
    }
    Ok(())
}

/// Whether two files hold the same bytes (read 4 MiB at a time).
fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

async fn full_rebuild_part(
    cl: &mut Cluster,
    cfg: &FioConfig,
    size: u64,
    wipe: bool,
) -> Result<FullRebuildReport, String> {
    let mut v = create(cl, "full", size, Some(3)).await;
    let placement = cl.placement(v.id());
    let victim = *cl
        .copy_nodes(v.id())
        .iter()
        .rev()
        .find(|&&i| i != 1)
        .ok_or("no copy off n1")?;
    up(cl, &mut v, true).await?;
    eprintln!("full rebuild: writing {} MiB", size / MIB);
    let fcfg = FioConfig {
        size_bytes: size,
        ..cfg.clone()
    };
    prefill(&fcfg, &v.target, &cl.root.join("fio.json")).await?;
    cl.nodes[victim - 1].kill9();
    // One write+fsync: the engine notices the dead copy and marks it out.
    let w = Writer::start(&v.target, 4096, vec![0], Duration::from_millis(100));
    let marked = cl
        .wait_condition(v.id(), true, Duration::from_secs(60))
        .await;
    let samples = w.finish().await;
    marked?;
    if samples.iter().any(|s| !s.ok) {
        return Err("a write failed after the copy was killed".into());
    }
    down(cl, &mut v).await?;
    let dir = cl.member_dir(victim, v.id());
    if wipe {
        wipe_copy(&dir).map_err(|e| format!("wipe {}: {e}", dir.display()))?;
    }
    cl.nodes[victim - 1].spawn();
    cl.nodes[victim - 1].wait_socket();
    cl.wait_fresh(&[victim]).await;
    let t = up(cl, &mut v, true).await?;
    let staged = Instant::now();
    eprintln!("full rebuild: staged again, waiting for every copy in sync");
    let (synced, condition) = cl
        .wait_condition(v.id(), false, Duration::from_secs(1800))
        .await
        .map_err(|e| format!("{e}\nn1 log:\n{}", cl.nodes[0].log_tail(30)))?;
    let rebuild = synced - staged;
    down(cl, &mut v).await?;
    let identical = same_bytes(&cl.member_dir(1, v.id()).join("data"), &dir.join("data")).ok();
    remove(cl, v).await;
    Ok(FullRebuildReport {
        volume: "full".into(),
        bytes: size,
        placement,
        node: node_id(victim),
        wiped: wipe,
        publish_ms: ms(t.controller_publish),
        stage_ms: ms(t.node_stage),
        rebuild_ms: ms(rebuild),
        rebuild_mib_s: size as f64 / MIB as f64 / rebuild.as_secs_f64(),
        rebuilt_mib_reported: rebuilt_mib(&condition),
        condition,
        identical,
    })
}

// ---------------------------------------------------- snapshot stall

#[derive(Debug, Serialize)]
struct StallKind {
    call_median_ms: f64,
    /// Per round, the longest write+fdatasync that overlapped the call.
    stalls_ms: Vec<f64>,
    stall_median_ms: f64,
    stall_max_ms: f64,
}

#[derive(Debug, Serialize)]
struct SnapshotStallReport {
    setup: String,
    rounds: usize,
    writes_outside: usize,
    outside_median_ms: f64,
    outside_p99_ms: f64,
    single: StallKind,
    group: StallKind,
    failed_writes: usize,
    /// Whether a copy of either volume was out of sync afterwards.
    out_of_sync: bool,
}

fn stall_kind(calls: &[(Instant, Instant)], samples: &[Sample]) -> StallKind {
    let stalls: Vec<f64> = calls
        .iter()
        .map(|&(from, to)| {
            samples
                .iter()
                .filter(|s| s.end >= from && s.start <= to)
                .map(|s| ms(s.end - s.start))
                .fold(0.0, f64::max)
        })
        .collect();
    let call: Vec<Duration> = calls.iter().map(|&(a, b)| b - a).collect();
    let stall_d: Vec<Duration> = stalls
        .iter()
        .map(|&m| Duration::from_secs_f64(m / 1e3))
        .collect();
    StallKind {
        call_median_ms: support::summarize(&call).median_ms,
        stall_median_ms: support::summarize(&stall_d).median_ms,
        stall_max_ms: stalls.iter().copied().fold(0.0, f64::max),
        stalls_ms: stalls,
    }
}

/// How long writes stall while a volume is snapshotted, alone
/// (CreateSnapshot, the baseline) and in a group with another volume
/// (CreateVolumeGroupSnapshot: every copy of both frozen at once), rounds
/// interleaved under one QD1 writer on the 3-copy volume `a`.
async fn snapshot_stall_part(
    cl: &mut Cluster,
    rounds: usize,
) -> Result<SnapshotStallReport, String> {
    let size = 256 * MIB;
    let mut a = create(cl, "snap-a", size, Some(3)).await;
    let mut b = create(cl, "snap-b", size, Some(2)).await;
    up(cl, &mut a, true).await?;
    up(cl, &mut b, true).await?;
    // 64 MiB of data in each, so the copies have extents to share.
    let mib = Aligned::new(MIB as usize, 0x5a);
    for v in [&a, &b] {
        let f = open_direct(&v.target).map_err(|e| e.to_string())?;
        for i in 0..64 {
            f.write_all_at(mib.bytes(), i * MIB)
                .map_err(|e| e.to_string())?;
        }
        f.sync_data().map_err(|e| e.to_string())?;
    }
    let offsets: Vec<u64> = (0..16).map(|i| i * 4096).collect();
    let w = Writer::start(&a.target, 4096, offsets, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut single, mut group) = (Vec::new(), Vec::new());
    let mut errors = Vec::new();
    for round in 0..rounds {
        let start = Instant::now();
        let r = cl
            .ctl
            .create_snapshot(csi::CreateSnapshotRequest {
                name: format!("stall-{round}"),
                source_volume_id: a.id().to_owned(),
                ..Default::default()
            })
            .await;
        single.push((start, Instant::now()));
        match r {
            Ok(r) => {
                let id = r.into_inner().snapshot.map(|s| s.snapshot_id);
                let _ = cl
                    .ctl
                    .delete_snapshot(csi::DeleteSnapshotRequest {
                        snapshot_id: id.unwrap_or_default(),
                        ..Default::default()
                    })
                    .await;
            }
            Err(e) => errors.push(format!("CreateSnapshot: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let start = Instant::now();
        let r = cl
            .group
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: format!("stall-group-{round}"),
                source_volume_ids: vec![a.id().to_owned(), b.id().to_owned()],
                ..Default::default()
            })
            .await;
        group.push((start, Instant::now()));
        match r {
            Ok(r) => {
                let id = r.into_inner().group_snapshot.map(|g| g.group_snapshot_id);
                let _ = cl
                    .group
                    .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                        group_snapshot_id: id.unwrap_or_default(),
                        ..Default::default()
                    })
                    .await;
            }
            Err(e) => errors.push(format!("CreateVolumeGroupSnapshot: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let samples = w.finish().await;
    let mut out_of_sync = false;
    for v in [&a, &b] {
        out_of_sync |= cl.condition(v.id()).await.map_or(true, |(bad, _)| bad);
    }
    remove(cl, a).await;
    remove(cl, b).await;
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let calls: Vec<(Instant, Instant)> = single.iter().chain(&group).copied().collect();
    let outside: Vec<Duration> = samples
        .iter()
        .filter(|s| !calls.iter().any(|&(f, t)| s.end >= f && s.start <= t))
        .map(|s| s.end - s.start)
        .collect();
    let o = support::summarize(&outside);
    Ok(SnapshotStallReport {
        setup: "a: 3 copies, written QD1 from n1; b: 2 copies; 64 MiB of data each".into(),
        rounds,
        writes_outside: outside.len(),
        outside_median_ms: o.median_ms,
        outside_p99_ms: o.p99_ms,
        single: stall_kind(&single, &samples),
        group: stall_kind(&group, &samples),
        failed_writes: samples.iter().filter(|s| !s.ok).count(),
        out_of_sync,
    })
}

// ------------------------------------------------------------ report

#[derive(Debug, Serialize)]
struct Report {
    transport: &'static str,
    pool_fs: &'static str,
    fio: Option<FioReport>,
    /// fio again with every agent on `--replication-tls=off` (`--replication-tls both`).
    fio_plain: Option<FioReport>,
    publish: Option<PublishReport>,
    failover: Option<FailoverReport>,
    owner_failover: Option<OwnerFailoverReport>,
    dirty_rebuild: Option<DirtyRebuildReport>,
    full_rebuild: Option<FullRebuildReport>,
    snapshot_stall: Option<SnapshotStallReport>,
    scrub: Option<ScrubReport>,
    heal: Option<HealReport>,
    members: Option<MembersReport>,
    drain: Option<DrainReport>,
    /// Identical bytes on every copy of the 3-copy fio volume after it was
    /// unstaged (after the dirty-region rebuild).
    rep3_copies_identical: Option<bool>,
    errors: Vec<String>,
    loadavg: String,
    wall_s: f64,
}

impl Report {
    /// A report of the parts a partial run (`--only-…`) leaves out: none.
    fn partial(cl: &Cluster, errors: Vec<String>, wall: Instant) -> Report {
        Report {
            transport: transport(cl),
            pool_fs: "one xfs filesystem on a loop device",
            fio: None,
            fio_plain: None,
            publish: None,
            failover: None,
            owner_failover: None,
            dirty_rebuild: None,
            full_rebuild: None,
            snapshot_stall: None,
            scrub: None,
            heal: None,
            members: None,
            drain: None,
            rep3_copies_identical: None,
            errors,
            loadavg: loadavg(),
            wall_s: wall.elapsed().as_secs_f64(),
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// Bandwidths in KiB/s as MiB/s, one decimal, space-separated.
fn mib_s_list(kib_s: &[f64]) -> String {
    kib_s
        .iter()
        .map(|b| format!("{:.1}", b / 1024.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_fio(f: &FioReport, heading: &str) {
    let c = &f.config;
    println!();
    println!("{heading}");
    println!(
        "fio {} direct=1, raw block volumes staged and published on n1, {} MiB each, {} s per job after a sync and {} s ramp, sequential QD{}, median of {} interleaved round(s)",
        c.ioengine,
        c.size_bytes / MIB,
        c.runtime_s,
        c.ramp_s,
        c.seq_iodepth,
        c.rounds
    );
    for v in &f.volumes {
        println!(
            "  {:<6} {:<40} {:<12} ControllerPublish {:>7.1} ms, NodeStage {:>7.1} ms, prefill {:>6.1} MiB/s",
            v.label,
            v.placement,
            v.device,
            v.controller_publish_ms,
            v.node_stage_ms,
            v.prefill_mib_s
        );
    }
    for j in &f.jobs {
        println!();
        println!("{} (QD{})", j.job, j.iodepth);
        println!(
            "  {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7}  {:<8} rounds MiB/s",
            "volume",
            "MiB/s",
            "IOPS",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "mean µs",
            "of local",
            "spread",
            "target"
        );
        for row in &j.rows {
            let m = &row.measure;
            let target = match (row.target, row.met) {
                (Some(t), Some(true)) => format!("≥{:.0}% ok", t * 100.0),
                (Some(t), _) => format!("≥{:.0}% MISSED", t * 100.0),
                _ => String::new(),
            };
            println!(
                "  {:<6} {:>9.1} {:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>7}  {:<12} {}",
                row.volume,
                m.bw_kib_s / 1024.0,
                m.iops,
                m.clat_p50_us,
                m.clat_p99_us,
                m.clat_p999_us,
                m.clat_mean_us,
                pct(row.of_local),
                pct(row.spread),
                target,
                mib_s_list(&row.rounds_kib_s)
            );
        }
        for a in &j.at_once {
            println!(
                "  local ×{} at once: {:.1} MiB/s each, {} of local alone (rounds {})",
                a.volumes,
                a.per_volume_kib_s / 1024.0,
                pct(a.of_local),
                mib_s_list(&a.rounds_kib_s)
            );
        }
        for row in j.rows.iter().filter(|r| r.of_ceiling.is_some()) {
            println!(
                "  {} against local ×{} at once: {}",
                row.volume,
                row.copies,
                pct(row.of_ceiling.unwrap_or_default())
            );
        }
    }
    println!();
    println!("issue 14 targets (% of local, medians; {heading}):");
    for j in &f.jobs {
        for row in j.rows.iter().filter(|r| r.target.is_some()) {
            // Every copy's pool is on this one disk: a write to N copies
            // is N writes to it, so what N local volumes written at once
            // get each is what the disk leaves a write to N copies.
            let ceiling = j
                .at_once
                .iter()
                .find(|a| a.volumes == row.copies)
                .map(|a| {
                    format!(
                        "  (the one disk's ceiling, {} local volumes at once: {} each; this is {} of it)",
                        a.volumes,
                        pct(a.of_local),
                        pct(row.of_ceiling.unwrap_or_default())
                    )
                })
                .unwrap_or_default();
            println!(
                "  {} cop{} {:<16} {:>7}  target ≥{:.0}%  {}{ceiling}",
                row.copies,
                if row.copies == 1 { "y  " } else { "ies" },
                j.job,
                pct(row.of_local),
                row.target.unwrap() * 100.0,
                if row.met == Some(true) {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
}

fn print_report(r: &Report) {
    println!(
        "stowage replicated-volume bench: controller + {NODES} node agents over {}, every pool on {}",
        r.transport, r.pool_fs
    );
    if let Some(f) = &r.fio {
        print_fio(
            f,
            if r.transport.contains("plaintext") {
                "replication TLS off (--replication-tls off; benchmarks only)"
            } else {
                "replication TLS on (the default)"
            },
        );
    }
    if let Some(f) = &r.fio_plain {
        print_fio(
            f,
            "replication TLS off (every agent restarted with --replication-tls=off; benchmarks only)",
        );
    }
    if let Some(p) = &r.publish {
        println!();
        println!(
            "publish/stage of {} MiB raw block volumes on n1, {} interleaved rounds (replicated: 3 copies, {}), ms:",
            p.volume_bytes / MIB,
            p.repeats,
            p.replicated_placement
        );
        println!(
            "  {:<20} {:>9} {:>9} {:>11} {:>9}",
            "call", "block", "p90", "replicated", "p90"
        );
        for s in &p.steps {
            println!(
                "  {:<20} {:>9.1} {:>9.1} {:>11.1} {:>9.1}",
                s.step,
                s.block.median_ms,
                s.block.p90_ms,
                s.replicated.median_ms,
                s.replicated.p90_ms
            );
        }
    }
    if let Some(f) = &r.failover {
        println!();
        println!(
            "failover: SIGKILL of {}'s agent under 4 KiB O_DIRECT write+fdatasync back to back on {} (published on n1)",
            f.killed, f.volume
        );
        println!(
            "  before: {} writes, median {:.2} ms, p99 {:.2} ms; longest in the 3 s before the kill {:.0} ms",
            f.writes_before, f.before_median_ms, f.before_p99_ms, f.before_longest_ms
        );
        if f.stall_ms > 2.0 * f.before_longest_ms {
            println!(
                "  longest write+fsync ending in the 3 s after the kill: {:.0} ms; writes flow again {:.0} ms after the kill",
                f.stall_ms, f.kill_to_flowing_ms
            );
        } else {
            println!(
                "  no stall above the noise: the longest write+fsync ending in the 3 s after the kill took {:.0} ms (ended {:.0} ms after it), not over 2× the longest before",
                f.stall_ms, f.kill_to_flowing_ms
            );
        }
        println!(
            "  from then: {} writes, median {:.2} ms, p99 {:.2} ms; {} write(s) failed in all",
            f.writes_after, f.after_median_ms, f.after_p99_ms, f.failed_writes
        );
        println!(
            "  writes ended per 250 ms, −1 s to +3 s from the kill (start ms: count/longest ms): {}",
            f.timeline
                .iter()
                .filter(|(at, _, _)| *at < FAILOVER_WINDOW.as_millis() as i64)
                .map(|(at, n, max)| format!("{at}:{n}/{max:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("  condition after: {}", f.condition);
    }
    if let Some(o) = &r.owner_failover {
        println!();
        println!(
            "owner failover: SIGKILL of {}'s agent while it owned {} (3 copies), the volume moved to {}, ms:",
            o.from, o.volume, o.to
        );
        println!(
            "  ControllerUnpublish from {} {:.1}, ControllerPublish to {} {:.1}, NodeStage {:.1}, NodePublish {:.1}, first 4 KiB write+fdatasync {:.1}",
            o.from,
            o.controller_unpublish_ms,
            o.to,
            o.controller_publish_ms,
            o.node_stage_ms,
            o.node_publish_ms,
            o.first_write_ms
        );
        println!(
            "  kill to writing on {}: {:.0} ms (the CO's own detection time not included); 1 MiB written before the kill read back intact: {}",
            o.to,
            o.kill_to_writing_ms,
            if o.data_intact { "yes" } else { "NO" }
        );
        println!("  {} restarted: {}", o.from, o.old_owner_cleanup);
    }
    if let Some(d) = &r.dirty_rebuild {
        println!();
        println!(
            "dirty-region rebuild of {}'s copy of {}: {:.1} MB written in {} s (asked {:.1} MB/s, achieved {:.2} MB/s, {} failed) while it was down",
            d.node,
            d.volume,
            d.bytes_written as f64 / 1e6,
            d.dirty_seconds,
            d.rate_mb_s_asked,
            d.rate_mb_s_achieved,
            d.failed_writes
        );
        println!(
            "  agent restarted, listening after {:.0} ms; every copy in sync {:.0} ms after the restart = {:.0} ms after the agent was up",
            d.agent_up_ms, d.restart_to_in_sync_ms, d.rebuild_ms
        );
        println!(
            "  bytes moved ≈ {} dirty regions × 1 MiB = {:.1} MiB (the regions written while it was down) → {:.1} MiB/s; the engine's count: {}",
            d.dirty_regions,
            d.bytes_moved_estimate as f64 / MIB as f64,
            d.rebuild_mib_s,
            d.rebuilt_mib_reported
                .map_or("not reported".to_owned(), |m| format!("{m} MiB rebuilt"))
        );
        println!("  condition after: {}", d.condition);
    }
    if let Some(identical) = r.rep3_copies_identical {
        println!(
            "  rep3 after unstaging: every copy's bytes {}",
            if identical { "identical" } else { "DIFFER" }
        );
    }
    if let Some(f) = &r.full_rebuild {
        println!();
        println!(
            "full rebuild: {} MiB 3-copy volume ({}), {}'s copy {} while its agent was dead, then published and staged on n1 again (ControllerPublish {:.0} ms, NodeStage {:.0} ms)",
            f.bytes / MIB,
            f.placement,
            f.node,
            if f.wiped {
                "wiped (data truncated to a hole, tags zeroed)"
            } else {
                "left as it was"
            },
            f.publish_ms,
            f.stage_ms
        );
        println!(
            "  every copy in sync {:.0} ms after NodeStage returned: {:.1} MiB/s; rebuilt copy identical to n1's: {}",
            f.rebuild_ms,
            f.rebuild_mib_s,
            match f.identical {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "not compared",
            }
        );
        if let Some(m) = f.rebuilt_mib_reported {
            println!("  the engine's count: {m} MiB rebuilt");
        }
        println!("  condition after: {}", f.condition);
    }
    if let Some(s) = &r.snapshot_stall {
        println!();
        println!(
            "snapshots while writing ({}; {} interleaved rounds)",
            s.setup, s.rounds
        );
        println!(
            "  writes outside any snapshot: {} 4 KiB write+fdatasync, median {:.2} ms, p99 {:.2} ms",
            s.writes_outside, s.outside_median_ms, s.outside_p99_ms
        );
        for (what, k) in [
            ("CreateSnapshot of a", &s.single),
            ("CreateVolumeGroupSnapshot of a and b", &s.group),
        ] {
            println!(
                "  {what}: call median {:.1} ms; longest write during it, median over rounds {:.1} ms (max {:.1} ms)",
                k.call_median_ms, k.stall_median_ms, k.stall_max_ms
            );
        }
        println!(
            "  group / single: call {:.2}x, longest write {:.2}x; failed writes {}; copies out of sync after: {}",
            s.group.call_median_ms / s.single.call_median_ms,
            s.group.stall_median_ms / s.single.stall_median_ms,
            s.failed_writes,
            s.out_of_sync
        );
    }
    if let Some(s) = &r.scrub {
        println!();
        println!(
            "scrub cost on {} ({} rounds, scrub at {} MiB/s per copy, every 1 s, against none):",
            s.setup, s.rounds, s.rate_mib_s
        );
        for j in &s.jobs {
            println!(
                "  {:<16} without {:>9.0} KiB/s {:>8.0} IOPS | with {:>9.0} KiB/s {:>8.0} IOPS | with / without {:>6.1} % (spread {:.0} % / {:.0} %); scrub reached {:.1} MiB/s",
                j.job,
                j.without.bw_kib_s,
                j.without.iops,
                j.with.bw_kib_s,
                j.with.iops,
                100.0 * j.with.bw_kib_s / j.without.bw_kib_s,
                100.0 * j.spread_without,
                100.0 * j.spread_with,
                j.scrub_mib_s
            );
        }
    }
    if let Some(h) = &r.heal {
        println!();
        println!(
            "heal cost on {} ({} rounds; against no heal):",
            h.setup, h.rounds
        );
        for j in &h.jobs {
            println!(
                "  {:<16} no heal {:>9.0} KiB/s {:>8.0} IOPS (spread {:.0} %)",
                j.job,
                j.without.bw_kib_s,
                j.without.iops,
                100.0 * j.spread_without
            );
            for (name, run) in [
                (format!("heal at {} MiB/s", h.rate_mib_s), &j.paced),
                ("unpaced heal".to_owned(), &j.unpaced),
            ] {
                println!(
                    "  {:<16} {:<16} {:>9.0} KiB/s {:>8.0} IOPS | {:>6.1} % of no heal (spread {:.0} %); the heal reached {:.1} MiB/s{}",
                    "",
                    name,
                    run.with.bw_kib_s,
                    run.with.iops,
                    100.0 * run.with.bw_kib_s / j.without.bw_kib_s,
                    100.0 * run.spread,
                    run.heal_mib_s,
                    if run.ended_early > 0 {
                        format!(" (ended before the job in {} rounds)", run.ended_early)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    if let Some(m) = &r.members {
        println!();
        println!(
            "membership change on {} ({} rounds; after 2 -> 3 -> 2 copies against before, on one publication):",
            m.setup, m.rounds
        );
        for j in &m.jobs {
            println!(
                "  {:<16} before {:>9.0} KiB/s {:>8.0} IOPS (spread {:.0} %) | after {:>9.0} KiB/s {:>8.0} IOPS (spread {:.0} %) | {:>6.1} % of before",
                j.job,
                j.before.bw_kib_s,
                j.before.iops,
                100.0 * j.spread_before,
                j.after.bw_kib_s,
                j.after.iops,
                100.0 * j.spread_after,
                100.0 * j.after.bw_kib_s / j.before.bw_kib_s
            );
        }
    }
    if let Some(d) = &r.drain {
        println!();
        println!(
            "drain of a volume of one copy of {} MiB off n1, with the controller's defaults ({} rounds; against ModifyVolume 1 -> 2, the same rebuild with no drain):",
            d.size_mib, d.rounds
        );
        for k in &d.kinds {
            println!(
                "  {:<40} rebuild {:>6.1} s (spread {:.0} %) | drain {:>6.1} s (spread {:.0} %) | {:>6.1} % of the rebuild's time",
                k.kind,
                k.rebuild_s,
                100.0 * k.spread_rebuild,
                k.drain_s,
                100.0 * k.spread_drain,
                100.0 * k.drain_s / k.rebuild_s
            );
        }
    }
    if !r.errors.is_empty() {
        println!();
        println!("errors:");
        for e in &r.errors {
            println!("  {e}");
        }
    }
    println!();
    println!("loadavg {}; wall time {:.0} s", r.loadavg, r.wall_s);
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(args: &Args) -> Report {
    let wall = Instant::now();
    let num = |flag: &str, default: u64| {
        args.value(flag)
            .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{flag} N")))
            .unwrap_or(default)
    };
    let size_arg = |flag: &str, default: u64| {
        let s = args
            .value(flag)
            .map_or(default, |s| support::parse_size(&s) as u64);
        s.div_ceil(MIB).max(64) * MIB
    };
    let size = size_arg("--size", 1 << 30);
    let full_size = size_arg("--full-size", 1 << 30);
    let cfg = FioConfig {
        ioengine: args
            .value("--ioengine")
            .unwrap_or_else(|| "io_uring".into()),
        runtime_s: num("--runtime", 10).max(1),
        ramp_s: num("--ramp", 1),
        size_bytes: size,
        seq_iodepth: num("--seq-iodepth", 8).max(1) as u32,
        rounds: num("--rounds", 2).max(1) as usize,
        jobs: args
            .value("--jobs")
            .map(|j| j.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    let only_fio = args.flag("--only-fio");
    let tls_mode = args
        .value("--replication-tls")
        .unwrap_or_else(|| "both".into());
    assert!(
        ["on", "off", "both"].contains(&tls_mode.as_str()),
        "--replication-tls on|off|both"
    );
    let repeats = num("--publish-repeats", 5).max(1) as usize;
    let dirty_seconds = num("--dirty-seconds", 20).max(1);
    let dirty_rate: f64 = args
        .value("--dirty-rate")
        .map_or(10.0, |v| v.parse().expect("--dirty-rate MB/s"));
    let wipe = !args.flag("--no-wipe");
    let skip_fio = args.flag("--skip-fio");
    let snapshot_rounds = num("--snapshot-rounds", 5).max(1) as usize;
    let only_snapshots = args.flag("--only-snapshots");
    let only_scrub = args.flag("--only-scrub");
    let only_heal = args.flag("--only-heal");
    let only_members = args.flag("--only-members");
    let only_drain = args.flag("--only-drain");
    let drain_size = size_arg("--drain-size", 512 << 20);
    let members_jobs: Vec<String> = args
        .value("--members-jobs")
        .unwrap_or_else(|| "seq-write,rand-write-qd1".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect();
    let heal_size = size_arg("--heal-size", 2 << 30);
    let heal_rate = num("--heal-rate", 32).max(1);
    let heal_jobs: Vec<String> = args
        .value("--heal-jobs")
        .unwrap_or_else(|| "seq-write,rand-write-qd1".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect();
    let scrub_rate = num("--scrub-rate", 16).max(1);
    let scrub_jobs: Vec<String> = args
        .value("--scrub-jobs")
        .unwrap_or_else(|| "seq-write,rand-write-qd1,rand-read-qd1".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect();

    // Every copy written in full: 3 local volumes and 1 + 2 + 3 copies
    // of `size`, three copies of `full_size`, and room for xfs.
    let pool = (9 * size + 3 * full_size.max(heal_size) + (4 << 30)).max(16 << 30);
    let node_args: Vec<String> = args
        .value("--fuse-workers")
        .map(|n| vec!["--fuse-workers".into(), n])
        .unwrap_or_default();
    let mut cl = Cluster::start(pool, &node_args).await;
    let mut errors = Vec::new();
    if only_scrub {
        let scrub = scrub_part(&mut cl, &cfg, &scrub_jobs, scrub_rate)
            .await
            .map_err(|e| errors.push(format!("scrub: {e}")))
            .ok();
        return Report {
            scrub,
            ..Report::partial(&cl, errors, wall)
        };
    }
    if only_heal {
        let heal = heal_part(&mut cl, &cfg, &heal_jobs, heal_size, heal_rate)
            .await
            .map_err(|e| errors.push(format!("heal: {e}")))
            .ok();
        return Report {
            heal,
            ..Report::partial(&cl, errors, wall)
        };
    }
    if only_members {
        let members = members_part(&mut cl, &cfg, &members_jobs)
            .await
            .map_err(|e| errors.push(format!("membership change: {e}")))
            .ok();
        return Report {
            members,
            ..Report::partial(&cl, errors, wall)
        };
    }
    if only_drain {
        let drain = drain_part(&mut cl, cfg.rounds, drain_size)
            .await
            .map_err(|e| errors.push(format!("drain: {e}")))
            .ok();
        return Report {
            drain,
            ..Report::partial(&cl, errors, wall)
        };
    }
    if only_snapshots {
        let snapshot_stall = snapshot_stall_part(&mut cl, snapshot_rounds)
            .await
            .map_err(|e| errors.push(format!("snapshot stall: {e}")))
            .ok();
        return Report {
            snapshot_stall,
            ..Report::partial(&cl, errors, wall)
        };
    }

    if tls_mode == "off" {
        cl.set_replication_tls(false).await;
    }
    let mut vols = fio_volumes(&mut cl, size).await;
    let fio = if skip_fio {
        None
    } else {
        let all: Vec<_> = vols.iter().collect();
        match fio_part(&mut cl, &cfg, &all, true).await {
            Ok(f) => Some(f),
            Err(e) => {
                errors.push(format!("fio: {e}"));
                None
            }
        }
    };
    // The same volumes with replication TLS off (every agent restarted
    // with --replication-tls=off): the writes of the volumes with copies
    // on other nodes, against the same baseline.
    let fio_plain = if skip_fio || tls_mode != "both" {
        None
    } else {
        let mut plain_cfg = cfg.clone();
        if plain_cfg.jobs.is_empty() {
            plain_cfg.jobs = ["seq-write", "rand-write-qd1", "rand-write-qd32"]
                .map(str::to_owned)
                .to_vec();
        }
        match plain_pass(&mut cl, &plain_cfg, &mut vols).await {
            Ok(f) => Some(f),
            Err(e) => {
                errors.push(format!("fio with replication TLS off: {e}"));
                None
            }
        }
    };
    let mut vols: Vec<Vol> = vols.into_iter().map(|(v, _, _)| v).collect();
    if only_fio {
        for v in vols {
            remove(&mut cl, v).await;
        }
        return Report {
            fio,
            fio_plain,
            ..Report::partial(&cl, errors, wall)
        };
    }

    let publish = match publish_part(&mut cl, repeats).await {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(format!("publish/stage: {e}"));
            None
        }
    };

    // Failover and dirty-region rebuild on the 3-copy fio volume: kill a
    // copy other than n1's.
    let rep3 = vols.pop().expect("rep3");
    let victim = *cl
        .copy_nodes(rep3.id())
        .iter()
        .rev()
        .find(|&&i| i != 1)
        .expect("a copy off n1");
    let mut dirty = BTreeSet::new();
    let mut dirty_rebuild = None;
    let failover = match failover_part(&mut cl, &rep3, victim, &mut dirty).await {
        Ok(f) => {
            match dirty_rebuild_part(
                &mut cl,
                &rep3,
                victim,
                size,
                dirty_seconds,
                dirty_rate,
                &mut dirty,
            )
            .await
            {
                Ok(d) => dirty_rebuild = Some(d),
                Err(e) => errors.push(format!("dirty-region rebuild: {e}")),
            }
            Some(f)
        }
        Err(e) => {
            errors.push(format!("failover: {e}"));
            None
        }
    };
    if cl.nodes[victim - 1].child.is_none() {
        cl.nodes[victim - 1].spawn();
        cl.nodes[victim - 1].wait_socket();
    }
    cl.wait_fresh(&[victim]).await;

    // Compare rep3's copies once its engine is stopped (flushed).
    let mut rep3 = rep3;
    let rep3_id = rep3.id().to_owned();
    let rep3_copies_identical = match down(&mut cl, &mut rep3).await {
        Ok(_) => {
            let nodes = cl.copy_nodes(&rep3_id);
            let first = cl.member_dir(nodes[0], &rep3_id).join("data");
            nodes[1..]
                .iter()
                .map(|&i| same_bytes(&first, &cl.member_dir(i, &rep3_id).join("data")))
                .collect::<Result<Vec<bool>, _>>()
                .ok()
                .map(|v| v.iter().all(|&b| b))
        }
        Err(e) => {
            errors.push(format!("rep3 down: {e}"));
            None
        }
    };
    let _ = cl
        .ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: rep3_id,
            ..Default::default()
        })
        .await;
    for v in vols {
        remove(&mut cl, v).await;
    }

    let owner_failover = match owner_failover_part(&mut cl, 256 * MIB).await {
        Ok(f) => Some(f),
        Err(e) => {
            errors.push(format!("owner failover: {e}"));
            None
        }
    };

    let full_rebuild = match full_rebuild_part(&mut cl, &cfg, full_size, wipe).await {
        Ok(f) => Some(f),
        Err(e) => {
            errors.push(format!("full rebuild: {e}"));
            None
        }
    };

    let snapshot_stall = snapshot_stall_part(&mut cl, snapshot_rounds)
        .await
        .map_err(|e| errors.push(format!("snapshot stall: {e}")))
        .ok();
    let scrub = scrub_part(&mut cl, &cfg, &scrub_jobs, scrub_rate)
        .await
        .map_err(|e| errors.push(format!("scrub: {e}")))
        .ok();
    let heal = heal_part(&mut cl, &cfg, &heal_jobs, heal_size, heal_rate)
        .await
        .map_err(|e| errors.push(format!("heal: {e}")))
        .ok();
    let members = members_part(&mut cl, &cfg, &members_jobs)
        .await
        .map_err(|e| errors.push(format!("membership change: {e}")))
        .ok();
    let drain = drain_part(&mut cl, cfg.rounds, drain_size)
        .await
        .map_err(|e| errors.push(format!("drain: {e}")))
        .ok();

    Report {
        transport: transport(&cl),
        pool_fs: "one xfs filesystem on a loop device",
        fio,
        fio_plain,
        publish,
        failover,
        owner_failover,
        dirty_rebuild,
        full_rebuild,
        snapshot_stall,
        scrub,
        heal,
        members,
        drain,
        rep3_copies_identical,
        errors,
        loadavg: loadavg(),
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

fn fio_installed() -> bool {
    Command::new("fio")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    let args = Args::from_env();
    if !fio_installed() {
        eprintln!(
            "replicated: fio not found: install the fio package (Debian: apt-get install fio)"
        );
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        // Ctrl-C drops the bench future, and with it every process, fio,
        // the mounts, loop devices and the scratch directory.
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
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
}
