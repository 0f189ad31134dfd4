//! The S3 layer of object volumes (`backend::object::s3`) against a real
//! Garage server: bucket creation is idempotent and tells our buckets from
//! other accounts', credentials and reachability errors are classified,
//! prefix deletes are paginated and bounded by the prefix, and server-side
//! prefix copies are exact, multipart above the threshold, cancellable
//! and resumable, also with one node of a three-node cluster down.

#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::garage::{Garage, S3Key};
use common::pattern;
use stowage::backend::object::s3::{
    BucketCreated, CopyOptions, CopyProgress, Credentials, S3Client, S3Config, S3ErrorKind,
};

/// A hang detector for calls that must fail fast, never a timing assertion.
const HANG: Duration = Duration::from_secs(120);

fn client_at(endpoint: &str, key: &S3Key) -> S3Client {
    S3Client::new(
        &S3Config {
            endpoint: endpoint.to_owned(),
            region: "garage".into(),
        },
        Credentials {
            access_key_id: key.access_key_id.clone(),
            secret_access_key: key.secret_access_key.clone(),
        },
    )
    .expect("client")
}

fn client(g: &Garage) -> S3Client {
    client_at(&g.endpoint, &g.key)
}

/// Puts `objects` (key → bytes) with up to 32 requests in flight.
async fn put_all(c: &S3Client, bucket: &str, objects: &BTreeMap<String, Vec<u8>>) {
    let mut set = tokio::task::JoinSet::new();
    for (k, v) in objects {
        while set.len() >= 32 {
            set.join_next().await.unwrap().unwrap();
        }
        let (c, b, k, v) = (c.clone(), bucket.to_owned(), k.clone(), v.clone());
        set.spawn(async move {
            c.put_object(&b, &k, v)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Every object under `prefix`, read back, keyed relative to it.
async fn read_tree(
    c: &S3Client,
    bucket: &str,
    prefix: &str,
    keys: impl Iterator<Item = String>,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for rel in keys {
        let key = format!("{prefix}{rel}");
        if let Some(v) = c.get_object(bucket, &key).await.unwrap() {
            out.insert(rel, v);
        }
    }
    out
}

/// A tree of small objects with awkward keys, an empty one, and `big`
/// objects of 12 MiB + a few bytes (three 5 MiB parts when multipart).
fn tree(n_small: usize, big: usize) -> BTreeMap<String, Vec<u8>> {
    let mut t = BTreeMap::new();
    for i in 0..n_small {
        let key = match i % 4 {
            0 => format!("dir{}/file {i}.txt", i % 7),
            1 => format!("dir{}/sub/ü-{i}+x", i % 3),
            2 => format!("top-{i}"),
            _ => format!("a/b/c/d/{i}%25#?"),
        };
        t.insert(key, pattern(i as u64, (i * 37) % 5000));
    }
    t.insert("empty".into(), Vec::new());
    for b in 0..big {
        t.insert(
            format!("big/{b}.bin"),
            pattern(1000 + b as u64, (12 << 20) + 123 + b),
        );
    }
    t
}

fn small_parts(cancel: Arc<AtomicBool>) -> CopyOptions {
    CopyOptions {
        concurrency: 4,
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        progress: None,
        cancel,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_bucket_is_idempotent_and_another_keys_bucket_already_exists() {
    let g = Garage::start();
    let c = client(&g);
    assert!(!c.bucket_exists("vol-a").await.unwrap());
    assert_eq!(
        c.create_bucket("vol-a").await.unwrap(),
        BucketCreated::Created
    );
    assert_eq!(
        c.create_bucket("vol-a").await.unwrap(),
        BucketCreated::AlreadyOwned
    );
    assert!(c.bucket_exists("vol-a").await.unwrap());
    // Made by the harness, owned by our key.
    assert_eq!(
        c.create_bucket(&g.bucket).await.unwrap(),
        BucketCreated::AlreadyOwned
    );

    g.bucket_of_other_key("taken");
    let err = c.create_bucket("taken").await.unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::AlreadyExists, "{err}");
    assert!(err.message.contains("taken"), "{err}");
    assert!(err.message.contains("BucketAlreadyExists"), "{err}");

    let err = c.create_bucket("Not_Valid").await.unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::InvalidArgument, "{err}");

    // DeleteBucket: refused while not empty, then idempotent.
    c.put_object("vol-a", "k", b"v".to_vec()).await.unwrap();
    let err = c.delete_bucket("vol-a").await.unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::NotEmpty, "{err}");
    assert_eq!(c.delete_prefix("vol-a", "").await.unwrap(), 1);
    c.delete_bucket("vol-a").await.unwrap();
    assert!(!c.bucket_exists("vol-a").await.unwrap());
    c.delete_bucket("vol-a").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_or_missing_rights_are_permission_denied() {
    let g = Garage::start();
    let wrong = S3Key {
        access_key_id: g.key.access_key_id.clone(),
        secret_access_key: "0".repeat(64),
    };
    let c = client_at(&g.endpoint, &wrong);
    for err in [
        c.put_object(&g.bucket, "k", b"v".to_vec())
            .await
            .unwrap_err(),
        c.create_bucket("new-bucket").await.unwrap_err(),
        c.get_object(&g.bucket, "k").await.unwrap_err(),
    ] {
        assert_eq!(err.kind, S3ErrorKind::PermissionDenied, "{err}");
        assert!(!err.message.contains(&g.key.secret_access_key), "{err}");
        assert!(err.message.contains(&g.bucket) || err.message.contains("new-bucket"));
    }

    let none = g.key_without_rights();
    let c = client_at(&g.endpoint, &none);
    let err = c.create_bucket("new-bucket").await.unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::PermissionDenied, "{err}");
    let err = c
        .put_object(&g.bucket, "k", b"v".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::PermissionDenied, "{err}");
    assert!(err.message.contains("AccessDenied"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_unavailable_and_does_not_hang() {
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = S3Key {
        access_key_id: "GK0123456789abcdef01234567".into(),
        secret_access_key: "f".repeat(64),
    };
    let c = client_at(&format!("http://127.0.0.1:{port}"), &key);
    let calls = async {
        vec![
            c.bucket_exists("some-bucket").await.unwrap_err(),
            c.put_object("some-bucket", "k", vec![1]).await.unwrap_err(),
            c.delete_prefix("some-bucket", "p/").await.unwrap_err(),
        ]
    };
    let errs = tokio::time::timeout(HANG, calls)
        .await
        .expect("calls to a closed port hung");
    for err in errs {
        assert_eq!(err.kind, S3ErrorKind::Unavailable, "{err}");
        assert!(err.message.contains("some-bucket"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_objects_round_trip_and_missing_ones_are_none() {
    let g = Garage::start();
    let c = client(&g);
    let data = pattern(7, 100_000);
    c.put_object(&g.bucket, "meta/volume.json", data.clone())
        .await
        .unwrap();
    assert_eq!(
        c.get_object(&g.bucket, "meta/volume.json").await.unwrap(),
        Some(data)
    );
    c.put_object(&g.bucket, "meta/volume.json", b"v2".to_vec())
        .await
        .unwrap();
    assert_eq!(
        c.get_object(&g.bucket, "meta/volume.json").await.unwrap(),
        Some(b"v2".to_vec())
    );
    assert_eq!(c.get_object(&g.bucket, "meta/nothing").await.unwrap(), None);
    let err = c.get_object("no-such-bucket", "k").await.unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::NotFound, "{err}");
    let err = c.put_object(&g.bucket, "", vec![]).await.unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_deletes_2500_objects_and_nothing_outside_the_prefix() {
    let g = Garage::start();
    let c = client(&g);
    let b = &g.bucket;
    let mut objects: BTreeMap<String, Vec<u8>> = (0..2500)
        .map(|i| {
            (
                format!("vol/{:02}/{i}", i % 13),
                vec![(i % 251) as u8; i % 64],
            )
        })
        .collect();
    let bytes: u64 = objects.values().map(|v| v.len() as u64).sum();
    // Neighbours that share the prefix's spelling but not the prefix.
    let outside = ["vol", "vol2/a", "volume/x", "other/vol/y"];
    for k in outside {
        objects.insert(k.into(), b"keep".to_vec());
    }
    put_all(&c, b, &objects).await;
    assert_eq!(c.usage(b, "vol/").await.unwrap(), (2500, bytes));

    assert_eq!(c.delete_prefix(b, "vol/").await.unwrap(), 2500);
    assert_eq!(c.usage(b, "vol/").await.unwrap(), (0, 0));
    for k in outside {
        assert_eq!(
            c.get_object(b, k).await.unwrap(),
            Some(b"keep".to_vec()),
            "{k}"
        );
    }
    // Idempotent.
    assert_eq!(c.delete_prefix(b, "vol/").await.unwrap(), 0);
    assert_eq!(c.delete_prefix("no-such-bucket", "vol/").await.unwrap(), 0);
    // Invalid prefixes are refused before any request.
    for bad in ["vol", "/vol/", "../", "a/../b/"] {
        let err = c.delete_prefix(b, bad).await.unwrap_err();
        assert_eq!(err.kind, S3ErrorKind::InvalidArgument, "{bad:?}: {err}");
    }
    // "" is the whole bucket.
    assert_eq!(c.delete_prefix(b, "").await.unwrap(), outside.len() as u64);
    assert_eq!(c.usage(b, "").await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_prefix_copies_a_tree_exactly_with_multipart_above_the_threshold() {
    let g = Garage::start();
    let c = client(&g);
    let src = tree(60, 1);
    let src_bytes: u64 = src.values().map(|v| v.len() as u64).sum();
    let prefixed = src
        .iter()
        .map(|(k, v)| (format!("snap/{k}"), v.clone()))
        .collect();
    put_all(&c, &g.bucket, &prefixed).await;
    c.create_bucket("clone-target").await.unwrap();

    let calls = Arc::new(std::sync::Mutex::new(Vec::<CopyProgress>::new()));
    let seen = calls.clone();
    let mut opts = small_parts(Arc::new(AtomicBool::new(false)));
    opts.progress = Some(Arc::new(move |p| seen.lock().unwrap().push(p)));
    let stats = c
        .copy_prefix(&g.bucket, "snap/", "clone-target", "vol/", &opts)
        .await
        .unwrap();
    assert_eq!(stats.copied, src.len() as u64);
    assert_eq!(stats.skipped, 0);
    assert_eq!(stats.multipart, 1);
    assert_eq!(stats.bytes_copied, src_bytes);

    let copied = read_tree(&c, "clone-target", "vol/", src.keys().cloned()).await;
    assert_eq!(copied.len(), src.len());
    for (k, v) in &src {
        assert!(copied[k] == *v, "{k}: content differs");
    }
    assert_eq!(
        c.usage("clone-target", "vol/").await.unwrap(),
        (src.len() as u64, src_bytes)
    );

    let calls = calls.lock().unwrap().clone();
    let last = *calls.last().unwrap();
    assert_eq!(last.objects_done, src.len() as u64);
    assert_eq!(last.objects_total, src.len() as u64);
    assert_eq!(last.bytes_done, src_bytes);
    assert_eq!(last.bytes_total, src_bytes);
    assert!(
        calls
            .windows(2)
            .all(|w| w[0].objects_done <= w[1].objects_done && w[0].bytes_done <= w[1].bytes_done),
        "progress went backwards: {calls:?}"
    );

    // Everything is there: a second run copies nothing.
    let again = c
        .copy_prefix(&g.bucket, "snap/", "clone-target", "vol/", &opts)
        .await
        .unwrap();
    assert_eq!((again.copied, again.skipped), (0, src.len() as u64));

    // A changed source object (other size) is copied again.
    c.put_object(&g.bucket, "snap/empty", b"now filled".to_vec())
        .await
        .unwrap();
    let third = c
        .copy_prefix(&g.bucket, "snap/", "clone-target", "vol/", &opts)
        .await
        .unwrap();
    assert_eq!((third.copied, third.skipped), (1, src.len() as u64 - 1));
    assert_eq!(
        c.get_object("clone-target", "vol/empty").await.unwrap(),
        Some(b"now filled".to_vec())
    );

    // Overlapping prefixes in one bucket are refused.
    let err = c
        .copy_prefix(&g.bucket, "snap/", &g.bucket, "snap/sub/", &opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::InvalidArgument, "{err}");
    assert_eq!(c.incomplete_uploads("clone-target", "").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_prefix_stops_when_cancelled_and_resumes_where_it_stopped() {
    let g = Garage::start();
    let c = client(&g);
    let src = tree(300, 2);
    let prefixed = src
        .iter()
        .map(|(k, v)| (format!("snap/{k}"), v.clone()))
        .collect();
    put_all(&c, &g.bucket, &prefixed).await;

    // Cancel from the progress callback once 40 objects are done.
    let cancel = Arc::new(AtomicBool::new(false));
    let done_at_cancel = Arc::new(AtomicU64::new(0));
    let mut opts = small_parts(cancel.clone());
    opts.concurrency = 2;
    let (flag, at) = (cancel.clone(), done_at_cancel.clone());
    opts.progress = Some(Arc::new(move |p: CopyProgress| {
        if p.objects_done >= 40 && !flag.swap(true, Ordering::SeqCst) {
            at.store(p.objects_done, Ordering::SeqCst);
        }
    }));
    let err = tokio::time::timeout(
        HANG,
        c.copy_prefix(&g.bucket, "snap/", &g.bucket, "clone/", &opts),
    )
    .await
    .expect("a cancelled copy did not return")
    .unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::Cancelled, "{err}");
    assert!(done_at_cancel.load(Ordering::SeqCst) >= 40);
    let (partial, _) = c.usage(&g.bucket, "clone/").await.unwrap();
    assert!(
        partial >= 40 && partial < src.len() as u64,
        "{partial} of {} objects copied before the cancel",
        src.len()
    );
    // A cancelled multipart copy leaves no upload behind.
    assert_eq!(c.incomplete_uploads(&g.bucket, "clone/").await.unwrap(), 0);

    // A set flag stops a new call before it copies anything.
    let err = c
        .copy_prefix(&g.bucket, "snap/", &g.bucket, "clone/", &opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::Cancelled, "{err}");
    assert_eq!(c.usage(&g.bucket, "clone/").await.unwrap().0, partial);

    let resume = small_parts(Arc::new(AtomicBool::new(false)));
    let stats = c
        .copy_prefix(&g.bucket, "snap/", &g.bucket, "clone/", &resume)
        .await
        .unwrap();
    assert_eq!(stats.skipped, partial, "{stats:?}");
    assert_eq!(stats.copied + stats.skipped, src.len() as u64, "{stats:?}");
    let copied = read_tree(&c, &g.bucket, "clone/", src.keys().cloned()).await;
    assert_eq!(copied.len(), src.len());
    for (k, v) in &src {
        assert!(copied[k] == *v, "{k}: content differs after resume");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_aborts_incomplete_multipart_uploads() {
    let g = Garage::start();
    let c = client(&g);
    let big = pattern(5, 12 << 20);
    c.put_object(&g.bucket, "src/big", big.clone())
        .await
        .unwrap();
    // Cancel as soon as the first part is reported: the upload is aborted.
    let cancel = Arc::new(AtomicBool::new(false));
    let mut opts = small_parts(cancel.clone());
    opts.concurrency = 1;
    let flag = cancel.clone();
    opts.progress = Some(Arc::new(move |p: CopyProgress| {
        if p.bytes_done > 0 {
            flag.store(true, Ordering::SeqCst);
        }
    }));
    let err = c
        .copy_prefix(&g.bucket, "src/", &g.bucket, "dst/", &opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind, S3ErrorKind::Cancelled, "{err}");
    assert_eq!(c.incomplete_uploads(&g.bucket, "dst/").await.unwrap(), 0);
    assert_eq!(c.get_object(&g.bucket, "dst/big").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_with_a_node_killed_keeps_put_get_and_copy_working() {
    let mut g = Garage::cluster(3);
    let c = client(&g);
    let before = tree(20, 1);
    let prefixed = before
        .iter()
        .map(|(k, v)| (format!("a/{k}"), v.clone()))
        .collect();
    put_all(&c, &g.bucket, &prefixed).await;

    g.kill9(2);
    // Writes and reads reach a quorum of two.
    c.put_object(&g.bucket, "during/x", b"written with a node down".to_vec())
        .await
        .unwrap();
    assert_eq!(
        c.get_object(&g.bucket, "during/x").await.unwrap(),
        Some(b"written with a node down".to_vec())
    );
    c.create_bucket("made-degraded").await.unwrap();
    let opts = small_parts(Arc::new(AtomicBool::new(false)));
    let stats = c
        .copy_prefix(&g.bucket, "a/", "made-degraded", "b/", &opts)
        .await
        .unwrap();
    assert_eq!(stats.copied, before.len() as u64);
    assert_eq!(stats.multipart, 1);
    let copied = read_tree(&c, "made-degraded", "b/", before.keys().cloned()).await;
    assert_eq!(copied, before);

    g.restart(2);
    // The restarted node serves what was written while it was down.
    let c2 = client_at(&g.endpoint_of(2), &g.key);
    assert_eq!(
        c2.get_object(&g.bucket, "during/x").await.unwrap(),
        Some(b"written with a node down".to_vec())
    );
    // Bucket definitions are replicated to every node and read locally:
    // the restarted node learns the bucket made without it once the tables
    // sync (bounded wait).
    let start = std::time::Instant::now();
    while !c2.bucket_exists("made-degraded").await.unwrap() {
        assert!(
            start.elapsed() < HANG,
            "node 2 never learnt the bucket made while it was down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("node 2 knew the bucket after {:?}", start.elapsed());
    assert_eq!(
        c2.usage("made-degraded", "b/").await.unwrap().0,
        before.len() as u64
    );
}
