//! fio pieces the data-path benchmarks share: the job shapes, what one run
//! measured, and the median and spread over interleaved rounds.

use serde::Serialize;

/// One fio job shape.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    /// 0 = the sequential queue depth from the command line.
    pub iodepth: u32,
    pub read: bool,
}

/// The jobs of the datapath and replicated benchmarks.
pub const JOBS: [Job; 6] = [
    Job {
        name: "seq-write",
        rw: "write",
        bs: "1M",
        iodepth: 0,
        read: false,
    },
    Job {
        name: "seq-read",
        rw: "read",
        bs: "1M",
        iodepth: 0,
        read: true,
    },
    Job {
        name: "rand-write-qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        read: false,
    },
    Job {
        name: "rand-read-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        read: true,
    },
    Job {
        name: "rand-write-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        read: false,
    },
    Job {
        name: "rand-read-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        read: true,
    },
];

/// What one fio run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measure {
    pub bw_kib_s: f64,
    pub iops: f64,
    pub clat_p50_us: f64,
    pub clat_p99_us: f64,
    /// The tail the percentiles above miss: at QD1 the IOPS follow the
    /// mean completion time, which a few stalls of milliseconds move.
    pub clat_p999_us: f64,
    pub clat_mean_us: f64,
}

impl Measure {
    /// What fio's JSON output `v` says of its first job's reads (`read`)
    /// or writes; None when it measured no I/O.
    pub fn from_fio(v: &serde_json::Value, read: bool) -> Option<Measure> {
        Measure::from_fio_job(v, 0, read)
    }

    /// [`Measure::from_fio`] of job `k` of a run of several at once.
    pub fn from_fio_job(v: &serde_json::Value, k: usize, read: bool) -> Option<Measure> {
        let s = &v["jobs"][k][if read { "read" } else { "write" }];
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        let pct = |p: &str| num(&s["clat_ns"]["percentile"][p]) / 1e3;
        let m = Measure {
            bw_kib_s: num(&s["bw"]),
            iops: num(&s["iops"]),
            clat_p50_us: pct("50.000000"),
            clat_p99_us: pct("99.000000"),
            clat_p999_us: pct("99.900000"),
            clat_mean_us: num(&s["clat_ns"]["mean"]) / 1e3,
        };
        (m.iops > 0.0).then_some(m)
    }
}

/// The run with the median bandwidth (the upper one of an even count).
pub fn median(runs: &[Measure]) -> Measure {
    let mut v = runs.to_vec();
    v.sort_by(|a, b| a.bw_kib_s.total_cmp(&b.bw_kib_s));
    v[v.len() / 2]
}

/// The median of bandwidths, the upper one of an even count (as [`median`]).
pub fn median_bw(bw: &[f64]) -> f64 {
    let mut v = bw.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (max − min) / median of the bandwidths; 0 for a single run.
pub fn spread(runs: &[Measure]) -> f64 {
    let bw = runs.iter().map(|m| m.bw_kib_s);
    let (lo, hi) = bw.fold((f64::MAX, 0.0f64), |(lo, hi), b| (lo.min(b), hi.max(b)));
    (hi - lo) / median(runs).bw_kib_s
}
