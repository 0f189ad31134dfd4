//! mount(2) and umount2(2), called directly (never the `mount` program).
//! Bind mounts always pass the explicit fstype "none". Request paths are
//! mounted on and unmounted through descriptors from
//! [`crate::os::fs::AnchoredPath`] (the `*_onto` and `unmount_anchored`
//! calls), so a symlink swapped into the path cannot redirect them.

#![allow(clippy::disallowed_methods)] // this module is the mount wrapper

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::os::fs::{AnchoredPath, PathFd};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// A mount step that failed, with its paths and errno.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("bind mount {src} on {target}: {errno}")]
    Bind {
        src: PathBuf,
        target: PathBuf,
        errno: Errno,
    },
    #[error("remount {target} read-only: {errno}")]
    RemountReadOnly { target: PathBuf, errno: Errno },
    #[error("remount {target} with mount flags {flags}: {errno}")]
    Remount {
        target: PathBuf,
        flags: String,
        errno: Errno,
    },
    #[error("mount {device} ({fs_type}, options {options:?}) on {target}: {errno}")]
    Filesystem {
        device: PathBuf,
        fs_type: String,
        options: String,
        target: PathBuf,
        errno: Errno,
    },
    #[error("unmount {target}: {errno}")]
    Unmount { target: PathBuf, errno: Errno },
    #[error("mount option {0:?} is not allowed")]
    BadOption(String),
}

impl MountError {
    /// The errno of the failed syscall, if one failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            MountError::Bind { errno, .. }
            | MountError::RemountReadOnly { errno, .. }
            | MountError::Remount { errno, .. }
            | MountError::Filesystem { errno, .. }
            | MountError::Unmount { errno, .. } => Some(*errno),
            MountError::BadOption(_) => None,
        }
    }
}

/// Mount flags and filesystem-specific data parsed from CSI `mount_flags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Comma-separated options handed to the filesystem (e.g. `discard`).
    pub data: String,
}

impl MountOptions {
    /// Splits mount options (each entry may itself hold comma-separated
    /// options) into VFS flags and filesystem data. Options that would
    /// change what kind of mount this is (`bind`, `remount`, `move`,
    /// propagation) or carry NUL bytes are refused.
    pub fn parse<S: AsRef<str>>(options: &[S]) -> Result<Self, MountError> {
        let mut flags = MsFlags::empty();
        let mut data: Vec<&str> = Vec::new();
        for opt in options.iter().flat_map(|o| o.as_ref().split(',')) {
            let opt = opt.trim();
            if opt.is_empty() {
                continue;
            }
            match opt {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => flags &= !MsFlags::MS_RDONLY,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "suid" => flags &= !MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "dev" => flags &= !MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                "exec" => flags &= !MsFlags::MS_NOEXEC,
                "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
                "async" => flags &= !MsFlags::MS_SYNCHRONOUS,
                "dirsync" => flags |= MsFlags::MS_DIRSYNC,
                "noatime" => flags |= MsFlags::MS_NOATIME,
                "atime" => flags &= !MsFlags::MS_NOATIME,
                "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
                "relatime" => flags |= MsFlags::MS_RELATIME,
                "strictatime" => flags |= MsFlags::MS_STRICTATIME,
                "lazytime" => flags |= MsFlags::MS_LAZYTIME,
                "defaults" => {}
                "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "slave"
                | "rslave" | "private" | "rprivate" | "unbindable" | "runbindable" => {
                    return Err(MountError::BadOption(opt.to_owned()));
                }
                other if other.contains('\0') || other.contains(char::is_whitespace) => {
                    return Err(MountError::BadOption(other.to_owned()));
                }
                other => data.push(other),
            }
        }
        Ok(Self {
            flags,
            data: data.join(","),
        })
    }

    /// The per-mount flags among these: what a bind mount takes.
    pub fn per_mount(&self) -> MsFlags {
        self.flags & PER_MOUNT
    }

    /// What only a filesystem's own mount takes, as given: its data
    /// options and the superblock flags (`sync`, `dirsync`, `lazytime`).
    /// A bind mount cannot honour them.
    pub fn filesystem_only(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            (MsFlags::MS_SYNCHRONOUS, "sync"),
            (MsFlags::MS_DIRSYNC, "dirsync"),
            (MsFlags::MS_LAZYTIME, "lazytime"),
        ]
        .into_iter()
        .filter(|(f, _)| self.flags.contains(*f))
        .map(|(_, name)| name.to_owned())
        .collect();
        out.extend(
            self.data
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_owned),
        );
        out
    }
}

/// The flags a mount point has of its own (a bind mount's may differ
/// from its source's): `mount -o remount,bind` takes exactly these.
const PER_MOUNT: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC)
    .union(ATIME);

/// The access-time flags: one of them set replaces the others.
pub const ATIME: MsFlags = MsFlags::MS_NOATIME
    .union(MsFlags::MS_NODIRATIME)
    .union(MsFlags::MS_RELATIME)
    .union(MsFlags::MS_STRICTATIME);

/// Bind-mounts `src` (file or directory) onto `target`. The new mount
/// inherits the propagation of `target`'s parent mount.
pub fn bind(src: &Path, target: &Path) -> Result<(), MountError> {
    nix::mount::mount(
        Some(src),
        target,
        Some("none"),
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| MountError::Bind {
        src: src.to_owned(),
        target: target.to_owned(),
        errno,
    })
}

/// Makes the bind mount at `target` read-only. A bind mount ignores
/// MS_RDONLY when it is created, so this is a second, remount step; the
/// flags in `keep` (nosuid, nodev, noexec...) are repeated because a bind
/// remount replaces the per-mount flags.
pub fn remount_bind_read_only(target: &Path, keep: MsFlags) -> Result<(), MountError> {
    nix::mount::mount(
        None::<&str>,
        target,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
        None::<&str>,
    )
    .map_err(|errno| MountError::RemountReadOnly {
        target: target.to_owned(),
        errno,
    })
}

/// Mounts the filesystem on `device` at `target`.
pub fn mount_filesystem(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &MountOptions,
) -> Result<(), MountError> {
    let data = (!options.data.is_empty()).then_some(options.data.as_str());
    nix::mount::mount(Some(device), target, Some(fs_type), options.flags, data).map_err(|errno| {
        MountError::Filesystem {
            device: device.to_owned(),
            fs_type: fs_type.to_owned(),
            options: options.data.clone(),
            target: target.to_owned(),
            errno,
        }
    })
}

/// How long an unmount that meets EBUSY tries again before it reports the
/// mount busy. A process being spawned anywhere on the node (by the
/// kubelet, a container runtime, or this plugin starting mkfs or s3fs)
/// holds a copy of every descriptor its parent had open until it execs
/// and close-on-exec drops them, so an unmount right after a file on the
/// mount was closed can meet such a copy for a moment. A mount that stays
/// busy (a file held open on it) is still refused, this much later.
pub const BUSY_GRACE: Duration = Duration::from_secs(1);

/// Calls `unmount` again while it answers EBUSY, every 20 ms, for at most
/// [`BUSY_GRACE`]; returns its last answer.
pub fn while_busy(mut unmount: impl FnMut() -> Result<(), Errno>) -> Result<(), Errno> {
    let deadline = Instant::now() + BUSY_GRACE;
    loop {
        match unmount() {
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// umount2(2) of the topmost mount at `path`, not following a symlink
/// there, tried again while busy ([`while_busy`]).
pub fn umount_nofollow(path: &Path) -> Result<(), Errno> {
    while_busy(|| nix::mount::umount2(path, MntFlags::UMOUNT_NOFOLLOW))
}

/// Unmounts the topmost mount at `target` without following a symlink
/// there ([`umount_nofollow`]). EINVAL (not a mount point) is reported to
/// the caller, who decides whether that means "already done".
pub fn unmount(target: &Path) -> Result<(), MountError> {
    umount_nofollow(target).map_err(|errno| MountError::Unmount {
        target: target.to_owned(),
        errno,
    })
}

/// Bind-mounts `src` (a trusted path such as a pool directory or a device
/// node, or another [`PathFd`]'s `proc_path`) onto the file or directory
/// `target` holds, wherever that now is. The new mount inherits the
/// propagation of the mount it lands in.
pub fn bind_onto(src: &Path, target: &PathFd) -> Result<(), MountError> {
    nix::mount::mount(
        Some(src),
        &target.proc_path(),
        Some("none"),
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| MountError::Bind {
        src: src.to_owned(),
        target: target.path().to_owned(),
        errno,
    })
}

/// Mounts the filesystem on `device` onto the directory `target` holds.
pub fn mount_filesystem_onto(
    device: &Path,
    target: &PathFd,
    fs_type: &str,
    options: &MountOptions,
) -> Result<(), MountError> {
    let data = (!options.data.is_empty()).then_some(options.data.as_str());
    nix::mount::mount(
        Some(device),
        &target.proc_path(),
        Some(fs_type),
        options.flags,
        data,
    )
    .map_err(|errno| MountError::Filesystem {
        device: device.to_owned(),
        fs_type: fs_type.to_owned(),
        options: options.data.clone(),
        target: target.path().to_owned(),
        errno,
    })
}

/// Gives the bind mount whose root `root` holds (opened after the mount
/// was made, so it is on the mount itself) exactly the per-mount `flags`
/// (`MS_BIND | MS_REMOUNT`): those it has and keeps must be among them.
pub fn remount_bind_fd(root: &PathFd, flags: MsFlags) -> Result<(), MountError> {
    nix::mount::mount(
        None::<&str>,
        &root.proc_path(),
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(|errno| MountError::Remount {
        target: root.path().to_owned(),
        flags: format!("{flags:?}"),
        errno,
    })
}

/// Unmounts the topmost mount at `at`'s final component, inside the parent
/// directory it holds, without following a symlink there. No descriptor on
/// the mount itself may be open (the kernel answers EBUSY, tried again for
/// [`BUSY_GRACE`]). EINVAL: not a mount point.
pub fn unmount_anchored(at: &AnchoredPath) -> Result<(), MountError> {
    umount_nofollow(&at.in_parent()).map_err(|errno| MountError::Unmount {
        target: at.path().to_owned(),
        errno,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn while_busy_tries_again_only_on_ebusy() {
        let mut answers = vec![Err(Errno::EBUSY), Err(Errno::EBUSY), Ok(())].into_iter();
        let mut calls = 0;
        let r = while_busy(|| {
            calls += 1;
            answers.next().unwrap()
        });
        assert_eq!((r, calls), (Ok(()), 3));

        let mut calls = 0;
        let r = while_busy(|| {
            calls += 1;
            Err(Errno::EINVAL)
        });
        assert_eq!((r, calls), (Err(Errno::EINVAL), 1), "other errors at once");

        let mut calls = 0;
        let r = while_busy(|| {
            calls += 1;
            Err(Errno::EBUSY)
        });
        assert_eq!(r, Err(Errno::EBUSY), "busy for good is reported");
        assert!(calls > 1, "tried again before reporting busy");
    }

    #[test]
    fn splits_vfs_flags_from_filesystem_data() {
        let o = MountOptions::parse(&["noatime,discard", "ro", "errors=remount-ro"]).unwrap();
        assert_eq!(o.flags, MsFlags::MS_NOATIME | MsFlags::MS_RDONLY);
        assert_eq!(o.data, "discard,errors=remount-ro");
    }

    #[test]
    fn later_option_wins() {
        let o = MountOptions::parse(&["ro", "rw"]).unwrap();
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn refuses_options_that_change_the_mount_kind() {
        for bad in ["bind", "remount", "rshared", "a b", "x\0y"] {
            assert!(MountOptions::parse(&[bad]).is_err(), "{bad:?} accepted");
        }
    }
}
