//! The mount table, read from `/proc/self/mountinfo`. Parsing is a pure
//! function over text (tested on captured fixtures); reading the file is the
//! only I/O here.

use std::path::{Path, PathBuf};

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the source filesystem that is mounted here (not
    /// `/` for bind mounts of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// The mount point's dentry was unlinked (the kernel appends " (deleted)").
    pub deleted: bool,
    pub mount_options: String,
    /// Optional fields such as `shared:1`, `master:2`, `unbindable`.
    pub optional_fields: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

/// How mounts made under a mount point propagate to other namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Shared,
    Slave,
    SharedAndSlave,
    Private,
    Unbindable,
}

impl MountEntry {
    /// Propagation type from the optional fields.
    pub fn propagation(&self) -> Propagation {
        let shared = self
            .optional_fields
            .iter()
            .any(|f| f.starts_with("shared:"));
        let slave = self
            .optional_fields
            .iter()
            .any(|f| f.starts_with("master:"));
        let unbindable = self.optional_fields.iter().any(|f| f == "unbindable");
        match (shared, slave, unbindable) {
            (true, true, _) => Propagation::SharedAndSlave,
            (true, false, _) => Propagation::Shared,
            (false, true, _) => Propagation::Slave,
            (false, false, true) => Propagation::Unbindable,
            (false, false, false) => Propagation::Private,
        }
    }

    /// The peer group this mount shares propagation with (`shared:N`).
    pub fn peer_group(&self) -> Option<u32> {
        self.optional_fields
            .iter()
            .find_map(|f| f.strip_prefix("shared:"))
            .and_then(|n| n.parse().ok())
    }

    /// The peer group this mount receives propagation from (`master:N`).
    pub fn master(&self) -> Option<u32> {
        self.optional_fields
            .iter()
            .find_map(|f| f.strip_prefix("master:"))
            .and_then(|n| n.parse().ok())
    }

    /// Whether the per-mount options include `ro`.
    pub fn is_read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }

    /// The device number (`st_dev`) of the mounted filesystem.
    pub fn dev(&self) -> u64 {
        nix::sys::stat::makedev(u64::from(self.major), u64::from(self.minor))
    }
}

/// A malformed mountinfo line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
}

/// Reading the mount table failed.
#[derive(Debug, thiserror::Error)]
pub enum MountTableError {
    #[error("read /proc/self/mountinfo: {0}")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash). Invalid escapes are kept literally.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && oct.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = u32::from(oct[0] - b'0') * 64
                + u32::from(oct[1] - b'0') * 8
                + u32::from(oct[2] - b'0');
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str, lineno: usize) -> Result<MountEntry, ParseError> {
    let err = |reason| ParseError {
        line: lineno,
        reason,
    };
    let mut fields = line.split(' ');
    let mut next = |reason| fields.next().filter(|f| !f.is_empty()).ok_or(err(reason));
    let mount_id = next("missing mount id")?
        .parse()
        .map_err(|_| err("bad mount id"))?;
    let parent_id = next("missing parent id")?
        .parse()
        .map_err(|_| err("bad parent id"))?;
    let devno = next("missing major:minor")?;
    let (major, minor) = devno.split_once(':').ok_or(err("bad major:minor"))?;
    let major = major.parse().map_err(|_| err("bad major"))?;
    let minor = minor.parse().map_err(|_| err("bad minor"))?;
    let root = PathBuf::from(unescape(next("missing root")?));
    let mut mount_point = unescape(next("missing mount point")?);
    let deleted = mount_point.ends_with(" (deleted)") && mount_point.len() > " (deleted)".len();
    if deleted {
        mount_point.truncate(mount_point.len() - " (deleted)".len());
    }
    let mount_options = next("missing mount options")?.to_owned();
    let mut optional_fields = Vec::new();
    loop {
        let f = next("missing separator")?;
        if f == "-" {
            break;
        }
        optional_fields.push(f.to_owned());
    }
    let fs_type = unescape(next("missing fs type")?);
    let source = unescape(next("missing source")?);
    let super_options = next("missing super options")?.to_owned();
    Ok(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point: PathBuf::from(mount_point),
        deleted,
        mount_options,
        optional_fields,
        fs_type,
        source,
        super_options,
    })
}

/// Parses the whole text of a mountinfo file. Blank lines are ignored.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l, i + 1))
        .collect()
}

/// `path` without trailing slashes (`/` stays `/`).
fn trim_slashes(mut p: &[u8]) -> &[u8] {
    while p.len() > 1 && p.ends_with(b"/") {
        p = &p[..p.len() - 1];
    }
    p
}

/// A snapshot of the calling process's mount table.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    pub entries: Vec<MountEntry>,
}

impl MountTable {
    /// Reads `/proc/self/mountinfo`.
    pub fn read() -> Result<Self, MountTableError> {
        // The kernel does not escape non-UTF-8 bytes; read lossily so one
        // odd mount point cannot hide the whole table (such an entry simply
        // matches no path of ours).
        let bytes = std::fs::read("/proc/self/mountinfo").map_err(MountTableError::Read)?;
        Ok(Self {
            entries: parse(&String::from_utf8_lossy(&bytes))?,
        })
    }

    /// Builds a table from already parsed entries (tests, fixtures).
    pub fn from_text(text: &str) -> Result<Self, ParseError> {
        Ok(Self {
            entries: parse(text)?,
        })
    }

    /// The topmost mount whose mount point is exactly `path`, if any.
    pub fn mounted_at(&self, path: &Path) -> Option<&MountEntry> {
        // Byte comparison: mount points from the kernel and request paths
        // (checked_path) are both canonical, and this is ~30x faster than
        // component-wise Path equality on large tables.
        let p = trim_slashes(path.as_os_str().as_encoded_bytes());
        self.entries
            .iter()
            .rev()
            .find(|e| e.mount_point.as_os_str().as_encoded_bytes() == p && !e.deleted)
    }

    /// Every mount whose mount point is exactly `path` (stacked mounts).
    pub fn all_at<'a>(&'a self, path: &'a Path) -> impl Iterator<Item = &'a MountEntry> + 'a {
        let p = trim_slashes(path.as_os_str().as_encoded_bytes());
        self.entries
            .iter()
            .filter(move |e| e.mount_point.as_os_str().as_encoded_bytes() == p)
    }

    /// The mount that contains `path` (longest mount-point prefix; the last
    /// one listed wins when mounts are stacked).
    pub fn containing(&self, path: &Path) -> Option<&MountEntry> {
        self.entries
            .iter()
            .filter(|e| !e.deleted && path.starts_with(&e.mount_point))
            .fold(None, |best: Option<&MountEntry>, e| match best {
                Some(b) if b.mount_point.as_os_str().len() > e.mount_point.as_os_str().len() => {
                    Some(b)
                }
                _ => Some(e),
            })
    }

    /// The mount with id `id`, if it is still mounted.
    pub fn by_id(&self, id: u32) -> Option<&MountEntry> {
        self.entries.iter().find(|e| e.mount_id == id)
    }

    /// Where `path` lives: the device of the mount containing it and its
    /// path relative to that filesystem's root (what a bind mount of it
    /// shows as `root`). `path` must be canonical.
    pub fn source_of(&self, path: &Path) -> Option<(u64, PathBuf)> {
        let m = self.containing(path)?;
        let rel = path.strip_prefix(&m.mount_point).ok()?;
        let root = if rel.as_os_str().is_empty() {
            m.root.clone()
        } else {
            m.root.join(rel)
        };
        Some((m.dev(), root))
    }

    /// Every mount that shows the file or directory at `path` (canonical)
    /// or something below it: bind mounts of it, wherever they are (and
    /// the mount whose root `path` is, if it is one).
    pub fn mounts_showing<'a>(&'a self, path: &Path) -> Vec<&'a MountEntry> {
        let Some((dev, root)) = self.source_of(path) else {
            return Vec::new();
        };
        self.entries
            .iter()
            .filter(|e| e.dev() == dev && e.root.starts_with(&root))
            .collect()
    }

    /// Whether `copy` is a copy of `original` that mount propagation made:
    /// the same filesystem directory, mounted at the same place under a
    /// parent mount that is a peer or slave of `original`'s parent. (A
    /// bind of a shared mount joins its peer group too, so the peer group
    /// alone cannot tell a propagated copy from another bind.)
    pub fn propagated_copy(&self, copy: &MountEntry, original: &MountEntry) -> bool {
        let (Some(p), Some(pc)) = (self.by_id(original.parent_id), self.by_id(copy.parent_id))
        else {
            return false;
        };
        let Some(group) = p.peer_group() else {
            return false;
        };
        let place = |m: &MountEntry, parent: &MountEntry| {
            m.mount_point
                .strip_prefix(&parent.mount_point)
                .ok()
                .map(|rel| (parent.dev(), parent.root.join(rel)))
        };
        copy.mount_id != original.mount_id
            && copy.dev() == original.dev()
            && copy.root == original.root
            && (pc.peer_group() == Some(group) || pc.master() == Some(group))
            && place(copy, pc).is_some()
            && place(copy, pc) == place(original, p)
    }

    /// Every mount of the filesystem on device `dev` (st_dev numbering).
    pub fn of_device(&self, dev: u64) -> impl Iterator<Item = &MountEntry> + '_ {
        self.entries.iter().filter(move |e| e.dev() == dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/var/lib/kubelet` bind-mounted (a peer) at `/data/kubelet`; a
    /// staging mount under it, its propagated copy, and a bind of it.
    const PEERS: &str = "\
27 1 259:1 / / rw shared:1 - ext4 /dev/root rw
60 27 259:1 /var/lib/kubelet /data/kubelet rw shared:1 - ext4 /dev/root rw
70 27 7:3 / /var/lib/kubelet/plugins/x/globalmount rw shared:80 - ext4 /dev/loop3 rw
71 60 7:3 / /data/kubelet/plugins/x/globalmount rw shared:80 - ext4 /dev/loop3 rw
72 27 7:3 / /var/lib/kubelet/pods/p/mount rw shared:80 - ext4 /dev/loop3 rw
73 27 259:1 /srv/vol /var/lib/kubelet/pods/q/mount rw shared:1 - ext4 /dev/root rw
";

    #[test]
    fn propagated_copies_are_told_from_other_binds() {
        let t = MountTable::from_text(PEERS).unwrap();
        let e = |id| t.by_id(id).unwrap();
        assert!(t.propagated_copy(e(71), e(70)));
        // A bind of the shared staging mount joins its peer group, but it
        // is not a copy.
        assert_eq!(e(72).peer_group(), e(70).peer_group());
        assert!(!t.propagated_copy(e(72), e(70)));
        assert!(!t.propagated_copy(e(70), e(70)));
        assert!(!t.propagated_copy(e(73), e(70)));
    }

    #[test]
    fn mounts_showing_a_directory_are_its_binds() {
        let t = MountTable::from_text(PEERS).unwrap();
        let ids = |p: &str| -> Vec<u32> {
            t.mounts_showing(Path::new(p))
                .iter()
                .map(|e| e.mount_id)
                .collect()
        };
        assert_eq!(ids("/srv/vol"), [73]);
        assert_eq!(ids("/srv"), [73]);
        assert!(ids("/srv/other").is_empty());
        assert_eq!(
            t.source_of(Path::new("/data/kubelet/a")),
            Some((e_dev(259, 1), PathBuf::from("/var/lib/kubelet/a")))
        );
    }

    fn e_dev(major: u64, minor: u64) -> u64 {
        nix::sys::stat::makedev(major, minor)
    }
}
