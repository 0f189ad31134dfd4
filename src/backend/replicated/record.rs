//! The replica record: what every voter of a replicated volume keeps next
//! to its data (members, which copies are in sync, the owner and the epoch
//! that fences everyone else). Pure data with validation; how a change to it
//! is agreed on is `protocol.rs`'s business, never this file's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::volume::Uuid;
use crate::volume::id::valid_node_id;

/// The fewest and most copies a replicated volume may have.
pub const MIN_COPIES: usize = 1;
pub const MAX_COPIES: usize = 5;

/// What a member keeps: the data and the record, or the record only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Copy,
    Witness,
}

/// One voter of the volume, on its node. `since` is the version of the
/// record that made it a member in this role (0 for a founding member; a
/// membership change sets it, whatever the change's request says): a node
/// removed and added again holds a new, empty copy under the same name,
/// and an engine that missed the records in between tells the two apart
/// by it. `leaving` marks a copy whose node drains: the copy that
/// replaces it is rebuilt first, then it is removed (it votes and takes
/// writes until then, like any copy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub since: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub leaving: bool,
}

pub(super) fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl Member {
    pub fn copy(node: &str) -> Self {
        Member {
            node: node.to_owned(),
            role: Role::Copy,
            since: 0,
            leaving: false,
        }
    }

    pub fn witness(node: &str) -> Self {
        Member {
            node: node.to_owned(),
            role: Role::Witness,
            since: 0,
            leaving: false,
        }
    }
}

/// The publication that owns the volume: the node whose engine may write.
/// The node need not hold a copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    pub readonly: bool,
    /// Not a publication: the controller took the volume, nobody
    /// publishing it, for an engine with no mount on `node` to rebuild its
    /// copies out of sync ([`super::protocol::Change::Heal`]).
    /// ControllerPublishVolume takes it over, fencing that engine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heal: bool,
}

impl Owner {
    /// A publication on `node`.
    pub fn published(node: &str, readonly: bool) -> Self {
        Owner {
            node: node.to_owned(),
            readonly,
            heal: false,
        }
    }
}

impl ReplicaRecord {
    /// The node a CO published the volume on (not a heal's).
    pub fn published_on(&self) -> Option<&Owner> {
        self.owner.as_ref().filter(|o| !o.heal)
    }
}

/// The record every voter keeps. `epoch` rises whenever the owner changes
/// or an engine (re)starts, and writes carry it: a copy refuses a write
/// whose epoch is not the one of the record it accepted. `version` rises
/// by one with every change, so the chosen records form one numbered
/// history. `in_sync` maps each in-sync copy to the boot (incarnation) of
/// that copy at which it was in sync: a copy that restarted may have lost
/// writes it had not flushed, and is no longer in sync under its new boot.
/// `previous` is set while a membership change is under way (the members
/// before it): every change of such a record needs a majority of both
/// sets (see [`ReplicaRecord::quorums`]). `created_copies` is the copy
/// count CreateVolume asked for (absent in records made before it was
/// kept): a CreateVolume retried after ModifyVolume changed the copies
/// still finds its volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaRecord {
    #[serde(with = "uuid_hex")]
    pub uuid: Uuid,
    pub size: u64,
    pub members: Vec<Member>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Vec<Member>>,
    pub in_sync: BTreeMap<String, u64>,
    pub owner: Option<Owner>,
    pub epoch: u64,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_copies: Option<usize>,
}

/// Why a record is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a replicated volume needs a size above 0")]
    ZeroSize,
    #[error("invalid node id {0:?}")]
    NodeId(String),
    #[error("node {0} is a member twice")]
    DuplicateMember(String),
    #[error("{0} copies: a replicated volume has {MIN_COPIES} to {MAX_COPIES}")]
    CopyCount(usize),
    #[error("a witness is only used with exactly two copies, not {copies}")]
    WitnessWithout { copies: usize },
    #[error("{0} witnesses: at most one")]
    WitnessCount(usize),
    #[error("{0} is in the in-sync set but is not a copy")]
    InSyncNotCopy(String),
    #[error("no copy is in sync")]
    NoneInSync,
    #[error("witness {0} is marked leaving: only a copy leaves so")]
    LeavingWitness(String),
}

impl ReplicaRecord {
    /// The record of a new volume: every copy in sync at the boot given for
    /// it, no owner, epoch and version 0.
    pub fn new(
        uuid: Uuid,
        size: u64,
        members: Vec<Member>,
        boots: &BTreeMap<String, u64>,
    ) -> Result<Self, RecordError> {
        let in_sync = members
            .iter()
            .filter(|m| m.role == Role::Copy)
            .map(|m| (m.node.clone(), boots.get(&m.node).copied().unwrap_or(0)))
            .collect();
        let r = ReplicaRecord {
            uuid,
            size,
            members,
            previous: None,
            in_sync,
            owner: None,
            epoch: 0,
            version: 0,
            created_copies: None,
        };
        r.validate()?;
        Ok(r)
    }

    /// Checks the record's shape: distinct valid member nodes, 1–5 copies,
    /// one witness only beside exactly two copies, a non-empty in-sync set
    /// of copies, a valid owner node id.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.size == 0 {
            return Err(RecordError::ZeroSize);
        }
        for set in std::iter::once(&self.members).chain(self.previous.as_ref()) {
            let mut seen = BTreeSet::new();
            for m in set {
                if !valid_node_id(&m.node) {
                    return Err(RecordError::NodeId(m.node.clone()));
                }
                if !seen.insert(m.node.as_str()) {
                    return Err(RecordError::DuplicateMember(m.node.clone()));
                }
            }
        }
        let copies = self.copies().count();
        if !(MIN_COPIES..=MAX_COPIES).contains(&copies) {
            return Err(RecordError::CopyCount(copies));
        }
        let witnesses = self.members.len() - copies;
        if witnesses > 1 {
            return Err(RecordError::WitnessCount(witnesses));
        }
        if witnesses == 1 && copies != 2 {
            return Err(RecordError::WitnessWithout { copies });
        }
        if let Some(n) = self.in_sync.keys().find(|n| !self.is_copy(n)) {
            return Err(RecordError::InSyncNotCopy(n.clone()));
        }
        if self.in_sync.is_empty() {
            return Err(RecordError::NoneInSync);
        }
        if let Some(m) = self
            .members
            .iter()
            .find(|m| m.leaving && m.role != Role::Copy)
        {
            return Err(RecordError::LeavingWitness(m.node.clone()));
        }
        if let Some(o) = &self.owner
            && !valid_node_id(&o.node)
        {
            return Err(RecordError::NodeId(o.node.clone()));
        }
        Ok(())
    }

    /// The copies marked leaving (their nodes drain), in member order.
    pub fn leaving(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|m| m.role == Role::Copy && m.leaving)
            .map(|m| m.node.as_str())
    }

    /// The nodes holding a copy of the data, in member order.
    pub fn copies(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|m| m.role == Role::Copy)
            .map(|m| m.node.as_str())
    }

    /// Every voter's node (copies and witness), in member order.
    pub fn voters(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.node.as_str())
    }

    /// The copies, each with its member's `since`.
    pub fn copy_since(&self) -> BTreeMap<String, u64> {
        self.members
            .iter()
            .filter(|m| m.role == Role::Copy)
            .map(|m| (m.node.clone(), m.since))
            .collect()
    }

    pub fn is_copy(&self, node: &str) -> bool {
        self.members
            .iter()
            .any(|m| m.node == node && m.role == Role::Copy)
    }

    /// How many voters make a majority of the members.
    pub fn quorum(&self) -> Quorum {
        Quorum::majority_of(self.members.len())
    }

    /// The voter sets whose majorities a change of this record needs: the
    /// members, and during a membership change the previous members too.
    pub fn quorums(&self) -> JointQuorum {
        let mut q = JointQuorum::default();
        q.add(&self.members);
        if let Some(p) = &self.previous {
            q.add(p);
        }
        q
    }

    /// Whether the record names `node`, as a member or as the owner.
    pub fn names(&self, node: &str) -> bool {
        self.voters().any(|v| v == node) || self.owner.as_ref().is_some_and(|o| o.node == node)
    }

    /// Whether the members are `members`, in any order.
    pub fn has_members(&self, members: &[Member]) -> bool {
        same_members(&self.members, members)
    }

    /// Whether `node` is in sync under boot `boot`.
    pub fn in_sync_at(&self, node: &str, boot: u64) -> bool {
        self.in_sync.get(node) == Some(&boot)
    }
}

/// "How many must answer", as a value: a majority of `of` voters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    pub need: usize,
    pub of: usize,
}

impl Quorum {
    pub fn majority_of(voters: usize) -> Self {
        Quorum {
            need: voters / 2 + 1,
            of: voters,
        }
    }

    pub fn reached(self, answers: usize) -> bool {
        answers >= self.need
    }
}

impl fmt::Display for Quorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.need, self.of)
    }
}

/// Whether two member lists hold the same members, in any order.
pub fn same_members(a: &[Member], b: &[Member]) -> bool {
    let key = |v: &[Member]| {
        let mut k: Vec<(String, Role)> = v.iter().map(|m| (m.node.clone(), m.role)).collect();
        k.sort();
        k
    };
    key(a) == key(b)
}

/// "How many must answer" when several voter sets must agree: a majority
/// of each set. A change of a record needs the [`ReplicaRecord::quorums`]
/// of the record it starts from and of the record it makes, so a
/// membership change is accepted by a majority of the old and of the new
/// voters, and any later majority of either set meets it.
///
/// A set holds members, not just node names: a node removed and added
/// again is another voter (its state starts anew), so an answer counts
/// for a member only from the voter created for it (see [`Voter`]'s
/// floor: a member whose `since` is at least the answering voter's).
///
/// [`Voter`]: super::protocol::Voter
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JointQuorum {
    sets: Vec<BTreeSet<(String, u64)>>,
}

impl JointQuorum {
    /// Adds a voter set (ignored when it is already there).
    pub fn add<'a>(&mut self, voters: impl IntoIterator<Item = &'a Member>) {
        let set: BTreeSet<(String, u64)> = voters
            .into_iter()
            .map(|m| (m.node.clone(), m.since))
            .collect();
        if !set.is_empty() && !self.sets.contains(&set) {
            self.sets.push(set);
        }
    }

    /// Both quorums at once.
    pub fn with(mut self, other: &JointQuorum) -> Self {
        for s in &other.sets {
            if !self.sets.contains(s) {
                self.sets.push(s.clone());
            }
        }
        self
    }

    /// Every voter's node, of every set.
    pub fn voters(&self) -> BTreeSet<String> {
        self.sets.iter().flatten().map(|(n, _)| n.clone()).collect()
    }

    /// Whether `answered` (each answering node with its voter's floor)
    /// holds a majority of every set.
    pub fn reached(&self, answered: &BTreeMap<String, u64>) -> bool {
        self.reached_by(|node, since| answered.get(node).is_some_and(|floor| since >= *floor))
    }

    /// Whether the members for which `answered(node, since)` holds make a
    /// majority of every set.
    pub fn reached_by(&self, answered: impl Fn(&str, u64) -> bool) -> bool {
        self.sets.iter().all(|s| {
            let n = s.iter().filter(|(v, since)| answered(v, *since)).count();
            Quorum::majority_of(s.len()).reached(n)
        })
    }
}

impl fmt::Display for JointQuorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.sets.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            let q = Quorum::majority_of(s.len());
            let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
            write!(f, "{} of {{{}}}", q.need, names.join(", "))?;
        }
        Ok(())
    }
}

/// Serialises a [`Uuid`] as its 32 hex digits.
mod uuid_hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::volume::Uuid;

    pub fn serialize<S: Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&u.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let s = String::deserialize(d)?;
        Uuid::parse_hex(&s).ok_or_else(|| D::Error::custom(format!("invalid uuid {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid() -> Uuid {
        Uuid::parse_hex("0123456789abcdef0123456789abcdef").unwrap()
    }

    fn rec(members: Vec<Member>) -> Result<ReplicaRecord, RecordError> {
        ReplicaRecord::new(uuid(), 1 << 20, members, &BTreeMap::new())
    }

    #[test]
    fn new_record_has_every_copy_in_sync_and_no_owner() {
        let r = rec(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::copy("c"),
        ])
        .unwrap();
        assert_eq!(r.in_sync.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(r.owner, None);
        assert_eq!(r.quorum(), Quorum { need: 2, of: 3 });
    }

    #[test]
    fn two_copies_and_a_witness_make_three_voters() {
        let r = rec(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::witness("w"),
        ])
        .unwrap();
        assert_eq!(r.copies().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.in_sync.len(), 2);
        assert_eq!(r.quorum().need, 2);
    }

    #[test]
    fn malformed_records_are_refused() {
        assert_eq!(
            rec(vec![Member::copy("a"), Member::copy("a")]),
            Err(RecordError::DuplicateMember("a".into()))
        );
        assert_eq!(
            rec(vec![Member::copy("a"), Member::witness("a")]),
            Err(RecordError::DuplicateMember("a".into()))
        );
        assert_eq!(rec(vec![]), Err(RecordError::CopyCount(0)));
        let six = (0..6).map(|i| Member::copy(&format!("n{i}"))).collect();
        assert_eq!(rec(six), Err(RecordError::CopyCount(6)));
        assert_eq!(
            rec(vec![
                Member::copy("a"),
                Member::copy("b"),
                Member::copy("c"),
                Member::witness("w")
            ]),
            Err(RecordError::WitnessWithout { copies: 3 })
        );
        assert_eq!(
            rec(vec![
                Member::copy("a"),
                Member::copy("b"),
                Member::witness("w"),
                Member::witness("v")
            ]),
            Err(RecordError::WitnessCount(2))
        );
        assert_eq!(
            rec(vec![Member::copy("../x")]),
            Err(RecordError::NodeId("../x".into()))
        );
        assert_eq!(
            ReplicaRecord::new(uuid(), 0, vec![Member::copy("a")], &BTreeMap::new()),
            Err(RecordError::ZeroSize)
        );
    }

    #[test]
    fn in_sync_must_be_copies_and_not_empty() {
        let mut r = rec(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::witness("w"),
        ])
        .unwrap();
        r.in_sync.insert("w".into(), 0);
        assert_eq!(r.validate(), Err(RecordError::InSyncNotCopy("w".into())));
        r.in_sync.clear();
        assert_eq!(r.validate(), Err(RecordError::NoneInSync));
    }

    #[test]
    fn the_owner_need_not_be_a_member_but_must_be_a_valid_node_id() {
        let mut r = rec(vec![Member::copy("a")]).unwrap();
        r.owner = Some(Owner {
            node: "elsewhere".into(),
            readonly: false,
            heal: false,
        });
        assert_eq!(r.validate(), Ok(()));
        r.owner = Some(Owner {
            node: "a/b".into(),
            readonly: false,
            heal: false,
        });
        assert_eq!(r.validate(), Err(RecordError::NodeId("a/b".into())));
    }

    #[test]
    fn a_membership_change_needs_a_majority_of_both_sets() {
        let mut r = rec(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::witness("w"),
        ])
        .unwrap();
        assert_eq!(r.quorums().to_string(), "2 of {a, b, w}");
        r.previous = Some(r.members.clone());
        r.members = vec![Member::copy("a"), Member::copy("b"), Member::copy("c")];
        let q = r.quorums();
        let set = |v: &[&str]| v.iter().map(|s| (s.to_string(), 0)).collect();
        assert!(q.reached(&set(&["a", "b"])));
        assert!(!q.reached(&set(&["a", "c"])), "no majority of a, b, w");
        assert!(!q.reached(&set(&["a", "w"])), "no majority of a, b, c");
        assert!(q.reached(&set(&["a", "w", "c"])));
        assert_eq!(q.voters().len(), 4);
        assert!(r.has_members(&[Member::copy("c"), Member::copy("a"), Member::copy("b")]));
        r.previous = Some(vec![Member::copy("a"), Member::copy("a")]);
        assert_eq!(r.validate(), Err(RecordError::DuplicateMember("a".into())));
    }

    #[test]
    fn record_round_trips_through_json() {
        let mut r = rec(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::witness("w"),
        ])
        .unwrap();
        r.owner = Some(Owner {
            node: "a".into(),
            readonly: false,
            heal: false,
        });
        r.epoch = 7;
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"0123456789abcdef0123456789abcdef\""), "{s}");
        assert!(s.contains("\"witness\""), "{s}");
        let back: ReplicaRecord = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        let bad = s.replace("0123456789abcdef0123456789abcdef", "xyz");
        assert!(serde_json::from_str::<ReplicaRecord>(&bad).is_err());
    }
}
