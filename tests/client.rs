//! The client commands (`stowage plugin|volume|snapshot …`) run as a
//! separate process against a real `stowage serve`: JSON output parsed and
//! checked, tables printed, and exit codes (1 for gRPC errors, 2 for usage).

#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `stowage --endpoint unix://<socket>`, to add arguments to and run.
fn at(env: &Env) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stowage"));
    c.arg("--endpoint")
        .arg(format!("unix://{}", env.layout.socket.display()));
    c
}

/// Runs `stowage --endpoint unix://<socket> ARGS…`.
fn stowage(env: &Env, args: &[&str]) -> Output {
    at(env).args(args).output().expect("run stowage")
}

/// Runs a command that must succeed with `-o json` and parses its stdout.
#[track_caller]
fn json(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = stowage(env, &all);
    assert!(
        out.status.success(),
        "stowage {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stowage {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_info_capabilities_and_probe_as_json() {
    let env = Env::new("xfs").await;

    let info = json(&env, &["plugin", "info"]);
    assert_eq!(str_of(&info, "name"), "stowage.csi.dev");
    assert_eq!(str_of(&info, "vendor_version"), stowage::VENDOR_VERSION);
    assert!(info["manifest"].is_object());

    let caps = json(&env, &["plugin", "capabilities"]);
    let names = |service: &str| -> Vec<String> {
        caps[service]
            .as_array()
            .unwrap_or_else(|| panic!("{service} in {caps}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(names("plugin").contains(&"CONTROLLER_SERVICE".to_owned()));
    for c in [
        "CREATE_DELETE_VOLUME",
        "CREATE_DELETE_SNAPSHOT",
        "LIST_VOLUMES",
    ] {
        assert!(names("controller").contains(&c.to_owned()), "{c} in {caps}");
    }
    assert!(names("node").contains(&"STAGE_UNSTAGE_VOLUME".to_owned()));

    let probe = json(&env, &["plugin", "probe"]);
    assert_eq!(probe["ready"], Value::Bool(true));

    // The same flags are accepted after the verb, and tables are the default.
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["plugin", "info", "--endpoint"])
        .arg(format!("unix://{}", env.layout.socket.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("stowage.csi.dev"), "{text}");
}

/// Create (block and dir) → list → get → expand → snapshot → list by
/// volume → restore → delete everything, all through the binary.
#[tokio::test(flavor = "multi_thread")]
async fn volume_and_snapshot_round_trip() {
    let env = Env::new("xfs").await;

    let block = json(
        &env,
        &["volume", "create", "cli-block", "--size", "64Mi", "--block"],
    );
    let block_id = str_of(&block, "volume_id").to_owned();
    assert!(block["capacity_bytes"].as_i64().unwrap() >= 64 << 20);

    let dir = json(
        &env,
        &[
            "volume",
            "create",
            "cli-dir",
            "--size",
            "32Mi",
            "--param",
            "backend=dir",
        ],
    );
    let dir_id = str_of(&dir, "volume_id").to_owned();
    assert_ne!(block_id, dir_id);

    // CreateVolume is idempotent by name.
    let again = json(
        &env,
        &["volume", "create", "cli-block", "--size", "64Mi", "--block"],
    );
    assert_eq!(str_of(&again, "volume_id"), block_id);

    let list = json(&env, &["volume", "list"]);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| str_of(v, "volume_id"))
        .collect();
    assert!(ids.contains(&block_id.as_str()), "{list}");
    assert!(ids.contains(&dir_id.as_str()), "{list}");

    let got = json(&env, &["volume", "get", &block_id]);
    assert_eq!(str_of(&got, "volume_id"), block_id);
    let before = got["capacity_bytes"].as_i64().unwrap();

    let expanded = json(&env, &["volume", "expand", &block_id, "--size", "128Mi"]);
    assert!(expanded["capacity_bytes"].as_i64().unwrap() >= 128 << 20);
    let after = json(&env, &["volume", "get", &block_id])["capacity_bytes"]
        .as_i64()
        .unwrap();
    assert!(after > before, "size grew: {before} → {after}");

    let snap = json(&env, &["snapshot", "create", &block_id, "cli-snap"]);
    let snap_id = str_of(&snap, "snapshot_id").to_owned();
    assert_eq!(str_of(&snap, "source_volume_id"), block_id);

    let snaps = json(&env, &["snapshot", "list", "--volume", &block_id]);
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(str_of(&snaps[0], "snapshot_id"), snap_id);
    assert!(
        json(&env, &["snapshot", "list", "--volume", &dir_id])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        str_of(&json(&env, &["snapshot", "get", &snap_id]), "snapshot_id"),
        snap_id
    );

    let restored = json(
        &env,
        &[
            "volume",
            "create",
            "cli-restored",
            "--size",
            "128Mi",
            "--block",
            "--from-snapshot",
            &snap_id,
        ],
    );
    let restored_id = str_of(&restored, "volume_id").to_owned();
    assert_eq!(
        str_of(&restored, "content_source"),
        format!("snapshot:{snap_id}")
    );

    // The table lists the volumes for people.
    let out = stowage(&env, &["volume", "list"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME  "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("cli-restored ") && l.contains(&restored_id)),
        "{table}"
    );

    // A group snapshot of both volumes: created, shown (JSON and table),
    // deleted with its members.
    let grp = json(
        &env,
        &[
            "snapshot",
            "group",
            "create",
            "cli-group",
            &block_id,
            &dir_id,
        ],
    );
    let grp_id = str_of(&grp, "group_snapshot_id").to_owned();
    let members = grp["snapshots"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{grp}");
    for m in members {
        assert_eq!(str_of(m, "group_snapshot_id"), grp_id);
    }
    let got = json(&env, &["snapshot", "group", "get", &grp_id]);
    assert_eq!(str_of(&got, "group_snapshot_id"), grp_id);
    assert_eq!(got["snapshots"].as_array().unwrap().len(), 2, "{got}");
    let out = stowage(&env, &["snapshot", "group", "get", &grp_id]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("GROUP  "), "{table}");
    assert_eq!(table.lines().filter(|l| l.contains(&grp_id)).count(), 2);
    let deleted = json(&env, &["snapshot", "group", "delete", &grp_id]);
    assert_eq!(str_of(&deleted, "group_snapshot_id"), grp_id);
    assert_eq!(deleted["deleted"], Value::Bool(true));
    let out = stowage(&env, &["snapshot", "group", "get", &grp_id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    let deleted = json(&env, &["snapshot", "delete", &snap_id]);
    assert_eq!(deleted["deleted"], Value::Bool(true));
    for id in [&restored_id, &block_id, &dir_id] {
        let deleted = json(&env, &["volume", "delete", id]);
        assert_eq!(str_of(&deleted, "volume_id"), id.as_str());
    }
    assert!(
        json(&env, &["volume", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        json(&env, &["snapshot", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// gRPC errors exit 1 and name the code in words on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_volume_exits_1_with_not_found() {
    let env = Env::new("xfs").await;
    let out = stowage(&env, &["volume", "get", "no-such-volume"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("NOT_FOUND"), "{err}");
    assert!(err.to_lowercase().contains("not found"), "{err}");
    assert!(out.stdout.is_empty());

    let out = stowage(&env, &["snapshot", "get", "no-such-snapshot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));
}

/// Usage errors (a bad size, a bad endpoint) exit 2 before any call.
#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2() {
    let env = Env::new("xfs").await;
    for size in ["1.5Gi", "1GB", "0", "lots"] {
        let out = stowage(&env, &["volume", "create", "bad", "--size", size]);
        assert_eq!(out.status.code(), Some(2), "--size {size}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("size"));
    }
    let out = stowage(&env, &["volume", "expand", "x", "--size", "-1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["--endpoint", "relative.sock", "plugin", "probe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Nothing was created by the refused commands.
    assert!(
        json(&env, &["volume", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// `volume publish|stats|unpublish` with the client's own staging root: a
/// block-backed ext4 volume is staged and published, written, measured,
/// published again (idempotent), unpublished (target and loop device gone),
/// and published again with its data intact.
#[tokio::test(flavor = "multi_thread")]
async fn publish_stats_unpublish_round_trip() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let target = env.target_path("cli-pub");
    let target_s = target.display().to_string();

    let vol = json(
        &env,
        &[
            "volume", "create", "cli-pub", "--size", "64Mi", "--fs", "ext4",
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();
    let publish = [
        "volume",
        "publish",
        &id,
        &target_s,
        "--fs",
        "ext4",
        "--staging-root",
        &root_s,
    ];

    let p = json(&env, &publish);
    assert_eq!(p["staged"], Value::Bool(true), "{p}");
    let staging = std::path::PathBuf::from(str_of(&p, "staging_path"));
    assert!(staging.starts_with(&root), "{p}");
    assert!(is_mounted(&target));
    let record = std::path::PathBuf::from(str_of(&p, "record"));
    assert!(record.starts_with(root.join(".publications")), "{p}");
    let rec: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["targets"].as_array().unwrap().len(), 1, "{rec}");
    assert!(!loops_under(&env.layout.pool).is_empty());

    let data = pattern(7, 1 << 20);
    std::fs::write(target.join("data.bin"), &data).unwrap();
    nix::unistd::sync();

    let stats = json(&env, &["volume", "stats", &id, &target_s]);
    let bytes = stats["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["unit"] == "bytes")
        .unwrap_or_else(|| panic!("bytes in {stats}"))
        .clone();
    assert!(bytes["total"].as_i64().unwrap() > 0, "{stats}");
    assert!(bytes["used"].as_i64().unwrap() > 0, "{stats}");
    assert_eq!(
        stats["condition"]["abnormal"],
        Value::Bool(false),
        "{stats}"
    );
    let out = stowage(&env, &["volume", "stats", &id, &target_s]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ID"));

    // Publishing again with the same arguments changes nothing.
    let again = json(&env, &publish);
    assert_eq!(again["targets"].as_array().unwrap().len(), 1, "{again}");
    assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), data);

    let u = json(
        &env,
        &[
            "volume",
            "unpublish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(u["unstaged"], Value::Bool(true), "{u}");
    assert!(!target.exists(), "target removed");
    assert!(!is_mounted(&staging));
    assert!(loops_under(&env.layout.pool).is_empty());
    assert!(!record.exists(), "record removed");

    json(&env, &publish);
    assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), data);
    json(
        &env,
        &[
            "volume",
            "unpublish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    assert!(!target.exists());
    assert!(loops_under(&env.layout.pool).is_empty());
    json(&env, &["volume", "delete", &id]);
}

/// The whole headless round trip through the binary, for a block (ext4)
/// and a dir volume: create → publish → write → snapshot → restore →
/// publish the restore → content matches → unpublish → delete.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_restore_and_publish_round_trip() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    for (kind, create_args, fs_args) in [
        ("block", vec!["--fs", "ext4"], vec!["--fs", "ext4"]),
        ("dir", vec!["--param", "backend=dir"], vec![]),
    ] {
        let publish = |id: &str, target: &str| {
            let mut args = vec!["volume", "publish", id, target, "--staging-root", &root_s];
            args.extend_from_slice(&fs_args);
            let p = json(&env, &args);
            assert_eq!(str_of(&p, "volume_id"), id, "{p}");
        };
        let unpublish = |id: &str, target: &str| {
            let u = json(
                &env,
                &["volume", "unpublish", id, target, "--staging-root", &root_s],
            );
            assert!(u["remaining_targets"].as_array().unwrap().is_empty(), "{u}");
        };

        let name = format!("rt-{kind}");
        let mut args = vec!["volume", "create", name.as_str(), "--size", "64Mi"];
        args.extend_from_slice(&create_args);
        let id = str_of(&json(&env, &args), "volume_id").to_owned();
        let target = env.target_path(&format!("rt-{kind}-src"));
        let target_s = target.display().to_string();
        publish(&id, &target_s);
        let data = pattern(11, 3 << 20);
        std::fs::write(target.join("data.bin"), &data).unwrap();
        std::fs::create_dir(target.join("sub")).unwrap();
        std::fs::write(target.join("sub/small"), b"small file").unwrap();
        nix::unistd::sync();

        let snap = json(
            &env,
            &["snapshot", "create", &id, &format!("rt-{kind}-snap")],
        );
        assert_eq!(snap["ready_to_use"], Value::Bool(true), "{snap}");
        let snap_id = str_of(&snap, "snapshot_id").to_owned();
        // Written after the snapshot: must not appear in the restore.
        std::fs::write(target.join("later"), b"after the snapshot").unwrap();

        let restore_name = format!("rt-{kind}-restored");
        let mut args = vec![
            "volume",
            "create",
            restore_name.as_str(),
            "--size",
            "64Mi",
            "--from-snapshot",
            &snap_id,
        ];
        args.extend_from_slice(&create_args);
        let restored = json(&env, &args);
        let restored_id = str_of(&restored, "volume_id").to_owned();
        assert_ne!(restored_id, id);
        let target2 = env.target_path(&format!("rt-{kind}-restored"));
        let target2_s = target2.display().to_string();
        publish(&restored_id, &target2_s);
        assert_eq!(
            std::fs::read(target2.join("data.bin")).unwrap(),
            data,
            "{kind}"
        );
        assert_eq!(
            std::fs::read(target2.join("sub/small")).unwrap(),
            b"small file"
        );
        assert!(
            !target2.join("later").exists(),
            "{kind}: restore is the snapshot"
        );
        // The two are independent.
        std::fs::write(target2.join("data.bin"), b"changed").unwrap();
        assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), data);

        unpublish(&restored_id, &target2_s);
        unpublish(&id, &target_s);
        assert!(!target.exists() && !target2.exists());
        assert_eq!(
            json(&env, &["snapshot", "delete", &snap_id])["deleted"],
            Value::Bool(true)
        );
        for v in [&restored_id, &id] {
            json(&env, &["volume", "delete", v]);
        }
    }
    assert!(loops_under(&env.layout.pool).is_empty());
    assert!(
        json(&env, &["volume", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A read-only publication refuses writes; unpublishing what was never
/// published succeeds and does nothing.
#[tokio::test(flavor = "multi_thread")]
async fn readonly_publish_and_unpublish_of_nothing() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let target = env.target_path("cli-ro");
    let target_s = target.display().to_string();

    let vol = json(
        &env,
        &[
            "volume",
            "create",
            "cli-ro",
            "--size",
            "32Mi",
            "--param",
            "backend=dir",
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();

    // Never published: exits 0, nothing recorded.
    for vid in [id.as_str(), "no-such-volume"] {
        let u = json(
            &env,
            &[
                "volume",
                "unpublish",
                vid,
                &target_s,
                "--staging-root",
                &root_s,
            ],
        );
        assert_eq!(u["recorded"], Value::Bool(false), "{u}");
    }

    json(
        &env,
        &[
            "volume",
            "publish",
            &id,
            &target_s,
            "--readonly",
            "--staging-root",
            &root_s,
        ],
    );
    let err = std::fs::write(target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Manual unstage is refused while a publication remains.
    let out = stowage(&env, &["volume", "unstage", &id, "--staging-root", &root_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("still published"));

    json(
        &env,
        &[
            "volume",
            "unpublish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    assert!(!target.exists());
    json(&env, &["volume", "delete", &id]);
}

/// `volume stage` / `volume unstage` by hand; a publication in between does
/// not unstage what was staged by hand.
#[tokio::test(flavor = "multi_thread")]
async fn manual_stage_survives_unpublish_until_unstage() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let target = env.target_path("cli-manual");
    let target_s = target.display().to_string();
    let vol = json(
        &env,
        &[
            "volume",
            "create",
            "cli-manual",
            "--size",
            "64Mi",
            "--fs",
            "ext4",
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();

    let st = json(
        &env,
        &[
            "volume",
            "stage",
            &id,
            "--fs",
            "ext4",
            "--staging-root",
            &root_s,
        ],
    );
    let staging = std::path::PathBuf::from(str_of(&st, "staging_path"));
    assert!(is_mounted(&staging));
    json(
        &env,
        &[
            "volume",
            "publish",
            &id,
            &target_s,
            "--fs",
            "ext4",
            "--staging-root",
            &root_s,
        ],
    );
    let u = json(
        &env,
        &[
            "volume",
            "unpublish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(u["unstaged"], Value::Bool(false), "{u}");
    assert!(is_mounted(&staging));
    let u = json(&env, &["volume", "unstage", &id, "--staging-root", &root_s]);
    assert_eq!(u["unstaged"], Value::Bool(true), "{u}");
    assert!(!is_mounted(&staging));
    assert!(loops_under(&env.layout.pool).is_empty());
    json(&env, &["volume", "delete", &id]);
}

/// Child processes killed and reaped on drop, so a failing test leaves no
/// client running.
struct Children(Vec<std::process::Child>);

impl Children {
    /// Waits for each child in turn and returns their outputs.
    fn wait(mut self) -> Vec<Output> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait for stowage"))
            .collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `stowage --endpoint … -o json ARGS…` with piped output.
fn spawn_json(env: &Env, args: &[&str]) -> std::process::Child {
    at(env)
        .args(["-o", "json"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn stowage")
}

/// The publication record of `id` under `root`, if any.
fn record_of(root: &std::path::Path, id: &str) -> Option<Value> {
    let rec = stowage::client::publish::load_record(root, id).unwrap()?;
    Some(serde_json::to_value(rec).unwrap())
}

/// Two clients publishing one volume at the same moment, to two targets,
/// take turns on the volume's lock: both succeed (the second finds it
/// staged, as NodeStageVolume's idempotency allows) and the record lists
/// both targets. Unpublishing both unstages and detaches the loop device.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishes_of_one_volume_both_land_in_the_record() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let vol = json(
        &env,
        &[
            "volume", "create", "cli-two", "--size", "64Mi", "--fs", "ext4",
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();
    let targets = [env.target_path("two-a"), env.target_path("two-b")];
    let target_s: Vec<String> = targets.iter().map(|t| t.display().to_string()).collect();

    let children = Children(
        target_s
            .iter()
            .map(|t| {
                spawn_json(
                    &env,
                    &[
                        "volume",
                        "publish",
                        &id,
                        t,
                        "--fs",
                        "ext4",
                        "--staging-root",
                        &root_s,
                    ],
                )
            })
            .collect(),
    );
    for out in children.wait() {
        assert!(
            out.status.success(),
            "concurrent publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for t in &targets {
        assert!(is_mounted(t), "{} mounted", t.display());
    }
    let rec = record_of(&root, &id).expect("a record");
    let mut listed: Vec<&str> = rec["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| str_of(t, "path"))
        .collect();
    listed.sort();
    assert_eq!(listed, target_s, "{rec}");

    let unpublish = |t: &str| {
        json(
            &env,
            &["volume", "unpublish", &id, t, "--staging-root", &root_s],
        )
    };
    let u = unpublish(&target_s[0]);
    assert_eq!(u["unstaged"], Value::Bool(false), "{u}");
    assert!(!loops_under(&env.layout.pool).is_empty());
    let u = unpublish(&target_s[1]);
    assert_eq!(u["unstaged"], Value::Bool(true), "{u}");
    assert!(loops_under(&env.layout.pool).is_empty());
    assert_eq!(record_of(&root, &id), None);
    json(&env, &["volume", "delete", &id]);
}

/// On an ext4 pool snapshots are copied in the background, and the first
/// CreateSnapshot answers ready_to_use=false. `snapshot create` repeats the
/// call ("the CO MAY call CreateSnapshot again to check readiness") until
/// it is ready and prints that; `--no-wait` prints the first answer. With
/// stderr a pipe, no progress line is written.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_create_waits_for_ready_to_use_unless_told_not_to() {
    let env = Env::with_args("ext4", &["--pool-image", "never"]).await;
    let vol = json(
        &env,
        &["volume", "create", "cli-src", "--size", "64Mi", "--block"],
    );
    let id = str_of(&vol, "volume_id").to_owned();

    let run = |args: &[&str]| {
        let out = stowage(&env, args);
        assert!(
            out.status.success(),
            "stowage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "stderr is a pipe, yet: {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };

    let waited: Value =
        serde_json::from_slice(&run(&["-o", "json", "snapshot", "create", &id, "s-wait"])).unwrap();
    assert_eq!(waited["ready_to_use"], Value::Bool(true), "{waited}");
    let waited_id = str_of(&waited, "snapshot_id").to_owned();

    let quick: Value = serde_json::from_slice(&run(&[
        "-o",
        "json",
        "snapshot",
        "create",
        &id,
        "s-quick",
        "--no-wait",
    ]))
    .unwrap();
    assert_eq!(quick["ready_to_use"], Value::Bool(false), "{quick}");
    let quick_id = str_of(&quick, "snapshot_id").to_owned();

    // Waiting on the same name finds the same snapshot, ready, as a table.
    let table = String::from_utf8(run(&["snapshot", "create", &id, "s-quick"])).unwrap();
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.contains(&quick_id), "{table}");
    assert!(row.contains("true"), "{table}");

    for s in [&waited_id, &quick_id] {
        json(&env, &["snapshot", "delete", s]);
    }
    json(&env, &["volume", "delete", &id]);
}

/// A publish that fails — at the target (its parent is a regular file), at
/// the plugin (an unknown filesystem type), or for a volume that does not
/// exist — leaves no record, no staging mount and no loop device, and the
/// volume is not left published to the node. A failed re-publish of a
/// published target (read-only now: ALREADY_EXISTS) leaves it published.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_publish_leaves_nothing_behind() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let vol = json(
        &env,
        &[
            "volume", "create", "cli-fail", "--size", "64Mi", "--fs", "ext4",
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();
    let file = env.target_path("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let under_file = file.join("target").display().to_string();
    let good = env.target_path("good").display().to_string();

    let assert_nothing_left = |what: &str| {
        assert_eq!(record_of(&root, &id), None, "{what}: record");
        let staged: Vec<_> = stowage::os::mountinfo::MountTable::read()
            .unwrap()
            .entries
            .into_iter()
            .filter(|e| e.mount_point.starts_with(&root) || e.mount_point.starts_with(&file))
            .collect();
        assert!(staged.is_empty(), "{what}: mounts left {staged:?}");
        assert!(
            loops_under(&env.layout.pool).is_empty(),
            "{what}: loop device left"
        );
        let v = json(&env, &["volume", "get", &id]);
        assert_eq!(
            v["published_node_ids"],
            serde_json::json!([]),
            "{what}: {v}"
        );
    };

    let failed = |args: &[&str], want: &str| {
        let mut all = vec!["volume", "publish"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--staging-root", &root_s]);
        let out = stowage(&env, &all);
        assert_eq!(out.status.code(), Some(1), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("undoing"), "the roll-back failed: {err}");
    };

    failed(&[&id, &under_file, "--fs", "ext4"], "cannot create");
    assert_nothing_left("parent is a file");
    failed(&[&id, &good, "--fs", "nosuchfs"], "INVALID_ARGUMENT");
    assert_nothing_left("unknown filesystem");
    assert!(!std::path::Path::new(&good).exists());
    failed(&["no-such-volume", &good, "--fs", "ext4"], "NOT_FOUND");
    assert_eq!(record_of(&root, "no-such-volume"), None);

    // A target already published stays published when a re-publish fails.
    let publish = [
        "volume",
        "publish",
        &id,
        &good,
        "--fs",
        "ext4",
        "--staging-root",
        &root_s,
    ];
    json(&env, &publish);
    failed(
        &[&id, &good, "--fs", "ext4", "--readonly"],
        "ALREADY_EXISTS",
    );
    assert!(is_mounted(std::path::Path::new(&good)));
    let rec = record_of(&root, &id).expect("the record stays");
    assert_eq!(rec["targets"].as_array().unwrap().len(), 1, "{rec}");
    assert_eq!(rec["targets"][0]["readonly"], Value::Bool(false), "{rec}");

    json(
        &env,
        &["volume", "unpublish", &id, &good, "--staging-root", &root_s],
    );
    assert_nothing_left("after unpublish");
    json(&env, &["volume", "delete", &id]);
}

/// Ctrl-C while the progress line is drawn on a terminal — here a publish
/// waiting for the volume's lock, which the test holds — clears the line
/// before the client dies of SIGINT, so the shell's next line starts clean;
/// nothing reaches stdout.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_clears_the_progress_line() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;

    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    std::fs::create_dir_all(root.join(".publications")).unwrap();
    let lock_file = std::fs::File::create(root.join(".publications/cli-int.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();

    let (mut master, slave) = {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two new descriptors into m and s and reads
        // nothing else (null name, termios and winsize).
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nothing else.
        unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    };
    let target = env.target_path("cli-int").display().to_string();
    let child = at(&env)
        .args(["volume", "publish", "cli-int", &target, "--staging-root"])
        .arg(&root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(slave))
        .spawn()
        .expect("spawn stowage");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let children = Children(vec![child]);

    // Until the line is up (the client gives up on the lock after 120 s,
    // which ends this read too).
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("waiting for another") {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => panic!("no progress line: {:?}", String::from_utf8_lossy(&seen)),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = children.wait().pop().unwrap();
    // The slave is closed once the client is gone: EIO ends the read.
    while let Ok(n @ 1..) = master.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGINT),
        "{:?}: {text:?}",
        out.status
    );
    assert!(text.ends_with("\r\x1b[2K"), "line left drawn: {text:?}");
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs `stowage ARGS…` (no implicit endpoint).
fn stowage_bare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .output()
        .expect("run stowage")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// CSI makes deleting what is gone and unpublishing what is not published
/// succeed; the client keeps exit status 0 for scripts but says so on
/// stderr, and reports `deleted: false` / `was_published: false`. A real
/// deletion and a real unpublish say nothing of the kind.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_or_unpublishing_nothing_says_so_and_exits_0() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();

    let out = stowage(&env, &["-o", "json", "volume", "delete", "garbage"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("no such volume"),
        "{}",
        stderr_of(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deleted"], Value::Bool(false), "{v}");
    let table = stowage(&env, &["volume", "delete", "garbage"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("false (no such volume)"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );

    let vol = json(
        &env,
        &[
            "volume",
            "create",
            "real",
            "--size",
            "32Mi",
            "--param",
            "backend=dir",
            "--staging-root",
            &root_s,
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();
    let target = env.target_path("real");
    let target_s = target.display().to_string();
    json(
        &env,
        &[
            "volume",
            "publish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );

    let out = stowage(
        &env,
        &[
            "-o",
            "json",
            "volume",
            "unpublish",
            &id,
            "/not/published",
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("is not published at /not/published"),
        "{}",
        stderr_of(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["was_published"], Value::Bool(false), "{v}");
    assert!(is_mounted(&target), "the real publication is untouched");

    let out = stowage(
        &env,
        &[
            "-o",
            "json",
            "volume",
            "unpublish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(
        !stderr_of(&out).contains("not published"),
        "{}",
        stderr_of(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["was_published"], Value::Bool(true), "{v}");
    assert!(!is_mounted(&target));

    let out = stowage(&env, &["-o", "json", "volume", "delete", &id]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !stderr_of(&out).contains("no such volume"),
        "{}",
        stderr_of(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deleted"], Value::Bool(true), "{v}");
}

/// A volume created with `--block` is published as a raw block device when
/// `--block` is forgotten (never formatted), from the client's 0600 record
/// in a 0700 `<staging-root>/.volumes`; a flag that contradicts how a
/// volume was created is refused before any call; `volume delete` forgets
/// the record.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_is_published_as_it_was_created() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "volume",
            "create",
            name,
            "--size",
            "64Mi",
            "--staging-root",
            &root_s,
        ];
        args.extend_from_slice(extra);
        str_of(&json(&env, &args), "volume_id").to_owned()
    };
    let raw = create("raw", &["--block"]);
    let fs = create("fs", &["--fs", "ext4"]);

    let records = root.join(".volumes");
    assert_eq!(
        records.metadata().unwrap().permissions().mode() & 0o777,
        0o700
    );
    for e in std::fs::read_dir(&records).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    // Forgotten --block: published raw, and said so.
    let target = env.target_path("raw");
    let target_s = target.display().to_string();
    let out = stowage(
        &env,
        &[
            "volume",
            "publish",
            &raw,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("raw block volume"),
        "{}",
        stderr_of(&out)
    );
    assert!(
        std::fs::metadata(&target)
            .unwrap()
            .file_type()
            .is_block_device(),
        "published as a block device"
    );

    // Contradicting flags are refused, naming the way out.
    let other = env.target_path("raw2").display().to_string();
    let out = stowage(
        &env,
        &[
            "volume",
            "publish",
            &raw,
            &other,
            "--fs",
            "ext4",
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("raw block volume") && stderr_of(&out).contains("--block"),
        "{}",
        stderr_of(&out)
    );
    let fs_target = env.target_path("fs").display().to_string();
    for (flag, value) in [("--block", None), ("--fs", Some("xfs"))] {
        let mut args = vec![
            "volume",
            "publish",
            &fs,
            &fs_target,
            "--staging-root",
            &root_s,
            flag,
        ];
        args.extend(value);
        let out = stowage(&env, &args);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        assert!(
            stderr_of(&out).contains("ext4 filesystem") && stderr_of(&out).contains("refusing"),
            "{}",
            stderr_of(&out)
        );
    }
    assert!(!env.target_path("fs").exists(), "nothing was published");

    json(
        &env,
        &[
            "volume",
            "unpublish",
            &raw,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    for id in [&raw, &fs] {
        json(&env, &["volume", "delete", id, "--staging-root", &root_s]);
    }
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);
}

/// `volume expand` of a published filesystem calls NodeExpandVolume
/// online, as the kubelet does: the mounted filesystem grows (xfs, which
/// grows online without CAP_SYS_RESOURCE).
#[tokio::test(flavor = "multi_thread")]
async fn expand_grows_a_published_filesystem_online() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let vol = json(
        &env,
        &[
            "volume",
            "create",
            "grow",
            "--size",
            "320Mi",
            "--fs",
            "xfs",
            "--staging-root",
            &root_s,
        ],
    );
    let id = str_of(&vol, "volume_id").to_owned();
    let target = env.target_path("grow");
    let target_s = target.display().to_string();
    json(
        &env,
        &[
            "volume",
            "publish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    let size = |p: &std::path::Path| {
        let st = nix::sys::statvfs::statvfs(p).unwrap();
        st.blocks() as u64 * st.fragment_size() as u64
    };
    let before = size(&target);

    let v = json(
        &env,
        &[
            "volume",
            "expand",
            &id,
            "--size",
            "640Mi",
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(v["node_expansion"]["state"], "done", "{v}");
    let after = size(&target);
    assert!(
        after > before + (256 << 20),
        "df size grew: {before} → {after}"
    );

    // The table says what happened, not "required at next stage/publish".
    let out = stowage(
        &env,
        &[
            "volume",
            "expand",
            &id,
            "--size",
            "640Mi",
            "--staging-root",
            &root_s,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("grown online at"), "{text}");

    json(
        &env,
        &[
            "volume",
            "unpublish",
            &id,
            &target_s,
            "--staging-root",
            &root_s,
        ],
    );
    // Not published by this client: the node part waits for the next stage.
    let v = json(
        &env,
        &[
            "volume",
            "expand",
            &id,
            "--size",
            "700Mi",
            "--staging-root",
            &root_s,
        ],
    );
    assert_eq!(v["node_expansion"]["state"], "at_next_stage", "{v}");
}

/// Mutable parameters: refused as ordinary parameters with a pointer to
/// `--mutable-param`; given at create; changed by `volume modify`.
#[tokio::test(flavor = "multi_thread")]
async fn mutable_parameters_at_create_and_modify() {
    let env = Env::new("xfs").await;
    let out = stowage(
        &env,
        &[
            "volume",
            "create",
            "m",
            "--size",
            "32Mi",
            "--param",
            "provisioning=thick",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("--mutable-param provisioning=thick"),
        "{}",
        stderr_of(&out)
    );

    let v = json(
        &env,
        &[
            "volume",
            "create",
            "m",
            "--size",
            "32Mi",
            "--mutable-param",
            "provisioning=thick",
        ],
    );
    let id = str_of(&v, "volume_id").to_owned();
    let provisioning = |v: &Value| v["volume_context"]["stowage.csi.dev/provisioning"].clone();
    assert_eq!(provisioning(&v), "thick", "{v}");

    let m = json(
        &env,
        &[
            "volume",
            "modify",
            &id,
            "--mutable-param",
            "provisioning=thin",
        ],
    );
    assert_eq!(m["mutable_parameters"]["provisioning"], "thin", "{m}");
    assert_eq!(provisioning(&json(&env, &["volume", "get", &id])), "thin");

    let out = stowage(
        &env,
        &["volume", "modify", &id, "--mutable-param", "colour=blue"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("INVALID_ARGUMENT"),
        "{}",
        stderr_of(&out)
    );
    json(&env, &["volume", "delete", &id]);
}

/// Runs the binary as `nobody` (uid/gid 65534, no groups).
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_stowage"))
        .args(args)
        .output()
        .expect("run setpriv")
}

/// Not root: `status` says "permission denied" and what to do (not "does
/// not exist"); `serve` fails at once, once, saying it must run as root
/// (not later on /dev/loop-control); a client command on the root-only
/// socket says permission denied and sudo, not a bare "Permission denied".
#[tokio::test(flavor = "multi_thread")]
async fn not_root_is_told_what_is_wrong_and_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("xfs").await;

    let out = as_nobody(&[
        "status",
        "--state-dir",
        &env.layout.state.display().to_string(),
        "--pool",
        &env.layout.pool.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("permission denied") && err.contains("sudo stowage status"),
        "{err}"
    );
    assert!(!err.contains("does not exist"), "{err}");

    let socket = env.layout.socket.display().to_string();
    let out = as_nobody(&["--endpoint", &socket, "volume", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("permission denied on {socket}")) && err.contains("sudo"),
        "{err}"
    );

    // A directory nobody may write, for serve's own paths.
    let dir = tempfile::Builder::new()
        .prefix("stowage-test-nobody-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = dir.path().display().to_string();
    let out = within(Duration::from_secs(60), move || {
        as_nobody(&[
            "serve",
            "--endpoint",
            &format!("unix://{d}/csi.sock"),
            "--node-id",
            "n1",
            "--state-dir",
            &format!("{d}/state"),
        ])
    })
    .expect("serve as nobody fails at once instead of running");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("must run as root") && err.contains("sudo"),
        "{err}"
    );
    assert_eq!(err.matches("must run as root").count(), 1, "{err}");
    assert!(!dir.path().join("state").exists(), "nothing was made");
}

/// Connection messages and command-line conveniences: a dead socket and a
/// missing one say no server is running there; a bare socket path works
/// like unix://; typos get the nearest subcommand or flag; `plugin probe`
/// prints one word; `volume list` has a NAME column; sizes are human.
#[tokio::test(flavor = "multi_thread")]
async fn messages_say_what_is_there() {
    let env = Env::new("xfs").await;
    let dead = env.scratch.root.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    assert!(dead.exists(), "the socket file stays");
    let out = stowage_bare(&["--endpoint", &dead.display().to_string(), "plugin", "probe"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("no server is running") && err.contains("nothing is listening"),
        "{err}"
    );
    let missing = env.scratch.root.join("missing.sock").display().to_string();
    let out = stowage_bare(&["--endpoint", &missing, "plugin", "probe"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("there is no socket there"),
        "{}",
        stderr_of(&out)
    );

    let bare = env.layout.socket.display().to_string();
    let out = stowage_bare(&["--endpoint", &bare, "plugin", "probe"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\n");

    let out = stowage(&env, &["volume", "lst"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("'list'"), "{}", stderr_of(&out));
    let out = stowage(&env, &["volume", "create", "x", "--sise", "1Gi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("'--size'"), "{}", stderr_of(&out));

    let root = env.scratch.root.join("client-staging");
    let root_s = root.display().to_string();
    let v = json(
        &env,
        &[
            "volume",
            "create",
            "named",
            "--size",
            "64Mi",
            "--fs",
            "ext4",
            "--staging-root",
            &root_s,
        ],
    );
    let id = str_of(&v, "volume_id").to_owned();
    let out = stowage(&env, &["volume", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME "), "{table}");
    let row = lines.next().unwrap();
    assert!(row.starts_with("named ") && row.contains(&id), "{table}");

    // An ext4 filesystem's size is not a whole number of MiB: shown
    // rounded in the largest unit, never as thousands of Ki.
    let target = env.target_path("named").display().to_string();
    json(
        &env,
        &["volume", "publish", &id, &target, "--staging-root", &root_s],
    );
    let out = stowage(&env, &["volume", "stats", &id, &target]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let bytes = table
        .lines()
        .find(|l| l.contains(" bytes "))
        .unwrap_or_else(|| panic!("{table}"));
    for cell in bytes.split_whitespace().skip(2).take(3) {
        let digits: String = cell
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let n: f64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("{cell} in {table}"));
        assert!(n < 1024.0, "{cell} is in the largest unit: {table}");
    }
    json(
        &env,
        &[
            "volume",
            "unpublish",
            &id,
            &target,
            "--staging-root",
            &root_s,
        ],
    );
}

/// `stowage serve` reports a startup error once, not as a log line and
/// again as a message.
#[tokio::test(flavor = "multi_thread")]
async fn a_serve_error_is_printed_once() {
    let env = Env::new("xfs").await;
    let socket = env.layout.socket.display().to_string();
    let state = env.scratch.root.join("state2").display().to_string();
    let out = within(Duration::from_secs(60), move || {
        stowage_bare(&[
            "serve",
            "--endpoint",
            &socket,
            "--node-id",
            "n2",
            "--state-dir",
            &state,
        ])
    })
    .expect("a second serve on a live socket fails at once");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert_eq!(
        err.matches("another server is listening").count(),
        1,
        "{err}"
    );
}

/// Sends SIGCONT to a server the test froze with SIGSTOP, on drop (also
/// when the test fails), so its teardown finds it running.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

/// Runs `stowage --endpoint … ARGS…` and waits at most 90 s for it to
/// exit: a hang detector, far above the bounds under test (killed and
/// failed past it).
fn stowage_within(env: &Env, args: &[&str]) -> Output {
    let child = at(env)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn stowage");
    let pid = child.id() as i32;
    match within(Duration::from_secs(90), move || child.wait_with_output()) {
        Some(out) => out.expect("wait for stowage"),
        None => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("stowage {args:?} did not exit within 90 s");
        }
    }
}

/// A server that stops answering (here frozen with SIGSTOP: it still
/// accepts connections, in the kernel, and never answers) does not hang
/// the client. A call waits at most `--request-timeout` (2 min by default) and
/// fails with DEADLINE_EXCEEDED, saying the server may still finish it.
/// With `--request-timeout 0` the connection's HTTP/2 pings, unanswered, end the
/// call. Once the server runs again, the same command succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stops_answering_does_not_hang_the_client() {
    let env = Env::new("xfs").await;
    json(&env, &["volume", "list"]);

    let frozen = Thaw(env.server.pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(frozen.0),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();

    let out = stowage_within(&env, &["--request-timeout", "2s", "volume", "list"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ListVolumes failed: DEADLINE_EXCEEDED")
            && err.contains("no answer within 2s (--request-timeout)")
            && err.contains("run the same command again"),
        "{err}"
    );

    // The flag is also taken after the verb.
    let out = stowage_within(&env, &["plugin", "info", "--request-timeout", "1s"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no answer within 1s"), "{err}");

    let out = stowage_within(&env, &["--request-timeout", "0", "volume", "list"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ListVolumes failed: UNAVAILABLE") && err.contains("keep-alive timed out"),
        "{err}"
    );

    drop(frozen);
    let out = stowage_within(
        &env,
        &["--request-timeout", "30s", "-o", "json", "volume", "list"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// `--request-timeout` takes a duration or 0; anything else is a usage error, as
/// is `--request-timeout` on a command that makes no calls.
#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_flag_usage() {
    let env = Env::new("xfs").await;
    for bad in ["5", "-1s", "1.5s", "soon"] {
        let out = stowage(
            &env,
            &[&format!("--request-timeout={bad}"), "volume", "list"],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr_of(&out));
        assert!(
            stderr_of(&out).contains("--request-timeout"),
            "{}",
            stderr_of(&out)
        );
    }
    for good in ["0", "10s", "5m"] {
        let out = stowage(&env, &["--request-timeout", good, "volume", "list"]);
        assert!(out.status.success(), "{good}: {}", stderr_of(&out));
    }
    // `node drain`'s own --timeout (seconds to wait for the drain) is
    // another flag: both parse, and the call finds no socket.
    let gone = env.scratch.root.join("no-such.sock");
    let gone = format!("unix://{}", gone.display());
    let out = stowage_bare(&[
        "--endpoint",
        &gone,
        "node",
        "drain",
        "n1",
        "--wait",
        "--timeout",
        "5",
        "--request-timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("no server is running"),
        "{}",
        stderr_of(&out)
    );
    let out = stowage_bare(&["--request-timeout", "1s", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("--request-timeout"),
        "{}",
        stderr_of(&out)
    );
}
