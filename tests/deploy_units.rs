//! The systemd units in `deploy/systemd/` against the binary they run:
//! every flag they pass exists, no option hides stowage's mounts in a
//! private mount namespace or cuts off loop devices, both units agree on
//! the socket and state paths, and the example volumes file validates.
//! `systemd-analyze verify` runs when it is installed (set
//! `STOWAGE_REQUIRE_SYSTEMD_ANALYZE=1` to make its absence a failure).

// Tests run the binary and systemd-analyze directly.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const STOWAGE: &str = env!("CARGO_BIN_EXE_stowage");
/// Where the units expect the binary (README, "Headless").
const INSTALLED: &str = "/usr/local/bin/stowage";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd")
}

/// A unit file: section name → its `key=value` lines, in order (a key may
/// repeat, as systemd allows).
#[derive(Debug)]
struct Unit {
    name: String,
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Unit {
    /// Reads a unit with systemd's syntax as far as these files use it:
    /// `[Section]`, `Key=Value`, comments starting with `#` or `;`, and
    /// lines continued with a trailing backslash.
    fn load(file: &str) -> Unit {
        let path = deploy_dir().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut section = String::new();
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            let line = std::mem::take(&mut pending) + line;
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{file}:{}: not key=value: {raw:?}", n + 1));
            assert!(
                !section.is_empty(),
                "{file}:{}: key outside a section",
                n + 1
            );
            sections
                .entry(section.clone())
                .or_default()
                .push((key.trim().to_owned(), value.trim().to_owned()));
        }
        assert!(pending.is_empty(), "{file}: ends inside a continued line");
        Unit {
            name: file.to_owned(),
            sections,
        }
    }

    /// Every value of `key` in `section`.
    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.sections
            .get(section)
            .into_iter()
            .flatten()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `key` in `section`.
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key).as_slice() {
            [v] => v,
            other => panic!(
                "{}: [{section}] {key}= set {} times",
                self.name,
                other.len()
            ),
        }
    }

    /// The space-separated words of every value of a list-valued key.
    fn words(&self, section: &str, key: &str) -> Vec<&str> {
        self.all(section, key)
            .into_iter()
            .flat_map(str::split_whitespace)
            .collect()
    }

    /// Every key set anywhere in the unit.
    fn keys(&self) -> impl Iterator<Item = &str> {
        self.sections.values().flatten().map(|(k, _)| k.as_str())
    }

    /// The `Exec*=` command lines of `[Service]`, split into words, with
    /// systemd's `-@:+!` prefixes removed from the program.
    fn exec_lines(&self) -> Vec<(String, Vec<String>)> {
        self.sections["Service"]
            .iter()
            .filter(|(k, v)| k.starts_with("Exec") && !v.is_empty())
            .map(|(k, v)| {
                // The one expansion the units use: systemd's credentials
                // directory (LoadCredential=).
                let v = v.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/unit");
                assert!(
                    !v.contains(['"', '\'', '$', '%']),
                    "{}: {k}= uses quoting or expansion this test does not read: {v}",
                    self.name
                );
                let mut words: Vec<String> = v.split_whitespace().map(str::to_owned).collect();
                let program = words[0].trim_start_matches(['-', '@', ':', '+', '!']);
                words[0] = program.to_owned();
                (k.clone(), words)
            })
            .collect()
    }

    /// The value given to `flag` on the `key=` command line.
    fn flag_value(&self, key: &str, flag: &str) -> String {
        let (_, words) = self
            .exec_lines()
            .into_iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{}: no {key}=", self.name));
        flag_value(&words, flag).unwrap_or_else(|| panic!("{}: {key}= has no {flag}", self.name))
    }
}

fn flag_value(words: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    words.iter().enumerate().find_map(|(i, w)| {
        if w == flag {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

fn serve_unit() -> Unit {
    Unit::load("stowage.service")
}

fn apply_unit() -> Unit {
    Unit::load("stowage-apply.service")
}

/// Options that give a service its own mount namespace (its mounts become
/// slaves of the host's: the host never sees what stowage mounts), put it
/// in another namespace that breaks mounting or the endpoint, or restrict
/// devices (loop devices and /dev/loop-control become unusable).
const FORBIDDEN: &[&str] = &[
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateUsers",
    "PrivateNetwork",
    "PrivateIPC",
    "ProtectHostname",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ProtectClock",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "ReadWriteDirectories",
    "ReadOnlyDirectories",
    "InaccessibleDirectories",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountImages",
    "ExtensionImages",
    "ExtensionDirectories",
    "MountAPIVFS",
    "MountFlags",
    "LogNamespace",
    "NetworkNamespacePath",
    "IPCNamespacePath",
    "JoinsNamespaceOf",
    "DynamicUser",
    "DeviceAllow",
    "DevicePolicy",
];

#[test]
fn no_option_hides_mounts_in_a_namespace_or_blocks_loop_devices() {
    for unit in [serve_unit(), apply_unit()] {
        let bad: Vec<&str> = unit.keys().filter(|k| FORBIDDEN.contains(k)).collect();
        assert!(bad.is_empty(), "{}: must not set {bad:?}", unit.name);
        // CAP_SYS_ADMIN in a user namespace mounts no block filesystem.
        assert!(
            unit.all("Service", "User").is_empty(),
            "{}: runs as root",
            unit.name
        );
    }
    // Copies of dir volumes restore set-user/group-ID bits.
    assert!(
        serve_unit().all("Service", "RestrictSUIDSGID").is_empty(),
        "stowage.service: RestrictSUIDSGID breaks snapshots of dir volumes with setgid directories"
    );
}

#[test]
fn the_server_keeps_what_mounting_needs_and_drops_the_rest() {
    let unit = serve_unit();
    let caps = unit.words("Service", "CapabilityBoundingSet");
    for needed in [
        "CAP_SYS_ADMIN",    // mount(2), loop and FIFREEZE ioctls
        "CAP_SYS_RESOURCE", // online ext4 resize
        "CAP_CHOWN",        // dir volume copies keep their owners
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_MKNOD",
        "CAP_DAC_OVERRIDE",
    ] {
        assert!(
            caps.contains(&needed),
            "CapabilityBoundingSet lacks {needed}"
        );
    }
    for dropped in [
        "CAP_SYS_MODULE",
        "CAP_SYS_PTRACE",
        "CAP_NET_ADMIN",
        "CAP_SETUID",
    ] {
        assert!(
            !caps.contains(&dropped),
            "CapabilityBoundingSet keeps {dropped}"
        );
    }
    assert!(
        !caps.iter().any(|c| c.starts_with('~')),
        "an allow-list, not a deny-list"
    );
    assert_eq!(unit.one("Service", "NoNewPrivileges"), "yes");
    let families = unit.words("Service", "RestrictAddressFamilies");
    assert!(families.contains(&"AF_UNIX"), "the socket is AF_UNIX");
}

#[test]
fn the_server_unit_orders_restarts_and_stops_gracefully() {
    let unit = serve_unit();
    assert!(unit.words("Unit", "After").contains(&"local-fs.target"));
    assert_eq!(unit.one("Service", "Restart"), "on-failure");
    assert_eq!(unit.one("Install", "WantedBy"), "multi-user.target");
    assert_eq!(unit.one("Service", "RuntimeDirectory"), "stowage");
    // The socket directory outlives a server restart (the reconciler and
    // anything that bind-mounted it keep the same directory).
    assert_eq!(unit.one("Service", "RuntimeDirectoryPreserve"), "yes");
    assert_eq!(unit.one("Service", "StateDirectory"), "stowage");
    // SIGTERM to the server only: in-flight RPCs finish their mkfs/fsck
    // children; the rest is SIGKILLed only at the timeout.
    assert_eq!(unit.one("Service", "KillMode"), "mixed");
    assert!(!unit.one("Service", "TimeoutStopSec").is_empty());
}

#[test]
fn the_reconciler_follows_the_server_without_being_bound_to_it() {
    let unit = apply_unit();
    assert!(unit.words("Unit", "Wants").contains(&"stowage.service"));
    assert!(unit.words("Unit", "After").contains(&"stowage.service"));
    // It waits for Probe itself; a server restart must not bounce it.
    for key in ["Requires", "BindsTo", "PartOf", "Requisite"] {
        assert!(
            !unit.words("Unit", key).contains(&"stowage.service"),
            "stowage-apply.service: {key}=stowage.service would restart or stop it with the server"
        );
    }
    assert_eq!(unit.one("Service", "Restart"), "on-failure");
    assert_eq!(unit.one("Install", "WantedBy"), "multi-user.target");
    let lines = unit.exec_lines();
    let pre = lines
        .iter()
        .find(|(k, _)| k == "ExecStartPre")
        .expect("ExecStartPre validates the file");
    let start = lines
        .iter()
        .find(|(k, _)| k == "ExecStart")
        .expect("ExecStart");
    assert!(
        pre.1.iter().any(|w| w == "--check"),
        "ExecStartPre runs apply --check"
    );
    assert!(
        start.1.iter().any(|w| w == "--watch"),
        "ExecStart runs apply --watch"
    );
    assert_eq!(
        flag_value(&pre.1, "-f"),
        flag_value(&start.1, "-f"),
        "ExecStartPre checks the file ExecStart applies"
    );
}

#[test]
fn both_units_use_one_socket_in_the_runtime_directory() {
    let serve = serve_unit();
    let apply = apply_unit();
    let endpoint = serve.flag_value("ExecStart", "--endpoint");
    assert_eq!(endpoint, apply.flag_value("ExecStart", "--endpoint"));
    let runtime = format!("unix:///run/{}/", serve.one("Service", "RuntimeDirectory"));
    assert!(
        endpoint.starts_with(&runtime),
        "{endpoint} is not in the RuntimeDirectory ({runtime})"
    );
}

/// The server's metrics and the reconciler's health endpoint listen on the
/// loopback interface only, on different ports (one would fail to bind).
#[test]
fn http_endpoints_are_on_loopback_and_do_not_collide() {
    let metrics = serve_unit().flag_value("ExecStart", "--metrics-address");
    let health = apply_unit().flag_value("ExecStart", "--health-addr");
    for addr in [&metrics, &health] {
        let a: std::net::SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(a.ip().is_loopback(), "{addr} is reachable from other hosts");
    }
    assert_ne!(metrics, health);
}

#[test]
fn state_paths_are_in_the_units_state_directories() {
    let serve = serve_unit();
    assert_eq!(
        serve.flag_value("ExecStart", "--state-dir"),
        format!("/var/lib/{}", serve.one("Service", "StateDirectory"))
    );
    let apply = apply_unit();
    let dirs: Vec<String> = apply
        .words("Service", "StateDirectory")
        .iter()
        .map(|d| format!("/var/lib/{d}/"))
        .collect();
    for flag in ["--state-file", "--staging-root"] {
        let path = apply.flag_value("ExecStart", flag);
        assert!(
            dirs.iter().any(|d| path.starts_with(d.as_str())),
            "{flag} {path} is outside StateDirectory= ({dirs:?})"
        );
    }
}

/// The flags a command's `--help` lists: `--long` and `-s` names, each with
/// whether it takes a value (`<VALUE>` follows it).
fn help_flags(path: &[&str]) -> BTreeMap<String, bool> {
    let out = Command::new(STOWAGE)
        .args(path)
        .arg("--help")
        .output()
        .expect("run stowage --help");
    assert!(
        out.status.success(),
        "`stowage {} --help` failed (does the subcommand exist?): {}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut flags = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue;
        }
        // "-o, --output <OUTPUT>  Output format" or "--watch  Keep …"
        let spec = line.split("  ").next().unwrap_or(line);
        let takes_value = spec.contains('<');
        for part in spec.split(", ") {
            let name = part.split([' ', '[', '<', '=']).next().unwrap_or(part);
            flags.insert(name.to_owned(), takes_value);
        }
    }
    flags
}

#[test]
fn every_flag_on_an_exec_line_is_one_the_binary_has() {
    for unit in [
        serve_unit(),
        apply_unit(),
        Unit::load("stowage-controller.service"),
        Unit::load("stowage-node.conf"),
    ] {
        for (key, words) in unit.exec_lines() {
            assert_eq!(
                words[0], INSTALLED,
                "{}: {key}= runs {}",
                unit.name, words[0]
            );
            // Flags before the subcommand are the top-level ones; after it,
            // the subcommand's (which include the global ones).
            let mut path: Vec<&str> = Vec::new();
            let mut known = help_flags(&path);
            let mut i = 1;
            while i < words.len() {
                let word = words[i].as_str();
                if !word.starts_with('-') {
                    assert!(
                        path.is_empty(),
                        "{}: {key}=: unexpected argument {word:?}",
                        unit.name
                    );
                    path.push(word);
                    known = help_flags(&path);
                    i += 1;
                    continue;
                }
                let name = word.split('=').next().unwrap_or(word);
                let takes_value = *known.get(name).unwrap_or_else(|| {
                    panic!(
                        "{}: {key}=: `stowage {}` has no flag {name}",
                        unit.name,
                        path.join(" ")
                    )
                });
                if takes_value && !word.contains('=') {
                    i += 1;
                    assert!(
                        i < words.len(),
                        "{}: {key}=: {name} needs a value",
                        unit.name
                    );
                }
                i += 1;
            }
            assert!(
                !path.is_empty(),
                "{}: {key}= names no subcommand",
                unit.name
            );
        }
    }
}

#[test]
fn the_example_volumes_file_passes_apply_check() {
    let file = deploy_dir().join("host-volumes.example.yaml");
    let out = Command::new(STOWAGE)
        .args(["apply", "--check", "-f"])
        .arg(&file)
        .output()
        .expect("run stowage apply --check");
    assert!(
        out.status.success(),
        "stowage apply --check -f {} exited {:?}: {}{}",
        file.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn apply_check_refuses_a_broken_file() {
    // So that the test above means something: --check does look inside.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "volumes:\n  - name: Not_A_Name\n    size: 1Gi\n    target: /srv/x\n",
    )
    .unwrap();
    let out = Command::new(STOWAGE)
        .args(["apply", "--check", "-f"])
        .arg(&file)
        .output()
        .expect("run stowage apply --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an invalid file exits 2: {stderr}"
    );
    assert!(
        stderr.contains("Not_A_Name"),
        "the error names the bad value: {stderr}"
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let required = std::env::var_os("STOWAGE_REQUIRE_SYSTEMD_ANALYZE").is_some_and(|v| v == "1");
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!required, "systemd-analyze is not installed");
        eprintln!("systemd-analyze not installed: unit verification skipped");
        return;
    }
    // verify checks that ExecStart programs exist: point them at the
    // binary under test.
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for name in [
        "stowage.service",
        "stowage-apply.service",
        "stowage-controller.service",
    ] {
        let text = std::fs::read_to_string(deploy_dir().join(name)).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(INSTALLED, STOWAGE)).unwrap();
        files.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown or misspelt keys are only warnings (exit 0); any line about
    // our files fails the test.
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("stowage")).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify exited {:?}:\n{stderr}",
        out.status.code()
    );
}
