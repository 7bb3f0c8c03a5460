//! The export registry: every export the server ever opened, by stable id, and the list a new
//! client may choose from.
//!
//! # Reload contract
//!
//! Ids index an append-only table of at most [`EXPORTS_MAX`] slots, so a shard's
//! `exports[id]` stays valid for the life of the process. A reload (SIGHUP) publishes a new
//! *visible* list: exports it adds appear to new clients, exports it drops stop being offered
//! (NBD_OPT_LIST, INFO/GO answer ERR_UNKNOWN) while connections already using them go on.
//! An export whose configuration did not change keeps its id, backend and statistics.
//! Each connection snapshots the visible list when it is accepted (one read lock per
//! connection, none per request).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::access::{Denied, ExportPolicy};
use crate::config::ExportSpec;
use crate::faults::{FaultState, PowerLossConfig, UNDO_BYTES_MAX_DEFAULT};
use crate::target::backend::FileBackend;
use crate::target::export::ExportInfo;
use crate::target::fault::Rule;

/// Most exports one server process can ever open (reloads included).
pub const EXPORTS_MAX: usize = 1024;

/// An export with its backend, shared by all shards.
#[derive(Debug)]
pub struct Export {
    /// What the protocol layer sees (`info.id` is this export's registry id).
    pub info: ExportInfo,
    /// The same, as validation sees it: any alignment is served (reads widen to the
    /// direct-I/O span, writes fall back to the buffered descriptor), so the minimum block is
    /// 1 here while the handshake keeps advertising the real direct-I/O minimum.
    pub lenient: ExportInfo,
    /// Where the bytes live.
    pub backend: FileBackend,
    /// Injected faults and power-loss simulation.
    pub faults: FaultState,
    /// The configuration it was opened from (a reload reuses the export when it is equal
    /// but for the access policy).
    pub spec: ExportSpec,
    /// Who may use it: `spec.policy` at first, replaced by a reload that changes only it.
    policy: RwLock<Arc<ExportPolicy>>,
    /// Clients in the transmission phase on it (claimed at GO, released at close).
    connections: AtomicU32,
}

impl Export {
    /// Builds an export, with the fault settings of its spec; `info.id` must be the id the
    /// registry will give it.
    pub fn new(info: ExportInfo, backend: FileBackend, spec: ExportSpec) -> Result<Export, String> {
        let mut lenient = info.clone();
        lenient.block_size.minimum = 1;
        let rules = spec
            .faults
            .rules
            .iter()
            .map(|rule| Rule::parse(rule))
            .collect::<Result<Vec<_>, _>>()?;
        let power = spec.faults.power_loss.map(|mode| PowerLossConfig {
            mode,
            undo_bytes_max: spec
                .faults
                .power_loss_max_mib
                .map_or(UNDO_BYTES_MAX_DEFAULT, |mib| mib.saturating_mul(1 << 20)),
        });
        let faults = FaultState::new(rules, spec.faults.seed.unwrap_or(0), power)?;
        if !spec.faults.rules.is_empty() || power.is_some() {
            tracing::warn!(export = %info.name, rules = ?spec.faults.rules,
                seed = spec.faults.seed.unwrap_or(0), power_loss = ?spec.faults.power_loss,
                "fault injection is ON");
        }
        let policy = RwLock::new(Arc::new(spec.policy.clone()));
        Ok(Export {
            info,
            lenient,
            backend,
            faults,
            spec,
            policy,
            connections: AtomicU32::new(0),
        })
    }

    /// The access policy new clients are checked against.
    pub fn policy(&self) -> Arc<ExportPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Replaces the access policy (reload); connections already admitted go on.
    pub fn set_policy(&self, policy: ExportPolicy) {
        *self
            .policy
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(policy);
    }

    /// Takes a connection slot if the policy's `max_connections` allows one more client.
    pub fn claim(&self) -> Result<(), Denied> {
        let policy = self.policy();
        let mut open = self.connections.load(Ordering::Relaxed);
        loop {
            policy.check_connections(open)?;
            match self.connections.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => open = now,
            }
        }
    }

    /// Gives back a slot taken by [`Export::claim`].
    pub fn release(&self) {
        let before = self.connections.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "released a connection slot never claimed");
    }

    /// Clients currently in the transmission phase.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Every export by id, and the currently visible list.
#[derive(Debug)]
pub struct Exports {
    slots: Box<[OnceLock<Export>]>,
    count: AtomicUsize,
    adding: Mutex<()>,
    visible: RwLock<Arc<Vec<ExportInfo>>>,
}

impl Default for Exports {
    fn default() -> Self {
        Exports {
            slots: (0..EXPORTS_MAX).map(|_| OnceLock::new()).collect(),
            count: AtomicUsize::new(0),
            adding: Mutex::new(()),
            visible: RwLock::new(Arc::new(Vec::new())),
        }
    }
}

impl std::ops::Index<usize> for Exports {
    type Output = Export;

    fn index(&self, id: usize) -> &Export {
        self.slots[id]
            .get()
            .expect("export id was handed out by this registry")
    }
}

impl Exports {
    /// The id the next added export gets.
    pub fn next_id(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Adds an export (its `info.id` must be [`Exports::next_id`]); returns its id.
    pub fn add(&self, export: Export) -> Result<usize, String> {
        let _guard = self
            .adding
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let id = self.count.load(Ordering::Acquire);
        if id >= EXPORTS_MAX {
            return Err(format!(
                "more than {EXPORTS_MAX} exports opened in this process"
            ));
        }
        assert_eq!(export.info.id, id, "export built for another id");
        assert!(self.slots[id].set(export).is_ok(), "slot {id} filled twice");
        self.count.store(id + 1, Ordering::Release);
        Ok(id)
    }

    /// Number of exports ever added.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether none was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every export ever added, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.slots[..self.len()].iter().filter_map(OnceLock::get)
    }

    /// Every export's info, by id (for metrics).
    pub fn infos(&self) -> Vec<ExportInfo> {
        self.iter().map(|export| export.info.clone()).collect()
    }

    /// The exports a new client may choose from.
    pub fn visible(&self) -> Arc<Vec<ExportInfo>> {
        self.visible
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Publishes the list new clients see.
    pub fn set_visible(&self, ids: &[usize]) {
        let infos = ids.iter().map(|&id| self[id].info.clone()).collect();
        *self
            .visible
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(infos);
    }

    /// The visible export named `name`, if any.
    pub fn find_visible(&self, name: &str) -> Option<&Export> {
        let id = self.visible().iter().find(|info| info.name == name)?.id;
        Some(&self[id])
    }
}
