//! Volume capabilities as domain types (access mode, mount or raw block,
//! filesystem) and which backend supports which.

use serde::{Deserialize, Serialize};

use super::BackendKind;

/// CSI access modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Whether the mode lets more than one node use the volume.
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    /// Whether the mode only allows reading.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Whether the mode allows a single publication (target path) only.
    pub fn is_single_publication(self) -> bool {
        matches!(self, AccessMode::SingleNodeSingleWriter)
    }
}

/// Filesystems the block backend can make and mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub const DEFAULT: FsType = FsType::Ext4;

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            "btrfs" => Some(FsType::Btrfs),
            _ => None,
        }
    }

    /// The smallest filesystem mkfs accepts (rounded up generously).
    pub fn min_size(self) -> u64 {
        match self {
            FsType::Ext4 => 16 << 20,
            FsType::Xfs => 300 << 20,
            FsType::Btrfs => 128 << 20,
        }
    }
}

/// How a volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessType {
    /// A mounted filesystem. `fs_type` is None when the CO left it to us.
    Mount {
        fs_type: Option<String>,
        mount_flags: Vec<String>,
    },
    /// A raw block device.
    Block,
}

/// One volume capability.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

impl Capability {
    /// Checks the capability against what `backend` can do, returning a
    /// reason when it cannot.
    pub fn supported_by(&self, backend: BackendKind) -> Result<(), String> {
        backend.profile().check_capability(self)
    }

    /// The filesystem a mount capability asks for (default when unset);
    /// None for raw block.
    pub fn fs_type(&self) -> Option<FsType> {
        match &self.access_type {
            AccessType::Mount { fs_type, .. } => Some(
                fs_type
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .and_then(FsType::parse)
                    .unwrap_or(FsType::DEFAULT),
            ),
            AccessType::Block => None,
        }
    }

    pub fn mount_flags(&self) -> &[String] {
        match &self.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags,
            AccessType::Block => &[],
        }
    }

    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }
}

/// The single filesystem a set of capabilities implies for a block volume:
/// all mount capabilities must agree. Ok(None) when only raw block is asked.
pub fn filesystem_of(caps: &[Capability]) -> Result<Option<FsType>, String> {
    let mut fs = None;
    for c in caps {
        if let Some(f) = c.fs_type() {
            if fs.is_some_and(|prev| prev != f) {
                return Err("volume capabilities ask for different filesystems".into());
            }
            fs = Some(f);
        }
    }
    Ok(fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(fs: Option<&str>, mode: AccessMode) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: fs.map(Into::into),
                mount_flags: vec![],
            },
            access_mode: mode,
        }
    }

    #[test]
    fn backends_support_what_the_design_says() {
        use AccessMode::*;
        let blk = Capability {
            access_type: AccessType::Block,
            access_mode: SingleNodeWriter,
        };
        assert!(blk.supported_by(BackendKind::Block).is_ok());
        assert!(blk.supported_by(BackendKind::Dir).is_err());
        assert!(
            mount(None, SingleNodeWriter)
                .supported_by(BackendKind::Dir)
                .is_ok()
        );
        assert!(
            mount(Some("ext4"), SingleNodeWriter)
                .supported_by(BackendKind::Dir)
                .is_err()
        );
        for fs in ["ext4", "xfs", "btrfs"] {
            assert!(
                mount(Some(fs), SingleNodeMultiWriter)
                    .supported_by(BackendKind::Block)
                    .is_ok()
            );
        }
        assert!(
            mount(Some("vfat"), SingleNodeWriter)
                .supported_by(BackendKind::Block)
                .is_err()
        );
        for m in [
            MultiNodeMultiWriter,
            MultiNodeReaderOnly,
            MultiNodeSingleWriter,
        ] {
            assert!(mount(None, m).supported_by(BackendKind::Dir).is_err());
            assert!(mount(None, m).supported_by(BackendKind::Block).is_err());
        }
    }

    #[test]
    fn filesystems_must_agree() {
        use AccessMode::SingleNodeWriter as W;
        assert_eq!(filesystem_of(&[mount(None, W)]), Ok(Some(FsType::Ext4)));
        assert!(filesystem_of(&[mount(Some("xfs"), W), mount(None, W)]).is_err());
        let blk = Capability {
            access_type: AccessType::Block,
            access_mode: W,
        };
        assert_eq!(filesystem_of(&[blk]), Ok(None));
    }
}
