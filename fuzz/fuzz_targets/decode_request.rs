//! Fuzzes `decode_request` + `validate` + reply encoding over a stream of requests: the first
//! byte selects a fixed (export, session) pair, the rest is headers and payloads. The
//! invariants live in `ringbd::target::validate::harness::check_one_input` (framing kept,
//! served commands in range, aligned and advertised, rejections drain exactly the payload,
//! disconnects only for oversize payloads, every verdict encodable) so that
//! `tests/fuzz_seeds.rs` replays the seeds through the same checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ringbd::target::validate::harness::check_one_input(data);
});
