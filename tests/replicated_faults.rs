//! Replicated volumes under the faults tests/replicated.rs does not inject
//! (issue 14): a slow copy, a copy whose traffic stalls, is held or is
//! refused, a copy whose pool is full, and a copy whose disk has a bad
//! sector or fails writes. A controller and three node agents in network
//! namespaces of their own; node n3's agent is reached only through a
//! fault-injecting TCP proxy in its namespace (it advertises the proxy),
//! or keeps its pool on a small filesystem of its own (n1's, on a disk
//! this process serves, for the disk faults). The volume is published raw on n1 and written by
//! a checker in the style of Jepsen's: unique, checksummed 4 KiB blocks
//! with O_DIRECT and fdatasync, every acknowledged write recorded,
//! everything read back at the end from a fresh publish on another node,
//! and every copy's `data` file compared.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::checker::{BLOCK, History, WAIT, Writer};
use common::cluster::*;
use common::forward::FaultConfig;
use common::*;
use stowage::csi;

const SIZE: i64 = 128 << 20;
/// The engine's per-call timeout (`DriverConfig::timeout`): a copy that
/// takes longer to answer counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Reports how long each step of a test took (to stderr, for the run's
/// record; nothing is asserted on it).
struct Steps {
    test: &'static str,
    last: Instant,
}

impl Steps {
    fn new(test: &'static str) -> Steps {
        Steps {
            test,
            last: Instant::now(),
        }
    }

    fn done(&mut self, step: &str) {
        eprintln!("{}: {step} in {:.1?}", self.test, self.last.elapsed());
        self.last = Instant::now();
    }
}

/// A cluster whose n3 is set up as `n3` says, with a raw replicated
/// volume `name` of three copies created and published on n1.
async fn raw_volume_on_n1(name: &str, n3: NodeOpts) -> (Cluster, csi::Volume, Published) {
    raw_volume_with(name, [NodeOpts::default(), NodeOpts::default(), n3]).await
}

/// [`raw_volume_on_n1`] with each node set up as `nodes` says.
async fn raw_volume_with(name: &str, nodes: [NodeOpts; 3]) -> (Cluster, csi::Volume, Published) {
    raw_volume_full(name, nodes, &[]).await
}

/// [`raw_volume_with`], with `controller` added to the controller's
/// command line.
async fn raw_volume_full(
    name: &str,
    nodes: [NodeOpts; 3],
    controller: &[&str],
) -> (Cluster, csi::Volume, Published) {
    let mut cl = Cluster::start_full(NODES, controller, &nodes).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = replicated_req(name, "3", SIZE, cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl
        .create(req)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    let m = Published::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    (cl, v, m)
}

/// Waits (bounded) until node `out`'s copy is marked out of sync, the
/// other two still in sync, in the condition and the engine's view of
/// each copy; the condition's message then.
async fn wait_marked_out(cl: &mut Cluster, v: &csi::Volume, out: usize) -> String {
    let (_, msg) = cl
        .wait_condition(
            &v.volume_id,
            WAIT,
            &format!("n{out} marked out of sync"),
            |abnormal, m| abnormal && m.contains("2 of 3"),
        )
        .await;
    for i in 1..=NODES {
        assert_eq!(
            msg.contains(&format!("n{i} in-sync")),
            i != out,
            "n{i} in the engine's view of each copy: {msg}"
        );
    }
    msg
}

/// The volume taken down on n1 and published afresh on `on`: every block
/// the writer wrote read back; then every copy's `data` file compared.
async fn verify(
    t: &mut Steps,
    cl: &mut Cluster,
    v: &csi::Volume,
    m: Published,
    h: History,
    on: usize,
    blocks: u64,
) {
    let cap = block_cap(Mode::SingleNodeWriter);
    m.down(cl, &v.volume_id).await;
    t.done("taken down on n1");
    let m = Published::up(cl, on, v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n{on}: {e:?}\n{}", cl.nodes[on - 1].log_tail(40)));
    t.done("published afresh");
    let (h, lost, corrupt) = h.read_back(m.target.clone(), blocks, "").await;
    assert!(h.failures.is_empty(), "writes failed: {:?}", h.failures);
    h.assert_intact(&lost, &corrupt);
    t.done("read back");
    m.down(cl, &v.volume_id).await;
    t.done("taken down again");
    assert_copies_equal(cl, v).await;
}

// ------------------------------------------------------------ the tests

/// A slow copy: n3's traffic is delayed, first a little (writes complete),
/// then by more than the engine's per-call timeout on every chunk: writes
/// still complete (without n3), n3 is marked out of sync, and once the
/// delay is gone it is rebuilt and in sync again; nothing lost, copies
/// byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_copy_is_marked_out_of_sync_and_rebuilt_once_it_is_fast_again() {
    let mut t = Steps::new("slow copy");
    let (mut cl, v, m) = raw_volume_on_n1(
        "rep-slow",
        NodeOpts {
            proxied: true,
            ..Default::default()
        },
    )
    .await;
    let blocks = 16384; // the first 64 MiB
    t.done("cluster up, volume published");
    let w = Writer::start(m.target.clone(), blocks, 32, 0x51_0e);
    w.progress(100, "through the proxy").await;
    assert!(
        cl.proxy(3).faults.counts().0 > 0,
        "nothing went through n3's proxy: the test would prove nothing"
    );
    // The copy's data went over its data link (the proxy's second route),
    // not only over the agent port.
    assert!(
        cl.proxy(3).accepted[1].load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no data link connection to n3: its data bypassed the link"
    );

    // A little slower: writes complete.
    cl.proxy(3).faults.set(FaultConfig {
        delay: Duration::from_millis(5),
        ..Default::default()
    });
    w.progress(100, "n3 delayed 5 ms a chunk").await;
    t.done("writes with n3 delayed 5 ms a chunk");

    // Slower than the engine waits: n3 is marked out, writes go on.
    cl.proxy(3).faults.set(FaultConfig {
        delay: CALL_TIMEOUT + Duration::from_secs(1),
        ..Default::default()
    });
    let msg = wait_marked_out(&mut cl, &v, 3).await;
    t.done("n3 delayed past the call timeout, marked out");
    assert!(msg.contains("published on n1"), "{msg}");
    assert_eq!(cl.copy_in_sync_metric(1, "n3"), Some(0), "n1's engine view");
    assert_eq!(cl.copy_in_sync_metric(1, "n2"), Some(1), "n1's engine view");
    w.progress(150, "n3 slower than the call timeout").await;

    // Fast again: rebuilt, in sync.
    t.done("writes with n3 out");
    cl.proxy(3).faults.set(FaultConfig::default());
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("n3 fast again, rebuilt and in sync");
    cl.wait_copy_in_sync_metric(1, "n3", 1).await;
    w.progress(100, "n3 back").await;
    let h = w.stop().await;
    verify(&mut t, &mut cl, &v, m, h, 2, blocks).await;
    t.done("copies compared");
    cl.delete(&v.volume_id).await.unwrap();
}

/// A copy whose traffic is lost: a share of n3's chunks stall beyond the
/// call timeout (a dropped packet's retransmission), then everything is
/// held (a blackhole), then its connections are cut and new ones refused.
/// Writes keep completing on n1 and n2 throughout (no burst fails within
/// the engine's I/O deadline); healed, n3 is rebuilt; then no acknowledged
/// write is lost or corrupted when read back from n2, and the copies are
/// byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_drops_or_holds_its_traffic_loses_no_acknowledged_write() {
    let mut t = Steps::new("dropping copy");
    let (mut cl, v, m) = raw_volume_on_n1(
        "rep-drop",
        NodeOpts {
            proxied: true,
            ..Default::default()
        },
    )
    .await;
    let blocks = 16384;
    t.done("cluster up, volume published");
    let w = Writer::start(m.target.clone(), blocks, 32, 0xd0_0d);
    w.progress(100, "through the proxy").await;

    // A third of the chunks stall past the call timeout.
    cl.proxy(3).faults.set(FaultConfig {
        stall_share: 0.3,
        stall: CALL_TIMEOUT + Duration::from_secs(1),
        ..Default::default()
    });
    w.progress(150, "n3 stalling").await;
    cl.wait_condition(&v.volume_id, WAIT, "a stalling n3 marked out", |a, _| a)
        .await;
    t.done("n3 stalling, marked out");
    cl.proxy(3).faults.set(FaultConfig::default());
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    w.progress(100, "healed after stalls").await;
    t.done("stalls healed, in sync");

    // Everything held.
    cl.proxy(3).faults.set(FaultConfig {
        hold: true,
        ..Default::default()
    });
    w.progress(150, "n3 held").await;
    cl.wait_condition(&v.volume_id, WAIT, "a held n3 marked out", |a, _| a)
        .await;
    t.done("n3 held, marked out");
    cl.proxy(3).faults.set(FaultConfig::default());
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    w.progress(100, "healed after the hold").await;
    t.done("hold lifted, in sync");

    // Cut and refused.
    cl.proxy(3).faults.set(FaultConfig {
        refuse: true,
        ..Default::default()
    });
    cl.proxy(3).cut();
    w.progress(150, "n3 refused").await;
    cl.wait_condition(&v.volume_id, WAIT, "a refused n3 marked out", |a, _| a)
        .await;
    t.done("n3 cut and refused, marked out");
    cl.proxy(3).faults.set(FaultConfig::default());
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    w.progress(100, "healed after refusal").await;
    t.done("accepting again, in sync");

    let (passed, stalled) = cl.proxy(3).faults.counts();
    eprintln!("n3's proxy: {passed} chunks passed, {stalled} stalled");
    assert!(stalled > 0, "no chunk stalled: the test would prove less");
    let h = w.stop().await;
    verify(&mut t, &mut cl, &v, m, h, 2, blocks).await;
    t.done("copies compared");
    cl.delete(&v.volume_id).await.unwrap();
}

/// A cut data link does not leave a copy's data on gRPC: n3's connections
/// are cut under writes, three times. The calls in flight on the link fail,
/// so the engine marks n3 out of sync at once (a failed call counts as a
/// failed copy), attaches it again and rebuilds it; n3's data then goes
/// over a new link connection (the link client forgot the broken link
/// before the engine saw the failure, so the attach's answer offers it
/// anew). Nothing lost, copies byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_data_link_is_dialled_again_after_the_rebuild() {
    use std::sync::atomic::Ordering;
    let mut t = Steps::new("cut link");
    let (mut cl, v, m) = raw_volume_on_n1(
        "rep-cut",
        NodeOpts {
            proxied: true,
            ..Default::default()
        },
    )
    .await;
    let blocks = 16384;
    let w = Writer::start(m.target.clone(), blocks, 32, 0xc0_7a);
    w.progress(100, "through the proxy").await;
    let counter = std::sync::Arc::clone(&cl.proxy(3).accepted);
    let links = || counter[1].load(Ordering::Relaxed);
    let before = links();
    assert!(before > 0, "no data link connection to n3");
    for cut in 1..=3 {
        let was = links();
        cl.proxy(3).cut();
        w.progress(100, "after a cut").await;
        cl.wait_in_sync(&v.volume_id, WAIT).await;
        let until = Instant::now() + WAIT;
        while links() == was {
            assert!(
                Instant::now() < until,
                "cut {cut}: n3 is in sync but its data link was not dialled again"
            );
            w.progress(10, "waiting for the link").await;
        }
        t.done("cut, in sync, link dialled again");
    }
    w.progress(100, "after the cuts").await;
    eprintln!(
        "data link connections to n3: {before} before the cuts, {} after",
        links()
    );
    let h = w.stop().await;
    verify(&mut t, &mut cl, &v, m, h, 2, blocks).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// Fills `dir`'s filesystem with the file `dir/fill` until writes fail
/// with ENOSPC (most of it allocated at once with fallocate(1), the rest
/// written); the file's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("fill");
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let out = std::process::Command::new("fallocate")
        .args(["-l", &free.saturating_sub(4 << 20).to_string()])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fallocate: {out:?}");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for chunk in [1 << 20, 4096] {
        let buf = vec![0x55u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n == buf.len() => {}
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
    }
    match f.sync_all() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        Err(e) => panic!("sync {}: {e}", path.display()),
    }
    path
}

/// A copy whose pool is full: n3 keeps its pool on a 320 MiB filesystem of
/// its own, filled up while the volume is written across all its 128 MiB
/// (so n3's sparse copy needs new blocks): its writes fail with ENOSPC, I/O
/// goes on with n1 and n2, n3 is marked out of sync (the condition, the
/// engine's metrics); once the space is freed it is rebuilt and in sync;
/// nothing lost or corrupted, read back from n3 itself, and the copies are
/// byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_with_a_full_pool_is_marked_out_of_sync_and_rebuilt_once_space_is_freed() {
    let mut t = Steps::new("full pool");
    let (mut cl, v, m) = raw_volume_on_n1(
        "rep-full",
        NodeOpts {
            pool_bytes: Some(320 << 20),
            ..Default::default()
        },
    )
    .await;
    let blocks = (SIZE as usize / BLOCK) as u64; // all of it
    t.done("cluster up, volume published");
    let w = Writer::start(m.target.clone(), blocks, 32, 0xf0_11);
    w.progress(100, "before the pool is full").await;
    assert!(!cl.condition(&v.volume_id).await.0);

    let pool = cl.state_dir(3).join("pool");
    let filler = tokio::task::spawn_blocking(move || fill(&pool))
        .await
        .unwrap();
    t.done("n3's pool filled");
    w.progress(150, "n3's pool full").await;
    wait_marked_out(&mut cl, &v, 3).await;
    t.done("n3 marked out");
    assert_eq!(cl.copy_in_sync_metric(1, "n3"), Some(0), "n1's engine view");
    w.progress(100, "n3 out of sync").await;
    assert!(
        [0, 2]
            .iter()
            .any(|&k| cl.nodes[k].log_text().contains("No space left on device")),
        "n3 never ran out of space (neither its log nor n1's says so): the test would prove nothing\n{}",
        cl.nodes[0].log_tail(30)
    );

    // Space again: rebuilt, in sync.
    std::fs::remove_file(&filler).unwrap();
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("space freed, n3 rebuilt and in sync");
    cl.wait_copy_in_sync_metric(1, "n3", 1).await;
    w.progress(100, "n3 rebuilt").await;
    let h = w.stop().await;
    verify(&mut t, &mut cl, &v, m, h, 3, blocks).await;
    t.done("copies compared");
    cl.delete(&v.volume_id).await.unwrap();
}

/// A disk that fails: reads touching a bad sector fail (EIO) until the
/// sector is written again (a disk remaps it then), and writes to the
/// ranges set failing fail (EIO) until they are cleared.
struct FaultyDisk {
    inner: stowage::os::fuse_file::LocalFile,
    /// Byte ranges [start, end) that fail reads.
    bad: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Byte ranges [start, end) that fail writes.
    failing_writes: std::sync::Mutex<Vec<(u64, u64)>>,
    failed_reads: std::sync::atomic::AtomicU64,
    failed_writes: std::sync::atomic::AtomicU64,
}

fn overlaps(ranges: &[(u64, u64)], offset: u64, len: usize) -> bool {
    let end = offset + len as u64;
    ranges.iter().any(|&(s, e)| s < end && offset < e)
}

impl FaultyDisk {
    fn new(path: &Path, size: u64) -> FaultyDisk {
        FaultyDisk {
            inner: stowage::os::fuse_file::LocalFile::create(path, size).expect("disk image"),
            bad: Default::default(),
            failing_writes: Default::default(),
            failed_reads: Default::default(),
            failed_writes: Default::default(),
        }
    }

    fn spoil(&self, ranges: Vec<(u64, u64)>) {
        self.bad.lock().unwrap().extend(ranges);
    }

    fn bad(&self) -> Vec<(u64, u64)> {
        self.bad.lock().unwrap().clone()
    }

    fn fail_writes(&self, ranges: Vec<(u64, u64)>) {
        *self.failing_writes.lock().unwrap() = ranges;
    }

    fn failed_reads(&self) -> u64 {
        self.failed_reads.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn failed_writes(&self) -> u64 {
        self.failed_writes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl stowage::os::fuse_file::BlockHandler for FaultyDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if overlaps(&self.bad.lock().unwrap(), offset, buf.len()) {
            self.failed_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if overlaps(&self.failing_writes.lock().unwrap(), offset, data.len()) {
            self.failed_writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.write_at(offset, data)?;
        // What was written reads again.
        let end = offset + data.len() as u64;
        let mut bad = self.bad.lock().unwrap();
        *bad = bad
            .iter()
            .flat_map(|&(s, e)| [(s, e.min(offset)), (s.max(end), e)])
            .filter(|&(s, e)| s < e)
            .collect();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn resize(&self, len: u64) -> std::io::Result<()> {
        self.inner.resize(len)
    }
}

/// [`raw_volume_with`] where n1's pool is on a [`FaultyDisk`] this process
/// serves; with the disk's scratch dir, to be kept until the cluster is
/// gone (the cluster closes the disk after its nodes stopped).
async fn faulty_n1(name: &str) -> (Scratch, Arc<FaultyDisk>, Cluster, csi::Volume, Published) {
    let dir = Scratch::new("faulty-disk");
    let bytes = 640 << 20;
    let disk = Arc::new(FaultyDisk::new(&dir.root.join("disk.img"), bytes));
    let n1 = NodeOpts {
        pool_bytes: Some(bytes),
        pool_disk: Some(PoolDisk(disk.clone())),
        ..Default::default()
    };
    let (cl, v, m) = raw_volume_with(name, [n1, NodeOpts::default(), NodeOpts::default()]).await;
    (dir, disk, cl, v, m)
}

/// [`raw_volume_with`] where n2's pool is on a [`FaultyDisk`] this process
/// serves and every node scrubs every `every` seconds at `rate` MiB/s,
/// the controller run with `controller` added; with the disk's scratch
/// dir, to be kept until the cluster is gone.
async fn scrubbing_with_faulty_n2(
    name: &str,
    every: u64,
    rate: u64,
    controller: &[&str],
) -> (Scratch, Arc<FaultyDisk>, Cluster, csi::Volume, Published) {
    let dir = Scratch::new("faulty-disk");
    let bytes = 640 << 20;
    let disk = Arc::new(FaultyDisk::new(&dir.root.join("disk.img"), bytes));
    let node = |pool_disk: Option<PoolDisk>| NodeOpts {
        pool_bytes: pool_disk.as_ref().map(|_| bytes),
        pool_disk,
        ..scrubbing(every, rate)
    };
    let (cl, v, m) = raw_volume_full(
        name,
        [node(None), node(Some(PoolDisk(disk.clone()))), node(None)],
        controller,
    )
    .await;
    (dir, disk, cl, v, m)
}

/// A cluster of three nodes, each [`scrubbing`] as told.
async fn scrubbing_cluster(every: u64, rate: u64) -> Cluster {
    let node = || scrubbing(every, rate);
    Cluster::start_with(&[node(), node(), node()]).await
}

/// A node that scrubs every `every` seconds (0: never) at `rate` MiB/s.
fn scrubbing(every: u64, rate: u64) -> NodeOpts {
    NodeOpts {
        args: vec![
            "--replica-scrub-every".to_owned(),
            every.to_string(),
            "--replica-scrub-rate".to_owned(),
            rate.to_string(),
        ],
        ..Default::default()
    }
}

/// Takes the volume down, compares every copy with n1's ([`assert_copies_equal`])
/// and deletes the volume; then the cluster stops.
async fn down_and_compare(mut cl: Cluster, v: csi::Volume, m: Published) {
    m.down(&mut cl, &v.volume_id).await;
    assert_copies_equal(&cl, &v).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// Every copy's `data` file compared with n1's as the disks hold them (a
/// page its disk failed to write stays in the cache, clean, until
/// dropped).
async fn assert_copies_equal(cl: &Cluster, v: &csi::Volume) {
    for i in 1..=NODES {
        uncache(&cl.copy_data(i, &v.volume_id));
    }
    for i in 2..=NODES {
        assert!(
            cl.same_copies(1, i, &v.volume_id).await,
            "n{i}'s copy differs from n1's"
        );
    }
}

/// Changes block `block` of a copy's `data` file behind its back (its
/// tags unchanged), durably.
fn change_block(data: &Path, block: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(data).unwrap();
    f.write_all_at(&[0x5a; BLOCK], block * BLOCK as u64)
        .unwrap();
    f.sync_all().unwrap();
}

/// Block `block` of a copy's `data` file as its disk holds it.
fn file_block(data: &Path, block: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    uncache(data);
    let mut buf = vec![0u8; BLOCK];
    std::fs::File::open(data)
        .unwrap()
        .read_exact_at(&mut buf, block * BLOCK as u64)
        .unwrap();
    buf
}

/// Waits (bounded) until block `block` of a copy's `data` file holds what
/// [`write_blocks`] wrote there again.
async fn wait_block_back(cl: &Cluster, data: &Path, block: u64) {
    let until = Instant::now() + WAIT;
    while file_block(data, block) != common::checker::block_bytes(block, 1) {
        assert!(
            Instant::now() < until,
            "{}'s changed block {block} was never written again\n{}",
            data.display(),
            own_log(cl, 1, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drops what the page cache holds of `file`, so its next read goes to
/// the disk.
fn uncache(file: &Path) {
    let f = std::fs::File::open(file).unwrap();
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .expect("fadvise");
}

/// The last `n` lines of node `i`'s own log (its HTTP/2 and TLS chatter
/// left out).
fn own_log(cl: &Cluster, i: usize, n: usize) -> String {
    let text = cl.nodes[i - 1].log_text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("stowage")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Blocks `0..blocks` of the published raw volume at `target`, each
/// written once ([`common::checker::block_bytes`], write 1) with O_DIRECT,
/// then synced.
async fn write_blocks(target: &Path, blocks: u64) {
    let target = target.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let f = common::checker::open_direct(&target);
        let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(BLOCK);
        for b in 0..blocks {
            buf.as_mut_slice()
                .copy_from_slice(&common::checker::block_bytes(b, 1));
            f.write_all_at(buf.as_slice(), b * BLOCK as u64).unwrap();
        }
        f.sync_all().unwrap();
    })
    .await
    .unwrap();
}

/// Waits (bounded) until every bad sector of `disk` (node `node`'s pool)
/// was written again.
async fn wait_rewritten(cl: &Cluster, disk: &FaultyDisk, node: &str) {
    let until = Instant::now() + WAIT;
    while !disk.bad().is_empty() {
        assert!(
            Instant::now() < until,
            "{node}'s bad sector was never written again: {:?}\n{}",
            disk.bad(),
            own_log(cl, 1, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Block `block` of the published raw volume at `target`, read with
/// O_DIRECT.
fn read_block(target: &Path, block: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = common::checker::open_direct(target);
    let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(BLOCK);
    f.read_exact_at(buf.as_mut_slice(), block * BLOCK as u64)?;
    Ok(buf.as_slice().to_vec())
}

/// A latent sector error on the copy the engine reads from (its own, on
/// n1): a read of that block must still return its bytes (from another
/// copy), not EIO, and the bad copy must be written again there (which
/// remaps the sector), so that it reads right once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_the_local_copy_cannot_read_is_read_from_another_copy_and_rewritten() {
    let mut t = Steps::new("bad sector");
    // The scratch dir first: it outlives the cluster, which closes the
    // disk after its nodes stopped.
    let (_disk_dir, disk, mut cl, v, m) = faulty_n1("rep-bad").await;
    t.done("cluster up, volume published");
    let blocks = 64;
    write_blocks(&m.target, blocks).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    assert!(!cl.condition(&v.volume_id).await.0);

    let bad_block = 37;
    let data = cl.copy_data(1, &v.volume_id);
    let at = bad_block * BLOCK as u64;
    disk.spoil(disk_ranges(&data, at, at + BLOCK as u64));
    uncache(&data);
    let read = {
        let target = m.target.clone();
        tokio::task::spawn_blocking(move || read_block(&target, bad_block))
            .await
            .unwrap()
    };
    t.done("the bad block read");
    assert!(
        disk.failed_reads() > 0,
        "the read never reached the bad sector: the test would prove nothing"
    );
    let read = read.unwrap_or_else(|e| {
        panic!(
            "reading the block n1's copy cannot read: {e}\n{}",
            own_log(&cl, 1, 40)
        )
    });
    assert!(
        read == common::checker::block_bytes(bad_block, 1),
        "block {bad_block} read back other bytes"
    );
    // Why n1 went out is there to see (once the engine's view is
    // refreshed): in the condition and in n1's metrics.
    let n1_failed = |m: &str| {
        // "…; engine Running at epoch E: n1 <its state>, n2 …"
        m.find(": n1 ")
            .and_then(|at| m[at..].split(", n2 ").next())
            .is_some_and(|n1| n1.contains("failed calls") && n1.contains("Input/output error"))
    };
    cl.wait_condition(&v.volume_id, WAIT, "n1's failed read shown", |_, m| {
        n1_failed(m)
    })
    .await;
    assert!(
        cl.copy_metric(1, "stowage_replicated_copy_call_errors_total", "n1") >= Some(1),
        "n1's metrics count no failed call"
    );

    // Repaired: n1's copy written again there, in sync, and it reads.
    wait_rewritten(&cl, &disk, "n1").await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("n1's copy rewritten and in sync");
    let failed = disk.failed_reads();
    uncache(&data);
    let again = {
        let target = m.target.clone();
        tokio::task::spawn_blocking(move || read_block(&target, bad_block))
            .await
            .unwrap()
    }
    .expect("read the block again");
    assert!(again == common::checker::block_bytes(bad_block, 1));
    assert_eq!(disk.failed_reads(), failed, "a bad read after the repair");
    m.down(&mut cl, &v.volume_id).await;
    assert_copies_equal(&cl, &v).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// A copy whose disk fails writes (n1's, the engine's own): its flushes
/// fail, so it is marked out of sync while writes go on with the other
/// copies; once the disk writes again it is rebuilt and rejoins. No
/// acknowledged write is lost, and every copy holds the same bytes on its
/// disk (compared past the page cache, which still holds what the disk
/// failed to write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_disk_fails_writes_is_marked_out_and_rebuilt_once_it_writes_again() {
    let mut t = Steps::new("failing writes");
    let (_disk_dir, disk, mut cl, v, m) = faulty_n1("rep-wfail").await;
    t.done("cluster up, volume published");
    // The range written, written once and flushed first: n1's copy has
    // its place on the disk, where it is written again in place.
    let blocks = 8192u64; // 32 MiB
    {
        let target = m.target.clone();
        tokio::task::spawn_blocking(move || {
            write_pattern(&target, 0, blocks * BLOCK as u64, None);
            common::checker::open_direct(&target).sync_all().unwrap();
        })
        .await
        .unwrap();
    }
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let data = cl.copy_data(1, &v.volume_id);
    let end = blocks * BLOCK as u64;
    let ranges = disk_ranges(&data, 0, end);
    t.done("written once");

    let w = Writer::start(m.target.clone(), blocks, 32, 0xfa_11);
    w.progress(100, "before n1's disk fails").await;
    disk.fail_writes(ranges);
    wait_marked_out(&mut cl, &v, 1).await;
    t.done("n1 marked out");
    assert!(
        disk.failed_writes() > 0,
        "no write reached n1's failing disk: the test would prove nothing"
    );
    w.progress(200, "n1's disk failing").await;

    disk.fail_writes(Vec::new());
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("n1's disk writes again; n1 rebuilt and in sync");
    w.progress(100, "n1 back").await;
    let h = w.stop().await;
    verify(&mut t, &mut cl, &v, m, h, 2, blocks).await;
    t.done("copies compared");
    cl.delete(&v.volume_id).await.unwrap();
}

/// Writes `len` bytes of pattern `seed` (zeros for None) at `at` of the
/// published raw volume, 1 MiB at a time with O_DIRECT (no fsync).
fn write_pattern(target: &Path, at: u64, len: u64, seed: Option<u64>) {
    use std::os::unix::fs::FileExt;
    let f = common::checker::open_direct(target);
    let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(1 << 20);
    for mib in 0..len >> 20 {
        let off = at + (mib << 20);
        if let Some(seed) = seed {
            buf.as_mut_slice()
                .copy_from_slice(&pattern(seed ^ off, 1 << 20));
        }
        f.write_all_at(buf.as_slice(), off).unwrap();
    }
}

/// Whether `len` bytes at `at` of the published raw volume hold pattern
/// `seed` (as [`write_pattern`] wrote it); the first MiB that does not.
fn check_pattern(target: &Path, at: u64, len: u64, seed: u64) -> Result<(), u64> {
    use std::os::unix::fs::FileExt;
    let f = common::checker::open_direct(target);
    let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(1 << 20);
    for mib in 0..len >> 20 {
        let off = at + (mib << 20);
        f.read_exact_at(buf.as_mut_slice(), off).unwrap();
        if buf.as_slice() != &pattern(seed ^ off, 1 << 20)[..] {
            return Err(off);
        }
    }
    Ok(())
}

/// The same failing disk under long sequential writes with one fsync at
/// the end: the copy's writeback pacing waits for the writeback its disk
/// failed long before the fsync, whose own writeback then succeeds. The
/// failure must still reach the flush: n1 is marked out, rebuilt once its
/// disk writes again, and every byte reads back, from every copy's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_disk_failed_writes_before_a_flush_is_not_taken_for_flushed() {
    let mut t = Steps::new("failed writeback");
    let (_disk_dir, disk, mut cl, v, m) = faulty_n1("rep-wback").await;
    t.done("cluster up, volume published");
    // The first 32 MiB written and flushed: they have their place on n1's
    // disk, which then fails writes there. The rest is written afresh
    // (elsewhere on the disk, which writes it).
    let failing = 32u64 << 20;
    let size = SIZE as u64;
    let target = m.target.clone();
    tokio::task::spawn_blocking(move || {
        write_pattern(&target, 0, failing, Some(0));
        common::checker::open_direct(&target).sync_all().unwrap();
    })
    .await
    .unwrap();
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    disk.fail_writes(disk_ranges(&cl.copy_data(1, &v.volume_id), 0, failing));
    let target = m.target.clone();
    tokio::task::spawn_blocking(move || {
        write_pattern(&target, 0, failing, Some(1));
        write_pattern(&target, failing, size - failing, Some(1));
        // The pacing's last waits end before the fsync.
        std::thread::sleep(Duration::from_secs(1));
        common::checker::open_direct(&target).sync_all().unwrap();
    })
    .await
    .unwrap();
    t.done("written, n1's disk failing");
    assert!(
        disk.failed_writes() > 0,
        "no write reached n1's failing disk: the test would prove nothing"
    );
    wait_marked_out(&mut cl, &v, 1).await;
    t.done("n1 marked out");

    disk.fail_writes(Vec::new());
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("n1's disk writes again; n1 rebuilt and in sync");
    let cap = block_cap(Mode::SingleNodeWriter);
    m.down(&mut cl, &v.volume_id).await;
    let m = Published::up(&mut cl, 2, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    let target = m.target.clone();
    let read = tokio::task::spawn_blocking(move || check_pattern(&target, 0, size, 1))
        .await
        .unwrap();
    assert_eq!(
        read,
        Ok(()),
        "the MiB at this offset reads back other bytes"
    );
    m.down(&mut cl, &v.volume_id).await;
    for i in 1..=NODES {
        uncache(&cl.copy_data(i, &v.volume_id));
    }
    for i in 2..=NODES {
        assert!(
            cl.same_copies(1, i, &v.volume_id).await,
            "n{i}'s copy differs from n1's on their disks"
        );
    }
    t.done("read back, copies compared");
    cl.delete(&v.volume_id).await.unwrap();
}

/// The scrub: with n2's pool on a [`FaultyDisk`], every node scrubbing
/// every 3 s. A bad sector on n2's copy (never read: reads go to n1's
/// own copy) is found by the scrub and written again; bytes changed
/// behind n3's copy's back (its tags unchanged) are outvoted by n1 and
/// n2 and written again too. Before either, whole passes repair nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_rewrites_a_bad_sector_and_changed_bytes_on_copies_never_read() {
    let mut t = Steps::new("scrub");
    let (dir, disk, mut cl, v, m) = scrubbing_with_faulty_n2("rep-scrub", 3, 64, &[]).await;
    t.done("cluster up, volume published");
    let blocks = 64;
    write_blocks(&m.target, blocks).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let metric = |cl: &Cluster, name: &str, copy: &str| {
        cl.copy_metric(1, &format!("stowage_replicated_scrub_{name}_total"), copy)
            .unwrap_or(0)
    };
    let passes = |cl: &Cluster| {
        cl.volume_metric(1, "stowage_replicated_scrub_passes_total")
            .unwrap_or(0)
    };
    // Two whole passes over healthy copies: nothing to repair.
    let until = Instant::now() + WAIT;
    while passes(&cl) < 2 {
        assert!(
            Instant::now() < until,
            "no two scrub passes within {WAIT:?}\n{}",
            own_log(&cl, 1, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.done("two passes");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(metric(&cl, "repairs", n), 0, "{n} repaired while healthy");
    }
    assert_eq!(
        cl.volume_metric(1, "stowage_replicated_scrub_unresolved_total"),
        Some(0)
    );
    assert!(
        cl.volume_metric(1, "stowage_replicated_scrub_regions_total")
            >= Some(2 * (SIZE as u64 >> 20)),
        "two passes check every region twice"
    );

    // A bad sector on n2's copy.
    let bad_block = 37;
    let data = cl.copy_data(2, &v.volume_id);
    let at = bad_block * BLOCK as u64;
    disk.spoil(disk_ranges(&data, at, at + BLOCK as u64));
    // Left in n2's page cache, as written: the scrub reads past it.
    wait_rewritten(&cl, &disk, "n2").await;
    t.done("n2's bad sector found and written again");
    assert!(
        disk.failed_reads() > 0,
        "the scrub never read the bad sector"
    );
    assert!(metric(&cl, "repairs", "n2") >= 1, "n2's repair not counted");
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let (_, msg) = cl.condition(&v.volume_id).await;
    assert!(msg.contains("repaired by the scrub"), "{msg}");

    // Other bytes on n3's copy, behind its back (its tag unchanged).
    let changed = 50;
    let n3_data = cl.copy_data(3, &v.volume_id);
    change_block(&n3_data, changed);
    wait_block_back(&cl, &n3_data, changed).await;
    t.done("n3's changed block outvoted and written again");
    assert!(metric(&cl, "repairs", "n3") >= 1, "n3's repair not counted");
    assert_eq!(metric(&cl, "repairs", "n1"), 0, "n1 repaired");
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    down_and_compare(cl, v, m).await;
    drop(dir);
}

/// `stowage volume scrub` starts a pass now, in the engine of the node
/// the volume is published on (every agent's own schedule off): bytes
/// changed behind n3's copy's back are written again. A pass under way is
/// said so; a volume not published, or not replicated, is refused with the
/// code that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_asked_for_checks_every_copy_now() {
    let mut cl = scrubbing_cluster(0, 16).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = replicated_req("rep-scrub-now", "3", SIZE, cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    // Not published: each copy's node reads its copy instead; asked
    // again (128 MiB at 16 MiB/s: under way for seconds), each says so.
    let started = |text: &str| -> Vec<bool> {
        let r: serde_json::Value = serde_json::from_str(text).unwrap();
        r["idle"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["started"] == true)
            .collect()
    };
    let (ok, text, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    assert_idle_reads(&text);
    assert_eq!(started(&text), [true; 3], "{text}");
    let (ok, text, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    assert_eq!(started(&text), [false; 3], "{text}");
    let out = cl.client(&["volume", "scrub", &v.volume_id]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        table.contains("COPY NODE") && table.contains("under way"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(" of 128")).count(),
        3,
        "{table}"
    );
    let scrub = scrub_json;
    let (ok, _, err) = scrub(&cl, "n1:0123456789abcdef0123456789abcdef");
    assert!(!ok && err.contains("INVALID_ARGUMENT"), "{err}");
    let (ok, _, err) = scrub(&cl, "replicated:0123456789abcdef0123456789abcdef");
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");

    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    // A node asked to read its copy of a volume published meanwhile (the
    // controller found it unpublished) says so by its code, which the
    // controller passes on: the engine scrubs it now.
    for i in 1..=NODES {
        let volume = v.volume_id.strip_prefix("replicated:").unwrap().to_owned();
        let answer = cl.as_controller(i, move |mut c| {
            Box::pin(async move {
                c.check_idle(stowage::cluster::proto::GetReplicaRequest { volume })
                    .await
                    .map(|_| ())
            })
        });
        let e = answer.expect_err("a published copy read as idle");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "n{i}: {e:?}");
        assert!(e.message().contains("not published"), "n{i}: {e:?}");
    }
    write_blocks(&m.target, 64).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let changed = 50;
    let n3_data = cl.copy_data(3, &v.volume_id);
    change_block(&n3_data, changed);
    // No scrub of its own: the change stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(file_block(&n3_data, changed) != common::checker::block_bytes(changed, 1));

    let (ok, text, err) = scrub(&cl, &v.volume_id);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["node"], "n1", "{r}");
    assert_eq!(r["started"], true, "{r}");
    assert_eq!(r["regions"], SIZE >> 20, "{r}");
    // 128 regions at 16 MiB/s: under way for seconds.
    let (ok, text, err) = scrub(&cl, &v.volume_id);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["started"], false, "a second pass started: {r}");
    wait_block_back(&cl, &n3_data, changed).await;
    cl.wait_condition(&v.volume_id, WAIT, "the pass done", |_, m| {
        m.contains("scrub: 1 passes")
    })
    .await;
    m.down(&mut cl, &v.volume_id).await;
    let (ok, text, err) = scrub(&cl, &v.volume_id);
    assert!(ok, "{err}");
    assert_idle_reads(&text);
    // Not published, with no engine to compare them: each node's read
    // sums its copy, and the controller compares the sums.
    cl.wait_condition(&v.volume_id, WAIT, "the copies' reads compared", |_, m| {
        m.contains("n1, n2, n3 hold the same bytes")
    })
    .await;
    let (abnormal, said) = cl.condition(&v.volume_id).await;
    assert!(!abnormal, "{said}");
    let gauge = |cl: &Cluster| {
        cl.controller_metric_with(
            "stowage_replicated_volume_abnormal",
            &format!("volume=\"{}\"", v.volume_id),
        )
    };
    assert_eq!(gauge(&cl), Some(0));
    change_block(&n3_data, changed);
    let (ok, _, err) = scrub(&cl, &v.volume_id);
    assert!(ok, "{err}");
    // Found, then (by the controller's next round, within 30 s) taken out
    // of sync, which the condition also says: either may be seen first.
    let other = "other bytes than n1, n2";
    let (abnormal, said) = cl
        .wait_condition(&v.volume_id, WAIT, "n3's other bytes found", |_, m| {
            m.contains(other)
        })
        .await;
    assert!(abnormal, "copies that differ, yet normal: {said}");
    let (abnormal, listed) = cl.listed_condition(&v.volume_id).await;
    assert!(abnormal && listed.contains(other), "ListVolumes: {listed}");
    // The controller's gauge, for alerts with no Kubernetes.
    assert_eq!(gauge(&cl), Some(1));
    let (_, said) = cl
        .wait_condition(&v.volume_id, WAIT, "n3 taken out of sync", |_, m| {
            m.starts_with("2 of 3 copies in sync")
        })
        .await;
    assert!(
        said.contains("(out of sync: its read at record version")
            && said.contains(&format!(
                "found {other}; the next engine rebuilds it in full)"
            )),
        "{said}"
    );
    // Published on n3 itself, whose copy is no longer trusted: the block
    // reads as written, never as its disk holds it, and the engine
    // rebuilds the copy.
    let m = Published::up(&mut cl, 3, &v, &cap).await.unwrap();
    let target = m.target.clone();
    let read = tokio::task::spawn_blocking(move || read_block(&target, changed))
        .await
        .unwrap()
        .unwrap();
    assert!(
        read == common::checker::block_bytes(changed, 1),
        "n3's engine read block {changed} from its own changed copy"
    );
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    m.down(&mut cl, &v.volume_id).await;
    assert!(file_block(&n3_data, changed) == common::checker::block_bytes(changed, 1));
    let (ok, _, err) = scrub(&cl, &v.volume_id);
    assert!(ok, "{err}");
    let (abnormal, said) = cl
        .wait_condition(&v.volume_id, WAIT, "the rebuilt copy read alike", |_, m| {
            m.contains("n1, n2, n3 hold the same bytes")
        })
        .await;
    assert!(
        !abnormal && said.starts_with("3 of 3 copies in sync"),
        "{said}"
    );
    cl.delete(&v.volume_id).await.unwrap();
}

/// `stowage -o json volume scrub ID`: (success, stdout, stderr).
fn scrub_json(cl: &Cluster, id: &str) -> (bool, String, String) {
    client_json(cl, &["volume", "scrub", id])
}

/// The client run with `-o json` and `args`: (success, stdout, stderr).
fn client_json(cl: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = cl.client(&[&["-o", "json"][..], args].concat());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), text, err)
}

/// `volume scrub`'s answer for a volume not published: no engine node, a
/// read under way on each of n1..n3, none failed.
fn assert_idle_reads(text: &str) {
    let r: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(r["node"], "", "{r}");
    let idle = r["idle"].as_array().unwrap_or_else(|| panic!("{r}"));
    let nodes: Vec<&str> = idle.iter().map(|c| c["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["n1", "n2", "n3"], "{r}");
    for c in idle {
        assert!(c.get("error").is_none(), "{r}");
        assert_eq!(c["regions"], SIZE >> 20, "{r}");
    }
}

/// Where the pass under way is, from a volume's condition ("at MiB N").
fn scrub_at(msg: &str) -> Option<u64> {
    let rest = &msg[msg.find("at MiB ")? + "at MiB ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A scrub pass an unpublish stopped resumes where it got when the volume
/// is published again (the copies keep how far it got), long before the
/// period is up and not from the start; once done, the volume's condition
/// says when the last whole pass ended and when the next is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_pass_an_unpublish_stopped_resumes_where_it_got() {
    let mut t = Steps::new("scrub resumed");
    // A pass of 128 MiB at 4 MiB/s takes 32 s; one due starts within 20 s.
    let mut cl = scrubbing_cluster(20, 4).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = replicated_req("rep-scrub-resume", "3", SIZE, cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    write_blocks(&m.target, 64).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let out = cl.client(&["volume", "scrub", &v.volume_id]);
    assert!(out.status.success(), "{out:?}");
    let (_, msg) = cl
        .wait_condition(&v.volume_id, WAIT, "the pass past MiB 24", |_, m| {
            scrub_at(m).is_some_and(|at| at >= 24)
        })
        .await;
    assert!(!msg.contains("last whole pass"), "{msg}");
    m.down(&mut cl, &v.volume_id).await;
    let stopped = scrub_at(&msg).unwrap();
    t.done(&format!("pass stopped by an unpublish past MiB {stopped}"));

    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    let (_, msg) = cl
        .wait_condition(&v.volume_id, WAIT, "a pass under way", |_, m| {
            scrub_at(m).is_some()
        })
        .await;
    let resumed = scrub_at(&msg).unwrap();
    assert!(
        resumed >= stopped,
        "the new engine's pass started at MiB {resumed}, not where the last stopped ({stopped}): {msg}"
    );
    assert!(msg.contains("0 passes"), "{msg}");
    t.done(&format!("resumed at MiB {resumed}"));
    let resumed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (_, msg) = cl
        .wait_condition(&v.volume_id, WAIT, "the pass done", |_, m| {
            m.contains("scrub: 1 passes")
        })
        .await;
    let checked: u64 = msg
        .split("scrub: 1 passes, ")
        .nth(1)
        .and_then(|r| r.split(" MiB checked").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(
        checked <= (SIZE as u64 >> 20) - stopped,
        "the resumed pass checked {checked} MiB: {msg}"
    );
    assert!(msg.contains("the last whole pass"), "{msg}");
    assert!(msg.contains("the next due in"), "{msg}");
    // Each copy's node says when it was last read whole, and by what.
    for i in 1..=NODES {
        let at = checked_at(&cl, i, &v, "scrub").unwrap_or(0);
        assert!(
            at >= resumed_at,
            "n{i}: last scrubbed at {at}, the pass resumed at {resumed_at}"
        );
        assert_eq!(
            checked_at(&cl, i, &v, "node"),
            Some(0),
            "n{i}: read while published"
        );
    }
    t.done("pass done");
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// The block whose sector [`idle_with_bad_sector_on_n2`] spoils.
const BAD_BLOCK: u64 = 37;

/// [`scrubbing_with_faulty_n2`] (every `every` seconds, at 256 MiB/s)
/// with a raw volume published on n1, written, then taken down; then a
/// bad sector in block [`BAD_BLOCK`] of n2's copy. The controller runs
/// with `controller` added.
async fn idle_with_bad_sector_on_n2(
    name: &str,
    every: u64,
    controller: &[&str],
) -> (Scratch, Arc<FaultyDisk>, Cluster, csi::Volume) {
    let (dir, disk, mut cl, v, m) = scrubbing_with_faulty_n2(name, every, 256, controller).await;
    write_blocks(&m.target, 64).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    m.down(&mut cl, &v.volume_id).await;
    disk.spoil(bad_block_on_n2(&cl, &v));
    (dir, disk, cl, v)
}

/// Where block [`BAD_BLOCK`] of n2's copy of `v` lies on n2's disk.
fn bad_block_on_n2(cl: &Cluster, v: &csi::Volume) -> Vec<(u64, u64)> {
    let data = cl.copy_data(2, &v.volume_id);
    let at = BAD_BLOCK * BLOCK as u64;
    disk_ranges(&data, at, at + BLOCK as u64)
}

/// The controller's command line for tests of what the next engine does
/// to a copy nobody published since it went out of sync: no heal first.
const NO_HEAL: &[&str] = &["--replica-heal-idle", "off"];

/// Waits (bounded) until n2 lists a region of its idle copy as
/// unreadable (its gauge counts it).
async fn wait_listed_on_n2(cl: &Cluster) {
    let until = Instant::now() + WAIT;
    while cl
        .volume_metric(2, "stowage_replica_unreadable_regions")
        .unwrap_or(0)
        == 0
    {
        assert!(
            Instant::now() < until,
            "n2 never found its idle copy's bad sector\n{}",
            own_log(cl, 2, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// When node `i` says its copy of `v` was last read whole `by` "scrub" or
/// "node" (its `stowage_replica_checked_timestamp_seconds`).
fn checked_at(cl: &Cluster, i: usize, v: &csi::Volume, by: &str) -> Option<u64> {
    cl.metric_with(
        i,
        "stowage_replica_checked_timestamp_seconds",
        &format!("volume=\"{}\",by=\"{by}\"", v.volume_id),
    )
}

/// `stowage volume scrub` of a volume nobody publishes has each copy's
/// node read its copy now, with no schedule at all (every agent's scrub
/// off): a bad sector on n2's copy is listed there and rebuilt by the
/// next engine, on n2 itself (the scheduled read's test,
/// `a_bad_sector_on_an_idle_copy_is_found_and_rewritten_by_the_next_engine`,
/// publishes on n1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_asked_for_of_an_idle_volume_has_each_node_read_its_copy() {
    let mut t = Steps::new("idle scrub asked for");
    let (dir, disk, mut cl, v) = idle_with_bad_sector_on_n2("rep-idle-now", 0, NO_HEAL).await;
    // No schedule: nothing reads it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(disk.failed_reads(), 0);
    let (abnormal, said) = cl.condition(&v.volume_id).await;
    assert!(!abnormal, "{said}");
    assert!(
        said.contains(
            "copies checked: n1 never read whole, n2 never read whole, n3 never read whole"
        ),
        "{said}"
    );
    t.done("written, taken down, a bad sector on n2's copy");

    let (ok, text, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    assert_idle_reads(&text);
    wait_listed_on_n2(&cl).await;
    assert!(disk.failed_reads() > 0);
    // The volume's condition says so, once every node's read is done.
    let until = Instant::now() + WAIT;
    let said = loop {
        let (abnormal, said) = cl.condition(&v.volume_id).await;
        if !said.contains("never read whole") {
            assert!(
                abnormal,
                "a copy with an unreadable region, yet normal: {said}"
            );
            break said;
        }
        assert!(Instant::now() < until, "the reads never ended: {said}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for n in ["n1", "n3"] {
        assert!(said.contains(&format!("{n} read whole ")), "{said}");
    }
    // n2's read, with a region it could not read, has no sum to compare.
    assert!(said.ends_with("; n1, n3 hold the same bytes"), "{said}");
    // ListVolumes says the same (Kubernetes' health monitor reads it).
    let (abnormal, listed) = cl.listed_condition(&v.volume_id).await;
    assert!(
        abnormal
            && listed.contains("MiB its disk could not read")
            && listed.ends_with("; n1, n3 hold the same bytes"),
        "ListVolumes: {listed}"
    );
    assert!(
        said.contains("MiB its disk could not read: the next engine writes them again)"),
        "{said}"
    );
    t.done("n2 read its copy and listed the bad sector; the condition says so");
    // Published on n2 itself: its engine starts from another copy and
    // writes the region again at once, nothing reading it first.
    let cap = block_cap(Mode::SingleNodeWriter);
    let m = Published::up(&mut cl, 2, &v, &cap).await.unwrap();
    wait_rewritten(&cl, &disk, "n2").await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("n2's region written again by the next engine, its own");
    m.down(&mut cl, &v.volume_id).await;
    let (abnormal, said) = cl.condition(&v.volume_id).await;
    assert!(!abnormal && !said.contains("could not read"), "{said}");
    assert_copies_equal(&cl, &v).await;
    cl.delete(&v.volume_id).await.unwrap();
    drop(dir);
}

/// A heal (the controller's round every second here): a bad sector that
/// n2's read of its idle copy found is written again with nobody
/// publishing the volume, by an engine with no mount. First with n2's
/// writes there failing, so the heal cannot end: a ControllerPublish
/// takes the volume over (the heal ends, fenced), its engine serves I/O
/// and, once the disk takes writes again, writes the region. Then a new
/// bad sector, which the heal writes again alone. Then one more, stuck
/// again: a controller restarted meanwhile releases the heal it does not
/// run and starts its own, and DeleteVolume during that heal deletes the
/// volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_copys_bad_sector_is_healed_and_a_publish_takes_a_heal_over() {
    let mut t = Steps::new("heal");
    let (dir, disk, mut cl, v) =
        idle_with_bad_sector_on_n2("rep-heal", 0, &["--replica-replace-after", "4"]).await;
    disk.fail_writes(bad_block_on_n2(&cl, &v));
    let (ok, _, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    wait_listed_on_n2(&cl).await;
    let (abnormal, said) = cl
        .wait_condition(&v.volume_id, WAIT, "a heal under way", |_, m| {
            m.contains("; healing on n1")
        })
        .await;
    assert!(abnormal, "{said}");
    let got = cl.get(&v.volume_id).await.unwrap().status.unwrap();
    assert!(
        got.published_node_ids.is_empty(),
        "a heal is no publication: {got:?}"
    );
    // Neither is it a volume to scrub now.
    let (ok, _, err) = scrub_json(&cl, &v.volume_id);
    assert!(
        !ok && err.contains("FAILED_PRECONDITION") && err.contains("being healed on node n1"),
        "{err}"
    );
    t.done("n2's bad sector listed, a heal on n1 stuck on it");

    let cap = block_cap(Mode::SingleNodeWriter);
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    let got = cl.get(&v.volume_id).await.unwrap().status.unwrap();
    assert_eq!(got.published_node_ids, ["n1"]);
    let until = Instant::now() + WAIT;
    while !cl
        .controller
        .log_text()
        .contains("heal ended before every copy was in sync")
    {
        assert!(
            Instant::now() < until,
            "the heal went on under the publication\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write_blocks(&m.target, 64).await;
    let target = m.target.clone();
    let read = tokio::task::spawn_blocking(move || read_block(&target, BAD_BLOCK))
        .await
        .unwrap()
        .unwrap();
    assert!(read == common::checker::block_bytes(BAD_BLOCK, 1));
    t.done("published over the heal; I/O served");
    disk.fail_writes(Vec::new());
    wait_rewritten(&cl, &disk, "n2").await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    m.down(&mut cl, &v.volume_id).await;
    t.done("n2's region written again by the publication's engine");

    // Alone, a heal ends what it starts.
    disk.spoil(bad_block_on_n2(&cl, &v));
    let (ok, _, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    wait_rewritten(&cl, &disk, "n2").await;
    let (abnormal, said) = cl
        .wait_condition(&v.volume_id, WAIT, "healed", |_, m| {
            m.starts_with("3 of 3 copies in sync") && !m.contains("healing")
        })
        .await;
    assert!(!abnormal && !said.contains("could not read"), "{said}");
    let got = cl.get(&v.volume_id).await.unwrap().status.unwrap();
    assert!(got.published_node_ids.is_empty(), "{got:?}");
    assert!(
        cl.controller
            .log_text()
            .contains("healed: every copy in sync"),
        "{}",
        cl.controller.log_tail(30)
    );
    t.done("a new bad sector healed with nobody publishing");
    assert_copies_equal(&cl, &v).await;

    // DeleteVolume during a heal (stuck again): the heal is released and
    // the copies go.
    disk.spoil(bad_block_on_n2(&cl, &v));
    disk.fail_writes(bad_block_on_n2(&cl, &v));
    let (ok, _, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    cl.wait_condition(&v.volume_id, WAIT, "a heal under way", |_, m| {
        m.contains("; healing on n1")
    })
    .await;
    t.done("a heal stuck again");
    // The controller dies during it: the next one releases the heal it
    // does not run, then starts its own.
    let heals = |cl: &Cluster| {
        cl.controller
            .log_text()
            .matches("healing: copies out of sync")
            .count()
    };
    let before = heals(&cl);
    cl.controller.kill9();
    cl.controller.restart();
    cl.reconnect().await;
    cl.wait_fresh(&(1..=NODES).map(node_id).collect::<Vec<_>>())
        .await;
    let until = Instant::now() + WAIT;
    while heals(&cl) == before {
        assert!(
            Instant::now() < until,
            "the new controller never released the old heal to start its own\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.done("a new controller released the heal left behind and healed anew");
    cl.delete(&v.volume_id).await.unwrap();
    for i in 1..=NODES {
        assert!(!cl.copy_dir(i, &v.volume_id).exists(), "n{i} kept its copy");
    }
    disk.fail_writes(Vec::new());
    drop(dir);
}

/// A node's read of its copy of a volume nobody publishes, stopped by a
/// restart of the node, resumes where it got (the copy keeps how far,
/// every 16 regions), not from the start; the node's metrics then say
/// when the copy was last read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_read_of_an_idle_copy_resumes_after_a_restart() {
    let mut t = Steps::new("idle read resumed");
    // 128 MiB at 4 MiB/s: 32 s a read; the node looks every 4 s.
    let mut cl = scrubbing_cluster(4, 4).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let v = cl
        .create(replicated_req("rep-idle-resume", "3", SIZE, cap))
        .await
        .unwrap();
    let file = cl.copy_dir(2, &v.volume_id).join("checked");
    // (done, next) of n2's read, as its file says.
    let read = || -> (u64, u64) {
        let Ok(json) = std::fs::read(&file) else {
            return (0, 0);
        };
        let c: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let r = &c["read"];
        (
            r["done"].as_u64().unwrap_or(0),
            r["next"].as_u64().unwrap_or(0),
        )
    };
    let until = Instant::now() + WAIT;
    while read().1 < 16 {
        assert!(
            Instant::now() < until,
            "n2 never read 16 regions: {:?}",
            read()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = cl.nodes[1].terminate().expect("running");
    assert!(st.success(), "SIGTERM: {st}");
    let (done, stopped) = read();
    assert_eq!(done, 0);
    t.done(&format!("n2 stopped with its read at region {stopped}"));

    // Each write of the file replaces it: a new inode.
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&file).map(|m| m.ino()).unwrap_or(0)
    };
    let written = inode();
    cl.nodes[1].restart();
    wait_socket(&cl.node_socket(2), &cl.nodes[1]);
    let until = Instant::now() + WAIT;
    let first = loop {
        if inode() != written {
            break read();
        }
        assert!(Instant::now() < until, "n2's read never went on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        first.0 > 0 || first.1 > stopped,
        "n2's read after the restart wrote {first:?}: begun again, not resumed at {stopped}"
    );
    t.done(&format!("resumed: next wrote {first:?}"));
    let until = Instant::now() + WAIT;
    while read().0 == 0 {
        assert!(
            Instant::now() < until,
            "n2's read never ended: {:?}",
            read()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(checked_at(&cl, 2, &v, "node"), Some(read().0));
    t.done("read whole");
    cl.delete(&v.volume_id).await.unwrap();
}

/// A copy of a volume nobody publishes has no engine to scrub it: its own
/// node reads it on the scrub's schedule. A bad sector on n2's idle copy
/// is listed there (n2's metrics show it), and the next engine, when the
/// volume is published again, writes that region again on n2 at its start,
/// before any scrub of its own could find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sector_on_an_idle_copy_is_found_and_rewritten_by_the_next_engine() {
    let mut t = Steps::new("idle copy");
    let (dir, disk, mut cl, v) = idle_with_bad_sector_on_n2("rep-idle", 2, NO_HEAL).await;
    t.done("written, taken down, a bad sector on n2's copy");
    let unreadable = |cl: &Cluster| {
        cl.volume_metric(2, "stowage_replica_unreadable_regions")
            .unwrap_or(0)
    };
    wait_listed_on_n2(&cl).await;
    t.done("n2 found the bad sector of its idle copy");
    assert_eq!(unreadable(&cl), 1);
    assert!(disk.failed_reads() > 0);
    assert!(!disk.bad().is_empty(), "written meanwhile");
    // `stowage status` on n2 lists it as a problem.
    let in_status = |cl: &Cluster| {
        let out = std::process::Command::new(bin())
            .args(["status", "-o", "json", "--state-dir"])
            .arg(cl.state_dir(2))
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stowage status: {e}: {out:?}"));
        let listed = report["problems"].as_array().unwrap().iter().any(|p| {
            p["kind"] == "copy-with-unreadable-regions" && p["subject"] == v.volume_id.as_str()
        });
        (out.status.code(), listed)
    };
    assert_eq!(in_status(&cl), (Some(1), true));

    let cap = block_cap(Mode::SingleNodeWriter);
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    wait_rewritten(&cl, &disk, "n2").await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    t.done("n2's region written again by the new engine");
    assert_eq!(
        cl.copy_metric(1, "stowage_replicated_scrub_repairs_total", "n2"),
        Some(0),
        "the engine's scrub found it: the list was not used"
    );
    let until = Instant::now() + WAIT;
    while unreadable(&cl) != 0 {
        assert!(Instant::now() < until, "n2 still lists the region");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!in_status(&cl).1, "stowage status still lists it");
    let target = m.target.clone();
    let back = tokio::task::spawn_blocking(move || read_block(&target, BAD_BLOCK))
        .await
        .unwrap()
        .expect("read the block");
    assert!(back == common::checker::block_bytes(BAD_BLOCK, 1));
    down_and_compare(cl, v, m).await;
    drop(dir);
}

/// `stowage volume repair ID --from NODE` (on the controller's socket):
/// (success, stdout, stderr).
fn repair(cl: &Cluster, id: &str, from: &str) -> (bool, String, String) {
    client_json(cl, &["volume", "repair", id, "--from", from])
}

/// Two copies that hold different bytes have no majority to tell which
/// are right: the volume's condition says so and nothing changes by
/// itself. `stowage volume repair ID --from n1` trusts n1's copy: the
/// other is taken out of sync and a heal rebuilds it from n1's in full,
/// after which both read alike. Refused: a node holding no copy (or only
/// the witness), a published volume, a copy out of sync as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_that_disagree_are_repaired_from_the_copy_an_operator_trusts() {
    let node = || scrubbing(0, 64);
    let mut cl = Cluster::start_full(
        NODES,
        &["--replica-replace-after", "4"],
        &[node(), node(), node()],
    )
    .await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = replicated_req("rep-repair", "2", SIZE, cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let (_, said) = cl.condition(&v.volume_id).await;
    let other = ["n2", "n3"]
        .into_iter()
        .find(|n| said.contains(&format!("copies on n1, {n}")))
        .unwrap_or_else(|| panic!("two copies, one on n1: {said}"));
    let witness = if other == "n2" { "n3" } else { "n2" };
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    write_blocks(&m.target, 64).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let (ok, _, err) = repair(&cl, &v.volume_id, "n1");
    assert!(
        !ok && err.contains("FAILED_PRECONDITION") && err.contains("published on n1"),
        "{err}"
    );
    m.down(&mut cl, &v.volume_id).await;

    let changed = 50;
    let bad = cl.copy_data(other[1..].parse().unwrap(), &v.volume_id);
    change_block(&bad, changed);
    let (ok, _, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    let no_majority = "hold different bytes, with no majority";
    let (abnormal, said) = cl
        .wait_condition(&v.volume_id, WAIT, "the copies' disagreement", |_, m| {
            m.contains(no_majority)
        })
        .await;
    assert!(
        abnormal && said.starts_with("2 of 2 copies in sync"),
        "{said}"
    );
    // Nothing changes by itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, said) = cl.condition(&v.volume_id).await;
    assert!(
        said.starts_with("2 of 2 copies in sync") && said.contains(no_majority),
        "{said}"
    );

    for (from, code) in [
        (witness, "INVALID_ARGUMENT"),
        ("n9", "INVALID_ARGUMENT"),
        ("", "INVALID_ARGUMENT"),
    ] {
        let (ok, _, err) = repair(&cl, &v.volume_id, from);
        assert!(!ok && err.contains(code), "--from {from:?}: {err}");
    }
    let (ok, _, err) = repair(&cl, "replicated:0123456789abcdef0123456789abcdef", "n1");
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
    let (ok, _, err) = repair(&cl, "n1:0123456789abcdef0123456789abcdef", "n1");
    assert!(!ok && err.contains("INVALID_ARGUMENT"), "{err}");
    // Only a cluster's controller repairs: a node's own socket says so.
    let out = std::process::Command::new(bin())
        .arg("--endpoint")
        .arg(format!("unix://{}", cl.node_socket(1).display()))
        .args(["volume", "repair", &v.volume_id, "--from", "n1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "not a cluster controller's socket: only replicated volumes are repaired"
            ),
        "{out:?}"
    );

    let (ok, text, err) = repair(&cl, &v.volume_id, "n1");
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["rebuilt"], serde_json::json!([other]), "{r}");
    // Again at once: nothing else in sync to take out.
    let (ok, text, err) = repair(&cl, &v.volume_id, "n1");
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["rebuilt"], serde_json::json!([]), "{r}");
    // The copy out of sync cannot be the source meanwhile.
    let (ok, _, err) = repair(&cl, &v.volume_id, other);
    assert!(
        !ok && (err.contains("FAILED_PRECONDITION") || err.contains("ABORTED")),
        "{err}"
    );
    // A heal rebuilds it from n1's, in full.
    wait_block_back(&cl, &bad, changed).await;
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    cl.wait_condition(&v.volume_id, WAIT, "the heal released", |_, m| {
        !m.contains("healing")
    })
    .await;
    let (ok, _, err) = scrub_json(&cl, &v.volume_id);
    assert!(ok, "{err}");
    let (abnormal, said) = cl
        .wait_condition(&v.volume_id, WAIT, "the copies read alike", |_, m| {
            m.contains(&format!("n1, {other} hold the same bytes"))
        })
        .await;
    assert!(!abnormal, "{said}");
    cl.delete(&v.volume_id).await.unwrap();
}

/// A CO's CreateVolume whose deadline passes while the controller is still
/// making the copies (n3 answers 1.5 s late a chunk) runs to its end all
/// the same: the CO's retry meanwhile is ABORTED ("in progress", as the
/// spec asks), not a second create beside the first one's calls still
/// landing on the nodes. Once n3 is fast again, a retry gets the volume,
/// with its three copies in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_caller_gave_up_runs_to_its_end() {
    let mut cl = Cluster::start_with(&[
        NodeOpts::default(),
        NodeOpts::default(),
        NodeOpts {
            proxied: true,
            ..Default::default()
        },
    ])
    .await;
    let cap = block_cap(Mode::SingleNodeWriter);
    // The controller's connections to every agent are up before n3 is
    // slowed (a TLS handshake through the delay would time out).
    let warm = cl
        .create(replicated_req("rep-warm", "3", SIZE, cap.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    cl.delete(&warm.volume_id).await.unwrap();

    cl.proxy(3).faults.set(FaultConfig {
        delay: Duration::from_millis(1500),
        ..Default::default()
    });
    let req = replicated_req("rep-to-end", "3", SIZE, cap.clone());
    let mut first = tonic::Request::new(req.clone());
    first.set_timeout(Duration::from_secs(1));
    let given_up = cl.c.controller.create_volume(first).await;
    let status = given_up.expect_err("n3 answers seconds late: the call outlives its deadline");
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );

    // The first create still runs (each call to n3 takes seconds).
    let mut retry = tonic::Request::new(req.clone());
    retry.set_timeout(Duration::from_secs(20));
    let retried = cl.c.controller.create_volume(retry).await;
    let status = retried.expect_err("a retry while the first create runs");
    assert_eq!(
        status.code(),
        tonic::Code::Aborted,
        "{status:?}\n{}",
        cl.controller.log_tail(40)
    );
    assert!(status.message().contains("in progress"), "{status:?}");

    cl.proxy(3).faults.set(FaultConfig::default());
    let controller = cl.c.controller.clone();
    let v = retry_aborted(|| {
        let (mut c, req) = (controller.clone(), req.clone());
        async move { c.create_volume(req).await }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)))
    .into_inner()
    .volume
    .unwrap();
    cl.wait_in_sync(&v.volume_id, WAIT).await;
    let (abnormal, message) = cl.condition(&v.volume_id).await;
    assert!(!abnormal, "{message}");
    cl.delete(&v.volume_id).await.unwrap();
}
