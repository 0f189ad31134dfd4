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

/// The snapshot line of `stowage status` tells copies running from failed
/// ones kept for their IDs, by the mark the server leaves on a failed
/// copy's record: a state with one snapshot of each kind (written through
/// the server's own store) is reported so, in JSON and in the table.
#[test]
fn status_tells_running_snapshot_copies_from_failed_ones() {
    use stowage::state::{Store, Table as StateTable};
    use stowage::volume::record::SnapshotRecord;
    use stowage::volume::{BackendKind, SnapshotId, Uuid};

    let scratch = Scratch::new("status-snaps");
    let state = scratch.root.join("state");
    let pool = scratch.root.join("pool");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&pool).unwrap();
    let snap = |name: &str, ready: bool, failed: Option<&str>| SnapshotRecord {
        id: SnapshotId {
            backend: BackendKind::Block,
            node: "n1".into(),
            uuid: Uuid::new_random(),
        },
        name: name.into(),
        source_volume_id: "block:n1:0123456789abcdef0123456789abcdef".into(),
        size_bytes: MIB as u64,
        fs_type: None,
        created_at: (0, 0),
        ready,
        group: None,
        location: None,
        failed: failed.map(str::to_owned),
    };
    let records = [
        snap("done", true, None),
        snap("running", false, None),
        snap("broken", false, Some("not enough space in the pool: test")),
    ];
    {
        let store = Store::open(&state).unwrap();
        for r in &records {
            store
                .put(StateTable::Snapshots, &r.id.uuid.to_hex(), r)
                .unwrap();
        }
    }
    let run = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
            .arg("status")
            .arg("--state-dir")
            .arg(&state)
            .arg("--pool")
            .arg(&pool)
            .args(["-o", format])
            .output()
            .expect("run stowage status");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let report: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    assert_eq!(report["snapshots"], 3, "{report:#}");
    assert_eq!(report["snapshots_not_ready"], 2, "{report:#}");
    assert_eq!(report["snapshots_copying"], 1, "{report:#}");
    let failed = report["failed_snapshots"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report:#}");
    assert_eq!(failed[0]["id"], records[2].id.to_string());
    assert_eq!(failed[0]["name"], "broken");
    assert_eq!(failed[0]["error"], "not enough space in the pool: test");
    let table = run("table");
    assert!(
        table.contains("Snapshots:  3 (1 being copied, 1 whose copy failed)"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "{} (broken, of {}): not enough space in the pool: test",
            records[2].id, records[2].source_volume_id
        )),
        "{table}"
    );
}
