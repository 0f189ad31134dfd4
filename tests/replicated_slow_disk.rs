//! A copy of a replicated volume on a slow disk, for real: the pool is xfs
//! on a loop device whose "disk" is a FUSE file served by this process at a
//! bounded rate (these kernels have no dm-delay or cgroup I/O limits).
//! Writes go through the copy's store as an engine sends them; the store
//! must size its writeback window (src/backend/replicated/store/
//! writeback.rs) to what that disk writes back in a quarter second, so a
//! flush finds little to write, and every byte must read back after the
//! flush. Guards unmount and detach even when the test fails.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Mounted, Scratch, pattern};
use stowage::backend::replicated::REGION_BYTES;
use stowage::backend::replicated::protocol::{Io, IoRefusal, Reply, Request, Tag};
use stowage::backend::replicated::record::{Member, ReplicaRecord};
use stowage::backend::replicated::store::{ReplicaStore, writeback};
use stowage::backend::replicated::wire::Call;
use stowage::os::fuse_file::{BlockHandler, FuseLoopDevice, FuseOptions, LocalFile};
use stowage::volume::id::Uuid;

const MIB: u64 = 1 << 20;
/// The slow disk's rate: a 16 MiB window takes it a second to write.
const RATE: u64 = 16 * MIB;

/// A disk that writes at most [`RATE`] bytes a second: each write takes
/// the next slot of its length on one timeline, then waits for its end.
struct SlowDisk {
    inner: LocalFile,
    free_at: Mutex<Instant>,
}

impl BlockHandler for SlowDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let takes = Duration::from_secs_f64(data.len() as f64 / RATE as f64);
        let done = {
            let mut free = self.free_at.lock().unwrap();
            *free = (*free).max(Instant::now()) + takes;
            *free
        };
        std::thread::sleep(done.saturating_duration_since(Instant::now()));
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn resize(&self, len: u64) -> std::io::Result<()> {
        self.inner.resize(len)
    }
}

fn io() -> Io {
    Io {
        epoch: 3,
        boot: 1,
        conn: 1,
    }
}

/// An xfs pool on a disk this process serves through `disk` (a loop
/// device on a FUSE file), mounted at `<scratch>/pool`. Drop the mount's
/// guard, then close the device, before the scratch dir goes.
fn xfs_on(
    scratch: &Scratch,
    size: u64,
    disk: Arc<dyn BlockHandler>,
) -> (FuseLoopDevice, std::path::PathBuf, Mounted) {
    let dev = FuseLoopDevice::attach(
        &scratch.root.join("fuse"),
        size,
        disk,
        &FuseOptions::default(),
    )
    .expect("FUSE loop device");
    stowage::os::filesystem::make(&dev.device().path(), "xfs").expect("mkfs.xfs");
    let pool = scratch.root.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let opts = stowage::os::mount::MountOptions::parse(&[""]).unwrap();
    stowage::os::mount::mount_filesystem(&dev.device().path(), &pool, "xfs", &opts)
        .expect("mount the pool");
    let mounted = Mounted(pool.clone());
    (dev, pool, mounted)
}

#[test]
fn a_copy_on_a_slow_disk_sizes_its_writeback_window_to_the_disk_and_keeps_every_byte() {
    // Dropped last: by then the pool is unmounted and the disk closed.
    let scratch = Scratch::new("slow-disk");
    let size = 512 * MIB;
    let disk = Arc::new(SlowDisk {
        inner: LocalFile::create(&scratch.root.join("disk.img"), size).expect("disk image"),
        free_at: Mutex::new(Instant::now()),
    });
    let (dev, pool, mounted) = xfs_on(&scratch, size, disk);

    let store = ReplicaStore::open(&pool, "n1").expect("open store");
    let volume = Uuid::new_random();
    let boots = BTreeMap::from([("n1".to_owned(), 1)]);
    let mut record =
        ReplicaRecord::new(volume, 256 * MIB, vec![Member::copy("n1")], &boots).unwrap();
    record.epoch = 3;
    store.create(&record).expect("create the copy");
    let window = |store: &ReplicaStore| {
        store
            .get(volume)
            .unwrap()
            .expect("held")
            .writeback_window
            .expect("a copy has a window")
    };
    assert_eq!(window(&store), writeback::FIRST);

    // 64 MiB, a region at a time, as an engine's rebuild or a sequential
    // writer sends them: four of the first windows.
    let regions = 64u32;
    for region in 0..regions {
        let answer = store
            .call(
                volume,
                Call {
                    request: Request::Write {
                        io: io(),
                        region,
                        tag: Tag {
                            epoch: 3,
                            seq: u64::from(region) + 1,
                        },
                    },
                    offset: 0,
                    len: 0,
                    data: pattern(u64::from(region), REGION_BYTES as usize).into(),
                },
            )
            .expect("write");
        assert!(
            matches!(answer.reply, Some(Reply::Written { .. })),
            "region {region}: {:?}",
            answer.reply
        );
    }
    // The disk writes 16 MiB a second: a window it writes back in 250 ms
    // is about 4 MiB. The window started at 256 KiB, doubled while the disk
    // kept up and shrank when a writeback took longer: it ends near 4 MiB,
    // neither at its floor nor at the 16 MiB the disk needs a second for.
    let w = window(&store);
    assert!(
        (MIB..=12 * MIB).contains(&w),
        "window {w} bytes after 64 MiB on a 16 MiB/s disk"
    );

    let flush_started = Instant::now();
    let flushed = store
        .call(volume, Call::control(Request::Flush { io: io(), id: 1 }))
        .expect("flush");
    assert!(
        matches!(flushed.reply, Some(Reply::Flushed { id: 1, .. })),
        "{:?}",
        flushed.reply
    );
    // For the reader of the log, not a check: a few windows' worth.
    eprintln!(
        "window {w} bytes; the flush took {:?}",
        flush_started.elapsed()
    );
    for region in 0..regions {
        // The request carries no bytes; len 0 asks for the whole region.
        let read = Request::Read {
            io: io(),
            region,
            id: 2,
        };
        let back = store.call(volume, Call::control(read)).expect("read");
        assert!(
            back.data[..] == pattern(u64::from(region), REGION_BYTES as usize)[..],
            "region {region} reads back other bytes"
        );
    }
    drop(store);
    drop(mounted);
    dev.close().expect("close the disk");
}

/// Waits until thread `tid` of this process is in `state` ("D": asleep
/// in the kernel, as on a frozen filesystem's write lock; "S": waiting,
/// as on a futex), at most 20 s; `what` says why it would.
fn wait_thread_state(tid: i32, state: &str, what: &str) {
    let stat = format!("/proc/self/task/{tid}/stat");
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        // "tid (comm) S ...": the state follows the last ')'.
        let now = s
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        if now == Some(state) {
            return;
        }
        assert!(Instant::now() < until, "{what}: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `f` on a thread and returns it with the thread's kernel id.
fn spawn_with_tid<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (std::thread::JoinHandle<T>, i32) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
        f()
    });
    (handle, rx.recv().expect("the thread started"))
}

/// The first open of a copy in a process writes to its disk (its new
/// boot). When that disk stalls (the pool filesystem frozen), only calls
/// of that volume may wait for it: another volume's record, names and
/// data still answer, and a delete of the stalled volume marks it gone at
/// once, then waits for the open to end before removing anything, so no
/// open copy of a deleted volume is left behind.
#[test]
fn a_copy_opened_on_a_stalled_disk_holds_up_no_other_volume() {
    let scratch = Scratch::new("stalled-open");
    let pool = common::make_pool_fs(&scratch, "xfs", 512 * MIB);
    let _mounted = Mounted(pool.clone());
    let boots = BTreeMap::from([("n1".to_owned(), 1)]);
    let record = || {
        let mut r = ReplicaRecord::new(
            Uuid::new_random(),
            4 * MIB,
            vec![Member::copy("n1"), Member::copy("n2")],
            &boots,
        )
        .unwrap();
        r.epoch = 3;
        r
    };
    let (a, b) = (record(), record());
    {
        // The process before: A written and flushed.
        let before = ReplicaStore::open(&pool, "n1").expect("open store");
        before.create(&a).expect("create A");
        before.create(&b).expect("create B");
        let write = Call {
            request: Request::Write {
                io: io(),
                region: 0,
                tag: Tag { epoch: 3, seq: 1 },
            },
            offset: 0,
            len: 0,
            data: pattern(7, REGION_BYTES as usize).into(),
        };
        before.call(a.uuid, write).expect("write A");
        before
            .call(a.uuid, Call::control(Request::Flush { io: io(), id: 1 }))
            .expect("flush A");
    }
    let store = Arc::new(ReplicaStore::open(&pool, "n1").expect("open store again"));
    let a_boot = store.get(a.uuid).unwrap().expect("A held").state.boot;

    // Thawed when dropped (declared after the mount's guard): even when
    // this test fails, nothing stays frozen.
    let frozen = stowage::os::freeze::FrozenFs::new(&pool).expect("freeze the pool");
    let (opener, tid) = {
        let store = Arc::clone(&store);
        let uuid = b.uuid;
        spawn_with_tid(move || store.get(uuid))
    };
    wait_thread_state(tid, "D", "B's open never blocked on the frozen pool");

    let limit = Duration::from_secs(10);
    let answers = {
        let store = Arc::clone(&store);
        let uuid = a.uuid;
        common::within(limit, move || {
            let state = store.get(uuid).map(|h| h.map(|h| h.state));
            let named = store.names(uuid, "n2");
            let read = Request::Read {
                io: Io {
                    boot: a_boot,
                    ..io()
                },
                region: 0,
                id: 2,
            };
            let data = store.call(uuid, Call::control(read)).map(|a| a.data);
            (state, named, data)
        })
    }
    .expect("a call of volume A waited for B's open on the stalled disk");
    let (state, named, data) = answers;
    assert_eq!(state.unwrap().expect("A held").boot, a_boot);
    assert_eq!(named, Some(true));
    assert!(
        data.expect("read A")[..] == pattern(7, REGION_BYTES as usize)[..],
        "A reads back other bytes"
    );

    // B deleted meanwhile: gone at once for every reader, removed once
    // the open stuck on the disk ends.
    let (deleter, tid) = {
        let store = Arc::clone(&store);
        let uuid = b.uuid;
        spawn_with_tid(move || store.delete(uuid))
    };
    // Not on the disk: waiting for the open to end (on a futex), with B
    // marked as being deleted.
    wait_thread_state(tid, "S", "the delete of B never waited for its open");
    let gone = {
        let store = Arc::clone(&store);
        let uuid = b.uuid;
        common::within(limit, move || store.get(uuid).map(|h| h.is_none()))
    }
    .expect("a read of B waited for its open on the stalled disk");
    assert!(gone.expect("read B"), "B still read as held while deleted");
    assert!(!deleter.is_finished(), "the delete ended on a frozen disk");
    frozen.thaw().expect("thaw the pool");
    opener
        .join()
        .unwrap()
        .expect("B's open ends once the disk moves");
    deleter.join().unwrap().expect("delete B");
    assert!(store.get(b.uuid).unwrap().is_none());
    assert_eq!(
        store.names(b.uuid, "n2"),
        None,
        "B left open after its delete"
    );
    assert!(!pool.join("replicas").join(b.uuid.to_hex()).exists());
    assert_eq!(store.list().unwrap(), vec![a.uuid]);
}

/// A disk whose writes to some byte ranges fail (EIO), as a failing disk's
/// do; counts the writes that reach each range it watches.
struct FailingWrites {
    inner: LocalFile,
    failing: Mutex<Vec<(u64, u64)>>,
    watched: Mutex<Vec<((u64, u64), u64)>>,
}

impl BlockHandler for FailingWrites {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        for ((s, e), n) in self.watched.lock().unwrap().iter_mut() {
            if *s < end && offset < *e {
                *n += 1;
            }
        }
        let fails = self
            .failing
            .lock()
            .unwrap()
            .iter()
            .any(|&(s, e)| s < end && offset < e);
        if fails {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn resize(&self, len: u64) -> std::io::Result<()> {
        self.inner.resize(len)
    }
}

/// When the disk fails to write back a copy's data, the next flush must
/// say so, even when the copy's own writeback pacing waited for that
/// writeback first (waiting takes the error: the kernel reports it once
/// per open file, and the pages it could not write are clean since). And
/// once a flush failed, no later flush may answer for what it lost: the
/// copy counts as restarted (it takes a new boot), so a flush sent before,
/// or one of another request in flight, is refused and the engine
/// rebuilds what it had not flushed there. When the new boot cannot be
/// made durable, a restart of the process must not open the copy at that
/// same boot.
#[test]
fn a_flush_reports_a_failed_writeback_even_when_the_pacing_waited_for_it() {
    let scratch = Scratch::new("failing-writes");
    let size = 512 * MIB;
    let disk = Arc::new(FailingWrites {
        inner: LocalFile::create(&scratch.root.join("disk.img"), size).expect("disk image"),
        failing: Mutex::new(Vec::new()),
        watched: Mutex::new(Vec::new()),
    });
    let (dev, pool, mounted) = xfs_on(&scratch, size, disk.clone());

    let store = ReplicaStore::open(&pool, "n1").expect("open store");
    let volume = Uuid::new_random();
    let boots = BTreeMap::from([("n1".to_owned(), 1)]);
    let mut record = ReplicaRecord::new(volume, 8 * MIB, vec![Member::copy("n1")], &boots).unwrap();
    record.epoch = 3;
    store.create(&record).expect("create the copy");
    let write = |at: Io, region: u32, seq: u64| {
        let answer = store
            .call(
                volume,
                Call {
                    request: Request::Write {
                        io: at,
                        region,
                        tag: Tag { epoch: 3, seq },
                    },
                    offset: 0,
                    len: 0,
                    data: pattern(seq, REGION_BYTES as usize).into(),
                },
            )
            .expect("write");
        assert!(
            matches!(answer.reply, Some(Reply::Written { .. })),
            "{:?}",
            answer.reply
        );
    };
    let flush = |at: Io, id: u64| store.call(volume, Call::control(Request::Flush { io: at, id }));
    // Regions 0 and 1 written and flushed: they have their place on the
    // disk, and are written there again in place.
    write(io(), 0, 1);
    write(io(), 1, 2);
    let flushed = flush(io(), 1).expect("first flush");
    assert!(matches!(flushed.reply, Some(Reply::Flushed { id: 1, .. })));
    let data = pool.join("replicas").join(volume.to_hex()).join("data");
    // Each in one extent: one range to fail or watch.
    let one = |at: u64| match common::disk_ranges(&data, at, at + REGION_BYTES)[..] {
        [range] => range,
        ref more => panic!("region at {at} in several extents: {more:?}"),
    };
    let (region0, region1) = (one(0), one(REGION_BYTES));
    disk.failing.lock().unwrap().push(region0);
    disk.watched
        .lock()
        .unwrap()
        .extend([(region0, 0), (region1, 0)]);
    let reached = |range: (u64, u64)| {
        disk.watched
            .lock()
            .unwrap()
            .iter()
            .find(|(r, _)| *r == range)
            .map(|(_, n)| *n)
            .unwrap()
    };
    let wait_reached = |range: (u64, u64), what: &str| {
        let until = Instant::now() + Duration::from_secs(30);
        while reached(range) == 0 {
            assert!(Instant::now() < until, "{what} never reached the disk");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Region 0 again (a window's worth): the pacing starts its writeback,
    // which fails.
    write(io(), 0, 3);
    wait_reached(region0, "the writeback of region 0");
    // Region 1 again, until a window's worth (the window grew) made the
    // pacing start its writeback: it waits for region 0's first (and
    // takes its error).
    let until = Instant::now() + Duration::from_secs(30);
    let mut seq = 4;
    while reached(region1) == 0 {
        assert!(Instant::now() < until, "region 1 never written back");
        write(io(), 1, seq);
        seq += 1;
        std::thread::sleep(Duration::from_millis(20));
    }

    let err = flush(io(), 2).expect_err("a flush after a failed writeback succeeded");
    assert!(err.to_string().contains("Input/output error"), "{err}");
    // Any later flush at the boot the writes were made at is refused.
    let later = flush(io(), 3).expect("a later flush is answered");
    assert!(
        !matches!(later.reply, Some(Reply::Flushed { .. })),
        "a later flush answered for what the failed writeback lost: {:?}",
        later.reply
    );
    let boot = store.get(volume).unwrap().expect("held").state.boot;
    assert_ne!(boot, io().boot, "the copy keeps its boot");

    // Once more, where the new boot cannot be made durable (the copy's
    // directory takes no new file): a restart of the process must not
    // open the copy at the boot it took in memory, which an engine may
    // have seen it in sync at meanwhile.
    let at = Io { boot, ..io() };
    let before = reached(region0);
    let frozen_dir = common::Immutable::set(&pool.join("replicas").join(volume.to_hex()));
    let until = Instant::now() + Duration::from_secs(30);
    while reached(region0) == before {
        assert!(Instant::now() < until, "region 0 never written back again");
        write(at, 0, seq);
        seq += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    flush(at, 4).expect_err("a flush after a failed writeback succeeded");
    let in_memory = match flush(at, 5).expect("a later flush is answered").reply {
        Some(Reply::Refused {
            why: IoRefusal::WrongBoot { boot },
            ..
        }) => boot,
        other => panic!("a later flush: {other:?}"),
    };
    drop(frozen_dir);
    let restarted = ReplicaStore::open(&pool, "n1").expect("open store again");
    let reopened = restarted.get(volume).unwrap().expect("held").state.boot;
    assert_ne!(
        reopened, in_memory,
        "a restart reopened the copy at the boot it took when its sync failed"
    );
    drop(restarted);
    drop(store);
    drop(mounted);
    dev.close().expect("close the disk");
}
