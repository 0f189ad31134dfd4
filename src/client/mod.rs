//! The client commands (`stowage plugin|volume|snapshot …`): plain CSI calls
//! over a driver's socket, printed as tables for people or JSON for scripts.
//! Only CSI calls and capability discovery are used — never stowage
//! internals — so the same commands work against any CSI driver. The one
//! exception is `status` (its own module), which reads stowage's local
//! state and the system for operators of stowage itself.

pub mod apply;
pub mod cluster;
pub mod created;
pub mod node;
pub mod output;
pub mod plugin;
pub mod progress;
pub mod publish;
pub mod secrets;
pub mod size;
pub mod snapshot;
pub mod status;
pub mod volume;

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;

use crate::csi;
use crate::csi::controller_client::ControllerClient;
use crate::csi::group_controller_client::GroupControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::server::Endpoint;

/// Where the client connects when no `--endpoint` is given.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/stowage/csi.sock";

/// How long one call may wait for its answer when `--request-timeout` is
/// not given: the kubelet's bound on a node call.
pub const DEFAULT_CALL_LIMIT: Duration = Duration::from_secs(120);

/// HTTP/2 pings while a call is in flight: a server that stops answering
/// them (its process frozen, its host gone) fails the call within
/// interval + timeout, also with no call limit.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--request-timeout`: how long one call may wait for its answer; `None`
/// waits as long as the server keeps the connection alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimit(pub Option<Duration>);

impl Default for CallLimit {
    fn default() -> Self {
        CallLimit(Some(DEFAULT_CALL_LIMIT))
    }
}

/// `30s`, `5m`, `1h`, or `0` for no limit.
pub fn parse_call_limit(s: &str) -> Result<CallLimit, String> {
    if s.trim() == "0" {
        return Ok(CallLimit(None));
    }
    stowage_sidecars::schedule::parse_duration(s)
        .map(|secs| CallLimit(Some(Duration::from_secs(secs))))
        .map_err(|e| format!("{e} (or 0 for no limit)"))
}

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// Flags every client command accepts, before the noun or after the verb.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// The CSI endpoint: unix:///path/csi.sock, /path/csi.sock or
    /// tcp://host:port [default: unix:///run/stowage/csi.sock]
    #[arg(long, global = true)]
    pub endpoint: Option<String>,
    /// Where the CSI Controller service is, when not at --endpoint: on a
    /// node of a cluster, the controller's socket (controller calls go
    /// there, node calls to --endpoint)
    #[arg(long, global = true)]
    pub controller_endpoint: Option<String>,
    /// Output format [default: table]
    #[arg(short = 'o', long = "output", value_enum, global = true)]
    pub output: Option<OutputFormat>,
    /// How long one call may wait for its answer (30s, 5m, 1h), 0 for no
    /// limit; a call that outlives it fails with DEADLINE_EXCEEDED and may
    /// still finish on the server [default: 2m]
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_call_limit)]
    pub request_timeout: Option<CallLimit>,
}

impl GlobalArgs {
    /// These flags, with any left unset taken from `outer` (the flags given
    /// before the noun).
    pub fn or(&self, outer: &GlobalArgs) -> GlobalArgs {
        GlobalArgs {
            endpoint: self.endpoint.clone().or_else(|| outer.endpoint.clone()),
            controller_endpoint: self
                .controller_endpoint
                .clone()
                .or_else(|| outer.controller_endpoint.clone()),
            output: self.output.or(outer.output),
            request_timeout: self.request_timeout.or(outer.request_timeout),
        }
    }

    fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT)
    }

    fn format(&self) -> OutputFormat {
        self.output.unwrap_or_default()
    }

    pub fn call_limit(&self) -> CallLimit {
        self.request_timeout.unwrap_or_default()
    }

    async fn session(&self) -> Result<Session, ClientError> {
        Session::connect_split(
            self.endpoint(),
            self.controller_endpoint.as_deref(),
            self.call_limit(),
        )
        .await
    }
}

/// The client nouns.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Ask the plugin who it is and what it can do.
    Plugin(plugin::PluginArgs),
    /// Create, inspect, expand and delete volumes.
    Volume(volume::VolumeArgs),
    /// Create, inspect and delete snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// The nodes of a cluster (against a `--mode controller` socket).
    Node(node::NodeArgs),
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Endpoint(String),
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The socket file is there and nothing accepts on it (ECONNREFUSED):
    /// a server that died (kill -9, a crash) leaves its socket behind.
    #[error(
        "no server is running on {}: the socket file exists but nothing is listening \
         (start `stowage serve --endpoint unix://{}`, or check its log)",
        .path.display(), .path.display()
    )]
    DeadSocket { path: PathBuf },
    /// No socket file (ENOENT).
    #[error(
        "no server is running on {}: there is no socket there \
         (start `stowage serve --endpoint unix://{}`, or give the right --endpoint)",
        .path.display(), .path.display()
    )]
    NoSocket { path: PathBuf },
    /// EACCES/EPERM on the socket or a directory above it.
    #[error(
        "permission denied on {} (the socket, or a directory above it; stowage serve makes \
         its socket root's, mode 0600): run this command as root (e.g. with sudo)",
        .path.display()
    )]
    SocketPermission { path: PathBuf },
    #[error("{call} failed: {} ({}): {}", code_name(.status.code()), .status.code().description(), .status.message())]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("NOT_FOUND (some requested entity was not found): {kind} {id:?} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("the plugin answered Probe: not ready")]
    NotReady,
    #[error("{call} returned no {what}")]
    EmptyResponse {
        call: &'static str,
        what: &'static str,
    },
    #[error("{0}")]
    Local(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot write JSON output")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
}

impl ClientError {
    /// 2 for usage errors (a bad endpoint), 1 for everything else,
    /// gRPC errors included.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Endpoint(_) => 2,
            ClientError::Connect { .. }
            | ClientError::DeadSocket { .. }
            | ClientError::NoSocket { .. }
            | ClientError::SocketPermission { .. }
            | ClientError::Rpc { .. }
            | ClientError::NotFound { .. }
            | ClientError::EmptyResponse { .. }
            | ClientError::NotReady
            | ClientError::Local(_)
            | ClientError::Io { .. }
            | ClientError::Runtime(_)
            | ClientError::Json(_)
            | ClientError::Secrets(_) => 1,
        }
    }

    /// The error and its causes, for stderr. A local file or directory
    /// refused with EACCES/EPERM gets what to do appended: the client's
    /// records and stowage's state are root's.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut denied = false;
        // A failed call's status carries the transport's error (e.g. the
        // connection's pings unanswered) as its source.
        let mut source = match self {
            ClientError::Rpc { status, .. } => std::error::Error::source(status),
            _ => std::error::Error::source(self),
        };
        while let Some(s) = source {
            // Transport errors repeat their cause in their own text.
            let part = s.to_string();
            if !text.contains(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
            denied |= s
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| is_permission_denied(e.kind()));
            source = s.source();
        }
        if denied {
            text.push_str(PERMISSION_HINT);
        }
        text
    }
}

/// What to do about a permission error, appended to its report.
pub const PERMISSION_HINT: &str = " (permission denied: stowage's state, sockets and the client's \
     records are root's; run this command as root, e.g. with sudo)";

/// EACCES and EPERM (std maps both to `PermissionDenied`).
pub fn is_permission_denied(kind: std::io::ErrorKind) -> bool {
    kind == std::io::ErrorKind::PermissionDenied
}

pub use crate::server::convert::code_name;

/// Maps a failed call's status into [`ClientError::Rpc`].
pub(crate) fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
    move |status| ClientError::Rpc { call, status }
}

/// A channel whose calls each wait at most their limit for an answer.
/// One that waits longer fails with DEADLINE_EXCEEDED, saying that the
/// server may still finish it: CSI calls are idempotent, so the same call
/// again learns the outcome (or is ABORTED while it still runs).
#[derive(Debug, Clone)]
pub struct Conn {
    channel: Channel,
    limit: CallLimit,
}

impl Conn {
    /// Dials `endpoint` ([`channel`]); each call waits at most `limit`.
    pub async fn dial(endpoint: &str, limit: CallLimit) -> Result<Conn, ClientError> {
        Ok(Conn {
            channel: channel(endpoint).await?,
            limit,
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.channel.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let answer = self.channel.call(request);
        let CallLimit(limit) = self.limit;
        Box::pin(async move {
            let Some(limit) = limit else {
                return answer.await.map_err(Into::into);
            };
            match tokio::time::timeout(limit, answer).await {
                Ok(r) => r.map_err(Into::into),
                // tonic finds a Status in the error and reports it as is.
                Err(_) => Err(Box::new(no_answer(limit)) as BoxError),
            }
        })
    }
}

/// The status of a call that had no answer within `limit`.
fn no_answer(limit: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!(
        "no answer within {} (--request-timeout); the server may still finish the call: \
         run the same command again to learn its outcome",
        stowage_sidecars::schedule::format_duration(limit.as_secs())
    ))
}

/// gRPC clients for the three CSI services, on one channel.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: IdentityClient<Conn>,
    pub controller: ControllerClient<Conn>,
    /// The GroupController service, beside the Controller service.
    pub group: GroupControllerClient<Conn>,
    pub node: NodeClient<Conn>,
    /// A cluster controller's Admin service, beside the Controller service
    /// (`stowage volume scrub`).
    pub admin: crate::cluster::proto::admin_client::AdminClient<Conn>,
}

impl Session {
    /// Connects to `unix:///path`, `unix:/path`, `/path` or
    /// `tcp://host:port`, with the Controller service at `controller` when
    /// given (a cluster's controller socket; Identity and Node stay at
    /// `endpoint`). Each call waits at most `limit` for its answer.
    pub async fn connect_split(
        endpoint: &str,
        controller: Option<&str>,
        limit: CallLimit,
    ) -> Result<Session, ClientError> {
        let channel = Conn::dial(endpoint, limit).await?;
        let controller_channel = match controller {
            Some(c) => Conn::dial(c, limit).await?,
            None => channel.clone(),
        };
        Ok(Session {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(controller_channel.clone()),
            group: GroupControllerClient::new(controller_channel.clone()),
            admin: crate::cluster::proto::admin_client::AdminClient::new(controller_channel),
            node: NodeClient::new(channel),
        })
    }

    /// ControllerModifyVolume, refused locally when the plugin does not
    /// offer MODIFY_VOLUME.
    pub async fn modify_volume(
        &mut self,
        id: &str,
        mutable_parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        use crate::csi::controller_service_capability::rpc::Type as ControllerRpc;
        if !self
            .controller_rpcs()
            .await?
            .contains(&ControllerRpc::ModifyVolume)
        {
            return Err(ClientError::Local(
                "the plugin does not offer MODIFY_VOLUME (ControllerModifyVolume)".into(),
            ));
        }
        self.controller
            .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: id.to_owned(),
                mutable_parameters: mutable_parameters.clone().into_iter().collect(),
                ..Default::default()
            })
            .await
            .map_err(rpc("ControllerModifyVolume"))?;
        Ok(())
    }

    /// The plugin's capabilities (GetPluginCapabilities).
    pub async fn plugin_capabilities(&mut self) -> Result<Vec<csi::PluginCapability>, ClientError> {
        Ok(self
            .identity
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .map_err(rpc("GetPluginCapabilities"))?
            .into_inner()
            .capabilities)
    }

    /// Where a single-host CO asks for a new volume: on the node behind this
    /// endpoint, when the plugin declares VOLUME_ACCESSIBILITY_CONSTRAINTS
    /// and its node reports a topology; otherwise no requirement.
    pub async fn local_topology(
        &mut self,
    ) -> Result<Option<csi::TopologyRequirement>, ClientError> {
        use csi::plugin_capability::{Type, service};
        let wants_topology = self.plugin_capabilities().await?.iter().any(|c| {
            matches!(&c.r#type, Some(Type::Service(sv))
                if sv.r#type == service::Type::VolumeAccessibilityConstraints as i32)
        });
        if wants_topology
            && let Ok(info) = self.node.node_get_info(csi::NodeGetInfoRequest {}).await
            && let Some(t) = info.into_inner().accessible_topology
        {
            return Ok(Some(csi::TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t],
            }));
        }
        Ok(None)
    }

    /// The controller RPCs the plugin offers; empty when it serves no
    /// controller (UNIMPLEMENTED).
    pub async fn controller_rpcs(
        &mut self,
    ) -> Result<Vec<csi::controller_service_capability::rpc::Type>, ClientError> {
        use csi::controller_service_capability::Type;
        let caps = match self
            .controller
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
        {
            Ok(r) => r.into_inner().capabilities,
            Err(s) if s.code() == tonic::Code::Unimplemented => vec![],
            Err(s) => return Err(rpc("ControllerGetCapabilities")(s)),
        };
        Ok(caps
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(Type::Rpc(r)) => r.r#type.try_into().ok(),
                None => None,
            })
            .collect())
    }

    /// The node RPCs the plugin offers; empty when it serves no node
    /// (UNIMPLEMENTED).
    pub async fn node_rpcs(
        &mut self,
    ) -> Result<Vec<csi::node_service_capability::rpc::Type>, ClientError> {
        use csi::node_service_capability::Type;
        let caps = match self
            .node
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
        {
            Ok(r) => r.into_inner().capabilities,
            Err(s) if s.code() == tonic::Code::Unimplemented => vec![],
            Err(s) => return Err(rpc("NodeGetCapabilities")(s)),
        };
        Ok(caps
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(Type::Rpc(r)) => r.r#type.try_into().ok(),
                None => None,
            })
            .collect())
    }
}

/// One gRPC channel to `unix:///path`, `unix:/path`, `/path` or
/// `tcp://host:port`:
/// the single place the project (client, benchmarks, tests) dials a CSI
/// endpoint.
pub async fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    let parsed = Endpoint::parse(endpoint).map_err(ClientError::Endpoint)?;
    let connect_err = |source| ClientError::Connect {
        endpoint: endpoint.to_owned(),
        source,
    };
    match parsed {
        Endpoint::Tcp(addr) => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map(with_keepalive)
            .map_err(connect_err)?
            .connect()
            .await
            .map_err(connect_err),
        Endpoint::Unix(path) => {
            // The connector's own error, to say what is wrong in words.
            let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
            match unix_channel(path.clone(), seen.clone()).await {
                Ok(c) => Ok(c),
                Err(e) => {
                    let kind = *seen.lock().unwrap_or_else(|p| p.into_inner());
                    Err(match kind.map(|k| (k, unix_connect_error(k, &path))) {
                        Some((_, Some(err))) => err,
                        _ => connect_err(e),
                    })
                }
            }
        }
    }
}

/// `endpoint` with the client's HTTP/2 pings ([`KEEPALIVE_INTERVAL`],
/// [`KEEPALIVE_TIMEOUT`]).
fn with_keepalive(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
}

/// The error to report for a failed connect to a unix socket, when its
/// cause has a plainer name than the transport's.
fn unix_connect_error(kind: std::io::ErrorKind, path: &std::path::Path) -> Option<ClientError> {
    use std::io::ErrorKind;
    let path = path.to_owned();
    match kind {
        ErrorKind::ConnectionRefused => Some(ClientError::DeadSocket { path }),
        ErrorKind::NotFound => Some(ClientError::NoSocket { path }),
        k if is_permission_denied(k) => Some(ClientError::SocketPermission { path }),
        _ => None,
    }
}

async fn unix_channel(
    path: PathBuf,
    seen: std::sync::Arc<std::sync::Mutex<Option<std::io::ErrorKind>>>,
) -> Result<Channel, tonic::transport::Error> {
    // The URI is a placeholder: the connector below ignores it.
    with_keepalive(tonic::transport::Endpoint::from_static("http://[::]:50051"))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            let seen = seen.clone();
            async move {
                match tokio::net::UnixStream::connect(path).await {
                    Ok(s) => Ok(hyper_util::rt::TokioIo::new(s)),
                    Err(e) => {
                        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.kind());
                        Err(e)
                    }
                }
            }
        }))
        .await
}

/// Runs one client command to completion. `outer` holds the flags given
/// before the noun.
pub fn run(command: ClientCommand, outer: &GlobalArgs) -> Result<(), ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(async {
        match command {
            ClientCommand::Plugin(args) => {
                let g = args.globals.or(outer);
                let mut s = g.session().await?;
                plugin::run(&mut s, args.verb, g.format()).await
            }
            ClientCommand::Volume(args) => {
                let g = args.globals.or(outer);
                let mut s = g.session().await?;
                volume::run(&mut s, args.verb, g.format()).await
            }
            ClientCommand::Snapshot(args) => {
                let g = args.globals.or(outer);
                let mut s = g.session().await?;
                snapshot::run(&mut s, args.verb, g.format()).await
            }
            ClientCommand::Node(args) => {
                let g = args.globals.or(outer);
                node::run(g.endpoint(), g.call_limit(), args.verb, g.format()).await
            }
        }
    })
}

/// Parses `KEY=VALUE` (for `--param`).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_needs_a_key_and_an_equals_sign() {
        assert_eq!(
            parse_key_value("backend=dir"),
            Ok(("backend".into(), "dir".into()))
        );
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(
            parse_key_value("empty="),
            Ok(("empty".into(), String::new()))
        );
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
    }

    #[test]
    fn inner_flags_win_over_outer_ones() {
        let outer = GlobalArgs {
            endpoint: Some("unix:///a".into()),
            controller_endpoint: Some("unix:///c".into()),
            output: Some(OutputFormat::Json),
            request_timeout: Some(CallLimit(None)),
        };
        let inner = GlobalArgs {
            endpoint: Some("unix:///b".into()),
            controller_endpoint: None,
            output: None,
            request_timeout: None,
        };
        let g = inner.or(&outer);
        assert_eq!(g.endpoint(), "unix:///b");
        assert_eq!(g.controller_endpoint.as_deref(), Some("unix:///c"));
        assert_eq!(g.format(), OutputFormat::Json);
        assert_eq!(g.call_limit(), CallLimit(None));
        let inner = GlobalArgs {
            request_timeout: Some(CallLimit(Some(Duration::from_secs(5)))),
            ..GlobalArgs::default()
        };
        assert_eq!(
            inner.or(&outer).call_limit(),
            CallLimit(Some(Duration::from_secs(5)))
        );
        assert_eq!(GlobalArgs::default().endpoint(), DEFAULT_ENDPOINT);
        assert_eq!(GlobalArgs::default().format(), OutputFormat::Table);
        assert_eq!(
            GlobalArgs::default().call_limit(),
            CallLimit(Some(DEFAULT_CALL_LIMIT))
        );
    }

    #[test]
    fn call_limit_is_a_duration_or_0_for_none() {
        assert_eq!(parse_call_limit("0"), Ok(CallLimit(None)));
        assert_eq!(
            parse_call_limit("90s"),
            Ok(CallLimit(Some(Duration::from_secs(90))))
        );
        assert_eq!(
            parse_call_limit("5m"),
            Ok(CallLimit(Some(Duration::from_secs(300))))
        );
        for bad in ["", "5", "0s", "-1s", "1.5s", "soon"] {
            let e = parse_call_limit(bad).expect_err(bad);
            assert!(e.contains("0 for no limit"), "{bad}: {e}");
        }
    }

    #[test]
    fn no_answer_says_the_limit_and_what_to_do() {
        let s = no_answer(Duration::from_secs(120));
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(
            s.message().contains("no answer within 2m"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("run the same command again"));
    }
}
