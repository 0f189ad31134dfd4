//! How much of a copy's data may wait in memory: the window after which a
//! copy starts writing its data file back, sized to what its disk writes
//! back in [`TARGET`].
//!
//! A flush (`fdatasync`) must finish within the engine's timeout (2 s) or
//! the copy is marked out of sync. Each time a window's worth was written,
//! the copy waits for the writeback it started last time to finish and
//! starts the next (`sync_file_range(WAIT_BEFORE | WRITE)` on the whole
//! file), so a flush finds a few windows to write. A fixed
//! window cannot fit every disk: 64 MiB is 40 ms on a fast NVMe disk and,
//! as scattered 4 KiB writes, over a minute on a spinning one. So the
//! window follows the disk: it shrinks in proportion when the last
//! writeback took longer than [`TARGET`] and doubles when one finished
//! within it, between [`MIN`] and [`MAX`], starting at [`MIN`]. The wait
//! is also what holds a writer back when it writes faster than the disk
//! for long, before the kernel's own dirty-page limits would; it is made
//! on a thread of the pacer's own, and holds a writer back only once the
//! writers are [`BEHIND`] windows ahead of it.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one window should take to write back: a flush then waits for
/// about two of them, a quarter of the engine's 2 s timeout.
pub const TARGET: Duration = Duration::from_millis(250);
/// The smallest window: 64 scattered 4 KiB writes, about 0.4 s on a
/// spinning disk.
pub const MIN: u64 = 256 << 10;
/// The largest: the fixed window copies used before the pacing (starting
/// writeback after every write instead halved the rate of random 4 KiB
/// writes in the `replicated` bench).
pub const MAX: u64 = 64 << 20;
/// Where a copy's window starts: the smallest, doubled while the disk
/// keeps up. A larger first window could take a slow disk far longer than
/// the engine's timeout to write back, and the write that waits for it
/// would time out.
pub const FIRST: u64 = MIN;
/// A wait shorter than this means the last writeback had finished.
const NO_WAIT: Duration = Duration::from_millis(1);

/// The next window after one of `window` bytes whose writeback was started
/// `since` ago (None: none was started yet) and was waited for `waited`.
pub fn next_window(window: u64, since: Option<Duration>, waited: Duration) -> u64 {
    let next = match since {
        None => window,
        Some(since) if waited >= NO_WAIT => {
            // It took since + waited: scale the window to TARGET.
            let took = (since + waited).as_nanos().max(1);
            let scaled = u128::from(window) * TARGET.as_nanos() / took;
            u64::try_from(scaled).unwrap_or(u64::MAX).min(window * 2)
        }
        // Done within TARGET (or an unknown time more than it: keep).
        Some(since) if since <= TARGET => window * 2,
        Some(_) => window,
    };
    next.clamp(MIN, MAX)
}

/// How many windows may wait unstarted while the last writeback is still
/// being waited for before a writer is held back until it is done.
const BEHIND: u64 = 2;

/// Waits for the last writeback of a file and starts the next (the real
/// one is [`wait_and_start`]; tests give their own).
type Start = dyn Fn(&File) + Send + Sync;

/// A copy's data file's writeback pacing. Writers only count what they
/// wrote; the wait for the disk is made on a thread of the pacer's own,
/// so the write that crosses a window is not the one that waits for the
/// last window's writeback (at queue depth 1, each such wait was a stall
/// of the whole volume). A writer is held back only when [`BEHIND`]
/// windows wait while that thread still waits for the disk, and only one
/// at a time.
pub struct Pacer {
    shared: Arc<Shared>,
    /// The thread waiting for the last writeback and starting the next;
    /// joined before the next is started and when the pacer is dropped,
    /// so no duplicate of the file outlives its copy.
    worker: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    /// Bytes written since writeback was last started.
    unstarted: AtomicU64,
    window: AtomicU64,
    /// When writeback was last started.
    last: Mutex<Option<Instant>>,
    start: Box<Start>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("unstarted", &self.shared.unstarted)
            .field("window", &self.shared.window)
            .finish_non_exhaustive()
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::with_start(Box::new(wait_and_start))
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        let worker = self.worker.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = worker.take() {
            let _ = h.join();
        }
    }
}

impl Pacer {
    fn with_start(start: Box<Start>) -> Self {
        Pacer {
            shared: Arc::new(Shared {
                unstarted: AtomicU64::new(0),
                window: AtomicU64::new(FIRST),
                last: Mutex::new(None),
                start,
            }),
            worker: Mutex::new(None),
        }
    }

    /// `len` bytes were written to `file`: past a window, the pacer's
    /// thread waits for the last writeback and starts the next. Failures
    /// are the next flush's (`fdatasync` reports them) as long as `file`
    /// is an open file of its own, not the one flushes sync: a wait for
    /// writeback takes its error for the open file it is made on.
    pub fn wrote(&self, file: &File, len: u64) {
        let window = self.shared.window.load(Ordering::Relaxed);
        let unstarted = self.shared.unstarted.fetch_add(len, Ordering::Relaxed) + len;
        if unstarted < window {
            return;
        }
        // Another writer is starting it, or is the one held back: one
        // writer waiting for the disk holds the others back enough (as
        // before the pacer had a thread, when the writer that crossed a
        // window waited and the others went on).
        let Ok(mut worker) = self.worker.try_lock() else {
            return;
        };
        let behind = unstarted >= BEHIND * window;
        if worker.as_ref().is_some_and(|h| !h.is_finished()) && !behind {
            return;
        }
        if let Some(h) = worker.take() {
            // Finished, or this writer is held back until it is.
            let _ = h.join();
        }
        self.shared.unstarted.store(0, Ordering::Relaxed);
        let thread = file.try_clone().and_then(|file| {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("copy-writeback".into())
                .spawn(move || shared.wait_and_start(&file))
        });
        match thread {
            Ok(h) => *worker = Some(h),
            // No descriptor or thread to spare: wait here, as before.
            Err(_) => self.shared.wait_and_start(file),
        }
    }

    /// The current window, in bytes.
    pub fn window(&self) -> u64 {
        self.shared.window.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Waits for the last writeback, starts the next, and sizes the next
    /// window from how long the disk took.
    fn wait_and_start(&self, file: &File) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let asked = Instant::now();
        (self.start)(file);
        let now = Instant::now();
        let since = last.map(|t| asked.saturating_duration_since(t));
        let window = self.window.load(Ordering::Relaxed);
        self.window
            .store(next_window(window, since, now - asked), Ordering::Relaxed);
        *last = Some(now);
    }
}

/// Waits for the writeback under way of `file` to finish, then starts
/// writing back the rest of what it holds in memory.
fn wait_and_start(file: &File) {
    // SAFETY: a syscall on a descriptor `file` keeps open; no memory is
    // passed. Offset 0 and length 0: the whole file.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_writeback_slower_than_the_target_shrinks_the_window_in_proportion() {
        // 16 MiB took 1 s: the disk writes 4 MiB in 250 ms.
        assert_eq!(next_window(16 << 20, Some(600 * MS), 400 * MS), 4 << 20);
        // A spinning disk's scattered writes: down to the floor, not 0.
        assert_eq!(next_window(16 << 20, Some(MS), 60_000 * MS), MIN);
    }

    #[test]
    fn a_writeback_done_within_the_target_doubles_the_window_up_to_the_cap() {
        assert_eq!(
            next_window(1 << 20, Some(100 * MS), Duration::ZERO),
            2 << 20
        );
        assert_eq!(next_window(MAX, Some(100 * MS), Duration::ZERO), MAX);
        // Waited for, but faster than the target: grows, at most twice.
        assert_eq!(next_window(1 << 20, Some(10 * MS), 5 * MS), 2 << 20);
    }

    #[test]
    fn an_unknown_writeback_time_keeps_the_window() {
        // Finished at some point in the last second: maybe within 250 ms,
        // maybe not.
        assert_eq!(
            next_window(8 << 20, Some(1000 * MS), Duration::ZERO),
            8 << 20
        );
        assert_eq!(next_window(8 << 20, None, 300 * MS), 8 << 20);
    }

    impl Pacer {
        /// Waits until the pacer's thread, if any, is done.
        fn settle(&self) {
            if let Some(h) = self.worker.lock().expect("lock").take() {
                h.join().expect("pacer thread");
            }
        }

        fn last(&self) -> Option<Instant> {
            *self.shared.last.lock().expect("lock")
        }
    }

    fn data_file(dir: &tempfile::TempDir) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("data"))
            .expect("open")
    }

    #[test]
    fn writes_start_writeback_once_a_window_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = data_file(&dir);
        let pacer = Pacer::default();
        let chunk = vec![7u8; 64 << 10];
        use std::os::unix::fs::FileExt;
        let chunks = FIRST / chunk.len() as u64;
        for i in 0..chunks - 1 {
            file.write_all_at(&chunk, i * chunk.len() as u64)
                .expect("write");
            pacer.wrote(&file, chunk.len() as u64);
        }
        pacer.settle();
        assert!(pacer.last().is_none(), "started early");
        file.write_all_at(&chunk, FIRST - chunk.len() as u64)
            .expect("write");
        pacer.wrote(&file, chunk.len() as u64);
        pacer.settle();
        assert!(pacer.last().is_some(), "not started");
        assert_eq!(pacer.shared.unstarted.load(Ordering::Relaxed), 0);
        // The first start knows no time to learn from.
        assert_eq!(pacer.window(), FIRST);
        let first = pacer.last();
        pacer.wrote(&file, FIRST - 1);
        pacer.settle();
        assert_eq!(pacer.last(), first, "started again early");
        pacer.wrote(&file, 1);
        pacer.settle();
        assert_ne!(pacer.last(), first, "not started again");
    }

    #[test]
    fn a_writer_waits_for_the_disk_only_once_it_is_two_windows_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(data_file(&dir));
        // A disk that finishes each writeback only when the test says so.
        let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
        let open_rx = Mutex::new(open_rx);
        let starts = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&starts);
        let pacer = Arc::new(Pacer::with_start(Box::new(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            // Bounded, so a failing test ends rather than hangs.
            let _ = open_rx
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(60));
        })));
        let write = |len: u64| {
            let (p, f) = (Arc::clone(&pacer), Arc::clone(&file));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                p.wrote(&f, len);
                drop(p);
                let _ = tx.send(());
            });
            rx
        };
        let returns = |rx: std::sync::mpsc::Receiver<()>, what: &str| {
            rx.recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{what}: the writer was held"));
        };
        // The write that crosses the window hands the wait to the pacer's
        // thread, which the disk holds; the next window's writer is not
        // held either.
        returns(write(FIRST), "first window");
        returns(write(FIRST), "second window");
        // Two windows ahead of a disk that has not finished: held until it
        // does, then the next writeback starts.
        let held = write(FIRST);
        assert!(
            held.recv_timeout(Duration::from_millis(300)).is_err(),
            "a writer two windows ahead of the disk was not held back"
        );
        open_tx.send(()).expect("open");
        returns(held, "after the disk finished");
        // Dropping the pacer waits for its thread (the second writeback).
        open_tx.send(()).expect("open");
        let pacer = Arc::try_unwrap(pacer).expect("only owner");
        drop(pacer);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }
}
