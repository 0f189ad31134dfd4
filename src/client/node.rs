//! `stowage node list|cordon|drain|uncordon|forget`: the registry of a
//! `--mode controller` server (its unix socket).

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Serialize;

use super::output::{Table, emit, join_map};
use super::{ClientError, GlobalArgs, OutputFormat, rpc};
use crate::cluster::proto::admin_client::AdminClient;
use crate::cluster::proto::{CordonRequest, ForgetRequest, ListNodesRequest};

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub globals: GlobalArgs,
    #[command(subcommand)]
    pub verb: NodeVerb,
}

#[derive(Debug, Subcommand)]
pub enum NodeVerb {
    /// The nodes registered with the controller.
    List,
    /// Place no new volumes on the node (existing ones keep working).
    Cordon { node_id: String },
    /// Cordon the node and move every replicated volume's member off it,
    /// make before break: each copy there is rebuilt on another node
    /// before it goes, so no volume has a copy fewer meanwhile (but one of
    /// five copies, the most, which is rebuilt in place). The
    /// volumes of the node's own pool (block, dir, object) stay. Lasts
    /// across restarts of the node and of the controller until uncordoned.
    Drain {
        node_id: String,
        /// Wait until no replicated volume has a member on the node,
        /// saying what each one left waits for.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit status 1) after this many seconds;
        /// 0: no limit. The drain goes on.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Place new volumes on the node again (ends a drain; a copy already
    /// added elsewhere for one there still replaces it).
    Uncordon { node_id: String },
    /// Declare a node gone for good: deletes of its volumes and snapshots
    /// succeed from now on (refused while the node still registers).
    Forget { node_id: String },
}

/// One registered node, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node_id: String,
    pub address: String,
    pub last_seen_seconds_ago: f64,
    pub fresh: bool,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub cordoned: bool,
    pub draining: bool,
    /// Of a draining node: the replicated volumes with a member there
    /// (None until the controller has looked at every volume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_left: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drain_notes: Vec<String>,
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodesView {
    pub nodes: Vec<NodeView>,
    pub forgotten: Vec<String>,
}

fn gib(bytes: u64) -> String {
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

pub async fn run(
    endpoint: &str,
    limit: super::CallLimit,
    verb: NodeVerb,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(super::Conn::dial(endpoint, limit).await?);
    let unimplemented = |e: tonic::Status| {
        if e.code() == tonic::Code::Unimplemented {
            ClientError::Local(format!(
                "{endpoint} is not a `stowage serve --mode controller` socket (the node commands talk to the cluster's controller)"
            ))
        } else {
            rpc("Admin")(e)
        }
    };
    match verb {
        NodeVerb::List => {
            let r = admin
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(unimplemented)?
                .into_inner();
            let view = NodesView {
                nodes: r
                    .nodes
                    .into_iter()
                    .map(|n| NodeView {
                        node_id: n.node_id,
                        address: n.advertise,
                        last_seen_seconds_ago: n.last_seen_ms_ago as f64 / 1000.0,
                        fresh: n.fresh,
                        free_bytes: n.free_bytes,
                        total_bytes: n.total_bytes,
                        labels: n.labels.into_iter().collect(),
                        cordoned: n.cordoned,
                        draining: n.draining,
                        drain_left: n.drain_left,
                        drain_notes: n.drain_notes,
                        version: n.version,
                    })
                    .collect(),
                forgotten: r.forgotten,
            };
            emit(format, &view, || {
                let mut t = Table::new(&[
                    "NODE",
                    "ADDRESS",
                    "LAST SEEN",
                    "STATE",
                    "FREE",
                    "SIZE",
                    "LABELS",
                ]);
                for n in &view.nodes {
                    let state = match (n.fresh, n.cordoned, n.draining, n.drain_left) {
                        (false, ..) => "not registering".to_owned(),
                        (true, _, true, Some(0)) => "drained".to_owned(),
                        (true, _, true, Some(left)) => format!("draining ({left} volumes left)"),
                        (true, _, true, None) => "draining".to_owned(),
                        (true, true, false, _) => "cordoned".to_owned(),
                        (true, false, false, _) => "ready".to_owned(),
                    };
                    t.row(vec![
                        n.node_id.clone(),
                        n.address.clone(),
                        format!("{:.1}s ago", n.last_seen_seconds_ago),
                        state,
                        gib(n.free_bytes),
                        gib(n.total_bytes),
                        join_map(&n.labels),
                    ]);
                }
                for f in &view.forgotten {
                    t.row(vec![
                        f.clone(),
                        String::new(),
                        String::new(),
                        "forgotten".to_owned(),
                    ]);
                }
                t
            })
        }
        NodeVerb::Cordon { node_id } => {
            admin
                .cordon(CordonRequest {
                    node_id: node_id.clone(),
                    cordoned: true,
                    draining: false,
                })
                .await
                .map_err(unimplemented)?;
            println!("node {node_id} cordoned: no new volumes are placed there");
            Ok(())
        }
        NodeVerb::Drain {
            node_id,
            wait,
            timeout,
        } => {
            admin
                .cordon(CordonRequest {
                    node_id: node_id.clone(),
                    cordoned: true,
                    draining: true,
                })
                .await
                .map_err(unimplemented)?;
            println!(
                "node {node_id} draining: cordoned, and every replicated volume's member moves off it, copies rebuilt elsewhere first (its own pool's volumes stay)"
            );
            if !wait {
                println!("`stowage node list` says how many volumes are left");
                return Ok(());
            }
            wait_drained(&mut admin, &node_id, timeout).await
        }
        NodeVerb::Uncordon { node_id } => {
            admin
                .cordon(CordonRequest {
                    node_id: node_id.clone(),
                    cordoned: false,
                    draining: false,
                })
                .await
                .map_err(unimplemented)?;
            println!("node {node_id} uncordoned");
            Ok(())
        }
        NodeVerb::Forget { node_id } => {
            admin
                .forget(ForgetRequest {
                    node_id: node_id.clone(),
                })
                .await
                .map_err(unimplemented)?;
            println!("node {node_id} forgotten: deletes of its volumes and snapshots now succeed");
            Ok(())
        }
    }
}

/// Polls the controller until `node` holds no member of a replicated
/// volume, printing what the volumes left wait for whenever it changes. A
/// controller that does not answer, or does not know the node yet (it
/// restarted), is waited for too.
async fn wait_drained(
    admin: &mut AdminClient<super::Conn>,
    node: &str,
    timeout: u64,
) -> Result<(), ClientError> {
    let start = std::time::Instant::now();
    let mut said: Option<Vec<String>> = None;
    let mut left = "not yet counted".to_owned();
    loop {
        let listed = match admin.list_nodes(ListNodesRequest {}).await {
            Ok(r) => Some(r.into_inner().nodes),
            Err(e) if e.code() == tonic::Code::Unavailable => None,
            Err(e) => return Err(rpc("Admin")(e)),
        };
        let now = match listed.map(|l| l.into_iter().find(|n| n.node_id == node)) {
            None => vec!["the controller does not answer: waiting".to_owned()],
            Some(None) => vec![format!(
                "node {node} is not registered with the controller (yet): waiting"
            )],
            Some(Some(n)) if !n.draining => {
                return Err(ClientError::Local(format!(
                    "node {node} is no longer draining (uncordoned?)"
                )));
            }
            Some(Some(n)) if n.drain_left == Some(0) => {
                println!("node {node} drained: no replicated volume has a member there");
                return Ok(());
            }
            Some(Some(n)) => {
                left = n
                    .drain_left
                    .map_or_else(|| "not yet counted".to_owned(), |l| l.to_string());
                if n.drain_left.is_some() {
                    n.drain_notes
                } else {
                    said.clone().unwrap_or_default()
                }
            }
        };
        // Only what changed: a rebuild's note says the MiB it has left.
        for note in now
            .iter()
            .filter(|n| !said.as_ref().is_some_and(|s| s.contains(n)))
        {
            println!("  {note}");
        }
        said = Some(now);
        if timeout > 0 && start.elapsed() >= std::time::Duration::from_secs(timeout) {
            return Err(ClientError::Local(format!(
                "node {node} not drained within {timeout}s ({left} volumes left; the drain goes on)"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
