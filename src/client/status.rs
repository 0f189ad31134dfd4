//! `stowage status`: a report for operators of stowage itself. Unlike the
//! other client commands it speaks no CSI: it reads this host's state
//! directory (without taking the writer lock), the pool, the mount table and
//! the loop devices, and lists anything leaked or inconsistent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::output::Table;
use super::size::human_size;
use super::{ClientError, OutputFormat};
use crate::backend::Backends;
use crate::os::loopdev::LoopDevice;
use crate::os::mountinfo::MountTable;
use crate::state::{Store, Table as StateTable};
use crate::volume::record::{NodeVolumeRecord, SnapshotRecord, VolumeRecord};
use crate::volume::{BackendKind, Uuid};

/// Flags of `stowage status`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Exit status: 0 when no problems were found, 1 when problems are listed \
                  (or the report could not be made), 2 for usage errors."
)]
pub struct StatusArgs {
    /// Where stowage keeps its records.
    #[arg(long, default_value = "/var/lib/stowage")]
    pub state_dir: PathBuf,
    /// Where volumes live (default: STATE_DIR/pool).
    #[arg(long)]
    pub pool: Option<PathBuf>,
    /// Output format [default: table]
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<OutputFormat>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub pool: PoolView,
    pub volumes: Vec<VolumeView>,
    /// Snapshot records, ready or not.
    pub snapshots: usize,
    /// Of those, the ones not ready: a background copy still running, or
    /// one that failed and whose record is kept for its ID (the next
    /// CreateSnapshot of its name copies anew under it).
    pub snapshots_not_ready: usize,
    /// Of the ones not ready, those whose copy is running. (A copy whose
    /// server stopped before it could mark the record counts here until
    /// the server's next start, which marks it failed.)
    pub snapshots_copying: usize,
    /// Of the ones not ready, those whose copy failed, with why.
    pub failed_snapshots: Vec<FailedSnapshotView>,
    pub problems: Vec<Problem>,
}

/// A snapshot whose background copy failed; nothing of its data is left,
/// and the next CreateSnapshot of its name copies anew under its ID.
#[derive(Debug, Clone, Serialize)]
pub struct FailedSnapshotView {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub error: String,
}

/// The pool and its capacity.
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub path: PathBuf,
    pub filesystem: String,
    pub strategy: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

/// One volume record and its footprint on this node.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    pub id: String,
    pub name: String,
    pub backend: BackendKind,
    pub size_bytes: u64,
    pub attached_nodes: Vec<String>,
    pub storage_present: bool,
    pub staged: Option<StagedView>,
    pub publications: Vec<PublicationView>,
    pub healthy: bool,
    /// Why the volume is not healthy.
    pub issues: Vec<String>,
}

/// Where a volume is staged.
#[derive(Debug, Clone, Serialize)]
pub struct StagedView {
    pub path: PathBuf,
    pub device: Option<PathBuf>,
    pub mounted: bool,
}

/// One publication target.
#[derive(Debug, Clone, Serialize)]
pub struct PublicationView {
    pub target: PathBuf,
    pub read_only: bool,
    pub device: Option<PathBuf>,
}

/// Something leaked or inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `leaked-loop-device`, `leaked-mount` (a mount of a leaked device,
    /// or of a volume at a path no record names), `storage-without-record`,
    /// `record-without-storage`, `staged-mount-missing`,
    /// `publication-mount-missing`, `device-not-backed`,
    /// `copy-with-unreadable-regions`.
    pub kind: &'static str,
    /// The path, device or volume the problem is about.
    pub subject: String,
    pub detail: String,
}

fn local(what: impl Into<String>) -> impl FnOnce(String) -> ClientError {
    let what = what.into();
    move |e| ClientError::Local(format!("{what}: {e}"))
}

/// Checks that `path` is a directory this process may list, saying which
/// of "does not exist", "is not a directory" and "permission denied" it is.
fn readable_dir(what: &str, path: &Path) -> Result<(), ClientError> {
    match std::fs::read_dir(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ClientError::Local(format!(
            "{what} {} does not exist (give stowage serve's --state-dir/--pool)",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(ClientError::Local(
            format!("{what} {} is not a directory", path.display()),
        )),
        Err(e) if super::is_permission_denied(e.kind()) => Err(ClientError::Local(format!(
            "permission denied on {what} {}: stowage's state and pool are root's \
             (mode 0700); run it as root: sudo stowage status",
            path.display()
        ))),
        Err(source) => Err(ClientError::Io {
            what: format!("cannot read {what} {}", path.display()),
            source,
        }),
    }
}

/// Builds the report. Reads only; changes nothing.
pub fn collect(state_dir: &Path, pool: &Path) -> Result<StatusView, ClientError> {
    readable_dir("state directory", state_dir)?;
    readable_dir("pool", pool)?;
    // The kernel reports loop backing files by their resolved path.
    let pool = pool.canonicalize().unwrap_or_else(|_| pool.to_owned());
    let probed = crate::os::pool::probe(&pool)
        .map_err(|e| local(format!("cannot probe pool {}", pool.display()))(e.to_string()))?;
    let usage = crate::os::fs::usage(&pool).map_err(|e| ClientError::Io {
        what: format!("cannot statvfs pool {}", pool.display()),
        source: e,
    })?;
    let store = Store::open(state_dir)
        .map_err(|e| local(format!("cannot open state {}", state_dir.display()))(e.to_string()))?;
    let state_err = |e: crate::state::StateError| local("cannot read state")(e.to_string());
    let volumes: Vec<(String, VolumeRecord)> =
        store.load_all(StateTable::Volumes).map_err(state_err)?;
    let nodes: Vec<(String, NodeVolumeRecord)> =
        store.load_all(StateTable::NodeVolumes).map_err(state_err)?;
    let snapshots: Vec<(String, SnapshotRecord)> =
        store.load_all(StateTable::Snapshots).map_err(state_err)?;
    let mounts = MountTable::read().map_err(|e| local("cannot read mountinfo")(e.to_string()))?;
    let loops = LoopDevice::list_attached()
        .map_err(|e| local("cannot list loop devices")(e.to_string()))?;
    let backends = Backends::new(&pool, probed.strategy);

    let node_by_volume: BTreeMap<String, NodeVolumeRecord> = nodes
        .into_iter()
        .map(|(_, r)| (r.id.to_string(), r))
        .collect();
    let mut problems = Vec::new();
    let mut claimed: BTreeSet<PathBuf> = BTreeSet::new();
    for rec in node_by_volume.values() {
        if let Some(d) = rec.staging.as_ref().and_then(|s| s.device.clone()) {
            claimed.insert(d);
        }
        claimed.extend(
            rec.publications
                .values()
                .filter_map(|p| p.own_device.clone()),
        );
    }

    let mut views = Vec::new();
    let mut recorded: BTreeSet<(BackendKind, Uuid)> = BTreeSet::new();
    for (_, v) in &volumes {
        let kind = v.id.backend;
        let uuid = v.id.uuid;
        recorded.insert((kind, uuid));
        let id = v.id.to_string();
        let mut issues = Vec::new();
        let mut issue = |kind: &'static str, subject: String, detail: String| {
            issues.push(detail.clone());
            problems.push(Problem {
                kind,
                subject,
                detail,
            });
        };
        let storage_present = backends.store(kind).exists(uuid);
        if !storage_present {
            issue(
                "record-without-storage",
                id.clone(),
                format!("volume {id} has a record but no storage in the pool"),
            );
        }
        let node = node_by_volume.get(&id);
        let image = backends.block.image(uuid);
        let check_device = |dev: &Path, issue: &mut dyn FnMut(&'static str, String, String)| {
            let backing = LoopDevice::from_path(dev).and_then(|d| d.backing_file());
            if kind == BackendKind::Block && backing.as_deref() != Some(image.as_path()) {
                issue(
                    "device-not-backed",
                    dev.display().to_string(),
                    format!(
                        "{} of volume {id} is not backed by its image (backing: {})",
                        dev.display(),
                        backing.map_or("none".into(), |b| b.display().to_string())
                    ),
                );
            }
        };
        let staged = node.and_then(|n| n.staging.as_ref()).map(|s| {
            if s.mounted && mounts.mounted_at(&s.path).is_none() {
                issue(
                    "staged-mount-missing",
                    s.path.display().to_string(),
                    format!(
                        "staging path {} of volume {id} is not mounted",
                        s.path.display()
                    ),
                );
            }
            if let Some(d) = &s.device {
                check_device(d, &mut issue);
            }
            StagedView {
                path: s.path.clone(),
                device: s.device.clone(),
                mounted: s.mounted,
            }
        });
        let mut publications = Vec::new();
        for (target, p) in node.map(|n| &n.publications).into_iter().flatten() {
            if mounts.mounted_at(target).is_none() {
                issue(
                    "publication-mount-missing",
                    target.display().to_string(),
                    format!("target {} of volume {id} is not mounted", target.display()),
                );
            }
            if let Some(d) = &p.own_device {
                check_device(d, &mut issue);
            }
            publications.push(PublicationView {
                target: target.clone(),
                read_only: p.read_only,
                device: p.own_device.clone(),
            });
        }
        for m in unexplained_mounts(&mounts, &backends, &loops, v, node) {
            issue(
                "leaked-mount",
                m.mount_point.display().to_string(),
                format!(
                    "{} mounts volume {id} but is not its recorded staging path or a recorded target",
                    m.mount_point.display()
                ),
            );
        }
        views.push(VolumeView {
            id,
            name: v.name.clone(),
            backend: kind,
            size_bytes: v.capacity_bytes,
            attached_nodes: v.attachments.keys().cloned().collect(),
            storage_present,
            staged,
            publications,
            healthy: issues.is_empty(),
            issues,
        });
    }

    for kind in BackendKind::LOCAL {
        // A pool the server never prepared has no volumes yet.
        if !crate::backend::backend_dir(&pool, kind).is_dir() {
            continue;
        }
        let present = backends
            .store(kind)
            .list()
            .map_err(|e| local(format!("cannot list {kind} volumes"))(e.to_string()))?;
        for uuid in present {
            if !recorded.contains(&(kind, uuid)) {
                let path = match kind {
                    BackendKind::Dir => backends.dir.path(uuid),
                    BackendKind::Block => backends.block.image(uuid),
                    BackendKind::Object | BackendKind::Replicated => continue,
                };
                problems.push(Problem {
                    kind: "storage-without-record",
                    subject: path.display().to_string(),
                    detail: format!("{kind} storage {} has no volume record", path.display()),
                });
            }
        }
    }

    for (dev, backing) in &loops {
        if backends.block.owns_image(backing).is_none() || claimed.contains(&dev.path()) {
            continue;
        }
        problems.push(Problem {
            kind: "leaked-loop-device",
            subject: dev.path().display().to_string(),
            detail: format!(
                "{} is backed by pool image {} but no node record claims it",
                dev.path().display(),
                backing.display()
            ),
        });
        if let Ok(rdev) = dev.rdev() {
            for m in mounts.of_device(rdev) {
                problems.push(Problem {
                    kind: "leaked-mount",
                    subject: m.mount_point.display().to_string(),
                    detail: format!(
                        "{} mounts leaked device {}",
                        m.mount_point.display(),
                        dev.path().display()
                    ),
                });
            }
        }
    }

    for (uuid, regions) in crate::backend::replicated::store::unreadable_in(&pool) {
        problems.push(Problem {
            kind: "copy-with-unreadable-regions",
            subject: format!("replicated:{uuid}"),
            detail: format!(
                "this node's copy lists {} region(s) of 1 MiB its disk could not read while the volume was not published ({regions:?}); the next engine of the volume writes them again",
                regions.len()
            ),
        });
    }

    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert((p.kind, p.subject.clone())));

    Ok(StatusView {
        pool: PoolView {
            path: pool,
            filesystem: probed.fs.to_string(),
            strategy: probed.strategy.to_string(),
            total_bytes: usage.total_bytes,
            used_bytes: usage.used_bytes,
            free_bytes: usage.available_bytes,
        },
        volumes: views,
        snapshots: snapshots.len(),
        snapshots_not_ready: snapshots.iter().filter(|(_, r)| !r.ready).count(),
        snapshots_copying: snapshots
            .iter()
            .filter(|(_, r)| !r.ready && r.failed.is_none())
            .count(),
        failed_snapshots: snapshots
            .iter()
            .filter(|(_, r)| !r.ready)
            .filter_map(|(_, r)| {
                Some(FailedSnapshotView {
                    id: r.id.to_string(),
                    name: r.name.clone(),
                    source_volume_id: r.source_volume_id.clone(),
                    error: r.failed.clone()?,
                })
            })
            .collect(),
        problems,
    })
}

/// Mounts that show volume `v` (binds of a dir volume's directory; mounts
/// of the filesystem on its loop devices, binds of those device nodes) at
/// a path that is neither its recorded staging path nor a recorded target,
/// nor a copy mount propagation made of a mount at one.
fn unexplained_mounts<'a>(
    mounts: &'a MountTable,
    backends: &Backends,
    loops: &[(LoopDevice, PathBuf)],
    v: &VolumeRecord,
    node: Option<&NodeVolumeRecord>,
) -> Vec<&'a crate::os::mountinfo::MountEntry> {
    let mut showing = Vec::new();
    match v.id.backend {
        BackendKind::Dir => {
            let dir = backends.dir.path(v.id.uuid);
            showing.extend(mounts.mounts_showing(&dir));
        }
        BackendKind::Block => {
            let image = backends.block.image(v.id.uuid);
            for (dev, _) in loops.iter().filter(|(_, b)| *b == image) {
                if let Ok(rdev) = dev.rdev() {
                    showing.extend(mounts.of_device(rdev));
                }
                showing.extend(mounts.mounts_showing(&dev.path()));
            }
        }
        // FUSE mounts of a remote store, or the copies on several nodes:
        // nothing in the pool to trace.
        BackendKind::Object | BackendKind::Replicated => {}
    }
    let mut ids = BTreeSet::new();
    showing.retain(|m| ids.insert(m.mount_id));
    let recorded: BTreeSet<&Path> = node
        .into_iter()
        .flat_map(|n| {
            n.staging
                .iter()
                .filter(|s| s.mounted)
                .map(|s| s.path.as_path())
                .chain(n.publications.keys().map(PathBuf::as_path))
        })
        .collect();
    let explained: Vec<_> = showing
        .iter()
        .copied()
        .filter(|m| recorded.contains(m.mount_point.as_path()))
        .collect();
    showing
        .into_iter()
        .filter(|m| {
            !recorded.contains(m.mount_point.as_path())
                && !explained.iter().any(|e| mounts.propagated_copy(m, e))
        })
        .collect()
}

fn size(bytes: u64) -> String {
    human_size(i64::try_from(bytes).unwrap_or(i64::MAX))
}

fn print_table(s: &StatusView) {
    let p = &s.pool;
    println!("Pool:       {}", p.path.display());
    println!("Filesystem: {} ({})", p.filesystem, p.strategy);
    println!(
        "Capacity:   {} total, {} used, {} free",
        size(p.total_bytes),
        size(p.used_bytes),
        size(p.free_bytes)
    );
    match (s.snapshots_copying, s.failed_snapshots.len()) {
        (0, 0) => println!("Snapshots:  {}", s.snapshots),
        (copying, failed) => println!(
            "Snapshots:  {} ({copying} being copied, {failed} whose copy failed)",
            s.snapshots
        ),
    }
    println!();
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "BACKEND",
        "SIZE",
        "NODES",
        "STAGED",
        "DEVICE",
        "PUBLISHED",
        "HEALTH",
    ]);
    for v in &s.volumes {
        t.row(vec![
            v.id.clone(),
            v.name.clone(),
            v.backend.to_string(),
            size(v.size_bytes),
            v.attached_nodes.join(","),
            v.staged
                .as_ref()
                .map_or(String::new(), |st| st.path.display().to_string()),
            v.staged
                .as_ref()
                .and_then(|st| st.device.as_ref())
                .map_or(String::new(), |d| d.display().to_string()),
            v.publications
                .iter()
                .map(|p| p.target.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
            if v.healthy {
                "ok".into()
            } else {
                v.issues.join("; ")
            },
        ]);
    }
    print!("{t}");
    println!();
    if !s.failed_snapshots.is_empty() {
        println!("Failed snapshot copies (the next CreateSnapshot of the name copies anew):");
        for f in &s.failed_snapshots {
            println!(
                "  {} ({}, of {}): {}",
                f.id, f.name, f.source_volume_id, f.error
            );
        }
        println!();
    }
    if s.problems.is_empty() {
        println!("No problems.");
    } else {
        println!("Problems:");
        for pr in &s.problems {
            println!("  {}: {}", pr.kind, pr.detail);
        }
    }
}

/// Runs `stowage status`; Ok(true) when problems were found.
pub fn run(args: &StatusArgs, outer: Option<OutputFormat>) -> Result<bool, ClientError> {
    let pool = args
        .pool
        .clone()
        .unwrap_or_else(|| args.state_dir.join("pool"));
    let view = collect(&args.state_dir, &pool)?;
    match args.output.or(outer).unwrap_or_default() {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&view)?),
        OutputFormat::Table => print_table(&view),
    }
    Ok(!view.problems.is_empty())
}
