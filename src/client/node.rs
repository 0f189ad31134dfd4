//! `stowage node list|cordon|uncordon|forget`: the registry of a
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
    /// Place new volumes on the node again.
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

pub async fn run(endpoint: &str, verb: NodeVerb, format: OutputFormat) -> Result<(), ClientError> {
    let mut admin = AdminClient::new(super::channel(endpoint).await?);
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
                    let state = match (n.fresh, n.cordoned) {
                        (true, false) => "ready",
                        (true, true) => "cordoned",
                        (false, _) => "not registering",
                    };
                    t.row(vec![
                        n.node_id.clone(),
                        n.address.clone(),
                        format!("{:.1}s ago", n.last_seen_seconds_ago),
                        state.to_owned(),
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
                })
                .await
                .map_err(unimplemented)?;
            println!("node {node_id} cordoned: no new volumes are placed there");
            Ok(())
        }
        NodeVerb::Uncordon { node_id } => {
            admin
                .cordon(CordonRequest {
                    node_id: node_id.clone(),
                    cordoned: false,
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
