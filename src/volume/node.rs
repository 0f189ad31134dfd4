//! Node operations: stage (attach + filesystem + mount, or bind a dir),
//! publish (bind staging → target), their inverses, stats and health.
//! Each step checks the mount table first, so repeats are no-ops and a
//! mount stowage did not make is never unmounted. After a restart the node
//! restores what its records say and removes loop devices nothing claims.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::capability::{AccessType, Capability};
use super::error::{Error, Result};
use super::id::{BackendKind, Uuid, VolumeId};
use super::inflight::{InFlight, InFlightGuard};
use super::record::{NodeRecord, NodeVolumeRecord, Publication, Staging};
use super::{FsType, TOPOLOGY_NODE_KEY};
use crate::backend::{Attached, Backends};
use crate::os::fs::{PathKind, identity, path_kind};
use crate::os::loopdev::LoopDevice;
use crate::os::mount::{self, MountOptions};
use crate::os::mountinfo::{MountTable, Propagation};
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
}

/// A validated NodePublishVolume.
#[derive(Debug, Clone)]
pub struct PublishVolume {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub staging_path: Option<PathBuf>,
    pub capability: Capability,
    pub read_only: bool,
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

/// The node side of the driver.
#[derive(Debug)]
pub struct Node {
    node_id: String,
    max_volumes_per_node: u64,
    backends: Arc<Backends>,
    store: Store,
    inflight: InFlight,
    records: Mutex<HashMap<Uuid, NodeVolumeRecord>>,
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

fn unmount_if_mounted(path: &Path) -> Result<()> {
    match mount::unmount(path) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.errno(),
                Some(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Refuses a request path with a symlink anywhere in it: mounting through
/// one would put the mount wherever the link points.
fn refuse_symlinks(path: &Path, field: &'static str) -> Result<()> {
    if os::fs::has_symlink_component(path).map_err(Error::io("inspect", path))? {
        return Err(Error::invalid(
            field,
            format!(
                "{} goes through a symlink; give the real path",
                path.display()
            ),
        ));
    }
    Ok(())
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
        let node = Self {
            node_id: node_id.to_owned(),
            max_volumes_per_node,
            backends,
            store,
            inflight: InFlight::default(),
            records: Mutex::new(records),
        };
        node.restore();
        node.sweep_loop_devices()?;
        node.log_propagation();
        Ok(node)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
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
        VolumeId::parse(raw).filter(|id| id.node == self.node_id)
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
        self.backends.block.image(id.uuid)
    }

    /// NodeStageVolume. Idempotent for the same path and capability; a
    /// different path or capability is [`Error::Incompatible`].
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
        let mut rec = self.record(&id);
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
            if self.staging_intact(&id, st, &MountTable::read()?) {
                return Ok(());
            }
            tracing::warn!(volume = %id, "staging found incomplete; staging again");
        }
        self.check_dir_target(&req.staging_path, "staging_target_path", true)?;
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
        rec.staging = Some(Staging {
            path: req.staging_path.clone(),
            capability: req.capability.clone(),
            device: previous.as_ref().and_then(|p| p.device.clone()),
            mounted: !(id.backend == BackendKind::Block && req.capability.is_block()),
        });
        self.save_with(rec.clone(), Durability::Deferred)?;
        let staging = match self.do_stage(
            &id,
            &req.staging_path,
            &req.capability,
            previous.as_ref(),
            req.grow_fs,
        ) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.save(before);
                return Err(e);
            }
        };
        rec.staging = Some(staging);
        self.save_with(rec, Durability::Deferred)?;
        tracing::info!(volume = %id, path = %req.staging_path.display(), "volume staged");
        Ok(())
    }

    /// Checks (and with `create`, makes) a directory at `path` without
    /// following a symlink there.
    fn check_dir_target(&self, path: &Path, field: &'static str, create: bool) -> Result<bool> {
        refuse_symlinks(path, field)?;
        match path_kind(path).map_err(Error::io("inspect", path))? {
            PathKind::Directory => Ok(false),
            PathKind::Missing if create => {
                std::fs::create_dir(path).map_err(Error::io("create directory", path))?;
                Ok(true)
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

    fn staging_intact(&self, id: &VolumeId, st: &Staging, table: &MountTable) -> bool {
        let device_ok = match (&st.device, id.backend) {
            (Some(d), _) => LoopDevice::from_path(d)
                .and_then(|d| d.backing_file())
                .is_some_and(|b| b == self.image(id)),
            (None, BackendKind::Block) => false,
            (None, BackendKind::Dir) => true,
        };
        let mount_ok =
            !st.mounted || (table.mounted_at(&st.path).is_some() && self.owns_mount(id, &st.path));
        device_ok && mount_ok
    }

    /// Whether what is mounted at `path` is this volume: the dir volume's
    /// directory, or a filesystem on one of the loop devices backed by its
    /// image.
    fn owns_mount(&self, id: &VolumeId, path: &Path) -> bool {
        let Ok((dev, ino)) = identity(path) else {
            return false;
        };
        match id.backend {
            BackendKind::Dir => identity(&self.backends.dir.path(id.uuid)).ok() == Some((dev, ino)),
            BackendKind::Block => self.devices(id).iter().any(|d| d.rdev().ok() == Some(dev)),
        }
    }

    /// Whether `target` is a bind of one of the volume's loop device nodes.
    fn owns_device_bind(&self, id: &VolumeId, target: &Path) -> bool {
        self.bound_device(id, target).is_some()
    }

    /// The volume's loop device bound at `target`, if any.
    fn bound_device(&self, id: &VolumeId, target: &Path) -> Option<LoopDevice> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(target).ok()?.rdev();
        self.devices(id)
            .into_iter()
            .find(|d| d.rdev().ok() == Some(rdev))
    }

    /// Every loop device backed by the volume's image.
    fn devices(&self, id: &VolumeId) -> Vec<LoopDevice> {
        if id.backend != BackendKind::Block {
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

    fn do_stage(
        &self,
        id: &VolumeId,
        path: &Path,
        cap: &Capability,
        previous: Option<&Staging>,
        grow_fs: bool,
    ) -> Result<Staging> {
        let table = MountTable::read()?;
        let read_only = cap.access_mode.is_read_only();
        let mut rollback = Rollback::new();
        let staging = match (id.backend, &cap.access_type) {
            (BackendKind::Dir, _) => {
                let dir = self.backends.dir.path(id.uuid);
                let st = Staging {
                    path: path.to_owned(),
                    capability: cap.clone(),
                    device: None,
                    mounted: true,
                };
                if table.mounted_at(path).is_some() {
                    if !self.owns_mount(id, path) {
                        return Err(Error::precondition(
                            id,
                            format!(
                                "{} already has a mount that is not this volume",
                                path.display()
                            ),
                        ));
                    }
                } else {
                    mount::bind(&dir, path)?;
                    let p = path.to_owned();
                    rollback.push(move || drop(mount::unmount(&p)));
                    if read_only {
                        let keep = os::fs::mount_flags(path).map_err(Error::io("statvfs", path))?;
                        mount::remount_bind_read_only(path, keep)?;
                    }
                }
                st
            }
            (BackendKind::Block, access) => {
                let device = match self.existing_device(id, previous)? {
                    Some(d) => d,
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
                    mounted: false,
                };
                if let AccessType::Mount { .. } = access {
                    let fs = cap.fs_type().unwrap_or(FsType::DEFAULT);
                    st.mounted = true;
                    if table.mounted_at(path).is_some() {
                        if !self.owns_mount(id, path) {
                            return Err(Error::precondition(
                                id,
                                format!(
                                    "{} already has a mount that is not this volume",
                                    path.display()
                                ),
                            ));
                        }
                    } else {
                        match filesystem::probe(&device.path())? {
                            None => {
                                tracing::info!(volume = %id, fs = fs.as_str(), "making filesystem on first stage");
                                filesystem::make(&device.path(), fs.as_str())?;
                            }
                            Some(found) if found == fs.as_str() => {
                                // Grown while unstaged: grow ext4 offline now,
                                // which (unlike online) needs no
                                // CAP_SYS_RESOURCE. xfs and btrfs grow online.
                                if fs == FsType::Ext4
                                    && !read_only
                                    && !crate::os::resize::ext4_fills_device(&device.path())
                                        .map_err(crate::backend::BackendError::from)?
                                {
                                    tracing::info!(volume = %id, "growing ext4 to its device before mounting");
                                    crate::os::resize::grow_ext4_offline(&device.path())
                                        .map_err(crate::backend::BackendError::from)?;
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
                        let mut opts = MountOptions::parse(cap.mount_flags()).map_err(|e| {
                            Error::invalid("volume_capability.mount.mount_flags", e.to_string())
                        })?;
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
                        mount::mount_filesystem(&device.path(), path, fs.as_str(), &opts)?;
                        let p = path.to_owned();
                        rollback.push(move || drop(mount::unmount(&p)));
                        if grow_fs && !read_only {
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
                if MountTable::read()?.mounted_at(path).is_some() && self.owns_mount(&id, path) {
                    unmount_if_mounted(path)?;
                }
                // No publication remains, so every loop device of the image
                // belongs to this staging.
                for d in self.devices(&id) {
                    d.detach_settled()?;
                }
                rec.staging = None;
                self.save(rec)?;
                tracing::info!(volume = %id, path = %path.display(), "volume unstaged");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// NodePublishVolume. Idempotent for the same target, capability and
    /// readonly flag; different ones at the same target are
    /// [`Error::Incompatible`].
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
        let target = req.target_path.clone();
        if let Some(p) = rec.publications.get(&target) {
            if p.capability != req.capability || p.read_only != read_only {
                return Err(Error::Incompatible {
                    volume: id.to_string(),
                    what: "published at this target",
                    reason: "capability or readonly flag differs".into(),
                });
            }
            if MountTable::read()?.mounted_at(&target).is_some() {
                return Ok(());
            }
            tracing::warn!(volume = %id, target = %target.display(), "publication lost its mount; publishing again");
        }
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
        let intent = Publication {
            capability: req.capability.clone(),
            read_only,
            own_device: None,
            created_target: path_kind(&target).map_err(Error::io("inspect", &target))?
                == PathKind::Missing,
        };
        rec.publications.insert(target.clone(), intent.clone());
        self.save_with(rec.clone(), Durability::Deferred)?;
        let publication = match self.do_publish(&id, &st, &target, &req.capability, read_only) {
            Ok(mut p) => {
                p.created_target |= intent.created_target;
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
        Ok(())
    }

    fn do_publish(
        &self,
        id: &VolumeId,
        st: &Staging,
        target: &Path,
        cap: &Capability,
        read_only: bool,
    ) -> Result<Publication> {
        let table = MountTable::read()?;
        let mut rollback = Rollback::new();
        let mut publication = Publication {
            capability: cap.clone(),
            read_only,
            own_device: None,
            created_target: false,
        };
        if cap.is_block() {
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
            refuse_symlinks(target, "target_path")?;
            match path_kind(target).map_err(Error::io("inspect", target))? {
                PathKind::Missing => {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(target)
                        .map_err(Error::io("create target file", target))?;
                    publication.created_target = true;
                    let t = target.to_owned();
                    rollback.push(move || drop(std::fs::remove_file(t)));
                }
                PathKind::File => {}
                PathKind::BlockDevice { .. } if table.mounted_at(target).is_some() => {
                    if !self.owns_device_bind(id, target) {
                        return Err(Error::precondition(
                            id,
                            format!(
                                "{} already has a mount that is not this volume",
                                target.display()
                            ),
                        ));
                    }
                    // A bind made before a crash: adopt it.
                    rollback.disarm();
                    return Ok(publication);
                }
                other => {
                    return Err(Error::invalid(
                        "target_path",
                        format!("{} is not a regular file ({other:?})", target.display()),
                    ));
                }
            }
            mount::bind(&device.path(), target)?;
        } else {
            publication.created_target = self.check_dir_target(target, "target_path", true)?;
            if publication.created_target {
                let t = target.to_owned();
                rollback.push(move || drop(std::fs::remove_dir(t)));
            }
            if table.mounted_at(target).is_some() {
                if identity(target).ok() != identity(&st.path).ok() {
                    return Err(Error::precondition(
                        id,
                        format!(
                            "{} already has a mount that is not this volume",
                            target.display()
                        ),
                    ));
                }
            } else {
                mount::bind(&st.path, target)?;
                let t = target.to_owned();
                rollback.push(move || drop(mount::unmount(&t)));
                let opts = MountOptions::parse(cap.mount_flags()).map_err(|e| {
                    Error::invalid("volume_capability.mount.mount_flags", e.to_string())
                })?;
                if read_only {
                    let keep = os::fs::mount_flags(target).map_err(Error::io("statvfs", target))?;
                    mount::remount_bind_read_only(target, keep | opts.flags)?;
                }
            }
        }
        rollback.disarm();
        Ok(publication)
    }

    /// NodeUnpublishVolume. Idempotent: a target that holds no publication
    /// of this volume is success. Removes the target if stowage made it.
    pub fn unpublish(&self, raw: &str, target: &Path) -> Result<()> {
        let Some(id) = self.local_id(raw) else {
            return Ok(());
        };
        let _g = self.guard(&id)?;
        let mut rec = self.record(&id);
        let Some(p) = rec.publications.get(target).cloned() else {
            return Ok(());
        };
        if MountTable::read()?.mounted_at(target).is_some() {
            let ours = if p.capability.is_block() {
                self.owns_device_bind(&id, target)
            } else {
                rec.staging
                    .as_ref()
                    .is_some_and(|s| identity(target).ok() == identity(&s.path).ok())
            };
            if ours {
                unmount_if_mounted(target)?;
            } else {
                tracing::warn!(volume = %id, target = %target.display(), "target holds a mount that is not this volume; leaving it");
            }
        }
        if p.created_target {
            let r = if p.capability.is_block() {
                std::fs::remove_file(target)
            } else {
                std::fs::remove_dir(target)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove target", target)(e)),
            }
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

    /// NodeExpandVolume: makes the node see a volume the controller grew.
    /// Block: refreshes the loop device's capacity and grows a mounted
    /// filesystem online; raw block needs nothing more; dir volumes nothing
    /// at all. Idempotent. Returns the capacity now usable (0 = unknown).
    pub fn expand(&self, raw: &str, path: &str) -> Result<u64> {
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
        if id.backend == BackendKind::Dir {
            return Ok(0);
        }
        let device = st
            .device
            .as_deref()
            .and_then(LoopDevice::from_path)
            .ok_or_else(|| Error::precondition(&id, "staging recorded no loop device"))?;
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

    /// Re-establishes stagings and publications that lost their loop device
    /// or mount (after a reboot or a crash). Failures are logged, not fatal.
    fn restore(&self) {
        let records: Vec<NodeVolumeRecord> = lock(&self.records).values().cloned().collect();
        for mut rec in records {
            let id = rec.id.clone();
            let Some(st) = rec.staging.clone() else {
                continue;
            };
            let table = match MountTable::read() {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the mount table to restore volumes");
                    return;
                }
            };
            let mut changed = false;
            if !self.staging_intact(&id, &st, &table) {
                match self.do_stage(&id, &st.path, &st.capability, Some(&st), false) {
                    Ok(new) => {
                        tracing::info!(volume = %id, "restored staging after restart");
                        rec.staging = Some(new);
                        changed = true;
                    }
                    Err(e) => {
                        tracing::error!(volume = %id, error = %e, "cannot restore staging");
                        continue;
                    }
                }
            }
            let st = rec.staging.clone().expect("staging present");
            let table = MountTable::read().unwrap_or_default();
            for (target, p) in rec.publications.clone() {
                if table.mounted_at(&target).is_some() {
                    // A deferred record may have lost the publication's own
                    // read-only device; find it again from the bind.
                    if p.capability.is_block() && p.read_only && p.own_device.is_none() {
                        let staged = st.device.clone();
                        if let Some(d) = self
                            .bound_device(&id, &target)
                            .filter(|d| Some(d.path()) != staged)
                        {
                            let mut p = p.clone();
                            p.own_device = Some(d.path());
                            rec.publications.insert(target.clone(), p);
                            changed = true;
                        }
                    }
                    continue;
                }
                match self.do_publish(&id, &st, &target, &p.capability, p.read_only) {
                    Ok(mut new) => {
                        new.created_target |= p.created_target;
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
                let mut points: Vec<PathBuf> = table
                    .of_device(rdev)
                    .map(|m| m.mount_point.clone())
                    .collect();
                points.reverse();
                for p in points {
                    tracing::warn!(device = %dev.path().display(), mount = %p.display(), "unmounting leaked mount");
                    if let Err(e) = unmount_if_mounted(&p) {
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

    /// Whether the node can work (Probe).
    pub fn check_ready(&self) -> std::result::Result<(), String> {
        MountTable::read().map_err(|e| e.to_string())?;
        self.store.check_writable().map_err(|e| e.to_string())
    }
}
