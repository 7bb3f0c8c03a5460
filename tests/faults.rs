//! Fault injection and power-loss simulation, checked with a real client (python3-libnbd,
//! `tests/python/faults.py`) and the control socket.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{ServerSpec, python, require_python_nbd, sparse_file, tempdir};

const TIMEOUT: Duration = Duration::from_secs(120);

fn faults_server(dir: &tempfile::TempDir, options: &[&str]) -> (common::Server, PathBuf) {
    let image = dir.path().join("disk.img");
    sparse_file(&image, 64 << 20);
    let control = dir.path().join("control.sock");
    let control_text = control.to_str().expect("utf-8 path").to_string();
    let mut all = vec!["--control", control_text.as_str()];
    all.extend_from_slice(options);
    let server = ServerSpec::new(image.to_str().expect("utf-8 path"))
        .options(&all)
        .start();
    (server, control)
}

fn run(mode: &str, server: &common::Server, control: &std::path::Path, extra: &[&str]) -> String {
    let socket = server.socket().to_str().expect("utf-8 path");
    let mut args = vec![mode, socket, control.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    python("faults.py", &args, TIMEOUT)
}

#[test]
fn injected_errors_and_device_states_reach_the_client_and_clear() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let (mut server, control) = faults_server(
        &dir,
        &[
            "--fault",
            "error:write:errno=ENOSPC,every=2",
            "--fault-seed",
            "9",
        ],
    );
    assert!(run("errors", &server, &control, &[]).contains("errors ok"));
    let log = server.log();
    assert!(
        log.contains("injected fault") && log.contains("seed=9"),
        "faults are logged with the seed:\n{log}"
    );
    server.assert_running();
}

#[test]
fn a_delayed_request_does_not_hold_back_others() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let (mut server, control) = faults_server(&dir, &[]);
    assert!(run("delay", &server, &control, &[]).contains("delay ok"));
    server.assert_running();
}

#[test]
fn power_cut_loses_exactly_the_unflushed_writes() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let (mut server, control) = faults_server(&dir, &["--power-loss", "drop"]);
    assert!(run("power", &server, &control, &[]).contains("power ok"));
    server.assert_running();
}

#[test]
fn torn_power_cuts_are_sector_atomic_and_replayable_from_the_seed() {
    if !require_python_nbd() {
        return;
    }
    let outcome = |seed: &str| {
        let dir = tempdir();
        let (mut server, control) = faults_server(&dir, &["--power-loss", "torn"]);
        let bitmap = run("torn", &server, &control, &[seed]).trim().to_string();
        server.assert_running();
        bitmap
    };
    let first = outcome("1234");
    assert_eq!(first.len(), 64, "{first}");
    assert!(
        first.contains('0') && first.contains('1'),
        "a torn cut keeps some sectors: {first}"
    );
    assert_eq!(outcome("1234"), first, "the same seed tears the same way");
    assert_ne!(outcome("99"), first, "another seed tears another way");
}

#[test]
fn faults_are_set_per_export_from_the_config_file_and_the_command_line() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_file(&a, 16 << 20);
    sparse_file(&b, 16 << 20);
    let config = dir.path().join("ringbd.toml");
    let text = format!(
        "[[export]]\nname = \"a\"\npath = {:?}\nfaults = [\"error:write:errno=ENOSPC\"]\n\
         fault_seed = 77\n[[export]]\nname = \"b\"\npath = {:?}\n",
        a.to_str().unwrap(),
        b.to_str().unwrap()
    );
    std::fs::write(&config, text).unwrap();
    let control = dir.path().join("control.sock");
    let mut server = ServerSpec::default()
        .options(&[
            "--config",
            config.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--fault",
            "b@error:read:errno=EIO",
        ])
        .start();
    assert!(run("per-export", &server, &control, &[]).contains("per-export ok"));
    server.assert_running();
}
