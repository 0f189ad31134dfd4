//! The `stowage` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use stowage::backend::placement::PoolImageMode;
use stowage::client::{self, ClientCommand, GlobalArgs, OutputFormat};
use stowage::server::{self, ClusterConfig, Config, Endpoint, Mode};

/// mimalloc rather than glibc's malloc: the replicated data path makes
/// several small allocations per write on many threads (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "stowage", version = stowage::VENDOR_VERSION, about = "A CSI driver: local dir and block volumes, object volumes on S3")]
struct Cli {
    /// For client commands: the CSI endpoint, unix:///path/csi.sock,
    /// /path/csi.sock or tcp://host:port [default: unix:///run/stowage/csi.sock]
    #[arg(long)]
    endpoint: Option<String>,
    /// For client commands on a node of a cluster: the controller's socket,
    /// where controller calls go (node calls go to --endpoint)
    #[arg(long)]
    controller_endpoint: Option<String>,
    /// For client commands: the output format [default: table]
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<OutputFormat>,
    /// For client commands: how long one call may wait for its answer
    /// (30s, 5m, 1h), 0 for no limit [default: 2m]
    #[arg(long, value_name = "DURATION", value_parser = client::parse_call_limit)]
    request_timeout: Option<client::CallLimit>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve CSI: Identity, Controller and Node on one host (--mode all), or
    /// a cluster's node agent or routing controller (--mode node|controller).
    Serve(ServeArgs),
    /// Report this host's pool, volumes and anything leaked or inconsistent
    /// (reads local state; exits 1 when problems are listed).
    Status(client::status::StatusArgs),
    /// Make the plugin's volumes match a declarative file (the headless
    /// reconciler; --watch keeps it running as a sidecar).
    Apply(client::apply::ApplyArgs),
    /// Make the certificates stowage processes on several hosts use
    /// (local files; no endpoint).
    Cluster(client::cluster::ClusterArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    All,
    Controller,
    Node,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PoolImageArg {
    Auto,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// unix:///path/csi.sock or tcp://host:port
    #[arg(long, default_value = "unix:///run/stowage/csi.sock")]
    endpoint: String,
    /// This node's id (default: the hostname).
    #[arg(long)]
    node_id: Option<String>,
    /// The CSI driver name.
    #[arg(long, default_value = "stowage.csi.dev")]
    driver_name: String,
    /// Where stowage keeps its records.
    #[arg(long, default_value = "/var/lib/stowage")]
    state_dir: PathBuf,
    /// Where volumes live (default: STATE_DIR/pool).
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Keep the pool in a sparse xfs image (mounted at the pool directory)
    /// when the pool's filesystem cannot share extents (ext4, tmpfs), so
    /// snapshots are O(1): auto, or never.
    #[arg(long, value_enum, default_value = "auto")]
    pool_image: PoolImageArg,
    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: ModeArg,
    /// Volumes a node may have published at once (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_volumes_per_node: u64,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Serve Prometheus metrics at /metrics and a health check at /healthz
    /// over HTTP on HOST:PORT (off unless set).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<String>,
    /// Many nodes: the TCP address (host:port) of the agent API (node) or
    /// of registration (controller); mutual TLS only.
    #[arg(long)]
    listen: Option<String>,
    /// Node: the address the controller dials (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Node: where the replication data link listens, host:port (default:
    /// the host of --listen, any free port); engines on other nodes send
    /// replicated volumes' data there, mutual TLS.
    #[arg(long, value_name = "HOST:PORT")]
    data_listen: Option<String>,
    /// Node: the data link address engines dial (default: the host of
    /// --advertise, the data link's port).
    #[arg(long, value_name = "HOST:PORT")]
    data_advertise: Option<String>,
    /// Node: the controller's registration address, https://host:port.
    #[arg(long)]
    controller: Option<String>,
    /// Many nodes: the directory with ca.crt, tls.crt and tls.key
    /// (`stowage cluster init`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Node: a label reported to the controller (repeatable), e.g. zone=a.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Node: seconds between registrations (the controller counts a node
    /// gone after three missed ones).
    #[arg(long, default_value_t = 5)]
    register_interval: u64,
    /// Node: TLS between engines and the copies of replicated volumes.
    /// `off` is for benchmarks only: data requests to copies then travel
    /// unencrypted and unauthenticated on a second port when both nodes
    /// have it off (the agent API stays mutual TLS).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    replication_tls: OnOff,
    /// Node: FUSE worker threads per staged replicated volume (1-256).
    /// Each answers one kernel request at a time: they bound the random
    /// I/O a volume keeps in flight on its local copy.
    #[arg(long, value_name = "N")]
    fuse_workers: Option<usize>,
    /// Controller: seconds after which a replicated volume's copy (or
    /// witness) on a node not heard from is replaced on another node (a
    /// full rebuild while I/O continues).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    replica_replace_after: u64,
    /// Controller: heal replicated volumes nobody publishes: when a copy is
    /// out of sync (replaced, added, or outvoted by the others' reads) or
    /// its node could not read some regions, an engine with no mount on a
    /// node holding a copy in sync rebuilds it, in the same background
    /// round as replacements. `off` leaves that to the next engine a
    /// publication starts.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    replica_heal_idle: OnOff,
    /// Controller: the pace of a heal, MiB per second written to the
    /// copies it rebuilds (1-4096), so that a heal leaves the disks and
    /// the network to the volumes in use; 0: no pace (a 1 MiB region
    /// every 10 ms for each copy, as a publication's engine rebuilds).
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    replica_heal_rate: u64,
    /// Node: seconds between scrub passes of each replicated volume whose
    /// engine runs here (0: never). A pass reads every region on every
    /// copy in sync from its disk and compares them; a copy that cannot
    /// read a region, or holds other bytes than a majority of the copies,
    /// is marked out of sync and gets the region written again. The first
    /// pass starts at a random point within the first period.
    #[arg(long, default_value_t = 7 * 24 * 3600, value_name = "SECONDS")]
    replica_scrub_every: u64,
    /// Node: the pace of a scrub pass, MiB per second read on each copy
    /// (1-4096).
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    replica_scrub_rate: u64,
}

/// The cluster part of serve's flags, checked against the mode.
fn cluster_config(
    args: &ServeArgs,
    state_dir: &std::path::Path,
) -> Result<Option<ClusterConfig>, String> {
    let clustered = args.listen.is_some()
        || args.advertise.is_some()
        || args.controller.is_some()
        || args.tls_dir.is_some()
        || !args.labels.is_empty();
    let need = |flag: &str, v: &Option<String>| {
        v.clone()
            .ok_or_else(|| format!("--mode {} needs {flag}", mode_name(args.mode)))
    };
    match args.mode {
        ModeArg::All if clustered => Err(
            "--listen, --advertise, --controller, --tls-dir and --label are for --mode node or controller"
                .to_owned(),
        ),
        ModeArg::All
            if args.replication_tls == OnOff::Off
                || args.fuse_workers.is_some()
                || args.data_listen.is_some()
                || args.data_advertise.is_some() =>
        {
            Err(
                "--replication-tls, --fuse-workers, --data-listen and --data-advertise are --mode node flags"
                    .to_owned(),
            )
        }
        ModeArg::All => Ok(None),
        ModeArg::Controller => {
            if args.advertise.is_some()
                || args.controller.is_some()
                || !args.labels.is_empty()
                || args.replication_tls == OnOff::Off
                || args.fuse_workers.is_some()
                || args.data_listen.is_some()
                || args.data_advertise.is_some()
            {
                return Err(
                    "--advertise, --controller, --label, --replication-tls, --fuse-workers, --data-listen and --data-advertise are node flags"
                        .to_owned(),
                );
            }
            Ok(Some(ClusterConfig {
                listen: need("--listen", &args.listen)?,
                tls_dir: args
                    .tls_dir
                    .clone()
                    .ok_or("--mode controller needs --tls-dir")?,
                agent: None,
                replace_after: std::time::Duration::from_secs(args.replica_replace_after.max(1)),
                heal_idle: heal_idle(args)?,
            }))
        }
        ModeArg::Node => {
            let listen = need("--listen", &args.listen)?;
            let controller = need("--controller", &args.controller)?;
            if !controller.starts_with("https://") {
                return Err(format!(
                    "--controller {controller:?}: expected https://host:port (everything between nodes is mutual TLS)"
                ));
            }
            let advertise = match &args.advertise {
                Some(a) => a.clone(),
                None if listen.starts_with("0.0.0.0:") || listen.starts_with("[::]:") => {
                    return Err(format!(
                        "--listen {listen} is a wildcard address: give --advertise host:port"
                    ));
                }
                None => listen.clone(),
            };
            let host = |hp: &str| hp.rsplit_once(':').map_or(hp, |(h, _)| h).to_owned();
            let port_of = |flag: &str, hp: &str| {
                hp.rsplit_once(':')
                    .and_then(|(h, p)| p.parse::<u16>().ok().filter(|_| !h.is_empty()))
                    .ok_or_else(|| format!("{flag} {hp:?}: expected host:port"))
            };
            let data_listen = match &args.data_listen {
                Some(d) => {
                    port_of("--data-listen", d)?;
                    d.clone()
                }
                None => format!("{}:0", host(&listen)),
            };
            if let Some(d) = &args.data_advertise
                && port_of("--data-advertise", d)? == 0
            {
                return Err(format!("--data-advertise {d:?}: give the port engines dial"));
            }
            if args.data_advertise.is_none()
                && (data_listen.starts_with("0.0.0.0:") || data_listen.starts_with("[::]:"))
                && args.advertise.is_none()
            {
                return Err(format!(
                    "--data-listen {data_listen} is a wildcard address: give --data-advertise host:port"
                ));
            }
            let mut labels = std::collections::BTreeMap::new();
            for l in &args.labels {
                let (k, v) = l
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            if !(1..=300).contains(&args.register_interval) {
                return Err("--register-interval: 1 to 300 seconds".to_owned());
            }
            let fuse_workers = args
                .fuse_workers
                .unwrap_or(stowage::os::fuse_file::FuseOptions::default().workers);
            if !(1..=256).contains(&fuse_workers) {
                return Err("--fuse-workers: 1 to 256 threads".to_owned());
            }
            if !(1..=4096).contains(&args.replica_scrub_rate) {
                return Err("--replica-scrub-rate: 1 to 4096 MiB per second".to_owned());
            }
            Ok(Some(ClusterConfig {
                listen: listen.clone(),
                tls_dir: args.tls_dir.clone().ok_or("--mode node needs --tls-dir")?,
                agent: Some(stowage::cluster::agent::AgentConfig {
                    listen,
                    advertise,
                    controller,
                    labels,
                    interval: std::time::Duration::from_secs(args.register_interval),
                    cordon_file: state_dir.join("cordoned"),
                    cordon_lock: Default::default(),
                    replication_tls: args.replication_tls == OnOff::On,
                    fuse_workers,
                    scrub_every: (args.replica_scrub_every > 0)
                        .then(|| std::time::Duration::from_secs(args.replica_scrub_every)),
                    scrub_rate: args.replica_scrub_rate << 20,
                    data_listen,
                    data_advertise: args.data_advertise.clone(),
                }),
                replace_after: std::time::Duration::from_secs(args.replica_replace_after.max(1)),
                heal_idle: heal_idle(args)?,
            }))
        }
    }
}

/// `--replica-heal-idle` and `--replica-heal-rate`.
fn heal_idle(args: &ServeArgs) -> Result<Option<stowage::cluster::replicated::HealIdle>, String> {
    if args.replica_heal_rate > 4096 {
        return Err("--replica-heal-rate: 0 (no pace) to 4096 MiB per second".to_owned());
    }
    Ok(
        (args.replica_heal_idle == OnOff::On).then_some(stowage::cluster::replicated::HealIdle {
            rate: (args.replica_heal_rate > 0).then_some(args.replica_heal_rate << 20),
        }),
    )
}

fn mode_name(m: ModeArg) -> &'static str {
    match m {
        ModeArg::All => "all",
        ModeArg::Controller => "controller",
        ModeArg::Node => "node",
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STOWAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outer = GlobalArgs {
        endpoint: cli.endpoint,
        controller_endpoint: cli.controller_endpoint,
        output: cli.output,
        request_timeout: cli.request_timeout,
    };
    match cli.command {
        Command::Serve(_)
            if outer.endpoint.is_some()
                || outer.controller_endpoint.is_some()
                || outer.output.is_some()
                || outer.request_timeout.is_some() =>
        {
            eprintln!("stowage: give serve's flags after `serve`");
            ExitCode::from(2)
        }
        Command::Serve(args) => serve(args),
        Command::Status(_)
            if outer.endpoint.is_some()
                || outer.controller_endpoint.is_some()
                || outer.request_timeout.is_some() =>
        {
            eprintln!(
                "stowage: status reads local state and takes no --endpoint or --request-timeout"
            );
            ExitCode::from(2)
        }
        Command::Status(args) => match client::status::run(&args, outer.output) {
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => ExitCode::from(1),
            Err(e) => {
                eprintln!("stowage: {}", e.report());
                ExitCode::from(e.exit_code())
            }
        },
        Command::Apply(args) => {
            if args.watch {
                init_logging(LogFormat::Text);
            }
            ExitCode::from(client::apply::run(args, &outer))
        }
        Command::Cluster(_)
            if outer.endpoint.is_some()
                || outer.output.is_some()
                || outer.request_timeout.is_some() =>
        {
            eprintln!(
                "stowage: cluster writes local files and takes no --endpoint, --output or --request-timeout"
            );
            ExitCode::from(2)
        }
        Command::Cluster(args) => match client::cluster::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stowage: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Client(command) => match client::run(command, &outer) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stowage: {}", e.report());
                ExitCode::from(e.exit_code())
            }
        },
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    // Said at once, rather than as a bare EPERM/EACCES on the state
    // directory or /dev/loop-control later. The routing controller mounts
    // nothing and runs unprivileged.
    if !matches!(args.mode, ModeArg::Controller)
        && !stowage::os::resize::has_effective_capability(stowage::os::resize::CAP_SYS_ADMIN)
    {
        eprintln!(
            "stowage: serve must run as root: it mounts filesystems and attaches loop devices, \
             which need CAP_SYS_ADMIN (this process has uid {} and lacks it); run it with sudo, \
             or as the stowage.service unit",
            nix::unistd::geteuid()
        );
        return ExitCode::FAILURE;
    }
    // Files stowage creates (records, the socket) are owner-only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let endpoint = match Endpoint::parse(&args.endpoint) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    // Real paths: mounts and loop devices' backing files are named so,
    // and a state directory or pool reached through a symlink would be
    // found nowhere in them.
    let real = |flag: &str, p: &std::path::Path| {
        stowage::os::fs::real_path(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
    };
    let (state_dir, pool) = match (
        real("--state-dir", &args.state_dir),
        args.pool.as_deref().map(|p| real("--pool", p)).transpose(),
    ) {
        (Ok(s), Ok(p)) => (s, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    let cluster = match cluster_config(&args, &state_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stowage: {e}");
            return ExitCode::from(2);
        }
    };
    let node_id = args.node_id.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    });
    let cfg = Config {
        cluster,
        endpoint,
        node_id,
        driver_name: args.driver_name,
        pool: pool.unwrap_or_else(|| state_dir.join("pool")),
        state_dir,
        pool_image: match args.pool_image {
            PoolImageArg::Auto => PoolImageMode::Auto,
            PoolImageArg::Never => PoolImageMode::Never,
        },
        mode: match args.mode {
            ModeArg::All => Mode::All,
            ModeArg::Controller => Mode::Controller,
            ModeArg::Node => Mode::Node,
        },
        max_volumes_per_node: args.max_volumes_per_node,
        metrics_address: args.metrics_address,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stowage: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(server::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        // Once: as a plain line for people, or as a log record when the
        // log is JSON (a plain line would break its parser).
        Err(e) => {
            match args.log_format {
                LogFormat::Text => eprintln!("stowage: {e}"),
                LogFormat::Json => tracing::error!(error = %e, "stowage serve failed"),
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    fn serve_args(args: &[&str]) -> super::ServeArgs {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([&["stowage", "serve"], args].concat()).unwrap();
        match cli.command {
            super::Command::Serve(a) => a,
            _ => unreachable!("parsed a serve command"),
        }
    }

    #[test]
    fn the_routing_controller_refuses_node_flags() {
        let base = [
            "--mode",
            "controller",
            "--listen",
            "127.0.0.1:7444",
            "--tls-dir",
            "/x",
        ];
        let dir = std::path::Path::new("/state");
        assert!(super::cluster_config(&serve_args(&base), dir).is_ok());
        for extra in [
            ["--label", "zone=a"],
            ["--advertise", "10.0.0.1:7443"],
            ["--fuse-workers", "4"],
            ["--data-listen", "127.0.0.1:7445"],
            ["--data-advertise", "10.0.0.1:7445"],
        ] {
            let e = super::cluster_config(&serve_args(&[&base[..], &extra[..]].concat()), dir)
                .unwrap_err();
            assert!(e.contains("node flags"), "{e}");
        }
    }

    /// The flags every `--mode node` test starts from.
    const NODE_ARGS: [&str; 8] = [
        "--mode",
        "node",
        "--listen",
        "127.0.0.1:7443",
        "--controller",
        "https://127.0.0.1:7444",
        "--tls-dir",
        "/x",
    ];

    #[test]
    fn fuse_workers_is_a_node_flag_within_bounds() {
        let base = NODE_ARGS;
        let dir = std::path::Path::new("/state");
        let workers = |extra: &[&str]| {
            super::cluster_config(&serve_args(&[&base[..], extra].concat()), dir)
                .map(|c| c.and_then(|c| c.agent).map(|a| a.fuse_workers))
        };
        assert_eq!(
            workers(&[]),
            Ok(Some(stowage::os::fuse_file::FuseOptions::default().workers))
        );
        assert_eq!(workers(&["--fuse-workers", "32"]), Ok(Some(32)));
        for bad in ["0", "257"] {
            let e = workers(&["--fuse-workers", bad]).unwrap_err();
            assert!(e.contains("--fuse-workers"), "{e}");
        }
        let e = super::cluster_config(&serve_args(&["--fuse-workers", "4"]), dir).unwrap_err();
        assert!(e.contains("--fuse-workers"), "{e}");
    }

    #[test]
    fn the_data_link_listens_beside_the_agent_unless_told() {
        let base = NODE_ARGS;
        let dir = std::path::Path::new("/state");
        let data = |extra: &[&str]| {
            super::cluster_config(&serve_args(&[&base[..], extra].concat()), dir).map(|c| {
                let a = c.and_then(|c| c.agent).unwrap();
                (a.data_listen, a.data_advertise)
            })
        };
        assert_eq!(data(&[]), Ok(("127.0.0.1:0".to_owned(), None)));
        assert_eq!(
            data(&[
                "--data-listen",
                "0.0.0.0:7445",
                "--data-advertise",
                "10.0.0.1:7445"
            ]),
            Ok(("0.0.0.0:7445".to_owned(), Some("10.0.0.1:7445".to_owned())))
        );
        for (bad, flag) in [
            (&["--data-listen", "7445"][..], "--data-listen"),
            (&["--data-listen", "h:x"][..], "--data-listen"),
            (&["--data-advertise", "10.0.0.1:0"][..], "--data-advertise"),
            // A wildcard with nothing to tell engines.
            (&["--data-listen", "0.0.0.0:7445"][..], "--data-advertise"),
        ] {
            let e = data(bad).unwrap_err();
            assert!(e.contains(flag), "{bad:?}: {e}");
        }
        let e =
            super::cluster_config(&serve_args(&["--data-listen", "127.0.0.1:1"]), dir).unwrap_err();
        assert!(e.contains("--data-listen"), "{e}");
    }
}
