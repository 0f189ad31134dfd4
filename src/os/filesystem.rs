//! Filesystems on block devices: probing (blkid), making (mkfs.*), and
//! reading the kernel's error counters; and whether a directory's
//! filesystem can still allocate space (to tell a full pool from a broken
//! mkfs).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::command::{self, CommandError};
use super::loopdev::LoopDevice;

/// What [`make`] probes for when mkfs fails on a loop device and the
/// device's request size cannot be read: one MiB, at least a maximal
/// request on every kernel default.
const DEFAULT_PROBE_BYTES: u64 = 1 << 20;

/// A filesystem that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    /// mkfs failed and the filesystem holding the device's image (or the
    /// host of that filesystem's own image) cannot allocate even one more
    /// write of the device: the pool is full.
    #[error(
        "make {fs_type} filesystem on {device} (image {image}): the filesystem at {full} \
         is out of space (it cannot allocate {probe_bytes} more bytes): {source}"
    )]
    PoolFull {
        fs_type: String,
        device: PathBuf,
        image: PathBuf,
        /// A directory on the filesystem that is full.
        full: PathBuf,
        probe_bytes: u64,
        #[source]
        source: Box<CommandError>,
    },
    /// mkfs failed for another reason (or could not run).
    #[error("make {fs_type} filesystem on {device}: {source}")]
    Failed {
        fs_type: String,
        device: PathBuf,
        #[source]
        source: Box<CommandError>,
    },
}

/// Probes `device` for a filesystem signature with `blkid -p` (low-level,
/// bypassing the cache). Returns None when the device holds no known
/// filesystem.
pub fn probe(device: &Path) -> Result<Option<String>, CommandError> {
    match command::run(
        "blkid",
        [
            "-p".as_ref(),
            "-s".as_ref(),
            "TYPE".as_ref(),
            "-o".as_ref(),
            "value".as_ref(),
            device.as_os_str(),
        ],
    ) {
        Ok(out) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Ok((!t.is_empty()).then_some(t))
        }
        // blkid exits 2 when it finds nothing.
        Err(e) if e.exit_code() == Some(2) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Bytes read at each end of a device by [`check_readable`]: where
/// filesystem superblocks (the first 64 KiB and more) and RAID or LVM
/// labels (the last MiB) live, what `blkid -p` probes.
const READABLE_BYTES: u64 = 1 << 20;

/// Reads the first and the last MiB of `device` with `O_DIRECT` (from the
/// device, not the page cache). `blkid -p` reports a device it cannot read
/// as holding no filesystem, so before making one where [`probe`] found
/// none the caller checks here that the device answered: an I/O error
/// taken for an empty device would be formatted over.
pub fn check_readable(device: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    const ALIGN: usize = 4096;
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(device)
    };
    let (mut f, direct) = match open(libc::O_DIRECT) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
        Err(e) => return Err(e),
    };
    let size = f.seek(SeekFrom::End(0))?;
    let len = READABLE_BYTES.min(size - size % ALIGN as u64) as usize;
    if len == 0 {
        return Ok(());
    }
    let mut raw = vec![0u8; len + ALIGN];
    let skip = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skip..skip + len];
    let tail = (size - len as u64) / ALIGN as u64 * ALIGN as u64;
    for at in [0, tail] {
        let r = f.read_exact_at(buf, at);
        match r {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // A logical block larger than ALIGN: through the cache.
                open(0)?.read_exact_at(buf, at)?
            }
            r => r?,
        }
    }
    Ok(())
}

/// Makes a filesystem of `fs_type` (ext4, xfs, btrfs) on `device`. The
/// caller must have checked with [`probe`] that the device is empty (and
/// with [`check_readable`] that it could tell): this
/// forces, because loop devices look like whole disks to mkfs. Discard is
/// skipped because a fresh sparse image has nothing to discard. Block and
/// sector sizes are 4 KiB whatever the device says: a loop device over a
/// reflinked image on xfs gets 4 KiB logical blocks (its direct I/O
/// alignment), and the filesystem must mount there too.
///
/// When mkfs fails on a loop device whose image's filesystem has no room
/// left, the error is [`MkfsError::PoolFull`]. mkfs's own message cannot
/// tell: the loop device hands the pool's ENOSPC to mkfs as ENOSPC or as
/// EIO depending on the kernel path, mkfs.xfs prints the one and mkfs.ext4
/// says "Input/output error", and the text is localised anyway. So after a
/// failure the pool itself is asked: can it allocate one maximal request of
/// the device ([`can_allocate`])? A write through the device fails for
/// lack of space only when the pool cannot allocate that write, so "no"
/// means the pool is full (and explains mkfs's failure); "yes" means mkfs
/// failed for another reason (or space was freed meanwhile, when the CO's
/// retry will do). The probe runs only after a failure, so a successful
/// mkfs costs nothing.
pub fn make(device: &Path, fs_type: &str) -> Result<(), MkfsError> {
    run_mkfs(device, fs_type).map_err(|e| {
        let source = Box::new(e);
        match full_pool_behind(device) {
            Some(OutOfSpace {
                image,
                full,
                probe_bytes,
            }) => MkfsError::PoolFull {
                fs_type: fs_type.to_owned(),
                device: device.to_owned(),
                image,
                full,
                probe_bytes,
                source,
            },
            None => MkfsError::Failed {
                fs_type: fs_type.to_owned(),
                device: device.to_owned(),
                source,
            },
        }
    })
}

/// What [`full_pool_behind`] found full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfSpace {
    /// The loop device's backing file.
    pub image: PathBuf,
    /// A directory on the filesystem that cannot allocate.
    pub full: PathBuf,
    /// How much it was asked to allocate.
    pub probe_bytes: u64,
}

/// When `device` is a loop device whose backing file's filesystem cannot
/// allocate one maximal request of the device: what is full. A filesystem
/// kept in an image of its own (a pool image on ext4) is followed to its
/// host: the host can be full while the filesystem in the image, which
/// only counts its own blocks, still has room. None when every level has
/// room, or when that cannot be found out. For a tool writing through the
/// device that failed (mkfs, resize2fs, xfs_growfs), "full" explains the
/// failure; see [`make`] for why the tool's own message cannot.
pub fn full_pool_behind(device: &Path) -> Option<OutOfSpace> {
    let dev = LoopDevice::from_path(device)?;
    let image = dev.backing_file()?;
    let probe_bytes = std::fs::read_to_string(format!(
        "/sys/block/loop{}/queue/max_sectors_kb",
        dev.number()
    ))
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok())
    .map_or(DEFAULT_PROBE_BYTES, |kib| {
        (kib << 10).max(DEFAULT_PROBE_BYTES)
    });
    let mut dir = image.parent()?.to_owned();
    for _ in 0..MAX_IMAGE_DEPTH {
        match can_allocate(&dir, probe_bytes) {
            Ok(false) => {
                return Some(OutOfSpace {
                    image,
                    full: dir,
                    probe_bytes,
                });
            }
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot probe for free space");
                return None;
            }
        }
        dir = loop_backing_file_of(&dir)?.parent()?.to_owned();
    }
    None
}

/// How many filesystems-in-images [`full_pool_behind`] looks through.
const MAX_IMAGE_DEPTH: usize = 4;

/// The backing file of the loop device holding the filesystem of `path`,
/// when that filesystem is on a loop device (from its `st_dev`, through
/// `/sys/dev/block/MAJ:MIN/loop/backing_file`).
fn loop_backing_file_of(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let s = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/loop/backing_file"))
        .ok()?;
    let s = s.trim_end_matches('\n');
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Whether the filesystem holding directory `dir` can allocate `bytes`
/// more bytes right now, asked by allocating them (fallocate) in an
/// unnamed temporary file (O_TMPFILE) there, which is gone when closed and
/// leaves nothing behind even after a crash. This is the allocator's own
/// answer, with its reserves and quotas (ext4 refuses root its last
/// reserved clusters while statvfs still counts them free). Ok(false) on
/// ENOSPC or EDQUOT; an error when the filesystem cannot answer (no
/// O_TMPFILE or fallocate). The space is held only for the instant of the
/// call.
pub fn can_allocate(dir: &Path, bytes: u64) -> std::io::Result<bool> {
    let no_space = |e: &std::io::Error| {
        matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::ENOSPC | Errno::EDQUOT)
        )
    };
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => f,
        Err(e) if no_space(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = i64::try_from(bytes).map_err(|_| std::io::Error::from(Errno::EFBIG))?;
    match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(true),
        Err(Errno::ENOSPC | Errno::EDQUOT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Runs the mkfs program for `fs_type`.
fn run_mkfs(device: &Path, fs_type: &str) -> Result<(), CommandError> {
    let dev = device.as_os_str();
    match fs_type {
        "ext4" => command::run(
            "mkfs.ext4",
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-b".as_ref(),
                "4096".as_ref(),
                "-E".as_ref(),
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                dev,
            ],
        ),
        "xfs" => command::run(
            "mkfs.xfs",
            [
                "-q".as_ref(),
                "-f".as_ref(),
                "-K".as_ref(),
                "-s".as_ref(),
                "size=4096".as_ref(),
                dev,
            ],
        ),
        "btrfs" => command::run(
            "mkfs.btrfs",
            ["-q".as_ref(), "-f".as_ref(), "-K".as_ref(), dev],
        ),
        other => {
            return Err(CommandError::Spawn {
                program: format!("mkfs.{other}"),
                err: std::io::Error::new(std::io::ErrorKind::Unsupported, "unsupported fs type"),
            });
        }
    }
    .map(drop)
}

/// The number of errors the kernel recorded for a mounted filesystem on the
/// block device named `dev_name` (e.g. `loop3`), where it exposes one
/// (ext4's `errors_count`). None when the filesystem keeps no such count.
pub fn error_count(fs_type: &str, dev_name: &str) -> Option<u64> {
    let path = match fs_type {
        "ext4" => format!("/sys/fs/ext4/{dev_name}/errors_count"),
        _ => return None,
    };
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
