//! Criterion benchmarks of the shard's buffer pool ([`ringbd::ring::BufPool`], a buddy
//! allocator over one mapping): every READ and WRITE checks a block out and back in, so this
//! is per-IO cost. Measured: a 4 KiB round trip on an empty pool, the same with 32 blocks
//! already out (the QD32 steady state), 1 MiB blocks (splits and merges across 8 orders),
//! and a mixed QD32 window that keeps the free lists fragmented.
//!
//! Run: `cargo bench --bench buf_pool` (about 15 s).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringbd::ring::{Buf, BufPool};

/// The server's default pool per shard (`--buffer-mib 128`).
const POOL_BYTES: usize = 128 << 20;

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn check_out_in(pool: &mut BufPool, bytes: usize) {
    let buf = pool.check_out(black_box(bytes)).expect("pool has room");
    pool.check_in(black_box(buf));
}

fn bench_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("buf_pool");
    group.throughput(Throughput::Elements(1));
    let mut pool = BufPool::new(POOL_BYTES).expect("map the pool");

    group.bench_function("check_out_in_4k/empty", |b| {
        b.iter(|| check_out_in(&mut pool, 4096))
    });
    group.bench_function("check_out_in_1m/empty", |b| {
        b.iter(|| check_out_in(&mut pool, 1 << 20))
    });

    // 32 blocks of 4 KiB held, as at QD32: the next block splits a partly used region.
    let held: Vec<Buf> = (0..32)
        .map(|_| pool.check_out(4096).expect("room"))
        .collect();
    group.bench_function("check_out_in_4k/32_held", |b| {
        b.iter(|| check_out_in(&mut pool, 4096))
    });
    for buf in held {
        pool.check_in(buf);
    }

    // A sliding window of 32 blocks of mixed sizes: each iteration returns the oldest block
    // and takes a new one, so blocks come back in a different order than they went out.
    let sizes = [4096usize, 16384, 4096, 65536, 4096, 8192, 4096, 262144];
    let mut window: std::collections::VecDeque<Buf> = (0..32)
        .map(|index| pool.check_out(sizes[index % sizes.len()]).expect("room"))
        .collect();
    let mut next = 0usize;
    group.bench_function("window_32_mixed", |b| {
        b.iter(|| {
            let oldest = window.pop_front().expect("window is full");
            pool.check_in(oldest);
            next = next.wrapping_add(1);
            let buf = pool.check_out(sizes[next % sizes.len()]).expect("room");
            window.push_back(buf);
        })
    });
    for buf in window {
        pool.check_in(buf);
    }
    assert_eq!(pool.used_bytes(), 0, "every block came back");
    group.finish();
}

criterion_group! {
    name = buf_pool;
    config = config();
    targets = bench_pool
}
criterion_main!(buf_pool);
