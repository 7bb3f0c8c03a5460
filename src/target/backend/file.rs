//! The file backend: regular files, block devices and memfd RAM disks.
//!
//! Two descriptors of the same file: `direct` (O_DIRECT, when the cache mode asks for it and
//! the filesystem allows it) for aligned I/O, and `buffered` for unaligned writes, writeback
//! mode, memory exports and advisory calls. See the module docs of `backend` for why this is
//! coherent.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ring::sys;
use crate::target::codec::Extent;
use crate::target::export::{BlockSize, Capabilities};
use crate::target::proto;

/// Where an export's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A regular file or block device.
    Path(PathBuf),
    /// An anonymous RAM disk of this many bytes.
    Memory(u64),
}

/// How file I/O uses the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT: no double caching, the guest's cache is the only one (default).
    #[default]
    Direct,
    /// Buffered I/O through the page cache; FLUSH makes it durable.
    Writeback,
}

/// How to open a backend.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// What to open.
    pub source: Source,
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode (ignored for memory exports, which are always buffered).
    pub cache: CacheMode,
}

/// Preferred block size advertised to clients.
const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE`.
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE`.
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE;

/// An open export backend. Shared by every shard (all fields are thread-safe).
#[derive(Debug)]
pub struct FileBackend {
    direct: Option<File>,
    buffered: File,
    size: u64,
    alignment: u32,
    block_device: bool,
    rotational: bool,
    memory: bool,
    zero_range: AtomicBool,
    punch_hole: AtomicBool,
}

impl FileBackend {
    /// Opens the source; falls back to buffered I/O (with a warning) where O_DIRECT is refused.
    pub fn open(options: &OpenOptions) -> io::Result<FileBackend> {
        let (buffered, memory) = match &options.source {
            Source::Memory(size) => (sys::memfd("ringbd-memory", *size)?, true),
            Source::Path(path) => (open(path, options.read_only, 0)?, false),
        };
        let geometry = sys::geometry(&buffered)?;
        let mut direct = None;
        if let (Source::Path(path), CacheMode::Direct) = (&options.source, options.cache) {
            match open(path, options.read_only, libc::O_DIRECT) {
                Ok(file) => direct = Some(file),
                Err(error) => tracing::warn!(
                    path = %path.display(), %error,
                    "O_DIRECT refused by the filesystem; serving with buffered I/O"
                ),
            }
        }
        let alignment = if direct.is_some() {
            geometry.dio_offset_align.clamp(1, 4096).next_power_of_two()
        } else {
            1
        };
        Ok(FileBackend {
            direct,
            buffered,
            size: geometry.size,
            alignment,
            block_device: geometry.block_device,
            rotational: geometry.rotational,
            memory,
            // tmpfs (memfd) has no ZERO_RANGE; punching reads back zeroes there.
            zero_range: AtomicBool::new(!memory),
            punch_hole: AtomicBool::new(true),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Direct-I/O alignment of offsets and lengths (1 when not using O_DIRECT).
    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Whether aligned I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Whether this is a RAM disk (`memory:SIZE`, a memfd).
    pub fn is_memory(&self) -> bool {
        self.memory
    }

    /// What this backend implements, for the transmission flags.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: self.direct.is_none(),
            block_status: true,
            multi_conn: true,
            rotational: self.rotational,
        }
    }

    /// Block sizes to advertise: minimum = the direct-I/O alignment.
    /// A file whose size is not a multiple of the alignment advertises minimum 1 (its last
    /// block cannot be addressed in aligned units); it is still served, widened reads past
    /// the end read as zeroes.
    pub fn block_size(&self) -> BlockSize {
        let aligned = self.size.is_multiple_of(u64::from(self.alignment));
        BlockSize {
            minimum: if aligned { self.alignment } else { 1 },
            preferred: PREFERRED_BLOCK_BYTES.max(self.alignment),
            maximum: proto::PAYLOAD_BYTES_MAX as u32,
        }
    }

    /// Where to read `length` bytes at `offset`: `(fd, file_offset, span, skip)`; the reply
    /// data is `buffer[skip..skip + length]` after reading `span` bytes at `file_offset`.
    /// The span never exceeds `max(length, PAYLOAD_BYTES_MAX)`: a maximal unaligned read,
    /// which cannot widen within that bound, is served by the buffered descriptor instead.
    pub fn read_plan(&self, offset: u64, length: u64) -> (RawFd, u64, u64, u64) {
        if let Some(direct) = &self.direct {
            let align = u64::from(self.alignment);
            let start = offset / align * align;
            let end = (offset + length).div_ceil(align) * align;
            if end - start <= (proto::PAYLOAD_BYTES_MAX as u64).max(length) {
                return (direct.as_raw_fd(), start, end - start, offset - start);
            }
        }
        (self.buffered.as_raw_fd(), offset, length, 0)
    }

    /// The descriptor that writes `length` bytes at `offset`: direct when aligned.
    pub fn write_fd(&self, offset: u64, length: u64) -> RawFd {
        match &self.direct {
            Some(direct) if self.is_aligned(offset, length) => direct.as_raw_fd(),
            _ => self.buffered.as_raw_fd(),
        }
    }

    /// The buffered file, for synchronous access outside the ring (power-loss simulation).
    pub fn medium(&self) -> &File {
        &self.buffered
    }

    /// The descriptor for FLUSH, TRIM, WRITE_ZEROES and CACHE.
    pub fn control_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    fn is_aligned(&self, offset: u64, length: u64) -> bool {
        let align = u64::from(self.alignment);
        offset.is_multiple_of(align) && length.is_multiple_of(align)
    }

    /// The fallocate mode that zeroes a range, or `None` once the file proved it has none.
    pub fn zero_mode(&self, no_hole: bool) -> Option<i32> {
        if self.zero_range.load(Ordering::Relaxed) && (no_hole || self.block_device) {
            return Some(FALLOC_ZERO_RANGE);
        }
        if self.punch_hole.load(Ordering::Relaxed) && (!no_hole || self.memory) {
            return Some(FALLOC_PUNCH_HOLE);
        }
        if self.zero_range.load(Ordering::Relaxed) {
            return Some(FALLOC_ZERO_RANGE);
        }
        None
    }

    /// Records that `mode` failed with EOPNOTSUPP, so it is not tried again.
    pub fn mode_unsupported(&self, mode: i32) {
        if mode == FALLOC_ZERO_RANGE {
            self.zero_range.store(false, Ordering::Relaxed);
        } else if mode == FALLOC_PUNCH_HOLE {
            self.punch_hole.store(false, Ordering::Relaxed);
        }
    }

    /// `base:allocation` extents for `[offset, offset + length)`, at most `extents_max`;
    /// the last may be shorter than the rest of the range (the client asks again).
    pub fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents_max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        out.clear();
        let end = offset.saturating_add(length).min(self.size);
        if self.block_device {
            out.push(Extent {
                length: end - offset,
                flags: 0,
            });
            return Ok(());
        }
        let fd = self.buffered.as_raw_fd();
        let mut at = offset;
        while at < end && out.len() < extents_max {
            let data = sys::seek_data(fd, at)?.unwrap_or(end).min(end);
            if data > at {
                let flags = proto::NBD_STATE_HOLE | proto::NBD_STATE_ZERO;
                out.push(Extent {
                    length: data - at,
                    flags,
                });
                at = data;
                continue;
            }
            let hole = sys::seek_hole(fd, at)?.unwrap_or(end).min(end);
            let hole = if hole > at { hole } else { end };
            out.push(Extent {
                length: hole - at,
                flags: 0,
            });
            at = hole;
        }
        Ok(())
    }

    /// fdatasync of the whole file (used at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }
}

fn open(path: &std::path::Path, read_only: bool, flags: i32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn memory_backend_reports_holes_then_data() {
        let backend = FileBackend::open(&OpenOptions {
            source: Source::Memory(1 << 20),
            read_only: false,
            cache: CacheMode::Direct,
        })
        .unwrap();
        assert_eq!(backend.size(), 1 << 20);
        assert_eq!(backend.alignment(), 1);
        let mut extents = Vec::new();
        backend.block_status(0, 1 << 20, 16, &mut extents).unwrap();
        assert_eq!(extents.len(), 1);
        assert_ne!(extents[0].flags & proto::NBD_STATE_HOLE, 0);
        let mut file = &backend.buffered;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(8192)).unwrap();
        file.write_all(&[1; 4096]).unwrap();
        backend.block_status(0, 1 << 20, 16, &mut extents).unwrap();
        let data = extents
            .iter()
            .find(|e| e.flags == 0)
            .expect("a data extent");
        assert!(data.length >= 4096);
        let total: u64 = extents.iter().map(|e| e.length).sum();
        assert_eq!(total, 1 << 20);
    }

    #[test]
    fn direct_reads_widen_to_the_alignment() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let backend = FileBackend::open(&OpenOptions {
            source: Source::Path(path),
            read_only: false,
            cache: CacheMode::Direct,
        })
        .unwrap();
        if !backend.is_direct() {
            eprintln!("SKIP: this filesystem refuses O_DIRECT");
            return;
        }
        let align = u64::from(backend.alignment());
        let (direct_fd, start, span, skip) = backend.read_plan(align + 3, 10);
        assert_eq!((start, span, skip), (align, align, 3));
        let max = proto::PAYLOAD_BYTES_MAX as u64;
        let (fd, start, span, skip) = backend.read_plan(3, max);
        assert_ne!(
            fd, direct_fd,
            "a maximal unaligned read cannot widen: buffered"
        );
        assert_eq!((start, span, skip), (3, max, 0));
        assert_ne!(backend.write_fd(3, 10), backend.write_fd(0, align));
    }
}
