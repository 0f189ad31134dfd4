//! The engine driver: the async task around the sans-I/O [`Engine`] that
//! turns block I/O (the [`BlockHandler`] a FUSE file calls) into replicated
//! writes, flushes and reads, carries each request's bytes over a [`Peer`],
//! and reports the engine's state. It owns the time and randomness the
//! model is given; it never decides on its own when a write is acknowledged
//! or a copy is in sync (the engine does).
//!
//! The engine and its bookkeeping (`Task`) sit behind one lock, and
//! whoever has news takes it for one step: a FUSE worker with a block I/O,
//! whoever brings a call's answer (the reading thread of the data link to
//! that node, or the task a call was made on, each with a deadline), or
//! the ticker. After every step the engine is drained: the operations
//! whose events arrived complete, writes that waited for their region
//! start, and what the engine asks for is sent with its bytes once the
//! lock is released: data calls from a FUSE worker straight onto a
//! connected data link ([`Peer::send_now`]), everything else on a task
//! spawned per call (or per batch, see `NodeQueue`). Calls to this node's
//! own copy ([`Peer::call_here`]) run right there on a FUSE worker (so a
//! block I/O that stays on this node needs no hop at all), and on the
//! blocking pool from an async step. A read the engine would serve from
//! the local copy skips the engine altogether (see `LocalRead`).
//!
//! A step also drops what it replaced under that lock (peers, and with them
//! their data links, when the members change): nothing a peer owns may
//! call back into the driver while it is dropped, or the step would wait
//! for its own lock. A data link fails its waiting calls on its reading
//! thread, never on the thread that drops or closes it.
//!
//! Bytes: a write's payload is kept by its sequence number until the engine
//! no longer needs it ([`Engine::write_pending`]), so a resend carries the
//! same bytes; a rebuild's read fetches the whole region and its bytes are
//! kept by (region, tag) until that region's copy is done
//! ([`Engine::copying`]).
//!
//! Order per copy and region: the engine orders writes to a region among
//! in-sync copies (a region's next write starts only once the previous one
//! is acknowledged), but a copy being rebuilt is not waited for, and a copy
//! keeps only the newest tag of a region. A partial write overtaken by a
//! later one would then be lost on that copy while its tag says otherwise.
//! So at most one `Write`/`Rebuild` per (copy, region) is in flight; the
//! next waits for its answer. A call that ends without an answer counts the
//! copy as failed at once ([`Engine::unreachable`]), so the engine marks
//! the regions it sent there dirty, and what waited behind it is dropped
//! (the engine resends what it still needs).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, TryLockError, Weak};
use std::time::Duration;

use crate::volume::id::Uuid;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::MissedTickBehavior;

use super::engine::{CopyView, Engine, EngineConfig, EngineEvent, EngineState, IoError};
use super::protocol::{Ballot, Envelope, Io, Refusal, Region, Reply, Request, Tag};
use super::record::ReplicaRecord;
use super::store::unix_now;
use super::wire::{Answer, BatchDone, Call, Payload, Peer, PeerError};
use super::{CheckDue, REGION_BYTES};
use crate::os::fuse_file::{BlockHandler, WriteDone};
use bytes::Bytes;

/// An engine driver's settings. [`DriverConfig::new`] fills in the
/// defaults.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The volume (must be the record's uuid).
    pub volume: Uuid,
    /// This node: the owner the engine runs for.
    pub node: String,
    /// The engine's proposer id, unique among everyone who may change the
    /// record: `engine/<node>/<random>`.
    pub id: String,
    /// The volume's size in bytes (must be the record's size).
    pub size: u64,
    /// The engine's clock: the model's time is the number of ticks since
    /// the driver started.
    pub tick: Duration,
    /// A copy that takes longer to answer counts as failed; also the
    /// deadline of every call and a record change's phase timeout.
    pub timeout: Duration,
    /// How long an unanswered request waits before it is sent again.
    pub resend: Duration,
    /// How long a block I/O may wait for the engine before it fails with
    /// EIO (while a majority is unreachable, the engine can neither
    /// acknowledge a write nor mark a copy out of sync).
    pub io_timeout: Duration,
    /// How long [`EngineDriver::start`] waits for the engine to be ready.
    pub start_timeout: Duration,
    /// How often a scrub pass reads every region on every copy in sync
    /// and compares them (see [`Engine::scrub`]); None: never. The copies
    /// say how far passes got ([`CheckMark`](super::protocol::CheckMark)): the engine's first pass
    /// resumes one an earlier engine did not finish, at a random point
    /// within `scrub_spread` (or the period, when shorter), so the engines
    /// a node starts at once do not scrub at once; it starts a period
    /// after the last whole pass, or within `scrub_spread` when that is
    /// past; with no pass ever done, at a random point within the first
    /// period.
    pub scrub_every: Option<Duration>,
    /// See `scrub_every`.
    pub scrub_spread: Duration,
    /// The pace of a scrub pass: bytes per second read on each copy.
    pub scrub_rate: u64,
    /// The engine of a heal, not of a publication ([`EngineConfig::heal`]).
    pub heal: bool,
    /// The pace of rebuilds, bytes per second written to the copies being
    /// rebuilt, all together ([`EngineConfig::rebuild_gap`]); None: a
    /// region a tick for each.
    pub rebuild_rate: Option<u64>,
}

impl DriverConfig {
    /// The default settings for `volume` of `size` bytes owned by `node`,
    /// with a fresh random proposer id.
    pub fn new(volume: Uuid, node: &str, size: u64) -> Self {
        DriverConfig {
            volume,
            node: node.to_owned(),
            id: format!("engine/{node}/{}", uuid::Uuid::new_v4().simple()),
            size,
            tick: Duration::from_millis(10),
            timeout: Duration::from_secs(2),
            resend: Duration::from_millis(500),
            io_timeout: Duration::from_secs(15),
            start_timeout: Duration::from_secs(30),
            scrub_every: None,
            scrub_spread: Duration::from_secs(60),
            scrub_rate: 16 << 20,
            heal: false,
            rebuild_rate: None,
        }
    }
}

/// Why an engine driver did not start, or its last flush failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("volume {volume}: the record is of volume {record}")]
    WrongVolume { volume: Uuid, record: String },
    #[error("volume {volume}: {size} bytes configured, the record says {record}")]
    WrongSize {
        volume: Uuid,
        size: u64,
        record: u64,
    },
    #[error("volume {volume}: the tick must be above zero")]
    ZeroTick { volume: Uuid },
    #[error("volume {volume}: {size} bytes is more regions than the engine can count")]
    TooLarge { volume: Uuid, size: u64 },
    /// Another owner or a later engine holds the volume.
    #[error("volume {volume}: fenced: {refusal}")]
    Fenced { volume: Uuid, refusal: Refusal },
    /// Every in-sync copy restarted while the engine ran.
    #[error("volume {volume}: every in-sync copy lost unflushed writes; the engine stopped")]
    AllCopiesLost { volume: Uuid },
    #[error("volume {volume}: the engine was not ready within {waited:?}")]
    StartTimeout { volume: Uuid, waited: Duration },
    /// The engine task ended (stopped, or the runtime shut down).
    #[error("volume {volume}: the engine task ended")]
    Stopped { volume: Uuid },
    #[error("volume {volume}: the final flush failed: {why}")]
    FinalFlush { volume: Uuid, why: IoFailure },
}

/// Why a block I/O failed. [`BlockHandler`] calls return it inside an
/// [`io::Error`] (kind `Other`); the FUSE file reports every error as EIO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    #[error("the engine is fenced: {0}")]
    Fenced(String),
    #[error("every in-sync copy lost unflushed writes; the engine stopped")]
    AllCopiesLost,
    #[error("the engine driver stopped")]
    Stopped,
    #[error("the engine did not finish the request within {0:?}")]
    Timeout(Duration),
    #[error("the engine refused the request: {0}")]
    Engine(#[from] IoError),
    #[error("the write to region {0} failed")]
    WriteFailed(Region),
    #[error("the read of region {0} failed")]
    ReadFailed(Region),
    #[error("the flush failed")]
    FlushFailed,
    #[error("region {region}: a copy returned {got} bytes for a read of {want}")]
    ShortRead {
        region: Region,
        got: usize,
        want: usize,
    },
}

impl From<IoFailure> for io::Error {
    fn from(f: IoFailure) -> Self {
        io::Error::other(f)
    }
}

/// A snapshot of a driver for `stowage volume status` and metrics.
#[derive(Debug, Clone)]
pub struct DriverStatus {
    pub state: EngineState,
    /// [`EngineDriver::stop`] ran or the task ended: I/O fails.
    pub stopped: bool,
    pub epoch: u64,
    /// The newest record the engine knows to be chosen (members, in-sync
    /// copies with their boots, owner).
    pub record: ReplicaRecord,
    /// Every copy: in sync, out, or being rebuilt with how many dirty
    /// regions remain.
    pub copies: Vec<CopyView>,
    /// Bytes sent to copies being rebuilt since the driver started.
    pub rebuild_bytes: u64,
    /// Calls that failed, by copy (node): why a copy was marked out.
    pub errors: BTreeMap<String, CopyErrors>,
    pub scrub: ScrubStatus,
}

/// What [`EngineDriver::scrub`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scrubbing {
    /// A pass started, or was under way already (`started` false); it is
    /// at region `at` of `regions`.
    Pass {
        started: bool,
        at: Region,
        regions: u32,
    },
    /// The engine does not serve I/O (starting, or stopped).
    NotRunning(EngineState),
}

/// What the scrub found since the driver started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubStatus {
    /// Passes that reached the last region.
    pub passes: u64,
    /// Regions checked.
    pub regions: u64,
    /// Regions found unreadable or differing on a copy, by copy (node):
    /// each was written again there by the copy's rebuild.
    pub repairs: BTreeMap<String, u64>,
    /// Regions the copies disagreed on with no majority to repair from
    /// (or that the copy of a one-copy volume could not read).
    pub unresolved: u64,
    /// The next region of the pass under way.
    pub at: Option<Region>,
    /// When the last whole pass ended, in seconds since the Unix epoch,
    /// by this engine or as the copies said at its start (0: none known).
    pub last_done: u64,
    /// When the next pass is due to start, in seconds since the Unix
    /// epoch (0: none planned).
    pub next_at: u64,
}

/// The calls to one copy that failed since the driver started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyErrors {
    pub count: u64,
    /// The last one's error.
    pub last: String,
    pub last_at: std::time::Instant,
}

/// Where an I/O operation's outcome goes: a waiting FUSE worker, or a
/// callback (a write answered later, see [`BlockHandler::write_then`]).
enum Done<T> {
    Wait(oneshot::Sender<Result<T, IoFailure>>),
    Then(Box<dyn FnOnce(Result<T, IoFailure>) + Send>),
}

impl<T> Done<T> {
    fn send(self, r: Result<T, IoFailure>) {
        match self {
            Done::Wait(tx) => {
                let _ = tx.send(r);
            }
            Done::Then(f) => f(r),
        }
    }
}

/// The pieces of one block write (one per region it touches): the caller
/// is answered once every piece is, with the first failure; a piece
/// dropped unanswered counts as failed.
struct Countdown {
    state: Mutex<(usize, Option<IoFailure>, Option<WriteDone>)>,
}

impl Countdown {
    fn piece(self: &Arc<Self>) -> Done<()> {
        let all = Arc::clone(self);
        Done::Then(Box::new(move |r| all.done(r)))
    }

    fn done(&self, r: Result<(), IoFailure>) {
        let finished = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = s.0.saturating_sub(1);
            if let Err(e) = r
                && s.1.is_none()
            {
                s.1 = Some(e);
            }
            if s.0 == 0 {
                s.2.take().map(|d| (d, s.1.take()))
            } else {
                None
            }
        };
        if let Some((done, failed)) = finished {
            done(match failed {
                None => Ok(()),
                Some(e) => Err(e.into()),
            });
        }
    }
}

impl Drop for Countdown {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = s.2.take() {
            done(Err(s.1.take().unwrap_or(IoFailure::Stopped).into()));
        }
    }
}

enum Command {
    Write {
        region: Region,
        offset: u32,
        data: Payload,
        done: Done<()>,
    },
    Read {
        region: Region,
        offset: u32,
        len: u32,
        done: Done<Bytes>,
    },
    Flush {
        done: Done<()>,
    },
    /// The volume grew (its record says so): `regions` regions.
    Grow {
        size: u64,
        regions: u32,
        done: oneshot::Sender<()>,
    },
    Stop {
        done: oneshot::Sender<Result<(), DriverError>>,
    },
    /// The members may have changed: learn the addresses of voters that
    /// joined (node id -> host:port) and read the record again.
    Refresh {
        addresses: BTreeMap<String, String>,
    },
    /// Start a scrub pass now (see [`EngineDriver::scrub`]).
    Scrub {
        done: oneshot::Sender<Scrubbing>,
    },
    /// The local copy failed a read this node made of it directly (see
    /// [`LocalRead`]): `region` is read elsewhere from now on, and
    /// rebuilt there.
    LocalReadFailed {
        region: Region,
        error: PeerError,
    },
}

/// What the task and the I/O side share.
#[derive(Debug)]
struct Shared {
    /// Set once: every later I/O fails at once with this.
    dead: OnceLock<IoFailure>,
    status: Mutex<DriverStatus>,
    /// Where the I/O side may read by itself, see [`LocalRead`].
    local_read: RwLock<Option<LocalRead>>,
}

/// This node's own copy while the engine would read from it (running, in
/// sync, not failing), with the `Io` the engine would send: a read then
/// goes straight from the FUSE worker to the store, with no hop through
/// the task. Anything but data (a refusal, an error) sends the read the
/// engine's way, which then learns what happened. The task replaces it
/// before it completes any operation, so once the local copy drops out of
/// sync no read that starts after a write is acknowledged reads it (a read
/// concurrent with a write may see either, as on any disk).
#[derive(Debug, Clone)]
struct LocalRead {
    node: String,
    io: Io,
    peer: Arc<dyn Peer>,
}

impl LocalRead {
    fn same(&self, other: &LocalRead) -> bool {
        self.io == other.io && self.node == other.node && Arc::ptr_eq(&self.peer, &other.peer)
    }
}

/// Serves a replicated volume's block I/O through an [`Engine`]. See the
/// module documentation.
pub struct EngineDriver {
    volume: Uuid,
    /// Grows with [`EngineDriver::grow`].
    size: std::sync::atomic::AtomicU64,
    core: Arc<Core>,
    shared: Arc<Shared>,
    /// The ticker; taken by [`EngineDriver::stop`].
    ticker: Mutex<Option<JoinHandle<()>>>,
}

/// A step a thread handed over rather than wait for the task's lock (see
/// [`Core::hand_over`]).
type Handed = Box<dyn FnOnce(&mut Task) + Send>;

/// The engine's task state behind its lock, and what steps need besides.
struct Core {
    task: Mutex<Task>,
    /// Steps handed over by threads that found `task` locked. Whoever
    /// holds the lock runs them first, and whoever lets it go looks here
    /// again: no step waits for a thread that will not come.
    handed: Mutex<Vec<Handed>>,
    rt: Handle,
    volume: Uuid,
    call_timeout: Duration,
    /// Calls to other nodes in flight, aborted when the driver ends.
    calls: Mutex<HashMap<u64, AbortHandle>>,
    /// Data calls to other nodes, batched per node.
    queues: Mutex<HashMap<String, NodeQueue>>,
}

/// The thread a step runs on, which decides how the calls it asks for are
/// made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    /// A FUSE worker (or the blocking pool), which may block: data calls
    /// to other nodes leave from it, calls to this node's copy run on it.
    Worker,
    /// A data link's reading thread, with a batch's answers: data calls to
    /// other nodes leave from it when their link takes them at once (the
    /// link never lets that thread wait on a socket, see
    /// `link::ClientConn::send`), else on a task; calls to this node's copy
    /// run on the blocking pool (a flush's fsync here would hold up every
    /// answer on that link).
    Reader,
    /// The runtime: calls leave on tasks, calls to this node's copy run on
    /// the blocking pool.
    Runtime,
}

/// Batches of data calls to one node in flight at once: what queues up
/// meanwhile goes in the next batch, so under load one round trip carries
/// many writes while a lone write still leaves at once. Fewer and fuller
/// batches did better here (3-copy 4 KiB QD32 writes: 4 in flight of up
/// to 16 calls, sent on a task once the previous batch was answered,
/// about 12.9 k IOPS; 2 of up to 32, sent from the data link's reading
/// thread, 16.5–17.2 k; 16 in flight made it worse).
const BATCHES_IN_FLIGHT: usize = 2;
/// At most this many calls...
const BATCH_CALLS: usize = 32;
/// ...and about this many bytes in one batch (a larger call goes alone).
const BATCH_BYTES: usize = 4 << 20;

/// The data calls waiting for a batch to one node.
#[derive(Default)]
struct NodeQueue {
    in_flight: usize,
    waiting: VecDeque<OutCall>,
}

/// A call the engine asked for, made once the lock is released.
struct OutCall {
    id: u64,
    node: String,
    call: Call,
    peer: Arc<dyn Peer>,
    /// To this node's own copy: [`Peer::call_here`].
    here: bool,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Task> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One step under the lock: `f`, then the engine settles; returns the
    /// calls to make (those of steps handed over meanwhile too). Ends the
    /// task once a stop's flush is done.
    fn locked(&self, f: impl FnOnce(&mut Task)) -> Vec<OutCall> {
        let mut out = self.under(self.lock(), f);
        out.extend(self.take_over());
        out
    }

    /// Hands `f` to the thread holding the task's lock, to run before it
    /// lets go, or runs it here when nobody holds it; the calls to make if
    /// it ran here. A FUSE worker thus goes back for the kernel's next
    /// request rather than sleep on the lock: under 4 KiB QD32 writes its
    /// 16 workers and the data links' reading threads all take this lock,
    /// and a worker slept on it about once every other write.
    fn hand_over(&self, f: Handed) -> Vec<OutCall> {
        self.handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
        self.take_over()
    }

    /// Runs the steps handed over, for as long as there are any and the
    /// lock is free; a thread holding it runs them otherwise. (A step
    /// handed while the holder lets go is not lost: the hander pushed it
    /// before trying the lock, the holder let go before looking, and one
    /// of the two sees the other.)
    fn take_over(&self) -> Vec<OutCall> {
        let mut out = Vec::new();
        while !self
            .handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            let t = match self.task.try_lock() {
                Ok(t) => t,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => break,
            };
            out.extend(self.under(t, |_| {}));
        }
        out
    }

    /// The steps handed over, then `f`, under the lock `t`.
    fn under(&self, mut t: MutexGuard<'_, Task>, f: impl FnOnce(&mut Task)) -> Vec<OutCall> {
        let handed = std::mem::take(&mut *self.handed.lock().unwrap_or_else(|e| e.into_inner()));
        let (out, finished) = {
            if !t.finished {
                for h in handed {
                    h(&mut t);
                }
                f(&mut t);
                t.settle();
                if t.stopping.as_ref().is_some_and(|s| s.flush.is_none()) {
                    t.finish();
                }
            }
            (std::mem::take(&mut t.out), t.finished)
        };
        drop(t);
        if finished {
            self.abort_calls();
            return Vec::new();
        }
        out
    }

    fn abort_calls(&self) {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let calls = std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()));
        for c in calls.into_values() {
            c.abort();
        }
    }

    /// Runs one step on the thread `on` and makes the calls it asked for
    /// (see [`On`]); their answers are the next steps.
    fn step(self: &Arc<Self>, on: On, f: impl FnOnce(&mut Task)) {
        let out = self.locked(f);
        self.send(out, on);
    }

    fn send(self: &Arc<Self>, mut out: Vec<OutCall>, on: On) {
        loop {
            let here = self.send_remote(out, on != On::Runtime);
            if here.is_empty() {
                return;
            }
            if on != On::Worker {
                let core = Arc::clone(self);
                self.rt.spawn_blocking(move || {
                    let answers = core.call_here(here);
                    let out = core.locked(move |t| t.answered_all(answers));
                    core.send(out, On::Worker);
                });
                return;
            }
            let answers = self.call_here(here);
            out = self.hand_over(Box::new(move |t| t.answered_all(answers)));
        }
    }

    /// Spawns the calls to other nodes (data calls in batches, see
    /// [`NodeQueue`], sent from this thread when `direct`); returns those
    /// to this node.
    fn send_remote(self: &Arc<Self>, out: Vec<OutCall>, direct: bool) -> Vec<OutCall> {
        let (here, remote): (Vec<_>, Vec<_>) = out.into_iter().partition(|c| c.here);
        let (data, control): (Vec<_>, Vec<_>) =
            remote.into_iter().partition(|c| c.call.request.is_data());
        if !data.is_empty() {
            let mut nodes = Vec::new();
            {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                for c in data {
                    if !nodes.contains(&c.node) {
                        nodes.push(c.node.clone());
                    }
                    queues
                        .entry(c.node.clone())
                        .or_default()
                        .waiting
                        .push_back(c);
                }
            }
            for n in nodes {
                self.pump(&n, direct);
            }
        }
        for c in control {
            let core = Arc::clone(self);
            let (volume, timeout, id) = (self.volume, self.call_timeout, c.id);
            let handle = self.rt.spawn(async move {
                let result =
                    match tokio::time::timeout(timeout, c.peer.call(&c.node, volume, c.call)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(PeerError::Unreachable {
                            node: c.node,
                            why: format!("no answer within {timeout:?}"),
                        }),
                    };
                core.calls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                core.step(On::Runtime, move |t| t.answered(id, result));
            });
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            if !handle.is_finished() {
                calls.insert(id, handle.abort_handle());
            }
        }
        here
    }

    /// Sends batches of what waits for `node` while fewer than
    /// [`BATCHES_IN_FLIGHT`] are in flight.
    fn pump(self: &Arc<Self>, node: &str, direct: bool) {
        loop {
            let batch: Vec<OutCall> = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(q) = queues.get_mut(node) else {
                    return;
                };
                if q.in_flight >= BATCHES_IN_FLIGHT || q.waiting.is_empty() {
                    return;
                }
                let mut batch = Vec::new();
                let mut bytes = 0;
                while let Some(c) = q.waiting.front() {
                    let len = c.call.data.len();
                    if !batch.is_empty()
                        && (batch.len() >= BATCH_CALLS || bytes + len > BATCH_BYTES)
                    {
                        break;
                    }
                    bytes += len;
                    batch.push(q.waiting.pop_front().expect("checked"));
                }
                q.in_flight += 1;
                batch
            };
            self.send_batch(node.to_owned(), batch, direct);
        }
    }

    /// Sends a batch of data calls to `node`: on this thread when `direct`
    /// (a FUSE worker, which may block) and the peer can send at once, so a
    /// write leaves with no hop to the runtime; on a task of its own
    /// otherwise. Its answers are the next step either way.
    fn send_batch(self: &Arc<Self>, node: String, batch: Vec<OutCall>, direct: bool) {
        let (volume, timeout) = (self.volume, self.call_timeout);
        let key = batch[0].id;
        let ids: Vec<u64> = batch.iter().map(|c| c.id).collect();
        let peer = Arc::clone(&batch[0].peer);
        let mut calls: Vec<Call> = batch.into_iter().map(|c| c.call).collect();
        if direct {
            let (c, n, ids) = (Arc::clone(self), node.clone(), ids.clone());
            let done: BatchDone =
                Box::new(move |results| c.batch_done(&n, key, ids, results, On::Reader));
            match peer.send_now(&node, volume, calls, done) {
                Ok(()) => return,
                Err((back, _)) => calls = back,
            }
        }
        let core = Arc::clone(self);
        let handle = self.rt.spawn(async move {
            let n = calls.len();
            let sent = async {
                if n == 1 {
                    let c = calls.into_iter().next().expect("one");
                    vec![peer.call(&node, volume, c).await]
                } else {
                    peer.call_batch(&node, volume, calls).await
                }
            };
            let results = match tokio::time::timeout(timeout, sent).await {
                Ok(r) if r.len() == n => r,
                Ok(r) => vec![
                    Err(PeerError::Failed {
                        node: node.clone(),
                        why: format!("{} results for a batch of {n}", r.len()),
                    });
                    n
                ],
                Err(_) => vec![
                    Err(PeerError::Unreachable {
                        node: node.clone(),
                        why: format!("no answer within {timeout:?}"),
                    });
                    n
                ],
            };
            core.batch_done(&node, key, ids, results, On::Runtime);
        });
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if !handle.is_finished() {
            calls.insert(key, handle.abort_handle());
        }
    }

    /// A batch to `node` (its calls `ids`, the first being `key`) was
    /// answered, seen on the thread `on`: the next batch for that node may
    /// leave (from that thread unless it is the runtime's), and the
    /// answers are a step.
    fn batch_done(
        self: &Arc<Self>,
        node: &str,
        key: u64,
        ids: Vec<u64>,
        results: Vec<Result<Answer, PeerError>>,
        on: On,
    ) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if let Some(q) = self
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(node)
        {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        self.pump(node, on != On::Runtime);
        let answers: Vec<_> = ids.into_iter().zip(results).collect();
        self.step(on, move |t| t.answered_all(answers));
    }

    fn call_here(&self, here: Vec<OutCall>) -> Vec<(u64, Result<Answer, PeerError>)> {
        here.into_iter()
            .map(|c| {
                let node = c.node.clone();
                let r = c
                    .peer
                    .call_here(&c.node, self.volume, c.call)
                    .unwrap_or_else(|| {
                        Err(PeerError::Failed {
                            node,
                            why: "not this node's copy".to_owned(),
                        })
                    });
                (c.id, r)
            })
            .collect()
    }
}

/// Ticks the engine until the driver ends or is dropped.
async fn ticker(core: Weak<Core>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    // Missed ticks fire at once, so the tick count follows the clock.
    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(core) = core.upgrade() else { return };
        let mut finished = false;
        core.step(On::Runtime, |t| {
            t.tick();
            finished = t.finished;
        });
        if finished {
            return;
        }
    }
}

impl Drop for EngineDriver {
    /// Every handle gone: the task ends, callers still waiting fail.
    fn drop(&mut self) {
        self.core.locked(Task::finish);
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

impl fmt::Debug for EngineDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineDriver")
            .field("volume", &self.volume)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

impl EngineDriver {
    /// Starts an engine for the record ControllerPublish chose at `ballot`
    /// (the engine first takes an epoch of its own, then attaches the
    /// copies) on a task spawned on `rt`, and returns once it serves I/O.
    /// Fails when the engine is fenced (the refusal says by whom), or was
    /// not ready within `cfg.start_timeout`; the task is gone then. Async:
    /// call it from the node service; the returned driver's
    /// [`BlockHandler`] methods block and must be called from plain
    /// threads (FUSE workers), never from an async task.
    pub async fn start(
        cfg: DriverConfig,
        ballot: Ballot,
        record: ReplicaRecord,
        peer: Arc<dyn Peer>,
        rt: Handle,
    ) -> Result<Arc<EngineDriver>, DriverError> {
        let volume = cfg.volume;
        if cfg.volume != record.uuid {
            return Err(DriverError::WrongVolume {
                volume,
                record: record.uuid.to_hex(),
            });
        }
        if cfg.size != record.size {
            return Err(DriverError::WrongSize {
                volume,
                size: cfg.size,
                record: record.size,
            });
        }
        if cfg.tick.is_zero() {
            return Err(DriverError::ZeroTick { volume });
        }
        let regions =
            u32::try_from(cfg.size.div_ceil(REGION_BYTES)).map_err(|_| DriverError::TooLarge {
                volume,
                size: cfg.size,
            })?;
        let status = DriverStatus {
            state: EngineState::Starting,
            stopped: false,
            epoch: record.epoch,
            record: record.clone(),
            copies: Vec::new(),
            rebuild_bytes: 0,
            errors: BTreeMap::new(),
            scrub: ScrubStatus::default(),
        };
        let shared = Arc::new(Shared {
            dead: OnceLock::new(),
            status: Mutex::new(status),
            local_read: RwLock::new(None),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = Task::new(&cfg, regions, ballot, record, peer, shared.clone());
        let core = Arc::new(Core {
            task: Mutex::new(task),
            handed: Mutex::new(Vec::new()),
            rt: rt.clone(),
            volume,
            call_timeout: cfg.timeout,
            calls: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
        });
        core.step(On::Runtime, |t| t.ready = Some(ready_tx));
        let ticker = rt.spawn(ticker(Arc::downgrade(&core), cfg.tick));
        let outcome = tokio::time::timeout(cfg.start_timeout, ready_rx).await;
        let err = match outcome {
            Ok(Ok(Ok(()))) => {
                return Ok(Arc::new(EngineDriver {
                    volume,
                    size: std::sync::atomic::AtomicU64::new(cfg.size),
                    core,
                    shared,
                    ticker: Mutex::new(Some(ticker)),
                }));
            }
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => DriverError::Stopped { volume },
            Err(_) => DriverError::StartTimeout {
                volume,
                waited: cfg.start_timeout,
            },
        };
        core.locked(Task::finish);
        ticker.abort();
        let _ = ticker.await;
        Err(err)
    }

    /// A snapshot of the engine's state. Never blocks on the engine: the
    /// task refreshes it every tick and on every record change.
    pub fn status(&self) -> DriverStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many writes' bytes the driver still keeps for resending.
    #[cfg(test)]
    fn kept_writes(&self) -> usize {
        self.core
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .payloads
            .len()
    }

    /// Flushes, stops the task and waits for it. Every I/O after (or still
    /// waiting) fails with EIO. Returns the final flush's error, if it
    /// failed (the task is stopped either way); stopping twice is a no-op.
    /// Call it once no I/O is expected (after unmounting): a write still
    /// in flight fails, though it may have reached some copies.
    pub async fn stop(&self) -> Result<(), DriverError> {
        let ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(ticker) = ticker else { return Ok(()) };
        let (tx, rx) = oneshot::channel();
        self.core
            .step(On::Runtime, |t| t.command(Command::Stop { done: tx }));
        // Ends once the task did (it sends the result as it finishes).
        let result = rx.await.unwrap_or(Ok(()));
        ticker.abort();
        let _ = ticker.await;
        let _ = self.shared.dead.set(IoFailure::Stopped);
        result
    }

    /// The controller changed the members: the engine's peer learns the
    /// addresses of voters that joined (`addresses`, node id -> host:port),
    /// keeping its connections to the others and the writes in flight on
    /// them, and the engine reads the newest record with its next change
    /// (copies that joined are rebuilt in full while I/O goes on). Does
    /// not wait.
    pub fn refresh(&self, addresses: BTreeMap<String, String>) -> Result<(), DriverError> {
        if self.shared.dead.get().is_some() {
            return Err(DriverError::Stopped {
                volume: self.volume,
            });
        }
        self.core
            .step(On::Runtime, |t| t.command(Command::Refresh { addresses }));
        Ok(())
    }

    fn alive(&self) -> Result<(), IoFailure> {
        match self.shared.dead.get() {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Hands the task I/O commands: in a step on this thread (a FUSE
    /// worker: it may make this node's calls itself), or, when another
    /// thread holds the task, in that thread's step ([`Core::hand_over`]).
    fn submit(&self, cmds: Vec<Command>) {
        let out = self.core.hand_over(Box::new(|t| {
            for c in cmds {
                t.command(c);
            }
        }));
        self.core.send(out, On::Worker);
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        let size = self.size();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} reach beyond the volume ({size} bytes)"),
            )),
        }
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Grows the volume to `size` bytes (a whole number of regions, or the
    /// record's size): the copies' record must say so already
    /// (ControllerExpandVolume). Never shrinks; I/O beyond the old end is
    /// accepted once this returns.
    /// Starts a scrub pass now, at the pace of [`DriverConfig::scrub_rate`],
    /// unless one is under way (see [`Engine::scrub`]).
    pub async fn scrub(&self) -> Result<Scrubbing, DriverError> {
        let (done, rx) = oneshot::channel();
        self.core
            .step(On::Runtime, |t| t.command(Command::Scrub { done }));
        rx.await.map_err(|_| DriverError::Stopped {
            volume: self.volume,
        })
    }

    pub async fn grow(&self, size: u64) -> Result<(), DriverError> {
        if size <= self.size() {
            return Ok(());
        }
        let regions =
            u32::try_from(size.div_ceil(REGION_BYTES)).map_err(|_| DriverError::TooLarge {
                volume: self.volume,
                size,
            })?;
        let (done, rx) = oneshot::channel();
        self.core.step(On::Runtime, |t| {
            t.command(Command::Grow {
                size,
                regions,
                done,
            })
        });
        rx.await.map_err(|_| DriverError::Stopped {
            volume: self.volume,
        })?;
        self.size
            .fetch_max(size, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
}

/// The pieces of `len` bytes at `offset`, one per region: (region, offset
/// in the region, offset in the caller's buffer, length).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (Region, u32, usize, usize)> {
    let end = offset + len as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let region = at / REGION_BYTES;
        let within = at % REGION_BYTES;
        let n = (REGION_BYTES - within).min(end - at);
        let piece = (
            region as Region,
            within as u32,
            (at - offset) as usize,
            n as usize,
        );
        at += n;
        Some(piece)
    })
}

/// Waits for every answer; the first failure wins.
fn wait_all<T>(
    waits: Vec<oneshot::Receiver<Result<T, IoFailure>>>,
    mut each: impl FnMut(usize, T),
) -> Result<(), IoFailure> {
    let mut result = Ok(());
    for (i, rx) in waits.into_iter().enumerate() {
        match rx.blocking_recv() {
            Ok(Ok(v)) => each(i, v),
            Ok(Err(e)) => result = result.and(Err(e)),
            Err(_) => result = result.and(Err(IoFailure::Stopped)),
        }
    }
    result
}

impl EngineDriver {
    /// Reads `out.len()` bytes at `within` into `region` from this node's
    /// own copy on the caller's thread; false when that gave no data (the
    /// engine's read then tells why).
    /// Reads `out` from this node's copy directly: true when it did. A
    /// refusal (the copy moved on) is left to the engine's read; an error
    /// of the copy (its disk failed the read) is told to the engine first,
    /// so that its read goes to another copy rather than to this one again.
    fn read_here(
        &self,
        h: &LocalRead,
        region: Region,
        within: u32,
        out: &mut [u8],
        cmds: &mut Vec<Command>,
    ) -> bool {
        let call = Call {
            request: Request::Read {
                io: h.io,
                region,
                id: 0,
            },
            offset: within,
            len: out.len() as u32,
            data: Payload::default(),
        };
        match h.peer.call_here(&h.node, self.volume, call) {
            Some(Ok(Answer {
                reply: Some(Reply::ReadData { .. }),
                data,
            })) if data.len() == out.len() => {
                out.copy_from_slice(&data);
                true
            }
            Some(Err(error @ PeerError::Failed { .. })) => {
                cmds.push(Command::LocalReadFailed { region, error });
                false
            }
            _ => false,
        }
    }
}

impl BlockHandler for EngineDriver {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.alive()?;
        self.check_range(offset, buf.len())?;
        let here = self
            .shared
            .local_read
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut waits = Vec::new();
        let mut spans = Vec::new();
        let mut cmds = Vec::new();
        for (region, within, at, len) in pieces(offset, buf.len()) {
            if let Some(h) = &here
                && self.read_here(h, region, within, &mut buf[at..at + len], &mut cmds)
            {
                continue;
            }
            let (done, rx) = oneshot::channel();
            cmds.push(Command::Read {
                region,
                offset: within,
                len: len as u32,
                done: Done::Wait(done),
            });
            waits.push(rx);
            spans.push((at, len));
        }
        if !cmds.is_empty() {
            self.submit(cmds);
        }
        wait_all(waits, |i, data: Bytes| {
            let (at, len) = spans[i];
            buf[at..at + len].copy_from_slice(&data);
        })?;
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.alive()?;
        self.check_range(offset, data.len())?;
        let mut waits = Vec::new();
        let mut cmds = Vec::new();
        let bytes = Bytes::copy_from_slice(data);
        for (region, within, at, len) in pieces(offset, data.len()) {
            let (done, rx) = oneshot::channel();
            cmds.push(Command::Write {
                region,
                offset: within,
                data: bytes.slice(at..at + len).into(),
                done: Done::Wait(done),
            });
            waits.push(rx);
        }
        self.submit(cmds);
        wait_all(waits, |_, ()| {})?;
        Ok(())
    }

    /// Hands the write to the engine and returns: `done` runs once every
    /// in-sync copy has it (on whichever thread saw the last answer), so
    /// the FUSE worker takes the next request meanwhile.
    fn write_then(&self, offset: u64, data: &[u8], done: WriteDone) {
        if let Err(e) = self
            .alive()
            .map_err(io::Error::from)
            .and_then(|()| self.check_range(offset, data.len()))
        {
            return done(Err(e));
        }
        let pieces: Vec<_> = pieces(offset, data.len()).collect();
        if pieces.is_empty() {
            return done(Ok(()));
        }
        let all = Arc::new(Countdown {
            state: Mutex::new((pieces.len(), None, Some(done))),
        });
        let bytes = Bytes::copy_from_slice(data);
        let cmds = pieces
            .into_iter()
            .map(|(region, within, at, len)| Command::Write {
                region,
                offset: within,
                data: bytes.slice(at..at + len).into(),
                done: all.piece(),
            })
            .collect();
        drop(all);
        self.submit(cmds);
    }

    fn flush(&self) -> io::Result<()> {
        self.alive()?;
        let (done, rx) = oneshot::channel();
        self.submit(vec![Command::Flush {
            done: Done::Wait(done),
        }]);
        wait_all(vec![rx], |_, ()| {})?;
        Ok(())
    }

    /// The FUSE file follows a growth [`EngineDriver::grow`] made (which
    /// needs the record's word first); it never leads one.
    fn resize(&self, len: u64) -> io::Result<()> {
        if len <= self.size() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the engine serves {} bytes: grow it (NodeExpandVolume) before the file",
                self.size()
            ),
        ))
    }
}

/// A write waiting for its region (the engine has one write per region in
/// flight).
struct QueuedWrite {
    offset: u32,
    data: Payload,
    done: Done<()>,
    deadline: u64,
}

/// A write's bytes, kept while the engine may send it.
struct KeptWrite {
    offset: u32,
    data: Payload,
}

/// An I/O operation the engine is working on. `done` is gone once the
/// caller was answered (or gave up at the deadline); the entry stays until
/// the engine's event for it.
struct Op<T> {
    region: Region,
    done: Option<Done<T>>,
    deadline: u64,
}

impl<T> Op<T> {
    fn finish(&mut self, r: Result<T, IoFailure>) {
        if let Some(done) = self.done.take() {
            done.send(r);
        }
    }
}

struct ReadOp {
    op: Op<Bytes>,
    offset: u32,
    len: u32,
    /// The bytes of the answer handed to the engine last.
    data: Option<Bytes>,
}

/// The one `Write`/`Rebuild` in flight to a (copy, region), and what waits
/// behind it.
struct Lane {
    current: Request,
    queue: VecDeque<Call>,
}

/// What a call in flight was.
struct Sent {
    node: String,
    lane: Option<Region>,
    /// The engine's id of a read.
    read: Option<u64>,
}

struct Stopping {
    flush: Option<u64>,
    deadline: u64,
    done: oneshot::Sender<Result<(), DriverError>>,
    result: Result<(), DriverError>,
}

/// The engine and its bookkeeping (see the module documentation).
struct Task {
    engine: Engine,
    peer: Arc<dyn Peer>,
    volume: Uuid,
    size: u64,
    io_timeout: Duration,
    io_ticks: u64,
    resend_ticks: u64,
    now: u64,
    rng: u64,
    /// Calls made and not answered, by call id.
    sent: HashMap<u64, Sent>,
    next_call: u64,
    /// Calls to make once the lock is released.
    out: Vec<OutCall>,
    /// Ended: I/O fails, answers are dropped.
    finished: bool,
    lanes: HashMap<(String, Region), Lane>,
    payloads: BTreeMap<u64, KeptWrite>,
    rebuild_data: HashMap<(Region, Tag), Payload>,
    queued: BTreeMap<Region, VecDeque<QueuedWrite>>,
    writes: HashMap<u64, Op<()>>,
    reads: HashMap<u64, ReadOp>,
    flushes: HashMap<u64, Op<()>>,
    ready: Option<oneshot::Sender<Result<(), DriverError>>>,
    stopping: Option<Stopping>,
    in_sync: BTreeMap<String, u64>,
    rebuild_bytes: u64,
    /// Calls that failed, by copy (see [`DriverStatus::errors`]).
    errors: BTreeMap<String, CopyErrors>,
    /// Ticks between scrub passes (see [`DriverConfig::scrub_every`]).
    scrub_every: Option<u64>,
    /// Thousandths of a tick between two regions of a pass.
    scrub_gap: u64,
    /// When the next pass starts (once planned: see `plan_scrub`).
    scrub_due: u64,
    /// The region it starts at.
    scrub_from: Region,
    /// The first pass was planned from the copies' [`CheckMark`](super::protocol::CheckMark)s.
    scrub_planned: bool,
    scrub: ScrubStatus,
    /// Ticks within which a due pass starts (see
    /// [`DriverConfig::scrub_spread`]).
    scrub_spread: u64,
    tick: Duration,
    shared: Arc<Shared>,
}

/// `d` in thousandths of a tick (see [`Engine::scrub`]).
fn milliticks(d: Duration, tick: Duration) -> u64 {
    u64::try_from(d.as_nanos().saturating_mul(1000) / tick.as_nanos().max(1)).unwrap_or(u64::MAX)
}

fn ticks(d: Duration, tick: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(tick.as_nanos()))
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Task {
    fn new(
        cfg: &DriverConfig,
        regions: u32,
        ballot: Ballot,
        record: ReplicaRecord,
        peer: Arc<dyn Peer>,
        shared: Arc<Shared>,
    ) -> Self {
        // The model's clock counts ticks: its resends of attaches and join
        // flushes fire when the time since the first send is a multiple of
        // `resend`, which needs a clock that never skips a value.
        let resend_ticks = ticks(cfg.resend, cfg.tick);
        let ecfg = EngineConfig {
            id: cfg.id.clone(),
            node: cfg.node.clone(),
            regions,
            timeout: ticks(cfg.timeout, cfg.tick),
            resend: resend_ticks,
            heal: cfg.heal,
            rebuild_gap: cfg
                .rebuild_rate
                .map_or(0, |r| milliticks(super::region_time(r), cfg.tick).max(1)),
        };
        let in_sync = record.in_sync.clone();
        let seed = uuid::Uuid::new_v4().as_u64_pair();
        let rng = (seed.0 ^ seed.1) | 1;
        let scrub_every = cfg.scrub_every.map(|d| ticks(d, cfg.tick));
        let per_region = super::region_time(cfg.scrub_rate);
        Task {
            engine: Engine::new(ecfg, ballot, record, 0),
            peer,
            volume: cfg.volume,
            size: cfg.size,
            io_timeout: cfg.io_timeout,
            io_ticks: ticks(cfg.io_timeout, cfg.tick),
            resend_ticks,
            now: 0,
            rng,
            sent: HashMap::new(),
            next_call: 0,
            out: Vec::new(),
            finished: false,
            lanes: HashMap::new(),
            payloads: BTreeMap::new(),
            rebuild_data: HashMap::new(),
            queued: BTreeMap::new(),
            writes: HashMap::new(),
            reads: HashMap::new(),
            flushes: HashMap::new(),
            ready: None,
            stopping: None,
            in_sync,
            rebuild_bytes: 0,
            errors: BTreeMap::new(),
            scrub_every,
            scrub_gap: milliticks(per_region, cfg.tick),
            scrub_due: 0,
            scrub_from: 0,
            scrub_planned: false,
            scrub: ScrubStatus::default(),
            scrub_spread: ticks(cfg.scrub_spread, cfg.tick),
            tick: cfg.tick,
            shared,
        }
    }

    /// The task ends: callers still waiting fail, and so does every later
    /// call.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let _ = self.shared.dead.set(IoFailure::Stopped);
        self.publish_local_read();
        self.refresh_status(true);
        self.out.clear();
        self.sent.clear();
        // Nobody steps the engine again: whoever waits is answered now.
        let stopped = IoFailure::Stopped;
        for (_, q) in std::mem::take(&mut self.queued) {
            for w in q {
                w.done.send(Err(stopped.clone()));
            }
        }
        for (_, mut w) in self.writes.drain() {
            w.finish(Err(stopped.clone()));
        }
        for (_, mut f) in self.flushes.drain() {
            f.finish(Err(stopped.clone()));
        }
        for (_, mut r) in self.reads.drain() {
            r.op.finish(Err(stopped.clone()));
        }
        if let Some(r) = self.ready.take() {
            let _ = r.send(Err(DriverError::Stopped {
                volume: self.volume,
            }));
        }
        if let Some(s) = self.stopping.take() {
            let _ = s.done.send(s.result);
        }
        tracing::info!(volume = %self.volume, "replicated volume engine stopped");
    }

    fn jitter(&mut self) -> u64 {
        // xorshift64: spreads competing proposers' retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        1 + self.rng % self.resend_ticks
    }

    fn region_len(&self, region: Region) -> u64 {
        (self.size - u64::from(region) * REGION_BYTES).min(REGION_BYTES)
    }

    fn dead(&self) -> Option<IoFailure> {
        if self.stopping.is_some() {
            return Some(IoFailure::Stopped);
        }
        self.shared.dead.get().cloned()
    }

    fn command(&mut self, c: Command) {
        let deadline = self.now + self.io_ticks;
        match c {
            Command::Write {
                region,
                offset,
                data,
                done,
            } => {
                if let Some(why) = self.dead() {
                    done.send(Err(why));
                    return;
                }
                // Started in order by start_queued, behind any earlier
                // write of the region.
                self.queued
                    .entry(region)
                    .or_default()
                    .push_back(QueuedWrite {
                        offset,
                        data,
                        done,
                        deadline,
                    });
            }
            Command::Read {
                region,
                offset,
                len,
                done,
            } => {
                if let Some(why) = self.dead() {
                    done.send(Err(why));
                    return;
                }
                match self.engine.read(region) {
                    Ok(id) => {
                        let op = Op {
                            region,
                            done: Some(done),
                            deadline,
                        };
                        self.reads.insert(
                            id,
                            ReadOp {
                                op,
                                offset,
                                len,
                                data: None,
                            },
                        );
                    }
                    Err(e) => {
                        done.send(Err(e.into()));
                    }
                }
            }
            Command::Flush { done } => {
                if let Some(why) = self.dead() {
                    done.send(Err(why));
                    return;
                }
                match self.engine.flush() {
                    Ok(id) => {
                        let op = Op {
                            region: 0,
                            done: Some(done),
                            deadline,
                        };
                        self.flushes.insert(id, op);
                    }
                    Err(e) => {
                        done.send(Err(e.into()));
                    }
                }
            }
            Command::Refresh { addresses } => {
                self.peer.learn(&addresses);
                self.engine.refresh();
            }
            Command::Scrub { done } => {
                if !self.scrub_planned && matches!(self.engine.state(), EngineState::Running) {
                    self.plan_scrub();
                }
                let started = self.engine.scrub(0, self.scrub_gap);
                let answer = match self.engine.scrubbing() {
                    Some(at) => {
                        if started {
                            tracing::info!(volume = %self.volume, "scrub pass started on request");
                            if let Some(every) = self.scrub_every {
                                self.set_scrub_due(every);
                            }
                        }
                        Scrubbing::Pass {
                            started,
                            at,
                            regions: self.size.div_ceil(REGION_BYTES) as u32,
                        }
                    }
                    None => Scrubbing::NotRunning(self.engine.state()),
                };
                let _ = done.send(answer);
            }
            Command::LocalReadFailed { region, error } => {
                let node = self.engine.node().to_owned();
                tracing::debug!(volume = %self.volume, %node, region, %error, "local read failed");
                self.count_error(&node, &error);
                self.engine.region_failed(&node, region);
            }
            Command::Grow {
                size,
                regions,
                done,
            } => {
                self.engine.grow(regions);
                self.size = self.size.max(size);
                let _ = done.send(());
            }
            Command::Stop { done } => {
                if self.stopping.is_some() {
                    let _ = done.send(Ok(()));
                    return;
                }
                let (flush, result) = match self.shared.dead.get() {
                    Some(_) => (None, Ok(())),
                    None => match self.engine.flush() {
                        Ok(id) => (Some(id), Ok(())),
                        Err(e) => (
                            None,
                            Err(DriverError::FinalFlush {
                                volume: self.volume,
                                why: e.into(),
                            }),
                        ),
                    },
                };
                self.stopping = Some(Stopping {
                    flush,
                    deadline,
                    done,
                    result,
                });
            }
        }
    }

    fn answered_all(&mut self, answers: Vec<(u64, Result<Answer, PeerError>)>) {
        for (id, r) in answers {
            self.answered(id, r);
        }
    }

    fn answered(&mut self, id: u64, result: Result<Answer, PeerError>) {
        let Some(sent) = self.sent.remove(&id) else {
            return;
        };
        let failed = result.is_err();
        match result {
            Ok(Answer {
                reply: Some(reply),
                data,
            }) => {
                if self.take_bytes(&reply, data) {
                    self.engine.handle(&sent.node, reply);
                }
            }
            Ok(Answer { reply: None, .. }) => {}
            Err(e) => {
                // Failed (the node answered with an error) counts like
                // Unreachable, and so does NoCopy but for a copy out of
                // sync (see Engine::not_a_copy): the request was not
                // applied as far as we know, waiting for the engine's
                // timeout would only hold
                // writes longer, and the (copy, region) lane below may
                // release a later write only once this copy counts as
                // failed (its unflushed regions are then rebuilt).
                tracing::debug!(volume = %self.volume, node = %sent.node, %e, "call failed");
                self.count_error(&sent.node, &e);
                match (e, sent.read) {
                    (PeerError::NoCopy { .. }, _) => self.engine.not_a_copy(&sent.node),
                    // Sent on to another copy at once, and the region
                    // rebuilt on this one (a bad sector, say).
                    (_, Some(read)) => self.engine.read_failed(&sent.node, read),
                    _ => self.engine.unreachable(&sent.node),
                }
            }
        }
        if let Some(region) = sent.lane {
            self.release_lane(sent.node, region, failed);
        }
    }

    /// Keeps the bytes a `ReadData` brought, for the read or rebuild it
    /// answers. False when they are unusable (the reply is then dropped
    /// and the engine resends or times out).
    fn take_bytes(&mut self, reply: &Reply, data: Bytes) -> bool {
        let Reply::ReadData {
            id, region, tag, ..
        } = reply
        else {
            return true;
        };
        if let Some(r) = self.reads.get_mut(id) {
            if data.len() != r.len as usize {
                let f = IoFailure::ShortRead {
                    region: *region,
                    got: data.len(),
                    want: r.len as usize,
                };
                tracing::warn!(volume = %self.volume, %f, "dropping a read answer");
                return false;
            }
            r.data = Some(data);
            return true;
        }
        // A rebuild's read: the whole region, for the Rebuild that follows.
        let want = self.region_len(*region) as usize;
        if data.len() != want {
            let f = IoFailure::ShortRead {
                region: *region,
                got: data.len(),
                want,
            };
            tracing::warn!(volume = %self.volume, %f, "dropping a rebuild read answer");
            return false;
        }
        self.rebuild_data.insert((*region, *tag), data.into());
        true
    }

    /// Plans the engine's first scrub pass, once it runs, from how far the
    /// copies it attached say passes got (see
    /// [`DriverConfig::scrub_every`]).
    fn plan_scrub(&mut self) {
        self.scrub_planned = true;
        let mark = self.engine.scrubbed();
        if self.scrub.last_done == 0 {
            self.scrub.last_done = mark.done;
        }
        let Some(every) = self.scrub_every else {
            return;
        };
        let spread = every.min(self.scrub_spread);
        let r = self.rng.rotate_left(17);
        let regions = self.size.div_ceil(REGION_BYTES);
        let period = Duration::from_nanos(every.saturating_mul(self.tick.as_nanos() as u64));
        let due = CheckDue::of(mark, regions, unix_now(), period);
        let (wait, from) = match due {
            CheckDue::Resume(at) => (1 + r % spread, at),
            CheckDue::After(left) => (ticks(left, self.tick), 0),
            CheckDue::Overdue => (1 + r % spread, 0),
            CheckDue::Never => (1 + r % every, 0),
        };
        self.set_scrub_due(wait);
        self.scrub_from = from;
        tracing::debug!(volume = %self.volume, ?due, in_ticks = wait, "first scrub pass planned");
    }

    /// The next pass is due `wait` ticks from now.
    fn set_scrub_due(&mut self, wait: u64) {
        self.scrub_due = self.now + wait;
        let secs = Duration::from_nanos(wait.saturating_mul(self.tick.as_nanos() as u64)).as_secs();
        self.scrub.next_at = unix_now() + secs;
    }

    fn tick(&mut self) {
        self.now += 1;
        let jitter = self.jitter();
        self.engine.tick(self.now, jitter);
        if !self.scrub_planned && matches!(self.engine.state(), EngineState::Running) {
            self.plan_scrub();
        }
        if let Some(every) = self.scrub_every
            && self.scrub_planned
            && self.now >= self.scrub_due
            && self.engine.scrub(self.scrub_from, self.scrub_gap)
        {
            self.set_scrub_due(every);
            self.scrub_from = 0;
        }
        self.expire();
        if self
            .stopping
            .as_ref()
            .is_some_and(|s| self.now >= s.deadline && s.flush.is_some())
        {
            let s = self.stopping.as_mut().expect("checked");
            s.flush = None;
            s.result = Err(DriverError::FinalFlush {
                volume: self.volume,
                why: IoFailure::Timeout(self.io_timeout),
            });
        }
        self.refresh_status(false);
    }

    /// Fails the operations whose deadline passed (the engine may still
    /// complete them: a timed-out write may land).
    fn expire(&mut self) {
        let now = self.now;
        let late = IoFailure::Timeout(self.io_timeout);
        for q in self.queued.values_mut() {
            while q.front().is_some_and(|w| now >= w.deadline) {
                let w = q.pop_front().expect("checked");
                w.done.send(Err(late.clone()));
            }
        }
        self.queued.retain(|_, q| !q.is_empty());
        for w in self.writes.values_mut().filter(|w| now >= w.deadline) {
            w.finish(Err(late.clone()));
        }
        for f in self.flushes.values_mut().filter(|f| now >= f.deadline) {
            f.finish(Err(late.clone()));
        }
        for r in self.reads.values_mut().filter(|r| now >= r.op.deadline) {
            r.op.finish(Err(late.clone()));
        }
    }

    /// Starts the queued writes whose region is free, drains the engine,
    /// sends and completes, until nothing changes.
    fn settle(&mut self) {
        loop {
            self.start_queued();
            let (out, mut events) = self.engine.drain();
            // Before any operation completes (see LocalRead).
            self.publish_local_read();
            if out.is_empty() && events.is_empty() {
                break;
            }
            // The engine stopping comes first: a caller whose write just
            // failed then finds every later call failing with the reason.
            events.sort_by_key(|e| {
                !matches!(e, EngineEvent::Fenced { .. } | EngineEvent::AllCopiesLost)
            });
            for ev in events {
                self.event(ev);
            }
            for e in out {
                self.send(e);
            }
        }
        let engine = &self.engine;
        self.rebuild_data
            .retain(|(region, tag), _| engine.copying(*region, *tag));
    }

    /// Tells the I/O side whether, and with which `Io`, it may read this
    /// node's copy by itself.
    fn publish_local_read(&self) {
        let now = match self.dead() {
            Some(_) => None,
            None => self.engine.local_read().map(|io| LocalRead {
                node: self.engine.node().to_owned(),
                io,
                peer: Arc::clone(&self.peer),
            }),
        };
        let unchanged = {
            let held = self
                .shared
                .local_read
                .read()
                .unwrap_or_else(|e| e.into_inner());
            match (&*held, &now) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            }
        };
        if !unchanged {
            *self
                .shared
                .local_read
                .write()
                .unwrap_or_else(|e| e.into_inner()) = now;
        }
    }

    fn start_queued(&mut self) {
        let failed = self.dead();
        let mut empty = Vec::new();
        for (&region, q) in self.queued.iter_mut() {
            while !q.is_empty() {
                if let Some(why) = &failed {
                    let w = q.pop_front().expect("checked");
                    w.done.send(Err(why.clone()));
                    continue;
                }
                match self.engine.write(region) {
                    Ok(tag) => {
                        let w = q.pop_front().expect("checked");
                        self.payloads.insert(
                            tag.seq,
                            KeptWrite {
                                offset: w.offset,
                                data: w.data,
                            },
                        );
                        self.writes.insert(
                            tag.seq,
                            Op {
                                region,
                                done: Some(w.done),
                                deadline: w.deadline,
                            },
                        );
                    }
                    Err(IoError::Busy(_)) => break,
                    Err(e) => {
                        let w = q.pop_front().expect("checked");
                        w.done.send(Err(e.into()));
                    }
                }
            }
            if q.is_empty() {
                empty.push(region);
            }
        }
        for r in empty {
            self.queued.remove(&r);
        }
    }

    fn event(&mut self, ev: EngineEvent) {
        let v = self.volume;
        match ev {
            EngineEvent::Ready { epoch } => {
                tracing::info!(volume = %v, epoch, in_sync = ?self.in_sync.keys().collect::<Vec<_>>(),
                    "replicated volume engine ready");
                // The status first: start returns on the signal.
                self.refresh_status(false);
                if let Some(r) = self.ready.take() {
                    let _ = r.send(Ok(()));
                }
            }
            EngineEvent::Acked { tag, .. } => {
                if let Some(mut w) = self.writes.remove(&tag.seq) {
                    w.finish(Ok(()));
                }
            }
            EngineEvent::Settled { seq } => {
                self.payloads.remove(&seq);
            }
            EngineEvent::WriteFailed { region, tag } => {
                if let Some(mut w) = self.writes.remove(&tag.seq) {
                    w.finish(Err(IoFailure::WriteFailed(region)));
                }
            }
            EngineEvent::FlushAcked { id } => {
                if let Some(mut f) = self.flushes.remove(&id) {
                    f.finish(Ok(()));
                }
                self.stop_flushed(id, Ok(()));
            }
            EngineEvent::FlushFailed { id } => {
                if let Some(mut f) = self.flushes.remove(&id) {
                    f.finish(Err(IoFailure::FlushFailed));
                }
                self.stop_flushed(id, Err(IoFailure::FlushFailed));
            }
            EngineEvent::ReadDone { id, region, .. } => {
                if let Some(mut r) = self.reads.remove(&id) {
                    let result = r.data.take().ok_or(IoFailure::ReadFailed(region));
                    r.op.finish(result);
                }
            }
            EngineEvent::ReadFailed { id } => {
                if let Some(mut r) = self.reads.remove(&id) {
                    let region = r.op.region;
                    r.op.finish(Err(IoFailure::ReadFailed(region)));
                }
            }
            EngineEvent::Chosen { record, .. } => {
                for n in self.in_sync.keys() {
                    if !record.in_sync.contains_key(n) {
                        tracing::info!(volume = %v, node = %n, epoch = record.epoch,
                            "copy marked out of sync");
                    }
                }
                for n in record.in_sync.keys() {
                    if !self.in_sync.contains_key(n) {
                        tracing::info!(volume = %v, node = %n, epoch = record.epoch,
                            "copy rebuilt and back in sync");
                    }
                }
                self.in_sync = record.in_sync.clone();
                self.refresh_status(false);
            }
            EngineEvent::Scrubbed {
                region,
                bad,
                unresolved,
            } => {
                self.scrub.regions += 1;
                if unresolved {
                    self.scrub.unresolved += 1;
                    tracing::error!(volume = %v, region, ?bad,
                        "scrub: the copies disagree on the region with no majority, or the only copy cannot read it: nothing to repair it from");
                } else if !bad.is_empty() {
                    for n in &bad {
                        *self.scrub.repairs.entry(n.clone()).or_default() += 1;
                    }
                    tracing::warn!(volume = %v, region, ?bad,
                        "scrub: copies could not read the region or held other bytes than the others: marked out of sync, the region is written again");
                }
            }
            EngineEvent::ScrubDone => {
                self.scrub.passes += 1;
                self.scrub.last_done = unix_now();
                tracing::info!(volume = %v, passes = self.scrub.passes,
                    regions = self.scrub.regions, "scrub pass done");
            }
            EngineEvent::Reseeded { base, boot } => {
                tracing::warn!(volume = %v, %base, boot,
                    "every in-sync copy had restarted: reseeding the others from one of them");
            }
            EngineEvent::Fenced { refusal } => {
                tracing::warn!(volume = %v, %refusal, "replicated volume engine fenced");
                self.refresh_status(false);
                let _ = self.shared.dead.set(IoFailure::Fenced(refusal.to_string()));
                if let Some(r) = self.ready.take() {
                    let _ = r.send(Err(DriverError::Fenced { volume: v, refusal }));
                }
            }
            EngineEvent::AllCopiesLost => {
                tracing::error!(volume = %v,
                    "every in-sync copy lost unflushed writes: the engine stopped, I/O fails");
                self.refresh_status(false);
                let _ = self.shared.dead.set(IoFailure::AllCopiesLost);
                if let Some(r) = self.ready.take() {
                    let _ = r.send(Err(DriverError::AllCopiesLost { volume: v }));
                }
            }
        }
    }

    fn stop_flushed(&mut self, id: u64, r: Result<(), IoFailure>) {
        let volume = self.volume;
        if let Some(s) = self.stopping.as_mut()
            && s.flush == Some(id)
        {
            s.flush = None;
            s.result = r.map_err(|why| DriverError::FinalFlush { volume, why });
        }
    }

    /// Sends one envelope with its bytes, keeping one `Write`/`Rebuild` per
    /// (copy, region) in flight.
    fn send(&mut self, e: Envelope) {
        let call = match &e.msg {
            Request::Write { tag, .. } => {
                let Some(p) = self.payloads.get(&tag.seq) else {
                    tracing::error!(volume = %self.volume, ?tag, "no bytes for a write; not sent");
                    return;
                };
                Call {
                    request: e.msg.clone(),
                    offset: p.offset,
                    len: 0,
                    data: p.data.clone(),
                }
            }
            Request::Rebuild { region, tag, .. } => {
                let Some(data) = self.rebuild_data.get(&(*region, *tag)) else {
                    tracing::error!(volume = %self.volume, region, ?tag,
                        "no bytes for a rebuild; not sent");
                    return;
                };
                Call {
                    request: e.msg.clone(),
                    offset: 0,
                    len: 0,
                    data: data.clone(),
                }
            }
            Request::Read { id, .. } => match self.reads.get(id) {
                Some(r) => Call {
                    request: e.msg.clone(),
                    offset: r.offset,
                    len: r.len,
                    data: Payload::default(),
                },
                // Not the I/O side's: a rebuild reads the whole region.
                None => Call::control(e.msg.clone()),
            },
            _ => Call::control(e.msg.clone()),
        };
        let lane = match &e.msg {
            Request::Write { region, .. } | Request::Rebuild { region, .. } => Some(*region),
            _ => None,
        };
        if let Some(region) = lane {
            let key = (e.to.clone(), region);
            if let Some(l) = self.lanes.get_mut(&key) {
                // An identical request in flight or waiting answers this
                // resend too.
                if l.current != e.msg && l.queue.iter().all(|c| c.request != e.msg) {
                    l.queue.push_back(call);
                }
                return;
            }
            self.lanes.insert(
                key,
                Lane {
                    current: e.msg.clone(),
                    queue: VecDeque::new(),
                },
            );
        }
        self.spawn(e.to, lane, call);
    }

    fn spawn(&mut self, node: String, lane: Option<Region>, call: Call) {
        if let Request::Rebuild { .. } = call.request {
            self.rebuild_bytes += call.data.len() as u64;
        }
        let read = match call.request {
            Request::Read { id, .. } | Request::Verify { id, .. } => Some(id),
            _ => None,
        };
        self.next_call += 1;
        let id = self.next_call;
        self.out.push(OutCall {
            id,
            here: self.peer.is_here(&node),
            node: node.clone(),
            call,
            peer: Arc::clone(&self.peer),
        });
        self.sent.insert(id, Sent { node, lane, read });
    }

    /// The call in flight on (node, region) ended: send the next one that
    /// is still needed. After a call without an answer, what waited is
    /// dropped (the copy now counts as failed; the engine resends what it
    /// still needs, on its new connection).
    fn release_lane(&mut self, node: String, region: Region, failed: bool) {
        let key = (node, region);
        let Some(mut lane) = self.lanes.remove(&key) else {
            return;
        };
        if failed {
            lane.queue.clear();
        }
        let epoch = self.engine.epoch();
        while let Some(call) = lane.queue.pop_front() {
            let needed = match &call.request {
                Request::Write { tag, .. } => {
                    tag.epoch == epoch && self.engine.write_pending(tag.seq)
                }
                Request::Rebuild { region, tag, .. } => self.engine.copying(*region, *tag),
                _ => true,
            };
            if !needed {
                continue;
            }
            lane.current = call.request.clone();
            let node = key.0.clone();
            self.lanes.insert(key, lane);
            self.spawn(node, Some(region), call);
            return;
        }
    }

    fn count_error(&mut self, node: &str, e: &PeerError) {
        let last = e.to_string();
        let last_at = std::time::Instant::now();
        self.errors
            .entry(node.to_owned())
            .and_modify(|c| {
                c.count += 1;
                c.last.clone_from(&last);
                c.last_at = last_at;
            })
            .or_insert(CopyErrors {
                count: 1,
                last,
                last_at,
            });
    }

    fn refresh_status(&self, stopped: bool) {
        let mut s = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        s.state = self.engine.state();
        s.stopped |= stopped;
        s.epoch = self.engine.epoch();
        if s.record != *self.engine.record() {
            s.record = self.engine.record().clone();
        }
        s.copies = self.engine.copies();
        s.rebuild_bytes = self.rebuild_bytes;
        if s.errors != self.errors {
            s.errors.clone_from(&self.errors);
        }
        // Every field: a pass's end may be seen here before its event.
        let at = self.engine.scrubbing();
        let (old, new) = (&s.scrub, &self.scrub);
        if old.at != at
            || old.regions != new.regions
            || old.passes != new.passes
            || old.unresolved != new.unresolved
            || old.repairs != new.repairs
            || old.last_done != new.last_done
            || old.next_at != new.next_at
        {
            s.scrub.clone_from(&self.scrub);
            s.scrub.at = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use super::*;
    use crate::backend::replicated::engine::CopyPhase;
    use crate::backend::replicated::protocol::{Change, CheckMark, Outcome, Proposer, Voter};
    use crate::backend::replicated::record::Member;

    #[test]
    fn a_write_is_cut_into_pieces_on_region_boundaries() {
        let data: Vec<u8> = (0..2 * REGION_BYTES as usize + 8192)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let bytes = Bytes::copy_from_slice(&data);
        let mut n = 0;
        let mut next = 0;
        for (_, _, at, len) in pieces(REGION_BYTES / 2, data.len()) {
            assert_eq!(at, next, "pieces are contiguous");
            assert!(len as u64 <= REGION_BYTES);
            assert_eq!(&bytes.slice(at..at + len)[..], &data[at..at + len]);
            next = at + len;
            n += 1;
        }
        assert_eq!((n, next), (3, data.len()));
    }

    /// Three and a half regions: the last one is partial.
    const SIZE: u64 = 3 * REGION_BYTES + REGION_BYTES / 2;
    const VOLUME: &str = "0123456789abcdef0123456789abcdef";

    fn region_len(region: Region) -> usize {
        (SIZE - u64::from(region) * REGION_BYTES).min(REGION_BYTES) as usize
    }

    /// One voter and the bytes behind its tags.
    #[derive(Debug)]
    struct Node {
        voter: Voter,
        bytes: BTreeMap<Region, Vec<u8>>,
        /// The bytes of the durable tags (flushed or attached).
        durable: BTreeMap<Region, Vec<u8>>,
        down: bool,
        /// Each call waits a random time up to this (so calls overtake
        /// each other).
        delay: Duration,
        /// Regions its disk cannot read (bad sectors) until they are
        /// written whole (a rebuild).
        unreadable: BTreeSet<Region>,
        /// Reads and checks that failed on them.
        failed_reads: u64,
        /// How far scrub passes got here, as its attach answers say (the
        /// store's `checked` file).
        scrubbed: CheckMark,
        /// The regions it answered checks of, in turn.
        verified: Vec<Region>,
    }

    /// The copies of one volume in memory, behind [`Peer`]. A Write's or
    /// Rebuild's bytes are applied when the voter holds the request's tag
    /// afterwards (what the real store does).
    #[derive(Debug)]
    struct Net {
        nodes: Mutex<BTreeMap<String, Node>>,
        /// (node, region) of every Rebuild applied.
        rebuilt: Mutex<Vec<(String, Region)>>,
        /// Bytes of every Rebuild applied.
        rebuilt_bytes: Mutex<u64>,
        /// Requests the mock found malformed.
        violations: Mutex<Vec<String>>,
    }

    impl Net {
        /// Copies on `nodes`, published to `owner`.
        fn cluster(nodes: &[&str], owner: &str) -> (Arc<Net>, Ballot, ReplicaRecord) {
            let r = ReplicaRecord::new(
                Uuid::parse_hex(VOLUME).unwrap(),
                SIZE,
                nodes.iter().map(|n| Member::copy(n)).collect(),
                &BTreeMap::new(),
            )
            .unwrap();
            let net = Net {
                nodes: Mutex::new(
                    nodes
                        .iter()
                        .map(|n| {
                            let node = Node {
                                voter: Voter::new(n, r.clone(), 0),
                                bytes: BTreeMap::new(),
                                durable: BTreeMap::new(),
                                down: false,
                                delay: Duration::ZERO,
                                unreadable: BTreeSet::new(),
                                failed_reads: 0,
                                scrubbed: CheckMark::default(),
                                verified: Vec::new(),
                            };
                            (n.to_string(), node)
                        })
                        .collect(),
                ),
                rebuilt: Mutex::default(),
                rebuilt_bytes: Mutex::default(),
                violations: Mutex::default(),
            };
            let (ballot, record) = net.publish(owner, &r);
            (Arc::new(net), ballot, record)
        }

        /// ControllerPublish, run to its end over the reachable voters.
        fn publish(&self, owner: &str, r: &ReplicaRecord) -> (Ballot, ReplicaRecord) {
            let change = Change::Publish {
                node: owner.into(),
                readonly: false,
            };
            let (mut p, mut out) = Proposer::new("ctl/test", change, r, 0, 0, 10);
            let mut nodes = self.nodes.lock().unwrap();
            for now in 1..100 {
                let mut next = Vec::new();
                for e in out.drain(..) {
                    let n = nodes.get_mut(&e.to).unwrap();
                    if n.down {
                        continue;
                    }
                    if let Some(reply) = n.voter.handle(e.msg) {
                        let (more, outcome) = p.handle(&e.to, &reply);
                        match outcome {
                            Some(Outcome::Chosen { ballot, record }) => return (ballot, record),
                            Some(o) => panic!("publish refused: {o:?}"),
                            None => next.extend(more),
                        }
                    }
                }
                next.extend(p.tick(now, 1));
                out = next;
            }
            panic!("publish did not finish");
        }

        fn set_down(&self, node: &str, down: bool) {
            self.nodes.lock().unwrap().get_mut(node).unwrap().down = down;
        }

        /// Makes `node`'s disk unable to read `region` until it is
        /// rebuilt there.
        fn spoil(&self, node: &str, region: Region) {
            self.nodes
                .lock()
                .unwrap()
                .get_mut(node)
                .unwrap()
                .unreadable
                .insert(region);
        }

        /// Changes the bytes `node` holds of `region` behind its back.
        fn corrupt(&self, node: &str, region: Region) {
            let mut nodes = self.nodes.lock().unwrap();
            let b = nodes
                .get_mut(node)
                .unwrap()
                .bytes
                .entry(region)
                .or_insert_with(|| vec![0; region_len(region)]);
            b[100] ^= 0xff;
        }

        /// Makes `node`'s attach answers say scrub passes got as far as
        /// `mark`.
        fn set_scrubbed(&self, node: &str, mark: CheckMark) {
            self.nodes.lock().unwrap().get_mut(node).unwrap().scrubbed = mark;
        }

        /// The regions `node` answered checks of, in turn.
        fn verified(&self, node: &str) -> Vec<Region> {
            self.nodes.lock().unwrap()[node].verified.clone()
        }

        /// (regions still unreadable, reads that failed) on `node`.
        fn spoiled(&self, node: &str) -> (usize, u64) {
            let nodes = self.nodes.lock().unwrap();
            (nodes[node].unreadable.len(), nodes[node].failed_reads)
        }

        fn set_delay(&self, node: &str, delay: Duration) {
            self.nodes.lock().unwrap().get_mut(node).unwrap().delay = delay;
        }

        fn restart(&self, node: &str) {
            let mut nodes = self.nodes.lock().unwrap();
            let n = nodes.get_mut(node).unwrap();
            n.voter.restart();
            n.bytes = n.durable.clone();
        }

        /// What `node` holds: the whole volume.
        fn image(&self, node: &str) -> Vec<u8> {
            let nodes = self.nodes.lock().unwrap();
            let n = &nodes[node];
            let regions = SIZE.div_ceil(REGION_BYTES) as Region;
            (0..regions)
                .flat_map(|r| {
                    n.bytes
                        .get(&r)
                        .cloned()
                        .unwrap_or_else(|| vec![0; region_len(r)])
                })
                .collect()
        }

        fn in_sync_on(&self, node: &str) -> BTreeSet<String> {
            let nodes = self.nodes.lock().unwrap();
            nodes[node]
                .voter
                .state()
                .record
                .in_sync
                .keys()
                .cloned()
                .collect()
        }

        fn reach(&self, node: &str) -> Result<Duration, PeerError> {
            let nodes = self.nodes.lock().unwrap();
            match nodes.get(node) {
                Some(n) if !n.down => Ok(n.delay),
                _ => Err(PeerError::Unreachable {
                    node: node.into(),
                    why: "down".into(),
                }),
            }
        }

        fn violation(&self, what: String) {
            self.violations.lock().unwrap().push(what);
        }

        fn check(&self) {
            let v = self.violations.lock().unwrap();
            assert!(v.is_empty(), "malformed requests: {v:?}");
        }
    }

    /// The network as the engine on `node` sees it: calls to `node` itself
    /// run on the caller's thread ([`Peer::call_here`]), without delay.
    #[derive(Debug)]
    struct At {
        net: Arc<Net>,
        node: String,
    }

    #[tonic::async_trait]
    impl Peer for At {
        async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError> {
            self.net.call(node, volume, call).await
        }

        fn is_here(&self, node: &str) -> bool {
            node == self.node
        }

        fn call_here(
            &self,
            node: &str,
            volume: Uuid,
            call: Call,
        ) -> Option<Result<Answer, PeerError>> {
            if node != self.node {
                return None;
            }
            if matches!(call.request, Request::Verify { .. }) && IN_BLOCK_IO.get() {
                self.net
                    .violation("a scrub's check ran inside a block I/O".to_owned());
            }
            // The local disk's time: the whole delay, on this thread.
            Some(self.net.reach(node).and_then(|delay| {
                std::thread::sleep(delay);
                self.net.apply(node, volume, call)
            }))
        }
    }

    #[tonic::async_trait]
    impl Peer for Net {
        async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError> {
            let delay = self.reach(node)?;
            if !delay.is_zero() {
                let random = uuid::Uuid::new_v4().as_u64_pair().0;
                let nanos = random % delay.as_nanos() as u64;
                tokio::time::sleep(Duration::from_nanos(nanos)).await;
                self.reach(node)?;
            }
            self.apply(node, volume, call)
        }
    }

    impl Net {
        /// A call reaching `node`'s voter.
        fn apply(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError> {
            if volume.to_hex() != VOLUME {
                self.violation(format!("a call for volume {volume}"));
            }
            let mut nodes = self.nodes.lock().unwrap();
            let n = nodes.get_mut(node).expect("reachable");
            if let Request::Read { region, .. } | Request::Verify { region, .. } = call.request
                && n.unreadable.contains(&region)
            {
                n.failed_reads += 1;
                return Err(PeerError::Failed {
                    node: node.into(),
                    why: "Input/output error".into(),
                });
            }
            let mut reply = n.voter.handle(call.request.clone());
            let mut data = Vec::new();
            match (&call.request, &mut reply) {
                (Request::Write { region, tag, .. }, Some(Reply::Written { .. })) => {
                    let len = region_len(*region);
                    let at = call.offset as usize;
                    if at + call.data.len() > len || call.data.is_empty() {
                        self.violation(format!("write of {} at {at}", call.data.len()));
                    } else if n.voter.data().get(region) == Some(tag) {
                        let b = n.bytes.entry(*region).or_insert_with(|| vec![0; len]);
                        b[at..at + call.data.len()].copy_from_slice(&call.data);
                    }
                }
                (Request::Rebuild { region, tag, .. }, Some(Reply::Rebuilt { .. })) => {
                    if call.data.len() != region_len(*region) {
                        self.violation(format!("rebuild of {} bytes", call.data.len()));
                    } else if n.voter.data().get(region) == Some(tag) {
                        n.unreadable.remove(region);
                        n.bytes.insert(*region, call.data.to_vec());
                        self.rebuilt.lock().unwrap().push((node.into(), *region));
                        *self.rebuilt_bytes.lock().unwrap() += call.data.len() as u64;
                    }
                }
                (Request::Flush { .. }, Some(Reply::Flushed { .. })) => {
                    n.durable = n.bytes.clone();
                }
                (Request::Attach { .. }, Some(Reply::Attached { scrubbed, .. })) => {
                    n.durable = n.bytes.clone();
                    *scrubbed = n.scrubbed;
                }
                (Request::Verify { region, .. }, Some(Reply::Verified { digest, .. })) => {
                    n.verified.push(*region);
                    let len = region_len(*region);
                    let b = n.bytes.get(region).cloned().unwrap_or(vec![0; len]);
                    digest
                        .copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &b).as_ref());
                }
                (Request::Read { region, .. }, Some(Reply::ReadData { .. })) => {
                    let len = region_len(*region);
                    let b = n.bytes.get(region).cloned().unwrap_or(vec![0; len]);
                    let (at, want) = (call.offset as usize, call.len as usize);
                    data = match want {
                        0 => b,
                        _ if at + want <= len => b[at..at + want].to_vec(),
                        _ => {
                            self.violation(format!("read of {want} at {at}"));
                            Vec::new()
                        }
                    };
                }
                _ => {}
            }
            Ok(Answer {
                reply,
                data: data.into(),
            })
        }
    }

    fn config(node: &str) -> DriverConfig {
        let mut c = DriverConfig::new(Uuid::parse_hex(VOLUME).unwrap(), node, SIZE);
        c.tick = Duration::from_millis(5);
        c.timeout = Duration::from_millis(500);
        c.resend = Duration::from_millis(50);
        c.io_timeout = Duration::from_secs(3);
        c.start_timeout = Duration::from_secs(30);
        c
    }

    async fn start(
        net: &Arc<Net>,
        node: &str,
        ballot: &Ballot,
        r: &ReplicaRecord,
    ) -> Arc<EngineDriver> {
        start_with(net, config(node), ballot, r).await
    }

    async fn start_with(
        net: &Arc<Net>,
        cfg: DriverConfig,
        ballot: &Ballot,
        r: &ReplicaRecord,
    ) -> Arc<EngineDriver> {
        let peer: Arc<dyn Peer> = Arc::new(At {
            net: net.clone(),
            node: cfg.node.clone(),
        });
        EngineDriver::start(cfg, ballot.clone(), r.clone(), peer, Handle::current())
            .await
            .expect("the engine starts")
    }

    /// Runs blocking I/O on a thread outside the runtime's workers, as the
    /// FUSE workers do.
    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    std::thread_local! {
        /// This thread is in a block I/O call of the driver, as a FUSE
        /// worker is (see [`At::call_here`]).
        static IN_BLOCK_IO: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Runs `f` as a FUSE worker's block I/O.
    fn block_io<T>(f: impl FnOnce() -> T) -> T {
        IN_BLOCK_IO.set(true);
        let r = f();
        IN_BLOCK_IO.set(false);
        r
    }

    async fn write(d: &Arc<EngineDriver>, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let d = d.clone();
        blocking(move || block_io(|| d.write_at(offset, &data))).await
    }

    async fn read(d: &Arc<EngineDriver>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let d = d.clone();
        blocking(move || {
            let mut buf = vec![0; len];
            block_io(|| d.read_at(offset, &mut buf)).map(|()| buf)
        })
        .await
    }

    async fn flush(d: &Arc<EngineDriver>) -> io::Result<()> {
        let d = d.clone();
        blocking(move || block_io(|| d.flush())).await
    }

    fn failure(e: &io::Error) -> IoFailure {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<IoFailure>())
            .unwrap_or_else(|| panic!("not an I/O failure of the driver: {e}"))
            .clone()
    }

    /// Bytes that differ with `seed` and along the buffer.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Waits (bounded, so a bug fails instead of hanging) for `cond`.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn all_in_sync(d: &EngineDriver, copies: usize) -> bool {
        let s = d.status();
        s.record.in_sync.len() == copies
            && s.copies.len() == copies
            && s.copies.iter().all(|c| c.phase == CopyPhase::InSync)
    }

    fn assert_images(net: &Net, nodes: &[&str], want: &[u8]) {
        for n in nodes {
            let got = net.image(n);
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(first.is_none(), "copy {n} differs first at byte {first:?}");
        }
    }

    /// `write_then` from a FUSE-like thread; the outcome as it arrived.
    async fn write_then(d: Arc<EngineDriver>, offset: u64, data: Vec<u8>) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        blocking(move || {
            d.write_then(
                offset,
                &data,
                Box::new(move |r| {
                    let _ = tx.send(r.map_err(|e| e.to_string()));
                }),
            )
        })
        .await;
        rx.await.expect("write_then answers exactly once")
    }

    /// A FUSE worker whose write finds the task locked hands it over and
    /// returns at once; the thread holding the lock runs it before letting
    /// go, and the write lands on every copy and is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_finds_the_task_busy_is_handed_over_not_waited_for() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        // No ticks: nothing but the threads taking the lock may run a
        // handed step.
        d.ticker.lock().unwrap().take().unwrap().abort();
        let data = pattern(7, 4096);
        let offset = 3 * REGION_BYTES + 8192;
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (returned_tx, returned_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let worker = {
            let (d, data) = (d.clone(), data.clone());
            std::thread::spawn(move || {
                held_rx.recv().expect("the lock is held");
                d.write_then(
                    offset,
                    &data,
                    Box::new(move |r| {
                        let _ = done_tx.send(r.map_err(|e| e.to_string()));
                    }),
                );
                let _ = returned_tx.send(());
            })
        };
        let holder = d.clone();
        let returned_while_held = blocking(move || {
            let mut returned = false;
            holder.core.step(On::Runtime, |_| {
                held_tx.send(()).unwrap();
                // Bounded: a worker that waits for the lock would never
                // return while this step holds it.
                returned = returned_rx.recv_timeout(Duration::from_secs(10)).is_ok();
            });
            returned
        })
        .await;
        worker.join().unwrap();
        assert!(returned_while_held, "the worker waited for the task's lock");
        let answered = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
        assert_eq!(
            answered.expect("the handed write was answered").unwrap(),
            Ok(())
        );
        assert_eq!(read(&d, offset, 4096).await.unwrap(), data);
        until("every copy in sync", || all_in_sync(&d, 3)).await;
        let image = net.image("a");
        assert_eq!(&image[offset as usize..offset as usize + 4096], &data[..]);
        assert_images(&net, &["b", "c"], &image);
        assert_eq!(d.kept_writes(), 0);
        net.check();
        d.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_answered_later_reach_every_copy_and_fail_once_stopped() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        let mut model = vec![0u8; SIZE as usize];
        // Within one region, then across three.
        for (i, (offset, len)) in [(100, 4096), (REGION_BYTES / 2, 2 * REGION_BYTES as usize)]
            .into_iter()
            .enumerate()
        {
            let data = pattern(40 + i as u64, len);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            write_then(d.clone(), offset, data).await.unwrap();
        }
        // Many at once (none overlapping), as a queue of FUSE requests.
        let mut all = Vec::new();
        for i in 0..32u64 {
            let offset = (i * 37 * 4096) % (SIZE - 4096);
            let data = pattern(100 + i, 4096);
            let w = tokio::spawn(write_then(d.clone(), offset, data.clone()));
            all.push((offset, data, w));
        }
        for (offset, data, w) in all {
            w.await.unwrap().unwrap();
            model[offset as usize..offset as usize + 4096].copy_from_slice(&data);
        }
        flush(&d).await.unwrap();
        assert_eq!(read(&d, 0, SIZE as usize).await.unwrap(), model);
        write_then(d.clone(), 10, Vec::new()).await.unwrap();
        let err = write_then(d.clone(), SIZE - 1, vec![1, 2])
            .await
            .unwrap_err();
        assert!(err.contains("beyond the volume"), "{err}");
        until("every copy in sync", || all_in_sync(&d, 3)).await;
        assert_images(&net, &["a", "b", "c"], &model);
        d.stop().await.unwrap();
        let err = write_then(d.clone(), 0, vec![1; 512]).await.unwrap_err();
        assert!(err.contains("stopped"), "{err}");
        net.check();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_and_reads_across_region_boundaries_reach_every_copy() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        assert_eq!(d.status().state, EngineState::Running);
        // Never written: zeros.
        assert_eq!(read(&d, REGION_BYTES - 5, 10).await.unwrap(), vec![0; 10]);
        let mut model = vec![0u8; SIZE as usize];
        let writes: [(u64, usize); 6] = [
            (0, SIZE as usize),
            (5, 1000),
            (REGION_BYTES - 3, 7),
            (REGION_BYTES + 12_345, REGION_BYTES as usize + 777),
            (3 * REGION_BYTES - 1, 2),
            (SIZE - 100, 100),
        ];
        for (i, (offset, len)) in writes.into_iter().enumerate() {
            let data = pattern(i as u64, len);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            write(&d, offset, data).await.unwrap();
        }
        flush(&d).await.unwrap();
        assert_eq!(read(&d, 0, SIZE as usize).await.unwrap(), model);
        for (offset, len) in [
            (7, 3),
            (REGION_BYTES - 10, 20),
            (2 * REGION_BYTES + 1, 4096),
        ] {
            let got = read(&d, offset, len).await.unwrap();
            assert_eq!(
                got,
                model[offset as usize..offset as usize + len],
                "{offset}"
            );
        }
        let err = write(&d, SIZE - 1, vec![1, 2]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        until("every copy in sync", || all_in_sync(&d, 3)).await;
        assert_images(&net, &["a", "b", "c"], &model);
        net.check();
        d.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_copy_drops_out_and_is_rebuilt_from_its_dirty_regions() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        let mut model = vec![0u8; SIZE as usize];
        let mut put = |offset: u64, data: &[u8]| {
            model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        };
        let w3 = pattern(3, 5000);
        put(3 * REGION_BYTES + 10, &w3);
        write(&d, 3 * REGION_BYTES + 10, w3).await.unwrap();
        flush(&d).await.unwrap();

        net.set_down("c", true);
        let w0 = pattern(0, 5000);
        put(10, &w0);
        write(&d, 10, w0).await.unwrap();
        let w2 = pattern(2, REGION_BYTES as usize);
        put(2 * REGION_BYTES, &w2);
        write(&d, 2 * REGION_BYTES, w2).await.unwrap();
        let s = d.status();
        assert!(!s.record.in_sync.contains_key("c"), "{:?}", s.record);
        let marked =
            net.in_sync_on("a").contains("c") as u8 + net.in_sync_on("b").contains("c") as u8;
        assert_eq!(marked, 0, "c is still in sync on a voter of the majority");

        net.set_down("c", false);
        // Writes go on while c is rebuilt, into a dirty region too.
        let w0b = pattern(10, 3000);
        put(500_000, &w0b);
        write(&d, 500_000, w0b).await.unwrap();
        until("c rebuilt and in sync", || all_in_sync(&d, 3)).await;
        // Chosen on a majority of the voters (which one, and whether the
        // third learned it yet, is the network's timing).
        let holding = ["a", "b", "c"]
            .into_iter()
            .filter(|n| net.in_sync_on(n).contains("c"))
            .count();
        assert!(holding >= 2, "c is in sync on only {holding} voter(s)");

        let regions: BTreeSet<Region> = net
            .rebuilt
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == "c")
            .map(|(_, r)| *r)
            .collect();
        assert_eq!(
            regions,
            BTreeSet::from([0, 2]),
            "only the dirty regions are copied"
        );
        let moved = *net.rebuilt_bytes.lock().unwrap();
        assert!(moved >= 2 * REGION_BYTES, "{moved} bytes moved");
        assert!(d.status().rebuild_bytes >= 2 * REGION_BYTES);
        flush(&d).await.unwrap();
        assert_eq!(read(&d, 0, SIZE as usize).await.unwrap(), model);
        assert_images(&net, &["a", "b", "c"], &model);
        net.check();
        d.stop().await.unwrap();
    }

    /// The engine's node reads its own copy directly; when that copy's
    /// disk fails the read, the engine's read of the region goes to
    /// another copy at once, not to the failing disk again, and the region
    /// is written again there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_read_the_copy_fails_is_asked_of_its_disk_once_then_read_elsewhere() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        let w = pattern(1, 8192);
        write(&d, REGION_BYTES + 4096, w.clone()).await.unwrap();
        flush(&d).await.unwrap();
        net.spoil("a", 1);
        let got = read(&d, REGION_BYTES + 4096, 8192).await.unwrap();
        assert!(got == w, "other bytes read back");
        assert_eq!(net.spoiled("a").1, 1, "a's disk asked again for the region");
        until("a's region written again, a in sync", || {
            net.spoiled("a").0 == 0
                && all_in_sync(&d, 3)
                && d.status().copies.iter().all(|c| !c.failing)
        })
        .await;
        assert!(d.status().errors["a"].count >= 1);
        assert!(read(&d, REGION_BYTES + 4096, 8192).await.unwrap() == w);
        net.check();
        d.stop().await.unwrap();
    }

    /// A scrub finds a region a copy nobody reads cannot read, and bytes
    /// changed behind another copy's back: both are written again from
    /// the others, and the status counts them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrub_rewrites_what_copies_cannot_read_or_hold_otherwise() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let mut cfg = config("a");
        cfg.scrub_every = Some(Duration::from_millis(100));
        cfg.scrub_rate = 1 << 30;
        let d = start_with(&net, cfg, &ballot, &r).await;
        let mut model = vec![0u8; SIZE as usize];
        model.copy_from_slice(&pattern(9, SIZE as usize));
        write(&d, 0, model.clone()).await.unwrap();
        flush(&d).await.unwrap();
        until("a whole scrub pass", || d.status().scrub.passes >= 1).await;
        assert!(
            d.status().scrub.repairs.is_empty(),
            "{:?}",
            d.status().scrub
        );
        net.spoil("b", 2);
        net.corrupt("c", 3);
        until("b's and c's regions written again", || {
            let s = d.status().scrub;
            s.repairs.get("b") >= Some(&1) && s.repairs.get("c") >= Some(&1)
        })
        .await;
        until("b's region written again, every copy in sync", || {
            net.spoiled("b").0 == 0
                && all_in_sync(&d, 3)
                && d.status().copies.iter().all(|c| !c.failing)
        })
        .await;
        assert!(net.spoiled("b").1 >= 1);
        assert_eq!(d.status().scrub.unresolved, 0);
        assert!(!d.status().scrub.repairs.contains_key("a"));
        flush(&d).await.unwrap();
        assert_images(&net, &["a", "b", "c"], &model);
        net.check();
        d.stop().await.unwrap();
    }

    /// A scrub's check of the engine's own copy reads and hashes a whole
    /// region: it never runs on a thread in a block I/O (a FUSE worker,
    /// whose I/O would wait for it). Checks start on the ticker's steps
    /// only, whose calls to this node run on the blocking pool, also when
    /// the pass waited for a region's writes and the last one ends on a
    /// worker. Passes run back to back here under small writes to every
    /// region, each ended by the local copy's answer (it answers last).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrub_never_checks_the_local_copy_on_a_thread_doing_block_io() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let mut cfg = config("a");
        cfg.scrub_every = Some(Duration::from_millis(5));
        cfg.scrub_rate = 1 << 40;
        let d = start_with(&net, cfg, &ballot, &r).await;
        // The local copy answers last: a write's step on the worker ends it.
        net.set_delay("a", Duration::from_millis(2));
        let regions = SIZE.div_ceil(REGION_BYTES);
        for i in 0..400u64 {
            let at = (i % regions) * REGION_BYTES + (i * 4096) % (REGION_BYTES / 2);
            write(&d, at, pattern(i, 4096)).await.unwrap();
        }
        flush(&d).await.unwrap();
        let s = d.status().scrub;
        assert!(s.passes >= 1, "{s:?}");
        assert!(!net.verified("a").is_empty());
        net.check();
        d.stop().await.unwrap();
    }

    /// A new engine resumes a pass an earlier one stopped, where the
    /// copies say it got (the furthest after the latest whole pass), long
    /// before the period is up, and counts the next period from then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_engine_resumes_the_pass_an_earlier_one_stopped() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let now = unix_now();
        net.set_scrubbed(
            "a",
            CheckMark {
                done: now - 50,
                next: 1,
            },
        );
        net.set_scrubbed(
            "b",
            CheckMark {
                done: now - 50,
                next: 2,
            },
        );
        // A pass stopped before the latest whole one.
        net.set_scrubbed(
            "c",
            CheckMark {
                done: now - 900,
                next: 3,
            },
        );
        let mut cfg = config("a");
        let hour = 3_600;
        cfg.scrub_every = Some(Duration::from_secs(hour));
        cfg.scrub_spread = Duration::from_millis(50);
        cfg.scrub_rate = 1 << 30;
        let d = start_with(&net, cfg, &ballot, &r).await;
        until("the resumed pass done", || d.status().scrub.passes == 1).await;
        let s = d.status().scrub;
        assert_eq!(s.regions, 2, "{s:?}");
        for n in ["a", "b", "c"] {
            assert_eq!(net.verified(n), [2, 3], "{n}");
        }
        assert!(s.last_done >= now, "{s:?}");
        let next = s.next_at.saturating_sub(now);
        assert!((hour - 5..=hour + 5).contains(&next), "{s:?}");
        net.check();
        d.stop().await.unwrap();
    }

    /// A new engine whose copies say the last whole pass ended some time
    /// ago plans the next one a period after it; one with copies that
    /// never saw a pass end plans it within the first period; one whose
    /// last pass is a period old or more, within the spread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_engine_plans_the_next_pass_a_period_after_the_last_whole_one() {
        let hour = 3_600;
        let plan = |marks: [u64; 3]| async move {
            let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
            for (n, done) in ["a", "b", "c"].into_iter().zip(marks) {
                net.set_scrubbed(n, CheckMark { done, next: 0 });
            }
            let mut cfg = config("a");
            cfg.scrub_every = Some(Duration::from_secs(hour));
            let d = start_with(&net, cfg, &ballot, &r).await;
            until("the pass planned", || d.status().scrub.next_at > 0).await;
            let s = d.status().scrub;
            assert_eq!(s.passes, 0);
            d.stop().await.unwrap();
            s
        };
        let now = unix_now();
        let s = plan([now - 1_000, now - 3_000, 0]).await;
        assert_eq!(s.last_done, now - 1_000);
        let next = s.next_at.saturating_sub(now);
        assert!(
            (hour - 1_000 - 5..=hour - 1_000 + 5).contains(&next),
            "{s:?}"
        );
        // Overdue: within the spread (a minute by default).
        let s = plan([now - 2 * hour, 0, 0]).await;
        assert!(s.next_at <= unix_now() + 61, "{s:?}");
        let s = plan([0, 0, 0]).await;
        assert_eq!(s.last_done, 0);
        assert!(s.next_at <= unix_now() + hour + 1, "{s:?}");
    }

    /// A pass asked for runs with no schedule, says so when one is under
    /// way already, and shows in the status once it is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrub_asked_for_runs_one_pass_and_says_when_one_is_under_way() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let mut cfg = config("a");
        cfg.scrub_rate = 4 << 20;
        let d = start_with(&net, cfg, &ballot, &r).await;
        let regions = SIZE.div_ceil(REGION_BYTES) as u32;
        assert_eq!(
            d.scrub().await.unwrap(),
            Scrubbing::Pass {
                started: true,
                at: 0,
                regions
            }
        );
        assert!(matches!(
            d.scrub().await.unwrap(),
            Scrubbing::Pass { started: false, .. }
        ));
        until("the pass done", || d.status().scrub.passes == 1).await;
        let s = d.status().scrub;
        assert_eq!((s.regions, s.at), (u64::from(regions), None), "{s:?}");
        d.stop().await.unwrap();
        assert!(matches!(d.scrub().await, Err(DriverError::Stopped { .. })));
    }

    /// A copy being rebuilt is not waited for, so several writes to one
    /// region may be on their way to it at once: they must land in order
    /// (a partial write overtaken by a later one would be lost under a
    /// tag that says otherwise), and a region copied after writes reached
    /// it must still be replaced whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_to_a_copy_being_rebuilt_land_in_order() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        let mut model = vec![0u8; SIZE as usize];
        net.set_down("c", true);
        // Dirty on c: regions 0, 2 and 3, copied in that order.
        for region in [0, 2, 3] {
            let offset = region * REGION_BYTES;
            let data = pattern(region, 70_000);
            model[offset as usize..offset as usize + 70_000].copy_from_slice(&data);
            write(&d, offset, data).await.unwrap();
        }
        until("c out of sync", || {
            !d.status().record.in_sync.contains_key("c")
        })
        .await;
        net.set_delay("c", Duration::from_millis(40));
        net.set_down("c", false);
        until("c being rebuilt", || {
            d.status()
                .copies
                .iter()
                .any(|c| c.node == "c" && c.phase == CopyPhase::Rebuilding)
        })
        .await;
        // Small writes at distinct offsets of region 1 (clean on c) and
        // region 3 (dirty on c, copied last: writes reach c before its
        // copy does), one after the other.
        for k in 0..30u64 {
            for region in [1, 3] {
                let offset = region * REGION_BYTES + 100_000 + k * 3000;
                let data = pattern(100 + k + region * 1000, 2000);
                model[offset as usize..offset as usize + 2000].copy_from_slice(&data);
                write(&d, offset, data).await.unwrap();
            }
        }
        net.set_delay("c", Duration::ZERO);
        until("c in sync", || all_in_sync(&d, 3)).await;
        assert_images(&net, &["a", "b", "c"], &model);
        net.check();
        d.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_to_one_region_keep_their_order_on_every_copy() {
        const THREADS: u8 = 4;
        const EACH: u8 = 40;
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        // 4 KiB on each side of the boundary between regions 0 and 1.
        let offset = REGION_BYTES - 4096;
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for k in 0..EACH {
                        // Unique per write; a thread's later write follows
                        // its earlier one, which had returned.
                        let v = t * EACH + k + 1;
                        d.write_at(offset, &[v; 8192]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            blocking(move || t.join().unwrap()).await;
        }
        let lasts: BTreeSet<u8> = (0..THREADS).map(|t| t * EACH + EACH).collect();
        let got = read(&d, offset, 8192).await.unwrap();
        for half in got.chunks(4096) {
            assert!(half.iter().all(|b| *b == half[0]), "a region holds a mix");
            assert!(
                lasts.contains(&half[0]),
                "value {} is not some writer's last write",
                half[0]
            );
        }
        until("every copy in sync", || all_in_sync(&d, 3)).await;
        for n in ["a", "b", "c"] {
            let image = net.image(n);
            assert_eq!(
                image[offset as usize..offset as usize + 8192],
                got,
                "copy {n}"
            );
        }
        net.check();
        d.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_engine_fences_the_first_which_fails_io_at_once() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let first = start(&net, "a", &ballot, &r).await;
        let data = pattern(7, 70_000);
        write(&first, REGION_BYTES - 1000, data.clone())
            .await
            .unwrap();

        let second = start(&net, "a", &ballot, &r).await;
        assert!(second.status().epoch > first.status().epoch);
        let err = write(&first, 0, vec![1; 512]).await.unwrap_err();
        assert!(
            matches!(
                failure(&err),
                IoFailure::Fenced(_) | IoFailure::WriteFailed(_)
            ),
            "{err}"
        );
        // From now on at once, without asking the engine.
        let err = read(&first, 0, 512).await.unwrap_err();
        assert!(matches!(failure(&err), IoFailure::Fenced(_)), "{err}");
        assert_eq!(first.status().state, EngineState::Fenced);

        assert_eq!(
            read(&second, REGION_BYTES - 1000, 70_000).await.unwrap(),
            data
        );
        assert_eq!(
            read(&second, 0, 512).await.unwrap(),
            vec![0; 512],
            "the fenced write landed"
        );
        net.check();
        first.stop().await.unwrap();
        second.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_majority_io_fails_and_no_acknowledged_write_is_lost() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let first = start(&net, "a", &ballot, &r).await;
        let acked = pattern(1, 10_000);
        write(&first, REGION_BYTES + 5, acked.clone())
            .await
            .unwrap();

        net.set_down("b", true);
        net.set_down("c", true);
        let err = write(&first, 2 * REGION_BYTES, pattern(2, 4096))
            .await
            .unwrap_err();
        assert!(matches!(failure(&err), IoFailure::Timeout(_)), "{err}");
        let err = flush(&first).await.unwrap_err();
        assert!(matches!(failure(&err), IoFailure::Timeout(_)), "{err}");
        assert!(
            first.stop().await.is_err(),
            "the final flush cannot succeed"
        );
        let err = write(&first, 0, vec![1]).await.unwrap_err();
        assert_eq!(failure(&err), IoFailure::Stopped);

        net.set_down("b", false);
        net.set_down("c", false);
        let second = start(&net, "a", &ballot, &r).await;
        assert_eq!(
            read(&second, REGION_BYTES + 5, 10_000).await.unwrap(),
            acked
        );
        let unacked = read(&second, 2 * REGION_BYTES, 4096).await.unwrap();
        assert!(
            unacked == vec![0; 4096] || unacked == pattern(2, 4096),
            "a write that failed is either there or not, never torn"
        );
        until("every copy in sync", || all_in_sync(&second, 3)).await;
        let image = net.image("a");
        assert_images(&net, &["b", "c"], &image);
        net.check();
        second.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_that_restarts_loses_only_what_it_had_not_flushed_and_is_rebuilt() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        let flushed = pattern(1, 4096);
        write(&d, 0, flushed.clone()).await.unwrap();
        flush(&d).await.unwrap();
        let unflushed = pattern(2, 4096);
        write(&d, 3 * REGION_BYTES, unflushed.clone())
            .await
            .unwrap();
        net.restart("b");
        // b refuses the old boot: out of sync, then rebuilt under its new
        // boot.
        write(&d, REGION_BYTES, pattern(3, 4096)).await.unwrap();
        until("b rebuilt under its new boot", || {
            all_in_sync(&d, 3) && d.status().record.in_sync["b"] == 1
        })
        .await;
        let rebuilt: BTreeSet<Region> = net
            .rebuilt
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == "b")
            .map(|(_, r)| *r)
            .collect();
        assert!(
            rebuilt.contains(&3),
            "the region b lost was rebuilt: {rebuilt:?}"
        );
        assert!(
            !rebuilt.contains(&0),
            "a flushed region was copied: {rebuilt:?}"
        );
        assert_eq!(read(&d, 3 * REGION_BYTES, 4096).await.unwrap(), unflushed);
        // Every write is settled: none of their bytes is kept.
        assert_eq!(d.kept_writes(), 0);
        let image = net.image("a");
        assert_images(&net, &["b", "c"], &image);
        net.check();
        d.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_stop_io_fails_and_dropping_a_driver_ends_its_task() {
        let (net, ballot, r) = Net::cluster(&["a", "b", "c"], "a");
        let d = start(&net, "a", &ballot, &r).await;
        write(&d, 0, vec![9; 100]).await.unwrap();
        let err = blocking({
            let d = d.clone();
            move || d.resize(2 * SIZE)
        })
        .await
        .unwrap_err();
        // The file never leads a growth: the engine grows first.
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        blocking({
            let d = d.clone();
            move || d.resize(SIZE)
        })
        .await
        .unwrap();
        d.stop().await.unwrap();
        d.stop().await.unwrap();
        assert!(d.status().stopped);
        let err = read(&d, 0, 100).await.unwrap_err();
        assert_eq!(failure(&err), IoFailure::Stopped);

        let d = start(&net, "a", &ballot, &r).await;
        assert_eq!(read(&d, 0, 100).await.unwrap(), vec![9; 100]);
        let shared = d.shared.clone();
        drop(d);
        until("the dropped driver's task ended", || {
            shared.status.lock().unwrap().stopped
        })
        .await;
        net.check();
    }
}
