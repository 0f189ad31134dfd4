//! The reconciler's own record (`state.json`): which volume each name
//! became, what was published where, which scheduled snapshots exist, and
//! the intent of any mutating call in flight. Written atomically (temp,
//! fsync, rename, fsync of the directory) under an exclusive lock held for
//! the applier's lifetime; never rewritten in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plugin::Capability;

/// The format version written in the file.
pub const STATE_VERSION: u32 = 1;

/// Everything the reconciler knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// By volume name.
    pub volumes: BTreeMap<String, VolumeState>,
}

/// One volume the reconciler created (or is creating).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    /// None until CreateVolume answered.
    pub volume_id: Option<String>,
    /// The size last asked for (the file's `size`), in bytes.
    pub size_bytes: i64,
    /// The capacity the plugin last reported.
    pub capacity_bytes: i64,
    pub capability: Capability,
    pub parameters: BTreeMap<String, String>,
    /// The mutable parameters last given to CreateVolume or applied with
    /// ControllerModifyVolume (absent in files written before they
    /// existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mutable_parameters: BTreeMap<String, String>,
    /// Where the volume is (or may be, when a crash interrupted the call)
    /// published.
    pub published: Option<Publication>,
    /// Scheduled snapshots taken, in the order taken.
    pub snapshots: Vec<ScheduledSnapshot>,
    /// The mutating call in flight, recorded before it is made.
    pub intent: Option<Intent>,
}

/// A target and its read-only flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publication {
    pub target: PathBuf,
    pub read_only: bool,
}

/// A scheduled snapshot the reconciler took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledSnapshot {
    pub name: String,
    pub id: String,
    /// The slot start (unix seconds) it was taken for.
    pub slot: u64,
    /// Unix seconds, when the plugin reported it.
    pub creation_time: Option<i64>,
}

/// A mutating call that may have been interrupted. On the next run it is
/// repeated with exactly these arguments (every such call is idempotent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Intent {
    /// CreateVolume with the recorded size, capability and parameters.
    Create,
    /// Unpublish from this target.
    Unpublish { target: PathBuf },
    /// Expansion to this many bytes.
    Expand { bytes: i64 },
    /// CreateSnapshot with this name, for this slot.
    Snapshot { name: String, slot: u64 },
    /// DeleteSnapshot of this recorded snapshot.
    PruneSnapshot { name: String },
    /// Unpublish everywhere, then DeleteVolume (`--prune`).
    Delete,
}

/// Why the state could not be read, written or locked.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is held by another stowage apply (only one may run at a time)", .path.display())]
    Locked { path: PathBuf },
    #[error("{} is not a reconciler state file", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format version {found}; this stowage reads {STATE_VERSION}", .path.display())]
    Version { path: PathBuf, found: u32 },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io { what, path, source }
}

/// Reads the state at `path`; an absent file is an empty state.
pub fn read(path: &Path) -> Result<State, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let s: State =
                serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                    path: path.to_owned(),
                    source,
                })?;
            if s.version != STATE_VERSION {
                return Err(StateError::Version {
                    path: path.to_owned(),
                    found: s.version,
                });
            }
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
            version: STATE_VERSION,
            volumes: BTreeMap::new(),
        }),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// The state file, locked for as long as this value lives.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl StateStore {
    /// Takes the exclusive lock (`<path>.lock`, never blocking: a second
    /// applier is refused at once) and returns the store. Creates the
    /// directory when missing.
    pub fn open(path: &Path) -> Result<StateStore, StateError> {
        let path = std::path::absolute(path).map_err(io("resolve", path))?;
        // The directory is resolved (symlinks, `..`) so that two spellings
        // of one state file share one lock.
        let path = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => {
                // The state describes volumes: a directory made for it is
                // owner-only, whatever the umask.
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io("create", dir))?;
                std::fs::canonicalize(dir)
                    .map_err(io("resolve", dir))?
                    .join(name)
            }
            _ => path,
        };
        let lock_path = lock_path(&path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    StateError::Locked {
                        path: lock_path.clone(),
                    }
                } else {
                    io("lock", &lock_path)(std::io::Error::from(errno))
                }
            })?;
        Ok(StateStore { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<State, StateError> {
        read(&self.path)
    }

    /// Replaces the file atomically: after a crash at any instant the file
    /// is either the old state or the new one, never a mix.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let guard = TempGuard(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // Explicitly: a temp file left by a crash keeps its old mode.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        write().map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))?;
        std::mem::forget(guard);
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", dir))
    }
}

/// Removes a temporary file that was not renamed into place.
struct TempGuard<'a>(&'a Path);

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_one_state_file_share_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let _held = StateStore::open(&dir.path().join("real/state.json")).unwrap();
        for other in ["link/state.json", "real/../real/state.json"] {
            let r = StateStore::open(&dir.path().join(other));
            assert!(
                matches!(r, Err(StateError::Locked { .. })),
                "{other}: {r:?}"
            );
        }
    }

    #[test]
    fn state_round_trips_and_a_second_applier_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.load().unwrap().volumes.len(), 0);
        let mut s = store.load().unwrap();
        s.volumes.insert(
            "a".into(),
            VolumeState {
                volume_id: None,
                size_bytes: 1,
                capacity_bytes: 0,
                capability: Capability::default(),
                parameters: BTreeMap::new(),
                mutable_parameters: BTreeMap::from([("k".into(), "v".into())]),
                published: None,
                snapshots: vec![],
                intent: Some(Intent::Snapshot {
                    name: "a-1".into(),
                    slot: 1,
                }),
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!dir.path().join("sub/state.json.tmp").exists());
        match StateStore::open(&path) {
            Err(StateError::Locked { .. }) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(store);
        StateStore::open(&path).unwrap();
    }

    #[test]
    fn a_foreign_or_future_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{\"volumes\": 3}").unwrap();
        assert!(matches!(read(&path), Err(StateError::Corrupt { .. })));
        std::fs::write(&path, "{\"version\": 9, \"volumes\": {}}").unwrap();
        assert!(matches!(
            read(&path),
            Err(StateError::Version { found: 9, .. })
        ));
    }
}
