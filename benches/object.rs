//! Object volumes (issue 12): what stowage adds to the data path of an
//! s3fs-mounted bucket, how long snapshots and restores of object volumes
//! take next to a raw server-side copy, and what the node plugin and its
//! s3fs daemons cost in memory. Everything runs against a real Garage
//! (`common::garage`) and a real `stowage serve` (mode all, on a unix
//! socket) that the bench starts, with its state in a scratch directory
//! under /tmp. Three parts:
//!
//! 1. Data path. A stowage object volume (CreateVolume, NodeStageVolume,
//!    NodePublishVolume; I/O on the target path, a bind of the staging
//!    path, itself a bind of the plugin's private s3fs mount) against the
//!    same s3fs started by the bench through
//!    `stowage::backend::object::mounter::Mounter` with the options the
//!    node plugin uses (allow_other, no uid/gid/umask), on the same kind of
//!    bucket (a bucket of its own, or a prefix of a shared bucket with
//!    `--shared-bucket`), its runtime directory on the same filesystem as
//!    the plugin's. Per side and round: a sequential write of `--size`
//!    bytes in 1 MiB writes, fsync, close; `echo 3 >
//!    /proc/sys/vm/drop_caches`; a sequential read, checked byte for byte;
//!    then `--files` files of `--file-size` bytes created by `--writers`
//!    threads in a fresh directory, and that directory listed (readdir and
//!    lstat of every entry). Every round writes data no earlier round
//!    wrote (Garage deduplicates blocks). Rounds are interleaved (a, b, then
//!    b, a, ...), and the median of the per-round ratios stowage/raw is
//!    reported; the issue allows stowage at most 10 % over raw s3fs.
//! 2. Snapshot and restore. For each data set (`--big-objects` objects of
//!    1 MiB, `--small-objects` of 4 KiB) a source volume is filled through
//!    `S3Client::put_object` (`--upload-concurrency` requests in flight),
//!    then timed: CreateSnapshot until ListSnapshots shows it ready;
//!    CreateVolume from that snapshot (the copy happens inside the call);
//!    and as the baseline `S3Client::copy_prefix` of the same objects with
//!    the options the controller uses (`CopyOptions::default()`) to a
//!    bucket (or prefix) made beforehand. Seconds, objects/s and the
//!    ratios to the baseline, per `--snap-rounds` round (order alternated).
//! 3. Memory. The plugin's VmRSS (from /proc/PID/status) right after it
//!    started, with `--volumes` object volumes staged, and after they
//!    were unstaged and deleted again; the s3fs daemons' VmRSS counted
//!    separately (summed, and per daemon). The plugin runs the controller
//!    and the node service in one process (`--mode all`).
//!
//! Run as root (FUSE and bind mounts, drop_caches), with s3fs and Garage
//! installed (`STOWAGE_GARAGE`, `garage` on PATH or /opt/stowage-ci):
//!
//!     cargo bench --bench object -- [--size 64Mi] [--files 500]
//!         [--file-size 4Ki] [--writers 4] [--rounds 7]
//!         [--big-objects 100] [--small-objects 1000] [--snap-rounds 3]
//!         [--upload-concurrency 32] [--volumes 50] [--shared-bucket]
//!         [--parts memory,data,snapshot] [--json]
//!
//! The defaults run in a few minutes on two cores. The full size:
//!
//!     cargo bench --bench object -- --size 1Gi --files 10000 \
//!         --big-objects 1000 --small-objects 10000
//!
//! Garage frees the blocks of deleted objects only after about ten
//! minutes, so the data path needs about 2 × rounds × size of free disk
//! (plus `--size` for s3fs's staging file); with little disk, lower
//! `--rounds`.
//!
//! Cleanup on every path (end, panic, Ctrl-C): at the end every volume is
//! unpublished, unstaged and deleted through CSI, the bench's own s3fs
//! unmounted and its bucket removed, the server stopped. Whatever remains
//! after a panic or an interrupt is removed by drop guards: the server is
//! killed (by PID), every mount under the scratch directory detached, the
//! s3fs daemons mounting there ended (by PID, after their mount is gone),
//! the scratch directory removed, and Garage stopped with its data.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::garage::Garage;
use common::{Clients, Server};
use stowage::backend::object::mounter::{Credentials as MountCredentials, MountSpec, Mounter};
use stowage::backend::object::s3::{CopyOptions, Credentials as S3Credentials, S3Client, S3Config};
use stowage::backend::object::{CTX_BUCKET, CTX_PREFIX};
use stowage::csi;
use support::Args;

const MIB: usize = 1 << 20;
/// The bound on stowage's data path overhead over raw s3fs.
const OVERHEAD_LIMIT: f64 = 1.10;
/// Upper bound of any wait for a snapshot to become ready.
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(1800);
const POLL: Duration = Duration::from_millis(20);

// ------------------------------------------------------------ processes and mounts

/// Live (not zombie) s3fs processes whose command line names a path under
/// `root`: the daemons of this bench's mounts.
fn s3fs_under(root: &Path) -> BTreeSet<u32> {
    let needle = format!("{}/", root.display());
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let mut argv = raw.split(|&b| b == 0).filter(|a| !a.is_empty());
        let is_s3fs = argv
            .next()
            .is_some_and(|a0| Path::new(&*String::from_utf8_lossy(a0)).ends_with("s3fs"));
        if is_s3fs && argv.any(|a| String::from_utf8_lossy(a).contains(&needle)) && alive(pid) {
            out.insert(pid);
        }
    }
    out
}

/// Whether `pid` runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Waits (bounded) until none of `pids` runs; those still running.
fn wait_gone(pids: &BTreeSet<u32>, limit: Duration) -> BTreeSet<u32> {
    let start = Instant::now();
    loop {
        let left: BTreeSet<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || start.elapsed() > limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A /proc/PID/status field in KiB (VmRSS).
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

/// The bench's scratch directory (state, pool, staging and target paths,
/// the raw s3fs's mount point and runtime files). Dropped after the
/// server is killed: detaches every mount under it, ends the s3fs daemons
/// that mounted there (by PID), and removes it.
struct Site {
    root: PathBuf,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::Builder::new()
            .prefix("stowage-bench-object-")
            .tempdir_in("/tmp")
            .expect("make the scratch dir");
        Site { root: dir.keep() }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        common::cleanup_under(&self.root);
        // A detached FUSE mount ends its daemon once nothing holds it.
        let left = wait_gone(&s3fs_under(&self.root), Duration::from_secs(10));
        for &pid in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let left = wait_gone(&left, Duration::from_secs(10));
        if !left.is_empty() {
            eprintln!("s3fs daemons {left:?} survived SIGKILL");
        }
        common::cleanup_under(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Runs blocking work (file I/O, mounts) off the runtime's threads, so
/// that Ctrl-C is noticed meanwhile; a panic there is resumed here.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("blocking task: {e}"),
        },
    }
}

// ------------------------------------------------------------ the bench

#[derive(Debug, Clone)]
struct Opts {
    parts: Vec<String>,
    size: u64,
    files: usize,
    file_size: usize,
    writers: usize,
    rounds: usize,
    big_objects: usize,
    small_objects: usize,
    snap_rounds: usize,
    upload_concurrency: usize,
    volumes: usize,
    shared: bool,
}

impl Opts {
    fn parse(a: &Args) -> Opts {
        let num = |flag: &str, default: usize| {
            a.value(flag).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{flag}: expected a number, got {v:?}"))
            })
        };
        let size = |flag: &str, default: &str| {
            let v = support::parse_size(&a.value(flag).unwrap_or_else(|| default.to_owned()));
            assert!(v > 0, "{flag} must be positive");
            v as u64
        };
        let parts: Vec<String> = a
            .value("--parts")
            .unwrap_or_else(|| "memory,data,snapshot".into())
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for p in &parts {
            assert!(
                ["memory", "data", "snapshot"].contains(&p.as_str()),
                "--parts: unknown part {p:?} (memory, data, snapshot)"
            );
        }
        Opts {
            parts,
            size: size("--size", "64Mi"),
            files: num("--files", 500),
            file_size: size("--file-size", "4Ki") as usize,
            writers: num("--writers", 4).max(1),
            rounds: num("--rounds", 7).max(1),
            big_objects: num("--big-objects", 100),
            small_objects: num("--small-objects", 1000),
            snap_rounds: num("--snap-rounds", 3).max(1),
            upload_concurrency: num("--upload-concurrency", 32).max(1),
            volumes: num("--volumes", 50),
            shared: a.flag("--shared-bucket"),
        }
    }

    fn part(&self, p: &str) -> bool {
        self.parts.iter().any(|x| x == p)
    }
}

/// Field order is drop order: the server is killed first, then the
/// scratch directory's mounts and daemons go, then Garage.
struct Bench {
    server: Server,
    c: Clients,
    site: Site,
    garage: Garage,
    s3: S3Client,
    mounter: Arc<Mounter>,
    /// The shared bucket of `--shared-bucket`.
    shared: Option<String>,
    params: HashMap<String, String>,
    secrets: HashMap<String, String>,
}

impl Bench {
    async fn setup(opts: &Opts) -> Bench {
        let site = Site::new();
        let garage = blocking(Garage::start).await;
        let root = site.root.clone();
        for d in ["staging", "targets", "raw"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        let socket = root.join("csi.sock");
        let args: Vec<String> = vec![
            "serve".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--node-id".into(),
            "bench-node".into(),
            "--state-dir".into(),
            root.join("state").display().to_string(),
            "--pool".into(),
            root.join("pool").display().to_string(),
            "--pool-image".into(),
            "never".into(),
        ];
        let server = Server::start(&socket, args, &root.join("server.log"));
        let c = match common::try_connect(&socket).await {
            Ok(c) => c,
            Err(e) => panic!("{e}\nserver log:\n{}", server.log_text()),
        };
        let s3 = S3Client::new(
            &S3Config {
                endpoint: garage.endpoint.clone(),
                region: garage.region.clone(),
            },
            S3Credentials {
                access_key_id: garage.key.access_key_id.clone(),
                secret_access_key: garage.key.secret_access_key.clone(),
            },
        )
        .expect("S3 client");
        let mut params = HashMap::from([
            ("backend".to_owned(), "object".to_owned()),
            ("endpoint".to_owned(), garage.endpoint.clone()),
            ("region".to_owned(), garage.region.clone()),
        ]);
        let shared = if opts.shared {
            let b = "objbench-shared".to_owned();
            s3.create_bucket(&b)
                .await
                .expect("create the shared bucket");
            params.insert("bucket".into(), b.clone());
            Some(b)
        } else {
            None
        };
        let secrets = HashMap::from([
            ("accessKeyID".to_owned(), garage.key.access_key_id.clone()),
            (
                "secretAccessKey".to_owned(),
                garage.key.secret_access_key.clone(),
            ),
        ]);
        Bench {
            server,
            c,
            mounter: Arc::new(Mounter::new(root.join("raw").join("runtime"))),
            site,
            garage,
            s3,
            shared,
            params,
            secrets,
        }
    }

    fn root(&self) -> &Path {
        &self.site.root
    }

    fn log_tail(&self) -> String {
        let log = self.server.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn pid(&self) -> u32 {
        self.server.pid() as u32
    }

    async fn create_volume(&self, name: &str, snapshot: Option<&str>) -> csi::Volume {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: common::GIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            parameters: self.params.clone(),
            secrets: self.secrets.clone(),
            volume_content_source: snapshot.map(|id| csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: id.into(),
                    },
                )),
            }),
            ..Default::default()
        };
        self.c
            .controller
            .clone()
            .create_volume(req)
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}\n{}", self.log_tail()))
            .into_inner()
            .volume
            .expect("a volume")
    }

    async fn delete_volume(&self, id: &str) {
        self.c
            .controller
            .clone()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: self.secrets.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume {id}: {e:?}\n{}", self.log_tail()));
    }

    async fn stage(&self, vol: &csi::Volume, staging: &Path) {
        std::fs::create_dir_all(staging).unwrap();
        self.c
            .node
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap()),
                secrets: self.secrets.clone(),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeStageVolume: {e:?}\n{}", self.log_tail()));
    }

    async fn unstage(&self, vol: &csi::Volume, staging: &Path) {
        self.c
            .node
            .clone()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnstageVolume: {e:?}\n{}", self.log_tail()));
    }

    async fn publish(&self, vol: &csi::Volume, staging: &Path, target: &Path) {
        self.c
            .node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodePublishVolume: {e:?}\n{}", self.log_tail()));
    }

    async fn unpublish(&self, vol: &csi::Volume, target: &Path) {
        self.c
            .node
            .clone()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume: {e:?}\n{}", self.log_tail()));
    }

    /// A bucket (own-bucket mode) or a prefix of the shared bucket for the
    /// bench's own use, as the controller would lay out a volume's.
    async fn raw_location(&self, name: &str) -> (String, String) {
        match &self.shared {
            Some(b) => (b.clone(), format!("{name}/")),
            None => {
                self.s3
                    .create_bucket(name)
                    .await
                    .unwrap_or_else(|e| panic!("create bucket {name}: {e}"));
                (name.to_owned(), String::new())
            }
        }
    }

    /// Empties and removes what [`Bench::raw_location`] made.
    async fn drop_raw_location(&self, bucket: &str, prefix: &str) {
        self.s3
            .delete_prefix(bucket, prefix)
            .await
            .unwrap_or_else(|e| panic!("empty {bucket}/{prefix}: {e}"));
        if prefix.is_empty() {
            self.s3
                .delete_bucket(bucket)
                .await
                .unwrap_or_else(|e| panic!("delete bucket {bucket}: {e}"));
        }
    }
}

fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
    }
}

/// Where an object volume lives: (bucket, prefix).
fn location(vol: &csi::Volume) -> (String, String) {
    let get = |k: &str| {
        vol.volume_context
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("volume_context lacks {k}: {:?}", vol.volume_context))
    };
    (get(CTX_BUCKET), get(CTX_PREFIX))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ------------------------------------------------------------ data

/// Content no other (tag, index) pair has: 1 MiB of random bytes, with
/// the tag and the index in its first 16 bytes. Garage stores 1 MiB
/// blocks by hash, so every chunk written is a block of its own.
struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    fn new() -> Pattern {
        let mut base = vec![0u8; MIB];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
        for c in base.chunks_mut(8) {
            // xorshift64*: incompressible enough for zstd.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Pattern { base }
    }

    /// Fills `buf` (at most 1 MiB) with chunk `index` of data set `tag`.
    fn fill(&self, tag: u64, index: u64, buf: &mut [u8]) {
        let n = buf.len();
        buf.copy_from_slice(&self.base[..n]);
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&tag.to_le_bytes());
        head[8..].copy_from_slice(&index.to_le_bytes());
        let k = n.min(16);
        buf[..k].copy_from_slice(&head[..k]);
    }

    fn chunk(&self, tag: u64, index: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(tag, index, &mut v);
        v
    }
}

fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("echo 3 > /proc/sys/vm/drop_caches");
}

/// Writes `size` bytes of data set `tag` to `path` in 1 MiB writes, fsyncs
/// and closes; the time of all that.
fn write_big(p: &Pattern, path: &Path, size: u64, tag: u64) -> Duration {
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
    let mut done = 0u64;
    let mut i = 0u64;
    while done < size {
        let n = (size - done).min(MIB as u64) as usize;
        p.fill(tag, i, &mut buf[..n]);
        f.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        done += n as u64;
        i += 1;
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {path:?}: {e}"));
    drop(f);
    start.elapsed()
}

/// Reads `path` sequentially in 1 MiB reads and checks it holds what
/// [`write_big`] wrote (checking is not timed).
fn read_big(p: &Pattern, path: &Path, size: u64, tag: u64) -> Duration {
    let mut buf = vec![0u8; MIB];
    let mut want = vec![0u8; MIB];
    let mut taken = Duration::ZERO;
    let start = Instant::now();
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    taken += start.elapsed();
    let mut done = 0u64;
    let mut i = 0u64;
    loop {
        let t = Instant::now();
        let mut n = 0;
        while n < MIB {
            let r = f
                .read(&mut buf[n..])
                .unwrap_or_else(|e| panic!("read {path:?}: {e}"));
            if r == 0 {
                break;
            }
            n += r;
        }
        taken += t.elapsed();
        if n == 0 {
            break;
        }
        p.fill(tag, i, &mut want[..n]);
        assert!(
            buf[..n] == want[..n],
            "{path:?}: MiB {i} differs from what was written"
        );
        done += n as u64;
        i += 1;
    }
    let t = Instant::now();
    drop(f);
    taken += t.elapsed();
    assert_eq!(done, size, "{path:?}: read back {done} bytes of {size}");
    taken
}

/// Creates `n` files of `size` bytes in the new directory `dir` from
/// `writers` threads (write, close: s3fs uploads on close).
fn create_files(
    p: &Pattern,
    dir: &Path,
    n: usize,
    size: usize,
    writers: usize,
    tag: u64,
) -> Duration {
    let start = Instant::now();
    std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..writers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let data = p.chunk(tag, i as u64, size);
                    let path = dir.join(format!("f{i:06}"));
                    std::fs::write(&path, &data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
                }
            });
        }
    });
    start.elapsed()
}

/// Lists `dir` and lstats every entry (`ls -l`); checks there are `n`
/// files of `size` bytes.
fn list_files(dir: &Path, n: usize, size: usize) -> Duration {
    let start = Instant::now();
    let mut count = 0;
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {dir:?}: {e}")) {
        let e = e.unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"));
        let md = std::fs::symlink_metadata(e.path())
            .unwrap_or_else(|err| panic!("lstat {:?}: {err}", e.path()));
        assert_eq!(md.len(), size as u64, "{:?}", e.path());
        count += 1;
    }
    let taken = start.elapsed();
    assert_eq!(count, n, "{dir:?} lists {count} files, {n} were created");
    taken
}

// ------------------------------------------------------------ part 1: data path

#[derive(Debug, Clone, Copy, serde::Serialize)]
enum Side {
    Stowage,
    Raw,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct SideRound {
    write_s: f64,
    read_s: f64,
    create_s: f64,
    list_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct Metric {
    name: String,
    stowage_median_s: f64,
    raw_median_s: f64,
    /// MiB/s or files/s at the medians.
    unit: &'static str,
    stowage_rate: f64,
    raw_rate: f64,
    /// Median of the per-round ratios stowage/raw.
    ratio_median: f64,
    ratios: Vec<f64>,
}

#[derive(Debug, serde::Serialize)]
struct DataReport {
    bucket_mode: &'static str,
    size_bytes: u64,
    files: usize,
    file_size: usize,
    writers: usize,
    rounds: usize,
    stowage: Vec<SideRound>,
    raw: Vec<SideRound>,
    metrics: Vec<Metric>,
    overhead_limit: f64,
    worst_ratio: f64,
}

async fn one_side(p: &Arc<Pattern>, o: &Opts, dir: &Path, round: usize, side: Side) -> SideRound {
    let tag = ((round as u64) << 8) | side as u64;
    let big = dir.join(format!("big-{round}"));
    let (pa, size, path) = (Arc::clone(p), o.size, big.clone());
    let write = blocking(move || write_big(&pa, &path, size, tag)).await;
    blocking(drop_caches).await;
    let (pa, path) = (Arc::clone(p), big.clone());
    let read = blocking(move || read_big(&pa, &path, size, tag)).await;
    blocking(move || std::fs::remove_file(&big).expect("remove the big file")).await;

    let files = dir.join(format!("files-{round}"));
    let (pa, path, n, fs, w) = (
        Arc::clone(p),
        files.clone(),
        o.files,
        o.file_size,
        o.writers,
    );
    let create = blocking(move || create_files(&pa, &path, n, fs, w, tag | (1 << 40))).await;
    let list = blocking(move || list_files(&files, n, fs)).await;
    SideRound {
        write_s: write.as_secs_f64(),
        read_s: read.as_secs_f64(),
        create_s: create.as_secs_f64(),
        list_s: list.as_secs_f64(),
    }
}

async fn data_path(b: &Bench, o: &Opts) -> DataReport {
    let root = b.root().to_owned();
    // (a) a stowage object volume, staged and published.
    let vol = b.create_volume("bench-data", None).await;
    let staging = root.join("staging").join("data");
    let target = root.join("targets").join("data");
    b.stage(&vol, &staging).await;
    b.publish(&vol, &staging, &target).await;

    // (b) the same s3fs, started by hand with the plugin's options.
    let (bucket, prefix) = b.raw_location("objbench-raw").await;
    let raw = root.join("raw").join("mnt");
    std::fs::create_dir(&raw).unwrap();
    let spec = MountSpec {
        bucket: bucket.clone(),
        prefix: (!prefix.is_empty()).then(|| prefix.trim_end_matches('/').to_owned()),
        endpoint: b.garage.endpoint.clone(),
        region: b.garage.region.clone(),
        read_only: false,
        uid: None,
        gid: None,
        umask: None,
        allow_other: true,
    };
    let creds = MountCredentials {
        access_key_id: b.garage.key.access_key_id.clone(),
        secret_access_key: b.garage.key.secret_access_key.clone(),
    };
    let (m, mnt) = (Arc::clone(&b.mounter), raw.clone());
    let daemon = blocking(move || {
        m.mount("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", &spec, &creds, &mnt)
            .unwrap_or_else(|e| panic!("raw s3fs mount: {e}"))
    })
    .await;

    let p = Arc::new(Pattern::new());
    let (mut a_rounds, mut b_rounds) = (Vec::new(), Vec::new());
    for r in 0..o.rounds {
        let order = if r % 2 == 0 {
            [Side::Stowage, Side::Raw]
        } else {
            [Side::Raw, Side::Stowage]
        };
        for side in order {
            match side {
                Side::Stowage => a_rounds.push(one_side(&p, o, &target, r, side).await),
                Side::Raw => b_rounds.push(one_side(&p, o, &raw, r, side).await),
            }
        }
        eprintln!(
            "data round {}/{}: write {:.2}/{:.2} s, read {:.2}/{:.2} s, create {:.2}/{:.2} s, list {:.2}/{:.2} s (stowage/raw)",
            r + 1,
            o.rounds,
            a_rounds[r].write_s,
            b_rounds[r].write_s,
            a_rounds[r].read_s,
            b_rounds[r].read_s,
            a_rounds[r].create_s,
            b_rounds[r].create_s,
            a_rounds[r].list_s,
            b_rounds[r].list_s,
        );
    }

    let (m, mnt) = (Arc::clone(&b.mounter), raw.clone());
    blocking(move || {
        m.unmount(&mnt, &daemon)
            .unwrap_or_else(|e| panic!("raw s3fs unmount: {e}"))
    })
    .await;
    b.drop_raw_location(&bucket, &prefix).await;
    b.unpublish(&vol, &target).await;
    b.unstage(&vol, &staging).await;
    b.delete_volume(&vol.volume_id).await;

    let size_mib = o.size as f64 / MIB as f64;
    let metric = |name: String, unit: &'static str, work: f64, get: fn(&SideRound) -> f64| {
        let a: Vec<f64> = a_rounds.iter().map(get).collect();
        let r: Vec<f64> = b_rounds.iter().map(get).collect();
        let ratios: Vec<f64> = a.iter().zip(&r).map(|(x, y)| x / y).collect();
        let (ma, mr) = (median(&a), median(&r));
        Metric {
            name,
            stowage_median_s: ma,
            raw_median_s: mr,
            unit,
            stowage_rate: work / ma,
            raw_rate: work / mr,
            ratio_median: median(&ratios),
            ratios,
        }
    };
    let files = o.files as f64;
    let metrics = vec![
        metric(format!("write {}", human(o.size)), "MiB/s", size_mib, |s| {
            s.write_s
        }),
        metric(format!("read {}", human(o.size)), "MiB/s", size_mib, |s| {
            s.read_s
        }),
        metric(
            format!("create {} x {}", o.files, human(o.file_size as u64)),
            "files/s",
            files,
            |s| s.create_s,
        ),
        metric(format!("list {} files", o.files), "files/s", files, |s| {
            s.list_s
        }),
    ];
    let worst = metrics
        .iter()
        .map(|m| m.ratio_median)
        .fold(f64::NEG_INFINITY, f64::max);
    DataReport {
        bucket_mode: if o.shared {
            "prefix of a shared bucket"
        } else {
            "bucket of its own"
        },
        size_bytes: o.size,
        files: o.files,
        file_size: o.file_size,
        writers: o.writers,
        rounds: o.rounds,
        stowage: a_rounds,
        raw: b_rounds,
        metrics,
        overhead_limit: OVERHEAD_LIMIT,
        worst_ratio: worst,
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

// ------------------------------------------------------------ part 2: snapshots

#[derive(Debug, Clone, serde::Serialize)]
struct SnapRound {
    copy_prefix_s: f64,
    snapshot_s: f64,
    restore_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct SnapReport {
    name: String,
    objects: usize,
    object_size: usize,
    upload_s: f64,
    rounds: Vec<SnapRound>,
    copy_prefix_median_s: f64,
    snapshot_median_s: f64,
    restore_median_s: f64,
    copy_prefix_objects_per_s: f64,
    snapshot_objects_per_s: f64,
    restore_objects_per_s: f64,
    /// snapshot / copy_prefix, at the medians.
    snapshot_ratio: f64,
    /// restore / copy_prefix, at the medians.
    restore_ratio: f64,
}

/// Puts `n` objects of `size` bytes under `bucket`/`prefix` with
/// `concurrency` requests in flight.
async fn upload(b: &Bench, bucket: &str, prefix: &str, n: usize, size: usize, concurrency: usize) {
    let p = Arc::new(Pattern::new());
    let next = Arc::new(AtomicUsize::new(0));
    // A JoinSet aborts its tasks when dropped (a panic, Ctrl-C).
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (s3, p, next) = (b.s3.clone(), Arc::clone(&p), Arc::clone(&next));
        let (bucket, prefix) = (bucket.to_owned(), prefix.to_owned());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let key = format!("{prefix}obj-{i:06}");
                s3.put_object(&bucket, &key, p.chunk(size as u64, i as u64, size))
                    .await
                    .unwrap_or_else(|e| panic!("put {bucket}/{key}: {e}"));
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        if let Err(e) = t {
            match e.try_into_panic() {
                Ok(p) => std::panic::resume_unwind(p),
                Err(e) => panic!("upload task: {e}"),
            }
        }
    }
}

/// Objects under `bucket`/`prefix`.
async fn count(b: &Bench, bucket: &str, prefix: &str) -> u64 {
    b.s3.usage(bucket, prefix)
        .await
        .unwrap_or_else(|e| panic!("usage of {bucket}/{prefix}: {e}"))
        .0
}

/// CreateSnapshot, then ListSnapshots until it is ready: (id, seconds).
async fn snapshot_until_ready(b: &Bench, source: &str, name: &str) -> (String, f64) {
    let start = Instant::now();
    let snap =
        b.c.controller
            .clone()
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                secrets: b.secrets.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e:?}\n{}", b.log_tail()))
            .into_inner()
            .snapshot
            .expect("a snapshot");
    let mut ready = snap.ready_to_use;
    while !ready {
        assert!(
            start.elapsed() < SNAPSHOT_LIMIT,
            "snapshot {name} not ready after {SNAPSHOT_LIMIT:?}\n{}",
            b.log_tail()
        );
        tokio::time::sleep(POLL).await;
        let list =
            b.c.controller
                .clone()
                .list_snapshots(csi::ListSnapshotsRequest {
                    snapshot_id: snap.snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("ListSnapshots {name}: {e:?}\n{}", b.log_tail()))
                .into_inner();
        ready = list
            .entries
            .iter()
            .filter_map(|e| e.snapshot.as_ref())
            .any(|s| s.snapshot_id == snap.snapshot_id && s.ready_to_use);
    }
    (snap.snapshot_id, start.elapsed().as_secs_f64())
}

async fn delete_snapshot(b: &Bench, id: &str) {
    b.c.controller
        .clone()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            secrets: b.secrets.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("DeleteSnapshot {id}: {e:?}\n{}", b.log_tail()));
}

async fn snapshots(b: &Bench, o: &Opts, name: &str, n: usize, size: usize) -> SnapReport {
    let src = b.create_volume(&format!("bench-snap-{name}"), None).await;
    let (bucket, prefix) = location(&src);
    let t = Instant::now();
    upload(b, &bucket, &prefix, n, size, o.upload_concurrency).await;
    let upload_s = t.elapsed().as_secs_f64();
    assert_eq!(
        count(b, &bucket, &prefix).await,
        n as u64,
        "uploaded objects"
    );
    eprintln!(
        "snapshot set {name}: {n} objects of {} uploaded in {upload_s:.1} s",
        human(size as u64)
    );

    let mut rounds = Vec::new();
    for r in 0..o.snap_rounds {
        let mut round = SnapRound {
            copy_prefix_s: 0.0,
            snapshot_s: 0.0,
            restore_s: 0.0,
        };
        let (dst_bucket, dst_prefix) = b.raw_location(&format!("objbench-copy-{name}-{r}")).await;
        let copy_first = r % 2 == 0;
        let mut snap_id = String::new();
        let mut restored = None;
        for step in 0..2 {
            if (step == 0) == copy_first {
                let t = Instant::now();
                let stats =
                    b.s3.copy_prefix(
                        &bucket,
                        &prefix,
                        &dst_bucket,
                        &dst_prefix,
                        &CopyOptions::default(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("copy_prefix: {e}"));
                round.copy_prefix_s = t.elapsed().as_secs_f64();
                assert_eq!(stats.copied, n as u64, "copy_prefix copied {stats:?}");
            } else {
                let (id, s) =
                    snapshot_until_ready(b, &src.volume_id, &format!("snap-{name}-{r}")).await;
                round.snapshot_s = s;
                let t = Instant::now();
                let vol = b
                    .create_volume(&format!("bench-restored-{name}-{r}"), Some(&id))
                    .await;
                round.restore_s = t.elapsed().as_secs_f64();
                snap_id = id;
                restored = Some(vol);
            }
        }
        let restored = restored.expect("restored volume");
        let (rb, rp) = location(&restored);
        assert_eq!(
            count(b, &rb, &rp).await,
            n as u64,
            "restored volume's objects"
        );
        assert_eq!(
            count(b, &dst_bucket, &dst_prefix).await,
            n as u64,
            "copied objects"
        );
        eprintln!(
            "snapshot set {name} round {}/{}: copy_prefix {:.2} s, snapshot {:.2} s, restore {:.2} s",
            r + 1,
            o.snap_rounds,
            round.copy_prefix_s,
            round.snapshot_s,
            round.restore_s
        );
        b.delete_volume(&restored.volume_id).await;
        delete_snapshot(b, &snap_id).await;
        b.drop_raw_location(&dst_bucket, &dst_prefix).await;
        rounds.push(round);
    }
    b.delete_volume(&src.volume_id).await;

    let med = |f: fn(&SnapRound) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let (c, s, r) = (
        med(|x| x.copy_prefix_s),
        med(|x| x.snapshot_s),
        med(|x| x.restore_s),
    );
    let nf = n as f64;
    SnapReport {
        name: name.to_owned(),
        objects: n,
        object_size: size,
        upload_s,
        rounds,
        copy_prefix_median_s: c,
        snapshot_median_s: s,
        restore_median_s: r,
        copy_prefix_objects_per_s: nf / c,
        snapshot_objects_per_s: nf / s,
        restore_objects_per_s: nf / r,
        snapshot_ratio: s / c,
        restore_ratio: r / c,
    }
}

// ------------------------------------------------------------ part 3: memory

#[derive(Debug, serde::Serialize)]
struct MemoryReport {
    volumes: usize,
    plugin_rss_idle_mib: f64,
    plugin_rss_staged_mib: f64,
    plugin_rss_after_unstage_mib: f64,
    s3fs_daemons: usize,
    s3fs_rss_total_mib: f64,
    s3fs_rss_per_daemon_mib: f64,
    stage_median_ms: f64,
    stage_p90_ms: f64,
}

/// Lets the plugin settle (background tasks, freed memory) before a
/// reading.
const SETTLE: Duration = Duration::from_secs(2);

async fn memory_part(b: &Bench, o: &Opts, idle_kib: u64) -> MemoryReport {
    let root = b.root().to_owned();
    let before = s3fs_under(&root);
    let mut vols = Vec::new();
    let mut stage_lat = Vec::new();
    for i in 0..o.volumes {
        let vol = b.create_volume(&format!("bench-mem-{i}"), None).await;
        let staging = root.join("staging").join(format!("mem-{i}"));
        let t = Instant::now();
        b.stage(&vol, &staging).await;
        stage_lat.push(t.elapsed());
        vols.push((vol, staging));
    }
    tokio::time::sleep(SETTLE).await;
    let staged = status_kib(b.pid(), "VmRSS");
    let daemons: Vec<u32> = s3fs_under(&root).difference(&before).copied().collect();
    let daemon_kib: u64 = daemons.iter().map(|&p| status_kib(p, "VmRSS")).sum();
    assert_eq!(
        daemons.len(),
        o.volumes,
        "one s3fs daemon per staged volume expected"
    );
    for (vol, staging) in &vols {
        b.unstage(vol, staging).await;
        b.delete_volume(&vol.volume_id).await;
    }
    let left = wait_gone(&daemons.iter().copied().collect(), Duration::from_secs(20));
    assert!(
        left.is_empty(),
        "s3fs daemons {left:?} outlived their unstage"
    );
    tokio::time::sleep(SETTLE).await;
    let after = status_kib(b.pid(), "VmRSS");
    let lat = support::summarize(&stage_lat);
    MemoryReport {
        volumes: o.volumes,
        plugin_rss_idle_mib: mib(idle_kib),
        plugin_rss_staged_mib: mib(staged),
        plugin_rss_after_unstage_mib: mib(after),
        s3fs_daemons: daemons.len(),
        s3fs_rss_total_mib: mib(daemon_kib),
        s3fs_rss_per_daemon_mib: if daemons.is_empty() {
            0.0
        } else {
            mib(daemon_kib) / daemons.len() as f64
        },
        stage_median_ms: lat.median_ms,
        stage_p90_ms: lat.p90_ms,
    }
}

// ------------------------------------------------------------ report

#[derive(Debug, serde::Serialize)]
struct Report {
    memory: Option<MemoryReport>,
    data: Option<DataReport>,
    snapshots: Vec<SnapReport>,
    /// s3fs daemons of the bench still running after its teardown (0
    /// expected; the drop guards end them anyway).
    leftover_s3fs: usize,
    wall_s: f64,
}

fn print_report(r: &Report) {
    println!("stowage object volume bench (Garage on loopback, s3fs)");
    if let Some(m) = &r.memory {
        println!();
        println!("memory (plugin = `stowage serve --mode all`, VmRSS):");
        println!(
            "  plugin idle, 0 volumes staged      {:>8.1} MiB",
            m.plugin_rss_idle_mib
        );
        println!(
            "  plugin with {:>3} volumes staged     {:>8.1} MiB (+{:.1} MiB, {:.2} MiB a volume)",
            m.volumes,
            m.plugin_rss_staged_mib,
            m.plugin_rss_staged_mib - m.plugin_rss_idle_mib,
            (m.plugin_rss_staged_mib - m.plugin_rss_idle_mib) / m.volumes.max(1) as f64
        );
        println!(
            "  plugin after unstaging them        {:>8.1} MiB",
            m.plugin_rss_after_unstage_mib
        );
        println!(
            "  s3fs daemons: {} using {:.1} MiB in all, {:.1} MiB each",
            m.s3fs_daemons, m.s3fs_rss_total_mib, m.s3fs_rss_per_daemon_mib
        );
        println!(
            "  NodeStageVolume: median {:.0} ms, p90 {:.0} ms",
            m.stage_median_ms, m.stage_p90_ms
        );
    }
    if let Some(d) = &r.data {
        println!();
        println!(
            "data path: stowage volume (target path) vs raw s3fs, {} rounds interleaved, {}, {} writer thread(s) for the files:",
            d.rounds, d.bucket_mode, d.writers
        );
        println!(
            "  {:<24} {:>10} {:>10} {:>10} {:>10} {:>8}  per-round ratios",
            "", "stowage s", "raw s", "stowage", "raw", "ratio"
        );
        for m in &d.metrics {
            println!(
                "  {:<24} {:>10.3} {:>10.3} {:>10.1} {:>10.1} {:>8.3}  {:?}  ({})",
                m.name,
                m.stowage_median_s,
                m.raw_median_s,
                m.stowage_rate,
                m.raw_rate,
                m.ratio_median,
                m.ratios
                    .iter()
                    .map(|x| (x * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>(),
                m.unit
            );
        }
        println!(
            "  worst median ratio {:.3} (the issue allows {:.2}): {}",
            d.worst_ratio,
            d.overhead_limit,
            if d.worst_ratio <= d.overhead_limit {
                "within"
            } else {
                "OVER"
            }
        );
    }
    if !r.snapshots.is_empty() {
        println!();
        println!("snapshot and restore vs S3Client::copy_prefix of the same objects (medians):");
        println!(
            "  {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
            "objects",
            "copy s",
            "snap s",
            "restore s",
            "copy o/s",
            "snap o/s",
            "rest o/s",
            "snap/c",
            "rest/c"
        );
        for s in &r.snapshots {
            println!(
                "  {:<18} {:>9.2} {:>9.2} {:>9.2} {:>9.0} {:>9.0} {:>9.0} {:>7.2} {:>7.2}",
                format!(
                    "{}: {} x {}",
                    s.name,
                    s.objects,
                    human(s.object_size as u64)
                ),
                s.copy_prefix_median_s,
                s.snapshot_median_s,
                s.restore_median_s,
                s.copy_prefix_objects_per_s,
                s.snapshot_objects_per_s,
                s.restore_objects_per_s,
                s.snapshot_ratio,
                s.restore_ratio
            );
        }
    }
    println!();
    println!(
        "s3fs daemons left after teardown: {}; wall time {:.0} s",
        r.leftover_s3fs, r.wall_s
    );
}

/// Refuses to start when /tmp (Garage's data, the plugin's state and
/// s3fs's staging files) lacks the room the run needs, with 512 MiB spare
/// for the machine.
fn check_disk(o: &Opts) {
    let mut need = 512u64 << 20;
    if o.part("data") {
        need += (2 * o.rounds as u64 + 1) * o.size + 2 * (o.rounds * o.files * o.file_size) as u64;
    }
    if o.part("snapshot") {
        need += (o.big_objects * MIB + o.small_objects * (4 << 10)) as u64;
    }
    let st = nix::sys::statvfs::statvfs("/tmp").expect("statvfs /tmp");
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    assert!(
        free >= need,
        "/tmp has {} MiB free, this run needs about {} MiB (Garage keeps deleted blocks for 10 minutes): lower --size, --rounds or the object counts",
        free >> 20,
        need >> 20
    );
}

async fn run(opts: &Opts) -> Report {
    let wall = Instant::now();
    check_disk(opts);
    let mut b = Bench::setup(opts).await;
    tokio::time::sleep(SETTLE).await;
    let idle = status_kib(b.pid(), "VmRSS");
    let memory = if opts.part("memory") {
        Some(memory_part(&b, opts, idle).await)
    } else {
        None
    };
    let data = if opts.part("data") {
        Some(data_path(&b, opts).await)
    } else {
        None
    };
    let mut snaps = Vec::new();
    if opts.part("snapshot") {
        for (name, n, size) in [
            ("big", opts.big_objects, MIB),
            ("small", opts.small_objects, 4 << 10),
        ] {
            if n > 0 {
                snaps.push(snapshots(&b, opts, name, n, size).await);
            }
        }
    }
    if let Some(s) = b.shared.clone() {
        b.drop_raw_location(&s, "").await;
    }
    let status = blocking_terminate(&mut b).await;
    if !status.success() {
        eprintln!("stowage serve exited with {status}");
    }
    let leftover = s3fs_under(b.root()).len();
    Report {
        memory,
        data,
        snapshots: snaps,
        leftover_s3fs: leftover,
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

/// SIGTERM to the server and its exit status (it lets in-flight RPCs end).
async fn blocking_terminate(b: &mut Bench) -> std::process::ExitStatus {
    tokio::task::block_in_place(|| b.server.terminate())
}

fn main() {
    let args = Args::from_env();
    let opts = Opts::parse(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        // Ctrl-C drops the bench future, and with it the server, the
        // mounts, the s3fs daemons, the scratch directory and Garage.
        tokio::select! {
            r = run(&opts) => Some(r),
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
