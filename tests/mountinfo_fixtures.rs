//! The mountinfo parser (`stowage::os::mountinfo`) against captured-format
//! fixtures in `tests/fixtures/mountinfo/`, plus property tests.
//!
//! Fixtures (all in the exact /proc/self/mountinfo format of proc(5)):
//! - `host_shared`: a systemd host, every mount `shared:N`, a stacked
//!   binfmt_misc mount, squashfs snaps on loop devices, a FUSE (gvfs) mount;
//! - `kubelet_node`: a Kubernetes node with stowage: bind mounts of volume
//!   subdirectories (root field not `/`), a loop-device ext4 volume (stacked
//!   staging mount), raw block publish (devtmpfs `/loop4`), containerd
//!   overlay and shm, nsfs, projected tmpfs, a `(deleted)` publish path;
//! - `escaped_paths`: `\040`, `\011`, `\012`, `\134` in mount points, roots
//!   and sources, `(deleted)` mount points, look-alikes;
//! - `container_propagation`: a node-plugin container's view: private,
//!   shared, slave, shared+slave, `propagate_from`, unbindable, FUSE
//!   (`fuse.sshfs`, `fuse.rclone`), overlay root;
//! - `truncated`: a read cut off in the middle of the last line.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use stowage::os::mountinfo::{MountEntry, MountTable, Propagation, parse, unescape};

const HOST: &str = include_str!("fixtures/mountinfo/host_shared.mountinfo");
const KUBELET: &str = include_str!("fixtures/mountinfo/kubelet_node.mountinfo");
const ESCAPED: &str = include_str!("fixtures/mountinfo/escaped_paths.mountinfo");
const CONTAINER: &str = include_str!("fixtures/mountinfo/container_propagation.mountinfo");
const TRUNCATED: &str = include_str!("fixtures/mountinfo/truncated.mountinfo");

const POD_A: &str = "/var/lib/kubelet/pods/8d2f4c6e-1b3a-4f5d-9e7c-2a6b8d0f1e3c";
const PVC_A: &str = "pvc-6f1c2c0e-4a8b-4b8e-9a55-0c7f3c1f2a11";
const STAGING_A: &str = "/var/lib/kubelet/plugins/kubernetes.io/csi/stowage.csi.example.com/0b6f7c0d3a3e5e0a2f9d8e1c4b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a/globalmount";
const STAGING_LOOP: &str = "/var/lib/kubelet/plugins/kubernetes.io/csi/stowage.csi.example.com/9e2d4f6a8b0c1d3e5f7a9b1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f1a3b5c7d9e/globalmount";
const XFS_SUPER: &str = "rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota";

/// glibc's `makedev`, written out so `MountEntry::dev` is checked against an
/// independent computation.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

fn table(text: &str) -> MountTable {
    MountTable::from_text(text).unwrap_or_else(|e| panic!("fixture must parse: {e}"))
}

fn by_id(table: &MountTable, id: u32) -> &MountEntry {
    table
        .entries
        .iter()
        .find(|e| e.mount_id == id)
        .unwrap_or_else(|| panic!("no mount id {id} in fixture"))
}

fn id_at(table: &MountTable, path: &str) -> Option<u32> {
    table.mounted_at(Path::new(path)).map(|e| e.mount_id)
}

fn id_containing(table: &MountTable, path: &str) -> Option<u32> {
    table.containing(Path::new(path)).map(|e| e.mount_id)
}

fn ids_of_device(table: &MountTable, major: u64, minor: u64) -> Vec<u32> {
    table
        .of_device(makedev(major, minor))
        .map(|e| e.mount_id)
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------- host

#[test]
fn host_every_line_parses_in_order() {
    let t = table(HOST);
    assert_eq!(t.entries.len(), HOST.lines().count());
    assert_eq!(t.entries.len(), 27);
    let ids: Vec<u32> = t.entries.iter().map(|e| e.mount_id).collect();
    assert_eq!(&ids[..6], &[22, 23, 24, 25, 26, 29]);
    assert_eq!(ids.last(), Some(&781));
}

#[test]
fn host_root_line_exact_fields() {
    let t = table(HOST);
    assert_eq!(
        by_id(&t, 29),
        &MountEntry {
            mount_id: 29,
            parent_id: 1,
            major: 259,
            minor: 2,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/"),
            deleted: false,
            mount_options: "rw,relatime".to_owned(),
            optional_fields: strings(&["shared:1"]),
            fs_type: "ext4".to_owned(),
            source: "/dev/nvme0n1p2".to_owned(),
            super_options: "rw,errors=remount-ro".to_owned(),
        }
    );
}

#[test]
fn host_devtmpfs_and_autofs_exact_fields() {
    let t = table(HOST);
    assert_eq!(
        by_id(&t, 24),
        &MountEntry {
            mount_id: 24,
            parent_id: 29,
            major: 0,
            minor: 5,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/dev"),
            deleted: false,
            mount_options: "rw,nosuid,relatime".to_owned(),
            optional_fields: strings(&["shared:2"]),
            fs_type: "devtmpfs".to_owned(),
            source: "udev".to_owned(),
            super_options: "rw,size=8119172k,nr_inodes=2029793,mode=755,inode64".to_owned(),
        }
    );
    let autofs = by_id(&t, 35);
    assert_eq!(autofs.fs_type, "autofs");
    assert_eq!(autofs.source, "systemd-1");
    assert_eq!(
        autofs.super_options,
        "rw,fd=29,pgrp=1,timeout=0,minproto=5,maxproto=5,direct,pipe_ino=17738"
    );
}

#[test]
fn host_every_mount_is_shared() {
    let t = table(HOST);
    for e in &t.entries {
        assert_eq!(e.propagation(), Propagation::Shared, "{e:?}");
        assert_eq!(e.optional_fields.len(), 1, "{e:?}");
        assert!(e.optional_fields[0].starts_with("shared:"), "{e:?}");
        assert!(!e.deleted, "{e:?}");
    }
    assert_eq!(by_id(&t, 781).optional_fields, strings(&["shared:398"]));
}

#[test]
fn host_mounted_at_prefers_topmost_stacked_mount() {
    let t = table(HOST);
    assert_eq!(id_at(&t, "/"), Some(29));
    assert_eq!(id_at(&t, "/home"), Some(66));
    assert_eq!(id_at(&t, "/boot/efi"), Some(64));
    // autofs (35) with binfmt_misc (781) mounted on top of it.
    assert_eq!(id_at(&t, "/proc/sys/fs/binfmt_misc"), Some(781));
    let stacked: Vec<u32> = t
        .all_at(Path::new("/proc/sys/fs/binfmt_misc"))
        .map(|e| e.mount_id)
        .collect();
    assert_eq!(stacked, vec![35, 781]);
    assert_eq!(id_at(&t, "/home/alice"), None);
    assert_eq!(id_at(&t, "/boot"), None);
    // Trailing slash is the same path.
    assert_eq!(id_at(&t, "/home/"), Some(66));
}

#[test]
fn host_containing_is_longest_component_prefix() {
    let t = table(HOST);
    assert_eq!(id_containing(&t, "/"), Some(29));
    assert_eq!(id_containing(&t, "/home/alice/.bashrc"), Some(66));
    assert_eq!(
        id_containing(&t, "/boot/efi/EFI/ubuntu/grubx64.efi"),
        Some(64)
    );
    assert_eq!(id_containing(&t, "/boot/grub/grub.cfg"), Some(29));
    assert_eq!(
        id_containing(&t, "/run/user/1000/gvfs/smb-share"),
        Some(415)
    );
    assert_eq!(id_containing(&t, "/run/user/1000/bus"), Some(402));
    // Component-wise: /run/user/10000 is not under /run/user/1000.
    assert_eq!(id_containing(&t, "/run/user/10000/bus"), Some(26));
    assert_eq!(id_containing(&t, "/homework"), Some(29));
    assert_eq!(id_containing(&t, "/sys/fs/cgroup/system.slice"), Some(31));
    // Stacked mounts: the last listed wins.
    assert_eq!(
        id_containing(&t, "/proc/sys/fs/binfmt_misc/status"),
        Some(781)
    );
    assert_eq!(id_containing(&t, "/proc/sys/fs/file-max"), Some(23));
}

#[test]
fn host_read_only_and_devices() {
    let t = table(HOST);
    assert!(by_id(&t, 68).is_read_only());
    assert!(by_id(&t, 70).is_read_only());
    assert!(!by_id(&t, 29).is_read_only());
    // Only the per-mount options count, not the superblock's
    // errors=remount-ro.
    assert!(by_id(&t, 64).super_options.contains("errors=remount-ro"));
    assert!(!by_id(&t, 64).is_read_only());
    assert_eq!(by_id(&t, 29).dev(), makedev(259, 2));
    assert_eq!(by_id(&t, 68).dev(), makedev(7, 0));
    assert_eq!(ids_of_device(&t, 259, 2), vec![29]);
    assert_eq!(ids_of_device(&t, 259, 3), vec![66]);
    assert_eq!(ids_of_device(&t, 7, 1), vec![70]);
    assert_eq!(ids_of_device(&t, 8, 0), Vec::<u32>::new());
    let loop0 = by_id(&t, 68);
    assert_eq!(
        (loop0.fs_type.as_str(), loop0.source.as_str()),
        ("squashfs", "/dev/loop0")
    );
    let gvfs = by_id(&t, 415);
    assert_eq!(gvfs.fs_type, "fuse.gvfsd-fuse");
    assert_eq!(gvfs.source, "gvfsd-fuse");
    assert_eq!((gvfs.major, gvfs.minor), (0, 51));
}

// ------------------------------------------------------------- kubelet

#[test]
fn kubelet_subdirectory_bind_mounts_keep_their_root() {
    let t = table(KUBELET);
    assert_eq!(t.entries.len(), 21);
    assert_eq!(
        by_id(&t, 452),
        &MountEntry {
            mount_id: 452,
            parent_id: 27,
            major: 259,
            minor: 4,
            root: PathBuf::from(format!("/volumes/{PVC_A}")),
            mount_point: PathBuf::from(STAGING_A),
            deleted: false,
            mount_options: "rw,noatime".to_owned(),
            optional_fields: strings(&["shared:52"]),
            fs_type: "xfs".to_owned(),
            source: "/dev/nvme1n1".to_owned(),
            super_options: XFS_SUPER.to_owned(),
        }
    );
    let publish = by_id(&t, 458);
    assert_eq!(publish.root, Path::new(&format!("/volumes/{PVC_A}")));
    assert_eq!(
        publish.mount_point,
        PathBuf::from(format!("{POD_A}/volumes/kubernetes.io~csi/{PVC_A}/mount"))
    );
    assert!(!publish.is_read_only());
    // A read-only bind of a deeper subdirectory (subPath-like).
    let sub = by_id(&t, 459);
    assert_eq!(
        sub.root,
        PathBuf::from(format!("/volumes/{PVC_A}/data/reports"))
    );
    assert!(sub.is_read_only());
    assert_eq!(sub.mount_options, "ro,noatime");
    // The superblock itself is still rw.
    assert_eq!(sub.super_options, XFS_SUPER);
    // The whole filesystem is mounted once with root "/".
    assert_eq!(by_id(&t, 96).root, Path::new("/"));
}

#[test]
fn kubelet_of_device_finds_every_bind_of_a_filesystem() {
    let t = table(KUBELET);
    assert_eq!(ids_of_device(&t, 259, 4), vec![96, 452, 458, 459, 490]);
    for id in [96, 452, 458, 459, 490] {
        let e = by_id(&t, id);
        assert_eq!(e.optional_fields, strings(&["shared:52"]), "{e:?}");
        assert_eq!(e.propagation(), Propagation::Shared);
    }
    assert_eq!(ids_of_device(&t, 259, 1), vec![27]);
}

#[test]
fn kubelet_loop_device_volume() {
    let t = table(KUBELET);
    assert_eq!(ids_of_device(&t, 7, 3), vec![470, 471, 476]);
    for id in [470, 471, 476] {
        let e = by_id(&t, id);
        assert_eq!(e.fs_type, "ext4");
        assert_eq!(e.source, "/dev/loop3");
        assert_eq!(e.super_options, "rw");
        assert_eq!((e.major, e.minor), (7, 3));
        assert_eq!(e.dev(), 0x0703);
    }
    // The staging path is mounted twice (stacked); 471 is on top of 470.
    assert_eq!(by_id(&t, 471).parent_id, 470);
    assert_eq!(id_at(&t, STAGING_LOOP), Some(471));
    assert_eq!(t.all_at(Path::new(STAGING_LOOP)).count(), 2);
    assert_eq!(
        id_containing(&t, &format!("{STAGING_LOOP}/lost+found")),
        Some(471)
    );
}

#[test]
fn kubelet_raw_block_publish_is_a_devtmpfs_bind() {
    let t = table(KUBELET);
    let publish = by_id(&t, 481);
    assert_eq!(publish.root, Path::new("/loop4"));
    assert_eq!(publish.fs_type, "devtmpfs");
    assert_eq!(publish.source, "devtmpfs");
    assert_eq!(
        publish.mount_point,
        Path::new(
            "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-91a3c5e7-2b4d-4f6a-8c0e-1d3f5a7b9c2e/f0e1d2c3-b4a5-4968-8776-a5b4c3d2e1f0"
        )
    );
    assert_eq!(ids_of_device(&t, 0, 5), vec![23, 480, 481]);
}

#[test]
fn kubelet_overlay_shm_nsfs_and_projected_tmpfs() {
    let t = table(KUBELET);
    let overlay = by_id(&t, 412);
    assert_eq!(overlay.fs_type, "overlay");
    assert_eq!(overlay.source, "overlay");
    assert_eq!(
        overlay.super_options,
        "rw,lowerdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs,\
         upperdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/97/fs,\
         workdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/97/work,uuid=on"
    );
    assert_eq!((overlay.major, overlay.minor), (0, 63));
    assert!(overlay.mount_point.ends_with("rootfs"));
    let shm = by_id(&t, 410);
    assert_eq!(
        (shm.fs_type.as_str(), shm.source.as_str()),
        ("tmpfs", "shm")
    );
    // nsfs roots are not paths but are kept verbatim.
    let ns = by_id(&t, 441);
    assert_eq!(ns.root, Path::new("net:[4026532571]"));
    assert_eq!(ns.mount_options, "rw");
    assert_eq!(ns.fs_type, "nsfs");
    let projected = by_id(&t, 430);
    assert_eq!(
        projected.mount_point,
        PathBuf::from(format!(
            "{POD_A}/volumes/kubernetes.io~projected/kube-api-access-8xk2p"
        ))
    );
    assert_eq!(projected.super_options, "rw,size=7340032k,inode64,noswap");
}

#[test]
fn kubelet_deleted_publish_path() {
    let t = table(KUBELET);
    let stale = by_id(&t, 490);
    let path = "/var/lib/kubelet/pods/e5d4c3b2-a190-4f8e-bd7c-6b5a49382716/volumes/kubernetes.io~csi/pvc-0a2c4e6b-8d1f-4a3c-9e5b-7d9f1b3d5f7a/mount";
    assert!(stale.deleted);
    assert_eq!(stale.mount_point, Path::new(path));
    assert_eq!(
        stale.mount_point.as_os_str().to_str(),
        Some(path),
        "the \" (deleted)\" suffix is stripped exactly"
    );
    // Not "mounted at" that path any more, but still listed there.
    assert_eq!(id_at(&t, path), None);
    let listed: Vec<u32> = t.all_at(Path::new(path)).map(|e| e.mount_id).collect();
    assert_eq!(listed, vec![490]);
    // Every other entry is live.
    assert_eq!(t.entries.iter().filter(|e| e.deleted).count(), 1);
}

#[test]
fn kubelet_containing() {
    let t = table(KUBELET);
    let publish_dir = format!("{POD_A}/volumes/kubernetes.io~csi/{PVC_A}/mount");
    assert_eq!(
        id_containing(&t, &format!("{publish_dir}/db/table.dat")),
        Some(458)
    );
    assert_eq!(id_containing(&t, &publish_dir), Some(458));
    assert_eq!(
        id_containing(&t, &format!("{POD_A}/volumes/kubernetes.io~csi")),
        Some(27)
    );
    assert_eq!(
        id_containing(&t, &format!("/var/lib/stowage/volumes/{PVC_A}/data")),
        Some(96)
    );
    assert_eq!(id_containing(&t, &format!("{STAGING_A}/x")), Some(452));
    assert_eq!(
        id_containing(&t, "/run/netns/cni-0b7e3c52-9a1d-4e6f-8b2c-3d5a7f9e1c04"),
        Some(441)
    );
    assert_eq!(id_containing(&t, "/run/netns"), Some(25));
}

// ------------------------------------------------------------- escapes

#[test]
fn escaped_mount_points_roots_and_sources() {
    let t = table(ESCAPED);
    assert_eq!(t.entries.len(), 13);
    let passport = by_id(&t, 612);
    assert_eq!(passport.mount_point, Path::new("/media/alice/My Passport"));
    assert_eq!(passport.fs_type, "exfat");
    assert_eq!(passport.source, "/dev/sdc1");
    assert_eq!(
        by_id(&t, 615),
        &MountEntry {
            mount_id: 615,
            parent_id: 24,
            major: 8,
            minor: 2,
            root: PathBuf::from("/srv/shared data/Q3\treports"),
            mount_point: PathBuf::from("/mnt/tab\tseparated"),
            deleted: false,
            mount_options: "rw,relatime".to_owned(),
            optional_fields: strings(&["shared:1"]),
            fs_type: "ext4".to_owned(),
            source: "/dev/sda2".to_owned(),
            super_options: "rw".to_owned(),
        }
    );
    let back = by_id(&t, 617);
    assert_eq!(back.root, Path::new("/srv/back\\slash"));
    assert_eq!(back.mount_point, Path::new("/mnt/back\\slash\\dir"));
    let newline = by_id(&t, 619);
    assert_eq!(newline.mount_point, Path::new("/mnt/new\nline"));
    assert_eq!(newline.source, "none");
    // "\134040" is a backslash followed by the characters 040.
    let literal = by_id(&t, 623);
    assert_eq!(literal.mount_point, Path::new("/mnt/literal\\040"));
    assert!(!literal.deleted);
    let sshfs = by_id(&t, 627);
    assert_eq!(sshfs.mount_point, Path::new("/home/alice/NAS Photos"));
    assert_eq!(sshfs.fs_type, "fuse.sshfs");
    assert_eq!(sshfs.source, "alice@nas.example.com:/volume1/Family Photos");
    assert_eq!(sshfs.super_options, "rw,user_id=1000,group_id=1000");
}

// The parser reads a trailing " (deleted)" (escaped `\040(deleted)`) on the
// mount point as the unlinked marker. Note: since Linux 2.6.36 the kernel
// adds that suffix in /proc/mounts (d_path) but not in mountinfo
// (seq_path_root -> __d_path), so on current kernels such a mountinfo line is
// a directory really named "... (deleted)"; these fixtures follow the
// parser's documented contract.
#[test]
fn escaped_deleted_mount_points() {
    let t = table(ESCAPED);
    let spaced = by_id(&t, 621);
    assert!(spaced.deleted);
    assert_eq!(
        spaced.mount_point.as_os_str().to_str(),
        Some("/tmp/stowage-test dir")
    );
    let ro = by_id(&t, 629);
    assert!(ro.deleted);
    assert!(ro.is_read_only());
    assert_eq!(ro.mount_point, Path::new("/tmp/unlinked"));
    // A directory literally named "(deleted)" is not a deleted mount point.
    let named = by_id(&t, 625);
    assert!(!named.deleted);
    assert_eq!(named.mount_point, Path::new("/mnt/(deleted)"));
    let deleted: Vec<u32> = t
        .entries
        .iter()
        .filter(|e| e.deleted)
        .map(|e| e.mount_id)
        .collect();
    assert_eq!(deleted, vec![621, 629]);
}

#[test]
fn escaped_lookups_use_unescaped_paths() {
    let t = table(ESCAPED);
    assert_eq!(id_at(&t, "/media/alice/My Passport"), Some(612));
    assert_eq!(id_at(&t, "/media/alice/My\\040Passport"), None);
    assert_eq!(id_at(&t, "/mnt/tab\tseparated"), Some(615));
    assert_eq!(id_at(&t, "/mnt/new\nline"), Some(619));
    assert_eq!(id_at(&t, "/mnt/literal\\040"), Some(623));
    assert_eq!(id_at(&t, "/mnt/(deleted)"), Some(625));
    assert_eq!(id_at(&t, "/tmp/stowage-test dir"), None);
    assert_eq!(id_at(&t, "/tmp/stowage-test dir (deleted)"), None);
    assert_eq!(
        id_containing(&t, "/media/alice/My Passport/DCIM/100CANON"),
        Some(612)
    );
    assert_eq!(id_containing(&t, "/media/alice/My"), Some(24));
    assert_eq!(
        id_containing(&t, "/home/alice/NAS Photos/2019/img.jpg"),
        Some(627)
    );
    assert_eq!(id_containing(&t, "/tmp/other"), Some(27));
    assert_eq!(ids_of_device(&t, 8, 2), vec![24, 615, 617]);
}

#[test]
fn unescape_kernel_octal_escapes() {
    assert_eq!(unescape("/a\\040b"), "/a b");
    assert_eq!(unescape("/a\\011b"), "/a\tb");
    assert_eq!(unescape("/a\\012b"), "/a\nb");
    assert_eq!(unescape("/a\\134b"), "/a\\b");
    assert_eq!(unescape("\\040\\040"), "  ");
    assert_eq!(unescape("/a\\134040"), "/a\\040");
    assert_eq!(unescape("/x\\040(deleted)"), "/x (deleted)");
    assert_eq!(unescape("caf\\303\\251"), "café");
    assert_eq!(unescape(""), "");
    assert_eq!(unescape("/plain/path"), "/plain/path");
    assert_eq!(unescape("/ünïcødé"), "/ünïcødé");
}

#[test]
fn unescape_keeps_invalid_escapes_literally() {
    // Too short, not octal, out of byte range, trailing backslash.
    assert_eq!(unescape("/a\\04"), "/a\\04");
    assert_eq!(unescape("/a\\0"), "/a\\0");
    assert_eq!(unescape("/a\\"), "/a\\");
    assert_eq!(unescape("/a\\089"), "/a\\089");
    assert_eq!(unescape("/a\\x41"), "/a\\x41");
    assert_eq!(unescape("/a\\400"), "/a\\400");
    assert_eq!(unescape("/a\\777b"), "/a\\777b");
    assert_eq!(unescape("\\\\040"), "\\ ");
}

// ----------------------------------------------------------- container

#[test]
fn container_propagation_of_each_kind() {
    let t = table(CONTAINER);
    assert_eq!(t.entries.len(), 18);
    let cases = [
        (1021, Propagation::Private, vec![]),
        (1022, Propagation::Private, vec![]),
        (1032, Propagation::Private, vec![]),
        (1030, Propagation::Shared, vec!["shared:30"]),
        (1037, Propagation::Shared, vec!["shared:420"]),
        (1031, Propagation::Slave, vec!["master:52"]),
        (1036, Propagation::Slave, vec!["master:415"]),
        (
            1034,
            Propagation::Slave,
            vec!["master:60", "propagate_from:1"],
        ),
        (
            1033,
            Propagation::SharedAndSlave,
            vec!["shared:412", "master:52"],
        ),
        (1035, Propagation::Unbindable, vec!["unbindable"]),
    ];
    for (id, propagation, fields) in cases {
        let e = by_id(&t, id);
        assert_eq!(e.optional_fields, strings(&fields), "mount {id}");
        assert_eq!(e.propagation(), propagation, "mount {id}");
    }
    // Everything else in a container is private.
    let private = t
        .entries
        .iter()
        .filter(|e| e.propagation() == Propagation::Private)
        .count();
    assert_eq!(private, 11);
}

#[test]
fn container_overlay_root_and_file_binds() {
    let t = table(CONTAINER);
    let root = by_id(&t, 1021);
    assert_eq!(root.parent_id, 998);
    assert_eq!(root.fs_type, "overlay");
    assert_eq!(root.mount_point, Path::new("/"));
    assert!(root.optional_fields.is_empty());
    assert!(root.super_options.starts_with(
        "rw,lowerdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/212/fs:"
    ));
    assert!(root.super_options.ends_with("/215/work,uuid=on"));
    let hosts = by_id(&t, 1028);
    assert_eq!(
        hosts.root,
        Path::new("/var/lib/kubelet/pods/6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d/etc-hosts")
    );
    assert_eq!(hosts.mount_point, Path::new("/etc/hosts"));
    let ro_overlay = by_id(&t, 1038);
    assert!(ro_overlay.is_read_only());
    assert_eq!(
        ro_overlay.super_options,
        "ro,lowerdir=/var/lib/stowage/layers/b:/var/lib/stowage/layers/a"
    );
    assert!(by_id(&t, 1026).is_read_only());
    // The cgroup mount is ro per mount, rw in the superblock.
    let cgroup = by_id(&t, 1027);
    assert!(cgroup.is_read_only());
    assert_eq!(
        (cgroup.fs_type.as_str(), cgroup.source.as_str()),
        ("cgroup2", "cgroup")
    );
}

#[test]
fn container_fuse_mounts() {
    let t = table(CONTAINER);
    assert_eq!(
        by_id(&t, 1036),
        &MountEntry {
            mount_id: 1036,
            parent_id: 1031,
            major: 0,
            minor: 150,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/var/lib/stowage/remote/backup"),
            deleted: false,
            mount_options: "rw,nosuid,nodev,relatime".to_owned(),
            optional_fields: strings(&["master:415"]),
            fs_type: "fuse.sshfs".to_owned(),
            source: "backup@backup.example.com:/srv/stowage".to_owned(),
            super_options: "rw,user_id=0,group_id=0,allow_other".to_owned(),
        }
    );
    let rclone = by_id(&t, 1037);
    assert_eq!(rclone.fs_type, "fuse.rclone");
    assert_eq!(
        rclone.source,
        "s3remote:stowage-bucket/pvc-4c6e8a0b-2d4f-4a6c-8e0b-2d4f6a8c0e1b"
    );
    assert_eq!(ids_of_device(&t, 0, 151), vec![1037]);
    let fuse: Vec<u32> = t
        .entries
        .iter()
        .filter(|e| e.fs_type.starts_with("fuse."))
        .map(|e| e.mount_id)
        .collect();
    assert_eq!(fuse, vec![1036, 1037]);
}

#[test]
fn container_containing() {
    let t = table(CONTAINER);
    assert_eq!(
        id_containing(&t, "/var/lib/stowage/remote/backup/2024/db.tar"),
        Some(1036)
    );
    assert_eq!(id_containing(&t, "/var/lib/stowage/remote"), Some(1031));
    assert_eq!(id_containing(&t, "/var/lib/stowage/exports/a"), Some(1033));
    assert_eq!(id_containing(&t, "/var/lib/stowage-other"), Some(1021));
    assert_eq!(id_containing(&t, "/etc/hosts"), Some(1028));
    assert_eq!(id_containing(&t, "/etc/passwd"), Some(1021));
    assert_eq!(id_containing(&t, "/run/stowage/private/key"), Some(1035));
    assert_eq!(id_containing(&t, "/run/stowage/csi.sock"), Some(1034));
    assert_eq!(
        id_containing(&t, "/var/lib/kubelet/pods/x/volumes"),
        Some(1030)
    );
    assert_eq!(ids_of_device(&t, 259, 4), vec![1031, 1033]);
}

// ----------------------------------------------------------- malformed

fn replace_line(text: &str, lineno: usize, line: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines[lineno - 1] = line;
    lines.join("\n") + "\n"
}

fn error_of(text: &str) -> (usize, &'static str) {
    let err = parse(text).expect_err("malformed text must be rejected");
    (err.line, err.reason)
}

#[test]
fn missing_separator_is_rejected_with_line_number() {
    let text = replace_line(
        HOST,
        6,
        "29 1 259:2 / / rw,relatime shared:1 ext4 /dev/nvme0n1p2 rw,errors=remount-ro",
    );
    assert_eq!(error_of(&text), (6, "missing separator"));
    let err = parse(&text).unwrap_err();
    assert_eq!(err.to_string(), "mountinfo line 6: missing separator");
    assert!(MountTable::from_text(&text).is_err());
}

#[test]
fn bad_major_minor_is_rejected_with_line_number() {
    let line =
        |dev: &str| format!("66 29 {dev} / /home rw,relatime shared:33 - ext4 /dev/nvme0n1p3 rw");
    assert_eq!(
        error_of(&replace_line(HOST, 22, &line("259-3"))),
        (22, "bad major:minor")
    );
    assert_eq!(
        error_of(&replace_line(HOST, 22, &line("259"))),
        (22, "bad major:minor")
    );
    assert_eq!(
        error_of(&replace_line(HOST, 22, &line("x:3"))),
        (22, "bad major")
    );
    assert_eq!(
        error_of(&replace_line(HOST, 22, &line("259:"))),
        (22, "bad minor")
    );
    assert_eq!(
        error_of(&replace_line(HOST, 22, &line("259:-3"))),
        (22, "bad minor")
    );
    assert_eq!(
        error_of(&replace_line(HOST, 22, &line("4294967296:0"))),
        (22, "bad major")
    );
}

#[test]
fn truncated_fixture_is_rejected_at_its_last_line() {
    assert_eq!(TRUNCATED.lines().count(), 6);
    assert!(!TRUNCATED.ends_with('\n'));
    assert_eq!(error_of(TRUNCATED), (6, "missing separator"));
}

#[test]
fn truncated_lines_report_the_missing_field() {
    let full = "66 29 259:3 / /home rw,relatime shared:33 - ext4 /dev/nvme0n1p3 rw";
    let cases = [
        ("66", "missing parent id"),
        ("66 29", "missing major:minor"),
        ("66 29 259:3", "missing root"),
        ("66 29 259:3 /", "missing mount point"),
        ("66 29 259:3 / /home", "missing mount options"),
        ("66 29 259:3 / /home rw,relatime", "missing separator"),
        (
            "66 29 259:3 / /home rw,relatime shared:33",
            "missing separator",
        ),
        (
            "66 29 259:3 / /home rw,relatime shared:33 -",
            "missing fs type",
        ),
        (
            "66 29 259:3 / /home rw,relatime shared:33 - ext4",
            "missing source",
        ),
        (
            "66 29 259:3 / /home rw,relatime shared:33 - ext4 /dev/nvme0n1p3",
            "missing super options",
        ),
    ];
    for (cut, reason) in cases {
        assert!(full.starts_with(cut));
        let text = replace_line(HOST, 3, cut);
        assert_eq!(error_of(&text), (3, reason), "{cut:?}");
        // Also as the last line of a file without a trailing newline.
        let text = format!("{}{cut}", &HOST[..HOST.find("24 29").unwrap()]);
        assert_eq!(error_of(&text), (3, reason), "{cut:?} at end of file");
    }
    assert!(parse(full).is_ok());
}

#[test]
fn bad_ids_and_blank_lines() {
    assert_eq!(
        error_of("x 1 0:21 / /sys rw - sysfs sysfs rw"),
        (1, "bad mount id")
    );
    assert_eq!(
        error_of("22 -1 0:21 / /sys rw - sysfs sysfs rw"),
        (1, "bad parent id")
    );
    // Blank lines are skipped but still counted.
    let text = "\n22 29 0:21 / /sys rw - sysfs sysfs rw\n\n   \n22 29 0:21\n";
    assert_eq!(error_of(text), (5, "missing root"));
    assert_eq!(parse("").unwrap(), Vec::new());
    assert_eq!(parse("\n\n").unwrap(), Vec::new());
    // A doubled space is an empty field, which is never valid.
    assert!(parse("22  29 0:21 / /sys rw - sysfs sysfs rw").is_err());
}

// --------------------------------------------------------------- live

#[test]
fn live_mount_table_parses() {
    let t = MountTable::read().expect("this machine's /proc/self/mountinfo parses");
    assert!(!t.entries.is_empty());
    assert!(t.containing(Path::new("/")).is_some());
}

// ---------------------------------------------------------- properties

/// The kernel's escaping of mountinfo path fields (`mangle` in
/// fs/proc_namespace.c: space, tab, newline and backslash as `\ooo`).
fn kernel_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn path_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(vec![' ', '\t', '\n', '\\', '0', '4', '7', '(', ')', '.', '-', ':']),
        4 => prop::char::range('a', 'z'),
        2 => any::<char>(),
    ]
    .prop_filter("no NUL or slash in a path component", |c| {
        *c != '/' && *c != '\0'
    })
}

fn component() -> impl Strategy<Value = String> {
    prop::collection::vec(path_char(), 1..10).prop_map(|cs| cs.into_iter().collect())
}

fn abs_path() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 0..5).prop_map(|c| format!("/{}", c.join("/")))
}

fn free_text() -> impl Strategy<Value = String> {
    prop::collection::vec(path_char(), 1..16).prop_map(|cs| cs.into_iter().collect())
}

fn optional_field() -> impl Strategy<Value = String> {
    prop_oneof![
        (1..5000u32).prop_map(|n| format!("shared:{n}")),
        (1..5000u32).prop_map(|n| format!("master:{n}")),
        (1..5000u32).prop_map(|n| format!("propagate_from:{n}")),
        Just("unbindable".to_owned()),
    ]
}

#[derive(Debug, Clone)]
struct Generated {
    entry: MountEntry,
    line: String,
}

fn generated_line() -> impl Strategy<Value = Generated> {
    (
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (abs_path(), abs_path(), any::<bool>()),
        (
            "[a-z][a-z0-9=,-]{0,20}",
            prop::collection::vec(optional_field(), 0..4),
        ),
        (free_text(), free_text(), "[a-z][a-z0-9=,-]{0,20}"),
    )
        .prop_filter(
            "a live mount point must not end in \" (deleted)\"",
            |(_, (_, mp, deleted), _, _)| *deleted || !mp.ends_with(" (deleted)"),
        )
        .prop_map(
            |(
                (mount_id, parent_id, major, minor),
                (root, mount_point, deleted),
                (mount_options, optional_fields),
                (fs_type, source, super_options),
            )| {
                let shown_mp = if deleted {
                    format!("{mount_point} (deleted)")
                } else {
                    mount_point.clone()
                };
                let mut line = format!(
                    "{mount_id} {parent_id} {major}:{minor} {} {} {mount_options}",
                    kernel_escape(&root),
                    kernel_escape(&shown_mp),
                );
                for f in &optional_fields {
                    line.push(' ');
                    line.push_str(f);
                }
                line.push_str(&format!(
                    " - {} {} {super_options}",
                    kernel_escape(&fs_type),
                    kernel_escape(&source)
                ));
                Generated {
                    entry: MountEntry {
                        mount_id,
                        parent_id,
                        major,
                        minor,
                        root: PathBuf::from(root),
                        mount_point: PathBuf::from(mount_point),
                        deleted,
                        mount_options,
                        optional_fields,
                        fs_type,
                        source,
                        super_options,
                    },
                    line,
                }
            },
        )
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "-",
            "0:0",
            "259:2",
            ":",
            "1:",
            "99999999999:1",
            "/",
            "/a\\040b",
            "\\",
            "\\1",
            "\\77",
            "\\777",
            "\\134",
            "shared:1",
            "master:2",
            "unbindable",
            "rw",
            "(deleted)",
            "\\040(deleted)",
            "/x\\040(deleted)",
            "",
        ])
        .prop_map(str::to_owned),
        "[0-9]{1,11}",
        any::<String>(),
    ]
}

proptest! {
    #[test]
    fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse(&text);
        let _ = unescape(&text);
    }

    #[test]
    fn parse_never_panics_on_mountinfo_like_text(
        lines in prop::collection::vec(prop::collection::vec(token(), 0..14), 0..6)
    ) {
        let text = lines
            .iter()
            .map(|l| l.join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        if let Err(e) = parse(&text) {
            prop_assert!(e.line >= 1 && e.line <= text.lines().count());
        }
    }

    #[test]
    fn unescape_inverts_kernel_escape(s in any::<String>()) {
        prop_assert_eq!(unescape(&kernel_escape(&s)), s);
    }

    #[test]
    fn well_formed_line_round_trips(generated in generated_line()) {
        let parsed = parse(&generated.line).map_err(|e| {
            TestCaseError::fail(format!("{e} in {:?}", generated.line))
        })?;
        prop_assert_eq!(parsed.len(), 1);
        prop_assert_eq!(&parsed[0], &generated.entry, "line {:?}", generated.line);
    }

    #[test]
    fn well_formed_tables_round_trip(
        lines in prop::collection::vec(generated_line(), 1..6),
        trailing_newline in any::<bool>(),
    ) {
        let mut text = lines.iter().map(|g| g.line.as_str()).collect::<Vec<_>>().join("\n");
        if trailing_newline {
            text.push('\n');
        }
        let parsed = parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let expected: Vec<MountEntry> = lines.into_iter().map(|g| g.entry).collect();
        prop_assert_eq!(parsed, expected);
    }
}
