//! Mutual TLS between stowage processes (`src/cluster/tls.rs`), over real
//! TCP on 127.0.0.1: a tonic server built with `server_config()` serves the
//! CSI Identity service, whose GetPluginInfo counts its calls and records the
//! caller's `peer_identity`. Clients with the right material get through and
//! are recognised; every other client is refused before the RPC runs (the
//! counter stays 0). Clients dial as stowage does (`ClientTls`), and refuse
//! a server under the CA that may not answer as the peer they meant.
//! `stowage cluster init|issue` are run as the real binary.

#![allow(clippy::disallowed_methods)]

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use stowage::cluster::tls::{self, PeerIdentity, SERVER_NAME, ServerRole, TlsError, TlsMaterial};
use stowage::csi;
use stowage::csi::identity_client::IdentityClient;
use stowage::csi::identity_server::{Identity, IdentityServer};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Server};
use tonic::{Request, Response, Status};

const STOWAGE: &str = env!("CARGO_BIN_EXE_stowage");

/// What the server saw: RPCs that ran, and who called each.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    peers: Mutex<Vec<Option<PeerIdentity>>>,
}

impl Seen {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn peers(&self) -> Vec<Option<PeerIdentity>> {
        self.peers.lock().unwrap().clone()
    }
}

struct Probe(Arc<Seen>);

#[tonic::async_trait]
impl Identity for Probe {
    async fn get_plugin_info(
        &self,
        req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        self.0.peers.lock().unwrap().push(tls::peer_identity(&req));
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: "probe".into(),
            ..Default::default()
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A TLS server on 127.0.0.1, stopped when dropped.
struct TlsServer {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn serve(material: &TlsMaterial) -> TlsServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder()
        .tls_config(material.server_config())
        .unwrap()
        .add_service(IdentityServer::new(Probe(seen.clone())));
    let task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    TlsServer {
        addr,
        seen,
        stop: Some(stop),
        task,
    }
}

/// One GetPluginInfo over a fresh connection: https with `tls`, plaintext
/// h2 without. The error is the whole chain, for the test's output.
async fn call(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<String, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(chain)?;
    }
    let channel = endpoint.connect().await.map_err(chain)?;
    IdentityClient::new(channel)
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map(|r| r.into_inner().name)
        .map_err(|s| format!("{s:?}"))
}

/// One GetPluginInfo over a fresh channel dialled as stowage dials (a
/// `ClientTls` connector with `material`), meaning to reach `server`.
async fn call_as(
    addr: SocketAddr,
    material: &TlsMaterial,
    server: ServerRole,
) -> Result<String, String> {
    let connector = material.client_tls().map_err(chain)?.connector(server);
    let channel = tls::endpoint(&addr.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(chain)?;
    IdentityClient::new(channel)
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map(|r| r.into_inner().name)
        .map_err(|s| format!("{s:?}"))
}

fn chain(e: impl std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap()
}

/// A client configuration trusting the CA in `ca_dir`, presenting the
/// certificate and key in `id_dir` (none when `None`).
fn client_tls(ca_dir: &Path, id_dir: Option<&Path>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca_dir, "ca.crt")))
        .domain_name(SERVER_NAME);
    match id_dir {
        Some(d) => tls.identity(tonic::transport::Identity::from_pem(
            read(d, "tls.crt"),
            read(d, "tls.key"),
        )),
        None => tls,
    }
}

fn init_dir(parent: &Path, name: &str) -> std::path::PathBuf {
    let dir = parent.join(name);
    tls::init(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_certificate_gets_through_and_is_seen_as_the_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let material = TlsMaterial::load(&init_dir(tmp.path(), "ca")).unwrap();
    assert_eq!(material.identity(), PeerIdentity::Cluster);
    let server = serve(&material).await;

    let got = call_as(server.addr, &material, ServerRole::Controller).await;
    assert_eq!(got.as_deref(), Ok("probe"));
    assert_eq!(server.seen.peers(), vec![Some(PeerIdentity::Cluster)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_is_seen_as_its_node_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_dir(tmp.path(), "ca");
    let n1 = tmp.path().join("n1");
    tls::issue_node(&ca, "n1", &n1).unwrap();
    let shared = TlsMaterial::load(&ca).unwrap();
    let node = TlsMaterial::load(&n1).unwrap();
    assert_eq!(node.identity(), PeerIdentity::Node("n1".into()));

    // The node registering with the controller.
    let controller = serve(&shared).await;
    let got = call_as(controller.addr, &node, ServerRole::Controller).await;
    assert_eq!(got.as_deref(), Ok("probe"));
    assert_eq!(
        controller.seen.peers(),
        vec![Some(PeerIdentity::Node("n1".into()))]
    );

    // The controller calling the node's agent API.
    let agent = serve(&node).await;
    let got = call_as(agent.addr, &shared, ServerRole::Node("n1".into())).await;
    assert_eq!(got.as_deref(), Ok("probe"));
    assert_eq!(agent.seen.peers(), vec![Some(PeerIdentity::Cluster)]);
}

/// A server's certificate under the cluster CA proves only that it is a
/// member: node n9's may not answer as node n1 nor as the controller, and
/// the client refuses it before any RPC runs; as n9 it is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_as_another_node_or_as_the_controller_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_dir(tmp.path(), "ca");
    let n9 = tmp.path().join("n9");
    tls::issue_node(&ca, "n9", &n9).unwrap();
    let shared = TlsMaterial::load(&ca).unwrap();
    let server = serve(&TlsMaterial::load(&n9).unwrap()).await;

    for (role, wanted) in [
        (ServerRole::Node("n1".into()), "may answer as node n1"),
        (ServerRole::Controller, "may answer as the controller"),
    ] {
        let got = call_as(server.addr, &shared, role).await;
        eprintln!("n9 answering: {got:?}");
        let why = got.unwrap_err();
        assert!(
            why.contains(&format!(
                "the server at {} presented the certificate of node n9",
                server.addr
            )) && why.contains(wanted),
            "{why}"
        );
    }
    assert_eq!(server.seen.calls(), 0);

    let got = call_as(server.addr, &shared, ServerRole::Node("n9".into())).await;
    assert_eq!(got.as_deref(), Ok("probe"));
    assert_eq!(server.seen.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_before_the_rpc_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = init_dir(tmp.path(), "ours");
    let theirs = init_dir(tmp.path(), "theirs");
    let server = serve(&TlsMaterial::load(&ours).unwrap()).await;

    // Trusts our CA (so the client accepts the server) but presents a
    // certificate signed by another CA.
    let got = call(server.addr, Some(client_tls(&ours, Some(&theirs)))).await;
    eprintln!("foreign certificate: {got:?}");
    assert!(got.is_err(), "{got:?}");
    // The whole foreign set: neither side trusts the other.
    let foreign = TlsMaterial::load(&theirs).unwrap();
    let got = call_as(server.addr, &foreign, ServerRole::Controller).await;
    assert!(got.is_err(), "{got:?}");
    assert_eq!(server.seen.calls(), 0);

    // The same server still answers the right certificate.
    let got = call(server.addr, Some(client_tls(&ours, Some(&ours)))).await;
    assert_eq!(got.as_deref(), Ok("probe"));
    assert_eq!(server.seen.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let material = TlsMaterial::load(&init_dir(tmp.path(), "ca")).unwrap();
    let server = serve(&material).await;
    let got = call(server.addr, None).await;
    eprintln!("plaintext: {got:?}");
    assert!(got.is_err(), "{got:?}");
    assert_eq!(server.seen.calls(), 0);
    // The server is still there for a TLS client.
    let got = call_as(server.addr, &material, ServerRole::Controller).await;
    assert_eq!(got.as_deref(), Ok("probe"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_dir(tmp.path(), "ca");
    let server = serve(&TlsMaterial::load(&ca).unwrap()).await;
    let got = call(server.addr, Some(client_tls(&ca, None))).await;
    eprintln!("no client certificate: {got:?}");
    assert!(got.is_err(), "{got:?}");
    assert_eq!(server.seen.calls(), 0);
    // The same configuration with the certificate gets through.
    let got = call(server.addr, Some(client_tls(&ca, Some(&ca)))).await;
    assert_eq!(got.as_deref(), Ok("probe"));
}

/// A CA made here with rcgen, not by `stowage cluster init`: what an
/// operator's own tooling might make.
struct TestCa {
    key: KeyPair,
    params: CertificateParams,
    pem: String,
}

fn test_ca() -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "test-made CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    TestCa { key, params, pem }
}

/// (certificate PEM, key PEM) for `uri`, valid over `days` (relative to
/// now), signed by `ca`.
fn test_leaf(ca: &TestCa, uri: &str, days: (i64, i64)) -> (String, String) {
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::DnsName(SERVER_NAME.try_into().unwrap()),
        SanType::URI(uri.try_into().unwrap()),
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now + time::Duration::days(days.0);
    params.not_after = now + time::Duration::days(days.1);
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_tls_dir(dir: &Path, ca_pem: &str, (cert, key): &(String, String)) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("ca.crt"), ca_pem).unwrap();
    fs::write(dir.join("tls.crt"), cert).unwrap();
    fs::write(dir.join("tls.key"), key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_signed_by_the_right_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = test_ca();
    let server_dir = tmp.path().join("server");
    write_tls_dir(
        &server_dir,
        &ca.pem,
        &test_leaf(&ca, "stowage://cluster", (-1, 30)),
    );
    let server = serve(&TlsMaterial::load(&server_dir).unwrap()).await;

    let valid_dir = tmp.path().join("valid");
    write_tls_dir(
        &valid_dir,
        &ca.pem,
        &test_leaf(&ca, "stowage://node/n2", (-1, 30)),
    );
    let expired_dir = tmp.path().join("expired");
    write_tls_dir(
        &expired_dir,
        &ca.pem,
        &test_leaf(&ca, "stowage://node/n2", (-30, -1)),
    );

    let got = call(
        server.addr,
        Some(client_tls(&server_dir, Some(&expired_dir))),
    )
    .await;
    eprintln!("expired: {got:?}");
    assert!(got.is_err(), "{got:?}");
    assert_eq!(server.seen.calls(), 0);

    // Same CA, same identity, in date: accepted (so the refusal above was
    // the expiry).
    let got = call(server.addr, Some(client_tls(&server_dir, Some(&valid_dir)))).await;
    assert_eq!(got.as_deref(), Ok("probe"));
    assert_eq!(
        server.seen.peers(),
        vec![Some(PeerIdentity::Node("n2".into()))]
    );

    // Loading an expired certificate fails at start, naming it.
    let err = TlsMaterial::load(&expired_dir).unwrap_err();
    assert!(matches!(err, TlsError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("expired/tls.crt"), "{err}");
}

/// TLS 1.2 is never negotiated, even by a client holding valid material:
/// a rustls client offering only 1.2 fails its handshake, the same client
/// offering only 1.3 completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_refused_and_1_3_is_negotiated() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = init_dir(tmp.path(), "ca");
    let server = serve(&TlsMaterial::load(&ca).unwrap()).await;
    let addr = server.addr;

    let handshake = |version: &'static rustls::SupportedProtocolVersion| {
        let ca = ca.clone();
        tokio::task::spawn_blocking(move || handshake(addr, &ca, version))
    };
    let tls12 = handshake(&rustls::version::TLS12).await.unwrap();
    eprintln!("TLS 1.2: {tls12:?}");
    assert!(tls12.is_err(), "{tls12:?}");
    let tls13 = handshake(&rustls::version::TLS13).await.unwrap();
    assert_eq!(tls13, Ok(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(server.seen.calls(), 0);
}

/// A blocking rustls handshake with the material in `dir`, offering only
/// `version`, using rustls' full ring provider (1.2 suites included).
fn handshake(
    addr: SocketAddr,
    dir: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<rustls::ProtocolVersion, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        CertificateDer::pem_file_iter(dir.join("ca.crt"))
            .unwrap()
            .map(Result::unwrap),
    );
    let chain = CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("tls.key")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(SERVER_NAME).unwrap())
            .unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(conn.protocol_version().unwrap())
}

#[test]
fn loading_names_the_missing_or_mismatched_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = init_dir(tmp.path(), "a");
    let b = init_dir(tmp.path(), "b");

    let err = TlsMaterial::load(&tmp.path().join("none")).unwrap_err();
    assert!(err.to_string().contains("none/ca.crt"), "{err}");
    assert!(err.to_string().contains("stowage cluster init"), "{err}");

    // a's certificate with b's key.
    let mixed = tmp.path().join("mixed");
    fs::create_dir(&mixed).unwrap();
    fs::copy(a.join("ca.crt"), mixed.join("ca.crt")).unwrap();
    fs::copy(a.join("tls.crt"), mixed.join("tls.crt")).unwrap();
    fs::copy(b.join("tls.key"), mixed.join("tls.key")).unwrap();
    let err = TlsMaterial::load(&mixed).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("mixed/tls.key"), "{err}");

    // b's certificate and key under a's CA.
    fs::copy(b.join("tls.crt"), mixed.join("tls.crt")).unwrap();
    let err = TlsMaterial::load(&mixed).unwrap_err();
    assert!(matches!(err, TlsError::Untrusted { .. }), "{err}");

    // A key file that is not PEM.
    fs::write(mixed.join("tls.key"), "not a key").unwrap();
    let err = TlsMaterial::load(&mixed).unwrap_err();
    assert!(matches!(err, TlsError::Pem { .. }), "{err}");
    assert!(err.to_string().contains("mixed/tls.key"), "{err}");

    // A certificate naming no stowage identity, though valid under its CA.
    let ca = test_ca();
    let anon = tmp.path().join("anon");
    write_tls_dir(
        &anon,
        &ca.pem,
        &test_leaf(&ca, "https://example.org/", (-1, 30)),
    );
    let err = TlsMaterial::load(&anon).unwrap_err();
    assert!(matches!(err, TlsError::NoIdentity { .. }), "{err}");
}

#[test]
fn issue_refuses_a_ca_it_cannot_sign_for() {
    let tmp = tempfile::tempdir().unwrap();
    // A CA not made by `cluster init`.
    let ca = test_ca();
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("ca.crt"), &ca.pem).unwrap();
    fs::write(foreign.join("ca.key"), ca.key.serialize_pem()).unwrap();
    let out = tmp.path().join("out");
    let err = tls::issue_node(&foreign, "n1", &out).unwrap_err();
    assert!(matches!(err, TlsError::ForeignCa { .. }), "{err}");
    assert!(!out.exists());

    // A CA key that is not the CA certificate's.
    let a = init_dir(tmp.path(), "a");
    fs::write(a.join("ca.key"), ca.key.serialize_pem()).unwrap();
    let err = tls::issue_node(&a, "n1", &out).unwrap_err();
    assert!(matches!(err, TlsError::CaKeyMismatch { .. }), "{err}");
    assert!(!out.exists());
}

fn stowage(args: &[&str]) -> Output {
    Command::new(STOWAGE).args(args).output().unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn cluster_init_writes_keys_0600_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = dir.to_str().unwrap();
    let out = stowage(&["cluster", "init", d]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(stdout.contains(&format!("{d}/{name}")), "{stdout}");
    }
    assert!(
        stdout.contains(&format!(
            "kubectl create secret generic stowage-tls --from-file={d}/ca.crt \
             --from-file={d}/tls.crt --from-file={d}/tls.key"
        )),
        "{stdout}"
    );
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("tls.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.crt")), 0o644);
    assert_eq!(mode(&dir.join("tls.crt")), 0o644);
    let material = TlsMaterial::load(&dir).unwrap();
    assert_eq!(material.identity(), PeerIdentity::Cluster);

    // Again: refused, the existing CA untouched.
    let before: Vec<String> = ["ca.crt", "ca.key", "tls.crt", "tls.key"]
        .iter()
        .map(|n| read(&dir, n))
        .collect();
    let again = stowage(&["cluster", "init", d]);
    let stderr = text(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{d}/ca.crt")), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    let after: Vec<String> = ["ca.crt", "ca.key", "tls.crt", "tls.key"]
        .iter()
        .map(|n| read(&dir, n))
        .collect();
    assert_eq!(before, after);

    // One file already there (here only tls.key): nothing else is written.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("tls.key"), "mine").unwrap();
    let refused = stowage(&["cluster", "init", other.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("other/tls.key"));
    let left: Vec<_> = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["tls.key"]);
    assert_eq!(read(&other, "tls.key"), "mine");

    // No --endpoint for local files.
    let usage = stowage(&["--endpoint", "unix:///x", "cluster", "init", d]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn cluster_issue_binds_a_certificate_to_its_node() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let c = ca.to_str().unwrap();
    assert!(stowage(&["cluster", "init", c]).status.success());
    let n1 = tmp.path().join("n1");
    let o = n1.to_str().unwrap();

    let out = stowage(&["cluster", "issue", "--ca-dir", c, "--node", "n1", o]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("may register only as n1"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "kubectl create secret generic stowage-tls-n1 --from-file={o}/ca.crt"
        )),
        "{stdout}"
    );
    let mut names: Vec<_> = fs::read_dir(&n1)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(mode(&n1.join("tls.key")), 0o600);
    assert_eq!(read(&n1, "ca.crt"), read(&ca, "ca.crt"));
    let material = TlsMaterial::load(&n1).unwrap();
    assert_eq!(material.identity(), PeerIdentity::Node("n1".into()));

    // Never over an existing certificate.
    let key = read(&n1, "tls.key");
    let again = stowage(&["cluster", "issue", "--ca-dir", c, "--node", "n1", o]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("already exists"));
    assert_eq!(read(&n1, "tls.key"), key);

    // A node id that cannot be a URI path segment.
    let bad = stowage(&[
        "cluster",
        "issue",
        "--ca-dir",
        c,
        "--node",
        "n1/../n2",
        tmp.path().join("bad").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("\"n1/../n2\""),
        "{}",
        text(&bad.stderr)
    );
    assert!(!tmp.path().join("bad").exists());

    // A --ca-dir without the CA key (a node's own directory).
    let nokey = stowage(&[
        "cluster",
        "issue",
        "--ca-dir",
        o,
        "--node",
        "n2",
        tmp.path().join("n2").to_str().unwrap(),
    ]);
    let stderr = text(&nokey.stderr);
    assert_eq!(nokey.status.code(), Some(1));
    assert!(stderr.contains(&format!("{o}/ca.key")), "{stderr}");
    assert!(stderr.contains("stowage cluster init"), "{stderr}");
}
