//! Micro-benchmarks (divan) of the pure code on the hot paths of every RPC:
//! mountinfo parsing on a 5 000-entry table as a busy Kubernetes node has it
//! (bind mounts, `\040`-escaped paths, loop devices, shared/master peer
//! groups, overlay roots), lookups in that table, volume-ID and parameter
//! parsing, and request-path validation.
//!
//! Run: `cargo bench --bench micro` (no root needed; pure functions only).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::LazyLock;

use divan::{Bencher, black_box};
use stowage::os::mountinfo::{self, MountTable};
use stowage::volume::VolumeId;
use stowage::volume::params::Parameters;
use stowage::volume::paths::checked_path;

fn main() {
    divan::main();
}

/// Entries in the generated table.
const ENTRIES: usize = 5_000;

/// A deterministic pseudo-random hex string (xorshift), so the text is the
/// same in every run.
fn hex(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::with_capacity(len);
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let _ = write!(s, "{:016x}", x);
    }
    s.truncate(len);
    s
}

fn uuid_dashed(seed: u64) -> String {
    let h = hex(seed, 32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A mountinfo text of `n` lines shaped like a Kubernetes node running
/// stowage: system mounts first, then per-pod overlay roots, projected
/// tmpfs volumes, CSI staging mounts of loop devices, publish bind mounts
/// (shared and slave peer groups), and some mount points with escaped
/// spaces, tabs and backslashes.
fn generate_mountinfo(n: usize) -> String {
    let mut t = String::with_capacity(n * 200);
    let system = [
        "1 0 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,discard,errors=remount-ro",
        "2 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw",
        "3 1 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:3 - proc proc rw",
        "4 1 0:5 / /dev rw,nosuid,relatime shared:4 - devtmpfs udev rw,size=12228132k,nr_inodes=3057033,mode=755,inode64",
        "5 4 0:24 / /dev/pts rw,nosuid,noexec,relatime shared:5 - devpts devpts rw,gid=5,mode=620,ptmxmode=000",
        "6 1 0:25 / /run rw,nosuid,nodev,noexec,relatime shared:6 - tmpfs tmpfs rw,size=2450336k,mode=755,inode64",
        "7 2 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:7 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot",
        "8 1 254:2 / /var/lib/kubelet rw,relatime shared:8 - xfs /dev/vdb rw,attr2,inode64,logbufs=8,logbsize=32k,noquota",
    ];
    for l in system {
        t.push_str(l);
        t.push('\n');
    }
    let mut id = 100u32;
    let mut i = 0u64;
    while (id as usize - 100 + system.len()) < n {
        let pod = uuid_dashed(i);
        let pvc = uuid_dashed(i + 1_000_000);
        let vol = hex(i + 2_000_000, 64);
        let ctr = hex(i + 3_000_000, 64);
        let loopn = i % 256;
        let group = 100 + i;
        let lines = [
            // Staging mount of a block volume: ext4 on a loop device.
            format!(
                "{id} 8 7:{loopn} / /var/lib/kubelet/plugins/kubernetes.io/csi/stowage.csi.dev/{vol}/globalmount rw,relatime shared:{group} - ext4 /dev/loop{loopn} rw"
            ),
            // Its publication: a bind mount into the pod, same peer group.
            format!(
                "{} 8 7:{loopn} / /var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~csi/pvc-{pvc}/mount rw,relatime shared:{group} - ext4 /dev/loop{loopn} rw",
                id + 1
            ),
            // A dir volume: a bind mount of a subdirectory of the pool, as
            // seen from a slave namespace.
            format!(
                "{} 8 254:2 /stowage/pool/volumes/dir/{} /var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~csi/pvc-{}/mount rw,relatime master:8 - xfs /dev/vdb rw,attr2,inode64,logbufs=8,logbsize=32k,noquota",
                id + 2,
                hex(i + 4_000_000, 32),
                uuid_dashed(i + 5_000_000)
            ),
            // A projected service-account token.
            format!(
                "{} 8 0:{} / /var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~projected/kube-api-access-{} rw,relatime shared:{} - tmpfs tmpfs rw,size=61440k,inode64,noswap",
                id + 3,
                300 + i % 500,
                &hex(i + 6_000_000, 5),
                group + 10_000
            ),
            // A container root: overlay with long super options.
            format!(
                "{} 6 0:{} / /run/containerd/io.containerd.runtime.v2.task/k8s.io/{ctr}/rootfs rw,relatime shared:{} - overlay overlay rw,lowerdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{}/fs:/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{}/fs,upperdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{}/fs,workdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{}/work,index=off",
                id + 4,
                800 + i % 500,
                group + 20_000,
                i * 4 + 1,
                i * 4 + 2,
                i * 4 + 3,
                i * 4 + 3
            ),
            // Escaped names: a space, a tab and a backslash, plus a
            // mount point whose dentry was deleted.
            format!(
                "{} 8 254:2 /exports/team\\040{i} /srv/shared\\040data/{i}\\011x\\134y rw,nosuid,nodev,relatime shared:{} master:8 - xfs /dev/vdb rw,attr2,inode64,noquota",
                id + 5,
                group + 30_000
            ),
            format!(
                "{} 8 254:2 /old/{i} /mnt/stale-{i}\\040(deleted) rw,relatime - xfs /dev/vdb rw,attr2,inode64,noquota",
                id + 6
            ),
        ];
        for l in lines {
            if id as usize - 100 + system.len() >= n {
                break;
            }
            t.push_str(&l);
            t.push('\n');
            id += 1;
        }
        i += 1;
    }
    t
}

static TEXT: LazyLock<String> = LazyLock::new(|| generate_mountinfo(ENTRIES));
static TABLE: LazyLock<MountTable> = LazyLock::new(|| {
    let t = MountTable::from_text(&TEXT).expect("generated mountinfo parses");
    assert_eq!(t.entries.len(), ENTRIES);
    // The mix the generator promises: deleted mount points, escaped names,
    // loop devices, and entries in two peer groups at once.
    assert!(t.entries.iter().any(|e| e.deleted));
    assert!(
        t.entries
            .iter()
            .any(|e| e.mount_point.to_string_lossy().contains(" data"))
    );
    assert!(t.entries.iter().any(|e| e.source.starts_with("/dev/loop")));
    assert!(t.entries.iter().any(|e| e.optional_fields.len() == 2));
    t
});

/// Mount points to look up: the last entry (best case for the reverse scan
/// of `mounted_at`), the first kubelet mount (worst case), and a path that
/// is not mounted (a full scan).
fn lookup_paths() -> [(&'static str, PathBuf); 3] {
    let last = TABLE.entries.last().unwrap().mount_point.clone();
    let first = TABLE.entries[8].mount_point.clone();
    let missing = PathBuf::from(
        "/var/lib/kubelet/pods/00000000-0000-0000-0000-000000000000/volumes/kubernetes.io~csi/pvc-x/mount",
    );
    [("last", last), ("first", first), ("missing", missing)]
}

#[divan::bench_group(name = "mountinfo")]
mod mountinfo_benches {
    use super::*;

    /// Parse 5 000 lines (≈ 1 MiB of text).
    #[divan::bench]
    fn parse_5000(bencher: Bencher) {
        let text: &str = &TEXT;
        bencher
            .counter(divan::counter::BytesCount::of_str(text))
            .bench(|| mountinfo::parse(black_box(text)).unwrap());
    }

    #[divan::bench(args = ["last", "first", "missing"])]
    fn mounted_at(bencher: Bencher, which: &str) {
        let table: &MountTable = &TABLE;
        let paths = lookup_paths();
        let p = &paths.iter().find(|(n, _)| *n == which).unwrap().1;
        bencher.bench(|| table.mounted_at(black_box(p.as_path())).is_some());
    }

    /// Reference point, not stowage code: the same reverse scan comparing
    /// the raw bytes of the mount points instead of `Path` components.
    #[divan::bench(args = ["first", "missing"])]
    fn mounted_at_bytes_reference(bencher: Bencher, which: &str) {
        let table: &MountTable = &TABLE;
        let paths = lookup_paths();
        let p = &paths.iter().find(|(n, _)| *n == which).unwrap().1;
        bencher.bench(|| {
            let p = black_box(p.as_path()).as_os_str();
            table
                .entries
                .iter()
                .rev()
                .find(|e| e.mount_point.as_os_str() == p && !e.deleted)
                .is_some()
        });
    }

    /// The mount containing a file two levels below a publish target, and
    /// a path only `/` contains.
    #[divan::bench(args = ["under-last", "under-root"])]
    fn containing(bencher: Bencher, which: &str) {
        let table: &MountTable = &TABLE;
        let p = match which {
            "under-last" => table.entries[table.entries.len() - 6]
                .mount_point
                .join("a/b"),
            _ => PathBuf::from("/home/user/file"),
        };
        bencher.bench(|| table.containing(black_box(p.as_path())).map(|e| e.mount_id));
    }
}

/// A labelled input, so the report shows a short name instead of the input.
#[derive(Debug, Clone, Copy)]
struct Case {
    label: &'static str,
    input: &'static str,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label)
    }
}

const fn case(label: &'static str, input: &'static str) -> Case {
    Case { label, input }
}

#[divan::bench_group(name = "volume_id")]
mod volume_id_benches {
    use super::*;

    const VALID: &[Case] = &[
        case(
            "short-node",
            "block:node-1:0123456789abcdef0123456789abcdef",
        ),
        case(
            "fqdn-node",
            "dir:ip-10-0-12-34.eu-west-1.compute.internal:fedcba9876543210fedcba9876543210",
        ),
    ];

    const INVALID: &[Case] = &[
        case("empty", ""),
        case(
            "unknown-backend",
            "tape:node-1:0123456789abcdef0123456789abcdef",
        ),
        case(
            "uppercase-hex",
            "block:node-1:0123456789ABCDEF0123456789ABCDEF",
        ),
        case(
            "extra-part",
            "block:node-1:0123456789abcdef0123456789abcdef:extra",
        ),
        case("bad-node", "block:-node:0123456789abcdef0123456789abcdef"),
        case("traversal", "block:node-1:../../../../etc/passwd"),
    ];

    #[divan::bench(args = VALID)]
    fn valid(c: &Case) -> Option<VolumeId> {
        VolumeId::parse(black_box(c.input))
    }

    #[divan::bench(args = INVALID)]
    fn invalid(c: &Case) -> Option<VolumeId> {
        VolumeId::parse(black_box(c.input))
    }

    /// Over the 128-byte limit: rejected before any splitting.
    #[divan::bench]
    fn too_long(bencher: Bencher) {
        let id = format!("block:{}:0123456789abcdef0123456789abcdef", "n".repeat(200));
        bencher.bench(|| VolumeId::parse(black_box(&id)));
    }
}

#[divan::bench_group(name = "parameters")]
mod parameter_benches {
    use super::*;

    /// What the Kubernetes external-provisioner sends with
    /// `--extra-create-metadata`: the backend plus three metadata keys.
    fn typical() -> BTreeMap<String, String> {
        [
            ("backend", "block"),
            ("csi.storage.k8s.io/pvc/name", "data-postgres-0"),
            ("csi.storage.k8s.io/pvc/namespace", "databases"),
            (
                "csi.storage.k8s.io/pv/name",
                "pvc-6f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[divan::bench]
    fn parse_typical(bencher: Bencher) {
        let m = typical();
        bencher.bench(|| Parameters::parse(black_box(&m)));
    }

    /// An unknown key: the error message lists the known keys.
    #[divan::bench]
    fn parse_unknown_key(bencher: Bencher) {
        let mut m = typical();
        m.insert("replicas".into(), "3".into());
        bencher.bench(|| Parameters::parse(black_box(&m)));
    }
}

#[divan::bench_group(name = "checked_path")]
mod path_benches {
    use super::*;

    const VALID: &[Case] = &[
        case(
            "kubelet-publish",
            "/var/lib/kubelet/pods/6f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b/volumes/kubernetes.io~csi/pvc-0c1d2e3f-4a5b-6978-8a9b-6f1c2d3e4b5a/mount",
        ),
        case(
            "kubelet-staging",
            "/var/lib/kubelet/plugins/kubernetes.io/csi/stowage.csi.dev/4f0c9a1e8d2b7c6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a/globalmount",
        ),
    ];

    const INVALID: &[Case] = &[
        case("relative", "relative/path"),
        case("dotdot", "/var/lib/kubelet/pods/../../../etc"),
        case("double-slash", "/var/lib/kubelet//pods/x"),
        case("trailing-slash", "/var/lib/kubelet/pods/x/"),
    ];

    #[divan::bench(args = VALID)]
    fn valid(c: &Case) -> Result<PathBuf, String> {
        checked_path(black_box(c.input))
    }

    #[divan::bench(args = INVALID)]
    fn invalid(c: &Case) -> Result<PathBuf, String> {
        checked_path(black_box(c.input))
    }

    /// A path at the PATH_MAX limit of short components.
    #[divan::bench]
    fn max_len(bencher: Bencher) {
        let mut p = String::new();
        while p.len() + 2 <= stowage::volume::paths::MAX_PATH_LEN {
            p.push_str("/a");
        }
        assert!(checked_path(&p).is_ok());
        bencher.bench(|| checked_path(black_box(&p)));
    }
}

/// What sealing a replicated write's megabyte costs the data link with
/// each TLS 1.3 AEAD (ring's, which `cluster/record.rs` calls the same
/// way: 16 KiB records, sealed in place, tag apart), so the suite the link
/// prefers (AES-128-GCM) is compared with the others in one run.
#[divan::bench_group(name = "link_aead", sample_count = 50)]
mod link_aead {
    use super::*;
    use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

    const MIB: usize = 1 << 20;
    const RECORD: usize = 1 << 14;

    fn seal_mib(bencher: Bencher, alg: &'static aead::Algorithm) {
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
        let mut data = vec![0x5au8; MIB];
        let mut seq = 0u64;
        bencher
            .counter(divan::counter::BytesCount::new(MIB))
            .bench_local(|| {
                for chunk in data.chunks_mut(RECORD) {
                    let mut n = [0u8; aead::NONCE_LEN];
                    n[4..].copy_from_slice(&seq.to_be_bytes());
                    seq += 1;
                    let tag = key
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(n),
                            Aad::from([23u8, 3, 3, 0x40, 0x11]),
                            chunk,
                        )
                        .unwrap();
                    let _ = black_box(tag);
                }
            });
    }

    #[divan::bench]
    fn aes_128_gcm(bencher: Bencher) {
        seal_mib(bencher, &aead::AES_128_GCM);
    }

    #[divan::bench]
    fn aes_256_gcm(bencher: Bencher) {
        seal_mib(bencher, &aead::AES_256_GCM);
    }

    #[divan::bench]
    fn chacha20_poly1305(bencher: Bencher) {
        seal_mib(bencher, &aead::CHACHA20_POLY1305);
    }
}
