//! Where the TLS record boundaries are in the ciphertext fed so far.
//!
//! Handing a session to the kernel is only correct between two records: bytes of a partial
//! record already given to the library would be lost (the kernel reads the rest from the
//! socket), and the receive sequence number would be off by one. rustls does not expose how
//! much ciphertext it holds, so [`RecordBoundary`] follows the 5-byte record headers
//! (RFC 8446 §5.1: type, legacy version, 16-bit length) of every byte the session consumed.
//! It only counts; the TLS library validates.

/// Length of a TLS record header.
const HEADER_BYTES: usize = 5;

/// Tracks whether the consumed ciphertext ends exactly at a record boundary.
#[derive(Debug, Default, Clone)]
pub struct RecordBoundary {
    header: [u8; HEADER_BYTES],
    header_len: usize,
    body_left: usize,
}

impl RecordBoundary {
    /// Accounts `bytes`, which the session consumed (in order).
    pub fn consume(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let step = self.body_left.min(bytes.len());
                self.body_left -= step;
                bytes = &bytes[step..];
                continue;
            }
            let step = (HEADER_BYTES - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + step].copy_from_slice(&bytes[..step]);
            self.header_len += step;
            bytes = &bytes[step..];
            if self.header_len == HEADER_BYTES {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_len = 0;
            }
        }
    }

    /// Whether everything consumed so far forms whole records.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn records(lengths: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for &len in lengths {
            out.extend_from_slice(&[23, 3, 3]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend(std::iter::repeat_n(0xee, usize::from(len)));
        }
        out
    }

    #[test]
    fn empty_records_and_exact_ends() {
        let mut boundary = RecordBoundary::default();
        assert!(boundary.at_boundary());
        boundary.consume(&records(&[0]));
        assert!(boundary.at_boundary());
        boundary.consume(&[23, 3]);
        assert!(!boundary.at_boundary());
        boundary.consume(&[3, 0, 2, 1]);
        assert!(!boundary.at_boundary());
        boundary.consume(&[2]);
        assert!(boundary.at_boundary());
    }

    proptest! {
        #[test]
        fn any_chunking_finds_the_same_boundaries(
            lengths in proptest::collection::vec(0u16..3000, 1..6),
            cuts in proptest::collection::vec(1usize..4000, 0..20),
        ) {
            let stream = records(&lengths);
            let mut ends = std::collections::BTreeSet::new();
            let mut at = 0;
            for &len in &lengths {
                at += HEADER_BYTES + usize::from(len);
                ends.insert(at);
            }
            let mut boundary = RecordBoundary::default();
            let mut position = 0;
            let mut cuts = cuts.into_iter();
            while position < stream.len() {
                let step = cuts.next().unwrap_or(usize::MAX).min(stream.len() - position);
                boundary.consume(&stream[position..position + step]);
                position += step;
                prop_assert_eq!(boundary.at_boundary(), ends.contains(&position));
            }
        }
    }
}
