//! A non-Rust, non-Go gRPC client: Python's grpcio (gRPC C-core) calls the
//! real server on its unix socket. C-core with default channel options
//! sends the percent-encoded socket path as `:authority`
//! (`tmp%2F…%2Fcsi.sock`), grpc-java sends the raw path; neither is a valid
//! URI authority, and the server must answer them all the same.
//!
//! grpcio must be importable by `python3` (`python3 -m pip install grpcio`;
//! scripts/test.sh installs it). Without it these tests fail, not skip.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use prost::Message;
use serde_json::Value;
use stowage::csi;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/csi_calls.py");

/// Fails the test, with what to do, when grpcio cannot be imported.
fn require_grpcio() {
    let out = Command::new("python3")
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install python3 and grpcio (scripts/test.sh does)")
        });
    assert!(
        out.status.success(),
        "grpcio is not importable by python3; install it with `python3 -m pip install grpcio` \
         (scripts/test.sh does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Calls `methods` in order on one grpcio channel to `socket` (default
/// channel options unless `authority` is given) with empty requests, and
/// returns the response bytes of each, failing on any non-OK status.
fn grpcio_calls(socket: &Path, authority: Option<&str>, methods: &[&str]) -> Vec<Vec<u8>> {
    let mut cmd = Command::new("python3");
    cmd.arg(SCRIPT).arg(socket);
    if let Some(a) = authority {
        cmd.args(["--authority", a]);
    }
    let out = cmd.args(methods).output().expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{SCRIPT} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(
        results.len(),
        methods.len(),
        "one result per call: {stdout}"
    );
    results
        .iter()
        .zip(methods)
        .map(|(r, m)| {
            assert_eq!(r["method"], *m);
            assert_eq!(
                r["code"], "OK",
                "{m} through grpcio (authority {authority:?}): {r}"
            );
            decode_hex(r["response"].as_str().expect("response hex"))
        })
        .collect()
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// GetPluginInfo's answer: the plugin name and this build's version.
#[track_caller]
fn assert_plugin_info(bytes: &[u8]) {
    let info = csi::GetPluginInfoResponse::decode(bytes).expect("GetPluginInfoResponse");
    assert_eq!(info.name, "stowage.csi.dev");
    assert_eq!(info.vendor_version, stowage::VENDOR_VERSION);
}

#[track_caller]
fn assert_ready(bytes: &[u8]) {
    let probe = csi::ProbeResponse::decode(bytes).expect("ProbeResponse");
    assert_eq!(probe.ready, Some(true));
}

/// grpcio with default channel options (its `:authority` is the
/// percent-encoded socket path) gets Identity and Controller answers, on
/// one channel: the first request carries the authority as a literal, the
/// later ones refer to it in the HPACK dynamic table.
#[tokio::test(flavor = "multi_thread")]
async fn grpcio_with_default_channel_options_is_served() {
    require_grpcio();
    let mut env = Env::new("xfs").await;
    let vol = env.create("py-listed", "dir", 64 * MIB).await;

    let r = grpcio_calls(
        &env.layout.socket,
        None,
        &[
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Identity/GetPluginCapabilities",
            "/csi.v1.Identity/Probe",
            "/csi.v1.Controller/ControllerGetCapabilities",
            "/csi.v1.Controller/ListVolumes",
            "/csi.v1.Controller/GetCapacity",
        ],
    );

    assert_plugin_info(&r[0]);
    let caps = csi::GetPluginCapabilitiesResponse::decode(&*r[1]).expect("capabilities");
    assert!(!caps.capabilities.is_empty(), "{caps:?}");
    assert_ready(&r[2]);
    let ccaps = csi::ControllerGetCapabilitiesResponse::decode(&*r[3]).expect("controller caps");
    assert!(!ccaps.capabilities.is_empty(), "{ccaps:?}");
    let list = csi::ListVolumesResponse::decode(&*r[4]).expect("ListVolumesResponse");
    let ids: Vec<&str> = list
        .entries
        .iter()
        .filter_map(|e| e.volume.as_ref())
        .map(|v| v.volume_id.as_str())
        .collect();
    assert_eq!(ids, [vol.volume_id.as_str()]);
    let cap = csi::GetCapacityResponse::decode(&*r[5]).expect("GetCapacityResponse");
    assert!(cap.available_capacity > 0, "{cap:?}");
}

/// The authorities other implementations send on a unix socket: the raw
/// socket path (grpc-java with a domain socket address) and `localhost`
/// (grpc-go, grpc-js, grpc-dotnet).
#[tokio::test(flavor = "multi_thread")]
async fn grpcio_with_the_authorities_other_clients_send_is_served() {
    require_grpcio();
    let env = Env::new("xfs").await;
    let path = env.layout.socket.display().to_string();
    for authority in [path.as_str(), "localhost"] {
        let r = grpcio_calls(
            &env.layout.socket,
            Some(authority),
            &["/csi.v1.Identity/GetPluginInfo", "/csi.v1.Identity/Probe"],
        );
        assert_plugin_info(&r[0]);
        assert_ready(&r[1]);
    }
}
