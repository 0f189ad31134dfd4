//! The routing controller's side of replicated volumes: CreateVolume places
//! copies on registered nodes and gives each the volume's first record;
//! DeleteVolume removes them; ControllerPublish/Unpublish are changes of
//! the record driven to a majority of its voters (the copies are the source
//! of truth: the controller keeps nothing). A volume is found by asking the
//! fresh nodes what they hold of its uuid, which the CSI name determines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use super::proto::replica_client::ReplicaClient;
use super::proto::{CreateReplicaRequest, DeleteReplicaRequest, GetReplicaRequest, ReplicaCall};
use super::registry::{NodeEntry, Registry};
use crate::backend::replicated::REGION_BYTES;
use crate::backend::replicated::placement::{self, Candidate, Evacuation, ReplicaParams, Step};
use crate::backend::replicated::protocol::Ballot;
use crate::backend::replicated::protocol::{
    Change, Envelope, Outcome, Proposer, Refusal, Reply, VoterState,
};
use crate::backend::replicated::record::ReplicaRecord;
use crate::backend::replicated::record::{Member, Role};
use crate::backend::replicated::wire::{Answer, Call, Peer, PeerError};
use crate::csi;
use crate::volume::BackendKind;
use crate::volume::id::{Uuid, VolumeId};

/// How long one call to a node may take.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// `msg` as a request its node gives up on by itself (its gRPC deadline)
/// a second before the controller stops waiting for it after `wait`: what
/// the node does for it (a copy made, a copy frozen for a snapshot) then
/// happens while the controller still waits, even when the call's cancel
/// cannot reach the node.
fn bounded<T>(msg: T, wait: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(wait.saturating_sub(Duration::from_secs(1)));
    r
}
/// How long a record change may take before the CO is told to retry.
const CHANGE_DEADLINE: Duration = Duration::from_secs(15);
/// A change's phase timeout, in the proposer's milliseconds.
const PHASE_TIMEOUT_MS: u64 = 2_000;

use crate::backend::replicated::engines::{CONTEXT_ADDRESSES, CONTEXT_BALLOT, CONTEXT_RECORD};

mod group;
mod snap;
pub use group::is_replicated_group_id;
pub use snap::is_replicated_snapshot_id;

/// Whether `raw` is a replicated volume's ID (well formed or not: the
/// prefix alone routes it here, which then refuses a malformed one).
pub fn is_replicated_id(raw: &str) -> bool {
    raw.starts_with("replicated:")
}

/// Whether CreateVolume parameters ask for a replicated volume.
pub fn wants_replicated(params: &HashMap<String, String>) -> bool {
    params.get("backend").map(String::as_str) == Some("replicated")
}

#[allow(clippy::result_large_err)]
fn parse_id(raw: &str) -> Result<Uuid, Status> {
    VolumeId::parse(raw)
        .filter(|v| v.backend == BackendKind::Replicated)
        .map(|v| v.uuid)
        .ok_or_else(|| Status::not_found(format!("no volume has the malformed ID {raw:?}")))
}

pub fn volume_id(uuid: Uuid) -> String {
    VolumeId {
        backend: BackendKind::Replicated,
        node: String::new(),
        uuid,
    }
    .to_string()
}

/// Reaches voters through the registry's channels to the agents (the
/// controller's cluster certificate).
#[derive(Debug)]
pub struct RegistryPeer {
    registry: Arc<Registry>,
}

#[tonic::async_trait]
impl Peer for RegistryPeer {
    async fn call(&self, node: &str, volume: Uuid, call: Call) -> Result<Answer, PeerError> {
        let n = self
            .registry
            .get(node)
            .ok_or_else(|| PeerError::Unreachable {
                node: node.to_owned(),
                why: "not registered".to_owned(),
            })?;
        let request = serde_json::to_vec(&call.request).map_err(|e| PeerError::Failed {
            node: node.to_owned(),
            why: e.to_string(),
        })?;
        let mut c = ReplicaClient::new(n.channel.clone());
        let sent = c.call(ReplicaCall {
            volume: volume.to_hex(),
            request,
            offset: call.offset,
            len: call.len,
            data: call.data.as_ref().clone(),
        });
        let answer = match tokio::time::timeout(CALL_DEADLINE, sent).await {
            Err(_) => {
                return Err(PeerError::Unreachable {
                    node: node.to_owned(),
                    why: "no answer in time".to_owned(),
                });
            }
            Ok(Err(s)) => {
                return Err(PeerError::Failed {
                    node: node.to_owned(),
                    why: s.message().to_owned(),
                });
            }
            Ok(Ok(a)) => a.into_inner(),
        };
        let reply = if answer.reply.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice::<Reply>(&answer.reply).map_err(|e| PeerError::Failed {
                    node: node.to_owned(),
                    why: e.to_string(),
                })?,
            )
        };
        Ok(Answer {
            reply,
            data: answer.data,
        })
    }
}

/// Drives one record change to its outcome, or UNAVAILABLE when no majority
/// answered in time.
pub async fn drive(
    peer: Arc<dyn Peer>,
    volume: Uuid,
    mut proposer: Proposer,
    first: Vec<Envelope>,
    deadline: Duration,
) -> Result<Outcome, Status> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Reply)>();
    let send = |out: Vec<Envelope>| {
        for e in out {
            let (peer, tx) = (Arc::clone(&peer), tx.clone());
            tokio::spawn(async move {
                if let Ok(Answer { reply: Some(r), .. }) =
                    peer.call(&e.to, volume, Call::control(e.msg)).await
                {
                    let _ = tx.send((e.to, r));
                }
            });
        }
    };
    send(first);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut jitter = uuid::Uuid::new_v4().as_u128() as u64;
    loop {
        tokio::select! {
            Some((from, reply)) = rx.recv() => {
                let (out, outcome) = proposer.handle(&from, &reply);
                send(out);
                if let Some(o) = outcome {
                    // Voters that missed the chosen record learn it now
                    // (best effort: the next change carries it anyway).
                    if let Outcome::Chosen { ballot, record } = &o {
                        let mut to: std::collections::BTreeSet<&str> = record.voters().collect();
                        to.extend(record.previous.iter().flatten().map(|m| m.node.as_str()));
                        let commits = to
                            .into_iter()
                            .map(|v| Envelope {
                                to: v.to_owned(),
                                msg: crate::backend::replicated::protocol::Request::Commit {
                                    ballot: ballot.clone(),
                                    record: record.clone(),
                                },
                            })
                            .collect();
                        send(commits);
                    }
                    return Ok(o);
                }
            }
            _ = tick.tick() => {
                if start.elapsed() > deadline {
                    return Err(Status::unavailable(format!(
                        "no majority of volume {volume}'s voters answered within {} s",
                        deadline.as_secs()
                    )));
                }
                jitter ^= jitter << 13;
                jitter ^= jitter >> 7;
                jitter ^= jitter << 17;
                let now = start.elapsed().as_millis() as u64;
                send(proposer.tick(now, jitter % 200));
            }
        }
    }
}

/// What the fresh nodes hold of a volume.
struct Found {
    /// The record accepted at the highest ballot, and that ballot.
    newest: Option<VoterState>,
    /// Nodes that hold a member of it, with the ballot each accepted its
    /// record at.
    holders: Vec<(String, Ballot)>,
    /// How long each holder's state has not changed, where it tells.
    idle: BTreeMap<String, Duration>,
    /// What each holder of a copy says its checks found.
    checks: BTreeMap<String, CopyChecks>,
    /// Fresh nodes that answered that they hold nothing.
    without: Vec<String>,
    /// Fresh nodes that did not answer, and why.
    unreached: Vec<String>,
}

impl Found {
    /// UNAVAILABLE when nothing was found but some node did not answer:
    /// it may hold the volume.
    #[allow(clippy::result_large_err)]
    fn certain(&self, uuid: Uuid) -> Result<(), Status> {
        if self.newest.is_none() && !self.unreached.is_empty() {
            return Err(Status::unavailable(format!(
                "cannot tell whether volume {uuid} exists: {}",
                self.unreached.join("; ")
            )));
        }
        Ok(())
    }
}

/// What a node said to a call made of several nodes at once
/// ([`ask_all`]).
enum Asked<T> {
    Answered(T),
    /// An error answer (or the call's task failed).
    Refused(Status),
    /// No answer within [`CALL_DEADLINE`].
    Late,
}

/// Calls each of `nodes`' agents at once with `call`, each for at most
/// [`CALL_DEADLINE`]; what each said, in the order of `nodes`.
async fn ask_all<T, F, Fut>(nodes: &[NodeEntry], call: F) -> Vec<Asked<T>>
where
    F: Fn(ReplicaClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
    T: Send + 'static,
{
    let asks: Vec<_> = nodes
        .iter()
        .map(|n| {
            let answer = call(ReplicaClient::new(n.channel.clone()));
            tokio::spawn(tokio::time::timeout(CALL_DEADLINE, answer))
        })
        .collect();
    let mut said = Vec::with_capacity(asks.len());
    for a in asks {
        said.push(match a.await {
            Ok(Ok(Ok(r))) => Asked::Answered(r.into_inner()),
            Ok(Ok(Err(s))) => Asked::Refused(s),
            Ok(Err(_)) => Asked::Late,
            Err(e) => Asked::Refused(Status::internal(e.to_string())),
        });
    }
    said
}

/// The controller's operations on replicated volumes.
#[derive(Debug, Clone)]
pub struct Replicated {
    registry: Arc<Registry>,
    peer: Arc<dyn Peer>,
    started: Instant,
    health: VolumeHealth,
    heals: Heals,
    drains: Drains,
    /// Asks the controller's round of repairs to run now
    /// ([`Replicated::wake_round`]).
    rounds: Arc<tokio::sync::Notify>,
    /// The volumes whose publication's rebuild a drain waits for, watched
    /// ([`Replicated::watch_rebuild`]).
    watching: Arc<std::sync::Mutex<BTreeSet<Uuid>>>,
}

/// How long one watch of a publication's rebuild lasts
/// ([`Replicated::watch_rebuild`]); the next round starts another while
/// the rebuild goes on.
const REBUILD_WATCH: Duration = Duration::from_secs(120);

/// How the controller heals volumes nobody publishes
/// (`--replica-heal-idle on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealIdle {
    /// The pace of a heal's rebuild, bytes per second
    /// (`--replica-heal-rate`); None: a publication's engine's pace.
    pub rate: Option<u64>,
}

/// The heals this controller started ([`Replicated::heal`]), and the
/// volumes whose last heals failed: the next waits [`heal_retry`].
#[derive(Debug, Clone, Default)]
struct Heals(Arc<std::sync::Mutex<BTreeMap<Uuid, Heal>>>);

/// A volume's heal in [`Heals`]: `failed` is how many of its heals in a
/// row failed before (the one running not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heal {
    Running { failed: u32 },
    Failed { at: Instant, failed: u32 },
}

/// How long after the first failed heal of a volume the next may start;
/// each failure more doubles it, up to [`HEAL_RETRY_MAX`]. Short, as a
/// heal cut short by a passing fault (its node restarted, a copy's link
/// dropped a while) leaves a copy short until it runs again; doubling, as
/// a fault that lasts should not have the volume taken and released every
/// few seconds.
const HEAL_RETRY: Duration = Duration::from_secs(5);

/// The longest wait between failed heals of a volume.
const HEAL_RETRY_MAX: Duration = Duration::from_secs(120);

/// The wait before the next heal of a volume whose last `failed` heals in
/// a row failed.
fn heal_retry(failed: u32) -> Duration {
    let doubled = HEAL_RETRY.saturating_mul(1 << failed.saturating_sub(1).min(16));
    doubled.min(HEAL_RETRY_MAX)
}

/// Heals at once: after a node is lost, every idle volume it held needs
/// one, and each rebuilds a whole copy; the others wait for later rounds.
const HEALS_AT_ONCE: usize = 2;

impl Heals {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, Heal>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self, uuid: Uuid) -> bool {
        matches!(self.map().get(&uuid), Some(Heal::Running { .. }))
    }

    /// Marks a heal of `uuid` started at `now`, unless one runs, the last
    /// failed within [`heal_retry`], or [`HEALS_AT_ONCE`] run.
    fn begin(&self, uuid: Uuid, now: Instant) -> bool {
        let mut m = self.map();
        let running = m
            .values()
            .filter(|h| matches!(h, Heal::Running { .. }))
            .count();
        if running >= HEALS_AT_ONCE {
            return false;
        }
        let failed = match m.get(&uuid) {
            None => 0,
            Some(Heal::Running { .. }) => return false,
            Some(Heal::Failed { at, failed }) => {
                if now.saturating_duration_since(*at) < heal_retry(*failed) {
                    return false;
                }
                *failed
            }
        };
        m.insert(uuid, Heal::Running { failed });
        true
    }

    /// Forgets the failed heals of every volume but `live` (a heal that
    /// runs ends by itself).
    fn retain(&self, live: &[Uuid]) {
        self.map()
            .retain(|u, h| matches!(h, Heal::Running { .. }) || live.contains(u));
    }

    /// The heal of `uuid` ended at `now`: healed (or taken over), or
    /// failed, one failure more. Returns, for a failed one, how long the
    /// next waits.
    fn end(&self, uuid: Uuid, ok: bool, now: Instant) -> Option<Duration> {
        let mut m = self.map();
        if ok {
            m.remove(&uuid);
            return None;
        }
        let before = match m.get(&uuid) {
            Some(Heal::Running { failed } | Heal::Failed { failed, .. }) => *failed,
            None => 0,
        };
        let failed = before.saturating_add(1);
        m.insert(uuid, Heal::Failed { at: now, failed });
        Some(heal_retry(failed))
    }
}

/// Whether each replicated volume's condition was abnormal when the
/// controller last worked it out ([`condition`]): each round of replacing
/// lost members looks at every volume, and ControllerGetVolume and
/// ListVolumes at theirs. For `/metrics` (`replicated_volume_abnormal`).
#[derive(Debug, Clone, Default)]
pub struct VolumeHealth(Arc<std::sync::Mutex<BTreeMap<Uuid, bool>>>);

impl VolumeHealth {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, bool>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, uuid: Uuid, abnormal: bool) {
        self.map().insert(uuid, abnormal);
    }

    /// Forgets every volume but `live`.
    fn retain(&self, live: &[Uuid]) {
        self.map().retain(|u, _| live.contains(u));
    }

    /// Each volume's ID, and whether it was abnormal.
    pub fn all(&self) -> Vec<(String, bool)> {
        self.map()
            .iter()
            .map(|(u, a)| (volume_id(*u), *a))
            .collect()
    }
}

/// The nodes of `record`'s members that drain (`draining`), and of its
/// copies marked leaving.
fn draining_members(record: &ReplicaRecord, draining: &BTreeSet<String>) -> BTreeSet<String> {
    record
        .voters()
        .filter(|n| draining.contains(*n))
        .chain(record.leaving())
        .map(str::to_owned)
        .collect()
}

/// What the rounds found of each volume with a member on a draining node
/// (`stowage node drain`): those nodes, and what the volume waits for.
/// Soft state, worked out again by every round.
#[derive(Debug, Clone, Default)]
pub struct Drains(Arc<std::sync::Mutex<DrainState>>);

#[derive(Debug, Default)]
struct DrainState {
    volumes: BTreeMap<Uuid, (BTreeSet<String>, String)>,
    /// The round under way (or the last one).
    round: u64,
    /// The round under way when each node's drain began.
    began: BTreeMap<String, u64>,
    /// Draining nodes a whole round looked at every volume for since their
    /// drain began.
    counted: BTreeSet<String>,
    /// The volumes the round under way has looked at.
    seen: BTreeSet<Uuid>,
}

impl Drains {
    fn state(&self) -> std::sync::MutexGuard<'_, DrainState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `uuid`'s members on the draining `nodes`, and why they are
    /// still there; logged when that changes.
    fn note(&self, uuid: Uuid, nodes: BTreeSet<String>, why: String) {
        let mut s = self.state();
        if s.volumes.get(&uuid).is_none_or(|(_, w)| *w != why) {
            tracing::info!(volume = %volume_id(uuid), nodes = ?nodes, "drain: {why}");
        }
        s.volumes.insert(uuid, (nodes, why));
    }

    fn clear(&self, uuid: Uuid) {
        self.state().volumes.remove(&uuid);
    }

    /// The round looked at `uuid`, whose newest record is `record` (None:
    /// it is gone): a volume with a member on a `draining` node (or a copy
    /// leaving) is noted, as waiting for its other repairs until
    /// [`Replicated::drain_step`] says more; any other is not.
    fn look(&self, uuid: Uuid, record: Option<&ReplicaRecord>, draining: &BTreeSet<String>) {
        let nodes = record.map_or_else(BTreeSet::new, |r| draining_members(r, draining));
        let mut s = self.state();
        s.seen.insert(uuid);
        if nodes.is_empty() {
            s.volumes.remove(&uuid);
        } else {
            s.volumes
                .entry(uuid)
                .and_modify(|(n, _)| n.clone_from(&nodes))
                .or_insert_with(|| {
                    let why = "waiting for its other repairs first (a lost member, a change under way, a heal)";
                    (nodes, why.to_owned())
                });
        }
    }

    /// A drain of `node` begins: it counts once a round that started
    /// after now has ended.
    pub fn begin(&self, node: &str) {
        let mut s = self.state();
        let round = s.round;
        s.began.insert(node.to_owned(), round);
        s.counted.remove(node);
    }

    /// A round begins; returns its number.
    pub fn round_begins(&self) -> u64 {
        let mut s = self.state();
        s.round += 1;
        s.seen.clear();
        s.round
    }

    /// Round `round`, over the volumes `live`, with `draining` the nodes
    /// draining when it began, has ended. The draining nodes count when it
    /// looked at every volume (none was busy or out of reach).
    pub fn round_ended(&self, round: u64, live: &[Uuid], draining: &BTreeSet<String>) {
        let mut s = self.state();
        s.volumes.retain(|u, _| live.contains(u));
        if !live.iter().all(|u| s.seen.contains(u)) {
            return;
        }
        let began = s.began.clone();
        s.counted = draining
            .iter()
            .filter(|n| began.get(*n).is_none_or(|b| *b < round))
            .cloned()
            .collect();
        s.began.retain(|n, _| draining.contains(n));
    }

    /// Of a draining `node` a whole round has looked at: the volumes with
    /// a member there, each with what it waits for.
    pub fn left(&self, node: &str) -> Option<Vec<String>> {
        let s = self.state();
        s.counted.contains(node).then(|| {
            s.volumes
                .iter()
                .filter(|(_, (nodes, _))| nodes.contains(node))
                .map(|(u, (_, why))| format!("{}: {why}", volume_id(*u)))
                .collect()
        })
    }
}

impl Replicated {
    pub fn new(registry: Arc<Registry>) -> Self {
        Replicated {
            peer: Arc::new(RegistryPeer {
                registry: Arc::clone(&registry),
            }),
            registry,
            started: Instant::now(),
            health: VolumeHealth::default(),
            heals: Heals::default(),
            drains: Drains::default(),
            rounds: Arc::new(tokio::sync::Notify::new()),
            watching: Arc::default(),
        }
    }

    /// Asks for a round of repairs (`Router::replace_lost_members`) now,
    /// not at its period: called when a change leaves its next step to a
    /// round (members changed: a copy to heal, a drain's next step; a heal
    /// ended; a volume unpublished with a copy to heal; a drain begun).
    /// Asked during a round, the next one follows it.
    pub fn wake_round(&self) {
        self.rounds.notify_one();
    }

    /// Resolves once a round was asked for ([`Replicated::wake_round`]).
    pub async fn round_wanted(&self) {
        self.rounds.notified().await;
    }

    /// What `/metrics` says of the volumes' conditions.
    pub fn health(&self) -> VolumeHealth {
        self.health.clone()
    }

    /// What the rounds found of the draining nodes' volumes.
    pub fn drains(&self) -> &Drains {
        &self.drains
    }

    /// `record`'s condition ([`condition`]), noted in [`VolumeHealth`].
    fn condition(&self, record: &ReplicaRecord, checks: &BTreeMap<String, CopyChecks>) -> Findings {
        let c = condition(record, checks);
        self.health.set(record.uuid, c.bad);
        c
    }

    /// Forgets the health, and the failed heals, of every volume but
    /// `live` (the volumes listed).
    pub fn forget_all_but(&self, live: &[Uuid]) {
        self.health.retain(live);
        self.heals.retain(live);
    }

    /// Asks every fresh node what it holds of `uuid`; see
    /// [`Found::certain`] for nodes that do not answer. (A record chosen by
    /// a majority is seen from any majority, and a change drives the newest
    /// record anyway.)
    async fn find(&self, uuid: Uuid) -> Result<Found, Status> {
        self.find_skipping(uuid, &BTreeMap::new()).await
    }

    /// [`Self::find`], not asking the nodes in `skip`: each is taken as
    /// not answering, for the reason given (the round of repairs skips the
    /// nodes that did not list their copies, rather than wait for each of
    /// them once per volume).
    async fn find_skipping(
        &self,
        uuid: Uuid,
        skip: &BTreeMap<String, String>,
    ) -> Result<Found, Status> {
        let (nodes, skipped): (Vec<_>, Vec<_>) = self
            .registry
            .fresh()
            .into_iter()
            .partition(|n| !skip.contains_key(&n.id));
        let hex = uuid.to_hex();
        let said = ask_all(&nodes, |mut c| {
            let req = GetReplicaRequest {
                volume: hex.clone(),
            };
            async move { c.get(req).await }
        })
        .await;
        let mut found = Found {
            newest: None,
            holders: Vec::new(),
            idle: BTreeMap::new(),
            checks: BTreeMap::new(),
            without: Vec::new(),
            unreached: skipped
                .iter()
                .map(|n| format!("node {}: {}", n.id, skip[&n.id]))
                .collect(),
        };
        for (n, a) in nodes.iter().zip(said) {
            let r = match a {
                Asked::Answered(r) => r,
                Asked::Refused(s) => {
                    found
                        .unreached
                        .push(format!("node {}: {}", n.id, s.message()));
                    continue;
                }
                Asked::Late => {
                    found
                        .unreached
                        .push(format!("node {}: no answer in time", n.id));
                    continue;
                }
            };
            if !r.found {
                found.without.push(n.id.clone());
                continue;
            }
            let state: VoterState = serde_json::from_str(&r.state)
                .map_err(|e| Status::internal(format!("node {}: {e}", n.id)))?;
            found.holders.push((n.id.clone(), state.accepted.clone()));
            if let Some(s) = r.idle_seconds {
                found.idle.insert(n.id.clone(), Duration::from_secs(s));
            }
            if r.scrubbed_at.is_some() || r.read_at.is_some() {
                found.checks.insert(
                    n.id.clone(),
                    CopyChecks {
                        whole_at: r.scrubbed_at.max(r.read_at).unwrap_or(0),
                        unreadable: r.unreadable,
                        sum: (!r.read_sum.is_empty()).then_some((r.read_sum_version, r.read_sum)),
                    },
                );
            }
            if found.newest.as_ref().is_none_or(|s| {
                (&state.accepted, state.record.version) > (&s.accepted, s.record.version)
            }) {
                found.newest = Some(state);
            }
        }
        Ok(found)
    }

    fn node(&self, id: &str) -> Result<NodeEntry, Status> {
        self.registry
            .get(id)
            .filter(|n| n.fresh(Instant::now()))
            .ok_or_else(|| Status::unavailable(format!("node {id} is not registered and fresh")))
    }

    async fn create_on(&self, node: &str, record: &ReplicaRecord) -> Result<(), Status> {
        let n = self.node(node)?;
        let mut c = ReplicaClient::new(n.channel.clone());
        let req = CreateReplicaRequest {
            record: serde_json::to_string(record).map_err(|e| Status::internal(e.to_string()))?,
            ..Default::default()
        };
        match tokio::time::timeout(CALL_DEADLINE, c.create(bounded(req, CALL_DEADLINE))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => Err(Status::already_exists(
                format!("node {node}: {}", s.message()),
            )),
            Ok(Err(s)) => Err(Status::unavailable(format!(
                "node {node} could not create its copy: {}",
                s.message()
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "node {node} did not create its copy in time"
            ))),
        }
    }

    /// Those of `nodes` that are down: neither registered and fresh nor
    /// forgotten (so they may still hold something).
    fn down<'a>(&self, nodes: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
        nodes
            .into_iter()
            .filter(|n| !self.registry.is_forgotten(n) && self.node(n).is_err())
            .map(String::as_str)
            .collect()
    }

    async fn delete_on(&self, node: &str, uuid: Uuid) -> Result<(), Status> {
        if self.registry.is_forgotten(node) {
            return Ok(());
        }
        let n = self.node(node)?;
        let mut c = ReplicaClient::new(n.channel.clone());
        let req = DeleteReplicaRequest {
            volume: uuid.to_hex(),
        };
        match tokio::time::timeout(CALL_DEADLINE, c.delete(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(Status::unavailable(format!(
                "node {node} could not delete its copy: {}",
                s.message()
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "node {node} did not delete its copy in time"
            ))),
        }
    }

    fn volume(record: &ReplicaRecord) -> csi::Volume {
        let copies: Vec<&str> = record.copies().collect();
        csi::Volume {
            capacity_bytes: record.size as i64,
            volume_id: volume_id(record.uuid),
            volume_context: HashMap::from([("replicas".to_owned(), copies.len().to_string())]),
            content_source: None,
            accessible_topology: Vec::new(),
        }
    }

    /// CreateVolume of `backend=replicated`.
    pub async fn create_volume(
        &self,
        r: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse, Status> {
        use crate::server::convert;
        convert::required_str("name", &r.name).map_err(Status::from)?;
        let caps = convert::capabilities("volume_capabilities", &r.volume_capabilities)
            .map_err(Status::from)?;
        let profile = BackendKind::Replicated.profile();
        for c in &caps {
            profile
                .check_capability(c)
                .map_err(|e| Status::invalid_argument(format!("volume_capabilities: {e}")))?;
        }
        let fs = profile
            .filesystem(&caps)
            .map_err(|e| Status::invalid_argument(format!("volume_capabilities: {e}")))?;
        let params = convert::map(&r.parameters);
        crate::volume::params::Parameters::parse(&params)
            .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
        let rp = ReplicaParams::parse(
            params.get("replicas").map(String::as_str),
            params.get("locality").map(String::as_str),
        )
        .map_err(|e| Status::invalid_argument(format!("parameters: {e}")))?;
        let source = self
            .content_source(r.volume_content_source.as_ref())
            .await?;
        // `replicas` is the one mutable parameter: given here, it wins.
        let mut rp = rp;
        if let Some(k) = r.mutable_parameters.keys().find(|k| *k != "replicas") {
            return Err(Status::invalid_argument(format!(
                "mutable_parameters: {k:?} is not one of a replicated volume's (only replicas)"
            )));
        }
        if let Some(v) = r.mutable_parameters.get("replicas") {
            rp.replicas = ReplicaParams::parse(Some(v), None)
                .map_err(|e| Status::invalid_argument(format!("mutable_parameters: {e}")))?
                .replicas;
        }
        let (default, min) = profile.sizes(fs);
        let (required, limit) = match &r.capacity_range {
            Some(c) if c.required_bytes < 0 || c.limit_bytes < 0 => {
                return Err(Status::invalid_argument("capacity_range: negative"));
            }
            Some(c) => (c.required_bytes as u64, c.limit_bytes as u64),
            None => (0, 0),
        };
        let want = if required == 0 {
            if limit != 0 {
                limit.min(default)
            } else {
                default
            }
        } else {
            required
        }
        .max(min);
        let size = want.div_ceil(REGION_BYTES) * REGION_BYTES;
        if limit != 0 && size > limit {
            return Err(Status::out_of_range(format!(
                "a replicated volume of {want} bytes takes {size} bytes (whole MiB regions, at least {min}), above the limit of {limit}"
            )));
        }
        // A copy of a source is at least as large as the source.
        let size = size.max(source.as_ref().map_or(0, snap::Source::size));
        if limit != 0 && size > limit {
            return Err(Status::out_of_range(format!(
                "the source holds {size} bytes, above the limit of {limit}"
            )));
        }
        let uuid = placement::volume_uuid(&r.name);
        let found = self.find(uuid).await?;
        found.certain(uuid)?;
        if let Some(state) = &found.newest {
            let rec = &state.record;
            // The copies asked for at creation, or those it has now (a
            // ModifyVolume may have changed them since).
            let compatible = (required == 0 || rec.size >= required)
                && (limit == 0 || rec.size <= limit)
                && (rec.copies().count() == rp.replicas || rec.created_copies == Some(rp.replicas));
            if !compatible {
                return Err(Status::already_exists(format!(
                    "volume name {:?} is taken by a replicated volume of {} bytes with {} copies",
                    r.name,
                    rec.size,
                    rec.copies().count()
                )));
            }
            // A create cut short: members still missing get the first
            // record (only while nothing has changed it).
            if rec.version == 0 {
                for m in &rec.members {
                    if !found.holders.iter().any(|(h, _)| *h == m.node) {
                        match &source {
                            Some(src) => self.create_from_on(&m.node, rec, src).await?,
                            None => self.create_on(&m.node, rec).await?,
                        }
                    }
                }
            }
            let volume = snap::with_source(Self::volume(rec), source.as_ref());
            return Ok(csi::CreateVolumeResponse {
                volume: Some(volume),
            });
        }
        let candidates = self.candidates();
        let preferred = r
            .accessibility_requirements
            .iter()
            .flat_map(|a| a.preferred.iter())
            .find_map(|t| t.segments.get(crate::volume::TOPOLOGY_NODE_KEY).cloned());
        let mut record = match &source {
            None => {
                let placed = placement::place(
                    uuid,
                    &candidates,
                    rp.replicas,
                    size,
                    rp.locality,
                    preferred.as_deref(),
                )
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
                let members = placed.members();
                let boots: BTreeMap<String, u64> =
                    members.iter().map(|m| (m.node.clone(), 1)).collect();
                ReplicaRecord::new(uuid, size, members, &boots)
                    .map_err(|e| Status::internal(e.to_string()))?
            }
            Some(src) => {
                // Copies on nodes holding the source start from it, in
                // sync; the others start empty and are rebuilt.
                let (members, in_sync) = self.place_from(uuid, src, &rp, size)?;
                let mut record = ReplicaRecord::new(uuid, size, members, &in_sync)
                    .map_err(|e| Status::internal(e.to_string()))?;
                record.in_sync = in_sync;
                record.epoch = src.epoch();
                record
                    .validate()
                    .map_err(|e| Status::internal(e.to_string()))?;
                record
            }
        };
        record.created_copies = Some(rp.replicas);
        let mut made: Vec<String> = Vec::new();
        for m in &record.members {
            let created = match &source {
                Some(src) => self.create_from_on(&m.node, &record, src).await,
                None => self.create_on(&m.node, &record).await,
            };
            if let Err(e) = created {
                for n in &made {
                    let _ = self.delete_on(n, uuid).await;
                }
                return Err(e);
            }
            made.push(m.node.clone());
        }
        tracing::info!(name = %r.name, volume = %volume_id(uuid), members = ?made, size, "replicated volume created");
        let volume = snap::with_source(Self::volume(&record), source.as_ref());
        Ok(csi::CreateVolumeResponse {
            volume: Some(volume),
        })
    }

    /// DeleteVolume. Idempotent; refused while the volume is published.
    pub async fn delete_volume(&self, raw: &str) -> Result<(), Status> {
        let Ok(uuid) = parse_id(raw) else {
            // A malformed ID names no volume: deleted already.
            return Ok(());
        };
        let found = self.find(uuid).await?;
        found.certain(uuid)?;
        let Some(state) = found.newest else {
            return Ok(());
        };
        if let Some(o) = state.record.published_on() {
            return Err(Status::failed_precondition(format!(
                "volume {raw} is published on node {}",
                o.node
            )));
        }
        if let Some(o) = &state.record.owner {
            // A heal's: its engine is fenced, and the copies go with it.
            self.end_heal(uuid, &o.node).await;
        }
        let mut nodes: Vec<String> = state.record.voters().map(str::to_owned).collect();
        for (h, _) in found.holders {
            if !nodes.contains(&h) {
                nodes.push(h);
            }
        }
        // Nothing is deleted while a member's node is down: deleting the
        // others first would leave that copy, record and all, with no
        // majority left to show it removed, and a retry would find only
        // it, unasked, and answer OK.
        let down = self.down(&nodes);
        if !down.is_empty() {
            return Err(Status::unavailable(format!(
                "volume {raw} also has a copy on {}, not registered and fresh now: nothing deleted; retry once it is back (or once it is forgotten with `stowage node forget`, when gone for good)",
                down.join(", ")
            )));
        }
        for n in &nodes {
            self.delete_on(n, uuid).await?;
        }
        tracing::info!(volume = %raw, "replicated volume deleted");
        Ok(())
    }

    /// The newest record of a volume, or NOT_FOUND.
    async fn newest(&self, raw: &str) -> Result<(Uuid, VoterState), Status> {
        let (uuid, state, _) = self.newest_found(raw).await?;
        Ok((uuid, state))
    }

    /// [`Self::newest`], with what the copies' checks found.
    async fn newest_found(
        &self,
        raw: &str,
    ) -> Result<(Uuid, VoterState, BTreeMap<String, CopyChecks>), Status> {
        let uuid = parse_id(raw)?;
        let found = self.find(uuid).await?;
        found.certain(uuid)?;
        let state = found
            .newest
            .ok_or_else(|| Status::not_found(format!("volume {raw} does not exist")))?;
        Ok((uuid, state, found.checks))
    }

    async fn change(
        &self,
        uuid: Uuid,
        state: &VoterState,
        change: Change,
    ) -> Result<Outcome, Status> {
        let id = format!("controller/{}", uuid::Uuid::new_v4().simple());
        let (p, out) = Proposer::new(
            &id,
            change,
            &state.record,
            state.accepted.round.max(state.promised.round),
            0,
            PHASE_TIMEOUT_MS,
        );
        drive(Arc::clone(&self.peer), uuid, p, out, CHANGE_DEADLINE).await
    }

    /// ControllerPublishVolume: `node` becomes the owner (the epoch rises,
    /// fencing any engine elsewhere); the publish_context carries what the
    /// node's engine starts from.
    pub async fn publish(
        &self,
        r: &csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse, Status> {
        use crate::server::convert;
        convert::required_str("volume_id", &r.volume_id).map_err(Status::from)?;
        convert::required_str("node_id", &r.node_id).map_err(Status::from)?;
        let cap = convert::capability("volume_capability", r.volume_capability.as_ref())
            .map_err(Status::from)?;
        BackendKind::Replicated
            .profile()
            .check_capability(&cap)
            .map_err(|e| Status::invalid_argument(format!("volume_capability: {e}")))?;
        let (uuid, state) = self.newest(&r.volume_id).await?;
        let Some(target) = self.registry.get(&r.node_id) else {
            return Err(Status::not_found(format!(
                "node {} is not registered with this controller",
                r.node_id
            )));
        };
        let already = state
            .record
            .published_on()
            .is_some_and(|o| o.node == r.node_id);
        if target.max_volumes > 0 && !already {
            let owned = self.owned_by(&r.node_id, uuid).await?;
            if owned >= target.max_volumes {
                return Err(Status::resource_exhausted(format!(
                    "node {} already has {owned} replicated volumes published, its limit",
                    r.node_id
                )));
            }
        }
        let readonly = r.readonly || cap.access_mode.is_read_only();
        let change = Change::Publish {
            node: r.node_id.clone(),
            readonly,
        };
        let (ballot, record) = match self.change(uuid, &state, change).await? {
            Outcome::Chosen { ballot, record } => (ballot, record),
            Outcome::Refused {
                refusal: Refusal::OwnedBy { owner },
                ..
            } => {
                return Err(Status::failed_precondition(format!(
                    "volume {} is published on node {owner}; unpublish it there first",
                    r.volume_id
                )));
            }
            Outcome::Refused { refusal, .. } => {
                return Err(Status::failed_precondition(refusal.to_string()));
            }
        };
        if record
            .owner
            .as_ref()
            .is_some_and(|o| o.readonly != readonly)
        {
            return Err(Status::already_exists(format!(
                "volume {} is published on node {} with readonly={}",
                r.volume_id, r.node_id, !readonly
            )));
        }
        tracing::info!(volume = %r.volume_id, node = %r.node_id, epoch = record.epoch, "replicated volume published");
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: self.engine_context(&record, &ballot)?,
        })
    }

    /// The addresses (node id -> host:port) of `record`'s voters that the
    /// registry knows.
    fn addresses(&self, record: &ReplicaRecord) -> BTreeMap<String, String> {
        record
            .voters()
            .filter_map(|n| self.registry.get(n).map(|e| (n.to_owned(), e.advertise)))
            .collect()
    }

    /// What an engine starts from, for `record` chosen at `ballot`: a
    /// publication's publish_context, or a heal's request.
    #[allow(clippy::result_large_err)]
    fn engine_context(
        &self,
        record: &ReplicaRecord,
        ballot: &Ballot,
    ) -> Result<HashMap<String, String>, Status> {
        Ok(HashMap::from([
            (CONTEXT_RECORD.to_owned(), to_json(record)?),
            (CONTEXT_BALLOT.to_owned(), to_json(ballot)?),
            (
                CONTEXT_ADDRESSES.to_owned(),
                to_json(&self.addresses(record))?,
            ),
        ]))
    }

    /// How many replicated volumes other than `except` are published on
    /// `node`.
    async fn owned_by(&self, node: &str, except: Uuid) -> Result<u64, Status> {
        let mut n = 0;
        for u in self.list().await? {
            if u == except {
                continue;
            }
            let found = self.find(u).await?;
            if found
                .newest
                .is_some_and(|s| s.record.published_on().is_some_and(|o| o.node == node))
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// ControllerExpandVolume: the record's size grows on a majority (each
    /// copy extends its files as it takes it); the filesystem and the
    /// engine grow with NodeExpandVolume.
    pub async fn expand(
        &self,
        r: &csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        crate::server::convert::required_str("volume_id", &r.volume_id).map_err(Status::from)?;
        let c = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        if c.required_bytes < 0 || c.limit_bytes < 0 {
            return Err(Status::invalid_argument("capacity_range: negative"));
        }
        let want = (c.required_bytes as u64).div_ceil(REGION_BYTES) * REGION_BYTES;
        if c.limit_bytes > 0 && want > c.limit_bytes as u64 {
            return Err(Status::out_of_range(format!(
                "{} bytes take {want} (whole MiB regions), above the limit of {}",
                c.required_bytes, c.limit_bytes
            )));
        }
        let (uuid, state) = self.newest(&r.volume_id).await?;
        let mut size = state.record.size;
        if want > size {
            if u32::try_from(want.div_ceil(REGION_BYTES)).is_err() {
                return Err(Status::out_of_range(format!("{want} bytes is too large")));
            }
            match self
                .change(uuid, &state, Change::Resize { size: want })
                .await?
            {
                Outcome::Chosen { record, .. } => size = record.size,
                Outcome::Refused { refusal, .. } => {
                    return Err(Status::internal(refusal.to_string()));
                }
            }
            tracing::info!(volume = %r.volume_id, size, "replicated volume expanded");
        }
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            // Raw or not, the engine on the node grows the volume it serves.
            node_expansion_required: true,
        })
    }

    /// ControllerUnpublishVolume: releases the owner (fencing its engine).
    /// A volume or node that is gone is unpublished already.
    pub async fn unpublish(&self, r: &csi::ControllerUnpublishVolumeRequest) -> Result<(), Status> {
        crate::server::convert::required_str("volume_id", &r.volume_id).map_err(Status::from)?;
        let Ok(uuid) = parse_id(&r.volume_id) else {
            return Err(Status::not_found(format!(
                "no volume has the malformed ID {:?}",
                r.volume_id
            )));
        };
        let found = self.find(uuid).await?;
        found.certain(uuid)?;
        // Gone: unpublished everywhere already.
        let Some(state) = found.newest else {
            return Ok(());
        };
        let node = match (state.record.published_on(), r.node_id.as_str()) {
            (None, _) => return Ok(()),
            (Some(o), "") => o.node.clone(),
            (Some(o), n) if o.node != n => return Ok(()),
            (Some(o), _) => o.node.clone(),
        };
        match self
            .change(uuid, &state, Change::Unpublish { node })
            .await?
        {
            Outcome::Chosen { record, .. } => {
                if record.copies().any(|c| !record.in_sync.contains_key(c)) {
                    // The engine stopped with a copy still to rebuild: a
                    // heal takes it on.
                    self.wake_round();
                }
                Ok(())
            }
            Outcome::Refused { refusal, .. } => Err(Status::internal(refusal.to_string())),
        }
    }

    /// ControllerModifyVolume: the only mutable parameter is `replicas`
    /// (1-5). Copies are added on new nodes (rebuilt in full by the engine
    /// while I/O goes on, or by the next engine to start) or removed, then
    /// deleted once the change is chosen. Idempotent: the volume already
    /// has that many copies -> nothing to do. INVALID_ARGUMENT for another
    /// parameter or a value out of range, NOT_FOUND for no such volume,
    /// RESOURCE_EXHAUSTED when too few nodes can take a copy.
    pub async fn modify(&self, r: &csi::ControllerModifyVolumeRequest) -> Result<(), Status> {
        crate::server::convert::required_str("volume_id", &r.volume_id).map_err(Status::from)?;
        let mut replicas = None;
        for (k, v) in &r.mutable_parameters {
            match k.as_str() {
                "replicas" => {
                    let p = ReplicaParams::parse(Some(v), None).map_err(|e| {
                        Status::invalid_argument(format!("mutable_parameters: {e}"))
                    })?;
                    replicas = Some(p.replicas);
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "mutable_parameters: {other:?} cannot be changed on a replicated volume (only replicas)"
                    )));
                }
            }
        }
        let Some(replicas) = replicas else {
            return Err(Status::invalid_argument("mutable_parameters is required"));
        };
        let (uuid, state) = self.newest(&r.volume_id).await?;
        let state = self.finish_members(uuid, state).await?;
        let members = placement::reshape(
            &self.candidates(),
            &state.record,
            replicas,
            &Default::default(),
        )
        .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        self.set_members(uuid, state, members).await?;
        tracing::info!(volume = %r.volume_id, replicas, "replicated volume's copies changed");
        Ok(())
    }

    fn candidates(&self) -> Vec<Candidate> {
        let now = Instant::now();
        self.registry
            .all()
            .into_iter()
            .map(|n| Candidate {
                fresh: n.fresh(now),
                zone: n.labels.get("zone").cloned(),
                cordoned: n.cordoned,
                free_bytes: n.free_bytes,
                node: n.id,
            })
            .collect()
    }

    /// A membership change cut short (the record still names the previous
    /// members) is finished first; returns the newest state.
    async fn finish_members(&self, uuid: Uuid, state: VoterState) -> Result<VoterState, Status> {
        if state.record.previous.is_none() {
            return Ok(state);
        }
        let target = state.record.members.clone();
        self.set_members(uuid, state, target).await?;
        let (_, state) = self.newest(&volume_id(uuid)).await?;
        Ok(state)
    }

    /// Changes the members to `members` ([`Replicated::change_members`]).
    /// A node whose member changes role (a witness that becomes a copy, a
    /// copy that becomes the witness: a node's store holds one member of a
    /// volume, made as one or the other) leaves first and then joins
    /// again: a first change to the members without it (and with no
    /// witness, unless two copies remain), its member deleted, then the
    /// change to `members`, where it is made anew (a copy out of sync,
    /// rebuilt in full). Cut short between the two, the volume has the
    /// first change's members, which are valid; a retry goes on from
    /// there.
    async fn set_members(
        &self,
        uuid: Uuid,
        state: VoterState,
        members: Vec<Member>,
    ) -> Result<(), Status> {
        let changed: Vec<String> = members
            .iter()
            .filter(|m| {
                state
                    .record
                    .members
                    .iter()
                    .any(|o| o.node == m.node && o.role != m.role)
            })
            .map(|m| m.node.clone())
            .collect();
        if changed.is_empty() {
            return self.change_members(uuid, state, members).await;
        }
        let mut first: Vec<Member> = members
            .iter()
            .filter(|m| !changed.contains(&m.node))
            .cloned()
            .collect();
        if first.iter().filter(|m| m.role == Role::Copy).count() != 2 {
            first.retain(|m| m.role == Role::Copy);
        }
        tracing::info!(volume = %volume_id(uuid), nodes = ?changed, "members that change role leave the volume first, then join again");
        self.change_members(uuid, state, first).await?;
        for n in &changed {
            self.delete_on(n, uuid).await.map_err(|e| {
                Status::unavailable(format!(
                    "{} (its member leaves volume {} to join again as a {}; retry to go on)",
                    e.message(),
                    volume_id(uuid),
                    if members.iter().any(|m| &m.node == n && m.role == Role::Copy) {
                        "copy"
                    } else {
                        "witness"
                    }
                ))
            })?;
        }
        let (_, state) = self.newest(&volume_id(uuid)).await?;
        self.change_members(uuid, state, members).await
    }

    /// Changes the members to `members`: creates the new ones (holding a
    /// first record that names them, accepted at the zero ballot, so it
    /// never outranks a chosen record), drives the two steps of the change,
    /// tells the owner's engine, deletes the removed members. Idempotent.
    async fn change_members(
        &self,
        uuid: Uuid,
        mut state: VoterState,
        members: Vec<Member>,
    ) -> Result<(), Status> {
        let old: Vec<String> = state
            .record
            .voters()
            .chain(
                state
                    .record
                    .previous
                    .iter()
                    .flatten()
                    .map(|m| m.node.as_str()),
            )
            .map(str::to_owned)
            .collect();
        if state.record.has_members(&members) && state.record.previous.is_none() {
            return Ok(());
        }
        if state.accepted == Ballot::zero() {
            // Nothing chosen above the zero ballot yet: a no-op change
            // first, so the joiners' first record can never tie with it.
            let noop = Change::Members {
                members: state.record.members.clone(),
            };
            state = self.chosen(uuid, &state, noop).await?;
        }
        // A joiner's `since` in its first record is its voter's floor:
        // above every version at which its node was a member before (the
        // change that adds it applies to this record or a newer one and
        // sets the same or a higher `since`).
        let joiner = |m: &Member| !old.contains(&m.node);
        let first_members = members
            .iter()
            .map(|m| Member {
                since: if joiner(m) {
                    state.record.version + 1
                } else {
                    m.since
                },
                ..m.clone()
            })
            .collect();
        let first = ReplicaRecord::new(uuid, state.record.size, first_members, &BTreeMap::new())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for m in &members {
            if joiner(m) {
                self.create_on(&m.node, &first).await?;
            }
        }
        let change = Change::Members { members };
        let mid = self.chosen(uuid, &state, change.clone()).await?;
        self.refresh_owner(&mid.record).await;
        let done = self.chosen(uuid, &mid, change).await?;
        self.refresh_owner(&done.record).await;
        // A copy added may be healed, a drain's next step taken.
        self.wake_round();
        for n in &old {
            if !done.record.voters().any(|v| v == n)
                && self
                    .registry
                    .get(n)
                    .is_some_and(|e| e.fresh(Instant::now()))
                && let Err(e) = self.delete_on(n, uuid).await
            {
                tracing::warn!(volume = %volume_id(uuid), node = %n, error = %e.message(), "removed member not deleted");
            }
        }
        Ok(())
    }

    /// Drives `change` and returns the state it chose (as a voter that
    /// accepted it holds it).
    async fn chosen(
        &self,
        uuid: Uuid,
        state: &VoterState,
        change: Change,
    ) -> Result<VoterState, Status> {
        match self.change(uuid, state, change).await? {
            Outcome::Chosen { ballot, record } => Ok(VoterState {
                promised: ballot.clone(),
                accepted: ballot,
                record,
                boot: state.boot,
                floor: state.floor,
            }),
            Outcome::Refused {
                refusal: r @ Refusal::Reconfiguring { .. },
                ..
            } => Err(Status::aborted(r.to_string())),
            Outcome::Refused { refusal, .. } => Err(Status::failed_precondition(format!(
                "volume {}: {refusal}",
                volume_id(uuid)
            ))),
        }
    }

    /// Tells the owner's engine (a publication's, or a heal's: it rebuilds
    /// a copy added meanwhile too) that the members changed, with every
    /// voter's address. Best effort: an engine that misses it learns with
    /// its next change, and one that starts later reads the newest record.
    async fn refresh_owner(&self, record: &ReplicaRecord) {
        let Some(owner) = record.owner.as_ref() else {
            return;
        };
        let Some(n) = self.registry.get(&owner.node) else {
            return;
        };
        let Ok(request) = serde_json::to_vec(&self.addresses(record)) else {
            return;
        };
        let mut c = ReplicaClient::new(n.channel.clone());
        let call = ReplicaCall {
            volume: record.uuid.to_hex(),
            request,
            ..Default::default()
        };
        if let Ok(Err(s)) | Err(s) = tokio::time::timeout(CALL_DEADLINE, c.refresh(call))
            .await
            .map_err(|_| Status::deadline_exceeded("no answer in time"))
        {
            tracing::warn!(volume = %volume_id(record.uuid), node = %owner.node, error = %s.message(), "the engine was not told of new members");
        }
    }

    /// Starts a heal of `uuid` (whose newest record is `state`) on `node`
    /// in the background, unless one runs or failed lately
    /// ([`Heals::begin`]).
    fn start_heal(&self, uuid: Uuid, state: VoterState, node: String, how: HealIdle) {
        if !self.heals.begin(uuid, Instant::now()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let r = this.heal(uuid, &state, &node, how).await;
            this.end_heal(uuid, &node).await;
            match &r {
                Ok(h) => {
                    tracing::info!(volume = %volume_id(uuid), node = %node, bytes = h.rebuilt_bytes, seconds = h.seconds, "healed: every copy in sync")
                }
                Err(e) => {
                    tracing::warn!(volume = %volume_id(uuid), node = %node, error = %e.message(), "heal ended before every copy was in sync")
                }
            }
            // Taken over by a publication: its engine goes on, and a heal
            // may follow as soon as it is unpublished.
            let taken = r.as_ref().is_err_and(|e| e.code() == tonic::Code::Aborted);
            let retry = this.heals.end(uuid, r.is_ok() || taken, Instant::now());
            // Healed: a drain's next step, or a heal that waited for room,
            // is for the next round; failed: the next heal after its wait.
            tokio::time::sleep(retry.unwrap_or_default()).await;
            this.wake_round();
        });
    }

    /// A heal: takes the volume nobody publishes for `node`
    /// ([`Change::Heal`]), whose engine with no mount rebuilds the copies
    /// out of sync (and the regions a copy could not read) until every
    /// copy is in sync. A ControllerPublishVolume meanwhile takes the
    /// volume over, which ends the heal; the next engine goes on.
    async fn heal(
        &self,
        uuid: Uuid,
        state: &VoterState,
        node: &str,
        how: HealIdle,
    ) -> Result<super::proto::HealResponse, Status> {
        let (ballot, record) = match self
            .change(
                uuid,
                state,
                Change::Heal {
                    node: node.to_owned(),
                },
            )
            .await?
        {
            Outcome::Chosen { ballot, record } => (ballot, record),
            Outcome::Refused { refusal, .. } => return Err(Status::aborted(refusal.to_string())),
        };
        tracing::info!(volume = %volume_id(uuid), node = %node, epoch = record.epoch, rate_mib_s = how.rate.map(|r| r >> 20), "healing: copies out of sync are rebuilt with nobody publishing the volume");
        let req = super::proto::HealRequest {
            volume: uuid.to_hex(),
            context: self.engine_context(&record, &ballot)?,
            rate: how.rate.unwrap_or(0),
        };
        let mut c = ReplicaClient::new(self.node(node)?.channel.clone());
        c.heal(req).await.map(tonic::Response::into_inner)
    }

    /// Releases `uuid` from a heal on `node` ([`Change::Healed`]; nothing
    /// to do when a publication took it over). Best effort: the next
    /// round releases a heal nobody runs.
    async fn end_heal(&self, uuid: Uuid, node: &str) {
        let released = async {
            let found = self.find(uuid).await?;
            let Some(state) = found.newest else {
                return Ok(());
            };
            if !state
                .record
                .owner
                .as_ref()
                .is_some_and(|o| o.heal && o.node == node)
            {
                return Ok(());
            }
            self.change(
                uuid,
                &state,
                Change::Healed {
                    node: node.to_owned(),
                },
            )
            .await
            .map(drop)
        };
        if let Err(e) = released.await {
            tracing::warn!(volume = %volume_id(uuid), node = %node, error = %e.message(), "heal not released yet");
        }
    }

    /// Takes `nodes` out of the in-sync set of `uuid`'s record `state`
    /// ([`Change::Outvoted`]), saying `why` in the log: their idle reads at
    /// that record found other bytes than a majority of the copies in sync,
    /// or an operator trusts another copy ([`Replicated::repair`]).
    /// Refused, harmlessly, once the record moved on (a publish) or while
    /// anyone owns the volume.
    async fn outvote(
        &self,
        uuid: Uuid,
        state: &VoterState,
        nodes: Vec<String>,
        why: &str,
    ) -> Result<(), Status> {
        let version = state.record.version;
        let change = Change::Outvoted {
            version,
            nodes: nodes.clone(),
        };
        match self.change(uuid, state, change).await? {
            Outcome::Chosen { .. } => {
                tracing::warn!(volume = %volume_id(uuid), nodes = ?nodes, version, "{why}: taken out of sync, the next engine (or heal) rebuilds them in full");
                Ok(())
            }
            Outcome::Refused { refusal, .. } => Err(Status::aborted(format!(
                "copies on {} not taken out of sync: {refusal}",
                nodes.join(", ")
            ))),
        }
    }

    /// `stowage volume repair ID --from NODE`: trusts the copy on `from`
    /// of a volume nobody publishes. Every other copy in sync is taken out
    /// of sync ([`Replicated::outvote`]), so the next heal (or the next
    /// publication's engine) rebuilds it in full from the copy on `from`:
    /// the way out when copies hold different bytes with no majority to
    /// tell which are right. Returns the copies taken out of sync (none:
    /// nothing else was in sync, as after a repair already made).
    /// INVALID_ARGUMENT when `from` holds no copy, FAILED_PRECONDITION
    /// when its copy is out of sync or the volume is published (its
    /// engine's scrub repairs by majority), ABORTED while a heal holds it.
    pub async fn repair(&self, raw: &str, from: &str) -> Result<Vec<String>, Status> {
        crate::server::convert::required_str("from", from).map_err(Status::from)?;
        let (uuid, state) = self.newest(raw).await?;
        let r = &state.record;
        if !r.is_copy(from) {
            return Err(Status::invalid_argument(format!(
                "{from} holds no copy of {raw} (copies on {})",
                r.copies().collect::<Vec<_>>().join(", ")
            )));
        }
        if !r.in_sync.contains_key(from) {
            return Err(Status::failed_precondition(format!(
                "the copy on {from} is out of sync: it cannot be the one the others are rebuilt from"
            )));
        }
        if let Some(o) = r.published_on() {
            return Err(Status::failed_precondition(format!(
                "{raw} is published on {}: unpublish it first (a published volume's scrub writes the majority's bytes)",
                o.node
            )));
        }
        let others: Vec<String> = r.in_sync.keys().filter(|n| *n != from).cloned().collect();
        if others.is_empty() {
            return Ok(others);
        }
        self.outvote(
            uuid,
            &state,
            others.clone(),
            &format!("an operator's repair trusts the copy on {from}; the other copies"),
        )
        .await?;
        Ok(others)
    }

    /// Replaces `uuid`'s members on nodes the registry has not heard from
    /// for `after` (lost nodes; a node that never registered since this
    /// controller started counts once the controller has been up that
    /// long) by members on other nodes: new copies are rebuilt in full.
    /// Returns whether it changed the members. A volume whose in-sync
    /// copies are all lost is left alone (nothing to rebuild from). First,
    /// members removed while their node was away (by ModifyVolume, or
    /// replaced here) are deleted from it once it is back (see
    /// `removed_members`). Before anything else, copies of a volume nobody
    /// publishes that their idle reads found outvoted ([`copy_checks`])
    /// are taken out of sync, and the round ends there for the volume. Two
    /// copies with no witness (a change of members cut short) get one.
    ///
    /// The nodes in `unlisted` (node, why) did not list their copies this
    /// round: they are not asked again (see [`Self::find_skipping`]).
    pub async fn replace_lost(
        &self,
        uuid: Uuid,
        after: Duration,
        heal: Option<HealIdle>,
        unlisted: &BTreeMap<String, String>,
    ) -> Result<bool, Status> {
        let now = Instant::now();
        let unknown_lost = now.duration_since(self.started) >= after;
        let is_lost = |n: &str| match self.registry.get(n) {
            Some(e) => now.duration_since(e.last_seen) >= after,
            None => unknown_lost,
        };
        let found = self.find_skipping(uuid, unlisted).await?;
        let draining = self.registry.draining();
        self.drains
            .look(uuid, found.newest.as_ref().map(|s| &s.record), &draining);
        let Some(state) = found.newest else {
            return Ok(false);
        };
        let outvoted = self.condition(&state.record, &found.checks).outvoted;
        if !outvoted.is_empty() {
            self.outvote(
                uuid,
                &state,
                outvoted,
                "copies whose reads found other bytes than the majority's",
            )
            .await?;
            return Ok(false);
        }
        // Members removed while their node was away, now back; members
        // made for a change that never happened, long untouched.
        let removed = removed_members(&state, &found.holders);
        let orphans = orphaned_members(&state, &found.holders, &found.idle, after);
        for (n, what) in removed.into_iter().map(|n| (n, "removed member")).chain(
            orphans
                .into_iter()
                .map(|n| (n, "member of a failed change")),
        ) {
            match self.delete_on(&n, uuid).await {
                Ok(()) => {
                    tracing::info!(volume = %volume_id(uuid), node = %n, "{what} deleted from its node")
                }
                Err(e) => {
                    tracing::warn!(volume = %volume_id(uuid), node = %n, error = %e.message(), "{what} not deleted yet")
                }
            }
        }
        let r = &state.record;
        let gone: std::collections::BTreeSet<String> = r
            .voters()
            .filter(|v| is_lost(v))
            .map(str::to_owned)
            .collect();
        if gone.is_empty() && r.copies().any(|c| !r.in_sync.contains_key(c)) {
            // A copy out of sync with no node lost: the owner's engine is
            // rebuilding it, or it missed the Refresh that named the copy
            // (best effort) and would leave it out of sync for good. Tell
            // it again: an engine that knows the copy reads the record
            // once more, which costs one change per round.
            self.refresh_owner(r).await;
        }
        if let Some(o) = r.owner.as_ref().filter(|o| o.heal)
            && !self.heals.running(uuid)
        {
            // A heal this controller does not run (it ended, or the
            // controller restarted during it): released.
            self.end_heal(uuid, &o.node).await;
            return Ok(false);
        }
        if gone.is_empty()
            && r.previous.is_none()
            && r.copies().count() == 2
            && r.leaving().count() == 0
            && !r.members.iter().any(|m| m.role == Role::Witness)
        {
            // Two copies and no witness: a change of members cut short
            // between its two steps (a member changing role, see
            // `set_members`). It gets its witness, as two copies have;
            // not a lone copy moving off a draining node with no third
            // node for one (`placement::evacuate`).
            let members = placement::reshape(&self.candidates(), r, 2, &gone)
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            self.set_members(uuid, state, members).await?;
            tracing::info!(volume = %volume_id(uuid), "a witness added to two copies that had none");
            return Ok(true);
        }
        if gone.is_empty()
            && r.previous.is_none()
            && self.drain_step(uuid, &state, &draining, heal).await?
        {
            return Ok(true);
        }
        if gone.is_empty() {
            let fresh: Vec<String> = self.registry.fresh().into_iter().map(|n| n.id).collect();
            if let Some(how) = heal
                && let Some(node) = heal_node(r, &found.checks, |n| fresh.iter().any(|f| f == n))
            {
                self.start_heal(uuid, state.clone(), node, how);
            }
            return Ok(false);
        }
        if r.in_sync.keys().all(|n| gone.contains(n)) {
            return Ok(false);
        }
        // The copies that stay: a copy leaving (a drain) is not one of them.
        let copies = r.copies().count() - r.leaving().count();
        let state = self.finish_members(uuid, state).await?;
        let members = placement::reshape(&self.candidates(), &state.record, copies, &gone)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        self.set_members(uuid, state, members).await?;
        tracing::info!(volume = %volume_id(uuid), lost = ?gone, "lost members replaced");
        Ok(true)
    }

    /// One step of moving `uuid`'s members off the draining nodes, make
    /// before break ([`placement::evacuate`]), noted in [`Drains`]: a copy
    /// more on another node for each one there, then, once the engine that
    /// runs (a publication's or a heal's) has it in sync, the copy there
    /// goes. Returns whether the members changed.
    async fn drain_step(
        &self,
        uuid: Uuid,
        state: &VoterState,
        draining: &BTreeSet<String>,
        heal: Option<HealIdle>,
    ) -> Result<bool, Status> {
        let r = &state.record;
        let nodes = draining_members(r, draining);
        let (members, step) = match placement::evacuate(&self.candidates(), r, draining) {
            Ok(Evacuation::Nothing) => {
                self.drains.clear(uuid);
                return Ok(false);
            }
            Err(e) => {
                self.drains.note(uuid, nodes, format!("cannot move: {e}"));
                return Ok(false);
            }
            Ok(Evacuation::Rebuilding(behind)) => {
                let left = match &r.owner {
                    Some(o) => self.rebuild_left(&o.node, uuid, &behind).await,
                    None => None,
                };
                if let Some(o) = r.owner.as_ref().filter(|o| !o.heal) {
                    self.watch_rebuild(&o.node, uuid, &behind);
                }
                let left = left.map_or_else(String::new, |mib| format!(", {mib} MiB left"));
                let by = match &r.owner {
                    Some(o) if o.heal => format!("healing on {}", o.node),
                    Some(o) => format!("by the engine on {}, where it is published", o.node),
                    None if heal.is_some() => "a heal starts in a round".to_owned(),
                    None => {
                        "no heal (--replica-heal-idle off): the next publication's engine rebuilds"
                            .to_owned()
                    }
                };
                self.drains.note(
                    uuid,
                    nodes,
                    format!(
                        "new copy on {} being rebuilt{left} ({by})",
                        behind.join(", ")
                    ),
                );
                return Ok(false);
            }
            Ok(Evacuation::Members { members, step }) => (members, step),
        };
        if let Some(o) = r.owner.as_ref().filter(|o| o.heal) {
            self.drains.note(
                uuid,
                nodes,
                format!("waiting for the heal on {} to end", o.node),
            );
            return Ok(false);
        }
        let what = match step {
            Step::Add => "copies added elsewhere first (make before break)",
            Step::Remove => "leaving copies removed, their replacements in sync",
            Step::Witness => "witness moved",
            Step::Replace => "copies replaced in place (the volume has as many copies as it may)",
        };
        if let Err(e) = self.set_members(uuid, state.clone(), members.clone()).await {
            self.drains.note(
                uuid,
                nodes,
                format!("{what}: failed, retried next round: {}", e.message()),
            );
            return Err(e);
        }
        let on: Vec<&str> = members
            .iter()
            .filter(|m| draining.contains(&m.node))
            .map(|m| m.node.as_str())
            .collect();
        tracing::info!(volume = %volume_id(uuid), from = ?nodes, members = ?members.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(), "drain: {what}");
        if on.is_empty() {
            self.drains.clear(uuid);
        } else {
            self.drains.note(uuid, nodes, what.to_owned());
        }
        Ok(true)
    }

    /// Watches the engine of the publication on `node` rebuild `uuid`'s
    /// copies on `nodes`, which a drain waits for, asking it every second:
    /// the round is woken once it has them in sync, not left to its
    /// period (a heal's end wakes it by itself). One watch a volume, for
    /// at most [`REBUILD_WATCH`], and none once the engine stops or does
    /// not answer: the rounds see to the volume then.
    fn watch_rebuild(&self, node: &str, uuid: Uuid, nodes: &[String]) {
        if !self
            .watching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uuid)
        {
            return;
        }
        let (this, node, nodes) = (self.clone(), node.to_owned(), nodes.to_vec());
        tokio::spawn(async move {
            let until = Instant::now() + REBUILD_WATCH;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Ok(s) = this
                    .engine_status(&node, uuid, Duration::from_secs(1))
                    .await
                else {
                    break;
                };
                let built = nodes.iter().all(|n| {
                    s.copies
                        .iter()
                        .any(|c| c.node == *n && c.phase == "in-sync")
                });
                if !s.running || built {
                    this.wake_round();
                    break;
                }
            }
            this.watching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uuid);
        });
    }

    /// The MiB the engine on `node` has left to rebuild on the copies of
    /// `nodes`, as it says (best effort: None when it does not answer within
    /// a second, runs no engine, or lists none of them).
    async fn rebuild_left(&self, node: &str, uuid: Uuid, nodes: &[String]) -> Option<u64> {
        let r = self
            .engine_status(node, uuid, Duration::from_secs(1))
            .await
            .ok()?;
        let dirty: Vec<u64> = r
            .copies
            .iter()
            .filter(|c| r.running && nodes.contains(&c.node))
            .map(|c| c.dirty_regions)
            .collect();
        (!dirty.is_empty()).then(|| dirty.iter().sum())
    }

    /// The status of `uuid`'s engine on `node`, asked within `within`; why
    /// not when the node is not registered or does not answer in time.
    async fn engine_status(
        &self,
        node: &str,
        uuid: Uuid,
        within: Duration,
    ) -> Result<super::proto::EngineStatusResponse, String> {
        let n = self
            .registry
            .get(node)
            .ok_or_else(|| format!("node {node} is not registered"))?;
        let mut c = ReplicaClient::new(n.channel.clone());
        let req = GetReplicaRequest {
            volume: uuid.to_hex(),
        };
        match tokio::time::timeout(within, c.engine(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!(
                "the engine on {node} did not answer: {}",
                s.message()
            )),
            Err(_) => Err(format!("the engine on {node} did not answer in time")),
        }
    }

    /// What the engine on `node` says of each copy (best effort: a node that
    /// does not answer is named).
    async fn engine_view(&self, node: &str, uuid: Uuid) -> String {
        match self.engine_status(node, uuid, Duration::from_secs(2)).await {
            Ok(r) => {
                if !r.running {
                    return "; no engine runs there (not staged yet, or its node plugin restarted)"
                        .to_owned();
                }
                let copies: Vec<String> = r
                    .copies
                    .iter()
                    .map(|c| {
                        let mut s = format!("{} {}", c.node, c.phase);
                        if c.failing {
                            s.push_str(" (failing)");
                        }
                        if c.dirty_regions > 0 {
                            s.push_str(&format!(" ({} MiB to rebuild)", c.dirty_regions));
                        }
                        if c.scrub_repairs > 0 {
                            s.push_str(&format!(
                                " ({} MiB repaired by the scrub)",
                                c.scrub_repairs
                            ));
                        }
                        if c.errors > 0 {
                            s.push_str(&format!(
                                " ({} failed calls, the last {} s ago: {})",
                                c.errors,
                                c.last_error_age_ms / 1000,
                                c.last_error
                            ));
                        }
                        s
                    })
                    .collect();
                let mut scrub = format!(
                    "scrub: {} passes, {} MiB checked",
                    r.scrub_passes, r.scrub_regions
                );
                if r.scrub_unresolved > 0 {
                    scrub.push_str(&format!(
                        ", {} MiB it could not repair (no majority, or the only copy cannot read them)",
                        r.scrub_unresolved
                    ));
                }
                if r.scrubbing {
                    scrub.push_str(&format!(", at MiB {}", r.scrub_at));
                }
                scrub.push_str(&scrub_schedule(
                    r.scrub_last_done,
                    r.scrub_next_at,
                    crate::backend::replicated::store::unix_now(),
                ));
                format!(
                    "; engine {} at epoch {}: {}; {} MiB rebuilt; {scrub}",
                    r.state,
                    r.epoch,
                    copies.join(", "),
                    r.rebuild_bytes >> 20
                )
            }
            Err(why) => format!("; {why}"),
        }
    }

    /// Every replicated volume any fresh node holds a member of, sorted.
    /// UNAVAILABLE when a fresh node does not answer (the list would be
    /// incomplete).
    pub async fn list(&self) -> Result<Vec<Uuid>, Status> {
        let (all, unreached) = self.list_reached().await;
        match unreached.into_iter().next() {
            Some((node, why)) => Err(Status::unavailable(format!("node {node} {why}"))),
            None => Ok(all),
        }
    }

    /// The replicated volumes the fresh nodes that answered hold a member
    /// of, sorted, and why each other fresh node is missing from the list
    /// (by node). The nodes are asked at once, each for at most
    /// [`CALL_DEADLINE`].
    pub async fn list_reached(&self) -> (Vec<Uuid>, BTreeMap<String, String>) {
        let nodes = self.registry.fresh();
        let said = ask_all(&nodes, |mut c| async move {
            c.list(super::proto::ListReplicasRequest {}).await
        })
        .await;
        let mut all = std::collections::BTreeSet::new();
        let mut unreached = BTreeMap::new();
        for (n, a) in nodes.iter().zip(said) {
            let why = match a {
                Asked::Answered(listed) => {
                    all.extend(listed.volumes.iter().filter_map(|v| Uuid::parse_hex(v)));
                    continue;
                }
                Asked::Refused(s) => format!("did not list its copies: {}", s.message()),
                Asked::Late => "did not list its copies in time".to_owned(),
            };
            unreached.insert(n.id.clone(), why);
        }
        (all.into_iter().collect(), unreached)
    }

    /// ListVolumes' entry for one replicated volume (None when it went
    /// meanwhile).
    pub async fn list_entry(
        &self,
        uuid: Uuid,
    ) -> Result<Option<csi::list_volumes_response::Entry>, Status> {
        let found = self.find(uuid).await?;
        let Some(state) = found.newest else {
            return Ok(None);
        };
        let record = state.record;
        let Findings {
            bad: abnormal,
            said: message,
            ..
        } = self.condition(&record, &found.checks);
        Ok(Some(csi::list_volumes_response::Entry {
            volume: Some(Self::volume(&record)),
            status: Some(csi::list_volumes_response::VolumeStatus {
                published_node_ids: record
                    .published_on()
                    .map(|o| o.node.clone())
                    .into_iter()
                    .collect(),
                volume_condition: Some(csi::VolumeCondition { abnormal, message }),
            }),
        }))
    }

    /// ValidateVolumeCapabilities: confirmed when the volume exists and
    /// every capability is one it serves.
    pub async fn validate(
        &self,
        r: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, Status> {
        use crate::server::convert;
        convert::required_str("volume_id", &r.volume_id).map_err(Status::from)?;
        let caps = convert::capabilities("volume_capabilities", &r.volume_capabilities)
            .map_err(Status::from)?;
        self.newest(&r.volume_id).await?;
        let profile = BackendKind::Replicated.profile();
        let refused: Vec<String> = caps
            .iter()
            .filter_map(|c| profile.check_capability(c).err())
            .collect();
        if !refused.is_empty() {
            return Ok(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: refused.join("; "),
            });
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: r.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    /// Starts a scrub pass of the volume now in the engine of the node it
    /// is published on (`stowage volume scrub`); of a volume not
    /// published, a read of each copy by its node (see
    /// [`Self::check_idle`]).
    pub async fn scrub(&self, raw: &str) -> Result<super::proto::ScrubResponse, Status> {
        let (uuid, state) = self.newest(raw).await?;
        let Some(owner) = state.record.owner else {
            return self.check_idle(raw, uuid, &state.record).await;
        };
        if owner.heal {
            return Err(Status::failed_precondition(format!(
                "volume {raw} is being healed on node {} (its copies out of sync rebuilt): scrub it once that ended",
                owner.node
            )));
        }
        let n = self.node(&owner.node)?;
        let mut c = ReplicaClient::new(n.channel.clone());
        let req = GetReplicaRequest {
            volume: uuid.to_hex(),
        };
        match tokio::time::timeout(CALL_DEADLINE, c.scrub(bounded(req, CALL_DEADLINE))).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Status::new(
                s.code(),
                format!("node {}: {}", owner.node, s.message()),
            )),
            Err(_) => Err(Status::unavailable(format!(
                "node {} did not answer in time",
                owner.node
            ))),
        }
    }

    /// `stowage volume scrub` of a volume nobody publishes: no engine runs
    /// to compare its copies, so each copy's node reads its copy from its
    /// disk now (the regions it cannot read are rebuilt by the next
    /// engine). Every copy's answer, or why its node gave none;
    /// UNAVAILABLE when no node answered, FAILED_PRECONDITION when the
    /// volume was published meanwhile.
    async fn check_idle(
        &self,
        raw: &str,
        uuid: Uuid,
        record: &ReplicaRecord,
    ) -> Result<super::proto::ScrubResponse, Status> {
        let mut idle = Vec::new();
        let mut published = None;
        for node in record.copies() {
            let req = GetReplicaRequest {
                volume: uuid.to_hex(),
            };
            let answer = match self.node(node) {
                Err(s) => Err(s),
                Ok(n) => {
                    let mut c = ReplicaClient::new(n.channel.clone());
                    let asked = c.check_idle(bounded(req, CALL_DEADLINE));
                    match tokio::time::timeout(CALL_DEADLINE, asked).await {
                        Ok(r) => r.map(|r| r.into_inner()),
                        Err(_) => Err(Status::unavailable("no answer in time")),
                    }
                }
            };
            idle.push(answer.unwrap_or_else(|s| {
                if s.code() == tonic::Code::FailedPrecondition {
                    published = Some(format!("node {node}: {}", s.message()));
                }
                super::proto::IdleCheck {
                    node: node.to_owned(),
                    error: format!("{:?}: {}", s.code(), s.message()),
                    ..Default::default()
                }
            }));
        }
        if let Some(why) = published {
            return Err(Status::failed_precondition(format!(
                "volume {raw} was published meanwhile, or its members changed ({why}): scrub it again"
            )));
        }
        if idle.iter().all(|c| !c.error.is_empty()) {
            return Err(Status::unavailable(format!(
                "volume {raw} is not published and no node of its copies could read them: {}",
                idle.iter()
                    .map(|c| format!("{}: {}", c.node, c.error))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        Ok(super::proto::ScrubResponse {
            idle,
            ..Default::default()
        })
    }

    /// ControllerGetVolume: the volume, the node it is published on, and
    /// its condition ([`condition`], with the engine's view of a published
    /// volume).
    pub async fn get_volume(&self, raw: &str) -> Result<csi::ControllerGetVolumeResponse, Status> {
        let (uuid, state, checks) = self.newest_found(raw).await?;
        let record = state.record;
        let Findings {
            bad: abnormal,
            said: mut message,
            ..
        } = self.condition(&record, &checks);
        // A publication's engine, or a heal's.
        if let Some(o) = &record.owner {
            message.push_str(&self.engine_view(&o.node, uuid).await);
        }
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(Self::volume(&record)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: record
                    .published_on()
                    .map(|o| o.node.clone())
                    .into_iter()
                    .collect(),
                volume_condition: Some(csi::VolumeCondition { abnormal, message }),
            }),
        })
    }
}

/// Where to heal a volume nobody publishes, if it needs it and a heal can
/// end: some copy is out of sync, or its node found regions it could not
/// read while another copy in sync read whole (something to rebuild
/// them from: a lone copy's unreadable regions no heal can mend, and
/// healing it each round would achieve nothing). Only while every copy's
/// node is `up` (an engine waits for a copy it cannot reach; a lost one
/// is replaced first) and no membership change is under way. The first
/// copy in sync.
fn heal_node(
    record: &ReplicaRecord,
    checks: &BTreeMap<String, CopyChecks>,
    up: impl Fn(&str) -> bool,
) -> Option<String> {
    if record.owner.is_some() || record.previous.is_some() || !record.copies().all(&up) {
        return None;
    }
    let unreadable = |c: &str| checks.get(c).map(|k| k.unreadable > 0);
    let out = record.copies().any(|c| !record.in_sync.contains_key(c));
    let mendable = record.copies().any(|c| {
        unreadable(c) == Some(true)
            && record
                .in_sync
                .keys()
                .any(|s| s != c && unreadable(s) == Some(false))
    });
    if !out && !mendable {
        return None;
    }
    record.in_sync.keys().next().cloned()
}

/// A volume's condition as its copies' records say, for ListVolumes and
/// ControllerGetVolume alike: how many copies are in sync, where the
/// copies and the witness are and where it is published; of a volume
/// nobody publishes (no engine), what each copy's node found when it read
/// its copy ([`copy_checks`]), with the copies that found outvoted.
/// Abnormal while a copy is out of sync, or when those checks found a
/// fault.
fn condition(record: &ReplicaRecord, checks: &BTreeMap<String, CopyChecks>) -> Findings {
    let copies = record.copies().count();
    let in_sync = record.in_sync.len();
    let mut message = format!(
        "{in_sync} of {copies} copies in sync (epoch {}); copies on {}",
        record.epoch,
        record.copies().collect::<Vec<_>>().join(", ")
    );
    if let Some(w) = record.members.iter().find(|m| m.role == Role::Witness) {
        message.push_str(&format!("; witness on {}", w.node));
    }
    let leaving: Vec<&str> = record.leaving().collect();
    if !leaving.is_empty() {
        message.push_str(&format!(
            "; leaving: {} (its node drains: it goes once the other copies are in sync)",
            leaving.join(", ")
        ));
    }
    let mut found = Findings::default();
    if let Some(o) = &record.owner {
        if o.heal {
            // Healing: something (a copy out of sync, regions a disk could
            // not read) is being mended.
            found.bad = true;
            message.push_str(&format!(
                "; healing on {} (an engine with no mount rebuilds the copies out of sync)",
                o.node
            ));
        } else {
            message.push_str(&format!("; published on {}", o.node));
        }
    } else {
        let copies: Vec<(&str, bool, Option<&CopyChecks>)> = record
            .copies()
            .map(|c| (c, record.in_sync.contains_key(c), checks.get(c)))
            .collect();
        found = copy_checks(
            &copies,
            record.version,
            crate::backend::replicated::store::unix_now(),
        );
        message.push_str(&found.said);
    }
    found.said = message;
    found.bad |= in_sync < copies;
    found
}

/// Whether `newest` is settled (no membership change in flight) and a
/// majority of its voters accepted it at its ballot (above the zero one):
/// chosen, so no later record is built on anything older.
fn chosen_and_settled(newest: &VoterState, accepted: &[(String, Ballot)]) -> bool {
    let record = &newest.record;
    if record.previous.is_some() || newest.accepted == Ballot::zero() {
        return false;
    }
    // Distinct voters: a holder listed twice must not count twice towards
    // the majority that deleting members rests on.
    let at_newest: std::collections::BTreeSet<&str> = accepted
        .iter()
        .filter(|(n, b)| *b == newest.accepted && record.voters().any(|v| v == n))
        .map(|(n, _)| n.as_str())
        .collect();
    record.quorum().reached(at_newest.len())
}

/// The holders of a volume's members (with the ballot each accepted its
/// record at) that `newest` removed: `newest` is chosen and settled (see
/// [`chosen_and_settled`]), so no later record can bring them back
/// without creating them anew; the holder is not among its voters, and
/// accepted a real record (above the zero ballot) older than it, so it was
/// a member once. A holder at the zero ballot may be a copy a membership
/// change has just created and not proposed yet: not removed here (see
/// [`orphaned_members`]). Nor is the owner's (its engine may still have
/// the copy open): that one goes once the volume is unpublished from there.
fn removed_members(newest: &VoterState, accepted: &[(String, Ballot)]) -> Vec<String> {
    if !chosen_and_settled(newest, accepted) {
        return Vec::new();
    }
    let record = &newest.record;
    accepted
        .iter()
        .filter(|(n, b)| !record.names(n) && *b != Ballot::zero() && *b < newest.accepted)
        .map(|(n, _)| n.clone())
        .collect()
}

/// The holders of a copy (or witness record) a membership change created
/// and then never made a member: still at the zero ballot (their first
/// record only, never part of a chosen one), not named by the newest
/// record, which a majority of its voters shows chosen and settled, and
/// untouched for `grace` (a change that created them and is still under
/// way, say from another controller, keeps them busy: it proposes to them
/// right after creating them). A holder that does not tell how long it has
/// been idle stays.
fn orphaned_members(
    newest: &VoterState,
    accepted: &[(String, Ballot)],
    idle: &BTreeMap<String, Duration>,
    grace: Duration,
) -> Vec<String> {
    if !chosen_and_settled(newest, accepted) {
        return Vec::new();
    }
    let record = &newest.record;
    accepted
        .iter()
        .filter(|(n, b)| {
            *b == Ballot::zero() && !record.names(n) && idle.get(n).is_some_and(|d| *d >= grace)
        })
        .map(|(n, _)| n.clone())
        .collect()
}

/// ", the last whole pass <age> ago, the next due in <time>" for a
/// volume's condition, from when the last ended (`done`) and the next is
/// due (`next`), both in seconds since the Unix epoch (0: none known or
/// planned), at `now`; each part left out when unknown.
fn scrub_schedule(done: u64, next: u64, now: u64) -> String {
    let mut out = String::new();
    if done > 0 {
        out.push_str(&format!(
            ", the last whole pass {} ago",
            span(now.saturating_sub(done))
        ));
    }
    if next > 0 {
        out.push_str(&format!(
            ", the next due in {}",
            span(next.saturating_sub(now))
        ));
    }
    out
}

/// A span of `s` seconds in the unit that reads best.
fn span(s: u64) -> String {
    match s {
        0..120 => format!("{s} s"),
        120..7_200 => format!("{} min", s / 60),
        7_200..172_800 => format!("{} h", s / 3_600),
        _ => format!("{} days", s / 86_400),
    }
}

/// What a copy's node says its checks found (its answer to GetReplica).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CopyChecks {
    /// When the copy was last read whole, by a scrub or by its node
    /// (Unix seconds, 0: never).
    whole_at: u64,
    /// Regions (1 MiB) its disk could not read, for the next engine to
    /// write again.
    unreadable: u64,
    /// The sum of its node's last whole read, and the version of the
    /// record it was read at (see `store::ReadPass`).
    sum: Option<(u64, Vec<u8>)>,
}

/// What the checks of an unpublished volume's copies found: the part of
/// its condition that says so, whether that is abnormal, and the copies
/// to take out of sync ([`Change::Outvoted`]).
#[derive(Debug, Default, PartialEq, Eq)]
struct Findings {
    said: String,
    bad: bool,
    outvoted: Vec<String>,
}

/// The copies of `copies` that their nodes' last whole read summed at
/// record `version`, grouped by that sum, the largest group first.
fn alike_at<'a>(
    copies: impl Iterator<Item = &'a (&'a str, bool, Option<&'a CopyChecks>)>,
    version: u64,
) -> Vec<Vec<&'a str>> {
    let mut alike: Vec<(&[u8], Vec<&str>)> = Vec::new();
    for (node, _, c) in copies {
        let Some((_, sum)) = c
            .and_then(|c| c.sum.as_ref())
            .filter(|(v, _)| *v == version)
        else {
            continue;
        };
        match alike.iter_mut().find(|(s, _)| *s == sum.as_slice()) {
            Some((_, nodes)) => nodes.push(node),
            None => alike.push((sum, vec![node])),
        }
    }
    alike.sort_by_key(|(_, nodes)| std::cmp::Reverse(nodes.len()));
    alike.into_iter().map(|(_, nodes)| nodes).collect()
}

/// The part of an unpublished volume's condition that says what each copy's
/// checks found (None: its node did not say; the bool: the copy is in
/// sync), at `now`. Abnormal when a copy holds regions its disk could not
/// read (those regions have a copy fewer until an engine writes them
/// again), or copies in sync that their nodes read whole at the record's
/// `version` hold different bytes. Those that differ from what a majority
/// of the copies in sync hold are outvoted: taken out of sync, they are
/// never read from and the next engine rebuilds them in full. A copy out
/// of sync whose read found other bytes than most copies read at the same
/// version says so.
fn copy_checks(copies: &[(&str, bool, Option<&CopyChecks>)], version: u64, now: u64) -> Findings {
    let mut found = Findings::default();
    let said: Vec<String> = copies
        .iter()
        .map(|(node, in_sync, c)| {
            let mut s = match c.map(|c| c.whole_at) {
                None => format!("{node} did not say"),
                Some(0) => format!("{node} never read whole"),
                Some(at) => format!("{node} read whole {} ago", span(now.saturating_sub(at))),
            };
            if let Some(c) = c
                && c.unreadable > 0
            {
                found.bad = true;
                s.push_str(&format!(
                    " ({} MiB its disk could not read: the next engine writes them again)",
                    c.unreadable
                ));
            }
            if !in_sync {
                let why = c.and_then(|c| c.sum.as_ref()).and_then(|(at, _)| {
                    let groups = alike_at(copies.iter(), *at);
                    let most = groups.first()?;
                    let mine = groups.iter().find(|g| g.contains(node))?;
                    (most.len() > mine.len()).then(|| {
                        format!(
                            "its read at record version {at} found other bytes than {}; ",
                            most.join(", ")
                        )
                    })
                });
                s.push_str(&format!(
                    " (out of sync: {}the next engine rebuilds it in full)",
                    why.unwrap_or_default()
                ));
            }
            s
        })
        .collect();
    found.said = format!("; copies checked: {}", said.join(", "));
    let in_sync = copies.iter().filter(|(_, s, _)| *s).count();
    let groups = alike_at(copies.iter().filter(|(_, s, _)| *s), version);
    match &groups[..] {
        [nodes] if nodes.len() > 1 => {
            found
                .said
                .push_str(&format!("; {} hold the same bytes", nodes.join(", ")));
        }
        [] | [_] => {}
        [most, next, ..] => {
            found.bad = true;
            if most.len() > next.len() {
                let others: Vec<&str> = groups[1..].iter().flatten().copied().collect();
                let one = others.len() == 1;
                // Outvoted only by a majority of all the copies in sync,
                // not of those that were compared.
                let fix = if most.len() * 2 > in_sync {
                    found.outvoted = others.iter().map(|n| (*n).to_owned()).collect();
                    format!(
                        "the controller takes {} out of sync: the next engine rebuilds {0} in full",
                        if one { "it" } else { "them" }
                    )
                } else {
                    "an engine's scrub pass writes the majority's there".to_owned()
                };
                found.said.push_str(&format!(
                    "; {} {} other bytes than {} ({fix})",
                    others.join(", "),
                    if one { "holds" } else { "hold" },
                    most.join(", ")
                ));
            } else {
                let all: Vec<&str> = groups.iter().flatten().copied().collect();
                found.said.push_str(&format!(
                    "; {} hold different bytes, with no majority to tell which are right",
                    all.join(", ")
                ));
            }
        }
    }
    found
}

/// JSON of what goes into publish_context.
#[allow(clippy::result_large_err)]
fn to_json<T: serde::Serialize>(v: &T) -> Result<String, Status> {
    serde_json::to_string(v).map_err(|e| Status::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpublished_volumes_condition_says_what_each_copys_checks_found() {
        let now = 1_000_000;
        let read = CopyChecks {
            whole_at: now - 3 * 3_600,
            unreadable: 0,
            sum: None,
        };
        let never = CopyChecks {
            whole_at: 0,
            unreadable: 0,
            sum: None,
        };
        let Findings { said, bad, .. } = copy_checks(
            &[("n1", true, Some(&read)), ("n2", true, Some(&never))],
            7,
            now,
        );
        assert_eq!(
            said,
            "; copies checked: n1 read whole 3 h ago, n2 never read whole"
        );
        assert!(!bad);
        let failing = CopyChecks {
            whole_at: now - 42,
            unreadable: 2,
            sum: None,
        };
        let Findings { said, bad, .. } = copy_checks(
            &[
                ("n1", true, Some(&read)),
                ("n2", true, Some(&failing)),
                ("n3", true, None),
            ],
            7,
            now,
        );
        assert_eq!(
            said,
            "; copies checked: n1 read whole 3 h ago, n2 read whole 42 s ago \
             (2 MiB its disk could not read: the next engine writes them again), n3 did not say"
        );
        assert!(
            bad,
            "a copy with regions its disk cannot read makes the condition abnormal"
        );
    }

    #[test]
    fn copies_in_sync_read_at_the_records_version_are_compared_by_their_sums() {
        let now = 1_000_000;
        let summed = |version: u64, sum: u8| CopyChecks {
            whole_at: now - 60,
            unreadable: 0,
            sum: Some((version, vec![sum; 32])),
        };
        let tail = |said: &str| {
            said.split_once("ago; ")
                .map(|(_, t)| t.to_owned())
                .unwrap_or_default()
        };
        let (a, b) = (summed(7, 1), summed(7, 2));
        let Findings { said, bad, .. } = copy_checks(
            &[
                ("n1", true, Some(&a)),
                ("n2", true, Some(&a)),
                ("n3", true, Some(&a)),
            ],
            7,
            now,
        );
        assert_eq!(tail(&said), "n1, n2, n3 hold the same bytes");
        assert!(!bad);
        let Findings {
            said,
            bad,
            outvoted,
        } = copy_checks(
            &[
                ("n1", true, Some(&a)),
                ("n2", true, Some(&b)),
                ("n3", true, Some(&a)),
            ],
            7,
            now,
        );
        assert_eq!(
            tail(&said),
            "n2 holds other bytes than n1, n3 (the controller takes it out of sync: \
             the next engine rebuilds it in full)"
        );
        assert!(bad);
        assert_eq!(outvoted, ["n2"]);
        // Two of five copies in sync alike are no majority of them (two
        // did not sum at this version): the engine's scrub decides.
        let old = summed(6, 1);
        let five = copy_checks(
            &[
                ("n1", true, Some(&a)),
                ("n2", true, Some(&b)),
                ("n3", true, Some(&a)),
                ("n4", true, Some(&old)),
                ("n5", true, None),
            ],
            7,
            now,
        );
        assert!(
            five.said.ends_with(
                "n2 holds other bytes than n1, n3 (an engine's scrub pass writes the majority's there)"
            ),
            "{}",
            five.said
        );
        assert!(five.bad && five.outvoted.is_empty());
        // Once outvoted (the record moved on), the copy out of sync says
        // why; one out of sync for another reason says only what comes.
        let (a6, b6) = (summed(6, 1), summed(6, 2));
        let after = copy_checks(
            &[
                ("n1", true, Some(&a6)),
                ("n2", false, Some(&b6)),
                ("n3", true, Some(&a6)),
                ("n4", false, None),
            ],
            8,
            now,
        );
        assert!(
            after.said.contains(
                "n2 read whole 60 s ago (out of sync: its read at record version 6 found \
                 other bytes than n1, n3; the next engine rebuilds it in full)"
            ),
            "{}",
            after.said
        );
        assert!(
            after
                .said
                .ends_with("n4 did not say (out of sync: the next engine rebuilds it in full)"),
            "{}",
            after.said
        );
        assert!(after.outvoted.is_empty());
        let Findings { said, bad, .. } =
            copy_checks(&[("n1", true, Some(&a)), ("n2", true, Some(&b))], 7, now);
        assert_eq!(
            tail(&said),
            "n1, n2 hold different bytes, with no majority to tell which are right"
        );
        assert!(bad);
        // Read at another version (a publish since), out of sync, or one
        // copy alone: nothing to compare.
        let old = summed(6, 2);
        for copies in [
            vec![("n1", true, Some(&a)), ("n2", true, Some(&old))],
            vec![("n1", true, Some(&a)), ("n2", false, Some(&b))],
            vec![("n1", true, Some(&a)), ("n2", true, None)],
        ] {
            let Findings { said, bad, .. } = copy_checks(&copies, 7, now);
            assert!(!bad && !said.contains("bytes"), "{said}");
        }
    }

    /// One heal of a volume at a time, a few at once, and none soon after
    /// one failed: the wait doubles with each failure in a row, up to
    /// [`HEAL_RETRY_MAX`], and a heal that ends well forgets the failures.
    #[test]
    fn heals_are_one_per_volume_a_few_at_once_and_back_off_after_failures() {
        let h = Heals::default();
        let (a, b, c) = (
            Uuid::parse_hex(&"a".repeat(32)).unwrap(),
            Uuid::parse_hex(&"b".repeat(32)).unwrap(),
            Uuid::parse_hex(&"c".repeat(32)).unwrap(),
        );
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(h.begin(a, t0));
        assert!(!h.begin(a, t0), "a runs");
        assert!(h.running(a));
        assert!(h.begin(b, t0));
        assert!(!h.begin(c, t0), "two at once");
        h.end(a, true, t0);
        assert!(!h.running(a));
        assert!(h.begin(c, t0));
        h.end(c, true, t0);
        assert!(h.begin(a, t0), "a healed, and may be again");
        h.end(a, true, t0);

        // b fails again and again: 5 s, 10 s, 20 s, ... up to 120 s.
        let mut now = 0;
        for wait in [5, 10, 20, 40, 80, 120, 120] {
            let told = h.end(b, false, at(now));
            assert_eq!(told, Some(Duration::from_secs(wait)));
            assert!(!h.running(b));
            assert!(!h.begin(b, at(now)), "b failed just now");
            assert!(
                !h.begin(b, at(now + wait - 1)),
                "b again {} s after its failure",
                wait - 1
            );
            assert!(h.begin(b, at(now + wait)), "b again after {wait} s");
            now += wait;
        }
        // Healed: the next failure waits the first wait again.
        assert_eq!(h.end(b, true, at(now)), None);
        assert!(h.begin(b, at(now)));
        h.end(b, false, at(now));
        assert!(h.begin(b, at(now + 5)));
        assert_eq!(heal_retry(u32::MAX), HEAL_RETRY_MAX);
        // A volume gone: its failures are forgotten, a running heal kept.
        h.end(b, false, at(now));
        assert!(h.begin(c, at(now)));
        h.retain(&[a]);
        assert!(h.running(c));
        assert!(h.begin(b, at(now)), "b's failures forgotten");
    }

    /// A heal starts only when it has something to mend, something to
    /// mend it from, and every copy within reach.
    #[test]
    fn a_volume_is_healed_only_when_a_heal_can_end() {
        let members = vec![Member::copy("n1"), Member::copy("n2"), Member::copy("n3")];
        let record = ReplicaRecord::new(
            Uuid::parse_hex(&"1".repeat(32)).unwrap(),
            1 << 20,
            members,
            &BTreeMap::new(),
        )
        .unwrap();
        let checked = |unreadable: u64| CopyChecks {
            whole_at: 1,
            unreadable,
            sum: None,
        };
        let all_up = |_: &str| true;
        let none = BTreeMap::new();
        assert_eq!(heal_node(&record, &none, all_up), None, "nothing to mend");
        let mut out = record.clone();
        out.in_sync.remove("n1");
        assert_eq!(heal_node(&out, &none, all_up).as_deref(), Some("n2"));
        assert_eq!(
            heal_node(&out, &none, |n| n != "n1"),
            None,
            "n1 out of reach"
        );
        let mut owned = out.clone();
        owned.owner = Some(crate::backend::replicated::record::Owner::published(
            "n2", false,
        ));
        assert_eq!(heal_node(&owned, &none, all_up), None, "published");
        let bad: BTreeMap<String, CopyChecks> =
            [("n2".into(), checked(3)), ("n3".into(), checked(0))].into();
        assert_eq!(heal_node(&record, &bad, all_up).as_deref(), Some("n1"));
        // Nothing that read whole to rebuild from: n3 did not say, n1 and
        // n2 cannot read some regions.
        let stuck: BTreeMap<String, CopyChecks> =
            [("n1".into(), checked(1)), ("n2".into(), checked(3))].into();
        assert_eq!(heal_node(&record, &stuck, all_up), None);
    }

    #[test]
    fn the_scrub_schedule_is_said_in_the_unit_that_reads_best() {
        assert_eq!(scrub_schedule(0, 0, 1_000), "");
        let last = |age: u64| scrub_schedule(1_000, 0, 1_000 + age);
        assert_eq!(last(42), ", the last whole pass 42 s ago");
        assert_eq!(last(600), ", the last whole pass 10 min ago");
        assert_eq!(last(3 * 3_600), ", the last whole pass 3 h ago");
        assert_eq!(last(9 * 86_400), ", the last whole pass 9 days ago");
        assert_eq!(
            scrub_schedule(2_000, 0, 1_000),
            ", the last whole pass 0 s ago"
        );
        assert_eq!(
            scrub_schedule(0, 1_000 + 7 * 86_400, 1_000),
            ", the next due in 7 days"
        );
        assert_eq!(
            scrub_schedule(900, 1_030, 1_000),
            ", the last whole pass 100 s ago, the next due in 30 s"
        );
    }

    fn ballot(round: u64) -> Ballot {
        Ballot {
            round,
            proposer: "controller/x".to_owned(),
        }
    }

    /// A settled record of `members` accepted at round `round`.
    fn state(members: &[&str], round: u64) -> VoterState {
        let members = members.iter().map(|n| Member::copy(n)).collect();
        let record =
            ReplicaRecord::new(Uuid::new_random(), 1 << 20, members, &BTreeMap::new()).unwrap();
        VoterState {
            promised: ballot(round),
            accepted: ballot(round),
            record,
            boot: 1,
            floor: 0,
        }
    }

    /// A drain counts (`node list` can say how many volumes are left, and
    /// "drained" at none) only once a round that began after it looked at
    /// every volume: a volume busy in a round might have a member there.
    #[test]
    fn a_drain_counts_once_a_whole_later_round_looked_at_every_volume() {
        let d = Drains::default();
        let draining: BTreeSet<String> = ["n1".to_owned()].into();
        let (one, two) = (state(&["n1", "n2", "n3"], 1), state(&["n2", "n3", "n4"], 1));
        let (u1, u2) = (one.record.uuid, two.record.uuid);
        let live = [u1, u2];
        let whole = |d: &Drains, busy: Option<Uuid>| {
            let round = d.round_begins();
            for (u, r) in [(u1, &one.record), (u2, &two.record)] {
                if busy != Some(u) {
                    d.look(u, Some(r), &draining);
                }
            }
            d.round_ended(round, &live, &draining);
        };
        // Begun during a round: that round does not count it.
        let round = d.round_begins();
        d.begin("n1");
        d.look(u1, Some(&one.record), &draining);
        d.look(u2, Some(&two.record), &draining);
        d.round_ended(round, &live, &draining);
        assert_eq!(d.left("n1"), None);
        // A round with the volume on n1 busy does not either.
        whole(&d, Some(u1));
        assert_eq!(d.left("n1"), None);
        // One that looked at both does: one volume left, and why.
        whole(&d, None);
        let left = d.left("n1").unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(
            left[0].starts_with(&format!("{}: waiting", volume_id(u1))),
            "{left:?}"
        );
        // The member gone from n1 (its record no longer names it): none.
        let moved = state(&["n2", "n3", "n4"], 2).record;
        let round = d.round_begins();
        d.look(u1, Some(&moved), &draining);
        d.look(u2, Some(&two.record), &draining);
        d.round_ended(round, &live, &draining);
        assert_eq!(d.left("n1"), Some(vec![]));
        assert_eq!(d.left("n2"), None, "not draining");
    }

    fn held(h: &[(&str, Ballot)]) -> Vec<(String, Ballot)> {
        h.iter()
            .map(|(n, b)| ((*n).to_owned(), b.clone()))
            .collect()
    }

    #[test]
    fn a_member_removed_by_a_chosen_record_is_named() {
        let newest = state(&["a", "b", "d"], 5);
        let h = held(&[
            ("a", ballot(5)),
            ("b", ballot(5)),
            ("c", ballot(3)),
            ("d", ballot(5)),
        ]);
        assert_eq!(removed_members(&newest, &h), vec!["c".to_owned()]);
        // A majority of the voters is enough to know it chosen.
        let h = held(&[("a", ballot(5)), ("b", ballot(5)), ("c", ballot(3))]);
        assert_eq!(removed_members(&newest, &h), vec!["c".to_owned()]);
    }

    #[test]
    fn a_member_of_a_change_that_never_happened_goes_once_idle_long_enough() {
        let grace = Duration::from_secs(300);
        let newest = state(&["a", "b", "d"], 5);
        let h = held(&[
            ("a", ballot(5)),
            ("b", ballot(5)),
            ("d", ballot(5)),
            ("e", Ballot::zero()),
            ("f", Ballot::zero()),
            ("g", Ballot::zero()),
        ]);
        let idle: BTreeMap<String, Duration> = [("e", 301), ("f", 299), ("a", 1000)]
            .into_iter()
            .map(|(n, s)| (n.to_owned(), Duration::from_secs(s)))
            .collect();
        // e: idle long enough; f: not yet; g: cannot tell.
        assert_eq!(
            orphaned_members(&newest, &h, &idle, grace),
            vec!["e".to_owned()]
        );
        // Not on uncertain ground: not chosen by a majority seen...
        let few = held(&[("a", ballot(5)), ("b", ballot(4)), ("e", Ballot::zero())]);
        assert!(orphaned_members(&newest, &few, &idle, grace).is_empty());
        // ...a change in flight (e may be its joiner)...
        let mut mid = newest.clone();
        mid.record.previous = Some(vec![Member::copy("a"), Member::copy("b")]);
        assert!(orphaned_members(&mid, &h, &idle, grace).is_empty());
        // ...nothing chosen yet (a new volume's copies all sit at zero)...
        let mut fresh = newest.clone();
        fresh.accepted = Ballot::zero();
        assert!(orphaned_members(&fresh, &h, &idle, grace).is_empty());
        // ...a member of the newest record, or the owner.
        let mut named = newest.clone();
        named.record.members.push(Member::copy("e"));
        assert!(orphaned_members(&named, &h, &idle, grace).is_empty());
        let mut owned = newest.clone();
        owned.record.owner = Some(crate::backend::replicated::record::Owner {
            node: "e".to_owned(),
            readonly: false,
            heal: false,
        });
        assert!(orphaned_members(&owned, &h, &idle, grace).is_empty());
    }

    #[test]
    fn nothing_is_removed_on_uncertain_ground() {
        let newest = state(&["a", "b", "d"], 5);
        // One voter at the newest ballot, listed twice, is still one.
        let h = held(&[("a", ballot(5)), ("a", ballot(5)), ("c", ballot(3))]);
        assert!(removed_members(&newest, &h).is_empty());
        // Only one voter seen at the newest ballot: maybe not chosen.
        let h = held(&[("a", ballot(5)), ("b", ballot(4)), ("c", ballot(3))]);
        assert!(removed_members(&newest, &h).is_empty());
        // A copy just created for a change (zero ballot) stays.
        let h = held(&[("a", ballot(5)), ("b", ballot(5)), ("e", Ballot::zero())]);
        assert!(removed_members(&newest, &h).is_empty());
        // A membership change in flight: the previous members may still
        // be needed.
        let mut mid = newest.clone();
        mid.record.previous = Some(vec![Member::copy("a"), Member::copy("c")]);
        let h = held(&[("a", ballot(5)), ("b", ballot(5)), ("c", ballot(3))]);
        assert!(removed_members(&mid, &h).is_empty());
        // A voter of the newest record behind it is not removed.
        let h = held(&[("a", ballot(5)), ("b", ballot(5)), ("d", ballot(2))]);
        assert!(removed_members(&newest, &h).is_empty());
        // The owner's engine may still use its removed copy.
        let mut owned = newest.clone();
        owned.record.owner = Some(crate::backend::replicated::record::Owner {
            node: "c".to_owned(),
            readonly: false,
            heal: false,
        });
        let h = held(&[("a", ballot(5)), ("b", ballot(5)), ("c", ballot(3))]);
        assert!(removed_members(&owned, &h).is_empty());
        // Nothing chosen above the zero ballot yet.
        let fresh = state(&["a", "b"], 0);
        let fresh = VoterState {
            accepted: Ballot::zero(),
            ..fresh
        };
        let h = held(&[("a", Ballot::zero()), ("b", Ballot::zero())]);
        assert!(removed_members(&fresh, &h).is_empty());
    }
}
