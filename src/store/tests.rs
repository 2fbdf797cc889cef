//! Unit tests of the store on a real LMDB file in a temporary folder.

use super::*;
use crate::extent::{flags, Extent};

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "coe-store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn record(vm: &str, disks: usize) -> SnapshotRecord {
    SnapshotRecord {
        id: Uuid::new_v4().to_string(),
        vm: vm.into(),
        seq: 0,
        created_at_ns: 1,
        owner: "test".into(),
        idempotency_key: None,
        disks: (0..disks)
            .map(|i| DiskRecord {
                name: format!("d{i}.img"),
                parent_path: format!("/r/VirtualDisks/d{i}.img").into(),
                repo_mount: "/r".into(),
                size: 1 << 20,
                fingerprint: Fingerprint {
                    ino: i as u64,
                    size: 1 << 20,
                    mtime_sec: 1,
                    mtime_nsec: 2,
                    ctime_sec: 3,
                    ctime_nsec: 4,
                },
                extents: 2,
                parent_ino: None,
            })
            .collect(),
    }
}

fn map(n: u64, seed: u64) -> ExtentMap {
    ExtentMap::new(
        (0..n)
            .map(|i| Extent {
                logical: i * 8192,
                physical: seed * (1 << 30) + i * 4096 * 3,
                length: 4096,
                flags: if i % 3 == 0 { flags::SHARED } else { 0 },
            })
            .collect(),
    )
    .unwrap()
}

#[test]
fn records_and_maps_round_trip_in_creation_order() {
    let dir = TempDir::new("rt");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    let mut made = Vec::new();
    for k in 0..5u64 {
        let vm = if k % 2 == 0 { "vmA" } else { "vmB" };
        let mut r = record(vm, 2);
        let maps = [map(10 + k, k), map(3, k + 100)];
        let seq = store.insert(&mut r, &maps).unwrap();
        assert_eq!(seq, r.seq);
        made.push((r, maps));
    }
    for (r, maps) in &made {
        assert_eq!(store.get(&r.id).unwrap().as_ref(), Some(r));
        for (i, m) in maps.iter().enumerate() {
            assert_eq!(&store.map(&r.id, i as u32).unwrap(), m);
        }
    }
    let a: Vec<_> = store
        .list_vm("vmA")
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let want: Vec<_> = [0, 2, 4].iter().map(|&i| made[i].0.id.clone()).collect();
    assert_eq!(a, want);
    assert_eq!(store.list_vm("vm").unwrap(), vec![]);
    assert_eq!(store.list_all().unwrap().len(), 5);

    // Removal takes record, index entry and maps together.
    let gone = store.remove(&made[2].0.id).unwrap().unwrap();
    assert_eq!(gone.id, made[2].0.id);
    assert_eq!(store.get(&made[2].0.id).unwrap(), None);
    assert!(matches!(
        store.map(&made[2].0.id, 0),
        Err(StoreError::MissingMap { .. })
    ));
    assert_eq!(store.list_vm("vmA").unwrap().len(), 2);
    assert_eq!(store.remove(&made[2].0.id).unwrap(), None);
    assert_eq!(store.get("not-a-uuid").unwrap(), None);

    // Durable across a reopen; sequence numbers keep growing.
    drop(store);
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    assert_eq!(store.list_vm("vmB").unwrap().len(), 2);
    let mut r = record("vmA", 1);
    store.insert(&mut r, &[map(1, 9)]).unwrap();
    assert!(r.seq > made[4].0.seq);
    assert_eq!(store.list_vm("vmA").unwrap().last().unwrap().id, r.id);
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_message() {
    let dir = TempDir::new("schema");
    let path = dir.0.join("db");
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    store.force_schema_version(SCHEMA_VERSION + 1).unwrap();
    drop(store);
    let err = Store::open(&path, &StoreOptions::default()).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, supported, .. }
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer than"), "{err}");
}

#[test]
fn map_full_fails_the_write_cleanly_and_reads_keep_working() {
    let dir = TempDir::new("full");
    let path = dir.0.join("db");
    let opts = StoreOptions {
        map_size: 256 << 10,
        ..StoreOptions::default()
    };
    let store = Store::open(&path, &opts).unwrap();
    let mut small = record("vm", 1);
    store.insert(&mut small, &[map(10, 1)]).unwrap();
    let mut big = record("vm", 1);
    let err = store.insert(&mut big, &[map(200_000, 2)]).unwrap_err();
    assert!(err.is_map_full(), "{err:?}");
    assert!(err.to_string().contains("map_size"), "{err}");
    // Nothing of the failed write is visible; earlier data reads fine.
    assert_eq!(store.get(&big.id).unwrap(), None);
    assert_eq!(store.list_vm("vm").unwrap(), vec![small.clone()]);
    assert_eq!(store.map(&small.id, 0).unwrap(), map(10, 1));
    // And small writes still go through.
    let mut again = record("vm", 1);
    store.insert(&mut again, &[map(5, 3)]).unwrap();
    assert_eq!(store.list_vm("vm").unwrap().len(), 2);
}

#[test]
fn a_second_open_in_one_process_is_refused() {
    let dir = TempDir::new("twice");
    let path = dir.0.join("db");
    let _a = Store::open(&path, &StoreOptions::default()).unwrap();
    let err = Store::open(&path, &StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
}

#[test]
fn corrupt_map_bytes_are_an_error_not_a_panic() {
    let dir = TempDir::new("corrupt");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    let mut r = record("vm", 1);
    store.insert(&mut r, &[map(4, 1)]).unwrap();
    let key = id_key(&r.id).unwrap();
    store
        .write(|s, w| {
            s.maps
                .put(w, &(key, 0), &[codec::MAP_FORMAT, 200])
                .map_err(|e| lmdb("test", e))
        })
        .unwrap();
    assert!(matches!(
        store.map(&r.id, 0),
        Err(StoreError::CorruptMap { disk: 0, .. })
    ));
}

#[test]
fn reopening_with_a_map_smaller_than_the_data_still_reads_it() {
    let dir = TempDir::new("shrink");
    let path = dir.0.join("db");
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    let mut r = record("vm", 1);
    store.insert(&mut r, &[map(100_000, 1)]).unwrap();
    drop(store);
    let tiny = StoreOptions {
        map_size: 4096,
        ..StoreOptions::default()
    };
    let store = Store::open(&path, &tiny).unwrap();
    assert!(store.map_size() > 100_000, "{}", store.map_size());
    assert_eq!(store.map(&r.id, 0).unwrap(), map(100_000, 1));
}

#[test]
fn a_fatal_commit_error_closes_and_reopens_the_environment() {
    let dir = TempDir::new("heal");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    let mut kept = record("vm", 1);
    store.insert(&mut kept, &[map(3, 1)]).unwrap();
    assert!(store.health().writable);

    // The commit fails as after a failed meta-page write: MDB_PANIC, and
    // the environment refuses everything after, as LMDB's does. The disk
    // stays bad for one more commit: health's probe.
    store.fail_next_commits(2);
    let mut lost = record("vm", 1);
    let err = store.insert(&mut lost, &[map(3, 2)]).unwrap_err();
    assert!(err.poisons(), "{err:?}");
    assert_eq!(lost.seq, 0, "a failed insert assigns no sequence number");
    let h = store.health();
    assert!(!h.writable && h.reason.is_some(), "{h:?}");

    // A later request reopens the environment (after a short backoff: two
    // failures in a row) and is served; nothing of the failed write is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        match store.get(&lost.id) {
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => break r,
        }
    };
    assert_eq!(got.unwrap(), None);
    assert_eq!(store.list_vm("vm").unwrap(), vec![kept.clone()]);
    assert_eq!(store.map(&kept.id, 0).unwrap(), map(3, 1));
    let mut next = record("vm", 1);
    store.insert(&mut next, &[map(3, 3)]).unwrap();
    assert!(next.seq > kept.seq);
    let h = store.health();
    assert!(h.open && h.writable && h.reason.is_none(), "{h:?}");
    assert_eq!(h.reopens, 2);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn health_probes_an_unwritable_store_back_to_good() {
    let dir = TempDir::new("probe");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    store.fail_next_commits(1);
    assert!(store.probe().unwrap_err().poisons());
    // The first health call probes (and reopens): the disk is fine again.
    let h = store.health();
    assert!(h.open && h.writable, "{h:?}");
    assert_eq!(h.reopens, 1);
}

#[test]
fn repeated_failures_back_off_but_boundedly() {
    assert_eq!(backoff(1), Duration::ZERO);
    assert_eq!(backoff(2), Duration::from_millis(100));
    assert_eq!(backoff(3), Duration::from_millis(200));
    assert_eq!(backoff(40), MAX_BACKOFF);
}

#[test]
fn idempotency_keys_map_to_their_snapshot_within_the_window() {
    let dir = TempDir::new("idem");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    let mut r = record("vm", 1);
    r.created_at_ns = 1_000;
    store
        .insert_keyed(&mut r, &[map(2, 1)], Some("k1"))
        .unwrap();
    assert_eq!(
        store.idempotent("vm", "k1", 2_000).unwrap(),
        Some(r.id.clone())
    );
    // Per VM, per key, and only within the window.
    assert_eq!(store.idempotent("other", "k1", 2_000).unwrap(), None);
    assert_eq!(store.idempotent("vm", "k2", 2_000).unwrap(), None);
    let late = 1_000 + IDEMPOTENCY_WINDOW.as_nanos() as u64 + 1;
    assert_eq!(store.idempotent("vm", "k1", late).unwrap(), None);
    // A later keyed insert drops the expired key.
    let mut r2 = record("vm", 1);
    r2.created_at_ns = late;
    store
        .insert_keyed(&mut r2, &[map(2, 2)], Some("k2"))
        .unwrap();
    assert_eq!(store.idempotent("vm", "k1", 2_000).unwrap(), None);
    assert_eq!(
        store.idempotent("vm", "k2", late).unwrap(),
        Some(r2.id.clone())
    );
    // Bad keys are refused and nothing is written.
    let mut r3 = record("vm", 1);
    let long = "x".repeat(MAX_IDEMPOTENCY_KEY + 1);
    for k in ["", long.as_str()] {
        let err = store
            .insert_keyed(&mut r3, &[map(1, 3)], Some(k))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::BadIdempotencyKey { .. }),
            "{err:?}"
        );
    }
    assert_eq!(store.get(&r3.id).unwrap(), None);
}

/// Every `(key, value)` of one database, as raw bytes.
fn dump<K: 'static, V: 'static>(
    store: &Store,
    db: impl Fn(&Handle) -> Database<'static, K, V>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .with(|h| {
            let txn = h.read_txn()?;
            let raw = db(h).remap_types::<Bytes, Bytes>();
            let mut out = Vec::new();
            for e in raw.iter(&txn).map_err(|e| lmdb("test", e))? {
                let (k, v) = e.map_err(|e| lmdb("test", e))?;
                out.push((k.to_vec(), v.to_vec()));
            }
            Ok(out)
        })
        .unwrap()
}

/// The schema-1 layouts, built by hand as the store built them before the
/// typed codecs (`keys`): `u16 BE len, vm, u64 BE seq`; `id, u32 BE disk`;
/// `u16 BE len, vm, key` -> `id, u64 BE created_at_ns`; meta u32/u64 BE.
fn vm_bytes(vm: &str) -> Vec<u8> {
    let mut k = (vm.len() as u16).to_be_bytes().to_vec();
    k.extend_from_slice(vm.as_bytes());
    k
}

#[test]
fn the_typed_codecs_write_and_read_the_schema_1_bytes_on_disk() {
    let dir = TempDir::new("layout");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    let mut r = record("vm-é", 2);
    r.created_at_ns = 0x0102_0304;
    let maps = [map(3, 1), map(2, 2)];
    store.insert_keyed(&mut r, &maps, Some("key-1")).unwrap();
    let id = id_key(&r.id).unwrap();

    // What the typed store wrote is byte for byte the old layout.
    let mut idx = vm_bytes("vm-é");
    idx.extend_from_slice(&1u64.to_be_bytes());
    assert_eq!(dump(&store, |h| h.by_vm), [(idx, id.to_vec())]);
    let map_keys: Vec<Vec<u8>> = (0..2u32)
        .map(|d| [&id[..], &d.to_be_bytes()].concat())
        .collect();
    assert_eq!(
        dump(&store, |h| h.maps),
        map_keys
            .iter()
            .zip(&maps)
            .map(|(k, m)| (k.clone(), codec::encode_map(m)))
            .collect::<Vec<_>>()
    );
    let mut ik = vm_bytes("vm-é");
    ik.extend_from_slice(b"key-1");
    let iv = [&id[..], &0x0102_0304u64.to_be_bytes()].concat();
    assert_eq!(dump(&store, |h| h.idem), [(ik, iv)]);
    let recs = dump(&store, |h| h.snapshots);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0, id);
    assert_eq!(
        dump(&store, |h| h.meta),
        [
            (b"next_seq".to_vec(), 2u64.to_be_bytes().to_vec()),
            (b"schema".to_vec(), SCHEMA_VERSION.to_be_bytes().to_vec()),
        ]
    );

    // A store written in the old layout by raw puts reads through the
    // typed API: list, get, maps, idempotency, remove.
    let mut old = record("vm-é", 1);
    old.seq = 7;
    old.created_at_ns = 5;
    let oid = id_key(&old.id).unwrap();
    let omap = map(4, 9);
    store
        .write(|h, w| {
            let e = |e| lmdb("test", e);
            let json = serde_json::to_vec(&old).unwrap();
            let mut k = vm_bytes("vm-é");
            k.extend_from_slice(&7u64.to_be_bytes());
            h.snapshots
                .remap_types::<Bytes, Bytes>()
                .put(w, &oid, &json)
                .map_err(e)?;
            h.by_vm
                .remap_types::<Bytes, Bytes>()
                .put(w, &k, &oid)
                .map_err(e)?;
            h.maps
                .remap_types::<Bytes, Bytes>()
                .put(
                    w,
                    &[&oid[..], &0u32.to_be_bytes()].concat(),
                    &codec::encode_map(&omap),
                )
                .map_err(e)?;
            let mut ik = vm_bytes("vm-é");
            ik.extend_from_slice(b"key-0");
            h.idem
                .remap_types::<Bytes, Bytes>()
                .put(w, &ik, &[&oid[..], &5u64.to_be_bytes()].concat())
                .map_err(e)?;
            Ok(())
        })
        .unwrap();
    let ids: Vec<String> = store
        .list_vm("vm-é")
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, [r.id.clone(), old.id.clone()]);
    assert_eq!(store.get(&old.id).unwrap(), Some(old.clone()));
    assert_eq!(store.map(&old.id, 0).unwrap(), omap);
    assert_eq!(
        store.idempotent("vm-é", "key-0", 6).unwrap(),
        Some(old.id.clone())
    );
    assert_eq!(store.remove(&old.id).unwrap(), Some(old.clone()));
    assert_eq!(store.list_vm("vm-é").unwrap(), [r.clone()]);
    assert_eq!(dump(&store, |h| h.maps).len(), 2);
}

#[test]
fn values_of_the_wrong_size_are_corrupt_not_guessed() {
    let dir = TempDir::new("badsize");
    let store = Store::open(&dir.0.join("db"), &StoreOptions::default()).unwrap();
    store
        .write(|h, w| {
            let e = |e| lmdb("test", e);
            let meta = h.meta.remap_data_type::<Bytes>();
            meta.put(w, KEY_NEXT_SEQ, &[0, 1]).map_err(e)?;
            meta.put(w, KEY_SCHEMA, &[0, 0, 0, 0, 1]).map_err(e)?;
            let mut ik = vm_bytes("vm");
            ik.extend_from_slice(b"k");
            h.idem
                .remap_types::<Bytes, Bytes>()
                .put(w, &ik, &[0; 5])
                .map_err(e)?;
            Ok(())
        })
        .unwrap();
    let mut r = record("vm", 1);
    let err = store.insert(&mut r, &[map(1, 1)]).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                what: "sequence number"
            }
        ),
        "{err:?}"
    );
    let err = store.schema_version().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                what: "schema version"
            }
        ),
        "{err:?}"
    );
    let err = store.idempotent("vm", "k", 0).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                what: "idempotency entry"
            }
        ),
        "{err:?}"
    );
}
