//! Failures that heal without an operator (issue 16), on the real binary:
//! the snapshot database on a disk that fails writes for a while (a FUSE
//! file returning EIO for chosen byte ranges, under a loop device holding
//! ext4: this kernel has no device-mapper), and `/health` telling the truth
//! about it.
//!
//! Needs root, `/dev/fuse`, `losetup`, `mkfs.ext4` and Debian's
//! `python3-fusepy` (scripts/deps.sh); fails loudly without them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coriolis_ovm_exporter::client::error::ClientError;
use coriolis_ovm_exporter::client::http::{paths, read_json, Api};
use serde_json::Value;

use crate::common::server::{toml_path, Server, Setup, REPO_ID};
use crate::common::{write_vm_cfg, Fs, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_coriolis-ovm-exporter");
const FAULTYFS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/faultyfs.py");
/// Debian's interpreter, where python3-fusepy installs (not a pyenv shim).
const PYTHON: &str = "/usr/bin/python3";
pub const VM: &str = "0004fb00000600000000000000bea100";
pub const DISK: &str = "0004fb00001200000000000000bea1aa.img";
const DISK_SIZE: usize = 3 << 20;
/// Generous: a debug build on two busy cores.
const DEADLINE: Duration = Duration::from_secs(60);

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A filesystem (ext4) on a block device whose writes fail on demand.
pub struct FaultyDisk {
    dir: PathBuf,
    fuse: Child,
    loopdev: String,
    /// Where the ext4 filesystem is mounted.
    pub mnt: PathBuf,
}

impl FaultyDisk {
    pub fn new(tag: &str) -> FaultyDisk {
        assert!(
            Path::new(PYTHON).exists() && Path::new("/dev/fuse").exists(),
            "needs {PYTHON} with python3-fusepy and /dev/fuse (run scripts/deps.sh as root)"
        );
        let dir = std::env::temp_dir().join(format!("coe-heal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("fuse")).unwrap();
        fs::create_dir_all(dir.join("fs")).unwrap();
        let backing = dir.join("backing.img");
        fs::File::create(&backing)
            .unwrap()
            .set_len(128 << 20)
            .unwrap();
        let fuse = Command::new(PYTHON)
            .arg(FAULTYFS)
            .arg(&backing)
            .arg(dir.join("fuse"))
            .arg(dir.join("control.json"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("faultyfs.log")).unwrap())
            .spawn()
            .unwrap();
        let image = dir.join("fuse/disk.img");
        let t = Instant::now();
        while !image.exists() {
            assert!(
                t.elapsed() < DEADLINE,
                "faultyfs did not mount: {}",
                fs::read_to_string(dir.join("faultyfs.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut disk = FaultyDisk {
            mnt: dir.join("fs"),
            dir,
            fuse,
            loopdev: String::new(),
        };
        disk.loopdev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image));
        run(Command::new("mkfs.ext4").args(["-q", "-b", "4096", &disk.loopdev]));
        run(Command::new("mount").arg(&disk.loopdev).arg(&disk.mnt));
        disk
    }

    /// Writes to these byte ranges of the device fail with EIO from now on
    /// (an empty list heals the device).
    pub fn fail_writes(&self, ranges: &[(u64, u64)]) {
        let v =
            serde_json::json!({ "write": ranges.iter().map(|(s, e)| [s, e]).collect::<Vec<_>>() });
        let tmp = self.dir.join("control.json.tmp");
        fs::write(&tmp, v.to_string()).unwrap();
        fs::rename(&tmp, self.dir.join("control.json")).unwrap();
    }

    /// The device byte ranges holding `len` bytes from the start of `file`
    /// (a file on this filesystem).
    pub fn ranges_of(&self, file: &Path, len: u64) -> Vec<(u64, u64)> {
        let f = fs::File::open(file).unwrap();
        let map = coriolis_ovm_exporter::sys::extent_map(&f, true).unwrap();
        let ranges: Vec<(u64, u64)> = map
            .extents()
            .iter()
            .filter(|e| e.logical < len)
            .map(|e| {
                let n = e.length.min(len - e.logical);
                (e.physical, e.physical + n)
            })
            .collect();
        assert!(!ranges.is_empty(), "{} has no blocks", file.display());
        ranges
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        if !self.loopdev.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        }
        let _ = Command::new("umount").arg(self.dir.join("fuse")).status();
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A repository with one VM of one disk of random bytes.
pub fn make_repo(repo: &Path, seed: u64) {
    let disks = repo.join("VirtualDisks");
    fs::create_dir_all(&disks).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0u8; DISK_SIZE];
    rng.fill(&mut bytes);
    fs::write(disks.join(DISK), &bytes).unwrap();
    write_vm_cfg(
        repo,
        VM,
        "0004fb00-0006-0000-0000-0000000bea10",
        "heal",
        &[&disks.join(DISK)],
    );
}

/// The server of these tests: its database in `db/` of the scratch folder
/// unless `setup` names one.
fn start(scratch: &Scratch, repo: &Path, setup: Setup<'_>) -> Server {
    let db = scratch.path("db/exporter.db");
    let setup = Setup {
        db: Some(setup.db.unwrap_or(&db)),
        ..setup
    };
    Server::start_with(&scratch.dir, repo, &mut fastrand::Rng::new(), setup)
}

/// `GET /health`: (HTTP status, answer).
pub fn health(api: &Api) -> (u16, Value) {
    let r = api.get("health", "/health").unwrap();
    let status = r.status().as_u16();
    (status, read_json("health", r).unwrap())
}

fn check<'a>(h: &'a Value, component: &str, check: &str) -> &'a Value {
    h["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["component"] == component && c["check"] == check)
        .unwrap_or_else(|| panic!("no {component} {check} check in {h}"))
}

pub fn create(api: &Api) -> Result<Value, ClientError> {
    api.post_json("create", &paths::snapshots(VM))
}

pub fn list_ids(api: &Api) -> Vec<String> {
    let list: Value = api
        .get_json("list", &paths::snapshots(VM))
        .expect("list snapshots");
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

fn status_of(r: Result<Value, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(e) => e.status().unwrap_or_else(|| panic!("{e:?}")),
    }
}

/// The whole disk of a snapshot, read through the API.
pub fn read_disk(api: &Api, snap: &str) -> Vec<u8> {
    let mut r = api
        .get_range(VM, snap, DISK, 0, DISK_SIZE as u64)
        .expect("read the disk");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut got).unwrap();
    got
}

/// The sequence: one transient write error on the blocks of
/// db_file during a create; afterwards, without a restart, `/health` is 503
/// while the store cannot write, then 200, and the next create and every
/// read succeed; the failed create left nothing.
#[test]
fn the_store_recovers_from_a_transient_disk_write_error() {
    let scratch = Fs::Xfs.scratch("heal-store");
    let repo = scratch.path("repo");
    make_repo(&repo, 16);
    let disk = FaultyDisk::new("store");
    let db = disk.mnt.join("exporter.db");
    let server = start(
        &scratch,
        &repo,
        Setup {
            db: Some(&db),
            ..Setup::default()
        },
    );
    let api = server.api();
    let (code, h) = health(&api);
    assert_eq!(code, 200, "{h}");

    let first = create(&api).expect("create before the fault");
    let first = first["id"].as_str().unwrap().to_owned();
    let want = fs::read(repo.join("VirtualDisks").join(DISK)).unwrap();

    // LMDB's two meta pages: a commit writes one of them last.
    let meta = disk.ranges_of(&db, 8192);
    disk.fail_writes(&meta);
    let failed = status_of(create(&api));
    assert!(failed >= 500, "create on a failing disk answered {failed}");

    // Health tells: the store cannot write (its probe fails too).
    let (code, h) = health(&api);
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["status"], "unavailable");
    let store = check(&h, "store", "writable");
    assert_eq!(store["ok"], false, "{h}");
    assert!(
        !store["reason"]
            .as_str()
            .unwrap()
            .contains(disk.mnt.to_str().unwrap()),
        "the reason names a host path: {h}"
    );
    assert_eq!(check(&h, "io", "up")["ok"], true, "{h}");
    assert_eq!(check(&h, "repository", "readable")["ok"], true, "{h}");

    // The disk heals: so does the service, without a restart.
    disk.fail_writes(&[]);
    wait_until("health 200 after the disk healed", || health(&api).0 == 200);
    let next = create(&api).expect("create after the disk healed");
    let next = next["id"].as_str().unwrap().to_owned();
    assert_eq!(list_ids(&api), vec![first.clone(), next.clone()]);
    for id in [&first, &next] {
        assert!(
            read_disk(&api, id) == want,
            "snapshot {id} reads other bytes"
        );
    }
    // Nothing of the failed create is left on the repository either.
    let mut folders: Vec<String> = fs::read_dir(repo.join("CoriolisSnapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    folders.sort();
    let mut want_folders = vec![first, next];
    want_folders.sort();
    assert_eq!(folders, want_folders);
    let log = server.log_text();
    assert!(log.contains("reopened the LMDB environment"), "{log}");
}

/// Reads of every kind racing a DELETE of their snapshot answer what
/// happened (200 before, 404 after, or a cut body), never 500: the
/// issue's 6 clients x 400 requests made 1-2 rounds in 20 answer 500
/// "damaged". Listings during the delete never fail.
#[test]
fn reads_racing_a_delete_never_answer_500() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    const ROUNDS: usize = 200;
    let scratch = Fs::Xfs.scratch("heal-race");
    let repo = scratch.path("repo");
    make_repo(&repo, 17);
    let server = start(&scratch, &repo, Setup::default());
    let api = server.api();
    let base = create(&api).unwrap()["id"].as_str().unwrap().to_owned();
    let counts: Mutex<BTreeMap<(&str, u16), u64>> = Mutex::default();
    let fails: Mutex<Vec<String>> = Mutex::default();
    let mut rng = fastrand::Rng::with_seed(18);
    for _ in 0..ROUNDS {
        let snap = create(&api).unwrap()["id"].as_str().unwrap().to_owned();
        let disk = paths::disk(VM, &snap, DISK);
        let kinds: [(&str, String); 6] = [
            ("disk", disk.clone()),
            ("snapshot", paths::snapshot(VM, &snap)),
            (
                "diff",
                format!("{}?compareTo={base}", paths::snapshot(VM, &snap)),
            ),
            ("checksums", format!("{disk}/checksums")),
            (
                "incremental",
                format!("{disk}/incremental?compareTo={base}"),
            ),
            ("list", paths::snapshots(VM)),
        ];
        let deleted = AtomicBool::new(false);
        let delay = Duration::from_micros(rng.u64(0..20_000));
        std::thread::scope(|sc| {
            for (kind, path) in &kinds {
                let (api, deleted, counts, fails) = (&api, &deleted, &counts, &fails);
                sc.spawn(move || {
                    let mut after = 0;
                    while after < 2 {
                        if deleted.load(Ordering::Acquire) {
                            after += 1;
                        }
                        let r = api.get(kind, path).expect("a request");
                        let status = r.status().as_u16();
                        let mut body = Vec::new();
                        // A body cut by the delete is a fine answer.
                        let _ =
                            std::io::Read::read_to_end(&mut r.into_body().into_reader(), &mut body);
                        *counts.lock().unwrap().entry((kind, status)).or_default() += 1;
                        if status >= 500 {
                            fails.lock().unwrap().push(format!(
                                "{kind} {status}: {}",
                                String::from_utf8_lossy(&body)
                            ));
                        }
                    }
                });
            }
            std::thread::sleep(delay);
            api.delete("delete", &paths::snapshot(VM, &snap)).unwrap();
            deleted.store(true, Ordering::Release);
        });
    }
    let counts = counts.into_inner().unwrap();
    eprintln!("answers by kind and status: {counts:?}");
    let fails = fails.into_inner().unwrap();
    assert!(
        fails.is_empty(),
        "{} answers of 5xx: {fails:#?}",
        fails.len()
    );
    // The race was run: both sides of it were seen.
    assert!(counts.keys().any(|(_, s)| *s == 404), "{counts:?}");
    assert!(counts.contains_key(&("disk", 200)), "{counts:?}");
}

/// `--verify` of a snapshot deleted meanwhile is "not found" (exit 4), not
/// "the server has no checksums endpoint" (exit 1): the 404 of the
/// checksums is told apart by asking whether the disk is still served.
#[test]
fn verifying_a_deleted_snapshot_is_not_found() {
    use coriolis_ovm_exporter::client::error::exit;
    use coriolis_ovm_exporter::client::verify::verify_disk;

    let scratch = Fs::Xfs.scratch("heal-verify");
    let repo = scratch.path("repo");
    make_repo(&repo, 19);
    let server = start(&scratch, &repo, Setup::default());
    let api = server.api();
    let snap = create(&api).unwrap()["id"].as_str().unwrap().to_owned();
    let replica = scratch.path("replica.img");
    fs::write(&replica, read_disk(&api, &snap)).unwrap();
    let ok = verify_disk(&api, VM, &snap, DISK, &replica, 65536).unwrap();
    assert!(ok.ok(), "{}", ok.describe());

    api.delete("delete", &paths::snapshot(VM, &snap)).unwrap();
    let err = verify_disk(&api, VM, &snap, DISK, &replica, 65536).unwrap_err();
    assert_eq!(err.exit_code(), exit::NOT_FOUND, "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
    assert!(!err.to_string().contains("checksums endpoint"), "{err}");

    // The client binary, racing downloads with --verify against deletes:
    // each run succeeds or ends "not found" (exit 4), never exit 1.
    let mut rng = fastrand::Rng::with_seed(20);
    let mut codes = std::collections::BTreeMap::<i32, u32>::new();
    for round in 0..12 {
        let snap = create(&api).unwrap()["id"].as_str().unwrap().to_owned();
        let out = scratch.path(&format!("out{round}"));
        let mut cmd = Command::new(BIN);
        cmd.args(["client", "download", VM, &snap, "--verify", "--out"])
            .arg(&out)
            .env("XDG_CACHE_HOME", scratch.path("cache"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        server.client_env(&mut cmd);
        let child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        api.delete("delete", &paths::snapshot(VM, &snap)).unwrap();
        let done = child.wait_with_output().unwrap();
        let code = done.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert!(
            code == 0 || (code == exit::NOT_FOUND && stderr.to_lowercase().contains("not found")),
            "round {round}: exit {code}: {stderr}"
        );
        *codes.entry(code).or_default() += 1;
    }
    eprintln!("download --verify racing a delete: exit codes {codes:?}");
}

/// A create whose answer is lost (the server killed after the commit,
/// before answering) is retried by the client with the same
/// `Idempotency-Key`, and the restarted server answers the snapshot the
/// first try made: one snapshot, whose id the client learns. Without the
/// header a create makes a new snapshot, as before.
#[test]
fn a_create_retried_after_a_crash_answers_the_same_snapshot() {
    use coriolis_ovm_exporter::snapshot::fault;

    let scratch = Fs::Xfs.scratch("heal-idem");
    let repo = scratch.path("repo");
    make_repo(&repo, 21);
    let mut server = start(
        &scratch,
        &repo,
        Setup {
            env: &[(fault::ENV, fault::CREATE_AFTER_COMMIT)],
            ..Setup::default()
        },
    );
    let api = server.api();
    let snap: Value = std::thread::scope(|sc| {
        let restarter = sc.spawn(|| {
            // The fault point kills the server inside the first create.
            let status = server.wait_exit();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "{status}"
            );
            server.set_env(&[]);
            server.restart();
        });
        let snap = api.create_snapshot(VM).expect("the retried create");
        restarter.join().unwrap();
        snap
    });
    let id = snap["id"].as_str().unwrap().to_owned();
    // The restarted server kept the token's secret: the same api works.
    assert_eq!(
        list_ids(&api),
        vec![id.clone()],
        "one snapshot, the one answered"
    );
    assert!(read_disk(&api, &id) == fs::read(repo.join("VirtualDisks").join(DISK)).unwrap());
    let log = server.log_text();
    assert!(
        log.contains("create replayed for its idempotency key"),
        "{log}"
    );

    // A key is per create: another call makes another snapshot; so does a
    // create without the header.
    let second: Value = api.create_snapshot(VM).unwrap();
    let third = create(&api).unwrap();
    let ids = list_ids(&api);
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&second["id"].as_str().unwrap().to_owned()));
    assert!(ids.contains(&third["id"].as_str().unwrap().to_owned()));
}

/// A repository that cannot be read is skipped: `GET /vms` still answers
/// the others, and `/health` (503) names it with its reason, without its
/// path (the `coe_health_check` gauges render the same checks: unit test in
/// api::metrics).
#[test]
fn a_skipped_repository_shows_in_health_and_metrics() {
    let scratch = Fs::Xfs.scratch("heal-skip");
    let repo = scratch.path("repo");
    make_repo(&repo, 22);
    let gone = scratch.path("gone-repo");
    let extra = format!(
        "[[inventory.repositories]]\nid = \"gone\"\nmount_point = {}\n",
        toml_path(&gone)
    );
    let server = start(
        &scratch,
        &repo,
        Setup {
            extra: &extra,
            ..Setup::default()
        },
    );
    let api = server.api();
    let vms: Value = api.get_json("vms", "/vms").unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    let (code, h) = health(&api);
    assert_eq!(code, 503, "{h}");
    let skipped = h["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "gone" && c["check"] == "readable")
        .unwrap_or_else(|| panic!("{h}"));
    assert_eq!(skipped["ok"], false, "{h}");
    let reason = skipped["reason"].as_str().unwrap();
    assert!(reason.contains("skipped"), "{h}");
    assert!(
        !reason.contains(gone.to_str().unwrap()),
        "a host path in {h}"
    );
    assert_eq!(check(&h, "store", "writable")["ok"], true, "{h}");
    let good = h["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == REPO_ID)
        .all(|c| c["ok"] == true);
    assert!(good, "{h}");
}
