//! TLS and access-control configuration through the real binary: `check-config` accepts the
//! documented keys and prints their effective values, refuses bad ones naming the file, the
//! line and the key, and `serve` refuses TLS without credentials before binding anything.
//! (Denying clients end to end is tested once the server enforces these settings.)

mod common;

use std::fs;
use std::path::Path;

use common::*;

const GOOD: &str = r#"
[server]
listen = ["127.0.0.1:10809"]
tls = "require"
tls_cert = "/etc/ringbd/server-cert.pem"
tls_key = "/etc/ringbd/server-key.pem"
tls_ca = "/etc/ringbd/ca-cert.pem"
tls_psk = "/etc/ringbd/keys.psk"
tls_kernel = "auto"
allow = ["10.0.0.0/8", "::1", "::ffff:192.168.0.0/112"]
allow_uids = [0, "root"]
export_max_connections = 8

[[export]]
name = "vm1"
path = "memory:1M"
tls_only = true
allow = ["10.1.0.0/16"]
allow_uids = [1000]
allow_clients = ["cn=hv1.example", "PSK:alice", "dns:HV2.Example"]
max_connections = 4

[[export]]
name = "scratch"
path = "memory:1M"
"#;

#[test]
fn check_config_prints_the_effective_tls_and_access_settings() {
    let dir = tempdir();
    let good = write_config(dir.path(), GOOD);
    let out = ringbd(&["check-config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out}");
    for expected in [
        "tls = \"require\"",
        "tls_cert = \"/etc/ringbd/server-cert.pem\"",
        "tls_psk = \"/etc/ringbd/keys.psk\"",
        "tls_kernel = \"auto\"",
        "allow = [\"10.0.0.0/8\", \"::1/128\", \"192.168.0.0/16\"]",
        "allow_uids = [0, 0]",
        "allow_clients = [\"CN=hv1.example\", \"PSK:alice\", \"DNS:hv2.example\"]",
        "max_connections = 4",
        // The server default, resolved into the export without its own limit.
        "max_connections = 8",
        "tls_only = true",
    ] {
        assert!(out.stdout.contains(expected), "{expected} missing: {out}");
    }
    // The files do not exist here: warnings, not errors.
    assert!(
        out.stderr
            .contains("warning: tls_cert: /etc/ringbd/server-cert.pem"),
        "{out}"
    );
    let effective = dir.path().join("effective.toml");
    fs::write(&effective, &out.stdout).unwrap();
    let again = ringbd(&["check-config", effective.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{again}");
    assert_eq!(
        again.stdout, out.stdout,
        "the printed configuration is stable"
    );
}

#[test]
fn bad_tls_and_access_settings_name_the_line_and_the_key() {
    let dir = tempdir();
    let export = "[[export]]\nname = \"a\"\npath = \"memory:1M\"\n";
    let cases = [
        (
            format!("[server]\ntls = \"maybe\"\n{export}"),
            "line 2",
            "server.tls",
        ),
        (
            format!("[server]\n\ntls = \"require\"\n{export}"),
            "line 3",
            "server.tls",
        ),
        (
            format!("[server]\ntls = \"on\"\ntls_cert = \"/c\"\n{export}"),
            "line 3",
            "server.tls_cert",
        ),
        (
            format!("[server]\ntls_key = \"/k\"\n{export}"),
            "line 2",
            "server.tls_key",
        ),
        (
            format!("[server]\ntls = \"on\"\ntls_psk = \"/p\"\ntls_ca = \"/ca\"\n{export}"),
            "line 4",
            "server.tls_ca",
        ),
        (
            format!("[server]\nallow = [\"10.0.0.1/8\"]\n{export}"),
            "line 2",
            "server.allow[0]",
        ),
        (
            format!("[server]\nallow_uids = [\"no-such-user-ringbd\"]\n{export}"),
            "line 2",
            "server.allow_uids[0]",
        ),
        (
            format!("[server]\nexport_max_connections = 2000000\n{export}"),
            "line 2",
            "server.export_max_connections",
        ),
        (
            format!("{export}tls_only = true\n"),
            "line 4",
            "export[0].tls_only",
        ),
        (
            format!("{export}allow_clients = [\"CN=x\"]\n"),
            "line 4",
            "export[0].allow_clients",
        ),
        (
            format!(
                "[server]\ntls = \"on\"\ntls_psk = \"/p\"\n{export}allow_clients = [\"CN=x\"]\n"
            ),
            "line 7",
            "export[0].allow_clients[0]",
        ),
        (
            format!("{export}allow_clients = [\"bob\"]\n"),
            "line 4",
            "export[0].allow_clients[0]",
        ),
        (
            format!("{export}allow = [\"fe80::/200\"]\n"),
            "line 4",
            "export[0].allow[0]",
        ),
        (
            format!("{export}max_connections = -1\n"),
            "line 4",
            "export[0].max_connections",
        ),
    ];
    for (text, line, key) in cases {
        let bad = write_config(dir.path(), &text);
        let out = ringbd(&["check-config", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {out}");
        assert!(
            out.stderr.contains(line),
            "{text:?} should name {line}: {out}"
        );
        assert!(
            out.stderr.contains(&format!("key `{key}`")),
            "{text:?} should name {key}: {out}"
        );
        assert!(out.stdout.is_empty(), "{out}");
        let socket = dir.path().join("s.sock");
        let serve = ringbd(&[
            "serve",
            "--unix",
            socket.to_str().unwrap(),
            "--config",
            bad.to_str().unwrap(),
        ]);
        assert_eq!(
            serve.status.code(),
            Some(2),
            "serve --config {text:?}: {serve}"
        );
        assert!(serve.stderr.contains(line), "{serve}");
        assert!(!socket.exists(), "nothing was bound");
    }
}

#[test]
fn serve_refuses_tls_without_credentials() {
    let dir = tempdir();
    let socket = dir.path().join("s.sock");
    let socket = socket.to_str().unwrap();
    for mode in ["require", "on"] {
        let out = ringbd(&["serve", "--unix", socket, "--tls", mode, "memory:1M"]);
        assert_eq!(out.status.code(), Some(2), "{out}");
        assert!(out.stderr.contains("--tls"), "{out}");
        assert!(out.stderr.contains("needs credentials"), "{out}");
        assert!(out.stderr.contains("--tls-psk"), "names a fix: {out}");
    }
    let out = ringbd(&[
        "serve",
        "--unix",
        socket,
        "--tls-cert",
        "/c.pem",
        "memory:1M",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("--tls-cert") && out.stderr.contains("tls_key"),
        "{out}"
    );
    // A flag turning TLS on for a file with no credentials.
    let file = write_config(
        dir.path(),
        "[[export]]\nname = \"a\"\npath = \"memory:1M\"\n",
    );
    let file = file.to_str().unwrap();
    let out = ringbd(&[
        "serve", "--unix", socket, "--config", file, "--tls", "require",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("needs credentials"), "{out}");
    for (flag, value) in [
        ("--tls", "maybe"),
        ("--tls-kernel", "on"),
        ("--allow", "10.0.0.1/8"),
        ("--allow", "example.org"),
        ("--allow-uid", "no-such-user-ringbd"),
    ] {
        let out = ringbd(&["serve", "--unix", socket, flag, value, "memory:1M"]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {out}");
        assert!(out.stderr.contains(flag), "{out}");
    }
    assert!(!Path::new(socket).exists(), "nothing was bound");
}

#[test]
fn help_documents_tls_and_access_flags() {
    let help = ringbd(&["serve", "--help"]).ok();
    for expected in [
        "--tls <MODE>",
        "--tls-cert <FILE>",
        "--tls-key <FILE>",
        "--tls-ca <FILE>",
        "--tls-psk <FILE>",
        "--tls-kernel <MODE>",
        "--allow <CIDR>",
        "--allow-uid <UID>",
        "--export-max-connections <N>",
        "ringbd serve --tls require --tls-psk",
    ] {
        assert!(help.contains(expected), "{expected} missing:\n{help}");
    }
}

#[test]
fn the_contrib_example_access_settings_are_valid_when_uncommented() {
    let example = fs::read_to_string(repo_root().join("contrib/ringbd.toml")).unwrap();
    let keys = ["tls", "allow", "export_max_connections", "max_connections"];
    let mut enabled = 0;
    let text: String = example
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if keys.iter().any(|key| rest.starts_with(key)) => {
                enabled += 1;
                // The example names the qemu user, which this host may not have.
                format!("{}\n", rest.replace("\"qemu\"", "\"root\""))
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(enabled >= 14, "{enabled} lines enabled:\n{text}");
    let dir = tempdir();
    let file = write_config(dir.path(), &text);
    let out = ringbd(&["check-config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out}\n{text}");
    assert!(out.stdout.contains("tls = \"require\""), "{out}");
    assert!(
        out.stdout
            .contains("allow_clients = [\"CN=hv1.example\", \"PSK:alice\"]"),
        "{out}"
    );
}
