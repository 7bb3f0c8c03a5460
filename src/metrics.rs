//! Prometheus metrics: [`render`] turns a statistics snapshot into the text exposition format
//! (a pure function), and [`spawn`] serves it on `GET /metrics` from one thread.
//!
//! # Contract
//!
//! A scrape reads only the [`crate::stats::StatsHub`] (the copies shards publish about once a
//! second), so it never touches the data plane; values lag by at most a second.
//!
//! # Why a hand-written HTTP loop
//!
//! The endpoint answers one fixed path with `Connection: close`, on one thread, with bounded
//! reads (request head at most [`REQUEST_HEAD_BYTES_MAX`], [`REQUEST_TIMEOUT`] per client).
//! That is about sixty lines of std code; an HTTP crate would bring a parser, a thread pool
//! and keep-alive handling that this endpoint does not need, and more code to audit on a
//! server that usually runs as root until it drops privileges.
//!
//! # Histograms
//!
//! `ringbd_request_duration_seconds` has the fixed buckets [`LATENCY_BUCKETS`] (10 µs to
//! 10 s). Counts come from the HDR histograms, whose values are exact to 1%: each recorded
//! value is placed by the upper end of its HDR bucket, so a bucket never under-counts slow
//! requests. `_sum` is the HDR mean times the count, exact to the same 1%.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ring::sys;
use crate::stats::{Op, ShardStats};
use crate::target::export::ExportInfo;

/// Largest HTTP request head read from a client.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8192;
/// Longest a client may take to send its request and receive the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bounds of the latency histogram buckets: the `le` label and nanoseconds.
pub const LATENCY_BUCKETS: [(&str, u64); 19] = [
    ("0.00001", 10_000),
    ("0.000025", 25_000),
    ("0.00005", 50_000),
    ("0.0001", 100_000),
    ("0.00025", 250_000),
    ("0.0005", 500_000),
    ("0.001", 1_000_000),
    ("0.0025", 2_500_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
];

/// Counters kept outside the shards (by the acceptor).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused_total: u64,
    /// Connections closed at once by the listener's access rules (`allow`, `allow_uids`).
    pub connections_denied_total: u64,
    /// The configured `max_connections`.
    pub connections_max: usize,
}

/// Renders a snapshot in the Prometheus text format (version 0.0.4). `exports` is indexed
/// like `snapshot.exports`.
pub fn render(snapshot: &ShardStats, exports: &[ExportInfo], server: &ServerCounters) -> String {
    assert_eq!(
        snapshot.exports.len(),
        exports.len(),
        "one stats entry per export"
    );
    let mut out = String::with_capacity(4096 + exports.len() * 16 * 1024);
    let version = env!("CARGO_PKG_VERSION");
    header(
        &mut out,
        "ringbd_build_info",
        "gauge",
        "Always 1; the version label.",
    );
    line(&mut out, "ringbd_build_info", &[("version", version)], 1);
    render_server(&mut out, snapshot, server);
    render_exports(&mut out, snapshot, exports);
    render_requests(&mut out, snapshot, exports);
    render_latency(&mut out, snapshot, exports);
    out
}

fn render_server(out: &mut String, snapshot: &ShardStats, server: &ServerCounters) {
    let gauges = [
        (
            "ringbd_connections",
            "gauge",
            "Client connections open now (handshake or transmission).",
            snapshot.connections,
        ),
        (
            "ringbd_connections_max",
            "gauge",
            "The max_connections limit.",
            server.connections_max as u64,
        ),
        (
            "ringbd_connections_accepted_total",
            "counter",
            "Connections accepted by the shards.",
            snapshot.accepted_total,
        ),
        (
            "ringbd_connections_refused_total",
            "counter",
            "Connections closed at once because max_connections were open.",
            server.connections_refused_total,
        ),
        (
            "ringbd_connections_denied_total",
            "counter",
            "Connections closed before the greeting by the listener's access rules.",
            server.connections_denied_total,
        ),
        (
            "ringbd_requests_in_flight",
            "gauge",
            "Requests parsed and not yet replied to.",
            snapshot.in_flight,
        ),
        (
            "ringbd_protocol_errors_total",
            "counter",
            "Protocol errors that closed a connection.",
            snapshot.protocol_errors_total,
        ),
    ];
    for (name, kind, help, value) in gauges {
        header(out, name, kind, help);
        line(out, name, &[], value);
    }
}

fn render_exports(out: &mut String, snapshot: &ShardStats, exports: &[ExportInfo]) {
    let name = "ringbd_export_size_bytes";
    header(out, name, "gauge", "Size of each export in bytes.");
    for export in exports {
        line(out, name, &[("export", &export.name)], export.size);
    }
    let name = "ringbd_export_read_only";
    header(out, name, "gauge", "1 if the export refuses writes.");
    for export in exports {
        let value = u64::from(export.read_only);
        line(out, name, &[("export", &export.name)], value);
    }
    let name = "ringbd_export_connections_total";
    header(
        out,
        name,
        "counter",
        "Handshakes completed for each export.",
    );
    for (export, stats) in exports.iter().zip(&snapshot.exports) {
        let value = stats.connections_total;
        line(out, name, &[("export", &export.name)], value);
    }
}

/// Name, help, the counter it reads and the ops it is reported for.
type RequestFamily = (
    &'static str,
    &'static str,
    fn(&crate::stats::OpStats) -> u64,
    &'static [Op],
);

fn render_requests(out: &mut String, snapshot: &ShardStats, exports: &[ExportInfo]) {
    let families: [RequestFamily; 3] = [
        (
            "ringbd_requests_total",
            "Requests completed (replied to), errors included.",
            |stats| stats.requests,
            &Op::ALL,
        ),
        (
            "ringbd_request_errors_total",
            "Requests answered with an error.",
            |stats| stats.errors,
            &Op::ALL,
        ),
        (
            "ringbd_bytes_total",
            "Payload bytes read or written.",
            |stats| stats.bytes,
            &[Op::Read, Op::Write],
        ),
    ];
    for (name, help, value, ops) in families {
        header(out, name, "counter", help);
        for (export, stats) in exports.iter().zip(&snapshot.exports) {
            for op in ops {
                let labels = [("export", export.name.as_str()), ("op", op.label())];
                line(out, name, &labels, value(stats.op(*op)));
            }
        }
    }
}

fn render_latency(out: &mut String, snapshot: &ShardStats, exports: &[ExportInfo]) {
    let name = "ringbd_request_duration_seconds";
    header(
        out,
        name,
        "histogram",
        "Time from request parsed to reply queued.",
    );
    let bucket = format!("{name}_bucket");
    for (export, stats) in exports.iter().zip(&snapshot.exports) {
        for op in Op::ALL {
            let histogram = &stats.op(op).latency_ns;
            let counts = cumulative_counts(histogram);
            let labels = [("export", export.name.as_str()), ("op", op.label())];
            for ((le, _), count) in LATENCY_BUCKETS.iter().zip(counts) {
                let labels = [labels[0], labels[1], ("le", le)];
                line(out, &bucket, &labels, count);
            }
            let labels_inf = [labels[0], labels[1], ("le", "+Inf")];
            line(out, &bucket, &labels_inf, histogram.len());
            let sum_seconds = histogram.mean() * histogram.len() as f64 / 1e9;
            write_series(out, &format!("{name}_sum"), &labels);
            let _ = writeln!(out, " {sum_seconds}");
            line(out, &format!("{name}_count"), &labels, histogram.len());
        }
    }
}

/// How many recorded values fall at or below each bucket bound (cumulative).
fn cumulative_counts(histogram: &hdrhistogram::Histogram<u64>) -> [u64; LATENCY_BUCKETS.len()] {
    let mut counts = [0u64; LATENCY_BUCKETS.len()];
    for value in histogram.iter_recorded() {
        let upper_ns = value.value_iterated_to();
        let first = LATENCY_BUCKETS.partition_point(|(_, bound_ns)| *bound_ns < upper_ns);
        for count in counts.iter_mut().skip(first) {
            *count += value.count_at_value();
        }
    }
    counts
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn line(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    write_series(out, name, labels);
    let _ = writeln!(out, " {value}");
}

fn write_series(out: &mut String, name: &str, labels: &[(&str, &str)]) {
    out.push_str(name);
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (index, (key, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        escape_label(out, value);
        out.push('"');
    }
    out.push('}');
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A running metrics endpoint; [`MetricsServer::stop`] ends it.
#[derive(Debug)]
pub struct MetricsServer {
    thread: JoinHandle<()>,
    stop: std::sync::Arc<OwnedFd>,
}

impl MetricsServer {
    /// Stops accepting scrapes and joins the thread.
    pub fn stop(self) {
        sys::eventfd_signal(self.stop.as_raw_fd());
        let _ = self.thread.join();
    }
}

/// Serves `render()` on `GET /metrics` from `listener` on a new thread.
pub fn spawn(
    listener: TcpListener,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<MetricsServer> {
    let stop = std::sync::Arc::new(sys::eventfd()?);
    let stop_fd = stop.clone();
    let thread = std::thread::Builder::new()
        .name("ringbd-metrics".into())
        .spawn(move || serve(&listener, &stop_fd, &render))?;
    Ok(MetricsServer { thread, stop })
}

fn serve(listener: &TcpListener, stop: &OwnedFd, render: &dyn Fn() -> String) {
    let fds = [listener.as_raw_fd(), stop.as_raw_fd()];
    let mut ready = Vec::with_capacity(2);
    loop {
        if let Err(error) = sys::poll_readable(&fds, 1000, &mut ready) {
            tracing::error!(%error, "metrics: poll failed");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if ready.get(1) == Some(&true) {
            return;
        }
        if ready.first() != Some(&true) {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = answer(stream, render) {
                    tracing::debug!(%peer, %error, "metrics: request failed");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "metrics: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one request head (bounded in size and time) and writes one response.
fn answer(mut stream: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() >= REQUEST_HEAD_BYTES_MAX {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return respond(&mut stream, "408 Request Timeout", "", false);
        }
        stream.set_read_timeout(Some(left))?;
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let request_line = head.split(|byte| *byte == b'\r').next().unwrap_or_default();
    let mut words = request_line.split(|byte| *byte == b' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next());
    let path = target.map(|target| {
        target
            .split(|byte| *byte == b'?')
            .next()
            .unwrap_or_default()
    });
    match (method, path) {
        (b"GET" | b"HEAD", Some(b"/metrics")) => {
            respond(&mut stream, "200 OK", &render(), method == b"HEAD")
        }
        (b"GET" | b"HEAD", Some(b"/")) => {
            let body = "ringbd metrics: GET /metrics\n";
            respond(&mut stream, "200 OK", body, method == b"HEAD")
        }
        (b"GET" | b"HEAD", _) => respond(&mut stream, "404 Not Found", "not found\n", false),
        _ => respond(&mut stream, "405 Method Not Allowed", "", false),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::export::{BlockSize, Capabilities};

    fn export(id: usize, name: &str) -> ExportInfo {
        ExportInfo {
            id,
            name: name.into(),
            description: String::new(),
            size: 1 << 20,
            read_only: id == 1,
            caps: Capabilities::default(),
            block_size: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 25,
            },
        }
    }

    fn sample() -> (ShardStats, Vec<ExportInfo>) {
        let mut stats = ShardStats::new(2);
        stats.record(0, Op::Read, 4096, 5_000, false);
        stats.record(0, Op::Read, 4096, 200_000, false);
        stats.record(0, Op::Read, 4096, 3_000_000_000, true);
        stats.record(1, Op::Write, 512, 20_000_000_000, false);
        stats.accepted_total = 3;
        stats.connections = 2;
        stats.in_flight = 1;
        stats.exports[0].connections_total = 2;
        (stats, vec![export(0, "vm1"), export(1, "we\"ird\\\nname")])
    }

    /// The value of the one series line that starts with `series` (name and labels).
    fn value(text: &str, series: &str) -> f64 {
        let matches: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
            .collect();
        assert_eq!(matches.len(), 1, "{series} in\n{text}");
        matches[0][series.len() + 1..].parse().unwrap()
    }

    #[test]
    fn counters_and_gauges_carry_the_snapshot() {
        let (stats, exports) = sample();
        let server = ServerCounters {
            connections_refused_total: 4,
            connections_denied_total: 5,
            connections_max: 64,
        };
        let text = render(&stats, &exports, &server);
        assert_eq!(value(&text, "ringbd_connections"), 2.0);
        assert_eq!(value(&text, "ringbd_connections_accepted_total"), 3.0);
        assert_eq!(value(&text, "ringbd_connections_refused_total"), 4.0);
        assert_eq!(value(&text, "ringbd_connections_denied_total"), 5.0);
        assert_eq!(value(&text, "ringbd_connections_max"), 64.0);
        assert_eq!(value(&text, "ringbd_requests_in_flight"), 1.0);
        let read = r#"{export="vm1",op="read"}"#;
        assert_eq!(value(&text, &format!("ringbd_requests_total{read}")), 3.0);
        assert_eq!(
            value(&text, &format!("ringbd_request_errors_total{read}")),
            1.0
        );
        assert_eq!(value(&text, &format!("ringbd_bytes_total{read}")), 12288.0);
        let version = format!(
            "ringbd_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&text, &version), 1.0);
        let connections = r#"ringbd_export_connections_total{export="vm1"}"#;
        assert_eq!(value(&text, connections), 2.0);
        assert!(text.contains("# TYPE ringbd_request_duration_seconds histogram"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let (stats, exports) = sample();
        let text = render(&stats, &exports, &ServerCounters::default());
        let bucket = |le: &str| {
            let series = format!(
                r#"ringbd_request_duration_seconds_bucket{{export="vm1",op="read",le="{le}"}}"#
            );
            value(&text, &series)
        };
        assert_eq!(bucket("0.00001"), 1.0, "5 µs");
        assert_eq!(bucket("0.0001"), 1.0);
        assert_eq!(bucket("0.00025"), 2.0, "200 µs");
        assert_eq!(bucket("2.5"), 2.0);
        assert_eq!(bucket("5"), 3.0, "3 s");
        assert_eq!(bucket("+Inf"), 3.0);
        let count = r#"ringbd_request_duration_seconds_count{export="vm1",op="read"}"#;
        assert_eq!(value(&text, count), 3.0);
        let sum = r#"ringbd_request_duration_seconds_sum{export="vm1",op="read"}"#;
        let sum = value(&text, sum);
        assert!((sum - 3.000205).abs() < 0.04, "sum {sum}");
        let mut previous = 0.0;
        for (le, _) in LATENCY_BUCKETS {
            assert!(bucket(le) >= previous, "cumulative at {le}");
            previous = bucket(le);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let (stats, exports) = sample();
        let text = render(&stats, &exports, &ServerCounters::default());
        let series = r#"ringbd_export_read_only{export="we\"ird\\\nname"}"#;
        assert_eq!(value(&text, series), 1.0);
        let write = r#"ringbd_request_duration_seconds_bucket{export="we\"ird\\\nname",op="write",le="10"}"#;
        assert_eq!(value(&text, write), 0.0, "20 s is above the last bound");
        for line in text.lines() {
            assert!(
                line.starts_with("ringbd_") || line.starts_with("# "),
                "{line:?}"
            );
        }
    }

    #[test]
    fn the_endpoint_answers_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = spawn(listener, || "ringbd_up 1\n".to_string()).unwrap();
        let get = |request: &str| {
            let mut stream = TcpStream::connect(address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        };
        let response = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nringbd_up 1\n"), "{response}");
        assert!(response.contains("Content-Length: 12\r\n"), "{response}");
        let response = get("GET /nope HTTP/1.0\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        let response = get("POST /metrics HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        let response = get("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(response.ends_with("\r\n\r\n"), "{response}");
        let oversized = format!("GET /{}", "x".repeat(REQUEST_HEAD_BYTES_MAX - 5));
        assert_eq!(oversized.len(), REQUEST_HEAD_BYTES_MAX);
        let response = get(&oversized);
        assert!(
            response.starts_with("HTTP/1.1 431"),
            "oversized head: {response}"
        );
        server.stop();
    }
}
