//! The `dir` backend: a directory per volume in the pool, bind-mounted on
//! the node. Capacity is recorded but not enforced on this pool (quotas
//! come with the snapshot/expansion work).
//!
//! A new volume's root is `0755`, owned by the server (root), like the root
//! of a freshly made filesystem on a block volume, and never world-writable.
//! Sharing it with a pod's users is the CO's job: with `fsGroupPolicy:
//! File` on the CSIDriver (DESIGN.md), the kubelet gives the volume to the
//! pod's fsGroup (group owner, group rw, setgid) before the pod starts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{
    Attached, BackendError, Object, VolumeAttacher, VolumeStore, backend_dir, list_uuids,
    snapshot_dir,
};
use crate::os::cow;
use crate::os::pool::{self, Strategy};
use crate::os::quota::{self, Enforcement};
use crate::volume::{BackendKind, Uuid};

/// The mode of a new volume's root directory.
pub const ROOT_MODE: u32 = 0o755;

/// Directory volumes under `<pool>/volumes/dir/`.
#[derive(Debug, Clone)]
pub struct DirBackend {
    root: PathBuf,
    snapshots: PathBuf,
    strategy: Strategy,
    enforcement: Enforcement,
}

impl DirBackend {
    pub fn new(pool: &Path, strategy: Strategy) -> Self {
        Self {
            root: backend_dir(pool, BackendKind::Dir),
            snapshots: snapshot_dir(pool, BackendKind::Dir),
            strategy,
            enforcement: Enforcement::None,
        }
    }

    /// Enforces dir volume capacity with `enforcement`.
    pub fn with_quota(mut self, enforcement: Enforcement) -> Self {
        self.enforcement = enforcement;
        self
    }

    /// Limits the volume's directory to `size` bytes where the pool can.
    fn limit(&self, uuid: Uuid, size: u64) -> Result<(), BackendError> {
        if size == 0 {
            return Ok(());
        }
        let p = self.path(uuid);
        match self.enforcement {
            Enforcement::None => Ok(()),
            Enforcement::BtrfsQgroups => Ok(quota::btrfs_limit(&p, size)?),
        }
    }

    /// A snapshot's directory.
    pub fn snapshot_path(&self, uuid: Uuid) -> PathBuf {
        self.snapshots.join(uuid.to_hex())
    }

    fn object_path(&self, o: Object) -> PathBuf {
        match o {
            Object::Volume(u) => self.path(u),
            Object::Snapshot(u) => self.snapshot_path(u),
        }
    }

    /// Removes a directory tree that may be a btrfs subvolume.
    fn remove_tree(&self, uuid: Uuid, p: &Path) -> Result<(), BackendError> {
        if self.strategy == Strategy::BtrfsSubvolumes
            && pool::is_btrfs_subvolume(p).unwrap_or(false)
        {
            return Ok(pool::btrfs_subvolume_delete(p)?);
        }
        match std::fs::remove_dir_all(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(uuid, "delete", p)(e)),
        }
    }

    /// A copy keeps its source root's owner and mode (the kubelet may have
    /// given it to a pod's fsGroup), except that a volume root is never
    /// world-writable: volumes made by earlier versions were 0777, and a
    /// clone or restore of one must not hand that on.
    fn not_world_writable(root: &Path) -> std::io::Result<()> {
        let mode = std::fs::symlink_metadata(root)?.permissions().mode() & 0o7777;
        if mode & 0o002 == 0 {
            return Ok(());
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode & !0o002))
    }

    /// The volume's directory.
    pub fn path(&self, uuid: Uuid) -> PathBuf {
        self.root.join(uuid.to_hex())
    }

    fn io(
        &self,
        uuid: Uuid,
        what: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> BackendError {
        let path = path.to_owned();
        move |err| BackendError::Io {
            backend: BackendKind::Dir,
            uuid,
            what,
            path,
            err,
        }
    }
}

impl VolumeStore for DirBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dir
    }

    fn round_size(&self, requested: u64) -> u64 {
        requested
    }

    fn create(&self, uuid: Uuid, size: u64) -> Result<(), BackendError> {
        let _size = size;
        let p = self.path(uuid);
        if p.is_dir() {
            return Ok(());
        }
        if self.strategy == Strategy::BtrfsSubvolumes {
            // A subvolume per volume: snapshots of it are atomic and O(1).
            pool::btrfs_subvolume_create(&p)?;
        } else {
            match std::fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {
                    return Ok(());
                }
                Err(e) => return Err(self.io(uuid, "create", &p)(e)),
            }
        }
        // Set explicitly: the mode given at creation is cut by the umask
        // (and btrfs picks its own).
        let r = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(ROOT_MODE));
        if let Err(e) = r {
            let _ = self.remove_tree(uuid, &p);
            return Err(self.io(uuid, "chmod", &p)(e));
        }
        if let Err(e) = self.limit(uuid, _size) {
            let _ = self.remove_tree(uuid, &p);
            return Err(e);
        }
        Ok(())
    }

    fn delete(&self, uuid: Uuid) -> Result<(), BackendError> {
        let p = self.path(uuid);
        self.remove_tree(uuid, &p)
    }

    fn exists(&self, uuid: Uuid) -> bool {
        self.path(uuid).is_dir()
    }

    fn repair(&self, uuid: Uuid, size: u64) -> Result<bool, BackendError> {
        if self.exists(uuid) {
            return Ok(false);
        }
        self.create(uuid, size).map(|()| true)
    }

    fn list(&self) -> Result<Vec<Uuid>, BackendError> {
        list_uuids(&self.root, "")
    }

    fn list_snapshots(&self) -> Result<Vec<Uuid>, BackendError> {
        list_uuids(&self.snapshots, "")
    }

    fn snapshot_exists(&self, uuid: Uuid) -> bool {
        self.snapshot_path(uuid).is_dir()
    }

    fn copy(
        &self,
        from: Object,
        to: Object,
        _progress: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), BackendError> {
        let (src, dst) = (self.object_path(from), self.object_path(to));
        if self.strategy == Strategy::BtrfsSubvolumes
            && pool::is_btrfs_subvolume(&src).unwrap_or(false)
        {
            // Snapshots are read-only subvolumes; volumes made from them
            // are writable ones.
            let readonly = matches!(to, Object::Snapshot(_));
            pool::btrfs_subvolume_snapshot(&src, &dst, readonly)?;
        } else {
            cow::reflink_tree(&src, &dst)
                .map(drop)
                .map_err(|err| BackendError::Copy {
                    backend: BackendKind::Dir,
                    what: format!("copy {} to {}", src.display(), dst.display()),
                    err,
                })?;
        }
        if let Object::Volume(uuid) = to
            && let Err(e) = Self::not_world_writable(&dst)
        {
            let _ = self.remove_tree(uuid, &dst);
            return Err(self.io(uuid, "chmod", &dst)(e));
        }
        Ok(())
    }

    fn delete_snapshot(&self, uuid: Uuid) -> Result<(), BackendError> {
        let p = self.snapshot_path(uuid);
        self.remove_tree(uuid, &p)
    }

    fn expand(&self, uuid: Uuid, size: u64) -> Result<(), BackendError> {
        self.limit(uuid, size)
    }

    fn capacity_enforced(&self) -> bool {
        self.enforcement != Enforcement::None
    }

    fn copies_are_constant_time(&self) -> bool {
        self.strategy == Strategy::BtrfsSubvolumes
    }

    fn reserve(&self, _uuid: Uuid) -> Result<bool, BackendError> {
        Ok(true)
    }
}

impl VolumeAttacher for DirBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dir
    }

    fn attach(&self, uuid: Uuid, _read_only: bool) -> Result<Attached, BackendError> {
        if !self.exists(uuid) {
            return Err(BackendError::Missing {
                backend: BackendKind::Dir,
                uuid,
            });
        }
        Ok(Attached::Directory(self.path(uuid)))
    }

    fn attached(&self, uuid: Uuid) -> Result<Vec<Attached>, BackendError> {
        Ok(if self.exists(uuid) {
            vec![Attached::Directory(self.path(uuid))]
        } else {
            vec![]
        })
    }

    fn detach(&self, _attached: &Attached) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The dir backend's decisions: directories of the pool, bind-mounted.
#[derive(Debug)]
pub struct DirProfile;

impl super::profile::Profile for DirProfile {
    fn kind(&self) -> BackendKind {
        BackendKind::Dir
    }

    fn check_capability(&self, cap: &crate::volume::capability::Capability) -> Result<(), String> {
        super::profile::node_local_modes(BackendKind::Dir, cap)?;
        super::profile::no_fs_type(BackendKind::Dir, "directories on the pool", cap)
    }

    fn staging(&self) -> super::profile::StagingKind {
        super::profile::StagingKind::BindDirectory
    }

    fn snapshots(&self) -> super::profile::SnapshotStrategy {
        // The pool's filesystem is never frozen; on btrfs the snapshot of
        // a subvolume is atomic anyway.
        super::profile::SnapshotStrategy::PoolCopy {
            freeze_staged: false,
        }
    }
}
