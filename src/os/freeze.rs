//! Filesystem freeze and thaw (FIFREEZE/FITHAW), for consistent snapshots
//! of a mounted filesystem. Only mount points are frozen: a stray path must
//! never freeze the filesystem that holds it (that could be the host's root).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::mountinfo::{MountTable, MountTableError};

/// The raw ioctls, private to this module.
mod ioctl {
    // FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int); the
    // kernel ignores the int.
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
}

/// A freeze or thaw step that failed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("read the mount table to check {path}: {source}")]
    MountTable {
        path: PathBuf,
        #[source]
        source: MountTableError,
    },
    #[error("{path} is not a mount point; refusing to freeze the filesystem holding it")]
    NotMountPoint { path: PathBuf },
    #[error("open {path}: {err}")]
    Open {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{path} is already frozen")]
    AlreadyFrozen { path: PathBuf },
    #[error("freeze {path}: {errno}")]
    Freeze { path: PathBuf, errno: Errno },
    #[error("thaw {path}: {errno}")]
    Thaw { path: PathBuf, errno: Errno },
}

/// Opens the mount point `mountpoint` after checking the mount table lists
/// it as one.
fn open_mount_point(mountpoint: &Path) -> Result<File, FreezeError> {
    let table = MountTable::read().map_err(|source| FreezeError::MountTable {
        path: mountpoint.to_owned(),
        source,
    })?;
    if table.mounted_at(mountpoint).is_none() {
        return Err(FreezeError::NotMountPoint {
            path: mountpoint.to_owned(),
        });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mountpoint)
        .map_err(|err| FreezeError::Open {
            path: mountpoint.to_owned(),
            err,
        })
}

fn freeze_fd(file: &File, mountpoint: &Path) -> Result<(), FreezeError> {
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE takes a pointer to an int it does not use; `unused`
    // lives across the call and the fd is an open directory.
    match unsafe { ioctl::fifreeze(file.as_raw_fd(), &mut unused) } {
        Ok(_) => Ok(()),
        Err(Errno::EBUSY) => Err(FreezeError::AlreadyFrozen {
            path: mountpoint.to_owned(),
        }),
        Err(errno) => Err(FreezeError::Freeze {
            path: mountpoint.to_owned(),
            errno,
        }),
    }
}

/// Thaws; Ok(true) when the filesystem was frozen, Ok(false) when it was
/// not.
fn thaw_fd(file: &File, mountpoint: &Path) -> Result<bool, FreezeError> {
    let mut unused: libc::c_int = 0;
    // SAFETY: FITHAW takes a pointer to an int it does not use; `unused`
    // lives across the call and the fd is an open directory.
    match unsafe { ioctl::fithaw(file.as_raw_fd(), &mut unused) } {
        Ok(_) => Ok(true),
        // EINVAL: not frozen, which is what the caller wants.
        Err(Errno::EINVAL) => Ok(false),
        Err(errno) => Err(FreezeError::Thaw {
            path: mountpoint.to_owned(),
            errno,
        }),
    }
}

/// Freezes the filesystem mounted at `mountpoint`: dirty data is flushed,
/// and every write to it (from any process) blocks until [`thaw`]. Fails
/// with [`FreezeError::NotMountPoint`] unless the mount table lists
/// `mountpoint` exactly, and with [`FreezeError::AlreadyFrozen`] if someone
/// froze it already (then it is theirs to thaw). Prefer [`FrozenFs`], which
/// cannot forget to thaw.
pub fn freeze(mountpoint: &Path) -> Result<(), FreezeError> {
    freeze_fd(&open_mount_point(mountpoint)?, mountpoint)
}

/// Thaws the filesystem mounted at `mountpoint`. Idempotent: thawing a
/// filesystem that is not frozen succeeds. Returns whether it was frozen.
pub fn thaw(mountpoint: &Path) -> Result<bool, FreezeError> {
    thaw_fd(&open_mount_point(mountpoint)?, mountpoint)
}

/// A frozen filesystem, thawed when this is dropped (a failed thaw is
/// logged) or by [`FrozenFs::thaw`], which reports the error. Keep it alive
/// no longer than the copy or snapshot it protects: writers block meanwhile.
#[derive(Debug)]
#[must_use = "the filesystem is thawed as soon as the guard is dropped"]
pub struct FrozenFs {
    file: Option<File>,
    mountpoint: PathBuf,
}

impl FrozenFs {
    /// Freezes `mountpoint` (see [`freeze`]) and returns the guard.
    pub fn new(mountpoint: &Path) -> Result<Self, FreezeError> {
        let file = open_mount_point(mountpoint)?;
        freeze_fd(&file, mountpoint)?;
        Ok(Self {
            file: Some(file),
            mountpoint: mountpoint.to_owned(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Thaws now, reporting a failure instead of logging it.
    pub fn thaw(mut self) -> Result<(), FreezeError> {
        let file = self.file.take().expect("only thawed once");
        thaw_fd(&file, &self.mountpoint).map(drop)
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        if let Some(file) = self.file.take()
            && let Err(e) = thaw_fd(&file, &self.mountpoint)
        {
            tracing::error!(mountpoint = %self.mountpoint.display(), error = %e, "thaw failed; writers stay blocked");
        }
    }
}
