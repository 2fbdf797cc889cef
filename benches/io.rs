//! io core benchmarks: `Range` parsing, incremental stream framing and
//! decoding, and read throughput of a 256 MiB file per backend with
//! O_DIRECT on and off; at the end, the io_uring / threads throughput ratio
//! measured in the same run.
//!
//! The file lives in `COE_BENCH_DIR`, else `COE_TEST_XFS`, else the temp
//! folder; it must be on a filesystem that accepts O_DIRECT for the direct
//! rows to mean anything (the run prints which it got).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use coriolis_ovm_exporter::api::framing::WireReads;
use coriolis_ovm_exporter::io::{BackendChoice, DiskFile, IoConfig, IoEngine};
use coriolis_ovm_exporter::wire::range;
use coriolis_ovm_exporter::wire::stream::{self, Change, ChangeKind, Encoder};
use criterion::{BenchmarkId, Criterion, Throughput};

const FILE_SIZE: u64 = 256 << 20;
/// Scattered 4 KiB changes for the small-record stream bench.
const SMALL_RECORDS: u64 = 20_000;

fn bench_dir() -> PathBuf {
    ["COE_BENCH_DIR", "COE_TEST_XFS"]
        .iter()
        .find_map(std::env::var_os)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn bench_file() -> PathBuf {
    let path = bench_dir().join("coe-io-bench-256MiB.img");
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(FILE_SIZE) {
        let mut data = vec![0u8; FILE_SIZE as usize];
        fastrand::Rng::with_seed(1).fill(&mut data);
        std::fs::write(&path, &data).unwrap();
    }
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn engine(backend: BackendChoice, direct: bool) -> IoEngine {
    IoEngine::start(&IoConfig {
        backend,
        direct_io: direct,
        ..IoConfig::default()
    })
    .unwrap()
}

async fn drain(e: &IoEngine, f: &DiskFile, r: std::ops::Range<u64>) -> u64 {
    let mut s = e.read(f, r).unwrap();
    let mut n = 0;
    while let Some(frame) = s.next().await {
        n += black_box(frame.unwrap()).len() as u64;
    }
    n
}

/// `streams` concurrent streams, each reading its share of the file.
async fn read_all(e: &IoEngine, f: &DiskFile, streams: u64) -> u64 {
    let share = FILE_SIZE / streams;
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let (e, f) = (e.clone(), f.clone());
            tokio::spawn(async move { drain(&e, &f, i * share..(i + 1) * share).await })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n
}

fn ranges(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_parse");
    let single = b"bytes=1048576-2097151".to_vec();
    let spread = format!(
        "bytes={}",
        (0..64)
            .map(|i| format!("{}-{}", i * 10_000, i * 10_000 + 99))
            .collect::<Vec<_>>()
            .join(",")
    );
    let overlapping = format!("bytes={}", vec!["0-1000000"; 1000].join(","));
    for (name, v) in [
        ("single", single),
        ("64_ranges", spread.into_bytes()),
        ("1000_overlapping", overlapping.into_bytes()),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| range::parse(black_box(&v), 1 << 40, range::DEFAULT_MAX_RANGES))
        });
    }
    g.finish();
}

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream_framing");
    let frame = vec![0x5Au8; 1 << 20];
    let records = 64u64;
    g.throughput(Throughput::Bytes(records << 20));
    g.bench_function("encode_64x1MiB", |b| {
        b.iter(|| {
            let mut e = Encoder::new(1 << 40, records);
            let mut framing = e.header().len();
            for i in 0..records {
                framing += e.begin_data(i << 21, 1 << 20).unwrap().len();
                e.data(black_box(&frame)).unwrap();
                framing += e.end_data().unwrap().len();
            }
            framing + e.finish().unwrap().len()
        })
    });
    let mut e = Encoder::new(1 << 40, records);
    let mut encoded = e.header().to_vec();
    for i in 0..records {
        encoded.extend_from_slice(&e.begin_data(i << 21, 1 << 20).unwrap());
        e.data(&frame).unwrap();
        encoded.extend_from_slice(&frame);
        encoded.extend_from_slice(&e.end_data().unwrap());
    }
    encoded.extend_from_slice(&e.finish().unwrap());
    let encoded = bytes::Bytes::from(encoded);
    g.bench_function("decode_64x1MiB", |b| {
        b.iter(|| {
            let mut d = stream::Decoder::new();
            let mut input = encoded.clone();
            let mut n = 0;
            while let Some(ev) = d.decode(&mut input).unwrap() {
                n += matches!(ev, stream::Event::DataEnd { .. }) as u64;
            }
            n
        })
    });
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("encode_100k_4KiB_records_framing", |b| {
        let small = vec![1u8; 4096];
        b.iter(|| {
            let mut e = Encoder::new(1 << 40, 100_000);
            let mut n = 0;
            for i in 0..100_000u64 {
                n += e.begin_data(i << 16, 4096).unwrap().len();
                e.data(black_box(&small)).unwrap();
                n += e.end_data().unwrap().len();
            }
            n
        })
    });
    g.finish();
}

fn reads(c: &mut Criterion) {
    let rt = runtime();
    let path = bench_file();
    let mut g = c.benchmark_group("read_256MiB");
    g.throughput(Throughput::Bytes(FILE_SIZE));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for direct in [true, false] {
        for backend in [BackendChoice::IoUring, BackendChoice::Threads] {
            let e = engine(backend, direct);
            let f = e.open(&path).unwrap();
            if direct && !f.is_direct() {
                eprintln!("note: {path:?} refused O_DIRECT; the direct rows are buffered");
            }
            for streams in [1u64, 8] {
                let id = BenchmarkId::new(
                    format!(
                        "{}_{}",
                        e.backend(),
                        if direct { "direct" } else { "buffered" }
                    ),
                    format!("{streams}_streams"),
                );
                g.bench_function(id, |b| b.iter(|| rt.block_on(read_all(&e, &f, streams))));
            }
        }
    }
    g.finish();

    let mut g = c.benchmark_group("incremental_small_records");
    g.throughput(Throughput::Elements(SMALL_RECORDS));
    g.sample_size(10);
    let step = FILE_SIZE / SMALL_RECORDS;
    let plan: Vec<Change> = (0..SMALL_RECORDS)
        .map(|i| Change {
            kind: ChangeKind::Data,
            offset: i * step / 4096 * 4096,
            len: 4096,
        })
        .collect();
    for direct in [true, false] {
        for backend in [BackendChoice::IoUring, BackendChoice::Threads] {
            let e = engine(backend, direct);
            let f = e.open(&path).unwrap();
            let id = format!(
                "{}_{}",
                e.backend(),
                if direct { "direct" } else { "buffered" }
            );
            g.bench_function(id, |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut s = e.incremental(&f, plan.clone()).unwrap();
                        let mut n = 0;
                        while let Some(fr) = s.next().await {
                            n += fr.unwrap().len();
                        }
                        n
                    })
                })
            });
        }
    }
    g.finish();
}

/// Throughput (MB/s) of `rounds` whole-file reads, median.
fn median_throughput(
    rt: &tokio::runtime::Runtime,
    e: &IoEngine,
    f: &DiskFile,
    streams: u64,
) -> f64 {
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let n = rt.block_on(read_all(e, f, streams));
            n as f64 / t.elapsed().as_secs_f64() / 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The comparison the issue asks for, measured in this run: io_uring (reads
/// punted to io-wq, the default), io_uring with inline reads, and threads.
fn ratios() {
    let rt = runtime();
    let path = bench_file();
    println!(
        "\nio_uring vs threads, 256 MiB file in {:?}, median of 5:",
        bench_dir()
    );
    for direct in [true, false] {
        for streams in [1u64, 8] {
            let mut mbs = Vec::new();
            for (backend, punt) in [
                (BackendChoice::IoUring, true),
                (BackendChoice::IoUring, false),
                (BackendChoice::Threads, true),
            ] {
                let e = IoEngine::start(&IoConfig {
                    backend,
                    direct_io: direct,
                    uring_async: punt,
                    ..IoConfig::default()
                })
                .unwrap();
                let f = e.open(&path).unwrap();
                median_throughput(&rt, &e, &f, streams); // warm-up
                mbs.push(median_throughput(&rt, &e, &f, streams));
            }
            println!(
                "  {:8} {} stream(s): io_uring {:6.0} MB/s (inline {:6.0}), threads {:6.0} MB/s, \
                 ratio io_uring/threads {:.2} (inline {:.2})",
                if direct { "direct" } else { "buffered" },
                streams,
                mbs[0],
                mbs[1],
                mbs[2],
                mbs[0] / mbs[2],
                mbs[1] / mbs[2]
            );
        }
    }
}

fn main() {
    // COE_BENCH_RATIOS_ONLY=1: only the comparison, in a minute.
    if std::env::var_os("COE_BENCH_RATIOS_ONLY").is_some() {
        return ratios();
    }
    let mut c = Criterion::default().configure_from_args();
    ranges(&mut c);
    framing(&mut c);
    reads(&mut c);
    c.final_summary();
    // `cargo bench --no-run` never gets here; a filtered run (`cargo bench
    // --bench io -- range`) skips the long comparison.
    if std::env::args().skip(1).all(|a| a.starts_with('-')) {
        ratios();
    }
}
