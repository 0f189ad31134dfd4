//! One regular file, `volume`, served on a private FUSE mount by a
//! [`BlockHandler`], and a loop device in direct-I/O mode on it: the block
//! data path of engines that must see every write (the replicated backend;
//! these kernels have no NBD or ublk). This module never caches or
//! acknowledges a write itself: no writeback cache, no passthrough.
//!
//! The mount is made by `fuser` in pure Rust: as root it is a direct
//! mount(2) of /dev/fuse (no libfuse, no helper process); only where
//! mount(2) is refused (EPERM) does fuser fall back to `fusermount3`.

#![allow(clippy::disallowed_methods)] // umount2 of the mount this module made

use std::alloc::Layout;
use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno as FuseErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, WriteFlags,
};
use nix::errno::Errno;
use nix::mount::MntFlags;

use crate::os::loopdev::{LoopDevice, LoopError};
use crate::os::mountinfo::MountTable;

/// The name of the one file on the mount.
pub const VOLUME_FILE: &str = "volume";

const FILE_INO: INodeNo = INodeNo(2);
/// Attributes change only through [`FuseFile::resize`], which invalidates
/// them in the kernel, so the kernel may keep them long.
const ATTR_TTL: Duration = Duration::from_secs(3600);
/// The mount's source in the mount table (its type is `fuse`).
const SOURCE: &str = "stowage";
/// How long dropping a [`FuseFile`] waits for its workers to leave.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Alignment of the buffers this module hands out: a page, which satisfies
/// every O_DIRECT memory alignment Linux asks for.
pub const BUFFER_ALIGN: usize = 4096;

/// Answers a write: called once, with its outcome, on any thread.
pub type WriteDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Where the data of a FUSE-served volume lives. Offsets are bytes into the
/// volume; the FUSE layer only calls with ranges inside the volume's size.
/// An error is reported to the kernel as EIO (through a loop device, to the
/// writer or reader). Called from several worker threads at once.
pub trait BlockHandler: Send + Sync + 'static {
    /// Fills `buf` with the bytes at `offset`. `buf` is aligned to
    /// [`BUFFER_ALIGN`].
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Stores `data` at `offset`; it must be readable once this returns.
    /// `data` has no particular alignment.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// [`BlockHandler::write_at`], answered through `done`, which may run
    /// later on another thread: a handler that waits for others (the
    /// replicated engine's copies) returns at once, so the FUSE worker
    /// takes the next request meanwhile. `data` is only borrowed for the
    /// call. By default `write_at`, then `done`.
    fn write_then(&self, offset: u64, data: &[u8], done: WriteDone) {
        done(self.write_at(offset, data));
    }
    /// Makes every write that returned before this call durable.
    fn flush(&self) -> io::Result<()>;
    /// Grows the volume to `len` bytes (never shrinks; the new range reads
    /// as zeros).
    fn resize(&self, len: u64) -> io::Result<()>;
}

/// How the FUSE connection is set up. The defaults are the settings the
/// replicated engine measured best (issue 14): several workers with their
/// own /dev/fuse descriptors, asynchronous direct I/O, 1 MiB requests.
/// Each worker answers one request at a time and blocks in the handler's
/// I/O, so the workers bound the random I/O in flight: `cargo bench
/// --bench fuse_file -- --workers N` measured 4 KiB QD32 reads at 13 k IOPS
/// with 8 workers, 21 k with 16 and 25–29 k with 32 (2026-12-02).
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Threads reading requests from the kernel.
    pub workers: usize,
    /// Give each worker its own cloned /dev/fuse descriptor
    /// (FUSE_DEV_IOC_CLONE) instead of sharing one.
    pub clone_fd: bool,
    /// Largest write request, in bytes (the kernel splits larger I/O).
    pub max_write: u32,
    /// Requests the kernel keeps in flight in the background (asynchronous
    /// direct I/O from a loop device is background work): the queue depth
    /// the handler can see.
    pub max_background: u16,
    /// Open the file with FOPEN_DIRECT_IO and FOPEN_PARALLEL_DIRECT_WRITES:
    /// the kernel then skips its page-cache write path and lets writes to
    /// the file run in parallel.
    pub parallel_direct_writes: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            workers: 16,
            clone_fd: true,
            max_write: 1 << 20,
            max_background: 64,
            parallel_direct_writes: false,
        }
    }
}

/// A step of serving or tearing down a FUSE file that failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseFileError {
    #[error("create mount point {path}: {err}")]
    MountPoint {
        path: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error("mount the FUSE file system on {path}: {err}")]
    Mount {
        path: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error("the FUSE mount on {path} is not in the mount table")]
    NotMounted { path: PathBuf },
    #[error("start the FUSE workers for {path}: {err}")]
    Workers {
        path: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error("the FUSE workers of {path} did not stop within {waited:?}")]
    WorkersStuck { path: PathBuf, waited: Duration },
    #[error("shrink {path} from {from} to {to} bytes: volumes only grow")]
    Shrink { path: PathBuf, from: u64, to: u64 },
    #[error("grow the volume behind {path} to {to} bytes: {err}")]
    Resize {
        path: PathBuf,
        to: u64,
        #[source]
        err: io::Error,
    },
    #[error("make the kernel see the new size of {path}: {err}")]
    RefreshSize {
        path: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error("unmount {path}: {errno}")]
    Unmount { path: PathBuf, errno: Errno },
    #[error("loop device on {path}: {err}")]
    Loop {
        path: PathBuf,
        #[source]
        err: LoopError,
    },
}

/// A heap buffer aligned to [`BUFFER_ALIGN`], for O_DIRECT.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one byte is allocated).
    pub fn zeroed(len: usize) -> Self {
        // SAFETY: the layout has a non-zero size (at least BUFFER_ALIGN).
        Self::allocate(len, |layout| unsafe { std::alloc::alloc_zeroed(layout) })
    }

    /// `len` bytes from `alloc` with this buffer's layout.
    fn allocate(len: usize, alloc: impl FnOnce(Layout) -> *mut u8) -> Self {
        let layout = Self::layout(len);
        let Some(ptr) = NonNull::new(alloc(layout)) else {
            std::alloc::handle_alloc_error(layout);
        };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1).next_multiple_of(BUFFER_ALIGN), BUFFER_ALIGN)
            .expect("buffer size fits a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed or copied)
        // owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc or alloc_zeroed with this same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// Runs `f` on a thread-local aligned buffer of exactly `len` bytes (its
/// content is whatever the last user left). `slot` keeps one buffer per
/// thread, grown on demand, so the hot path does not allocate.
fn with_buffer<R>(
    slot: &'static std::thread::LocalKey<RefCell<AlignedBuf>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    slot.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            *buf = AlignedBuf::zeroed(len);
        }
        f(&mut buf.as_mut_slice()[..len])
    })
}

thread_local! {
    /// Where the FUSE layer reads into before replying.
    static READ_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeroed(0));
    /// [`LocalFile`]'s bounce buffer for unaligned O_DIRECT I/O.
    static BOUNCE_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::zeroed(0));
}

/// The filesystem fuser serves: a root directory holding [`VOLUME_FILE`].
struct VolumeFs {
    handler: Arc<dyn BlockHandler>,
    size: Arc<AtomicU64>,
    options: FuseOptions,
    uid: u32,
    gid: u32,
    born: SystemTime,
}

impl VolumeFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0, 0o700, 2),
            FILE_INO => (
                FileType::RegularFile,
                self.size.load(Ordering::Acquire),
                0o600,
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Asynchronous direct I/O lets one loop request become several FUSE
        // requests in flight; without it the kernel waits for each.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(
                ?missing,
                "the kernel lacks FUSE_ASYNC_DIO; volume I/O will be serialised"
            );
        }
        if let Err(nearest) = config.set_max_write(self.options.max_write) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_background(self.options.max_background) {
            let _ = config.set_max_background(nearest);
        }
        // Deliberately not requested: FUSE_WRITEBACK_CACHE (the kernel would
        // acknowledge writes the handler has not seen) and passthrough
        // (max_stack_depth stays 0; reads and writes would bypass the
        // handler).
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == VOLUME_FILE => {
                reply.entry(&ATTR_TTL, &attr, Generation(0))
            }
            _ => reply.error(FuseErrno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(FuseErrno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(FuseErrno::ENOENT);
        };
        // The size belongs to the engine ([`FuseFile::resize`]), not to
        // truncate(2) on the mount; modes and times are not kept.
        if size.is_some_and(|s| s != attr.size) {
            return reply.error(FuseErrno::EPERM);
        }
        reply.attr(&ATTR_TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(FuseErrno::EISDIR);
        }
        let flags = if self.options.parallel_direct_writes {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), flags)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(FuseErrno::EISDIR);
        }
        let end = self.size.load(Ordering::Acquire);
        let len = end.saturating_sub(offset).min(u64::from(size)) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        with_buffer(&READ_BUF, len, |buf| {
            match self.handler.read_at(offset, buf) {
                Ok(()) => reply.data(buf),
                Err(err) => {
                    tracing::warn!(offset, len, %err, "volume read failed; EIO to the kernel");
                    reply.error(FuseErrno::EIO)
                }
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(FuseErrno::EISDIR);
        }
        let len = data.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.size.load(Ordering::Acquire))
        {
            return reply.error(FuseErrno::ENOSPC);
        }
        let n = data.len() as u32;
        self.handler.write_then(
            offset,
            data,
            Box::new(move |r| match r {
                Ok(()) => reply.written(n),
                Err(err) => {
                    tracing::warn!(offset, len, %err, "volume write failed; EIO to the kernel");
                    reply.error(FuseErrno::EIO)
                }
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): every write already reached the handler.
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.handler.flush() {
            Ok(()) => reply.ok(),
            Err(err) => {
                tracing::warn!(%err, "volume flush failed; EIO to the kernel");
                reply.error(FuseErrno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(FuseErrno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, VOLUME_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size.load(Ordering::Acquire) / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the modes itself.
        reply.ok()
    }
}

/// The file a [`BlockHandler`] serves, mounted at a private directory
/// until dropped. Dropping aborts the connection (anything still using the
/// file gets ENOTCONN, never a hang), detaches the mount and stops the
/// workers; [`FuseFile::unmount`] does the same and reports errors.
pub struct FuseFile {
    mountpoint: PathBuf,
    /// major:minor of the mount, to recognise it in the mount table.
    dev: (u32, u32),
    size: Arc<AtomicU64>,
    handler: Arc<dyn BlockHandler>,
    notifier: fuser::Notifier,
    session: Option<JoinHandle<io::Result<()>>>,
    resizing: Mutex<()>,
}

impl std::fmt::Debug for FuseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseFile")
            .field("mountpoint", &self.mountpoint)
            .field("dev", &self.dev)
            .field("size", &self.size.load(Ordering::Relaxed))
            .field("running", &self.session.is_some())
            .finish()
    }
}

impl FuseFile {
    /// Mounts a FUSE file system at `mountpoint` (created if missing; it
    /// should be an empty directory of the caller's own) whose only file,
    /// [`VOLUME_FILE`], is `size` bytes served by `handler`, and starts the
    /// workers. Only root (the mounting user) can open the file.
    pub fn mount(
        mountpoint: &Path,
        size: u64,
        handler: Arc<dyn BlockHandler>,
        options: &FuseOptions,
    ) -> Result<Self, FuseFileError> {
        std::fs::create_dir_all(mountpoint).map_err(|err| FuseFileError::MountPoint {
            path: mountpoint.to_owned(),
            err,
        })?;
        let mountpoint = mountpoint
            .canonicalize()
            .map_err(|err| FuseFileError::MountPoint {
                path: mountpoint.to_owned(),
                err,
            })?;
        let size_cell = Arc::new(AtomicU64::new(size));
        let fs = VolumeFs {
            handler: handler.clone(),
            size: size_cell.clone(),
            options: options.clone(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            born: SystemTime::now(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(SOURCE.into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(options.workers.max(1));
        config.clone_fd = options.clone_fd;
        // Mounts and answers the kernel's INIT before returning. Dropping
        // the session before it runs unmounts again.
        let session =
            fuser::Session::new(fs, &mountpoint, &config).map_err(|err| FuseFileError::Mount {
                path: mountpoint.clone(),
                err,
            })?;
        let dev = MountTable::read()
            .ok()
            .and_then(|t| {
                t.mounted_at(&mountpoint)
                    .filter(|e| e.fs_type == "fuse" && e.source == SOURCE)
                    .map(|e| (e.major, e.minor))
            })
            .ok_or_else(|| FuseFileError::NotMounted {
                path: mountpoint.clone(),
            })?;
        let notifier = session.notifier();
        let session = std::thread::Builder::new()
            .name("fuse-volume".into())
            .spawn(move || session.run())
            .map_err(|err| FuseFileError::Workers {
                path: mountpoint.clone(),
                err,
            })?;
        Ok(Self {
            mountpoint,
            dev,
            size: size_cell,
            handler,
            notifier,
            session: Some(session),
            resizing: Mutex::new(()),
        })
    }

    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The served file: `<mountpoint>/volume`.
    pub fn path(&self) -> PathBuf {
        self.mountpoint.join(VOLUME_FILE)
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the volume to `new_size` bytes: the handler first, then the
    /// file as the kernel sees it. The same size again is a no-op; a
    /// smaller one is refused. Call it from outside the handler (the kernel
    /// is asked to drop its cached size, which a worker must answer).
    pub fn resize(&self, new_size: u64) -> Result<(), FuseFileError> {
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.size();
        if new_size < current {
            return Err(FuseFileError::Shrink {
                path: self.path(),
                from: current,
                to: new_size,
            });
        }
        if new_size == current {
            return Ok(());
        }
        self.handler
            .resize(new_size)
            .map_err(|err| FuseFileError::Resize {
                path: self.path(),
                to: new_size,
                err,
            })?;
        self.size.store(new_size, Ordering::Release);
        // Offset -1: drop the cached attributes only, no page cache. ENOENT:
        // the kernel has not looked the file up yet, nothing is cached.
        match self.notifier.inval_inode(FILE_INO, -1, 0) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => {
                return Err(FuseFileError::RefreshSize {
                    path: self.path(),
                    err,
                });
            }
        }
        // A loop device reads the inode's size, not a fresh getattr: a
        // stat makes the kernel fetch and store the new one.
        let seen = std::fs::metadata(self.path())
            .map_err(|err| FuseFileError::RefreshSize {
                path: self.path(),
                err,
            })?
            .len();
        if seen != new_size {
            return Err(FuseFileError::RefreshSize {
                path: self.path(),
                err: io::Error::other(format!("the kernel still reports {seen} bytes")),
            });
        }
        Ok(())
    }

    /// Cuts the FUSE connection as the kernel does when the serving process
    /// dies: every pending and later request on the file fails at once
    /// (ENOTCONN; EIO through a loop device). The mount stays in the table
    /// while something holds the file, until this guard is dropped.
    pub fn abort(&self) -> Result<(), FuseFileError> {
        if !self.still_mounted() {
            return Ok(());
        }
        // MNT_FORCE calls FUSE's umount_begin, which aborts the connection
        // before the kernel checks whether the mount is busy: EBUSY still
        // means aborted.
        match nix::mount::umount2(
            &self.mountpoint,
            MntFlags::MNT_FORCE | MntFlags::UMOUNT_NOFOLLOW,
        ) {
            Ok(()) | Err(Errno::EBUSY) => Ok(()),
            Err(errno) => Err(FuseFileError::Unmount {
                path: self.mountpoint.clone(),
                errno,
            }),
        }
    }

    /// Unmounts and stops the workers, reporting what failed (dropping does
    /// the same and logs). Detach any loop device on the file first: one
    /// still attached gets I/O errors from here on.
    pub fn unmount(mut self) -> Result<(), FuseFileError> {
        self.stop()
    }

    /// Whether our mount is still at the mount point (not unmounted by
    /// someone else, nothing else mounted over it).
    fn still_mounted(&self) -> bool {
        match MountTable::read() {
            Ok(t) => t
                .mounted_at(&self.mountpoint)
                .is_some_and(|e| (e.major, e.minor) == self.dev),
            // Unknown: try, umount2 says EINVAL if it is not a mount.
            Err(_) => true,
        }
    }

    fn stop(&mut self) -> Result<(), FuseFileError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        if self.still_mounted() {
            // Forced and lazy: the abort wakes every worker (they leave on
            // ENODEV) even when a loop device or an open descriptor still
            // holds the file, and whoever holds it gets errors instead of
            // waiting for a handler that is going away. With no writeback
            // cache the kernel holds no data the handler lacks.
            match nix::mount::umount2(
                &self.mountpoint,
                MntFlags::MNT_FORCE | MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
            ) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(errno) => {
                    result = Err(FuseFileError::Unmount {
                        path: self.mountpoint.clone(),
                        errno,
                    })
                }
            }
        }
        let start = Instant::now();
        while !session.is_finished() && start.elapsed() < STOP_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        if session.is_finished() {
            match session.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), %err, "FUSE workers ended with an error")
                }
                Err(_) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), "a FUSE worker panicked")
                }
            }
        } else {
            // Someone unmounted it before us while the file was still held:
            // the workers leave when the last holder lets go.
            result = result.and(Err(FuseFileError::WorkersStuck {
                path: self.mountpoint.clone(),
                waited: STOP_WAIT,
            }));
        }
        if let Err(err) = self.handler.flush() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), %err, "final flush of the volume failed");
        }
        result
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!(%err, "stopping a FUSE file");
        }
    }
}

/// A loop device on a [`FuseFile`]: the block device of a FUSE-served
/// volume. Dropping detaches the loop device, then unmounts the FUSE file;
/// [`FuseLoopDevice::close`] does the same and reports errors.
#[derive(Debug)]
pub struct FuseLoopDevice {
    device: Option<LoopDevice>,
    /// Some until closed; dropped after the device is detached.
    fuse: Option<FuseFile>,
}

impl FuseLoopDevice {
    /// Mounts the FUSE file ([`FuseFile::mount`]) and attaches a loop
    /// device to it with direct I/O (without it every request goes through
    /// the page cache twice; measured 5–10× slower). If the kernel refuses
    /// direct I/O the device still works, buffered, with a warning: check
    /// [`LoopDevice::direct_io`].
    pub fn attach(
        mountpoint: &Path,
        size: u64,
        handler: Arc<dyn BlockHandler>,
        options: &FuseOptions,
    ) -> Result<Self, FuseFileError> {
        let fuse = FuseFile::mount(mountpoint, size, handler, options)?;
        let device =
            LoopDevice::attach(&fuse.path(), false).map_err(|err| FuseFileError::Loop {
                path: fuse.path(),
                err,
            })?;
        if !device.direct_io() {
            tracing::warn!(
                device = %device.path().display(),
                "the loop device on the FUSE file runs without direct I/O (much slower)"
            );
        }
        Ok(Self {
            device: Some(device),
            fuse: Some(fuse),
        })
    }

    pub fn device(&self) -> &LoopDevice {
        self.device.as_ref().expect("attached until closed")
    }

    pub fn fuse(&self) -> &FuseFile {
        self.fuse.as_ref().expect("mounted until closed")
    }

    /// Grows the volume ([`FuseFile::resize`]) and the loop device with it
    /// (LOOP_SET_CAPACITY). Idempotent.
    pub fn resize(&self, new_size: u64) -> Result<(), FuseFileError> {
        self.fuse().resize(new_size)?;
        self.device()
            .refresh_capacity()
            .map_err(|err| FuseFileError::Loop {
                path: self.fuse().path(),
                err,
            })
    }

    /// Detaches the loop device (unmount any filesystem on it first: the
    /// kernel defers the detach of a device in use), then unmounts the FUSE
    /// file and stops its workers.
    pub fn close(mut self) -> Result<(), FuseFileError> {
        let detached = self.detach();
        let unmounted = match self.fuse.take() {
            Some(f) => f.unmount(),
            None => Ok(()),
        };
        detached.and(unmounted)
    }

    fn detach(&mut self) -> Result<(), FuseFileError> {
        let Some(d) = self.device.take() else {
            return Ok(());
        };
        d.detach_settled().map_err(|err| FuseFileError::Loop {
            path: d.path(),
            err,
        })
    }
}

impl Drop for FuseLoopDevice {
    fn drop(&mut self) {
        if let Err(err) = self.detach() {
            tracing::warn!(%err, "detaching the loop device of a FUSE file");
        }
        // Then unmount and stop the workers.
        drop(self.fuse.take());
    }
}

/// A volume's data in one file of the pool, the single-copy
/// [`BlockHandler`]: opened with O_DIRECT where the filesystem allows it
/// (buffered, with a warning, where it does not), unaligned requests
/// bounced through aligned buffers, `flush` an fdatasync.
#[derive(Debug)]
pub struct LocalFile {
    file: File,
    path: PathBuf,
    direct: bool,
    /// O_DIRECT offset and length granularity (1 when buffered).
    align: u64,
    /// O_DIRECT memory alignment (1 when buffered).
    mem_align: usize,
    /// Writes hold it shared; a read-modify-write of a partly written
    /// block holds it alone, so no write into that block (a whole-block
    /// write included) can land between its read and its write-back and be
    /// undone by it. Partial blocks are rare (a loop device of 512-byte
    /// sectors on a pool that needs 4 KiB), so their serialising costs
    /// little.
    rmw: RwLock<()>,
}

/// The sizes a [`LocalFile`] accepts: whole pages.
pub const LOCAL_FILE_GRANULE: u64 = 4096;

impl LocalFile {
    /// Creates `path` (it must not exist) sparse, `len` bytes, and opens it.
    pub fn create(path: &Path, len: u64) -> io::Result<Self> {
        check_granule(len)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.set_len(len)?;
        f.sync_all()?;
        drop(f);
        Self::open(path)
    }

    /// Opens an existing volume file for reading and writing, with O_DIRECT
    /// where the filesystem allows it.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, true)
    }

    /// [`LocalFile::open`], or buffered I/O when `direct` is false (for
    /// measuring what O_DIRECT is worth).
    pub fn open_with(path: &Path, direct: bool) -> io::Result<Self> {
        let opened = if direct {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        };
        let (file, direct) = match opened {
            Ok(f) => (f, true),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                if direct {
                    tracing::warn!(
                        path = %path.display(),
                        "the pool cannot do direct I/O for this volume; using buffered I/O (double caching)"
                    );
                }
                let f = OpenOptions::new().read(true).write(true).open(path)?;
                (f, false)
            }
            Err(err) => return Err(err),
        };
        let (align, mem_align) = if direct { dio_alignment(&file) } else { (1, 1) };
        Ok(Self {
            file,
            path: path.to_owned(),
            direct,
            align,
            mem_align,
            rmw: RwLock::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file is opened with O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    fn aligned(&self, offset: u64, len: usize, ptr: *const u8) -> bool {
        offset.is_multiple_of(self.align)
            && (len as u64).is_multiple_of(self.align)
            && (ptr as usize).is_multiple_of(self.mem_align)
    }
}

fn check_granule(len: u64) -> io::Result<()> {
    if !len.is_multiple_of(LOCAL_FILE_GRANULE) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("volume size {len} is not a multiple of {LOCAL_FILE_GRANULE}"),
        ));
    }
    Ok(())
}

/// O_DIRECT offset and memory alignment of `file` (statx STATX_DIOALIGN,
/// Linux 6.1+), or a page for both when the kernel does not say.
fn dio_alignment(file: &File) -> (u64, usize) {
    let page = (BUFFER_ALIGN as u64, BUFFER_ALIGN);
    // SAFETY: statx is plain integers, for which all-zero is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the path is an empty C string (with
    // AT_EMPTY_PATH the call is about the fd) and `stx` is writable.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return page;
    }
    (
        u64::from(stx.stx_dio_offset_align),
        (stx.stx_dio_mem_align as usize).max(1),
    )
}

/// Reads at `offset` until `buf` is full or the file ends; the rest is
/// zeroed.
fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl BlockHandler for LocalFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.direct || self.aligned(offset, buf.len(), buf.as_ptr()) {
            return read_full(&self.file, offset, buf);
        }
        let start = offset - offset % self.align;
        let end = (offset + buf.len() as u64).next_multiple_of(self.align);
        with_buffer(&BOUNCE_BUF, (end - start) as usize, |bounce| {
            read_full(&self.file, start, bounce)?;
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
            Ok(())
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.direct || self.aligned(offset, data.len(), data.as_ptr()) {
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            return self.file.write_all_at(data, offset);
        }
        let end = offset + data.len() as u64;
        let start = offset - offset % self.align;
        let aligned_end = end.next_multiple_of(self.align);
        // Blocks only partly covered by `data` are read, patched and
        // written back with every other write held off.
        let head = (start != offset).then_some(start / self.align);
        let tail = (aligned_end != end).then_some((aligned_end - 1) / self.align);
        let partial = head.is_some() || tail.is_some();
        let _exclusive = partial.then(|| self.rmw.write().unwrap_or_else(|e| e.into_inner()));
        let _shared = (!partial).then(|| self.rmw.read().unwrap_or_else(|e| e.into_inner()));
        with_buffer(&BOUNCE_BUF, (aligned_end - start) as usize, |bounce| {
            let block = self.align as usize;
            if head.is_some() {
                read_full(&self.file, start, &mut bounce[..block])?;
            }
            if tail.is_some() {
                let at = bounce.len() - block;
                read_full(&self.file, aligned_end - self.align, &mut bounce[at..])?;
            }
            let skip = (offset - start) as usize;
            bounce[skip..skip + data.len()].copy_from_slice(data);
            self.file.write_all_at(bounce, start)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn resize(&self, len: u64) -> io::Result<()> {
        check_granule(len)?;
        if len < self.file.metadata()?.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a volume file never shrinks",
            ));
        }
        self.file.set_len(len)?;
        self.file.sync_all()
    }
}
