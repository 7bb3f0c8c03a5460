//! `ringbd`: command line → [`Config`] → server. `anyhow` lives only here.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ringbd::config::{self, Config, ExportSpec, Listen};
use ringbd::ring::sys;
use ringbd::target::backend::CacheMode;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

#[derive(Parser, Debug)]
#[command(
    name = "ringbd",
    version,
    about = "A Network Block Device (NBD) server on io_uring",
    long_about = "ringbd serves files, block devices and RAM disks over the NBD protocol, with \
                  one io_uring shard per core, registered buffers and O_DIRECT."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Serve one or more exports (runs in the foreground).
    #[command(after_help = "EXAMPLES:
  ringbd serve --listen 127.0.0.1:10809 memory:1G
      a 1 GiB RAM disk as the default export on TCP
  ringbd serve --unix /run/ringbd.sock /srv/vm1.img
      a disk image with O_DIRECT on a unix socket (qemu: nbd+unix:///?socket=/run/ringbd.sock)
  ringbd serve --listen [::]:10809 vm1=/dev/vg0/vm1 vm2=/srv/vm2.img scratch=memory:4G
      three named exports (nbd://host/vm1 ...)
  ringbd serve --read-only --cache writeback --shards 4 /srv/golden.img")]
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Exports as [NAME=]PATH; PATH is a file, a block device or memory:SIZE (e.g. memory:1G).
    /// A bare PATH is the default export (name "").
    #[arg(required = true, value_name = "EXPORT")]
    exports: Vec<String>,
    /// Listen on a unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (repeatable). Default [::]:10809 when no --unix is given.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Number of shards (threads, each with its own io_uring). Default: one per online core.
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Page-cache mode for file exports.
    #[arg(long, value_enum, default_value_t = CacheArg::Direct)]
    cache: CacheArg,
    /// Maximum in-flight requests per connection.
    #[arg(long, value_name = "N", default_value_t = config::QUEUE_DEPTH_DEFAULT)]
    queue_depth: u32,
    /// Registered buffer pool per shard, in MiB (bounds the server's I/O memory).
    #[arg(long, value_name = "MIB", default_value_t = config::BUFFER_MIB_DEFAULT)]
    buffer_mib: usize,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CacheArg {
    /// O_DIRECT: bypass the page cache (the default, for VM disks).
    Direct,
    /// Buffered I/O through the page cache; FLUSH makes writes durable.
    Writeback,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Serve(args) => serve(args),
    };
    if let Err(error) = result {
        eprintln!("ringbd: error: {error:#}");
        std::process::exit(1);
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    init_logging(&args.log_level, args.log_format);
    let cache = match args.cache {
        CacheArg::Direct => CacheMode::Direct,
        CacheArg::Writeback => CacheMode::Writeback,
    };
    let exports = args
        .exports
        .iter()
        .map(|text| ExportSpec::parse(text, args.read_only, cache))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let mut listen: Vec<Listen> = args.listen.iter().cloned().map(Listen::Tcp).collect();
    if let Some(path) = args.unix {
        listen.push(Listen::Unix(path));
    }
    if listen.is_empty() {
        listen.push(Listen::Tcp(format!("[::]:{}", config::NBD_PORT)));
    }
    let shards = args.shards.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let config = Config {
        exports,
        listen,
        shards,
        queue_depth: args.queue_depth,
        buffer_mib: args.buffer_mib,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    report_memlock(&config);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let listeners = ringbd::server::bind(&config)?;
    let server = ringbd::server::start(&config, listeners)?;
    tracing::info!(
        shards = config.shards,
        version = env!("CARGO_PKG_VERSION"),
        "ringbd serving"
    );
    for signal in signals.forever() {
        match signal {
            SIGHUP => tracing::info!("SIGHUP: export reload is not implemented yet; ignoring"),
            _ => break,
        }
    }
    tracing::info!("stopping: finishing in-flight requests");
    server.stop()
}

/// Registered buffers count against RLIMIT_MEMLOCK for non-root users: say so up front.
fn report_memlock(config: &Config) {
    let needed = (config.buffer_mib as u64) << 20;
    let limit = sys::memlock_limit();
    if !sys::is_root() && limit < needed * config.shards as u64 {
        tracing::warn!(
            memlock_limit_bytes = limit,
            needed_bytes = needed * config.shards as u64,
            "RLIMIT_MEMLOCK is below the registered buffer pools; I/O will use unregistered \
             buffers. Fix: `ulimit -l unlimited`, LimitMEMLOCK=infinity in the systemd unit, \
             or a smaller --buffer-mib"
        );
    }
}
