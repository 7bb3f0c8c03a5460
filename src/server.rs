//! The control plane: opens exports, binds listeners, starts one pinned shard thread per
//! core, accepts connections and hands each to the least-loaded shard, and stops cleanly.
//!
//! # Why one acceptor thread
//!
//! Unix sockets have no SO_REUSEPORT load balancing, and accepting is not on the request
//! path, so a single blocking acceptor (poll over every listener plus a stop eventfd) feeds
//! the shards over crossbeam channels and wakes each through an eventfd read posted on its
//! ring. Placement picks the shard with the fewest live connections.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use crossbeam_channel::Sender;

use crate::config::{Config, Listen};
use crate::ring::sys;
use crate::shard::{self, Export, NewConn, ShardLoad, Shared, Socket};
use crate::target::backend::{FileBackend, OpenOptions};
use crate::target::export::ExportInfo;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket; the path is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(listener) => listener.as_raw_fd(),
            Listener::Unix(listener, _) => listener.as_raw_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<NewConn> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept()?;
                Ok(NewConn {
                    socket: Socket::Tcp(stream),
                    peer: peer.to_string(),
                })
            }
            Listener::Unix(listener, path) => {
                let (stream, _) = listener.accept()?;
                Ok(NewConn {
                    socket: Socket::Unix(stream),
                    peer: format!("unix:{}", path.display()),
                })
            }
        }
    }
}

/// Binds every configured listener.
pub fn bind(config: &Config) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for listen in &config.listen {
        match listen {
            Listen::Tcp(address) => {
                let listener = TcpListener::bind(address.as_str())
                    .with_context(|| format!("cannot listen on {address}"))?;
                tracing::info!(address = %listener.local_addr()?, "listening (tcp)");
                listeners.push(Listener::Tcp(listener));
            }
            Listen::Unix(path) => {
                if path.exists() {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        bail!("{} is in use by a running server", path.display());
                    }
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove stale socket {}", path.display())
                    })?;
                }
                let listener = UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                tracing::info!(path = %path.display(), "listening (unix)");
                listeners.push(Listener::Unix(listener, path.clone()));
            }
        }
    }
    Ok(listeners)
}

/// Opens every export's backend and derives what the protocol layer advertises.
pub fn open_exports(config: &Config) -> Result<Vec<Export>> {
    let mut exports = Vec::new();
    for (id, spec) in config.exports.iter().enumerate() {
        let options = OpenOptions {
            source: spec.source.clone(),
            read_only: spec.read_only,
            cache: spec.cache,
        };
        let backend = FileBackend::open(&options)
            .with_context(|| format!("cannot open export '{}' ({:?})", spec.name, spec.source))?;
        let info = ExportInfo {
            id,
            name: spec.name.clone(),
            description: spec.description.clone(),
            size: backend.size(),
            read_only: spec.read_only,
            caps: backend.capabilities(),
            block_size: backend.block_size(),
        };
        tracing::info!(
            export = %info.name, size = info.size, direct = backend.is_direct(),
            min_block = info.block_size.minimum, read_only = info.read_only, "export ready"
        );
        exports.push(Export { info, backend });
    }
    Ok(exports)
}

struct ShardThread {
    sender: Sender<NewConn>,
    wake: OwnedFd,
    load: Arc<ShardLoad>,
    thread: JoinHandle<()>,
}

/// A running server: stop it with [`Server::stop`].
pub struct Server {
    shared: Arc<Shared>,
    shards: Vec<ShardThread>,
    acceptor: Option<JoinHandle<()>>,
    acceptor_wake: Arc<OwnedFd>,
    unix_paths: Vec<PathBuf>,
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
    let exports = open_exports(config)?;
    let infos = exports.iter().map(|export| export.info.clone()).collect();
    let shared = Arc::new(Shared {
        exports,
        infos,
        stopping: Default::default(),
        queue_depth: config.queue_depth,
        pool_bytes: config.buffer_mib << 20,
        stats: crate::stats::StatsHub::new(config.shards, config.exports.len()),
    });
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
    let acceptor_wake = Arc::new(sys::eventfd().context("eventfd")?);
    let unix_paths = listeners
        .iter()
        .filter_map(|listener| match listener {
            Listener::Unix(_, path) => Some(path.clone()),
            Listener::Tcp(_) => None,
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
    let (stop_fd, stopping) = (acceptor_wake.clone(), shared.clone());
    let acceptor = std::thread::Builder::new()
        .name("ringbd-accept".into())
        .spawn(move || accept_loop(listeners, targets, stop_fd, stopping))
        .context("cannot spawn the acceptor")?;
    Ok(Server {
        shared,
        shards,
        acceptor: Some(acceptor),
        acceptor_wake,
        unix_paths,
    })
}

fn accept_loop(
    listeners: Vec<Listener>,
    shards: Vec<(Sender<NewConn>, RawFd, Arc<ShardLoad>)>,
    stop: Arc<OwnedFd>,
    shared: Arc<Shared>,
) {
    let mut fds: Vec<RawFd> = listeners.iter().map(Listener::fd).collect();
    fds.push(stop.as_raw_fd());
    let mut ready = Vec::with_capacity(fds.len());
    while !shared.stopping.load(Ordering::Acquire) {
        if let Err(error) = sys::poll_readable(&fds, 1000, &mut ready) {
            tracing::error!(%error, "poll failed");
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        for (listener, _) in listeners.iter().zip(&ready).filter(|(_, ready)| **ready) {
            match listener.accept() {
                Ok(conn) => {
                    let (sender, wake, _) = shards
                        .iter()
                        .min_by_key(|(_, _, load)| load.connections.load(Ordering::Relaxed))
                        .expect("at least one shard");
                    if sender.send(conn).is_ok() {
                        sys::eventfd_signal(*wake);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    if error.raw_os_error() == Some(libc::EMFILE) {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            }
        }
    }
}

impl Server {
    /// Stops accepting, lets shards finish in-flight requests (ESHUTDOWN for new ones),
    /// syncs every export and removes unix sockets.
    pub fn stop(mut self) -> Result<()> {
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
        for export in &self.shared.exports {
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
