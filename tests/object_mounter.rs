//! The s3fs mounter of object volumes against a real Garage and real s3fs
//! daemons: data written through a mount is in S3 (read back through a
//! fresh daemon), prefix and read-only mounts, the mount group, a killed
//! daemon seen as dead and remounted, a daemon that outlives the process
//! that started it and is adopted from its record, and no secret on a
//! command line or in a file. Every mount and daemon a test makes is
//! removed by drop guards, even when the test panics.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Scratch;
use common::garage::Garage;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stowage::backend::object::mounter::{
    Credentials, Daemon, DeadReason, FS_TYPE, Health, MountSpec, Mounter, MounterError,
};
use stowage::os::mountinfo::MountTable;

/// A Garage, a scratch dir for targets and the runtime dir, and a mounter.
/// Fields drop in order: leftover mounts are detached before the mounter
/// and Garage go.
struct World {
    scratch: Scratch,
    mounter: Mounter,
    garage: Garage,
}

impl World {
    fn new(tag: &str) -> World {
        let scratch = Scratch::new(tag);
        let mounter = Mounter::new(scratch.root.join("run"));
        World {
            scratch,
            mounter,
            garage: Garage::start(),
        }
    }

    fn spec(&self) -> MountSpec {
        MountSpec {
            bucket: self.garage.bucket.clone(),
            prefix: None,
            endpoint: self.garage.endpoint.clone(),
            region: self.garage.region.clone(),
            read_only: false,
            uid: None,
            gid: None,
            umask: None,
            allow_other: false,
        }
    }

    fn credentials(&self) -> Credentials {
        Credentials {
            access_key_id: self.garage.key.access_key_id.clone(),
            secret_access_key: self.garage.key.secret_access_key.clone(),
        }
    }

    /// A fresh empty directory in the scratch dir.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.scratch.root.join(name);
        std::fs::create_dir(&d).unwrap();
        d
    }

    fn mount(&self, spec: &MountSpec, target: &Path) -> Mounted<'_> {
        let daemon = self
            .mounter
            .mount(&new_key(), spec, &self.credentials(), target)
            .unwrap_or_else(|e| panic!("mount {}: {e}", target.display()));
        Mounted {
            mounter: &self.mounter,
            daemon,
        }
    }
}

/// A mount made by a test: unmounted, and its daemon stopped, on drop.
struct Mounted<'a> {
    mounter: &'a Mounter,
    daemon: Daemon,
}

impl Mounted<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.daemon.target.join(name)
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        release(self.mounter, &self.daemon);
    }
}

/// Unmounts and stops `daemon`; if that fails, kills it (only while it is
/// still that process) and detaches its mount.
fn release(mounter: &Mounter, daemon: &Daemon) {
    if let Err(e) = mounter.unmount(&daemon.target, daemon) {
        eprintln!("guard: unmount {}: {e}", daemon.target.display());
        if mounter.is_daemon(daemon) {
            let _ = kill(Pid::from_raw(daemon.pid as i32), Signal::SIGKILL);
        }
        let _ = nix::mount::umount2(&daemon.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn new_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn s3fs_mounted(target: &Path) -> bool {
    MountTable::read()
        .unwrap()
        .mounted_at(target)
        .is_some_and(|m| m.fs_type == FS_TYPE)
}

/// True once `pid` is gone or a zombie.
fn gone(pid: u32) -> bool {
    !common::s3fs::alive(pid)
}

/// PIDs of live s3fs processes whose command line names `target`.
fn s3fs_serving(target: &Path) -> Vec<u32> {
    let target = target.to_str().unwrap();
    common::s3fs::processes()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a == target))
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn mount_write_read_unmount_leaves_no_mount_and_no_daemon() {
    let w = World::new("mnt-basic");
    let target = w.dir("a");
    let m = w.mount(&w.spec(), &target);
    assert!(s3fs_mounted(&target));
    assert_eq!(m.daemon.target, target.canonicalize().unwrap());
    assert!(w.mounter.is_daemon(&m.daemon));
    assert_eq!(w.mounter.health(&target), Health::Healthy);
    assert_eq!(w.mounter.adopt(&m.daemon), Health::Healthy);

    std::fs::write(m.path("hello.txt"), b"hello object volume").unwrap();
    assert_eq!(
        std::fs::read(m.path("hello.txt")).unwrap(),
        b"hello object volume"
    );

    // A second mount on the same target is refused, not stacked.
    match w
        .mounter
        .mount(&new_key(), &w.spec(), &w.credentials(), &target)
    {
        Err(MounterError::AlreadyMounted { fs_type, .. }) => assert_eq!(fs_type, FS_TYPE),
        other => panic!("second mount on the target: {other:?}"),
    }

    let daemon = m.daemon.clone();
    w.mounter.unmount(&target, &daemon).unwrap();
    assert!(!s3fs_mounted(&target));
    assert!(gone(daemon.pid), "daemon {} still running", daemon.pid);
    assert!(!w.mounter.is_daemon(&daemon));
    assert_eq!(w.mounter.health(&target), Health::NotMounted);
    assert_eq!(w.mounter.adopt(&daemon), Health::NotMounted);
    // Idempotent: a second unmount of what is gone succeeds.
    w.mounter.unmount(&target, &daemon).unwrap();
    drop(m);

    // The object is in S3: a new daemon on another target reads it.
    let again = w.mount(&w.spec(), &w.dir("b"));
    assert_ne!(again.daemon.pid, daemon.pid);
    assert_eq!(
        std::fs::read(again.path("hello.txt")).unwrap(),
        b"hello object volume"
    );
}

/// Random writes inside and past the end of a multipart-sized file, fsync,
/// then rename: a fresh daemon reads back exactly the expected bytes.
#[test]
fn random_writes_fsync_and_rename_are_byte_exact_in_s3() {
    let w = World::new("mnt-rw");
    let size = 30 << 20; // above s3fs's 25 MB multipart threshold
    let mut expected = pattern(size, 1);
    {
        let m = w.mount(&w.spec(), &w.dir("a"));
        std::fs::write(m.path("big.bin"), &expected).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("big.bin"))
            .unwrap();
        let writes = [
            (3u64, 100usize),
            (10 << 20, 4096),
            ((25 << 20) - 7, 9000),
            (size as u64 - 10, 50),
            (size as u64 + 1000, 333), // past the end: a hole, then data
        ];
        for (i, (off, len)) in writes.into_iter().enumerate() {
            let data = pattern(len, 100 + i as u64);
            f.write_all_at(&data, off).unwrap();
            let end = off as usize + len;
            if end > expected.len() {
                expected.resize(end, 0);
            }
            expected[off as usize..end].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        // Read back through the same handle before closing.
        let mut head = vec![0u8; 200];
        f.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, expected[..200]);
        drop(f);
        std::fs::rename(m.path("big.bin"), m.path("renamed.bin")).unwrap();
        assert!(!m.path("big.bin").exists());
    }
    let m = w.mount(&w.spec(), &w.dir("b"));
    assert!(!m.path("big.bin").exists());
    let got = std::fs::read(m.path("renamed.bin")).unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "content differs after a remount");
}

#[test]
fn prefix_mode_shows_only_its_prefix() {
    let w = World::new("mnt-prefix");
    let whole = w.mount(&w.spec(), &w.dir("whole"));
    std::fs::write(whole.path("outside.txt"), b"outside").unwrap();

    let mut spec = w.spec();
    spec.prefix = Some("volumes/v1".into());
    let part = w.mount(&spec, &w.dir("part"));
    std::fs::write(part.path("inside.txt"), b"inside").unwrap();
    std::fs::create_dir(part.path("sub")).unwrap();
    std::fs::write(part.path("sub/deep.txt"), b"deep").unwrap();

    let listed: Vec<String> = std::fs::read_dir(&part.daemon.target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!listed.contains(&"outside.txt".to_owned()), "{listed:?}");
    assert!(listed.contains(&"inside.txt".to_owned()), "{listed:?}");
    // The whole-bucket mount sees the prefix's objects under it.
    assert_eq!(
        std::fs::read(whole.path("volumes/v1/inside.txt")).unwrap(),
        b"inside"
    );
    assert_eq!(
        std::fs::read(whole.path("volumes/v1/sub/deep.txt")).unwrap(),
        b"deep"
    );
}

#[test]
fn read_only_mount_refuses_writes_with_erofs() {
    let w = World::new("mnt-ro");
    {
        let rw = w.mount(&w.spec(), &w.dir("rw"));
        std::fs::write(rw.path("data.txt"), b"written before").unwrap();
    }
    let mut spec = w.spec();
    spec.read_only = true;
    let ro = w.mount(&spec, &w.dir("ro"));
    assert!(
        MountTable::read()
            .unwrap()
            .mounted_at(&ro.daemon.target)
            .unwrap()
            .is_read_only()
    );
    assert_eq!(
        std::fs::read(ro.path("data.txt")).unwrap(),
        b"written before"
    );
    let errno = |e: std::io::Error| e.raw_os_error().map(Errno::from_raw);
    let e = std::fs::write(ro.path("new.txt"), b"x").unwrap_err();
    assert_eq!(errno(e), Some(Errno::EROFS));
    let e = std::fs::OpenOptions::new()
        .append(true)
        .open(ro.path("data.txt"))
        .unwrap_err();
    assert_eq!(errno(e), Some(Errno::EROFS));
    let e = std::fs::remove_file(ro.path("data.txt")).unwrap_err();
    assert_eq!(errno(e), Some(Errno::EROFS));
    assert_eq!(w.mounter.health(&ro.daemon.target), Health::Healthy);
}

/// Runs `sh -c script` as uid 65534 with primary group `gid` and the
/// supplementary `groups`.
fn run_as(gid: u32, groups: &[u32], script: &str) -> std::process::Output {
    let groups: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", script]).stdin(Stdio::null());
    // SAFETY: runs in the forked child before exec and only makes the
    // setgroups/setgid/setuid system calls (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(65534))?;
            Ok(())
        });
    }
    cmd.output().unwrap()
}

const NOGROUP: u32 = 65534;

/// Appends a line to `file` and creates `new` as uid 65534.
fn write_as(gid: u32, groups: &[u32], file: &Path, new: &Path) -> Result<(), String> {
    let out = run_as(
        gid,
        groups,
        &format!(
            "echo member >> '{}' && echo new > '{}'",
            file.display(),
            new.display()
        ),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// VOLUME_MOUNT_GROUP through mount options (no walk of the bucket):
/// every file shows the group, and a workload that has the group as a
/// supplementary group (as a CO's fsGroup gives it) can write existing
/// files and create new ones.
#[test]
fn mount_group_shows_on_files_and_a_supplementary_member_can_write() {
    let w = World::new("mnt-group");
    let group = 4321;
    {
        let plain = w.mount(&w.spec(), &w.dir("plain"));
        std::fs::write(plain.path("by-root.txt"), b"root\n").unwrap();
        std::fs::set_permissions(
            plain.path("by-root.txt"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    std::fs::set_permissions(&w.scratch.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = w.spec();
    spec.gid = Some(group);
    spec.allow_other = true;
    let m = w.mount(&spec, &w.dir("grouped"));

    let root = std::fs::metadata(&m.daemon.target).unwrap();
    assert_eq!(root.gid(), group);
    assert_eq!(root.mode() & 0o070, 0o070, "root mode {:o}", root.mode());
    let file = m.path("by-root.txt");
    let f = std::fs::metadata(&file).unwrap();
    assert_eq!(f.gid(), group);
    assert_eq!(f.mode() & 0o060, 0o060, "file mode {:o}", f.mode());

    write_as(NOGROUP, &[group], &file, &m.path("by-member.txt"))
        .unwrap_or_else(|e| panic!("a member of the mount group could not write: {e}"));
    assert_eq!(std::fs::read(&file).unwrap(), b"root\nmember\n");
    assert_eq!(
        std::fs::metadata(m.path("by-member.txt")).unwrap().gid(),
        group
    );
}

/// Why a mount group gets umask 0 by default: with a group-only umask,
/// s3fs 1.90 lets in a caller whose primary gid is the group but refuses
/// one that has it only as a supplementary group.
#[test]
fn s3fs_group_rights_ignore_supplementary_groups() {
    let w = World::new("mnt-group-umask");
    let group = 4322;
    std::fs::set_permissions(&w.scratch.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = w.spec();
    spec.gid = Some(group);
    spec.umask = Some(0o002);
    spec.allow_other = true;
    let m = w.mount(&spec, &w.dir("grouped"));
    let file = m.path("f.txt");
    std::fs::write(&file, b"root\n").unwrap();
    let f = std::fs::metadata(&file).unwrap();
    assert_eq!((f.gid(), f.mode() & 0o777), (group, 0o775));

    write_as(group, &[], &file, &m.path("by-primary.txt"))
        .unwrap_or_else(|e| panic!("a caller with the group as primary gid could not write: {e}"));
    let refused = write_as(NOGROUP, &[group], &file, &m.path("by-supplementary.txt"));
    assert!(refused.is_err(), "s3fs now honours supplementary groups");
    let outsider = write_as(NOGROUP, &[], &file, &m.path("by-outsider.txt"));
    assert!(outsider.is_err(), "a non-member could write");
    assert_eq!(std::fs::read(&file).unwrap(), b"root\nmember\n");
}

/// kill -9 of the daemon: the mount stays and answers ENOTCONN, health
/// says dead, and a remount at the same target restores the data.
#[test]
fn killed_daemon_is_dead_and_remount_restores_the_data() {
    let w = World::new("mnt-kill");
    let target = w.dir("a");
    let mut m = w.mount(&w.spec(), &target);
    std::fs::write(m.path("keep.txt"), b"survives the daemon").unwrap();

    // The daemon is our own unreaped child: the PID cannot be reused.
    kill(Pid::from_raw(m.daemon.pid as i32), Signal::SIGKILL).unwrap();
    let start = Instant::now();
    while !gone(m.daemon.pid) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s3fs_mounted(&target), "the dead mount should stay");
    let e = std::fs::read(m.path("keep.txt")).unwrap_err();
    // ECONNABORTED while the kernel is still tearing the connection down.
    assert!(
        matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::ENOTCONN | Errno::ECONNABORTED)
        ),
        "{e:?}"
    );
    assert_eq!(
        w.mounter.health(&target),
        Health::Dead(DeadReason::NotConnected)
    );
    assert_eq!(
        w.mounter.adopt(&m.daemon),
        Health::Dead(DeadReason::NotConnected)
    );
    assert!(!w.mounter.is_daemon(&m.daemon));
    assert!(matches!(
        w.mounter.credentials(&m.daemon),
        Err(MounterError::NotOurDaemon { .. })
    ));

    let old = m.daemon.clone();
    m.daemon = w
        .mounter
        .remount(&w.spec(), &w.credentials(), &old)
        .unwrap();
    assert_ne!(m.daemon.pid, old.pid);
    assert_eq!(m.daemon.target, old.target);
    assert_eq!(m.daemon.key, old.key);
    assert_eq!(w.mounter.health(&target), Health::Healthy);
    assert_eq!(
        std::fs::read(m.path("keep.txt")).unwrap(),
        b"survives the daemon"
    );
    // Exactly one mount is left at the target (the dead one was detached).
    let table = MountTable::read().unwrap();
    assert_eq!(table.all_at(&m.daemon.target).count(), 1);
}

/// A daemon that stops answering (SIGSTOP) is reported unresponsive, and
/// unmount detaches its mount and, when the daemon does not exit, signals
/// it (TERM with CONT, then KILL) until it is gone.
#[test]
fn stopped_daemon_is_unresponsive_and_unmount_still_ends_it() {
    let mut w = World::new("mnt-stop");
    w.mounter = Mounter::new(w.scratch.root.join("run")).with_exit_timeout(Duration::from_secs(2));
    let target = w.dir("a");
    let m = w.mount(&w.spec(), &target);
    let pid = Pid::from_raw(m.daemon.pid as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    assert_eq!(
        w.mounter.health(&target),
        Health::Dead(DeadReason::Unresponsive)
    );
    assert!(
        w.mounter.is_daemon(&m.daemon),
        "a stopped daemon is still it"
    );
    w.mounter.unmount(&target, &m.daemon).unwrap();
    assert!(gone(m.daemon.pid));
    assert!(!s3fs_mounted(&target));
    assert_eq!(w.mounter.health(&target), Health::NotMounted);
}

/// What the helper process needs to mount (secrets in its environment).
const CHILD_ENV: &str = "STOWAGE_TEST_MOUNTER_CHILD";

/// The process side of `daemon_outlives_the_process_that_started_it`: not
/// a test of its own (it fails when run without its parent).
#[test]
#[ignore = "helper process of daemon_outlives_the_process_that_started_it"]
fn helper_mounts_and_waits() {
    let conf: serde_json::Value = serde_json::from_str(
        &std::env::var(CHILD_ENV).expect("only run by daemon_outlives_the_process_that_started_it"),
    )
    .unwrap();
    let s = |k: &str| conf[k].as_str().unwrap().to_owned();
    let spec = MountSpec {
        bucket: s("bucket"),
        prefix: None,
        endpoint: s("endpoint"),
        region: s("region"),
        read_only: false,
        uid: None,
        gid: None,
        umask: None,
        allow_other: false,
    };
    let creds = Credentials {
        access_key_id: s("id"),
        secret_access_key: s("secret"),
    };
    let mounter = Mounter::new(s("runtime"));
    let daemon = mounter
        .mount(&s("key"), &spec, &creds, Path::new(&s("target")))
        .unwrap();
    let record = PathBuf::from(s("record"));
    let tmp = record.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&daemon).unwrap()).unwrap();
    std::fs::rename(&tmp, &record).unwrap();
    // Wait to be killed.
    std::thread::sleep(Duration::from_secs(120));
    panic!("helper was not killed");
}

/// The helper process and, once it wrote one, the daemon of its record:
/// killed and unmounted on drop.
struct Helper<'a> {
    child: Child,
    record: PathBuf,
    mounter: &'a Mounter,
}

impl Helper<'_> {
    fn daemon(&self) -> Option<Daemon> {
        let bytes = std::fs::read(&self.record).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }
}

impl Drop for Helper<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = self.daemon() {
            release(self.mounter, &d);
            // We are the daemon's subreaper: reap it.
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(d.pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Mounts outlive the node plugin: a daemon started by a process that is
/// then killed keeps serving, is adopted from its record, gives back its
/// credentials, and is unmounted and stopped by the adopter.
#[test]
fn daemon_outlives_the_process_that_started_it() {
    let w = World::new("mnt-orphan");
    // Orphans get this process as parent rather than PID 1, so that the
    // test can reap the daemon (a parent, not a requirement of the code).
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let target = w.dir("a");
    let record = w.scratch.root.join("record.json");
    let runtime = w.scratch.root.join("run");
    let conf = serde_json::json!({
        "bucket": w.garage.bucket,
        "endpoint": w.garage.endpoint,
        "region": w.garage.region,
        "id": w.garage.key.access_key_id,
        "secret": w.garage.key.secret_access_key,
        "runtime": runtime,
        "key": new_key(),
        "target": target,
        "record": record,
    });
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_mounts_and_waits",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, conf.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut helper = Helper {
        child,
        record,
        mounter: &w.mounter,
    };
    let start = Instant::now();
    let daemon = loop {
        if let Some(d) = helper.daemon() {
            break d;
        }
        if let Some(status) = helper.child.try_wait().unwrap() {
            let mut err = String::new();
            helper
                .child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("helper exited ({status}) without a record:\n{err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no record from the helper"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    // The daemon is in its own session, not the helper's.
    let sid = nix::unistd::getsid(Some(Pid::from_raw(daemon.pid as i32))).unwrap();
    assert_eq!(sid.as_raw(), daemon.pid as i32);
    assert_ne!(
        nix::unistd::getsid(Some(Pid::from_raw(helper.child.id() as i32))).unwrap(),
        sid
    );

    kill(Pid::from_raw(helper.child.id() as i32), Signal::SIGKILL).unwrap();
    helper.child.wait().unwrap();

    // Another mounter (a restarted plugin) adopts the daemon.
    let adopter = Mounter::new(&runtime);
    assert!(
        !gone(daemon.pid),
        "daemon died with the process that started it"
    );
    assert!(adopter.is_daemon(&daemon));
    assert_eq!(adopter.adopt(&daemon), Health::Healthy);
    std::fs::write(target.join("after.txt"), b"written after the helper died").unwrap();
    assert_eq!(
        std::fs::read(target.join("after.txt")).unwrap(),
        b"written after the helper died"
    );
    assert_eq!(adopter.credentials(&daemon).unwrap(), w.credentials());

    // A record whose start time is off is not this daemon.
    let mut stale = daemon.clone();
    stale.start_time += 1;
    assert!(!adopter.is_daemon(&stale));
    assert_eq!(adopter.adopt(&stale), Health::Dead(DeadReason::DaemonGone));
    assert!(adopter.credentials(&stale).is_err());

    adopter.unmount(&daemon.target, &daemon).unwrap();
    assert!(!s3fs_mounted(&target));
    assert!(gone(daemon.pid));
    assert!(s3fs_serving(&target).is_empty());
}

/// Secrets are never on the daemon's command line (nor in `ps`) nor in any
/// file of the runtime dir; they are only in its root-only environment.
#[test]
fn no_secret_in_cmdline_ps_or_runtime_files() {
    let w = World::new("mnt-secret");
    let c = w.credentials();
    let m = w.mount(&w.spec(), &w.dir("a"));
    std::fs::write(m.path("x"), b"x").unwrap();

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", m.daemon.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("s3fs"), "{cmdline}");
    assert!(!cmdline.contains(&c.secret_access_key), "{cmdline}");
    assert!(!cmdline.contains(&c.access_key_id), "{cmdline}");

    let ps = Command::new("ps")
        .args(["-eww", "-o", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.contains(&m.daemon.target.display().to_string()), "{ps}");
    assert!(!ps.contains(&c.secret_access_key));

    let mut files = 0;
    let mut stack = vec![w.scratch.root.join("run")];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "{} is open to others",
            dir.display()
        );
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                files += 1;
                let text = std::fs::read(&p).unwrap();
                let text = String::from_utf8_lossy(&text);
                assert!(!text.contains(&c.secret_access_key), "{}", p.display());
            }
        }
    }
    assert!(files >= 1, "the daemon log should be there");

    let environ = format!("/proc/{}/environ", m.daemon.pid);
    assert_eq!(
        std::fs::metadata(&environ).unwrap().mode() & 0o777,
        0o400,
        "environ must be owner-only"
    );
    let env = std::fs::read(&environ).unwrap();
    assert!(
        !String::from_utf8_lossy(&env).contains("AWS_CA_BUNDLE"),
        "the daemon's environment was not cleared"
    );
    assert_eq!(w.mounter.credentials(&m.daemon).unwrap(), c);
}

/// A refused mount leaves no daemon and no mount, and its error shows the
/// daemon's log without the secret.
#[test]
fn bad_credentials_fail_cleanly_without_leaking_the_secret() {
    let w = World::new("mnt-badkey");
    let target = w.dir("a");
    let wrong = Credentials {
        access_key_id: w.garage.key.access_key_id.clone(),
        secret_access_key: "0".repeat(64),
    };
    let err = w
        .mounter
        .mount(&new_key(), &w.spec(), &wrong, &target)
        .unwrap_err();
    let text = err.to_string();
    eprintln!("wrong secret: {text}");
    assert!(matches!(err, MounterError::MountFailed { .. }), "{text}");
    assert!(text.contains("invalid credentials"), "{text}");
    assert!(!text.contains(&wrong.secret_access_key), "{text}");
    assert!(!text.contains(&wrong.access_key_id), "{text}");
    assert!(!s3fs_mounted(&target));
    assert!(s3fs_serving(&target).is_empty());

    // A bucket that does not exist fails the same way.
    let mut spec = w.spec();
    spec.bucket = "no-such-bucket".into();
    let err = w
        .mounter
        .mount(&new_key(), &spec, &w.credentials(), &target)
        .unwrap_err();
    eprintln!("missing bucket: {err}");
    assert!(matches!(err, MounterError::MountFailed { .. }), "{err}");
    // The reason reaches the caller through the log tail.
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");
    assert!(!s3fs_mounted(&target));
    assert!(s3fs_serving(&target).is_empty());
}

#[test]
fn s3fs_is_installed() {
    let version = Mounter::new("/nonexistent").check_installed().unwrap();
    assert!(version.starts_with("1."), "{version}");
}
