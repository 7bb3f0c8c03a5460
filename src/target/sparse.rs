//! Sparse READ replies: which parts of data just read go out as `NBD_REPLY_TYPE_OFFSET_HOLE`
//! chunks and which as `NBD_REPLY_TYPE_OFFSET_DATA` (sans-I/O, pure).
//!
//! # Contract
//!
//! [`plan_read`] looks at the bytes a READ returned and splits them into at most
//! `chunks_max` runs ([`ReadChunks`]) that exactly tile the read, alternate between data and
//! hole, and never describe a non-zero byte as a hole. Zero detection works on blocks of
//! [`HOLE_BLOCK_BYTES`] aligned to *export* offsets (the first and last block of an
//! unaligned read are partial), so interior chunk boundaries are multiples of 4 KiB on the
//! export, as the spec asks ("SHOULD use chunks … multiple of 512 bytes where possible").
//! A block's scan stops at its first non-zero 64-byte stride, so data that is not sparse
//! costs one cache line per block.
//!
//! # Bounds
//!
//! A reply never has more than `chunks_max` content chunks (at most [`READ_CHUNKS_MAX`]):
//! once the plan is full, the rest of the read is one data chunk (its scan stops there).
//! With `NBD_CMD_FLAG_DF` the caller passes 1: the read becomes a single hole if it is all
//! zero, else a single data chunk.
//!
//! # Panics
//!
//! If `data` is empty or longer than `u32::MAX`, or `chunks_max` is 0 or above
//! [`READ_CHUNKS_MAX`] (programmer errors: READ lengths are validated before).

/// Granularity of hole detection, in export bytes (aligned to export offsets).
pub const HOLE_BLOCK_BYTES: u64 = 4096;
/// Most content chunks in one READ reply.
pub const READ_CHUNKS_MAX: usize = 16;
/// Bytes OR-ed together before each early-exit test while scanning for zeroes.
const ZERO_STRIDE_BYTES: usize = 64;

const _: () = assert!(HOLE_BLOCK_BYTES.is_power_of_two());
const _: () = assert!(READ_CHUNKS_MAX >= 1 && READ_CHUNKS_MAX <= u8::MAX as usize);

/// One content chunk of a READ reply, relative to the start of the data read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk from the start of the read, in bytes.
    pub at: usize,
    /// Length in bytes (never 0).
    pub len: usize,
    /// True for an `OFFSET_HOLE` chunk (all bytes zero), false for `OFFSET_DATA`.
    pub hole: bool,
}

/// The chunks of one READ reply: alternating data and hole runs in a fixed array (no
/// allocation), small enough to sit in a reply queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadChunks {
    /// End of each run (exclusive), relative to the start of the read.
    ends: [u32; READ_CHUNKS_MAX],
    count: u8,
    first_hole: bool,
}

impl ReadChunks {
    /// Number of chunks (at least 1).
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Always false: a plan covers at least one byte (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The chunk at `index` (< [`ReadChunks::len`]).
    pub fn get(&self, index: usize) -> Chunk {
        assert!(index < self.len());
        let at = if index == 0 {
            0
        } else {
            self.ends[index - 1] as usize
        };
        Chunk {
            at,
            len: self.ends[index] as usize - at,
            hole: self.first_hole == index.is_multiple_of(2),
        }
    }

    /// The chunks in order.
    pub fn iter(&self) -> impl Iterator<Item = Chunk> + '_ {
        (0..self.len()).map(|index| self.get(index))
    }

    /// Whether the whole read is one data chunk (the plain, non-sparse reply).
    pub fn is_all_data(&self) -> bool {
        self.count == 1 && !self.first_hole
    }

    /// Whether the whole read is one hole.
    pub fn is_all_hole(&self) -> bool {
        self.count == 1 && self.first_hole
    }

    /// Adds `[current end, end)` of the given kind, merging with the last run if alike.
    /// False (nothing added) when a new run is needed and `chunks_max` are in use.
    fn push(&mut self, hole: bool, end: u32, chunks_max: usize) -> bool {
        if self.count == 0 {
            self.first_hole = hole;
        } else if self.get(self.len() - 1).hole == hole {
            self.ends[self.len() - 1] = end;
            return true;
        } else if self.len() == chunks_max {
            return false;
        }
        self.ends[self.len()] = end;
        self.count += 1;
        true
    }

    /// Ends the plan with data up to `end`: the last hole (if the plan ends in one) is
    /// folded into the data before it, so the last run is data.
    fn finish_with_data(&mut self, end: u32) {
        let last = self.len() - 1;
        if self.get(last).hole {
            if last == 0 {
                self.first_hole = false;
            } else {
                self.count -= 1;
            }
        }
        let last = self.len() - 1;
        self.ends[last] = end;
    }
}

/// Splits `data`, read at export `offset`, into data and hole chunks (module docs).
pub fn plan_read(data: &[u8], offset: u64, chunks_max: usize) -> ReadChunks {
    assert!(!data.is_empty(), "a READ returns at least one byte");
    let len = u32::try_from(data.len()).expect("READ length fits u32");
    assert!((1..=READ_CHUNKS_MAX).contains(&chunks_max));
    let mut plan = ReadChunks {
        ends: [0; READ_CHUNKS_MAX],
        count: 0,
        first_hole: false,
    };
    let mut at: u32 = 0;
    while at < len {
        let export_at = offset + u64::from(at);
        let to_boundary = HOLE_BLOCK_BYTES - export_at % HOLE_BLOCK_BYTES;
        let end = u64::from(at) + to_boundary;
        let end = u32::try_from(end.min(u64::from(len))).expect("below len");
        let hole = is_zero(&data[at as usize..end as usize]);
        if !plan.push(hole, end, chunks_max) {
            plan.finish_with_data(len);
            break;
        }
        at = end;
    }
    debug_assert_eq!(plan.ends[plan.len() - 1], len);
    plan
}

/// Whether every byte is zero; stops at the first non-zero stride.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut strides = bytes.chunks_exact(ZERO_STRIDE_BYTES);
    for stride in &mut strides {
        // A fixed-size OR fold: the compiler turns it into a few vector instructions.
        if stride.iter().fold(0u8, |acc, &byte| acc | byte) != 0 {
            return false;
        }
    }
    strides.remainder().iter().all(|&byte| byte == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOCK: usize = HOLE_BLOCK_BYTES as usize;

    fn chunks(plan: &ReadChunks) -> Vec<(usize, usize, bool)> {
        plan.iter().map(|c| (c.at, c.len, c.hole)).collect()
    }

    /// Data with the given 4 KiB blocks non-zero (one byte each, at a varying place).
    fn blocks(pattern: &[bool]) -> Vec<u8> {
        let mut data = vec![0u8; pattern.len() * BLOCK];
        for (index, &nonzero) in pattern.iter().enumerate() {
            if nonzero {
                data[index * BLOCK + (index * 977) % BLOCK] = 0x5a;
            }
        }
        data
    }

    #[test]
    fn random_data_is_one_data_chunk() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251 + 1) as u8).collect();
        let plan = plan_read(&data, 0, READ_CHUNKS_MAX);
        assert!(plan.is_all_data());
        assert_eq!(chunks(&plan), vec![(0, 65536, false)]);
    }

    #[test]
    fn zeroes_are_one_hole() {
        let plan = plan_read(&[0; 1 << 20], 4096, READ_CHUNKS_MAX);
        assert!(plan.is_all_hole());
        assert_eq!(chunks(&plan), vec![(0, 1 << 20, true)]);
    }

    #[test]
    fn holes_between_data() {
        let data = blocks(&[true, false, false, true, false]);
        let plan = plan_read(&data, 0, READ_CHUNKS_MAX);
        assert_eq!(
            chunks(&plan),
            vec![
                (0, BLOCK, false),
                (BLOCK, 2 * BLOCK, true),
                (3 * BLOCK, BLOCK, false),
                (4 * BLOCK, BLOCK, true),
            ]
        );
    }

    #[test]
    fn blocks_follow_export_offsets() {
        // Read at export offset 512: the first block is 3584 bytes long.
        let mut data = vec![0u8; 3 * BLOCK];
        data[3584] = 1; // first byte of the second export block
        let plan = plan_read(&data, 512, READ_CHUNKS_MAX);
        assert_eq!(
            chunks(&plan),
            vec![
                (0, 3584, true),
                (3584, BLOCK, false),
                (3584 + BLOCK, 3 * BLOCK - 3584 - BLOCK, true),
            ]
        );
    }

    #[test]
    fn a_full_plan_ends_in_one_data_chunk() {
        // Alternating data/hole blocks: 3 chunks allowed.
        let data = blocks(&[true, false, true, false, true, false]);
        let plan = plan_read(&data, 0, 3);
        assert_eq!(
            chunks(&plan),
            vec![
                (0, BLOCK, false),
                (BLOCK, BLOCK, true),
                (2 * BLOCK, 4 * BLOCK, false)
            ]
        );
        // A plan that is full with a hole last: the hole folds into the data before it.
        let data = blocks(&[true, false, true, false, true]);
        let plan = plan_read(&data, 0, 2);
        assert_eq!(chunks(&plan), vec![(0, 5 * BLOCK, false)]);
    }

    #[test]
    fn do_not_fragment_is_one_chunk() {
        let data = blocks(&[false, true]);
        assert_eq!(chunks(&plan_read(&data, 0, 1)), vec![(0, 2 * BLOCK, false)]);
        let plan = plan_read(&[0; 3 * BLOCK], 0, 1);
        assert_eq!(chunks(&plan), vec![(0, 3 * BLOCK, true)]);
    }

    #[test]
    fn tiny_and_unaligned_reads() {
        assert_eq!(chunks(&plan_read(&[0], 4095, 16)), vec![(0, 1, true)]);
        assert_eq!(chunks(&plan_read(&[7], 4095, 16)), vec![(0, 1, false)]);
        assert_eq!(
            chunks(&plan_read(&[0, 7], 4095, 16)),
            vec![(0, 1, true), (1, 1, false)]
        );
    }

    #[test]
    fn is_zero_finds_any_byte() {
        for len in [0, 1, 63, 64, 65, 4096, 4097] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data));
            for index in 0..len {
                data[index] = 0x80;
                assert!(!is_zero(&data), "len {len} byte {index}");
                data[index] = 0;
            }
        }
    }

    #[test]
    #[should_panic(expected = "at least one byte")]
    fn empty_read_is_a_programmer_error() {
        plan_read(&[], 0, 1);
    }

    /// A read of up to 24 blocks at an arbitrary offset where each block is zero, non-zero
    /// or zero but for one byte near an edge.
    fn sparse_read() -> impl Strategy<Value = (Vec<u8>, u64, usize)> {
        (
            0u64..(1 << 40),
            1usize..24 * BLOCK,
            prop::collection::vec(0u8..4, 24 + 1),
            1usize..=READ_CHUNKS_MAX,
        )
            .prop_map(|(offset, len, kinds, chunks_max)| {
                let mut data = vec![0u8; len];
                let skew = (offset % HOLE_BLOCK_BYTES) as usize;
                for (block, kind) in kinds.iter().enumerate() {
                    let start = (block * BLOCK).saturating_sub(skew);
                    let end = ((block + 1) * BLOCK - skew).min(len);
                    if start >= end {
                        continue;
                    }
                    match kind {
                        0 => {}
                        1 => data[start..end].fill(0xa5),
                        2 => data[start] = 1,
                        _ => data[end - 1] = 1,
                    }
                }
                (data, offset, chunks_max)
            })
    }

    proptest! {
        #[test]
        fn chunks_tile_holes_are_zero_and_data_is_what_was_read(
            (data, offset, chunks_max) in sparse_read()
        ) {
            let plan = plan_read(&data, offset, chunks_max);
            prop_assert!(!plan.is_empty() && plan.len() <= chunks_max);
            // Rebuild the read from the chunks as a client would.
            let mut rebuilt = Vec::with_capacity(data.len());
            let mut previous_hole = None;
            for chunk in plan.iter() {
                prop_assert_eq!(chunk.at, rebuilt.len(), "chunks tile without gaps");
                prop_assert!(chunk.len > 0);
                prop_assert_ne!(previous_hole, Some(chunk.hole), "kinds alternate");
                previous_hole = Some(chunk.hole);
                let bytes = &data[chunk.at..chunk.at + chunk.len];
                if chunk.hole {
                    prop_assert!(bytes.iter().all(|&b| b == 0), "a hole holds data");
                    rebuilt.extend(std::iter::repeat_n(0, chunk.len));
                } else {
                    rebuilt.extend_from_slice(bytes);
                }
                let end = offset + (chunk.at + chunk.len) as u64;
                if chunk.at + chunk.len < data.len() {
                    prop_assert_eq!(end % HOLE_BLOCK_BYTES, 0, "interior boundaries align");
                }
            }
            prop_assert_eq!(&rebuilt, &data);
        }

        #[test]
        fn a_plan_with_room_misses_no_zero_block((data, offset, _) in sparse_read()) {
            let plan = plan_read(&data, offset, READ_CHUNKS_MAX);
            // A plan that ran full ends with 15 or 16 chunks (a last hole folds into data).
            if plan.len() + 2 <= READ_CHUNKS_MAX {
                for chunk in plan.iter().filter(|chunk| !chunk.hole) {
                    let mut at = chunk.at;
                    while at < chunk.at + chunk.len {
                        let export_at = offset + at as u64;
                        let step = (HOLE_BLOCK_BYTES - export_at % HOLE_BLOCK_BYTES) as usize;
                        let end = (at + step).min(chunk.at + chunk.len);
                        prop_assert!(!is_zero(&data[at..end]), "zero block {at}..{end} sent as data");
                        at = end;
                    }
                }
            }
        }
    }
}
