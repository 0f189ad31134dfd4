//! Path safety of the node service (issue 9): staging and target paths are
//! created, mounted on, unmounted and removed without following a symlink
//! swapped into any component, and never overlap the pool, the state
//! directory, a staging path or another publication. Unpublish and unstage
//! never answer OK while a mount made for them remains. After every
//! sequence of successful calls, no mount under the scratch dir is left
//! that no record explains, and `stowage status` reports nothing leaked.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use stowage::os::mountinfo::MountTable;
use stowage::volume::{BackendKind, VolumeId};
use tonic::Code;

/// Paths the node records as staging paths or publication targets.
fn recorded_paths(report: &Value) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for v in report["volumes"].as_array().unwrap() {
        if let Some(p) = v["staged"]["path"].as_str() {
            out.push(PathBuf::from(p));
        }
        for p in v["publications"].as_array().unwrap() {
            out.push(PathBuf::from(p["target"].as_str().unwrap()));
        }
    }
    out
}

/// Asserts that `stowage status` finds no problem and that every mount
/// under the scratch dir is the pool filesystem, a recorded staging path or
/// target, or one of `foreign` (mounts the test made itself).
#[track_caller]
fn assert_clean(env: &Env, foreign: &[&Path]) {
    let (code, report) = env.status();
    assert_eq!(
        report["problems"].as_array().unwrap().len(),
        0,
        "status reports problems: {report:#}"
    );
    assert_eq!(code, 0, "{report:#}");
    let recorded = recorded_paths(&report);
    let pool_fs = env.scratch.root.join("pool-fs");
    let stray: Vec<PathBuf> = MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|m| m.starts_with(&env.scratch.root))
        .filter(|m| *m != pool_fs && !recorded.contains(m) && !foreign.contains(&m.as_path()))
        .collect();
    assert!(
        stray.is_empty(),
        "mounts no record explains: {stray:?}\nserver log:\n{}",
        env.server.log_text()
    );
}

/// Mounts a small tmpfs at `path` (a mount stowage did not make).
fn mount_tmpfs(path: &Path) {
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
}

/// Every mount point under `root`.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|m| m.starts_with(root))
        .collect()
}

/// The names in directory `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Publishes `kind` at `base/pub`, moves `base` away and puts a symlink to
/// a decoy (holding `pub/`, with a foreign tmpfs on it when `foreign_mount`)
/// in its place, then unpublishes `base/pub`: the decoy keeps its `pub/`
/// (and its mount), and the volume's own mount is gone.
async fn unpublish_after_parent_swap(kind: &str, foreign_mount: bool) {
    let mut env = Env::new("xfs").await;
    let vol = env.create("swap", kind, 64 * MIB).await;
    let id = vol.volume_id.clone();
    let staging = env.staging_dir("swap");
    env.stage(&id, kind, &staging).await.unwrap();
    let base = env.target_path("base");
    std::fs::create_dir(&base).unwrap();
    let target = base.join("pub");
    env.publish(&id, kind, &staging, &target, false)
        .await
        .unwrap();
    assert!(is_mounted(&target));

    let moved = env.target_path("moved");
    std::fs::rename(&base, &moved).unwrap();
    let decoy = env.scratch.root.join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    let decoy_pub = decoy.join("pub");
    if kind == "raw" {
        std::fs::write(&decoy_pub, b"decoy").unwrap();
    } else {
        std::fs::create_dir(&decoy_pub).unwrap();
    }
    if foreign_mount {
        if kind == "raw" {
            nix::mount::mount(
                Some(Path::new("/dev/null")),
                &decoy_pub,
                Some("none"),
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
        } else {
            mount_tmpfs(&decoy_pub);
        }
    }
    std::os::unix::fs::symlink(&decoy, &base).unwrap();

    let r = env.unpublish(&id, &target).await;
    assert!(
        decoy_pub.exists(),
        "NodeUnpublish removed {} through a symlink ({r:?})",
        decoy_pub.display()
    );
    assert_eq!(
        is_mounted(&decoy_pub),
        foreign_mount,
        "the decoy's mount changed ({r:?})"
    );
    r.expect("NodeUnpublish finds and removes its own mount wherever it moved");
    assert!(
        !is_mounted(&moved.join("pub")),
        "the publication's mount is still there after NodeUnpublish answered OK"
    );
    let foreign: Vec<&Path> = if foreign_mount {
        vec![decoy_pub.as_path()]
    } else {
        vec![]
    };
    assert_clean(&env, &foreign);

    env.unstage(&id, &staging).await.unwrap();
    assert_clean(&env, &foreign);
    if foreign_mount {
        nix::mount::umount2(&decoy_pub, nix::mount::MntFlags::empty()).unwrap();
    }
    if kind != "raw" {
        assert!(listing(&decoy_pub).is_empty());
    }
    env.delete(&id).await.unwrap();
}

/// Issue 9, defect 2: publish at `T/base/pub`, rename `T/base` away, make
/// `T/base` a symlink to a decoy holding an empty `pub/`: NodeUnpublish
/// must not remove `decoy/pub`.
#[tokio::test(flavor = "multi_thread")]
async fn unpublish_does_not_follow_a_parent_swapped_for_a_symlink() {
    unpublish_after_parent_swap("dir", false).await;
}

/// Issue 9, defect 2, with a foreign mount in the decoy: it stays, and the
/// answer is not INTERNAL (EBUSY from removing the decoy's mount point).
#[tokio::test(flavor = "multi_thread")]
async fn unpublish_does_not_touch_a_foreign_mount_behind_a_swapped_parent() {
    unpublish_after_parent_swap("ext4", true).await;
}

/// The same swap for a raw block publication (a bind of the device node on
/// a file stowage created).
#[tokio::test(flavor = "multi_thread")]
async fn unpublish_raw_block_does_not_follow_a_swapped_parent() {
    unpublish_after_parent_swap("raw", true).await;
}

/// Issue 9, defect 2, first-stage race: while NodeStage of a fresh block
/// volume makes its filesystem, the staging path's parent is swapped for a
/// symlink to a decoy. Nothing may be mounted in (or put into) the decoy;
/// the stage either fails cleanly or mounts at the real staging path.
#[tokio::test(flavor = "multi_thread")]
async fn first_stage_does_not_mount_into_a_parent_swapped_during_mkfs() {
    let mut env = Env::new("xfs").await;
    let decoy = env.scratch.root.join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    std::fs::create_dir(decoy.join("stg")).unwrap();
    let mut swapped_before_mount = 0;
    for (i, kind) in ["ext4", "xfs", "ext4", "xfs"].into_iter().enumerate() {
        let vol = env.create(&format!("race-{i}"), kind, 64 * MIB).await;
        let id = vol.volume_id.clone();
        let root = env.layout.staging.join(format!("race-{i}"));
        let parent = root.join("par");
        let away = root.join("par-away");
        std::fs::create_dir_all(parent.join("stg")).unwrap();
        let staging = parent.join("stg");

        // Swap the parent as soon as the volume's loop device appears: the
        // path check is done by then, and mkfs is about to run.
        let loops_before = loops_under(&env.layout.pool).len();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, pool) = (Arc::clone(&stop), env.layout.pool.clone());
            let (parent, away, decoy) = (parent.clone(), away.clone(), decoy.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(30) {
                    if loops_under(&pool).len() > loops_before {
                        std::fs::rename(&parent, &away).unwrap();
                        std::os::unix::fs::symlink(&decoy, &parent).unwrap();
                        return true;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                false
            })
        };
        let r = env.stage(&id, kind, &staging).await;
        stop.store(true, Ordering::SeqCst);
        let swapped = swapper.join().unwrap();
        assert!(
            mounts_under(&decoy).is_empty(),
            "NodeStage mounted into the decoy ({r:?}): {:?}",
            mounts_under(&decoy)
        );
        assert_eq!(listing(&decoy), ["stg"]);
        assert!(listing(&decoy.join("stg")).is_empty(), "{r:?}");
        if swapped {
            std::fs::remove_file(&parent).unwrap();
            std::fs::rename(&away, &parent).unwrap();
        }
        match &r {
            Ok(()) => assert!(is_mounted(&staging), "staged OK but not mounted"),
            Err(s) => {
                assert!(swapped, "NodeStage failed without a swap: {s:?}");
                swapped_before_mount += 1;
                assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
                assert!(
                    s.message().contains("changed while it was being mounted"),
                    "{s:?}"
                );
                assert!(mounts_under(&root).is_empty(), "{s:?}");
            }
        }
        assert_clean(&env, &[]);
        // The path is whole again: staging works (or is a no-op).
        env.stage(&id, kind, &staging).await.unwrap();
        assert!(is_mounted(&staging));
        env.unstage(&id, &staging).await.unwrap();
        assert!(mounts_under(&root).is_empty());
        assert_clean(&env, &[]);
        env.delete(&id).await.unwrap();
    }
    assert!(
        swapped_before_mount > 0,
        "the swap never landed before the mount; the race was not exercised"
    );
}

/// Issue 9, defect 3(a): targets (and staging paths) at, inside or above
/// the pool, the state directory, or a staging path are refused, nothing is
/// mounted or created there, and nothing leaks.
#[tokio::test(flavor = "multi_thread")]
async fn targets_overlapping_pool_state_or_staging_are_refused() {
    let mut env = Env::new("xfs").await;
    let vol = env.create("ovl", "ext4", 64 * MIB).await;
    let id = vol.volume_id.clone();
    let staging = env.staging_dir("ovl");
    env.stage(&id, "ext4", &staging).await.unwrap();
    let before = mounts_under(&env.scratch.root);

    let pool = env.layout.pool.clone();
    let state = env.layout.state.clone();
    let pool_fs = env.scratch.root.join("pool-fs");
    let cases: Vec<(PathBuf, Code)> = vec![
        // This volume's staging path: above it, inside it.
        (env.layout.staging.clone(), Code::FailedPrecondition),
        (staging.join("inside"), Code::FailedPrecondition),
        // Pool and state directory: at, inside, above.
        (pool.clone(), Code::InvalidArgument),
        (pool.join("volumes"), Code::InvalidArgument),
        (pool.join("fresh"), Code::InvalidArgument),
        (state.clone(), Code::InvalidArgument),
        (state.join("fresh"), Code::InvalidArgument),
        (pool_fs.clone(), Code::InvalidArgument),
        (env.scratch.root.clone(), Code::InvalidArgument),
        // Where the pool's image file goes when the pool is kept in one.
        (pool_fs.join("pool.xfs.img"), Code::InvalidArgument),
    ];
    for (target, code) in &cases {
        let existed = target.exists();
        let r = env.publish(&id, "ext4", &staging, target, false).await;
        assert_eq!(
            mounts_under(&env.scratch.root),
            before,
            "publish at {} mounted something ({r:?})",
            target.display()
        );
        assert_code(r, *code);
        assert_eq!(target.exists(), existed, "{}", target.display());
    }

    // A second volume's staging path may not overlap either.
    let other = env.create("ovl-2", "dir", 0).await;
    let stage_cases: Vec<(PathBuf, Code)> = vec![
        (staging.clone(), Code::FailedPrecondition),
        (staging.join("inside"), Code::FailedPrecondition),
        (env.layout.staging.clone(), Code::FailedPrecondition),
        (pool.join("fresh"), Code::InvalidArgument),
        (state.join("fresh"), Code::InvalidArgument),
        (pool_fs.clone(), Code::InvalidArgument),
    ];
    for (path, code) in &stage_cases {
        let r = env.stage(&other.volume_id, "dir", path).await;
        assert_eq!(
            mounts_under(&env.scratch.root),
            before,
            "stage at {} mounted something ({r:?})",
            path.display()
        );
        assert_code(r, *code);
    }
    assert_clean(&env, &[]);

    // After a restart the node still knows every path it must not overlap.
    env.server.kill9();
    env.server.restart();
    env.reconnect().await;
    assert_code(
        env.publish(&id, "ext4", &staging, &env.layout.staging.clone(), false)
            .await,
        Code::FailedPrecondition,
    );
    assert_code(
        env.publish(&id, "ext4", &staging, &pool_fs, false).await,
        Code::InvalidArgument,
    );
    assert_eq!(mounts_under(&env.scratch.root), before);

    env.unstage(&id, &staging).await.unwrap();
    assert_clean(&env, &[]);
}

/// Issue 9, defect 3(b): one volume published at `X/data` and at `X` (in
/// either order), and a second volume inside the first's target, are
/// refused; unpublishing what was accepted leaves no mount behind.
#[tokio::test(flavor = "multi_thread")]
async fn nested_publications_are_refused() {
    let mut env = Env::new("xfs").await;
    let vol = env.create("nest", "dir", 0).await;
    let id = vol.volume_id.clone();
    let staging = env.staging_dir("nest");
    env.stage(&id, "dir", &staging).await.unwrap();
    let x = env.target_path("x");
    std::fs::create_dir(&x).unwrap();
    let data = x.join("data");

    // X/data first, then X.
    env.publish(&id, "dir", &staging, &data, false)
        .await
        .unwrap();
    assert_code(
        env.publish(&id, "dir", &staging, &x, false).await,
        Code::FailedPrecondition,
    );
    assert!(!is_mounted(&x));
    // A second volume at X or inside X/data is refused too.
    let other = env.create("nest-2", "dir", 0).await;
    let other_staging = env.staging_dir("nest-2");
    env.stage(&other.volume_id, "dir", &other_staging)
        .await
        .unwrap();
    for t in [x.clone(), data.join("deeper")] {
        assert_code(
            env.publish(&other.volume_id, "dir", &other_staging, &t, false)
                .await,
            Code::FailedPrecondition,
        );
    }
    env.unpublish(&id, &x).await.unwrap();
    env.unpublish(&id, &data).await.unwrap();
    assert!(mounts_under(&x).is_empty(), "{:?}", mounts_under(&x));
    assert_clean(&env, &[]);

    // X first, then X/data (inside the volume now mounted at X).
    env.publish(&id, "dir", &staging, &x, false).await.unwrap();
    assert_code(
        env.publish(&id, "dir", &staging, &data, false).await,
        Code::FailedPrecondition,
    );
    // After a restart too.
    env.server.kill9();
    env.server.restart();
    env.reconnect().await;
    assert_code(
        env.publish(&id, "dir", &staging, &data, false).await,
        Code::FailedPrecondition,
    );
    env.unpublish(&id, &data).await.unwrap();
    env.unpublish(&id, &x).await.unwrap();
    assert!(mounts_under(&x).is_empty(), "{:?}", mounts_under(&x));
    assert_clean(&env, &[]);

    env.unstage(&other.volume_id, &other_staging).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    assert_clean(&env, &[]);
}

/// Issue 9, defect 3: NodeUnpublish never answers OK while the mount made
/// for the publication remains: a busy mount (a file open on it) is
/// ABORTED, to be retried, and the record is kept.
#[tokio::test(flavor = "multi_thread")]
async fn unpublish_of_a_busy_mount_is_aborted() {
    let mut env = Env::new("xfs").await;
    let vol = env.create("busy", "ext4", 64 * MIB).await;
    let id = vol.volume_id.clone();
    let staging = env.staging_dir("busy");
    let target = env.target_path("busy");
    env.stage(&id, "ext4", &staging).await.unwrap();
    env.publish(&id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    let open = std::fs::File::create(target.join("busy")).unwrap();
    assert_code(env.unpublish(&id, &target).await, Code::Aborted);
    assert!(is_mounted(&target));
    assert_clean(&env, &[]);
    drop(open);
    env.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists());
    env.unstage(&id, &staging).await.unwrap();
    assert_clean(&env, &[]);
}

/// Issue 9, defect 3: NodeUnpublish and NodeUnstage never answer OK while
/// the mount made for them remains: covered by a foreign mount, they fail
/// with FAILED_PRECONDITION and keep their record; once the foreign mount
/// is gone, they succeed and nothing is left.
#[tokio::test(flavor = "multi_thread")]
async fn unpublish_and_unstage_never_answer_ok_over_a_covered_mount() {
    let mut env = Env::new("xfs").await;
    let vol = env.create("cover", "ext4", 64 * MIB).await;
    let id = vol.volume_id.clone();
    let staging = env.staging_dir("cover");
    let target = env.target_path("cover");
    env.stage(&id, "ext4", &staging).await.unwrap();
    env.publish(&id, "ext4", &staging, &target, false)
        .await
        .unwrap();

    mount_tmpfs(&target);
    assert_code(env.unpublish(&id, &target).await, Code::FailedPrecondition);
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    assert!(is_mounted(&target), "the publication's mount is gone");
    assert_clean(&env, &[]);
    env.unpublish(&id, &target).await.unwrap();
    assert!(!target.exists());
    assert_clean(&env, &[]);

    mount_tmpfs(&staging);
    assert_code(env.unstage(&id, &staging).await, Code::FailedPrecondition);
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    assert!(is_mounted(&staging), "the staging mount is gone");
    assert_clean(&env, &[]);
    env.unstage(&id, &staging).await.unwrap();
    assert!(!is_mounted(&staging));
    assert!(loops_under(&env.layout.pool).is_empty());
    assert_clean(&env, &[]);
    env.delete(&id).await.unwrap();
}

/// `stowage status` reports a mount of a volume at a path that no record
/// names (what defect 3(b) leaked): a bind of a block volume's staging
/// mount and of a dir volume's staging mount made behind stowage's back.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_a_volume_mounted_where_no_record_says() {
    let mut env = Env::new("xfs").await;
    let mut made = Vec::new();
    for kind in ["ext4", "dir"] {
        let vol = env.create(&format!("leak-{kind}"), kind, 64 * MIB).await;
        let staging = env.staging_dir(&format!("leak-{kind}"));
        env.stage(&vol.volume_id, kind, &staging).await.unwrap();
        let stray = env.target_path(&format!("stray-{kind}"));
        std::fs::create_dir(&stray).unwrap();
        nix::mount::mount(
            Some(&staging),
            &stray,
            Some("none"),
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        made.push((vol.volume_id, staging, stray));
    }
    let (code, report) = env.status();
    assert_eq!(code, 1, "{report:#}");
    for (_, _, stray) in &made {
        assert!(
            report["problems"].as_array().unwrap().iter().any(|p| {
                p["kind"] == "leaked-mount" && p["subject"] == stray.display().to_string()
            }),
            "{} not reported: {report:#}",
            stray.display()
        );
    }
    // Unstage refuses while the volume is still mounted elsewhere.
    for (id, staging, _) in &made {
        assert_code(env.unstage(id, staging).await, Code::FailedPrecondition);
        assert!(is_mounted(staging), "unstage refused but unmounted");
    }
    for (_, _, stray) in &made {
        nix::mount::umount2(stray, nix::mount::MntFlags::empty()).unwrap();
    }
    assert_clean(&env, &[]);
    for (id, staging, _) in &made {
        env.unstage(id, staging).await.unwrap();
    }
    assert_clean(&env, &[]);
}

/// A state directory and pool reached through a symlink (an operator's
/// `/var/lib/stowage -> /data/stowage`) work: the server resolves them at
/// start. Before, mounts and loop devices (which the kernel names by real
/// paths) matched none of the volume's, so a block volume's NodeStage
/// mounted, then refused its own mount (INVALID_ARGUMENT), and left it
/// and its loop device behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_state_dir_and_pool_behind_a_symlink_work() {
    let mut env = Env::new("xfs").await;
    let real = env.layout.state.parent().unwrap().to_owned();
    let link = env.scratch.root.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    tokio::task::block_in_place(|| env.server.terminate());
    for (flag, dir) in [("--state-dir", "state"), ("--pool", "pool")] {
        let i = env.server.args.iter().position(|a| a == flag).unwrap();
        env.server.args[i + 1] = link.join(dir).display().to_string();
    }
    tokio::task::block_in_place(|| env.server.restart());
    env.reconnect().await;
    for kind in ["ext4", "dir"] {
        let name = format!("linked-{kind}");
        let v = env.create(&name, kind, 64 << 20).await;
        let staging = env.staging_dir(&name);
        let target = env.target_path(&name);
        env.stage(&v.volume_id, kind, &staging)
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e:?}\n{}", env.server.log_text()));
        env.publish(&v.volume_id, kind, &staging, &target, false)
            .await
            .unwrap();
        std::fs::write(target.join("f"), b"x").unwrap();
        env.unpublish(&v.volume_id, &target).await.unwrap();
        env.unstage(&v.volume_id, &staging).await.unwrap();
        assert!(
            mounts_under(&env.scratch.root)
                .iter()
                .all(|m| m.starts_with(&real)),
            "{kind}: a mount left: {:?}",
            mounts_under(&env.scratch.root)
        );
        env.delete(&v.volume_id).await.unwrap();
    }
    assert_clean(&env, &[]);
}

/// The loop devices attached with `image` as backing file.
fn loops_of(image: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && Path::new(b.trim_end()) == image
        {
            out.push(PathBuf::from("/dev").join(name));
        }
    }
    out
}

/// A publication whose mount was unmounted behind stowage's back is made
/// again by the next NodePublish, and stays stowage's: NodeUnpublish then
/// removes the target stowage created, and a raw read-only publication's
/// own loop device is not left attached. Before, the second publish
/// forgot both: the target stayed after unpublish, and a second loop
/// device was attached beside the first, which nothing detached.
#[tokio::test(flavor = "multi_thread")]
async fn a_publication_made_again_after_losing_its_mount_leaves_nothing() {
    let mut env = Env::new("xfs").await;
    for (kind, readonly) in [("dir", false), ("raw", true)] {
        let name = format!("again-{kind}");
        let v = env.create(&name, kind, 64 << 20).await;
        let staging = env.staging_dir(&name);
        let target = env.target_path(&name);
        env.stage(&v.volume_id, kind, &staging).await.unwrap();
        let uuid = VolumeId::parse(&v.volume_id).unwrap().uuid;
        let image = stowage::backend::backend_dir(&env.layout.pool, BackendKind::Block)
            .join(format!("{}.img", uuid.to_hex()));
        let staged_loops = loops_of(&image);
        for _ in 0..2 {
            env.publish(&v.volume_id, kind, &staging, &target, readonly)
                .await
                .unwrap();
            // Unmounted by someone else.
            nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
        }
        env.publish(&v.volume_id, kind, &staging, &target, readonly)
            .await
            .unwrap();
        env.unpublish(&v.volume_id, &target).await.unwrap();
        assert!(!target.exists(), "{kind}: the target stowage made stayed");
        if kind == "raw" {
            assert_eq!(loops_of(&image), staged_loops, "{kind}: loop devices left");
        }
        env.unstage(&v.volume_id, &staging).await.unwrap();
        env.delete(&v.volume_id).await.unwrap();
    }
    assert_clean(&env, &[]);
}
