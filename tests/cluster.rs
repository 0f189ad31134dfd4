//! Several hosts, for real (issue 11): a `serve --mode controller` and
//! three `serve --mode node` agents, each in a network namespace of its own
//! on a bridge of the test's own (198.18.0.0/15, nothing else is reached),
//! with mutual TLS from `stowage cluster init`, each node with its own
//! state and pool. CSI calls go to the controller's unix socket (routed over
//! TCP to the nodes) and to the nodes' own sockets, as a CO would.
//! Everything is torn down on drop, also when a test fails.

#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::netns::AGENT_PORT;
use common::*;
use stowage::csi;
use tonic::Code;

fn block(name: &str, topology: Option<csi::TopologyRequirement>) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        accessibility_requirements: topology,
        ..create_req(name, "ext4", 64 << 20)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_land_on_the_preferred_node_and_restores_on_their_source() {
    let mut cl = Cluster::start().await;

    // Preferred node first; a retry preferring another node finds the
    // volume by name where it is (placement alone would pick n3).
    let v = cl
        .create(block("pref", on(&["n2", "n1"], &["n1", "n2"])))
        .await
        .unwrap();
    assert_eq!(node_of(&v.volume_id), "n2");
    assert_eq!(
        v.accessible_topology,
        vec![topo("n2")],
        "the volume says where it can be used"
    );
    let again = cl
        .create(block("pref", on(&["n3"], &["n3", "n2"])))
        .await
        .unwrap();
    assert_eq!(
        again.volume_id, v.volume_id,
        "CreateVolume is idempotent by name across nodes"
    );
    // No topology: some registered node; the node parameter pins.
    let free = cl.create(block("free", None)).await.unwrap();
    assert!(["n1", "n2", "n3"].contains(&node_of(&free.volume_id)));
    let mut pinned = block("pinned", None);
    pinned.parameters.insert("node".into(), "n3".into());
    let pinned = cl.create(pinned).await.unwrap();
    assert_eq!(node_of(&pinned.volume_id), "n3");

    // Data written through n2's node service reads back from a restore,
    // which is made on n2, the source's node.
    let (staging, target) = (cl.root.join("st-pref"), cl.root.join("pub-pref"));
    std::fs::create_dir(&staging).unwrap();
    let mut n2 = cl.node(2).await;
    n2.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        })
        .await
        .unwrap();
    n2.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::write(target.join("hello"), b"from n2").unwrap();
    nix::unistd::sync();
    let snap =
        cl.c.controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: v.volume_id.clone(),
                name: "pref-snap".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    assert!(snap.snapshot_id.contains(":n2:"), "{}", snap.snapshot_id);
    let from = |name: &str, topology| csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        }),
        ..block(name, topology)
    };
    // A restore the scheduler would place elsewhere: retryable, not invalid.
    let e = cl
        .create(from("restore-n1", on(&["n1"], &["n1"])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let restored = cl
        .create(from("restore", on(&["n1"], &["n1", "n2"])))
        .await
        .unwrap();
    assert_eq!(node_of(&restored.volume_id), "n2");
    // A cross-node group snapshot is refused clearly.
    let e =
        cl.c.group
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: "g".into(),
                source_volume_ids: vec![v.volume_id.clone(), pinned.volume_id.clone()],
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Capacity per node: the node's own answer; an unknown node has none.
    let cap = |node: &str| csi::GetCapacityRequest {
        volume_capabilities: vec![cap_for("ext4")],
        parameters: params_for("ext4"),
        accessible_topology: Some(topo(node)),
    };
    let routed =
        cl.c.controller
            .get_capacity(cap("n3"))
            .await
            .unwrap()
            .into_inner();
    let direct = {
        // The node's own pool, measured the way the node measures it.
        let usage = stowage::os::fs::usage(&cl._scratch.root.join("pool-fs/n3/pool")).unwrap();
        usage.available_bytes as i64
    };
    assert!(routed.available_capacity > 0);
    assert!(
        (routed.available_capacity - direct).abs() < (64 << 20),
        "GetCapacity(n3) = {}, the pool has {direct} free",
        routed.available_capacity
    );
    let none =
        cl.c.controller
            .get_capacity(cap("nobody"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(none.available_capacity, 0);
    // No topology: the largest single node's free space (as last reported).
    let mut any = cap("n1");
    any.accessible_topology = None;
    let any =
        cl.c.controller
            .get_capacity(any)
            .await
            .unwrap()
            .into_inner();
    assert!(
        (any.available_capacity - direct).abs() < (256 << 20),
        "GetCapacity() = {}, a node's pool has {direct} free",
        any.available_capacity
    );

    // Lists merge every node, with tokens, at every page size.
    let mut want: Vec<String> = [&v, &free, &pinned, &restored]
        .iter()
        .map(|v| v.volume_id.clone())
        .collect();
    want.sort();
    for page in [0, 1, 2, 3] {
        let mut got = cl.list_all(page).await.unwrap();
        got.sort();
        assert_eq!(got, want, "page size {page}");
    }

    n2.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    n2.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    // The restore carries the data (staged on n2, where it lives).
    let (rs, rt) = (cl.root.join("st-r"), cl.root.join("pub-r"));
    std::fs::create_dir(&rs).unwrap();
    n2.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: restored.volume_id.clone(),
            staging_target_path: rs.display().to_string(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        })
        .await
        .unwrap();
    n2.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: restored.volume_id.clone(),
            staging_target_path: rs.display().to_string(),
            target_path: rt.display().to_string(),
            volume_capability: Some(cap_for("ext4")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(std::fs::read(rt.join("hello")).unwrap(), b"from n2");
    n2.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: restored.volume_id.clone(),
            target_path: rt.display().to_string(),
        })
        .await
        .unwrap();
    n2.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: restored.volume_id.clone(),
            staging_target_path: rs.display().to_string(),
        })
        .await
        .unwrap();
    for id in &want {
        cl.delete(id).await.unwrap();
    }
    cl.delete_snapshot(&snap.snapshot_id).await.unwrap();
    assert!(cl.list_all(0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_partitioned_nodes_are_unavailable_and_come_back() {
    let mut cl = Cluster::start().await;
    let a = cl.create(block("a", on(&["n2"], &["n2"]))).await.unwrap();
    let b = cl.create(block("b", on(&["n3"], &["n3"]))).await.unwrap();

    // A killed agent: its volumes are UNAVAILABLE (retryable), the others
    // work; after its restart everything does.
    cl.nodes[1].kill9();
    let e = cl.get(&a.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    cl.get(&b.volume_id).await.unwrap();
    let e = cl.list_all(0).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "an incomplete list is an error: {e:?}"
    );
    cl.nodes[1].restart();
    cl.wait_fresh(&["n2".to_owned()]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cl.get(&a.volume_id).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("after the restart: {e:?}"),
        }
    }

    // A partition: UNAVAILABLE within a bounded time, service after healing.
    cl.net.partition(cl.net.host(3));
    let t0 = Instant::now();
    let e = cl.get(&b.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(60));
    cl.wait_stale("n3").await;
    let e = cl.delete(&b.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    cl.net.heal(cl.net.host(3));
    cl.wait_fresh(&["n3".to_owned()]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cl.get(&b.volume_id).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("after healing: {e:?}"),
        }
    }
    cl.delete(&a.volume_id).await.unwrap();
    cl.delete(&b.volume_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_loses_nothing() {
    let mut cl = Cluster::start().await;
    let mut want = Vec::new();
    for (i, n) in ["n1", "n2", "n3", "n1"].iter().enumerate() {
        want.push(
            cl.create(block(&format!("keep-{i}"), on(&[n], &[n])))
                .await
                .unwrap()
                .volume_id,
        );
    }
    want.sort();
    cl.controller.kill9();
    cl.controller.restart();
    cl.reconnect().await;
    // Complete again within one registration period (plus slack).
    cl.wait_fresh(&["n1".into(), "n2".into(), "n3".into()])
        .await;
    let mut got = cl.list_all(1).await.unwrap();
    got.sort();
    assert_eq!(got, want);
    // The restarted controller still knows where each name lives: a retry
    // preferring another node finds the volume (placement would pick n2).
    let again = cl
        .create(block("keep-0", on(&["n2"], &["n2", "n1"])))
        .await
        .unwrap();
    assert!(
        want.contains(&again.volume_id),
        "{} made anew",
        again.volume_id
    );
    assert_eq!(node_of(&again.volume_id), "n1");
    for id in &want {
        cl.delete(id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_stops_new_volumes_and_forget_releases_a_dead_node() {
    let mut cl = Cluster::start().await;
    // Through the real client commands, against the controller's socket.
    let out = cl.client(&["node", "cordon", "n1"]);
    assert!(out.status.success(), "{out:?}");
    let e = cl
        .create(block("c1", on(&["n1"], &["n1"])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let v = cl
        .create(block("c2", on(&["n1", "n2"], &["n1", "n2"])))
        .await
        .unwrap();
    assert_eq!(node_of(&v.volume_id), "n2");
    // Durable on the node: survives the node's restart.
    cl.nodes[0].kill9();
    cl.nodes[0].restart();
    tokio::time::sleep(Duration::from_secs(INTERVAL * 2)).await;
    cl.wait_fresh(&["n1".to_owned()]).await;
    let list = cl.client(&["node", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("n1 ") && l.contains("cordoned")),
        "{text}"
    );
    assert!(cl.client(&["node", "uncordon", "n1"]).status.success());
    let v1 = cl.create(block("c1", on(&["n1"], &["n1"]))).await.unwrap();
    assert_eq!(node_of(&v1.volume_id), "n1");

    // Forget: refused while the node registers; once it is gone for good,
    // deletes of its volumes succeed.
    let gone = cl
        .create(block("gone", on(&["n3"], &["n3"])))
        .await
        .unwrap();
    let out = cl.client(&["node", "forget", "n3"]);
    assert!(
        !out.status.success(),
        "forgetting a live node must be refused"
    );
    cl.nodes[2].kill9();
    cl.wait_stale("n3").await;
    let e = cl.delete(&gone.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let out = cl.client(&["node", "forget", "n3"]);
    assert!(out.status.success(), "{out:?}");
    cl.delete(&gone.volume_id).await.unwrap();
    let text = String::from_utf8_lossy(&cl.client(&["node", "list"]).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("n3 ") && l.contains("forgotten")),
        "{text}"
    );
    // The client's volume commands work against the controller unchanged.
    let out = cl.client(&["volume", "list"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&v.volume_id) && text.contains(&v1.volume_id),
        "{text}"
    );
    cl.delete(&v.volume_id).await.unwrap();
    cl.delete(&v1.volume_id).await.unwrap();
}

/// Sends an HTTP/2 (plaintext gRPC) preface to `to` from host `h` and
/// returns what came back before the peer closed or went quiet.
fn plaintext_probe(h: &common::netns::Host, to: SocketAddr) -> Vec<u8> {
    h.run_in(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_before_any_rpc() {
    let mut cl = Cluster::start().await;
    let ctl = cl.net.host(0).addr(AGENT_PORT);
    // Plaintext gRPC to the controller and to a node agent: no HTTP/2
    // frame comes back (a SETTINGS frame would be type 4 at byte 3).
    for to in [ctl, cl.net.host(2).agent_addr()] {
        let answer = plaintext_probe(cl.net.host(1), to);
        assert!(
            answer.len() < 9 || answer[3] != 4,
            "{to} answered plaintext HTTP/2: {answer:?}"
        );
    }
    // A node agent with certificates of another cluster's CA never
    // registers; nor does a node whose own certificate names another node.
    let other = cl.root.join("other-tls");
    assert!(
        Command::new(bin())
            .args(["cluster", "init"])
            .arg(&other)
            .status()
            .unwrap()
            .success()
    );
    let issued = cl.root.join("n9-tls");
    assert!(
        Command::new(bin())
            .args(["cluster", "issue", "--ca-dir"])
            .arg(cl.root.join("tls"))
            .args(["--node", "n8"])
            .arg(&issued)
            .status()
            .unwrap()
            .success()
    );
    let mut strangers = Vec::new();
    for (id, tls, port) in [("n7", &other, 7450u16), ("n9", &issued, 7451u16)] {
        let h1 = cl.net.host(1);
        let p = h1.spawn(
            Command::new(bin())
                .args(["serve", "--mode", "node", "--node-id", id])
                .arg("--endpoint")
                .arg(format!(
                    "unix://{}",
                    cl.root.join(format!("{id}.sock")).display()
                ))
                .arg("--state-dir")
                .arg(cl.root.join(format!("pool-fs/{id}")))
                .args(["--listen", &h1.addr(port).to_string()])
                .args(["--controller", &format!("https://{ctl}")])
                .arg("--tls-dir")
                .arg(tls)
                .args(["--register-interval", "1"])
                .env("STOWAGE_LOG", "debug"),
        );
        strangers.push(p);
    }
    // Both try to register at least twice.
    for p in &strangers {
        assert!(
            p.wait_log(
                "cannot register with the controller",
                Duration::from_secs(30)
            ),
            "{}",
            p.log_tail(20)
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids: Vec<String> = cl.nodes().await.into_iter().map(|n| n.node_id).collect();
    assert_eq!(ids, ["n1", "n2", "n3"], "strangers registered");
    assert!(
        strangers[1].log_text().contains("PermissionDenied")
            || strangers[1].log_text().contains("may not register"),
        "{}",
        strangers[1].log_tail(20)
    );
    // The cluster still works.
    let v = cl.create(block("after", None)).await.unwrap();
    cl.delete(&v.volume_id).await.unwrap();
}

/// A node agent that cannot take one of its ports (another process holds
/// it) fails to start, saying which address, before it registers or binds
/// its CSI socket: registered at an address nobody answers on, it would
/// fail every call the controller routed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_take_its_ports_fails_to_start() {
    let mut cl = Cluster::start().await;
    let ctl = cl.net.host(0).addr(AGENT_PORT);
    let h1 = cl.net.host(1);
    let held = h1.addr(7452);
    let _held = h1.listen(7452).unwrap();
    // n5's agent API on n1's agent port; n6's data link on the held port.
    for (id, listen, data) in [
        ("n5", h1.agent_addr(), None),
        ("n6", h1.addr(7453), Some(held)),
    ] {
        let socket = cl.root.join(format!("{id}.sock"));
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--mode", "node", "--node-id", id])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(cl.root.join(format!("pool-fs/{id}")))
            .args(["--listen", &listen.to_string()])
            .args(["--controller", &format!("https://{ctl}")])
            .arg("--tls-dir")
            .arg(cl.root.join("tls"))
            .args(["--register-interval", "1"])
            .env("STOWAGE_LOG", "debug");
        if let Some(d) = data {
            cmd.args(["--data-listen", &d.to_string()]);
        }
        let p = h1.spawn(&mut cmd);
        let status = p.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| !s.success()),
            "{id} did not fail to start ({status:?}):\n{}",
            p.log_tail(20)
        );
        let said = format!("listen on {}", data.unwrap_or(listen));
        assert!(
            p.log_text().contains(&said),
            "{id} did not say {said:?}:\n{}",
            p.log_tail(20)
        );
        assert!(!socket.exists(), "{id} left its CSI socket behind");
    }
    let ids: Vec<String> = cl.nodes().await.into_iter().map(|n| n.node_id).collect();
    assert_eq!(
        ids,
        ["n1", "n2", "n3"],
        "a node that failed to start registered"
    );
    // n1, whose port n5 tried, still serves.
    let v = cl.create(block("after", None)).await.unwrap();
    cl.delete(&v.volume_id).await.unwrap();
}

/// On a node of a cluster the client and `apply` send controller calls to
/// the controller's socket (`--controller-endpoint`) and node calls to the
/// node's own: volumes are created, published and unpublished there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_apply_work_on_a_node_with_the_controllers_socket() {
    let mut cl = Cluster::start().await;
    let ctl = format!("unix://{}", cl.root.join("controller.sock").display());
    let n2 = format!("unix://{}", cl.node_socket(2).display());
    let staging_root = cl.root.join("client-n2");
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
    let root = staging_root.display().to_string();
    let out = run(&[
        "volume", "create", "cli-vol", "--size", "64Mi", "--param", "node=n2", "-o", "json",
    ]);
    let id = out
        .split('"')
        .find(|w| w.starts_with("block:n2:"))
        .unwrap_or_else(|| panic!("no n2 volume id in {out}"))
        .to_owned();
    let target = cl.root.join("cli-target");
    run(&[
        "volume",
        "publish",
        &id,
        &target.display().to_string(),
        "--staging-root",
        &root,
    ]);
    std::fs::write(target.join("f"), b"via the controller").unwrap();
    assert!(is_mounted(&target));
    run(&[
        "volume",
        "unpublish",
        &id,
        &target.display().to_string(),
        "--staging-root",
        &root,
    ]);
    assert!(!is_mounted(&target));
    run(&["volume", "delete", &id]);

    // apply: a file with one volume pinned to n2, converged from n2.
    let file = cl.root.join("volumes.yaml");
    let applied = cl.root.join("applied");
    std::fs::write(
        &file,
        format!(
            "volumes:\n  - name: applied\n    size: 64Mi\n    parameters:\n      node: n2\n    target: {}\n",
            applied.display()
        ),
    )
    .unwrap();
    let state = cl.root.join("apply-state.json");
    let apply = |extra: &[&str]| {
        let mut args = vec![
            "apply".to_owned(),
            "-f".into(),
            file.display().to_string(),
            "--state-file".into(),
            state.display().to_string(),
            "--staging-root".into(),
            root.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&refs)
    };
    apply(&[]);
    assert!(is_mounted(&applied), "apply did not publish on n2");
    let listed = cl.list_all(0).await.unwrap();
    assert!(
        listed.iter().any(|v| v.starts_with("block:n2:")),
        "{listed:?}"
    );
    // Converged: a second pass changes nothing and still succeeds.
    apply(&[]);
    // Clean up through the client (apply's volume is unpublished first).
    let vid = listed
        .iter()
        .find(|v| v.starts_with("block:n2:"))
        .unwrap()
        .clone();
    run(&[
        "volume",
        "unpublish",
        &vid,
        &applied.display().to_string(),
        "--staging-root",
        &root,
    ]);
    run(&["volume", "delete", &vid]);
    assert!(cl.list_all(0).await.unwrap().is_empty());
}

/// Ends the s3fs daemons a failed test left mounting under the cluster's
/// scratch directory (the node plugins' daemons outlive them by design).
struct EndS3fs(PathBuf);

impl Drop for EndS3fs {
    fn drop(&mut self) {
        common::s3fs::end_daemons_under(&self.0);
    }
}

/// Issue 12 with several hosts: an object volume carries no topology,
/// takes no room in any node's pool (a 1 TiB volume on nodes of a few
/// GiB), and is published to, staged on and written from two nodes at
/// once; a node that never registered is NOT_FOUND; delete removes its
/// bucket. The S3 service (a real Garage on the test's loopback) is
/// reached from every namespace through a forwarder on host 0's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_volumes_are_shared_by_nodes_of_a_cluster() {
    use common::garage::Garage;
    use std::collections::HashMap;
    const S3_PORT: u16 = 3900;
    let g = Garage::start();
    let mut cl = Cluster::start().await;
    let _end_s3fs = EndS3fs(cl.root.clone());
    let to: SocketAddr = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let _fwd =
        common::forward::Forward::start(cl.net.host(0).listen(S3_PORT).unwrap(), to).unwrap();
    let endpoint = format!("http://{}", cl.net.host(0).addr(S3_PORT));
    let secrets = HashMap::from([
        ("accessKeyID".to_owned(), g.key.access_key_id.clone()),
        (
            "secretAccessKey".to_owned(),
            g.key.secret_access_key.clone(),
        ),
    ]);
    let shared = mount_cap("", Mode::MultiNodeMultiWriter);
    let v = cl
        .create(csi::CreateVolumeRequest {
            name: "shared-bucket".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1 << 40,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![shared.clone()],
            parameters: HashMap::from([
                ("backend".to_owned(), "object".to_owned()),
                ("endpoint".to_owned(), endpoint.clone()),
                ("region".to_owned(), g.region.clone()),
            ]),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cl.controller.log_tail(40)));
    assert!(
        v.accessible_topology.is_empty(),
        "an object volume is reachable from every node: {:?}",
        v.accessible_topology
    );
    assert_eq!(v.capacity_bytes, 1 << 40);
    let bucket = v.volume_context["stowage.csi.dev/bucket"].clone();

    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(shared.clone()),
        ..Default::default()
    };
    let e =
        cl.c.controller
            .controller_publish_volume(publish("n9"))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut mounted = Vec::new();
    for i in [1, 2] {
        let ctx =
            cl.c.controller
                .controller_publish_volume(publish(&node_id(i)))
                .await
                .unwrap_or_else(|e| panic!("publish to n{i}: {e:?}"))
                .into_inner()
                .publish_context;
        let mut node = cl.node(i).await;
        let staging = cl.root.join(format!("stage-n{i}"));
        let target = cl.root.join(format!("pod-n{i}"));
        std::fs::create_dir(&staging).unwrap();
        node.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(shared.clone()),
                secrets: secrets.clone(),
                volume_context: v.volume_context.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("stage on n{i}: {e:?}\n{}", cl.nodes[i - 1].log_tail(40)));
        node.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: ctx,
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(shared.clone()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("publish on n{i}: {e:?}"));
        mounted.push((node, staging, target));
    }
    let data = pattern(12, 2 << 20);
    std::fs::write(mounted[0].2.join("from-n1"), &data).unwrap();
    assert!(
        std::fs::read(mounted[1].2.join("from-n1")).unwrap() == data,
        "n2 reads what n1 wrote"
    );
    std::fs::write(mounted[1].2.join("from-n2"), b"back from n2").unwrap();
    assert_eq!(
        std::fs::read(mounted[0].2.join("from-n2")).unwrap(),
        b"back from n2"
    );

    for (i, (mut node, staging, target)) in mounted.into_iter().enumerate() {
        node.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
        node.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
        cl.c.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: node_id(i + 1),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(
        common::s3fs::mounts_under(&cl.root).is_empty(),
        "unstage left s3fs mounts"
    );
    cl.c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets,
        })
        .await
        .unwrap();
    let left = g.admin(&["bucket", "list"]);
    assert!(
        !left.contains(&bucket),
        "bucket {bucket} outlived its volume:\n{left}"
    );
}

/// GET `path` from the controller's metrics address, from inside its
/// namespace: the status line and the body.
fn controller_http(cl: &Cluster, path: &str) -> (String, String) {
    cl.http_get(0, METRICS_PORT, path)
}

/// The routing controller serves `/healthz` and `/metrics` on
/// `--metrics-address`: its CSI calls by method and code, and each node's
/// freshness, cordon and pool space as the registry sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_serves_metrics_of_its_calls_and_nodes() {
    let mut cl = Cluster::start().await;
    let (status, body) = controller_http(&cl, "/healthz");
    assert!(status.contains(" 200"), "{status}\n{body}");
    let v = cl.create(block("m1", on(&["n2"], &["n2"]))).await.unwrap();
    assert!(cl.client(&["node", "cordon", "n3"]).status.success());
    let (status, body) = controller_http(&cl, "/metrics");
    assert!(status.contains(" 200"), "{status}\n{body}");
    let line = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
            .to_owned()
    };
    for i in 1..=NODES {
        assert!(
            line(&format!("stowage_cluster_node_fresh{{node=\"n{i}\"}}")).ends_with(" 1"),
            "{body}"
        );
        let free: u64 = line(&format!(
            "stowage_cluster_node_pool_free_bytes{{node=\"n{i}\"}}"
        ))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
        assert!(free > 0, "{body}");
    }
    assert!(line("stowage_cluster_node_cordoned{node=\"n3\"}").ends_with(" 1"));
    assert!(line("stowage_cluster_node_cordoned{node=\"n1\"}").ends_with(" 0"));
    let created = body
        .lines()
        .find(|l| {
            l.starts_with("stowage_rpc_requests_total{")
                && l.contains("method=\"CreateVolume\"")
                && l.contains("code=\"OK\"")
        })
        .unwrap_or_else(|| panic!("no CreateVolume OK series in\n{body}"));
    assert!(created.ends_with(" 1"), "{created}");
    cl.delete(&v.volume_id).await.unwrap();
}
