//! Controller operations: provisioning, attachment records, listing and
//! capacity. Records live in `state`; storage in the backends. The index
//! lock is held only for map lookups, never across I/O; per-volume (and
//! per-name) exclusion comes from the in-flight guard.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::capability::Capability;
use super::error::{Error, Result};
use super::id::{BackendKind, Uuid, VolumeId, valid_node_id};
use super::inflight::{InFlight, InFlightGuard};
use super::params::{MutableParameters, Parameters};
use super::record::{Attachment, ContentSource, NodeRecord, NodeVolumeRecord, VolumeRecord};
use super::token::TokenSigner;
use super::{FsType, TOPOLOGY_NODE_KEY};
use crate::backend::Backends;
use crate::backend::Object;
use crate::state::{Store, Table};

/// Volume context key saying whether the pool holds the volume to its
/// capacity ("false" for dir volumes on pools without quotas).
pub const CAPACITY_ENFORCED_KEY: &str = "stowage.csi.dev/capacity-enforced";

/// Volume context key reporting the volume's CreateVolume name, added to
/// every volume the controller returns, for people listing volumes
/// (`stowage volume list` shows it as NAME). Opaque to COs like every
/// context key; the node ignores it.
pub const NAME_KEY: &str = "stowage.csi.dev/name";

/// Volume context key reporting thin or thick provisioning.
pub const PROVISIONING_KEY: &str = "stowage.csi.dev/provisioning";

/// Volume context key telling the node to grow the filesystem after the
/// first mount (a restore or clone into a larger volume).
pub const GROW_FS_KEY: &str = "stowage.csi.dev/grow-fs";

/// The filesystem of a content source and of the request must agree.
fn merge_fs(
    field: &'static str,
    source: Option<FsType>,
    asked: Option<FsType>,
) -> Result<Option<FsType>> {
    match (source, asked) {
        (Some(a), Some(b)) if a != b => Err(Error::invalid(
            field,
            format!(
                "the source holds {}, the request asks for {}",
                a.as_str(),
                b.as_str()
            ),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// Size given to a block volume when the request names none.
pub const DEFAULT_BLOCK_SIZE: u64 = crate::backend::block::DEFAULT_SIZE;

/// A topology segment map.
pub type Topology = BTreeMap<String, String>;

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub required_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    pub requisite: Vec<Topology>,
    pub preferred: Vec<Topology>,
    /// Restore from a snapshot or clone a volume.
    pub content_source: Option<ContentSource>,
    /// Mutable parameters (VolumeAttributesClass) given at creation.
    pub mutable_parameters: BTreeMap<String, String>,
    /// Provisioner secrets (remote backends' credentials): never logged
    /// or recorded.
    pub secrets: BTreeMap<String, String>,
}

/// A validated ControllerPublishVolume.
#[derive(Debug, Clone)]
pub struct PublishVolume {
    pub volume_id: String,
    pub node_id: String,
    pub capability: Capability,
    pub read_only: bool,
}

/// Health of a volume as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// A page of ListVolumes.
#[derive(Debug, Clone)]
pub struct VolumePage {
    pub entries: Vec<(VolumeRecord, Condition)>,
    pub next_token: Option<String>,
}

/// Free space answer for GetCapacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub available: u64,
    pub maximum_volume_size: Option<u64>,
}

/// What the controller holds right now (for metrics). Counts come from
/// memory; nothing is read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInventory {
    /// Volume records per backend, every backend listed.
    pub volumes: Vec<(BackendKind, u64)>,
    /// Snapshot records per backend (ready or still being copied).
    pub snapshots: Vec<(BackendKind, u64)>,
    /// Snapshot copies running in the background (sparse-copy pools).
    pub copies_running: u64,
    /// Volumes, snapshots and names held by an operation in flight.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
struct Index {
    by_uuid: BTreeMap<Uuid, VolumeRecord>,
    by_name: HashMap<String, Uuid>,
}

impl Index {
    fn insert(&mut self, rec: VolumeRecord) {
        self.by_name.insert(rec.name.clone(), rec.id.uuid);
        self.by_uuid.insert(rec.id.uuid, rec);
    }

    fn remove(&mut self, uuid: Uuid) {
        if let Some(rec) = self.by_uuid.remove(&uuid) {
            self.by_name.remove(&rec.name);
        }
    }
}

/// The controller side of the driver.
#[derive(Debug)]
pub struct Controller {
    pub(super) node_id: String,
    max_volumes_per_node: u64,
    /// A node agent's controller: only the cluster controller calls it,
    /// and that has checked a ControllerPublish's node is registered.
    nodes_vouched: bool,
    pub(super) backends: Arc<Backends>,
    pub(super) store: Store,
    inflight: InFlight,
    pub(super) tokens: TokenSigner,
    index: Mutex<Index>,
    pub(super) snapshots: Mutex<super::snapshot::SnapshotIndex>,
    pub(super) groups: Mutex<super::group::GroupIndex>,
}

/// The size a volume gets: rounded up to the backend's granularity,
/// within the limit (a limit that is not a multiple of the granularity is
/// used as is, aligned to 4 KiB), never below `min`.
pub fn choose_size(
    required: Option<u64>,
    limit: Option<u64>,
    default: u64,
    min: u64,
    round: impl Fn(u64) -> u64,
) -> std::result::Result<u64, String> {
    if let (Some(r), Some(l)) = (required, limit)
        && r > l
    {
        return Err(format!("required_bytes {r} exceeds limit_bytes {l}"));
    }
    let want = match required {
        Some(r) => r.max(min),
        None => default.min(limit.unwrap_or(u64::MAX)).max(min),
    };
    let size = round(want);
    match limit {
        Some(l) if size > l => {
            let aligned = l - l % 4096;
            if aligned >= want && aligned > 0 {
                Ok(aligned)
            } else {
                Err(format!(
                    "limit_bytes {l} is below the smallest size this volume can have ({size})"
                ))
            }
        }
        _ => Ok(size),
    }
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock(m: &Mutex<Index>) -> MutexGuard<'_, Index> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Controller {
    /// Loads every volume record and removes pool storage that no record
    /// explains (left by a crash between creating storage and recording
    /// it).
    pub fn open(
        node_id: &str,
        max_volumes_per_node: u64,
        backends: Arc<Backends>,
        store: Store,
    ) -> Result<Self> {
        let mut index = Index::default();
        for (_, rec) in store.load_all::<VolumeRecord>(Table::Volumes)? {
            index.insert(rec);
        }
        for rec in index.by_uuid.values() {
            if backends
                .store(rec.id.backend)
                .repair(rec.id.uuid, rec.capacity_bytes)?
            {
                tracing::warn!(volume = %rec.id, "recreated volume storage that a crash lost before it was durable");
            }
        }
        for kind in BackendKind::LOCAL {
            let backend = backends.store(kind);
            for uuid in backend.list()? {
                let known = index
                    .by_uuid
                    .get(&uuid)
                    .is_some_and(|r| r.id.backend == kind);
                if !known {
                    tracing::warn!(backend = %kind, %uuid, "removing pool storage with no volume record (interrupted create)");
                    backend.delete(uuid)?;
                }
            }
        }
        let mut snapshots = super::snapshot::SnapshotIndex::load(&store, &backends)?;
        let groups = super::group::GroupIndex::load(&store, &mut snapshots, &backends)?;
        Ok(Self {
            node_id: node_id.to_owned(),
            max_volumes_per_node,
            nodes_vouched: false,
            backends,
            store,
            inflight: InFlight::default(),
            tokens: TokenSigner::default(),
            index: Mutex::new(index),
            snapshots: Mutex::new(snapshots),
            groups,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The volume this node holds under the CSI name `name`, if any (the
    /// controller of several nodes asks before placing a new volume, so a
    /// retried CreateVolume finds the volume wherever it was made).
    pub fn volume_by_name(&self, name: &str) -> Option<VolumeId> {
        let idx = lock(&self.index);
        idx.by_name
            .get(name)
            .and_then(|u| idx.by_uuid.get(u))
            .map(|r| r.id.clone())
    }

    /// Every (CSI name, volume) this node holds.
    pub fn volume_names(&self) -> Vec<(String, VolumeId)> {
        let idx = lock(&self.index);
        idx.by_name
            .iter()
            .filter_map(|(n, u)| idx.by_uuid.get(u).map(|r| (n.clone(), r.id.clone())))
            .collect()
    }

    /// The pool's free bytes (as GetCapacity counts them) and its size.
    pub fn pool_space(&self) -> std::io::Result<(u64, u64)> {
        let free = self.backends.available_bytes()?;
        let total = crate::os::fs::usage(&self.backends.pool)?.total_bytes;
        Ok((free, total))
    }

    pub(super) fn guard(&self, key: String) -> Result<InFlightGuard> {
        self.inflight
            .try_acquire(key.clone())
            .ok_or(Error::Busy(key))
    }

    pub(super) fn lookup(&self, raw: &str) -> Result<VolumeRecord> {
        let id = VolumeId::parse(raw).ok_or_else(|| Error::VolumeNotFound(raw.to_owned()))?;
        lock(&self.index)
            .by_uuid
            .get(&id.uuid)
            .filter(|r| r.id == id)
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(raw.to_owned()))
    }

    /// This node's topology segment.
    pub fn topology(&self) -> Topology {
        BTreeMap::from([(TOPOLOGY_NODE_KEY.to_owned(), self.node_id.clone())])
    }

    fn topology_ok(&self, requisite: &[Topology], preferred: &[Topology]) -> bool {
        let ours = self.topology();
        let fits = |t: &Topology| t.iter().all(|(k, v)| ours.get(k) == Some(v));
        // With requisite set, one of them must fit; preferred alone only
        // orders choices, and with a single node there is nothing to order.
        let _ = preferred;
        requisite.is_empty() || requisite.iter().any(fits)
    }

    /// CreateVolume. Idempotent by name: the same name with compatible
    /// arguments returns the existing volume; incompatible arguments are
    /// [`Error::NameConflict`].
    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord> {
        let params =
            Parameters::parse(&req.parameters).map_err(|r| Error::invalid("parameters", r))?;
        if let Some(n) = params.node.as_deref()
            && n != self.node_id
        {
            return Err(Error::invalid(
                "parameters",
                format!("node={n:?}: this is node {:?}", self.node_id),
            ));
        }
        let backend = params.backend;
        if backend == BackendKind::Replicated {
            return Err(Error::invalid(
                "parameters",
                "backend=replicated needs a cluster: a controller (serve --mode controller) with node agents (serve --mode node) that keep the copies",
            ));
        }
        if !backend.profile().node_local() {
            return self.create_object_volume(req);
        }
        for c in &req.capabilities {
            c.supported_by(backend)
                .map_err(|r| Error::invalid("volume_capabilities", r))?;
        }
        let mutable = MutableParameters::parse(&req.mutable_parameters, backend)
            .map_err(|r| Error::invalid("mutable_parameters", r))?;
        let profile = backend.profile();
        let fs = profile
            .filesystem(&req.capabilities)
            .map_err(|r| Error::invalid("volume_capabilities", r))?;
        let _g = self.guard(format!("name:{}", req.name))?;

        let existing = {
            let idx = lock(&self.index);
            idx.by_name
                .get(&req.name)
                .and_then(|u| idx.by_uuid.get(u))
                .cloned()
        };
        if let Some(rec) = existing {
            self.check_compatible(&rec, &req, backend, fs)?;
            return Ok(rec);
        }
        if !self.topology_ok(&req.requisite, &req.preferred) {
            return Err(Error::TopologyUnsatisfiable(format!(
                "volumes live on node {:?}, which no requisite topology names",
                self.node_id
            )));
        }
        // The content source, held (guarded, frozen) until the copy is made.
        let mut source: Option<(Object, u64)> = None;
        let mut fs = fs;
        let mut _source_guard = None;
        let mut _frozen = None;
        let source_field = "volume_content_source";
        match &req.content_source {
            None => {}
            Some(ContentSource::Snapshot(raw)) => {
                let s = self.restore_source(raw)?;
                if s.id.backend != backend || s.id.node != self.node_id {
                    return Err(Error::invalid(
                        source_field,
                        format!(
                            "snapshot {} is of a {} volume on node {}; cannot restore it as a {backend} volume on {}",
                            s.id, s.id.backend, s.id.node, self.node_id
                        ),
                    ));
                }
                fs = merge_fs(source_field, s.fs_type, fs)?;
                source = Some((Object::Snapshot(s.id.uuid), s.size_bytes));
            }
            Some(ContentSource::Volume(raw)) => {
                let v = self.lookup(raw)?;
                if v.id.backend != backend || v.id.node != self.node_id {
                    return Err(Error::invalid(
                        source_field,
                        format!(
                            "volume {} is a {} volume on node {}; cannot clone it as a {backend} volume on {}",
                            v.id, v.id.backend, v.id.node, self.node_id
                        ),
                    ));
                }
                fs = merge_fs(source_field, v.fs_type, fs)?;
                _source_guard = Some(self.guard(format!("vol:{}", v.id))?);
                _frozen = self.freeze_source(&v)?;
                source = Some((Object::Volume(v.id.uuid), v.capacity_bytes));
            }
        }
        let store = self.backends.store(backend);
        let (default, min) = profile.sizes(fs);
        let size = choose_size(req.required_bytes, req.limit_bytes, default, min, |s| {
            store.round_size(s)
        })
        .map_err(Error::CapacityOutOfRange)?;
        let size = match source {
            None => size,
            Some((_, src_size)) => {
                if req.required_bytes.is_some_and(|r| r < src_size)
                    || req.limit_bytes.is_some_and(|l| l < src_size)
                {
                    return Err(Error::CapacityOutOfRange(format!(
                        "the content source holds {src_size} bytes; the new volume cannot be smaller"
                    )));
                }
                size.max(src_size)
            }
        };

        let id = VolumeId {
            backend,
            node: self.node_id.clone(),
            uuid: Uuid::new_random(),
        };
        let rec = VolumeRecord {
            id: id.clone(),
            name: req.name.clone(),
            capacity_bytes: size,
            fs_type: fs,
            capabilities: req.capabilities.clone(),
            parameters: Parameters::defining(&req.parameters),
            volume_context: BTreeMap::from([
                (
                    "stowage.csi.dev/backend".to_owned(),
                    backend.as_str().to_owned(),
                ),
                (
                    CAPACITY_ENFORCED_KEY.to_owned(),
                    store.capacity_enforced().to_string(),
                ),
            ]),
            created_at: now_secs(),
            attachments: BTreeMap::new(),
            content_source: req.content_source.clone(),
            thick: false,
        };
        let mut rec = rec;
        match source {
            None => store.create(id.uuid, size)?,
            Some((from, src_size)) => {
                store.copy(from, Object::Volume(id.uuid), &|_, _| true)?;
                // Also sets the new volume's own capacity limit (dir).
                if let Err(e) = store.expand(id.uuid, size) {
                    let _ = store.delete(id.uuid);
                    return Err(e.into());
                }
                if size > src_size && fs.is_some() {
                    // The filesystem inside is the source's size: the
                    // node grows it on first stage.
                    rec.volume_context
                        .insert(GROW_FS_KEY.to_owned(), "true".to_owned());
                }
            }
        }
        if mutable.thick == Some(true)
            && let Err(e) = self.make_thick(&mut rec)
        {
            let _ = store.delete(id.uuid);
            return Err(e);
        }
        if let Err(e) = self.store.put(Table::Volumes, &id.uuid.to_hex(), &rec) {
            let _ = store.delete(id.uuid);
            return Err(e.into());
        }
        lock(&self.index).insert(rec.clone());
        tracing::info!(volume = %id, name = %req.name, size, thick = rec.thick, "volume created");
        Ok(rec)
    }

    /// The volume recorded under a CSI name.
    pub(super) fn record_by_name(&self, name: &str) -> Option<VolumeRecord> {
        let idx = lock(&self.index);
        idx.by_name
            .get(name)
            .and_then(|u| idx.by_uuid.get(u))
            .cloned()
    }

    pub(super) fn index_insert(&self, rec: VolumeRecord) {
        lock(&self.index).insert(rec);
    }

    pub(super) fn index_remove(&self, uuid: Uuid) {
        lock(&self.index).remove(uuid);
    }

    pub(super) fn check_compatible(
        &self,
        rec: &VolumeRecord,
        req: &CreateVolume,
        backend: BackendKind,
        fs: Option<FsType>,
    ) -> Result<()> {
        let conflict = |reason: String| Error::NameConflict {
            name: req.name.clone(),
            existing: rec.id.to_string(),
            reason,
        };
        if req.content_source != rec.content_source {
            return Err(conflict("content source differs".into()));
        }
        if rec.id.backend != backend || rec.parameters != Parameters::defining(&req.parameters) {
            return Err(conflict("parameters differ".into()));
        }
        if req.required_bytes.is_some_and(|r| rec.capacity_bytes < r) {
            return Err(conflict(format!(
                "existing capacity {} is below required_bytes",
                rec.capacity_bytes
            )));
        }
        if req.limit_bytes.is_some_and(|l| rec.capacity_bytes > l) {
            return Err(conflict(format!(
                "existing capacity {} exceeds limit_bytes",
                rec.capacity_bytes
            )));
        }
        if let (Some(a), Some(b)) = (rec.fs_type, fs)
            && a != b
        {
            return Err(conflict(format!(
                "existing filesystem is {}, request asks for {}",
                a.as_str(),
                b.as_str()
            )));
        }
        if !self.topology_ok(&req.requisite, &req.preferred) {
            return Err(conflict(
                "existing volume is outside the requisite topology".into(),
            ));
        }
        Ok(())
    }

    /// DeleteVolume. Idempotent: an unknown or malformed ID is success. A
    /// volume still published or staged is refused.
    pub fn delete_volume(&self, raw: &str, secrets: &BTreeMap<String, String>) -> Result<()> {
        let Some(id) = VolumeId::parse(raw) else {
            return Ok(());
        };
        let _g = self.guard(format!("vol:{id}"))?;
        let rec = lock(&self.index).by_uuid.get(&id.uuid).cloned();
        let Some(rec) = rec.filter(|r| r.id == id) else {
            return Ok(());
        };
        if !rec.attachments.is_empty() {
            return Err(Error::precondition(
                &id,
                format!(
                    "still published to node(s) {:?}",
                    rec.attachments.keys().collect::<Vec<_>>()
                ),
            ));
        }
        if let Some(n) = self
            .store
            .get::<NodeVolumeRecord>(Table::NodeVolumes, &id.uuid.to_hex())?
            .filter(|n| !n.is_empty())
        {
            return Err(Error::precondition(
                &id,
                format!(
                    "still staged or published on node {} ({} publication(s))",
                    n.id.node,
                    n.publications.len()
                ),
            ));
        }
        if !id.backend.profile().node_local() {
            return self.delete_object_volume(&rec, secrets);
        }
        // Record first, storage second: a crash in between leaves storage
        // that no record explains, which the next start removes.
        self.store.delete(Table::Volumes, &id.uuid.to_hex())?;
        lock(&self.index).remove(id.uuid);
        if let Err(e) = self.backends.store(id.backend).delete(id.uuid) {
            // Put the record back so a retry finds the volume again.
            self.store.put(Table::Volumes, &id.uuid.to_hex(), &rec)?;
            lock(&self.index).insert(rec);
            return Err(e.into());
        }
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// Makes this a node agent's controller, called only by the cluster
    /// controller, which answers for the nodes a volume is published to
    /// (they registered with it): remote volumes can then be published to
    /// every node of the cluster, not only this one.
    pub fn with_vouched_nodes(mut self) -> Self {
        self.nodes_vouched = true;
        self
    }

    fn node_known(&self, node_id: &str) -> Result<bool> {
        if node_id == self.node_id {
            return Ok(true);
        }
        if !valid_node_id(node_id) {
            return Ok(false);
        }
        if self.nodes_vouched {
            return Ok(true);
        }
        Ok(self
            .store
            .get::<NodeRecord>(Table::Nodes, node_id)?
            .is_some())
    }

    /// ControllerPublishVolume: records the attachment and returns the
    /// publish context. Idempotent for an identical attachment.
    pub fn publish(&self, req: PublishVolume) -> Result<BTreeMap<String, String>> {
        let rec = self.lookup(&req.volume_id)?;
        if !self.node_known(&req.node_id)? {
            return Err(Error::NodeNotFound(req.node_id));
        }
        let id = rec.id.clone();
        let _g = self.guard(format!("vol:{id}"))?;
        let mut rec = self.lookup(&req.volume_id)?;
        req.capability
            .supported_by(id.backend)
            .map_err(|r| Error::invalid("volume_capability", r))?;
        if let (Some(a), Some(b)) = (rec.fs_type, req.capability.fs_type())
            && a != b
        {
            return Err(Error::invalid(
                "volume_capability",
                format!("volume has filesystem {}, not {}", a.as_str(), b.as_str()),
            ));
        }
        let context = BTreeMap::from([
            (
                "stowage.csi.dev/backend".to_owned(),
                id.backend.as_str().to_owned(),
            ),
            (
                "stowage.csi.dev/readonly".to_owned(),
                req.read_only.to_string(),
            ),
        ]);
        let wanted = Attachment {
            capability: req.capability.clone(),
            read_only: req.read_only,
        };
        if let Some(a) = rec.attachments.get(&req.node_id) {
            if *a == wanted {
                return Ok(context);
            }
            return Err(Error::Incompatible {
                volume: id.to_string(),
                what: "published to this node",
                reason: "capability or readonly flag differs".into(),
            });
        }
        let local = id.backend.profile().node_local();
        if local && req.node_id != id.node {
            return Err(Error::precondition(
                &id,
                format!(
                    "volume is local to node {:?} and cannot be used on {:?}",
                    id.node, req.node_id
                ),
            ));
        }
        // Remote storage serves many nodes when the access mode allows it.
        if let Some(other) = rec
            .attachments
            .keys()
            .next()
            .filter(|_| local || !req.capability.access_mode.is_multi_node())
        {
            return Err(Error::precondition(
                &id,
                format!("already published to node {other:?} with a single-node access mode"),
            ));
        }
        if self.max_volumes_per_node > 0 {
            let count = lock(&self.index)
                .by_uuid
                .values()
                .filter(|r| r.attachments.contains_key(&req.node_id))
                .count() as u64;
            if count >= self.max_volumes_per_node {
                return Err(Error::AttachLimit {
                    node: req.node_id,
                    max: self.max_volumes_per_node,
                });
            }
        }
        rec.attachments.insert(req.node_id.clone(), wanted);
        self.store.put(Table::Volumes, &id.uuid.to_hex(), &rec)?;
        lock(&self.index).insert(rec);
        Ok(context)
    }

    /// ControllerUnpublishVolume: forgets the attachment (all of them when
    /// `node_id` is empty). An unknown volume or node is success: the
    /// volume is not published there.
    pub fn unpublish(&self, raw: &str, node_id: &str) -> Result<()> {
        let Ok(rec) = self.lookup(raw) else {
            return Ok(());
        };
        let id = rec.id.clone();
        let _g = self.guard(format!("vol:{id}"))?;
        let mut rec = self.lookup(raw)?;
        let before = rec.attachments.len();
        if node_id.is_empty() {
            rec.attachments.clear();
        } else {
            rec.attachments.remove(node_id);
        }
        if rec.attachments.len() != before {
            self.store.put(Table::Volumes, &id.uuid.to_hex(), &rec)?;
            lock(&self.index).insert(rec);
        }
        Ok(())
    }

    /// ValidateVolumeCapabilities: Ok(None) when confirmed, Ok(Some(reason))
    /// when not.
    pub fn validate(
        &self,
        raw: &str,
        caps: &[Capability],
        parameters: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let rec = self.lookup(raw)?;
        for c in caps {
            if let Err(r) = c.supported_by(rec.id.backend) {
                return Ok(Some(r));
            }
            if let (Some(a), Some(b)) = (rec.fs_type, c.fs_type())
                && a != b
            {
                return Ok(Some(format!(
                    "volume has filesystem {}, not {}",
                    a.as_str(),
                    b.as_str()
                )));
            }
        }
        if !parameters.is_empty() && Parameters::defining(parameters) != rec.parameters {
            return Ok(Some("parameters differ from the volume's".into()));
        }
        Ok(None)
    }

    fn condition(&self, rec: &VolumeRecord) -> Condition {
        if !rec.id.backend.profile().node_local() {
            // A FUSE mount that lost its daemon, as the node recorded it.
            let lost = self
                .store
                .get::<NodeVolumeRecord>(Table::NodeVolumes, &rec.id.uuid.to_hex())
                .ok()
                .flatten()
                .and_then(|n| n.staging)
                .and_then(|s| s.fuse)
                .and_then(|f| f.lost);
            return match lost {
                Some(why) => Condition {
                    abnormal: true,
                    message: why,
                },
                None => Condition {
                    abnormal: false,
                    message: "object volume: its mounts on this node serve".into(),
                },
            };
        }
        if self.backends.store(rec.id.backend).exists(rec.id.uuid) {
            Condition {
                abnormal: false,
                message: "volume storage present".into(),
            }
        } else {
            Condition {
                abnormal: true,
                message: format!(
                    "volume storage is missing from pool {}",
                    self.backends.pool.display()
                ),
            }
        }
    }

    /// ListVolumes, in ID order from `starting_token`.
    pub fn list(&self, max_entries: usize, starting_token: &str) -> Result<VolumePage> {
        let after = if starting_token.is_empty() {
            None
        } else {
            let pos = self
                .tokens
                .verify(starting_token)
                .and_then(Uuid::parse_hex)
                .ok_or_else(|| Error::InvalidToken(starting_token.to_owned()))?;
            Some(pos)
        };
        let all: Vec<VolumeRecord> = {
            let idx = lock(&self.index);
            match after {
                Some(a) => idx
                    .by_uuid
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(_, r)| r.clone())
                    .collect(),
                None => idx.by_uuid.values().cloned().collect(),
            }
        };
        let take = if max_entries == 0 {
            all.len()
        } else {
            max_entries
        };
        let next_token =
            (all.len() > take).then(|| self.tokens.issue(&all[take - 1].id.uuid.to_hex()));
        let entries = all
            .into_iter()
            .take(take)
            .map(|r| {
                let c = self.condition(&r);
                (r, c)
            })
            .collect();
        Ok(VolumePage {
            entries,
            next_token,
        })
    }

    /// ControllerExpandVolume: grows the volume's storage to the requested
    /// size (rounded up within the limit). Idempotent; shrinking is
    /// [`Error::CapacityOutOfRange`]. Returns the new capacity and whether
    /// the node must expand too (block volumes: loop device, filesystem).
    pub fn expand_volume(
        &self,
        raw: &str,
        required: Option<u64>,
        limit: Option<u64>,
    ) -> Result<(u64, bool)> {
        let rec = self.lookup(raw)?;
        let _g = self.guard(format!("vol:{}", rec.id))?;
        let mut rec = self.lookup(raw)?;
        let store = self.backends.store(rec.id.backend);
        let size = choose_size(required, limit, rec.capacity_bytes, 0, |s| {
            store.round_size(s)
        })
        .map_err(Error::CapacityOutOfRange)?;
        if size < rec.capacity_bytes {
            return Err(Error::CapacityOutOfRange(format!(
                "volume is {} bytes; shrinking to {size} is not supported",
                rec.capacity_bytes
            )));
        }
        let node_expansion = rec.id.backend.profile().node_expansion();
        if size == rec.capacity_bytes {
            return Ok((size, node_expansion));
        }
        store.expand(rec.id.uuid, size)?;
        rec.capacity_bytes = size;
        if rec.thick {
            self.make_thick(&mut rec)?;
        }
        self.store
            .put(Table::Volumes, &rec.id.uuid.to_hex(), &rec)?;
        tracing::info!(volume = %rec.id, size, "volume expanded");
        lock(&self.index).insert(rec);
        Ok((size, node_expansion))
    }

    /// Reserves the volume's space and marks it thick.
    fn make_thick(&self, rec: &mut VolumeRecord) -> Result<()> {
        if !self.backends.store(rec.id.backend).reserve(rec.id.uuid)? {
            return Err(Error::NoSpace(format!(
                "cannot reserve {} bytes for thick volume {}",
                rec.capacity_bytes, rec.id
            )));
        }
        rec.thick = true;
        rec.volume_context
            .insert(PROVISIONING_KEY.to_owned(), "thick".to_owned());
        Ok(())
    }

    /// ControllerModifyVolume: applies mutable parameters (`provisioning`).
    /// Idempotent; unknown or inapplicable keys are INVALID_ARGUMENT.
    pub fn modify_volume(&self, raw: &str, params: &BTreeMap<String, String>) -> Result<()> {
        let rec = self.lookup(raw)?;
        let mutable = MutableParameters::parse(params, rec.id.backend)
            .map_err(|r| Error::invalid("mutable_parameters", r))?;
        let _g = self.guard(format!("vol:{}", rec.id))?;
        let mut rec = self.lookup(raw)?;
        if !rec.id.backend.profile().node_local() {
            return self.modify_object_volume(rec, &mutable);
        }
        match mutable.thick {
            None => return Ok(()),
            Some(thick) if thick == rec.thick => return Ok(()),
            Some(true) => self.make_thick(&mut rec)?,
            Some(false) => {
                // Space already written stays allocated; new growth is sparse.
                rec.thick = false;
                rec.volume_context
                    .insert(PROVISIONING_KEY.to_owned(), "thin".to_owned());
            }
        }
        self.store
            .put(Table::Volumes, &rec.id.uuid.to_hex(), &rec)?;
        tracing::info!(volume = %rec.id, thick = rec.thick, "volume modified");
        lock(&self.index).insert(rec);
        Ok(())
    }

    /// ControllerGetVolume.
    pub fn get(&self, raw: &str) -> Result<(VolumeRecord, Condition)> {
        let rec = self.lookup(raw)?;
        let c = self.condition(&rec);
        Ok((rec, c))
    }

    /// GetCapacity: the pool's free space for volumes matching the given
    /// parameters, capabilities and topology (0 where none can be made).
    pub fn capacity(
        &self,
        caps: &[Capability],
        parameters: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<Capacity> {
        let params = Parameters::parse(parameters).map_err(|r| Error::invalid("parameters", r))?;
        let none = Capacity {
            available: 0,
            maximum_volume_size: Some(0),
        };
        if params.node.as_deref().is_some_and(|n| n != self.node_id) {
            return Ok(none);
        }
        if let Some(t) = topology
            && !self.topology_ok(std::slice::from_ref(t), &[])
        {
            return Ok(none);
        }
        if caps.iter().any(|c| c.supported_by(params.backend).is_err()) {
            return Ok(none);
        }
        let available = self
            .backends
            .available_bytes()
            .map_err(Error::io("statvfs", self.backends.pool.clone()))?;
        Ok(Capacity {
            available,
            maximum_volume_size: Some(available),
        })
    }

    /// Counts of what this controller holds, for metrics.
    pub fn inventory(&self) -> ControllerInventory {
        const KINDS: [BackendKind; 4] = BackendKind::ALL;
        let volumes = {
            let index = lock(&self.index);
            KINDS
                .map(|k| {
                    let n = index.by_uuid.values().filter(|r| r.id.backend == k).count();
                    (k, n as u64)
                })
                .to_vec()
        };
        let snaps = self.snaps();
        ControllerInventory {
            volumes,
            snapshots: KINDS.map(|k| (k, snaps.count(k))).to_vec(),
            copies_running: snaps.copies_running(),
            in_flight: self.inflight.len() as u64,
        }
    }

    /// Whether the pool and the state directory are usable (Probe).
    pub fn check_ready(&self) -> std::result::Result<(), String> {
        self.store.check_writable().map_err(|e| e.to_string())?;
        for kind in BackendKind::LOCAL {
            self.backends
                .store(kind)
                .list()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(n: u64) -> u64 {
        n << 20
    }

    #[test]
    fn size_rounds_up_within_limit() {
        let r = |s: u64| s.div_ceil(mib(1)) * mib(1);
        assert_eq!(
            choose_size(Some(1), None, mib(1024), mib(16), r),
            Ok(mib(16))
        );
        assert_eq!(choose_size(Some(mib(20) + 1), None, 0, 0, r), Ok(mib(21)));
        assert_eq!(
            choose_size(None, None, mib(1024), mib(16), r),
            Ok(mib(1024))
        );
        assert_eq!(
            choose_size(None, Some(mib(100)), mib(1024), mib(16), r),
            Ok(mib(100))
        );
        // A limit that is not MiB-aligned is used as is (4 KiB aligned).
        assert_eq!(
            choose_size(Some(mib(20) + 1), Some(mib(20) + 8192), 0, 0, r),
            Ok(mib(20) + 8192)
        );
    }

    #[test]
    fn size_out_of_range() {
        let r = |s: u64| s;
        assert!(choose_size(Some(10), Some(5), 0, 0, r).is_err());
        assert!(choose_size(None, Some(mib(1)), mib(1024), mib(300), r).is_err());
    }
}
