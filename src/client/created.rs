//! What the client remembers of the volumes it created: the capability
//! each was created for (raw block or a filesystem, which one, the access
//! mode), so that a later `volume publish` or `stage` without `--block`
//! does not format a raw block volume, and a flag that contradicts it is
//! refused before any call. One file per volume,
//! `<staging-root>/.volumes/<id>.json`, 0600 in a 0700 directory, written
//! atomically; removed by `volume delete`. Plain CSI has no call that
//! reports a volume's access type, so a volume this client did not create
//! has no record and its flags are taken as given.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ClientError;
use super::publish::{CapabilityRecord, private_dir, sanitize_id, write_private};

/// A volume this client created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedRecord {
    pub volume_id: String,
    /// The CreateVolume name.
    pub name: String,
    pub capability: CapabilityRecord,
}

fn dir(root: &Path) -> Result<PathBuf, ClientError> {
    let root = std::path::absolute(root).map_err(|source| ClientError::Io {
        what: format!("cannot resolve {}", root.display()),
        source,
    })?;
    Ok(root.join(".volumes"))
}

fn path(root: &Path, id: &str) -> Result<PathBuf, ClientError> {
    Ok(dir(root)?.join(format!("{}.json", sanitize_id(id)?)))
}

/// Records `rec` (replacing an earlier record of the same id).
pub fn save(root: &Path, rec: &CreatedRecord) -> Result<(), ClientError> {
    private_dir(&dir(root)?)?;
    write_private(
        &path(root, &rec.volume_id)?,
        &serde_json::to_vec_pretty(rec)?,
    )
}

/// The record of `id`, if this client created it (None when there is no
/// record, or none this user may read: the flags are then taken as given).
pub fn load(root: &Path, id: &str) -> Result<Option<CreatedRecord>, ClientError> {
    let path = path(root, id)?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Local(format!("volume record {}: {e}", path.display()))),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || super::is_permission_denied(e.kind()) =>
        {
            Ok(None)
        }
        Err(source) => Err(ClientError::Io {
            what: format!("cannot read {}", path.display()),
            source,
        }),
    }
}

/// Forgets `id` (nothing to do when there is no record).
pub fn remove(root: &Path, id: &str) -> Result<(), ClientError> {
    let path = path(root, id)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ClientError::Io {
            what: format!("cannot remove {}", path.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_are_private_and_round_trip() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(load(root.path(), "block:n:1").unwrap(), None);
        let rec = CreatedRecord {
            volume_id: "block:n:1".into(),
            name: "data".into(),
            capability: CapabilityRecord {
                block: true,
                fs: String::new(),
                access_mode: "rwo".into(),
            },
        };
        save(root.path(), &rec).unwrap();
        assert_eq!(load(root.path(), "block:n:1").unwrap(), Some(rec));
        let d = root.path().join(".volumes");
        assert_eq!(d.metadata().unwrap().permissions().mode() & 0o777, 0o700);
        let f = std::fs::read_dir(&d)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        remove(root.path(), "block:n:1").unwrap();
        remove(root.path(), "block:n:1").unwrap();
        assert_eq!(load(root.path(), "block:n:1").unwrap(), None);
    }
}
