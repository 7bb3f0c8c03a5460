//! SIGHUP reloads the export list: added exports serve new clients, removed ones stop being
//! offered while their running clients continue, and a bad configuration changes nothing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{python, require_python_nbd, ringbd_bin, sparse_file, tempdir};

#[test]
fn sighup_adds_and_removes_exports_without_dropping_clients() {
    if !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sparse_file(&a, 16 << 20);
    sparse_file(&b, 16 << 20);
    let socket = dir.path().join("nbd.sock");
    let config = dir.path().join("ringbd.toml");
    let text = |name: &str, path: &std::path::Path| {
        format!(
            "[server]\nunix = {:?}\n[[export]]\nname = {name:?}\npath = {:?}\n",
            socket.to_str().unwrap(),
            path.to_str().unwrap()
        )
    };
    std::fs::write(&config, text("a", &a)).unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(ringbd_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ringbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "ringbd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    let new_text = text("b", &b);
    let output = python(
        "reload.py",
        &[
            socket.to_str().unwrap(),
            config.to_str().unwrap(),
            &pid,
            &new_text,
        ],
        Duration::from_secs(60),
    );
    common::send_signal(child.id(), libc::SIGTERM);
    let status = common::wait_timeout(&mut child, Duration::from_secs(20));
    let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(output.contains("reload ok"), "{output}\n{server_log}");
    assert!(server_log.contains("exports reloaded"), "{server_log}");
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit after reload:\n{server_log}"
    );
}
