//! Group snapshots of replicated volumes: one crash-consistent instant of
//! several volumes, each member an ordinary replicated snapshot held by the
//! copies that took it.
//!
//! Two phases over every copy in sync of every volume (`Freeze` and `Thaw`
//! on the copies, see `cluster/replica/freeze.rs`):
//! 1. Freeze them all at once. A frozen copy takes no write until it is
//!    thawed or its lease runs out, so once every freeze has answered, no
//!    write lands on any of them: that moment is the group's instant.
//! 2. Read every volume's record again, and keep only copies still in sync
//!    at the boot they froze at (a copy marked out of sync meanwhile may lack
//!    a write that was acknowledged, and a write that depends on it may be in
//!    another member). Then commit: each kept copy snapshots itself before it
//!    lets go. A commit that comes after its copy's lease ran out is refused,
//!    so every member that exists holds its copy as it was at the instant.
//!
//! A volume needs one committed copy. When one has none (a copy down, a
//! lease run out), the members taken are removed and the whole is tried
//! again, a few times. Nothing is kept by the controller: the group is found
//! by asking the fresh nodes for snapshots that name it, and each member
//! names every volume of the group and every node asked to take a member.
//! A group lacking a member is one cut short by a controller that died
//! midway, taken again by the retried CreateVolumeGroupSnapshot, unless
//! one of those nodes is down (then it may hold the member: UNAVAILABLE,
//! nothing deleted).
//!
//! The lease is shorter than the time an engine waits for a copy before it
//! marks the copy out of sync, so a group snapshot stalls writes briefly
//! and never takes a copy out of sync.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tonic::Status;

use super::super::proto::replica_client::ReplicaClient;
use super::super::proto::{ReplicaFreezeRequest, ReplicaThawRequest};
use super::snap::{HeldSnapshot, snapshot_id};
use super::{Replicated, parse_id, volume_id};
use crate::backend::replicated::placement;
use crate::backend::replicated::record::ReplicaRecord;
use crate::csi;
use crate::volume::id::Uuid;

const GROUP_PREFIX: &str = "group:replicated:";

/// How long a copy stays frozen at most (the copies allow up to 1.5 s;
/// engines mark a copy out of sync after 2 s without an answer).
const LEASE: Duration = Duration::from_millis(1000);

/// How long the controller waits for a copy to freeze.
const FREEZE_DEADLINE: Duration = Duration::from_millis(600);

/// How long a commit may take (it copies the copy's extents).
const COMMIT_DEADLINE: Duration = Duration::from_secs(10);

/// How often CreateVolumeGroupSnapshot tries when a try is cut short.
const GROUP_ATTEMPTS: usize = 3;

/// Whether `raw` is a replicated group snapshot's ID (well formed or not).
pub fn is_replicated_group_id(raw: &str) -> bool {
    raw.starts_with(GROUP_PREFIX)
}

/// `group:replicated:<uuid>`.
pub(super) fn group_id(uuid: Uuid) -> String {
    format!("{GROUP_PREFIX}{}", uuid.to_hex())
}

fn parse_group_id(raw: &str) -> Option<Uuid> {
    raw.strip_prefix(GROUP_PREFIX).and_then(Uuid::parse_hex)
}

/// The uuid of the group snapshot named `name` (never a volume's or a
/// snapshot's: another prefix).
fn group_uuid(name: &str) -> Uuid {
    placement::volume_uuid(&format!("group\0{name}"))
}

/// The uuid of the member of group `name` that holds `volume`.
fn member_uuid(name: &str, volume: Uuid) -> Uuid {
    placement::volume_uuid(&format!("group\0{name}\0{}", volume.to_hex()))
}

/// A group as the fresh nodes hold it: its members by volume.
struct HeldGroup {
    uuid: Uuid,
    /// The volumes every member names.
    volumes: Vec<Uuid>,
    /// Every node asked to take a member, as the members remember.
    nodes: BTreeSet<String>,
    members: BTreeMap<Uuid, HeldSnapshot>,
}

impl HeldGroup {
    /// Whether a member of every volume is held.
    fn complete(&self) -> bool {
        self.volumes.iter().all(|v| self.members.contains_key(v))
    }

    /// The volumes with no member held, as IDs.
    fn lacking(&self) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|v| !self.members.contains_key(v))
            .map(|v| volume_id(*v))
            .collect()
    }

    fn member_ids(&self) -> BTreeSet<String> {
        self.members.values().map(|m| snapshot_id(m.uuid)).collect()
    }

    fn csi(&self) -> csi::VolumeGroupSnapshot {
        let created = self
            .members
            .values()
            .map(|m| m.created)
            .min()
            .unwrap_or_default();
        csi::VolumeGroupSnapshot {
            group_snapshot_id: group_id(self.uuid),
            snapshots: self.members.values().map(HeldSnapshot::csi).collect(),
            creation_time: Some(prost_types::Timestamp {
                seconds: created.0,
                nanos: created.1,
            }),
            ready_to_use: true,
        }
    }

    /// INVALID_ARGUMENT unless `given` (when not empty) names exactly the
    /// members.
    #[allow(clippy::result_large_err)]
    fn check_members(&self, given: &[String]) -> Result<(), Status> {
        if given.is_empty() || given.iter().cloned().collect::<BTreeSet<_>>() == self.member_ids() {
            return Ok(());
        }
        Err(self.mismatch())
    }

    fn mismatch(&self) -> Status {
        Status::invalid_argument(format!(
            "snapshot_ids: do not match the members of group snapshot {}",
            group_id(self.uuid)
        ))
    }

    /// [`Self::check_members`] for a delete, which a retry may repeat
    /// after some members went: `given` (when not empty) holds every
    /// member still held and as many IDs as the group has volumes.
    #[allow(clippy::result_large_err)]
    fn check_members_to_delete(&self, given: &[String]) -> Result<(), Status> {
        let given: BTreeSet<String> = given.iter().cloned().collect();
        if given.is_empty()
            || (given.len() == self.volumes.len() && self.member_ids().is_subset(&given))
        {
            return Ok(());
        }
        Err(self.mismatch())
    }
}

/// A copy frozen for the group: the volume, the member it takes, the node.
#[derive(Debug, Clone)]
struct Frozen {
    volume: Uuid,
    member: Uuid,
    node: String,
}

impl Replicated {
    /// The group `uuid` as the fresh nodes hold it (None when no member
    /// is held).
    async fn held_group(&self, uuid: Uuid) -> Result<Option<HeldGroup>, Status> {
        let mut group: Option<HeldGroup> = None;
        for s in self.held_snapshots().await?.into_values() {
            let Some(of) = s.group.clone().filter(|g| g.group == uuid) else {
                continue;
            };
            let held = group.get_or_insert_with(|| HeldGroup {
                uuid,
                volumes: of.volumes,
                nodes: BTreeSet::new(),
                members: BTreeMap::new(),
            });
            held.nodes.extend(of.nodes);
            held.members.insert(s.volume, s);
        }
        Ok(group)
    }

    /// UNAVAILABLE when `held` lacks members and a node that may hold
    /// them is down (not fresh, not forgotten): then it cannot be told from
    /// a group cut short.
    #[allow(clippy::result_large_err)]
    fn none_down(&self, held: &HeldGroup) -> Result<(), Status> {
        let down = self.down(&held.nodes);
        if held.complete() || down.is_empty() {
            return Ok(());
        }
        Err(Status::unavailable(format!(
            "group snapshot {} lacks the members of {}, which may be on {} (not registered and fresh now)",
            group_id(held.uuid),
            held.lacking().join(", "),
            down.join(", ")
        )))
    }

    /// CreateVolumeGroupSnapshot of replicated volumes. Idempotent by
    /// name: the same volumes return the group taken; other volumes are
    /// ALREADY_EXISTS.
    pub async fn create_group_snapshot(
        &self,
        r: &csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::VolumeGroupSnapshot, Status> {
        use crate::server::convert;
        convert::required_str("name", &r.name).map_err(Status::from)?;
        if r.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument(
                "source_volume_ids: at least one volume is required",
            ));
        }
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with(crate::volume::params::KUBERNETES_PREFIX))
        {
            return Err(Status::invalid_argument(format!(
                "parameters: unknown group snapshot parameter {k:?} (none are supported)"
            )));
        }
        let mut volumes = r
            .source_volume_ids
            .iter()
            .map(|v| parse_id(v))
            .collect::<Result<Vec<_>, _>>()?;
        volumes.sort();
        volumes.dedup();
        let uuid = group_uuid(&r.name);
        let mut why = Status::internal("no attempt made");
        for _ in 0..GROUP_ATTEMPTS {
            if let Some(held) = self.held_group(uuid).await? {
                if held.volumes != volumes {
                    return Err(Status::already_exists(format!(
                        "group snapshot name {:?} is taken by a group of other volumes",
                        r.name
                    )));
                }
                if held.complete() {
                    return Ok(held.csi());
                }
                // Cut short by an earlier try (unless the lacking members
                // are on a node that is down): its members are of no one
                // instant with the ones taken now.
                self.none_down(&held)?;
                for m in held.members.values() {
                    self.remove_snapshot(m.uuid, Some(m)).await?;
                }
            }
            match self.take_group(&r.name, uuid, &volumes).await {
                Ok(()) => {}
                Err(s) if worth_another_try(&s) => why = s,
                Err(s) => return Err(s),
            }
        }
        match self.held_group(uuid).await? {
            Some(held) if held.complete() => Ok(held.csi()),
            _ => Err(gave_up(&r.name, &why)),
        }
    }

    /// One try at taking group `uuid` of `volumes` (see the module
    /// documentation). ABORTED when it should be tried again; nothing of a
    /// failed try is kept.
    async fn take_group(&self, name: &str, uuid: Uuid, volumes: &[Uuid]) -> Result<(), Status> {
        let mut records: BTreeMap<Uuid, ReplicaRecord> = BTreeMap::new();
        for (v, read) in volumes.iter().zip(self.records(volumes).await) {
            records.insert(*v, read?);
        }
        let token = uuid::Uuid::new_v4().as_u64_pair().0;
        let group_volumes: Vec<String> = volumes.iter().map(|v| v.to_hex()).collect();
        let group_nodes: Vec<String> = records
            .values()
            .flat_map(|r| r.in_sync.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let started = Instant::now();

        // Phase 1: every copy in sync freezes, all at once.
        let mut asks = Vec::new();
        for (v, record) in &records {
            let json =
                serde_json::to_string(record).map_err(|e| Status::internal(e.to_string()))?;
            for node in record.in_sync.keys() {
                let f = Frozen {
                    volume: *v,
                    member: member_uuid(name, *v),
                    node: node.clone(),
                };
                let req = ReplicaFreezeRequest {
                    volume: v.to_hex(),
                    snapshot: f.member.to_hex(),
                    record: json.clone(),
                    group: uuid.to_hex(),
                    group_volumes: group_volumes.clone(),
                    group_nodes: group_nodes.clone(),
                    token,
                    lease_ms: LEASE.as_millis() as u32,
                };
                let n = self.node(node);
                asks.push(tokio::spawn(async move {
                    let mut c = ReplicaClient::new(n?.channel.clone());
                    match tokio::time::timeout(FREEZE_DEADLINE, c.freeze(req)).await {
                        Ok(Ok(_)) => Ok(f),
                        Ok(Err(s)) => Err(Status::new(
                            s.code(),
                            format!("node {}: {}", f.node, s.message()),
                        )),
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "node {} did not freeze its copy in time",
                            f.node
                        ))),
                    }
                }));
            }
        }
        let (mut frozen, mut why) = (Vec::new(), Vec::new());
        for a in asks {
            match a.await.map_err(|e| Status::internal(e.to_string()))? {
                Ok(f) => frozen.push(f),
                Err(s) => why.push(s),
            }
        }
        let frozen_at = started.elapsed();
        if let Some(v) = lacking(volumes, &frozen) {
            self.thaw(&frozen, token, false).await;
            return Err(missing(v, "froze", &why));
        }

        // The instant is now: every copy is frozen. Keep those still in
        // sync at the boot they froze at (every record read at once: the
        // writes wait meanwhile).
        let mut now = BTreeMap::new();
        for (v, read) in volumes.iter().zip(self.records(volumes).await) {
            match read {
                Ok(r) => now.insert(*v, r),
                Err(e) => {
                    self.thaw(&frozen, token, false).await;
                    return Err(Status::aborted(format!(
                        "volume {}'s record could not be read again: {}",
                        volume_id(*v),
                        e.message()
                    )));
                }
            };
        }
        let (kept, dropped): (Vec<Frozen>, Vec<Frozen>) = frozen.into_iter().partition(|f| {
            now[&f.volume].in_sync.get(&f.node) == records[&f.volume].in_sync.get(&f.node)
        });
        why.extend(dropped.iter().map(|f| {
            Status::aborted(format!(
                "the copy on {} left the in-sync set while frozen",
                f.node
            ))
        }));
        self.thaw(&dropped, token, false).await;
        if let Some(v) = lacking(volumes, &kept) {
            self.thaw(&kept, token, false).await;
            return Err(missing(v, "stayed in sync while frozen", &why));
        }

        // Phase 2: each kept copy takes its member, then lets go.
        let committed = self.thaw(&kept, token, true).await;
        let stalled = started.elapsed();
        if let Some(v) = lacking(volumes, &committed) {
            let why = vec![Status::aborted(
                "a commit came after its copy's lease ran out",
            )];
            let mut held = self.held_snapshots().await?;
            for m in volumes.iter().map(|v| member_uuid(name, *v)) {
                self.remove_snapshot(m, held.remove(&m).as_ref()).await?;
            }
            return Err(missing(v, "took its member", &why));
        }
        tracing::info!(
            group = %group_id(uuid),
            name,
            volumes = volumes.len(),
            copies = committed.len(),
            frozen_ms = frozen_at.as_millis() as u64,
            stalled_ms = stalled.as_millis() as u64,
            "replicated group snapshot taken"
        );
        Ok(())
    }

    /// The newest record of each of `volumes`, read at once, in order.
    async fn records(&self, volumes: &[Uuid]) -> Vec<Result<ReplicaRecord, Status>> {
        let asks: Vec<_> = volumes
            .iter()
            .map(|v| {
                let (me, id) = (self.clone(), volume_id(*v));
                tokio::spawn(async move { me.newest(&id).await.map(|(_, s)| s.record) })
            })
            .collect();
        let mut out = Vec::with_capacity(asks.len());
        for a in asks {
            out.push(
                a.await
                    .unwrap_or_else(|e| Err(Status::internal(e.to_string()))),
            );
        }
        out
    }

    /// Thaws `frozen` copies, committing them with `commit`; returns those
    /// that took their member.
    async fn thaw(&self, frozen: &[Frozen], token: u64, commit: bool) -> Vec<Frozen> {
        let asks: Vec<_> = frozen
            .iter()
            .cloned()
            .map(|f| {
                let n = self.node(&f.node);
                tokio::spawn(async move {
                    let mut c = ReplicaClient::new(n.ok()?.channel.clone());
                    let req = ReplicaThawRequest {
                        snapshot: f.member.to_hex(),
                        token,
                        commit,
                    };
                    match tokio::time::timeout(COMMIT_DEADLINE, c.thaw(req)).await {
                        Ok(Ok(_)) => Some(f),
                        Ok(Err(s)) => {
                            tracing::warn!(node = %f.node, commit, error = %s.message(), "a group snapshot's copy did not thaw as asked");
                            None
                        }
                        Err(_) => None,
                    }
                })
            })
            .collect();
        let mut done = Vec::new();
        for a in asks {
            if let Ok(Some(f)) = a.await {
                done.push(f);
            }
        }
        done
    }

    /// DeleteVolumeGroupSnapshot: every member, from every fresh node (see
    /// `delete_snapshot`). Idempotent.
    pub async fn delete_group_snapshot(
        &self,
        raw: &str,
        snapshot_ids: &[String],
    ) -> Result<(), Status> {
        let Some(uuid) = parse_group_id(raw) else {
            return Ok(());
        };
        let Some(held) = self.held_group(uuid).await? else {
            return Ok(());
        };
        held.check_members_to_delete(snapshot_ids)?;
        // Nothing is removed while a node asked to take a member is down:
        // removing the others first would leave a group that a retry,
        // naming every member, could no longer match.
        let down = self.down(&held.nodes);
        if !down.is_empty() {
            return Err(Status::unavailable(format!(
                "group snapshot {raw} has members on {}, not registered and fresh now: nothing deleted; retry once back (or once forgotten with `stowage node forget`, when gone for good)",
                down.join(", ")
            )));
        }
        for m in held.members.values() {
            self.remove_snapshot(m.uuid, Some(m)).await?;
        }
        tracing::info!(group = %raw, "replicated group snapshot deleted");
        Ok(())
    }

    /// GetVolumeGroupSnapshot of a replicated group.
    pub async fn get_group_snapshot(
        &self,
        raw: &str,
        snapshot_ids: &[String],
    ) -> Result<csi::VolumeGroupSnapshot, Status> {
        let held = match parse_group_id(raw) {
            Some(uuid) => self.held_group(uuid).await?,
            None => None,
        };
        let held =
            held.ok_or_else(|| Status::not_found(format!("group snapshot {raw} does not exist")))?;
        held.check_members(snapshot_ids)?;
        self.none_down(&held)?;
        if !held.complete() {
            return Err(Status::unavailable(format!(
                "group snapshot {raw} lacks the members of {}: it was cut short (CreateVolumeGroupSnapshot takes it again)",
                held.lacking().join(", ")
            )));
        }
        Ok(held.csi())
    }
}

/// The first of `volumes` with no copy among `copies`.
fn lacking(volumes: &[Uuid], copies: &[Frozen]) -> Option<Uuid> {
    volumes
        .iter()
        .copied()
        .find(|v| !copies.iter().any(|f| f.volume == *v))
}

/// Whether a try that failed with `s` is tried again: it was cut short
/// (ABORTED) or a copy did not answer in time (DEADLINE_EXCEEDED).
fn worth_another_try(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Aborted | tonic::Code::DeadlineExceeded
    )
}

/// Why volume `v` has no copy that `did`: ABORTED when every copy's try
/// was cut short, DEADLINE_EXCEEDED when some copy did not answer in time
/// and the others were cut short (both tried again), else UNAVAILABLE.
fn missing(v: Uuid, did: &str, why: &[Status]) -> Status {
    let detail: Vec<&str> = why.iter().map(|s| s.message()).collect();
    let msg = format!(
        "no copy of volume {} {did}: {}",
        volume_id(v),
        detail.join("; ")
    );
    if why.iter().all(|s| s.code() == tonic::Code::Aborted) {
        Status::aborted(msg)
    } else if why.iter().all(worth_another_try) {
        Status::deadline_exceeded(msg)
    } else {
        Status::unavailable(msg)
    }
}

/// The answer once every try failed, the last with `why`: a copy that
/// did not answer in time, try after try, is UNAVAILABLE (the CO retries
/// later); tries cut short by other operations are ABORTED.
fn gave_up(name: &str, why: &Status) -> Status {
    let msg = format!(
        "group snapshot {name:?} was not taken in {GROUP_ATTEMPTS} tries: {}",
        why.message()
    );
    match why.code() {
        tonic::Code::Aborted => Status::aborted(msg),
        _ => Status::unavailable(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_retried_after_some_members_went_still_matches() {
        let held_of = |uuid: Uuid, volume: Uuid| HeldSnapshot {
            uuid,
            volume,
            size: 1 << 20,
            epoch: 1,
            created: (0, 0),
            holders: vec!["n1".to_owned()],
            taken_on: BTreeSet::from(["n1".to_owned()]),
            group: None,
        };
        let (v1, v2) = (Uuid::new_random(), Uuid::new_random());
        let (s1, s2) = (Uuid::new_random(), Uuid::new_random());
        let mut group = HeldGroup {
            uuid: Uuid::new_random(),
            volumes: vec![v1, v2],
            nodes: BTreeSet::from(["n1".to_owned()]),
            members: BTreeMap::from([(v1, held_of(s1, v1)), (v2, held_of(s2, v2))]),
        };
        let both = [snapshot_id(s1), snapshot_id(s2)];
        let other = snapshot_id(Uuid::new_random());
        group.check_members_to_delete(&both).unwrap();
        group.check_members_to_delete(&[]).unwrap();
        let wrong = [
            vec![snapshot_id(s1)],
            vec![snapshot_id(s1), other.clone()],
            vec![snapshot_id(s1), snapshot_id(s2), other.clone()],
        ];
        for given in &wrong {
            let e = group.check_members_to_delete(given).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{given:?}");
        }
        // s1 went with a delete cut short: the retry names both still.
        group.members.remove(&v1);
        group.check_members_to_delete(&both).unwrap();
        assert!(group.check_members(&both).is_err());
        for given in [vec![snapshot_id(s2)], vec![other.clone(), other]] {
            let e = group.check_members_to_delete(&given).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{given:?}");
        }
    }

    #[test]
    fn copies_that_never_freeze_in_time_end_unavailable_and_cut_short_tries_aborted() {
        let v = Uuid::new_random();
        let late = Status::deadline_exceeded("node n2 did not freeze its copy in time");
        let cut = Status::aborted("the copy on n3 left the in-sync set while frozen");
        let down = Status::unavailable("node n4: connection refused");
        let hung = missing(v, "froze", &[late.clone(), late.clone()]);
        assert_eq!(hung.code(), tonic::Code::DeadlineExceeded);
        assert!(worth_another_try(&hung));
        assert_eq!(
            missing(v, "froze", &[late.clone(), cut.clone()]).code(),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(
            missing(v, "froze", &[cut.clone(), cut.clone()]).code(),
            tonic::Code::Aborted
        );
        let mixed = missing(v, "froze", &[late, down]);
        assert_eq!(mixed.code(), tonic::Code::Unavailable);
        assert!(!worth_another_try(&mixed));
        let last = gave_up("g", &hung);
        assert_eq!(last.code(), tonic::Code::Unavailable);
        assert!(
            last.message().contains("did not freeze its copy in time"),
            "{last:?}"
        );
        assert_eq!(
            gave_up("g", &missing(v, "froze", &[cut])).code(),
            tonic::Code::Aborted
        );
    }

    #[test]
    fn group_ids_name_no_node_and_differ_from_snapshots() {
        let u = group_uuid("g");
        assert_eq!(parse_group_id(&group_id(u)), Some(u));
        assert!(is_replicated_group_id(&group_id(u)));
        assert_eq!(parse_group_id("group:replicated:xyz"), None);
        assert_eq!(parse_group_id(&format!("group:n1:{}", u.to_hex())), None);
        let v = Uuid::new_random();
        assert_ne!(member_uuid("g", v), member_uuid("h", v));
        assert_ne!(member_uuid("g", v), member_uuid("g", Uuid::new_random()));
        assert_ne!(group_uuid("g"), placement::volume_uuid("snapshot\0g"));
    }
}
