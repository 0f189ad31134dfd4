//! Several hosts (DESIGN.md, "Many nodes"): node agents serve the
//! controller-side operations of their own pool on one mutually
//! authenticated TLS port and register with a stateless controller, which
//! routes CSI Controller calls to them. Everything between processes is
//! mutual TLS under one cluster CA.

pub mod agent;
pub mod link;
pub mod names;
mod record;
pub mod registry;
pub mod replica;
pub mod replicated;
pub mod router;
pub mod tls;

/// stowage's own cluster API (registration, agent, admin), generated from
/// `proto/stowage_cluster.proto` at build time.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("stowage.cluster.v1");
}
