//! Replays the committed fuzz seed corpus (`fuzz/seeds/<target>/`) through the same invariant
//! checks the cargo-fuzz targets run, so CI exercises them on stable without libFuzzer.

use std::path::Path;

/// Runs `check` on every file of `fuzz/seeds/<target>/`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let entries = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("reading {}: {error}", directory.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let data = std::fs::read(&path).expect("seed file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "seed {} failed", path.display());
        count += 1;
    }
    count
}

#[test]
fn handshake_seeds_hold_the_invariants() {
    let count = replay(
        "handshake",
        ringbd::target::handshake::harness::check_one_input,
    );
    assert!(
        count >= 3,
        "expected at least 3 handshake seeds, found {count}"
    );
}

#[test]
fn decode_request_seeds_hold_the_invariants() {
    let count = replay(
        "decode_request",
        ringbd::target::validate::harness::check_one_input,
    );
    assert!(
        count >= 3,
        "expected at least 3 decode_request seeds, found {count}"
    );
}
