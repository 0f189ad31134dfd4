//! The durable record of volumes, node attachments and registered nodes.
//!
//! Each table is an append-only log (`<table>.log`) of checksummed entries
//! `[len u32][crc32 u32][json {"k":key,"v":value|null}]`, written into space
//! that was zero-filled ahead of time so that an append changes no file
//! metadata and one `fdatasync` makes it durable. Replay stops at the first
//! entry whose length or checksum does not hold, so a write torn by
//! `kill -9` or power loss is simply not there (it was never acknowledged).
//! A log that grows well past its live data is compacted into a new file
//! (temp + fsync + rename + fsync(dir)).
//!
//! A process writes a table only after taking an exclusive lock on its log;
//! tables it does not write are read fresh from disk on every call, so a
//! controller can read the node's records in a split deployment. The store
//! never interprets records; the domain owns their meaning.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::os;

/// The kinds of record, each in its own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Controller-side volume records, keyed by volume UUID.
    Volumes,
    /// Node-side stage/publish records, keyed by volume UUID.
    NodeVolumes,
    /// Nodes known to the controller, keyed by node id.
    Nodes,
    /// Snapshots, keyed by snapshot UUID.
    Snapshots,
    /// Group snapshots, keyed by group UUID.
    GroupSnapshots,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Volumes,
        Table::NodeVolumes,
        Table::Nodes,
        Table::Snapshots,
        Table::GroupSnapshots,
    ];

    /// The table's name in logs and metrics (its log file, less `.log`).
    pub fn name(self) -> &'static str {
        self.file_name().trim_end_matches(".log")
    }

    fn file_name(self) -> &'static str {
        match self {
            Table::Volumes => "volumes.log",
            Table::NodeVolumes => "node-volumes.log",
            Table::Nodes => "nodes.log",
            Table::Snapshots => "snapshots.log",
            Table::GroupSnapshots => "group-snapshots.log",
        }
    }
}

/// Whether a write must be on stable storage before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before returning.
    Immediate,
    /// In the log, durable with the next immediate write (for records that
    /// can be rebuilt from the system after a crash).
    Deferred,
}

/// The size of one table's log, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    pub table: Table,
    /// The log file's size on disk (entries and zero-filled space ahead),
    /// 0 when there is no log yet.
    pub file_bytes: u64,
    /// Bytes of entries, live and superseded; None for a table this
    /// process has not written (it would have to replay the log).
    pub used_bytes: Option<u64>,
    /// Bytes the live records would take in a freshly compacted log; None
    /// as for `used_bytes`.
    pub live_bytes: Option<u64>,
    /// Compactions since this process opened the log for writing.
    pub compactions: u64,
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
    #[error("decode a record of {path}: {err}")]
    Decode {
        path: PathBuf,
        #[source]
        err: serde_json::Error,
    },
    #[error("{0} is written by another stowage process")]
    Locked(PathBuf),
    #[error("record key {0:?} is not a valid name")]
    BadKey(String),
}

/// Zero-filled space is added to a log this many bytes at a time.
const CHUNK: u64 = 1 << 20;
/// Entry header: length and checksum.
const HEADER: usize = 8;
/// The largest entry accepted on replay (guards against garbage lengths).
const MAX_ENTRY: usize = 16 << 20;

#[derive(Serialize, serde::Deserialize)]
struct Entry {
    k: String,
    v: Option<serde_json::Value>,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Replays a log: the live records and the offset where the next entry
/// goes.
fn replay(
    bytes: &[u8],
    path: &Path,
) -> Result<(BTreeMap<String, serde_json::Value>, u64), StateError> {
    let mut records = BTreeMap::new();
    let mut off = 0usize;
    while off + HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_ENTRY || off + HEADER + len > bytes.len() {
            break;
        }
        let payload = &bytes[off + HEADER..off + HEADER + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let entry: Entry = serde_json::from_slice(payload).map_err(|err| StateError::Decode {
            path: path.to_owned(),
            err,
        })?;
        match entry.v {
            Some(v) => records.insert(entry.k, v),
            None => records.remove(&entry.k),
        };
        off += HEADER + len;
    }
    Ok((records, off as u64))
}

fn encode(key: &str, value: Option<serde_json::Value>) -> Vec<u8> {
    let payload = serde_json::to_vec(&Entry {
        k: key.to_owned(),
        v: value,
    })
    .expect("records serialize");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A log this process writes.
#[derive(Debug)]
struct Writer {
    path: PathBuf,
    file: Arc<File>,
    /// Held for the lock on the log.
    _lock: nix::fcntl::Flock<File>,
    /// Where the next entry goes.
    end: u64,
    /// Bytes of zero-filled space in the file.
    allocated: u64,
    records: BTreeMap<String, serde_json::Value>,
    /// Encoded size of each live record, and their sum (to decide when to
    /// compact without re-encoding everything).
    sizes: HashMap<String, u64>,
    live: u64,
    /// Compactions since this process opened the log.
    compactions: u64,
}

fn zero_fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 64 << 10];
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

impl Writer {
    fn open(root: &Path, table: Table) -> Result<Self, StateError> {
        let path = root.join(table.file_name());
        let werr = |p: &Path| {
            let p = p.to_owned();
            move |err| StateError::Write { path: p, err }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(werr(&path))?;
        let lock_file = file.try_clone().map_err(werr(&path))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StateError::Locked(path.clone()))?;
        // Only the lock holder compacts, so a temp file here is a
        // compaction that was interrupted.
        let _ = std::fs::remove_file(path.with_extension("log.tmp"));
        let mut bytes = Vec::new();
        (&file)
            .read_to_end(&mut bytes)
            .map_err(|err| StateError::Read {
                path: path.clone(),
                err,
            })?;
        let (records, end) = replay(&bytes, &path)?;
        let sizes: HashMap<String, u64> = records
            .iter()
            .map(|(k, v)| (k.clone(), encode(k, Some(v.clone())).len() as u64))
            .collect();
        let live = sizes.values().sum();
        let mut w = Writer {
            path,
            file: Arc::new(file),
            _lock: lock,
            end,
            allocated: bytes.len() as u64,
            records,
            sizes,
            live,
            compactions: 0,
        };
        // Zero whatever follows the last good entry (a torn write), so
        // later entries are never read back behind garbage.
        if w.end < w.allocated {
            zero_fill(&w.file, w.end, w.allocated).map_err(werr(&w.path))?;
        }
        if w.allocated < w.end + CHUNK / 2 || w.allocated < CHUNK {
            w.grow(CHUNK)?;
        }
        w.file.sync_all().map_err(werr(&w.path))?;
        if let Some(dir) = w.path.parent() {
            os::fs::sync_dir(dir).map_err(werr(dir))?;
        }
        if w.wants_compaction() {
            w.compact()?;
        }
        Ok(w)
    }

    fn wants_compaction(&self) -> bool {
        self.end > 4 * CHUNK && self.end > 4 * self.live
    }

    /// Applies an entry to the in-memory view.
    fn apply(&mut self, key: &str, value: Option<serde_json::Value>, size: u64) {
        if let Some(old) = self.sizes.remove(key) {
            self.live -= old;
        }
        match value {
            Some(v) => {
                self.records.insert(key.to_owned(), v);
                self.sizes.insert(key.to_owned(), size);
                self.live += size;
            }
            None => {
                self.records.remove(key);
            }
        }
    }

    /// Adds `at_least` bytes of zero-filled space (durably: the file size
    /// changes).
    fn grow(&mut self, at_least: u64) -> Result<(), StateError> {
        let new = (self.allocated + at_least).div_ceil(CHUNK) * CHUNK;
        zero_fill(&self.file, self.allocated, new)
            .and_then(|()| self.file.sync_all())
            .map_err(|err| StateError::Write {
                path: self.path.clone(),
                err,
            })?;
        self.allocated = new;
        Ok(())
    }

    /// Rewrites the live records into a fresh log and swaps it in.
    fn compact(&mut self) -> Result<(), StateError> {
        let tmp = self.path.with_extension("log.tmp");
        let mut bytes = Vec::new();
        for (k, v) in &self.records {
            bytes.extend_from_slice(&encode(k, Some(v.clone())));
        }
        let end = bytes.len() as u64;
        let allocated = (end + CHUNK).div_ceil(CHUNK) * CHUNK;
        bytes.resize(allocated as usize, 0);
        let werr = |err| StateError::Write {
            path: tmp.clone(),
            err,
        };
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .read(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            Ok(f)
        })();
        let f = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(werr(e));
            }
        };
        // Lock the new file before it replaces the old one.
        let lock = nix::fcntl::Flock::lock(
            f.try_clone().map_err(werr)?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|_| StateError::Locked(tmp.clone()))?;
        std::fs::rename(&tmp, &self.path).map_err(werr)?;
        if let Some(dir) = self.path.parent() {
            os::fs::sync_dir(dir).map_err(werr)?;
        }
        self.file = Arc::new(f);
        self._lock = lock;
        self.end = end;
        self.allocated = allocated;
        self.compactions += 1;
        Ok(())
    }
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    writers: Mutex<HashMap<Table, Writer>>,
}

/// The state store. Cheap to clone; clones share the open logs.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (creating if needed) a store at `root`. Logs are opened for
    /// writing on first write.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(root).map_err(|err| StateError::Dir {
            path: root.to_owned(),
            err,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                writers: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn writers(&self) -> MutexGuard<'_, HashMap<Table, Writer>> {
        self.inner.writers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(
        &self,
        table: Table,
        key: &str,
        value: Option<serde_json::Value>,
        durability: Durability,
    ) -> Result<(), StateError> {
        if !valid_key(key) {
            return Err(StateError::BadKey(key.to_owned()));
        }
        let entry = encode(key, value.clone());
        let (file, path) = {
            let mut writers = self.writers();
            let w = match writers.entry(table) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Writer::open(&self.inner.root, table)?)
                }
            };
            if w.end + entry.len() as u64 > w.allocated {
                w.grow(entry.len() as u64)?;
            }
            w.file
                .write_all_at(&entry, w.end)
                .map_err(|err| StateError::Write {
                    path: w.path.clone(),
                    err,
                })?;
            w.end += entry.len() as u64;
            w.apply(key, value, entry.len() as u64);
            if w.wants_compaction() {
                w.compact()?;
            }
            (Arc::clone(&w.file), w.path.clone())
        };
        // Outside the lock: concurrent writers share one flush.
        if durability == Durability::Immediate {
            file.sync_data()
                .map_err(|err| StateError::Write { path, err })?;
        }
        Ok(())
    }

    /// Durably replaces the record `key` in `table`.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StateError> {
        self.put_with(table, key, value, Durability::Immediate)
    }

    /// Replaces the record `key` in `table` with the given durability.
    pub fn put_with<T: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StateError> {
        let v = serde_json::to_value(value).expect("records serialize");
        self.write(table, key, Some(v), durability)
    }

    /// Durably removes the record `key`; a missing record is success.
    pub fn delete(&self, table: Table, key: &str) -> Result<(), StateError> {
        self.write(table, key, None, Durability::Immediate)
    }

    fn snapshot(&self, table: Table) -> Result<BTreeMap<String, serde_json::Value>, StateError> {
        let mine = self.writers().get(&table).map(|w| w.records.clone());
        if let Some(records) = mine {
            return Ok(records);
        }
        let path = self.inner.root.join(table.file_name());
        match std::fs::read(&path) {
            Ok(bytes) => Ok(replay(&bytes, &path)?.0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(err) => Err(StateError::Read { path, err }),
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: Table,
        v: serde_json::Value,
    ) -> Result<T, StateError> {
        serde_json::from_value(v).map_err(|err| StateError::Decode {
            path: self.inner.root.join(table.file_name()),
            err,
        })
    }

    /// Reads one record, None when absent.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        if !valid_key(key) {
            return Err(StateError::BadKey(key.to_owned()));
        }
        let v = self.snapshot(table)?.remove(key);
        v.map(|v| self.decode(table, v)).transpose()
    }

    /// Every record in `table`, with its key, in key order.
    pub fn load_all<T: DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<(String, T)>, StateError> {
        self.snapshot(table)?
            .into_iter()
            .map(|(k, v)| Ok((k, self.decode(table, v)?)))
            .collect()
    }

    /// The size of every table's log and how often it was compacted. Reads
    /// only metadata: never replays a log.
    pub fn log_stats(&self) -> Vec<LogStats> {
        let writers = self.writers();
        Table::ALL
            .iter()
            .map(|&table| match writers.get(&table) {
                Some(w) => LogStats {
                    table,
                    file_bytes: w.allocated,
                    used_bytes: Some(w.end),
                    live_bytes: Some(w.live),
                    compactions: w.compactions,
                },
                None => LogStats {
                    table,
                    file_bytes: std::fs::metadata(self.inner.root.join(table.file_name()))
                        .map_or(0, |m| m.len()),
                    used_bytes: None,
                    live_bytes: None,
                    compactions: 0,
                },
            })
            .collect()
    }

    /// Checks that the state directory accepts durable writes (Probe).
    pub fn check_writable(&self) -> Result<(), StateError> {
        let path = self.inner.root.join(".probe");
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
    use proptest::prelude::*;

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
        drop(s);
        let s = Store::open(dir.path()).unwrap();
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
    fn a_second_writer_is_refused_but_may_read() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        a.put(Table::Nodes, "n1", &1).unwrap();
        let b = Store::open(dir.path()).unwrap();
        assert_eq!(b.get::<i32>(Table::Nodes, "n1").unwrap(), Some(1));
        assert!(matches!(
            b.put(Table::Nodes, "n2", &2),
            Err(StateError::Locked(_))
        ));
        a.put(Table::Nodes, "n3", &3).unwrap();
        assert_eq!(
            b.get::<i32>(Table::Nodes, "n3").unwrap(),
            Some(3),
            "reads are fresh"
        );
    }

    #[test]
    fn torn_tail_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put(Table::Volumes, "a", &"first").unwrap();
        s.put(Table::Volumes, "b", &"second").unwrap();
        drop(s);
        // Tear the second entry: flip a byte of its payload.
        let path = dir.path().join("volumes.log");
        let mut bytes = std::fs::read(&path).unwrap();
        let first_len = HEADER + u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        bytes[first_len + HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.get::<String>(Table::Volumes, "a").unwrap().as_deref(),
            Some("first")
        );
        assert_eq!(s.get::<String>(Table::Volumes, "b").unwrap(), None);
        s.put(Table::Volumes, "c", &"third").unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let all: Vec<(String, String)> = s.load_all(Table::Volumes).unwrap();
        assert_eq!(
            all,
            vec![("a".into(), "first".into()), ("c".into(), "third".into())]
        );
    }

    #[test]
    fn compaction_keeps_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let big = "x".repeat(4000);
        for i in 0..1500 {
            s.put_with(
                Table::Volumes,
                &format!("k{}", i % 7),
                &format!("{big}{i}"),
                Durability::Deferred,
            )
            .unwrap();
        }
        let len = std::fs::metadata(dir.path().join("volumes.log"))
            .unwrap()
            .len();
        assert!(len < 6 * CHUNK, "log was not compacted: {len} bytes");
        let stats = s.log_stats();
        let volumes = stats.iter().find(|t| t.table == Table::Volumes).unwrap();
        assert!(volumes.compactions > 0, "{volumes:?}");
        assert_eq!(volumes.file_bytes, len);
        let (used, live) = (volumes.used_bytes.unwrap(), volumes.live_bytes.unwrap());
        assert!(
            live > 7 * 4000 && live <= used && used <= len,
            "{volumes:?}"
        );
        let nodes = stats.iter().find(|t| t.table == Table::Nodes).unwrap();
        assert_eq!(
            (nodes.file_bytes, nodes.compactions, nodes.used_bytes),
            (0, 0, None)
        );
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let all: Vec<(String, String)> = s.load_all(Table::Volumes).unwrap();
        assert_eq!(all.len(), 7);
        assert!(all.iter().any(|(k, v)| k == "k2" && v.ends_with("1493")));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u16),
        Delete(u8),
        Reopen,
        /// Truncate the log at a random point past the durable prefix
        /// (what a crash can do to unsynced writes) and reopen.
        Crash(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..8, any::<u16>()).prop_map(|(k, v)| Op::Put(k, v)),
            2 => (0u8..8).prop_map(Op::Delete),
            1 => Just(Op::Reopen),
            1 => any::<u16>().prop_map(Op::Crash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The store matches a reference map across reopen and crashes that
        /// only lose writes that were never acknowledged as durable.
        #[test]
        fn matches_a_reference_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Store::open(dir.path()).unwrap();
            let mut model: BTreeMap<String, u16> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        s.put(Table::Volumes, &format!("k{k}"), &v).unwrap();
                        model.insert(format!("k{k}"), v);
                    }
                    Op::Delete(k) => {
                        s.delete(Table::Volumes, &format!("k{k}")).unwrap();
                        model.remove(&format!("k{k}"));
                    }
                    Op::Reopen => {
                        drop(s);
                        s = Store::open(dir.path()).unwrap();
                    }
                    Op::Crash(junk) => {
                        drop(s);
                        // Garbage after the durable end is what a torn,
                        // unacknowledged write leaves.
                        let path = dir.path().join("volumes.log");
                        if let Ok(bytes) = std::fs::read(&path) {
                            let (_, end) = replay(&bytes, &path).unwrap();
                            let mut b = bytes.clone();
                            let at = end as usize;
                            if at + 12 <= b.len() {
                                b[at..at + 4].copy_from_slice(&(u32::from(junk) + 1).to_le_bytes());
                                b[at + 4..at + 12].copy_from_slice(&junk.to_le_bytes().repeat(4));
                            }
                            std::fs::write(&path, &b).unwrap();
                        }
                        s = Store::open(dir.path()).unwrap();
                    }
                }
                let got: BTreeMap<String, u16> = s.load_all(Table::Volumes).unwrap().into_iter().collect();
                prop_assert_eq!(&got, &model);
            }
        }
    }
}
