//! The command-line contract: `--version`, `--help`, argument errors, signals, listeners.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::raw::*;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn version_and_help() {
    let out = run(Command::new(ringbd_bin()).arg("--version"), TIMEOUT).ok();
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {out:?}"
    );
    let out = run(Command::new(ringbd_bin()).arg("--help"), TIMEOUT).ok();
    assert!(
        out.contains("serve"),
        "--help does not mention `serve`: {out}"
    );
    let out = run(
        Command::new(ringbd_bin()).args(["serve", "--help"]),
        TIMEOUT,
    )
    .ok();
    for option in ["--unix", "--listen", "--read-only", "--shards", "--cache"] {
        assert!(
            out.contains(option),
            "`serve --help` does not mention {option}: {out}"
        );
    }
}

#[test]
fn bad_arguments_fail_fast_with_a_message() {
    let dir = tempdir();
    let socket = dir.path().join("s.sock");
    let socket = socket.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let cases: Vec<Vec<String>> = vec![
        vec!["serve".into(), "--unix".into(), socket.into()],
        vec![
            "serve".into(),
            "--unix".into(),
            socket.into(),
            missing.display().to_string(),
        ],
        vec![
            "serve".into(),
            "--unix".into(),
            socket.into(),
            "memory:lots".into(),
        ],
        vec![
            "serve".into(),
            "--unix".into(),
            socket.into(),
            "--cache".into(),
            "bogus".into(),
            "memory:1M".into(),
        ],
        vec![
            "serve".into(),
            "--listen".into(),
            "not-an-address".into(),
            "memory:1M".into(),
        ],
        vec!["no-such-subcommand".into()],
    ];
    for args in cases {
        let out = run(Command::new(ringbd_bin()).args(&args), TIMEOUT);
        assert!(!out.status.success(), "ringbd {args:?} should fail: {out}");
        assert!(
            !out.stderr.trim().is_empty(),
            "ringbd {args:?} failed without a message"
        );
    }
}

#[test]
fn sigterm_and_sigint_exit_zero_with_idle_clients() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut server = ServerSpec::new("memory:8M").start();
        // One client idle in transmission, one idle in the handshake.
        let (mut idle, _) = RawClient::ready(server.socket(), "").unwrap();
        assert_eq!(idle.read(0, 4096).unwrap().unwrap().len(), 4096);
        let _handshaking = RawClient::handshake(server.socket()).unwrap();
        let status = server.stop_with(signal);
        assert!(status.success(), "signal {signal}: exit status {status}");
        assert!(
            idle.closed_by_server(),
            "idle client not disconnected at shutdown"
        );
    }
}

#[test]
fn unix_and_tcp_listeners_together() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let server = ServerSpec::new("memory:8M").listen(address.clone()).start();
    let (mut unix, _) = RawClient::ready(server.socket(), "").unwrap();
    let (mut tcp, info) = RawClient::ready(address.parse::<std::net::SocketAddr>().unwrap(), "")
        .expect("TCP listener");
    assert_eq!(info.size, 8 << 20);
    let data = pattern(0, 4096, 11);
    unix.write(CMD_FLAG_FUA, 0, &data).unwrap().unwrap();
    assert_eq!(
        tcp.read(0, 4096).unwrap().unwrap(),
        data,
        "TCP client sees unix client's write"
    );
}

#[test]
fn read_only_flag_applies_to_every_export() {
    let dir = tempdir();
    let image = dir.path().join("ro.img");
    sparse_file(&image, 1 << 20);
    let server = ServerSpec::new("memory:1M")
        .export(format!("file={}", image.display()))
        .options(&["--read-only"])
        .start();
    for name in ["", "file"] {
        let (mut c, info) = RawClient::ready(server.socket(), name).unwrap();
        assert!(
            info.flags & FLAG_READ_ONLY != 0,
            "export {name:?} not read-only"
        );
        assert_eq!(
            c.write(0, 0, &[1; 512]).unwrap(),
            Err(EPERM),
            "export {name:?}"
        );
        assert_eq!(c.read(0, 512).unwrap().unwrap(), vec![0; 512]);
    }
}
