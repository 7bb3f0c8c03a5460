//! `ringbd`: command line → [`Settings`] → server. `anyhow` lives only here.
//!
//! # Exit codes
//!
//! * 0: clean stop (SIGTERM/SIGINT), or `check-config` found the file valid.
//! * 1: runtime error (cannot bind, open an export, switch user, write the PID file, ...).
//! * 2: usage or configuration error (bad flag, bad or unreadable configuration file).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ringbd::access;
use ringbd::config::{self, Config, KernelTls, Placement, TlsMode};
use ringbd::config_file::{self, Environment, Overrides, ResolveError, Settings};
use ringbd::faults::FaultSettings;
use ringbd::process::{self, PidFile};
use ringbd::ring::sys;
use ringbd::server::Listener;
use ringbd::systemd;
use ringbd::target::backend::CacheMode;
use ringbd::target::fault::Rule;
use ringbd::target::volatile::CutMode;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

/// Exit code of a clean stop.
const EXIT_OK: i32 = 0;
/// Exit code of a runtime error.
const EXIT_RUNTIME: i32 = 1;
/// Exit code of a usage or configuration error (as clap uses for bad flags).
const EXIT_USAGE: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "ringbd",
    version,
    about = "A Network Block Device (NBD) server on io_uring",
    long_about = "ringbd serves files, block devices and RAM disks over the NBD protocol, with \
                  one io_uring shard per core, registered buffers and O_DIRECT.",
    after_help = "EXIT CODES:
  0  clean stop (SIGTERM/SIGINT), or check-config found the file valid
  1  runtime error (bind, open, user switch, PID file)
  2  usage or configuration error

See docs/CONFIGURATION.md and docs/OPERATIONS.md."
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
  ringbd serve --read-only --cache writeback --shards 4 /srv/golden.img
  ringbd serve --create 20G new=/srv/nbd/new.img
      create /srv/nbd/new.img as a 20 GiB sparse file if it does not exist
  ringbd serve --config /etc/ringbd/ringbd.toml
      everything from the file (see `ringbd check-config`)
  ringbd serve --config /etc/ringbd/ringbd.toml --log-level debug extra=/srv/extra.img
      flags override the file; EXPORT arguments are added to its exports
  ringbd serve --config /etc/ringbd/ringbd.toml --metrics 127.0.0.1:9810 \\
        --pid-file /run/ringbd/ringbd.pid --user ringbd --group disk
      Prometheus on http://127.0.0.1:9810/metrics; run as ringbd:disk once set up
  ringbd serve --tls require --tls-cert /etc/ringbd/server-cert.pem \\
        --tls-key /etc/ringbd/server-key.pem --tls-ca /etc/ringbd/ca-cert.pem vm1=/srv/vm1.img
      TLS only, client certificates required and verified against the CA
      (nbdinfo 'nbds://host/vm1?tls-certificates=/etc/pki/nbd')
  ringbd serve --tls require --tls-psk /etc/ringbd/keys.psk memory:1G
      TLS with pre-shared keys from `psktool -u alice -p keys.psk`
      (nbdinfo 'nbds://alice@host/?tls-psk-file=keys.psk')
  ringbd serve --listen [::]:10809 --allow 10.0.0.0/8 --allow fd00::/8 \\
        --unix /run/ringbd.sock --allow-uid qemu --allow-uid 0 vm1=/srv/vm1.img
      TCP clients only from 10/8 and fd00::/8, unix clients only as qemu or root
      (per-export allow, allow_uids, allow_clients, tls_only, max_connections: in --config)

Under systemd socket activation (LISTEN_FDS), the inherited sockets are served and no
default listener is added. See contrib/ringbd.service and contrib/ringbd.socket.")]
    Serve(Box<ServeArgs>),
    /// Validate a configuration file and print the effective configuration.
    #[command(after_help = "EXAMPLES:
  ringbd check-config /etc/ringbd/ringbd.toml
      prints every setting with its effective value (defaults filled in) as TOML
  ringbd check-config ringbd.toml > /dev/null && systemctl restart ringbd
      exit code 0 when the file is valid, 2 (with the file, line, key and reason on
      stderr) when it is not

Checks on this host (export files missing without a size to create them, unknown user or
group) are printed as warnings and do not change the exit code.")]
    CheckConfig {
        /// The TOML configuration file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Exports as [NAME=]PATH; PATH is a file, a block device or memory:SIZE (e.g. memory:1G).
    /// A bare PATH is the default export (name ""). Added to the exports of --config.
    #[arg(value_name = "EXPORT")]
    exports: Vec<String>,
    /// TOML configuration file; flags given here override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on a unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Permission bits of the unix socket, in octal (e.g. 0660). Default: from the umask.
    #[arg(long, value_name = "MODE", value_parser = config::parse_unix_mode)]
    unix_mode: Option<u32>,
    /// Listen on TCP HOST:PORT (repeatable). Default [::]:10809 when no listener is
    /// configured and no socket is inherited from systemd.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Create file exports that do not exist as sparse files of SIZE (e.g. 20G).
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size)]
    create: Option<u64>,
    /// Number of shards (threads, each with its own io_uring). Default: one per online core.
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// How new connections are spread over shards: interrupts (least-loaded, then the shard
    /// on the CPU receiving the TCP connection's packets, then one on a CPU that takes the
    /// disks' completion interrupts: lower latency and CPU at low depth) or least-loaded.
    /// Default: interrupts.
    #[arg(long, value_enum, value_name = "POLICY")]
    placement: Option<PlacementArg>,
    /// Page-cache mode for file exports (every export). Default: direct.
    #[arg(long, value_enum)]
    cache: Option<CacheArg>,
    /// Maximum in-flight requests per connection.
    #[arg(long, value_name = "N")]
    queue_depth: Option<u32>,
    /// Registered buffer pool per shard, in MiB (bounds the server's I/O memory).
    #[arg(long, value_name = "MIB")]
    buffer_mib: Option<usize>,
    /// Maximum open client connections; more are closed at once.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Seconds a client may take to finish the handshake.
    #[arg(long, value_name = "SECONDS")]
    handshake_timeout_seconds: Option<u64>,
    /// Default limit of clients per export (exports' own max_connections win); 0: unlimited.
    #[arg(long, value_name = "N")]
    export_max_connections: Option<u32>,
    /// TLS (STARTTLS): off; on (offered, plaintext still served); require (every client
    /// must start TLS). Default: off.
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,
    /// Server certificate chain, PEM (with --tls-key).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert, PEM.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificates, PEM: require client certificates and verify them against these.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Pre-shared keys, one `identity:hexkey` per line (as `psktool` writes them).
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
    /// Kernel TLS offload after the handshake: auto (when the kernel and cipher allow it)
    /// or off. Default: auto.
    #[arg(long, value_enum, value_name = "MODE")]
    tls_kernel: Option<KernelTlsArg>,
    /// Accept TCP clients only from this network (repeatable): 10.0.0.0/8, fd00::/8 or a
    /// bare address. Replaces the file's `allow`. Default: any address.
    #[arg(long, value_name = "CIDR", value_parser = access::parse_net)]
    allow: Vec<ipnet::IpNet>,
    /// Accept unix-socket clients only from this user, uid or name (repeatable). Replaces
    /// the file's `allow_uids`. Default: any user the socket's mode lets in.
    #[arg(long = "allow-uid", value_name = "UID", value_parser = access::parse_uid)]
    allow_uids: Vec<u32>,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Write the process id to PATH (removed on a clean stop).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Switch to USER (name or uid) after binding and opening exports.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Switch to GROUP (name or gid) after binding; default: the user's primary group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Log level or filter (error, warn, info, debug, trace, ringbd=debug); RUST_LOG
    /// overrides it. Default: info.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format. Default: text.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Inject a fault (repeatable): `[EXPORT@]error:OP[:PARAMS]` or `[EXPORT@]delay:OP:PARAMS`,
    /// e.g. `error:write:errno=EIO,p=0.01` or `vm1@delay:read:min=1,max=20`; without EXPORT@
    /// it applies to every export (see docs/FAULTS.md). Added to the config file's rules.
    #[arg(long = "fault", value_name = "RULE")]
    faults: Vec<String>,
    /// Seed of the fault generator (decisions are reproducible for the same seed and workload).
    #[arg(long, value_name = "N")]
    fault_seed: Option<u64>,
    /// Simulate a volatile write cache: a power cut (control socket `cut`, or SIGUSR1) loses
    /// every write not yet flushed (`drop`) or a seeded subset of its sectors (`torn`).
    #[arg(long, value_name = "MODE")]
    power_loss: Option<String>,
    /// Bound of the unflushed-write log per export, in MiB (beyond it the "device" writes its
    /// cache back on its own, as real disks may).
    #[arg(long, value_name = "MIB")]
    power_loss_max_mib: Option<u64>,
    /// Control socket for faults and power cuts at run time (see docs/FAULTS.md).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CacheArg {
    /// O_DIRECT: bypass the page cache (the default, for VM disks).
    Direct,
    /// Buffered I/O through the page cache; FLUSH makes writes durable.
    Writeback,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TlsArg {
    /// No TLS.
    Off,
    /// TLS offered; plaintext clients are served too (except tls_only exports).
    On,
    /// Every client must use TLS.
    Require,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PlacementArg {
    /// Least-loaded, then the receive CPU's shard, then a shard on a disk-interrupt CPU.
    Interrupts,
    /// Least-loaded only.
    LeastLoaded,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum KernelTlsArg {
    /// Kernel TLS when the kernel and the cipher allow it.
    Auto,
    /// Encrypt in user space.
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why the process exits non-zero.
#[derive(Debug)]
enum Failure {
    /// A usage or configuration error (exit 2).
    Usage(anyhow::Error),
    /// Anything that went wrong while acting on the system (exit 1).
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure::Runtime(error)
    }
}

fn usage(error: impl std::fmt::Display) -> Failure {
    Failure::Usage(anyhow::anyhow!("{error}"))
}

/// The command line, with the defaults of flags that the file may also set shown from the
/// constants (those flags are `Option`s so that an absent flag leaves the file's value).
fn command_line() -> clap::Command {
    let defaults = [
        ("queue_depth", config::QUEUE_DEPTH_DEFAULT.to_string()),
        ("buffer_mib", config::BUFFER_MIB_DEFAULT.to_string()),
        (
            "max_connections",
            config::MAX_CONNECTIONS_DEFAULT.to_string(),
        ),
        (
            "handshake_timeout_seconds",
            config::HANDSHAKE_TIMEOUT_SECONDS.to_string(),
        ),
    ];
    <Cli as clap::CommandFactory>::command().mut_subcommand("serve", |mut serve| {
        for (id, default) in defaults {
            serve = serve.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {default}]"))
            });
        }
        serve
    })
}

fn main() {
    abort_on_panic();
    let matches = command_line().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
        .unwrap_or_else(|error| error.exit());
    let result = match cli.command {
        Commands::Serve(args) => serve(*args),
        Commands::CheckConfig { file } => check_config(&file),
    };
    let code = match result {
        Ok(()) => EXIT_OK,
        Err(Failure::Usage(error)) => {
            eprintln!("ringbd: error: {error:#}");
            EXIT_USAGE
        }
        Err(Failure::Runtime(error)) => {
            eprintln!("ringbd: error: {error:#}");
            EXIT_RUNTIME
        }
    };
    std::process::exit(code);
}

fn init_logging(level: &str, format: config_file::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        config_file::LogFormat::Text => builder.init(),
        config_file::LogFormat::Json => builder.json().init(),
    }
}

fn online_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The `--fault*` flags, checked before anything starts and merged into every export's
/// spec (at startup and again on SIGHUP): flags override the config file key by key, and
/// `--fault` rules are added to the file's.
#[derive(Debug, Clone, Default)]
struct CliFaults {
    rules: Vec<(Option<String>, String)>,
    seed: Option<u64>,
    power_loss: Option<CutMode>,
    power_loss_max_mib: Option<u64>,
}

impl CliFaults {
    fn parse(args: &ServeArgs) -> Result<CliFaults, String> {
        let mut rules = Vec::new();
        for text in &args.faults {
            let (export, rule) = match text.split_once('@') {
                Some((export, rule)) if !export.contains(':') => (Some(export.to_string()), rule),
                _ => (None, text.as_str()),
            };
            Rule::parse(rule).map_err(|error| format!("--fault {text}: {error}"))?;
            rules.push((export, rule.to_string()));
        }
        let power_loss = args.power_loss.as_deref().map(CutMode::parse).transpose()?;
        Ok(CliFaults {
            rules,
            seed: args.fault_seed,
            power_loss,
            power_loss_max_mib: args.power_loss_max_mib,
        })
    }

    fn apply(&self, config: &mut Config) -> Result<(), String> {
        for (export, _) in &self.rules {
            if let Some(name) = export
                && !config.exports.iter().any(|spec| spec.name == *name)
            {
                return Err(format!(
                    "--fault names export '{name}', which is not configured"
                ));
            }
        }
        for spec in &mut config.exports {
            let faults = &mut spec.faults;
            faults.rules.extend(
                self.rules
                    .iter()
                    .filter(|(export, _)| export.as_deref().is_none_or(|name| name == spec.name))
                    .map(|(_, rule)| rule.clone()),
            );
            faults.seed = self.seed.or(faults.seed);
            faults.power_loss = self.power_loss.or(faults.power_loss);
            faults.power_loss_max_mib = self.power_loss_max_mib.or(faults.power_loss_max_mib);
        }
        Ok(())
    }
}

fn overrides(args: ServeArgs) -> Overrides {
    Overrides {
        exports: args.exports,
        listen: args.listen,
        unix: args.unix,
        unix_mode: args.unix_mode,
        read_only: args.read_only,
        shards: args.shards,
        placement: args.placement.map(|placement| match placement {
            PlacementArg::Interrupts => Placement::Interrupts,
            PlacementArg::LeastLoaded => Placement::LeastLoaded,
        }),
        cache: args.cache.map(|cache| match cache {
            CacheArg::Direct => CacheMode::Direct,
            CacheArg::Writeback => CacheMode::Writeback,
        }),
        queue_depth: args.queue_depth,
        buffer_mib: args.buffer_mib,
        create_bytes: args.create,
        metrics: args.metrics,
        pid_file: args.pid_file,
        user: args.user,
        group: args.group,
        log_level: args.log_level,
        log_format: args.log_format.map(|format| match format {
            LogFormat::Text => config_file::LogFormat::Text,
            LogFormat::Json => config_file::LogFormat::Json,
        }),
        max_connections: args.max_connections,
        handshake_timeout_seconds: args.handshake_timeout_seconds,
        tls: args.tls.map(|tls| match tls {
            TlsArg::Off => TlsMode::Off,
            TlsArg::On => TlsMode::On,
            TlsArg::Require => TlsMode::Require,
        }),
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_ca: args.tls_ca,
        tls_psk: args.tls_psk,
        tls_kernel: args.tls_kernel.map(|kernel| match kernel {
            KernelTlsArg::Auto => KernelTls::Auto,
            KernelTlsArg::Off => KernelTls::Off,
        }),
        allow: args.allow,
        allow_uids: args.allow_uids,
        export_max_connections: args.export_max_connections,
    }
}

fn check_config(path: &std::path::Path) -> Result<(), Failure> {
    let file = config_file::load(path).map_err(usage)?;
    let environment = Environment {
        cores: online_cores(),
        socket_activated: false,
    };
    let settings =
        config_file::resolve(Some(&file), &Overrides::default(), environment).map_err(|error| {
            match error {
                ResolveError::File(located) => usage(located),
                ResolveError::Message(message) => usage(format!("{}: {message}", path.display())),
            }
        })?;
    for warning in host_warnings(&settings) {
        eprintln!("ringbd: warning: {warning}");
    }
    print!("{}", settings.to_toml());
    Ok(())
}

/// What would make `serve` fail on this host although the file is valid.
fn host_warnings(settings: &Settings) -> Vec<String> {
    let mut warnings = Vec::new();
    for export in &settings.config.exports {
        if let ringbd::target::backend::Source::Path(path) = &export.source
            && export.create_bytes.is_none()
            && let Err(error) = std::fs::metadata(path)
        {
            warnings.push(format!(
                "export '{}': {}: {error} (give `size` to create it)",
                export.name,
                path.display()
            ));
        }
    }
    if let Err(error) =
        process::resolve_identity(settings.user.as_deref(), settings.group.as_deref())
    {
        warnings.push(error);
    }
    warnings.extend(tls_warnings(&settings.config.tls));
    warnings
}

/// TLS files this process cannot read, and TLS files given while TLS is off.
fn tls_warnings(tls: &config::TlsSettings) -> Vec<String> {
    let mut warnings = Vec::new();
    if tls.mode == TlsMode::Off && tls.has_files() {
        warnings.push("tls_cert/tls_key/tls_ca/tls_psk are set but tls = \"off\": unused".into());
    }
    let files = [
        ("tls_cert", &tls.cert),
        ("tls_key", &tls.key),
        ("tls_ca", &tls.ca),
        ("tls_psk", &tls.psk),
    ];
    for (key, path) in files {
        if let Some(path) = path
            && let Err(error) = std::fs::File::open(path)
        {
            warnings.push(format!("{key}: {}: {error}", path.display()));
        }
    }
    warnings
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let faults = FaultSettings {
        control: args.control.clone(),
    };
    let cli_faults = CliFaults::parse(&args).map_err(usage)?;
    let (mut settings, inherited, reloader) = settings_and_inherited_sockets(args, cli_faults)?;
    reloader.faults.apply(&mut settings.config).map_err(usage)?;
    let identity = process::resolve_identity(settings.user.as_deref(), settings.group.as_deref())
        .map_err(usage)?;
    let config = &settings.config;
    report_memlock(config);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .context("cannot install signal handlers")?;
    let mut listeners = ringbd::server::bind(config)?;
    listeners.extend(inherited);
    if let Some(identity) = identity {
        hand_sockets_to(&listeners, identity)?;
    }
    let metrics = match &settings.metrics {
        Some(address) => Some(
            std::net::TcpListener::bind(address.as_str())
                .with_context(|| format!("cannot serve metrics on {address}"))?,
        ),
        None => None,
    };
    let mut pid_file = None;
    let before_accept = || drop_to_service(&settings, identity, &mut pid_file);
    let mut server = ringbd::server::start_with(config, listeners, before_accept)?;
    announce(&mut server, metrics, config)?;
    server.configure_faults(&faults)?;
    for signal in signals.forever() {
        match signal {
            SIGHUP => match reloader.config() {
                Ok(config) => {
                    if let Err(error) = server.reload(&config) {
                        tracing::error!("SIGHUP: reload failed, keeping the exports: {error:#}");
                    }
                }
                Err(error) => {
                    tracing::error!("SIGHUP: bad configuration, keeping the exports: {error}")
                }
            },
            SIGUSR1 => server.cut_all(),
            _ => break,
        }
    }
    tracing::info!("stopping: finishing in-flight requests");
    systemd::notify("STOPPING=1");
    let result = server.stop();
    drop(pid_file);
    result.map_err(Failure::Runtime)
}

/// Takes inherited sockets (first: before anything opens a descriptor, they are fds 3, 4,
/// ...), reads the configuration file, merges the flags, and starts logging.
/// A panic is a broken invariant (assertion tier): a shard that died would leave a server
/// that silently drops its share of clients, so the whole process stops and its supervisor
/// restarts it. The message and backtrace are printed first.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("ringbd: internal error; aborting so that a supervisor can restart the server");
        std::process::abort();
    }));
}

/// What SIGHUP needs to rebuild the export list: the same file and command line.
struct Reloader {
    file: Option<PathBuf>,
    overrides: Overrides,
    environment: Environment,
    faults: CliFaults,
}

impl Reloader {
    /// Re-reads the configuration file and resolves it with the original command line.
    fn config(&self) -> Result<Config, String> {
        let file = match &self.file {
            Some(path) => Some(config_file::load(path).map_err(|error| error.to_string())?),
            None => None,
        };
        let mut config = config_file::resolve(file.as_ref(), &self.overrides, self.environment)
            .map(|settings| settings.config)
            .map_err(|error| error.to_string())?;
        self.faults.apply(&mut config)?;
        Ok(config)
    }
}

fn settings_and_inherited_sockets(
    args: ServeArgs,
    faults: CliFaults,
) -> Result<(Settings, Vec<Listener>, Reloader), Failure> {
    let inherited = systemd::inherited_listeners()
        .map_err(|error| Failure::Runtime(anyhow::anyhow!("socket activation: {error}")))?;
    let file = match &args.config {
        Some(path) => Some(config_file::load(path).map_err(usage)?),
        None => None,
    };
    let environment = Environment {
        cores: online_cores(),
        socket_activated: !inherited.is_empty(),
    };
    let config_path = args.config.clone();
    let overrides = overrides(args);
    let settings = config_file::resolve(file.as_ref(), &overrides, environment).map_err(usage)?;
    let reloader = Reloader {
        file: config_path,
        overrides,
        environment,
        faults,
    };
    init_logging(&settings.log_level, settings.log_format);
    for listener in &inherited {
        tracing::info!(listener = %listener.describe(), "listening (inherited)");
    }
    Ok((settings, inherited, reloader))
}

/// Runs once the exports are open and the shards ready, before the first accept: writes the
/// PID file, then switches identity.
fn drop_to_service(
    settings: &Settings,
    identity: Option<process::Identity>,
    pid_file: &mut Option<PidFile>,
) -> Result<()> {
    if let Some(path) = &settings.pid_file {
        let created = PidFile::create(path)
            .with_context(|| format!("cannot write the PID file {}", path.display()))?;
        *pid_file = Some(created);
    }
    if let Some(identity) = identity {
        process::switch_identity(identity).with_context(|| {
            format!("cannot switch to uid {} gid {}", identity.uid, identity.gid)
        })?;
        tracing::info!(uid = identity.uid, gid = identity.gid, "switched identity");
    }
    Ok(())
}

/// Starts the metrics endpoint, logs that the server is up and tells the service manager.
fn announce(
    server: &mut ringbd::server::Server,
    metrics: Option<std::net::TcpListener>,
    config: &Config,
) -> Result<()> {
    if let Some(listener) = metrics {
        let address = listener.local_addr().context("metrics address")?;
        tracing::info!(%address, "metrics on /metrics");
        server.serve_metrics(listener)?;
    }
    tracing::info!(
        shards = config.shards,
        exports = config.exports.len(),
        version = env!("CARGO_PKG_VERSION"),
        "ringbd serving"
    );
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} export(s)",
        config.exports.len()
    ));
    Ok(())
}

/// Unix sockets this server created are handed to the identity it will switch to, so that
/// `unix_mode` grants that user and group access.
fn hand_sockets_to(listeners: &[Listener], identity: process::Identity) -> Result<()> {
    for listener in listeners {
        if let Listener::Unix {
            path,
            remove_on_exit: true,
            ..
        } = listener
        {
            std::os::unix::fs::chown(path, Some(identity.uid), Some(identity.gid))
                .with_context(|| format!("cannot chown {}", path.display()))?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["ringbd", "serve"].iter().chain(args))
            .unwrap_or_else(|error| panic!("{error}"));
        match cli.command {
            Commands::Serve(args) => *args,
            Commands::CheckConfig { .. } => unreachable!("serve was parsed"),
        }
    }

    fn net(text: &str) -> ipnet::IpNet {
        access::parse_net(text).unwrap()
    }

    #[test]
    fn tls_and_access_flags_parse() {
        let args = serve_args(&[
            "--tls",
            "require",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--tls-ca",
            "/ca.pem",
            "--tls-psk",
            "/keys.psk",
            "--tls-kernel",
            "off",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "::1",
            "--allow-uid",
            "root",
            "--allow-uid",
            "1000",
            "--export-max-connections",
            "4",
            "memory:1M",
        ]);
        let flags = overrides(args);
        assert_eq!(flags.tls, Some(TlsMode::Require));
        assert_eq!(flags.tls_cert, Some("/c.pem".into()));
        assert_eq!(flags.tls_key, Some("/k.pem".into()));
        assert_eq!(flags.tls_ca, Some("/ca.pem".into()));
        assert_eq!(flags.tls_psk, Some("/keys.psk".into()));
        assert_eq!(flags.tls_kernel, Some(KernelTls::Off));
        assert_eq!(flags.allow, [net("10.0.0.0/8"), net("::1/128")]);
        assert_eq!(flags.allow_uids, [0, 1000]);
        assert_eq!(flags.export_max_connections, Some(4));
        let plain = overrides(serve_args(&["memory:1M"]));
        assert_eq!(plain.tls, None);
        assert!(plain.allow.is_empty() && plain.allow_uids.is_empty());
        for bad in [
            &["--tls", "maybe"][..],
            &["--tls-kernel", "on"],
            &["--allow", "10.0.0.1/8"],
            &["--allow", "nowhere"],
            &["--allow-uid", "no-such-user-ringbd"],
            &["--export-max-connections", "-1"],
        ] {
            let args = ["ringbd", "serve"].iter().chain(bad).chain(&["memory:1M"]);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sighup_keeps_the_tls_and_access_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringbd.toml");
        let file = |text: &str| std::fs::write(&path, text).unwrap();
        file(
            "[server]\nallow = [\"192.168.0.0/16\"]\n[[export]]\nname = \"a\"\npath = \"memory:1M\"\n",
        );
        let config = path.to_str().unwrap();
        let args = serve_args(&[
            "--config",
            config,
            "--tls",
            "on",
            "--tls-psk",
            "/keys.psk",
            "--allow",
            "10.0.0.0/8",
            "--export-max-connections",
            "3",
        ]);
        let reloader = Reloader {
            file: args.config.clone(),
            overrides: overrides(args),
            environment: Environment {
                cores: 1,
                socket_activated: false,
            },
            faults: CliFaults::default(),
        };
        let before = reloader.config().unwrap();
        assert_eq!(before.tls.mode, TlsMode::On);
        assert_eq!(before.listener_policy.allow, [net("10.0.0.0/8")]);
        file(
            "[server]\ntls = \"off\"\nallow_uids = [5]\n[[export]]\nname = \"b\"\n\
              path = \"memory:1M\"\nallow_clients = [\"PSK:alice\"]\n\n[[export]]\n\
              name = \"c\"\npath = \"memory:1M\"\nmax_connections = 9\n",
        );
        let after = reloader.config().unwrap();
        assert_eq!(after.tls.mode, TlsMode::On, "--tls outlives the file");
        assert_eq!(after.tls.psk, Some("/keys.psk".into()));
        assert_eq!(after.listener_policy.allow, [net("10.0.0.0/8")]);
        assert_eq!(after.listener_policy.allow_uids, [5], "from the new file");
        let names: Vec<_> = after.exports.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        let clients = &after.exports[0].policy.allow_clients;
        assert_eq!(
            clients.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["PSK:alice"]
        );
        assert_eq!(after.exports[0].policy.max_connections, Some(3));
        assert_eq!(after.exports[1].policy.max_connections, Some(9));
        file("[server]\ntls_cert = \"/c\"\n[[export]]\nname = \"a\"\npath = \"memory:1M\"\n");
        let error = reloader.config().unwrap_err();
        assert!(
            error.contains("line 2") && error.contains("server.tls_cert"),
            "{error}"
        );
    }

    #[test]
    fn help_shows_tls_and_access_examples() {
        let mut command = command_line();
        let serve = command.find_subcommand_mut("serve").unwrap();
        let help = serve.render_long_help().to_string();
        for expected in [
            "--tls require --tls-cert",
            "--tls-psk",
            "--allow 10.0.0.0/8",
            "--allow-uid",
        ] {
            assert!(help.contains(expected), "{expected} missing:\n{help}");
        }
    }
}
