//! Snapshots of replicated volumes, and volumes restored or cloned from
//! them (the controller's side; the copies' side is
//! `backend/replicated/store/snap.rs`).
//!
//! CreateSnapshot reads the volume's newest record and asks every copy in
//! sync in it to freeze itself into a snapshot (all its region locks held
//! while its files are reflinked), so each snapshot holds every write
//! acknowledged before the request. The snapshot lives on the nodes that
//! took it; it is found by asking the fresh nodes, like a volume, and
//! deleted only once every node it was taken on is fresh (or forgotten). A
//! restore places copies on those nodes first: each starts from its
//! node's snapshot and is in sync, further copies start empty and out of
//! sync (the first engine rebuilds them in full), and the first engine
//! makes every copy equal to one base copy (see the store's module
//! documentation). A clone is a restore straight from the source's in-sync
//! copies, frozen the same way, with nothing left behind.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Status;

use super::super::proto::replica_client::ReplicaClient;
use super::super::proto::{
    CreateReplicaRequest, ListReplicasRequest, ReplicaSnapshot, ReplicaSnapshotRef,
    ReplicaSnapshotRequest,
};
use super::{
    Asked, CALL_DEADLINE, Replicated, ask_all, bounded, is_replicated_id, parse_id, volume_id,
};
use crate::backend::replicated::placement::{self, Candidate, Locality, ReplicaParams};
use crate::backend::replicated::record::{Member, ReplicaRecord};
use crate::csi;
use crate::volume::id::{SnapshotId, Uuid};

/// How often CreateSnapshot reads the record again when a copy moved past
/// it meanwhile.
const SNAPSHOT_ATTEMPTS: usize = 3;

/// Whether `raw` is a replicated volume's snapshot ID (well formed or not).
pub fn is_replicated_snapshot_id(raw: &str) -> bool {
    raw.starts_with(SNAPSHOT_PREFIX)
}

const SNAPSHOT_PREFIX: &str = "snap:replicated:";

fn parse_snapshot_id(raw: &str) -> Option<Uuid> {
    raw.strip_prefix(SNAPSHOT_PREFIX).and_then(Uuid::parse_hex)
}

/// `snap:replicated:<uuid>`: like a replicated volume's ID, it names no
/// node.
pub(super) fn snapshot_id(uuid: Uuid) -> String {
    format!("{SNAPSHOT_PREFIX}{}", uuid.to_hex())
}

/// The uuid of the snapshot named `name` (never a volume's: another prefix).
fn snapshot_uuid(name: &str) -> Uuid {
    placement::volume_uuid(&format!("snapshot\0{name}"))
}

/// A snapshot as the fresh nodes hold it.
#[derive(Debug, Clone)]
pub(super) struct HeldSnapshot {
    pub uuid: Uuid,
    pub volume: Uuid,
    pub size: u64,
    pub epoch: u64,
    /// The earliest of the copies' creation times.
    pub created: (i64, i32),
    /// Nodes holding it.
    pub holders: Vec<String>,
    /// Nodes asked to take it, as its holders remember (a holder that is
    /// down is among them, not among `holders`).
    pub taken_on: BTreeSet<String>,
    /// The group snapshot it is a member of.
    pub group: Option<MemberOf>,
}

/// A member's group as its holders remember it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemberOf {
    pub group: Uuid,
    /// The volumes of every member (sorted).
    pub volumes: Vec<Uuid>,
    /// Every node asked to take a member.
    pub nodes: BTreeSet<String>,
}

impl HeldSnapshot {
    fn add(&mut self, node: &str, s: &ReplicaSnapshot) {
        self.holders.push(node.to_owned());
        self.taken_on.extend(s.nodes.iter().cloned());
        self.size = self.size.max(s.size);
        self.epoch = self.epoch.max(s.epoch);
        self.created = self.created.min((s.created_seconds, s.created_nanos));
        if let Some(group) = Uuid::parse_hex(&s.group) {
            let mut volumes: Vec<Uuid> = s
                .group_volumes
                .iter()
                .filter_map(|v| Uuid::parse_hex(v))
                .collect();
            volumes.sort();
            let nodes = s.group_nodes.iter().cloned().collect();
            self.group = Some(MemberOf {
                group,
                volumes,
                nodes,
            });
        }
    }

    pub fn csi(&self) -> csi::Snapshot {
        csi::Snapshot {
            size_bytes: self.size as i64,
            snapshot_id: snapshot_id(self.uuid),
            source_volume_id: volume_id(self.volume),
            creation_time: Some(prost_types::Timestamp {
                seconds: self.created.0,
                nanos: self.created.1,
            }),
            ready_to_use: true,
            group_snapshot_id: self
                .group
                .as_ref()
                .map(|g| super::group::group_id(g.group))
                .unwrap_or_default(),
        }
    }
}

/// What a new replicated volume starts from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// Snapshot `snap`, held by `holders`.
    Snapshot { snap: HeldSnapshot },
    /// Volume `record.uuid`'s copies in sync in `record`.
    Volume { record: ReplicaRecord },
}

impl Source {
    /// The nodes a copy may start from.
    pub fn holders(&self) -> Vec<String> {
        match self {
            Source::Snapshot { snap } => snap.holders.clone(),
            Source::Volume { record } => record.in_sync.keys().cloned().collect(),
        }
    }

    /// The fewest bytes a volume made from it may have.
    pub fn size(&self) -> u64 {
        match self {
            Source::Snapshot { snap } => snap.size,
            Source::Volume { record } => record.size,
        }
    }

    /// The epoch the new volume's first record starts at: no write the
    /// source holds is newer.
    pub fn epoch(&self) -> u64 {
        match self {
            Source::Snapshot { snap } => snap.epoch,
            Source::Volume { record } => record.epoch,
        }
    }

    /// The CreateVolumeRequest fields telling a node what to start from.
    pub fn request(&self, record: &ReplicaRecord) -> Result<CreateReplicaRequest, Status> {
        let json = |r: &ReplicaRecord| {
            serde_json::to_string(r).map_err(|e| Status::internal(e.to_string()))
        };
        let mut req = CreateReplicaRequest {
            record: json(record)?,
            ..Default::default()
        };
        match self {
            Source::Snapshot { snap } => req.from_snapshot = snap.uuid.to_hex(),
            Source::Volume { record: src } => {
                req.from_volume = src.uuid.to_hex();
                req.from_record = json(src)?;
            }
        }
        Ok(req)
    }

    /// The content source the CSI volume reports.
    pub fn csi(&self) -> csi::VolumeContentSource {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        csi::VolumeContentSource {
            r#type: Some(match self {
                Source::Snapshot { snap } => Type::Snapshot(SnapshotSource {
                    snapshot_id: snapshot_id(snap.uuid),
                }),
                Source::Volume { record } => Type::Volume(VolumeSource {
                    volume_id: volume_id(record.uuid),
                }),
            }),
        }
    }
}

/// `volume` made from `source`: the source it reports, and, when it is
/// larger than the source, the context key that makes NodeStageVolume grow
/// the filesystem to the device.
pub(super) fn with_source(mut volume: csi::Volume, source: Option<&Source>) -> csi::Volume {
    if let Some(src) = source {
        volume.content_source = Some(src.csi());
        if volume.capacity_bytes as u64 > src.size() {
            volume.volume_context.insert(
                crate::volume::controller::GROW_FS_KEY.to_owned(),
                "true".to_owned(),
            );
        }
    }
    volume
}

impl Replicated {
    /// Every snapshot the fresh nodes hold; UNAVAILABLE when a node does
    /// not answer (it may hold some).
    pub(super) async fn held_snapshots(&self) -> Result<BTreeMap<Uuid, HeldSnapshot>, Status> {
        let nodes = self.registry.fresh();
        let said = ask_all(&nodes, |mut c| async move {
            c.list_snapshots(ListReplicasRequest {}).await
        })
        .await;
        let mut all: BTreeMap<Uuid, HeldSnapshot> = BTreeMap::new();
        for (n, a) in nodes.iter().zip(said) {
            let listed = match a {
                Asked::Answered(r) => r.snapshots,
                Asked::Refused(s) => {
                    return Err(Status::unavailable(format!(
                        "node {} did not list its snapshots: {}",
                        n.id,
                        s.message()
                    )));
                }
                Asked::Late => {
                    return Err(Status::unavailable(format!(
                        "node {} did not list its snapshots in time",
                        n.id
                    )));
                }
            };
            for s in &listed {
                let (Some(uuid), Some(volume)) =
                    (Uuid::parse_hex(&s.snapshot), Uuid::parse_hex(&s.volume))
                else {
                    continue;
                };
                all.entry(uuid)
                    .or_insert_with(|| HeldSnapshot {
                        uuid,
                        volume,
                        size: 0,
                        epoch: 0,
                        created: (i64::MAX, 0),
                        holders: Vec::new(),
                        taken_on: BTreeSet::new(),
                        group: None,
                    })
                    .add(&n.id, s);
            }
        }
        Ok(all)
    }

    async fn held_snapshot(&self, uuid: Uuid) -> Result<Option<HeldSnapshot>, Status> {
        Ok(self.held_snapshots().await?.remove(&uuid))
    }

    /// CreateSnapshot of a replicated volume.
    pub async fn create_snapshot(
        &self,
        r: &csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse, Status> {
        use crate::server::convert;
        convert::required_str("name", &r.name).map_err(Status::from)?;
        convert::required_str("source_volume_id", &r.source_volume_id).map_err(Status::from)?;
        let uuid = snapshot_uuid(&r.name);
        let source = parse_id(&r.source_volume_id)?;
        for attempt in 1..=SNAPSHOT_ATTEMPTS {
            if let Some(have) = self.held_snapshot(uuid).await? {
                if have.volume != source {
                    return Err(Status::already_exists(format!(
                        "snapshot name {:?} is taken by a snapshot of volume {}",
                        r.name,
                        volume_id(have.volume)
                    )));
                }
                return Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(have.csi()),
                });
            }
            let (_, state) = self.newest(&r.source_volume_id).await?;
            let record = state.record;
            let record_json =
                serde_json::to_string(&record).map_err(|e| Status::internal(e.to_string()))?;
            let asks: Vec<_> = record
                .in_sync
                .keys()
                .map(|node| {
                    let n = self.node(node);
                    let req = ReplicaSnapshotRequest {
                        volume: source.to_hex(),
                        snapshot: uuid.to_hex(),
                        record: record_json.clone(),
                    };
                    let node = node.clone();
                    tokio::spawn(async move {
                        let n = n?;
                        let mut c = ReplicaClient::new(n.channel.clone());
                        let req = bounded(req, CALL_DEADLINE);
                        match tokio::time::timeout(CALL_DEADLINE, c.snapshot(req)).await {
                            Ok(Ok(_)) => Ok(node),
                            Ok(Err(s)) => Err(s),
                            Err(_) => Err(Status::unavailable(format!(
                                "node {node} did not snapshot its copy in time"
                            ))),
                        }
                    })
                })
                .collect();
            let (mut took, mut why) = (Vec::new(), Vec::new());
            for a in asks {
                match a.await.map_err(|e| Status::internal(e.to_string()))? {
                    Ok(node) => took.push(node),
                    Err(s) => why.push(s),
                }
            }
            if !took.is_empty() {
                let have = self.held_snapshot(uuid).await?.ok_or_else(|| {
                    Status::unavailable(format!("snapshot {} went meanwhile", snapshot_id(uuid)))
                })?;
                tracing::info!(name = %r.name, snapshot = %snapshot_id(uuid), volume = %r.source_volume_id, on = ?took, "replicated snapshot taken");
                return Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(have.csi()),
                });
            }
            let stale = why.iter().any(|s| s.code() == tonic::Code::Aborted);
            if !stale || attempt == SNAPSHOT_ATTEMPTS {
                let detail: Vec<&str> = why.iter().map(|s| s.message()).collect();
                return Err(Status::unavailable(format!(
                    "no copy of volume {} could be snapshotted: {}",
                    r.source_volume_id,
                    detail.join("; ")
                )));
            }
        }
        unreachable!("the last attempt returns")
    }

    /// DeleteSnapshot: removed from every fresh node, once every node it
    /// was taken on is fresh again (or forgotten: gone for good), so no
    /// node that was down keeps it unseen. UNAVAILABLE, with nothing
    /// deleted, while one is down. Idempotent.
    pub async fn delete_snapshot(&self, raw: &str) -> Result<(), Status> {
        let Some(uuid) = parse_snapshot_id(raw) else {
            return Ok(());
        };
        let held = self.held_snapshot(uuid).await?;
        if let Some(g) = held.as_ref().and_then(|h| h.group.as_ref()) {
            return Err(Status::failed_precondition(format!(
                "snapshot {raw} belongs to group snapshot {}; delete the group",
                super::group::group_id(g.group)
            )));
        }
        self.remove_snapshot(uuid, held.as_ref()).await
    }

    /// Removes snapshot `uuid` (`held` as the fresh nodes hold it) from
    /// every fresh node; see [`Self::delete_snapshot`].
    pub(super) async fn remove_snapshot(
        &self,
        uuid: Uuid,
        held: Option<&HeldSnapshot>,
    ) -> Result<(), Status> {
        let raw = snapshot_id(uuid);
        if let Some(held) = held {
            let down = self.down(&held.taken_on);
            if !down.is_empty() {
                return Err(Status::unavailable(format!(
                    "snapshot {raw} is also on {}, not registered and fresh now: it is deleted once back (or once forgotten with `stowage node forget`, when gone for good)",
                    down.join(", ")
                )));
            }
        }
        for n in self.registry.fresh() {
            let mut c = ReplicaClient::new(n.channel.clone());
            let req = ReplicaSnapshotRef {
                snapshot: uuid.to_hex(),
            };
            match tokio::time::timeout(CALL_DEADLINE, c.delete_snapshot(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    return Err(Status::unavailable(format!(
                        "node {} could not delete snapshot {raw}: {}",
                        n.id,
                        s.message()
                    )));
                }
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "node {} did not delete snapshot {raw} in time",
                        n.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every replicated snapshot, in uuid order, optionally only those of
    /// snapshot ID `snapshot` or of source volume ID `source`.
    pub async fn list_snapshots(
        &self,
        snapshot: &str,
        source: &str,
    ) -> Result<Vec<csi::Snapshot>, Status> {
        let want_snap = (!snapshot.is_empty()).then(|| parse_snapshot_id(snapshot));
        let want_source = (!source.is_empty()).then(|| parse_id(source).ok());
        if matches!(want_snap, Some(None)) || matches!(want_source, Some(None)) {
            return Ok(Vec::new());
        }
        Ok(self
            .held_snapshots()
            .await?
            .into_values()
            .filter(|s| want_snap.is_none_or(|w| w == Some(s.uuid)))
            .filter(|s| want_source.is_none_or(|w| w == Some(s.volume)))
            .map(|s| s.csi())
            .collect())
    }

    /// GetSnapshot of a replicated snapshot.
    pub async fn get_snapshot(&self, raw: &str) -> Result<csi::Snapshot, Status> {
        let uuid = parse_snapshot_id(raw).ok_or_else(|| {
            Status::not_found(format!("no snapshot has the malformed ID {raw:?}"))
        })?;
        self.held_snapshot(uuid)
            .await?
            .map(|s| s.csi())
            .ok_or_else(|| Status::not_found(format!("snapshot {raw} does not exist")))
    }

    /// What CreateVolume's content source names, found: NOT_FOUND when it
    /// does not exist, INVALID_ARGUMENT when it is not replicated.
    pub(super) async fn content_source(
        &self,
        src: Option<&csi::VolumeContentSource>,
    ) -> Result<Option<Source>, Status> {
        use csi::volume_content_source::Type;
        let Some(src) = src.and_then(|s| s.r#type.as_ref()) else {
            return Ok(None);
        };
        match src {
            Type::Volume(v) if is_replicated_id(&v.volume_id) => {
                let (_, state) = self.newest(&v.volume_id).await?;
                Ok(Some(Source::Volume {
                    record: state.record,
                }))
            }
            Type::Snapshot(s) if is_replicated_snapshot_id(&s.snapshot_id) => {
                let uuid = parse_snapshot_id(&s.snapshot_id).ok_or_else(|| {
                    Status::not_found(format!(
                        "source snapshot {:?} does not exist",
                        s.snapshot_id
                    ))
                })?;
                let snap = self.held_snapshot(uuid).await?.ok_or_else(|| {
                    Status::not_found(format!("source snapshot {} does not exist", s.snapshot_id))
                })?;
                Ok(Some(Source::Snapshot { snap }))
            }
            Type::Volume(v) if crate::volume::id::VolumeId::parse(&v.volume_id).is_none() => Err(
                Status::not_found(format!("source volume {:?} does not exist", v.volume_id)),
            ),
            Type::Snapshot(s) if SnapshotId::parse(&s.snapshot_id).is_none() => {
                Err(Status::not_found(format!(
                    "source snapshot {:?} does not exist",
                    s.snapshot_id
                )))
            }
            _ => Err(Status::invalid_argument(
                "volume_content_source: a replicated volume is made only from a replicated volume or snapshot",
            )),
        }
    }

    /// The members of a volume made from `source`: copies on nodes that
    /// hold it first (as many as can be, at least one), the rest placed as
    /// usual. Only the copies on holders start in sync.
    pub(super) fn place_from(
        &self,
        uuid: Uuid,
        source: &Source,
        rp: &ReplicaParams,
        size: u64,
    ) -> Result<(Vec<Member>, BTreeMap<String, u64>), Status> {
        let holders = source.holders();
        let candidates = self.candidates();
        // Holders only (the others keep no room, so a witness may still go
        // there), else anywhere with one holder as the preferred node.
        let only_holders: Vec<Candidate> = candidates
            .iter()
            .cloned()
            .map(|mut c| {
                if !holders.contains(&c.node) {
                    c.free_bytes = 0;
                }
                c
            })
            .collect();
        let placed = placement::place(uuid, &only_holders, rp.replicas, size, Locality::None, None)
            .or_else(|_| {
                let eligible = candidates.iter().find(|c| {
                    holders.contains(&c.node) && c.fresh && !c.cordoned && c.free_bytes >= size
                });
                let Some(h) = eligible else {
                    return Err(Status::unavailable(format!(
                        "no node holding the source ({}) is fresh, uncordoned and has {size} bytes free",
                        holders.join(", ")
                    )));
                };
                placement::place(
                    uuid,
                    &candidates,
                    rp.replicas,
                    size,
                    Locality::BestEffort,
                    Some(&h.node),
                )
                .map_err(|e| Status::resource_exhausted(e.to_string()))
            })?;
        let members = placed.members();
        let in_sync: BTreeMap<String, u64> = placed
            .copies
            .iter()
            .filter(|c| holders.contains(c))
            .map(|c| (c.clone(), 1))
            .collect();
        if in_sync.is_empty() {
            return Err(Status::unavailable(
                "no copy could be placed on a node holding the source",
            ));
        }
        Ok((members, in_sync))
    }

    /// Creates `node`'s member of a volume made from `source`.
    pub(super) async fn create_from_on(
        &self,
        node: &str,
        record: &ReplicaRecord,
        source: &Source,
    ) -> Result<(), Status> {
        let n = self.node(node)?;
        let mut c = ReplicaClient::new(n.channel.clone());
        let req = source.request(record)?;
        let wait = CALL_DEADLINE * 4;
        match tokio::time::timeout(wait, c.create(bounded(req, wait))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => Err(Status::already_exists(
                format!("node {node}: {}", s.message()),
            )),
            Ok(Err(s)) if s.code() == tonic::Code::Aborted => Err(Status::aborted(format!(
                "node {node}: the source changed meanwhile, retry: {}",
                s.message()
            ))),
            Ok(Err(s)) => Err(Status::unavailable(format!(
                "node {node} could not create its copy: {}",
                s.message()
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "node {node} did not create its copy in time"
            ))),
        }
    }
}
