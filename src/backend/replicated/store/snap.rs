//! Snapshots of this node's copies, and copies that start from one (a
//! restore) or from another volume's copy here (a clone).
//!
//! A snapshot is one copy frozen at a point in time: every region lock of
//! the copy is held while its `data` and `tags` are reflinked (or, where
//! the filesystem cannot share extents, copied sparsely), so no write lands
//! halfway. It is taken only from a copy that is in sync, at its current
//! boot, in the newest record the controller found, so it holds every
//! write acknowledged before the request. Copies of one volume may differ
//! in writes that were in flight (never acknowledged): a volume restored
//! from the snapshots of several copies starts with all of them in sync,
//! and its first engine compares their tags and rebuilds every region that
//! differs from one base copy, so the restored volume is exactly one copy's
//! point in time.
//!
//! Layout: `<pool>/replicas/.snapshots/<snapshot uuid>/` with `data`,
//! `tags` and `snapshot.json`, made in a `.new-*` directory and renamed
//! into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::os::cow;
use crate::volume::id::Uuid;

use super::{DATA_FILE, ReplicaStore, StoreError, TAG_BYTES, TAGS_FILE, io_err, regions_of};
use crate::backend::replicated::record::{ReplicaRecord, Role};

const SNAP_DIR: &str = ".snapshots";
const META_FILE: &str = "snapshot.json";

/// One snapshot of a copy on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub snapshot: Uuid,
    pub volume: Uuid,
    pub size: u64,
    /// The highest epoch of any write the snapshot holds: a volume made
    /// from it starts at this epoch or later, so its own writes always
    /// carry newer tags.
    pub epoch: u64,
    pub created_seconds: i64,
    pub created_nanos: i32,
    /// Every node asked to take this snapshot (the copies in sync in the
    /// record it was taken at), so it can be deleted from all of them.
    pub nodes: Vec<String>,
    /// The group snapshot it is a member of, if any.
    pub group: Option<GroupOf>,
}

/// The group snapshot a snapshot is a member of: the group's uuid, the
/// volumes of all its members (sorted) and every node asked to take one
/// (sorted), so a group cut short shows which members it lacks and where
/// they could be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOf {
    pub group: Uuid,
    pub volumes: Vec<Uuid>,
    pub nodes: Vec<String>,
}

/// `snapshot.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    snapshot: String,
    volume: String,
    size: u64,
    epoch: u64,
    created_seconds: i64,
    created_nanos: i32,
    /// Absent in snapshots taken before it was kept.
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    group_volumes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    group_nodes: Vec<String>,
}

impl Meta {
    fn info(&self) -> Option<SnapshotInfo> {
        let group = match &self.group {
            None => None,
            Some(g) => Some(GroupOf {
                group: Uuid::parse_hex(g)?,
                volumes: self
                    .group_volumes
                    .iter()
                    .map(|v| Uuid::parse_hex(v))
                    .collect::<Option<_>>()?,
                nodes: self.group_nodes.clone(),
            }),
        };
        Some(SnapshotInfo {
            snapshot: Uuid::parse_hex(&self.snapshot)?,
            volume: Uuid::parse_hex(&self.volume)?,
            size: self.size,
            epoch: self.epoch,
            created_seconds: self.created_seconds,
            created_nanos: self.created_nanos,
            nodes: self.nodes.clone(),
            group,
        })
    }
}

/// What a new copy starts from.
#[derive(Debug, Clone)]
pub enum Base {
    /// A snapshot on this node.
    Snapshot(Uuid),
    /// This node's copy of another volume, which must be in sync at its
    /// current boot in `expect`.
    Volume { uuid: Uuid, expect: ReplicaRecord },
}

/// Makes `dst` a copy of `src` sharing extents where the filesystem can.
fn clone_file(src: &Path, dst: &Path) -> Result<(), StoreError> {
    match cow::reflink(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_supported() => cow::sparse_copy(src, dst, &|_, _| true)
            .map(|_| ())
            .map_err(|e| StoreError::Io {
                path: dst.to_owned(),
                err: std::io::Error::other(e.to_string()),
            }),
        Err(e) => Err(StoreError::Io {
            path: dst.to_owned(),
            err: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Extends `dir`'s data and tags to `size` bytes and makes them durable.
fn size_and_sync(dir: &Path, size: u64) -> Result<(), StoreError> {
    for (name, len) in [(DATA_FILE, size), (TAGS_FILE, regions_of(size) * TAG_BYTES)] {
        let p = dir.join(name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err(&p))?;
        if f.metadata().map_err(io_err(&p))?.len() < len {
            f.set_len(len).map_err(io_err(&p))?;
        }
        f.sync_all().map_err(io_err(&p))?;
    }
    Ok(())
}

fn read_meta(dir: &Path) -> Result<Option<SnapshotInfo>, StoreError> {
    let p = dir.join(META_FILE);
    let json = match std::fs::read(&p) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&p)(e)),
    };
    let meta: Meta = serde_json::from_slice(&json)
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", p.display())))?;
    meta.info()
        .map(Some)
        .ok_or_else(|| StoreError::Invalid(format!("{}: malformed uuid", p.display())))
}

/// A snapshot being taken, registered in the store's `taking` until
/// dropped (see [`ReplicaStore::delete_snapshot`]).
struct Taking<'a> {
    store: &'a ReplicaStore,
    id: u64,
}

impl<'a> Taking<'a> {
    fn new(store: &'a ReplicaStore, snap: Uuid) -> Self {
        let id = store.takers.fetch_add(1, Ordering::Relaxed);
        store.taking_now().insert(id, (snap, false));
        Taking { store, id }
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.store.taking_now().remove(&self.id);
    }
}

impl ReplicaStore {
    fn snap_root(&self) -> PathBuf {
        self.root.join(SNAP_DIR)
    }

    /// A scratch directory under `parent` for something being made; the
    /// store removes leftovers (`.new-*`) when it opens.
    pub(super) fn scratch(parent: &Path, name: &str) -> Result<PathBuf, StoreError> {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        let tmp = parent.join(format!(
            ".new-{name}-{:016x}",
            uuid::Uuid::new_v4().as_u64_pair().0
        ));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(tmp)
    }

    /// Removes leftovers of snapshots cut short.
    pub(super) fn clean_snapshots(&self) -> Result<(), StoreError> {
        let root = self.snap_root();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&root)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&root))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
        Ok(())
    }

    /// Copies this node's copy of `uuid` into `dst` (data and tags, made
    /// durable) at one point in time, when it is in sync at its current
    /// boot in `expect` and holds no newer record. `gate` is called once
    /// the copy is frozen and found fit, before anything is copied; the
    /// copy stays frozen while it runs, and nothing is copied when it
    /// returns false. Returns the copy's size and the highest epoch of its
    /// writes.
    fn freeze_into(
        &self,
        uuid: Uuid,
        expect: &ReplicaRecord,
        dst: &Path,
        gate: &mut dyn FnMut() -> bool,
    ) -> Result<(u64, u64), StoreError> {
        if expect.uuid != uuid {
            return Err(StoreError::Invalid(format!(
                "the record given names volume {}, not {uuid}",
                expect.uuid
            )));
        }
        let held = self.load(uuid)?;
        held.data()?;
        // Every region lock, in order (writes take one at a time): no
        // write or rebuild lands on this copy until the files are copied.
        let _frozen: Vec<_> = held
            .stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let (size, epoch) = {
            let mut v = held.voter.lock().unwrap_or_else(|e| e.into_inner());
            // A copy whose sync failed is not in sync at its boot.
            held.lose_if_failed(&mut v);
            let s = v.state();
            if v.role() != Role::Copy {
                return Err(StoreError::Invalid("a witness holds no data".to_owned()));
            }
            if s.record.version > expect.version {
                return Err(StoreError::Stale(format!(
                    "the copy holds a newer record (version {} > {})",
                    s.record.version, expect.version
                )));
            }
            if expect.in_sync.get(&self.node) != Some(&s.boot) {
                return Err(StoreError::Stale(format!(
                    "the copy on {} is not in sync at its boot {}",
                    self.node, s.boot
                )));
            }
            let epoch = v.data().values().map(|t| t.epoch).max().unwrap_or(0);
            (s.record.size.max(expect.size), epoch)
        };
        if !gate() {
            return Err(StoreError::Stale(
                "the freeze was called off or its lease ran out".to_owned(),
            ));
        }
        for name in [DATA_FILE, TAGS_FILE] {
            clone_file(&held.dir.join(name), &dst.join(name))?;
        }
        size_and_sync(dst, size)?;
        Ok((size, epoch))
    }

    /// Snapshots this node's copy of `uuid` as `snap`; see
    /// `ReplicaStore::freeze_into` for when it may. Idempotent: a
    /// snapshot `snap` of the same volume is returned as it is, one of
    /// another volume is a conflict.
    pub fn snapshot(
        &self,
        uuid: Uuid,
        snap: Uuid,
        expect: &ReplicaRecord,
    ) -> Result<SnapshotInfo, StoreError> {
        self.snapshot_gated(uuid, snap, expect, None, &mut || true)
    }

    /// [`Self::snapshot`] as a member of `group`, taken only if `gate`
    /// (called while the copy is frozen, see `freeze_into`) says so. A
    /// snapshot `snap` that exists already is returned without calling
    /// `gate` when it is of the same volume and group.
    pub fn snapshot_gated(
        &self,
        uuid: Uuid,
        snap: Uuid,
        expect: &ReplicaRecord,
        group: Option<&GroupOf>,
        gate: &mut dyn FnMut() -> bool,
    ) -> Result<SnapshotInfo, StoreError> {
        // Registered before anything is looked at, so that a delete from
        // now on either finds the snapshot or marks this taking, which
        // then renames nothing into place (the delete would otherwise find
        // nothing to delete and leave the snapshot to appear afterwards).
        let taking = Taking::new(self, snap);
        let root = self.snap_root();
        let dir = root.join(snap.to_hex());
        if let Some(have) = read_meta(&dir)? {
            return if have.volume == uuid && have.group.as_ref() == group {
                Ok(have)
            } else {
                Err(StoreError::Conflict { uuid: snap })
            };
        }
        let tmp = Self::scratch(&root, &snap.to_hex())?;
        let made = (|| {
            let (size, epoch) = self.freeze_into(uuid, expect, &tmp, gate)?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let meta = Meta {
                snapshot: snap.to_hex(),
                volume: uuid.to_hex(),
                size,
                epoch,
                created_seconds: now.as_secs() as i64,
                created_nanos: now.subsec_nanos() as i32,
                nodes: expect.in_sync.keys().cloned().collect(),
                group: group.map(|g| g.group.to_hex()),
                group_volumes: group
                    .map(|g| g.volumes.iter().map(|v| v.to_hex()).collect())
                    .unwrap_or_default(),
                group_nodes: group.map(|g| g.nodes.clone()).unwrap_or_default(),
            };
            let p = tmp.join(META_FILE);
            let json = serde_json::to_vec(&meta).map_err(|e| StoreError::Invalid(e.to_string()))?;
            crate::os::fs::write_atomic(&p, &json).map_err(io_err(&p))?;
            {
                // Under the lock a delete marks takers with, so that it
                // either marks this one or finds the snapshot in place.
                let takings = self.taking_now();
                if takings.get(&taking.id).is_some_and(|(_, deleted)| *deleted) {
                    return Err(StoreError::Stale(format!(
                        "snapshot {snap} was deleted while it was being taken"
                    )));
                }
                std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            }
            crate::os::fs::sync_dir(&root).map_err(io_err(&root))?;
            meta.info()
                .ok_or_else(|| StoreError::Invalid("malformed uuid".to_owned()))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }

    fn taking_now(&self) -> MutexGuard<'_, HashMap<u64, (Uuid, bool)>> {
        self.taking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every snapshot on this node.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let root = self.snap_root();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&root))?;
            let named = entry.file_name().to_str().and_then(Uuid::parse_hex);
            if named.is_some()
                && let Some(info) = read_meta(&entry.path())?
            {
                out.push(info);
            }
        }
        out.sort_by_key(|i| i.snapshot);
        Ok(out)
    }

    /// Removes snapshot `snap` from this node, and calls off any taking of
    /// it still under way (it keeps nothing). Idempotent.
    pub fn delete_snapshot(&self, snap: Uuid) -> Result<(), StoreError> {
        let root = self.snap_root();
        let dir = root.join(snap.to_hex());
        {
            let mut taking = self.taking_now();
            for (s, deleted) in taking.values_mut() {
                if *s == snap {
                    *deleted = true;
                }
            }
            if !dir.exists() {
                return Ok(());
            }
        }
        let gone = root.join(format!(".gone-{}", snap.to_hex()));
        let _ = std::fs::remove_dir_all(&gone);
        std::fs::rename(&dir, &gone).map_err(io_err(&dir))?;
        crate::os::fs::sync_dir(&root).map_err(io_err(&root))?;
        std::fs::remove_dir_all(&gone).map_err(io_err(&gone))
    }

    /// Fills a new copy's directory `dst` for `record` from `base`: the
    /// files sized to the record, made durable. Every tag the base holds
    /// must be of an epoch the record has reached, or the new volume's own
    /// writes could look older than what the regions hold.
    pub(super) fn fill_from(
        &self,
        base: &Base,
        record: &ReplicaRecord,
        dst: &Path,
        gate: &mut dyn FnMut() -> bool,
    ) -> Result<(), StoreError> {
        let (size, epoch) = match base {
            Base::Snapshot(snap) => {
                let dir = self.snap_root().join(snap.to_hex());
                let Some(info) = read_meta(&dir)? else {
                    return Err(StoreError::Invalid(format!(
                        "no snapshot {snap} on node {}",
                        self.node
                    )));
                };
                for name in [DATA_FILE, TAGS_FILE] {
                    clone_file(&dir.join(name), &dst.join(name))?;
                }
                (info.size, info.epoch)
            }
            Base::Volume { uuid, expect } => self.freeze_into(*uuid, expect, dst, gate)?,
        };
        if size > record.size {
            return Err(StoreError::Invalid(format!(
                "the source holds {size} bytes, more than the new volume's {}",
                record.size
            )));
        }
        if epoch > record.epoch {
            return Err(StoreError::Invalid(format!(
                "the source holds writes of epoch {epoch}, above the new record's {}",
                record.epoch
            )));
        }
        size_and_sync(dst, record.size)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::replicated::REGION_BYTES;
    use crate::backend::replicated::protocol::{Ballot, Io, Request, Tag};
    use crate::backend::replicated::record::Member;
    use crate::backend::replicated::wire::Call;

    const SIZE: u64 = 4 * REGION_BYTES;

    fn record(uuid: Uuid, epoch: u64) -> ReplicaRecord {
        let boots = BTreeMap::from([("n1".to_owned(), 1)]);
        let mut r = ReplicaRecord::new(uuid, SIZE, vec![Member::copy("n1")], &boots).unwrap();
        r.epoch = epoch;
        r
    }

    /// Writes `fill` over region 0 as write `seq` of epoch `epoch`.
    fn write(store: &ReplicaStore, uuid: Uuid, epoch: u64, seq: u64, fill: u8) {
        let boot = store.get(uuid).unwrap().expect("a copy").state.boot;
        let call = Call {
            request: Request::Write {
                io: Io {
                    epoch,
                    boot,
                    conn: 1,
                },
                region: 0,
                tag: Tag { epoch, seq },
            },
            offset: 0,
            len: 0,
            data: vec![fill; 4096].into(),
        };
        let answer = store.call(uuid, call).unwrap();
        assert!(
            matches!(
                answer.reply,
                Some(crate::backend::replicated::protocol::Reply::Written { .. })
            ),
            "{answer:?}"
        );
    }

    /// A store on a fresh pool holding one copy (epoch 3) whose region 0
    /// was written with 0xaa.
    fn written_copy() -> (tempfile::TempDir, ReplicaStore, Uuid, ReplicaRecord) {
        let pool = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        let vol = Uuid::new_random();
        let rec = record(vol, 3);
        store.create(&rec).unwrap();
        write(&store, vol, 3, 1, 0xaa);
        (pool, store, vol, rec)
    }

    fn first_bytes(store: &ReplicaStore, uuid: Uuid) -> Vec<u8> {
        let data = std::fs::read(store.root.join(uuid.to_hex()).join(DATA_FILE)).unwrap();
        assert_eq!(data.len() as u64, SIZE);
        data[..4096].to_vec()
    }

    /// A copy closed clean keeps its boot when a new process opens it
    /// (nothing unflushed was lost); a process that ends without a clean
    /// close, or a write after one, means a new boot.
    #[test]
    fn a_copy_closed_clean_keeps_its_boot_until_written_again() {
        let (pool, store, vol, _rec) = written_copy();
        let boot = |s: &ReplicaStore| s.get(vol).unwrap().expect("a copy").state.boot;
        let b = boot(&store);
        assert_eq!(store.close_all(), 1);
        let again = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(boot(&again), b, "closed clean: the same boot");
        assert_eq!(first_bytes(&again, vol), vec![0xaa; 4096]);
        // This process ends without closing clean: the next one takes a
        // new boot.
        let third = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(boot(&third), b + 1);
        // Closed clean, then written: the write undoes the clean close.
        assert_eq!(third.close_all(), 1);
        write(&third, vol, 3, 2, 0xbb);
        let fourth = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(boot(&fourth), b + 2);
        assert_eq!(first_bytes(&fourth, vol), vec![0xbb; 4096]);
    }

    /// A copy is closed clean once nobody wrote it for the time asked, and
    /// only once until written again.
    #[test]
    fn an_idle_copy_is_closed_clean_once_until_written_again() {
        use std::time::Duration;
        let (pool, store, vol, _rec) = written_copy();
        let boot = |s: &ReplicaStore| s.get(vol).unwrap().expect("a copy").state.boot;
        let b = boot(&store);
        assert_eq!(
            store.close_idle(Duration::from_secs(3600)),
            0,
            "just written"
        );
        assert_eq!(store.close_idle(Duration::ZERO), 1);
        assert_eq!(store.close_idle(Duration::ZERO), 0, "closed clean already");
        // A crash now (no close_all): the next process keeps the boot.
        let again = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(boot(&again), b);
        write(&store, vol, 3, 2, 0xcc);
        assert_eq!(
            store.close_idle(Duration::from_secs(3600)),
            0,
            "written again"
        );
        assert_eq!(store.close_idle(Duration::ZERO), 1);
    }

    /// A DeleteSnapshot that reaches a node while it is still taking that
    /// snapshot (a copy slow to freeze, past the controller's wait) finds
    /// nothing to delete; the taking must then keep nothing, or the
    /// deleted snapshot would appear afterwards. A later taking of the
    /// same snapshot (its name asked for again) is kept.
    #[test]
    fn a_snapshot_deleted_while_it_is_taken_is_not_kept() {
        use std::sync::mpsc;
        let (_pool, store, vol, rec) = written_copy();
        let store = std::sync::Arc::new(store);
        let snap = Uuid::new_random();
        let (frozen_tx, frozen_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let taker = {
            let (store, rec) = (std::sync::Arc::clone(&store), rec.clone());
            std::thread::spawn(move || {
                store.snapshot_gated(vol, snap, &rec, None, &mut || {
                    frozen_tx.send(()).unwrap();
                    go_rx.recv().is_ok()
                })
            })
        };
        frozen_rx.recv().unwrap();
        store.delete_snapshot(snap).unwrap();
        go_tx.send(()).unwrap();
        let made = taker.join().unwrap();
        assert!(matches!(made, Err(StoreError::Stale(_))), "{made:?}");
        assert_eq!(store.snapshots().unwrap(), Vec::new());
        let left: Vec<_> = std::fs::read_dir(store.snap_root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");

        let again = store.snapshot(vol, snap, &rec).unwrap();
        assert_eq!(store.snapshots().unwrap(), vec![again]);
    }

    /// A record that releases the volume (no owner any more) closes the
    /// copy clean as it is taken, so a crash right after costs no boot; a
    /// record that moves the owner to another node does not.
    #[test]
    fn a_copy_is_closed_clean_when_its_volume_is_released() {
        let (pool, store, vol, rec) = written_copy();
        let boot = |s: &ReplicaStore| s.get(vol).unwrap().expect("a copy").state.boot;
        let b = boot(&store);
        let clean = || {
            store
                .root
                .join(vol.to_hex())
                .join(super::super::CLEAN_FILE)
                .exists()
        };
        let commit = |version: u64, owner: Option<&str>| {
            let mut r = rec.clone();
            r.version = version;
            r.owner = owner.map(|n| crate::backend::replicated::record::Owner {
                node: n.to_owned(),
                readonly: false,
                heal: false,
            });
            let ballot = Ballot {
                round: version,
                proposer: "c".to_owned(),
            };
            let commit = Request::Commit { ballot, record: r };
            store.call(vol, Call::control(commit)).unwrap();
        };
        commit(1, Some("n1"));
        write(&store, vol, 3, 2, 0xbb);
        commit(2, Some("n2"));
        assert!(!clean(), "closed clean when the owner moved");
        commit(3, None);
        assert!(clean(), "not closed clean when released");
        // A crash now (no close_all): the next process keeps the boot.
        let again = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert_eq!(boot(&again), b);
        assert_eq!(first_bytes(&again, vol), vec![0xbb; 4096]);
    }

    #[test]
    fn a_snapshot_is_the_copy_at_one_point_and_restores_into_a_new_copy() {
        let (_pool, store, vol, rec) = written_copy();
        let snap = Uuid::new_random();
        let info = store.snapshot(vol, snap, &rec).unwrap();
        assert_eq!((info.volume, info.size, info.epoch), (vol, SIZE, 3));
        // Idempotent; the same name for another volume is a conflict.
        assert_eq!(store.snapshot(vol, snap, &rec).unwrap(), info);
        assert!(matches!(
            store.snapshot(Uuid::new_random(), snap, &rec),
            Err(StoreError::Conflict { .. })
        ));
        // Later writes do not reach it.
        write(&store, vol, 3, 2, 0xbb);
        assert_eq!(store.snapshots().unwrap(), vec![info.clone()]);

        // A restore must start at the snapshot's epoch or later.
        let restored = Uuid::new_random();
        let e = store
            .create_from(&record(restored, 2), Some(&Base::Snapshot(snap)))
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
        store
            .create_from(&record(restored, 3), Some(&Base::Snapshot(snap)))
            .unwrap();
        assert_eq!(first_bytes(&store, restored), vec![0xaa; 4096]);
        // Its tags came along: the voter knows what region 0 holds.
        let held = store.get(restored).unwrap().unwrap();
        assert_eq!(held.state.record.epoch, 3);

        // A clone is the source as it is now.
        let clone = Uuid::new_random();
        store
            .create_from(
                &record(clone, 3),
                Some(&Base::Volume {
                    uuid: vol,
                    expect: rec.clone(),
                }),
            )
            .unwrap();
        assert_eq!(first_bytes(&store, clone), vec![0xbb; 4096]);

        store.delete_snapshot(snap).unwrap();
        store.delete_snapshot(snap).unwrap();
        assert!(store.snapshots().unwrap().is_empty());
        let e = store
            .create_from(&record(Uuid::new_random(), 3), Some(&Base::Snapshot(snap)))
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    }

    #[test]
    fn a_copy_out_of_sync_or_past_the_record_is_not_snapshotted() {
        let pool = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        let vol = Uuid::new_random();
        let rec = record(vol, 0);
        store.create(&rec).unwrap();
        // In sync at another boot (it restarted since): refused.
        let mut other_boot = rec.clone();
        other_boot.in_sync.insert("n1".to_owned(), 7);
        let e = store
            .snapshot(vol, Uuid::new_random(), &other_boot)
            .unwrap_err();
        assert!(matches!(e, StoreError::Stale(_)), "{e}");
        // The copy took a newer record than the one read: refused.
        let mut newer = rec.clone();
        newer.version = 1;
        let commit = Request::Commit {
            ballot: Ballot {
                round: 1,
                proposer: "c".to_owned(),
            },
            record: newer,
        };
        store.call(vol, Call::control(commit)).unwrap();
        let e = store.snapshot(vol, Uuid::new_random(), &rec).unwrap_err();
        assert!(matches!(e, StoreError::Stale(_)), "{e}");
        // Nothing was left behind.
        assert!(store.snapshots().unwrap().is_empty());
        let names: Vec<_> = std::fs::read_dir(store.snap_root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    /// A group member's copy stays frozen while the gate runs: a write
    /// sent meanwhile lands only after the snapshot was taken. A closed
    /// gate takes nothing and leaves nothing.
    #[test]
    fn a_gated_snapshot_holds_writes_off_until_its_gate_opens() {
        use std::sync::mpsc;
        use std::time::Duration;
        let (_pool, store, vol, rec) = written_copy();
        let snap = Uuid::new_random();
        let mut volumes = vec![vol, Uuid::new_random()];
        volumes.sort();
        let group = GroupOf {
            group: Uuid::new_random(),
            volumes,
            nodes: vec!["n1".to_owned(), "n2".to_owned()],
        };

        // Closed: nothing taken, nothing left, the copy writable again.
        let e = store
            .snapshot_gated(vol, snap, &rec, Some(&group), &mut || false)
            .unwrap_err();
        assert!(matches!(e, StoreError::Stale(_)), "{e}");
        assert!(store.snapshots().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(store.snap_root()).unwrap().count(), 0);

        let (landed_tx, landed_rx) = mpsc::channel();
        let info = std::thread::scope(|sc| {
            let mut writer = None;
            let info = store
                .snapshot_gated(vol, snap, &rec, Some(&group), &mut || {
                    let (store, landed) = (&store, landed_tx.clone());
                    writer = Some(sc.spawn(move || {
                        write(store, vol, 3, 2, 0xbb);
                        landed.send(()).unwrap();
                    }));
                    // Frozen: the write waits for the snapshot.
                    landed_rx.recv_timeout(Duration::from_millis(300)).is_err()
                })
                .unwrap();
            landed_rx.recv().unwrap();
            writer.unwrap().join().unwrap();
            info
        });
        assert_eq!(info.group.as_ref(), Some(&group));
        assert_eq!(first_bytes(&store, vol), vec![0xbb; 4096]);
        let restored = Uuid::new_random();
        store
            .create_from(&record(restored, 3), Some(&Base::Snapshot(snap)))
            .unwrap();
        assert_eq!(
            first_bytes(&store, restored),
            vec![0xaa; 4096],
            "the snapshot holds the copy as it was when it froze"
        );
        // Listed with its group; asked again it is returned as it is (the
        // gate is not called), for another group it is a conflict.
        assert_eq!(store.snapshots().unwrap(), vec![info.clone()]);
        let again = store
            .snapshot_gated(vol, snap, &rec, Some(&group), &mut || {
                panic!("gate called for a snapshot taken already")
            })
            .unwrap();
        assert_eq!(again, info);
        let other = GroupOf {
            group: Uuid::new_random(),
            ..group.clone()
        };
        let e = store
            .snapshot_gated(vol, snap, &rec, Some(&other), &mut || true)
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
        assert!(matches!(
            store.snapshot(vol, snap, &rec),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn leftovers_of_a_snapshot_cut_short_are_removed_on_open() {
        let pool = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        let left = ReplicaStore::scratch(&store.snap_root(), "x").unwrap();
        std::fs::write(left.join(DATA_FILE), b"half").unwrap();
        drop(store);
        let store = ReplicaStore::open(pool.path(), "n1").unwrap();
        assert!(!left.exists());
        assert!(store.snapshots().unwrap().is_empty());
    }
}
