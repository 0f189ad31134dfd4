//! stowage: a Container Storage Interface driver for local `dir` and `block`
//! volumes (and, as the project grows, object and replicated ones).
//!
//! Layers, with dependencies pointing downwards only:
//! `server` (gRPC) → `volume` (domain) → `backend` → `os` (syscalls, tools),
//! with `state` (durable records) used by the domain.

pub mod backend;
pub mod client;
pub mod cluster;
pub mod os;
pub mod server;
pub mod state;
pub mod volume;

/// Code generated from `proto/csi.proto` at build time.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The version string reported in GetPluginInfo: crate version and commit.
pub const VENDOR_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), "+", env!("STOWAGE_GIT_COMMIT"));
