//! A pool kept inside an xfs image file: for hosts whose filesystem cannot
//! share extents (ext4, tmpfs), the pool directory becomes the mount point
//! of a sparse, loop-attached xfs filesystem with reflinks, so snapshots and
//! clones are O(1) there too. This module makes, finds and mounts the image;
//! whether to use one is the caller's decision. It never formats a file it
//! did not create, and never mounts over a pool directory that holds data.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::command::{self, CommandError};
use super::loopdev::{LoopDevice, LoopError};
use super::mount::{self, MountError, MountOptions};
use super::mountinfo::{MountTable, MountTableError};

/// The smallest image worth making (mkfs.xfs refuses filesystems below
/// 300 MiB).
pub const MIN_SIZE: u64 = 512 << 20;

/// A step of making or mounting the pool image that failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolImageError {
    #[error("statvfs {path}: {errno}")]
    Statvfs { path: PathBuf, errno: Errno },
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("format pool image {path}: {source}")]
    Mkfs {
        path: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("attach pool image {path}: {source}")]
    Attach {
        path: PathBuf,
        #[source]
        source: LoopError,
    },
    #[error("mount pool image {image} at {pool}: {source}")]
    Mount {
        image: PathBuf,
        pool: PathBuf,
        #[source]
        source: Box<MountError>,
    },
    #[error(transparent)]
    MountTable(#[from] MountTableError),
    #[error(
        "{pool} holds another mount ({fs_type} from {source_dev}); refusing to mount the pool image over it"
    )]
    ForeignMount {
        pool: PathBuf,
        fs_type: String,
        source_dev: String,
    },
}

/// The image file of the pool at `pool`: beside it, `<pool>.xfs.img`, so it
/// lives on the filesystem the operator chose for the pool.
pub fn image_path(pool: &Path) -> PathBuf {
    let mut name = pool
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "pool".into());
    name.push(".xfs.img");
    pool.with_file_name(name)
}

/// Whether `pool` is the mount point of a filesystem on a loop device backed
/// by `image`.
fn mounted_from(pool: &Path, image: &Path, table: &MountTable) -> Option<bool> {
    let entry = table.mounted_at(pool)?;
    let backing = LoopDevice::from_path(Path::new(&entry.source)).and_then(|d| d.backing_file());
    Some(backing.is_some_and(|b| b == image))
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> Result<u64, PoolImageError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|errno| PoolImageError::Statvfs {
        path: path.to_owned(),
        errno,
    })?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Whether `mkfs.xfs` can be run here.
pub fn mkfs_available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("mkfs.xfs").is_file()))
        .unwrap_or(false)
        || ["/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"]
            .iter()
            .any(|p| Path::new(p).is_file())
}

/// Whether the directory `pool` holds no volumes or snapshots: nothing but
/// the empty skeleton `volumes/<kind>/` and `snapshots/<kind>/` directories
/// (a dir volume is a directory, so any entry deeper down is data). A pool
/// with anything in it is never hidden under a new mount.
pub fn holds_no_data(pool: &Path) -> Result<bool, PoolImageError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |err| PoolImageError::Io { what, path, err }
    };
    // (directory, depth below the pool)
    let mut pending = vec![(pool.to_owned(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("list", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io("list", &dir))?;
            let ft = entry.file_type().map_err(io("stat", &entry.path()))?;
            let skeleton = match depth {
                0 => {
                    ft.is_dir()
                        && matches!(entry.file_name().to_str(), Some("volumes" | "snapshots"))
                }
                1 => ft.is_dir(),
                _ => false,
            };
            if !skeleton {
                return Ok(false);
            }
            pending.push((entry.path(), depth + 1));
        }
    }
    Ok(true)
}

/// How [`mount()`] found the pool image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// It was mounted already (a restart of the server).
    Already,
    /// It existed and was mounted now (after a reboot).
    Now,
}

/// Mounts the existing image `image` at `pool` (which must exist), unless it
/// is mounted there already. The loop device frees itself when the pool is
/// unmounted. A different mount at `pool` is refused.
pub fn mount(pool: &Path, image: &Path) -> Result<Mounted, PoolImageError> {
    let table = MountTable::read()?;
    match mounted_from(pool, image, &table) {
        Some(true) => return Ok(Mounted::Already),
        Some(false) => {
            let e = table.mounted_at(pool).expect("checked above");
            return Err(PoolImageError::ForeignMount {
                pool: pool.to_owned(),
                fs_type: e.fs_type.clone(),
                source_dev: e.source.clone(),
            });
        }
        None => {}
    }
    let dev = LoopDevice::attach(image, false).map_err(|source| PoolImageError::Attach {
        path: image.to_owned(),
        source,
    })?;
    // discard: space freed in the pool is punched out of the image, so the
    // host filesystem gets it back.
    let opts = MountOptions::parse(&["discard"]).expect("a valid option");
    let mounted = mount::mount_filesystem(&dev.path(), pool, "xfs", &opts);
    // Auto-clear: from now on the mount alone holds the device, and
    // unmounting the pool frees it.
    let _ = dev.detach();
    mounted.map_err(|source| PoolImageError::Mount {
        image: image.to_owned(),
        pool: pool.to_owned(),
        source: Box::new(source),
    })?;
    Ok(Mounted::Now)
}

/// Makes a new sparse xfs image of `size` bytes at `image` (with reflinks
/// on). The image is formatted under a temporary name and renamed into
/// place, so a crash never leaves a half-made image under the real name.
/// Fails if `image` exists.
pub fn create(image: &Path, size: u64) -> Result<(), PoolImageError> {
    let mut tmp_name = image.as_os_str().to_os_string();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |err| PoolImageError::Io { what, path, err }
    };
    // A temporary image left by a crash is ours to replace.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", &tmp)(e)),
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let made = (|| {
        file.set_len(size).map_err(io("size", &tmp))?;
        drop(file);
        command::run(
            "mkfs.xfs",
            [
                "-q".as_ref(),
                "-K".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                tmp.as_os_str(),
            ],
        )
        .map_err(|source| PoolImageError::Mkfs {
            path: tmp.clone(),
            source,
        })?;
        let f = std::fs::File::open(&tmp).map_err(io("open", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, image).map_err(io("rename", &tmp))?;
        if let Some(dir) = image.parent() {
            super::fs::sync_dir(dir).map_err(io("sync", dir))?;
        }
        Ok(())
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// The size to give a new image for a pool on the filesystem holding
/// `dir`: what that filesystem has free now, in whole MiB. The image is
/// sparse, so this is a ceiling, not a reservation.
pub fn default_size(dir: &Path) -> Result<u64, PoolImageError> {
    Ok(available_bytes(dir)? / (1 << 20) * (1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_lives_beside_the_pool() {
        assert_eq!(
            image_path(Path::new("/var/lib/stowage/pool")),
            PathBuf::from("/var/lib/stowage/pool.xfs.img")
        );
        assert_eq!(
            image_path(Path::new("/srv/p")),
            PathBuf::from("/srv/p.xfs.img")
        );
    }

    #[test]
    fn only_an_empty_skeleton_holds_no_data() {
        let d = tempfile::tempdir().unwrap();
        let pool = d.path().join("pool");
        std::fs::create_dir_all(pool.join("volumes/block")).unwrap();
        std::fs::create_dir_all(pool.join("snapshots/dir")).unwrap();
        assert!(holds_no_data(&pool).unwrap());
        assert!(holds_no_data(&d.path().join("missing")).unwrap());
        // An empty dir volume is a volume.
        std::fs::create_dir(pool.join("volumes/block/0123")).unwrap();
        assert!(!holds_no_data(&pool).unwrap());
        std::fs::remove_dir(pool.join("volumes/block/0123")).unwrap();
        std::fs::write(pool.join("state.log"), b"x").unwrap();
        assert!(!holds_no_data(&pool).unwrap());
    }
}
