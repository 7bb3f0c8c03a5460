//! `BufPool`: one page-aligned anonymous mapping, carved by a buddy allocator into
//! power-of-two blocks of 4 KiB … [`BUF_BYTES_MAX`], registered once with the ring.
//!
//! # Ownership contract
//!
//! A [`Buf`] is a unique handle (not `Clone`) to one block. While the caller holds it, the
//! caller may read and write its bytes through [`BufPool::bytes`] / [`BufPool::bytes_mut`].
//! Handing a `Buf` to the ring moves it into the in-flight table; it comes back in the
//! operation's completion. The kernel therefore only ever touches blocks that no safe code can
//! reach, and the mapping outlives every block because the pool lives inside the ring, which
//! drains all operations before it is dropped.
//!
//! # Limits
//!
//! Every block is aligned to [`BUF_ALIGN_BYTES`], which satisfies O_DIRECT on every Linux
//! block device (logical blocks are at most 4 KiB). Exhaustion returns `None`: callers apply
//! backpressure; the pool never falls back to the heap.

use memmap2::MmapMut;

/// Smallest block and the alignment of every block.
pub const BUF_ALIGN_BYTES: usize = 4096;
/// Largest block: the maximum NBD payload ringbd accepts (32 MiB).
pub const BUF_BYTES_MAX: usize = 32 << 20;
const ORDER_MAX: usize = (BUF_BYTES_MAX / BUF_ALIGN_BYTES).trailing_zeros() as usize;
const ORDERS: usize = ORDER_MAX + 1;
const NIL: u32 = u32::MAX;
const NOT_FREE: u8 = u8::MAX;

const _: () = assert!(BUF_BYTES_MAX.is_power_of_two() && BUF_ALIGN_BYTES.is_power_of_two());
const _: () = assert!(ORDER_MAX < NOT_FREE as usize);

/// A checked-out block of the pool. Unique; give it back with [`BufPool::check_in`].
#[derive(Debug, PartialEq, Eq)]
pub struct Buf {
    page: u32,
    order: u8,
}

impl Buf {
    /// Capacity of the block in bytes (a power of two ≥ 4 KiB).
    pub fn capacity(&self) -> usize {
        BUF_ALIGN_BYTES << self.order
    }
}

/// The registered buffer pool of one shard.
pub struct BufPool {
    map: MmapMut,
    pages: u32,
    free_head: [u32; ORDERS],
    next: Vec<u32>,
    prev: Vec<u32>,
    /// For each page: the order of the free block starting there, or `NOT_FREE`.
    free_order: Vec<u8>,
    used_bytes: usize,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("bytes", &self.len())
            .field("used_bytes", &self.used_bytes)
            .finish()
    }
}

impl BufPool {
    /// Maps `bytes` (rounded up to a multiple of [`BUF_BYTES_MAX`]) and makes every block free.
    pub fn new(bytes: usize) -> std::io::Result<BufPool> {
        let bytes = bytes.max(BUF_BYTES_MAX).div_ceil(BUF_BYTES_MAX) * BUF_BYTES_MAX;
        let map = MmapMut::map_anon(bytes)?;
        assert_eq!(map.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
        let pages = u32::try_from(bytes / BUF_ALIGN_BYTES).expect("pool too large");
        let mut pool = BufPool {
            map,
            pages,
            free_head: [NIL; ORDERS],
            next: vec![NIL; pages as usize],
            prev: vec![NIL; pages as usize],
            free_order: vec![NOT_FREE; pages as usize],
            used_bytes: 0,
        };
        let top_pages = 1u32 << ORDER_MAX;
        for page in (0..pages).step_by(top_pages as usize).rev() {
            pool.push_free(page, ORDER_MAX);
        }
        Ok(pool)
    }

    /// Total bytes of the mapping.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a pool has at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes currently checked out.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Checks out a block of at least `bytes` (1 ..= [`BUF_BYTES_MAX`]), or `None` when no
    /// block that large is free.
    pub fn check_out(&mut self, bytes: usize) -> Option<Buf> {
        assert!(
            bytes > 0 && bytes <= BUF_BYTES_MAX,
            "buffer size {bytes} out of range"
        );
        let want = order_for(bytes);
        let mut order = want;
        while order <= ORDER_MAX && self.free_head[order] == NIL {
            order += 1;
        }
        if order > ORDER_MAX {
            return None;
        }
        let page = self.free_head[order];
        self.unlink(page, order);
        while order > want {
            order -= 1;
            self.push_free(page + (1 << order), order);
        }
        self.used_bytes += BUF_ALIGN_BYTES << want;
        Some(Buf {
            page,
            order: want as u8,
        })
    }

    /// Returns a block, merging it with its free buddies.
    pub fn check_in(&mut self, buf: Buf) {
        let (mut page, mut order) = (buf.page, buf.order as usize);
        assert_eq!(self.free_order[page as usize], NOT_FREE, "double check-in");
        self.used_bytes -= BUF_ALIGN_BYTES << order;
        while order < ORDER_MAX {
            let buddy = page ^ (1 << order);
            if buddy >= self.pages || self.free_order[buddy as usize] != order as u8 {
                break;
            }
            self.unlink(buddy, order);
            page = page.min(buddy);
            order += 1;
        }
        self.push_free(page, order);
    }

    /// The bytes of a checked-out block.
    pub fn bytes(&self, buf: &Buf) -> &[u8] {
        let start = buf.page as usize * BUF_ALIGN_BYTES;
        &self.map[start..start + buf.capacity()]
    }

    /// The bytes of a checked-out block, writable.
    pub fn bytes_mut(&mut self, buf: &Buf) -> &mut [u8] {
        let start = buf.page as usize * BUF_ALIGN_BYTES;
        &mut self.map[start..start + buf.capacity()]
    }

    /// Copies `len` bytes from `src[src_at..]` to `dst[dst_at..]` (two checked-out blocks).
    pub fn copy_between(&mut self, src: &Buf, src_at: usize, dst: &Buf, dst_at: usize, len: usize) {
        assert!(src_at + len <= src.capacity() && dst_at + len <= dst.capacity());
        let from = src.page as usize * BUF_ALIGN_BYTES + src_at;
        let to = dst.page as usize * BUF_ALIGN_BYTES + dst_at;
        self.map.copy_within(from..from + len, to);
    }

    /// Base address and length of the whole mapping, for buffer registration.
    pub(crate) fn region(&mut self) -> (*mut u8, usize) {
        (self.map.as_mut_ptr(), self.map.len())
    }

    /// Address of byte `offset` of `buf`; asserts the range lies inside the block.
    pub(crate) fn address(&mut self, buf: &Buf, offset: usize, len: usize) -> *mut u8 {
        assert!(offset + len <= buf.capacity(), "range outside the buffer");
        let start = buf.page as usize * BUF_ALIGN_BYTES + offset;
        self.map[start..start + len].as_mut_ptr()
    }

    fn push_free(&mut self, page: u32, order: usize) {
        let head = self.free_head[order];
        self.next[page as usize] = head;
        self.prev[page as usize] = NIL;
        if head != NIL {
            self.prev[head as usize] = page;
        }
        self.free_head[order] = page;
        self.free_order[page as usize] = order as u8;
    }

    fn unlink(&mut self, page: u32, order: usize) {
        assert_eq!(self.free_order[page as usize], order as u8);
        let (prev, next) = (self.prev[page as usize], self.next[page as usize]);
        if prev == NIL {
            self.free_head[order] = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next != NIL {
            self.prev[next as usize] = prev;
        }
        self.free_order[page as usize] = NOT_FREE;
    }
}

fn order_for(bytes: usize) -> usize {
    bytes
        .div_ceil(BUF_ALIGN_BYTES)
        .next_power_of_two()
        .trailing_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_rounds_up_to_pages() {
        assert_eq!(order_for(1), 0);
        assert_eq!(order_for(4096), 0);
        assert_eq!(order_for(4097), 1);
        assert_eq!(order_for(BUF_BYTES_MAX), ORDER_MAX);
    }

    #[test]
    fn exhaustion_returns_none_and_everything_merges_back() {
        let mut pool = BufPool::new(BUF_BYTES_MAX).unwrap();
        let mut bufs = Vec::new();
        while let Some(buf) = pool.check_out(1 << 20) {
            assert_eq!(pool.address(&buf, 0, 1) as usize % BUF_ALIGN_BYTES, 0);
            bufs.push(buf);
        }
        assert_eq!(bufs.len(), 32);
        assert!(pool.check_out(4096).is_none());
        for buf in bufs {
            pool.check_in(buf);
        }
        assert_eq!(pool.used_bytes(), 0);
        let whole = pool
            .check_out(BUF_BYTES_MAX)
            .expect("merged back into one block");
        pool.check_in(whole);
    }

    #[test]
    fn blocks_never_overlap() {
        let mut pool = BufPool::new(BUF_BYTES_MAX).unwrap();
        let sizes = [4096, 8192, 100_000, 4096, 1 << 20, 12_288, 3 << 20];
        let mut bufs: Vec<Buf> = sizes.iter().map(|&s| pool.check_out(s).unwrap()).collect();
        for (index, buf) in bufs.iter().enumerate() {
            pool.bytes_mut(buf).fill(index as u8);
        }
        for (index, buf) in bufs.iter().enumerate() {
            assert!(pool.bytes(buf).iter().all(|&b| b == index as u8));
        }
        for buf in bufs.drain(..) {
            pool.check_in(buf);
        }
        assert_eq!(pool.used_bytes(), 0);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn oversize_request_is_a_programmer_error() {
        let mut pool = BufPool::new(BUF_BYTES_MAX).unwrap();
        let _ = pool.check_out(BUF_BYTES_MAX + 1);
    }
}
