//! Extent algebra and FIEMAP parsing benchmarks.
//!
//! `cargo bench --bench extent`. The diff of two maps of N extents must grow
//! linearly in N (10k, 100k, 1M); target: 1M × 1M under 50 ms on one core.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use coriolis_ovm_exporter::extent::{diff, squash, Extent, ExtentMap};
use coriolis_ovm_exporter::sys::fiemap;

/// A map of `n` 64 KiB extents with 4 KiB holes between some of them, and
/// its successor after scattered small writes (1 in 16 extents rewritten
/// in part, 1 in 64 punched).
fn maps(n: usize, seed: u64) -> (ExtentMap, ExtentMap) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut a = Vec::with_capacity(n);
    let mut pos = 0u64;
    for i in 0..n as u64 {
        a.push(Extent {
            logical: pos,
            physical: (1 << 30) + i * (128 << 10),
            length: 64 << 10,
            flags: 0,
        });
        pos += (64 << 10) + if rng.bool() { 4096 } else { 0 };
    }
    let mut b = Vec::with_capacity(n + n / 8);
    for (i, e) in a.iter().enumerate() {
        match rng.u8(0..64) {
            0 => {} // punched
            1..=4 => {
                // 4 KiB rewritten in the middle: split in three.
                let off = 4096 * rng.u64(1..14);
                b.push(Extent { length: off, ..*e });
                b.push(Extent {
                    logical: e.logical + off,
                    physical: (1 << 40) + i as u64 * 4096,
                    length: 4096,
                    flags: 0,
                });
                b.push(Extent {
                    logical: e.logical + off + 4096,
                    physical: e.physical + off + 4096,
                    length: e.length - off - 4096,
                    flags: 0,
                });
            }
            _ => b.push(*e),
        }
    }
    (ExtentMap::new(a).unwrap(), ExtentMap::new(b).unwrap())
}

fn bench_diff(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff");
    g.sample_size(10);
    for n in [10_000usize, 100_000, 1_000_000] {
        let (a, b) = maps(n, 1);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| diff(black_box(&a), black_box(&b)))
        });
    }
    g.finish();
}

fn bench_squash(c: &mut Criterion) {
    let mut g = c.benchmark_group("squash");
    g.sample_size(10);
    for n in [100_000usize, 1_000_000] {
        let (_, b) = maps(n, 2);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| squash(black_box(b.extents())))
        });
    }
    g.finish();
}

fn bench_fiemap_parse(c: &mut Criterion) {
    let n = fiemap::BATCH;
    let mut buf = vec![0u8; fiemap::HEADER_LEN + n * fiemap::EXTENT_LEN];
    fiemap::encode_request(&mut buf, 0, 0, n as u32);
    buf[20..24].copy_from_slice(&(n as u32).to_ne_bytes());
    for i in 0..n {
        let at = fiemap::HEADER_LEN + i * fiemap::EXTENT_LEN;
        buf[at..at + 8].copy_from_slice(&(i as u64 * 8192).to_ne_bytes());
        buf[at + 8..at + 16].copy_from_slice(&(i as u64 * 4096).to_ne_bytes());
        buf[at + 16..at + 24].copy_from_slice(&4096u64.to_ne_bytes());
    }
    let mut g = c.benchmark_group("fiemap_parse");
    g.throughput(Throughput::Elements(n as u64));
    let mut out = Vec::with_capacity(n);
    g.bench_function(BenchmarkId::from_parameter(n), |bench| {
        bench.iter(|| {
            out.clear();
            fiemap::parse(black_box(&buf), &mut out).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_diff, bench_squash, bench_fiemap_parse);
criterion_main!(benches);
