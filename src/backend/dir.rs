//! The `dir` backend: a directory per volume in the pool, bind-mounted on
//! the node. Capacity is recorded but not enforced on this pool (quotas
//! come with the snapshot/expansion work).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Attached, BackendError, VolumeAttacher, VolumeStore, backend_dir, list_uuids};
use crate::volume::{BackendKind, Uuid};

/// Directory volumes under `<pool>/volumes/dir/`.
#[derive(Debug, Clone)]
pub struct DirBackend {
    root: PathBuf,
}

impl DirBackend {
    pub fn new(pool: &Path) -> Self {
        Self {
            root: backend_dir(pool, BackendKind::Dir),
        }
    }

    /// The volume's directory.
    pub fn path(&self, uuid: Uuid) -> PathBuf {
        self.root.join(uuid.to_hex())
    }

    fn io(
        &self,
        uuid: Uuid,
        what: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> BackendError {
        let path = path.to_owned();
        move |err| BackendError::Io {
            backend: BackendKind::Dir,
            uuid,
            what,
            path,
            err,
        }
    }
}

impl VolumeStore for DirBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dir
    }

    fn round_size(&self, requested: u64) -> u64 {
        requested
    }

    fn create(&self, uuid: Uuid, _size: u64) -> Result<(), BackendError> {
        let p = self.path(uuid);
        match std::fs::create_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => return Ok(()),
            Err(e) => return Err(self.io(uuid, "create", &p)(e)),
        }
        // Pods run as arbitrary users; the pool root (0700) keeps the
        // directory unreachable except through its mounts.
        let r = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777));
        if let Err(e) = r {
            let _ = std::fs::remove_dir(&p);
            return Err(self.io(uuid, "create", &p)(e));
        }
        Ok(())
    }

    fn delete(&self, uuid: Uuid) -> Result<(), BackendError> {
        let p = self.path(uuid);
        match std::fs::remove_dir_all(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(uuid, "delete", &p)(e)),
        }
    }

    fn exists(&self, uuid: Uuid) -> bool {
        self.path(uuid).is_dir()
    }

    fn repair(&self, uuid: Uuid, size: u64) -> Result<bool, BackendError> {
        if self.exists(uuid) {
            return Ok(false);
        }
        self.create(uuid, size).map(|()| true)
    }

    fn list(&self) -> Result<Vec<Uuid>, BackendError> {
        list_uuids(&self.root, "")
    }
}

impl VolumeAttacher for DirBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dir
    }

    fn attach(&self, uuid: Uuid, _read_only: bool) -> Result<Attached, BackendError> {
        if !self.exists(uuid) {
            return Err(BackendError::Missing {
                backend: BackendKind::Dir,
                uuid,
            });
        }
        Ok(Attached::Directory(self.path(uuid)))
    }

    fn attached(&self, uuid: Uuid) -> Result<Vec<Attached>, BackendError> {
        Ok(if self.exists(uuid) {
            vec![Attached::Directory(self.path(uuid))]
        } else {
            vec![]
        })
    }

    fn detach(&self, _attached: &Attached) -> Result<(), BackendError> {
        Ok(())
    }
}
