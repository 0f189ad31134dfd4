//! Snapshots: made O(1) where the pool shares extents (reflinks, btrfs
//! snapshots), otherwise copied in the background with `ready_to_use`
//! false until done. A staged block volume's filesystem is frozen around
//! the copy so the snapshot is consistent. Snapshots are independent of
//! their source: deleting the volume leaves them restorable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::controller::Controller;
use super::error::{Error, Result};
use super::id::{BackendKind, SnapshotId, Uuid};
use super::params::KUBERNETES_PREFIX;
use super::record::{NodeVolumeRecord, SnapshotRecord, VolumeRecord};
use crate::backend::profile::{SnapshotStrategy, StagingKind};
use crate::backend::{Backends, Object};
use crate::os::freeze::FrozenFs;
use crate::state::{Store, Table};

/// A background copy in progress: asked to stop by DeleteSnapshot, which
/// then waits for it to have cleaned up.
#[derive(Debug, Default)]
pub(super) struct CopyJob {
    cancel: Arc<AtomicBool>,
    finished: Mutex<bool>,
    done: Condvar,
}

impl CopyJob {
    pub(super) fn cancel_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    pub(super) fn finish_pub(&self) {
        self.finish()
    }

    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.done.notify_all();
    }

    /// Asks the copy to stop and waits up to `limit` for it to be gone;
    /// whether it is.
    fn cancel_and_wait(&self, limit: Duration) -> bool {
        self.cancel.store(true, Ordering::Relaxed);
        let finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        let (finished, _) = self
            .done
            .wait_timeout_while(finished, limit, |f| !*f)
            .unwrap_or_else(|e| e.into_inner());
        *finished
    }
}

/// Why a copy whose record start-up finds unfinished did not finish.
const CUT_SHORT: &str = "the copy was cut short by a restart of the plugin";

/// How long DeleteSnapshot waits for a cancelled copy to stop (it checks
/// between 16 MiB steps, so this is ample).
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Snapshots by UUID and by name, the ones still being copied, and copies
/// that failed since their CreateSnapshot was last asked about them.
#[derive(Debug, Default)]
pub struct SnapshotIndex {
    by_uuid: BTreeMap<Uuid, SnapshotRecord>,
    by_name: HashMap<String, Uuid>,
    copying: HashMap<Uuid, Arc<CopyJob>>,
    /// Snapshots whose background copy failed, by name: the next
    /// CreateSnapshot of that name answers with the error, and the one
    /// after copies anew under the same snapshot ID.
    failed: HashMap<String, FailedCopy>,
    /// Unfinished snapshots whose records could not be removed (see
    /// [`Controller::delete_snapshot`]).
    records_left: HashSet<Uuid>,
}

/// A snapshot whose background copy failed (nothing of it is left).
#[derive(Debug)]
struct FailedCopy {
    source: String,
    /// Why, until a CreateSnapshot was answered with it.
    error: Option<Error>,
    /// The ID's UUID, kept for the copy made anew: the CO already has the
    /// ID from the CreateSnapshot that started the copy.
    uuid: Uuid,
}

impl FailedCopy {
    fn of(rec: &SnapshotRecord, error: Option<Error>) -> Self {
        FailedCopy {
            source: rec.source_volume_id.clone(),
            error,
            uuid: rec.id.uuid,
        }
    }
}

/// Whether a snapshot whose copy failed or was cut short keeps its ID (and
/// its unfinished record) for the next CreateSnapshot of its name: one
/// copied in the pool, not part of a group (a group is cut anew whole).
fn keeps_its_id(rec: &SnapshotRecord) -> bool {
    rec.group.is_none() && rec.location.is_none()
}

impl SnapshotIndex {
    /// Loads snapshot records; removes snapshot storage no record explains
    /// and snapshots whose copy a crash interrupted (their storage is
    /// partial), keeping their IDs: the next CreateSnapshot of such a name
    /// copies anew under the ID its first call returned.
    pub fn load(store: &Store, backends: &Backends) -> Result<Self> {
        let mut idx = SnapshotIndex::default();
        for (key, rec) in store.load_all::<SnapshotRecord>(Table::Snapshots)? {
            let b = backends.store(rec.id.backend);
            if !rec.ready && rec.location.is_some() {
                // An object snapshot's copy, cut short: kept, and copied on
                // (the objects done are skipped) by the CO's next
                // CreateSnapshot, which brings the credentials.
                tracing::info!(snapshot = %rec.id, "object snapshot copy to resume on the next CreateSnapshot");
                idx.insert(rec);
                continue;
            }
            if !rec.ready || !b.snapshot_exists(rec.id.uuid) {
                tracing::warn!(snapshot = %rec.id, "dropping a snapshot whose copy did not finish");
                b.delete_snapshot(rec.id.uuid)?;
                if !rec.ready && keeps_its_id(&rec) {
                    // The CO holds its ID and asks again: the copy is made
                    // anew under it. The record stays (unfinished) until
                    // then, or until a DeleteSnapshot of that ID, marked
                    // as no copy running.
                    idx.failed
                        .insert(rec.name.clone(), FailedCopy::of(&rec, None));
                    if rec.failed.is_none() {
                        let marked = SnapshotRecord {
                            failed: Some(CUT_SHORT.to_owned()),
                            ..rec
                        };
                        store.put(Table::Snapshots, &key, &marked)?;
                    }
                } else {
                    store.delete(Table::Snapshots, &key)?;
                }
                continue;
            }
            idx.insert(rec);
        }
        for kind in BackendKind::LOCAL {
            let b = backends.store(kind);
            for uuid in b.list_snapshots()? {
                if idx.by_uuid.get(&uuid).is_none_or(|r| r.id.backend != kind) {
                    tracing::warn!(backend = %kind, %uuid, "removing snapshot storage with no record");
                    b.delete_snapshot(uuid)?;
                }
            }
        }
        Ok(idx)
    }

    pub(super) fn insert(&mut self, rec: SnapshotRecord) {
        self.by_name.insert(rec.name.clone(), rec.id.uuid);
        self.by_uuid.insert(rec.id.uuid, rec);
    }

    pub(super) fn get(&self, uuid: Uuid) -> Option<&SnapshotRecord> {
        self.by_uuid.get(&uuid)
    }

    /// Snapshots that belong to a group snapshot.
    pub(super) fn grouped(&self) -> Vec<SnapshotRecord> {
        self.by_uuid
            .values()
            .filter(|r| r.group.is_some())
            .cloned()
            .collect()
    }

    pub(super) fn remove(&mut self, uuid: Uuid) {
        if let Some(rec) = self.by_uuid.remove(&uuid) {
            self.by_name.remove(&rec.name);
        }
    }

    /// Snapshots of `kind` (ready or still being copied).
    pub(super) fn count(&self, kind: BackendKind) -> u64 {
        self.by_uuid
            .values()
            .filter(|r| r.id.backend == kind)
            .count() as u64
    }

    /// Background copies running.
    pub(super) fn copies_running(&self) -> u64 {
        self.copying.len() as u64
    }
}

/// Thaws every filesystem this node has staged (block volumes mounted at
/// their staging path). Snapshots and clones freeze a staged filesystem for
/// the instant of the copy; a server killed meanwhile would otherwise leave
/// it frozen for good, with every writer blocked. Thawing a filesystem that
/// is not frozen does nothing, so this runs at every start, before
/// anything else touches the volumes. Failures are logged.
pub fn thaw_staged(store: &Store) -> Result<()> {
    for (_, rec) in store.load_all::<NodeVolumeRecord>(Table::NodeVolumes)? {
        let Some(st) = rec.staging.filter(|s| s.mounted) else {
            continue;
        };
        if rec.id.backend.profile().staging() != StagingKind::Device {
            continue;
        }
        match crate::os::freeze::thaw(&st.path) {
            Ok(true) => {
                tracing::warn!(volume = %rec.id, path = %st.path.display(), "thawed a filesystem left frozen by an interrupted snapshot");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(volume = %rec.id, path = %st.path.display(), error = %e, "cannot check whether a staged filesystem is frozen");
            }
        }
    }
    Ok(())
}

/// A page of ListSnapshots.
#[derive(Debug, Clone)]
pub struct SnapshotPage {
    pub entries: Vec<SnapshotRecord>,
    pub next_token: Option<String>,
}

pub(super) fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

/// Snapshot parameters: only the keys Kubernetes adds are accepted.
pub(super) fn check_parameters(params: &BTreeMap<String, String>) -> Result<()> {
    match params.keys().find(|k| !k.starts_with(KUBERNETES_PREFIX)) {
        Some(k) => Err(Error::invalid(
            "parameters",
            format!("unknown snapshot parameter {k:?} (none are supported)"),
        )),
        None => Ok(()),
    }
}

impl Controller {
    pub(super) fn snaps(&self) -> MutexGuard<'_, SnapshotIndex> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Freezes the volume's filesystem if it is a block volume mounted at
    /// its staging path on this node (all-in-one mode), so a copy of its
    /// image is consistent. Dir volumes share the pool filesystem, which is
    /// never frozen; on btrfs their snapshots are atomic anyway.
    pub(super) fn freeze_source(&self, vol: &VolumeRecord) -> Result<Option<FrozenFs>> {
        if vol.id.backend.profile().snapshots()
            != (SnapshotStrategy::PoolCopy {
                freeze_staged: true,
            })
        {
            return Ok(None);
        }
        let node = self
            .store
            .get::<NodeVolumeRecord>(Table::NodeVolumes, &vol.id.uuid.to_hex())?;
        let Some(st) = node.and_then(|n| n.staging).filter(|s| s.mounted) else {
            return Ok(None);
        };
        match FrozenFs::new(&st.path) {
            Ok(f) => Ok(Some(f)),
            Err(e) => Err(Error::precondition(
                &vol.id,
                format!(
                    "cannot freeze {} for a consistent copy: {e}",
                    st.path.display()
                ),
            )),
        }
    }

    /// CreateSnapshot. Idempotent by name: the same name and source return
    /// the existing snapshot (with its current readiness); the name taken
    /// for another source is [`Error::NameConflict`].
    pub fn create_snapshot(
        self: &Arc<Self>,
        name: &str,
        source: &str,
        params: &BTreeMap<String, String>,
        secrets: &BTreeMap<String, String>,
    ) -> Result<SnapshotRecord> {
        check_parameters(params)?;
        let _g = self.guard(format!("snapname:{name}"))?;
        let (existing, failed, reuse) = {
            let mut s = self.snaps();
            let (failed, reuse) = match s.failed.get_mut(name) {
                Some(f) if f.source == source => match f.error.take() {
                    Some(e) => (Some(e), None),
                    None => (None, s.failed.remove(name).map(|f| f.uuid)),
                },
                _ => (None, None),
            };
            (
                s.by_name.get(name).and_then(|u| s.by_uuid.get(u)).cloned(),
                failed,
                reuse,
            )
        };
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(uuid) = reuse {
            tracing::info!(snapshot = name, %uuid, "copying anew a snapshot whose copy failed");
        }
        if let Some(rec) = existing {
            if rec.source_volume_id == source {
                if !rec.ready
                    && rec.location.is_some()
                    && !self.snaps().copying.contains_key(&rec.id.uuid)
                {
                    // Its copy stopped (a plugin restart): copy on.
                    let vol = self.lookup(source)?;
                    let vol_guard = self.guard(format!("vol:{}", vol.id))?;
                    let from = super::object::location_of(&vol)?;
                    let creds =
                        crate::backend::object::credentials_from_secrets(secrets, "provisioner")
                            .map_err(|r| Error::invalid("secrets", r))?;
                    self.start_object_copy(rec.clone(), from, creds, vol_guard)?;
                }
                return Ok(rec);
            }
            return Err(Error::NameConflict {
                name: name.to_owned(),
                existing: rec.id.to_string(),
                reason: format!("it is a snapshot of {}", rec.source_volume_id),
            });
        }
        let vol = self.lookup(source)?;
        let vol_guard = self.guard(format!("vol:{}", vol.id))?;
        if vol.id.backend.profile().snapshots() == SnapshotStrategy::ServerSideCopy {
            let creds = crate::backend::object::credentials_from_secrets(secrets, "provisioner")
                .map_err(|r| Error::invalid("secrets", r))?;
            let (rec, from) = self.object_snapshot_record(&vol, name, reuse)?;
            self.store
                .put(Table::Snapshots, &rec.id.uuid.to_hex(), &rec)?;
            if let Err(e) = self.start_object_copy(rec.clone(), from, creds, vol_guard) {
                self.forget_copy(&rec);
                return Err(e);
            }
            tracing::info!(snapshot = %rec.id, volume = %vol.id, "object snapshot copy started");
            return Ok(rec);
        }
        let id = SnapshotId {
            backend: vol.id.backend,
            node: vol.id.node.clone(),
            uuid: reuse.unwrap_or_else(Uuid::new_random),
        };
        let backend = self.backends.store(vol.id.backend);
        let rec = SnapshotRecord {
            id: id.clone(),
            name: name.to_owned(),
            source_volume_id: vol.id.to_string(),
            size_bytes: vol.capacity_bytes,
            fs_type: vol.fs_type,
            created_at: now(),
            ready: backend.copies_are_constant_time(),
            group: None,
            location: None,
            failed: None,
        };
        if rec.ready {
            let frozen = self.freeze_source(&vol)?;
            backend.copy(
                Object::Volume(vol.id.uuid),
                Object::Snapshot(id.uuid),
                &|_, _| true,
            )?;
            drop(frozen);
            if let Err(e) = self.store.put(Table::Snapshots, &id.uuid.to_hex(), &rec) {
                let _ = backend.delete_snapshot(id.uuid);
                return Err(e.into());
            }
            self.snaps().insert(rec.clone());
            tracing::info!(snapshot = %id, volume = %vol.id, "snapshot created (copy-on-write)");
            return Ok(rec);
        }
        // No extent sharing on this pool: copy in the background, holding
        // the volume's guard (and its frozen filesystem) until done.
        self.store.put(Table::Snapshots, &id.uuid.to_hex(), &rec)?;
        let job = Arc::new(CopyJob::default());
        {
            let mut s = self.snaps();
            s.insert(rec.clone());
            s.copying.insert(id.uuid, Arc::clone(&job));
        }
        let frozen = match self.freeze_source(&vol) {
            Ok(f) => f,
            Err(e) => {
                self.forget_copy(&rec);
                return Err(e);
            }
        };
        let this = Arc::clone(self);
        let result_rec = rec.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("snapshot-{}", id.uuid))
            .spawn(move || {
                let _vol_guard = vol_guard;
                let backend = this.backends.store(rec.id.backend);
                let r = backend.copy(
                    Object::Volume(vol.id.uuid),
                    Object::Snapshot(rec.id.uuid),
                    &|done, total| {
                        tracing::debug!(snapshot = %rec.id, done, total, "copying snapshot");
                        !job.cancel.load(Ordering::Relaxed)
                    },
                );
                drop(frozen);
                this.finish_copy(rec, r.map_err(Error::from), &job);
                job.finish();
            });
        if let Err(e) = spawned {
            self.forget_copy(&result_rec);
            return Err(Error::io("spawn copy thread for", format!("snapshot {id}"))(e));
        }
        Ok(result_rec)
    }

    /// Removes every trace of a snapshot whose copy did not finish: its
    /// storage, its record and its index entries.
    fn forget_copy(&self, rec: &SnapshotRecord) {
        self.forget(rec, None);
    }

    /// [`Self::forget_copy`] of a copy that failed: why is kept for the
    /// next CreateSnapshot of its name, and so is the (unfinished) record
    /// when `keep_record`, marked with why: a failed copy's, whose ID that
    /// CreateSnapshot takes up again, across restarts too (see
    /// [`SnapshotIndex::load`]).
    fn forget_failed_copy(&self, rec: &SnapshotRecord, error: Error, keep_record: bool) {
        self.forget(rec, Some((error, keep_record)));
    }

    fn forget(&self, rec: &SnapshotRecord, failure: Option<(Error, bool)>) {
        let _ = self
            .backends
            .store(rec.id.backend)
            .delete_snapshot(rec.id.uuid);
        let key = rec.id.uuid.to_hex();
        let left = match &failure {
            Some((why, true)) => {
                let marked = SnapshotRecord {
                    failed: Some(why.to_string()),
                    ..rec.clone()
                };
                if let Err(e) = self.store.put(Table::Snapshots, &key, &marked) {
                    // Kept all the same, unmarked: start-up marks it.
                    tracing::warn!(snapshot = %rec.id, error = %e, "cannot mark the record of a failed copy");
                }
                false
            }
            _ => match self.store.delete(Table::Snapshots, &key) {
                Ok(()) => false,
                Err(e) => {
                    // Start-up takes a record left so for a failed copy's;
                    // a DeleteSnapshot of its ID removes it first.
                    tracing::error!(snapshot = %rec.id, error = %e, "cannot remove the record of an unfinished snapshot");
                    true
                }
            },
        };
        // In one step with the copy's end, so that a DeleteSnapshot or
        // CreateSnapshot never finds the copy gone and its failure not yet
        // kept (the record would outlive a delete; the ID would change).
        let mut s = self.snaps();
        if left {
            s.records_left.insert(rec.id.uuid);
        }
        if let Some((error, _)) = failure {
            s.failed
                .insert(rec.name.clone(), FailedCopy::of(rec, Some(error)));
        }
        s.copying.remove(&rec.id.uuid);
        s.remove(rec.id.uuid);
    }

    /// Registers a running copy of `rec` (inserted in the index); false
    /// when one runs already.
    pub(super) fn snapshot_copy_begin(&self, rec: &SnapshotRecord, job: Arc<CopyJob>) -> bool {
        let mut s = self.snaps();
        if s.copying.contains_key(&rec.id.uuid) {
            return false;
        }
        s.insert(rec.clone());
        s.copying.insert(rec.id.uuid, job);
        true
    }

    pub(super) fn snapshot_copy_abandon(&self, id: &SnapshotId) {
        self.snaps().copying.remove(&id.uuid);
    }

    /// Records how a background copy ended: ready, cancelled (by
    /// DeleteSnapshot: nothing is left), or failed (nothing is left, and the
    /// next CreateSnapshot of its name reports why).
    pub(super) fn finish_copy(&self, mut rec: SnapshotRecord, r: Result<()>, job: &CopyJob) {
        let cancelled = job.cancel.load(Ordering::Relaxed);
        match (r, cancelled) {
            (_, true) => {
                tracing::info!(snapshot = %rec.id, "snapshot copy cancelled");
                self.forget_copy(&rec);
            }
            (Ok(()), false) => {
                rec.ready = true;
                if let Err(e) = self
                    .store
                    .put(Table::Snapshots, &rec.id.uuid.to_hex(), &rec)
                {
                    tracing::error!(snapshot = %rec.id, error = %e, "cannot record a finished snapshot");
                    self.forget_failed_copy(&rec, e.into(), false);
                    return;
                }
                tracing::info!(snapshot = %rec.id, "snapshot copy finished");
                let mut s = self.snaps();
                s.copying.remove(&rec.id.uuid);
                s.insert(rec);
            }
            (Err(e), false) => {
                tracing::error!(snapshot = %rec.id, error = %e, "snapshot copy failed");
                let keep = keeps_its_id(&rec);
                self.forget_failed_copy(&rec, e, keep);
            }
        }
    }

    /// DeleteSnapshot. Idempotent: an unknown or malformed ID is success.
    /// A snapshot still being copied has its copy cancelled, and is gone
    /// (storage and record) when this returns.
    pub fn delete_snapshot(&self, raw: &str, secrets: &BTreeMap<String, String>) -> Result<()> {
        let Some(id) = SnapshotId::parse(raw) else {
            return Ok(());
        };
        let _g = self.guard(format!("snap:{}", id.uuid))?;
        let job = self.snaps().copying.get(&id.uuid).cloned();
        if let Some(job) = job {
            // Deleting a snapshot being cut cancels the copy; a cancelled
            // copy removes what it made and releases its source. A copy
            // that finished first left a ready snapshot, deleted below.
            if !job.cancel_and_wait(CANCEL_WAIT) {
                return Err(Error::Busy(format!(
                    "snapshot {id} (its copy has not stopped yet)"
                )));
            }
        }
        // Records of unfinished snapshots go too, and are forgotten only
        // once gone, so that the CO's next try removes one this call
        // could not (not OK until then): a failed copy's, kept for its ID
        // (no later copy takes the ID up), and one a cancelled copy could
        // not remove (start-up would take it for a failed copy's and make
        // the deleted ID anew).
        let left = {
            let s = self.snaps();
            s.records_left.contains(&id.uuid) || s.failed.values().any(|f| f.uuid == id.uuid)
        };
        if left {
            self.store.delete(Table::Snapshots, &id.uuid.to_hex())?;
            let mut s = self.snaps();
            s.records_left.remove(&id.uuid);
            s.failed.retain(|_, f| f.uuid != id.uuid);
        }
        let rec = self
            .snaps()
            .by_uuid
            .get(&id.uuid)
            .filter(|r| r.id == id)
            .cloned();
        let Some(rec) = rec else {
            return Ok(());
        };
        if let Some(group) = &rec.group {
            return Err(Error::precondition(
                &id,
                format!("snapshot belongs to group snapshot {group}; delete the group"),
            ));
        }
        if rec.location.is_some() {
            self.delete_object_snapshot(&rec, secrets)?;
        }
        self.store.delete(Table::Snapshots, &id.uuid.to_hex())?;
        self.snaps().remove(id.uuid);
        if let Err(e) = self.backends.store(id.backend).delete_snapshot(id.uuid) {
            self.store.put(Table::Snapshots, &id.uuid.to_hex(), &rec)?;
            self.snaps().insert(rec);
            return Err(e.into());
        }
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// A snapshot by ID (NOT_FOUND when unknown or malformed).
    pub fn get_snapshot(&self, raw: &str) -> Result<SnapshotRecord> {
        SnapshotId::parse(raw)
            .and_then(|id| {
                self.snaps()
                    .by_uuid
                    .get(&id.uuid)
                    .filter(|r| r.id == id)
                    .cloned()
            })
            .ok_or_else(|| Error::SnapshotNotFound(raw.to_owned()))
    }

    /// ListSnapshots in ID order from `starting_token`, filtered by
    /// snapshot id and/or source volume (an unknown one lists nothing).
    pub fn list_snapshots(
        &self,
        max_entries: usize,
        starting_token: &str,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<SnapshotPage> {
        let after = if starting_token.is_empty() {
            None
        } else {
            Some(
                self.tokens
                    .verify(starting_token)
                    .and_then(Uuid::parse_hex)
                    .ok_or_else(|| Error::InvalidToken(starting_token.to_owned()))?,
            )
        };
        let all: Vec<SnapshotRecord> = self
            .snaps()
            .by_uuid
            .iter()
            .filter(|(u, _)| after.is_none_or(|a| **u > a))
            .map(|(_, r)| r)
            .filter(|r| snapshot_id.is_empty() || r.id.to_string() == snapshot_id)
            .filter(|r| source_volume_id.is_empty() || r.source_volume_id == source_volume_id)
            .cloned()
            .collect();
        let take = if max_entries == 0 {
            all.len()
        } else {
            max_entries
        };
        let next_token =
            (all.len() > take).then(|| self.tokens.issue(&all[take - 1].id.uuid.to_hex()));
        Ok(SnapshotPage {
            entries: all.into_iter().take(take).collect(),
            next_token,
        })
    }

    /// The ready snapshot a volume is to be restored from.
    pub(super) fn restore_source(&self, raw: &str) -> Result<SnapshotRecord> {
        let rec = self.get_snapshot(raw)?;
        if !rec.ready {
            return Err(Error::precondition(
                &rec.id,
                "snapshot is still being copied (ready_to_use is false)",
            ));
        }
        Ok(rec)
    }
}
