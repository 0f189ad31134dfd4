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
    assert!(loops_under(&env.layout.pool).is_empty());
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

/// The plugin's service capability types and the controller's RPC types.
async fn advertised(env: &mut Env) -> (Vec<i32>, Vec<i32>) {
    let caps = env
        .c
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let services = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    let rpcs = env
        .c
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|t| match t {
                csi::controller_service_capability::Type::Rpc(r) => r.r#type,
            })
        })
        .collect();
    (services, rpcs)
}

/// GetPluginCapabilities: "CONTROLLER_SERVICE ... VOLUME_ACCESSIBILITY_CONSTRAINTS
/// ... GROUP_CONTROLLER_SERVICE ... SNAPSHOT_METADATA_SERVICE", and
/// ControllerGetCapabilities: stowage implements every plugin service and
/// every controller RPC CSI v1.12 defines, and advertises them all with
/// default flags (GET_SNAPSHOT and SNAPSHOT_METADATA_SERVICE included).
#[tokio::test(flavor = "multi_thread")]
async fn identity_and_controller_advertise_every_v1_12_capability_by_default() {
    use csi::controller_service_capability::rpc::Type as Rpc;
    use csi::plugin_capability::service::Type;
    let mut env = Env::new("ext4").await;
    let (services, rpcs) = advertised(&mut env).await;
    // Every value the enums define, UNKNOWN (0) aside.
    let every_service: Vec<i32> = (1..).take_while(|&t| Type::try_from(t).is_ok()).collect();
    let every_rpc: Vec<i32> = (1..).take_while(|&t| Rpc::try_from(t).is_ok()).collect();
    assert!(every_service.contains(&(Type::SnapshotMetadataService as i32)));
    assert!(every_rpc.contains(&(Rpc::GetSnapshot as i32)));
    let sorted = |mut v: Vec<i32>| {
        v.sort_unstable();
        v
    };
    assert_eq!(sorted(services), every_service);
    assert_eq!(sorted(rpcs), every_rpc);
}

/// Probe: "ready ... the plugin is in a state where it can serve requests";
/// a pool whose filesystem is full is not ready.
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
    // Make the state directory refuse writes: a read-only bind mount of
    // it over itself (unmounted first thing on drop). Filling its
    // filesystem instead was not certain: ext4 frees blocks again after
    // a fill (journal commits, the server's own writes), and one Probe in
    // 30 still found room.
    let state = env.layout.state.clone();
    stowage::os::mount::bind(&state, &state).unwrap();
    let _read_only = common::Mounted(state.clone());
    stowage::os::mount::remount_bind_read_only(&state, nix::mount::MsFlags::empty()).unwrap();
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

// ------------------------------------------------------------ Node: stage

/// NodeStageVolume: "This operation MUST be idempotent. If the volume
/// corresponding to the volume_id is already staged to the
/// staging_target_path, and is identical to the specified
/// volume_capability the Plugin MUST reply 0 OK"; staged elsewhere or with
/// another capability → ALREADY_EXISTS.
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_is_idempotent_and_conflicts_are_already_exists() {
    let mut env = Env::new("xfs").await;
    let v = env.create("s", "ext4", 64 * MIB).await;
    let staging = env.staging_dir("s");
    for _ in 0..10 {
        env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    }
    assert_eq!(
        loops_under(&env.layout.pool).len(),
        1,
        "repeat stage attached twice"
    );
    let other = env.staging_dir("s2");
    assert_code(
        env.stage(&v.volume_id, "ext4", &other).await,
        Code::AlreadyExists,
    );
    assert_code(
        env.stage(&v.volume_id, "raw", &staging).await,
        Code::AlreadyExists,
    );
    for _ in 0..3 {
        env.unstage(&v.volume_id, &staging).await.unwrap();
    }
    assert!(loops_under(&env.layout.pool).is_empty());
    assert!(
        std::fs::read_dir(&staging).unwrap().next().is_none(),
        "staging dir not empty"
    );
}

/// NodeStageVolume makes the filesystem only on first stage: data written
/// before a re-stage survives (never reformat a device that has one), and
/// a device with another filesystem is refused.
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_formats_only_on_first_stage() {
    let mut env = Env::new("ext4").await;
    let v = env.create("f", "xfs", 320 * MIB).await;
    let staging = env.staging_dir("f");
    env.stage(&v.volume_id, "xfs", &staging).await.unwrap();
    let table = stowage::os::mountinfo::MountTable::read().unwrap();
    assert_eq!(table.mounted_at(&staging).unwrap().fs_type, "xfs");
    std::fs::write(staging.join("keep"), b"kept").unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
    env.stage(&v.volume_id, "xfs", &staging).await.unwrap();
    assert_eq!(std::fs::read(staging.join("keep")).unwrap(), b"kept");
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// Missing required fields are INVALID_ARGUMENT, checked before any lookup;
/// relative or dotted paths are refused.
#[tokio::test(flavor = "multi_thread")]
async fn node_requests_with_missing_or_unclean_fields_are_invalid_argument() {
    let mut env = Env::new("ext4").await;
    let staging = env.staging_dir("x");
    let n = &mut env.c.node;
    let stage =
        |vol: &str, path: &str, cap: Option<csi::VolumeCapability>| csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: path.into(),
            volume_capability: cap,
            ..Default::default()
        };
    let sp = staging.display().to_string();
    assert_code(
        n.node_stage_volume(stage("", &sp, Some(cap_for("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage("fake", "", Some(cap_for("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage("fake", &sp, None)).await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage("fake", "rel/path", Some(cap_for("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_stage_volume(stage("fake", &format!("{sp}/../x"), Some(cap_for("ext4"))))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "fake".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: "fake".into(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: sp.clone(),
        })
        .await,
        Code::InvalidArgument,
    );
    // A well-formed request for a volume that does not exist: NOT_FOUND.
    assert_code(
        n.node_stage_volume(stage(
            "block:test-node:0123456789abcdef0123456789abcdef",
            &sp,
            Some(cap_for("ext4")),
        ))
        .await,
        Code::NotFound,
    );
}

// ---------------------------------------------------------- Node: publish

/// NodePublishVolume readonly: "the CO ... the volume SHALL be published
/// read-only": writes through the target fail with EROFS while the staging
/// mount stays writable.
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_read_only_refuses_writes() {
    for kind in ["ext4", "dir"] {
        let mut env = Env::new("xfs").await;
        let v = env.create("ro", kind, 64 * MIB).await;
        let staging = env.staging_dir("ro");
        let rw = env.target_path("rw");
        let ro = env.target_path("ro");
        env.stage(&v.volume_id, kind, &staging).await.unwrap();
        env.publish(&v.volume_id, kind, &staging, &rw, false)
            .await
            .unwrap();
        env.publish(&v.volume_id, kind, &staging, &ro, true)
            .await
            .unwrap();
        std::fs::write(rw.join("hello"), b"hi").unwrap();
        let err = std::fs::write(ro.join("nope"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{kind}: {err}");
        assert_eq!(std::fs::read(ro.join("hello")).unwrap(), b"hi");
        // Same target with the other readonly flag: ALREADY_EXISTS.
        assert_code(
            env.publish(&v.volume_id, kind, &staging, &ro, false).await,
            Code::AlreadyExists,
        );
        env.unpublish(&v.volume_id, &ro).await.unwrap();
        env.unpublish(&v.volume_id, &rw).await.unwrap();
        env.unstage(&v.volume_id, &staging).await.unwrap();
    }
}

/// Raw block publish: "For volumes with an access type of block, the SP
/// SHALL place the block device at target_path"; read-only raw publish is a
/// device that refuses writes.
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_raw_block_is_a_usable_device() {
    let mut env = Env::new("ext4").await;
    let v = env.create("raw", "raw", 16 * MIB).await;
    let staging = env.staging_dir("raw");
    let target = env.target_path("raw");
    let ro_target = env.target_path("raw-ro");
    env.stage(&v.volume_id, "raw", &staging).await.unwrap();
    env.publish(&v.volume_id, "raw", &staging, &target, false)
        .await
        .unwrap();
    env.publish(&v.volume_id, "raw", &staging, &target, false)
        .await
        .unwrap();
    env.publish(&v.volume_id, "raw", &staging, &ro_target, true)
        .await
        .unwrap();
    let data = pattern(11, 4096);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    f.seek(SeekFrom::Start((16 * MIB - 4096) as u64)).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0; 4096];
    let mut r = std::fs::File::open(&ro_target).unwrap();
    r.seek(SeekFrom::Start((16 * MIB - 4096) as u64)).unwrap();
    r.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    drop((f, r));
    let write_ro = std::fs::OpenOptions::new()
        .write(true)
        .open(&ro_target)
        .and_then(|mut w| w.write_all(&data).and_then(|()| w.sync_all()));
    assert!(
        write_ro.is_err(),
        "a read-only raw publish accepted a write"
    );
    let stats = env
        .c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);
    env.unpublish(&v.volume_id, &ro_target).await.unwrap();
    env.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(!target.exists() && !ro_target.exists());
    env.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(loops_under(&env.layout.pool).is_empty());
}

/// SINGLE_NODE_SINGLE_WRITER: publishing to a second target is "Exceeds
/// capabilities" → FAILED_PRECONDITION; SINGLE_NODE_MULTI_WRITER allows it.
#[tokio::test(flavor = "multi_thread")]
async fn single_node_single_writer_allows_one_target() {
    let mut env = Env::new("ext4").await;
    let v = env.create("sw", "dir", 0).await;
    let staging = env.staging_dir("sw");
    let cap = mount_cap("", Mode::SingleNodeSingleWriter);
    env.c
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let publish = |target: std::path::PathBuf| csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let t1 = env.target_path("one");
    let t2 = env.target_path("two");
    env.c
        .node
        .node_publish_volume(publish(t1.clone()))
        .await
        .unwrap();
    assert_code(
        env.c.node.node_publish_volume(publish(t2.clone())).await,
        Code::FailedPrecondition,
    );
    assert!(!t2.exists());
    env.unpublish(&v.volume_id, &t1).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// Target paths are not followed through symlinks: a target that is a
/// symlink is refused and nothing is mounted where it points.
#[tokio::test(flavor = "multi_thread")]
async fn node_publish_refuses_symlinked_target() {
    let mut env = Env::new("ext4").await;
    let v = env.create("sym", "dir", 0).await;
    let staging = env.staging_dir("sym");
    env.stage(&v.volume_id, "dir", &staging).await.unwrap();
    let elsewhere = env.scratch.root.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let link = env.target_path("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    assert_code(
        env.publish(&v.volume_id, "dir", &staging, &link, false)
            .await,
        Code::InvalidArgument,
    );
    assert!(!is_mounted(&elsewhere));
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// "The SP MUST NOT unmount what it did not mount": unpublishing a volume
/// at a target where someone else mounted something leaves that mount.
#[tokio::test(flavor = "multi_thread")]
async fn node_unpublish_never_unmounts_foreign_mounts() {
    let mut env = Env::new("ext4").await;
    let v = env.create("fm", "dir", 0).await;
    let foreign = env.target_path("foreign");
    std::fs::create_dir(&foreign).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    env.unpublish(&v.volume_id, &foreign).await.unwrap();
    assert!(is_mounted(&foreign));
    let staging = env.staging_dir("fm");
    env.unstage(&v.volume_id, &staging).await.unwrap();
    // A staging path that already holds a foreign mount is refused.
    nix::mount::mount(
        Some("tmpfs"),
        &staging,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    assert_code(
        env.stage(&v.volume_id, "dir", &staging).await,
        Code::FailedPrecondition,
    );
    env.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(is_mounted(&staging));
}

// ------------------------------------------------------- NodeGetVolumeStats

/// NodeGetVolumeStats: bytes and inodes from statvfs; NOT_FOUND for a path
/// that is not a volume path; VolumeCondition abnormal when the mount is
/// gone.
#[tokio::test(flavor = "multi_thread")]
async fn node_get_volume_stats_reports_usage_and_condition() {
    let mut env = Env::new("ext4").await;
    let v = env.create("st", "ext4", 64 * MIB).await;
    let staging = env.staging_dir("st");
    let target = env.target_path("st");
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.publish(&v.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    let stats = |env: &mut Env, path: String| {
        let mut n = env.c.node.clone();
        let id = v.volume_id.clone();
        async move {
            n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id,
                volume_path: path,
                staging_target_path: String::new(),
            })
            .await
        }
    };
    let s = stats(&mut env, target.display().to_string())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.usage.len(), 2);
    let bytes = &s.usage[0];
    assert!(
        bytes.total > 50 * MIB && bytes.total <= 64 * MIB,
        "{bytes:?}"
    );
    assert!(s.usage[1].total > 0);
    assert!(!s.volume_condition.unwrap().abnormal);
    assert_code(stats(&mut env, "some/path".into()).await, Code::NotFound);
    assert_code(
        stats(&mut env, staging.join("x").display().to_string()).await,
        Code::NotFound,
    );
    // Someone unmounts the target behind the driver's back.
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let s = stats(&mut env, target.display().to_string())
        .await
        .unwrap()
        .into_inner();
    let cond = s.volume_condition.unwrap();
    assert!(cond.abnormal);
    assert!(
        cond.message.contains("no longer mounted"),
        "{}",
        cond.message
    );
    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// NodeGetCapabilities lists what the node advertises.
#[tokio::test(flavor = "multi_thread")]
async fn node_get_capabilities_advertises_stage_stats_condition() {
    use csi::node_service_capability::rpc::Type;
    let mut env = Env::new("ext4").await;
    let caps: Vec<i32> = env
        .c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for t in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
    ] {
        assert!(caps.contains(&(t as i32)), "{t:?} missing");
    }
}

// -------------------------------------------------------------- Concurrency

/// "In some circumstances, the CO MAY wish to ... the Plugin SHOULD return
/// ABORTED ... if an operation is pending for the volume": concurrent
/// stages of one volume get ABORTED, never a double attach; different
/// volumes proceed in parallel.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_operations_on_one_volume_are_aborted() {
    let mut env = Env::new("xfs").await;
    let v = env.create("c", "ext4", 512 * MIB).await;
    let staging = env.staging_dir("c");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut n = env.c.node.clone();
        let req = csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move { n.node_stage_volume(req).await }));
    }
    let mut ok = 0;
    let mut aborted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::Aborted => aborted += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(ok >= 1 && aborted >= 1, "ok={ok} aborted={aborted}");
    assert_eq!(loops_under(&env.layout.pool).len(), 1);
    // Distinct volumes in parallel: all succeed.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = env.c.controller.clone();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req(&format!("par{i}"), "dir", 0))
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

// ------------------------------------------------------------ The process

/// `stowage serve` removes a stale socket, refuses a live one, makes it
/// owner-only, and exits 0 on SIGTERM after finishing in-flight RPCs.
#[tokio::test(flavor = "multi_thread")]
async fn serve_socket_hygiene_and_graceful_shutdown() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = Env::new("ext4").await;
    let mode = std::fs::metadata(&env.layout.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second server on the same socket refuses to start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(&env.server.args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another server"));
    // In-flight work finishes across SIGTERM.
    let v = env.create("slow", "ext4", 1024 * MIB).await;
    let staging = env.staging_dir("slow");
    let mut n = env.c.node.clone();
    let req = csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap_for("ext4")),
        ..Default::default()
    };
    let inflight = tokio::spawn(async move { n.node_stage_volume(req).await });
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let status = tokio::task::block_in_place(|| env.server.terminate());
    assert!(status.success(), "exit status {status}");
    inflight.await.unwrap().unwrap();
    assert!(!env.layout.socket.exists());
    // A stale socket file (no server behind it) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&env.layout.socket).unwrap();
    drop(stale);
    assert!(env.layout.socket.exists());
    env.server.restart();
    env.reconnect().await;
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// Data and publications survive a server restart; the records are found
/// again and unpublish/unstage work afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn data_and_state_survive_server_restart() {
    let mut env = Env::new("xfs").await;
    let v = env.create("persist", "ext4", 64 * MIB).await;
    let staging = env.staging_dir("p");
    let target = env.target_path("p");
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.publish(&v.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"before restart").unwrap();
    env.server.kill9();
    env.server.restart();
    env.reconnect().await;
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"before restart");
    // Identical repeats are still no-ops after the restart.
    env.stage(&v.volume_id, "ext4", &staging).await.unwrap();
    env.publish(&v.volume_id, "ext4", &staging, &target, false)
        .await
        .unwrap();
    assert_eq!(loops_under(&env.layout.pool).len(), 1);
    let list = env
        .c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
    env.delete(&v.volume_id).await.unwrap();
}

/// Secrets "MUST be treated as such (e.g. not logged)": a request's secrets
/// never reach the log, even at debug level, nor the volume context.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_never_logged_or_stored() {
    let mut env = Env::new("ext4").await;
    let mut r = create_req("sec", "dir", 0);
    r.secrets.insert("password".into(), "hunter2-secret".into());
    let v = env
        .c
        .controller
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(!format!("{:?}", v.volume_context).contains("hunter2"));
    let staging = env.staging_dir("sec");
    env.c
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap_for("dir")),
            secrets: [("token".to_owned(), "hunter2-secret".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
    let log = env.server.log_text();
    assert!(
        log.contains("NodeStageVolume"),
        "debug request logging is on"
    );
    assert!(!log.contains("hunter2"), "a secret reached the log");
    let state = std::process::Command::new("grep")
        .args(["-r", "hunter2"])
        .arg(&env.layout.state)
        .output()
        .unwrap();
    assert!(
        state.stdout.is_empty(),
        "a secret reached the state directory"
    );
}

/// Block volumes use direct I/O on the loop device where the pool allows
/// it (xfs and ext4 pools on a block device do).
#[tokio::test(flavor = "multi_thread")]
async fn block_volumes_use_direct_io_on_capable_pools() {
    let mut env = Env::new("xfs").await;
    let v = env.create("dio", "raw", 16 * MIB).await;
    let staging = env.staging_dir("dio");
    env.stage(&v.volume_id, "raw", &staging).await.unwrap();
    let loops = loops_under(&env.layout.pool);
    assert_eq!(loops.len(), 1);
    assert!(
        loops[0].0.direct_io(),
        "loop device is not using direct I/O"
    );
    env.unstage(&v.volume_id, &staging).await.unwrap();
}
