//! A cluster of real processes (issue 11): a `serve --mode controller` and
//! node agents (`serve --mode node`), each in a network namespace of its
//! own on a bridge of the test's own (198.18.0.0/15, nothing else is
//! reached), with mutual TLS from `stowage cluster init`, each node with its
//! own state in one shared pool filesystem. CSI calls go to the
//! controller's unix socket (routed over TCP to the nodes) and to the
//! nodes' own sockets, as a CO would. Everything is torn down on drop, also
//! when a test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stowage::cluster::proto::admin_client::AdminClient;
use stowage::cluster::proto::{ListNodesRequest, NodeInfo};
use stowage::csi;
use stowage::volume::TOPOLOGY_NODE_KEY;

use super::netns::{AGENT_PORT, Net, Proc};
use super::*;

pub const NODES: usize = 3;
/// Where the controller serves `/metrics` and `/healthz` (in its namespace).
pub const METRICS_PORT: u16 = 9810;
/// Where each node serves `/metrics` (in its namespace).
pub const NODE_METRICS_PORT: u16 = 9811;
/// Registration period of the test nodes (seconds): a node is stale after
/// three missed periods.
pub const INTERVAL: u64 = 1;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stowage")
}

/// Field order is drop order: processes stop before their pool goes.
pub struct Cluster {
    pub controller: Proc,
    pub nodes: Vec<Proc>,
    pub net: Net,
    pub c: Clients,
    pub admin: AdminClient<tonic::transport::Channel>,
    pub root: PathBuf,
    pub _scratch: Scratch,
}

pub fn node_id(i: usize) -> String {
    format!("n{i}")
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_with(NODES, &[]).await
    }

    /// `nodes` node agents, and `controller_args` added to the controller's
    /// command line.
    pub async fn start_with(nodes_wanted: usize, controller_args: &[&str]) -> Cluster {
        let scratch = Scratch::new("cluster");
        let root = scratch.root.clone();
        let pool_fs = make_pool_fs(&scratch, "xfs", 8 << 30);
        let out = Command::new(bin())
            .args(["cluster", "init"])
            .arg(root.join("tls"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster init: {out:?}");
        let net = Net::new(nodes_wanted + 1);
        let ctl_addr = net.host(0).addr(AGENT_PORT);
        let controller = net.host(0).spawn(
            Command::new(bin())
                .args(["serve", "--mode", "controller", "--endpoint"])
                .arg(format!("unix://{}", root.join("controller.sock").display()))
                .args(["--listen", &ctl_addr.to_string(), "--tls-dir"])
                .arg(root.join("tls"))
                .args([
                    "--metrics-address",
                    &net.host(0).addr(METRICS_PORT).to_string(),
                ])
                .args(controller_args)
                .env("STOWAGE_LOG", "debug"),
        );
        let mut nodes = Vec::new();
        for i in 1..=nodes_wanted {
            let h = net.host(i);
            let state = pool_fs.join(node_id(i));
            nodes.push(
                h.spawn(
                    Command::new(bin())
                        .args(["serve", "--mode", "node", "--node-id", &node_id(i)])
                        .arg("--endpoint")
                        .arg(format!(
                            "unix://{}",
                            root.join(format!("n{i}.sock")).display()
                        ))
                        .arg("--state-dir")
                        .arg(&state)
                        .args(["--listen", &h.agent_addr().to_string()])
                        .args(["--controller", &format!("https://{ctl_addr}")])
                        .arg("--tls-dir")
                        .arg(root.join("tls"))
                        .args(["--label", &format!("zone=z{}", i % 2)])
                        .args(["--register-interval", &INTERVAL.to_string()])
                        .args(["--metrics-address", &h.addr(NODE_METRICS_PORT).to_string()])
                        .env("STOWAGE_LOG", "debug"),
                ),
            );
        }
        let socket = root.join("controller.sock");
        wait_socket(&socket, &controller);
        let c = try_connect(&socket).await.unwrap();
        let admin = AdminClient::new(
            stowage::client::channel(&format!("unix://{}", socket.display()))
                .await
                .unwrap(),
        );
        let mut cl = Cluster {
            controller,
            nodes,
            net,
            c,
            admin,
            root,
            _scratch: scratch,
        };
        for i in 1..=nodes_wanted {
            wait_socket(&cl.node_socket(i), &cl.nodes[i - 1]);
        }
        cl.wait_fresh(&(1..=nodes_wanted).map(node_id).collect::<Vec<_>>())
            .await;
        cl
    }

    pub fn node_socket(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.sock"))
    }

    pub async fn node(&self, i: usize) -> Clients {
        try_connect(&self.node_socket(i)).await.unwrap()
    }

    pub async fn nodes(&mut self) -> Vec<NodeInfo> {
        self.admin
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
    }

    /// Waits (bounded) until every node in `ids` is registered and fresh.
    pub async fn wait_fresh(&mut self, ids: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = self.nodes().await;
            if ids
                .iter()
                .all(|id| nodes.iter().any(|n| &n.node_id == id && n.fresh))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} not all fresh within 30 s: {nodes:?}\ncontroller log:\n{}",
                self.controller.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until node `id` is registered but no longer fresh.
    pub async fn wait_stale(&mut self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .nodes()
            .await
            .iter()
            .any(|n| n.node_id == id && n.fresh)
        {
            assert!(Instant::now() < deadline, "{id} still fresh after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn reconnect(&mut self) {
        let socket = self.root.join("controller.sock");
        wait_socket(&socket, &self.controller);
        self.c = try_connect(&socket).await.unwrap();
        self.admin = AdminClient::new(
            stowage::client::channel(&format!("unix://{}", socket.display()))
                .await
                .unwrap(),
        );
    }

    pub async fn create(
        &mut self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::Volume, tonic::Status> {
        self.c
            .controller
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn get(
        &mut self,
        id: &str,
    ) -> Result<csi::ControllerGetVolumeResponse, tonic::Status> {
        self.c
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.to_owned(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Every volume ListVolumes returns, page by page.
    pub async fn list_all(&mut self, page: i32) -> Result<Vec<String>, tonic::Status> {
        let (mut out, mut token) = (Vec::new(), String::new());
        for _ in 0..1000 {
            let r = self
                .c
                .controller
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: page,
                    starting_token: token,
                })
                .await?
                .into_inner();
            out.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
            token = r.next_token;
            if token.is_empty() {
                return Ok(out);
            }
        }
        panic!("ListVolumes never ended");
    }

    /// GET `path` over HTTP from `port` of host `host` (0: the
    /// controller's), from inside that host's namespace: the status line
    /// and the body.
    pub fn http_get(&self, host: usize, port: u16, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let h = self.net.host(host);
        let mut s = h.connect(h.addr(port), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: stowage\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }

    /// Runs `stowage` (the client) against the controller's socket.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("--endpoint")
            .arg(format!(
                "unix://{}",
                self.root.join("controller.sock").display()
            ))
            .args(args)
            .output()
            .unwrap()
    }
}

pub fn wait_socket(socket: &Path, p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            p.is_running(),
            "server exited: {:?}\n{}",
            p.exit_status(),
            p.log_tail(40)
        );
        assert!(
            Instant::now() < deadline,
            "{} not up in 30 s:\n{}",
            socket.display(),
            p.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
    }
}

pub fn on(preferred: &[&str], requisite: &[&str]) -> Option<csi::TopologyRequirement> {
    Some(csi::TopologyRequirement {
        preferred: preferred.iter().map(|n| topo(n)).collect(),
        requisite: requisite.iter().map(|n| topo(n)).collect(),
    })
}

pub fn node_of(volume_id: &str) -> &str {
    volume_id.split(':').nth(1).unwrap()
}
