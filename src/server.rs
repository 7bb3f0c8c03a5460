//! The control plane: opens exports, binds listeners, starts one pinned shard thread per
//! core, accepts connections and hands each to the least-loaded shard, and stops cleanly.
//!
//! # Why one acceptor thread
//!
//! Unix sockets have no SO_REUSEPORT load balancing, and accepting is not on the request
//! path, so a single blocking acceptor (poll over every listener plus a stop eventfd) feeds
//! the shards over crossbeam channels and wakes each through an eventfd read posted on its
//! ring. Placement picks the shard with the fewest live connections, and among those the one
//! on the CPU receiving the connection's packets, then one on a CPU that takes the exports'
//! disk interrupts ([`crate::placement`]).
//!
//! # Connection limit
//!
//! The acceptor counts open connections as every shard's live connections plus those still
//! queued in its channel, and closes a new connection at once (logged, at most once a second
//! with a count of the others) when `max_connections` are open. Handshake connections count.
//!
//! # Listeners
//!
//! An IPv6 wildcard such as `[::]:10809` also serves IPv4 (dual stack, whatever the
//! `bindv6only` sysctl says) unless an IPv4 address with the same port is configured too;
//! then each family gets its own socket. Unix sockets are created with `unix_mode` and
//! removed at exit; inherited (socket-activated) ones are neither.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::Sender;

use crate::access::Peer;
use crate::config::{Config, ExportSpec, Listen, Placement};
use crate::exports::Exports;
use crate::metrics::{self, MetricsServer, ServerCounters};
use crate::placement;
use crate::ring::sys;
use crate::security::{Security, SecurityCell};
use crate::shard::{self, Export, NewConn, ShardLoad, Shared, Socket};
use crate::target::backend::{FileBackend, OpenOptions, Source};
use crate::target::export::ExportInfo;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path (for logs and removal).
        path: PathBuf,
        /// Remove the path when the server stops (false for inherited sockets).
        remove_on_exit: bool,
    },
}

/// Pending connections the kernel queues per listener before `accept`.
const LISTEN_BACKLOG: i32 = 1024;
/// How often the acceptor logs refused connections at most.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl Listener {
    /// `tcp ADDRESS` or `unix PATH`, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(address) => format!("tcp {address}"),
                Err(_) => "tcp (unknown address)".into(),
            },
            Listener::Unix { path, .. } => format!("unix {}", path.display()),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(listener) => listener.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<NewConn> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, address) = listener.accept()?;
                let receive_cpu = socket2::SockRef::from(&stream).cpu_affinity().ok();
                Ok(NewConn {
                    socket: Socket::Tcp(stream),
                    peer: Peer::tcp(address),
                    receive_cpu,
                })
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept()?;
                let peer = Peer::unix(stream.as_fd())?;
                Ok(NewConn {
                    socket: Socket::Unix(stream),
                    peer,
                    receive_cpu: None,
                })
            }
        }
    }
}

/// Binds every configured listener.
pub fn bind(config: &Config) -> Result<Vec<Listener>> {
    let ipv4_ports = ipv4_ports(config);
    let mut listeners = Vec::new();
    for listen in &config.listen {
        match listen {
            Listen::Tcp(address) => {
                let listener = bind_tcp(address, &ipv4_ports)
                    .with_context(|| format!("cannot listen on {address}"))?;
                tracing::info!(address = %listener.local_addr()?, "listening (tcp)");
                listeners.push(Listener::Tcp(listener));
            }
            Listen::Unix(path) => {
                let listener = bind_unix(path, config.unix_mode)?;
                tracing::info!(path = %path.display(), "listening (unix)");
                listeners.push(Listener::Unix {
                    listener,
                    path: path.clone(),
                    remove_on_exit: true,
                });
            }
        }
    }
    Ok(listeners)
}

/// Ports that some configured TCP listener serves over IPv4.
fn ipv4_ports(config: &Config) -> Vec<u16> {
    let addresses = config.listen.iter().filter_map(|listen| match listen {
        Listen::Tcp(address) => address.to_socket_addrs().ok(),
        Listen::Unix(_) => None,
    });
    addresses
        .flatten()
        .filter(SocketAddr::is_ipv4)
        .map(|address| address.port())
        .collect()
}

/// Binds the first address `address` resolves to that can be bound.
fn bind_tcp(address: &str, ipv4_ports: &[u16]) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for resolved in address.to_socket_addrs()? {
        let v6_only = resolved.is_ipv6() && ipv4_ports.contains(&resolved.port());
        match bind_tcp_address(resolved, v6_only) {
            Ok(listener) => return Ok(listener),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("the name resolves to no address")))
}

fn bind_tcp_address(address: SocketAddr, v6_only: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn bind_unix(path: &Path, mode: Option<u32>) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set mode {mode:04o} on {}", path.display()))?;
    }
    Ok(listener)
}

/// Creates `path` as a sparse file of `bytes` if it does not exist; returns whether it did.
/// An existing file is never resized.
fn create_if_missing(path: &Path, bytes: u64) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(file) => {
            let result = file.set_len(bytes).and_then(|()| file.sync_all());
            if let Err(error) = result {
                let _ = std::fs::remove_file(path);
                return Err(error).with_context(|| format!("cannot size {}", path.display()));
            }
            Ok(true)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let size = std::fs::metadata(path).map(|metadata| metadata.len());
            if let Ok(size) = size
                && size != bytes
                && path.metadata().is_ok_and(|metadata| metadata.is_file())
            {
                tracing::warn!(
                    path = %path.display(), size, create_bytes = bytes,
                    "the file exists; serving it at its own size (size/--create only create)"
                );
            }
            Ok(false)
        }
        Err(error) => Err(error).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Opens the exports of `config` into `registry`, reusing every export whose configuration
/// is unchanged (same id, backend, faults and statistics); returns the ids, in config order,
/// that new clients should see. Nothing becomes visible here: on error the caller keeps the
/// old list (exports opened before the error stay unused in the registry).
pub fn open_exports(config: &Config, registry: &Exports) -> Result<Vec<usize>> {
    let mut ids = Vec::new();
    for spec in &config.exports {
        let reusable = |export: &&Export| export.spec.same_except_policy(spec);
        if let Some(existing) = registry.iter().find(reusable) {
            if *existing.policy() != spec.policy {
                tracing::info!(export = %spec.name, "access policy changed");
                existing.set_policy(spec.policy.clone());
            }
            ids.push(existing.info.id);
            continue;
        }
        ids.push(open_export(spec, registry)?);
    }
    Ok(ids)
}

fn open_export(spec: &ExportSpec, registry: &Exports) -> Result<usize> {
    if let (Source::Path(path), Some(bytes)) = (&spec.source, spec.create_bytes)
        && create_if_missing(path, bytes)?
    {
        tracing::info!(export = %spec.name, path = %path.display(), bytes, "created a sparse file");
    }
    let options = OpenOptions {
        source: spec.source.clone(),
        read_only: spec.read_only,
        cache: spec.cache,
    };
    let backend = FileBackend::open(&options)
        .with_context(|| format!("cannot open export '{}' ({:?})", spec.name, spec.source))?;
    let info = ExportInfo {
        id: registry.next_id(),
        name: spec.name.clone(),
        description: spec.description.clone(),
        size: backend.size(),
        read_only: spec.read_only,
        caps: backend.capabilities(),
        block_size: backend.block_size(),
    };
    info.check()
        .map_err(|error| anyhow::anyhow!("export '{}' cannot be served: {error}", spec.name))?;
    tracing::info!(
        export = %info.name, size = info.size, direct = backend.is_direct(),
        min_block = info.block_size.minimum, read_only = info.read_only, "export ready"
    );
    let export = Export::new(info, backend, spec.clone()).map_err(anyhow::Error::msg)?;
    registry.add(export).map_err(anyhow::Error::msg)
}

struct ShardThread {
    cpu: Option<usize>,
    sender: Sender<NewConn>,
    wake: OwnedFd,
    load: Arc<ShardLoad>,
    thread: JoinHandle<()>,
}

/// Starts one pinned thread per shard and waits until every ring is set up.
fn spawn_shards(config: &Config, shared: &Arc<Shared>) -> Result<Vec<ShardThread>> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(config.shards);
    let mut shards = Vec::new();
    for index in 0..config.shards {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let wake = sys::eventfd().context("eventfd")?;
        let wake_fd = wake.as_raw_fd();
        let load = Arc::new(ShardLoad::default());
        let (shared, load_for_shard, ready) = (shared.clone(), load.clone(), ready_tx.clone());
        let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
        let thread = std::thread::Builder::new()
            .name(format!("ringbd-shard-{index}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                let result = shard::run(index, shared, receiver, wake_fd, load_for_shard, ready);
                if let Err(error) = result {
                    tracing::error!(shard = index, %error, "shard failed");
                }
            })
            .context("cannot spawn a shard thread")?;
        shards.push(ShardThread {
            cpu: core.map(|core| core.id),
            sender,
            wake,
            load,
            thread,
        });
    }
    drop(ready_tx);
    for _ in 0..config.shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => bail!("{message}"),
            Err(_) => bail!("a shard exited during startup"),
        }
    }
    Ok(shards)
}

/// Tells each shard's load which connections it should draw among equally loaded shards
/// ([`placement`]): with `placement = "interrupts"`, those received on its CPU (first shard
/// per CPU), and all of them if it runs on a CPU that takes the exports' disk interrupts.
fn follow_interrupts(config: &Config, shards: &[ShardThread]) {
    if config.placement == Placement::LeastLoaded {
        for shard in shards {
            shard.load.set_receive_cpu(None);
            shard.load.preferred.store(false, Ordering::Relaxed);
        }
        return;
    }
    let cpus: Vec<Option<usize>> = shards.iter().map(|shard| shard.cpu).collect();
    for (shard, cpu) in shards.iter().zip(placement::receive_cpus(&cpus)) {
        shard.load.set_receive_cpu(cpu);
    }
    let mut irq_cpus = placement::CpuSet::new();
    for spec in &config.exports {
        let Source::Path(path) = &spec.source else {
            continue;
        };
        let Some(dev) = placement::device_of(path) else {
            continue;
        };
        match placement::completion_cpus(Path::new("/"), dev) {
            Some(cpus) => {
                tracing::debug!(export = %spec.name, ?dev, ?cpus, "disk completion interrupts");
                irq_cpus.extend(cpus);
            }
            None => tracing::debug!(export = %spec.name, ?dev, "disk interrupts unknown"),
        }
    }
    let preferred = placement::preferred_shards(&cpus, &irq_cpus);
    for (shard, &prefer) in shards.iter().zip(&preferred) {
        shard.load.preferred.store(prefer, Ordering::Relaxed);
    }
    let chosen: Vec<usize> = (0..shards.len()).filter(|&i| preferred[i]).collect();
    if !chosen.is_empty() {
        tracing::info!(
            irq_cpus = ?irq_cpus,
            shards = ?chosen,
            "disk completion interrupts go to some CPUs only: new connections prefer the \
             shards there among equally loaded ones"
        );
    }
}

/// Counters the acceptor keeps.
#[derive(Debug, Default)]
struct AcceptCounters {
    refused_total: AtomicU64,
    denied_total: AtomicU64,
}

/// A running server: stop it with [`Server::stop`].
pub struct Server {
    shared: Arc<Shared>,
    shards: Vec<ShardThread>,
    acceptor: Option<JoinHandle<()>>,
    acceptor_wake: Arc<OwnedFd>,
    unix_paths: Vec<PathBuf>,
    counters: Arc<AcceptCounters>,
    max_connections: usize,
    metrics: Option<MetricsServer>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// Starts shards and the acceptor over already-bound listeners.
pub fn start(config: &Config, listeners: Vec<Listener>) -> Result<Server> {
    start_with(config, listeners, || Ok(()))
}

/// Like [`start`], running `before_accept` once the exports are open and every shard is
/// ready, before the first connection is accepted (the place to drop privileges).
pub fn start_with(
    config: &Config,
    listeners: Vec<Listener>,
    before_accept: impl FnOnce() -> Result<()>,
) -> Result<Server> {
    let exports = Exports::default();
    let visible = open_exports(config, &exports)?;
    exports.set_visible(&visible);
    let security = Security::load(config).map_err(anyhow::Error::msg)?;
    let shared = Arc::new(Shared {
        exports,
        security: SecurityCell::new(security),
        stopping: Default::default(),
        queue_depth: config.queue_depth,
        pool_bytes: config.buffer_mib << 20,
        stats: crate::stats::StatsHub::new(config.shards, visible.len()),
        handshake_timeout: Duration::from_secs(config.handshake_timeout_seconds),
    });
    let shards = spawn_shards(config, &shared)?;
    follow_interrupts(config, &shards);
    before_accept()?;
    let acceptor_wake = Arc::new(sys::eventfd().context("eventfd")?);
    let unix_paths = listeners
        .iter()
        .filter_map(|listener| match listener {
            Listener::Unix {
                path,
                remove_on_exit: true,
                ..
            } => Some(path.clone()),
            _ => None,
        })
        .collect();
    let targets: Vec<(Sender<NewConn>, RawFd, Arc<ShardLoad>)> = shards
        .iter()
        .map(|shard| {
            (
                shard.sender.clone(),
                shard.wake.as_raw_fd(),
                shard.load.clone(),
            )
        })
        .collect();
    let counters = Arc::new(AcceptCounters::default());
    let acceptor = Acceptor {
        listeners,
        shards: targets,
        stop: acceptor_wake.clone(),
        shared: shared.clone(),
        counters: counters.clone(),
        max_connections: config.max_connections,
    };
    let acceptor = std::thread::Builder::new()
        .name("ringbd-accept".into())
        .spawn(move || acceptor.run())
        .context("cannot spawn the acceptor")?;
    Ok(Server {
        shared,
        shards,
        acceptor: Some(acceptor),
        acceptor_wake,
        unix_paths,
        counters,
        max_connections: config.max_connections,
        metrics: None,
    })
}

/// The acceptor thread's state.
struct Acceptor {
    listeners: Vec<Listener>,
    shards: Vec<(Sender<NewConn>, RawFd, Arc<ShardLoad>)>,
    stop: Arc<OwnedFd>,
    shared: Arc<Shared>,
    counters: Arc<AcceptCounters>,
    max_connections: usize,
}

impl Acceptor {
    fn run(self) {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(Listener::fd).collect();
        fds.push(self.stop.as_raw_fd());
        let mut ready = Vec::with_capacity(fds.len());
        let mut refused_log = RefusedLog::default();
        while !self.shared.stopping.load(Ordering::Acquire) {
            if let Err(error) = sys::poll_readable(&fds, 1000, &mut ready) {
                tracing::error!(%error, "poll failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let listeners = self.listeners.iter().zip(&ready);
            for (listener, _) in listeners.filter(|(_, ready)| **ready) {
                match listener.accept() {
                    Ok(conn) => self.place(conn, &mut refused_log),
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        if error.raw_os_error() == Some(libc::EMFILE) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            }
        }
    }

    /// Open connections: live in the shards plus queued in their channels.
    fn open_connections(&self) -> usize {
        let open = self
            .shards
            .iter()
            .map(|(sender, _, load)| load.connections.load(Ordering::Relaxed) + sender.len());
        open.sum()
    }

    fn place(&self, conn: NewConn, refused_log: &mut RefusedLog) {
        let security = self.shared.security.current();
        if let Err(denied) = security.listener.admit(&conn.peer) {
            self.counters.denied_total.fetch_add(1, Ordering::Relaxed);
            refused_log.denied(&conn.peer, &denied);
            return;
        }
        let open = self.open_connections();
        if open >= self.max_connections {
            self.counters.refused_total.fetch_add(1, Ordering::Relaxed);
            refused_log.refused(&conn.peer, open, self.max_connections);
            drop(conn);
            return;
        }
        let loads = self.shards.iter().map(|(_, _, load)| placement::Candidate {
            connections: load.connections.load(Ordering::Relaxed),
            receive_cpu: load.receive_cpu(),
            preferred: load.preferred.load(Ordering::Relaxed),
        });
        let index = placement::choose(loads, conn.receive_cpu).expect("at least one shard");
        tracing::debug!(peer = %conn.peer, receive_cpu = conn.receive_cpu, shard = index, "placed");
        let (sender, wake, _) = &self.shards[index];
        if sender.send(conn).is_ok() {
            sys::eventfd_signal(*wake);
        }
    }
}

/// Logs refused connections at most once per [`REFUSED_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct RefusedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusedLog {
    /// Whether to log this refusal now; counts it as suppressed otherwise. Returns how many
    /// were suppressed since the last line.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSED_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    fn refused(&mut self, peer: &Peer, open: usize, max_connections: usize) {
        if let Some(also_refused) = self.due() {
            tracing::warn!(
                %peer, open, max_connections, also_refused,
                "connection refused: max_connections reached"
            );
        }
    }

    /// A peer the listener-wide rules (`allow`, `allow_uids`) keep out.
    fn denied(&mut self, peer: &Peer, denied: &crate::access::Denied) {
        if let Some(also_refused) = self.due() {
            tracing::warn!(
                %peer, reason = %denied, also_refused,
                "connection refused by the listener's access rules"
            );
        }
    }
}

impl Server {
    /// Opens the control socket (fault rules reach exports through their specs).
    pub fn configure_faults(&mut self, settings: &crate::faults::FaultSettings) -> Result<()> {
        if let Some(path) = &settings.control {
            crate::control::spawn(path, self.shared.clone())
                .with_context(|| format!("cannot open the control socket {}", path.display()))?;
            self.unix_paths.push(path.clone());
        }
        Ok(())
    }

    /// Reloads the export list (SIGHUP): exports new in `config` are opened and offered to
    /// new clients, exports no longer in it stop being offered while running connections
    /// continue, unchanged exports keep everything. All or nothing: if an export cannot be
    /// opened, the previous list stays in force.
    pub fn reload(&mut self, config: &Config) -> Result<()> {
        let exports = &self.shared.exports;
        let before: Vec<usize> = exports.visible().iter().map(|info| info.id).collect();
        let security = Security::load(config).map_err(anyhow::Error::msg)?;
        let ids = open_exports(config, exports)?;
        exports.set_visible(&ids);
        self.shared.security.replace(security);
        follow_interrupts(config, &self.shards);
        let added: Vec<&str> = ids
            .iter()
            .filter(|id| !before.contains(id))
            .map(|&id| exports[id].info.name.as_str())
            .collect();
        let removed: Vec<&str> = before
            .iter()
            .filter(|id| !ids.contains(id))
            .map(|&id| exports[id].info.name.as_str())
            .collect();
        tracing::info!(?added, ?removed, exports = ids.len(), "exports reloaded");
        Ok(())
    }

    /// Simulates a power cut on every export with power-loss simulation (SIGUSR1).
    pub fn cut_all(&self) {
        crate::control::cut_all(&self.shared);
    }

    /// Serves Prometheus metrics on `listener` until the server stops.
    pub fn serve_metrics(&mut self, listener: TcpListener) -> Result<()> {
        assert!(self.metrics.is_none(), "one metrics endpoint");
        let (shared, counters) = (self.shared.clone(), self.counters.clone());
        let max_connections = self.max_connections;
        let render = move || {
            let server = ServerCounters {
                connections_refused_total: counters.refused_total.load(Ordering::Relaxed),
                connections_denied_total: counters.denied_total.load(Ordering::Relaxed),
                connections_max: max_connections,
            };
            let infos = shared.exports.infos();
            let mut snapshot = shared.stats.snapshot();
            snapshot.ensure(infos.len());
            metrics::render(&snapshot, &infos, &server)
        };
        let endpoint = metrics::spawn(listener, render).context("cannot start metrics")?;
        self.metrics = Some(endpoint);
        Ok(())
    }

    /// Stops accepting, lets shards finish in-flight requests (ESHUTDOWN for new ones),
    /// syncs every export and removes unix sockets.
    pub fn stop(mut self) -> Result<()> {
        if let Some(metrics) = self.metrics.take() {
            metrics.stop();
        }
        self.shared.stopping.store(true, Ordering::Release);
        sys::eventfd_signal(self.acceptor_wake.as_raw_fd());
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for shard in &self.shards {
            sys::eventfd_signal(shard.wake.as_raw_fd());
        }
        for shard in self.shards.drain(..) {
            let _ = shard.thread.join();
        }
        for path in &self.unix_paths {
            let _ = std::fs::remove_file(path);
        }
        let mut result = Ok(());
        for export in self.shared.exports.iter() {
            if !export.info.read_only
                && let Err(error) = export.backend.sync()
            {
                tracing::error!(export = %export.info.name, %error, "final sync failed");
                result = Err(error).context("final sync failed");
            }
        }
        tracing::info!("stopped");
        result
    }
}
