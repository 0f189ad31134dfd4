//! File modes of what stowage makes. A dir volume's root is never
//! world-writable: it is 0755 and root's, like a fresh filesystem's root,
//! and sharing it with a pod's users is the CO's fsGroup (the CSIDriver
//! says `fsGroupPolicy: File`). Files that describe volumes (the client's
//! publication records, the applier's state) are 0600 in 0700 directories
//! whatever the umask of the process that writes them.

#![allow(clippy::disallowed_methods)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use stowage::backend::backend_dir;
use stowage::csi;
use stowage::volume::{BackendKind, VolumeId};

/// A file mode, shown in octal.
#[derive(PartialEq, Eq)]
struct Mode(u32);

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

/// `(mode & 0o7777, uid, gid)` of `path` (following a mount at it).
fn mode_of(path: &Path) -> (Mode, u32, u32) {
    let md = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (Mode(md.permissions().mode() & 0o7777), md.uid(), md.gid())
}

fn pool_root(env: &Env, volume_id: &str) -> PathBuf {
    backend_dir(&env.layout.pool, BackendKind::Dir)
        .join(VolumeId::parse(volume_id).unwrap().uuid.to_hex())
}

fn clone_req(name: &str, source: &str) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, "dir", 0);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: source.into(),
            },
        )),
    });
    r
}

fn restore_req(name: &str, snapshot: &str) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, "dir", 0);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    r
}

async fn create(env: &mut Env, req: csi::CreateVolumeRequest) -> String {
    env.c
        .controller
        .create_volume(req)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// CreateSnapshot, repeated until ready_to_use.
async fn snapshot_ready(env: &mut Env, name: &str, source: &str) -> String {
    let start = Instant::now();
    loop {
        let s = env
            .c
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .unwrap();
        if s.ready_to_use {
            return s.snapshot_id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "snapshot never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new dir volume's root is 0755 and root's, in the pool and as the pod
/// sees it at the target. A clone or restore keeps its source root's owner
/// and mode (the kubelet's fsGroup change), except that it is never
/// world-writable, even from a source made 0777 by an earlier version.
#[tokio::test(flavor = "multi_thread")]
async fn dir_volume_roots_are_not_world_writable() {
    let mut env = Env::new("xfs").await;
    let v = env.create("root", "dir", 0).await;
    assert_eq!(mode_of(&pool_root(&env, &v.volume_id)), (Mode(0o755), 0, 0));
    let staging = env.staging_dir("root");
    let target = env.target_path("root");
    env.stage(&v.volume_id, "dir", &staging).await.unwrap();
    env.publish(&v.volume_id, "dir", &staging, &target, false)
        .await
        .unwrap();
    assert_eq!(mode_of(&target), (Mode(0o755), 0, 0));

    let clone = create(&mut env, clone_req("clone", &v.volume_id)).await;
    assert_eq!(mode_of(&pool_root(&env, &clone)), (Mode(0o755), 0, 0));

    // As the kubelet leaves it for fsGroup 1234, and world-writable as
    // volumes of earlier versions were.
    let src = pool_root(&env, &v.volume_id);
    std::os::unix::fs::chown(&src, None, Some(1234)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let legacy = create(&mut env, clone_req("legacy-clone", &v.volume_id)).await;
    assert_eq!(mode_of(&pool_root(&env, &legacy)), (Mode(0o2775), 0, 1234));
    let snap = snapshot_ready(&mut env, "snap", &v.volume_id).await;
    let restored = create(&mut env, restore_req("restored", &snap)).await;
    assert_eq!(
        mode_of(&pool_root(&env, &restored)),
        (Mode(0o2775), 0, 1234)
    );

    env.unpublish(&v.volume_id, &target).await.unwrap();
    env.unstage(&v.volume_id, &staging).await.unwrap();
}

/// Runs the client binary under umask 022 (a login shell's), so that modes
/// the code leaves to the umask come out 0644/0755.
fn client_umask_022(env: &Env, args: &[&str]) -> Output {
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_stowage"))
        .arg("--endpoint")
        .arg(format!("unix://{}", env.layout.socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run stowage");
    assert!(
        out.status.success(),
        "stowage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `stowage volume publish` under umask 022: the staging root it creates
/// and its records directory are 0700, the record and the lock file 0600;
/// a records directory and a lock file left 0755/0644 by an earlier
/// version are tightened.
#[tokio::test(flavor = "multi_thread")]
async fn client_records_are_private_whatever_the_umask() {
    let env = Env::new("xfs").await;
    let root = env.scratch.root.join("client/staging");
    let root_s = root.display().to_string();
    let mut ids = Vec::new();
    for name in ["fresh", "older"] {
        let out = client_umask_022(
            &env,
            &[
                "-o", "json", "volume", "create", name, "--size", "16Mi", "--fs", "ext4",
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(v["volume_id"].as_str().unwrap().to_owned());
    }
    let publish = |id: &str, target: &Path| {
        let target = target.display().to_string();
        let out = client_umask_022(
            &env,
            &[
                "-o",
                "json",
                "volume",
                "publish",
                id,
                &target,
                "--fs",
                "ext4",
                "--staging-root",
                &root_s,
            ],
        );
        let p: Value = serde_json::from_slice(&out.stdout).unwrap();
        PathBuf::from(p["record"].as_str().unwrap())
    };

    let record = publish(&ids[0], &env.target_path("fresh"));
    let records = root.join(".publications");
    assert_eq!(record.parent(), Some(records.as_path()));
    assert_eq!(mode_of(&root).0, Mode(0o700));
    assert_eq!(mode_of(root.parent().unwrap()).0, Mode(0o700));
    assert_eq!(mode_of(&records).0, Mode(0o700));
    assert_eq!(mode_of(&record).0, Mode(0o600));
    let lock = records.join(format!(
        "{}.lock",
        record.file_stem().unwrap().to_str().unwrap()
    ));
    assert_eq!(mode_of(&lock).0, Mode(0o600));

    // As an earlier version left them.
    std::fs::set_permissions(&records, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_lock = records.join(format!(
        "{}.lock",
        stowage::client::publish::sanitize_id(&ids[1]).unwrap()
    ));
    std::fs::write(&old_lock, "").unwrap();
    std::fs::set_permissions(&old_lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let record = publish(&ids[1], &env.target_path("older"));
    assert_eq!(mode_of(&records).0, Mode(0o700));
    assert_eq!(mode_of(&record).0, Mode(0o600));
    assert_eq!(mode_of(&old_lock).0, Mode(0o600));

    for (id, name) in ids.iter().zip(["fresh", "older"]) {
        let target = env.target_path(name).display().to_string();
        client_umask_022(
            &env,
            &[
                "volume",
                "unpublish",
                id,
                &target,
                "--staging-root",
                &root_s,
            ],
        );
    }
}

/// `stowage apply` under umask 022: the state directory it creates is
/// 0700, the state file and its lock file 0600.
#[tokio::test(flavor = "multi_thread")]
async fn apply_state_is_private_whatever_the_umask() {
    let env = Env::new("xfs").await;
    let file = env.scratch.root.join("volumes.yaml");
    let target = env.target_path("applied");
    std::fs::write(
        &file,
        format!(
            "volumes:\n  - name: applied\n    size: 16Mi\n    parameters: {{backend: dir}}\n    target: {}\n",
            target.display()
        ),
    )
    .unwrap();
    let state = env.scratch.root.join("apply/state/state.json");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "apply",
            "-f",
            &file.display().to_string(),
            "--state-file",
            &state.display().to_string(),
            "--staging-root",
            &env.layout.staging.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = args(&[]);
    client_umask_022(&env, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(is_mounted(&target));
    assert_eq!(mode_of(&state).0, Mode(0o600));
    assert_eq!(mode_of(state.parent().unwrap()).0, Mode(0o700));
    assert_eq!(
        mode_of(state.parent().unwrap().parent().unwrap()).0,
        Mode(0o700)
    );
    let mut lock = state.clone().into_os_string();
    lock.push(".lock");
    assert_eq!(mode_of(Path::new(&lock)).0, Mode(0o600));

    std::fs::write(&file, "volumes: []\n").unwrap();
    let a = args(&["--prune"]);
    client_umask_022(&env, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!is_mounted(&target));
}

/// VOLUME_MOUNT_GROUP on node-local volumes: NodeStage with a
/// `volume_mount_group` gives the volume's root that group, group rwx and
/// the setgid bit (new files inherit the group), without touching what is
/// already inside; a read-only stage changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn volume_mount_group_owns_the_root_of_dir_and_block_volumes() {
    let mut env = Env::new("xfs").await;
    let caps = env
        .c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let advertised = caps.capabilities.iter().any(|c| {
        matches!(
            &c.r#type,
            Some(csi::node_service_capability::Type::Rpc(r))
                if r.r#type == csi::node_service_capability::rpc::Type::VolumeMountGroup as i32
        )
    });
    assert!(advertised, "VOLUME_MOUNT_GROUP is not advertised");
    for kind in ["dir", "ext4"] {
        let v = env.create(&format!("group-{kind}"), kind, 64 << 20).await;
        let staging = env.staging_dir(&format!("group-{kind}"));
        let mut cap = cap_for(kind);
        if let Some(csi::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
            m.volume_mount_group = "4321".into();
        }
        let stage = |cap: csi::VolumeCapability| csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        };
        env.c
            .node
            .node_stage_volume(stage(cap.clone()))
            .await
            .unwrap();
        let (mode, uid, gid) = mode_of(&staging);
        assert_eq!((uid, gid), (0, 4321), "{kind}: root owner");
        assert_eq!(
            mode.0 & 0o2070,
            0o2070,
            "{kind}: group rwx and setgid, got {mode:?}"
        );
        assert_eq!(
            mode.0 & 0o002,
            0,
            "{kind}: never world-writable, got {mode:?}"
        );
        std::fs::write(staging.join("new"), b"x").unwrap();
        assert_eq!(
            std::fs::metadata(staging.join("new")).unwrap().gid(),
            4321,
            "{kind}: a new file inherits the group"
        );
        // Staged again with another group (a retry of a stage cut short
        // before its group, say): the root takes it. It used to answer OK
        // and keep the first.
        let mut other = cap.clone();
        if let Some(csi::volume_capability::AccessType::Mount(m)) = other.access_type.as_mut() {
            m.volume_mount_group = "5555".into();
        }
        env.c.node.node_stage_volume(stage(other)).await.unwrap();
        assert_eq!(mode_of(&staging).2, 5555, "{kind}: staged again");
        // Each pod's NodePublish names its group: the root takes the
        // latest (it used to be ignored at publish).
        for (i, gid) in [(1, 6666u32), (2, 7777)] {
            let mut pod = cap.clone();
            if let Some(csi::volume_capability::AccessType::Mount(m)) = pod.access_type.as_mut() {
                m.volume_mount_group = gid.to_string();
            }
            let target = env.target_path(&format!("group-{kind}-{i}"));
            env.c
                .node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    staging_target_path: staging.display().to_string(),
                    target_path: target.display().to_string(),
                    volume_capability: Some(pod),
                    ..Default::default()
                })
                .await
                .unwrap();
            let (mode, _, got) = mode_of(&target);
            assert_eq!(got, gid, "{kind}: publication {i}");
            assert_eq!(mode.0 & 0o2070, 0o2070, "{kind}: {mode:?}");
        }
        for i in [1, 2] {
            let target = env.target_path(&format!("group-{kind}-{i}"));
            env.unpublish(&v.volume_id, &target).await.unwrap();
        }
        env.unstage(&v.volume_id, &staging).await.unwrap();
    }
    // A group that is not a number is refused.
    let v = env.create("group-bad", "dir", 0).await;
    let staging = env.staging_dir("group-bad");
    let mut cap = cap_for("dir");
    if let Some(csi::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.volume_mount_group = "wheel".into();
    }
    assert_code(
        env.c
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await,
        tonic::Code::InvalidArgument,
    );
}

/// The per-mount flags of the topmost mount at `path`, from mountinfo.
fn mount_options_at(path: &Path) -> Option<Vec<String>> {
    stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .rev()
        .find(|e| e.mount_point == path)
        .map(|e| e.mount_options.split(',').map(str::to_owned).collect())
}

/// `mount_flags` reach every mount a volume gets: the per-mount ones
/// (`noexec`, `ro`, …) on the bind mounts of dir volumes and on every
/// publication, read-write ones too (the kernel ignores them on a bind, so
/// each takes a remount). Before, a dir volume's staging and any
/// read-write publication came out with none of them, and OK. Options only
/// a filesystem takes are INVALID_ARGUMENT for a dir volume, which has none
/// of its own, with nothing left mounted.
#[tokio::test(flavor = "multi_thread")]
async fn mount_flags_reach_every_mount_of_dir_and_block_volumes() {
    let mut env = Env::new("ext4").await;
    let with_flags = |kind: &str, flags: &[&str]| {
        let mut cap = cap_for(kind);
        if let Some(csi::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
            m.mount_flags = flags.iter().map(|f| (*f).to_owned()).collect();
        }
        cap
    };
    for kind in ["dir", "ext4"] {
        let name = format!("flags-{kind}");
        let v = env.create(&name, kind, 64 << 20).await;
        let staging = env.staging_dir(&name);
        env.c
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(with_flags(kind, &["noexec,nosuid", "nodev"])),
                ..Default::default()
            })
            .await
            .unwrap();
        let opts = mount_options_at(&staging).expect("staging mounted");
        for f in ["noexec", "nosuid", "nodev", "rw"] {
            assert!(
                opts.iter().any(|o| o == f),
                "{kind} staging: {f} in {opts:?}"
            );
        }
        let publish = |target: &Path, flags: &[&str]| csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(with_flags(kind, flags)),
            readonly: false,
            ..Default::default()
        };
        let rw = env.target_path(&format!("{name}-rw"));
        env.c
            .node
            .node_publish_volume(publish(&rw, &["noexec", "nosuid", "nodev", "noatime"]))
            .await
            .unwrap();
        let opts = mount_options_at(&rw).expect("published");
        for f in ["noexec", "nosuid", "nodev", "noatime", "rw"] {
            assert!(
                opts.iter().any(|o| o == f),
                "{kind} publication: {f} in {opts:?}"
            );
        }
        std::fs::write(rw.join("file"), b"x").unwrap();
        let ro = env.target_path(&format!("{name}-ro"));
        env.c
            .node
            .node_publish_volume(publish(&ro, &["ro"]))
            .await
            .unwrap();
        let opts = mount_options_at(&ro).expect("published");
        assert!(opts.iter().any(|o| o == "ro"), "{kind}: ro in {opts:?}");
        let e = std::fs::write(ro.join("other"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{kind}: {e}");
        for t in [&rw, &ro] {
            env.unpublish(&v.volume_id, t).await.unwrap();
        }
        env.unstage(&v.volume_id, &staging).await.unwrap();
    }
    // Options only a filesystem takes: refused for a dir volume, at stage
    // and at publish, leaving nothing mounted.
    let v = env.create("flags-fs-only", "dir", 0).await;
    let staging = env.staging_dir("flags-fs-only");
    for flags in [&["discard"][..], &["nosuid,sync"][..]] {
        let e = env
            .c
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(with_flags("dir", flags)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{flags:?}: {e:?}");
        assert!(e.message().contains("bind-mounted"), "{e:?}");
        assert_eq!(mount_options_at(&staging), None, "{flags:?}: left mounted");
    }
    env.stage(&v.volume_id, "dir", &staging).await.unwrap();
    let target = env.target_path("flags-fs-only");
    let e = env
        .c
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(with_flags("dir", &["lazytime"])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(mount_options_at(&target), None, "publication left mounted");
    env.unstage(&v.volume_id, &staging).await.unwrap();
}
