//! Pools on filesystems that cannot share extents (issue 9, defect 4):
//! by default the pool is kept in an xfs image so snapshots are O(1)
//! reflinks and never stall writers; with `--pool-image never` snapshots
//! are background copies, which a DeleteSnapshot cancels and whose failure
//! the CO is told about, leaving nothing behind either way. Also: a kill -9
//! while a copy holds the source frozen leaves nothing frozen (defect 1).

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use stowage::csi;
use stowage::os::loopdev::LoopDevice;
use stowage::os::mountinfo::MountTable;
use tonic::Code;

const NEVER: &[&str] = &["--pool-image", "never"];

fn snap_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn create_snapshot(env: &mut Env, name: &str, source: &str) -> csi::Snapshot {
    env.c
        .controller
        .create_snapshot(snap_req(name, source))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot")
}

async fn list_snapshots(env: &mut Env) -> Vec<csi::Snapshot> {
    env.c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .collect()
}

/// Files under the pool's snapshot directories.
fn snapshot_storage(env: &Env) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for kind in ["block", "dir"] {
        let d = env.layout.pool.join("snapshots").join(kind);
        if let Ok(rd) = std::fs::read_dir(&d) {
            out.extend(rd.map(|e| e.unwrap().path()));
        }
    }
    out
}

/// A raw block volume holding `mib` MiB of data, unpublished again so the
/// copy does not need a freeze.
async fn volume_with_data(env: &mut Env, name: &str, size_mib: i64, mib: usize) -> String {
    let v = env.create(name, "raw", size_mib * MIB).await;
    let staging = env.staging_dir(name);
    let target = env.target_path(name);
    env.stage(&v.volume_id, "raw", &staging).await.unwrap();
    env.publish(&v.volume_id, "raw", &staging, &target, false)
        .await
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    let chunk = pattern(7, 1 << 20);
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
    v.volume_id
}

/// The mount of the pool directory, if any: (fs type, loop backing file).
fn pool_mount(pool: &Path) -> Option<(String, Option<PathBuf>)> {
    let table = MountTable::read().unwrap();
    let e = table.mounted_at(pool)?;
    let backing = LoopDevice::from_path(Path::new(&e.source)).and_then(|d| d.backing_file());
    Some((e.fs_type.clone(), backing))
}

/// On an ext4 host filesystem the pool lives in a sparse xfs image beside
/// the pool directory; snapshots of a staged, written block volume are
/// ready at once (O(1)); the image is mounted again after the server
/// restarts and after its mount is gone (a reboot), with the volumes and
/// their data intact.
#[tokio::test(flavor = "multi_thread")]
async fn an_ext4_pool_is_kept_in_an_xfs_image_with_instant_snapshots() {
    let mut env = Env::new("ext4").await;
    let image = env.layout.pool.with_file_name("pool.xfs.img");
    assert_eq!(
        pool_mount(&env.layout.pool),
        Some(("xfs".to_owned(), Some(image.clone()))),
        "the pool is the xfs image, mounted from a loop device"
    );
    let info = env
        .c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.manifest.get("snapshot-strategy").map(String::as_str),
        Some("reflink copies")
    );

    let v = env.create("img-src", "ext4", 256 * MIB).await;
    let staging = env.staging_dir("img-src");
    let target = env.target_path("img-src");
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.publish(&v.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    let data = pattern(3, 64 << 20);
    let mut f = std::fs::File::create(target.join("data")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let snap = create_snapshot(&mut env, "img-snap", &v.volume_id).await;
    assert!(
        snap.ready_to_use,
        "a reflink snapshot is ready when CreateSnapshot returns"
    );
    // The pool image's own loop device is not something leaked.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("status")
        .arg("--state-dir")
        .arg(&env.layout.state)
        .arg("--pool")
        .arg(&env.layout.pool)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stowage status: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();

    // A restart finds the image mounted and keeps it.
    env.server.terminate();
    env.server.restart();
    env.reconnect().await;
    assert_eq!(
        pool_mount(&env.layout.pool).map(|m| m.0),
        Some("xfs".to_owned())
    );

    // A "reboot": the server stops and the pool's mount is gone; the next
    // start mounts the image again rather than starting an empty pool.
    env.server.terminate();
    stowage::os::mount::unmount(&env.layout.pool).expect("unmount the pool");
    assert_eq!(pool_mount(&env.layout.pool), None);
    env.server.restart();
    env.reconnect().await;
    assert_eq!(
        pool_mount(&env.layout.pool),
        Some(("xfs".to_owned(), Some(image)))
    );
    let restore = env
        .c
        .controller
        .create_volume({
            let mut r = create_req("img-restore", "ext4", 256 * MIB);
            r.volume_content_source = Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            });
            r
        })
        .await
        .expect("restore after the pool was remounted")
        .into_inner()
        .volume
        .unwrap();
    let staging = env.staging_dir("img-restore");
    let target = env.target_path("img-restore");
    env.stage(&restore.volume_id, "ext4", &staging)
        .await
        .unwrap();
    env.publish(&restore.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    assert!(std::fs::read(target.join("data")).unwrap() == data);
    env.unpublish(&restore.volume_id, &target).await.unwrap();
    env.unstage(&restore.volume_id, &staging).await.unwrap();
}

/// `--pool-image never` keeps the pool on ext4 (sparse copies); a pool
/// that already holds volumes is never hidden under a new image, even when
/// the next start allows one.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_holding_volumes_is_never_hidden_under_an_image() {
    let mut env = Env::with_args("ext4", NEVER).await;
    assert_eq!(pool_mount(&env.layout.pool), None);
    let v = env.create("kept", "dir", 0).await;
    env.server.terminate();
    env.server
        .args
        .retain(|a| a != "--pool-image" && a != "never");
    env.server.restart();
    env.reconnect().await;
    assert_eq!(pool_mount(&env.layout.pool), None, "no image over data");
    assert!(
        !env.layout.pool.with_file_name("pool.xfs.img").exists(),
        "no image was made"
    );
    let got = env
        .c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.entries.len(), 1);
    assert_eq!(
        got.entries[0].volume.as_ref().unwrap().volume_id,
        v.volume_id
    );
    assert!(env.server.log_text().contains("already holds volumes"));
}

/// DeleteSnapshot while the snapshot is still being copied succeeds at
/// once ("deleting a snapshot being cut cancels the copy"): the copy stops,
/// nothing is left in the pool, in ListSnapshots or in the state (across a
/// restart, no record brings the ID back), and the source volume is free
/// again (DeleteVolume succeeds, not ABORTED).
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_snapshot_being_copied_cancels_the_copy() {
    let mut env = Env::with_args("ext4", NEVER).await;
    let vol = volume_with_data(&mut env, "cancel-src", 768, 640).await;
    let snap = create_snapshot(&mut env, "cancel-snap", &vol).await;
    assert!(!snap.ready_to_use, "a 640 MiB copy is not done at once");
    env.c
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot of a snapshot being copied");
    assert!(list_snapshots(&mut env).await.is_empty());
    assert!(
        snapshot_storage(&env).is_empty(),
        "{:?}",
        snapshot_storage(&env)
    );
    env.delete(&vol).await.expect("the source is free again");
    assert!(env.server.log_text().contains("snapshot copy cancelled"));
    let (_, report) = env.status();
    assert_eq!(report["snapshots"], 0, "{report:#}");
    env.restart_server().await;
    assert!(list_snapshots(&mut env).await.is_empty());
    let (_, report) = env.status();
    assert_eq!(report["snapshots"], 0, "{report:#}");
}

/// A snapshot being copied whose record cannot be removed when a
/// DeleteSnapshot cancels its copy (the state's snapshot log made
/// immutable): DeleteSnapshot is not OK until the record is gone. Once
/// the log can be written, the CO's next try removes it, and no restart
/// brings the deleted ID back (start-up would take a record left behind
/// for a failed copy's and make its copy anew under that ID).
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_snapshot_being_copied_is_not_ok_until_its_record_is_gone() {
    let mut env = Env::with_args("ext4", NEVER).await;
    let vol = volume_with_data(&mut env, "left-src", 768, 640).await;
    let snap = create_snapshot(&mut env, "left-snap", &vol).await;
    assert!(!snap.ready_to_use, "a 640 MiB copy is not done at once");
    env.delete_snapshot_once_its_record_can_go(&snap.snapshot_id)
        .await;
    assert!(env.server.log_text().contains("snapshot copy cancelled"));
    let (_, report) = env.status();
    assert_eq!(report["snapshots"], 0, "{report:#}");
    env.restart_server().await;
    let again = create_snapshot(&mut env, "left-snap", &vol).await;
    assert_ne!(
        again.snapshot_id, snap.snapshot_id,
        "a deleted snapshot ID came back"
    );
}

/// A copy that fails (the pool fills up) ends in an error the CO sees: the
/// next CreateSnapshot of that name answers RESOURCE_EXHAUSTED, nothing is
/// left in the pool or in ListSnapshots, and a later CreateSnapshot starts
/// anew under the same snapshot ID (and fails the same way here; the
/// copy made anew succeeding is `tests/snapshots.rs`).
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_runs_out_of_space_is_reported_and_leaves_nothing() {
    let mut env = Env::with_pool_size("ext4", "", 900 << 20, NEVER).await;
    let vol = volume_with_data(&mut env, "full-src", 512, 500).await;
    let first = create_snapshot(&mut env, "full-snap", &vol).await;
    assert!(!first.ready_to_use);
    let start = Instant::now();
    let err = loop {
        match env
            .c
            .controller
            .create_snapshot(snap_req("full-snap", &vol))
            .await
        {
            Ok(r) => {
                let s = r.into_inner().snapshot.unwrap();
                assert!(!s.ready_to_use, "500 MiB cannot be copied into ~380 MiB");
            }
            Err(e) => break e,
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the failed copy was never reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(list_snapshots(&mut env).await.is_empty());
    assert!(
        snapshot_storage(&env).is_empty(),
        "{:?}",
        snapshot_storage(&env)
    );
    // Asked again, the plugin tries again, under the ID the CO holds.
    let again = create_snapshot(&mut env, "full-snap", &vol).await;
    assert!(!again.ready_to_use);
    assert_eq!(again.snapshot_id, first.snapshot_id);
    env.c
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: again.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(snapshot_storage(&env).is_empty());
}
