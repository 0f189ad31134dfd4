//! A checker of a raw volume's writes in the style of Jepsen's: unique,
//! checksummed 4 KiB blocks written with O_DIRECT and acknowledged by
//! fdatasync, every issued and acknowledged write recorded ([`History`]),
//! then every block read back: an acknowledged write replaced by an older
//! one (or by zeros) is lost, a block that is no whole issued write is
//! corrupted. Used by tests/replicated.rs and tests/replicated_faults.rs.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stowage::os::fuse_file::AlignedBuf;

use super::pattern;

/// One block of the checker: 4 KiB naming its block and write, the rest a
/// pattern of the write, with a checksum.
pub const BLOCK: usize = 4096;

/// Bound of every wait for progress: a [`Writer`]'s, and in the tests that
/// use it, a volume's condition or a rebuild.
pub const WAIT: Duration = Duration::from_secs(60);

/// The bytes of write `write` of block `block`.
pub fn block_bytes(block: u64, write: u64) -> Vec<u8> {
    let mut b = pattern(block.wrapping_mul(1_000_003) ^ write, BLOCK);
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&write.to_le_bytes());
    let sum = crc32fast::hash(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// What a block holds: Some(write) for a whole block of a write, None for
/// zeros (never written); Err when it is neither.
pub fn parse_block(block: u64, b: &[u8]) -> Result<Option<u64>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let sum = u32::from_le_bytes(b[BLOCK - 4..].try_into().unwrap());
    if crc32fast::hash(&b[..BLOCK - 4]) != sum {
        return Err(format!("block {block}: checksum mismatch"));
    }
    let named = u64::from_le_bytes(b[..8].try_into().unwrap());
    let write = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if named != block || b != block_bytes(block, write).as_slice() {
        return Err(format!(
            "block {block}: holds block {named}'s write {write}"
        ));
    }
    Ok(Some(write))
}

/// The raw device at `path`, opened for direct I/O (a plain file where
/// the filesystem refuses O_DIRECT).
pub fn open_direct(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    open(libc::O_DIRECT).or_else(|_| open(0)).unwrap()
}

/// Every write issued per block and the newest acknowledged one
/// (fdatasync returned).
#[derive(Default, Debug)]
pub struct History {
    pub issued: HashMap<u64, Vec<u64>>,
    pub acked: HashMap<u64, u64>,
    pub next: u64,
    pub acks: u64,
    /// Bursts whose write or fdatasync failed, with the error.
    pub failures: Vec<String>,
}

impl History {
    /// Writes `count` blocks chosen by `rng` from `blocks`, then
    /// fdatasync: all of them acknowledged when it returns.
    pub fn burst(&mut self, f: &std::fs::File, rng: &mut u64, blocks: u64, count: usize) {
        let mut batch = Vec::new();
        let mut buf = AlignedBuf::zeroed(BLOCK);
        for _ in 0..count {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            let block = *rng % blocks;
            self.next += 1;
            let w = self.next;
            self.issued.entry(block).or_default().push(w);
            buf.as_mut_slice().copy_from_slice(&block_bytes(block, w));
            if let Err(e) = f.write_all_at(buf.as_slice(), block * BLOCK as u64) {
                self.failures.push(format!("write of block {block}: {e}"));
                return;
            }
            batch.push((block, w));
        }
        if let Err(e) = f.sync_data() {
            self.failures.push(format!("fdatasync: {e}"));
            return;
        }
        for (block, w) in batch {
            self.acked.insert(block, w);
            self.acks += 1;
        }
    }

    /// `rounds` bursts of `count` blocks to the device at `dev` (opened
    /// afresh for each), from a blocking thread: the history and `rng`
    /// after them.
    pub async fn bursts(
        mut self,
        dev: PathBuf,
        mut rng: u64,
        blocks: u64,
        rounds: usize,
        count: usize,
    ) -> (History, u64) {
        tokio::task::spawn_blocking(move || {
            for _ in 0..rounds {
                self.burst(&open_direct(&dev), &mut rng, blocks, count);
            }
            (self, rng)
        })
        .await
        .unwrap()
    }

    /// Reads blocks 0..`blocks` back (1 MiB at a time): (lost acknowledged
    /// writes, corrupted blocks).
    pub fn check(&self, dev: &Path, blocks: u64) -> (Vec<String>, Vec<String>) {
        const CHUNK: u64 = 256;
        let f = open_direct(dev);
        let mut buf = AlignedBuf::zeroed(CHUNK as usize * BLOCK);
        let (mut lost, mut corrupt) = (Vec::new(), Vec::new());
        for first in (0..blocks).step_by(CHUNK as usize) {
            let n = CHUNK.min(blocks - first) as usize;
            f.read_exact_at(&mut buf.as_mut_slice()[..n * BLOCK], first * BLOCK as u64)
                .unwrap();
            for (k, b) in buf.as_slice()[..n * BLOCK].chunks(BLOCK).enumerate() {
                let block = first + k as u64;
                let issued = self.issued.get(&block).map(Vec::as_slice).unwrap_or(&[]);
                match parse_block(block, b) {
                    Err(e) => corrupt.push(e),
                    Ok(Some(w)) if !issued.contains(&w) => {
                        corrupt.push(format!("block {block}: write {w} was never issued"))
                    }
                    Ok(held) => {
                        if let Some(&a) = self.acked.get(&block)
                            && held.is_none_or(|w| w < a)
                        {
                            lost.push(format!(
                                "block {block}: acknowledged write {a}, holds {held:?}"
                            ));
                        }
                    }
                }
            }
        }
        (lost, corrupt)
    }

    /// [`History::check`] of the device at `dev` from a blocking thread,
    /// its tally printed (after `what`, for the run's record): the history
    /// and (lost acknowledged writes, corrupted blocks).
    pub async fn read_back(
        self,
        dev: PathBuf,
        blocks: u64,
        what: &str,
    ) -> (History, Vec<String>, Vec<String>) {
        let (h, (lost, corrupt)) = tokio::task::spawn_blocking(move || {
            let r = self.check(&dev, blocks);
            (self, r)
        })
        .await
        .unwrap();
        eprintln!(
            "checker: {what}{} writes issued, {} acknowledged, {} bursts failed; {} acknowledged writes lost, {} blocks corrupted",
            h.next,
            h.acks,
            h.failures.len(),
            lost.len(),
            corrupt.len()
        );
        (h, lost, corrupt)
    }

    /// Asserts that what [`History::check`] found is nothing, and that
    /// something was acknowledged (else the check proves nothing).
    pub fn assert_intact(&self, lost: &[String], corrupt: &[String]) {
        assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
        assert!(corrupt.is_empty(), "corrupted blocks: {corrupt:?}");
        assert!(
            self.acks > 0,
            "nothing was acknowledged: the check proves nothing"
        );
    }
}

/// A thread writing bursts of checker blocks to a published raw volume
/// until stopped. Dropped without [`Writer::stop`] (a failed test), it is
/// told to stop and left to end by itself: its I/O fails once the cluster
/// is gone.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    history: Arc<Mutex<History>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Bursts of `burst` blocks drawn from the first `blocks` of `dev`.
    pub fn start(dev: PathBuf, blocks: u64, burst: usize, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let history = Arc::new(Mutex::new(History::default()));
        let (s, a, fl, h) = (
            Arc::clone(&stop),
            Arc::clone(&acks),
            Arc::clone(&failed),
            Arc::clone(&history),
        );
        let thread = std::thread::spawn(move || {
            let f = open_direct(&dev);
            let mut rng = seed | 1;
            while !s.load(Ordering::Relaxed) {
                let mut h = h.lock().unwrap();
                h.burst(&f, &mut rng, blocks, burst);
                a.store(h.acks, Ordering::Relaxed);
                fl.store(h.failures.len() as u64, Ordering::Relaxed);
            }
        });
        Writer {
            stop,
            acks,
            failed,
            history,
            thread: Some(thread),
        }
    }

    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// Waits (bounded by [`WAIT`]) until `more` further writes are
    /// acknowledged, with no burst failing meanwhile: writes keep
    /// completing.
    pub async fn progress(&self, more: u64, what: &str) {
        let want = self.acks() + more;
        let deadline = Instant::now() + WAIT;
        while self.acks() < want {
            assert_eq!(
                self.failed.load(Ordering::Relaxed),
                0,
                "{what}: a write failed: {:?}",
                self.history.lock().map(|h| h.failures.clone())
            );
            assert!(
                Instant::now() < deadline,
                "{what}: writes stopped completing ({} acknowledged, waiting for {want})",
                self.acks()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops after the current burst: the history.
    pub async fn stop(mut self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || t.join().unwrap())
            .await
            .unwrap();
        std::mem::take(&mut *self.history.lock().unwrap())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
