//! The `stowage` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use stowage::backend::placement::PoolImageMode;
use stowage::client::{self, ClientCommand, GlobalArgs, OutputFormat};
use stowage::server::{self, Config, Endpoint, Mode};

#[derive(Debug, Parser)]
#[command(name = "stowage", version = stowage::VENDOR_VERSION, about = "A CSI driver for local dir and block volumes")]
struct Cli {
    /// For client commands: the CSI endpoint, unix:///path/csi.sock or
    /// tcp://host:port [default: unix:///run/stowage/csi.sock]
    #[arg(long)]
    endpoint: Option<String>,
    /// For client commands: the output format [default: table]
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<OutputFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services.
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
    /// Where volumes live (default: <state-dir>/pool).
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
        output: cli.output,
    };
    match cli.command {
        Command::Serve(_) if outer.endpoint.is_some() || outer.output.is_some() => {
            eprintln!("stowage: give serve's flags after `serve`");
            ExitCode::from(2)
        }
        Command::Serve(args) => serve(args),
        Command::Status(_) if outer.endpoint.is_some() => {
            eprintln!("stowage: status reads local state and takes no --endpoint");
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
        Command::Cluster(_) if outer.endpoint.is_some() || outer.output.is_some() => {
            eprintln!("stowage: cluster writes local files and takes no --endpoint or --output");
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
    // Files stowage creates (records, the socket) are owner-only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let endpoint = match Endpoint::parse(&args.endpoint) {
        Ok(e) => e,
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
        endpoint,
        node_id,
        driver_name: args.driver_name,
        pool: args.pool.unwrap_or_else(|| args.state_dir.join("pool")),
        state_dir: args.state_dir,
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
        Err(e) => {
            tracing::error!(error = %e, "stowage serve failed");
            eprintln!("stowage: {e}");
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
}
