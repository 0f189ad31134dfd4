//! Volume and node identifiers. A volume ID is `<backend>:<node>:<uuid>`
//! (e.g. `block:node-1:6f1c…`, 32 lowercase hex digits), or
//! `replicated:<uuid>` for a volume whose copies live on several nodes. IDs
//! are parsed with a strict grammar; only the UUID part ever becomes a file
//! name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The storage backends a volume can live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Dir,
    Block,
    Object,
    /// N copies on different nodes (`replicated:<uuid>`: no node).
    Replicated,
}

impl BackendKind {
    /// The backends whose volumes live in the node's pool.
    pub const LOCAL: [BackendKind; 2] = [BackendKind::Dir, BackendKind::Block];

    /// Every backend.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Dir,
        BackendKind::Block,
        BackendKind::Object,
        BackendKind::Replicated,
    ];

    /// The backend's decisions (capabilities, sizes, staging, snapshots).
    pub fn profile(self) -> &'static dyn crate::backend::profile::Profile {
        crate::backend::profile(self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Dir => "dir",
            BackendKind::Block => "block",
            BackendKind::Object => "object",
            BackendKind::Replicated => "replicated",
        }
    }
}

impl FromStr for BackendKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "dir" => Ok(BackendKind::Dir),
            "block" => Ok(BackendKind::Block),
            "object" => Ok(BackendKind::Object),
            "replicated" => Ok(BackendKind::Replicated),
            _ => Err(()),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest node id accepted (it is embedded in volume IDs, which CSI
/// limits to 128 bytes).
pub const MAX_NODE_ID_LEN: usize = 63;

/// Whether `s` is a valid node id: 1–63 characters of `[A-Za-z0-9._-]`,
/// starting with a letter or digit.
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_ID_LEN
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The random part of an ID: 128 bits, written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(u128);

impl Uuid {
    pub fn new_random() -> Self {
        Uuid(uuid::Uuid::new_v4().as_u128())
    }

    /// The 32-hex-digit form, safe to use as a file name.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    /// Parses exactly 32 lowercase hex digits.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Uuid)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A parsed volume ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub backend: BackendKind,
    pub node: String,
    pub uuid: Uuid,
}

impl VolumeId {
    /// Parses a volume ID; anything not produced by [`fmt::Display`] of a
    /// `VolumeId` is rejected.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > 128 {
            return None;
        }
        let mut parts = s.split(':');
        let backend = parts.next()?.parse().ok()?;
        if backend == BackendKind::Replicated {
            // The copies hold it, on whichever nodes: the ID names none.
            let uuid = Uuid::parse_hex(parts.next()?)?;
            return parts.next().is_none().then(|| VolumeId {
                backend,
                node: String::new(),
                uuid,
            });
        }
        let node = parts.next()?;
        let uuid = Uuid::parse_hex(parts.next()?)?;
        if parts.next().is_some() || !valid_node_id(node) {
            return None;
        }
        Some(VolumeId {
            backend,
            node: node.to_owned(),
            uuid,
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.backend == BackendKind::Replicated {
            return write!(f, "{}:{}", self.backend, self.uuid);
        }
        write!(f, "{}:{}:{}", self.backend, self.node, self.uuid)
    }
}

impl Serialize for VolumeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VolumeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VolumeId::parse(&s).ok_or_else(|| serde::de::Error::custom("malformed volume id"))
    }
}

/// A parsed snapshot ID: `snap:<backend>:<node>:<uuid>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    pub backend: BackendKind,
    pub node: String,
    pub uuid: Uuid,
}

impl SnapshotId {
    /// Parses a snapshot ID; anything not produced by [`fmt::Display`] of a
    /// `SnapshotId` is rejected.
    pub fn parse(s: &str) -> Option<Self> {
        let v = VolumeId::parse(s.strip_prefix("snap:")?)?;
        if v.node.is_empty() {
            return None;
        }
        Some(SnapshotId {
            backend: v.backend,
            node: v.node,
            uuid: v.uuid,
        })
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snap:{}:{}:{}", self.backend, self.node, self.uuid)
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SnapshotId::parse(&s).ok_or_else(|| serde::de::Error::custom("malformed snapshot id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let id = VolumeId {
            backend: BackendKind::Block,
            node: "node-1.example".into(),
            uuid: Uuid::new_random(),
        };
        assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn rejects_path_tricks_and_foreign_ids() {
        let u = "0123456789abcdef0123456789abcdef";
        for bad in [
            "fake-vol-id",
            "",
            &format!("block:node:{u}:x"),
            &format!("block:../x:{u}"),
            &format!("block:/etc:{u}"),
            &format!("block:n\0:{u}"),
            &format!("tape:node:{u}"),
            &format!("block:node:{}", u.to_uppercase()),
            "block:node:../../../../etc/passwd",
            &format!("dir::{u}"),
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn snapshot_ids_round_trip_and_are_not_volume_ids() {
        let id = SnapshotId {
            backend: BackendKind::Dir,
            node: "n".into(),
            uuid: Uuid::new_random(),
        };
        let s = id.to_string();
        assert_eq!(SnapshotId::parse(&s), Some(id));
        assert_eq!(VolumeId::parse(&s), None);
        assert_eq!(SnapshotId::parse(&s[5..]), None);
    }

    proptest! {
        #[test]
        fn snapshot_parse_accepts_only_canonical_forms(s in "\\PC{0,160}") {
            if let Some(id) = SnapshotId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn parse_never_panics_and_accepts_only_canonical_forms(s in "\\PC{0,160}") {
            if let Some(id) = VolumeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
                prop_assert!(!id.uuid.to_hex().contains('/'));
            }
        }

        #[test]
        fn node_ids_never_carry_separators(s in "[a-z0-9./:_-]{0,70}") {
            if valid_node_id(&s) {
                prop_assert!(!s.contains('/') && !s.contains(':') && s.len() <= MAX_NODE_ID_LEN);
            }
        }
    }
}
