//! What the protocol layer knows about an export: its name, size, capabilities and block
//! sizes. The backend fills [`Capabilities`] from what it really supports, so the transmission
//! flags advertised to a client never promise an unimplemented feature.

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size: offsets and lengths must be multiples of it (power of two, ≤ 64 KiB).
    pub minimum: u32,
    /// Preferred block size (power of two, ≥ max(minimum, 512)).
    pub preferred: u32,
    /// Maximum payload of a single READ or WRITE.
    pub maximum: u32,
}

/// Features the backend of an export really implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// NBD_CMD_FLUSH is meaningful (NBD_FLAG_SEND_FLUSH).
    pub flush: bool,
    /// NBD_CMD_FLAG_FUA is honoured (NBD_FLAG_SEND_FUA).
    pub fua: bool,
    /// NBD_CMD_TRIM (NBD_FLAG_SEND_TRIM).
    pub trim: bool,
    /// NBD_CMD_WRITE_ZEROES (NBD_FLAG_SEND_WRITE_ZEROES).
    pub write_zeroes: bool,
    /// NBD_CMD_FLAG_FAST_ZERO can be answered honestly (NBD_FLAG_SEND_FAST_ZERO).
    pub fast_zero: bool,
    /// NBD_CMD_CACHE (NBD_FLAG_SEND_CACHE).
    pub cache: bool,
    /// `base:allocation` block status can be answered.
    pub block_status: bool,
    /// Several connections see one consistent image (NBD_FLAG_CAN_MULTI_CONN).
    pub multi_conn: bool,
    /// The medium is rotational (NBD_FLAG_ROTATIONAL).
    pub rotational: bool,
}

/// An export as the protocol layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Index of this export in the server's export table; the data plane maps it to a backend.
    pub id: usize,
    /// Export name ("" is the default export).
    pub name: String,
    /// Human-readable description (NBD_INFO_DESCRIPTION); empty means none.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes, trims and zeroes are refused with EPERM.
    pub read_only: bool,
    /// What the backend implements.
    pub caps: Capabilities,
    /// Advertised block size constraints.
    pub block_size: BlockSize,
}

impl ExportInfo {
    /// The transmission flags advertised for this export when replies are framed in `style`.
    ///
    /// Only what [`Capabilities`] says the backend implements is advertised: `HAS_FLAGS`
    /// always; `READ_ONLY` for read-only exports; FLUSH, FUA, ROTATIONAL, CACHE and
    /// MULTI_CONN from `caps`; TRIM, WRITE_ZEROES and FAST_ZERO only on writable exports
    /// (FAST_ZERO only together with WRITE_ZEROES); DF only with structured or extended
    /// replies. RESIZE and BLOCK_STATUS_PAYLOAD are never advertised.
    pub fn transmission_flags(&self, style: crate::target::codec::ReplyStyle) -> u16 {
        use crate::target::proto::{
            NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL,
            NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH,
            NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
        };
        let caps = &self.caps;
        let writable = !self.read_only;
        let structured = style != crate::target::codec::ReplyStyle::Simple;
        let table = [
            (true, NBD_FLAG_HAS_FLAGS),
            (self.read_only, NBD_FLAG_READ_ONLY),
            (caps.flush, NBD_FLAG_SEND_FLUSH),
            (caps.fua, NBD_FLAG_SEND_FUA),
            (caps.rotational, NBD_FLAG_ROTATIONAL),
            (writable && caps.trim, NBD_FLAG_SEND_TRIM),
            (writable && caps.write_zeroes, NBD_FLAG_SEND_WRITE_ZEROES),
            (structured, NBD_FLAG_SEND_DF),
            (caps.multi_conn, NBD_FLAG_CAN_MULTI_CONN),
            (caps.cache, NBD_FLAG_SEND_CACHE),
            (
                writable && caps.write_zeroes && caps.fast_zero,
                NBD_FLAG_SEND_FAST_ZERO,
            ),
        ];
        let flags = table
            .iter()
            .filter(|(advertised, _)| *advertised)
            .fold(0, |flags, (_, flag)| flags | flag);
        assert!(flags & NBD_FLAG_HAS_FLAGS != 0);
        assert!(flags & NBD_FLAG_SEND_FAST_ZERO == 0 || flags & NBD_FLAG_SEND_WRITE_ZEROES != 0);
        flags
    }

    /// Checks what the protocol layer relies on, for the configuration to call at startup:
    /// the name and description are NBD strings (at most `NAME_BYTES_MAX` bytes, no NUL), the
    /// block sizes obey the spec (minimum a power of two ≤ 64 KiB; preferred a power of two
    /// ≥ max(minimum, 512); maximum a multiple of minimum, ≥ preferred or the export size
    /// when smaller, and ≤ `PAYLOAD_BYTES_MAX` or 0xffffffff) and the size is a multiple of
    /// the minimum block size. Returns what is wrong.
    pub fn check(&self) -> Result<(), &'static str> {
        use crate::target::proto::{NAME_BYTES_MAX, PAYLOAD_BYTES_MAX};
        const MINIMUM_BLOCK_BYTES_MAX: u32 = 1 << 16;
        const PREFERRED_BLOCK_BYTES_MIN: u32 = 512;
        let block = &self.block_size;
        if self.name.len() > NAME_BYTES_MAX || self.name.contains('\0') {
            return Err("export name longer than 4096 bytes or containing NUL");
        }
        if self.description.len() > NAME_BYTES_MAX || self.description.contains('\0') {
            return Err("export description longer than 4096 bytes or containing NUL");
        }
        if !block.minimum.is_power_of_two() || block.minimum > MINIMUM_BLOCK_BYTES_MAX {
            return Err("minimum block size must be a power of two of at most 64 KiB");
        }
        if !block.preferred.is_power_of_two()
            || block.preferred < block.minimum.max(PREFERRED_BLOCK_BYTES_MIN)
        {
            return Err("preferred block size must be a power of two >= max(minimum, 512)");
        }
        let unlimited = block.maximum == u32::MAX;
        if !unlimited && !block.maximum.is_multiple_of(block.minimum) {
            return Err("maximum block size must be a multiple of the minimum block size");
        }
        if u64::from(block.maximum) < u64::from(block.preferred).min(self.size) {
            return Err("maximum block size must be >= min(preferred block size, export size)");
        }
        if !unlimited && block.maximum as usize > PAYLOAD_BYTES_MAX {
            return Err("maximum block size must be <= 32 MiB (PAYLOAD_BYTES_MAX) or 0xffffffff");
        }
        if !self.size.is_multiple_of(u64::from(block.minimum)) {
            return Err("export size must be a multiple of the minimum block size");
        }
        Ok(())
    }
}

impl BlockSize {
    /// The maximum READ/WRITE payload actually enforced and advertised in
    /// `NBD_INFO_BLOCK_SIZE`: `maximum`, capped at `PAYLOAD_BYTES_MAX` (so 0xffffffff, "no
    /// limit", becomes 32 MiB). Never advertise a limit looser than the one enforced.
    pub fn payload_bytes_max(&self) -> u32 {
        const PAYLOAD_BYTES_MAX: u32 = crate::target::proto::PAYLOAD_BYTES_MAX as u32;
        self.maximum.min(PAYLOAD_BYTES_MAX)
    }
}
