//! Thin safe wrappers over the few syscalls ringbd makes outside io_uring: file geometry,
//! direct-I/O alignment, SEEK_DATA/SEEK_HOLE, fallocate, eventfd and resource limits.
//! Each wrapper validates its arguments so callers stay in safe code.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Direct-I/O constraints and size of an open file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes.
    pub size: u64,
    /// Required alignment of file offsets and lengths for O_DIRECT (1 if unknown/none).
    pub dio_offset_align: u32,
    /// Required alignment of memory buffers for O_DIRECT.
    pub dio_mem_align: u32,
    /// Whether this is a block device.
    pub block_device: bool,
    /// Whether the device reports itself rotational (block devices only).
    pub rotational: bool,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Size and direct-I/O alignment of `file` (statx STATX_DIOALIGN, falling back to the
/// logical block size for block devices and 512 otherwise).
pub fn geometry(file: &File) -> io::Result<Geometry> {
    let metadata = file.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    let block_device = metadata.file_type().is_block_device();
    let mut size = metadata.len();
    let mut logical: u32 = 512;
    let fd = file.as_raw_fd();
    if block_device {
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points to a live local.
        check(unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut bytes as *mut u64) })?;
        size = bytes;
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer, which points to a live local.
        check(unsafe { libc::ioctl(fd, BLKSSZGET, &mut sector as *mut libc::c_int) })?;
        logical = u32::try_from(sector).unwrap_or(512).max(512);
    }
    // SAFETY: statx is a plain C struct; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, with AT_EMPTY_PATH on a live
    // fd; `stx` is a live local the kernel fills.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let (mut offset_align, mut mem_align) = (logical, 512);
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        offset_align = stx.stx_dio_offset_align;
        mem_align = stx.stx_dio_mem_align.max(1);
    }
    Ok(Geometry {
        size,
        dio_offset_align: offset_align,
        dio_mem_align: mem_align,
        block_device,
        rotational: block_device && rotational(&metadata),
    })
}

fn rotational(metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let rdev = metadata.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let path = format!("/sys/dev/block/{major}:{minor}/queue/rotational");
    let path = if std::path::Path::new(&path).exists() {
        path
    } else {
        format!("/sys/dev/block/{major}:{minor}/../queue/rotational")
    };
    std::fs::read_to_string(path)
        .map(|text| text.trim() == "1")
        .unwrap_or(false)
}

/// Where the data at or after `offset` starts (`SEEK_DATA`); `None` if only a hole follows.
pub fn seek_data(fd: RawFd, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_DATA)
}

/// Where the hole at or after `offset` starts (`SEEK_HOLE`); the file end counts as a hole.
pub fn seek_hole(fd: RawFd, offset: u64) -> io::Result<Option<u64>> {
    seek(fd, offset, libc::SEEK_HOLE)
}

fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek takes no pointers; a bad fd yields EBADF.
    let position = unsafe { libc::lseek(fd, offset, whence) };
    if position < 0 {
        let error = io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(error)
        };
    }
    Ok(Some(position as u64))
}

/// Synchronous `fallocate`, used to probe what a file supports at startup.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        (Ok(offset), Ok(len)) => (offset, len),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: fallocate takes no pointers; a bad fd yields EBADF.
    check(unsafe { libc::fallocate(fd, mode, offset, len) }).map(drop)
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter, waking a ring read on it.
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; errors (EAGAIN on overflow) are harmless.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// The soft RLIMIT_MEMLOCK in bytes (`u64::MAX` for unlimited).
pub fn memlock_limit() -> u64 {
    // SAFETY: rlimit is a plain C struct; all-zero is valid.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        limit.rlim_cur
    }
}

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An anonymous memory file (`memfd_create`) of `size` bytes: the RAM disk behind
/// `memory:SIZE` exports. It supports hole punching and SEEK_DATA like tmpfs.
pub fn memfd(name: &str, size: u64) -> io::Result<File> {
    let name =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns which are readable.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32, ready: &mut Vec<bool>) -> io::Result<()> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a live array of `polls.len()` pollfd structs.
    let rc = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    ready.clear();
    if rc < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EINTR) {
            ready.resize(fds.len(), false);
            return Ok(());
        }
        return Err(error);
    }
    ready.extend(polls.iter().map(|p| p.revents != 0));
    Ok(())
}

// ------------------------------------------------------------ process identity, inherited fds

/// Longest buffer `getpwnam_r`/`getgrnam_r` may ask for before we give up.
const PASSWD_BUFFER_BYTES_MAX: usize = 1 << 20;

/// Calls a `get*nam_r` function with a growing scratch buffer; `lookup` returns its error
/// number and whether an entry was found.
fn with_nss_buffer<T>(
    mut lookup: impl FnMut(&mut [u8]) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut buffer = vec![0u8; 4096];
    loop {
        match lookup(&mut buffer) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buffer.len() < PASSWD_BUFFER_BYTES_MAX => {
                buffer.resize(buffer.len() * 2, 0);
            }
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (errno, _) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// The uid and primary gid of user `name` (`getpwnam_r`); `None` if there is no such user.
pub fn user_ids(name: &str) -> io::Result<Option<(u32, u32)>> {
    let name =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    with_nss_buffer(|buffer| {
        // SAFETY: passwd is a plain C struct; all-zero is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated; `entry`, `buffer` (with its true length) and
        // `result` are live for the call; the strings the entry points to live in `buffer`,
        // and we read only the integer fields before `buffer` is touched again.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut result,
            )
        };
        (
            rc,
            (!result.is_null()).then_some((entry.pw_uid, entry.pw_gid)),
        )
    })
}

/// The gid of group `name` (`getgrnam_r`); `None` if there is no such group.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let name =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    with_nss_buffer(|buffer| {
        // SAFETY: group is a plain C struct; all-zero is a valid value.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_ids`: every pointer is to a live local or to `buffer` with its
        // true length, and only the integer field is read.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut result,
            )
        };
        (rc, (!result.is_null()).then_some(entry.gr_gid))
    })
}

/// Switches the process to `uid` and `gid`, with `gid` as its only group: `setgroups`,
/// `setgid`, then `setuid` (glibc applies each to every thread of the process). Fails if any
/// step fails or if root could be regained afterwards.
pub fn switch_identity(uid: u32, gid: u32) -> io::Result<()> {
    let groups = [gid];
    // SAFETY: `groups` is a live array of exactly 1 gid.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
    // SAFETY: setgid and setuid take no pointers.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(uid) })?;
    // SAFETY: the get*id calls take no arguments and cannot fail.
    let now = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    if now != (uid, uid, gid, gid) {
        return Err(io::Error::other("the identity did not change"));
    }
    // SAFETY: setuid takes no pointers; it must fail now unless uid is 0.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other("root privileges could be regained"));
    }
    Ok(())
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// Most inherited sockets accepted.
pub const LISTEN_FDS_MAX: usize = 64;

/// Which inherited descriptors were already taken (bit `fd - LISTEN_FDS_START`).
static LISTEN_FDS_TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A listening socket inherited from the service manager.
#[derive(Debug)]
pub enum InheritedListener {
    /// An IPv4 or IPv6 stream socket.
    Tcp(std::net::TcpListener),
    /// A unix stream socket.
    Unix(std::os::unix::net::UnixListener),
}

/// Takes ownership of inherited descriptor `fd` (systemd socket activation: `LISTEN_FDS`
/// descriptors from [`LISTEN_FDS_START`]) after checking that it is an open, listening
/// stream socket, and marks it close-on-exec.
///
/// # Contract
///
/// Call it before the process opens any descriptor of its own, so that a descriptor in the
/// `LISTEN_FDS` range can only be an inherited one. Each descriptor can be taken once; a
/// second call for the same number fails with `EBADF`.
pub fn take_listening_socket(fd: RawFd) -> io::Result<InheritedListener> {
    let index = usize::try_from(fd - LISTEN_FDS_START)
        .ok()
        .filter(|index| *index < LISTEN_FDS_MAX)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
    let bit = 1u64 << index;
    if LISTEN_FDS_TAKEN.fetch_or(bit, std::sync::atomic::Ordering::AcqRel) & bit != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: fcntl(F_GETFD) takes no pointers; a closed fd yields EBADF.
    check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    if socket_option(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(io::Error::other("not a stream socket"));
    }
    if socket_option(fd, libc::SO_ACCEPTCONN)? != 1 {
        return Err(io::Error::other("not a listening socket"));
    }
    // SAFETY: sockaddr_storage is a plain C struct; all-zero is a valid value.
    let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `address` is a live sockaddr_storage and `length` holds its true size.
    check(unsafe {
        libc::getsockname(
            fd,
            (&mut address as *mut libc::sockaddr_storage).cast(),
            &mut length,
        )
    })?;
    // SAFETY: fcntl(F_SETFD) takes no pointers.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    // SAFETY: `fd` is open (F_GETFD succeeded), was inherited (the caller's contract: nothing
    // in this process opened descriptors yet), and the bit set above guarantees this is the
    // only owner created for it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match libc::c_int::from(address.ss_family) {
        libc::AF_INET | libc::AF_INET6 => Ok(InheritedListener::Tcp(owned.into())),
        libc::AF_UNIX => Ok(InheritedListener::Unix(owned.into())),
        family => {
            // Dropping `owned` closes a socket we cannot serve on.
            drop(owned);
            Err(io::Error::other(format!(
                "unsupported address family {family}"
            )))
        }
    }
}

fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a live int and `length` holds its true size.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut length,
        )
    })?;
    Ok(value)
}

/// The effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The credentials of the process at the other end of a connected unix socket, as the kernel
/// recorded them when it connected (`SO_PEERCRED`): `(uid, gid, pid)`. The uid and gid are the
/// peer's effective ids at `connect` time; they cannot be forged by the peer.
pub fn peer_credentials(fd: RawFd) -> io::Result<(u32, u32, i32)> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `credentials` is a live ucred and `length` holds its true size; the kernel
    // writes at most `length` bytes and returns EBADF/ENOTSOCK for a bad descriptor.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    })?;
    if length as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED returned a short ucred"));
    }
    Ok((credentials.uid, credentials.gid, credentials.pid))
}
