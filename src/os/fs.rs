//! Plain filesystem steps: statvfs, sparse files, durable writes (temp +
//! fsync + rename + fsync(dir)), and symlink-safe path inspection.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Capacity and inode figures of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub available_inodes: u64,
    pub used_inodes: u64,
    pub read_only: bool,
}

/// statvfs(3) on `path`.
pub fn usage(path: &Path) -> std::io::Result<FsUsage> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frsize = s.fragment_size();
    let total = s.blocks() * frsize;
    let avail = s.blocks_available() * frsize;
    let free = s.blocks_free() * frsize;
    let files = s.files();
    let ffree = s.files_free();
    Ok(FsUsage {
        total_bytes: total,
        available_bytes: avail,
        used_bytes: total.saturating_sub(free),
        total_inodes: files,
        available_inodes: s.files_available(),
        used_inodes: files.saturating_sub(ffree),
        read_only: s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
    })
}

/// The per-mount flags (nosuid, nodev, noexec, ...) of the mount holding
/// `path`, as mount flags, so a bind remount can keep them.
pub fn mount_flags(path: &Path) -> std::io::Result<nix::mount::MsFlags> {
    use nix::mount::MsFlags;
    use nix::sys::statvfs::FsFlags;
    let f = nix::sys::statvfs::statvfs(path)
        .map_err(std::io::Error::from)?
        .flags();
    let mut out = MsFlags::empty();
    for (from, to) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(from) {
            out |= to;
        }
    }
    Ok(out)
}

/// What is at a path, without following a final symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Missing,
    Directory,
    File,
    BlockDevice { rdev: u64 },
    Symlink,
    Other,
}

/// lstat(2) classification of `path`.
pub fn path_kind(path: &Path) -> std::io::Result<PathKind> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => {
            let ft = md.file_type();
            Ok(if ft.is_symlink() {
                PathKind::Symlink
            } else if ft.is_dir() {
                PathKind::Directory
            } else if ft.is_file() {
                PathKind::File
            } else if ft.is_block_device() {
                PathKind::BlockDevice { rdev: md.rdev() }
            } else {
                PathKind::Other
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PathKind::Missing),
        Err(e) => Err(e),
    }
}

/// `(st_dev, st_ino)` of `path`, following nothing at the final component.
/// For a bind mount this equals the identity of its source.
pub fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let md = std::fs::symlink_metadata(path)?;
    Ok((md.dev(), md.ino()))
}

/// Whether any component of `path` (which must be absolute) is a symlink.
pub fn has_symlink_component(path: &Path) -> std::io::Result<bool> {
    let mut cur = PathBuf::from("/");
    for c in path.components().skip(1) {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Creates a sparse file of `size` bytes, failing if it already exists.
/// Not synced: callers that need it durable rebuild it from their records
/// after a crash.
pub fn create_sparse(path: &Path, size: u64) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.set_len(size)
}

/// fsync(2) on a directory, making renames and unlinks in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably: a temp file in the same
/// directory, fsync, rename over `path`, fsync the directory. The temp file
/// is removed if any step fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);

    struct RemoveOnDrop<'a>(&'a Path, bool);
    impl Drop for RemoveOnDrop<'_> {
        fn drop(&mut self) {
            if self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut guard = RemoveOnDrop(&tmp, true);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    guard.1 = false;
    sync_dir(dir)
}
