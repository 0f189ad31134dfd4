//! The copy-on-write, freeze, resize and pool-probe steps of `stowage::os`
//! on real loop-mounted xfs, btrfs and ext4 pools (and tmpfs). Every test
//! makes its own pool under a `Scratch` dir, whose drop unmounts, detaches
//! and removes everything even when the test fails.

#![allow(clippy::disallowed_methods)]

mod common;

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::{Scratch, make_pool_fs, pattern};
use stowage::os::cow::{self, CowError, Extent};
use stowage::os::freeze::{self, FreezeError, FrozenFs};
use stowage::os::loopdev::LoopDevice;
use stowage::os::pool::{self, PoolError, PoolFs, Strategy};
use stowage::os::resize::{self, ResizeError};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Pool images are sparse; xfs wants at least 300 MiB, btrfs 128 MiB.
const POOL_BYTES: u64 = 1 << 30;

/// A fresh pool filesystem of type `fs` with its scratch dir. Keep the
/// scratch alive for the whole test: dropping it tears the pool down.
fn pool_on(fs: &str) -> (Scratch, PathBuf) {
    let scratch = Scratch::new(&format!("cow-{fs}"));
    let mnt = make_pool_fs(&scratch, fs, POOL_BYTES);
    (scratch, mnt)
}

/// A tmpfs mounted at `<scratch>/<name>`.
fn mount_tmpfs(scratch: &Scratch, name: &str) -> PathBuf {
    let mnt = scratch.root.join(name);
    std::fs::create_dir(&mnt).unwrap();
    let opts = stowage::os::mount::MountOptions::parse(&["size=64m"]).unwrap();
    stowage::os::mount::mount_filesystem(Path::new("tmpfs"), &mnt, "tmpfs", &opts)
        .expect("mount tmpfs");
    mnt
}

/// Writes `data` at `offset` in `path` and makes it durable.
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// A file of `len` bytes holding `chunks` of (offset, seeded pattern of
/// length) and holes elsewhere. The length is set first so no write
/// extends the file (xfs preallocates past EOF on extending writes).
fn sparse_file(path: &Path, len: u64, chunks: &[(u64, u64)]) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (i, &(off, n)) in chunks.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 1, n as usize), off)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn sync(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn pool_is_clean(pool: &Path) -> bool {
    std::fs::read_dir(pool).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".stowage-probe")
    })
}

// ---------------------------------------------------------------- probe

#[test]
fn probe_chooses_reflink_on_xfs() {
    let (_scratch, pool) = pool_on("xfs");
    let found = pool::probe(&pool).unwrap();
    assert_eq!(found.fs, PoolFs::Xfs);
    assert_eq!(
        found.strategy,
        Strategy::Reflink,
        "mkfs.xfs made no reflink=1 fs?"
    );
    assert_eq!(found.to_string(), "xfs pool, reflink copies");
    assert!(pool_is_clean(&pool));
}

#[test]
fn probe_chooses_subvolumes_on_btrfs() {
    let (_scratch, pool) = pool_on("btrfs");
    let found = pool::probe(&pool).unwrap();
    assert_eq!(found.fs, PoolFs::Btrfs);
    assert_eq!(found.strategy, Strategy::BtrfsSubvolumes);
    assert!(pool_is_clean(&pool));
}

#[test]
fn probe_chooses_sparse_copies_on_ext4() {
    let (_scratch, pool) = pool_on("ext4");
    let found = pool::probe(&pool).unwrap();
    assert_eq!(found.fs, PoolFs::Ext4);
    assert_eq!(found.strategy, Strategy::Copy);
    assert!(pool_is_clean(&pool));
}

#[test]
fn probe_chooses_sparse_copies_on_tmpfs() {
    let scratch = Scratch::new("cow-tmpfs");
    let pool = mount_tmpfs(&scratch, "pool");
    let found = pool::probe(&pool).unwrap();
    assert_eq!(found.fs, PoolFs::Tmpfs);
    assert_eq!(found.strategy, Strategy::Copy);
    assert!(pool_is_clean(&pool));
}

// -------------------------------------------------------------- reflink

fn check_reflink_shares_extents(fs: &str) {
    let (_scratch, pool) = pool_on(fs);
    let src = pool.join("src");
    let dst = pool.join("dst");
    let data = pattern(7, (3 * MIB) as usize);
    std::fs::write(&src, &data).unwrap();
    sync(&src);
    cow::reflink(&src, &dst).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    let md = std::fs::metadata(&dst).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    let map = cow::fiemap(&dst).unwrap();
    assert!(!map.is_empty());
    assert!(map.iter().all(Extent::is_shared), "{fs}: {map:?}");
    assert!(map.last().unwrap().is_last());

    // Writes to the copy do not show in the original.
    write_at(&dst, 0, &[0xAA; 4096]);
    assert_eq!(std::fs::read(&src).unwrap(), data);
}

#[test]
fn reflink_shares_extents_on_xfs() {
    check_reflink_shares_extents("xfs");
}

#[test]
fn reflink_shares_extents_on_btrfs() {
    check_reflink_shares_extents("btrfs");
}

#[test]
fn reflink_on_ext4_is_not_supported_and_leaves_nothing() {
    let (_scratch, pool) = pool_on("ext4");
    let src = pool.join("src");
    let dst = pool.join("dst");
    std::fs::write(&src, b"hello").unwrap();
    let err = cow::reflink(&src, &dst).unwrap_err();
    assert!(err.is_not_supported(), "{err}");
    assert!(
        matches!(err, CowError::ReflinkUnsupported { .. }),
        "{err:?}"
    );
    assert!(!dst.exists(), "a failed reflink leaves its destination");
}

#[test]
fn reflink_never_overwrites_or_follows() {
    let (_scratch, pool) = pool_on("xfs");
    let src = pool.join("src");
    let dst = pool.join("dst");
    std::fs::write(&src, b"new").unwrap();
    std::fs::write(&dst, b"old").unwrap();
    let err = cow::reflink(&src, &dst).unwrap_err();
    assert!(matches!(err, CowError::Create { .. }), "{err:?}");
    assert!(!err.is_not_supported());
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");

    let link = pool.join("link");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let err = cow::reflink(&link, &pool.join("via-link")).unwrap_err();
    assert!(matches!(err, CowError::Open { .. }), "{err:?}");
    assert!(!pool.join("via-link").exists());
}

// ---------------------------------------------------- sparse copies

fn check_sparse_copy(fs: &str) {
    let (_scratch, pool) = pool_on(fs);
    let src = pool.join("src.img");
    let dst = pool.join("dst.img");
    let len = 64 * MIB + 12345;
    sparse_file(
        &src,
        len,
        &[(0, 128 * KIB), (8 * MIB, MIB), (40 * MIB, 64 * KIB)],
    );
    let src_ranges = cow::allocated_ranges(&src).unwrap();
    let data: u64 = src_ranges.iter().map(|r| r.1).sum();

    let calls = Cell::new(0u32);
    let last = Cell::new((u64::MAX, u64::MAX));
    let copied = cow::sparse_copy(&src, &dst, &|done, total| {
        calls.set(calls.get() + 1);
        last.set((done, total));
        true
    })
    .unwrap();
    assert_eq!(copied, data);
    assert_eq!(last.get(), (data, data));
    assert!(calls.get() >= 2, "progress at the start and per step");

    sync(&dst);
    let md = std::fs::metadata(&dst).unwrap();
    assert_eq!(md.len(), len);
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!(cow::allocated_ranges(&dst).unwrap(), src_ranges, "{fs}");
    assert!(
        md.blocks() * 512 <= data + MIB,
        "{fs}: {} bytes allocated for {data} bytes of data",
        md.blocks() * 512
    );
    assert!(std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap());

    // The destination is never overwritten.
    let err = cow::sparse_copy(&src, &dst, &|_, _| true).unwrap_err();
    assert!(matches!(err, CowError::Create { .. }), "{err:?}");
}

#[test]
fn sparse_copy_keeps_holes_and_bytes_on_xfs() {
    check_sparse_copy("xfs");
}

#[test]
fn sparse_copy_keeps_holes_and_bytes_on_btrfs() {
    check_sparse_copy("btrfs");
}

#[test]
fn sparse_copy_keeps_holes_and_bytes_on_ext4() {
    check_sparse_copy("ext4");
}

#[test]
fn sparse_copy_across_filesystems_keeps_holes() {
    let (scratch, pool) = pool_on("ext4");
    let other = mount_tmpfs(&scratch, "other");
    let src = pool.join("src.img");
    let dst = other.join("dst.img");
    sparse_file(&src, 16 * MIB, &[(4 * MIB, 256 * KIB)]);
    let copied = cow::sparse_copy(&src, &dst, &|_, _| true).unwrap();
    assert_eq!(copied, 256 * KIB);
    assert_eq!(
        cow::allocated_ranges(&dst).unwrap(),
        vec![(4 * MIB, 256 * KIB)]
    );
    assert!(std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap());
}

fn check_allocated_ranges(fs: &str) {
    let (_scratch, pool) = pool_on(fs);
    let f = pool.join("f");
    let chunks = [(MIB, 64 * KIB), (4 * MIB, 192 * KIB), (12 * MIB, 4 * KIB)];
    sparse_file(&f, 16 * MIB, &chunks);
    assert_eq!(cow::allocated_ranges(&f).unwrap(), chunks, "{fs}");

    let empty = pool.join("empty");
    sparse_file(&empty, 8 * MIB, &[]);
    assert_eq!(cow::allocated_ranges(&empty).unwrap(), vec![]);
}

#[test]
fn allocated_ranges_are_exact_on_xfs() {
    check_allocated_ranges("xfs");
}

#[test]
fn allocated_ranges_are_exact_on_btrfs() {
    check_allocated_ranges("btrfs");
}

#[test]
fn allocated_ranges_are_exact_on_ext4() {
    check_allocated_ranges("ext4");
}

// ---------------------------------------------------------------- FIEMAP

fn check_fiemap_finds_rewritten_block(fs: &str) {
    let (_scratch, pool) = pool_on(fs);
    let src = pool.join("base");
    let dst = pool.join("copy");
    std::fs::write(&src, pattern(3, MIB as usize)).unwrap();
    sync(&src);
    cow::reflink(&src, &dst).unwrap();
    assert!(
        cow::changed_ranges(&cow::fiemap(&src).unwrap(), &cow::fiemap(&dst).unwrap()).is_empty()
    );

    write_at(&dst, 256 * KIB, &pattern(4, (64 * KIB) as usize));
    let a = cow::fiemap(&src).unwrap();
    let b = cow::fiemap(&dst).unwrap();
    assert!(a.iter().chain(&b).all(Extent::has_location), "{a:?} {b:?}");
    assert_eq!(
        cow::changed_ranges(&a, &b),
        vec![(256 * KIB, 64 * KIB)],
        "{fs}: base {a:#?} copy {b:#?}"
    );
}

#[test]
fn fiemap_shows_a_rewritten_block_on_xfs() {
    check_fiemap_finds_rewritten_block("xfs");
}

#[test]
fn fiemap_shows_a_rewritten_block_on_btrfs() {
    check_fiemap_finds_rewritten_block("btrfs");
}

#[test]
fn fiemap_maps_an_ext4_file_without_holes() {
    let (_scratch, pool) = pool_on("ext4");
    let f = pool.join("f");
    sparse_file(&f, 8 * MIB, &[(0, 64 * KIB), (4 * MIB, 64 * KIB)]);
    let map = cow::fiemap(&f).unwrap();
    let logical: Vec<(u64, u64)> = map.iter().map(|e| (e.logical, e.length)).collect();
    assert_eq!(logical, vec![(0, 64 * KIB), (4 * MIB, 64 * KIB)]);
    assert!(map.last().unwrap().is_last());
    assert!(!map.iter().any(Extent::is_shared));
}

// ---------------------------------------------------------- tree copies

/// Builds a tree exercising every kind of entry and attribute.
fn build_tree(root: &Path) {
    use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let set_times = |p: &Path, secs: i64| {
        let t = TimeSpec::new(secs, 123_456_789);
        utimensat(
            nix::fcntl::AT_FDCWD,
            p,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    };
    std::fs::create_dir(root).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha").unwrap();
    std::os::unix::fs::chown(root.join("a.txt"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(root.join("a.txt"), PermissionsExt::from_mode(0o640)).unwrap();
    std::fs::create_dir_all(root.join("d1/d2")).unwrap();
    std::fs::write(root.join("d1/d2/deep.bin"), pattern(9, 300 * 1024)).unwrap();
    sparse_file(
        &root.join("d1/sparse.img"),
        32 * MIB,
        &[(16 * MIB, 64 * KIB)],
    );
    std::fs::write(root.join("d1/setuid.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("d1/setuid.sh"), PermissionsExt::from_mode(0o4755)).unwrap();
    std::fs::write(root.join("d1/empty"), b"").unwrap();
    std::os::unix::fs::symlink("d1/d2", root.join("to-dir")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
    std::os::unix::fs::lchown(root.join("dangling"), Some(42), Some(43)).unwrap();
    std::fs::write(root.join("hard1"), b"linked").unwrap();
    std::fs::hard_link(root.join("hard1"), root.join("d1/hard2")).unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o620)).unwrap();
    std::fs::create_dir(root.join("ro")).unwrap();
    std::fs::write(root.join("ro/inside"), b"in a read-only dir").unwrap();
    std::fs::set_permissions(root.join("ro"), PermissionsExt::from_mode(0o555)).unwrap();
    std::fs::set_permissions(root.join("d1/d2"), PermissionsExt::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(root.join("d1"), Some(1000), Some(1000)).unwrap();
    for (i, p) in [
        "a.txt",
        "d1/d2/deep.bin",
        "d1/sparse.img",
        "to-dir",
        "dangling",
        "fifo",
        "ro/inside",
        "ro",
        "d1/d2",
        "d1",
        "",
    ]
    .iter()
    .enumerate()
    {
        set_times(&root.join(p), 1_000_000_000 + i as i64 * 1000);
    }
}

/// Every path below `root`, relative, sorted; symlinks not followed.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// Asserts `dst` mirrors `src`: same entries, kinds, owners, modes, times,
/// contents, link targets, holes and hard links.
fn assert_same_tree(src: &Path, dst: &Path) {
    let entries = walk(src);
    assert_eq!(entries, walk(dst));
    for rel in std::iter::once(PathBuf::new()).chain(entries) {
        let (s, d) = (src.join(&rel), dst.join(&rel));
        let (a, b) = (
            std::fs::symlink_metadata(&s).unwrap(),
            std::fs::symlink_metadata(&d).unwrap(),
        );
        let what = rel.display();
        assert_eq!(a.mode(), b.mode(), "mode of {what}");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "owner of {what}");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "mtime of {what}"
        );
        let ft = a.file_type();
        if ft.is_symlink() {
            assert_eq!(
                std::fs::read_link(&s).unwrap(),
                std::fs::read_link(&d).unwrap()
            );
        } else if ft.is_file() {
            assert_eq!(a.len(), b.len(), "length of {what}");
            assert!(
                std::fs::read(&s).unwrap() == std::fs::read(&d).unwrap(),
                "{what}"
            );
            assert_eq!(
                cow::allocated_ranges(&s).unwrap(),
                cow::allocated_ranges(&d).unwrap(),
                "holes of {what}"
            );
        } else if ft.is_fifo() {
            assert!(b.file_type().is_fifo());
        }
    }
    let (h1, h2) = (
        std::fs::metadata(dst.join("hard1")).unwrap(),
        std::fs::metadata(dst.join("d1/hard2")).unwrap(),
    );
    assert_eq!(h1.ino(), h2.ino(), "hard links stay hard links");
    assert_ne!(
        std::fs::metadata(src.join("hard1")).unwrap().ino(),
        h1.ino()
    );
}

fn check_reflink_tree(fs: &str, reflinks: bool) {
    let (_scratch, pool) = pool_on(fs);
    let src = pool.join("src");
    let dst = pool.join("dst");
    build_tree(&src);
    let stats = cow::reflink_tree(&src, &dst).unwrap();
    assert_same_tree(&src, &dst);
    assert_eq!(stats.files, 7, "{stats:?}");
    assert_eq!(stats.hard_links, 1);
    assert_eq!(stats.directories, 4);
    assert_eq!(stats.symlinks, 3);
    assert_eq!(stats.special_files, 1);
    if reflinks {
        assert_eq!(stats.reflinked, stats.files, "{fs}: {stats:?}");
        assert_eq!(stats.copied_bytes, 0);
        let map = cow::fiemap(&dst.join("d1/d2/deep.bin")).unwrap();
        assert!(map.iter().all(Extent::is_shared), "{map:?}");
    } else {
        assert_eq!(stats.reflinked, 0, "{fs}: {stats:?}");
        // The sparse image's hole is not copied.
        assert!(stats.copied_bytes < 2 * MIB, "{stats:?}");
    }
    // The symlinks were copied as links, not followed.
    assert!(
        std::fs::symlink_metadata(dst.join("outside"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // An existing destination is refused and left alone.
    let err = cow::reflink_tree(&src, &dst).unwrap_err();
    assert!(matches!(err, CowError::MakeDir { .. }), "{err:?}");
    assert!(dst.join("a.txt").exists());
}

#[test]
fn reflink_tree_on_xfs_reflinks_every_file() {
    check_reflink_tree("xfs", true);
}

#[test]
fn reflink_tree_on_btrfs_reflinks_every_file() {
    check_reflink_tree("btrfs", true);
}

#[test]
fn reflink_tree_on_ext4_falls_back_to_sparse_copies() {
    check_reflink_tree("ext4", false);
}

#[test]
fn reflink_tree_refuses_to_cross_a_mount_and_cleans_up() {
    let (scratch, pool) = pool_on("xfs");
    let src = pool.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("file"), b"x").unwrap();
    // A tmpfs mounted inside the tree (like a mount a pod left behind).
    let inner = mount_tmpfs(&scratch, "inner");
    std::fs::write(inner.join("secret"), b"not part of the volume").unwrap();
    let opts = stowage::os::mount::MountOptions::parse::<&str>(&[]).unwrap();
    stowage::os::mount::mount_filesystem(Path::new("tmpfs"), &src.join("sub"), "tmpfs", &opts)
        .unwrap();
    let dst = pool.join("dst");
    let err = cow::reflink_tree(&src, &dst).unwrap_err();
    assert!(matches!(err, CowError::CrossesFilesystem { .. }), "{err:?}");
    assert!(!dst.exists(), "a failed tree copy is removed");

    // A tree is never copied into itself.
    let plain = pool.join("plain");
    std::fs::create_dir_all(plain.join("a/b")).unwrap();
    std::fs::write(plain.join("a/f"), b"y").unwrap();
    let err = cow::reflink_tree(&plain, &plain.join("a/snap")).unwrap_err();
    assert!(
        matches!(err, CowError::DestinationInsideSource { .. }),
        "{err:?}"
    );
    assert!(!plain.join("a/snap").exists());

    // The source root itself is never followed through a symlink.
    let link = pool.join("link-to-src");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let err = cow::reflink_tree(&link, &pool.join("dst2")).unwrap_err();
    assert!(matches!(err, CowError::Open { .. }), "{err:?}");
    assert!(!pool.join("dst2").exists());
}

/// A versioned file's content: its version and body length, then a body
/// derived from the version, so a copy can tell a whole version from a mix.
fn version_bytes(version: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + len);
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&(len as u64).to_le_bytes());
    v.extend((0..len).map(|i| {
        (version as u8)
            .wrapping_mul(31)
            .wrapping_add((i % 253) as u8)
    }));
    v
}

fn is_whole_version(data: &[u8]) -> bool {
    data.len() >= 16 && {
        let version = u64::from_le_bytes(data[..8].try_into().unwrap());
        let len = u64::from_le_bytes(data[8..16].try_into().unwrap()) as usize;
        data == version_bytes(version, len).as_slice()
    }
}

/// A thread rewriting files of a tree until dropped (or, bounded, after
/// `MAX_WRITES`): in place (truncate, then write in steps), by rename over
/// the file, and by removing and making it anew.
struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Churn {
    const MAX_WRITES: u64 = 200_000;

    fn start(dir: PathBuf, names: Vec<String>, spare: PathBuf) -> Self {
        use std::io::Write;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut version = 1000u64;
            while version < 1000 + Self::MAX_WRITES
                && !flag.load(std::sync::atomic::Ordering::Relaxed)
            {
                version += 1;
                let name = &names[(version as usize) % names.len()];
                let path = dir.join(name);
                let data = version_bytes(version, 4096 + (version as usize * 7919) % (768 << 10));
                match version % 3 {
                    0 => {
                        let mut f = File::create(&path).unwrap();
                        for chunk in data.chunks(32 << 10) {
                            f.write_all(chunk).unwrap();
                        }
                    }
                    1 => {
                        std::fs::write(&spare, &data).unwrap();
                        std::fs::rename(&spare, &path).unwrap();
                    }
                    _ => {
                        let _ = std::fs::remove_file(&path);
                        std::fs::write(&path, &data).unwrap();
                    }
                }
            }
            version - 1000
        });
        Churn {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the writer; how many writes it made.
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("writer")
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A directory volume is never frozen: its snapshot on a pool without
/// reflinks copies files that the volume's user rewrites meanwhile (in
/// place, by rename over, by remove and make anew). Every copy must
/// succeed, and the files nobody wrote must be copied exactly.
#[test]
fn reflink_tree_of_a_tree_being_rewritten_on_ext4_never_fails_and_copies_the_rest_exactly() {
    let (_scratch, pool) = pool_on("ext4");
    let src = pool.join("src");
    std::fs::create_dir_all(src.join("still")).unwrap();
    let churned: Vec<String> = (0..6).map(|k| format!("slot-{k}")).collect();
    for (k, name) in churned.iter().enumerate() {
        std::fs::write(src.join(name), version_bytes(k as u64, 256 << 10)).unwrap();
    }
    for k in 0..4u64 {
        std::fs::write(
            src.join("still").join(format!("s{k}")),
            version_bytes(500 + k, 300 << 10),
        )
        .unwrap();
    }
    let churn = Churn::start(src.clone(), churned.clone(), pool.join("spare"));
    let mut total = cow::TreeCopy::default();
    let mut mixed = 0;
    for round in 0..40 {
        let dst = pool.join(format!("copy-{round}"));
        let stats = cow::reflink_tree(&src, &dst)
            .unwrap_or_else(|e| panic!("round {round}: a tree in use must still copy: {e}"));
        for k in 0..4u64 {
            assert_eq!(
                std::fs::read(dst.join("still").join(format!("s{k}"))).unwrap(),
                version_bytes(500 + k, 300 << 10),
                "round {round}: a file nobody wrote is copied exactly"
            );
        }
        // A slot removed and not yet made anew may be missing. A copy that
        // mixes two versions is possible (counted, not refused): a file
        // taken as read after every retry, or a rewrite the copy could not
        // see, back to the size it had within one tick of the kernel's
        // coarse file times.
        mixed += churned
            .iter()
            .filter_map(|name| std::fs::read(dst.join(name)).ok())
            .filter(|data| !is_whole_version(data))
            .count();
        total.retried += stats.retried;
        total.vanished += stats.vanished;
        total.unsettled += stats.unsettled;
        std::fs::remove_dir_all(&dst).unwrap();
    }
    let writes = churn.finish();
    eprintln!(
        "40 copies during {writes} rewrites: {} entries copied again, {} gone, {} taken unsettled, {mixed} copies of a slot mixing two versions",
        total.retried, total.vanished, total.unsettled
    );
    assert!(writes > 0, "the writer ran");
}

// ---------------------------------------------------------------- freeze

#[test]
fn frozen_filesystem_blocks_writers_until_thawed() {
    let scratch = Scratch::new("freeze");
    let mnt = make_pool_fs(&scratch, "ext4", 256 * MIB);
    std::fs::create_dir(mnt.join("sub")).unwrap();

    // Only mount points are frozen.
    let err = freeze::freeze(&mnt.join("sub")).unwrap_err();
    assert!(matches!(err, FreezeError::NotMountPoint { .. }), "{err:?}");
    let err = freeze::freeze(&scratch.root).unwrap_err();
    assert!(matches!(err, FreezeError::NotMountPoint { .. }), "{err:?}");

    // Declared after `scratch`: dropped (thawed) before the teardown.
    let frozen = FrozenFs::new(&mnt).unwrap();
    let err = freeze::freeze(&mnt).unwrap_err();
    assert!(matches!(err, FreezeError::AlreadyFrozen { .. }), "{err:?}");

    let (tx, rx) = mpsc::channel();
    let target = mnt.join("written-while-frozen");
    let writer = std::thread::spawn(move || {
        let r =
            std::fs::write(&target, b"after thaw").and_then(|()| File::open(&target)?.sync_all());
        let _ = tx.send(r);
    });
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_millis(500)),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "a write finished on a frozen filesystem"
    );
    frozen.thaw().unwrap();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the write completes after thaw")
        .unwrap();
    writer.join().unwrap();
    assert_eq!(
        std::fs::read(mnt.join("written-while-frozen")).unwrap(),
        b"after thaw"
    );

    // Thawing a thawed filesystem succeeds; the guard thaws on drop.
    freeze::thaw(&mnt).unwrap();
    {
        let _guard = FrozenFs::new(&mnt).unwrap();
    }
    std::fs::write(mnt.join("after-guard"), b"ok").unwrap();
}

// ---------------------------------------------------------------- resize

fn check_grow_online(fs: &str) {
    let scratch = Scratch::new(&format!("grow-{fs}"));
    let image = scratch.root.join("vol.img");
    stowage::os::fs::create_sparse(&image, 512 * MIB).unwrap();
    let dev = LoopDevice::attach(&image, false).unwrap();
    stowage::os::filesystem::make(&dev.path(), fs).unwrap();
    let mnt = scratch.root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let opts = stowage::os::mount::MountOptions::parse::<&str>(&[]).unwrap();
    stowage::os::mount::mount_filesystem(&dev.path(), &mnt, fs, &opts).unwrap();
    std::fs::write(mnt.join("keep"), b"data survives growing").unwrap();
    let before = stowage::os::fs::usage(&mnt).unwrap().total_bytes;

    resize::grow_file(&image, 1024 * MIB).unwrap();
    dev.refresh_capacity().unwrap();
    assert_eq!(dev.size_bytes(), Some(1024 * MIB));
    match resize::grow_filesystem(fs, &dev.path(), &mnt) {
        Ok(()) => {}
        // ext4's resize ioctl needs CAP_SYS_RESOURCE; a container may
        // have dropped it. Then the refusal must be this typed error.
        Err(ResizeError::MissingCapability { .. }) if fs == "ext4" && !has_cap_sys_resource() => {
            eprintln!("no CAP_SYS_RESOURCE here: ext4 online grow refused as documented");
            return;
        }
        Err(e) => panic!("{fs}: {e}"),
    }
    let after = stowage::os::fs::usage(&mnt).unwrap().total_bytes;
    assert!(
        after > before + 400 * MIB,
        "{fs}: {before} -> {after} bytes"
    );
    // Growing again is a no-op.
    resize::grow_filesystem(fs, &dev.path(), &mnt).unwrap();
    assert_eq!(stowage::os::fs::usage(&mnt).unwrap().total_bytes, after);
    assert_eq!(
        std::fs::read(mnt.join("keep")).unwrap(),
        b"data survives growing"
    );
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 24) != 0
}

#[test]
fn grow_ext4_online() {
    check_grow_online("ext4");
}

#[test]
fn grow_xfs_online() {
    check_grow_online("xfs");
}

#[test]
fn grow_btrfs_online() {
    check_grow_online("btrfs");
}

#[test]
fn grow_file_never_shrinks_and_is_idempotent() {
    let scratch = Scratch::new("grow-file");
    let f = scratch.root.join("img");
    stowage::os::fs::create_sparse(&f, 8 * MIB).unwrap();
    resize::grow_file(&f, 16 * MIB).unwrap();
    resize::grow_file(&f, 16 * MIB).unwrap();
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 16 * MIB);
    let err = resize::grow_file(&f, 4 * MIB).unwrap_err();
    assert!(
        matches!(err, ResizeError::Shrink { current, requested, .. } if current == 16 * MIB && requested == 4 * MIB),
        "{err:?}"
    );
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 16 * MIB);
    let err = resize::grow_filesystem("vfat", Path::new("/dev/null"), &scratch.root).unwrap_err();
    assert!(matches!(err, ResizeError::Unsupported { .. }), "{err:?}");
}

// ---------------------------------------------------------------- btrfs

#[test]
fn btrfs_subvolumes_create_snapshot_delete() {
    let (_scratch, pool) = pool_on("btrfs");
    let vol = pool.join("vol");
    pool::btrfs_subvolume_create(&vol).unwrap();
    assert!(pool::is_btrfs_subvolume(&vol).unwrap());
    assert!(
        pool::is_btrfs_subvolume(&pool).unwrap(),
        "the top-level subvolume"
    );
    std::fs::create_dir(pool.join("plain")).unwrap();
    assert!(!pool::is_btrfs_subvolume(&pool.join("plain")).unwrap());
    std::fs::write(vol.join("f"), b"v1").unwrap();

    let snap = pool.join("snap");
    pool::btrfs_subvolume_snapshot(&vol, &snap, true).unwrap();
    assert!(pool::is_btrfs_subvolume(&snap).unwrap());
    std::fs::write(vol.join("f"), b"v2").unwrap();
    assert_eq!(std::fs::read(snap.join("f")).unwrap(), b"v1");
    let err = std::fs::write(snap.join("f"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // A snapshot onto an existing path is refused (btrfs would nest it).
    let err = pool::btrfs_subvolume_snapshot(&vol, &pool.join("plain"), false).unwrap_err();
    assert!(matches!(err, PoolError::Exists { .. }), "{err:?}");
    assert!(
        std::fs::read_dir(pool.join("plain"))
            .unwrap()
            .next()
            .is_none()
    );

    let rw = pool.join("rw");
    pool::btrfs_subvolume_snapshot(&snap, &rw, false).unwrap();
    std::fs::write(rw.join("f"), b"writable").unwrap();

    for p in [&rw, &snap, &vol] {
        pool::btrfs_subvolume_delete(p).unwrap();
        assert!(!p.exists());
        pool::btrfs_subvolume_delete(p).unwrap();
    }
    let err = pool::btrfs_subvolume_create(&pool.join("plain")).unwrap_err();
    assert!(matches!(err, PoolError::SubvolumeCreate { .. }), "{err:?}");
}

#[test]
fn is_btrfs_subvolume_is_false_off_btrfs() {
    let (_scratch, pool) = pool_on("xfs");
    assert!(!pool::is_btrfs_subvolume(&pool).unwrap());
    let err = pool::btrfs_subvolume_create(&pool.join("sv")).unwrap_err();
    assert!(matches!(err, PoolError::SubvolumeCreate { .. }), "{err:?}");
}
