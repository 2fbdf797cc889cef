//! Snapshot store benchmarks: the extent-map encoding and loading a map
//! from LMDB.
//!
//! `cargo bench --bench store`. Prints the encoded bytes per extent of each
//! map shape, then times encode, decode and a full load (read transaction,
//! LMDB lookup, decode, validation) of 1M-extent maps. Target: a 1M-extent
//! map loads in well under 100 ms and takes under 10 bytes per extent.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use coriolis_ovm_exporter::extent::{flags, Extent, ExtentMap};
use coriolis_ovm_exporter::store::codec::{decode_map, encode_map};
use coriolis_ovm_exporter::store::{DiskRecord, Fingerprint, SnapshotRecord, Store, StoreOptions};

/// Extents in the large maps.
const N: usize = 1_000_000;

/// A fragmented disk as XFS or btrfs maps it after many small writes:
/// extents of 4 KiB to 1 MiB with holes between some, 4 KiB aligned.
/// `contiguity` is the chance (out of 8) that an extent's blocks follow the
/// previous one's physically (files written sequentially); the rest sit at
/// random places on a 4 TiB device (heavily rewritten reflinked files).
fn map(n: usize, contiguity: u8, seed: u64) -> ExtentMap {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = Vec::with_capacity(n);
    let (mut logical, mut physical) = (0u64, 1u64 << 30);
    for _ in 0..n {
        let length = 4096 * rng.u64(1..=256);
        if rng.u8(0..8) >= contiguity {
            physical = 4096 * rng.u64(0..1 << 30);
        }
        v.push(Extent {
            logical,
            physical,
            length,
            flags: if rng.u8(0..4) == 0 { flags::SHARED } else { 0 },
        });
        physical += length;
        logical += length
            + if rng.u8(0..4) == 0 {
                4096 * rng.u64(1..64)
            } else {
                0
            };
    }
    ExtentMap::new(v).unwrap()
}

fn shapes() -> Vec<(&'static str, ExtentMap)> {
    vec![
        ("sequential", map(N, 7, 1)),
        ("mixed", map(N, 4, 2)),
        ("scattered", map(N, 0, 3)),
    ]
}

fn bench_codec(c: &mut Criterion) {
    let shapes = shapes();
    for (name, m) in &shapes {
        let enc = encode_map(m);
        eprintln!(
            "extent map '{name}': {} extents, {} bytes encoded, {:.2} bytes/extent (raw: 28)",
            m.len(),
            enc.len(),
            enc.len() as f64 / m.len() as f64
        );
    }
    let mut g = c.benchmark_group("extent_codec");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    for (name, m) in &shapes {
        let enc = encode_map(m);
        g.bench_with_input(BenchmarkId::new("encode", name), m, |b, m| {
            b.iter(|| encode_map(black_box(m)))
        });
        g.bench_with_input(BenchmarkId::new("decode", name), &enc, |b, enc| {
            b.iter(|| decode_map(black_box(enc)).unwrap())
        });
    }
    g.finish();
}

fn bench_load(c: &mut Criterion) {
    let dir: PathBuf = std::env::temp_dir().join(format!("coe-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open(&dir.join("db"), &StoreOptions::default()).unwrap();
    let m = map(N, 4, 2);
    let fp = Fingerprint {
        ino: 1,
        size: 1 << 40,
        mtime_sec: 0,
        mtime_nsec: 0,
        ctime_sec: 0,
        ctime_nsec: 0,
    };
    let mut rec = SnapshotRecord {
        id: uuid::Uuid::new_v4().to_string(),
        vm: "0004fb0000060000ccaf98a0baa2c186".into(),
        seq: 0,
        created_at_ns: 0,
        owner: "bench".into(),
        idempotency_key: None,
        disks: vec![DiskRecord {
            name: "0004fb000012000005bcf25e906ce843.img".into(),
            parent_path: "/OVS/Repositories/r/VirtualDisks/d.img".into(),
            repo_mount: "/OVS/Repositories/r".into(),
            size: 1 << 40,
            fingerprint: fp,
            extents: N as u64,
            parent_ino: None,
        }],
    };
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    // Recording only: the insert is timed, the removal that keeps the store
    // the same size for the next iteration is not.
    g.bench_function(BenchmarkId::new("insert_1M_extent_snapshot", N), |b| {
        b.iter_custom(|iters| {
            let mut timed = std::time::Duration::ZERO;
            for _ in 0..iters {
                let mut r = rec.clone();
                r.id = uuid::Uuid::new_v4().to_string();
                let t = std::time::Instant::now();
                store.insert(&mut r, std::slice::from_ref(&m)).unwrap();
                timed += t.elapsed();
                store.remove(&r.id).unwrap();
            }
            timed
        })
    });
    store.insert(&mut rec, std::slice::from_ref(&m)).unwrap();
    g.bench_function(BenchmarkId::new("load_1M_extent_map", N), |b| {
        b.iter(|| {
            let loaded = store.map(black_box(&rec.id), 0).unwrap();
            assert_eq!(loaded.len(), N);
            loaded
        })
    });
    g.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_codec, bench_load);
criterion_main!(benches);
