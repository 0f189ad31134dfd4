//! Changing a replicated volume's members on a real cluster (issue 14): a
//! controller and four node agents in network namespaces. ControllerModify
//! Volume of `replicas` adds a copy (rebuilt in full while a writer goes
//! on) or removes one (its directory deleted); a node killed for good gets
//! its copy replaced on another node, which is rebuilt and joins the
//! in-sync set; a snapshot is deleted from a node that was down once it
//! is back; a copy made for a change that never happened is deleted. Each
//! test is bounded.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::forward::FaultConfig;
use common::*;
use stowage::csi;
use tonic::Code;

const SIZE: i64 = 64 << 20;
const FOUR: usize = 4;

/// What the controller logs (at debug) as its round of repairs begins to
/// look at a volume, as a call on a volume waited for the round, and (a
/// warning) as a round begins without every node's list of copies.
const ROUND_LOOKS: &str = "the round of repairs looks at the volume";
const CALL_WAITED: &str = "a call waited for the round of repairs";
const PARTIAL_ROUND: &str = "looks only at the volumes of the nodes that listed";

fn replicated(name: &str, replicas: &str) -> csi::CreateVolumeRequest {
    replicated_req(name, replicas, SIZE, ext4())
}

/// [`replicated`], one copy placed on `node` (locality: it is preferred).
fn replicated_on(name: &str, replicas: &str, node: &str) -> csi::CreateVolumeRequest {
    let mut req = replicated(name, replicas);
    req.accessibility_requirements = on(&[node], &[]);
    req
}

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

fn index_of(node: &str) -> usize {
    node.trim_start_matches('n').parse().unwrap()
}

/// Writes files of known content with fsync into a mounted volume until
/// stopped; returns the names of the acknowledged ones.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(PathBuf, u64)>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, dir) = (Arc::clone(&stop), dir.to_owned());
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            let mut done = Vec::new();
            let mut k = 0u64;
            while !s.load(Ordering::Relaxed) {
                k += 1;
                let p = dir.join(format!("w{}", k % 40));
                let mut f = std::fs::File::create(&p).expect("create");
                f.write_all(&pattern(k, 256 << 10)).expect("write");
                f.sync_all().expect("fsync");
                done.retain(|(q, _): &(PathBuf, u64)| *q != p);
                done.push((p, k));
                std::thread::sleep(Duration::from_millis(20));
            }
            done
        });
        Writer { stop, thread }
    }

    /// Stops and checks every acknowledged file reads back as written.
    fn finish(self) -> usize {
        self.files().len()
    }

    /// Stops it and checks every acknowledged file: their paths, with the
    /// pattern each holds.
    fn files(self) -> Vec<(PathBuf, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let done = self.thread.join().expect("the writer failed");
        for (p, k) in &done {
            let got = std::fs::read(p).unwrap();
            assert!(got == pattern(*k, 256 << 10), "{} differs", p.display());
        }
        done
    }
}

/// (copies, in sync, message) as the controller reads the record.
async fn copies(cl: &mut Cluster, volume_id: &str) -> (Vec<String>, bool, String) {
    let c = cl
        .get(volume_id)
        .await
        .unwrap()
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    let list = c
        .message
        .split("copies on ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_default()
        .split(", ")
        .map(str::to_owned)
        .collect();
    (list, !c.abnormal, c.message)
}

/// Waits (bounded) until the volume has `n` copies, all in sync, none of
/// them on `not_on`; returns them.
async fn wait_copies(
    cl: &mut Cluster,
    volume_id: &str,
    n: usize,
    not_on: Option<&str>,
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let (list, in_sync, msg) = copies(cl, volume_id).await;
        if list.len() == n && in_sync && not_on.is_none_or(|x| !list.iter().any(|c| c == x)) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "not {n} copies in sync within {within:?}: {msg}\ncontroller:\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// ControllerModifyVolume (retried while ABORTED, see [`retry_aborted`]).
async fn modify(
    cl: &mut Cluster,
    volume_id: &str,
    params: &[(&str, &str)],
) -> Result<(), tonic::Status> {
    let c = cl.c.controller.clone();
    let req = csi::ControllerModifyVolumeRequest {
        volume_id: volume_id.to_owned(),
        mutable_parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    retry_aborted(|| {
        let (mut c, req) = (c.clone(), req.clone());
        async move { c.controller_modify_volume(req).await }
    })
    .await
    .map(|_| ())
}

/// The witness's node in a volume's condition message, if it names one.
fn witness_of(msg: &str) -> Option<String> {
    msg.split("witness on ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(str::to_owned)
}

/// Publishes `v` on `node`, writes files there for 1.5 s with a [`Writer`]
/// and takes it down; returns the files (each read back as written).
async fn files_written(cl: &mut Cluster, node: &str, v: &csi::Volume) -> Vec<(PathBuf, u64)> {
    let m = Published::up(cl, index_of(node), v, &ext4())
        .await
        .unwrap_or_else(|e| panic!("publish on {node}: {e:?}"));
    let w = Writer::start(&m.target);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let files = w.files();
    assert!(!files.is_empty());
    m.down(cl, &v.volume_id).await;
    files
}

/// Publishes `v` on `node` and checks every file in `files` (written by a
/// [`Writer`]) reads back as written; then takes it down again.
async fn files_read_back(cl: &mut Cluster, node: &str, v: &csi::Volume, files: &[(PathBuf, u64)]) {
    let m = Published::up(cl, index_of(node), v, &ext4())
        .await
        .unwrap_or_else(|e| panic!("publish on {node}: {e:?}"));
    for (p, k) in files {
        let name = p.file_name().unwrap();
        let got = std::fs::read(m.target.join(name)).unwrap();
        assert!(got == pattern(*k, 256 << 10), "{name:?} differs on {node}");
    }
    m.down(cl, &v.volume_id).await;
}

fn same_data(cl: &Cluster, volume_id: &str, nodes: &[String]) {
    let first = std::fs::read(cl.copy_dir(index_of(&nodes[0]), volume_id).join("data")).unwrap();
    for n in &nodes[1..] {
        let other = std::fs::read(cl.copy_dir(index_of(n), volume_id).join("data")).unwrap();
        assert!(first == other, "copies on {} and {n} differ", nodes[0]);
    }
}

/// ControllerModifyVolume of `replicas`, 2 -> 3 -> 2, while a writer runs
/// on the published volume: the new copy is rebuilt in full and joins, the
/// removed members' directories go, the final copies hold the same bytes.
/// Repeating a modify is a no-op; a bad parameter or value is
/// INVALID_ARGUMENT, too many copies RESOURCE_EXHAUSTED; CreateVolume
/// retried after the modify still finds the volume.
#[tokio::test(flavor = "multi_thread")]
async fn modify_replicas_adds_and_removes_a_copy_while_writing() {
    let mut cl = Cluster::start_full(FOUR, &[], &[]).await;
    let v = cl.create(replicated("mem-m", "2")).await.unwrap();
    let id = v.volume_id.clone();
    for (params, code) in [
        (&[("replicas", "0")][..], Code::InvalidArgument),
        (&[("replicas", "6")][..], Code::InvalidArgument),
        (&[("replicas", "two")][..], Code::InvalidArgument),
        (&[("locality", "none")][..], Code::InvalidArgument),
        (&[][..], Code::InvalidArgument),
        (&[("replicas", "5")][..], Code::ResourceExhausted),
    ] {
        let e = modify(&mut cl, &id, params).await.unwrap_err();
        assert_eq!(e.code(), code, "{params:?}: {e:?}");
    }
    let e = modify(
        &mut cl,
        "replicated:0123456789abcdef0123456789abcdef",
        &[("replicas", "3")],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let (two, _, msg) = copies(&mut cl, &id).await;
    let witness = witness_of(&msg).unwrap_or_else(|| panic!("no witness: {msg}"));
    let m = Published::up(&mut cl, index_of(&two[0]), &v, &ext4())
        .await
        .unwrap();
    let w = Writer::start(&m.target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    let three = wait_copies(&mut cl, &id, 3, None, Duration::from_secs(60)).await;
    assert!(
        two.iter().all(|c| three.contains(c)),
        "{two:?} -> {three:?}"
    );
    assert!(!three.contains(&witness));
    assert!(
        !cl.copy_dir(index_of(&witness), &id).exists(),
        "the witness {witness} was deleted"
    );
    // CreateVolume retried by the CO after the modify (its request still
    // asks for 2 copies) finds the volume; so does one asking for the
    // copies it has now; another count is a different volume.
    for replicas in ["2", "3"] {
        let again = cl
            .create(replicated("mem-m", replicas))
            .await
            .unwrap_or_else(|e| panic!("replicas={replicas}: {e:?}"));
        assert_eq!(again.volume_id, id);
    }
    let e = cl.create(replicated("mem-m", "4")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    modify(&mut cl, &id, &[("replicas", "2")]).await.unwrap();
    let back = wait_copies(&mut cl, &id, 2, None, Duration::from_secs(60)).await;
    let removed: Vec<&String> = three.iter().filter(|c| !back.contains(c)).collect();
    assert_eq!(removed.len(), 1, "{three:?} -> {back:?}");
    assert!(
        !cl.copy_dir(index_of(removed[0]), &id).exists(),
        "the removed copy on {} was deleted",
        removed[0]
    );
    let (_, _, msg) = copies(&mut cl, &id).await;
    assert!(
        msg.contains("witness on "),
        "two copies get a witness: {msg}"
    );

    let files = w.finish();
    assert!(files > 0);
    m.down(&mut cl, &id).await;
    same_data(&cl, &id, &back);
    cl.delete(&id).await.unwrap();
    for i in 1..=FOUR {
        assert!(!cl.copy_dir(i, &id).exists(), "n{i} still holds it");
    }
}

/// A membership change of a published volume keeps the engine's
/// connections to the copies that stay: with a writer's blocks always in
/// flight, ControllerModifyVolume 2 -> 3 -> 2 fails no call to a copy that
/// stays (it was: the engine replaced its peer at each change, and the old
/// peer's data links closed under the writes they carried, "data link
/// closed", so the copy went out of sync and was rebuilt), and the data
/// goes on over the data link, not the agent's gRPC port. Every
/// acknowledged block reads back; the copies end byte-identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_membership_change_fails_no_write_in_flight_to_the_copies_that_stay() {
    let proxied = NodeOpts {
        proxied: true,
        ..Default::default()
    };
    let mut cl = Cluster::start_full(FOUR, &[], &vec![proxied; FOUR]).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = replicated_req("mem-keep", "2", SIZE, cap.clone());
    req.accessibility_requirements = on(&["n1"], &[]);
    let v = cl.create(req).await.unwrap();
    let id = v.volume_id.clone();
    let (two, _, msg) = copies(&mut cl, &id).await;
    assert!(two.contains(&"n1".to_owned()), "locality: {msg}");
    let y = two.iter().find(|n| *n != "n1").unwrap().clone();
    let m = Published::up(&mut cl, 1, &v, &cap).await.unwrap();
    let blocks = (SIZE as u64) / common::checker::BLOCK as u64;
    let w = common::checker::Writer::start(m.target.clone(), blocks, 32, 0x6e_e9);
    w.progress(100, "before the changes").await;
    let errors = |cl: &Cluster, node: &str| {
        cl.copy_metric(1, "stowage_replicated_copy_call_errors_total", node)
    };
    assert_eq!(
        errors(&cl, &y),
        Some(0),
        "a call to {y} failed before any change"
    );

    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    let three = wait_copies(&mut cl, &id, 3, None, Duration::from_secs(60)).await;
    // From here on, the writes to y: over its data link, or its agent's
    // gRPC port.
    let route = |cl: &Cluster, r: usize| cl.proxy(index_of(&y)).bytes[r].load(Ordering::Relaxed);
    let (link0, grpc0) = (route(&cl, 1), route(&cl, 0));
    w.progress(200, "after the copy was added").await;
    let (link, grpc) = (route(&cl, 1) - link0, route(&cl, 0) - grpc0);
    assert_eq!(
        errors(&cl, &y),
        Some(0),
        "a call to {y}, which stayed, failed at the change"
    );
    assert!(
        link >= 200 * common::checker::BLOCK as u64 && link > grpc,
        "after the change the writes to {y} went over gRPC: {link} bytes over its data link, {grpc} over gRPC"
    );

    modify(&mut cl, &id, &[("replicas", "2")]).await.unwrap();
    let back = wait_copies(&mut cl, &id, 2, None, Duration::from_secs(60)).await;
    w.progress(100, "after a copy was removed").await;
    for n in back.iter().filter(|n| *n != "n1") {
        assert_eq!(
            errors(&cl, n),
            Some(0),
            "a call to {n}, which stayed, failed at a change ({two:?} -> {three:?} -> {back:?})"
        );
    }
    let h = w.stop().await;
    let (h, lost, corrupt) = h
        .read_back(m.target.clone(), blocks, "membership changes: ")
        .await;
    h.assert_intact(&lost, &corrupt);
    m.down(&mut cl, &id).await;
    same_data(&cl, &id, &back);
    cl.delete(&id).await.unwrap();
}

/// On three nodes, ControllerModifyVolume of `replicas` 2 -> 3 puts the
/// third copy on the witness's node (its witness leaves, and it joins again
/// as a copy, rebuilt in full), and 3 -> 2 leaves the witness on the node
/// of the copy that goes, while a writer runs; every file it wrote reads
/// back, and the copies left hold the same bytes. No fourth node is
/// needed either way.
#[tokio::test(flavor = "multi_thread")]
async fn on_three_nodes_the_witness_becomes_a_copy_and_a_copy_the_witness() {
    let mut cl = Cluster::start_full(3, &[], &[]).await;
    let v = cl.create(replicated("mem-w", "2")).await.unwrap();
    let id = v.volume_id.clone();
    let (two, _, msg) = copies(&mut cl, &id).await;
    let witness = witness_of(&msg).unwrap_or_else(|| panic!("no witness: {msg}"));
    let data = |cl: &Cluster, n: &str| cl.copy_dir(index_of(n), &id).join("data");
    assert!(!data(&cl, &witness).exists(), "a witness holds no data");
    let m = Published::up(&mut cl, index_of(&two[0]), &v, &ext4())
        .await
        .unwrap();
    let w = Writer::start(&m.target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    modify(&mut cl, &id, &[("replicas", "3")])
        .await
        .unwrap_or_else(|e| panic!("2 -> 3 on three nodes: {e:?}"));
    let three = wait_copies(&mut cl, &id, 3, None, Duration::from_secs(60)).await;
    assert!(three.contains(&witness), "{two:?} -> {three:?}");
    assert!(data(&cl, &witness).exists());
    let (_, _, msg) = copies(&mut cl, &id).await;
    assert_eq!(
        witness_of(&msg),
        None,
        "three copies have no witness: {msg}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    modify(&mut cl, &id, &[("replicas", "2")])
        .await
        .unwrap_or_else(|e| panic!("3 -> 2 on three nodes: {e:?}"));
    let back = wait_copies(&mut cl, &id, 2, None, Duration::from_secs(60)).await;
    let removed: Vec<&String> = three.iter().filter(|c| !back.contains(c)).collect();
    assert_eq!(removed.len(), 1, "{three:?} -> {back:?}");
    let (_, _, msg) = copies(&mut cl, &id).await;
    assert_eq!(witness_of(&msg).as_ref(), Some(removed[0]), "{msg}");
    assert!(
        !data(&cl, removed[0]).exists(),
        "{} is a witness now, with no data",
        removed[0]
    );

    let files = w.finish();
    assert!(files > 0);
    m.down(&mut cl, &id).await;
    same_data(&cl, &id, &back);
    cl.delete(&id).await.unwrap();
    for i in 1..=3 {
        assert!(!cl.copy_dir(i, &id).exists(), "n{i} still holds it");
    }
}

/// ControllerModifyVolume while a heal runs (kept slow here with
/// `--replica-heal-rate 1`): on three nodes, 2 -> 3 makes the witness's
/// node a copy, which a heal rebuilds (nobody publishes the volume); 3 -> 2
/// during that heal drops the copy being rebuilt, whose node takes the
/// witness again. Meanwhile ControllerGetVolume and the healing node's
/// /metrics show the heal's engine and what it has left to rebuild. The heal ends and is released, the volume is normal
/// with its two first copies in sync, the witness's node holds no data,
/// and the files written before read back on either copy's node.
#[tokio::test(flavor = "multi_thread")]
async fn a_modify_during_a_heal_drops_the_copy_being_healed() {
    let mut cl = Cluster::start_full(
        3,
        &["--replica-replace-after", "4", "--replica-heal-rate", "1"],
        &[],
    )
    .await;
    let v = cl.create(replicated("mem-mh", "2")).await.unwrap();
    let id = v.volume_id.clone();
    let (two, _, msg) = copies(&mut cl, &id).await;
    let witness = witness_of(&msg).unwrap_or_else(|| panic!("no witness: {msg}"));
    let files = files_written(&mut cl, &two[0], &v).await;

    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    cl.wait_condition(&id, Duration::from_secs(30), "a heal", |_, msg| {
        two.iter().any(|n| msg.contains(&format!("healing on {n}")))
    })
    .await;
    // 64 MiB at 1 MiB/s: the heal has a minute to go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, _, msg) = copies(&mut cl, &id).await;
    assert!(
        msg.contains("healing on") && msg.contains("2 of 3 copies in sync"),
        "the heal at 1 MiB/s still runs: {msg}"
    );
    // ControllerGetVolume shows how far the heal's engine got.
    let got = cl.get(&id).await.unwrap().status.unwrap();
    let msg = got.volume_condition.unwrap().message;
    assert!(
        msg.contains("; engine Running at epoch") && msg.contains("MiB to rebuild"),
        "{msg}"
    );
    assert!(got.published_node_ids.is_empty(), "{msg}");
    // So does the healing node's /metrics.
    let healer = msg
        .split("healing on ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .to_owned();
    let left = cl.copy_metric(
        index_of(&healer),
        "stowage_replicated_copy_dirty_regions",
        &witness,
    );
    assert!(left.is_some_and(|n| n > 0), "{healer}: {left:?}");
    modify(&mut cl, &id, &[("replicas", "2")])
        .await
        .unwrap_or_else(|e| panic!("3 -> 2 during a heal: {e:?}"));
    let mut back = wait_copies(&mut cl, &id, 2, None, Duration::from_secs(60)).await;
    back.sort();
    let mut first = two.clone();
    first.sort();
    assert_eq!(back, first, "the copy being healed goes");
    let (_, _, msg) = copies(&mut cl, &id).await;
    assert!(!msg.contains("healing"), "{msg}");
    assert!(msg.contains(&format!("witness on {witness}")), "{msg}");
    assert!(!cl.copy_dir(index_of(&witness), &id).join("data").exists());
    same_data(&cl, &id, &back);
    for n in &two {
        files_read_back(&mut cl, n, &v, &files).await;
    }
    cl.delete(&id).await.unwrap();
}

/// Heals start when there is one to start, not at the next of the
/// controller's rounds (every 30 s here, the default): ModifyVolume 2 -> 3
/// of a volume nobody publishes has its new copy healed within seconds.
/// A heal cut short by its node's agent dying (kill -9, started again at
/// once) fails, is released, and the next starts 5 s after the failure,
/// not two minutes after. The new copy ends in sync, the files written
/// before read back from its node, and the copies hold the same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_heal_starts_at_once_and_one_cut_short_by_a_restart_runs_again_within_seconds() {
    let mut cl = Cluster::start_full(3, &["--replica-heal-rate", "4"], &[]).await;
    let v = cl.create(replicated("mem-hr", "2")).await.unwrap();
    let id = v.volume_id.clone();
    let (two, _, _) = copies(&mut cl, &id).await;
    let files = files_written(&mut cl, &two[0], &v).await;
    let heals = |cl: &Cluster| {
        cl.controller
            .log_text()
            .matches("healing: copies out of sync are rebuilt")
            .count()
    };

    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    let (_, msg) = cl
        .wait_condition(
            &id,
            Duration::from_secs(10),
            "a heal soon after the change",
            |_, msg| msg.contains("healing on"),
        )
        .await;
    let healer = msg
        .split("healing on ")
        .nth(1)
        .and_then(|s| s.split([' ', ';', ',']).next())
        .unwrap()
        .to_owned();
    // 64 MiB at 4 MiB/s: the heal has about 16 s to go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = &cl.nodes[index_of(&healer) - 1];
    node.kill9();
    node.restart();
    assert!(
        cl.controller.wait_log(
            "heal ended before every copy was in sync",
            Duration::from_secs(30)
        ),
        "the heal did not fail with its node: {}",
        cl.controller.log_tail(30)
    );
    let failed = Instant::now();
    let deadline = failed + Duration::from_secs(15);
    while heals(&cl) < 2 {
        assert!(
            Instant::now() < deadline,
            "no heal again within 15 s of the failed one: {}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("healing again {:?} after the failure", failed.elapsed());
    let three = wait_copies(&mut cl, &id, 3, None, Duration::from_secs(60)).await;
    healed_with_files(&mut cl, &v, &two, &three, &files).await;
    cl.delete(&id).await.unwrap();
}

/// A heal brought `v`'s copies from `before` to `now`: the controller
/// says so, the copies hold the same bytes, and `files` read back
/// (published again) on the node of a copy `before` had not.
async fn healed_with_files(
    cl: &mut Cluster,
    v: &csi::Volume,
    before: &[String],
    now: &[String],
    files: &[(PathBuf, u64)],
) {
    let log = cl.controller.log_text();
    assert!(
        log.contains("healed: every copy in sync"),
        "in sync without a heal? {}",
        cl.controller.log_tail(30)
    );
    same_data(cl, &v.volume_id, now);
    let fresh = now.iter().find(|n| !before.contains(n)).unwrap();
    files_read_back(cl, fresh, v, files).await;
}

/// A volume unpublished while its engine still rebuilds a new copy is
/// healed at once, not at the controller's next round (every 30 s here,
/// the default): ModifyVolume 2 -> 3 of a volume of 1 GiB staged on n1,
/// unpublished 3 s after, leaves the new copy out of sync, and a heal of
/// it begins within 10 s; the copies end in sync with the same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_unpublished_before_its_new_copy_is_built_is_healed_at_once() {
    let mut cl = Cluster::start_full(3, &[], &[]).await;
    let mut req = replicated_req("mem-unpub", "2", 1 << 30, ext4());
    req.accessibility_requirements = on(&[&node_id(1)], &[]);
    let v = cl.create(req).await.unwrap();
    let id = v.volume_id.clone();
    let m = Published::up(&mut cl, 1, &v, &ext4()).await.unwrap();
    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    // The round the change woke (a second after the last) passes while
    // the volume is published, its engine rebuilding 1 GiB.
    tokio::time::sleep(Duration::from_secs(3)).await;
    m.down(&mut cl, &id).await;
    let unpublished = Instant::now();
    let (_, _, msg) = copies(&mut cl, &id).await;
    assert!(
        msg.contains("2 of 3 copies in sync"),
        "the engine built the new copy before the unpublish: {msg}"
    );
    cl.wait_condition(
        &id,
        Duration::from_secs(10),
        "a heal soon after the unpublish",
        |_, msg| msg.contains("healing on"),
    )
    .await;
    eprintln!("healing {:?} after the unpublish", unpublished.elapsed());
    let three = wait_copies(&mut cl, &id, 3, None, Duration::from_secs(120)).await;
    same_data(&cl, &id, &three);
    cl.delete(&id).await.unwrap();
}

/// A node back from away has its copies healed as soon as it registers,
/// not at the controller's next round (every 30 s here, the default): a
/// volume written while one copy's node was down, then unpublished with
/// that copy out of sync, waits for the node (a heal needs every copy's
/// node), and once it is started again a heal begins within seconds and
/// brings the copy back in sync with the others' bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_back_from_away_has_its_copies_healed_as_it_registers() {
    let mut cl = Cluster::start_full(3, &[], &[]).await;
    let v = cl
        .create(replicated_on("mem-back", "3", &node_id(1)))
        .await
        .unwrap();
    let id = v.volume_id.clone();
    let away = node_id(3);
    cl.nodes[index_of(&away) - 1].kill9();
    cl.wait_stale(&away).await;
    let m = Published::up(&mut cl, 1, &v, &ext4()).await.unwrap();
    let w = Writer::start(&m.target);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let files = w.files();
    m.down(&mut cl, &id).await;
    let (_, msg) = cl
        .wait_condition(&id, Duration::from_secs(30), "n3 out of sync", |_, msg| {
            msg.contains("2 of 3 copies in sync")
        })
        .await;
    assert!(!msg.contains("healing"), "a heal with {away} away: {msg}");

    cl.nodes[index_of(&away) - 1].restart();
    let back = Instant::now();
    cl.wait_condition(
        &id,
        Duration::from_secs(10),
        "a heal once n3 is back",
        |_, msg| msg.contains("healing on"),
    )
    .await;
    eprintln!(
        "healing {:?} after {away} was started again",
        back.elapsed()
    );
    let three = wait_copies(&mut cl, &id, 3, None, Duration::from_secs(60)).await;
    same_data(&cl, &id, &three);
    files_read_back(&mut cl, &away, &v, &files).await;
    cl.delete(&id).await.unwrap();
}

/// Returns once the controller's log says a round of repairs has begun to
/// look at `volume_id` (after the call; bounded).
async fn round_in(cl: &Cluster, volume_id: &str) {
    let looks = || {
        cl.controller
            .log_text()
            .lines()
            .filter(|l| l.contains(ROUND_LOOKS) && l.contains(volume_id))
            .count()
    };
    let (before, deadline) = (looks(), Instant::now() + Duration::from_secs(30));
    while looks() == before {
        assert!(
            Instant::now() < deadline,
            "no round looked at the volume within 30 s\ncontroller:\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The controller's round of repairs looking at a volume is no operation
/// of the CO's: a call on the volume meanwhile waits for the round instead
/// of failing ABORTED (csi-sanity's cleanup once failed so, on a
/// DeleteVolume right after a ControllerUnpublish). A fourth node,
/// cordoned and holding nothing, answers slowly through its proxy (1 s a
/// chunk each way), so the round holds the volume for the seconds it waits
/// for that node's answer. Each call is made as the controller's log says
/// a round has just begun to look at the volume: ControllerPublish,
/// ControllerUnpublish (twice each), ControllerExpand and DeleteVolume,
/// never retried, all succeed, each having waited for the round.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_waits_for_the_round_of_repairs_instead_of_failing_aborted() {
    let mut opts = vec![NodeOpts::default(); FOUR];
    opts[3].proxied = true;
    let mut cl = Cluster::start_full(FOUR, &["--replica-replace-after", "4"], &opts).await;
    let slow = node_id(4);
    assert!(cl.client(&["node", "cordon", &slow]).status.success());
    let v = cl.create(replicated("mem-wait", "3")).await.unwrap();
    let id = v.volume_id.clone();
    let (three, _, msg) = copies(&mut cl, &id).await;
    assert!(
        !three.contains(&slow) && witness_of(&msg).is_none(),
        "{msg}"
    );
    cl.proxy(4).faults.set(FaultConfig {
        delay: Duration::from_secs(1),
        ..Default::default()
    });

    let fail = |what: &str, e: tonic::Status, cl: &Cluster| -> ! {
        panic!("{what}: {e:?}\ncontroller:\n{}", cl.controller.log_tail(30))
    };
    let mut c = cl.c.controller.clone();
    for _ in 0..2 {
        let publish = csi::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id(1),
            volume_capability: Some(ext4()),
            ..Default::default()
        };
        round_in(&cl, &id).await;
        if let Err(e) = c.controller_publish_volume(publish).await {
            fail("ControllerPublishVolume", e, &cl);
        }
        let unpublish = csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id(1),
            ..Default::default()
        };
        round_in(&cl, &id).await;
        if let Err(e) = c.controller_unpublish_volume(unpublish).await {
            fail("ControllerUnpublishVolume", e, &cl);
        }
    }
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 2 * SIZE,
            limit_bytes: 0,
        }),
        volume_capability: Some(ext4()),
        ..Default::default()
    };
    round_in(&cl, &id).await;
    if let Err(e) = c.controller_expand_volume(expand).await {
        fail("ControllerExpandVolume", e, &cl);
    }
    let delete = csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    };
    round_in(&cl, &id).await;
    if let Err(e) = c.delete_volume(delete).await {
        fail("DeleteVolume", e, &cl);
    }
    let log = cl.controller.log_text();
    let waits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(CALL_WAITED) && l.contains(&id))
        .collect();
    eprintln!("{}", waits.join("\n"));
    assert_eq!(
        waits.len(),
        6,
        "every call met the round and waited for it\ncontroller:\n{}",
        cl.controller.log_tail(30)
    );
    cl.proxy(4).faults.set(FaultConfig::default());
    for i in 1..=3 {
        assert!(!cl.copy_dir(i, &id).exists(), "n{i} still holds it");
    }
}

/// A node that registers but answers nothing (its agent hung, say on a
/// stuck disk) holds up no repair of the volumes the other nodes hold: the
/// round of repairs used to give up when a node did not list its copies.
/// The fourth node, cordoned and holding nothing, has every byte to it
/// held by its proxy; three volumes of two copies (and a witness) nobody
/// publishes are changed to three, and each new copy is healed by the
/// round, whose controller says which node it could not list. Nor does a
/// round wait for that node once per volume: it looks at the three
/// volumes within less than the 5 s it would wait for an answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_answers_nothing_holds_up_no_repair_of_the_others() {
    let mut opts = vec![NodeOpts::default(); FOUR];
    opts[3].proxied = true;
    let mut cl = Cluster::start_full(FOUR, &[], &opts).await;
    let hung = node_id(4);
    assert!(cl.client(&["node", "cordon", &hung]).status.success());
    let mut ids = Vec::new();
    for i in 0..3 {
        let v = cl
            .create(replicated(&format!("mem-hung-{i}"), "2"))
            .await
            .unwrap();
        let (two, _, msg) = copies(&mut cl, &v.volume_id).await;
        assert!(
            !two.contains(&hung) && witness_of(&msg).as_ref() != Some(&hung),
            "{msg}"
        );
        ids.push(v.volume_id);
    }
    cl.proxy(4).faults.set(FaultConfig {
        hold: true,
        ..Default::default()
    });
    for id in &ids {
        modify(&mut cl, id, &[("replicas", "3")]).await.unwrap();
    }
    for id in &ids {
        let three = wait_copies(&mut cl, id, 3, Some(&hung), Duration::from_secs(90)).await;
        same_data(&cl, id, &three);
    }
    let log = cl.controller.log_text();
    cl.proxy(4).faults.set(FaultConfig::default());
    // The rounds that did not have n4's list, each from its warning on:
    // the times it looked at each of the three volumes.
    let mut rounds: Vec<Vec<(f64, &str)>> = Vec::new();
    for l in log.lines() {
        if l.contains(PARTIAL_ROUND) {
            assert!(
                l.contains(&format!("node {hung} did not list its copies")),
                "{l}"
            );
            rounds.push(Vec::new());
        } else if l.contains(ROUND_LOOKS)
            && let (Some(round), Some(id)) = (
                rounds.last_mut(),
                ids.iter().find(|id| l.contains(id.as_str())),
            )
        {
            round.push((log_seconds(l).unwrap(), id.as_str()));
        }
    }
    let spans: Vec<f64> = rounds
        .iter()
        .filter(|r| ids.iter().all(|id| r.iter().any(|(_, v)| v == id)))
        .map(|r| r.last().unwrap().0 - r[0].0)
        .collect();
    eprintln!(
        "{} rounds without {hung}'s list; seconds from the first look to the last in those that looked at all three: {spans:?}",
        rounds.len()
    );
    assert!(
        !spans.is_empty(),
        "no round without {hung}'s list looked at the three volumes: the test did not test\ncontroller:\n{}",
        cl.controller.log_tail(30)
    );
    assert!(
        spans.iter().all(|s| *s < 5.0),
        "a round waited for {hung} volume after volume: {spans:?}"
    );
    for id in &ids {
        cl.delete(id).await.unwrap();
    }
}

/// A ModifyVolume 3 -> 2 on three nodes cut short between its two member
/// changes: the dropped copy's node cannot delete its member (its
/// directory is immutable), so the answer is UNAVAILABLE, naming the node
/// and saying to retry, and the volume is left with two copies and no
/// witness. Once the node can delete again, the controller's round, with
/// no retry, deletes the old member and gives the two copies their
/// witness on that node.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_change_cut_short_gets_its_witness_in_the_round() {
    let mut cl = Cluster::start_full(3, &["--replica-replace-after", "4"], &[]).await;
    let v = cl.create(replicated("mem-cut", "3")).await.unwrap();
    let id = v.volume_id.clone();
    let (three, _, _) = copies(&mut cl, &id).await;
    // All in sync, nobody publishes: the last member's copy goes.
    let dropped = three[2].clone();
    let held = Immutable::set(&cl.copy_dir(index_of(&dropped), &id));
    let e = modify(&mut cl, &id, &[("replicas", "2")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&format!("node {dropped}")) && e.message().contains("retry"),
        "{e:?}"
    );
    let (two, in_sync, msg) = copies(&mut cl, &id).await;
    assert_eq!(two, three[..2], "{msg}");
    assert!(in_sync, "{msg}");
    assert_eq!(witness_of(&msg), None, "{msg}");
    assert!(cl.copy_dir(index_of(&dropped), &id).join("data").exists());

    drop(held);
    cl.wait_condition(
        &id,
        Duration::from_secs(30),
        &format!("a witness on {dropped}"),
        |_, msg| witness_of(msg).as_ref() == Some(&dropped),
    )
    .await;
    assert!(
        !cl.copy_dir(index_of(&dropped), &id).join("data").exists(),
        "{dropped} is a witness now, with no data"
    );
    cl.delete(&id).await.unwrap();
    for i in 1..=3 {
        assert!(!cl.copy_dir(i, &id).exists(), "n{i} still holds it");
    }
}

/// A node killed for good: after `--replica-replace-after`, its copy is
/// replaced on the fourth node, rebuilt in full while the writer goes on,
/// and joins the in-sync set; the final copies hold the same bytes. When
/// the node comes back after all, its old copy is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_on_a_lost_node_is_replaced_and_rebuilt_on_another() {
    let mut cl = Cluster::start_full(FOUR, &["--replica-replace-after", "4"], &[]).await;
    let v = cl.create(replicated("mem-r", "3")).await.unwrap();
    let id = v.volume_id.clone();
    let (three, _, _) = copies(&mut cl, &id).await;
    let owner = index_of(&three[0]);
    let m = Published::up(&mut cl, owner, &v, &ext4()).await.unwrap();
    let w = Writer::start(&m.target);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = three[2].clone();
    let gauge = |cl: &Cluster| {
        cl.controller_metric_with(
            "stowage_replicated_volume_abnormal",
            &format!("volume=\"{id}\""),
        )
    };
    cl.nodes[index_of(&victim) - 1].kill9();
    // With nobody asking (no ControllerGetVolume, no ListVolumes), the
    // controller's rounds (every second here) see a copy out of sync: the
    // gauge an alert needs goes to 1 by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gauge(&cl) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the gauge never said the volume lost a copy: {:?}\n{}",
            gauge(&cl),
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = wait_copies(&mut cl, &id, 3, Some(&victim), Duration::from_secs(90)).await;
    assert!(!now.contains(&victim), "{now:?}");
    let files = w.finish();
    assert!(files > 0);
    m.down(&mut cl, &id).await;
    same_data(&cl, &id, &now);

    // The lost node comes back: its old copy, no longer a member, is
    // deleted from it, and only from it.
    let (vi, old_copy) = (index_of(&victim), cl.copy_dir(index_of(&victim), &id));
    assert!(
        old_copy.exists(),
        "the dead node's copy is still on its disk"
    );
    cl.nodes[vi - 1].restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while old_copy.exists() {
        assert!(
            Instant::now() < deadline,
            "{victim}'s removed copy outlived its return by 60 s\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for n in &now {
        assert!(cl.copy_data(index_of(n), &id).exists(), "{n} lost its copy");
    }
    let (again, in_sync, msg) = copies(&mut cl, &id).await;
    assert_eq!(again, now, "{msg}");
    assert!(in_sync, "{msg}");
    // The controller's gauge says the volume is well; once it is deleted,
    // the next round of replacements (every second here) forgets it.
    assert_eq!(gauge(&cl), Some(0), "{msg}");
    cl.delete(&id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while gauge(&cl).is_some() {
        assert!(
            Instant::now() < deadline,
            "the deleted volume's gauge outlived it by 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A copy of a volume nobody publishes, lost with its node, is replaced
/// on another node and rebuilt there with nobody publishing the volume (a
/// heal: the controller has an engine with no mount rebuild it), so the
/// volume has its three copies again before anyone uses it; then a
/// ControllerPublish goes as usual, and the copies hold the same bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_copy_of_a_volume_nobody_publishes_is_rebuilt_without_a_publish() {
    let mut cl = Cluster::start_full(FOUR, &["--replica-replace-after", "4"], &[]).await;
    let v = cl.create(replicated("mem-heal", "3")).await.unwrap();
    let id = v.volume_id.clone();
    let (three, _, _) = copies(&mut cl, &id).await;
    let files = files_written(&mut cl, &three[0], &v).await;
    let victim = three[2].clone();
    cl.nodes[index_of(&victim) - 1].kill9();
    let now = wait_copies(&mut cl, &id, 3, Some(&victim), Duration::from_secs(90)).await;
    let got = cl.get(&id).await.unwrap().status.unwrap();
    assert!(got.published_node_ids.is_empty(), "{got:?}");
    // Published again, on the new copy's node: its files are all there.
    healed_with_files(&mut cl, &v, &three, &now, &files).await;
    cl.delete(&id).await.unwrap();
}

/// DeleteSnapshot of a snapshot taken on a node that is down waits for it
/// (UNAVAILABLE, nothing deleted anywhere) and deletes it everywhere once
/// the node is back, so no node keeps a snapshot the CO no longer knows;
/// a node forgotten for good no longer holds a delete up.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_waits_for_a_node_that_is_down_to_be_deleted() {
    let mut cl = Cluster::start().await;
    let v = cl.create(replicated("snap-down", "3")).await.unwrap();
    let (three, in_sync, msg) = copies(&mut cl, &v.volume_id).await;
    assert!(in_sync && three.len() == 3, "{msg}");
    let take = |name: &str| csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    let delete = |id: &str| csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let mut snaps = Vec::new();
    for name in ["snap-a", "snap-b"] {
        let s = cl.c.controller.create_snapshot(take(name)).await.unwrap();
        snaps.push(s.into_inner().snapshot.unwrap().snapshot_id);
    }
    for s in &snaps {
        for n in &three {
            assert!(cl.snapshot_dir(index_of(n), s).exists(), "{n} lacks {s}");
        }
    }

    let victim = three[2].clone();
    let vi = index_of(&victim);
    cl.nodes[vi - 1].kill9();
    cl.wait_stale(&victim).await;
    let e =
        cl.c.controller
            .delete_snapshot(delete(&snaps[0]))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&victim), "{e:?}");
    for n in &three {
        assert!(
            cl.snapshot_dir(index_of(n), &snaps[0]).exists(),
            "{n}'s snapshot went while {victim} was down"
        );
    }

    cl.nodes[vi - 1].restart();
    cl.wait_fresh(std::slice::from_ref(&victim)).await;
    for _ in 0..2 {
        // Idempotent.
        cl.c.controller
            .delete_snapshot(delete(&snaps[0]))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(30)));
    }
    for n in &three {
        assert!(
            !cl.snapshot_dir(index_of(n), &snaps[0]).exists(),
            "{n} kept the deleted snapshot"
        );
    }

    // A node gone for good: forgotten, it no longer holds the delete up.
    cl.nodes[vi - 1].kill9();
    cl.wait_stale(&victim).await;
    let e =
        cl.c.controller
            .delete_snapshot(delete(&snaps[1]))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let out = cl.client(&["node", "forget", &victim]);
    assert!(out.status.success(), "{out:?}");
    cl.c.controller
        .delete_snapshot(delete(&snaps[1]))
        .await
        .unwrap();
    for n in &three[..2] {
        assert!(!cl.snapshot_dir(index_of(n), &snaps[1]).exists());
    }
    cl.delete(&v.volume_id).await.unwrap();
}

/// A copy a membership change created and then never made a member (the
/// controller that made it failed before proposing the change): made here
/// as that controller would have, through the agent API of the fourth node
/// with the cluster certificate. It is deleted from its node once it has
/// sat untouched for `--replica-replace-after`; the volume's own copies
/// stay as they were.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_made_for_a_change_that_never_happened_is_deleted() {
    use stowage::backend::replicated::protocol::VoterState;
    use stowage::backend::replicated::record::{Member, ReplicaRecord};
    use stowage::cluster::proto::CreateReplicaRequest;

    let mut cl = Cluster::start_full(FOUR, &["--replica-replace-after", "4"], &[]).await;
    let v = cl.create(replicated("orphan", "3")).await.unwrap();
    let id = v.volume_id.clone();
    // Published once, so a record above the zero ballot is chosen.
    let (three, in_sync, msg) = copies(&mut cl, &id).await;
    assert!(in_sync && three.len() == 3, "{msg}");
    let m = Published::up(&mut cl, index_of(&three[0]), &v, &ext4())
        .await
        .unwrap();
    m.down(&mut cl, &id).await;
    let spare = (1..=FOUR)
        .map(node_id)
        .find(|n| !three.contains(n))
        .unwrap();
    let si = index_of(&spare);
    let held: VoterState = serde_json::from_slice(
        &std::fs::read(cl.copy_dir(index_of(&three[0]), &id).join("voter.json")).unwrap(),
    )
    .unwrap();
    // The joiner's first record, as a change to these copies plus the
    // spare would make it.
    let mut members = held.record.members.clone();
    members.push(Member::copy(&spare));
    let first = ReplicaRecord::new(
        held.record.uuid,
        held.record.size,
        members,
        &Default::default(),
    )
    .unwrap();
    let created = cl.as_controller(si, move |mut c| {
        Box::pin(async move {
            c.create(CreateReplicaRequest {
                record: serde_json::to_string(&first).unwrap(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("create: {s:?}"))
        })
    });
    created.unwrap();
    let orphan = cl.copy_dir(si, &id);
    assert!(
        orphan.join("voter.json").exists(),
        "no copy made on {spare}"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    while orphan.exists() {
        assert!(
            Instant::now() < deadline,
            "{spare}'s copy of a change that never happened outlived 60 s\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The controller logs the delete once its node has answered, which
    // may be after the directory is gone.
    assert!(
        cl.controller
            .wait_log("member of a failed change deleted", Duration::from_secs(10)),
        "{}",
        cl.controller.log_tail(30)
    );
    for n in &three {
        assert!(cl.copy_data(index_of(n), &id).exists(), "{n} lost its copy");
    }
    let (again, in_sync, msg) = copies(&mut cl, &id).await;
    assert_eq!(again, three, "{msg}");
    assert!(in_sync, "{msg}");
    cl.delete(&id).await.unwrap();
}

/// ControllerModifyVolume of `replicas` 3 -> 1 -> 2 on three nodes while a
/// writer runs on the published volume: the shrink to one copy deletes
/// the other two (the copy on the publishing node stays); the grow makes
/// a copy and a witness on nodes that held copies before, and the new copy
/// is rebuilt in full (the engine may not have seen the shrink, and must
/// not take it for the old copy) and holds the same bytes as the one that
/// stayed.
#[tokio::test(flavor = "multi_thread")]
async fn shrinking_to_one_copy_and_growing_again_keeps_the_copies_equal() {
    let mut cl = Cluster::start_full(3, &[], &[]).await;
    let v = cl.create(replicated("mem-one", "3")).await.unwrap();
    let id = v.volume_id.clone();
    let (three, _, _) = copies(&mut cl, &id).await;
    let m = Published::up(&mut cl, index_of(&three[0]), &v, &ext4())
        .await
        .unwrap();
    let w = Writer::start(&m.target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    modify(&mut cl, &id, &[("replicas", "1")]).await.unwrap();
    let one = wait_copies(&mut cl, &id, 1, None, Duration::from_secs(60)).await;
    assert_eq!(one, [three[0].clone()], "the owner's copy stays");
    for gone in &three[1..] {
        assert!(
            !cl.copy_dir(index_of(gone), &id).exists(),
            "the removed copy on {gone} was deleted"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    modify(&mut cl, &id, &[("replicas", "2")]).await.unwrap();
    let two = wait_copies(&mut cl, &id, 2, None, Duration::from_secs(60)).await;
    assert!(two.contains(&one[0]), "{one:?} -> {two:?}");

    let files = w.finish();
    assert!(files > 0);
    m.down(&mut cl, &id).await;
    same_data(&cl, &id, &two);
    cl.delete(&id).await.unwrap();
}

/// A name for a two-copy volume whose witness the controller places on
/// `node` (of the four nodes, all alike): placement is a pure function of
/// the name and the nodes.
fn name_with_witness_on(node: &str) -> String {
    use stowage::backend::replicated::placement::{Candidate, Locality, place, volume_uuid};
    let nodes: Vec<Candidate> = (1..=FOUR)
        .map(|i| Candidate {
            node: node_id(i),
            zone: None,
            fresh: true,
            cordoned: false,
            free_bytes: u64::MAX,
        })
        .collect();
    (0..100)
        .map(|i| format!("drain-c{i}"))
        .find(|n| {
            let placed = place(
                volume_uuid(n),
                &nodes,
                2,
                SIZE as u64,
                Locality::BestEffort,
                None,
            );
            placed.unwrap().witness.as_deref() == Some(node)
        })
        .expect("some name puts the witness there")
}

/// The time of day (seconds) of a log line, from its RFC 3339 stamp
/// (`2026-12-06T10:46:42.292901Z ...`; the tests run within a day).
fn log_seconds(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut hms = time.trim_end_matches('Z').split(':');
    let (h, m, sec): (f64, f64, f64) = (
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// `node`'s line in `stowage node list`.
fn node_line(cl: &Cluster, node: &str) -> String {
    let out = cl.client(&["node", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(&format!("{node} ")))
        .unwrap_or_else(|| panic!("{node} not listed: {text}"))
        .to_owned()
}

/// The copies in sync that a volume's condition message counts.
fn in_sync_of(msg: &str) -> usize {
    msg.split(" of ")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count: {msg}"))
}

/// Four nodes whose controller replaces a lost member after 4 s and heals
/// at 4 MiB/s, so a heal of a new 64 MiB copy lasts about 16 s.
async fn slow_heals() -> Cluster {
    Cluster::start_full(
        FOUR,
        &["--replica-replace-after", "4", "--replica-heal-rate", "4"],
        &[],
    )
    .await
}

/// Runs `stowage node drain NODE --wait` (killed on drop; it gives up
/// after 180 s), to watch with [`watch_drain`].
fn drain_client(cl: &Cluster, node: &str) -> KillOnDrop {
    KillOnDrop(
        cl.client_command(&["node", "drain", node, "--wait", "--timeout", "180"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Watches the volumes of `had` (each with the copies in sync it had)
/// until the `drain` client ends (bounded): none ever has fewer copies in
/// sync. Checks the client said `d` drained; returns, for each volume, the
/// most copies seen and whether its copy on `d` was seen leaving, and what
/// the client printed.
async fn watch_drain(
    cl: &mut Cluster,
    drain: &mut KillOnDrop,
    d: &str,
    had: &[(&str, usize)],
) -> (Vec<(usize, bool)>, String) {
    use std::io::Read;
    let mut seen = vec![(0, false); had.len()];
    let deadline = Instant::now() + Duration::from_secs(200);
    let status = loop {
        if let Some(status) = drain.0.try_wait().unwrap() {
            break status;
        }
        for ((id, had), seen) in had.iter().zip(&mut seen) {
            let (list, _, msg) = copies(cl, id).await;
            assert!(
                in_sync_of(&msg) >= *had,
                "{id} has a copy fewer in sync during the drain: {msg}"
            );
            seen.0 = seen.0.max(list.len());
            seen.1 |= msg.contains(&format!("leaving: {d}"));
        }
        assert!(Instant::now() < deadline, "the drain client still runs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (mut said, mut err) = (String::new(), String::new());
    drain
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    drain
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.success() && said.contains(&format!("node {d} drained")),
        "{status}: {said}{err}\ncontroller:\n{}",
        cl.controller.log_tail(40)
    );
    (seen, said)
}

/// ControllerModifyVolume in the middle of a drain counts the copies that
/// stay. A volume of two copies nobody publishes, its copy on D leaving and
/// the replacement still being healed (slowly): asked for two copies, it
/// keeps all three, D's still leaving (before, the replacement was dropped
/// and D's copy kept for good, so the drain started over); asked for
/// three, it gets a fourth, D's still leaving. The drain then ends with
/// three copies, none on D, never more than four and never fewer than two
/// in sync, and the files read back from a new copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_modify_in_the_middle_of_a_drain_keeps_the_copy_leaving_until_the_others_hold_the_data() {
    let mut cl = slow_heals().await;
    let v = cl.create(replicated("drain-mod", "2")).await.unwrap();
    let id = v.volume_id.clone();
    let (two, _, _) = copies(&mut cl, &id).await;
    let d = two[0].clone();
    let files = files_written(&mut cl, &two[1], &v).await;
    let out = cl.client(&["node", "drain", &d]);
    assert!(out.status.success(), "{out:?}");
    let leaving = format!("leaving: {d}");
    let (_, msg) = cl
        .wait_condition(
            &id,
            Duration::from_secs(60),
            "a copy added, D's leaving",
            |_, m| m.contains(&leaving) && m.contains("healing on"),
        )
        .await;
    let (three, _, _) = copies(&mut cl, &id).await;
    assert_eq!(three.len(), 3, "{msg}");

    modify(&mut cl, &id, &[("replicas", "2")]).await.unwrap();
    let (now, _, msg) = copies(&mut cl, &id).await;
    assert_eq!(
        now, three,
        "asked for the two copies it has, mid-drain: {msg}"
    );
    assert!(msg.contains(&leaving), "{msg}");
    modify(&mut cl, &id, &[("replicas", "3")]).await.unwrap();
    let (four, _, msg) = copies(&mut cl, &id).await;
    assert_eq!(four.len(), 4, "{msg}");
    assert!(
        three.iter().all(|n| four.contains(n)),
        "{three:?} -> {four:?}"
    );
    assert!(msg.contains(&leaving), "{msg}");

    let deadline = Instant::now() + Duration::from_secs(150);
    let end = loop {
        let (list, in_sync, msg) = copies(&mut cl, &id).await;
        assert!(
            list.len() <= 4,
            "more copies than asked for and the one leaving: {msg}"
        );
        assert!(
            in_sync_of(&msg) >= 2,
            "fewer than two copies in sync: {msg}"
        );
        if in_sync && list.len() == 3 && !list.contains(&d) {
            break list;
        }
        assert!(Instant::now() < deadline, "the drain did not end: {msg}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Counted drained once a whole round has looked at the volume since.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = node_line(&cl, &d);
        if line.contains("drained") {
            break;
        }
        assert!(Instant::now() < deadline, "{line}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !cl.copy_dir(index_of(&d), &id).exists(),
        "{d} still holds it"
    );
    let new = end.iter().find(|n| !two.contains(n)).unwrap().clone();
    files_read_back(&mut cl, &new, &v, &files).await;
    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    cl.delete(&id).await.unwrap();
}

/// `stowage node drain --wait` moves every replicated volume's member off
/// a node, make before break, and says when it is done: a volume of three
/// copies nobody publishes gets a fourth copy, rebuilt by a heal (kept
/// slow with `--replica-heal-rate 4`) while the copy on the draining node
/// still counts and is shown leaving, which goes once the new one is in
/// sync; a volume of two copies published elsewhere, with a writer
/// running, gets its new copy rebuilt by its engine, as does one published
/// on the draining node itself, whose writer goes on with its copies
/// elsewhere; a witness on the node moves at once. No volume ever has fewer copies in sync than it had;
/// the node ends up holding nothing of them, `node list` says drained,
/// and the data reads back from the new copies. Uncordon makes it ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_moves_every_member_off_the_node_rebuilding_first() {
    let mut cl = slow_heals().await;
    let b = cl.create(replicated("drain-b", "3")).await.unwrap();
    let (b3, _, _) = copies(&mut cl, &b.volume_id).await;
    let d = b3[0].clone();
    let b_files = files_written(&mut cl, &b3[1], &b).await;
    let a = cl.create(replicated_on("drain-a", "2", &d)).await.unwrap();
    let (a2, _, msg) = copies(&mut cl, &a.volume_id).await;
    assert!(a2.contains(&d), "locality puts a copy on {d}: {msg}");
    let user = a2.iter().find(|n| **n != d).unwrap().clone();
    let c = cl
        .create(replicated(&name_with_witness_on(&d), "2"))
        .await
        .unwrap();
    let (_, _, msg) = copies(&mut cl, &c.volume_id).await;
    assert_eq!(witness_of(&msg).as_deref(), Some(d.as_str()), "{msg}");
    let m = Published::up(&mut cl, index_of(&user), &a, &ext4())
        .await
        .unwrap();
    let w = Writer::start(&m.target);
    // E: two copies, published on the draining node itself, whose engine
    // reads from its own copy until that copy leaves.
    let e = cl.create(replicated_on("drain-e", "2", &d)).await.unwrap();
    let me = Published::up(&mut cl, index_of(&d), &e, &ext4())
        .await
        .unwrap();
    let we = Writer::start(&me.target);

    let mut drain = drain_client(&cl, &d);
    let (seen, said) = watch_drain(
        &mut cl,
        &mut drain,
        &d,
        // Never a copy fewer in sync than each had. (A CI run once saw A
        // at "1 of 3 copies in sync … node n1 unreachable: data link
        // closed": its engine replaced its peer when the new copy joined,
        // which closed the data links under the writes in flight; see
        // a_membership_change_fails_no_write_in_flight_to_the_copies_that_stay.)
        &[(&a.volume_id, 2), (&b.volume_id, 3), (&e.volume_id, 2)],
    )
    .await;
    assert_eq!(
        seen[1].0, 4,
        "the third copy's replacement came before it went"
    );
    // (The engines of A and E rebuild theirs too fast to be seen so.)
    assert!(seen[1].1, "B's copy on {d} was shown leaving");
    // The client showed the heal of B's new copy going on: the MiB it had
    // left, more than one figure of them.
    let left: BTreeSet<&str> = said
        .lines()
        .filter(|l| l.contains(&b.volume_id))
        .filter_map(|l| l.split(" being rebuilt, ").nth(1))
        .filter_map(|l| l.split(" MiB left").next())
        .collect();
    assert!(
        left.len() >= 2,
        "no progress of B's heal shown: {left:?}\n{said}"
    );

    let a_now = wait_copies(&mut cl, &a.volume_id, 2, Some(&d), Duration::from_secs(30)).await;
    let b_now = wait_copies(&mut cl, &b.volume_id, 3, Some(&d), Duration::from_secs(30)).await;
    wait_copies(&mut cl, &c.volume_id, 2, Some(&d), Duration::from_secs(30)).await;
    let e_now = wait_copies(&mut cl, &e.volume_id, 2, Some(&d), Duration::from_secs(30)).await;
    for id in [&a.volume_id, &b.volume_id, &c.volume_id, &e.volume_id] {
        let (_, _, msg) = copies(&mut cl, id).await;
        assert!(
            witness_of(&msg).is_none_or(|n| n != d) && !msg.contains("leaving"),
            "{msg}"
        );
        assert!(
            !cl.copy_dir(index_of(&d), id).exists(),
            "{d} still holds {id}"
        );
    }
    let line = node_line(&cl, &d);
    assert!(line.contains("drained"), "{line}");

    assert!(w.finish() > 0);
    m.down(&mut cl, &a.volume_id).await;
    same_data(&cl, &a.volume_id, &a_now);
    // E's writer on the drained node went on with its copies elsewhere.
    let e_files = we.files();
    assert!(!e_files.is_empty());
    me.down(&mut cl, &e.volume_id).await;
    same_data(&cl, &e.volume_id, &e_now);
    files_read_back(&mut cl, &e_now[0], &e, &e_files).await;
    let new = b_now.iter().find(|n| !b3.contains(n)).unwrap().clone();
    files_read_back(&mut cl, &new, &b, &b_files).await;

    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    let line = node_line(&cl, &d);
    assert!(line.contains("ready"), "{line}");
    for id in [&a.volume_id, &b.volume_id, &c.volume_id, &e.volume_id] {
        cl.delete(id).await.unwrap();
        for i in 1..=FOUR {
            assert!(!cl.copy_dir(i, id).exists(), "n{i} still holds {id}");
        }
    }
}

/// A volume of one copy drains on two nodes, where no third node could
/// take a witness: its copy moves to the other node, the two copies voting
/// alone for the while. One volume nobody publishes (its new copy healed),
/// one published on the draining node itself with a writer throughout
/// (its engine rebuilds the new copy): each has two copies for a while,
/// the draining node's leaving, never a copy fewer in sync, and ends with
/// its one copy on the other node, with no witness; the files read back
/// there, and the drained node holds nothing of them.
#[tokio::test(flavor = "multi_thread")]
async fn one_copy_drains_to_the_other_of_two_nodes_with_no_witness() {
    let mut cl = Cluster::start_full(2, &["--replica-heal-rate", "4"], &[]).await;
    let d = node_id(1);
    let other = node_id(2);
    let idle = cl
        .create(replicated_on("drain-one", "1", &d))
        .await
        .unwrap();
    let (one, _, msg) = copies(&mut cl, &idle.volume_id).await;
    assert_eq!(one, [d.as_str()], "{msg}");
    let idle_files = files_written(&mut cl, &other, &idle).await;
    let used = cl
        .create(replicated_on("drain-one-used", "1", &d))
        .await
        .unwrap();
    let m = Published::up(&mut cl, index_of(&d), &used, &ext4())
        .await
        .unwrap();
    let w = Writer::start(&m.target);

    let mut drain = drain_client(&cl, &d);
    let (seen, said) = watch_drain(
        &mut cl,
        &mut drain,
        &d,
        &[(&idle.volume_id, 1), (&used.volume_id, 1)],
    )
    .await;
    // 64 MiB healed at 4 MiB/s: the idle volume was seen with its two
    // copies, the draining node's leaving.
    assert_eq!(seen[0], (2, true), "{said}");
    // The heal's end woke the round (every 30 s here), which removed the
    // leaving copy at once.
    let log = cl.controller.log_text();
    let at = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&idle.volume_id))
            .find_map(log_seconds)
            .unwrap_or_else(|| panic!("no {what:?} of the idle volume logged"))
    };
    let healed = at("healed: every copy in sync");
    let removed = at("drain: leaving copies removed");
    // (Across midnight, a day later.)
    let gap = (removed - healed).rem_euclid(86400.0);
    assert!(
        gap < 5.0,
        "the leaving copy went {gap:.1} s after the heal ended"
    );
    for id in [&idle.volume_id, &used.volume_id] {
        let now = wait_copies(&mut cl, id, 1, Some(&d), Duration::from_secs(30)).await;
        assert_eq!(now, [other.as_str()]);
        let (_, _, msg) = copies(&mut cl, id).await;
        assert!(
            witness_of(&msg).is_none() && !msg.contains("leaving"),
            "{msg}"
        );
        assert!(
            !cl.copy_dir(index_of(&d), id).exists(),
            "{d} still holds {id}"
        );
    }
    let files = w.files();
    assert!(!files.is_empty());
    m.down(&mut cl, &used.volume_id).await;
    files_read_back(&mut cl, &other, &used, &files).await;
    files_read_back(&mut cl, &other, &idle, &idle_files).await;
    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    for id in [&idle.volume_id, &used.volume_id] {
        cl.delete(id).await.unwrap();
    }
}

/// A drain of a published volume ends as soon as the volume's engine has
/// the new copy in sync, not at the controller's next round (every 30 s
/// here, the default): the controller watches the engine's rebuild and
/// wakes its round when it is done. One copy of 512 MiB, published on the
/// draining node with a writer throughout, moves to the other node, and
/// `drain --wait` returns within 25 s; every acknowledged file reads back
/// from the copy on the other node.
#[tokio::test(flavor = "multi_thread")]
async fn a_published_volume_drains_as_soon_as_its_engine_has_the_new_copy() {
    let mut cl = Cluster::start_full(2, &[], &[]).await;
    let (d, other) = (node_id(1), node_id(2));
    let mut req = replicated_req("drain-pub", "1", 512 << 20, ext4());
    req.accessibility_requirements = on(&[&d], &[]);
    let v = cl.create(req).await.unwrap();
    let m = Published::up(&mut cl, index_of(&d), &v, &ext4())
        .await
        .unwrap();
    let w = Writer::start(&m.target);

    let mut drain = drain_client(&cl, &d);
    let began = Instant::now();
    let status = loop {
        if let Some(status) = drain.0.try_wait().unwrap() {
            break status;
        }
        let (_, _, msg) = copies(&mut cl, &v.volume_id).await;
        assert!(
            began.elapsed() < Duration::from_secs(25),
            "the drain still runs after 25 s: {msg}\n{}",
            cl.controller.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "{status:?}");
    eprintln!("drained in {:?}", began.elapsed());
    let now = wait_copies(&mut cl, &v.volume_id, 1, Some(&d), Duration::from_secs(10)).await;
    assert_eq!(now, [other.as_str()]);
    let files = w.files();
    assert!(!files.is_empty());
    m.down(&mut cl, &v.volume_id).await;
    files_read_back(&mut cl, &other, &v, &files).await;
    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    cl.delete(&v.volume_id).await.unwrap();
}

/// A drain the nodes left cannot take (three nodes: two copies and a
/// witness need three others) starts nothing: `drain --wait` gives up at
/// its timeout, saying why each volume stays; the volume keeps its members,
/// all in sync, none leaving; the controller's /metrics gauge says
/// draining. A node not registered is UNAVAILABLE (it may
/// register yet, as after a controller restart), and so is one that is
/// down, saying its copies are replaced instead. Uncordon ends the drain.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_that_cannot_end_starts_nothing_and_says_why() {
    let mut cl = Cluster::start_full(3, &["--replica-replace-after", "4"], &[]).await;
    let v = cl.create(replicated("drain-no", "2")).await.unwrap();
    let (two, _, before) = copies(&mut cl, &v.volume_id).await;
    let d = two[0].clone();
    let out = cl.client(&["node", "drain", &d, "--wait", "--timeout", "6"]);
    let (said, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{said}{err}");
    assert!(
        said.contains(&format!(
            "{}: cannot move: two copies need a witness",
            v.volume_id
        )) && err.contains(&format!("node {d} not drained within 6s (1 volumes left")),
        "{said}{err}"
    );
    let (now, in_sync, msg) = copies(&mut cl, &v.volume_id).await;
    assert_eq!(now, two, "{msg}");
    assert!(in_sync && !msg.contains("leaving"), "{msg}");
    assert_eq!(witness_of(&msg), witness_of(&before), "{msg}");
    assert!(
        cl.copy_dir(index_of(&d), &v.volume_id)
            .join("data")
            .exists()
    );
    for i in 1..=3 {
        let n = node_id(i);
        let draining =
            cl.controller_metric_with("stowage_cluster_node_draining", &format!("node=\"{n}\""));
        assert_eq!(draining, Some(u64::from(n == d)), "{n}");
    }
    let line = node_line(&cl, &d);
    assert!(line.contains("draining (1 volumes left)"), "{line}");

    let out = cl.client(&["node", "drain", "n9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("UNAVAILABLE")
            && err.contains("node n9 is not registered"),
        "{out:?}"
    );
    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    let line = node_line(&cl, &d);
    assert!(line.contains("ready"), "{line}");
    cl.delete(&v.volume_id).await.unwrap();
    // A node that is down cannot take the mark: UNAVAILABLE, saying what
    // happens to its copies instead.
    cl.nodes[index_of(&d) - 1].kill9();
    let out = cl.client(&["node", "drain", &d]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("UNAVAILABLE")
            && err.contains(&format!("node {d} did not answer"))
            && err.contains("replaced after --replica-replace-after"),
        "{out:?}"
    );
}

/// A round that could not list every node's copies concludes nothing of a
/// drain: the one copy of a volume is on a draining node that then stops
/// answering (every byte to it held by its proxy; it still registers), so
/// the rounds do not list the volume, and the node must not be said
/// drained. The other nodes are cordoned, so the copy has nowhere to go.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_is_not_said_done_by_a_round_that_missed_a_node() {
    let mut opts = vec![NodeOpts::default(); 3];
    opts[2].proxied = true;
    let mut cl = Cluster::start_full(3, &["--replica-replace-after", "4"], &opts).await;
    let d = node_id(3);
    let v = cl
        .create(replicated_on("drain-hung", "1", &d))
        .await
        .unwrap();
    let (one, _, msg) = copies(&mut cl, &v.volume_id).await;
    assert_eq!(one, std::slice::from_ref(&d), "{msg}");
    for i in 1..=2 {
        assert!(cl.client(&["node", "cordon", &node_id(i)]).status.success());
    }
    assert!(cl.client(&["node", "drain", &d]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node_line(&cl, &d).contains("draining (1 volumes left)") {
        assert!(
            Instant::now() < deadline,
            "no whole round counted the drain: {}",
            node_line(&cl, &d)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cl.proxy(3).faults.set(FaultConfig {
        hold: true,
        ..Default::default()
    });
    let partial = |cl: &Cluster| cl.controller.log_text().matches(PARTIAL_ROUND).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while partial(&cl) < 3 {
        assert!(
            Instant::now() < deadline,
            "not 3 rounds without {d}'s list within 60 s\ncontroller:\n{}",
            cl.controller.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let line = node_line(&cl, &d);
    assert!(line.contains("draining (1 volumes left)"), "{line}");
    cl.proxy(3).faults.set(FaultConfig::default());
    for i in 1..=2 {
        assert!(
            cl.client(&["node", "uncordon", &node_id(i)])
                .status
                .success()
        );
    }
    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    cl.delete(&v.volume_id).await.unwrap();
}

/// A drain goes on across a controller restart, which keeps nothing: the
/// draining mark is on the node, the leaving copy in the record. Killed
/// (-9) once the fourth copy of a volume nobody publishes is being healed,
/// the restarted controller heals it again and removes the leaving copy;
/// the volume never gets a fifth copy and never has a copy fewer in sync,
/// and `drain --wait` waits through the restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_goes_on_across_a_controller_restart() {
    let mut cl = slow_heals().await;
    let v = cl.create(replicated("drain-r", "3")).await.unwrap();
    let id = v.volume_id.clone();
    let (three, _, _) = copies(&mut cl, &id).await;
    let d = three[1].clone();
    let files = files_written(&mut cl, &three[0], &v).await;
    let mut drain = drain_client(&cl, &d);
    cl.wait_condition(
        &id,
        Duration::from_secs(30),
        "a heal of the fourth copy",
        |_, msg| {
            msg.contains(" of 4 copies")
                && msg.contains(&format!("leaving: {d}"))
                && msg.contains("healing on")
        },
    )
    .await;
    cl.controller.kill9();
    // Down for a few of the client's polls.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cl.controller.restart();
    cl.reconnect().await;
    let all: Vec<String> = (1..=FOUR).map(node_id).collect();
    cl.wait_fresh(&all).await;
    // The client waited through the restart, too.
    let (seen, _) = watch_drain(&mut cl, &mut drain, &d, &[(&id, 3)]).await;
    assert!(seen[0].0 <= 4, "a fifth copy: {seen:?}");
    let now = wait_copies(&mut cl, &id, 3, Some(&d), Duration::from_secs(30)).await;
    assert!(
        !cl.copy_dir(index_of(&d), &id).exists(),
        "{d} still holds it"
    );
    let new = now.iter().find(|n| !three.contains(n)).unwrap().clone();
    files_read_back(&mut cl, &new, &v, &files).await;
    assert!(cl.client(&["node", "uncordon", &d]).status.success());
    cl.delete(&id).await.unwrap();
}
