//! Crash test (issue 2): `kill -9` the real `stowage serve` at random
//! points of a random sequence of lifecycle operations, restart it, and
//! check that the state is consistent, that nothing leaked (mounts, loop
//! devices, pool storage) and that every acknowledged volume still works.
//!
//! The seed is printed; `STOWAGE_CRASH_SEED=<n>` replays the same random
//! choices (where each kill lands still depends on timing), and
//! `STOWAGE_CRASH_ROUNDS=<n>` runs a longer soak.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use stowage::csi;
use stowage::os::loopdev::LoopDevice;
use stowage::os::mountinfo::{MountEntry, MountTable};
use tonic::{Code, Status};

/// Kill/restart rounds.
const ROUNDS: usize = 20;
/// Operations a round issues at most before the kill lands.
const OPS_PER_ROUND: usize = 40;
/// The kill lands 0..=this many milliseconds after a round starts.
const MAX_KILL_DELAY_MS: u64 = 40;
/// Bound for one call to a live server. A hang detector, not a timing
/// assertion: a call takes milliseconds.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// Bound for one check-and-write of a volume's data. A hang detector: it
/// takes milliseconds.
const IO_LIMIT: Duration = Duration::from_secs(60);
/// The status a round's call counts as having when it got no answer within
/// [`ANSWER_AFTER_KILL`] (20 s): its outcome is unknown, as for any call in
/// flight.
const NO_ANSWER_AFTER_KILL: &str = "no answer within 20 s of the kill";
const VOLUME_SIZE: i64 = 64 * MIB;
/// Bytes written to (and checked on) a volume.
const DATA_LEN: usize = 64 << 10;
/// The volumes the rounds work on, by access kind.
const KINDS: [&str; 5] = ["dir", "ext4", "raw", "dir", "ext4"];

/// xorshift64: small, seedable, no dependency.
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
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn seed() -> u64 {
    std::env::var("STOWAGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

// ---------------------------------------------------------------------------
// The model: what the CO knows, from acknowledged operations only.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Absent,
    Created,
    Staged,
    Published,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Create,
    Stage,
    Publish,
    Unpublish,
    Unstage,
    Delete,
}

#[derive(Clone, Debug)]
struct Slot {
    index: usize,
    kind: &'static str,
    /// Bumped at each acknowledged delete: the next volume gets a new name.
    generation: u32,
    phase: Phase,
    id: Option<String>,
    /// The ID of the volume this slot last deleted (for repeated deletes).
    prev_id: Option<String>,
    /// Seed of the pattern last written (and acknowledged) on the volume.
    data: Option<u64>,
    staging: PathBuf,
    target: PathBuf,
}

impl Slot {
    fn name(&self) -> String {
        format!("crash-{}-{}", self.index, self.generation)
    }
    fn is_block(&self) -> bool {
        self.kind != "dir"
    }
    /// Whether staging mounts something at the staging path.
    fn mounts_staging(&self) -> bool {
        self.kind != "raw"
    }
    fn id(&self) -> &str {
        self.id.as_deref().expect("slot has a volume")
    }
    fn describe(&self) -> String {
        format!(
            "slot {} ({}, {}, {:?}, id {:?})",
            self.index,
            self.kind,
            self.name(),
            self.phase,
            self.id
        )
    }
}

fn uuid_of(id: &str) -> &str {
    id.rsplit(':').next().unwrap_or_default()
}

fn image_of(env: &Env, id: &str) -> PathBuf {
    env.layout
        .pool
        .join("volumes/block")
        .join(format!("{}.img", uuid_of(id)))
}

/// What the model does with an acknowledged operation.
fn apply(s: &mut Slot, op: Op, ret: Option<String>) -> Result<(), String> {
    match (op, s.phase) {
        (Op::Create, Phase::Absent) => {
            s.id = Some(ret.ok_or("CreateVolume returned no volume")?);
            s.phase = Phase::Created;
        }
        (Op::Create, _) if ret != s.id => {
            return Err(format!(
                "repeated CreateVolume of {} returned {ret:?}, not {:?}",
                s.name(),
                s.id
            ));
        }
        (Op::Stage, Phase::Created) => s.phase = Phase::Staged,
        (Op::Publish, Phase::Staged) => s.phase = Phase::Published,
        (Op::Unpublish, Phase::Published) => s.phase = Phase::Staged,
        (Op::Unstage, Phase::Staged) => s.phase = Phase::Created,
        (Op::Delete, Phase::Created) => {
            s.prev_id = s.id.take();
            s.phase = Phase::Absent;
            s.generation += 1;
            s.data = None;
        }
        // Idempotent repeats (and inverses of what is not there).
        _ => {}
    }
    Ok(())
}

enum Action {
    Rpc(Op),
    /// Check the last pattern written and write a new one (published only).
    Io,
}

/// A random operation that is valid in the slot's phase: mostly forward
/// progress, some idempotent repeats, some inverses of what is not there.
fn choose(rng: &mut Rng, s: &Slot) -> Action {
    let r = rng.below(100);
    Action::Rpc(match s.phase {
        Phase::Absent if r >= 90 && s.prev_id.is_some() => Op::Delete,
        Phase::Absent => Op::Create,
        Phase::Created => match r {
            0..60 => Op::Stage,
            60..80 => Op::Delete,
            80..90 => Op::Create,
            90..95 => Op::Unstage,
            _ => Op::Unpublish,
        },
        Phase::Staged => match r {
            0..55 => Op::Publish,
            55..80 => Op::Unstage,
            80..90 => Op::Stage,
            _ => Op::Unpublish,
        },
        Phase::Published => match r {
            0..40 => return Action::Io,
            40..80 => Op::Unpublish,
            80..90 => Op::Publish,
            _ => Op::Stage,
        },
    })
}

/// Issues `op` for the slot as a CO would; Ok carries CreateVolume's ID.
/// A call without an answer within [`CALL_LIMIT`] is DEADLINE_EXCEEDED
/// (a failure: the server is up and must answer).
async fn call(c: &mut Clients, s: &Slot, op: Op) -> Result<Option<String>, Status> {
    match tokio::time::timeout(CALL_LIMIT, call_unbounded(c, s, op)).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "{op:?} of {}: no answer within {CALL_LIMIT:?}",
            s.describe()
        ))),
    }
}

async fn call_unbounded(c: &mut Clients, s: &Slot, op: Op) -> Result<Option<String>, Status> {
    let id = s.id.clone().unwrap_or_default();
    match op {
        Op::Create => c
            .controller
            .create_volume(create_req(&s.name(), s.kind, VOLUME_SIZE))
            .await
            .map(|r| r.into_inner().volume.map(|v| v.volume_id)),
        Op::Stage => c
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: s.staging.display().to_string(),
                volume_capability: Some(cap_for(s.kind)),
                ..Default::default()
            })
            .await
            .map(|_| None),
        Op::Publish => c
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id,
                staging_target_path: s.staging.display().to_string(),
                target_path: s.target.display().to_string(),
                volume_capability: Some(cap_for(s.kind)),
                readonly: false,
                ..Default::default()
            })
            .await
            .map(|_| None),
        Op::Unpublish => c
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id,
                target_path: s.target.display().to_string(),
            })
            .await
            .map(|_| None),
        Op::Unstage => c
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: s.staging.display().to_string(),
            })
            .await
            .map(|_| None),
        Op::Delete => c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: s.id.clone().or_else(|| s.prev_id.clone()).unwrap(),
                ..Default::default()
            })
            .await
            .map(|_| None),
    }
}

/// Whether a failed call says nothing about the outcome (the server died
/// under it, or was already dead).
/// The answer to a call the server was killed under, or None when there is
/// none within [`ANSWER_AFTER_KILL`] (the task is then aborted): a call the
/// kill beat to the socket waits for a connection until the server
/// restarts, which comes only after this, so the server never had it.
async fn answer_after_kill<T>(
    call: tokio::task::JoinHandle<Result<T, Status>>,
) -> Option<Result<T, Status>> {
    let abort = call.abort_handle();
    match tokio::time::timeout(ANSWER_AFTER_KILL, call).await {
        Ok(r) => Some(r.expect("the call's task")),
        Err(_) => {
            abort.abort();
            None
        }
    }
}

/// The unix sockets bound at `path` and who holds them (`ss -xap`): what
/// a call that got no answer after the kill could have been waiting on.
fn socket_holders(path: &Path) -> String {
    let path = path.display().to_string();
    match std::process::Command::new("ss").arg("-xap").output() {
        Ok(out) => {
            let lines: String = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(&path))
                .map(|l| format!("  {l}\n"))
                .collect();
            if lines.is_empty() {
                "  (none)\n".to_owned()
            } else {
                lines
            }
        }
        Err(e) => format!("  (cannot run ss: {e})\n"),
    }
}

fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

// ---------------------------------------------------------------------------
// Data on volumes: a pattern in a file (mount kinds) or at the start of the
// device (raw).

/// Where the data lives: `<dir>/data` for mount kinds, the device for raw.
fn data_path(kind: &str, at: &Path) -> PathBuf {
    if kind == "raw" {
        at.to_owned()
    } else {
        at.join("data")
    }
}

fn check_data(kind: &str, at: &Path, seed: Option<u64>) -> Result<(), String> {
    let Some(seed) = seed else {
        return Ok(());
    };
    let path = data_path(kind, at);
    let mut back = vec![0u8; DATA_LEN];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut back))
        .map_err(|e| format!("read data at {}: {e}", path.display()))?;
    if back != pattern(seed, DATA_LEN) {
        return Err(format!(
            "data at {} is not what was written last",
            path.display()
        ));
    }
    Ok(())
}

fn write_data(kind: &str, at: &Path, seed: u64) -> Result<(), String> {
    let path = data_path(kind, at);
    let r = if kind == "raw" {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(0))?;
                f.write_all(&pattern(seed, DATA_LEN))?;
                f.sync_all()
            })
    } else {
        std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(&pattern(seed, DATA_LEN))?;
            f.sync_all()
        })
    };
    r.map_err(|e| format!("write data at {}: {e}", path.display()))
}

/// Checks the last pattern at the target and writes a new one, within
/// [`IO_LIMIT`].
fn io(s: &mut Slot, rng: &mut Rng) -> Result<(), String> {
    let seed = rng.next();
    let (kind, target, last) = (s.kind, s.target.clone(), s.data);
    within_io_limit(&s.describe(), move || {
        check_data(kind, &target, last)?;
        write_data(kind, &target, seed)
    })?;
    s.data = Some(seed);
    Ok(())
}

/// Runs `f` (file I/O on a volume) on a thread of its own and waits
/// [`IO_LIMIT`] for it. An I/O that does not return fails the test with
/// the thread's place in the kernel instead of hanging it.
fn within_io_limit(
    what: &str,
    f: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let tid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let its_tid = tid.clone();
    std::thread::spawn(move || {
        its_tid.store(
            nix::unistd::gettid().as_raw(),
            std::sync::atomic::Ordering::SeqCst,
        );
        let _ = tx.send(f());
    });
    match rx.recv_timeout(IO_LIMIT) {
        Ok(r) => r,
        Err(_) => {
            let tid = tid.load(std::sync::atomic::Ordering::SeqCst);
            let read = |f: &str| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/{f}")).unwrap_or_default()
            };
            Err(format!(
                "{what}: data I/O did not return within {IO_LIMIT:?}; its thread \
                 (tid {tid}) waits in {} with kernel stack:\n{}",
                read("wchan"),
                read("stack")
            ))
        }
    }
}

// ---------------------------------------------------------------------------
// One round of operations, run while the kill lands.

struct InFlight {
    slot: usize,
    op: Op,
    status: Status,
}

struct Outcome {
    slots: Vec<Slot>,
    inflight: Option<InFlight>,
    log: Vec<String>,
}

/// Returns [`ANSWER_AFTER_KILL`] after `killed` says the server was killed
/// (never, if it is not).
async fn answer_time_over(mut killed: tokio::sync::watch::Receiver<bool>) {
    if killed.wait_for(|k| *k).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(ANSWER_AFTER_KILL).await;
}

async fn run_ops(
    mut c: Clients,
    mut slots: Vec<Slot>,
    seed: u64,
    killed: tokio::sync::watch::Receiver<bool>,
) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let mut log = Vec::new();
    for _ in 0..OPS_PER_ROUND {
        let i = rng.below(slots.len() as u64) as usize;
        match choose(&mut rng, &slots[i]) {
            Action::Io => {
                let r = io(&mut slots[i], &mut rng);
                log.push(format!("{}: io -> {r:?}", slots[i].describe()));
                r.map_err(|e| format!("{e}\nops this round:\n  {}", log.join("\n  ")))?;
            }
            Action::Rpc(op) => {
                let before = slots[i].describe();
                let answer = tokio::select! {
                    r = call(&mut c, &slots[i], op) => r,
                    () = answer_time_over(killed.clone()) => {
                        Err(Status::unavailable(NO_ANSWER_AFTER_KILL))
                    }
                };
                match answer {
                    Ok(ret) => {
                        log.push(format!("{before}: {op:?} -> OK {ret:?}"));
                        apply(&mut slots[i], op, ret)
                            .map_err(|e| format!("{e}\nops this round:\n  {}", log.join("\n  ")))?;
                    }
                    Err(status) if is_transport(&status) => {
                        log.push(format!(
                            "{before}: {op:?} -> in flight at the kill ({:?}: {})",
                            status.code(),
                            status.message()
                        ));
                        return Ok(Outcome {
                            slots,
                            inflight: Some(InFlight {
                                slot: i,
                                op,
                                status,
                            }),
                            log,
                        });
                    }
                    Err(status) => {
                        log.push(format!("{before}: {op:?} -> {status:?}"));
                        return Err(format!(
                            "a valid operation failed before the kill\nops this round:\n  {}",
                            log.join("\n  ")
                        ));
                    }
                }
            }
        }
    }
    Ok(Outcome {
        slots,
        inflight: None,
        log,
    })
}

// ---------------------------------------------------------------------------
// What the node's state files say.

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
    let mut out = Vec::new();
    for (_, v) in store
        .load_all::<serde_json::Value>(stowage::state::Table::NodeVolumes)
        .expect("read node records")
    {
        let pathbuf = |v: &serde_json::Value| v.as_str().map(PathBuf::from);
        let staging = v
            .get("staging")
            .filter(|s| !s.is_null())
            .map(|s| StagingRec {
                path: pathbuf(&s["path"]).expect("staging.path"),
                device: pathbuf(&s["device"]),
                mounted: s["mounted"].as_bool().unwrap_or(false),
            });
        let publications = v
            .get("publications")
            .and_then(|p| p.as_object())
            .map(|m| {
                m.iter()
                    .map(|(t, p)| (PathBuf::from(t), pathbuf(&p["own_device"])))
                    .collect()
            })
            .unwrap_or_default();
        out.push(NodeRec {
            id: v["id"].as_str().expect("id").to_owned(),
            staging,
            publications,
        });
    }
    out
}

fn mounts_under(roots: &[&Path]) -> Vec<MountEntry> {
    MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .filter(|e| roots.iter().any(|r| e.mount_point.starts_with(r)))
        .collect()
}

/// Loop devices on pool images that no node record claims as a staging
/// or publication device of the image's volume.
fn unclaimed_loops(env: &Env, records: &[NodeRec]) -> Vec<String> {
    let claimed: BTreeMap<PathBuf, &str> = records
        .iter()
        .flat_map(|r| {
            r.staging
                .iter()
                .filter_map(|s| s.device.clone())
                .chain(r.publications.values().flatten().cloned())
                .map(|d| (d, uuid_of(&r.id)))
                .collect::<Vec<_>>()
        })
        .collect();
    loops_under(&env.layout.pool)
        .into_iter()
        .filter(|(d, b)| {
            !claimed
                .get(&d.path())
                .is_some_and(|u| b.to_string_lossy().contains(u))
        })
        .map(|(d, b)| format!("{} -> {}", d.path().display(), b.display()))
        .collect()
}

/// Mounts under the staging and target dirs that are no staging or
/// publication the node records at that path, or are stacked.
fn unrecorded_mounts(env: &Env, records: &[NodeRec]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for m in mounts_under(&[&env.layout.staging, &env.layout.targets]) {
        if !seen.insert(m.mount_point.clone()) {
            out.push(format!("two mounts stacked at {}", m.mount_point.display()));
        }
        let recorded = records.iter().any(|r| {
            r.staging
                .as_ref()
                .is_some_and(|s| s.mounted && s.path == m.mount_point)
                || r.publications.contains_key(&m.mount_point)
        });
        if !recorded {
            out.push(format!(
                "mount at {} ({} {}) is recorded by no staging or publication",
                m.mount_point.display(),
                m.fs_type,
                m.root.display()
            ));
        }
    }
    out
}

/// The IDs ListVolumes gives, within [`CALL_LIMIT`].
async fn list_ids(c: &mut Clients) -> Result<BTreeSet<String>, Status> {
    let r = tokio::time::timeout(
        CALL_LIMIT,
        c.controller
            .list_volumes(csi::ListVolumesRequest::default()),
    )
    .await
    .map_err(|_| {
        Status::deadline_exceeded(format!("ListVolumes: no answer within {CALL_LIMIT:?}"))
    })??
    .into_inner();
    assert!(r.next_token.is_empty(), "ListVolumes paginated unasked");
    Ok(r.entries
        .into_iter()
        .filter_map(|e| e.volume.map(|v| v.volume_id))
        .collect())
}

/// Pool storage present, by UUID.
fn pool_storage(env: &Env) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (dir, suffix) in [("volumes/dir", ""), ("volumes/block", ".img")] {
        for e in std::fs::read_dir(env.layout.pool.join(dir)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(u) = name.strip_suffix(suffix) {
                out.insert(u.to_owned());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Failure reports.

/// The server's own log lines (not the gRPC transport's), without colours.
fn server_log(env: &Env) -> String {
    let mut out = String::new();
    for line in env.server.log_text().lines() {
        let mut plain = String::with_capacity(line.len());
        let mut chars = line.chars();
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
        if plain.contains(" stowage") {
            out.push_str(&plain);
            out.push('\n');
        }
    }
    out
}

struct Ctx {
    seed: u64,
    round: usize,
    delay_ms: u64,
    ops: Vec<String>,
}

impl Ctx {
    #[track_caller]
    fn fail(&self, env: &Env, msg: &str) -> ! {
        let log = server_log(env);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        let mounts: Vec<String> = mounts_under(&[&env.scratch.root])
            .iter()
            .map(|e| {
                format!(
                    "{} ({} {} root {})",
                    e.mount_point.display(),
                    e.fs_type,
                    e.source,
                    e.root.display()
                )
            })
            .collect();
        let loops: Vec<String> = loops_under(&env.layout.pool)
            .iter()
            .map(|(d, b)| format!("{} -> {}", d.path().display(), b.display()))
            .collect();
        panic!(
            "crash test (seed {}, round {}, kill after {} ms): {msg}\n\
             ops this round:\n  {}\nnode records: {:#?}\nmounts: {mounts:#?}\nloops: {loops:#?}\n\
             server log (tail):\n{tail}",
            self.seed,
            self.round,
            self.delay_ms,
            self.ops.join("\n  "),
            node_records(&env.layout.state),
        );
    }
}

// ---------------------------------------------------------------------------
// Checks.

/// Right after the restart, before anything is retried. Returns the ID of
/// a volume whose CreateVolume was in flight and that exists after all.
async fn check_after_restart(
    env: &mut Env,
    slots: &[Slot],
    inflight: Option<&InFlight>,
    ctx: &Ctx,
) -> Option<String> {
    let changing = |s: &Slot| {
        inflight.is_some_and(|f| {
            f.slot == s.index
                && matches!(
                    (f.op, s.phase),
                    (Op::Create, Phase::Absent)
                        | (Op::Stage, Phase::Created)
                        | (Op::Publish, Phase::Staged)
                        | (Op::Unpublish, Phase::Published)
                        | (Op::Unstage, Phase::Staged)
                        | (Op::Delete, Phase::Created)
                )
        })
    };

    // (a) ListVolumes has every acknowledged, undeleted volume; only the
    // volume of an in-flight create or delete may go either way.
    let listed = match list_ids(&mut env.c).await {
        Ok(l) => l,
        Err(e) => ctx.fail(env, &format!("ListVolumes after restart: {e:?}")),
    };
    let mut expected = BTreeSet::new();
    let mut maybe = BTreeSet::new();
    let mut creating = None;
    for s in slots {
        if changing(s) && s.phase == Phase::Absent {
            creating = Some(s);
        } else if changing(s) && inflight.is_some_and(|f| f.op == Op::Delete) {
            maybe.insert(s.id().to_owned());
        } else if s.phase >= Phase::Created {
            expected.insert(s.id().to_owned());
        }
    }
    let missing: Vec<_> = expected.difference(&listed).collect();
    if !missing.is_empty() {
        ctx.fail(
            env,
            &format!("(a) acknowledged volumes missing from ListVolumes: {missing:?}"),
        );
    }
    let extra: Vec<String> = listed
        .iter()
        .filter(|id| !expected.contains(*id) && !maybe.contains(*id))
        .cloned()
        .collect();
    let unknown = match (extra.as_slice(), creating) {
        ([], _) => None,
        ([one], Some(s)) if one.starts_with(if s.is_block() { "block:" } else { "dir:" }) => {
            Some(one.clone())
        }
        _ => ctx.fail(
            env,
            &format!("(a) ListVolumes has volumes nobody created: {extra:?}"),
        ),
    };
    // Storage without a record is removed at start; a record without
    // storage would be a volume that cannot work (except one whose delete
    // was cut short: the storage goes first, and the retry finishes).
    let storage = pool_storage(env);
    for id in listed.difference(&maybe) {
        if !storage.contains(uuid_of(id)) {
            ctx.fail(
                env,
                &format!("(a) volume {id} is listed but has no storage"),
            );
        }
    }
    if let Some(u) = storage
        .iter()
        .find(|u| !listed.iter().any(|id| uuid_of(id) == u.as_str()))
    {
        ctx.fail(env, &format!("(a) pool storage {u} belongs to no volume"));
    }

    // (b) Every loop device on a pool image is claimed by a node record.
    // A detach the kernel defers until the last opener closes (an orphaned
    // mkfs or blkid of the killed server) may take a moment to finish.
    let waited = Instant::now();
    let deadline = waited + Duration::from_secs(3);
    let records = loop {
        let records = node_records(&env.layout.state);
        let leaked = unclaimed_loops(env, &records);
        if leaked.is_empty() {
            if waited.elapsed() > Duration::from_millis(20) {
                eprintln!(
                    "note: round {}: unclaimed loop devices took {} ms to go",
                    ctx.round,
                    waited.elapsed().as_millis()
                );
            }
            break records;
        }
        if Instant::now() > deadline {
            ctx.fail(
                env,
                &format!("(b) loop devices no node record claims: {leaked:?}"),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // (c) Every mount under the staging and target dirs is a staging or a
    // publication the node records at that path, and none is stacked.
    let unrecorded = unrecorded_mounts(env, &records);
    if !unrecorded.is_empty() {
        ctx.fail(env, &format!("(c) {}", unrecorded.join("; ")));
    }

    // (d) Acknowledged stagings and publications are in place and their
    // data is intact.
    for s in slots.iter().filter(|s| !changing(s)) {
        let rec = records
            .iter()
            .find(|r| Some(r.id.as_str()) == s.id.as_deref());
        if s.phase < Phase::Staged {
            if rec.is_some_and(|r| r.staging.is_some() || !r.publications.is_empty()) {
                ctx.fail(
                    env,
                    &format!("(d) {} is recorded staged or published", s.describe()),
                );
            }
            continue;
        }
        let Some(st) = rec.and_then(|r| r.staging.as_ref()) else {
            ctx.fail(env, &format!("(d) {} has no staging record", s.describe()));
        };
        if st.path != s.staging {
            ctx.fail(
                env,
                &format!("(d) {} staged at {:?}", s.describe(), st.path),
            );
        }
        if s.mounts_staging() && !is_mounted(&s.staging) {
            ctx.fail(env, &format!("(d) {} staging is not mounted", s.describe()));
        }
        if s.is_block() {
            let backing = st
                .device
                .as_deref()
                .and_then(LoopDevice::from_path)
                .and_then(|d| d.backing_file());
            if backing != Some(image_of(env, s.id())) {
                ctx.fail(
                    env,
                    &format!(
                        "(d) {} staging device {:?} is backed by {backing:?}",
                        s.describe(),
                        st.device
                    ),
                );
            }
        }
        let published = rec.is_some_and(|r| r.publications.contains_key(&s.target));
        if published != (s.phase == Phase::Published) {
            ctx.fail(
                env,
                &format!("(d) {} publication recorded: {published}", s.describe()),
            );
        }
        let at = if s.phase == Phase::Published {
            if !is_mounted(&s.target) {
                ctx.fail(env, &format!("(d) {} target is not mounted", s.describe()));
            }
            s.target.clone()
        } else if s.kind == "raw" {
            st.device.clone().unwrap()
        } else {
            s.staging.clone()
        };
        if let Err(e) = check_data(s.kind, &at, s.data) {
            ctx.fail(env, &format!("(d) {}: {e}", s.describe()));
        }
    }
    unknown
}

/// With nothing in flight, the world is exactly what the model says.
async fn check_exact(env: &mut Env, slots: &[Slot], ctx: &Ctx) {
    let listed = match list_ids(&mut env.c).await {
        Ok(l) => l,
        Err(e) => ctx.fail(env, &format!("ListVolumes: {e:?}")),
    };
    let expected: BTreeSet<String> = slots.iter().filter_map(|s| s.id.clone()).collect();
    if listed != expected {
        ctx.fail(
            env,
            &format!("ListVolumes is {listed:?}, expected {expected:?}"),
        );
    }
    let storage = pool_storage(env);
    let expected_storage: BTreeSet<String> =
        expected.iter().map(|id| uuid_of(id).to_owned()).collect();
    if storage != expected_storage {
        ctx.fail(
            env,
            &format!("pool storage is {storage:?}, expected {expected_storage:?}"),
        );
    }

    let records = node_records(&env.layout.state);
    let recorded: BTreeSet<String> = records.iter().map(|r| r.id.clone()).collect();
    let in_use: BTreeSet<String> = slots
        .iter()
        .filter(|s| s.phase >= Phase::Staged)
        .map(|s| s.id().to_owned())
        .collect();
    if recorded != in_use {
        ctx.fail(
            env,
            &format!("node records are for {recorded:?}, expected {in_use:?}"),
        );
    }

    let mut want_mounts = BTreeSet::new();
    let mut want_loops = BTreeMap::new();
    for s in slots.iter().filter(|s| s.phase >= Phase::Staged) {
        let r = records.iter().find(|r| r.id == s.id()).unwrap();
        let st = r
            .staging
            .as_ref()
            .unwrap_or_else(|| ctx.fail(env, &format!("{} has no staging record", s.describe())));
        let want_pubs: BTreeSet<&PathBuf> = if s.phase == Phase::Published {
            BTreeSet::from([&s.target])
        } else {
            BTreeSet::new()
        };
        if st.path != s.staging || r.publications.keys().collect::<BTreeSet<_>>() != want_pubs {
            ctx.fail(env, &format!("{} recorded as {r:?}", s.describe()));
        }
        if s.mounts_staging() {
            want_mounts.insert(s.staging.clone());
        }
        if s.phase == Phase::Published {
            want_mounts.insert(s.target.clone());
        }
        if s.is_block() {
            want_loops.insert(st.device.clone().unwrap(), image_of(env, s.id()));
        }
    }
    let mounts: Vec<PathBuf> = mounts_under(&[&env.layout.staging, &env.layout.targets])
        .into_iter()
        .map(|e| e.mount_point)
        .collect();
    let unique: BTreeSet<PathBuf> = mounts.iter().cloned().collect();
    if unique.len() != mounts.len() || unique != want_mounts {
        ctx.fail(
            env,
            &format!("mounts are {mounts:?}, expected {want_mounts:?}"),
        );
    }
    let loops: BTreeMap<PathBuf, PathBuf> = loops_under(&env.layout.pool)
        .into_iter()
        .map(|(d, b)| (d.path(), b))
        .collect();
    if loops != want_loops {
        ctx.fail(
            env,
            &format!("loop devices are {loops:?}, expected {want_loops:?}"),
        );
    }
}

/// Settles the operation that was in flight at the kill, as a CO would:
/// retry it, or give up a stage or publish by undoing it.
async fn resolve(
    env: &mut Env,
    slots: &mut [Slot],
    inflight: Option<InFlight>,
    unknown: Option<String>,
    rng: &mut Rng,
    ctx: &mut Ctx,
) {
    let Some(f) = inflight else {
        return;
    };
    let s = &mut slots[f.slot];
    let op = match (f.op, s.phase) {
        (Op::Stage, Phase::Created) if rng.percent(50) => Op::Unstage,
        (Op::Publish, Phase::Staged) if rng.percent(50) => Op::Unpublish,
        (op, _) => op,
    };
    let before = s.describe();
    let ret = match call(&mut env.c, s, op).await {
        Ok(r) => r,
        Err(e) => ctx.fail(
            env,
            &format!(
                "after the restart, {op:?} of {before} (settling the {:?} in flight: {:?}) failed: {e:?}",
                f.op, f.status
            ),
        ),
    };
    ctx.ops
        .push(format!("after restart: {before}: {op:?} -> OK {ret:?}"));
    if let Some(u) = unknown
        && ret.as_ref() != Some(&u)
    {
        ctx.fail(
            env,
            &format!("retried CreateVolume returned {ret:?}, but {u} was created at the crash"),
        );
    }
    if let Err(e) = apply(s, op, ret) {
        ctx.fail(env, &e);
    }
}

/// Takes every volume through the rest of its lifecycle, checking its
/// data, and deletes it. Every call must succeed.
async fn converge(env: &mut Env, slots: &mut [Slot], rng: &mut Rng, ctx: &mut Ctx) {
    for s in slots.iter_mut() {
        let mut plan = Vec::new();
        if s.phase == Phase::Absent {
            if s.prev_id.is_some() {
                plan.push(Op::Delete);
            }
        } else {
            // Repeats of what was done are no-ops that succeed.
            plan.extend([Op::Create, Op::Stage, Op::Publish]);
        }
        for op in plan {
            let before = s.describe();
            match call(&mut env.c, s, op).await {
                Ok(ret) => {
                    ctx.ops.push(format!("converge: {before}: {op:?} -> OK"));
                    if let Err(e) = apply(s, op, ret) {
                        ctx.fail(env, &e);
                    }
                }
                Err(e) => ctx.fail(env, &format!("converge: {op:?} of {before}: {e:?}")),
            }
        }
        if s.phase == Phase::Absent {
            continue;
        }
        if let Err(e) = io(s, rng).and_then(|()| check_data(s.kind, &s.target, s.data)) {
            ctx.fail(env, &format!("converge: {}: {e}", s.describe()));
        }
        for op in [
            Op::Unpublish,
            Op::Unpublish,
            Op::Unstage,
            Op::Unstage,
            Op::Delete,
            Op::Delete,
        ] {
            let before = s.describe();
            match call(&mut env.c, s, op).await {
                Ok(ret) => {
                    ctx.ops.push(format!("converge: {before}: {op:?} -> OK"));
                    if let Err(e) = apply(s, op, ret) {
                        ctx.fail(env, &e);
                    }
                }
                Err(e) => ctx.fail(env, &format!("converge: {op:?} of {before}: {e:?}")),
            }
        }
    }
}

/// Nothing of any volume is left: no volume, record, storage, mount or
/// loop device.
async fn check_all_gone(env: &mut Env, ctx: &Ctx) {
    match list_ids(&mut env.c).await {
        Ok(l) if l.is_empty() => {}
        r => ctx.fail(env, &format!("volumes left: {r:?}")),
    }
    if !pool_storage(env).is_empty() {
        ctx.fail(env, "pool storage left");
    }
    let store = stowage::state::Store::open(&env.layout.state).expect("open state");
    for t in [
        stowage::state::Table::Volumes,
        stowage::state::Table::NodeVolumes,
    ] {
        let left: Vec<String> = store
            .load_all::<serde_json::Value>(t)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if !left.is_empty() {
            ctx.fail(env, &format!("state table {t:?} still holds {left:?}"));
        }
    }
    if !loops_under(&env.layout.pool).is_empty() {
        ctx.fail(env, "loop devices left on pool images");
    }
    let pool_fs = env.scratch.root.join("pool-fs");
    let left: Vec<PathBuf> = mounts_under(&[&env.scratch.root])
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| *p != pool_fs)
        .collect();
    if !left.is_empty() {
        ctx.fail(env, &format!("mounts left: {left:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_random_points_of_the_lifecycle_leaves_a_consistent_node() {
    let started = Instant::now();
    let seed = seed();
    eprintln!("crash test seed {seed} (STOWAGE_CRASH_SEED={seed} to replay)");
    let mut rng = Rng::new(seed);
    let mut env = Env::new("xfs").await;
    let mut slots: Vec<Slot> = KINDS
        .iter()
        .enumerate()
        .map(|(index, kind)| Slot {
            index,
            kind,
            generation: 0,
            phase: Phase::Absent,
            id: None,
            prev_id: None,
            data: None,
            staging: env.staging_dir(&format!("s{index}")),
            target: env.target_path(&format!("t{index}")),
        })
        .collect();
    let mut ctx = Ctx {
        seed,
        round: 0,
        delay_ms: 0,
        ops: Vec::new(),
    };
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let mut unanswered = 0;
    let rounds = std::env::var("STOWAGE_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        let delay_ms = rng.below(MAX_KILL_DELAY_MS + 1);
        ctx = Ctx {
            seed,
            round,
            delay_ms,
            ops: Vec::new(),
        };
        let (killed, killed_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run_ops(env.c.clone(), slots, rng.next(), killed_rx));
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        tokio::task::block_in_place(|| env.server.kill9());
        killed.send_replace(true);
        let outcome = match task.await.expect("operations task") {
            Ok(o) => o,
            Err(e) => ctx.fail(&env, &e),
        };
        if let Some(f) = outcome
            .inflight
            .as_ref()
            .filter(|f| f.status.message() == NO_ANSWER_AFTER_KILL)
        {
            unanswered += 1;
            eprintln!(
                "note: round {round}: {:?} of {} had {NO_ANSWER_AFTER_KILL}; \
                 sockets at {} now:\n{}",
                f.op,
                outcome.slots[f.slot].describe(),
                env.layout.socket.display(),
                socket_holders(&env.layout.socket)
            );
        }
        slots = outcome.slots;
        ctx.ops = outcome.log;
        let during = match &outcome.inflight {
            Some(f) => format!("{:?} {}", f.op, slots[f.slot].kind),
            None => "idle".to_owned(),
        };
        *landed.entry(during).or_default() += 1;
        tokio::task::block_in_place(|| env.server.restart());
        env.reconnect().await;

        let unknown = check_after_restart(&mut env, &slots, outcome.inflight.as_ref(), &ctx).await;
        resolve(
            &mut env,
            &mut slots,
            outcome.inflight,
            unknown,
            &mut rng,
            &mut ctx,
        )
        .await;
        check_exact(&mut env, &slots, &ctx).await;
    }
    ctx.round = rounds;
    ctx.ops.clear();
    converge(&mut env, &mut slots, &mut rng, &mut ctx).await;
    check_all_gone(&mut env, &ctx).await;
    eprintln!(
        "crash test: {rounds} rounds in {:.1} s; kills landed during {landed:?}; \
         calls with {NO_ANSWER_AFTER_KILL}: {unanswered}",
        started.elapsed().as_secs_f64()
    );
}

/// A staged ext4 volume survives a crash followed by a reboot: its mount
/// and loop device are gone when the node plugin starts, and it restores
/// them from its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_is_restored_after_kill9_and_reboot() {
    let mut env = Env::new("xfs").await;
    let vol = env.create("crash-reboot", "ext4", VOLUME_SIZE).await;
    let id = vol.volume_id;
    let staging = env.staging_dir("reboot");
    let target = env.target_path("reboot");

    // Data written through a publication in an earlier stage...
    env.stage(&id, "ext4", &staging).await.unwrap();
    env.publish(&id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    write_data("ext4", &target, 1).unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();

    // ...then the crash right after a NodeStage is acknowledged.
    env.stage(&id, "ext4", &staging).await.unwrap();
    env.server.kill9();
    let second = staging.join("second");
    {
        let mut f = std::fs::File::create(&second).unwrap();
        f.write_all(b"written after the stage").unwrap();
        f.sync_all().unwrap();
    }

    // The "reboot": mounts under the staging dir and the loop device go.
    let image = image_of(&env, &id);
    for m in mounts_under(&[&env.layout.staging]).iter().rev() {
        nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mine: Vec<LoopDevice> = loops_under(&env.layout.pool)
            .into_iter()
            .filter(|(_, b)| *b == image)
            .map(|(d, _)| d)
            .collect();
        if mine.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "loop device will not detach");
        for d in mine {
            d.detach().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(&staging));

    env.server.restart();
    env.reconnect().await;
    assert!(
        is_mounted(&staging),
        "staging not restored after restart:\n{}",
        env.server.log_text()
    );
    let rec = node_records(&env.layout.state)
        .into_iter()
        .find(|r| r.id == id)
        .expect("node record kept");
    let device = rec.staging.and_then(|s| s.device).expect("staging device");
    assert_eq!(
        LoopDevice::from_path(&device).and_then(|d| d.backing_file()),
        Some(image.clone()),
        "recorded staging device is not the volume's image"
    );
    check_data("ext4", &staging, Some(1)).unwrap();
    assert_eq!(
        std::fs::read(&second).unwrap(),
        b"written after the stage",
        "file written into the staging before the reboot is lost"
    );

    // Repeating the acknowledged stage is a no-op; then clean up.
    env.stage(&id, "ext4", &staging).await.unwrap();
    env.publish(&id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    check_data("ext4", &target, Some(1)).unwrap();
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.delete(&id).await.unwrap();
    assert!(!is_mounted(&staging));
    assert!(loops_under(&env.layout.pool).is_empty());
    assert!(
        mounts_under(&[&env.layout.staging, &env.layout.targets]).is_empty(),
        "mounts left"
    );
}

/// A NodePublish cut short by a kill: the CO's retry must succeed, and a
/// NodeUnpublish instead must leave nothing mounted at the target. Kills
/// are spread over the measured duration of a publish, so most land
/// between the bind mount and the durable record of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_node_publish_leaves_no_unrecorded_mount() {
    const ATTEMPTS: u32 = 8;
    let mut env = Env::new("xfs").await;
    let mut vols = Vec::new();
    for (index, kind) in ["raw", "dir"].into_iter().enumerate() {
        let id = env
            .create(&format!("crash-publish-{kind}"), kind, VOLUME_SIZE)
            .await
            .volume_id;
        let slot = Slot {
            index,
            kind,
            generation: 0,
            phase: Phase::Staged,
            id: Some(id.clone()),
            prev_id: None,
            data: None,
            staging: env.staging_dir(&format!("p{index}")),
            target: env.target_path(&format!("p{index}")),
        };
        env.stage(&id, kind, &slot.staging).await.unwrap();
        let t = Instant::now();
        call(&mut env.c, &slot, Op::Publish).await.unwrap();
        let took = t.elapsed();
        call(&mut env.c, &slot, Op::Unpublish).await.unwrap();
        vols.push((slot, took));
    }

    let mut problems = Vec::new();
    for attempt in 0..ATTEMPTS {
        for (slot, took) in &vols {
            let what = format!("attempt {attempt}, {} volume", slot.kind);
            let delay = took.mul_f64(f64::from(attempt) / f64::from(ATTEMPTS));
            let mut c = env.c.clone();
            let s = slot.clone();
            let publish = tokio::spawn(async move { call(&mut c, &s, Op::Publish).await });
            tokio::task::block_in_place(|| {
                std::thread::sleep(delay);
                env.server.kill9();
            });
            let outcome = match answer_after_kill(publish).await {
                Some(Ok(_)) => "acknowledged".to_owned(),
                Some(Err(e)) if is_transport(&e) => "in flight".to_owned(),
                Some(Err(e)) => panic!("{what}: NodePublish failed: {e:?}"),
                None => "not sent before the kill".to_owned(),
            };
            tokio::task::block_in_place(|| env.server.restart());
            env.reconnect().await;

            let records = node_records(&env.layout.state);
            for p in unrecorded_mounts(&env, &records) {
                problems.push(format!("{what}, publish {outcome} at the kill: {p}"));
            }
            // A CO retries an uncertain publish, or gives up with an
            // unpublish (a pod deleted meanwhile).
            if attempt % 2 == 0
                && let Err(e) = call(&mut env.c, slot, Op::Publish).await
            {
                problems.push(format!(
                    "{what}, publish {outcome} at the kill: retried NodePublish failed: {:?}: {}",
                    e.code(),
                    e.message()
                ));
            }
            if let Err(e) = call(&mut env.c, slot, Op::Unpublish).await {
                problems.push(format!("{what}: NodeUnpublish failed: {e:?}"));
            }
            if is_mounted(&slot.target) {
                problems.push(format!(
                    "{what}, publish {outcome} at the kill: {} still mounted after NodeUnpublish succeeded",
                    slot.target.display()
                ));
                // Clean up by hand so that later attempts start clean.
                while is_mounted(&slot.target) {
                    nix::mount::umount2(&slot.target, nix::mount::MntFlags::MNT_DETACH).unwrap();
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "kill -9 during NodePublish:\n  {}\nserver log (tail):\n{}",
        problems.join("\n  "),
        server_log(&env)
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );

    for (slot, _) in &vols {
        env.unstage(slot.id(), &slot.staging).await.unwrap();
        env.delete(slot.id()).await.unwrap();
    }
    assert!(loops_under(&env.layout.pool).is_empty());
    assert!(mounts_under(&[&env.layout.staging, &env.layout.targets]).is_empty());
}

// ---------------------------------------------------------------------------
// Issue 9: a kill -9 while a source filesystem is frozen for a copy. The
// freeze is the kernel's (FIFREEZE), not the process's: it outlives a
// killed server unless something thaws it, and then every writer blocks.

/// Arguments that give the server a pool of sparse copies on the ext4 pool
/// filesystem (copies take time, with the source frozen meanwhile).
const COPY_POOL_ARGS: &[&str] = &["--pool-image", "never"];
/// Data in the source volume, so that its copy lasts long enough for the
/// kill to land inside it.
const BALLAST: usize = 256 << 20;
const FREEZE_SOURCE_SIZE: i64 = 512 * MIB;
/// Bound for a write+fsync after the restart. A hang detector, not a
/// timing assertion: a healthy write takes milliseconds.
const WRITE_HANG_LIMIT: Duration = Duration::from_secs(60);

/// The operations that freeze their source volumes while they copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FreezingCopy {
    /// CreateSnapshot: answers ready_to_use=false and copies in the
    /// background, the source frozen until the copy is done.
    Snapshot,
    /// CreateVolume with the staged volume as content source: copies
    /// before answering.
    Clone,
    /// CreateVolumeGroupSnapshot: freezes every member, copies each.
    GroupSnapshot,
}

fn volume_source(volume: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: volume.into(),
            },
        )),
    })
}

/// Waits (bounded polling) until the pool holds an object that was not in
/// `before`: the copy has begun, so the source is frozen if it ever is.
/// Panics if `done` says the operation finished first.
async fn copy_begun(pool: &Path, before: &BTreeSet<PathBuf>, done: impl Fn() -> bool) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(p) = pool_entries(pool).difference(before).next() {
            return p.clone();
        }
        assert!(
            !done(),
            "the operation finished before its copy was seen; is the pool copying?"
        );
        assert!(Instant::now() < deadline, "no copy began within 60 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A staged and published ext4 volume (BALLAST of data in the source, so
/// that copying it takes a while) is copied by `op`; the server is killed
/// while the copy runs and restarted. Then nothing may be frozen: the
/// staged filesystems are probed (FIFREEZE answers EBUSY on a frozen one),
/// staged and published again as a CO would, and written with fsync (the
/// write of issue 9 blocked forever). The interrupted operation, retried,
/// must complete, and cleaning up through the API must leave nothing.
async fn kill9_during_a_freezing_copy_leaves_nothing_frozen(op: FreezingCopy) {
    let mut env = Env::with_args("ext4", COPY_POOL_ARGS).await;
    let info = env
        .c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.manifest.get("snapshot-strategy").map(String::as_str),
        Some("sparse copies"),
        "this test needs a pool whose copies take time"
    );

    // The source, and for the group a second member.
    let mut vols: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    let mut names = vec![("frz-src", FREEZE_SOURCE_SIZE)];
    if op == FreezingCopy::GroupSnapshot {
        names.push(("frz-other", 64 * MIB));
    }
    for (name, size) in names {
        let id = env.create(name, "ext4", size).await.volume_id;
        vols.push((id, env.staging_dir(name), env.target_path(name)));
    }
    // Dropped before `env`: whatever this test finds frozen is thawed even
    // when it fails, so that the cleanup can unmount and detach.
    let _thaw = ThawGuard::new(vols.iter().map(|(_, s, _)| s.clone()).collect());
    for (i, (id, staging, target)) in vols.iter().enumerate() {
        env.stage(id, "ext4", staging).await.unwrap();
        env.publish(id, "ext4", staging, target, false)
            .await
            .unwrap();
        write_data("ext4", target, i as u64 + 1).unwrap();
    }
    {
        let mut f = std::fs::File::create(vols[0].2.join("ballast")).unwrap();
        let chunk = pattern(7, 4 << 20);
        for _ in 0..BALLAST / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }

    // Start the copy, and kill the server while it runs.
    let before = pool_entries(&env.layout.pool);
    let ids: Vec<String> = vols.iter().map(|(id, _, _)| id.clone()).collect();
    let clone_req = csi::CreateVolumeRequest {
        volume_content_source: volume_source(&ids[0]),
        ..create_req("frz-clone", "ext4", FREEZE_SOURCE_SIZE)
    };
    let snap_req = csi::CreateSnapshotRequest {
        source_volume_id: ids[0].clone(),
        name: "frz-snap".into(),
        ..Default::default()
    };
    let group_req = csi::CreateVolumeGroupSnapshotRequest {
        name: "frz-group".into(),
        source_volume_ids: ids.clone(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut first_id = None;
    let task = match op {
        FreezingCopy::Snapshot => {
            let s = env
                .c
                .controller
                .create_snapshot(snap_req.clone())
                .await
                .expect("CreateSnapshot")
                .into_inner()
                .snapshot
                .unwrap();
            assert!(
                !s.ready_to_use,
                "a copied snapshot of {BALLAST} bytes cannot be ready at once"
            );
            first_id = Some(s.snapshot_id);
            None
        }
        FreezingCopy::Clone => {
            let mut c = env.c.controller.clone();
            let req = clone_req.clone();
            Some(tokio::spawn(
                async move { c.create_volume(req).await.map(drop) },
            ))
        }
        FreezingCopy::GroupSnapshot => {
            let mut g = env.c.group.clone();
            let req = group_req.clone();
            Some(tokio::spawn(async move {
                g.create_volume_group_snapshot(req).await.map(drop)
            }))
        }
    };
    if let Some(t) = &task {
        copy_begun(&env.layout.pool, &before, || t.is_finished()).await;
    }
    tokio::task::block_in_place(|| env.server.kill9());
    let killed_after = started.elapsed();
    if let Some(t) = task {
        match t.await.unwrap() {
            Ok(()) => panic!("{op:?} finished before the kill; make the copy longer"),
            Err(e) if is_transport(&e) => {}
            Err(e) => panic!("{op:?} failed before the kill: {e:?}"),
        }
    }
    tokio::task::block_in_place(|| env.server.restart());
    env.reconnect().await;
    if let Some(id) = &first_id {
        // `stowage status` does not take the copy's record for a copy
        // running: the restart marked it cut short.
        let (_, report) = env.status();
        let failed = report["failed_snapshots"].as_array().expect("a list");
        assert!(
            report["snapshots_not_ready"] == 1,
            "the copy finished before the kill; make it longer: {report:#}"
        );
        assert_eq!(report["snapshots_copying"], 0, "{report:#}");
        assert_eq!(failed.len(), 1, "{report:#}");
        assert_eq!(failed[0]["id"].as_str(), Some(id.as_str()), "{report:#}");
        let why = failed[0]["error"].as_str().unwrap();
        assert!(why.contains("cut short by a restart"), "{why}");
    }

    // After the restart nothing may be frozen, and a CO's stage, publish
    // and write must all complete.
    let mut problems = Vec::new();
    let mut writable = Vec::new();
    for (id, staging, target) in &vols {
        match is_frozen(staging) {
            Ok(false) => writable.push(target.clone()),
            Ok(true) => problems.push(format!(
                "{} ({id}) is still frozen after the restart",
                staging.display()
            )),
            Err(e) => problems.push(format!("cannot probe {}: {e}", staging.display())),
        }
        if let Err(e) = env.stage(id, "ext4", staging).await {
            problems.push(format!("NodeStage of {id} after the restart: {e:?}"));
        }
        if let Err(e) = env.publish(id, "ext4", staging, target, false).await {
            problems.push(format!("NodePublish of {id} after the restart: {e:?}"));
        }
    }
    // A write to a frozen filesystem would only hang; the probe said so.
    for (i, target) in writable.into_iter().enumerate() {
        let t = target.clone();
        let seed = 100 + i as u64;
        match within(WRITE_HANG_LIMIT, move || {
            write_data("ext4", &t, seed).and_then(|()| check_data("ext4", &t, Some(seed)))
        }) {
            Some(Ok(())) => {}
            Some(Err(e)) => problems.push(e),
            None => problems.push(format!(
                "a write+fsync to {} did not finish within {} s",
                target.display(),
                WRITE_HANG_LIMIT.as_secs()
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "kill -9 during {op:?} ({} ms after it began):\n  {}\nserver log (tail):\n{}",
        killed_after.as_millis(),
        problems.join("\n  "),
        log_tail(&env, 40)
    );

    // The interrupted operation, retried as a CO would, completes; then
    // everything is removed through the API, and nothing is left.
    let mut g = env.c.group.clone();
    let mut extra_volume = None;
    match op {
        FreezingCopy::Snapshot => {
            let deadline = Instant::now() + Duration::from_secs(120);
            let snap = loop {
                let s = env
                    .c
                    .controller
                    .create_snapshot(snap_req.clone())
                    .await
                    .expect("retried CreateSnapshot")
                    .into_inner()
                    .snapshot
                    .unwrap();
                if s.ready_to_use {
                    break s;
                }
                assert!(Instant::now() < deadline, "snapshot never became ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(
                Some(&snap.snapshot_id),
                first_id.as_ref(),
                "the copy made anew after the restart keeps the ID the CO was given"
            );
            env.c
                .controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: snap.snapshot_id,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        FreezingCopy::Clone => {
            let v = env
                .c
                .controller
                .create_volume(clone_req)
                .await
                .expect("retried clone")
                .into_inner()
                .volume
                .unwrap();
            extra_volume = Some(v.volume_id);
        }
        FreezingCopy::GroupSnapshot => {
            let grp = g
                .create_volume_group_snapshot(group_req)
                .await
                .expect("retried group snapshot")
                .into_inner()
                .group_snapshot
                .unwrap();
            g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: grp.group_snapshot_id,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    for (id, staging, target) in &vols {
        env.unpublish(id, target).await.unwrap();
        env.unstage(id, staging).await.unwrap();
        env.delete(id).await.unwrap();
    }
    if let Some(id) = extra_volume {
        env.delete(&id).await.unwrap();
    }
    let left = pool_entries(&env.layout.pool);
    assert!(left.is_empty(), "pool objects left: {left:?}");
    assert!(
        loops_under(&env.layout.pool).is_empty(),
        "loop devices left"
    );
    assert!(
        mounts_under(&[&env.layout.staging, &env.layout.targets]).is_empty(),
        "mounts left"
    );
}

/// The last `n` lines of the server's own log.
fn log_tail(env: &Env, n: usize) -> String {
    let log = server_log(env);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_snapshot_copy_leaves_nothing_frozen() {
    kill9_during_a_freezing_copy_leaves_nothing_frozen(FreezingCopy::Snapshot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_clone_leaves_nothing_frozen() {
    kill9_during_a_freezing_copy_leaves_nothing_frozen(FreezingCopy::Clone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_group_snapshot_leaves_nothing_frozen() {
    kill9_during_a_freezing_copy_leaves_nothing_frozen(FreezingCopy::GroupSnapshot).await;
}

// ---------------------------------------------------------------------------
// Issue 9, defect 6: whatever the API creates, the API (or start-up
// recovery) must be able to find and remove.

/// CreateVolumeGroupSnapshot cut short by a kill, at delays spread over
/// its measured duration: afterwards every member snapshot ListSnapshots
/// returns must belong to a group GetVolumeGroupSnapshot finds (else
/// DeleteVolumeGroupSnapshot, answering OK for an unknown group, removes
/// nothing, and DeleteSnapshot refuses a member), and a CO that retries
/// the create and then deletes the group must leave no snapshot listed and
/// nothing in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_group_snapshot_leaves_nothing_the_api_cannot_remove() {
    const ATTEMPTS: u32 = 24;
    let mut env = Env::new("xfs").await;
    let mut ids = Vec::new();
    for name in ["grp-a", "grp-b"] {
        ids.push(env.create(name, "raw", VOLUME_SIZE).await.volume_id);
    }
    let req = |name: String| csi::CreateVolumeGroupSnapshotRequest {
        name,
        source_volume_ids: ids.clone(),
        ..Default::default()
    };
    let delete = |id: String| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id,
        ..Default::default()
    };
    let mut g = env.c.group.clone();
    let t = Instant::now();
    let first = g
        .create_volume_group_snapshot(req("grp-measure".into()))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    let took = t.elapsed();
    g.delete_volume_group_snapshot(delete(first.group_snapshot_id))
        .await
        .unwrap();

    let mut problems = Vec::new();
    let mut landed = BTreeMap::new();
    // Groups already reported (their members stay listed): once each.
    let mut reported = BTreeSet::new();
    for attempt in 0..ATTEMPTS {
        let name = format!("grp-{attempt}");
        let delay = took.mul_f64(1.2 * f64::from(attempt) / f64::from(ATTEMPTS));
        let mut g = env.c.group.clone();
        let r = req(name.clone());
        let create = tokio::spawn(async move { g.create_volume_group_snapshot(r).await });
        tokio::task::block_in_place(|| {
            std::thread::sleep(delay);
            env.server.kill9();
        });
        let outcome = match answer_after_kill(create).await {
            Some(Ok(_)) => "answered",
            Some(Err(e)) if is_transport(&e) => "in flight",
            Some(Err(e)) => panic!("attempt {attempt}: CreateVolumeGroupSnapshot failed: {e:?}"),
            None => "not sent before the kill",
        };
        *landed.entry(outcome).or_insert(0) += 1;
        tokio::task::block_in_place(|| env.server.restart());
        env.reconnect().await;
        let what = format!("attempt {attempt} (kill after {delay:?}, create {outcome})");

        // Every listed member's group exists.
        let snaps = env
            .c
            .controller
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        let groups: BTreeSet<String> = snaps
            .iter()
            .filter_map(|e| e.snapshot.as_ref())
            .map(|s| s.group_snapshot_id.clone())
            .filter(|g| !g.is_empty())
            .collect();
        for id in groups.difference(&reported.clone()) {
            if let Err(e) = env
                .c
                .group
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await
            {
                let members: Vec<&str> = snaps
                    .iter()
                    .filter_map(|e| e.snapshot.as_ref())
                    .filter(|s| s.group_snapshot_id == *id)
                    .map(|s| s.snapshot_id.as_str())
                    .collect();
                problems.push(format!(
                    "{what}: ListSnapshots lists {members:?} as members of {id}, \
                     but GetVolumeGroupSnapshot answers {:?}",
                    e.code()
                ));
                reported.insert(id.clone());
            }
        }

        // The CO retries the create, then deletes the group.
        let mut g = env.c.group.clone();
        match g.create_volume_group_snapshot(req(name)).await {
            Ok(r) => {
                let id = r.into_inner().group_snapshot.unwrap().group_snapshot_id;
                if let Err(e) = g.delete_volume_group_snapshot(delete(id)).await {
                    problems.push(format!("{what}: DeleteVolumeGroupSnapshot: {e:?}"));
                }
            }
            Err(e) => problems.push(format!("{what}: retried create: {e:?}")),
        }
        let left = env
            .c
            .controller
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        let ids: Vec<String> = left
            .into_iter()
            .filter_map(|e| e.snapshot)
            .filter(|s| !reported.contains(&s.group_snapshot_id))
            .map(|s| format!("{} (group {})", s.snapshot_id, s.group_snapshot_id))
            .collect();
        if !ids.is_empty() {
            problems.push(format!(
                "{what}: after the CO deleted its group, ListSnapshots still has {ids:?}"
            ));
        }
    }
    // Whatever is left is removed through the API, as a CO tearing down
    // would; the pool must then be empty.
    let snaps = env
        .c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    for s in snaps.into_iter().filter_map(|e| e.snapshot) {
        if !s.group_snapshot_id.is_empty() {
            let _ = env
                .c
                .group
                .delete_volume_group_snapshot(delete(s.group_snapshot_id.clone()))
                .await;
        }
        if let Err(e) = env
            .c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: s.snapshot_id.clone(),
                ..Default::default()
            })
            .await
        {
            problems.push(format!(
                "clean-up: DeleteSnapshot {}: {:?}: {}",
                s.snapshot_id,
                e.code(),
                e.message()
            ));
        }
    }
    for id in &ids {
        env.delete(id).await.unwrap();
    }
    let left = pool_entries(&env.layout.pool);
    if !left.is_empty() {
        problems.push(format!("pool objects left after the clean-up: {left:?}"));
    }
    assert!(
        problems.is_empty(),
        "kill -9 during CreateVolumeGroupSnapshot ({ATTEMPTS} attempts over {took:?}; {landed:?}):\n  {}",
        problems.join("\n  ")
    );
}

/// A clone into a larger volume grows its ext4 on first stage (e2fsck,
/// then resize2fs, before mounting). A kill at delays spread over that
/// stage's measured duration: the CO's retried NodeStage must succeed and
/// the source's data must be in the clone. (External tools the killed
/// server started are not killed with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_the_first_stage_of_a_grown_clone_leaves_it_usable() {
    const ATTEMPTS: u32 = 24;
    const CLONE_SIZE: i64 = 4 * GIB;
    let mut env = Env::new("xfs").await;
    let src = env.create("grow-src", "ext4", 256 * MIB).await.volume_id;
    let (s, t) = (env.staging_dir("grow-src"), env.target_path("grow-src"));
    env.stage(&src, "ext4", &s).await.unwrap();
    env.publish(&src, "ext4", &s, &t, false).await.unwrap();
    write_data("ext4", &t, 5).unwrap();
    {
        let mut f = std::fs::File::create(t.join("ballast")).unwrap();
        let chunk = pattern(7, 4 << 20);
        for _ in 0..12 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    // The source stays published: it is cloned while mounted (frozen).
    let clone_req = |name: &str| csi::CreateVolumeRequest {
        volume_content_source: volume_source(&src),
        ..create_req(name, "ext4", CLONE_SIZE)
    };

    // How long the first stage of such a clone takes.
    let id = env
        .c
        .controller
        .create_volume(clone_req("grow-measure"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = env.staging_dir("grow-measure");
    let t0 = Instant::now();
    env.stage(&id, "ext4", &staging).await.unwrap();
    let took = t0.elapsed();
    env.unstage(&id, &staging).await.unwrap();
    env.delete(&id).await.unwrap();

    let mut problems = Vec::new();
    for attempt in 0..ATTEMPTS {
        let name = format!("grow-{attempt}");
        let id = env
            .c
            .controller
            .create_volume(clone_req(&name))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let (staging, target) = (env.staging_dir(&name), env.target_path(&name));
        // The check comes first; spread over the rest of the stage.
        let delay = took.mul_f64(0.3 + 0.8 * f64::from(attempt) / f64::from(ATTEMPTS));
        let mut c = env.c.clone();
        let req = csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        };
        let stage = tokio::spawn(async move { c.node.node_stage_volume(req).await });
        tokio::task::block_in_place(|| {
            std::thread::sleep(delay);
            env.server.kill9();
        });
        let outcome = match answer_after_kill(stage).await {
            Some(Ok(_)) => "answered",
            Some(Err(e)) if is_transport(&e) => "in flight",
            Some(Err(e)) => panic!("attempt {attempt}: NodeStage failed before the kill: {e:?}"),
            None => "not sent before the kill",
        };
        tokio::task::block_in_place(|| env.server.restart());
        env.reconnect().await;
        let what = format!("attempt {attempt} (kill after {delay:?} of {took:?}, stage {outcome})");

        // The CO retries the stage (ABORTED while the server is busy).
        let deadline = Instant::now() + Duration::from_secs(60);
        let staged = loop {
            match env.stage(&id, "ext4", &staging).await {
                Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => break r,
            }
        };
        if let Err(e) = staged {
            problems.push(format!(
                "{what}: retried NodeStage: {:?}: {}",
                e.code(),
                e.message()
            ));
            continue;
        }
        match env.publish(&id, "ext4", &staging, &target, false).await {
            Ok(()) => {
                if let Err(e) = check_data("ext4", &target, Some(5)) {
                    problems.push(format!("{what}: {e}"));
                }
                env.unpublish(&id, &target).await.unwrap();
            }
            Err(e) => problems.push(format!("{what}: NodePublish: {e:?}")),
        }
        env.unstage(&id, &staging).await.unwrap();
        env.delete(&id).await.unwrap();
    }
    assert!(
        problems.is_empty(),
        "kill -9 during the first stage of a grown clone ({took:?}):\n  {}\nserver log (tail):\n{}",
        problems.join("\n  "),
        log_tail(&env, 30)
    );
    env.unpublish(&src, &t).await.unwrap();
    env.unstage(&src, &s).await.unwrap();
    env.delete(&src).await.unwrap();
}
