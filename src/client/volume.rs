//! `stowage volume create|list|get|delete|expand`: the Controller service's
//! volume calls. Topology and GetVolume are used only when the plugin says
//! it supports them.

use std::collections::BTreeMap;

use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use super::output::{Table, emit, join_map};
use super::progress::Progress;
use super::secrets::SecretsArgs;
use super::size::{human_size, parse_size};
use super::{ClientError, GlobalArgs, OutputFormat, Session, parse_key_value, rpc};
use crate::csi;
use crate::csi::controller_service_capability::rpc::Type as ControllerRpc;
use crate::csi::volume_capability::access_mode::Mode;

#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    pub globals: GlobalArgs,
    #[command(subcommand)]
    pub verb: VolumeVerb,
}

/// Kubernetes-style access mode names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessModeArg {
    /// Read-write on one node.
    Rwo,
    /// Read-write by one workload on one node.
    Rwop,
    /// Read-only on many nodes.
    Rox,
    /// Read-write on many nodes.
    Rwx,
}

impl From<AccessModeArg> for Mode {
    fn from(a: AccessModeArg) -> Mode {
        match a {
            AccessModeArg::Rwo => Mode::SingleNodeWriter,
            AccessModeArg::Rwop => Mode::SingleNodeSingleWriter,
            AccessModeArg::Rox => Mode::MultiNodeReaderOnly,
            AccessModeArg::Rwx => Mode::MultiNodeMultiWriter,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeVerb {
    /// Create a volume (CreateVolume); idempotent by NAME.
    Create(CreateArgs),
    /// List every volume (ListVolumes).
    List,
    /// Show one volume.
    Get {
        /// The volume id.
        id: String,
    },
    /// Delete a volume (DeleteVolume). Deleting a volume that does not
    /// exist succeeds (exit status 0) and says "no such volume" on stderr.
    Delete {
        /// The volume id.
        id: String,
        #[command(flatten)]
        staging: super::publish::StagingArgs,
        #[command(flatten)]
        secrets: SecretsArgs,
    },
    /// Grow a volume (ControllerExpandVolume), and its filesystem online
    /// where this client has it staged or published (NodeExpandVolume).
    Expand {
        /// The volume id.
        id: String,
        /// The new size: bytes, or a number with Ki, Mi, Gi or Ti.
        #[arg(long, value_parser = parse_size)]
        size: i64,
        #[command(flatten)]
        staging: super::publish::StagingArgs,
    },
    /// Change a volume's mutable parameters (ControllerModifyVolume).
    Modify {
        /// The volume id.
        id: String,
        /// A mutable parameter to set (repeatable, at least one).
        #[arg(long = "mutable-param", value_name = "KEY=VALUE", value_parser = parse_key_value, required = true)]
        mutable_params: Vec<(String, String)>,
    },
    /// Make a volume usable at TARGET: ControllerPublish and NodeStage when
    /// the plugin needs them, then NodePublish; recorded for unpublish.
    Publish(super::publish::PublishArgs),
    /// Undo a publish: NodeUnpublish, and when no recorded publication
    /// remains, NodeUnstage and ControllerUnpublish.
    Unpublish(super::publish::UnpublishArgs),
    /// Stage a volume by hand (ControllerPublish and NodeStage as needed).
    Stage(super::publish::StageArgs),
    /// Undo a manual stage (refused while publications remain).
    Unstage(super::publish::UnstageArgs),
    /// Usage and condition of a published volume (NodeGetVolumeStats).
    Stats(super::publish::StatsArgs),
    /// Check every copy of a replicated volume now: a scrub pass in the
    /// engine of the node it is published on (a cluster's controller).
    /// Progress and findings show in `volume get`. Of a volume not
    /// published, each copy's node reads its copy from its disk instead
    /// (the regions it cannot read are rebuilt by the next engine).
    Scrub {
        /// The volume id (`replicated:<uuid>`).
        id: String,
    },
    /// Trust one copy of a replicated volume nobody publishes: every
    /// other copy is rebuilt in full from it (by a heal, or the next
    /// publication's engine). For copies that hold different bytes with
    /// no majority to tell which are right (`volume get` says so); what
    /// the other copies hold is lost.
    Repair {
        /// The volume id (`replicated:<uuid>`).
        id: String,
        /// The node whose copy is trusted (in sync).
        #[arg(long, value_name = "NODE")]
        from: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The volume name (the idempotency key).
    pub name: String,
    /// The size: bytes, or a number with Ki, Mi, Gi or Ti.
    #[arg(long, value_parser = parse_size)]
    pub size: i64,
    /// A raw block volume instead of a mounted filesystem.
    #[arg(long, conflicts_with = "fs")]
    pub block: bool,
    /// The filesystem type for a mounted volume (default: the plugin's).
    #[arg(long)]
    pub fs: Option<String>,
    /// Access mode.
    #[arg(long, value_enum, default_value = "rwo")]
    pub access_mode: AccessModeArg,
    /// A plugin parameter (repeatable); fixed at creation.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
    /// A mutable parameter (repeatable): changeable later with `volume
    /// modify` (stowage: provisioning=thin|thick).
    #[arg(long = "mutable-param", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub mutable_params: Vec<(String, String)>,
    /// Restore from this snapshot.
    #[arg(long, conflicts_with = "from_volume")]
    pub from_snapshot: Option<String>,
    /// Clone this volume.
    #[arg(long)]
    pub from_volume: Option<String>,
    #[command(flatten)]
    pub staging: super::publish::StagingArgs,
    #[command(flatten)]
    pub secrets: SecretsArgs,
}

/// The volume context key under which stowage reports a volume's
/// CreateVolume name. Other drivers may not report one: the NAME column
/// is then left out.
pub use crate::volume::controller::NAME_KEY;

/// A volume, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    pub volume_id: String,
    /// The CreateVolume name, where the driver reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub capacity_bytes: i64,
    pub volume_context: BTreeMap<String, String>,
    /// `snapshot:<id>` or `volume:<id>` when made from one.
    pub content_source: Option<String>,
    pub accessible_topology: Vec<BTreeMap<String, String>>,
    /// Present when the plugin reports it (ListVolumes / GetVolume status).
    pub published_node_ids: Option<Vec<String>>,
    pub condition: Option<ConditionView>,
}

/// VolumeCondition, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionView {
    pub abnormal: bool,
    pub message: String,
}

/// An expansion, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct ExpandView {
    pub volume_id: String,
    pub capacity_bytes: i64,
    pub node_expansion_required: bool,
    /// What became of the node's part.
    pub node_expansion: super::publish::NodeExpansion,
}

/// A deletion, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct DeletedView {
    pub volume_id: String,
    /// False when there was no such volume (the call still succeeds:
    /// deleting what is gone is a success in CSI).
    pub deleted: bool,
}

/// The error of an Admin call `call` on replicated volumes, which only a
/// cluster's controller answers: on another endpoint, says which to give
/// for volumes to be `done` (e.g. "scrubbed").
fn admin_error(call: &'static str, done: &'static str) -> impl Fn(tonic::Status) -> ClientError {
    move |e| {
        if e.code() == tonic::Code::Unimplemented {
            ClientError::Local(format!(
                "the endpoint is not a cluster controller's socket: only replicated volumes are {done} (give --controller-endpoint)"
            ))
        } else {
            rpc(call)(e)
        }
    }
}

/// A repair made, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct RepairView {
    pub volume_id: String,
    pub from: String,
    /// The copies taken out of sync, to be rebuilt from `from`'s.
    pub rebuilt: Vec<String>,
}

/// A scrub started (or under way), as printed.
#[derive(Debug, Clone, Serialize)]
pub struct ScrubView {
    pub volume_id: String,
    pub node: String,
    pub started: bool,
    pub at_region: u32,
    pub regions: u32,
    /// The volume is not published: each copy's node reads its copy
    /// instead (`node` is then empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<IdleCheckView>,
}

/// A node's read of its copy of a volume nobody publishes, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct IdleCheckView {
    pub node: String,
    pub started: bool,
    pub at_region: u32,
    pub regions: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A modification, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct ModifiedView {
    pub volume_id: String,
    pub mutable_parameters: BTreeMap<String, String>,
}

impl VolumeView {
    fn new(v: csi::Volume) -> VolumeView {
        use csi::volume_content_source::Type;
        VolumeView {
            name: v.volume_context.get(NAME_KEY).cloned(),
            volume_id: v.volume_id,
            capacity_bytes: v.capacity_bytes,
            volume_context: v.volume_context.into_iter().collect(),
            content_source: v.content_source.and_then(|c| match c.r#type? {
                Type::Snapshot(s) => Some(format!("snapshot:{}", s.snapshot_id)),
                Type::Volume(v) => Some(format!("volume:{}", v.volume_id)),
            }),
            accessible_topology: v
                .accessible_topology
                .into_iter()
                .map(|t| t.segments.into_iter().collect())
                .collect(),
            published_node_ids: None,
            condition: None,
        }
    }

    fn with_status(mut self, nodes: Vec<String>, cond: Option<csi::VolumeCondition>) -> Self {
        self.published_node_ids = Some(nodes);
        self.condition = cond.map(|c| ConditionView {
            abnormal: c.abnormal,
            message: c.message,
        });
        self
    }
}

fn volume_table(views: &[VolumeView]) -> Table {
    // The NAME column only when the driver reports names.
    let names = views.iter().any(|v| v.name.is_some());
    let mut t = if names {
        Table::new(&[
            "NAME",
            "ID",
            "SIZE",
            "SOURCE",
            "PUBLISHED",
            "CONDITION",
            "CONTEXT",
        ])
    } else {
        Table::new(&["ID", "SIZE", "SOURCE", "PUBLISHED", "CONDITION", "CONTEXT"])
    };
    for v in views {
        let mut context = v.volume_context.clone();
        context.remove(NAME_KEY);
        let mut row = Vec::new();
        if names {
            row.push(v.name.clone().unwrap_or_default());
        }
        row.extend([
            v.volume_id.clone(),
            human_size(v.capacity_bytes),
            v.content_source.clone().unwrap_or_default(),
            v.published_node_ids
                .as_ref()
                .map(|n| n.join(","))
                .unwrap_or_default(),
            match &v.condition {
                Some(c) if c.abnormal => format!("abnormal: {}", c.message),
                Some(_) => "healthy".to_owned(),
                None => String::new(),
            },
            join_map(&context),
        ]);
        t.row(row);
    }
    t
}

pub async fn run(
    s: &mut Session,
    verb: VolumeVerb,
    format: OutputFormat,
) -> Result<(), ClientError> {
    match verb {
        VolumeVerb::Create(args) => {
            let label = match (&args.from_snapshot, &args.from_volume) {
                (Some(snap), _) => format!("restoring volume {} from snapshot {snap}", args.name),
                (None, Some(vol)) => format!("cloning volume {vol} as {}", args.name),
                (None, None) => format!("creating volume {}", args.name),
            };
            let root = args.staging.staging_root.clone();
            let name = args.name.clone();
            let capability = super::publish::CapabilityArgs {
                block: args.block,
                fs: args.fs.clone(),
                access_mode: Some(args.access_mode),
            };
            let secrets = args.secrets.load()?;
            let mut req = create_request(s, args).await?;
            req.secrets = secrets.to_csi();
            let progress = Progress::stderr();
            progress.set(label);
            let r = progress.track(s.controller.create_volume(req)).await;
            progress.clear();
            let v = r.map_err(rpc("CreateVolume"))?.into_inner().volume.ok_or(
                ClientError::EmptyResponse {
                    call: "CreateVolume",
                    what: "volume",
                },
            )?;
            remember(&root, &v.volume_id, &name, &capability);
            let v = VolumeView::new(v);
            emit(format, &v, || volume_table(std::slice::from_ref(&v)))
        }
        VolumeVerb::List => {
            let views = list(s).await?;
            emit(format, &views, || volume_table(&views))
        }
        VolumeVerb::Get { id } => {
            let v = get(s, &id).await?;
            emit(format, &v, || volume_table(std::slice::from_ref(&v)))
        }
        VolumeVerb::Delete {
            id,
            staging,
            secrets,
        } => {
            let secrets = secrets.load()?;
            let existed = exists(s, &id).await?;
            let r = s
                .controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: secrets.to_csi(),
                })
                .await;
            // A driver that answers NOT_FOUND says the same: nothing to do.
            let existed = match r {
                Ok(_) => existed,
                Err(st) if st.code() == tonic::Code::NotFound => Some(false),
                Err(st) => return Err(rpc("DeleteVolume")(st)),
            };
            if let Err(e) = super::created::remove(&staging.staging_root, &id) {
                eprintln!("stowage: warning: {}", e.report());
            }
            let v = DeletedView {
                volume_id: id,
                deleted: existed != Some(false),
            };
            if !v.deleted {
                eprintln!(
                    "stowage: no such volume {:?} (nothing deleted; exit status 0)",
                    v.volume_id
                );
            }
            emit(format, &v, || {
                let mut t = Table::new(&["ID", "DELETED"]);
                t.row(vec![
                    v.volume_id.clone(),
                    if v.deleted {
                        "true".into()
                    } else {
                        "false (no such volume)".into()
                    },
                ]);
                t
            })
        }
        VolumeVerb::Modify { id, mutable_params } => {
            let params: BTreeMap<String, String> = mutable_params.into_iter().collect();
            s.modify_volume(&id, &params).await?;
            let v = ModifiedView {
                volume_id: id,
                mutable_parameters: params,
            };
            emit(format, &v, || {
                let mut t = Table::new(&["ID", "MUTABLE PARAMETERS"]);
                t.row(vec![v.volume_id.clone(), join_map(&v.mutable_parameters)]);
                t
            })
        }
        VolumeVerb::Scrub { id } => {
            let r = s
                .admin
                .scrub_volume(crate::cluster::proto::ScrubVolumeRequest {
                    volume_id: id.clone(),
                })
                .await
                .map_err(admin_error("ScrubVolume", "scrubbed"))?
                .into_inner();
            let v = ScrubView {
                volume_id: id,
                node: r.node,
                started: r.started,
                at_region: r.at,
                regions: r.regions,
                idle: r
                    .idle
                    .into_iter()
                    .map(|c| IdleCheckView {
                        node: c.node,
                        started: c.started,
                        at_region: c.at,
                        regions: c.regions,
                        error: c.error,
                    })
                    .collect(),
            };
            emit(format, &v, || {
                if !v.idle.is_empty() {
                    // Not published: no engine compares the copies.
                    let mut t = Table::new(&["ID", "COPY NODE", "READ", "AT REGION"]);
                    for c in &v.idle {
                        let (read, at) = if c.error.is_empty() {
                            let read = if c.started { "started" } else { "under way" };
                            (read.to_owned(), format!("{} of {}", c.at_region, c.regions))
                        } else {
                            (format!("failed: {}", c.error), String::new())
                        };
                        t.row(vec![v.volume_id.clone(), c.node.clone(), read, at]);
                    }
                    return t;
                }
                let mut t = Table::new(&["ID", "ENGINE NODE", "PASS", "AT REGION"]);
                t.row(vec![
                    v.volume_id.clone(),
                    v.node.clone(),
                    if v.started { "started" } else { "under way" }.to_owned(),
                    format!("{} of {}", v.at_region, v.regions),
                ]);
                t
            })
        }
        VolumeVerb::Repair { id, from } => {
            let r = s
                .admin
                .repair_volume(crate::cluster::proto::RepairVolumeRequest {
                    volume_id: id.clone(),
                    from: from.clone(),
                })
                .await
                .map_err(admin_error("RepairVolume", "repaired"))?
                .into_inner();
            let v = RepairView {
                volume_id: id,
                from,
                rebuilt: r.rebuilt,
            };
            emit(format, &v, || {
                let mut t = Table::new(&["ID", "TRUSTED COPY", "REBUILT FROM IT"]);
                let rebuilt = if v.rebuilt.is_empty() {
                    "none (no other copy in sync)".to_owned()
                } else {
                    format!(
                        "{} (by a heal or the next publication)",
                        v.rebuilt.join(", ")
                    )
                };
                t.row(vec![v.volume_id.clone(), v.from.clone(), rebuilt]);
                t
            })
        }
        VolumeVerb::Publish(args) => super::publish::publish(s, args, format).await,
        VolumeVerb::Unpublish(args) => super::publish::unpublish(s, args, format).await,
        VolumeVerb::Stage(args) => super::publish::stage(s, args, format).await,
        VolumeVerb::Unstage(args) => super::publish::unstage(s, args, format).await,
        VolumeVerb::Stats(args) => super::publish::stats(s, args, format).await,
        VolumeVerb::Expand { id, size, staging } => {
            let r = s
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(rpc("ControllerExpandVolume"))?
                .into_inner();
            let node_expansion = if r.node_expansion_required {
                super::publish::expand_on_node(s, &id, r.capacity_bytes, &staging.staging_root)
                    .await
                    .map_err(|e| {
                        ClientError::Local(format!(
                            "volume {id:?} was grown to {}, but not its filesystem: {}",
                            human_size(r.capacity_bytes),
                            e.report()
                        ))
                    })?
            } else {
                super::publish::NodeExpansion::NotRequired
            };
            let v = ExpandView {
                volume_id: id,
                capacity_bytes: r.capacity_bytes,
                node_expansion_required: r.node_expansion_required,
                node_expansion,
            };
            emit(format, &v, || {
                let mut t = Table::new(&["ID", "SIZE", "NODE EXPANSION"]);
                t.row(vec![
                    v.volume_id.clone(),
                    human_size(v.capacity_bytes),
                    v.node_expansion.describe(),
                ]);
                t
            })
        }
    }
}

/// Records what a volume this client created was created for (see
/// [`super::created`]); a record that cannot be written is a warning, as
/// the volume exists either way.
pub(crate) fn remember(
    root: &std::path::Path,
    id: &str,
    name: &str,
    capability: &super::publish::CapabilityArgs,
) {
    let rec = super::created::CreatedRecord {
        volume_id: id.to_owned(),
        name: name.to_owned(),
        capability: capability.record(),
    };
    if let Err(e) = super::created::save(root, &rec) {
        eprintln!(
            "stowage: warning: volume {id} was created, but its access type could not be \
             recorded (give the same --block/--fs when publishing it): {}",
            e.report()
        );
    }
}

/// Whether the volume exists: Some when the plugin can tell (GET_VOLUME or
/// LIST_VOLUMES), None otherwise.
pub(crate) async fn exists(s: &mut Session, id: &str) -> Result<Option<bool>, ClientError> {
    let rpcs = s.controller_rpcs().await?;
    if !rpcs.contains(&ControllerRpc::GetVolume) && !rpcs.contains(&ControllerRpc::ListVolumes) {
        return Ok(None);
    }
    match get(s, id).await {
        Ok(_) => Ok(Some(true)),
        Err(ClientError::NotFound { .. }) => Ok(Some(false)),
        Err(ClientError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
            Ok(Some(false))
        }
        Err(e) => Err(e),
    }
}

/// The CreateVolume request for `args`. When the plugin declares
/// VOLUME_ACCESSIBILITY_CONSTRAINTS, the volume is asked for on the node
/// behind this endpoint (as a single-host CO would).
async fn create_request(
    s: &mut Session,
    args: CreateArgs,
) -> Result<csi::CreateVolumeRequest, ClientError> {
    use csi::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
    let accessibility_requirements = s.local_topology().await?;
    let source = match (args.from_snapshot, args.from_volume) {
        (Some(snapshot_id), _) => Some(Source::Snapshot(SnapshotSource { snapshot_id })),
        (None, Some(volume_id)) => Some(Source::Volume(VolumeSource { volume_id })),
        (None, None) => None,
    };
    Ok(csi::CreateVolumeRequest {
        name: args.name,
        capacity_range: Some(csi::CapacityRange {
            required_bytes: args.size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![
            super::publish::CapabilityArgs {
                block: args.block,
                fs: args.fs,
                access_mode: Some(args.access_mode),
            }
            .csi(),
        ],
        parameters: args.params.into_iter().collect(),
        mutable_parameters: args.mutable_params.into_iter().collect(),
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        accessibility_requirements,
        ..Default::default()
    })
}

/// Every volume, following ListVolumes pages to the end.
async fn list(s: &mut Session) -> Result<Vec<VolumeView>, ClientError> {
    let mut views = Vec::new();
    let mut token = String::new();
    loop {
        let r = s
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: token,
            })
            .await
            .map_err(rpc("ListVolumes"))?
            .into_inner();
        for e in r.entries {
            let Some(v) = e.volume else { continue };
            let mut view = VolumeView::new(v);
            if let Some(st) = e.status {
                view = view.with_status(st.published_node_ids, st.volume_condition);
            }
            views.push(view);
        }
        if r.next_token.is_empty() {
            return Ok(views);
        }
        token = r.next_token;
    }
}

/// One volume: ControllerGetVolume when the plugin offers GET_VOLUME,
/// otherwise a search of ListVolumes. NOT_FOUND either way when absent.
pub(crate) async fn get(s: &mut Session, id: &str) -> Result<VolumeView, ClientError> {
    if s.controller_rpcs()
        .await?
        .contains(&ControllerRpc::GetVolume)
    {
        let r = s
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.to_owned(),
            })
            .await
            .map_err(rpc("ControllerGetVolume"))?
            .into_inner();
        let v = r.volume.ok_or(ClientError::EmptyResponse {
            call: "ControllerGetVolume",
            what: "volume",
        })?;
        let mut view = VolumeView::new(v);
        if let Some(st) = r.status {
            view = view.with_status(st.published_node_ids, st.volume_condition);
        }
        return Ok(view);
    }
    list(s)
        .await?
        .into_iter()
        .find(|v| v.volume_id == id)
        .ok_or_else(|| ClientError::NotFound {
            kind: "volume",
            id: id.to_owned(),
        })
}
