//! The engines running on this node: one per staged replicated volume, each
//! an [`EngineDriver`] serving the volume as one file on a FUSE filesystem
//! of its own (`<state>/replicated/<uuid>/`) with a loop device on it in
//! direct-I/O mode. NodeStage attaches one from the publish_context that
//! ControllerPublish returned; NodeUnstage detaches it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use super::driver::{DriverConfig, DriverError, DriverStatus, EngineDriver};
use super::engine::{CopyPhase, EngineState};
use super::protocol::Ballot;
use super::record::ReplicaRecord;
use super::wire::Peer;
use crate::os::fuse_file::{FuseFileError, FuseLoopDevice, FuseOptions, VOLUME_FILE};
use crate::os::loopdev::LoopDevice;
use crate::volume::id::Uuid;

/// `publish_context` keys the engine starts from (set by the controller's
/// ControllerPublishVolume).
pub const CONTEXT_RECORD: &str = "replicated.stowage.io/record";
pub const CONTEXT_BALLOT: &str = "replicated.stowage.io/ballot";
pub const CONTEXT_ADDRESSES: &str = "replicated.stowage.io/addresses";

/// Makes the transport to a volume's voters from their addresses
/// (node id → host:port); set once by the server in cluster mode.
pub type Connector = Arc<dyn Fn(&BTreeMap<String, String>) -> Arc<dyn Peer> + Send + Sync>;

/// Why an engine could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("publish_context: {0}")]
    Context(String),
    #[error("this node is not part of a cluster: replicated volumes need node agents")]
    NoCluster,
    #[error("the volume is published on node {owner:?}, not on this node {node}")]
    NotOwner { owner: Option<String>, node: String },
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Fuse(#[from] FuseFileError),
    #[error("heal: {0}")]
    Healing(String),
    #[error("heal: {0}")]
    Fenced(String),
}

/// Whether a heal gets anywhere: fewer regions left to rebuild than ever,
/// or more copies in sync than ever. (Bytes sent are no measure: a copy
/// whose writes keep failing is rebuilt over and over.)
#[derive(Debug)]
struct Progress {
    /// The fewest regions left, the most copies in sync.
    best: (usize, usize),
    at: std::time::Instant,
}

impl Progress {
    fn new(now: std::time::Instant) -> Self {
        Progress {
            best: (usize::MAX, 0),
            at: now,
        }
    }

    /// Notes `left` regions to rebuild and `joined` copies in sync at
    /// `now`: whether nothing progressed for `stall`.
    fn stalled(
        &mut self,
        left: usize,
        joined: usize,
        now: std::time::Instant,
        stall: std::time::Duration,
    ) -> bool {
        if left < self.best.0 || joined > self.best.1 {
            self.best = (self.best.0.min(left), self.best.1.max(joined));
            self.at = now;
        }
        now.duration_since(self.at) >= stall
    }
}

/// What a heal did ([`Engines::heal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Healed {
    /// Bytes the engine wrote to copies it rebuilt.
    pub rebuilt_bytes: u64,
    pub elapsed: std::time::Duration,
}

/// What ControllerPublishVolume gave the node.
#[derive(Debug, Clone)]
pub struct PublishContext {
    pub record: ReplicaRecord,
    pub ballot: Ballot,
    pub addresses: BTreeMap<String, String>,
}

impl PublishContext {
    pub fn parse(ctx: &BTreeMap<String, String>) -> Result<Self, EngineError> {
        fn field<T: serde::de::DeserializeOwned>(
            ctx: &BTreeMap<String, String>,
            key: &str,
        ) -> Result<T, EngineError> {
            let raw = ctx.get(key).ok_or_else(|| {
                EngineError::Context(format!(
                    "{key} is missing (was the volume published with ControllerPublishVolume?)"
                ))
            })?;
            serde_json::from_str(raw).map_err(|e| EngineError::Context(format!("{key}: {e}")))
        }
        let record: ReplicaRecord = field(ctx, CONTEXT_RECORD)?;
        record
            .validate()
            .map_err(|e| EngineError::Context(format!("{CONTEXT_RECORD}: {e}")))?;
        Ok(PublishContext {
            record,
            ballot: field(ctx, CONTEXT_BALLOT)?,
            addresses: field(ctx, CONTEXT_ADDRESSES)?,
        })
    }
}

#[derive(Debug)]
struct Running {
    driver: Arc<EngineDriver>,
    device: FuseLoopDevice,
}

/// The engines of this node.
pub struct Engines {
    node: String,
    dir: PathBuf,
    connect: OnceLock<Connector>,
    running: Mutex<HashMap<Uuid, Running>>,
    /// The engines of heals running here ([`Engines::heal`]), for their
    /// status.
    healing: Mutex<HashMap<Uuid, Arc<EngineDriver>>>,
    /// How engines started from now on serve their FUSE file (the
    /// defaults unless [`Engines::set_fuse_workers`] was called).
    options: Mutex<FuseOptions>,
    /// `serve --replica-scrub-every` and `--replica-scrub-rate`.
    scrub: Mutex<(Option<std::time::Duration>, u64)>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Engines {
    /// Engines of `node`, with their FUSE mounts under `dir`.
    pub fn new(node: &str, dir: PathBuf) -> Self {
        Engines {
            node: node.to_owned(),
            dir,
            connect: OnceLock::new(),
            running: Mutex::new(HashMap::new()),
            healing: Mutex::new(HashMap::new()),
            options: Mutex::new(FuseOptions::default()),
            scrub: Mutex::new((None, 16 << 20)),
        }
    }

    /// The number of FUSE worker threads of each engine started from now
    /// on (`serve --fuse-workers`). Each worker answers one kernel request
    /// at a time, so they bound the I/O a volume has in flight on its
    /// local copy.
    pub fn set_fuse_workers(&self, workers: usize) {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .workers = workers.max(1);
    }

    /// How engines started from now on scrub their volumes (see
    /// [`DriverConfig::scrub_every`]).
    pub fn set_scrub(&self, every: Option<std::time::Duration>, rate: u64) {
        *self.scrub.lock().unwrap_or_else(|e| e.into_inner()) = (every, rate);
    }

    /// Enables replicated volumes on this node (cluster mode).
    pub fn set_connector(&self, c: Connector) {
        let _ = self.connect.set(c);
    }

    fn mount_point(&self, uuid: Uuid) -> PathBuf {
        self.dir.join(uuid.to_hex())
    }

    /// The FUSE file the volume's loop device is backed by.
    pub fn image(&self, uuid: Uuid) -> PathBuf {
        self.mount_point(uuid).join(VOLUME_FILE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loop device of the volume's running engine.
    pub fn attached(&self, uuid: Uuid) -> Option<LoopDevice> {
        self.lock().get(&uuid).map(|r| r.device.device().clone())
    }

    /// The running engine's state.
    pub fn status(&self, uuid: Uuid) -> Option<DriverStatus> {
        self.lock().get(&uuid).map(|r| r.driver.status())
    }

    /// The state of the engine of a heal of `uuid` running here.
    pub fn heal_status(&self, uuid: Uuid) -> Option<DriverStatus> {
        self.healing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uuid)
            .map(|d| d.status())
    }

    /// Every volume a heal's engine runs for here.
    pub fn heals(&self) -> Vec<Uuid> {
        self.healing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// The volume's engine, if one runs here.
    pub fn driver(&self, uuid: Uuid) -> Option<Arc<EngineDriver>> {
        self.lock().get(&uuid).map(|r| Arc::clone(&r.driver))
    }

    /// Every volume with a running engine.
    pub fn volumes(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    /// Whether an engine of `uuid` may start here from `pc`: this node is
    /// in a cluster, the record is the volume's, and its owner is this
    /// node, a heal's (`heal`) or a publication's. The connector then.
    fn owned(
        &self,
        uuid: Uuid,
        pc: &PublishContext,
        heal: bool,
    ) -> Result<&Connector, EngineError> {
        let connect = self.connect.get().ok_or(EngineError::NoCluster)?;
        if pc.record.uuid != uuid {
            return Err(EngineError::Context(format!(
                "the record is of volume {}, not {uuid}",
                pc.record.uuid
            )));
        }
        let owner = pc.record.owner.as_ref();
        if !owner.is_some_and(|o| o.node == self.node && o.heal == heal) {
            return Err(EngineError::NotOwner {
                owner: owner.map(|o| o.node.clone()),
                node: self.node.clone(),
            });
        }
        Ok(connect)
    }

    /// Starts the volume's engine from its publish_context and returns the
    /// loop device serving it. Blocking: call from a blocking thread of the
    /// runtime (the node services do). An engine already running is
    /// stopped first (a NodeStage after a failure starts anew).
    pub fn attach(
        &self,
        uuid: Uuid,
        ctx: &BTreeMap<String, String>,
    ) -> Result<LoopDevice, EngineError> {
        let pc = PublishContext::parse(ctx)?;
        let connect = self.owned(uuid, &pc, false)?;
        self.detach(uuid)?;
        let peer = connect(&pc.addresses);
        let rt = tokio::runtime::Handle::current();
        let mut cfg = DriverConfig::new(uuid, &self.node, pc.record.size);
        (cfg.scrub_every, cfg.scrub_rate) = *self.scrub.lock().unwrap_or_else(|e| e.into_inner());
        let size = cfg.size;
        let driver = rt.block_on(EngineDriver::start(
            cfg,
            pc.ballot,
            pc.record,
            peer,
            rt.clone(),
        ))?;
        // The volume may have grown since this publish_context was made
        // (a recovery with the old one): the engine's record is the newest.
        let newest = driver.status().record.size;
        let size = if newest > size {
            if let Err(e) = rt.block_on(driver.grow(newest)) {
                let _ = rt.block_on(driver.stop());
                return Err(e.into());
            }
            newest
        } else {
            size
        };
        let handler: Arc<dyn crate::os::fuse_file::BlockHandler> = driver.clone();
        let options = self
            .options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let device = match FuseLoopDevice::attach(&self.mount_point(uuid), size, handler, &options)
        {
            Ok(d) => d,
            Err(e) => {
                let _ = rt.block_on(driver.stop());
                return Err(e.into());
            }
        };
        let loopdev = device.device().clone();
        tracing::info!(volume = %uuid, device = %loopdev.path().display(), "replicated volume's engine started");
        self.lock().insert(uuid, Running { driver, device });
        Ok(loopdev)
    }

    /// A heal of a volume nobody publishes (its record's owner is a heal's
    /// on this node, [`super::protocol::Change::Heal`]): runs an engine
    /// with no mount, and so no I/O, until every copy is in sync (it
    /// rebuilds those out of sync and the regions copies could not read),
    /// then stops it, rebuilding at `rate` bytes per second
    /// ([`DriverConfig::rebuild_rate`]). Fails when the engine is fenced (a publication took
    /// the volume over) or stops, or when nothing progressed for `stall`.
    /// The engine is not one of [`Self::volumes`]; dropping the future
    /// stops it. `ours` says whether this node's copy still has the heal
    /// as its owner: an engine with no I/O may not hear of a publication
    /// that took the volume over until it next calls a copy.
    pub async fn heal(
        &self,
        uuid: Uuid,
        pc: PublishContext,
        rate: Option<u64>,
        stall: std::time::Duration,
        ours: impl Fn() -> bool,
    ) -> Result<Healed, EngineError> {
        let connect = self.owned(uuid, &pc, true)?;
        let started = std::time::Instant::now();
        let mut cfg = DriverConfig::new(uuid, &self.node, pc.record.size);
        cfg.heal = true;
        cfg.rebuild_rate = rate;
        let driver = EngineDriver::start(
            cfg,
            pc.ballot,
            pc.record,
            connect(&pc.addresses),
            tokio::runtime::Handle::current(),
        )
        .await?;
        tracing::info!(volume = %uuid, "heal: an engine with no mount rebuilds the copies out of sync");
        // Listed for its status while this runs (also when the caller
        // drops it).
        struct Listed<'a>(&'a Engines, Uuid, Arc<EngineDriver>);
        impl Drop for Listed<'_> {
            fn drop(&mut self) {
                let mut h = self.0.healing.lock().unwrap_or_else(|e| e.into_inner());
                if h.get(&self.1).is_some_and(|d| Arc::ptr_eq(d, &self.2)) {
                    h.remove(&self.1);
                }
            }
        }
        self.healing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uuid, Arc::clone(&driver));
        let _listed = Listed(self, uuid, Arc::clone(&driver));
        let mut progress = Progress::new(std::time::Instant::now());
        let mut turn = 0u64;
        loop {
            turn += 1;
            let st = driver.status();
            // Its copy's record, read once a second (a stat or two).
            if st.state == EngineState::Fenced || (turn % 5 == 4 && !ours()) {
                let _ = driver.stop().await;
                return Err(EngineError::Fenced(format!(
                    "the heal's engine was fenced (a publication took the volume over) after {} bytes rebuilt",
                    st.rebuild_bytes
                )));
            }
            if st.stopped || st.state != EngineState::Running {
                let _ = driver.stop().await;
                return Err(EngineError::Healing(format!(
                    "the engine ended ({:?}) after {} bytes rebuilt",
                    st.state, st.rebuild_bytes
                )));
            }
            let in_sync = st.record.in_sync.len() == st.record.copies().count()
                && st
                    .copies
                    .iter()
                    .all(|c| c.phase == CopyPhase::InSync && !c.failing);
            if in_sync {
                driver.stop().await?;
                tracing::info!(volume = %uuid, bytes = st.rebuild_bytes, "heal done: every copy in sync");
                return Ok(Healed {
                    rebuilt_bytes: st.rebuild_bytes,
                    elapsed: started.elapsed(),
                });
            }
            let left = st.copies.iter().map(|c| c.dirty).sum::<usize>();
            let joined = st.record.in_sync.len();
            if progress.stalled(left, joined, std::time::Instant::now(), stall) {
                let _ = driver.stop().await;
                return Err(EngineError::Healing(format!(
                    "no progress for {} s ({} bytes rebuilt; copies: {})",
                    stall.as_secs(),
                    st.rebuild_bytes,
                    st.copies
                        .iter()
                        .map(|c| format!("{} {:?}", c.node, c.phase))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// The controller changed the volume's members: its engine here (a
    /// publication's or a heal's) learns the addresses of voters that
    /// joined (`addresses`, node id -> host:port) and reads the newest
    /// record. Returns whether an engine runs for the volume here (nothing
    /// to do otherwise: the next engine starts from the newest record).
    pub fn refresh(
        &self,
        uuid: Uuid,
        addresses: &BTreeMap<String, String>,
    ) -> Result<bool, EngineError> {
        self.connect.get().ok_or(EngineError::NoCluster)?;
        // A publication's engine, or a heal's: without the addresses of
        // copies added while it runs, it could not rebuild them.
        let running = self.lock().get(&uuid).map(|r| Arc::clone(&r.driver));
        let driver = running.or_else(|| {
            self.healing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&uuid)
                .cloned()
        });
        let Some(driver) = driver else {
            return Ok(false);
        };
        driver.refresh(addresses.clone())?;
        Ok(true)
    }

    /// Grows the running engine's volume to `size` bytes (its record must
    /// say so already: ControllerExpandVolume), then the FUSE file and the
    /// loop device. Idempotent; never shrinks.
    pub fn resize(&self, uuid: Uuid, size: u64) -> Result<(), EngineError> {
        let running = self.lock();
        let r = running.get(&uuid).ok_or_else(|| {
            EngineError::Context(format!(
                "no engine runs for volume {uuid} on this node: stage it first"
            ))
        })?;
        if size <= r.device.fuse().size() {
            return Ok(());
        }
        let rt = tokio::runtime::Handle::current();
        rt.block_on(r.driver.grow(size))?;
        r.device.resize(size)?;
        tracing::info!(volume = %uuid, size, "replicated volume grown on the node");
        Ok(())
    }

    /// Lazily detaches the FUSE mount a dead engine left (its process
    /// ended: the kernel answers every request with ENOTCONN). Nothing to
    /// do while the engine runs or when nothing is mounted there.
    #[allow(clippy::disallowed_methods)]
    pub fn clear_dead(&self, uuid: Uuid) -> Result<(), EngineError> {
        if self.lock().contains_key(&uuid) {
            return Ok(());
        }
        let point = self.mount_point(uuid);
        match nix::mount::umount2(
            &point,
            nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
        ) {
            Ok(()) => {
                tracing::info!(volume = %uuid, "detached the FUSE mount of a dead engine");
                Ok(())
            }
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(EngineError::Fuse(FuseFileError::MountPoint {
                path: point,
                err: std::io::Error::from_raw_os_error(e as i32),
            })),
        }
    }

    /// Stops the volume's engine: detaches the loop device (unmount what
    /// is on it first), unmounts the FUSE file, flushes and stops the
    /// driver. Idempotent.
    pub fn detach(&self, uuid: Uuid) -> Result<(), EngineError> {
        let Some(r) = self.lock().remove(&uuid) else {
            return Ok(());
        };
        let closed = r.device.close();
        let rt = tokio::runtime::Handle::current();
        let stopped = rt.block_on(r.driver.stop());
        let _ = std::fs::remove_dir(self.mount_point(uuid));
        closed?;
        if let Err(e) = stopped {
            tracing::warn!(volume = %uuid, error = %e, "the replicated engine's last flush failed");
        }
        tracing::info!(volume = %uuid, "replicated volume's engine stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A heal progresses while regions left shrink or copies join; going
    /// round in circles (a copy whose writes keep failing, rebuilt again
    /// and again) is a stall.
    #[test]
    fn a_heal_that_goes_round_in_circles_stalls() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let stall = Duration::from_secs(60);
        let mut p = Progress::new(t0);
        for (s, left) in [(0, 100), (50, 60), (100, 20), (150, 1)] {
            assert!(!p.stalled(left, 2, at(s), stall), "{left} left at {s} s");
        }
        // Back up and down again, never below 1: no progress since 150 s.
        assert!(!p.stalled(40, 2, at(180), stall));
        assert!(!p.stalled(1, 2, at(200), stall));
        assert!(p.stalled(40, 2, at(210), stall));
        // A copy joined: progress.
        assert!(!p.stalled(40, 3, at(220), stall));
        assert!(p.stalled(40, 3, at(280), stall));
    }
}
