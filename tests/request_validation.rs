//! Property tests for untrusted input: request validation (the `TryFrom`
//! conversions of the server layer), volume-ID parsing, and a live server
//! fed hostile volume IDs and paths. CSI v1.12: "the SP MUST ... return
//! INVALID_ARGUMENT" for a malformed request; lookups of what does not exist
//! are NOT_FOUND; the inverse operations (DeleteVolume, NodeUnpublish,
//! NodeUnstage, ControllerUnpublish) of something absent succeed.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use common::*;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};
use stowage::backend::backend_dir;
use stowage::csi;
use stowage::csi::volume_capability::{
    AccessMode as PbAccessMode, AccessType as PbAccessType, BlockVolume, MountVolume,
};
use stowage::volume::VolumeId;
use stowage::volume::controller::{CreateVolume, PublishVolume as ControllerPublish};
use stowage::volume::node::{PublishVolume as NodePublish, StageVolume};
use tonic::{Code, Status};

// ---------------------------------------------------------------------------
// Oracles: what the specification and DESIGN.md say is acceptable, written
// independently of the code under test.

/// A request path is accepted iff it is absolute, at most PATH_MAX, has no
/// NUL, and every component is a normal name (no `.`, `..` or empty one).
fn path_ok(raw: &str) -> bool {
    raw.len() <= 4096
        && raw.starts_with('/')
        && !raw.contains('\0')
        && raw[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// A converted path is absolute, has only normal components, and is the
/// request's string unchanged (nothing was normalised away).
fn assert_clean_path(p: &Path, raw: &str) -> TestCaseResult {
    prop_assert!(p.is_absolute(), "{p:?} is not absolute");
    let mut cs = p.components();
    prop_assert_eq!(cs.next(), Some(Component::RootDir));
    let rest: Vec<_> = cs.collect();
    prop_assert!(!rest.is_empty(), "{p:?} is the root");
    prop_assert!(
        rest.iter().all(|c| matches!(c, Component::Normal(_))),
        "{:?} has a non-normal component",
        p
    );
    prop_assert_eq!(p.as_os_str().to_str(), Some(raw));
    Ok(())
}

fn mode_ok(m: Option<&PbAccessMode>) -> bool {
    m.is_some_and(|m| (1..=7).contains(&m.mode))
}

fn capability_ok(c: &csi::VolumeCapability) -> bool {
    let type_ok = match &c.access_type {
        None => false,
        Some(PbAccessType::Block(_)) => true,
        Some(PbAccessType::Mount(m)) => !m.mount_flags.iter().any(|f| f.contains('\0')),
    };
    type_ok && mode_ok(c.access_mode.as_ref())
}

/// NodeStage and NodePublish also read VOLUME_MOUNT_GROUP: a numeric
/// group id or nothing.
fn mount_group_ok(c: &csi::VolumeCapability) -> bool {
    match &c.access_type {
        Some(PbAccessType::Mount(m)) => {
            m.volume_mount_group.is_empty() || m.volume_mount_group.parse::<u32>().is_ok()
        }
        _ => true,
    }
}

fn code_of(e: stowage::volume::Error) -> Code {
    Status::from(e).code()
}

// ---------------------------------------------------------------------------
// Strategies.

fn no_persistence(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Names and IDs: empty, plausible, arbitrary, path-like, with NUL, long.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,20}",
        "\\PC{0,40}",
        "[a-z./:\\x00-]{0,40}",
        "(\\.\\./){1,8}etc/passwd",
        "/etc/[a-z]{1,8}",
        "[a-z]{0,8}\\x00[a-z]{0,8}",
        "(dir|block|tape):[a-zA-Z0-9./_-]{0,12}:[0-9a-fA-F./]{28,36}",
        "(dir|block):[a-z0-9-]{1,12}:[0-9a-f]{32}",
        "[a-zA-Z]{120,700}",
    ]
}

/// Staging and target paths: empty, root, relative, with `.`/`..`/empty
/// components, NUL, around PATH_MAX, arbitrary, and well-formed ones.
fn hostile_path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just("/tmp/../etc/stowage-x".to_owned()),
        "[a-z./]{0,30}",
        "(/(\\.|\\.\\.|[a-z]{1,6}|)){1,6}/?",
        "/tmp/\\.\\./etc/[a-z]{1,8}",
        "/[a-z]{1,8}\\x00[a-z/]{0,8}",
        "/[a-z]{1,8}(/[a-z]{200,255}){15,18}",
        "\\PC{0,40}",
        "(/[a-zA-Z0-9._~ -]{1,20}){1,8}",
    ]
}

fn access_mode() -> impl Strategy<Value = Option<PbAccessMode>> {
    prop_oneof![
        1 => Just(None),
        6 => (0i32..=7).prop_map(|mode| Some(PbAccessMode { mode })),
        2 => any::<i32>().prop_map(|mode| Some(PbAccessMode { mode })),
    ]
}

fn access_type() -> impl Strategy<Value = Option<PbAccessType>> {
    let fs_type = prop_oneof![
        Just(String::new()),
        Just("ext4".to_owned()),
        Just("xfs".to_owned()),
        "\\PC{0,12}",
    ];
    let flag = prop_oneof![
        Just("ro".to_owned()),
        Just("noatime".to_owned()),
        "[a-z=,]{0,12}",
        "[a-z]{0,4}\\x00[a-z]{0,4}",
    ];
    let group = prop_oneof![3 => Just(String::new()), 1 => "\\PC{1,8}", 1 => "[0-9]{1,6}"];
    prop_oneof![
        1 => Just(None),
        2 => Just(Some(PbAccessType::Block(BlockVolume {}))),
        4 => (fs_type, vec(flag, 0..3), group).prop_map(|(fs_type, mount_flags, group)| {
            Some(PbAccessType::Mount(MountVolume {
                fs_type,
                mount_flags,
                volume_mount_group: group,
            }))
        }),
    ]
}

fn capability() -> impl Strategy<Value = csi::VolumeCapability> {
    (access_type(), access_mode()).prop_map(|(access_type, access_mode)| csi::VolumeCapability {
        access_type,
        access_mode,
    })
}

fn opt_capability() -> impl Strategy<Value = Option<csi::VolumeCapability>> {
    prop_oneof![1 => Just(None), 8 => capability().prop_map(Some)]
}

fn bytes() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        -4i64..4,
        0i64..(1 << 40),
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
    ]
}

fn small_map() -> impl Strategy<Value = HashMap<String, String>> {
    hash_map("\\PC{0,12}", "\\PC{0,12}", 0..3)
}

fn create_volume_request() -> impl Strategy<Value = csi::CreateVolumeRequest> {
    let capacity = prop_oneof![
        1 => Just(None),
        4 => (bytes(), bytes()).prop_map(|(required_bytes, limit_bytes)| Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        })),
    ];
    let source = prop_oneof![
        6 => Just(None),
        1 => hostile_string().prop_map(|snapshot_id| Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id },
            )),
        })),
        1 => hostile_string().prop_map(|volume_id| Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource { volume_id },
            )),
        })),
    ];
    let topology = prop_oneof![
        2 => Just(None),
        1 => (vec(small_map(), 0..2), vec(small_map(), 0..2)).prop_map(|(r, p)| {
            Some(csi::TopologyRequirement {
                requisite: r.into_iter().map(|segments| csi::Topology { segments }).collect(),
                preferred: p.into_iter().map(|segments| csi::Topology { segments }).collect(),
            })
        }),
    ];
    let mutable = prop_oneof![6 => Just(HashMap::new()), 1 => small_map()];
    (
        hostile_string(),
        capacity,
        vec(capability(), 0..3),
        small_map(),
        small_map(),
        source,
        topology,
        mutable,
    )
        .prop_map(
            |(name, capacity_range, caps, parameters, secrets, source, topology, mutable)| {
                csi::CreateVolumeRequest {
                    name,
                    capacity_range,
                    volume_capabilities: caps,
                    parameters,
                    secrets,
                    volume_content_source: source,
                    accessibility_requirements: topology,
                    mutable_parameters: mutable,
                }
            },
        )
}

fn node_stage_request() -> impl Strategy<Value = csi::NodeStageVolumeRequest> {
    (
        hostile_string(),
        hostile_path(),
        opt_capability(),
        small_map(),
        small_map(),
    )
        .prop_map(|(volume_id, path, cap, publish_context, volume_context)| {
            csi::NodeStageVolumeRequest {
                volume_id,
                publish_context,
                staging_target_path: path,
                volume_capability: cap,
                secrets: HashMap::new(),
                volume_context,
            }
        })
}

fn node_publish_request() -> impl Strategy<Value = csi::NodePublishVolumeRequest> {
    let staging = prop_oneof![2 => Just(String::new()), 5 => hostile_path()];
    (
        hostile_string(),
        staging,
        hostile_path(),
        opt_capability(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(volume_id, staging, target, cap, readonly, same)| {
            // Sometimes the CO hands the same path twice.
            let target = if same && !staging.is_empty() {
                staging.clone()
            } else {
                target
            };
            csi::NodePublishVolumeRequest {
                volume_id,
                publish_context: HashMap::new(),
                staging_target_path: staging,
                target_path: target,
                volume_capability: cap,
                readonly,
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            }
        })
}

fn controller_publish_request() -> impl Strategy<Value = csi::ControllerPublishVolumeRequest> {
    (
        hostile_string(),
        hostile_string(),
        opt_capability(),
        any::<bool>(),
        small_map(),
    )
        .prop_map(|(volume_id, node_id, cap, readonly, volume_context)| {
            csi::ControllerPublishVolumeRequest {
                volume_id,
                node_id,
                volume_capability: cap,
                readonly,
                secrets: HashMap::new(),
                volume_context,
            }
        })
}

// ---------------------------------------------------------------------------
// (a) Unit level: the conversions never panic, refuse exactly what is
// malformed, with INVALID_ARGUMENT (OUT_OF_RANGE for a capacity), and hand
// on only clean absolute paths.

/// A content source needs its type and a non-empty ID (whether that ID
/// exists is the controller's question, not the conversion's).
fn content_source_ok(s: Option<&csi::VolumeContentSource>) -> bool {
    match s.map(|s| &s.r#type) {
        None => true,
        Some(Some(csi::volume_content_source::Type::Snapshot(s))) => !s.snapshot_id.is_empty(),
        Some(Some(csi::volume_content_source::Type::Volume(v))) => !v.volume_id.is_empty(),
        Some(None) => false,
    }
}

proptest! {
    #![proptest_config(no_persistence(1024))]

    /// CreateVolume: "name ... REQUIRED"; "volume_capabilities ... REQUIRED";
    /// an unsupported capacity_range is OUT_OF_RANGE.
    #[test]
    fn create_volume_conversion(req in create_volume_request()) {
        let name_ok = !req.name.is_empty() && req.name.len() <= 512 && !req.name.contains('\0');
        let caps_ok = !req.volume_capabilities.is_empty()
            && req.volume_capabilities.iter().all(capability_ok);
        let rest_ok = name_ok
            && caps_ok
            && content_source_ok(req.volume_content_source.as_ref());
        let range = req.capacity_range.unwrap_or_default();
        let negative = range.required_bytes < 0 || range.limit_bytes < 0;
        let well_formed = rest_ok && !negative;
        match CreateVolume::try_from(&req) {
            Ok(cmd) => {
                prop_assert!(well_formed, "accepted a malformed request: {:?}", cmd);
                prop_assert_eq!(&cmd.name, &req.name);
                prop_assert_eq!(cmd.capabilities.len(), req.volume_capabilities.len());
                let pos = |v: i64| (v > 0).then_some(v as u64);
                prop_assert_eq!(cmd.required_bytes, pos(range.required_bytes));
                prop_assert_eq!(cmd.limit_bytes, pos(range.limit_bytes));
                let params: BTreeMap<_, _> = req.parameters.clone().into_iter().collect();
                prop_assert_eq!(cmd.parameters, params);
            }
            Err(e) => {
                let code = code_of(e);
                prop_assert!(
                    matches!(code, Code::InvalidArgument | Code::OutOfRange),
                    "code {:?}", code
                );
                prop_assert!(!well_formed, "refused a well-formed request");
                if code == Code::OutOfRange {
                    prop_assert!(negative, "OUT_OF_RANGE without a bad capacity");
                }
                if rest_ok {
                    prop_assert_eq!(code, Code::OutOfRange);
                }
            }
        }
    }

    /// NodeStageVolume: volume_id, staging_target_path and
    /// volume_capability are REQUIRED; the path must be clean.
    #[test]
    fn node_stage_conversion(req in node_stage_request()) {
        let ok = !req.volume_id.is_empty()
            && path_ok(&req.staging_target_path)
            && req
                .volume_capability
                .as_ref()
                .is_some_and(|c| capability_ok(c) && mount_group_ok(c));
        match StageVolume::try_from(&req) {
            Ok(cmd) => {
                prop_assert!(ok, "accepted a malformed request: {:?}", cmd);
                prop_assert_eq!(&cmd.volume_id, &req.volume_id);
                assert_clean_path(&cmd.staging_path, &req.staging_target_path)?;
            }
            Err(e) => {
                prop_assert!(!ok, "refused a well-formed request: {}", e);
                prop_assert_eq!(code_of(e), Code::InvalidArgument);
            }
        }
    }

    /// NodePublishVolume: volume_id, target_path and volume_capability are
    /// REQUIRED; staging_target_path "MUST be set if the Node Plugin
    /// implements the STAGE_UNSTAGE_VOLUME node capability", which stowage
    /// advertises, so it is required too (its absence alone is the spec's
    /// "Staging target path not set", FAILED_PRECONDITION); it must be
    /// clean and differ from the target; a mount group must be a number.
    #[test]
    fn node_publish_conversion(req in node_publish_request()) {
        let staging_ok = path_ok(&req.staging_target_path);
        let rest_ok = !req.volume_id.is_empty()
            && path_ok(&req.target_path)
            && req.volume_capability.as_ref().is_some_and(capability_ok);
        // VOLUME_MOUNT_GROUP: each pod's publication names its group too.
        let ok = rest_ok
            && staging_ok
            && req.target_path != req.staging_target_path
            && req.volume_capability.as_ref().is_some_and(mount_group_ok);
        let refused = if rest_ok && req.staging_target_path.is_empty() {
            Code::FailedPrecondition
        } else {
            Code::InvalidArgument
        };
        match NodePublish::try_from(&req) {
            Ok(cmd) => {
                prop_assert!(ok, "accepted a malformed request: {:?}", cmd);
                prop_assert_eq!(&cmd.volume_id, &req.volume_id);
                prop_assert_eq!(cmd.read_only, req.readonly);
                let group = match req.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()) {
                    Some(PbAccessType::Mount(m)) => m.volume_mount_group.parse::<u32>().ok(),
                    _ => None,
                };
                prop_assert_eq!(cmd.mount_group, group);
                assert_clean_path(&cmd.target_path, &req.target_path)?;
                match &cmd.staging_path {
                    None => prop_assert!(false, "no staging path: {:?}", cmd),
                    Some(s) => assert_clean_path(s, &req.staging_target_path)?,
                }
            }
            Err(e) => {
                prop_assert!(!ok, "refused a well-formed request: {}", e);
                prop_assert_eq!(code_of(e), refused);
            }
        }
    }

    /// ControllerPublishVolume: volume_id, node_id and volume_capability
    /// are REQUIRED.
    #[test]
    fn controller_publish_conversion(req in controller_publish_request()) {
        let ok = !req.volume_id.is_empty()
            && !req.node_id.is_empty()
            && req.volume_capability.as_ref().is_some_and(capability_ok);
        match ControllerPublish::try_from(&req) {
            Ok(cmd) => {
                prop_assert!(ok, "accepted a malformed request: {:?}", cmd);
                prop_assert_eq!(&cmd.volume_id, &req.volume_id);
                prop_assert_eq!(&cmd.node_id, &req.node_id);
                prop_assert_eq!(cmd.read_only, req.readonly);
            }
            Err(e) => {
                prop_assert!(!ok, "refused a well-formed request: {}", e);
                prop_assert_eq!(code_of(e), Code::InvalidArgument);
            }
        }
    }

    /// A volume ID parses only in its canonical form, and what it yields as
    /// a file name stays a single entry inside the backend's directory.
    #[test]
    fn volume_ids_never_escape_the_pool(s in hostile_string()) {
        if let Some(id) = VolumeId::parse(&s) {
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert!(s.len() <= 128);
            let hex = id.uuid.to_hex();
            prop_assert!(hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
            let dir = backend_dir(Path::new("/pool"), id.backend);
            let file = dir.join(&hex);
            prop_assert_eq!(file.parent(), Some(dir.as_path()));
            prop_assert!(!id.node.contains(['/', ':', '\0']) && !id.node.starts_with('.'));
        }
    }

    /// Every well-formed ID parses and round-trips; any one character of
    /// its UUID replaced by a separator or an upper-case digit is refused.
    #[test]
    fn well_formed_volume_ids_round_trip(
        backend in prop_oneof![Just("dir"), Just("block")],
        node in "[A-Za-z0-9][A-Za-z0-9._-]{0,62}",
        uuid in "[0-9a-f]{32}",
        at in 0usize..32,
        bad in prop_oneof![Just('/'), Just(':'), Just('\0'), Just('.'), Just('A'), Just('g')],
    ) {
        let raw = format!("{backend}:{node}:{uuid}");
        let id = VolumeId::parse(&raw);
        prop_assert!(id.is_some(), "{raw:?} refused");
        let id = id.unwrap();
        prop_assert_eq!(id.to_string(), raw);
        prop_assert_eq!(id.backend.as_str(), backend);
        let mut broken: Vec<char> = uuid.chars().collect();
        broken[at] = bad;
        let broken: String = broken.into_iter().collect();
        let raw = format!("{backend}:{node}:{broken}");
        prop_assert_eq!(VolumeId::parse(&raw), None, "{:?} accepted", raw);
    }
}

// ---------------------------------------------------------------------------
// (b) Live: one real server fed hostile volume IDs and paths.

/// Whose volume a case names.
#[derive(Debug, Clone)]
enum Who {
    /// Not a volume of this server (malformed, unknown, or a near miss of
    /// the real ID).
    Hostile(String),
    /// The real, staged dir volume.
    Real,
}

/// Which path a case sends.
#[derive(Debug, Clone)]
enum Place {
    /// A string the path grammar refuses.
    Invalid(String),
    /// A well-formed path outside the scratch dir (sent with hostile IDs
    /// only, never with the real volume).
    Outside(String),
    /// `<targets>/evil-link`, a symlink to another scratch dir.
    Symlink,
    /// `<targets>/f-<name>`, which does not exist yet.
    Fresh(String),
}

#[derive(Debug, Clone)]
struct Case {
    who: Who,
    place: Place,
    /// A node ID other than the server's.
    node: String,
}

/// The live server's fixed furniture.
struct Fixture {
    scratch: PathBuf,
    node_id: String,
    real_id: String,
    staging: PathBuf,
    targets: PathBuf,
    link: PathBuf,
    elsewhere: PathBuf,
}

impl Fixture {
    async fn new(env: &mut Env) -> Self {
        let vol = env.create("real-dir", "dir", 64 * MIB).await;
        let staging = env.staging_dir("real");
        env.stage(&vol.volume_id, "dir", &staging).await.unwrap();
        let elsewhere = env.scratch.root.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = env.layout.targets.join("evil-link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        Fixture {
            scratch: env.scratch.root.clone(),
            node_id: env.node_id.clone(),
            real_id: vol.volume_id,
            staging,
            targets: env.layout.targets.clone(),
            link,
            elsewhere,
        }
    }

    fn path(&self, p: &Place) -> String {
        match p {
            Place::Invalid(s) | Place::Outside(s) => s.clone(),
            Place::Symlink => self.link.display().to_string(),
            Place::Fresh(name) => self.targets.join(format!("f-{name}")).display().to_string(),
        }
    }

    fn strategy(&self) -> impl Strategy<Value = Case> + use<> {
        let real = self.real_id.clone();
        let scratch = self.scratch.display().to_string();
        let near_misses: Vec<String> = vec![
            real.to_uppercase(),
            format!("{real}/.."),
            format!("../{real}"),
            format!("{real}\0"),
            format!("{real}:x"),
            format!(" {real}"),
            real.replace(':', "/"),
            real.replacen("dir:", "block:", 1),
            real.replace(&self.node_id, "other-node"),
            real[..real.len() - 1].to_owned(),
            format!("dir:{}:../../../../etc", self.node_id),
        ];
        let hostile = prop_oneof![
            3 => hostile_string(),
            1 => proptest::sample::select(near_misses),
        ]
        .prop_filter("not the real volume", move |s| *s != real)
        .prop_map(Who::Hostile);
        let invalid = hostile_path()
            .prop_filter("refused by the path grammar", |p| !path_ok(p))
            .prop_map(Place::Invalid)
            .boxed();
        let outside = prop_oneof![
            "/tmp/stowage-hostile-[a-z0-9]{8}",
            "/etc/stowage-hostile-[a-z0-9]{6}",
            "/var/lib/kubelet/pods/[a-z0-9-]{8}/mount",
            "(/[a-z]{1,8}){1,4}",
        ]
        .prop_filter("outside the scratch dir", move |p: &String| {
            path_ok(p) && !Path::new(p).starts_with(&scratch) && !p.starts_with(SCRATCH_PREFIX)
        })
        .prop_map(Place::Outside);
        let fresh = prop_oneof![
            "[a-zA-Z0-9._~-]{1,40}",
            "[a-z]{1,8} [a-z]{1,8}",
            "[a-z]{1,4}\\\\[a-z]{1,4}",
            "\\PC{1,12}",
        ]
        .prop_filter("one clean component", |n: &String| {
            !n.contains(['/', '\0']) && !n.chars().any(char::is_control)
        })
        .prop_map(Place::Fresh);
        let scratch_place = prop_oneof![
            2 => invalid.clone(),
            1 => Just(Place::Symlink),
            2 => fresh,
        ]
        .boxed();
        let node_id = self.node_id.clone();
        let node = prop_oneof![
            hostile_string(),
            Just("TEST-NODE".to_owned()),
            Just("test-node\0".to_owned()),
            Just("../test-node".to_owned()),
        ]
        .prop_filter("not this node", move |n| *n != node_id);
        let who_place = prop_oneof![
            (
                hostile,
                prop_oneof![2 => invalid, 2 => outside, 1 => scratch_place.clone()],
            ),
            scratch_place.prop_map(|p| (Who::Real, p)),
        ];
        (who_place, node).prop_map(|((who, place), node)| Case { who, place, node })
    }
}

/// Mount points outside every test scratch dir. Scratch dirs are left out
/// as a whole, not only `root`: other tests on the host mount and unmount
/// in theirs concurrently.
fn mounts_outside(root: &Path) -> BTreeSet<PathBuf> {
    stowage::os::mountinfo::MountTable::read()
        .unwrap()
        .entries
        .into_iter()
        .filter(|e| {
            !e.mount_point.starts_with(root)
                && !e.mount_point.to_string_lossy().starts_with(SCRATCH_PREFIX)
        })
        .map(|e| e.mount_point)
        .collect()
}

/// Where `Scratch` makes its dirs.
const SCRATCH_PREFIX: &str = "/tmp/stowage-test-";

fn exists_no_follow(p: &str) -> bool {
    Path::new(p).symlink_metadata().is_ok()
}

/// Asserts an RPC result's code is one of `allowed` (`Code::Ok` for
/// success).
fn expect<T: std::fmt::Debug>(
    rpc: &str,
    r: &Result<tonic::Response<T>, Status>,
    allowed: &[Code],
) -> TestCaseResult {
    let code = match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    prop_assert!(
        allowed.contains(&code),
        "{} answered {:?} ({:?}); expected one of {:?}",
        rpc,
        code,
        r.as_ref().err().map(Status::message),
        allowed
    );
    Ok(())
}

fn dir_cap() -> csi::VolumeCapability {
    cap_for("dir")
}

/// One case: every RPC that takes a volume ID or a path, with the codes the
/// CSI error tables allow, and no side effect outside what the case may do.
async fn check_case(mut c: Clients, fx: &Fixture, case: Case) -> TestCaseResult {
    use Code::{AlreadyExists, InvalidArgument, NotFound};
    let (id, real) = match &case.who {
        Who::Hostile(s) => (s.clone(), false),
        Who::Real => (fx.real_id.clone(), true),
    };
    let path = fx.path(&case.place);
    let fresh = matches!(case.place, Place::Fresh(_));
    let valid = path_ok(&path);
    let bad = id.is_empty() || !valid;
    let existed = valid && exists_no_follow(&path);
    let mounts_before = mounts_outside(&fx.scratch);
    prop_assert!(!(real && matches!(case.place, Place::Outside(_))));

    // NodeStageVolume: the real volume is already staged elsewhere.
    let r = c
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path.clone(),
            volume_capability: Some(dir_cap()),
            ..Default::default()
        })
        .await;
    let want = match () {
        _ if bad => InvalidArgument,
        _ if real => AlreadyExists,
        _ => NotFound,
    };
    expect("NodeStageVolume", &r, &[want])?;

    // NodePublishVolume: a target that is a symlink is refused; a fresh
    // target under the scratch dir is published.
    let r = c
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: fx.staging.display().to_string(),
            target_path: path.clone(),
            volume_capability: Some(dir_cap()),
            ..Default::default()
        })
        .await;
    let published = real && fresh;
    let want = match () {
        _ if bad => InvalidArgument,
        _ if !real => NotFound,
        _ if fresh => Code::Ok,
        _ => InvalidArgument,
    };
    expect("NodePublishVolume", &r, &[want])?;
    if published {
        prop_assert!(is_mounted(Path::new(&path)), "{path:?} not mounted");
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&p.metadata().unwrap());
        prop_assert_eq!(ino(Path::new(&path)), ino(&fx.staging));
    }

    // NodeGetVolumeStats: only a path the volume is published at answers.
    let r = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: path.clone(),
            staging_target_path: path.clone(),
        })
        .await;
    let allowed: &[Code] = match () {
        _ if id.is_empty() || path.is_empty() => &[InvalidArgument],
        _ if published => &[Code::Ok],
        _ => &[NotFound, InvalidArgument],
    };
    expect("NodeGetVolumeStats", &r, allowed)?;

    // NodeUnpublishVolume: idempotent; removes the target it made.
    let r = c
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: path.clone(),
        })
        .await;
    expect(
        "NodeUnpublishVolume",
        &r,
        &[if bad { InvalidArgument } else { Code::Ok }],
    )?;
    if published {
        prop_assert!(!exists_no_follow(&path), "unpublish left {path:?}");
    }

    // NodeUnstageVolume: idempotent; the real staging is elsewhere and
    // stays.
    let r = c
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: path.clone(),
        })
        .await;
    expect(
        "NodeUnstageVolume",
        &r,
        &[if bad { InvalidArgument } else { Code::Ok }],
    )?;

    // Controller side. The real volume is never deleted or published here.
    if !real {
        let r = c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect(
            "DeleteVolume",
            &r,
            &[if id.is_empty() {
                InvalidArgument
            } else {
                Code::Ok
            }],
        )?;
    }
    let (pub_node, want) = match () {
        _ if id.is_empty() => (fx.node_id.clone(), InvalidArgument),
        _ if !real => (fx.node_id.clone(), NotFound),
        _ if case.node.is_empty() => (case.node.clone(), InvalidArgument),
        _ => (case.node.clone(), NotFound),
    };
    let r = c
        .controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: pub_node.clone(),
            volume_capability: Some(dir_cap()),
            ..Default::default()
        })
        .await;
    expect("ControllerPublishVolume", &r, &[want])?;
    let r = c
        .controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: pub_node,
            ..Default::default()
        })
        .await;
    expect(
        "ControllerUnpublishVolume",
        &r,
        &[if id.is_empty() {
            InvalidArgument
        } else {
            Code::Ok
        }],
    )?;
    let r = c
        .controller
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![dir_cap()],
            ..Default::default()
        })
        .await;
    let want = match () {
        _ if id.is_empty() => InvalidArgument,
        _ if real => Code::Ok,
        _ => NotFound,
    };
    expect("ValidateVolumeCapabilities", &r, &[want])?;
    if let Ok(resp) = &r {
        prop_assert!(resp.get_ref().confirmed.is_some(), "{:?}", resp.get_ref());
    }

    // The server is alive and the real volume intact.
    let probe = c
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .map_err(|s| TestCaseError::fail(format!("Probe failed: {s:?}")))?;
    prop_assert_eq!(probe.into_inner().ready, Some(true));
    let got = c
        .controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: fx.real_id.clone(),
        })
        .await;
    prop_assert!(got.is_ok(), "real volume lost: {got:?}");
    prop_assert!(is_mounted(&fx.staging), "real staging lost its mount");
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: fx.real_id.clone(),
            volume_path: fx.staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await;
    prop_assert!(stats.is_ok(), "real staging stats: {stats:?}");

    // Nothing made or mounted anywhere the case had no business.
    if valid && !existed {
        prop_assert!(!exists_no_follow(&path), "{path:?} was created");
    }
    prop_assert_eq!(mounts_outside(&fx.scratch), mounts_before);
    prop_assert!(!is_mounted(&fx.elsewhere), "mounted through the symlink");
    prop_assert_eq!(std::fs::read_dir(&fx.elsewhere).unwrap().count(), 0);
    prop_assert!(
        fx.link.symlink_metadata().unwrap().file_type().is_symlink(),
        "the symlink was replaced"
    );
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Hostile volume IDs and paths against one live server: no crash, codes
/// per RPC as the CSI tables say, nothing created or mounted outside the
/// scratch dir, and a symlinked target refused.
#[test]
fn live_server_refuses_hostile_ids_and_paths() {
    let rt = runtime();
    let mut env = rt.block_on(Env::new("ext4"));
    let fx = rt.block_on(Fixture::new(&mut env));

    // The obvious ones first, deterministically.
    rt.block_on(async {
        let mut c = env.c.clone();
        let escape = "/tmp/../etc/stowage-escape";
        let r = c
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: fx.real_id.clone(),
                staging_target_path: fx.staging.display().to_string(),
                target_path: escape.into(),
                volume_capability: Some(dir_cap()),
                ..Default::default()
            })
            .await;
        assert_code(r, Code::InvalidArgument);
        assert!(!Path::new("/etc/stowage-escape").exists());

        // "NodePublishVolume ... target_path": a symlink there is not
        // followed to somewhere else.
        let r = c
            .node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: fx.real_id.clone(),
                staging_target_path: fx.staging.display().to_string(),
                target_path: fx.link.display().to_string(),
                volume_capability: Some(dir_cap()),
                ..Default::default()
            })
            .await;
        assert_code(r, Code::InvalidArgument);
        assert!(!is_mounted(&fx.elsewhere) && !is_mounted(&fx.link));
        assert_eq!(std::fs::read_dir(&fx.elsewhere).unwrap().count(), 0);
    });

    let mut runner = TestRunner::new(no_persistence(48));
    let strategy = fx.strategy();
    let result = runner.run(&strategy, |case| {
        rt.block_on(check_case(env.c.clone(), &fx, case))
    });

    // Tear down whatever the result; the scratch guard catches the rest.
    rt.block_on(async {
        let id = fx.real_id.clone();
        let _ = env.unstage(&id, &fx.staging).await;
        let _ = env.delete(&id).await;
    });
    let log = env.server.log_text();
    rt.block_on(async move { drop(env) });
    if let Err(e) = result {
        panic!("{e}\n--- server log (tail) ---\n{}", tail(&log, 40));
    }
    assert!(
        !log.contains("panicked"),
        "the server panicked:\n{}",
        tail(&log, 40)
    );
}

/// DESIGN.md: request paths' "symlinks ... are not followed into somewhere
/// else" — also when the symlink is a parent of the target or staging path
/// (a final-component symlink is covered above).
#[test]
fn live_server_does_not_mount_through_a_symlinked_parent() {
    let rt = runtime();
    let mut env = rt.block_on(Env::new("ext4"));
    let result = rt.block_on(async {
        let elsewhere = env.scratch.root.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = env.layout.targets.join("evil-dir");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();

        // Publish of a staged volume at <link>/x.
        let vol = env.create("through-publish", "dir", 64 * MIB).await;
        let staging = env.staging_dir("through");
        env.stage(&vol.volume_id, "dir", &staging).await.unwrap();
        let target = link.join("x");
        let published = env
            .publish(&vol.volume_id, "dir", &staging, &target, false)
            .await;

        // Stage of another volume at <link>/stage.
        let vol2 = env.create("through-stage", "dir", 64 * MIB).await;
        let staged = env.stage(&vol2.volume_id, "dir", &link.join("stage")).await;

        let leaked: Vec<_> = std::fs::read_dir(&elsewhere)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let mounted: Vec<_> = leaked.iter().filter(|p| is_mounted(p)).cloned().collect();
        (published, staged, leaked, mounted)
    });
    let (published, staged, leaked, mounted) = result;
    rt.block_on(async move { drop(env) });
    drop(rt);
    assert!(
        leaked.is_empty() && mounted.is_empty(),
        "followed a symlinked parent: created {leaked:?}, mounted {mounted:?} \
         (NodePublish: {published:?}; NodeStage: {staged:?})"
    );
    assert_code(published, Code::InvalidArgument);
    assert_code(staged, Code::InvalidArgument);
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
