//! `stowage serve --metrics-address`: a real server on a loop-mounted xfs
//! pool runs a lifecycle (create, stage, publish, snapshot, a busy
//! unpublish answered ABORTED, unpublish, unstage, delete, and calls that
//! fail with known codes), then `/metrics` is fetched over plain HTTP and
//! its Prometheus text exposition parsed: every series is present, request
//! counts equal the calls made with the codes they got, histograms agree
//! with the counts, and the state gauges match what the test made.
//! `/healthz` is 200, then 503 with the reason while the pool (and then the
//! state directory) is made read-only by a read-only bind mount over it.
//! Mounts and loop devices are cleaned up by the Env and guards on drop.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use stowage::csi;
use tonic::Code;

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// One HTTP/1.1 GET (or HEAD) on a fresh connection: status, headers
/// (lower-cased names), body.
fn http(method: &str, addr: &str, path: &str) -> (u16, HashMap<String, String>, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http("GET", addr, path);
    (status, body)
}

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed Prometheus text exposition (format 0.0.4).
#[derive(Debug)]
struct Exposition {
    /// Family name → type, from `# TYPE` lines.
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// Parses a label set body (`a="x",b="y\"z"`), unescaping values.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label without =\" in {s:?}"));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "label name {key:?} in {s:?}"
        );
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("dangling escape in {s:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {s:?}"),
            }
        };
        assert!(
            out.insert(key.to_owned(), value).is_none(),
            "label {key} twice in {s:?}"
        );
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out
}

fn parse(text: &str) -> Exposition {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().expect("TYPE name").to_owned();
                    let ty = parts.next().expect("TYPE type").to_owned();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"]
                            .contains(&ty.as_str()),
                        "{line}"
                    );
                    assert!(types.insert(name, ty).is_none(), "TYPE twice: {line}");
                }
                Some("HELP") => assert!(parts.next().is_some(), "{line}"),
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.strip_suffix('}').expect("closing brace"))),
            None => (series, BTreeMap::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name {name:?}"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    let exp = Exposition { types, samples };
    for s in &exp.samples {
        assert!(
            exp.family_of(&s.name).is_some(),
            "sample {} has no # TYPE",
            s.name
        );
    }
    exp
}

impl Exposition {
    /// The declared family a sample name belongs to (histograms add
    /// `_bucket`, `_sum` and `_count`).
    fn family_of(&self, name: &str) -> Option<&str> {
        if self.types.contains_key(name) {
            return Some(self.types.get_key_value(name).unwrap().0);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && self.types.get(base).map(String::as_str) == Some("histogram")
            {
                return Some(self.types.get_key_value(base).unwrap().0);
            }
        }
        None
    }

    fn type_of(&self, family: &str) -> &str {
        self.types
            .get(family)
            .unwrap_or_else(|| panic!("no # TYPE for {family}"))
    }

    /// Samples of `name` whose labels include `labels`.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample of `name` with exactly `labels`.
    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        match found.as_slice() {
            [s] => s.value,
            [] => panic!("no sample {name}{want:?}"),
            _ => panic!("{} samples {name}{want:?}", found.len()),
        }
    }
}

fn scrape(addr: &str) -> Exposition {
    let (status, headers, body) = http("GET", addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse(&body)
}

async fn env_with_metrics() -> (Env, String) {
    let addr = free_addr();
    let env = Env::with_args("xfs", &["--metrics-address", &addr]).await;
    (env, addr)
}

/// Records the code of each call the test makes, by method.
#[derive(Debug, Default)]
struct Calls(BTreeMap<(String, String), u64>);

impl Calls {
    fn note<T>(&mut self, method: &str, r: &Result<T, tonic::Status>) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *self
            .0
            .entry((method.to_owned(), code_name(code).to_owned()))
            .or_default() += 1;
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::Aborted => "ABORTED",
        other => panic!("the test makes no call that answers {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_lifecycle_and_show_the_drivers_state() {
    let (mut env, addr) = env_with_metrics().await;
    let mut calls = Calls::default();

    // Before any RPC: no request series, every state series at zero.
    let m = scrape(&addr);
    assert!(m.matching("stowage_rpc_requests_total", &[]).is_empty());
    assert_eq!(m.value("stowage_volumes", &[("backend", "block")]), 0.0);
    assert_eq!(m.value("stowage_staged_volumes", &[]), 0.0);
    assert_eq!(m.value("stowage_loop_devices_attached", &[]), 0.0);

    // Create (and one refused: an unknown parameter).
    let r = env
        .c
        .controller
        .create_volume(create_req("m1", "ext4", 64 * MIB))
        .await;
    calls.note("CreateVolume", &r);
    let vol = r.unwrap().into_inner().volume.unwrap().volume_id;
    let mut bad = create_req("m2", "ext4", 64 * MIB);
    bad.parameters.insert("colour".into(), "blue".into());
    let r = env.c.controller.create_volume(bad).await;
    calls.note("CreateVolume", &r);
    assert_code(r, Code::InvalidArgument);

    // Stage and publish.
    let staging = env.staging_dir("m1");
    let target = env.target_path("m1");
    let r = env.stage(&vol, "ext4", &staging).await;
    calls.note("NodeStageVolume", &r);
    r.unwrap();
    let r = env.publish(&vol, "ext4", &staging, &target, false).await;
    calls.note("NodePublishVolume", &r);
    r.unwrap();

    // Snapshot.
    let r = env
        .c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: "m1-snap".into(),
            ..Default::default()
        })
        .await;
    calls.note("CreateSnapshot", &r);
    let snap = r.unwrap().into_inner().snapshot.unwrap().snapshot_id;

    let m = scrape(&addr);
    assert_eq!(m.value("stowage_volumes", &[("backend", "block")]), 1.0);
    assert_eq!(m.value("stowage_volumes", &[("backend", "dir")]), 0.0);
    assert_eq!(m.value("stowage_snapshots", &[("backend", "block")]), 1.0);
    assert_eq!(m.value("stowage_staged_volumes", &[]), 1.0);
    assert_eq!(m.value("stowage_publications", &[]), 1.0);
    assert_eq!(
        m.value("stowage_loop_devices_attached", &[]),
        loops_under(&env.layout.pool).len() as f64
    );
    assert_eq!(m.value("stowage_loop_devices_attached", &[]), 1.0);

    // A file held open in the target makes the unmount busy: ABORTED.
    std::fs::write(target.join("held"), b"x").unwrap();
    let held = std::fs::File::open(target.join("held")).unwrap();
    let r = env.unpublish(&vol, &target).await;
    calls.note("NodeUnpublishVolume", &r);
    assert_code(r, Code::Aborted);
    drop(held);

    // Undo everything.
    let r = env.unpublish(&vol, &target).await;
    calls.note("NodeUnpublishVolume", &r);
    r.unwrap();
    let r = env.unstage(&vol, &staging).await;
    calls.note("NodeUnstageVolume", &r);
    r.unwrap();
    let r = env.delete(&vol).await;
    calls.note("DeleteVolume", &r);
    r.unwrap();
    let r = env
        .c
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap,
            ..Default::default()
        })
        .await;
    calls.note("DeleteSnapshot", &r);
    r.unwrap();
    // A volume that is gone: NOT_FOUND.
    let r = env
        .c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await;
    calls.note("NodeGetVolumeStats", &r);
    assert_code(r, Code::NotFound);

    let m = scrape(&addr);

    // Every request series, and nothing else, with the calls' counts.
    assert_eq!(m.type_of("stowage_rpc_requests_total"), "counter");
    let mut seen = BTreeMap::new();
    for s in m.matching("stowage_rpc_requests_total", &[]) {
        assert_eq!(s.labels.len(), 2, "{s:?}");
        seen.insert(
            (s.labels["method"].clone(), s.labels["code"].clone()),
            s.value as u64,
        );
    }
    assert_eq!(seen, calls.0);

    // ABORTED: one, on NodeUnpublishVolume; every other RPC at 0.
    assert_eq!(m.type_of("stowage_rpc_aborted_total"), "counter");
    let aborted = m.matching("stowage_rpc_aborted_total", &[]);
    for method in &stowage::server::metrics::METHODS[3..] {
        let want = if *method == "NodeUnpublishVolume" {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            m.value("stowage_rpc_aborted_total", &[("method", method)]),
            want,
            "{method}"
        );
    }
    assert_eq!(aborted.len(), stowage::server::metrics::METHODS.len() - 3);

    // Latency histograms agree with the counts.
    assert_eq!(m.type_of("stowage_rpc_duration_seconds"), "histogram");
    let mut per_method: BTreeMap<String, u64> = BTreeMap::new();
    for ((method, _), n) in &calls.0 {
        *per_method.entry(method.clone()).or_default() += n;
    }
    for (method, n) in &per_method {
        let l = [("method", method.as_str())];
        assert_eq!(
            m.value("stowage_rpc_duration_seconds_count", &l),
            *n as f64,
            "{method}"
        );
        assert!(m.value("stowage_rpc_duration_seconds_sum", &l) > 0.0);
        let mut buckets: Vec<(f64, f64)> = m
            .matching("stowage_rpc_duration_seconds_bucket", &l)
            .iter()
            .map(|s| {
                let le = &s.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.len() > 5, "{method}: {buckets:?}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{method}: buckets are cumulative: {buckets:?}"
        );
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, *n as f64));
        assert_eq!(
            m.value("stowage_rpc_in_flight", &l),
            0.0,
            "{method} finished"
        );
    }
    assert_eq!(
        m.matching("stowage_rpc_duration_seconds_count", &[]).len(),
        per_method.len()
    );

    // The driver's state: everything undone.
    for backend in ["dir", "block"] {
        assert_eq!(m.value("stowage_volumes", &[("backend", backend)]), 0.0);
        assert_eq!(m.value("stowage_snapshots", &[("backend", backend)]), 0.0);
    }
    assert_eq!(m.value("stowage_staged_volumes", &[]), 0.0);
    assert_eq!(m.value("stowage_publications", &[]), 0.0);
    assert_eq!(m.value("stowage_loop_devices_attached", &[]), 0.0);
    assert_eq!(m.value("stowage_background_copies", &[]), 0.0);
    for service in ["controller", "node"] {
        assert_eq!(
            m.value("stowage_operations_in_flight", &[("service", service)]),
            0.0
        );
    }

    // Pool capacity: the pool filesystem's size, as statvfs says.
    let vfs = nix::sys::statvfs::statvfs(&env.layout.pool).unwrap();
    let total = (vfs.blocks() * vfs.fragment_size()) as f64;
    assert_eq!(m.type_of("stowage_pool_capacity_bytes"), "gauge");
    assert_eq!(m.value("stowage_pool_capacity_bytes", &[]), total);
    let free = m.value("stowage_pool_free_bytes", &[]);
    assert!(free > 0.0 && free < total, "free {free} of {total}");

    // State logs: every table listed; the ones written this run have
    // entries; nothing was compacted in so short a run.
    for table in [
        "volumes",
        "node-volumes",
        "nodes",
        "snapshots",
        "group-snapshots",
    ] {
        let l = [("table", table)];
        assert_eq!(
            m.value("stowage_state_log_compactions_total", &l),
            0.0,
            "{table}"
        );
        let file = m.value("stowage_state_log_file_bytes", &l);
        let on_disk = std::fs::metadata(env.layout.state.join(format!("{table}.log")))
            .map_or(0, |md| md.len());
        assert_eq!(file, on_disk as f64, "{table}");
    }
    for table in ["volumes", "node-volumes", "nodes", "snapshots"] {
        let l = [("table", table)];
        let used = m.value("stowage_state_log_used_bytes", &l);
        let live = m.value("stowage_state_log_live_bytes", &l);
        let file = m.value("stowage_state_log_file_bytes", &l);
        assert!(
            used > 0.0 && live <= used && used <= file,
            "{table}: {used} {live} {file}"
        );
    }
    assert_eq!(m.type_of("stowage_state_log_compactions_total"), "counter");

    // HEAD and other paths.
    let (status, headers, body) = http("HEAD", &addr, "/metrics");
    assert_eq!(status, 200);
    assert!(body.is_empty(), "HEAD has no body: {body:?}");
    assert!(headers.contains_key("content-length"));
    assert_eq!(get(&addr, "/nope").0, 404);
}

/// Undoes a read-only bind mount over a directory when dropped.
struct ReadOnlyOver(PathBuf);

impl ReadOnlyOver {
    fn new(dir: &Path) -> Self {
        stowage::os::mount::bind(dir, dir).unwrap();
        let guard = ReadOnlyOver(dir.to_owned());
        stowage::os::mount::remount_bind_read_only(dir, nix::mount::MsFlags::empty()).unwrap();
        guard
    }
}

impl Drop for ReadOnlyOver {
    fn drop(&mut self) {
        let _ = stowage::os::mount::unmount(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_is_503_with_the_reason_while_the_pool_or_state_is_read_only() {
    let (env, addr) = env_with_metrics().await;
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));

    let ro = ReadOnlyOver::new(&env.layout.pool);
    let (status, body) = get(&addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&env.layout.pool.display().to_string()) && body.contains("not writable"),
        "{body}"
    );
    assert!(body.contains("Read-only file system"), "{body}");
    // Metrics are still served while unhealthy.
    assert_eq!(
        scrape(&addr).value("stowage_volumes", &[("backend", "dir")]),
        0.0
    );
    drop(ro);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));

    let ro = ReadOnlyOver::new(&env.layout.state);
    let (status, body) = get(&addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&env.layout.state.display().to_string()),
        "{body}"
    );
    assert!(body.contains("Read-only file system"), "{body}");
    drop(ro);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
}
