//! The client commands (`stowage plugin|volume|snapshot …`) run as a
//! separate process against a real `stowage serve`: JSON output parsed and
//! checked, tables printed, and exit codes (1 for gRPC errors, 2 for usage).

#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// Runs `stowage --endpoint unix://<socket> ARGS…`.
fn stowage(env: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("--endpoint")
        .arg(format!("unix://{}", env.layout.socket.display()))
        .args(args)
        .output()
        .expect("run stowage")
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
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&restored_id), "{table}");

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
