//! The `block` backend: a sparse image file per volume, attached on the
//! node as a loop device (direct I/O where the pool allows).

use std::path::{Path, PathBuf};

use super::{
    Attached, BackendError, Object, VolumeAttacher, VolumeStore, backend_dir, list_uuids,
    snapshot_dir,
};
use crate::os::cow;
use crate::os::loopdev::LoopDevice;
use crate::os::pool::Strategy;
use crate::os::resize::ResizeError;
use crate::volume::{BackendKind, Uuid};

/// Images are sized in whole MiB.
pub const GRANULARITY: u64 = 1 << 20;

/// Image volumes under `<pool>/volumes/block/`.
#[derive(Debug, Clone)]
pub struct BlockBackend {
    root: PathBuf,
    snapshots: PathBuf,
    strategy: Strategy,
}

impl BlockBackend {
    pub fn new(pool: &Path, strategy: Strategy) -> Self {
        Self {
            root: backend_dir(pool, BackendKind::Block),
            snapshots: snapshot_dir(pool, BackendKind::Block),
            strategy,
        }
    }

    /// A snapshot's image file.
    pub fn snapshot_image(&self, uuid: Uuid) -> PathBuf {
        self.snapshots.join(format!("{}.img", uuid.to_hex()))
    }

    fn object_path(&self, o: Object) -> PathBuf {
        match o {
            Object::Volume(u) => self.image(u),
            Object::Snapshot(u) => self.snapshot_image(u),
        }
    }

    /// The volume's image file.
    pub fn image(&self, uuid: Uuid) -> PathBuf {
        self.root.join(format!("{}.img", uuid.to_hex()))
    }

    /// The scratch copy in which [`BlockBackend::grow_ext4_offline`]
    /// grows an image (not `*.img`: never listed as a volume).
    fn grow_work(&self, uuid: Uuid) -> PathBuf {
        self.root.join(format!("{}.img.grow", uuid.to_hex()))
    }

    /// Grows the ext4 filesystem in the (unattached) image of `uuid` to
    /// fill the image, offline, for hosts where online growth is not
    /// allowed (no CAP_SYS_RESOURCE). Atomic: `e2fsck` and `resize2fs` run
    /// on a copy of the image (a reflink where the pool shares extents),
    /// which then replaces it by rename. A crash at any point leaves
    /// either the old image, which the next stage grows again, or the
    /// grown one, never a half-resized filesystem (resize2fs killed in
    /// the middle leaves one that needs a manual fsck). Returns whether it
    /// grew anything; an image whose ext4 already fills it, or that holds
    /// no ext4, is left alone.
    pub fn grow_ext4_offline(&self, uuid: Uuid) -> Result<bool, BackendError> {
        let image = self.image(uuid);
        let work = self.grow_work(uuid);
        match std::fs::remove_file(&work) {
            Ok(()) => tracing::warn!(%uuid, "removed an interrupted grow's scratch copy"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(uuid, "remove", &work)(e)),
        }
        if crate::os::filesystem::probe(&image)
            .map_err(|source| ResizeError::Grow {
                fs_type: "ext4".to_owned(),
                target: image.clone(),
                source,
            })?
            .as_deref()
            != Some("ext4")
            || crate::os::resize::ext4_fills_device(&image)?
        {
            return Ok(false);
        }
        let copy_err = |what: &str, err| BackendError::Copy {
            backend: BackendKind::Block,
            what: format!("{what} {} to {}", image.display(), work.display()),
            err,
        };
        let reflinked = self.strategy != Strategy::Copy
            && match cow::reflink(&image, &work) {
                Ok(()) => true,
                Err(e) if e.is_not_supported() => false,
                Err(e) => return Err(copy_err("reflink", e)),
            };
        if !reflinked {
            cow::sparse_copy(&image, &work, &|_, _| true).map_err(|e| copy_err("copy", e))?;
        }
        let grown = crate::os::resize::grow_ext4_offline(&work)
            .map_err(BackendError::from)
            .and_then(|()| {
                std::fs::File::open(&work)
                    .and_then(|f| f.sync_all())
                    .map_err(self.io(uuid, "sync", &work))
            })
            .and_then(|()| std::fs::rename(&work, &image).map_err(self.io(uuid, "rename", &work)));
        if let Err(e) = grown {
            let _ = std::fs::remove_file(&work);
            return Err(e);
        }
        crate::os::fs::sync_dir(&self.root).map_err(self.io(uuid, "sync", &self.root))?;
        Ok(true)
    }

    /// Whether `path` is an image of this backend (for leak sweeps).
    pub fn owns_image(&self, path: &Path) -> Option<Uuid> {
        if path.parent()? != self.root {
            return None;
        }
        Uuid::parse_hex(path.file_name()?.to_str()?.strip_suffix(".img")?)
    }

    fn io(
        &self,
        uuid: Uuid,
        what: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> BackendError {
        let path = path.to_owned();
        move |err| BackendError::Io {
            backend: BackendKind::Block,
            uuid,
            what,
            path,
            err,
        }
    }
}

impl BlockBackend {
    /// Attaches the image to a new loop device (see [`VolumeAttacher::attach`]).
    pub fn attach_image(&self, uuid: Uuid, read_only: bool) -> Result<Attached, BackendError> {
        VolumeAttacher::attach(self, uuid, read_only)
    }
}

impl VolumeStore for BlockBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Block
    }

    fn round_size(&self, requested: u64) -> u64 {
        requested.div_ceil(GRANULARITY).max(1) * GRANULARITY
    }

    fn create(&self, uuid: Uuid, size: u64) -> Result<(), BackendError> {
        let p = self.image(uuid);
        match crate::os::fs::create_sparse(&p, size) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let existing = std::fs::metadata(&p)
                    .map_err(self.io(uuid, "stat", &p))?
                    .len();
                if existing == size {
                    Ok(())
                } else {
                    Err(BackendError::SizeMismatch {
                        backend: BackendKind::Block,
                        uuid,
                        existing,
                        requested: size,
                    })
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&p);
                if e.raw_os_error() == Some(libc::EFBIG) {
                    return Err(BackendError::TooLarge {
                        backend: BackendKind::Block,
                        uuid,
                        requested: size,
                        limit: crate::os::resize::file_size_limit(&self.root),
                        path: p,
                    });
                }
                Err(self.io(uuid, "create", &p)(e))
            }
        }
    }

    fn delete(&self, uuid: Uuid) -> Result<(), BackendError> {
        let _ = std::fs::remove_file(self.grow_work(uuid));
        let p = self.image(uuid);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(uuid, "delete", &p)(e)),
        }
    }

    fn exists(&self, uuid: Uuid) -> bool {
        self.image(uuid).is_file()
    }

    fn repair(&self, uuid: Uuid, size: u64) -> Result<bool, BackendError> {
        let p = self.image(uuid);
        match std::fs::metadata(&p) {
            Ok(md) if md.len() >= size => Ok(false),
            Ok(_) => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(size))
                .map(|()| true)
                .map_err(self.io(uuid, "extend", &p)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.create(uuid, size).map(|()| true)
            }
            Err(e) => Err(self.io(uuid, "stat", &p)(e)),
        }
    }

    fn list(&self) -> Result<Vec<Uuid>, BackendError> {
        list_uuids(&self.root, ".img")
    }

    fn list_snapshots(&self) -> Result<Vec<Uuid>, BackendError> {
        list_uuids(&self.snapshots, ".img")
    }

    fn snapshot_exists(&self, uuid: Uuid) -> bool {
        self.snapshot_image(uuid).is_file()
    }

    fn copy(
        &self,
        from: Object,
        to: Object,
        progress: &dyn Fn(u64, u64) -> bool,
    ) -> Result<(), BackendError> {
        let (src, dst) = (self.object_path(from), self.object_path(to));
        let err = |what: &str, err| BackendError::Copy {
            backend: BackendKind::Block,
            what: format!("{what} {} to {}", src.display(), dst.display()),
            err,
        };
        if self.strategy != Strategy::Copy {
            match cow::reflink(&src, &dst) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_not_supported() => {}
                Err(e) => return Err(err("reflink", e)),
            }
        }
        cow::sparse_copy(&src, &dst, progress)
            .map(drop)
            .map_err(|e| err("copy", e))
    }

    fn delete_snapshot(&self, uuid: Uuid) -> Result<(), BackendError> {
        let p = self.snapshot_image(uuid);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(uuid, "delete snapshot", &p)(e)),
        }
    }

    fn expand(&self, uuid: Uuid, size: u64) -> Result<(), BackendError> {
        use crate::os::resize::{self, ResizeError};
        match resize::grow_file(&self.image(uuid), size) {
            Ok(()) => Ok(()),
            Err(ResizeError::TooLarge {
                path,
                requested,
                limit,
            }) => Err(BackendError::TooLarge {
                backend: BackendKind::Block,
                uuid,
                path,
                requested,
                limit,
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn copies_are_constant_time(&self) -> bool {
        self.strategy != Strategy::Copy
    }

    fn capacity_enforced(&self) -> bool {
        true
    }

    fn reserve(&self, uuid: Uuid) -> Result<bool, BackendError> {
        let p = self.image(uuid);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(self.io(uuid, "open", &p))?;
        let len = f.metadata().map_err(self.io(uuid, "stat", &p))?.len();
        match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len as i64) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT) => Ok(false),
            Err(e) => Err(self.io(uuid, "fallocate", &p)(e.into())),
        }
    }
}

impl VolumeAttacher for BlockBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Block
    }

    fn attach(&self, uuid: Uuid, read_only: bool) -> Result<Attached, BackendError> {
        let image = self.image(uuid);
        if !image.is_file() {
            return Err(BackendError::Missing {
                backend: BackendKind::Block,
                uuid,
            });
        }
        Ok(Attached::Device(LoopDevice::attach(&image, read_only)?))
    }

    fn attached(&self, uuid: Uuid) -> Result<Vec<Attached>, BackendError> {
        Ok(LoopDevice::find_by_backing(&self.image(uuid))?
            .into_iter()
            .map(Attached::Device)
            .collect())
    }

    fn detach(&self, attached: &Attached) -> Result<(), BackendError> {
        match attached {
            Attached::Device(d) => Ok(d.detach_settled()?),
            Attached::Directory(_) => Ok(()),
        }
    }
}

/// The size of a block volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The block backend's decisions: image files on loop devices, formatted
/// with the filesystem the capabilities ask for.
#[derive(Debug)]
pub struct BlockProfile;

impl super::profile::Profile for BlockProfile {
    fn kind(&self) -> BackendKind {
        BackendKind::Block
    }

    fn check_capability(&self, cap: &crate::volume::capability::Capability) -> Result<(), String> {
        use crate::volume::capability::{AccessType, FsType};
        super::profile::node_local_modes(BackendKind::Block, cap)?;
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

    fn filesystem(
        &self,
        caps: &[crate::volume::capability::Capability],
    ) -> Result<Option<crate::volume::capability::FsType>, String> {
        crate::volume::capability::filesystem_of(caps)
    }

    fn sizes(&self, fs: Option<crate::volume::capability::FsType>) -> (u64, u64) {
        (
            DEFAULT_SIZE,
            fs.map(|f| f.min_size()).unwrap_or(GRANULARITY),
        )
    }

    fn staging(&self) -> super::profile::StagingKind {
        super::profile::StagingKind::Device
    }

    fn snapshots(&self) -> super::profile::SnapshotStrategy {
        super::profile::SnapshotStrategy::PoolCopy {
            freeze_staged: true,
        }
    }

    fn node_expansion(&self) -> bool {
        true
    }

    fn mutable_parameters(&self) -> &'static [&'static str] {
        &["provisioning"]
    }

    fn block_metadata(&self) -> bool {
        true
    }
}
