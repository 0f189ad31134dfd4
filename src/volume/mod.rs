//! The domain: volume and node records, IDs, parameters, capabilities, the
//! in-flight guard, and the controller and node operations. Knows nothing of
//! gRPC; reaches the OS only through `backend` and `os`.

pub mod capability;
pub mod controller;
pub mod error;
pub mod group;
pub mod id;
pub mod inflight;
pub mod metadata;
pub mod node;
pub mod object;
pub mod params;
pub mod paths;
pub mod record;
pub mod snapshot;
pub mod token;

pub use capability::{AccessMode, AccessType, Capability, FsType};
pub use error::{Error, Result};
pub use id::{BackendKind, SnapshotId, Uuid, VolumeId};

/// The topology key naming the node a local volume lives on.
pub const TOPOLOGY_NODE_KEY: &str = "stowage.csi.dev/node";
