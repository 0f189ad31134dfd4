//! How much of a copy's data may wait in memory: the window after which a
//! copy starts writing its data file back, sized to what its disk writes
//! back in [`TARGET`].
//!
//! A flush (`fdatasync`) must finish within the engine's timeout (2 s) or
//! the copy is marked out of sync. Each time a window's worth was written,
//! the copy waits for the writeback it started last time to finish and
//! starts the next (`sync_file_range(WAIT_BEFORE | WRITE)` on the whole
//! file), so a flush finds at most about two windows to write. A fixed
//! window cannot fit every disk: 64 MiB is 40 ms on a fast NVMe disk and,
//! as scattered 4 KiB writes, over a minute on a spinning one. So the
//! window follows the disk: it shrinks in proportion when the last
//! writeback took longer than [`TARGET`] and doubles when one finished
//! within it, between [`MIN`] and [`MAX`], starting at [`MIN`]. The wait
//! is also what holds a writer back when it writes faster than the disk
//! for long, before the kernel's own dirty-page limits would.

use std::fs::File;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// A copy's data file's writeback pacing.
#[derive(Debug)]
pub struct Pacer {
    /// Bytes written since writeback was last started.
    unstarted: AtomicU64,
    window: AtomicU64,
    /// When writeback was last started; held while it is being started
    /// (a writer that finds it held leaves it to that one).
    last: Mutex<Option<Instant>>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            unstarted: AtomicU64::new(0),
            window: AtomicU64::new(FIRST),
            last: Mutex::new(None),
        }
    }
}

impl Pacer {
    /// `len` bytes were written to `file`: past a window, wait for the
    /// last writeback and start the next. Failures are the next flush's
    /// (`fdatasync` reports them).
    pub fn wrote(&self, file: &File, len: u64) {
        let unstarted = self.unstarted.fetch_add(len, Ordering::Relaxed) + len;
        if unstarted < self.window.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        self.unstarted.store(0, Ordering::Relaxed);
        let asked = Instant::now();
        wait_and_start(file);
        let now = Instant::now();
        let since = last.map(|t| asked.saturating_duration_since(t));
        let window = self.window.load(Ordering::Relaxed);
        self.window
            .store(next_window(window, since, now - asked), Ordering::Relaxed);
        *last = Some(now);
    }

    /// The current window, in bytes.
    pub fn window(&self) -> u64 {
        self.window.load(Ordering::Relaxed)
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

    #[test]
    fn writes_start_writeback_once_a_window_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("data"))
            .expect("open");
        let pacer = Pacer::default();
        let chunk = vec![7u8; 64 << 10];
        use std::os::unix::fs::FileExt;
        let chunks = FIRST / chunk.len() as u64;
        for i in 0..chunks - 1 {
            file.write_all_at(&chunk, i * chunk.len() as u64)
                .expect("write");
            pacer.wrote(&file, chunk.len() as u64);
        }
        assert!(pacer.last.lock().expect("lock").is_none(), "started early");
        file.write_all_at(&chunk, FIRST - chunk.len() as u64)
            .expect("write");
        pacer.wrote(&file, chunk.len() as u64);
        assert!(pacer.last.lock().expect("lock").is_some(), "not started");
        assert_eq!(pacer.unstarted.load(Ordering::Relaxed), 0);
        // The first start knows no time to learn from.
        assert_eq!(pacer.window(), FIRST);
        let first = *pacer.last.lock().expect("lock");
        pacer.wrote(&file, FIRST - 1);
        assert_eq!(
            *pacer.last.lock().expect("lock"),
            first,
            "started again early"
        );
        pacer.wrote(&file, 1);
        assert_ne!(
            *pacer.last.lock().expect("lock"),
            first,
            "not started again"
        );
    }
}
