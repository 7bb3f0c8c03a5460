//! Fuzzes `Handshake::advance` with arbitrary client bytes, arbitrarily split: the first 8
//! bytes seed the split points. The invariants live in
//! `ringbd::target::handshake::harness::check_one_input` (consumed never exceeds the input,
//! bounded output, chunked feeding equals whole-buffer feeding, well-formed replies,
//! consistent session) so that `tests/fuzz_seeds.rs` replays the seeds through the same
//! checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringbd::target::handshake::harness::check_one_input(data);
});
