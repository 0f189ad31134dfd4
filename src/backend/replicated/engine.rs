//! The engine's replication logic, sans I/O: what the node that owns a
//! replicated volume sends to its copies for each write, flush and read,
//! when a write may be acknowledged, which copies it marks out of sync and
//! how it rebuilds them. It never touches a socket, a file or a clock; the
//! data path feeds it replies and ticks and sends what it returns.

use std::collections::{BTreeMap, BTreeSet};

use super::protocol::{
    Ballot, Change, CheckMark, Digest, Envelope, Io, IoRefusal, Outcome, Proposer, Refusal, Region,
    Reply, Request, Tag,
};
use super::record::ReplicaRecord;

/// An engine instance's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Proposer id, unique among everyone who may change the record (e.g.
    /// `engine/<node>/<start counter>`).
    pub id: String,
    /// The node the engine runs on (the owner).
    pub node: String,
    /// How many regions the volume has.
    pub regions: u32,
    /// Ticks a copy may take to answer before it counts as failed; also a
    /// record change's phase timeout.
    pub timeout: u64,
    /// Ticks between resends of an unanswered request.
    pub resend: u64,
    /// The engine of a heal (see [`Change::Heal`]), not of a publication:
    /// it may start only while the owner is a heal's.
    pub heal: bool,
    /// The pace of rebuilds: thousandths of a tick from the start of one
    /// region's copy to the next, all copies together, on average and
    /// never caught up in a burst (as a scrub pass keeps its pace); 0: no
    /// pace (each copy rebuilding gets a region a tick).
    pub rebuild_gap: u64,
}

/// Where the engine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// Taking an epoch of its own (the Start change).
    Starting,
    /// Attaching the in-sync copies and comparing what they hold.
    Attaching,
    /// Recording which of them are really in sync.
    Settling,
    /// Serving I/O.
    Running,
    /// Another owner or epoch holds the volume: nothing more is sent.
    Fenced,
    /// Every in-sync copy restarted and lost unflushed writes while this
    /// engine ran: its acknowledgements can no longer be honoured, so it
    /// stops (the data path fails I/O; a new engine reseeds).
    Failed,
}

/// Where a copy stands, as the engine sees it (for status and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPhase {
    /// In the in-sync set: writes wait for it.
    InSync,
    /// Out of sync, not reachable (or not attached yet).
    Out,
    /// Attached again and being rebuilt from its dirty regions.
    Rebuilding,
}

/// One copy as the engine sees it: [`Engine::copies`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyView {
    pub node: String,
    pub phase: CopyPhase,
    /// Failed to answer in time (or refused): about to be marked out of
    /// sync (or, being rebuilt, to start over).
    pub failing: bool,
    /// Regions it may lack: what a rebuild still has to copy (0 when in
    /// sync).
    pub dirty: usize,
    /// The boot the engine knows it under.
    pub boot: u64,
}

/// Why an I/O was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("the engine is not running")]
    NotRunning,
    #[error("region {0} has a request in flight")]
    Busy(Region),
    #[error("region {0} is beyond the volume")]
    OutOfRange(Region),
    #[error("no copy is in sync")]
    NoCopy,
}

/// What the engine tells the data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// The engine serves I/O at `epoch`.
    Ready {
        epoch: u64,
    },
    /// A write is on every in-sync copy: acknowledge it.
    Acked {
        region: Region,
        tag: Tag,
    },
    /// A write will never be acknowledged (the engine stopped).
    WriteFailed {
        region: Region,
        tag: Tag,
    },
    FlushAcked {
        id: u64,
    },
    FlushFailed {
        id: u64,
    },
    ReadDone {
        id: u64,
        region: Region,
        tag: Tag,
    },
    ReadFailed {
        id: u64,
    },
    /// The engine made a change: `record` is chosen at `ballot`.
    Chosen {
        ballot: Ballot,
        record: ReplicaRecord,
    },
    /// At start no in-sync copy was as it had been (all restarted): `base`
    /// becomes the only in-sync copy and the others are rebuilt from it.
    Reseeded {
        base: String,
        boot: u64,
    },
    Fenced {
        refusal: Refusal,
    },
    AllCopiesLost,
    /// A scrub checked `region` on the copies in sync. `bad` lists those
    /// that could not read it, or held other bytes than a majority of the
    /// others: each is marked out of sync and gets the region written
    /// again by its rebuild. `unresolved`: the copies disagreed with no
    /// majority (or the only copy in sync could not read the region), so
    /// nothing could be repaired.
    Scrubbed {
        region: Region,
        bad: Vec<String>,
        unresolved: bool,
    },
    /// A scrub pass reached the last region.
    ScrubDone,
    /// The write with sequence number `seq` goes to no copy any more
    /// (every copy it went to answered or left, or the engine stopped):
    /// its bytes may go ([`Engine::write_pending`] is false from here on).
    Settled {
        seq: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    InSync,
    Out,
    Rebuilding,
}

#[derive(Debug, Clone)]
struct Copying {
    region: Region,
    read: u64,
    tag: Option<Tag>,
    sent_at: u64,
    started: u64,
}

/// The engine's view of one copy.
#[derive(Debug, Clone)]
struct Link {
    phase: Phase,
    /// The `since` of the member it is a link to: a node removed and added
    /// again is another copy (empty), whatever the link knew of the old.
    since: u64,
    conn: u64,
    boot: u64,
    /// Failed while required: to be marked out of sync.
    failing: bool,
    /// Restarted (so it lost what it had not flushed).
    lost: bool,
    /// Regions it may lack (while out of sync or rebuilding).
    dirty: BTreeSet<Region>,
    /// Regions it failed to read (a bad sector, see
    /// [`Engine::read_failed`]): it stays failing until it went out of
    /// sync, and these are then rebuilt, which writes them again.
    unreadable: BTreeSet<Region>,
    /// Regions sent to it since its last flush.
    unflushed: BTreeMap<Region, Unflushed>,
    attach_sent: Option<u64>,
    copying: Option<Copying>,
    join_flush: Option<JoinFlush>,
    flushed: bool,
    /// When it was last asked to flush because it is failing but kept in
    /// sync (see `probe`).
    probed: u64,
    /// It takes [`Request::Verify`] (its last attach said so).
    verifies: bool,
    /// How far scrub passes got on it (its last attach said so).
    scrubbed: CheckMark,
}

impl Link {
    fn new(phase: Phase, boot: u64) -> Self {
        Link {
            phase,
            since: 0,
            conn: 0,
            boot,
            failing: false,
            lost: false,
            dirty: BTreeSet::new(),
            unreadable: BTreeSet::new(),
            unflushed: BTreeMap::new(),
            attach_sent: None,
            copying: None,
            join_flush: None,
            flushed: false,
            probed: 0,
            verifies: false,
            scrubbed: CheckMark::default(),
        }
    }

    /// It answered: it no longer counts as failing, unless it restarted
    /// (lost writes) or cannot read a region.
    fn answered(&mut self) {
        if !self.lost && self.unreadable.is_empty() {
            self.failing = false;
        }
    }

    fn go_out(&mut self) {
        self.phase = Phase::Out;
        self.dirty.extend(self.unflushed.keys().copied());
        self.dirty.append(&mut self.unreadable);
        self.unflushed.clear();
        self.failing = false;
        self.lost = false;
        self.attach_sent = None;
        self.copying = None;
        self.join_flush = None;
        self.flushed = false;
    }

    /// Whether it holds, not yet flushed, a write that a flush promises
    /// stable: one issued at or before `upto` (see `promised_upto`), or a
    /// rebuilt region (older data).
    fn owes_stability(&self, epoch: u64, upto: u64) -> bool {
        self.unflushed
            .values()
            .any(|u| u.oldest.epoch < epoch || u.oldest.seq <= upto)
    }

    /// Whether it may join the in-sync set: rebuilt, everything sent to it
    /// acknowledged, and everything a flush (acknowledged or pending)
    /// covers stable.
    fn is_joiner(&self, epoch: u64, upto: u64) -> bool {
        self.phase == Phase::Rebuilding
            && self.flushed
            && !self.owes_stability(epoch, upto)
            && !self.failing
            && self.dirty.is_empty()
            && self.copying.is_none()
            && self.unflushed.values().all(|u| u.acked)
    }
}

/// What a copy may hold only in memory in one region.
#[derive(Debug, Clone, Copy)]
struct Unflushed {
    /// No older write of the region is missing from its stable storage.
    oldest: Tag,
    /// The last write or rebuild sent, and whether it acknowledged it.
    latest: Tag,
    acked: bool,
}

impl Link {
    /// Notes a write or rebuild of `region` sent to this copy.
    fn sent(&mut self, region: Region, tag: Tag) {
        let u = self.unflushed.entry(region).or_insert(Unflushed {
            oldest: tag,
            latest: tag,
            acked: false,
        });
        u.latest = tag;
        u.acked = false;
    }

    /// A flush covering `latest` of `region` reached stable storage.
    fn stable(&mut self, region: Region, latest: Tag) {
        if let Some(u) = self.unflushed.get_mut(&region) {
            if u.latest == latest {
                self.unflushed.remove(&region);
            } else {
                u.oldest = latest;
            }
        }
    }
}

/// The flush that ends a rebuild.
#[derive(Debug, Clone)]
struct JoinFlush {
    id: u64,
    sent: u64,
    covers: Vec<(Region, Tag)>,
}

#[derive(Debug, Clone)]
struct PendingWrite {
    region: Region,
    /// Acknowledged to the user; kept until copies being rebuilt have it
    /// too (or drop out).
    acked: bool,
    waiting: BTreeSet<String>,
    issued: u64,
    last_sent: u64,
}

#[derive(Debug, Clone)]
struct PendingFlush {
    /// The write sequence number when it was issued.
    upto: u64,
    waiting: BTreeSet<String>,
    covers: BTreeMap<String, Vec<(Region, Tag)>>,
    issued: u64,
    last_sent: u64,
}

/// When the step after one started at `at` (thousandths of a tick) may
/// start, for steps `gap` apart that were due at `due`: a gap after the
/// due time, so that ticks round no gap up and the pace holds on average;
/// a gap after the start when that came over a tick late (the step waited
/// for something else), so a late pace never catches up in a burst.
fn paced(due: u64, at: u64, gap: u64) -> u64 {
    if at > due.saturating_add(1000) {
        at
    } else {
        due
    }
    .saturating_add(gap)
}

/// A scrub pass (see [`Engine::scrub`]).
#[derive(Debug, Clone)]
struct Scrub {
    /// The next region to check.
    next: Region,
    /// Thousandths of a tick from the start of one region's check to the
    /// next.
    gap: u64,
    /// When the next region's check may start, in thousandths of a tick:
    /// a gap after the last one's due time, so that ticks round no gap
    /// up and the pace holds on average; a gap after the last one's start
    /// when that started over a tick late (it waited for a region's
    /// writes, or for a copy out of sync), so the pass never catches up
    /// in a burst.
    due: u64,
    /// The region the pass waits for (writes of it in flight) or checks:
    /// no new write of it starts meanwhile, so a region written without
    /// pause is checked too.
    held: Option<Region>,
    checking: Option<Checking>,
}

/// One region being checked on the copies in sync: the engine holds it
/// (no write of it starts) until every copy asked answered, failed or
/// left, or the timeout passed.
#[derive(Debug, Clone)]
struct Checking {
    region: Region,
    id: u64,
    asked: BTreeSet<String>,
    answers: BTreeMap<String, (Tag, Digest)>,
    /// Copies that could not read it.
    failed: Vec<String>,
    sent: u64,
}

#[derive(Debug, Clone)]
struct PendingRead {
    region: Region,
    from: String,
    issued: u64,
    last_sent: u64,
}

/// What a write's settling depends on besides its own `waiting`: each
/// copy's name and whether it is out, and the required copies. While these
/// stay the same, a write nobody answered since settles as it did.
#[derive(Debug)]
struct SettledUnder {
    copies: Vec<(String, bool)>,
    required: BTreeSet<String>,
}

impl SettledUnder {
    fn new(links: &BTreeMap<String, Link>, required: BTreeSet<String>) -> Self {
        let copies = links
            .iter()
            .map(|(n, l)| (n.clone(), l.phase == Phase::Out))
            .collect();
        SettledUnder { copies, required }
    }

    fn holds(&self, links: &BTreeMap<String, Link>, required: &BTreeSet<String>) -> bool {
        self.required == *required
            && self.copies.len() == links.len()
            && self
                .copies
                .iter()
                .zip(links)
                .all(|((c, out), (n, l))| c == n && *out == (l.phase == Phase::Out))
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    state: EngineState,
    ballot: Ballot,
    record: ReplicaRecord,
    links: BTreeMap<String, Link>,
    proposer: Option<Proposer>,
    start_replies: BTreeMap<String, (u64, BTreeMap<Region, Tag>)>,
    /// In-sync copies whose attach could not be delivered at all.
    start_unreachable: BTreeSet<String>,
    /// Regions each copy that answered the attach said its disk could not
    /// read (see [`Reply::Attached`]).
    start_unreadable: BTreeMap<String, BTreeSet<Region>>,
    attach_deadline: u64,
    reseed: Option<(String, u64)>,
    /// A copy refused a request as from an older epoch.
    suspect_fenced: bool,
    /// Told the record may have changed (members): read it again with
    /// the next change.
    relearn: bool,
    /// When a copy out of sync last said it is none (see `not_a_copy`).
    not_a_copy_at: Option<u64>,
    /// The `upto` of the newest acknowledged flush.
    flushed_upto: u64,
    writes: BTreeMap<u64, PendingWrite>,
    /// Writes whose `waiting` changed (or that are new) since the last
    /// [`Engine::settle`] looked at them.
    unsettled: Vec<u64>,
    /// What the last [`Engine::settle`] that looked at every write saw.
    settled_under: Option<SettledUnder>,
    flushes: BTreeMap<u64, PendingFlush>,
    reads: BTreeMap<u64, PendingRead>,
    scrub: Option<Scrub>,
    /// When the next region's rebuild may start, in thousandths of a tick
    /// (see [`EngineConfig::rebuild_gap`]).
    rebuild_due: u64,
    seq: u64,
    next_id: u64,
    now: u64,
    out: Vec<Envelope>,
    events: Vec<EngineEvent>,
}

impl Engine {
    /// Starts an engine on the owner node from the record (chosen at
    /// `ballot`) that ControllerPublish returned. It first takes an epoch
    /// of its own; I/O waits for [`EngineEvent::Ready`].
    pub fn new(cfg: EngineConfig, ballot: Ballot, record: ReplicaRecord, now: u64) -> Self {
        let (p, out) = start_change(&cfg, &record, ballot.round, now);
        Engine {
            state: EngineState::Starting,
            ballot,
            links: BTreeMap::new(),
            proposer: Some(p),
            start_replies: BTreeMap::new(),
            start_unreachable: BTreeSet::new(),
            start_unreadable: BTreeMap::new(),
            attach_deadline: 0,
            reseed: None,
            suspect_fenced: false,
            relearn: false,
            not_a_copy_at: None,
            flushed_upto: 0,
            writes: BTreeMap::new(),
            unsettled: Vec::new(),
            settled_under: None,
            flushes: BTreeMap::new(),
            reads: BTreeMap::new(),
            scrub: None,
            rebuild_due: 0,
            seq: 0,
            next_id: 0,
            now,
            out,
            events: Vec::new(),
            record,
            cfg,
        }
    }

    pub fn state(&self) -> EngineState {
        self.state
    }

    /// The engine's epoch once it started (before: the publication's).
    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    /// The newest record this engine knows to be chosen.
    pub fn record(&self) -> &ReplicaRecord {
        &self.record
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// Whether nothing is in flight: no write, flush, read or change.
    pub fn idle(&self) -> bool {
        self.writes.is_empty()
            && self.flushes.is_empty()
            && self.reads.is_empty()
            && self.proposer.is_none()
    }

    /// Every copy the engine tracks (none before it starts attaching), in
    /// node order. Read-only: for status and metrics.
    pub fn copies(&self) -> Vec<CopyView> {
        self.links
            .iter()
            .map(|(n, l)| CopyView {
                node: n.clone(),
                phase: match l.phase {
                    Phase::InSync => CopyPhase::InSync,
                    Phase::Out => CopyPhase::Out,
                    Phase::Rebuilding => CopyPhase::Rebuilding,
                },
                failing: l.failing,
                dirty: l.dirty.len(),
                boot: l.boot,
            })
            .collect()
    }

    /// Whether every copy is in sync and nothing is being rebuilt.
    pub fn all_in_sync(&self) -> bool {
        self.links
            .values()
            .all(|l| l.phase == Phase::InSync && !l.failing)
            && self.record.in_sync.len() == self.record.copies().count()
    }

    /// The volume grew to `regions` regions (its record already says so:
    /// ControllerExpandVolume chose it). The new regions read as zeros on
    /// every copy, so none is dirty. Never shrinks.
    pub fn grow(&mut self, regions: u32) {
        self.cfg.regions = self.cfg.regions.max(regions);
    }

    /// Whether the write with sequence number `seq` (of this engine's
    /// epoch) may still be sent to a copy: the data path keeps its bytes
    /// until then.
    pub fn write_pending(&self, seq: u64) -> bool {
        self.writes.contains_key(&seq)
    }

    /// Whether some copy is being rebuilt with `tag` of `region`: the data
    /// path keeps the bytes it read for that rebuild until then.
    pub fn copying(&self, region: Region, tag: Tag) -> bool {
        self.links.values().any(|l| {
            l.copying
                .as_ref()
                .is_some_and(|c| c.region == region && c.tag == Some(tag))
        })
    }

    /// The transport could not reach `node` (connection refused or reset,
    /// deadline passed): it counts as failed at once instead of after the
    /// timeout, as an unanswered request would.
    pub fn unreachable(&mut self, node: &str) {
        match self.state {
            EngineState::Running => {
                self.fail(node, false);
                self.settle();
            }
            // Not waited for until the deadline (see `start_ready`).
            EngineState::Attaching if self.record.in_sync.contains_key(node) => {
                self.start_unreachable.insert(node.to_owned());
                if self.start_ready() {
                    self.decide_start();
                }
            }
            _ => {}
        }
    }

    /// A read sent to `node` (read `id`: a user's, a rebuild's or a
    /// scrub's check) failed there: an I/O error on its disk, or no
    /// answer. When another copy in sync can serve the region, the copy
    /// counts as failed until it went out of sync, and the region is
    /// rebuilt on it then (written again: a disk remaps a bad sector when
    /// it is written); a user's read goes at once to that other copy. When
    /// no other copy can, the copy is left as it is (failing it would stop
    /// every read, not this one): the read waits for its resend or timeout,
    /// as any read, and a rebuild or check of the region cannot complete.
    pub fn read_failed(&mut self, node: &str, id: u64) {
        let user = self
            .reads
            .get(&id)
            .filter(|r| r.from == node)
            .map(|r| r.region);
        let rebuild = self
            .links
            .values()
            .filter_map(|l| l.copying.as_ref())
            .find(|c| c.read == id)
            .map(|c| c.region);
        let check = self
            .scrub
            .as_mut()
            .and_then(|s| s.checking.as_mut())
            .filter(|c| c.id == id && c.asked.contains(node));
        let check = check.map(|c| {
            c.failed.push(node.to_owned());
            c.region
        });
        if !self.elsewhere(node) {
            if check.is_some() {
                self.check_done();
            }
            return;
        }
        match user.or(rebuild).or(check) {
            Some(region) => self.region_failed(node, region),
            None => self.unreachable(node),
        }
        let Some(region) = user else {
            return;
        };
        if self.state != EngineState::Running {
            return;
        }
        if let Some(from) = self.source().filter(|s| s != node) {
            let io = self.io(&from);
            let r = self.reads.get_mut(&id).expect("pending");
            r.from = from.clone();
            r.last_sent = self.now;
            self.send(&from, Request::Read { io, region, id });
        }
    }

    /// `node`'s copy could not read `region` when this node read its own
    /// copy directly (see [`Engine::local_read`]): as
    /// [`Engine::read_failed`], but with no read of the engine's to send
    /// elsewhere (the caller's next [`Engine::read`] of the region goes to
    /// another copy, since this one now counts as failing).
    pub fn region_failed(&mut self, node: &str, region: Region) {
        if !self.elsewhere(node) {
            return;
        }
        if let Some(l) = self.links.get_mut(node)
            && l.phase == Phase::InSync
        {
            l.unreadable.insert(region);
        }
        self.unreachable(node);
    }

    /// Whether a copy other than `node` is in sync and not failing.
    fn elsewhere(&self, node: &str) -> bool {
        self.links
            .iter()
            .any(|(n, l)| n != node && l.phase == Phase::InSync && !l.failing)
    }

    /// Whether the start may be decided before the deadline: every in-sync
    /// copy answered, or could not be reached at all while another in-sync
    /// copy answered at its recorded boot (a copy whose node refuses
    /// connections would only be marked out of sync at the deadline).
    fn start_ready(&self) -> bool {
        let waiting =
            self.record.in_sync.keys().any(|n| {
                !self.start_replies.contains_key(n) && !self.start_unreachable.contains(n)
            });
        !waiting
            && (self.start_unreachable.is_empty()
                || self
                    .start_replies
                    .iter()
                    .any(|(n, (boot, _))| self.record.in_sync_at(n, *boot)))
    }

    /// The record may have changed (the controller changed the members):
    /// the engine makes a change of its own as soon as it runs, which
    /// reads the newest record from a majority and brings the copies in
    /// line with it: copies that joined are rebuilt in full while I/O
    /// goes on, removed ones get nothing more.
    pub fn refresh(&mut self) {
        self.relearn = true;
    }

    /// `node` answered that it holds no copy of the volume (or refused as
    /// not a copy). For a copy in sync or being rebuilt this is a failure
    /// like any other; for one out of sync, which the engine keeps asking
    /// to attach, it means the members changed without the engine hearing
    /// (the controller's Refresh is best effort): the engine reads the
    /// record again with a change of its own, at most once per timeout.
    pub fn not_a_copy(&mut self, node: &str) {
        let out = self.links.get(node).is_some_and(|l| l.phase == Phase::Out);
        if !out {
            self.unreachable(node);
            return;
        }
        let due = self
            .not_a_copy_at
            .is_none_or(|t| self.now >= t + self.cfg.timeout);
        if self.state == EngineState::Running && due {
            self.not_a_copy_at = Some(self.now);
            self.relearn = true;
        }
    }

    /// Takes what to send and what happened since the last call.
    pub fn drain(&mut self) -> (Vec<Envelope>, Vec<EngineEvent>) {
        (
            std::mem::take(&mut self.out),
            std::mem::take(&mut self.events),
        )
    }

    fn io(&self, node: &str) -> Io {
        let l = &self.links[node];
        Io {
            epoch: self.record.epoch,
            boot: l.boot,
            conn: l.conn,
        }
    }

    fn send(&mut self, to: &str, msg: Request) {
        self.out.push(Envelope {
            to: to.to_owned(),
            msg,
        });
    }

    fn busy(&self, region: Region) -> bool {
        self.busy_io(region) || self.scrub.as_ref().is_some_and(|s| s.held == Some(region))
    }

    /// Whether a write or a rebuild of `region` is in flight.
    fn busy_io(&self, region: Region) -> bool {
        self.writes.values().any(|w| !w.acked && w.region == region)
            || self
                .links
                .values()
                .any(|l| l.copying.as_ref().is_some_and(|c| c.region == region))
    }

    /// Copies whose acknowledgement a write or flush needs: the in-sync set
    /// of the chosen record and of a change in flight (a copy being added
    /// must have every write acknowledged from the moment it is proposed).
    fn required(&self) -> BTreeSet<String> {
        let mut r: BTreeSet<String> = self.record.in_sync.keys().cloned().collect();
        if let Some(Change::SetInSync { in_sync, .. }) = self.proposer.as_ref().map(|p| p.change())
        {
            r.extend(in_sync.keys().cloned());
        }
        r
    }

    /// Where reads and rebuilds read from: the local copy when it is in
    /// sync, else the first in-sync copy that is not failing.
    fn source(&self) -> Option<String> {
        let ok = |n: &str| {
            self.links
                .get(n)
                .is_some_and(|l| l.phase == Phase::InSync && !l.failing)
        };
        if ok(&self.cfg.node) {
            return Some(self.cfg.node.clone());
        }
        self.links.keys().find(|n| ok(n)).cloned()
    }

    /// Starts a write of `region`; its outcome comes as an event.
    pub fn write(&mut self, region: Region) -> Result<Tag, IoError> {
        self.check_io(region)?;
        self.seq += 1;
        let tag = Tag {
            epoch: self.record.epoch,
            seq: self.seq,
        };
        let mut waiting = BTreeSet::new();
        let nodes: Vec<String> = self.links.keys().cloned().collect();
        for n in nodes {
            let l = self.links.get_mut(&n).expect("listed");
            match l.phase {
                Phase::Out => {
                    l.dirty.insert(region);
                }
                Phase::InSync | Phase::Rebuilding => {
                    l.sent(region, tag);
                    waiting.insert(n.clone());
                    let io = self.io(&n);
                    self.send(&n, Request::Write { io, region, tag });
                }
            }
        }
        self.writes.insert(
            self.seq,
            PendingWrite {
                region,
                acked: false,
                waiting,
                issued: self.now,
                last_sent: self.now,
            },
        );
        self.unsettled.push(self.seq);
        self.settle();
        Ok(tag)
    }

    /// Starts a flush of every write acknowledged so far. It also goes to
    /// copies being rebuilt: one that has not flushed when the flush is
    /// acknowledged must flush again before it may join.
    pub fn flush(&mut self) -> Result<u64, IoError> {
        if self.state != EngineState::Running {
            return Err(IoError::NotRunning);
        }
        self.next_id += 1;
        let id = self.next_id;
        let mut f = PendingFlush {
            upto: self.seq,
            waiting: BTreeSet::new(),
            covers: BTreeMap::new(),
            issued: self.now,
            last_sent: self.now,
        };
        let required = self.required();
        let nodes: Vec<String> = self.links.keys().cloned().collect();
        for n in nodes {
            let l = &self.links[&n];
            if !(required.contains(&n) || l.phase == Phase::Rebuilding) || l.phase == Phase::Out {
                continue;
            }
            f.covers.insert(n.clone(), covered(l));
            f.waiting.insert(n.clone());
            let io = self.io(&n);
            self.send(&n, Request::Flush { io, id });
        }
        self.flushes.insert(id, f);
        self.settle();
        Ok(id)
    }

    /// The `Io` of a read from this node's own copy when [`Engine::read`]
    /// would read there now (running, the local copy in sync and not
    /// failing), so the caller may read it directly; `None` otherwise.
    pub fn local_read(&self) -> Option<Io> {
        if self.state != EngineState::Running {
            return None;
        }
        (self.source().as_deref() == Some(self.cfg.node.as_str())).then(|| self.io(&self.cfg.node))
    }

    /// Starts a read of `region` from the local copy when it is in sync,
    /// else from an in-sync copy.
    pub fn read(&mut self, region: Region) -> Result<u64, IoError> {
        if self.state != EngineState::Running {
            return Err(IoError::NotRunning);
        }
        if region >= self.cfg.regions {
            return Err(IoError::OutOfRange(region));
        }
        let from = self.source().ok_or(IoError::NoCopy)?;
        self.next_id += 1;
        let id = self.next_id;
        let io = self.io(&from);
        self.send(&from, Request::Read { io, region, id });
        self.reads.insert(
            id,
            PendingRead {
                region,
                from,
                issued: self.now,
                last_sent: self.now,
            },
        );
        Ok(id)
    }

    fn check_io(&self, region: Region) -> Result<(), IoError> {
        if self.state != EngineState::Running {
            return Err(IoError::NotRunning);
        }
        if region >= self.cfg.regions {
            return Err(IoError::OutOfRange(region));
        }
        if self.busy(region) {
            return Err(IoError::Busy(region));
        }
        Ok(())
    }

    /// A voter answered.
    pub fn handle(&mut self, from: &str, reply: Reply) {
        if matches!(self.state, EngineState::Fenced | EngineState::Failed) {
            return;
        }
        match reply {
            Reply::Promise { .. } | Reply::Nack { .. } | Reply::Accepted { .. } => {
                if let Some(p) = self.proposer.as_mut() {
                    let (out, outcome) = p.handle(from, &reply);
                    self.out.extend(out);
                    if let Some(o) = outcome {
                        self.proposer = None;
                        self.on_outcome(o);
                    }
                }
            }
            Reply::Attached {
                conn,
                boot,
                tags,
                verifies,
                unreadable,
                scrubbed,
            } => {
                if let Some(l) = self.links.get_mut(from)
                    && l.conn == conn
                {
                    l.verifies = verifies;
                    l.scrubbed = scrubbed;
                }
                self.attached(from, conn, boot, tags, unreadable)
            }
            Reply::Verified {
                conn,
                id,
                region,
                tag,
                digest,
            } => {
                if !self.current(from, conn) {
                    return;
                }
                self.links.get_mut(from).expect("current").answered();
                if let Some(c) = self.scrub.as_mut().and_then(|s| s.checking.as_mut())
                    && c.id == id
                    && c.region == region
                    && c.asked.contains(from)
                {
                    c.answers.insert(from.to_owned(), (tag, digest));
                }
                self.check_done();
            }
            Reply::Written { conn, region, tag } | Reply::Rebuilt { conn, region, tag } => {
                if !self.current(from, conn) {
                    return;
                }
                // Only a Rebuild carries the whole region: a user write
                // with the same tag (sent to the copy before the rebuild
                // read the region) may have filled only part of it.
                let whole = matches!(reply, Reply::Rebuilt { .. });
                let l = self.links.get_mut(from).expect("current");
                l.answered();
                let copying = l
                    .copying
                    .as_ref()
                    .is_some_and(|c| c.region == region && c.tag == Some(tag));
                // Nor does such a write make the rebuilt region count as
                // on the copy (a flush would otherwise cover it before the
                // Rebuild lands).
                if let Some(u) = l.unflushed.get_mut(&region)
                    && u.latest == tag
                    && (whole || !copying)
                {
                    u.acked = true;
                }
                if whole && copying {
                    l.dirty.remove(&region);
                    l.copying = None;
                }
                if tag.epoch == self.record.epoch
                    && let Some(w) = self.writes.get_mut(&tag.seq)
                    && w.waiting.remove(from)
                {
                    self.unsettled.push(tag.seq);
                }
            }
            Reply::Flushed { conn, id } => {
                if !self.current(from, conn) {
                    return;
                }
                let l = self.links.get_mut(from).expect("current");
                l.answered();
                let mut covers = Vec::new();
                if l.join_flush.as_ref().is_some_and(|j| j.id == id) {
                    covers = l.join_flush.take().expect("some").covers;
                    l.flushed = true;
                }
                if let Some(f) = self.flushes.get_mut(&id)
                    && f.waiting.remove(from)
                {
                    covers.extend(f.covers.remove(from).unwrap_or_default());
                }
                for (region, tag) in covers {
                    l.stable(region, tag);
                }
            }
            Reply::ReadData {
                conn,
                id,
                region,
                tag,
            } => {
                if !self.current(from, conn) {
                    return;
                }
                let l = self.links.get_mut(from).expect("current");
                l.answered();
                if l.phase == Phase::InSync && self.reads.get(&id).is_some_and(|r| r.from == from) {
                    self.reads.remove(&id);
                    self.events.push(EngineEvent::ReadDone { id, region, tag });
                    return;
                }
                // A rebuild's read: copy what the source holds.
                let targets: Vec<String> = self
                    .links
                    .iter()
                    .filter(|(_, l)| {
                        l.copying
                            .as_ref()
                            .is_some_and(|c| c.read == id && c.tag.is_none())
                    })
                    .map(|(n, _)| n.clone())
                    .collect();
                for t in targets {
                    let now = self.now;
                    let l = self.links.get_mut(&t).expect("listed");
                    let c = l.copying.as_mut().expect("filtered");
                    c.tag = Some(tag);
                    c.sent_at = now;
                    l.sent(region, tag);
                    let io = self.io(&t);
                    self.send(&t, Request::Rebuild { io, region, tag });
                }
            }
            Reply::Refused { conn, why } if self.state == EngineState::Attaching => {
                // A copy holds a newer record than the one the engine
                // attaches with (the controller changed it meanwhile):
                // waiting for its answer would wait for ever.
                let attaching = self.links.get(from).is_some_and(|l| l.conn == conn);
                if attaching && !matches!(why, IoRefusal::StaleConn) {
                    self.restart();
                }
            }
            Reply::Refused { conn, why } => {
                let attaching = self
                    .links
                    .get(from)
                    .is_some_and(|l| l.conn == conn && l.phase == Phase::Out);
                match why {
                    IoRefusal::NotACopy if attaching => self.not_a_copy(from),
                    // A copy out of sync holds a record of a later epoch:
                    // as for a copy in sync (below), confirm on a
                    // majority. An engine idle but for its attaches to
                    // that copy would otherwise never learn it is fenced.
                    IoRefusal::Fenced { .. } if attaching => self.suspect_fenced = true,
                    _ => {}
                }
                if !self.current(from, conn) {
                    return;
                }
                match why {
                    IoRefusal::Behind { .. } => {
                        let msg = Request::Commit {
                            ballot: self.ballot.clone(),
                            record: self.record.clone(),
                        };
                        self.send(from, msg);
                    }
                    IoRefusal::WrongBoot { .. } => self.fail(from, true),
                    IoRefusal::Fenced { .. } => {
                        // Confirm on a majority: either the engine is fenced
                        // or the copy's newer record is not chosen (and the
                        // next change overwrites it).
                        self.suspect_fenced = true;
                        self.fail(from, false)
                    }
                    IoRefusal::StaleConn | IoRefusal::NotACopy => self.fail(from, false),
                }
            }
        }
        self.settle();
    }

    fn current(&self, from: &str, conn: u64) -> bool {
        self.links
            .get(from)
            .is_some_and(|l| l.conn == conn && l.phase != Phase::Out)
    }

    fn attached(
        &mut self,
        from: &str,
        conn: u64,
        boot: u64,
        tags: BTreeMap<Region, Tag>,
        unreadable: Vec<Region>,
    ) {
        let Some(l) = self.links.get_mut(from) else {
            return;
        };
        if l.conn != conn {
            return;
        }
        // What its disk could not read is rebuilt there (written again).
        let regions = self.cfg.regions;
        let unreadable: BTreeSet<Region> =
            unreadable.into_iter().filter(|r| *r < regions).collect();
        match self.state {
            EngineState::Attaching => {
                self.start_unreadable.insert(from.to_owned(), unreadable);
                self.start_replies.insert(from.to_owned(), (boot, tags));
                self.start_unreachable.remove(from);
                if self.start_ready() {
                    self.decide_start();
                }
            }
            EngineState::Running if l.phase == Phase::Out && l.attach_sent.is_some() => {
                l.phase = Phase::Rebuilding;
                l.boot = boot;
                l.attach_sent = None;
                l.dirty.extend(unreadable);
            }
            _ => {}
        }
    }

    /// A copy failed to answer in time or refused: a required copy is to be
    /// marked out of sync; a copy being rebuilt starts over.
    fn fail(&mut self, node: &str, lost: bool) {
        let required = self.required();
        let Some(l) = self.links.get_mut(node) else {
            return;
        };
        match l.phase {
            Phase::Out => {}
            Phase::InSync => {
                l.failing = true;
                l.lost |= lost;
            }
            Phase::Rebuilding if required.contains(node) => {
                l.failing = true;
                l.lost |= lost;
            }
            Phase::Rebuilding => l.go_out(),
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Refused { refusal, .. } => {
                self.stop(EngineState::Fenced);
                self.events.push(EngineEvent::Fenced { refusal });
            }
            Outcome::Chosen { ballot, record } => {
                self.ballot = ballot.clone();
                self.record = record.clone();
                self.events.push(EngineEvent::Chosen { ballot, record });
                self.follow_members();
                match self.state {
                    EngineState::Starting => self.begin_attach(),
                    EngineState::Settling => {
                        self.apply_in_sync();
                        self.state = EngineState::Running;
                        if let Some((base, boot)) = self.reseed.take() {
                            self.events.push(EngineEvent::Reseeded { base, boot });
                        }
                        self.events.push(EngineEvent::Ready {
                            epoch: self.record.epoch,
                        });
                    }
                    _ => self.apply_in_sync(),
                }
            }
        }
    }

    /// Brings the links in line with the chosen record's copies: a copy
    /// that joined starts out of sync with every region dirty (a full
    /// rebuild), a removed one is forgotten (nothing waits for it).
    /// Before the engine attaches, `begin_attach` makes the links.
    fn follow_members(&mut self) {
        if self.state == EngineState::Starting {
            return;
        }
        let copies: BTreeMap<String, u64> = self.record.copy_since();
        let gone: Vec<String> = self
            .links
            .iter()
            .filter(|(n, l)| copies.get(*n) != Some(&l.since))
            .map(|(n, _)| n.clone())
            .collect();
        let mut conns = BTreeMap::new();
        for n in gone {
            // A copy made again under the same name: its link starts over
            // (a full rebuild) but its connection numbers keep rising, so
            // no late answer of the old copy counts for the new one.
            let old = self.links.remove(&n).expect("listed");
            conns.insert(n.clone(), old.conn);
            self.start_replies.remove(&n);
            for w in self.writes.values_mut() {
                w.waiting.remove(&n);
            }
            for f in self.flushes.values_mut() {
                f.waiting.remove(&n);
                f.covers.remove(&n);
            }
        }
        for (c, since) in copies {
            if !self.links.contains_key(&c) {
                let mut l = Link::new(Phase::Out, 0);
                l.since = since;
                l.conn = conns.get(&c).copied().unwrap_or(0);
                l.dirty = (0..self.cfg.regions).collect();
                self.links.insert(c, l);
            }
        }
    }

    /// Brings the links in line with the chosen record's in-sync set.
    fn apply_in_sync(&mut self) {
        for (n, l) in self.links.iter_mut() {
            match self.record.in_sync.get(n) {
                Some(&boot) if l.phase != Phase::InSync => {
                    l.phase = Phase::InSync;
                    l.boot = boot;
                    l.dirty.clear();
                    l.copying = None;
                    l.join_flush = None;
                    l.flushed = false;
                }
                None if l.phase == Phase::InSync => l.go_out(),
                None if l.phase == Phase::Rebuilding && l.failing => l.go_out(),
                _ => {}
            }
        }
    }

    fn begin_attach(&mut self) {
        self.state = EngineState::Attaching;
        self.start_replies.clear();
        self.start_unreadable.clear();
        self.start_unreachable.clear();
        self.attach_deadline = self.now + self.cfg.timeout;
        for (c, since) in self.record.copy_since() {
            let boot = self.record.in_sync.get(&c).copied();
            let l = self.links.entry(c.clone()).or_insert_with(|| Link {
                since,
                ..Link::new(Phase::Out, 0)
            });
            l.conn += 1;
            if boot.is_none() {
                l.go_out();
                l.dirty = (0..self.cfg.regions).collect();
                continue;
            }
            let msg = Request::Attach {
                ballot: self.ballot.clone(),
                record: self.record.clone(),
                conn: l.conn,
            };
            self.send(&c, msg);
        }
    }

    /// Starts over from the newest record: takes an epoch again (the
    /// change reads the newest record from a majority), then attaches the
    /// copies it names. Only before the engine first runs (no I/O yet).
    fn restart(&mut self) {
        let (p, out) = start_change(&self.cfg, &self.record, self.ballot.round, self.now);
        self.state = EngineState::Starting;
        self.links.clear();
        self.start_replies.clear();
        self.start_unreadable.clear();
        self.start_unreachable.clear();
        self.reseed = None;
        self.relearn = false;
        self.proposer = Some(p);
        self.out.extend(out);
    }

    /// Every in-sync copy answered (or the time ran out): keep in sync the
    /// copies that did not restart and hold what the source holds; the
    /// others are rebuilt. If all restarted, one becomes the base.
    fn decide_start(&mut self) {
        let mut good: BTreeMap<String, BTreeMap<Region, Tag>> = self
            .start_replies
            .iter()
            .filter(|(n, (boot, _))| self.record.in_sync_at(n, *boot))
            .map(|(n, (_, tags))| (n.clone(), tags.clone()))
            .collect();
        if good.is_empty() {
            // Reseed only when every in-sync copy answered and all of them
            // restarted; one that did not answer may still hold everything.
            let all_answered = self
                .record
                .in_sync
                .keys()
                .all(|n| self.start_replies.contains_key(n));
            let first = self.start_replies.first_key_value();
            let (Some((base, (boot, tags))), true) = (first, all_answered) else {
                self.begin_attach();
                return;
            };
            self.reseed = Some((base.clone(), *boot));
            good.insert(base.clone(), tags.clone());
        }
        // The base: this node's copy if it can read all it holds, else
        // another that can (so the regions this one cannot read are
        // rebuilt here now, not left until a read fails on them), else
        // this node's copy or any.
        let whole = |n: &String| self.start_unreadable.get(n).is_none_or(BTreeSet::is_empty);
        let local = good.get_key_value(&self.cfg.node).map(|(n, _)| n);
        let source = local
            .filter(|n| whole(n))
            .or_else(|| good.keys().find(|n| whole(n)))
            .or(local)
            .unwrap_or_else(|| good.keys().next().expect("not empty"))
            .clone();
        let base = good[&source].clone();
        let mut in_sync = BTreeMap::new();
        let all: BTreeSet<Region> = (0..self.cfg.regions).collect();
        for (n, l) in self.links.iter_mut() {
            if self.record.in_sync.contains_key(n) || self.reseed.is_some() {
                l.go_out();
                l.dirty = match good.get(n) {
                    Some(tags) => all
                        .iter()
                        .copied()
                        .filter(|r| tags.get(r) != base.get(r))
                        .collect(),
                    None => all.clone(),
                };
                // Regions its disk could not read are written again from
                // the source (which has nothing to read them from).
                if *n != source
                    && let Some(bad) = self.start_unreadable.get(n)
                {
                    l.dirty.extend(bad.iter().copied());
                }
                if let Some((boot, _)) = self.start_replies.get(n)
                    && good.contains_key(n)
                    && l.dirty.is_empty()
                {
                    l.phase = Phase::InSync;
                    l.boot = *boot;
                    in_sync.insert(n.clone(), *boot);
                }
            }
        }
        if in_sync == self.record.in_sync {
            self.state = EngineState::Running;
            self.events.push(EngineEvent::Ready {
                epoch: self.record.epoch,
            });
            return;
        }
        self.state = EngineState::Settling;
        self.propose(in_sync);
    }

    fn propose(&mut self, in_sync: BTreeMap<String, u64>) {
        let change = Change::SetInSync {
            node: self.cfg.node.clone(),
            epoch: self.record.epoch,
            in_sync,
            copies: self.record.copy_since(),
        };
        let (p, out) = Proposer::new(
            &self.cfg.id,
            change,
            &self.record,
            self.ballot.round,
            self.now,
            self.cfg.timeout,
        );
        self.proposer = Some(p);
        self.out.extend(out);
    }

    fn stop(&mut self, state: EngineState) {
        self.state = state;
        self.proposer = None;
        let writes = std::mem::take(&mut self.writes);
        self.unsettled.clear();
        for (&seq, w) in writes.iter().filter(|(_, w)| !w.acked) {
            self.events.push(EngineEvent::WriteFailed {
                region: w.region,
                tag: Tag {
                    epoch: self.record.epoch,
                    seq,
                },
            });
        }
        for seq in writes.into_keys() {
            self.events.push(EngineEvent::Settled { seq });
        }
        for id in std::mem::take(&mut self.flushes).into_keys() {
            self.events.push(EngineEvent::FlushFailed { id });
        }
        for id in std::mem::take(&mut self.reads).into_keys() {
            self.events.push(EngineEvent::ReadFailed { id });
        }
        self.scrub = None;
    }

    /// Time passes: resends, timeouts, rebuild steps and record changes.
    /// `jitter` comes from the caller's randomness (a change's backoff).
    pub fn tick(&mut self, now: u64, jitter: u64) {
        self.now = now;
        if let Some(p) = self.proposer.as_mut() {
            let out = p.tick(now, jitter);
            self.out.extend(out);
        }
        match self.state {
            EngineState::Attaching => {
                if now >= self.attach_deadline {
                    self.decide_start();
                } else {
                    self.resend_attach();
                }
            }
            EngineState::Running => {
                self.tick_writes();
                self.tick_flushes();
                self.tick_reads();
                self.tick_rebuilds();
                self.tick_scrub();
                self.maybe_change();
            }
            _ => {}
        }
        self.settle();
    }

    fn resend_attach(&mut self) {
        let since = self.now + self.cfg.timeout - self.attach_deadline;
        if !since.is_multiple_of(self.cfg.resend) {
            return;
        }
        let nodes: Vec<String> = self
            .record
            .in_sync
            .keys()
            .filter(|n| !self.start_replies.contains_key(*n))
            .cloned()
            .collect();
        for n in nodes {
            let msg = Request::Attach {
                ballot: self.ballot.clone(),
                record: self.record.clone(),
                conn: self.links[&n].conn,
            };
            self.send(&n, msg);
        }
    }

    fn live(&self, n: &str) -> bool {
        self.links
            .get(n)
            .is_some_and(|l| l.phase != Phase::Out && !(l.failing && l.lost))
    }

    fn tick_writes(&mut self) {
        let now = self.now;
        let required = self.required();
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        for (&seq, w) in self.writes.iter_mut() {
            let due = now >= w.last_sent + self.cfg.resend;
            for n in &w.waiting {
                let Some(l) = self.links.get(n) else { continue };
                if l.phase == Phase::Out {
                    continue;
                }
                if now >= w.issued + self.cfg.timeout
                    && (required.contains(n) || l.phase == Phase::Rebuilding)
                {
                    failed.push(n.clone());
                }
                if due {
                    resend.push((n.clone(), w.region, seq));
                }
            }
            if due {
                w.last_sent = now;
            }
        }
        for n in failed {
            self.fail(&n, false);
        }
        for (n, region, seq) in resend {
            if !self.live(&n) {
                continue;
            }
            let tag = Tag {
                epoch: self.record.epoch,
                seq,
            };
            let io = self.io(&n);
            self.send(&n, Request::Write { io, region, tag });
        }
    }

    fn tick_flushes(&mut self) {
        let now = self.now;
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        for (&id, f) in self.flushes.iter_mut() {
            let due = now >= f.last_sent + self.cfg.resend;
            for n in &f.waiting {
                if now >= f.issued + self.cfg.timeout {
                    failed.push(n.clone());
                }
                if due {
                    resend.push((n.clone(), id));
                }
            }
            if due {
                f.last_sent = now;
            }
        }
        for n in failed {
            self.fail(&n, false);
        }
        for (n, id) in resend {
            if !self.live(&n) {
                continue;
            }
            let io = self.io(&n);
            self.send(&n, Request::Flush { io, id });
        }
    }

    fn tick_reads(&mut self) {
        let now = self.now;
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        let source = self.source();
        let links = &self.links;
        for (&id, r) in &mut self.reads {
            if now >= r.issued + self.cfg.timeout {
                failed.push(id);
            } else if now >= r.last_sent + self.cfg.resend {
                // Only ever from a copy in sync now: the first one asked
                // may have dropped out (and come back being rebuilt).
                let ok = links
                    .get(&r.from)
                    .is_some_and(|l| l.phase == Phase::InSync && !l.failing);
                if !ok && let Some(s) = &source {
                    r.from = s.clone();
                }
                r.last_sent = now;
                resend.push((r.from.clone(), r.region, id));
            }
        }
        for id in failed {
            self.reads.remove(&id);
            self.events.push(EngineEvent::ReadFailed { id });
        }
        for (n, region, id) in resend {
            if self.links.get(&n).is_some_and(|l| l.phase == Phase::InSync) && self.live(&n) {
                let io = self.io(&n);
                self.send(&n, Request::Read { io, region, id });
            }
        }
    }

    fn tick_rebuilds(&mut self) {
        let now = self.now;
        let nodes: Vec<String> = self.links.keys().cloned().collect();
        for n in nodes {
            let phase = self.links[&n].phase;
            match phase {
                Phase::InSync => self.probe(&n),
                Phase::Out => {
                    let l = self.links.get_mut(&n).expect("listed");
                    if l.attach_sent.is_none_or(|t| now >= t + self.cfg.resend) {
                        l.conn += 1;
                        l.attach_sent = Some(now);
                        let msg = Request::Attach {
                            ballot: self.ballot.clone(),
                            record: self.record.clone(),
                            conn: l.conn,
                        };
                        self.send(&n, msg);
                    }
                }
                Phase::Rebuilding => self.rebuild_step(&n),
            }
        }
    }

    /// Starts a scrub pass at region `from` (0 for a whole pass, or where
    /// an earlier pass stopped), unless one is under way: each region in
    /// turn, starting `gap` thousandths of a tick apart on average (or
    /// once the last one ended), is read by every copy in sync from its
    /// disk and compared by digest (see [`Request::Verify`]). A copy that
    /// cannot read a region, or holds other bytes than a majority of the
    /// copies, is marked out of sync and gets the region written again,
    /// as for a failed read ([`Engine::read_failed`]); see
    /// [`EngineEvent::Scrubbed`]. False when a pass is under way already.
    pub fn scrub(&mut self, from: Region, gap: u64) -> bool {
        if self.scrub.is_some() || !matches!(self.state, EngineState::Running) {
            return false;
        }
        self.scrub = Some(Scrub {
            next: from,
            gap,
            due: self.now.saturating_mul(1000).saturating_add(gap),
            held: None,
            checking: None,
        });
        true
    }

    /// How far scrub passes got, as the copies attached so far say: the
    /// latest whole pass, and where a pass after it stopped (see
    /// [`CheckMark`]).
    pub fn scrubbed(&self) -> CheckMark {
        self.links
            .values()
            .map(|l| l.scrubbed)
            .max()
            .unwrap_or_default()
    }

    /// The next region of the scrub pass under way.
    pub fn scrubbing(&self) -> Option<Region> {
        self.scrub.as_ref().map(|s| s.next)
    }

    fn tick_scrub(&mut self) {
        let now = self.now;
        let Some(s) = self.scrub.as_mut() else {
            return;
        };
        if let Some(c) = s.checking.as_mut() {
            if now >= c.sent + self.cfg.timeout {
                // Copies that never answered count for nothing (their
                // other requests tell whether they failed).
                let answers = &c.answers;
                c.asked.retain(|n| answers.contains_key(n));
            }
            self.check_done();
            return;
        }
        if now.saturating_mul(1000) < s.due {
            return;
        }
        if s.next >= self.cfg.regions {
            self.scrub = None;
            self.events.push(EngineEvent::ScrubDone);
            return;
        }
        // A copy out of sync (or failing) could break a tie between the
        // others, and its rebuild comes first: the pass waits for it.
        if self
            .links
            .values()
            .any(|l| l.phase != Phase::InSync || l.failing)
        {
            return;
        }
        let s = self.scrub.as_mut().expect("checked");
        let region = s.next;
        s.held = Some(region);
        if self.busy_io(region) {
            return;
        }
        let asked: BTreeSet<String> = self
            .links
            .iter()
            .filter(|(_, l)| l.phase == Phase::InSync && !l.failing && l.verifies)
            .map(|(n, _)| n.clone())
            .collect();
        if asked.is_empty() {
            self.scrub.as_mut().expect("checked").held = None;
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        for n in &asked {
            let io = self.io(n);
            self.send(n, Request::Verify { io, region, id });
        }
        let s = self.scrub.as_mut().expect("checked");
        s.due = paced(s.due, now.saturating_mul(1000), s.gap);
        s.checking = Some(Checking {
            region,
            id,
            asked,
            answers: BTreeMap::new(),
            failed: Vec::new(),
            sent: now,
        });
    }

    /// Ends the region's check once every copy asked answered, failed or
    /// left the in-sync set: the copies whose bytes differ from a majority
    /// of those that answered go out of sync and get the region again.
    fn check_done(&mut self) {
        let links = &self.links;
        let Some(s) = self.scrub.as_mut() else {
            return;
        };
        let Some(c) = s.checking.as_mut() else {
            return;
        };
        c.asked.retain(|n| {
            links
                .get(n)
                .is_some_and(|l| l.phase == Phase::InSync && !l.failing)
                && !c.failed.contains(n)
        });
        let asked = &c.asked;
        c.answers.retain(|n, _| asked.contains(n));
        if c.asked.len() != c.answers.len() {
            return;
        }
        let c = s.checking.take().expect("checked");
        s.next = c.region + 1;
        s.held = None;
        let mut groups: BTreeMap<(Tag, Digest), Vec<String>> = BTreeMap::new();
        for (n, a) in c.answers {
            groups.entry(a).or_default().push(n);
        }
        let total: usize = groups.values().map(Vec::len).sum();
        let largest = groups.values().map(Vec::len).max().unwrap_or(0);
        let mut bad = c.failed;
        let mut unresolved = false;
        if groups.len() > 1 {
            if largest * 2 > total {
                let minority = groups.into_values().filter(|g| g.len() != largest);
                let minority: Vec<String> = minority.flatten().collect();
                for n in &minority {
                    let l = self.links.get_mut(n).expect("asked");
                    l.unreadable.insert(c.region);
                }
                for n in &minority {
                    self.fail(n, false);
                }
                bad.extend(minority);
            } else {
                unresolved = true;
            }
        }
        // A copy that could not read the region was failed then (when
        // another could serve it), or is the one left.
        if bad.iter().any(|n| {
            self.links
                .get(n)
                .is_some_and(|l| l.phase == Phase::InSync && !l.failing)
        }) {
            unresolved = true;
        }
        bad.sort();
        self.events.push(EngineEvent::Scrubbed {
            region: c.region,
            bad,
            unresolved,
        });
    }

    /// A copy in sync that failed but is kept in sync (the last one is
    /// never marked out) may have nothing outstanding whose answer would
    /// clear the mark, and while it stands nothing reads from the copy or
    /// rebuilds the others from it. So it is asked for a flush every
    /// resend: an answer shows it back (every write it missed is still
    /// pending and resent), a refusal decides as any other.
    fn probe(&mut self, n: &str) {
        let now = self.now;
        let resend = self.cfg.resend;
        let l = self.links.get_mut(n).expect("listed");
        if !l.failing || l.lost || now < l.probed + resend {
            return;
        }
        l.probed = now;
        self.next_id += 1;
        let id = self.next_id;
        let io = self.io(n);
        self.send(n, Request::Flush { io, id });
    }

    /// One step of rebuilding `n`: copy a dirty region (read it from the
    /// source, write it to `n`), then flush `n`; it then joins on the next
    /// change.
    fn rebuild_step(&mut self, n: &str) {
        let now = self.now;
        let timeout = self.cfg.timeout;
        let resend = self.cfg.resend;
        let l = &self.links[n];
        if l.failing {
            return;
        }
        if let Some(c) = l.copying.clone() {
            if now >= c.started + timeout {
                match c.tag {
                    // The target did not answer.
                    Some(_) => self.fail(n, false),
                    // The source did not: try again (maybe elsewhere).
                    None => self.links.get_mut(n).expect("listed").copying = None,
                }
            } else if now >= c.sent_at + resend {
                self.links
                    .get_mut(n)
                    .expect("listed")
                    .copying
                    .as_mut()
                    .expect("some")
                    .sent_at = now;
                match c.tag {
                    Some(tag) => {
                        let io = self.io(n);
                        self.send(
                            n,
                            Request::Rebuild {
                                io,
                                region: c.region,
                                tag,
                            },
                        );
                    }
                    None => {
                        if let Some(src) = self.source() {
                            let io = self.io(&src);
                            self.send(
                                &src,
                                Request::Read {
                                    io,
                                    region: c.region,
                                    id: c.read,
                                },
                            );
                        }
                    }
                }
            }
            return;
        }
        if let Some(&region) = l.dirty.iter().find(|r| !self.busy(**r)) {
            let at = now.saturating_mul(1000);
            if at < self.rebuild_due {
                return;
            }
            let Some(src) = self.source() else { return };
            if self.cfg.rebuild_gap > 0 {
                self.rebuild_due = paced(self.rebuild_due, at, self.cfg.rebuild_gap);
            }
            self.next_id += 1;
            let read = self.next_id;
            self.links.get_mut(n).expect("listed").copying = Some(Copying {
                region,
                read,
                tag: None,
                sent_at: now,
                started: now,
            });
            let io = self.io(&src);
            self.send(
                &src,
                Request::Read {
                    io,
                    region,
                    id: read,
                },
            );
            return;
        }
        if !l.dirty.is_empty() {
            return;
        }
        if l.flushed {
            if l.join_flush.is_none() && l.owes_stability(self.record.epoch, self.promised_upto()) {
                // A flush (acknowledged or pending) covers writes this
                // copy only has in memory: flush it again before it joins.
                self.links.get_mut(n).expect("listed").flushed = false;
            }
            return;
        }
        match l.join_flush.as_ref().map(|j| (j.id, j.sent)) {
            Some((_, sent)) if now >= sent + timeout => self.fail(n, false),
            Some((id, sent)) if now > sent && (now - sent).is_multiple_of(resend) => {
                let io = self.io(n);
                self.send(n, Request::Flush { io, id });
            }
            Some(_) => {}
            None => {
                self.next_id += 1;
                let id = self.next_id;
                let l = self.links.get_mut(n).expect("listed");
                l.join_flush = Some(JoinFlush {
                    id,
                    sent: now,
                    covers: covered(l),
                });
                let io = self.io(n);
                self.send(n, Request::Flush { io, id });
            }
        }
    }

    /// The sequence number up to which a flush promises stability: the
    /// newest acknowledged flush's or a pending one's. A pending flush is
    /// acknowledged once the copies it waits for answer, and a copy being
    /// rebuilt may have answered it before a write it covers reached the
    /// copy (or never have been asked): a copy that joins must hold stable
    /// what pending flushes cover too, or it would be in sync with a write
    /// flushed only in its memory.
    fn promised_upto(&self) -> u64 {
        self.flushes
            .values()
            .map(|f| f.upto)
            .fold(self.flushed_upto, u64::max)
    }

    /// Proposes the in-sync set the links call for, one change at a time:
    /// failing copies out, flushed rebuilt copies in. The last in-sync copy
    /// is never marked out; if it restarted, the engine stops.
    fn maybe_change(&mut self) {
        if self.proposer.is_some() || self.state != EngineState::Running {
            return;
        }
        let upto = self.promised_upto();
        let mut desired: BTreeMap<String, u64> = self
            .links
            .iter()
            .filter(|(_, l)| {
                (l.phase == Phase::InSync && !l.failing) || l.is_joiner(self.record.epoch, upto)
            })
            .map(|(n, l)| (n.clone(), l.boot))
            .collect();
        if desired.is_empty() {
            let keep = self
                .links
                .iter()
                .find(|(_, l)| l.phase == Phase::InSync && !l.lost);
            match keep {
                Some((n, l)) => {
                    desired.insert(n.clone(), l.boot);
                }
                None => {
                    self.stop(EngineState::Failed);
                    self.events.push(EngineEvent::AllCopiesLost);
                    return;
                }
            }
        }
        if desired != self.record.in_sync || self.suspect_fenced || self.relearn {
            self.suspect_fenced = false;
            self.relearn = false;
            self.propose(desired);
        }
    }

    /// Acknowledges the writes and flushes no required copy still owes.
    fn settle(&mut self) {
        if self.state != EngineState::Running {
            return;
        }
        let required = self.required();
        let links = &self.links;
        let epoch = self.record.epoch;
        let mut seqs = std::mem::take(&mut self.unsettled);
        if self
            .settled_under
            .as_ref()
            .is_some_and(|u| u.holds(links, &required))
        {
            seqs.sort_unstable();
            seqs.dedup();
        } else {
            self.settled_under = Some(SettledUnder::new(links, required.clone()));
            seqs = self.writes.keys().copied().collect();
        }
        for seq in seqs {
            let Some(w) = self.writes.get_mut(&seq) else {
                continue;
            };
            w.waiting
                .retain(|n| links.get(n).is_some_and(|l| l.phase != Phase::Out));
            if !w.acked && w.waiting.is_disjoint(&required) {
                w.acked = true;
                self.events.push(EngineEvent::Acked {
                    region: w.region,
                    tag: Tag { epoch, seq },
                });
            }
            if w.acked && w.waiting.is_empty() {
                self.writes.remove(&seq);
                self.events.push(EngineEvent::Settled { seq });
            }
        }
        let done: Vec<u64> = self
            .flushes
            .iter()
            .filter(|(_, f)| f.waiting.is_disjoint(&required))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let f = self.flushes.remove(&id).expect("listed");
            self.flushed_upto = self.flushed_upto.max(f.upto);
            for n in f.waiting {
                if let Some(l) = self.links.get_mut(&n)
                    && l.phase == Phase::Rebuilding
                {
                    l.flushed = false;
                }
            }
            self.events.push(EngineEvent::FlushAcked { id });
        }
    }
}

/// The change an engine starts with: it takes an epoch of its own on
/// `node`, reading the newest record from a majority (above `round`).
fn start_change(
    cfg: &EngineConfig,
    record: &ReplicaRecord,
    round: u64,
    now: u64,
) -> (Proposer, Vec<Envelope>) {
    let change = Change::Start {
        node: cfg.node.clone(),
        heal: cfg.heal,
    };
    Proposer::new(&cfg.id, change, record, round, now, cfg.timeout)
}

/// The writes a copy acknowledged and has not flushed yet.
fn covered(l: &Link) -> Vec<(Region, Tag)> {
    l.unflushed
        .iter()
        .filter(|(_, u)| u.acked)
        .map(|(r, u)| (*r, u.latest))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::replicated::protocol::Voter;
    use crate::backend::replicated::record::Member;
    use crate::volume::Uuid;

    /// Three copies on a perfect network, minus the nodes in `down`.
    struct Net {
        voters: BTreeMap<String, Voter>,
        down: BTreeSet<String>,
        /// Down, and refusing connections: the engine hears of it at once.
        refused: BTreeSet<String>,
        now: u64,
    }

    impl Net {
        fn new() -> (Self, ReplicaRecord) {
            let r = ReplicaRecord::new(
                Uuid::parse_hex("000000000000000000000000000000aa").unwrap(),
                4 << 20,
                vec![Member::copy("a"), Member::copy("b"), Member::copy("c")],
                &BTreeMap::new(),
            )
            .unwrap();
            (Net::holding(&r), r)
        }

        /// Three copies and a running engine on a (published by ctl1).
        fn running() -> (Self, Engine, ReplicaRecord) {
            let (mut net, r) = Net::new();
            let mut e = net.publish("a", &r, "ctl1");
            net.run(&mut e, 3);
            (net, e, r)
        }

        /// Three copies and a running engine on a, which marked c out of
        /// sync when c, down (and still down), missed a write of region 0
        /// (its tag).
        fn with_c_out() -> (Self, Engine, Tag) {
            let (mut net, r) = Net::new();
            let mut e = net.publish("a", &r, "ctl1");
            net.run(&mut e, 3);
            net.down.insert("c".into());
            let tag = e.write(0).unwrap();
            net.run(&mut e, 20);
            (net, e, tag)
        }

        /// Every voter of `r`, each holding `r` as its first record.
        fn holding(r: &ReplicaRecord) -> Self {
            Net {
                voters: r
                    .voters()
                    .map(|n| (n.to_owned(), Voter::new(n, r.clone(), 0)))
                    .collect(),
                down: BTreeSet::new(),
                refused: BTreeSet::new(),
                now: 0,
            }
        }

        /// Runs a controller change to its outcome.
        fn change(&mut self, change: Change, record: &ReplicaRecord, id: &str) -> Outcome {
            let (mut p, mut out) = Proposer::new(id, change, record, 0, self.now, 10);
            loop {
                let mut next = Vec::new();
                for e in out.drain(..) {
                    if let Some((from, reply)) = self.deliver(e) {
                        let (more, outcome) = p.handle(&from, &reply);
                        if let Some(o) = outcome {
                            return o;
                        }
                        next.extend(more);
                    }
                }
                self.now += 1;
                next.extend(p.tick(self.now, 1));
                out = next;
                assert!(self.now < 1000, "the change did not finish");
            }
        }

        /// Publishes to `node` and starts its engine.
        fn publish(&mut self, node: &str, record: &ReplicaRecord, id: &str) -> Engine {
            self.publish_paced(node, record, id, 0)
        }

        /// [`Net::publish`], the engine's rebuilds `rebuild_gap` apart.
        fn publish_paced(
            &mut self,
            node: &str,
            record: &ReplicaRecord,
            id: &str,
            rebuild_gap: u64,
        ) -> Engine {
            let change = Change::Publish {
                node: node.into(),
                readonly: false,
            };
            let Outcome::Chosen { ballot, record } = self.change(change, record, id) else {
                panic!("publish refused");
            };
            let cfg = EngineConfig {
                id: format!("engine-{id}"),
                node: node.into(),
                regions: 4,
                timeout: 10,
                resend: 2,
                heal: false,
                rebuild_gap,
            };
            Engine::new(cfg, ballot, record, self.now)
        }

        fn deliver(&mut self, e: Envelope) -> Option<(String, Reply)> {
            if self.down.contains(&e.to) {
                return None;
            }
            let reply = self.voters.get_mut(&e.to).unwrap().handle(e.msg)?;
            Some((e.to, reply))
        }

        /// A flush of `engine`, run until it is acknowledged.
        fn flush(&mut self, engine: &mut Engine) {
            let id = engine.flush().unwrap();
            let ev = self.run(engine, 2);
            assert!(ev.contains(&EngineEvent::FlushAcked { id }), "{ev:?}");
        }

        /// Runs `engine` for `steps` ticks; returns its events.
        fn run(&mut self, engine: &mut Engine, steps: u64) -> Vec<EngineEvent> {
            self.run_holding(engine, steps, &mut Vec::new(), &|_| false)
        }

        /// Runs `engine` for `steps` ticks, keeping back in `held` the
        /// messages `hold` picks (delayed, not lost); returns its events.
        fn run_holding(
            &mut self,
            engine: &mut Engine,
            steps: u64,
            held: &mut Vec<Envelope>,
            hold: &dyn Fn(&Envelope) -> bool,
        ) -> Vec<EngineEvent> {
            let mut events = Vec::new();
            for _ in 0..steps {
                self.now += 1;
                engine.tick(self.now, 1);
                events.extend(self.exchange(engine, Vec::new(), held, hold));
            }
            events
        }

        /// Delivers `out` and everything the engine sends in answer, but
        /// for what `hold` picks.
        fn exchange(
            &mut self,
            engine: &mut Engine,
            mut out: Vec<Envelope>,
            held: &mut Vec<Envelope>,
            hold: &dyn Fn(&Envelope) -> bool,
        ) -> Vec<EngineEvent> {
            let mut events = Vec::new();
            loop {
                let (more, ev) = engine.drain();
                events.extend(ev);
                out.extend(more);
                if out.is_empty() {
                    return events;
                }
                for e in std::mem::take(&mut out) {
                    if hold(&e) {
                        held.push(e);
                    } else if self.refused.contains(&e.to) {
                        engine.unreachable(&e.to);
                    } else if let Some((from, reply)) = self.deliver(e) {
                        engine.handle(&from, reply);
                    }
                }
            }
        }
    }

    /// Starts a read of `region`; asserts it went to `node` alone.
    fn read_from(e: &mut Engine, region: Region, node: &str) -> u64 {
        let id = e.read(region).unwrap();
        let (out, _) = e.drain();
        assert!(
            matches!(&out[..], [Envelope { to, msg: Request::Read { .. } }] if to == node),
            "{out:?}"
        );
        id
    }

    fn acked(events: &[EngineEvent]) -> Vec<Tag> {
        events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Acked { tag, .. } => Some(*tag),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_write_is_acknowledged_once_every_copy_has_it() {
        let (mut net, r) = Net::new();
        let mut e = net.publish("a", &r, "ctl1");
        let ev = net.run(&mut e, 3);
        assert!(ev.contains(&EngineEvent::Ready { epoch: 2 }), "{ev:?}");
        let tag = e.write(1).unwrap();
        assert_eq!(e.write(1), Err(IoError::Busy(1)));
        let ev = net.run(&mut e, 1);
        assert_eq!(acked(&ev), [tag]);
        for v in net.voters.values() {
            assert_eq!(v.data().get(&1), Some(&tag), "{}", v.node());
        }
    }

    #[test]
    fn a_dead_copy_is_marked_out_of_sync_before_the_write_is_acknowledged() {
        let (mut net, r) = Net::new();
        let mut e = net.publish("a", &r, "ctl1");
        net.run(&mut e, 3);
        net.down.insert("c".into());
        let tag = e.write(2).unwrap();
        let ev = net.run(&mut e, 5);
        assert!(acked(&ev).is_empty(), "acked before c was marked out");
        let ev = net.run(&mut e, 20);
        assert_eq!(acked(&ev), [tag]);
        // The mark-out is on a majority and came first.
        let pos_chosen = ev
            .iter()
            .position(|x| matches!(x, EngineEvent::Chosen { record, .. } if !record.in_sync.contains_key("c")))
            .expect("c marked out");
        let pos_ack = ev
            .iter()
            .position(|x| matches!(x, EngineEvent::Acked { .. }))
            .unwrap();
        assert!(pos_chosen < pos_ack);
        assert!(!net.voters["a"].state().record.in_sync.contains_key("c"));
        assert!(!e.all_in_sync());
    }

    #[test]
    fn a_start_waits_for_a_silent_copy_but_not_for_one_that_cannot_be_reached() {
        let ready = |ev: &[EngineEvent]| ev.iter().any(|x| matches!(x, EngineEvent::Ready { .. }));
        // Silent: marked out of sync only at the attach deadline (10 ticks).
        let (mut net, r) = Net::new();
        net.down.insert("c".into());
        let mut e = net.publish("a", &r, "ctl1");
        assert!(!ready(&net.run(&mut e, 5)));
        assert!(ready(&net.run(&mut e, 20)));
        assert!(!e.record().in_sync.contains_key("c"));
        // Refusing connections: the start goes on once a and b answered.
        let (mut net, r) = Net::new();
        net.refused.insert("c".into());
        let mut e = net.publish("a", &r, "ctl1");
        let ev = net.run(&mut e, 5);
        assert!(ready(&ev), "{ev:?}");
        assert!(!e.record().in_sync.contains_key("c"));
        let tag = e.write(1).unwrap();
        assert_eq!(acked(&net.run(&mut e, 1)), [tag]);
        // Every copy unreachable: no start.
        let (mut net, r) = Net::new();
        for n in ["a", "b", "c"] {
            net.refused.insert(n.into());
        }
        let mut e = net.publish("a", &r, "ctl1");
        assert!(!ready(&net.run(&mut e, 30)));
        assert_ne!(e.state(), EngineState::Running);
    }

    #[test]
    fn a_copy_that_comes_back_is_rebuilt_from_its_dirty_regions_and_rejoins() {
        let (mut net, mut e, t0) = Net::with_c_out();
        let t3 = e.write(3).unwrap();
        net.run(&mut e, 2);
        assert_eq!(net.voters["c"].data().get(&0), None);
        net.down.clear();
        net.run(&mut e, 60);
        assert!(e.all_in_sync(), "{e:?}");
        assert_eq!(net.voters["c"].data().get(&0), Some(&t0));
        assert_eq!(net.voters["c"].data().get(&3), Some(&t3));
        assert_eq!(net.voters["a"].state().record.in_sync.len(), 3);
    }

    /// A copy that fails a read (a bad sector on its disk) has the read
    /// sent at once to another in-sync copy. It goes out of sync even
    /// though it answers a write meanwhile, and the region it could not
    /// read is rebuilt on it (written again) before it rejoins.
    #[test]
    fn a_read_a_copy_fails_goes_to_another_copy_and_is_rebuilt_there() {
        let (mut net, r) = Net::new();
        let mut e = net.publish("a", &r, "ctl1");
        net.run(&mut e, 3);
        let t1 = e.write(1).unwrap();
        assert_eq!(acked(&net.run(&mut e, 2)), [t1]);
        // Flushed: no copy lacks region 1 for want of a flush.
        net.flush(&mut e);
        let id = read_from(&mut e, 1, "a");
        e.read_failed("a", id);
        let t2 = e.write(2).unwrap();
        let (out, _) = e.drain();
        let read_to: Vec<&str> = out
            .iter()
            .filter(|x| matches!(x.msg, Request::Read { id: i, .. } if i == id))
            .map(|x| x.to.as_str())
            .collect();
        assert!(read_to == ["b"] || read_to == ["c"], "{out:?}");
        // a answers the write (and everything else) meanwhile.
        let ev = net.exchange(&mut e, out, &mut Vec::new(), &|_| false);
        assert!(
            ev.contains(&EngineEvent::ReadDone {
                id,
                region: 1,
                tag: t1
            }),
            "{ev:?}"
        );
        assert!(acked(&ev).contains(&t2), "{ev:?}");
        // Region 1 is rebuilt on a: caught on its way, then let through.
        let mut held = Vec::new();
        let rebuild =
            |x: &Envelope| x.to == "a" && matches!(x.msg, Request::Rebuild { region: 1, .. });
        net.run_holding(&mut e, 30, &mut held, &rebuild);
        assert!(
            !held.is_empty(),
            "region 1 never rebuilt on a: {:?}",
            e.copies()
        );
        assert!(!e.all_in_sync());
        net.exchange(&mut e, held, &mut Vec::new(), &|_| false);
        net.run(&mut e, 30);
        assert!(e.all_in_sync(), "{:?}", e.copies());
        assert_eq!(net.voters["a"].state().record.in_sync.len(), 3);
        // Read from a again.
        e.read(1).unwrap();
        let (out, _) = e.drain();
        assert!(
            matches!(&out[..], [Envelope { to, .. }] if to == "a"),
            "{out:?}"
        );
    }

    /// With one copy in sync (the others out and down), a read it fails
    /// (a bad sector) fails that read only: the copy is not held failing
    /// for a region nothing else could rewrite, so every other region
    /// still reads from it.
    #[test]
    fn a_read_the_only_copy_in_sync_fails_fails_that_read_alone() {
        let (mut net, mut e) = only_a_in_sync();
        let id = read_from(&mut e, 1, "a");
        e.read_failed("a", id);
        let (out, _) = e.drain();
        assert!(out.is_empty(), "nowhere else to read from: {out:?}");
        // The failing read keeps failing at a until its timeout.
        let mut ev = Vec::new();
        for _ in 0..12 {
            let mut held = Vec::new();
            ev.extend(net.run_holding(
                &mut e,
                1,
                &mut held,
                &|x| matches!(x.msg, Request::Read { id: i, .. } if i == id),
            ));
            if !held.is_empty() {
                e.read_failed("a", id);
            }
        }
        assert!(ev.contains(&EngineEvent::ReadFailed { id }), "{ev:?}");
        // Another region reads from a as before.
        let other = e.read(2).expect("a still serves reads");
        let ev = net.run(&mut e, 2);
        assert!(
            ev.iter()
                .any(|x| matches!(x, EngineEvent::ReadDone { id, .. } if *id == other)),
            "{ev:?} {:?}",
            e.copies()
        );
    }

    /// A running engine on a whose copy is the only one in sync: b and c
    /// were out at its start, and went down before their rebuild ended.
    fn only_a_in_sync() -> (Net, Engine) {
        let (_, mut r) = Net::new();
        r.in_sync.retain(|n, _| n == "a");
        let mut net = Net::holding(&r);
        let mut e = net.publish("a", &r, "ctl1");
        net.run(&mut e, 3);
        assert_eq!(e.state(), EngineState::Running);
        net.down.extend(["b".to_owned(), "c".to_owned()]);
        let t = e.write(1).unwrap();
        let ev = net.run(&mut e, 30);
        assert!(acked(&ev).contains(&t), "{ev:?}");
        assert!(
            e.copies()
                .iter()
                .all(|c| (c.phase == CopyPhase::InSync) == (c.node == "a")),
            "{:?}",
            e.copies()
        );
        (net, e)
    }

    /// Runs `e` until it sends a scrub check of `region`; returns the
    /// checks (held back, one per copy asked) and the events meanwhile.
    fn held_checks(net: &mut Net, e: &mut Engine, region: Region) -> Vec<Envelope> {
        let mut held = Vec::new();
        for _ in 0..300 {
            net.run_holding(
                e,
                1,
                &mut held,
                &|x| matches!(x.msg, Request::Verify { region: r, .. } if r == region),
            );
            if !held.is_empty() {
                return held;
            }
        }
        panic!("no check of region {region} sent: {:?}", e.copies());
    }

    /// Delivers the held checks; `answer` may change each copy's answer
    /// (None: the copy's disk failed the read).
    fn answer_checks(
        net: &mut Net,
        e: &mut Engine,
        held: Vec<Envelope>,
        answer: &dyn Fn(&str, Reply) -> Option<Reply>,
    ) -> Vec<EngineEvent> {
        let mut events = Vec::new();
        for x in held {
            let Request::Verify { id, .. } = x.msg else {
                unreachable!()
            };
            let (from, reply) = net.deliver(x).expect("up");
            match answer(&from, reply) {
                Some(r) => e.handle(&from, r),
                None => e.read_failed(&from, id),
            }
            events.extend(net.exchange(e, Vec::new(), &mut Vec::new(), &|_| false));
        }
        events
    }

    /// Runs `e` until every copy is in sync; returns the (copy, region) of
    /// each rebuild sent.
    fn rebuild_all(net: &mut Net, e: &mut Engine) -> Vec<(String, Region)> {
        let mut rebuilt = Vec::new();
        for _ in 0..100 {
            let mut held = Vec::new();
            net.run_holding(e, 1, &mut held, &|x| {
                matches!(x.msg, Request::Rebuild { .. })
            });
            for x in &held {
                if let Request::Rebuild { region, .. } = x.msg {
                    rebuilt.push((x.to.clone(), region));
                }
            }
            net.exchange(e, held, &mut Vec::new(), &|_| false);
            if e.all_in_sync() {
                return rebuilt;
            }
        }
        panic!("not all in sync: {:?}", e.copies());
    }

    fn other_bytes(reply: Reply) -> Reply {
        match reply {
            Reply::Verified {
                conn,
                id,
                region,
                tag,
                ..
            } => Reply::Verified {
                conn,
                id,
                region,
                tag,
                digest: [7; 32],
            },
            r => r,
        }
    }

    fn scrubbed(ev: &[EngineEvent]) -> Vec<(Region, Vec<String>, bool)> {
        ev.iter()
            .filter_map(|x| match x {
                EngineEvent::Scrubbed {
                    region,
                    bad,
                    unresolved,
                } => Some((*region, bad.clone(), *unresolved)),
                _ => None,
            })
            .collect()
    }

    /// A scrub asks every copy in sync for each region in turn, holding
    /// the region meanwhile (a write of it waits). A copy whose disk
    /// cannot read the region, and one that holds other bytes than the
    /// other two, are each marked out of sync and get the region written
    /// again; then all three rejoin and the pass ends.
    #[test]
    fn a_scrub_rewrites_a_region_a_copy_cannot_read_or_holds_otherwise() {
        let (mut net, mut e, _) = Net::running();
        for region in 0..4 {
            e.write(region).unwrap();
        }
        net.run(&mut e, 2);
        net.flush(&mut e);
        // Far apart: b is back in sync before region 2's check.
        assert!(e.scrub(0, 100_000));
        assert!(!e.scrub(0, 100_000), "one pass at a time");
        // Region 0: every copy agrees.
        let held = held_checks(&mut net, &mut e, 0);
        let asked: Vec<&str> = held.iter().map(|x| x.to.as_str()).collect();
        assert_eq!(asked, ["a", "b", "c"]);
        assert_eq!(
            e.write(0),
            Err(IoError::Busy(0)),
            "a write waits for the check"
        );
        let ev = answer_checks(&mut net, &mut e, held, &|_, r| Some(r));
        assert_eq!(scrubbed(&ev), [(0, vec![], false)]);
        // Region 1: b's disk fails the read.
        let held = held_checks(&mut net, &mut e, 1);
        let ev = answer_checks(&mut net, &mut e, held, &|n, r| (n != "b").then_some(r));
        assert_eq!(scrubbed(&ev), [(1, vec!["b".to_owned()], false)]);
        let rebuilt = rebuild_all(&mut net, &mut e);
        assert!(rebuilt.contains(&("b".to_owned(), 1)), "{rebuilt:?}");
        // Region 2: c holds other bytes.
        let held = held_checks(&mut net, &mut e, 2);
        assert_eq!(held.len(), 3, "{:?}", e.copies());
        let ev = answer_checks(&mut net, &mut e, held, &|n, r| {
            Some(if n == "c" { other_bytes(r) } else { r })
        });
        assert_eq!(scrubbed(&ev), [(2, vec!["c".to_owned()], false)]);
        let rebuilt = rebuild_all(&mut net, &mut e);
        assert!(rebuilt.contains(&("c".to_owned(), 2)), "{rebuilt:?}");
        let ev = net.run(&mut e, 300);
        assert!(ev.contains(&EngineEvent::ScrubDone), "{ev:?}");
        assert_eq!(e.scrubbing(), None);
        assert_eq!(net.voters["a"].state().record.in_sync.len(), 3);
    }

    /// A pass keeps a pace of a fraction of a tick per region on average
    /// (each region starts at the tick its due time falls in, not a whole
    /// number of ticks after the last); a region that starts late (it
    /// waited for a write) counts the next gap from its start, so the
    /// pass does not catch up in a burst.
    #[test]
    fn a_scrub_keeps_its_pace_on_average_and_never_catches_up_in_a_burst() {
        let (mut net, mut e, _) = Net::running();
        let write_to_b = |x: &Envelope| matches!(x.msg, Request::Write { .. }) && x.to == "b";
        // One pass at 6.25 ticks a region; with `busy`, region 1 is
        // written from the end of region 0's check until tick 15 (b holds
        // its answer). When each region was checked, in ticks from the
        // pass's start.
        let mut pass = |busy: bool| {
            let start = net.now;
            assert!(e.scrub(0, 6_250));
            let (mut at, mut held, mut wrote) = (Vec::new(), Vec::new(), false);
            for _ in 0..60 {
                let ev = net.run_holding(&mut e, 1, &mut held, &write_to_b);
                at.extend(
                    scrubbed(&ev)
                        .into_iter()
                        .map(|(r, ..)| (r, net.now - start)),
                );
                if busy && at.len() == 1 && !wrote {
                    wrote = true;
                    e.write(1).unwrap();
                    net.exchange(&mut e, Vec::new(), &mut held, &write_to_b);
                    assert_eq!(held.len(), 1);
                }
                if net.now - start == 15 {
                    net.exchange(&mut e, std::mem::take(&mut held), &mut Vec::new(), &|_| {
                        false
                    });
                }
                if ev.contains(&EngineEvent::ScrubDone) {
                    break;
                }
            }
            at
        };
        // At 6.25, 12.5, 18.75 and 25.
        assert_eq!(pass(false), [(0, 7), (1, 13), (2, 19), (3, 25)]);
        // Region 1 at 16, over a tick late: then 16 + 6.25 and + 12.5.
        assert_eq!(pass(true), [(0, 7), (1, 16), (2, 23), (3, 29)]);
    }

    /// Paced rebuilds start a region a gap apart on average, over all the
    /// copies together (one copy's regions, then the next's), as a scrub
    /// pass keeps its pace; an engine with no pace starts a region a tick
    /// on every copy it rebuilds.
    #[test]
    fn paced_rebuilds_keep_one_pace_over_all_the_copies() {
        // b and c out of sync: the engine rebuilds every region of both.
        // When each region's Rebuild was sent, in ticks from the first.
        let rebuilt = |gap: u64| {
            let (_, mut r) = Net::new();
            r.in_sync.retain(|n, _| n == "a");
            let mut net = Net::holding(&r);
            let mut e = net.publish_paced("a", &r, "ctl1", gap);
            let sent = std::cell::RefCell::new(Vec::new());
            let mut held = Vec::new();
            for _ in 0..60 {
                let now = net.now + 1;
                net.run_holding(&mut e, 1, &mut held, &|x| {
                    if let Request::Rebuild { region, .. } = x.msg {
                        sent.borrow_mut().push((x.to.clone(), region, now));
                    }
                    false
                });
            }
            assert!(e.all_in_sync(), "{:?}", e.copies());
            let sent = sent.into_inner();
            let first = sent.first().expect("rebuilds").2;
            sent.into_iter()
                .map(|(n, r, at)| (n, r, at - first))
                .collect::<Vec<_>>()
        };
        let at = |v: &[(String, Region, u64)]| v.iter().map(|x| x.2).collect::<Vec<_>>();
        // 2.5 ticks a region: at 0, 2.5, 5, 7.5, ... each rounded up.
        let paced = rebuilt(2_500);
        assert_eq!(at(&paced), [0, 3, 5, 8, 10, 13, 15, 18], "{paced:?}");
        let order: Vec<(&str, Region)> = paced.iter().map(|(n, r, _)| (n.as_str(), *r)).collect();
        assert_eq!(
            order,
            [
                ("b", 0),
                ("b", 1),
                ("b", 2),
                ("b", 3),
                ("c", 0),
                ("c", 1),
                ("c", 2),
                ("c", 3)
            ]
        );
        assert_eq!(at(&rebuilt(0)), [0, 0, 1, 1, 2, 2, 3, 3]);
    }

    /// A region with a write in flight is checked once that write is
    /// done, and no new write of it starts meanwhile: a region written
    /// without pause is not skipped for ever.
    #[test]
    fn a_scrub_holds_a_busy_region_until_its_writes_are_done() {
        let (mut net, mut e, _) = Net::running();
        let t = e.write(0).unwrap();
        let mut held = Vec::new();
        let ev = net.exchange(&mut e, Vec::new(), &mut held, &|x| {
            matches!(x.msg, Request::Write { .. }) && x.to == "b"
        });
        assert!(acked(&ev).is_empty(), "b holds the write back");
        assert!(e.scrub(0, 0));
        let mut checks = Vec::new();
        net.run_holding(&mut e, 1, &mut checks, &|x| {
            matches!(x.msg, Request::Verify { .. })
        });
        assert!(checks.is_empty(), "checked with a write in flight");
        let ev = net.exchange(&mut e, held, &mut Vec::new(), &|_| false);
        assert_eq!(acked(&ev), [t]);
        // The next write (queued behind it) does not start before the
        // check.
        assert_eq!(e.write(0), Err(IoError::Busy(0)), "a new write started");
        let checks = held_checks(&mut net, &mut e, 0);
        assert_eq!(checks.len(), 3);
        let ev = answer_checks(&mut net, &mut e, checks, &|_, r| Some(r));
        assert_eq!(scrubbed(&ev), [(0, vec![], false)]);
        assert!(e.write(0).is_ok(), "the region is free again");
    }

    /// `e`'s volume published anew on a (by controller "ctl2") once its
    /// writes are flushed, with the attach answers of the copies `to`
    /// changed by `edit` before the new engine sees them: that engine.
    fn republished_with(
        net: &mut Net,
        e: &mut Engine,
        to: &[&str],
        edit: &dyn Fn(&str, &mut Reply),
    ) -> Engine {
        net.flush(e);
        let r = net.voters["a"].state().record.clone();
        let mut e = net.publish("a", &r, "ctl2");
        let mut held = Vec::new();
        let attach =
            |x: &Envelope| to.contains(&x.to.as_str()) && matches!(x.msg, Request::Attach { .. });
        for _ in 0..10 {
            net.run_holding(&mut e, 1, &mut held, &attach);
            if held.len() == to.len() {
                break;
            }
        }
        assert_eq!(held.len(), to.len(), "{held:?}");
        for x in held {
            let (from, mut reply) = net.deliver(x).unwrap();
            assert!(matches!(reply, Reply::Attached { .. }), "{reply:?}");
            edit(&from, &mut reply);
            e.handle(&from, reply);
        }
        e
    }

    /// Regions 0-3 written and the volume published anew on a, with
    /// `copy`'s attach answer listing `unreadable`: what the new engine
    /// rebuilds before every copy is in sync; it runs then.
    fn rebuilt_at_start_listing(copy: &str, unreadable: Vec<Region>) -> Vec<(String, Region)> {
        let (mut net, mut e, _) = Net::running();
        rebuild_all(&mut net, &mut e);
        for region in 0..4 {
            e.write(region).unwrap();
        }
        net.run(&mut e, 2);
        let mut e = republished_with(&mut net, &mut e, &[copy], &|_, reply| {
            if let Reply::Attached { unreadable: u, .. } = reply {
                *u = unreadable.clone();
            }
        });
        let rebuilt = rebuild_all(&mut net, &mut e);
        assert_eq!(e.state(), EngineState::Running);
        rebuilt
    }

    /// A copy whose attach answer lists regions its disk could not read
    /// (found while the volume was not published) gets those rebuilt at
    /// the next engine's start, and nothing else; then all are in sync.
    #[test]
    fn regions_a_copy_could_not_read_while_idle_are_rebuilt_at_start() {
        let rebuilt = rebuilt_at_start_listing("b", vec![2, 99]);
        assert_eq!(rebuilt, [("b".to_owned(), 2)]);
    }

    /// The engine's own copy lists regions its disk could not read: another
    /// copy is the base, so those regions are rebuilt here at the start
    /// (not left until a read fails on them), and nothing else.
    #[test]
    fn regions_the_engines_own_copy_could_not_read_are_rebuilt_at_start() {
        let rebuilt = rebuilt_at_start_listing("a", vec![3]);
        assert_eq!(rebuilt, [("a".to_owned(), 3)]);
    }

    /// How far scrub passes got is what the copies' attach answers say:
    /// the latest whole pass, with where a pass after it stopped; a pass
    /// stopped before a later whole one does not count.
    #[test]
    fn the_scrub_progress_is_the_latest_the_attached_copies_name() {
        let (mut net, mut e, _) = Net::running();
        assert_eq!(e.scrubbed(), CheckMark::default());
        rebuild_all(&mut net, &mut e);
        let mut e = republished_with(&mut net, &mut e, &["b", "c"], &|from, reply| {
            if let Reply::Attached { scrubbed, .. } = reply {
                assert!(scrubbed.is_none(), "the model's voters keep none");
                *scrubbed = match from {
                    "b" => CheckMark { done: 100, next: 9 },
                    _ => CheckMark { done: 200, next: 3 },
                };
            }
        });
        net.run(&mut e, 2);
        assert_eq!(e.state(), EngineState::Running);
        assert_eq!(e.scrubbed(), CheckMark { done: 200, next: 3 });
    }

    /// A copy whose attach answer does not say it takes checks (a copy of
    /// an older version, whose answer lacks the field) is never sent one.
    #[test]
    fn a_scrub_sends_no_check_to_a_copy_that_does_not_take_them() {
        let (mut net, mut e, _) = Net::running();
        takes_no_checks(&mut e, "c");
        assert!(e.scrub(0, 0));
        let held = held_checks(&mut net, &mut e, 0);
        let asked: Vec<&str> = held.iter().map(|x| x.to.as_str()).collect();
        assert_eq!(asked, ["a", "b"]);
    }

    /// `node`'s attach answer says it takes no checks (as a copy of an
    /// older version's does, whose answer lacks the field).
    fn takes_no_checks(e: &mut Engine, node: &str) {
        let reply: Reply = serde_json::from_str(&format!(
            r#"{{"Attached":{{"conn":{},"boot":{},"tags":{{}}}}}}"#,
            e.links[node].conn, e.links[node].boot
        ))
        .unwrap();
        assert!(
            matches!(
                &reply,
                Reply::Attached {
                    verifies: false,
                    unreadable,
                    ..
                } if unreadable.is_empty()
            ),
            "absent means it does not take checks, and lists nothing: {reply:?}"
        );
        e.handle(node, reply);
    }

    /// Two copies that disagree have no majority: nothing is repaired (nor
    /// marked out), the region is reported unresolved. The only copy of a
    /// volume of one, which cannot read a region, is reported the same way
    /// and kept.
    #[test]
    fn a_scrub_without_a_majority_repairs_nothing_and_says_so() {
        let (mut net, mut e, r) = Net::running();
        e.write(0).unwrap();
        net.run(&mut e, 2);
        net.flush(&mut e);
        takes_no_checks(&mut e, "c");
        assert!(e.scrub(0, 0));
        let held = held_checks(&mut net, &mut e, 0);
        assert_eq!(held.len(), 2, "c takes no checks: {held:?}");
        let ev = answer_checks(&mut net, &mut e, held, &|n, r| {
            Some(if n == "b" { other_bytes(r) } else { r })
        });
        assert_eq!(scrubbed(&ev), [(0, vec![], true)]);
        assert!(e.copies().iter().all(|c| !c.failing), "{:?}", e.copies());
        // One copy, which cannot read a region.
        let one =
            ReplicaRecord::new(r.uuid, r.size, vec![Member::copy("a")], &BTreeMap::new()).unwrap();
        let mut net = Net::holding(&one);
        let mut e = net.publish("a", &one, "ctl1");
        net.run(&mut e, 3);
        assert_eq!(e.state(), EngineState::Running);
        assert!(e.scrub(1, 0));
        let held = held_checks(&mut net, &mut e, 1);
        let ev = answer_checks(&mut net, &mut e, held, &|_, _| None);
        assert_eq!(scrubbed(&ev), [(1, vec!["a".to_owned()], true)]);
        let a = e.copies().into_iter().find(|c| c.node == "a").unwrap();
        assert!(!a.failing, "{a:?}");
        assert!(e.read(2).is_ok());
    }

    /// While a copy is out of sync the pass waits (that copy could break a
    /// tie, and its rebuild comes first); it goes on once the copy is back.
    #[test]
    fn a_scrub_waits_while_a_copy_is_out_of_sync() {
        let (mut net, mut e, _) = Net::with_c_out();
        net.flush(&mut e);
        assert!(e.scrub(0, 0));
        let mut checks = Vec::new();
        net.run_holding(&mut e, 50, &mut checks, &|x| {
            matches!(x.msg, Request::Verify { .. })
        });
        assert!(checks.is_empty(), "checked with c out: {checks:?}");
        assert!(e.write(0).is_ok(), "a region held while waiting");
        net.down.clear();
        let checks = held_checks(&mut net, &mut e, 0);
        assert_eq!(checks.len(), 3, "{:?}", e.copies());
    }

    /// A rebuild whose read fails on its source (a bad sector there) reads
    /// the region from another copy, and the source goes out of sync and
    /// gets that region written again too.
    #[test]
    fn a_rebuild_read_its_source_fails_is_read_elsewhere_and_the_source_repaired() {
        let (mut net, mut e, t0) = Net::with_c_out();
        // Flushed: no copy lacks region 0 for want of a flush.
        net.flush(&mut e);
        net.down.clear();
        // c's rebuild of region 0 reads it from a (the engine's own copy).
        let mut held = Vec::new();
        let read_from_a =
            |x: &Envelope| x.to == "a" && matches!(x.msg, Request::Read { region: 0, .. });
        net.run_holding(&mut e, 10, &mut held, &read_from_a);
        let id = match held.first() {
            Some(Envelope {
                msg: Request::Read { id, .. },
                ..
            }) => *id,
            other => panic!("no rebuild read sent to a: {other:?} {:?}", e.copies()),
        };
        e.read_failed("a", id);
        let mut rebuilt_on_a = Vec::new();
        let rebuild_to_a =
            |x: &Envelope| x.to == "a" && matches!(x.msg, Request::Rebuild { region: 0, .. });
        net.run_holding(&mut e, 60, &mut rebuilt_on_a, &rebuild_to_a);
        assert_eq!(
            net.voters["c"].data().get(&0),
            Some(&t0),
            "c rebuilt from b"
        );
        assert!(
            !rebuilt_on_a.is_empty(),
            "region 0 never rebuilt on a: {:?}",
            e.copies()
        );
        net.exchange(&mut e, rebuilt_on_a, &mut Vec::new(), &|_| false);
        net.run(&mut e, 60);
        assert!(e.all_in_sync(), "{:?}", e.copies());
    }

    /// A write also goes to a copy being rebuilt, which no acknowledgement
    /// waits for. When that copy falls silent and is marked out, the
    /// write, acknowledged long before, is settled (its bytes may go)
    /// with no answer from it: nothing else about the write changed, and
    /// the copies' and the required set's change alone must settle it.
    #[test]
    fn a_write_a_rebuilding_copy_never_answers_is_settled_once_that_copy_is_out() {
        let (mut net, mut e, _) = Net::with_c_out();
        net.down.clear();
        // c comes back; its rebuild of region 0 never lands.
        let mut held = Vec::new();
        let rebuild_to_c = |x: &Envelope| x.to == "c" && matches!(x.msg, Request::Rebuild { .. });
        net.run_holding(&mut e, 4, &mut held, &rebuild_to_c);
        let phase = |e: &Engine| {
            e.copies()
                .into_iter()
                .find(|v| v.node == "c")
                .unwrap()
                .phase
        };
        assert_eq!(phase(&e), CopyPhase::Rebuilding, "{:?}", e.copies());
        let tag = e.write(2).unwrap();
        let mut ev = net.run_holding(&mut e, 2, &mut held, &|x: &Envelope| x.to == "c");
        assert_eq!(acked(&ev), [tag], "a and b have it");
        assert!(
            e.write_pending(tag.seq),
            "still owed to c: {:?} {ev:?}",
            e.copies()
        );
        ev.extend(net.run_holding(&mut e, 30, &mut held, &|x: &Envelope| x.to == "c"));
        assert_eq!(phase(&e), CopyPhase::Out, "{:?}", e.copies());
        assert!(
            ev.contains(&EngineEvent::Settled { seq: tag.seq }),
            "{ev:?}"
        );
        assert!(!e.write_pending(tag.seq));
    }

    #[test]
    fn a_copy_that_replaces_another_is_rebuilt_in_full_while_writes_go_on_then_joins() {
        let (mut net, mut e, r) = Net::running();
        let t0 = e.write(0).unwrap();
        net.run(&mut e, 2);
        // The controller puts d in c's place: d is created with a first
        // record naming it, then the members change in two steps.
        let to = vec![Member::copy("a"), Member::copy("b"), Member::copy("d")];
        let first = ReplicaRecord::new(r.uuid, r.size, to.clone(), &BTreeMap::new()).unwrap();
        net.voters.insert("d".into(), Voter::new("d", first, 0));
        for id in ["m1", "m2"] {
            let members = Change::Members {
                members: to.clone(),
            };
            let Outcome::Chosen { .. } = net.change(members, &r, id) else {
                panic!("membership change refused");
            };
        }
        // The engine has not heard yet: its writes still go to c, whose
        // record says it is no longer a copy.
        let t1 = e.write(1).unwrap();
        net.run(&mut e, 30);
        e.refresh();
        let t2 = e.write(2).unwrap();
        let ev = net.run(&mut e, 100);
        assert!(acked(&ev).contains(&t2), "{ev:?}");
        assert!(e.all_in_sync(), "{:?}", e.copies());
        assert_eq!(
            e.copies()
                .iter()
                .map(|c| c.node.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "d"]
        );
        for (region, tag) in [(0, t0), (1, t1), (2, t2)] {
            assert_eq!(net.voters["d"].data().get(&region), Some(&tag));
        }
        let t3 = e.write(3).unwrap();
        assert!(acked(&net.run(&mut e, 3)).contains(&t3));
        assert_eq!(net.voters["d"].data().get(&3), Some(&t3));
        assert_eq!(net.voters["c"].data().get(&3), None, "c gets no more I/O");
        let rec = &net.voters["a"].state().record;
        assert_eq!(rec.in_sync.keys().collect::<Vec<_>>(), ["a", "b", "d"]);
        assert_eq!(rec.epoch, e.epoch(), "a membership change fences no engine");
    }

    /// The members go {a, b, c} -> {a} -> {a, c, witness b} while the
    /// engine on a hears of neither change: c is then a new, empty copy
    /// under an old name, and is rebuilt in full (not only from the regions
    /// the engine had marked dirty for the old c).
    #[test]
    fn a_copy_removed_and_added_again_unseen_is_rebuilt_in_full() {
        let (mut net, mut e, r) = Net::running();
        let t0 = e.write(0).unwrap();
        let t1 = e.write(1).unwrap();
        net.run(&mut e, 2);
        // Flushed: the old c held them for good, nothing of them is dirty.
        let f = e.flush().unwrap();
        assert!(
            net.run(&mut e, 2)
                .contains(&EngineEvent::FlushAcked { id: f })
        );
        let mut record = r.clone();
        for (members, ids) in [
            (vec![Member::copy("a")], ["m1", "m2"]),
            (
                vec![Member::copy("a"), Member::copy("c"), Member::witness("b")],
                ["m3", "m4"],
            ),
        ] {
            if members.len() == 3 {
                // The controller deleted the old c and b and makes them
                // again from a first record naming the new members; c
                // starts at a boot of its own.
                let first =
                    ReplicaRecord::new(r.uuid, r.size, members.clone(), &BTreeMap::new()).unwrap();
                net.voters
                    .insert("c".into(), Voter::new("c", first.clone(), 77));
                net.voters.insert("b".into(), Voter::new("b", first, 0));
            }
            for id in ids {
                let change = Change::Members {
                    members: members.clone(),
                };
                let Outcome::Chosen { record: next, .. } = net.change(change, &record, id) else {
                    panic!("membership change refused");
                };
                record = next;
            }
        }
        assert_eq!(record.members[1].since, 5, "{record:?}");
        // The engine learns the newest record by changing it before any
        // I/O shows it c's new boot: its in-sync set names the old c.
        e.refresh();
        net.run(&mut e, 5);
        assert!(!e.record().in_sync.contains_key("c"), "{:?}", e.record());
        let t2 = e.write(2).unwrap();
        let ev = net.run(&mut e, 200);
        assert!(acked(&ev).contains(&t2), "{ev:?}");
        assert!(e.all_in_sync(), "{:?}", e.copies());
        assert_eq!(e.record().in_sync.keys().collect::<Vec<_>>(), ["a", "c"]);
        for (region, tag) in [(0, t0), (1, t1), (2, t2)] {
            assert_eq!(
                net.voters["c"].data().get(&region),
                Some(&tag),
                "region {region}"
            );
        }
    }

    /// c fails, then the controller removes it while the engine hears
    /// nothing (its Refresh lost): the engine keeps asking c to attach
    /// and c answers it is no copy. That tells the engine to read the
    /// record again; it then lets c go instead of asking for ever.
    #[test]
    fn an_engine_that_missed_a_removal_learns_it_from_the_removed_copy() {
        let (mut net, mut e, _) = Net::running();
        net.refused.insert("c".into());
        let t = e.write(0).unwrap();
        let ev = net.run(&mut e, 5);
        assert!(acked(&ev).contains(&t), "{ev:?}");
        assert!(!e.record().in_sync.contains_key("c"), "{:?}", e.record());
        let mut record = e.record().clone();
        for id in ["m1", "m2"] {
            let change = Change::Members {
                members: vec![Member::copy("a"), Member::copy("b")],
            };
            let Outcome::Chosen { record: next, .. } = net.change(change, &record, id) else {
                panic!("membership change refused");
            };
            record = next;
        }
        assert!(!record.is_copy("c"));
        // c is back and knows it is no copy (it holds the newest record;
        // a copy deleted by the controller answers the same through the
        // driver); nobody told the engine.
        net.voters
            .insert("c".into(), Voter::new("c", record.clone(), 0));
        net.refused.clear();
        net.run(&mut e, 60);
        assert!(!e.record().is_copy("c"), "{:?}", e.record());
        assert!(e.all_in_sync(), "{:?}", e.copies());
        assert!(e.copies().iter().all(|c| c.node != "c"), "{:?}", e.copies());
        let t = e.write(1).unwrap();
        let ev = net.run(&mut e, 5);
        assert!(acked(&ev).contains(&t), "{ev:?}");
    }

    #[test]
    fn an_engine_is_fenced_once_the_volume_is_published_elsewhere() {
        let (mut net, r) = Net::new();
        let mut old = net.publish("a", &r, "ctl1");
        net.run(&mut old, 3);
        // Force-detach: unpublish a, publish b.
        let change = Change::Unpublish { node: "a".into() };
        let Outcome::Chosen { record: latest, .. } = net.change(change, &r, "ctl2") else {
            panic!("unpublish refused");
        };
        assert_eq!(latest.owner, None);
        let mut new = net.publish("b", &latest, "ctl3");
        net.run(&mut new, 3);
        assert_eq!(new.state(), EngineState::Running);
        let tag = old.write(0).unwrap();
        let ev = net.run(&mut old, 30);
        assert!(acked(&ev).is_empty());
        assert!(
            ev.contains(&EngineEvent::WriteFailed { region: 0, tag }),
            "{ev:?}"
        );
        assert_eq!(old.state(), EngineState::Fenced);
        for v in net.voters.values() {
            assert_eq!(v.data().get(&0), None, "{} took a fenced write", v.node());
        }
    }

    /// The simulator's seed 33796 (two copies and a witness, former
    /// members added again): an engine of an earlier publication on the
    /// owner's node took an epoch after the current one started there
    /// (a Start fences any earlier engine on its node), and the copy the
    /// current engine had out of sync learned the newer record. With no
    /// I/O, that engine only asked the copy to attach, every resend, and
    /// dropped each refusal as from an older epoch because the copy was
    /// out of sync: it ran on, fenced without knowing, and never let the
    /// controller move the volume. Such a refusal now makes it confirm on
    /// a majority, which finds it fenced.
    #[test]
    fn an_engine_a_copy_out_of_sync_refuses_as_fenced_learns_it_is_fenced() {
        let (mut net, mut old, _) = Net::with_c_out();
        assert_eq!(old.state(), EngineState::Running);
        assert!(!old.record().in_sync.contains_key("c"));
        // Another engine on a takes an epoch of its own while c is down,
        // then tells c the newer record as it asks it to attach.
        let mut new = net.publish("a", old.record(), "ctl2");
        net.run(&mut new, 3);
        assert_eq!(new.state(), EngineState::Running);
        assert!(new.epoch() > old.epoch());
        net.down.clear();
        net.run(&mut new, 3);
        assert_eq!(net.voters["c"].state().record.epoch, new.epoch());
        // The old engine, idle, asks c to attach again and again.
        let ev = net.run(&mut old, 30);
        assert_eq!(old.state(), EngineState::Fenced, "{:?}", old.copies());
        assert!(
            ev.iter().any(|e| matches!(e, EngineEvent::Fenced { .. })),
            "{ev:?}"
        );
        assert_eq!(old.write(1), Err(IoError::NotRunning));
    }

    /// Only a is in sync and b and c are rebuilt from it when a refuses a
    /// request (here a rebuild's read). a is the last copy in sync, so it
    /// stays in sync, marked failing, with nothing outstanding whose answer
    /// would clear the mark: found by the simulator (seed 4734), where the
    /// rebuilds then waited for ever for a source. The engine asks it
    /// again; once it answers, b and c are rebuilt and join.
    #[test]
    fn the_last_copy_in_sync_marked_failing_is_asked_again_and_the_others_rebuild() {
        let (_, mut r) = Net::new();
        r.in_sync.retain(|n, _| n == "a");
        let mut net = Net::holding(&r);
        let mut e = net.publish("a", &r, "ctl1");
        net.run(&mut e, 3);
        assert_eq!(e.state(), EngineState::Running);
        assert!(!e.all_in_sync());
        let conn = e.links["a"].conn;
        e.handle(
            "a",
            Reply::Refused {
                conn,
                why: IoRefusal::StaleConn,
            },
        );
        assert!(e.links["a"].failing);
        net.run(&mut e, 100);
        assert!(e.all_in_sync(), "{:?}", e.copies());
        assert_eq!(net.voters["a"].state().record.in_sync.len(), 3);
    }

    /// c is being rebuilt when a write reaches it late: after a flush that
    /// was sent to it while the write was on its way, and after the flush
    /// that ends its rebuild. Meanwhile the first flush waits for a slow
    /// b. Once c holds the write it may not join before a flush of its own
    /// makes the write stable there, or the pending flush, acknowledged
    /// later, promises a write that c, in sync, holds only in memory (the
    /// simulator's seed 19554, where every other copy then dropped out and
    /// the write was lost).
    #[test]
    fn a_copy_joins_only_once_it_holds_stable_what_a_pending_flush_promises() {
        let (mut net, mut e, _) = Net::with_c_out();
        assert!(!e.record().in_sync.contains_key("c"));
        net.down.clear();
        let mut held = Vec::new();
        let to_c_write = |m: &Envelope| m.to == "c" && matches!(m.msg, Request::Write { .. });
        for _ in 0..10 {
            if e.links["c"].phase == Phase::Rebuilding {
                break;
            }
            net.run(&mut e, 1);
        }
        assert_eq!(e.links["c"].phase, Phase::Rebuilding);
        let w = e.write(1).unwrap();
        let ev = net.exchange(&mut e, Vec::new(), &mut held, &to_c_write);
        assert_eq!(acked(&ev), [w], "c is not required yet");
        let slow = |m: &Envelope| to_c_write(m) || m.to == "b";
        let f = e.flush().unwrap();
        let mut events = net.exchange(&mut e, Vec::new(), &mut held, &slow);
        for _ in 0..6 {
            if e.links["c"].flushed {
                break;
            }
            events.extend(net.run_holding(&mut e, 1, &mut held, &slow));
        }
        assert!(e.links["c"].flushed, "c's rebuild did not end");
        // The write reaches c; b stays slow a little longer.
        let (late, rest): (Vec<_>, Vec<_>) = held.drain(..).partition(|m| m.to == "c");
        held = rest;
        events.extend(net.exchange(&mut e, late, &mut held, &slow));
        events.extend(net.run_holding(&mut e, 3, &mut held, &|m| m.to == "b"));
        events.extend(net.exchange(&mut e, std::mem::take(&mut held), &mut held, &|_| false));
        events.extend(net.run(&mut e, 30));
        assert!(
            events.contains(&EngineEvent::FlushAcked { id: f }),
            "{events:?}"
        );
        assert!(e.all_in_sync(), "{:?}", e.copies());
        for n in e.record().in_sync.keys() {
            assert_eq!(
                net.voters[n].durable_data().get(&1),
                Some(&w),
                "{n} in sync without the flushed write on stable storage"
            );
        }
    }
}
