//! Snapshots, restore, clone and expansion against a real server, on real
//! pools of each strategy: xfs (reflink), btrfs (subvolumes + reflink) and
//! ext4 (sparse copies in the background). Content is compared byte for
//! byte. Each test names the CSI clause it checks.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use stowage::csi;
use tonic::Code;

/// Server flags that keep `pool` as it is: an ext4 pool is tested as the
/// sparse-copy pool it is with `--pool-image never` (by default it would be
/// kept in an xfs image; tests/pool_image.rs covers that).
fn pool_args(pool: &str) -> &'static [&'static str] {
    if pool == "ext4" {
        &["--pool-image", "never"]
    } else {
        &[]
    }
}

fn snap_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

/// CreateSnapshot, repeated until ready_to_use ("the CO MAY call
/// CreateSnapshot again to check readiness").
async fn snapshot_ready(env: &mut Env, name: &str, source: &str) -> csi::Snapshot {
    let start = Instant::now();
    loop {
        let s = env
            .c
            .controller
            .create_snapshot(snap_req(name, source))
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .unwrap();
        if s.ready_to_use {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "snapshot never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn restore_req(name: &str, kind: &str, size: i64, snapshot: &str) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, kind, size);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    r
}

fn clone_req(name: &str, kind: &str, size: i64, volume: &str) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, kind, size);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: volume.into(),
            },
        )),
    });
    r
}

/// Writes `data` into a published volume (a file for mounts, the device
/// for raw block) and syncs.
fn write_data(kind: &str, target: &Path, data: &[u8]) {
    if kind == "raw" {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    } else {
        let mut f = std::fs::File::create(target.join("data")).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
}

fn read_data(kind: &str, target: &Path, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    if kind == "raw" {
        std::fs::File::open(target)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
    } else {
        buf = std::fs::read(target.join("data")).unwrap();
    }
    buf
}

/// Stages and publishes `vol` at fresh paths named `tag`.
async fn mount(
    env: &mut Env,
    vol: &str,
    kind: &str,
    tag: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let staging = env.staging_dir(tag);
    let target = env.target_path(tag);
    env.stage(vol, kind, &staging).await.unwrap();
    env.publish(vol, kind, &staging, &target, false)
        .await
        .unwrap();
    (staging, target)
}

async fn unmount(env: &mut Env, vol: &str, staging: &Path, target: &Path) {
    env.unpublish(vol, target).await.unwrap();
    env.unstage(vol, staging).await.unwrap();
}

/// Snapshot → change the source → restore: the restore holds the data as
/// it was at the snapshot, and stays restorable after the source is
/// deleted ("snapshots are independent of their source").
async fn round_trip(pool: &str, kind: &str) {
    let mut env = Env::with_args(pool, pool_args(pool)).await;
    let size = if kind == "dir" { 0 } else { 320 * MIB };
    let v = env.create("src", kind, size).await;
    let (s1, t1) = mount(&mut env, &v.volume_id, kind, "src").await;
    let before = pattern(1, 8 << 20);
    write_data(kind, &t1, &before);
    let snap = snapshot_ready(&mut env, "snap-1", &v.volume_id).await;
    assert_eq!(snap.source_volume_id, v.volume_id);
    assert!(snap.creation_time.is_some());
    write_data(kind, &t1, &pattern(2, 8 << 20));
    unmount(&mut env, &v.volume_id, &s1, &t1).await;
    env.delete(&v.volume_id).await.unwrap();

    let r = env
        .c
        .controller
        .create_volume(restore_req("restored", kind, size, &snap.snapshot_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(
        r.content_source.is_some(),
        "restored volume must report its content source"
    );
    let (s2, t2) = mount(&mut env, &r.volume_id, kind, "restored").await;
    assert!(
        read_data(kind, &t2, before.len()) == before,
        "restore does not match the snapshot"
    );
    unmount(&mut env, &r.volume_id, &s2, &t2).await;
    env.delete(&r.volume_id).await.unwrap();
    for _ in 0..2 {
        env.c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(
        std::fs::read_dir(env.layout.pool.join("snapshots/block"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(
        std::fs::read_dir(env.layout.pool.join("snapshots/dir"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_round_trip_block_ext4_on_xfs_reflink_pool() {
    round_trip("xfs", "ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_round_trip_raw_on_ext4_copy_pool() {
    round_trip("ext4", "raw").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_round_trip_dir_on_btrfs_subvolume_pool() {
    round_trip("btrfs", "dir").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_round_trip_dir_on_xfs_reflink_pool() {
    round_trip("xfs", "dir").await;
}

/// A 512 MiB raw volume `name` holding 48 copies of `chunk` (4 MiB) from
/// its start, written through a publication and synced, then unpublished.
async fn raw_volume_of_chunks(env: &mut Env, name: &str, chunk: &[u8]) -> csi::Volume {
    let v = env.create(name, "raw", 512 * MIB).await;
    let (s, t) = mount(env, &v.volume_id, "raw", name).await;
    let mut f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
    for _ in 0..48 {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    unmount(env, &v.volume_id, &s, &t).await;
    v
}

/// Restores `snapshot` (of a [`raw_volume_of_chunks`] volume) into raw
/// volume `name` and checks its last chunk is `chunk`.
async fn restore_holds_last_chunk(env: &mut Env, name: &str, snapshot: &str, chunk: &[u8]) {
    let r = env
        .c
        .controller
        .create_volume(restore_req(name, "raw", 512 * MIB, snapshot))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (s, t) = mount(env, &r.volume_id, "raw", name).await;
    let mut g = std::fs::File::open(&t).unwrap();
    g.seek(SeekFrom::Start(47 * (4 << 20))).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    g.read_exact(&mut buf).unwrap();
    assert!(buf == chunk, "the restored volume {name} holds the data");
    drop(g);
    unmount(env, &r.volume_id, &s, &t).await;
}

/// On a pool without extent sharing, CreateSnapshot answers at once with
/// ready_to_use=false and a repeated call reports readiness ("the SP
/// SHOULD return ... ready_to_use false ... while the snapshot is being
/// processed"); the plugin reports its strategy in GetPluginInfo.
#[tokio::test(flavor = "multi_thread")]
async fn copy_pool_snapshots_become_ready_in_the_background() {
    let mut env = Env::with_args("ext4", pool_args("ext4")).await;
    let info = env
        .c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.manifest.get("snapshot-strategy").map(String::as_str),
        Some("sparse copies")
    );
    let chunk = pattern(9, 4 << 20);
    let v = raw_volume_of_chunks(&mut env, "big", &chunk).await;
    let first = env
        .c
        .controller
        .create_snapshot(snap_req("bg", &v.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        !first.ready_to_use,
        "a copied snapshot cannot be ready at once"
    );
    // Busy while copying: the source volume and the snapshot.
    assert_code(env.delete(&v.volume_id).await, Code::Aborted);
    let ready = snapshot_ready(&mut env, "bg", &v.volume_id).await;
    assert_eq!(ready.snapshot_id, first.snapshot_id);
    restore_holds_last_chunk(&mut env, "bg-restore", &ready.snapshot_id, &chunk).await;
}

/// A background copy that fails (here: the pool fills up) is reported to
/// the next CreateSnapshot with the spec's code (RESOURCE_EXHAUSTED), and
/// the one after copies anew under the snapshot ID the CO already holds:
/// a snapshot never changes its ID for the same name and source.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_background_copy_is_reported_then_made_anew_under_the_same_id() {
    let mut env = Env::with_args("ext4", pool_args("ext4")).await;
    let chunk = pattern(5, 4 << 20);
    let v = raw_volume_of_chunks(&mut env, "full", &chunk).await;

    // Leave 64 MiB of the pool's filesystem (blocks reserved for root
    // included: the server is root): less than the 192 MiB to copy.
    let fs_root = env.layout.pool.parent().unwrap().to_owned();
    let st = nix::sys::statvfs::statvfs(&fs_root).unwrap();
    let free = st.blocks_free() * st.fragment_size();
    let filler_path = fs_root.join("filler");
    let filler = std::fs::File::create(&filler_path).unwrap();
    nix::fcntl::fallocate(
        &filler,
        nix::fcntl::FallocateFlags::empty(),
        0,
        (free - 64 * MIB as u64) as i64,
    )
    .unwrap();
    drop(filler);

    let (first, failed) = copy_that_fails(&mut env, "nospace", &v.volume_id).await;
    assert_eq!(failed.code(), Code::ResourceExhausted, "{failed:?}");
    let snaps = std::fs::read_dir(env.layout.pool.join("snapshots/block"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(snaps, 0, "nothing of the failed copy is left");
    // `stowage status` tells the kept record from a copy running, and
    // says why it failed.
    assert_failed_copies(&env, &[(&first.snapshot_id, "nospace")]);
    // Another that fails, and is deleted: its ID is gone for good.
    let (gone, failed) = copy_that_fails(&mut env, "gone", &v.volume_id).await;
    assert_eq!(failed.code(), Code::ResourceExhausted, "{failed:?}");
    assert_failed_copies(
        &env,
        &[(&first.snapshot_id, "nospace"), (&gone.snapshot_id, "gone")],
    );
    // While its record cannot be removed, DeleteSnapshot is not OK; the
    // retry once it can is.
    env.delete_snapshot_once_its_record_can_go(&gone.snapshot_id)
        .await;

    // The plugin restarts (twice) before the CO asks again: the ID is
    // still the one the CO was given.
    for _ in 0..2 {
        env.restart_server().await;
    }
    // `stowage status` counts the kept record, and says it is not ready
    // and why (the restarts did not take it for a copy they cut short);
    // the deleted one is not counted at all.
    let (_, report) = env.status();
    assert_eq!(report["snapshots"], 1, "{report:#}");
    assert_eq!(report["snapshots_not_ready"], 1, "{report:#}");
    assert_failed_copies(&env, &[(&first.snapshot_id, "nospace")]);
    std::fs::remove_file(&filler_path).unwrap();
    let ready = snapshot_ready(&mut env, "nospace", &v.volume_id).await;
    let (_, report) = env.status();
    assert_eq!(report["snapshots_not_ready"], 0, "{report:#}");
    assert_failed_copies(&env, &[]);
    assert_eq!(
        ready.snapshot_id, first.snapshot_id,
        "the copy made anew keeps the ID the CO was given"
    );
    let listed = env
        .c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1, "{listed:?}");
    restore_holds_last_chunk(&mut env, "nospace-restore", &ready.snapshot_id, &chunk).await;
    let again = snapshot_ready(&mut env, "gone", &v.volume_id).await;
    assert_ne!(
        again.snapshot_id, gone.snapshot_id,
        "a deleted snapshot ID came back"
    );
}

/// `stowage status` lists exactly the snapshots `failed` (ID, name) as
/// copies failed for want of space, and no copy as running.
fn assert_failed_copies(env: &Env, failed: &[(&str, &str)]) {
    let (_, report) = env.status();
    let listed = report["failed_snapshots"].as_array().expect("a list");
    let mut got: Vec<(&str, &str)> = listed
        .iter()
        .map(|f| (f["id"].as_str().unwrap(), f["name"].as_str().unwrap()))
        .collect();
    got.sort();
    let mut want = failed.to_vec();
    want.sort();
    assert_eq!(got, want, "{report:#}");
    for f in listed {
        let why = f["error"].as_str().unwrap();
        assert!(why.contains("space"), "not why it failed: {why}");
    }
    assert_eq!(report["snapshots_copying"], 0, "{report:#}");
}

/// Starts a snapshot `name` of `volume` whose copy fails: its first answer
/// and the error a later CreateSnapshot reports (within 60 s).
async fn copy_that_fails(
    env: &mut Env,
    name: &str,
    volume: &str,
) -> (csi::Snapshot, tonic::Status) {
    let first = env
        .c
        .controller
        .create_snapshot(snap_req(name, volume))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(!first.ready_to_use);
    let start = Instant::now();
    loop {
        match env
            .c
            .controller
            .create_snapshot(snap_req(name, volume))
            .await
        {
            Ok(r) => {
                let s = r.into_inner().snapshot.unwrap();
                assert_eq!(s.snapshot_id, first.snapshot_id);
                assert!(!s.ready_to_use, "192 MiB cannot fit in 64 MiB");
            }
            Err(e) => return (first, e),
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the copy never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CreateSnapshot: idempotent by name and source; the name taken for
/// another source is ALREADY_EXISTS; missing fields are INVALID_ARGUMENT;
/// ListSnapshots filters and paginates; GetSnapshot/DeleteSnapshot of
/// unknown IDs follow the spec.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rpcs_follow_the_spec_table() {
    let mut env = Env::new("xfs").await;
    let a = env.create("a", "dir", 0).await;
    let b = env.create("b", "dir", 0).await;
    let s1 = snapshot_ready(&mut env, "s", &a.volume_id).await;
    let s2 = snapshot_ready(&mut env, "s", &a.volume_id).await;
    assert_eq!(s1.snapshot_id, s2.snapshot_id);
    assert_code(
        env.c
            .controller
            .create_snapshot(snap_req("s", &b.volume_id))
            .await,
        Code::AlreadyExists,
    );
    assert_code(
        env.c
            .controller
            .create_snapshot(snap_req("", &b.volume_id))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        env.c.controller.create_snapshot(snap_req("x", "")).await,
        Code::InvalidArgument,
    );
    assert_code(
        env.c
            .controller
            .create_snapshot(snap_req("x", "fake-vol"))
            .await,
        Code::NotFound,
    );
    let mut bad = snap_req("y", &b.volume_id);
    bad.parameters.insert("compress".into(), "yes".into());
    assert_code(
        env.c.controller.create_snapshot(bad).await,
        Code::InvalidArgument,
    );
    for i in 0..4 {
        snapshot_ready(&mut env, &format!("b{i}"), &b.volume_id).await;
    }
    let list = |env: &mut Env, req: csi::ListSnapshotsRequest| {
        let mut c = env.c.controller.clone();
        async move { c.list_snapshots(req).await }
    };
    let all = list(&mut env, Default::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    let page = list(
        &mut env,
        csi::ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(page.entries.len(), 2);
    let rest = list(
        &mut env,
        csi::ListSnapshotsRequest {
            starting_token: page.next_token,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(rest.entries.len(), 3);
    let by_source = list(
        &mut env,
        csi::ListSnapshotsRequest {
            source_volume_id: a.volume_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_source.entries.len(), 1);
    let by_id = list(
        &mut env,
        csi::ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let none = list(
        &mut env,
        csi::ListSnapshotsRequest {
            snapshot_id: "none-exist-id".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .into_inner();
    assert!(none.entries.is_empty());
    assert_code(
        list(
            &mut env,
            csi::ListSnapshotsRequest {
                starting_token: "bogus".into(),
                ..Default::default()
            },
        )
        .await,
        Code::Aborted,
    );
    let got = env
        .c
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap().source_volume_id, a.volume_id);
    assert_code(
        env.c
            .controller
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: "reallyfake".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
    );
    env.c
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: "reallyfakesnapshotid".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Restore: unknown snapshot NOT_FOUND; other backend INVALID_ARGUMENT;
    // smaller than the source OUT_OF_RANGE.
    assert_code(
        env.c
            .controller
            .create_volume(restore_req("r0", "dir", 0, "non-existing-snapshot-id"))
            .await,
        Code::NotFound,
    );
    assert_code(
        env.c
            .controller
            .create_volume(restore_req("r1", "raw", 8 * MIB, &s1.snapshot_id))
            .await,
        Code::InvalidArgument,
    );
    let blk = env.create("blk", "raw", 64 * MIB).await;
    let bs = snapshot_ready(&mut env, "blk-snap", &blk.volume_id).await;
    assert_code(
        env.c
            .controller
            .create_volume(restore_req("r2", "raw", 32 * MIB, &bs.snapshot_id))
            .await,
        Code::OutOfRange,
    );
    assert_code(
        env.c
            .controller
            .create_volume(clone_req("c0", "raw", 64 * MIB, "fake-vol-id"))
            .await,
        Code::NotFound,
    );
}

/// Restore and clone into a larger volume: the filesystem is grown on the
/// first stage; a clone of a published volume is consistent (its
/// filesystem is frozen for the copy).
#[tokio::test(flavor = "multi_thread")]
async fn clone_of_a_published_volume_into_a_larger_one() {
    let mut env = Env::new("xfs").await;
    let v = env.create("live", "xfs", 320 * MIB).await;
    let (s, t) = mount(&mut env, &v.volume_id, "xfs", "live").await;
    let data = pattern(5, 4 << 20);
    write_data("xfs", &t, &data);
    let c = env
        .c
        .controller
        .create_volume(clone_req("copy", "xfs", 640 * MIB, &v.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(c.capacity_bytes, 640 * MIB);
    // The source stays writable after the copy (thawed).
    write_data("xfs", &t, &pattern(6, 4 << 20));
    let staging = env.staging_dir("copy");
    let target = env.target_path("copy");
    env.c
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: c.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap_for("xfs")),
            volume_context: c.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    env.publish(&c.volume_id, "xfs", &staging, &target, false)
        .await
        .unwrap();
    assert!(read_data("xfs", &target, data.len()) == data);
    let total = nix::sys::statvfs::statvfs(&target).unwrap();
    let bytes = total.blocks() * total.fragment_size();
    assert!(
        bytes > 500 << 20,
        "filesystem was not grown to the larger volume: {bytes}"
    );
    unmount(&mut env, &c.volume_id, &staging, &target).await;
    unmount(&mut env, &v.volume_id, &s, &t).await;
}

/// ControllerExpandVolume + NodeExpandVolume grow a published xfs volume
/// and a raw block volume online; shrinking is OUT_OF_RANGE; repeating is
/// a no-op.
#[tokio::test(flavor = "multi_thread")]
async fn online_expansion_of_xfs_and_raw_block() {
    let mut env = Env::new("xfs").await;
    for kind in ["xfs", "raw"] {
        let v = env.create(&format!("grow-{kind}"), kind, 320 * MIB).await;
        let (s, t) = mount(&mut env, &v.volume_id, kind, &format!("grow-{kind}")).await;
        let expand = |env: &mut Env, size: i64| {
            let mut c = env.c.controller.clone();
            let id = v.volume_id.clone();
            async move {
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id,
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
            }
        };
        assert_code(expand(&mut env, 100 * MIB).await, Code::OutOfRange);
        let r = expand(&mut env, 1024 * MIB).await.unwrap().into_inner();
        assert_eq!(r.capacity_bytes, 1024 * MIB);
        assert!(r.node_expansion_required);
        expand(&mut env, 1024 * MIB).await.unwrap();
        for _ in 0..2 {
            let n = env
                .c
                .node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    volume_path: t.display().to_string(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(n.capacity_bytes, 1024 * MIB);
        }
        if kind == "raw" {
            let mut f = std::fs::File::open(&t).unwrap();
            assert_eq!(f.seek(SeekFrom::End(0)).unwrap() as i64, 1024 * MIB);
        } else {
            let st = nix::sys::statvfs::statvfs(&t).unwrap();
            assert!(st.blocks() * st.fragment_size() > 900 << 20);
            // Usable while grown: write past the old size.
            write_data(kind, &t, &pattern(3, 400 << 20));
        }
        assert_code(
            env.c
                .node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    volume_path: "some/path".into(),
                    ..Default::default()
                })
                .await,
            Code::NotFound,
        );
        unmount(&mut env, &v.volume_id, &s, &t).await;
    }
}

/// CreateVolumeGroupSnapshot: all members frozen and snapshotted together;
/// idempotent by name and volume set (another set: ALREADY_EXISTS); Get
/// and Delete per spec; a member cannot be deleted on its own; members
/// restore individually.
#[tokio::test(flavor = "multi_thread")]
async fn group_snapshots_follow_the_spec() {
    let mut env = Env::new("xfs").await;
    let mut g = env.c.group.clone();
    let a = env.create("ga", "ext4", 64 * MIB).await;
    let b = env.create("gb", "ext4", 64 * MIB).await;
    let (sa, ta) = mount(&mut env, &a.volume_id, "ext4", "ga").await;
    let (sb, tb) = mount(&mut env, &b.volume_id, "ext4", "gb").await;
    write_data("ext4", &ta, &pattern(21, 1 << 20));
    write_data("ext4", &tb, &pattern(22, 1 << 20));
    let req = |name: &str, ids: Vec<String>| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids,
        ..Default::default()
    };
    let both = vec![a.volume_id.clone(), b.volume_id.clone()];
    let first = g
        .create_volume_group_snapshot(req("grp", both.clone()))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(first.ready_to_use);
    assert_eq!(first.snapshots.len(), 2);
    for s in &first.snapshots {
        assert_eq!(s.group_snapshot_id, first.group_snapshot_id);
    }
    let again = g
        .create_volume_group_snapshot(req("grp", vec![b.volume_id.clone(), a.volume_id.clone()]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again.group_snapshot_id, first.group_snapshot_id);
    assert_code(
        g.create_volume_group_snapshot(req("grp", vec![a.volume_id.clone()]))
            .await,
        Code::AlreadyExists,
    );
    assert_code(
        g.create_volume_group_snapshot(req("", both.clone())).await,
        Code::InvalidArgument,
    );
    assert_code(
        g.create_volume_group_snapshot(req("x", vec![])).await,
        Code::InvalidArgument,
    );
    assert_code(
        g.create_volume_group_snapshot(req("y", vec!["fake-vol-id".into()]))
            .await,
        Code::NotFound,
    );
    let get = |id: &str| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        ..Default::default()
    };
    let got = g
        .get_volume_group_snapshot(get(&first.group_snapshot_id))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got.snapshots.len(), 2);
    assert_code(
        g.get_volume_group_snapshot(get("fake-vol-id")).await,
        Code::NotFound,
    );
    assert_code(
        g.get_volume_group_snapshot(get("")).await,
        Code::InvalidArgument,
    );
    // A member is deleted only with its group.
    assert_code(
        env.c
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: first.snapshots[0].snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    // Members restore one by one, with the data of the group's instant.
    write_data("ext4", &ta, &pattern(23, 1 << 20));
    let member_of_a = first
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == a.volume_id)
        .unwrap();
    let r = env
        .c
        .controller
        .create_volume(restore_req(
            "from-group",
            "ext4",
            64 * MIB,
            &member_of_a.snapshot_id,
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (sr, tr) = mount(&mut env, &r.volume_id, "ext4", "from-group").await;
    assert!(read_data("ext4", &tr, 1 << 20) == pattern(21, 1 << 20));
    unmount(&mut env, &r.volume_id, &sr, &tr).await;
    let del = |id: &str, members: Vec<String>| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    };
    assert_code(
        g.delete_volume_group_snapshot(del(&first.group_snapshot_id, vec!["snap:nope".into()]))
            .await,
        Code::InvalidArgument,
    );
    let members: Vec<String> = first
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    g.delete_volume_group_snapshot(del(&first.group_snapshot_id, members.clone()))
        .await
        .unwrap();
    g.delete_volume_group_snapshot(del(&first.group_snapshot_id, members))
        .await
        .unwrap();
    g.delete_volume_group_snapshot(del("fake-vol-id", vec![]))
        .await
        .unwrap();
    let left = env
        .c
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(left.entries.is_empty());
    unmount(&mut env, &a.volume_id, &sa, &ta).await;
    unmount(&mut env, &b.volume_id, &sb, &tb).await;
}

/// GetMetadataDelta: "the ranges that differ between two snapshots of the
/// same volume": after writing known 64 KiB ranges between two snapshots,
/// the delta is exactly those ranges; GetMetadataAllocated covers what was
/// written; starting_offset and max_results page the stream.
async fn cbt_exact(pool: &str) {
    use stowage::csi::snapshot_metadata_client::SnapshotMetadataClient;
    let mut env = Env::with_args(pool, pool_args(pool)).await;
    let v = env.create("cbt", "raw", 64 * MIB).await;
    let (s, t) = mount(&mut env, &v.volume_id, "raw", "cbt").await;
    let write_at = |offsets: &[u64], seed: u64| {
        let mut f = std::fs::OpenOptions::new().write(true).open(&t).unwrap();
        for (i, o) in offsets.iter().enumerate() {
            f.seek(SeekFrom::Start(*o)).unwrap();
            f.write_all(&pattern(seed + i as u64, 64 << 10)).unwrap();
        }
        f.sync_all().unwrap();
    };
    const K: u64 = 64 << 10;
    write_at(&[0, 16 * K, 100 * K], 1);
    let s1 = snapshot_ready(&mut env, "cbt-1", &v.volume_id).await;
    let changed = [16 * K, 17 * K, 500 * K, 900 * K];
    write_at(&changed, 50);
    let s2 = snapshot_ready(&mut env, "cbt-2", &v.volume_id).await;
    let channel = stowage::client::channel(&format!("unix://{}", env.layout.socket.display()))
        .await
        .unwrap();
    let mut m = SnapshotMetadataClient::new(channel);
    let collect_delta =
        |m: &mut SnapshotMetadataClient<tonic::transport::Channel>, offset: i64, max: i32| {
            let mut m = m.clone();
            let (a, b) = (s1.snapshot_id.clone(), s2.snapshot_id.clone());
            async move {
                let mut stream = m
                    .get_metadata_delta(csi::GetMetadataDeltaRequest {
                        base_snapshot_id: a,
                        target_snapshot_id: b,
                        starting_offset: offset,
                        max_results: max,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let mut ranges = Vec::new();
                let mut responses = 0;
                while let Some(r) = stream.message().await.unwrap() {
                    responses += 1;
                    assert_eq!(r.volume_capacity_bytes, 64 * MIB);
                    assert!(max == 0 || r.block_metadata.len() <= max as usize);
                    ranges.extend(
                        r.block_metadata
                            .iter()
                            .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
                    );
                }
                (ranges, responses)
            }
        };
    let (delta, _) = collect_delta(&mut m, 0, 0).await;
    // Merge adjacent ranges before comparing.
    let merge = |v: Vec<(u64, u64)>| {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l) in v {
            match out.last_mut() {
                Some((s, len)) if *s + *len == o => *len += l,
                _ => out.push((o, l)),
            }
        }
        out
    };
    assert_eq!(
        merge(delta),
        vec![(16 * K, 2 * K), (500 * K, K), (900 * K, K)],
        "delta is not exact"
    );
    let (paged, responses) = collect_delta(&mut m, (17 * K) as i64, 1).await;
    assert_eq!(merge(paged), vec![(17 * K, K), (500 * K, K), (900 * K, K)]);
    assert!(responses >= 3);
    let mut alloc = m
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: s2.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut covered = Vec::new();
    while let Some(r) = alloc.message().await.unwrap() {
        covered.extend(
            r.block_metadata
                .iter()
                .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
        );
    }
    for o in [0, 16 * K, 17 * K, 100 * K, 500 * K, 900 * K] {
        assert!(
            covered.iter().any(|(s, l)| *s <= o && o + K <= s + l),
            "allocated ranges miss {o}: {covered:?}"
        );
    }
    assert_code(
        m.get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "nope".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    assert_code(
        m.get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: s1.snapshot_id.clone(),
            starting_offset: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    unmount(&mut env, &v.volume_id, &s, &t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_blocks_are_exact_on_xfs_reflink_pool() {
    cbt_exact("xfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_blocks_are_exact_on_ext4_copy_pool() {
    cbt_exact("ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_blocks_are_exact_on_btrfs_pool() {
    cbt_exact("btrfs").await;
}

/// ControllerModifyVolume / mutable_parameters: `provisioning=thick`
/// reserves the whole size (GetCapacity falls by it), thin is the default,
/// unknown or inapplicable keys are INVALID_ARGUMENT, a reservation the
/// pool cannot hold is RESOURCE_EXHAUSTED and leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn thick_provisioning_reserves_space() {
    let mut env = Env::new("xfs").await;
    let free = |env: &mut Env| {
        let mut c = env.c.controller.clone();
        async move {
            c.get_capacity(csi::GetCapacityRequest::default())
                .await
                .unwrap()
                .into_inner()
                .available_capacity
        }
    };
    let before = free(&mut env).await;
    let mut r = create_req("thick", "raw", 512 * MIB);
    r.mutable_parameters
        .insert("provisioning".into(), "thick".into());
    let v = env
        .c
        .controller
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        v.volume_context
            .get("stowage.csi.dev/provisioning")
            .map(String::as_str),
        Some("thick")
    );
    let after = free(&mut env).await;
    assert!(
        before - after >= 500 * MIB,
        "thick volume reserved only {}",
        before - after
    );
    let modify = |id: &str, k: &str, val: &str| csi::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: [(k.to_owned(), val.to_owned())].into(),
        ..Default::default()
    };
    env.c
        .controller
        .controller_modify_volume(modify(&v.volume_id, "provisioning", "thin"))
        .await
        .unwrap();
    env.c
        .controller
        .controller_modify_volume(modify(&v.volume_id, "provisioning", "thick"))
        .await
        .unwrap();
    assert_code(
        env.c
            .controller
            .controller_modify_volume(modify(&v.volume_id, "XXX_FakeKey", "x"))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        env.c
            .controller
            .controller_modify_volume(modify(&v.volume_id, "provisioning", "fat"))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        env.c
            .controller
            .controller_modify_volume(modify("non-existing-volume-id", "provisioning", "thin"))
            .await,
        Code::NotFound,
    );
    let d = env.create("d", "dir", 0).await;
    assert_code(
        env.c
            .controller
            .controller_modify_volume(modify(&d.volume_id, "provisioning", "thick"))
            .await,
        Code::InvalidArgument,
    );
    let mut huge = create_req("huge", "raw", 64 * GIB);
    huge.mutable_parameters
        .insert("provisioning".into(), "thick".into());
    assert_code(
        env.c.controller.create_volume(huge).await,
        Code::ResourceExhausted,
    );
    let images = std::fs::read_dir(env.layout.pool.join("volumes/block"))
        .unwrap()
        .count();
    assert_eq!(images, 1, "a failed thick create left its image behind");
}

/// Dir volume capacity is enforced where the pool can (btrfs qgroups) and
/// reported as not enforced where it cannot; growing the volume raises the
/// limit.
async fn dir_capacity(fs: &str, mount_data: &str, enforced: bool) {
    let mut env = Env::with_pool(fs, mount_data, pool_args(fs)).await;
    let v = env.create("q", "dir", 16 * MIB).await;
    assert_eq!(
        v.volume_context
            .get("stowage.csi.dev/capacity-enforced")
            .map(String::as_str),
        Some(if enforced { "true" } else { "false" })
    );
    let (s, t) = mount(&mut env, &v.volume_id, "dir", "q").await;
    let write = |name: &str, mib: usize| -> std::io::Result<()> {
        let mut f = std::fs::File::create(t.join(name))?;
        let chunk = pattern(7, 1 << 20);
        for _ in 0..mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    };
    let r = write("big", 32);
    if enforced {
        let e = r.expect_err("wrote 32 MiB into a 16 MiB volume");
        assert!(
            matches!(e.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC)),
            "{e}"
        );
        std::fs::remove_file(t.join("big")).unwrap();
        nix::unistd::sync();
        env.c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 64 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        write("big", 32).expect("the grown volume holds 32 MiB");
    } else {
        r.expect("an unenforced dir volume is limited only by the pool");
    }
    unmount(&mut env, &v.volume_id, &s, &t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dir_capacity_enforced_by_btrfs_qgroups() {
    dir_capacity("btrfs", "", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dir_capacity_reported_unenforced_on_xfs() {
    dir_capacity("xfs", "", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dir_capacity_reported_unenforced_on_plain_ext4() {
    dir_capacity("ext4", "", false).await;
}

/// ext4 expansion: a volume grown while unstaged is grown offline on its
/// next stage (no CAP_SYS_RESOURCE needed) with its data intact, and
/// NodeExpandVolume then has nothing left to do; the csi-sanity order
/// (expand before first stage, then NodeExpand after publish) succeeds.
/// Growing a *mounted* ext4 needs CAP_SYS_RESOURCE: without it the answer
/// is FAILED_PRECONDITION, with it the filesystem grows.
#[tokio::test(flavor = "multi_thread")]
async fn ext4_expansion_offline_on_stage_and_online_where_permitted() {
    let mut env = Env::new("xfs").await;
    let expand = |env: &mut Env, id: String, size: i64| {
        let mut c = env.c.controller.clone();
        async move {
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: size,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let node_expand = |env: &mut Env, id: String, path: &Path| {
        let mut n = env.c.node.clone();
        let path = path.display().to_string();
        async move {
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id,
                volume_path: path,
                ..Default::default()
            })
            .await
        }
    };
    let size_of = |p: &Path| {
        let st = nix::sys::statvfs::statvfs(p).unwrap();
        st.blocks() * st.fragment_size()
    };
    // Grown while unstaged.
    let v = env.create("e", "ext4", 256 * MIB).await;
    let (s, t) = mount(&mut env, &v.volume_id, "ext4", "e").await;
    write_data("ext4", &t, &pattern(4, 1 << 20));
    let small = size_of(&t);
    unmount(&mut env, &v.volume_id, &s, &t).await;
    assert_eq!(
        expand(&mut env, v.volume_id.clone(), 512 * MIB)
            .await
            .capacity_bytes,
        512 * MIB
    );
    let (s, t) = mount(&mut env, &v.volume_id, "ext4", "e").await;
    assert!(
        size_of(&t) > small + 200 * (1 << 20),
        "ext4 was not grown on stage"
    );
    assert!(read_data("ext4", &t, 1 << 20) == pattern(4, 1 << 20));
    node_expand(&mut env, v.volume_id.clone(), &t)
        .await
        .unwrap();
    // Grown while mounted.
    expand(&mut env, v.volume_id.clone(), 768 * MIB).await;
    let caps = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let online = node_expand(&mut env, v.volume_id.clone(), &t).await;
    if eff & (1 << 24) == 0 {
        assert_code(online, Code::FailedPrecondition);
    } else {
        online.unwrap();
        assert!(size_of(&t) > 700 << 20);
    }
    unmount(&mut env, &v.volume_id, &s, &t).await;
    // The csi-sanity order: expand before the first stage.
    let w = env.create("sanity-order", "ext4", 256 * MIB).await;
    expand(&mut env, w.volume_id.clone(), 512 * MIB).await;
    let (s2, t2) = mount(&mut env, &w.volume_id, "ext4", "sanity-order").await;
    node_expand(&mut env, w.volume_id.clone(), &t2)
        .await
        .unwrap();
    assert!(size_of(&t2) > 400 << 20);
    unmount(&mut env, &w.volume_id, &s2, &t2).await;
}

/// Online expansion "while the volume is in use": a writer keeps writing
/// and syncing through the published xfs volume while the controller and
/// node expand it; every byte it wrote reads back afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn online_expansion_with_io_running() {
    let mut env = Env::new("xfs").await;
    let v = env.create("busy-grow", "xfs", 320 * MIB).await;
    let (s, t) = mount(&mut env, &v.volume_id, "xfs", "busy-grow").await;
    let file = t.join("stream");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let file = file.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&file).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                f.write_all(&pattern(n, 1 << 20)).unwrap();
                f.sync_data().unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1024 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    env.c
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: t.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(written > 0);
    let back = std::fs::read(&file).unwrap();
    assert_eq!(back.len() as u64, written << 20);
    for (i, chunk) in back.chunks(1 << 20).enumerate() {
        assert!(
            chunk == pattern(i as u64, 1 << 20).as_slice(),
            "chunk {i} changed"
        );
    }
    let st = nix::sys::statvfs::statvfs(&t).unwrap();
    assert!(st.blocks() * st.fragment_size() > 900 << 20);
    unmount(&mut env, &v.volume_id, &s, &t).await;
}

/// "A staged block volume's filesystem is frozen (FIFREEZE/FITHAW) around
/// the snapshot": a snapshot of a mounted, busy ext4 is a clean filesystem
/// (freezing flushes the journal and clears needs_recovery), and the
/// source is writable again afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_of_a_mounted_filesystem_is_clean() {
    let mut env = Env::new("xfs").await;
    let v = env.create("busy", "ext4", 128 * MIB).await;
    let (s, t) = mount(&mut env, &v.volume_id, "ext4", "busy").await;
    // Dirty the journal without syncing.
    for i in 0..64 {
        std::fs::write(t.join(format!("f{i}")), pattern(i, 16 << 10)).unwrap();
    }
    let snap = snapshot_ready(&mut env, "clean", &v.volume_id).await;
    let uuid = snap.snapshot_id.rsplit(':').next().unwrap().to_owned();
    let image = env.layout.pool.join(format!("snapshots/block/{uuid}.img"));
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let features = text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .expect("dumpe2fs printed the features");
    assert!(
        !features.contains("needs_recovery"),
        "snapshot was taken unfrozen: {features}"
    );
    std::fs::write(t.join("after"), b"thawed").unwrap();
    unmount(&mut env, &v.volume_id, &s, &t).await;
}
