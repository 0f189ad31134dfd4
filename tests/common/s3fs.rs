//! s3fs daemons and mounts seen from the test: which run, which mount
//! under a scratch directory, and ending those (by PID) that a failed test
//! left behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);

/// Every s3fs process on the host: PID and argv.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_s3fs = argv
            .first()
            .is_some_and(|a0| Path::new(a0).file_name().is_some_and(|n| n == "s3fs"));
        if is_s3fs && alive(pid) {
            out.push((pid, argv));
        }
    }
    out
}

/// The live s3fs daemons whose command line mentions a path under `root`.
pub fn daemons_under(root: &Path) -> BTreeSet<u32> {
    let root = format!("{}/", root.to_str().unwrap());
    processes()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a.contains(&root)))
        .map(|(pid, _)| pid)
        .collect()
}

/// True while `pid` runs (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
    }
}

/// Waits (bounded) until every PID in `pids` is gone; returns those left.
pub fn wait_gone(pids: &BTreeSet<u32>, limit: Duration) -> BTreeSet<u32> {
    let start = Instant::now();
    loop {
        let left: BTreeSet<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || start.elapsed() > limit {
            return left;
        }
        std::thread::sleep(POLL);
    }
}

/// The fuse.s3fs mounts whose mount point is under `root`.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .filter(|e| e.fs_type == "fuse.s3fs" && e.mount_point.starts_with(root))
        .map(|e| e.mount_point)
        .collect()
}

/// Detaches every mount under `root`, waits (bounded) for the s3fs
/// daemons mounting there to end, SIGKILLs (by PID) those that do not, and
/// detaches again. For drop guards: a failed test leaves no daemon.
pub fn end_daemons_under(root: &Path) {
    super::cleanup_under(root);
    // A detached FUSE mount ends its daemon once nothing holds it; a
    // daemon still running after that is ours to end (by PID: it mounts
    // in our scratch directory).
    let left = wait_gone(&daemons_under(root), Duration::from_secs(10));
    for pid in left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = wait_gone(&daemons_under(root), Duration::from_secs(10));
    super::cleanup_under(root);
}
