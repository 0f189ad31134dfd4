//! Supervised s3fs daemons for object volumes: one FUSE daemon per staged
//! volume, detached so that it outlives the node plugin, found again from
//! its record after a restart, and checked for a mount that still answers.
//! It never puts a secret on a command line or in a file, and never signals
//! a process it cannot prove is the daemon it started (or adopted).
//!
//! Every call here blocks (it polls the mount table and `/proc`); call it
//! from a blocking task.

// A daemon must not die with the plugin, so it cannot be spawned through
// `os::command` (which sets PDEATHSIG), and a dead FUSE mount needs a lazy
// detach, which `os::mount` does not offer: this module spawns and unmounts
// itself, in the few functions marked below.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{DirBuilder, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::os::command::{self, CommandError};
use crate::os::mountinfo::{MountTable, MountTableError};

/// The filesystem type s3fs mounts show in the mount table.
pub const FS_TYPE: &str = "fuse.s3fs";
/// The Debian package that provides the mounter.
pub const PACKAGE: &str = "s3fs";
/// How long [`Mounter::mount`] waits for the mount to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Mounter::unmount`] waits by default for the daemon to exit
/// on its own after its mount is gone, before SIGTERM (and as long again
/// before SIGKILL).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a health probe (statfs on the mount, answered by the daemon
/// without asking S3) may take before the daemon counts as unresponsive.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

const PROGRAM: &str = "s3fs";
/// The environment variables s3fs 1.90 reads the credentials from.
const ENV_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
const ENV_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";
const DAEMON_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const LOG_NAME: &str = "s3fs.log";
const POLL: Duration = Duration::from_millis(20);
const LOG_TAIL_LINES: usize = 20;
/// What s3fs logs (at `dbglevel=err` and above) when its start-up check of
/// the bucket and credentials failed after the mount was made.
const INIT_FAILED: &str = "Exiting FUSE event loop";

/// What to mount: a bucket, or one prefix of it, on an S3 endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub bucket: String,
    /// A key prefix inside the bucket (`vols/abc`), mounted as the root.
    pub prefix: Option<String>,
    /// `http://host:port` or `https://host`.
    pub endpoint: String,
    /// The SigV4 signing region (`garage` for Garage, `us-east-1`...).
    pub region: String,
    pub read_only: bool,
    /// The owner every file shows (s3fs `uid=`); the mounting user if None.
    pub uid: Option<u32>,
    /// The group every file shows (s3fs `gid=`): CSI VOLUME_MOUNT_GROUP.
    pub gid: Option<u32>,
    /// Permission bits cleared on every file and on the mount root (s3fs
    /// `umask=` and `mp_umask=`; s3fs then shows and enforces `0777 &
    /// !umask` for every file, whatever mode it was created with). None:
    /// 0o000 when `gid` is set, otherwise the modes stored with the
    /// objects. Why not 0o002 for a mount group: s3fs 1.90 grants group
    /// rights only to a caller whose *primary* gid is the file's group, or
    /// who is listed as a member in the daemon's group database; it never
    /// sees the caller's supplementary groups, which is how a CO hands the
    /// mount group (fsGroup) to a workload. With 0o002 such a workload
    /// could not write at all. Who can reach the mount point still limits
    /// who gets in.
    pub umask: Option<u32>,
    /// Let users other than the mounting one (root) in (FUSE `allow_other`).
    pub allow_other: bool,
}

/// S3 credentials for a mount (the S3 layer's: `Debug` never shows the
/// secret).
pub use super::s3::Credentials;

/// A running s3fs daemon: what a node record keeps to find it again after
/// a plugin restart. The start time (clock ticks since boot, from
/// `/proc/<pid>/stat`) tells this process from a later one with its PID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Daemon {
    /// The volume key the daemon was started for (its runtime directory).
    pub key: String,
    pub pid: u32,
    /// The mount point, canonical.
    pub target: PathBuf,
    pub start_time: u64,
}

/// The serialised form of a [`Daemon`] in node records.
pub type DaemonRecord = Daemon;

/// The state of an object volume's mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// An s3fs mount is at the target and answers.
    Healthy,
    /// An s3fs mount is at the target but cannot serve: remount it.
    Dead(DeadReason),
    /// No s3fs mount at the target.
    NotMounted,
}

/// Why a mount counts as dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Access gives ENOTCONN: the daemon died and left its mount behind.
    NotConnected,
    /// Access fails otherwise.
    Failing(Errno),
    /// The probe got no answer within [`PROBE_TIMEOUT`].
    Unresponsive,
    /// The mount answers, but not from the recorded daemon (that one is
    /// gone): the record no longer describes it.
    DaemonGone,
}

/// A mounter step that failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum MounterError {
    #[error("{program} is not installed (install the Debian package `{package}`)")]
    NotInstalled {
        program: &'static str,
        package: &'static str,
    },
    #[error("checking the {PROGRAM} version: {0}")]
    Version(#[source] CommandError),
    #[error("{PROGRAM} --version printed no version: {0:?}")]
    VersionUnparsed(String),
    #[error("/dev/fuse is missing: FUSE mounts are impossible on this host")]
    NoFuse,
    #[error("invalid volume key {0:?}")]
    InvalidKey(String),
    #[error("invalid {field}: {reason}")]
    InvalidSpec {
        field: &'static str,
        reason: &'static str,
    },
    #[error("mount target {target}: {err}")]
    Target {
        target: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("something is already mounted at {target} ({fs_type})")]
    AlreadyMounted { target: PathBuf, fs_type: String },
    #[error("runtime directory {path}: {err}")]
    RuntimeDir {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot start {PROGRAM}: {err}")]
    Spawn {
        #[source]
        err: std::io::Error,
    },
    #[error("{PROGRAM} did not mount {target}: {why}; log tail:\n{log_tail}")]
    MountFailed {
        target: PathBuf,
        why: String,
        log_tail: String,
    },
    #[error(transparent)]
    MountTable(#[from] MountTableError),
    #[error("unmount {target}: {errno}")]
    Unmount { target: PathBuf, errno: Errno },
    #[error("{target} is busy (files open on a working mount): not unmounted")]
    Busy { target: PathBuf },
    #[error("{PROGRAM} daemon {pid} did not exit after SIGKILL")]
    StillRunning { pid: u32 },
    #[error("process {pid} is not the recorded {PROGRAM} daemon of {target}")]
    NotOurDaemon { pid: u32, target: PathBuf },
    #[error("read /proc/{pid}/{file}: {err}")]
    Proc {
        pid: u32,
        file: &'static str,
        #[source]
        err: std::io::Error,
    },
    #[error("daemon {pid} has no S3 credentials in its environment")]
    NoCredentials { pid: u32 },
    #[error("signal {signal} to daemon {pid}: {errno}")]
    Signal {
        pid: u32,
        signal: Signal,
        errno: Errno,
    },
}

/// Starts, adopts, probes and stops s3fs daemons. Per-volume files (the
/// daemon's log, its temporary files) live in `<runtime_dir>/<key>/`,
/// which is mode 0700; no file holds a secret.
#[derive(Debug)]
pub struct Mounter {
    runtime_dir: PathBuf,
    program: PathBuf,
    /// Daemons this process spawned, kept to reap them once they exit
    /// (adopted ones are reaped by whoever inherited them).
    children: Mutex<HashMap<u32, Child>>,
    exit_timeout: Duration,
}

impl Mounter {
    /// A mounter keeping per-volume files under `runtime_dir` (created on
    /// first mount). s3fs stages writes in temporary files there, so it
    /// belongs on a disk, not on a small tmpfs.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> Self {
        Self {
            runtime_dir: runtime_dir.into(),
            program: PathBuf::from(PROGRAM),
            children: Mutex::new(HashMap::new()),
            exit_timeout: EXIT_TIMEOUT,
        }
    }

    /// Replaces [`EXIT_TIMEOUT`], the wait before each escalation when a
    /// daemon does not exit after its unmount.
    pub fn with_exit_timeout(mut self, timeout: Duration) -> Self {
        self.exit_timeout = timeout;
        self
    }

    /// Checks that s3fs and `/dev/fuse` are there and returns the s3fs
    /// version (`1.90`). The node plugin calls this at start.
    pub fn check_installed(&self) -> Result<String, MounterError> {
        let program = self.program.to_string_lossy();
        let out = command::run(&program, ["--version"]).map_err(|e| match e {
            CommandError::Spawn { ref err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
                MounterError::NotInstalled {
                    program: PROGRAM,
                    package: PACKAGE,
                }
            }
            e => MounterError::Version(e),
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = parse_version(&text).ok_or_else(|| {
            MounterError::VersionUnparsed(text.lines().next().unwrap_or("").into())
        })?;
        if !Path::new("/dev/fuse").exists() {
            return Err(MounterError::NoFuse);
        }
        Ok(version)
    }

    /// The directory holding volume `key`'s log and temporary files.
    pub fn volume_dir(&self, key: &str) -> PathBuf {
        self.runtime_dir.join(key)
    }

    /// The daemon log of volume `key` (appended to by every daemon started
    /// for it).
    pub fn log_path(&self, key: &str) -> PathBuf {
        self.volume_dir(key).join(LOG_NAME)
    }

    /// Starts an s3fs daemon that mounts `spec` at the directory `target`
    /// and returns once the mount is in the mount table (within
    /// [`MOUNT_TIMEOUT`]). The daemon runs in its own session, with no
    /// parent-death signal, so it outlives this process. Credentials reach
    /// it through its environment only.
    ///
    /// Not idempotent by itself: anything already mounted at `target` is
    /// an error ([`MounterError::AlreadyMounted`]); the caller checks its
    /// record first ([`Mounter::adopt`]). On failure nothing is left
    /// running or mounted, and the error carries the tail of the daemon's
    /// log with secret-looking lines left out.
    pub fn mount(
        &self,
        key: &str,
        spec: &MountSpec,
        credentials: &Credentials,
        target: &Path,
    ) -> Result<Daemon, MounterError> {
        validate_key(key)?;
        spec.validate()?;
        if credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty() {
            return Err(MounterError::InvalidSpec {
                field: "credentials",
                reason: "access key id and secret must not be empty",
            });
        }
        let target_err = |err| MounterError::Target {
            target: target.to_owned(),
            err,
        };
        let target = std::fs::canonicalize(target).map_err(target_err)?;
        if !std::fs::metadata(&target).map_err(target_err)?.is_dir() {
            return Err(target_err(std::io::Error::from(
                std::io::ErrorKind::NotADirectory,
            )));
        }
        if let Some(m) = MountTable::read()?.mounted_at(&target) {
            return Err(MounterError::AlreadyMounted {
                target,
                fs_type: m.fs_type.clone(),
            });
        }

        let dir = self.volume_dir(key);
        let tmp = dir.join("tmp");
        for d in [&self.runtime_dir, &dir, &tmp] {
            make_private_dir(d)?;
        }
        let log_path = dir.join(LOG_NAME);
        let mut log = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|err| MounterError::RuntimeDir {
                path: log_path.clone(),
                err,
            })?;
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        let log_err = log.try_clone().map_err(|err| MounterError::RuntimeDir {
            path: log_path.clone(),
            err,
        })?;

        if dir.as_os_str().as_bytes().contains(&b',') {
            return Err(MounterError::RuntimeDir {
                path: dir,
                err: std::io::Error::other("a comma would split s3fs's options"),
            });
        }
        let mut cmd = Command::new(&self.program);
        cmd.args(s3fs_args(spec, key, &target, &dir))
            .env_clear()
            .env("PATH", DAEMON_PATH)
            // s3fs falls back to ~/.aws/credentials and ~/.passwd-s3fs: point
            // HOME at the volume's own (empty) directory.
            .env("HOME", &dir)
            .env(ENV_ACCESS_KEY, &credentials.access_key_id)
            .env(ENV_SECRET_KEY, &credentials.secret_access_key)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid(2), which is async-signal-safe. A new session (and
        // process group) keeps the daemon out of the plugin's job control
        // and signals to its group; deliberately no PDEATHSIG, so that the
        // daemon and its mount outlive the plugin.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                MounterError::NotInstalled {
                    program: PROGRAM,
                    package: PACKAGE,
                }
            } else {
                MounterError::Spawn { err }
            }
        })?;
        let pid = child.id();
        let fail = |child: &mut Child, why: String| {
            // Most failures are a daemon on its way out: let it finish (and
            // flush its stdout into the log) before killing it.
            let deadline = Instant::now() + Duration::from_secs(1);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            let _ = child.kill();
            let _ = child.wait();
            // A mount that appeared after the deadline would be dead now.
            if mounted_s3fs(&target) {
                let _ = detach(&target);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            let why = if log_since(&log_path, log_start).contains(INIT_FAILED) {
                "its start-up check of the bucket and credentials failed".to_owned()
            } else {
                why
            };
            MounterError::MountFailed {
                target: target.clone(),
                why,
                log_tail: log_tail(&log_path, log_start, credentials),
            }
        };
        let mut poll = Duration::from_millis(2);
        let start_time = match read_proc_stat(pid) {
            Ok(stat) => stat.start_time,
            Err(e) => return Err(fail(&mut child, e.to_string())),
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(fail(&mut child, format!("it exited ({status})"))),
                Ok(None) => {}
                Err(e) => return Err(fail(&mut child, format!("waiting for it: {e}"))),
            }
            match MountTable::read() {
                Ok(t) if t.mounted_at(&target).is_some_and(|m| m.fs_type == FS_TYPE) => break,
                Ok(_) => {}
                Err(e) => return Err(fail(&mut child, e.to_string())),
            }
            if started.elapsed() > MOUNT_TIMEOUT {
                return Err(fail(
                    &mut child,
                    format!("no mount after {}s", MOUNT_TIMEOUT.as_secs()),
                ));
            }
            // s3fs usually mounts within a few tens of milliseconds: poll
            // fast at first, then back off.
            std::thread::sleep(poll);
            poll = (poll * 2).min(POLL);
        }
        // s3fs 1.90 checks the bucket and credentials only after mounting,
        // while it answers the kernel's FUSE INIT, and on failure logs
        // "Exiting FUSE event loop" before that answer, then exits and
        // unmounts. The kernel holds every other request until INIT is
        // answered, so once a statfs comes back the verdict is in the log.
        let budget = MOUNT_TIMEOUT
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        let probed = probe(&target, budget);
        if log_since(&log_path, log_start).contains(INIT_FAILED) {
            return Err(fail(&mut child, String::new()));
        }
        match probed {
            Probe::Answered => {}
            Probe::Failed(errno) => {
                return Err(fail(&mut child, format!("the mount fails with {errno}")));
            }
            Probe::NoAnswer => {
                return Err(fail(&mut child, "the mount does not answer".into()));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(fail(&mut child, format!("it exited ({status})")));
        }
        tracing::info!(key, pid, target = %target.display(), elapsed_ms = started.elapsed().as_millis() as u64, "s3fs mounted");
        self.lock_children().insert(pid, child);
        Ok(Daemon {
            key: key.to_owned(),
            pid,
            target,
            start_time,
        })
    }

    /// Finds a daemon again from its record (after a plugin restart):
    /// Healthy only when the recorded process is still that s3fs daemon
    /// (same start time, serving the recorded target) and its mount
    /// answers. Changes nothing.
    pub fn adopt(&self, record: &DaemonRecord) -> Health {
        match self.health(&record.target) {
            Health::Healthy if !self.is_daemon(record) => Health::Dead(DeadReason::DaemonGone),
            h => h,
        }
    }

    /// The state of the s3fs mount at `target` (canonical path), from the
    /// mount table and a statfs that the daemon answers itself (no S3
    /// request), bounded by [`PROBE_TIMEOUT`].
    pub fn health(&self, target: &Path) -> Health {
        self.reap();
        if !mounted_s3fs(target) {
            return Health::NotMounted;
        }
        match probe(target, PROBE_TIMEOUT) {
            Probe::Answered => Health::Healthy,
            Probe::Failed(Errno::ENOTCONN | Errno::ECONNABORTED) => {
                Health::Dead(DeadReason::NotConnected)
            }
            Probe::Failed(errno) => Health::Dead(DeadReason::Failing(errno)),
            Probe::NoAnswer => Health::Dead(DeadReason::Unresponsive),
        }
    }

    /// Whether `daemon`'s PID is still the s3fs process that was recorded:
    /// alive (not a zombie), same start time, and its command line names
    /// the recorded target.
    pub fn is_daemon(&self, daemon: &Daemon) -> bool {
        self.reap();
        is_same_process(daemon)
    }

    /// The credentials a live daemon was started with, read back from
    /// `/proc/<pid>/environ` (readable by root only), so that a plugin that
    /// restarted can remount after a later daemon death without keeping
    /// the secret anywhere on disk. Fails unless `daemon` is still the
    /// recorded process.
    pub fn credentials(&self, daemon: &Daemon) -> Result<Credentials, MounterError> {
        if !self.is_daemon(daemon) {
            return Err(MounterError::NotOurDaemon {
                pid: daemon.pid,
                target: daemon.target.clone(),
            });
        }
        let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid)).map_err(|err| {
            MounterError::Proc {
                pid: daemon.pid,
                file: "environ",
                err,
            }
        })?;
        // Checked again: the PID could have been reused while reading.
        if !is_same_process(daemon) {
            return Err(MounterError::NotOurDaemon {
                pid: daemon.pid,
                target: daemon.target.clone(),
            });
        }
        credentials_from_environ(&environ).ok_or(MounterError::NoCredentials { pid: daemon.pid })
    }

    /// Unmounts the s3fs mount at `target` and makes sure `daemon` is gone.
    /// A working mount is unmounted normally (a busy one is an error:
    /// nothing is changed); a dead one is detached lazily. The daemon then
    /// gets [`EXIT_TIMEOUT`] to exit on its own, then SIGTERM, then SIGKILL,
    /// each sent only while the PID is still the recorded process.
    /// Idempotent: no mount and no daemon is success. A mount that is not
    /// s3fs's is never touched.
    pub fn unmount(&self, target: &Path, daemon: &Daemon) -> Result<(), MounterError> {
        // Stacked dead mounts (a remount that went wrong) are detached too.
        for _ in 0..4 {
            if !mounted_s3fs(target) {
                break;
            }
            match self.health(target) {
                Health::NotMounted => break,
                Health::Healthy => match crate::os::mount::umount_nofollow(target) {
                    Ok(()) | Err(Errno::EINVAL) => {}
                    Err(Errno::EBUSY) => {
                        return Err(MounterError::Busy {
                            target: target.to_owned(),
                        });
                    }
                    Err(errno) => {
                        return Err(MounterError::Unmount {
                            target: target.to_owned(),
                            errno,
                        });
                    }
                },
                Health::Dead(_) => match detach(target) {
                    Ok(()) | Err(Errno::EINVAL) => {}
                    Err(errno) => {
                        return Err(MounterError::Unmount {
                            target: target.to_owned(),
                            errno,
                        });
                    }
                },
            }
        }
        self.stop(daemon)?;
        let _ = std::fs::remove_dir_all(self.volume_dir(&daemon.key).join("tmp"));
        Ok(())
    }

    /// Replaces a dead mount: detaches what is left at `daemon.target`,
    /// stops the old daemon if it is somehow still there, and mounts again
    /// at the same target.
    pub fn remount(
        &self,
        spec: &MountSpec,
        credentials: &Credentials,
        daemon: &Daemon,
    ) -> Result<Daemon, MounterError> {
        self.unmount(&daemon.target, daemon)?;
        self.mount(&daemon.key, spec, credentials, &daemon.target)
    }

    /// Waits for `daemon` to exit, then signals it (TERM, then KILL) while
    /// it is still the recorded process. Returns once the process is gone
    /// (or a zombie), not merely on its way out.
    fn stop(&self, daemon: &Daemon) -> Result<(), MounterError> {
        for signal in [None, Some(Signal::SIGTERM), Some(Signal::SIGKILL)] {
            // A daemon that is exiting has already lost its command line:
            // it is no longer provably ours, and needs no signal anyway.
            if let Some(signal) = signal.filter(|_| self.is_daemon(daemon)) {
                tracing::warn!(pid = daemon.pid, %signal, "s3fs daemon still running after its unmount");
                let pid = i32::try_from(daemon.pid).map_err(|_| MounterError::NotOurDaemon {
                    pid: daemon.pid,
                    target: daemon.target.clone(),
                })?;
                let sent = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                // A stopped daemon acts on SIGTERM only once continued.
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGCONT);
                match sent {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(errno) => {
                        return Err(MounterError::Signal {
                            pid: daemon.pid,
                            signal,
                            errno,
                        });
                    }
                }
            }
            if self.wait_gone(daemon, self.exit_timeout) {
                return Ok(());
            }
        }
        Err(MounterError::StillRunning { pid: daemon.pid })
    }

    /// Waits until no live process has `daemon`'s PID and start time.
    fn wait_gone(&self, daemon: &Daemon, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            self.reap();
            if !is_running(daemon) {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Reaps the daemons this process spawned that have exited.
    fn reap(&self) {
        self.lock_children()
            .retain(|_, c| matches!(c.try_wait(), Ok(None)));
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Child>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MountSpec {
    /// Checks every field that ends up in s3fs's options: nothing may add
    /// an option (`,`), change the source syntax (`:`) or escape the bucket.
    pub fn validate(&self) -> Result<(), MounterError> {
        let bad = |field, reason| Err(MounterError::InvalidSpec { field, reason });
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if self.bucket.is_empty() || self.bucket.len() > 255 || !self.bucket.chars().all(name_char)
        {
            return bad("bucket", "1 to 255 characters of [A-Za-z0-9._-]");
        }
        if let Some(p) = &self.prefix
            && normalized_prefix(p).is_none()
        {
            return bad(
                "prefix",
                "segments of [A-Za-z0-9._-] separated by '/', no '.' or '..' segment, at most 1024 bytes",
            );
        }
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|s| self.endpoint.strip_prefix(s).is_some_and(|r| !r.is_empty()));
        if !scheme_ok
            || self
                .endpoint
                .chars()
                .any(|c| c == ',' || c.is_whitespace() || c.is_control())
        {
            return bad(
                "endpoint",
                "an http:// or https:// URL without commas or whitespace",
            );
        }
        if self.region.is_empty() || self.region.len() > 64 || !self.region.chars().all(name_char) {
            return bad("region", "1 to 64 characters of [A-Za-z0-9._-]");
        }
        if self.umask.is_some_and(|u| u > 0o777) {
            return bad("umask", "at most 0o777");
        }
        Ok(())
    }
}

/// The prefix as s3fs wants it after `bucket:` (`/a/b`), or None when it
/// is not a safe relative key path.
fn normalized_prefix(prefix: &str) -> Option<String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() || trimmed.len() > 1024 {
        return None;
    }
    let mut out = String::with_capacity(trimmed.len() + 1);
    for seg in trimmed.split('/') {
        let ok = !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !ok {
            return None;
        }
        out.push('/');
        out.push_str(seg);
    }
    Some(out)
}

fn validate_key(key: &str) -> Result<(), MounterError> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(MounterError::InvalidKey(key.to_owned()))
    }
}

/// The s3fs command line (after the program name) for a validated `spec`,
/// with the volume's private directory `dir` (no comma in it). Holds no
/// credential: those go through the environment.
///
/// Options beyond the endpoint ones: `-f` keeps s3fs in the foreground so
/// the PID we hold is the daemon; `tmpdir` keeps its staging files in the
/// volume's private directory (no `use_cache`: the local cache stays off);
/// `logfile` makes s3fs write each log line as it happens (its stdout is
/// block-buffered, so a failure would only show once it exits); `sigv4`
/// never falls back to SigV2; `complement_stat` gives objects written by
/// other S3 clients (no mode metadata) a usable mode; `instance_name` tags
/// the log lines with the volume key.
fn s3fs_args(spec: &MountSpec, key: &str, target: &Path, dir: &Path) -> Vec<OsString> {
    let mut source = spec.bucket.clone();
    if let Some(p) = spec.prefix.as_deref().and_then(normalized_prefix) {
        source.push(':');
        source.push_str(&p);
    }
    let mut opts: Vec<String> = vec![
        format!("url={}", spec.endpoint),
        "use_path_request_style".into(),
        format!("endpoint={}", spec.region),
        "sigv4".into(),
        "complement_stat".into(),
        format!("instance_name={key}"),
        "dbglevel=err".into(),
    ];
    let mut tmp_opt = OsString::from("tmpdir=");
    tmp_opt.push(dir.join("tmp"));
    tmp_opt.push(",logfile=");
    tmp_opt.push(dir.join(LOG_NAME));
    if spec.read_only {
        opts.push("ro".into());
    }
    if spec.allow_other {
        opts.push("allow_other".into());
    }
    if let Some(uid) = spec.uid {
        opts.push(format!("uid={uid}"));
    }
    if let Some(gid) = spec.gid {
        opts.push(format!("gid={gid}"));
    }
    let umask = spec.umask.or(spec.gid.map(|_| 0o000));
    if let Some(u) = umask {
        opts.push(format!("umask={u:04o}"));
        opts.push(format!("mp_umask={u:04o}"));
    }
    let mut o = OsString::from(opts.join(","));
    o.push(",");
    o.push(tmp_opt);
    vec![
        source.into(),
        target.as_os_str().to_owned(),
        "-f".into(),
        "-o".into(),
        o,
    ]
}

/// The version from `s3fs --version` output ("... File System V1.90 (...").
fn parse_version(text: &str) -> Option<String> {
    text.lines().next()?.split_whitespace().find_map(|w| {
        let v = w.strip_prefix('V')?;
        (v.chars().next()?.is_ascii_digit()).then(|| v.to_owned())
    })
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    state: char,
    start_time: u64,
}

/// Parses `/proc/<pid>/stat` (proc(5)): the command name is in parentheses
/// and may hold spaces and parentheses itself, so fields are counted after
/// the last `)`. Field 3 is the state, field 22 the start time.
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn read_proc_stat(pid: u32) -> Result<ProcStat, MounterError> {
    let proc_err = |err| MounterError::Proc {
        pid,
        file: "stat",
        err,
    };
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(proc_err)?;
    parse_proc_stat(&text).ok_or_else(|| proc_err(std::io::Error::other("unparsable")))
}

/// Whether a NUL-separated command line is s3fs's, serving `target`.
fn cmdline_serves(cmdline: &[u8], target: &Path) -> bool {
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let Some(argv0) = args.next() else {
        return false;
    };
    let program = Path::new(OsStr::from_bytes(argv0)).file_name();
    program == Some(OsStr::new(PROGRAM)) && args.any(|a| a == target.as_os_str().as_bytes())
}

/// Whether a live (not zombie) process has `daemon`'s PID and start time.
fn is_running(daemon: &Daemon) -> bool {
    read_proc_stat(daemon.pid).is_ok_and(|stat| {
        stat.start_time == daemon.start_time && !matches!(stat.state, 'Z' | 'X' | 'x')
    })
}

/// [`is_running`], and its command line is s3fs serving the recorded
/// target (an exiting process has an empty one).
fn is_same_process(daemon: &Daemon) -> bool {
    is_running(daemon)
        && std::fs::read(format!("/proc/{}/cmdline", daemon.pid))
            .is_ok_and(|c| cmdline_serves(&c, &daemon.target))
}

/// The S3 credentials in a NUL-separated environment block.
fn credentials_from_environ(environ: &[u8]) -> Option<Credentials> {
    let mut id = None;
    let mut secret = None;
    for var in environ.split(|b| *b == 0) {
        let Some(eq) = var.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (name, value) = (&var[..eq], &var[eq + 1..]);
        let value = String::from_utf8(value.to_vec()).ok();
        match name {
            n if n == ENV_ACCESS_KEY.as_bytes() => id = value,
            n if n == ENV_SECRET_KEY.as_bytes() => secret = value,
            _ => {}
        }
    }
    Some(Credentials {
        access_key_id: id.filter(|s| !s.is_empty())?,
        secret_access_key: secret.filter(|s| !s.is_empty())?,
    })
}

/// The last lines of what a daemon logged since `from`, with the access
/// key and secret blanked and lines that look like they carry a signature
/// or credentials left out.
fn log_tail(path: &Path, from: u64, credentials: &Credentials) -> String {
    redact_log(&log_since(path, from), credentials, LOG_TAIL_LINES)
}

/// What the log at `path` holds from byte `from` on (at most 1 MiB).
fn log_since(path: &Path, from: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.take(1 << 20).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn redact_log(text: &str, credentials: &Credentials, max_lines: usize) -> String {
    // Header- and assignment-like forms only: s3fs's own complaints
    // ("invalid credentials", "SignatureDoesNotMatch") are worth keeping.
    const SECRET_MARKERS: [&str; 7] = [
        "authorization:",
        "signature=",
        "credential=",
        "secret_access_key",
        "secretaccesskey",
        "security-token",
        "session_token",
    ];
    let lines: Vec<String> = text
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            !SECRET_MARKERS.iter().any(|m| lower.contains(m))
        })
        .map(|l| {
            let mut l = l.to_owned();
            for s in [&credentials.secret_access_key, &credentials.access_key_id] {
                if !s.is_empty() {
                    l = l.replace(s.as_str(), "<redacted>");
                }
            }
            l
        })
        .collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

fn make_private_dir(path: &Path) -> Result<(), MounterError> {
    let err = |err| MounterError::RuntimeDir {
        path: path.to_owned(),
        err,
    };
    match DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) => return Err(err(e)),
    }
    // An existing directory keeps its mode: tighten it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Whether the topmost mount at `target` is an s3fs mount.
fn mounted_s3fs(target: &Path) -> bool {
    MountTable::read().is_ok_and(|t| t.mounted_at(target).is_some_and(|m| m.fs_type == FS_TYPE))
}

enum Probe {
    Answered,
    Failed(Errno),
    NoAnswer,
}

/// statfs on the mount from a helper thread, so that a hung daemon cannot
/// hang the caller (the thread stays blocked until the daemon answers or
/// dies).
fn probe(target: &Path, timeout: Duration) -> Probe {
    let (tx, rx) = mpsc::channel();
    let path = target.to_owned();
    let spawned = std::thread::Builder::new()
        .name("s3fs-probe".into())
        .spawn(move || {
            let _ = tx.send(nix::sys::statfs::statfs(&path).map(|_| ()));
        });
    if spawned.is_err() {
        return Probe::NoAnswer;
    }
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Probe::Answered,
        Ok(Err(errno)) => Probe::Failed(errno),
        Err(_) => Probe::NoAnswer,
    }
}

/// Lazy umount2(2): a dead FUSE mount cannot answer the checks a normal
/// unmount makes, and processes still holding files on it get errors
/// rather than keeping it in the tree.
fn detach(target: &Path) -> Result<(), Errno> {
    nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MountSpec {
        MountSpec {
            bucket: "vols".into(),
            prefix: None,
            endpoint: "http://127.0.0.1:3900".into(),
            region: "garage".into(),
            read_only: false,
            uid: None,
            gid: None,
            umask: None,
            allow_other: false,
        }
    }

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "GK0123456789abcdef".into(),
            secret_access_key: "s3cr3t-0123456789abcdef0123456789".into(),
        }
    }

    fn args(spec: &MountSpec) -> Vec<String> {
        s3fs_args(
            spec,
            "ab12",
            Path::new("/stage/x"),
            Path::new("/run/o/ab12"),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    fn options(spec: &MountSpec) -> Vec<String> {
        let a = args(spec);
        let i = a.iter().position(|x| x == "-o").unwrap();
        a[i + 1].split(',').map(str::to_owned).collect()
    }

    #[test]
    fn command_line_is_foreground_with_endpoint_options_and_no_credentials() {
        let a = args(&spec());
        assert_eq!(a[0], "vols");
        assert_eq!(a[1], "/stage/x");
        assert!(a.contains(&"-f".to_owned()));
        let o = options(&spec());
        for want in [
            "url=http://127.0.0.1:3900",
            "use_path_request_style",
            "endpoint=garage",
            "tmpdir=/run/o/ab12/tmp",
            "logfile=/run/o/ab12/s3fs.log",
            // mount() reads the start-up verdict from the log at this level.
            "dbglevel=err",
        ] {
            assert!(o.contains(&want.to_owned()), "{want} missing from {o:?}");
        }
        for absent in ["ro", "allow_other", "use_cache"] {
            assert!(
                !o.iter().any(|x| x.starts_with(absent)),
                "{absent} in {o:?}"
            );
        }
        let c = creds();
        for arg in &a {
            assert!(!arg.contains(&c.secret_access_key));
            assert!(!arg.contains(&c.access_key_id));
            assert!(!arg.contains("passwd"));
        }
    }

    #[test]
    fn prefix_mode_names_the_prefix_after_the_bucket() {
        let mut s = spec();
        s.prefix = Some("/stowage/vol-1/".into());
        assert_eq!(args(&s)[0], "vols:/stowage/vol-1");
    }

    #[test]
    fn read_only_allow_other_and_owner_options() {
        let mut s = spec();
        s.read_only = true;
        s.allow_other = true;
        s.uid = Some(1000);
        let o = options(&s);
        for want in ["ro", "allow_other", "uid=1000"] {
            assert!(o.contains(&want.to_owned()), "{want} missing from {o:?}");
        }
        assert!(!o.iter().any(|x| x.starts_with("umask")));
    }

    #[test]
    fn mount_group_sets_gid_and_an_open_umask() {
        let mut s = spec();
        s.gid = Some(4242);
        let o = options(&s);
        for want in ["gid=4242", "umask=0000", "mp_umask=0000"] {
            assert!(o.contains(&want.to_owned()), "{want} missing from {o:?}");
        }
        s.umask = Some(0o027);
        assert!(options(&s).contains(&"umask=0027".to_owned()));
    }

    #[test]
    fn specs_that_could_inject_options_are_refused() {
        type Change = fn(&mut MountSpec);
        let cases: Vec<(&str, Change)> = vec![
            ("bucket", |s| s.bucket = "b,allow_other".into()),
            ("bucket", |s| s.bucket = "b:/x".into()),
            ("bucket", |s| s.bucket = String::new()),
            ("prefix", |s| s.prefix = Some("a/../b".into())),
            ("prefix", |s| s.prefix = Some("a,ro".into())),
            ("prefix", |s| s.prefix = Some("a//b".into())),
            ("prefix", |s| s.prefix = Some("/".into())),
            ("endpoint", |s| {
                s.endpoint = "http://h,passwd_file=/x".into()
            }),
            ("endpoint", |s| s.endpoint = "ftp://h".into()),
            ("endpoint", |s| s.endpoint = "http://".into()),
            ("region", |s| s.region = "r,ro".into()),
            ("umask", |s| s.umask = Some(0o1000)),
        ];
        for (field, change) in cases {
            let mut s = spec();
            change(&mut s);
            match s.validate() {
                Err(MounterError::InvalidSpec { field: f, .. }) => assert_eq!(f, field, "{s:?}"),
                other => panic!("{s:?} gave {other:?}"),
            }
        }
        spec().validate().unwrap();
        let mut s = spec();
        s.prefix = Some("stowage/0a1b-2c".into());
        s.endpoint = "https://s3.eu-west-1.amazonaws.com".into();
        s.validate().unwrap();
    }

    #[test]
    fn volume_keys_are_hex() {
        validate_key("0123456789abcdef0123456789abcdef").unwrap();
        validate_key("0a1b2c3d-0a1b-2c3d-4e5f-0a1b2c3d4e5f").unwrap();
        for bad in ["", "../x", "a/b", "xyz", &"a".repeat(65)] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn credentials_debug_hides_the_secret() {
        let c = creds();
        let shown = format!("{c:?}");
        assert!(!shown.contains(&c.secret_access_key), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains(&c.access_key_id));
    }

    #[test]
    fn log_tail_leaves_out_secrets() {
        let c = creds();
        let log = format!(
            "line one\nAuthorization: AWS4-HMAC-SHA256 Credential={id}/x, Signature=ab\n\
             key {secret} leaked\nsecret_access_key=zzz\nfailed for {id}\n\
             [CRT] invalid credentials (SignatureDoesNotMatch)\nlast line\n",
            id = c.access_key_id,
            secret = c.secret_access_key
        );
        let tail = redact_log(&log, &c, 20);
        assert!(!tail.contains(&c.secret_access_key), "{tail}");
        assert!(!tail.contains(&c.access_key_id), "{tail}");
        assert!(!tail.to_ascii_lowercase().contains("signature="), "{tail}");
        assert!(!tail.contains("zzz"), "{tail}");
        assert!(
            tail.contains("line one") && tail.contains("last line"),
            "{tail}"
        );
        assert!(tail.contains("key <redacted> leaked"), "{tail}");
        assert!(tail.contains("invalid credentials"), "{tail}");
        assert_eq!(redact_log(&log, &c, 1), "last line");
    }

    #[test]
    fn proc_stat_is_read_after_the_last_parenthesis() {
        // A command name with spaces and a parenthesis, from a real stat
        // line with the name changed.
        let line = "21957 (s3 fs) x) S 1 21957 21957 0 -1 4194560 1084 0 0 0 2 1 0 0 20 0 \
                    11 0 422734 459763712 2460 18446744073709551615 1 1 0 0 0 0 0 4096 \
                    1260 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 422734
            })
        );
        assert_eq!(parse_proc_stat("1 (x) S 1"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn cmdline_must_be_s3fs_serving_the_target() {
        let t = Path::new("/stage/x");
        assert!(cmdline_serves(b"/usr/bin/s3fs\0vols\0/stage/x\0-f\0", t));
        assert!(cmdline_serves(b"s3fs\0vols:/p\0/stage/x\0", t));
        assert!(!cmdline_serves(b"s3fs\0vols\0/stage/y\0", t));
        assert!(!cmdline_serves(b"/usr/bin/s3fs\0vols\0/stage/x/sub\0", t));
        assert!(!cmdline_serves(b"/usr/bin/rclone\0mount\0/stage/x\0", t));
        assert!(!cmdline_serves(b"", t));
    }

    #[test]
    fn credentials_come_back_from_the_environment_block() {
        let c = creds();
        let env = format!(
            "PATH=/bin\0HOME=/h\0{ENV_ACCESS_KEY}={}\0{ENV_SECRET_KEY}={}\0",
            c.access_key_id, c.secret_access_key
        );
        assert_eq!(credentials_from_environ(env.as_bytes()), Some(c));
        assert_eq!(
            credentials_from_environ(b"PATH=/bin\0AWS_ACCESS_KEY_ID=x\0"),
            None
        );
        assert_eq!(
            credentials_from_environ(b"AWS_ACCESS_KEY_ID=x\0AWS_SECRET_ACCESS_KEY=\0"),
            None
        );
    }

    #[test]
    fn a_missing_s3fs_names_the_debian_package() {
        let mut m = Mounter::new("/nonexistent");
        m.program = PathBuf::from("/nonexistent/bin/s3fs");
        let e = m.check_installed().unwrap_err();
        assert!(matches!(e, MounterError::NotInstalled { .. }), "{e:?}");
        assert!(e.to_string().contains("Debian package `s3fs`"), "{e}");
    }

    #[test]
    fn version_is_read_from_the_first_line() {
        let out = "Amazon Simple Storage Service File System V1.90 (commit:unknown) with GnuTLS(gcrypt)\nCopyright (C) 2010\n";
        assert_eq!(parse_version(out).as_deref(), Some("1.90"));
        assert_eq!(parse_version("nothing here"), None);
    }
}
