//! Filesystems on block devices: probing (blkid), making (mkfs.*), and
//! reading the kernel's error counters.

use std::path::Path;

use super::command::{self, CommandError};

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

/// Makes a filesystem of `fs_type` (ext4, xfs, btrfs) on `device`. The
/// caller must have checked with [`probe`] that the device is empty: this
/// forces, because loop devices look like whole disks to mkfs. Discard is
/// skipped because a fresh sparse image has nothing to discard. Block and
/// sector sizes are 4 KiB whatever the device says: a loop device over a
/// reflinked image on xfs gets 4 KiB logical blocks (its direct I/O
/// alignment), and the filesystem must mount there too.
pub fn make(device: &Path, fs_type: &str) -> Result<(), CommandError> {
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
