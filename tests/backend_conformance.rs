//! The backend conformance suite: one set of contract checks, written once
//! against `&dyn VolumeStore` + `&dyn VolumeAttacher`, run against every
//! local backend on real pools (a loop-mounted ext4 and a loop-mounted xfs
//! filesystem). Each check names the doc-comment clause of
//! `stowage::backend` it holds the backend to.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use stowage::backend::{
    Attached, BackendError, Backends, VolumeAttacher, VolumeStore, backend_dir, prepare_pool,
};
use stowage::volume::{BackendKind, Uuid};

const MIB: u64 = 1 << 20;

/// Size of the pool filesystem image (sparse; xfs wants at least 300 MiB).
const POOL_FS_BYTES: u64 = 1 << 30;

/// A pool on a fresh loop-mounted filesystem. Field order matters for drop:
/// the backends, then the scratch dir (which unmounts and detaches all).
struct Pool {
    backends: Backends,
    /// The mounted pool filesystem (`<scratch>/pool-fs`).
    fs_root: PathBuf,
    scratch: Scratch,
}

impl Pool {
    fn new(fs: &str, kind: BackendKind) -> Self {
        let scratch = Scratch::new(&format!("backend-{kind}-{fs}"));
        let fs_root = make_pool_fs(&scratch, fs, POOL_FS_BYTES);
        let pool = fs_root.join("pool");
        prepare_pool(&pool).expect("prepare pool");
        Pool {
            backends: Backends::new(
                &pool,
                stowage::os::pool::probe(&pool)
                    .expect("probe pool")
                    .strategy,
            ),
            fs_root,
            scratch,
        }
    }

    /// Where the documented layout puts a volume's storage:
    /// `<pool>/volumes/<backend>/<uuid>[.img]`.
    fn storage(&self, kind: BackendKind, uuid: Uuid) -> PathBuf {
        let dir = backend_dir(&self.backends.pool, kind);
        match kind {
            BackendKind::Dir => dir.join(uuid.to_hex()),
            BackendKind::Block => dir.join(format!("{}.img", uuid.to_hex())),
            BackendKind::Object | BackendKind::Replicated => {
                unreachable!("the pool suite runs the local backends")
            }
        }
    }
}

impl Drop for Pool {
    /// Detaches volume loop devices a failed check left, while the pool is
    /// still mounted: once the scratch guard lazily unmounts it, the
    /// kernel reports their backing files relative to the detached mount
    /// (`/pool/volumes/...`) and no sweep by path finds them again.
    fn drop(&mut self) {
        for (d, _) in loops_under(&self.fs_root) {
            let _ = d.detach();
        }
    }
}

type Check = fn(&dyn VolumeStore, &dyn VolumeAttacher, &Pool);

/// Runs one check on a fresh pool of filesystem `fs`, then asserts that no
/// loop device backed by the pool (while it is still mounted) nor by the
/// scratch dir (once it is gone) is left.
fn run(fs: &str, kind: BackendKind, check: Check) {
    let pool = Pool::new(fs, kind);
    check(
        pool.backends.store(kind),
        pool.backends.attacher(kind),
        &pool,
    );
    let left = loops_under(&pool.fs_root);
    assert!(left.is_empty(), "loop devices left on the pool: {left:?}");
    let root = pool.scratch.root.clone();
    drop(pool);
    // The pool's own device auto-clears once its (lazy) unmount finishes.
    let start = Instant::now();
    loop {
        let left = loops_under(&root);
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "loop devices left under {}: {left:?}",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!root.exists(), "scratch dir {} not removed", root.display());
}

fn new_volume(store: &dyn VolumeStore, size: u64) -> Uuid {
    let uuid = Uuid::new_random();
    store.create(uuid, size).expect("create");
    uuid
}

/// The one device of a block attachment.
#[track_caller]
fn device(a: &Attached) -> &stowage::os::loopdev::LoopDevice {
    match a {
        Attached::Device(d) => d,
        other => panic!("expected a block device, got {other:?}"),
    }
}

/// "create ... exists ... list: every volume present in the pool".
fn create_then_exists_and_list(store: &dyn VolumeStore, _: &dyn VolumeAttacher, pool: &Pool) {
    let kind = store.kind();
    let never = Uuid::new_random();
    assert!(!store.exists(never));
    assert!(store.list().unwrap().is_empty(), "fresh pool is not empty");

    let size = store.round_size(8 * MIB);
    let a = new_volume(store, size);
    let b = new_volume(store, size);
    assert!(store.exists(a) && store.exists(b));
    assert!(!store.exists(never));
    let storage = pool.storage(kind, a);
    assert!(
        storage.exists(),
        "{kind} volume storage is not at {}",
        storage.display()
    );
    if kind == BackendKind::Block {
        assert_eq!(std::fs::metadata(&storage).unwrap().len(), size);
    }

    let mut want = vec![a, b];
    want.sort();
    assert_eq!(store.list().unwrap(), want);

    // Foreign entries in the backend directory are not volumes.
    let dir = backend_dir(&pool.backends.pool, kind);
    std::fs::write(dir.join("notes.txt"), b"x").unwrap();
    std::fs::create_dir(dir.join("lost+found-ish")).unwrap();
    std::fs::write(dir.join(format!("{}.tmp", a.to_hex())), b"x").unwrap();
    assert_eq!(store.list().unwrap(), want, "list reports foreign entries");

    store.delete(a).unwrap();
    store.delete(b).unwrap();
}

/// "create ... Idempotent: an existing volume of the same size is success".
fn create_is_idempotent_with_same_size(
    store: &dyn VolumeStore,
    _: &dyn VolumeAttacher,
    pool: &Pool,
) {
    let size = store.round_size(12 * MIB);
    let u = new_volume(store, size);
    let storage = pool.storage(store.kind(), u);
    let marker = storage.join("marker");
    if store.kind() == BackendKind::Dir {
        std::fs::write(&marker, b"kept").unwrap();
    }
    for _ in 0..3 {
        store
            .create(u, size)
            .expect("repeated create with the same size");
    }
    assert_eq!(store.list().unwrap(), vec![u]);
    match store.kind() {
        // A repeat must not recreate (and so empty) the volume.
        BackendKind::Dir => assert_eq!(std::fs::read(&marker).unwrap(), b"kept"),
        BackendKind::Block => assert_eq!(std::fs::metadata(&storage).unwrap().len(), size),
        BackendKind::Object | BackendKind::Replicated => {
            unreachable!("the pool suite runs the local backends")
        }
    }
    store.delete(u).unwrap();
}

/// "create ... of another size, [`BackendError::SizeMismatch`]" (block);
/// "Nothing is left behind on failure".
fn create_with_other_size_is_size_mismatch(
    store: &dyn VolumeStore,
    _: &dyn VolumeAttacher,
    pool: &Pool,
) {
    let size = store.round_size(16 * MIB);
    let u = new_volume(store, size);
    let other = store.round_size(32 * MIB);
    let r = store.create(u, other);
    match store.kind() {
        BackendKind::Block => match r {
            Err(BackendError::SizeMismatch {
                backend,
                uuid,
                existing,
                requested,
            }) => {
                assert_eq!(backend, BackendKind::Block);
                assert_eq!(uuid, u);
                assert_eq!(existing, size);
                assert_eq!(requested, other);
            }
            other => panic!("expected SizeMismatch, got {other:?}"),
        },
        // The dir backend does not keep sizes (capacity is recorded by the
        // controller); what it must not do is damage the existing volume.
        BackendKind::Dir => {
            assert!(
                matches!(r, Ok(()) | Err(BackendError::SizeMismatch { .. })),
                "{r:?}"
            );
        }
        BackendKind::Object | BackendKind::Replicated => {
            unreachable!("the pool suite runs the local backends")
        }
    }
    // The existing volume is untouched.
    assert!(store.exists(u));
    assert_eq!(store.list().unwrap(), vec![u]);
    if store.kind() == BackendKind::Block {
        let len = std::fs::metadata(pool.storage(BackendKind::Block, u))
            .unwrap()
            .len();
        assert_eq!(len, size, "a refused create changed the image size");
    }
    store.delete(u).unwrap();
}

/// "round_size: the size a volume really gets ... rounded up to the
/// backend's granularity": MiB for block, bytes for dir.
fn round_size_granularity(store: &dyn VolumeStore, _: &dyn VolumeAttacher, pool: &Pool) {
    let samples = [
        0,
        1,
        511,
        4095,
        4096,
        MIB - 1,
        MIB,
        MIB + 1,
        3 * MIB + 17,
        1 << 30,
        (1 << 40) + 1,
    ];
    for &n in &samples {
        let r = store.round_size(n);
        assert!(r >= n, "round_size({n}) = {r} is smaller");
        assert_eq!(
            store.round_size(r),
            r,
            "round_size is not idempotent at {n}"
        );
        match store.kind() {
            BackendKind::Block => {
                assert_eq!(r % MIB, 0, "round_size({n}) = {r} is not whole MiB");
                assert!(r - n.max(1) < MIB, "round_size({n}) = {r} overshoots");
                assert!(r >= MIB, "a block volume has at least one MiB");
            }
            BackendKind::Dir => assert_eq!(r, n, "dir keeps sizes in bytes"),
            BackendKind::Object | BackendKind::Replicated => {
                unreachable!("the pool suite runs the local backends")
            }
        }
    }
    assert_eq!(store.round_size(MIB + 1), {
        match store.kind() {
            BackendKind::Block => 2 * MIB,
            BackendKind::Dir => MIB + 1,
            BackendKind::Object | BackendKind::Replicated => {
                unreachable!("the pool suite runs the local backends")
            }
        }
    });
    // A rounded size is what create really gives.
    let size = store.round_size(5 * MIB + 3);
    let u = new_volume(store, size);
    if store.kind() == BackendKind::Block {
        let len = std::fs::metadata(pool.storage(BackendKind::Block, u))
            .unwrap()
            .len();
        assert_eq!(len, size);
    }
    store.delete(u).unwrap();
}

/// "delete ... Idempotent: a missing volume is success".
fn delete_is_idempotent_and_removes_from_list(
    store: &dyn VolumeStore,
    _: &dyn VolumeAttacher,
    pool: &Pool,
) {
    let size = store.round_size(4 * MIB);
    let keep = new_volume(store, size);
    let gone = new_volume(store, size);
    if store.kind() == BackendKind::Dir {
        // A non-empty directory volume is deleted whole.
        let p = pool.storage(BackendKind::Dir, gone);
        std::fs::create_dir_all(p.join("a/b")).unwrap();
        std::fs::write(p.join("a/b/file"), b"data").unwrap();
    }
    store.delete(gone).unwrap();
    assert!(!store.exists(gone));
    assert!(!pool.storage(store.kind(), gone).exists());
    assert_eq!(store.list().unwrap(), vec![keep]);
    store.delete(gone).expect("second delete");
    store
        .delete(Uuid::new_random())
        .expect("delete of a never-created volume");
    assert!(store.exists(keep), "delete touched another volume");
    store.delete(keep).unwrap();
    assert!(store.list().unwrap().is_empty());
}

/// "attach: makes the volume usable on this node" — a directory for dir, a
/// block device backed by the image for block; "attached: the volume's
/// current attachments"; "detach: undoes one attachment. Idempotent".
fn attach_attached_detach(store: &dyn VolumeStore, attacher: &dyn VolumeAttacher, pool: &Pool) {
    assert_eq!(store.kind(), attacher.kind());
    let size = store.round_size(24 * MIB);
    let u = new_volume(store, size);
    let a = attacher.attach(u, false).expect("attach");
    match store.kind() {
        BackendKind::Dir => {
            let Attached::Directory(p) = &a else {
                panic!("dir attach gave {a:?}")
            };
            assert!(p.is_dir(), "{} is not a directory", p.display());
            assert_eq!(p, &pool.storage(BackendKind::Dir, u));
        }
        BackendKind::Block => {
            let d = device(&a);
            let md = std::fs::metadata(d.path()).expect("device node exists");
            assert!(md.file_type().is_block_device());
            assert_eq!(
                d.backing_file(),
                Some(pool.storage(BackendKind::Block, u)),
                "backing file"
            );
            assert_eq!(d.size_bytes(), Some(size));
            assert!(!d.read_only());
        }
        BackendKind::Object | BackendKind::Replicated => {
            unreachable!("the pool suite runs the local backends")
        }
    }
    let now = attacher.attached(u).unwrap();
    assert!(now.contains(&a), "attached() = {now:?} lacks {a:?}");
    if store.kind() == BackendKind::Block {
        assert_eq!(now, vec![a.clone()]);
        // Other volumes' attachments are not reported.
        let other = new_volume(store, size);
        assert!(attacher.attached(other).unwrap().is_empty());
        store.delete(other).unwrap();
    }

    attacher.detach(&a).expect("detach");
    attacher.detach(&a).expect("second detach");
    if store.kind() == BackendKind::Block {
        assert!(
            attacher.attached(u).unwrap().is_empty(),
            "attached() after detach"
        );
        assert!(device(&a).backing_file().is_none());
    }
    store.delete(u).unwrap();
}

/// "Each call attaches anew (a second loop device for a block volume)".
fn each_attach_is_a_new_attachment(
    store: &dyn VolumeStore,
    attacher: &dyn VolumeAttacher,
    _: &Pool,
) {
    let u = new_volume(store, store.round_size(8 * MIB));
    let a = attacher.attach(u, false).unwrap();
    let b = attacher.attach(u, false).unwrap();
    let now = attacher.attached(u).unwrap();
    assert!(now.contains(&a) && now.contains(&b), "{now:?}");
    match store.kind() {
        BackendKind::Block => {
            assert_ne!(a, b, "a second attach reused the device");
            assert_eq!(now.len(), 2);
            attacher.detach(&a).unwrap();
            assert_eq!(attacher.attached(u).unwrap(), vec![b.clone()]);
            attacher.detach(&b).unwrap();
            assert!(attacher.attached(u).unwrap().is_empty());
        }
        BackendKind::Dir => {
            assert_eq!(a, b, "a directory volume has one directory");
            attacher.detach(&a).unwrap();
            attacher.detach(&b).unwrap();
        }
        BackendKind::Object | BackendKind::Replicated => {
            unreachable!("the pool suite runs the local backends")
        }
    }
    store.delete(u).unwrap();
}

/// A read-only attach: block yields a read-only device that refuses writes.
fn read_only_attach(store: &dyn VolumeStore, attacher: &dyn VolumeAttacher, _: &Pool) {
    let size = store.round_size(8 * MIB);
    let u = new_volume(store, size);
    let a = attacher.attach(u, true).expect("read-only attach");
    match store.kind() {
        BackendKind::Dir => {
            let Attached::Directory(p) = &a else {
                panic!("dir attach gave {a:?}")
            };
            assert!(p.is_dir());
        }
        BackendKind::Block => {
            let d = device(&a);
            assert!(d.read_only(), "{} is not read-only", d.path().display());
            assert_eq!(d.size_bytes(), Some(size));
            let w = std::fs::OpenOptions::new()
                .write(true)
                .open(d.path())
                .and_then(|mut f| f.write_all(&[1u8; 4096]).and_then(|()| f.sync_all()));
            assert!(w.is_err(), "wrote to a read-only device");
            let mut buf = vec![0u8; 4096];
            std::fs::File::open(d.path())
                .unwrap()
                .read_exact(&mut buf)
                .expect("read from a read-only device");
        }
        BackendKind::Object | BackendKind::Replicated => {
            unreachable!("the pool suite runs the local backends")
        }
    }
    assert!(attacher.attached(u).unwrap().contains(&a));
    attacher.detach(&a).unwrap();
    attacher.detach(&a).unwrap();
    if store.kind() == BackendKind::Block {
        assert!(attacher.attached(u).unwrap().is_empty());
    }
    store.delete(u).unwrap();
}

/// attach of a volume that is not in the pool (never created, or deleted)
/// is [`BackendError::Missing`], and attaches nothing.
fn attach_missing_is_missing(store: &dyn VolumeStore, attacher: &dyn VolumeAttacher, p: &Pool) {
    let kind = store.kind();
    let deleted = new_volume(store, store.round_size(MIB));
    store.delete(deleted).unwrap();
    for u in [Uuid::new_random(), deleted] {
        for ro in [false, true] {
            match attacher.attach(u, ro) {
                Err(BackendError::Missing { backend, uuid }) => {
                    assert_eq!(backend, kind);
                    assert_eq!(uuid, u);
                }
                other => panic!("attach of a missing {kind} volume gave {other:?}"),
            }
        }
        assert!(attacher.attached(u).unwrap().is_empty());
        assert!(!p.storage(kind, u).exists(), "attach created storage");
    }
    assert!(store.list().unwrap().is_empty());
}

/// Data written through an attachment is there after detach and a new
/// attach: a file in the directory; bytes at offset 0 and at the very end
/// of the block device.
fn data_survives_detach_and_reattach(
    store: &dyn VolumeStore,
    attacher: &dyn VolumeAttacher,
    pool: &Pool,
) {
    const CHUNK: usize = 64 << 10;
    let size = store.round_size(16 * MIB + 5);
    let u = new_volume(store, size);
    let head = pattern(1, CHUNK);
    let tail = pattern(2, CHUNK);
    let end = size - CHUNK as u64;

    let a = attacher.attach(u, false).unwrap();
    match &a {
        Attached::Directory(p) => {
            std::fs::create_dir(p.join("sub")).unwrap();
            std::fs::write(p.join("sub/head"), &head).unwrap();
            std::fs::write(p.join("tail"), &tail).unwrap();
        }
        Attached::Device(d) => {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(d.path())
                .unwrap();
            f.write_all(&head).unwrap();
            f.seek(SeekFrom::Start(end)).unwrap();
            f.write_all(&tail).unwrap();
            f.sync_all().unwrap();
            assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), size);
        }
    }
    attacher.detach(&a).unwrap();

    if store.kind() == BackendKind::Block {
        // The bytes reached the image itself.
        let mut img = std::fs::File::open(pool.storage(BackendKind::Block, u)).unwrap();
        let mut buf = vec![0u8; CHUNK];
        img.read_exact(&mut buf).unwrap();
        assert!(buf == head, "image head differs from what was written");
        img.seek(SeekFrom::Start(end)).unwrap();
        img.read_exact(&mut buf).unwrap();
        assert!(buf == tail, "image tail differs from what was written");
    }

    let b = attacher.attach(u, false).unwrap();
    match &b {
        Attached::Directory(p) => {
            assert!(std::fs::read(p.join("sub/head")).unwrap() == head);
            assert!(std::fs::read(p.join("tail")).unwrap() == tail);
        }
        Attached::Device(d) => {
            let mut f = std::fs::File::open(d.path()).unwrap();
            let mut buf = vec![0u8; CHUNK];
            f.read_exact(&mut buf).unwrap();
            assert!(buf == head, "device head changed across detach/attach");
            f.seek(SeekFrom::Start(end)).unwrap();
            f.read_exact(&mut buf).unwrap();
            assert!(buf == tail, "device tail changed across detach/attach");
            // Nothing readable past the end.
            let mut rest = Vec::new();
            f.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "device is larger than the volume");
        }
    }
    // A read-only attach sees the same data.
    let r = attacher.attach(u, true).unwrap();
    match &r {
        Attached::Directory(p) => assert!(std::fs::read(p.join("tail")).unwrap() == tail),
        Attached::Device(d) => {
            let mut f = std::fs::File::open(d.path()).unwrap();
            f.seek(SeekFrom::Start(end)).unwrap();
            let mut buf = vec![0u8; CHUNK];
            f.read_exact(&mut buf).unwrap();
            assert!(buf == tail, "read-only device sees other data");
        }
    }
    attacher.detach(&r).unwrap();
    attacher.detach(&b).unwrap();
    if store.kind() == BackendKind::Block {
        assert!(attacher.attached(u).unwrap().is_empty());
    }
    store.delete(u).unwrap();
}

/// One test per check for a (backend, pool filesystem) pair.
macro_rules! checks {
    ($kind:ident, $fs:literal; $($check:ident),* $(,)?) => {$(
        #[test]
        fn $check() {
            super::run($fs, BackendKind::$kind, super::$check);
        }
    )*};
}

/// The suite, instantiated for every backend on every pool filesystem.
macro_rules! backend_suite {
    ($($module:ident: $kind:ident on $fs:literal;)*) => {$(
        mod $module {
            use super::*;
            checks!($kind, $fs;
                create_then_exists_and_list,
                create_is_idempotent_with_same_size,
                create_with_other_size_is_size_mismatch,
                round_size_granularity,
                delete_is_idempotent_and_removes_from_list,
                attach_attached_detach,
                each_attach_is_a_new_attachment,
                read_only_attach,
                attach_missing_is_missing,
                data_survives_detach_and_reattach,
            );
        }
    )*};
}

backend_suite! {
    dir_on_ext4: Dir on "ext4";
    dir_on_xfs: Dir on "xfs";
    block_on_ext4: Block on "ext4";
    block_on_xfs: Block on "xfs";
}

/// The harness itself: a pool's path really is on the filesystem asked for.
#[test]
fn pools_are_on_the_requested_filesystem() {
    for fs in ["ext4", "xfs"] {
        let pool = Pool::new(fs, BackendKind::Dir);
        let table = stowage::os::mountinfo::MountTable::read().unwrap();
        let m = table
            .mounted_at(&pool.fs_root)
            .unwrap_or_else(|| panic!("{} is not a mount", pool.fs_root.display()));
        assert_eq!(m.fs_type, fs);
        assert!(Path::new(&pool.backends.pool).starts_with(&pool.fs_root));
    }
}
