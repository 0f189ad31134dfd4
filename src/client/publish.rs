//! `stowage volume publish|unpublish|stage|unstage|stats`: what a CO's node
//! agent does, driven from the command line. Which steps run is decided by
//! capability discovery alone (STAGE_UNSTAGE_VOLUME on the node,
//! PUBLISH_UNPUBLISH_VOLUME on the controller), and every step taken is
//! recorded in `<staging-root>/.publications/<id>.json` so that unpublish
//! and unstage undo exactly what was done.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::output::{Table, emit};
use super::size::format_size;
use super::volume::AccessModeArg;
use super::{ClientError, OutputFormat, Session, rpc};
use crate::csi;
use crate::csi::controller_service_capability::rpc::Type as ControllerRpc;
use crate::csi::node_service_capability::rpc::Type as NodeRpc;
use crate::csi::volume_capability::access_mode::Mode;

/// Where staging directories and publication records go by default.
pub const DEFAULT_STAGING_ROOT: &str = "/var/lib/stowage-client/staging";

/// The volume capability to stage and publish with.
#[derive(Debug, Clone, clap::Args)]
pub struct CapabilityArgs {
    /// Publish as a raw block device instead of a mounted filesystem.
    #[arg(long, conflicts_with = "fs")]
    pub block: bool,
    /// The filesystem type to mount (default: the plugin's).
    #[arg(long)]
    pub fs: Option<String>,
    /// Access mode.
    #[arg(long, value_enum, default_value = "rwo")]
    pub access_mode: AccessModeArg,
}

/// Where staging directories and records live.
#[derive(Debug, Clone, clap::Args)]
pub struct StagingArgs {
    /// The directory holding staging directories and publication records.
    #[arg(long, default_value = DEFAULT_STAGING_ROOT)]
    pub staging_root: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The volume id.
    pub id: String,
    /// Where the volume appears (created by the plugin; its parent must be
    /// creatable).
    pub target: PathBuf,
    /// Publish read-only.
    #[arg(long)]
    pub readonly: bool,
    #[command(flatten)]
    pub capability: CapabilityArgs,
    #[command(flatten)]
    pub staging: StagingArgs,
}

#[derive(Debug, clap::Args)]
pub struct UnpublishArgs {
    /// The volume id.
    pub id: String,
    /// The target path given to publish.
    pub target: PathBuf,
    #[command(flatten)]
    pub staging: StagingArgs,
}

#[derive(Debug, clap::Args)]
pub struct StageArgs {
    /// The volume id.
    pub id: String,
    #[command(flatten)]
    pub capability: CapabilityArgs,
    #[command(flatten)]
    pub staging: StagingArgs,
}

#[derive(Debug, clap::Args)]
pub struct UnstageArgs {
    /// The volume id.
    pub id: String,
    #[command(flatten)]
    pub staging: StagingArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The volume id.
    pub id: String,
    /// A path where the volume is published or staged.
    pub path: PathBuf,
}

/// The capability, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityRecord {
    pub block: bool,
    pub fs: String,
    pub access_mode: String,
}

/// One node publication, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    pub path: PathBuf,
    pub readonly: bool,
}

/// What the client did for one volume on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub volume_id: String,
    pub capability: CapabilityRecord,
    /// The staging directory when NodeStageVolume was called.
    pub staging_path: Option<PathBuf>,
    /// Staged by `volume stage` (kept until `volume unstage`).
    pub manually_staged: bool,
    /// The node id given to ControllerPublishVolume, when it was called.
    pub controller_published_to: Option<String>,
    pub publish_context: BTreeMap<String, String>,
    pub targets: Vec<TargetRecord>,
}

/// The result of publish or stage, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct PublicationView {
    pub volume_id: String,
    pub target: Option<PathBuf>,
    pub staged: bool,
    pub staging_path: Option<PathBuf>,
    pub controller_published: bool,
    pub targets: Vec<TargetRecord>,
    pub record: PathBuf,
}

/// The result of unpublish or unstage, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct UnpublicationView {
    pub volume_id: String,
    pub target: Option<PathBuf>,
    /// Whether a publication record existed.
    pub recorded: bool,
    pub unstaged: bool,
    pub controller_unpublished: bool,
    pub remaining_targets: Vec<TargetRecord>,
}

/// One usage figure, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct UsageView {
    /// `bytes` or `inodes`.
    pub unit: String,
    pub total: i64,
    pub used: i64,
    pub available: i64,
}

/// NodeGetVolumeStats's answer, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct StatsView {
    pub volume_id: String,
    pub volume_path: PathBuf,
    pub usage: Vec<UsageView>,
    pub condition: Option<super::volume::ConditionView>,
}

/// A file-name-safe, collision-free form of a volume id: the id itself when
/// it is made of `[A-Za-z0-9._-]` and does not start with a dot, otherwise
/// `+` and the id's bytes in hex (`+` never appears in the first form).
pub fn sanitize_id(id: &str) -> Result<String, ClientError> {
    let safe = !id.is_empty()
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let name = if safe {
        id.to_owned()
    } else {
        let mut s = String::from("+");
        for b in id.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    };
    if name.len() > 200 {
        return Err(ClientError::Local(format!(
            "volume id {id:?} is too long for a staging directory name"
        )));
    }
    Ok(name)
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// The records under one staging root.
#[derive(Debug, Clone)]
struct Store {
    root: PathBuf,
}

impl Store {
    fn open(root: &Path) -> Result<Store, ClientError> {
        let root = std::path::absolute(root)
            .map_err(io_err(format!("cannot resolve {}", root.display())))?;
        let dir = root.join(".publications");
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        Ok(Store { root })
    }

    fn staging_path(&self, id: &str) -> Result<PathBuf, ClientError> {
        Ok(self.root.join(sanitize_id(id)?))
    }

    fn record_path(&self, id: &str) -> Result<PathBuf, ClientError> {
        Ok(self
            .root
            .join(".publications")
            .join(format!("{}.json", sanitize_id(id)?)))
    }

    fn load(&self, id: &str) -> Result<Option<Record>, ClientError> {
        let path = self.record_path(id)?;
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ClientError::Local(format!("publication record {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("cannot read {}", path.display()))(e)),
        }
    }

    /// Writes the record atomically: a temporary file, synced, renamed over.
    fn save(&self, rec: &Record) -> Result<(), ClientError> {
        let path = self.record_path(&rec.volume_id)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(rec)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(io_err(format!("cannot write {}", path.display())))
    }

    fn remove(&self, id: &str) -> Result<(), ClientError> {
        let path = self.record_path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("cannot remove {}", path.display()))(e)),
        }
    }
}

impl CapabilityArgs {
    fn record(&self) -> CapabilityRecord {
        CapabilityRecord {
            block: self.block,
            fs: self.fs.clone().unwrap_or_default(),
            access_mode: format!("{:?}", self.access_mode).to_lowercase(),
        }
    }

    fn csi(&self) -> csi::VolumeCapability {
        use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        csi::VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::from(self.access_mode) as i32,
            }),
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs.clone().unwrap_or_default(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                })
            }),
        }
    }
}

/// What the plugin needs, by capability discovery.
struct Needs {
    stage: bool,
    controller_publish: bool,
}

async fn needs(s: &mut Session) -> Result<Needs, ClientError> {
    Ok(Needs {
        stage: s.node_rpcs().await?.contains(&NodeRpc::StageUnstageVolume),
        controller_publish: s
            .controller_rpcs()
            .await?
            .contains(&ControllerRpc::PublishUnpublishVolume),
    })
}

/// The volume's context, when the controller can tell it (GET_VOLUME or
/// LIST_VOLUMES); empty otherwise.
async fn volume_context(
    s: &mut Session,
    id: &str,
) -> Result<std::collections::HashMap<String, String>, ClientError> {
    let rpcs = s.controller_rpcs().await?;
    if !rpcs.contains(&ControllerRpc::GetVolume) && !rpcs.contains(&ControllerRpc::ListVolumes) {
        return Ok(Default::default());
    }
    Ok(super::volume::get(s, id)
        .await?
        .volume_context
        .into_iter()
        .collect())
}

/// A call's error, with NOT_FOUND treated as "already undone".
fn tolerate_not_found<T>(
    call: &'static str,
    r: Result<T, tonic::Status>,
) -> Result<(), ClientError> {
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(rpc(call)(s)),
    }
}

/// ControllerPublish (when the plugin offers it) and NodeStage (when it
/// needs staging), recording each step once it succeeds. Both calls are
/// idempotent, so they are repeated on every publish.
async fn prepare(
    s: &mut Session,
    store: &Store,
    rec: &mut Record,
    cap: &csi::VolumeCapability,
    ctx: &std::collections::HashMap<String, String>,
    needs: &Needs,
) -> Result<(), ClientError> {
    let id = rec.volume_id.clone();
    if needs.controller_publish {
        let node_id = s
            .node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .map_err(rpc("NodeGetInfo"))?
            .into_inner()
            .node_id;
        let pc = s
            .controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node_id.clone(),
                volume_capability: Some(cap.clone()),
                readonly: false,
                volume_context: ctx.clone(),
                ..Default::default()
            })
            .await
            .map_err(rpc("ControllerPublishVolume"))?
            .into_inner()
            .publish_context;
        rec.controller_published_to = Some(node_id);
        rec.publish_context = pc.into_iter().collect();
        store.save(rec)?;
    }
    if needs.stage {
        let staging = store.staging_path(&id)?;
        std::fs::create_dir_all(&staging)
            .map_err(io_err(format!("cannot create {}", staging.display())))?;
        s.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: rec.publish_context.clone().into_iter().collect(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: ctx.clone(),
                ..Default::default()
            })
            .await
            .map_err(rpc("NodeStageVolume"))?;
        rec.staging_path = Some(staging);
        store.save(rec)?;
    }
    Ok(())
}

/// NodeUnstage and ControllerUnpublish as recorded, then the record goes.
/// Returns (unstaged, controller_unpublished).
async fn release(
    s: &mut Session,
    store: &Store,
    rec: &mut Record,
) -> Result<(bool, bool), ClientError> {
    let id = rec.volume_id.clone();
    let mut unstaged = false;
    let mut unpublished = false;
    if let Some(staging) = rec.staging_path.clone() {
        let r = s
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await;
        tolerate_not_found("NodeUnstageVolume", r)?;
        // The directory is ours (we created it); a leftover is harmless.
        let _ = std::fs::remove_dir(&staging);
        rec.staging_path = None;
        rec.manually_staged = false;
        store.save(rec)?;
        unstaged = true;
    }
    if let Some(node_id) = rec.controller_published_to.clone() {
        let r = s
            .controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id,
                ..Default::default()
            })
            .await;
        tolerate_not_found("ControllerUnpublishVolume", r)?;
        unpublished = true;
    }
    store.remove(&id)?;
    Ok((unstaged, unpublished))
}

fn new_record(id: &str, cap: &CapabilityArgs) -> Record {
    Record {
        volume_id: id.to_owned(),
        capability: cap.record(),
        staging_path: None,
        manually_staged: false,
        controller_published_to: None,
        publish_context: BTreeMap::new(),
        targets: vec![],
    }
}

fn publication_view(store: &Store, rec: &Record, target: Option<PathBuf>) -> PublicationView {
    PublicationView {
        volume_id: rec.volume_id.clone(),
        target,
        staged: rec.staging_path.is_some(),
        staging_path: rec.staging_path.clone(),
        controller_published: rec.controller_published_to.is_some(),
        targets: rec.targets.clone(),
        record: store
            .record_path(&rec.volume_id)
            .unwrap_or_else(|_| PathBuf::new()),
    }
}

fn publication_table(v: &PublicationView) -> Table {
    let mut t = Table::new(&["ID", "TARGET", "STAGING", "CONTROLLER PUBLISHED"]);
    t.row(vec![
        v.volume_id.clone(),
        v.target
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        v.staging_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into()),
        v.controller_published.to_string(),
    ]);
    t
}

fn unpublication_table(v: &UnpublicationView) -> Table {
    let mut t = Table::new(&[
        "ID",
        "TARGET",
        "UNSTAGED",
        "CONTROLLER UNPUBLISHED",
        "REMAINING",
    ]);
    t.row(vec![
        v.volume_id.clone(),
        v.target
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        v.unstaged.to_string(),
        v.controller_unpublished.to_string(),
        v.remaining_targets.len().to_string(),
    ]);
    t
}

/// One publication to make: what `volume publish` does, for callers that
/// are not the command line (the headless reconciler).
#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub id: String,
    /// Where the volume appears; made absolute before use.
    pub target: PathBuf,
    pub readonly: bool,
    pub capability: CapabilityArgs,
    pub staging_root: PathBuf,
}

/// Publishes `spec.id` at `spec.target`: ControllerPublish when offered,
/// NodeStage when needed, NodePublish; every step recorded. Idempotent.
pub async fn publish_volume(
    s: &mut Session,
    spec: &PublishSpec,
) -> Result<PublicationView, ClientError> {
    let store = Store::open(&spec.staging_root)?;
    let target = std::path::absolute(&spec.target)
        .map_err(io_err(format!("cannot resolve {}", spec.target.display())))?;
    let needs = needs(s).await?;
    let ctx = volume_context(s, &spec.id).await?;
    let cap = spec.capability.csi();
    let mut rec = match store.load(&spec.id)? {
        Some(r) => r,
        None => new_record(&spec.id, &spec.capability),
    };
    prepare(s, &store, &mut rec, &cap, &ctx, &needs).await?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("cannot create {}", parent.display())))?;
    }
    s.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: spec.id.clone(),
            publish_context: rec.publish_context.clone().into_iter().collect(),
            staging_target_path: rec
                .staging_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            readonly: spec.readonly,
            volume_context: ctx,
            ..Default::default()
        })
        .await
        .map_err(rpc("NodePublishVolume"))?;
    rec.targets.retain(|t| t.path != target);
    rec.targets.push(TargetRecord {
        path: target.clone(),
        readonly: spec.readonly,
    });
    store.save(&rec)?;
    Ok(publication_view(&store, &rec, Some(target)))
}

/// Unpublishes `id` from `target` (NOT_FOUND counts as done) and, when the
/// record says this was the last publication of a volume not staged by
/// hand, unstages and controller-unpublishes it. Idempotent.
pub async fn unpublish_volume(
    s: &mut Session,
    id: &str,
    target: &Path,
    staging_root: &Path,
) -> Result<UnpublicationView, ClientError> {
    let store = Store::open(staging_root)?;
    let target = std::path::absolute(target)
        .map_err(io_err(format!("cannot resolve {}", target.display())))?;
    let r = s
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: target.display().to_string(),
        })
        .await;
    tolerate_not_found("NodeUnpublishVolume", r)?;
    let mut v = UnpublicationView {
        volume_id: id.to_owned(),
        target: Some(target.clone()),
        recorded: false,
        unstaged: false,
        controller_unpublished: false,
        remaining_targets: vec![],
    };
    if let Some(mut rec) = store.load(id)? {
        v.recorded = true;
        rec.targets.retain(|t| t.path != target);
        store.save(&rec)?;
        if rec.targets.is_empty() && !rec.manually_staged {
            (v.unstaged, v.controller_unpublished) = release(s, &store, &mut rec).await?;
        }
        v.remaining_targets = rec.targets;
    }
    Ok(v)
}

/// What the client has recorded for `id` under `staging_root`, if anything.
pub fn load_record(staging_root: &Path, id: &str) -> Result<Option<Record>, ClientError> {
    Store::open(staging_root)?.load(id)
}

pub async fn publish(
    s: &mut Session,
    args: PublishArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let spec = PublishSpec {
        id: args.id,
        target: args.target,
        readonly: args.readonly,
        capability: args.capability,
        staging_root: args.staging.staging_root,
    };
    let v = publish_volume(s, &spec).await?;
    emit(format, &v, || publication_table(&v))
}

pub async fn unpublish(
    s: &mut Session,
    args: UnpublishArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let v = unpublish_volume(s, &args.id, &args.target, &args.staging.staging_root).await?;
    emit(format, &v, || unpublication_table(&v))
}

pub async fn stage(
    s: &mut Session,
    args: StageArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let store = Store::open(&args.staging.staging_root)?;
    let needs = needs(s).await?;
    let ctx = volume_context(s, &args.id).await?;
    let cap = args.capability.csi();
    let mut rec = match store.load(&args.id)? {
        Some(r) => r,
        None => new_record(&args.id, &args.capability),
    };
    rec.manually_staged = true;
    prepare(s, &store, &mut rec, &cap, &ctx, &needs).await?;
    store.save(&rec)?;
    let v = publication_view(&store, &rec, None);
    emit(format, &v, || publication_table(&v))
}

pub async fn unstage(
    s: &mut Session,
    args: UnstageArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let store = Store::open(&args.staging.staging_root)?;
    let mut v = UnpublicationView {
        volume_id: args.id.clone(),
        target: None,
        recorded: false,
        unstaged: false,
        controller_unpublished: false,
        remaining_targets: vec![],
    };
    if let Some(mut rec) = store.load(&args.id)? {
        v.recorded = true;
        if !rec.targets.is_empty() {
            let list: Vec<String> = rec
                .targets
                .iter()
                .map(|t| t.path.display().to_string())
                .collect();
            return Err(ClientError::Local(format!(
                "volume {:?} is still published at {}; unpublish it first",
                args.id,
                list.join(", ")
            )));
        }
        (v.unstaged, v.controller_unpublished) = release(s, &store, &mut rec).await?;
    }
    emit(format, &v, || unpublication_table(&v))
}

pub async fn stats(
    s: &mut Session,
    args: StatsArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    use csi::volume_usage::Unit;
    let path = std::path::absolute(&args.path)
        .map_err(io_err(format!("cannot resolve {}", args.path.display())))?;
    let r = s
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: args.id.clone(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .map_err(rpc("NodeGetVolumeStats"))?
        .into_inner();
    let v = StatsView {
        volume_id: args.id,
        volume_path: path,
        usage: r
            .usage
            .into_iter()
            .map(|u| UsageView {
                unit: match Unit::try_from(u.unit) {
                    Ok(Unit::Bytes) => "bytes".into(),
                    Ok(Unit::Inodes) => "inodes".into(),
                    _ => "unknown".into(),
                },
                total: u.total,
                used: u.used,
                available: u.available,
            })
            .collect(),
        condition: r.volume_condition.map(|c| super::volume::ConditionView {
            abnormal: c.abnormal,
            message: c.message,
        }),
    };
    emit(format, &v, || {
        let mut t = Table::new(&["ID", "UNIT", "TOTAL", "USED", "AVAILABLE", "CONDITION"]);
        let cond = match &v.condition {
            Some(c) if c.abnormal => format!("abnormal: {}", c.message),
            Some(_) => "healthy".to_owned(),
            None => String::new(),
        };
        for u in &v.usage {
            let show = |n: i64| {
                if u.unit == "bytes" {
                    format_size(n)
                } else {
                    n.to_string()
                }
            };
            t.row(vec![
                v.volume_id.clone(),
                u.unit.clone(),
                show(u.total),
                show(u.used),
                show(u.available),
                cond.clone(),
            ]);
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids_are_kept_and_others_hex_encoded() {
        assert_eq!(sanitize_id("pvc-1234_a.b").unwrap(), "pvc-1234_a.b");
        assert_eq!(sanitize_id("a/b").unwrap(), "+612f62");
        assert_eq!(sanitize_id("..").unwrap(), "+2e2e");
        assert_eq!(sanitize_id(".hidden").unwrap(), "+2e68696464656e");
        assert_eq!(sanitize_id("").unwrap(), "+");
        assert!(sanitize_id(&"x/".repeat(100)).is_err());
    }

    #[test]
    fn records_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load("v/1").unwrap(), None);
        let cap = CapabilityArgs {
            block: false,
            fs: Some("ext4".into()),
            access_mode: AccessModeArg::Rwo,
        };
        let mut rec = new_record("v/1", &cap);
        rec.targets.push(TargetRecord {
            path: "/t".into(),
            readonly: true,
        });
        store.save(&rec).unwrap();
        assert_eq!(store.load("v/1").unwrap(), Some(rec));
        assert!(!dir.path().join(".publications/+762f31.json.tmp").exists());
        store.remove("v/1").unwrap();
        store.remove("v/1").unwrap();
        assert_eq!(store.load("v/1").unwrap(), None);
    }
}
