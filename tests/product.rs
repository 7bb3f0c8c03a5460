//! The product surface: configuration file and `check-config`, several exports with
//! descriptions, read-only exports, `--create`, listeners (unix mode, several TCP
//! addresses, systemd socket activation and readiness), the connection limit, the handshake
//! timeout, the PID file, the identity switch, exit codes and `/metrics` after a fio run.
#![allow(unsafe_code)] // direct libc calls (signals, descriptors), each commented

mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
/// Small servers: the tests run in parallel on two cores.
const SMALL: [&str; 4] = ["--shards", "1", "--buffer-mib", "32"];

/// `GET path` over HTTP/1.1 with std only; returns the status line and the body.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// Series (`name{labels}`) → value, from the Prometheus text format.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut series = HashMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            series.insert(name.to_string(), value).is_none(),
            "duplicate {name}"
        );
    }
    series
}

/// `nbdinfo --json --list URI` reduced by jq to `name=description` lines.
fn listed_exports(uri: &str) -> Vec<String> {
    let json = run(
        Command::new("nbdinfo").args(["--json", "--list", uri]),
        TIMEOUT,
    )
    .ok();
    let filter = r#".exports[] | "\(.["export-name"])=\(.description // "")""#;
    let lines = run_with_stdin(
        Command::new("jq").args(["-r", filter]),
        Some(json.as_bytes()),
        TIMEOUT,
    )
    .ok();
    let mut lines: Vec<String> = lines.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn config_file_exports_are_listed_with_descriptions_and_read_only_refuses_writes() {
    if !require_tools(&["nbdinfo", "jq"]) || !require_python_nbd() {
        return;
    }
    let dir = tempdir();
    let golden = dir.path().join("golden.img");
    pattern_file(&golden, 1 << 20, 7);
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[server]
shards = 1
buffer_mib = 32

[[export]]
name = "vm1"
path = "memory:8M"
description = "web server disk"

[[export]]
name = "golden"
path = "{}"
description = "base image"
read_only = true
"#,
            golden.display()
        ),
    );
    let server = ServerSpec::default()
        .options(&["--config", config.to_str().unwrap()])
        .export("extra=memory:1M")
        .start();
    assert_eq!(
        listed_exports(&server.uri("")),
        ["extra=", "golden=base image", "vm1=web server disk"]
    );
    let (_, info) = RawClient::ready(server.socket(), "golden").unwrap();
    assert!(info.flags & FLAG_READ_ONLY != 0, "golden is read-only");
    // Client-side checks off (strict mode 0), so the server itself must refuse.
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 4096, 0)
    print("written")
except nbd.Error as error:
    print("errno", error.errno)
"#;
    let python =
        |uri: String| run(Command::new(PYTHON).args(["-c", script]).arg(uri), TIMEOUT).ok();
    assert_eq!(python(server.uri("golden")).trim(), "errno EPERM");
    assert_eq!(python(server.uri("vm1")).trim(), "written");
    let mut unknown = RawClient::handshake(server.socket()).unwrap();
    let reply = unknown.go("nope", &[]).unwrap();
    assert_eq!(reply.unwrap_err().reply_type, REP_ERR_UNKNOWN);
}

#[test]
fn check_config_prints_the_effective_configuration_or_names_the_key_and_line() {
    let dir = tempdir();
    let good = write_config(
        dir.path(),
        "[server]\nlisten = [\"127.0.0.1:10809\"]\n\n[[export]]\nname = \"a\"\npath = \"memory:1G\"\n",
    );
    let out = ringbd(&["check-config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out}");
    for expected in [
        "[server]",
        "queue_depth = 256",
        "[[export]]",
        "path = \"memory:1G\"",
    ] {
        assert!(out.stdout.contains(expected), "{expected} missing: {out}");
    }
    // The printed configuration is itself valid.
    let effective = dir.path().join("effective.toml");
    fs::write(&effective, &out.stdout).unwrap();
    let again = ringbd(&["check-config", effective.to_str().unwrap()]);
    assert_eq!(again.stdout, out.stdout, "{again}");
    let cases = [
        (
            "[server]\nshards = 2\nbogus = 1\n",
            "line 3",
            "server.bogus",
        ),
        ("[server]\n\nshards = 0\n", "line 3", "server.shards"),
        ("[server]\nlisten = \"x\"\n", "line 2", "server.listen"),
        (
            "[[export]]\nname = \"a\"\npath = \"memory:lots\"\n",
            "line 3",
            "export[0].path",
        ),
        (
            "[[export]]\nname = \"a\"\npath = \"/x\"\ncache = \"off\"\n",
            "line 4",
            "export[0].cache",
        ),
        ("[[export]]\nname = \"a\"\n", "line 1", "export[0]"),
        ("[server\n", "line 1", ""),
    ];
    for (text, line, key) in cases {
        let bad = write_config(dir.path(), text);
        let out = ringbd(&["check-config", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {out}");
        assert!(
            out.stderr.contains(line),
            "{text:?} should name {line}: {out}"
        );
        assert!(
            out.stderr.contains(&format!("`{key}")),
            "{text:?} should name {key}: {out}"
        );
        let serve = ringbd(&["serve", "--config", bad.to_str().unwrap()]);
        assert_eq!(
            serve.status.code(),
            Some(2),
            "serve --config {text:?}: {serve}"
        );
    }
    let missing = dir.path().join("missing.toml");
    let out = ringbd(&["check-config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out}");
}

#[test]
fn exit_codes_tell_usage_errors_from_runtime_errors() {
    let dir = tempdir();
    let socket = dir.path().join("s.sock");
    let socket = socket.to_str().unwrap();
    for args in [
        vec!["serve", "--unix", socket, "--bogus", "memory:1M"],
        vec!["serve", "--unix", socket],
        vec!["serve", "--unix", socket, "--shards", "0", "memory:1M"],
        vec!["serve", "--listen", "not-an-address", "memory:1M"],
        vec!["serve", "--unix", socket, "--unix-mode", "999", "memory:1M"],
    ] {
        let out = ringbd(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out}");
    }
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap().to_string();
    let out = ringbd(&["serve", "--listen", &address, "--shards", "1", "memory:1M"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "port in use is a runtime error: {out}"
    );
    let missing = dir.path().join("missing.img");
    let out = ringbd(&["serve", "--unix", socket, missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    let help = ringbd(&["check-config", "--help"]).ok();
    assert!(help.contains("EXAMPLES"), "{help}");
    let help = ringbd(&["--help"]).ok();
    assert!(help.contains("EXIT CODES"), "{help}");
}

#[test]
fn create_makes_a_sparse_file_and_never_resizes_an_existing_one() {
    let dir = tempdir();
    let new = dir.path().join("new.img");
    let old = dir.path().join("old.img");
    sparse_file(&old, 1 << 20);
    let server = ServerSpec::default()
        .options(&SMALL)
        .options(&["--create", "64M"])
        .export(format!("new={}", new.display()))
        .export(format!("old={}", old.display()))
        .start();
    // The socket accepts (into its backlog) as soon as it is bound, before the exports are
    // opened; a finished handshake means they are.
    let (_, info) = RawClient::ready(server.socket(), "new").unwrap();
    assert_eq!(info.size, 64 << 20);
    let metadata = fs::metadata(&new).expect("created");
    assert_eq!(metadata.len(), 64 << 20);
    assert!(
        metadata.blocks() * 512 < 1 << 20,
        "sparse: {} blocks",
        metadata.blocks()
    );
    assert_eq!(metadata.mode() & 0o777, 0o600);
    let (_, info) = RawClient::ready(server.socket(), "old").unwrap();
    assert_eq!(info.size, 1 << 20, "an existing file keeps its size");
    assert_eq!(fs::metadata(&old).unwrap().len(), 1 << 20);
}

#[test]
fn pid_file_is_written_and_removed_on_a_clean_stop() {
    let dir = tempdir();
    let pid_file = dir.path().join("ringbd.pid");
    let mut server = ServerSpec::new("memory:1M")
        .options(&SMALL)
        .options(&["--pid-file", pid_file.to_str().unwrap()])
        .start();
    // The socket accepts (kernel backlog) from bind on; the file comes once shards are up.
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    while !pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let written = fs::read_to_string(&pid_file).expect("PID file written");
    assert_eq!(written, format!("{}\n", server.pid()));
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(!pid_file.exists(), "PID file removed at exit");
}

#[test]
fn unix_mode_and_several_tcp_listeners() {
    let (first, second) = (free_tcp_port(), free_tcp_port());
    let mut spec = ServerSpec::new("memory:1M")
        .options(&SMALL)
        .options(&["--unix-mode", "0600"])
        .options(&["--listen", &format!("127.0.0.1:{first}")])
        .options(&["--listen", &format!("127.0.0.1:{second}")]);
    let ipv6 = TcpListener::bind("[::1]:0").is_ok();
    // The same port on the IPv6 loopback: one socket per family.
    let third = first;
    if ipv6 {
        spec = spec.options(&["--listen", &format!("[::1]:{third}")]);
    } else {
        eprintln!("no IPv6 loopback: testing IPv4 listeners only");
    }
    let server = spec.start();
    let mode = fs::metadata(server.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut addresses = vec![
        SocketAddr::from(([127, 0, 0, 1], first)),
        SocketAddr::from(([127, 0, 0, 1], second)),
    ];
    if ipv6 {
        addresses.push(format!("[::1]:{third}").parse().unwrap());
    }
    for address in addresses {
        let (_, info) = RawClient::ready(address, "").unwrap_or_else(|e| panic!("{address}: {e}"));
        assert_eq!(info.size, 1 << 20);
    }
}

#[test]
fn max_connections_closes_extra_connections_at_once() {
    let server = ServerSpec::new("memory:1M")
        .options(&SMALL)
        .options(&["--max-connections", "2"])
        .start();
    let (first, _) = RawClient::ready(server.socket(), "").unwrap();
    let (_second, _) = RawClient::ready(server.socket(), "").unwrap();
    let mut refused = RawClient::connect(server.socket()).unwrap();
    assert!(refused.closed_by_server(), "a third connection is closed");
    first.disconnect().unwrap();
    // The slot frees once the server has closed the first connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = RawClient::connect(server.socket()).unwrap();
        if client.read_greeting().is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no slot after a disconnect");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.log().contains("max_connections reached"),
        "refusal logged: {}",
        server.log()
    );
}

#[test]
fn handshake_timeout_is_configurable() {
    let server = ServerSpec::new("memory:1M")
        .options(&SMALL)
        .options(&["--handshake-timeout-seconds", "1"])
        .start();
    let started = Instant::now();
    let mut idle = RawClient::handshake(server.socket()).unwrap();
    assert!(idle.closed_by_server(), "an idle handshake is closed");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "closed after {waited:?}, want about 1 s"
    );
}

#[test]
fn metrics_count_the_commands_fio_sent() {
    if !require_tools(&["fio", "jq"]) {
        return;
    }
    let port = free_tcp_port();
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    let server = ServerSpec::new("vm=memory:16M")
        .options(&SMALL)
        .options(&["--metrics", &metrics.to_string()])
        .start();
    let dir = tempdir();
    let job = format!(
        "[global]\nioengine=nbd\nuri={}\nbs=4k\nsize=8m\niodepth=8\n\
         [mixed]\nrw=randrw\nio_size=4m\nfsync=16\n\
         [trim]\nstonewall\nrw=randtrim\nio_size=1m\n",
        server.uri("vm")
    );
    let job_path = dir.path().join("job.fio");
    fs::write(&job_path, job).unwrap();
    let out = run(
        Command::new("fio")
            .args(["--output-format=json"])
            .arg(&job_path)
            .current_dir(dir.path()),
        TIMEOUT,
    )
    .ok();
    let json = &out[out.find('{').expect("fio JSON")..];
    let filter = "[([.jobs[].read.total_ios]|add), ([.jobs[].read.io_bytes]|add), \
                  ([.jobs[].write.total_ios]|add), ([.jobs[].write.io_bytes]|add), \
                  ([.jobs[].sync.total_ios]|add), ([.jobs[].trim.total_ios]|add)] | @tsv";
    let totals = run_with_stdin(
        Command::new("jq").args(["-r", filter]),
        Some(json.as_bytes()),
        TIMEOUT,
    )
    .ok();
    let totals: Vec<f64> = totals
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let [reads, read_bytes, writes, write_bytes, flushes, trims] = totals[..] else {
        panic!("fio totals: {totals:?}");
    };
    assert!(
        reads > 0.0 && writes > 0.0 && flushes > 0.0 && trims > 0.0,
        "{totals:?}"
    );
    let label = |op: &str| format!("{{export=\"vm\",op=\"{op}\"}}");
    let expected = [
        (format!("ringbd_requests_total{}", label("read")), reads),
        (format!("ringbd_requests_total{}", label("write")), writes),
        (format!("ringbd_requests_total{}", label("flush")), flushes),
        (format!("ringbd_requests_total{}", label("trim")), trims),
        (format!("ringbd_bytes_total{}", label("read")), read_bytes),
        (format!("ringbd_bytes_total{}", label("write")), write_bytes),
        (
            format!("ringbd_request_errors_total{}", label("write")),
            0.0,
        ),
        (
            format!("ringbd_request_duration_seconds_count{}", label("read")),
            reads,
        ),
    ];
    // Shards publish about once a second: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(15);
    let series = loop {
        let (status, body) = http_get(metrics, "/metrics").expect("scrape");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        let series = parse_metrics(&body);
        let done = expected
            .iter()
            .all(|(name, want)| series.get(name) == Some(want));
        if done || Instant::now() >= deadline {
            break series;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (name, want) in &expected {
        assert_eq!(series.get(name), Some(want), "{name}");
    }
    let bucket = r#"ringbd_request_duration_seconds_bucket{export="vm",op="write",le="+Inf"}"#;
    assert_eq!(series.get(bucket), Some(&writes));
    assert!(series["ringbd_connections_accepted_total"] >= 2.0);
    assert_eq!(
        series["ringbd_export_size_bytes{export=\"vm\"}"],
        (16 << 20) as f64
    );
    let (status, _) = http_get(metrics, "/other").unwrap();
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
}

/// A server started by hand (not through [`ServerSpec`]), stopped by PID on drop.
struct Spawned {
    child: Option<Child>,
    log: PathBuf,
}

impl Spawned {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        send_signal(child.id(), libc::SIGTERM);
        wait_timeout(&mut child, SERVER_STOP_TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no exit after SIGTERM; log:\n{}", self.log())
        })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("===== ringbd log =====\n{}", self.log());
        }
    }
}

/// Starts `ringbd serve ARGS` the way systemd does with a socket unit: `fds` become 3, 4, ...
/// and `LISTEN_PID` is the server's own PID (set by `sh` before it `exec`s).
fn spawn_activated(fds: &[RawFd], args: &[&str], dir: &Path, notify: &Path) -> Spawned {
    let log = dir.join("activated.log");
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES=nbd exec \"$0\" serve \"$@\"",
        fds.len()
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .arg(ringbd_bin())
        .args(args)
        .env("NOTIFY_SOCKET", notify)
        .stdin(Stdio::null())
        .stdout(File::create(&log).unwrap())
        .stderr(File::create(&log).unwrap());
    // Copies above any fd the child could already use, so the dup2s below cannot clobber
    // one another.
    let high: Vec<RawFd> = fds
        .iter()
        .enumerate()
        .map(|(index, fd)| {
            // SAFETY: F_DUPFD_CLOEXEC on a live fd we own returns a new fd (closed on exec).
            let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100 + index as i32) };
            assert!(copy >= 100, "F_DUPFD_CLOEXEC failed");
            copy
        })
        .collect();
    let high_for_child = high.clone();
    // SAFETY: the closure only calls async-signal-safe functions (dup2, prctl).
    unsafe {
        cmd.pre_exec(move || {
            for (index, fd) in high_for_child.iter().enumerate() {
                if libc::dup2(*fd, 3 + index as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn sh");
    for fd in high {
        // SAFETY: `fd` is the copy made above, owned by this function and closed once.
        unsafe { libc::close(fd) };
    }
    Spawned {
        child: Some(child),
        log,
    }
}

#[test]
fn socket_activation_serves_inherited_sockets_and_notifies_readiness() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempdir();
    let path = dir.path().join("activated.sock");
    let unix = UnixListener::bind(&path).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_address = tcp.local_addr().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(SERVER_READY_TIMEOUT)).unwrap();
    let fds = [unix.as_raw_fd(), tcp.as_raw_fd()];
    let args = [&SMALL[..], &["memory:1M"]].concat();
    let mut server = spawn_activated(&fds, &args, dir.path(), &notify_path);
    let mut message = [0u8; 256];
    let read = notify
        .recv(&mut message)
        .unwrap_or_else(|error| panic!("no sd_notify message ({error}); log:\n{}", server.log()));
    let message = String::from_utf8_lossy(&message[..read]).into_owned();
    assert!(message.starts_with("READY=1"), "{message}");
    // Our copies stay open; the server serves its inherited ones.
    drop((unix, tcp));
    let size = |uri: &str| {
        run(Command::new("nbdinfo").args(["--size", uri]), TIMEOUT)
            .ok()
            .trim()
            .to_string()
    };
    let unix_uri = nbd_uri(&path, "");
    let tcp_uri = format!("nbd://{tcp_address}/");
    assert_eq!(size(&unix_uri), "1048576", "{}", server.log());
    assert_eq!(size(&tcp_uri), "1048576", "{}", server.log());
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        path.exists(),
        "an inherited unix socket belongs to the service manager"
    );
    let log = server.log();
    assert!(
        !log.contains(":10809"),
        "no default listener is added: {log}"
    );
    assert!(log.contains("listening (inherited)"), "{log}");
    assert!(log.contains(&format!("tcp {tcp_address}")), "{log}");
}

/// `Uid:`/`Gid:` of `/proc/PID/status`: real, effective, saved, filesystem.
fn status_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with(field)).expect(field);
    line.split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn user_switch_happens_after_binding_and_opening_exports() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    // Only root can open this file; the server opens it before switching to nobody.
    let image = dir.path().join("root-only.img");
    pattern_file(&image, 1 << 20, 3);
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).unwrap();
    let mut server = ServerSpec::new(format!("{}", image.display()))
        .options(&SMALL)
        .options(&["--user", "nobody", "--unix-mode", "0660"])
        .start();
    let (mut client, _) = RawClient::ready(server.socket(), "").unwrap();
    assert_eq!(client.read(0, 4096).unwrap().unwrap(), pattern(0, 4096, 3));
    let nobody = status_ids(server.pid(), "Uid:")[0];
    assert_ne!(nobody, 0);
    assert_eq!(
        status_ids(server.pid(), "Uid:"),
        vec![nobody; 4],
        "{}",
        server.log()
    );
    let gid = status_ids(server.pid(), "Gid:");
    assert!(gid.iter().all(|g| *g == gid[0] && *g != 0), "{gid:?}");
    let groups = fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let groups = groups.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert_eq!(
        groups.split_whitespace().skip(1).collect::<Vec<_>>(),
        [gid[0].to_string()]
    );
    let socket = fs::metadata(server.socket()).unwrap();
    assert_eq!(
        (socket.uid(), socket.gid()),
        (nobody, gid[0]),
        "socket handed over"
    );
    client.write(CMD_FLAG_FUA, 0, &[7; 4096]).unwrap().unwrap();
    drop(client);
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
}

#[test]
fn the_contrib_example_configuration_is_valid() {
    let example = repo_root().join("contrib/ringbd.toml");
    let out = ringbd(&["check-config", example.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(out.stdout.contains("name = \"vm1\""), "{out}");
}

/// The preferred shard under `--placement interrupts` with `--shards 2`, if any, worked
/// out without ringbd (`tests/python/irq_shard.py`).
fn expected_interrupt_shard(file: &Path) -> Option<usize> {
    let out = python("irq_shard.py", &[file.to_str().unwrap()], TIMEOUT);
    match out.trim() {
        "none" => None,
        index => Some(index.parse().expect("the oracle prints a shard index")),
    }
}

/// Connects once with nbdinfo and returns the shard the server logged for it.
fn first_connection_shard(server: &Server) -> usize {
    let uri = server.uri("");
    run(Command::new("nbdinfo").args(["--size", &uri]), TIMEOUT).ok();
    last_connection_shard(server)
}

/// The shard of the latest "client connected" line of the server's log.
fn last_connection_shard(server: &Server) -> usize {
    let log = server.log();
    let line = log
        .lines()
        .rfind(|line| line.contains("client connected"))
        .unwrap_or_else(|| panic!("no connection logged:\n{log}"));
    let shard = line.split("shard=").nth(1).expect("shard= in the line");
    shard[..shard.find(' ').unwrap()].parse().unwrap()
}

#[test]
fn placement_prefers_the_disk_interrupt_cpu_or_follows_least_loaded() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    sparse_file(&image, 1 << 20);
    let expected = expected_interrupt_shard(&image);
    let path = image.to_str().unwrap();
    let two = ["--shards", "2", "--buffer-mib", "32"];
    let server = ServerSpec::new(path).options(&two).start();
    assert_eq!(
        first_connection_shard(&server),
        expected.unwrap_or(0),
        "default placement; log:\n{}",
        server.log()
    );
    assert_eq!(
        server
            .log()
            .contains("new connections prefer the shards there"),
        expected.is_some(),
        "the preference is logged exactly when there is one"
    );
    let server = ServerSpec::new(path)
        .options(&two)
        .options(&["--placement", "least-loaded"])
        .start();
    assert_eq!(
        first_connection_shard(&server),
        0,
        "least-loaded takes shard 0"
    );
    assert!(!server.log().contains("prefer the shards"));
}

/// The CPUs this process may run on (the shards are pinned to them in this order).
fn allowed_cpus() -> Vec<usize> {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    let cpus = ringbd::placement::parse_cpu_list(list).expect("a CPU list");
    cpus.into_iter().collect()
}

/// Connects once with nbdinfo pinned to `cpu` (`taskset`) and returns the shard the server
/// logged for it.
fn pinned_connection_shard(server: &Server, uri: &str, cpu: usize) -> usize {
    let cpu = cpu.to_string();
    let out = run(
        Command::new("taskset").args(["-c", &cpu, "nbdinfo", "--size", uri]),
        TIMEOUT,
    )
    .ok();
    assert_eq!(out.trim(), (1u64 << 20).to_string());
    last_connection_shard(server)
}

/// A TCP connection goes to the shard on the CPU that receives its packets: over loopback
/// that is the client's CPU, so a client pinned to either CPU lands on the shard pinned there,
/// ahead of the disk-interrupt preference; `least-loaded` ignores it (shard 0 both times).
#[test]
fn tcp_connections_go_to_the_shard_on_their_receive_cpu() {
    let cpus = allowed_cpus();
    if !require_tools(&["nbdinfo", "taskset"]) || !require(cpus.len() >= 2, "needs 2 CPUs") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    sparse_file(&image, 1 << 20);
    let two = ["--shards", "2", "--buffer-mib", "32"];
    for (policy, expected) in [("interrupts", [0, 1]), ("least-loaded", [0, 0])] {
        for export in ["memory:1M", image.to_str().unwrap()] {
            for (client, &shard) in expected.iter().enumerate() {
                // A fresh server per connection: the previous one's close must not skew
                // the least-loaded comparison.
                let port = free_tcp_port();
                let server = ServerSpec::new(export)
                    .options(&two)
                    .options(&["--placement", policy, "--log-level", "debug"])
                    .listen(format!("127.0.0.1:{port}"))
                    .start();
                let uri = format!("nbd://127.0.0.1:{port}");
                assert_eq!(
                    pinned_connection_shard(&server, &uri, cpus[client]),
                    shard,
                    "{policy}, {export}, client on CPU {}; log:\n{}",
                    cpus[client],
                    server.log()
                );
                let placed = format!("receive_cpu={}", cpus[client]);
                assert!(server.log().contains(&placed), "{}", server.log());
            }
        }
    }
}
