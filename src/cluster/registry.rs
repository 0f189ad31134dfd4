//! The controller's node registry: soft state, rebuilt from the nodes'
//! periodic registrations (complete again one registration period after a
//! controller restart). Nothing here is written to disk.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::proto::RegisterRequest;
use super::tls::{ClientTls, ServerRole};

/// A node missing this many registration periods is no longer fresh.
pub const MISSED_PERIODS: u32 = 3;

/// One registered node.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub id: String,
    pub advertise: String,
    pub topology: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub cordoned: bool,
    /// Every replicated volume's member moves off the node (`stowage node
    /// drain`); implies `cordoned`.
    pub draining: bool,
    pub interval: Duration,
    pub version: String,
    /// The node's attach limit (0: none).
    pub max_volumes: u64,
    pub last_seen: Instant,
    /// A lazily connected mutual-TLS channel to the node's agent API,
    /// which only this node's certificate (or the shared one) may answer.
    pub channel: Channel,
}

impl NodeEntry {
    /// Whether the node registered within its last few periods.
    pub fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.last_seen) <= self.interval * MISSED_PERIODS
    }
}

/// The node ID no node may have: replicated volumes' group snapshots are
/// `group:replicated:<uuid>`, where other group snapshots name their node.
pub const RESERVED_NODE_ID: &str = "replicated";

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid node id {0:?}")]
    NodeId(String),
    #[error("node id {0:?} is reserved: replicated volumes' IDs use it")]
    Reserved(String),
    #[error("invalid advertise address {0:?}: expected host:port")]
    Advertise(String),
}

/// All nodes that registered since this controller started.
#[derive(Debug)]
pub struct Registry {
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    /// Nodes an operator declared gone for good (`stowage node forget`):
    /// deletes of their volumes succeed. Cleared when the node registers
    /// again. In memory only, like the rest of the registry.
    forgotten: Mutex<BTreeSet<String>>,
    tls: ClientTls,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    pub fn new(tls: ClientTls) -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
            forgotten: Mutex::new(BTreeSet::new()),
            tls,
        }
    }

    /// Records a registration (new node, or a refresh of a known one; a
    /// changed address gets a new channel).
    pub fn register(&self, r: RegisterRequest) -> Result<(), RegisterError> {
        if !crate::volume::id::valid_node_id(&r.node_id) {
            return Err(RegisterError::NodeId(r.node_id));
        }
        if r.node_id == RESERVED_NODE_ID {
            return Err(RegisterError::Reserved(r.node_id));
        }
        if r.advertise.parse::<std::net::SocketAddr>().is_err()
            && r.advertise
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(RegisterError::Advertise(r.advertise));
        }
        let interval = Duration::from_secs(u64::from(r.interval_seconds.clamp(1, 300)));
        let mut nodes = lock(&self.nodes);
        let channel = match nodes.get(&r.node_id) {
            Some(e) if e.advertise == r.advertise => e.channel.clone(),
            _ => self.channel_to(&r.node_id, &r.advertise)?,
        };
        let new = !nodes.contains_key(&r.node_id);
        nodes.insert(
            r.node_id.clone(),
            NodeEntry {
                id: r.node_id.clone(),
                advertise: r.advertise,
                topology: r.topology.into_iter().collect(),
                labels: r.labels.into_iter().collect(),
                free_bytes: r.free_bytes,
                total_bytes: r.total_bytes,
                cordoned: r.cordoned || r.draining,
                draining: r.draining,
                interval,
                version: r.version,
                max_volumes: r.max_volumes,
                last_seen: Instant::now(),
                channel,
            },
        );
        drop(nodes);
        if lock(&self.forgotten).remove(&r.node_id) {
            tracing::warn!(node = %r.node_id, "a forgotten node registered again");
        }
        if new {
            tracing::info!(node = %r.node_id, "node registered");
        }
        Ok(())
    }

    /// A channel to node `node`'s agent API at `advertise`.
    fn channel_to(&self, node: &str, advertise: &str) -> Result<Channel, RegisterError> {
        let endpoint = super::tls::endpoint(advertise)
            .map_err(|_| RegisterError::Advertise(advertise.to_owned()))?;
        Ok(endpoint
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(self.tls.connector(ServerRole::Node(node.to_owned()))))
    }

    /// The node, fresh or not.
    pub fn get(&self, id: &str) -> Option<NodeEntry> {
        lock(&self.nodes).get(id).cloned()
    }

    /// Every node, sorted by id.
    pub fn all(&self) -> Vec<NodeEntry> {
        lock(&self.nodes).values().cloned().collect()
    }

    /// Fresh nodes, sorted by id.
    pub fn fresh(&self) -> Vec<NodeEntry> {
        let now = Instant::now();
        lock(&self.nodes)
            .values()
            .filter(|n| n.fresh(now))
            .cloned()
            .collect()
    }

    /// Records a cordon change the node confirmed.
    pub fn set_cordoned(&self, id: &str, cordoned: bool, draining: bool) {
        if let Some(n) = lock(&self.nodes).get_mut(id) {
            n.cordoned = cordoned || draining;
            n.draining = draining;
        }
    }

    /// The nodes draining, fresh or not.
    pub fn draining(&self) -> BTreeSet<String> {
        lock(&self.nodes)
            .values()
            .filter(|n| n.draining)
            .map(|n| n.id.clone())
            .collect()
    }

    pub fn is_forgotten(&self, id: &str) -> bool {
        lock(&self.forgotten).contains(id)
    }

    pub fn forgotten(&self) -> Vec<String> {
        lock(&self.forgotten).iter().cloned().collect()
    }

    /// Forgets a node that is not fresh: its entry goes, and deletes of its
    /// volumes and snapshots succeed from now on.
    pub fn forget(&self, id: &str) -> Result<(), String> {
        let mut nodes = lock(&self.nodes);
        if nodes.get(id).is_some_and(|n| n.fresh(Instant::now())) {
            return Err(format!(
                "node {id} registered recently; stop it first (forget is for nodes gone for good)"
            ));
        }
        nodes.remove(id);
        lock(&self.forgotten).insert(id.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::proto::agent_client::AgentClient;
    use crate::cluster::tls::test_servers::{EmptyServer, TestCa};

    /// The controller's channel to a node's agent is answered only by that
    /// node's certificate (or the shared one): node n9's certificate at
    /// the address n1 registered is UNAVAILABLE, naming both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_is_reached_only_through_its_own_or_the_shared_certificate() {
        let ca = TestCa::new();
        let registry = Registry::new(ca.material(None).client_tls().unwrap());
        let cordon = |addr: &str| {
            registry
                .register(RegisterRequest {
                    node_id: "n1".to_owned(),
                    advertise: addr.to_owned(),
                    interval_seconds: 5,
                    ..Default::default()
                })
                .unwrap();
            let channel = registry.get("n1").unwrap().channel;
            async move {
                AgentClient::new(channel)
                    .set_cordon(super::super::proto::SetCordonRequest::default())
                    .await
                    .unwrap_err()
            }
        };
        let n9 = EmptyServer::start(&ca.material(Some("n9"))).await;
        let got = cordon(&n9.addr).await;
        assert_eq!(got.code(), tonic::Code::Unavailable, "{got:?}");
        assert!(
            got.message().contains(&n9.addr)
                && got
                    .message()
                    .contains("presented the certificate of node n9")
                && got.message().contains("may answer as node n1"),
            "{got:?}"
        );
        let n1 = EmptyServer::start(&ca.material(Some("n1"))).await;
        let shared = EmptyServer::start(&ca.material(None)).await;
        for reached in [&n1.addr, &shared.addr] {
            let got = cordon(reached).await;
            assert_eq!(got.code(), tonic::Code::Unimplemented, "{got:?}");
        }
    }
}
