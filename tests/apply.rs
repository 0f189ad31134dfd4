//! `stowage apply` (the headless reconciler) run as a separate process
//! against a real `stowage serve`: convergence from empty, from partial
//! state and after kill -9 at random points, expansion, snapshot schedules,
//! --prune, --dry-run, --check, and --watch with /healthz. Every mount,
//! loop device and process is cleaned up by the Env and guards on drop.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;
use stowage::csi;

/// A volumes file and a state file beside the Env's scratch directory.
struct Applier {
    file: PathBuf,
    state: PathBuf,
}

impl Applier {
    fn new(env: &Env) -> Applier {
        Applier {
            file: env.scratch.root.join("host-volumes.yaml"),
            state: env.scratch.root.join("apply/state.json"),
        }
    }

    fn write(&self, yaml: &str) {
        std::fs::write(&self.file, yaml).unwrap();
    }

    fn command(&self, env: &Env, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stowage"));
        c.arg("--endpoint")
            .arg(format!("unix://{}", env.layout.socket.display()))
            .arg("apply")
            .arg("-f")
            .arg(&self.file)
            .arg("--state-file")
            .arg(&self.state)
            .arg("--staging-root")
            .arg(&env.layout.staging)
            .args(extra)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, env: &Env, extra: &[&str]) -> Output {
        self.command(env, extra)
            .output()
            .expect("run stowage apply")
    }

    /// Runs with `-o json`, expecting exit `code`, and parses the document.
    #[track_caller]
    fn json(&self, env: &Env, extra: &[&str], code: i32) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(extra);
        let out = self.run(env, &all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "stowage apply {extra:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.state).unwrap()).unwrap()
    }

    fn volume_id(&self, name: &str) -> String {
        self.state()["volumes"][name]["volume_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} in {}", self.state()))
            .to_owned()
    }
}

/// `volume:action:outcome` for each event of a report.
fn actions(report: &Value) -> Vec<String> {
    report["events"]
        .as_array()
        .unwrap_or_else(|| panic!("events in {report}"))
        .iter()
        .map(|e| {
            format!(
                "{}:{}:{}",
                e["volume"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

/// A mounted xfs volume (xfs grows online without CAP_SYS_RESOURCE,
/// which ext4 needs and this machine may lack) and a raw block volume (with a snapshot schedule
/// that will not come due again during a test).
fn two_volumes(env: &Env, fs_size: &str) -> String {
    format!(
        "\
volumes:
  - name: data
    size: {fs_size}
    fs: xfs
    parameters:
      backend: block
    target: {}
    snapshots:
      every: 1d
      keep: 3
  - name: raw
    size: 32Mi
    mode: block
    parameters: {{backend: block}}
    target: {}
",
        env.target_path("data").display(),
        env.target_path("raw").display()
    )
}

async fn volume_ids(env: &mut Env) -> Vec<String> {
    env.c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.volume.map(|v| v.volume_id))
        .collect()
}

async fn capacity(env: &mut Env, id: &str) -> i64 {
    env.c
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .capacity_bytes
}

async fn snapshot_ids(env: &mut Env, volume: &str) -> Vec<String> {
    let mut ids: Vec<String> = env
        .c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot.map(|s| s.snapshot_id))
        .collect();
    ids.sort();
    ids
}

fn mounts_at(path: &Path) -> usize {
    stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .iter()
        .filter(|e| e.mount_point == path)
        .count()
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

fn fs_size(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// The state's recorded scheduled snapshot ids of `name`, sorted.
fn recorded_snapshots(a: &Applier, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = a.state()["volumes"][name]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Checks the converged world: one volume per name, each target published
/// once (a mount for `data`, a block device for `raw`), nothing pending.
async fn assert_converged(env: &mut Env, a: &Applier) {
    let ids = volume_ids(env).await;
    assert_eq!(ids.len(), 2, "one volume per declared name: {ids:?}");
    for name in ["data", "raw"] {
        assert!(ids.contains(&a.volume_id(name)), "{name} in {ids:?}");
        assert!(
            a.state()["volumes"][name]["intent"].is_null(),
            "{}",
            a.state()
        );
        assert_eq!(
            mounts_at(&env.target_path(name)),
            1,
            "{name} published once"
        );
    }
    assert!(is_block_device(&env.target_path("raw")));
    let data = a.volume_id("data");
    assert_eq!(
        snapshot_ids(env, &data).await,
        recorded_snapshots(a, "data"),
        "every snapshot of data is a recorded scheduled one"
    );
    assert_eq!(recorded_snapshots(a, "data").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn converges_from_empty_and_a_rerun_changes_nothing() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    a.write(&two_volumes(&env, "320Mi"));

    // A dry run plans everything and changes nothing.
    let plan = a.json(&env, &["--dry-run"], 0);
    assert_eq!(
        actions(&plan),
        [
            "data:create:planned",
            "data:publish:planned",
            "data:snapshot:planned",
            "raw:create:planned",
            "raw:publish:planned"
        ]
    );
    assert!(volume_ids(&mut env).await.is_empty());
    assert!(!a.state.exists(), "a dry run writes no state");

    let out = a.run(&env, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("created volume data ("), "{text}");
    assert!(
        text.contains(&format!(
            "published data at {}",
            env.target_path("data").display()
        )),
        "{text}"
    );
    assert_converged(&mut env, &a).await;
    // The filesystem is writable at its target.
    std::fs::write(env.target_path("data").join("hello"), b"hello").unwrap();
    let ids = (a.volume_id("data"), a.volume_id("raw"));

    let plan = a.json(&env, &["--dry-run"], 0);
    assert_eq!(actions(&plan), Vec::<String>::new(), "{plan}");
    let again = a.json(&env, &[], 0);
    assert_eq!(actions(&again), Vec::<String>::new(), "{again}");
    assert_eq!(again["converged"], Value::Bool(true));
    assert_eq!(ids, (a.volume_id("data"), a.volume_id("raw")));
    assert_converged(&mut env, &a).await;
    assert_eq!(
        std::fs::read(env.target_path("data").join("hello")).unwrap(),
        b"hello"
    );
}

/// The state file lost after a run, and a volume made beforehand under a
/// declared name: CreateVolume's idempotency by name (CSI spec,
/// CreateVolume) finds the same volumes again.
#[tokio::test(flavor = "multi_thread")]
async fn converges_from_partial_state() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    let raw = env.create("raw", "raw", 32 * MIB).await.volume_id;
    a.write(&two_volumes(&env, "320Mi"));
    a.json(&env, &[], 0);
    assert_eq!(a.volume_id("raw"), raw, "the existing volume was adopted");
    let data = a.volume_id("data");

    std::fs::remove_file(&a.state).unwrap();
    let report = a.json(&env, &[], 0);
    assert!(
        actions(&report).contains(&"data:create:done".to_owned()),
        "{report}"
    );
    assert_eq!(a.volume_id("data"), data);
    assert_eq!(a.volume_id("raw"), raw);
    assert_eq!(volume_ids(&mut env).await.len(), 2);
    for name in ["data", "raw"] {
        assert_eq!(mounts_at(&env.target_path(name)), 1, "{name}");
    }
}

/// kill -9 at random instants of an apply, several rounds, each with work
/// left to cut (the file alternates between growing both volumes and
/// pruning the raw one); then a plain rerun converges to exactly the
/// declared world.
#[tokio::test(flavor = "multi_thread")]
async fn converges_after_kill_9_mid_apply() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let mut delays = Vec::new();
    for round in 0..8 {
        let full = two_volumes(&env, &format!("{}Mi", 320 + 32 * round));
        let prune = round % 2 == 1;
        if prune {
            a.write(&full[..full.find("  - name: raw").unwrap()]);
        } else {
            a.write(&full);
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // A whole apply here takes tens of milliseconds.
        let delay = Duration::from_micros(seed % 80_000);
        delays.push(delay);
        let mut child = a
            .command(&env, if prune { &["--prune"] } else { &[] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let guard = ChildGuard(Some(child.id()));
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        drop(guard);
    }
    a.write(&two_volumes(&env, "576Mi"));
    let out = a.run(&env, &[]);
    assert!(
        out.status.success(),
        "rerun after kills at {delays:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_converged(&mut env, &a).await;
    let data = a.volume_id("data");
    assert!(capacity(&mut env, &data).await >= 576 * MIB);
    let again = a.json(&env, &["--dry-run"], 0);
    assert_eq!(actions(&again), Vec::<String>::new(), "{again}");
}

/// Kills a child process (by pid) if a test fails before reaping it.
struct ChildGuard(Option<u32>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_larger_size_expands_the_volume_and_its_filesystem() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    a.write(&two_volumes(&env, "320Mi"));
    a.json(&env, &[], 0);
    let id = a.volume_id("data");
    let (cap_before, fs_before) = (
        capacity(&mut env, &id).await,
        fs_size(&env.target_path("data")),
    );

    a.write(&two_volumes(&env, "512Mi"));
    let report = a.json(&env, &[], 0);
    assert_eq!(actions(&report), ["data:expand:done"], "{report}");
    let cap_after = capacity(&mut env, &id).await;
    let fs_after = fs_size(&env.target_path("data"));
    assert!(
        cap_after >= 512 * MIB && cap_after > cap_before,
        "{cap_before} → {cap_after}"
    );
    assert!(
        fs_after > fs_before + (128 << 20),
        "filesystem grew: {fs_before} → {fs_after}"
    );

    // Shrinking is refused and reported, not applied.
    a.write(&two_volumes(&env, "320Mi"));
    let report = a.json(&env, &[], 1);
    assert_eq!(actions(&report), ["data:refuse:refused"], "{report}");
    assert_eq!(capacity(&mut env, &id).await, cap_after);
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_snapshots_are_taken_per_slot_and_pruned_to_keep() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    let yaml = format!(
        "volumes:\n  - name: snappy\n    size: 32Mi\n    parameters: {{backend: dir}}\n    \
         target: {}\n    snapshots: {{every: 1s, keep: 2}}\n",
        env.target_path("snappy").display()
    );
    a.write(&yaml);
    let mut taken = 0;
    for _ in 0..4 {
        // Each run in a new one-second slot (waiting for the clock, not
        // asserting on time).
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        while SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            == start
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let report = a.json(&env, &[], 0);
        taken += actions(&report)
            .iter()
            .filter(|s| *s == "snappy:snapshot:done")
            .count();
        // A snapshot is recorded as taken only once it is ready to use
        // (a dir volume's copy runs in the background).
        let id = a.volume_id("snappy");
        for snap in recorded_snapshots(&a, "snappy") {
            let ready = env
                .c
                .controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    source_volume_id: id.clone(),
                    snapshot_id: snap.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries
                .iter()
                .all(|e| e.snapshot.as_ref().is_some_and(|s| s.ready_to_use));
            assert!(ready, "recorded snapshot {snap} is ready_to_use");
        }
    }
    assert!(taken >= 4, "a snapshot per slot: {taken}");
    let id = a.volume_id("snappy");
    let left = snapshot_ids(&mut env, &id).await;
    assert_eq!(left.len(), 2, "pruned to keep: {left:?}");
    assert_eq!(left, recorded_snapshots(&a, "snappy"));
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_volumes_are_left_alone_unless_pruned() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    a.write(&two_volumes(&env, "320Mi"));
    a.json(&env, &[], 0);
    let raw = a.volume_id("raw");
    let loops_before = loops_under(&env.layout.pool).len();

    let only_data = two_volumes(&env, "320Mi");
    let only_data = &only_data[..only_data.find("  - name: raw").unwrap()];
    a.write(only_data);
    let out = a.run(&env, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "left alone: raw ({raw}) (not in the file; --prune removes it)"
        )),
        "{text}"
    );
    assert!(volume_ids(&mut env).await.contains(&raw));
    assert!(is_block_device(&env.target_path("raw")));

    let plan = a.json(&env, &["--prune", "--dry-run"], 0);
    assert_eq!(actions(&plan), ["raw:delete:planned"]);
    assert!(volume_ids(&mut env).await.contains(&raw));

    let out = a.run(&env, &["--prune"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("unpublished/deleted raw ({raw})")),
        "{text}"
    );
    assert!(!volume_ids(&mut env).await.contains(&raw));
    assert_eq!(mounts_at(&env.target_path("raw")), 0);
    assert_eq!(loops_under(&env.layout.pool).len(), loops_before - 1);
    assert!(a.state()["volumes"]["raw"].is_null());
    assert_eq!(mounts_at(&env.target_path("data")), 1, "data untouched");
}

#[test]
fn check_accepts_a_good_file_and_rejects_a_bad_one_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.yaml");
    let check = |yaml: &str| {
        std::fs::write(&file, yaml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args([
                "--endpoint",
                "unix:///nonexistent/csi.sock",
                "apply",
                "--check",
                "-f",
            ])
            .arg(&file)
            .output()
            .unwrap()
    };
    let ok = check("volumes:\n  - name: a\n    size: 1Gi\n    target: /srv/a\n");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid (1 volume)"));

    let bad =
        check("volumes:\n  - name: a\n    size: 1Gi\n    target: /srv/a\n    readonly: true\n");
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("line 5") && err.contains("volume a") && err.contains("readonly"),
        "{err}"
    );
}

/// GETs `path` from `addr`; returns the status code and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

/// Polls `cond` until it holds, failing after `limit`.
#[track_caller]
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_applies_file_changes_and_serves_healthz() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    let vol = |name: &str| {
        format!(
            "  - name: {name}\n    size: 32Mi\n    parameters: {{backend: dir}}\n    target: {}\n",
            env.target_path(name).display()
        )
    };
    a.write(&format!("volumes:\n{}", vol("first")));
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let log = env.scratch.root.join("watch.log");
    let mut child = a
        .command(
            &env,
            &["--watch", "--interval", "1h", "--health-addr", &addr],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(Some(child.id()));
    let limit = Duration::from_secs(60);
    let first = env.target_path("first");
    wait_for("first published", limit, || mounts_at(&first) == 1);
    wait_for("/healthz", limit, || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&addr, "/other").0, 404);

    // A file that stops parsing is kept at its last good version.
    a.write("volumes: [ nonsense\n");
    wait_for("the parse error logged", limit, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("no longer parses")
    });
    assert_eq!(mounts_at(&first), 1);

    a.write(&format!("volumes:\n{}{}", vol("first"), vol("second")));
    let second = env.target_path("second");
    wait_for("second published", limit, || mounts_at(&second) == 1);
    assert_eq!(volume_ids(&mut env).await.len(), 2);

    env.server.terminate();
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("Probe"), "{body}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    guard.0 = None;
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `mutableParameters` in the file: given to CreateVolume, and a change is
/// applied once with ControllerModifyVolume.
#[tokio::test(flavor = "multi_thread")]
async fn mutable_parameters_are_created_with_and_modified() {
    let mut env = Env::new("xfs").await;
    let a = Applier::new(&env);
    let target = env.target_path("m");
    let file = |p: &str| {
        format!(
            "volumes:\n  - name: m\n    size: 32Mi\n    mode: block\n    target: {}\n    mutableParameters: {{provisioning: {p}}}\n",
            target.display()
        )
    };
    let provisioning = |env: &mut Env, id: String| {
        let mut c = env.c.controller.clone();
        async move {
            c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_context["stowage.csi.dev/provisioning"]
                .clone()
        }
    };
    a.write(&file("thick"));
    a.json(&env, &[], 0);
    let id = a.volume_id("m");
    assert_eq!(provisioning(&mut env, id.clone()).await, "thick");

    a.write(&file("thin"));
    let plan = a.json(&env, &["--dry-run"], 0);
    assert_eq!(actions(&plan), ["m:modify:planned"], "{plan}");
    assert_eq!(provisioning(&mut env, id.clone()).await, "thick");
    let report = a.json(&env, &[], 0);
    assert_eq!(actions(&report), ["m:modify:done"], "{report}");
    assert_eq!(provisioning(&mut env, id.clone()).await, "thin");
    let report = a.json(&env, &[], 0);
    assert_eq!(actions(&report), Vec::<String>::new(), "{report}");
}

/// The capability that ext4's online resize needs, from <linux/capability.h>.
const CAP_SYS_RESOURCE: libc::c_ulong = 24;

/// A node that cannot grow the filesystem (an ext4 volume on a server
/// without CAP_SYS_RESOURCE, dropped from this thread's bounding set so
/// the server started from it lacks it on any machine): the report says
/// what is true (the volume grew, its filesystem did not, and why), a dry
/// run says what is left, and no line reads "from 128Mi to 128Mi".
#[tokio::test(flavor = "current_thread")]
async fn an_expansion_the_node_cannot_finish_is_reported_as_it_stands() {
    // SAFETY: PR_CAPBSET_DROP takes an integer and touches no memory; it
    // changes only this thread's bounding set (the server is spawned from
    // this thread: a current-thread runtime runs the test here).
    let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "drop CAP_SYS_RESOURCE: {}",
        std::io::Error::last_os_error()
    );
    let env = Env::new("xfs").await;
    let a = Applier::new(&env);
    let file = |size: &str| {
        format!(
            "volumes:\n  - name: pgdata\n    size: {size}\n    fs: ext4\n    target: {}\n",
            env.target_path("pgdata").display()
        )
    };
    a.write(&file("64Mi"));
    a.json(&env, &[], 0);

    a.write(&file("128Mi"));
    let out = a.run(&env, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("FAILED to expand pgdata from 64Mi to 128Mi: the volume has 128Mi but its filesystem was not grown: ")
            && text.contains("CAP_SYS_RESOURCE"),
        "{text}"
    );

    let out = a.run(&env, &["--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(
            "would grow the filesystem of pgdata to 128Mi (the volume already has 128Mi)"
        ),
        "{text}"
    );
    let out = a.run(&env, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("FAILED to grow the filesystem of pgdata to 128Mi")
            && !text.contains("to 128Mi to"),
        "{text}"
    );
    assert!(!text.contains("from 128Mi to 128Mi"), "{text}");
}

/// A call that could not be made never reads as done: with no server,
/// "FAILED to create volume ok1 …: no server is running …".
#[test]
fn a_failed_create_does_not_read_as_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.yaml");
    std::fs::write(
        &file,
        "volumes:\n  - name: ok1\n    size: 1Mi\n    target: /srv/ok1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("--endpoint")
        .arg(dir.path().join("none.sock"))
        .args(["apply", "-f"])
        .arg(&file)
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .arg("--staging-root")
        .arg(dir.path().join("staging"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("FAILED to create volume ok1 of 1Mi: no server is running on"),
        "{text}"
    );
    assert!(!text.contains("created volume"), "{text}");
}
