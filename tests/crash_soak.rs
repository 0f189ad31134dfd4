//! Crash soak (issue 9): a concurrent workload of I/O with fsync,
//! snapshots, restores, clones, group snapshots, expansion, stage/publish
//! and deletes runs against the real `stowage serve`, which is killed with
//! SIGKILL at a random moment (every other round just after a copy of a
//! block volume began, when a staged source is frozen) and restarted,
//! round after round. After each restart the node is checked:
//!
//! - (a) `frozen`: no filesystem under the scratch dir is left frozen;
//! - (b) `leaked_loops`: every loop device on a file under the scratch dir
//!   is the pool's own or one a node record claims for that volume;
//! - (c) `leaked_mounts`: every mount under the scratch dir is the pool's,
//!   or a staging or publication a node record holds at that path, and
//!   none is stacked;
//! - (d) `unknown_pool_objects`: every object in the pool
//!   (`<pool>/{volumes,snapshots}/<backend>/*`) belongs to a volume or
//!   snapshot that ListVolumes or ListSnapshots returns;
//! - (e) `unusable_volumes`: every volume the CO created (and the API
//!   lists) can be staged, published, written and read, and none vanished;
//! - (f) `lost_fsynced_bytes`: every byte whose write+fsync returned reads
//!   back, on the volume, and in restores and clones made after it.
//!
//! Also counted: `lost_snapshots` (one seen ready_to_use that is gone),
//! `untracked` (volumes, snapshots and groups the API lists that no
//! CreateX the CO sent, or retried, returned), `failed_ops` (valid calls
//! answered with an error other than ABORTED, or an I/O error on a
//! published volume), and `hung_io` (writes still blocked 60 s after the
//! restart). At the end everything is removed through the API and the
//! pool must be empty (`orphans_after_cleanup`).
//!
//! Each pool type runs [`DEFAULT_ROUNDS`] rounds; `STOWAGE_CRASH_ROUNDS=<n>`
//! runs a long soak, and `STOWAGE_CRASH_SEED=<n>` replays a seed's random
//! choices (where each kill lands still depends on timing), e.g.
//! `STOWAGE_CRASH_ROUNDS=200 cargo test --release --test crash_soak -- --nocapture`.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use stowage::csi;
use stowage::os::mountinfo::{MountEntry, MountTable};
use tonic::{Code, Status};

/// Rounds per pool type unless `STOWAGE_CRASH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: usize = 3;
/// Data slots per volume: a file `slot-<k>` (mount kinds) or the range at
/// `k * SLOT_STRIDE` (raw block), rewritten whole with a seeded pattern.
const SLOTS: usize = 8;
const SLOT_STRIDE: u64 = 1 << 20;
const MAX_SLOT_LEN: usize = 256 << 10;
/// The slot index of the ballast file: data in the ext4 base volume that
/// makes its copies on a sparse-copy pool last long enough to be killed
/// in. Written once at set-up, never rewritten.
const BALLAST_SLOT: usize = SLOTS;
const BALLAST_LEN: usize = 48 << 20;
/// A pattern repeats with this period (cheap to generate and compare).
const PATTERN_PERIOD: usize = 1 << 20;
/// Caps on what the workload creates besides the base volumes.
const MAX_DERIVED_VOLUMES: usize = 4;
const MAX_SNAPSHOTS: usize = 4;
const MAX_GROUPS: usize = 2;
/// Block volumes are not expanded past this size.
const MAX_EXPAND: i64 = 512 * MIB;
/// The kill lands this long after a round starts (timed kills).
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 150..=2500;
/// Bound on waiting for blocked I/O, copies and retries after a restart
/// (hang detectors, not timing assertions).
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// The volumes every round works on: (name, access kind, size).
const BASE_VOLUMES: [(&str, &str, i64); 3] = [
    ("base-ext4", "ext4", 256 * MIB),
    ("base-raw", "raw", 64 * MIB),
    ("base-dir", "dir", 64 * MIB),
];

// ---------------------------------------------------------------------------
// Randomness.

/// xorshift64: small, seedable, no dependency.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

// ---------------------------------------------------------------------------
// Data: seeded patterns in slots.

/// What a slot must hold: the (seed, length) of the last write whose
/// fsync returned, or None when unknown (never written, or a write is or
/// was under way that did not finish).
type Content = Option<(u64, usize)>;

#[derive(Clone, Debug, Default)]
struct SlotState {
    /// Bumped when a write starts: a copy made while the version stayed
    /// the same holds `content`.
    version: u64,
    content: Content,
    /// A write or a check is using the slot (one at a time).
    busy: bool,
}

/// The pattern `seed` repeats with period `PATTERN_PERIOD`: this is one
/// period (or all of it, for a shorter length).
fn period(seed: u64, len: usize) -> Vec<u8> {
    pattern(seed, len.min(PATTERN_PERIOD))
}

/// Where slot `k` lives on a volume published at `at`: a file, or an
/// offset of the raw device.
fn slot_location(kind: &str, at: &Path, k: usize) -> (PathBuf, u64) {
    if kind == "raw" {
        (at.to_owned(), k as u64 * SLOT_STRIDE)
    } else if k == BALLAST_SLOT {
        (at.join("ballast"), 0)
    } else {
        (at.join(format!("slot-{k}")), 0)
    }
}

/// Never write into the directory under a missing mount: the data would
/// land on the host and "read back" from there.
fn require_mounted(at: &Path) -> std::io::Result<()> {
    let mounted = MountTable::read()
        .map_err(std::io::Error::other)?
        .mounted_at(at)
        .is_some();
    if mounted {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} is not mounted",
            at.display()
        )))
    }
}

/// Writes `len` bytes of the pattern `seed` into slot `k` and fsyncs.
fn write_slot(kind: &str, at: &Path, k: usize, seed: u64, len: usize) -> std::io::Result<()> {
    require_mounted(at)?;
    let (path, offset) = slot_location(kind, at, k);
    let period = period(seed, len);
    let mut f = if kind == "raw" {
        std::fs::OpenOptions::new().write(true).open(&path)?
    } else {
        std::fs::File::create(&path)?
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(period.len());
        f.write_all(&period[..n])?;
        left -= n;
    }
    f.sync_all()
}

/// Reads slot `k` and returns how many of the `len` bytes of the pattern
/// `seed` are not there (missing or different).
fn lost_bytes(kind: &str, at: &Path, k: usize, seed: u64, len: usize) -> std::io::Result<usize> {
    require_mounted(at)?;
    let (path, offset) = slot_location(kind, at, k);
    let period = period(seed, len);
    let mut f = std::fs::File::open(&path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut got = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut got)?;
    let mut lost = len - got.len();
    for chunk in got.chunks(period.len()) {
        let want = &period[..chunk.len()];
        if chunk != want {
            lost += chunk.iter().zip(want).filter(|(a, b)| a != b).count();
        }
    }
    Ok(lost)
}

// ---------------------------------------------------------------------------
// The model: what the CO knows, from acknowledged calls only.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    /// Staged and published at the volume's paths.
    Published,
}

#[derive(Debug)]
struct Vol {
    kind: &'static str,
    /// None until a CreateVolume for it is answered.
    id: Option<String>,
    base: bool,
    phase: Phase,
    capacity: i64,
    staging: PathBuf,
    target: PathBuf,
    slots: Vec<SlotState>,
    /// Calls using the volume as it is (I/O, copies, expansion).
    users: u32,
    /// A create, stage, publish, unpublish, unstage or delete is under way.
    changing: bool,
    /// Found unusable (counted once): left out of the workload and the
    /// checks from then on, removed through the API at the end.
    broken: bool,
    /// A clone's source and the source's slots when it was requested; the
    /// clone's content is settled when its CreateVolume is answered.
    clone_of: Option<(String, Vec<SlotState>)>,
    /// "base", "clone of …", "restore of …" (for reports).
    origin: String,
}

impl Vol {
    fn is_block(&self) -> bool {
        self.kind != "dir"
    }
}

#[derive(Debug)]
struct Snap {
    /// The source volume's name.
    source: String,
    kind: &'static str,
    id: Option<String>,
    /// The group (name) it belongs to.
    group: Option<String>,
    /// The source's slots when the snapshot was requested.
    sent: Vec<SlotState>,
    /// What it must hold, known once it was seen ready: the slots the
    /// source did not rewrite from the request until then.
    expected: Option<Vec<Content>>,
    /// A call on it (readiness polls, a restore from it, its delete) is
    /// under way.
    busy: bool,
}

#[derive(Debug)]
struct Group {
    id: Option<String>,
    /// The sources' slots when the group was requested, by volume name.
    sent: BTreeMap<String, Vec<SlotState>>,
    /// Its member snapshots, by name in `Model::snaps`.
    members: Vec<String>,
    /// Its create or delete is under way.
    busy: bool,
}

/// A call the kill cut short: the CO retries it after the restart.
#[derive(Clone, Debug)]
enum Pending {
    CreateVolume(String, csi::CreateVolumeRequest),
    DeleteVolume(String, String),
    Mount(String),
    Unmount(String),
    CreateSnapshot(String, csi::CreateSnapshotRequest),
    DeleteSnapshot(String, String),
    CreateGroup(String, csi::CreateVolumeGroupSnapshotRequest),
    DeleteGroup(String, String),
    Expand(String, i64),
}

/// The CO's view, by name: volumes, snapshots, groups, and the calls a
/// kill cut short.
#[derive(Debug, Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
    snaps: BTreeMap<String, Snap>,
    groups: BTreeMap<String, Group>,
    pending: Vec<Pending>,
    /// Calls left half done by an ABORTED answer, retried with `pending`
    /// (not counted as cut short by the kill).
    deferred: Vec<Pending>,
    next_name: u64,
    /// When the round's workload started.
    round_start: Option<Instant>,
    /// Operations of this round, for reports.
    log: Vec<String>,
    /// Calls answered with an unexpected error, and I/O errors.
    failed_ops: Vec<String>,
    /// Bytes that did not read back at a check during the round.
    lost: Vec<(usize, String)>,
}

impl Model {
    /// Logs an operation of the round with its time.
    fn op(&mut self, line: String) {
        let t = self.round_start.map_or(0, |s| s.elapsed().as_millis());
        self.log.push(format!("{t:>5} ms {line}"));
    }

    fn fresh(&mut self, what: &str) -> String {
        self.next_name += 1;
        format!("{what}-{}", self.next_name)
    }

    fn vol_by_id(&self, id: &str) -> Option<String> {
        self.vols
            .iter()
            .find(|(_, v)| v.id.as_deref() == Some(id))
            .map(|(n, _)| n.clone())
    }

    /// Settles what a copy of `source` requested with slots `sent` holds,
    /// now that the copy is known complete: the slots not rewritten since.
    fn settle_copy(&self, source: &str, sent: &[SlotState]) -> Vec<Content> {
        let now = self.vols.get(source).map(|v| &v.slots);
        sent.iter()
            .enumerate()
            .map(|(k, s)| {
                now.and_then(|n| n.get(k))
                    .filter(|n| n.version == s.version)
                    .and(s.content)
            })
            .collect()
    }

    /// Derived volumes (not base), those being created included.
    fn derived(&self) -> usize {
        self.vols.values().filter(|v| !v.base).count()
    }

    /// Forgets every lease of calls that ended (after a round's tasks).
    fn clear_leases(&mut self) {
        for v in self.vols.values_mut() {
            v.users = 0;
            v.changing = v.broken;
            for s in &mut v.slots {
                s.busy = false;
            }
        }
        for s in self.snaps.values_mut() {
            s.busy = false;
        }
        for g in self.groups.values_mut() {
            g.busy = false;
        }
    }
}

/// State shared by the workload tasks of a round.
struct Shared {
    model: Mutex<Model>,
    /// Set just before the kill: transport errors after it are the kill's.
    killed: AtomicBool,
    /// Set after the kill: tasks finish their call and return.
    stop: AtomicBool,
    /// Calls under way; the restart waits until none is (see [`call`]).
    calls: AtomicUsize,
}

impl Shared {
    fn m(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn failed(&self, line: String) {
        let mut m = self.m();
        m.op(format!("FAILED {line}"));
        m.failed_ops.push(line);
    }
}

/// How a call ended, as a CO sees it.
enum Answer<T> {
    Ok(T),
    /// ABORTED: another call on the same object is under way; try later.
    Busy,
    /// No answer: the server died under it. The CO retries after restart.
    Killed,
    Failed(Status),
}

fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// Makes a call of the workload, unless the round is over. A tonic channel
/// reconnects by itself, so a call sent after the kill could reach the
/// restarted server while the checks run; the kill sets `stop` and then
/// waits until `calls` is 0 before restarting (both SeqCst: either the
/// task sees `stop`, or the killer sees its call and waits for it to fail
/// on the dead server). A call not made is answered Busy: nothing done.
async fn call<T>(
    sh: &Shared,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Answer<T> {
    sh.calls.fetch_add(1, Ordering::SeqCst);
    let r = if sh.stopped() {
        Answer::Busy
    } else {
        tokio::select! {
            r = f => answer(sh, r),
            () = answer_time_over(sh) => Answer::Killed,
        }
    };
    sh.calls.fetch_sub(1, Ordering::SeqCst);
    r
}

/// Returns [`ANSWER_AFTER_KILL`] after the round's kill (never before it):
/// a call still unanswered then counts as killed.
async fn answer_time_over(sh: &Shared) {
    while !sh.killed.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(ANSWER_AFTER_KILL).await;
}

fn answer<T>(sh: &Shared, r: Result<tonic::Response<T>, Status>) -> Answer<T> {
    match r {
        Ok(r) => Answer::Ok(r.into_inner()),
        Err(s) if s.code() == Code::Aborted => Answer::Busy,
        Err(s) if is_transport(&s) && sh.killed.load(Ordering::SeqCst) => Answer::Killed,
        Err(s) => Answer::Failed(s),
    }
}

// ---------------------------------------------------------------------------
// Requests.

fn create_from(
    name: &str,
    kind: &str,
    source: csi::volume_content_source::Type,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        // No size: the source's (a block volume at least its default).
        capacity_range: None,
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(source),
        }),
        ..create_req(name, kind, 0)
    }
}

fn snapshot_source(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn volume_source(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

async fn stage_and_publish(
    c: &mut Clients,
    id: &str,
    kind: &str,
    staging: &Path,
    target: &Path,
) -> Result<(), Status> {
    c.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap_for(kind)),
            ..Default::default()
        })
        .await?;
    c.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap_for(kind)),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unpublish_and_unstage(
    c: &mut Clients,
    id: &str,
    staging: &Path,
    targets: &[PathBuf],
) -> Result<(), Status> {
    for t in targets {
        c.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: t.display().to_string(),
            })
            .await?;
    }
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .map(drop)
}

async fn expand(
    c: &mut Clients,
    id: &str,
    size: i64,
    published: Option<(&Path, &Path)>,
) -> Result<i64, Status> {
    let r = c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    if let Some((staging, target)) = published
        && r.node_expansion_required
    {
        c.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: target.display().to_string(),
                staging_target_path: staging.display().to_string(),
                ..Default::default()
            })
            .await?;
    }
    Ok(r.capacity_bytes)
}

// ---------------------------------------------------------------------------
// The workload: four kinds of tasks, each looping until the kill.

/// A short random pause between calls, to spread them (pacing only).
async fn pace(rng: &mut Rng) {
    tokio::time::sleep(Duration::from_millis(rng.below(30) as u64)).await;
}

/// Writes slots of published volumes (pattern, then fsync; the content is
/// recorded once fsync returned) and checks slots written earlier.
async fn io_task(sh: Arc<Shared>, mut rng: Rng) {
    while !sh.stopped() {
        pace(&mut rng).await;
        let check = rng.below(100) < 30;
        let pick = {
            let mut m = sh.m();
            let names: Vec<String> = m
                .vols
                .iter()
                .filter(|(_, v)| v.phase == Phase::Published && v.id.is_some() && !v.changing)
                .map(|(n, _)| n.clone())
                .collect();
            rng.pick(&names).cloned().and_then(|name| {
                let v = m.vols.get_mut(&name).unwrap();
                let slots: Vec<usize> = (0..SLOTS)
                    .filter(|&k| !v.slots[k].busy && (!check || v.slots[k].content.is_some()))
                    .collect();
                let k = *rng.pick(&slots)?;
                v.users += 1;
                let s = &mut v.slots[k];
                s.busy = true;
                if !check {
                    s.version += 1;
                    s.content = None;
                }
                Some((name, v.kind, v.target.clone(), k, s.version, s.content))
            })
        };
        let Some((name, kind, target, k, version, content)) = pick else {
            continue;
        };
        let seed = rng.next();
        let len = (1 + rng.below(MAX_SLOT_LEN / 4096)) * 4096;
        let r = tokio::task::spawn_blocking(move || match content {
            Some((seed, len)) => lost_bytes(kind, &target, k, seed, len),
            None => write_slot(kind, &target, k, seed, len).map(|()| 0),
        })
        .await
        .expect("I/O thread");
        let mut m = sh.m();
        let Some(v) = m.vols.get_mut(&name) else {
            continue;
        };
        v.users -= 1;
        let s = &mut v.slots[k];
        s.busy = false;
        let what = if check { "check" } else { "write" };
        match r {
            Ok(0) if !check && s.version == version => s.content = Some((seed, len)),
            Ok(0) => {}
            Ok(n) => m
                .lost
                .push((n, format!("{name} slot {k}: {n} bytes differ at a check"))),
            Err(e) => {
                drop(m);
                sh.failed(format!("{what} {name} slot {k}: {e}"));
                continue;
            }
        }
        if !check {
            m.op(format!("write {name} slot {k} ({len} bytes)"));
        }
    }
}

/// CreateSnapshot (then polls its readiness), restores from ready
/// snapshots, deletes snapshots.
async fn snapshot_task(sh: Arc<Shared>, mut c: Clients, mut rng: Rng, env_paths: Paths) {
    while !sh.stopped() {
        pace(&mut rng).await;
        match rng.below(100) {
            0..50 => create_snapshot(&sh, &mut c, &mut rng).await,
            50..75 => restore(&sh, &mut c, &mut rng, &env_paths).await,
            _ => delete_snapshot(&sh, &mut c, &mut rng).await,
        }
    }
}

async fn create_snapshot(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let plain = m.snaps.values().filter(|s| s.group.is_none()).count();
        let names: Vec<String> = m
            .vols
            .iter()
            .filter(|(_, v)| v.id.is_some() && !v.changing)
            .map(|(n, _)| n.clone())
            .collect();
        match rng.pick(&names).cloned() {
            Some(source) if plain < MAX_SNAPSHOTS => {
                let name = m.fresh("snap");
                let v = m.vols.get_mut(&source).unwrap();
                v.users += 1;
                let snap = Snap {
                    source: source.clone(),
                    kind: v.kind,
                    id: None,
                    group: None,
                    sent: v.slots.clone(),
                    expected: None,
                    busy: true,
                };
                let req = csi::CreateSnapshotRequest {
                    source_volume_id: v.id.clone().unwrap(),
                    name: name.clone(),
                    ..Default::default()
                };
                m.snaps.insert(name.clone(), snap);
                Some((name, source, req))
            }
            _ => None,
        }
    };
    let Some((name, source, req)) = pick else {
        return;
    };
    let r = call(sh, c.controller.create_snapshot(req.clone())).await;
    let release = |m: &mut Model| {
        if let Some(v) = m.vols.get_mut(&source) {
            v.users -= 1;
        }
    };
    let mut ready = match r {
        Answer::Ok(r) => {
            let s = r.snapshot.unwrap_or_default();
            let mut m = sh.m();
            release(&mut m);
            let snap = m.snaps.get_mut(&name).unwrap();
            snap.id = Some(s.snapshot_id.clone());
            m.op(format!(
                "CreateSnapshot {name} of {source} -> {} ready={}",
                s.snapshot_id, s.ready_to_use
            ));
            s.ready_to_use
        }
        Answer::Killed => {
            sh.m().pending.push(Pending::CreateSnapshot(name, req));
            return;
        }
        Answer::Busy | Answer::Failed(_) => {
            let mut m = sh.m();
            release(&mut m);
            m.snaps.remove(&name);
            if let Answer::Failed(s) = r {
                drop(m);
                sh.failed(format!("CreateSnapshot {name} of {source}: {s:?}"));
            }
            return;
        }
    };
    // Copy pools answer ready_to_use=false; the CO asks again (polling).
    for _ in 0..40 {
        if ready || sh.stopped() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        match call(sh, c.controller.create_snapshot(req.clone())).await {
            Answer::Ok(r) => ready = r.snapshot.is_some_and(|s| s.ready_to_use),
            Answer::Busy | Answer::Killed => {}
            Answer::Failed(s) => sh.failed(format!("CreateSnapshot {name} again: {s:?}")),
        }
    }
    let mut m = sh.m();
    if ready {
        let expected = m.settle_copy(&source, &m.snaps[&name].sent);
        m.snaps.get_mut(&name).unwrap().expected = Some(expected);
        m.op(format!("snapshot {name} ready"));
    }
    m.snaps.get_mut(&name).unwrap().busy = false;
}

/// Paths of the environment that tasks need.
#[derive(Clone, Debug)]
struct Paths {
    staging: PathBuf,
    targets: PathBuf,
}

impl Paths {
    fn new_vol(&self, name: &str, kind: &'static str, origin: String) -> Vol {
        Vol {
            kind,
            id: None,
            base: false,
            phase: Phase::Created,
            capacity: 0,
            staging: self.staging.join(name),
            target: self.targets.join(name),
            slots: vec![SlotState::default(); SLOTS + 1],
            users: 0,
            changing: true,
            broken: false,
            clone_of: None,
            origin,
        }
    }
}

async fn restore(sh: &Shared, c: &mut Clients, rng: &mut Rng, paths: &Paths) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .snaps
            .iter()
            .filter(|(_, s)| s.id.is_some() && s.expected.is_some() && !s.busy)
            .map(|(n, _)| n.clone())
            .collect();
        match rng.pick(&names).cloned() {
            Some(snap) if m.derived() < MAX_DERIVED_VOLUMES => {
                let name = m.fresh("restore");
                let s = m.snaps.get_mut(&snap).unwrap();
                s.busy = true;
                let kind = s.kind;
                let mut v = paths.new_vol(&name, kind, format!("restore of {snap}"));
                for (k, c) in s.expected.clone().unwrap().into_iter().enumerate() {
                    v.slots[k].content = c;
                }
                let req = create_from(&name, kind, snapshot_source(s.id.as_ref().unwrap()));
                m.vols.insert(name.clone(), v);
                Some((name, snap, req))
            }
            _ => None,
        }
    };
    let Some((name, snap, req)) = pick else {
        return;
    };
    let r = call(sh, c.controller.create_volume(req.clone())).await;
    let mut m = sh.m();
    if let Some(s) = m.snaps.get_mut(&snap) {
        s.busy = false;
    }
    match r {
        Answer::Ok(r) => {
            let got = r.volume.unwrap_or_default();
            m.op(format!("restore {name} from {snap} -> {}", got.volume_id));
            let v = m.vols.get_mut(&name).unwrap();
            v.id = Some(got.volume_id);
            v.capacity = got.capacity_bytes;
            v.changing = false;
        }
        Answer::Killed => m.pending.push(Pending::CreateVolume(name, req)),
        Answer::Busy => {
            m.vols.remove(&name);
        }
        Answer::Failed(s) => {
            m.vols.remove(&name);
            drop(m);
            sh.failed(format!("restore {name} from {snap}: {s:?}"));
        }
    }
}

async fn delete_snapshot(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .snaps
            .iter()
            .filter(|(_, s)| s.id.is_some() && s.group.is_none() && !s.busy)
            .map(|(n, _)| n.clone())
            .collect();
        rng.pick(&names).cloned().map(|n| {
            let s = m.snaps.get_mut(&n).unwrap();
            s.busy = true;
            (n, s.id.clone().unwrap())
        })
    };
    let Some((name, id)) = pick else {
        return;
    };
    let r = call(
        sh,
        c.controller.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        }),
    )
    .await;
    let mut m = sh.m();
    match r {
        Answer::Ok(_) => {
            m.snaps.remove(&name);
            m.op(format!("DeleteSnapshot {name}"));
        }
        Answer::Killed => m.pending.push(Pending::DeleteSnapshot(name, id)),
        Answer::Busy => m.snaps.get_mut(&name).unwrap().busy = false,
        Answer::Failed(s) => {
            m.snaps.get_mut(&name).unwrap().busy = false;
            drop(m);
            sh.failed(format!("DeleteSnapshot {name}: {s:?}"));
        }
    }
}

/// Clones volumes, makes and deletes group snapshots.
async fn copy_task(sh: Arc<Shared>, mut c: Clients, mut rng: Rng, paths: Paths) {
    while !sh.stopped() {
        pace(&mut rng).await;
        match rng.below(100) {
            0..40 => clone(&sh, &mut c, &mut rng, &paths).await,
            40..75 => create_group(&sh, &mut c, &mut rng).await,
            _ => delete_group(&sh, &mut c, &mut rng).await,
        }
    }
}

async fn clone(sh: &Shared, c: &mut Clients, rng: &mut Rng, paths: &Paths) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .vols
            .iter()
            .filter(|(_, v)| v.id.is_some() && !v.changing)
            .map(|(n, _)| n.clone())
            .collect();
        match rng.pick(&names).cloned() {
            Some(source) if m.derived() < MAX_DERIVED_VOLUMES => {
                let name = m.fresh("clone");
                let src = m.vols.get_mut(&source).unwrap();
                src.users += 1;
                let mut v = paths.new_vol(&name, src.kind, format!("clone of {source}"));
                v.clone_of = Some((source.clone(), src.slots.clone()));
                let req = create_from(&name, src.kind, volume_source(src.id.as_ref().unwrap()));
                m.vols.insert(name.clone(), v);
                Some((name, source, req))
            }
            _ => None,
        }
    };
    let Some((name, source, req)) = pick else {
        return;
    };
    let r = call(sh, c.controller.create_volume(req.clone())).await;
    let mut m = sh.m();
    if let Some(v) = m.vols.get_mut(&source) {
        v.users -= 1;
    }
    match r {
        Answer::Ok(r) => {
            let got = r.volume.unwrap_or_default();
            m.op(format!("clone {name} of {source} -> {}", got.volume_id));
            adopt_volume(&mut m, &name, got);
        }
        Answer::Killed => m.pending.push(Pending::CreateVolume(name, req)),
        Answer::Busy => {
            m.vols.remove(&name);
        }
        Answer::Failed(s) => {
            m.vols.remove(&name);
            drop(m);
            sh.failed(format!("clone {name} of {source}: {s:?}"));
        }
    }
}

/// Records an answered CreateVolume: its ID, and a clone's content.
fn adopt_volume(m: &mut Model, name: &str, got: csi::Volume) {
    let settled = m.vols[name]
        .clone_of
        .as_ref()
        .map(|(source, sent)| m.settle_copy(source, sent));
    let v = m.vols.get_mut(name).unwrap();
    if let Some(contents) = settled {
        for (k, c) in contents.into_iter().enumerate() {
            v.slots[k].content = c;
        }
        v.clone_of = None;
    }
    v.id = Some(got.volume_id);
    v.capacity = got.capacity_bytes;
    v.changing = false;
}

async fn create_group(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let mut names: Vec<String> = m
            .vols
            .iter()
            .filter(|(_, v)| v.id.is_some() && !v.changing)
            .map(|(n, _)| n.clone())
            .collect();
        if names.len() < 2 || m.groups.len() >= MAX_GROUPS {
            None
        } else {
            let a = names.swap_remove(rng.below(names.len()));
            let b = names.swap_remove(rng.below(names.len()));
            let name = m.fresh("group");
            let mut sent = BTreeMap::new();
            let mut ids = Vec::new();
            for n in [a, b] {
                let v = m.vols.get_mut(&n).unwrap();
                v.users += 1;
                ids.push(v.id.clone().unwrap());
                sent.insert(n, v.slots.clone());
            }
            m.groups.insert(
                name.clone(),
                Group {
                    id: None,
                    sent,
                    members: Vec::new(),
                    busy: true,
                },
            );
            let req = csi::CreateVolumeGroupSnapshotRequest {
                name: name.clone(),
                source_volume_ids: ids,
                ..Default::default()
            };
            Some((name, req))
        }
    };
    let Some((name, req)) = pick else {
        return;
    };
    let r = call(sh, c.group.create_volume_group_snapshot(req.clone())).await;
    let mut m = sh.m();
    let sources: Vec<String> = m.groups[&name].sent.keys().cloned().collect();
    for s in &sources {
        if let Some(v) = m.vols.get_mut(s) {
            v.users -= 1;
        }
    }
    match r {
        Answer::Ok(r) => {
            let g = r.group_snapshot.unwrap_or_default();
            m.op(format!(
                "CreateVolumeGroupSnapshot {name} of {sources:?} -> {}",
                g.group_snapshot_id
            ));
            adopt_group(&mut m, &name, g);
        }
        Answer::Killed => m.pending.push(Pending::CreateGroup(name, req)),
        Answer::Busy => {
            m.groups.remove(&name);
        }
        Answer::Failed(s) => {
            m.groups.remove(&name);
            drop(m);
            sh.failed(format!("CreateVolumeGroupSnapshot {name}: {s:?}"));
        }
    }
}

/// Records an answered CreateVolumeGroupSnapshot: the group's ID and its
/// members, ready (or not) with the content their sources had.
fn adopt_group(m: &mut Model, name: &str, g: csi::VolumeGroupSnapshot) {
    let mut members = Vec::new();
    for s in g.snapshots {
        let Some(source) = m.vol_by_id(&s.source_volume_id) else {
            m.failed_ops.push(format!(
                "group {name} has a member of {}, not one of its sources",
                s.source_volume_id
            ));
            continue;
        };
        let sent = m.groups[name]
            .sent
            .get(&source)
            .cloned()
            .unwrap_or_default();
        let expected = s.ready_to_use.then(|| m.settle_copy(&source, &sent));
        let member = format!("{name}/{source}");
        let kind = m.vols[&source].kind;
        m.snaps.insert(
            member.clone(),
            Snap {
                source,
                kind,
                id: Some(s.snapshot_id),
                group: Some(name.to_owned()),
                sent,
                expected,
                busy: false,
            },
        );
        members.push(member);
    }
    let grp = m.groups.get_mut(name).unwrap();
    grp.id = Some(g.group_snapshot_id);
    grp.members = members;
    grp.busy = false;
}

async fn delete_group(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .groups
            .iter()
            .filter(|(_, g)| {
                g.id.is_some() && !g.busy && g.members.iter().all(|s| !m.snaps[s].busy)
            })
            .map(|(n, _)| n.clone())
            .collect();
        rng.pick(&names).cloned().map(|n| {
            let g = m.groups.get_mut(&n).unwrap();
            g.busy = true;
            let members = g.members.clone();
            let id = g.id.clone().unwrap();
            for s in members {
                m.snaps.get_mut(&s).unwrap().busy = true;
            }
            (n, id)
        })
    };
    let Some((name, id)) = pick else {
        return;
    };
    let r = call(
        sh,
        c.group
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: id.clone(),
                ..Default::default()
            }),
    )
    .await;
    let mut m = sh.m();
    match r {
        Answer::Ok(_) => {
            forget_group(&mut m, &name);
            m.op(format!("DeleteVolumeGroupSnapshot {name}"));
        }
        Answer::Killed => m.pending.push(Pending::DeleteGroup(name, id)),
        Answer::Busy | Answer::Failed(_) => {
            m.groups.get_mut(&name).unwrap().busy = false;
            for s in m.groups[&name].members.clone() {
                m.snaps.get_mut(&s).unwrap().busy = false;
            }
            if let Answer::Failed(s) = r {
                drop(m);
                sh.failed(format!("DeleteVolumeGroupSnapshot {name}: {s:?}"));
            }
        }
    }
}

fn forget_group(m: &mut Model, name: &str) {
    if let Some(g) = m.groups.remove(name) {
        for s in g.members {
            m.snaps.remove(&s);
        }
    }
}

/// Expands block volumes (controller and node), stages and publishes or
/// unpublishes and unstages volumes, deletes derived ones.
async fn lifecycle_task(sh: Arc<Shared>, mut c: Clients, mut rng: Rng) {
    while !sh.stopped() {
        pace(&mut rng).await;
        match rng.below(100) {
            0..35 => grow(&sh, &mut c, &mut rng).await,
            35..75 => mount_or_unmount(&sh, &mut c, &mut rng).await,
            _ => delete_volume(&sh, &mut c, &mut rng).await,
        }
    }
}

async fn grow(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .vols
            .iter()
            .filter(|(_, v)| {
                // Raw block grows online; ext4 offline (online growth
                // needs CAP_SYS_RESOURCE, which test machines may lack),
                // when it is next staged.
                let when = match v.kind {
                    "raw" => Phase::Published,
                    _ => Phase::Created,
                };
                v.is_block()
                    && v.phase == when
                    && v.id.is_some()
                    && !v.changing
                    && v.capacity < MAX_EXPAND
            })
            .map(|(n, _)| n.clone())
            .collect();
        rng.pick(&names).cloned().map(|n| {
            let v = m.vols.get_mut(&n).unwrap();
            v.users += 1;
            let size = v.capacity + 32 * MIB;
            let published = v.phase == Phase::Published;
            (
                n,
                v.id.clone().unwrap(),
                size,
                published.then(|| (v.staging.clone(), v.target.clone())),
            )
        })
    };
    let Some((name, id, size, paths)) = pick else {
        return;
    };
    let r = call(sh, async {
        expand(c, &id, size, paths.as_ref().map(|(s, t)| (&**s, &**t)))
            .await
            .map(tonic::Response::new)
    })
    .await;
    let mut m = sh.m();
    m.vols.get_mut(&name).unwrap().users -= 1;
    match r {
        Answer::Ok(cap) => {
            m.vols.get_mut(&name).unwrap().capacity = cap;
            m.op(format!("expand {name} to {cap}"));
        }
        Answer::Killed => m.pending.push(Pending::Expand(name, size)),
        Answer::Busy => {}
        Answer::Failed(s) => {
            drop(m);
            sh.failed(format!("expand {name} to {size}: {s:?}"));
        }
    }
}

async fn mount_or_unmount(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .vols
            .iter()
            .filter(|(_, v)| v.id.is_some() && !v.changing && v.users == 0)
            .map(|(n, _)| n.clone())
            .collect();
        rng.pick(&names).cloned().inspect(|n| {
            m.vols.get_mut(n).unwrap().changing = true;
        })
    };
    let Some(name) = pick else {
        return;
    };
    let (id, kind, phase, staging, target) = {
        let m = sh.m();
        let v = &m.vols[&name];
        (
            v.id.clone().unwrap(),
            v.kind,
            v.phase,
            v.staging.clone(),
            v.target.clone(),
        )
    };
    let (to, op) = match phase {
        Phase::Created => (Phase::Published, Pending::Mount(name.clone())),
        Phase::Published => (Phase::Created, Pending::Unmount(name.clone())),
    };
    let r = call(sh, async {
        match phase {
            Phase::Created => stage_and_publish(c, &id, kind, &staging, &target).await,
            Phase::Published => unpublish_and_unstage(c, &id, &staging, &[target]).await,
        }
        .map(tonic::Response::new)
    })
    .await;
    let mut m = sh.m();
    let v = m.vols.get_mut(&name).unwrap();
    match r {
        Answer::Ok(()) => {
            v.phase = to;
            v.changing = false;
            m.op(format!("{name} -> {to:?}"));
        }
        Answer::Killed => m.pending.push(op),
        // Two calls: the second answered ABORTED (an unstage while a copy
        // holds the filesystem) leaves it half done (unpublished, still
        // staged). The volume stays out of the workload, and the pair is
        // retried after the restart (retries repeat ABORTED answers).
        Answer::Busy => {
            m.deferred.push(op);
            m.op(format!(
                "{name} {phase:?} -> {to:?}: ABORTED, retried after the restart"
            ));
        }
        // Half done too, perhaps; counted as a failure.
        Answer::Failed(s) => {
            m.deferred.push(op);
            drop(m);
            sh.failed(format!("{name} {phase:?} -> {to:?}: {s:?}"));
        }
    }
}

async fn delete_volume(sh: &Shared, c: &mut Clients, rng: &mut Rng) {
    let pick = {
        let mut m = sh.m();
        let names: Vec<String> = m
            .vols
            .iter()
            .filter(|(_, v)| {
                !v.base
                    && v.phase == Phase::Created
                    && v.id.is_some()
                    && !v.changing
                    && v.users == 0
            })
            .map(|(n, _)| n.clone())
            .collect();
        rng.pick(&names).cloned().map(|n| {
            let v = m.vols.get_mut(&n).unwrap();
            v.changing = true;
            (n, v.id.clone().unwrap())
        })
    };
    let Some((name, id)) = pick else {
        return;
    };
    let r = call(
        sh,
        c.controller.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }),
    )
    .await;
    let mut m = sh.m();
    match r {
        Answer::Ok(_) => {
            m.vols.remove(&name);
            m.op(format!("DeleteVolume {name}"));
        }
        Answer::Killed => m.pending.push(Pending::DeleteVolume(name, id)),
        Answer::Busy => m.vols.get_mut(&name).unwrap().changing = false,
        Answer::Failed(s) => {
            m.vols.get_mut(&name).unwrap().changing = false;
            drop(m);
            sh.failed(format!("DeleteVolume {name}: {s:?}"));
        }
    }
}

// ---------------------------------------------------------------------------
// What the node's records say (its state files): the stagings and
// publications that explain mounts and loop devices.

#[derive(Debug)]
struct NodeRec {
    id: String,
    staging: Option<StagingRec>,
    /// Target → the publication's own loop device, if any.
    publications: BTreeMap<PathBuf, Option<PathBuf>>,
}

#[derive(Debug)]
struct StagingRec {
    path: PathBuf,
    device: Option<PathBuf>,
    mounted: bool,
}

fn node_records(state: &Path) -> Vec<NodeRec> {
    let store = stowage::state::Store::open(state).expect("open state");
    let pathbuf = |v: &serde_json::Value| v.as_str().map(PathBuf::from);
    store
        .load_all::<serde_json::Value>(stowage::state::Table::NodeVolumes)
        .expect("read node records")
        .into_iter()
        .map(|(_, v)| NodeRec {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            staging: v
                .get("staging")
                .filter(|s| !s.is_null())
                .map(|s| StagingRec {
                    path: pathbuf(&s["path"]).unwrap_or_default(),
                    device: pathbuf(&s["device"]),
                    mounted: s["mounted"].as_bool().unwrap_or(false),
                }),
            publications: v
                .get("publications")
                .and_then(|p| p.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(t, p)| (PathBuf::from(t), pathbuf(&p["own_device"])))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// The last `:`-separated field of a volume or snapshot ID.
fn uuid_of(id: &str) -> &str {
    id.rsplit(':').next().unwrap_or_default()
}

fn mounts_under(root: &Path) -> Vec<MountEntry> {
    MountTable::read()
        .map(|t| t.entries)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.mount_point.starts_with(root))
        .collect()
}

/// The pool's own mounts and loop devices under the scratch dir: the
/// mounts at or above the pool and state directories (the pool filesystem
/// the test made, a pool image the server mounted) and their devices.
fn infrastructure(env: &Env) -> (BTreeSet<PathBuf>, BTreeSet<PathBuf>) {
    let mut mounts = BTreeSet::new();
    let mut devices = BTreeSet::new();
    for m in mounts_under(&env.scratch.root) {
        if env.layout.pool.starts_with(&m.mount_point)
            || env.layout.state.starts_with(&m.mount_point)
        {
            devices.insert(PathBuf::from(&m.source));
            mounts.insert(m.mount_point);
        }
    }
    (mounts, devices)
}

/// Block filesystems mounted under the scratch dir, one mount point each.
fn filesystems(root: &Path) -> Vec<MountEntry> {
    let mut seen = BTreeSet::new();
    mounts_under(root)
        .into_iter()
        .filter(|m| {
            m.source.starts_with("/dev/") && ["ext4", "xfs", "btrfs"].contains(&&*m.fs_type)
        })
        .filter(|m| seen.insert(m.dev()))
        .collect()
}

/// Thaws every block filesystem under `root` when dropped (declared after
/// the `Env`, so before its scratch dir is cleaned up): a filesystem left
/// frozen would keep its loop device and the pool busy.
struct ThawUnder(PathBuf);

impl Drop for ThawUnder {
    fn drop(&mut self) {
        for m in filesystems(&self.0) {
            let _ = stowage::os::freeze::thaw(&m.mount_point);
        }
    }
}

// ---------------------------------------------------------------------------
// Findings, counted by kind over all rounds.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Frozen,
    LeakedLoops,
    LeakedMounts,
    UnknownPoolObjects,
    UnusableVolumes,
    LostFsyncedBytes,
    LostSnapshots,
    Untracked,
    FailedOps,
    HungIo,
    OrphansAfterCleanup,
}

const KINDS: [(Kind, &str); 11] = [
    (Kind::Frozen, "frozen"),
    (Kind::LeakedLoops, "leaked_loops"),
    (Kind::LeakedMounts, "leaked_mounts"),
    (Kind::UnknownPoolObjects, "unknown_pool_objects"),
    (Kind::UnusableVolumes, "unusable_volumes"),
    (Kind::LostFsyncedBytes, "lost_fsynced_bytes"),
    (Kind::LostSnapshots, "lost_snapshots"),
    (Kind::Untracked, "untracked"),
    (Kind::FailedOps, "failed_ops"),
    (Kind::HungIo, "hung_io"),
    (Kind::OrphansAfterCleanup, "orphans_after_cleanup"),
];

#[derive(Debug, Default)]
struct Findings {
    counts: BTreeMap<Kind, usize>,
    /// What each finding was, with its round.
    details: Vec<String>,
    /// Details of the current round (printed with its operations).
    round: Vec<String>,
    /// Keys of findings that persist from round to round (an object the
    /// API lists but nobody created), counted once.
    seen: BTreeSet<String>,
}

impl Findings {
    fn note(&mut self, kind: Kind, n: usize, detail: String) {
        *self.counts.entry(kind).or_default() += n;
        self.round.push(detail);
    }

    /// Notes a finding about the object `key` unless it was noted before.
    fn note_once(&mut self, kind: Kind, key: &str, detail: String) {
        if self.seen.insert(key.to_owned()) {
            self.note(kind, 1, detail);
        }
    }

    fn end_round(&mut self, label: &str) -> Vec<String> {
        let round = std::mem::take(&mut self.round);
        self.details
            .extend(round.iter().map(|d| format!("{label}: {d}")));
        round
    }

    fn summary(&self, rounds: usize) -> String {
        let mut line = format!("crash soak: rounds={rounds}");
        for (k, name) in KINDS {
            line.push_str(&format!(
                " {name}={}",
                self.counts.get(&k).copied().unwrap_or(0)
            ));
        }
        line
    }

    fn clean(&self) -> bool {
        self.counts.values().all(|&n| n == 0)
    }
}

// ---------------------------------------------------------------------------
// Listing and retrying, as a CO does after a restart.

async fn list_volumes(c: &mut Clients) -> Result<Vec<csi::Volume>, Status> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                starting_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(r.entries.into_iter().filter_map(|e| e.volume));
        if r.next_token.is_empty() {
            return Ok(out);
        }
        token = r.next_token;
    }
}

async fn list_snapshots(c: &mut Clients) -> Result<Vec<csi::Snapshot>, Status> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .controller
            .list_snapshots(csi::ListSnapshotsRequest {
                starting_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(r.entries.into_iter().filter_map(|e| e.snapshot));
        if r.next_token.is_empty() {
            return Ok(out);
        }
        token = r.next_token;
    }
}

/// Repeats a call answered ABORTED (another call on the object is under
/// way, e.g. a copy the restarted server finishes) for up to HANG_LIMIT.
async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        match call().await {
            Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

// ---------------------------------------------------------------------------
// Checks after a restart.

/// (a) No block filesystem under the scratch dir is frozen. One found
/// frozen is counted and thawed, so that the soak can go on. A copy the
/// restarted server resumed may hold its source frozen for a while: a
/// frozen filesystem counts only once no snapshot is still being copied.
async fn check_frozen(env: &mut Env, f: &mut Findings) {
    let probe = |root: &Path| -> Vec<(PathBuf, String)> {
        filesystems(root)
            .into_iter()
            .filter_map(|m| match is_frozen(&m.mount_point) {
                Ok(false) => None,
                Ok(true) => Some((m.mount_point, m.source)),
                Err(e) => Some((m.mount_point, format!("{} (probe failed: {e})", m.source))),
            })
            .collect()
    };
    let root = env.scratch.root.clone();
    let mut frozen = probe(&root);
    if !frozen.is_empty() {
        let deadline = Instant::now() + HANG_LIMIT;
        while Instant::now() < deadline {
            match list_snapshots(&mut env.c).await {
                Ok(l) if l.iter().all(|s| s.ready_to_use) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        frozen = probe(&root);
    }
    for (mp, source) in frozen {
        f.note(
            Kind::Frozen,
            1,
            format!(
                "(a) {} ({source}) is frozen after the restart",
                mp.display()
            ),
        );
        let _ = stowage::os::freeze::thaw(&mp);
    }
}

/// (b) Every loop device on a file under the scratch dir is the pool's,
/// or a node record claims it as the staging or publication device of the
/// volume whose image backs it. A detach the kernel defers to the last
/// close (an orphaned mkfs or blkid of the killed server) may take a
/// moment: polled for up to 3 s.
async fn check_loops(env: &Env, f: &mut Findings) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let leaked = loop {
        let (_, infra) = infrastructure(env);
        let records = node_records(&env.layout.state);
        let claimed: BTreeMap<PathBuf, String> = records
            .iter()
            .flat_map(|r| {
                r.staging
                    .iter()
                    .filter_map(|s| s.device.clone())
                    .chain(r.publications.values().flatten().cloned())
                    .map(|d| (d, uuid_of(&r.id).to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let leaked: Vec<String> = loops_under(&env.scratch.root)
            .into_iter()
            .filter(|(d, b)| {
                !infra.contains(&d.path())
                    && !claimed
                        .get(&d.path())
                        .is_some_and(|u| b.to_string_lossy().contains(u.as_str()))
            })
            .map(|(d, b)| format!("{} -> {}", d.path().display(), b.display()))
            .collect();
        if leaked.is_empty() || Instant::now() > deadline {
            break leaked;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for l in leaked {
        f.note(
            Kind::LeakedLoops,
            1,
            format!("(b) loop device {l} is the pool's nor claimed by a node record"),
        );
    }
}

/// (c) Every mount under the scratch dir is the pool's, or a staging or a
/// publication a node record holds at that path; none is stacked.
fn check_mounts(env: &Env, f: &mut Findings) {
    let (infra, _) = infrastructure(env);
    let records = node_records(&env.layout.state);
    let mut seen = BTreeSet::new();
    for m in mounts_under(&env.scratch.root) {
        let what = format!(
            "{} ({} {} root {})",
            m.mount_point.display(),
            m.fs_type,
            m.source,
            m.root.display()
        );
        if !seen.insert(m.mount_point.clone()) {
            f.note(
                Kind::LeakedMounts,
                1,
                format!("(c) stacked mount at {what}"),
            );
            continue;
        }
        let recorded = infra.contains(&m.mount_point)
            || records.iter().any(|r| {
                r.staging
                    .as_ref()
                    .is_some_and(|s| s.mounted && s.path == m.mount_point)
                    || r.publications.contains_key(&m.mount_point)
            });
        if !recorded {
            f.note(
                Kind::LeakedMounts,
                1,
                format!("(c) mount {what} is recorded by no staging or publication"),
            );
        }
    }
}

/// Pool objects whose volume or snapshot is not among `volume_ids` and
/// `snapshot_ids`: `<pool>/volumes/<backend>/<uuid>[.img]` for volumes,
/// `<pool>/snapshots/<backend>/<uuid>[.img]` for snapshots.
fn unknown_objects(pool: &Path, volume_ids: &[String], snapshot_ids: &[String]) -> Vec<PathBuf> {
    let backend_and_uuid = |id: &str, skip: usize| -> Option<(String, String)> {
        let mut parts = id.split(':').skip(skip);
        let backend = parts.next()?.to_owned();
        Some((backend, uuid_of(id).to_owned()))
    };
    let known: BTreeSet<(&str, String, String)> = volume_ids
        .iter()
        .filter_map(|id| backend_and_uuid(id, 0).map(|(b, u)| ("volumes", b, u)))
        .chain(
            snapshot_ids
                .iter()
                .filter_map(|id| backend_and_uuid(id, 1).map(|(b, u)| ("snapshots", b, u))),
        )
        .collect();
    pool_entries(pool)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let backend = p.parent().and_then(|d| d.file_name()).unwrap_or_default();
            let top = p
                .parent()
                .and_then(|d| d.parent())
                .and_then(|d| d.file_name())
                .unwrap_or_default();
            let uuid = name.strip_suffix(".img").unwrap_or(&name).to_owned();
            !["volumes", "snapshots"].iter().any(|t| {
                top == *t
                    && known.contains(&(*t, backend.to_string_lossy().into_owned(), uuid.clone()))
            })
        })
        .collect()
}

/// (d) Every pool object belongs to a volume or snapshot the API lists.
async fn check_pool_objects(env: &mut Env, f: &mut Findings) {
    let (vols, snaps) = match (
        list_volumes(&mut env.c).await,
        list_snapshots(&mut env.c).await,
    ) {
        (Ok(v), Ok(s)) => (v, s),
        (v, s) => {
            f.note(
                Kind::FailedOps,
                1,
                format!("listing after the restart: {:?} {:?}", v.err(), s.err()),
            );
            return;
        }
    };
    let vol_ids: Vec<String> = vols.into_iter().map(|v| v.volume_id).collect();
    let snap_ids: Vec<String> = snaps.into_iter().map(|s| s.snapshot_id).collect();
    for p in unknown_objects(&env.layout.pool, &vol_ids, &snap_ids) {
        f.note_once(
            Kind::UnknownPoolObjects,
            &p.display().to_string(),
            format!(
                "(d) pool object {} belongs to nothing ListVolumes or ListSnapshots returns",
                p.display()
            ),
        );
    }
}

/// Retries every call the kill cut short, as a CO would, and records the
/// answers in the model.
async fn settle(env: &mut Env, m: &mut Model, f: &mut Findings) {
    let mut calls = std::mem::take(&mut m.pending);
    calls.append(&mut m.deferred);
    for p in calls {
        let c = env.c.clone();
        m.op(format!("after the restart: retry {}", describe(&p)));
        let failed = match p.clone() {
            Pending::CreateVolume(name, req) => {
                let r = retry(|| {
                    let (mut c, req) = (c.clone(), req.clone());
                    async move { c.controller.create_volume(req).await }
                })
                .await;
                match r {
                    Ok(r) => {
                        adopt_volume(m, &name, r.into_inner().volume.unwrap_or_default());
                        None
                    }
                    // A restore from a snapshot whose copy the crash cut
                    // short (and start-up dropped): the CO gives up.
                    Err(s) if s.code() == Code::NotFound => {
                        m.vols.remove(&name);
                        None
                    }
                    Err(s) => {
                        m.vols.remove(&name);
                        Some(s)
                    }
                }
            }
            Pending::DeleteVolume(name, id) => {
                let r = retry(|| {
                    let (mut c, id) = (c.clone(), id.clone());
                    async move {
                        c.controller
                            .delete_volume(csi::DeleteVolumeRequest {
                                volume_id: id,
                                ..Default::default()
                            })
                            .await
                    }
                })
                .await;
                r.map(|_| {
                    m.vols.remove(&name);
                })
                .err()
            }
            Pending::Mount(name) | Pending::Unmount(name) => {
                let mount = matches!(p, Pending::Mount(_));
                let v = &m.vols[&name];
                let (id, kind, staging, target) = (
                    v.id.clone().unwrap_or_default(),
                    v.kind,
                    v.staging.clone(),
                    v.target.clone(),
                );
                let r = retry(|| {
                    let mut c = c.clone();
                    let (id, staging, target) = (id.clone(), staging.clone(), target.clone());
                    async move {
                        if mount {
                            stage_and_publish(&mut c, &id, kind, &staging, &target).await
                        } else {
                            unpublish_and_unstage(&mut c, &id, &staging, &[target]).await
                        }
                    }
                })
                .await;
                r.map(|()| {
                    m.vols.get_mut(&name).unwrap().phase = if mount {
                        Phase::Published
                    } else {
                        Phase::Created
                    };
                })
                .err()
            }
            Pending::CreateSnapshot(name, req) => {
                let r = retry(|| {
                    let (mut c, req) = (c.clone(), req.clone());
                    async move { c.controller.create_snapshot(req).await }
                })
                .await;
                match r {
                    Ok(r) => {
                        let s = r.into_inner().snapshot.unwrap_or_default();
                        let expected = s
                            .ready_to_use
                            .then(|| m.settle_copy(&m.snaps[&name].source, &m.snaps[&name].sent));
                        let snap = m.snaps.get_mut(&name).unwrap();
                        snap.id = Some(s.snapshot_id);
                        snap.expected = expected;
                        None
                    }
                    Err(s) => {
                        m.snaps.remove(&name);
                        Some(s)
                    }
                }
            }
            Pending::DeleteSnapshot(name, id) => {
                let r = retry(|| {
                    let (mut c, id) = (c.clone(), id.clone());
                    async move {
                        c.controller
                            .delete_snapshot(csi::DeleteSnapshotRequest {
                                snapshot_id: id,
                                ..Default::default()
                            })
                            .await
                    }
                })
                .await;
                r.map(|_| {
                    m.snaps.remove(&name);
                })
                .err()
            }
            Pending::CreateGroup(name, req) => {
                let r = retry(|| {
                    let (mut c, req) = (c.clone(), req.clone());
                    async move { c.group.create_volume_group_snapshot(req).await }
                })
                .await;
                match r {
                    Ok(r) => {
                        adopt_group(m, &name, r.into_inner().group_snapshot.unwrap_or_default());
                        None
                    }
                    Err(s) => {
                        m.groups.remove(&name);
                        Some(s)
                    }
                }
            }
            Pending::DeleteGroup(name, id) => {
                let r = retry(|| {
                    let (mut c, id) = (c.clone(), id.clone());
                    async move {
                        c.group
                            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                                group_snapshot_id: id,
                                ..Default::default()
                            })
                            .await
                    }
                })
                .await;
                r.map(|_| forget_group(m, &name)).err()
            }
            Pending::Expand(name, size) => {
                let v = &m.vols[&name];
                let (id, staging, target) = (
                    v.id.clone().unwrap_or_default(),
                    v.staging.clone(),
                    v.target.clone(),
                );
                let published = v.phase == Phase::Published;
                let r = retry(|| {
                    let mut c = c.clone();
                    let (id, staging, target) = (id.clone(), staging.clone(), target.clone());
                    async move {
                        expand(
                            &mut c,
                            &id,
                            size,
                            published.then_some((&*staging, &*target)),
                        )
                        .await
                    }
                })
                .await;
                r.map(|cap| m.vols.get_mut(&name).unwrap().capacity = cap)
                    .err()
            }
        };
        if let Some(s) = failed {
            f.note(
                Kind::FailedOps,
                1,
                format!("retry after the restart of {p:?} failed: {s:?}"),
            );
        }
    }
}

/// Compares what the API lists with what the CO was told, then (e) takes
/// every volume through stage, publish, write and read, and (f) reads
/// back every byte whose fsync returned.
async fn check_volumes(env: &mut Env, m: &mut Model, f: &mut Findings, rng: &mut Rng) {
    let (listed, snaps) = match (
        list_volumes(&mut env.c).await,
        list_snapshots(&mut env.c).await,
    ) {
        (Ok(v), Ok(s)) => (v, s),
        (v, s) => {
            f.note(
                Kind::FailedOps,
                1,
                format!("listing after the restart: {:?} {:?}", v.err(), s.err()),
            );
            return;
        }
    };
    let listed_ids: BTreeSet<&str> = listed.iter().map(|v| v.volume_id.as_str()).collect();
    let vanished: Vec<String> = m
        .vols
        .iter()
        .filter(|(_, v)| v.id.as_deref().is_some_and(|id| !listed_ids.contains(id)))
        .map(|(n, _)| n.clone())
        .collect();
    for name in vanished {
        let v = m.vols.remove(&name).unwrap();
        f.note(
            Kind::UnusableVolumes,
            1,
            format!(
                "(e) volume {name} ({}, {}) was created but is not listed",
                v.origin,
                v.id.unwrap_or_default()
            ),
        );
    }
    for id in &listed_ids {
        if m.vol_by_id(id).is_none() {
            f.note_once(
                Kind::Untracked,
                id,
                format!("ListVolumes has {id}, which no CreateVolume returned"),
            );
        }
    }

    // Snapshots: seen ready means it must still be there; one whose copy
    // the kill cut short may have been dropped by start-up recovery.
    let by_id: BTreeMap<&str, &csi::Snapshot> =
        snaps.iter().map(|s| (s.snapshot_id.as_str(), s)).collect();
    let names: Vec<String> = m.snaps.keys().cloned().collect();
    for name in names {
        let s = &m.snaps[&name];
        let Some(id) = s.id.clone() else { continue };
        match by_id.get(id.as_str()) {
            None => {
                let group = s.group.clone();
                if s.expected.is_some() {
                    f.note(
                        Kind::LostSnapshots,
                        1,
                        format!("snapshot {name} ({id}) was ready_to_use but is gone"),
                    );
                } else {
                    m.op(format!(
                        "snapshot {name} ({id}) whose copy the kill cut short was dropped"
                    ));
                }
                m.snaps.remove(&name);
                if let Some(g) = group.and_then(|g| m.groups.get_mut(&g)) {
                    g.members.retain(|n| *n != name);
                }
            }
            Some(l) if l.ready_to_use && s.expected.is_none() => {
                let expected = m.settle_copy(&s.source, &s.sent);
                m.snaps.get_mut(&name).unwrap().expected = Some(expected);
            }
            Some(_) => {}
        }
    }
    let known_snaps: BTreeSet<&str> = m.snaps.values().filter_map(|s| s.id.as_deref()).collect();
    let known_groups: BTreeSet<&str> = m.groups.values().filter_map(|g| g.id.as_deref()).collect();
    for s in &snaps {
        if !known_snaps.contains(s.snapshot_id.as_str()) {
            f.note_once(
                Kind::Untracked,
                &s.snapshot_id,
                format!(
                    "ListSnapshots has {} (of {}, group {:?}, ready_to_use {}), which no call returned",
                    s.snapshot_id, s.source_volume_id, s.group_snapshot_id, s.ready_to_use
                ),
            );
        }
    }
    let unknown_groups: BTreeSet<&str> = snaps
        .iter()
        .map(|s| s.group_snapshot_id.as_str())
        .filter(|g| !g.is_empty() && !known_groups.contains(g))
        .collect();
    for g in unknown_groups {
        let members: Vec<&str> = snaps
            .iter()
            .filter(|s| s.group_snapshot_id == g)
            .map(|s| s.snapshot_id.as_str())
            .collect();
        let get = env
            .c
            .group
            .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: g.to_owned(),
                ..Default::default()
            })
            .await;
        let state = match get {
            Ok(_) => "GetVolumeGroupSnapshot finds it".to_owned(),
            Err(s) => format!(
                "GetVolumeGroupSnapshot answers {:?} (\"{}\"), so DeleteVolumeGroupSnapshot cannot \
                 remove the members and DeleteSnapshot refuses them",
                s.code(),
                s.message()
            ),
        };
        f.note_once(
            Kind::Untracked,
            g,
            format!("ListSnapshots has members {members:?} of group {g}, which no call returned; {state}"),
        );
    }

    // (e) and (f), volume by volume.
    let names: Vec<String> = m.vols.keys().cloned().collect();
    for name in names {
        let v = &m.vols[&name];
        let Some(id) = v.id.clone().filter(|_| !v.broken) else {
            continue;
        };
        let (kind, staging, target) = (v.kind, v.staging.clone(), v.target.clone());
        let what = format!("{name} ({}, {id})", v.origin);
        let c = env.c.clone();
        let r = retry(|| {
            let mut c = c.clone();
            let (id, staging, target) = (id.clone(), staging.clone(), target.clone());
            async move { stage_and_publish(&mut c, &id, kind, &staging, &target).await }
        })
        .await;
        if let Err(s) = r {
            f.note(
                Kind::UnusableVolumes,
                1,
                format!(
                    "(e) {what}: stage and publish: {:?}: {}",
                    s.code(),
                    s.message()
                ),
            );
            m.vols.get_mut(&name).unwrap().broken = true;
            continue;
        }
        let v = m.vols.get_mut(&name).unwrap();
        v.phase = Phase::Published;
        for k in 0..=SLOTS {
            let Some((seed, len)) = v.slots[k].content else {
                continue;
            };
            let t = target.clone();
            match within(HANG_LIMIT, move || lost_bytes(kind, &t, k, seed, len)) {
                Some(Ok(0)) => {}
                Some(Ok(n)) => f.note(
                    Kind::LostFsyncedBytes,
                    n,
                    format!("(f) {what} slot {k}: {n} of {len} fsync'ed bytes differ"),
                ),
                Some(Err(e)) => f.note(
                    Kind::LostFsyncedBytes,
                    len,
                    format!("(f) {what} slot {k}: {len} fsync'ed bytes unreadable: {e}"),
                ),
                None => f.note(
                    Kind::HungIo,
                    1,
                    format!(
                        "(f) {what} slot {k}: a read hung for {} s",
                        HANG_LIMIT.as_secs()
                    ),
                ),
            }
        }
        let k = rng.below(SLOTS);
        let seed = rng.next();
        let len = 64 << 10;
        v.slots[k].version += 1;
        v.slots[k].content = None;
        let t = target.clone();
        match within(HANG_LIMIT, move || {
            write_slot(kind, &t, k, seed, len).and_then(|()| lost_bytes(kind, &t, k, seed, len))
        }) {
            Some(Ok(0)) => v.slots[k].content = Some((seed, len)),
            Some(Ok(n)) => {
                v.broken = true;
                f.note(
                    Kind::UnusableVolumes,
                    1,
                    format!("(e) {what}: {n} bytes just written and fsync'ed read back wrong"),
                );
            }
            Some(Err(e)) => {
                v.broken = true;
                f.note(Kind::UnusableVolumes, 1, format!("(e) {what}: write: {e}"));
            }
            None => f.note(
                Kind::HungIo,
                1,
                format!(
                    "(e) {what}: a write+fsync hung for {} s",
                    HANG_LIMIT.as_secs()
                ),
            ),
        }
    }
}

/// Removes everything through the API, as a CO tearing down would:
/// groups and snapshots ListSnapshots returns, then every volume
/// ListVolumes returns (unpublished and unstaged at the paths the node
/// records, then deleted). Then the pool must be empty and nothing may be
/// mounted or attached.
async fn clean_up_through_the_api(env: &mut Env, f: &mut Findings) {
    let c = env.c.clone();
    let snaps = list_snapshots(&mut env.c).await.unwrap_or_default();
    let groups: BTreeSet<String> = snaps
        .iter()
        .map(|s| s.group_snapshot_id.clone())
        .filter(|g| !g.is_empty())
        .collect();
    for g in groups {
        let r = retry(|| {
            let (mut c, g) = (c.clone(), g.clone());
            async move {
                c.group
                    .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                        group_snapshot_id: g,
                        ..Default::default()
                    })
                    .await
            }
        })
        .await;
        if let Err(s) = r {
            f.note(
                Kind::FailedOps,
                1,
                format!("clean-up: delete group {g}: {s:?}"),
            );
        }
    }
    // Every snapshot still listed (a group's member should be gone with
    // its group; if not, the answer to its own delete tells why).
    let snaps = list_snapshots(&mut env.c).await.unwrap_or_default();
    for s in &snaps {
        let id = s.snapshot_id.clone();
        let r = retry(|| {
            let (mut c, id) = (c.clone(), id.clone());
            async move {
                c.controller
                    .delete_snapshot(csi::DeleteSnapshotRequest {
                        snapshot_id: id,
                        ..Default::default()
                    })
                    .await
            }
        })
        .await;
        if let Err(s) = r {
            f.note(
                Kind::FailedOps,
                1,
                format!("clean-up: delete snapshot {id}: {s:?}"),
            );
        }
    }
    let records = node_records(&env.layout.state);
    for v in list_volumes(&mut env.c).await.unwrap_or_default() {
        let id = v.volume_id;
        if let Some(r) = records.iter().find(|r| r.id == id) {
            let targets: Vec<PathBuf> = r.publications.keys().cloned().collect();
            let staging = r.staging.as_ref().map(|s| s.path.clone());
            let r = retry(|| {
                let mut c = c.clone();
                let (id, staging, targets) = (id.clone(), staging.clone(), targets.clone());
                async move {
                    match staging {
                        Some(s) => unpublish_and_unstage(&mut c, &id, &s, &targets).await,
                        None => Ok(()),
                    }
                }
            })
            .await;
            if let Err(s) = r {
                f.note(
                    Kind::FailedOps,
                    1,
                    format!("clean-up: unpublish/unstage {id}: {s:?}"),
                );
            }
        }
        let r = retry(|| {
            let (mut c, id) = (c.clone(), id.clone());
            async move {
                c.controller
                    .delete_volume(csi::DeleteVolumeRequest {
                        volume_id: id,
                        ..Default::default()
                    })
                    .await
            }
        })
        .await;
        if let Err(s) = r {
            f.note(
                Kind::FailedOps,
                1,
                format!("clean-up: delete volume {id}: {s:?}"),
            );
        }
    }
    for p in pool_entries(&env.layout.pool) {
        f.note(
            Kind::OrphansAfterCleanup,
            1,
            format!(
                "pool object {} left after deleting everything the API lists",
                p.display()
            ),
        );
    }
    let left_v = list_volumes(&mut env.c).await.map(|l| l.len());
    let left_s = list_snapshots(&mut env.c).await.map(|l| l.len());
    if !matches!((&left_v, &left_s), (Ok(0), Ok(0))) {
        f.note(
            Kind::FailedOps,
            1,
            format!("clean-up: still listed: {left_v:?} volumes, {left_s:?} snapshots"),
        );
    }
    check_mounts(env, f);
    check_loops(env, f).await;
}

// ---------------------------------------------------------------------------
// Rounds.

/// The last `n` lines of the server's log (its own lines, not the gRPC
/// transport's, without colours).
fn log_tail(env: &Env, n: usize) -> String {
    let text = env.server.log_text();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains(" stowage"))
        .map(|l| {
            let mut plain = String::new();
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            plain
        })
        .filter(|l| !l.contains("DEBUG"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills the server at a random moment of the round: on odd rounds after
/// a random delay, on even rounds just after a copy of a block volume
/// began (a new image appeared in the pool), which is when a staged
/// source is frozen. Returns how the kill was placed.
async fn kill_at_random(env: &mut Env, sh: &Shared, rng: &mut Rng, round: usize) -> String {
    let start = Instant::now();
    let images = |pool: &Path| -> BTreeSet<PathBuf> {
        pool_entries(pool)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "img"))
            .collect()
    };
    let how = if round % 2 == 1 {
        let lo = *KILL_DELAY_MS.start();
        let ms = lo + rng.below((KILL_DELAY_MS.end() - lo + 1) as usize) as u64;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        "timed".to_owned()
    } else {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let deadline = start + Duration::from_millis(*KILL_DELAY_MS.end());
        let mut before = images(&env.layout.pool);
        loop {
            let now = images(&env.layout.pool);
            if let Some(p) = now.difference(&before).next() {
                let after = rng.below(20) as u64;
                tokio::time::sleep(Duration::from_millis(after)).await;
                break format!(
                    "{after} ms after {} appeared",
                    p.strip_prefix(&env.layout.pool).unwrap_or(p).display()
                );
            }
            if Instant::now() > deadline {
                break "copy-watch timed out".to_owned();
            }
            before = now;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    sh.killed.store(true, Ordering::SeqCst);
    tokio::task::block_in_place(|| env.server.kill9());
    let at = start.elapsed().as_millis();
    sh.stop.store(true, Ordering::SeqCst);
    // Calls to a dead server fail at once (ECONNREFUSED), or count as
    // killed after ANSWER_AFTER_KILL (less than HANG_LIMIT).
    let deadline = Instant::now() + HANG_LIMIT;
    while sh.calls.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "a call to the killed server did not end"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    format!("{how}, at {at} ms")
}

fn describe(p: &Pending) -> String {
    match p {
        Pending::CreateVolume(n, _) => {
            format!("CreateVolume({})", n.split('-').next().unwrap_or(n))
        }
        Pending::DeleteVolume(..) => "DeleteVolume".into(),
        Pending::Mount(_) => "Stage+Publish".into(),
        Pending::Unmount(_) => "Unpublish+Unstage".into(),
        Pending::CreateSnapshot(..) => "CreateSnapshot".into(),
        Pending::DeleteSnapshot(..) => "DeleteSnapshot".into(),
        Pending::CreateGroup(..) => "CreateVolumeGroupSnapshot".into(),
        Pending::DeleteGroup(..) => "DeleteVolumeGroupSnapshot".into(),
        Pending::Expand(..) => "Expand".into(),
    }
}

/// The soak on a pool filesystem `pool_fs`, the server started with
/// `extra` arguments.
async fn soak(pool_fs: &str, extra: &[&str]) {
    let rounds = env_number("STOWAGE_CRASH_ROUNDS").map_or(DEFAULT_ROUNDS, |n| n as usize);
    let seed = env_number("STOWAGE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let label = format!("{pool_fs} pool {}", extra.join(" "));
    eprintln!(
        "crash soak ({label}): seed {seed} (STOWAGE_CRASH_SEED={seed} to replay), {rounds} rounds"
    );
    let mut rng = Rng::new(
        seed ^ label
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b)),
    );
    let mut env = Env::with_args(pool_fs, extra).await;
    let _thaw = ThawUnder(env.scratch.root.clone());
    let paths = Paths {
        staging: env.layout.staging.clone(),
        targets: env.layout.targets.clone(),
    };

    // The base volumes, staged and published; ballast in the ext4 one.
    let mut model = Model::default();
    for (name, kind, size) in BASE_VOLUMES {
        let got = env.create(name, kind, size).await;
        let mut v = paths.new_vol(name, kind, "base".into());
        v.base = true;
        v.id = Some(got.volume_id.clone());
        v.capacity = got.capacity_bytes;
        v.changing = false;
        std::fs::create_dir_all(&v.staging).unwrap();
        stage_and_publish(&mut env.c, &got.volume_id, kind, &v.staging, &v.target)
            .await
            .expect("stage and publish a base volume");
        v.phase = Phase::Published;
        if kind == "ext4" {
            let s = rng.next();
            write_slot(kind, &v.target, BALLAST_SLOT, s, BALLAST_LEN).unwrap();
            v.slots[BALLAST_SLOT].content = Some((s, BALLAST_LEN));
        }
        model.vols.insert(name.to_owned(), v);
    }

    let mut f = Findings::default();
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let soak_start = Instant::now();
    for round in 0..rounds {
        let round_start = Instant::now();
        model.log.clear();
        model.round_start = Some(Instant::now());
        let sh = Arc::new(Shared {
            model: Mutex::new(std::mem::take(&mut model)),
            killed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let mut tasks = Vec::new();
        for _ in 0..2 {
            tasks.push(tokio::spawn(io_task(sh.clone(), Rng::new(rng.next()))));
        }
        tasks.push(tokio::spawn(snapshot_task(
            sh.clone(),
            env.c.clone(),
            Rng::new(rng.next()),
            paths.clone(),
        )));
        tasks.push(tokio::spawn(copy_task(
            sh.clone(),
            env.c.clone(),
            Rng::new(rng.next()),
            paths.clone(),
        )));
        tasks.push(tokio::spawn(lifecycle_task(
            sh.clone(),
            env.c.clone(),
            Rng::new(rng.next()),
        )));

        let how = kill_at_random(&mut env, &sh, &mut rng, round).await;
        let checks_start = Instant::now();
        tokio::task::block_in_place(|| env.server.restart());
        env.reconnect().await;

        // (a) first: a frozen filesystem blocks the writers (and tasks).
        check_frozen(&mut env, &mut f).await;
        let deadline = Instant::now() + HANG_LIMIT;
        for t in tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, t).await {
                Ok(r) => r.expect("workload task"),
                Err(_) => f.note(
                    Kind::HungIo,
                    1,
                    format!(
                        "a workload task was still blocked {} s after the restart",
                        HANG_LIMIT.as_secs()
                    ),
                ),
            }
        }
        model = std::mem::take(&mut *sh.m());
        model.clear_leases();
        for op in std::mem::take(&mut model.failed_ops) {
            f.note(Kind::FailedOps, 1, op);
        }
        for (n, what) in std::mem::take(&mut model.lost) {
            f.note(Kind::LostFsyncedBytes, n, what);
        }
        let inflight: Vec<String> = model.pending.iter().map(describe).collect();
        for d in &inflight {
            *landed.entry(d.clone()).or_default() += 1;
        }

        // (b), (c), (d): the state the restart left, before the CO acts.
        check_loops(&env, &mut f).await;
        check_mounts(&env, &mut f);
        check_pool_objects(&mut env, &mut f).await;
        // The CO retries what was cut short; then (e) and (f).
        settle(&mut env, &mut model, &mut f).await;
        check_volumes(&mut env, &mut model, &mut f, &mut rng).await;
        model.clear_leases();

        let label = format!("round {round} (kill {how}; in flight {inflight:?})");
        let found = f.end_round(&label);
        eprintln!(
            "{label}: {} volumes, {} snapshots, {} groups; {:.1} s ({:.1} s restart and checks){}",
            model.vols.len(),
            model.snaps.len(),
            model.groups.len(),
            round_start.elapsed().as_secs_f64(),
            checks_start.elapsed().as_secs_f64(),
            if found.is_empty() { "" } else { " -- FOUND:" }
        );
        if !found.is_empty() {
            eprintln!(
                "  {}\n  operations this round:\n    {}\n  server log (tail):\n{}",
                found.join("\n  "),
                model.log.join("\n    "),
                log_tail(&env, 30)
            );
        }
    }

    clean_up_through_the_api(&mut env, &mut f).await;
    let found = f.end_round("clean-up");
    if !found.is_empty() {
        eprintln!("clean-up -- FOUND:\n  {}", found.join("\n  "));
    }
    let line = f.summary(rounds);
    eprintln!(
        "{line}\n  ({label}, seed {seed}, {:.1} s per round; kills landed during {landed:?})",
        soak_start.elapsed().as_secs_f64() / rounds.max(1) as f64
    );
    assert!(f.clean(), "{line}\n  {}", f.details.join("\n  "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_soak_on_an_xfs_pool() {
    soak("xfs", &[]).await;
}

/// By default an ext4 pool is kept in an xfs image (reflinks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_soak_on_an_ext4_pool() {
    soak("ext4", &[]).await;
}

/// The ext4 pool as it is: snapshots and clones are sparse copies, with a
/// staged source frozen for the whole copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_soak_on_an_ext4_pool_of_sparse_copies() {
    soak("ext4", &["--pool-image", "never"]).await;
}
