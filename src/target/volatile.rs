//! Power-loss simulation: an undo log that models a volatile write cache.
//!
//! Writes go to the medium as usual, but before the first write to a sector since the last
//! completed FLUSH, that sector's durable content (its pre-image) is saved here. A completed
//! FLUSH makes everything durable (the log is cleared); a completed FUA write makes its
//! sectors durable. A power cut puts pre-images back: all of them ([`CutMode::Drop`]: every
//! unflushed write is lost) or a seeded random subset at sector granularity
//! ([`CutMode::Torn`]: some unflushed writes survive, possibly only in part and out of
//! order). Flushed data is never lost, because nothing flushed has a pre-image left.
//!
//! # Why an undo log
//!
//! Reads need no change (the medium always holds the newest data), and a real disk may
//! persist unflushed writes whenever it likes, so when the log would exceed its bound it is
//! simply cleared, as if the device had written its cache back on its own.
//!
//! Pure: the caller passes closures that read and write the medium.

use std::collections::BTreeMap;
use std::io;

/// Granularity of the model (the smallest unit a disk writes atomically).
pub const SECTOR_BYTES: u64 = 512;

/// What a power cut does to unflushed writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Every unflushed write is lost.
    Drop,
    /// A seeded random subset of unflushed sectors survives.
    Torn,
}

impl CutMode {
    /// Parses `drop` or `torn`.
    pub fn parse(text: &str) -> Result<CutMode, String> {
        match text {
            "drop" => Ok(CutMode::Drop),
            "torn" => Ok(CutMode::Torn),
            other => Err(format!(
                "power-loss mode must be drop or torn, not '{other}'"
            )),
        }
    }
}

/// What a cut did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CutReport {
    /// Sectors put back to their last durable content.
    pub reverted_sectors: u64,
    /// Unflushed sectors that kept their new content (torn mode).
    pub kept_sectors: u64,
}

/// Pre-images of sectors written since the last flush.
#[derive(Debug)]
pub struct UndoLog {
    sectors: BTreeMap<u64, Box<[u8]>>,
    bytes_max: u64,
    overflows: u64,
}

impl UndoLog {
    /// A log holding at most `bytes_max` bytes of pre-images.
    pub fn new(bytes_max: u64) -> UndoLog {
        UndoLog {
            sectors: BTreeMap::new(),
            bytes_max: bytes_max.max(SECTOR_BYTES),
            overflows: 0,
        }
    }

    /// Bytes of pre-images held.
    pub fn pending_bytes(&self) -> u64 {
        self.sectors.len() as u64 * SECTOR_BYTES
    }

    /// Times the log overflowed and was cleared (the device "wrote its cache back").
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Call before a write, trim or zero of `[offset, offset + length)` is submitted: saves
    /// the pre-image of every covered sector not saved yet. `read(offset, buf)` fills `buf`
    /// from the medium (short reads past the end are the caller's business: fill zeroes).
    pub fn before_write(
        &mut self,
        offset: u64,
        length: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let first = offset / SECTOR_BYTES;
        let last = (offset + length - 1) / SECTOR_BYTES;
        let missing = (first..=last)
            .filter(|s| !self.sectors.contains_key(s))
            .count() as u64;
        if self.pending_bytes() + missing * SECTOR_BYTES > self.bytes_max {
            self.sectors.clear();
            self.overflows += 1;
            if missing * SECTOR_BYTES > self.bytes_max {
                return Ok(());
            }
        }
        let mut sector = first;
        while sector <= last {
            if self.sectors.contains_key(&sector) {
                sector += 1;
                continue;
            }
            let mut end = sector;
            while end < last && !self.sectors.contains_key(&(end + 1)) {
                end += 1;
            }
            let mut run = vec![0u8; ((end - sector + 1) * SECTOR_BYTES) as usize];
            read(sector * SECTOR_BYTES, &mut run)?;
            for (index, chunk) in run.chunks(SECTOR_BYTES as usize).enumerate() {
                self.sectors.insert(sector + index as u64, chunk.into());
            }
            sector = end + 1;
        }
        Ok(())
    }

    /// A FUA write of `[offset, offset + length)` completed: those sectors are durable.
    pub fn durable(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = offset / SECTOR_BYTES;
        let last = (offset + length - 1) / SECTOR_BYTES;
        let keys: Vec<u64> = self.sectors.range(first..=last).map(|(k, _)| *k).collect();
        for key in keys {
            self.sectors.remove(&key);
        }
    }

    /// A FLUSH completed: everything written so far is durable.
    pub fn flush(&mut self) {
        self.sectors.clear();
    }

    /// Loses power: puts pre-images back through `write(offset, bytes)` (contiguous sectors
    /// coalesced, in ascending order) and empties the log.
    pub fn cut(
        &mut self,
        mode: CutMode,
        seed: u64,
        mut write: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<CutReport> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut report = CutReport::default();
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        let mut next = u64::MAX;
        let sectors = std::mem::take(&mut self.sectors);
        for (sector, image) in &sectors {
            let revert = mode == CutMode::Drop || rng.bool();
            if !revert {
                report.kept_sectors += 1;
                continue;
            }
            report.reverted_sectors += 1;
            if *sector != next && !run.is_empty() {
                write(run_start * SECTOR_BYTES, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = *sector;
            }
            run.extend_from_slice(image);
            next = sector + 1;
        }
        if !run.is_empty() {
            write(run_start * SECTOR_BYTES, &run)?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny in-memory medium with the undo log in front of it.
    struct Disk {
        bytes: Vec<u8>,
        log: UndoLog,
    }

    impl Disk {
        fn new(size: usize, log_max: u64) -> Disk {
            Disk {
                bytes: vec![0; size],
                log: UndoLog::new(log_max),
            }
        }

        fn write(&mut self, offset: usize, data: &[u8]) {
            let bytes = &self.bytes;
            self.log
                .before_write(offset as u64, data.len() as u64, |at, buf| {
                    buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
            self.bytes[offset..offset + data.len()].copy_from_slice(data);
        }

        fn cut(&mut self, mode: CutMode, seed: u64) -> CutReport {
            let bytes = &mut self.bytes;
            self.log
                .cut(mode, seed, |at, data| {
                    bytes[at as usize..at as usize + data.len()].copy_from_slice(data);
                    Ok(())
                })
                .unwrap()
        }
    }

    #[test]
    fn drop_loses_exactly_the_unflushed_writes() {
        let mut disk = Disk::new(8192, 1 << 20);
        disk.write(0, &[1; 1000]);
        disk.log.flush();
        disk.write(500, &[2; 1000]);
        disk.write(700, &[3; 10]);
        let report = disk.cut(CutMode::Drop, 7);
        assert_eq!(
            report.reverted_sectors, 3,
            "sectors 0, 1, 2 were touched after the flush"
        );
        assert!(
            disk.bytes[..1000].iter().all(|&b| b == 1),
            "flushed data survives"
        );
        assert!(
            disk.bytes[1000..].iter().all(|&b| b == 0),
            "unflushed data is gone"
        );
        assert_eq!(disk.log.pending_bytes(), 0);
    }

    #[test]
    fn fua_sectors_survive_a_cut() {
        let mut disk = Disk::new(4096, 1 << 20);
        disk.write(0, &[5; 1024]);
        disk.log.durable(512, 512);
        disk.cut(CutMode::Drop, 1);
        assert!(disk.bytes[..512].iter().all(|&b| b == 0));
        assert!(disk.bytes[512..1024].iter().all(|&b| b == 5));
    }

    #[test]
    fn torn_cuts_are_seeded_and_partial() {
        let run = |seed| {
            let mut disk = Disk::new(64 * 512, 1 << 20);
            disk.write(0, &[9; 64 * 512]);
            let report = disk.cut(CutMode::Torn, seed);
            (report, disk.bytes)
        };
        let (a, bytes_a) = run(11);
        let (b, bytes_b) = run(11);
        assert_eq!((a, &bytes_a), (b, &bytes_b), "same seed, same outcome");
        assert!(a.kept_sectors > 0 && a.reverted_sectors > 0, "{a:?}");
        assert_eq!(a.kept_sectors + a.reverted_sectors, 64);
        for sector in bytes_a.chunks(512) {
            assert!(sector.iter().all(|&b| b == sector[0]), "sectors are atomic");
        }
        assert_ne!(run(12).1, bytes_a, "another seed tears differently");
    }

    #[test]
    fn overflow_makes_everything_durable_instead_of_growing() {
        let mut disk = Disk::new(16 * 512, 4 * 512);
        disk.write(0, &[1; 3 * 512]);
        disk.write(3 * 512, &[2; 3 * 512]);
        assert_eq!(disk.log.overflows(), 1);
        assert!(disk.log.pending_bytes() <= 4 * 512);
        disk.cut(CutMode::Drop, 0);
        assert!(
            disk.bytes[..3 * 512].iter().all(|&b| b == 1),
            "written back before the overflow"
        );
        assert!(disk.bytes[3 * 512..6 * 512].iter().all(|&b| b == 0));
    }

    #[test]
    fn first_pre_image_wins_across_rewrites() {
        let mut disk = Disk::new(1024, 1 << 20);
        disk.write(0, &[1; 512]);
        disk.write(0, &[2; 512]);
        disk.cut(CutMode::Drop, 0);
        assert!(disk.bytes[..512].iter().all(|&b| b == 0));
    }
}
