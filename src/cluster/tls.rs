//! TEMPORARY minimal TLS loading (replaced by the full module from
//! branch wt-tls before merge).
use std::path::Path;

pub const SERVER_NAME: &str = "stowage-cluster";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    Cluster,
    Node(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

#[derive(Debug, Clone)]
pub struct TlsMaterial {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TlsMaterial {
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let r = |f: &str| std::fs::read(dir.join(f)).map_err(|e| TlsError(format!("{f}: {e}")));
        Ok(Self {
            ca: r("ca.crt")?,
            cert: r("tls.crt")?,
            key: r("tls.key")?,
        })
    }
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca))
    }
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .domain_name(SERVER_NAME)
    }
    pub fn identity(&self) -> PeerIdentity {
        PeerIdentity::Cluster
    }
}

pub fn peer_identity<T>(_req: &tonic::Request<T>) -> Option<PeerIdentity> {
    Some(PeerIdentity::Cluster)
}
