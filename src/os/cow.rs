//! Copy-on-write and sparse copies: FICLONE reflinks, hole-preserving copies
//! (SEEK_DATA/SEEK_HOLE + copy_file_range), whole-tree copies and FIEMAP
//! extent maps. Sources are never followed through symlinks and never
//! modified; destinations are always created fresh, never overwritten.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::Whence;

/// The raw ioctls, private to this module.
mod ioctl {
    // FICLONE = _IOW(0x94, 9, int): the argument is the source fd itself.
    nix::ioctl_write_int!(ficlone, 0x94, 9);
    // FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap); the size in the
    // request code is that of the header alone, the extent array follows
    // it in memory.
    nix::ioctl_readwrite!(fs_ioc_fiemap, b'f', 11, super::FiemapHeader);
}

/// Bytes moved per copy_file_range/read-write step, which is also how
/// often progress is reported.
const COPY_CHUNK: u64 = 16 << 20;
/// Buffer of the read/write fallback.
const BOUNCE_BUFFER: usize = 1 << 20;
/// Extents asked for per FS_IOC_FIEMAP call.
const FIEMAP_BATCH: usize = 128;
const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// A copy step that failed, with its paths and errno.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("open {path}: {err}")]
    Open {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("create {path}: {err}")]
    Create {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("stat {path}: {errno}")]
    Stat { path: PathBuf, errno: Errno },
    #[error("{path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("{path} changed while it was being copied")]
    Changed { path: PathBuf },
    #[error("reflink {src} to {dst}: the filesystem cannot share extents here ({errno})")]
    ReflinkUnsupported {
        src: PathBuf,
        dst: PathBuf,
        errno: Errno,
    },
    #[error("reflink {src} to {dst}: {errno}")]
    Reflink {
        src: PathBuf,
        dst: PathBuf,
        errno: Errno,
    },
    #[error("find data and holes in {path} from offset {offset}: {errno}")]
    Seek {
        path: PathBuf,
        offset: u64,
        errno: Errno,
    },
    #[error("copy_file_range {src} to {dst} at offset {offset}: {errno}")]
    CopyRange {
        src: PathBuf,
        dst: PathBuf,
        offset: u64,
        errno: Errno,
    },
    #[error("read {path} at offset {offset}: {err}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("write {path} at offset {offset}: {err}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("copy of {path} cancelled at offset {offset}")]
    Cancelled { path: PathBuf, offset: u64 },
    #[error("{path} ended at offset {offset} while being copied (it shrank)")]
    SourceShrank { path: PathBuf, offset: u64 },
    #[error("set length of {path} to {len}: {err}")]
    SetLength {
        path: PathBuf,
        len: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("FIEMAP on {path} from offset {offset}: {errno}")]
    Fiemap {
        path: PathBuf,
        offset: u64,
        errno: Errno,
    },
    #[error("{path} is on another filesystem than {root}: refusing to cross a mount")]
    CrossesFilesystem { path: PathBuf, root: PathBuf },
    #[error("{dst} lies inside {src}: a tree cannot be copied into itself")]
    DestinationInsideSource { src: PathBuf, dst: PathBuf },
    #[error("list directory {path}: {errno}")]
    ReadDir { path: PathBuf, errno: Errno },
    #[error("make directory {path}: {err}")]
    MakeDir {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("read symlink {path}: {errno}")]
    ReadLink { path: PathBuf, errno: Errno },
    #[error("create symlink {path}: {err}")]
    Symlink {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("hard link {path} to {target}: {err}")]
    HardLink {
        path: PathBuf,
        target: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("make special file {path}: {errno}")]
    MakeNode { path: PathBuf, errno: Errno },
    #[error("set owner of {path} to {uid}:{gid}: {err}")]
    SetOwner {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        err: std::io::Error,
    },
    #[error("set mode of {path} to {mode:o}: {err}")]
    SetMode {
        path: PathBuf,
        mode: u32,
        #[source]
        err: std::io::Error,
    },
    #[error("set times of {path}: {errno}")]
    SetTimes { path: PathBuf, errno: Errno },
}

impl CowError {
    /// Whether this is a reflink the filesystem (or the pair of
    /// filesystems) cannot do, so that a plain copy is the right fallback.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, CowError::ReflinkUnsupported { .. })
    }
}

/// The errnos FICLONE returns when extents cannot be shared at all (as
/// opposed to a failure of this particular clone): no remap support
/// (EOPNOTSUPP; ENOTTY from some stacked filesystems), different
/// filesystems (EXDEV), or a file the filesystem will not share (EINVAL).
fn reflink_unsupported(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY
    )
}

/// The errnos copy_file_range returns when the kernel cannot do the copy
/// in-kernel between these two files, so read/write must do it instead.
fn copy_range_unsupported(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL
    )
}

/// Removes a file this module created unless disarmed, so no failed
/// step leaves a half-made destination behind.
struct RemoveOnDrop<'a> {
    path: &'a Path,
    armed: bool,
}

impl<'a> RemoveOnDrop<'a> {
    fn new(path: &'a Path) -> Self {
        Self { path, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

/// Opens `path` for reading without following a final symlink and checks
/// it is a regular file.
fn open_source(path: &Path) -> Result<File, CowError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|err| CowError::Open {
            path: path.to_owned(),
            err,
        })?;
    let st = nix::sys::stat::fstat(&file).map_err(|errno| CowError::Stat {
        path: path.to_owned(),
        errno,
    })?;
    if !is_kind(&st, SFlag::S_IFREG) {
        return Err(CowError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Creates `path` exclusively (never through a symlink) with mode 0600.
fn create_destination(path: &Path) -> Result<File, CowError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| CowError::Create {
            path: path.to_owned(),
            err,
        })
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

/// FICLONE of all of `src` into the empty file `dst`.
fn clone_whole(src: &File, src_path: &Path, dst: &File, dst_path: &Path) -> Result<(), CowError> {
    let src_fd = libc::c_ulong::try_from(src.as_raw_fd()).expect("fds are non-negative");
    // SAFETY: FICLONE reads only its integer argument (the source fd);
    // both fds are open for the whole call.
    match unsafe { ioctl::ficlone(dst.as_raw_fd(), src_fd) } {
        Ok(_) => Ok(()),
        Err(errno) if reflink_unsupported(errno) => Err(CowError::ReflinkUnsupported {
            src: src_path.to_owned(),
            dst: dst_path.to_owned(),
            errno,
        }),
        Err(errno) => Err(CowError::Reflink {
            src: src_path.to_owned(),
            dst: dst_path.to_owned(),
            errno,
        }),
    }
}

/// Makes `dst` a reflink of `src`: a new file (created exclusively, mode
/// 0600, failing if `dst` exists) sharing all of `src`'s extents, so it
/// costs O(1) in the file's size and later writes to either file do not
/// show in the other. `src` must be a regular file and is not followed if
/// it is a symlink. On any failure `dst` is removed again.
/// [`CowError::is_not_supported`] tells the caller to fall back to
/// [`sparse_copy`].
pub fn reflink(src: &Path, dst: &Path) -> Result<(), CowError> {
    let source = open_source(src)?;
    let target = create_destination(dst)?;
    let guard = RemoveOnDrop::new(dst);
    clone_whole(&source, src, &target, dst)?;
    guard.disarm();
    Ok(())
}

/// The data ranges `(offset, length)` of an open file, ascending and
/// maximal, through SEEK_DATA/SEEK_HOLE. A filesystem without hole
/// support reports the whole file as one range.
fn data_ranges(file: &File, path: &Path) -> Result<Vec<(u64, u64)>, CowError> {
    let seek = |offset: i64, whence: Whence| {
        nix::unistd::lseek(file, offset, whence).map_err(|errno| (offset, errno))
    };
    let mut ranges = Vec::new();
    let mut pos: i64 = 0;
    loop {
        let start = match seek(pos, Whence::SeekData) {
            Ok(start) => start,
            // ENXIO: no data at or after `pos`.
            Err((_, Errno::ENXIO)) => break,
            Err((offset, errno)) => {
                return Err(CowError::Seek {
                    path: path.to_owned(),
                    offset: offset as u64,
                    errno,
                });
            }
        };
        let end = match seek(start, Whence::SeekHole) {
            Ok(end) => end,
            // The file shrank between the two seeks.
            Err((_, Errno::ENXIO)) => break,
            Err((offset, errno)) => {
                return Err(CowError::Seek {
                    path: path.to_owned(),
                    offset: offset as u64,
                    errno,
                });
            }
        };
        if end <= start {
            break;
        }
        ranges.push((start as u64, (end - start) as u64));
        pos = end;
    }
    Ok(ranges)
}

/// The ranges of `path` that hold data, as `(offset, length)` pairs in
/// ascending order, found with SEEK_DATA/SEEK_HOLE. Holes (and, on most
/// filesystems, unwritten preallocated extents) are left out. Granularity
/// is the filesystem's block size; a filesystem without hole support
/// reports the whole file as one range. Does not follow a final symlink.
pub fn allocated_ranges(path: &Path) -> Result<Vec<(u64, u64)>, CowError> {
    let file = open_source(path)?;
    data_ranges(&file, path)
}

/// What [`copy_data`] does when the source ends before the length it had
/// when the copy began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnShrink {
    /// Fail with [`CowError::SourceShrank`].
    Fail,
    /// End the copy where the source ended (a live file, taken as it is).
    Stop,
}

/// Copies the data ranges of `src` into the empty file `dst` at the same
/// offsets, then sets `dst`'s length, so holes stay holes.
fn copy_data(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    progress: &dyn Fn(u64, u64) -> bool,
    on_shrink: OnShrink,
) -> Result<u64, CowError> {
    let mut len = src
        .metadata()
        .map_err(|err| CowError::Open {
            path: src_path.to_owned(),
            err,
        })?
        .len();
    let ranges = data_ranges(src, src_path)?;
    let total: u64 = ranges.iter().map(|(_, l)| l).sum();
    let cancelled = |offset| CowError::Cancelled {
        path: src_path.to_owned(),
        offset,
    };
    if !progress(0, total) {
        return Err(cancelled(0));
    }
    let mut copied = 0u64;
    let mut in_kernel = true;
    let mut buffer = Vec::new();
    'ranges: for (start, range_len) in ranges {
        let end = start + range_len;
        let mut pos = start;
        while pos < end {
            let chunk = (end - pos).min(COPY_CHUNK);
            let moved = if in_kernel {
                let mut off_in = pos as i64;
                let mut off_out = pos as i64;
                match nix::fcntl::copy_file_range(
                    src,
                    Some(&mut off_in),
                    dst,
                    Some(&mut off_out),
                    chunk as usize,
                ) {
                    Ok(n) => n as u64,
                    Err(errno) if copy_range_unsupported(errno) => {
                        in_kernel = false;
                        continue;
                    }
                    Err(errno) => {
                        return Err(CowError::CopyRange {
                            src: src_path.to_owned(),
                            dst: dst_path.to_owned(),
                            offset: pos,
                            errno,
                        });
                    }
                }
            } else {
                if buffer.is_empty() {
                    buffer = vec![0u8; BOUNCE_BUFFER];
                }
                let want = (chunk as usize).min(buffer.len());
                let n = src
                    .read_at(&mut buffer[..want], pos)
                    .map_err(|err| CowError::Read {
                        path: src_path.to_owned(),
                        offset: pos,
                        err,
                    })?;
                dst.write_all_at(&buffer[..n], pos)
                    .map_err(|err| CowError::Write {
                        path: dst_path.to_owned(),
                        offset: pos,
                        err,
                    })?;
                n as u64
            };
            if moved == 0 {
                if on_shrink == OnShrink::Stop {
                    len = pos;
                    break 'ranges;
                }
                return Err(CowError::SourceShrank {
                    path: src_path.to_owned(),
                    offset: pos,
                });
            }
            pos += moved;
            copied += moved;
            if !progress(copied, total) {
                return Err(cancelled(pos));
            }
        }
    }
    dst.set_len(len).map_err(|err| CowError::SetLength {
        path: dst_path.to_owned(),
        len,
        err,
    })?;
    Ok(copied)
}

/// Copies `src` to a new file `dst` (created exclusively, mode 0600),
/// reading and writing only `src`'s data ranges, so holes stay holes and
/// the length is kept. Uses copy_file_range (which on xfs and btrfs may
/// share extents instead of copying) and falls back to read/write where
/// the kernel cannot copy between the two files. Returns the bytes of data
/// copied; calls `progress(copied, total_data)` once at the start and after
/// every step (16 MiB), and stops with [`CowError::Cancelled`] as soon as it
/// returns false. `src` must be a regular file that nobody writes meanwhile
/// (freeze or snapshot it first); if it shrinks the copy fails. Not synced.
/// On any failure `dst` is removed again.
pub fn sparse_copy(
    src: &Path,
    dst: &Path,
    progress: &dyn Fn(u64, u64) -> bool,
) -> Result<u64, CowError> {
    let source = open_source(src)?;
    let target = create_destination(dst)?;
    let guard = RemoveOnDrop::new(dst);
    let copied = copy_data(&source, src, &target, dst, progress, OnShrink::Fail)?;
    guard.disarm();
    Ok(copied)
}

/// What [`reflink_tree`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCopy {
    /// Regular files made (hard links to an earlier copy not counted).
    pub files: u64,
    /// Of those, the ones that were reflinked.
    pub reflinked: u64,
    /// Bytes of data copied for the files that could not be reflinked.
    pub copied_bytes: u64,
    /// Directories made, the root included.
    pub directories: u64,
    pub symlinks: u64,
    /// Hard links recreated as hard links.
    pub hard_links: u64,
    /// FIFOs, sockets and device nodes.
    pub special_files: u64,
    /// Entries listed that were gone when their turn came (removed or
    /// renamed away meanwhile): left out, as if listed a moment later.
    pub vanished: u64,
    /// Entries copied again because they changed under their copy
    /// (replaced by another file, or a file written to meanwhile).
    pub retried: u64,
    /// Files still changing after [`LIVE_ATTEMPTS`] copies, taken as read
    /// on the last: their copy may mix what they held before and after.
    pub unsettled: u64,
}

/// How often a tree copy copies one entry that keeps changing under it
/// before it takes the entry as it reads it.
pub const LIVE_ATTEMPTS: u32 = 4;

/// A source directory being walked: its fd (all lookups are relative to
/// it, so nothing on the way is resolved twice) and both paths.
#[derive(Debug)]
struct PendingDir {
    fd: OwnedFd,
    src: PathBuf,
    dst: PathBuf,
}

fn open_dir_at(dir: &impl AsFd, name: &OsStr, path: &Path) -> Result<OwnedFd, CowError> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| CowError::Open {
        path: path.to_owned(),
        err: errno.into(),
    })
}

fn fstat(fd: &impl AsFd, path: &Path) -> Result<FileStat, CowError> {
    nix::sys::stat::fstat(fd).map_err(|errno| CowError::Stat {
        path: path.to_owned(),
        errno,
    })
}

/// The entry names of a directory, without `.` and `..`.
fn list_dir(dir: &OwnedFd, path: &Path) -> Result<Vec<OsString>, CowError> {
    let read_err = |errno| CowError::ReadDir {
        path: path.to_owned(),
        errno,
    };
    let dup = dir
        .try_clone()
        .map_err(|e| read_err(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    let mut handle = nix::dir::Dir::from_fd(dup).map_err(read_err)?;
    let mut names = Vec::new();
    for entry in handle.iter() {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(OsStr::from_bytes(name).to_owned());
    }
    Ok(names)
}

/// Gives `path` (which this module made) the owner, mode and times of
/// `st`, without following a symlink at `path`. Owner first: chown clears
/// set-id bits, which the mode then restores.
fn copy_attributes(path: &Path, st: &FileStat) -> Result<(), CowError> {
    std::os::unix::fs::lchown(path, Some(st.st_uid), Some(st.st_gid)).map_err(|err| {
        CowError::SetOwner {
            path: path.to_owned(),
            uid: st.st_uid,
            gid: st.st_gid,
            err,
        }
    })?;
    if !is_kind(st, SFlag::S_IFLNK) {
        let mode = st.st_mode & 0o7777;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|err| CowError::SetMode {
                path: path.to_owned(),
                mode,
                err,
            })?;
    }
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::new(st.st_atime, st.st_atime_nsec),
        &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|errno| CowError::SetTimes {
        path: path.to_owned(),
        errno,
    })
}

/// [`copy_attributes`] through an open file of ours.
fn copy_file_attributes(file: &File, path: &Path, st: &FileStat) -> Result<(), CowError> {
    std::os::unix::fs::fchown(file, Some(st.st_uid), Some(st.st_gid)).map_err(|err| {
        CowError::SetOwner {
            path: path.to_owned(),
            uid: st.st_uid,
            gid: st.st_gid,
            err,
        }
    })?;
    let mode = st.st_mode & 0o7777;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|err| CowError::SetMode {
            path: path.to_owned(),
            mode,
            err,
        })?;
    nix::sys::stat::futimens(
        file,
        &TimeSpec::new(st.st_atime, st.st_atime_nsec),
        &TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
    .map_err(|errno| CowError::SetTimes {
        path: path.to_owned(),
        errno,
    })
}

/// Walks one source tree into a new destination tree.
struct TreeCopier<'a> {
    root: &'a Path,
    root_dev: u64,
    /// `st_ino` of the destination root, met again if it lies inside the
    /// source tree.
    dst_root_ino: u64,
    dst_root: &'a Path,
    try_reflink: bool,
    /// First copy of each multiply-linked source inode.
    links: HashMap<u64, PathBuf>,
    /// Directories whose attributes are set once their contents exist
    /// (a read-only or dated directory must be filled first).
    finished_dirs: Vec<(PathBuf, FileStat)>,
    stats: TreeCopy,
    /// Called with each regular file's source path once it is open and
    /// its copy made, before its data is copied (tests change it there).
    before_data: &'a dyn Fn(&Path),
}

/// Whether `e` says the source entry `src` no longer exists.
fn source_vanished(e: &CowError, src: &Path) -> bool {
    match e {
        CowError::Stat { path, errno } | CowError::ReadLink { path, errno } => {
            path == src && *errno == Errno::ENOENT
        }
        CowError::Open { path, err } => path == src && err.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Whether `e` says the source entry `src` changed under its copy.
fn source_changed(e: &CowError, src: &Path) -> bool {
    match e {
        CowError::Changed { path } | CowError::SourceShrank { path, .. } => path == src,
        _ => false,
    }
}

/// Whether a file's data may have changed between two stats of it: its
/// size, or its modification or change time, differs.
fn written_between(before: &FileStat, after: &FileStat) -> bool {
    (before.st_size, before.st_mtime, before.st_mtime_nsec)
        != (after.st_size, after.st_mtime, after.st_mtime_nsec)
        || (before.st_ctime, before.st_ctime_nsec) != (after.st_ctime, after.st_ctime_nsec)
}

impl TreeCopier<'_> {
    /// Copies one listed entry. The source may be in use: an entry gone
    /// since the listing is left out, and one that changed under its copy
    /// is copied again, up to [`LIVE_ATTEMPTS`] times in all.
    fn copy_entry(
        &mut self,
        parent: &PendingDir,
        name: &OsStr,
        pending: &mut Vec<PendingDir>,
    ) -> Result<(), CowError> {
        let src = parent.src.join(name);
        let dst = parent.dst.join(name);
        let mut attempt = 1;
        loop {
            let last = attempt == LIVE_ATTEMPTS;
            match self.copy_entry_once(parent, name, &src, &dst, pending, last) {
                Err(e) if source_vanished(&e, &src) => {
                    tracing::debug!(path = %src.display(), "left out: gone since its directory was listed");
                    self.stats.vanished += 1;
                    return Ok(());
                }
                Err(e) if !last && source_changed(&e, &src) => {
                    tracing::debug!(path = %src.display(), attempt, "copying again: {e}");
                    self.stats.retried += 1;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// One attempt of [`Self::copy_entry`]; on any error nothing of it is
    /// left at `dst`. `last`: a file that changes meanwhile is taken as
    /// read rather than refused.
    fn copy_entry_once(
        &mut self,
        parent: &PendingDir,
        name: &OsStr,
        src: &Path,
        dst: &Path,
        pending: &mut Vec<PendingDir>,
        last: bool,
    ) -> Result<(), CowError> {
        let (src, dst) = (src.to_owned(), dst.to_owned());
        let st =
            nix::sys::stat::fstatat(&parent.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|errno| CowError::Stat {
                    path: src.clone(),
                    errno,
                })?;
        if st.st_dev != self.root_dev {
            return Err(CowError::CrossesFilesystem {
                path: src,
                root: self.root.to_owned(),
            });
        }
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFDIR {
            if st.st_ino == self.dst_root_ino {
                return Err(CowError::DestinationInsideSource {
                    src: self.root.to_owned(),
                    dst: self.dst_root.to_owned(),
                });
            }
            let fd = open_dir_at(&parent.fd, name, &src)?;
            let opened = fstat(&fd, &src)?;
            if opened.st_dev != st.st_dev || opened.st_ino != st.st_ino {
                return Err(CowError::Changed { path: src });
            }
            std::fs::create_dir(&dst).map_err(|err| CowError::MakeDir {
                path: dst.clone(),
                err,
            })?;
            self.stats.directories += 1;
            self.finished_dirs.push((dst.clone(), st));
            pending.push(PendingDir { fd, src, dst });
        } else if kind == SFlag::S_IFREG {
            self.copy_regular(parent, name, &src, &dst, &st, last)?;
        } else if kind == SFlag::S_IFLNK {
            let target = nix::fcntl::readlinkat(&parent.fd, name).map_err(|errno| {
                if errno == Errno::EINVAL {
                    // No longer a symlink: replaced since the stat.
                    CowError::Changed { path: src.clone() }
                } else {
                    CowError::ReadLink {
                        path: src.clone(),
                        errno,
                    }
                }
            })?;
            std::os::unix::fs::symlink(&target, &dst).map_err(|err| CowError::Symlink {
                path: dst.clone(),
                err,
            })?;
            copy_attributes(&dst, &st)?;
            self.stats.symlinks += 1;
        } else {
            // FIFO, socket, character or block device: the node itself,
            // never its contents.
            nix::sys::stat::mknod(
                &dst,
                kind,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
                st.st_rdev,
            )
            .map_err(|errno| CowError::MakeNode {
                path: dst.clone(),
                errno,
            })?;
            copy_attributes(&dst, &st)?;
            self.stats.special_files += 1;
        }
        Ok(())
    }

    fn copy_regular(
        &mut self,
        parent: &PendingDir,
        name: &OsStr,
        src: &Path,
        dst: &Path,
        st: &FileStat,
        last: bool,
    ) -> Result<(), CowError> {
        if st.st_nlink > 1
            && let Some(first) = self.links.get(&st.st_ino)
        {
            std::fs::hard_link(first, dst).map_err(|err| CowError::HardLink {
                path: dst.to_owned(),
                target: first.clone(),
                err,
            })?;
            self.stats.hard_links += 1;
            return Ok(());
        }
        // O_NONBLOCK: if the entry was swapped for a FIFO since the stat,
        // opening it must not hang; the check below then refuses it.
        let fd = nix::fcntl::openat(
            &parent.fd,
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| CowError::Open {
            path: src.to_owned(),
            err: errno.into(),
        })?;
        let opened = fstat(&fd, src)?;
        if !is_kind(&opened, SFlag::S_IFREG) || opened.st_ino != st.st_ino {
            return Err(CowError::Changed {
                path: src.to_owned(),
            });
        }
        let source = File::from(fd);
        let target = create_destination(dst)?;
        let made = RemoveOnDrop::new(dst);
        (self.before_data)(src);
        let mut reflinked = false;
        if self.try_reflink {
            match clone_whole(&source, src, &target, dst) {
                Ok(()) => reflinked = true,
                Err(e) if e.is_not_supported() => {
                    tracing::debug!(error = %e, "reflink not supported, copying instead");
                    self.try_reflink = false;
                }
                Err(e) => return Err(e),
            }
        }
        if reflinked {
            // FICLONE shares the file as it was at one instant.
            self.stats.reflinked += 1;
        } else {
            let on_shrink = if last { OnShrink::Stop } else { OnShrink::Fail };
            let copied = copy_data(&source, src, &target, dst, &|_, _| true, on_shrink)?;
            if written_between(&opened, &fstat(&source, src)?) {
                if !last {
                    return Err(CowError::Changed {
                        path: src.to_owned(),
                    });
                }
                tracing::warn!(
                    path = %src.display(),
                    attempts = LIVE_ATTEMPTS,
                    "a file kept changing while it was copied: taken as read"
                );
                self.stats.unsettled += 1;
            }
            self.stats.copied_bytes += copied;
        }
        copy_file_attributes(&target, dst, &opened)?;
        made.disarm();
        self.stats.files += 1;
        if st.st_nlink > 1 {
            self.links.insert(st.st_ino, dst.to_owned());
        }
        Ok(())
    }
}

/// Copies the directory tree at `src_dir` to `dst_dir`, which must not
/// exist and is created. Regular files are reflinked where the filesystem
/// can (else copied sparsely, see [`sparse_copy`]); directories, symlinks
/// (never followed: the link itself is copied), hard links, FIFOs, sockets
/// and device nodes are recreated with owner, mode and times. Extended
/// attributes are not copied. Every lookup in the source is relative to an
/// open directory and refuses symlinks, so a tree changing underneath
/// cannot redirect the copy elsewhere; an entry on another filesystem than
/// `src_dir` (a mount inside the tree) is an error, and so is a `dst_dir`
/// inside `src_dir`. On failure the partial `dst_dir` is removed.
///
/// The source may be in use (a directory volume is never frozen): each
/// entry is copied as it is when its turn comes, so the copy is not one
/// instant of the whole tree. An entry removed since its directory was
/// listed is left out; one replaced meanwhile, or a file written to while
/// its data was copied (its size or times differ afterwards), is copied
/// again, and a file still changing after [`LIVE_ATTEMPTS`] copies is
/// taken as read on the last ([`TreeCopy::unsettled`]). File times have
/// the kernel's coarse clock, so a rewrite back to the same size within
/// one tick goes unseen. A reflinked file is one instant of that file.
pub fn reflink_tree(src_dir: &Path, dst_dir: &Path) -> Result<TreeCopy, CowError> {
    reflink_tree_with(src_dir, dst_dir, true, &|_| ())
}

/// [`reflink_tree`], reflinking only if `try_reflink`, and calling
/// `before_data` as each regular file's data is about to be copied.
fn reflink_tree_with(
    src_dir: &Path,
    dst_dir: &Path,
    try_reflink: bool,
    before_data: &dyn Fn(&Path),
) -> Result<TreeCopy, CowError> {
    let root_fd = open_dir_at(&nix::fcntl::AT_FDCWD, src_dir.as_os_str(), src_dir)?;
    let root_st = fstat(&root_fd, src_dir)?;
    std::fs::create_dir(dst_dir).map_err(|err| CowError::MakeDir {
        path: dst_dir.to_owned(),
        err,
    })?;
    let result = (|| {
        let dst_st = nix::sys::stat::lstat(dst_dir).map_err(|errno| CowError::Stat {
            path: dst_dir.to_owned(),
            errno,
        })?;
        let mut copier = TreeCopier {
            root: src_dir,
            root_dev: root_st.st_dev,
            // Only comparable on the same filesystem; elsewhere no source
            // entry can be it.
            dst_root_ino: if dst_st.st_dev == root_st.st_dev {
                dst_st.st_ino
            } else {
                0
            },
            dst_root: dst_dir,
            try_reflink,
            links: HashMap::new(),
            finished_dirs: vec![(dst_dir.to_owned(), root_st)],
            stats: TreeCopy {
                directories: 1,
                ..TreeCopy::default()
            },
            before_data,
        };
        let mut pending = vec![PendingDir {
            fd: root_fd,
            src: src_dir.to_owned(),
            dst: dst_dir.to_owned(),
        }];
        while let Some(dir) = pending.pop() {
            for name in list_dir(&dir.fd, &dir.src)? {
                copier.copy_entry(&dir, &name, &mut pending)?;
            }
        }
        // Deepest first, so setting a parent's mtime comes after every
        // change inside it.
        for (path, st) in copier.finished_dirs.iter().rev() {
            copy_attributes(path, st)?;
        }
        Ok(copier.stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dst_dir);
    }
    result
}

/// One extent of a file as FS_IOC_FIEMAP reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Address on the device (for btrfs, in its logical address space).
    /// Meaningful only when [`Extent::has_location`] holds.
    pub physical: u64,
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags; see the associated constants.
    pub flags: u32,
}

impl Extent {
    pub const LAST: u32 = 0x0000_0001;
    pub const UNKNOWN: u32 = 0x0000_0002;
    pub const DELALLOC: u32 = 0x0000_0004;
    pub const ENCODED: u32 = 0x0000_0008;
    pub const DATA_ENCRYPTED: u32 = 0x0000_0080;
    pub const NOT_ALIGNED: u32 = 0x0000_0100;
    pub const DATA_INLINE: u32 = 0x0000_0200;
    pub const DATA_TAIL: u32 = 0x0000_0400;
    pub const UNWRITTEN: u32 = 0x0000_0800;
    pub const MERGED: u32 = 0x0000_1000;
    pub const SHARED: u32 = 0x0000_2000;

    /// The last extent of the file.
    pub fn is_last(&self) -> bool {
        self.flags & Self::LAST != 0
    }

    /// Shared with another file or snapshot (reflinked).
    pub fn is_shared(&self) -> bool {
        self.flags & Self::SHARED != 0
    }

    /// Whether `physical` names a real, stable location.
    pub fn has_location(&self) -> bool {
        self.flags & (Self::UNKNOWN | Self::DELALLOC | Self::DATA_INLINE) == 0
    }

    /// Whether byte `logical + k` lives at `physical + k` for every `k` in
    /// the extent (not so for compressed or encrypted extents).
    fn maps_linearly(&self) -> bool {
        self.has_location() && self.flags & (Self::ENCODED | Self::DATA_ENCRYPTED) == 0
    }

    fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }
}

/// `struct fiemap` from <linux/fiemap.h>, without its flexible array.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent` from <linux/fiemap.h>.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// The header with room for [`FIEMAP_BATCH`] extents right behind it, as
/// the ioctl expects.
#[repr(C)]
struct FiemapRequest {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapHeader>() == 32);
const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);

/// The extent map of `path` through FS_IOC_FIEMAP, ascending by logical
/// offset, holes left out. Dirty data is written back first
/// (FIEMAP_FLAG_SYNC) so delayed allocations have real addresses. Two
/// reflinked files map a range to the same physical address until one of
/// them is written there; [`changed_ranges`] compares two maps. Does not
/// follow a final symlink.
pub fn fiemap(path: &Path) -> Result<Vec<Extent>, CowError> {
    let file = open_source(path)?;
    let mut extents = Vec::new();
    let mut start = 0u64;
    // SAFETY: FiemapRequest is plain integers, for which all-zero is valid.
    let mut request: Box<FiemapRequest> = Box::new(unsafe { std::mem::zeroed() });
    loop {
        request.header = FiemapHeader {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: FIEMAP_BATCH as u32,
            fm_reserved: 0,
        };
        let ptr: *mut FiemapRequest = &mut *request;
        // SAFETY: the header is followed in memory by room for
        // `fm_extent_count` extents (repr(C) FiemapRequest), which is all
        // the kernel writes; the buffer lives across the call.
        unsafe { ioctl::fs_ioc_fiemap(file.as_raw_fd(), ptr.cast::<FiemapHeader>()) }.map_err(
            |errno| CowError::Fiemap {
                path: path.to_owned(),
                offset: start,
                errno,
            },
        )?;
        let mapped = (request.header.fm_mapped_extents as usize).min(FIEMAP_BATCH);
        if mapped == 0 {
            break;
        }
        let batch = &request.extents[..mapped];
        extents.extend(batch.iter().map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            length: e.fe_length,
            flags: e.fe_flags,
        }));
        let last = batch[mapped - 1];
        let next = last.fe_logical.saturating_add(last.fe_length);
        if last.fe_flags & Extent::LAST != 0 || next <= start {
            break;
        }
        start = next;
    }
    Ok(extents)
}

/// The extent of `map` (sorted, non-overlapping) covering `offset`.
fn extent_at(map: &[Extent], offset: u64) -> Option<&Extent> {
    let i = map.partition_point(|e| e.end() <= offset);
    map.get(i).filter(|e| e.logical <= offset)
}

/// The byte ranges `(offset, length)` at which two extent maps (from
/// [`fiemap`], e.g. of a file and its reflink) may hold different data,
/// ascending and merged. A range is the same when both maps have a hole
/// there, or both put it at the same physical address; a range whose
/// address is unknown, delayed or inline on either side counts as changed,
/// and so does a compressed or encrypted range unless both maps hold the
/// identical extent. Lengths beyond the last extent (a trailing hole or a
/// different file size) are the caller's to compare. Pure: no I/O.
pub fn changed_ranges(a: &[Extent], b: &[Extent]) -> Vec<(u64, u64)> {
    let mut bounds: Vec<u64> = a
        .iter()
        .chain(b)
        .flat_map(|e| [e.logical, e.end()])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in bounds.windows(2) {
        let (from, to) = (w[0], w[1]);
        let same = match (extent_at(a, from), extent_at(b, from)) {
            (None, None) => true,
            (Some(x), Some(y)) if x.maps_linearly() && y.maps_linearly() => {
                x.physical.wrapping_add(from - x.logical)
                    == y.physical.wrapping_add(from - y.logical)
            }
            (Some(x), Some(y)) => {
                x.has_location()
                    && (x.logical, x.physical, x.length) == (y.logical, y.physical, y.length)
            }
            _ => false,
        };
        if same {
            continue;
        }
        match out.last_mut() {
            Some((start, len)) if *start + *len == from => *len += to - from,
            _ => out.push((from, to - from)),
        }
    }
    out
}

/// The `block`-aligned ranges `(offset, length)` at which the contents of
/// files `a` and `b` differ, ascending and merged, found by reading both
/// (holes and the part past a shorter file read as zeros). Only ranges
/// where either file holds data are read: O(data), for pools where extent
/// maps cannot tell (no sharing).
pub fn differing_ranges(a: &Path, b: &Path, block: u64) -> Result<Vec<(u64, u64)>, CowError> {
    use std::os::unix::fs::FileExt;
    let fa = open_source(a)?;
    let fb = open_source(b)?;
    let mut data: Vec<(u64, u64)> = allocated_ranges(a)?;
    data.extend(allocated_ranges(b)?);
    data.sort_unstable();
    let read_err = |path: &Path, offset: u64| {
        let path = path.to_owned();
        move |err| CowError::Read { path, offset, err }
    };
    let chunk = (1u64 << 20).max(block);
    let mut bufa = vec![0u8; chunk as usize];
    let mut bufb = vec![0u8; chunk as usize];
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut done = 0u64; // everything below this has been compared
    for (off, len) in data {
        let mut pos = (off / block * block).max(done);
        let end = off + len;
        while pos < end {
            let n = chunk.min(end.div_ceil(block) * block - pos) as usize;
            bufa[..n].fill(0);
            bufb[..n].fill(0);
            read_full(&fa, &mut bufa[..n], pos).map_err(read_err(a, pos))?;
            read_full(&fb, &mut bufb[..n], pos).map_err(read_err(b, pos))?;
            for (i, (x, y)) in bufa[..n]
                .chunks(block as usize)
                .zip(bufb[..n].chunks(block as usize))
                .enumerate()
            {
                if x != y {
                    let at = pos + i as u64 * block;
                    match out.last_mut() {
                        Some((s, l)) if *s + *l == at => *l += block,
                        _ => out.push((at, block)),
                    }
                }
            }
            pos += n as u64;
        }
        done = done.max(pos);
    }
    fn read_full(f: &File, buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match f.read_at(&mut buf[filled..], at)? {
                0 => break, // past the end: zeros
                n => {
                    filled += n;
                    at += n as u64;
                }
            }
        }
        Ok(())
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    const K: u64 = 1024;

    #[test]
    fn identical_maps_do_not_differ() {
        let a = vec![ext(0, 1 << 20, 256 * K, Extent::SHARED | Extent::LAST)];
        assert!(changed_ranges(&a, &a).is_empty());
    }

    #[test]
    fn overwritten_block_in_a_reflink_differs_exactly_there() {
        // Original: one extent. Copy: the same extent split around a 64 KiB
        // block that was rewritten elsewhere.
        let base = 10 << 20;
        let a = vec![ext(0, base, 1024 * K, Extent::SHARED | Extent::LAST)];
        let b = vec![
            ext(0, base, 256 * K, Extent::SHARED),
            ext(256 * K, 50 << 20, 64 * K, 0),
            ext(
                320 * K,
                base + 320 * K,
                704 * K,
                Extent::SHARED | Extent::LAST,
            ),
        ];
        assert_eq!(changed_ranges(&a, &b), vec![(256 * K, 64 * K)]);
        assert_eq!(changed_ranges(&b, &a), vec![(256 * K, 64 * K)]);
    }

    #[test]
    fn hole_against_data_differs_and_holes_match() {
        let a = vec![
            ext(0, 4096, 4 * K, 0),
            ext(64 * K, 8192, 4 * K, Extent::LAST),
        ];
        let b = vec![ext(0, 4096, 4 * K, Extent::LAST)];
        assert_eq!(changed_ranges(&a, &b), vec![(64 * K, 4 * K)]);
    }

    #[test]
    fn adjacent_changes_merge() {
        let a = vec![
            ext(0, 0, 8 * K, 0),
            ext(8 * K, 100 * K, 8 * K, Extent::LAST),
        ];
        let b = vec![ext(0, 200 * K, 16 * K, Extent::LAST)];
        assert_eq!(changed_ranges(&a, &b), vec![(0, 16 * K)]);
    }

    #[test]
    fn unknown_or_delayed_locations_count_as_changed() {
        let a = vec![ext(0, 0, 4 * K, Extent::DELALLOC | Extent::UNKNOWN)];
        assert_eq!(changed_ranges(&a, &a), vec![(0, 4 * K)]);
    }

    #[test]
    fn encoded_extents_match_only_when_identical() {
        let a = vec![ext(0, 1 << 20, 128 * K, Extent::ENCODED)];
        assert!(changed_ranges(&a, &a).is_empty());
        let b = vec![
            ext(0, 1 << 20, 64 * K, Extent::ENCODED),
            ext(64 * K, 1 << 20, 64 * K, Extent::ENCODED),
        ];
        assert_eq!(changed_ranges(&a, &b), vec![(0, 128 * K)]);
    }

    #[test]
    fn reflink_errnos_that_mean_fall_back() {
        for e in [
            Errno::EOPNOTSUPP,
            Errno::EXDEV,
            Errno::EINVAL,
            Errno::ENOTTY,
        ] {
            assert!(reflink_unsupported(e), "{e}");
        }
        for e in [Errno::EIO, Errno::ENOSPC, Errno::EPERM, Errno::EBADF] {
            assert!(!reflink_unsupported(e), "{e}");
        }
    }

    // A tree copy of a source in use, with the changes made by the hook
    // that runs as each file's data is about to be copied.

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect()
    }

    fn tree(files: &[(&str, Vec<u8>)]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for (name, data) in files {
            std::fs::write(src.join(name), data).unwrap();
        }
        let dst = dir.path().join("dst");
        (dir, src, dst)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_file_written_while_its_data_is_copied_is_copied_again_as_it_is_now() {
        let (_dir, src, dst) = tree(&[("a", bytes(1, 300_000)), ("b", bytes(2, 5000))]);
        let rewritten = std::cell::Cell::new(false);
        let stats = reflink_tree_with(&src, &dst, false, &|p| {
            if p.ends_with("a") && !rewritten.replace(true) {
                // What File::create and a write do: shorter, new bytes.
                std::fs::write(p, bytes(9, 70_000)).unwrap();
            }
        })
        .expect("a file changing under the copy is no error");
        assert!(rewritten.get());
        assert_eq!((stats.retried, stats.unsettled, stats.vanished), (1, 0, 0));
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), bytes(9, 70_000));
        assert_eq!(std::fs::read(dst.join("b")).unwrap(), bytes(2, 5000));
        assert_eq!(stats.files, 2);
    }

    #[test]
    fn a_file_that_never_holds_still_is_taken_as_read_on_the_last_copy() {
        let (_dir, src, dst) = tree(&[("a", bytes(1, 1000))]);
        let writes = std::cell::Cell::new(0usize);
        let stats = reflink_tree_with(&src, &dst, false, &|p| {
            let n = writes.get() + 1;
            writes.set(n);
            std::fs::write(p, bytes(n as u8, 1000 + n * 4096)).unwrap();
        })
        .expect("a file that keeps changing is taken, not refused");
        let n = LIVE_ATTEMPTS as usize;
        assert_eq!(writes.get(), n, "one copy per attempt");
        assert_eq!(stats.retried, u64::from(LIVE_ATTEMPTS) - 1);
        assert_eq!(stats.unsettled, 1);
        // The last write came before the last copy's data: that copy has it.
        assert_eq!(
            std::fs::read(dst.join("a")).unwrap(),
            bytes(n as u8, 1000 + n * 4096)
        );
    }

    #[test]
    fn entries_removed_after_the_listing_are_left_out_and_a_replaced_file_is_copied_anew() {
        let (_dir, src, dst) = tree(&[
            ("x", bytes(1, 9000)),
            ("y", bytes(2, 9000)),
            ("z", bytes(3, 9000)),
        ]);
        std::os::unix::fs::symlink("x", src.join("link")).unwrap();
        let first = std::cell::RefCell::new(None::<String>);
        let stats = reflink_tree_with(&src, &dst, false, &|p| {
            let me = p.file_name().unwrap().to_str().unwrap().to_owned();
            if first.borrow().is_some() {
                return;
            }
            *first.borrow_mut() = Some(me.clone());
            // The first file copied: every other entry but the directory
            // goes, and this file is replaced (renamed over) by another.
            for other in ["x", "y", "z", "link"] {
                if other != me {
                    std::fs::remove_file(p.with_file_name(other)).unwrap();
                }
            }
            let new = p.with_file_name("new");
            std::fs::write(&new, bytes(7, 12_345)).unwrap();
            std::fs::rename(&new, p).unwrap();
        })
        .expect("a tree changing under the copy is no error");
        let me = first.borrow().clone().expect("a file was copied");
        assert_eq!(names(&dst), vec![me.clone()]);
        assert_eq!(std::fs::read(dst.join(&me)).unwrap(), bytes(7, 12_345));
        assert_eq!((stats.vanished, stats.retried, stats.files), (3, 1, 1));
    }

    #[test]
    fn a_missing_destination_is_no_vanished_source_and_fails_the_copy() {
        let (_dir, src, dst) = tree(&[("a", bytes(1, 1000)), ("b", bytes(2, 1000))]);
        let e = reflink_tree_with(&src, &dst, false, &|_| {
            // ENOENT on the destination's side, from the second file on.
            let _ = std::fs::remove_dir_all(&dst);
        })
        .expect_err("the copy cannot be made");
        assert!(matches!(e, CowError::Create { .. }), "{e}");
        assert!(!dst.exists());
        assert_eq!(names(&src), vec!["a", "b"], "the source is untouched");
    }
}
