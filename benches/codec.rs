//! Criterion benchmarks of the pure, per-request protocol code: request decode, reply encode
//! and validation. Everything here runs once (or twice) per NBD request on the data path, so
//! these are the numbers to compare against the server CPU per IO measured end to end
//! (`docs/PERFORMANCE.md`): together they should be a few tens of nanoseconds.
//!
//! Run: `cargo bench --bench codec` (about 30 s). Each benchmark is short on purpose
//! (`measurement_time` 2 s) so that `cargo bench` finishes in a few minutes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringbd::target::codec::{
    EXTENDED_REQUEST_BYTES, Extent, REQUEST_BYTES, ReplyStyle, Request, block_status_reply_bytes,
    decode_request, encode_request, reply_block_status, reply_ok, reply_read_data,
};
use ringbd::target::export::{BlockSize, Capabilities, ExportInfo};
use ringbd::target::handshake::{BASE_ALLOCATION_CONTEXT_ID, Session};
use ringbd::target::proto::{
    NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_READ, NBD_CMD_WRITE,
};
use ringbd::target::sparse::{READ_CHUNKS_MAX, plan_read};
use ringbd::target::validate::{Verdict, validate};

/// A 4 KiB READ at a 4 KiB-aligned offset: the request the headline workloads send.
fn read_4k() -> Request {
    Request {
        flags: 0,
        command: NBD_CMD_READ,
        cookie: 0x0123_4567_89ab_cdef,
        offset: 123 * 4096,
        length: 4096,
    }
}

/// A 1 GiB writable export with every capability, 4 KiB minimum block (an O_DIRECT file).
fn export() -> ExportInfo {
    ExportInfo {
        id: 0,
        name: String::new(),
        description: String::new(),
        size: 1 << 30,
        read_only: false,
        caps: Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            block_status: true,
            multi_conn: true,
            rotational: false,
        },
        block_size: BlockSize {
            minimum: 4096,
            preferred: 4096,
            maximum: 32 << 20,
        },
    }
}

fn session(export: &ExportInfo, style: ReplyStyle) -> Session {
    Session {
        export_id: export.id,
        reply_style: style,
        base_allocation: (style != ReplyStyle::Simple).then_some(BASE_ALLOCATION_CONTEXT_ID),
        transmission_flags: export.transmission_flags(style),
    }
}

/// Short runs, so that `cargo bench` stays within a few minutes; command-line flags
/// (`--measurement-time`, ...) still override this.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_request");
    group.throughput(Throughput::Elements(1));
    let mut compact = [0u8; REQUEST_BYTES];
    encode_request(&read_4k(), false, &mut compact);
    group.bench_function("compact_read_4k", |b| {
        b.iter(|| decode_request(black_box(&compact), false))
    });
    let mut extended = [0u8; EXTENDED_REQUEST_BYTES];
    encode_request(&read_4k(), true, &mut extended);
    group.bench_function("extended_read_4k", |b| {
        b.iter(|| decode_request(black_box(&extended), true))
    });
    // A receive buffer holding 32 pipelined headers (what one RECV delivers at QD32).
    let mut stream = vec![0u8; 32 * REQUEST_BYTES];
    for (index, chunk) in stream.chunks_exact_mut(REQUEST_BYTES).enumerate() {
        let request = Request {
            cookie: index as u64,
            ..read_4k()
        };
        encode_request(&request, false, chunk);
    }
    group.throughput(Throughput::Elements(32));
    group.bench_function("compact_stream_32", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut cookies = 0u64;
            while let Ok(Some((request, consumed))) = decode_request(&stream[at..], false) {
                cookies = cookies.wrapping_add(request.cookie);
                at += consumed;
            }
            black_box(cookies)
        })
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("reply_encode");
    group.throughput(Throughput::Elements(1));
    for (label, style) in [
        ("simple", ReplyStyle::Simple),
        ("structured", ReplyStyle::Structured),
        ("extended", ReplyStyle::Extended),
    ] {
        group.bench_function(format!("read_data_4k/{label}"), |b| {
            b.iter(|| {
                let head = reply_read_data(
                    black_box(style),
                    black_box(7),
                    black_box(4096),
                    black_box(4096),
                    black_box(4096),
                    true,
                );
                black_box(head.as_bytes().len())
            })
        });
        group.bench_function(format!("ok/{label}"), |b| {
            b.iter(|| black_box(reply_ok(black_box(style), black_box(7), black_box(4096))))
        });
    }
    for (label, style) in [
        ("structured", ReplyStyle::Structured),
        ("extended", ReplyStyle::Extended),
    ] {
        for extents_count in [1usize, 16] {
            let extents: Vec<Extent> = (0..extents_count)
                .map(|index| Extent {
                    length: 65536,
                    flags: (index % 2) as u32 * 3,
                })
                .collect();
            let mut out = vec![0u8; block_status_reply_bytes(style, extents_count)];
            group.bench_function(format!("block_status_{extents_count}/{label}"), |b| {
                b.iter(|| {
                    reply_block_status(
                        black_box(style),
                        black_box(7),
                        black_box(0),
                        BASE_ALLOCATION_CONTEXT_ID,
                        black_box(&extents),
                        &mut out,
                    )
                })
            });
        }
    }
    group.finish();
}

fn bench_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Elements(1));
    let export = export();
    let structured = session(&export, ReplyStyle::Structured);
    let extended = session(&export, ReplyStyle::Extended);
    let read = read_4k();
    assert!(matches!(
        validate(&read, &export, &structured),
        Verdict::Serve(_)
    ));
    group.bench_function("read_4k/structured", |b| {
        b.iter(|| validate(black_box(&read), black_box(&export), black_box(&structured)))
    });
    let write_fua = Request {
        flags: NBD_CMD_FLAG_FUA,
        command: NBD_CMD_WRITE,
        ..read
    };
    group.bench_function("write_4k_fua/structured", |b| {
        b.iter(|| {
            validate(
                black_box(&write_fua),
                black_box(&export),
                black_box(&structured),
            )
        })
    });
    let write_extended = Request {
        flags: NBD_CMD_FLAG_PAYLOAD_LEN,
        ..write_fua
    };
    assert!(matches!(
        validate(&write_extended, &export, &extended),
        Verdict::Serve(_)
    ));
    group.bench_function("write_4k/extended", |b| {
        b.iter(|| {
            validate(
                black_box(&write_extended),
                black_box(&export),
                black_box(&extended),
            )
        })
    });
    // The rejection path (out of range) must not be slow either: a client can send these.
    let past_end = Request {
        offset: export.size,
        ..read
    };
    assert!(matches!(
        validate(&past_end, &export, &structured),
        Verdict::Reject { .. }
    ));
    group.bench_function("reject_past_end", |b| {
        b.iter(|| {
            validate(
                black_box(&past_end),
                black_box(&export),
                black_box(&structured),
            )
        })
    });
    group.finish();
}

/// The zero-run scan every structured READ reply pays (`target::sparse`). "cold" walks a
/// 256 MiB region block by block so every block misses the cache, as data just written by
/// O_DIRECT DMA does; "hot" rescans the same bytes.
fn bench_sparse(c: &mut Criterion) {
    let mut group = c.benchmark_group("sparse_plan");
    let random: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    let zero = vec![0u8; 1 << 20];
    let mut half = random.clone();
    for block in half.chunks_mut(8192) {
        block[4096..].fill(0);
    }
    for (label, len) in [("4k", 4096usize), ("1m", 1 << 20)] {
        group.throughput(Throughput::Bytes(len as u64));
        for (kind, data) in [("data", &random), ("zero", &zero), ("alternating", &half)] {
            group.bench_function(format!("{label}/{kind}/hot"), |b| {
                b.iter(|| plan_read(black_box(&data[..len]), black_box(0), READ_CHUNKS_MAX))
            });
        }
    }
    let region_bytes = 256usize << 20;
    let cold: Vec<u8> = (0..region_bytes).map(|i| (i % 251) as u8 | 1).collect();
    let mut at = 0usize;
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("4k/data/cold", |b| {
        b.iter(|| {
            at = ((at + 4096 + 64) % (region_bytes - 8192)) & !4095;
            plan_read(black_box(&cold[at..at + 4096]), 0, READ_CHUNKS_MAX)
        })
    });
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("1m/data/cold", |b| {
        b.iter(|| {
            at = (at + (1 << 20)) % (region_bytes - (1 << 20));
            plan_read(black_box(&cold[at..at + (1 << 20)]), 0, READ_CHUNKS_MAX)
        })
    });
    group.finish();
}

criterion_group! {
    name = codec;
    config = config();
    targets = bench_decode, bench_encode, bench_validate, bench_sparse
}
criterion_main!(codec);
