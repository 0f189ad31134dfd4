//! Node operations: stage (attach + filesystem + mount, or bind a dir),
//! publish (bind staging → target), their inverses, stats and health.
//! Each step checks the mount table first, so repeats are no-ops and a
//! mount stowage did not make is never unmounted. Staging paths and targets
//! are resolved without following symlinks and acted on through the
//! resulting descriptors ([`AnchoredPath`]); they never overlap the pool,
//! the state directory or each other. After a restart the node restores
//! what its records say and removes loop devices nothing claims.

use crate::volume::BackendKind;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::capability::{AccessType, Capability};
use super::error::{Error, Result};
use super::id::{Uuid, VolumeId};
use super::inflight::{InFlight, InFlightGuard};
use super::record::{FuseStaging, NodeRecord, NodeVolumeRecord, Publication, Staging};
use super::{FsType, TOPOLOGY_NODE_KEY};
use crate::backend::object::mounter::{Health, MountSpec, Mounter};
use crate::backend::object::{Credentials, Location};
use crate::backend::profile::StagingKind;
use crate::backend::{Attached, Backends};
use crate::os::fs::{AnchoredPath, FileInfo, PathFd, PathKind, identity};
use crate::os::loopdev::LoopDevice;
use crate::os::mount::{self, MountOptions};
use crate::os::mountinfo::{MountEntry, MountTable, Propagation};
use crate::os::{self, filesystem};
use crate::state::{Durability, Store, Table};

/// A validated NodeStageVolume.
#[derive(Debug, Clone)]
pub struct StageVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    /// Grow the filesystem to the device after mounting (a restore or
    /// clone into a larger volume).
    pub grow_fs: bool,
    /// The volume_context (where an object volume lives).
    pub volume_context: BTreeMap<String, String>,
    /// The node-stage secrets (an object volume's credentials): never
    /// logged or recorded.
    pub secrets: Secrets,
    /// VOLUME_MOUNT_GROUP: the group the volume's files belong to.
    pub mount_group: Option<u32>,
    /// What ControllerPublishVolume returned (a replicated volume's record
    /// and the addresses of its copies).
    pub publish_context: BTreeMap<String, String>,
}

/// CSI secrets, whose Debug shows only the keys.
#[derive(Clone, Default)]
pub struct Secrets(pub BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// A validated NodePublishVolume.
#[derive(Debug, Clone)]
pub struct PublishVolume {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub staging_path: Option<PathBuf>,
    pub capability: Capability,
    pub read_only: bool,
    /// VOLUME_MOUNT_GROUP: the group the publication's pod writes as.
    pub mount_group: Option<u32>,
}

/// One usage figure of NodeGetVolumeStats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Bytes {
        total: u64,
        available: u64,
        used: u64,
    },
    Inodes {
        total: u64,
        available: u64,
        used: u64,
    },
}

/// Health as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCondition {
    pub abnormal: bool,
    pub message: String,
}

/// NodeGetVolumeStats' answer.
#[derive(Debug, Clone)]
pub struct VolumeStats {
    pub usage: Vec<Usage>,
    pub condition: NodeCondition,
}

/// What the node holds right now (for metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInventory {
    /// Volumes staged on this node.
    pub staged: u64,
    /// Publications (volume, target) on this node.
    pub published: u64,
    /// Volumes held by an operation in flight.
    pub in_flight: u64,
    /// Loop devices attached to images of this pool, as the kernel lists
    /// them (None when the list cannot be read).
    pub loop_devices: Option<u64>,
}

/// The node side of the driver.
#[derive(Debug)]
pub struct Node {
    node_id: String,
    max_volumes_per_node: u64,
    backends: Arc<Backends>,
    store: Store,
    inflight: InFlight,
    records: Mutex<HashMap<Uuid, NodeVolumeRecord>>,
    /// The pool, its image file and the state directory (as configured
    /// and resolved): no staging path or target may be at, inside or above
    /// them.
    reserved: Vec<(&'static str, PathBuf)>,
    /// See [`Node::claim`].
    claims: Mutex<()>,
    object: ObjectMounts,
    /// The engines of replicated volumes staged here.
    replicated: Arc<crate::backend::replicated::engines::Engines>,
}

/// The FUSE mounts of object volumes on this node.
#[derive(Debug)]
struct ObjectMounts {
    mounter: Mounter,
    /// Private mount points (`<state>/object-mounts/<uuid>`), bound onto
    /// staging paths: the daemon never sees a path from a request.
    mounts_dir: PathBuf,
    /// The credentials of staged object volumes, in memory only (read
    /// back from a live daemon's environment after a restart), to mount
    /// again when a daemon dies.
    credentials: Mutex<HashMap<Uuid, Credentials>>,
}

impl ObjectMounts {
    fn mount_point(&self, uuid: Uuid) -> PathBuf {
        self.mounts_dir.join(uuid.to_hex())
    }

    fn credentials(&self) -> MutexGuard<'_, HashMap<Uuid, Credentials>> {
        self.credentials.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock(
    m: &Mutex<HashMap<Uuid, NodeVolumeRecord>>,
) -> MutexGuard<'_, HashMap<Uuid, NodeVolumeRecord>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Undo steps for a partly done operation; run in reverse unless disarmed.
struct Rollback(Vec<Box<dyn FnOnce()>>);

impl Rollback {
    fn new() -> Self {
        Self(Vec::new())
    }
    fn push(&mut self, f: impl FnOnce() + 'static) {
        self.0.push(Box::new(f));
    }
    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
}

/// Why a request path cannot be resolved without following a symlink.
fn resolve_error(field: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |e| match e.raw_os_error() {
        Some(libc::ELOOP) => Error::invalid(
            field,
            format!(
                "{} goes through a symlink; give the real path",
                path.display()
            ),
        ),
        Some(libc::ENOTDIR) => Error::invalid(
            field,
            format!("a component of {} is not a directory", path.display()),
        ),
        Some(libc::ENOENT) => Error::invalid(
            field,
            format!("the parent directory of {} does not exist", path.display()),
        ),
        _ => Error::io("resolve", path)(e),
    }
}

/// Resolves the parent of a request path from `/` without following any
/// symlink; every later step on the path goes through the result.
fn anchor(path: &Path, field: &'static str) -> Result<AnchoredPath> {
    AnchoredPath::new(path).map_err(resolve_error(field, path))
}

/// A mount found stacked at a path: its mountinfo entry and what fstat says
/// about its root.
#[derive(Debug, Clone)]
struct Found {
    entry: MountEntry,
    root: FileInfo,
}

/// The topmost mount whose mount point is `at`, if one is there.
fn mount_at(at: &AnchoredPath) -> Result<Option<Found>> {
    let fd = match at.open() {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => return Ok(None),
        Err(e) => return Err(Error::io("open", at.path())(e)),
    };
    let io = |e| Error::io("inspect", at.path())(e);
    let id = fd.mount_id().map_err(io)?;
    if id == at.parent_mount_id().map_err(io)? {
        return Ok(None);
    }
    let root = fd.info().map_err(io)?;
    drop(fd);
    Ok(MountTable::read()?
        .by_id(id)
        .cloned()
        .map(|entry| Found { entry, root }))
}

/// Unmounts `e` at its current mount point, reached without following a
/// symlink, and only while it is still the topmost mount there (its id is
/// checked just before). `subject` names what it belongs to in errors.
/// EBUSY is [`Error::Busy`]; a mount covered by another is a precondition.
fn unmount_entry(subject: &dyn std::fmt::Display, e: &MountEntry) -> Result<()> {
    let mp = &e.mount_point;
    let at = AnchoredPath::new(mp).map_err(|err| {
        Error::precondition(
            subject,
            format!(
                "cannot reach its mount at {} without following a symlink ({err})",
                mp.display()
            ),
        )
    })?;
    match mount_at(&at)? {
        Some(f) if f.entry.mount_id == e.mount_id => {}
        Some(_) => {
            return Err(Error::precondition(
                subject,
                format!(
                    "its mount at {} is covered by a mount that is not this volume; unmount that first",
                    mp.display()
                ),
            ));
        }
        None if MountTable::read()?.by_id(e.mount_id).is_none() => return Ok(()),
        None => {
            return Err(Error::precondition(
                subject,
                format!("cannot reach its mount at {}", mp.display()),
            ));
        }
    }
    match mount::unmount_anchored(&at) {
        Ok(()) => Ok(()),
        Err(err) => match err.errno() {
            Some(nix::errno::Errno::EBUSY) => {
                Err(Error::Busy(format!("the mount at {}", mp.display())))
            }
            // Gone between the check and the call.
            Some(nix::errno::Errno::EINVAL) => Ok(()),
            _ => Err(err.into()),
        },
    }
}

/// Lazily detaches the mount `mount_id` at `path` (a bind of a FUSE mount
/// whose daemon died: it cannot be opened, only detached), if the mount
/// table still shows it there. The last component is not followed.
/// (`os::mount` unmounts through descriptors, which a dead FUSE mount
/// cannot give: this detach is by path.)
#[allow(clippy::disallowed_methods)]
fn detach_stale(path: &Path, mount_id: Option<u32>) -> Result<()> {
    let Some(mid) = mount_id else {
        return Ok(());
    };
    let table = MountTable::read()?;
    if table.by_id(mid).is_some_and(|e| e.mount_point == path) {
        match nix::mount::umount2(
            path,
            nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
        ) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(errno) => {
                return Err(Error::io("detach", path)(
                    std::io::Error::from_raw_os_error(errno as i32),
                ));
            }
        }
    }
    Ok(())
}

/// A replicated engine that could not start or stop: fenced (published
/// elsewhere) is FAILED_PRECONDITION, copies out of reach UNAVAILABLE.
fn replication_error(id: &VolumeId, e: crate::backend::replicated::engines::EngineError) -> Error {
    use crate::backend::replicated::driver::DriverError;
    use crate::backend::replicated::engines::EngineError as E;
    match e {
        E::Context(_) => Error::invalid("publish_context", e.to_string()),
        E::NoCluster | E::NotOwner { .. } | E::Driver(DriverError::Fenced { .. }) => {
            Error::precondition(id, e.to_string())
        }
        E::Driver(DriverError::StartTimeout { .. } | DriverError::AllCopiesLost { .. }) => {
            Error::Unavailable(format!("volume {id}: {e}"))
        }
        E::Driver(_) | E::Fuse(_) | E::Healing(_) | E::Fenced(_) => Error::Io {
            what: "replicated engine",
            path: PathBuf::from(id.uuid.to_hex()),
            err: std::io::Error::other(e.to_string()),
        },
    }
}

/// A mounter failure as the CO should see it: a missing mounter or
/// /dev/fuse is a precondition of the node; S3 refusing the credentials or
/// the bucket shows in the daemon's log tail.
fn object_mount_error(id: &VolumeId, e: crate::backend::object::mounter::MounterError) -> Error {
    use crate::backend::object::mounter::MounterError as M;
    match e {
        M::InvalidSpec { .. } | M::InvalidKey(_) => Error::invalid("volume_context", e.to_string()),
        M::Busy { .. } => Error::Busy(e.to_string()),
        // s3fs mounts first and checks the key after: the S3 refusal is in
        // its log.
        M::MountFailed { ref log_tail, .. }
            if [
                "invalid credentials",
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ]
            .iter()
            .any(|w| log_tail.contains(w)) =>
        {
            Error::ObjectStore(crate::backend::object::s3::S3Error {
                kind: crate::backend::object::s3::S3ErrorKind::PermissionDenied,
                message: e.to_string(),
            })
        }
        _ => Error::precondition(id, e.to_string()),
    }
}

/// The filesystem mount a block staging needs.
enum StagingMount {
    /// This volume is mounted there already (made before a crash).
    Adopt(u32),
    /// Mount onto this directory, opened before anything slow runs.
    Make(PathFd),
}

/// Whether two paths are equal or one is inside the other.
fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Which kind of request path is being claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathRole {
    Staging,
    Target,
}

impl PathRole {
    fn field(self) -> &'static str {
        match self {
            PathRole::Staging => "staging_target_path",
            PathRole::Target => "target_path",
        }
    }
}

impl Node {
    /// Loads node records, registers this node for the controller, restores
    /// stagings and publications whose mounts or loop devices were lost
    /// (reboot, crash), and detaches loop devices no record claims.
    pub fn open(
        node_id: &str,
        max_volumes_per_node: u64,
        backends: Arc<Backends>,
        store: Store,
    ) -> Result<Self> {
        let mut records = HashMap::new();
        for (_, rec) in store.load_all::<NodeVolumeRecord>(Table::NodeVolumes)? {
            records.insert(rec.id.uuid, rec);
        }
        store.put(
            Table::Nodes,
            node_id,
            &NodeRecord {
                node_id: node_id.to_owned(),
                topology: BTreeMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())]),
            },
        )?;
        // Request paths are compared with these as given and as resolved
        // (requests name real paths: symlinks in them are refused).
        let mut reserved = Vec::new();
        for (what, dir) in [
            ("the pool", backends.pool.clone()),
            (
                "the pool image",
                crate::os::pool_image::image_path(&backends.pool),
            ),
            ("the state directory", store.root().to_owned()),
        ] {
            if let Ok(real) = dir.canonicalize()
                && real != dir
            {
                reserved.push((what, real));
            }
            reserved.push((what, dir));
        }
        let object = ObjectMounts {
            mounter: Mounter::new(store.root().join("object")),
            mounts_dir: store.root().join("object-mounts"),
            credentials: Mutex::new(HashMap::new()),
        };
        let replicated = Arc::new(crate::backend::replicated::engines::Engines::new(
            node_id,
            store.root().join("replicated"),
        ));
        let node = Self {
            node_id: node_id.to_owned(),
            max_volumes_per_node,
            backends,
            store,
            inflight: InFlight::default(),
            records: Mutex::new(records),
            reserved,
            claims: Mutex::new(()),
            object,
            replicated,
        };
        match node.object.mounter.check_installed() {
            Ok(version) => {
                tracing::info!(mounter = "s3fs", %version, "object volumes can be mounted")
            }
            Err(e) => tracing::warn!(error = %e, "object volumes cannot be staged on this node"),
        }
        node.restore();
        node.sweep_loop_devices()?;
        node.log_propagation();
        Ok(node)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The engines of replicated volumes on this node.
    pub fn replicated(&self) -> &Arc<crate::backend::replicated::engines::Engines> {
        &self.replicated
    }

    pub fn max_volumes_per_node(&self) -> u64 {
        self.max_volumes_per_node
    }

    pub fn topology(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TOPOLOGY_NODE_KEY.to_owned(), self.node_id.clone())])
    }

    fn guard(&self, id: &VolumeId) -> Result<InFlightGuard> {
        let key = format!("vol:{id}");
        self.inflight
            .try_acquire(key.clone())
            .ok_or(Error::Busy(key))
    }

    /// Parses an ID naming a volume on this node.
    fn local_id(&self, raw: &str) -> Option<VolumeId> {
        VolumeId::parse(raw)
            .filter(|id| id.node == self.node_id || !id.backend.profile().node_local())
    }

    fn record(&self, id: &VolumeId) -> NodeVolumeRecord {
        lock(&self.records)
            .get(&id.uuid)
            .filter(|r| r.id == *id)
            .cloned()
            .unwrap_or_else(|| NodeVolumeRecord {
                id: id.clone(),
                staging: None,
                publications: BTreeMap::new(),
            })
    }

    fn save(&self, rec: NodeVolumeRecord) -> Result<()> {
        self.save_with(rec, Durability::Immediate)
    }

    /// Records `rec`; `Deferred` is for records whose loss on power
    /// failure is harmless: stage/publish intents (a reboot loses their
    /// mounts too) and what a restart can find again from the system.
    fn save_with(&self, rec: NodeVolumeRecord, durability: Durability) -> Result<()> {
        let key = rec.id.uuid.to_hex();
        if rec.is_empty() {
            self.store.delete(Table::NodeVolumes, &key)?;
            lock(&self.records).remove(&rec.id.uuid);
        } else {
            self.store
                .put_with(Table::NodeVolumes, &key, &rec, durability)?;
            lock(&self.records).insert(rec.id.uuid, rec);
        }
        Ok(())
    }

    fn image(&self, id: &VolumeId) -> PathBuf {
        if id.backend == BackendKind::Replicated {
            return self.replicated.image(id.uuid);
        }
        self.backends.block.image(id.uuid)
    }

    /// Held while a request path is checked against the recorded ones and
    /// its intent recorded, so two volumes cannot claim overlapping paths
    /// at once.
    fn claim(&self) -> MutexGuard<'_, ()> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses a staging path or target that is at, inside or above the
    /// pool (or its image file) or the state directory (INVALID_ARGUMENT:
    /// such a path is never usable), or a staging path or publication
    /// target recorded on this node, of any volume (FAILED_PRECONDITION:
    /// usable once that one is gone). A mount there would hide, or be hidden by, the other, and
    /// unpublish or unstage could no longer find and remove it. The same
    /// path in the same role for the same volume is the idempotent repeat.
    fn check_overlap(&self, id: &VolumeId, path: &Path, role: PathRole) -> Result<()> {
        let field = role.field();
        for (what, dir) in &self.reserved {
            if overlaps(path, dir) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} overlaps {what} {}; volumes cannot be mounted there",
                        path.display(),
                        dir.display()
                    ),
                ));
            }
        }
        let records = lock(&self.records);
        for rec in records.values() {
            let mine = rec.id == *id;
            let staging = rec.staging.iter().map(|s| (PathRole::Staging, &s.path));
            let targets = rec.publications.keys().map(|t| (PathRole::Target, t));
            for (r, other) in staging.chain(targets) {
                if mine && r == role && other == path {
                    continue;
                }
                if overlaps(path, other) {
                    let what = match r {
                        PathRole::Staging => "the staging path",
                        PathRole::Target => "the target",
                    };
                    return Err(Error::precondition(
                        id,
                        format!(
                            "{} overlaps {what} {} of volume {}",
                            path.display(),
                            other.display(),
                            rec.id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves `path` without following symlinks and makes sure it is a
    /// directory, creating it when `create`.
    fn anchor_dir(&self, path: &Path, field: &'static str, create: bool) -> Result<AnchoredPath> {
        let at = anchor(path, field)?;
        match at.kind().map_err(Error::io("inspect", path))? {
            PathKind::Directory => Ok(at),
            PathKind::Missing if create => {
                at.create_dir(0o750)
                    .map_err(Error::io("create directory", path))?;
                Ok(at)
            }
            PathKind::Missing => Err(Error::invalid(
                field,
                format!("{} does not exist", path.display()),
            )),
            PathKind::Symlink => Err(Error::invalid(
                field,
                format!(
                    "{} is a symlink; refusing to mount through it",
                    path.display()
                ),
            )),
            other => Err(Error::invalid(
                field,
                format!("{} is not a directory ({other:?})", path.display()),
            )),
        }
    }

    /// Opens the directory at `at` to mount onto it; nothing may be mounted
    /// there already.
    fn open_mount_point(
        &self,
        id: &VolumeId,
        at: &AnchoredPath,
        field: &'static str,
    ) -> Result<PathFd> {
        let path = at.path();
        let fd = at.open().map_err(resolve_error(field, path))?;
        let io = |e| Error::io("inspect", path)(e);
        if fd.info().map_err(io)?.kind != PathKind::Directory {
            return Err(Error::invalid(
                field,
                format!("{} is not a directory", path.display()),
            ));
        }
        if fd.mount_id().map_err(io)? != at.parent_mount_id().map_err(io)? {
            return Err(Error::precondition(
                id,
                format!(
                    "{} already has a mount that is not this volume",
                    path.display()
                ),
            ));
        }
        Ok(fd)
    }

    /// Whether the root of a mount (as fstat saw it) is this volume: the
    /// dir volume's directory, the filesystem on one of the loop devices of
    /// its image, or (`raw`) one of those device nodes.
    fn is_volume_root(&self, id: &VolumeId, root: &FileInfo, raw: bool) -> bool {
        let devices = || self.devices(id).into_iter().filter_map(|d| d.rdev().ok());
        if raw {
            return matches!(root.kind, PathKind::BlockDevice { rdev } if devices().any(|d| d == rdev));
        }
        root.kind == PathKind::Directory
            && match id.backend.profile().staging() {
                StagingKind::BindDirectory | StagingKind::Fuse => {
                    identity(&self.bind_source(id)).ok() == Some((root.dev, root.ino))
                }
                StagingKind::Device => devices().any(|d| d == root.dev),
            }
    }

    /// The ids of every mount in `table` that shows this volume: binds of
    /// the dir volume's directory; mounts of the filesystem on its loop
    /// devices and binds of those device nodes.
    fn volume_mounts(&self, id: &VolumeId, table: &MountTable) -> HashSet<u32> {
        let mut out = HashSet::new();
        match id.backend.profile().staging() {
            StagingKind::BindDirectory | StagingKind::Fuse => {
                let dir = self.bind_source(id);
                let dir = dir.canonicalize().unwrap_or(dir);
                // Not the object volume's own FUSE mount at its private
                // mount point: only what shows it elsewhere.
                out.extend(
                    table
                        .mounts_showing(&dir)
                        .iter()
                        .filter(|e| e.mount_point != dir)
                        .map(|e| e.mount_id),
                );
            }
            StagingKind::Device => {
                for d in self.devices(id) {
                    if let Ok(rdev) = d.rdev() {
                        out.extend(table.of_device(rdev).map(|e| e.mount_id));
                    }
                    out.extend(table.mounts_showing(&d.path()).iter().map(|e| e.mount_id));
                }
            }
        }
        out
    }

    /// Checks the mount just made on `target` (opened from `at` before
    /// mounting): it must show this volume and sit exactly at `at`'s path.
    /// Returns its id and a descriptor on its root. A mount that landed
    /// elsewhere (a component of the path was renamed or swapped for a
    /// symlink meanwhile) is unmounted again, and the request refused.
    fn landed(
        &self,
        id: &VolumeId,
        at: &AnchoredPath,
        target: &PathFd,
        raw: bool,
        field: &'static str,
    ) -> Result<(u32, PathFd)> {
        let path = at.path();
        let io = |e| Error::io("inspect", path)(e);
        let under = target.mount_id().map_err(io)?;
        let refused = || {
            Error::invalid(
                field,
                format!(
                    "{} changed while it was being mounted (a component was renamed or replaced); nothing was left mounted",
                    path.display()
                ),
            )
        };
        match mount_at(at)? {
            Some(f) if f.entry.parent_id == under && self.is_volume_root(id, &f.root, raw) => {
                if f.entry.mount_point == path && !f.entry.deleted {
                    let root = at.open().map_err(io)?;
                    if root.mount_id().map_err(io)? == f.entry.mount_id {
                        return Ok((f.entry.mount_id, root));
                    }
                }
                tracing::warn!(volume = %id, path = %path.display(), landed = %f.entry.mount_point.display(), "mount landed elsewhere; undoing it");
                if let Err(e) = mount::unmount_anchored(at) {
                    tracing::error!(volume = %id, error = %e, "cannot undo a misplaced mount");
                    return Err(e.into());
                }
                Err(refused())
            }
            _ => {
                // The mounted-on directory itself left its name: find the
                // mount on it where the directory is now.
                let now = target.current_path().map_err(io)?;
                let table = MountTable::read()?;
                let ours = self.volume_mounts(id, &table);
                for e in table.entries.iter().rev().filter(|e| {
                    e.parent_id == under && e.mount_point == now && ours.contains(&e.mount_id)
                }) {
                    tracing::warn!(volume = %id, path = %path.display(), landed = %e.mount_point.display(), "mount landed elsewhere; undoing it");
                    unmount_entry(id, e)?;
                }
                Err(refused())
            }
        }
    }

    /// This volume's mount at `path` (topmost there, reached without
    /// symlinks), with what its root is.
    fn volume_mount_at(&self, id: &VolumeId, path: &Path, raw: bool) -> Option<Found> {
        let at = AnchoredPath::new(path).ok()?;
        mount_at(&at)
            .ok()
            .flatten()
            .filter(|f| f.entry.mount_point == path && self.is_volume_root(id, &f.root, raw))
    }

    /// Whether `path` is a staging path or target recorded on this node.
    fn is_recorded_path(&self, path: &Path) -> bool {
        lock(&self.records).values().any(|r| {
            r.staging.as_ref().is_some_and(|s| s.path == path) || r.publications.contains_key(path)
        })
    }

    /// Removes the mounts made at `path` for a staging or publication: the
    /// recorded mount (`mount_id`) wherever a rename has moved it, then any
    /// mount of this volume still stacked at `path`. Fails, leaving the
    /// rest, while a mount made for it remains: covered by another mount
    /// (FAILED_PRECONDITION), busy ([`Error::Busy`]), or, with no recorded
    /// id, when `path` now goes through a symlink (it may have moved with a
    /// renamed parent and cannot be told apart).
    fn unmount_made(
        &self,
        id: &VolumeId,
        path: &Path,
        mount_id: Option<u32>,
        field: &'static str,
    ) -> Result<()> {
        if let Some(mid) = mount_id {
            let table = MountTable::read()?;
            // An id left stale by a reboot may name another recorded mount
            // of the volume now: never that one.
            if let Some(e) = table.by_id(mid)
                && self.volume_mounts(id, &table).contains(&mid)
                && (e.mount_point == path || !self.is_recorded_path(&e.mount_point))
            {
                unmount_entry(id, e)?;
            }
        }
        let at = match AnchoredPath::new(path) {
            Ok(at) => at,
            Err(e)
                if mount_id.is_none()
                    && matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) =>
            {
                return Err(resolve_error(field, path)(e));
            }
            // Gone, or through a symlink now: nothing can be mounted at
            // that path (mount points are reached without symlinks).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(Error::io("resolve", path)(e)),
        };
        // Bounded: each pass removes one mount or returns.
        for _ in 0..16 {
            let Some(f) = mount_at(&at)? else {
                return Ok(());
            };
            let table = MountTable::read()?;
            let ours = self.volume_mounts(id, &table);
            if ours.contains(&f.entry.mount_id) {
                unmount_entry(id, &f.entry)?;
                continue;
            }
            if table
                .all_at(path)
                .any(|e| e.mount_id != f.entry.mount_id && ours.contains(&e.mount_id))
            {
                return Err(Error::precondition(
                    id,
                    format!(
                        "its mount at {} is covered by a mount that is not this volume; unmount that first",
                        path.display()
                    ),
                ));
            }
            return Ok(());
        }
        Err(Error::precondition(
            id,
            format!("too many mounts are stacked at {}", path.display()),
        ))
    }

    /// NodeStageVolume. Idempotent for the same path and capability; a
    /// different path or capability is [`Error::Incompatible`]. The staging
    /// path may not overlap the pool, the state directory or another
    /// staging path or target (`Node::check_overlap`), and is created
    /// (if missing) and mounted on without following a symlink.
    pub fn stage(&self, req: StageVolume) -> Result<()> {
        let id = self
            .local_id(&req.volume_id)
            .ok_or_else(|| Error::VolumeNotFound(req.volume_id.clone()))?;
        let _g = self.guard(&id)?;
        req.capability
            .supported_by(id.backend)
            .map_err(|r| Error::invalid("volume_capability", r))?;
        if !self.backends.store(id.backend).exists(id.uuid) {
            return Err(Error::VolumeNotFound(req.volume_id));
        }
        let rec = self.record(&id);
        if let Some(st) = &rec.staging {
            if st.path != req.staging_path || st.capability != req.capability {
                return Err(Error::Incompatible {
                    volume: id.to_string(),
                    what: "staged",
                    reason: format!(
                        "staged at {} with another capability or path",
                        st.path.display()
                    ),
                });
            }
            if self.staging_intact(&id, st) {
                // The group again: a first stage cut short after its mount
                // may not have applied it, and it is idempotent.
                return self.mount_group_of(&id, st, req.mount_group);
            }
            tracing::warn!(volume = %id, "staging found incomplete; staging again");
            if id.backend == BackendKind::Replicated {
                return self.recover_replicated(&id, req);
            }
        }
        self.stage_fresh(&id, req)
    }

    /// The part of NodeStageVolume after the checks (the caller holds the
    /// volume's in-flight guard).
    fn stage_fresh(&self, id: &VolumeId, req: StageVolume) -> Result<()> {
        let id = id.clone();
        let mut rec = self.record(&id);
        // Record the intent first: a crash between the mount and the final
        // record then leaves a record that restart (or unstage) completes
        // or undoes, never an unrecorded mount. The write reaches the log
        // (page cache) before the mount, so it survives kill -9; it is not
        // flushed, because only a power loss can lose it, and that loses
        // the mount and loop device with it (the CO stages again after a
        // reboot). Removals (unstage, unpublish) are flushed: losing one
        // would resurrect a mount the CO was told is gone.
        let before = rec.clone();
        let previous = rec.staging.clone();
        let claim = self.claim();
        self.check_overlap(&id, &req.staging_path, PathRole::Staging)?;
        let at = self.anchor_dir(&req.staging_path, "staging_target_path", true)?;
        rec.staging = Some(Staging {
            path: req.staging_path.clone(),
            capability: req.capability.clone(),
            device: previous.as_ref().and_then(|p| p.device.clone()),
            mounted: !(id.backend.profile().staging() == StagingKind::Device
                && req.capability.is_block()),
            mount_id: None,
            fuse: previous.as_ref().and_then(|p| p.fuse.clone()),
        });
        self.save_with(rec.clone(), Durability::Deferred)?;
        drop(claim);
        // An object volume: its FUSE mount first (the staging binds it).
        let (fuse, fresh) = if id.backend.profile().staging() == StagingKind::Fuse {
            match self.mount_object(&id, &req, previous.as_ref()) {
                Ok((fuse, fresh)) => (Some(fuse), fresh),
                Err(e) => {
                    let _ = self.save(before);
                    return Err(e);
                }
            }
        } else {
            (None, false)
        };
        let staging = match self.do_stage(
            &id,
            &at,
            &req.capability,
            previous.as_ref(),
            req.grow_fs,
            Some(&req.publish_context),
        ) {
            Ok(s) => s,
            Err(e) => {
                if let Some(f) = fuse.as_ref().filter(|_| fresh) {
                    let _ = self.object.mounter.unmount(&f.daemon.target, &f.daemon);
                    self.object.credentials().remove(&id.uuid);
                }
                let _ = self.save(before);
                return Err(e);
            }
        };
        let mut staging = staging;
        if fuse.is_some() {
            staging.fuse = fuse;
        } else if let Some(gid) = req.mount_group {
            self.apply_mount_group(&id, &staging, gid)?;
        }
        rec.staging = Some(staging);
        self.save_with(rec, Durability::Deferred)?;
        tracing::info!(volume = %id, path = %req.staging_path.display(), "volume staged");
        Ok(())
    }

    /// NodeStageVolume of a replicated volume whose engine is gone (the node
    /// plugin restarted; the kernel fails I/O on the loop device over the
    /// dead FUSE file at once): detaches the dead mounts, loop devices and
    /// FUSE mount, stages anew with a new engine (the filesystem replays
    /// its journal; ext4 is checked first) and binds the recorded
    /// publications again.
    fn recover_replicated(&self, id: &VolumeId, mut req: StageVolume) -> Result<()> {
        let rec = self.record(id);
        self.clear_dead_replicated(id, &rec)?;
        let mut cleared = rec.clone();
        if let Some(st) = cleared.staging.as_mut() {
            st.mount_id = None;
            st.device = None;
        }
        let publications = std::mem::take(&mut cleared.publications);
        cleared.staging = None;
        self.save(cleared)?;
        req.grow_fs = false;
        self.stage_fresh(id, req)?;
        let mut rec = self.record(id);
        let Some(st) = rec.staging.clone() else {
            return Err(Error::precondition(id, "staging vanished while recovering"));
        };
        for (target, p) in publications {
            let again = anchor(&target, "target_path")
                .and_then(|at| self.do_publish(id, &st, &at, &p.capability, p.read_only));
            match again {
                Ok(mut new) => {
                    new.created_target |= p.created_target;
                    new.created_inode = new.created_inode.or(p.created_inode);
                    rec.publications.insert(target.clone(), new);
                    tracing::info!(volume = %id, target = %target.display(), "publication bound again after recovery");
                }
                Err(e) => {
                    tracing::error!(volume = %id, target = %target.display(), error = %e, "cannot bind the publication again");
                    rec.publications.insert(target, p);
                }
            }
        }
        self.save(rec)?;
        tracing::info!(volume = %id, "replicated volume recovered with a new engine");
        Ok(())
    }

    /// What is wrong with a staged replicated volume, as its engine sees it.
    fn replicated_problems(&self, id: &VolumeId) -> Vec<String> {
        use crate::backend::replicated::engine::{CopyPhase, EngineState};
        let Some(status) = self.replicated.status(id.uuid) else {
            return vec![
                "the replicated engine is not running (the node plugin restarted); I/O fails until NodeStageVolume starts it again".to_owned(),
            ];
        };
        let mut out = Vec::new();
        if status.stopped || status.state != EngineState::Running {
            out.push(format!("the engine is {:?}", status.state));
        }
        let total = status.copies.len();
        let in_sync = status
            .copies
            .iter()
            .filter(|c| c.phase == CopyPhase::InSync && !c.failing)
            .count();
        if in_sync < total {
            let behind: Vec<String> = status
                .copies
                .iter()
                .filter(|c| c.phase != CopyPhase::InSync || c.failing)
                .map(|c| format!("{} {:?} ({} regions to rebuild)", c.node, c.phase, c.dirty))
                .collect();
            out.push(format!(
                "{in_sync} of {total} copies in sync: {}",
                behind.join(", ")
            ));
        }
        out
    }

    /// Lazily detaches what a dead engine left: the publications' and the
    /// staging's mounts (they show a filesystem whose device fails every
    /// I/O), the loop devices on its FUSE file and the FUSE mount.
    fn clear_dead_replicated(&self, id: &VolumeId, rec: &NodeVolumeRecord) -> Result<()> {
        for (target, p) in &rec.publications {
            detach_stale(target, p.mount_id)?;
        }
        if let Some(st) = &rec.staging {
            detach_stale(&st.path, st.mount_id)?;
        }
        for d in self.devices(id) {
            d.detach()?;
        }
        self.replicated
            .clear_dead(id.uuid)
            .map_err(|e| replication_error(id, e))
    }

    /// What the staging path of a dir or object volume binds: the dir
    /// volume's directory, or the object volume's private FUSE mount.
    fn bind_source(&self, id: &VolumeId) -> PathBuf {
        match id.backend.profile().staging() {
            StagingKind::Fuse => self.object.mount_point(id.uuid),
            _ => self.backends.dir.path(id.uuid),
        }
    }

    /// Makes sure the object volume's FUSE daemon serves its private mount
    /// point: adopts the recorded one while it is healthy, mounts it
    /// otherwise (first stage, or its daemon died). Returns the FUSE record
    /// and whether this call started the daemon.
    fn mount_object(
        &self,
        id: &VolumeId,
        req: &StageVolume,
        previous: Option<&Staging>,
    ) -> Result<(FuseStaging, bool)> {
        let (loc, _mounter) = Location::from_context(&req.volume_context)
            .map_err(|r| Error::invalid("volume_context", r))?;
        let creds = crate::backend::object::credentials_from_secrets(&req.secrets.0, "node-stage")
            .map_err(|r| Error::invalid("secrets", r))?;
        let spec = MountSpec {
            bucket: loc.bucket.clone(),
            prefix: (!loc.prefix.is_empty()).then(|| loc.prefix.trim_end_matches('/').to_owned()),
            endpoint: loc.endpoint.clone(),
            region: loc.region.clone(),
            read_only: req.capability.access_mode.is_read_only(),
            uid: None,
            gid: req.mount_group,
            umask: None,
            allow_other: true,
        };
        if let Some(f) = previous.and_then(|p| p.fuse.as_ref())
            && f.spec == spec
            && self.object.mounter.adopt(&f.daemon) == Health::Healthy
        {
            self.object.credentials().insert(id.uuid, creds);
            return Ok((f.clone(), false));
        }
        let point = self.object.mount_point(id.uuid);
        self.prepare_mount_point(&point)?;
        if let Some(f) = previous.and_then(|p| p.fuse.as_ref()) {
            // A dead mount (or one of other options): take it away first.
            self.object
                .mounter
                .unmount(&f.daemon.target, &f.daemon)
                .map_err(|e| {
                    Error::precondition(id, format!("cannot remove the old mount: {e}"))
                })?;
        }
        let daemon = self
            .object
            .mounter
            .mount(&id.uuid.to_hex(), &spec, &creds, &point)
            .map_err(|e| object_mount_error(id, e))?;
        self.object.credentials().insert(id.uuid, creds);
        tracing::info!(volume = %id, pid = daemon.pid, bucket = %spec.bucket, "object volume mounted");
        Ok((
            FuseStaging {
                spec,
                daemon,
                lost: None,
            },
            true,
        ))
    }

    /// Creates `<state>/object-mounts/<uuid>` (the parent mode 0700: only
    /// root walks to the private mounts; pods reach them through binds).
    fn prepare_mount_point(&self, point: &Path) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let parent = &self.object.mounts_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(Error::io("create", parent))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io("chmod", parent))?;
        match std::fs::DirBuilder::new().mode(0o755).create(point) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io("create", point)(e)),
        }
    }

    /// VOLUME_MOUNT_GROUP for dir and block volumes: the volume's root
    /// directory gets the group, group rwx and setgid (new files inherit
    /// the group), without walking the tree: what is already there keeps
    /// its owner, as it would on a filesystem the CO chowned once.
    fn apply_mount_group(&self, id: &VolumeId, st: &Staging, gid: u32) -> Result<()> {
        if !st.mounted || st.capability.is_block() || st.capability.access_mode.is_read_only() {
            return Ok(());
        }
        use std::os::unix::fs::PermissionsExt;
        let root = self.staging_root(id, st)?;
        // Through the descriptor's /proc link: the directory the staging
        // mount shows, whatever happened to the path meanwhile.
        let at = root.proc_path();
        std::os::unix::fs::chown(&at, None, Some(gid)).map_err(Error::io("chown", &st.path))?;
        let mode = std::fs::metadata(&at)
            .map_err(Error::io("stat", &st.path))?
            .permissions()
            .mode();
        std::fs::set_permissions(
            &at,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o2070),
        )
        .map_err(Error::io("chmod", &st.path))
    }

    /// Whether the staging still has its loop device and mount.
    fn staging_intact(&self, id: &VolumeId, st: &Staging) -> bool {
        if id.backend == BackendKind::Replicated
            && self.replicated.attached(id.uuid).map(|d| d.path()) != st.device
        {
            return false;
        }
        let device_ok = match (&st.device, id.backend.profile().staging()) {
            (Some(d), _) => LoopDevice::from_path(d)
                .and_then(|d| d.backing_file())
                .is_some_and(|b| b == self.image(id)),
            (None, StagingKind::Device) => false,
            (None, StagingKind::BindDirectory) => true,
            (None, StagingKind::Fuse) => st
                .fuse
                .as_ref()
                .is_some_and(|f| self.object.mounter.health(&f.daemon.target) == Health::Healthy),
        };
        device_ok && (!st.mounted || self.volume_mount_at(id, &st.path, false).is_some())
    }

    /// Every loop device backed by the volume's image.
    fn devices(&self, id: &VolumeId) -> Vec<LoopDevice> {
        if id.backend.profile().staging() != StagingKind::Device {
            return Vec::new();
        }
        LoopDevice::find_by_backing(&self.image(id)).unwrap_or_default()
    }

    /// The read-write loop device already backing the image, if any.
    fn existing_device(
        &self,
        id: &VolumeId,
        previous: Option<&Staging>,
    ) -> Result<Option<LoopDevice>> {
        let attached = self.backends.attacher(id.backend).attached(id.uuid)?;
        let devices: Vec<LoopDevice> = attached
            .into_iter()
            .filter_map(|a| match a {
                Attached::Device(d) => Some(d),
                Attached::Directory(_) => None,
            })
            .collect();
        if let Some(prev) = previous
            .and_then(|p| p.device.as_deref())
            .and_then(LoopDevice::from_path)
            && devices.contains(&prev)
        {
            return Ok(Some(prev));
        }
        Ok(devices.into_iter().find(|d| !d.read_only()))
    }

    /// A mount already at the staging path: this volume's is adopted
    /// (Some(id)), anything else refused.
    fn existing_staging_mount(&self, id: &VolumeId, at: &AnchoredPath) -> Result<Option<u32>> {
        match mount_at(at)? {
            None => Ok(None),
            Some(f)
                if f.entry.mount_point == at.path() && self.is_volume_root(id, &f.root, false) =>
            {
                Ok(Some(f.entry.mount_id))
            }
            Some(_) => Err(Error::precondition(
                id,
                format!(
                    "{} already has a mount that is not this volume",
                    at.path().display()
                ),
            )),
        }
    }

    /// Attaches and mounts the volume at the directory `at` (resolved
    /// without symlinks before anything slow runs: the mount lands on that
    /// directory, and [`Node::landed`] refuses it if the path moved).
    fn do_stage(
        &self,
        id: &VolumeId,
        at: &AnchoredPath,
        cap: &Capability,
        previous: Option<&Staging>,
        grow_fs: bool,
        publish_context: Option<&BTreeMap<String, String>>,
    ) -> Result<Staging> {
        const FIELD: &str = "staging_target_path";
        let path = at.path();
        let read_only = cap.access_mode.is_read_only();
        let mut rollback = Rollback::new();
        let unmount_on_rollback = |rollback: &mut Rollback| -> Result<()> {
            let again = at.try_clone().map_err(Error::io("open", path))?;
            rollback.push(move || drop(mount::unmount_anchored(&again)));
            Ok(())
        };
        let staging = match (id.backend.profile().staging(), &cap.access_type) {
            (StagingKind::BindDirectory | StagingKind::Fuse, _) => {
                let opts = bind_mount_options(id, cap)?;
                let dir = self.bind_source(id);
                let mut st = Staging {
                    path: path.to_owned(),
                    capability: cap.clone(),
                    device: None,
                    mounted: true,
                    mount_id: self.existing_staging_mount(id, at)?,
                    fuse: previous.and_then(|p| p.fuse.clone()),
                };
                if st.mount_id.is_none() {
                    let target = self.open_mount_point(id, at, FIELD)?;
                    mount::bind_onto(&dir, &target)?;
                    let (mid, root) = self.landed(id, at, &target, false, FIELD)?;
                    unmount_on_rollback(&mut rollback)?;
                    remount_with(&root, opts.per_mount(), read_only, path)?;
                    st.mount_id = Some(mid);
                }
                st
            }
            (StagingKind::Device, access) => {
                // Before attaching or formatting: the mount lands on this
                // very directory however long mkfs takes.
                let mount = match access {
                    AccessType::Mount { .. } => match self.existing_staging_mount(id, at)? {
                        Some(mid) => Some(StagingMount::Adopt(mid)),
                        None => Some(StagingMount::Make(self.open_mount_point(id, at, FIELD)?)),
                    },
                    AccessType::Block => None,
                };
                let replicated = id.backend == BackendKind::Replicated;
                let existing = if replicated {
                    self.replicated.attached(id.uuid)
                } else {
                    self.existing_device(id, previous)?
                };
                if existing.is_none()
                    && !replicated
                    && matches!(mount, Some(StagingMount::Make(_)))
                    && !read_only
                    && cap.fs_type().unwrap_or(FsType::DEFAULT) == FsType::Ext4
                    && !crate::os::resize::can_grow_ext4_online()
                    && self.backends.block.grow_ext4_offline(id.uuid)?
                {
                    tracing::info!(volume = %id, "grew ext4 offline to its image before attaching (no CAP_SYS_RESOURCE for online growth)");
                }
                let device = match existing {
                    Some(d) => d,
                    None if replicated => {
                        let ctx = publish_context.ok_or_else(|| {
                            Error::precondition(
                                id,
                                "the engine is not running; NodeStageVolume with the publish_context starts it",
                            )
                        })?;
                        let d = self
                            .replicated
                            .attach(id.uuid, ctx)
                            .map_err(|e| replication_error(id, e))?;
                        let (engines, uuid) = (Arc::clone(&self.replicated), id.uuid);
                        rollback.push(move || drop(engines.detach(uuid)));
                        d
                    }
                    None => {
                        let Attached::Device(d) =
                            self.backends.block.attach_image(id.uuid, read_only)?
                        else {
                            unreachable!("block attach yields a device")
                        };
                        let d2 = d.clone();
                        rollback.push(move || drop(d2.detach()));
                        d
                    }
                };
                let mut st = Staging {
                    path: path.to_owned(),
                    capability: cap.clone(),
                    device: Some(device.path()),
                    mounted: mount.is_some(),
                    mount_id: None,
                    fuse: None,
                };
                match mount {
                    None => {}
                    Some(StagingMount::Adopt(mid)) => {
                        st.mount_id = Some(mid);
                        // A stage cut short (a crash) after its mount may
                        // not have finished growing the filesystem: finish
                        // it (growth is idempotent).
                        let fs = cap.fs_type().unwrap_or(FsType::DEFAULT);
                        let ext4_short = fs == FsType::Ext4
                            && crate::os::resize::can_grow_ext4_online()
                            && !crate::os::resize::ext4_fills_device(&device.path())
                                .map_err(crate::backend::BackendError::from)?;
                        if !read_only && (grow_fs || ext4_short) {
                            tracing::info!(volume = %id, fs = fs.as_str(), "growing the adopted staging's filesystem to its device");
                            crate::os::resize::grow_filesystem(fs.as_str(), &device.path(), path)
                                .map_err(crate::backend::BackendError::from)?;
                        }
                    }
                    Some(StagingMount::Make(target)) => {
                        let fs = cap.fs_type().unwrap_or(FsType::DEFAULT);
                        let mut grow_after_mount = grow_fs;
                        match filesystem::probe(&device.path())? {
                            None => {
                                // blkid finds nothing on a device it cannot
                                // read: never format what may hold data.
                                filesystem::check_readable(&device.path()).map_err(|e| {
                                    Error::Unavailable(format!(
                                        "volume {id}: its device {} cannot be read ({e}), so whether it holds a filesystem is unknown; not formatting it",
                                        device.path().display()
                                    ))
                                })?;
                                if read_only {
                                    return Err(Error::precondition(
                                        id,
                                        format!(
                                            "it holds no filesystem yet, and a read-only stage (a reader access mode) cannot make its {}: stage it once with a writer access mode first",
                                            fs.as_str()
                                        ),
                                    ));
                                }
                                tracing::info!(volume = %id, fs = fs.as_str(), "making filesystem on first stage");
                                filesystem::make(&device.path(), fs.as_str())?;
                            }
                            Some(found) if found == fs.as_str() => {
                                // Grown while unstaged (or a larger clone or
                                // restore): ext4 grows after mounting, in
                                // the kernel, which journals each step, so
                                // a crash midway leaves it consistent.
                                // Without CAP_SYS_RESOURCE (which online
                                // growth needs) it was grown offline in a
                                // copy of the image before attaching. xfs
                                // and btrfs always grow online.
                                if fs == FsType::Ext4
                                    && !read_only
                                    && !crate::os::resize::ext4_fills_device(&device.path())
                                        .map_err(crate::backend::BackendError::from)?
                                {
                                    if crate::os::resize::can_grow_ext4_online() {
                                        grow_after_mount = true;
                                    } else {
                                        // Only on a device left attached
                                        // (the image was grown atomically
                                        // before attaching otherwise).
                                        tracing::info!(volume = %id, "growing ext4 offline on its attached device (no CAP_SYS_RESOURCE)");
                                        crate::os::resize::grow_ext4_offline(&device.path())
                                            .map_err(crate::backend::BackendError::from)?;
                                    }
                                }
                            }
                            Some(found) => {
                                return Err(Error::precondition(
                                    id,
                                    format!(
                                        "device holds a {found} filesystem; capability asks for {}",
                                        fs.as_str()
                                    ),
                                ));
                            }
                        }
                        let mut opts = parse_mount_flags(cap)?;
                        if read_only {
                            opts.flags |= nix::mount::MsFlags::MS_RDONLY;
                        }
                        if fs == FsType::Xfs {
                            // A clone or restore carries its source's UUID,
                            // which xfs would otherwise refuse to mount twice.
                            opts.data = if opts.data.is_empty() {
                                "nouuid".to_owned()
                            } else {
                                format!("{},nouuid", opts.data)
                            };
                        }
                        mount::mount_filesystem_onto(&device.path(), &target, fs.as_str(), &opts)?;
                        let (mid, root) = self.landed(id, at, &target, false, FIELD)?;
                        drop(root);
                        unmount_on_rollback(&mut rollback)?;
                        st.mount_id = Some(mid);
                        if grow_after_mount && !read_only {
                            tracing::info!(volume = %id, fs = fs.as_str(), "growing the filesystem to its device");
                            crate::os::resize::grow_filesystem(fs.as_str(), &device.path(), path)
                                .map_err(crate::backend::BackendError::from)?;
                        }
                    }
                }
                st
            }
        };
        rollback.disarm();
        Ok(staging)
    }

    /// NodeUnstageVolume. Idempotent: a volume not staged at `path` (or
    /// unknown) is success. Refused while the volume is still published.
    /// Never answers OK while the staging mount (wherever a rename moved
    /// it) or any other mount of the volume remains: those are errors
    /// (busy: ABORTED; covered or elsewhere: FAILED_PRECONDITION).
    pub fn unstage(&self, raw: &str, path: &Path) -> Result<()> {
        let Some(id) = self.local_id(raw) else {
            return Ok(());
        };
        let _g = self.guard(&id)?;
        let mut rec = self.record(&id);
        match rec.staging.clone() {
            Some(st) if st.path == path => {
                if !rec.publications.is_empty() {
                    return Err(Error::precondition(
                        &id,
                        format!(
                            "still published at {:?}; unpublish first",
                            rec.publications.keys().collect::<Vec<_>>()
                        ),
                    ));
                }
                // No publication remains, so a mount of the volume other
                // than the staging mount (and its propagated copies) is one
                // no record explains: refuse before changing anything, as
                // detaching the loop device under it would only be
                // deferred until it goes.
                let left = self.other_volume_mounts(&id, &st)?;
                if !left.is_empty() {
                    return Err(Error::precondition(
                        &id,
                        format!("the volume is still mounted at {left:?}; unmount it there first"),
                    ));
                }
                if let Some(f) = &st.fuse
                    && self.object.mounter.health(&f.daemon.target) != Health::Healthy
                {
                    // Its daemon died: the bind at the staging path shows a
                    // dead connection that no check can open.
                    detach_stale(&st.path, st.mount_id)?;
                }
                if id.backend == BackendKind::Replicated
                    && self.replicated.attached(id.uuid).is_none()
                {
                    // Its engine died with an earlier node plugin: the
                    // mount shows a device that fails every I/O.
                    self.clear_dead_replicated(&id, &rec)?;
                }
                if st.mounted {
                    self.unmount_made(&id, path, st.mount_id, "staging_target_path")?;
                }
                let left = self.other_volume_mounts(&id, &st)?;
                if !left.is_empty() {
                    return Err(Error::precondition(
                        &id,
                        format!("the volume is still mounted at {left:?}; unmount it there first"),
                    ));
                }
                if id.backend == BackendKind::Replicated {
                    self.replicated
                        .detach(id.uuid)
                        .map_err(|e| replication_error(&id, e))?;
                }
                // No publication remains, so every loop device of the image
                // belongs to this staging.
                for d in self.devices(&id) {
                    d.detach_settled()?;
                }
                if let Some(f) = &st.fuse {
                    self.object
                        .mounter
                        .unmount(&f.daemon.target, &f.daemon)
                        .map_err(|e| object_mount_error(&id, e))?;
                    let _ = std::fs::remove_dir(&f.daemon.target);
                    // The daemon's log and temporary files (the key is the
                    // volume's hex uuid, checked by the mounter).
                    let _ =
                        std::fs::remove_dir_all(self.object.mounter.volume_dir(&id.uuid.to_hex()));
                    self.object.credentials().remove(&id.uuid);
                }
                rec.staging = None;
                self.save(rec)?;
                tracing::info!(volume = %id, path = %path.display(), "volume unstaged");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Mount points of mounts showing the volume other than its staging
    /// mount (the recorded one, or this volume's at the staging path) and
    /// that mount's propagated copies.
    fn other_volume_mounts(&self, id: &VolumeId, st: &Staging) -> Result<Vec<PathBuf>> {
        let table = MountTable::read()?;
        let ours = self.volume_mounts(id, &table);
        let mounts: Vec<&MountEntry> = table
            .entries
            .iter()
            .filter(|e| ours.contains(&e.mount_id))
            .collect();
        let staging: Vec<&MountEntry> = mounts
            .iter()
            .copied()
            .filter(|e| Some(e.mount_id) == st.mount_id || e.mount_point == st.path)
            .collect();
        Ok(mounts
            .into_iter()
            .filter(|e| {
                !staging
                    .iter()
                    .any(|s| s.mount_id == e.mount_id || table.propagated_copy(e, s))
            })
            .map(|e| e.mount_point.clone())
            .collect())
    }

    /// NodePublishVolume. Idempotent for the same target, capability and
    /// readonly flag; different ones at the same target are
    /// [`Error::Incompatible`]. The target may not overlap the pool, the
    /// state directory or another staging path or target
    /// (`Node::check_overlap`); it is created (if missing) and mounted on
    /// without following a symlink.
    pub fn publish(&self, req: PublishVolume) -> Result<()> {
        let id = self
            .local_id(&req.volume_id)
            .ok_or_else(|| Error::VolumeNotFound(req.volume_id.clone()))?;
        let _g = self.guard(&id)?;
        req.capability
            .supported_by(id.backend)
            .map_err(|r| Error::invalid("volume_capability", r))?;
        let mut rec = self.record(&id);
        let Some(st) = rec.staging.clone() else {
            if !self.backends.store(id.backend).exists(id.uuid) {
                return Err(Error::VolumeNotFound(req.volume_id));
            }
            return Err(Error::precondition(
                &id,
                "volume is not staged on this node",
            ));
        };
        if req.staging_path.as_deref() != Some(st.path.as_path()) {
            return Err(Error::precondition(
                &id,
                format!(
                    "volume is staged at {}, not at the given staging path",
                    st.path.display()
                ),
            ));
        }
        if st.capability.is_block() != req.capability.is_block()
            || st.capability.fs_type() != req.capability.fs_type()
        {
            return Err(Error::precondition(
                &id,
                "capability differs from the one the volume was staged with",
            ));
        }
        let read_only = req.read_only || req.capability.access_mode.is_read_only();
        if !read_only && st.capability.access_mode.is_read_only() {
            // Its bind would be read-only whatever it says.
            return Err(Error::precondition(
                &id,
                "the volume is staged read-only (a reader access mode): a writable publication needs it staged with a writer access mode",
            ));
        }
        let target = req.target_path.clone();
        if let Some(p) = rec.publications.get(&target) {
            if p.capability != req.capability || p.read_only != read_only {
                return Err(Error::Incompatible {
                    volume: id.to_string(),
                    what: "published at this target",
                    reason: "capability or readonly flag differs".into(),
                });
            }
            if self
                .volume_mount_at(&id, &target, p.capability.is_block())
                .is_some()
            {
                return self.mount_group_of(&id, &st, req.mount_group);
            }
            tracing::warn!(volume = %id, target = %target.display(), "publication lost its mount; publishing again");
        }
        // A publication that lost its mount (unmounted behind stowage's
        // back) is made again: what it made stays stowage's to remove (the
        // target it created), or goes now (its own read-only device).
        let lost = rec.publications.get(&target).cloned();
        let single = |c: &Capability| c.access_mode.is_single_publication();
        if rec
            .publications
            .iter()
            .any(|(t, p)| *t != target && (single(&p.capability) || single(&req.capability)))
        {
            return Err(Error::precondition(
                &id,
                "the access mode allows one publication and the volume is published elsewhere",
            ));
        }
        let before = rec.clone();
        let claim = self.claim();
        self.check_overlap(&id, &target, PathRole::Target)?;
        let at = anchor(&target, "target_path")?;
        let missing = at.kind().map_err(Error::io("inspect", &target))? == PathKind::Missing;
        if let Some(d) = lost
            .as_ref()
            .and_then(|p| p.own_device.as_deref())
            .and_then(LoopDevice::from_path)
            && d.backing_file().is_some_and(|b| b == self.image(&id))
        {
            d.detach_settled()?;
        }
        let made_before = lost.filter(|p| p.created_target && !missing);
        let intent = Publication {
            capability: req.capability.clone(),
            read_only,
            own_device: None,
            created_target: missing || made_before.is_some(),
            mount_id: None,
            created_inode: made_before.and_then(|p| p.created_inode),
        };
        rec.publications.insert(target.clone(), intent.clone());
        self.save_with(rec.clone(), Durability::Deferred)?;
        drop(claim);
        let publication = match self.do_publish(&id, &st, &at, &req.capability, read_only) {
            Ok(mut p) => {
                p.created_target |= intent.created_target;
                p.created_inode = p.created_inode.or(intent.created_inode);
                p
            }
            Err(e) => {
                let _ = self.save(before);
                return Err(e);
            }
        };
        rec.publications.insert(target.clone(), publication);
        self.save_with(rec, Durability::Deferred)?;
        tracing::info!(volume = %id, target = %target.display(), read_only, "volume published");
        self.mount_group_of(&id, &st, req.mount_group)
    }

    /// VOLUME_MOUNT_GROUP named by a repeated stage or a publication (an
    /// object volume's goes to s3fs at its mount instead): each pod's
    /// NodePublish names the group it writes as, and its publications bind
    /// the staging's root, so the root takes the group of the latest one
    /// (as the kubelet does itself when it does not delegate the group).
    fn mount_group_of(&self, id: &VolumeId, st: &Staging, gid: Option<u32>) -> Result<()> {
        match gid {
            Some(gid) if st.fuse.is_none() => self.apply_mount_group(id, st, gid),
            _ => Ok(()),
        }
    }

    /// A descriptor on the root of the volume's staging mount, reached
    /// without following symlinks: the source of a publication's bind.
    fn staging_root(&self, id: &VolumeId, st: &Staging) -> Result<PathFd> {
        let at = anchor(&st.path, "staging_target_path")?;
        if let Some(f) = mount_at(&at)?
            && f.entry.mount_point == st.path
            && self.is_volume_root(id, &f.root, false)
        {
            let fd = at.open().map_err(Error::io("open", &st.path))?;
            if fd.mount_id().map_err(Error::io("inspect", &st.path))? == f.entry.mount_id {
                return Ok(fd);
            }
        }
        Err(Error::precondition(
            id,
            format!(
                "the staging path {} does not hold this volume's mount; stage the volume again",
                st.path.display()
            ),
        ))
    }

    fn do_publish(
        &self,
        id: &VolumeId,
        st: &Staging,
        at: &AnchoredPath,
        cap: &Capability,
        read_only: bool,
    ) -> Result<Publication> {
        const FIELD: &str = "target_path";
        let target = at.path();
        let raw = cap.is_block();
        let mut rollback = Rollback::new();
        let mut publication = Publication {
            capability: cap.clone(),
            read_only,
            own_device: None,
            created_target: false,
            mount_id: None,
            created_inode: None,
        };
        if let Some(f) = mount_at(at)? {
            if f.entry.mount_point == target && self.is_volume_root(id, &f.root, raw) {
                // A mount made before a crash: adopt it.
                publication.mount_id = Some(f.entry.mount_id);
                if let PathKind::BlockDevice { rdev } = f.root.kind
                    && read_only
                {
                    publication.own_device = self
                        .devices(id)
                        .into_iter()
                        .find(|d| d.rdev().ok() == Some(rdev) && Some(d.path()) != st.device)
                        .map(|d| d.path());
                }
                return Ok(publication);
            }
            return Err(Error::precondition(
                id,
                format!(
                    "{} already has a mount that is not this volume",
                    target.display()
                ),
            ));
        }
        let kind = at.kind().map_err(Error::io("inspect", target))?;
        let expected = if raw {
            PathKind::File
        } else {
            PathKind::Directory
        };
        match kind {
            PathKind::Missing => {
                if raw {
                    at.create_file(0o640)
                        .map_err(Error::io("create target file", target))?;
                } else {
                    at.create_dir(0o750)
                        .map_err(Error::io("create directory", target))?;
                }
                publication.created_target = true;
                publication.created_inode = at.identity().ok();
                let again = at.try_clone().map_err(Error::io("open", target))?;
                rollback.push(move || {
                    drop(if raw {
                        again.remove_file()
                    } else {
                        again.remove_dir()
                    })
                });
            }
            k if k == expected => {}
            PathKind::Symlink => {
                return Err(Error::invalid(
                    FIELD,
                    format!(
                        "{} is a symlink; refusing to mount through it",
                        target.display()
                    ),
                ));
            }
            other => {
                return Err(Error::invalid(
                    FIELD,
                    format!(
                        "{} is not a {} ({other:?})",
                        target.display(),
                        if raw { "regular file" } else { "directory" }
                    ),
                ));
            }
        }
        if raw {
            let staged = st
                .device
                .as_deref()
                .and_then(LoopDevice::from_path)
                .ok_or_else(|| Error::precondition(id, "staging recorded no device"))?;
            let device = if read_only {
                let Attached::Device(d) = self.backends.block.attach_image(id.uuid, true)? else {
                    unreachable!("block attach yields a device")
                };
                let d2 = d.clone();
                rollback.push(move || drop(d2.detach()));
                publication.own_device = Some(d.path());
                d
            } else {
                staged
            };
            let t = at.open().map_err(resolve_error(FIELD, target))?;
            mount::bind_onto(&device.path(), &t)?;
            let (mid, root) = self.landed(id, at, &t, true, FIELD)?;
            drop(root);
            publication.mount_id = Some(mid);
        } else {
            // A filesystem's own options went to its mount at stage; a
            // publication is a bind mount of it.
            let opts = match id.backend.profile().staging() {
                StagingKind::Device => parse_mount_flags(cap)?,
                StagingKind::BindDirectory | StagingKind::Fuse => bind_mount_options(id, cap)?,
            };
            let src = self.staging_root(id, st)?;
            let t = self.open_mount_point(id, at, FIELD)?;
            mount::bind_onto(&src.proc_path(), &t)?;
            drop(src);
            let (mid, root) = self.landed(id, at, &t, false, FIELD)?;
            let again = at.try_clone().map_err(Error::io("open", target))?;
            rollback.push(move || drop(mount::unmount_anchored(&again)));
            remount_with(&root, opts.per_mount(), read_only, target)?;
            publication.mount_id = Some(mid);
        }
        rollback.disarm();
        Ok(publication)
    }

    /// NodeUnpublishVolume. Idempotent: a target that holds no publication
    /// of this volume is success. Unmounts the publication's mount wherever
    /// a rename has moved it, and never answers OK while it remains (busy:
    /// ABORTED; covered: FAILED_PRECONDITION). Removes the target if
    /// stowage made it, and only while it is still the file or directory
    /// stowage made, reached without symlinks.
    pub fn unpublish(&self, raw: &str, target: &Path) -> Result<()> {
        let Some(id) = self.local_id(raw) else {
            return Ok(());
        };
        let _g = self.guard(&id)?;
        let mut rec = self.record(&id);
        let Some(p) = rec.publications.get(target).cloned() else {
            return Ok(());
        };
        self.unmount_made(&id, target, p.mount_id, "target_path")?;
        if p.created_target {
            self.remove_target(&id, target, &p)?;
        }
        if let Some(d) = p.own_device.as_deref().and_then(LoopDevice::from_path)
            && d.backing_file().is_some_and(|b| b == self.image(&id))
        {
            d.detach_settled()?;
        }
        rec.publications.remove(target);
        self.save(rec)?;
        tracing::info!(volume = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// Removes the target stowage created for `p`, if it is still there,
    /// still the one created (when its inode was recorded) and reached
    /// without symlinks. Anything else is left alone and logged.
    fn remove_target(&self, id: &VolumeId, target: &Path, p: &Publication) -> Result<()> {
        let at = match AnchoredPath::new(target) {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(volume = %id, target = %target.display(), error = %e, "not removing the target: it cannot be reached without following a symlink");
                return Ok(());
            }
        };
        let kind = at.kind().map_err(Error::io("inspect", target))?;
        let expected = if p.capability.is_block() {
            PathKind::File
        } else {
            PathKind::Directory
        };
        if kind == PathKind::Missing {
            return Ok(());
        }
        let replaced = kind != expected
            || p.created_inode
                .is_some_and(|ino| at.identity().ok() != Some(ino));
        if replaced {
            tracing::warn!(volume = %id, target = %target.display(), "the target is no longer what stowage created; leaving it");
            return Ok(());
        }
        if mount_at(&at)?.is_some() {
            tracing::warn!(volume = %id, target = %target.display(), "the target holds a mount that is not this volume; leaving it");
            return Ok(());
        }
        let r = if expected == PathKind::File {
            at.remove_file()
        } else {
            at.remove_dir()
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove target", target)(e)),
        }
    }

    /// NodeExpandVolume: makes the node see a volume the controller grew.
    /// Block: refreshes the loop device's capacity and grows a mounted
    /// filesystem online; raw block needs nothing more; dir volumes nothing
    /// at all. Idempotent. Returns the capacity now usable (0 = unknown).
    pub fn expand(&self, raw: &str, path: &str, required: Option<u64>) -> Result<u64> {
        let id = self
            .local_id(raw)
            .ok_or_else(|| Error::VolumeNotFound(raw.to_owned()))?;
        let _g = self.guard(&id)?;
        let rec = lock(&self.records)
            .get(&id.uuid)
            .filter(|r| r.id == id)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(raw.to_owned()))?;
        let path_buf = PathBuf::from(path);
        let st = rec
            .staging
            .clone()
            .ok_or_else(|| Error::precondition(&id, "volume is not staged"))?;
        if st.path != path_buf && !rec.publications.contains_key(&path_buf) {
            return Err(Error::NotAVolumePath {
                volume: raw.to_owned(),
                path: path.to_owned(),
            });
        }
        if id.backend.profile().staging() != StagingKind::Device {
            return Ok(0);
        }
        let device = st
            .device
            .as_deref()
            .and_then(LoopDevice::from_path)
            .ok_or_else(|| Error::precondition(&id, "staging recorded no loop device"))?;
        if id.backend == BackendKind::Replicated {
            // The copies grew with ControllerExpandVolume; the engine, its
            // FUSE file and the loop device grow here (to a whole region).
            let want = required.ok_or_else(|| {
                Error::invalid(
                    "capacity_range",
                    "a replicated volume grows to capacity_range.required_bytes",
                )
            })?;
            let size = want.div_ceil(crate::backend::replicated::REGION_BYTES)
                * crate::backend::replicated::REGION_BYTES;
            self.replicated
                .resize(id.uuid, size)
                .map_err(|e| replication_error(&id, e))?;
        }
        device.refresh_capacity()?;
        for p in rec.publications.values() {
            if let Some(own) = p.own_device.as_deref().and_then(LoopDevice::from_path) {
                own.refresh_capacity()?;
            }
        }
        if st.mounted {
            let fs = st.capability.fs_type().unwrap_or(FsType::DEFAULT);
            crate::os::resize::grow_filesystem(fs.as_str(), &device.path(), &st.path)
                .map_err(crate::backend::BackendError::from)?;
        }
        tracing::info!(volume = %id, "volume expanded on the node");
        Ok(device.size_bytes().unwrap_or(0))
    }

    /// NodeGetVolumeStats for a staging or target path of the volume.
    pub fn stats(&self, raw: &str, path: &str) -> Result<VolumeStats> {
        let id = self
            .local_id(raw)
            .ok_or_else(|| Error::VolumeNotFound(raw.to_owned()))?;
        let rec = lock(&self.records)
            .get(&id.uuid)
            .filter(|r| r.id == id)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(raw.to_owned()))?;
        let path_buf = PathBuf::from(path);
        let st = rec.staging.clone();
        let (cap, is_staging) = match (rec.publications.get(&path_buf), &st) {
            (Some(p), _) => (p.capability.clone(), false),
            (None, Some(s)) if s.path == path_buf => (s.capability.clone(), true),
            _ => {
                return Err(Error::NotAVolumePath {
                    volume: raw.to_owned(),
                    path: path.to_owned(),
                });
            }
        };
        let table = MountTable::read()?;
        let mut problems = Vec::new();
        let device = st
            .as_ref()
            .and_then(|s| s.device.as_deref())
            .and_then(LoopDevice::from_path);
        if let Some(d) = &device
            && d.backing_file().is_none_or(|b| b != self.image(&id))
        {
            problems.push(format!("loop device {} is detached", d.path().display()));
        }
        if id.backend == BackendKind::Replicated {
            problems.extend(self.replicated_problems(&id));
        }
        if let Some(f) = st.as_ref().and_then(|s| s.fuse.as_ref()) {
            let health = self.object.mounter.health(&f.daemon.target);
            if let Some(why) = &f.lost {
                problems.push(why.clone());
            } else if health != Health::Healthy {
                problems.push(format!("the FUSE mount stopped serving ({health:?})"));
            }
            if !problems.is_empty() {
                return Ok(VolumeStats {
                    usage: Vec::new(),
                    condition: NodeCondition {
                        abnormal: true,
                        message: problems.join("; "),
                    },
                });
            }
        }
        let mounted = table.mounted_at(&path_buf);
        let expect_mount = !(is_staging && cap.is_block());
        if expect_mount && mounted.is_none() {
            problems.push(format!("{path} is no longer mounted"));
        }
        let usage = if cap.is_block() {
            let size = device
                .as_ref()
                .and_then(LoopDevice::size_bytes)
                .unwrap_or(0);
            vec![Usage::Bytes {
                total: size,
                available: 0,
                used: 0,
            }]
        } else {
            let u = os::fs::usage(&path_buf).map_err(Error::io("statvfs", &path_buf))?;
            if let (Some(m), Some(d)) = (mounted, &device) {
                let expect_ro = cap.access_mode.is_read_only()
                    || rec.publications.get(&path_buf).is_some_and(|p| p.read_only);
                if m.is_read_only() && !expect_ro {
                    problems.push(
                        "filesystem was remounted read-only (I/O or filesystem errors)".into(),
                    );
                }
                if let Some(n) = filesystem::error_count(&m.fs_type, &format!("loop{}", d.number()))
                    && n > 0
                {
                    problems.push(format!("{} reports {n} filesystem error(s)", m.fs_type));
                }
            }
            vec![
                Usage::Bytes {
                    total: u.total_bytes,
                    available: u.available_bytes,
                    used: u.used_bytes,
                },
                Usage::Inodes {
                    total: u.total_inodes,
                    available: u.available_inodes,
                    used: u.used_inodes,
                },
            ]
        };
        let condition = if problems.is_empty() {
            NodeCondition {
                abnormal: false,
                message: "volume is healthy".into(),
            }
        } else {
            NodeCondition {
                abnormal: true,
                message: problems.join("; "),
            }
        };
        Ok(VolumeStats { usage, condition })
    }

    /// One pass of the object mount supervisor: every staged object
    /// volume whose FUSE mount stopped serving (its daemon died) is
    /// marked lost (its condition turns abnormal) and mounted again, with
    /// its staging path and targets bound anew. A volume busy with a
    /// request is left for the next pass.
    pub fn supervise_object_mounts(&self) {
        // Probed outside the records' lock: a hung daemon's probe takes
        // seconds, which no other request should wait for.
        let staged: Vec<NodeVolumeRecord> = lock(&self.records)
            .values()
            .filter(|r| r.staging.as_ref().is_some_and(|s| s.fuse.is_some()))
            .cloned()
            .collect();
        let lost: Vec<NodeVolumeRecord> = staged
            .into_iter()
            .filter(|r| {
                r.staging
                    .as_ref()
                    .and_then(|s| s.fuse.as_ref())
                    .is_some_and(|f| {
                        self.object.mounter.health(&f.daemon.target) != Health::Healthy
                    })
            })
            .collect();
        for rec in lost {
            let id = rec.id.clone();
            let Ok(_g) = self.guard(&id) else { continue };
            let rec = self.record(&id);
            if let Err(e) = self.recover_object(rec) {
                tracing::error!(volume = %id, error = %e, "cannot mount the object volume again");
            }
        }
    }

    /// Mounts a lost object volume again and binds its staging path and
    /// targets anew. The loss is recorded first, so the condition shows
    /// it (here and in the controller's ListVolumes) until this succeeds.
    fn recover_object(&self, mut rec: NodeVolumeRecord) -> Result<()> {
        let id = rec.id.clone();
        let Some(mut st) = rec.staging.clone() else {
            return Ok(());
        };
        let Some(mut fuse) = st.fuse.clone() else {
            return Ok(());
        };
        let health = self.object.mounter.health(&fuse.daemon.target);
        if health == Health::Healthy && fuse.lost.is_none() {
            return Ok(());
        }
        let why = format!("the FUSE mount stopped serving ({health:?}); mounting it again");
        if fuse.lost.as_deref() != Some(why.as_str()) && health != Health::Healthy {
            tracing::warn!(volume = %id, pid = fuse.daemon.pid, ?health, "object volume's FUSE daemon died");
            fuse.lost = Some(why);
            st.fuse = Some(fuse.clone());
            rec.staging = Some(st.clone());
            self.save(rec.clone())?;
        }
        let creds = self.object.credentials().get(&id.uuid).cloned();
        let Some(creds) = creds else {
            return Err(Error::precondition(
                &id,
                "the FUSE daemon died after a plugin restart and its credentials are gone; stage the volume again",
            ));
        };
        if health != Health::Healthy {
            for (target, p) in &rec.publications {
                detach_stale(target, p.mount_id)?;
            }
            detach_stale(&st.path, st.mount_id)?;
            let daemon = self
                .object
                .mounter
                .remount(&fuse.spec, &creds, &fuse.daemon)
                .map_err(|e| object_mount_error(&id, e))?;
            fuse.daemon = daemon;
        }
        fuse.lost = None;
        st.fuse = Some(fuse.clone());
        st.mount_id = None;
        let at = self.anchor_dir(&st.path, "staging_target_path", false)?;
        let mut new = self.do_stage(&id, &at, &st.capability, Some(&st), false, None)?;
        new.fuse = Some(fuse);
        rec.staging = Some(new.clone());
        for (target, p) in rec.publications.clone() {
            let republished = anchor(&target, "target_path")
                .and_then(|at| self.do_publish(&id, &new, &at, &p.capability, p.read_only));
            match republished {
                Ok(mut np) => {
                    np.created_target |= p.created_target;
                    np.created_inode = np.created_inode.or(p.created_inode);
                    rec.publications.insert(target, np);
                }
                Err(e) => {
                    tracing::error!(volume = %id, target = %target.display(), error = %e, "cannot bind the object volume's target again");
                }
            }
        }
        self.save(rec)?;
        tracing::info!(volume = %id, "object volume mounted again");
        Ok(())
    }

    /// Re-establishes stagings and publications that lost their loop device
    /// or mount (after a reboot or a crash). Failures are logged, not fatal.
    fn restore(&self) {
        let records: Vec<NodeVolumeRecord> = lock(&self.records).values().cloned().collect();
        for mut rec in records {
            let id = rec.id.clone();
            let Some(mut st) = rec.staging.clone() else {
                continue;
            };
            let mut changed = false;
            if let Some(f) = &st.fuse {
                // An object volume: adopt its daemon (and learn its
                // credentials again), or mount it again.
                match self.object.mounter.adopt(&f.daemon) {
                    Health::Healthy => {
                        match self.object.mounter.credentials(&f.daemon) {
                            Ok(c) => {
                                self.object.credentials().insert(id.uuid, c);
                            }
                            Err(e) => {
                                tracing::warn!(volume = %id, error = %e, "cannot read the adopted daemon's credentials")
                            }
                        }
                        tracing::info!(volume = %id, pid = f.daemon.pid, "adopted the object volume's FUSE daemon");
                    }
                    h => {
                        tracing::warn!(volume = %id, health = ?h, "object volume's FUSE daemon is gone");
                        if let Err(e) = self.recover_object(rec.clone()) {
                            tracing::error!(volume = %id, error = %e, "cannot mount the object volume again");
                        }
                        continue;
                    }
                }
            }
            if !self.staging_intact(&id, &st) {
                let restaged = self
                    .anchor_dir(&st.path, "staging_target_path", false)
                    .and_then(|at| self.do_stage(&id, &at, &st.capability, Some(&st), false, None));
                match restaged {
                    Ok(new) => {
                        tracing::info!(volume = %id, "restored staging after restart");
                        st = new;
                        changed = true;
                    }
                    Err(e) => {
                        tracing::error!(volume = %id, error = %e, "cannot restore staging");
                        continue;
                    }
                }
            } else if st.mounted
                && let Some(f) = self.volume_mount_at(&id, &st.path, false)
                && st.mount_id != Some(f.entry.mount_id)
            {
                // A deferred record may have lost the id: find it again.
                st.mount_id = Some(f.entry.mount_id);
                changed = true;
            }
            rec.staging = Some(st.clone());
            for (target, p) in rec.publications.clone() {
                let raw = p.capability.is_block();
                if let Some(f) = self.volume_mount_at(&id, &target, raw) {
                    // A deferred record may have lost the mount id or the
                    // publication's own read-only device; find them again.
                    let mut found = p.clone();
                    found.mount_id = Some(f.entry.mount_id);
                    if let PathKind::BlockDevice { rdev } = f.root.kind
                        && p.read_only
                        && p.own_device.is_none()
                    {
                        found.own_device = self
                            .devices(&id)
                            .into_iter()
                            .find(|d| d.rdev().ok() == Some(rdev) && Some(d.path()) != st.device)
                            .map(|d| d.path());
                    }
                    if found != p {
                        rec.publications.insert(target.clone(), found);
                        changed = true;
                    }
                    continue;
                }
                let republished = anchor(&target, "target_path")
                    .and_then(|at| self.do_publish(&id, &st, &at, &p.capability, p.read_only));
                match republished {
                    Ok(mut new) => {
                        new.created_target |= p.created_target;
                        new.created_inode = new.created_inode.or(p.created_inode);
                        rec.publications.insert(target.clone(), new);
                        changed = true;
                        tracing::info!(volume = %id, target = %target.display(), "restored publication after restart");
                    }
                    Err(e) => {
                        tracing::error!(volume = %id, target = %target.display(), error = %e, "cannot restore publication")
                    }
                }
            }
            if changed && let Err(e) = self.save(rec) {
                tracing::error!(volume = %id, error = %e, "cannot record restored volume");
            }
        }
    }

    /// Detaches loop devices backed by pool images that no record claims
    /// (left by a crash between attaching and recording), unmounting their
    /// mounts first.
    fn sweep_loop_devices(&self) -> Result<()> {
        let claimed: Vec<PathBuf> = lock(&self.records)
            .values()
            .flat_map(|r| {
                r.staging
                    .iter()
                    .filter_map(|s| s.device.clone())
                    .chain(r.publications.values().filter_map(|p| p.own_device.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let table = MountTable::read()?;
        for (dev, backing) in LoopDevice::list_attached()? {
            let backing = PathBuf::from(
                backing
                    .to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_owned(),
            );
            if self.backends.block.owns_image(&backing).is_none() || claimed.contains(&dev.path()) {
                continue;
            }
            if let Ok(rdev) = dev.rdev() {
                let mut mounts: Vec<&MountEntry> = table.of_device(rdev).collect();
                mounts.reverse();
                for m in mounts {
                    tracing::warn!(device = %dev.path().display(), mount = %m.mount_point.display(), "unmounting leaked mount");
                    if let Err(e) = unmount_entry(&dev.path().display(), m) {
                        tracing::error!(error = %e, "cannot unmount leaked mount");
                    }
                }
            }
            tracing::warn!(device = %dev.path().display(), image = %backing.display(), "detaching leaked loop device");
            dev.detach()?;
        }
        Ok(())
    }

    /// Logs whether mounts made under the kubelet directory (or the state
    /// directory on a host without one) propagate to other namespaces.
    fn log_propagation(&self) {
        let kubelet = Path::new("/var/lib/kubelet");
        let probe = if kubelet.exists() {
            kubelet
        } else {
            self.store.root()
        };
        match MountTable::read() {
            Ok(t) => match t
                .containing(probe)
                .map(|m| (m.mount_point.clone(), m.propagation()))
            {
                Some((
                    mp,
                    p @ (Propagation::Shared | Propagation::SharedAndSlave | Propagation::Slave),
                )) => {
                    tracing::info!(path = %probe.display(), mount = %mp.display(), propagation = ?p, "mount propagation checked");
                }
                Some((mp, p)) => {
                    tracing::warn!(path = %probe.display(), mount = %mp.display(), propagation = ?p,
                        "mounts made here will not propagate to other mount namespaces; in a container, mount the kubelet directory with Bidirectional propagation");
                }
                None => tracing::warn!(path = %probe.display(), "no mount contains this path"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot read the mount table"),
        }
    }

    /// Counts of what this node holds, for metrics. Stagings and
    /// publications come from memory; loop devices from the kernel.
    pub fn inventory(&self) -> NodeInventory {
        let (staged, published) = {
            let records = lock(&self.records);
            let staged = records.values().filter(|r| r.staging.is_some()).count();
            let published = records
                .values()
                .map(|r| r.publications.len())
                .sum::<usize>();
            (staged as u64, published as u64)
        };
        let loop_devices = match LoopDevice::list_attached() {
            Ok(list) => Some(
                list.iter()
                    .filter(|(_, backing)| {
                        let backing = backing.to_string_lossy();
                        let backing = Path::new(backing.trim_end_matches(" (deleted)"));
                        self.backends.block.owns_image(backing).is_some()
                    })
                    .count() as u64,
            ),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list loop devices");
                None
            }
        };
        NodeInventory {
            staged,
            published,
            in_flight: self.inflight.len() as u64,
            loop_devices,
        }
    }

    /// Whether the node can work (Probe).
    pub fn check_ready(&self) -> std::result::Result<(), String> {
        MountTable::read().map_err(|e| e.to_string())?;
        self.store.check_writable().map_err(|e| e.to_string())
    }
}

fn parse_mount_flags(cap: &Capability) -> Result<MountOptions> {
    MountOptions::parse(cap.mount_flags())
        .map_err(|e| Error::invalid("volume_capability.mount.mount_flags", e.to_string()))
}

/// The mount flags of a volume whose mounts are all bind mounts (dir,
/// object): per-mount flags only. A filesystem's options or superblock
/// flags are INVALID_ARGUMENT: it has no filesystem of its own to take
/// them, and they would be dropped without a word.
fn bind_mount_options(id: &VolumeId, cap: &Capability) -> Result<MountOptions> {
    let opts = parse_mount_flags(cap)?;
    let only = opts.filesystem_only();
    if !only.is_empty() {
        return Err(Error::invalid(
            "volume_capability.mount.mount_flags",
            format!(
                "{} apply to a filesystem's own mount, and a volume of backend {} is bind-mounted: only ro, nosuid, nodev, noexec, noatime, nodiratime, relatime and strictatime apply to it",
                only.join(","),
                id.backend.as_str()
            ),
        ));
    }
    Ok(opts)
}

/// Gives the bind mount `root` holds the per-mount flags `want` (and
/// read-only when `read_only`), on top of those it has (a bind mount
/// starts with its source's): nothing to do when none is asked. An
/// access-time flag asked replaces the one it has.
fn remount_with(
    root: &PathFd,
    mut want: nix::mount::MsFlags,
    read_only: bool,
    path: &Path,
) -> Result<()> {
    if read_only {
        want |= nix::mount::MsFlags::MS_RDONLY;
    }
    if want.is_empty() {
        return Ok(());
    }
    let mut keep = os::fs::mount_flags(&root.proc_path()).map_err(Error::io("statvfs", path))?;
    if want.intersects(mount::ATIME) {
        keep.remove(mount::ATIME);
    }
    mount::remount_bind_fd(root, keep | want)?;
    Ok(())
}
