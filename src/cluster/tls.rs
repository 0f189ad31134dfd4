//! TLS between stowage processes: making the cluster CA and certificates
//! (`stowage cluster init|issue`), loading them from a `--tls-dir`, the
//! server and client configurations (mutual TLS 1.3 under the cluster CA,
//! never plaintext, never anonymous), who a peer is from its verified
//! certificate, and whether the server a client reached is the one it
//! meant. It never overwrites a key or certificate, and the CA key is read
//! only by `issue_node`, never at run time.
//!
//! Identities live in URI subject alternative names: `stowage://cluster` for
//! the shared certificate (its holder may act as the controller or register
//! as any node) and `stowage://node/ID` for a node certificate (its holder
//! may act only as node ID). Every certificate also carries the DNS name
//! [`SERVER_NAME`], which clients check whatever address they dial. That
//! name proves only membership of the cluster, so every client also checks
//! the identity of the server that answered against the one it dialled
//! ([`ServerRole::accepts`]): a node's key cannot answer as another node,
//! nor as the controller. Servers check their callers' identities
//! themselves (see [`peer_identity`]).
//!
//! TLS 1.3 only. tonic's `ServerTlsConfig` takes no protocol versions, and
//! rustls offers 1.2 and 1.3 by default; it builds its rustls configuration
//! from the process's default crypto provider, so
//! [`TlsMaterial::server_config`] first installs one (rustls' `ring`
//! provider) that has only TLS 1.3 cipher suites: a TLS 1.2 hello then
//! finds nothing to agree on. This is process-wide. Clients dial gRPC
//! through [`ClusterConnector`] (tonic's `ClientTlsConfig` cannot check the
//! server's identity), and the replication data link ([`super::link`])
//! speaks rustls itself; both use configurations built here from that same
//! provider, TLS 1.3 only ([`TlsMaterial::client_tls`],
//! [`TlsMaterial::link_server_config`], [`TlsMaterial::link_client_config`]).

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use tonic::transport::{Certificate, Endpoint, Identity, ServerTlsConfig};

/// The DNS name in every stowage certificate; clients verify servers
/// against it (not against the address they dialled).
pub const SERVER_NAME: &str = "stowage-cluster";
/// The CA certificate, in a `--tls-dir` and in `cluster init`'s directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's private key: only in `cluster init`'s directory, never needed at
/// run time.
pub const CA_KEY_FILE: &str = "ca.key";
/// This process's certificate, in a `--tls-dir`.
pub const CERT_FILE: &str = "tls.crt";
/// This process's private key, in a `--tls-dir`.
pub const KEY_FILE: &str = "tls.key";

/// How long the CA made by [`init`] is valid: ten years.
pub const CA_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 3600);
/// How long the shared and node certificates are valid: ten years too, as
/// nothing renews them (a new set is a new `cluster init` rolled out).
pub const CERT_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 3600);
/// Certificates start an hour in the past, for peers whose clock is behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// A peer that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const CLUSTER_URI: &str = "stowage://cluster";
const NODE_URI_PREFIX: &str = "stowage://node/";
const CA_COMMON_NAME: &str = "stowage cluster CA";
/// Longest node id a certificate carries (a DNS name's limit).
const MAX_NODE_ID_LEN: usize = 253;

const LOAD_HINT: &str = "a --tls-dir needs ca.crt, tls.crt and tls.key, as made by \
    `stowage cluster init DIR` or `stowage cluster issue --ca-dir DIR --node N OUT`";
const CA_HINT: &str = "--ca-dir must be a directory made by `stowage cluster init DIR`";

/// Who a peer is, according to its certificate (verified against the
/// cluster CA before any request runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The shared certificate (`stowage://cluster`): the controller, or a
    /// node trusted to register under any node id.
    Cluster,
    /// A node certificate (`stowage://node/ID`): may act only as this node.
    Node(String),
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Cluster => f.write_str("the shared cluster certificate"),
            PeerIdentity::Node(id) => write!(f, "the certificate of node {id}"),
        }
    }
}

/// Why certificates could not be made, loaded or issued. Each error names
/// the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}; {hint}", path.display())]
    Read {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no PEM {what}; {hint}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },
    #[error(
        "{} names no stowage identity (a URI SAN stowage://cluster or stowage://node/ID); \
         make it with `stowage cluster init` or `stowage cluster issue`", path.display()
    )]
    NoIdentity { path: PathBuf },
    #[error("{} is not the private key of {}: {source}; take both from the same directory", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{} is not valid under the CA in {}: {source}; take both from the same \
         `stowage cluster init` (or issue a new certificate if it expired)",
        cert.display(), ca.display()
    )]
    Untrusted {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{} holds no CA certificate rustls accepts; {hint}", path.display())]
    NoTrustAnchor { path: PathBuf, hint: &'static str },
    #[error("{} does not go with any certificate in {}; {CA_HINT}", key.display(), cert.display())]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{} cannot be used: {source}; {CA_HINT}", path.display())]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "{} was not made by `stowage cluster init` (its subject is not stowage's), so \
         `stowage cluster issue` cannot sign for it", path.display()
    )]
    ForeignCa { path: PathBuf },
    #[error(
        "{} already exists: stowage never overwrites a key or certificate; choose another \
         directory, or move the old files away first (certificates signed by an old CA \
         stop being trusted when it is replaced)", path.display()
    )]
    Exists { path: PathBuf },
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "node id {id:?} cannot go in a certificate: use 1 to {MAX_NODE_ID_LEN} characters \
         from A-Z a-z 0-9 . _ -, starting with a letter or digit"
    )]
    NodeId { id: String },
    /// Loaded material rustls refuses for a client or data link
    /// configuration.
    #[error("cannot configure TLS from the loaded certificate and key: {0}")]
    Config(String),
    #[error("cannot make {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// The TLS files of one process (its `--tls-dir`): the cluster CA, its own
/// certificate and key, and the identity that certificate names. Checked
/// when loaded: the key matches the certificate, which is valid now under
/// the CA for both client and server use, with name [`SERVER_NAME`].
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    identity: PeerIdentity,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir` (never `ca.key`).
    /// Errors name the missing or bad file: unreadable, not PEM, a key that
    /// is not the certificate's, a certificate not signed by the CA, expired
    /// or not yet valid, or naming no stowage identity.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let ca_pem = read_text(&ca_path, LOAD_HINT)?;
        let cert_pem = read_text(&cert_path, LOAD_HINT)?;
        let key_pem = read_text(&key_path, LOAD_HINT)?;

        let ca = pem_certs(&ca_path, &ca_pem, LOAD_HINT)?;
        let chain = pem_certs(&cert_path, &cert_pem, LOAD_HINT)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::Pem {
            path: key_path.clone(),
            what: "private key",
            hint: LOAD_HINT,
        })?;
        let provider = tls13_provider();
        CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|source| {
            TlsError::KeyMismatch {
                cert: cert_path.clone(),
                key: key_path,
                source,
            }
        })?;
        check_chain(&ca_path, &ca, &cert_path, &chain, provider)?;
        let identity =
            certificate_identity(&chain[0]).ok_or(TlsError::NoIdentity { path: cert_path })?;
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            identity,
        })
    }

    /// Serve with this: peers must present a certificate signed by the
    /// cluster CA (no anonymous clients, no plaintext), TLS 1.3 only (see
    /// the module doc), a handshake must finish within 10 s. Handlers read
    /// who called with [`peer_identity`].
    pub fn server_config(&self) -> ServerTlsConfig {
        install_tls13_only();
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Dial gRPC with this ([`ClientTls::connector`]): presents our
    /// certificate, trusts only the cluster CA, checks the server's name
    /// is [`SERVER_NAME`] whatever address is dialled and that its
    /// identity may answer as the server meant; TLS 1.3 only, HTTP/2.
    pub fn client_tls(&self) -> Result<ClientTls, TlsError> {
        let mut config = self.rustls_client(tls13_provider())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// The rustls server configuration of the data link
    /// ([`super::link`]): what [`Self::server_config`] asks of peers
    /// (a certificate under the cluster CA, TLS 1.3 only), built here as
    /// the link speaks rustls itself.
    pub fn link_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(link_provider());
        let (roots, chain, key) = self.parts()?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // The link seals its records itself once rustls has made the
        // handshake (`link.rs`, `record.rs`), and never resumes.
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The rustls client configuration of the data link: presents our
    /// certificate, trusts only the cluster CA, TLS 1.3 only (the caller
    /// names [`SERVER_NAME`] in the handshake, then checks the server's
    /// identity with [`ServerRole::check`]).
    pub fn link_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut config = self.rustls_client(link_provider())?;
        // As in `link_server_config`.
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// A TLS 1.3 client configuration with `provider`: the cluster CA as
    /// its only roots, our certificate for client authentication.
    fn rustls_client(&self, provider: CryptoProvider) -> Result<rustls::ClientConfig, TlsError> {
        let (roots, chain, key) = self.parts()?;
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    /// The CA as trust roots, our chain and our key.
    #[allow(clippy::type_complexity)]
    fn parts(
        &self,
    ) -> Result<
        (
            RootCertStore,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        let bad = |what: &str| TlsError::Config(format!("the loaded {what} no longer parses"));
        let mut roots = RootCertStore::empty();
        let ca = CertificateDer::pem_slice_iter(self.ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("CA"))?;
        roots.add_parsable_certificates(ca);
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|_| bad("key"))?;
        Ok((roots, chain, key))
    }

    /// The identity our own certificate names.
    pub fn identity(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

/// Who made this request, from the certificate the peer presented. On a
/// server built with [`TlsMaterial::server_config`] that certificate was
/// verified against the cluster CA before the request could run. `None`
/// when the connection carried no certificate (plaintext, a unix socket)
/// or the certificate names no single stowage identity.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = req.peer_certs()?;
    certificate_identity(certs.first()?)
}

/// Whom a client means to reach over mutual TLS. The server that answers
/// must present a certificate whose identity [`ServerRole::accepts`]:
/// the CA and [`SERVER_NAME`] prove only that it is some member of the
/// cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerRole {
    /// The controller's registration API. The controller holds the shared
    /// certificate: its calls to agents are accepted only from that
    /// identity (`agent::controller_only`, `replica::controller_only`).
    Controller,
    /// Node ID's agent API or data link.
    Node(String),
}

impl fmt::Display for ServerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerRole::Controller => f.write_str("the controller"),
            ServerRole::Node(id) => write!(f, "node {id}"),
        }
    }
}

impl ServerRole {
    /// Whether a server whose verified certificate names `identity` may
    /// answer calls meant for this role. The shared certificate may act as
    /// anyone (the controller, any node); a node certificate only as its
    /// own node, never as another node nor as the controller. Every client
    /// decides with this, and only with this.
    pub fn accepts(&self, identity: &PeerIdentity) -> bool {
        match (self, identity) {
            (_, PeerIdentity::Cluster) => true,
            (ServerRole::Node(wanted), PeerIdentity::Node(id)) => wanted == id,
            (ServerRole::Controller, PeerIdentity::Node(_)) => false,
        }
    }

    /// Checks the chain a server presented in a finished handshake (so
    /// already verified against the cluster CA by rustls): its end-entity
    /// certificate must name an identity this role [accepts](Self::accepts).
    /// Returns that identity.
    pub fn check(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, WrongServer> {
        let presented = chain
            .and_then(|c| c.first())
            .and_then(|c| certificate_identity(c));
        match presented {
            Some(identity) if self.accepts(&identity) => Ok(identity),
            presented => Err(WrongServer {
                wanted: self.clone(),
                presented,
            }),
        }
    }
}

/// A server under the cluster CA that may not answer as the one dialled
/// (see [`ServerRole::accepts`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct WrongServer {
    pub wanted: ServerRole,
    /// `None`: its certificate names no single stowage identity.
    pub presented: Option<PeerIdentity>,
}

impl fmt::Display for WrongServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.presented {
            Some(p) => write!(f, "presented {p}")?,
            None => f.write_str("presented a certificate naming no stowage identity")?,
        }
        match &self.wanted {
            ServerRole::Controller => {
                f.write_str("; only the shared cluster certificate may answer as the controller")
            }
            ServerRole::Node(id) => write!(
                f,
                "; only the certificate of node {id} or the shared cluster certificate \
                 may answer as node {id}"
            ),
        }
    }
}

/// The ALPN protocol gRPC runs on.
const ALPN_H2: &[u8] = b"h2";

/// The client half of gRPC's mutual TLS (from [`TlsMaterial::client_tls`]):
/// one rustls configuration, shared by the connectors of every channel.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// What a channel to `server` connects with: give it to
    /// `Endpoint::connect_with_connector_lazy` (or `connect_with_connector`)
    /// of an [`endpoint`]. The endpoint's connect timeout bounds the TCP
    /// connection and the handshake together; the handshake alone is
    /// bounded by 10 s too.
    pub fn connector(&self, server: ServerRole) -> ClusterConnector {
        ClusterConnector {
            config: Arc::clone(&self.config),
            server,
        }
    }
}

/// The endpoint of a channel to `addr` (host:port) made through a
/// [`ClusterConnector`]. Its URI says `http://` because the connector
/// makes the TLS itself: given an `https://` URI, tonic would look for a
/// `ClientTlsConfig` of its own, which cannot check the server's identity.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
}

/// Connects a gRPC channel to one stowage server: TCP to the URI's
/// authority, the TLS 1.3 handshake of [`TlsMaterial::client_tls`] naming
/// [`SERVER_NAME`], then [`ServerRole::check`] of the certificate the
/// server presented, and HTTP/2 agreed in ALPN. Any failure is the
/// channel's connection error (UNAVAILABLE to the call), naming the
/// address.
#[derive(Clone)]
pub struct ClusterConnector {
    config: Arc<rustls::ClientConfig>,
    server: ServerRole,
}

impl fmt::Debug for ClusterConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConnector")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Why a [`ClusterConnector`] made no connection. Each names the address.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{uri} names no host:port to dial")]
    Address { uri: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} did not finish within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout { addr: String },
    #[error("the server at {addr} {wrong}")]
    WrongServer { addr: String, wrong: WrongServer },
    #[error("the server at {addr} did not agree to HTTP/2 in its TLS handshake")]
    NoHttp2 { addr: String },
}

/// What a [`ClusterConnector`] hands tonic.
pub type ClusterStream =
    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for ClusterConnector {
    type Response = ClusterStream;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<ClusterStream, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(dial(Arc::clone(&self.config), self.server.clone(), uri))
    }
}

async fn dial(
    config: Arc<rustls::ClientConfig>,
    server: ServerRole,
    uri: http::Uri,
) -> Result<ClusterStream, DialError> {
    let addr = match uri.authority() {
        Some(a) if a.port().is_some() => a.as_str().to_owned(),
        _ => {
            return Err(DialError::Address {
                uri: uri.to_string(),
            });
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr.as_str())
        .await
        .map_err(|source| DialError::Connect {
            addr: addr.clone(),
            source,
        })?;
    // Small calls go out at once (tonic's own connector does the same).
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a DNS name");
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| DialError::HandshakeTimeout { addr: addr.clone() })?
        .map_err(|source| DialError::Handshake {
            addr: addr.clone(),
            source,
        })?;
    let (_, session) = tls.get_ref();
    if let Err(wrong) = server.check(session.peer_certificates()) {
        tracing::warn!(address = %addr, error = %wrong, "refused a server that answered as another");
        return Err(DialError::WrongServer { addr, wrong });
    }
    if session.alpn_protocol() != Some(ALPN_H2) {
        return Err(DialError::NoHttp2 { addr });
    }
    Ok(hyper_util::rt::TokioIo::new(tls))
}

/// Makes a new cluster CA and a shared cluster certificate in `dir`
/// (created, mode 0700, if missing): `ca.crt`, `ca.key` (0600), `tls.crt`,
/// `tls.key` (0600). Refuses, writing nothing, when any of the four exists;
/// never overwrites. On a failure part-way, the files it made are removed.
pub fn init(dir: &Path) -> Result<(), TlsError> {
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    create_dir(dir)?;
    refuse_existing(&[&ca_cert_path, &ca_key_path, &cert_path, &key_path])?;

    let (not_before, ca_not_after) = validity(CA_VALIDITY);
    let ca_key = KeyPair::generate().map_err(generate("the CA key"))?;
    // A name of its own, so a certificate from another stowage cluster is
    // refused as an unknown issuer rather than as a bad signature.
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut ca_params = ca_params(&format!("{CA_COMMON_NAME} {}", &unique[..12]));
    ca_params.not_before = not_before;
    ca_params.not_after = ca_not_after;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(generate("the CA certificate"))?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let (cert_pem, key_pem) = leaf("stowage cluster", CLUSTER_URI, &issuer)?;

    let mut files = NewFiles::default();
    files.create(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644)?;
    files.create(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600)?;
    files.create(&cert_path, cert_pem.as_bytes(), 0o644)?;
    files.create(&key_path, key_pem.as_bytes(), 0o600)?;
    files.commit(dir)
}

/// Makes a certificate for node `node_id` (URI SAN `stowage://node/ID`),
/// signed by the CA in `ca_dir` (its `ca.crt` and `ca.key`), and writes
/// `out/ca.crt`, `out/tls.crt` and `out/tls.key` (0600), creating `out`
/// (mode 0700) if missing. Refuses, writing nothing, when any of the three
/// exists, and when the CA was not made by [`init`].
pub fn issue_node(ca_dir: &Path, node_id: &str, out: &Path) -> Result<(), TlsError> {
    if !valid_node_id(node_id) {
        return Err(TlsError::NodeId {
            id: node_id.to_owned(),
        });
    }
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_text(&ca_cert_path, CA_HINT)?;
    let ca_key_pem = read_text(&ca_key_path, CA_HINT)?;
    let ca_certs = pem_certs(&ca_cert_path, &ca_pem, CA_HINT)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::CaKey {
        path: ca_key_path.clone(),
        source,
    })?;
    let ca_spki = ca_key.subject_public_key_info();
    let ca_subject = ca_certs
        .iter()
        .filter_map(|c| parse_certificate(c).ok())
        .find(|c| c.spki == ca_spki)
        .ok_or_else(|| TlsError::CaKeyMismatch {
            cert: ca_cert_path.clone(),
            key: ca_key_path.clone(),
        })?
        .subject;
    let ca_name = stowage_ca_name(&ca_subject).ok_or_else(|| TlsError::ForeignCa {
        path: ca_cert_path.clone(),
    })?;

    let out_ca = out.join(CA_CERT_FILE);
    let out_cert = out.join(CERT_FILE);
    let out_key = out.join(KEY_FILE);
    refuse_existing(&[&out_ca, &out_cert, &out_key])?;

    let issuer = Issuer::new(ca_params(&ca_name), &ca_key);
    let (cert_pem, key_pem) = leaf(
        &format!("stowage node {node_id}"),
        &format!("{NODE_URI_PREFIX}{node_id}"),
        &issuer,
    )?;
    let chain = pem_certs(&out_cert, &cert_pem, CA_HINT)?;
    // The issuer was rebuilt from the CA's name: it must come out the same.
    if parse_certificate(&chain[0]).map(|c| c.issuer).ok() != Some(ca_subject) {
        return Err(TlsError::ForeignCa { path: ca_cert_path });
    }
    check_chain(
        &ca_cert_path,
        &ca_certs,
        &out_cert,
        &chain,
        tls13_provider(),
    )?;

    create_dir(out)?;
    let mut files = NewFiles::default();
    files.create(&out_ca, ca_pem.as_bytes(), 0o644)?;
    files.create(&out_cert, cert_pem.as_bytes(), 0o644)?;
    files.create(&out_key, key_pem.as_bytes(), 0o600)?;
    files.commit(out)
}

/// Node ids a certificate may carry: what a hostname or a Kubernetes node
/// name looks like, so the URI needs no escaping.
fn valid_node_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && id.len() <= MAX_NODE_ID_LEN
}

/// The identity a certificate names: exactly one `stowage:` URI SAN, which
/// is `stowage://cluster` or `stowage://node/ID` with a valid ID. Anything
/// else (none, two, an unknown `stowage:` URI, an unparsable certificate)
/// names nobody.
pub(crate) fn certificate_identity(der: &[u8]) -> Option<PeerIdentity> {
    identity_from_uris(parse_certificate(der).ok()?.uris.iter().map(String::as_str))
}

fn identity_from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<PeerIdentity> {
    let mut found = None;
    for uri in uris {
        let this = if uri == CLUSTER_URI {
            PeerIdentity::Cluster
        } else if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
            && valid_node_id(id)
        {
            PeerIdentity::Node(id.to_owned())
        } else if uri
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("stowage:"))
        {
            return None;
        } else {
            continue;
        };
        if found.replace(this).is_some() {
            return None;
        }
    }
    found
}

/// The parts of an X.509 certificate stowage reads.
#[derive(Debug)]
struct CertificateFields {
    /// The issuer Name, as DER.
    issuer: Vec<u8>,
    /// The subject Name, as DER.
    subject: Vec<u8>,
    /// The SubjectPublicKeyInfo, as DER.
    spki: Vec<u8>,
    /// The URI subject alternative names.
    uris: Vec<String>,
}

const SUBJECT_ALT_NAME_OID: &[u64] = &[2, 5, 29, 17];

/// Reads a DER certificate (RFC 5280 4.1) strictly: any malformed field is
/// an error. The signature is not checked here; rustls does that.
fn parse_certificate(der: &[u8]) -> Result<CertificateFields, yasna::ASN1Error> {
    use yasna::Tag;
    yasna::parse_der(der, |r| {
        r.read_sequence(|cert| {
            let fields = cert.next().read_sequence(|tbs| {
                tbs.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_u8()))?;
                tbs.next().read_der()?; // serialNumber
                tbs.next().read_der()?; // signature
                let issuer = tbs.next().read_der()?;
                tbs.next().read_der()?; // validity
                let subject = tbs.next().read_der()?;
                let spki = tbs.next().read_der()?;
                // issuerUniqueID, subjectUniqueID
                tbs.read_optional(|r| r.read_tagged_implicit(Tag::context(1), |r| r.read_bytes()))?;
                tbs.read_optional(|r| r.read_tagged_implicit(Tag::context(2), |r| r.read_bytes()))?;
                let mut uris = Vec::new();
                tbs.read_optional(|r| {
                    r.read_tagged(Tag::context(3), |r| {
                        r.read_sequence_of(|r| {
                            r.read_sequence(|ext| {
                                let oid = ext.next().read_oid()?;
                                ext.read_default(false, |r| r.read_bool())?;
                                let value = ext.next().read_bytes()?;
                                if oid.components().as_slice() == SUBJECT_ALT_NAME_OID {
                                    uris.extend(parse_uri_names(&value)?);
                                }
                                Ok(())
                            })
                        })
                    })
                })?;
                Ok(CertificateFields {
                    issuer,
                    subject,
                    spki,
                    uris,
                })
            })?;
            cert.next().read_der()?; // signatureAlgorithm
            cert.next().read_der()?; // signatureValue
            Ok(fields)
        })
    })
}

const COMMON_NAME_OID: &[u64] = &[2, 5, 4, 3];

/// The common name of a CA made by [`init`], from its subject Name (DER):
/// a single UTF8String CN starting with [`CA_COMMON_NAME`], as
/// [`ca_params`] writes it. `None` for any other name.
fn stowage_ca_name(subject: &[u8]) -> Option<String> {
    let attributes = yasna::parse_der(subject, |r| {
        r.collect_sequence_of(|rdn| {
            rdn.collect_set_of(|atv| {
                atv.read_sequence(|atv| {
                    let oid = atv.next().read_oid()?;
                    let value = atv.next().read_utf8string()?;
                    Ok((oid, value))
                })
            })
        })
    })
    .ok()?;
    match attributes.as_slice() {
        [rdn] => match rdn.as_slice() {
            [(oid, name)]
                if oid.components().as_slice() == COMMON_NAME_OID
                    && name.starts_with(CA_COMMON_NAME) =>
            {
                Some(name.clone())
            }
            _ => None,
        },
        _ => None,
    }
}

/// The uniformResourceIdentifier entries ([6] IA5String) of GeneralNames.
fn parse_uri_names(der: &[u8]) -> Result<Vec<String>, yasna::ASN1Error> {
    let uri_tag = yasna::Tag::context(6);
    yasna::parse_der(der, |r| {
        let mut uris = Vec::new();
        r.read_sequence_of(|name| {
            if name.lookahead_tag()? == uri_tag {
                uris.push(name.read_tagged_implicit(uri_tag, |r| r.read_ia5_string())?);
            } else {
                name.read_der()?;
            }
            Ok(())
        })?;
        Ok(uris)
    })
}

/// rustls' ring provider without its TLS 1.2 cipher suites.
fn tls13_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    provider
}

/// The data link's provider: [`tls13_provider`] preferring
/// TLS_AES_128_GCM_SHA256 (the server follows the client's order). A
/// link moves a replicated volume's every byte and seals it in user space
/// (`record.rs`): AES-128 runs 10 rounds a block where AES-256 runs 14,
/// and at 128 bits it is TLS 1.3's mandatory suite (RFC 8446 §9.1). The
/// other suites stay, for a peer that offers no AES-128.
fn link_provider() -> CryptoProvider {
    let mut provider = tls13_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// Makes [`tls13_provider`] the process's default, which tonic's TLS
/// configurations use. Another provider installed first cannot be
/// replaced: that is logged, as TLS 1.2 may then be negotiated.
fn install_tls13_only() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only when a provider is already installed; checked below.
        let _ = tls13_provider().install_default();
        let only_tls13 = CryptoProvider::get_default().is_some_and(|p| {
            p.cipher_suites
                .iter()
                .all(|s| s.version() == &rustls::version::TLS13)
        });
        if !only_tls13 {
            tracing::warn!(
                "another TLS crypto provider was installed before stowage's: \
                 TLS 1.2 may be negotiated between stowage processes"
            );
        }
    });
}

/// Checks `chain` is valid now under `ca` as both a server certificate for
/// [`SERVER_NAME`] and a client certificate.
fn check_chain(
    ca_path: &Path,
    ca: &[CertificateDer<'static>],
    cert_path: &Path,
    chain: &[CertificateDer<'static>],
    provider: CryptoProvider,
) -> Result<(), TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca.iter().cloned());
    let no_anchor = || TlsError::NoTrustAnchor {
        path: ca_path.to_owned(),
        hint: LOAD_HINT,
    };
    if added == 0 {
        return Err(no_anchor());
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(provider);
    let untrusted = |source| TlsError::Untrusted {
        cert: cert_path.to_owned(),
        ca: ca_path.to_owned(),
        source,
    };
    let (end_entity, intermediates) = chain.split_first().ok_or_else(no_anchor)?;
    let now = UnixTime::now();
    let name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a DNS name");
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|_| no_anchor())?
        .verify_server_cert(end_entity, intermediates, &name, &[], now)
        .map_err(untrusted)?;
    WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|_| no_anchor())?
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(untrusted)?;
    Ok(())
}

/// The CA's parameters, less its validity. `issue_node` rebuilds the issuer
/// from these and the name [`stowage_ca_name`] reads back, so they must not
/// change.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A new key and a certificate for it, signed by `issuer`, for both server
/// and client use, named [`SERVER_NAME`] and `uri`: (certificate PEM, key
/// PEM).
fn leaf(
    common_name: &str,
    uri: &str,
    issuer: &Issuer<'_, &KeyPair>,
) -> Result<(String, String), TlsError> {
    let what = "the certificate";
    let key = KeyPair::generate().map_err(generate("a key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = vec![
        SanType::DnsName(SERVER_NAME.try_into().map_err(generate(what))?),
        SanType::URI(uri.try_into().map_err(generate(what))?),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    (params.not_before, params.not_after) = validity(CERT_VALIDITY);
    let cert = params.signed_by(&key, issuer).map_err(generate(what))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// (not before, not after) for something valid from now for `length`.
fn validity(length: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - BACKDATE, now + length)
}

fn generate(what: &'static str) -> impl Fn(rcgen::Error) -> TlsError {
    move |source| TlsError::Generate { what, source }
}

fn read_text(path: &Path, hint: &'static str) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        hint,
        source,
    })
}

fn pem_certs(
    path: &Path,
    pem: &str,
    hint: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        _ => Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            hint,
        }),
    }
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

fn refuse_existing(paths: &[&Path]) -> Result<(), TlsError> {
    match paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
        Some(p) => Err(TlsError::Exists {
            path: (*p).to_owned(),
        }),
        None => Ok(()),
    }
}

/// Files one `init` or `issue_node` creates: all of them, or (dropped
/// before [`NewFiles::commit`]) none.
#[derive(Debug, Default)]
struct NewFiles {
    created: Vec<PathBuf>,
}

impl NewFiles {
    /// Creates `path` with `contents`, failing if it exists (O_EXCL, so
    /// never overwriting, even racing another writer), mode exactly `mode`,
    /// synced.
    fn create(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
        let write_err = |source| TlsError::Write {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => TlsError::Exists {
                    path: path.to_owned(),
                },
                _ => write_err(source),
            })?;
        self.created.push(path.to_owned());
        // The umask may have taken bits away; a key must be exactly 0600.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(write_err)?;
        file.write_all(contents).map_err(write_err)?;
        file.sync_all().map_err(write_err)
    }

    /// Keeps the files, and makes their names durable.
    fn commit(mut self, dir: &Path) -> Result<(), TlsError> {
        let synced = fs::File::open(dir).and_then(|d| d.sync_all());
        synced.map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
        self.created.clear();
        Ok(())
    }
}

impl Drop for NewFiles {
    fn drop(&mut self) {
        for path in &self.created {
            let _ = fs::remove_file(path);
        }
    }
}

/// What tests of clients dial: servers under one test CA presenting the
/// shared certificate or a node's.
#[cfg(test)]
pub(crate) mod test_servers {
    use super::*;

    /// A cluster CA with its shared certificate, and node certificates
    /// issued on demand, in a directory of their own.
    pub struct TestCa {
        dir: tempfile::TempDir,
    }

    impl TestCa {
        pub fn new() -> TestCa {
            let dir = tempfile::tempdir().unwrap();
            init(&dir.path().join("ca")).unwrap();
            TestCa { dir }
        }

        /// Node `node`'s material (the shared certificate's for `None`).
        pub fn material(&self, node: Option<&str>) -> TlsMaterial {
            let ca = self.dir.path().join("ca");
            let Some(n) = node else {
                return TlsMaterial::load(&ca).unwrap();
            };
            let out = self.dir.path().join(format!("node-{n}"));
            if !out.exists() {
                issue_node(&ca, n, &out).unwrap();
            }
            TlsMaterial::load(&out).unwrap()
        }
    }

    /// A gRPC server on 127.0.0.1 presenting `material`'s certificate
    /// ([`TlsMaterial::server_config`]) and serving no service: a call
    /// that gets through the handshake is answered UNIMPLEMENTED. Stops
    /// when dropped.
    pub struct EmptyServer {
        pub addr: String,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for EmptyServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl EmptyServer {
        pub async fn start(material: &TlsMaterial) -> EmptyServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let router = tonic::transport::Server::builder()
                .tls_config(material.server_config())
                .unwrap()
                .add_routes(tonic::service::Routes::default());
            let task = tokio::spawn(async move {
                let _ = router
                    .serve_with_incoming(crate::server::tcp_incoming(listener))
                    .await;
            });
            EmptyServer { addr, task }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_answers_only_as_its_node_and_the_shared_one_as_anyone() {
        let node = |id: &str| PeerIdentity::Node(id.to_owned());
        let n1 = ServerRole::Node("n1".to_owned());
        assert!(n1.accepts(&node("n1")));
        assert!(n1.accepts(&PeerIdentity::Cluster));
        assert!(!n1.accepts(&node("n9")));
        assert!(!n1.accepts(&node("n1.example")));
        assert!(!n1.accepts(&node("N1")));
        assert!(ServerRole::Controller.accepts(&PeerIdentity::Cluster));
        assert!(!ServerRole::Controller.accepts(&node("n1")));
    }

    #[test]
    fn a_server_answering_as_another_is_named_with_what_was_wanted() {
        let ca = test_servers::TestCa::new();
        let chain = |m: &TlsMaterial| pem_certs(Path::new("tls.crt"), &m.cert_pem, "").unwrap();
        let (n1, n9) = (
            chain(&ca.material(Some("n1"))),
            chain(&ca.material(Some("n9"))),
        );
        let shared = chain(&ca.material(None));
        let role = ServerRole::Node("n1".to_owned());
        assert_eq!(role.check(Some(&n1)), Ok(PeerIdentity::Node("n1".into())));
        assert_eq!(role.check(Some(&shared)), Ok(PeerIdentity::Cluster));
        let wrong = role.check(Some(&n9)).unwrap_err();
        assert_eq!(
            wrong.to_string(),
            "presented the certificate of node n9; only the certificate of node n1 or the \
             shared cluster certificate may answer as node n1"
        );
        assert_eq!(
            ServerRole::Controller
                .check(Some(&n1))
                .unwrap_err()
                .to_string(),
            "presented the certificate of node n1; only the shared cluster certificate may \
             answer as the controller"
        );
        assert_eq!(
            ServerRole::Controller.check(Some(&shared)),
            Ok(PeerIdentity::Cluster)
        );
        for nobody in [None, Some(&[][..])] {
            assert_eq!(
                role.check(nobody),
                Err(WrongServer {
                    wanted: role.clone(),
                    presented: None
                })
            );
        }
    }

    /// One call over a fresh channel through [`ClientTls::connector`] to a
    /// server that serves nothing: UNIMPLEMENTED means it got through.
    async fn call(client: &TlsMaterial, addr: &str, server: ServerRole) -> tonic::Status {
        let channel = endpoint(addr)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(client.client_tls().unwrap().connector(server));
        crate::cluster::proto::registry_client::RegistryClient::new(channel)
            .register(crate::cluster::proto::RegisterRequest::default())
            .await
            .unwrap_err()
    }

    /// The gRPC clients (controller to agents, engines to copies, agents
    /// to the controller) refuse a server under the cluster CA that may
    /// not answer as the peer dialled: UNAVAILABLE, naming the address,
    /// the certificate presented and the one wanted. Whoever the client
    /// is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grpc_client_refuses_a_server_answering_as_another() {
        let ca = test_servers::TestCa::new();
        let n9 = test_servers::EmptyServer::start(&ca.material(Some("n9"))).await;
        let n1 = ServerRole::Node("n1".to_owned());
        for client in [ca.material(None), ca.material(Some("n2"))] {
            for (role, wanted) in [
                (n1.clone(), "may answer as node n1"),
                (ServerRole::Controller, "may answer as the controller"),
            ] {
                let got = call(&client, &n9.addr, role).await;
                assert_eq!(got.code(), tonic::Code::Unavailable, "{got:?}");
                let expected = format!(
                    "the server at {} presented the certificate of node n9",
                    n9.addr
                );
                assert!(
                    got.message().contains(&expected) && got.message().contains(wanted),
                    "{got:?}"
                );
            }
        }
        // The node's own server is reached, and n9's as n9.
        let own = call(&ca.material(None), &n9.addr, ServerRole::Node("n9".into())).await;
        assert_eq!(own.code(), tonic::Code::Unimplemented, "{own:?}");
        let shared = test_servers::EmptyServer::start(&ca.material(None)).await;
        for role in [n1, ServerRole::Controller] {
            let got = call(&ca.material(Some("n1")), &shared.addr, role).await;
            assert_eq!(got.code(), tonic::Code::Unimplemented, "{got:?}");
        }
    }

    #[test]
    fn the_link_prefers_aes_128_and_keeps_every_tls13_suite() {
        let suites =
            |p: CryptoProvider| -> Vec<_> { p.cipher_suites.iter().map(|s| s.suite()).collect() };
        let (link, all) = (suites(link_provider()), suites(tls13_provider()));
        assert_eq!(link[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(link.len(), all.len());
        assert!(all.iter().all(|s| link.contains(s)), "{link:?} / {all:?}");
    }

    fn ca() -> (KeyPair, CertificateParams) {
        let key = KeyPair::generate().unwrap();
        (key, ca_params("stowage cluster CA test"))
    }

    fn leaf_der(sans: Vec<SanType>) -> Vec<u8> {
        let (ca_key, params) = ca();
        let issuer = Issuer::new(params, &ca_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn the_uri_names_of_a_certificate_are_read_among_other_names() {
        let der = leaf_der(vec![
            SanType::DnsName("stowage-cluster".try_into().unwrap()),
            uri("https://example.org/x"),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            uri("stowage://node/n1"),
        ]);
        let fields = parse_certificate(&der).unwrap();
        assert_eq!(fields.uris, ["https://example.org/x", "stowage://node/n1"]);
        assert_eq!(
            certificate_identity(&der),
            Some(PeerIdentity::Node("n1".into()))
        );
    }

    #[test]
    fn a_certificate_without_extensions_names_nobody() {
        let der = leaf_der(vec![]);
        assert!(parse_certificate(&der).unwrap().uris.is_empty());
        assert_eq!(certificate_identity(&der), None);
    }

    #[test]
    fn subject_and_key_are_those_rcgen_wrote() {
        let (ca_key, params) = ca();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let ca_fields = parse_certificate(ca_cert.der()).unwrap();
        assert_eq!(ca_fields.spki, ca_key.subject_public_key_info());
        assert_eq!(ca_fields.issuer, ca_fields.subject);
        let issuer = Issuer::new(ca_params("stowage cluster CA test"), &ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::default()
            .signed_by(&key, &issuer)
            .unwrap();
        let leaf_fields = parse_certificate(leaf.der()).unwrap();
        assert_eq!(leaf_fields.issuer, ca_fields.subject);
        assert_ne!(leaf_fields.subject, ca_fields.subject);
        assert_eq!(leaf_fields.spki, key.subject_public_key_info());
    }

    #[test]
    fn a_stowage_ca_name_reads_back_and_others_do_not() {
        let name_of = |params: &CertificateParams| {
            let key = KeyPair::generate().unwrap();
            let der = params.self_signed(&key).unwrap().der().to_vec();
            stowage_ca_name(&parse_certificate(&der).unwrap().subject)
        };
        assert_eq!(
            name_of(&ca_params("stowage cluster CA 0123abcd")).as_deref(),
            Some("stowage cluster CA 0123abcd")
        );
        assert_eq!(name_of(&ca_params("someone else's CA")), None);
        let mut two = ca_params("stowage cluster CA 1");
        two.distinguished_name
            .push(DnType::OrganizationName, "stowage cluster CA 2");
        assert_eq!(name_of(&two), None);
        let mut printable = CertificateParams::default();
        printable.distinguished_name = DistinguishedName::new();
        printable.distinguished_name.push(
            DnType::CommonName,
            rcgen::DnValue::PrintableString("stowage cluster CA".try_into().unwrap()),
        );
        assert_eq!(name_of(&printable), None);
    }

    #[test]
    fn exactly_one_stowage_uri_names_an_identity() {
        let id = |uris: &[&str]| identity_from_uris(uris.iter().copied());
        assert_eq!(id(&["stowage://cluster"]), Some(PeerIdentity::Cluster));
        assert_eq!(
            id(&["https://x", "stowage://node/a.b-c_1"]),
            Some(PeerIdentity::Node("a.b-c_1".into()))
        );
        assert_eq!(id(&[]), None);
        assert_eq!(id(&["https://x"]), None);
        assert_eq!(id(&["stowage://cluster", "stowage://node/n1"]), None);
        assert_eq!(id(&["stowage://node/n1", "stowage://node/n2"]), None);
        assert_eq!(id(&["stowage://cluster", "stowage://cluster"]), None);
        assert_eq!(id(&["stowage://node/"]), None);
        assert_eq!(id(&["stowage://node/n1/x"]), None);
        assert_eq!(id(&["stowage://node/../x"]), None);
        assert_eq!(id(&["stowage://admin"]), None);
        assert_eq!(id(&["STOWAGE://cluster"]), None);
        assert_eq!(id(&["stowage://node/n1", "Stowage://admin"]), None);
    }

    #[test]
    fn node_ids_are_hostname_like() {
        assert!(valid_node_id("n1"));
        assert!(valid_node_id("worker-3.example.org"));
        assert!(valid_node_id(&"a".repeat(MAX_NODE_ID_LEN)));
        assert!(!valid_node_id(&"a".repeat(MAX_NODE_ID_LEN + 1)));
        for bad in ["", "-n", ".n", "n/1", "n 1", "n%2F", "nö", "n\n"] {
            assert!(!valid_node_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let material = TlsMaterial::load(dir.path()).unwrap();
        let shown = format!("{material:?}");
        assert!(shown.contains("Cluster"), "{shown}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
    }

    /// A real certificate to mangle: its bytes take the reader deep into
    /// the structure, where random bytes would stop at the first tag.
    fn sample_der() -> &'static [u8] {
        static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        DER.get_or_init(|| {
            leaf_der(vec![
                SanType::DnsName("stowage-cluster".try_into().unwrap()),
                uri("stowage://node/n1"),
            ])
        })
    }

    proptest::proptest! {
        /// Peer certificates are untrusted input until rustls has checked
        /// them: the reader rejects a damaged one, it never panics.
        #[test]
        fn the_certificate_reader_never_panics(
            edits in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 0..8),
            cut in 0usize..4096,
        ) {
            let mut der = sample_der().to_vec();
            for (at, byte) in edits {
                let i = at % der.len();
                der[i] = byte;
            }
            der.truncate(der.len() - cut % 64);
            let _ = certificate_identity(&der);
            let _ = parse_uri_names(&der);
        }
    }
}
