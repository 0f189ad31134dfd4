//! How the rest of the driver sees replicated volumes: their
//! [`ReplicatedProfile`], and a [`ReplicatedBackend`] that refuses the
//! pool operations (a replicated volume's storage is its copies, reached
//! through the controller and the engine, never one node's pool).

use std::path::PathBuf;

use crate::backend::profile::{Profile, SnapshotStrategy, StagingKind};
use crate::backend::{Attached, BackendError, Object, VolumeAttacher, VolumeStore};
use crate::volume::BackendKind;
use crate::volume::capability::{AccessType, Capability, FsType};
use crate::volume::id::Uuid;

/// The StorageClass parameters of replicated volumes.
pub const PARAMETERS: [&str; 2] = ["replicas", "locality"];

/// The default size of a replicated volume created without a capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Sizes are whole regions.
pub const GRANULARITY: u64 = super::REGION_BYTES;

#[derive(Debug)]
pub struct ReplicatedProfile;

impl Profile for ReplicatedProfile {
    fn kind(&self) -> BackendKind {
        BackendKind::Replicated
    }

    fn check_capability(&self, cap: &Capability) -> Result<(), String> {
        if cap.access_mode.is_multi_node() {
            return Err(format!(
                "access mode {:?}: a replicated volume is used by one node at a time",
                cap.access_mode
            ));
        }
        match &cap.access_type {
            AccessType::Block => Ok(()),
            AccessType::Mount { fs_type, .. } => match fs_type.as_deref() {
                None | Some("") => Ok(()),
                Some(fs) if FsType::parse(fs).is_some() => Ok(()),
                Some(fs) => Err(format!(
                    "fs_type {fs:?} is not supported (ext4, xfs, btrfs)"
                )),
            },
        }
    }

    fn filesystem(&self, caps: &[Capability]) -> Result<Option<FsType>, String> {
        crate::volume::capability::filesystem_of(caps)
    }

    fn sizes(&self, fs: Option<FsType>) -> (u64, u64) {
        (
            DEFAULT_SIZE,
            fs.map(|f| f.min_size()).unwrap_or(GRANULARITY),
        )
    }

    fn staging(&self) -> StagingKind {
        StagingKind::Device
    }

    fn snapshots(&self) -> SnapshotStrategy {
        SnapshotStrategy::PoolCopy {
            freeze_staged: true,
        }
    }

    /// The copies live on several nodes and the engine runs wherever the
    /// volume is published: no topology.
    fn node_local(&self) -> bool {
        false
    }

    fn node_expansion(&self) -> bool {
        true
    }

    fn parameters(&self) -> &'static [&'static str] {
        &PARAMETERS
    }
}

fn not_in_pool(uuid: Uuid, what: &'static str) -> BackendError {
    BackendError::Io {
        backend: BackendKind::Replicated,
        uuid,
        what,
        path: PathBuf::from("<copies>"),
        err: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "replicated volumes live in their copies on several nodes (serve --mode controller with node agents), not in one pool",
        ),
    }
}

/// The pool operations, refused: see the module documentation.
#[derive(Debug)]
pub struct ReplicatedBackend;

impl VolumeStore for ReplicatedBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Replicated
    }

    fn round_size(&self, requested: u64) -> u64 {
        requested.div_ceil(GRANULARITY).max(1) * GRANULARITY
    }

    fn create(&self, uuid: Uuid, _size: u64) -> Result<(), BackendError> {
        Err(not_in_pool(uuid, "create in the pool"))
    }

    fn delete(&self, _uuid: Uuid) -> Result<(), BackendError> {
        Ok(())
    }

    /// The node learns a volume's copies from its publication.
    fn exists(&self, _uuid: Uuid) -> bool {
        true
    }

    fn repair(&self, _uuid: Uuid, _size: u64) -> Result<bool, BackendError> {
        Ok(false)
    }

    fn list(&self) -> Result<Vec<Uuid>, BackendError> {
        Ok(Vec::new())
    }

    fn list_snapshots(&self) -> Result<Vec<Uuid>, BackendError> {
        Ok(Vec::new())
    }

    fn snapshot_exists(&self, _uuid: Uuid) -> bool {
        false
    }

    fn copy(
        &self,
        _from: Object,
        to: Object,
        _progress: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), BackendError> {
        let (Object::Volume(u) | Object::Snapshot(u)) = to;
        Err(not_in_pool(u, "copy in the pool"))
    }

    fn delete_snapshot(&self, _uuid: Uuid) -> Result<(), BackendError> {
        Ok(())
    }

    fn expand(&self, uuid: Uuid, _size: u64) -> Result<(), BackendError> {
        Err(not_in_pool(uuid, "expand in the pool"))
    }

    fn copies_are_constant_time(&self) -> bool {
        false
    }

    fn capacity_enforced(&self) -> bool {
        true
    }

    fn reserve(&self, uuid: Uuid) -> Result<bool, BackendError> {
        Err(not_in_pool(uuid, "reserve in the pool"))
    }
}

impl VolumeAttacher for ReplicatedBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Replicated
    }

    fn attach(&self, uuid: Uuid, _read_only: bool) -> Result<Attached, BackendError> {
        Err(not_in_pool(uuid, "attach from the pool"))
    }

    fn attached(&self, _uuid: Uuid) -> Result<Vec<Attached>, BackendError> {
        Ok(Vec::new())
    }

    fn detach(&self, _attached: &Attached) -> Result<(), BackendError> {
        Ok(())
    }
}
