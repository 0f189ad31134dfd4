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
    command::run(program, args).map_err(|source| ResizeError::Grow {
        fs_type: fs_type.to_owned(),
        target: target.to_owned(),
        source,
    })?;
    Ok(())
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
/// `resize2fs`. Needs no capability beyond opening the device.
pub fn grow_ext4_offline(device: &Path) -> Result<(), ResizeError> {
    let grow_err = |source| ResizeError::Grow {
        fs_type: "ext4".to_owned(),
        target: device.to_owned(),
        source,
    };
    command::run("e2fsck", ["-f".as_ref(), "-p".as_ref(), device.as_os_str()]).map_err(grow_err)?;
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
fn has_effective_capability(cap: u32) -> bool {
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
/// symlink is not followed. Not synced.
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
    file.set_len(new_len).map_err(|err| ResizeError::SetLength {
        path: path.to_owned(),
        len: new_len,
        err,
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
}
