//! The voter side on disk: each node keeps its copies (and witness records)
//! of replicated volumes under `<pool>/replicas/<uuid>/`:
//! - `voter.json`: the [`VoterState`] (promise, accepted ballot and record,
//!   boot), replaced atomically and made durable before any reply that
//!   depends on it;
//! - `data` (copies only): the volume's bytes, a sparse file;
//! - `tags` (copies only): 16 bytes per region, the [`Tag`] of the write
//!   that last filled it (epoch, sequence number; little endian), written
//!   after the region's bytes and made durable with them by a flush;
//! - `checked` and `unreadable` (copies only, when there is something to
//!   say): how far the scrub's checks got ([`checked`]) and the regions
//!   the disk could not read while the volume was idle ([`unreadable`]).
//!
//! The `data` file is written and read through the page cache: a write is
//! stable only after the next flush (`fdatasync`), which is all the engine
//! counts on. So that a flush finds little left to write, each copy starts
//! writing back after a window of writes sized to its disk
//! ([`writeback`]). Direct I/O made every write wait for the disk; see the
//! README's *Performance* of replicated volumes for the figures.
//!
//! Decisions are the [`Voter`]'s; this module adds the bytes. A `Write`
//! stores its bytes when the voter took its tag for the region and a
//! `Rebuild` whenever the voter holds its tag afterwards, under a lock per region, so a late duplicate never overwrites a
//! newer write. A flush (and an attach) `fdatasync`s the data and the tags.
//! A copy's boot rises once each time this process first opens it, so an
//! engine learns that unflushed writes may be gone. Not after a clean
//! close ([`ReplicaStore::close_all`] on SIGTERM, a record that releases
//! the volume as it is taken, and [`ReplicaStore::close_idle`] for a copy
//! nobody wrote for a while): that
//! syncs the copy and leaves a `clean` file naming its boot, which the next
//! open keeps (nothing unflushed was lost, so the copies stay in sync and
//! need no rebuild). The first write after a clean close removes the file,
//! durably, before its bytes land. A sync that fails (the disk could not
//! write back what the copy held in memory) gives the copy a new boot too,
//! as if it had restarted: see `Held::lose_if_failed`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::volume::id::Uuid;
use bytes::Bytes;

use super::REGION_BYTES;
use super::protocol::{Ballot, Digest, Region, Reply, Request, Tag, Voter, VoterState};
use super::record::{ReplicaRecord, Role, same_members};
use super::wire::{Answer, Call};

mod checked;
mod snap;
mod unreadable;
pub use checked::{Checked, ReadPass, ReadSums, unix_now};
pub use unreadable::{IdleCopy, unreadable_in};
pub mod writeback;
pub use snap::{Base, GroupOf, SnapshotInfo};

const VOTER_FILE: &str = "voter.json";
const DATA_FILE: &str = "data";
const TAGS_FILE: &str = "tags";
/// Present after a clean close: the boot the copy closed at, every write
/// of which is on stable storage.
const CLEAN_FILE: &str = "clean";
const TAG_BYTES: u64 = 16;
/// Writes to regions that share a stripe serialize; different stripes run
/// in parallel.
const STRIPES: usize = 64;

/// Why the store could not serve a call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no copy of replicated volume {0} on this node")]
    NotFound(Uuid),
    #[error("replicated volume {uuid} already has a copy here with another record")]
    Conflict { uuid: Uuid },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request rests on a record this copy has moved past: read the
    /// record again and retry.
    #[error("stale: {0}")]
    Stale(String),
    #[error("replica storage {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |err| StoreError::Io {
        path: path.to_owned(),
        err,
    }
}

/// The boot a copy in `dir` was closed clean at, if it was.
fn clean_boot(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(CLEAN_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Removes `dir`'s `CLEAN_FILE` durably (nothing if it is not there).
fn remove_clean_file(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(CLEAN_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => crate::os::fs::sync_dir(dir).map_err(io_err(dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// The boot a new copy starts at: the one its first record names it in
/// sync at (a new volume's copies, a restore's or a clone's copies that
/// start from their source), else a random one (48 bits, never 0: a copy
/// that joins empty and is rebuilt). Boots are only compared for equality,
/// and placement may choose a node for a copy of a volume it held a copy
/// of long ago: were every joiner to start at the same boot, a far-delayed
/// request meant for the old copy, from an engine still at the same epoch,
/// would pass as one for the new copy.
fn first_boot(record: &ReplicaRecord, node: &str) -> u64 {
    match record.in_sync.get(node) {
        Some(&boot) if boot != 0 => boot,
        _ => random_boot(),
    }
}

/// A boot no other is likely to have: 48 random bits, never 0.
fn random_boot() -> u64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits & ((1 << 48) - 1)).max(1)
}

fn region_len(size: u64, region: Region) -> u64 {
    let start = u64::from(region) * REGION_BYTES;
    size.saturating_sub(start).min(REGION_BYTES)
}

fn regions_of(size: u64) -> u64 {
    size.div_ceil(REGION_BYTES)
}

/// One copy or witness record, open.
#[derive(Debug)]
struct Held {
    dir: PathBuf,
    voter: Mutex<Voter>,
    /// The voter's state as last made durable: what [`ReplicaStore::get`]
    /// answers without waiting for a change being persisted under the
    /// voter's lock (a stalled disk would hold every reader of the record
    /// for as long).
    durable: Mutex<VoterState>,
    /// The voter's role (fixed when it is restored).
    role: Role,
    data: Option<File>,
    tags: Option<File>,
    /// The data file opened once more, for the pacer: its waits for
    /// writeback take the errors of that writeback for this descriptor
    /// only (the kernel reports a writeback error once per open file), so
    /// the next flush, on `data`, still reports them.
    pacing: Option<File>,
    stripes: Vec<Mutex<()>>,
    /// When the data file's writeback is started (see [`writeback`]).
    pacer: writeback::Pacer,
    /// Held across each sync of the data and tags, so that no sync answers
    /// for what another one found lost.
    syncing: Mutex<()>,
    /// A sync failed and the voter has not yet been told (see
    /// [`Held::lose_if_failed`]).
    sync_failed: AtomicBool,
    /// Whether `CLEAN_FILE` is there: a write removes it first.
    clean: Mutex<bool>,
    /// `clean`, read without its lock by every write (set and cleared
    /// under it, and only set with every stripe held).
    clean_hint: AtomicBool,
    /// When bytes were last written, in milliseconds since `opened`.
    last_write: AtomicU64,
    opened: std::time::Instant,
    /// The copy lists regions its disk could not read while it was idle
    /// (see [`unreadable`]); the list is read and written under
    /// `unreadable_lock`.
    has_unreadable: AtomicBool,
    unreadable_lock: Mutex<()>,
    /// How far the checks of the copy got (see [`checked`]).
    checked: Mutex<checked::HeldChecked>,
}

/// Volumes with an open, a create's placement or a delete under way in
/// this process: one at a time per volume. They do their disk I/O under
/// this mark instead of with the store's `open` lock held, so that a
/// stalled disk holds up the calls of that volume only, not every call on
/// the node.
#[derive(Debug, Default)]
struct Busy {
    volumes: Mutex<HashSet<Uuid>>,
    freed: Condvar,
}

impl Busy {
    /// Marks `uuid` busy, once no one else has it marked.
    fn hold(&self, uuid: Uuid) -> BusyMark<'_> {
        let mut volumes = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        while !volumes.insert(uuid) {
            volumes = self.freed.wait(volumes).unwrap_or_else(|e| e.into_inner());
        }
        BusyMark { busy: self, uuid }
    }
}

/// A volume marked by [`Busy::hold`], until dropped.
struct BusyMark<'a> {
    busy: &'a Busy,
    uuid: Uuid,
}

impl Drop for BusyMark<'_> {
    fn drop(&mut self) {
        self.busy
            .volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.uuid);
        self.busy.freed.notify_all();
    }
}

impl Held {
    /// Closes the copy clean: with every stripe held (no write under
    /// way), syncs the data and tags and records the boot in `CLEAN_FILE`.
    /// Without `wait`, gives up (false) when a stripe is held (a write, or
    /// a group snapshot's freeze). False for a witness, which holds no
    /// data.
    fn close_clean(&self, wait: bool) -> Result<bool, StoreError> {
        if self.data.is_none() {
            return Ok(false);
        }
        let mut stripes = Vec::with_capacity(self.stripes.len());
        for m in &self.stripes {
            stripes.push(if wait {
                m.lock().unwrap_or_else(|e| e.into_inner())
            } else {
                match m.try_lock() {
                    Ok(g) => g,
                    Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
                }
            });
        }
        let mut clean = self.clean.lock().unwrap_or_else(|e| e.into_inner());
        self.save_checked(&mut self.checked.lock().unwrap_or_else(|e| e.into_inner()));
        self.sync()?;
        let boot = self
            .voter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .boot;
        let path = self.dir.join(CLEAN_FILE);
        crate::os::fs::write_atomic(&path, boot.to_string().as_bytes()).map_err(io_err(&path))?;
        *clean = true;
        self.clean_hint.store(true, Ordering::Release);
        Ok(true)
    }

    /// Removes `CLEAN_FILE`, durably, if it is there: called before any
    /// byte is written.
    fn unmark_clean(&self) -> Result<(), StoreError> {
        if !self.clean_hint.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut clean = self.clean.lock().unwrap_or_else(|e| e.into_inner());
        if *clean {
            remove_clean_file(&self.dir)?;
            *clean = false;
            self.clean_hint.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn persist(&self, state: &VoterState) -> Result<(), StoreError> {
        let path = self.dir.join(VOTER_FILE);
        let json = serde_json::to_vec(state).map_err(|e| StoreError::Invalid(e.to_string()))?;
        crate::os::fs::write_atomic(&path, &json).map_err(io_err(&path))
    }

    /// Makes the data and tags durable. A failure loses what was not
    /// flushed: see [`Held::lose_if_failed`], done here at once.
    fn sync(&self) -> Result<(), StoreError> {
        let synced = self.sync_files();
        if synced.is_err() {
            self.lose_if_failed(&mut self.voter.lock().unwrap_or_else(|e| e.into_inner()));
        }
        synced
    }

    /// [`Held::sync`] without telling the voter of a failure (for a caller
    /// that holds the voter's lock; the next [`Held::lose_if_failed`]
    /// does). One sync at a time: the kernel reports a writeback error to
    /// one sync only and marks the pages it could not write clean, so a
    /// sync running beside the failed one could succeed and answer for
    /// them.
    fn sync_files(&self) -> Result<(), StoreError> {
        let (Some(d), Some(t)) = (&self.data, &self.tags) else {
            return Ok(());
        };
        let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        let synced = d.sync_data().and_then(|()| t.sync_data());
        if synced.is_err() {
            self.sync_failed.store(true, Ordering::SeqCst);
        }
        synced.map_err(io_err(&self.dir))
    }

    /// After a failed sync, what the copy had not flushed may be gone for
    /// good: it counts as restarted. The voter takes a new boot (persisted
    /// when the disk lets it), so every request made at the old boot, a
    /// flush sent before the failure among them, is refused, and the
    /// engine rebuilds here what it had not seen flushed. The new boot is
    /// a random one, not the next: when it cannot be made durable, a
    /// restart of this process opens the copy at the durable boot's next,
    /// which must not be one an engine saw this copy in sync at since.
    /// Called with the voter's lock held, before it decides anything.
    fn lose_if_failed(&self, v: &mut Voter) {
        // A load first: every write and read passes here.
        if !self.sync_failed.load(Ordering::Acquire)
            || !self.sync_failed.swap(false, Ordering::SeqCst)
        {
            return;
        }
        let mut state = v.state().clone();
        state.boot = random_boot();
        // What a restart does: unflushed writes and connections gone.
        *v = Voter::restore(v.node(), state.clone(), v.durable_data().clone());
        tracing::warn!(dir = %self.dir.display(), boot = state.boot, "a sync of the copy failed: it counts as restarted, what it had not flushed is rebuilt");
        match self.persist(&state) {
            Ok(()) => *self.durable.lock().unwrap_or_else(|e| e.into_inner()) = state,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "the copy's new boot is not durable")
            }
        }
    }

    fn data(&self) -> Result<(&File, &File), StoreError> {
        match (&self.data, &self.tags) {
            (Some(d), Some(t)) => Ok((d, t)),
            _ => Err(StoreError::Invalid("a witness holds no data".to_owned())),
        }
    }

    /// Runs one call: the voter decides, the bytes follow.
    fn handle(&self, call: Call) -> Result<Answer, StoreError> {
        match call.request {
            Request::Write { region, tag, .. } | Request::Rebuild { region, tag, .. } => {
                self.store(call, region, tag)
            }
            Request::Read { region, .. } => self.read(call, region),
            Request::Verify { region, .. } => self.verify(call, region),
            Request::Flush { .. } | Request::Attach { .. } => {
                // Sync first: the voter's answer promises stability.
                if self.data.is_some() {
                    self.sync()?;
                }
                let mut answer = self.decide(call.request)?;
                if let Some(Reply::Attached {
                    unreadable,
                    scrubbed,
                    ..
                }) = answer.reply.as_mut()
                {
                    *unreadable = self.unreadable();
                    *scrubbed = self.scrubbed();
                }
                Ok(answer)
            }
            Request::Prepare { .. } | Request::Accept { .. } | Request::Commit { .. } => {
                self.decide(call.request)
            }
        }
    }

    /// The volume's size as the record this copy holds says.
    fn size(&self) -> u64 {
        self.voter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .record
            .size
    }

    /// Extends the data and tags files to a grown record's size.
    fn grow(&self, size: u64) -> Result<(), StoreError> {
        if let (Some(d), Some(t)) = (&self.data, &self.tags) {
            if d.metadata().map_err(io_err(&self.dir))?.len() < size {
                d.set_len(size).map_err(io_err(&self.dir))?;
            }
            let tags = regions_of(size) * TAG_BYTES;
            if t.metadata().map_err(io_err(&self.dir))?.len() < tags {
                t.set_len(tags).map_err(io_err(&self.dir))?;
            }
            // The voter's lock is held: a failure reaches it next time.
            self.sync_files()?;
        }
        Ok(())
    }

    /// Hands a request to the voter and persists its state when the
    /// request changed it, before the answer leaves. A record that grew the
    /// volume extends the files first. A record that releases the volume
    /// (its owner gone: ControllerUnpublishVolume, after the engine
    /// flushed and stopped) closes the copy clean before the answer leaves,
    /// so a crash of this node right after costs no rebuild (the idle
    /// close would come only after [`ReplicaStore::close_idle`]'s wait).
    fn decide(&self, req: Request) -> Result<Answer, StoreError> {
        let mut v = self.voter.lock().unwrap_or_else(|e| e.into_inner());
        self.lose_if_failed(&mut v);
        let before = v.state().clone();
        let reply = v.handle(req);
        let grown = v.state().record.size > before.record.size;
        if *v.state() != before {
            if let Err(e) = (if grown {
                self.grow(v.state().record.size)
            } else {
                Ok(())
            })
            .and_then(|()| self.persist(v.state()))
            {
                // Not durable: forget the change so nothing depends on it.
                *v = Voter::restore(v.node(), before, v.durable_data().clone());
                return Err(e);
            }
            *self.durable.lock().unwrap_or_else(|e| e.into_inner()) = v.state().clone();
        }
        let released = before.record.owner.is_some() && v.state().record.owner.is_none();
        // close_clean takes the voter's lock itself.
        drop(v);
        if released
            && !self.clean_hint.load(Ordering::Acquire)
            && let Err(e) = self.close_clean(false)
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "released copy not closed clean: its next open starts a new boot");
        }
        Ok(Answer {
            reply,
            data: Bytes::new(),
        })
    }

    fn check_range(&self, region: Region, offset: u64, len: u64) -> Result<(), StoreError> {
        let size = self.size();
        let rl = region_len(size, region);
        if rl == 0 || offset.checked_add(len).is_none_or(|end| end > rl) {
            return Err(StoreError::Invalid(format!(
                "bytes {offset}+{len} are outside region {region} of a {size}-byte volume"
            )));
        }
        Ok(())
    }

    fn store(&self, call: Call, region: Region, tag: Tag) -> Result<Answer, StoreError> {
        let (data, tags) = self.data()?;
        let rebuild = matches!(call.request, Request::Rebuild { .. });
        let offset = if rebuild { 0 } else { u64::from(call.offset) };
        let len = call.data.len() as u64;
        if rebuild && len != region_len(self.size(), region) {
            return Err(StoreError::Invalid(format!(
                "a rebuild of region {region} carries {len} bytes"
            )));
        }
        self.check_range(region, offset, len)?;
        let region_lock = self.stripes[region as usize % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Before the voter takes the tag: a copy closed clean stops being
        // so before any byte can land (or the voter expect one).
        self.last_write
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.unmark_clean()?;
        let (reply, took) = {
            let mut v = self.voter.lock().unwrap_or_else(|e| e.into_inner());
            self.lose_if_failed(&mut v);
            let before = v.data().get(&region).copied();
            let reply = v.handle(call.request);
            let after = v.data().get(&region).copied();
            // A rebuild always lands when the voter takes its tag: the
            // region may hold that tag's write without the older partial
            // writes the copy missed, and the rebuild brings the whole
            // region. A write already held (a duplicate) is skipped.
            (
                reply,
                after == Some(tag) && (rebuild || before != Some(tag)),
            )
        };
        if took {
            let at = u64::from(region) * REGION_BYTES + offset;
            data.write_all_at(&call.data, at)
                .map_err(io_err(&self.dir))?;
            let mut t = [0u8; TAG_BYTES as usize];
            t[..8].copy_from_slice(&tag.epoch.to_le_bytes());
            t[8..].copy_from_slice(&tag.seq.to_le_bytes());
            tags.write_all_at(&t, u64::from(region) * TAG_BYTES)
                .map_err(io_err(&self.dir))?;
            // The pacer may wait for the disk: not with the stripe held.
            drop(region_lock);
            self.pacer.wrote(self.pacing.as_ref().unwrap_or(data), len);
            if rebuild {
                self.rewritten(region)?;
            }
        }
        Ok(Answer {
            reply,
            data: Bytes::new(),
        })
    }

    fn read(&self, call: Call, region: Region) -> Result<Answer, StoreError> {
        let (data, _) = self.data()?;
        let (offset, len) = if call.len == 0 {
            (0, region_len(self.size(), region))
        } else {
            (u64::from(call.offset), u64::from(call.len))
        };
        self.check_range(region, offset, len)?;
        let reply = {
            let mut v = self.voter.lock().unwrap_or_else(|e| e.into_inner());
            self.lose_if_failed(&mut v);
            v.handle(call.request)
        };
        let mut buf = Vec::new();
        if matches!(reply, Some(Reply::ReadData { .. })) {
            buf = vec![0u8; len as usize];
            data.read_exact_at(&mut buf, u64::from(region) * REGION_BYTES + offset)
                .map_err(io_err(&self.dir))?;
        }
        Ok(Answer {
            reply,
            data: buf.into(),
        })
    }
}

impl Held {
    /// A scrub's check of `region` (see [`Request::Verify`]): the voter
    /// decides, then the region is read from the disk and digested.
    fn verify(&self, call: Call, region: Region) -> Result<Answer, StoreError> {
        self.data()?;
        let len = region_len(self.size(), region);
        self.check_range(region, 0, len)?;
        let mut reply = {
            let mut v = self.voter.lock().unwrap_or_else(|e| e.into_inner());
            self.lose_if_failed(&mut v);
            v.handle(call.request)
        };
        if let Some(Reply::Verified { digest, .. }) = reply.as_mut() {
            // Checked, whatever the disk answers: the engine repairs what
            // it cannot read.
            self.scrub_checked(region);
            *digest = self.digest_of(region, len)?;
        }
        Ok(Answer {
            reply,
            data: Bytes::new(),
        })
    }

    /// A SHA-256 of `len` bytes of `region` as the disk holds them (see
    /// [`unreadable::read_region`]).
    fn digest_of(&self, region: Region, len: u64) -> Result<Digest, StoreError> {
        unreadable::read_region(&self.dir, region, len, unreadable::digest)
    }
}

/// What a node holds of one replicated volume, as `stowage volume status`
/// and the controller see it.
#[derive(Debug, Clone)]
pub struct HeldState {
    pub role: Role,
    pub state: VoterState,
    /// How long since the state was last written (`voter.json`'s mtime:
    /// a change the voter took, or an open by a new process); None when
    /// the clock or the file cannot tell.
    pub idle: Option<std::time::Duration>,
    /// How many bytes this copy lets be written before it starts writing
    /// them back, as its disk's pace set it ([`writeback`]); None for a
    /// witness.
    pub writeback_window: Option<u64>,
    /// How far the checks of the copy got (None for a witness).
    pub checked: Option<Checked>,
    /// How many regions its disk could not read when its node checked it
    /// while idle, waiting for the next engine to write them again.
    pub unreadable: usize,
}

/// Every copy and witness record on this node.
#[derive(Debug)]
pub struct ReplicaStore {
    root: PathBuf,
    node: String,
    open: Mutex<HashMap<Uuid, Arc<Held>>>,
    /// Snapshots being taken, by taker: the snapshot, and whether it was
    /// deleted meanwhile (the taker then keeps nothing). See
    /// `snap.rs`.
    taking: Mutex<HashMap<u64, (Uuid, bool)>>,
    takers: AtomicU64,
    /// Volumes whose member is being deleted here: read as gone and not
    /// opened again until the delete ended. A delete does its I/O under
    /// the volume's busy mark, without `open` held, so a stalled disk does
    /// not hold every call on the node for as long. (Taken with `open`
    /// held, or alone.)
    deleting: Mutex<HashSet<Uuid>>,
    /// See [`Busy`]. Never waited for with `open` held.
    busy: Busy,
}

impl ReplicaStore {
    /// The store of node `node` under `<pool>/replicas` (created, 0700).
    pub fn open(pool: &Path, node: &str) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let root = pool.join("replicas");
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&root))?;
        // A create or delete cut short leaves only these behind.
        for entry in std::fs::read_dir(&root).map_err(io_err(&root))? {
            let entry = entry.map_err(io_err(&root))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".new-") || name.starts_with(".gone-") {
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
        let store = ReplicaStore {
            root,
            node: node.to_owned(),
            open: Mutex::new(HashMap::new()),
            taking: Mutex::new(HashMap::new()),
            takers: AtomicU64::new(0),
            deleting: Mutex::new(HashSet::new()),
            busy: Busy::default(),
        };
        store.clean_snapshots()?;
        Ok(store)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn dir(&self, uuid: Uuid) -> PathBuf {
        self.root.join(uuid.to_hex())
    }

    /// Creates this node's member of a new volume holding its first
    /// record (at [`Ballot::zero`], a `first_boot`). Idempotent: a member that
    /// exists with the same first record is left as it is.
    pub fn create(&self, record: &ReplicaRecord) -> Result<(), StoreError> {
        self.create_from(record, None)
    }

    /// [`ReplicaStore::create`], where a copy in the record's in-sync set
    /// starts from `base` (a restore or a clone) instead of zeros. A first
    /// record starts at any epoch (a restored volume's starts at the
    /// source's), at version 0 and with no owner.
    pub fn create_from(
        &self,
        record: &ReplicaRecord,
        base: Option<&Base>,
    ) -> Result<(), StoreError> {
        self.create_from_gated(record, base, &mut || true)
    }

    /// [`ReplicaStore::create_from`], made only if `gate` still says so
    /// when the member is ready to be put in place (and, for a clone, when
    /// the source copy is frozen): a create its caller stopped waiting
    /// for leaves nothing, as the caller took it for failed (and removed
    /// the members it made) or, gone, leaves it to a retry.
    pub fn create_from_gated(
        &self,
        record: &ReplicaRecord,
        base: Option<&Base>,
        gate: &mut dyn FnMut() -> bool,
    ) -> Result<(), StoreError> {
        record
            .validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        if record.version != 0 || record.owner.is_some() {
            return Err(StoreError::Invalid("not a first record".to_owned()));
        }
        let Some(member) = record.members.iter().find(|m| m.node == self.node) else {
            return Err(StoreError::Invalid(format!(
                "node {} is not a member of volume {}",
                self.node, record.uuid
            )));
        };
        let dir = self.dir(record.uuid);
        let existing = || -> Result<(), StoreError> {
            let held = self.load(record.uuid)?;
            let v = held.voter.lock().unwrap_or_else(|e| e.into_inner());
            let r = &v.state().record;
            if same_members(&r.members, &record.members) && r.size == record.size {
                Ok(())
            } else {
                Err(StoreError::Conflict { uuid: record.uuid })
            }
        };
        if dir.exists() {
            return existing();
        }
        let tmp = Self::scratch(&self.root, &record.uuid.to_hex())?;
        let boot = first_boot(record, &self.node);
        let made = (|| {
            let based = base.filter(|_| record.in_sync.contains_key(&self.node));
            if let (Role::Copy, Some(base)) = (member.role, based) {
                self.fill_from(base, record, &tmp, gate)?;
            } else if member.role == Role::Copy {
                for (name, len) in [
                    (DATA_FILE, record.size),
                    (TAGS_FILE, regions_of(record.size) * TAG_BYTES),
                ] {
                    let p = tmp.join(name);
                    let f = File::create(&p).map_err(io_err(&p))?;
                    f.set_len(len).map_err(io_err(&p))?;
                    f.sync_all().map_err(io_err(&p))?;
                }
            }
            let state = VoterState {
                promised: Ballot::zero(),
                accepted: Ballot::zero(),
                record: record.clone(),
                boot,
                floor: member.since,
            };
            let p = tmp.join(VOTER_FILE);
            let json =
                serde_json::to_vec(&state).map_err(|e| StoreError::Invalid(e.to_string()))?;
            crate::os::fs::write_atomic(&p, &json).map_err(io_err(&p))
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let busy = self.busy.hold(record.uuid);
        if dir.exists() {
            // Made meanwhile by a concurrent create.
            let _ = std::fs::remove_dir_all(&tmp);
            drop(busy);
            return existing();
        }
        if !gate() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(StoreError::Stale(
                "the create was called off: its caller stopped waiting".to_owned(),
            ));
        }
        let placed = std::fs::rename(&tmp, &dir)
            .map_err(io_err(&dir))
            .and_then(|()| crate::os::fs::sync_dir(&self.root).map_err(io_err(&self.root)));
        if let Err(e) = placed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let held = Self::open_held(&dir, &self.node, boot, None)?;
        // A delete begun meanwhile waits for the busy mark, then closes it.
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.uuid, Arc::new(held));
        Ok(())
    }

    /// Closes every open copy clean (see the module documentation), for a
    /// process about to exit; how many. Writes may still come: the first
    /// one to a copy undoes its clean close.
    pub fn close_all(&self) -> usize {
        self.close_where(true, |_| true)
    }

    /// Closes clean (see the module documentation) every open copy not
    /// written for `idle` and not closed clean since, unless a stripe of it
    /// is held; how many. A crash then costs such a copy no boot: the
    /// copies of a volume nobody writes stay in sync through it.
    pub fn close_idle(&self, idle: std::time::Duration) -> usize {
        let idle = idle.as_millis() as u64;
        self.close_where(false, |h| {
            !h.clean_hint.load(Ordering::Acquire)
                && (h.opened.elapsed().as_millis() as u64)
                    .saturating_sub(h.last_write.load(Ordering::Relaxed))
                    >= idle
        })
    }

    fn close_where(&self, wait: bool, pick: impl Fn(&Held) -> bool) -> usize {
        let open: Vec<(Uuid, Arc<Held>)> = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, h)| h.data.is_some() && pick(h))
            .map(|(u, h)| (*u, Arc::clone(h)))
            .collect();
        let mut closed = 0;
        for (uuid, held) in open {
            match held.close_clean(wait) {
                Ok(true) => closed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = %uuid, error = %e, "copy not closed clean: its next open starts a new boot")
                }
            }
        }
        closed
    }

    fn deleting_now(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        self.deleting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes this node's member of a volume. Idempotent. ABORTED
    /// (stale) while another delete of it runs.
    pub fn delete(&self, uuid: Uuid) -> Result<(), StoreError> {
        if !self.deleting_now().insert(uuid) {
            return Err(StoreError::Stale(format!(
                "volume {uuid} is being deleted here already"
            )));
        }
        // From here on it reads as gone. An open or create of it under
        // way ends first (on a stalled disk, this waits for it).
        let busy = self.busy.hold(uuid);
        let closed = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&uuid);
        let removed = (|| {
            let dir = self.dir(uuid);
            if !dir.exists() {
                return Ok(());
            }
            let gone = self.root.join(format!(".gone-{}", uuid.to_hex()));
            let _ = std::fs::remove_dir_all(&gone);
            std::fs::rename(&dir, &gone).map_err(io_err(&dir))?;
            crate::os::fs::sync_dir(&self.root).map_err(io_err(&self.root))?;
            std::fs::remove_dir_all(&gone).map_err(io_err(&gone))
        })();
        self.deleting_now().remove(&uuid);
        drop(busy);
        // Closed without the lock: a copy's pacer waits for its writeback
        // thread, which other volumes' calls must not wait for.
        drop(closed);
        removed
    }

    /// What this node holds of `uuid`, if anything. The state is the one
    /// last made durable: a record change still being written is not
    /// waited for.
    pub fn get(&self, uuid: Uuid) -> Result<Option<HeldState>, StoreError> {
        let gone = || self.deleting_now().contains(&uuid) || !self.dir(uuid).exists();
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            // Being deleted: held no more. (A stat: nothing written.)
            if gone() {
                let closed = open.remove(&uuid);
                drop(open);
                drop(closed);
                return Ok(None);
            }
        }
        let held = match self.load(uuid) {
            // Deleted since.
            Err(StoreError::NotFound(_)) if gone() => return Ok(None),
            held => held?,
        };
        let state = held
            .durable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let idle = std::fs::metadata(self.dir(uuid).join(VOTER_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok());
        Ok(Some(HeldState {
            role: held.role,
            state,
            idle,
            writeback_window: held.data.is_some().then(|| held.pacer.window()),
            checked: held.checked_now(),
            unreadable: held.unreadable().len(),
        }))
    }

    /// Whether the record this node holds of `uuid` names `node` (a member
    /// or the owner), when that copy is open here already (None: not
    /// open; ask [`ReplicaStore::get`]). No I/O: for every call's check.
    pub fn names(&self, uuid: Uuid, node: &str) -> Option<bool> {
        let held = {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(open.get(&uuid)?)
        };
        let v = held.voter.lock().unwrap_or_else(|e| e.into_inner());
        let r = &v.state().record;
        Some(r.names(node))
    }

    /// [`Self::names`] without waiting: None also when the copy or its
    /// voter is busy (a change being written may hold the voter for as
    /// long as the disk takes). For checks made on an async task, which
    /// must never wait on the disk.
    pub fn names_at_once(&self, uuid: Uuid, node: &str) -> Option<bool> {
        let held = Arc::clone(self.open.try_lock().ok()?.get(&uuid)?);
        let v = held.voter.try_lock().ok()?;
        Some(v.state().record.names(node))
    }

    /// Every volume this node holds a member of.
    pub fn list(&self) -> Result<Vec<Uuid>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let entry = entry.map_err(io_err(&self.root))?;
            if let Some(u) = entry.file_name().to_str().and_then(Uuid::parse_hex) {
                out.push(u);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Serves one protocol call for `uuid`.
    pub fn call(&self, uuid: Uuid, call: Call) -> Result<Answer, StoreError> {
        self.load(uuid)?.handle(call)
    }

    /// This process's open copy of `uuid`; None when it is not open yet.
    /// NotFound while it is being deleted.
    fn opened(&self, uuid: Uuid) -> Result<Option<Arc<Held>>, StoreError> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.deleting_now().contains(&uuid) {
            return Err(StoreError::NotFound(uuid));
        }
        Ok(open.get(&uuid).map(Arc::clone))
    }

    /// The open copy of `uuid`, opened when this process first asks for
    /// it: its files are read and its new boot written under the volume's
    /// busy mark, not with `open` held.
    fn load(&self, uuid: Uuid) -> Result<Arc<Held>, StoreError> {
        if let Some(held) = self.opened(uuid)? {
            return Ok(held);
        }
        let _busy = self.busy.hold(uuid);
        // Opened meanwhile, or deleted.
        if let Some(held) = self.opened(uuid)? {
            return Ok(held);
        }
        let dir = self.dir(uuid);
        let p = dir.join(VOTER_FILE);
        let json = match std::fs::read(&p) {
            Ok(j) => j,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(uuid));
            }
            Err(e) => return Err(io_err(&p)(e)),
        };
        let mut state: VoterState = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display())))?;
        if state.record.uuid != uuid {
            return Err(StoreError::Invalid(format!(
                "{} names volume {}",
                p.display(),
                state.record.uuid
            )));
        }
        // Opened for the first time by this process: a new boot, unless
        // it was closed clean at the boot it has (nothing was lost).
        let clean = clean_boot(&dir);
        if clean == Some(state.boot) {
            tracing::info!(volume = %uuid, boot = state.boot, "copy was closed clean: it keeps its boot");
        } else {
            state.boot += 1;
        }
        remove_clean_file(&dir)?;
        let held = Arc::new(Self::open_held(&dir, &self.node, state.boot, Some(state))?);
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uuid, Arc::clone(&held));
        Ok(held)
    }

    fn open_held(
        dir: &Path,
        node: &str,
        boot: u64,
        state: Option<VoterState>,
    ) -> Result<Held, StoreError> {
        let state = match state {
            Some(s) => s,
            None => {
                let p = dir.join(VOTER_FILE);
                let json = std::fs::read(&p).map_err(io_err(&p))?;
                let mut s: VoterState = serde_json::from_slice(&json)
                    .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display())))?;
                s.boot = boot;
                s
            }
        };
        let size = state.record.size;
        let copy = state
            .record
            .members
            .iter()
            .any(|m| m.node == node && m.role == Role::Copy);
        let (data, tags, pacing, tag_map) = if copy {
            let open = |name: &str| {
                let p = dir.join(name);
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&p)
                    .map_err(io_err(&p))
            };
            let data = open(DATA_FILE)?;
            let tags = open(TAGS_FILE)?;
            let p = dir.join(DATA_FILE);
            let pacing = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&p)
                .map_err(io_err(&p))?;
            // Files never shorter than the record says (it is persisted
            // after they grow; this only repairs a copy made by hand).
            for (f, len) in [(&data, size), (&tags, regions_of(size) * TAG_BYTES)] {
                if f.metadata().map_err(io_err(dir))?.len() < len {
                    f.set_len(len).map_err(io_err(dir))?;
                }
            }
            let mut raw = vec![0u8; (regions_of(size) * TAG_BYTES) as usize];
            tags.read_exact_at(&mut raw, 0).map_err(io_err(dir))?;
            let mut map = BTreeMap::new();
            for (i, c) in raw.chunks_exact(TAG_BYTES as usize).enumerate() {
                let epoch = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                let seq = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
                if epoch != 0 || seq != 0 {
                    map.insert(i as Region, Tag { epoch, seq });
                }
            }
            (Some(data), Some(tags), Some(pacing), map)
        } else {
            (None, None, None, BTreeMap::new())
        };
        let voter = Voter::restore(node, state.clone(), tag_map);
        let held = Held {
            dir: dir.to_owned(),
            role: voter.role(),
            durable: Mutex::new(state),
            voter: Mutex::new(voter),
            data,
            tags,
            pacing,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            pacer: writeback::Pacer::default(),
            syncing: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            clean: Mutex::new(false),
            clean_hint: AtomicBool::new(false),
            last_write: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            // Unsure (a list that cannot be read) counts as some.
            has_unreadable: AtomicBool::new(
                unreadable::listed(dir).map_or(true, |s| !s.is_empty()),
            ),
            unreadable_lock: Mutex::new(()),
            checked: Mutex::new(checked::HeldChecked {
                now: checked::load(dir),
                unsaved: false,
            }),
        };
        {
            let v = held.voter.lock().unwrap_or_else(|e| e.into_inner());
            held.persist(v.state())?;
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first record of a 1 MiB volume with copies on n1, n2 and n3,
    /// none of them in sync yet.
    fn three_copies() -> ReplicaRecord {
        let members = ["n1", "n2", "n3"]
            .into_iter()
            .map(super::super::record::Member::copy)
            .collect();
        ReplicaRecord::new(Uuid::new_random(), 1 << 20, members, &BTreeMap::new()).unwrap()
    }

    /// A copy that joins empty and is deleted and created again on the same
    /// node (a node placement chose once more) starts at a boot of its own
    /// each time; one its first record names in sync starts at that boot.
    /// Each open raises the boot.
    #[test]
    fn a_copy_created_again_starts_at_another_boot() {
        let pool = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        // Named in sync at boot 0: a joiner's first record.
        let record = three_copies();
        let boot = |store: &ReplicaStore| store.get(record.uuid).unwrap().unwrap().state.boot;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            store.create(&record).unwrap();
            let first = boot(&store);
            assert_ne!(first, 0);
            assert!(seen.insert(first), "boot {first} again");
            // Opened again by a new process: the boot rises.
            let reopened = ReplicaStore::open(pool.path(), "n1").unwrap();
            assert_eq!(boot(&reopened), first + 1);
            store.delete(record.uuid).unwrap();
            assert!(store.get(record.uuid).unwrap().is_none());
        }
        let mut named = record.clone();
        named.in_sync.insert("n1".to_owned(), 1);
        store.create(&named).unwrap();
        assert_eq!(boot(&store), 1);
    }

    /// The check made on an async task for every call never waits for a
    /// busy voter (one whose change is being written to a stalled disk):
    /// it answers None at once, and the caller takes the blocking path.
    /// Record reads meanwhile answer the state last made durable.
    #[test]
    fn checks_and_reads_do_not_wait_for_a_busy_voter() {
        use std::sync::mpsc;
        use std::time::Duration;
        let pool = tempfile::tempdir().unwrap();
        let store = Arc::new(ReplicaStore::open(pool.path(), "n1").unwrap());
        let record = three_copies();
        store.create(&record).unwrap();
        let uuid = record.uuid;
        assert_eq!(store.names_at_once(uuid, "n2"), Some(true));
        assert_eq!(store.names_at_once(uuid, "n9"), Some(false));

        let held = Arc::clone(store.open.lock().unwrap().get(&uuid).unwrap());
        let busy = held.voter.lock().unwrap();
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&store);
        std::thread::spawn(move || {
            let checked = s.names_at_once(uuid, "n2");
            let read = s.get(uuid).map(|h| h.map(|h| h.state.record.version));
            let _ = tx.send((checked, read));
        });
        let (checked, read) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a check or read waited for the busy voter");
        drop(busy);
        assert_eq!(checked, None);
        assert_eq!(read.unwrap(), Some(record.version));
    }
}
