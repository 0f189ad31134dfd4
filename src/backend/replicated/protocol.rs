//! The record protocol's messages and its two sans-I/O parties: the
//! [`Voter`] on each member node (copy or witness) and the [`Proposer`] that
//! drives one change of the record to a majority. Nothing here sends,
//! sleeps, reads a clock or draws a random number: callers deliver
//! messages, pass the time and the jitter in, and persist a voter's
//! [`VoterState`] before they send the reply it returned.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::record::{JointQuorum, Member, Owner, RecordError, ReplicaRecord, Role};

/// A proposal number. Ordered by round, then by proposer id, so two
/// proposers never use the same ballot as long as their ids differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub proposer: String,
}

impl Ballot {
    /// The ballot of a volume's first record, below every real ballot.
    pub fn zero() -> Self {
        Ballot {
            round: 0,
            proposer: String::new(),
        }
    }
}

/// A region of the volume: the unit of dirty tracking and rebuild.
pub type Region = u32;

/// Names one write: the epoch of the engine that issued it and that
/// engine's sequence number. Within a region, a later write has a larger
/// tag (an engine never has two writes to one region in flight, and a
/// newer engine has a larger epoch). A copy keeps the tag of what each
/// region holds; the model's "data" is the tag itself.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Tag {
    pub epoch: u64,
    pub seq: u64,
}

/// What every data request carries: the sender's epoch (fencing), the boot
/// of the copy it believes it talks to (a copy that restarted may have lost
/// unflushed writes, so it refuses) and the engine's connection number for
/// that copy (a copy drops requests of an older connection, as a new TCP
/// connection makes the old one's late packets harmless).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Io {
    pub epoch: u64,
    pub boot: u64,
    pub conn: u64,
}

/// A request to a voter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Phase 1: promise to ignore lower ballots; report the accepted record.
    Prepare {
        ballot: Ballot,
    },
    /// Phase 2: accept `record` unless a higher ballot was promised.
    Accept {
        ballot: Ballot,
        record: ReplicaRecord,
    },
    /// `record` was chosen at `ballot` (a majority accepted it): install
    /// it if it is newer than the accepted one. No reply.
    Commit {
        ballot: Ballot,
        record: ReplicaRecord,
    },
    /// An engine opens connection `conn` to a copy; installs the chosen
    /// record like [`Request::Commit`] first, and makes everything the copy
    /// holds stable (the engine tracks unflushed writes from here on; what
    /// an earlier engine left unflushed would otherwise go unnoticed if the
    /// copy restarted). Answered with the copy's boot and the tag of every
    /// region.
    Attach {
        ballot: Ballot,
        record: ReplicaRecord,
        conn: u64,
    },
    Write {
        io: Io,
        region: Region,
        tag: Tag,
    },
    /// A rebuild's copy of one region from an in-sync copy (the engine
    /// holds the region meanwhile). Replaces what the region holds when
    /// that was written before the current epoch (leftovers the in-sync
    /// copies may not have), or is not newer; a late duplicate never undoes
    /// a newer write of this epoch.
    Rebuild {
        io: Io,
        region: Region,
        tag: Tag,
    },
    Flush {
        io: Io,
        id: u64,
    },
    Read {
        io: Io,
        region: Region,
        id: u64,
    },
    /// A scrub's check of one region: the copy reads all of it from its
    /// disk (past its page cache) and answers with the region's tag and a
    /// digest of its bytes, or with an I/O error when its disk cannot read
    /// them. Sent only to copies whose [`Reply::Attached`] said they take
    /// it, and only while the engine holds the region (no write of it in
    /// flight), so copies in sync answer alike unless one holds other
    /// bytes than it was sent.
    Verify {
        io: Io,
        region: Region,
        id: u64,
    },
}

/// A SHA-256 digest of a region's bytes ([`Reply::Verified`]).
pub type Digest = [u8; 32];

/// How far a check of a copy got, kept beside the copy so that the
/// schedule outlives the process that checks it: an engine's scrub pass
/// ([`Request::Verify`]; named in [`Reply::Attached`], so the next engine
/// resumes a pass an unpublish or a restart stopped, and waits out the
/// period from the last whole pass instead of starting afresh), or its
/// node's check while the volume is not published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CheckMark {
    /// When a check last reached the last region, in seconds since the
    /// Unix epoch by the clock of the copy's node (0: never).
    #[serde(default)]
    pub done: u64,
    /// The region a check under way is to check next (0: none under way).
    #[serde(default)]
    pub next: Region,
}

impl CheckMark {
    pub fn is_none(&self) -> bool {
        *self == CheckMark::default()
    }
}

impl Request {
    /// Moves bytes under an epoch a copy already accepted (`Write`,
    /// `Rebuild`, `Read`, `Flush`): what a batch or the data link
    /// takes.
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            Request::Write { .. }
                | Request::Rebuild { .. }
                | Request::Read { .. }
                | Request::Verify { .. }
                | Request::Flush { .. }
        )
    }
}

/// Why a copy refused a data request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoRefusal {
    /// The copy accepted a record of a later epoch: the sender may be
    /// fenced (or the record is not chosen yet; a change tells).
    Fenced { epoch: u64 },
    /// The copy's accepted record is older than the sender's epoch: send it
    /// the chosen record ([`Request::Commit`]) and retry.
    Behind { epoch: u64 },
    /// The copy restarted since (its boot is now `boot`).
    WrongBoot { boot: u64 },
    /// The request belongs to an older connection.
    StaleConn,
    /// The voter is a witness and holds no data.
    NotACopy,
}

/// A voter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Promise {
        ballot: Ballot,
        accepted: Ballot,
        record: ReplicaRecord,
        /// The voter's floor (see [`Voter`]): the promise counts for a
        /// member of this node whose `since` is at least this.
        #[serde(default)]
        floor: u64,
    },
    /// Refused `ballot`: `promised` is higher.
    Nack {
        ballot: Ballot,
        promised: Ballot,
    },
    Accepted {
        ballot: Ballot,
        /// As in [`Reply::Promise`].
        #[serde(default)]
        floor: u64,
    },
    Attached {
        conn: u64,
        boot: u64,
        tags: BTreeMap<Region, Tag>,
        /// The copy takes [`Request::Verify`] (absent from copies older
        /// than the scrub, which must never be sent one).
        #[serde(default)]
        verifies: bool,
        /// Regions the copy's disk could not read while its volume was
        /// not published (the store fills them in): the engine rebuilds
        /// them there.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unreadable: Vec<Region>,
        /// How far engines' scrub passes got on the copy (the store fills
        /// it in; absent from older copies' answers, ignored by older
        /// engines).
        #[serde(default, skip_serializing_if = "CheckMark::is_none")]
        scrubbed: CheckMark,
    },
    Written {
        conn: u64,
        region: Region,
        tag: Tag,
    },
    Rebuilt {
        conn: u64,
        region: Region,
        tag: Tag,
    },
    Flushed {
        conn: u64,
        id: u64,
    },
    ReadData {
        conn: u64,
        id: u64,
        region: Region,
        tag: Tag,
    },
    /// The answer to a [`Request::Verify`]: what the region holds, by tag
    /// and by a digest of its bytes.
    Verified {
        conn: u64,
        id: u64,
        region: Region,
        tag: Tag,
        digest: Digest,
    },
    Refused {
        conn: u64,
        why: IoRefusal,
    },
}

/// What a voter must keep on stable storage before it replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoterState {
    pub promised: Ballot,
    pub accepted: Ballot,
    pub record: ReplicaRecord,
    /// Incremented every time the voter's process starts.
    pub boot: u64,
    /// The voter's floor (see [`Voter`]); 0 for a founding member and in
    /// states written before floors existed.
    #[serde(default, skip_serializing_if = "super::record::is_zero")]
    pub floor: u64,
}

/// One member's voter: the record register, and for a copy the data
/// (modelled as a tag per region: what reached it, and what reached
/// stable storage).
///
/// A voter is one member, not one node: a node removed and added again
/// starts a new voter with no memory of what the old one promised and
/// accepted. Counted under the old member's name, its answers could let a
/// proposer that still knows the old members choose a record that
/// contradicts one the old voter helped choose. So each voter has a
/// floor, the `since` its member has in the first record it was created
/// with (0 for a founding member; the controller gives an added member a
/// `since` above every version its node was a member at before), and its
/// answers count only for members of its node whose `since` is at least
/// the floor (see [`super::record::JointQuorum`]).
#[derive(Debug, Clone)]
pub struct Voter {
    node: String,
    role: Role,
    state: VoterState,
    volatile: BTreeMap<Region, Tag>,
    durable: BTreeMap<Region, Tag>,
    /// The newest connection of the current epoch's engine.
    conn: u64,
    conn_epoch: u64,
}

impl Voter {
    /// A new member holding the volume's first record (chosen at
    /// [`Ballot::zero`] by construction: every voter starts with it).
    pub fn new(node: &str, record: ReplicaRecord, boot: u64) -> Self {
        let (role, floor) = record
            .members
            .iter()
            .find(|m| m.node == node)
            .map_or((Role::Witness, 0), |m| (m.role, m.since));
        Voter {
            node: node.to_owned(),
            role,
            state: VoterState {
                promised: Ballot::zero(),
                accepted: Ballot::zero(),
                floor,
                record,
                boot,
            },
            volatile: BTreeMap::new(),
            durable: BTreeMap::new(),
            conn: 0,
            conn_epoch: 0,
        }
    }

    /// A voter whose process started again: `state` as persisted (its
    /// boot already raised by the caller) and `tags`, what each region
    /// holds on stable storage.
    pub fn restore(node: &str, state: VoterState, tags: BTreeMap<Region, Tag>) -> Self {
        let role = state
            .record
            .members
            .iter()
            .find(|m| m.node == node)
            .map_or(Role::Witness, |m| m.role);
        Voter {
            node: node.to_owned(),
            role,
            state,
            volatile: tags.clone(),
            durable: tags,
            conn: 0,
            conn_epoch: 0,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> &VoterState {
        &self.state
    }

    /// The lowest `since` of a member this voter answers for.
    pub fn floor(&self) -> u64 {
        self.state.floor
    }

    /// What each region holds now (reads see this).
    pub fn data(&self) -> &BTreeMap<Region, Tag> {
        &self.volatile
    }

    /// What each region holds on stable storage.
    pub fn durable_data(&self) -> &BTreeMap<Region, Tag> {
        &self.durable
    }

    /// The process died and started again: unflushed data and connections
    /// are gone, the record (persisted before every reply) is not, and the
    /// boot rises.
    pub fn restart(&mut self) {
        self.volatile = self.durable.clone();
        self.conn = 0;
        self.state.boot += 1;
    }

    /// Handles one request. Idempotent for duplicates: a repeated Prepare
    /// or Accept of the same ballot gets the same answer, a repeated write
    /// never replaces a later one.
    pub fn handle(&mut self, req: Request) -> Option<Reply> {
        match req {
            Request::Prepare { ballot } => Some(self.prepare(ballot)),
            Request::Accept { ballot, record } => Some(self.accept(ballot, record)),
            Request::Commit { ballot, record } => {
                self.learn(ballot, record);
                None
            }
            Request::Attach {
                ballot,
                record,
                conn,
            } => {
                let epoch = record.epoch;
                self.learn(ballot, record);
                let io = Io {
                    epoch,
                    boot: self.state.boot,
                    conn,
                };
                Some(match self.check(io) {
                    Err(why) => Reply::Refused { conn, why },
                    Ok(()) => {
                        self.durable = self.volatile.clone();
                        Reply::Attached {
                            conn,
                            boot: self.state.boot,
                            tags: self.volatile.clone(),
                            verifies: self.role == Role::Copy,
                            unreadable: Vec::new(),
                            scrubbed: CheckMark::default(),
                        }
                    }
                })
            }
            Request::Write { io, region, tag } => Some(self.io(io, |v| {
                let held = v.volatile.entry(region).or_default();
                if tag > *held {
                    *held = tag;
                }
                Reply::Written {
                    conn: io.conn,
                    region,
                    tag,
                }
            })),
            Request::Rebuild { io, region, tag } => Some(self.io(io, |v| {
                let held = v.volatile.entry(region).or_default();
                if held.epoch < io.epoch || tag >= *held {
                    *held = tag;
                }
                Reply::Rebuilt {
                    conn: io.conn,
                    region,
                    tag,
                }
            })),
            Request::Flush { io, id } => Some(self.io(io, |v| {
                v.durable = v.volatile.clone();
                Reply::Flushed { conn: io.conn, id }
            })),
            Request::Read { io, region, id } => Some(self.io(io, |v| Reply::ReadData {
                conn: io.conn,
                id,
                region,
                tag: v.volatile.get(&region).copied().unwrap_or_default(),
            })),
            // The store reads the bytes and fills in the digest.
            Request::Verify { io, region, id } => Some(self.io(io, |v| Reply::Verified {
                conn: io.conn,
                id,
                region,
                tag: v.volatile.get(&region).copied().unwrap_or_default(),
                digest: Digest::default(),
            })),
        }
    }

    fn prepare(&mut self, ballot: Ballot) -> Reply {
        if ballot < self.state.promised {
            return Reply::Nack {
                promised: self.state.promised.clone(),
                ballot,
            };
        }
        self.state.promised = ballot.clone();
        Reply::Promise {
            ballot,
            accepted: self.state.accepted.clone(),
            record: self.state.record.clone(),
            floor: self.state.floor,
        }
    }

    fn accept(&mut self, ballot: Ballot, record: ReplicaRecord) -> Reply {
        if ballot < self.state.promised {
            return Reply::Nack {
                promised: self.state.promised.clone(),
                ballot,
            };
        }
        self.state.promised = ballot.clone();
        self.state.accepted = ballot.clone();
        self.state.record = record;
        Reply::Accepted {
            ballot,
            floor: self.state.floor,
        }
    }

    /// Installs a record chosen at `ballot` when it is newer than the
    /// accepted one. Safe whatever was promised: a chosen record is already
    /// on a majority, so every later proposal builds on it anyway.
    fn learn(&mut self, ballot: Ballot, record: ReplicaRecord) {
        if ballot > self.state.accepted {
            if ballot > self.state.promised {
                self.state.promised = ballot.clone();
            }
            self.state.accepted = ballot;
            self.state.record = record;
        }
    }

    /// The fencing rule: data requests are served only for the epoch of the
    /// accepted record (never decided by promises, so a fenced engine's
    /// Prepare cannot starve the owner), to the current boot and a current
    /// connection.
    fn check(&mut self, io: Io) -> Result<(), IoRefusal> {
        // A copy removed from the members serves no more I/O.
        if self.role != Role::Copy || !self.state.record.is_copy(&self.node) {
            return Err(IoRefusal::NotACopy);
        }
        let epoch = self.state.record.epoch;
        if io.epoch < epoch {
            return Err(IoRefusal::Fenced { epoch });
        }
        if io.epoch > epoch {
            return Err(IoRefusal::Behind { epoch });
        }
        if io.boot != self.state.boot {
            return Err(IoRefusal::WrongBoot {
                boot: self.state.boot,
            });
        }
        if self.conn_epoch != epoch {
            self.conn_epoch = epoch;
            self.conn = 0;
        }
        if io.conn < self.conn {
            return Err(IoRefusal::StaleConn);
        }
        self.conn = io.conn;
        Ok(())
    }

    fn io(&mut self, io: Io, serve: impl FnOnce(&mut Self) -> Reply) -> Reply {
        match self.check(io) {
            Ok(()) => serve(self),
            Err(why) => Reply::Refused { conn: io.conn, why },
        }
    }
}

/// A change of the record, applied to the newest record a majority
/// reported. Each says who may make it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// ControllerPublish: `node` becomes the owner and the epoch rises.
    /// Idempotent when `node` owns it already; refused while another node
    /// does, but for a heal's, which it takes over.
    Publish { node: String, readonly: bool },
    /// ControllerUnpublish: releases `node`'s ownership (the epoch rises,
    /// fencing its engine). Nothing to do when `node` is not the owner, or
    /// owns it only for a heal.
    Unpublish { node: String },
    /// The controller takes a volume nobody publishes for an engine with
    /// no mount on `node` to rebuild its copies out of sync (the epoch
    /// rises): the owner is a heal's, which ControllerPublish takes over.
    /// Idempotent; refused while anyone else owns it.
    Heal { node: String },
    /// The heal on `node` ended: releases the volume (the epoch rises).
    /// Nothing to do when it is not a heal's on `node` (a publication
    /// took it over).
    Healed { node: String },
    /// An engine starting on the owner node takes an epoch of its own,
    /// fencing any earlier engine there: a heal's engine only while the
    /// owner is a heal's (`heal`), a publication's only while it is not,
    /// so neither fences the other on the same node.
    Start {
        node: String,
        #[serde(default)]
        heal: bool,
    },
    /// ControllerExpandVolume: the volume grows to `size` bytes (never
    /// shrinks). Copies extend their files when they take the record; the
    /// engine grows when NodeExpandVolume tells it.
    Resize { size: u64 },
    /// The engine owning epoch `epoch` on `node` sets the in-sync state
    /// of the copies it knows, `copies` (each with its member's `since`):
    /// those in `in_sync` are in sync at the boot given, the others not. A
    /// copy of the record it does not know (a node no longer a copy, or
    /// removed and added again since) keeps its state, so a membership
    /// change never fences the engine, nor does an engine that missed one
    /// put a new copy in sync in place of the old.
    SetInSync {
        node: String,
        epoch: u64,
        in_sync: BTreeMap<String, u64>,
        #[serde(default)]
        copies: BTreeMap<String, u64>,
    },
    /// ControllerModifyVolume (or replacing a lost copy): the members
    /// become `members`, in two chosen steps. The first keeps the old
    /// members as `previous` (so it, and every change until the second,
    /// needs a majority of both sets); copies that join are out of sync
    /// and removed ones leave the in-sync set, which must keep a copy.
    /// The second, the same change again, drops `previous`. Idempotent:
    /// nothing to do when the members are `members` already; refused
    /// while a change to other members is under way. The epoch stays, so
    /// the engine goes on writing.
    Members { members: Vec<Member> },
    /// The controller takes `nodes` out of the in-sync set: copies whose
    /// nodes' idle reads, made at record `version`, found other bytes than
    /// a majority of the in-sync copies did (bit rot, or a change behind
    /// the store's back). Only of that very record and only while nobody
    /// publishes it: any change since (a publish) may have written the
    /// regions, so the reads no longer say what the copies hold. The next
    /// engine rebuilds them in full and never reads from them meanwhile.
    Outvoted { version: u64, nodes: Vec<String> },
}

/// Why a change was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the volume is published on node {owner}")]
    OwnedBy { owner: String },
    #[error("fenced: the record's owner is {owner:?} at epoch {epoch}")]
    Fenced { owner: Option<String>, epoch: u64 },
    #[error("a change to the members {members} is under way")]
    Reconfiguring { members: String },
    #[error("the record changed since version {version} (now {now})")]
    Changed { version: u64, now: u64 },
    #[error(transparent)]
    Invalid(#[from] RecordError),
}

impl Change {
    /// The record after this change, or why the proposer may not make it.
    /// The version always rises, so every accepted proposal is distinct.
    pub fn apply(&self, current: &ReplicaRecord) -> Result<ReplicaRecord, Refusal> {
        let mut r = current.clone();
        let owner = current.owner.as_ref().map(|o| o.node.as_str());
        let fenced = || Refusal::Fenced {
            owner: owner.map(str::to_owned),
            epoch: current.epoch,
        };
        match self {
            Change::Publish { node, readonly } => match &current.owner {
                Some(o) if !o.heal && o.node == *node => {}
                Some(o) if !o.heal => {
                    return Err(Refusal::OwnedBy {
                        owner: o.node.clone(),
                    });
                }
                // Nobody's, or a heal's (whose engine the new epoch fences).
                _ => {
                    r.owner = Some(Owner::published(node, *readonly));
                    r.epoch += 1;
                }
            },
            Change::Unpublish { node } => {
                if current.published_on().is_some_and(|o| o.node == *node) {
                    r.owner = None;
                    r.epoch += 1;
                }
            }
            Change::Heal { node } => match &current.owner {
                Some(o) if o.heal && o.node == *node => {}
                Some(o) => {
                    return Err(Refusal::OwnedBy {
                        owner: o.node.clone(),
                    });
                }
                None => {
                    r.owner = Some(Owner {
                        heal: true,
                        ..Owner::published(node, false)
                    });
                    r.epoch += 1;
                }
            },
            Change::Healed { node } => {
                if current
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.heal && o.node == *node)
                {
                    r.owner = None;
                    r.epoch += 1;
                }
            }
            Change::Start { node, heal } => {
                if !current
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.node == *node && o.heal == *heal)
                {
                    return Err(fenced());
                }
                r.epoch += 1;
            }
            Change::Resize { size } => r.size = r.size.max(*size),
            Change::SetInSync {
                node,
                epoch,
                in_sync,
                copies,
            } => {
                if owner != Some(node.as_str()) || current.epoch != *epoch {
                    return Err(fenced());
                }
                let now = current.copy_since();
                let known = |n: &String| now.get(n).is_some_and(|s| copies.get(n) == Some(s));
                r.in_sync = current
                    .in_sync
                    .iter()
                    .filter(|(n, _)| !known(n))
                    .chain(in_sync.iter().filter(|(n, _)| known(n)))
                    .map(|(n, b)| (n.clone(), *b))
                    .collect();
            }
            Change::Members { members } => match &current.previous {
                Some(_) if current.has_members(members) => r.previous = None,
                Some(_) => {
                    let names: Vec<&str> = current.voters().collect();
                    return Err(Refusal::Reconfiguring {
                        members: names.join(", "),
                    });
                }
                None if current.has_members(members) => {}
                None => {
                    r.previous = Some(current.members.clone());
                    // A member kept in its role keeps its `since`; one
                    // added (or in a new role) starts at this version.
                    r.members = members
                        .iter()
                        .map(|m| {
                            let kept = current
                                .members
                                .iter()
                                .find(|c| c.node == m.node && c.role == m.role);
                            Member {
                                since: kept.map_or(current.version + 1, |c| c.since),
                                ..m.clone()
                            }
                        })
                        .collect();
                    let next = r.clone();
                    r.in_sync.retain(|n, _| next.is_copy(n));
                }
            },
            Change::Outvoted { version, nodes } => {
                if current.version != *version {
                    return Err(Refusal::Changed {
                        version: *version,
                        now: current.version,
                    });
                }
                if let Some(o) = owner {
                    return Err(Refusal::OwnedBy {
                        owner: o.to_owned(),
                    });
                }
                r.in_sync.retain(|n, _| !nodes.contains(n));
            }
        }
        r.version += 1;
        r.validate()?;
        Ok(r)
    }
}

/// A message for one voter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub to: String,
    pub msg: Request,
}

/// How a change ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A majority accepted `record` at `ballot`: it is the volume's record.
    Chosen {
        ballot: Ballot,
        record: ReplicaRecord,
    },
    /// The change does not apply to `record`, the newest record a majority
    /// reported (which may not be chosen yet).
    Refused {
        refusal: Refusal,
        record: ReplicaRecord,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Preparing,
    /// Accepting `0`, which needs the quorum `1`.
    Accepting(ReplicaRecord, JointQuorum),
    /// Accepting `0` unchanged but for its version (quorum `1`), to know
    /// it chosen before a change that ends a membership change is built
    /// on it; then a new round.
    Confirming(ReplicaRecord, JointQuorum),
    /// Waiting to try again with a higher ballot (after a Nack or a
    /// timeout); `at` is set on the next tick from the caller's jitter.
    Backoff {
        at: Option<u64>,
    },
    Done,
}

/// Drives one [`Change`] to its outcome (single-decree Paxos per change):
/// Prepare to the voters; once the promises hold a majority of every voter
/// set of the record the proposer started from and of the newest record
/// they report (accepted at the highest ballot), apply the change to that
/// record; Accept the result at the same ballot on a majority of every
/// voter set of the newest record and of the result. A Nack or a timeout
/// starts over with a higher ballot after a jitter the caller chooses.
///
/// Membership changes are safe because a chosen record was accepted by a
/// majority of each of its voter sets and of its predecessor's: a later
/// proposer reaches a majority of the sets it knows, so it meets the
/// newest chosen record's acceptors in one of them (or a record newer
/// still) and, when that record names other voters, widens its Prepare to
/// them before it decides (see `JointQuorum`). A membership change keeps
/// both sets in the record until a second change ends it, so no record
/// is chosen by the new voters alone before the old ones accepted it.
///
/// The change that ends it drops the old voters, so it is built only on
/// a first step known to be chosen: a majority of each of its voter sets
/// promised with it at its ballot, or this proposer just had it accepted
/// so (it re-proposes the newest record unchanged but for its version
/// when neither holds). Built on a first step that was only accepted
/// somewhere, the record ending the change could reach the new voters
/// alone while the old ones chose another record of the same version,
/// and whoever read it would ask the new voters only.
#[derive(Debug, Clone)]
pub struct Proposer {
    id: String,
    change: Change,
    /// Everyone Prepare went to (grows as newer records name voters).
    voters: BTreeSet<String>,
    /// The voter sets of the record the proposer started from.
    view: JointQuorum,
    /// That record's version.
    view_version: u64,
    ballot: Ballot,
    highest_seen: u64,
    phase: Phase,
    /// Each promise with the floor of the voter that made it.
    promises: BTreeMap<String, (Ballot, ReplicaRecord, u64)>,
    /// Each acceptance's voter floor.
    accepts: BTreeMap<String, u64>,
    /// A record this proposer had chosen (while confirming), and its ballot.
    confirmed: Option<(Ballot, ReplicaRecord)>,
    now: u64,
    deadline: u64,
    timeout: u64,
}

impl Proposer {
    /// Starts `change` as proposer `id` against the voters of `record`,
    /// with ballots above round `after`. A ballot must never carry two
    /// different records: `id` is unique among everyone who may propose for
    /// this volume, and a proposer id used for an earlier change starts
    /// above every round that change used (an engine passes the round of
    /// its last chosen change; a controller without state uses a fresh id
    /// per change). `timeout` is how many ticks a phase may take before
    /// starting over.
    pub fn new(
        id: &str,
        change: Change,
        record: &ReplicaRecord,
        after: u64,
        now: u64,
        timeout: u64,
    ) -> (Self, Vec<Envelope>) {
        let view = record.quorums();
        let mut p = Proposer {
            id: id.to_owned(),
            change,
            voters: view.voters(),
            view,
            view_version: record.version,
            ballot: Ballot::zero(),
            highest_seen: after,
            phase: Phase::Done,
            promises: BTreeMap::new(),
            accepts: BTreeMap::new(),
            confirmed: None,
            now,
            deadline: 0,
            timeout,
        };
        let out = p.prepare();
        (p, out)
    }

    pub fn change(&self) -> &Change {
        &self.change
    }

    pub fn ballot(&self) -> &Ballot {
        &self.ballot
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn prepare(&mut self) -> Vec<Envelope> {
        self.highest_seen = self.highest_seen.max(self.ballot.round);
        self.ballot = Ballot {
            round: self.highest_seen + 1,
            proposer: self.id.clone(),
        };
        self.phase = Phase::Preparing;
        self.promises.clear();
        self.accepts.clear();
        self.deadline = self.now + self.timeout;
        let all = self.voters.clone();
        self.send_to(&all, |b| Request::Prepare { ballot: b })
    }

    fn send_to(&self, to: &BTreeSet<String>, msg: impl Fn(Ballot) -> Request) -> Vec<Envelope> {
        to.iter()
            .map(|v| Envelope {
                to: v.clone(),
                msg: msg(self.ballot.clone()),
            })
            .collect()
    }

    /// Time passes. Starts over when a phase took too long or a backoff
    /// ended; `jitter` (from the caller's randomness) spreads competing
    /// proposers' retries.
    pub fn tick(&mut self, now: u64, jitter: u64) -> Vec<Envelope> {
        self.now = now;
        match &mut self.phase {
            Phase::Done => Vec::new(),
            Phase::Backoff { at } => match at {
                None => {
                    *at = Some(now + jitter);
                    Vec::new()
                }
                Some(t) if now >= *t => self.prepare(),
                Some(_) => Vec::new(),
            },
            Phase::Preparing | Phase::Accepting(..) | Phase::Confirming(..) => {
                if now >= self.deadline {
                    if self.phase == Phase::Preparing {
                        self.adopt_chosen_view();
                    }
                    self.phase = Phase::Backoff { at: None };
                }
                Vec::new()
            }
        }
    }

    /// A round of promises that never made a majority: when they showed a
    /// record newer than the one the proposer started from and known
    /// chosen, the next round starts from that one, as a proposer made
    /// afresh from it would. The voters of a record that old may be gone
    /// for good (removed, or removed and added again as new voters, which
    /// do not answer for their old members), and waiting for them would
    /// wait for ever.
    fn adopt_chosen_view(&mut self) {
        let newest = self
            .promises
            .values()
            .filter(|(b, r, _)| r.version > self.view_version && self.known_chosen(b, r))
            .max_by_key(|(_, r, _)| r.version)
            .map(|(_, r, _)| r.clone());
        if let Some(r) = newest {
            self.view = r.quorums();
            self.view_version = r.version;
            self.voters.extend(self.view.voters());
        }
    }

    /// Whether `record`, accepted at `ballot`, is known chosen: this
    /// proposer had it chosen, or a majority of each of its voter sets
    /// promised with it accepted at that ballot.
    fn known_chosen(&self, ballot: &Ballot, record: &ReplicaRecord) -> bool {
        if self
            .confirmed
            .as_ref()
            .is_some_and(|(b, r)| b == ballot && r == record)
        {
            return true;
        }
        let holders: BTreeMap<String, u64> = self
            .promises
            .iter()
            .filter(|(_, (b, r, _))| b == ballot && r == record)
            .map(|(n, (_, _, floor))| (n.clone(), *floor))
            .collect();
        record.quorums().reached(&holders)
    }

    /// A voter answered. Returns what to send and, once decided, the
    /// outcome (after which the proposer ignores everything).
    pub fn handle(&mut self, from: &str, reply: &Reply) -> (Vec<Envelope>, Option<Outcome>) {
        if !self.voters.contains(from) {
            return (Vec::new(), None);
        }
        match reply {
            Reply::Nack { ballot, promised } if *ballot == self.ballot => {
                if matches!(
                    self.phase,
                    Phase::Preparing | Phase::Accepting(..) | Phase::Confirming(..)
                ) {
                    self.highest_seen = self.highest_seen.max(promised.round);
                    self.phase = Phase::Backoff { at: None };
                }
                (Vec::new(), None)
            }
            Reply::Promise {
                ballot,
                accepted,
                record,
                floor,
            } if *ballot == self.ballot && self.phase == Phase::Preparing => {
                self.promises
                    .insert(from.to_owned(), (accepted.clone(), record.clone(), *floor));
                let (newest_ballot, newest, _) = self
                    .promises
                    .values()
                    .max_by(|a, b| a.0.cmp(&b.0))
                    .expect("just inserted");
                let (newest_ballot, newest) = (newest_ballot.clone(), newest.clone());
                // The newest record may name voters the proposer did not
                // know: their majority is needed too.
                let need = self.view.clone().with(&newest.quorums());
                let fresh: BTreeSet<String> =
                    need.voters().difference(&self.voters).cloned().collect();
                self.voters.extend(fresh.iter().cloned());
                let mut out = self.send_to(&fresh, |b| Request::Prepare { ballot: b });
                let promised: BTreeMap<String, u64> = self
                    .promises
                    .iter()
                    .map(|(n, (_, _, floor))| (n.clone(), *floor))
                    .collect();
                if !need.reached(&promised) {
                    return (out, None);
                }
                let result = self.change.apply(&newest);
                let ends_change = newest.previous.is_some()
                    && matches!(&result, Ok(next) if next.previous.is_none());
                if ends_change && !self.known_chosen(&newest_ballot, &newest) {
                    let mut same = newest.clone();
                    same.version += 1;
                    let quorum = newest.quorums();
                    let to = quorum.voters();
                    self.voters.extend(to.iter().cloned());
                    self.phase = Phase::Confirming(same.clone(), quorum);
                    self.deadline = self.now + self.timeout;
                    out.extend(self.send_to(&to, |b| Request::Accept {
                        ballot: b,
                        record: same.clone(),
                    }));
                    return (out, None);
                }
                match result {
                    Err(refusal) => {
                        self.phase = Phase::Done;
                        (
                            Vec::new(),
                            Some(Outcome::Refused {
                                refusal,
                                record: newest,
                            }),
                        )
                    }
                    Ok(next) => {
                        let quorum = newest.quorums().with(&next.quorums());
                        let to = quorum.voters();
                        self.voters.extend(to.iter().cloned());
                        self.phase = Phase::Accepting(next.clone(), quorum);
                        self.deadline = self.now + self.timeout;
                        out.extend(self.send_to(&to, |b| Request::Accept {
                            ballot: b,
                            record: next.clone(),
                        }));
                        (out, None)
                    }
                }
            }
            Reply::Accepted { ballot, floor } if *ballot == self.ballot => {
                if let Phase::Confirming(record, quorum) = &self.phase {
                    let (record, quorum) = (record.clone(), quorum.clone());
                    self.accepts.insert(from.to_owned(), *floor);
                    if !quorum.reached(&self.accepts) {
                        return (Vec::new(), None);
                    }
                    // Chosen: build on it in a new round.
                    self.confirmed = Some((self.ballot.clone(), record));
                    return (self.prepare(), None);
                }
                let Phase::Accepting(record, quorum) = &self.phase else {
                    return (Vec::new(), None);
                };
                let (record, quorum) = (record.clone(), quorum.clone());
                self.accepts.insert(from.to_owned(), *floor);
                if !quorum.reached(&self.accepts) {
                    return (Vec::new(), None);
                }
                self.phase = Phase::Done;
                (
                    Vec::new(),
                    Some(Outcome::Chosen {
                        ballot: self.ballot.clone(),
                        record,
                    }),
                )
            }
            _ => (Vec::new(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::replicated::record::Member;
    use crate::volume::Uuid;

    fn record() -> ReplicaRecord {
        ReplicaRecord::new(
            Uuid::parse_hex("00000000000000000000000000000001").unwrap(),
            8,
            vec![Member::copy("a"), Member::copy("b"), Member::copy("c")],
            &BTreeMap::new(),
        )
        .unwrap()
    }

    fn voters(r: &ReplicaRecord) -> BTreeMap<String, Voter> {
        r.voters()
            .map(|n| (n.to_owned(), Voter::new(n, r.clone(), 0)))
            .collect()
    }

    /// The voters of `r`, and d and e holding `r` too (joiners to be).
    fn voters_with_joiners(r: &ReplicaRecord) -> BTreeMap<String, Voter> {
        let mut vs = voters(r);
        for n in ["d", "e"] {
            vs.insert(n.into(), Voter::new(n, r.clone(), 0));
        }
        vs
    }

    /// Runs a proposer to its end, delivering to the voters in `reach` only.
    fn run(
        p: &mut Proposer,
        mut out: Vec<Envelope>,
        vs: &mut BTreeMap<String, Voter>,
        reach: &[&str],
    ) -> Option<Outcome> {
        let mut now = 0;
        for _ in 0..100 {
            let mut next = Vec::new();
            for e in out.drain(..) {
                if !reach.contains(&e.to.as_str()) {
                    continue;
                }
                if let Some(reply) = vs.get_mut(&e.to).unwrap().handle(e.msg) {
                    let (more, outcome) = p.handle(&e.to, &reply);
                    if outcome.is_some() {
                        return outcome;
                    }
                    next.extend(more);
                }
            }
            now += 1;
            next.extend(p.tick(now, 1));
            out = next;
        }
        None
    }

    #[test]
    fn publish_raises_the_epoch_and_sets_the_owner_on_a_majority() {
        let r = record();
        let mut vs = voters(&r);
        let ch = Change::Publish {
            node: "x".into(),
            readonly: false,
        };
        let (mut p, out) = Proposer::new("ctl", ch, &r, 0, 0, 5);
        let Some(Outcome::Chosen { record: got, .. }) = run(&mut p, out, &mut vs, &["a", "b"])
        else {
            panic!("publish with a majority must be chosen");
        };
        assert_eq!(got.owner.as_ref().unwrap().node, "x");
        assert_eq!(got.epoch, 1);
        assert_eq!(vs["a"].state().record, got);
        assert_eq!(vs["c"].state().record, r, "c was unreachable");
    }

    #[test]
    fn no_majority_no_decision() {
        let r = record();
        let mut vs = voters(&r);
        let ch = Change::Unpublish { node: "x".into() };
        let (mut p, out) = Proposer::new("ctl", ch, &r, 0, 0, 5);
        assert_eq!(run(&mut p, out, &mut vs, &["a"]), None);
    }

    #[test]
    fn an_engine_that_is_not_the_owner_is_fenced() {
        let r = record();
        let mut vs = voters(&r);
        let pubx = Change::Publish {
            node: "x".into(),
            readonly: false,
        };
        let (mut p, out) = Proposer::new("ctl", pubx, &r, 0, 0, 5);
        run(&mut p, out, &mut vs, &["a", "b", "c"]).unwrap();
        let ch = Change::SetInSync {
            node: "y".into(),
            epoch: 1,
            in_sync: [("a".to_owned(), 0)].into(),
            copies: r.copy_since(),
        };
        // The engine knows only the old record; the majority tells it.
        let (mut p, out) = Proposer::new("engine-y", ch, &r, 0, 0, 5);
        let Some(Outcome::Refused { refusal, record }) = run(&mut p, out, &mut vs, &["b", "c"])
        else {
            panic!("expected a refusal");
        };
        assert!(
            matches!(refusal, Refusal::Fenced { epoch: 1, .. }),
            "{refusal}"
        );
        assert_eq!(record.owner.unwrap().node, "x");
    }

    #[test]
    fn a_later_proposer_builds_on_a_record_accepted_by_a_minority() {
        let r = record();
        let mut vs = voters(&r);
        // Publish to x reaches only a (not chosen).
        let pubx = Change::Publish {
            node: "x".into(),
            readonly: false,
        };
        let (mut p, out) = Proposer::new("ctl", pubx, &r, 0, 0, 5);
        for e in out {
            if let Some(reply) = vs.get_mut(&e.to).unwrap().handle(e.msg) {
                let (more, _) = p.handle(&e.to, &reply);
                for m in more.into_iter().filter(|m| m.to == "a") {
                    vs.get_mut("a").unwrap().handle(m.msg);
                }
            }
        }
        assert_eq!(vs["a"].state().record.epoch, 1);
        // A second publisher that hears from a sees x as the owner.
        let puby = Change::Publish {
            node: "y".into(),
            readonly: false,
        };
        let (mut p2, out) = Proposer::new("ctl2", puby, &r, 0, 0, 5);
        let outcome = run(&mut p2, out, &mut vs, &["a", "b"]).unwrap();
        assert!(
            matches!(
                outcome,
                Outcome::Refused {
                    refusal: Refusal::OwnedBy { .. },
                    ..
                }
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn writes_are_fenced_by_the_accepted_epoch_not_by_promises() {
        let mut r = record();
        r.owner = Some(Owner {
            node: "x".into(),
            readonly: false,
            heal: false,
        });
        r.epoch = 3;
        let mut v = Voter::new("a", r.clone(), 0);
        let io = |epoch| Io {
            epoch,
            boot: 0,
            conn: 1,
        };
        let w = |epoch, seq| Request::Write {
            io: io(epoch),
            region: 0,
            tag: Tag { epoch, seq },
        };
        assert!(matches!(v.handle(w(3, 1)), Some(Reply::Written { .. })));
        // A high prepare (say from a fenced engine) does not stop writes.
        v.handle(Request::Prepare {
            ballot: Ballot {
                round: 99,
                proposer: "old".into(),
            },
        });
        assert!(matches!(v.handle(w(3, 2)), Some(Reply::Written { .. })));
        assert!(matches!(
            v.handle(w(2, 9)),
            Some(Reply::Refused {
                why: IoRefusal::Fenced { epoch: 3 },
                ..
            })
        ));
        assert!(matches!(
            v.handle(w(4, 1)),
            Some(Reply::Refused {
                why: IoRefusal::Behind { epoch: 3 },
                ..
            })
        ));
        assert_eq!(v.data()[&0], Tag { epoch: 3, seq: 2 });
        // A duplicate of an older write does not replace a newer one.
        v.handle(w(3, 1));
        assert_eq!(v.data()[&0], Tag { epoch: 3, seq: 2 });
    }

    #[test]
    fn a_restart_loses_unflushed_writes_and_refuses_the_old_boot() {
        let mut r = record();
        r.owner = Some(Owner {
            node: "x".into(),
            readonly: false,
            heal: false,
        });
        let mut v = Voter::new("a", r, 0);
        let io = Io {
            epoch: 0,
            boot: 0,
            conn: 1,
        };
        let t1 = Tag { epoch: 0, seq: 1 };
        let t2 = Tag { epoch: 0, seq: 2 };
        v.handle(Request::Write {
            io,
            region: 0,
            tag: t1,
        });
        v.handle(Request::Flush { io, id: 1 });
        v.handle(Request::Write {
            io,
            region: 1,
            tag: t2,
        });
        v.restart();
        assert_eq!(v.data().get(&0), Some(&t1));
        assert_eq!(v.data().get(&1), None);
        assert!(matches!(
            v.handle(Request::Read {
                io,
                region: 0,
                id: 1
            }),
            Some(Reply::Refused {
                why: IoRefusal::WrongBoot { boot: 1 },
                ..
            })
        ));
    }

    #[test]
    fn a_witness_votes_but_holds_no_data() {
        let r = ReplicaRecord::new(
            Uuid::parse_hex("00000000000000000000000000000001").unwrap(),
            8,
            vec![Member::copy("a"), Member::copy("b"), Member::witness("w")],
            &BTreeMap::new(),
        )
        .unwrap();
        let mut w = Voter::new("w", r.clone(), 0);
        assert_eq!(w.role(), Role::Witness);
        let b = Ballot {
            round: 1,
            proposer: "p".into(),
        };
        assert!(matches!(
            w.handle(Request::Prepare { ballot: b.clone() }),
            Some(Reply::Promise { .. })
        ));
        let io = Io {
            epoch: 0,
            boot: 0,
            conn: 1,
        };
        assert!(matches!(
            w.handle(Request::Write {
                io,
                region: 0,
                tag: Tag::default()
            }),
            Some(Reply::Refused {
                why: IoRefusal::NotACopy,
                ..
            })
        ));
    }

    #[test]
    fn a_membership_change_takes_two_steps_and_the_joiner_starts_out_of_sync() {
        let r = record();
        let mut vs = voters(&r);
        vs.insert("d".into(), Voter::new("d", r.clone(), 0));
        let to = vec![Member::copy("a"), Member::copy("b"), Member::copy("d")];
        let ch = Change::Members {
            members: to.clone(),
        };
        let (mut p, out) = Proposer::new("ctl", ch.clone(), &r, 0, 0, 5);
        // A majority of the new set alone is not enough: b, d are not a
        // majority of a, b, c.
        assert_eq!(run(&mut p, out, &mut vs, &["b", "d"]), None);
        let (mut p, out) = Proposer::new("ctl2", ch.clone(), &r, 0, 0, 5);
        let Some(Outcome::Chosen { record: joint, .. }) =
            run(&mut p, out, &mut vs, &["a", "b", "d"])
        else {
            panic!("a majority of both sets chooses it");
        };
        assert!(joint.has_members(&to));
        assert_eq!(joint.previous.as_ref().unwrap().len(), 3);
        assert!(!joint.in_sync.contains_key("c") && !joint.in_sync.contains_key("d"));
        let (mut p, out) = Proposer::new("ctl3", ch, &joint, 0, 0, 5);
        let Some(Outcome::Chosen { record: done, .. }) = run(&mut p, out, &mut vs, &["a", "b"])
        else {
            panic!("ending it needs a majority of both sets: a, b");
        };
        assert_eq!(done.previous, None);
        // Another change while one is under way is refused.
        let mut half = joint.clone();
        half.version = 99;
        let other = Change::Members {
            members: vec![Member::copy("a"), Member::copy("b"), Member::copy("e")],
        };
        assert!(matches!(
            other.apply(&half),
            Err(Refusal::Reconfiguring { .. })
        ));
    }

    /// A heal's ownership: taken only of a volume nobody owns, released
    /// only by its end, never by an unpublish; a publication takes it
    /// over with a new epoch (fencing the heal's engine), and the heal's
    /// end then leaves the publication alone.
    #[test]
    fn a_heal_owns_a_volume_only_until_it_ends_or_a_publish_takes_it() {
        let r = record();
        let heal = Change::Heal { node: "a".into() };
        let healing = heal.apply(&r).unwrap();
        let o = healing.owner.clone().unwrap();
        assert!(o.heal && o.node == "a" && !o.readonly);
        assert_eq!(healing.epoch, r.epoch + 1);
        assert_eq!(healing.published_on(), None);
        assert_eq!(heal.apply(&healing).unwrap().epoch, healing.epoch);
        assert!(matches!(
            Change::Heal { node: "b".into() }.apply(&healing),
            Err(Refusal::OwnedBy { .. })
        ));
        let unpublished = Change::Unpublish { node: "a".into() }
            .apply(&healing)
            .unwrap();
        assert_eq!(unpublished.owner, healing.owner, "not a publication");
        for node in ["a", "b"] {
            let published = Change::Publish {
                node: node.into(),
                readonly: false,
            }
            .apply(&healing)
            .unwrap();
            assert_eq!(published.published_on().unwrap().node, node);
            assert_eq!(published.epoch, healing.epoch + 1, "the heal is fenced");
            let after = Change::Healed { node: "a".into() }
                .apply(&published)
                .unwrap();
            assert_eq!(after.owner, published.owner);
            assert!(matches!(
                heal.apply(&published),
                Err(Refusal::OwnedBy { .. })
            ));
        }
        // Engines on the same node: a heal's starts only under the heal,
        // a publication's only under the publication.
        let start = |heal| Change::Start {
            node: "a".into(),
            heal,
        };
        assert!(start(true).apply(&healing).is_ok());
        assert!(matches!(
            start(false).apply(&healing),
            Err(Refusal::Fenced { .. })
        ));
        let published = Change::Publish {
            node: "a".into(),
            readonly: false,
        }
        .apply(&healing)
        .unwrap();
        assert!(start(false).apply(&published).is_ok());
        assert!(matches!(
            start(true).apply(&published),
            Err(Refusal::Fenced { .. })
        ));
        let healed = Change::Healed { node: "a".into() }.apply(&healing).unwrap();
        assert_eq!(healed.owner, None);
        assert_eq!(healed.epoch, healing.epoch + 1);
        let ignored = Change::Healed { node: "b".into() }.apply(&healing).unwrap();
        assert_eq!(ignored.owner, healing.owner);
    }

    /// The controller takes a copy its idle read found other bytes in out
    /// of sync, only of the record the reads were made at, unpublished,
    /// and never the last copy in sync.
    #[test]
    fn copies_outvoted_leave_the_in_sync_set_only_at_the_version_read() {
        let r = record();
        let mut vs = voters(&r);
        let ch = Change::Outvoted {
            version: r.version,
            nodes: vec!["c".into()],
        };
        let (mut p, out) = Proposer::new("ctl", ch.clone(), &r, 0, 0, 5);
        let Some(Outcome::Chosen { record: got, .. }) = run(&mut p, out, &mut vs, &["a", "c"])
        else {
            panic!("a majority takes it");
        };
        assert_eq!(got.in_sync.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(got.epoch, r.epoch, "no engine is fenced by it");
        // The same change again: the record moved on since the reads.
        assert_eq!(
            ch.apply(&got),
            Err(Refusal::Changed {
                version: r.version,
                now: got.version
            })
        );
        let mut published = r.clone();
        published.owner = Some(Owner {
            node: "a".into(),
            readonly: false,
            heal: false,
        });
        assert!(matches!(ch.apply(&published), Err(Refusal::OwnedBy { .. })));
        let all = Change::Outvoted {
            version: r.version,
            nodes: vec!["a".into(), "b".into(), "c".into()],
        };
        assert!(matches!(all.apply(&r), Err(Refusal::Invalid(_))));
    }

    /// The first step of a, b, c -> a, d, e accepted by a, d and e only
    /// (all the new voters, one old one): not chosen. The change that ends
    /// it is not built on it until it is chosen: with the old voters out of
    /// reach nothing is decided, and with b back the first step is chosen
    /// again (unchanged but for its version) before the end is built on it.
    #[test]
    fn a_membership_change_ends_only_on_a_first_step_known_chosen() {
        let r = record();
        let mut vs = voters_with_joiners(&r);
        let to = vec![Member::copy("a"), Member::copy("d"), Member::copy("e")];
        let ch = Change::Members { members: to };
        let first = ch.apply(&r).unwrap();
        assert!(first.previous.is_some());
        let b1 = Ballot {
            round: 1,
            proposer: "c1".into(),
        };
        for n in ["a", "d", "e"] {
            let reply = vs.get_mut(n).unwrap().handle(Request::Accept {
                ballot: b1.clone(),
                record: first.clone(),
            });
            assert_eq!(
                reply,
                Some(Reply::Accepted {
                    ballot: b1.clone(),
                    floor: 0
                })
            );
        }
        let (mut p, out) = Proposer::new("c2", ch.clone(), &first, 1, 0, 5);
        assert_eq!(run(&mut p, out, &mut vs, &["a", "d", "e"]), None);
        let (mut p, out) = Proposer::new("c3", ch, &first, 1, 0, 5);
        let Some(Outcome::Chosen { record: end, .. }) =
            run(&mut p, out, &mut vs, &["a", "b", "d", "e"])
        else {
            panic!("chosen");
        };
        assert_eq!(end.previous, None);
        assert!(end.has_members(&first.members));
        // first (v1), first again (v2), the end (v3).
        assert_eq!(end.version, first.version + 2);
        assert_eq!(vs["b"].state().record, end);
    }

    #[test]
    fn a_stale_proposer_widens_its_prepare_to_the_new_members() {
        let r = record();
        let mut vs = voters_with_joiners(&r);
        // a, b, c -> a, d, e, chosen on a, b (old) and a, d, e (new); then
        // a change the new set alone chooses.
        let to = vec![Member::copy("a"), Member::copy("d"), Member::copy("e")];
        let ch = Change::Members { members: to };
        let (mut p, out) = Proposer::new("c1", ch.clone(), &r, 0, 0, 5);
        let Some(Outcome::Chosen { record: joint, .. }) =
            run(&mut p, out, &mut vs, &["a", "b", "d", "e"])
        else {
            panic!("chosen");
        };
        let (mut p, out) = Proposer::new("c2", ch, &joint, 0, 0, 5);
        let Some(Outcome::Chosen { .. }) = run(&mut p, out, &mut vs, &["a", "b", "d", "e"]) else {
            panic!("chosen");
        };
        let pubx = Change::Publish {
            node: "x".into(),
            readonly: false,
        };
        let (mut p, out) = Proposer::new("c3", pubx, &vs["d"].state().record, 0, 0, 5);
        let Some(Outcome::Chosen {
            record: published, ..
        }) = run(&mut p, out, &mut vs, &["d", "e"])
        else {
            panic!("chosen by the new set");
        };
        // A proposer that only knows a, b, c hears b and c (old records)
        // and a, learns of d and e and must hear them before deciding.
        let puby = Change::Publish {
            node: "y".into(),
            readonly: false,
        };
        let (mut p, out) = Proposer::new("c4", puby.clone(), &r, 0, 0, 5);
        assert_eq!(run(&mut p, out, &mut vs, &["a", "b", "c"]), None);
        let (mut p, out) = Proposer::new("c5", puby, &r, 0, 0, 5);
        let Some(Outcome::Refused { refusal, record }) =
            run(&mut p, out, &mut vs, &["a", "b", "c", "d"])
        else {
            panic!("expected a refusal");
        };
        assert!(matches!(refusal, Refusal::OwnedBy { .. }), "{refusal}");
        assert_eq!(record, published);
    }

    /// The engine knew copies a, b and c; the members have since become a,
    /// b, d and e, where e joined in sync (a restore's copy, say) and b
    /// was removed and added again (a new copy). Only a and the old b are
    /// the engine's to set: c is gone, the new b and e keep their state.
    #[test]
    fn set_in_sync_sets_only_the_copies_the_engine_knows() {
        let mut r = record();
        r.owner = Some(Owner {
            node: "x".into(),
            readonly: false,
            heal: false,
        });
        let known = r.copy_since();
        r.members = vec![
            Member::copy("a"),
            Member {
                since: 4,
                ..Member::copy("b")
            },
            Member::copy("d"),
            Member {
                since: 4,
                ..Member::copy("e")
            },
        ];
        r.in_sync = [("a".to_owned(), 1), ("e".to_owned(), 7)].into();
        let ch = Change::SetInSync {
            node: "x".into(),
            epoch: 0,
            in_sync: [
                ("a".to_owned(), 2),
                ("b".to_owned(), 1),
                ("c".to_owned(), 1),
            ]
            .into(),
            copies: known.clone(),
        };
        let next = ch.apply(&r).unwrap();
        assert_eq!(
            next.in_sync,
            [("a".to_owned(), 2), ("e".to_owned(), 7)].into()
        );
        // Once the engine knows the new b, it may set it.
        let ch = Change::SetInSync {
            node: "x".into(),
            epoch: 0,
            in_sync: [("b".to_owned(), 9)].into(),
            copies: r.copy_since(),
        };
        let next = ch.apply(&r).unwrap();
        assert_eq!(next.in_sync, [("b".to_owned(), 9)].into());
        // Marking its last known copy out leaves a copy it does not know.
        let ch = Change::SetInSync {
            node: "x".into(),
            epoch: 0,
            in_sync: BTreeMap::new(),
            copies: known,
        };
        assert_eq!(ch.apply(&r).unwrap().in_sync, [("e".to_owned(), 7)].into());
    }

    /// A membership change gives a member added (or in a new role) the
    /// new record's version as `since`; one kept in its role keeps its own.
    #[test]
    fn a_member_added_again_is_another_member() {
        let r = record();
        let members = |m: &[Member]| Change::Members {
            members: m.to_vec(),
        };
        let shrink = members(&[Member::copy("a")]);
        let joint = shrink.apply(&r).unwrap();
        let one = shrink.apply(&joint).unwrap();
        let grow = members(&[Member::copy("a"), Member::copy("b"), Member::witness("c")]);
        let joint = grow.apply(&one).unwrap();
        assert_eq!(joint.version, 3);
        let two = grow.apply(&joint).unwrap();
        let since: Vec<(&str, u64)> = two
            .members
            .iter()
            .map(|m| (m.node.as_str(), m.since))
            .collect();
        assert_eq!(since, [("a", 0), ("b", 3), ("c", 3)]);
        assert_eq!(two.previous, None);
        // The request's own `since` counts for nothing.
        let odd = members(&[
            Member {
                since: 99,
                ..Member::copy("a")
            },
            Member::copy("b"),
        ]);
        let joint = odd.apply(&two).unwrap();
        let since: Vec<(&str, u64)> = joint
            .members
            .iter()
            .map(|m| (m.node.as_str(), m.since))
            .collect();
        assert_eq!(since, [("a", 0), ("b", 3)]);
    }

    /// b is removed (c, cut off, misses it), then added again: a new
    /// voter, empty, whose floor is above every version the old b was a
    /// member at. A proposer that still starts from the record naming the
    /// old b and reaches only the new b and c must not choose anything:
    /// the new b does not answer for the old one, which helped choose the
    /// removal. Once a answers, the change builds on the newest record.
    #[test]
    fn a_voter_added_again_does_not_answer_for_its_former_member() {
        let r = record();
        let mut vs = voters_with_joiners(&r);
        let change = Change::Members {
            members: vec![Member::copy("a"), Member::copy("c"), Member::copy("d")],
        };
        let (mut p, out) = Proposer::new("ctl1", change.clone(), &r, 0, 0, 5);
        let Some(Outcome::Chosen { record: mid, .. }) = run(&mut p, out, &mut vs, &["a", "b", "d"])
        else {
            panic!("the first step must be chosen");
        };
        let (mut p, out) = Proposer::new("ctl2", change, &mid, 0, 0, 5);
        let Some(Outcome::Chosen { record: done, .. }) =
            run(&mut p, out, &mut vs, &["a", "b", "d"])
        else {
            panic!("the second step must be chosen");
        };
        assert!(!done.voters().any(|v| v == "b"));
        // b added again, as the controller creates it.
        let mut first = r.clone();
        first.members[1].since = done.version + 1;
        let again = Voter::new("b", first, 7);
        assert_eq!(again.floor(), done.version + 1);
        vs.insert("b".into(), again);

        let publish = Change::Publish {
            node: "x".into(),
            readonly: false,
        };
        let (mut stale, out) = Proposer::new("eng", publish.clone(), &r, 0, 0, 5);
        assert_eq!(run(&mut stale, out, &mut vs, &["b", "c"]), None);
        for n in ["b", "c"] {
            assert_ne!(vs[n].state().accepted.proposer, "eng", "{n} accepted");
        }
        // Started again from the same old record, now reaching a too.
        let after = stale.ballot().round;
        let (mut stale, out) = Proposer::new("eng", publish, &r, after, 0, 5);
        let Some(Outcome::Chosen { record: got, .. }) =
            run(&mut stale, out, &mut vs, &["a", "b", "c", "d"])
        else {
            panic!("with a the change must be chosen");
        };
        assert_eq!(got.members, done.members);
        assert_eq!(got.version, done.version + 1);
        assert_eq!(got.owner.as_ref().unwrap().node, "x");
    }

    #[test]
    fn commit_installs_only_newer_records() {
        let r = record();
        let mut v = Voter::new("a", r.clone(), 0);
        let mut r2 = r.clone();
        r2.version = 5;
        let b = |round| Ballot {
            round,
            proposer: "p".into(),
        };
        v.handle(Request::Commit {
            ballot: b(3),
            record: r2.clone(),
        });
        assert_eq!(v.state().record, r2);
        assert_eq!(v.state().promised, b(3));
        v.handle(Request::Commit {
            ballot: b(2),
            record: r.clone(),
        });
        assert_eq!(v.state().record, r2);
    }
}
