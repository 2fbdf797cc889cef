//! The io core on real XFS and btrfs files: every test runs against both
//! backends (io_uring and the pread thread pool), with O_DIRECT on and off.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coriolis_ovm_exporter::api::framing::WireReads;
use coriolis_ovm_exporter::io::threads::ThreadsBackend;
use coriolis_ovm_exporter::io::uring::UringBackend;
use coriolis_ovm_exporter::io::{
    BackendChoice, BackendKind, Batch, BatchDone, DiskFile, IoConfig, IoEngine, IoError,
    ReadBackend,
};
use coriolis_ovm_exporter::wire::range::{self, Multipart};
use coriolis_ovm_exporter::wire::stream::{self, Change, ChangeKind, Event};

use crate::common::{drop_cache, resident_bytes, Fs, LogCapture, Scratch};

/// Both backends, O_DIRECT on and off.
fn variants() -> Vec<(BackendChoice, bool)> {
    let mut v = Vec::new();
    for b in [BackendChoice::IoUring, BackendChoice::Threads] {
        for direct in [true, false] {
            v.push((b, direct));
        }
    }
    v
}

fn engine(backend: BackendChoice, direct: bool, tweak: impl FnOnce(&mut IoConfig)) -> IoEngine {
    let mut cfg = IoConfig {
        backend,
        direct_io: direct,
        ..IoConfig::default()
    };
    tweak(&mut cfg);
    let e = IoEngine::start(&cfg).expect("engine starts (io_uring must work on this machine)");
    let want = match backend {
        BackendChoice::IoUring => BackendKind::IoUring,
        _ => BackendKind::Threads,
    };
    assert_eq!(e.backend(), want);
    e
}

/// A file of `size` random bytes written in uneven pieces.
fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// A scratch folder on `fs` holding `disk.img`, `size` random bytes (see
/// [`random_file`]): the folder (removed on drop), the path, the bytes.
fn disk_file(fs: Fs, tag: &str, size: usize, seed: u64) -> (Scratch, PathBuf, Vec<u8>) {
    let dir = fs.scratch(tag);
    let path = dir.path("disk.img");
    let data = random_file(&path, size, seed);
    (dir, path, data)
}

/// The bytes of range `r` of `file`, its stream read to a clean end.
async fn read_all(e: &IoEngine, file: &DiskFile, r: Range<u64>) -> Vec<u8> {
    e.read(file, r).unwrap().collect().await.unwrap()
}

/// The error that ends the stream of range `r` of `file`.
async fn read_err(e: &IoEngine, file: &DiskFile, r: Range<u64>) -> IoError {
    e.read(file, r).unwrap().collect().await.unwrap_err()
}

fn open(e: &IoEngine, path: &Path, direct: bool) -> DiskFile {
    let f = e.open(path).unwrap();
    assert_eq!(f.is_direct(), direct, "O_DIRECT accepted on {path:?}");
    f
}

fn random_ranges(rng: &mut fastrand::Rng, size: u64, n: usize) -> Vec<Range<u64>> {
    (0..n)
        .map(|i| {
            let start = match i % 4 {
                0 => rng.u64(0..size),
                1 => rng.u64(0..size / 4096) * 4096,
                2 => size - rng.u64(1..10_000.min(size)),
                _ => rng.u64(0..size / 2),
            };
            let max_len = size - start;
            let len = match i % 3 {
                0 => rng.u64(1..=max_len.min(10)),
                1 => rng.u64(1..=max_len.min(3 << 20)),
                _ => max_len,
            };
            start..start + len
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ranges_equal_the_file_bytes() {
    for fs in Fs::ALL {
        // Not a multiple of the page size: the tail read is short.
        let size = (9 << 20) + 1234;
        let (_dir, path, data) = disk_file(fs, "io-ranges", size, 1);
        for (backend, direct) in variants() {
            // Small buffers too, so one range spans many batches.
            // io_uring also with reads tried inline in the ring thread.
            let punts: &[bool] = match backend {
                BackendChoice::IoUring => &[true, false],
                _ => &[true],
            };
            for (&punt, buffer_size) in punts.iter().flat_map(|p| [(p, 64 << 10), (p, 1 << 20)]) {
                let e = engine(backend, direct, |c| {
                    c.buffer_size = buffer_size;
                    c.uring_async = punt;
                });
                let file = open(&e, &path, direct);
                assert_eq!(file.size(), size as u64);
                let mut rng = fastrand::Rng::with_seed(buffer_size as u64);
                for r in random_ranges(&mut rng, size as u64, 60) {
                    let got = read_all(&e, &file, r.clone()).await;
                    assert!(
                        got == data[r.start as usize..r.end as usize],
                        "{fs:?} {backend:?} direct={direct} buf={buffer_size}: range {r:?} differs"
                    );
                }
                let whole = read_all(&e, &file, 0..size as u64).await;
                assert!(
                    whole == data,
                    "{fs:?} {backend:?} direct={direct}: whole file"
                );
                assert_eq!(e.pool().in_use(), 0, "every buffer back in the pool");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_big_and_alias_pool_buffers() {
    let (_dir, path, data) = disk_file(Fs::Xfs, "io-frames", 8 << 20, 2);
    for (backend, direct) in variants() {
        // This test keeps every frame, so the stream may hold them all (with
        // the default read-ahead it would wait for frames to be dropped).
        let e = engine(backend, direct, |c| c.read_ahead = 8);
        let file = open(&e, &path, direct);
        let mut s = e.read(&file, 4097..(8 << 20) - 1).unwrap();
        let mut frames = Vec::new();
        while let Some(f) = s.next().await {
            frames.push(f.unwrap());
        }
        // Full 1 MiB buffers, sliced: the first read starts at the page
        // holding byte 4097 and its frame one byte into it; the last frame
        // ends one byte before the end of the file.
        assert_eq!(frames.len(), 8);
        assert_eq!(frames[0].len(), (1 << 20) - 1);
        assert!(frames[1..7].iter().all(|f| f.len() == 1 << 20));
        assert_eq!(frames[0][..], data[4097..(1 << 20) + 4096]);
        assert_eq!(frames[7][..], data[(7 << 20) + 4096..(8 << 20) - 1]);
        // Zero copy: a frame of an aligned offset starts on a page.
        assert_eq!(frames[1].as_ptr() as usize % 4096, 0);
        assert_eq!(frames[0].as_ptr() as usize % 4096, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_past_eof_and_empty_ranges_are_refused() {
    let (_dir, path, _) = disk_file(Fs::Btrfs, "io-eof", 10_000, 3);
    for (backend, direct) in variants() {
        let e = engine(backend, direct, |_| {});
        let file = open(&e, &path, direct);
        for r in [
            9_999..10_001,
            10_000..10_001,
            20_000..30_000,
            20_000..20_000,
        ] {
            assert!(
                matches!(e.read(&file, r.clone()), Err(IoError::OutOfBounds { .. })),
                "{r:?}"
            );
        }
        let last = read_all(&e, &file, 9_999..10_000).await;
        assert_eq!(last.len(), 1);
        // Empty ranges inside the file are empty bodies (an empty disk's
        // whole content).
        for r in [5..5, 10_000..10_000] {
            assert!(read_all(&e, &file, r).await.is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_truncated_while_streaming_breaks_the_stream() {
    for fs in Fs::ALL {
        let (_dir, path, _) = disk_file(fs, "io-trunc", 4 << 20, 4);
        for (backend, direct) in variants() {
            let e = engine(backend, direct, |_| {});
            let file = open(&e, &path, direct);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
            let err = read_err(&e, &file, 0..4 << 20).await;
            assert!(
                matches!(err, IoError::ShortRead { .. }),
                "{fs:?} {backend:?}: {err}"
            );
            random_file(&path, 4 << 20, 4);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_share_a_small_pool() {
    let size = 16 << 20;
    let (_dir, path, data) = disk_file(Fs::Xfs, "io-many", size, 5);
    let data = Arc::new(data);
    for (backend, direct) in variants() {
        // 32 streams × 2 buffers could want 64; only 8 exist.
        let e = engine(backend, direct, |c| {
            c.buffer_size = 256 << 10;
            c.read_ahead = 2;
            c.pool_buffers = 8;
        });
        let file = open(&e, &path, direct);
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let (e, file, data) = (e.clone(), file.clone(), Arc::clone(&data));
            tasks.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(i);
                for r in random_ranges(&mut rng, size as u64, 8) {
                    let got = read_all(&e, &file, r.clone()).await;
                    assert!(
                        got == data[r.start as usize..r.end as usize],
                        "stream {i} {r:?}"
                    );
                }
            }));
        }
        for t in tasks {
            time_limit(t).await;
        }
        assert_eq!(e.pool().in_use(), 0);
    }
}

/// Awaits a task with a generous bound, so a deadlock fails instead of
/// hanging the suite.
async fn time_limit<T>(t: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), t)
        .await
        .expect("stream finished in time (no deadlock)")
        .expect("task did not panic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_stream_holds_at_most_its_read_ahead() {
    let (_dir, path, _) = disk_file(Fs::Btrfs, "io-bound", 32 << 20, 6);
    for (backend, direct) in variants() {
        let e = engine(backend, direct, |c| {
            c.buffer_size = 1 << 20;
            c.read_ahead = 3;
            c.pool_buffers = 64;
        });
        let file = open(&e, &path, direct);
        let s = e.read(&file, 0..32 << 20).unwrap();
        // The reads ahead are made without a reader ...
        wait_until(|| e.pool().in_use() == 3).await;
        // ... and no more: a producer past its bound would take more of the
        // 64 free buffers. A pause (not a deadline: a slow machine can only
        // hide an excess, never fail a correct engine) gives it the chance.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = e.pool().in_use();
        assert_eq!(held, 3, "{backend:?}: {held} buffers held");
        // Dropping the stream mid-way gives every buffer back.
        drop(s);
        wait_until(|| e.pool().in_use() == 0).await;
    }
}

/// A client reading a file in consecutive ranges (the Coriolis client's
/// pattern): from the second range on, the next range's reads are started
/// ahead and the following request takes them over; the bytes are exact
/// whatever the next range's length, a jump elsewhere is served as asked,
/// and parked reads give their buffers back when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_ranges_take_over_reads_started_ahead() {
    let size = (20 << 20) + 1000;
    let (_dir, path, data) = disk_file(Fs::Xfs, "io-prefetch", size, 12);
    let size = size as u64;
    for backend in [BackendChoice::IoUring, BackendChoice::Threads] {
        // Four buffers of 256 KiB: a read-ahead of one MiB, which the
        // counts below are written for.
        let e = engine(backend, true, |c| {
            c.buffer_size = 256 << 10;
            c.read_ahead = 4;
        });
        let file = open(&e, &path, true);
        assert!(file.is_direct());
        let mb = 1u64 << 20;
        // Equal ranges, then shorter, longer, unaligned, a jump back, and
        // a last one that ends at the end of the file.
        let ranges = [
            0..mb,
            mb..2 * mb,
            2 * mb..3 * mb,
            3 * mb..3 * mb + 100_000,
            3 * mb + 100_000..6 * mb + 7,
            6 * mb + 7..7 * mb,
            mb..2 * mb,
            2 * mb..3 * mb,
            3 * mb..size,
        ];
        let mut adopted = Vec::new();
        for r in ranges {
            let got = read_all(&e, &file, r.clone()).await;
            assert!(
                got == data[r.start as usize..r.end as usize],
                "{backend:?}: range {r:?} differs"
            );
            adopted.push(e.prefetch_stats().adopted);
        }
        // Reads used so far: the first range parks only a marker, the
        // second parks the reads of the next MiB (four 256 KiB buffers),
        // the third takes all four; the short fourth keeps only the read
        // that covers it and parks one read of its own length; the long
        // fifth takes that one, the sixth four (its unaligned start needs
        // five buffers, read_ahead allows four, which end at 7 MiB
        // exactly); the jump back starts a new sequence, whose second range
        // parks four reads for the last.
        assert_eq!(adopted, [0, 0, 4, 5, 6, 10, 10, 10, 14], "{backend:?}");
        let stats = e.prefetch_stats();
        assert_eq!(stats.parked, 4 + 4 + 1 + 4 + 4 + 4, "{stats:?}");
        // A file opened again (another request's descriptor) is the same
        // file: its reads continue the sequence.
        let again = open(&e, &path, true);
        let before = e.prefetch_stats().adopted;
        let r = 4 * mb..5 * mb;
        read_all(&e, &file, 3 * mb..r.start).await;
        read_all(&e, &again, r.clone()).await;
        let r2 = r.end..r.end + mb;
        let got = read_all(&e, &again, r2.clone()).await;
        assert!(got == data[r2.start as usize..r2.end as usize]);
        assert!(e.prefetch_stats().adopted > before);
        // Parked reads hold buffers until taken over or dropped.
        assert!(e.prefetch_stats().buffers > 0);
        e.drop_prefetched();
        wait_until(|| e.pool().in_use() == 0).await;
    }
}

/// Random single ranges never continue one another: nothing is read ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ranges_start_no_reads_ahead() {
    let size = 8 << 20;
    let (_dir, path, data) = disk_file(Fs::Btrfs, "io-noprefetch", size, 13);
    let e = engine(BackendChoice::IoUring, true, |_| {});
    let file = open(&e, &path, true);
    let mut rng = fastrand::Rng::with_seed(14);
    for r in random_ranges(&mut rng, size as u64, 40) {
        let got = read_all(&e, &file, r.clone()).await;
        assert!(got == data[r.start as usize..r.end as usize]);
    }
    assert_eq!(e.prefetch_stats().parked, 0);
    assert_eq!(e.pool().in_use(), 0);
    // Buffered reads leave reading ahead to the kernel.
    let e = engine(BackendChoice::IoUring, false, |_| {});
    let file = open(&e, &path, false);
    for i in 0..4u64 {
        read_all(&e, &file, i << 20..(i + 1) << 20).await;
    }
    assert_eq!(e.prefetch_stats().parked, 0);
}

async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reads_leave_the_page_cache_alone() {
    for fs in Fs::ALL {
        let size = 16 << 20;
        let (_dir, path, _) = disk_file(fs, "io-cache", size, 7);
        for backend in [BackendChoice::IoUring, BackendChoice::Threads] {
            for direct in [true, false] {
                drop_cache(&path);
                assert!(resident_bytes(&path) < 1 << 20, "{fs:?}: cache dropped");
                let e = engine(backend, direct, |_| {});
                let file = open(&e, &path, direct);
                let got = read_all(&e, &file, 0..size as u64).await;
                assert_eq!(got.len(), size);
                let cached = resident_bytes(&path);
                if direct {
                    assert!(
                        cached < 1 << 20,
                        "{fs:?} {backend:?}: O_DIRECT cached {cached}"
                    );
                } else {
                    assert!(
                        cached > (size as u64) / 2,
                        "{fs:?} {backend:?}: buffered cached {cached}"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_body_is_exact() {
    let size = 3 << 20;
    let (_dir, path, data) = disk_file(Fs::Xfs, "io-multipart", size, 8);
    for (backend, direct) in variants() {
        let e = engine(backend, direct, |c| c.buffer_size = 64 << 10);
        let file = open(&e, &path, direct);
        let header = b"bytes=-100, 0-0, 1000-2000, 1500-70000, 2000000-, 5-5";
        let ranges = range::parse(header, size as u64, range::DEFAULT_MAX_RANGES).unwrap();
        assert_eq!(
            ranges,
            vec![0..1, 5..6, 1000..70_001, 2_000_000..size as u64]
        );
        let m = Multipart::new("application/octet-stream");
        let mut want = Vec::new();
        for r in &ranges {
            want.extend_from_slice(m.part_header(r, size as u64).as_bytes());
            want.extend_from_slice(&data[r.start as usize..r.end as usize]);
        }
        want.extend_from_slice(m.trailer().as_bytes());
        let len = m.body_len(&ranges, size as u64);
        let got = e
            .read_multipart(&file, ranges, m)
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(got.len() as u64, len);
        assert!(got == want, "{backend:?} direct={direct}");
    }
}

/// A plan of `n` scattered changes over `size` bytes: data and zero ranges.
fn scattered_plan(rng: &mut fastrand::Rng, size: u64, n: u64) -> Vec<Change> {
    let step = size / n;
    (0..n)
        .map(|i| {
            let offset = i * step + rng.u64(0..step / 2);
            let len = rng.u64(1..=(step / 2).min(200_000));
            let kind = if rng.u8(0..4) == 0 {
                ChangeKind::Zero
            } else {
                ChangeKind::Data
            };
            Change { kind, offset, len }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_stream_rebuilds_the_disk() {
    for fs in Fs::ALL {
        let size = 8 << 20;
        let (_dir, path, data) = disk_file(fs, "io-incr", size, 9);
        for (backend, direct) in variants() {
            let e = engine(backend, direct, |_| {});
            let file = open(&e, &path, direct);
            let mut rng = fastrand::Rng::with_seed(10);
            for n in [0, 1, 17, 2000] {
                let plan = scattered_plan(&mut rng, size as u64, n.max(1)).into_iter();
                let plan: Vec<Change> = plan.take(n as usize).collect();
                let body = e
                    .incremental(&file, plan.clone())
                    .unwrap()
                    .collect()
                    .await
                    .unwrap();
                assert_eq!(body.len() as u64, stream::encoded_len(&plan));
                // A replica that starts out as garbage: only the plan's
                // ranges are checked.
                let mut replica = vec![0x5Au8; size];
                let mut records = 0;
                for ev in stream::decode_all(&body, 65_537).unwrap() {
                    match ev {
                        Event::Data { offset, bytes } => replica
                            [offset as usize..offset as usize + bytes.len()]
                            .copy_from_slice(&bytes),
                        Event::Zero { offset, len } => {
                            records += 1;
                            replica[offset as usize..(offset + len) as usize].fill(0)
                        }
                        Event::DataEnd { .. } => records += 1,
                        Event::Header(h) => assert_eq!(h.disk_size, size as u64),
                        _ => {}
                    }
                }
                assert_eq!(records, plan.len());
                for c in &plan {
                    let r = c.offset as usize..(c.offset + c.len) as usize;
                    match c.kind {
                        ChangeKind::Data => {
                            assert!(replica[r.clone()] == data[r], "{fs:?} {backend:?}")
                        }
                        ChangeKind::Zero => assert!(replica[r].iter().all(|&b| b == 0)),
                    }
                }
                // Damage one byte anywhere: the decoder notices.
                if !body.is_empty() {
                    let mut bad = body.clone();
                    let at = rng.usize(0..bad.len());
                    bad[at] ^= 0x10;
                    assert!(
                        stream::decode_all(&bad, 4096).is_err(),
                        "flip at {at} unnoticed"
                    );
                }
            }
            assert_eq!(e.pool().in_use(), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_plan_is_checked() {
    let (_dir, path, _) = disk_file(Fs::Xfs, "io-incr-bad", 100_000, 11);
    let e = engine(BackendChoice::Threads, true, |_| {});
    let file = e.open(&path).unwrap();
    let d = |offset, len| Change {
        kind: ChangeKind::Data,
        offset,
        len,
    };
    for bad in [
        vec![d(0, 0)],
        vec![d(10, 10), d(15, 10)],
        vec![d(99_999, 2)],
    ] {
        assert!(matches!(e.incremental(&file, bad), Err(IoError::Plan(_))));
    }
}

/// A real backend that counts the batches it is given.
struct Counted(Box<dyn ReadBackend>, Arc<std::sync::atomic::AtomicUsize>);

impl ReadBackend for Counted {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }
    fn submit(&self, batch: Batch) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.submit(batch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_reads_of_cached_bytes_skip_the_backend() {
    let size = 6 << 20;
    let (_dir, path, data) = disk_file(Fs::Xfs, "io-cached", size, 21);
    let cfg = IoConfig {
        direct_io: false,
        buffer_size: 256 << 10,
        ..IoConfig::default()
    };
    let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Box::new(UringBackend::start(1, 64, true).unwrap());
    let e = IoEngine::with_backend(&cfg, Box::new(Counted(backend, Arc::clone(&batches)))).unwrap();
    let count = || batches.load(std::sync::atomic::Ordering::Relaxed);
    let file = open(&e, &path, false);
    let range = 5..size as u64 - 7;
    // Not in the page cache: every batch goes to the backend, which
    // waits for the disk.
    drop_cache(&path);
    let got = read_all(&e, &file, range.clone()).await;
    assert!(got == data[5..size - 7], "bytes read through the backend");
    assert!(count() > 0, "uncached reads went to the backend");
    // Now cached (that read filled the page cache): read on the stream's
    // task, the backend sees none of it.
    let before = count();
    let got = read_all(&e, &file, range.clone()).await;
    assert!(got == data[5..size - 7], "bytes read from the page cache");
    assert_eq!(count(), before, "cached reads skip the backend");
    // A file cut short under a cached read still ends the stream with an
    // error, not a short body.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(3 << 20).unwrap();
    let err = read_err(&e, &file, range).await;
    assert!(matches!(err, IoError::ShortRead { .. }), "{err}");
}

/// A real backend behind a filter that answers every read on an `O_DIRECT`
/// descriptor with EINVAL, as a filesystem or device that accepts the open
/// but refuses direct reads does (none of the test filesystems does so on
/// demand).
struct RefuseDirect(Box<dyn ReadBackend>);

impl ReadBackend for RefuseDirect {
    fn kind(&self) -> BackendKind {
        self.0.kind()
    }
    fn submit(&self, batch: Batch) {
        let flags = rustix::fs::fcntl_getfl(&*batch.file).unwrap();
        assert_eq!(batch.direct, flags.contains(rustix::fs::OFlags::DIRECT));
        if batch.direct {
            let results = batch
                .segments
                .iter()
                .map(|_| Err(std::io::Error::from_raw_os_error(libc_einval())))
                .collect();
            let _ = batch.reply.send(BatchDone {
                buf: batch.buf,
                results,
            });
        } else {
            self.0.submit(batch);
        }
    }
}

fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn einval_on_direct_reads_falls_back_to_buffered() {
    let size = 5 << 20;
    let (_dir, path, data) = disk_file(Fs::Xfs, "io-einval", size, 12);
    let cfg = IoConfig {
        buffer_size: 256 << 10,
        ..IoConfig::default()
    };
    let backends: [Box<dyn ReadBackend>; 3] = [
        Box::new(UringBackend::start(1, 64, true).unwrap()),
        Box::new(UringBackend::start(1, 64, false).unwrap()),
        Box::new(ThreadsBackend::start(4).unwrap()),
    ];
    for backend in backends {
        let kind = backend.kind();
        let e = IoEngine::with_backend(&cfg, Box::new(RefuseDirect(backend))).unwrap();
        let file = open(&e, &path, true);
        let got = read_all(&e, &file, 3..size as u64 - 3).await;
        assert!(got == data[3..size - 3], "{kind}: bytes after the fallback");
        assert!(!file.is_direct(), "{kind}: the file stays buffered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_errors_break_the_stream() {
    // A descriptor that cannot read: a directory gives EISDIR. On btrfs a
    // directory's size counts its entries' names, so a range fits inside.
    let dir = Fs::Btrfs.scratch("io-eisdir");
    let sub = dir.path("d");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("some-entry-name"), b"x").unwrap();
    for backend in [BackendChoice::IoUring, BackendChoice::Threads] {
        let e = engine(backend, false, |_| {});
        let file = e.open(&sub).unwrap();
        assert!(file.size() > 0, "btrfs directory size");
        let err = read_err(&e, &file, 0..1).await;
        assert!(matches!(err, IoError::Read { .. }), "{backend:?}: {err}");
    }
}

#[test]
fn auto_picks_io_uring_here_and_falls_back_when_the_kernel_refuses() {
    let auto = IoEngine::start(&IoConfig::default()).unwrap();
    assert_eq!(
        auto.backend(),
        BackendKind::IoUring,
        "this kernel has io_uring"
    );
    // io_uring_setup refuses more than 32768 entries (EINVAL): a real
    // refusal by the kernel, the same path as seccomp or the sysctl.
    let refused = IoConfig {
        ring_entries: 1 << 20,
        ..IoConfig::default()
    };
    assert_eq!(
        IoEngine::start(&refused).unwrap().backend(),
        BackendKind::Threads
    );
    let forced = IoConfig {
        backend: BackendChoice::IoUring,
        ..refused
    };
    assert!(matches!(
        IoEngine::start(&forced),
        Err(IoError::UringUnavailable { .. })
    ));
}

#[test]
fn the_log_says_which_backend_runs_and_why() {
    let logs = LogCapture::default();
    tracing::subscriber::with_default(logs.clone(), || {
        IoEngine::start(&IoConfig::default()).unwrap();
        IoEngine::start(&IoConfig {
            ring_entries: 1 << 20,
            ..IoConfig::default()
        })
        .unwrap();
    });
    let lines: Vec<String> = logs.events().into_iter().map(|e| e.fields).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("backend=\"io_uring\"") && l.contains("probe passed")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("backend=\"threads\"")
            && l.contains("io_uring_setup failed")
            && l.contains("Invalid argument")),
        "the fallback names the refusal: {lines:?}"
    );
}
