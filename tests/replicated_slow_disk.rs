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
use stowage::backend::replicated::protocol::{Io, Reply, Request, Tag};
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

#[test]
fn a_copy_on_a_slow_disk_sizes_its_writeback_window_to_the_disk_and_keeps_every_byte() {
    // Dropped last: by then the pool is unmounted and the disk closed.
    let scratch = Scratch::new("slow-disk");
    let size = 512 * MIB;
    let disk = Arc::new(SlowDisk {
        inner: LocalFile::create(&scratch.root.join("disk.img"), size).expect("disk image"),
        free_at: Mutex::new(Instant::now()),
    });
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
