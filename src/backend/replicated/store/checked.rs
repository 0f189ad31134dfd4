//! How far the checks of a copy got, in `CHECKED_FILE` beside it, so that
//! the scrub's schedule outlives the processes that run it:
//! - `scrub`: engines' scrub passes (`Engine::scrub`). The copy moves it on
//!   with each check of a region it answers; its attach answers name it,
//!   so the next engine resumes a pass an unpublish, a move or a restart
//!   stopped, and counts the period from the last whole pass instead of
//!   starting the schedule afresh (with engines republished more often
//!   than the period, a pass could otherwise never end).
//! - `read`: the node's own reads of the copy while its volume is not
//!   published ([`ReplicaStore::check_idle`]), which the node's sweep
//!   moves on, so that a restart of the node resumes it too.
//!
//! The node's reads also sum what they read ([`ReadPass`]): the copies in
//! sync of a volume nobody changed since hold the same bytes, so the sums
//! their nodes read at one version of the record agree, and the controller
//! tells a copy whose bytes differ with no engine running.
//!
//! The file is written every [`SAVE_EVERY`] regions and when a check ends:
//! a crash loses a few regions' progress at most, which are then checked
//! again. A file that cannot be read counts as no progress.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{DATA_FILE, Held, ReplicaStore, StoreError, io_err, regions_of};
use crate::backend::replicated::protocol::{CheckMark, Digest, Region};
use crate::volume::id::Uuid;

const CHECKED_FILE: &str = "checked";

/// Progress is written at least every this many regions.
pub(super) const SAVE_EVERY: Region = 16;

/// What `CHECKED_FILE` holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// Engines' scrub passes.
    #[serde(default)]
    pub scrub: CheckMark,
    /// The node's reads while the volume was not published.
    #[serde(default)]
    pub read: CheckMark,
    /// What those reads summed.
    #[serde(default)]
    pub read_sums: ReadSums,
}

/// A node's read of its copy while the volume is not published, as a sum
/// of what it read: the XOR over the regions read of a SHA-256 of each
/// region's number and of its bytes' SHA-256 (in any order, so a pass a
/// restart stopped goes on with it), at the `version` of the record the
/// pass began at. Every change of the record raises its version, a
/// publish among them (so any write), and a pass that sees another
/// version has no sum; nor has one whose disk could not read a region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPass {
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub sum: Option<Digest>,
}

impl ReadPass {
    /// The pass after `region` was read at record `version`, its bytes'
    /// digest `digest` (None: the disk could not read them). Region 0
    /// begins a pass.
    pub fn step(self, region: Region, version: u64, digest: Option<&Digest>) -> ReadPass {
        let pass = if region == 0 {
            ReadPass {
                version,
                sum: Some(Digest::default()),
            }
        } else {
            self
        };
        let sum = match (pass.sum, digest) {
            (Some(mut sum), Some(d)) if pass.version == version => {
                let mut h = ring::digest::Context::new(&ring::digest::SHA256);
                h.update(&region.to_le_bytes());
                h.update(d);
                for (s, b) in sum.iter_mut().zip(h.finish().as_ref()) {
                    *s ^= b;
                }
                Some(sum)
            }
            _ => None,
        };
        ReadPass { sum, ..pass }
    }
}

/// The node's read sums of a copy ([`ReadPass`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSums {
    /// The pass under way.
    #[serde(default)]
    pub pass: ReadPass,
    /// The last whole pass, when it had a sum.
    #[serde(default)]
    pub whole: Option<ReadPass>,
}

impl ReadSums {
    /// After the pass read a region as `pass` says, the last of the copy
    /// when `done`.
    fn read(&mut self, pass: ReadPass, done: bool) {
        if done {
            *self = ReadSums {
                pass: ReadPass::default(),
                whole: pass.sum.is_some().then_some(pass),
            };
        } else {
            self.pass = pass;
        }
    }
}

/// The progress `dir`'s file holds (none without a file, or when it cannot
/// be read: the checks start afresh).
pub(super) fn load(dir: &Path) -> Checked {
    let p = dir.join(CHECKED_FILE);
    match std::fs::read(&p) {
        Ok(json) => serde_json::from_slice(&json).unwrap_or_else(|e| {
            tracing::warn!(path = %p.display(), error = %e, "the scrub's progress cannot be read: checks start afresh");
            Checked::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checked::default(),
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "the scrub's progress cannot be read: checks start afresh");
            Checked::default()
        }
    }
}

fn save(dir: &Path, c: &Checked) -> Result<(), StoreError> {
    let p = dir.join(CHECKED_FILE);
    let json = serde_json::to_vec(c).map_err(|e| StoreError::Invalid(e.to_string()))?;
    crate::os::fs::write_atomic(&p, &json).map_err(io_err(&p))
}

/// The progress of the copy in `dir`: from memory when this process has
/// it open (`held`), from its file otherwise; None when there is no copy
/// (a witness, or gone).
fn checked_of(held: Option<&Held>, dir: &Path) -> Option<Checked> {
    match held {
        Some(h) => h.checked_now(),
        None => dir.join(DATA_FILE).exists().then(|| load(dir)),
    }
}

/// Seconds since the Unix epoch (0 for a clock before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `m` after a check of `region` of `regions`, and whether it is to be
/// written now (every [`SAVE_EVERY`] regions, and when the check reached
/// the last region: then it is done at `now`, with none under way).
pub(super) fn advanced(m: CheckMark, region: Region, regions: u64, now: u64) -> (CheckMark, bool) {
    let next = region.saturating_add(1);
    if u64::from(next) >= regions {
        (CheckMark { done: now, next: 0 }, true)
    } else {
        (
            CheckMark { done: m.done, next },
            next.is_multiple_of(SAVE_EVERY),
        )
    }
}

/// Progress of a [`Held`] copy: kept in memory, written now and then.
#[derive(Debug, Default)]
pub(super) struct HeldChecked {
    pub(super) now: Checked,
    /// Changed since it was last written.
    pub(super) unsaved: bool,
}

impl Held {
    /// How far engines' scrub passes got here, for an attach answer.
    pub(super) fn scrubbed(&self) -> CheckMark {
        self.checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .now
            .scrub
    }

    /// An engine's pass checked `region` here (see [`advanced`]).
    pub(super) fn scrub_checked(&self, region: Region) {
        self.advance(|c| &mut c.scrub, region, regions_of(self.size()), |_, _| {});
    }

    /// Moves the mark `pick` chooses on past `region` of `regions`, and
    /// `then` the rest (told whether that was the last region), written
    /// when [`advanced`] says so.
    fn advance(
        &self,
        pick: fn(&mut Checked) -> &mut CheckMark,
        region: Region,
        regions: u64,
        then: impl FnOnce(&mut Checked, bool),
    ) {
        let mut c = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        let mark = pick(&mut c.now);
        let (moved, save_now) = advanced(*mark, region, regions, unix_now());
        *mark = moved;
        then(&mut c.now, u64::from(region) + 1 >= regions);
        c.unsaved = true;
        if save_now {
            self.save_checked(&mut c);
        }
    }

    /// The progress held in memory; None for a witness (no checks).
    pub(super) fn checked_now(&self) -> Option<Checked> {
        let now = self.checked.lock().unwrap_or_else(|e| e.into_inner()).now;
        self.data.is_some().then_some(now)
    }

    /// Writes the progress if it changed since (a close calls it too).
    pub(super) fn save_checked(&self, c: &mut HeldChecked) {
        if !c.unsaved {
            return;
        }
        match save(&self.dir, &c.now) {
            Ok(()) => c.unsaved = false,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "the scrub's progress is not written")
            }
        }
    }
}

impl ReplicaStore {
    /// How far the checks of `uuid`'s copy here got; None when it is gone
    /// or being deleted.
    pub fn checked(&self, uuid: Uuid) -> Result<Option<Checked>, StoreError> {
        let _busy = self.busy.hold(uuid);
        if self.deleting_now().contains(&uuid) {
            return Ok(None);
        }
        let held = self.opened(uuid)?;
        Ok(checked_of(held.as_deref(), &self.dir(uuid)))
    }

    /// How far the checks of each copy here got (witnesses have none),
    /// without waiting for any volume's busy mark: a copy this process
    /// has open from memory, the others from their files. By volume.
    pub fn all_checked(&self) -> Vec<(Uuid, Checked)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let open: Vec<(Uuid, std::sync::Arc<Held>)> = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(u, h)| (*u, std::sync::Arc::clone(h)))
            .collect();
        let mut found: Vec<(Uuid, Checked)> = entries
            .flatten()
            .filter_map(|e| {
                let uuid = Uuid::parse_hex(e.file_name().to_str()?)?;
                let held = open.iter().find(|(u, _)| *u == uuid).map(|(_, h)| &**h);
                checked_of(held, &e.path()).map(|c| (uuid, c))
            })
            .collect();
        found.sort_by_key(|(u, _)| *u);
        found
    }

    /// The node read `region` of the copy in `dir` (`held`, when this
    /// process has it open) while its volume was not published, which
    /// made its pass `pass` (see [`advanced`]). Called under the volume's
    /// busy mark.
    pub(super) fn read_checked(
        &self,
        dir: &Path,
        held: Option<&Held>,
        region: Region,
        regions: u64,
        pass: ReadPass,
    ) {
        let done = u64::from(region) + 1 >= regions;
        if let Some(h) = held {
            h.advance(
                |c| &mut c.read,
                region,
                regions,
                |c, done| c.read_sums.read(pass, done),
            );
            return;
        }
        // Only `done` is taken from the file: what is not written yet is
        // this region's predecessors, which `advanced` does not need (the
        // pass under way is the caller's).
        let mut c = load(dir);
        let (mark, save_now) = advanced(c.read, region, regions, unix_now());
        c.read = mark;
        c.read_sums.read(pass, done);
        if save_now && let Err(e) = save(dir, &c) {
            tracing::warn!(dir = %dir.display(), error = %e, "the scrub's progress is not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::replicated::REGION_BYTES;
    use crate::backend::replicated::protocol::{Ballot, Io, Reply, Request};
    use crate::backend::replicated::record::{Member, ReplicaRecord};
    use crate::backend::replicated::wire::Call;
    use std::collections::BTreeMap;

    const REGIONS: u64 = SAVE_EVERY as u64 + 4;

    /// A one-copy volume of [`REGIONS`] regions on n1, at epoch 3.
    fn record() -> ReplicaRecord {
        let boots = BTreeMap::from([("n1".to_owned(), 1)]);
        let size = REGIONS * REGION_BYTES;
        let mut r =
            ReplicaRecord::new(Uuid::new_random(), size, vec![Member::copy("n1")], &boots).unwrap();
        r.epoch = 3;
        r
    }

    fn call(request: Request) -> Call {
        Call {
            request,
            offset: 0,
            len: 0,
            data: Vec::new().into(),
        }
    }

    /// What the copy's attach answer names as scrubbed.
    fn attach(store: &ReplicaStore, r: &ReplicaRecord) -> CheckMark {
        let a = store
            .call(
                r.uuid,
                call(Request::Attach {
                    ballot: Ballot::zero(),
                    record: r.clone(),
                    conn: 1,
                }),
            )
            .unwrap();
        match a.reply {
            Some(Reply::Attached { scrubbed, .. }) => scrubbed,
            other => panic!("{other:?}"),
        }
    }

    /// A scrub's check of `region` answered.
    fn verify(store: &ReplicaStore, r: &ReplicaRecord, region: Region) {
        let boot = store.get(r.uuid).unwrap().unwrap().state.boot;
        let io = Io {
            epoch: r.epoch,
            boot,
            conn: 1,
        };
        let a = store
            .call(r.uuid, call(Request::Verify { io, region, id: 7 }))
            .unwrap();
        assert!(matches!(a.reply, Some(Reply::Verified { .. })), "{a:?}");
    }

    /// Engines' scrub progress is kept beside the copy, written every
    /// [`SAVE_EVERY`] regions and on a clean close, and named in every
    /// attach answer, also by a later process; a check of the last region
    /// makes a whole pass, done at that time.
    #[test]
    fn a_copys_scrub_progress_outlives_its_process_and_is_named_at_attach() {
        let pool = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        let r = record();
        store.create(&r).unwrap();
        assert_eq!(attach(&store, &r), CheckMark::default());
        for region in 0..=SAVE_EVERY {
            verify(&store, &r, region);
        }
        let next = SAVE_EVERY + 1;
        assert_eq!(attach(&store, &r), CheckMark { done: 0, next });
        // A process that ends now without closing: the last written.
        let crashed = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(
            attach(&crashed, &r),
            CheckMark {
                done: 0,
                next: SAVE_EVERY
            }
        );
        drop(crashed);
        assert_eq!(store.close_all(), 1);
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(attach(&store, &r), CheckMark { done: 0, next });
        let before = unix_now();
        for region in next..REGIONS as Region {
            verify(&store, &r, region);
        }
        let again = ReplicaStore::open(pool.path(), "n1").unwrap();
        let m = attach(&again, &r);
        assert_eq!(m.next, 0, "{m:?}");
        assert!(m.done >= before && m.done <= unix_now(), "{m:?}");
        let c = again.checked(r.uuid).unwrap().unwrap();
        assert_eq!((c.scrub, c.read), (m, CheckMark::default()));
    }

    /// The node's reads of a copy nobody publishes move its read progress
    /// on, kept apart from the scrub's, whether this process has the copy
    /// open or not; a copy deleted has none.
    #[test]
    fn an_idle_copys_read_progress_is_kept_apart_from_the_scrubs() {
        let pool = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        let r = record();
        store.create(&r).unwrap();
        // Not open in this process.
        let other = ReplicaStore::open(pool.path(), "n1").unwrap();
        let read = |s: &ReplicaStore| s.checked(r.uuid).unwrap().unwrap().read;
        let mut pass = ReadPass::default();
        for region in 0..SAVE_EVERY {
            assert!(other.check_idle(r.uuid, region, 1, &mut pass).unwrap());
        }
        assert_eq!(read(&other).next, SAVE_EVERY);
        assert!(other.open.lock().unwrap().is_empty(), "the check opened it");
        // Open in this one: kept in memory, written every SAVE_EVERY.
        assert!(store.check_idle(r.uuid, SAVE_EVERY, 1, &mut pass).unwrap());
        assert_eq!(read(&store).next, SAVE_EVERY + 1);
        let before = unix_now();
        for region in SAVE_EVERY + 1..REGIONS as Region {
            assert!(store.check_idle(r.uuid, region, 1, &mut pass).unwrap());
        }
        let m = read(&other);
        assert!(m.next == 0 && m.done >= before, "{m:?}");
        assert_eq!(
            other.checked(r.uuid).unwrap().unwrap().scrub,
            CheckMark::default()
        );
        // Every copy's, from memory or from the file alike.
        let all = store.all_checked();
        assert_eq!(
            all.iter()
                .map(|(u, c)| (*u, c.scrub, c.read))
                .collect::<Vec<_>>(),
            [(r.uuid, CheckMark::default(), m)]
        );
        assert_eq!(all[0].1.read_sums.whole.map(|w| w.version), Some(1));
        assert_eq!(other.all_checked(), store.all_checked());
        // Past the data: not a region, nothing moves.
        assert!(
            store
                .check_idle(r.uuid, REGIONS as Region, 1, &mut pass)
                .unwrap()
        );
        assert_eq!(read(&store), m);
        assert!(store.dir(r.uuid).join(DATA_FILE).exists());
        store.delete(r.uuid).unwrap();
        assert_eq!(store.checked(r.uuid).unwrap(), None);
        assert_eq!(other.checked(r.uuid).unwrap(), None);
        assert!(store.all_checked().is_empty());
    }

    /// Reads every region of `uuid`'s idle copy in `store` from `from`,
    /// as the node's sweep does, at record `version`; the pass then.
    fn read_from(store: &ReplicaStore, r: &ReplicaRecord, from: Region, version: u64) -> ReadPass {
        let mut pass = if from == 0 {
            ReadPass::default()
        } else {
            store.checked(r.uuid).unwrap().unwrap().read_sums.pass
        };
        for region in from..REGIONS as Region {
            assert!(
                store
                    .check_idle(r.uuid, region, version, &mut pass)
                    .unwrap()
            );
        }
        pass
    }

    fn whole(store: &ReplicaStore, r: &ReplicaRecord) -> Option<ReadPass> {
        store.checked(r.uuid).unwrap().unwrap().read_sums.whole
    }

    /// Two copies holding the same bytes sum alike, also when a restart
    /// stopped one's read and it resumed; a copy with a byte changed sums
    /// otherwise; a read across a change of the record has no sum.
    #[test]
    fn the_nodes_reads_of_copies_alike_sum_alike() {
        let (p1, p2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (s1, s2) = (
            ReplicaStore::open(p1.path(), "n1").unwrap(),
            ReplicaStore::open(p2.path(), "n1").unwrap(),
        );
        let r = record();
        s1.create(&r).unwrap();
        s2.create(&r).unwrap();
        // The same (nonzero) bytes in both.
        for s in [&s1, &s2] {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(s.dir(r.uuid).join(DATA_FILE))
                .unwrap();
            f.write_all_at(&[7; 4096], 3 * REGION_BYTES + 512).unwrap();
        }
        read_from(&s1, &r, 0, 5);
        let a = whole(&s1, &r).expect("a whole read has a sum");
        assert_eq!(a.version, 5);
        // s2: stopped after a saved region, resumed by a new process.
        let mut pass = ReadPass::default();
        for region in 0..SAVE_EVERY {
            assert!(s2.check_idle(r.uuid, region, 5, &mut pass).unwrap());
        }
        let s2 = ReplicaStore::open(p2.path(), "n1").unwrap();
        read_from(&s2, &r, SAVE_EVERY, 5);
        assert_eq!(whole(&s2, &r), Some(a));
        // One byte changed behind its back.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(s2.dir(r.uuid).join(DATA_FILE))
                .unwrap();
            f.write_all_at(&[8], 3 * REGION_BYTES + 600).unwrap();
            f.sync_all().unwrap();
        }
        read_from(&s2, &r, 0, 5);
        let b = whole(&s2, &r).unwrap();
        assert_ne!(b.sum, a.sum);
        // The record changed half-way: no sum, and none kept from before.
        let mut pass = ReadPass::default();
        for region in 0..REGIONS as Region {
            let version = if region < 3 { 5 } else { 6 };
            assert!(s1.check_idle(r.uuid, region, version, &mut pass).unwrap());
        }
        assert_eq!(whole(&s1, &r), None);
    }

    #[test]
    fn a_check_moves_on_region_by_region_and_is_done_at_the_last() {
        let m = CheckMark { done: 7, next: 0 };
        let (m, save) = advanced(m, 0, 40, 100);
        assert_eq!((m, save), (CheckMark { done: 7, next: 1 }, false));
        let (m, save) = advanced(m, SAVE_EVERY - 1, 40, 100);
        assert_eq!(
            (m, save),
            (
                CheckMark {
                    done: 7,
                    next: SAVE_EVERY
                },
                true
            )
        );
        let (m, save) = advanced(m, 39, 40, 100);
        assert_eq!((m, save), (CheckMark { done: 100, next: 0 }, true));
        // A one-region volume: each check is a whole one.
        assert_eq!(
            advanced(CheckMark::default(), 0, 1, 5),
            (CheckMark { done: 5, next: 0 }, true)
        );
    }
}
