//! Probing a pool directory (filesystem type, working reflinks, btrfs
//! subvolumes) and the btrfs subvolume steps, through statfs, FICLONE and
//! the `btrfs` program. Probing leaves nothing behind in the pool; choosing
//! what to do with the answer is the caller's.

use std::fmt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::command::{self, CommandError};
use super::cow::{self, CowError};
use super::fs::PathKind;

const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;
const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
const EXT4_SUPER_MAGIC: u64 = 0xEF53;
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// The inode number of every btrfs subvolume's root directory
/// (BTRFS_FIRST_FREE_OBJECTID).
const BTRFS_SUBVOLUME_INO: u64 = 256;

/// A pool probe or btrfs step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("statfs {path}: {errno}")]
    Statfs { path: PathBuf, errno: Errno },
    #[error("stat {path}: {err}")]
    Stat {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("write probe file {path}: {err}")]
    ProbeFile {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("probe reflink in {pool}: {source}")]
    ReflinkProbe {
        pool: PathBuf,
        #[source]
        source: CowError,
    },
    #[error("remove probe {path}: {err}")]
    RemoveProbe {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("create btrfs subvolume {path}: {source}")]
    SubvolumeCreate {
        path: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("snapshot btrfs subvolume {src} to {dst}: {source}")]
    SubvolumeSnapshot {
        src: PathBuf,
        dst: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("delete btrfs subvolume {path}: {source}")]
    SubvolumeDelete {
        path: PathBuf,
        #[source]
        source: CommandError,
    },
}

/// The filesystem a pool lives on, from statfs's `f_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFs {
    Btrfs,
    Xfs,
    /// ext2, ext3 and ext4 share one magic number.
    Ext4,
    Tmpfs,
    /// Any other filesystem, by its magic number.
    Other(u64),
}

impl PoolFs {
    /// Classifies a statfs `f_type` (only its low 32 bits are meaningful;
    /// some ABIs sign-extend it).
    pub fn from_magic(magic: u64) -> Self {
        match magic & 0xFFFF_FFFF {
            BTRFS_SUPER_MAGIC => PoolFs::Btrfs,
            XFS_SUPER_MAGIC => PoolFs::Xfs,
            EXT4_SUPER_MAGIC => PoolFs::Ext4,
            TMPFS_MAGIC => PoolFs::Tmpfs,
            other => PoolFs::Other(other),
        }
    }
}

impl fmt::Display for PoolFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolFs::Btrfs => f.write_str("btrfs"),
            PoolFs::Xfs => f.write_str("xfs"),
            PoolFs::Ext4 => f.write_str("ext4"),
            PoolFs::Tmpfs => f.write_str("tmpfs"),
            PoolFs::Other(magic) => write!(f, "filesystem 0x{magic:x}"),
        }
    }
}

/// How volumes and snapshots are made in a pool, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Volumes are btrfs subvolumes, snapshots btrfs snapshots.
    BtrfsSubvolumes,
    /// Snapshots and clones share extents through FICLONE.
    Reflink,
    /// Snapshots and clones are sparse copies: O(data), not O(1).
    Copy,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::BtrfsSubvolumes => "btrfs subvolumes",
            Strategy::Reflink => "reflink copies",
            Strategy::Copy => "sparse copies",
        })
    }
}

/// What [`probe`] found and chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStrategy {
    pub fs: PoolFs,
    pub strategy: Strategy,
}

impl fmt::Display for PoolStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} pool, {}", self.fs, self.strategy)
    }
}

/// The filesystem `path` lives on (statfs follows a final symlink).
pub fn filesystem_of(path: &Path) -> Result<PoolFs, PoolError> {
    let st = nix::sys::statfs::statfs(path).map_err(|errno| PoolError::Statfs {
        path: path.to_owned(),
        errno,
    })?;
    Ok(PoolFs::from_magic(st.filesystem_type().0 as u64))
}

/// Removes a probe file; one that is already gone is fine.
fn remove_probe_file(path: &Path) -> Result<(), PoolError> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(PoolError::RemoveProbe {
            path: path.to_owned(),
            err,
        }),
        _ => Ok(()),
    }
}

/// Whether FICLONE works in `pool`: reflinks a small probe file and
/// removes both files again.
fn reflink_works(pool: &Path, tag: &str) -> Result<bool, PoolError> {
    let src = pool.join(format!(".stowage-probe-{tag}"));
    let dst = pool.join(format!(".stowage-probe-{tag}.clone"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&src)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &[0x5a; 4096]));
    if let Err(err) = written {
        let _ = remove_probe_file(&src);
        return Err(PoolError::ProbeFile { path: src, err });
    }
    let cloned = cow::reflink(&src, &dst);
    // reflink removes its destination itself when it fails.
    let removed = remove_probe_file(&dst).and(remove_probe_file(&src));
    let works = match cloned {
        Ok(()) => true,
        Err(e) if e.is_not_supported() => false,
        Err(source) => {
            return Err(PoolError::ReflinkProbe {
                pool: pool.to_owned(),
                source,
            });
        }
    };
    removed?;
    Ok(works)
}

/// Whether btrfs subvolumes can be made and deleted in `pool` by us: tries
/// one. A missing `btrfs` program or a refusal (no privilege) is `false`,
/// logged; a probe subvolume that cannot be removed again is an error.
fn subvolumes_work(pool: &Path, tag: &str) -> Result<bool, PoolError> {
    let probe = pool.join(format!(".stowage-probe-{tag}.subvol"));
    if let Err(e) = btrfs_subvolume_create(&probe) {
        tracing::warn!(pool = %pool.display(), error = %e, "btrfs subvolumes unavailable");
        return Ok(false);
    }
    btrfs_subvolume_delete(&probe)?;
    Ok(true)
}

/// Probes the pool directory `pool` (which must exist and be writable) and
/// chooses the fastest correct strategy: btrfs subvolumes on btrfs when
/// subvolumes can be made there, else reflinks when FICLONE works in the
/// pool, else sparse copies. Leaves nothing behind; probe files are named
/// `.stowage-probe-*`. Safe to run while the pool is in use.
pub fn probe(pool: &Path) -> Result<PoolStrategy, PoolError> {
    let fs = filesystem_of(pool)?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let strategy = if fs == PoolFs::Btrfs && subvolumes_work(pool, &tag)? {
        Strategy::BtrfsSubvolumes
    } else if reflink_works(pool, &tag)? {
        Strategy::Reflink
    } else {
        Strategy::Copy
    };
    Ok(PoolStrategy { fs, strategy })
}

/// Creates the btrfs subvolume `path` (its parent must exist on btrfs).
/// Fails if `path` exists.
pub fn btrfs_subvolume_create(path: &Path) -> Result<(), PoolError> {
    command::run(
        "btrfs",
        ["subvolume".as_ref(), "create".as_ref(), path.as_os_str()],
    )
    .map_err(|source| PoolError::SubvolumeCreate {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

/// Snapshots the subvolume `src` as the new subvolume `dst`, read-only if
/// `readonly`. O(1) in the subvolume's size; the snapshot is crash-
/// consistent (no freeze needed). Fails with [`PoolError::Exists`] if `dst`
/// exists: `btrfs` would otherwise put the snapshot inside it.
pub fn btrfs_subvolume_snapshot(src: &Path, dst: &Path, readonly: bool) -> Result<(), PoolError> {
    let kind = super::fs::path_kind(dst).map_err(|err| PoolError::Stat {
        path: dst.to_owned(),
        err,
    })?;
    if kind != PathKind::Missing {
        return Err(PoolError::Exists {
            path: dst.to_owned(),
        });
    }
    let mut args: Vec<&std::ffi::OsStr> = vec!["subvolume".as_ref(), "snapshot".as_ref()];
    if readonly {
        args.push("-r".as_ref());
    }
    args.extend([src.as_os_str(), dst.as_os_str()]);
    command::run("btrfs", args).map_err(|source| PoolError::SubvolumeSnapshot {
        src: src.to_owned(),
        dst: dst.to_owned(),
        source,
    })?;
    Ok(())
}

/// Deletes the subvolume (or snapshot, read-only or not) at `path`, with
/// its contents. Idempotent: a missing `path` succeeds. Fails if a nested
/// subvolume lies inside it. The space is reclaimed in the background.
pub fn btrfs_subvolume_delete(path: &Path) -> Result<(), PoolError> {
    let kind = super::fs::path_kind(path).map_err(|err| PoolError::Stat {
        path: path.to_owned(),
        err,
    })?;
    if kind == PathKind::Missing {
        return Ok(());
    }
    command::run(
        "btrfs",
        ["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
    )
    .map_err(|source| PoolError::SubvolumeDelete {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

/// Whether `path` is the root of a btrfs subvolume (a directory with inode
/// number 256 on btrfs). A symlink is not followed and is not one.
pub fn is_btrfs_subvolume(path: &Path) -> Result<bool, PoolError> {
    let md = std::fs::symlink_metadata(path).map_err(|err| PoolError::Stat {
        path: path.to_owned(),
        err,
    })?;
    if !md.is_dir() || md.ino() != BTRFS_SUBVOLUME_INO {
        return Ok(false);
    }
    Ok(filesystem_of(path)? == PoolFs::Btrfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers_classify() {
        assert_eq!(PoolFs::from_magic(0x9123_683E), PoolFs::Btrfs);
        // Sign-extended on ABIs with a signed 32-bit f_type.
        assert_eq!(PoolFs::from_magic(0xFFFF_FFFF_9123_683E), PoolFs::Btrfs);
        assert_eq!(PoolFs::from_magic(0x5846_5342), PoolFs::Xfs);
        assert_eq!(PoolFs::from_magic(0xEF53), PoolFs::Ext4);
        assert_eq!(PoolFs::from_magic(0x0102_1994), PoolFs::Tmpfs);
        assert_eq!(PoolFs::from_magic(0x6969), PoolFs::Other(0x6969));
    }

    #[test]
    fn strategies_display_for_logs() {
        let s = PoolStrategy {
            fs: PoolFs::Xfs,
            strategy: Strategy::Reflink,
        };
        assert_eq!(s.to_string(), "xfs pool, reflink copies");
        let s = PoolStrategy {
            fs: PoolFs::Other(0x6969),
            strategy: Strategy::Copy,
        };
        assert_eq!(s.to_string(), "filesystem 0x6969 pool, sparse copies");
    }
}
