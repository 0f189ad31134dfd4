//! Where a replicated volume's copies go, and the volume's uuid. Pure
//! functions of what the controller's registry says about the nodes: the
//! controller keeps no placement state, so a retried CreateVolume derives
//! the same uuid from the CSI name and finds the copies that hold it.

use std::collections::{BTreeMap, BTreeSet};

use ring::digest;

use super::record::{MAX_COPIES, MIN_COPIES, Member, ReplicaRecord, Role};
use crate::volume::Uuid;

/// Copies when the StorageClass does not say.
pub const DEFAULT_REPLICAS: usize = 3;

/// `locality`: whether one copy goes on the node that will use the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locality {
    /// One copy on the preferred node when it is eligible.
    #[default]
    BestEffort,
    None,
}

/// The replicated backend's StorageClass parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaParams {
    pub replicas: usize,
    pub locality: Locality,
}

/// A parameter with a value stowage does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("replicas must be a whole number from {MIN_COPIES} to {MAX_COPIES}, not {0:?}")]
    Replicas(String),
    #[error("locality must be best-effort or none, not {0:?}")]
    Locality(String),
}

impl ReplicaParams {
    /// Parses the `replicas` and `locality` values (None when absent:
    /// 3 copies, best-effort locality).
    pub fn parse(replicas: Option<&str>, locality: Option<&str>) -> Result<Self, ParamError> {
        let replicas = match replicas {
            None => DEFAULT_REPLICAS,
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|n| (MIN_COPIES..=MAX_COPIES).contains(n))
                .ok_or_else(|| ParamError::Replicas(s.to_owned()))?,
        };
        let locality = match locality {
            None | Some("best-effort") => Locality::BestEffort,
            Some("none") => Locality::None,
            Some(s) => return Err(ParamError::Locality(s.to_owned())),
        };
        Ok(ReplicaParams { replicas, locality })
    }
}

/// What the registry says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    /// The node's `zone` label, if it has one (nodes without one count as
    /// one zone together).
    pub zone: Option<String>,
    pub fresh: bool,
    pub cordoned: bool,
    pub free_bytes: u64,
}

/// The chosen voters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub copies: Vec<String>,
    pub witness: Option<String>,
}

impl Placed {
    /// The members of the volume's record.
    pub fn members(&self) -> Vec<Member> {
        let mut m: Vec<Member> = self.copies.iter().map(|n| Member::copy(n)).collect();
        m.extend(self.witness.iter().map(|n| Member::witness(n)));
        m
    }
}

/// Not enough nodes (CSI RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "{found} eligible node(s) (fresh, not cordoned, {size} bytes free) for {needed} copies"
    )]
    NotEnoughNodes {
        found: usize,
        needed: usize,
        size: u64,
    },
    #[error(
        "two copies need a witness on a third node: {found} eligible node(s) (fresh, not cordoned) of 3 needed"
    )]
    NoWitness { found: usize },
    #[error(
        "{replicas} copies beside the {leaving} leaving a draining node would be more than {MAX_COPIES}, and no copy that stays is in sync yet: ask again once the drain has moved them"
    )]
    TooManyWhileLeaving { replicas: usize, leaving: usize },
}

/// The uuid of the replicated volume named `name`: the first 128 bits of
/// SHA-256 over a fixed prefix and the name. The same name always gives the
/// same uuid.
pub fn volume_uuid(name: &str) -> Uuid {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"stowage replicated volume\0");
    ctx.update(name.as_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    Uuid::parse_hex(&format!("{:032x}", u128::from_be_bytes(b))).expect("32 hex digits")
}

/// How many chosen copies each zone holds.
fn zone_load<'a>(chosen: &[&'a Candidate]) -> BTreeMap<Option<&'a str>, usize> {
    let mut load = BTreeMap::new();
    for c in chosen {
        *load.entry(c.zone.as_deref()).or_default() += 1;
    }
    load
}

/// A node's rank for a volume (rendezvous hashing): stable while the node
/// set is, and different volumes rank nodes differently, so copies spread.
fn rank(uuid: Uuid, node: &str) -> [u8; 8] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(uuid.to_hex().as_bytes());
    ctx.update(b"\0");
    ctx.update(node.as_bytes());
    let d = ctx.finish();
    let mut r = [0u8; 8];
    r.copy_from_slice(&d.as_ref()[..8]);
    r
}

/// Chooses `replicas` distinct nodes for volume `uuid` of `size` bytes:
/// only fresh, uncordoned nodes with `size` bytes free; never two copies in
/// one zone while a zone without a copy has an eligible node;
/// with [`Locality::BestEffort`], one copy on `preferred` when it is
/// eligible. Two copies also get a witness on a third fresh, uncordoned
/// node (no room needed), in a zone of its own where one exists.
pub fn place(
    uuid: Uuid,
    candidates: &[Candidate],
    replicas: usize,
    size: u64,
    locality: Locality,
    preferred: Option<&str>,
) -> Result<Placed, PlacementError> {
    let mut seen = BTreeSet::new();
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.fresh && !c.cordoned && seen.insert(c.node.as_str()))
        .collect();
    let eligible: Vec<&Candidate> = usable
        .iter()
        .copied()
        .filter(|c| c.free_bytes >= size)
        .collect();
    if eligible.len() < replicas {
        return Err(PlacementError::NotEnoughNodes {
            found: eligible.len(),
            needed: replicas,
            size,
        });
    }
    let mut copies: Vec<&Candidate> = Vec::new();
    if locality == Locality::BestEffort
        && let Some(p) = preferred
        && let Some(c) = eligible.iter().find(|c| c.node == p)
    {
        copies.push(c);
    }
    while copies.len() < replicas {
        let load = zone_load(&copies);
        let next = eligible
            .iter()
            .filter(|c| !copies.iter().any(|k| k.node == c.node))
            .min_by_key(|c| {
                (
                    load.get(&c.zone.as_deref()).copied().unwrap_or(0),
                    rank(uuid, &c.node),
                )
            })
            .expect("enough eligible nodes");
        copies.push(next);
    }
    let witness = if replicas == 2 {
        let load = zone_load(&copies);
        let w = usable
            .iter()
            .filter(|c| !copies.iter().any(|k| k.node == c.node))
            .min_by_key(|c| {
                (
                    load.get(&c.zone.as_deref()).copied().unwrap_or(0),
                    rank(uuid, &c.node),
                )
            })
            .ok_or(PlacementError::NoWitness {
                found: usable.len(),
            })?;
        Some(w.node.clone())
    } else {
        None
    };
    Ok(Placed {
        copies: copies.iter().map(|c| c.node.clone()).collect(),
        witness,
    })
}

/// The members a volume should have with `replicas` copies, the members on
/// the `lost` nodes replaced: copies that stay are kept (in-sync ones
/// first, and among them the copy of the node the volume is published on;
/// `lost` ones never), new copies go to fresh, uncordoned nodes
/// with room, spread over zones with the kept ones; two copies keep (or
/// get) a witness on another node, any other count has none. A node
/// holding nothing of the volume is preferred, but with no other node the
/// witness's node takes a copy when the witness goes, and a copy that goes
/// leaves its node for the witness (a member that changes role: the
/// controller removes it and adds it again, see `set_members`), so three
/// nodes can hold two copies and a witness, or three copies.
///
/// During a drain ([`evacuate`]) `replicas` counts the copies that stay: a
/// copy leaving is none of them, and it stays, still leaving, while a copy
/// that stays is out of sync or new (the drain removes it once they are in
/// sync), unless that would make more copies than a volume may have. So a
/// ModifyVolume, or a lost member's replacement, in the middle of a drain
/// neither keeps the leaving copy for good nor drops it before its
/// replacement holds the data. Returns the members unchanged when nothing
/// is to do.
pub fn reshape(
    candidates: &[Candidate],
    record: &ReplicaRecord,
    replicas: usize,
    lost: &BTreeSet<String>,
) -> Result<Vec<Member>, PlacementError> {
    reshape_with(candidates, record, replicas, lost, true)
}

/// [`reshape`], where two copies get no witness unless `witnessed`.
fn reshape_with(
    candidates: &[Candidate],
    record: &ReplicaRecord,
    replicas: usize,
    lost: &BTreeSet<String>,
    witnessed: bool,
) -> Result<Vec<Member>, PlacementError> {
    let uuid = record.uuid;
    let leaving: BTreeSet<&str> = record.leaving().collect();
    let mut kept: Vec<&str> = record
        .copies()
        .filter(|n| !lost.contains(*n) && !leaving.contains(n))
        .collect();
    // In-sync copies first, then the publication's node's (its engine
    // reads from its own copy), then member order.
    let owner = record.published_on().map(|o| o.node.as_str());
    kept.sort_by_key(|n| (!record.in_sync.contains_key(*n), owner != Some(*n)));
    kept.truncate(replicas);
    let used: BTreeSet<&str> = record.voters().collect();
    let witness = record
        .members
        .iter()
        .find(|m| m.role == Role::Witness && !lost.contains(&m.node))
        .map(|m| m.node.as_str());
    let mut seen = BTreeSet::new();
    // Nodes that may take a member: those holding nothing of the volume,
    // and members not lost, not kept as copies and not leaving.
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            c.fresh
                && !c.cordoned
                && !lost.contains(&c.node)
                && !kept.contains(&c.node.as_str())
                && !leaving.contains(c.node.as_str())
                && seen.insert(&c.node)
        })
        .collect();
    // A copy goes to a node holding nothing of the volume, or to the
    // witness's when the witness goes.
    let eligible: Vec<&Candidate> = usable
        .iter()
        .copied()
        .filter(|c| {
            c.free_bytes >= record.size
                && (!used.contains(c.node.as_str())
                    || (replicas != 2 && witness == Some(c.node.as_str())))
        })
        .collect();
    let need = replicas - kept.len();
    if eligible.len() < need {
        return Err(PlacementError::NotEnoughNodes {
            found: eligible.len(),
            needed: need,
            size: record.size,
        });
    }
    let zone_of = |n: &str| {
        candidates
            .iter()
            .find(|c| c.node == n)
            .and_then(|c| c.zone.as_deref())
    };
    let mut load: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for n in &kept {
        *load.entry(zone_of(n)).or_default() += 1;
    }
    // Spread over zones first, then a node holding nothing of the volume.
    let key = |load: &BTreeMap<Option<&str>, usize>, c: &Candidate| {
        (
            load.get(&c.zone.as_deref()).copied().unwrap_or(0),
            used.contains(c.node.as_str()),
            rank(uuid, &c.node),
        )
    };
    let mut added: Vec<&Candidate> = Vec::new();
    while added.len() < need {
        let next = eligible
            .iter()
            .filter(|c| !added.iter().any(|k| k.node == c.node))
            .min_by_key(|c| key(&load, c))
            .expect("enough eligible nodes");
        *load.entry(next.zone.as_deref()).or_default() += 1;
        added.push(next);
    }
    let mut members: Vec<Member> = kept.iter().map(|n| Member::copy(n)).collect();
    members.extend(added.iter().map(|c| Member::copy(&c.node)));
    let behind = !added.is_empty() || kept.iter().any(|n| !record.in_sync.contains_key(*n));
    let still: Vec<&str> = record
        .copies()
        .filter(|n| behind && leaving.contains(n) && !lost.contains(*n))
        .collect();
    if members.len() + still.len() <= MAX_COPIES {
        members.extend(still.iter().map(|n| Member {
            leaving: true,
            ..Member::copy(n)
        }));
    } else if !kept.iter().any(|n| record.in_sync.contains_key(*n)) {
        // No room for them, and they hold the only copies in sync.
        return Err(PlacementError::TooManyWhileLeaving {
            replicas,
            leaving: still.len(),
        });
    }
    if members.len() == 2 && witnessed {
        let witness = match witness {
            Some(w) => w.to_owned(),
            None => usable
                .iter()
                .filter(|c| !added.iter().any(|k| k.node == c.node))
                .min_by_key(|c| key(&load, c))
                .map(|c| c.node.clone())
                .ok_or(PlacementError::NoWitness {
                    found: usable.len() + kept.len(),
                })?,
        };
        members.push(Member::witness(&witness));
    }
    if record.has_members(&members) {
        return Ok(record.members.clone());
    }
    Ok(members)
}

/// The next step of moving a volume's members off draining nodes
/// ([`evacuate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evacuation {
    /// No member on a draining node, and no copy leaving.
    Nothing,
    /// The copies that replace the leaving ones are out of sync (these):
    /// an engine rebuilds them first.
    Rebuilding(Vec<String>),
    /// Change the members to `members`.
    Members { members: Vec<Member>, step: Step },
}

/// What an [`Evacuation::Members`] change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Adds a copy elsewhere for each copy on a draining node, which is
    /// marked leaving (make).
    Add,
    /// Removes the leaving copies, their replacements in sync (break).
    Remove,
    /// Moves a witness (no data): nothing to rebuild first.
    Witness,
    /// Replaces the copies in place: the volume has as many copies as it
    /// may, so none can be added first; the other copies stay in sync.
    Replace,
}

/// How the members of `record` (no membership change under way) move off
/// the `draining` nodes, make before break: first a copy more on another
/// node for each copy on a draining node, which is marked leaving
/// ([`Step::Add`]); once every copy that stays is in sync, the leaving
/// ones go ([`Step::Remove`]). The copy count is the same at the end; a
/// witness moves at once. A volume with [`MAX_COPIES`] replaces its
/// copies in place. Nothing is started that could not end: an error when
/// the nodes left could not hold the volume without the draining ones.
pub fn evacuate(
    candidates: &[Candidate],
    record: &ReplicaRecord,
    draining: &BTreeSet<String>,
) -> Result<Evacuation, PlacementError> {
    // A draining node takes nothing, whatever the registry says of it.
    let candidates: Vec<Candidate> = candidates
        .iter()
        .map(|c| Candidate {
            cordoned: c.cordoned || draining.contains(&c.node),
            ..c.clone()
        })
        .collect();
    let candidates = &candidates[..];
    let on: BTreeSet<String> = record
        .voters()
        .filter(|n| draining.contains(*n))
        .map(str::to_owned)
        .collect();
    let leaving: BTreeSet<String> = record.leaving().map(str::to_owned).collect();
    let copies = record.copies().count();
    if !leaving.is_empty() {
        let stay: Vec<&str> = record.copies().filter(|n| !leaving.contains(*n)).collect();
        let behind: Vec<String> = stay
            .iter()
            .filter(|n| !record.in_sync.contains_key(**n))
            .map(|n| (*n).to_owned())
            .collect();
        if !behind.is_empty() {
            return Ok(Evacuation::Rebuilding(behind));
        }
        // A witness on a draining node goes too; a copy there that is not
        // leaving yet (a second node draining) waits for its own turn.
        let gone = record
            .members
            .iter()
            .filter(|m| {
                leaving.contains(&m.node) || (m.role == Role::Witness && on.contains(&m.node))
            })
            .map(|m| m.node.clone())
            .collect();
        let members = reshape(candidates, record, stay.len(), &gone)?;
        return Ok(Evacuation::Members {
            members,
            step: Step::Remove,
        });
    }
    if on.is_empty() {
        return Ok(Evacuation::Nothing);
    }
    let moving = record.copies().filter(|n| on.contains(*n)).count();
    if moving == 0 || copies + moving > MAX_COPIES {
        let members = reshape(candidates, record, copies, &on)?;
        let step = if moving == 0 {
            Step::Witness
        } else {
            Step::Replace
        };
        return Ok(Evacuation::Members { members, step });
    }
    let none = BTreeSet::new();
    let mut members = match reshape(candidates, record, copies + moving, &none) {
        // A lone copy moving, with no third node for a witness: its two
        // copies vote alone while it moves (both needed for a change, as
        // the one copy was before), and one remains.
        Err(PlacementError::NoWitness { .. }) if copies == 1 => {
            reshape_with(candidates, record, 2, &none, false)?
        }
        r => r?,
    };
    for m in &mut members {
        m.leaving = m.role == Role::Copy && on.contains(&m.node);
    }
    // The break must be possible once the new copies are in sync.
    let mut made = record.clone();
    made.members = members.clone();
    reshape(candidates, &made, copies, &on)?;
    Ok(Evacuation::Members {
        members,
        step: Step::Add,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::replicated::record::RecordError;

    fn node(n: &str, zone: &str, free: u64) -> Candidate {
        Candidate {
            node: n.into(),
            zone: (!zone.is_empty()).then(|| zone.into()),
            fresh: true,
            cordoned: false,
            free_bytes: free,
        }
    }

    const GIB: u64 = 1 << 30;

    fn record(members: Vec<Member>) -> ReplicaRecord {
        ReplicaRecord::new(volume_uuid("v"), GIB, members, &BTreeMap::new()).unwrap()
    }

    /// A copy on `n` marked leaving (its node drains).
    fn leaving(n: &str) -> Member {
        Member {
            leaving: true,
            ..Member::copy(n)
        }
    }

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn reshape_adds_and_removes_copies_keeping_the_witness_rule() {
        let nodes = [
            node("a", "z1", 4 * GIB),
            node("b", "z2", 4 * GIB),
            node("c", "z1", 4 * GIB),
            node("d", "z3", 4 * GIB),
        ];
        let two = record(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::witness("c"),
        ]);
        let none = BTreeSet::new();
        // 2 -> 3: the witness goes, the new copy goes to the free zone.
        let three = reshape(&nodes, &two, 3, &none).unwrap();
        assert_eq!(
            three,
            vec![Member::copy("a"), Member::copy("b"), Member::copy("d")]
        );
        // Nothing to do: the same members.
        assert_eq!(reshape(&nodes, &two, 2, &none).unwrap(), two.members);
        // 3 -> 2: an out-of-sync copy goes first, a witness comes.
        let mut r3 = record(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::copy("c"),
        ]);
        r3.in_sync.remove("a");
        let back = reshape(&nodes, &r3, 2, &none).unwrap();
        assert_eq!(
            back,
            vec![Member::copy("b"), Member::copy("c"), Member::witness("d")]
        );
        // A lost copy is replaced on a node holding nothing of the volume.
        let lost: BTreeSet<String> = ["b".to_owned()].into();
        let swapped = reshape(&nodes, &r3, 3, &lost).unwrap();
        assert_eq!(
            swapped,
            vec![Member::copy("c"), Member::copy("a"), Member::copy("d")]
        );
        // The copy of the node the volume is published on stays, unless
        // it is out of sync.
        let mut published = r3.clone();
        published.owner = Some(crate::backend::replicated::record::Owner {
            node: "c".into(),
            readonly: false,
            heal: false,
        });
        assert_eq!(
            reshape(&nodes, &published, 1, &none).unwrap(),
            vec![Member::copy("c")]
        );
        published.in_sync.remove("c");
        assert_eq!(
            reshape(&nodes, &published, 1, &none).unwrap(),
            vec![Member::copy("b")]
        );
        // On three nodes, the witness's node takes the third copy, and the
        // copy that goes leaves its node to the witness.
        let three_nodes = &nodes[..3];
        assert_eq!(
            reshape(three_nodes, &two, 3, &none).unwrap(),
            vec![Member::copy("a"), Member::copy("b"), Member::copy("c")]
        );
        assert_eq!(
            reshape(three_nodes, &r3, 2, &none).unwrap(),
            vec![Member::copy("b"), Member::copy("c"), Member::witness("a")]
        );
        // But not a lost one, nor a cordoned one: the witness stays where
        // it is while two copies stay.
        let c_lost: BTreeSet<String> = ["c".to_owned()].into();
        assert!(matches!(
            reshape(three_nodes, &two, 3, &c_lost),
            Err(PlacementError::NotEnoughNodes { found: 0, .. })
        ));
        let mut cordoned = three_nodes.to_vec();
        cordoned[0].cordoned = true;
        assert!(matches!(
            reshape(&cordoned, &r3, 2, &none),
            Err(PlacementError::NoWitness { found: 2 })
        ));
        assert_eq!(
            reshape(three_nodes, &two, 2, &c_lost).unwrap_err(),
            PlacementError::NoWitness { found: 2 }
        );
        // Not enough nodes.
        assert!(matches!(
            reshape(&nodes, &r3, 5, &none),
            Err(PlacementError::NotEnoughNodes {
                found: 1,
                needed: 2,
                ..
            })
        ));
    }

    #[test]
    fn a_drain_adds_the_copy_first_and_removes_the_leaving_one_once_in_sync() {
        let nodes = [
            node("a", "z1", 4 * GIB),
            node("b", "z2", 4 * GIB),
            node("c", "z1", 4 * GIB),
            node("d", "z3", 4 * GIB),
        ];
        let two = record(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::witness("c"),
        ]);
        assert_eq!(
            evacuate(&nodes, &two, &set(&["x"])),
            Ok(Evacuation::Nothing)
        );
        // Make: a third copy, in the free zone; b's is marked leaving.
        let Ok(Evacuation::Members { members, step }) = evacuate(&nodes, &two, &set(&["b"])) else {
            panic!("no step");
        };
        assert_eq!(step, Step::Add);
        assert_eq!(
            members,
            vec![Member::copy("a"), leaving("b"), Member::copy("d")]
        );
        // The new copy out of sync: nothing goes yet.
        let mut made = two.clone();
        made.members = members;
        made.in_sync.insert("b".into(), 0);
        assert_eq!(
            evacuate(&nodes, &made, &set(&["b"])),
            Ok(Evacuation::Rebuilding(vec!["d".into()]))
        );
        // In sync: the leaving copy goes, and two copies get their witness
        // back.
        made.in_sync.insert("d".into(), 0);
        assert_eq!(
            evacuate(&nodes, &made, &set(&["b"])),
            Ok(Evacuation::Members {
                members: vec![Member::copy("a"), Member::copy("d"), Member::witness("c")],
                step: Step::Remove,
            })
        );
        // A leaving copy goes even once its node no longer drains.
        assert!(matches!(
            evacuate(&nodes, &made, &set(&[])),
            Ok(Evacuation::Members {
                step: Step::Remove,
                ..
            })
        ));
        // A witness moves at once, to a node not draining.
        assert_eq!(
            evacuate(&nodes, &two, &set(&["c"])),
            Ok(Evacuation::Members {
                members: vec![Member::copy("a"), Member::copy("b"), Member::witness("d")],
                step: Step::Witness,
            })
        );
        // Three copies: the fourth node takes one, even when the registry
        // has not heard of the drain yet (not cordoned there).
        let three = record(vec![
            Member::copy("a"),
            Member::copy("b"),
            Member::copy("c"),
        ]);
        assert_eq!(
            evacuate(&nodes, &three, &set(&["a"])),
            Ok(Evacuation::Members {
                members: vec![
                    leaving("a"),
                    Member::copy("b"),
                    Member::copy("c"),
                    Member::copy("d")
                ],
                step: Step::Add,
            })
        );
        // Three nodes cannot hold two copies and a witness without the
        // draining one: nothing starts.
        assert_eq!(
            evacuate(&nodes[..3], &two, &set(&["b"])),
            Err(PlacementError::NoWitness { found: 2 })
        );
        assert!(matches!(
            evacuate(&nodes[..3], &three, &set(&["a"])),
            Err(PlacementError::NotEnoughNodes { found: 0, .. })
        ));
        // One copy: two for a while, with a witness, as two copies have;
        // then one again, elsewhere.
        let one = record(vec![Member::copy("b")]);
        let Ok(Evacuation::Members { members, step }) = evacuate(&nodes, &one, &set(&["b"])) else {
            panic!("no step");
        };
        assert_eq!(step, Step::Add);
        assert_eq!(members.len(), 3, "{members:?}");
        assert_eq!(members[0], leaving("b"));
        assert_eq!(members[2].role, Role::Witness);
        let mut made = one.clone();
        made.members = members;
        made.in_sync.insert(made.members[1].node.clone(), 0);
        assert_eq!(
            evacuate(&nodes, &made, &set(&["b"])),
            Ok(Evacuation::Members {
                members: vec![made.members[1].clone()],
                step: Step::Remove,
            })
        );
        // One copy on two nodes: no third node for a witness, so the two
        // copies vote alone while it moves.
        let Ok(Evacuation::Members { members, step }) = evacuate(&nodes[1..3], &one, &set(&["b"]))
        else {
            panic!("no step for one copy on two nodes");
        };
        assert_eq!(step, Step::Add);
        assert_eq!(members, vec![leaving("b"), Member::copy("c")]);
        let mut made = one.clone();
        made.members = members;
        made.validate().unwrap();
        assert_eq!(
            evacuate(&nodes[1..3], &made, &set(&["b"])),
            Ok(Evacuation::Rebuilding(vec!["c".into()]))
        );
        made.in_sync.insert("c".into(), 0);
        assert_eq!(
            evacuate(&nodes[1..3], &made, &set(&["b"])),
            Ok(Evacuation::Members {
                members: vec![Member::copy("c")],
                step: Step::Remove,
            })
        );
        // Alone, it has nowhere to go.
        assert!(matches!(
            evacuate(&nodes[1..2], &one, &set(&["b"])),
            Err(PlacementError::NotEnoughNodes { found: 0, .. })
        ));
        // Five copies, the most a volume may have: replaced in place.
        let six: Vec<Candidate> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|n| node(n, "", 4 * GIB))
            .collect();
        let five = record(
            ["a", "b", "c", "d", "e"]
                .iter()
                .map(|n| Member::copy(n))
                .collect(),
        );
        assert_eq!(
            evacuate(&six, &five, &set(&["c"])),
            Ok(Evacuation::Members {
                members: ["a", "b", "d", "e", "f"]
                    .iter()
                    .map(|n| Member::copy(n))
                    .collect(),
                step: Step::Replace,
            })
        );
        // ModifyVolume down drops a leaving copy before one that stays.
        let four = record(vec![
            leaving("a"),
            Member::copy("b"),
            Member::copy("c"),
            Member::copy("d"),
        ]);
        assert_eq!(
            reshape(&nodes, &four, 3, &BTreeSet::new()).unwrap(),
            vec![Member::copy("b"), Member::copy("c"), Member::copy("d")]
        );
        // Only a copy leaves so.
        let mut odd = two.clone();
        odd.members[2].leaving = true;
        assert_eq!(odd.validate(), Err(RecordError::LeavingWitness("c".into())));
    }

    /// ModifyVolume, or a lost member's replacement, in the middle of a
    /// drain: `replicas` counts the copies that stay, and the leaving copy
    /// stays, still leaving, while one that stays is out of sync.
    #[test]
    fn a_change_in_the_middle_of_a_drain_keeps_the_leaving_copy_while_needed() {
        let nodes = [
            node("a", "z1", 4 * GIB),
            node("b", "z2", 4 * GIB),
            node("c", "z1", 4 * GIB),
            node("d", "z3", 4 * GIB),
            node("e", "z2", 4 * GIB),
        ];
        let none = BTreeSet::new();
        // Two copies, b's leaving, its replacement d not in sync yet.
        let mut made = record(vec![Member::copy("a"), leaving("b"), Member::copy("d")]);
        made.in_sync.remove("d");
        // Three copies: a third one that stays; b still leaves.
        let three = reshape(&nodes, &made, 3, &none).unwrap();
        assert_eq!(three.len(), 4, "{three:?}");
        assert_eq!(&three[..2], &[Member::copy("a"), Member::copy("d")]);
        assert!(
            !three[2].leaving && three[2].role == Role::Copy,
            "{three:?}"
        );
        assert_eq!(three[3], leaving("b"));
        // Asked for the two it has: nothing changes (d is kept, b leaves).
        assert_eq!(reshape(&nodes, &made, 2, &none).unwrap(), made.members);
        // a lost: d stays, a new copy replaces a, b still leaves.
        let replaced = reshape(&nodes, &made, 2, &set(&["a"])).unwrap();
        assert_eq!(replaced[0], Member::copy("d"));
        assert_eq!(replaced[2], leaving("b"));
        assert_eq!(
            replaced.len(),
            3,
            "no witness beside three copies: {replaced:?}"
        );
        // The leaving copy's node lost: the two that stay, and a witness.
        let gone = reshape(&nodes, &made, 2, &set(&["b"])).unwrap();
        assert_eq!(gone[..2], [Member::copy("a"), Member::copy("d")]);
        assert_eq!(gone[2].role, Role::Witness);
        assert_ne!(gone[2].node, "b");
        // One copy: a, in sync, is all it takes; b and d go at once.
        assert_eq!(
            reshape(&nodes, &made, 1, &none).unwrap(),
            vec![Member::copy("a")]
        );
        // With only b in sync, the copy kept (a) is rebuilt from it
        // first: b stays until then, as two copies with a witness.
        let mut alone = made.clone();
        alone.in_sync.remove("a");
        alone.in_sync.insert("b".into(), 0);
        let one = reshape(&nodes, &alone, 1, &none).unwrap();
        assert_eq!(one[..2], [Member::copy("a"), leaving("b")]);
        assert_eq!(one[2].role, Role::Witness);
        // Each a valid record's members (a witness beside two copies only).
        for members in [three, replaced, gone, one] {
            record(members);
        }
        // Five that stay and one leaving would be six: it goes.
        let mut full = record(vec![
            Member::copy("a"),
            leaving("b"),
            Member::copy("c"),
            Member::copy("d"),
        ]);
        full.in_sync.remove("d");
        let six: Vec<Candidate> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|n| node(n, "", 4 * GIB))
            .collect();
        let five = reshape(&six, &full, 5, &none).unwrap();
        assert_eq!(five.len(), 5, "{five:?}");
        assert!(five.iter().all(|m| !m.leaving && m.node != "b"), "{five:?}");
        // Unless it holds the only copy in sync.
        full.in_sync = BTreeMap::from([("b".to_owned(), 0)]);
        assert_eq!(
            reshape(&six, &full, 5, &none),
            Err(PlacementError::TooManyWhileLeaving {
                replicas: 5,
                leaving: 1
            })
        );
    }

    #[test]
    fn params_default_and_parse() {
        assert_eq!(
            ReplicaParams::parse(None, None),
            Ok(ReplicaParams {
                replicas: 3,
                locality: Locality::BestEffort
            })
        );
        assert_eq!(
            ReplicaParams::parse(Some("5"), Some("none")),
            Ok(ReplicaParams {
                replicas: 5,
                locality: Locality::None
            })
        );
        for bad in ["0", "6", "-1", "three", "", " 3"] {
            let e = ReplicaParams::parse(Some(bad), None).unwrap_err();
            assert_eq!(e, ParamError::Replicas(bad.into()));
            assert!(e.to_string().contains("from 1 to 5"), "{e}");
        }
        let e = ReplicaParams::parse(None, Some("always")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "locality must be best-effort or none, not \"always\""
        );
    }

    #[test]
    fn uuid_is_a_function_of_the_name() {
        let a = volume_uuid("pvc-1");
        assert_eq!(a, volume_uuid("pvc-1"));
        assert_ne!(a, volume_uuid("pvc-2"));
        assert_eq!(volume_uuid("").to_hex().len(), 32, "always 32 hex digits");
    }

    #[test]
    fn uuid_matches_sha256_of_prefix_and_name() {
        // SHA-256("stowage replicated volume\0abc"), computed independently
        // with `printf 'stowage replicated volume\0abc' | sha256sum`.
        assert_eq!(
            volume_uuid("abc").to_hex(),
            "4691518f72a39b00038ff43fdd325d4f"
        );
    }

    #[test]
    fn only_fresh_uncordoned_nodes_with_room() {
        let mut stale = node("stale", "", 10 * GIB);
        stale.fresh = false;
        let mut cordoned = node("cordoned", "", 10 * GIB);
        cordoned.cordoned = true;
        let small = node("small", "", GIB / 2);
        let ok = node("ok", "", 10 * GIB);
        let all = [stale, cordoned, small, ok];
        let u = volume_uuid("v");
        let p = place(u, &all, 1, GIB, Locality::None, None).unwrap();
        assert_eq!(p.copies, ["ok"]);
        let e = place(u, &all, 3, GIB, Locality::None, None).unwrap_err();
        assert_eq!(
            e,
            PlacementError::NotEnoughNodes {
                found: 1,
                needed: 3,
                size: GIB
            }
        );
        assert!(e.to_string().starts_with("1 eligible node(s)"), "{e}");
        assert!(e.to_string().contains("for 3 copies"), "{e}");
    }

    #[test]
    fn copies_spread_over_zones_first() {
        let all = [
            node("a1", "a", GIB),
            node("a2", "a", GIB),
            node("a3", "a", GIB),
            node("b1", "b", GIB),
            node("c1", "c", GIB),
        ];
        for name in ["x", "y", "z", "w"] {
            let p = place(volume_uuid(name), &all, 3, GIB, Locality::None, None).unwrap();
            let zones: BTreeSet<char> = p.copies.iter().map(|n| n.as_bytes()[0] as char).collect();
            assert_eq!(zones.len(), 3, "{p:?}");
        }
        // Four copies over three zones: exactly one zone holds two.
        let p = place(volume_uuid("x"), &all, 4, GIB, Locality::None, None).unwrap();
        let a = p.copies.iter().filter(|n| n.starts_with('a')).count();
        assert_eq!(a, 2, "{p:?}");
    }

    #[test]
    fn best_effort_locality_puts_a_copy_on_the_preferred_node() {
        let all: Vec<Candidate> = (0..6).map(|i| node(&format!("n{i}"), "", GIB)).collect();
        for pref in ["n0", "n3", "n5"] {
            let p = place(
                volume_uuid("v"),
                &all,
                2,
                GIB,
                Locality::BestEffort,
                Some(pref),
            )
            .unwrap();
            assert!(p.copies.iter().any(|n| n == pref), "{p:?}");
        }
        // Not eligible: placed elsewhere, no error.
        let mut full = all.clone();
        full[3].free_bytes = 0;
        let p = place(
            volume_uuid("v"),
            &full,
            3,
            GIB,
            Locality::BestEffort,
            Some("n3"),
        )
        .unwrap();
        assert!(!p.copies.iter().any(|n| n == "n3"), "{p:?}");
    }

    #[test]
    fn placement_is_stable_and_distinct() {
        let all: Vec<Candidate> = (0..8).map(|i| node(&format!("n{i}"), "", GIB)).collect();
        let u = volume_uuid("v");
        let p = place(u, &all, 5, GIB, Locality::None, None).unwrap();
        assert_eq!(p, place(u, &all, 5, GIB, Locality::None, None).unwrap());
        let distinct: BTreeSet<&String> = p.copies.iter().collect();
        assert_eq!(distinct.len(), 5);
        // Different volumes do not all land on the same nodes.
        let firsts: BTreeSet<String> = (0..20)
            .map(|i| {
                place(
                    volume_uuid(&format!("v{i}")),
                    &all,
                    1,
                    GIB,
                    Locality::None,
                    None,
                )
                .unwrap()
                .copies[0]
                    .clone()
            })
            .collect();
        assert!(firsts.len() > 2, "{firsts:?}");
    }

    #[test]
    fn two_copies_get_a_witness_on_a_third_node_without_room() {
        let mut tiny = node("tiny", "c", 0);
        tiny.free_bytes = 0;
        let all = [node("a1", "a", GIB), node("b1", "b", GIB), tiny];
        let p = place(volume_uuid("v"), &all, 2, GIB, Locality::None, None).unwrap();
        assert_eq!(p.witness.as_deref(), Some("tiny"));
        assert_eq!(p.members().len(), 3);
        let e = place(volume_uuid("v"), &all[..2], 2, GIB, Locality::None, None).unwrap_err();
        assert_eq!(e, PlacementError::NoWitness { found: 2 });
        assert!(e.to_string().contains("2 eligible node(s)"), "{e}");
        // Three copies: no witness.
        let three = [node("a", "", GIB), node("b", "", GIB), node("c", "", GIB)];
        let p = place(volume_uuid("v"), &three, 3, GIB, Locality::None, None).unwrap();
        assert_eq!(p.witness, None);
    }

    #[test]
    fn a_node_listed_twice_counts_once() {
        let all = [node("a", "", GIB), node("a", "", GIB)];
        let e = place(volume_uuid("v"), &all, 2, GIB, Locality::None, None).unwrap_err();
        assert!(matches!(e, PlacementError::NotEnoughNodes { found: 1, .. }));
    }
}
