//! Group snapshots: every member volume's filesystem is frozen, then each
//! is snapshotted, then all are thawed, so the group is crash-consistent
//! across volumes. Members are ordinary snapshots (restorable one by one)
//! that can only be deleted with their group.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::controller::Controller;
use super::error::{Error, Result};
use super::id::{SnapshotId, Uuid};
use super::record::{GroupSnapshotRecord, SnapshotRecord};
use super::snapshot::{SnapshotIndex, check_parameters, now};
use crate::backend::{Backends, Object};
use crate::state::{Store, Table};

/// Group snapshots by UUID.
#[derive(Debug, Default)]
pub struct GroupIndex {
    by_uuid: BTreeMap<Uuid, GroupSnapshotRecord>,
}

impl GroupIndex {
    /// Loads group snapshot records and makes groups and their members
    /// agree: a group is recorded before its members, so a crash in between
    /// leaves a group missing members, which is removed with the members
    /// it has; a member whose group has no record (left by older versions,
    /// which recorded members first) is removed too. Neither was ever
    /// acknowledged to the CO, and neither could be deleted through the API.
    pub fn load(
        store: &Store,
        snaps: &mut SnapshotIndex,
        backends: &Backends,
    ) -> Result<Mutex<Self>> {
        let mut idx = GroupIndex::default();
        let forget = |snaps: &mut SnapshotIndex, id: &SnapshotId| -> Result<()> {
            store.delete(Table::Snapshots, &id.uuid.to_hex())?;
            snaps.remove(id.uuid);
            backends.store(id.backend).delete_snapshot(id.uuid)?;
            Ok(())
        };
        for (key, rec) in store.load_all::<GroupSnapshotRecord>(Table::GroupSnapshots)? {
            let Some(u) = Uuid::parse_hex(&key) else {
                continue;
            };
            let members: Vec<SnapshotId> = rec
                .members
                .iter()
                .filter_map(|m| SnapshotId::parse(m))
                .collect();
            let complete = members.len() == rec.members.len()
                && members.iter().all(|id| {
                    snaps
                        .get(id.uuid)
                        .is_some_and(|m| m.id == *id && m.group.as_deref() == Some(&rec.id))
                });
            if !complete {
                tracing::warn!(group = %rec.id, "removing a group snapshot whose creation a crash interrupted");
                for id in &members {
                    if snaps.get(id.uuid).is_some_and(|m| m.id == *id) {
                        forget(snaps, id)?;
                    } else {
                        backends.store(id.backend).delete_snapshot(id.uuid)?;
                    }
                }
                store.delete(Table::GroupSnapshots, &key)?;
                continue;
            }
            idx.by_uuid.insert(u, rec);
        }
        for m in snaps.grouped() {
            let group = m.group.as_deref().unwrap_or_default();
            if !idx.by_uuid.values().any(|g| g.id == group) {
                tracing::warn!(snapshot = %m.id, %group, "removing a group member whose group was never recorded");
                forget(snaps, &m.id)?;
            }
        }
        Ok(Mutex::new(idx))
    }
}

/// A group snapshot with its member snapshots.
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    pub record: GroupSnapshotRecord,
    pub members: Vec<SnapshotRecord>,
}

fn group_uuid(raw: &str) -> Option<Uuid> {
    let mut parts = raw.split(':');
    (parts.next()? == "group").then_some(())?;
    let _node = parts.next()?;
    let u = Uuid::parse_hex(parts.next()?)?;
    parts.next().is_none().then_some(u)
}

impl Controller {
    fn groups(&self) -> std::sync::MutexGuard<'_, GroupIndex> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_members(&self, record: GroupSnapshotRecord) -> Result<GroupSnapshot> {
        let members = record
            .members
            .iter()
            .map(|m| self.get_snapshot(m))
            .collect::<Result<Vec<_>>>()?;
        Ok(GroupSnapshot { record, members })
    }

    /// CreateVolumeGroupSnapshot. Idempotent by name: the same name and
    /// set of volumes return the existing group; another set is
    /// [`Error::NameConflict`].
    pub fn create_group_snapshot(
        &self,
        name: &str,
        sources: &[String],
        params: &BTreeMap<String, String>,
    ) -> Result<GroupSnapshot> {
        check_parameters(params)?;
        let mut sources: Vec<String> = sources.to_vec();
        sources.sort();
        sources.dedup();
        let _g = self.guard(format!("groupname:{name}"))?;
        let existing = self
            .groups()
            .by_uuid
            .values()
            .find(|g| g.name == name)
            .cloned();
        if let Some(g) = existing {
            if g.sources == sources {
                return self.with_members(g);
            }
            return Err(Error::NameConflict {
                name: name.to_owned(),
                existing: g.id,
                reason: "it holds another set of volumes".into(),
            });
        }
        let vols = sources
            .iter()
            .map(|s| self.lookup(s))
            .collect::<Result<Vec<_>>>()?;
        let _guards = vols
            .iter()
            .map(|v| self.guard(format!("vol:{}", v.id)))
            .collect::<Result<Vec<_>>>()?;
        let group_uuid = Uuid::new_random();
        let group_id = format!("group:{}:{}", self.node_id, group_uuid);
        // Freeze every member first, so all copies see one instant.
        let frozen = vols
            .iter()
            .map(|v| self.freeze_source(v))
            .collect::<Result<Vec<_>>>()?;
        let created_at = now();
        let mut made: Vec<SnapshotRecord> = Vec::new();
        let mut result = Ok(());
        for v in &vols {
            let rec = SnapshotRecord {
                location: None,
                failed: None,
                id: SnapshotId {
                    backend: v.id.backend,
                    node: v.id.node.clone(),
                    uuid: Uuid::new_random(),
                },
                name: format!("{name}/{}", v.id.uuid),
                source_volume_id: v.id.to_string(),
                size_bytes: v.capacity_bytes,
                fs_type: v.fs_type,
                created_at,
                ready: true,
                group: Some(group_id.clone()),
            };
            let backend = self.backends.store(v.id.backend);
            if let Err(e) = backend.copy(
                Object::Volume(v.id.uuid),
                Object::Snapshot(rec.id.uuid),
                &|_, _| true,
            ) {
                result = Err(e);
                break;
            }
            made.push(rec);
        }
        drop(frozen);
        if let Err(e) = result {
            for m in &made {
                let _ = self.backends.store(m.id.backend).delete_snapshot(m.id.uuid);
            }
            return Err(e.into());
        }
        let record = GroupSnapshotRecord {
            id: group_id.clone(),
            name: name.to_owned(),
            sources,
            members: made.iter().map(|m| m.id.to_string()).collect(),
            created_at,
        };
        // The group first, then its members: a crash in between leaves a
        // group missing members, which start-up removes (see
        // GroupIndex::load); members without a group could not be deleted.
        let recorded = (|| -> Result<()> {
            self.store
                .put(Table::GroupSnapshots, &group_uuid.to_hex(), &record)?;
            for m in &made {
                self.store.put(Table::Snapshots, &m.id.uuid.to_hex(), m)?;
            }
            Ok(())
        })();
        if let Err(e) = recorded {
            for m in &made {
                let _ = self.store.delete(Table::Snapshots, &m.id.uuid.to_hex());
                let _ = self.backends.store(m.id.backend).delete_snapshot(m.id.uuid);
            }
            let _ = self
                .store
                .delete(Table::GroupSnapshots, &group_uuid.to_hex());
            return Err(e);
        }
        for m in &made {
            self.snaps().insert(m.clone());
        }
        self.groups().by_uuid.insert(group_uuid, record.clone());
        tracing::info!(group = %group_id, members = made.len(), "group snapshot created");
        Ok(GroupSnapshot {
            record,
            members: made,
        })
    }

    /// GetVolumeGroupSnapshot (NOT_FOUND when unknown). `snapshot_ids`, when
    /// given, must name exactly the group's members.
    pub fn get_group_snapshot(&self, raw: &str, snapshot_ids: &[String]) -> Result<GroupSnapshot> {
        let rec = group_uuid(raw)
            .and_then(|u| self.groups().by_uuid.get(&u).cloned())
            .filter(|g| g.id == raw)
            .ok_or_else(|| Error::SnapshotNotFound(raw.to_owned()))?;
        check_members(&rec, snapshot_ids)?;
        self.with_members(rec)
    }

    /// DeleteVolumeGroupSnapshot: deletes the group and its member
    /// snapshots. Idempotent: an unknown group is success.
    pub fn delete_group_snapshot(&self, raw: &str, snapshot_ids: &[String]) -> Result<()> {
        let Some(u) = group_uuid(raw) else {
            return Ok(());
        };
        let _g = self.guard(format!("group:{u}"))?;
        let Some(rec) = self
            .groups()
            .by_uuid
            .get(&u)
            .filter(|g| g.id == raw)
            .cloned()
        else {
            return Ok(());
        };
        check_members(&rec, snapshot_ids)?;
        for m in &rec.members {
            if let Some(id) = SnapshotId::parse(m) {
                self.store.delete(Table::Snapshots, &id.uuid.to_hex())?;
                self.snaps().remove(id.uuid);
                self.backends.store(id.backend).delete_snapshot(id.uuid)?;
            }
        }
        self.store.delete(Table::GroupSnapshots, &u.to_hex())?;
        self.groups().by_uuid.remove(&u);
        tracing::info!(group = %raw, "group snapshot deleted");
        Ok(())
    }
}

fn check_members(rec: &GroupSnapshotRecord, snapshot_ids: &[String]) -> Result<()> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let mut given: Vec<&String> = snapshot_ids.iter().collect();
    let mut have: Vec<&String> = rec.members.iter().collect();
    given.sort();
    have.sort();
    if given != have {
        return Err(Error::invalid(
            "snapshot_ids",
            format!("do not match the members of group snapshot {}", rec.id),
        ));
    }
    Ok(())
}
