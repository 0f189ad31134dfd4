//! The node agent (`serve --mode node`): the agent API on one mutually
//! authenticated TLS port (the CSI Controller, GroupController and
//! SnapshotMetadata services of this node's own pool, plus [`Agent`]),
//! and the registration loop that keeps the controller's registry fresh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::proto::agent_server::{Agent, AgentServer};
use super::proto::registry_client::RegistryClient;
use super::proto::{
    FindVolumeRequest, FindVolumeResponse, ListNamesRequest, ListNamesResponse, NamedVolume,
    RegisterRequest, SetCordonRequest, SetCordonResponse,
};
use super::tls::{PeerIdentity, ServerRole, TlsMaterial, peer_identity};
use crate::csi;
use crate::server::{Driver, controller, group_controller, snapshot_metadata};

/// How a node agent reaches and reports to its controller.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the agent API listens (host:port).
    pub listen: String,
    /// The address the controller dials (host:port).
    pub advertise: String,
    /// The controller's registration address (`https://host:port`).
    pub controller: String,
    pub labels: BTreeMap<String, String>,
    pub interval: Duration,
    /// Present while the node is cordoned (durable: survives restarts of
    /// the node and of the controller).
    pub cordon_file: PathBuf,
    /// Held by a cordon change and by a heartbeat from reading the cordon
    /// file until the controller has the registration, so that a heartbeat
    /// that read the old state cannot land after the controller recorded
    /// the change the node confirmed.
    pub cordon_lock: Arc<tokio::sync::Mutex<()>>,
    /// False with `--replication-tls=off` (benchmarks only): the data link
    /// takes data requests in plaintext (see [`super::replica`]).
    pub replication_tls: bool,
    /// FUSE worker threads per replicated volume staged here
    /// (`--fuse-workers`).
    pub fuse_workers: usize,
    /// How often engines here scrub their volumes (`--replica-scrub-every`;
    /// None: never) and at what pace, bytes per second of each copy
    /// (`--replica-scrub-rate`).
    pub scrub_every: Option<std::time::Duration>,
    pub scrub_rate: u64,
    /// Where the replication data link listens (host:port, port 0 for any
    /// free one; `--data-listen`).
    pub data_listen: String,
    /// The data link address engines dial (`--data-advertise`; default:
    /// the host of `advertise`, the port bound).
    pub data_advertise: Option<String>,
}

/// Only the controller (holding the cluster certificate) drives a node's
/// pool: a node certificate is good for registering as that node only.
#[allow(clippy::result_large_err)]
fn controller_only(req: Request<()>) -> Result<Request<()>, Status> {
    match peer_identity(&req) {
        Some(PeerIdentity::Cluster) => Ok(req),
        Some(PeerIdentity::Node(n)) => Err(Status::permission_denied(format!(
            "the certificate of node {n} may not call the agent API"
        ))),
        None => Err(Status::unauthenticated("no client certificate")),
    }
}

#[derive(Debug)]
struct AgentService {
    driver: Arc<Driver>,
    cordon_file: PathBuf,
    cordon_lock: Arc<tokio::sync::Mutex<()>>,
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn set_cordon(
        &self,
        req: Request<SetCordonRequest>,
    ) -> Result<Response<SetCordonResponse>, Status> {
        let r = req.into_inner();
        let (cordoned, draining) = (r.cordoned || r.draining, r.draining);
        let f = self.cordon_file.clone();
        let _serial = self.cordon_lock.lock().await;
        tokio::task::spawn_blocking(move || set_cordon_file(&f, cordoned, draining))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cordon file: {e}")))?;
        tracing::info!(cordoned, draining, "cordon changed");
        Ok(Response::new(SetCordonResponse {}))
    }

    async fn find_volume(
        &self,
        req: Request<FindVolumeRequest>,
    ) -> Result<Response<FindVolumeResponse>, Status> {
        let name = req.into_inner().name;
        let c = self.controller()?;
        Ok(Response::new(FindVolumeResponse {
            volume_id: c
                .volume_by_name(&name)
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }))
    }

    async fn list_names(
        &self,
        _req: Request<ListNamesRequest>,
    ) -> Result<Response<ListNamesResponse>, Status> {
        let c = self.controller()?;
        Ok(Response::new(ListNamesResponse {
            volumes: c
                .volume_names()
                .into_iter()
                .map(|(name, id)| NamedVolume {
                    name,
                    volume_id: id.to_string(),
                })
                .collect(),
        }))
    }
}

impl AgentService {
    fn controller(&self) -> Result<&Arc<crate::volume::controller::Controller>, Status> {
        self.driver
            .controller
            .as_ref()
            .ok_or_else(|| Status::internal("node without controller"))
    }
}

/// Writes the node's cordon state: no file when neither cordoned nor
/// draining; `draining` implies cordoned.
fn set_cordon_file(f: &std::path::Path, cordoned: bool, draining: bool) -> std::io::Result<()> {
    if draining {
        crate::os::fs::write_atomic(f, DRAINING)
    } else if cordoned {
        crate::os::fs::write_atomic(f, b"cordoned\n")
    } else {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

const DRAINING: &[u8] = b"draining\n";

/// The node's cordon state, (cordoned, draining), from its cordon file.
fn read_cordon_file(f: &std::path::Path) -> (bool, bool) {
    match std::fs::read(f) {
        Ok(b) => (true, b == DRAINING),
        // Unreadable but there: cordoned, as before the file had content.
        Err(e) => (e.kind() != std::io::ErrorKind::NotFound, false),
    }
}

/// A node agent's two TCP listeners, the agent API (`--listen`) and the
/// data link (`--data-listen`), bound by [`bind_agent`] before the node
/// registers or serves CSI: a node that cannot take its ports fails to
/// start, never registering an address nobody answers on.
#[derive(Debug)]
pub struct AgentListeners {
    api: tokio::net::TcpListener,
    link: tokio::net::TcpListener,
}

/// Binds the agent API and the data link of `cfg`.
pub async fn bind_agent(cfg: &AgentConfig) -> Result<AgentListeners, crate::server::StartError> {
    let bind = |addr: &String| {
        let addr = addr.clone();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|err| crate::server::StartError::Tcp { addr, err })
        }
    };
    Ok(AgentListeners {
        api: bind(&cfg.listen).await?,
        link: bind(&cfg.data_listen).await?,
    })
}

/// Serves the agent API on `listeners` until `shutdown` resolves.
pub async fn serve_agent(
    driver: Arc<Driver>,
    cfg: &AgentConfig,
    tls: &TlsMaterial,
    listeners: AgentListeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::server::StartError> {
    tracing::info!(listen = %cfg.listen, advertise = %cfg.advertise, "agent API listening (mutual TLS)");
    let incoming = crate::server::tcp_incoming(listeners.api);
    let store = driver.replicas.clone().ok_or_else(|| {
        crate::server::StartError::Config("a node agent keeps replicas".to_owned())
    })?;
    let mut replica = super::replica::ReplicaService::new(
        Arc::clone(&store),
        driver.node.as_ref().map(|n| Arc::clone(n.replicated())),
    );
    let (link_tx, link_rx) = tokio::sync::watch::channel(false);
    let link_tls = if cfg.replication_tls {
        Some(
            tls.link_server_config()
                .map_err(|e| crate::server::StartError::Config(e.to_string()))?,
        )
    } else {
        None
    };
    // Copies of volumes nobody publishes: no engine scrubs them, so the
    // node reads them itself, on the scrub's schedule and pace, and when
    // asked.
    let idle =
        crate::backend::replicated::idle::IdleChecks::new(Arc::clone(&store), cfg.scrub_rate);
    let sweep = cfg
        .scrub_every
        .map(|every| tokio::spawn(Arc::clone(&idle).sweep(every)));
    let _sweep = AbortOnDrop(sweep);
    let (link, link_task) = serve_link(cfg, listeners.link, store, link_tls, link_rx)?;
    replica = replica.with_link(link).with_idle(idle);
    let served = replica_windows(tonic::transport::Server::builder())
        .tls_config(tls.server_config())?
        .add_service(csi::controller_server::ControllerServer::with_interceptor(
            controller::ControllerService::new(Arc::clone(&driver)),
            controller_only,
        ))
        .add_service(
            csi::group_controller_server::GroupControllerServer::with_interceptor(
                group_controller::GroupControllerService::new(Arc::clone(&driver)),
                controller_only,
            ),
        )
        .add_service(
            csi::snapshot_metadata_server::SnapshotMetadataServer::with_interceptor(
                snapshot_metadata::SnapshotMetadataService::new(Arc::clone(&driver)),
                controller_only,
            ),
        )
        .add_service(
            super::proto::replica_server::ReplicaServer::new(replica)
                .max_decoding_message_size(8 << 20)
                .max_encoding_message_size(8 << 20),
        )
        .add_service(AgentServer::with_interceptor(
            AgentService {
                driver,
                cordon_file: cfg.cordon_file.clone(),
                cordon_lock: Arc::clone(&cfg.cordon_lock),
            },
            controller_only,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = link_tx.send(true);
    let _ = link_task.await;
    served?;
    Ok(())
}

/// The HTTP/2 settings of a server that takes replicated writes: windows
/// and frames for 1 MiB requests (see [`super::replica::STREAM_WINDOW`]).
fn replica_windows(b: tonic::transport::Server) -> tonic::transport::Server {
    b.initial_stream_window_size(super::replica::STREAM_WINDOW)
        .initial_connection_window_size(super::replica::CONNECTION_WINDOW)
        .max_frame_size(super::replica::MAX_FRAME)
}

/// Serves the data link ([`super::link`]) on `listener` (`--data-listen`)
/// until `stop` turns true: mutual TLS with `tls`, plaintext without
/// (replication TLS off). Returns the address engines dial (`tls://` or
/// `tcp://`; `--data-advertise`, or the host of `--advertise` and the port
/// bound) and the serving task.
fn serve_link(
    cfg: &AgentConfig,
    listener: tokio::net::TcpListener,
    store: Arc<crate::backend::replicated::store::ReplicaStore>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(String, tokio::task::JoinHandle<()>), crate::server::StartError> {
    let host = |hp: &str| hp.rsplit_once(':').map_or(hp, |(h, _)| h).to_owned();
    let port = listener
        .local_addr()
        .map_err(|err| crate::server::StartError::Tcp {
            addr: cfg.data_listen.clone(),
            err,
        })?
        .port();
    let scheme = if tls.is_some() { "tls" } else { "tcp" };
    let addr = match &cfg.data_advertise {
        Some(a) => format!("{scheme}://{a}"),
        None => format!("{scheme}://{}:{port}", host(&cfg.advertise)),
    };
    if tls.is_some() {
        tracing::info!(address = %addr, "replication data link listening (mutual TLS)");
    } else {
        tracing::warn!(address = %addr,
            "--replication-tls=off: copies take data requests UNENCRYPTED and UNAUTHENTICATED here (benchmarks only)");
    }
    let task = tokio::spawn(super::link::serve(
        listener,
        tls,
        store,
        stop,
        super::link::ServeThreads::default(),
    ));
    Ok((addr, task))
}

/// Registers with the controller every `cfg.interval`, for ever.
pub async fn register_loop(driver: Arc<Driver>, cfg: AgentConfig, tls: TlsMaterial) {
    let channel = match controller_channel(&cfg.controller, &tls) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(controller = %cfg.controller, error = %e, "cannot dial the controller; not registering");
            return;
        }
    };
    let mut client = RegistryClient::new(channel);
    let mut failing = false;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let serial = cfg.cordon_lock.lock().await;
        let d = Arc::clone(&driver);
        let cordon_file = cfg.cordon_file.clone();
        let facts = tokio::task::spawn_blocking(move || {
            let c = d
                .controller
                .as_ref()
                .expect("node agents open a controller");
            let (free, total) = c.pool_space().unwrap_or((0, 0));
            (
                c.node_id().to_owned(),
                c.topology(),
                free,
                total,
                read_cordon_file(&cordon_file),
            )
        })
        .await;
        let Ok((node_id, topology, free, total, (cordoned, draining))) = facts else {
            continue;
        };
        let req = RegisterRequest {
            node_id,
            advertise: cfg.advertise.clone(),
            topology: topology.into_iter().collect(),
            labels: cfg.labels.clone().into_iter().collect(),
            free_bytes: free,
            total_bytes: total,
            cordoned,
            draining,
            interval_seconds: cfg.interval.as_secs().max(1) as u32,
            version: crate::VENDOR_VERSION.to_owned(),
            max_volumes: driver.node.as_ref().map_or(0, |n| n.max_volumes_per_node()),
        };
        let sent = client.register(req).await;
        drop(serial);
        match sent {
            Ok(_) => {
                if failing {
                    tracing::info!(controller = %cfg.controller, "registered again");
                } else {
                    tracing::debug!(controller = %cfg.controller, "registered");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(controller = %cfg.controller, code = ?e.code(), message = e.message(), "cannot register with the controller; retrying");
                }
                failing = true;
            }
        }
    }
}

/// Why the registration loop cannot dial the controller.
#[derive(Debug, thiserror::Error)]
enum ControllerDialError {
    #[error("invalid controller address {0:?}: expected https://host:port")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// A lazily connected channel to the controller's registration API at
/// `controller` (`https://host:port`), which only the shared certificate
/// may answer: the controller's (see [`controller_only`]).
fn controller_channel(
    controller: &str,
    tls: &TlsMaterial,
) -> Result<tonic::transport::Channel, ControllerDialError> {
    let invalid = || ControllerDialError::Address(controller.to_owned());
    let uri = controller.parse::<http::Uri>().map_err(|_| invalid())?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("https"), Some(a)) => a.as_str(),
        _ => return Err(invalid()),
    };
    let endpoint = super::tls::endpoint(authority).map_err(|_| invalid())?;
    let connector = tls.client_tls()?.connector(ServerRole::Controller);
    Ok(endpoint
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(connector))
}

/// Aborts its task, if any, when dropped (when the agent API stops).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node registers only with a server holding the shared certificate
    /// (the controller's): another node's certificate is UNAVAILABLE,
    /// naming both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_registers_only_with_the_shared_certificate() {
        use crate::cluster::tls::test_servers::{EmptyServer, TestCa};
        let ca = TestCa::new();
        let node = ca.material(Some("n1"));
        let register = |addr: &str| {
            let channel = controller_channel(&format!("https://{addr}"), &node).unwrap();
            async move {
                RegistryClient::new(channel)
                    .register(RegisterRequest::default())
                    .await
                    .unwrap_err()
            }
        };
        for other in [Some("n1"), Some("n9")] {
            let server = EmptyServer::start(&ca.material(other)).await;
            let got = register(&server.addr).await;
            assert_eq!(got.code(), tonic::Code::Unavailable, "{got:?}");
            assert!(
                got.message().contains("presented the certificate of node")
                    && got.message().contains("may answer as the controller"),
                "{got:?}"
            );
        }
        let controller = EmptyServer::start(&ca.material(None)).await;
        let got = register(&controller.addr).await;
        assert_eq!(got.code(), tonic::Code::Unimplemented, "{got:?}");
        assert!(matches!(
            controller_channel("http://127.0.0.1:1", &node),
            Err(ControllerDialError::Address(_))
        ));
    }

    #[test]
    fn the_cordon_file_keeps_cordoned_and_draining_apart() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cordoned");
        assert_eq!(read_cordon_file(&f), (false, false));
        for (cordoned, draining, read) in [
            (true, false, (true, false)),
            (false, true, (true, true)),
            (true, true, (true, true)),
            (false, false, (false, false)),
        ] {
            set_cordon_file(&f, cordoned, draining).unwrap();
            assert_eq!(read_cordon_file(&f), read, "{cordoned} {draining}");
        }
        // A file of an older version (any content) is a cordon.
        std::fs::write(&f, b"").unwrap();
        assert_eq!(read_cordon_file(&f), (true, false));
    }
}
