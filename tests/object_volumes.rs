//! Object volumes end to end: a real Garage S3 service per test
//! (`common::garage`), a real `stowage serve` on a unix socket, real s3fs
//! FUSE mounts. Each test names the CSI clause or issue-12 promise it
//! checks. Content is compared byte for byte; waits are bounded polls,
//! never timing assertions.
//!
//! Nothing a test starts may outlive it: every plugin is a [`Plugin`]
//! whose drop kills the server, detaches every mount under its scratch
//! directory and ends (by PID) the s3fs daemons that mount there; the
//! Garage harness stops its own processes. Without Garage or s3fs the
//! tests fail; they never skip.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::garage::{Garage, S3Key};
use common::s3fs;
use common::{Clients, Env, Layout, Mode, Scratch, Server, assert_code, pattern, try_connect};
use stowage::backend::object::s3::{Credentials as S3Credentials, S3Client, S3Config};
use stowage::csi;
use tonic::Code;

const CTX_ENDPOINT: &str = "stowage.csi.dev/endpoint";
const CTX_REGION: &str = "stowage.csi.dev/region";
const CTX_BUCKET: &str = "stowage.csi.dev/bucket";
const CTX_PREFIX: &str = "stowage.csi.dev/prefix";
const CTX_MOUNTER: &str = "stowage.csi.dev/mounter";
const CTX_CAPACITY_ENFORCED: &str = "stowage.csi.dev/capacity-enforced";

/// Upper bound of every poll in this file (a hang detector, far above the
/// expected durations: the supervisor checks every 2 s, a mount takes
/// about a second).
const LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Processes and mounts

/// The one live s3fs daemon whose command line names `mount_point`.
fn daemon_of(mount_point: &Path) -> Option<u32> {
    let mp = mount_point.to_str().unwrap();
    let found: Vec<u32> = s3fs::processes()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| a == mp || a.ends_with(mp)))
        .map(|(pid, _)| pid)
        .collect();
    assert!(found.len() <= 1, "several s3fs daemons for {mp}: {found:?}");
    found.first().copied()
}

fn mount_entry(path: &Path) -> Option<stowage::os::mountinfo::MountEntry> {
    stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .rev()
        .find(|e| e.mount_point == path)
}

// ---------------------------------------------------------------------------
// A plugin (controller and node in one `stowage serve`)

/// A `stowage serve` (mode all) for object volumes, its state and pool in
/// a scratch directory of its own, without a pool filesystem (object
/// volumes keep nothing in the pool). Dropping it kills the server,
/// detaches every mount under its scratch directory and ends the s3fs
/// daemons mounting there, so that a failed test leaves nothing.
struct Plugin {
    env: Env,
}

impl Plugin {
    async fn start(tag: &str, node_id: &str) -> Plugin {
        let scratch = Scratch::new(&format!("obj-{tag}"));
        let root = scratch.root.clone();
        let layout = Layout {
            socket: root.join("csi.sock"),
            state: root.join("state"),
            pool: root.join("pool"),
            staging: root.join("staging"),
            targets: root.join("targets"),
        };
        std::fs::create_dir(&layout.staging).unwrap();
        std::fs::create_dir(&layout.targets).unwrap();
        let args: Vec<String> = vec![
            "serve".into(),
            "--endpoint".into(),
            format!("unix://{}", layout.socket.display()),
            "--node-id".into(),
            node_id.into(),
            "--state-dir".into(),
            layout.state.display().to_string(),
            "--pool".into(),
            layout.pool.display().to_string(),
            "--pool-image".into(),
            "never".into(),
        ];
        let server = Server::start(&layout.socket, args, &root.join("server.log"));
        let c = match try_connect(&layout.socket).await {
            Ok(c) => c,
            Err(e) => panic!("{e}\nserver log:\n{}", server.log_text()),
        };
        Plugin {
            env: Env {
                server,
                c,
                layout,
                node_id: node_id.into(),
                scratch,
            },
        }
    }

    fn c(&self) -> Clients {
        self.env.c.clone()
    }

    fn root(&self) -> &Path {
        &self.env.scratch.root
    }

    fn log(&self) -> String {
        self.env.server.log_text()
    }

    /// The last lines of the server log, for failure messages.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn staging_dir(&self, name: &str) -> PathBuf {
        self.env.staging_dir(name)
    }

    fn target_path(&self, name: &str) -> PathBuf {
        self.env.target_path(name)
    }

    /// The private mount point of a volume's s3fs mount on this node.
    fn private_mount(&self, vol: &csi::Volume) -> PathBuf {
        self.env
            .layout
            .state
            .join("object-mounts")
            .join(uuid_hex(vol))
    }

    /// The s3fs daemons this plugin's mounts run now.
    fn daemons(&self) -> BTreeSet<u32> {
        s3fs::daemons_under(self.root())
    }

    /// Asserts that none of `seen` (daemons this test saw) runs any more
    /// and that no s3fs mount is left under the scratch directory.
    fn assert_clean(&self, seen: &BTreeSet<u32>) {
        assert!(!seen.is_empty(), "the test saw no s3fs daemon at all");
        let left = s3fs::wait_gone(seen, Duration::from_secs(20));
        assert!(
            left.is_empty(),
            "s3fs daemons {left:?} outlived their unstage\n{}",
            self.log_tail()
        );
        let left = self.daemons();
        assert!(left.is_empty(), "s3fs daemons {left:?} left running");
        let mounts = s3fs::mounts_under(self.root());
        assert!(mounts.is_empty(), "s3fs mounts left: {mounts:?}");
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.env.server.kill9();
        s3fs::end_daemons_under(&self.env.scratch.root);
    }
}

// ---------------------------------------------------------------------------
// Requests

fn params(g: &Garage, extra: &[(&str, &str)]) -> HashMap<String, String> {
    params_at(&g.endpoint, &g.region, extra)
}

fn params_at(endpoint: &str, region: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut p = HashMap::from([
        ("backend".to_owned(), "object".to_owned()),
        ("endpoint".to_owned(), endpoint.to_owned()),
        ("region".to_owned(), region.to_owned()),
        ("mounter".to_owned(), "s3fs".to_owned()),
    ]);
    for (k, v) in extra {
        p.insert((*k).to_owned(), (*v).to_owned());
    }
    p
}

fn secrets(k: &S3Key) -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyID".to_owned(), k.access_key_id.clone()),
        ("secretAccessKey".to_owned(), k.secret_access_key.clone()),
    ])
}

fn cap(mode: Mode, group: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: String::new(),
                mount_flags: vec![],
                volume_mount_group: group.into(),
            },
        )),
    }
}

fn create_req(
    name: &str,
    params: HashMap<String, String>,
    secrets: HashMap<String, String>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: common::GIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter, "")],
        parameters: params,
        secrets,
        ..Default::default()
    }
}

async fn try_create(
    c: &mut Clients,
    req: csi::CreateVolumeRequest,
) -> Result<csi::Volume, tonic::Status> {
    c.controller
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.expect("a volume"))
}

async fn create(p: &Plugin, req: csi::CreateVolumeRequest) -> csi::Volume {
    let name = req.name.clone();
    try_create(&mut p.c(), req)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}\n{}", p.log_tail()))
}

async fn delete(p: &Plugin, id: &str, s: &HashMap<String, String>) -> Result<(), tonic::Status> {
    p.c()
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: s.clone(),
        })
        .await
        .map(drop)
}

async fn try_stage(
    p: &Plugin,
    vol: &csi::Volume,
    staging: &Path,
    s: &HashMap<String, String>,
    cap: csi::VolumeCapability,
) -> Result<(), tonic::Status> {
    p.c()
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            secrets: s.clone(),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// Stages `vol` read-write for many nodes and returns the s3fs daemon that
/// serves it (checked to mount the volume's private mount point).
async fn stage(p: &Plugin, vol: &csi::Volume, staging: &Path, key: &S3Key) -> u32 {
    try_stage(
        p,
        vol,
        staging,
        &secrets(key),
        cap(Mode::MultiNodeMultiWriter, ""),
    )
    .await
    .unwrap_or_else(|e| panic!("NodeStageVolume: {e:?}\n{}", p.log_tail()));
    staged_daemon(p, vol)
}

/// The daemon serving `vol` on `p`, after checking its private mount (and
/// that the staging paths show it).
fn staged_daemon(p: &Plugin, vol: &csi::Volume) -> u32 {
    let private = p.private_mount(vol);
    let e = mount_entry(&private)
        .unwrap_or_else(|| panic!("no mount at {}\n{}", private.display(), p.log_tail()));
    assert_eq!(e.fs_type, "fuse.s3fs", "{e:?}");
    let binds: Vec<_> = stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .filter(|b| b.mount_point.starts_with(&p.env.layout.staging))
        .collect();
    assert!(
        binds.iter().all(|b| b.fs_type == "fuse.s3fs"),
        "a staging path shows something else than the s3fs mount: {binds:?}"
    );
    daemon_of(&private).unwrap_or_else(|| panic!("no s3fs daemon mounts {}", private.display()))
}

async fn publish(
    p: &Plugin,
    vol: &csi::Volume,
    staging: &Path,
    target: &Path,
    mode: Mode,
    readonly: bool,
) -> Result<(), tonic::Status> {
    p.c()
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap(mode, "")),
            readonly,
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unpublish(p: &Plugin, id: &str, target: &Path) {
    p.c()
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("NodeUnpublishVolume: {e:?}\n{}", p.log_tail()));
}

async fn unstage(p: &Plugin, id: &str, staging: &Path) {
    p.c()
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("NodeUnstageVolume: {e:?}\n{}", p.log_tail()));
}

/// NodeGetVolumeStats' condition of `vol` at `path`: (abnormal, message).
async fn condition(p: &Plugin, id: &str, path: &Path) -> Result<(bool, String), tonic::Status> {
    let r = p
        .c()
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await?
        .into_inner();
    let c = r.volume_condition.expect("VOLUME_CONDITION: a condition");
    Ok((c.abnormal, c.message))
}

/// The volume's uuid as its bucket or prefix shows it.
fn uuid_hex(vol: &csi::Volume) -> String {
    let ctx = &vol.volume_context;
    let prefix = &ctx[CTX_PREFIX];
    if prefix.is_empty() {
        ctx[CTX_BUCKET]
            .strip_prefix("stowage-")
            .expect("a bucket-per-volume name is stowage-<uuid>")
            .to_owned()
    } else {
        prefix.trim_end_matches('/').to_owned()
    }
}

// ---------------------------------------------------------------------------
// The S3 service seen from outside stowage

/// The bucket names Garage knows, asked through its admin API (not S3):
/// global aliases, and the local aliases of keys (Garage gives a bucket
/// made by S3 CreateBucket a local alias of the key that made it).
fn buckets(g: &Garage) -> BTreeSet<String> {
    let list = g.json_api("ListBuckets", serde_json::Value::Null);
    let mut out = BTreeSet::new();
    for b in list
        .as_array()
        .unwrap_or_else(|| panic!("ListBuckets: {list}"))
    {
        for a in b["globalAliases"].as_array().into_iter().flatten() {
            out.extend(a.as_str().map(str::to_owned));
        }
        for a in b["localAliases"].as_array().into_iter().flatten() {
            out.extend(a["alias"].as_str().map(str::to_owned));
        }
    }
    out
}

fn s3(g: &Garage, key: &S3Key) -> S3Client {
    S3Client::new(
        &S3Config {
            endpoint: g.endpoint.clone(),
            region: g.region.clone(),
        },
        S3Credentials {
            access_key_id: key.access_key_id.clone(),
            secret_access_key: key.secret_access_key.clone(),
        },
    )
    .unwrap()
}

/// Objects and bytes under a volume's location, listed through S3.
async fn usage(g: &Garage, vol: &csi::Volume) -> (u64, u64) {
    let ctx = &vol.volume_context;
    s3(g, &g.key)
        .usage(&ctx[CTX_BUCKET], &ctx[CTX_PREFIX])
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------
// Files

fn write_file(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[track_caller]
fn assert_same_file(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(got.len(), want.len(), "{}: length", path.display());
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i}", path.display());
    }
}

/// Every regular file under `dir`, by path relative to it, with content.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().to_owned();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Create and delete

/// CreateVolume is idempotent by name ("if a volume corresponding to the
/// specified volume name already exists and is compatible ... MUST reply
/// 0 OK with the corresponding CreateVolumeResponse"), ALREADY_EXISTS for
/// the same name with other parameters; DeleteVolume twice is OK
/// ("MUST reply 0 OK" for a volume that does not exist); the bucket is
/// removed, or kept with onDelete=retain. The volume carries no topology
/// and a context without credentials.
#[tokio::test(flavor = "multi_thread")]
async fn create_delete_are_idempotent_and_delete_removes_or_retains_the_bucket() {
    let g = Garage::start();
    let p = Plugin::start("idem", "node-a").await;
    let s = secrets(&g.key);
    let before = buckets(&g);

    let v = create(&p, create_req("vol-1", params(&g, &[]), s.clone())).await;
    assert!(v.volume_id.starts_with("object:"), "{}", v.volume_id);
    assert!(
        v.accessible_topology.is_empty(),
        "{:?}",
        v.accessible_topology
    );
    let ctx = &v.volume_context;
    assert_eq!(ctx[CTX_ENDPOINT], g.endpoint);
    assert_eq!(ctx[CTX_REGION], g.region);
    assert_eq!(ctx[CTX_PREFIX], "");
    assert_eq!(ctx[CTX_MOUNTER], "s3fs");
    assert_eq!(ctx[CTX_CAPACITY_ENFORCED], "false");
    let bucket = ctx[CTX_BUCKET].clone();
    assert!(bucket.starts_with("stowage-"), "{bucket}");
    let ctx_text = format!("{ctx:?}");
    assert!(!ctx_text.contains(&g.key.secret_access_key), "{ctx_text}");
    assert!(!ctx_text.contains("secretAccessKey"), "{ctx_text}");
    let after: BTreeSet<String> = buckets(&g);
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        vec![&bucket],
        "exactly the volume's bucket was made"
    );

    // The same request again: the same volume.
    let again = create(&p, create_req("vol-1", params(&g, &[]), s.clone())).await;
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.volume_context, v.volume_context);
    assert_eq!(buckets(&g), after);

    // The same name, other parameters.
    let other = create_req("vol-1", params(&g, &[("onDelete", "retain")]), s.clone());
    assert_code(try_create(&mut p.c(), other).await, Code::AlreadyExists);
    let other = create_req(
        "vol-1",
        params(&g, &[("bucket", g.bucket.as_str())]),
        s.clone(),
    );
    assert_code(try_create(&mut p.c(), other).await, Code::AlreadyExists);

    // Delete needs the provisioner secrets, then removes the bucket; twice
    // is fine.
    assert_code(
        delete(&p, &v.volume_id, &HashMap::new()).await,
        Code::InvalidArgument,
    );
    assert!(
        buckets(&g).contains(&bucket),
        "refused delete kept the bucket"
    );
    delete(&p, &v.volume_id, &s)
        .await
        .unwrap_or_else(|e| panic!("DeleteVolume: {e:?}\n{}", p.log_tail()));
    assert!(
        !buckets(&g).contains(&bucket),
        "the bucket outlived its volume"
    );
    delete(&p, &v.volume_id, &s)
        .await
        .expect("second DeleteVolume");
    assert_eq!(buckets(&g), before);

    // onDelete=retain: the bucket (with what was written) stays.
    let r = create(
        &p,
        create_req("vol-keep", params(&g, &[("onDelete", "retain")]), s.clone()),
    )
    .await;
    let kept = r.volume_context[CTX_BUCKET].clone();
    s3(&g, &g.key)
        .put_object(&kept, "written-before-delete", b"kept".to_vec())
        .await
        .unwrap();
    delete(&p, &r.volume_id, &s)
        .await
        .expect("DeleteVolume retain");
    assert!(
        buckets(&g).contains(&kept),
        "onDelete=retain removed the bucket"
    );
    assert_eq!(
        s3(&g, &g.key)
            .get_object(&kept, "written-before-delete")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"kept"[..])
    );
    delete(&p, &r.volume_id, &s)
        .await
        .expect("DeleteVolume retain again");
    // Gone from the plugin: ListVolumes no longer shows either.
    let listed = p
        .c()
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.entries.iter().all(|e| e
            .volume
            .as_ref()
            .is_none_or(|v| !v.volume_id.starts_with("object:"))),
        "{listed:?}"
    );
}

/// The capabilities object volumes take (every access mode, mount only,
/// no fs_type) and the codes of bad parameters and secrets: missing
/// secrets and bad parameters INVALID_ARGUMENT, a wrong secret or a key
/// without rights PERMISSION_DENIED, an unreachable endpoint UNAVAILABLE,
/// a shared bucket that does not exist FAILED_PRECONDITION (CSI keeps
/// NOT_FOUND in CreateVolume for a missing content source). No failed
/// create leaves a bucket or a volume behind.
#[tokio::test(flavor = "multi_thread")]
async fn capabilities_and_error_codes_of_object_volumes() {
    let g = Garage::start();
    let p = Plugin::start("codes", "node-a").await;
    let s = secrets(&g.key);
    let before = buckets(&g);
    let mut c = p.c();

    // Every access mode is accepted.
    let mut req = create_req("modes", params(&g, &[]), s.clone());
    req.volume_capabilities = [
        Mode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|m| cap(m, ""))
    .collect();
    let v = create(&p, req).await;
    let confirmed = c
        .controller
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![
                cap(Mode::MultiNodeMultiWriter, ""),
                cap(Mode::MultiNodeReaderOnly, ""),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.confirmed.is_some(), "{confirmed:?}");
    delete(&p, &v.volume_id, &s).await.unwrap();

    // Raw block and a filesystem type are refused.
    let mut req = create_req("block", params(&g, &[]), s.clone());
    req.volume_capabilities = vec![common::block_cap(Mode::MultiNodeMultiWriter)];
    assert_code(try_create(&mut c, req).await, Code::InvalidArgument);
    let mut req = create_req("fs", params(&g, &[]), s.clone());
    req.volume_capabilities = vec![common::mount_cap("ext4", Mode::SingleNodeWriter)];
    assert_code(try_create(&mut c, req).await, Code::InvalidArgument);

    // Bad parameters.
    for extra in [
        vec![("mounter", "goofys")],
        vec![("onDelete", "keep")],
        vec![("bucket", "Not_A_Bucket")],
        vec![("nonsense", "1")],
        vec![("endpoint", "ftp://127.0.0.1:1")],
    ] {
        let req = create_req("bad-param", params(&g, &extra), s.clone());
        assert_code(try_create(&mut c, req).await, Code::InvalidArgument);
    }
    let mut no_endpoint = params(&g, &[]);
    no_endpoint.remove("endpoint");
    let req = create_req("bad-param", no_endpoint, s.clone());
    assert_code(try_create(&mut c, req).await, Code::InvalidArgument);

    // Missing secrets, or half of them.
    assert_code(
        try_create(
            &mut c,
            create_req("no-secrets", params(&g, &[]), HashMap::new()),
        )
        .await,
        Code::InvalidArgument,
    );
    let mut half = s.clone();
    half.remove("secretAccessKey");
    assert_code(
        try_create(&mut c, create_req("no-secrets", params(&g, &[]), half)).await,
        Code::InvalidArgument,
    );

    // A wrong secret, and a key that may not create buckets.
    let wrong = S3Key {
        access_key_id: g.key.access_key_id.clone(),
        secret_access_key: "0".repeat(64),
    };
    assert_code(
        try_create(
            &mut c,
            create_req("wrong", params(&g, &[]), secrets(&wrong)),
        )
        .await,
        Code::PermissionDenied,
    );
    let weak = g.key_without_rights();
    assert_code(
        try_create(&mut c, create_req("weak", params(&g, &[]), secrets(&weak))).await,
        Code::PermissionDenied,
    );
    // ... nor use a shared bucket of someone else.
    let _ = g.bucket_of_other_key("someone-elses");
    assert_code(
        try_create(
            &mut c,
            create_req(
                "foreign",
                params(&g, &[("bucket", "someone-elses")]),
                s.clone(),
            ),
        )
        .await,
        Code::PermissionDenied,
    );

    // An endpoint where nothing listens.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let req = create_req(
        "unreachable",
        params_at(&format!("http://127.0.0.1:{dead}"), &g.region, &[]),
        s.clone(),
    );
    assert_code(try_create(&mut c, req).await, Code::Unavailable);

    // A shared bucket that does not exist.
    let req = create_req(
        "no-bucket",
        params(&g, &[("bucket", "no-such-bucket")]),
        s.clone(),
    );
    assert_code(try_create(&mut c, req).await, Code::FailedPrecondition);

    // Nothing of the failures is left: no bucket, no volume.
    let mut expected = before.clone();
    expected.insert("someone-elses".into());
    assert_eq!(buckets(&g), expected);
    let listed = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    // And a failed name can be used afterwards.
    let v = create(&p, create_req("wrong", params(&g, &[]), s.clone())).await;
    delete(&p, &v.volume_id, &s).await.unwrap();
}

/// NodeStageVolume of an object volume: missing node-stage secrets or a
/// raw-block capability are INVALID_ARGUMENT; a wrong secret fails without
/// leaving a daemon or a mount; staging twice the same way is OK (CSI:
/// "MUST reply 0 OK" when already staged compatibly).
#[tokio::test(flavor = "multi_thread")]
async fn node_stage_checks_secrets_and_is_idempotent() {
    let g = Garage::start();
    let p = Plugin::start("stage", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("staged", params(&g, &[]), s.clone())).await;
    let staging = p.staging_dir("v");

    assert_code(
        try_stage(
            &p,
            &v,
            &staging,
            &HashMap::new(),
            cap(Mode::MultiNodeMultiWriter, ""),
        )
        .await,
        Code::InvalidArgument,
    );
    let raw = csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        ..cap(Mode::MultiNodeMultiWriter, "")
    };
    assert_code(
        try_stage(&p, &v, &staging, &s, raw).await,
        Code::InvalidArgument,
    );
    let wrong = S3Key {
        access_key_id: g.key.access_key_id.clone(),
        secret_access_key: "1".repeat(64),
    };
    let r = try_stage(
        &p,
        &v,
        &staging,
        &secrets(&wrong),
        cap(Mode::MultiNodeMultiWriter, ""),
    )
    .await;
    let e = r.expect_err("a stage with a wrong secret must fail");
    eprintln!(
        "NodeStage with a wrong secret: {:?} {}",
        e.code(),
        e.message()
    );
    assert!(
        matches!(e.code(), Code::PermissionDenied | Code::FailedPrecondition),
        "{e:?}"
    );
    assert!(!e.message().contains(&wrong.secret_access_key));
    assert!(
        mount_entry(&staging).is_none(),
        "a failed stage left a mount"
    );
    let left = s3fs::wait_gone(&p.daemons(), Duration::from_secs(20));
    assert!(left.is_empty(), "a failed stage left s3fs daemons {left:?}");

    let pid = stage(&p, &v, &staging, &g.key).await;
    let mut seen = BTreeSet::from([pid]);
    try_stage(&p, &v, &staging, &s, cap(Mode::MultiNodeMultiWriter, ""))
        .await
        .unwrap_or_else(|e| panic!("a repeated NodeStage: {e:?}\n{}", p.log_tail()));
    assert_eq!(
        staged_daemon(&p, &v),
        pid,
        "a repeated stage started another daemon"
    );
    seen.extend(p.daemons());
    assert_eq!(seen.len(), 1, "one daemon per staged volume: {seen:?}");
    write_file(&staging.join("f"), b"hello");
    unstage(&p, &v.volume_id, &staging).await;
    // Unstage twice is OK too.
    unstage(&p, &v.volume_id, &staging).await;
    assert!(mount_entry(&staging).is_none());
    p.assert_clean(&seen);
    // Nothing of the volume's daemon (log, temporary files) or of its
    // private mount point stays in the state directory.
    let uuid = v.volume_id.rsplit(':').next().unwrap().to_owned();
    for left in [
        p.env.layout.state.join("object").join(&uuid),
        p.env.layout.state.join("object-mounts").join(&uuid),
    ] {
        assert!(!left.exists(), "{} is left after unstage", left.display());
    }
    delete(&p, &v.volume_id, &s).await.unwrap();
}

// ---------------------------------------------------------------------------
// 2. Bucket mode and prefix mode

/// Without `bucket` each volume gets a bucket of its own; with it, each
/// volume is a prefix of the shared bucket: two volumes there see only
/// their own files, and deleting one removes only its prefix.
#[tokio::test(flavor = "multi_thread")]
async fn bucket_mode_and_prefix_mode_keep_volumes_apart() {
    let g = Garage::start();
    let p = Plugin::start("modes", "node-a").await;
    let s = secrets(&g.key);
    let shared = g.bucket.clone();

    let own = create(&p, create_req("own", params(&g, &[]), s.clone())).await;
    let a = create(
        &p,
        create_req("pa", params(&g, &[("bucket", shared.as_str())]), s.clone()),
    )
    .await;
    let b = create(
        &p,
        create_req("pb", params(&g, &[("bucket", shared.as_str())]), s.clone()),
    )
    .await;
    assert!(own.volume_context[CTX_BUCKET].starts_with("stowage-"));
    assert_eq!(own.volume_context[CTX_PREFIX], "");
    for v in [&a, &b] {
        assert_eq!(v.volume_context[CTX_BUCKET], shared);
        assert_eq!(v.volume_context[CTX_PREFIX], format!("{}/", uuid_hex(v)));
    }
    assert_ne!(a.volume_context[CTX_PREFIX], b.volume_context[CTX_PREFIX]);
    // A file that is no volume's, at the top of the shared bucket.
    s3(&g, &g.key)
        .put_object(&shared, "outsider", b"not a volume".to_vec())
        .await
        .unwrap();

    let mut seen = BTreeSet::new();
    let mut staged = Vec::new();
    for (i, v) in [&own, &a, &b].into_iter().enumerate() {
        let st = p.staging_dir(&format!("s{i}"));
        seen.insert(stage(&p, v, &st, &g.key).await);
        write_file(&st.join(format!("file-{i}")), &pattern(i as u64, 1000 + i));
        std::fs::create_dir(st.join(format!("dir-{i}"))).unwrap();
        staged.push(st);
    }
    assert_eq!(seen.len(), 3, "one daemon per volume: {seen:?}");
    for (i, st) in staged.iter().enumerate() {
        assert_eq!(
            names(st),
            BTreeSet::from([format!("file-{i}"), format!("dir-{i}")]),
            "volume {i} sees only its own files"
        );
        assert_same_file(&st.join(format!("file-{i}")), &pattern(i as u64, 1000 + i));
    }
    // Through S3: each prefix holds its volume's objects only.
    let (objects, bytes) = usage(&g, &a).await;
    assert!(objects >= 1 && bytes >= 1001, "{objects} {bytes}");

    for (v, st) in [&own, &a, &b].into_iter().zip(&staged) {
        unstage(&p, &v.volume_id, st).await;
    }
    p.assert_clean(&seen);
    delete(&p, &a.volume_id, &s).await.unwrap();
    assert_eq!(
        usage(&g, &a).await,
        (0, 0),
        "the deleted volume's prefix is empty"
    );
    assert_ne!(
        usage(&g, &b).await.0,
        0,
        "the other volume's prefix was touched"
    );
    assert!(
        buckets(&g).contains(&shared),
        "a prefix delete removed the shared bucket"
    );
    assert!(
        s3(&g, &g.key)
            .get_object(&shared, "outsider")
            .await
            .unwrap()
            .is_some(),
        "a prefix delete removed an object outside it"
    );
    delete(&p, &b.volume_id, &s).await.unwrap();
    delete(&p, &own.volume_id, &s).await.unwrap();
    assert!(!buckets(&g).contains(&own.volume_context[CTX_BUCKET]));
}

// ---------------------------------------------------------------------------
// 3. Many nodes

/// MULTI_NODE_MULTI_WRITER: the volume staged on two nodes (two plugins
/// with their own node ids and state on this host) is one volume: what one
/// node writes, the other reads byte for byte, both ways.
#[tokio::test(flavor = "multi_thread")]
async fn what_node_a_writes_node_b_reads() {
    let g = Garage::start();
    let a = Plugin::start("node-a", "node-a").await;
    let b = Plugin::start("node-b", "node-b").await;
    let s = secrets(&g.key);
    let v = create(&a, create_req("shared", params(&g, &[]), s.clone())).await;

    let st_a = a.staging_dir("v");
    let st_b = b.staging_dir("v");
    let mut seen = BTreeSet::from([stage(&a, &v, &st_a, &g.key).await]);
    seen.insert(stage(&b, &v, &st_b, &g.key).await);
    assert_eq!(seen.len(), 2, "each node runs its own daemon");
    let t_a = a.target_path("pod-a");
    let t_b = b.target_path("pod-b");
    publish(&a, &v, &st_a, &t_a, Mode::MultiNodeMultiWriter, false)
        .await
        .unwrap();
    publish(&b, &v, &st_b, &t_b, Mode::MultiNodeMultiWriter, false)
        .await
        .unwrap();

    let data = pattern(3, 3 << 20);
    write_file(&t_a.join("from-a"), &data);
    std::fs::create_dir(t_a.join("dir")).unwrap();
    write_file(&t_a.join("dir").join("nested"), b"nested from a");
    assert_same_file(&t_b.join("from-a"), &data);
    assert_same_file(&t_b.join("dir").join("nested"), b"nested from a");

    let back = pattern(4, 100_000);
    write_file(&t_b.join("from-b"), &back);
    assert_same_file(&t_a.join("from-b"), &back);

    for (p, t, st) in [(&a, &t_a, &st_a), (&b, &t_b, &st_b)] {
        unpublish(p, &v.volume_id, t).await;
        unstage(p, &v.volume_id, st).await;
    }
    a.assert_clean(&seen);
    b.assert_clean(&seen);
    delete(&a, &v.volume_id, &s).await.unwrap();
}

// ---------------------------------------------------------------------------
// 4. File operations

/// Random writes into a file, rename of a file and of a directory, fsync,
/// and a 64 MiB file (multipart upload): all read back byte for byte from
/// a fresh mount after unstage and stage again.
#[tokio::test(flavor = "multi_thread")]
async fn random_writes_rename_fsync_and_a_large_file_survive_a_restage() {
    let g = Garage::start();
    let p = Plugin::start("files", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("files", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let mut seen = BTreeSet::from([stage(&p, &v, &st, &g.key).await]);
    publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
        .await
        .unwrap();

    // Random writes against an in-memory model.
    let len = 5 << 20;
    let mut model = pattern(10, len);
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(t.join("random"))
            .unwrap();
        f.write_all(&model).unwrap();
        f.sync_all().unwrap();
        let offsets = pattern(11, 64);
        for (i, o) in offsets.chunks(2).enumerate() {
            let at = (u16::from_le_bytes([o[0], o[1]]) as usize * 73) % (len - 9000);
            let chunk = pattern(100 + i as u64, 1 + (i * 277) % 9000);
            f.write_all_at(&chunk, at as u64).unwrap();
            model[at..at + chunk.len()].copy_from_slice(&chunk);
            if i.is_multiple_of(8) {
                f.sync_data().unwrap();
            }
        }
        // Extend past the end, then read back through the same descriptor.
        let tail = pattern(12, 4096);
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&tail).unwrap();
        model.extend_from_slice(&tail);
        f.sync_all().unwrap();
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert!(back == model, "read back through the open file differs");
    }
    assert_same_file(&t.join("random"), &model);

    // Renames.
    write_file(&t.join("old-name"), b"renamed file");
    std::fs::rename(t.join("old-name"), t.join("new-name")).unwrap();
    std::fs::create_dir(t.join("dir-old")).unwrap();
    write_file(&t.join("dir-old").join("inside"), b"inside a renamed dir");
    std::fs::rename(t.join("dir-old"), t.join("dir-new")).unwrap();
    assert!(!t.join("old-name").exists() && !t.join("dir-old").exists());

    // A large file, written in odd-sized pieces.
    let big = pattern(13, 64 << 20);
    {
        let mut f = std::fs::File::create(t.join("big")).unwrap();
        for piece in big.chunks((3 << 20) + 12345) {
            f.write_all(piece).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert_eq!(
        std::fs::metadata(t.join("big")).unwrap().len(),
        big.len() as u64
    );

    let before = tree(&t);
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);

    // A fresh daemon (no cache) shows the same.
    let st2 = p.staging_dir("v2");
    seen.insert(stage(&p, &v, &st2, &g.key).await);
    assert_same_file(&st2.join("random"), &model);
    assert_same_file(&st2.join("new-name"), b"renamed file");
    assert_same_file(&st2.join("dir-new").join("inside"), b"inside a renamed dir");
    assert_same_file(&st2.join("big"), &big);
    assert!(!st2.join("old-name").exists() && !st2.join("dir-old").exists());
    let after = tree(&st2);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert!(before == after, "content differs after the restage");
    unstage(&p, &v.volume_id, &st2).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
}

// ---------------------------------------------------------------------------
// 5. Read-only and mount group

/// NodePublishVolume with readonly=true ("the volume MUST be published as
/// read-only") refuses writes with EROFS while the data reads; a
/// MULTI_NODE_READER_ONLY stage is read-only too.
#[tokio::test(flavor = "multi_thread")]
async fn read_only_publish_refuses_writes() {
    let g = Garage::start();
    let p = Plugin::start("ro", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("ro", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let mut seen = BTreeSet::from([stage(&p, &v, &st, &g.key).await]);
    write_file(&st.join("data"), b"readable");

    let ro = p.target_path("ro");
    let rw = p.target_path("rw");
    publish(&p, &v, &st, &ro, Mode::MultiNodeMultiWriter, true)
        .await
        .unwrap();
    publish(&p, &v, &st, &rw, Mode::MultiNodeMultiWriter, false)
        .await
        .unwrap();
    assert_same_file(&ro.join("data"), b"readable");
    let e = std::fs::File::create(ro.join("new")).expect_err("a write through a read-only target");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(ro.join("data"))
        .expect_err("an open for writing through a read-only target");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(
        std::fs::remove_file(ro.join("data"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // The read-write target next to it still writes, and the read-only
    // one sees it.
    write_file(&rw.join("new"), b"via rw");
    assert_same_file(&ro.join("new"), b"via rw");
    unpublish(&p, &v.volume_id, &ro).await;
    unpublish(&p, &v.volume_id, &rw).await;
    unstage(&p, &v.volume_id, &st).await;

    // MULTI_NODE_READER_ONLY: the stage itself is read-only.
    let st2 = p.staging_dir("v-rox");
    try_stage(&p, &v, &st2, &s, cap(Mode::MultiNodeReaderOnly, ""))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log_tail()));
    seen.insert(staged_daemon(&p, &v));
    let t = p.target_path("rox");
    publish(&p, &v, &st2, &t, Mode::MultiNodeReaderOnly, true)
        .await
        .unwrap();
    assert_same_file(&t.join("data"), b"readable");
    let e = std::fs::File::create(t.join("x")).expect_err("a write on a reader-only volume");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st2).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
}

/// VOLUME_MOUNT_GROUP: the node advertises it, and `volume_mount_group`
/// at NodeStage makes every file of the object volume show that group
/// (s3fs gid=) with group write.
#[tokio::test(flavor = "multi_thread")]
async fn volume_mount_group_sets_the_group_of_object_files() {
    let g = Garage::start();
    let p = Plugin::start("gid", "node-a").await;
    let s = secrets(&g.key);
    let caps = p
        .c()
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
    assert!(advertised, "VOLUME_MOUNT_GROUP not advertised: {caps:?}");

    let v = create(&p, create_req("gid", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    try_stage(&p, &v, &st, &s, cap(Mode::MultiNodeMultiWriter, "4321"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log_tail()));
    let seen = BTreeSet::from([staged_daemon(&p, &v)]);
    write_file(&st.join("f"), b"group");
    std::fs::create_dir(st.join("d")).unwrap();
    for path in [st.join("f"), st.join("d"), st.clone()] {
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.gid(), 4321, "{}", path.display());
        assert_ne!(m.mode() & 0o020, 0, "{}: no group write", path.display());
    }
    // A group that is not a number.
    let other = p.staging_dir("v2");
    assert_code(
        try_stage(&p, &v, &other, &s, cap(Mode::MultiNodeMultiWriter, "staff")).await,
        Code::InvalidArgument,
    );
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
}

/// NodeGetVolumeStats of an object volume: VolumeUsage's available, total
/// and used "MUST NOT be negative", at the target and at the staging path.
#[tokio::test(flavor = "multi_thread")]
async fn volume_stats_of_an_object_volume_are_not_negative() {
    let g = Garage::start();
    let p = Plugin::start("stats", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("stats", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let seen = BTreeSet::from([stage(&p, &v, &st, &g.key).await]);
    publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
        .await
        .unwrap();
    write_file(&t.join("f"), &pattern(5, 100_000));
    let mut bad = Vec::new();
    for path in [&t, &st] {
        let r = p
            .c()
            .node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeGetVolumeStats: {e:?}\n{}", p.log_tail()))
            .into_inner();
        eprintln!("{}: {:?}", path.display(), r.usage);
        bad.extend(
            r.usage
                .iter()
                .filter(|u| u.available < 0 || u.total < 0 || u.used < 0)
                .map(|u| format!("{}: {u:?}", path.display())),
        );
    }
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
    assert!(bad.is_empty(), "negative usage: {bad:#?}");
}

// ---------------------------------------------------------------------------
// 6. The FUSE daemon dies

/// kill -9 of the s3fs daemon: NodeGetVolumeStats reports the volume
/// abnormal (VOLUME_CONDITION), then the supervisor mounts it again, binds
/// staging and target anew, and the data reads through the target again.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_fuse_daemon_turns_abnormal_then_is_restored() {
    let g = Garage::start();
    let p = Plugin::start("fusekill", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("fusekill", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let first = stage(&p, &v, &st, &g.key).await;
    let mut seen = BTreeSet::from([first]);
    publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
        .await
        .unwrap();
    let data = pattern(20, 1 << 20);
    write_file(&t.join("data"), &data);
    let normal = condition(&p, &v.volume_id, &t).await.unwrap();
    assert!(!normal.0, "{normal:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(s3fs::wait_gone(&BTreeSet::from([first]), LIMIT).is_empty());

    // Abnormal: until the supervisor's next pass (every 2 s) and during
    // the remount.
    let start = Instant::now();
    let message = loop {
        match condition(&p, &v.volume_id, &t).await {
            Ok((true, m)) => break m,
            Ok((false, _)) if daemon_of(&p.private_mount(&v)).is_some_and(|d| d != first) => {
                panic!(
                    "remounted before any NodeGetVolumeStats reported the volume abnormal\n{}",
                    p.log_tail()
                )
            }
            Ok(_) => {}
            // The supervisor may hold the volume while it remounts.
            Err(e) if e.code() == Code::Aborted => {}
            Err(e) => panic!(
                "NodeGetVolumeStats on a dead mount: {e:?}\n{}",
                p.log_tail()
            ),
        }
        assert!(start.elapsed() < LIMIT, "never abnormal\n{}", p.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!message.is_empty());
    eprintln!("condition after the kill: {message}");

    // Then healthy again, served by a new daemon, through the same target.
    let start = Instant::now();
    loop {
        let c = condition(&p, &v.volume_id, &t).await;
        if matches!(c, Ok((false, _))) && std::fs::read(t.join("data")).is_ok_and(|d| d == data) {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "not restored: {c:?}\n{}",
            p.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    let second = staged_daemon(&p, &v);
    assert_ne!(second, first);
    seen.insert(second);
    // Staging and target show the new mount and take writes.
    write_file(&t.join("after"), b"after the restore");
    assert_same_file(&st.join("after"), b"after the restore");
    assert!(
        p.log().contains("died") || p.log().contains("again"),
        "the log says nothing"
    );

    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
}

// ---------------------------------------------------------------------------
// 7. The node plugin dies

/// kill -9 of the node plugin while a pod writes: the s3fs daemon is not
/// its child in any way that matters (own session), so the writer never
/// notices; the restarted plugin adopts the same daemon (condition
/// normal), and unstage ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_plugin_leaves_writers_alone_and_readopts_the_daemon() {
    let g = Garage::start();
    let mut p = Plugin::start("pluginkill", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("pluginkill", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let daemon = stage(&p, &v, &st, &g.key).await;
    let seen = BTreeSet::from([daemon]);
    publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
        .await
        .unwrap();

    // The writer: 64 KiB chunks of a known pattern, fsync every 16.
    const CHUNK: usize = 64 << 10;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, path) = (stop.clone(), written.clone(), t.join("stream"));
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut f = std::fs::File::create(&path)?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 64 {
                f.write_all(&pattern(n, CHUNK))?;
                n += 1;
                if n.is_multiple_of(16) {
                    f.sync_data()?;
                }
                written.store(n, Ordering::Relaxed);
            }
            f.sync_all()?;
            Ok(n)
        })
    };
    let wait_for = |target: u64| {
        let start = Instant::now();
        while written.load(Ordering::Relaxed) < target {
            assert!(!writer.is_finished(), "the writer stopped early");
            assert!(start.elapsed() < LIMIT, "the writer is stuck");
            std::thread::sleep(POLL);
        }
    };
    wait_for(8);
    let server_pid = p.env.server.pid();
    p.env.server.kill9();
    assert!(!s3fs::alive(server_pid as u32));
    // The writer goes on while no plugin runs.
    let at_kill = written.load(Ordering::Relaxed);
    wait_for(at_kill + 32);
    assert!(s3fs::alive(daemon), "the s3fs daemon died with the plugin");

    p.env.server.restart();
    p.env.reconnect().await;
    let start = Instant::now();
    loop {
        match condition(&p, &v.volume_id, &t).await {
            Ok((false, _)) => break,
            other => assert!(
                start.elapsed() < LIMIT,
                "not normal after the restart: {other:?}\n{}",
                p.log_tail()
            ),
        }
        tokio::time::sleep(POLL).await;
    }
    let at_restart = written.load(Ordering::Relaxed);
    wait_for(at_restart + 16);
    stop.store(true, Ordering::Relaxed);
    let chunks = writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the writer noticed: {e}\n{}", p.log_tail()));
    assert_eq!(
        staged_daemon(&p, &v),
        daemon,
        "the restarted plugin replaced the daemon"
    );
    assert!(s3fs::alive(daemon));

    // Every chunk made it, in order.
    let got = std::fs::read(t.join("stream")).unwrap();
    assert_eq!(got.len() as u64, chunks * CHUNK as u64);
    for (i, c) in got.chunks(CHUNK).enumerate() {
        assert!(
            c == pattern(i as u64, CHUNK).as_slice(),
            "chunk {i} differs"
        );
    }
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
}

/// The two together: after a plugin restart (which adopted the running
/// daemon, and has no request's secrets in memory any more), kill -9 of
/// the daemon is still detected and repaired: the restarted plugin finds
/// the credentials again from the adopted daemon.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_dies_after_a_plugin_restart_is_restored_too() {
    let g = Garage::start();
    let mut p = Plugin::start("restartkill", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("rk", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let first = stage(&p, &v, &st, &g.key).await;
    let mut seen = BTreeSet::from([first]);
    publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
        .await
        .unwrap();
    write_file(&t.join("data"), b"before the restart");

    p.env.server.kill9();
    p.env.server.restart();
    p.env.reconnect().await;
    let start = Instant::now();
    while !matches!(condition(&p, &v.volume_id, &t).await, Ok((false, _))) {
        assert!(
            start.elapsed() < LIMIT,
            "not normal after the restart\n{}",
            p.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        staged_daemon(&p, &v),
        first,
        "the restart replaced the daemon"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(s3fs::wait_gone(&BTreeSet::from([first]), LIMIT).is_empty());
    let start = Instant::now();
    loop {
        let c = condition(&p, &v.volume_id, &t).await;
        let new = daemon_of(&p.private_mount(&v)).filter(|&d| d != first);
        if matches!(c, Ok((false, _)))
            && new.is_some()
            && std::fs::read(t.join("data")).is_ok_and(|d| d == b"before the restart")
        {
            seen.extend(new);
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "not restored after a restart and a daemon kill: {c:?}\n{}",
            p.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    write_file(&t.join("after"), b"after");
    assert_same_file(&st.join("after"), b"after");
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    delete(&p, &v.volume_id, &s).await.unwrap();
}

// ---------------------------------------------------------------------------
// 8. Secrets

/// Files under `dir`, not descending into mount points (a staged volume's
/// FUSE mount under the state directory holds data, not state).
fn files_under(dir: &Path, mounts: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            if mounts.contains(&path) {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out
}

/// Issue 12: credentials "never logged, never in volume_context, never on
/// a child process's command line or in a world-readable file". After a
/// create, stage, publish, snapshot, a failed create with another secret
/// and unstage, neither secret is in the server log, any file of the state
/// directory, any answer, or any process's command line.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_absent_from_logs_state_answers_and_command_lines() {
    let g = Garage::start();
    let p = Plugin::start("secrets", "node-a").await;
    let s = secrets(&g.key);
    let secret = g.key.secret_access_key.clone();
    let other_secret = format!("{}abc", "f".repeat(61));
    let v = create(&p, create_req("sec", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let daemon = stage(&p, &v, &st, &g.key).await;
    publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
        .await
        .unwrap();
    write_file(&t.join("f"), b"data");
    let wrong = S3Key {
        access_key_id: g.key.access_key_id.clone(),
        secret_access_key: other_secret.clone(),
    };
    let _ = try_create(
        &mut p.c(),
        create_req("wrong", params(&g, &[]), secrets(&wrong)),
    )
    .await;
    let snap = p
        .c()
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: "sec-snap".into(),
            secrets: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log_tail()))
        .into_inner()
        .snapshot
        .unwrap();

    let mut answers = String::new();
    let mut c = p.c();
    answers += &format!(
        "{:?}",
        c.controller
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
    );
    answers += &format!(
        "{:?}",
        c.controller
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
    );
    answers += &format!("{:?}", condition(&p, &v.volume_id, &t).await);
    answers += &format!("{v:?}{snap:?}");

    let check = |what: &str, text: &str| {
        for sec in [&secret, &other_secret] {
            assert!(!text.contains(sec.as_str()), "a secret in {what}");
        }
    };
    check("the answers", &answers);
    // Every process's command line, the daemon's included.
    let mut cmdlines = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            cmdlines += 1;
            check(
                &format!("{}/cmdline", e.path().display()),
                &String::from_utf8_lossy(&raw),
            );
        }
    }
    assert!(cmdlines > 3);
    let argv = std::fs::read(format!("/proc/{daemon}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&argv).contains("s3fs"));

    let inspect = |p: &Plugin| {
        check("the server log", &p.log());
        assert!(
            p.log().contains("object volume"),
            "the log says nothing of the volume"
        );
        let mounts: BTreeSet<PathBuf> = stowage::os::mountinfo::MountTable::read()
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.mount_point)
            .collect();
        let files = files_under(&p.env.layout.state, &mounts);
        assert!(!files.is_empty(), "no state files");
        for f in files {
            let text = std::fs::read(&f).unwrap_or_default();
            check(&f.display().to_string(), &String::from_utf8_lossy(&text));
            // And no state file is for others to read.
            let mode = std::fs::metadata(&f).unwrap().mode();
            assert_eq!(mode & 0o004, 0, "{} is world-readable", f.display());
        }
    };
    inspect(&p);
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    let _ = p
        .c()
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: s.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log_tail()));
    delete(&p, &v.volume_id, &s).await.unwrap();
    inspect(&p);
    p.assert_clean(&BTreeSet::from([daemon]));
}

// ---------------------------------------------------------------------------
// 9. Snapshots

fn snap_req(name: &str, source: &str, s: &HashMap<String, String>) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        secrets: s.clone(),
        ..Default::default()
    }
}

async fn list_snapshot(p: &Plugin, id: &str) -> Option<csi::Snapshot> {
    p.c()
        .controller
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("ListSnapshots: {e:?}\n{}", p.log_tail()))
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .find(|s| s.snapshot_id == id)
}

/// CreateVolume, retried while the plugin answers ABORTED (an operation on
/// the source is in flight).
async fn create_retrying(p: &Plugin, req: csi::CreateVolumeRequest) -> csi::Volume {
    let start = Instant::now();
    loop {
        match try_create(&mut p.c(), req.clone()).await {
            Ok(v) => return v,
            Err(e) if e.code() == Code::Aborted && start.elapsed() < LIMIT => {
                tokio::time::sleep(POLL).await
            }
            Err(e) => panic!("CreateVolume {}: {e:?}\n{}", req.name, p.log_tail()),
        }
    }
}

/// A snapshot of an object volume is a server-side copy: CreateSnapshot
/// answers ready_to_use=false while it runs ("the CO MAY call
/// CreateSnapshot again" / ListSnapshots to see it turn ready), then true;
/// a volume restored from it holds the 1 000-file tree byte for byte as it
/// was at the snapshot, not later changes; deleting everything leaves
/// only the buckets there were.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_and_restore_a_tree_of_1000_files() {
    let g = Garage::start();
    let p = Plugin::start("snap", "node-a").await;
    let s = secrets(&g.key);
    let before = buckets(&g);
    let v = create(&p, create_req("src", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("src");
    let mut seen = BTreeSet::from([stage(&p, &v, &st, &g.key).await]);

    let mut want = BTreeMap::new();
    for d in 0..10 {
        let dir = st.join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            let i = d * 100 + f;
            let data = pattern(1000 + i, 1 + (i as usize * 37) % 3000);
            std::fs::write(dir.join(format!("f{f:03}")), &data).unwrap();
            want.insert(PathBuf::from(format!("d{d}/f{f:03}")), data);
        }
    }
    assert!(tree(&st) == want, "the source tree reads back differently");

    let first = p
        .c()
        .controller
        .create_snapshot(snap_req("snap-1", &v.volume_id, &s))
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot: {e:?}\n{}", p.log_tail()))
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(first.source_volume_id, v.volume_id);
    // The copy of 1 000 objects runs in the background: the answer comes
    // before it ends.
    assert!(
        !first.ready_to_use,
        "ready at once: not a background copy? {first:?}"
    );
    let mut polls = 0;
    let start = Instant::now();
    loop {
        let again = p
            .c()
            .controller
            .create_snapshot(snap_req("snap-1", &v.volume_id, &s))
            .await
            .unwrap_or_else(|e| panic!("CreateSnapshot again: {e:?}\n{}", p.log_tail()))
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(again.snapshot_id, first.snapshot_id);
        let listed = list_snapshot(&p, &first.snapshot_id).await.expect("listed");
        polls += 1;
        if again.ready_to_use {
            // ListSnapshots agrees (it may have turned in between).
            let listed = list_snapshot(&p, &first.snapshot_id).await.unwrap();
            assert!(listed.ready_to_use, "{listed:?}");
            break;
        }
        let _ = listed;
        assert!(
            start.elapsed() < LIMIT,
            "the snapshot never became ready\n{}",
            p.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    eprintln!("snapshot ready after {polls} polls");

    // Changes after the snapshot are not in it.
    std::fs::write(st.join("d0").join("f000"), b"changed later").unwrap();
    std::fs::write(st.join("later"), b"added later").unwrap();

    let mut req = create_req("restored", params(&g, &[]), s.clone());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: first.snapshot_id.clone(),
            },
        )),
    });
    let r = create_retrying(&p, req.clone()).await;
    assert_ne!(r.volume_context[CTX_BUCKET], v.volume_context[CTX_BUCKET]);
    assert!(r.content_source.is_some(), "{r:?}");
    let again = create_retrying(&p, req).await;
    assert_eq!(again.volume_id, r.volume_id);

    let st_r = p.staging_dir("restored");
    seen.insert(stage(&p, &r, &st_r, &g.key).await);
    let got = tree(&st_r);
    assert_eq!(got.len(), 1000, "files in the restored volume");
    for (path, data) in &want {
        let have = got
            .get(path)
            .unwrap_or_else(|| panic!("{} missing", path.display()));
        assert!(have == data, "{} differs", path.display());
    }
    // The source still has its change.
    assert_same_file(&st.join("d0").join("f000"), b"changed later");

    unstage(&p, &r.volume_id, &st_r).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    let del = |id: String| {
        let c = p.c();
        let s = s.clone();
        async move {
            let mut c = c;
            c.controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id,
                    secrets: s,
                })
                .await
        }
    };
    del(first.snapshot_id.clone())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log_tail()));
    del(first.snapshot_id.clone())
        .await
        .expect("DeleteSnapshot twice");
    assert!(list_snapshot(&p, &first.snapshot_id).await.is_none());
    delete(&p, &r.volume_id, &s).await.unwrap();
    delete(&p, &v.volume_id, &s).await.unwrap();
    assert_eq!(buckets(&g), before, "buckets left behind");
}

/// DeleteSnapshot of a snapshot whose copy still runs cancels the copy
/// and leaves nothing of it: no snapshot, no objects in the snapshot
/// location (checked again a while later, so a copy still running would
/// show), the source untouched. The source is a prefix volume in the
/// shared bucket with many objects, put there through S3 directly.
#[tokio::test(flavor = "multi_thread")]
async fn delete_snapshot_cancels_a_running_copy_and_leaves_nothing() {
    let g = Garage::start();
    let p = Plugin::start("snapcancel", "node-a").await;
    let s = secrets(&g.key);
    let shared = g.bucket.clone();
    let v = create(
        &p,
        create_req(
            "many",
            params(&g, &[("bucket", shared.as_str())]),
            s.clone(),
        ),
    )
    .await;
    let prefix = v.volume_context[CTX_PREFIX].clone();

    const OBJECTS: usize = 4000;
    let client = s3(&g, &g.key);
    let mut tasks = tokio::task::JoinSet::new();
    for batch in 0..32 {
        let (client, shared, prefix) = (client.clone(), shared.clone(), prefix.clone());
        tasks.spawn(async move {
            for i in (batch..OBJECTS).step_by(32) {
                client
                    .put_object(&shared, &format!("{prefix}o{i:05}"), pattern(i as u64, 512))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let source_usage = usage(&g, &v).await;
    assert_eq!(source_usage.0, OBJECTS as u64);
    let all_before = client.usage(&shared, "").await.unwrap();

    let snap = p
        .c()
        .controller
        .create_snapshot(snap_req("cancel-me", &v.volume_id, &s))
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot: {e:?}\n{}", p.log_tail()))
        .into_inner()
        .snapshot
        .unwrap();
    let was_running = !snap.ready_to_use;
    p.c()
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: s.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("DeleteSnapshot: {e:?}\n{}", p.log_tail()));
    eprintln!("the copy was running at DeleteSnapshot: {was_running}");
    assert!(
        was_running,
        "the copy of {OBJECTS} objects had finished before DeleteSnapshot"
    );
    assert!(list_snapshot(&p, &snap.snapshot_id).await.is_none());

    // Nothing of the copy stays: the bucket holds what it held before
    // (bounded wait for a cancel that finishes after the answer), and
    // still does a few supervisor periods later.
    let start = Instant::now();
    loop {
        let now = client.usage(&shared, "").await.unwrap();
        if now == all_before {
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the cancelled copy left {now:?} (before {all_before:?})\n{}",
            p.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(client.usage(&shared, "").await.unwrap(), all_before);
    assert_eq!(
        client.usage(&shared, ".stowage-snapshots/").await.unwrap(),
        (0, 0)
    );
    assert_eq!(client.incomplete_uploads(&shared, "").await.unwrap(), 0);
    assert_eq!(usage(&g, &v).await, source_usage);
    delete(&p, &v.volume_id, &s).await.unwrap();
    assert_eq!(usage(&g, &v).await, (0, 0));
}

// ---------------------------------------------------------------------------
// 10. A Garage cluster loses a node

/// Issue 12: "a three-node Garage cluster with one node killed: the volume
/// keeps working". Replication factor 3 with quorum 2: with node 2 killed
/// (not the endpoint's node), a staged volume still writes and reads, old
/// and new files, byte for byte; and it unstages and deletes cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_keeps_working_when_a_garage_node_dies() {
    let mut g = Garage::cluster(3);
    let p = Plugin::start("cluster", "node-a").await;
    let s = secrets(&g.key);
    let v = create(&p, create_req("cl", params(&g, &[]), s.clone())).await;
    let st = p.staging_dir("v");
    let t = p.target_path("pod");
    let seen = BTreeSet::from([stage(&p, &v, &st, &g.key).await]);
    publish(&p, &v, &st, &t, Mode::MultiNodeMultiWriter, false)
        .await
        .unwrap();
    let old = pattern(30, 2 << 20);
    write_file(&t.join("before"), &old);

    g.kill9(2);
    let start = Instant::now();
    while g.health()["storageNodesUp"] != 2 {
        assert!(start.elapsed() < LIMIT, "garage never saw node 2 down");
        std::thread::sleep(Duration::from_millis(100));
    }
    let new = pattern(31, 6 << 20);
    write_file(&t.join("after"), &new);
    std::fs::create_dir(t.join("dir")).unwrap();
    write_file(&t.join("dir").join("small"), b"small");
    assert_same_file(&t.join("before"), &old);
    assert_same_file(&t.join("after"), &new);
    let normal = condition(&p, &v.volume_id, &t).await.unwrap();
    assert!(!normal.0, "{normal:?}");

    // A fresh mount (no cache) reads the same with the node still down.
    unpublish(&p, &v.volume_id, &t).await;
    unstage(&p, &v.volume_id, &st).await;
    p.assert_clean(&seen);
    let st2 = p.staging_dir("v2");
    let seen2 = BTreeSet::from([stage(&p, &v, &st2, &g.key).await]);
    assert_same_file(&st2.join("before"), &old);
    assert_same_file(&st2.join("after"), &new);
    assert_same_file(&st2.join("dir").join("small"), b"small");
    unstage(&p, &v.volume_id, &st2).await;
    p.assert_clean(&seen2);
    delete(&p, &v.volume_id, &s)
        .await
        .unwrap_or_else(|e| panic!("DeleteVolume with a node down: {e:?}\n{}", p.log_tail()));
}

// ---------------------------------------------------------------------------
// The harness itself

/// A test that panics with a volume staged and published leaves nothing:
/// [`Plugin`]'s drop kills the server, detaches the mounts and ends the
/// s3fs daemon (which outlives the server by design), and the scratch
/// directory is removed.
#[test]
fn a_failing_test_leaves_no_daemon_mount_or_directory() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let g = Garage::start();
            let p = Plugin::start("panics", "node-a").await;
            let v = create(&p, create_req("p", params(&g, &[]), secrets(&g.key))).await;
            let st = p.staging_dir("v");
            let t = p.target_path("pod");
            let pid = stage(&p, &v, &st, &g.key).await;
            publish(&p, &v, &st, &t, Mode::SingleNodeWriter, false)
                .await
                .unwrap();
            write_file(&t.join("f"), b"x");
            tx.send((pid, p.root().to_owned())).unwrap();
            panic!("test failure with a volume published");
        })
    })
    .join();
    assert!(result.is_err(), "the inner test should have panicked");
    let (pid, root) = rx.recv().unwrap();
    assert!(
        s3fs::wait_gone(&BTreeSet::from([pid]), Duration::from_secs(5)).is_empty(),
        "s3fs daemon {pid} outlived the failed test"
    );
    assert!(s3fs::daemons_under(&root).is_empty());
    assert!(
        s3fs::mounts_under(&root).is_empty() && common::loops_under(&root).is_empty(),
        "mounts left under {}",
        root.display()
    );
    let left: Vec<PathBuf> = stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|m| m.starts_with(&root))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!root.exists(), "{} left behind", root.display());
}

/// Issue 12: "the copy survives a plugin restart or is restarted". The
/// plugin is killed (-9) while a snapshot copy runs; after the restart
/// ListSnapshots still shows the snapshot, not ready, and the CO's next
/// CreateSnapshot of the same name (with its secrets) copies on, skipping
/// what was copied, until it is ready; a restore then holds every object.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_copy_cut_by_a_plugin_kill_resumes_on_the_next_create_snapshot() {
    let g = Garage::start();
    let mut p = Plugin::start("snaprestart", "node-a").await;
    let s = secrets(&g.key);
    let shared = g.bucket.clone();
    let v = create(
        &p,
        create_req(
            "resume",
            params(&g, &[("bucket", shared.as_str())]),
            s.clone(),
        ),
    )
    .await;
    let prefix = v.volume_context[CTX_PREFIX].clone();
    const OBJECTS: usize = 3000;
    let client = s3(&g, &g.key);
    let mut tasks = tokio::task::JoinSet::new();
    for batch in 0..32 {
        let (client, shared, prefix) = (client.clone(), shared.clone(), prefix.clone());
        tasks.spawn(async move {
            for i in (batch..OBJECTS).step_by(32) {
                client
                    .put_object(&shared, &format!("{prefix}o{i:05}"), pattern(i as u64, 256))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let snap = p
        .c()
        .controller
        .create_snapshot(snap_req("resumed", &v.volume_id, &s))
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot: {e:?}\n{}", p.log_tail()))
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        !snap.ready_to_use,
        "the copy of {OBJECTS} objects had finished at once"
    );
    // Killed in the middle of the copy: some objects copied, not all.
    let snap_prefix = format!(
        ".stowage-snapshots/{}/",
        snap.snapshot_id.rsplit(':').next().unwrap()
    );
    let start = Instant::now();
    while client.usage(&shared, &snap_prefix).await.unwrap().0 < 100 {
        assert!(
            start.elapsed() < LIMIT,
            "the copy does not progress\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.env.server.kill9();
    let copied_at_kill = client.usage(&shared, &snap_prefix).await.unwrap().0;
    eprintln!("objects copied when the plugin was killed: {copied_at_kill} of {OBJECTS}");
    assert!(
        copied_at_kill < OBJECTS as u64,
        "the copy finished before the kill: nothing to resume"
    );
    p.env.server.restart();
    p.env.reconnect().await;
    let listed = list_snapshot(&p, &snap.snapshot_id)
        .await
        .expect("the snapshot is gone after the restart");
    assert!(
        !listed.ready_to_use,
        "ready although its copy was cut short"
    );
    // The CO repeats CreateSnapshot until the snapshot is ready.
    let start = Instant::now();
    loop {
        let again = p
            .c()
            .controller
            .create_snapshot(snap_req("resumed", &v.volume_id, &s))
            .await;
        match again {
            Ok(r) => {
                let again = r.into_inner().snapshot.unwrap();
                assert_eq!(
                    again.snapshot_id, snap.snapshot_id,
                    "a new snapshot was made"
                );
                if again.ready_to_use {
                    break;
                }
            }
            Err(e) if e.code() == Code::Aborted => {}
            Err(e) => panic!("CreateSnapshot after the restart: {e:?}\n{}", p.log_tail()),
        }
        assert!(
            start.elapsed() < LIMIT * 6,
            "not ready after the restart\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        client.usage(&shared, &snap_prefix).await.unwrap().0,
        OBJECTS as u64,
        "the resumed copy does not hold every object"
    );
    let mut restore = create_req(
        "restored",
        params(&g, &[("bucket", shared.as_str())]),
        s.clone(),
    );
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let r = create_retrying(&p, restore).await;
    let rp = r.volume_context[CTX_PREFIX].clone();
    for i in [0usize, 1234, OBJECTS - 1] {
        let got = client
            .get_object(&shared, &format!("{rp}o{i:05}"))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("object {i} missing from the restore"));
        assert_eq!(got, pattern(i as u64, 256), "object {i} differs");
    }
    assert_eq!(client.usage(&shared, &rp).await.unwrap().0, OBJECTS as u64);
    p.c()
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: s.clone(),
        })
        .await
        .unwrap();
    delete(&p, &r.volume_id, &s).await.unwrap();
    delete(&p, &v.volume_id, &s).await.unwrap();
}
