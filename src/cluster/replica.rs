//! The `Replica` service on a node's agent port (its copies and witness
//! records of replicated volumes, [`ReplicaStore`]) and [`GrpcPeer`], the
//! transport engines and the controller reach voters with: mutual TLS to
//! other nodes' agents, a direct call into the store for the caller's own
//! node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::volume::id::Uuid;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use super::proto::replica_client::ReplicaClient;
use super::proto::replica_server::Replica;
use super::proto::{
    CopyStatus, CreateReplicaRequest, CreateReplicaResponse, DeleteReplicaRequest,
    DeleteReplicaResponse, EngineStatusResponse, GetReplicaRequest, GetReplicaResponse,
    ListReplicasRequest, ListReplicasResponse, ReplicaAnswer, ReplicaCall,
};
use super::tls::{PeerIdentity, peer_identity};
use crate::backend::replicated::protocol::{Reply, Request as ProtoRequest};
use crate::backend::replicated::record::ReplicaRecord;
use crate::backend::replicated::store::{ReplicaStore, StoreError};
use crate::backend::replicated::wire::{Answer, Call, Peer, PeerError};

fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::Conflict { .. } => Status::already_exists(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::Io { .. } => Status::internal(e.to_string()),
    }
}

#[allow(clippy::result_large_err)]
fn volume_of(raw: &str) -> Result<Uuid, Status> {
    Uuid::parse_hex(raw).ok_or_else(|| Status::invalid_argument(format!("invalid volume {raw:?}")))
}

/// Serves the node's [`ReplicaStore`].
#[derive(Debug)]
pub struct ReplicaService {
    store: Arc<ReplicaStore>,
    engines: Option<Arc<crate::backend::replicated::engines::Engines>>,
}

impl ReplicaService {
    /// Serves `store`, and the status of this node's `engines`.
    pub fn new(
        store: Arc<ReplicaStore>,
        engines: Option<Arc<crate::backend::replicated::engines::Engines>>,
    ) -> Self {
        ReplicaService { store, engines }
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

    /// A node certificate may act on a volume only when the record this
    /// node holds names it (a member or the owner).
    async fn allowed<T>(&self, req: &Request<T>, volume: Uuid) -> Result<(), Status> {
        match peer_identity(req) {
            Some(PeerIdentity::Cluster) => Ok(()),
            Some(PeerIdentity::Node(n)) => {
                let held = self.blocking(move |s| s.get(volume)).await?;
                let named = held.is_some_and(|h| {
                    let r = &h.state.record;
                    r.members.iter().any(|m| m.node == n)
                        || r.owner.as_ref().is_some_and(|o| o.node == n)
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
        let record: ReplicaRecord = serde_json::from_str(&req.into_inner().record)
            .map_err(|e| Status::invalid_argument(format!("record: {e}")))?;
        self.blocking(move |s| s.create(&record)).await?;
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
            None => GetReplicaResponse {
                found: false,
                state: String::new(),
            },
            Some(h) => GetReplicaResponse {
                found: true,
                state: serde_json::to_string(&h.state)
                    .map_err(|e| Status::internal(e.to_string()))?,
            },
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
        let Some(st) = self.engines.as_ref().and_then(|e| e.status(volume)) else {
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
                })
                .collect(),
            rebuild_bytes: st.rebuild_bytes,
        }))
    }

    async fn refresh(
        &self,
        req: Request<ReplicaCall>,
    ) -> Result<Response<EngineStatusResponse>, Status> {
        self.refresh_engine(req).await
    }

    async fn call(&self, req: Request<ReplicaCall>) -> Result<Response<ReplicaAnswer>, Status> {
        let volume = volume_of(&req.get_ref().volume)?;
        self.allowed(&req, volume).await?;
        let c = req.into_inner();
        let request: ProtoRequest = serde_json::from_slice(&c.request)
            .map_err(|e| Status::invalid_argument(format!("request: {e}")))?;
        let call = Call {
            request,
            offset: c.offset,
            len: c.len,
            data: Arc::new(c.data),
        };
        let answer = self.blocking(move |s| s.call(volume, call)).await?;
        Ok(Response::new(ReplicaAnswer {
            reply: match &answer.reply {
                Some(r) => serde_json::to_vec(r).map_err(|e| Status::internal(e.to_string()))?,
                None => Vec::new(),
            },
            data: answer.data,
        }))
    }
}

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
/// address), each call bounded by a deadline.
#[derive(Debug)]
pub struct GrpcPeer {
    local: Option<Arc<ReplicaStore>>,
    addresses: Mutex<BTreeMap<String, String>>,
    channels: Mutex<BTreeMap<String, Channel>>,
    tls: Option<ClientTlsConfig>,
    deadline: Duration,
}

impl GrpcPeer {
    /// `addresses` maps node ids to their agent's host:port; `tls` is
    /// `None` only when replication TLS is turned off (benchmarks).
    pub fn new(
        local: Option<Arc<ReplicaStore>>,
        addresses: BTreeMap<String, String>,
        tls: Option<ClientTlsConfig>,
        deadline: Duration,
    ) -> Self {
        GrpcPeer {
            local,
            addresses: Mutex::new(addresses),
            channels: Mutex::new(BTreeMap::new()),
            tls,
            deadline,
        }
    }

    /// Learns (or changes) a node's address.
    pub fn set_address(&self, node: &str, addr: &str) {
        let mut a = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if a.get(node).map(String::as_str) != Some(addr) {
            a.insert(node.to_owned(), addr.to_owned());
            self.channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(node);
        }
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
                let endpoint = match &self.tls {
                    Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
                        .and_then(|e| e.tls_config(tls.clone())),
                    None => Endpoint::from_shared(format!("http://{addr}")),
                }
                .map_err(|e| unreachable(format!("address {addr:?}: {e}")))?;
                let c = endpoint
                    .connect_timeout(self.deadline)
                    .timeout(self.deadline)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(self.deadline)
                    .tcp_nodelay(true)
                    .connect_lazy();
                ch.insert(node.to_owned(), c.clone());
                c
            }
        };
        Ok(ReplicaClient::new(channel)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20))
    }

    fn status_error(node: &str, s: &Status) -> PeerError {
        use tonic::Code;
        let why = format!("{:?}: {}", s.code(), s.message());
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                PeerError::Unreachable {
                    node: node.to_owned(),
                    why,
                }
            }
            _ => PeerError::Failed {
                node: node.to_owned(),
                why,
            },
        }
    }
}

#[tonic::async_trait]
impl Peer for GrpcPeer {
    async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError> {
        if let Some(local) = self.local.as_ref().filter(|l| l.node() == node) {
            let local = Arc::clone(local);
            return tokio::task::spawn_blocking(move || local.call(volume, call))
                .await
                .map_err(|e| PeerError::Failed {
                    node: node.to_owned(),
                    why: e.to_string(),
                })?
                .map_err(|e| PeerError::Failed {
                    node: node.to_owned(),
                    why: e.to_string(),
                });
        }
        let mut client = self.client(node)?;
        let request = serde_json::to_vec(&call.request).map_err(|e| PeerError::Failed {
            node: node.to_owned(),
            why: e.to_string(),
        })?;
        let answer = client
            .call(ReplicaCall {
                volume: volume.to_string(),
                request,
                offset: call.offset,
                len: call.len,
                data: call.data.as_ref().clone(),
            })
            .await
            .map_err(|s| Self::status_error(node, &s))?
            .into_inner();
        let reply: Option<Reply> = if answer.reply.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&answer.reply).map_err(|e| PeerError::Failed {
                    node: node.to_owned(),
                    why: format!("reply: {e}"),
                })?,
            )
        };
        Ok(Answer {
            reply,
            data: answer.data,
        })
    }
}
