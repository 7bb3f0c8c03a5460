//! The `user_data` keyspace: one file defines every value the ring puts in an SQE.
//!
//! * `0` is reserved and never used (a zeroed SQE can never be mistaken for an operation).
//! * [`CANCEL`] marks ASYNC_CANCEL requests, whose own completions are ignored.
//! * Every other value is an in-flight slot key plus one. Keys never truncate: slot keys are
//!   `usize` and must stay below [`CANCEL`] - 1, which is asserted.

/// user_data of cancellation requests; their CQEs carry no slot.
pub const CANCEL: u64 = u64::MAX;

/// The user_data for in-flight slot `key`.
pub fn encode(key: usize) -> u64 {
    let value = key as u64 + 1;
    assert!(
        value < CANCEL,
        "slot key {key} collides with a reserved value"
    );
    value
}

/// The slot key of a CQE, or `None` for reserved values.
pub fn decode(user_data: u64) -> Option<usize> {
    match user_data {
        0 | CANCEL => None,
        value => Some(usize::try_from(value - 1).expect("user_data wider than usize")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_never_yields_reserved_values() {
        for key in (0..10_000).chain([u32::MAX as usize, (u64::MAX - 3) as usize]) {
            let value = encode(key);
            assert_ne!(value, 0);
            assert_ne!(value, CANCEL);
            assert_eq!(decode(value), Some(key));
        }
        assert_eq!(decode(0), None);
        assert_eq!(decode(CANCEL), None);
    }

    #[test]
    #[should_panic(expected = "collides")]
    fn the_largest_key_is_refused() {
        let _ = encode((u64::MAX - 1) as usize);
    }
}
