//! The `Replica` service on a node's agent port (its copies and witness
//! records of replicated volumes, [`ReplicaStore`]) and [`GrpcPeer`], the
//! transport engines and the controller reach voters with: mutual TLS to
//! other nodes' agents, a direct call into the store for the caller's own
//! node, and the data link ([`super::link`]) for data requests to nodes
//! that offer one.
//!
//! Every agent serves a data link beside its gRPC port and tells engines
//! its address in its answer to an `Attach` (over mutual TLS). With
//! replication TLS off (`--replication-tls=off`, for benchmarks only) that
//! link is plaintext and unauthenticated, and an engine uses it only when
//! its own node has the flag too. Record changes, attaches and everything
//! the controller sends stay on the gRPC port, so fencing, epochs and
//! membership are unchanged; the epoch each data request carries is still
//! checked by the copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod freeze;

use crate::volume::id::Uuid;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::link::LinkClient;
use super::proto::replica_client::ReplicaClient;
use super::proto::replica_server::Replica;
use super::proto::{
    CopyStatus, CreateReplicaRequest, CreateReplicaResponse, DeleteReplicaRequest,
    DeleteReplicaResponse, EngineStatusResponse, GetReplicaRequest, GetReplicaResponse, IdleCheck,
    ListReplicaSnapshotsResponse, ListReplicasRequest, ListReplicasResponse, ReplicaAnswer,
    ReplicaBatch, ReplicaCall, ReplicaFreezeRequest, ReplicaFreezeResponse, ReplicaResult,
    ReplicaResults, ReplicaSnapshot, ReplicaSnapshotRef, ReplicaSnapshotRequest,
    ReplicaThawRequest, ScrubResponse,
};
use super::tls::{ClientTls, PeerIdentity, ServerRole, peer_identity};
use crate::backend::replicated::protocol::{Reply, Request as ProtoRequest};
use crate::backend::replicated::record::ReplicaRecord;
use crate::backend::replicated::store::{Base, GroupOf, ReplicaStore, SnapshotInfo, StoreError};
use crate::backend::replicated::wire::{Answer, BatchDone, Call, Peer, PeerError, one_by_one};

/// A heal ends when its engine made no progress for this long (a copy out
/// of reach, or a disk that fails every write).
const HEAL_STALL: Duration = Duration::from_secs(60);

/// A failure of this node's own copy as a remote one would be reported
/// (see [`super::link::status_error`]).
fn local_error(node: &str, e: StoreError) -> PeerError {
    let status = status_of(e);
    super::link::status_error(node, status.code(), status.message().to_owned())
}

pub(crate) fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::Conflict { .. } => Status::already_exists(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::Stale(_) => Status::aborted(e.to_string()),
        StoreError::Io { .. } => Status::internal(e.to_string()),
    }
}

#[allow(clippy::result_large_err)]
fn volume_of(raw: &str) -> Result<Uuid, Status> {
    Uuid::parse_hex(raw).ok_or_else(|| Status::invalid_argument(format!("invalid volume {raw:?}")))
}

fn snapshot_message(i: &SnapshotInfo) -> ReplicaSnapshot {
    ReplicaSnapshot {
        snapshot: i.snapshot.to_hex(),
        volume: i.volume.to_hex(),
        size: i.size,
        epoch: i.epoch,
        created_seconds: i.created_seconds,
        created_nanos: i.created_nanos,
        nodes: i.nodes.clone(),
        group: i
            .group
            .as_ref()
            .map(|g| g.group.to_hex())
            .unwrap_or_default(),
        group_volumes: i
            .group
            .as_ref()
            .map(|g| g.volumes.iter().map(|v| v.to_hex()).collect())
            .unwrap_or_default(),
        group_nodes: i
            .group
            .as_ref()
            .map(|g| g.nodes.clone())
            .unwrap_or_default(),
    }
}

/// Serves the node's [`ReplicaStore`].
#[derive(Debug)]
pub struct ReplicaService {
    store: Arc<ReplicaStore>,
    engines: Option<Arc<crate::backend::replicated::engines::Engines>>,
    /// This node's data link (`tls://host:port`, or `tcp://host:port` with
    /// replication TLS off), told to engines that attach.
    link: Option<String>,
    /// Group snapshot freezes held on this node's copies.
    freezes: freeze::Freezes,
    /// This node's checks of its idle copies.
    idle: Option<Arc<crate::backend::replicated::idle::IdleChecks>>,
}

impl ReplicaService {
    /// Serves `store`, and the status of this node's `engines`.
    pub fn new(
        store: Arc<ReplicaStore>,
        engines: Option<Arc<crate::backend::replicated::engines::Engines>>,
    ) -> Self {
        ReplicaService {
            store,
            engines,
            link: None,
            freezes: freeze::Freezes::default(),
            idle: None,
        }
    }

    /// Serves `stowage volume scrub` of volumes not published with `idle`.
    pub fn with_idle(mut self, idle: Arc<crate::backend::replicated::idle::IdleChecks>) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Tells engines that attach where this node's data link listens
    /// (see [`super::link`]): `tls://host:port`, or `tcp://host:port` with
    /// replication TLS off.
    pub fn with_link(mut self, link: String) -> Self {
        self.link = Some(link);
        self
    }

    /// [`Self::allowed`] for a call, without leaving the async task when the
    /// copy is open and not busy (every call after the first, as a rule).
    async fn may_call<T>(&self, req: &Request<T>, volume: Uuid) -> Result<(), Status> {
        if let Some(PeerIdentity::Node(n)) = peer_identity(req)
            && self.store.names_at_once(volume, &n) == Some(true)
        {
            return Ok(());
        }
        self.allowed(req, volume).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReplicaStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status_of)
    }

    /// [`authorize`], on the blocking pool (it may open the copy).
    async fn allowed<T>(&self, req: &Request<T>, volume: Uuid) -> Result<(), Status> {
        let who = peer_identity(req);
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || authorize(&store, who.as_ref(), volume))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }
}

/// Whether `who` may act on `volume`'s copy here: the cluster certificate
/// may; a node certificate only when the record this node holds names that
/// node (a member or the owner). Blocks when the copy is not open yet.
#[allow(clippy::result_large_err)]
pub(crate) fn authorize(
    store: &ReplicaStore,
    who: Option<&PeerIdentity>,
    volume: Uuid,
) -> Result<(), Status> {
    match who {
        Some(PeerIdentity::Cluster) => Ok(()),
        Some(PeerIdentity::Node(n)) => {
            if store.names(volume, n) == Some(true) {
                return Ok(());
            }
            let named = store.get(volume).map_err(status_of)?.is_some_and(|h| {
                let r = &h.state.record;
                r.members.iter().any(|m| &m.node == n)
                    || r.owner.as_ref().is_some_and(|o| &o.node == n)
            });
            if named {
                Ok(())
            } else {
                Err(Status::permission_denied(format!(
                    "the certificate of node {n} may not act on replicated volume {volume}"
                )))
            }
        }
        None => Err(Status::unauthenticated("no client certificate")),
    }
}

#[allow(clippy::result_large_err)]
fn controller_only<T>(req: &Request<T>) -> Result<(), Status> {
    match peer_identity(req) {
        Some(PeerIdentity::Cluster) => Ok(()),
        Some(p) => Err(Status::permission_denied(format!(
            "{p} may not create or delete copies"
        ))),
        None => Err(Status::unauthenticated("no client certificate")),
    }
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn create(
        &self,
        req: Request<CreateReplicaRequest>,
    ) -> Result<Response<CreateReplicaResponse>, Status> {
        controller_only(&req)?;
        let r = req.into_inner();
        let record: ReplicaRecord = serde_json::from_str(&r.record)
            .map_err(|e| Status::invalid_argument(format!("record: {e}")))?;
        let base = match (r.from_snapshot.as_str(), r.from_volume.as_str()) {
            ("", "") => None,
            (snap, "") => Some(Base::Snapshot(volume_of(snap)?)),
            ("", volume) => Some(Base::Volume {
                uuid: volume_of(volume)?,
                expect: serde_json::from_str(&r.from_record)
                    .map_err(|e| Status::invalid_argument(format!("from_record: {e}")))?,
            }),
            _ => {
                return Err(Status::invalid_argument(
                    "from_snapshot and from_volume exclude each other",
                ));
            }
        };
        // Made only while the controller waits for this answer: one it
        // stopped waiting for would be a member no CreateVolume made (the
        // controller removed the others, or a retry makes it anew).
        let (waiting, waited_on) = tokio::sync::oneshot::channel::<()>();
        self.blocking(move |s| {
            let made = s.create_from_gated(&record, base.as_ref(), &mut || !waiting.is_closed());
            if let Err(e) = &made
                && waiting.is_closed()
            {
                tracing::info!(volume = %record.uuid, error = %e, "copy not created: the controller stopped waiting");
            }
            made
        })
        .await?;
        drop(waited_on);
        Ok(Response::new(CreateReplicaResponse {}))
    }

    async fn delete(
        &self,
        req: Request<DeleteReplicaRequest>,
    ) -> Result<Response<DeleteReplicaResponse>, Status> {
        controller_only(&req)?;
        let volume = volume_of(&req.get_ref().volume)?;
        self.blocking(move |s| s.delete(volume)).await?;
        Ok(Response::new(DeleteReplicaResponse {}))
    }

    async fn get(
        &self,
        req: Request<GetReplicaRequest>,
    ) -> Result<Response<GetReplicaResponse>, Status> {
        let volume = volume_of(&req.get_ref().volume)?;
        self.allowed(&req, volume).await?;
        let held = self.blocking(move |s| s.get(volume)).await?;
        Ok(Response::new(match held {
            None => GetReplicaResponse::default(),
            Some(h) => {
                let whole = h.checked.and_then(|c| c.read_sums.whole);
                GetReplicaResponse {
                    found: true,
                    state: serde_json::to_string(&h.state)
                        .map_err(|e| Status::internal(e.to_string()))?,
                    idle_seconds: h.idle.map(|d| d.as_secs()),
                    scrubbed_at: h.checked.map(|c| c.scrub.done),
                    read_at: h.checked.map(|c| c.read.done),
                    unreadable: h.unreadable as u64,
                    read_sum: whole.and_then(|w| w.sum).map(Vec::from).unwrap_or_default(),
                    read_sum_version: whole.map_or(0, |w| w.version),
                }
            }
        }))
    }

    async fn list(
        &self,
        req: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        controller_only(&req)?;
        let all = self.blocking(|s| s.list()).await?;
        Ok(Response::new(ListReplicasResponse {
            volumes: all.iter().map(|u| u.to_string()).collect(),
        }))
    }

    async fn engine(
        &self,
        req: Request<GetReplicaRequest>,
    ) -> Result<Response<EngineStatusResponse>, Status> {
        use crate::backend::replicated::engine::CopyPhase;
        controller_only(&req)?;
        let volume = volume_of(&req.get_ref().volume)?;
        let Some(st) = self
            .engines
            .as_ref()
            .and_then(|e| e.status(volume).or_else(|| e.heal_status(volume)))
        else {
            return Ok(Response::new(EngineStatusResponse::default()));
        };
        Ok(Response::new(EngineStatusResponse {
            running: !st.stopped,
            state: format!("{:?}", st.state),
            epoch: st.epoch,
            copies: st
                .copies
                .iter()
                .map(|c| CopyStatus {
                    node: c.node.clone(),
                    phase: match c.phase {
                        CopyPhase::InSync => "in-sync",
                        CopyPhase::Out => "out",
                        CopyPhase::Rebuilding => "rebuilding",
                    }
                    .to_owned(),
                    failing: c.failing,
                    dirty_regions: c.dirty as u64,
                    errors: st.errors.get(&c.node).map_or(0, |e| e.count),
                    last_error: st
                        .errors
                        .get(&c.node)
                        .map(|e| e.last.clone())
                        .unwrap_or_default(),
                    last_error_age_ms: st
                        .errors
                        .get(&c.node)
                        .map_or(0, |e| e.last_at.elapsed().as_millis() as u64),
                    scrub_repairs: st.scrub.repairs.get(&c.node).copied().unwrap_or(0),
                })
                .collect(),
            rebuild_bytes: st.rebuild_bytes,
            scrub_passes: st.scrub.passes,
            scrub_regions: st.scrub.regions,
            scrub_unresolved: st.scrub.unresolved,
            scrubbing: st.scrub.at.is_some(),
            scrub_at: st.scrub.at.unwrap_or(0),
            scrub_last_done: st.scrub.last_done,
            scrub_next_at: st.scrub.next_at,
        }))
    }

    async fn snapshot(
        &self,
        req: Request<ReplicaSnapshotRequest>,
    ) -> Result<Response<ReplicaSnapshot>, Status> {
        controller_only(&req)?;
        let r = req.into_inner();
        let volume = volume_of(&r.volume)?;
        let snap = volume_of(&r.snapshot)?;
        let expect: ReplicaRecord = serde_json::from_str(&r.record)
            .map_err(|e| Status::invalid_argument(format!("record: {e}")))?;
        // The copy freezes only while the controller waits for this
        // answer: once it stopped waiting (its deadline, or this call's,
        // passed), the snapshot it reported holds no copy frozen later,
        // which could hold writes acknowledged after it.
        let (waiting, waited_on) = tokio::sync::oneshot::channel::<()>();
        let info = self
            .blocking(move |s| {
                let made = s.snapshot_gated(volume, snap, &expect, None, &mut || {
                    !waiting.is_closed()
                });
                if waiting.is_closed() {
                    match &made {
                        Ok(_) => {
                            tracing::info!(%volume, snapshot = %snap, "snapshot taken, though the controller stopped waiting after the copy froze");
                        }
                        Err(e) => {
                            tracing::info!(%volume, snapshot = %snap, error = %e, "snapshot not taken: the controller stopped waiting before the copy could freeze");
                        }
                    }
                }
                made
            })
            .await?;
        drop(waited_on);
        Ok(Response::new(snapshot_message(&info)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<ReplicaSnapshotRef>,
    ) -> Result<Response<DeleteReplicaResponse>, Status> {
        controller_only(&req)?;
        let snap = volume_of(&req.get_ref().snapshot)?;
        self.blocking(move |s| s.delete_snapshot(snap)).await?;
        Ok(Response::new(DeleteReplicaResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicaSnapshotsResponse>, Status> {
        controller_only(&req)?;
        let all = self.blocking(|s| s.snapshots()).await?;
        Ok(Response::new(ListReplicaSnapshotsResponse {
            snapshots: all.iter().map(snapshot_message).collect(),
        }))
    }

    async fn freeze(
        &self,
        req: Request<ReplicaFreezeRequest>,
    ) -> Result<Response<ReplicaFreezeResponse>, Status> {
        controller_only(&req)?;
        let r = req.into_inner();
        let volume = volume_of(&r.volume)?;
        let snapshot = volume_of(&r.snapshot)?;
        let expect: ReplicaRecord = serde_json::from_str(&r.record)
            .map_err(|e| Status::invalid_argument(format!("record: {e}")))?;
        let mut volumes = r
            .group_volumes
            .iter()
            .map(|v| volume_of(v))
            .collect::<Result<Vec<_>, _>>()?;
        volumes.sort();
        volumes.dedup();
        if !volumes.contains(&volume) {
            return Err(Status::invalid_argument(
                "group_volumes: the group does not hold the volume frozen",
            ));
        }
        let lease = Duration::from_millis(r.lease_ms.into());
        if lease.is_zero() || lease > freeze::MAX_LEASE {
            return Err(Status::invalid_argument(format!(
                "lease_ms: from 1 to {}",
                freeze::MAX_LEASE.as_millis()
            )));
        }
        let of = freeze::FreezeOf {
            volume,
            snapshot,
            expect,
            group: GroupOf {
                group: volume_of(&r.group)?,
                volumes,
                nodes: {
                    let mut n = r.group_nodes;
                    n.sort();
                    n.dedup();
                    n
                },
            },
            token: r.token,
            lease,
        };
        self.freezes.freeze(Arc::clone(&self.store), of).await?;
        Ok(Response::new(ReplicaFreezeResponse {}))
    }

    async fn thaw(
        &self,
        req: Request<ReplicaThawRequest>,
    ) -> Result<Response<ReplicaSnapshot>, Status> {
        controller_only(&req)?;
        let r = req.into_inner();
        let snapshot = volume_of(&r.snapshot)?;
        let taken = self.freezes.thaw(snapshot, r.token, r.commit).await?;
        Ok(Response::new(
            taken.as_ref().map(snapshot_message).unwrap_or_default(),
        ))
    }

    async fn refresh(
        &self,
        req: Request<ReplicaCall>,
    ) -> Result<Response<EngineStatusResponse>, Status> {
        self.refresh_engine(req).await
    }

    async fn scrub(
        &self,
        req: Request<GetReplicaRequest>,
    ) -> Result<Response<ScrubResponse>, Status> {
        use crate::backend::replicated::driver::Scrubbing;
        controller_only(&req)?;
        let volume = volume_of(&req.get_ref().volume)?;
        let node = self.store.node().to_owned();
        let Some(driver) = self.engines.as_ref().and_then(|e| e.driver(volume)) else {
            return Err(Status::failed_precondition(format!(
                "no engine of volume {volume} runs on node {node} (not staged there)"
            )));
        };
        match driver
            .scrub()
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?
        {
            Scrubbing::Pass {
                started,
                at,
                regions,
            } => Ok(Response::new(ScrubResponse {
                node,
                started,
                at,
                regions,
                idle: Vec::new(),
            })),
            Scrubbing::NotRunning(state) => Err(Status::unavailable(format!(
                "the engine of volume {volume} on node {node} does not serve I/O ({state:?})"
            ))),
        }
    }

    async fn check_idle(
        &self,
        req: Request<GetReplicaRequest>,
    ) -> Result<Response<IdleCheck>, Status> {
        use crate::backend::replicated::idle::IdleCheck as Done;
        controller_only(&req)?;
        let volume = volume_of(&req.get_ref().volume)?;
        let node = self.store.node().to_owned();
        let Some(idle) = &self.idle else {
            return Err(Status::unavailable(format!(
                "node {node} does not check idle copies"
            )));
        };
        match idle.check_now(volume).await.map_err(status_of)? {
            Done::Reading {
                started,
                at,
                regions,
            } => Ok(Response::new(IdleCheck {
                node,
                started,
                at,
                regions,
                error: String::new(),
            })),
            Done::NotIdle => Err(Status::failed_precondition(format!(
                "node {node} holds no copy of volume {volume} that is not published"
            ))),
        }
    }

    async fn heal(
        &self,
        req: Request<super::proto::HealRequest>,
    ) -> Result<Response<super::proto::HealResponse>, Status> {
        use crate::backend::replicated::driver::DriverError;
        use crate::backend::replicated::engines::{EngineError, PublishContext};
        controller_only(&req)?;
        let r = req.into_inner();
        let volume = volume_of(&r.volume)?;
        let node = self.store.node().to_owned();
        let Some(engines) = &self.engines else {
            return Err(Status::unavailable(format!("node {node} runs no engines")));
        };
        let ctx: BTreeMap<String, String> = r.context.into_iter().collect();
        let pc =
            PublishContext::parse(&ctx).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = Arc::clone(&self.store);
        let me = node.clone();
        let ours = move || {
            store.get(volume).ok().flatten().is_none_or(|h| {
                h.state
                    .record
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.heal && o.node == me)
            })
        };
        let rate = (r.rate > 0).then_some(r.rate);
        match engines.heal(volume, pc, rate, HEAL_STALL, ours).await {
            Ok(h) => Ok(Response::new(super::proto::HealResponse {
                rebuilt_bytes: h.rebuilt_bytes,
                seconds: h.elapsed.as_secs(),
            })),
            Err(e @ (EngineError::Context(_) | EngineError::NotOwner { .. })) => {
                Err(Status::failed_precondition(format!("node {node}: {e}")))
            }
            // Taken over by a publication (or started after one).
            Err(e @ EngineError::Driver(DriverError::Fenced { .. }))
            | Err(e @ EngineError::Fenced(_)) => Err(Status::aborted(format!("node {node}: {e}"))),
            Err(e) => Err(Status::unavailable(format!("node {node}: {e}"))),
        }
    }

    async fn call_batch(
        &self,
        req: Request<ReplicaBatch>,
    ) -> Result<Response<ReplicaResults>, Status> {
        let volume = volume_of(&req.get_ref().volume)?;
        self.may_call(&req, volume).await?;
        let mut calls = Vec::with_capacity(req.get_ref().calls.len());
        for c in req.into_inner().calls {
            let call = call_of(c)?;
            if !call.request.is_data() {
                return Err(Status::invalid_argument(
                    "a batch takes data requests only (Write, Rebuild, Read, Flush)",
                ));
            }
            calls.push(call);
        }
        let store = Arc::clone(&self.store);
        let answers = tokio::task::spawn_blocking(move || {
            calls
                .into_iter()
                .map(|c| store.call(volume, c))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let mut results = Vec::with_capacity(answers.len());
        for a in answers {
            results.push(match a {
                Ok(answer) => ReplicaResult {
                    answer: Some(answer_message(answer, String::new())?),
                    code: 0,
                    error: String::new(),
                },
                Err(e) => {
                    let s = status_of(e);
                    ReplicaResult {
                        answer: None,
                        code: s.code() as i32 as u32,
                        error: s.message().to_owned(),
                    }
                }
            });
        }
        Ok(Response::new(ReplicaResults { results }))
    }

    async fn call(&self, req: Request<ReplicaCall>) -> Result<Response<ReplicaAnswer>, Status> {
        let volume = volume_of(&req.get_ref().volume)?;
        self.may_call(&req, volume).await?;
        let call = call_of(req.into_inner())?;
        let attach = matches!(call.request, ProtoRequest::Attach { .. });
        let answer = if is_small(&call) {
            // A few µs of page-cache I/O: not worth two thread hand-offs.
            // But the disk may stall (or the voter wait for a change
            // written to a stalled disk): this worker's other tasks move
            // to another thread meanwhile.
            let store = &self.store;
            may_block(|| store.call(volume, call)).map_err(status_of)?
        } else {
            self.blocking(move |s| s.call(volume, call)).await?
        };
        let link = match (&self.link, attach) {
            (Some(a), true) => a.clone(),
            _ => String::new(),
        };
        Ok(Response::new(answer_message(answer, link)?))
    }
}

/// The [`Call`] a gRPC message carries (the request as JSON).
#[allow(clippy::result_large_err)]
fn call_of(c: ReplicaCall) -> Result<Call, Status> {
    let request = serde_json::from_slice(&c.request)
        .map_err(|e| Status::invalid_argument(format!("request: {e}")))?;
    Ok(Call {
        request,
        offset: c.offset,
        len: c.len,
        data: c.data.into(),
    })
}

/// The `Reply` an agent's answer carries (JSON; none for a `Commit`).
fn reply_of(node: &str, a: &ReplicaAnswer) -> Result<Option<Reply>, PeerError> {
    if a.reply.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&a.reply)
        .map(Some)
        .map_err(|e| PeerError::Failed {
            node: node.to_owned(),
            why: format!("reply: {e}"),
        })
}

/// An [`Answer`] as the agent sends it back (the reply as JSON).
#[allow(clippy::result_large_err)]
fn answer_message(answer: Answer, link: String) -> Result<ReplicaAnswer, Status> {
    Ok(ReplicaAnswer {
        reply: match &answer.reply {
            Some(r) => serde_json::to_vec(r).map_err(|e| Status::internal(e.to_string()))?,
            None => Vec::new(),
        },
        data: answer.data,
        link,
    })
}

/// Runs `f`, which may block, on the async task's own thread: on a
/// multi-threaded runtime (the server's) the runtime is told first and
/// hands this worker's other tasks to another thread until `f` returns,
/// so a call held up by a stalled disk holds up no other call, volume or
/// heartbeat of the agent. One hand-off instead of `spawn_blocking`'s two.
fn may_block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Bytes up to which a `Write` or `Read` runs on the async task that
/// received it rather than on the blocking pool (see [`may_block`]).
const SMALL_IO: usize = 64 << 10;

/// A `Write` or `Read` of at most [`SMALL_IO`] bytes: one short request
/// against a copy already open (no fsync, no record change).
fn is_small(c: &Call) -> bool {
    match c.request {
        ProtoRequest::Write { .. } => c.data.len() <= SMALL_IO,
        ProtoRequest::Read { .. } => c.len != 0 && c.len as usize <= SMALL_IO,
        _ => false,
    }
}

/// HTTP/2 flow-control windows of replication channels (both ends): room
/// for a queue of 1 MiB writes in flight without waiting for window
/// updates.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// The largest HTTP/2 frame replication channels take: a 1 MiB write in
/// few frames.
pub const MAX_FRAME: u32 = 1 << 20;

impl ReplicaService {
    /// Refresh: the controller changed a volume's members; the engine
    /// serving it here (if any) learns the voters' addresses (the call's
    /// `request`, JSON of node id -> host:port) and reads the newest
    /// record. Answers `running: false` when no engine runs here.
    async fn refresh_engine(
        &self,
        req: Request<ReplicaCall>,
    ) -> Result<Response<EngineStatusResponse>, Status> {
        controller_only(&req)?;
        let c = req.into_inner();
        let volume = volume_of(&c.volume)?;
        let addresses: BTreeMap<String, String> = serde_json::from_slice(&c.request)
            .map_err(|e| Status::invalid_argument(format!("addresses: {e}")))?;
        let Some(engines) = self.engines.as_ref() else {
            return Ok(Response::new(EngineStatusResponse::default()));
        };
        let running = engines
            .refresh(volume, &addresses)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(EngineStatusResponse {
            running,
            ..Default::default()
        }))
    }
}

/// Reaches the voters of replicated volumes: the local store directly,
/// other nodes' agents over mutual TLS (one lazily connected channel per
/// address), each call bounded by a deadline. Data requests to a node that
/// offered its data link in an `Attach` answer go over that link instead
/// ([`super::link`]); a plaintext link (replication TLS off there) only when
/// this node runs with replication TLS off too.
#[derive(Debug)]
pub struct GrpcPeer {
    local: Option<Arc<ReplicaStore>>,
    addresses: Mutex<BTreeMap<String, String>>,
    channels: Mutex<BTreeMap<String, Channel>>,
    /// Data links to nodes that offered one, by node.
    links: Mutex<BTreeMap<String, Arc<LinkClient>>>,
    tls: ClientTls,
    link_tls: Arc<rustls::ClientConfig>,
    /// This node runs with replication TLS off.
    plaintext: bool,
    deadline: Duration,
}

impl GrpcPeer {
    /// `addresses` maps node ids to their agent's host:port; `tls` and
    /// `link_tls` carry this node's certificate (gRPC, data links), and
    /// only a node's own certificate (or the shared one) may answer for
    /// it on either;
    /// `plaintext` only when this node runs with replication TLS off
    /// (benchmarks).
    pub fn new(
        local: Option<Arc<ReplicaStore>>,
        addresses: BTreeMap<String, String>,
        tls: ClientTls,
        link_tls: Arc<rustls::ClientConfig>,
        plaintext: bool,
        deadline: Duration,
    ) -> Self {
        GrpcPeer {
            local,
            addresses: Mutex::new(addresses),
            channels: Mutex::new(BTreeMap::new()),
            links: Mutex::new(BTreeMap::new()),
            tls,
            link_tls,
            plaintext,
            deadline,
        }
    }

    /// Learns (or changes) a node's address: a changed one forgets the
    /// node's channel and link (they reach the old address).
    pub fn set_address(&self, node: &str, addr: &str) {
        let mut a = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if a.get(node).map(String::as_str) != Some(addr) {
            a.insert(node.to_owned(), addr.to_owned());
            self.channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(node);
            self.forget_link(node);
        }
    }

    /// Sends `node`'s data requests over gRPC again, until its next
    /// `Attach` answer offers the link anew.
    fn forget_link(&self, node: &str) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(node);
    }

    fn link(&self, node: &str) -> Option<Arc<LinkClient>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// A channel to `node`'s agent at `endpoint`.
    fn channel(&self, node: &str, endpoint: Endpoint) -> Channel {
        endpoint
            .connect_timeout(self.deadline)
            .timeout(self.deadline)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(self.deadline)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .tcp_nodelay(true)
            .connect_with_connector_lazy(self.tls.connector(ServerRole::Node(node.to_owned())))
    }

    /// The client for `node`'s Replica service.
    pub fn client(&self, node: &str) -> Result<ReplicaClient<Channel>, PeerError> {
        let unreachable = |why: String| PeerError::Unreachable {
            node: node.to_owned(),
            why,
        };
        let mut ch = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match ch.get(node) {
            Some(c) => c.clone(),
            None => {
                let addr = self
                    .addresses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(node)
                    .cloned()
                    .ok_or_else(|| unreachable("no address known".to_owned()))?;
                let endpoint = super::tls::endpoint(&addr)
                    .map_err(|e| unreachable(format!("address {addr:?}: {e}")))?;
                let c = self.channel(node, endpoint);
                ch.insert(node.to_owned(), c.clone());
                c
            }
        };
        Ok(ReplicaClient::new(channel)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20))
    }

    /// Remembers the data link a node offered in an `Attach` answer
    /// (`tls://host:port`, or `tcp://host:port` taken only when this node
    /// runs with replication TLS off too).
    fn offered(&self, node: &str, link: &str) {
        let (tls, addr) = if let Some(a) = link.strip_prefix("tls://") {
            (Some(Arc::clone(&self.link_tls)), a)
        } else if let Some(a) = link.strip_prefix("tcp://") {
            if !self.plaintext {
                return;
            }
            (None, a)
        } else {
            if !link.is_empty() {
                tracing::warn!(node, link, "ignoring a data link address of unknown form");
            }
            return;
        };
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links
            .get(node)
            .is_some_and(|l| l.addr() == addr && l.tls() == tls.is_some())
        {
            return;
        }
        if tls.is_none() {
            tracing::info!(
                node,
                address = addr,
                "replication data to this node in plaintext"
            );
        }
        links.insert(
            node.to_owned(),
            Arc::new(LinkClient::new(node, addr, tls, self.deadline)),
        );
    }

    /// Data calls to `node` over its link: `None` when it offered none.
    /// A link that failed is forgotten (gRPC until the next attach).
    async fn over_link(
        &self,
        node: &str,
        volume: Uuid,
        calls: &[Call],
    ) -> Option<Vec<Result<Answer, PeerError>>> {
        if calls.iter().any(|c| !c.request.is_data()) {
            return None;
        }
        let link = self.link(node)?;
        let results = link.calls(volume, calls).await;
        if results
            .iter()
            .any(|r| matches!(r, Err(PeerError::Unreachable { .. })))
        {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            if links.get(node).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                links.remove(node);
            }
        }
        Some(results)
    }

    fn status_error(node: &str, s: &Status) -> PeerError {
        super::link::status_error(node, s.code(), s.message().to_owned())
    }
}

#[tonic::async_trait]
impl Peer for GrpcPeer {
    fn is_here(&self, node: &str) -> bool {
        self.local.as_ref().is_some_and(|l| l.node() == node)
    }

    fn learn(&self, addresses: &BTreeMap<String, String>) {
        for (node, addr) in addresses {
            self.set_address(node, addr);
        }
    }

    fn send_now(
        &self,
        node: &str,
        volume: Uuid,
        calls: Vec<Call>,
        done: BatchDone,
    ) -> Result<(), (Vec<Call>, BatchDone)> {
        if self.is_here(node) || calls.iter().any(|c| !c.request.is_data()) {
            return Err((calls, done));
        }
        let Some(link) = self.link(node) else {
            return Err((calls, done));
        };
        link.send_now(volume, &calls, done).map_err(|d| (calls, d))
    }

    fn call_here(&self, node: &str, volume: Uuid, call: Call) -> Option<Result<Answer, PeerError>> {
        let local = self.local.as_ref().filter(|l| l.node() == node)?;
        Some(local.call(volume, call).map_err(|e| local_error(node, e)))
    }

    async fn call_batch(
        &self,
        node: &str,
        volume: Uuid,
        calls: Vec<Call>,
    ) -> Vec<Result<Answer, PeerError>> {
        let n = calls.len();
        if self.is_here(node) || calls.iter().any(|c| !c.request.is_data()) {
            return one_by_one(self, node, volume, calls).await;
        }
        if let Some(results) = self.over_link(node, volume, &calls).await {
            return results;
        }
        let fail_all = |e: PeerError| vec![Err(e); n];
        let mut client = match self.client(node) {
            Ok(c) => c,
            Err(e) => return fail_all(e),
        };
        let mut msgs = Vec::with_capacity(n);
        for c in calls {
            let request = match serde_json::to_vec(&c.request) {
                Ok(r) => r,
                Err(e) => {
                    return fail_all(PeerError::Failed {
                        node: node.to_owned(),
                        why: e.to_string(),
                    });
                }
            };
            msgs.push(ReplicaCall {
                volume: String::new(),
                request,
                offset: c.offset,
                len: c.len,
                data: c.data.bytes(),
            });
        }
        let results = match client
            .call_batch(ReplicaBatch {
                volume: volume.to_string(),
                calls: msgs,
            })
            .await
        {
            Ok(r) => r.into_inner().results,
            Err(s) => return fail_all(Self::status_error(node, &s)),
        };
        results
            .into_iter()
            .map(|r| match r.answer {
                Some(a) if r.code == 0 => Ok(Answer {
                    reply: reply_of(node, &a)?,
                    data: a.data,
                }),
                _ => Err(Self::status_error(
                    node,
                    &Status::new(tonic::Code::from(r.code as i32), r.error),
                )),
            })
            .collect()
    }

    async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError> {
        if let Some(local) = self.local.as_ref().filter(|l| l.node() == node) {
            let local = Arc::clone(local);
            return tokio::task::spawn_blocking(move || local.call(volume, call))
                .await
                .map_err(|e| PeerError::Failed {
                    node: node.to_owned(),
                    why: e.to_string(),
                })?
                .map_err(|e| local_error(node, e));
        }
        if let Some(results) = self
            .over_link(node, volume, std::slice::from_ref(&call))
            .await
        {
            return results.into_iter().next().expect("one call, one result");
        }
        let mut client = self.client(node)?;
        let request = serde_json::to_vec(&call.request).map_err(|e| PeerError::Failed {
            node: node.to_owned(),
            why: e.to_string(),
        })?;
        let answer = match client
            .call(ReplicaCall {
                volume: volume.to_string(),
                request,
                offset: call.offset,
                len: call.len,
                data: call.data.bytes(),
            })
            .await
        {
            Ok(a) => a.into_inner(),
            Err(s) => return Err(Self::status_error(node, &s)),
        };
        let reply = reply_of(node, &answer)?;
        if matches!(reply, Some(Reply::Attached { .. })) {
            self.offered(node, &answer.link);
        }
        Ok(Answer {
            reply,
            data: answer.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`may_block`] runs does not hold up the other tasks of its
    /// worker: with one worker, a task blocked in it until another task
    /// runs is released (run plainly on the worker, it would wait for
    /// ever: here until the bound).
    #[test]
    fn a_call_that_blocks_leaves_its_workers_other_tasks_running() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let released = rt.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel();
            let (inside, entered) = std::sync::mpsc::channel();
            let blocked = tokio::spawn(async move {
                may_block(|| {
                    let _ = inside.send(());
                    rx.recv_timeout(std::time::Duration::from_secs(10))
                })
            });
            // Only once the worker is in it (this thread is not a worker).
            entered.recv().unwrap();
            tokio::spawn(async move {
                let _ = tx.send("ran");
            });
            blocked.await.unwrap()
        });
        assert_eq!(released, Ok("ran"));
    }

    /// A peer that learns the addresses of voters that joined (the engine's
    /// Refresh) keeps its links to the others, and with them the calls in
    /// flight on them; a node whose address changed is reached anew.
    #[tokio::test]
    async fn learning_new_voters_keeps_the_links_to_the_others() {
        let dir = tempfile::tempdir().unwrap();
        crate::cluster::tls::init(dir.path()).unwrap();
        let tls = crate::cluster::tls::TlsMaterial::load(dir.path()).unwrap();
        let peer = GrpcPeer::new(
            None,
            BTreeMap::from([
                ("n1".to_owned(), "127.0.0.1:7001".to_owned()),
                ("n2".to_owned(), "127.0.0.1:7002".to_owned()),
            ]),
            tls.client_tls().unwrap(),
            tls.link_client_config().unwrap(),
            false,
            Duration::from_secs(1),
        );
        peer.offered("n1", "tls://127.0.0.1:8001");
        peer.offered("n2", "tls://127.0.0.1:8002");
        let (n1, n2) = (peer.link("n1").unwrap(), peer.link("n2").unwrap());
        peer.learn(&BTreeMap::from([
            ("n1".to_owned(), "127.0.0.1:7001".to_owned()),
            ("n3".to_owned(), "127.0.0.1:7003".to_owned()),
        ]));
        assert!(
            Arc::ptr_eq(&peer.link("n1").unwrap(), &n1),
            "n1's link was replaced"
        );
        assert!(
            Arc::ptr_eq(&peer.link("n2").unwrap(), &n2),
            "n2's link was replaced"
        );
        assert!(peer.client("n3").is_ok(), "n3's address was not learnt");
        peer.learn(&BTreeMap::from([(
            "n2".to_owned(),
            "127.0.0.1:7102".to_owned(),
        )]));
        assert!(peer.link("n2").is_none(), "n2 moved: its old link was kept");
        assert!(Arc::ptr_eq(&peer.link("n1").unwrap(), &n1));
    }

    /// An engine's channel to a copy is answered only by that copy's node
    /// (or the shared certificate): node n9's certificate answering at
    /// n1's address is UNAVAILABLE, naming both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_is_reached_only_through_its_own_node_or_the_shared_certificate() {
        use crate::cluster::tls::test_servers::{EmptyServer, TestCa};
        let ca = TestCa::new();
        let n9 = EmptyServer::start(&ca.material(Some("n9"))).await;
        let n1 = EmptyServer::start(&ca.material(Some("n1"))).await;
        let shared = EmptyServer::start(&ca.material(None)).await;
        let engine = ca.material(Some("n2"));
        let list = |addr: &str| {
            let peer = GrpcPeer::new(
                None,
                BTreeMap::from([("n1".to_owned(), addr.to_owned())]),
                engine.client_tls().unwrap(),
                engine.link_client_config().unwrap(),
                false,
                Duration::from_secs(5),
            );
            async move {
                let mut client = peer.client("n1").unwrap();
                client
                    .list(ListReplicasRequest::default())
                    .await
                    .unwrap_err()
            }
        };
        let got = list(&n9.addr).await;
        assert_eq!(got.code(), tonic::Code::Unavailable, "{got:?}");
        assert!(
            got.message()
                .contains("presented the certificate of node n9")
                && got.message().contains("may answer as node n1"),
            "{got:?}"
        );
        for reached in [&n1.addr, &shared.addr] {
            let got = list(reached).await;
            assert_eq!(got.code(), tonic::Code::Unimplemented, "{got:?}");
        }
    }

    /// On a runtime of one thread there is nowhere to hand tasks to: `f`
    /// simply runs (`block_in_place` would panic there).
    #[tokio::test]
    async fn on_a_single_threaded_runtime_it_just_runs() {
        assert_eq!(may_block(|| 7), 7);
    }
}
