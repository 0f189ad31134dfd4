//! What the pool image costs and what it buys: two `stowage serve`s in one
//! run, each on its own fresh ext4 pool filesystem (a loop-mounted sparse
//! image in a scratch dir, as the tests make them):
//!
//! - `native`: `--pool-image never`: the pool is a directory on the ext4
//!   filesystem; snapshots and clones are sparse copies, made while the
//!   source volume's staged filesystem is frozen (the baseline);
//! - `image`: the default (`--pool-image auto`): the pool is kept in a
//!   sparse xfs image `<pool>.xfs.img` on that ext4 filesystem, loop-mounted
//!   at the pool directory; snapshots and clones are reflinks.
//!
//! Part 1, the data path: on a published ext4 block volume (and a dir
//! volume), O_DIRECT sequential 1 MiB writes of a fresh file in a fresh
//! volume ("first write": every layer allocates), the same again over the
//! written file ("overwrite"), a sequential read, and 4 KiB random writes
//! each followed by fdatasync and 4 KiB random reads, at QD1. Each round
//! provisions a new volume of each kind on both servers and runs every job
//! on one and right after on the other (who goes first alternates), so each
//! round gives a ratio image/native measured under the same conditions; the
//! median of those ratios is the image's cost (throughput: below 100 % is
//! slower; latency: above 100 % is slower). The spread of the ratios shows
//! how far to trust it: on a shared or virtual disk it is often tens of %.
//!
//! Part 2, the write stall: a published ext4 block volume is filled with
//! `--written` bytes; a writer thread does 4 KiB pwrite + fdatasync in a
//! loop on a file in it, timing each; then, `--repeat` times, CreateSnapshot
//! is called (and repeated until ready_to_use), CreateVolume clones the
//! volume, and both are deleted, with 0.5 s of quiet before each; before
//! them, as a control, the bench itself freezes and thaws the volume's
//! filesystem (FIFREEZE, FITHAW), as stowage does around every snapshot and
//! clone of a staged volume: what no copy method can save. Reported
//! per server and operation: the time (to ready), and the p50/p99/longest
//! latency of the writes that overlapped the operations, beside the writer's
//! latency in the quiet stretches. The project's goal is that no write
//! stalls more than 100 ms because of a snapshot.
//!
//! Run as root (needs mkfs.ext4 and mkfs.xfs); it takes a minute or two:
//!
//! ```text
//! cargo bench --bench pool_image -- [--written 1Gi] [--size 256Mi] [--ops 2000]
//!     [--rounds 5] [--kinds ext4,dir] [--repeat 3] [--no-clone] [--logs DIR] [--json]
//! ```
//!
//! `--logs DIR` keeps the two servers' debug logs (`DIR/native.log`,
//! `DIR/image.log`), which time each step of a snapshot.
//!
//! Every server, mount and loop device lives under the two scratch dirs and
//! is removed when the bench ends, also on a panic.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use stowage::csi;
use stowage::os::loopdev::LoopDevice;
use stowage::os::mountinfo::MountTable;
use support::{Args, Driver, Published, VolumeSpec};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// The file the stall writer rewrites, inside the volume.
const WRITER_FILE_SIZE: u64 = 16 * MIB;
/// How long the writer runs undisturbed before each operation.
const QUIET: Duration = Duration::from_millis(500);
/// The project's bound on a write stall caused by a snapshot.
const STALL_GOAL_MS: f64 = 100.0;

// ---------------------------------------------------------------- I/O ----

/// A zeroed buffer aligned for O_DIRECT.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + BLOCK];
        let off = (BLOCK - buf.as_ptr() as usize % BLOCK) % BLOCK;
        Aligned { buf, off, len }
    }
    fn get(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A small xorshift generator: incompressible data and random offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
    /// A block-aligned offset below `size`.
    fn block_offset(&mut self, size: u64) -> u64 {
        (self.next() % (size / BLOCK as u64)) * BLOCK as u64
    }
}

/// Opens `path` for reading and writing with O_DIRECT, or without it when
/// the filesystem refuses (then the figures include the page cache, and the
/// report says so through `direct`).
fn open_direct(path: &Path, create: bool) -> (File, bool) {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create).truncate(false);
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            (o.open(path).expect("open without O_DIRECT"), false)
        }
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

/// Writes `size` bytes sequentially in 1 MiB blocks, then fsyncs; MiB/s.
fn seq_write(path: &Path, size: u64, rng: &mut Rng) -> (f64, bool) {
    let (f, direct) = open_direct(path, true);
    let mut buf = Aligned::new(MIB as usize);
    rng.fill(buf.get_mut());
    let start = Instant::now();
    let mut off = 0;
    while off < size {
        // Change the block a little so nothing below can dedupe it.
        buf.get_mut()[..8].copy_from_slice(&rng.next().to_le_bytes());
        f.write_all_at(buf.get(), off).expect("sequential write");
        off += MIB;
    }
    f.sync_all().expect("fsync");
    (mib_per_s(size, start.elapsed()), direct)
}

/// Reads `size` bytes sequentially in 1 MiB blocks; MiB/s.
fn seq_read(path: &Path, size: u64) -> f64 {
    let (f, _) = open_direct(path, false);
    let mut buf = Aligned::new(MIB as usize);
    let start = Instant::now();
    let mut off = 0;
    while off < size {
        f.read_exact_at(buf.get_mut(), off)
            .expect("sequential read");
        off += MIB;
    }
    mib_per_s(size, start.elapsed())
}

/// `ops` 4 KiB writes at random offsets of the first `size` bytes, each
/// followed by fdatasync; the latency of each pair.
fn rand_write(path: &Path, size: u64, ops: usize, rng: &mut Rng) -> Vec<Duration> {
    let (f, _) = open_direct(path, false);
    let mut buf = Aligned::new(BLOCK);
    rng.fill(buf.get_mut());
    (0..ops)
        .map(|_| {
            let off = rng.block_offset(size);
            buf.get_mut()[..8].copy_from_slice(&rng.next().to_le_bytes());
            let start = Instant::now();
            f.write_all_at(buf.get(), off).expect("random write");
            f.sync_data().expect("fdatasync");
            start.elapsed()
        })
        .collect()
}

/// `ops` 4 KiB reads at random offsets of the first `size` bytes.
fn rand_read(path: &Path, size: u64, ops: usize, rng: &mut Rng) -> Vec<Duration> {
    let (f, _) = open_direct(path, false);
    let mut buf = Aligned::new(BLOCK);
    (0..ops)
        .map(|_| {
            let off = rng.block_offset(size);
            let start = Instant::now();
            f.read_exact_at(buf.get_mut(), off).expect("random read");
            start.elapsed()
        })
        .collect()
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// The `q` quantile (0..=1) of `samples`, in ms.
fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (max − min) / median; 0 for one value.
fn spread(v: &[f64]) -> f64 {
    let lo = v.iter().copied().fold(f64::MAX, f64::min);
    let hi = v.iter().copied().fold(f64::MIN, f64::max);
    (hi - lo) / median(v)
}

fn sync_all_filesystems() {
    nix::unistd::sync();
}

// ------------------------------------------------------------ servers ----

/// One `stowage serve` and what the bench knows about it.
struct Side {
    /// "native" or "image".
    name: &'static str,
    d: Driver,
    work: PathBuf,
    /// Last: dropped after the volumes' users are gone; its drop kills the
    /// server and unmounts and detaches everything under its scratch dir.
    env: common::Env,
}

impl Side {
    async fn start(name: &'static str, extra: &[&str], pool_size: u64) -> Side {
        eprintln!(
            "start the {name} server ({} MiB ext4 pool)",
            pool_size / MIB
        );
        let env = common::Env::with_pool_size("ext4", "", pool_size, extra).await;
        let d = Driver::discover(&format!("unix://{}", env.layout.socket.display())).await;
        let work = env.scratch.root.join("bench");
        std::fs::create_dir_all(&work).unwrap();
        Side { name, d, work, env }
    }

    /// How the pool is placed: a directory on ext4, or an xfs image mounted
    /// at the pool directory (and the image's loop device).
    fn describe_pool(&self) -> (bool, String) {
        let pool = &self.env.layout.pool;
        let table = MountTable::read().expect("mount table");
        match table.mounted_at(pool) {
            Some(m) => {
                let image = m.fs_type == "xfs";
                (
                    image,
                    format!(
                        "pool is {} from {}; {}",
                        m.fs_type,
                        m.source,
                        describe_dev(&m.source)
                    ),
                )
            }
            None => {
                let m = table
                    .containing(pool)
                    .expect("the pool is mounted somewhere");
                (
                    false,
                    format!(
                        "pool is a directory on {} from {}; {}",
                        m.fs_type,
                        m.source,
                        describe_dev(&m.source)
                    ),
                )
            }
        }
    }
}

/// A loop device's backing file and whether it uses direct I/O.
fn describe_dev(source: &str) -> String {
    match LoopDevice::from_path(Path::new(source)) {
        Some(d) => format!(
            "loop{} dio={} backing {}",
            d.number(),
            u8::from(d.direct_io()),
            d.backing_file()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "?".into())
        ),
        None => "not a loop device".into(),
    }
}

/// What a published volume's staging mount sits on.
fn describe_volume(p: &Published) -> String {
    let table = MountTable::read().expect("mount table");
    match table.mounted_at(&p.staging) {
        Some(m) => format!("{} on {}", m.fs_type, describe_dev(&m.source)),
        None => match table.containing(&p.target) {
            Some(m) => format!("bind of a directory on {} ({})", m.fs_type, m.source),
            None => "?".into(),
        },
    }
}

fn spec(kind: &str, size: u64) -> VolumeSpec {
    let block = kind != "dir";
    VolumeSpec {
        block: false,
        fs_type: if block { kind.into() } else { String::new() },
        size: size as i64,
        parameters: [(
            "backend".to_owned(),
            if block { "block" } else { "dir" }.to_owned(),
        )]
        .into(),
    }
}

/// Thaws a staged filesystem when dropped, so a panic while a snapshot
/// holds it frozen cannot leave the writer thread (and the process) stuck.
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = stowage::os::freeze::thaw(&self.0);
    }
}

// ---------------------------------------------------------- data path ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Metric {
    FirstWrite,
    Overwrite,
    SeqRead,
    RandWriteP50,
    RandWriteP99,
    RandReadP50,
    RandReadP99,
}

impl Metric {
    const ALL: [Metric; 7] = [
        Metric::FirstWrite,
        Metric::Overwrite,
        Metric::SeqRead,
        Metric::RandWriteP50,
        Metric::RandWriteP99,
        Metric::RandReadP50,
        Metric::RandReadP99,
    ];
    fn label(self) -> &'static str {
        match self {
            Metric::FirstWrite => "seq write, first (MiB/s)",
            Metric::Overwrite => "seq write, overwrite (MiB/s)",
            Metric::SeqRead => "seq read (MiB/s)",
            Metric::RandWriteP50 => "4k write+fdatasync p50 (ms)",
            Metric::RandWriteP99 => "4k write+fdatasync p99 (ms)",
            Metric::RandReadP50 => "4k read p50 (ms)",
            Metric::RandReadP99 => "4k read p99 (ms)",
        }
    }
    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::FirstWrite | Metric::Overwrite | Metric::SeqRead
        )
    }
}

/// The jobs of one round, in order; each yields one or more metrics.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Sequential write of a new file (every layer allocates).
    FirstWrite,
    Overwrite,
    SeqRead,
    RandWrite,
    RandRead,
}

const JOBS: [Job; 5] = [
    Job::FirstWrite,
    Job::Overwrite,
    Job::SeqRead,
    Job::RandWrite,
    Job::RandRead,
];

/// Runs `job` on the file `path`; returns its metrics and whether O_DIRECT
/// was used.
fn run_job(
    job: Job,
    path: &Path,
    size: u64,
    ops: usize,
    rng: &mut Rng,
) -> (Vec<(Metric, f64)>, bool) {
    match job {
        Job::FirstWrite => {
            let (v, direct) = seq_write(path, size, rng);
            (vec![(Metric::FirstWrite, v)], direct)
        }
        Job::Overwrite => {
            let (v, direct) = seq_write(path, size, rng);
            (vec![(Metric::Overwrite, v)], direct)
        }
        Job::SeqRead => (vec![(Metric::SeqRead, seq_read(path, size))], true),
        Job::RandWrite => {
            let w = rand_write(path, size, ops, rng);
            (
                vec![
                    (Metric::RandWriteP50, quantile_ms(&w, 0.5)),
                    (Metric::RandWriteP99, quantile_ms(&w, 0.99)),
                ],
                true,
            )
        }
        Job::RandRead => {
            let r = rand_read(path, size, ops, rng);
            (
                vec![
                    (Metric::RandReadP50, quantile_ms(&r, 0.5)),
                    (Metric::RandReadP99, quantile_ms(&r, 0.99)),
                ],
                true,
            )
        }
    }
}

#[derive(Debug, Serialize)]
struct DataRow {
    kind: String,
    metric: &'static str,
    higher_is_better: bool,
    /// Medians over the rounds.
    native: f64,
    image: f64,
    /// The median over the rounds of image / native, each round's pair
    /// measured back to back.
    ratio: f64,
    /// (max − min) / median of the per-round ratios.
    ratio_spread: f64,
    rounds_native: Vec<f64>,
    rounds_image: Vec<f64>,
}

/// Each round: a fresh volume of each kind on both servers, then every job
/// on one and right after on the other (who goes first alternates).
async fn data_path(
    sides: &mut [Side; 2],
    o: &Options,
    setup: &mut BTreeMap<String, String>,
) -> Vec<DataRow> {
    // runs[kind][side][metric] = one value per round
    let mut runs: BTreeMap<String, [BTreeMap<Metric, Vec<f64>>; 2]> = BTreeMap::new();
    for round in 0..o.rounds {
        for kind in &o.kinds {
            eprintln!("round {}/{}: {kind} volumes", round + 1, o.rounds);
            let vsize = o.size * 2 + 256 * MIB;
            let name = format!("dp-{kind}-{round}");
            let mut published = Vec::new();
            for side in sides.iter_mut() {
                let p =
                    support::provision(&mut side.d, &spec(kind, vsize), &name, &side.work).await;
                setup
                    .entry(format!("{} {kind} volume", side.name))
                    .or_insert_with(|| describe_volume(&p));
                published.push(p);
            }
            // The same offsets and data on both.
            let seed = 0x5EED_0000 + round as u64;
            let mut rngs = [Rng(seed), Rng(seed)];
            let slots = runs.entry(kind.clone()).or_default();
            for (j, job) in JOBS.into_iter().enumerate() {
                let order = if (round + j) % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let file = published[i].target.join("bench.dat");
                    let (size, ops, mut rng) = (o.size, o.ops, Rng(rngs[i].0));
                    let (m, direct, rng) = tokio::task::spawn_blocking(move || {
                        let (m, direct) = run_job(job, &file, size, ops, &mut rng);
                        (m, direct, rng)
                    })
                    .await
                    .expect("measurement thread");
                    rngs[i] = rng;
                    if !direct {
                        setup.insert(
                            format!("{} {kind} O_DIRECT", sides[i].name),
                            "refused: buffered I/O (figures include the page cache)".into(),
                        );
                    }
                    for (k, v) in m {
                        slots[i].entry(k).or_default().push(v);
                    }
                }
            }
            for (side, p) in sides.iter_mut().zip(&published) {
                support::teardown(&mut side.d, p).await;
            }
        }
    }
    let mut rows = Vec::new();
    for kind in &o.kinds {
        let r = &runs[kind];
        for m in Metric::ALL {
            let (n, im) = (&r[0][&m], &r[1][&m]);
            let ratios: Vec<f64> = n.iter().zip(im).map(|(n, i)| i / n).collect();
            rows.push(DataRow {
                kind: kind.clone(),
                metric: m.label(),
                higher_is_better: m.higher_is_better(),
                native: median(n),
                image: median(im),
                ratio: median(&ratios),
                ratio_spread: spread(&ratios),
                rounds_native: n.clone(),
                rounds_image: im.clone(),
            });
        }
    }
    rows
}

// -------------------------------------------------------------- stall ----

/// One timed write of the stall writer: when it started (since the epoch)
/// and how long write + fdatasync took.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Duration,
    took: Duration,
}

/// Rewrites 4 KiB blocks of `path` with fdatasync until `stop`.
fn stall_writer(path: PathBuf, stop: Arc<AtomicBool>, epoch: Instant) -> Vec<Sample> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the writer's file");
    let mut rng = Rng(0xC0FFEE);
    let mut buf = vec![0u8; BLOCK];
    let mut samples = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        rng.fill(&mut buf[..8]);
        let off = rng.block_offset(WRITER_FILE_SIZE);
        let t = Instant::now();
        f.write_all_at(&buf, off).expect("stall writer: write");
        f.sync_data().expect("stall writer: fdatasync");
        samples.push(Sample {
            start: t - epoch,
            took: t.elapsed(),
        });
    }
    samples
}

/// Latencies of the writes that overlapped some windows.
#[derive(Debug, Clone, Copy, Serialize)]
struct WindowStats {
    writes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Writes that took longer than the goal (100 ms).
    over_goal: usize,
}

/// The writes that overlapped any of `windows` (`[from, to]` each).
fn window_stats(samples: &[Sample], windows: &[(Duration, Duration)]) -> WindowStats {
    stats(samples.iter().filter(|s| {
        windows
            .iter()
            .any(|&(from, to)| s.start <= to && s.start + s.took >= from)
    }))
}

/// The writes that lay wholly within one of `windows`.
fn within_stats(samples: &[Sample], windows: &[(Duration, Duration)]) -> WindowStats {
    stats(samples.iter().filter(|s| {
        windows
            .iter()
            .any(|&(from, to)| s.start >= from && s.start + s.took <= to)
    }))
}

fn stats<'a>(samples: impl Iterator<Item = &'a Sample>) -> WindowStats {
    let d: Vec<Duration> = samples.map(|s| s.took).collect();
    WindowStats {
        writes: d.len(),
        p50_ms: quantile_ms(&d, 0.5),
        p99_ms: quantile_ms(&d, 0.99),
        max_ms: quantile_ms(&d, 1.0),
        over_goal: d
            .iter()
            .filter(|t| t.as_secs_f64() * 1e3 > STALL_GOAL_MS)
            .count(),
    }
}

/// One snapshot or clone under the writer.
#[derive(Debug, Serialize)]
struct StallRep {
    /// CreateSnapshot until ready_to_use; CreateVolume's duration.
    time_ms: f64,
    during: WindowStats,
}

/// All repetitions of one operation on one server.
#[derive(Debug, Serialize)]
struct StallRow {
    server: &'static str,
    /// "freeze" (FIFREEZE + FITHAW by the bench: the control), "snapshot"
    /// or "clone".
    op: &'static str,
    time_ms_median: f64,
    time_ms_max: f64,
    /// The writes that overlapped any repetition.
    during: WindowStats,
    /// The writer with nothing going on (before the first snapshot and
    /// between the operations).
    quiet: WindowStats,
    reps: Vec<StallRep>,
}

async fn create_snapshot_until_ready(d: &mut Driver, req: &csi::CreateSnapshotRequest) -> String {
    loop {
        let s = d
            .controller
            .create_snapshot(req.clone())
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        if s.ready_to_use {
            return s.snapshot_id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// CreateVolume, repeated while the source is busy (ABORTED: the snapshot
/// copy's thread may still hold the volume for a moment after ready).
async fn create_volume_retrying(d: &mut Driver, req: &csi::CreateVolumeRequest) -> csi::Volume {
    loop {
        match d.controller.create_volume(req.clone()).await {
            Ok(r) => return r.into_inner().volume.expect("volume"),
            Err(s) if s.code() == tonic::Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(s) => panic!("CreateVolume (clone): {s:?}"),
        }
    }
}

/// Lets the writer run undisturbed for [`QUIET`]; records the stretch.
async fn rest(epoch: Instant, quiet: &mut Vec<(Duration, Duration)>) {
    let from = epoch.elapsed();
    tokio::time::sleep(QUIET).await;
    quiet.push((from, epoch.elapsed()));
}

/// Fills a volume, starts the writer, then `o.repeat` times: a freeze and
/// thaw of the volume's filesystem by the bench itself (the control), a
/// snapshot (until ready), a clone, and their deletion, with quiet gaps
/// between.
async fn stall(side: &mut Side, o: &Options) -> Vec<StallRow> {
    let vspec = spec("ext4", o.written + WRITER_FILE_SIZE + 512 * MIB);
    let tag = format!("stall-{}", side.name);
    let p = support::provision(&mut side.d, &vspec, &tag, &side.work).await;
    eprintln!(
        "{}: fill the volume with {} MiB",
        side.name,
        o.written / MIB
    );
    let fill = p.target.join("fill.dat");
    let wfile = p.target.join("writer.dat");
    let written = o.written;
    tokio::task::spawn_blocking(move || {
        let mut rng = Rng(0xF111);
        if written > 0 {
            seq_write(&fill, written, &mut rng);
        }
        seq_write(&wfile, WRITER_FILE_SIZE, &mut rng);
        sync_all_filesystems();
    })
    .await
    .expect("fill");
    let thaw_guard = ThawOnDrop(p.staging.clone());

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, stop) = (p.target.join("writer.dat"), Arc::clone(&stop));
        std::thread::spawn(move || stall_writer(path, stop, epoch))
    };
    // (op, from, to) of every operation, and the quiet stretches.
    let mut windows: Vec<(&'static str, Duration, Duration)> = Vec::new();
    let mut quiet: Vec<(Duration, Duration)> = Vec::new();
    for rep in 0..o.repeat {
        // The control: what freezing the volume's filesystem alone costs
        // the writer (every snapshot and clone of a staged block volume
        // freezes it, whatever the copy costs).
        rest(epoch, &mut quiet).await;
        let from = epoch.elapsed();
        let staging = p.staging.clone();
        tokio::task::spawn_blocking(move || {
            stowage::os::freeze::FrozenFs::new(&staging)
                .expect("freeze the volume")
                .thaw()
                .expect("thaw the volume")
        })
        .await
        .expect("freeze thread");
        windows.push(("freeze", from, epoch.elapsed()));

        rest(epoch, &mut quiet).await;
        eprintln!("{}: CreateSnapshot ({}/{})", side.name, rep + 1, o.repeat);
        let from = epoch.elapsed();
        let req = csi::CreateSnapshotRequest {
            source_volume_id: p.volume.volume_id.clone(),
            name: format!("{tag}-snap-{rep}"),
            ..Default::default()
        };
        let snapshot_id = create_snapshot_until_ready(&mut side.d, &req).await;
        windows.push(("snapshot", from, epoch.elapsed()));

        let mut clone_id = None;
        if o.clone {
            rest(epoch, &mut quiet).await;
            eprintln!(
                "{}: CreateVolume (clone) ({}/{})",
                side.name,
                rep + 1,
                o.repeat
            );
            let mut req = vspec.create_request(&format!("{tag}-clone-{rep}"), &side.d);
            req.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: p.volume.volume_id.clone(),
                    },
                )),
            });
            let from = epoch.elapsed();
            let v = create_volume_retrying(&mut side.d, &req).await;
            windows.push(("clone", from, epoch.elapsed()));
            clone_id = Some(v.volume_id);
        }
        // Deleting is not timed: its windows count as neither.
        rest(epoch, &mut quiet).await;
        if let Some(id) = clone_id {
            side.d
                .controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                })
                .await
                .expect("DeleteVolume (clone)");
        }
        side.d
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id,
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
    }
    rest(epoch, &mut quiet).await;
    stop.store(true, Ordering::Relaxed);
    let samples = writer.join().expect("stall writer");
    drop(thaw_guard);
    support::teardown(&mut side.d, &p).await;

    let quiet = within_stats(&samples, &quiet);
    ["freeze", "snapshot", "clone"]
        .into_iter()
        .filter_map(|op| {
            let w: Vec<(Duration, Duration)> = windows
                .iter()
                .filter(|(o, _, _)| *o == op)
                .map(|&(_, f, t)| (f, t))
                .collect();
            if w.is_empty() {
                return None;
            }
            let times: Vec<f64> = w
                .iter()
                .map(|(f, t)| (*t - *f).as_secs_f64() * 1e3)
                .collect();
            Some(StallRow {
                server: side.name,
                op,
                time_ms_median: median(&times),
                time_ms_max: times.iter().copied().fold(0.0, f64::max),
                during: window_stats(&samples, &w),
                quiet,
                reps: w
                    .iter()
                    .zip(&times)
                    .map(|(win, t)| StallRep {
                        time_ms: *t,
                        during: window_stats(&samples, std::slice::from_ref(win)),
                    })
                    .collect(),
            })
        })
        .collect()
}

// ------------------------------------------------------------- report ----

#[derive(Debug, Clone, Serialize)]
struct Options {
    written: u64,
    size: u64,
    ops: usize,
    rounds: usize,
    kinds: Vec<String>,
    clone: bool,
    /// Snapshots (and clones) per server in the stall part.
    repeat: usize,
    pool_size: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    options: Options,
    setup: BTreeMap<String, String>,
    data_path: Vec<DataRow>,
    stall: Vec<StallRow>,
    /// image / native of the longest write and of the median time, per op.
    stall_ratios: BTreeMap<String, (f64, f64)>,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn print_report(r: &Report) {
    let o = &r.options;
    println!(
        "pool image vs native ext4: two stowage servers, each on a fresh {} MiB ext4 pool \
         filesystem; native = --pool-image never, image = default (xfs image in the pool's \
         filesystem)",
        o.pool_size / MIB
    );
    for (k, v) in &r.setup {
        println!("  {k:<22} {v}");
    }
    println!();
    println!(
        "1. data path: {} MiB file, 1 MiB sequential blocks (O_DIRECT, fsync at the end), \
         {} random 4 KiB ops at QD1; median of {} round(s), fresh volumes each round",
        o.size / MIB,
        o.ops,
        o.rounds
    );
    println!(
        "{:<5} {:<30} {:>10} {:>10} {:>13} {:>8}",
        "kind", "measure", "native", "image", "image/native", "spread"
    );
    for row in &r.data_path {
        println!(
            "{:<5} {:<30} {:>10.3} {:>10.3} {:>13} {:>8}",
            row.kind,
            row.metric,
            row.native,
            row.image,
            pct(row.ratio),
            pct(row.ratio_spread),
        );
    }
    println!(
        "(image/native: the median of the rounds' ratios, each round's pair measured back to \
         back; throughput below 100% = the image is slower, latency above 100% = slower; \
         spread = (max−min)/median of those ratios)"
    );
    println!();
    println!(
        "2. write stall: staged ext4 block volume holding {} MiB, a writer doing 4 KiB \
         pwrite+fdatasync in a loop; {} snapshot(s){} per server; latencies of the writes \
         that overlapped the operations",
        o.written / MIB,
        o.repeat,
        if o.clone { " and clone(s)" } else { "" }
    );
    println!(
        "{:<8} {:<6} {:>9} {:>9} {:>7} {:>8} {:>8} {:>9} {:>6}   {:>17}",
        "op",
        "server",
        "time ms",
        "max time",
        "writes",
        "p50 ms",
        "p99 ms",
        "max ms",
        ">100ms",
        "quiet p50/p99/max"
    );
    for s in &r.stall {
        println!(
            "{:<8} {:<6} {:>9.1} {:>9.1} {:>7} {:>8.2} {:>8.2} {:>9.1} {:>6}   {:.2}/{:.2}/{:.1}",
            s.op,
            s.server,
            s.time_ms_median,
            s.time_ms_max,
            s.during.writes,
            s.during.p50_ms,
            s.during.p99_ms,
            s.during.max_ms,
            s.during.over_goal,
            s.quiet.p50_ms,
            s.quiet.p99_ms,
            s.quiet.max_ms,
        );
    }
    println!(
        "(time ms: median over the repetitions of CreateSnapshot until ready_to_use, of the \
         clone's CreateVolume, or of the bench's own FIFREEZE+FITHAW of the volume (freeze: \
         the control; stowage freezes a staged volume for every snapshot and clone); quiet: \
         the writer with nothing else going on)"
    );
    for s in &r.stall {
        println!(
            "  {} {} per repetition: {}",
            s.server,
            s.op,
            s.reps
                .iter()
                .map(|r| format!(
                    "{:.0} ms (longest write {:.1} ms)",
                    r.time_ms, r.during.max_ms
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (op, (stall, time)) in &r.stall_ratios {
        println!(
            "{op}: image/native longest write {}, median time {}",
            pct(*stall),
            pct(*time)
        );
    }
    for s in r.stall.iter().filter(|s| s.op != "freeze") {
        let ok = s.during.max_ms <= STALL_GOAL_MS;
        println!(
            "goal (no write stalls more than {STALL_GOAL_MS} ms) {} {}: {}",
            s.op,
            s.server,
            if ok { "met" } else { "MISSED" }
        );
    }
}

fn main() {
    let args = Args::from_env();
    let size_arg = |flag: &str, default: &str| {
        support::parse_size(&args.value(flag).unwrap_or_else(|| default.into())) as u64
    };
    let written = size_arg("--written", "1Gi");
    let size = size_arg("--size", "256Mi").max(MIB) / MIB * MIB;
    let o = Options {
        written: written / MIB * MIB,
        size,
        ops: args
            .value("--ops")
            .map(|s| s.parse().expect("--ops"))
            .unwrap_or(2000),
        rounds: args
            .value("--rounds")
            .map(|s| s.parse().expect("--rounds"))
            .unwrap_or(5)
            .max(1),
        kinds: args
            .value("--kinds")
            .unwrap_or_else(|| "ext4,dir".into())
            .split(',')
            .map(str::to_owned)
            .collect(),
        clone: !args.flag("--no-clone"),
        repeat: args
            .value("--repeat")
            .map(|s| s.parse().expect("--repeat"))
            .unwrap_or(3)
            .max(1),
        // The filled volume, its snapshot and its clone as full copies
        // (native), with room to spare; sparse, so only what is written
        // takes space.
        pool_size: (3 * (written + 1024 * MIB) + 2048 * MIB).max(4096 * MIB),
    };
    for k in &o.kinds {
        assert!(
            matches!(k.as_str(), "ext4" | "xfs" | "dir"),
            "--kinds: ext4, xfs or dir, not {k}"
        );
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let mut sides = [
            Side::start("native", &["--pool-image", "never"], o.pool_size).await,
            Side::start("image", &[], o.pool_size).await,
        ];
        let mut setup = BTreeMap::new();
        for (side, want_image) in sides.iter().zip([false, true]) {
            let (image, text) = side.describe_pool();
            assert_eq!(
                image, want_image,
                "the {} server's pool is not placed as expected: {text}",
                side.name
            );
            setup.insert(format!("{} pool", side.name), text);
        }
        let data_path = data_path(&mut sides, &o, &mut setup).await;
        let mut stall_rows = Vec::new();
        for side in sides.iter_mut() {
            sync_all_filesystems();
            stall_rows.extend(stall(side, &o).await);
        }
        let mut stall_ratios = BTreeMap::new();
        for op in ["freeze", "snapshot", "clone"] {
            let find = |server| stall_rows.iter().find(|s| s.op == op && s.server == server);
            if let (Some(n), Some(i)) = (find("native"), find("image")) {
                stall_ratios.insert(
                    op.to_owned(),
                    (
                        i.during.max_ms / n.during.max_ms,
                        i.time_ms_median / n.time_ms_median,
                    ),
                );
            }
        }
        if let Some(dir) = args.value("--logs") {
            std::fs::create_dir_all(&dir).expect("create the --logs dir");
            for side in &sides {
                let to = Path::new(&dir).join(format!("{}.log", side.name));
                std::fs::copy(&side.env.server.log, &to).expect("copy a server log");
            }
        }
        Report {
            options: o.clone(),
            setup,
            data_path,
            stall: stall_rows,
            stall_ratios,
        }
        // `sides` drops here: servers killed, scratch dirs cleaned.
    });
    if args.flag("--json") {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print_report(&report);
    }
}
