//! The inventory against real files: Berkeley DB files written by the real
//! `db5.3_load` (several hundred repositories, overflow pages, Python-2
//! style pickles in protocols 0 and 2, hash versions 8 and 9, several page
//! sizes), damaged copies of them, and a fake Oracle VM node tree on the
//! test XFS so that the clone probe is real.
//!
//! Fixtures are made at test time by `scripts/make-ovm-fixtures.py`, which
//! drives `db5.3_load` and checks every pickle with Python's own unpickler;
//! the committed golden copies in `tests/fixtures/ovm/` came from the same
//! script.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use coriolis_ovm_exporter::ovm::agent_records::{RecordError, RepositoryRecord};
use coriolis_ovm_exporter::ovm::bdb::{BdbError, HashDb};
use coriolis_ovm_exporter::ovm::pickle::{self, PickleError};
use coriolis_ovm_exporter::ovm::{
    self, Inventory, InventoryConfig, InventoryError, InventorySource, NodeInventory,
};
use serde_json::Value as Json;

use crate::common::{Fs, LogCapture, Scratch};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the fixture script (python3 + db5.3_load, both installed by
/// scripts/deps.sh). Fails loudly when they are missing.
fn make_fixtures(out: &Path, args: &[&str]) -> Json {
    let status = Command::new("python3")
        .arg(manifest().join("scripts/make-ovm-fixtures.py"))
        .arg(out)
        .args(args)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install it (scripts/deps.sh does) to make fixtures")
        });
    assert!(
        status.success(),
        "make-ovm-fixtures.py failed ({status}); is db5.3_load installed (db5.3-util)?"
    );
    expected(out)
}

fn expected(dir: &Path) -> Json {
    serde_json::from_slice(&fs::read(dir.join("expected.json")).unwrap()).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coe-ovm-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Every repository the script wrote is read back, by iteration and by
/// lookup, with every field and the exact bytes of the alias.
fn check_repository_db(dir: &Path) -> HashDb<'static> {
    let exp = expected(dir);
    let bytes: &'static [u8] = Box::leak(fs::read(dir.join("repository")).unwrap().into());
    let db = HashDb::open(bytes).unwrap();
    assert_eq!(
        u64::from(db.meta().version),
        exp["hash_version"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(db.meta().pagesize),
        exp["pagesize"].as_u64().unwrap()
    );
    let repos = exp["repositories"].as_array().unwrap();
    let pairs = db.pairs().unwrap();
    assert_eq!(pairs.len(), repos.len());
    let mut seen_protocols = std::collections::HashSet::new();
    for r in repos {
        let id = r["id"].as_str().unwrap();
        let value = db
            .get(id.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{id} not found by lookup"));
        assert!(pairs.iter().any(|(k, v)| k == id.as_bytes() && *v == value));
        let rec = RepositoryRecord::from_pickle(id.as_bytes(), &value).unwrap();
        assert_eq!(rec.id, id);
        assert_eq!(
            rec.mount_point.as_os_str().as_bytes(),
            unhex(r["mount_point_hex"].as_str().unwrap())
        );
        assert_eq!(rec.filesystem, r["filesystem"].as_str().unwrap());
        assert_eq!(rec.manager_uuid, r["manager_uuid"].as_str().unwrap());
        assert_eq!(rec.version, r["version"].as_str().unwrap());
        assert_eq!(rec.fs_location, r["fs_location"].as_str().unwrap());
        let alias = unhex(r["alias_hex"].as_str().unwrap());
        assert_eq!(rec.alias, pickle::bytes_to_text(&alias), "alias of {id}");
        let tree = pickle::decode(&value).unwrap();
        assert_eq!(
            tree.dict_get("alias").unwrap().as_bytes().unwrap(),
            alias,
            "exact alias bytes of {id}"
        );
        seen_protocols.insert(r["protocol"].as_u64().unwrap());
    }
    assert_eq!(seen_protocols.len(), 2, "both protocols 0 and 2 present");
    assert_eq!(db.get(b"0004fb0000030000ffffffffffffffff").unwrap(), None);
    db
}

#[test]
fn hundreds_of_repositories_from_db53_load() {
    for (pagesize, version, ffactor) in [
        ("512", "9", "0"),
        ("4096", "9", "0"),
        ("512", "8", "0"),
        ("8192", "9", "4"),
    ] {
        let dir = tmp(&format!("db-{pagesize}-{version}-{ffactor}"));
        make_fixtures(
            &dir,
            &[
                "--repos",
                "600",
                "--pagesize",
                pagesize,
                "--hash-version",
                version,
                "--ffactor",
                ffactor,
            ],
        );
        let db = check_repository_db(&dir);
        // Small pages force many buckets and long chains.
        if pagesize == "512" {
            assert!(db.meta().max_bucket > 16, "{:?}", db.meta());
        }
        assert_eq!(
            ovm::manager_ip(&dir).unwrap().as_deref(),
            Some("10.11.12.13")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn golden_fixtures_still_decode() {
    for sub in ["v9", "v8"] {
        let dir = manifest().join("tests/fixtures/ovm").join(sub);
        check_repository_db(&dir);
        assert_eq!(
            ovm::manager_ip(&dir).unwrap().as_deref(),
            Some("10.11.12.13")
        );
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

// Offsets and types from db_page.h, as in src/ovm/bdb.rs.
const META_MAGIC: usize = 12;
const META_VERSION: usize = 16;
const META_TYPE: usize = 25;
const META_LAST_PGNO: usize = 32;
const PG_NEXT: usize = 16;
const PG_TYPE: usize = 25;
const P_OVERFLOW: u8 = 7;

#[test]
fn damaged_files_give_clear_errors() {
    let dir = tmp("damaged");
    make_fixtures(&dir, &["--repos", "300", "--pagesize", "512"]);
    let good = fs::read(dir.join("repository")).unwrap();
    let ps = 512;
    let last = u32_at(&good, META_LAST_PGNO);
    let pairs = |b: &[u8]| HashDb::open(b).and_then(|db| db.pairs());

    let mut f = good.clone();
    put_u32(&mut f, META_MAGIC, 0x1234_5678);
    assert_eq!(
        pairs(&f).unwrap_err(),
        BdbError::BadMagic { magic: 0x1234_5678 }
    );

    let mut f = good.clone();
    put_u32(&mut f, META_VERSION, 7);
    assert_eq!(
        pairs(&f).unwrap_err(),
        BdbError::UnsupportedVersion { version: 7 }
    );

    let mut f = good.clone();
    f[META_TYPE] = 9;
    assert_eq!(
        pairs(&f).unwrap_err(),
        BdbError::UnsupportedType { page_type: 9 }
    );

    assert!(matches!(
        pairs(&good[..good.len() - 3 * ps]).unwrap_err(),
        BdbError::TruncatedPage { .. }
    ));
    assert_eq!(
        pairs(&good[..100]).unwrap_err(),
        BdbError::TooShort { len: 100 }
    );

    // Bucket 0 starts at page 1 (spares[0] = 1).
    let mut f = good.clone();
    put_u32(&mut f, ps + PG_NEXT, last + 5);
    assert_eq!(
        pairs(&f).unwrap_err(),
        BdbError::PageOutOfRange {
            pgno: last + 5,
            last_pgno: last
        }
    );
    let mut f = good.clone();
    put_u32(&mut f, ps + PG_NEXT, 1);
    assert_eq!(pairs(&f).unwrap_err(), BdbError::Cycle { pgno: 1 });

    // An overflow page looping onto itself.
    let ov = (1..good.len() / ps)
        .find(|&p| good[p * ps + PG_TYPE] == P_OVERFLOW && u32_at(&good, p * ps + PG_NEXT) != 0)
        .expect("the big alias spans several overflow pages");
    let mut f = good.clone();
    put_u32(&mut f, ov * ps + PG_NEXT, ov as u32);
    assert_eq!(pairs(&f).unwrap_err(), BdbError::Cycle { pgno: ov as u32 });

    // Values that are not usable records, one per kind.
    let bad = fs::read(dir.join("bad-records")).unwrap();
    let bad = HashDb::open(&bad).unwrap();
    let rec = |k: &[u8]| RepositoryRecord::from_pickle(k, &bad.get(k).unwrap().unwrap());
    assert_eq!(
        rec(b"missing-fs_location").unwrap_err(),
        RecordError::MissingKey { key: "fs_location" }
    );
    assert_eq!(rec(b"not-a-dict").unwrap_err(), RecordError::NotADict);
    assert!(matches!(
        rec(b"truncated").unwrap_err(),
        RecordError::Pickle(PickleError::NoStop { .. } | PickleError::Truncated { .. })
    ));
    assert!(matches!(
        rec(b"insecure-string").unwrap_err(),
        RecordError::Pickle(PickleError::BadArgument { name: "STRING", .. })
    ));
    let msg = RecordError::MissingKey { key: "fs_location" }.to_string();
    assert!(msg.contains("fs_location"), "{msg}");

    // Through the inventory: a damaged database fails the listing with an
    // error naming the file; a bad record only skips that repository.
    let db_dir = dir.join("agent");
    fs::create_dir_all(&db_dir).unwrap();
    let mut f = good.clone();
    put_u32(&mut f, ps + PG_NEXT, 1);
    fs::write(db_dir.join("repository"), &f).unwrap();
    let inv = NodeInventory::open(&InventoryConfig {
        source: InventorySource::OvsAgent,
        ovs_agent_db_dir: db_dir.clone(),
        check_mounted: false,
        ..Default::default()
    })
    .unwrap();
    let err = inv.repositories().unwrap_err();
    assert!(matches!(
        err,
        InventoryError::Db {
            source: BdbError::Cycle { pgno: 1 },
            ..
        }
    ));
    assert!(err.to_string().contains("repository"), "{err}");
    fs::copy(dir.join("bad-records"), db_dir.join("repository")).unwrap();
    assert_eq!(inv.repositories().unwrap(), Vec::new());

    // A damaged server database is an error, a missing one is None.
    fs::write(db_dir.join("server"), &good[..ps]).unwrap();
    assert!(matches!(
        ovm::manager_ip(&db_dir),
        Err(InventoryError::Db { .. })
    ));
    assert_eq!(ovm::manager_ip(&dir.join("nowhere")).unwrap(), None);
    fs::remove_dir_all(&dir).unwrap();
}

const VM1: &str = "0004fb00000600000000000000000001";
const VM2: &str = "0004fb00000600000000000000000002";
const VM3: &str = "0004fb00000600000000000000000003";
const VM4: &str = "0004fb00000600000000000000000004";

fn write_vm(repo: &Path, name: &str, friendly: &str, disks: &[String]) {
    let d = repo.join("VirtualMachines").join(name);
    fs::create_dir_all(&d).unwrap();
    let list = disks
        .iter()
        .map(|s| format!("    '{s}',"))
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(
        d.join("vm.cfg"),
        format!(
            "vif = ['mac=00:21:f6:00:00:01,bridge=0004fb0010']\n\
             OVM_simple_name = \"{friendly}\"\n\
             disk = [\n{list}\n]\n\
             uuid = '{}-0000'\n\
             OVM_high_availability = False\n\
             memory = 2048 # MiB\n\
             name = '{name}'\n",
            &name[..8]
        ),
    )
    .unwrap();
}

fn sparse(path: &Path, len: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
}

struct Node {
    _scratch: Scratch,
    root: PathBuf,
    db_dir: PathBuf,
    repo_a: PathBuf,
    repo_b: PathBuf,
    ids: Vec<String>,
}

/// An Oracle VM node in miniature on the test XFS: ovs-agent databases
/// made by db5.3_load naming three repositories, two of them present
/// (the third one's mount point is missing), VMs with every kind of disk.
fn fake_node() -> Node {
    let scratch = Fs::Xfs.scratch("ovm-node");
    let root = scratch.dir.clone();
    let base = root.join("Repositories");
    let db_dir = root.join("db");
    let exp = make_fixtures(
        &db_dir,
        &[
            "--repos",
            "3",
            "--mount-base",
            base.to_str().unwrap(),
            "--big-alias",
            "40",
        ],
    );
    let ids: Vec<String> = exp["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let repo_a = base.join(&ids[0]);
    let repo_b = base.join(&ids[1]);
    let img = |r: &Path, n: &str| r.join("VirtualDisks").join(n);
    sparse(&img(&repo_a, "a1.img"), 64 << 20);
    sparse(&img(&repo_a, "a2.img"), 1 << 20);
    sparse(&img(&repo_b, "b1.img"), 8 << 20);
    sparse(&img(&repo_b, "meta-iso.img"), 1 << 20);
    sparse(&repo_a.join("ISOs").join("install.iso"), 1 << 20);
    // A disk outside every mount point that repository B's .ovsmeta names.
    sparse(&root.join("elsewhere").join("named.img"), 1 << 20);
    fs::write(
        repo_b.join(".ovsmeta"),
        r#"{"b1.img": {"OBJECT_TYPE": "VIRTUAL_DISK", "SIMPLE_NAME": "data"},
            "named.img": {"OBJECT_TYPE": "VIRTUAL_DISK", "SIMPLE_NAME": "named"},
            "meta-iso.img": {"OBJECT_TYPE": "ISO", "SIMPLE_NAME": "really an iso"}}"#,
    )
    .unwrap();
    let file = |p: PathBuf, dev: &str, mode: &str| format!("file:{},{dev},{mode}", p.display());
    write_vm(
        &repo_a,
        VM1,
        "web \\\"front\\\"",
        &[
            file(img(&repo_a, "a1.img"), "xvda", "w"),
            file(img(&repo_b, "b1.img"), "xvdb", "w"),
            file(repo_a.join("ISOs/install.iso"), "xvdc:cdrom", "r"),
            "phy:/dev/mapper/360014059,xvdd,w".to_owned(),
            ",xvde:cdrom,r".to_owned(),
        ],
    );
    write_vm(
        &repo_a,
        VM2,
        "db",
        &[file(img(&repo_a, "a2.img"), "xvda", "w")],
    );
    write_vm(
        &repo_b,
        VM3,
        "odd",
        &[
            file(root.join("elsewhere/named.img"), "xvda", "w"),
            file(img(&repo_b, "meta-iso.img"), "xvdb", "r"),
            file(img(&repo_b, "gone.img"), "xvdc", "w"),
        ],
    );
    // A VM folder with a broken vm.cfg, one without vm.cfg, a stray file.
    let broken = repo_b.join("VirtualMachines/0004fb0000060000000000000000000b");
    fs::create_dir_all(&broken).unwrap();
    fs::write(broken.join("vm.cfg"), "name = 'x\ndisk = [\n").unwrap();
    fs::create_dir_all(repo_b.join("VirtualMachines/0004fb0000060000000000000000000c")).unwrap();
    fs::write(repo_b.join("VirtualMachines/README"), "not a vm").unwrap();
    Node {
        _scratch: scratch,
        root,
        db_dir,
        repo_a,
        repo_b,
        ids,
    }
}

fn agent_inventory(node: &Node) -> std::sync::Arc<dyn Inventory> {
    ovm::open_inventory(&InventoryConfig {
        source: InventorySource::Auto,
        ovs_agent_db_dir: node.db_dir.clone(),
        check_mounted: false,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn fake_ovm_node_on_xfs() {
    let node = fake_node();
    let inv = agent_inventory(&node);

    let repos = inv.repositories().unwrap();
    let mut want_ids = vec![node.ids[0].clone(), node.ids[1].clone()];
    want_ids.sort();
    assert_eq!(
        repos.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        want_ids,
        "the repository whose mount point is missing is skipped"
    );

    let vms = inv.vms().unwrap();
    assert_eq!(
        vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        [VM1, VM2, VM3],
        "the broken VM folders are skipped, the others listed"
    );

    let vm1 = inv.vm(VM1).unwrap().unwrap();
    assert_eq!(vm1.friendly_name, "web \"front\"");
    assert_eq!(vm1.uuid, "0004fb00-0000");
    assert_eq!(
        vm1.disks.len(),
        4,
        "no disk is dropped; the empty cdrom drive is not a disk"
    );
    let [a1, b1, iso, phy] = &vm1.disks[..] else {
        unreachable!()
    };
    assert!(a1.snapshot_compatible, "{a1:?}");
    assert_eq!(
        (a1.name.as_str(), a1.device_name.as_str(), a1.mode.as_str()),
        ("a1.img", "xvda", "w")
    );
    assert_eq!(a1.repository.as_ref().unwrap().mount_point, node.repo_a);
    assert_eq!(a1.repository.as_ref().unwrap().filesystem, "nfs");
    assert!(b1.snapshot_compatible, "{b1:?}");
    assert_eq!(b1.repository.as_ref().unwrap().mount_point, node.repo_b);
    assert!(!iso.snapshot_compatible);
    assert_eq!(iso.device_name, "xvdc");
    assert!(iso
        .incompatible_reason
        .as_deref()
        .unwrap()
        .contains("cdrom"));
    assert!(!phy.snapshot_compatible);
    assert_eq!(phy.path, PathBuf::from("/dev/mapper/360014059"));
    assert!(phy.incompatible_reason.as_deref().unwrap().contains("phy"));
    assert!(!vm1.snapshot_compatible());
    assert!(inv.vm(VM2).unwrap().unwrap().snapshot_compatible());

    let vm3 = inv.vm(VM3).unwrap().unwrap();
    let [named, metaiso, gone] = &vm3.disks[..] else {
        unreachable!()
    };
    assert_eq!(
        named.repository.as_ref().unwrap().mount_point,
        node.repo_b,
        ".ovsmeta names it"
    );
    // #11: named by .ovsmeta but outside the repository's mount: listed,
    // with the reason, never cloned or read.
    assert!(!named.snapshot_compatible, "{named:?}");
    assert!(
        named
            .incompatible_reason
            .as_deref()
            .unwrap()
            .contains("outside the mount point"),
        "{named:?}"
    );
    assert!(
        metaiso
            .incompatible_reason
            .as_deref()
            .unwrap()
            .contains("ISO"),
        "{metaiso:?}"
    );
    assert!(
        gone.incompatible_reason
            .as_deref()
            .unwrap()
            .contains("unusable"),
        "{gone:?}"
    );

    // Names are looked up, never joined into paths.
    assert_eq!(inv.vm("../../etc").unwrap(), None);
    assert_eq!(inv.vm("").unwrap(), None);

    // The probe was real, left nothing behind, and is not redone.
    let probes = inv.clone_probes().unwrap();
    assert_eq!(probes.len(), 2);
    for (r, p) in &probes {
        assert!(p.can_clone, "{r:?}: {p:?}");
        assert_eq!(p.fs_type, Some(coriolis_ovm_exporter::sys::FsType::Xfs));
        let snap = r.mount_point.join("CoriolisSnapshots");
        assert_eq!(fs::read_dir(&snap).unwrap().count(), 0);
    }
    let snap_a = node.repo_a.join("CoriolisSnapshots");
    let before = fs::metadata(&snap_a).unwrap().modified().unwrap();
    // A probe file made and removed now would move the folder's mtime only
    // once the filesystem's clock has ticked past `before`: wait for that
    // (a file touched beside it shows the clock), not for a fixed time.
    let tick = node.repo_a.join("clock-tick");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        fs::write(&tick, b"").unwrap();
        if fs::metadata(&tick).unwrap().modified().unwrap() > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the filesystem clock did not move"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    fs::remove_file(&tick).unwrap();
    inv.vms().unwrap();
    assert_eq!(
        fs::metadata(&snap_a).unwrap().modified().unwrap(),
        before,
        "a second listing made no probe files"
    );
}

#[test]
fn listings_follow_changes_on_disk() {
    let node = fake_node();
    let inv = agent_inventory(&node);
    assert_eq!(inv.vms().unwrap().len(), 3);

    // Edit a vm.cfg: the new name shows.
    write_vm(
        &node.repo_a,
        VM2,
        "renamed",
        &[format!(
            "file:{},xvda,w",
            node.repo_a.join("VirtualDisks/a2.img").display()
        )],
    );
    assert_eq!(inv.vm(VM2).unwrap().unwrap().friendly_name, "renamed");

    // A new VM folder appears, a removed one goes.
    write_vm(&node.repo_b, VM4, "new", &[]);
    fs::remove_dir_all(node.repo_a.join("VirtualMachines").join(VM1)).unwrap();
    let names: Vec<String> = inv.vms().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, [VM2, VM3, VM4]);

    // The broken vm.cfg, repaired, is listed.
    fs::write(
        node.repo_b
            .join("VirtualMachines/0004fb0000060000000000000000000b/vm.cfg"),
        "name = '0004fb0000060000000000000000000b'\n",
    )
    .unwrap();
    assert!(inv
        .vm("0004fb0000060000000000000000000b")
        .unwrap()
        .is_some());

    // .ovsmeta changes: meta-iso.img becomes a virtual disk.
    fs::write(
        node.repo_b.join(".ovsmeta"),
        r#"{"meta-iso.img": {"OBJECT_TYPE": "VIRTUAL_DISK"}}"#,
    )
    .unwrap();
    let vm3 = inv.vm(VM3).unwrap().unwrap();
    assert!(vm3.disks[1].snapshot_compatible, "{:?}", vm3.disks[1]);
    assert!(
        vm3.disks[0].repository.is_none(),
        "named.img is no longer named by any .ovsmeta"
    );

    // The repository database is replaced: the third repository now
    // exists on disk, and a fourth appears.
    let base = node.root.join("Repositories");
    fs::remove_dir_all(&node.db_dir).unwrap();
    let exp = make_fixtures(
        &node.db_dir,
        &[
            "--repos",
            "4",
            "--mount-base",
            base.to_str().unwrap(),
            "--big-alias",
            "40",
        ],
    );
    for r in exp["repositories"].as_array().unwrap() {
        fs::create_dir_all(base.join(r["id"].as_str().unwrap())).unwrap();
    }
    assert_eq!(inv.repositories().unwrap().len(), 4);

    // A damaged database (or one caught mid-write) keeps the last good
    // list; a fresh inventory, with no good list, reports the error.
    let db = node.db_dir.join("repository");
    let mut bytes = fs::read(&db).unwrap();
    put_u32(&mut bytes, META_MAGIC, 0xdead_beef);
    fs::write(&db, &bytes).unwrap();
    assert_eq!(inv.repositories().unwrap().len(), 4);
    assert_eq!(
        inv.vms().unwrap().len(),
        4,
        "VM2, VM3, VM4 and the repaired one"
    );
    assert!(matches!(
        agent_inventory(&node).repositories(),
        Err(InventoryError::Db {
            source: BdbError::BadMagic { magic: 0xdead_beef },
            ..
        })
    ));
}

#[test]
fn static_inventory_from_the_config_table() {
    let scratch = Fs::Xfs.scratch("ovm-static");
    let xfs = scratch.path("repo");
    // tmpfs cannot clone: the probe, not the config, says so.
    let shm = Path::new("/dev/shm").join(format!("coe-ovm-static-{}", std::process::id()));
    fs::create_dir_all(&shm).unwrap();
    sparse(&xfs.join("VirtualDisks/web.img"), 4 << 20);
    sparse(&shm.join("VirtualDisks/scratch.img"), 1 << 20);
    write_vm(
        &xfs,
        VM1,
        "discovered",
        &[format!(
            "file:{},xvda,w",
            xfs.join("VirtualDisks/web.img").display()
        )],
    );
    let toml_text = format!(
        r#"
        [inventory]
        source = "static"
        ovs_agent_db_dir = "/nonexistent/db"

        [[inventory.repositories]]
        id = "xfs"
        mount_point = "{}"
        alias = "Local XFS"

        [[inventory.repositories]]
        id = "shm"
        mount_point = "{}"
        discover_vms = false

        [[inventory.repositories]]
        id = "absent"
        mount_point = "/nonexistent/repo"

        [[inventory.vms]]
        name = "web01"
        friendly_name = "Web"
        disks = [
          {{ path = "{}", device_name = "xvda" }},
          {{ path = "{}", device_name = "xvdb", mode = "r" }},
          {{ path = "{}", device_name = "xvdc", cdrom = true, mode = "r" }},
        ]
        "#,
        xfs.display(),
        shm.display(),
        xfs.join("VirtualDisks/web.img").display(),
        shm.join("VirtualDisks/scratch.img").display(),
        xfs.join("ISOs/x.iso").display(),
    );
    #[derive(Debug, serde::Deserialize)]
    struct File {
        inventory: InventoryConfig,
    }
    let cfg = toml::from_str::<File>(&toml_text).unwrap().inventory;
    assert_eq!(cfg.repositories[0].alias.as_deref(), Some("Local XFS"));
    assert!(cfg.check_mounted, "default");
    let inv = ovm::open_inventory(&cfg).unwrap();
    let repos = inv.repositories().unwrap();
    assert_eq!(
        repos.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["shm", "xfs"]
    );
    assert_eq!(repos[1].filesystem, "xfs", "detected when not configured");
    assert_eq!(repos[0].filesystem, "tmpfs");
    let vms = inv.vms().unwrap();
    assert_eq!(
        vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        [VM1, "web01"]
    );
    let web = &vms[1];
    assert_eq!(web.friendly_name, "Web");
    assert!(web.disks[0].snapshot_compatible, "{:?}", web.disks[0]);
    let r = web.disks[1].incompatible_reason.as_deref().unwrap();
    assert!(r.contains("cannot clone") && r.contains("tmpfs"), "{r}");
    assert!(!web.disks[2].snapshot_compatible);
    assert!(vms[0].snapshot_compatible());

    // Bad tables are refused with the key named.
    let bad = toml::from_str::<File>("[inventory]\nsource = \"magic\"\n");
    let msg = bad.unwrap_err().to_string();
    assert!(
        msg.contains("unknown variant `magic`") && msg.contains("source"),
        "{msg}"
    );
    let bad = toml::from_str::<File>("[inventory]\nrepos = []\n");
    assert!(bad.unwrap_err().to_string().contains("repos"));
    let cfg = toml::from_str::<File>(
        "[[inventory.repositories]]\nid = \"a\"\nmount_point = \"relative\"\n",
    )
    .unwrap()
    .inventory;
    match ovm::open_inventory(&cfg) {
        Err(InventoryError::Config(m)) => assert!(m.contains("mount_point"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a relative mount point was accepted"),
    }
    fs::remove_dir_all(&shm).unwrap();
}

#[test]
fn skipped_repositories_and_vms_are_logged_once() {
    let scratch = Fs::Xfs.scratch("ovm-warn");
    let repo = scratch.path("repo");
    write_vm(&repo, VM1, "fine", &[]);
    let broken = repo.join("VirtualMachines").join(VM2).join("vm.cfg");
    write_vm(&repo, VM2, "broken", &[]);
    fs::write(&broken, "name = [unclosed\n").unwrap();
    fs::write(repo.join(".ovsmeta"), "{\"a.img\": ").unwrap();
    let cfg = InventoryConfig {
        source: InventorySource::Static,
        repositories: vec![
            ovm::StaticRepository {
                id: "here".into(),
                mount_point: repo.clone(),
                filesystem: None,
                alias: None,
                discover_vms: true,
            },
            ovm::StaticRepository {
                id: "gone".into(),
                mount_point: scratch.path("not-mounted"),
                filesystem: None,
                alias: None,
                discover_vms: true,
            },
        ],
        ..Default::default()
    };
    let log = LogCapture::default();
    tracing::subscriber::with_default(log.clone(), || {
        let inv = ovm::open_inventory(&cfg).unwrap();
        for _ in 0..3 {
            let vms = inv.vms().unwrap();
            assert_eq!(vms.len(), 1);
            assert_eq!(vms[0].name, VM1);
        }
        let got = log.warnings();
        assert_eq!(got.len(), 3, "each problem once: {got:#?}");
        assert!(got
            .iter()
            .any(|m| m.contains(".ovsmeta") && m.contains("not valid JSON")));
        assert!(got
            .iter()
            .any(|m| m.contains("gone") && m.contains("skipped")));
        assert!(got.iter().any(|m| m.contains(VM2) && m.contains("line 1")));

        // Fixed, then broken again: logged again.
        fs::write(&broken, format!("name = '{VM2}'\n")).unwrap();
        assert_eq!(inv.vms().unwrap().len(), 2);
        fs::write(&broken, "name = \n").unwrap();
        assert_eq!(inv.vms().unwrap().len(), 1);
        assert_eq!(log.warnings().len(), 4);
    });
}
