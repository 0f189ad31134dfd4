//! The Garage harness (`common::garage`) tested on its own: a single node
//! and a three-node cluster come up healthy with a key that can create
//! buckets, extra keys get exactly the rights promised, a killed node
//! restarts, nothing the harness started outlives it, even when the test
//! panics, and an object put through stowage's S3 layer lands in Garage.

#![allow(clippy::disallowed_methods)]

mod common;

use std::path::PathBuf;

use common::garage::{Garage, REGION};

/// True once `pid` is gone or a zombie.
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn key_info(g: &Garage, id: &str) -> serde_json::Value {
    g.json_api("GetKeyInfo", serde_json::json!({ "id": id }))
}

#[test]
fn single_node_is_healthy_with_a_key_that_owns_its_bucket() {
    let g = Garage::start();
    assert_eq!(g.region, REGION);
    assert!(
        g.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        g.endpoint
    );
    let status = g.admin(&["status"]);
    assert!(status.contains("HEALTHY NODES"), "{status}");
    assert!(
        status.contains(&format!("127.0.0.1:{}", g.nodes[0].rpc_port)),
        "{status}"
    );
    let buckets = g.admin(&["bucket", "list"]);
    assert!(buckets.contains(&g.bucket), "{buckets}");

    let info = key_info(&g, &g.key.access_key_id);
    assert_eq!(info["permissions"]["createBucket"], true, "{info}");
    let owned: Vec<&serde_json::Value> = info["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["permissions"]["owner"] == true)
        .collect();
    assert_eq!(owned.len(), 1, "{info}");
    assert!(owned[0]["globalAliases"].to_string().contains(&g.bucket));
    // The secret is in the server's environment, never on its command line.
    let pid = g.pids()[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains(&g.key.secret_access_key), "{cmdline}");
    assert!(!format!("{g:?}").contains(&g.key.secret_access_key));
}

#[test]
fn extra_keys_get_exactly_the_rights_promised() {
    let g = Garage::start();
    let none = g.key_without_rights();
    let info = key_info(&g, &none.access_key_id);
    assert_eq!(info["permissions"]["createBucket"], false, "{info}");
    assert_eq!(info["buckets"].as_array().unwrap().len(), 0, "{info}");

    let other = g.bucket_of_other_key("taken-by-other");
    let info = key_info(&g, &other.access_key_id);
    assert_eq!(info["permissions"]["createBucket"], false, "{info}");
    let buckets = info["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 1, "{info}");
    assert_eq!(buckets[0]["permissions"]["owner"], true, "{info}");
    // The harness key has no access to it.
    let mine = key_info(&g, &g.key.access_key_id);
    assert!(
        !mine["buckets"].to_string().contains("taken-by-other"),
        "{mine}"
    );
}

#[test]
fn three_node_cluster_survives_a_kill9_and_restarts_the_node() {
    let mut g = Garage::cluster(3);
    let health = g.health();
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["storageNodes"], 3, "{health}");
    assert_eq!(health["storageNodesUp"], 3, "{health}");
    let ports: std::collections::BTreeSet<u16> = g
        .nodes
        .iter()
        .flat_map(|n| [n.s3_port, n.rpc_port])
        .collect();
    assert_eq!(ports.len(), 6, "every node has its own ports");

    let victim = g.nodes[2].pid().unwrap();
    g.kill9(2);
    assert!(dead(victim));
    assert!(g.nodes[2].pid().is_none());
    // Node 0 sees the loss (bounded wait: failure detection takes a moment).
    let start = std::time::Instant::now();
    loop {
        let h = g.health();
        if h["storageNodesUp"] == 2 {
            assert_eq!(h["status"], "degraded", "{h}");
            break;
        }
        assert!(
            start.elapsed() < common::garage::READY_LIMIT,
            "node 0 never saw node 2 down: {h}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    g.restart(2);
    let again = g.nodes[2].pid().unwrap();
    assert_ne!(again, victim);
    let health = g.health();
    assert_eq!(health["storageNodesUp"], 3, "{health}");
}

#[test]
fn drop_stops_every_process_and_removes_the_temp_dir() {
    let g = Garage::cluster(2);
    let pids = g.pids();
    let root: PathBuf = g.root.clone();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| !dead(p)));
    assert!(root.is_dir());
    drop(g);
    for p in pids {
        assert!(dead(p), "garage pid {p} outlived its harness");
    }
    assert!(!root.exists(), "{} left behind", root.display());
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let g = Garage::start();
        tx.send((g.pids(), g.root.clone())).unwrap();
        panic!("test failure while garage runs");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let (pids, root) = rx.recv().unwrap();
    assert_eq!(pids.len(), 1);
    for p in pids {
        assert!(dead(p), "garage pid {p} outlived a panicking test");
    }
    assert!(!root.exists(), "{} left behind", root.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_and_get_through_the_stowage_layer() {
    use stowage::backend::object::s3::{Credentials, S3Client, S3Config};
    let g = Garage::start();
    let c = S3Client::new(
        &S3Config {
            endpoint: g.endpoint.clone(),
            region: g.region.clone(),
        },
        Credentials {
            access_key_id: g.key.access_key_id.clone(),
            secret_access_key: g.key.secret_access_key.clone(),
        },
    )
    .unwrap();
    let data = common::pattern(3, 300_000);
    c.put_object(&g.bucket, "harness/probe", data.clone())
        .await
        .unwrap();
    assert_eq!(
        c.get_object(&g.bucket, "harness/probe").await.unwrap(),
        Some(data)
    );
    // The object is really in Garage: its bucket counts it.
    let info = g.json_api(
        "GetBucketInfo",
        serde_json::json!({ "globalAlias": g.bucket }),
    );
    assert_eq!(info["objects"], 1, "{info}");
}
