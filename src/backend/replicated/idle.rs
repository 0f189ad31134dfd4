//! The node's own checks of its copies of volumes nobody publishes: no
//! engine runs for such a volume, so no scrub pass compares its copies,
//! and a copy nobody reads could sit on a bad sector until it is needed.
//! The node reads each such copy from its disk, region by region at the
//! scrub's pace ([`ReplicaStore::check_idle`], which lists the regions
//! the disk cannot read for the next engine to rebuild): on the scrub's
//! schedule ([`IdleChecks::sweep`]), and now when asked
//! ([`IdleChecks::check_now`], `stowage volume scrub` of a volume that is
//! not published). One check per copy at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::protocol::{CheckMark, Region};
use super::store::{ReadPass, ReplicaStore, StoreError, unix_now};
use super::{CheckDue, region_time};
use crate::volume::id::Uuid;

/// How often the sweep looks for copies whose check is due (or the
/// scrub's period, when shorter).
const LOOK: Duration = Duration::from_secs(60);

/// What [`IdleChecks::check_now`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleCheck {
    /// A check of the copy's `regions` regions started, or one was under
    /// way already (`started` false) at region `at`.
    Reading {
        started: bool,
        at: Region,
        regions: u32,
    },
    /// The copy's volume is published (its engine scrubs it), or this
    /// node holds no copy of it.
    NotIdle,
}

/// This node's checks of its idle copies.
#[derive(Debug)]
pub struct IdleChecks {
    replicas: Arc<ReplicaStore>,
    /// The time one region's read takes at the scrub's rate.
    per_region: Duration,
    /// The copies being checked, with the region each is at.
    running: Mutex<HashMap<Uuid, Region>>,
}

impl IdleChecks {
    /// Checks of `replicas`' idle copies at `rate` bytes per second.
    pub fn new(replicas: Arc<ReplicaStore>, rate: u64) -> Arc<Self> {
        Arc::new(IdleChecks {
            replicas,
            per_region: region_time(rate),
            running: Mutex::new(HashMap::new()),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Region>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a check of `uuid`'s copy here from its first region, unless
    /// one is under way. Needs a Tokio runtime.
    pub async fn check_now(self: &Arc<Self>, uuid: Uuid) -> Result<IdleCheck, StoreError> {
        let r = Arc::clone(&self.replicas);
        let Some(copy) = tokio::task::spawn_blocking(move || r.idle_copy(uuid))
            .await
            .map_err(|e| StoreError::Invalid(e.to_string()))??
        else {
            return Ok(IdleCheck::NotIdle);
        };
        let regions = copy.regions;
        let at = match self.claim(uuid, 0) {
            Ok(claim) => {
                tokio::spawn(async move {
                    let (checked, found) = claim.check(0).await;
                    tracing::info!(volume = %uuid, regions = checked, unreadable = found,
                        "idle copy checked on request");
                });
                None
            }
            Err(at) => Some(at),
        };
        Ok(IdleCheck::Reading {
            started: at.is_none(),
            at: at.unwrap_or(0),
            regions,
        })
    }

    /// Marks `uuid` as being checked from `from` until the claim is
    /// dropped; the region the check under way is at when there is one.
    fn claim(self: &Arc<Self>, uuid: Uuid, from: Region) -> Result<Claim, Region> {
        let mut running = self.running();
        if let Some(at) = running.get(&uuid) {
            return Err(*at);
        }
        running.insert(uuid, from);
        Ok(Claim {
            checks: Arc::clone(self),
            uuid,
        })
    }
}

/// A copy being checked (see [`IdleChecks::claim`]): let go when dropped,
/// also when the task checking it is aborted.
struct Claim {
    checks: Arc<IdleChecks>,
    uuid: Uuid,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.checks.running().remove(&self.uuid);
    }
}

impl Claim {
    /// Reads the copy from region `from` to its end, at the pace, while
    /// its volume stays unpublished; then lets it go. Regions read, and
    /// those the disk could not read.
    async fn check(self, from: Region) -> (u64, u64) {
        let (checks, uuid) = (&self.checks, self.uuid);
        let (mut checked, mut found) = (0u64, 0u64);
        let mut region = from;
        // The pass's sum: a new one from the first region, else the one
        // kept with the progress it resumes.
        let mut pass = (from == 0).then(ReadPass::default);
        loop {
            checks.running().insert(uuid, region);
            // Asked again each region: a publish ends the check (its
            // engine scrubs from then on).
            let r = Arc::clone(&checks.replicas);
            let step = tokio::task::spawn_blocking(move || {
                let Some(copy) = r.idle_copy(uuid)?.filter(|c| region < c.regions) else {
                    return Ok(None);
                };
                let mut pass = match pass {
                    Some(p) => p,
                    None => r.checked(uuid)?.unwrap_or_default().read_sums.pass,
                };
                let readable = r.check_idle(uuid, region, copy.version, &mut pass)?;
                Ok::<_, StoreError>(Some((readable, pass)))
            })
            .await;
            match step {
                Ok(Ok(Some((readable, now)))) => {
                    pass = Some(now);
                    checked += 1;
                    found += u64::from(!readable);
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(volume = %uuid, region, error = %e, "idle copy not checked");
                    break;
                }
                Err(e) => {
                    tracing::error!(volume = %uuid, error = %e, "checking an idle copy failed");
                    break;
                }
            }
            region += 1;
            tokio::time::sleep(checks.per_region).await;
        }
        (checked, found)
    }
}

impl IdleChecks {
    /// Where the check of `uuid`'s copy here starts if it is due: `every`
    /// after the last whole check of it (this node's, or an engine's scrub
    /// pass, which read every region too), or where one a publish or a
    /// restart of this process stopped (see `store::Checked`).
    fn due(&self, uuid: Uuid, every: Duration) -> Result<Option<Region>, StoreError> {
        let r = &self.replicas;
        let Some(n) = r.idle_copy(uuid)?.map(|c| c.regions) else {
            return Ok(None);
        };
        let Some(c) = r.checked(uuid)? else {
            return Ok(None);
        };
        let mark = CheckMark {
            done: c.scrub.done.max(c.read.done),
            next: c.read.next,
        };
        Ok(match CheckDue::of(mark, n.into(), unix_now(), every) {
            CheckDue::Resume(at) => Some(at),
            CheckDue::After(_) => None,
            CheckDue::Overdue | CheckDue::Never => Some(0),
        })
    }

    /// Checks every idle copy here when it is due (see [`Self::due`]),
    /// one at a time, looking for such copies every [`LOOK`] (or `every`,
    /// when shorter), the first time at a random point within it. Runs
    /// until aborted.
    pub async fn sweep(self: Arc<Self>, every: Duration) {
        let look = every.min(LOOK);
        let seed = uuid::Uuid::new_v4().as_u64_pair().0;
        let first = Duration::from_millis(seed % (look.as_millis().max(1) as u64));
        let mut next = tokio::time::Instant::now() + first;
        loop {
            tokio::time::sleep_until(next).await;
            let started = tokio::time::Instant::now();
            let r = Arc::clone(&self.replicas);
            let volumes = match tokio::task::spawn_blocking(move || r.list()).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "idle copies not listed");
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!(error = %e, "listing idle copies failed");
                    Vec::new()
                }
            };
            let (mut checked, mut found) = (0u64, 0u64);
            for uuid in volumes {
                let me = Arc::clone(&self);
                let from = match tokio::task::spawn_blocking(move || me.due(uuid, every)).await {
                    Ok(Ok(Some(from))) => from,
                    Ok(Ok(None)) => continue,
                    Ok(Err(e)) => {
                        tracing::warn!(volume = %uuid, error = %e, "idle copy not checked");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(volume = %uuid, error = %e, "checking an idle copy failed");
                        continue;
                    }
                };
                // A check asked for may be under way.
                if let Ok(claim) = self.claim(uuid, from) {
                    let (c, f) = claim.check(from).await;
                    checked += c;
                    found += f;
                }
            }
            if checked > 0 {
                tracing::debug!(regions = checked, unreadable = found, "idle copies checked");
            }
            next = (started + look).max(tokio::time::Instant::now());
        }
    }
}
