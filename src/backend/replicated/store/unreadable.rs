//! Regions a copy's disk could not read when the copy was checked while
//! its volume was not published: no engine runs then, so none scrubs it
//! (see `Engine::scrub`), and a copy nobody reads could sit on a bad
//! sector until it is needed. The node reads such copies itself
//! ([`ReplicaStore::check_idle`]) and lists the regions its disk fails in
//! `UNREADABLE_FILE` beside the copy. Each attach answer of the copy names
//! them, so the next engine rebuilds them there, which writes them again
//! (a disk remaps a bad sector when it is written); a rebuild of a region
//! takes it off the list.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use super::checked::ReadPass;
use super::{
    DATA_FILE, Held, ReplicaStore, StoreError, VOTER_FILE, io_err, region_len, regions_of,
};
use crate::backend::replicated::REGION_BYTES;
use crate::backend::replicated::protocol::{Digest, Region, VoterState};
use crate::backend::replicated::record::Role;
use crate::volume::id::Uuid;

const UNREADABLE_FILE: &str = "unreadable";

/// A copy to check while its volume is not published
/// ([`ReplicaStore::idle_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleCopy {
    /// How many regions the copy has.
    pub regions: u32,
    /// The version of the record the node holds.
    pub version: u64,
}

/// The regions `dir`'s list names (none without a list).
pub(super) fn listed(dir: &Path) -> Result<BTreeSet<Region>, StoreError> {
    let p = dir.join(UNREADABLE_FILE);
    match std::fs::read(&p) {
        Ok(json) => serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err(&p)(e)),
    }
}

/// Makes `dir`'s list `set`, durably (no list when it is empty).
fn write_listed(dir: &Path, set: &BTreeSet<Region>) -> Result<(), StoreError> {
    let p = dir.join(UNREADABLE_FILE);
    if set.is_empty() {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&p)(e)),
        }
    } else {
        let tmp = dir.join(format!("{UNREADABLE_FILE}.new"));
        let json = serde_json::to_vec(set).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let f = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all_at(&json, 0).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))?;
    }
    crate::os::fs::sync_dir(dir).map_err(io_err(dir))
}

/// Reads `len` bytes of `region` from the copy's data file in `dir` as the
/// disk holds them, and hands them to `f`: with O_DIRECT, since the page
/// cache would answer for a sector the disk can no longer read (the kernel
/// writes back the range's dirty pages first, so the bytes are what the
/// copy holds). Through the cache only where the filesystem takes no
/// O_DIRECT.
pub(super) fn read_region<T>(
    dir: &Path,
    region: Region,
    len: u64,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T, StoreError> {
    let path = dir.join(DATA_FILE);
    let at = u64::from(region) * REGION_BYTES;
    let open = |flags| {
        File::options()
            .read(true)
            .custom_flags(flags | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
    };
    match open(libc::O_DIRECT) {
        Ok(file) => {
            // Whole sectors: the data file's size is whole regions.
            let mut buf = crate::os::fuse_file::AlignedBuf::zeroed(len as usize);
            file.read_exact_at(buf.as_mut_slice(), at)
                .map_err(io_err(&path))?;
            Ok(f(buf.as_slice()))
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let file = open(0).map_err(io_err(&path))?;
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, at).map_err(io_err(&path))?;
            Ok(f(&buf))
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// A SHA-256 of `bytes`.
pub(super) fn digest(bytes: &[u8]) -> Digest {
    let mut d = Digest::default();
    d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    d
}

/// Whether an error is the disk failing a read.
fn disk_failed(e: &StoreError) -> bool {
    matches!(e, StoreError::Io { err, .. } if err.raw_os_error() == Some(libc::EIO))
}

impl Held {
    /// The regions its list names, for an attach answer (none when the
    /// list cannot be read: the engine's scrub finds them then).
    pub(super) fn unreadable(&self) -> Vec<Region> {
        if !self.has_unreadable.load(Ordering::Acquire) {
            return Vec::new();
        }
        let _l = self
            .unreadable_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match listed(&self.dir) {
            Ok(set) => set.into_iter().collect(),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "the list of unreadable regions cannot be read");
                Vec::new()
            }
        }
    }

    /// `region` was rebuilt here (written whole): off the list. A list
    /// that cannot be read is dropped (it must not fail the rebuild).
    pub(super) fn rewritten(&self, region: Region) -> Result<(), StoreError> {
        if !self.has_unreadable.load(Ordering::Acquire) {
            return Ok(());
        }
        let _l = self
            .unreadable_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (mut set, changed) = match listed(&self.dir) {
            Ok(set) => (set, false),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "the list of unreadable regions cannot be read: dropped");
                (BTreeSet::new(), true)
            }
        };
        if set.remove(&region) || changed {
            write_listed(&self.dir, &set)?;
            tracing::info!(dir = %self.dir.display(), region, "a region the disk could not read was written again");
        }
        self.has_unreadable
            .store(!set.is_empty(), Ordering::Release);
        Ok(())
    }
}

impl ReplicaStore {
    /// `uuid`'s copy here, when it is to be checked while idle: a copy of
    /// this node whose volume is not published (a published one is
    /// scrubbed by its engine). None otherwise, or when it is gone.
    pub fn idle_copy(&self, uuid: Uuid) -> Result<Option<IdleCopy>, StoreError> {
        if self.deleting_now().contains(&uuid) {
            return Ok(None);
        }
        let p = self.dir(uuid).join(VOTER_FILE);
        let json = match std::fs::read(&p) {
            Ok(j) => j,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&p)(e)),
        };
        let state: VoterState = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display())))?;
        let r = &state.record;
        let copy = r
            .members
            .iter()
            .any(|m| m.node == self.node && m.role == Role::Copy);
        Ok((copy && r.owner.is_none()).then(|| IdleCopy {
            regions: regions_of(r.size) as u32,
            version: r.version,
        }))
    }

    /// Reads `region` of `uuid`'s copy here from the disk (see the module
    /// documentation) at `version` of its record ([`IdleCopy`]), which
    /// moves `pass` on: false when the disk failed the read, and the region
    /// is then listed for the next engine to rebuild. The copy's read
    /// progress and sums move on (see [`super::Checked::read`]).
    pub fn check_idle(
        &self,
        uuid: Uuid,
        region: Region,
        version: u64,
        pass: &mut ReadPass,
    ) -> Result<bool, StoreError> {
        // No open, create or delete of the copy meanwhile.
        let _busy = self.busy.hold(uuid);
        if self.deleting_now().contains(&uuid) {
            return Ok(true);
        }
        let dir = self.dir(uuid);
        let size = match std::fs::metadata(dir.join(DATA_FILE)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let len = region_len(size, region);
        if len == 0 {
            return Ok(true);
        }
        let held = self.opened(uuid)?;
        let read = read_region(&dir, region, len, digest);
        *pass = pass.step(region, version, read.as_ref().ok());
        // Checked, whatever the disk answered (see `checked`).
        self.read_checked(&dir, held.as_deref(), region, regions_of(size), *pass);
        match read {
            Ok(_) => Ok(true),
            Err(e) if disk_failed(&e) => {
                tracing::warn!(volume = %uuid, region, error = %e,
                    "the disk cannot read a region of an idle copy: its next engine rebuilds it here");
                let _l = held
                    .as_ref()
                    .map(|h| h.unreadable_lock.lock().unwrap_or_else(|e| e.into_inner()));
                // A list that cannot be read is written afresh.
                let mut set = listed(&dir).unwrap_or_default();
                if set.insert(region) {
                    write_listed(&dir, &set)?;
                }
                if let Some(h) = &held {
                    h.has_unreadable.store(true, Ordering::Release);
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// How many regions each copy here lists as unreadable (those listing
    /// any).
    pub fn unreadable_counts(&self) -> Vec<(Uuid, usize)> {
        lists_under(&self.root)
            .into_iter()
            .map(|(u, set)| (u, set.len()))
            .collect()
    }
}

/// Every copy under `pool` that lists regions as unreadable, with them,
/// read from the files alone (`stowage status`: no store is opened).
pub fn unreadable_in(pool: &Path) -> Vec<(Uuid, BTreeSet<Region>)> {
    lists_under(&pool.join("replicas"))
}

/// The copies under a store's `root` that list regions, with them.
fn lists_under(root: &Path) -> Vec<(Uuid, BTreeSet<Region>)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(Uuid, BTreeSet<Region>)> = entries
        .flatten()
        .filter_map(|e| {
            let uuid = Uuid::parse_hex(e.file_name().to_str()?)?;
            let set = listed(&e.path()).ok()?;
            (!set.is_empty()).then_some((uuid, set))
        })
        .collect();
    found.sort();
    found
}
