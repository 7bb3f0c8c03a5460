//! systemd integration without libsystemd: socket activation (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, see `sd_listen_fds(3)`) and readiness notification (`NOTIFY_SOCKET`,
//! see `sd_notify(3)`). Both work with any service manager that speaks these protocols.
//!
//! # Socket activation contract
//!
//! [`inherited_listeners`] must run before the process opens any descriptor, so the
//! descriptors from 3 on are the inherited ones. It uses them only if `LISTEN_PID` is this
//! process; each must be a listening stream socket (TCP over IPv4/IPv6, or unix), told apart
//! with `getsockname`. Inherited unix sockets belong to the service manager: they are not
//! removed at exit. The variables are left in the environment; the `LISTEN_PID` check keeps
//! any child from taking them.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

use crate::ring::sys::{self, InheritedListener};
use crate::server::Listener;

/// How many descriptors `LISTEN_PID`/`LISTEN_FDS` hand to process `pid`: 0 when they are
/// absent or meant for another process.
pub fn listen_fds_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<usize, String> {
    let Some(listen_pid) = listen_pid else {
        return Ok(0);
    };
    let target: u32 = listen_pid
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_PID={listen_pid:?} is not a process id"))?;
    if target != pid {
        return Ok(0);
    }
    let count: usize = listen_fds
        .unwrap_or("0")
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={listen_fds:?} is not a count"))?;
    if count > sys::LISTEN_FDS_MAX {
        return Err(format!(
            "LISTEN_FDS={count} is more than the {} sockets ringbd accepts",
            sys::LISTEN_FDS_MAX
        ));
    }
    Ok(count)
}

/// Takes the listening sockets passed by socket activation (none if not activated). Call it
/// before logging is set up if need be: it logs nothing (see [`Listener::describe`]).
pub fn inherited_listeners() -> Result<Vec<Listener>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let count = listen_fds_count(pid.as_deref(), fds.as_deref(), std::process::id())?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut listeners = Vec::with_capacity(count);
    for index in 0..count {
        let fd = sys::LISTEN_FDS_START + index as i32;
        let name = names.next().unwrap_or("");
        let inherited = sys::take_listening_socket(fd)
            .map_err(|error| format!("inherited socket fd {fd} ({name}): {error}"))?;
        let listener = match inherited {
            InheritedListener::Tcp(listener) => {
                listener
                    .set_nonblocking(false)
                    .map_err(|error| format!("inherited socket fd {fd}: {error}"))?;
                Listener::Tcp(listener)
            }
            InheritedListener::Unix(listener) => {
                listener
                    .set_nonblocking(false)
                    .map_err(|error| format!("inherited socket fd {fd}: {error}"))?;
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|address| address.as_pathname().map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from(format!("inherited-fd-{fd}")));
                Listener::Unix {
                    listener,
                    path,
                    remove_on_exit: false,
                }
            }
        };
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`) to the service manager if
/// `NOTIFY_SOCKET` is set; returns whether it was sent. Failures are logged, never fatal.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let bytes = target.as_encoded_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = address.and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &address)
    });
    match sent {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(%error, state, "sd_notify failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_apply_only_to_the_named_process() {
        assert_eq!(listen_fds_count(None, Some("2"), 7), Ok(0));
        assert_eq!(listen_fds_count(Some("8"), Some("2"), 7), Ok(0));
        assert_eq!(listen_fds_count(Some("7"), Some("2"), 7), Ok(2));
        assert_eq!(listen_fds_count(Some("7"), None, 7), Ok(0));
        assert!(listen_fds_count(Some("x"), Some("2"), 7).is_err());
        assert!(listen_fds_count(Some("7"), Some("-1"), 7).is_err());
        assert!(listen_fds_count(Some("7"), Some("65"), 7).is_err());
    }
}
