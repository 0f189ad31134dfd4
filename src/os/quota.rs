//! Directory capacity limits: btrfs qgroups on per-volume subvolumes, set
//! through the btrfs tool via the command runner. (Project quotas on xfs
//! and ext4 are the next step; this project's kernel is built without
//! CONFIG_XFS_QUOTA and CONFIG_QFMT_V2, so neither can be tested here.)

use std::path::Path;

use super::command::{self, CommandError};

/// A quota step that failed.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// How a pool can enforce directory capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// btrfs qgroup limits on per-volume subvolumes.
    BtrfsQgroups,
    /// Nothing: capacity is recorded but not enforced.
    None,
}

/// Turns on btrfs quota accounting for the filesystem holding `path`.
/// Idempotent.
pub fn btrfs_enable_quota(path: &Path) -> Result<(), QuotaError> {
    command::run(
        "btrfs",
        ["quota".as_ref(), "enable".as_ref(), path.as_os_str()],
    )?;
    Ok(())
}

/// Limits the btrfs subvolume at `path` to `bytes` of referenced data.
pub fn btrfs_limit(path: &Path, bytes: u64) -> Result<(), QuotaError> {
    command::run(
        "btrfs",
        [
            "qgroup".as_ref(),
            "limit".as_ref(),
            bytes.to_string().as_ref(),
            path.as_os_str(),
        ],
    )?;
    Ok(())
}
