//! Snapshot benchmark, runnable against any CSI driver with snapshots.
//!
//! For each amount W of data (default 64 MiB, 1 GiB, 4 GiB): provisions a
//! volume, publishes it, writes W of incompressible data and syncs it, then
//! times CreateSnapshot until the snapshot is ready_to_use and
//! CreateVolume from that snapshot, so growth with volume size is visible
//! (a copy-on-write pool should be flat). The driver must advertise
//! CREATE_DELETE_SNAPSHOT; otherwise the bench says so and measures nothing.
//!
//!     cargo bench --bench snapshot -- [--written 64Mi,1Gi,4Gi] [--pool-fs xfs|btrfs|ext4] [--json]
//!     cargo bench --bench snapshot -- --endpoint unix:///run/other/csi.sock \
//!         [--access mount|block] [--fs-type ext4] [--param k=v]...

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stowage::csi;
use support::{Args, Driver, VolumeSpec};

#[derive(Debug, serde::Serialize)]
struct Row {
    written_bytes: i64,
    create_snapshot_ms: f64,
    restore_ms: f64,
    snapshot_size_bytes: i64,
}

/// Writes `bytes` of incompressible data to `path` (a file in a mounted
/// volume, or the device of a raw one) and syncs it.
fn fill(path: &Path, bytes: i64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open for writing");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = (left as usize).min(buf.len());
        f.write_all(&buf[..n]).expect("write");
        left -= n as i64;
    }
    f.sync_all().expect("sync");
}

async fn measure(d: &mut Driver, spec: &VolumeSpec, written: i64, work: &Path) -> Row {
    let tag = format!("snapbench-{}-{}", std::process::id(), written >> 20);
    let mut vspec = spec.clone();
    // Room for the data plus filesystem overhead.
    vspec.size = written + written / 8 + (256 << 20);
    let p = support::provision(d, &vspec, &tag, work).await;
    let data = if vspec.block {
        p.target.clone()
    } else {
        p.target.join("data")
    };
    fill(&data, written);

    let req = csi::CreateSnapshotRequest {
        source_volume_id: p.volume.volume_id.clone(),
        name: format!("{tag}-snap"),
        ..Default::default()
    };
    let start = Instant::now();
    let snapshot = loop {
        let s = d
            .controller
            .create_snapshot(req.clone())
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        if s.ready_to_use {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let create_snapshot = start.elapsed();

    let mut restore = vspec.create_request(&format!("{tag}-restore"), d);
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            },
        )),
    });
    let start = Instant::now();
    let restored = d
        .controller
        .create_volume(restore)
        .await
        .expect("CreateVolume from snapshot")
        .into_inner()
        .volume
        .expect("volume");
    let restore_time = start.elapsed();

    d.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: restored.volume_id,
            ..Default::default()
        })
        .await
        .expect("DeleteVolume restored");
    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    support::teardown(d, &p).await;
    Row {
        written_bytes: written,
        create_snapshot_ms: create_snapshot.as_secs_f64() * 1e3,
        restore_ms: restore_time.as_secs_f64() * 1e3,
        snapshot_size_bytes: snapshot.size_bytes,
    }
}

fn main() {
    let args = Args::from_env();
    let written: Vec<i64> = args
        .value("--written")
        .unwrap_or_else(|| "64Mi,1Gi,4Gi".into())
        .split(',')
        .map(support::parse_size)
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (endpoint, env) = match args.value("--endpoint") {
            Some(ep) => (ep, None),
            None => {
                let fs = args.value("--pool-fs").unwrap_or_else(|| "xfs".into());
                // Room for the largest volume, its snapshot and restore.
                let pool_size = (written.iter().max().copied().unwrap_or(0) as u64 * 3 + (4 << 30))
                    .max(4 << 30);
                let env = common::Env::with_pool_size(&fs, "", pool_size, &[]).await;
                (format!("unix://{}", env.layout.socket.display()), Some(env))
            }
        };
        let spec = VolumeSpec {
            block: args.value("--access").as_deref() == Some("block"),
            fs_type: args.value("--fs-type").unwrap_or_default(),
            size: 0,
            parameters: if env.is_some() && args.params().is_empty() {
                [("backend".to_owned(), "block".to_owned())].into()
            } else {
                args.params()
            },
        };
        let mut d = Driver::discover(&endpoint).await;
        if !d.snapshots {
            println!(
                "{} does not advertise CREATE_DELETE_SNAPSHOT: nothing to measure",
                d.name
            );
            return;
        }
        let work: PathBuf = match &env {
            Some(env) => env.scratch.root.join("snapbench"),
            None => std::env::temp_dir().join(format!("csi-snapbench-{}", std::process::id())),
        };
        std::fs::create_dir_all(&work).unwrap();
        let mut rows = Vec::new();
        for w in written {
            rows.push(measure(&mut d, &spec, w, &work).await);
        }
        if args.flag("--json") {
            println!("{}", serde_json::to_string_pretty(&rows).unwrap());
        } else {
            println!("driver {} at {endpoint}", d.name);
            println!(
                "{:>12} {:>18} {:>14}",
                "written", "CreateSnapshot ms", "restore ms"
            );
            for r in &rows {
                println!(
                    "{:>10}Mi {:>18.1} {:>14.1}",
                    r.written_bytes >> 20,
                    r.create_snapshot_ms,
                    r.restore_ms
                );
            }
        }
        if env.is_none() {
            let _ = std::fs::remove_dir_all(&work);
        }
    });
}
