//! The core on real filesystems: FIEMAP, reflink clones, and the property
//! that a diff never misses a changed byte (SEMANTICS.md §2).
//!
//! The checks are functions of the filesystem: the tests here run them on
//! the host's XFS and btrfs, `ocfs2_guest` runs the same ones on OCFS2 in a
//! QEMU guest.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use coriolis_ovm_exporter::extent::{diff, flags, ExtentMap};
use coriolis_ovm_exporter::snapshot::exact::refine_diff;
use coriolis_ovm_exporter::snapshot::Cancel;
use coriolis_ovm_exporter::sys::clone::{
    reflink, reflink_with, CloneError, CloneMethod, ClonePolicy,
};
use coriolis_ovm_exporter::sys::fiemap::{extent_map, extent_map_batched};
use coriolis_ovm_exporter::sys::{fs_type, FsType};
use rustix::fs::FallocateFlags;

use crate::common::Fs;

const BLOCK: u64 = 4096;

fn open_dir(p: &Path) -> File {
    File::open(p).unwrap()
}

/// A clone with an explicit policy (the OCFS2 tests use both).
fn clone_with(dir: &Path, src: &str, dst: &str, policy: ClonePolicy) -> CloneMethod {
    let d = open_dir(dir);
    reflink_with(
        d.as_fd(),
        Path::new(src),
        d.as_fd(),
        Path::new(dst),
        policy,
        &mut || {},
    )
    .unwrap()
}

fn map_of(path: &Path) -> ExtentMap {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    extent_map(&f, true).unwrap().clip(size)
}

pub(crate) fn punch(f: &File, off: u64, len: u64) {
    rustix::fs::fallocate(
        f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        off,
        len,
    )
    .unwrap();
}

#[test]
fn filesystems_are_the_expected_kinds() {
    let x = open_dir(&Fs::Xfs.root());
    assert_eq!(fs_type(&x).unwrap(), FsType::Xfs);
    let b = open_dir(&Fs::Btrfs.root());
    assert_eq!(fs_type(&b).unwrap(), FsType::Btrfs);
}

#[test]
fn sparse_file_has_empty_map_and_data_is_mapped() {
    for fs in Fs::ALL {
        sparse_and_data(fs);
    }
}

pub(crate) fn sparse_and_data(fs: Fs) {
    {
        let s = fs.scratch("fiemap-basic");
        let p = s.path("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        assert!(extent_map(&f, true).unwrap().is_empty(), "{fs:?}");
        f.write_all_at(&[0xab; 8192], 1 << 20).unwrap();
        let m = extent_map(&f, true).unwrap();
        assert_eq!(m.mapped_bytes(), 8192, "{fs:?}: {m:?}");
        assert_eq!(m.extents()[0].logical, 1 << 20);
        assert!(m.extents().last().unwrap().flags & flags::LAST != 0);
    }
}

#[test]
fn clone_shares_extents_and_content() {
    for fs in Fs::ALL {
        clone_shares(fs, ClonePolicy::Auto, CloneMethod::Ficlone);
    }
}

/// A clone made with `policy` by `method` has the content and shares every
/// extent.
pub(crate) fn clone_shares(fs: Fs, policy: ClonePolicy, method: CloneMethod) {
    {
        let s = fs.scratch("clone");
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(s.path("src.img"), &data).unwrap();
        assert_eq!(clone_with(&s.dir, "src.img", "snap.img", policy), method);
        assert_eq!(std::fs::read(s.path("snap.img")).unwrap(), data);
        let (a, b) = (map_of(&s.path("src.img")), map_of(&s.path("snap.img")));
        let d = diff(&a, &b);
        assert_eq!(
            d.changed_bytes() + d.zeroed_bytes(),
            0,
            "{fs:?}: {a:?} {b:?}"
        );
        assert!(b.extents().iter().all(|e| e.flags & flags::SHARED != 0));
        // The clone is private to its owner.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path("snap.img"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn clone_never_follows_symlinks_nor_overwrites() {
    no_symlink_follow(Fs::Xfs);
}

pub(crate) fn no_symlink_follow(fs: Fs) {
    let s = fs.scratch("clone-symlink");
    std::fs::write(s.path("real.img"), b"secret").unwrap();
    std::os::unix::fs::symlink(s.path("real.img"), s.path("link.img")).unwrap();
    let d = open_dir(&s.dir);
    let err = reflink(
        d.as_fd(),
        Path::new("link.img"),
        d.as_fd(),
        Path::new("x.img"),
    )
    .unwrap_err();
    assert!(matches!(err, CloneError::OpenSource { .. }), "{err:?}");
    assert!(!s.path("x.img").exists());
    // A symlink planted at the destination is not followed either.
    std::os::unix::fs::symlink("/tmp/should-not-exist", s.path("dst.img")).unwrap();
    let err = reflink(
        d.as_fd(),
        Path::new("real.img"),
        d.as_fd(),
        Path::new("dst.img"),
    )
    .unwrap_err();
    assert!(matches!(err, CloneError::CreateTarget { .. }), "{err:?}");
    assert!(!Path::new("/tmp/should-not-exist").exists());
    // Names are names, not paths.
    let err = reflink(
        d.as_fd(),
        Path::new("../real.img"),
        d.as_fd(),
        Path::new("y.img"),
    )
    .unwrap_err();
    assert!(matches!(err, CloneError::BadName { .. }), "{err:?}");
}

#[test]
fn clone_across_filesystems_is_refused_and_leaves_nothing() {
    let x = Fs::Xfs.scratch("xdev");
    let b = Fs::Btrfs.scratch("xdev");
    std::fs::write(x.path("a.img"), vec![1u8; 65536]).unwrap();
    let (dx, db) = (open_dir(&x.dir), open_dir(&b.dir));
    let err = reflink(
        dx.as_fd(),
        Path::new("a.img"),
        db.as_fd(),
        Path::new("a.img"),
    );
    // EXDEV: the filesystem cannot clone across, the clone is refused as
    // such (not as a failed open or create).
    match err {
        Err(CloneError::Unsupported { ref source, .. }) => assert_eq!(
            source.raw_os_error(),
            Some(rustix::io::Errno::XDEV.raw_os_error()),
            "{err:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(!b.path("a.img").exists());
}

/// The OCFS2 reflink ioctl reaches the kernel on the host too: XFS does
/// not know it (ENOTTY), so the clone is refused as unsupported and
/// nothing is left behind. (The ioctl doing its work is checked on OCFS2,
/// in the guest: `ocfs2_guest`.)
#[test]
fn ocfs2_reflink_ioctl_on_xfs_is_refused_as_unsupported() {
    let x = Fs::Xfs.scratch("ocfs2-ioctl");
    std::fs::write(x.path("a.img"), vec![1u8; 65536]).unwrap();
    let d = open_dir(&x.dir);
    let mut called = false;
    let err = reflink_with(
        d.as_fd(),
        Path::new("a.img"),
        d.as_fd(),
        Path::new("b.img"),
        ClonePolicy::Ocfs2Reflink,
        &mut || called = true,
    );
    assert!(called, "the OCFS2 ioctl was not tried");
    assert!(
        matches!(err, Err(CloneError::Unsupported { .. })),
        "{err:?}"
    );
    assert!(!x.path("b.img").exists());
    assert_eq!(std::fs::read(x.path("a.img")).unwrap(), vec![1u8; 65536]);
}

/// More than 100,000 extents, read in many FIEMAP batches: every other 4 KiB
/// block of a preallocated file punched out.
#[test]
fn fiemap_reads_more_than_100k_extents() {
    fiemap_100k(Fs::Xfs);
}

pub(crate) fn fiemap_100k(fs: Fs) {
    let s = fs.scratch("fiemap-many");
    let p = s.path("many.img");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    const N: u64 = 100_100;
    rustix::fs::fallocate(&f, FallocateFlags::empty(), 0, 2 * N * BLOCK).unwrap();
    for i in 0..N {
        punch(&f, (2 * i + 1) * BLOCK, BLOCK);
    }
    let m = extent_map(&f, true).unwrap();
    assert_eq!(m.len() as u64, N);
    for (i, e) in m.extents().iter().enumerate() {
        assert_eq!(e.logical, 2 * i as u64 * BLOCK);
        assert_eq!(e.length, BLOCK);
        assert!(e.flags & flags::UNWRITTEN != 0);
    }
    // Tiny batches restart mid-file many times and agree.
    let small = extent_map_batched(&f, false, 7).unwrap();
    assert_eq!(small.extents(), m.extents());
}

/// The kinds of filesystem the property test runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    Xfs,
    Btrfs,
    /// btrfs with zstd compression on the folder: ENCODED extents.
    BtrfsCompressed,
    /// OCFS2 in a QEMU guest, cloned with `policy`.
    Ocfs2(ClonePolicy),
    /// The guest's second OCFS2, with 128 KiB clusters (the cluster size
    /// of `mkfs.ocfs2 -T vmstore`, the VM-image profile), cloned with
    /// `FICLONE`.
    Ocfs2Clusters128k,
}

/// What the trials change between the two clones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// Writes (1 B to 1 MiB), punches, zero ranges, appends on a random
    /// sparse file; odd seeds add content-preserving remaps.
    Mixed,
    /// A database-like guest: 4 KiB-aligned writes of 4 or 8 KiB of random
    /// bytes at random places of a dense file (every block data).
    Random4k,
}

/// Trials per filesystem: `COE_PROPTEST_SEEDS` (default 16) on the host,
/// `COE_OCFS2_PROPTEST_SEEDS` (default 8) in the slower OCFS2 guest.
fn seeds(target: Target) -> u64 {
    let (var, default) = match target {
        Target::Ocfs2(_) | Target::Ocfs2Clusters128k => ("COE_OCFS2_PROPTEST_SEEDS", 8),
        _ => ("COE_PROPTEST_SEEDS", 16),
    };
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn random_bytes(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
    // Compressible and incompressible data both, so btrfs compresses some.
    if rng.bool() {
        vec![rng.u8(1..=255); n]
    } else {
        let mut v = vec![0u8; n];
        rng.fill(&mut v);
        v
    }
}

fn random_len(rng: &mut fastrand::Rng) -> u64 {
    match rng.u8(0..4) {
        0 => rng.u64(1..64),
        1 => BLOCK * rng.u64(1..16),
        2 => rng.u64(1..(256 << 10)),
        _ => rng.u64(1..=(1 << 20)),
    }
}

fn random_offset(rng: &mut fastrand::Rng, size: u64) -> u64 {
    let off = rng.u64(0..size.max(1));
    if rng.bool() {
        off / BLOCK * BLOCK
    } else {
        off
    }
}

/// Makes the source disk: random data, holes, fallocated ranges.
fn make_source(rng: &mut fastrand::Rng, f: &File) -> u64 {
    let size = BLOCK * rng.u64(256..6144) + rng.u64(0..BLOCK);
    f.set_len(size).unwrap();
    for _ in 0..rng.usize(4..40) {
        let off = random_offset(rng, size);
        let len = random_len(rng).min(size - off);
        if rng.u8(0..4) == 0 {
            rustix::fs::fallocate(f, FallocateFlags::KEEP_SIZE, off, len.max(1)).unwrap();
        } else {
            f.write_all_at(&random_bytes(rng, len as usize), off)
                .unwrap();
        }
    }
    size
}

/// The disk of a database-like guest: 2 to 8 MiB, every block data
/// (random bytes, some runs of one byte value), no hole.
fn make_dense_source(rng: &mut fastrand::Rng, f: &File) -> u64 {
    let size = BLOCK * rng.u64(512..2048);
    let mut off = 0;
    while off < size {
        let len = (BLOCK * rng.u64(1..64)).min(size - off);
        f.write_all_at(&random_bytes(rng, len as usize), off)
            .unwrap();
        off += len;
    }
    size
}

/// 16 to 128 writes of 4 KiB (one in four of 8 KiB) of random bytes at
/// random 4 KiB-aligned offsets inside the file: the random small writes
/// of a database, each of which makes OCFS2 copy at least a whole cluster
/// of the shared extent it lands in.
fn mutate_random_4k(rng: &mut fastrand::Rng, f: &File, size: u64) {
    let blocks = size / BLOCK;
    for _ in 0..rng.usize(16..128) {
        let n = if rng.u8(0..4) == 0 { 2 } else { 1 };
        let at = rng.u64(0..blocks - n + 1);
        let mut buf = vec![0u8; (n * BLOCK) as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, at * BLOCK).unwrap();
    }
}

/// Random changes: writes, overwrites, punches, zero ranges, appends; with
/// `remaps`, also changes of mapping that keep the content (zeros written
/// over zeros, a range rewritten with its own bytes), which any map-based
/// rule must report and which therefore count as over-report.
fn mutate(rng: &mut fastrand::Rng, f: &File, mut size: u64, remaps: bool) {
    for _ in 0..rng.usize(1..30) {
        let off = random_offset(rng, size);
        let len = random_len(rng);
        match rng.u8(0..if remaps { 10 } else { 8 }) {
            0..=4 => f
                .write_all_at(&random_bytes(rng, len as usize), off)
                .unwrap(),
            5 => punch(f, off, len),
            6 => zero_range(f, off, len),
            7 => {
                // Append past the end.
                f.write_all_at(
                    &random_bytes(rng, len as usize),
                    size + rng.u64(0..2 * BLOCK),
                )
                .unwrap();
            }
            8 => {
                // Zeros written over data: the content may not change, the
                // mapping does.
                f.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
            _ => {
                // Rewrite a range with its own bytes.
                let mut buf = vec![0u8; len.min(size - off) as usize];
                f.read_exact_at(&mut buf, off).unwrap();
                f.write_all_at(&buf, off).unwrap();
            }
        }
        size = f.metadata().unwrap().len();
    }
}

/// `FALLOC_FL_ZERO_RANGE`; where the filesystem has none (OCFS2 answers
/// EOPNOTSUPP), what it amounts to: a hole punched and unwritten extents
/// allocated in it.
fn zero_range(f: &File, off: u64, len: u64) {
    let flags = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(f, flags, off, len) {
        Ok(()) => {}
        Err(rustix::io::Errno::OPNOTSUPP) => {
            punch(f, off, len);
            rustix::fs::fallocate(f, FallocateFlags::KEEP_SIZE, off, len).unwrap();
        }
        Err(e) => panic!("fallocate ZERO_RANGE: {e}"),
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    reported: u64,
    /// Of `reported`, the bytes of zeroed ranges (sent as zero records,
    /// no data).
    reported_zeroed: u64,
    changed_blocks_bytes: u64,
    changed_bytes: u64,
    encoded_extents: u64,
    /// Bytes read from each snapshot to refine by content.
    candidates: u64,
    /// Seconds spent refining (reads and compares).
    refine_secs: f64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.reported += o.reported;
        self.reported_zeroed += o.reported_zeroed;
        self.changed_blocks_bytes += o.changed_blocks_bytes;
        self.changed_bytes += o.changed_bytes;
        self.encoded_extents += o.encoded_extents;
        self.candidates += o.candidates;
        self.refine_secs += o.refine_secs;
    }

    fn ratio(&self) -> f64 {
        self.reported as f64 / self.changed_blocks_bytes.max(1) as f64
    }
}

fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn run_trial(dir: &Path, seed: u64, workload: Workload, policy: ClonePolicy, exact: bool) -> Tally {
    let mut tally = Tally::default();
    let mut rng = fastrand::Rng::with_seed(seed);
    let src = dir.join("src.img");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&src)
        .unwrap();
    let size = match workload {
        Workload::Mixed => make_source(&mut rng, &f),
        Workload::Random4k => make_dense_source(&mut rng, &f),
    };
    clone_with(dir, "src.img", "a.img", policy);
    match workload {
        // Odd seeds add content-preserving remaps.
        Workload::Mixed => mutate(&mut rng, &f, size, seed % 2 == 1),
        Workload::Random4k => mutate_random_4k(&mut rng, &f, size),
    }
    clone_with(dir, "src.img", "b.img", policy);
    drop(f);

    let (ma, mb) = (map_of(&dir.join("a.img")), map_of(&dir.join("b.img")));
    let d = if exact {
        // As the manager does: maps clipped to the sizes, then refined by
        // content (snapshot::exact).
        let (fa, fb) = (
            File::open(dir.join("a.img")).unwrap(),
            File::open(dir.join("b.img")).unwrap(),
        );
        let (sa, sb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
        let before = ma.clip(sa.min(sb));
        let d = diff(&before, &mb.clip(sb));
        let started = std::time::Instant::now();
        let (d, read) = refine_diff(&fa, &fb, d, &Cancel::default()).unwrap();
        tally.refine_secs += started.elapsed().as_secs_f64();
        tally.candidates += read;
        d
    } else {
        diff(&ma, &mb)
    };
    tally.encoded_extents += mb
        .extents()
        .iter()
        .filter(|e| e.flags & flags::ENCODED != 0)
        .count() as u64;
    let (a, b) = (read_all(&dir.join("a.img")), read_all(&dir.join("b.img")));

    let mut covered = vec![false; b.len()];
    let mut mark = |start: u64, len: u64| {
        let end = (start + len).min(b.len() as u64);
        covered[start.min(end) as usize..end as usize].fill(true);
        tally.reported += end.saturating_sub(start);
    };
    for c in &d.changed {
        mark(c.logical, c.length);
    }
    for z in &d.zeroed {
        mark(z.start, z.length);
        tally.reported_zeroed += (z.start + z.length)
            .min(b.len() as u64)
            .saturating_sub(z.start);
    }
    // A range reported as zeroed is written as zeros by the client (or left
    // a hole): B must read zero there, or the replica would get zeros where
    // B has data.
    let zeros = [0u8; BLOCK as usize];
    for z in &d.zeroed {
        let end = (z.start + z.length).min(b.len() as u64) as usize;
        let range = &b[(z.start as usize).min(end)..end];
        // Whole blocks compared at once (memcmp), the bytes of one that
        // differs looked at to name the first.
        if let Some(i) = range
            .chunks(BLOCK as usize)
            .position(|c| c != &zeros[..c.len()])
            .and_then(|k| {
                let at = k * BLOCK as usize;
                range[at..].iter().position(|&x| x != 0).map(|j| at + j)
            })
            .map(|j| z.start + j as u64)
        {
            panic!(
                "seed {seed}: byte {i} is reported zeroed but B reads {:#x} there\n\
                 a map: {ma:?}\nb map: {mb:?}\ndiff: {d:?}",
                b[i as usize]
            );
        }
    }
    // A replica of A grown to B's size reads zeros past A's end.
    let a_at = |i: usize| a.get(i).copied().unwrap_or(0);
    for (blk, chunk) in b.chunks(BLOCK as usize).enumerate() {
        let base = blk * BLOCK as usize;
        // An unchanged block compared at once (memcmp: the byte loop below
        // dominates a debug build's time in the guest otherwise).
        if a.get(base..base + chunk.len()) == Some(chunk)
            || (base >= a.len() && chunk == &zeros[..chunk.len()])
        {
            continue;
        }
        let mut block_changed = false;
        for (j, &byte) in chunk.iter().enumerate() {
            let i = base + j;
            if byte != a_at(i) {
                block_changed = true;
                tally.changed_bytes += 1;
                assert!(
                    covered[i],
                    "seed {seed}: byte {i} differs (a={:#x} b={byte:#x}) but the diff missed it\n\
                     a map: {ma:?}\nb map: {mb:?}\ndiff: {d:?}",
                    a_at(i)
                );
            }
        }
        if block_changed {
            tally.changed_blocks_bytes += chunk.len() as u64;
        }
    }
    for name in ["src.img", "a.img", "b.img"] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    tally
}

pub(crate) fn property(target: Target) {
    property_with(target, Workload::Mixed, false);
}

/// The property with the diff refined by content (#19): still 0 bytes
/// missed, and the over-report down to block rounding.
pub(crate) fn property_exact(target: Target) {
    property_with(target, Workload::Mixed, true);
}

/// The property on random 4 KiB writes into a dense disk, refined by
/// content or not (#19): 0 bytes missed, the over-report asserted.
pub(crate) fn property_random_4k(target: Target, exact: bool) {
    property_with(target, Workload::Random4k, exact);
}

fn property_with(target: Target, workload: Workload, exact: bool) {
    let policy = match target {
        Target::Ocfs2(p) => p,
        _ => ClonePolicy::Auto,
    };
    let s = match target {
        Target::Ocfs2(_) => Fs::Ocfs2.scratch("prop"),
        Target::Ocfs2Clusters128k => Fs::Ocfs2Clusters128k.scratch("prop"),
        Target::Xfs => Fs::Xfs.scratch("prop"),
        Target::Btrfs => Fs::Btrfs.scratch("prop"),
        Target::BtrfsCompressed => {
            let s = Fs::Btrfs.scratch("prop-zstd");
            let st = std::process::Command::new("btrfs")
                .args(["property", "set"])
                .arg(&s.dir)
                .args(["compression", "zstd"])
                .status()
                .expect("btrfs-progs is needed: run scripts/test.sh");
            assert!(st.success(), "cannot enable btrfs compression");
            s
        }
    };
    // Mixed, even seeds: writes, punches, zero ranges, appends only (the
    // workload the over-report ratio is quoted for); odd seeds add
    // content-preserving remaps. Misses are checked on both. Random 4 KiB
    // writes: every seed alike.
    let (mut plain, mut remapped) = (Tally::default(), Tally::default());
    for seed in 0..seeds(target) {
        let t = run_trial(&s.dir, 0x5eed_0000 + seed, workload, policy, exact);
        if workload == Workload::Mixed && seed % 2 == 1 {
            remapped.add(t)
        } else {
            plain.add(t)
        }
    }
    let mut all = plain;
    all.add(remapped);
    let what = match workload {
        Workload::Mixed => "writes/punches/zero-ranges/appends",
        Workload::Random4k => "random 4 KiB writes",
    };
    let remap_note = match workload {
        Workload::Mixed => format!(", {:.3}x with content-preserving remaps", remapped.ratio()),
        Workload::Random4k => String::new(),
    };
    println!(
        "diff property on {target:?}{}: {} seeds, 0 bytes missed; over-report by 4 KiB block: \
         {:.3}x on {what} ({} reported, {} of them zeroed ranges / {} changed){remap_note}; {} \
         bytes differed; {} encoded extents seen; {} candidate bytes read per snapshot, refined \
         in {:.3} s ({:.1} s/GiB of candidates)",
        if exact { " refined by content" } else { "" },
        seeds(target),
        plain.ratio(),
        plain.reported,
        plain.reported_zeroed,
        plain.changed_blocks_bytes,
        all.changed_bytes,
        all.encoded_extents,
        all.candidates,
        all.refine_secs,
        all.refine_secs / (all.candidates.max(1) as f64 / f64::from(1u32 << 30)),
    );
    assert!(
        all.changed_bytes > 0,
        "the trials changed nothing: the test is broken"
    );
    // Over-report is allowed but bounded (SEMANTICS.md §2: "close to 1",
    // block rounding only). Measured at 1.01-1.06x on plain changes and
    // about 1.19x with remaps; a diff reporting all of B's data as changed
    // measured 2.2x and 2.4x. Compressed btrfs extents are reported whole,
    // hence their margin. OCFS2 copies a shared extent on write in runs
    // longer than the write (`ocfs2_refcount_cal_cow_clusters`), and has no
    // zero range (punch + unwritten instead): measured 1.40x plain and 1.46x
    // with remaps over 8 seeds, hence its margins (4 KiB clusters; 1.92x
    // with 128 KiB clusters, which is only tested refined).
    //
    // Refined by content, only block rounding is left inside both files;
    // appends past the older end are not refined.
    //
    // Random 4 KiB writes change whole aligned blocks: XFS and btrfs map
    // them exactly (1.00x). OCFS2 copies at least a cluster per write, so
    // unrefined its over-report is a property of the cluster size, not
    // bounded here; refined it must be block-exact (1.05x).
    let (plain_bound, remap_bound) = match (target, workload) {
        _ if exact => (1.05, 1.05),
        (Target::Ocfs2Clusters128k, _) => panic!("128 KiB clusters are only tested refined"),
        (_, Workload::Random4k) => match target {
            Target::Ocfs2(_) => (f64::INFINITY, 0.0),
            _ => (1.05, 0.0),
        },
        (Target::Xfs | Target::Btrfs, _) => (1.25, 1.6),
        (Target::BtrfsCompressed, _) => (1.5, 1.6),
        (Target::Ocfs2(_), _) => (1.75, 1.9),
    };
    assert!(
        plain.ratio() <= plain_bound,
        "over-report {:.3}x on {what} exceeds {plain_bound}x",
        plain.ratio()
    );
    if workload == Workload::Mixed {
        assert!(
            remapped.ratio() <= remap_bound,
            "over-report {:.3}x with content-preserving remaps exceeds {remap_bound}x",
            remapped.ratio()
        );
    }
    if matches!(target, Target::BtrfsCompressed) {
        assert!(
            all.encoded_extents > 0,
            "btrfs compression made no encoded extent"
        );
    }
}

#[test]
fn diff_never_misses_a_changed_byte_xfs() {
    property(Target::Xfs);
}

#[test]
fn diff_never_misses_a_changed_byte_btrfs() {
    property(Target::Btrfs);
}

#[test]
fn diff_exact_never_misses_a_changed_byte_xfs() {
    property_exact(Target::Xfs);
}

#[test]
fn diff_exact_never_misses_a_changed_byte_btrfs() {
    property_exact(Target::Btrfs);
}

#[test]
fn diff_never_misses_a_changed_byte_btrfs_compressed() {
    property(Target::BtrfsCompressed);
}

#[test]
fn diff_random_4k_writes_xfs() {
    property_random_4k(Target::Xfs, false);
}

#[test]
fn diff_random_4k_writes_btrfs() {
    property_random_4k(Target::Btrfs, false);
}

#[test]
fn diff_exact_random_4k_writes_xfs() {
    property_random_4k(Target::Xfs, true);
}

#[test]
fn diff_exact_random_4k_writes_btrfs() {
    property_random_4k(Target::Btrfs, true);
}

/// Compressed extents are reported whole by the maps (1.5x allowed);
/// refined by content, block rounding only.
#[test]
fn diff_exact_never_misses_a_changed_byte_btrfs_compressed() {
    property_exact(Target::BtrfsCompressed);
}
