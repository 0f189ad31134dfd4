//! Loop devices through the kernel's ioctls (no `losetup`, no libclang).
//! Attaching races with other processes, so a device taken between
//! LOOP_CTL_GET_FREE and LOOP_CONFIGURE is retried; a detach while someone
//! still holds the device is deferred by the kernel until the last close.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from <linux/loop.h> (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);

/// A loop device step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("open {path}: {err}")]
    Open {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("LOOP_CTL_GET_FREE: {0}")]
    GetFree(Errno),
    #[error("attach {image} to {device}: {errno}")]
    Configure {
        image: PathBuf,
        device: PathBuf,
        errno: Errno,
    },
    #[error("no free loop device for {image} after {attempts} attempts")]
    Exhausted { image: PathBuf, attempts: u32 },
    #[error("detach {device}: {errno}")]
    Detach { device: PathBuf, errno: Errno },
    #[error("refresh capacity of {device}: {errno}")]
    SetCapacity { device: PathBuf, errno: Errno },
    #[error("read loop devices from sysfs: {0}")]
    Sysfs(#[source] std::io::Error),
}

/// An attached loop device `/dev/loopN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    number: u32,
}

impl LoopDevice {
    /// The device numbered `n` (whether or not it is attached).
    pub fn from_number(number: u32) -> Self {
        Self { number }
    }

    /// Parses `/dev/loopN`.
    pub fn from_path(path: &Path) -> Option<Self> {
        let n = path.to_str()?.strip_prefix("/dev/loop")?.parse().ok()?;
        Some(Self { number: n })
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    /// The device number (`st_rdev`) of the device node.
    pub fn rdev(&self) -> std::io::Result<u64> {
        let md = std::fs::metadata(self.path())?;
        if !md.file_type().is_block_device() {
            return Err(std::io::Error::other("not a block device"));
        }
        Ok(md.rdev())
    }

    /// The backing file the kernel reports, or None when detached.
    pub fn backing_file(&self) -> Option<PathBuf> {
        let p = format!("/sys/block/loop{}/loop/backing_file", self.number);
        let s = std::fs::read_to_string(p).ok()?;
        let s = s.trim_end_matches('\n');
        (!s.is_empty()).then(|| PathBuf::from(s))
    }

    /// Whether the kernel uses direct I/O against the backing file.
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/loop{}/loop/dio", self.number))
            .is_ok_and(|s| s.trim() == "1")
    }

    /// Whether the device was attached read-only.
    pub fn read_only(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/loop{}/ro", self.number))
            .is_ok_and(|s| s.trim() == "1")
    }

    /// The device's size in bytes as the kernel sees it.
    pub fn size_bytes(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/sys/block/loop{}/size", self.number)).ok()?;
        s.trim().parse::<u64>().ok().map(|sectors| sectors * 512)
    }

    fn open(&self) -> Result<File, LoopError> {
        let path = self.path();
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|err| LoopError::Open { path, err })
    }

    /// Attaches `image` to a free loop device, retrying when another
    /// process takes the device first. Direct I/O is turned on when the
    /// backing filesystem accepts it (see [`LoopDevice::direct_io`]).
    pub fn attach(image: &Path, read_only: bool) -> Result<Self, LoopError> {
        const ATTEMPTS: u32 = 16;
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image)
            .map_err(|err| LoopError::Open {
                path: image.to_owned(),
                err,
            })?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|err| LoopError::Open {
                path: "/dev/loop-control".into(),
                err,
            })?;
        let mut direct_io = true;
        for _ in 0..ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; the fd is a live
            // /dev/loop-control handle.
            let n =
                unsafe { loop_ctl_get_free(control.as_raw_fd()) }.map_err(LoopError::GetFree)?;
            let device = LoopDevice {
                number: u32::try_from(n).map_err(|_| LoopError::GetFree(Errno::EINVAL))?,
            };
            let dev_file = match device.open() {
                Ok(f) => f,
                // The node may not exist yet right after allocation.
                Err(LoopError::Open { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut config = LoopConfig {
                fd: u32::try_from(backing.as_raw_fd()).expect("fds are non-negative"),
                block_size: 0,
                // SAFETY: LoopInfo64 is plain integers and byte arrays, for
                // which all-zero is a valid value.
                info: unsafe { std::mem::zeroed() },
                reserved: [0; 8],
            };
            if read_only {
                config.info.lo_flags |= LO_FLAGS_READ_ONLY;
            }
            // Asking for direct I/O at configure time is cheap; switching it
            // on afterwards (LOOP_SET_DIRECT_IO) freezes the queue and costs
            // tens of milliseconds.
            if direct_io {
                config.info.lo_flags |= LO_FLAGS_DIRECT_IO;
            }
            let name = image.as_os_str().as_encoded_bytes();
            let take = name.len().min(LO_NAME_SIZE - 1);
            config.info.lo_file_name[..take].copy_from_slice(&name[name.len() - take..]);
            // SAFETY: `config` is a fully initialised loop_config that lives
            // across the call; the kernel only reads it.
            match unsafe { loop_configure(dev_file.as_raw_fd(), &config) } {
                Ok(_) => return Ok(device),
                Err(Errno::EBUSY) => continue,
                // The backing filesystem cannot do O_DIRECT (or not at this
                // block size): fall back to buffered I/O.
                Err(Errno::EINVAL) if direct_io => {
                    tracing::warn!(
                        image = %image.display(),
                        "the pool cannot do direct I/O for this image; using buffered I/O (slower, double caching)"
                    );
                    direct_io = false;
                    continue;
                }
                Err(errno) => {
                    return Err(LoopError::Configure {
                        image: image.to_owned(),
                        device: device.path(),
                        errno,
                    });
                }
            }
        }
        Err(LoopError::Exhausted {
            image: image.to_owned(),
            attempts: ATTEMPTS,
        })
    }

    /// Detaches the backing file. Already detached (ENXIO) is success; if
    /// the device is still open somewhere the kernel finishes the detach at
    /// the last close.
    pub fn detach(&self) -> Result<(), LoopError> {
        let f = match self.open() {
            Ok(f) => f,
            Err(LoopError::Open { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // SAFETY: LOOP_CLR_FD takes no argument; `f` is an open loop device.
        match unsafe { loop_clr_fd(f.as_raw_fd()) } {
            Ok(_) | Err(Errno::ENXIO) => {}
            Err(errno) => {
                return Err(LoopError::Detach {
                    device: self.path(),
                    errno,
                });
            }
        }
        Ok(())
    }

    /// [`LoopDevice::detach`], then waits briefly (up to half a second) for
    /// a deferred detach to finish: a child forked elsewhere in this
    /// process holds inherited fds until it execs, which defers the detach
    /// by a moment. Used where the caller promises the device is gone.
    pub fn detach_settled(&self) -> Result<(), LoopError> {
        self.detach()?;
        for _ in 0..100 {
            if self.backing_file().is_none() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Makes the kernel re-read the backing file's size (after it grew).
    pub fn refresh_capacity(&self) -> Result<(), LoopError> {
        let f = self.open()?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument; `f` is a loop device.
        unsafe { loop_set_capacity(f.as_raw_fd()) }.map_err(|errno| LoopError::SetCapacity {
            device: self.path(),
            errno,
        })?;
        Ok(())
    }

    /// Every attached loop device with its backing file, from sysfs.
    pub fn list_attached() -> Result<Vec<(LoopDevice, PathBuf)>, LoopError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/sys/block").map_err(LoopError::Sysfs)? {
            let entry = entry.map_err(LoopError::Sysfs)?;
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("loop"))
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            let dev = LoopDevice { number: n };
            if let Some(backing) = dev.backing_file() {
                out.push((dev, backing));
            }
        }
        out.sort_by_key(|(d, _)| d.number);
        Ok(out)
    }

    /// The attached devices backed by `image` (normally zero or one).
    pub fn find_by_backing(image: &Path) -> Result<Vec<LoopDevice>, LoopError> {
        Ok(Self::list_attached()?
            .into_iter()
            .filter(|(_, b)| b == image)
            .map(|(d, _)| d)
            .collect())
    }
}
