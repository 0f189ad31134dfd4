//! Growing: image files (`set_len`) and mounted filesystems (resize2fs,
//! xfs_growfs, btrfs resize, through the one command runner). Nothing here
//! ever shrinks: shrinking loses data and no CSI call asks for it.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::command::{self, CommandError};

/// CAP_SYS_RESOURCE from <linux/capability.h>: ext4's online resize
/// ioctl (EXT4_IOC_RESIZE_FS, which resize2fs uses) requires it.
const CAP_SYS_RESOURCE: u32 = 24;

/// CAP_SYS_ADMIN from <linux/capability.h>: mount(2) and the loop device
/// ioctls require it, so `stowage serve` cannot work without it.
pub const CAP_SYS_ADMIN: u32 = 21;

/// A grow step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("growing a mounted {fs_type} filesystem is not supported")]
    Unsupported { fs_type: String },
    #[error("growing a mounted {fs_type} filesystem needs {capability}, which this process lacks")]
    MissingCapability {
        fs_type: String,
        capability: &'static str,
    },
    /// The grow failed and the pool behind the device is full (see
    /// [`super::filesystem::full_pool_behind`]).
    #[error(
        "grow {fs_type} filesystem at {target}: the filesystem at {full} is out of space \
         (it cannot allocate {probe_bytes} more bytes): {source}"
    )]
    PoolFull {
        fs_type: String,
        target: PathBuf,
        full: PathBuf,
        probe_bytes: u64,
        #[source]
        source: Box<CommandError>,
    },
    #[error("grow {fs_type} filesystem at {target}: {source}")]
    Grow {
        fs_type: String,
        target: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("open {path}: {err}")]
    Open {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("{path} is {current} bytes; refusing to shrink it to {requested}")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("set length of {path} to {len}: {err}")]
    SetLength {
        path: PathBuf,
        len: u64,
        #[source]
        err: std::io::Error,
    },
    /// The filesystem refuses a file this long (EFBIG).
    #[error("{path} cannot be {requested} bytes long: {limit}")]
    TooLarge {
        path: PathBuf,
        requested: u64,
        limit: FileSizeLimit,
    },
}

/// The largest file a filesystem allows, as [`file_size_limit`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSizeLimit {
    /// The filesystem's name (`ext4`, `xfs`, ...).
    pub fs: String,
    /// Its largest file length in bytes; None when it could not be found.
    pub max_len: Option<u64>,
}

impl std::fmt::Display for FileSizeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.max_len {
            Some(max) => write!(
                f,
                "the pool's {} filesystem allows files of at most {max} bytes ({})",
                self.fs,
                binary_size(max)
            ),
            None => write!(
                f,
                "the pool's {} filesystem refuses files this large",
                self.fs
            ),
        }
    }
}

/// `bytes` in the largest binary unit that leaves a whole part, one
/// decimal (e.g. `16.0 TiB`).
fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    format!(
        "{:.1} {}",
        bytes as f64 / (1u64 << (10 * unit)) as f64,
        UNITS[unit]
    )
}

/// The largest file length the filesystem holding directory `dir` allows
/// (what it answers EFBIG beyond), with that filesystem's name. Found by
/// asking the filesystem rather than from a table (block size, bigalloc and
/// feature flags all change it): a binary search of ftruncate lengths on an
/// unnamed temporary file (O_TMPFILE) in `dir`, about 63 calls that only
/// change an inode's size (the file stays one hole) and leave nothing
/// behind, even after a crash. `max_len` is None when the filesystem cannot
/// be asked (no O_TMPFILE).
pub fn file_size_limit(dir: &Path) -> FileSizeLimit {
    let fs =
        super::pool::filesystem_of(dir).map_or_else(|_| "unknown".to_owned(), |fs| fs.to_string());
    FileSizeLimit {
        fs,
        max_len: max_file_len(dir).ok(),
    }
}

fn max_file_len(dir: &Path) -> std::io::Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)?;
    let fits = |len: u64| match file.set_len(len) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    };
    // Invariant: `lo` fits, `hi` does not (lengths past i64::MAX never do).
    let (mut lo, mut hi) = (0u64, i64::MAX as u64 + 1);
    if fits(hi - 1)? {
        return Ok(hi - 1);
    }
    hi -= 1;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Grows the filesystem of type `fs_type` (ext4/ext3, xfs, btrfs), mounted
/// at `mountpoint` from `device`, to fill the device, online. The device
/// must already be larger (for a loop device: grow the image, then
/// `LoopDevice::refresh_capacity`). Idempotent: a filesystem that already
/// fills its device is left as it is. ext4 is grown through its device
/// (`resize2fs`), xfs and btrfs through the mount point. ext4 needs
/// CAP_SYS_RESOURCE, which containers often drop: without it this fails
/// with [`ResizeError::MissingCapability`] before running anything.
pub fn grow_filesystem(fs_type: &str, device: &Path, mountpoint: &Path) -> Result<(), ResizeError> {
    if matches!(fs_type, "ext4" | "ext3")
        && !has_effective_capability(CAP_SYS_RESOURCE)
        && !ext4_fills_device(device)?
    {
        return Err(ResizeError::MissingCapability {
            fs_type: fs_type.to_owned(),
            capability: "CAP_SYS_RESOURCE",
        });
    }
    let (program, args, target): (&str, Vec<&std::ffi::OsStr>, &Path) = match fs_type {
        "ext4" | "ext3" => ("resize2fs", vec![device.as_os_str()], device),
        "xfs" => ("xfs_growfs", vec![mountpoint.as_os_str()], mountpoint),
        "btrfs" => (
            "btrfs",
            vec![
                "filesystem".as_ref(),
                "resize".as_ref(),
                "max".as_ref(),
                mountpoint.as_os_str(),
            ],
            mountpoint,
        ),
        other => {
            return Err(ResizeError::Unsupported {
                fs_type: other.to_owned(),
            });
        }
    };
    command::run(program, args).map_err(|e| grow_failed(fs_type, device, target, e))?;
    Ok(())
}

/// The error for a grow tool that failed writing through `device`:
/// [`ResizeError::PoolFull`] when the pool behind it is full, else
/// [`ResizeError::Grow`].
fn grow_failed(fs_type: &str, device: &Path, target: &Path, source: CommandError) -> ResizeError {
    match super::filesystem::full_pool_behind(device) {
        Some(out) => ResizeError::PoolFull {
            fs_type: fs_type.to_owned(),
            target: target.to_owned(),
            full: out.full,
            probe_bytes: out.probe_bytes,
            source: Box::new(source),
        },
        None => ResizeError::Grow {
            fs_type: fs_type.to_owned(),
            target: target.to_owned(),
            source,
        },
    }
}

/// Whether this process may grow a mounted ext4 filesystem (online
/// growth needs CAP_SYS_RESOURCE). Online growth is journaled by the
/// kernel, so a crash in the middle leaves a consistent filesystem;
/// offline `resize2fs` killed in the middle can leave one that needs a
/// manual fsck.
pub fn can_grow_ext4_online() -> bool {
    has_effective_capability(CAP_SYS_RESOURCE)
}

/// Whether the ext4 filesystem on `device` already spans the whole device
/// (within one block), read from its superblock with `dumpe2fs -h`.
pub fn ext4_fills_device(device: &Path) -> Result<bool, ResizeError> {
    let grow_err = |source| ResizeError::Grow {
        fs_type: "ext4".to_owned(),
        target: device.to_owned(),
        source,
    };
    let out = command::run("dumpe2fs", ["-h".as_ref(), device.as_os_str()]).map_err(grow_err)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(blocks), Some(block_size)) = (field("Block count:"), field("Block size:")) else {
        return Ok(false);
    };
    let device_bytes = device_size(device).map_err(|err| ResizeError::Open {
        path: device.to_owned(),
        err,
    })?;
    Ok(blocks * block_size + block_size > device_bytes)
}

/// Grows the unmounted ext4 filesystem on `device` to fill it: a forced
/// check (`e2fsck -f -p`, which offline resize2fs requires) then
/// `resize2fs`. Needs no capability beyond opening the device. e2fsck
/// exiting 1 or 2 corrected the filesystem (e.g. replayed the journal of a
/// crash-consistent snapshot): that is a check passed; 4 and above is not.
pub fn grow_ext4_offline(device: &Path) -> Result<(), ResizeError> {
    let grow_err = |source| grow_failed("ext4", device, device, source);
    match command::run("e2fsck", ["-f".as_ref(), "-p".as_ref(), device.as_os_str()]) {
        Ok(_) => {}
        Err(e) if matches!(e.exit_code(), Some(1 | 2)) => {
            tracing::info!(device = %device.display(), "e2fsck corrected the filesystem before growing it");
        }
        Err(e) => return Err(grow_err(e)),
    }
    command::run("resize2fs", [device.as_os_str()]).map_err(grow_err)?;
    Ok(())
}

/// The size of a block device (or file) in bytes.
fn device_size(device: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(device)?;
    f.seek(std::io::SeekFrom::End(0))
}

/// Whether this process holds capability number `cap` (unknown counts as
/// held: then the tool itself reports the refusal).
pub fn has_effective_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_capabilities(&status))
        .is_none_or(|set| set & (1 << cap) != 0)
}

/// The `CapEff` bit set from the text of `/proc/<pid>/status`.
fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Grows the regular file `path` to `new_len` bytes; the new tail is a
/// hole. Idempotent: a file already `new_len` long is left alone; a longer
/// one is an error ([`ResizeError::Shrink`]), never truncated. A final
/// symlink is not followed. Not synced. A length the filesystem refuses
/// (EFBIG) is [`ResizeError::TooLarge`], naming the filesystem's limit.
pub fn grow_file(path: &Path, new_len: u64) -> Result<(), ResizeError> {
    let file = OpenOptions::new()
        .write(true)
        // O_NONBLOCK: a FIFO in the file's place must not hang the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| ResizeError::Open {
            path: path.to_owned(),
            err,
        })?;
    let md = file.metadata().map_err(|err| ResizeError::Open {
        path: path.to_owned(),
        err,
    })?;
    if !md.is_file() {
        return Err(ResizeError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    let current = md.len();
    if new_len < current {
        return Err(ResizeError::Shrink {
            path: path.to_owned(),
            current,
            requested: new_len,
        });
    }
    if new_len == current {
        return Ok(());
    }
    file.set_len(new_len).map_err(|err| {
        if err.raw_os_error() == Some(libc::EFBIG) {
            ResizeError::TooLarge {
                path: path.to_owned(),
                requested: new_len,
                limit: file_size_limit(path.parent().unwrap_or(Path::new("/"))),
            }
        } else {
            ResizeError::SetLength {
                path: path.to_owned(),
                len: new_len,
                err,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities_from_proc_status() {
        let status = "Name:\tstowage\nCapInh:\t0000000000000000\n\
                      CapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n\
                      CapBnd:\t000001ffffffffff\n";
        let eff = effective_capabilities(status).unwrap();
        assert_eq!(eff & (1 << CAP_SYS_RESOURCE), 0, "bit 24 is cleared here");
        assert_ne!(eff & (1 << 21), 0, "CAP_SYS_ADMIN is held");
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
    }

    #[test]
    fn sizes_are_named_in_binary_units() {
        assert_eq!(binary_size(512), "512 B");
        assert_eq!(binary_size(1 << 20), "1.0 MiB");
        assert_eq!(binary_size((16 << 40) - 4096), "16.0 TiB");
        assert_eq!(binary_size(i64::MAX as u64), "8.0 EiB");
    }
}
