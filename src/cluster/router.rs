//! `serve --mode controller`: the CSI Controller, GroupController and
//! SnapshotMetadata services of a cluster, answered by routing each call
//! to the node agent that owns the volume or snapshot (IDs carry the
//! node), placing new volumes by topology or free space, and fanning lists
//! out over every registered node. Its only state is the [`Registry`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::names::NameIndex;
use super::proto;
use super::registry::{NodeEntry, Registry};
use super::replicated;
use super::tls::{PeerIdentity, peer_identity};
use crate::csi;
use crate::csi::controller_client::ControllerClient;
use crate::csi::group_controller_client::GroupControllerClient;
use crate::csi::snapshot_metadata_client::SnapshotMetadataClient;
use crate::volume::TOPOLOGY_NODE_KEY;
use crate::volume::id::{SnapshotId, VolumeId};

use crate::server::snapshot_metadata::Stream;

/// The routing controller.
#[derive(Debug, Clone)]
pub struct Router {
    pub registry: Arc<Registry>,
    pub name: String,
    pub names: Arc<NameIndex>,
    /// CreateVolume names being placed now: a concurrent CreateVolume of
    /// the same name is ABORTED (it could otherwise be placed elsewhere).
    creating: crate::volume::inflight::InFlight,
    /// Replicated volumes, which no single node routes.
    replicated: super::replicated::Replicated,
}

/// INVALID_ARGUMENT for a negative `max_entries`, whichever part of a
/// list its token points into.
#[allow(clippy::result_large_err)]
fn non_negative_max(max_entries: i32) -> Result<(), Status> {
    if max_entries < 0 {
        return Err(Status::invalid_argument(
            "max_entries: must not be negative",
        ));
    }
    Ok(())
}

/// One page of replicated snapshots from a `~replicated/<index>` token
/// (empty: from the start), and the token of the rest.
#[allow(clippy::result_large_err)]
fn replicated_snapshot_page(
    all: Vec<csi::Snapshot>,
    token: &str,
    max: i32,
) -> Result<(Vec<csi::list_snapshots_response::Entry>, String), Status> {
    let from: usize = if token.is_empty() {
        0
    } else {
        token
            .strip_prefix(REPLICATED_TOKEN)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Status::aborted(format!("invalid starting_token {token:?}")))?
    };
    if from > all.len() {
        return Err(Status::aborted(format!(
            "starting_token {token} is beyond the list"
        )));
    }
    let end = if max <= 0 {
        all.len()
    } else {
        (from + max as usize).min(all.len())
    };
    let next = if end < all.len() {
        format!("{REPLICATED_TOKEN}{end}")
    } else {
        String::new()
    };
    let entries = all
        .into_iter()
        .skip(from)
        .take(end - from)
        .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) })
        .collect();
    Ok((entries, next))
}

/// ListVolumes tokens past the nodes' volumes: `~replicated/<index>` (no node id
/// starts with `~`).
const REPLICATED_TOKEN: &str = "~replicated/";

/// Where a call goes.
enum Route {
    Node(Box<NodeEntry>),
    /// The ID names a node that an operator forgot: deletes succeed.
    Forgotten,
}

/// The node of a group snapshot ID (`group:<node>:<uuid>`).
fn group_node(raw: &str) -> Option<String> {
    let rest = raw.strip_prefix("group:")?;
    let (node, uuid) = rest.split_once(':')?;
    (crate::volume::id::valid_node_id(node) && crate::volume::id::Uuid::parse_hex(uuid).is_some())
        .then(|| node.to_owned())
}

/// The longest a call waits for the controller's round of repairs to be
/// done with its volume: a round's look at one volume asks every node (each
/// at most 5 s) and may change its members (a few exchanges with a
/// majority), which is seconds even with a node not answering.
const ROUND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The in-flight key of a replicated volume's operations.
fn volume_key(raw: &str) -> String {
    format!("\0volume\0{raw}")
}

fn node_of_topology(t: &csi::Topology) -> Option<&str> {
    t.segments.get(TOPOLOGY_NODE_KEY).map(String::as_str)
}

impl Router {
    pub fn new(registry: Arc<Registry>, name: String) -> Self {
        Self {
            name,
            names: Arc::new(NameIndex::default()),
            creating: Default::default(),
            replicated: super::replicated::Replicated::new(Arc::clone(&registry)),
            registry,
        }
    }

    /// What `/metrics` says of the replicated volumes' conditions.
    pub fn replicated_health(&self) -> super::replicated::VolumeHealth {
        self.replicated.health()
    }

    /// One round of replacing lost members (`--replica-replace-after`):
    /// every replicated volume whose members include a node not heard from
    /// for `after` gets a member elsewhere instead; and members removed
    /// while their node was away are deleted from it once it is back. A
    /// volume with an operation in progress is skipped until the next
    /// round; errors are logged and retried then. With `heal`, a volume
    /// nobody publishes with a copy out of sync is healed in the
    /// background (see `Replicated::replace_lost`).
    pub async fn replace_lost_members(
        &self,
        after: std::time::Duration,
        heal: Option<replicated::HealIdle>,
    ) {
        // A node that does not answer (registering, its agent hung) holds
        // up no repair of the volumes the others hold; but what a round
        // concludes from the whole list waits for a round that has it.
        let (volumes, unreached) = self.replicated.list_reached().await;
        let whole = unreached.is_empty();
        if whole {
            self.replicated.forget_all_but(&volumes);
        } else {
            let why: Vec<String> = unreached
                .iter()
                .map(|(node, why)| format!("node {node} {why}"))
                .collect();
            tracing::warn!(unreached = %why.join("; "), "the round of repairs looks only at the volumes of the nodes that listed theirs");
        }
        let drains = self.replicated.drains();
        let round = drains.round_begins();
        let draining = self.registry.draining();
        for uuid in &volumes {
            let raw = replicated::volume_id(*uuid);
            // Never a volume a call is at: the next round looks again.
            let Some(_guard) = self.creating.try_acquire_background(volume_key(&raw)) else {
                continue;
            };
            tracing::debug!(volume = %raw, "the round of repairs looks at the volume");
            if let Err(e) = self
                .replicated
                .replace_lost(*uuid, after, heal, &unreached)
                .await
            {
                tracing::warn!(volume = %raw, error = %e.message(), "lost or removed members not dealt with yet");
            }
        }
        if whole {
            drains.round_ended(round, &volumes, &draining);
        }
    }

    /// The replicated volumes' operations (to wake their round of repairs
    /// from elsewhere, see [`RegistryService`]).
    pub fn replicated(&self) -> super::replicated::Replicated {
        self.replicated.clone()
    }

    /// Resolves once a round of [`Router::replace_lost_members`] was asked
    /// for before its period ([`replicated::Replicated::wake_round`]).
    pub async fn round_wanted(&self) {
        self.replicated.round_wanted().await;
    }

    /// Up to `max` (0: all) replicated volumes from index `from`, and the
    /// token of the rest.
    async fn replicated_page(
        &self,
        from: usize,
        max: i32,
    ) -> Result<(Vec<csi::list_volumes_response::Entry>, String), Status> {
        let all = self.replicated.list().await?;
        if from > all.len() {
            return Err(Status::aborted(format!(
                "starting_token {REPLICATED_TOKEN}{from} is beyond the list"
            )));
        }
        let end = if max == 0 {
            all.len()
        } else {
            (from + max as usize).min(all.len())
        };
        let mut out = Vec::new();
        for u in &all[from..end] {
            if let Some(e) = self.replicated.list_entry(*u).await? {
                out.push(e);
            }
        }
        let next = if end < all.len() {
            format!("{REPLICATED_TOKEN}{end}")
        } else {
            String::new()
        };
        Ok((out, next))
    }

    /// One operation at a time per replicated volume: a concurrent call is
    /// ABORTED. The round of repairs looking at the volume is no call of
    /// the CO's: the call waits for it (at most [`ROUND_WAIT`]).
    async fn volume_guard(
        &self,
        raw: &str,
    ) -> Result<crate::volume::inflight::InFlightGuard, Status> {
        use crate::volume::inflight::Held;
        let (guard, waited) = self
            .creating
            .acquire_after_background(volume_key(raw), ROUND_WAIT)
            .await
            .map_err(|held| match held {
                Held::ByCall => {
                    Status::aborted(format!("an operation on volume {raw} is in progress"))
                }
                Held::ByBackground => Status::aborted(format!(
                    "the controller's round of repairs has held volume {raw} for over {} s",
                    ROUND_WAIT.as_secs()
                )),
            })?;
        if !waited.is_zero() {
            tracing::debug!(volume = %raw, waited_ms = waited.as_millis() as u64, "a call waited for the round of repairs to be done with its volume");
        }
        Ok(guard)
    }

    /// The node holding a volume of this CSI name: from the name index
    /// when every fresh node's names are loaded, else by asking every
    /// fresh node.
    async fn lookup_name(&self, name: &str) -> Result<Option<NodeEntry>, Status> {
        let fresh = self.registry.fresh();
        if fresh.iter().all(|n| self.names.is_loaded(&n.id)) {
            return match self.names.node_of(name) {
                None => Ok(None),
                Some(node) => match self.route(&node)? {
                    Route::Node(n) => Ok(Some(*n)),
                    Route::Forgotten => Ok(None),
                },
            };
        }
        self.find_by_name(name).await
    }

    /// The route to `node`: UNAVAILABLE (retryable) when it is not
    /// registered or has stopped registering.
    fn route(&self, node: &str) -> Result<Route, Status> {
        if self.registry.is_forgotten(node) {
            return Ok(Route::Forgotten);
        }
        match self.registry.get(node) {
            Some(n) if n.fresh(Instant::now()) => Ok(Route::Node(Box::new(n))),
            Some(n) => Err(Status::unavailable(format!(
                "node {node} has not registered for {} s",
                n.last_seen.elapsed().as_secs()
            ))),
            None => Err(Status::unavailable(format!(
                "node {node} is not registered with this controller (yet)"
            ))),
        }
    }

    /// The node for an ID that names none (malformed): any fresh node
    /// answers it exactly as it would answer a single-node server.
    fn any_node(&self) -> Result<NodeEntry, Status> {
        self.registry
            .fresh()
            .into_iter()
            .next()
            .ok_or_else(|| Status::unavailable("no node is registered with this controller"))
    }

    fn node_for(&self, node: Option<String>) -> Result<Route, Status> {
        match node {
            Some(n) => self.route(&n),
            None => self.any_node().map(|n| Route::Node(Box::new(n))),
        }
    }

    fn volume_route(&self, raw: &str) -> Result<Route, Status> {
        self.node_for(VolumeId::parse(raw).map(|v| v.node))
    }

    fn snapshot_route(&self, raw: &str) -> Result<Route, Status> {
        self.node_for(SnapshotId::parse(raw).map(|s| s.node))
    }

    /// Like [`Router::volume_route`], for calls that must reach the node.
    fn volume_node(&self, raw: &str) -> Result<NodeEntry, Status> {
        match self.volume_route(raw)? {
            Route::Node(n) => Ok(*n),
            Route::Forgotten => Err(Status::not_found(format!(
                "volume {raw} lived on a node that was forgotten"
            ))),
        }
    }

    fn snapshot_node(&self, raw: &str) -> Result<NodeEntry, Status> {
        match self.snapshot_route(raw)? {
            Route::Node(n) => Ok(*n),
            Route::Forgotten => Err(Status::not_found(format!(
                "snapshot {raw} lived on a node that was forgotten"
            ))),
        }
    }

    /// The node holding a volume of this CSI name, asking every fresh node
    /// (a retried CreateVolume must find the volume wherever it was made).
    /// A fresh node that does not answer makes the answer unknown:
    /// UNAVAILABLE.
    async fn find_by_name(&self, name: &str) -> Result<Option<NodeEntry>, Status> {
        let nodes = self.registry.fresh();
        let asks = nodes.iter().map(|n| {
            let mut c = proto::agent_client::AgentClient::new(n.channel.clone());
            let req = proto::FindVolumeRequest {
                name: name.to_owned(),
            };
            async move { c.find_volume(req).await }
        });
        let answers = futures_join_all(asks).await;
        for (n, a) in nodes.into_iter().zip(answers) {
            match a {
                Ok(r) if !r.get_ref().volume_id.is_empty() => return Ok(Some(n)),
                Ok(_) => {}
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "cannot ask node {} whether it holds volume {name:?}: {}",
                        n.id,
                        e.message()
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Where a new volume without a source goes: the node the `node`
    /// parameter pins, else the first eligible node the topology names
    /// (preferred first), else the node with the most free space.
    fn place(&self, r: &csi::CreateVolumeRequest) -> Result<NodeEntry, Status> {
        let now = Instant::now();
        let eligible = |n: &NodeEntry| n.fresh(now) && !n.cordoned;
        if let Some(pinned) = r.parameters.get("node") {
            let n = match self.route(pinned)? {
                Route::Node(n) => *n,
                Route::Forgotten => {
                    return Err(Status::invalid_argument(format!(
                        "parameters: node={pinned:?} was forgotten"
                    )));
                }
            };
            if n.cordoned {
                return Err(Status::resource_exhausted(format!(
                    "node {pinned} (parameter node) is cordoned"
                )));
            }
            return Ok(n);
        }
        let wanted: Vec<&str> = r
            .accessibility_requirements
            .iter()
            .flat_map(|a| a.preferred.iter().chain(a.requisite.iter()))
            .filter_map(node_of_topology)
            .collect();
        if !wanted.is_empty() {
            let mut seen = BTreeSet::new();
            for id in wanted.iter().filter(|id| seen.insert(**id)) {
                if let Some(n) = self.registry.get(id).filter(eligible) {
                    return Ok(n);
                }
            }
            return Err(Status::resource_exhausted(format!(
                "no registered, uncordoned node among the topology's nodes {:?}",
                seen
            )));
        }
        // Remote storage (object volumes) takes no room in a node's pool:
        // the node only records it, and any node will do.
        let remote =
            crate::volume::params::Parameters::parse(&crate::server::convert::map(&r.parameters))
                .is_ok_and(|p| !p.backend.profile().node_local());
        let need = r
            .capacity_range
            .as_ref()
            .filter(|_| !remote)
            .map_or(0, |c| c.required_bytes.max(0) as u64);
        let all = self.registry.all();
        let mut fits: Vec<NodeEntry> = all
            .iter()
            .filter(|n| eligible(n) && n.free_bytes >= need)
            .cloned()
            .collect();
        fits.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then(a.id.cmp(&b.id)));
        fits.into_iter().next().ok_or_else(|| {
            Status::resource_exhausted(format!(
                "no node can hold {need} bytes: {} registered, {} fresh and uncordoned, largest free {} bytes",
                all.len(),
                all.iter().filter(|n| eligible(n)).count(),
                all.iter()
                    .filter(|n| eligible(n))
                    .map(|n| n.free_bytes)
                    .max()
                    .unwrap_or(0)
            ))
        })
    }

    /// Pages over every registered node in id order. A token is
    /// `<node>/<that node's token>`; a node that does not answer (or no
    /// longer registers) makes the list UNAVAILABLE rather than partial.
    async fn paged<T, F, Fut>(
        &self,
        max_entries: i32,
        token: &str,
        fetch: F,
    ) -> Result<(Vec<T>, String), Status>
    where
        F: Fn(NodeEntry, i32, String) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<T>, String), Status>>,
    {
        non_negative_max(max_entries)?;
        let nodes = self.registry.all();
        let (mut index, mut inner) = if token.is_empty() {
            (0, String::new())
        } else {
            let (node, inner) = token
                .split_once('/')
                .ok_or_else(|| Status::aborted(format!("invalid starting_token {token:?}")))?;
            let i = nodes.iter().position(|n| n.id == node).ok_or_else(|| {
                Status::aborted(format!(
                    "starting_token {token:?} names node {node}, which is no longer registered"
                ))
            })?;
            (i, inner.to_owned())
        };
        let mut out = Vec::new();
        while index < nodes.len() {
            let n = &nodes[index];
            if !n.fresh(Instant::now()) {
                return Err(Status::unavailable(format!(
                    "node {} has not registered for {} s; the list would be incomplete",
                    n.id,
                    n.last_seen.elapsed().as_secs()
                )));
            }
            let want = if max_entries == 0 {
                0
            } else {
                max_entries - out.len() as i32
            };
            let (entries, next) = fetch(n.clone(), want, std::mem::take(&mut inner)).await?;
            out.extend(entries);
            if !next.is_empty() {
                return Ok((out, format!("{}/{next}", n.id)));
            }
            index += 1;
            if max_entries > 0 && out.len() as i32 >= max_entries {
                return Ok((
                    out,
                    nodes
                        .get(index)
                        .map(|n| format!("{}/", n.id))
                        .unwrap_or_default(),
                ));
            }
        }
        Ok((out, String::new()))
    }
}

/// Runs futures concurrently, answers in order.
async fn futures_join_all<F>(fs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("routing task does not panic"));
    }
    out
}

fn cc(n: &NodeEntry) -> ControllerClient<Channel> {
    ControllerClient::new(n.channel.clone())
}

/// A node's answer, passed on. A status the client library made itself (it
/// carries the transport error as its source: no connection, a reset, a
/// timeout) is UNAVAILABLE naming the node, so the CO retries.
/// INVALID_ARGUMENT unless `volume_id` is a replicated volume's: only
/// those have copies to `verb` (the Admin calls on copies).
#[allow(clippy::result_large_err)]
fn only_replicated(volume_id: &str, verb: &str) -> Result<(), Status> {
    if replicated::is_replicated_id(volume_id) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "volume {volume_id:?} is not a replicated volume: only those have copies to {verb}"
    )))
}

fn relay<T>(node: &NodeEntry, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    r.map(|resp| Response::new(resp.into_inner())).map_err(|s| {
        if s.code() == tonic::Code::Unavailable || std::error::Error::source(&s).is_some() {
            Status::unavailable(format!("node {} did not answer: {}", node.id, s.message()))
        } else {
            s
        }
    })
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Router {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::wants_replicated(&r.parameters) {
            let _guard = self.creating.try_acquire(r.name.clone()).ok_or_else(|| {
                Status::aborted(format!(
                    "a CreateVolume of name {:?} is in progress",
                    r.name
                ))
            })?;
            return self.replicated.create_volume(r).await.map(Response::new);
        }
        let replicated_source = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                replicated::is_replicated_snapshot_id(&s.snapshot_id).then_some(&s.snapshot_id)
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                replicated::is_replicated_id(&v.volume_id).then_some(&v.volume_id)
            }
            None => None,
        };
        if let Some(id) = replicated_source {
            return Err(Status::invalid_argument(format!(
                "volume_content_source: {id} is replicated: a volume made from it must be backend=replicated too"
            )));
        }
        let source_node = match r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                Some(SnapshotId::parse(&s.snapshot_id).map(|s| s.node))
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                Some(VolumeId::parse(&v.volume_id).map(|v| v.node))
            }
            None => None,
        };
        let sourced = source_node.is_some();
        let node = if r.name.is_empty() || r.volume_capabilities.is_empty() {
            // Invalid: any node refuses it as one server would.
            self.any_node()?
        } else {
            match source_node {
                Some(Some(src)) => {
                    let n = match self.route(&src)? {
                        Route::Node(n) => *n,
                        Route::Forgotten => {
                            return Err(Status::not_found(format!(
                                "the source lived on node {src}, which was forgotten"
                            )));
                        }
                    };
                    let requisite: Vec<&str> = r
                        .accessibility_requirements
                        .iter()
                        .flat_map(|a| a.requisite.iter())
                        .filter_map(node_of_topology)
                        .collect();
                    if !requisite.is_empty() && !requisite.contains(&src.as_str()) {
                        return Err(Status::resource_exhausted(format!(
                            "the source lives on node {src}, which the requisite topology does not allow; a restore or clone is made on its source's node"
                        )));
                    }
                    if n.cordoned {
                        return Err(Status::resource_exhausted(format!(
                            "the source lives on node {src}, which is cordoned"
                        )));
                    }
                    n
                }
                Some(None) => self.any_node()?,
                None => {
                    let guard = self.creating.try_acquire(r.name.clone()).ok_or_else(|| {
                        Status::aborted(format!(
                            "a CreateVolume of name {:?} is in progress",
                            r.name
                        ))
                    })?;
                    let node = match self.lookup_name(&r.name).await? {
                        Some(n) => n,
                        None => self.place(&r)?,
                    };
                    let name = r.name.clone();
                    let made = relay(&node, cc(&node).create_volume(r).await)?;
                    if let Some(v) = &made.get_ref().volume {
                        self.names.insert(&name, &node.id, &v.volume_id);
                    }
                    drop(guard);
                    return Ok(made);
                }
            }
        };
        if sourced && let Some(other) = self.names.node_of(&r.name).filter(|o| *o != node.id) {
            return Err(Status::already_exists(format!(
                "volume name {:?} is taken by a volume on node {other}",
                r.name
            )));
        }
        tracing::debug!(name = %r.name, node = %node.id, "CreateVolume routed");
        let name = r.name.clone();
        let made = relay(&node, cc(&node).create_volume(r).await)?;
        if let Some(v) = &made.get_ref().volume {
            self.names.insert(&name, &node.id, &v.volume_id);
        }
        Ok(made)
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            let _guard = self.volume_guard(&r.volume_id).await?;
            self.replicated.delete_volume(&r.volume_id).await?;
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        }
        let id = r.volume_id.clone();
        let done = match self.volume_route(&r.volume_id)? {
            Route::Forgotten => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Route::Node(n) => relay(&n, cc(&n).delete_volume(r).await),
        };
        if done.is_ok() {
            self.names.remove_volume(&id);
        }
        done
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            let _guard = self.volume_guard(&r.volume_id).await?;
            return self.replicated.publish(&r).await.map(Response::new);
        }
        let n = self.volume_node(&r.volume_id)?;
        // The node agent takes the controller's word for the node a volume
        // is published to: a node that never registered does not exist.
        if crate::volume::id::valid_node_id(&r.node_id)
            && self.registry.get(&r.node_id).is_none()
            && VolumeId::parse(&r.volume_id).is_some()
        {
            return Err(Status::not_found(format!(
                "node {} is not registered with this controller",
                r.node_id
            )));
        }
        relay(&n, cc(&n).controller_publish_volume(r).await)
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            let _guard = self.volume_guard(&r.volume_id).await?;
            self.replicated.unpublish(&r).await?;
            return Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}));
        }
        match self.volume_route(&r.volume_id)? {
            Route::Forgotten => Ok(Response::new(csi::ControllerUnpublishVolumeResponse {})),
            Route::Node(n) => relay(&n, cc(&n).controller_unpublish_volume(r).await),
        }
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            return self.replicated.validate(r).await.map(Response::new);
        }
        let n = self.volume_node(&r.volume_id)?;
        relay(&n, cc(&n).validate_volume_capabilities(r).await)
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        non_negative_max(r.max_entries)?;
        // Node-local volumes first (node by node), then the replicated
        // ones (`~replicated/<index>` tokens).
        if let Some(rest) = r.starting_token.strip_prefix(REPLICATED_TOKEN) {
            let from: usize = rest.parse().map_err(|_| {
                Status::aborted(format!("invalid starting_token {:?}", r.starting_token))
            })?;
            let (entries, next_token) = self.replicated_page(from, r.max_entries).await?;
            return Ok(Response::new(csi::ListVolumesResponse {
                entries,
                next_token,
            }));
        }
        let (mut entries, mut next_token) = self
            .paged(
                r.max_entries,
                &r.starting_token,
                |n, max, token| async move {
                    let resp = relay(
                        &n,
                        cc(&n)
                            .list_volumes(csi::ListVolumesRequest {
                                max_entries: max,
                                starting_token: token,
                            })
                            .await,
                    )?
                    .into_inner();
                    Ok((resp.entries, resp.next_token))
                },
            )
            .await?;
        if next_token.is_empty() {
            let room = if r.max_entries == 0 {
                0
            } else {
                r.max_entries - entries.len() as i32
            };
            if r.max_entries == 0 || room > 0 {
                let (more, next) = self.replicated_page(0, room).await?;
                entries.extend(more);
                next_token = next;
            } else if !self.replicated.list().await?.is_empty() {
                next_token = format!("{REPLICATED_TOKEN}0");
            }
        }
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let named = r
            .accessible_topology
            .as_ref()
            .and_then(node_of_topology)
            .or(r.parameters.get("node").map(String::as_str));
        if let Some(node) = named {
            return match self.registry.get(node) {
                None => Ok(Response::new(csi::GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: Some(0),
                    minimum_volume_size: None,
                })),
                Some(_) => match self.route(node)? {
                    Route::Node(n) => relay(&n, cc(&n).get_capacity(r).await),
                    Route::Forgotten => Ok(Response::new(csi::GetCapacityResponse::default())),
                },
            };
        }
        // No node named: the largest free space of any one node that takes
        // new volumes, as the nodes last reported it (at most one
        // registration period old; GetCapacity is an estimate anyway), so
        // the answer costs no round trip to every node. Parameters and
        // capabilities are checked as a node would.
        let caps = r
            .volume_capabilities
            .iter()
            .map(|cap| crate::server::convert::capability("volume_capabilities", Some(cap)))
            .collect::<Result<Vec<_>, _>>()?;
        let params = crate::volume::params::Parameters::parse(&crate::server::convert::map(
            &r.parameters,
        ))
        .map_err(|reason| Status::from(crate::volume::Error::invalid("parameters", reason)))?;
        let now = Instant::now();
        let free = if caps.iter().any(|c| c.supported_by(params.backend).is_err()) {
            0
        } else {
            self.registry
                .all()
                .iter()
                .filter(|n| n.fresh(now) && !n.cordoned)
                .map(|n| n.free_bytes)
                .max()
                .unwrap_or(0)
        };
        let free = i64::try_from(free).unwrap_or(i64::MAX);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: free,
            maximum_volume_size: Some(free),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(crate::server::controller::capabilities()))
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.source_volume_id) {
            let _guard = self.volume_guard(&r.source_volume_id).await?;
            return self.replicated.create_snapshot(&r).await.map(Response::new);
        }
        let n = self.volume_node(&r.source_volume_id)?;
        relay(&n, cc(&n).create_snapshot(r).await)
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_snapshot_id(&r.snapshot_id) {
            self.replicated.delete_snapshot(&r.snapshot_id).await?;
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        }
        match self.snapshot_route(&r.snapshot_id)? {
            Route::Forgotten => Ok(Response::new(csi::DeleteSnapshotResponse {})),
            Route::Node(n) => relay(&n, cc(&n).delete_snapshot(r).await),
        }
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        non_negative_max(r.max_entries)?;
        // Replicated snapshots: after the nodes' ones (`~replicated/<n>`
        // tokens), or alone when filtered by one of them or its source.
        if replicated::is_replicated_snapshot_id(&r.snapshot_id)
            || (r.snapshot_id.is_empty() && replicated::is_replicated_id(&r.source_volume_id))
        {
            let all = self
                .replicated
                .list_snapshots(&r.snapshot_id, &r.source_volume_id)
                .await?;
            let (entries, next_token) =
                replicated_snapshot_page(all, &r.starting_token, r.max_entries)?;
            return Ok(Response::new(csi::ListSnapshotsResponse {
                entries,
                next_token,
            }));
        }
        if r.starting_token.starts_with(REPLICATED_TOKEN) {
            let all = self.replicated.list_snapshots("", "").await?;
            let (entries, next_token) =
                replicated_snapshot_page(all, &r.starting_token, r.max_entries)?;
            return Ok(Response::new(csi::ListSnapshotsResponse {
                entries,
                next_token,
            }));
        }
        // Filtered by one snapshot or one source: that object's node.
        let single = if !r.snapshot_id.is_empty() {
            Some(self.snapshot_route(&r.snapshot_id)?)
        } else if !r.source_volume_id.is_empty() {
            Some(self.volume_route(&r.source_volume_id)?)
        } else {
            None
        };
        match single {
            Some(Route::Forgotten) => Ok(Response::new(csi::ListSnapshotsResponse::default())),
            Some(Route::Node(n)) => relay(&n, cc(&n).list_snapshots(r).await),
            None => {
                let (mut entries, mut next_token) = self
                    .paged(r.max_entries, &r.starting_token, |n, max, token| {
                        let mut r = r.clone();
                        async move {
                            r.max_entries = max;
                            r.starting_token = token;
                            let resp = relay(&n, cc(&n).list_snapshots(r).await)?.into_inner();
                            Ok((resp.entries, resp.next_token))
                        }
                    })
                    .await?;
                if next_token.is_empty() {
                    let all = self.replicated.list_snapshots("", "").await?;
                    if r.max_entries == 0 || (entries.len() as i32) < r.max_entries {
                        let room = if r.max_entries == 0 {
                            0
                        } else {
                            r.max_entries - entries.len() as i32
                        };
                        let start = format!("{REPLICATED_TOKEN}0");
                        let (more, next) = replicated_snapshot_page(all, &start, room)?;
                        entries.extend(more);
                        next_token = next;
                    } else if !all.is_empty() {
                        next_token = format!("{REPLICATED_TOKEN}0");
                    }
                }
                Ok(Response::new(csi::ListSnapshotsResponse {
                    entries,
                    next_token,
                }))
            }
        }
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_snapshot_id(&r.snapshot_id) {
            let snapshot = self.replicated.get_snapshot(&r.snapshot_id).await?;
            return Ok(Response::new(csi::GetSnapshotResponse {
                snapshot: Some(snapshot),
            }));
        }
        let n = self.snapshot_node(&r.snapshot_id)?;
        relay(&n, cc(&n).get_snapshot(r).await)
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            let _guard = self.volume_guard(&r.volume_id).await?;
            return self.replicated.expand(&r).await.map(Response::new);
        }
        let n = self.volume_node(&r.volume_id)?;
        relay(&n, cc(&n).controller_expand_volume(r).await)
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            return self
                .replicated
                .get_volume(&r.volume_id)
                .await
                .map(Response::new);
        }
        let n = self.volume_node(&r.volume_id)?;
        relay(&n, cc(&n).controller_get_volume(r).await)
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_id(&r.volume_id) {
            let _guard = self.volume_guard(&r.volume_id).await?;
            self.replicated.modify(&r).await?;
            return Ok(Response::new(csi::ControllerModifyVolumeResponse {}));
        }
        let n = self.volume_node(&r.volume_id)?;
        relay(&n, cc(&n).controller_modify_volume(r).await)
    }
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for Router {
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(
            crate::server::group_controller::capabilities(),
        ))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        let replicated_ones = r
            .source_volume_ids
            .iter()
            .filter(|v| replicated::is_replicated_id(v))
            .count();
        if replicated_ones > 0 {
            if replicated_ones < r.source_volume_ids.len() {
                return Err(Status::invalid_argument(
                    "source_volume_ids: a group snapshot holds either replicated volumes or volumes of one node, not both",
                ));
            }
            // One operation on each volume at a time, taken in one order.
            let ordered: BTreeSet<&String> = r.source_volume_ids.iter().collect();
            let mut _guards = Vec::with_capacity(ordered.len());
            for v in ordered {
                _guards.push(self.volume_guard(v).await?);
            }
            let group = self.replicated.create_group_snapshot(&r).await?;
            return Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(group),
            }));
        }
        let nodes: BTreeSet<Option<String>> = r
            .source_volume_ids
            .iter()
            .map(|v| VolumeId::parse(v).map(|v| v.node))
            .collect();
        let named: BTreeSet<&String> = nodes.iter().flatten().collect();
        if named.len() > 1 {
            return Err(Status::failed_precondition(format!(
                "the volumes of a group snapshot must live on one node; these live on {named:?} (a group snapshot across nodes would not be crash-consistent)"
            )));
        }
        let n = match self.node_for(named.into_iter().next().cloned())? {
            Route::Node(n) => *n,
            Route::Forgotten => {
                return Err(Status::not_found("the source volumes' node was forgotten"));
            }
        };
        relay(
            &n,
            GroupControllerClient::new(n.channel.clone())
                .create_volume_group_snapshot(r)
                .await,
        )
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_group_id(&r.group_snapshot_id) {
            self.replicated
                .delete_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)
                .await?;
            return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
        }
        match self.node_for(group_node(&r.group_snapshot_id))? {
            Route::Forgotten => Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {})),
            Route::Node(n) => relay(
                &n,
                GroupControllerClient::new(n.channel.clone())
                    .delete_volume_group_snapshot(r)
                    .await,
            ),
        }
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        if replicated::is_replicated_group_id(&r.group_snapshot_id) {
            let group = self
                .replicated
                .get_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)
                .await?;
            return Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(group),
            }));
        }
        match self.node_for(group_node(&r.group_snapshot_id))? {
            Route::Forgotten => Err(Status::not_found(format!(
                "group snapshot {} lived on a node that was forgotten",
                r.group_snapshot_id
            ))),
            Route::Node(n) => relay(
                &n,
                GroupControllerClient::new(n.channel.clone())
                    .get_volume_group_snapshot(r)
                    .await,
            ),
        }
    }
}

#[tonic::async_trait]
impl csi::snapshot_metadata_server::SnapshotMetadata for Router {
    type GetMetadataAllocatedStream = Stream<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Stream<csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        req: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = req.into_inner();
        let n = self.snapshot_node(&r.snapshot_id)?;
        let s = relay(
            &n,
            SnapshotMetadataClient::new(n.channel.clone())
                .get_metadata_allocated(r)
                .await,
        )?;
        Ok(Response::new(
            Box::pin(s.into_inner()) as Self::GetMetadataAllocatedStream
        ))
    }

    async fn get_metadata_delta(
        &self,
        req: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = req.into_inner();
        let n = self.snapshot_node(&r.target_snapshot_id)?;
        let s = relay(
            &n,
            SnapshotMetadataClient::new(n.channel.clone())
                .get_metadata_delta(r)
                .await,
        )?;
        Ok(Response::new(
            Box::pin(s.into_inner()) as Self::GetMetadataDeltaStream
        ))
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Router {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: crate::VENDOR_VERSION.to_owned(),
            manifest: [("mode".to_owned(), "controller".to_owned())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(crate::server::identity::capabilities()))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

/// The registration API on the controller's --listen address.
#[derive(Debug, Clone)]
pub struct RegistryService {
    pub registry: Arc<Registry>,
    pub names: Arc<NameIndex>,
    /// Its round of repairs is woken when a node comes back.
    pub replicated: super::replicated::Replicated,
}

#[tonic::async_trait]
impl proto::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let who = peer_identity(&req);
        let r = req.into_inner();
        match who {
            Some(PeerIdentity::Cluster) => {}
            Some(PeerIdentity::Node(n)) if n == r.node_id => {}
            Some(PeerIdentity::Node(n)) => {
                tracing::warn!(certificate = %n, claimed = %r.node_id, "refused a registration for another node");
                return Err(Status::permission_denied(format!(
                    "the certificate of node {n} may not register as node {}",
                    r.node_id
                )));
            }
            None => return Err(Status::unauthenticated("no client certificate")),
        }
        let node = r.node_id.clone();
        let back = self
            .registry
            .get(&node)
            .is_none_or(|n| !n.fresh(Instant::now()));
        self.registry
            .register(r)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if back {
            // A node new or back from away: its copies out of sync may be
            // healed, a volume waiting for it (a drain, a lost member's
            // replacement) go on, now rather than at the round's period.
            self.replicated.wake_round();
        }
        if self.names.start_loading(&node)
            && let Some(n) = self.registry.get(&node)
        {
            let names = Arc::clone(&self.names);
            tokio::spawn(async move {
                let mut agent = proto::agent_client::AgentClient::new(n.channel.clone());
                match agent.list_names(proto::ListNamesRequest {}).await {
                    Ok(r) => {
                        let vols = r.into_inner().volumes;
                        tracing::debug!(node = %n.id, names = vols.len(), "volume names loaded");
                        names.finish_loading(
                            &n.id,
                            vols.into_iter().map(|v| (v.name, v.volume_id)).collect(),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(node = %n.id, code = ?e.code(), message = e.message(), "cannot load the node's volume names; retrying at its next registration");
                        names.abort_loading(&n.id);
                    }
                }
            });
        }
        Ok(Response::new(proto::RegisterResponse {}))
    }
}

/// The `stowage node` commands, on the controller's unix socket.
#[tonic::async_trait]
impl proto::admin_server::Admin for Router {
    async fn list_nodes(
        &self,
        _req: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        let now = Instant::now();
        let drains = self.replicated.drains();
        Ok(Response::new(proto::ListNodesResponse {
            nodes: self
                .registry
                .all()
                .into_iter()
                .map(|n| {
                    let left = n.draining.then(|| drains.left(&n.id)).flatten();
                    proto::NodeInfo {
                        fresh: n.fresh(now),
                        last_seen_ms_ago: now.duration_since(n.last_seen).as_millis() as u64,
                        advertise: n.advertise,
                        free_bytes: n.free_bytes,
                        total_bytes: n.total_bytes,
                        labels: n.labels.into_iter().collect(),
                        cordoned: n.cordoned,
                        version: n.version,
                        drain_left: left.as_ref().map(|l| l.len() as u32),
                        drain_notes: left.unwrap_or_default(),
                        draining: n.draining,
                        node_id: n.id,
                    }
                })
                .collect(),
            forgotten: self.registry.forgotten(),
        }))
    }

    async fn cordon(
        &self,
        req: Request<proto::CordonRequest>,
    ) -> Result<Response<proto::CordonResponse>, Status> {
        let r = req.into_inner();
        let n = match self.route(&r.node_id)? {
            Route::Node(n) => *n,
            Route::Forgotten => {
                return Err(Status::not_found(format!(
                    "node {} was forgotten",
                    r.node_id
                )));
            }
        };
        relay(
            &n,
            proto::agent_client::AgentClient::new(n.channel.clone())
                .set_cordon(proto::SetCordonRequest {
                    cordoned: r.cordoned,
                    draining: r.draining,
                })
                .await,
        )
        .map_err(|e| match e.code() {
            tonic::Code::Unavailable if r.draining => Status::unavailable(format!(
                "{} (the mark is kept on the node, so a node that is down cannot be drained: its replicated volumes' members are replaced after --replica-replace-after instead)",
                e.message()
            )),
            _ => e,
        })?;
        if r.draining && !n.draining {
            self.replicated.drains().begin(&r.node_id);
        }
        self.registry
            .set_cordoned(&r.node_id, r.cordoned, r.draining);
        if r.draining {
            self.replicated.wake_round();
        }
        Ok(Response::new(proto::CordonResponse {}))
    }

    async fn forget(
        &self,
        req: Request<proto::ForgetRequest>,
    ) -> Result<Response<proto::ForgetResponse>, Status> {
        let r = req.into_inner();
        if !crate::volume::id::valid_node_id(&r.node_id) {
            return Err(Status::invalid_argument(format!(
                "invalid node id {:?}",
                r.node_id
            )));
        }
        self.registry
            .forget(&r.node_id)
            .map_err(Status::failed_precondition)?;
        self.names.unload(&r.node_id);
        tracing::warn!(node = %r.node_id, "node forgotten: deletes of its volumes now succeed");
        Ok(Response::new(proto::ForgetResponse {}))
    }

    async fn scrub_volume(
        &self,
        req: Request<proto::ScrubVolumeRequest>,
    ) -> Result<Response<proto::ScrubResponse>, Status> {
        let r = req.into_inner();
        only_replicated(&r.volume_id, "scrub")?;
        self.replicated.scrub(&r.volume_id).await.map(Response::new)
    }

    async fn repair_volume(
        &self,
        req: Request<proto::RepairVolumeRequest>,
    ) -> Result<Response<proto::RepairVolumeResponse>, Status> {
        let r = req.into_inner();
        only_replicated(&r.volume_id, "repair")?;
        let _guard = self.volume_guard(&r.volume_id).await?;
        let rebuilt = self.replicated.repair(&r.volume_id, &r.from).await?;
        Ok(Response::new(proto::RepairVolumeResponse { rebuilt }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Client TLS under a CA of its own: these tests never dial.
    fn client_tls() -> crate::cluster::tls::ClientTls {
        static TLS: std::sync::OnceLock<crate::cluster::tls::ClientTls> =
            std::sync::OnceLock::new();
        TLS.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            crate::cluster::tls::init(dir.path()).unwrap();
            let material = crate::cluster::tls::TlsMaterial::load(dir.path()).unwrap();
            material.client_tls().unwrap()
        })
        .clone()
    }

    fn registry(nodes: &[(&str, u64, bool)]) -> Router {
        let r = Arc::new(Registry::new(client_tls()));
        for (id, free, cordoned) in nodes {
            r.register(proto::RegisterRequest {
                node_id: (*id).to_owned(),
                advertise: "127.0.0.1:1".to_owned(),
                topology: [(TOPOLOGY_NODE_KEY.to_owned(), (*id).to_owned())].into(),
                free_bytes: *free,
                total_bytes: *free * 2,
                cordoned: *cordoned,
                interval_seconds: 5,
                ..Default::default()
            })
            .unwrap();
        }
        Router::new(r, "stowage.csi.dev".to_owned())
    }

    fn topo(node: &str) -> csi::Topology {
        csi::Topology {
            segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
        }
    }

    fn create(
        need: i64,
        preferred: &[&str],
        requisite: &[&str],
        params: &[(&str, &str)],
    ) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: "v".to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: need,
                limit_bytes: 0,
            }),
            parameters: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            accessibility_requirements: (!preferred.is_empty() || !requisite.is_empty()).then(
                || csi::TopologyRequirement {
                    preferred: preferred.iter().map(|n| topo(n)).collect(),
                    requisite: requisite.iter().map(|n| topo(n)).collect(),
                },
            ),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn placement_follows_parameter_topology_then_free_space() {
        let r = registry(&[("a", 100, false), ("b", 300, false), ("c", 500, true)]);
        // Most free uncordoned node that fits.
        assert_eq!(r.place(&create(10, &[], &[], &[])).unwrap().id, "b");
        assert_eq!(r.place(&create(200, &[], &[], &[])).unwrap().id, "b");
        let e = r.place(&create(400, &[], &[], &[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        // preferred[0] wins; a cordoned one is passed over for the next.
        assert_eq!(
            r.place(&create(10, &["a", "b"], &["a", "b"], &[]))
                .unwrap()
                .id,
            "a"
        );
        assert_eq!(r.place(&create(10, &["c", "a"], &[], &[])).unwrap().id, "a");
        assert_eq!(r.place(&create(10, &[], &["c", "b"], &[])).unwrap().id, "b");
        let e = r.place(&create(10, &["c"], &["c"], &[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        // Unknown nodes in the topology are no place to go.
        let e = r.place(&create(10, &["zz"], &[], &[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        // The node parameter pins; an unregistered one is UNAVAILABLE
        // (it may register), a cordoned one RESOURCE_EXHAUSTED.
        assert_eq!(
            r.place(&create(10, &[], &[], &[("node", "a")])).unwrap().id,
            "a"
        );
        let e = r
            .place(&create(10, &[], &[], &[("node", "zz")]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let e = r
            .place(&create(10, &[], &[], &[("node", "c")]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    }

    #[tokio::test]
    async fn forgotten_and_unknown_nodes_route_as_the_spec_needs() {
        let r = registry(&[("a", 100, false)]);
        assert!(matches!(r.route("a"), Ok(Route::Node(n)) if n.id == "a"));
        assert_eq!(
            r.route("b").err().map(|s| s.code()),
            Some(tonic::Code::Unavailable)
        );
        // A fresh node cannot be forgotten; an unknown one can.
        assert!(r.registry.forget("a").is_err());
        r.registry.forget("b").unwrap();
        assert!(matches!(r.route("b"), Ok(Route::Forgotten)));
        // Malformed IDs go to any node, which answers as one server would.
        assert!(matches!(r.volume_route("garbage"), Ok(Route::Node(n)) if n.id == "a"));
        let id = format!("block:b:{}", "0".repeat(32));
        assert!(matches!(r.volume_route(&id), Ok(Route::Forgotten)));
        assert_eq!(
            group_node(&format!("group:a:{}", "1".repeat(32))).as_deref(),
            Some("a")
        );
        assert_eq!(group_node("group:a:xyz"), None);
        // No node may take the name replicated group snapshots use.
        let reserved = r.registry.register(proto::RegisterRequest {
            node_id: crate::cluster::registry::RESERVED_NODE_ID.to_owned(),
            advertise: "127.0.0.1:1".to_owned(),
            interval_seconds: 5,
            ..Default::default()
        });
        assert!(
            matches!(
                reserved,
                Err(crate::cluster::registry::RegisterError::Reserved(_))
            ),
            "{reserved:?}"
        );
        assert!(replicated::is_replicated_group_id(&format!(
            "group:{}:{}",
            crate::cluster::registry::RESERVED_NODE_ID,
            "1".repeat(32)
        )));
    }

    /// Pages through fake per-node lists with every page size: each entry
    /// exactly once, in node order, and tokens name the node.
    #[tokio::test]
    async fn paging_fans_out_over_nodes_and_resumes_from_tokens() {
        let r = registry(&[("a", 1, false), ("b", 1, false), ("c", 1, false)]);
        let data: HashMap<&str, Vec<String>> = [
            ("a", (0..5).map(|i| format!("a{i}")).collect()),
            ("b", Vec::new()),
            ("c", (0..3).map(|i| format!("c{i}")).collect()),
        ]
        .into();
        let data = &data;
        let fetch = |n: NodeEntry, max: i32, token: String| async move {
            let all = &data[n.id.as_str()];
            let start: usize = if token.is_empty() {
                0
            } else {
                token
                    .parse()
                    .map_err(|_| Status::aborted("bad inner token"))?
            };
            let end = if max == 0 {
                all.len()
            } else {
                (start + max as usize).min(all.len())
            };
            let next = if end < all.len() {
                end.to_string()
            } else {
                String::new()
            };
            Ok((all[start..end].to_vec(), next))
        };
        let everything: Vec<String> = ["a0", "a1", "a2", "a3", "a4", "c0", "c1", "c2"]
            .map(String::from)
            .to_vec();
        for page in 0..=9 {
            let (mut got, mut token) = (Vec::new(), String::new());
            for _ in 0..20 {
                let (entries, next) = r.paged(page, &token, fetch).await.unwrap();
                assert!(page == 0 || entries.len() <= page as usize);
                got.extend(entries);
                token = next;
                if token.is_empty() {
                    break;
                }
            }
            assert_eq!(got, everything, "page size {page}");
        }
        assert_eq!(
            r.paged(0, "nonsense", fetch).await.err().map(|s| s.code()),
            Some(tonic::Code::Aborted)
        );
        assert_eq!(
            r.paged(0, "zz/1", fetch).await.err().map(|s| s.code()),
            Some(tonic::Code::Aborted)
        );
        assert_eq!(
            r.paged(-1, "", fetch).await.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }
}
