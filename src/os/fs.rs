//! Plain filesystem steps: statvfs, sparse files, durable writes (temp +
//! fsync + rename + fsync(dir)), and symlink-safe path handling: request
//! paths are resolved from `/` without following any symlink
//! ([`AnchoredPath`], [`PathFd`]), and every later step acts on the
//! descriptors that resolution produced, never on the path string again.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

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
    // Saturating: FUSE filesystems (s3fs) report block counts whose byte
    // totals do not fit 64 bits.
    let total = s.blocks().saturating_mul(frsize);
    let avail = s.blocks_available().saturating_mul(frsize);
    let free = s.blocks_free().saturating_mul(frsize);
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

/// `path` made absolute, with every symlink, `.` and `..` of its
/// existing part resolved: the kernel names mounts and loop devices'
/// backing files so, and stowage finds its own by comparing paths. The
/// part that does not exist yet (made later) is kept as written.
pub fn real_path(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut missing = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut real) => {
                real.extend(missing.iter().rev());
                return Ok(real);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name().map(OsStr::to_owned) else {
                    return Err(e);
                };
                missing.push(name);
                existing.pop();
                if existing.as_os_str().is_empty() {
                    existing = PathBuf::from(".");
                }
            }
            Err(e) => return Err(e),
        }
    }
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

/// Set once openat2(2) answered ENOSYS (old kernel, or a seccomp filter
/// that does not know it) or EPERM (an older seccomp profile's answer to
/// syscalls it does not list), so later walks go straight to the fallback,
/// which is just as safe, one syscall per component.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

fn errno(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// The normal components of `path`, which must be absolute and hold no
/// `.` or `..` (EINVAL otherwise).
fn normal_components(path: &Path) -> std::io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    let mut comps = path.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(errno(Errno::EINVAL));
    }
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return Err(errno(Errno::EINVAL)),
        }
    }
    Ok(out)
}

/// Opens the directory `path` (absolute, without `.` or `..`) as an O_PATH
/// descriptor, following no symlink in any component: ELOOP when one is a
/// symlink, ENOENT or ENOTDIR as open(2) gives them. Mount points are
/// crossed as usual (the descriptor is on the topmost mount). Uses
/// openat2(2) with RESOLVE_NO_SYMLINKS, or a walk of O_NOFOLLOW opens where
/// openat2 is missing or filtered.
pub fn open_dir_nofollow(path: &Path) -> std::io::Result<OwnedFd> {
    normal_components(path)?;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        use nix::fcntl::{OpenHow, ResolveFlag};
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
            Err(Errno::ENOSYS | Errno::EPERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
            r => return r.map_err(errno),
        }
    }
    open_dir_walk(path)
}

/// [`open_dir_nofollow`] without openat2: one O_PATH|O_NOFOLLOW open per
/// component, each relative to the directory opened before it.
fn open_dir_walk(path: &Path) -> std::io::Result<OwnedFd> {
    let names = normal_components(path)?;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut cur = nix::fcntl::open("/", flags, Mode::empty()).map_err(errno)?;
    for name in names {
        cur = match nix::fcntl::openat(&cur, name, flags | OFlag::O_NOFOLLOW, Mode::empty()) {
            Ok(fd) => fd,
            // O_PATH|O_NOFOLLOW opens a symlink itself, which O_DIRECTORY
            // then refuses: report it as openat2 does.
            Err(Errno::ENOTDIR)
                if nix::sys::stat::fstatat(&cur, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| kind_of(&st) == PathKind::Symlink) =>
            {
                return Err(errno(Errno::ELOOP));
            }
            Err(e) => return Err(errno(e)),
        };
    }
    Ok(cur)
}

fn kind_of(st: &FileStat) -> PathKind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => PathKind::Directory,
        SFlag::S_IFREG => PathKind::File,
        SFlag::S_IFLNK => PathKind::Symlink,
        SFlag::S_IFBLK => PathKind::BlockDevice { rdev: st.st_rdev },
        _ => PathKind::Other,
    }
}

/// What fstat(2) says about a file: its kind and `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub kind: PathKind,
    pub dev: u64,
    pub ino: u64,
}

impl FileInfo {
    fn of(st: &FileStat) -> Self {
        Self {
            kind: kind_of(st),
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// A path whose parent directory was resolved from `/` without following
/// any symlink and is held open: every step on the final component
/// (inspect, create, open, remove, and the mount calls of
/// [`crate::os::mount`]) happens inside that very directory, so a component
/// swapped for a symlink afterwards cannot redirect it.
#[derive(Debug)]
pub struct AnchoredPath {
    parent: OwnedFd,
    name: OsString,
    path: PathBuf,
}

impl AnchoredPath {
    /// Resolves the parent of `path` (absolute, without `.` or `..`, not
    /// `/`). ELOOP when a component of the parent is a symlink; ENOENT
    /// when the parent is missing.
    pub fn new(path: &Path) -> std::io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| errno(Errno::EINVAL))?
            .to_owned();
        let parent = path.parent().ok_or_else(|| errno(Errno::EINVAL))?;
        Ok(Self {
            parent: open_dir_nofollow(parent)?,
            name,
            path: path.to_owned(),
        })
    }

    /// A second handle on the same parent directory (dup(2)).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            parent: self.parent.try_clone()?,
            name: self.name.clone(),
            path: self.path.clone(),
        })
    }

    /// The path this was resolved from (for messages and records).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id (as in mountinfo) of the mount holding the parent directory:
    /// the final component is a mount point when [`Self::open`] lands on
    /// another mount.
    pub fn parent_mount_id(&self) -> std::io::Result<u32> {
        fd_mount_id(&self.parent)
    }

    /// What is at the final component now, not following a symlink there.
    pub fn kind(&self) -> std::io::Result<PathKind> {
        match nix::sys::stat::fstatat(
            &self.parent,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(kind_of(&st)),
            Err(Errno::ENOENT) => Ok(PathKind::Missing),
            Err(e) => Err(errno(e)),
        }
    }

    /// `(st_dev, st_ino)` of the final component, as lstat(2) gives it
    /// (the root of a mount stacked there, if there is one).
    pub fn identity(&self) -> std::io::Result<(u64, u64)> {
        let st = nix::sys::stat::fstatat(
            &self.parent,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// mkdirat(2): EEXIST when anything is there.
    pub fn create_dir(&self, mode: u32) -> std::io::Result<()> {
        nix::sys::stat::mkdirat(
            &self.parent,
            self.name.as_os_str(),
            Mode::from_bits_truncate(mode),
        )
        .map_err(errno)
    }

    /// Creates an empty regular file: EEXIST when anything (a symlink
    /// too) is there.
    pub fn create_file(&self, mode: u32) -> std::io::Result<()> {
        nix::fcntl::openat(
            &self.parent,
            self.name.as_os_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map(drop)
        .map_err(errno)
    }

    /// Opens the final component as an O_PATH descriptor without following
    /// a symlink there (ELOOP if it is one). Like any lookup it lands on
    /// the topmost mount stacked at that name.
    pub fn open(&self) -> std::io::Result<PathFd> {
        let fd = nix::fcntl::openat(
            &self.parent,
            self.name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let h = PathFd {
            fd,
            path: self.path.clone(),
        };
        if h.info()?.kind == PathKind::Symlink {
            return Err(errno(Errno::ELOOP));
        }
        Ok(h)
    }

    /// rmdir of the final component (ENOTDIR for anything but a directory,
    /// EBUSY for a mount point).
    pub fn remove_dir(&self) -> std::io::Result<()> {
        nix::unistd::unlinkat(
            &self.parent,
            self.name.as_os_str(),
            nix::unistd::UnlinkatFlags::RemoveDir,
        )
        .map_err(errno)
    }

    /// unlink of the final component (EISDIR for a directory, EBUSY for a
    /// mount point).
    pub fn remove_file(&self) -> std::io::Result<()> {
        nix::unistd::unlinkat(
            &self.parent,
            self.name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(errno)
    }

    /// A path naming the final component inside the held parent directory
    /// (`/proc/self/fd/<parent>/<name>`), for syscalls that take only a
    /// path. The kernel resolves the descriptor link to the held directory
    /// wherever it now is; callers must still not follow a symlink at the
    /// final component (UMOUNT_NOFOLLOW).
    pub fn in_parent(&self) -> PathBuf {
        Path::new("/proc/self/fd")
            .join(self.parent.as_raw_fd().to_string())
            .join(&self.name)
    }
}

/// An O_PATH descriptor on a file or directory (never a symlink) reached
/// without following symlinks, with the path it was reached by.
#[derive(Debug)]
pub struct PathFd {
    fd: OwnedFd,
    path: PathBuf,
}

impl PathFd {
    /// The path it was opened by (for messages); it may have moved since.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `/proc/self/fd/<n>`: a path that resolves to exactly this file for
    /// syscalls that take only a path (mount(2)). It does not descend into
    /// a mount stacked on the file after it was opened.
    pub fn proc_path(&self) -> PathBuf {
        Path::new("/proc/self/fd").join(self.fd.as_raw_fd().to_string())
    }

    /// fstat(2).
    pub fn info(&self) -> std::io::Result<FileInfo> {
        nix::sys::stat::fstat(self.fd.as_fd())
            .map(|st| FileInfo::of(&st))
            .map_err(errno)
    }

    /// The id (as in mountinfo) of the mount this file was reached on.
    pub fn mount_id(&self) -> std::io::Result<u32> {
        fd_mount_id(&self.fd)
    }

    /// Where the file is now, as the kernel names it (after renames).
    pub fn current_path(&self) -> std::io::Result<PathBuf> {
        std::fs::read_link(self.proc_path())
    }
}

fn fd_mount_id(fd: &OwnedFd) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    parse_fdinfo_mount_id(&text)
        .ok_or_else(|| std::io::Error::other("no mnt_id in /proc/self/fdinfo"))
}

/// The `mnt_id:` field of a `/proc/<pid>/fdinfo/<fd>` text.
pub fn parse_fdinfo_mount_id(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(e: &std::io::Error) -> Option<i32> {
        e.raw_os_error()
    }

    #[test]
    fn a_real_path_resolves_symlinks_of_its_existing_part_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
        assert_eq!(real_path(&root.join("link")).unwrap(), root.join("real"));
        assert_eq!(
            real_path(&root.join("link/state/pool")).unwrap(),
            root.join("real/state/pool")
        );
        assert_eq!(
            real_path(&root.join("real/../link/x")).unwrap(),
            root.join("real/x")
        );
        let here = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(
            real_path(Path::new("no-such-dir-here/pool")).unwrap(),
            here.join("no-such-dir-here/pool")
        );
    }

    #[test]
    fn nofollow_opens_refuse_a_symlink_in_any_component() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
        for open in [open_dir_nofollow, open_dir_walk] {
            assert!(open(&root.join("real/sub")).is_ok());
            for bad in ["link", "link/sub"] {
                let e = open(&root.join(bad)).unwrap_err();
                assert_eq!(raw(&e), Some(libc::ELOOP), "{bad}: {e}");
            }
            let e = open(&root.join("missing/x")).unwrap_err();
            assert_eq!(raw(&e), Some(libc::ENOENT));
            for bad in ["relative", "/a/../b"] {
                let e = open(Path::new(bad)).unwrap_err();
                assert_eq!(raw(&e), Some(libc::EINVAL), "{bad}");
            }
        }
    }

    #[test]
    fn anchored_steps_stay_in_the_resolved_parent_after_a_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("base")).unwrap();
        std::fs::create_dir(root.join("decoy")).unwrap();
        let a = AnchoredPath::new(&root.join("base/pub")).unwrap();
        assert_eq!(a.kind().unwrap(), PathKind::Missing);
        std::fs::rename(root.join("base"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(root.join("decoy"), root.join("base")).unwrap();
        a.create_dir(0o750).unwrap();
        assert!(root.join("moved/pub").is_dir());
        assert!(!root.join("decoy/pub").exists());
        let fd = a.open().unwrap();
        assert_eq!(fd.current_path().unwrap(), root.join("moved/pub"));
        a.remove_dir().unwrap();
        assert!(!root.join("moved/pub").exists());
        // A fresh resolution of the swapped path is refused.
        let e = AnchoredPath::new(&root.join("base/pub")).unwrap_err();
        assert_eq!(raw(&e), Some(libc::ELOOP));
    }

    #[test]
    fn anchored_open_refuses_a_final_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::os::unix::fs::symlink("/", root.join("l")).unwrap();
        let a = AnchoredPath::new(&root.join("l")).unwrap();
        assert_eq!(a.kind().unwrap(), PathKind::Symlink);
        assert_eq!(raw(&a.open().unwrap_err()), Some(libc::ELOOP));
        assert_eq!(raw(&a.create_file(0o600).unwrap_err()), Some(libc::EEXIST));
    }

    #[test]
    fn fdinfo_mount_id_is_parsed() {
        let text = "pos:\t0\nflags:\t012600000\nmnt_id:\t27\nino:\t10035403\n";
        assert_eq!(parse_fdinfo_mount_id(text), Some(27));
        assert_eq!(parse_fdinfo_mount_id("pos:\t0\n"), None);
    }

    #[test]
    fn mount_id_matches_the_mount_table() {
        let proc_fd = PathFd {
            fd: open_dir_nofollow(Path::new("/proc")).unwrap(),
            path: "/proc".into(),
        };
        let id = proc_fd.mount_id().unwrap();
        let table = crate::os::mountinfo::MountTable::read().unwrap();
        let e = table.entries.iter().find(|e| e.mount_id == id).unwrap();
        assert_eq!(e.mount_point, Path::new("/proc"));
    }
}
