//! The durable record of volumes, node attachments and registered nodes:
//! one JSON file per record under the state directory, each written
//! atomically (temp + fsync + rename + fsync(dir)), so a `kill -9` at any
//! instant leaves every record either old or new, never torn. The store
//! never interprets records; the domain owns their meaning.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::os;

/// The kinds of record, each in its own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Controller-side volume records, keyed by volume UUID.
    Volumes,
    /// Node-side stage/publish records, keyed by volume UUID.
    NodeVolumes,
    /// Nodes known to the controller, keyed by node id.
    Nodes,
}

impl Table {
    fn dir_name(self) -> &'static str {
        match self {
            Table::Volumes => "volumes",
            Table::NodeVolumes => "node-volumes",
            Table::Nodes => "nodes",
        }
    }
}

/// A state store failure, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {err}")]
    Dir {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("write {path}: {err}")]
    Write {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("read {path}: {err}")]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("decode {path}: {err}")]
    Decode {
        path: PathBuf,
        #[source]
        err: serde_json::Error,
    },
    #[error("record key {0:?} is not a valid file name")]
    BadKey(String),
}

/// A directory of atomically written JSON records.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Store {
    /// Opens (creating if needed) a store at `root` and removes temp files
    /// left by a write that was interrupted.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |err| StateError::Dir { path, err }
        };
        for t in [Table::Volumes, Table::NodeVolumes, Table::Nodes] {
            let dir = root.join(t.dir_name());
            std::fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
            for entry in std::fs::read_dir(&dir).map_err(dir_err(&dir))? {
                let entry = entry.map_err(dir_err(&dir))?;
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, table: Table, key: &str) -> Result<PathBuf, StateError> {
        if !valid_key(key) {
            return Err(StateError::BadKey(key.to_owned()));
        }
        Ok(self.root.join(table.dir_name()).join(format!("{key}.json")))
    }

    /// Durably replaces the record `key` in `table`.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StateError> {
        let path = self.path(table, key)?;
        let bytes = serde_json::to_vec_pretty(value).expect("records serialize");
        os::fs::write_atomic(&path, &bytes).map_err(|err| StateError::Write { path, err })
    }

    /// Durably removes the record `key`; a missing record is success.
    pub fn delete(&self, table: Table, key: &str) -> Result<(), StateError> {
        let path = self.path(table, key)?;
        os::fs::remove_durable(&path).map_err(|err| StateError::Write { path, err })
    }

    /// Reads one record, None when absent.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.path(table, key)?;
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|err| StateError::Decode { path, err }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(StateError::Read { path, err }),
        }
    }

    /// Every record in `table`, with its key.
    pub fn load_all<T: DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<(String, T)>, StateError> {
        let dir = self.root.join(table.dir_name());
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|err| StateError::Dir {
            path: dir.clone(),
            err,
        })?;
        for entry in entries {
            let entry = entry.map_err(|err| StateError::Dir {
                path: dir.clone(),
                err,
            })?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !valid_key(key) {
                continue;
            }
            if let Some(v) = self.get(table, key)? {
                out.push((key.to_owned(), v));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Checks that records can be written here (Probe).
    pub fn check_writable(&self) -> Result<(), StateError> {
        let path = self.root.join(".probe");
        os::fs::write_atomic(&path, b"ok").map_err(|err| StateError::Write {
            path: path.clone(),
            err,
        })?;
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_deletes_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put(Table::Volumes, "abc", &vec![1, 2, 3]).unwrap();
        assert_eq!(
            s.get::<Vec<i32>>(Table::Volumes, "abc").unwrap(),
            Some(vec![1, 2, 3])
        );
        assert_eq!(s.load_all::<Vec<i32>>(Table::Volumes).unwrap().len(), 1);
        s.delete(Table::Volumes, "abc").unwrap();
        s.delete(Table::Volumes, "abc").unwrap();
        assert_eq!(s.get::<Vec<i32>>(Table::Volumes, "abc").unwrap(), None);
    }

    #[test]
    fn refuses_keys_that_are_not_plain_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for k in ["", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(
                matches!(s.put(Table::Nodes, k, &1), Err(StateError::BadKey(_))),
                "{k:?}"
            );
        }
    }

    #[test]
    fn open_removes_interrupted_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        let tmp = dir.path().join("volumes/.x.json.tmp");
        std::fs::write(&tmp, b"{").unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!tmp.exists());
    }
}
