//! The port to a CSI plugin: the few calls the reconciler makes, shaped
//! like CSI and nothing more (capability discovery decides which RPCs an
//! implementation uses; nothing driver-specific). Every mutating call is
//! idempotent, so the reconciler can repeat any of them after a crash.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{AccessMode, VolumeMode};

/// The volume capability a volume is created, staged and published with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    pub mode: VolumeMode,
    /// Empty: the plugin's default (always empty for block).
    pub fs: String,
    pub access_mode: AccessMode,
}

/// CreateVolume's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub name: String,
    pub bytes: i64,
    pub capability: Capability,
    pub parameters: BTreeMap<String, String>,
    pub mutable_parameters: BTreeMap<String, String>,
}

/// A volume as CreateVolume returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedVolume {
    pub id: String,
    pub capacity_bytes: i64,
}

/// Whether a volume exists, as far as the plugin can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Present {
        capacity_bytes: i64,
    },
    Absent,
    /// The plugin offers neither GET_VOLUME nor LIST_VOLUMES.
    Unknown,
}

/// A snapshot as CreateSnapshot returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub ready: bool,
    /// Unix seconds, when reported.
    pub creation_time: Option<i64>,
}

/// One publication to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest<'a> {
    pub volume_id: &'a str,
    pub target: &'a Path,
    pub read_only: bool,
    pub capability: &'a Capability,
}

/// A CSI plugin, as the reconciler sees it. Implementations are cheap to
/// clone (a clone shares the connection), so the health endpoint can probe
/// while an apply runs.
pub trait Plugin: Clone + Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Probe: Ok(true) when ready (an unset `ready` counts as ready).
    fn probe(&mut self) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// CreateVolume, idempotent by name: the same name and compatible
    /// arguments return the same volume.
    fn create_volume(
        &mut self,
        req: &CreateVolume,
    ) -> impl Future<Output = Result<CreatedVolume, Self::Error>> + Send;

    /// Whether the volume exists and its capacity (GET_VOLUME, else
    /// LIST_VOLUMES; [`Lookup::Unknown`] when the plugin offers neither).
    fn lookup_volume(
        &mut self,
        id: &str,
    ) -> impl Future<Output = Result<Lookup, Self::Error>> + Send;

    /// DeleteVolume; a volume that is gone (NOT_FOUND) counts as deleted.
    fn delete_volume(&mut self, id: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Makes the volume usable at the target (ControllerPublish and
    /// NodeStage as the plugin needs, then NodePublish). Idempotent.
    fn publish(
        &mut self,
        req: &PublishRequest<'_>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Undoes a publish at `target` (and the staging once none remains).
    /// Idempotent; a target that is not published counts as done.
    fn unpublish(
        &mut self,
        volume_id: &str,
        target: &Path,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The targets at which this host has the volume published, as
    /// recorded by whoever published it.
    fn publications(
        &mut self,
        volume_id: &str,
    ) -> impl Future<Output = Result<Vec<PathBuf>, Self::Error>> + Send;

    /// ControllerExpandVolume to `bytes`, then NodeExpandVolume at
    /// `published_at` when the controller says the node must and the node
    /// offers EXPAND_VOLUME. Returns the new capacity. Idempotent.
    fn expand(
        &mut self,
        volume_id: &str,
        bytes: i64,
        published_at: Option<&Path>,
        capability: &Capability,
    ) -> impl Future<Output = Result<i64, Self::Error>> + Send;

    /// ControllerModifyVolume with these mutable parameters. Idempotent.
    fn modify_volume(
        &mut self,
        volume_id: &str,
        mutable_parameters: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// CreateSnapshot, idempotent by name.
    fn create_snapshot(
        &mut self,
        volume_id: &str,
        name: &str,
    ) -> impl Future<Output = Result<SnapshotInfo, Self::Error>> + Send;

    /// DeleteSnapshot; a snapshot that is gone counts as deleted.
    fn delete_snapshot(
        &mut self,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
