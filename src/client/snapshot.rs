//! `stowage snapshot create|list|get|delete`: the Controller service's
//! snapshot calls; `stowage snapshot group create|get|delete`: the
//! GroupController service's. `get` filters ListSnapshots by id, which every plugin
//! with LIST_SNAPSHOTS supports (GetSnapshot is alpha). `create` waits for
//! readiness by repeating CreateSnapshot, as the spec allows a CO to.

use std::collections::HashMap;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;

use super::output::{Table, emit};
use super::progress::Progress;
use super::secrets::SecretsArgs;
use super::size::human_size;
use super::{ClientError, GlobalArgs, OutputFormat, Session, parse_key_value, rpc};
use crate::csi;

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub globals: GlobalArgs,
    #[command(subcommand)]
    pub verb: SnapshotVerb,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotVerb {
    /// Snapshot a volume (CreateSnapshot); idempotent by NAME.
    Create {
        /// The source volume id.
        volume: String,
        /// The snapshot name (the idempotency key).
        name: String,
        /// A plugin parameter (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// Return at once, even if the snapshot is not ready_to_use yet
        /// (by default create waits until it is).
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        secrets: SecretsArgs,
    },
    /// List snapshots (ListSnapshots).
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Show one snapshot.
    Get {
        /// The snapshot id.
        id: String,
    },
    /// Delete a snapshot (DeleteSnapshot).
    Delete {
        /// The snapshot id.
        id: String,
        #[command(flatten)]
        secrets: SecretsArgs,
    },
    /// Group snapshots: several volumes at one crash-consistent instant.
    #[command(subcommand)]
    Group(GroupVerb),
}

#[derive(Debug, Subcommand)]
pub enum GroupVerb {
    /// Snapshot volumes together (CreateVolumeGroupSnapshot); idempotent
    /// by NAME.
    Create {
        /// The group snapshot name (the idempotency key).
        name: String,
        /// The source volume ids.
        #[arg(required = true)]
        volumes: Vec<String>,
        /// A plugin parameter (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        secrets: SecretsArgs,
    },
    /// Show a group snapshot and its members (GetVolumeGroupSnapshot).
    Get {
        /// The group snapshot id.
        id: String,
        #[command(flatten)]
        secrets: SecretsArgs,
    },
    /// Delete a group snapshot with its members
    /// (DeleteVolumeGroupSnapshot).
    Delete {
        /// The group snapshot id.
        id: String,
        #[command(flatten)]
        secrets: SecretsArgs,
    },
}

/// A group snapshot, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    pub group_snapshot_id: String,
    pub snapshots: Vec<SnapshotView>,
    /// RFC 3339, when the plugin reports it.
    pub creation_time: Option<String>,
    pub ready_to_use: bool,
}

impl From<csi::VolumeGroupSnapshot> for GroupView {
    fn from(g: csi::VolumeGroupSnapshot) -> GroupView {
        GroupView {
            group_snapshot_id: g.group_snapshot_id,
            snapshots: g.snapshots.into_iter().map(SnapshotView::from).collect(),
            creation_time: g.creation_time.map(|t| t.to_string()),
            ready_to_use: g.ready_to_use,
        }
    }
}

fn group_table(g: &GroupView) -> Table {
    let mut t = Table::new(&["GROUP", "SNAPSHOT", "VOLUME", "SIZE", "READY", "CREATED"]);
    for v in &g.snapshots {
        t.row(vec![
            g.group_snapshot_id.clone(),
            v.snapshot_id.clone(),
            v.source_volume_id.clone(),
            human_size(v.size_bytes),
            v.ready_to_use.to_string(),
            v.creation_time.clone().unwrap_or_default(),
        ]);
    }
    t
}

async fn run_group(
    s: &mut Session,
    verb: GroupVerb,
    format: OutputFormat,
) -> Result<(), ClientError> {
    // Prints the group an answer carries.
    let show = |g: Option<csi::VolumeGroupSnapshot>, call| {
        let v = g.map(GroupView::from).ok_or(ClientError::EmptyResponse {
            call,
            what: "group_snapshot",
        })?;
        emit(format, &v, || group_table(&v))
    };
    match verb {
        GroupVerb::Create {
            name,
            volumes,
            params,
            secrets,
        } => {
            let req = csi::CreateVolumeGroupSnapshotRequest {
                name,
                source_volume_ids: volumes,
                parameters: params.into_iter().collect::<HashMap<_, _>>(),
                secrets: secrets.load()?.to_csi(),
            };
            let g = s
                .group
                .create_volume_group_snapshot(req)
                .await
                .map_err(rpc("CreateVolumeGroupSnapshot"))?
                .into_inner()
                .group_snapshot;
            show(g, "CreateVolumeGroupSnapshot")
        }
        GroupVerb::Get { id, secrets } => {
            let g = s
                .group
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: id,
                    snapshot_ids: Vec::new(),
                    secrets: secrets.load()?.to_csi(),
                })
                .await
                .map_err(rpc("GetVolumeGroupSnapshot"))?
                .into_inner()
                .group_snapshot;
            show(g, "GetVolumeGroupSnapshot")
        }
        GroupVerb::Delete { id, secrets } => {
            s.group
                .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.clone(),
                    snapshot_ids: Vec::new(),
                    secrets: secrets.load()?.to_csi(),
                })
                .await
                .map_err(rpc("DeleteVolumeGroupSnapshot"))?;
            deleted(
                format,
                &DeletedGroupView {
                    group_snapshot_id: id,
                    deleted: true,
                },
            )
        }
    }
}

/// A group deletion, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct DeletedGroupView {
    pub group_snapshot_id: String,
    pub deleted: bool,
}

/// Prints the deletion `v`.
fn deleted<V: Serialize + Deleted>(format: OutputFormat, v: &V) -> Result<(), ClientError> {
    emit(format, v, || {
        let mut t = Table::new(&["ID", "DELETED"]);
        t.row(vec![v.id().to_owned(), "true".into()]);
        t
    })
}

/// What a deletion names.
trait Deleted {
    fn id(&self) -> &str;
}

impl Deleted for DeletedView {
    fn id(&self) -> &str {
        &self.snapshot_id
    }
}

impl Deleted for DeletedGroupView {
    fn id(&self) -> &str {
        &self.group_snapshot_id
    }
}

/// A snapshot, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    pub snapshot_id: String,
    pub source_volume_id: String,
    pub size_bytes: i64,
    /// RFC 3339, when the plugin reports it.
    pub creation_time: Option<String>,
    pub ready_to_use: bool,
    pub group_snapshot_id: String,
}

/// A deletion, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct DeletedView {
    pub snapshot_id: String,
    pub deleted: bool,
}

impl From<csi::Snapshot> for SnapshotView {
    fn from(s: csi::Snapshot) -> SnapshotView {
        SnapshotView {
            snapshot_id: s.snapshot_id,
            source_volume_id: s.source_volume_id,
            size_bytes: s.size_bytes,
            creation_time: s.creation_time.map(|t| t.to_string()),
            ready_to_use: s.ready_to_use,
            group_snapshot_id: s.group_snapshot_id,
        }
    }
}

fn snapshot_table(views: &[SnapshotView]) -> Table {
    let mut t = Table::new(&["ID", "VOLUME", "SIZE", "READY", "CREATED"]);
    for v in views {
        t.row(vec![
            v.snapshot_id.clone(),
            v.source_volume_id.clone(),
            human_size(v.size_bytes),
            v.ready_to_use.to_string(),
            v.creation_time.clone().unwrap_or_default(),
        ]);
    }
    t
}

pub async fn run(
    s: &mut Session,
    verb: SnapshotVerb,
    format: OutputFormat,
) -> Result<(), ClientError> {
    match verb {
        SnapshotVerb::Create {
            volume,
            name,
            params,
            no_wait,
            secrets,
        } => {
            let req = csi::CreateSnapshotRequest {
                source_volume_id: volume,
                name,
                parameters: params.into_iter().collect::<HashMap<_, _>>(),
                secrets: secrets.load()?.to_csi(),
            };
            let progress = Progress::stderr();
            let snap = create(s, req, !no_wait, &progress).await;
            progress.clear();
            let v = SnapshotView::from(snap?);
            emit(format, &v, || snapshot_table(std::slice::from_ref(&v)))
        }
        SnapshotVerb::List { volume } => {
            let views = list(s, volume.unwrap_or_default(), String::new()).await?;
            emit(format, &views, || snapshot_table(&views))
        }
        SnapshotVerb::Get { id } => {
            let v = list(s, String::new(), id.clone())
                .await?
                .into_iter()
                .find(|v| v.snapshot_id == id)
                .ok_or(ClientError::NotFound {
                    kind: "snapshot",
                    id,
                })?;
            emit(format, &v, || snapshot_table(std::slice::from_ref(&v)))
        }
        SnapshotVerb::Delete { id, secrets } => {
            s.controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    secrets: secrets.load()?.to_csi(),
                })
                .await
                .map_err(rpc("DeleteSnapshot"))?;
            deleted(
                format,
                &DeletedView {
                    snapshot_id: id,
                    deleted: true,
                },
            )
        }
        SnapshotVerb::Group(verb) => run_group(s, verb, format).await,
    }
}

/// How often readiness is asked for while waiting.
const READY_POLL: Duration = Duration::from_millis(500);

/// CreateSnapshot; with `wait`, repeated with the same name and source
/// until the snapshot is ready_to_use ("the CO MAY call CreateSnapshot
/// again to check readiness"). Returns the last answer. Fails if a repeat
/// answers with another snapshot id: the plugin dropped the first one (its
/// copy failed) and the repeat started a new one, which is left to the
/// caller to keep or delete.
async fn create(
    s: &mut Session,
    req: csi::CreateSnapshotRequest,
    wait: bool,
    progress: &Progress,
) -> Result<csi::Snapshot, ClientError> {
    let what = format!("snapshot {} of volume {}", req.name, req.source_volume_id);
    progress.set(format!("creating {what}"));
    let first = progress.track(create_once(s, req.clone())).await?;
    if !wait {
        return Ok(first);
    }
    let mut snap = first.clone();
    while !snap.ready_to_use {
        progress.set(format!(
            "snapshot {} ({}) not ready_to_use yet",
            req.name, first.snapshot_id
        ));
        progress.track(tokio::time::sleep(READY_POLL)).await;
        snap = match progress.track(create_once(s, req.clone())).await {
            Ok(snap) => snap,
            // Another call on the same name or volume is in flight.
            Err(ClientError::Rpc { status, .. }) if status.code() == tonic::Code::Aborted => {
                continue;
            }
            Err(e) => return Err(e),
        };
        if snap.snapshot_id != first.snapshot_id {
            return Err(ClientError::Local(format!(
                "{what}: the plugin dropped snapshot {} before it was ready and \
                 started {} instead (was its copy failing?); check the plugin's log",
                first.snapshot_id, snap.snapshot_id
            )));
        }
    }
    Ok(snap)
}

async fn create_once(
    s: &mut Session,
    req: csi::CreateSnapshotRequest,
) -> Result<csi::Snapshot, ClientError> {
    s.controller
        .create_snapshot(req)
        .await
        .map_err(rpc("CreateSnapshot"))?
        .into_inner()
        .snapshot
        .ok_or(ClientError::EmptyResponse {
            call: "CreateSnapshot",
            what: "snapshot",
        })
}

/// Snapshots matching the filters (empty = any), following pages to the end.
async fn list(
    s: &mut Session,
    source_volume_id: String,
    snapshot_id: String,
) -> Result<Vec<SnapshotView>, ClientError> {
    let mut views = Vec::new();
    let mut token = String::new();
    loop {
        let r = s
            .controller
            .list_snapshots(csi::ListSnapshotsRequest {
                starting_token: token,
                source_volume_id: source_volume_id.clone(),
                snapshot_id: snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(rpc("ListSnapshots"))?
            .into_inner();
        views.extend(
            r.entries
                .into_iter()
                .filter_map(|e| e.snapshot)
                .map(SnapshotView::from),
        );
        if r.next_token.is_empty() {
            return Ok(views);
        }
        token = r.next_token;
    }
}
