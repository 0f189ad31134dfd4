//! Storage backends behind two small traits: [`VolumeStore`] for the
//! controller side (create, delete, list what exists in the pool) and
//! [`VolumeAttacher`] for the node side (turn a volume into "a directory" or
//! "a block device" and back). In a cluster the two run in different
//! processes, so neither keeps state the other needs. Every backend passes
//! the shared conformance suite in `tests/backend_conformance.rs`.

pub mod block;
pub mod dir;
pub mod object;
pub mod placement;
pub mod profile;
pub mod replicated;

use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::os::cow::CowError;
use crate::os::loopdev::{LoopDevice, LoopError};
use crate::os::pool::{PoolError, Strategy};
use crate::os::resize::{FileSizeLimit, ResizeError};
use crate::volume::{BackendKind, Uuid};

/// A backend step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{backend} volume {uuid}: {what} {path}: {err}")]
    Io {
        backend: BackendKind,
        uuid: Uuid,
        what: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{backend} volume {uuid} does not exist in the pool")]
    Missing { backend: BackendKind, uuid: Uuid },
    /// The pool's filesystem refuses a file as large as the volume.
    #[error("{backend} volume {uuid}: {path} cannot be {requested} bytes long: {limit}")]
    TooLarge {
        backend: BackendKind,
        uuid: Uuid,
        path: PathBuf,
        requested: u64,
        limit: FileSizeLimit,
    },
    #[error("{backend} volume {uuid} exists with size {existing}, not {requested}")]
    SizeMismatch {
        backend: BackendKind,
        uuid: Uuid,
        existing: u64,
        requested: u64,
    },
    #[error("pool {path}: {err}")]
    Pool {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error("{backend} {what}: {err}")]
    Copy {
        backend: BackendKind,
        what: String,
        #[source]
        err: CowError,
    },
    #[error(transparent)]
    Btrfs(#[from] PoolError),
    #[error(transparent)]
    Resize(#[from] ResizeError),
    #[error(transparent)]
    Quota(#[from] crate::os::quota::QuotaError),
}

impl BackendError {
    /// The errno of the system call that failed underneath, where one did
    /// (external commands and checks of our own have none).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            BackendError::Io { err, .. } | BackendError::Pool { err, .. } => io_errno(err),
            BackendError::Missing { .. }
            | BackendError::TooLarge { .. }
            | BackendError::SizeMismatch { .. }
            | BackendError::Quota(_) => None,
            BackendError::Loop(e) => loop_errno(e),
            BackendError::Copy { err, .. } => cow_errno(err),
            BackendError::Btrfs(e) => pool_errno(e),
            BackendError::Resize(e) => resize_errno(e),
        }
    }

    /// Whether the step failed because the pool is out of space (ENOSPC)
    /// or over a quota (EDQUOT): the CO may retry once space is freed.
    pub fn is_no_space(&self) -> bool {
        is_no_space(self.errno())
    }
}

/// ENOSPC or EDQUOT.
pub fn is_no_space(errno: Option<Errno>) -> bool {
    matches!(errno, Some(Errno::ENOSPC | Errno::EDQUOT))
}

fn io_errno(err: &std::io::Error) -> Option<Errno> {
    err.raw_os_error().map(Errno::from_raw)
}

/// The errno under a loop device step, where one failed.
pub fn loop_errno(e: &LoopError) -> Option<Errno> {
    match e {
        LoopError::Open { err, .. } | LoopError::Sysfs(err) => io_errno(err),
        LoopError::GetFree(errno)
        | LoopError::Configure { errno, .. }
        | LoopError::Detach { errno, .. }
        | LoopError::SetCapacity { errno, .. } => Some(*errno),
        LoopError::Exhausted { .. } => None,
    }
}

/// Every copy step, so that a new one must say whether it has an errno.
fn cow_errno(e: &CowError) -> Option<Errno> {
    match e {
        CowError::Open { err, .. }
        | CowError::Create { err, .. }
        | CowError::Read { err, .. }
        | CowError::Write { err, .. }
        | CowError::SetLength { err, .. }
        | CowError::MakeDir { err, .. }
        | CowError::Symlink { err, .. }
        | CowError::HardLink { err, .. }
        | CowError::SetOwner { err, .. }
        | CowError::SetMode { err, .. } => io_errno(err),
        CowError::Stat { errno, .. }
        | CowError::ReflinkUnsupported { errno, .. }
        | CowError::Reflink { errno, .. }
        | CowError::Seek { errno, .. }
        | CowError::CopyRange { errno, .. }
        | CowError::Fiemap { errno, .. }
        | CowError::ReadDir { errno, .. }
        | CowError::ReadLink { errno, .. }
        | CowError::MakeNode { errno, .. }
        | CowError::SetTimes { errno, .. } => Some(*errno),
        CowError::NotRegularFile { .. }
        | CowError::Changed { .. }
        | CowError::Cancelled { .. }
        | CowError::SourceShrank { .. }
        | CowError::CrossesFilesystem { .. }
        | CowError::DestinationInsideSource { .. } => None,
    }
}

fn pool_errno(e: &PoolError) -> Option<Errno> {
    match e {
        PoolError::Statfs { errno, .. } => Some(*errno),
        PoolError::Stat { err, .. }
        | PoolError::ProbeFile { err, .. }
        | PoolError::RemoveProbe { err, .. } => io_errno(err),
        PoolError::ReflinkProbe { source, .. } => cow_errno(source),
        PoolError::Exists { .. }
        | PoolError::SubvolumeCreate { .. }
        | PoolError::SubvolumeSnapshot { .. }
        | PoolError::SubvolumeDelete { .. } => None,
    }
}

fn resize_errno(e: &ResizeError) -> Option<Errno> {
    match e {
        ResizeError::Open { err, .. } | ResizeError::SetLength { err, .. } => io_errno(err),
        ResizeError::TooLarge { .. } => Some(Errno::EFBIG),
        // Found by a probe allocation that answered ENOSPC or EDQUOT.
        ResizeError::PoolFull { .. } => Some(Errno::ENOSPC),
        ResizeError::Unsupported { .. }
        | ResizeError::MissingCapability { .. }
        | ResizeError::Grow { .. }
        | ResizeError::NotRegularFile { .. }
        | ResizeError::Shrink { .. } => None,
    }
}

/// A volume or a snapshot, as a source or destination of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Volume(Uuid),
    Snapshot(Uuid),
}

/// What a volume looks like once attached on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// A directory to bind-mount.
    Directory(PathBuf),
    /// A block device node.
    Device(LoopDevice),
}

/// Controller-side operations on a pool.
pub trait VolumeStore: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// The size a volume really gets for `requested` bytes (rounded up to
    /// the backend's granularity).
    fn round_size(&self, requested: u64) -> u64;

    /// Creates the volume's storage with `size` bytes. Idempotent: an
    /// existing volume of the same size is success; for a backend whose
    /// storage has a size (block), an existing volume of another size is
    /// [`BackendError::SizeMismatch`] (dir volumes only record their size).
    /// Nothing is left behind on failure. Not made durable here: the
    /// controller's record is, and the controller recreates storage that a
    /// crash lost (an empty new volume) when it starts.
    fn create(&self, uuid: Uuid, size: u64) -> Result<(), BackendError>;

    /// Removes the volume's storage. Idempotent: a missing volume is
    /// success. Not made durable here: storage that reappears after a
    /// crash has no record and is removed when the controller starts.
    fn delete(&self, uuid: Uuid) -> Result<(), BackendError>;

    /// Whether the volume's storage exists.
    fn exists(&self, uuid: Uuid) -> bool;

    /// Recreates storage that a crash lost (it was created but not yet
    /// durable): missing storage is created, a block image shorter than
    /// `size` is extended. Returns whether anything had to be repaired.
    fn repair(&self, uuid: Uuid, size: u64) -> Result<bool, BackendError>;

    /// Every volume present in the pool (to find orphans after a crash).
    fn list(&self) -> Result<Vec<Uuid>, BackendError>;

    /// Every snapshot present in the pool.
    fn list_snapshots(&self) -> Result<Vec<Uuid>, BackendError>;

    /// Whether a snapshot's storage exists.
    fn snapshot_exists(&self, uuid: Uuid) -> bool;

    /// Makes `to` (which must not exist) a copy of `from`, with the pool's
    /// strategy: O(1) with btrfs snapshots or reflinks, a sparse copy
    /// otherwise (`progress(copied, total)` is called as it goes, and a
    /// copy it answers `false` stops, cancelled). `from`
    /// must not change meanwhile (the caller freezes a mounted
    /// filesystem). Nothing is left at `to` on failure.
    fn copy(
        &self,
        from: Object,
        to: Object,
        progress: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), BackendError>;

    /// Removes a snapshot's storage. Idempotent.
    fn delete_snapshot(&self, uuid: Uuid) -> Result<(), BackendError>;

    /// Grows a volume's storage to `size` bytes (block images; dir volumes
    /// only record their size). Never shrinks.
    fn expand(&self, uuid: Uuid, size: u64) -> Result<(), BackendError>;

    /// Whether copies are O(1) on this pool.
    fn copies_are_constant_time(&self) -> bool;

    /// Whether the pool holds a volume to its capacity (images always do;
    /// dir volumes where quotas allow).
    fn capacity_enforced(&self) -> bool;

    /// Reserves the volume's whole size in the pool (thick provisioning),
    /// keeping its data. Ok(false) when the pool has no room (ENOSPC).
    fn reserve(&self, uuid: Uuid) -> Result<bool, BackendError>;
}

/// Node-side operations on a pool.
pub trait VolumeAttacher: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// Makes the volume usable on this node. Each call attaches anew (a
    /// second loop device for a block volume); callers look for an existing
    /// attachment with [`VolumeAttacher::attached`] first.
    fn attach(&self, uuid: Uuid, read_only: bool) -> Result<Attached, BackendError>;

    /// The volume's current attachments on this node.
    fn attached(&self, uuid: Uuid) -> Result<Vec<Attached>, BackendError>;

    /// Undoes one attachment. Idempotent.
    fn detach(&self, attached: &Attached) -> Result<(), BackendError>;
}

/// The pool's layout: `<pool>/volumes/<backend>/<uuid>[.img]`.
pub fn backend_dir(pool: &Path, kind: BackendKind) -> PathBuf {
    pool.join("volumes").join(kind.as_str())
}

/// Snapshots: `<pool>/snapshots/<backend>/<uuid>[.img]`.
pub fn snapshot_dir(pool: &Path, kind: BackendKind) -> PathBuf {
    pool.join("snapshots").join(kind.as_str())
}

/// Creates the pool directories for every backend (mode 0700 on the pool
/// root: volumes are reached through mounts, never by browsing the pool).
pub fn prepare_pool(pool: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |path: &Path| {
        let path = path.to_owned();
        move |err| BackendError::Pool { path, err }
    };
    std::fs::create_dir_all(pool).map_err(err(pool))?;
    std::fs::set_permissions(pool, std::fs::Permissions::from_mode(0o700)).map_err(err(pool))?;
    for kind in BackendKind::LOCAL {
        for d in [backend_dir(pool, kind), snapshot_dir(pool, kind)] {
            std::fs::create_dir_all(&d).map_err(err(&d))?;
        }
    }
    Ok(())
}

pub(crate) fn list_uuids(dir: &Path, suffix: &str) -> Result<Vec<Uuid>, BackendError> {
    let err = |err| BackendError::Pool {
        path: dir.to_owned(),
        err,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name();
        if let Some(u) = name
            .to_str()
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(Uuid::parse_hex)
        {
            out.push(u);
        }
    }
    out.sort();
    Ok(out)
}

/// Every local backend over one pool.
#[derive(Debug, Clone)]
pub struct Backends {
    pub pool: PathBuf,
    pub strategy: Strategy,
    pub dir: dir::DirBackend,
    pub block: block::BlockBackend,
    /// Where the pool's image file lives when the pool is kept in one
    /// (see [`placement`]): its free space bounds the pool's.
    pub image_host: Option<PathBuf>,
}

impl Backends {
    /// Backends over `pool`, copying with `strategy` (see
    /// [`crate::os::pool::probe`]), without dir capacity limits.
    pub fn new(pool: &Path, strategy: Strategy) -> Self {
        Self::with_quota(pool, strategy, crate::os::quota::Enforcement::None)
    }

    /// Backends whose dir volumes are limited by `enforcement`.
    pub fn with_quota(
        pool: &Path,
        strategy: Strategy,
        enforcement: crate::os::quota::Enforcement,
    ) -> Self {
        Self {
            pool: pool.to_owned(),
            strategy,
            dir: dir::DirBackend::new(pool, strategy).with_quota(enforcement),
            block: block::BlockBackend::new(pool, strategy),
            image_host: None,
        }
    }

    /// Notes that the pool is kept in an image file in `dir`.
    pub fn with_image_host(mut self, dir: Option<PathBuf>) -> Self {
        self.image_host = dir;
        self
    }

    /// Bytes new volumes can still get: the pool's free space, bounded by
    /// the free space of the filesystem holding the pool image, if any
    /// (the image is sparse, so the host can run out first).
    pub fn available_bytes(&self) -> std::io::Result<u64> {
        let pool = crate::os::fs::usage(&self.pool)?.available_bytes;
        match &self.image_host {
            Some(host) => Ok(pool.min(crate::os::fs::usage(host)?.available_bytes)),
            None => Ok(pool),
        }
    }

    /// How this pool limits dir volumes, found and switched on at start.
    pub fn probe_quota(pool: &Path, strategy: Strategy) -> crate::os::quota::Enforcement {
        use crate::os::quota::{self, Enforcement};
        if strategy == Strategy::BtrfsSubvolumes {
            match quota::btrfs_enable_quota(pool) {
                Ok(()) => return Enforcement::BtrfsQgroups,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot enable btrfs quotas; dir capacity will not be enforced")
                }
            }
        }
        Enforcement::None
    }

    pub fn store(&self, kind: BackendKind) -> &dyn VolumeStore {
        match kind {
            BackendKind::Dir => &self.dir,
            BackendKind::Block => &self.block,
            BackendKind::Object => &object::ObjectBackend,
            BackendKind::Replicated => &replicated::backend::ReplicatedBackend,
        }
    }

    pub fn attacher(&self, kind: BackendKind) -> &dyn VolumeAttacher {
        match kind {
            BackendKind::Dir => &self.dir,
            BackendKind::Block => &self.block,
            BackendKind::Object => &object::ObjectBackend,
            BackendKind::Replicated => &replicated::backend::ReplicatedBackend,
        }
    }
}

/// The decisions of the backend of `kind`.
pub fn profile(kind: BackendKind) -> &'static dyn profile::Profile {
    match kind {
        BackendKind::Dir => &dir::DirProfile,
        BackendKind::Block => &block::BlockProfile,
        BackendKind::Object => &object::ObjectProfile,
        BackendKind::Replicated => &replicated::backend::ReplicatedProfile,
    }
}
