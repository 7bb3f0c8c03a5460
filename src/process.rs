//! The process around the server: its PID file and the switch to an unprivileged identity.
//!
//! # Order at startup
//!
//! Bind listeners (ports below 1024, sockets in root-owned directories), open exports
//! (block devices), start the shards (rings and registered buffers), write the PID file,
//! then switch identity, and only then accept connections. A client is therefore never
//! served by a process that still runs as root when `user`/`group` is configured.
//!
//! # PID file contract
//!
//! The file holds the PID and a newline. It is written atomically (temporary file, then
//! rename) and removed on a clean stop if it still holds this PID. A file naming a live
//! process with the same command name refuses the start; any other existing file is stale
//! and replaced. Removal after the identity switch needs the directory to be writable by the
//! new user (systemd: `RuntimeDirectory=`); otherwise a warning is logged.

use std::io;
use std::path::{Path, PathBuf};

use crate::ring::sys;

/// A PID file that is removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's PID to `path`.
    pub fn create(path: &Path) -> io::Result<PidFile> {
        let pid = std::process::id();
        if let Some(other) = running_owner(path)
            && other != pid
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} names process {other}, which is running; is another ringbd running?",
                    path.display()
                ),
            ));
        }
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(".{pid}.tmp"));
        let temporary = PathBuf::from(temporary);
        std::fs::write(&temporary, format!("{pid}\n"))?;
        if let Err(error) = std::fs::rename(&temporary, path) {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path) != Some(self.pid) {
            return;
        }
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove the PID file");
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The PID in `path` if that process is alive and has our command name.
fn running_owner(path: &Path) -> Option<u32> {
    let pid = read_pid(path)?;
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    let theirs = comm(&pid.to_string())?;
    (Some(theirs) == comm("self")).then_some(pid)
}

/// The identity to switch to after startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Group id (the only group kept).
    pub gid: u32,
}

/// Looks up `user` and `group` (names or numeric ids). Without `group`, the user's primary
/// group is used; with only `group`, the user id stays. `None` when neither is given.
pub fn resolve_identity(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Identity>, String> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let (uid, primary_gid) = match user {
        Some(user) => match user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                let found = sys::user_ids(user)
                    .map_err(|error| format!("cannot look up user '{user}': {error}"))?;
                let (uid, gid) = found.ok_or_else(|| format!("user '{user}' does not exist"))?;
                (uid, Some(gid))
            }
        },
        None => (sys::effective_uid(), None),
    };
    let gid = match group {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => sys::group_id(group)
                .map_err(|error| format!("cannot look up group '{group}': {error}"))?
                .ok_or_else(|| format!("group '{group}' does not exist"))?,
        },
        None => primary_gid.ok_or_else(|| {
            format!(
                "user '{}' is numeric: give the group too (--group / group =)",
                user.unwrap_or_default()
            )
        })?,
    };
    Ok(Some(Identity { uid, gid }))
}

/// Switches the whole process to `identity`. Needs root unless it is the current identity.
pub fn switch_identity(identity: Identity) -> io::Result<()> {
    sys::switch_identity(identity.uid, identity.gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_are_written_and_removed() {
        let dir = std::env::temp_dir().join(format!("ringbd-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringbd.pid");
        std::fs::write(&path, "999999999\n").unwrap();
        let pid_file = PidFile::create(&path).expect("a stale file is replaced");
        assert_eq!(read_pid(&path), Some(std::process::id()));
        assert_eq!(pid_file.path(), path);
        let again = PidFile::create(&path).expect("our own PID is not another server");
        std::mem::forget(again);
        drop(pid_file);
        assert!(!path.exists(), "removed on drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identities_resolve_names_and_numbers() {
        assert_eq!(resolve_identity(None, None), Ok(None));
        let root = resolve_identity(Some("root"), None).unwrap();
        assert_eq!(root, Some(Identity { uid: 0, gid: 0 }));
        let numeric = resolve_identity(Some("65534"), Some("65534")).unwrap();
        assert_eq!(
            numeric,
            Some(Identity {
                uid: 65534,
                gid: 65534
            })
        );
        assert!(resolve_identity(Some("65534"), None).is_err());
        let missing = resolve_identity(Some("no-such-user-ringbd"), None).unwrap_err();
        assert!(missing.contains("does not exist"), "{missing}");
        let missing = resolve_identity(None, Some("no-such-group-ringbd")).unwrap_err();
        assert!(missing.contains("does not exist"), "{missing}");
    }
}
