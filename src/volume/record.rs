//! The records the domain keeps durable: one per volume on the controller
//! side, one per volume with something staged or published on the node
//! side.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::capability::{Capability, FsType};
use super::id::{SnapshotId, VolumeId};

/// A ControllerPublish attachment of a volume to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub capability: Capability,
    pub read_only: bool,
}

/// A provisioned volume, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    /// Filesystem made on first stage (block volumes asked for as mounts).
    pub fs_type: Option<FsType>,
    pub capabilities: Vec<Capability>,
    /// The StorageClass parameters that define the volume.
    pub parameters: BTreeMap<String, String>,
    pub volume_context: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Node id → attachment.
    #[serde(default)]
    pub attachments: BTreeMap<String, Attachment>,
    /// The snapshot or volume this volume was made from.
    #[serde(default)]
    pub content_source: Option<ContentSource>,
    /// Thick volumes have all their space reserved in the pool.
    #[serde(default)]
    pub thick: bool,
}

/// Where a volume's content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// A snapshot of a volume, independent of its source once made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub name: String,
    pub source_volume_id: String,
    /// The source volume's capacity when the snapshot was taken (the
    /// smallest volume it can be restored into).
    pub size_bytes: u64,
    pub fs_type: Option<FsType>,
    /// Unix time, seconds and nanoseconds.
    pub created_at: (i64, i32),
    /// False while a background copy is still running.
    pub ready: bool,
    /// The group snapshot this snapshot belongs to, if any.
    #[serde(default)]
    pub group: Option<String>,
    /// Where an object volume's snapshot is kept (no credentials).
    #[serde(default)]
    pub location: Option<crate::backend::object::Location>,
    /// Why its background copy failed or stopped, on an unfinished record
    /// kept for its ID (the next CreateSnapshot of its name copies anew
    /// under it); none while a copy runs. `stowage status` tells the two
    /// apart by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Snapshots of several volumes taken at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshotRecord {
    /// `group:<node>:<uuid>`.
    pub id: String,
    pub name: String,
    /// Source volume IDs, sorted.
    pub sources: Vec<String>,
    /// Member snapshot IDs, in the order of `sources`.
    pub members: Vec<String>,
    pub created_at: (i64, i32),
}

/// What was done at the staging path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    pub path: PathBuf,
    pub capability: Capability,
    /// The loop device attached for a block volume.
    pub device: Option<PathBuf>,
    /// Whether a filesystem (or the dir bind) is mounted at `path`.
    pub mounted: bool,
    /// The id (as in mountinfo) of the mount made at `path`, so unstage
    /// unmounts exactly that one. None before the mount is made, and in
    /// records written before ids were kept.
    #[serde(default)]
    pub mount_id: Option<u32>,
    /// The FUSE daemon of an object volume (its mount, at a private
    /// mount point, is what the staging path binds).
    #[serde(default)]
    pub fuse: Option<FuseStaging>,
}

/// An object volume's FUSE mount: what was mounted (no secret) and the
/// daemon serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseStaging {
    pub spec: crate::backend::object::mounter::MountSpec,
    pub daemon: crate::backend::object::mounter::Daemon,
    /// Why the mount is not serving, while it is not (the daemon died
    /// and the plugin could not yet mount it again).
    #[serde(default)]
    pub lost: Option<String>,
}

/// What was done at one target path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub capability: Capability,
    pub read_only: bool,
    /// A read-only loop device made for this publication alone (raw block
    /// published read-only).
    pub own_device: Option<PathBuf>,
    /// Whether stowage created the target (and so removes it on unpublish).
    pub created_target: bool,
    /// The id (as in mountinfo) of the mount made at the target, so
    /// unpublish unmounts exactly that one, even after a rename moved it.
    /// None before the mount is made, and in records written before ids
    /// were kept.
    #[serde(default)]
    pub mount_id: Option<u32>,
    /// `(st_dev, st_ino)` of the file or directory stowage created at the
    /// target: unpublish removes the target only while it is still that.
    #[serde(default)]
    pub created_inode: Option<(u64, u64)>,
}

/// A volume's footprint on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeVolumeRecord {
    pub id: VolumeId,
    pub staging: Option<Staging>,
    #[serde(default)]
    pub publications: BTreeMap<PathBuf, Publication>,
}

impl NodeVolumeRecord {
    pub fn is_empty(&self) -> bool {
        self.staging.is_none() && self.publications.is_empty()
    }
}

/// A node known to the controller (written by the node service at start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub topology: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::volume::capability::{AccessMode, AccessType};

    /// Records written before mount ids and created inodes were kept still
    /// load, with those fields absent.
    #[test]
    fn node_records_without_mount_ids_load() {
        let rec = NodeVolumeRecord {
            id: VolumeId::parse("block:n1:0123456789abcdef0123456789abcdef").unwrap(),
            staging: Some(Staging {
                path: "/s".into(),
                capability: Capability {
                    access_type: AccessType::Block,
                    access_mode: AccessMode::SingleNodeWriter,
                },
                device: Some("/dev/loop3".into()),
                mounted: false,
                mount_id: Some(7),
                fuse: None,
            }),
            publications: BTreeMap::from([(
                PathBuf::from("/t"),
                Publication {
                    capability: Capability {
                        access_type: AccessType::Block,
                        access_mode: AccessMode::SingleNodeWriter,
                    },
                    read_only: false,
                    own_device: None,
                    created_target: true,
                    mount_id: Some(9),
                    created_inode: Some((1, 2)),
                },
            )]),
        };
        let mut v = serde_json::to_value(&rec).unwrap();
        v["staging"].as_object_mut().unwrap().remove("mount_id");
        let p = v["publications"]["/t"].as_object_mut().unwrap();
        p.remove("mount_id");
        p.remove("created_inode");
        let old: NodeVolumeRecord = serde_json::from_value(v).unwrap();
        assert_eq!(old.staging.unwrap().mount_id, None);
        let p = &old.publications[Path::new("/t")];
        assert_eq!((p.mount_id, p.created_inode), (None, None));
        assert!(p.created_target);
    }
}
