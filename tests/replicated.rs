//! Replicated volumes on a real cluster (issue 14): a controller and three
//! node agents in network namespaces of their own, each keeping copies in
//! its own pool; the engine runs on the node the volume is published to and
//! serves it through FUSE, a loop device and a real filesystem. Faults are
//! real: killed processes, cut links.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use stowage::csi;
use tonic::Code;

const SIZE: i64 = 256 << 20;

fn replicated(name: &str, replicas: &str, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: SIZE,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: HashMap::from([
            ("backend".to_owned(), "replicated".to_owned()),
            ("replicas".to_owned(), replicas.to_owned()),
        ]),
        ..Default::default()
    }
}

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

/// The directory of node `i`'s member of a volume.
fn copy_dir(cl: &Cluster, i: usize, volume_id: &str) -> PathBuf {
    let hex = volume_id.strip_prefix("replicated:").unwrap();
    state_dir(cl, i).join("pool/replicas").join(hex)
}

fn state_dir(cl: &Cluster, i: usize) -> PathBuf {
    cl.root.join("pool-fs").join(node_id(i))
}

/// A volume staged and published on one node, as a CO leaves it.
struct Mounted {
    node: usize,
    staging: PathBuf,
    target: PathBuf,
}

impl Mounted {
    async fn up(
        cl: &mut Cluster,
        i: usize,
        v: &csi::Volume,
        cap: &csi::VolumeCapability,
    ) -> Result<Mounted, tonic::Status> {
        let ctx =
            cl.c.controller
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    node_id: node_id(i),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .publish_context;
        let mut node = cl.node(i).await;
        let staging = cl.root.join(format!("stage-{}-n{i}", v.volume_id.len()));
        let target = cl.root.join(format!("pod-{}-n{i}", v.volume_id.len()));
        let _ = std::fs::create_dir(&staging);
        node.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        node.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx,
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        Ok(Mounted {
            node: i,
            staging,
            target,
        })
    }

    async fn down(self, cl: &mut Cluster, volume_id: &str) {
        let mut node = cl.node(self.node).await;
        node.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_owned(),
                target_path: self.target.display().to_string(),
            })
            .await
            .unwrap();
        node.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.to_owned(),
                staging_target_path: self.staging.display().to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("unstage: {e:?}\n{}", cl.nodes[self.node - 1].log_tail(30)));
        cl.c.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume_id.to_owned(),
                node_id: node_id(self.node),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// The (abnormal, message) of the volume's condition as the controller
/// reads it from the copies' records.
async fn condition(cl: &mut Cluster, volume_id: &str) -> (bool, String) {
    let c = cl
        .get(volume_id)
        .await
        .unwrap()
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    (c.abnormal, c.message)
}

/// Waits (bounded) until every copy of the volume is in sync again.
async fn wait_in_sync(cl: &mut Cluster, volume_id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (abnormal, msg) = condition(cl, volume_id).await;
        if !abnormal {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "copies not back in sync within {within:?}: {msg}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_volume_keeps_its_data_on_every_copy_and_moves_between_nodes() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let v = cl
        .create(replicated("rep-a", "3", cap.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    assert!(
        v.volume_id.starts_with("replicated:") && v.volume_id.matches(':').count() == 1,
        "the ID names no node: {}",
        v.volume_id
    );
    assert!(v.accessible_topology.is_empty());
    assert_eq!(v.capacity_bytes, SIZE);
    for i in 1..=NODES {
        assert!(
            copy_dir(&cl, i, &v.volume_id).join("data").exists(),
            "n{i} holds a copy"
        );
    }
    // Idempotent by name, with no controller state: the same answer again,
    // a conflicting one refused.
    let again = cl
        .create(replicated("rep-a", "3", cap.clone()))
        .await
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let e = cl
        .create(replicated("rep-a", "2", cap.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Bad input.
    let mut bad = replicated("rep-bad", "7", cap.clone());
    assert_eq!(
        cl.create(bad.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    bad.parameters.insert("replicas".into(), "3".into());
    bad.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
    assert_eq!(
        cl.create(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let e = cl
        .create(replicated("rep-big", "4", cap.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains('3'),
        "names how many were found: {e:?}"
    );

    // Published on n1, written there.
    let m = Mounted::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    // Single-node: another node is refused while n1 holds it.
    let e =
        cl.c.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: node_id(2),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let data = pattern(14, 8 << 20);
    write_synced(&m.target.join("file"), &data);
    m.down(&mut cl, &v.volume_id).await;
    // Every copy holds the same bytes.
    let first = copy_dir(&cl, 1, &v.volume_id).join("data");
    for i in 2..=NODES {
        assert!(
            same_files(&first, &copy_dir(&cl, i, &v.volume_id).join("data")),
            "n{i}'s copy differs from n1's"
        );
    }
    assert!(!condition(&mut cl, &v.volume_id).await.0);

    // Moved to n2: the data is there.
    let m = Mounted::up(&mut cl, 2, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    assert!(std::fs::read(m.target.join("file")).unwrap() == data);
    m.down(&mut cl, &v.volume_id).await;

    cl.delete(&v.volume_id).await.unwrap();
    for i in 1..=NODES {
        assert!(
            !copy_dir(&cl, i, &v.volume_id).exists(),
            "n{i}'s copy outlived the volume"
        );
    }
    cl.delete(&v.volume_id).await.unwrap();
    assert_eq!(
        cl.get(&v.volume_id).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_copy_is_marked_out_of_sync_and_rebuilt_when_it_returns() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let v = cl
        .create(replicated("rep-k", "3", cap.clone()))
        .await
        .unwrap();
    let m = Mounted::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    write_synced(&m.target.join("before"), &pattern(1, 4 << 20));
    // kill -9 the agent of n3 (a copy): writes go on.
    cl.nodes[2].kill9();
    let during = pattern(2, 16 << 20);
    write_synced(&m.target.join("during"), &during);
    let (abnormal, msg) = condition(&mut cl, &v.volume_id).await;
    assert!(abnormal, "a dead copy is out of sync: {msg}");
    assert!(msg.contains("2 of 3"), "{msg}");
    // It comes back (a new boot): rebuilt from the regions written while
    // it was away, then in sync again.
    cl.nodes[2].restart();
    cl.wait_fresh(&[node_id(3)]).await;
    wait_in_sync(&mut cl, &v.volume_id, Duration::from_secs(60)).await;
    write_synced(&m.target.join("after"), &pattern(3, 1 << 20));
    m.down(&mut cl, &v.volume_id).await;
    let first = copy_dir(&cl, 1, &v.volume_id).join("data");
    assert!(
        same_files(&first, &copy_dir(&cl, 3, &v.volume_id).join("data")),
        "the rebuilt copy differs"
    );
    // Read back on the rebuilt node.
    let m = Mounted::up(&mut cl, 3, &v, &cap).await.unwrap();
    assert!(std::fs::read(m.target.join("during")).unwrap() == during);
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// Writes `data` to `path` and fsyncs, in a thread: the error, if any
/// (bounded: the engine fails I/O it cannot complete).
fn try_write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_engine_is_fenced_once_the_volume_moved() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let v = cl
        .create(replicated("rep-f", "3", cap.clone()))
        .await
        .unwrap();
    let m1 = Mounted::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    let a = pattern(21, 2 << 20);
    write_synced(&m1.target.join("a"), &a);
    // The controller is not on the data path: writes go on while it is
    // down.
    cl.controller.kill9();
    let b = pattern(22, 2 << 20);
    write_synced(&m1.target.join("b"), &b);
    cl.controller.restart();
    cl.reconnect().await;
    cl.wait_fresh(&(1..=NODES).map(node_id).collect::<Vec<_>>())
        .await;

    // n1 is cut off (as a node that looks dead): the CO moves the volume.
    cl.net.partition(cl.net.host(1));
    cl.c.controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node_id(1),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("unpublish from the cut-off n1: {e:?}"));
    let m2 = Mounted::up(&mut cl, 2, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    assert!(std::fs::read(m2.target.join("a")).unwrap() == a);
    assert!(std::fs::read(m2.target.join("b")).unwrap() == b);
    let c = pattern(23, 1 << 20);
    write_synced(&m2.target.join("c"), &c);

    // n1 comes back: its engine's writes are refused, never land.
    cl.net.heal(cl.net.host(1));
    let target = m1.target.clone();
    let late = tokio::task::spawn_blocking(move || {
        try_write_synced(&target.join("late"), &pattern(24, 1 << 20))
    })
    .await
    .unwrap();
    assert!(late.is_err(), "the fenced engine acknowledged a write");
    m2.down(&mut cl, &v.volume_id).await;

    // What n2 wrote is whole; nothing of n1's late write.
    let m3 = Mounted::up(&mut cl, 3, &v, &cap).await.unwrap();
    assert!(std::fs::read(m3.target.join("c")).unwrap() == c);
    assert!(std::fs::read(m3.target.join("a")).unwrap() == a);
    assert!(
        !m3.target.join("late").exists(),
        "a write of the fenced engine landed"
    );
    m3.down(&mut cl, &v.volume_id).await;
    // n1 cleans up its stale staging (its publication is gone already).
    let mut n1 = cl.node(1).await;
    n1.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: m1.target.display().to_string(),
        })
        .await
        .unwrap();
    n1.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: m1.staging.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage on n1: {e:?}\n{}", cl.nodes[0].log_tail(30)));
    cl.delete(&v.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_majority_fails_io_and_loses_no_acknowledged_write() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let mut req = replicated("rep-m", "3", cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let m = Mounted::up(&mut cl, 1, &v, &cap).await.unwrap();
    let kept = pattern(31, 4 << 20);
    write_synced(&m.target.join("kept"), &kept);
    // Two of three copies die: the engine can neither acknowledge nor mark
    // them out of sync, so I/O fails (bounded), never acknowledged.
    cl.nodes[1].kill9();
    cl.nodes[2].kill9();
    let target = m.target.clone();
    let lost = tokio::task::spawn_blocking(move || {
        try_write_synced(&target.join("lost"), &pattern(32, 1 << 20))
    })
    .await
    .unwrap();
    assert!(lost.is_err(), "a write was acknowledged without a majority");
    cl.nodes[1].restart();
    cl.nodes[2].restart();
    cl.wait_fresh(&[node_id(2), node_id(3)]).await;
    // The stuck staging is taken down; a fresh one has every acknowledged
    // write.
    let mut n1 = cl.node(1).await;
    n1.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: m.target.display().to_string(),
        })
        .await
        .unwrap();
    n1.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: m.staging.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage on n1: {e:?}\n{}", cl.nodes[0].log_tail(30)));
    cl.c.controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node_id(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let m = Mounted::up(&mut cl, 2, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    assert!(std::fs::read(m.target.join("kept")).unwrap() == kept);
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}
