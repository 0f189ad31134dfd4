//! What differs from one backend to another, asked by the domain instead of
//! matching on the backend's kind: which capabilities and access modes it
//! serves, its sizes, what staging a volume means, how it snapshots, and
//! where its volumes live. Each backend module has a [`Profile`]; adding a
//! backend adds one, not a match arm in every domain file.

use crate::volume::BackendKind;
use crate::volume::capability::{AccessType, Capability, FsType};

/// What NodeStageVolume does for a volume of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingKind {
    /// Bind-mounts a directory of the pool at the staging path.
    BindDirectory,
    /// Attaches a device; mount capabilities also get a filesystem on it,
    /// mounted at the staging path.
    Device,
    /// Mounts a remote store at the staging path with a FUSE daemon that
    /// outlives the node plugin.
    Fuse,
}

/// How snapshots of the backend's volumes are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStrategy {
    /// A copy in the pool (O(1) where the pool reflinks or snapshots); a
    /// filesystem staged on the controller's node is frozen meanwhile.
    PoolCopy { freeze_staged: bool },
    /// A server-side copy of every object, in the background.
    ServerSideCopy,
}

/// The per-backend decisions of the domain.
pub trait Profile: Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// Whether the backend can serve `cap`; the reason when not.
    fn check_capability(&self, cap: &Capability) -> Result<(), String>;

    /// The filesystem a new volume gets from its capabilities (backends
    /// that format a device); None for backends that do not.
    fn filesystem(&self, caps: &[Capability]) -> Result<Option<FsType>, String> {
        let _ = caps;
        Ok(None)
    }

    /// The size of a volume created without a capacity range, and the
    /// smallest one (for a volume with filesystem `fs`).
    fn sizes(&self, fs: Option<FsType>) -> (u64, u64) {
        let _ = fs;
        (0, 0)
    }

    fn staging(&self) -> StagingKind;

    fn snapshots(&self) -> SnapshotStrategy;

    /// Whether volumes live in one node's pool (topology: that node, and
    /// only single-node access modes); false for remote storage every node
    /// reaches.
    fn node_local(&self) -> bool {
        true
    }

    /// Whether expansion also needs NodeExpandVolume (a filesystem to grow).
    fn node_expansion(&self) -> bool {
        false
    }

    /// The mutable parameters (ControllerModifyVolume) the backend honours.
    fn mutable_parameters(&self) -> &'static [&'static str] {
        &[]
    }

    /// The StorageClass parameters of the backend itself, beyond the
    /// common `backend` and `node`.
    fn parameters(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether SnapshotMetadata can list its snapshots' allocated blocks.
    fn block_metadata(&self) -> bool {
        false
    }
}

/// The reason a node-local backend refuses multi-node access modes.
pub(crate) fn node_local_modes(kind: BackendKind, cap: &Capability) -> Result<(), String> {
    if cap.access_mode.is_multi_node() {
        return Err(format!(
            "access mode {:?} needs a multi-node backend; {kind} volumes are node-local",
            cap.access_mode
        ));
    }
    Ok(())
}

/// Refuses an `fs_type` on a mount capability of a backend that has no
/// filesystem to choose.
pub(crate) fn no_fs_type(kind: BackendKind, what: &str, cap: &Capability) -> Result<(), String> {
    match &cap.access_type {
        AccessType::Block => Err(format!(
            "{kind} volumes cannot be used as raw block devices"
        )),
        AccessType::Mount { fs_type, .. } => match fs_type.as_deref() {
            None | Some("") => Ok(()),
            Some(fs) => Err(format!(
                "{kind} volumes are {what}; fs_type {fs:?} cannot be chosen"
            )),
        },
    }
}
