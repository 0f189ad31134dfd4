//! Replicated volumes on a real cluster (issue 14): a controller and three
//! node agents in network namespaces of their own, each keeping copies in
//! its own pool; the engine runs on the node the volume is published to and
//! serves it through FUSE, a loop device and a real filesystem. Faults are
//! real: killed processes, cut links.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::checker::{BLOCK, History, block_bytes, open_direct};
use common::cluster::*;
use common::*;
use stowage::csi;
use tonic::Code;

const SIZE: i64 = 256 << 20;

fn replicated(name: &str, replicas: &str, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    replicated_req(name, replicas, SIZE, cap)
}

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

/// Threads of process `pid` that serve a FUSE file (fuser names them
/// `fuser-<i>`).
fn fuse_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("fuser-"))
        .count()
}

fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_volume_keeps_its_data_on_every_copy_and_moves_between_nodes() {
    // n2 serves its engines' FUSE files with 3 workers instead of the
    // default.
    let mut cl = Cluster::start_with(&[
        NodeOpts::default(),
        NodeOpts {
            args: vec!["--fuse-workers".into(), "3".into()],
            ..Default::default()
        },
    ])
    .await;
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
        assert!(cl.copy_data(i, &v.volume_id).exists(), "n{i} holds a copy");
    }
    // Listed with the node-local volumes, page by page too.
    cl.create(create_req("plain", "ext4", 64 << 20))
        .await
        .unwrap();
    for page in [0, 1] {
        let listed = cl.list_all(page).await.unwrap();
        assert_eq!(listed.len(), 2, "page size {page}: {listed:?}");
        assert!(listed.contains(&v.volume_id), "{listed:?}");
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
    let m = Published::up(&mut cl, 1, &v, &cap)
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
    for i in 2..=NODES {
        assert!(
            cl.same_copies(1, i, &v.volume_id).await,
            "n{i}'s copy differs from n1's"
        );
    }
    assert!(!cl.condition(&v.volume_id).await.0);

    // Moved to n2: the data is there, served by as many FUSE workers as
    // n2 was told.
    assert_eq!(fuse_workers(cl.nodes[1].pid()), 0);
    let m = Published::up(&mut cl, 2, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    assert!(std::fs::read(m.target.join("file")).unwrap() == data);
    assert_eq!(fuse_workers(cl.nodes[1].pid()), 3);
    m.down(&mut cl, &v.volume_id).await;
    assert_eq!(fuse_workers(cl.nodes[1].pid()), 0);

    cl.delete(&v.volume_id).await.unwrap();
    for i in 1..=NODES {
        assert!(
            !cl.copy_dir(i, &v.volume_id).exists(),
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
    let m = Published::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    write_synced(&m.target.join("before"), &pattern(1, 4 << 20));
    // kill -9 the agent of n3 (a copy): writes go on.
    cl.nodes[2].kill9();
    let during = pattern(2, 16 << 20);
    write_synced(&m.target.join("during"), &during);
    let (abnormal, msg) = cl.condition(&v.volume_id).await;
    assert!(abnormal, "a dead copy is out of sync: {msg}");
    assert!(msg.contains("2 of 3"), "{msg}");
    assert!(msg.contains("published on n1"), "{msg}");
    assert!(
        msg.contains("n3 out"),
        "the engine's view of each copy: {msg}"
    );
    // The node's metrics show each copy as its engine sees it.
    assert_eq!(cl.copy_in_sync_metric(1, "n3"), Some(0), "n1's engine view");
    assert_eq!(cl.copy_in_sync_metric(1, "n2"), Some(1), "n1's engine view");
    // It comes back (a new boot): rebuilt from the regions written while
    // it was away, then in sync again.
    cl.nodes[2].restart();
    cl.wait_fresh(&[node_id(3)]).await;
    cl.wait_in_sync(&v.volume_id, Duration::from_secs(60)).await;
    let rebuilt =
        rebuilt_bytes(&cl, 1).unwrap_or_else(|body| panic!("no rebuild counter:\n{body}"));
    assert!(
        rebuilt >= 16 << 20 && rebuilt < SIZE as u64,
        "rebuilt the regions written while away (16 MiB and metadata), not the whole volume: {rebuilt}"
    );
    write_synced(&m.target.join("after"), &pattern(3, 1 << 20));
    m.down(&mut cl, &v.volume_id).await;
    assert!(
        cl.same_copies(1, 3, &v.volume_id).await,
        "the rebuilt copy differs"
    );
    // Read back on the rebuilt node.
    let m = Published::up(&mut cl, 3, &v, &cap).await.unwrap();
    assert!(std::fs::read(m.target.join("during")).unwrap() == during);
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// DeleteVolume deletes nothing while a copy's node is down. It used to
/// delete the copies ahead of that one in the record's order, then fail;
/// a retry found only the copy left (nobody asked it) and answered OK, and
/// that copy outlived the volume once its node was back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_not_deleted_in_part_while_a_copy_is_down() {
    let mut cl = Cluster::start().await;
    let v = cl.create(replicated("rep-d", "3", ext4())).await.unwrap();
    let record: serde_json::Value = serde_json::from_str(&record_on(&cl, 1, &v.volume_id)).unwrap();
    let members: Vec<String> = record["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(members.len(), 3, "{record}");
    // The node of the last member in the record dies.
    let last = &members[2];
    let i = (1..=NODES).find(|&i| node_id(i) == *last).unwrap();
    cl.nodes[i - 1].kill9();
    cl.wait_stale(last).await;
    for _ in 0..2 {
        let e = cl.delete(&v.volume_id).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains(last.as_str()), "{e:?}");
        for j in 1..=NODES {
            assert!(
                cl.copy_dir(j, &v.volume_id).exists(),
                "n{j}'s copy went while the delete was refused"
            );
        }
    }
    cl.nodes[i - 1].restart();
    cl.wait_fresh(std::slice::from_ref(last)).await;
    cl.delete(&v.volume_id).await.unwrap();
    for j in 1..=NODES {
        assert!(!cl.copy_dir(j, &v.volume_id).exists(), "n{j}'s copy stayed");
    }
    cl.delete(&v.volume_id).await.unwrap();
}

/// The bytes node `host`'s engines rebuilt since its agent started, from
/// its metrics (Err: the metrics, which have no such counter).
fn rebuilt_bytes(cl: &Cluster, host: usize) -> Result<u64, String> {
    let (_, body) = cl.http_get(host, NODE_METRICS_PORT, "/metrics");
    body.lines()
        .find(|l| l.starts_with("stowage_replicated_rebuild_bytes_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or(body)
}

/// Agents stopped with SIGTERM (an upgrade, a reboot) close their copies
/// clean: each keeps its boot, so the volume staged again is in sync at
/// once, with nothing rebuilt. So do copies of a volume just released
/// (ControllerUnpublish), and copies nobody wrote for a while, even when
/// their agents are then killed with -9. Agents killed with -9 right after
/// a write, the volume unstaged but not released, leave every copy at a
/// new boot: all but one are rebuilt in full, as a crash must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_closed_clean_by_a_graceful_restart_a_release_or_while_idle_need_no_rebuild() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let v = cl
        .create(replicated("rep-clean", "3", cap.clone()))
        .await
        .unwrap();
    let data = pattern(7, 8 << 20);
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    write_synced(&m.target.join("kept"), &data);
    m.down(&mut cl, &v.volume_id).await;

    let clean_files = |cl: &Cluster| -> Vec<bool> {
        (1..=3)
            .map(|i| {
                cl.copy_data(i, &v.volume_id)
                    .with_file_name("clean")
                    .exists()
            })
            .collect()
    };
    let wait_all_clean = |cl: &Cluster, why: &str| {
        let start = std::time::Instant::now();
        while clean_files(cl) != [true; 3] {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{why} copies not closed clean in 30 s: {:?}",
                clean_files(cl)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let more = pattern(9, 4 << 20);
    for stop in [
        "SIGTERM",
        "kill -9 right after the release",
        "kill -9 once idle",
        "kill -9",
    ] {
        match stop {
            "SIGTERM" => {
                for n in &cl.nodes {
                    let st = n.terminate().expect("running");
                    assert!(st.success(), "SIGTERM: {st}");
                }
            }
            "kill -9 right after the release" => {
                // The last round ended with the volume released: each
                // copy that took the release (a majority, before
                // ControllerUnpublish answered) closed clean as it did.
                let closed = clean_files(&cl);
                assert!(
                    closed.iter().filter(|c| **c).count() >= 2,
                    "copies closed clean by the release: {closed:?}"
                );
                // The last one may take the release a little later.
                wait_all_clean(&cl, "released");
                for n in &cl.nodes {
                    let _ = n.kill9();
                }
            }
            "kill -9 once idle" => {
                written_not_released(&mut cl, &v, &cap, &more).await;
                // Unwritten for 5 s, each copy is closed clean (checked
                // every 2 s).
                wait_all_clean(&cl, "idle");
                for n in &cl.nodes {
                    let _ = n.kill9();
                }
            }
            _ => {
                written_not_released(&mut cl, &v, &cap, &more).await;
                assert_eq!(clean_files(&cl), [false; 3], "just written");
                for n in &cl.nodes {
                    let _ = n.kill9();
                }
            }
        }
        for i in 1..=3 {
            cl.nodes[i - 1].restart();
            wait_socket(&cl.node_socket(i), &cl.nodes[i - 1]);
        }
        cl.wait_fresh(&[node_id(1), node_id(2), node_id(3)]).await;
        let m = Published::up(&mut cl, 1, &v, &cap)
            .await
            .unwrap_or_else(|e| panic!("{stop}: up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
        if stop == "kill -9" {
            cl.wait_in_sync(&v.volume_id, Duration::from_secs(120))
                .await;
            let rebuilt = rebuilt_bytes(&cl, 1).expect("a rebuild counter");
            assert!(
                rebuilt >= 2 * SIZE as u64,
                "after kill -9 every copy restarted: two are reseeded in full, not {rebuilt} bytes"
            );
        } else {
            let (abnormal, msg) = cl.condition(&v.volume_id).await;
            assert!(
                !abnormal,
                "{stop}: copies closed clean are in sync at once: {msg}"
            );
            assert!(msg.contains("3 of 3"), "{msg}");
            assert_eq!(
                rebuilt_bytes(&cl, 1).unwrap_or(0),
                0,
                "{stop}: nothing rebuilt"
            );
        }
        assert!(std::fs::read(m.target.join("kept")).unwrap() == data);
        if stop.contains("idle") || stop == "kill -9" {
            assert!(std::fs::read(m.target.join("more")).unwrap() == more);
        }
        m.down(&mut cl, &v.volume_id).await;
    }
    assert!(cl.same_copies(1, 2, &v.volume_id).await);
    assert!(cl.same_copies(1, 3, &v.volume_id).await);
    cl.delete(&v.volume_id).await.unwrap();
}

/// Publishes `v` on n1, writes `data` to its file `more` with fsync, and
/// unstages it without releasing it (no ControllerUnpublish): the engine
/// flushed and stopped, the copies still owned by n1.
async fn written_not_released(
    cl: &mut Cluster,
    v: &csi::Volume,
    cap: &csi::VolumeCapability,
    data: &[u8],
) {
    let m = Published::up(cl, 1, v, cap).await.unwrap();
    write_synced(&m.target.join("more"), data);
    m.node_down(cl, &v.volume_id).await;
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
    let m1 = Published::up(&mut cl, 1, &v, &cap)
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
    let m2 = Published::up(&mut cl, 2, &v, &cap)
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
    let m3 = Published::up(&mut cl, 3, &v, &cap).await.unwrap();
    assert!(std::fs::read(m3.target.join("c")).unwrap() == c);
    assert!(std::fs::read(m3.target.join("a")).unwrap() == a);
    assert!(
        !m3.target.join("late").exists(),
        "a write of the fenced engine landed"
    );
    m3.down(&mut cl, &v.volume_id).await;
    // n1 cleans up its stale staging (its publication is gone already).
    m1.node_down(&mut cl, &v.volume_id).await;
    // DeleteVolume needs every member fresh (UNAVAILABLE before): n1
    // registers again within its interval after the heal.
    cl.wait_fresh(&[node_id(1)]).await;
    cl.delete(&v.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_majority_fails_io_and_loses_no_acknowledged_write() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let mut req = replicated("rep-m", "3", cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
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
    m.down(&mut cl, &v.volume_id).await;
    let m = Published::up(&mut cl, 2, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    assert!(std::fs::read(m.target.join("kept")).unwrap() == kept);
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// The checker itself can fail: on a plain file, an acknowledged write
/// replaced by an older one is lost, a flipped byte is corruption.
#[test]
fn the_checker_finds_lost_and_corrupted_writes() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev");
    std::fs::File::create(&dev)
        .unwrap()
        .set_len(64 * BLOCK as u64)
        .unwrap();
    let mut h = History::default();
    let mut rng = 7;
    h.burst(&open_direct(&dev), &mut rng, 64, 200);
    assert_eq!(h.check(&dev, 64), (vec![], vec![]));
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    let (&block, writes) = h.issued.iter().find(|(_, w)| w.len() > 1).unwrap();
    f.write_all_at(&block_bytes(block, writes[0]), block * BLOCK as u64)
        .unwrap();
    let (lost, corrupt) = h.check(&dev, 64);
    assert_eq!((lost.len(), corrupt.len()), (1, 0), "{lost:?} {corrupt:?}");
    // A real flip: the byte there may already be 0xff.
    let other = (block + 1) % 64;
    let at = other * BLOCK as u64 + 100;
    let mut byte = [0u8];
    std::fs::File::open(&dev)
        .unwrap()
        .read_exact_at(&mut byte, at)
        .unwrap();
    f.write_all_at(&[!byte[0]], at).unwrap();
    let (_, corrupt) = h.check(&dev, 64);
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
}

/// Jepsen-style: unique, verifiable 4 KiB writes with fdatasync from the
/// published raw volume, every acknowledged one recorded, copies killed,
/// restarted and cut off between bursts; then everything is read back from
/// a fresh publish on another node: no acknowledged write lost, nothing
/// corrupted. `REPL_CHECK_ROUNDS` (default 4) sets the rounds,
/// `REPL_CHECK_SEED` the seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_under_copy_faults() {
    let rounds: usize = std::env::var("REPL_CHECK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut rng: u64 = std::env::var("REPL_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let mut cl = Cluster::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = replicated("rep-j", "3", cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let blocks = 4096; // the first 16 MiB: bursts hit blocks many times
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    let mut h = History::default();
    let mut faults = Vec::new();
    for round in 0..rounds {
        let victim = 2 + round % 2;
        let fault = match round % 3 {
            0 => "kill -9",
            1 => "link cut",
            _ => "kill -9 twice",
        };
        faults.push(format!("round {round}: {fault} n{victim}"));
        (h, rng) = h.bursts(m.target.clone(), rng, blocks, 1, 200).await;
        match fault {
            "link cut" => cl.net.partition(cl.net.host(victim)),
            _ => {
                cl.nodes[victim - 1].kill9();
            }
        }
        (h, rng) = h.bursts(m.target.clone(), rng, blocks, 3, 100).await;
        match fault {
            "link cut" => cl.net.heal(cl.net.host(victim)),
            "kill -9 twice" => {
                cl.nodes[victim - 1].restart();
                cl.wait_fresh(&[node_id(victim)]).await;
                cl.nodes[victim - 1].kill9();
                cl.nodes[victim - 1].restart();
            }
            _ => cl.nodes[victim - 1].restart(),
        }
        cl.wait_fresh(&[node_id(victim)]).await;
        (h, rng) = h.bursts(m.target.clone(), rng, blocks, 1, 200).await;
        cl.wait_in_sync(&v.volume_id, Duration::from_secs(60)).await;
    }
    m.down(&mut cl, &v.volume_id).await;
    let m = Published::up(&mut cl, 2, &v, &cap).await.unwrap();
    let what = format!("{rounds} rounds ({}), ", faults.join("; "));
    let (h, lost, corrupt) = h.read_back(m.target.clone(), blocks, &what).await;
    h.assert_intact(&lost, &corrupt);
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_recovers_a_volume_whose_engine_died_with_the_plugin() {
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let mut req = replicated("rep-r", "3", cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    let a = pattern(41, 4 << 20);
    write_synced(&m.target.join("a"), &a);
    // The node plugin (and the engine in it) dies and starts again.
    cl.nodes[0].kill9();
    cl.nodes[0].restart();
    wait_socket(&cl.node_socket(1), &cl.nodes[0]);
    cl.wait_fresh(&[node_id(1)]).await;
    let mut n1 = cl.node(1).await;
    let stats = n1
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: m.staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = stats.volume_condition.unwrap();
    assert!(c.abnormal, "a staging without engine is abnormal: {c:?}");
    assert!(c.message.contains("not running"), "{c:?}");
    // NodeStageVolume again recovers it: a new engine, the filesystem
    // mounted again, the publication bound again.
    n1.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: m.ctx.clone(),
            staging_target_path: m.staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("restage: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    assert!(std::fs::read(m.target.join("a")).unwrap() == a);
    let b = pattern(42, 1 << 20);
    write_synced(&m.target.join("b"), &b);
    let c = n1
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: m.target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume_condition
        .unwrap();
    assert!(
        !c.abnormal || c.message.contains("copies in sync"),
        "after recovery: {c:?}"
    );
    cl.wait_in_sync(&v.volume_id, Duration::from_secs(60)).await;
    m.down(&mut cl, &v.volume_id).await;
    let m = Published::up(&mut cl, 2, &v, &cap).await.unwrap();
    assert!(std::fs::read(m.target.join("b")).unwrap() == b);
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// Headless: no orchestrator, only the `stowage` client on a node (its own
/// socket, the controller's for controller calls) and `apply`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_apply_manage_replicated_volumes_without_an_orchestrator() {
    use std::process::Command;
    let cl = Cluster::start().await;
    let ctl = format!("unix://{}", cl.root.join("controller.sock").display());
    let n2 = format!("unix://{}", cl.node_socket(2).display());
    let root = cl.root.join("client-n2").display().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(["--endpoint", &n2, "--controller-endpoint", &ctl])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stowage {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A replicated volume of 64 MiB and `replicas` copies: its ID.
    let create = |name: &str, replicas: &str| {
        let replicas = format!("replicas={replicas}");
        let out = run(&[
            "volume",
            "create",
            name,
            "--size",
            "64Mi",
            "--param",
            "backend=replicated",
            "--param",
            &replicas,
            "-o",
            "json",
        ]);
        out.split('"')
            .find(|w| w.starts_with("replicated:"))
            .unwrap_or_else(|| panic!("no replicated volume id in {out}"))
            .to_owned()
    };
    let id = create("cli-rep", "2");
    let target = cl.root.join("cli-rep-target");
    let t = target.display().to_string();
    run(&["volume", "publish", &id, &t, "--staging-root", &root]);
    let data = pattern(51, 3 << 20);
    write_synced(&target.join("f"), &data);
    let shown = run(&["volume", "get", &id, "-o", "json"]);
    assert!(
        shown.contains("2 of 2 copies in sync") && shown.contains("witness on"),
        "volume get shows the copies and the witness: {shown}"
    );
    run(&["volume", "unpublish", &id, &t, "--staging-root", &root]);
    assert!(!is_mounted(&target));
    run(&["volume", "publish", &id, &t, "--staging-root", &root]);
    assert!(std::fs::read(target.join("f")).unwrap() == data);
    run(&["volume", "unpublish", &id, &t, "--staging-root", &root]);

    // A group snapshot with another replicated volume, through the
    // controller's socket.
    let id2 = create("cli-rep-2", "1");
    let grp: serde_json::Value = serde_json::from_str(&run(&[
        "snapshot", "group", "create", "cli-grp", &id, &id2, "-o", "json",
    ]))
    .unwrap();
    let grp_id = grp["group_snapshot_id"].as_str().unwrap().to_owned();
    assert!(grp_id.starts_with("group:replicated:"), "{grp}");
    let sources: std::collections::BTreeSet<&str> = grp["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source_volume_id"].as_str().unwrap())
        .collect();
    assert_eq!(sources, [id.as_str(), id2.as_str()].into(), "{grp}");
    let shown = run(&["snapshot", "group", "get", &grp_id]);
    assert_eq!(shown.lines().filter(|l| l.contains(&grp_id)).count(), 2);
    run(&["snapshot", "group", "delete", &grp_id]);
    for s in grp["snapshots"].as_array().unwrap() {
        let sid = s["snapshot_id"].as_str().unwrap();
        for i in 1..=NODES {
            assert!(!cl.snapshot_dir(i, sid).exists(), "n{i} kept {sid}");
        }
    }
    run(&["volume", "delete", &id2]);
    run(&["volume", "delete", &id]);

    // apply: one replicated volume, converged twice.
    let file = cl.root.join("volumes.yaml");
    let applied = cl.root.join("applied-rep");
    std::fs::write(
        &file,
        format!(
            "volumes:\n  - name: applied-rep\n    size: 64Mi\n    parameters:\n      backend: replicated\n      replicas: \"3\"\n    target: {}\n",
            applied.display()
        ),
    )
    .unwrap();
    let state = cl.root.join("apply-state.json");
    let apply = || {
        run(&[
            "apply",
            "-f",
            &file.display().to_string(),
            "--state-file",
            &state.display().to_string(),
            "--staging-root",
            &root,
        ])
    };
    apply();
    assert!(is_mounted(&applied), "apply did not publish on n2");
    write_synced(&applied.join("g"), b"applied");
    apply();
    let vid = format!(
        "replicated:{}",
        stowage::backend::replicated::placement::volume_uuid("applied-rep")
    );
    let a = applied.display().to_string();
    run(&["volume", "unpublish", &vid, &a, "--staging-root", &root]);
    run(&["volume", "delete", &vid]);
    for i in 1..=NODES {
        assert!(!cl.copy_dir(i, &vid).exists(), "n{i} kept a copy");
    }
}

/// ControllerExpandVolume then NodeExpandVolume of a published volume.
async fn expand(
    cl: &mut Cluster,
    v: &csi::Volume,
    m: &Published,
    cap: &csi::VolumeCapability,
    to: i64,
) {
    let r =
        cl.c.controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: to,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(30)))
            .into_inner();
    assert_eq!(r.capacity_bytes, to);
    assert!(r.node_expansion_required, "the engine grows on the node");
    let mut n = cl.node(m.node).await;
    let r = n
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: m.target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: to,
                limit_bytes: 0,
            }),
            staging_target_path: m.staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.nodes[m.node - 1].log_tail(30)))
        .into_inner();
    assert_eq!(r.capacity_bytes, to);
}

/// Online expansion: the record, every copy's file, the engine, the FUSE
/// file, the loop device and the filesystem grow while the volume is
/// published; bytes written past the old end are there for a fresh engine
/// on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_volume_grows_online() {
    use std::os::unix::fs::FileExt;
    let mut cl = Cluster::start().await;
    // Raw: the data path past the old end.
    let raw = block_cap(Mode::SingleNodeWriter);
    let v = cl
        .create(replicated("rep-x", "3", raw.clone()))
        .await
        .unwrap();
    let m = Published::up(&mut cl, 1, &v, &raw).await.unwrap();
    expand(&mut cl, &v, &m, &raw, 2 * SIZE).await;
    let dev_len = {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&m.target).unwrap();
        f.seek(SeekFrom::End(0)).unwrap()
    };
    assert_eq!(dev_len, 2 * SIZE as u64, "the device grew");
    let tail = pattern(63, 4 << 20);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&m.target)
            .unwrap();
        f.write_all_at(&tail, SIZE as u64 + (8 << 20)).unwrap();
        f.sync_all().unwrap();
    }
    m.down(&mut cl, &v.volume_id).await;
    for i in 1..=NODES {
        let len = std::fs::metadata(cl.copy_data(i, &v.volume_id))
            .unwrap()
            .len();
        assert_eq!(len, 2 * SIZE as u64, "n{i}'s copy grew");
    }
    let m = Published::up(&mut cl, 2, &v, &raw).await.unwrap();
    let mut back = vec![0u8; tail.len()];
    std::fs::File::open(&m.target)
        .unwrap()
        .read_exact_at(&mut back, SIZE as u64 + (8 << 20))
        .unwrap();
    assert!(back == tail, "the bytes past the old end");
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();

    // A filesystem (xfs: it grows online without CAP_SYS_RESOURCE).
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let mut req = replicated("rep-xfs", "3", xfs.clone());
    req.capacity_range = Some(csi::CapacityRange {
        required_bytes: 320 << 20,
        limit_bytes: 0,
    });
    let v = cl.create(req).await.unwrap();
    let m = Published::up(&mut cl, 1, &v, &xfs).await.unwrap();
    let total = |p: &Path| {
        let s = nix::sys::statvfs::statvfs(p).unwrap();
        s.blocks() * s.fragment_size()
    };
    let before = total(&m.target);
    expand(&mut cl, &v, &m, &xfs, 640 << 20).await;
    let after = total(&m.target);
    assert!(
        after > before + (200 << 20),
        "the filesystem grew online: {before} -> {after}"
    );
    write_synced(&m.target.join("f"), &pattern(64, 4 << 20));
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

fn snapshot_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

fn from_source(
    mut req: csi::CreateVolumeRequest,
    source: csi::volume_content_source::Type,
) -> csi::CreateVolumeRequest {
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

fn from_snapshot(req: csi::CreateVolumeRequest, id: &str) -> csi::CreateVolumeRequest {
    from_source(
        req,
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: id.into(),
        }),
    )
}

async fn list_snapshots(
    cl: &mut Cluster,
    snapshot_id: &str,
    source: &str,
    max: i32,
) -> Vec<csi::Snapshot> {
    let (mut out, mut token) = (Vec::new(), String::new());
    for _ in 0..50 {
        let r =
            cl.c.controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    max_entries: max,
                    starting_token: token,
                    source_volume_id: source.into(),
                    snapshot_id: snapshot_id.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
        out.extend(r.entries.into_iter().filter_map(|e| e.snapshot));
        if r.next_token.is_empty() {
            return out;
        }
        token = r.next_token;
    }
    panic!("ListSnapshots never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_volumes_are_snapshotted_restored_and_cloned_on_their_copies() {
    use csi::volume_content_source::{Type, VolumeSource};
    let mut cl = Cluster::start().await;
    let cap = ext4();
    let v = cl
        .create(replicated("rep-s", "3", cap.clone()))
        .await
        .unwrap();
    let m = Published::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    let first = pattern(31, 4 << 20);
    write_synced(&m.target.join("a"), &first);

    // Taken while the volume is published and in use, on every copy.
    let snap =
        cl.c.controller
            .create_snapshot(snapshot_req("snap-s", &v.volume_id))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)))
            .into_inner()
            .snapshot
            .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, v.volume_id);
    assert_eq!(snap.size_bytes, SIZE);
    assert!(snap.snapshot_id.starts_with("snap:replicated:"), "{snap:?}");
    for i in 1..=NODES {
        assert!(
            cl.snapshot_dir(i, &snap.snapshot_id).join("data").exists(),
            "n{i} holds its copy's snapshot"
        );
    }
    // Idempotent by name; the name is taken for another source.
    let again =
        cl.c.controller
            .create_snapshot(snapshot_req("snap-s", &v.volume_id))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    assert_eq!(again.creation_time, snap.creation_time);
    let other = cl
        .create(replicated("rep-o", "3", cap.clone()))
        .await
        .unwrap();
    let e =
        cl.c.controller
            .create_snapshot(snapshot_req("snap-s", &other.volume_id))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // A volume of another backend is not made from a replicated snapshot
    // or volume (it used to be routed as a node's, and refused with
    // NOT_FOUND or UNAVAILABLE).
    for source in [
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        }),
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: v.volume_id.clone(),
        }),
    ] {
        let mut req = from_source(replicated("rep-block", "3", cap.clone()), source);
        req.parameters.clear();
        let e = cl.create(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("backend=replicated"), "{e:?}");
    }
    // Listed by ID, by source and with everything, page by page too.
    for (id, source) in [(snap.snapshot_id.as_str(), ""), ("", v.volume_id.as_str())] {
        let got = list_snapshots(&mut cl, id, source, 0).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].snapshot_id, snap.snapshot_id);
    }
    let snap_o =
        cl.c.controller
            .create_snapshot(snapshot_req("snap-o", &other.volume_id))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    for page in [0, 1] {
        let got: Vec<String> = list_snapshots(&mut cl, "", "", page)
            .await
            .into_iter()
            .map(|s| s.snapshot_id)
            .collect();
        assert_eq!(got.len(), 2, "page size {page}: {got:?}");
        assert!(got.contains(&snap.snapshot_id) && got.contains(&snap_o.snapshot_id));
    }
    // A negative page size is refused whichever part of a list the token
    // points into (it used to panic the call past the nodes' part).
    let token = "~replicated/1".to_owned();
    let e =
        cl.c.controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: token.clone(),
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for (id, token) in [
        (snap.snapshot_id.clone(), String::new()),
        (String::new(), token),
    ] {
        let e =
            cl.c.controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    max_entries: -1,
                    starting_token: token,
                    snapshot_id: id,
                    ..Default::default()
                })
                .await
                .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }

    // Written after the snapshot: not in it.
    let second = pattern(32, 4 << 20);
    write_synced(&m.target.join("a"), &second);
    write_synced(&m.target.join("b"), &pattern(33, 1 << 20));

    // Restored: the snapshot's point in time, on another node.
    let r = cl
        .create(from_snapshot(
            replicated("rep-r", "3", cap.clone()),
            &snap.snapshot_id,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    assert!(r.content_source.is_some());
    let mr = Published::up(&mut cl, 2, &r, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n2: {e:?}\n{}", cl.nodes[1].log_tail(40)));
    assert!(std::fs::read(mr.target.join("a")).unwrap() == first);
    assert!(!mr.target.join("b").exists());
    mr.down(&mut cl, &r.volume_id).await;

    // Cloned while the source is in use: its state now.
    let c = cl
        .create(from_source(
            replicated("rep-c", "3", cap.clone()),
            Type::Volume(VolumeSource {
                volume_id: v.volume_id.clone(),
            }),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    let mc = Published::up(&mut cl, 3, &c, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n3: {e:?}\n{}", cl.nodes[2].log_tail(40)));
    assert!(std::fs::read(mc.target.join("a")).unwrap() == second);
    assert!(mc.target.join("b").exists());
    mc.down(&mut cl, &c.volume_id).await;
    m.down(&mut cl, &v.volume_id).await;

    // A snapshot outlives its volume; a 2-copy volume's snapshot restores
    // into 3 copies, the third rebuilt in full from the others.
    cl.delete(&v.volume_id).await.unwrap();
    let two = cl
        .create(replicated("rep-two", "2", cap.clone()))
        .await
        .unwrap();
    let m2 = Published::up(&mut cl, 1, &two, &cap).await.unwrap();
    let third = pattern(34, 2 << 20);
    write_synced(&m2.target.join("t"), &third);
    let snap2 =
        cl.c.controller
            .create_snapshot(snapshot_req("snap-two", &two.volume_id))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    m2.down(&mut cl, &two.volume_id).await;
    let holders = (1..=NODES)
        .filter(|&i| cl.snapshot_dir(i, &snap2.snapshot_id).exists())
        .count();
    assert_eq!(holders, 2, "only the two copies hold it");
    let r3 = cl
        .create(from_snapshot(
            replicated("rep-r3", "3", cap.clone()),
            &snap2.snapshot_id,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    let (abnormal, msg) = cl.condition(&r3.volume_id).await;
    assert!(abnormal && msg.contains("2 of 3"), "{msg}");
    let m3 = Published::up(&mut cl, 3, &r3, &cap).await.unwrap();
    assert!(std::fs::read(m3.target.join("t")).unwrap() == third);
    cl.wait_in_sync(&r3.volume_id, Duration::from_secs(60))
        .await;
    m3.down(&mut cl, &r3.volume_id).await;
    for i in 2..=NODES {
        assert!(
            cl.same_copies(1, i, &r3.volume_id).await,
            "n{i}'s copy of the restored volume differs"
        );
    }
    // Still restorable after its source went.
    let r4 = cl
        .create(from_snapshot(
            {
                // Into a larger volume: its filesystem grows at staging.
                let mut req = replicated("rep-r4", "3", cap.clone());
                req.capacity_range.as_mut().unwrap().required_bytes = 2 * SIZE;
                req
            },
            &snap.snapshot_id,
        ))
        .await
        .unwrap();
    assert_eq!(r4.capacity_bytes, 2 * SIZE);
    assert_eq!(
        r4.volume_context
            .get("stowage.csi.dev/grow-fs")
            .map(String::as_str),
        Some("true")
    );
    let m4 = Published::up(&mut cl, 1, &r4, &cap).await.unwrap();
    assert!(std::fs::read(m4.target.join("a")).unwrap() == first);
    let st = nix::sys::statvfs::statvfs(&m4.target).unwrap();
    let fs_bytes = st.blocks() as i64 * st.fragment_size() as i64;
    assert!(
        fs_bytes > SIZE + SIZE / 2,
        "the filesystem grew to the volume: {fs_bytes} bytes"
    );
    m4.down(&mut cl, &r4.volume_id).await;

    // Deleted from every node, idempotently; then a missing source.
    for s in [&snap, &snap2, &snap_o] {
        cl.delete_snapshot(&s.snapshot_id).await.unwrap();
    }
    for i in 1..=NODES {
        assert!(!cl.snapshot_dir(i, &snap.snapshot_id).exists());
    }
    cl.delete_snapshot(&snap.snapshot_id).await.unwrap();
    assert!(
        list_snapshots(&mut cl, &snap.snapshot_id, "", 0)
            .await
            .is_empty()
    );
    let e = cl
        .create(from_snapshot(
            replicated("rep-gone", "3", cap.clone()),
            &snap.snapshot_id,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    for id in [
        &r.volume_id,
        &c.volume_id,
        &two.volume_id,
        &r3.volume_id,
        &r4.volume_id,
        &other.volume_id,
    ] {
        cl.delete(id).await.unwrap();
    }
}

/// A copy whose disk stalls while CreateSnapshot waits for it (its pool
/// filesystem frozen: its records still read, nothing on it can be
/// written) is left out: CreateSnapshot answers with the other copies'
/// snapshots. Once the disk moves again, the stalled copy must not take
/// the snapshot after all: its point in time would come after
/// CreateSnapshot answered, and could hold writes acknowledged since.
/// The same for a group snapshot taken meanwhile. Both are then deleted
/// from every node. Then the disk stalls under a write, with n3's voter
/// stuck writing the record change that marks it out of sync: the
/// controller's reads of the record must not wait for it, or no group
/// snapshot could be taken within its copies' lease; and a CreateVolume
/// that fails for want of n3 must not leave n3 a member made afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_disk_stalls_neither_takes_snapshots_late_nor_holds_up_the_others() {
    let mut cl = Cluster::start_with(&[
        NodeOpts::default(),
        NodeOpts::default(),
        NodeOpts {
            pool_bytes: Some(640 << 20),
            ..Default::default()
        },
    ])
    .await;
    // Raw: no filesystem writes in the background meanwhile, which would
    // mark n3 out of sync, and then it would not even be asked.
    let cap = block_cap(Mode::SingleNodeWriter);
    let v = cl
        .create(replicated("rep-st", "3", cap.clone()))
        .await
        .unwrap();
    let m = Published::up(&mut cl, 1, &v, &cap)
        .await
        .unwrap_or_else(|e| panic!("up on n1: {e:?}\n{}", cl.nodes[0].log_tail(40)));
    let write_block = |block: u64, write: u64| {
        use std::os::unix::fs::FileExt;
        let f = open_direct(&m.target);
        let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(BLOCK);
        buf.as_mut_slice()
            .copy_from_slice(&block_bytes(block, write));
        f.write_all_at(buf.as_slice(), block * BLOCK as u64)
            .unwrap();
        f.sync_all().unwrap();
    };
    write_block(0, 1);

    // Thawed when dropped, before the cluster (declared after it), even
    // when this test fails.
    let stalled = stowage::os::freeze::FrozenFs::new(&cl.state_dir(3).join("pool"))
        .expect("freeze n3's pool");
    let snap =
        cl.c.controller
            .create_snapshot(snapshot_req("snap-st", &v.volume_id))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)))
            .into_inner()
            .snapshot
            .unwrap();
    assert!(snap.ready_to_use);
    // A group snapshot of it too: n3 does not freeze in time for it.
    let (grp, member) = group_of_one(&mut cl, "grp-st", &v.volume_id).await;
    let taken = [&snap.snapshot_id, &member];
    for id in taken {
        for i in 1..=2 {
            assert!(
                cl.snapshot_dir(i, id).join("data").exists(),
                "n{i} holds its copy's {id}"
            );
        }
    }
    stalled.thaw().expect("thaw n3's pool");

    // n3's takings, stuck until now, end: wait for its word on each.
    for (id, word) in [
        (&snap.snapshot_id, "snapshot not taken"),
        (&member, "group snapshot member not taken"),
    ] {
        let hex = id.trim_start_matches("snap:replicated:");
        ends_without(&cl, 3, &cl.snapshot_dir(3, id), &[word, hex]).await;
    }
    let listed = list_snapshots(&mut cl, "", &v.volume_id, 0).await;
    assert_eq!(listed.len(), 2, "{listed:?}");

    // The volume goes on on every copy, and the snapshots go for good.
    write_block(1, 2);
    cl.wait_in_sync(&v.volume_id, Duration::from_secs(60)).await;
    cl.delete_snapshot(&snap.snapshot_id).await.unwrap();
    delete_group(&mut cl, &grp, &member).await;
    assert!(list_snapshots(&mut cl, "", "", 0).await.is_empty());
    for id in taken {
        for i in 1..=3 {
            assert!(!cl.snapshot_dir(i, id).exists(), "n{i}: {id}");
        }
    }
    // A second stall, now under a write: n3 cannot take it, and the
    // engine marks n3 out of sync meanwhile (n3's own part of that record
    // change waits for its disk, holding n3's voter). The controller's
    // reads of the record must not wait for n3's disk: a group snapshot,
    // whose copies stay frozen only for a 1 s lease, is taken from n1 and
    // n2 (waiting 5 s for n3's answer, every try would outlast it). Nor
    // may they wait for n3's part of a DeleteVolume of another volume,
    // stuck on the disk meanwhile.
    let doomed = cl
        .create(replicated("rep-st-del", "3", cap.clone()))
        .await
        .unwrap();
    let stalled = stowage::os::freeze::FrozenFs::new(&cl.state_dir(3).join("pool"))
        .expect("freeze n3's pool again");
    tokio::task::block_in_place(|| write_block(2, 3));
    let e = cl.delete(&doomed.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let (grp, member) = group_of_one(&mut cl, "grp-st2", &v.volume_id).await;
    // n3 itself goes on answering: still registered and fresh.
    let nodes = cl.nodes().await;
    assert!(
        nodes.iter().any(|n| n.node_id == "n3" && n.fresh),
        "{nodes:?}"
    );
    for i in 1..=2 {
        assert!(
            cl.snapshot_dir(i, &member).join("data").exists(),
            "n{i} holds its copy's {member}"
        );
    }
    // A volume created meanwhile cannot get its member on n3: CreateVolume
    // fails (the members made are removed), and n3 must not make its
    // member once its disk moves again: a volume that was never created
    // would be found and listed.
    let e = cl
        .create(replicated("rep-st-new", "3", cap.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let never = format!(
        "replicated:{}",
        stowage::backend::replicated::placement::volume_uuid("rep-st-new").to_hex()
    );
    stalled.thaw().expect("thaw n3's pool");
    let hex = never.trim_start_matches("replicated:");
    ends_without(&cl, 3, &cl.copy_dir(3, &never), &["copy not created", hex]).await;
    for i in 1..=3 {
        assert!(!cl.copy_dir(i, &never).exists(), "n{i} holds {never}");
    }
    // The delete stuck on n3 ends; the CO's retry deletes the rest (n3
    // may still be finishing its own: UNAVAILABLE until then).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Err(e) = cl.delete(&doomed.volume_id).await {
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(std::time::Instant::now() < deadline, "{e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 1..=3 {
        assert!(!cl.copy_dir(i, &doomed.volume_id).exists(), "n{i}");
    }
    assert_eq!(cl.list_all(0).await.unwrap(), vec![v.volume_id.clone()]);
    cl.wait_in_sync(&v.volume_id, Duration::from_secs(60)).await;
    delete_group(&mut cl, &grp, &member).await;
    assert!(list_snapshots(&mut cl, "", "", 0).await.is_empty());
    m.down(&mut cl, &v.volume_id).await;
    cl.delete(&v.volume_id).await.unwrap();
}

/// Waits (at most 60 s) for a line of node `i`'s log holding all of
/// `words` (the node's word that it called something off), failing at
/// once should `late` (what it was not to make) appear meanwhile.
async fn ends_without(cl: &Cluster, i: usize, late: &Path, words: &[&str]) {
    let node = &cl.nodes[i - 1];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            !late.exists(),
            "n{i} made {} after all:\n{}",
            late.display(),
            node.log_tail(20)
        );
        let log = node.log_text();
        if log.lines().any(|l| words.iter().all(|w| l.contains(w))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "n{i} never said {words:?}:\n{}",
            node.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!late.exists(), "n{i} made {} after all", late.display());
}

/// A group snapshot `name` of `volume` alone: its ID and its member's.
async fn group_of_one(cl: &mut Cluster, name: &str, volume: &str) -> (String, String) {
    let grp =
        cl.c.group
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: name.into(),
                source_volume_ids: vec![volume.into()],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)))
            .into_inner()
            .group_snapshot
            .unwrap();
    assert_eq!(grp.snapshots.len(), 1, "{grp:?}");
    let member = grp.snapshots[0].snapshot_id.clone();
    (grp.group_snapshot_id, member)
}

async fn delete_group(cl: &mut Cluster, group: &str, member: &str) {
    cl.c.group
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.into(),
            snapshot_ids: vec![member.into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// What block 0 of node `i`'s copy of replicated snapshot `snapshot_id`
/// holds (None when the node holds no such snapshot).
fn member_block(cl: &Cluster, i: usize, snapshot_id: &str) -> Option<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(cl.snapshot_dir(i, snapshot_id).join("data")).ok()?;
    let mut b = vec![0; BLOCK];
    f.read_exact_at(&mut b, 0).unwrap();
    Some(common::checker::parse_block(0, &b).unwrap())
}

/// A writer on two raw devices: 1, 2, 3… to block 0 of `a` and then of
/// `b`, each write made durable before the next is issued, until stopped
/// (at most a million rounds).
struct PingPong {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl PingPong {
    fn start(a: std::path::PathBuf, b: std::path::PathBuf) -> PingPong {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stopped, count) = (std::sync::Arc::clone(&stop), std::sync::Arc::clone(&done));
        let thread = std::thread::spawn(move || {
            let (fa, fb) = (open_direct(&a), open_direct(&b));
            let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(BLOCK);
            let mut n = 0;
            while !stopped.load(Ordering::Relaxed) && n < 1_000_000 {
                n += 1;
                for (f, which) in [(&fa, "a"), (&fb, "b")] {
                    buf.as_mut_slice().copy_from_slice(&block_bytes(0, n));
                    f.write_all_at(buf.as_slice(), 0)
                        .and_then(|()| f.sync_data())
                        .map_err(|e| format!("write {n} to {which}: {e}"))?;
                }
                count.store(n, Ordering::Relaxed);
            }
            Ok(n)
        });
        PingPong {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until `more` rounds have ended.
    async fn progress(&self, more: u64) {
        use std::sync::atomic::Ordering;
        let want = self.done.load(Ordering::Relaxed) + more;
        for _ in 0..600 {
            if self.done.load(Ordering::Relaxed) >= want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the writer did not reach round {want}");
    }

    /// Stops it: how many rounds ended (a failed write panics).
    fn stop(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        t.join().unwrap().unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Two raw replicated volumes for group snapshots, `a` (3 copies)
/// published on n1 and `b` (2 copies) on n2, and a [`PingPong`] writer
/// between them that has made 20 rounds.
struct Pair {
    cl: Cluster,
    a: csi::Volume,
    b: csi::Volume,
    ma: Published,
    mb: Published,
    w: PingPong,
}

impl Pair {
    async fn start(prefix: &str) -> Pair {
        let mut cl = Cluster::start().await;
        let cap = block_cap(Mode::SingleNodeWriter);
        let mut ra = replicated(&format!("{prefix}-a"), "3", cap.clone());
        ra.accessibility_requirements = on(&["n1"], &[]);
        let mut rb = replicated(&format!("{prefix}-b"), "2", cap.clone());
        rb.accessibility_requirements = on(&["n2"], &[]);
        let a = cl.create(ra).await.unwrap();
        let b = cl.create(rb).await.unwrap();
        let ma = Published::up(&mut cl, 1, &a, &cap).await.unwrap();
        let mb = Published::up(&mut cl, 2, &b, &cap).await.unwrap();
        let w = PingPong::start(ma.target.clone(), mb.target.clone());
        w.progress(20).await;
        Pair {
            cl,
            a,
            b,
            ma,
            mb,
            w,
        }
    }

    /// Takes both volumes down and deletes them.
    async fn finish(self) {
        let Pair {
            mut cl,
            a,
            b,
            ma,
            mb,
            ..
        } = self;
        ma.down(&mut cl, &a.volume_id).await;
        mb.down(&mut cl, &b.volume_id).await;
        cl.delete(&a.volume_id).await.unwrap();
        cl.delete(&b.volume_id).await.unwrap();
    }
}

/// A group snapshot of replicated volumes published on two nodes, taken
/// while a writer alternates between them (write n to a, acknowledged, then
/// write n to b): every member copy of a holds a, every one of b holds b
/// with a - 1 <= b <= a, which only one instant shared by both volumes
/// gives (snapshots taken one after the other would show b > a). Writes
/// go on throughout and no copy falls out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_of_replicated_volumes_is_one_instant_of_them_all() {
    let mut p = Pair::start("rep-g").await;
    let Pair { cl, a, b, w, .. } = &mut p;
    let cap = block_cap(Mode::SingleNodeWriter);

    let mut g = cl.c.group.clone();
    let req = |name: &str, ids: Vec<String>| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids,
        ..Default::default()
    };
    let both = vec![a.volume_id.clone(), b.volume_id.clone()];
    let mut groups = Vec::new();
    let mut seen = Vec::new();
    for round in 0..4 {
        if round == 3 {
            // The freezes stalled writes briefly: no copy fell out of sync.
            for v in [&a, &b] {
                let (abnormal, msg) = cl.condition(&v.volume_id).await;
                assert!(!abnormal, "{}: {msg}", v.volume_id);
            }
            // A node with a copy of a (and maybe of b) dies: once the
            // controller sees it gone (before, listing snapshots is
            // UNAVAILABLE), the group is taken from the copies left.
            cl.nodes[2].kill9();
            cl.wait_stale(&node_id(3)).await;
        }
        let grp = g
            .create_volume_group_snapshot(req(&format!("grp-{round}"), both.clone()))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)))
            .into_inner()
            .group_snapshot
            .unwrap();
        assert!(grp.ready_to_use);
        assert!(
            grp.group_snapshot_id.starts_with("group:replicated:"),
            "{grp:?}"
        );
        assert_eq!(grp.snapshots.len(), 2, "{grp:?}");
        let member = |v: &str| {
            grp.snapshots
                .iter()
                .find(|s| s.source_volume_id == v)
                .unwrap_or_else(|| panic!("no member of {v}: {grp:?}"))
                .clone()
        };
        let (sa, sb) = (member(&a.volume_id), member(&b.volume_id));
        for s in [&sa, &sb] {
            assert_eq!(s.group_snapshot_id, grp.group_snapshot_id);
            assert!(s.ready_to_use);
        }
        // Every holder of a against every holder of b.
        let held = |s: &csi::Snapshot| -> Vec<(usize, u64)> {
            (1..=NODES)
                .filter_map(|i| member_block(cl, i, &s.snapshot_id).map(|w| (i, w.unwrap_or(0))))
                .collect()
        };
        let (ha, hb) = (held(&sa), held(&sb));
        if round < 3 {
            assert_eq!(ha.len(), 3, "every copy of a took its member: {ha:?}");
            assert_eq!(hb.len(), 2, "every copy of b took its member: {hb:?}");
        } else {
            for h in [&ha, &hb] {
                assert!(
                    !h.is_empty() && h.iter().all(|&(i, _)| i != 3),
                    "members on the live nodes only: {h:?}"
                );
            }
        }
        for &(i, wa) in &ha {
            for &(j, wb) in &hb {
                assert!(
                    wa >= 1 && wb + 1 >= wa && wb <= wa,
                    "round {round}: n{i}'s member of a holds write {wa}, n{j}'s member of b write {wb}: not one instant"
                );
            }
        }
        seen.push(format!("{ha:?}/{hb:?}"));
        groups.push(grp);
        w.progress(5).await;
    }
    let rounds = w.stop();
    eprintln!("{rounds} write rounds; members' block 0 (node, write) per group: {seen:?}");
    // While n3 is down, a group with members there is not deleted, not
    // even in part: a retry naming every member could not match what
    // was left.
    let taken = &groups[0];
    let e = g
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: taken.group_snapshot_id.clone(),
            snapshot_ids: taken
                .snapshots
                .iter()
                .map(|s| s.snapshot_id.clone())
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    for s in &taken.snapshots {
        assert!(
            (1..=2).any(|i| cl.snapshot_dir(i, &s.snapshot_id).exists()),
            "{} went while its group's delete was refused",
            s.snapshot_id
        );
    }
    cl.nodes[2].restart();
    cl.wait_fresh(&[node_id(3)]).await;
    for v in [&a, &b] {
        cl.wait_in_sync(&v.volume_id, Duration::from_secs(60)).await;
    }

    // Idempotent by name, whatever the order; other volumes are a conflict.
    let first = groups[0].clone();
    let again = g
        .create_volume_group_snapshot(req("grp-0", both.iter().rev().cloned().collect()))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again.group_snapshot_id, first.group_snapshot_id);
    let ids = |g: &csi::VolumeGroupSnapshot| {
        let mut v: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&again), ids(&first));
    let e = g
        .create_volume_group_snapshot(req("grp-0", vec![a.volume_id.clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let local = format!("block:n1:{}", "0".repeat(32));
    let e = g
        .create_volume_group_snapshot(req("mixed", vec![a.volume_id.clone(), local]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = g
        .create_volume_group_snapshot(req("", both.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut with_param = req("param", both.clone());
    with_param.parameters.insert("freeze".into(), "no".into());
    let e = g
        .create_volume_group_snapshot(with_param)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Found by ID; members listed with their group; a member is deleted
    // only with its group.
    let get = |id: &str, members: Vec<String>| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    };
    let got = g
        .get_volume_group_snapshot(get(&first.group_snapshot_id, ids(&first)))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(ids(&got), ids(&first));
    assert_eq!(got.creation_time, first.creation_time);
    let e = g
        .get_volume_group_snapshot(get(&first.group_snapshot_id, vec![ids(&first)[0].clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let listed = list_snapshots(cl, &ids(&first)[0], "", 0).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].group_snapshot_id, first.group_snapshot_id);
    let e = cl.delete_snapshot(&ids(&first)[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A member restores into a volume of its own: one of its copies' data.
    let sa = first
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == a.volume_id)
        .unwrap();
    let options: Vec<u64> = (1..=NODES)
        .filter_map(|i| member_block(cl, i, &sa.snapshot_id).flatten())
        .collect();
    let r = cl
        .create(from_snapshot(
            replicated("rep-gr", "3", cap.clone()),
            &sa.snapshot_id,
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    let mr = Published::up(cl, 3, &r, &cap).await.unwrap();
    let restored = {
        use std::os::unix::fs::FileExt;
        let mut buf = stowage::os::fuse_file::AlignedBuf::zeroed(BLOCK);
        open_direct(&mr.target)
            .read_exact_at(buf.as_mut_slice(), 0)
            .unwrap();
        common::checker::parse_block(0, buf.as_slice()).unwrap()
    };
    assert!(
        restored.is_some_and(|w| options.contains(&w)),
        "restored {restored:?}, members held {options:?}"
    );
    mr.down(cl, &r.volume_id).await;
    cl.delete(&r.volume_id).await.unwrap();

    // Deleted with its members from every node, idempotently.
    let del = |id: &str, members: Vec<String>| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    };
    let e = g
        .delete_volume_group_snapshot(del(&first.group_snapshot_id, vec![ids(&first)[1].clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for grp in &groups {
        g.delete_volume_group_snapshot(del(&grp.group_snapshot_id, ids(grp)))
            .await
            .unwrap();
        for s in &grp.snapshots {
            for i in 1..=NODES {
                assert!(!cl.snapshot_dir(i, &s.snapshot_id).exists());
            }
        }
    }
    g.delete_volume_group_snapshot(del(&first.group_snapshot_id, vec![]))
        .await
        .unwrap();
    let e = g
        .get_volume_group_snapshot(get(&first.group_snapshot_id, vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    p.finish().await;
}

/// The record node `i` holds for its copy of `volume_id`, as JSON.
fn record_on(cl: &Cluster, i: usize, volume_id: &str) -> String {
    let held: stowage::backend::replicated::protocol::VoterState = serde_json::from_slice(
        &std::fs::read(cl.copy_dir(i, volume_id).join("voter.json")).unwrap(),
    )
    .unwrap();
    serde_json::to_string(&held.record).unwrap()
}

/// Freezes node `i`'s copy of `volume_id` as the controller's first
/// phase does: `req` with the volume and the record node `i` holds filled
/// in.
fn freeze_on(
    cl: &Cluster,
    i: usize,
    volume_id: &str,
    mut req: stowage::cluster::proto::ReplicaFreezeRequest,
) -> Result<(), tonic::Status> {
    req.volume = volume_id.strip_prefix("replicated:").unwrap().to_owned();
    req.record = record_on(cl, i, volume_id);
    cl.as_controller(i, move |mut c| {
        Box::pin(async move { c.freeze(req).await.map(|_| ()) })
    })
}

/// The request freezing a copy for `member` of `group` (of `volumes`).
fn freeze_req(
    member: &str,
    group: &str,
    volumes: &[String],
    token: u64,
    lease_ms: u32,
) -> stowage::cluster::proto::ReplicaFreezeRequest {
    stowage::cluster::proto::ReplicaFreezeRequest {
        snapshot: member.to_owned(),
        group: group.to_owned(),
        group_volumes: volumes.to_vec(),
        token,
        lease_ms,
        ..Default::default()
    }
}

fn thaw_on(
    cl: &Cluster,
    i: usize,
    member: &str,
    token: u64,
) -> Result<stowage::cluster::proto::ReplicaSnapshot, tonic::Status> {
    let req = stowage::cluster::proto::ReplicaThawRequest {
        snapshot: member.to_owned(),
        token,
        commit: true,
    };
    cl.as_controller(i, move |mut c| {
        Box::pin(async move { c.thaw(req).await.map(|r| r.into_inner()) })
    })
}

/// What a controller that died between a group snapshot's phases leaves:
/// copies frozen with nobody to thaw them let go when their lease runs out
/// (writes go on, no copy falls out of sync, a late commit is refused and
/// takes nothing); a group whose members were committed for one volume
/// only is seen as incomplete (UNAVAILABLE) and taken anew by the retried
/// CreateVolumeGroupSnapshot; but one lacking a member because the node
/// holding it is down is not taken anew (UNAVAILABLE, nothing deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_cut_short_by_its_controller_is_let_go_and_taken_again() {
    use stowage::backend::replicated::placement::volume_uuid;
    let mut p = Pair::start("rep-c").await;
    let Pair { cl, a, b, w, .. } = &mut p;
    let hex = |id: &str| id.strip_prefix("replicated:").unwrap().to_owned();
    let a_nodes: Vec<usize> = (1..=NODES)
        .filter(|&i| cl.copy_data(i, &a.volume_id).exists())
        .collect();
    assert_eq!(a_nodes.len(), 3);

    // Frozen, never thawed: every copy of a lets go after its 300 ms.
    let lapsed = volume_uuid("lapsed member").to_hex();
    let group = volume_uuid("lapsed group").to_hex();
    for &i in &a_nodes {
        let req = freeze_req(&lapsed, &group, &[hex(&a.volume_id)], 7, 300);
        freeze_on(cl, i, &a.volume_id, req).unwrap_or_else(|e| panic!("freeze on n{i}: {e:?}"));
    }
    w.progress(20).await;
    for &i in &a_nodes {
        let e = thaw_on(cl, i, &lapsed, 7).unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "n{i}: {e:?}");
        assert!(!cl.snapshot_dir(i, &lapsed).exists(), "n{i} took it late");
    }
    let (abnormal, msg) = cl.condition(&a.volume_id).await;
    assert!(!abnormal, "a lapsed freeze took a copy out of sync: {msg}");

    // A group cut short: only a's member was committed.
    let name = "cut";
    let group = volume_uuid(&format!("group\0{name}")).to_hex();
    let member_a = volume_uuid(&format!("group\0{name}\0{}", hex(&a.volume_id))).to_hex();
    let mut volumes = vec![hex(&a.volume_id), hex(&b.volume_id)];
    volumes.sort();
    let mut first_taken = Vec::new();
    for &i in &a_nodes {
        freeze_on(
            cl,
            i,
            &a.volume_id,
            freeze_req(&member_a, &group, &volumes, 9, 1000),
        )
        .unwrap();
    }
    for &i in &a_nodes {
        let s = thaw_on(cl, i, &member_a, 9).unwrap();
        first_taken.push((s.created_seconds, s.created_nanos));
    }
    let group_id = format!("group:replicated:{group}");
    let mut g = cl.c.group.clone();
    let e = g
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&b.volume_id),
        "names what it lacks: {e:?}"
    );
    w.progress(20).await;

    // The CO's retry takes the whole group anew, at one instant.
    let grp = g
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: name.into(),
            source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)))
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(grp.group_snapshot_id, group_id);
    assert_eq!(grp.snapshots.len(), 2);
    let sa = grp
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == a.volume_id)
        .unwrap();
    let taken = sa.creation_time.as_ref().unwrap();
    assert!(
        first_taken
            .iter()
            .all(|&t| t < (taken.seconds, taken.nanos)),
        "a's member was taken again, not kept from the cut-short try: {taken:?} vs {first_taken:?}"
    );
    let sb = grp
        .snapshots
        .iter()
        .find(|s| s.source_volume_id == b.volume_id)
        .unwrap();
    let block = |i: usize, id: &str| member_block(cl, i, id).map(|w| w.unwrap_or(0));
    for i in 1..=NODES {
        for j in 1..=NODES {
            if let (Some(wa), Some(wb)) = (block(i, &sa.snapshot_id), block(j, &sb.snapshot_id)) {
                assert!(
                    wb <= wa && wb + 1 >= wa,
                    "n{i}'s member of a holds {wa}, n{j}'s of b {wb}"
                );
            }
        }
    }

    // A group one of whose members is only on a node that is down: not
    // taken for one cut short. Get and a retried create are UNAVAILABLE,
    // nothing is deleted, and once the node is back the group is whole.
    let mut rc = replicated("rep-c-solo", "1", block_cap(Mode::SingleNodeWriter));
    rc.accessibility_requirements = on(&["n3"], &[]);
    let c = cl.create(rc).await.unwrap();
    assert!(
        cl.copy_data(3, &c.volume_id).exists(),
        "c's one copy is on n3"
    );
    let solo_req = || csi::CreateVolumeGroupSnapshotRequest {
        name: "solo".into(),
        source_volume_ids: vec![b.volume_id.clone(), c.volume_id.clone()],
        ..Default::default()
    };
    let solo = g
        .create_volume_group_snapshot(solo_req())
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    let get_solo = || csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: solo.group_snapshot_id.clone(),
        ..Default::default()
    };
    cl.nodes[2].kill9();
    cl.wait_stale(&node_id(3)).await;
    for e in [
        g.get_volume_group_snapshot(get_solo()).await.unwrap_err(),
        g.create_volume_group_snapshot(solo_req())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("n3"), "names the node: {e:?}");
    }
    for s in &solo.snapshots {
        if s.source_volume_id == a.volume_id {
            assert!(
                cl.snapshot_dir(1, &s.snapshot_id).exists(),
                "a's member kept"
            );
        }
    }
    cl.nodes[2].restart();
    cl.wait_fresh(&[node_id(3)]).await;
    let back = g
        .get_volume_group_snapshot(get_solo())
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(back.snapshots.len(), 2);
    assert_eq!(back.creation_time, solo.creation_time, "the same group");
    cl.wait_in_sync(&a.volume_id, Duration::from_secs(60)).await;
    g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: solo.group_snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    cl.delete(&c.volume_id).await.unwrap();

    w.stop();
    g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group_id,
        ..Default::default()
    })
    .await
    .unwrap();
    p.finish().await;
}
