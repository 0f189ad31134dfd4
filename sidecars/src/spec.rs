//! The volumes file (`host-volumes.yaml`): parsing and validation into
//! [`VolumesFile`]. Unknown keys are rejected; every error names the line
//! and column and, where it can be told, the volume. Parsing never touches
//! the plugin or the disk beyond the text it is given.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::schedule::parse_duration;
use crate::size::parse_size;

/// A volumes file, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumesFile {
    pub volumes: Vec<VolumeSpec>,
}

/// How a volume is consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeMode {
    /// A mounted filesystem.
    #[default]
    Mount,
    /// A raw block device.
    Block,
}

/// Kubernetes-style access modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Read-write on one node.
    #[default]
    Rwo,
    /// Read-write by one workload on one node.
    Rwop,
    /// Read-only on many nodes.
    Rox,
    /// Read-write on many nodes.
    Rwx,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::Rwo => "rwo",
            AccessMode::Rwop => "rwop",
            AccessMode::Rox => "rox",
            AccessMode::Rwx => "rwx",
        }
    }
}

/// A snapshot schedule: one snapshot per `every` seconds, newest `keep`
/// kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub every_secs: u64,
    pub keep: u32,
}

/// One declared volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeSpec {
    pub name: String,
    pub size_bytes: i64,
    pub mode: VolumeMode,
    /// Empty: the plugin's choice. Always empty for block volumes.
    pub fs: String,
    pub access_mode: AccessMode,
    pub parameters: BTreeMap<String, String>,
    /// Mutable parameters (`mutableParameters`): given at creation and
    /// applied with ControllerModifyVolume when they change.
    pub mutable_parameters: BTreeMap<String, String>,
    pub target: PathBuf,
    pub read_only: bool,
    pub snapshots: Option<Schedule>,
}

/// Why a volumes file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}", .line.map(|l| format!("line {l}{}: ", .column.map(|c| format!(", column {c}")).unwrap_or_default())).unwrap_or_default(), .volume.as_ref().map(|v| format!("volume {v}: ")).unwrap_or_default(), .message)]
pub struct SpecError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The volume the error is in, when known.
    pub volume: Option<String>,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    volumes: Vec<RawVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawVolume {
    name: Name,
    size: Size,
    #[serde(default)]
    mode: VolumeMode,
    fs: Option<String>,
    #[serde(default)]
    access_mode: AccessMode,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
    #[serde(default)]
    mutable_parameters: BTreeMap<String, String>,
    target: Target,
    #[serde(default)]
    read_only: bool,
    snapshots: Option<RawSchedule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    every: Every,
    keep: Keep,
}

/// Values validated while they are read, so that an error carries the
/// position of the offending value.
#[derive(Debug)]
struct Name(String);
#[derive(Debug)]
struct Size(i64);
#[derive(Debug)]
struct Target(PathBuf);
#[derive(Debug)]
struct Every(u64);
#[derive(Debug)]
struct Keep(u32);

/// Reads a string and validates it inside the visitor, where the
/// deserializer still knows the value's position (an error raised after
/// `String::deserialize` returns is placed at the enclosing mapping).
fn from_str<'de, D, T>(
    d: D,
    what: &'static str,
    check: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<F>(&'static str, F);
    impl<T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'_> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(what, check))
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d, "a volume name", |s| {
            check_name(s)?;
            Ok(Name(s.to_owned()))
        })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than an untagged enum: buffering would lose the
        // value's position in errors.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as 10Gi or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                self.visit_str(&n.to_string())
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d, "an absolute path", |s| {
            check_target(s)?;
            Ok(Target(PathBuf::from(s)))
        })
    }
}

impl<'de> Deserialize<'de> for Every {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str(d, "a duration such as 6h", |s| {
            parse_duration(s).map(Every).map_err(|e| e.to_string())
        })
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Keep;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number of snapshots, at least 1")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Keep, E> {
                match u32::try_from(n) {
                    Ok(0) => Err(E::custom(
                        "keep must be at least 1 (remove `snapshots` to take none)",
                    )),
                    Ok(n) => Ok(Keep(n)),
                    Err(_) => Err(E::custom("keep is too large")),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Keep, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom("keep must be at least 1")),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Checks a volume name: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn check_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok_inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let ok_end = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = (1..=63).contains(&b.len())
        && b.iter().all(ok_inner)
        && b.first().is_some_and(ok_end)
        && b.last().is_some_and(ok_end);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "name {s:?}: expected 1 to 63 lower-case letters, digits and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// Checks a target: absolute and clean (no `.`, `..`, repeated or trailing
/// slashes), and not `/` itself.
pub fn check_target(s: &str) -> Result<(), String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!("target {s:?}: must be an absolute path"));
    }
    let clean = p
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let rebuilt: PathBuf = p.components().collect();
    if !clean || rebuilt.as_os_str() != p.as_os_str() || s.contains('\0') {
        return Err(format!(
            "target {s:?}: must be a clean path (no '.', '..', repeated or trailing '/')"
        ));
    }
    if p.parent().is_none() {
        return Err(format!("target {s:?}: cannot be the root directory"));
    }
    Ok(())
}

impl VolumesFile {
    /// Parses and validates a volumes file's text.
    pub fn parse(text: &str) -> Result<VolumesFile, SpecError> {
        let raw: RawFile = serde_norway::from_str(text).map_err(|e| {
            let loc = e.location();
            let line = loc.as_ref().map(|l| l.line());
            SpecError {
                line,
                column: loc.as_ref().map(|l| l.column()),
                volume: line.and_then(|l| volume_at_line(text, l)),
                message: strip_location(&e.to_string()),
            }
        })?;
        let mut seen = HashSet::new();
        let mut volumes = Vec::with_capacity(raw.volumes.len());
        for v in raw.volumes {
            let name = v.name.0;
            let err = |message: String| SpecError {
                line: name_line(text, &name),
                column: None,
                volume: Some(name.clone()),
                message,
            };
            if !seen.insert(name.clone()) {
                return Err(err("the name appears more than once in the file".into()));
            }
            let fs = match (v.mode, v.fs) {
                (VolumeMode::Block, Some(_)) => {
                    return Err(err("fs applies to mount volumes only, not block".into()));
                }
                (_, Some(fs)) if fs.is_empty() => {
                    return Err(err(
                        "fs is empty (leave it out for the plugin's default)".into()
                    ));
                }
                (_, fs) => fs.unwrap_or_default(),
            };
            volumes.push(VolumeSpec {
                name,
                size_bytes: v.size.0,
                mode: v.mode,
                fs,
                access_mode: v.access_mode,
                parameters: v.parameters,
                mutable_parameters: v.mutable_parameters,
                target: v.target.0,
                read_only: v.read_only,
                snapshots: v.snapshots.map(|s| Schedule {
                    every_secs: s.every.0,
                    keep: s.keep.0,
                }),
            });
        }
        // A target inside another's would be published into that volume's
        // filesystem (or device node), and hidden or orphaned depending on
        // the order the two are mounted in.
        for (i, v) in volumes.iter().enumerate() {
            for other in &volumes[..i] {
                let message = if v.target == other.target {
                    format!("target {} is used by another volume", v.target.display())
                } else if v.target.starts_with(&other.target) || other.target.starts_with(&v.target)
                {
                    format!(
                        "target {} and volume {}'s target {} are nested (one inside the other)",
                        v.target.display(),
                        other.name,
                        other.target.display()
                    )
                } else {
                    continue;
                };
                return Err(SpecError {
                    line: name_line(text, &v.name),
                    column: None,
                    volume: Some(v.name.clone()),
                    message,
                });
            }
        }
        Ok(VolumesFile { volumes })
    }

    /// Reads and parses a volumes file.
    pub fn load(path: &Path) -> Result<VolumesFile, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            line: None,
            column: None,
            volume: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        VolumesFile::parse(&text)
    }
}

/// The message without serde_norway's trailing ` at line L column C`,
/// which [`SpecError`] prints first instead.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i)
            if msg[i + 9..]
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            msg[..i].to_owned()
        }
        _ => msg.to_owned(),
    }
}

/// The value of a `name:` key on a line (`- name: x` or `name: x`).
fn name_on(line: &str) -> Option<&str> {
    let t = line.trim_start().trim_start_matches('-').trim_start();
    let v = t.strip_prefix("name:")?;
    let v = v.split('#').next().unwrap_or("").trim();
    Some(v.trim_matches(|c| c == '"' || c == '\''))
}

/// The (1-based) line of the last `name:` of `name`, for errors found
/// after parsing (a duplicate is reported where it repeats).
fn name_line(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| name_on(l) == Some(name))
        .map(|(i, _)| i + 1)
        .last()
}

/// The volume whose entry holds `line`: the nearest `name:` at or above it
/// in the same list item, else the next one below before the item ends.
fn volume_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let idx = line.checked_sub(1)?;
    let starts_item = |l: &str| l.trim_start().starts_with('-');
    for i in (0..=idx.min(lines.len().saturating_sub(1))).rev() {
        if let Some(n) = name_on(lines[i]) {
            return Some(n.to_owned());
        }
        if starts_item(lines[i]) {
            break;
        }
    }
    for l in lines.iter().skip(idx + 1) {
        if starts_item(l) {
            break;
        }
        if let Some(n) = name_on(l) {
            return Some(n.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
volumes:
  - name: pgdata            # comment
    size: 10Gi
    mode: mount
    fs: ext4
    accessMode: rwo
    parameters:
      backend: block
    target: /srv/pgdata
    readOnly: false
    snapshots:
      every: 6h
      keep: 8
  - name: raw
    size: 1048576
    mode: block
    target: /srv/raw
";

    #[test]
    fn a_full_file_parses_with_defaults() {
        let f = VolumesFile::parse(GOOD).unwrap();
        assert_eq!(f.volumes.len(), 2);
        let pg = &f.volumes[0];
        assert_eq!(pg.name, "pgdata");
        assert_eq!(pg.size_bytes, 10 << 30);
        assert_eq!(pg.fs, "ext4");
        assert_eq!(pg.parameters.get("backend").unwrap(), "block");
        assert_eq!(pg.target, PathBuf::from("/srv/pgdata"));
        assert_eq!(
            pg.snapshots,
            Some(Schedule {
                every_secs: 21_600,
                keep: 8
            })
        );
        let raw = &f.volumes[1];
        assert_eq!(raw.mode, VolumeMode::Block);
        assert_eq!(raw.size_bytes, 1 << 20);
        assert_eq!(raw.access_mode, AccessMode::Rwo);
        assert_eq!(raw.fs, "");
        assert!(!raw.read_only);
        assert!(raw.snapshots.is_none());
        assert_eq!(VolumesFile::parse("volumes: []\n").unwrap().volumes, vec![]);
    }

    #[track_caller]
    fn refused(text: &str) -> SpecError {
        match VolumesFile::parse(text) {
            Ok(f) => panic!("accepted: {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line_and_volume() {
        let e = refused("volumes:\n  - name: a\n    size: 1Gi\n    sise: 2Gi\n    target: /a\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.volume.as_deref(), Some("a"), "{e}");
        assert!(e.message.contains("sise"), "{e}");
        assert!(e.to_string().starts_with("line 4, column "), "{e}");
        let e = refused("volume: []\n");
        assert!(e.message.contains("volume"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_where_they_are() {
        let cases = [
            (
                "  - name: Bad_Name\n    size: 1Gi\n    target: /a\n",
                2,
                "name",
            ),
            ("  - name: a\n    size: 1GB\n    target: /a\n", 3, "size"),
            (
                "  - name: a\n    size: 0\n    target: /a\n",
                3,
                "greater than zero",
            ),
            (
                "  - name: a\n    size: 1Gi\n    target: rel/a\n",
                4,
                "absolute",
            ),
            (
                "  - name: a\n    size: 1Gi\n    target: /a/../b\n",
                4,
                "clean",
            ),
            ("  - name: a\n    size: 1Gi\n    target: /a/\n", 4, "clean"),
            (
                "  - name: a\n    size: 1Gi\n    target: /a\n    mode: tape\n",
                5,
                "tape",
            ),
            (
                "  - name: a\n    size: 1Gi\n    target: /a\n    accessMode: rw\n",
                5,
                "rw",
            ),
            (
                "  - name: a\n    size: 1Gi\n    target: /a\n    snapshots:\n      every: 0s\n      keep: 1\n",
                6,
                "at least 1s",
            ),
            (
                "  - name: a\n    size: 1Gi\n    target: /a\n    snapshots:\n      every: 1h\n      keep: 0\n",
                7,
                "at least 1",
            ),
        ];
        for (body, line, needle) in cases {
            let e = refused(&format!("volumes:\n{body}"));
            assert_eq!(e.line, Some(line), "{body}: {e}");
            assert!(e.message.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn cross_field_errors_name_the_volume() {
        let e = refused(
            "volumes:\n  - name: a\n    size: 1Gi\n    target: /a\n  - name: a\n    size: 1Gi\n    target: /b\n",
        );
        assert_eq!((e.line, e.volume.as_deref()), (Some(5), Some("a")), "{e}");
        assert!(e.message.contains("more than once"), "{e}");
        let e = refused(
            "volumes:\n  - name: b\n    size: 1Gi\n    mode: block\n    fs: xfs\n    target: /b\n",
        );
        assert_eq!(e.volume.as_deref(), Some("b"));
        assert!(e.message.contains("mount volumes only"), "{e}");
        let e = refused(
            "volumes:\n  - name: a\n    size: 1Gi\n    target: /t\n  - name: b\n    size: 1Gi\n    target: /t\n",
        );
        assert!(e.message.contains("used by another volume"), "{e}");
    }

    /// A target inside another volume's target is refused, in either order;
    /// a sibling that merely shares a name prefix is not nested.
    #[test]
    fn a_target_inside_another_volumes_target_is_refused() {
        let two = |ta: &str, tb: &str| {
            format!(
                "volumes:\n  - name: a\n    size: 1Gi\n    target: {ta}\n  \
                 - name: b\n    size: 1Gi\n    target: {tb}\n"
            )
        };
        for (ta, tb) in [("/srv/a", "/srv/a/b"), ("/srv/a/b", "/srv/a")] {
            let e = refused(&two(ta, tb));
            assert_eq!((e.line, e.volume.as_deref()), (Some(5), Some("b")), "{e}");
            assert!(e.message.contains("nested"), "{e}");
        }
        assert!(VolumesFile::parse(&two("/srv/a", "/srv/ab")).is_ok());
    }

    #[test]
    fn names_follow_the_dns_label_grammar() {
        for ok in ["a", "pgdata", "a-1", "0", &"x".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
