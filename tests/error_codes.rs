//! The gRPC codes of failures that depend on the machine rather than the
//! request, checked against a real server on real pools: a full pool is
//! RESOURCE_EXHAUSTED (gRPC: "the entire file system is out of space"; the
//! CO retries), a volume larger than the pool's filesystem allows is
//! OUT_OF_RANGE (CSI: "Unsupported capacity"), a mount still in use is
//! ABORTED (retry later), and the fields CSI v1.12 marks REQUIRED are
//! INVALID_ARGUMENT when missing.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use stowage::backend::backend_dir;
use stowage::csi;
use stowage::volume::{BackendKind, VolumeId};
use tonic::Code;

/// Fills the filesystem holding `dir` with one file, written as root (so
/// into the reserved blocks too) until the filesystem answers ENOSPC, and
/// returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096] {
        let buf = vec![0xA5u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("fill {}: {e}", path.display()),
            }
        }
    }
    let _ = f.sync_all();
    path
}

/// The filesystem the pool (and the server's state) lives on.
fn pool_fs(env: &Env) -> PathBuf {
    env.layout.pool.parent().unwrap().to_owned()
}

fn uuid_hex(volume_id: &str) -> String {
    VolumeId::parse(volume_id).unwrap().uuid.to_hex()
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    match r {
        Ok(v) => panic!("expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

fn clone_req(name: &str, kind: &str, source: &str) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, kind, 0);
    r.capacity_range = None;
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: source.into(),
            },
        )),
    });
    r
}

/// NodeStage of a fresh block volume on a full pool: mkfs cannot write
/// (mkfs.xfs sees ENOSPC, mkfs.ext4 an I/O error), and the answer is
/// RESOURCE_EXHAUSTED naming the full pool, not INTERNAL. Nothing is left
/// mounted or attached, and once space is freed the CO's retry stages.
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_on_a_full_pool_is_resource_exhausted() {
    let mut env = Env::with_pool_size("ext4", "", 256 << 20, &["--pool-image", "never"]).await;
    let mut vols = Vec::new();
    for fs in ["ext4", "xfs"] {
        let v = env.create(&format!("full-{fs}"), fs, GIB).await;
        vols.push((fs, v.volume_id));
    }
    // The server's state shares the pool's filesystem (as by default): a
    // stage and unstage first lets its node log take its first (zeroed,
    // allocated) chunk, so the full pool meets mkfs and not that log.
    let warm = env.create("warm", "dir", 0).await;
    let staging = env.staging_dir("warm");
    env.stage(&warm.volume_id, "dir", &staging).await.unwrap();
    env.unstage(&warm.volume_id, &staging).await.unwrap();
    let filler = fill(&pool_fs(&env));
    for (fs, id) in &vols {
        let staging = env.staging_dir(fs);
        let s = expect_code(env.stage(id, fs, &staging).await, Code::ResourceExhausted);
        assert!(
            s.message().contains("out of space") && s.message().contains(&uuid_hex(id)),
            "{s:?}"
        );
        assert!(!is_mounted(&staging));
    }
    assert!(loops_under(&env.layout.pool).is_empty());

    std::fs::remove_file(&filler).unwrap();
    for (fs, id) in &vols {
        let staging = env.staging_dir(fs);
        env.stage(id, fs, &staging).await.unwrap();
        assert!(is_mounted(&staging));
        env.unstage(id, &staging).await.unwrap();
    }
}

/// The same on an ext4 pool kept in an xfs pool image (`--pool-image
/// auto`): the host filesystem fills while the xfs inside the image still
/// counts free blocks of its own. mkfs's failure is traced through the
/// image to its full host: RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_on_a_full_pool_image_host_is_resource_exhausted() {
    let mut env = Env::with_pool_size("ext4", "", 1 << 30, &["--pool-image", "auto"]).await;
    assert!(
        stowage::os::pool_image::image_path(&env.layout.pool).is_file(),
        "no pool image: {}",
        env.server.log_text()
    );
    let v = env.create("full-host", "ext4", GIB).await;
    let warm = env.create("warm", "dir", 0).await;
    let staging = env.staging_dir("warm");
    env.stage(&warm.volume_id, "dir", &staging).await.unwrap();
    env.unstage(&warm.volume_id, &staging).await.unwrap();
    let filler = fill(&pool_fs(&env));
    let staging = env.staging_dir("full-host");
    let s = expect_code(
        env.stage(&v.volume_id, "ext4", &staging).await,
        Code::ResourceExhausted,
    );
    assert!(s.message().contains("out of space"), "{s:?}");
    assert!(!is_mounted(&staging));
    std::fs::remove_file(&filler).unwrap();
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// NodeExpandVolume on a full pool: growing the filesystem writes new
/// metadata through the loop device and fails (the errno reaches
/// xfs_growfs only as its text); the answer is RESOURCE_EXHAUSTED, the filesystem
/// keeps working at its old size, and once space is freed the CO's retry
/// grows it.
#[tokio::test(flavor = "multi_thread")]
async fn node_expand_on_a_full_pool_is_resource_exhausted() {
    let mut env = Env::with_pool_size("ext4", "", 640 << 20, &["--pool-image", "never"]).await;
    let v = env.create("grow", "xfs", 320 * MIB).await;
    let staging = env.staging_dir("grow");
    let target = env.target_path("grow");
    env.stage(&v.volume_id, "xfs", &staging).await.unwrap();
    env.publish(&v.volume_id, "xfs", &staging, &target, false)
        .await
        .unwrap();
    let expand = |env: &mut Env| {
        let mut c = env.c.clone();
        let id = v.volume_id.clone();
        let path = target.display().to_string();
        async move {
            c.node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: id,
                    volume_path: path,
                    ..Default::default()
                })
                .await
        }
    };
    let filler = fill(&pool_fs(&env));
    env.c
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let s = expect_code(expand(&mut env).await, Code::ResourceExhausted);
    assert!(s.message().contains("out of space"), "{s:?}");
    let size = || stowage::os::fs::usage(&target).unwrap().total_bytes;
    assert!(size() < 320 << 20, "{}", size());

    std::fs::remove_file(&filler).unwrap();
    expand(&mut env).await.unwrap();
    assert!(size() > 900 << 20, "{}", size());
    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// A clone on a full ext4 pool (sparse copies: copy_file_range answers
/// ENOSPC) is RESOURCE_EXHAUSTED, for block and dir volumes alike, and
/// leaves no partial copy behind.
#[tokio::test(flavor = "multi_thread")]
async fn clone_on_a_full_pool_is_resource_exhausted() {
    let mut env = Env::with_pool_size("ext4", "", 256 << 20, &["--pool-image", "never"]).await;
    let data = pattern(3, 48 << 20);
    let block = env.create("src-block", "raw", 64 * MIB).await;
    let image = backend_dir(&env.layout.pool, BackendKind::Block)
        .join(format!("{}.img", uuid_hex(&block.volume_id)));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let dir = env.create("src-dir", "dir", 64 * MIB).await;
    let root = backend_dir(&env.layout.pool, BackendKind::Dir).join(uuid_hex(&dir.volume_id));
    std::fs::write(root.join("data.bin"), &data).unwrap();
    let before = |kind| {
        std::fs::read_dir(backend_dir(&env.layout.pool, kind))
            .unwrap()
            .count()
    };
    let counts = (before(BackendKind::Block), before(BackendKind::Dir));

    let filler = fill(&pool_fs(&env));
    for (name, kind, source) in [
        ("clone-block", "raw", &block.volume_id),
        ("clone-dir", "dir", &dir.volume_id),
    ] {
        let s = expect_code(
            env.c
                .controller
                .create_volume(clone_req(name, kind, source))
                .await,
            Code::ResourceExhausted,
        );
        assert!(s.message().contains("No space left"), "{s:?}");
    }
    assert_eq!(
        (before(BackendKind::Block), before(BackendKind::Dir)),
        counts,
        "a failed clone left storage behind"
    );

    // A snapshot is copied in the background on this pool; the copy that
    // runs out of space is reported by the next CreateSnapshot of its name.
    let start = Instant::now();
    let s = loop {
        let r = env
            .c
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: block.volume_id.clone(),
                name: "snap-full".into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => assert!(
                !r.into_inner().snapshot.unwrap().ready_to_use,
                "a snapshot was copied into a full pool"
            ),
            Err(s) => break s,
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the failed copy was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    std::fs::remove_file(&filler).unwrap();
    for (name, kind, source) in [
        ("clone-block", "raw", &block.volume_id),
        ("clone-dir", "dir", &dir.volume_id),
    ] {
        env.c
            .controller
            .create_volume(clone_req(name, kind, source))
            .await
            .unwrap();
    }
}

/// A block volume larger than the largest file of the pool's filesystem
/// (ext4 with 4 KiB blocks: 16 TiB) is OUT_OF_RANGE — "Unsupported
/// capacity" — naming that limit, both on CreateVolume and on
/// ControllerExpandVolume; nothing is created and the volume keeps its
/// size.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_beyond_the_pools_file_size_limit_is_out_of_range() {
    // Images directly on ext4 (an xfs pool image allows 8 EiB files).
    let mut env = Env::with_args("ext4", &["--pool-image", "never"]).await;
    let huge = 100i64 << 40;
    let s = expect_code(
        env.c
            .controller
            .create_volume(create_req("huge", "raw", huge))
            .await,
        Code::OutOfRange,
    );
    assert!(
        s.message().contains("ext4") && s.message().contains("16.0 TiB"),
        "{s:?}"
    );
    let images = || {
        std::fs::read_dir(backend_dir(&env.layout.pool, BackendKind::Block))
            .unwrap()
            .count()
    };
    assert_eq!(images(), 0, "a refused create left an image");

    let v = env.create("small", "raw", 64 * MIB).await;
    let s = expect_code(
        env.c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: huge,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
    );
    assert!(
        s.message().contains("ext4") && s.message().contains("16.0 TiB"),
        "{s:?}"
    );
    let got = env
        .c
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
    let image = backend_dir(&env.layout.pool, BackendKind::Block)
        .join(format!("{}.img", uuid_hex(&v.volume_id)));
    assert_eq!(std::fs::metadata(image).unwrap().len(), 64 << 20);
}

/// ControllerModifyVolume: "mutable_parameters ... This field is
/// REQUIRED": a request without it is INVALID_ARGUMENT, for an existing
/// volume and (checked before any lookup) for an unknown one.
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume_without_mutable_parameters_is_invalid_argument() {
    let mut env = Env::new("ext4").await;
    let v = env.create("mod", "raw", 64 * MIB).await;
    for id in [v.volume_id.as_str(), "no-such-volume"] {
        expect_code(
            env.c
                .controller
                .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                    volume_id: id.into(),
                    secrets: HashMap::new(),
                    mutable_parameters: HashMap::new(),
                })
                .await,
            Code::InvalidArgument,
        );
    }
}

/// NodePublishVolume: staging_target_path "MUST be set if the Node Plugin
/// implements the STAGE_UNSTAGE_VOLUME node capability", which stowage
/// advertises. The spec's error table has the row for its absence:
/// "Staging target path not set", FAILED_PRECONDITION. Nothing is created
/// at the target.
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_without_staging_target_path_is_failed_precondition() {
    let mut env = Env::new("ext4").await;
    let v = env.create("pub", "dir", 0).await;
    let staging = env.staging_dir("pub");
    env.stage(&v.volume_id, "dir", &staging).await.unwrap();
    let target = env.target_path("pub");
    let s = expect_code(
        env.c
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: String::new(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap_for("dir")),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("staging_target_path"), "{s:?}");
    assert!(!target.exists());
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// NodeUnpublish and NodeUnstage of a mount something still uses (a
/// snapshot copy reading the volume, a process with a file open: unmount
/// answers EBUSY) are ABORTED, so the CO retries; the retry after the user
/// is gone succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn unmounting_a_busy_mount_is_aborted() {
    let mut env = Env::new("ext4").await;
    let v = env.create("busy", "ext4", 64 * MIB).await;
    let staging = env.staging_dir("busy");
    let target = env.target_path("busy");
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.publish(&v.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();

    let user = std::fs::File::create(target.join("open")).unwrap();
    let s = expect_code(env.unpublish(&v.volume_id, &target).await, Code::Aborted);
    assert!(s.message().contains(&target.display().to_string()), "{s:?}");
    assert!(is_mounted(&target));
    drop(user);
    env.unpublish(&v.volume_id, &target).await.unwrap();

    let user = std::fs::File::open(staging.join("open")).unwrap();
    let s = expect_code(env.unstage(&v.volume_id, &staging).await, Code::Aborted);
    assert!(
        s.message().contains(&staging.display().to_string()),
        "{s:?}"
    );
    assert!(is_mounted(&staging));
    drop(user);
    env.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(!is_mounted(&staging));
    assert!(loops_under(&env.layout.pool).is_empty());
}

/// A volume staged read-only (a reader access mode) cannot be published
/// for writing: FAILED_PRECONDITION, nothing made at the target. Before,
/// the publication answered OK and was read-only anyway (its bind inherits
/// the staging's read-only mount), with a record saying read-write. A
/// read-only publication of it works.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_staged_read_only_is_not_published_for_writing() {
    let mut env = Env::new("ext4").await;
    for kind in ["dir", "ext4"] {
        let name = format!("ro-{kind}");
        let v = env.create(&name, kind, 64 * MIB).await;
        let staging = env.staging_dir(&name);
        let fs = if kind == "dir" { "" } else { kind };
        let stage_ro = || csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap(fs, Mode::SingleNodeReaderOnly)),
            ..Default::default()
        };
        if kind != "dir" {
            // Never staged: no filesystem yet, which a read-only stage
            // cannot make (it was INTERNAL, mkfs's EPERM).
            let s = expect_code(
                env.c.node.node_stage_volume(stage_ro()).await,
                Code::FailedPrecondition,
            );
            assert!(s.message().contains("no filesystem yet"), "{s:?}");
            env.stage(&v.volume_id, kind, &staging).await.unwrap();
            env.unstage(&v.volume_id, &staging).await.unwrap();
        }
        env.c.node.node_stage_volume(stage_ro()).await.unwrap();
        let target = env.target_path(&name);
        let publish = |mode: Mode, readonly: bool| csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(fs, mode)),
            readonly,
            ..Default::default()
        };
        let s = expect_code(
            env.c
                .node
                .node_publish_volume(publish(Mode::SingleNodeWriter, false))
                .await,
            Code::FailedPrecondition,
        );
        assert!(s.message().contains("staged read-only"), "{s:?}");
        assert!(!target.exists(), "{kind}: the target was made");
        env.c
            .node
            .node_publish_volume(publish(Mode::SingleNodeWriter, true))
            .await
            .unwrap();
        let e = std::fs::write(target.join("f"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{kind}: {e}");
        env.unpublish(&v.volume_id, &target).await.unwrap();
        env.unstage(&v.volume_id, &staging).await.unwrap();
    }
}
