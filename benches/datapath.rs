//! Data-path benchmark: fio on (a) a published block volume with ext4, (b) a
//! raw block volume (fio on the published device node) and (c) a dir volume,
//! each beside the same fio job on a plain file in the pool filesystem itself
//! (the baseline), measured in the same run, job by job, so that the ratio
//! volume/baseline is what the driver's data path costs.
//!
//! Jobs (all `--direct=1`, io_uring when the kernel allows it, else libaio):
//! sequential read and write of 1 MiB blocks, and random 4 KiB read and
//! write at QD1 and at QD32. Every file and device is written in full once
//! before any job runs, so no read is of a hole.
//!
//! By default a `stowage serve` is spawned on a loop-mounted xfs pool (the
//! test harness's `Env`); `--endpoint` points the benchmark at any CSI
//! driver instead.
//!
//! Run (as root, with `fio` installed):
//!
//! ```text
//! cargo bench --bench datapath -- [--runtime SECS] [--ramp SECS] [--size 512Mi]
//!     [--seq-iodepth N] [--ioengine io_uring|libaio] [--kinds ext4,raw,dir] [--json]
//!     [--rounds N] [--no-control]
//!     [--endpoint unix:///path.sock --pool-dir DIR [--param K=V]... [--dir-param K=V]...
//!      [--work-dir DIR]]
//! ```
//!
//! `--param` applies to every volume created, `--dir-param` to the dir
//! (mount, no fsType) volume only; against the self-spawned stowage the
//! `backend` parameter defaults to `block` / `dir` per kind. `--pool-dir` is
//! where the baseline file goes: a directory on the filesystem that holds the
//! driver's volumes. A second plain file beside the baseline (the
//! "control", off with `--no-control`) shows the run's noise: on a shared or
//! virtualised disk two identical files differ by 10–30 % in a 5 s run, so
//! judge ratios against it and use `--rounds 3` (the median of three) before
//! acting on one. Targets (reported, not asserted): block ≥ 95 % of the
//! baseline for sequential I/O and ≥ 60 % for QD32 random reads; dir ≥ 98 %.

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::fio::{JOBS, Job, Measure, median, spread};

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;
use stowage::os::loopdev::LoopDevice;
use stowage::os::mountinfo::MountTable;
use support::{Args, Driver, Published, VolumeSpec};

const MIB: u64 = 1 << 20;

/// The volume kinds, in table order.
const KINDS: [&str; 3] = ["ext4", "raw", "dir"];

/// The target ratio volume/baseline for a kind and job, if there is one.
fn goal(kind: &str, job: &str) -> Option<f64> {
    match (kind, job) {
        ("dir", _) => Some(0.98),
        ("ext4" | "raw", "seq-read" | "seq-write") => Some(0.95),
        ("ext4" | "raw", "rand-read-qd32") => Some(0.60),
        _ => None,
    }
}

/// Settings shared by every fio run.
#[derive(Debug, Clone, Serialize)]
struct Config {
    ioengine: String,
    runtime_s: u64,
    ramp_s: u64,
    size_bytes: u64,
    seq_iodepth: u32,
    /// Each job runs this many times on every target; the median counts.
    rounds: usize,
    /// Whether a second file beside the baseline is measured as a control
    /// (its ratio is the run's noise floor).
    control: bool,
}

/// A place fio runs: a file (created by the prefill) or a block device.
#[derive(Debug, Clone)]
struct Target {
    label: String,
    path: PathBuf,
    size: u64,
}

fn fail(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

/// Runs fio with `args` (plus JSON output to a temp file) and returns the
/// parsed JSON.
fn fio(args: &[String]) -> Result<serde_json::Value, String> {
    let out = tempfile::NamedTempFile::new().map_err(fail)?;
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
    let text = std::fs::read_to_string(out.path()).map_err(fail)?;
    // fio may put notes before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| format!("no JSON from fio: {text}"))?;
    serde_json::from_str(&text[start..]).map_err(|e| format!("parse fio JSON: {e}: {text}"))
}

fn common_args(cfg: &Config, t: &Target) -> Vec<String> {
    vec![
        format!("--filename={}", t.path.display()),
        format!("--size={}", t.size),
        format!("--ioengine={}", cfg.ioengine),
        "--direct=1".into(),
        "--numjobs=1".into(),
        "--invalidate=1".into(),
        "--randrepeat=0".into(),
        "--norandommap".into(),
        "--allow_file_create=1".into(),
    ]
}

/// Writes the whole file or device once, sequentially, so every later read
/// hits written blocks (on a sparse image or a fresh file, a read of a hole
/// would cost nothing and flatter the result).
fn prefill(cfg: &Config, t: &Target) -> Result<f64, String> {
    let start = Instant::now();
    let mut args = common_args(cfg, t);
    args.extend([
        "--name=prefill".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        "--end_fsync=1".into(),
    ]);
    fio(&args)?;
    Ok(start.elapsed().as_secs_f64())
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

/// Tries a tiny io_uring job; falls back to libaio when the kernel or fio
/// refuses it (io_uring disabled by sysctl or seccomp, old kernel).
fn pick_ioengine(dir: &Path) -> String {
    let probe = dir.join("ioengine-probe");
    let ok = Command::new("fio")
        .args([
            "--name=probe",
            &format!("--filename={}", probe.display()),
            "--size=1M",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=io_uring",
            "--direct=1",
            "--iodepth=4",
            "--output-format=json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&probe);
    if ok { "io_uring" } else { "libaio" }.to_owned()
}

/// A block device node's loop device, if it is one (major 7).
fn loop_of_rdev(rdev: u64) -> Option<LoopDevice> {
    (nix::sys::stat::major(rdev) == 7)
        .then(|| LoopDevice::from_number(nix::sys::stat::minor(rdev) as u32))
}

fn sysfs(dev: &str, attr: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/{dev}/{attr}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// How a loop device is set up: what the data path goes through.
fn describe_loop(d: &LoopDevice) -> String {
    let name = format!("loop{}", d.number());
    format!(
        "{} dio={} lbs={} pbs={} max_sectors_kb={} nr_requests={} backing={}",
        d.path().display(),
        sysfs(&name, "loop/dio"),
        sysfs(&name, "queue/logical_block_size"),
        sysfs(&name, "queue/physical_block_size"),
        sysfs(&name, "queue/max_sectors_kb"),
        sysfs(&name, "queue/nr_requests"),
        d.backing_file()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "?".into()),
    )
}

/// The mount holding `path` and, when it is on a loop device, that device.
fn describe_path(path: &Path) -> String {
    let table = match MountTable::read() {
        Ok(t) => t,
        Err(e) => return format!("(mount table: {e})"),
    };
    if let Ok(md) = std::fs::metadata(path)
        && md.file_type().is_block_device()
    {
        use std::os::unix::fs::MetadataExt;
        return match loop_of_rdev(md.rdev()) {
            Some(d) => format!("block device: {}", describe_loop(&d)),
            None => format!(
                "block device {}:{}",
                nix::sys::stat::major(md.rdev()),
                nix::sys::stat::minor(md.rdev())
            ),
        };
    }
    let Some(m) = table.containing(path) else {
        return "(no mount)".into();
    };
    let mut s = format!(
        "{} on {} ({}, {})",
        m.source,
        m.mount_point.display(),
        m.fs_type,
        m.super_options
    );
    if let Some(d) = LoopDevice::from_path(Path::new(&m.source)) {
        s.push_str(&format!("; {}", describe_loop(&d)));
    }
    s
}

/// Everything the report needs about one job.
#[derive(Debug, Clone, Serialize)]
struct JobResult {
    job: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    baseline: Measure,
    /// (max − min) / median of the baseline's bandwidth over the rounds.
    baseline_spread: f64,
    /// In `--kinds` order.
    volumes: Vec<VolumeResult>,
}

#[derive(Debug, Clone, Serialize)]
struct VolumeResult {
    kind: String,
    #[serde(flatten)]
    measure: Measure,
    /// volume bandwidth / baseline bandwidth.
    ratio: f64,
    /// (max − min) / median of the bandwidth over the rounds.
    spread: f64,
    goal: Option<f64>,
    met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    driver: String,
    config: Config,
    setup: BTreeMap<String, String>,
    prefill_s: BTreeMap<String, f64>,
    jobs: Vec<JobResult>,
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Prefills every target, then runs each job on the baseline and each
/// volume back to back.
fn measure_all(
    cfg: &Config,
    baseline: &Target,
    volumes: &[(String, Target)],
    report: &mut Report,
) -> Result<(), String> {
    for t in std::iter::once(baseline).chain(volumes.iter().map(|(_, t)| t)) {
        eprintln!("prefill {} ({} MiB)", t.label, t.size / MIB);
        let s = prefill(cfg, t)?;
        report.prefill_s.insert(t.label.clone(), s);
    }
    let load_start = loadavg();
    let all: Vec<(&str, &Target)> = std::iter::once(("baseline", baseline))
        .chain(volumes.iter().map(|(k, t)| (k.as_str(), t)))
        .collect();
    for (i, job) in JOBS.iter().enumerate() {
        // Rotate the order from job to job and round to round so that no
        // target always runs first (right after another job's writes).
        let mut runs: HashMap<&str, Vec<Measure>> = HashMap::new();
        for round in 0..cfg.rounds {
            for k in 0..all.len() {
                let (name, t) = all[(i + round + k) % all.len()];
                eprintln!("job {} round {}: {name}", job.name, round + 1);
                runs.entry(name).or_default().push(run_job(cfg, job, t)?);
            }
        }
        let base = median(&runs["baseline"]);
        let vols = volumes
            .iter()
            .map(|(kind, _)| {
                let v = &runs[kind.as_str()];
                let m = median(v);
                let ratio = m.bw_kib_s / base.bw_kib_s;
                let g = goal(kind, job.name);
                VolumeResult {
                    kind: kind.clone(),
                    measure: m,
                    ratio,
                    spread: spread(v),
                    goal: g,
                    met: g.map(|g| ratio >= g),
                }
            })
            .collect();
        report.jobs.push(JobResult {
            job: job.name,
            rw: job.rw,
            bs: job.bs,
            iodepth: if job.iodepth == 0 {
                cfg.seq_iodepth
            } else {
                job.iodepth
            },
            baseline: base,
            baseline_spread: spread(&runs["baseline"]),
            volumes: vols,
        });
    }
    // Other work on the host (builds, tests) competes with fio and the
    // loop workers for CPU and disk: note it beside the figures.
    report.setup.insert(
        "load".into(),
        format!(
            "1-min loadavg {load_start} at the start, {} at the end (fio itself adds ≈1; {} CPUs)",
            loadavg(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
    );
    Ok(())
}

fn print_tables(r: &Report) {
    let c = &r.config;
    println!(
        "driver: {}; fio {} direct=1, {} s per job after {} s ramp, {} MiB per file/device, \
         median of {} round(s)",
        r.driver,
        c.ioengine,
        c.runtime_s,
        c.ramp_s,
        c.size_bytes / MIB,
        c.rounds
    );
    for (k, v) in &r.setup {
        println!("  {k:<9} {v}");
    }
    if r.setup.values().any(|v| v.contains("dio=0")) {
        println!(
            "  note: a loop device above runs without direct I/O (dio=0): its I/O goes through \
             the page cache of the backing file, so its figures are not a direct-I/O data path"
        );
    }
    let rounds = c.rounds > 1;
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    for j in &r.jobs {
        println!();
        println!("{} ({} {} QD{})", j.job, j.rw, j.bs, j.iodepth);
        println!(
            "{:<9} {:>9} {:>9} {:>9} {:>9} {:>7}{}  goal",
            "target",
            "MiB/s",
            "IOPS",
            "p50 µs",
            "p99 µs",
            "ratio",
            if rounds { "  spread" } else { "" }
        );
        let row = |name: &str, m: &Measure, ratio: &str, spread: f64| {
            format!(
                "{name:<9} {:>9.1} {:>9.0} {:>9.1} {:>9.1} {ratio:>7}{}",
                m.bw_kib_s / 1024.0,
                m.iops,
                m.clat_p50_us,
                m.clat_p99_us,
                if rounds {
                    format!(" {:>7}", pct(spread))
                } else {
                    String::new()
                }
            )
        };
        println!("{}", row("baseline", &j.baseline, "", j.baseline_spread));
        for v in &j.volumes {
            let goal = match (v.goal, v.met) {
                (Some(g), Some(true)) => format!("≥{:.0}% ok", g * 100.0),
                (Some(g), _) => format!("≥{:.0}% MISSED", g * 100.0),
                _ => String::new(),
            };
            println!(
                "{}  {goal}",
                row(&v.kind, &v.measure, &pct(v.ratio), v.spread)
            );
        }
    }
    // The ratios at a glance.
    println!();
    println!("bandwidth / baseline bandwidth (! = below target)");
    print!("{:<16}", "job");
    for v in r
        .jobs
        .first()
        .map(|j| j.volumes.as_slice())
        .unwrap_or_default()
    {
        print!(" {:>8}", v.kind);
    }
    println!();
    for j in &r.jobs {
        print!("{:<16}", j.job);
        for v in &j.volumes {
            let mark = if v.met == Some(false) { "!" } else { " " };
            print!(" {:>7}{mark}", pct(v.ratio));
        }
        println!();
    }
    if r.jobs
        .first()
        .is_some_and(|j| j.volumes.iter().any(|v| v.kind == "control"))
    {
        println!(
            "(control: a second plain file beside the baseline; its distance from 100% is \
             this run's noise)"
        );
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

/// `--flag K=V` pairs.
fn kv(args: &Args, flag: &str) -> HashMap<String, String> {
    args.values(flag)
        .into_iter()
        .filter_map(|s| s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn volume_spec(kind: &str, size: u64, params: &HashMap<String, String>) -> VolumeSpec {
    VolumeSpec {
        block: kind == "raw",
        fs_type: if kind == "ext4" {
            "ext4".into()
        } else {
            String::new()
        },
        size: i64::try_from(size).expect("size fits i64"),
        parameters: params.clone(),
    }
}

/// Provisions in a task so that a failing RPC (support's helpers panic)
/// ends this volume only and the ones already made are still torn down.
async fn provision(d: &Driver, spec: VolumeSpec, name: String, work: PathBuf) -> Option<Published> {
    let mut d = d.clone();
    tokio::spawn(async move { support::provision(&mut d, &spec, &name, &work).await })
        .await
        .ok()
}

async fn teardown(d: &Driver, p: Published) -> bool {
    let mut d = d.clone();
    tokio::spawn(async move { support::teardown(&mut d, &p).await })
        .await
        .is_ok()
}

struct Options {
    cfg: Config,
    kinds: Vec<String>,
    json: bool,
    params: HashMap<String, String>,
    dir_params: HashMap<String, String>,
}

/// Provisions the volumes, measures, tears down. Returns the exit code.
async fn bench(endpoint: &str, pool_dir: &Path, work: &Path, mut o: Options, spawned: bool) -> i32 {
    let d = Driver::discover(endpoint).await;
    let base_dir = pool_dir.join("bench-baseline");
    if let Err(e) = std::fs::create_dir_all(&base_dir) {
        eprintln!("datapath: create {}: {e}", base_dir.display());
        return 1;
    }
    if o.cfg.ioengine.is_empty() {
        o.cfg.ioengine = pick_ioengine(&base_dir);
    }
    let size = o.cfg.size_bytes;
    let baseline = Target {
        label: "baseline".into(),
        path: base_dir.join("fio.dat"),
        size,
    };
    let mut report = Report {
        driver: d.name.clone(),
        config: o.cfg.clone(),
        setup: BTreeMap::new(),
        prefill_s: BTreeMap::new(),
        jobs: Vec::new(),
    };
    report
        .setup
        .insert("baseline".into(), describe_path(&base_dir));

    let mut published: Vec<(String, Published)> = Vec::new();
    let mut targets: Vec<(String, Target)> = Vec::new();
    if o.cfg.control {
        // An A/A control: a second plain file beside the baseline. Its
        // ratio shows how far two identical data paths differ in this run.
        targets.push((
            "control".into(),
            Target {
                label: "control".into(),
                path: base_dir.join("control.dat"),
                size,
            },
        ));
    }
    let mut result = Ok(());
    for kind in &o.kinds {
        let mut params = o.params.clone();
        if kind == "dir" {
            params.extend(o.dir_params.clone());
        }
        if spawned {
            params
                .entry("backend".into())
                .or_insert_with(|| if kind == "dir" { "dir" } else { "block" }.into());
        }
        // Room for the file plus ext4's metadata; a raw device is the file.
        let vsize = if kind == "raw" { size } else { size * 2 };
        eprintln!("provision {kind} volume ({} MiB)", vsize / MIB);
        let Some(p) = provision(
            &d,
            volume_spec(kind, vsize, &params),
            format!("datapath-{kind}"),
            work.to_owned(),
        )
        .await
        else {
            result = Err(format!("provisioning the {kind} volume failed"));
            break;
        };
        let path = if kind == "raw" {
            p.target.clone()
        } else {
            p.target.join("fio.dat")
        };
        if kind == "raw"
            && !std::fs::metadata(&p.target).is_ok_and(|m| m.file_type().is_block_device())
        {
            result = Err(format!(
                "the raw volume's target {} is not a block device",
                p.target.display()
            ));
        }
        report
            .setup
            .insert(kind.clone(), describe_path(&path_for_describe(&path, kind)));
        targets.push((
            kind.clone(),
            Target {
                label: kind.clone(),
                path,
                size,
            },
        ));
        published.push((kind.clone(), p));
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        // Spawned blocking: fio runs take minutes.
        let cfg = o.cfg.clone();
        let b = baseline.clone();
        let t = targets.clone();
        let mut r = report;
        let (res, r) = tokio::task::spawn_blocking(move || {
            let res = measure_all(&cfg, &b, &t, &mut r);
            (res, r)
        })
        .await
        .expect("measurement thread");
        report = r;
        result = res;
    }
    // Teardown, even after a failure.
    let mut torn = true;
    for (kind, p) in published.into_iter().rev() {
        eprintln!("teardown {kind} volume");
        torn &= teardown(&d, p).await;
    }
    let _ = std::fs::remove_dir_all(&base_dir);
    if let Err(e) = result {
        eprintln!("datapath: {e}");
        return 1;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print_tables(&report);
    }
    if !torn {
        eprintln!("datapath: some volumes could not be torn down");
        return 1;
    }
    0
}

/// For a file target, describe its directory (the file may not exist yet).
fn path_for_describe(path: &Path, kind: &str) -> PathBuf {
    if kind == "raw" {
        path.to_owned()
    } else {
        path.parent().unwrap_or(path).to_owned()
    }
}

fn main() {
    let args = Args::from_env();
    if !fio_installed() {
        eprintln!("datapath: fio not found: install fio (apt-get install fio)");
        std::process::exit(2);
    }
    let size = args
        .value("--size")
        .map(|s| support::parse_size(&s) as u64)
        .unwrap_or(512 * MIB);
    let size = size.div_ceil(MIB).max(16) * MIB;
    let num = |flag: &str, default: u64| {
        args.value(flag)
            .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{flag} N")))
            .unwrap_or(default)
    };
    let kinds: Vec<String> = args
        .value("--kinds")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| KINDS.map(str::to_owned).to_vec());
    if let Some(k) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        eprintln!("datapath: unknown kind {k:?} (known: {})", KINDS.join(", "));
        std::process::exit(2);
    }
    let opts = Options {
        cfg: Config {
            ioengine: args.value("--ioengine").unwrap_or_default(),
            runtime_s: num("--runtime", 5),
            ramp_s: num("--ramp", 1),
            size_bytes: size,
            seq_iodepth: num("--seq-iodepth", 8) as u32,
            rounds: num("--rounds", 1).max(1) as usize,
            control: !args.flag("--no-control"),
        },
        kinds,
        json: args.flag("--json"),
        params: kv(&args, "--param"),
        dir_params: kv(&args, "--dir-param"),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        if let Some(endpoint) = args.value("--endpoint") {
            let Some(pool_dir) = args.value("--pool-dir") else {
                eprintln!(
                    "datapath: --endpoint needs --pool-dir DIR (a directory on the filesystem \
                     that holds the driver's volumes, for the baseline file)"
                );
                return 2;
            };
            let scratch;
            let work = match args.value("--work-dir") {
                Some(w) => PathBuf::from(w),
                None => {
                    scratch = common::Scratch::new("datapath");
                    scratch.root.clone()
                }
            };
            bench(&endpoint, Path::new(&pool_dir), &work, opts, false).await
        } else {
            let env = common::Env::new("xfs").await;
            let endpoint = format!("unix://{}", env.layout.socket.display());
            let work = env.scratch.root.join("bench");
            std::fs::create_dir_all(&work).unwrap();
            let pool = env.layout.pool.clone();
            let code = bench(&endpoint, &pool, &work, opts, true).await;
            drop(env);
            code
        }
    });
    std::process::exit(code);
}
