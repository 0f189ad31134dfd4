//! The copy's side of a group snapshot's two phases (`Freeze` and `Thaw`
//! on the `Replica` service).
//!
//! A freeze is one thread holding every region lock of the copy (inside
//! [`ReplicaStore::snapshot_gated`]'s gate) until the controller decides
//! or the lease runs out. The controller freezes every copy of every
//! volume of the group first, and commits only once all are frozen, so
//! each member holds its copy as it was at one instant shared by the whole
//! group. The lease keeps a controller that died between the phases from
//! holding writes off: it is short, well under the time an engine waits
//! for a copy before marking it out of sync.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;

use crate::backend::replicated::record::ReplicaRecord;
use crate::backend::replicated::store::{GroupOf, ReplicaStore, SnapshotInfo, StoreError};
use crate::volume::id::Uuid;

use super::status_of;

/// The longest lease a freeze may ask for.
pub const MAX_LEASE: Duration = Duration::from_millis(1500);

/// What the controller decided for a freeze.
enum Decision {
    /// Take the snapshot, then let go; its result goes back on the sender.
    Commit(tokio::sync::oneshot::Sender<Result<SnapshotInfo, StoreError>>),
}

/// A freeze: the snapshot it is for and the controller's token.
type Key = (Uuid, u64);

/// The freezes held on this node, each waiting for its decision.
#[derive(Debug, Default, Clone)]
pub struct Freezes {
    held: Arc<Mutex<HashMap<Key, mpsc::Sender<Decision>>>>,
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Commit")
    }
}

/// What a freeze is of.
pub struct FreezeOf {
    pub volume: Uuid,
    pub snapshot: Uuid,
    pub expect: ReplicaRecord,
    pub group: GroupOf,
    pub token: u64,
    pub lease: Duration,
}

impl Freezes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, mpsc::Sender<Decision>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Freezes this node's copy for `f`, answering once it is frozen (or
    /// why it cannot be). The freeze ends with [`Self::thaw`], when its
    /// lease runs out, or at once when the caller stopped waiting for this
    /// answer.
    pub async fn freeze(&self, store: Arc<ReplicaStore>, f: FreezeOf) -> Result<(), Status> {
        let key = (f.snapshot, f.token);
        let (decide_tx, decide_rx) = mpsc::channel();
        {
            let mut held = self.lock();
            if held.contains_key(&key) {
                return Err(Status::already_exists(format!(
                    "snapshot {} is frozen already under this token",
                    f.snapshot
                )));
            }
            held.insert(key, decide_tx);
        }
        let (frozen_tx, frozen_rx) = tokio::sync::oneshot::channel::<Result<(), Status>>();
        let freezes = self.clone();
        let spawned = std::thread::Builder::new()
            .name("stowage-freeze".into())
            .spawn(move || {
                let mut frozen_tx = Some(frozen_tx);
                let mut reply = None;
                let made = store.snapshot_gated(
                    f.volume,
                    f.snapshot,
                    &f.expect,
                    Some(&f.group),
                    &mut || {
                        let told = frozen_tx.take().is_some_and(|tx| tx.send(Ok(())).is_ok());
                        if !told {
                            // The controller stopped waiting: let go now.
                            tracing::info!(volume = %f.volume, snapshot = %f.snapshot, "group snapshot member not taken: the controller stopped waiting before the copy could freeze");
                            return false;
                        }
                        let decided = decide_rx.recv_timeout(f.lease).ok().or_else(|| {
                            // The lease ran out (or the freeze was called
                            // off): no commit gets in from now on, but one
                            // that did is honoured, as the copy is still
                            // frozen.
                            freezes.lock().remove(&key);
                            decide_rx.try_recv().ok()
                        });
                        match decided {
                            Some(Decision::Commit(tx)) => {
                                reply = Some(tx);
                                true
                            }
                            None => false,
                        }
                    },
                );
                freezes.lock().remove(&key);
                match frozen_tx.take() {
                    // Never frozen: the copy was unfit, or held it already.
                    Some(tx) => {
                        let _ = tx.send(Err(match made {
                            Ok(_) => Status::already_exists(format!(
                                "snapshot {} was taken already",
                                f.snapshot
                            )),
                            Err(e) => status_of(e),
                        }));
                    }
                    None => {
                        if let Some(tx) = reply {
                            let _ = tx.send(made);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            self.lock().remove(&key);
            return Err(Status::internal(format!("no thread for the freeze: {e}")));
        }
        frozen_rx
            .await
            .unwrap_or_else(|_| Err(Status::internal("the freeze ended without an answer")))
    }

    /// Ends the freeze `(snapshot, token)`: with `commit`, takes the
    /// snapshot first and returns it; ABORTED when the freeze is not held
    /// (its lease ran out). Without `commit`, lets go (and succeeds when
    /// nothing is held).
    pub async fn thaw(
        &self,
        snapshot: Uuid,
        token: u64,
        commit: bool,
    ) -> Result<Option<SnapshotInfo>, Status> {
        let held = self.lock().remove(&(snapshot, token));
        let Some(tx) = held else {
            return if commit {
                Err(Status::aborted(format!(
                    "no freeze for snapshot {snapshot} is held here: its lease ran out"
                )))
            } else {
                Ok(None)
            };
        };
        if !commit {
            // Dropping the sender ends the thread's wait at once.
            drop(tx);
            return Ok(None);
        }
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let lapsed = || {
            Status::aborted(format!(
                "the freeze for snapshot {snapshot} ended before the commit reached it"
            ))
        };
        tx.send(Decision::Commit(reply_tx)).map_err(|_| lapsed())?;
        match reply_rx.await {
            Ok(Ok(info)) => Ok(Some(info)),
            Ok(Err(e)) => Err(status_of(e)),
            Err(_) => Err(lapsed()),
        }
    }

    /// How many freezes are held (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::replicated::record::Member;

    fn setup() -> (tempfile::TempDir, Arc<ReplicaStore>, ReplicaRecord) {
        let pool = tempfile::tempdir().unwrap();
        let store = Arc::new(ReplicaStore::open(pool.path(), "n1").unwrap());
        let boots = BTreeMap::from([("n1".to_owned(), 1)]);
        let rec = ReplicaRecord::new(
            Uuid::new_random(),
            4 << 20,
            vec![Member::copy("n1")],
            &boots,
        )
        .unwrap();
        store.create(&rec).unwrap();
        (pool, store, rec)
    }

    fn of(rec: &ReplicaRecord, token: u64, lease_ms: u64) -> FreezeOf {
        FreezeOf {
            volume: rec.uuid,
            snapshot: Uuid::new_random(),
            expect: rec.clone(),
            group: GroupOf {
                group: Uuid::new_random(),
                volumes: vec![rec.uuid],
                nodes: vec!["n1".to_owned()],
            },
            token,
            lease: Duration::from_millis(lease_ms),
        }
    }

    #[tokio::test]
    async fn a_commit_takes_the_member_and_a_wrong_token_or_late_commit_is_refused() {
        let (_pool, store, rec) = setup();
        let fz = Freezes::default();
        let f = of(&rec, 7, 1000);
        let snap = f.snapshot;
        fz.freeze(Arc::clone(&store), f).await.unwrap();
        // Another token names another freeze: none is held under it.
        let e = fz.thaw(snap, 8, true).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
        let info = fz.thaw(snap, 7, true).await.unwrap().unwrap();
        assert_eq!(info.snapshot, snap);
        assert_eq!(store.snapshots().unwrap(), vec![info]);
        assert_eq!(fz.len(), 0);

        // A lease that ran out: the copy let go, the commit is refused and
        // nothing was taken.
        let f = of(&rec, 9, 50);
        let late = f.snapshot;
        fz.freeze(Arc::clone(&store), f).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let e = fz.thaw(late, 9, true).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
        assert!(
            store
                .snapshots()
                .unwrap()
                .iter()
                .all(|s| s.snapshot != late)
        );

        // Called off: nothing taken; thawing again is harmless.
        let f = of(&rec, 10, 1000);
        let off = f.snapshot;
        fz.freeze(Arc::clone(&store), f).await.unwrap();
        assert!(fz.thaw(off, 10, false).await.unwrap().is_none());
        assert!(fz.thaw(off, 10, false).await.unwrap().is_none());
        assert_eq!(store.snapshots().unwrap().len(), 1);
        assert_eq!(fz.len(), 0);
    }

    #[tokio::test]
    async fn an_unfit_copy_is_not_frozen() {
        let (_pool, store, rec) = setup();
        let fz = Freezes::default();
        let mut f = of(&rec, 1, 1000);
        // In sync at another boot: the copy restarted since the record.
        f.expect.in_sync.insert("n1".to_owned(), 99);
        let e = fz.freeze(Arc::clone(&store), f).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
        assert_eq!(fz.len(), 0);
        assert!(store.snapshots().unwrap().is_empty());
    }
}
