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
