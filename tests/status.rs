//! `stowage status` against a real pool and state: a staged block volume is
//! reported healthy; a stray loop device on an unrecorded pool image is
//! reported as leaked, and the exit code says so.

#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use stowage::os::loopdev::LoopDevice;

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_volumes_and_leaks() {
    let mut env = Env::new("xfs").await;
    let vol = env.create("status-vol", "ext4", 64 * MIB).await;
    let staging = env.staging_dir("status-vol");
    env.stage(&vol.volume_id, "ext4", &staging).await.unwrap();

    let (code, report) = env.status();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["pool"]["filesystem"], "xfs");
    assert!(report["pool"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        report["problems"].as_array().unwrap().len(),
        0,
        "{report:#}"
    );
    let vols = report["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1);
    let v = &vols[0];
    assert_eq!(v["id"], vol.volume_id.as_str());
    assert_eq!(v["backend"], "block");
    assert_eq!(v["healthy"], true, "{v:#}");
    assert_eq!(v["storage_present"], true);
    assert_eq!(v["staged"]["path"], staging.display().to_string());
    assert_eq!(v["staged"]["mounted"], true);
    let device = v["staged"]["device"].as_str().expect("a staged device");
    assert!(device.starts_with("/dev/loop"), "{device}");

    // A stray image and loop device the state does not explain.
    let stray = env
        .layout
        .pool
        .join("volumes/block")
        .join(format!("{}.img", "ab".repeat(16)));
    std::fs::File::create(&stray)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dev = LoopDevice::attach(&stray, false).expect("attach stray");
    let (code, report) = env.status();
    assert_eq!(code, 1, "{report:#}");
    let problems = report["problems"].as_array().unwrap();
    let has = |kind: &str, subject: &str| {
        problems
            .iter()
            .any(|p| p["kind"] == kind && p["subject"].as_str().unwrap().ends_with(subject))
    };
    assert!(
        has("leaked-loop-device", &dev.path().display().to_string()),
        "{report:#}"
    );
    assert!(
        has(
            "storage-without-record",
            &format!("{}.img", "ab".repeat(16))
        ),
        "{report:#}"
    );
    // The real volume is still fine.
    assert_eq!(report["volumes"][0]["healthy"], true, "{report:#}");

    env.unstage(&vol.volume_id, &staging).await.unwrap();
    env.delete(&vol.volume_id).await.unwrap();
    // The Scratch guard detaches the stray device when `env` drops.
}
