//! Real clients against ringbd: nbdinfo, qemu-img and qemu-io.

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

/// `nbdinfo --json URI`, flattened to `key=value` by jq (first export).
fn nbdinfo(uri: &str) -> HashMap<String, String> {
    let json = run(Command::new("nbdinfo").args(["--json", uri]), TIMEOUT).ok();
    let filter = r#".exports[0] | to_entries[] | "\(.key)=\(.value)""#;
    let flat = run_with_stdin(
        Command::new("jq").args(["-r", filter]),
        Some(json.as_bytes()),
        TIMEOUT,
    )
    .ok();
    flat.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn get<'a>(info: &'a HashMap<String, String>, key: &str) -> &'a str {
    info.get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("nbdinfo lacks {key}: {info:?}"))
}

fn assert_flags(info: &HashMap<String, String>, expected: &[(&str, &str)]) {
    for (key, want) in expected {
        assert_eq!(get(info, key), *want, "{key} in {info:#?}");
    }
}

#[test]
fn nbdinfo_memory_export() {
    if !require_tools(&["nbdinfo", "jq"]) {
        return;
    }
    let server = ServerSpec::new("memory:64M").start();
    let info = nbdinfo(&server.uri(""));
    assert_flags(
        &info,
        &[
            ("export-size", "67108864"),
            ("is_read_only", "false"),
            ("can_flush", "true"),
            ("can_fua", "true"),
            ("can_trim", "true"),
            ("can_zero", "true"),
            ("can_multi_conn", "true"),
            ("can_df", "true"),
            ("block_size_minimum", "1"),
            ("block_size_preferred", "4096"),
            ("block_size_maximum", "33554432"),
        ],
    );
    assert!(
        get(&info, "contexts").contains("base:allocation"),
        "{info:?}"
    );
}

#[test]
fn nbdinfo_file_export_direct_and_writeback() {
    if !require_tools(&["nbdinfo", "jq"]) {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    sparse_file(&image, 96 * MIB);
    let image = image.to_str().unwrap().to_string();
    let server = ServerSpec::new(image.clone()).start();
    let info = nbdinfo(&server.uri(""));
    assert_flags(
        &info,
        &[
            ("export-size", "100663296"),
            ("is_read_only", "false"),
            ("can_flush", "true"),
            ("can_fua", "true"),
            ("can_trim", "true"),
            ("can_zero", "true"),
            ("can_multi_conn", "true"),
            ("can_df", "true"),
            ("block_size_preferred", "4096"),
            ("block_size_maximum", "33554432"),
        ],
    );
    let minimum = get(&info, "block_size_minimum");
    assert!(
        minimum == "512" || minimum == "4096",
        "O_DIRECT minimum block size {minimum}"
    );
    drop(server);

    let server = ServerSpec::new(image)
        .options(&["--cache", "writeback"])
        .start();
    let info = nbdinfo(&server.uri(""));
    // Buffered I/O: any alignment, and CACHE (readahead into the page cache) is meaningful.
    assert_flags(
        &info,
        &[
            ("export-size", "100663296"),
            ("block_size_minimum", "1"),
            ("can_cache", "true"),
        ],
    );
}

#[test]
fn nbdinfo_read_only_export() {
    if !require_tools(&["nbdinfo", "jq"]) {
        return;
    }
    let server = ServerSpec::new("memory:8M")
        .options(&["--read-only"])
        .start();
    let info = nbdinfo(&server.uri(""));
    assert_flags(
        &info,
        &[
            ("export-size", "8388608"),
            ("is_read_only", "true"),
            ("can_trim", "false"),
            ("can_zero", "false"),
            ("can_fast_zero", "false"),
        ],
    );
}

#[test]
fn nbdinfo_lists_named_exports() {
    if !require_tools(&["nbdinfo", "jq"]) {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("named.img");
    sparse_file(&image, 3 * MIB);
    let server = ServerSpec::new("memory:1M")
        .export("alpha=memory:2M")
        .export(format!("beta={}", image.display()))
        .start();
    let json = run(
        Command::new("nbdinfo").args(["--list", "--json", &server.uri("")]),
        TIMEOUT,
    )
    .ok();
    let filter = r#".exports[] | "\(.["export-name"])=\(.["export-size"])""#;
    let flat = run_with_stdin(
        Command::new("jq").args(["-r", filter]),
        Some(json.as_bytes()),
        TIMEOUT,
    )
    .ok();
    let mut listed: Vec<&str> = flat.lines().collect();
    listed.sort_unstable();
    assert_eq!(
        listed,
        ["=1048576", "alpha=2097152", "beta=3145728"],
        "nbdinfo --list: {json}"
    );
    // Human-readable listing too.
    let text = run(
        Command::new("nbdinfo").args(["--list", &server.uri("")]),
        TIMEOUT,
    )
    .ok();
    assert!(
        text.contains("export=\"alpha\"") && text.contains("export=\"beta\""),
        "{text}"
    );
    // And each named export by URI.
    assert_eq!(
        get(&nbdinfo(&server.uri("alpha")), "export-size"),
        "2097152"
    );
    assert_eq!(get(&nbdinfo(&server.uri("beta")), "export-size"), "3145728");
}

#[test]
fn nbdinfo_over_tcp() {
    if !require_tools(&["nbdinfo", "jq"]) {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = ServerSpec::new("memory:4M")
        .listen(format!("127.0.0.1:{port}"))
        .start();
    let info = nbdinfo(&format!("nbd://127.0.0.1:{port}"));
    assert_eq!(get(&info, "export-size"), "4194304");
    drop(server);
}

fn qemu_uri(server: &Server) -> String {
    server.uri("")
}

#[test]
fn qemu_img_info_and_convert_roundtrip() {
    if !require_tools(&["qemu-img", "jq"]) {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("export.img");
    sparse_file(&image, 64 * MIB);
    let source = dir.path().join("source.raw");
    random_file(&source, 24 * MIB + 12345);
    let server = ServerSpec::new(image.to_str().unwrap()).start();
    let uri = qemu_uri(&server);

    let json = run(
        Command::new("qemu-img").args(["info", "--output=json", &uri]),
        TIMEOUT,
    )
    .ok();
    let size = run_with_stdin(
        Command::new("jq").args(["-r", ".[\"virtual-size\"]"]),
        Some(json.as_bytes()),
        TIMEOUT,
    )
    .ok();
    assert_eq!(size.trim(), (64 * MIB).to_string(), "qemu-img info: {json}");

    let src = source.to_str().unwrap();
    run(
        Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", src, &uri]),
        TIMEOUT,
    )
    .ok();
    // qemu-img compare treats the export's extra tail as "must be zero".
    run(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src, &uri]),
        TIMEOUT,
    )
    .ok();
    let copy = dir.path().join("copy.raw");
    let copy_str = copy.to_str().unwrap();
    run(
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri, copy_str]),
        TIMEOUT,
    )
    .ok();
    let original = fs::read(&source).unwrap();
    let copied = fs::read(&copy).unwrap();
    assert_eq!(copied.len() as u64, 64 * MIB);
    assert!(
        copied[..original.len()] == original[..],
        "converted data differs"
    );
    assert!(
        copied[original.len()..].iter().all(|&b| b == 0),
        "tail not zero"
    );
    // The export file itself holds the data once the server has exited.
    let mut server = server;
    assert!(server.terminate().success());
    let on_disk = fs::read(&image).unwrap();
    assert!(
        on_disk[..original.len()] == original[..],
        "export file differs from source"
    );
}

#[test]
fn qemu_io_unaligned_patterns_on_o_direct_export() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("direct.img");
    sparse_file(&image, 16 * MIB);
    let mut server = ServerSpec::new(image.to_str().unwrap())
        .options(&["--cache", "direct"])
        .start();
    let uri = qemu_uri(&server);
    // (pattern byte, offset, length): unaligned everywhere, some straddling 4 KiB blocks.
    let writes: [(u8, u64, u64); 6] = [
        (0xab, 1000, 3000),
        (0xcd, 4095, 2),
        (0x11, 12345, 65543),
        (0x22, 1 << 20, 1),
        (0x33, (2 << 20) - 7, 14),
        (0x44, 16 * MIB - 333, 333),
    ];
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for (byte, offset, len) in writes {
        args.push("-c".into());
        args.push(format!("write -P {byte:#x} {offset} {len}"));
    }
    for (byte, offset, len) in writes {
        args.push("-c".into());
        args.push(format!("read -P {byte:#x} {offset} {len}"));
    }
    // Untouched neighbours read as zero.
    for (offset, len) in [
        (0, 1000),
        (4000, 95),
        (4097, 8248),
        (77888, 970688),
        ((1 << 20) + 1, 4095),
    ] {
        args.push("-c".into());
        args.push(format!("read -P 0 {offset} {len}"));
    }
    args.push(uri.clone());
    let out = run(Command::new("qemu-io").args(&args), TIMEOUT);
    assert!(
        out.status.success() && !out.stdout.contains("failed"),
        "qemu-io: {out}"
    );
    // Check the file independently of any NBD client.
    assert!(server.terminate().success());
    let disk = fs::read(&image).unwrap();
    let mut model = vec![0u8; disk.len()];
    for (byte, offset, len) in writes {
        model[offset as usize..(offset + len) as usize].fill(byte);
    }
    let first_diff = disk.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "file content differs from the qemu-io writes"
    );
}
