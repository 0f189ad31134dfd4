//! FUSE file data path benchmark: fio on the raw loop device over a FUSE
//! file served by this process (src/os/fuse_file.rs, `LocalFile` handler:
//! the single-copy data path of replicated volumes) against a loop device
//! over a plain file on the same filesystem (how a local block volume is
//! served), measured in the same run. Every job runs on both devices back
//! to back, the order rotating from round to round; the median of the
//! rounds counts.
//!
//! Jobs (all `--direct=1`): sequential read and write of 1 MiB blocks, and
//! random 4 KiB read and write at QD1 and QD32. Both devices are written in
//! full once before any job runs, so no read is of a hole.
//!
//! Run (as root, with fio installed: Debian package `fio`):
//!
//! ```text
//! cargo bench --bench fuse_file -- [--size 256Mi] [--runtime SECS] [--ramp SECS]
//!     [--rounds N] [--seq-iodepth N] [--ioengine libaio|io_uring] [--dir DIR]
//!     [--jobs seq-write,rand-read-qd32,...] [--control] [--json]
//!     [--workers N] [--no-clone-fd] [--max-write BYTES] [--max-background N]
//!     [--parallel-direct-writes] [--buffered-handler]
//! ```
//!
//! `--dir` is where both backing files go (default: a scratch dir under
//! /tmp); it should be the filesystem local block volumes live on. The
//! FUSE flags set [`FuseOptions`] (defaults: 16 workers, clone_fd, 1 MiB
//! max_write, 64 background requests); `--buffered-handler` opens the
//! backing file without O_DIRECT. `--control` adds a second plain loop
//! device whose ratio shows the run's noise. Targets from issue 14
//! (reported, not asserted): ≥ 85 % of local for sequential I/O, ≥ 50 %
//! for random QD32.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::fio::{Measure, median, spread};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Serialize;
use stowage::os::fuse_file::{FuseLoopDevice, FuseOptions, LocalFile};
use stowage::os::loopdev::LoopDevice;
use support::Args;

const MIB: u64 = 1 << 20;

/// One fio job shape.
#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    /// 0 = the sequential queue depth from the command line.
    iodepth: u32,
    read: bool,
    /// The issue's target for fuse / local bandwidth.
    goal: Option<f64>,
}

const JOBS: [Job; 6] = [
    Job {
        name: "seq-write",
        rw: "write",
        bs: "1M",
        iodepth: 0,
        read: false,
        goal: Some(0.85),
    },
    Job {
        name: "seq-read",
        rw: "read",
        bs: "1M",
        iodepth: 0,
        read: true,
        goal: Some(0.85),
    },
    Job {
        name: "rand-write-qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        read: false,
        goal: None,
    },
    Job {
        name: "rand-read-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        read: true,
        goal: None,
    },
    Job {
        name: "rand-write-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        read: false,
        goal: Some(0.50),
    },
    Job {
        name: "rand-read-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        read: true,
        goal: Some(0.50),
    },
];

#[derive(Debug, Clone, Serialize)]
struct Config {
    ioengine: String,
    runtime_s: u64,
    ramp_s: u64,
    size_bytes: u64,
    seq_iodepth: u32,
    rounds: usize,
    fuse: String,
    handler_direct_io: bool,
}

/// A block device fio runs on.
#[derive(Debug, Clone)]
struct Target {
    label: &'static str,
    device: PathBuf,
}

/// Runs fio with `args` (JSON output to a temp file) and parses the JSON.
fn fio(args: &[String]) -> Result<serde_json::Value, String> {
    let out = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let res = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .arg(format!("--output={}", out.path().display()))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run fio: {e}"))?;
    if !res.status.success() {
        return Err(format!(
            "fio {} failed ({}): {}{}",
            args.join(" "),
            res.status,
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        ));
    }
    let text = std::fs::read_to_string(out.path()).map_err(|e| e.to_string())?;
    let start = text
        .find('{')
        .ok_or_else(|| format!("no JSON from fio: {text}"))?;
    serde_json::from_str(&text[start..]).map_err(|e| format!("parse fio JSON: {e}: {text}"))
}

fn common_args(cfg: &Config, t: &Target) -> Vec<String> {
    vec![
        format!("--filename={}", t.device.display()),
        format!("--size={}", cfg.size_bytes),
        format!("--ioengine={}", cfg.ioengine),
        "--direct=1".into(),
        "--numjobs=1".into(),
        "--randrepeat=0".into(),
        "--norandommap".into(),
    ]
}

/// Writes the whole device once so that later reads are of written data.
fn prefill(cfg: &Config, t: &Target) -> Result<(), String> {
    let mut args = common_args(cfg, t);
    args.extend([
        "--name=prefill".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        "--end_fsync=1".into(),
    ]);
    fio(&args).map(drop)
}

fn run_job(cfg: &Config, job: &Job, t: &Target) -> Result<Measure, String> {
    let iodepth = if job.iodepth == 0 {
        cfg.seq_iodepth
    } else {
        job.iodepth
    };
    let mut args = common_args(cfg, t);
    args.extend([
        format!("--name={}", job.name),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={iodepth}"),
        "--time_based".into(),
        format!("--runtime={}", cfg.runtime_s),
        format!("--ramp_time={}", cfg.ramp_s),
    ]);
    let v = fio(&args)?;
    Measure::from_fio(&v, job.read)
        .ok_or_else(|| format!("fio {} on {}: no I/O measured", job.name, t.label))
}

#[derive(Debug, Serialize)]
struct Row {
    target: &'static str,
    #[serde(flatten)]
    measure: Measure,
    /// Bandwidth / the local device's bandwidth.
    ratio: f64,
    spread: f64,
}

#[derive(Debug, Serialize)]
struct JobReport {
    job: &'static str,
    iodepth: u32,
    goal: Option<f64>,
    rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct Report {
    config: Config,
    setup: BTreeMap<String, String>,
    jobs: Vec<JobReport>,
}

fn measure(cfg: &Config, targets: &[Target], jobs: &[Job]) -> Result<Vec<JobReport>, String> {
    for t in targets {
        eprintln!("prefill {} ({} MiB)", t.label, cfg.size_bytes / MIB);
        prefill(cfg, t)?;
    }
    let mut out = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let mut runs: HashMap<&str, Vec<Measure>> = HashMap::new();
        for round in 0..cfg.rounds {
            // Rotate so that no device always runs first.
            for k in 0..targets.len() {
                let t = &targets[(i + round + k) % targets.len()];
                eprintln!("job {} round {}: {}", job.name, round + 1, t.label);
                runs.entry(t.label).or_default().push(run_job(cfg, job, t)?);
            }
        }
        let base = median(&runs["local"]).bw_kib_s;
        let rows = targets
            .iter()
            .map(|t| {
                let r = &runs[t.label];
                let m = median(r);
                Row {
                    target: t.label,
                    measure: m,
                    ratio: m.bw_kib_s / base,
                    spread: spread(r),
                }
            })
            .collect();
        out.push(JobReport {
            job: job.name,
            iodepth: if job.iodepth == 0 {
                cfg.seq_iodepth
            } else {
                job.iodepth
            },
            goal: job.goal,
            rows,
        });
    }
    Ok(out)
}

fn sysfs(dev: &LoopDevice, attr: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/loop{}/{attr}", dev.number()))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn describe(dev: &LoopDevice) -> String {
    format!(
        "{} dio={} lbs={} max_sectors_kb={} backing={}",
        dev.path().display(),
        sysfs(dev, "loop/dio"),
        sysfs(dev, "queue/logical_block_size"),
        sysfs(dev, "queue/max_sectors_kb"),
        dev.backing_file()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into())
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn print_report(r: &Report) {
    let c = &r.config;
    println!(
        "fio {} direct=1, {} s per job after {} s ramp, {} MiB devices, median of {} round(s)",
        c.ioengine,
        c.runtime_s,
        c.ramp_s,
        c.size_bytes / MIB,
        c.rounds
    );
    println!(
        "  options   {} handler O_DIRECT={}",
        c.fuse, c.handler_direct_io
    );
    for (k, v) in &r.setup {
        println!("  {k:<9} {v}");
    }
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    for j in &r.jobs {
        println!();
        println!("{} (QD{})", j.job, j.iodepth);
        println!(
            "{:<8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
            "target", "MiB/s", "IOPS", "p50 µs", "p99 µs", "ratio", "spread"
        );
        for row in &j.rows {
            let m = &row.measure;
            println!(
                "{:<8} {:>9.1} {:>9.0} {:>9.1} {:>9.1} {:>7} {:>7}",
                row.target,
                m.bw_kib_s / 1024.0,
                m.iops,
                m.clat_p50_us,
                m.clat_p99_us,
                pct(row.ratio),
                pct(row.spread)
            );
        }
    }
    println!();
    println!("fuse / local bandwidth");
    for j in &r.jobs {
        let Some(fuse) = j.rows.iter().find(|r| r.target == "fuse") else {
            continue;
        };
        let goal = match j.goal {
            Some(g) if fuse.ratio >= g => format!("goal ≥{:.0}% ok", g * 100.0),
            Some(g) => format!("goal ≥{:.0}% MISSED", g * 100.0),
            None => String::new(),
        };
        let control = j
            .rows
            .iter()
            .find(|r| r.target == "control")
            .map(|c| format!("  (control {})", pct(c.ratio)))
            .unwrap_or_default();
        println!("  {:<16} {:>7}  {goal}{control}", j.job, pct(fuse.ratio));
    }
}

fn fio_installed() -> bool {
    Command::new("fio")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    let args = Args::from_env();
    if !fio_installed() {
        eprintln!(
            "fuse_file: fio not found: install the fio package (Debian: apt-get install fio)"
        );
        std::process::exit(2);
    }
    let num = |flag: &str, default: u64| {
        args.value(flag)
            .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{flag} N")))
            .unwrap_or(default)
    };
    let size = args
        .value("--size")
        .map(|s| support::parse_size(&s) as u64)
        .unwrap_or(256 * MIB);
    let size = size.div_ceil(MIB).max(16) * MIB;
    let defaults = FuseOptions::default();
    let fuse_opts = FuseOptions {
        workers: num("--workers", defaults.workers as u64) as usize,
        clone_fd: !args.flag("--no-clone-fd"),
        max_write: num("--max-write", u64::from(defaults.max_write)) as u32,
        max_background: num("--max-background", u64::from(defaults.max_background)) as u16,
        parallel_direct_writes: args.flag("--parallel-direct-writes"),
    };
    let jobs: Vec<Job> = match args.value("--jobs") {
        Some(list) => {
            let names: Vec<&str> = list.split(',').collect();
            if let Some(bad) = names.iter().find(|n| !JOBS.iter().any(|j| j.name == **n)) {
                eprintln!("fuse_file: unknown job {bad:?}");
                std::process::exit(2);
            }
            JOBS.into_iter()
                .filter(|j| names.contains(&j.name))
                .collect()
        }
        None => JOBS.to_vec(),
    };
    let scratch = common::Scratch::new("bench-fuse");
    let dir = args
        .value("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.root.clone());
    let work = dir.join(format!("fuse-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("create the work dir");
    let code = run(&args, size, fuse_opts, &jobs, &work);
    let _ = std::fs::remove_dir_all(&work);
    drop(scratch);
    std::process::exit(code);
}

/// Sets the devices up, measures, tears down (guards, even on failure).
fn run(args: &Args, size: u64, fuse_opts: FuseOptions, jobs: &[Job], work: &Path) -> i32 {
    let make_file = |name: &str| {
        let p = work.join(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        p
    };
    struct Detach(LoopDevice);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = self.0.detach_settled();
        }
    }
    let local = Detach(LoopDevice::attach(&make_file("local.img"), false).expect("attach local"));
    let control = args.flag("--control").then(|| {
        Detach(LoopDevice::attach(&make_file("control.img"), false).expect("attach control"))
    });
    let backing = make_file("fuse-backing.img");
    let handler = Arc::new(
        LocalFile::open_with(&backing, !args.flag("--buffered-handler"))
            .expect("open the backing file"),
    );
    let handler_direct_io = handler.direct_io();
    let fuse = FuseLoopDevice::attach(&work.join("fuse"), size, handler, &fuse_opts)
        .expect("mount the FUSE file and attach its loop device");

    let cfg = Config {
        ioengine: args.value("--ioengine").unwrap_or_else(|| "libaio".into()),
        runtime_s: args
            .value("--runtime")
            .map_or(10, |v| v.parse().expect("--runtime SECS")),
        ramp_s: args
            .value("--ramp")
            .map_or(1, |v| v.parse().expect("--ramp SECS")),
        size_bytes: size,
        seq_iodepth: args
            .value("--seq-iodepth")
            .map_or(8, |v| v.parse().expect("--seq-iodepth N")),
        rounds: args
            .value("--rounds")
            .map_or(3, |v| v.parse::<usize>().expect("--rounds N"))
            .max(1),
        fuse: format!(
            "workers={} clone_fd={} max_write={} max_background={} parallel_direct_writes={}",
            fuse_opts.workers,
            fuse_opts.clone_fd,
            fuse_opts.max_write,
            fuse_opts.max_background,
            fuse_opts.parallel_direct_writes
        ),
        handler_direct_io,
    };
    let mut setup = BTreeMap::new();
    setup.insert("local".to_owned(), describe(&local.0));
    setup.insert("fuse".to_owned(), describe(fuse.device()));
    let mut targets = vec![
        Target {
            label: "local",
            device: local.0.path(),
        },
        Target {
            label: "fuse",
            device: fuse.device().path(),
        },
    ];
    if let Some(c) = &control {
        setup.insert("control".to_owned(), describe(&c.0));
        targets.push(Target {
            label: "control",
            device: c.0.path(),
        });
    }
    let load_start = loadavg();
    let result = measure(&cfg, &targets, jobs);
    setup.insert(
        "load".to_owned(),
        format!(
            "1-min loadavg {load_start} at the start, {} at the end ({} CPUs)",
            loadavg(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    );
    let closed = fuse.close();
    drop(control);
    drop(local);
    let jobs = match result {
        Ok(j) => j,
        Err(e) => {
            eprintln!("fuse_file: {e}");
            return 1;
        }
    };
    let report = Report {
        config: cfg,
        setup,
        jobs,
    };
    if args.flag("--json") {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print_report(&report);
    }
    if let Err(e) = closed {
        eprintln!("fuse_file: tearing the FUSE device down: {e}");
        return 1;
    }
    0
}
