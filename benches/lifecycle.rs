//! Lifecycle benchmark: the median time of a full CreateVolume → NodeStage →
//! NodePublish → NodeUnpublish → NodeUnstage → DeleteVolume cycle for dir,
//! block+ext4 and raw block volumes against a real `stowage serve` on a
//! loop-mounted xfs pool, beside a baseline measured in the same run (the
//! bare syscalls of a bind mount + unmount), and the server's idle RSS.
//!
//! Run: `cargo bench --bench lifecycle -- [--cycles N]` (as root).

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const RPCS: [&str; 6] = [
    "create",
    "stage",
    "publish",
    "unpublish",
    "unstage",
    "delete",
];

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The floor: bind-mount a directory onto another and unmount it.
fn baseline(env: &Env, n: usize) -> Duration {
    let src = env.scratch.root.join("bl-src");
    let dst = env.scratch.root.join("bl-dst");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        stowage::os::mount::bind(&src, &dst).unwrap();
        stowage::os::mount::unmount(&dst).unwrap();
        t.push(s.elapsed());
    }
    median(&mut t)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn cycles(env: &mut Env, kind: &str, n: usize) -> (Vec<Duration>, Vec<Vec<Duration>>) {
    let mut full = Vec::with_capacity(n);
    let mut per: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); RPCS.len()];
    for i in 0..n {
        let staging = env.staging_dir(&format!("{kind}-{i}"));
        let target = env.target_path(&format!("{kind}-{i}"));
        let start = Instant::now();
        let mut lap = Instant::now();
        let mut mark = |k: usize, per: &mut Vec<Vec<Duration>>| {
            per[k].push(lap.elapsed());
            lap = Instant::now();
        };
        let size = if kind == "dir" { 0 } else { 64 * MIB };
        let v = env.create(&format!("{kind}-{i}"), kind, size).await;
        mark(0, &mut per);
        env.stage(&v.volume_id, kind, &staging).await.unwrap();
        mark(1, &mut per);
        env.publish(&v.volume_id, kind, &staging, &target, false)
            .await
            .unwrap();
        mark(2, &mut per);
        env.unpublish(&v.volume_id, &target).await.unwrap();
        mark(3, &mut per);
        env.unstage(&v.volume_id, &staging).await.unwrap();
        mark(4, &mut per);
        env.delete(&v.volume_id).await.unwrap();
        mark(5, &mut per);
        full.push(start.elapsed());
    }
    (full, per)
}

fn main() {
    let mut n = 30usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--cycles") {
        n = args[i + 1].parse().expect("--cycles N");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut env = Env::new("xfs").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss_kib(env.server.pid());
        let base = baseline(&env, n.max(20));
        println!(
            "pool: xfs on a loop device; {n} cycles per kind; baseline = bind+umount syscalls"
        );
        println!("baseline median: {:.3} ms", ms(base));
        println!(
            "{:<6} {:>9} {:>7} | {}",
            "kind",
            "cycle ms",
            "x base",
            RPCS.map(|r| format!("{r:>9}")).join(" ")
        );
        for kind in ["dir", "ext4", "raw"] {
            let (mut full, mut per) = cycles(&mut env, kind, n).await;
            let m = median(&mut full);
            let cols: Vec<String> = per
                .iter_mut()
                .map(|v| format!("{:>9.3}", ms(median(v))))
                .collect();
            println!(
                "{kind:<6} {:>9.3} {:>7.1} | {}",
                ms(m),
                m.as_secs_f64() / base.as_secs_f64(),
                cols.join(" ")
            );
        }
        println!("idle RSS of stowage serve: {:.1} MiB", idle as f64 / 1024.0);
    });
}
