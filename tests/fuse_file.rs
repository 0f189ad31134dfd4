//! The FUSE file data path (src/os/fuse_file.rs) for real: a FUSE mount
//! served by this process, a loop device in direct-I/O mode on its file,
//! ext4 on that, and the bytes checked where they must land in the backing
//! file. Everything lives in a scratch dir under /tmp; guards detach and
//! unmount even when a test fails.

#![allow(clippy::disallowed_methods)]

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{KillOnDrop, Mounted, Scratch, is_mounted, loops_under, pattern, within};
use stowage::os::fuse_file::{
    AlignedBuf, BlockHandler, FuseFile, FuseFileError, FuseLoopDevice, FuseOptions, LocalFile,
};

const MIB: u64 = 1 << 20;
/// Far above any expected duration: a hang detector, not a timing check.
const HANG: Duration = Duration::from_secs(60);

/// A fresh backing file of `size` bytes and a FUSE loop device on it.
fn volume(scratch: &Scratch, size: u64) -> (PathBuf, Arc<LocalFile>) {
    let backing = scratch.root.join("volume.img");
    let local = Arc::new(LocalFile::create(&backing, size).expect("create backing file"));
    (backing, local)
}

fn attach(scratch: &Scratch, size: u64, handler: Arc<dyn BlockHandler>) -> FuseLoopDevice {
    FuseLoopDevice::attach(
        &scratch.root.join("fuse"),
        size,
        handler,
        &FuseOptions::default(),
    )
    .expect("mount the FUSE file and attach a loop device")
}

/// Opens a block device (or file) for O_DIRECT I/O.
fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", path.display()))
}

fn aligned_copy(data: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(data.len());
    b.as_mut_slice().copy_from_slice(data);
    b
}

fn read_backing(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// The physical extents (logical, physical, length) of a file, through
/// FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC.
fn extents(file: &File) -> Vec<(u64, u64, u64)> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const HEADER_WORDS: usize = 4; // struct fiemap: 32 bytes
    const EXTENT_WORDS: usize = 7; // struct fiemap_extent: 56 bytes
    const MAX: usize = 256;
    let mut buf = vec![0u64; HEADER_WORDS + MAX * EXTENT_WORDS];
    buf[0] = 0; // fm_start
    buf[1] = u64::MAX; // fm_length
    // fm_flags (low half) and fm_mapped_extents (high half).
    buf[2] = u64::from(FIEMAP_FLAG_SYNC);
    // fm_extent_count (low half) and fm_reserved.
    buf[3] = MAX as u64;
    // SAFETY: `buf` is a struct fiemap with room for MAX extents, as
    // fm_extent_count says; the kernel writes only within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    assert_eq!(rc, 0, "FIEMAP: {}", std::io::Error::last_os_error());
    let mapped = (buf[2] >> 32) as usize;
    (0..mapped)
        .map(|i| {
            let e = &buf[HEADER_WORDS + i * EXTENT_WORDS..];
            (e[0], e[1], e[2])
        })
        .collect()
}

/// Everything a test made is gone: no loop device on a file under the
/// scratch dir, no mount there.
fn assert_clean(scratch: &Scratch) {
    assert!(
        loops_under(&scratch.root).is_empty(),
        "loop devices left: {:?}",
        loops_under(&scratch.root)
    );
    let table = stowage::os::mountinfo::MountTable::read().unwrap();
    let left: Vec<_> = table
        .entries
        .iter()
        .filter(|e| e.mount_point.starts_with(&scratch.root))
        .map(|e| e.mount_point.clone())
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
}

/// mkfs.ext4 and a mount on the loop device over the FUSE file; a file
/// written and fsynced there is found, byte for byte, in the backing file
/// at the physical offsets ext4 reports for it.
#[test]
fn ext4_on_the_fuse_loop_device_lands_in_the_backing_file() {
    let scratch = Scratch::new("fuse-ext4");
    let size = 64 * MIB;
    let (backing, local) = volume(&scratch, size);
    assert!(local.direct_io(), "/tmp should take O_DIRECT");
    let dev = attach(&scratch, size, local);
    assert!(
        dev.device().direct_io(),
        "the loop device on the FUSE file must run with direct I/O"
    );
    assert_eq!(dev.device().size_bytes(), Some(size));
    assert_eq!(
        dev.device().backing_file().as_deref(),
        Some(dev.fuse().path().as_path())
    );

    stowage::os::filesystem::make(&dev.device().path(), "ext4").expect("mkfs.ext4");
    let mnt = scratch.root.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let opts = stowage::os::mount::MountOptions::parse::<&str>(&[]).unwrap();
    stowage::os::mount::mount_filesystem(&dev.device().path(), &mnt, "ext4", &opts)
        .expect("mount ext4");
    let mounted = Mounted(mnt.clone());

    let data = pattern(14, 6 * MIB as usize + 12_345);
    let mut f = File::create(mnt.join("data")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let map = extents(&f);
    drop(f);
    assert!(!map.is_empty(), "ext4 reports no extents for the file");

    // os::mount::unmount waits out a mount busy for a moment: a process
    // another test of this binary spawns right after the file was closed
    // holds a copy of its descriptor until it execs.
    stowage::os::mount::unmount(&mnt).expect("unmount ext4");
    drop(mounted);
    dev.close().expect("detach and unmount cleanly");
    assert_clean(&scratch);

    let mut covered = 0;
    for (logical, physical, len) in map {
        let len = len.min(data.len() as u64 - logical) as usize;
        let want = &data[logical as usize..logical as usize + len];
        let got = read_backing(&backing, physical, len);
        assert!(
            got == want,
            "bytes {logical}..+{len} of the file are not at {physical} in the backing file"
        );
        covered += len;
    }
    assert_eq!(covered, data.len(), "the extents cover the whole file");
}

/// Writes of every shape through the raw loop device and through the FUSE
/// file itself land where they were aimed, and nothing around them moves.
#[test]
fn unaligned_and_sub_page_writes_land_at_their_offsets() {
    let scratch = Scratch::new("fuse-raw");
    let size = 16 * MIB;
    let (backing, local) = volume(&scratch, size);
    // A known background, so a write that spills over shows.
    let background = pattern(1, size as usize);
    File::options()
        .write(true)
        .open(&backing)
        .unwrap()
        .write_all_at(&background, 0)
        .unwrap();
    let dev = attach(&scratch, size, local);
    let mut model = background.clone();

    // O_DIRECT on the device: whole sectors, not whole pages.
    let raw = open_direct(&dev.device().path());
    let writes: [(u64, usize); 4] = [
        (512 * 3, 512),
        (4096 + 1024, 512),
        (512 * 7, 1536),
        (MIB + 4096 * 3, 3 * 4096),
    ];
    for (i, (off, len)) in writes.into_iter().enumerate() {
        let p = pattern(100 + i as u64, len);
        raw.write_all_at(aligned_copy(&p).as_slice(), off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p);
    }
    raw.sync_all().unwrap();
    // O_DIRECT reads see them, sector-aligned but not page-aligned.
    let mut back = AlignedBuf::zeroed(2048);
    raw.read_exact_at(back.as_mut_slice(), 512 * 3).unwrap();
    assert_eq!(back.as_slice(), &model[512 * 3..512 * 3 + 2048]);

    // Buffered writes of odd sizes through the device's page cache.
    let dev_file = OpenOptions::new()
        .write(true)
        .open(dev.device().path())
        .unwrap();
    for (i, (off, len)) in [(12_345u64, 100usize), (2 * MIB - 7, 14)]
        .into_iter()
        .enumerate()
    {
        let p = pattern(200 + i as u64, len);
        dev_file.write_all_at(&p, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p);
    }
    dev_file.sync_all().unwrap();
    drop(dev_file);

    // Byte-granular writes straight to the FUSE file (no writeback cache:
    // the handler gets exactly these bytes, unaligned).
    let fuse_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.fuse().path())
        .unwrap();
    for (i, (off, len)) in [
        (3 * MIB + 5, 3usize),
        (3 * MIB + 4093, 10),
        (4 * MIB + 777, 70_001),
    ]
    .into_iter()
    .enumerate()
    {
        let p = pattern(300 + i as u64, len);
        fuse_file.write_all_at(&p, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p);
    }
    fuse_file.sync_all().unwrap();
    let mut odd = vec![0; 9];
    fuse_file.read_exact_at(&mut odd, 3 * MIB + 4090).unwrap();
    assert_eq!(
        odd,
        model[(3 * MIB + 4090) as usize..(3 * MIB + 4099) as usize]
    );
    drop(fuse_file);
    drop(raw);

    dev.close().expect("close");
    assert_clean(&scratch);
    let got = std::fs::read(&backing).unwrap();
    assert_eq!(got.len(), model.len());
    if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("the backing file differs from the model first at byte {i}");
    }
}

/// LocalFile on its own: reads and writes at any offset, length and
/// memory alignment agree with a model, also when several threads patch
/// different bytes of the same blocks at once (the read-modify-write of a
/// partial block must not undo a neighbour's write).
#[test]
fn local_file_unaligned_io_matches_a_model() {
    let scratch = Scratch::new("fuse-local");
    let size = 2 * MIB;
    let path = scratch.root.join("local.img");
    let local = Arc::new(LocalFile::create(&path, size).unwrap());
    let mut model = vec![0u8; size as usize];
    for (i, (off, len)) in [
        (0u64, 1usize),
        (5, 3),
        (511, 2),
        (4095, 4098),
        (10_000, 65_537),
    ]
    .into_iter()
    .enumerate()
    {
        let p = pattern(i as u64, len + 1);
        // Misaligned in memory too: start one byte into the vector.
        local.write_at(off, &p[1..]).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&p[1..]);
    }
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let local = local.clone();
            std::thread::spawn(move || {
                for round in 0..200u64 {
                    // 8 threads × 37 bytes, interleaved inside blocks 256..
                    let off = 256 * 4096 + round * 512 + t * 37;
                    local.write_at(off, &pattern(t * 1000 + round, 37)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..8u64 {
        for round in 0..200u64 {
            let off = (256 * 4096 + round * 512 + t * 37) as usize;
            model[off..off + 37].copy_from_slice(&pattern(t * 1000 + round, 37));
        }
    }
    for (off, len) in [
        (0u64, 9usize),
        (4090, 20),
        (10_001, 65_536),
        (256 * 4096 + 3, 200 * 512),
    ] {
        let mut buf = vec![0; len];
        local.read_at(off, &mut buf).unwrap();
        assert!(
            buf == model[off as usize..off as usize + len],
            "read {off}+{len} differs from the model"
        );
    }
    local.flush().unwrap();
    drop(local);
    assert!(
        std::fs::read(&path).unwrap() == model,
        "the file differs from the model"
    );
}

/// A handler that fails on demand.
struct Flaky {
    inner: LocalFile,
    fail: AtomicBool,
}

impl BlockHandler for Flaky {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected read failure"));
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected write failure"));
        }
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected flush failure"));
        }
        self.inner.flush()
    }
    fn resize(&self, len: u64) -> std::io::Result<()> {
        self.inner.resize(len)
    }
}

/// A fresh backing file of `size` bytes behind a [`Flaky`] handler (working
/// until told otherwise), and a FUSE loop device on it.
fn flaky_device(scratch: &Scratch, size: u64) -> (PathBuf, Arc<Flaky>, FuseLoopDevice) {
    let backing = scratch.root.join("volume.img");
    let flaky = Arc::new(Flaky {
        inner: LocalFile::create(&backing, size).unwrap(),
        fail: AtomicBool::new(false),
    });
    let dev = attach(scratch, size, flaky.clone());
    (backing, flaky, dev)
}

/// A handler error reaches the writer (and reader, and fsync) as EIO: not
/// a hang, not a silent success; the volume works again once the handler
/// does.
#[test]
fn failing_handler_gives_eio_to_the_writer() {
    let scratch = Scratch::new("fuse-eio");
    let (backing, flaky, dev) = flaky_device(&scratch, 8 * MIB);
    let path = dev.device().path();
    let block = aligned_copy(&pattern(7, 4096));
    open_direct(&path)
        .write_all_at(block.as_slice(), 4096)
        .expect("write while the handler works");

    flaky.fail.store(true, Ordering::SeqCst);
    let p = path.clone();
    let (write, read, sync) = within(HANG, move || {
        let f = open_direct(&p);
        let block = aligned_copy(&pattern(8, 4096));
        let write = f.write_all_at(block.as_slice(), 8192);
        let mut back = AlignedBuf::zeroed(4096);
        let read = f.read_exact_at(back.as_mut_slice(), 4096);
        let sync = f.sync_all();
        (write, read, sync)
    })
    .expect("I/O on a failing handler hung");
    let eio = |r: &std::io::Result<()>| r.as_ref().err().and_then(|e| e.raw_os_error());
    assert_eq!(eio(&write), Some(libc::EIO), "write: {write:?}");
    assert_eq!(eio(&read), Some(libc::EIO), "read: {read:?}");
    assert_eq!(eio(&sync), Some(libc::EIO), "fsync: {sync:?}");

    flaky.fail.store(false, Ordering::SeqCst);
    let f = open_direct(&path);
    let mut back = AlignedBuf::zeroed(4096);
    f.read_exact_at(back.as_mut_slice(), 4096).unwrap();
    assert_eq!(back.as_slice(), block.as_slice());
    drop(f);
    dev.close().expect("close");
    assert_clean(&scratch);
    assert_eq!(
        read_backing(&backing, 8192, 4096),
        vec![0; 4096],
        "the failed write left no data"
    );
}

/// `blkid` says "no filesystem" about a device it cannot read, so NodeStage
/// must not take that for an empty device and format it:
/// `filesystem::check_readable` tells the two apart. An ext4 device whose
/// reads fail is unreadable there (EIO), readable again once they work.
#[test]
fn a_device_that_fails_reads_is_not_taken_for_an_empty_one() {
    use stowage::os::filesystem;
    let scratch = Scratch::new("fuse-unreadable");
    let (_, flaky, dev) = flaky_device(&scratch, 64 * MIB);
    let path = dev.device().path();
    filesystem::check_readable(&path).expect("an empty device reads");
    filesystem::make(&path, "ext4").unwrap();
    assert_eq!(filesystem::probe(&path).unwrap().as_deref(), Some("ext4"));

    flaky.fail.store(true, Ordering::SeqCst);
    let p = path.clone();
    let (probed, readable) = within(HANG, move || {
        (filesystem::probe(&p), filesystem::check_readable(&p))
    })
    .expect("probing a failing device hung");
    eprintln!("blkid on the failing device: {probed:?}");
    let err = readable.expect_err("a device failing every read passed as readable");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    flaky.fail.store(false, Ordering::SeqCst);
    filesystem::check_readable(&path).unwrap();
    assert_eq!(filesystem::probe(&path).unwrap().as_deref(), Some("ext4"));
    dev.close().expect("close");
    assert_clean(&scratch);
}

/// The serving side dies while the loop device is attached (the
/// connection is cut as when the process is killed): I/O on the device
/// fails promptly instead of hanging, and the guard still detaches and
/// unmounts everything and stops the workers.
#[test]
fn aborted_server_fails_io_and_the_guard_cleans_up() {
    let scratch = Scratch::new("fuse-abort");
    let size = 8 * MIB;
    let (_backing, local) = volume(&scratch, size);
    let dev = attach(&scratch, size, local);
    let path = dev.device().path();
    let block = aligned_copy(&pattern(9, 4096));
    open_direct(&path)
        .write_all_at(block.as_slice(), 0)
        .unwrap();

    dev.fuse().abort().expect("abort the connection");
    let p = path.clone();
    let (write, read) = within(HANG, move || {
        let f = open_direct(&p);
        let block = aligned_copy(&pattern(10, 4096));
        let write = f.write_all_at(block.as_slice(), 4096);
        let mut back = AlignedBuf::zeroed(4096);
        let read = f.read_exact_at(back.as_mut_slice(), 0);
        (write, read)
    })
    .expect("I/O after the server died hung");
    assert!(write.is_err(), "a write after the abort succeeded");
    assert!(read.is_err(), "a read after the abort succeeded");
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EIO));

    dev.close().expect("the guard cleans up after an abort");
    assert_clean(&scratch);
}

/// Online expansion: the FUSE file grows, the loop device follows after
/// LOOP_SET_CAPACITY, and data written past the old end lands in the
/// backing file. The same size again is a no-op; shrinking is refused.
#[test]
fn resize_grows_the_file_and_the_loop_device() {
    let scratch = Scratch::new("fuse-resize");
    let (small, big) = (16 * MIB, 48 * MIB);
    let (backing, local) = volume(&scratch, small);
    let dev = attach(&scratch, small, local);
    assert_eq!(dev.device().size_bytes(), Some(small));

    dev.resize(big).expect("grow");
    assert_eq!(std::fs::metadata(dev.fuse().path()).unwrap().len(), big);
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), big);
    assert_eq!(dev.device().size_bytes(), Some(big));
    dev.resize(big).expect("the same size again");
    match dev.resize(small) {
        Err(FuseFileError::Shrink { .. }) => {}
        other => panic!("shrinking: {other:?}"),
    }

    let data = aligned_copy(&pattern(11, 8192));
    let off = big - 8192;
    open_direct(&dev.device().path())
        .write_all_at(data.as_slice(), off)
        .expect("write past the old end");
    dev.close().unwrap();
    assert_clean(&scratch);
    assert_eq!(read_backing(&backing, off, 8192), data.as_slice());
}

/// A bare FuseFile: the mount shows one file of the right size, refuses
/// truncate, and dropping it leaves no mount behind.
#[test]
fn fuse_file_serves_one_file_and_unmounts_on_drop() {
    let scratch = Scratch::new("fuse-bare");
    let (_backing, local) = volume(&scratch, 4 * MIB);
    let mnt = scratch.root.join("fuse");
    let fuse = FuseFile::mount(&mnt, 4 * MIB, local, &FuseOptions::default()).unwrap();
    assert!(is_mounted(&mnt));
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["volume"]);
    assert_eq!(std::fs::metadata(fuse.path()).unwrap().len(), 4 * MIB);
    let f = OpenOptions::new().write(true).open(fuse.path()).unwrap();
    assert!(
        f.set_len(MIB).is_err(),
        "truncate through the mount must be refused"
    );
    assert!(
        f.write_all_at(b"x", 4 * MIB).is_err(),
        "a write past the end must be refused"
    );
    drop(f);
    drop(fuse);
    assert!(!is_mounted(&mnt));
    assert_clean(&scratch);
}

/// Environment of [`fuse_server_child`]: where to mount, the backing file,
/// the size, and the file to create once serving.
const CHILD_ENV: &str = "STOWAGE_FUSE_TEST_CHILD";

/// Not a test of its own: the serving process of
/// [`killed_server_process_fails_io_promptly`], which runs this test
/// binary again with only this function and [`CHILD_ENV`] set. Without
/// that variable it returns at once.
#[test]
#[ignore = "helper process, started by killed_server_process_fails_io_promptly"]
fn fuse_server_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [mnt, backing, size, ready] = parts[..] else {
        panic!("{CHILD_ENV}={spec:?}: want mnt|backing|size|ready");
    };
    let local = Arc::new(LocalFile::open(Path::new(backing)).unwrap());
    let fuse = FuseFile::mount(
        Path::new(mnt),
        size.parse().unwrap(),
        local,
        &FuseOptions::default(),
    )
    .unwrap();
    std::fs::write(ready, b"serving").unwrap();
    // Serve until killed.
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let _ = fuse.size();
    }
}

/// The process serving the FUSE file is killed (SIGKILL) while a loop
/// device is attached to the file: I/O on the device fails promptly with
/// EIO (the kernel aborts the connection when the last /dev/fuse
/// descriptor closes), and the device and the dead mount can be cleaned
/// up.
#[test]
fn killed_server_process_fails_io_promptly() {
    let scratch = Scratch::new("fuse-kill");
    let size = 8 * MIB;
    let (backing, local) = volume(&scratch, size);
    drop(local);
    let mnt = scratch.root.join("fuse");
    let ready = scratch.root.join("ready");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fuse_server_child", "--ignored", "--nocapture"])
        .env(
            CHILD_ENV,
            format!(
                "{}|{}|{size}|{}",
                mnt.display(),
                backing.display(),
                ready.display()
            ),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let start = std::time::Instant::now();
    while !ready.exists() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the serving process exited: {status}");
        }
        assert!(
            start.elapsed() < HANG,
            "the serving process never got ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let device = stowage::os::loopdev::LoopDevice::attach(&mnt.join("volume"), false)
        .expect("attach a loop device to the FUSE file");
    assert!(device.direct_io());
    let path = device.path();
    let block = aligned_copy(&pattern(12, 4096));
    open_direct(&path)
        .write_all_at(block.as_slice(), 0)
        .expect("write while the server lives");

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let p = path.clone();
    let (write, read) = within(HANG, move || {
        let f = open_direct(&p);
        let block = aligned_copy(&pattern(13, 4096));
        let write = f.write_all_at(block.as_slice(), 4096);
        let mut back = AlignedBuf::zeroed(4096);
        let read = f.read_exact_at(back.as_mut_slice(), 0);
        (write, read)
    })
    .expect("I/O after the server was killed hung");
    assert_eq!(write.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    assert_eq!(read.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));

    // What a restarted node plugin does: detach, then unmount the dead
    // mount (its connection is gone, so a lazy unmount is immediate).
    device.detach_settled().unwrap();
    nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).expect("unmount the dead mount");
    assert_clean(&scratch);
    assert_eq!(read_backing(&backing, 0, 4096), block.as_slice());
}
