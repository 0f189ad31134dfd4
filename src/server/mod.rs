//! The gRPC layer: thin tonic services (one file per CSI service) over the
//! domain, the listener (unix socket or TCP), and graceful shutdown.
//! Protobuf types stop here.

pub mod controller;
pub mod convert;
pub mod group_controller;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod snapshot_metadata;
pub mod status;
pub mod to_end;
mod transport;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Response, Status};

use crate::backend::placement::{self, Placement, PoolImageMode};
use crate::backend::{Backends, prepare_pool};
use crate::csi;
use crate::state::Store;
use crate::volume::Error;
use crate::volume::controller::Controller;
use crate::volume::id::valid_node_id;
use crate::volume::node::Node;

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    All,
    Controller,
    Node,
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path`, `unix:/path`, a bare absolute `/path` (as
    /// csi-sanity and the Kubernetes sidecars accept) or `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        if let Some(rest) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if !rest.starts_with('/') {
                return Err(format!("endpoint {s:?}: unix socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            if rest.is_empty() {
                return Err(format!("endpoint {s:?}: missing host:port"));
            }
            return Ok(Endpoint::Tcp(rest.to_owned()));
        }
        Err(format!(
            "endpoint {s:?}: expected unix:///path, an absolute /path or tcp://host:port"
        ))
    }
}

/// Everything `stowage serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: Endpoint,
    pub node_id: String,
    pub driver_name: String,
    pub state_dir: PathBuf,
    pub pool: PathBuf,
    /// Whether the pool may be kept in an xfs image.
    pub pool_image: PoolImageMode,
    pub mode: Mode,
    pub max_volumes_per_node: u64,
    /// Where to serve `/metrics` and `/healthz` (HTTP), if anywhere.
    pub metrics_address: Option<String>,
    /// Many nodes: where the controller and node agents talk (mutual TLS).
    pub cluster: Option<ClusterConfig>,
}

/// `--mode controller` and `--mode node`: the TCP side.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Holds ca.crt, tls.crt and tls.key (`stowage cluster init`).
    pub tls_dir: PathBuf,
    /// Controller: where nodes register (host:port). Node: see `agent`.
    pub listen: String,
    /// Node agents only.
    pub agent: Option<crate::cluster::agent::AgentConfig>,
    /// Controller: a replicated volume's member on a node not heard from
    /// for this long is replaced on another node.
    pub replace_after: std::time::Duration,
    /// Controller: how to heal replicated volumes nobody publishes
    /// (`--replica-heal-idle`, `--replica-heal-rate`); None: never.
    pub heal_idle: Option<crate::cluster::replicated::HealIdle>,
}

/// A startup failure, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "invalid --driver-name {0:?}: 1-63 characters, letters, digits, '-', '.', '_', starting and ending with a letter"
    )]
    DriverName(String),
    #[error(
        "invalid node id {0:?}: 1-63 characters of [A-Za-z0-9._-] starting with a letter or digit (set --node-id)"
    )]
    NodeId(String),
    #[error("another server is listening on {0}")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket {path}: {err}")]
    Socket {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("listen on {addr}: {err}")]
    Tcp {
        addr: String,
        #[source]
        err: std::io::Error,
    },
    #[error("serve metrics on {addr}: {err}")]
    Metrics {
        addr: String,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot prepare the pool: {0}")]
    Pool(#[from] crate::os::pool_image::PoolImageError),
    #[error("cannot open the driver: {0}")]
    Open(#[from] Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cluster TLS material: {0}")]
    Tls(#[from] crate::cluster::tls::TlsError),
    #[error("{0}")]
    Config(String),
}

/// The services' shared state.
#[derive(Debug)]
pub struct Driver {
    pub name: String,
    /// Which services the unix socket serves.
    pub mode: Mode,
    /// The domain controller: served on the unix socket (`--mode all`) or
    /// to the cluster's controller through the agent API (`--mode node`).
    pub controller: Option<Arc<Controller>>,
    pub node: Option<Arc<Node>>,
    pub pool: PathBuf,
    /// What the pool probe chose (reported in GetPluginInfo's manifest).
    pub strategy: crate::os::pool::PoolStrategy,
    /// Whether the pool is kept in an xfs image.
    pub placement: Placement,
    /// The pool's volume stores (shared with the services).
    pub backends: Arc<Backends>,
    /// The state store (shared with the services).
    pub store: Store,
    /// This node's copies of replicated volumes (`--mode node`).
    pub replicas: Option<Arc<crate::backend::replicated::store::ReplicaStore>>,
}

impl Driver {
    /// Opens the state and pool and the services of `mode` (controller
    /// start removes orphaned pool storage; node start restores stagings
    /// and removes leaked loop devices).
    pub fn open(cfg: &Config) -> Result<Self, StartError> {
        if !valid_driver_name(&cfg.driver_name) {
            return Err(StartError::DriverName(cfg.driver_name.clone()));
        }
        if !valid_node_id(&cfg.node_id) {
            return Err(StartError::NodeId(cfg.node_id.clone()));
        }
        let store = Store::open(&cfg.state_dir).map_err(Error::from)?;
        // First of all: nothing a killed predecessor froze stays frozen.
        crate::volume::snapshot::thaw_staged(&store)?;
        let (placement, probed) = placement::place(&cfg.pool, cfg.pool_image)?;
        prepare_pool(&cfg.pool).map_err(Error::from)?;
        let strategy = match probed.map_or_else(|| crate::os::pool::probe(&cfg.pool), Ok) {
            Ok(s) => {
                tracing::info!(pool = %cfg.pool.display(), strategy = %s, "pool probed");
                s
            }
            Err(e) => {
                tracing::warn!(pool = %cfg.pool.display(), error = %e, "cannot probe the pool; using sparse copies");
                crate::os::pool::PoolStrategy {
                    fs: crate::os::pool::PoolFs::Other(0),
                    strategy: crate::os::pool::Strategy::Copy,
                }
            }
        };
        let enforcement = Backends::probe_quota(&cfg.pool, strategy.strategy);
        tracing::info!(dir_capacity = ?enforcement, "dir volume capacity enforcement");
        let backends = Arc::new(
            Backends::with_quota(&cfg.pool, strategy.strategy, enforcement)
                .with_image_host(placement.image_host()),
        );
        if cfg.mode == Mode::Controller {
            return Err(StartError::Config(
                "a routing controller opens no pool".to_owned(),
            ));
        }
        let controller = match cfg.mode {
            Mode::Controller => None,
            mode => {
                let c = Controller::open(
                    &cfg.node_id,
                    cfg.max_volumes_per_node,
                    Arc::clone(&backends),
                    store.clone(),
                )?;
                Some(Arc::new(if mode == Mode::Node {
                    c.with_vouched_nodes()
                } else {
                    c
                }))
            }
        };
        let node = match cfg.mode {
            Mode::All | Mode::Node => Some(Arc::new(Node::open(
                &cfg.node_id,
                cfg.max_volumes_per_node,
                Arc::clone(&backends),
                store.clone(),
            )?)),
            Mode::Controller => None,
        };
        if let Some(n) = &node {
            spawn_object_supervisor(Arc::downgrade(n));
        }
        let replicas = match cfg.mode {
            Mode::Node => Some(Arc::new(
                crate::backend::replicated::store::ReplicaStore::open(&cfg.pool, &cfg.node_id)
                    .map_err(|e| StartError::Config(e.to_string()))?,
            )),
            _ => None,
        };
        Ok(Self {
            replicas,
            name: cfg.driver_name.clone(),
            mode: cfg.mode,
            controller,
            node,
            pool: cfg.pool.clone(),
            strategy,
            placement,
            backends,
            store,
        })
    }

    /// The pool's size and the bytes new volumes can still get (bounded by
    /// the pool image's host, as GetCapacity is).
    pub fn pool_capacity(&self) -> std::io::Result<(u64, u64)> {
        let total = crate::os::fs::usage(&self.pool)?.total_bytes;
        Ok((total, self.backends.available_bytes()?))
    }

    /// Ready when every opened service can use its pool and state.
    pub fn check_ready(&self) -> Result<(), String> {
        let probe = self.pool.join(".probe");
        crate::os::fs::write_atomic(&probe, b"ok")
            .map_err(|e| format!("pool {} is not writable: {e}", self.pool.display()))?;
        let _ = std::fs::remove_file(&probe);
        if let Some(c) = &self.controller {
            c.check_ready()?;
        }
        if let Some(n) = &self.node {
            n.check_ready()?;
        }
        Ok(())
    }
}

/// CSI plugin names: domain-name-like, at most 63 characters.
pub fn valid_driver_name(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=63).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
}

/// Every two seconds, mounts again the object volumes whose FUSE daemon
/// died (see [`Node::supervise_object_mounts`]); stops with the node.
fn spawn_object_supervisor(node: std::sync::Weak<Node>) {
    let spawned = std::thread::Builder::new()
        .name("object-mounts".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(2));
                match node.upgrade() {
                    Some(n) => n.supervise_object_mounts(),
                    None => break,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the object mount supervisor");
    }
}

/// Runs a domain operation on the blocking pool (it makes syscalls and may
/// run mkfs) and logs its outcome and duration.
pub(crate) async fn blocking<T, F>(rpc: &'static str, f: F) -> Result<Response<T>, Status>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    let start = Instant::now();
    let outcome = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("{rpc} failed: {e}")))?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(v) => {
            tracing::debug!(rpc, elapsed_ms = ms, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let s = Status::from(e);
            tracing::info!(rpc, elapsed_ms = ms, code = ?s.code(), message = s.message(), "failed");
            Err(s)
        }
    }
}

/// Fails when a server answers on `path`.
fn refuse_live_socket(path: &Path) -> Result<(), StartError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(StartError::SocketInUse(path.to_owned()));
    }
    Ok(())
}

/// Binds the unix socket: a stale socket file is removed, a live one (a
/// server answers) is refused, and the new socket is owner-only.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, StartError> {
    let sock_err = |err| StartError::Socket {
        path: path.to_owned(),
        err,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sock_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StartError::SocketInUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => return Err(StartError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(sock_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    Ok(listener)
}

/// The least time between the beginnings of two rounds of the
/// controller's repairs of replicated volumes, when one is asked for early.
const ROUNDS_APART: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the node looks for replicated copies to close clean, and how
/// long a copy must have gone unwritten for it (see
/// `backend::replicated::store`: a copy closed clean survives a crash of
/// this process without a rebuild).
const CLEAN_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
const CLEAN_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves once SIGTERM or SIGINT arrives; every server of the process
/// waits on a clone.
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = tx.send(true);
    });
    rx
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Until `stop` is set, or until `ended` ends (its sender is dropped: the
/// server the endpoint depends on stopped).
async fn stopped_or(
    stop: tokio::sync::watch::Receiver<bool>,
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
) {
    match ended {
        Some(ended) => {
            tokio::select! {
                _ = stopped(stop) => {}
                _ = ended => {}
            }
        }
        None => stopped(stop).await,
    }
}

/// Accepted TCP connections with Nagle's algorithm off (and keepalive
/// probes on): gRPC answers are small writes, and with Nagle each answer
/// after the first waits for the peer's delayed ACK (~40 ms).
pub(crate) fn tcp_incoming(
    listener: tokio::net::TcpListener,
) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(30)))
}

/// The CSI services' router, behind the per-RPC metrics layer (inert when
/// metrics are off) and [`to_end::RunToEndLayer`] (each call runs to its
/// end).
type CsiRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<
        to_end::RunToEndLayer,
        tower::layer::util::Stack<metrics::RpcMetricsLayer, tower::layer::util::Identity>,
    >,
>;

/// Serves `router` on the CSI endpoint until shutdown.
async fn serve_endpoint(
    router: CsiRouter,
    endpoint: &Endpoint,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(endpoint = %path.display(), "listening");
            // Through the `:authority` rewrite: h2 refuses what gRPC
            // C-core and grpc-java send on a unix socket.
            let incoming = transport::incoming(listener);
            let r = router.serve_with_incoming_shutdown(incoming, stop).await;
            let _ = std::fs::remove_file(path);
            r?;
        }
        Endpoint::Tcp(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|err| StartError::Tcp {
                        addr: addr.clone(),
                        err,
                    })?;
            tracing::info!(endpoint = %addr, "listening");
            let incoming = tcp_incoming(listener);
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        }
    }
    Ok(())
}

/// Serves until SIGTERM or SIGINT, then stops accepting, lets in-flight
/// RPCs finish and returns.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    if cfg.mode == Mode::Controller {
        return run_router(cfg).await;
    }
    // A second server must fail on the socket, not half-way through
    // opening the state the first one holds. The socket itself is bound
    // only once the driver is open (restored), so a client that can
    // connect gets a ready driver.
    if let Endpoint::Unix(path) = &cfg.endpoint {
        refuse_live_socket(path)?;
    }
    let tls = match (&cfg.mode, &cfg.cluster) {
        (Mode::Node, Some(c)) => Some(crate::cluster::tls::TlsMaterial::load(&c.tls_dir)?),
        (Mode::Node, None) => {
            return Err(StartError::Config(
                "--mode node needs --listen, --controller and --tls-dir".to_owned(),
            ));
        }
        _ => None,
    };
    let cfg2 = cfg.clone();
    let driver = tokio::task::spawn_blocking(move || Driver::open(&cfg2))
        .await
        .expect("driver open does not panic")?;
    let driver = Arc::new(driver);
    tracing::info!(
        name = %driver.name,
        version = crate::VENDOR_VERSION,
        node = %cfg.node_id,
        mode = ?cfg.mode,
        pool = %cfg.pool.display(),
        state = %cfg.state_dir.display(),
        "stowage starting"
    );

    // Metrics are served before the socket is bound: a client that can
    // connect can scrape too.
    let metrics = cfg
        .metrics_address
        .as_ref()
        .map(|_| metrics::Metrics::new(Arc::clone(&driver)));
    let metrics_task = serve_metrics(cfg.metrics_address.as_deref(), metrics.as_ref()).await?;
    let layer = metrics.as_ref().map(|m| m.layer()).unwrap_or_default();

    let mut router = tonic::transport::Server::builder()
        .layer(layer)
        .layer(to_end::RunToEndLayer)
        .add_service(csi::identity_server::IdentityServer::new(
            identity::IdentityService {
                driver: Arc::clone(&driver),
            },
        ));
    if driver.mode == Mode::All {
        router = router
            .add_service(csi::controller_server::ControllerServer::new(
                controller::ControllerService {
                    driver: Arc::clone(&driver),
                },
            ))
            .add_service(csi::group_controller_server::GroupControllerServer::new(
                group_controller::GroupControllerService {
                    driver: Arc::clone(&driver),
                },
            ))
            .add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(
                snapshot_metadata::SnapshotMetadataService {
                    driver: Arc::clone(&driver),
                },
            ));
    }
    if driver.node.is_some() {
        router = router.add_service(csi::node_server::NodeServer::new(node::NodeService {
            driver: Arc::clone(&driver),
        }));
    }

    let stop = shutdown_signal();
    if let (Some(tls), Some(node), Some(replicas)) = (&tls, &driver.node, &driver.replicas) {
        let agent = cfg.cluster.as_ref().and_then(|c| c.agent.as_ref());
        let plaintext = agent.is_some_and(|a| !a.replication_tls);
        if let Some(a) = agent {
            node.replicated().set_fuse_workers(a.fuse_workers);
            node.replicated().set_scrub(a.scrub_every, a.scrub_rate);
        }
        node.replicated().set_connector(replication_connector(
            Arc::clone(replicas),
            tls,
            plaintext,
        )?);
    }
    // The agent's ports are bound before the node registers and before the
    // CSI socket is: a node that cannot listen fails to start rather than
    // register an address nobody answers on. Should the agent API stop
    // while the node runs, the node stops too (`agent_ended`).
    let (agent, agent_ended) = match (tls, cfg.cluster.as_ref().and_then(|c| c.agent.clone())) {
        (Some(tls), Some(agent)) => {
            let listeners = crate::cluster::agent::bind_agent(&agent).await?;
            tokio::spawn(crate::cluster::agent::register_loop(
                Arc::clone(&driver),
                agent.clone(),
                tls.clone(),
            ));
            let (d, s) = (Arc::clone(&driver), stop.clone());
            let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let _ended = ended_tx;
                let r = crate::cluster::agent::serve_agent(d, &agent, &tls, listeners, stopped(s))
                    .await;
                if let Err(e) = &r {
                    tracing::error!(error = %e, "the agent API stopped: stopping the node");
                }
                r
            });
            (Some(task), Some(ended))
        }
        _ => (None, None),
    };
    let idle_closer = driver.replicas.clone().map(|replicas| {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLEAN_CHECK).await;
                let r = Arc::clone(&replicas);
                match tokio::task::spawn_blocking(move || r.close_idle(CLEAN_AFTER_IDLE)).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(copies = n, "idle replicated copies closed clean"),
                    Err(e) => tracing::error!(error = %e, "closing idle replicated copies failed"),
                }
            }
        })
    });
    let served = serve_endpoint(router, &cfg.endpoint, stopped_or(stop, agent_ended)).await;
    if let Some(t) = idle_closer {
        t.abort();
    }
    if let Some(a) = agent {
        match a.await {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "agent API task failed"),
        }
    }
    if let Some(replicas) = driver.replicas.clone() {
        // Synced and marked, the copies keep their boot in the next
        // process: engines need not rebuild them.
        match tokio::task::spawn_blocking(move || replicas.close_all()).await {
            Ok(n) => tracing::info!(copies = n, "replicated copies closed clean"),
            Err(e) => tracing::error!(error = %e, "closing the replicated copies failed"),
        }
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// How this node's engines reach the copies of replicated volumes: the
/// local store directly, other nodes' agents and data links over mutual
/// TLS with this node's certificate (data requests in plaintext to nodes
/// that offer it when `plaintext`: `--replication-tls=off`).
fn replication_connector(
    local: Arc<crate::backend::replicated::store::ReplicaStore>,
    tls: &crate::cluster::tls::TlsMaterial,
    plaintext: bool,
) -> Result<crate::backend::replicated::engines::Connector, StartError> {
    let client = tls.client_tls()?;
    let link = tls
        .link_client_config()
        .map_err(|e| StartError::Config(e.to_string()))?;
    Ok(Arc::new(move |addresses| {
        Arc::new(crate::cluster::replica::GrpcPeer::new(
            Some(Arc::clone(&local)),
            addresses.clone(),
            client.clone(),
            Arc::clone(&link),
            plaintext,
            std::time::Duration::from_secs(2),
        ))
    }))
}

/// Binds `addr` and serves `m`'s `/metrics` and `/healthz` there, when
/// both are given.
async fn serve_metrics(
    addr: Option<&str>,
    m: Option<&Arc<metrics::Metrics>>,
) -> Result<Option<tokio::task::JoinHandle<()>>, StartError> {
    let (Some(addr), Some(m)) = (addr, m) else {
        return Ok(None);
    };
    let listener =
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|err| StartError::Metrics {
                addr: addr.to_owned(),
                err,
            })?;
    let local = listener
        .local_addr()
        .map_or(addr.to_owned(), |a| a.to_string());
    tracing::info!(address = %local, "serving /metrics and /healthz");
    Ok(Some(tokio::spawn(Arc::clone(m).serve(listener))))
}

/// `--mode controller`: the routing controller on the CSI endpoint and the
/// registration API on `--listen`. Opens no pool and no state. Should the
/// registration API stop while the controller runs, the CSI endpoint
/// stops too: a controller no node can register with routes to nobody.
async fn run_router(cfg: Config) -> Result<(), StartError> {
    use crate::cluster::{proto, registry::Registry, router};
    let Some(cluster) = cfg.cluster.clone() else {
        return Err(StartError::Config(
            "--mode controller needs --listen and --tls-dir".to_owned(),
        ));
    };
    if !valid_driver_name(&cfg.driver_name) {
        return Err(StartError::DriverName(cfg.driver_name.clone()));
    }
    if let Endpoint::Unix(path) = &cfg.endpoint {
        refuse_live_socket(path)?;
    }
    let tls = crate::cluster::tls::TlsMaterial::load(&cluster.tls_dir)?;
    let registry = Arc::new(Registry::new(tls.client_tls()?));
    let router = router::Router::new(Arc::clone(&registry), cfg.driver_name.clone());
    tracing::info!(
        name = %cfg.driver_name,
        version = crate::VENDOR_VERSION,
        listen = %cluster.listen,
        "stowage controller starting"
    );
    let stop = shutdown_signal();
    let replacer = {
        let (router, after, heal) = (router.clone(), cluster.replace_after, cluster.heal_idle);
        let every = (after / 4).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(30),
        );
        tokio::spawn(async move {
            let mut began = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = router.round_wanted() => {
                        // Asked for early: still never more than one round
                        // a second, whatever asks.
                        tokio::time::sleep_until(began + ROUNDS_APART).await;
                    }
                }
                began = tokio::time::Instant::now();
                router.replace_lost_members(after, heal).await;
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(&cluster.listen)
        .await
        .map_err(|err| StartError::Tcp {
            addr: cluster.listen.clone(),
            err,
        })?;
    tracing::info!(listen = %cluster.listen, "registration API listening (mutual TLS)");
    let registration = tonic::transport::Server::builder()
        .tls_config(tls.server_config())?
        .add_service(proto::registry_server::RegistryServer::new(
            router::RegistryService {
                registry: Arc::clone(&registry),
                names: Arc::clone(&router.names),
                replicated: router.replicated(),
            },
        ))
        .serve_with_incoming_shutdown(tcp_incoming(listener), stopped(stop.clone()));
    let metrics = cfg
        .metrics_address
        .as_ref()
        .map(|_| metrics::Metrics::for_router(Arc::clone(&registry), router.replicated_health()));
    let metrics_task = serve_metrics(cfg.metrics_address.as_deref(), metrics.as_ref()).await?;
    let csi_router = tonic::transport::Server::builder()
        .layer(metrics.as_ref().map(|m| m.layer()).unwrap_or_default())
        .layer(to_end::RunToEndLayer)
        .add_service(csi::identity_server::IdentityServer::new(router.clone()))
        .add_service(csi::controller_server::ControllerServer::new(
            router.clone(),
        ))
        .add_service(csi::group_controller_server::GroupControllerServer::new(
            router.clone(),
        ))
        .add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(
            router.clone(),
        ))
        .add_service(proto::admin_server::AdminServer::new(router));
    let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
    let (a, b) = tokio::join!(
        async move {
            let _ended = ended_tx;
            let r = registration.await.map_err(StartError::from);
            if let Err(e) = &r {
                tracing::error!(error = %e, "the registration API stopped: stopping the controller");
            }
            r
        },
        serve_endpoint(csi_router, &cfg.endpoint, stopped_or(stop, Some(ended)))
    );
    if let Some(t) = metrics_task {
        t.abort();
    }
    replacer.abort();
    a?;
    b?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSI endpoint's stop: a signal, or the end of the server it
    /// needs (the agent API of a node, the registration API of a
    /// controller), whichever comes first; neither, and it goes on.
    #[tokio::test]
    async fn an_endpoint_stops_with_the_server_it_needs_or_a_signal() {
        use std::time::Duration;
        let once = Duration::ZERO;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
        let mut until = Box::pin(stopped_or(stop.clone(), Some(ended)));
        assert!(tokio::time::timeout(once, &mut until).await.is_err());
        drop(ended_tx);
        assert!(tokio::time::timeout(once, &mut until).await.is_ok());

        let (_ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
        let mut until = Box::pin(stopped_or(stop.clone(), Some(ended)));
        let mut alone = Box::pin(stopped_or(stop, None));
        assert!(tokio::time::timeout(once, &mut until).await.is_err());
        assert!(tokio::time::timeout(once, &mut alone).await.is_err());
        stop_tx.send(true).unwrap();
        assert!(tokio::time::timeout(once, &mut until).await.is_ok());
        assert!(tokio::time::timeout(once, &mut alone).await.is_ok());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:///run/x.sock"),
            Ok(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:1"),
            Ok(Endpoint::Tcp("127.0.0.1:1".into()))
        );
        assert_eq!(
            Endpoint::parse("/run/x.sock"),
            Ok(Endpoint::Unix("/run/x.sock".into()))
        );
        assert!(Endpoint::parse("unix://rel.sock").is_err());
        assert!(Endpoint::parse("rel.sock").is_err());
        assert!(Endpoint::parse("http://x").is_err());
    }

    #[test]
    fn driver_names() {
        assert!(valid_driver_name("stowage.csi.dev"));
        assert!(!valid_driver_name("1abc"));
        assert!(!valid_driver_name("abc1"));
        assert!(!valid_driver_name(&"a".repeat(64)));
    }
}
