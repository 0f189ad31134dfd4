//! The CSI conformance suite: a real `stowage serve` on a unix socket,
//! driven over gRPC, with real mounts, loop devices and filesystems. Each
//! test names the clause of the CSI v1.12 specification it checks.

#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;

use common::*;
use stowage::csi;
use tonic::Code;

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

// ---------------------------------------------------------------- Identity

/// GetPluginCapabilities: "CONTROLLER_SERVICE ... VOLUME_ACCESSIBILITY_CONSTRAINTS".
#[tokio::test(flavor = "multi_thread")]
async fn identity_capabilities_include_controller_and_topology() {
    use csi::plugin_capability::service::Type;
    let mut env = Env::new("ext4").await;
    let caps = env
        .c
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let types: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(types.contains(&(Type::ControllerService as i32)));
    assert!(types.contains(&(Type::VolumeAccessibilityConstraints as i32)));
}

/// Probe: "ready ... the plugin is in a state where it can serve requests";
/// a pool whose filesystem went read-only is not ready.
#[tokio::test(flavor = "multi_thread")]
async fn identity_probe_not_ready_when_state_is_unwritable() {
    let mut env = Env::new("ext4").await;
    let ready = |r: csi::ProbeResponse| r.ready;
    let r = env
        .c
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready(r), Some(true));
    let pool_fs = env.scratch.root.join("pool-fs");
    nix::mount::mount(
        None::<&str>,
        &pool_fs,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let r = env
        .c
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready(r), Some(false));
    assert!(env.server.log_text().contains("not ready"));
}

// -------------------------------------------------------------- CreateVolume

/// CreateVolume: "name ... This field is REQUIRED"; "volume_capabilities
/// ... This field is REQUIRED" → INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_missing_name_or_capabilities_is_invalid_argument() {
    let mut env = Env::new("ext4").await;
    let mut r = create_req("", "ext4", MIB);
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    r.name = "x".into();
    r.volume_capabilities.clear();
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    r.volume_capabilities = vec![csi::VolumeCapability {
        access_mode: None,
        access_type: cap_for("ext4").access_type,
    }];
    assert_code(
        env.c.controller.create_volume(r).await,
        Code::InvalidArgument,
    );
}

/// CreateVolume idempotency: "if a volume corresponding to the specified
/// volume name already exists ... and is compatible ... the Plugin MUST
/// reply 0 OK" with the same volume; incompatible → ALREADY_EXISTS.
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_is_idempotent_by_name_and_conflicts_are_already_exists() {
    let mut env = Env::new("xfs").await;
    let a = env.create("same", "ext4", 100 * MIB).await;
    let b = env.create("same", "ext4", 100 * MIB).await;
    assert_eq!(a.volume_id, b.volume_id);
    assert_eq!(a.capacity_bytes, b.capacity_bytes);
    // Larger required size than the existing volume: incompatible.
    assert_code(
        env.c
            .controller
            .create_volume(create_req("same", "ext4", 200 * MIB))
            .await,
        Code::AlreadyExists,
    );
    // Other backend: incompatible.
    assert_code(
        env.c
            .controller
            .create_volume(create_req("same", "dir", 100 * MIB))
            .await,
        Code::AlreadyExists,
    );
    // Other filesystem: incompatible.
    assert_code(
        env.c
            .controller
            .create_volume(create_req("same", "xfs", 400 * MIB))
            .await,
        Code::AlreadyExists,
    );
    let list = env
        .c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
}

/// CreateVolume: "capacity_range ... OUT_OF_RANGE: Indicates that the
/// capacity range is not allowed by the Plugin"; sizes round up to the
/// backend's granularity but never past the limit.
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_rounds_capacity_and_honours_limit() {
    let mut env = Env::new("ext4").await;
    let v = env.create("round", "raw", 5 * MIB + 1).await;
    assert_eq!(v.capacity_bytes, 6 * MIB);
    let img_len = std::fs::metadata(
        env.layout
            .pool
            .join("volumes/block")
            .join(format!("{}.img", v.volume_id.rsplit(':').next().unwrap())),
    )
    .unwrap()
    .len();
    assert_eq!(
        img_len as i64,
        6 * MIB,
        "image size matches reported capacity"
    );
    let mut r = create_req("limit", "raw", 10 * MIB);
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: 5 * MIB,
    });
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::OutOfRange,
    );
    // xfs cannot be smaller than 300 MiB.
    r.volume_capabilities = vec![cap_for("xfs")];
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: MIB,
        limit_bytes: 100 * MIB,
    });
    assert_code(env.c.controller.create_volume(r).await, Code::OutOfRange);
}

/// StorageClass parameters are a typed set: unknown keys and values are
/// INVALID_ARGUMENT ("the Plugin SHALL return INVALID_ARGUMENT" for
/// unsupported parameters).
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_unknown_parameter_is_invalid_argument() {
    let mut env = Env::new("ext4").await;
    let mut r = create_req("p", "ext4", MIB);
    r.parameters.insert("replicas".into(), "3".into());
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    r.parameters.clear();
    r.parameters.insert("backend".into(), "tape".into());
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    // Keys added by the Kubernetes provisioner are accepted.
    r.parameters.clear();
    r.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "claim".into());
    env.c.controller.create_volume(r).await.unwrap();
}

/// Capabilities are validated per backend: node-local backends refuse
/// multi-node access modes; dir volumes are mount-only with no fs choice.
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_rejects_capabilities_the_backend_cannot_serve() {
    let mut env = Env::new("ext4").await;
    let mut r = create_req("m", "ext4", MIB);
    r.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    let mut r = create_req("d", "dir", MIB);
    r.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    r.volume_capabilities = vec![mount_cap("ext4", Mode::SingleNodeWriter)];
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::InvalidArgument,
    );
    let mut r = create_req("f", "ext4", MIB);
    r.volume_capabilities = vec![mount_cap("vfat", Mode::SingleNodeWriter)];
    assert_code(
        env.c.controller.create_volume(r).await,
        Code::InvalidArgument,
    );
}

/// Topology: "accessible_topology ... {stowage.csi.dev/node: <node>}";
/// "RESOURCE_EXHAUSTED: Unable to provision in accessible_topology".
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_reports_and_honours_topology() {
    let mut env = Env::new("ext4").await;
    let v = env.create("t", "dir", 0).await;
    assert_eq!(v.accessible_topology.len(), 1);
    assert_eq!(
        v.accessible_topology[0]
            .segments
            .get("stowage.csi.dev/node"),
        Some(&env.node_id)
    );
    let topo = |node: &str| csi::Topology {
        segments: [("stowage.csi.dev/node".to_owned(), node.to_owned())].into(),
    };
    let mut r = create_req("elsewhere", "dir", 0);
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topo("other-node")],
        preferred: vec![],
    });
    assert_code(
        env.c.controller.create_volume(r.clone()).await,
        Code::ResourceExhausted,
    );
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topo("other-node"), topo(&env.node_id.clone())],
        preferred: vec![topo(&env.node_id.clone())],
    });
    env.c.controller.create_volume(r).await.unwrap();
}

// -------------------------------------------------------------- DeleteVolume

/// DeleteVolume: "If a volume corresponding to the specified volume_id does
/// not exist or the artifacts associated with the volume do not exist
/// anymore, the Plugin MUST reply 0 OK"; a volume in use is refused.
#[tokio::test(flavor = "multi_thread")]
async fn delete_volume_is_idempotent_and_refuses_volumes_in_use() {
    let mut env = Env::new("ext4").await;
    env.delete("fake-vol-id").await.unwrap();
    assert_code(env.delete("").await, Code::InvalidArgument);
    let v = env.create("busy", "ext4", 32 * MIB).await;
    let staging = env.staging_dir("busy");
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    assert_code(env.delete(&v.volume_id).await, Code::FailedPrecondition);
    env.unstage(&v.volume_id, &staging).await.unwrap();
    // Published to a node (ControllerPublish) is in use too.
    env.c
        .controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: env.node_id.clone(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_code(env.delete(&v.volume_id).await, Code::FailedPrecondition);
    env.c
        .controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: env.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    env.delete(&v.volume_id).await.unwrap();
    env.delete(&v.volume_id).await.unwrap();
    assert!(
        std::fs::read_dir(env.layout.pool.join("volumes/block"))
            .unwrap()
            .next()
            .is_none()
    );
}

// ------------------------------------------------- ValidateVolumeCapabilities

/// ValidateVolumeCapabilities: "confirmed ... if and only if the volume
/// capabilities are supported"; NOT_FOUND for an unknown volume.
#[tokio::test(flavor = "multi_thread")]
async fn validate_volume_capabilities_confirms_only_supported_ones() {
    let mut env = Env::new("ext4").await;
    let v = env.create("val", "ext4", 32 * MIB).await;
    let req = |caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = env
        .c
        .controller
        .validate_volume_capabilities(req(vec![cap_for("ext4"), cap_for("raw")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let no = env
        .c
        .controller
        .validate_volume_capabilities(req(vec![mount_cap("ext4", Mode::MultiNodeReaderOnly)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
    let other_fs = env
        .c
        .controller
        .validate_volume_capabilities(req(vec![cap_for("xfs")]))
        .await
        .unwrap()
        .into_inner();
    assert!(other_fs.confirmed.is_none());
    assert_code(
        env.c
            .controller
            .validate_volume_capabilities(req(vec![]))
            .await,
        Code::InvalidArgument,
    );
    let mut r = req(vec![cap_for("ext4")]);
    r.volume_id = "block:test-node:00000000000000000000000000000001".into();
    assert_code(
        env.c.controller.validate_volume_capabilities(r).await,
        Code::NotFound,
    );
}

// --------------------------------------------------------------- ListVolumes

/// ListVolumes: "max_entries ... next_token"; "ABORTED: starting_token is
/// not valid"; entries carry published_node_ids.
#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_paginates_and_reports_published_nodes() {
    let mut env = Env::new("ext4").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(env.create(&format!("l{i}"), "dir", 0).await.volume_id);
    }
    env.c
        .controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: ids[2].clone(),
            node_id: env.node_id.clone(),
            volume_capability: Some(cap_for("dir")),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = env
            .c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 2);
        for e in page.entries {
            let vol = e.volume.unwrap();
            let published = e.status.unwrap().published_node_ids;
            if vol.volume_id == ids[2] {
                assert_eq!(published, vec![env.node_id.clone()]);
            } else {
                assert!(published.is_empty());
            }
            seen.push(vol.volume_id);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    assert_code(
        env.c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: "invalid-token".into(),
            })
            .await,
        Code::Aborted,
    );
}

/// A token stays valid when the last volume of its page is deleted, and
/// no deleted or repeated volume appears afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_token_survives_deletion_between_pages() {
    let mut env = Env::new("ext4").await;
    for i in 0..4 {
        env.create(&format!("d{i}"), "dir", 0).await;
    }
    let first = env
        .c
        .controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let page1: Vec<String> = first
        .entries
        .iter()
        .map(|e| e.volume.clone().unwrap().volume_id)
        .collect();
    for id in &page1 {
        env.delete(id).await.unwrap();
    }
    let rest = env
        .c
        .controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: first.next_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.entries.len(), 2);
    for e in rest.entries {
        assert!(!page1.contains(&e.volume.unwrap().volume_id));
    }
}

// --------------------------------------------------------------- GetCapacity

/// GetCapacity: "available_capacity ... the available capacity of the
/// storage"; it falls as data is written, is 0 for another node's topology
/// and for capabilities the backend cannot serve.
#[tokio::test(flavor = "multi_thread")]
async fn get_capacity_tracks_real_pool_usage() {
    let mut env = Env::new("xfs").await;
    let cap = |env: &mut Env, req: csi::GetCapacityRequest| {
        let mut c = env.c.controller.clone();
        async move { c.get_capacity(req).await.unwrap().into_inner() }
    };
    let before = cap(&mut env, csi::GetCapacityRequest::default()).await;
    assert!(before.available_capacity > 3 * GIB);
    assert_eq!(before.maximum_volume_size, Some(before.available_capacity));
    let v = env.create("cap", "ext4", 256 * MIB).await;
    let staging = env.staging_dir("cap");
    let target = env.target_path("cap");
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.publish(&v.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    std::fs::write(target.join("blob"), pattern(3, 96 << 20)).unwrap();
    nix::unistd::sync();
    let after = cap(&mut env, csi::GetCapacityRequest::default()).await;
    let used = before.available_capacity - after.available_capacity;
    assert!(
        used >= 90 * MIB,
        "capacity fell by only {used} bytes after writing 96 MiB"
    );
    let other = cap(
        &mut env,
        csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [("stowage.csi.dev/node".to_owned(), "elsewhere".to_owned())].into(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(other.available_capacity, 0);
    let multi = cap(
        &mut env,
        csi::GetCapacityRequest {
            volume_capabilities: vec![mount_cap("", Mode::MultiNodeMultiWriter)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(multi.available_capacity, 0);
    assert_code(
        env.c
            .controller
            .get_capacity(csi::GetCapacityRequest {
                parameters: [("nonsense".to_owned(), "1".to_owned())].into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

// ------------------------------------------------- Controller(Un)Publish

/// ControllerPublishVolume: NOT_FOUND for an unknown volume or node;
/// idempotent for the same arguments; ALREADY_EXISTS when "published but
/// is incompatible" (readonly flipped); ControllerUnpublish of something
/// not published is OK.
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_records_attachments_per_spec() {
    let mut env = Env::new("ext4").await;
    let v = env.create("cp", "ext4", 32 * MIB).await;
    let req = |vol: &str, node: &str, ro: bool| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(cap_for("ext4")),
        readonly: ro,
        ..Default::default()
    };
    let node = env.node_id.clone();
    assert_code(
        env.c
            .controller
            .controller_publish_volume(req("fake-vol-id-1", "fake-node", false))
            .await,
        Code::NotFound,
    );
    assert_code(
        env.c
            .controller
            .controller_publish_volume(req(&v.volume_id, "fake-node-id-1", false))
            .await,
        Code::NotFound,
    );
    assert_code(
        env.c
            .controller
            .controller_publish_volume(req(&v.volume_id, "", false))
            .await,
        Code::InvalidArgument,
    );
    let a = env
        .c
        .controller
        .controller_publish_volume(req(&v.volume_id, &node, false))
        .await
        .unwrap()
        .into_inner();
    let b = env
        .c
        .controller
        .controller_publish_volume(req(&v.volume_id, &node, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.publish_context, b.publish_context);
    assert!(!a.publish_context.is_empty());
    assert_code(
        env.c
            .controller
            .controller_publish_volume(req(&v.volume_id, &node, true))
            .await,
        Code::AlreadyExists,
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
    let status = got.status.unwrap();
    assert_eq!(status.published_node_ids, vec![node.clone()]);
    assert!(!status.volume_condition.unwrap().abnormal);
    for _ in 0..2 {
        env.c
            .controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: node.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    env.delete(&v.volume_id).await.unwrap();
    // Unpublishing a deleted volume: "the volume can be safely regarded as
    // ControllerUnpublished" → OK.
    env.c
        .controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// ControllerPublishVolume: "RESOURCE_EXHAUSTED: ... the maximum number of
/// volumes published to the node" (--max-volumes-per-node), reported by
/// NodeGetInfo as max_volumes_per_node.
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_enforces_max_volumes_per_node() {
    let mut env = Env::with_args("ext4", &["--max-volumes-per-node", "2"]).await;
    let info = env
        .c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 2);
    assert_eq!(info.node_id, env.node_id);
    assert!(info.accessible_topology.is_some());
    let node = env.node_id.clone();
    for i in 0..3 {
        let v = env.create(&format!("m{i}"), "dir", 0).await;
        let r = env
            .c
            .controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: node.clone(),
                volume_capability: Some(cap_for("dir")),
                ..Default::default()
            })
            .await;
        if i < 2 {
            r.unwrap();
        } else {
            assert_code(r, Code::ResourceExhausted);
        }
    }
}

/// ControllerGetVolume: VolumeCondition is abnormal when the volume's
/// storage is gone; NOT_FOUND for an unknown volume.
#[tokio::test(flavor = "multi_thread")]
async fn controller_get_volume_reports_condition() {
    let mut env = Env::new("ext4").await;
    let v = env.create("g", "raw", 8 * MIB).await;
    let uuid = v.volume_id.rsplit(':').next().unwrap().to_owned();
    std::fs::remove_file(env.layout.pool.join(format!("volumes/block/{uuid}.img"))).unwrap();
    let got = env
        .c
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal);
    assert_code(
        env.c
            .controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: "nope".into(),
            })
            .await,
        Code::NotFound,
    );
}
