//! The snapshot manager through its API, on real XFS and btrfs and real
//! LMDB: diffs that rebuild a replica byte for byte, the error cases of
//! API.md, concurrency, failure cleanup, ENOSPC, a full map, rebuild and
//! reconcile.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use coriolis_ovm_exporter::ovm::{Disk, InventoryError, Repository, Vm};
use coriolis_ovm_exporter::snapshot::{Action, Manager, SnapshotError, StoreConfig, VmLookup};
use coriolis_ovm_exporter::store::SNAPSHOTS_DIR;
use coriolis_ovm_exporter::wire::{GetOptions, Snapshot};

use crate::common::{Fs, Scratch};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A stand-in inventory: VMs set by the test.
#[derive(Default)]
pub struct Inventory {
    vms: Mutex<HashMap<String, Vm>>,
}

impl Inventory {
    pub fn set(&self, vm: Vm) {
        self.vms.lock().unwrap().insert(vm.name.clone(), vm);
    }
}

impl VmLookup for Inventory {
    fn vm(&self, name: &str) -> Result<Option<Vm>, InventoryError> {
        Ok(self.vms.lock().unwrap().get(name).cloned())
    }
}

pub fn repository(mount: &Path) -> Repository {
    Repository {
        id: "repo".into(),
        mount_point: mount.to_path_buf(),
        filesystem: "test".into(),
        alias: "repo".into(),
    }
}

/// A VM whose disks are `<repo>/VirtualDisks/<name>` (created if missing).
pub fn vm_with(repo: &Path, name: &str, disks: &[&str]) -> Vm {
    std::fs::create_dir_all(repo.join("VirtualDisks")).unwrap();
    Vm {
        name: name.into(),
        uuid: format!("uuid-{name}"),
        friendly_name: name.into(),
        disks: disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let path = repo.join("VirtualDisks").join(d);
                if !path.exists() {
                    File::create(&path).unwrap();
                }
                Disk {
                    name: (*d).into(),
                    path,
                    device_name: format!("xvd{}", (b'a' + i as u8) as char),
                    mode: "w".into(),
                    repository: Some(repository(repo)),
                    snapshot_compatible: true,
                    incompatible_reason: None,
                }
            })
            .collect(),
    }
}

pub fn config() -> StoreConfig {
    StoreConfig {
        owner: Some("test-owner".into()),
        ..StoreConfig::default()
    }
}

struct Setup {
    scratch: Scratch,
    inv: Arc<Inventory>,
    mgr: Manager,
}

impl Setup {
    fn new(fs: Fs, tag: &str) -> Setup {
        Self::with_config(fs, tag, config())
    }

    fn with_config(fs: Fs, tag: &str, cfg: StoreConfig) -> Setup {
        let scratch = fs.scratch(tag);
        std::fs::create_dir_all(scratch.path("repo")).unwrap();
        let inv = Arc::new(Inventory::default());
        let mgr = Manager::open(&scratch.path("db/exporter.db"), &cfg, inv.clone()).unwrap();
        Setup { scratch, inv, mgr }
    }

    fn repo(&self) -> PathBuf {
        self.scratch.path("repo")
    }

    fn snapshot_folders(&self) -> Vec<String> {
        folders(&self.repo())
    }
}

pub fn folders(repo: &Path) -> Vec<String> {
    match std::fs::read_dir(repo.join(SNAPSHOTS_DIR)) {
        Ok(rd) => {
            // Every entry but the catalog's generation token: a staging or
            // trash folder left behind shows up.
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".coriolis-generation")
                .collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot list {}: {e}", repo.display()),
    }
}

fn read_all(mut f: File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// Writes random data into `path` at random places, leaving holes.
fn fill_random(path: &Path, size: u64, rng: &mut fastrand::Rng) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    let mut pos = 0;
    while pos < size {
        let len = (rng.u64(1..32) * 16 * KIB).min(size - pos);
        if rng.u8(0..4) != 0 {
            let buf: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            f.write_all_at(&buf, pos).unwrap();
        }
        pos += len;
    }
    f.sync_all().unwrap();
}

fn fallocate(f: &File, flags: rustix::fs::FallocateFlags, off: u64, len: u64) {
    rustix::fs::fallocate(f, flags, off, len).unwrap();
}

/// Random changes of SEMANTICS.md §2's trials: writes (aligned or not),
/// hole punches, zero-range fallocates, appends, and now and then a
/// truncation.
fn mutate(path: &Path, rng: &mut fastrand::Rng, ops: usize) {
    use rustix::fs::FallocateFlags as F;
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for _ in 0..ops {
        let size = f.metadata().unwrap().len().max(4096);
        match rng.u8(0..10) {
            0..=3 => {
                let off = if rng.bool() {
                    rng.u64(0..size / 4096) * 4096
                } else {
                    rng.u64(0..size)
                };
                let len = rng.u64(1..64 * KIB);
                let buf: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                f.write_all_at(&buf, off).unwrap();
            }
            4 | 5 => {
                let off = rng.u64(0..size / 4096) * 4096;
                fallocate(&f, F::PUNCH_HOLE | F::KEEP_SIZE, off, rng.u64(1..64) * 4096);
            }
            6 | 7 => {
                let off = rng.u64(0..size);
                fallocate(&f, F::ZERO_RANGE | F::KEEP_SIZE, off, rng.u64(1..256 * KIB));
            }
            8 => {
                let len = rng.u64(1..128 * KIB);
                let buf: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                f.write_all_at(&buf, size).unwrap();
            }
            _ => {
                if rng.u8(0..3) == 0 {
                    f.set_len(size - rng.u64(0..size / 8)).unwrap();
                }
            }
        }
    }
    f.sync_all().unwrap();
}

/// Applies a diff answer to replicas of the older snapshot, as a client
/// would: copy every chunk from the newer snapshot, zero the `zeroed`
/// ranges when they are separate, set the size.
fn apply(mgr: &Manager, vm: &str, diff: &Snapshot, replicas: &Path, zero_separately: bool) {
    for d in &diff.disks {
        let (src, size) = mgr.open_disk(vm, &diff.id, &d.name).unwrap();
        assert_eq!(Some(size), d.size);
        let dst = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(replicas.join(&d.name))
            .unwrap();
        for c in &d.chunks {
            assert!(
                c.start + c.length <= size,
                "chunk {c:?} past the end {size}"
            );
            let mut buf = vec![0u8; c.length as usize];
            src.read_exact_at(&mut buf, c.start).unwrap();
            dst.write_all_at(&buf, c.start).unwrap();
        }
        if zero_separately {
            for z in d.zeroed.as_ref().unwrap() {
                assert!(
                    z.start + z.length <= size,
                    "zeroed {z:?} past the end {size}"
                );
                dst.write_all_at(&vec![0u8; z.length as usize], z.start)
                    .unwrap();
            }
        }
        dst.set_len(size).unwrap();
    }
}

/// The two sides of a disk's diff: the bytes of disk `name` in `snap`
/// (none when it had no such disk), and of the disk's file `now`.
fn before_and_after(snap: &Snapshot, name: &str, now: &Path) -> (Vec<u8>, Vec<u8>) {
    let before = snap
        .disks
        .iter()
        .find(|x| x.name == name)
        .map_or(PathBuf::from("/dev/null"), |x| PathBuf::from(&x.path));
    (std::fs::read(before).unwrap(), std::fs::read(now).unwrap())
}

/// Bytes in 4 KiB blocks that differ between two contents (beyond the end
/// reads as zeros): what a perfect diff at block granularity would report.
fn changed_block_bytes(a: &[u8], b: &[u8]) -> u64 {
    let n = b.len();
    let mut changed = 0;
    for start in (0..n).step_by(4096) {
        let end = (start + 4096).min(n);
        let av = |i: usize| a.get(i).copied().unwrap_or(0);
        if (start..end).any(|i| av(i) != b[i]) {
            changed += (end - start) as u64;
        }
    }
    changed
}

fn diff_reproduces_the_newer_snapshot(fs: Fs) {
    let s = Setup::new(fs, "snap-diff");
    let repo = s.repo();
    let mut rng = fastrand::Rng::with_seed(0xC0FFEE ^ fs as u64);
    let mut reported_total = 0u64;
    let mut changed_total = 0u64;
    let (mut exact_reported, mut exact_changed) = (0u64, 0u64);
    for trial in 0..4 {
        let vm_name = format!("vm{trial}");
        let a_name = format!("a{trial}.img");
        let b_name = format!("b{trial}.img");
        let c_name = format!("c{trial}.img");
        let vm = vm_with(&repo, &vm_name, &[&a_name, &b_name]);
        fill_random(&vm.disks[0].path, 24 * MIB, &mut rng);
        fill_random(&vm.disks[1].path, 3 * MIB + 123, &mut rng);
        s.inv.set(vm.clone());
        let s1 = s.mgr.create(&vm_name).unwrap();
        assert_eq!(s1.disks.len(), 2);
        assert_eq!(s1.disks[1].file_size, 3 * MIB + 123);
        for d in &s1.disks {
            for c in &d.chunks {
                assert!(
                    c.start + c.length <= d.file_size,
                    "{c:?} past the end of {}",
                    d.name
                );
            }
        }

        for d in &vm.disks {
            mutate(&d.path, &mut rng, 40);
        }
        // A disk added between the snapshots is reported whole.
        let vm2 = vm_with(&repo, &vm_name, &[&a_name, &b_name, &c_name]);
        fill_random(&vm2.disks[2].path, 2 * MIB, &mut rng);
        s.inv.set(vm2.clone());
        let s2 = s.mgr.create(&vm_name).unwrap();

        // Refined by content (#19) too: a replica applied from the refined
        // diff must be byte-identical as well.
        for (zero_separately, exact) in [(false, None), (true, None), (true, Some(true))] {
            let replicas = s
                .scratch
                .path(&format!("replica-{trial}-{zero_separately}-{exact:?}"));
            std::fs::create_dir_all(&replicas).unwrap();
            for d in &s1.disks {
                let (f, size) = s.mgr.open_disk(&vm_name, &s1.id, &d.name).unwrap();
                let bytes = read_all(f);
                assert_eq!(bytes.len() as u64, size);
                std::fs::write(replicas.join(&d.name), bytes).unwrap();
            }
            let diff = s
                .mgr
                .get(
                    &vm_name,
                    &s2.id,
                    &GetOptions {
                        compare_to: Some(s1.id.clone()),
                        zeroed_separate: zero_separately,
                        exact,
                        ..GetOptions::default()
                    },
                )
                .unwrap();
            if exact.is_some() {
                for (d, dd) in vm2.disks.iter().zip(&diff.disks) {
                    let (before, after) = before_and_after(&s1, &d.name, &d.path);
                    exact_changed += changed_block_bytes(&before, &after);
                    exact_reported += dd.chunks.iter().map(|c| c.length).sum::<u64>()
                        + dd.zeroed.iter().flatten().map(|z| z.length).sum::<u64>();
                }
            }
            apply(&s.mgr, &vm_name, &diff, &replicas, zero_separately);
            for d in &vm2.disks {
                let want = std::fs::read(&d.path).unwrap();
                let got = std::fs::read(replicas.join(&d.name)).unwrap();
                assert_eq!(
                    got.len(),
                    want.len(),
                    "{fs:?} trial {trial} disk {}",
                    d.name
                );
                assert!(
                    got == want,
                    "{fs:?} trial {trial}: replica of {} differs",
                    d.name
                );
                let (snap, _) = s.mgr.open_disk(&vm_name, &s2.id, &d.name).unwrap();
                assert!(
                    read_all(snap) == want,
                    "snapshot file of {} differs",
                    d.name
                );
            }
            if !zero_separately && exact.is_none() {
                for (d, dd) in vm2.disks.iter().zip(&diff.disks) {
                    let (before, after) = before_and_after(&s1, &d.name, &d.path);
                    changed_total += changed_block_bytes(&before, &after);
                    reported_total += dd.chunks.iter().map(|c| c.length).sum::<u64>();
                }
            }
        }
    }
    let ratio = reported_total as f64 / changed_total.max(1) as f64;
    eprintln!(
        "{fs:?}: reported {reported_total} bytes for {changed_total} changed (block granularity): {ratio:.3}x"
    );
    assert!(changed_total > 0);
    // The diff must be incremental: over-reporting stays close to 1
    // (filesystem block and extent rounding only).
    assert!(ratio < 1.6, "{fs:?} over-reports {ratio:.2}x");
    let exact_ratio = exact_reported as f64 / exact_changed.max(1) as f64;
    eprintln!("{fs:?}: refined by content: {exact_ratio:.3}x");
    assert!(
        exact_ratio < 1.3,
        "{fs:?} over-reports {exact_ratio:.2}x refined by content"
    );
}

#[test]
fn diff_reproduces_the_newer_snapshot_xfs() {
    diff_reproduces_the_newer_snapshot(Fs::Xfs);
}

#[test]
fn diff_reproduces_the_newer_snapshot_btrfs() {
    diff_reproduces_the_newer_snapshot(Fs::Btrfs);
}

#[test]
fn api_errors_ordering_delete_and_purge() {
    let s = Setup::new(Fs::Xfs, "snap-api");
    let repo = s.repo();
    let vm = vm_with(&repo, "vmA", &["a.img"]);
    fill_random(&vm.disks[0].path, 2 * MIB, &mut fastrand::Rng::with_seed(1));
    s.inv.set(vm);
    s.inv.set(vm_with(&repo, "vmB", &["b.img"]));

    assert!(matches!(
        s.mgr.create("nope"),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(matches!(
        s.mgr.list("nope"),
        Err(SnapshotError::NotFound { .. })
    ));
    assert_eq!(s.mgr.list("vmA").unwrap(), vec![]);

    let a1 = s.mgr.create("vmA").unwrap();
    let a2 = s.mgr.create("vmA").unwrap();
    let a3 = s.mgr.create("vmA").unwrap();
    let b1 = s.mgr.create("vmB").unwrap();
    assert_eq!(
        s.mgr.ids("vmA").unwrap(),
        vec![a1.id.clone(), a2.id.clone(), a3.id.clone()]
    );
    let listed: Vec<String> = s
        .mgr
        .list("vmA")
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(listed, s.mgr.ids("vmA").unwrap());
    assert!(uuid::Uuid::parse_str(&a1.id).unwrap().get_version_num() == 4);

    // The snapshot JSON of API.md.
    let d = &a1.disks[0];
    assert_eq!(d.snapshot_id, a1.id);
    assert_eq!(d.repo_mountpoint, repo.to_string_lossy());
    assert_eq!(
        PathBuf::from(&d.path),
        repo.join(SNAPSHOTS_DIR).join(&a1.id).join("a.img")
    );
    assert!(!d.chunks.is_empty());
    let got = s.mgr.get("vmA", &a1.id, &GetOptions::default()).unwrap();
    assert_eq!(got.id, a1.id);
    assert!(got.disks[0].size.is_none() && got.disks[0].zeroed.is_none());

    let opts = |base: &str| GetOptions {
        compare_to: Some(base.into()),
        ..GetOptions::default()
    };
    let unknown = uuid::Uuid::new_v4().to_string();
    for (r, what) in [
        (
            s.mgr.get("vmA", &unknown, &GetOptions::default()),
            "unknown snap",
        ),
        (
            s.mgr.get("vmA", "../../etc/passwd", &GetOptions::default()),
            "path as id",
        ),
    ] {
        assert!(
            matches!(r, Err(SnapshotError::NotFound { .. })),
            "{what}: {r:?}"
        );
    }
    // An unknown base is a base a client cannot use: a full copy is needed.
    let r = s.mgr.get("vmA", &a2.id, &opts(&unknown));
    match &r {
        Err(e @ SnapshotError::BaseUnavailable { .. }) => {
            assert_eq!(e.code(), Some("base_unavailable"));
            assert!(e.to_string().contains("full copy"), "{e}");
        }
        other => panic!("unknown base: {other:?}"),
    }
    assert!(matches!(
        s.mgr.get("vmB", &a1.id, &GetOptions::default()),
        Err(SnapshotError::Conflict { .. })
    ));
    assert!(matches!(
        s.mgr.get("vmA", &a2.id, &opts(&b1.id)),
        Err(SnapshotError::Conflict { .. })
    ));
    assert!(matches!(
        s.mgr.get("vmA", &a1.id, &opts(&a2.id)),
        Err(SnapshotError::BadRequest { .. })
    ));
    assert!(matches!(
        s.mgr.get("vmA", &a1.id, &opts(&a1.id)),
        Err(SnapshotError::BadRequest { .. })
    ));
    // Unchanged disk: an empty diff.
    let same = s.mgr.get("vmA", &a2.id, &opts(&a1.id)).unwrap();
    assert_eq!(same.disks[0].chunks, vec![]);
    assert_eq!(same.disks[0].size, Some(2 * MIB));

    assert!(matches!(
        s.mgr.open_disk("vmA", &a1.id, "b.img"),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(matches!(
        s.mgr.open_disk("vmB", &a1.id, "a.img"),
        Err(SnapshotError::Conflict { .. })
    ));

    // A download in progress survives the delete.
    let (open, size) = s.mgr.open_disk("vmA", &a1.id, "a.img").unwrap();
    assert!(matches!(
        s.mgr.delete("vmB", &a1.id),
        Err(SnapshotError::Conflict { .. })
    ));
    s.mgr.delete("vmA", &a1.id).unwrap();
    s.mgr.delete("vmA", &a1.id).unwrap(); // idempotent
    s.mgr.delete("vmA", &unknown).unwrap();
    s.mgr.delete("vmA", "not-even-a-uuid").unwrap();
    assert_eq!(read_all(open).len() as u64, size);
    assert!(matches!(
        s.mgr.get("vmA", &a1.id, &GetOptions::default()),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(!s.snapshot_folders().contains(&a1.id));
    assert_eq!(
        s.mgr.ids("vmA").unwrap(),
        vec![a2.id.clone(), a3.id.clone()]
    );

    assert_eq!(s.mgr.purge("vmA").unwrap(), 2);
    assert_eq!(s.mgr.ids("vmA").unwrap(), Vec::<String>::new());
    assert_eq!(s.snapshot_folders(), vec![b1.id.clone()]);
    assert_eq!(s.mgr.ids("vmB").unwrap(), vec![b1.id]);
}

#[test]
fn a_diff_against_a_changed_or_missing_base_is_refused() {
    let s = Setup::new(Fs::Xfs, "snap-base");
    let vm = vm_with(&s.repo(), "vm", &["a.img", "b.img"]);
    for d in &vm.disks {
        fill_random(&d.path, MIB, &mut fastrand::Rng::with_seed(2));
    }
    s.inv.set(vm);
    let s1 = s.mgr.create("vm").unwrap();
    let s2 = s.mgr.create("vm").unwrap();
    let opts = GetOptions {
        compare_to: Some(s1.id.clone()),
        ..GetOptions::default()
    };
    s.mgr.get("vm", &s2.id, &opts).unwrap();
    // Someone writes into the base's clone: its map no longer says what is
    // there, so no diff may be computed from it.
    let f = OpenOptions::new()
        .write(true)
        .open(&s1.disks[1].path)
        .unwrap();
    f.write_all_at(b"tampered", 4096).unwrap();
    drop(f);
    match s.mgr.get("vm", &s2.id, &opts) {
        Err(e @ SnapshotError::BaseChanged { .. }) => {
            assert!(matches!(&e, SnapshotError::BaseChanged { disk, .. } if disk == "b.img"));
            assert_eq!(e.code(), Some("base_changed"));
            assert!(e.to_string().contains("full copy"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Its clone gone: the base is unavailable.
    std::fs::remove_file(&s1.disks[1].path).unwrap();
    match s.mgr.get("vm", &s2.id, &opts) {
        Err(e @ SnapshotError::BaseUnavailable { .. }) => {
            assert_eq!(e.code(), Some("base_unavailable"))
        }
        other => panic!("{other:?}"),
    }
    // Reconcile drops the damaged snapshot and its folder.
    let report = s.mgr.reconcile(&[s.repo()]).unwrap();
    assert!(
        report
            .actions
            .iter()
            .any(|a| matches!(a, Action::DroppedRecord { id, reason, .. }
            if *id == s1.id && reason.contains("b.img"))),
        "{report:?}"
    );
    assert_eq!(s.snapshot_folders(), vec![s2.id.clone()]);
    assert_eq!(s.mgr.ids("vm").unwrap(), vec![s2.id]);
}

#[test]
fn an_incompatible_or_failing_disk_creates_nothing() {
    let s = Setup::new(Fs::Xfs, "snap-incompat");
    let mut vm = vm_with(&s.repo(), "vm", &["a.img", "b.img", "c.img"]);
    for d in &vm.disks {
        fill_random(&d.path, MIB, &mut fastrand::Rng::with_seed(3));
    }
    vm.disks[1].snapshot_compatible = false;
    vm.disks[1].incompatible_reason = Some("phy: device".into());
    s.inv.set(vm.clone());
    match s.mgr.create("vm") {
        Err(SnapshotError::Incompatible { disk, reason }) => {
            assert_eq!(disk, "b.img");
            assert_eq!(reason, "phy: device");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.snapshot_folders(), Vec::<String>::new());

    // The third disk vanishes: the clone fails after two were made, and
    // everything made so far is removed; the error names the disk.
    vm.disks[1].snapshot_compatible = true;
    std::fs::remove_file(&vm.disks[2].path).unwrap();
    s.inv.set(vm.clone());
    match s.mgr.create("vm") {
        Err(e @ SnapshotError::Clone { .. }) => {
            assert!(e.to_string().contains("c.img"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.snapshot_folders(), Vec::<String>::new());
    assert_eq!(s.mgr.store().list_all().unwrap(), vec![]);

    // A symlink as a disk is not followed.
    std::os::unix::fs::symlink(&vm.disks[0].path, &vm.disks[2].path).unwrap();
    assert!(matches!(
        s.mgr.create("vm"),
        Err(SnapshotError::Clone { .. })
    ));
    assert_eq!(s.snapshot_folders(), Vec::<String>::new());

    // CoriolisSnapshots replaced by a symlink: refused, nothing written
    // where it points.
    std::fs::remove_file(&vm.disks[2].path).unwrap();
    std::fs::write(&vm.disks[2].path, b"disk c").unwrap();
    let elsewhere = s.scratch.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir(s.repo().join(SNAPSHOTS_DIR)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, s.repo().join(SNAPSHOTS_DIR)).unwrap();
    assert!(matches!(s.mgr.create("vm"), Err(SnapshotError::Io { .. })));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::remove_file(s.repo().join(SNAPSHOTS_DIR)).unwrap();

    // Created with restrictive modes.
    use std::os::unix::fs::PermissionsExt;
    let snap = s.mgr.create("vm").unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    let folder = s.repo().join(SNAPSHOTS_DIR).join(&snap.id);
    assert_eq!(mode(&s.repo().join(SNAPSHOTS_DIR)), 0o700);
    assert_eq!(mode(&folder), 0o700);
    for name in [
        ".coriolis-manifest.json",
        ".coriolis-owner",
        "a.img",
        "b.img",
        "c.img",
    ] {
        assert_eq!(mode(&folder.join(name)), 0o600, "{name}");
    }
}

#[test]
fn concurrent_creates_deletes_and_diffs_of_one_vm() {
    let s = Arc::new(Setup::new(Fs::Btrfs, "snap-conc"));
    let vm = vm_with(&s.repo(), "vm", &["a.img", "b.img"]);
    for d in &vm.disks {
        fill_random(&d.path, 4 * MIB, &mut fastrand::Rng::with_seed(4));
    }
    s.inv.set(vm);
    let first = s.mgr.create("vm").unwrap();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let s = s.clone();
            let first = first.id.clone();
            std::thread::spawn(move || {
                let mut made = Vec::new();
                for _ in 0..4 {
                    let snap = s.mgr.create("vm").unwrap();
                    let d = s
                        .mgr
                        .get(
                            "vm",
                            &snap.id,
                            &GetOptions {
                                compare_to: Some(first.clone()),
                                ..GetOptions::default()
                            },
                        )
                        .unwrap();
                    assert_eq!(d.disks.len(), 2);
                    if t % 2 == 0 {
                        s.mgr.delete("vm", &snap.id).unwrap();
                    } else {
                        made.push(snap.id);
                    }
                }
                made
            })
        })
        .collect();
    let mut kept: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    kept.push(first.id.clone());
    kept.sort();
    let mut ids = s.mgr.ids("vm").unwrap();
    assert_eq!(ids.len(), 13);
    assert_eq!(ids[0], first.id);
    ids.sort();
    assert_eq!(ids, kept);
    assert_eq!(s.snapshot_folders(), kept);
    let report = s.mgr.reconcile(&[s.repo()]).unwrap();
    assert_eq!((report.kept, report.actions.len()), (13, 0), "{report:?}");
}

/// #11: the per-VM locks live only while used: deletes for any ids (VMs
/// that do not exist included) leave no entry behind.
#[test]
fn deletes_of_unknown_ids_leave_no_lock_entries() {
    let s = Arc::new(Setup::new(Fs::Xfs, "snap-locks"));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    let vm = format!("no-such-vm-{}", i % 50 + t);
                    s.mgr
                        .delete(&vm, "00000000-0000-0000-0000-000000000000")
                        .unwrap();
                    let _ = s.mgr.purge(&vm);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.mgr.vm_lock_entries(), 0);
}

#[test]
fn a_full_map_fails_creates_cleanly_and_reads_keep_working() {
    let s = Setup::with_config(
        Fs::Xfs,
        "snap-mapfull",
        StoreConfig {
            map_size: 128 * KIB,
            ..config()
        },
    );
    let small = vm_with(&s.repo(), "small", &["s.img"]);
    fill_random(&small.disks[0].path, MIB, &mut fastrand::Rng::with_seed(5));
    s.inv.set(small);
    let ok = s.mgr.create("small").unwrap();
    // A disk with 40k extents needs more than the whole map.
    let big = vm_with(&s.repo(), "big", &["big.img"]);
    let f = OpenOptions::new()
        .write(true)
        .open(&big.disks[0].path)
        .unwrap();
    for i in 0..40_000u64 {
        f.write_all_at(&[1u8; 4096], i * 8192).unwrap();
    }
    f.sync_all().unwrap();
    s.inv.set(big);
    let err = s.mgr.create("big").unwrap_err();
    assert!(err.is_map_full(), "{err:?}");
    assert_eq!(s.snapshot_folders(), vec![ok.id.clone()]);
    assert!(matches!(s.mgr.list("big"), Ok(v) if v.is_empty()));
    assert_eq!(
        s.mgr
            .get("small", &ok.id, &GetOptions::default())
            .unwrap()
            .id,
        ok.id
    );
    let (f, size) = s.mgr.open_disk("small", &ok.id, "s.img").unwrap();
    assert_eq!(read_all(f).len() as u64, size);
    assert_eq!(s.mgr.create("small").unwrap().disks.len(), 1);
}

#[test]
fn the_database_is_rebuilt_from_the_manifests() {
    let s = Setup::new(Fs::Xfs, "snap-rebuild");
    let vm = vm_with(&s.repo(), "vm", &["a.img", "b.img"]);
    let mut rng = fastrand::Rng::with_seed(6);
    for d in &vm.disks {
        fill_random(&d.path, 2 * MIB, &mut rng);
    }
    s.inv.set(vm.clone());
    let mut ids = Vec::new();
    let mut diffs = Vec::new();
    for _ in 0..3 {
        ids.push(s.mgr.create("vm").unwrap().id);
        mutate(&vm.disks[0].path, &mut rng, 10);
    }
    for w in ids.windows(2) {
        diffs.push(
            s.mgr
                .get(
                    "vm",
                    &w[1],
                    &GetOptions {
                        compare_to: Some(w[0].clone()),
                        ..GetOptions::default()
                    },
                )
                .unwrap(),
        );
    }
    let Setup { scratch, inv, mgr } = s;
    drop(mgr);
    // The database is lost.
    std::fs::remove_dir_all(scratch.path("db")).unwrap();
    let mgr = Manager::open(&scratch.path("db/exporter.db"), &config(), inv).unwrap();
    assert_eq!(mgr.ids("vm").unwrap(), Vec::<String>::new());
    // Another exporter's folder on the shared repository is left alone.
    let foreign = uuid::Uuid::new_v4().to_string();
    let fdir = scratch.path("repo").join(SNAPSHOTS_DIR).join(&foreign);
    std::fs::create_dir(&fdir).unwrap();
    std::fs::write(fdir.join(".coriolis-owner"), "other-node").unwrap();
    std::fs::write(fdir.join("x.img"), "x").unwrap();
    // Something that is no snapshot folder is left alone; an empty snapshot
    // folder (a crash right after mkdir) goes; a half-made one of ours too.
    let snaps = scratch.path("repo").join(SNAPSHOTS_DIR);
    std::fs::create_dir(snaps.join("not-a-snapshot")).unwrap();
    let empty = uuid::Uuid::new_v4().to_string();
    std::fs::create_dir(snaps.join(&empty)).unwrap();
    let half = uuid::Uuid::new_v4().to_string();
    std::fs::create_dir(snaps.join(&half)).unwrap();
    std::fs::write(snaps.join(&half).join(".coriolis-owner"), "test-owner\n").unwrap();
    std::fs::write(snaps.join(&half).join("a.img"), "partial").unwrap();

    let report = mgr.rebuild(&[scratch.path("repo")]).unwrap();
    let adopted: Vec<&Action> = report
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Adopted { .. }))
        .collect();
    assert_eq!(adopted.len(), 3, "{report:?}");
    assert!(report
        .actions
        .iter()
        .any(|a| matches!(a, Action::Skipped { reason, .. } if reason.contains("other-node"))));
    assert!(fdir.join("x.img").exists());
    assert!(snaps.join("not-a-snapshot").is_dir());
    assert!(!snaps.join(&empty).exists());
    assert!(!snaps.join(&half).exists());
    assert_eq!(
        report
            .actions
            .iter()
            .filter(|a| matches!(a, Action::RemovedFolder { .. }))
            .count(),
        2,
        "{report:?}"
    );
    assert_eq!(mgr.ids("vm").unwrap(), ids, "creation order kept");
    for (w, before) in ids.windows(2).zip(&diffs) {
        let after = mgr
            .get(
                "vm",
                &w[1],
                &GetOptions {
                    compare_to: Some(w[0].clone()),
                    ..GetOptions::default()
                },
            )
            .unwrap();
        assert_eq!(&after, before);
    }
}

#[test]
fn a_second_manager_on_one_database_is_refused() {
    let s = Setup::new(Fs::Xfs, "snap-busy");
    let err = Manager::open(
        &s.scratch.path("db/exporter.db"),
        &config(),
        Arc::new(Inventory::default()),
    )
    .unwrap_err();
    assert!(matches!(err, SnapshotError::Busy { .. }), "{err:?}");
}

/// A small XFS image loop-mounted for one test, unmounted on drop.
struct LoopXfs {
    dir: PathBuf,
    img: PathBuf,
}

impl LoopXfs {
    /// XFS refuses filesystems under 300 MiB (xfsprogs 5.19 and later).
    const SIZE: u64 = 300 * MIB;

    fn new(tag: &str) -> LoopXfs {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts a loop filesystem: run it as root (./scripts/test.sh)"
        );
        let base = std::env::temp_dir().join(format!("coe-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let img = base.join("fs.img");
        let dir = base.join("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        File::create(&img).unwrap().set_len(Self::SIZE).unwrap();
        run_tool(
            "mkfs.xfs",
            &["-q", "-f", "-m", "reflink=1", img.to_str().unwrap()],
        );
        run_tool(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), dir.to_str().unwrap()],
        );
        LoopXfs { dir, img }
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(self.img.parent().unwrap());
    }
}

fn run_tool(tool: &str, args: &[&str]) {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed for this test (scripts/deps.sh): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_enospc(e: &SnapshotError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[test]
fn a_create_on_a_full_filesystem_fails_cleanly_and_leaves_nothing() {
    let s = Setup::new(Fs::Xfs, "snap-enospc");
    let tiny = LoopXfs::new("enospc");
    let repo = tiny.dir.clone();
    let vm = vm_with(&repo, "vm", &["a.img", "b.img"]);
    // Fragmented disks: their clones need new block-map blocks.
    for d in &vm.disks {
        let f = OpenOptions::new().write(true).open(&d.path).unwrap();
        for i in 0..3000u64 {
            f.write_all_at(&[7u8; 4096], i * 8192).unwrap();
        }
        f.sync_all().unwrap();
    }
    s.inv.set(vm);
    std::fs::create_dir(repo.join(SNAPSHOTS_DIR)).unwrap();
    // Fill the filesystem: one big preallocation, then 4 KiB files until
    // ENOSPC.
    let avail = rustix::fs::statvfs(&repo).unwrap();
    let avail = avail.f_bavail * avail.f_frsize;
    let fill = File::create(repo.join("fill")).unwrap();
    rustix::fs::fallocate(&fill, rustix::fs::FallocateFlags::empty(), 0, avail - MIB).unwrap();
    let mut small = Vec::new();
    for i in 0..100_000 {
        let p = repo.join(format!("f{i}"));
        match std::fs::write(&p, [1u8; 4096]) {
            Ok(()) => small.push(p),
            Err(e) if e.raw_os_error() == Some(28) => {
                let _ = std::fs::remove_file(&p);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Free space a little at a time: every create fails cleanly with
    // ENOSPC until one succeeds.
    let mut failures: Vec<String> = Vec::new();
    let mut created = None;
    for _ in 0..2000 {
        match s.mgr.create("vm") {
            Ok(snap) => {
                created = Some(snap);
                break;
            }
            Err(e) => {
                assert!(is_enospc(&e), "not ENOSPC: {e:?}");
                assert_eq!(folders(&repo), Vec::<String>::new(), "after {e:?}");
                assert_eq!(s.mgr.store().list_all().unwrap(), vec![]);
                let step = e.to_string();
                if !failures.contains(&step) {
                    failures.push(step);
                }
            }
        }
        for _ in 0..4 {
            if let Some(p) = small.pop() {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    eprintln!("ENOSPC failures seen: {failures:?}");
    assert!(!failures.is_empty(), "the filesystem was never full");
    let snap = created.expect("a create succeeds once space is freed");
    assert_eq!(folders(&repo), vec![snap.id.clone()]);
    for d in &snap.disks {
        let (f, _) = s.mgr.open_disk("vm", &snap.id, &d.name).unwrap();
        assert!(read_all(f) == std::fs::read(&d.parent_path).unwrap());
    }
    drop(s);
}

#[test]
fn a_vm_on_two_repositories_gets_one_folder_in_each() {
    let s = Setup::new(Fs::Btrfs, "snap-tworepos");
    let repo2 = s.scratch.path("repo2");
    let mut vm = vm_with(&s.repo(), "vm", &["a.img"]);
    let other = vm_with(&repo2, "vm", &["b.img"]);
    vm.disks.extend(other.disks);
    let mut rng = fastrand::Rng::with_seed(8);
    for d in &vm.disks {
        fill_random(&d.path, MIB, &mut rng);
    }
    s.inv.set(vm.clone());
    let s1 = s.mgr.create("vm").unwrap();
    let s2 = s.mgr.create("vm").unwrap();
    assert_eq!(s.snapshot_folders(), {
        let mut v = vec![s1.id.clone(), s2.id.clone()];
        v.sort();
        v
    });
    assert_eq!(folders(&repo2), s.snapshot_folders());
    assert_eq!(
        PathBuf::from(&s2.disks[1].path),
        repo2.join(SNAPSHOTS_DIR).join(&s2.id).join("b.img")
    );

    // Lose the database: both folders of each snapshot are adopted as one.
    let Setup { scratch, inv, mgr } = s;
    drop(mgr);
    std::fs::remove_dir_all(scratch.path("db")).unwrap();
    let mgr = Manager::open(&scratch.path("db/exporter.db"), &config(), inv).unwrap();
    let repos = [scratch.path("repo"), repo2.clone()];
    let report = mgr.rebuild(&repos).unwrap();
    assert_eq!(
        report
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Adopted { .. }))
            .count(),
        2,
        "{report:?}"
    );
    assert_eq!(mgr.ids("vm").unwrap(), vec![s1.id.clone(), s2.id.clone()]);
    // Rebuilding from one repository alone adopts nothing it cannot see
    // whole, and removes nothing.
    let partial = mgr.rebuild(&repos[..1]).unwrap();
    assert!(!partial.actions.is_empty(), "{partial:?}");
    assert!(mgr.ids("vm").unwrap().is_empty(), "{partial:?}");
    assert!(
        partial
            .actions
            .iter()
            .all(|a| matches!(a, Action::Skipped { .. })),
        "{partial:?}"
    );
    assert_eq!(folders(&repo2).len(), 2);
    mgr.rebuild(&repos).unwrap();

    // A lost half: the record is dropped and the other half removed.
    std::fs::remove_dir_all(repo2.join(SNAPSHOTS_DIR).join(&s1.id)).unwrap();
    let report = mgr.reconcile(&repos).unwrap();
    assert!(
        report
            .actions
            .iter()
            .any(|a| matches!(a, Action::DroppedRecord { id, .. } if *id == s1.id)),
        "{report:?}"
    );
    assert_eq!(folders(&scratch.path("repo")), vec![s2.id.clone()]);
    mgr.delete("vm", &s2.id).unwrap();
    assert_eq!(folders(&scratch.path("repo")), Vec::<String>::new());
    assert_eq!(folders(&repo2), Vec::<String>::new());
}
