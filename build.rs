//! Generates the CSI gRPC code from `proto/csi.proto` with pure-Rust tools
//! (protox parses, tonic-prost-build emits), so no `protoc` is needed.

use std::path::PathBuf;
use std::process::Command;

#[allow(clippy::disallowed_methods)] // build scripts may run git
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/stowage_cluster.proto");
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile(["csi.proto", "stowage_cluster.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // The bytes replicated writes and reads carry: shared, not copied,
        // between the engine's buffers and the wire.
        .bytes(".stowage.cluster.v1.ReplicaCall.data")
        .bytes(".stowage.cluster.v1.ReplicaAnswer.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    // The commit goes into GetPluginInfo's vendor_version; a tarball build
    // without git reports "unknown".
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=STOWAGE_GIT_COMMIT={commit}");
    let git_dir = PathBuf::from(".git");
    if git_dir.join("HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/refs/heads");
    }
    Ok(())
}
