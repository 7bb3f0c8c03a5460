//! Per-export fault state shared by every shard: the fault [`Policy`], and, when power-loss
//! simulation is on, the undo log and the power-cut coordination.
//!
//! # Cost when unused
//!
//! An export without rules checks one relaxed atomic per request. Power-loss bookkeeping
//! (a mutex per write, an in-flight counter) exists only on exports that enabled it.
//!
//! # Power-cut contract
//!
//! [`FaultState::power_cut`] marks the export as cutting and bumps its epoch, so every
//! shard closes that export's connections at their next request (a dead disk answers
//! nothing). It waits until no operation of the export is in flight, puts the pre-images
//! back, and clears the cutting flag: the export is back for the test to reconnect.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::target::fault::{Decision, DeviceState, FaultOp, Policy, Rule};
use crate::target::volatile::{CutMode, CutReport, UndoLog};

/// Longest a power cut waits for in-flight operations of the export to finish.
pub const CUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of the undo log, in bytes.
pub const UNDO_BYTES_MAX_DEFAULT: u64 = 256 << 20;

/// Server-wide fault settings (per-export ones live in each export's spec).
#[derive(Debug, Clone, Default)]
pub struct FaultSettings {
    /// Control socket path.
    pub control: Option<std::path::PathBuf>,
}

/// Power-loss simulation settings of one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerLossConfig {
    /// What a cut does by default.
    pub mode: CutMode,
    /// Bound of the undo log.
    pub undo_bytes_max: u64,
}

/// Power-loss bookkeeping.
#[derive(Debug)]
pub struct PowerLoss {
    mode: CutMode,
    undo: Mutex<UndoLog>,
    epoch: AtomicU64,
    cutting: AtomicBool,
    in_flight: AtomicUsize,
    cuts: AtomicU64,
}

/// Faults of one export.
#[derive(Debug)]
pub struct FaultState {
    active: AtomicBool,
    policy: Mutex<Policy>,
    power: OnceLock<PowerLoss>,
}

impl FaultState {
    /// A state with `rules` seeded by `seed`, and optional power-loss simulation.
    pub fn new(
        rules: Vec<Rule>,
        seed: u64,
        power: Option<PowerLossConfig>,
    ) -> Result<Self, String> {
        let policy = Policy::new(rules, seed)?;
        let state = FaultState {
            active: AtomicBool::new(policy.is_active()),
            policy: Mutex::new(policy),
            power: OnceLock::new(),
        };
        if let Some(config) = power {
            state.enable_power_loss(config)?;
        }
        Ok(state)
    }

    /// Turns power-loss simulation on (once). Safe at any time: writes that completed before
    /// have no pre-image, which a real disk allows (it may persist unflushed writes early).
    pub fn enable_power_loss(&self, config: PowerLossConfig) -> Result<(), String> {
        self.power
            .set(PowerLoss {
                mode: config.mode,
                undo: Mutex::new(UndoLog::new(config.undo_bytes_max)),
                epoch: AtomicU64::new(0),
                cutting: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                cuts: AtomicU64::new(0),
            })
            .map_err(|_| "power-loss simulation is already on".to_string())
    }

    /// No rules, no power-loss simulation.
    pub fn none() -> FaultState {
        FaultState::new(Vec::new(), 0, None).expect("empty policy is valid")
    }

    /// The decision for one request, or `None` when no rule is active (the common case).
    pub fn decide(&self, op: FaultOp, offset: u64, length: u64) -> Option<Decision> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        let decision = lock(&self.policy).decide(op, offset, length);
        (decision.error.is_some() || decision.delay.is_some()).then_some(decision)
    }

    /// The policy's seed (for logs).
    pub fn seed(&self) -> u64 {
        lock(&self.policy).seed()
    }

    /// Replaces the rules (keeping the seed and device state).
    pub fn set_rules(&self, rules: Vec<Rule>) -> Result<(), String> {
        let mut policy = lock(&self.policy);
        let mut fresh = Policy::new(rules, policy.seed())?;
        fresh.set_state(policy.state());
        *policy = fresh;
        self.active.store(policy.is_active(), Ordering::Relaxed);
        Ok(())
    }

    /// Re-seeds the generator (restarting the request sequence).
    pub fn reseed(&self, seed: u64, rules: Vec<Rule>) -> Result<(), String> {
        let mut policy = lock(&self.policy);
        let mut fresh = Policy::new(rules, seed)?;
        fresh.set_state(policy.state());
        *policy = fresh;
        self.active.store(policy.is_active(), Ordering::Relaxed);
        Ok(())
    }

    /// Switches the device state.
    pub fn set_state(&self, state: DeviceState) {
        let mut policy = lock(&self.policy);
        policy.set_state(state);
        self.active.store(policy.is_active(), Ordering::Relaxed);
    }

    /// A one-line description for the control socket.
    pub fn describe(&self) -> String {
        let mut text = lock(&self.policy).describe();
        if let Some(power) = self.power.get() {
            let undo = lock(&power.undo);
            text += &format!(
                " power_loss={:?} unflushed_bytes={} cuts={} undo_overflows={}",
                power.mode,
                undo.pending_bytes(),
                power.cuts.load(Ordering::Relaxed),
                undo.overflows()
            );
        }
        text
    }

    /// Whether power-loss simulation is on.
    pub fn power_loss(&self) -> bool {
        self.power.get().is_some()
    }

    /// The power epoch a new connection starts in (0 without power-loss simulation).
    pub fn epoch(&self) -> u64 {
        self.power
            .get()
            .map_or(0, |power| power.epoch.load(Ordering::Acquire))
    }

    /// Whether a connection that started in `epoch` may still issue I/O.
    pub fn powered(&self, epoch: u64) -> bool {
        self.power.get().is_none_or(|power| {
            !power.cutting.load(Ordering::SeqCst) && power.epoch.load(Ordering::SeqCst) == epoch
        })
    }

    /// Before an operation of a connection that started in `epoch` is submitted: counts it
    /// in flight. False means the export lost power since: the operation must not run (it
    /// is not counted) and the connection should be closed.
    ///
    /// The count is raised before power is re-checked, and [`FaultState::power_cut`] raises
    /// `cutting` before it reads the count (both SeqCst), so either this operation sees the
    /// cut or the cut waits for this operation.
    pub fn begin(&self, epoch: u64) -> bool {
        let Some(power) = self.power.get() else {
            return true;
        };
        power.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.powered(epoch) {
            return true;
        }
        power.in_flight.fetch_sub(1, Ordering::SeqCst);
        false
    }

    /// After [`FaultState::begin`] and before a non-FUA write, trim or zero is submitted:
    /// saves the pre-images of its sectors. False if they could not be read (the request then
    /// fails with EIO instead of writing).
    pub fn save_pre_image(&self, medium: &File, offset: u64, length: u64) -> bool {
        let Some(power) = self.power.get() else {
            return true;
        };
        let saved =
            lock(&power.undo).before_write(offset, length, |at, buf| read_at(medium, at, buf));
        if let Err(error) = &saved {
            tracing::error!(%error, offset, length, "power-loss simulation: pre-image read failed");
        }
        saved.is_ok()
    }

    /// An operation counted by `begin_*` completed. `durable` says what it made durable.
    pub fn end(&self, durable: Durable) {
        let Some(power) = self.power.get() else {
            return;
        };
        match durable {
            Durable::Nothing => {}
            Durable::Range(offset, length) => lock(&power.undo).durable(offset, length),
            Durable::Everything => lock(&power.undo).flush(),
        }
        power.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Simulates a power cut (see the module docs). `medium` is written with pre-images.
    pub fn power_cut(
        &self,
        medium: &File,
        mode: Option<CutMode>,
        seed: Option<u64>,
    ) -> Result<CutReport, String> {
        let power = self
            .power
            .get()
            .ok_or("power-loss simulation is off for this export")?;
        if power.cutting.swap(true, Ordering::SeqCst) {
            return Err("a power cut is already in progress".into());
        }
        power.epoch.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + CUT_DRAIN_TIMEOUT;
        while power.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mode = mode.unwrap_or(power.mode);
        let seed =
            seed.unwrap_or_else(|| lock(&self.policy).seed() ^ power.cuts.load(Ordering::Relaxed));
        let result = lock(&power.undo).cut(mode, seed, |at, bytes| medium.write_all_at(bytes, at));
        let result = result.and_then(|report| medium.sync_data().map(|()| report));
        power.cuts.fetch_add(1, Ordering::Relaxed);
        power.cutting.store(false, Ordering::Release);
        match result {
            Ok(report) => {
                tracing::warn!(?mode, seed, ?report, "power cut simulated");
                Ok(report)
            }
            Err(error) => Err(format!(
                "power cut failed while restoring pre-images: {error}"
            )),
        }
    }
}

/// What a completed operation made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// Nothing (plain writes, reads, failures).
    Nothing,
    /// A FUA write's range.
    Range(u64, u64),
    /// A FLUSH: everything.
    Everything,
}

fn read_at(medium: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match medium.read_at(&mut buf[done..], offset + done as u64)? {
            0 => {
                buf[done..].fill(0);
                break;
            }
            n => done += n,
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn cut_restores_unflushed_bytes_of_a_real_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7; 4096]).unwrap();
        let power = PowerLossConfig {
            mode: CutMode::Drop,
            undo_bytes_max: 1 << 20,
        };
        let faults = FaultState::new(Vec::new(), 3, Some(power)).unwrap();
        let epoch = faults.epoch();
        assert!(faults.begin(epoch) && faults.save_pre_image(&file, 0, 1024));
        file.write_all_at(&[1; 1024], 0).unwrap();
        faults.end(Durable::Nothing);
        assert!(faults.begin(epoch));
        faults.end(Durable::Everything);
        assert!(faults.begin(epoch) && faults.save_pre_image(&file, 1024, 1024));
        file.write_all_at(&[2; 1024], 1024).unwrap();
        faults.end(Durable::Nothing);
        assert!(faults.powered(epoch));
        let report = faults.power_cut(&file, None, None).unwrap();
        assert_eq!(report.reverted_sectors, 2);
        assert!(!faults.powered(epoch), "old connections are cut off");
        assert!(!faults.begin(epoch), "and cannot start operations");
        assert!(faults.powered(faults.epoch()), "new connections work");
        let mut bytes = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut bytes).unwrap();
        assert!(bytes[..1024].iter().all(|&b| b == 1), "flushed write kept");
        assert!(
            bytes[1024..].iter().all(|&b| b == 7),
            "unflushed write dropped"
        );
    }

    #[test]
    fn inactive_policy_decides_nothing_and_rules_switch_on() {
        let faults = FaultState::none();
        assert!(faults.decide(FaultOp::Read, 0, 1).is_none());
        faults
            .set_rules(vec![Rule::parse("error:read:errno=ENOSPC").unwrap()])
            .unwrap();
        let decision = faults.decide(FaultOp::Read, 0, 1).unwrap();
        assert_eq!(decision.error, Some(crate::target::proto::NbdErrno::NoSpc));
        faults.set_rules(Vec::new()).unwrap();
        assert!(faults.decide(FaultOp::Read, 0, 1).is_none());
        assert!(
            faults
                .power_cut(&tempfile::tempfile().unwrap(), None, None)
                .is_err()
        );
    }
}
