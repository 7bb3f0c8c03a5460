//! The control socket (`--control PATH`): switch faults and trigger power cuts at run time.
//!
//! A line protocol on a unix socket, one command per line, one reply line each (`ok …` or
//! `error …`), so it can be driven by `socat - UNIX-CONNECT:PATH` or any test harness:
//!
//! ```text
//! help
//! list                                   exports and their fault state
//! show EXPORT                            one export's policy, counters, unflushed bytes
//! faults EXPORT [RULE ...]               replace the rules (none: clear them)
//! seed EXPORT N [RULE ...]               re-seed (and set rules) for a replay
//! state EXPORT normal|readonly|failing   whole-device state
//! cut EXPORT [drop|torn] [seed=N]        power cut (needs power-loss simulation)
//! ```
//!
//! `EXPORT` is the export name; `-` names the default export (""). Rules use the grammar of
//! [`crate::target::fault`]. The socket is created with mode 0600.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::shard::{Export, Shared};
use crate::target::fault::{DeviceState, Policy};
use crate::target::volatile::CutMode;

/// Longest command line accepted.
pub const LINE_BYTES_MAX: usize = 64 * 1024;
/// Idle time after which a control client is disconnected.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Binds the control socket and serves it on a thread until the process exits.
pub fn spawn(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(path = %path.display(), "control socket listening");
    std::thread::Builder::new()
        .name("ringbd-control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("ringbd-control-client".into())
                    .spawn(move || serve_client(stream, &shared));
            }
        })?;
    Ok(())
}

fn serve_client(stream: UnixStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(CLIENT_IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(LINE_BYTES_MAX as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= LINE_BYTES_MAX {
            let _ = writeln!(writer, "error line longer than {LINE_BYTES_MAX} bytes");
            return;
        }
        let reply = match execute(line.trim(), shared) {
            Ok(text) => format!("ok {text}"),
            Err(text) => format!("error {text}"),
        };
        if writeln!(writer, "{}", reply.replace('\n', " ")).is_err() {
            return;
        }
    }
}

/// Runs one command; the reply text without the `ok`/`error` prefix.
pub fn execute(line: &str, shared: &Shared) -> Result<String, String> {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or("help");
    let rest: Vec<&str> = words.collect();
    match command {
        "help" => Ok(
            "commands: list | show EXPORT | faults EXPORT [RULE...] | seed EXPORT N \
                      [RULE...] | state EXPORT normal|readonly|failing | cut EXPORT [drop|torn] \
                      [seed=N]"
                .into(),
        ),
        "list" => Ok(shared
            .exports
            .iter()
            .map(|export| {
                format!(
                    "{}: {}",
                    display_name(&export.info.name),
                    export.faults.describe()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")),
        "show" => Ok(find(shared, &rest)?.faults.describe()),
        "faults" => {
            let export = find(shared, &rest)?;
            let rules = Policy::parse_rules(&rest[1..].join(" "))?;
            export.faults.set_rules(rules)?;
            log_change(export, line);
            Ok(export.faults.describe())
        }
        "seed" => {
            let export = find(shared, &rest)?;
            let seed = rest
                .get(1)
                .and_then(|s| s.parse().ok())
                .ok_or("seed needs a number")?;
            let rules = Policy::parse_rules(&rest[2..].join(" "))?;
            export.faults.reseed(seed, rules)?;
            log_change(export, line);
            Ok(export.faults.describe())
        }
        "state" => {
            let export = find(shared, &rest)?;
            let state =
                DeviceState::parse(rest.get(1).ok_or("state needs normal|readonly|failing")?)?;
            export.faults.set_state(state);
            log_change(export, line);
            Ok(export.faults.describe())
        }
        "cut" => {
            let export = find(shared, &rest)?;
            let mut mode = None;
            let mut seed = None;
            for word in &rest[1..] {
                match word.strip_prefix("seed=") {
                    Some(value) => seed = Some(value.parse().map_err(|_| "seed= needs a number")?),
                    None => mode = Some(CutMode::parse(word)?),
                }
            }
            let report = export
                .faults
                .power_cut(export.backend.medium(), mode, seed)?;
            Ok(format!(
                "reverted_sectors={} kept_sectors={}",
                report.reverted_sectors, report.kept_sectors
            ))
        }
        other => Err(format!("unknown command '{other}' (try help)")),
    }
}

/// Cuts power on every export that simulates power loss (SIGUSR1).
pub fn cut_all(shared: &Shared) {
    for export in shared
        .exports
        .iter()
        .filter(|export| export.faults.power_loss())
    {
        match export.faults.power_cut(export.backend.medium(), None, None) {
            Ok(report) => tracing::warn!(export = %export.info.name, ?report, "SIGUSR1: power cut"),
            Err(error) => {
                tracing::error!(export = %export.info.name, error, "SIGUSR1: power cut failed")
            }
        }
    }
}

fn find<'a>(shared: &'a Shared, words: &[&str]) -> Result<&'a Export, String> {
    let name = words
        .first()
        .ok_or("which export? (- for the default export)")?;
    let name = if *name == "-" { "" } else { name };
    shared
        .exports
        .find_visible(name)
        .ok_or_else(|| format!("no export named '{name}'"))
}

fn display_name(name: &str) -> &str {
    if name.is_empty() { "-" } else { name }
}

fn log_change(export: &Export, line: &str) {
    tracing::warn!(export = %export.info.name, seed = export.faults.seed(), command = line, "fault policy changed");
}
