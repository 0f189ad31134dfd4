//! `stowage volume publish|unpublish|stage|unstage|stats`: what a CO's node
//! agent does, driven from the command line. Which steps run is decided by
//! capability discovery alone (STAGE_UNSTAGE_VOLUME on the node,
//! PUBLISH_UNPUBLISH_VOLUME on the controller), and every step is recorded
//! in `<staging-root>/.publications/<id>.json` *before* it is taken, so that
//! unpublish and unstage undo at least what was done, even after a crash.
//! Each operation holds the volume's lock file for its whole length and
//! never lets two clients change one record at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::output::{Table, emit};
use super::progress::Progress;
use super::secrets::{Secrets, SecretsArgs};
use super::size::human_size;
use super::volume::AccessModeArg;
use super::{ClientError, OutputFormat, Session, rpc};
use crate::csi;
use crate::csi::controller_service_capability::rpc::Type as ControllerRpc;
use crate::csi::node_service_capability::rpc::Type as NodeRpc;
use crate::csi::volume_capability::access_mode::Mode;

/// Where staging directories and publication records go by default.
pub const DEFAULT_STAGING_ROOT: &str = "/var/lib/stowage-client/staging";

/// The volume capability to stage and publish with. Left out, each comes
/// from what the client knows of the volume (how it is staged, else how
/// `volume create` made it; see [`resolve_capability`]).
#[derive(Debug, Clone, clap::Args)]
pub struct CapabilityArgs {
    /// Publish as a raw block device instead of a mounted filesystem
    /// (default: as the volume was created, when this client created it).
    #[arg(long, conflicts_with = "fs")]
    pub block: bool,
    /// The filesystem type to mount (default: as created, else the
    /// plugin's).
    #[arg(long)]
    pub fs: Option<String>,
    /// Access mode (default: as created, else rwo).
    #[arg(long, value_enum)]
    pub access_mode: Option<AccessModeArg>,
}

/// Where staging directories and records live.
#[derive(Debug, Clone, clap::Args)]
pub struct StagingArgs {
    /// The directory holding staging directories, publication records and
    /// the records of volumes this client created.
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
    /// Passed as NodeStageVolume's secrets.
    #[command(flatten)]
    pub secrets: SecretsArgs,
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
    /// Passed as NodeStageVolume's secrets.
    #[command(flatten)]
    pub secrets: SecretsArgs,
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

/// What the client did, or was about to do, for one volume on this node.
/// Each step is written here before its call is made, so a step listed may
/// not have happened (the process died before or during the call); undoing
/// it is still correct, as CSI makes unpublishing or unstaging something
/// not published or staged a success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub volume_id: String,
    pub capability: CapabilityRecord,
    /// The staging directory, from just before NodeStageVolume.
    pub staging_path: Option<PathBuf>,
    /// Staged by `volume stage` (kept until `volume unstage`).
    pub manually_staged: bool,
    /// The node id, from just before ControllerPublishVolume.
    pub controller_published_to: Option<String>,
    pub publish_context: BTreeMap<String, String>,
    /// Targets, each from just before its NodePublishVolume.
    pub targets: Vec<TargetRecord>,
}

impl Record {
    /// Nothing done and nothing about to be done: no record is needed.
    fn is_empty(&self) -> bool {
        self.staging_path.is_none()
            && !self.manually_staged
            && self.controller_published_to.is_none()
            && self.targets.is_empty()
    }
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
    /// Whether the volume was published at the target before the call:
    /// from the client's record, else NodeGetVolumeStats (NOT_FOUND: it
    /// was not); null when neither could tell. Unpublishing what is not
    /// published succeeds all the same (CSI makes it idempotent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub was_published: Option<bool>,
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

/// The longest name [`sanitize_id`] returns: `NAME_MAX` (255) less the
/// `.json.tmp` suffix of a record being written.
const MAX_NAME: usize = 255 - ".json.tmp".len();

/// A file-name-safe, collision-free form of a volume id: the id itself when
/// it is made of `[A-Za-z0-9._-]` and does not start with a dot, otherwise
/// `+` and the id's bytes in hex (`+` never appears in the first form), or,
/// when that would be too long for a file name, `=` and the id's bytes in
/// unpadded base64url, so that every id within CSI's 128-byte limit has a
/// name.
pub fn sanitize_id(id: &str) -> Result<String, ClientError> {
    let safe = !id.is_empty()
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let name = if safe {
        id.to_owned()
    } else if "+".len() + 2 * id.len() <= MAX_NAME {
        let mut s = String::from("+");
        for b in id.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    } else {
        format!("={}", base64url(id.as_bytes()))
    };
    if name.len() > MAX_NAME {
        return Err(ClientError::Local(format!(
            "volume id {id:?} is too long for a staging directory name"
        )));
    }
    Ok(name)
}

/// `bytes` in base64url (RFC 4648 §5) without padding.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// Publication records and lock files: owner-only, whatever the umask.
const PRIVATE_FILE_MODE: u32 = 0o600;

/// The records directory (and a staging root this client creates).
const PRIVATE_DIR_MODE: u32 = 0o700;

/// How long an operation waits for another client working on the same
/// volume before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// How often a held lock is tried again.
const LOCK_RETRY: Duration = Duration::from_millis(100);

/// The exclusive `flock` on one volume's lock file, released on drop (or
/// when the process dies). A separate file from the record, because the
/// record is replaced by rename and a lock on a replaced file locks nothing.
/// Lock files are left in place: removing one while another client has it
/// open would let two clients lock two different files.
#[derive(Debug)]
struct VolumeLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

/// The records under one staging root.
#[derive(Debug, Clone)]
struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store, creating what is missing. The records describe
    /// volumes and where they are mounted, so the records directory is
    /// owner-only (0700, also when it already existed with another mode)
    /// and a staging root this creates is 0700 too; an existing staging
    /// root keeps its mode (it may be a directory the operator chose).
    fn open(root: &Path) -> Result<Store, ClientError> {
        let root = std::path::absolute(root)
            .map_err(io_err(format!("cannot resolve {}", root.display())))?;
        private_dir(&root.join(".publications"))?;
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

    fn lock_path(&self, id: &str) -> Result<PathBuf, ClientError> {
        Ok(self
            .root
            .join(".publications")
            .join(format!("{}.lock", sanitize_id(id)?)))
    }

    /// Takes `id`'s lock, waiting while another client (or process of this
    /// client) holds it — without blocking the runtime — for at most
    /// `bound`, then failing with the lock file's path. Different volumes
    /// have different lock files and never wait for each other.
    async fn lock(
        &self,
        id: &str,
        bound: Duration,
        progress: &Progress,
    ) -> Result<VolumeLock, ClientError> {
        use nix::errno::Errno;
        use nix::fcntl::{Flock, FlockArg};
        let path = self.lock_path(id)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        // One made by an earlier version may be 0644.
        file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
            .map_err(io_err(format!("cannot restrict {}", path.display())))?;
        let start = Instant::now();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(VolumeLock { _flock: flock }),
                Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) => file = f,
                Err((_, e)) => {
                    return Err(io_err(format!("cannot lock {}", path.display()))(e.into()));
                }
            }
            if start.elapsed() >= bound {
                return Err(ClientError::Local(format!(
                    "another stowage client is working on volume {id:?} (lock file {}); \
                     gave up after {} s",
                    path.display(),
                    bound.as_secs()
                )));
            }
            progress.set(format!(
                "waiting for another stowage client working on volume {id}"
            ));
            progress.track(tokio::time::sleep(LOCK_RETRY)).await;
        }
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

    /// Writes the record atomically and durably: a temporary file, synced,
    /// renamed over, then the directory synced so the rename survives a
    /// power loss (a lost record would leave a controller publication no
    /// unpublish knows of). A temporary file left by a failure is removed.
    fn save(&self, rec: &Record) -> Result<(), ClientError> {
        let path = self.record_path(&rec.volume_id)?;
        let bytes = serde_json::to_vec_pretty(rec)?;
        write_private(&path, &bytes)
    }

    /// Saves the record, or removes it when it lists nothing.
    fn put(&self, rec: &Record) -> Result<(), ClientError> {
        if rec.is_empty() {
            self.remove(&rec.volume_id)
        } else {
            self.save(rec)
        }
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

/// Writes `bytes` to `path` atomically and durably, owner-only: a
/// temporary file (0600 whatever the umask, also when a crash left one with
/// another mode), synced, renamed over, then the directory synced so the
/// rename survives a power loss. A temporary file left by a failure is
/// removed.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let tmp = path.with_extension("json.tmp");
    let dir = path.parent().unwrap_or(Path::new("/"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(format!("cannot write {}", path.display()))(e)
    })
}

/// Creates `dir` (and its parents) and makes it 0700, also when it
/// already existed with another mode.
pub(crate) fn private_dir(dir: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(io_err(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(io_err(format!("cannot restrict {}", dir.display())))
}

impl CapabilityArgs {
    pub(crate) fn record(&self) -> CapabilityRecord {
        CapabilityRecord {
            block: self.block,
            fs: self.fs.clone().unwrap_or_default(),
            access_mode: format!("{:?}", self.access_mode()).to_lowercase(),
        }
    }

    fn access_mode(&self) -> AccessModeArg {
        self.access_mode.unwrap_or(AccessModeArg::Rwo)
    }

    /// The CSI capability these flags describe (the one place the client
    /// builds a VolumeCapability).
    pub(crate) fn csi(&self) -> csi::VolumeCapability {
        use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        csi::VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::from(self.access_mode()) as i32,
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

/// What was known of a volume's capability, and from where.
fn known_capability(
    root: &Path,
    id: &str,
) -> Result<Option<(CapabilityRecord, &'static str)>, ClientError> {
    // How it is staged now wins: that is what the plugin has.
    let staged = std::path::absolute(root)
        .ok()
        .map(|r| Store { root: r })
        .and_then(|st| st.load(id).ok().flatten())
        .filter(|r| r.staging_path.is_some() || !r.targets.is_empty());
    if let Some(r) = staged {
        return Ok(Some((r.capability, "is staged")));
    }
    Ok(super::created::load(root, id)?.map(|r| (r.capability, "was created")))
}

/// The capability to stage or publish `id` with: the flags given,
/// completed from what the client knows of the volume (how it is staged
/// now, else how `volume create` made it); a flag that contradicts it is
/// refused before any call: publishing a raw block volume as a filesystem
/// would format it, and the plugin would refuse the other type later.
/// Without a record the flags are taken as given.
pub fn resolve_capability(
    root: &Path,
    id: &str,
    args: &CapabilityArgs,
) -> Result<CapabilityArgs, ClientError> {
    let Some((known, how)) = known_capability(root, id)? else {
        return Ok(args.clone());
    };
    let refuse = |msg: String| ClientError::Local(format!("volume {id:?} {how} as {msg}"));
    let known_fs = if known.fs.is_empty() {
        "a mounted filesystem".to_owned()
    } else {
        format!("a mounted {} filesystem", known.fs)
    };
    if args.block && !known.block {
        return Err(refuse(format!(
            "{known_fs}; refusing --block (leave it out to publish the filesystem)"
        )));
    }
    if known.block && args.fs.is_some() {
        return Err(refuse(format!(
            "a raw block volume (--block); refusing --fs {}: a filesystem would be made on \
             it (give --block, or leave out --fs)",
            args.fs.as_deref().unwrap_or_default()
        )));
    }
    if let Some(fs) = &args.fs
        && !known.fs.is_empty()
        && *fs != known.fs
    {
        return Err(refuse(format!(
            "{known_fs}; refusing --fs {fs} (leave it out, or give --fs {})",
            known.fs
        )));
    }
    let access_mode = args
        .access_mode
        .or_else(|| <AccessModeArg as clap::ValueEnum>::from_str(&known.access_mode, true).ok());
    Ok(CapabilityArgs {
        block: known.block,
        fs: args
            .fs
            .clone()
            .or_else(|| (!known.fs.is_empty()).then(|| known.fs.clone())),
        access_mode,
    })
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

/// What ControllerPublish and NodeStage are called with, besides the
/// volume id and what the record holds.
struct PrepareInputs<'a> {
    cap: &'a csi::VolumeCapability,
    ctx: &'a std::collections::HashMap<String, String>,
    /// NodeStageVolume's secrets.
    secrets: &'a Secrets,
}

/// ControllerPublish (when the plugin offers it) and NodeStage (when it
/// needs staging), each recorded before it is called. Both calls are
/// idempotent, so they are repeated on every publish.
async fn prepare(
    s: &mut Session,
    store: &Store,
    rec: &mut Record,
    inputs: PrepareInputs<'_>,
    needs: &Needs,
    progress: &Progress,
) -> Result<(), ClientError> {
    let PrepareInputs { cap, ctx, secrets } = inputs;
    let id = rec.volume_id.clone();
    if needs.controller_publish {
        progress.set(format!("NodeGetInfo for volume {id}"));
        let node_id = progress
            .track(s.node.node_get_info(csi::NodeGetInfoRequest {}))
            .await
            .map_err(rpc("NodeGetInfo"))?
            .into_inner()
            .node_id;
        rec.controller_published_to = Some(node_id.clone());
        store.save(rec)?;
        progress.set(format!("ControllerPublishVolume {id} to node {node_id}"));
        let pc = progress
            .track(
                s.controller
                    .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                        volume_id: id.clone(),
                        node_id,
                        volume_capability: Some(cap.clone()),
                        readonly: false,
                        volume_context: ctx.clone(),
                        ..Default::default()
                    }),
            )
            .await
            .map_err(rpc("ControllerPublishVolume"))?
            .into_inner()
            .publish_context;
        rec.publish_context = pc.into_iter().collect();
        store.save(rec)?;
    }
    if needs.stage {
        let staging = store.staging_path(&id)?;
        rec.staging_path = Some(staging.clone());
        store.save(rec)?;
        std::fs::create_dir_all(&staging)
            .map_err(io_err(format!("cannot create {}", staging.display())))?;
        progress.set(format!(
            "NodeStageVolume {id} (a first stage may format it)"
        ));
        progress
            .track(s.node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: rec.publish_context.clone().into_iter().collect(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: ctx.clone(),
                secrets: secrets.to_csi(),
            }))
            .await
            .map_err(rpc("NodeStageVolume"))?;
    }
    store.save(rec)
}

/// Undoes what a failed publish or stage may have added: the NodePublish
/// of `target` when given and recorded, then — when no target remains and
/// the volume is not staged by hand — the stage and controller publish.
/// The record ends matching what is left.
async fn roll_back(
    s: &mut Session,
    store: &Store,
    rec: &mut Record,
    target: Option<&Path>,
    progress: &Progress,
) -> Result<(), ClientError> {
    let id = rec.volume_id.clone();
    if let Some(target) = target
        && rec.targets.iter().any(|t| t.path == target)
    {
        progress.set(format!("undoing: NodeUnpublishVolume {id}"));
        let r = progress
            .track(
                s.node
                    .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: target.display().to_string(),
                    }),
            )
            .await;
        tolerate_not_found("NodeUnpublishVolume", r)?;
        rec.targets.retain(|t| t.path != target);
    }
    if rec.targets.is_empty() && !rec.manually_staged {
        progress.set(format!("undoing: releasing volume {id}"));
        progress.track(release(s, store, rec)).await?;
        return Ok(());
    }
    store.put(rec)
}

/// `err`, after a roll-back that did (`Ok`) or did not finish.
fn rolled_back(
    err: ClientError,
    undo: Result<(), ClientError>,
    store: &Store,
    id: &str,
) -> ClientError {
    let Err(u) = undo else {
        return err;
    };
    let undo_note = format!(
        "undoing what this call did failed too: {} (what may remain is listed in {})",
        u.report(),
        store
            .record_path(id)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    match err {
        // The plugin was busy with this volume (e.g. still finishing a
        // killed client's call): the record keeps what may remain, and the
        // caller may retry the whole call, so the code stays ABORTED.
        ClientError::Rpc { call, status } if status.code() == tonic::Code::Aborted => {
            ClientError::Rpc {
                call,
                status: tonic::Status::aborted(format!("{}; {undo_note}", status.message())),
            }
        }
        err => ClientError::Local(format!("{}; {undo_note}", err.report())),
    }
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
    /// NodeStageVolume's secrets; never recorded.
    pub node_stage_secrets: Secrets,
}

/// Publishes `spec.id` at `spec.target`: ControllerPublish when offered,
/// NodeStage when needed, NodePublish; each step recorded before it is
/// taken, under the volume's lock. Idempotent. On an error, what this call
/// added is undone (see `roll_back`) and the error returned; a target
/// that was already published is left as it was.
pub async fn publish_volume(
    s: &mut Session,
    spec: &PublishSpec,
) -> Result<PublicationView, ClientError> {
    publish_with(s, spec, &Progress::silent()).await
}

async fn publish_with(
    s: &mut Session,
    spec: &PublishSpec,
    progress: &Progress,
) -> Result<PublicationView, ClientError> {
    let store = Store::open(&spec.staging_root)?;
    let target = std::path::absolute(&spec.target)
        .map_err(io_err(format!("cannot resolve {}", spec.target.display())))?;
    let _lock = store.lock(&spec.id, LOCK_WAIT, progress).await?;
    let mut rec = match store.load(&spec.id)? {
        Some(r) => r,
        None => new_record(&spec.id, &spec.capability),
    };
    let had_target = rec.targets.iter().any(|t| t.path == target);
    match publish_steps(s, &store, &mut rec, spec, &target, progress).await {
        Ok(()) => Ok(publication_view(&store, &rec, Some(target))),
        Err(e) if had_target => Err(e),
        Err(e) => {
            let undo = roll_back(s, &store, &mut rec, Some(&target), progress).await;
            Err(rolled_back(e, undo, &store, &spec.id))
        }
    }
}

async fn publish_steps(
    s: &mut Session,
    store: &Store,
    rec: &mut Record,
    spec: &PublishSpec,
    target: &Path,
    progress: &Progress,
) -> Result<(), ClientError> {
    progress.set(format!("discovering what volume {} needs", spec.id));
    let needs = progress.track(needs(s)).await?;
    let ctx = progress.track(volume_context(s, &spec.id)).await?;
    let cap = spec.capability.csi();
    let inputs = PrepareInputs {
        cap: &cap,
        ctx: &ctx,
        secrets: &spec.node_stage_secrets,
    };
    prepare(s, store, rec, inputs, &needs, progress).await?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("cannot create {}", parent.display())))?;
    }
    if !rec.targets.iter().any(|t| t.path == target) {
        rec.targets.push(TargetRecord {
            path: target.to_owned(),
            readonly: spec.readonly,
        });
        store.save(rec)?;
    }
    progress.set(format!(
        "NodePublishVolume {} at {}",
        spec.id,
        target.display()
    ));
    progress
        .track(
            s.node.node_publish_volume(csi::NodePublishVolumeRequest {
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
            }),
        )
        .await
        .map_err(rpc("NodePublishVolume"))?;
    Ok(())
}

/// Unpublishes `id` from `target` (NOT_FOUND counts as done) and, when the
/// record says this was the last publication of a volume not staged by
/// hand, unstages and controller-unpublishes it; under the volume's lock.
/// Idempotent.
pub async fn unpublish_volume(
    s: &mut Session,
    id: &str,
    target: &Path,
    staging_root: &Path,
) -> Result<UnpublicationView, ClientError> {
    unpublish_with(s, id, target, staging_root, &Progress::silent()).await
}

async fn unpublish_with(
    s: &mut Session,
    id: &str,
    target: &Path,
    staging_root: &Path,
    progress: &Progress,
) -> Result<UnpublicationView, ClientError> {
    let store = Store::open(staging_root)?;
    let target = std::path::absolute(target)
        .map_err(io_err(format!("cannot resolve {}", target.display())))?;
    let _lock = store.lock(id, LOCK_WAIT, progress).await?;
    let recorded_there = store
        .load(id)?
        .is_some_and(|r| r.targets.iter().any(|t| t.path == target));
    let was_published = if recorded_there {
        Some(true)
    } else {
        progress.track(published_at(s, id, &target)).await
    };
    progress.set(format!("NodeUnpublishVolume {id} at {}", target.display()));
    let r = progress
        .track(
            s.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.to_owned(),
                    target_path: target.display().to_string(),
                }),
        )
        .await;
    tolerate_not_found("NodeUnpublishVolume", r)?;
    let mut v = UnpublicationView {
        volume_id: id.to_owned(),
        target: Some(target.clone()),
        recorded: false,
        was_published,
        unstaged: false,
        controller_unpublished: false,
        remaining_targets: vec![],
    };
    if let Some(mut rec) = store.load(id)? {
        v.recorded = true;
        rec.targets.retain(|t| t.path != target);
        store.save(&rec)?;
        if rec.targets.is_empty() && !rec.manually_staged {
            progress.set(format!("unstaging volume {id}"));
            (v.unstaged, v.controller_unpublished) =
                progress.track(release(s, &store, &mut rec)).await?;
        }
        v.remaining_targets = rec.targets;
    }
    Ok(v)
}

/// Whether the plugin has `id` at `path` (a target or its staging path),
/// by NodeGetVolumeStats when the node offers it: NOT_FOUND means it does
/// not. None when that cannot be told.
async fn published_at(s: &mut Session, id: &str, path: &Path) -> Option<bool> {
    if !s.node_rpcs().await.ok()?.contains(&NodeRpc::GetVolumeStats) {
        return None;
    }
    let r = s
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await;
    match r {
        Ok(_) => Some(true),
        Err(st) if st.code() == tonic::Code::NotFound => Some(false),
        Err(_) => None,
    }
}

/// What became of the node's part of an expansion, as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeExpansion {
    /// The controller said the node need not do anything.
    NotRequired,
    /// NodeExpandVolume grew it online where this client has it.
    Done {
        volume_path: PathBuf,
        /// As the node reported it (0: not reported).
        capacity_bytes: i64,
    },
    /// This client has it neither staged nor published: the node grows it
    /// when it is next staged or published.
    AtNextStage,
    /// The plugin's node does not offer EXPAND_VOLUME.
    Unsupported,
}

impl NodeExpansion {
    /// In words, for the table.
    pub fn describe(&self) -> String {
        match self {
            NodeExpansion::NotRequired => "not required".into(),
            NodeExpansion::Done { volume_path, .. } => {
                format!("done (grown online at {})", volume_path.display())
            }
            NodeExpansion::AtNextStage => {
                "at the next stage/publish (not staged or published by this client)".into()
            }
            NodeExpansion::Unsupported => {
                "required, but the plugin's node does not offer EXPAND_VOLUME".into()
            }
        }
    }
}

/// The node's part of an expansion to `bytes`, as the kubelet does it:
/// NodeExpandVolume, online, on a target where this client has the volume
/// published (else its staging path), under the volume's lock.
pub async fn expand_on_node(
    s: &mut Session,
    id: &str,
    bytes: i64,
    staging_root: &Path,
) -> Result<NodeExpansion, ClientError> {
    if !s.node_rpcs().await?.contains(&NodeRpc::ExpandVolume) {
        return Ok(NodeExpansion::Unsupported);
    }
    let root = std::path::absolute(staging_root)
        .map_err(io_err(format!("cannot resolve {}", staging_root.display())))?;
    if !root.join(".publications").is_dir() {
        return Ok(NodeExpansion::AtNextStage);
    }
    let store = Store::open(&root)?;
    let progress = Progress::stderr();
    let _lock = store.lock(id, LOCK_WAIT, &progress).await?;
    progress.clear();
    let Some(rec) = store.load(id)? else {
        return Ok(NodeExpansion::AtNextStage);
    };
    let Some(path) = rec
        .targets
        .first()
        .map(|t| t.path.clone())
        .or_else(|| rec.staging_path.clone())
    else {
        return Ok(NodeExpansion::AtNextStage);
    };
    let cap = CapabilityArgs {
        block: rec.capability.block,
        fs: (!rec.capability.fs.is_empty()).then(|| rec.capability.fs.clone()),
        access_mode: <AccessModeArg as clap::ValueEnum>::from_str(
            &rec.capability.access_mode,
            true,
        )
        .ok(),
    };
    let r = s
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            staging_target_path: rec
                .staging_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            volume_capability: Some(cap.csi()),
            ..Default::default()
        })
        .await
        .map_err(rpc("NodeExpandVolume"))?
        .into_inner();
    Ok(NodeExpansion::Done {
        volume_path: path,
        capacity_bytes: r.capacity_bytes,
    })
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
    let node_stage_secrets = args.secrets.load()?;
    let capability = resolve_capability(&args.staging.staging_root, &args.id, &args.capability)?;
    note_inferred_block(&args.id, &args.capability, &capability);
    let spec = PublishSpec {
        id: args.id,
        target: args.target,
        readonly: args.readonly,
        capability,
        staging_root: args.staging.staging_root,
        node_stage_secrets,
    };
    let progress = Progress::stderr();
    let v = publish_with(s, &spec, &progress).await;
    progress.clear();
    let v = v?;
    emit(format, &v, || publication_table(&v))
}

pub async fn unpublish(
    s: &mut Session,
    args: UnpublishArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let progress = Progress::stderr();
    let v = unpublish_with(
        s,
        &args.id,
        &args.target,
        &args.staging.staging_root,
        &progress,
    )
    .await;
    progress.clear();
    let v = v?;
    if v.was_published == Some(false) {
        eprintln!(
            "stowage: volume {} is not published at {} (nothing to unpublish; exit status 0)",
            v.volume_id,
            args.target.display()
        );
    }
    emit(format, &v, || unpublication_table(&v))
}

/// Says on stderr that a volume is used as a raw block device although
/// `--block` was left out (it was created that way).
fn note_inferred_block(id: &str, given: &CapabilityArgs, used: &CapabilityArgs) {
    if used.block && !given.block {
        eprintln!("stowage: volume {id} is a raw block volume (it was created with --block)");
    }
}

/// `volume stage`: ControllerPublish and NodeStage as needed, kept until
/// `volume unstage`; under the volume's lock. On an error, a stage this
/// call would have added is undone.
pub async fn stage(
    s: &mut Session,
    args: StageArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let capability = resolve_capability(&args.staging.staging_root, &args.id, &args.capability)?;
    note_inferred_block(&args.id, &args.capability, &capability);
    let args = StageArgs { capability, ..args };
    let progress = Progress::stderr();
    let secrets = args.secrets.load()?;
    let v = stage_with(s, &args, &secrets, &progress).await;
    progress.clear();
    let v = v?;
    emit(format, &v, || publication_table(&v))
}

async fn stage_with(
    s: &mut Session,
    args: &StageArgs,
    secrets: &Secrets,
    progress: &Progress,
) -> Result<PublicationView, ClientError> {
    let store = Store::open(&args.staging.staging_root)?;
    let _lock = store.lock(&args.id, LOCK_WAIT, progress).await?;
    let mut rec = match store.load(&args.id)? {
        Some(r) => r,
        None => new_record(&args.id, &args.capability),
    };
    let was_manual = rec.manually_staged;
    rec.manually_staged = true;
    let steps = async {
        progress.set(format!("discovering what volume {} needs", args.id));
        let needs = progress.track(needs(s)).await?;
        let ctx = progress.track(volume_context(s, &args.id)).await?;
        let cap = args.capability.csi();
        let inputs = PrepareInputs {
            cap: &cap,
            ctx: &ctx,
            secrets,
        };
        prepare(s, &store, &mut rec, inputs, &needs, progress).await
    };
    match steps.await {
        Ok(()) => Ok(publication_view(&store, &rec, None)),
        Err(e) => {
            rec.manually_staged = was_manual;
            let undo = roll_back(s, &store, &mut rec, None, progress).await;
            Err(rolled_back(e, undo, &store, &args.id))
        }
    }
}

pub async fn unstage(
    s: &mut Session,
    args: UnstageArgs,
    format: OutputFormat,
) -> Result<(), ClientError> {
    let progress = Progress::stderr();
    let v = unstage_with(s, &args, &progress).await;
    progress.clear();
    let v = v?;
    emit(format, &v, || unpublication_table(&v))
}

async fn unstage_with(
    s: &mut Session,
    args: &UnstageArgs,
    progress: &Progress,
) -> Result<UnpublicationView, ClientError> {
    let store = Store::open(&args.staging.staging_root)?;
    let _lock = store.lock(&args.id, LOCK_WAIT, progress).await?;
    let mut v = UnpublicationView {
        volume_id: args.id.clone(),
        target: None,
        recorded: false,
        was_published: None,
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
        progress.set(format!("unstaging volume {}", args.id));
        (v.unstaged, v.controller_unpublished) =
            progress.track(release(s, &store, &mut rec)).await?;
    }
    Ok(v)
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
                    human_size(n)
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

    /// A call refused as busy stays ABORTED (so callers retry it) even when
    /// undoing it failed too; other failures carry both messages.
    #[test]
    fn a_busy_call_whose_undo_failed_stays_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rpc = |code| ClientError::Rpc {
            call: "NodeStageVolume",
            status: tonic::Status::new(code, "busy"),
        };
        let undo = || Err(rpc(tonic::Code::Aborted));
        match rolled_back(rpc(tonic::Code::Aborted), undo(), &store, "v1") {
            ClientError::Rpc { status, .. } => {
                assert_eq!(status.code(), tonic::Code::Aborted);
                assert!(
                    status
                        .message()
                        .contains("undoing what this call did failed too")
                );
            }
            other => panic!("expected ABORTED, got {other:?}"),
        }
        match rolled_back(rpc(tonic::Code::Internal), undo(), &store, "v1") {
            ClientError::Local(m) => assert!(m.contains("INTERNAL") && m.contains("undoing")),
            other => panic!("expected a local error, got {other:?}"),
        }
        assert!(matches!(
            rolled_back(rpc(tonic::Code::Internal), Ok(()), &store, "v1"),
            ClientError::Rpc { .. }
        ));
    }

    #[test]
    fn safe_ids_are_kept_and_others_hex_encoded() {
        assert_eq!(sanitize_id("pvc-1234_a.b").unwrap(), "pvc-1234_a.b");
        assert_eq!(sanitize_id("a/b").unwrap(), "+612f62");
        assert_eq!(sanitize_id("..").unwrap(), "+2e2e");
        assert_eq!(sanitize_id(".hidden").unwrap(), "+2e68696464656e");
        assert_eq!(sanitize_id("").unwrap(), "+");
        assert!(sanitize_id(&"x/".repeat(200)).is_err());
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
    }

    /// CSI allows ids of up to 128 bytes ("Size Limits"), any bytes: each
    /// has a name that fits a file name with the record's `.json.tmp`, and
    /// ids differing only in their last byte get different names.
    #[test]
    fn every_id_within_the_csi_size_limit_has_a_name() {
        for id in [
            "x".repeat(128),
            "a/".repeat(64),
            format!("{}:", "p".repeat(127)),
            format!("{}/", "p".repeat(122)),
        ] {
            let name = sanitize_id(&id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert!(name.len() + ".json.tmp".len() <= 255, "{name}");
            let mut other = id.clone();
            other.pop();
            other.push('!');
            assert_ne!(sanitize_id(&other).unwrap(), name, "{id}");
            assert!(!name.contains('/'), "{name}");
        }
    }

    #[test]
    fn records_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load("v/1").unwrap(), None);
        let cap = CapabilityArgs {
            block: false,
            fs: Some("ext4".into()),
            access_mode: Some(AccessModeArg::Rwo),
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

    /// A second lock on the same volume waits while the first is held and
    /// fails, naming the lock file, once its bound is spent; another volume
    /// is not held up; dropping the first lets the waiter in.
    #[tokio::test]
    async fn a_volume_lock_excludes_only_its_own_volume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let quiet = Progress::silent();
        let held = store.lock("v/1", Duration::ZERO, &quiet).await.unwrap();

        let err = store
            .lock("v/1", Duration::ZERO, &quiet)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("another stowage client"), "{err}");
        assert!(err.contains("+762f31.lock"), "{err}");

        // A different volume, and a different store on the same root (another
        // process would open its own file the same way), both proceed.
        let other = store.lock("v2", Duration::ZERO, &quiet).await.unwrap();
        drop(other);
        let same_root = Store::open(dir.path()).unwrap();
        assert!(same_root.lock("v/1", Duration::ZERO, &quiet).await.is_err());

        let waiter = store.lock("v/1", Duration::from_secs(60), &quiet);
        tokio::pin!(waiter);
        assert!(
            tokio::time::timeout(LOCK_RETRY * 3, &mut waiter)
                .await
                .is_err(),
            "the waiter got the lock while it was held"
        );
        drop(held);
        waiter.await.expect("the lock once released");
    }

    /// A record that cannot be written (here: a directory is in its place)
    /// leaves no temporary file behind.
    #[test]
    fn a_failed_save_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cap = CapabilityArgs {
            block: false,
            fs: None,
            access_mode: Some(AccessModeArg::Rwo),
        };
        std::fs::create_dir(store.record_path("v").unwrap()).unwrap();
        let err = store.save(&new_record("v", &cap)).unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
        assert!(!dir.path().join(".publications/v.json.tmp").exists());
    }

    /// The records say what a failed call left behind; an empty one goes.
    #[test]
    fn an_empty_record_is_removed_not_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cap = CapabilityArgs {
            block: false,
            fs: None,
            access_mode: Some(AccessModeArg::Rwo),
        };
        let mut rec = new_record("v", &cap);
        rec.staging_path = Some(dir.path().join("v"));
        store.put(&rec).unwrap();
        assert_eq!(store.load("v").unwrap(), Some(rec.clone()));
        rec.staging_path = None;
        store.put(&rec).unwrap();
        assert_eq!(store.load("v").unwrap(), None);
    }

    /// The reconciler may run publications on a multi-threaded runtime.
    #[test]
    fn the_library_futures_are_send() {
        fn is_send<T: Send>(_: T) {}
        let _ = |s: &mut Session, spec: &PublishSpec| is_send(publish_volume(s, spec));
        let _ =
            |s: &mut Session, root: &Path| is_send(unpublish_volume(s, "v", Path::new("/t"), root));
    }
}
