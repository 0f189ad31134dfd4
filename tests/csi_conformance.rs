//! The CSI conformance suite: a real `stowage serve` on a unix socket,
//! driven over gRPC, with real mounts, loop devices and filesystems. Each
//! test names the clause of the CSI v1.12 specification it checks.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;

use common::*;
use stowage::csi;

/// Full lifecycle for `kind` with data checks: "NodeStageVolume /
/// NodePublishVolume ... the SP SHALL place the mounted directory (or
/// block device) at target_path".
async fn lifecycle(fs: &str, kind: &str) {
    let mut env = Env::new(fs).await;
    let vol = env.create("vol-a", kind, 64 * MIB).await;
    let id = vol.volume_id.clone();
    let staging = env.staging_dir("a");
    let target = env.target_path("a");
    env.stage(&id, kind, &staging).await.unwrap();
    env.publish(&id, kind, &staging, &target, false)
        .await
        .unwrap();
    let data = pattern(7, 1 << 20);
    if kind == "raw" {
        let md = std::fs::metadata(&target).unwrap();
        assert!(
            md.file_type().is_block_device(),
            "raw target is not a block device"
        );
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let size = f.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(size as i64, vol.capacity_bytes);
    } else {
        std::fs::write(target.join("data"), &data).unwrap();
    }
    env.unpublish(&id, &target).await.unwrap();
    assert!(
        !target.exists(),
        "NodeUnpublish must remove the target it created"
    );
    env.unstage(&id, &staging).await.unwrap();
    assert!(!is_mounted(&staging));
    assert!(
        loops_under(&env.layout.pool).is_empty(),
        "loop device left after unstage"
    );

    // Stage and publish again: the data is still there.
    env.stage(&id, kind, &staging).await.unwrap();
    env.publish(&id, kind, &staging, &target, false)
        .await
        .unwrap();
    let mut back = vec![0u8; data.len()];
    if kind == "raw" {
        std::fs::File::open(&target)
            .unwrap()
            .read_exact(&mut back)
            .unwrap();
    } else {
        back = std::fs::read(target.join("data")).unwrap();
    }
    assert!(back == data, "data changed across unpublish/unstage");
    env.unpublish(&id, &target).await.unwrap();
    env.unstage(&id, &staging).await.unwrap();
    env.delete(&id).await.unwrap();
    assert!(loops_under(&env.scratch.root.join("pool-fs")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_dir_volume_on_xfs_pool() {
    lifecycle("xfs", "dir").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_block_ext4_volume_on_xfs_pool() {
    lifecycle("xfs", "ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_raw_block_volume_on_ext4_pool() {
    lifecycle("ext4", "raw").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_get_plugin_info_reports_name_and_version() {
    let mut env = Env::new("ext4").await;
    let info = env
        .c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "stowage.csi.dev");
    assert!(info.vendor_version.starts_with(env!("CARGO_PKG_VERSION")));
    assert!(info.vendor_version.contains('+'));
}
