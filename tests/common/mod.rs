//! Shared test harness: real pools (loop-mounted filesystem images), a real
//! `stowage serve` process on a unix socket, gRPC clients, and drop guards
//! that unmount and detach everything a test made, even when it fails.

#![allow(dead_code, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stowage::csi;
use stowage::csi::controller_client::ControllerClient;
use stowage::csi::group_controller_client::GroupControllerClient;
use stowage::csi::identity_client::IdentityClient;
use stowage::csi::node_client::NodeClient;
use stowage::os::loopdev::LoopDevice;
use tonic::transport::Channel;

pub mod checker;
pub mod cluster;
pub mod forward;
pub mod garage;
pub mod netns;
pub mod s3fs;

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;
/// How long a SIGKILLed server may take to die before a test says so.
pub const KILL_LIMIT: Duration = Duration::from_secs(30);
/// How long a crash test waits, after its kill, for the answer to a call
/// made as the kill landed. A call the kill beat to the socket can wait
/// for a connection until the server restarts, which comes only after the
/// test has its answer; after this it counts as in flight at the kill
/// (its outcome unknown).
pub const ANSWER_AFTER_KILL: Duration = Duration::from_secs(20);

/// Detaches every loop device whose backing file is below `root` (the
/// kernel defers the detach of a mounted device to its last close), then
/// unmounts every mount at or below `root`, deepest first and lazily. Loop
/// devices go first because once the pool is unmounted the kernel reports
/// their backing files relative to a detached mount, no longer under `root`.
pub fn cleanup_under(root: &Path) {
    if let Ok(list) = LoopDevice::list_attached() {
        for (d, _) in list.into_iter().filter(|(_, b)| b.starts_with(root)) {
            let _ = d.detach();
        }
    }
    for _ in 0..3 {
        let Ok(table) = stowage::os::mountinfo::MountTable::read() else {
            return;
        };
        let mut points: Vec<PathBuf> = table
            .entries
            .iter()
            .filter(|e| e.mount_point.starts_with(root))
            .map(|e| e.mount_point.clone())
            .collect();
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A scratch directory that is cleaned of mounts and loop devices, then
/// removed, when dropped.
pub struct Scratch {
    pub root: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stowage-test-{tag}-"))
            .tempdir_in("/tmp")
            .expect("make scratch dir");
        Scratch { root: dir.keep() }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        cleanup_under(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Makes a file immutable (`chattr +i`: every write to it fails with
/// EPERM, through descriptors opened before too) until dropped; or a
/// directory, whose entries can then be neither added, removed nor
/// renamed.
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn set(path: &Path) -> Self {
        let st = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .expect("run chattr");
        assert!(st.success(), "chattr +i {}", path.display());
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A child process of the test, killed (by its pid) and reaped on drop,
/// also when the test fails.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Unmounts (lazily) a filesystem the test mounted, first thing on drop
/// (declared after what must outlive the mount, e.g. the device under it).
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A filesystem of type `fs` in a sparse image, loop-mounted at
/// `<scratch>/pool-fs`. Dropped with its scratch dir.
pub fn make_pool_fs(scratch: &Scratch, fs: &str, size: u64) -> PathBuf {
    make_pool_fs_with(scratch, fs, size, "")
}

/// [`make_pool_fs`] mounted with filesystem options `data` (e.g. `prjquota`).
pub fn make_pool_fs_with(scratch: &Scratch, fs: &str, size: u64, data: &str) -> PathBuf {
    let image = scratch.root.join(format!("pool-{fs}.img"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let dev = LoopDevice::attach(&image, false).expect("attach pool image");
    stowage::os::filesystem::make(&dev.path(), fs).expect("mkfs pool");
    let mnt = scratch.root.join("pool-fs");
    std::fs::create_dir(&mnt).unwrap();
    let opts = stowage::os::mount::MountOptions::parse(&[data]).unwrap();
    stowage::os::mount::mount_filesystem(&dev.path(), &mnt, fs, &opts).expect("mount pool");
    // Detach on last close: the mount keeps it alive until unmounted.
    let _ = dev.detach();
    mnt
}

/// Paths of one test environment.
pub struct Layout {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub pool: PathBuf,
    pub staging: PathBuf,
    pub targets: PathBuf,
}

/// A running `stowage serve`.
pub struct Server {
    child: Option<Child>,
    pub layout_socket: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl Server {
    /// Starts the binary with `args` and waits for its socket to answer.
    pub fn start(socket: &Path, args: Vec<String>, log: &Path) -> Self {
        let child = spawn(&args, log);
        let mut s = Server {
            child: Some(child),
            layout_socket: socket.to_owned(),
            args,
            log: log.to_owned(),
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if std::os::unix::net::UnixStream::connect(&self.layout_socket).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "stowage serve exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("stowage serve did not listen within 20 s");
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL and reap. Panics, with what the kernel says the process
    /// is doing, if it has not died within [`KILL_LIMIT`].
    pub fn kill9(&mut self) {
        if let Err(e) = self.kill_and_reap() {
            panic!("{e}");
        }
    }

    /// SIGKILL, and wait for the exit within [`KILL_LIMIT`]. A process
    /// that SIGKILL does not end is stuck in the kernel: waiting for it
    /// would hang the test instead of failing it.
    fn kill_and_reap(&mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let _ = c.kill();
        let deadline = Instant::now() + KILL_LIMIT;
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => return Ok(()),
                Ok(None) if Instant::now() > deadline => {
                    let pid = c.id();
                    let read = |f: &str| {
                        std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default()
                    };
                    return Err(format!(
                        "stowage serve (pid {pid}) did not die within {KILL_LIMIT:?} of SIGKILL: \
                         stat {}, wchan {}, kernel stack:\n{}",
                        read("stat").trim(),
                        read("wchan"),
                        read("stack")
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("stowage serve ignored SIGTERM for 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the same server again (after kill9/terminate). Ready when
    /// the new server logs that it listens: until then a connect by path
    /// may still reach the killed server's socket, which a child forked
    /// just before the kill can hold open for a moment.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        let listening = |log: &str| {
            log.lines()
                .filter(|l| l.contains("listening") && l.contains("endpoint"))
                .count()
        };
        let before = listening(&self.log_text());
        self.child = Some(spawn(&self.args, &self.log));
        let start = Instant::now();
        while listening(&self.log_text()) == before {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("stowage serve exited with {status}: {}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "stowage serve did not listen within 20 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wait_ready();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn spawn(args: &[String], log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .env("STOWAGE_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn stowage serve")
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_reap() {
            eprintln!("{e}");
        }
    }
}

/// gRPC clients on one channel.
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub group: GroupControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// Connects to a unix socket.
pub async fn connect(socket: &Path) -> Clients {
    try_connect(socket).await.expect("connect to stowage")
}

/// Connects to a unix socket, or says why not.
pub async fn try_connect(socket: &Path) -> Result<Clients, String> {
    let channel = stowage::client::channel(&format!("unix://{}", socket.display()))
        .await
        .map_err(|e| format!("connect to stowage: {e:?}"))?;
    Ok(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        group: GroupControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

/// A pool filesystem, a state dir and a running server, all under one
/// scratch directory. Field order matters for drop: server, then scratch.
pub struct Env {
    pub server: Server,
    pub c: Clients,
    pub layout: Layout,
    pub node_id: String,
    pub scratch: Scratch,
}

impl Env {
    /// An environment with a pool on a fresh `fs` filesystem.
    pub async fn new(fs: &str) -> Env {
        Self::with_args(fs, &[]).await
    }

    pub async fn with_args(fs: &str, extra: &[&str]) -> Env {
        Self::with_pool(fs, "", extra).await
    }

    /// An environment whose pool filesystem is mounted with `mount_data`.
    pub async fn with_pool(fs: &str, mount_data: &str, extra: &[&str]) -> Env {
        Self::with_pool_size(fs, mount_data, 4 << 30, extra).await
    }

    /// An environment with a pool filesystem of `size` bytes (sparse).
    pub async fn with_pool_size(fs: &str, mount_data: &str, size: u64, extra: &[&str]) -> Env {
        let scratch = Scratch::new(fs);
        let pool_fs = make_pool_fs_with(&scratch, fs, size, mount_data);
        let layout = Layout {
            socket: scratch.root.join("csi.sock"),
            state: pool_fs.join("state"),
            pool: pool_fs.join("pool"),
            staging: scratch.root.join("staging"),
            targets: scratch.root.join("targets"),
        };
        std::fs::create_dir(&layout.staging).unwrap();
        std::fs::create_dir(&layout.targets).unwrap();
        let node_id = "test-node".to_owned();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--endpoint".into(),
            format!("unix://{}", layout.socket.display()),
            "--node-id".into(),
            node_id.clone(),
            "--state-dir".into(),
            layout.state.display().to_string(),
            "--pool".into(),
            layout.pool.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server::start(&layout.socket, args, &scratch.root.join("server.log"));
        let c = match try_connect(&layout.socket).await {
            Ok(c) => c,
            Err(e) => panic!("{e}\nserver log:\n{}", server.log_text()),
        };
        Env {
            server,
            c,
            layout,
            node_id,
            scratch,
        }
    }

    /// Reconnects after a restart.
    pub async fn reconnect(&mut self) {
        self.c = match try_connect(&self.layout.socket).await {
            Ok(c) => c,
            Err(e) => panic!("{e}\nserver log:\n{}", self.server.log_text()),
        };
    }

    /// Stops the server (SIGTERM, waited for) and starts it again with the
    /// same arguments; connects anew.
    pub async fn restart_server(&mut self) {
        tokio::task::block_in_place(|| {
            self.server.terminate();
            self.server.restart();
        });
        self.reconnect().await;
    }

    /// `stowage status -o json` over this environment's state and pool:
    /// exit code and report.
    pub fn status(&self) -> (i32, serde_json::Value) {
        let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("status")
            .arg("--state-dir")
            .arg(&self.layout.state)
            .arg("--pool")
            .arg(&self.layout.pool)
            .args(["-o", "json"])
            .output()
            .expect("run stowage status");
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status: not JSON ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().expect("exit code"), v)
    }

    /// DeleteSnapshot of `snapshot_id` while the state's snapshot log
    /// cannot be written (made immutable): it must be INTERNAL, the record
    /// not removed. Then, with the log writable again, the retry must be OK.
    pub async fn delete_snapshot_once_its_record_can_go(&mut self, snapshot_id: &str) {
        let delete = csi::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_owned(),
            ..Default::default()
        };
        let immutable = Immutable::set(&self.layout.state.join("snapshots.log"));
        let err = self
            .c
            .controller
            .delete_snapshot(delete.clone())
            .await
            .expect_err("DeleteSnapshot answered OK with the record still there");
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        drop(immutable);
        self.c
            .controller
            .delete_snapshot(delete)
            .await
            .expect("DeleteSnapshot once the record can be removed");
    }

    /// A fresh staging directory (as a CO would make it).
    pub fn staging_dir(&self, name: &str) -> PathBuf {
        let p = self.layout.staging.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A target path whose parent exists but which itself does not.
    pub fn target_path(&self, name: &str) -> PathBuf {
        self.layout.targets.join(name)
    }
}

pub fn mount_cap(
    fs: &str,
    mode: csi::volume_capability::access_mode::Mode,
) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
    }
}

pub fn block_cap(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
    }
}

pub use csi::volume_capability::access_mode::Mode;

/// The capability for an access kind: "dir", "ext4", "xfs", "btrfs" (mount)
/// or "raw" (block).
pub fn cap_for(kind: &str) -> csi::VolumeCapability {
    match kind {
        "raw" => block_cap(Mode::SingleNodeWriter),
        "dir" => mount_cap("", Mode::SingleNodeWriter),
        fs => mount_cap(fs, Mode::SingleNodeWriter),
    }
}

/// StorageClass parameters for an access kind.
pub fn params_for(kind: &str) -> HashMap<String, String> {
    let backend = if kind == "dir" { "dir" } else { "block" };
    HashMap::from([("backend".to_owned(), backend.to_owned())])
}

pub fn create_req(name: &str, kind: &str, size: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap_for(kind)],
        parameters: params_for(kind),
        ..Default::default()
    }
}

/// Asserts a gRPC error code.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code) {
    match r {
        Ok(v) => panic!("expected {code:?}, got OK: {v:?}"),
        Err(s) => assert_eq!(s.code(), code, "unexpected status: {s:?}"),
    }
}

/// Volume helpers over the clients.
impl Env {
    pub async fn create(&mut self, name: &str, kind: &str, size: i64) -> csi::Volume {
        self.c
            .controller
            .create_volume(create_req(name, kind, size))
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
    }

    pub async fn stage(
        &mut self,
        vol: &str,
        kind: &str,
        staging: &Path,
    ) -> Result<(), tonic::Status> {
        self.c
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap_for(kind)),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn publish(
        &mut self,
        vol: &str,
        kind: &str,
        staging: &Path,
        target: &Path,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.c
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap_for(kind)),
                readonly,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&mut self, vol: &str, target: &Path) -> Result<(), tonic::Status> {
        self.c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(drop)
    }

    pub async fn unstage(&mut self, vol: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.c
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(drop)
    }

    pub async fn delete(&mut self, vol: &str) -> Result<(), tonic::Status> {
        self.c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: vol.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .mounted_at(path)
        .is_some()
}

/// Loop devices backed by files under `root`.
pub fn loops_under(root: &Path) -> Vec<(LoopDevice, PathBuf)> {
    LoopDevice::list_attached()
        .unwrap()
        .into_iter()
        .filter(|(_, b)| b.starts_with(root))
        .collect()
}

/// Writes a file of pseudo-random bytes (seeded) and returns them.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every object in the pool: the entries of `<pool>/volumes/<backend>` and
/// `<pool>/snapshots/<backend>` (volume and snapshot images or directories,
/// and anything else a crash may have left there).
pub fn pool_entries(pool: &Path) -> std::collections::BTreeSet<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    for top in ["volumes", "snapshots"] {
        let Ok(backends) = std::fs::read_dir(pool.join(top)) else {
            continue;
        };
        for b in backends.flatten() {
            if let Ok(entries) = std::fs::read_dir(b.path()) {
                out.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

/// Whether someone else holds the filesystem mounted at `mountpoint`
/// frozen, found without blocking: FIFREEZE answers EBUSY on a frozen
/// filesystem; on one that was not frozen it succeeds, and the probe thaws
/// it again at once. Err for a path that is not a mount point or a freeze
/// the filesystem refuses for another reason.
pub fn is_frozen(mountpoint: &Path) -> Result<bool, stowage::os::freeze::FreezeError> {
    use stowage::os::freeze::{FreezeError, freeze, thaw};
    match freeze(mountpoint) {
        Ok(()) => thaw(mountpoint).map(|_| false),
        Err(FreezeError::AlreadyFrozen { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Thaws the filesystems at its paths when dropped, so that a test that
/// finds one frozen (and fails) does not leave it frozen: a frozen
/// filesystem blocks every writer and keeps its loop device and the pool
/// busy. Declare it after the `Env` so that it is dropped first.
#[derive(Debug, Default)]
pub struct ThawGuard {
    pub paths: Vec<PathBuf>,
}

impl ThawGuard {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        ThawGuard { paths }
    }

    /// Thaws every path that is a mount point now (idempotent; `thaw`
    /// refuses a path that is not a mount point, which is ignored here).
    pub fn thaw_all(&self) {
        for p in &self.paths {
            let _ = stowage::os::freeze::thaw(p);
        }
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        self.thaw_all();
    }
}

/// Where bytes `start..end` of `file` lie on its filesystem's disk: the
/// device byte ranges, in file order (FIEMAP, dirty data written back
/// first). Panics on a hole or an extent without a place on the disk.
pub fn disk_ranges(file: &Path, start: u64, end: u64) -> Vec<(u64, u64)> {
    let extents = stowage::os::cow::fiemap(file).expect("fiemap");
    let ranges: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.logical < end && start < e.logical + e.length)
        .map(|e| {
            assert!(e.has_location(), "{e:?}");
            let from = start.max(e.logical);
            let to = end.min(e.logical + e.length);
            (
                e.physical + (from - e.logical),
                e.physical + (to - e.logical),
            )
        })
        .collect();
    let mapped: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    assert_eq!(
        mapped,
        end - start,
        "bytes {start}..{end} of {} are not all on the disk: {extents:?}",
        file.display()
    );
    ranges
}

/// Runs `f` on a thread and waits at most `limit` for it: None if it has
/// not returned by then (it is left running; a write blocked on a frozen
/// filesystem finishes once the filesystem is thawed). A hang detector,
/// not a timing assertion: pick a limit far above the expected duration.
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}
