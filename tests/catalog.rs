//! Two nodes, one repository: the pool-wide catalog (docs/catalog.md).
//!
//! Two real exporters (the binary twice: own database, owner id, port and
//! certificate) serve one repository on XFS and on btrfs. Whatever one
//! makes, the other lists, diffs, serves and deletes; a client's
//! incremental chain continues when it switches node between runs; a base
//! that cannot be used answers a stable `code`; `rebuild-db` and
//! `reconcile` work on the layout; a repository written in the format
//! before the catalog is adopted whole; and creates, deletes and purges
//! racing on both nodes with `kill -9` of either leave both listings equal
//! to each other and to the disk, nothing complete lost, nothing half-made
//! listed or left after the lease.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use coriolis_ovm_exporter::client::error::exit;
use coriolis_ovm_exporter::client::http::{paths, read_json, Api};
use coriolis_ovm_exporter::snapshot::fault;
use serde_json::Value;

use crate::common::server::{Server, Setup};
use crate::common::{write_vm_cfg, Fs, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_coriolis-ovm-exporter");
pub(crate) const VM: &str = "0004fb00000600000000000000ca7a01";
pub(crate) const DISKS: [&str; 2] = [
    "0004fb00001200000000000000ca7aaa.img",
    "0004fb00001200000000000000ca7abb.img",
];
pub(crate) const DISK_SIZE: u64 = 4 << 20;
const SNAPS: &str = "CoriolisSnapshots";

/// A repository with one VM of two disks holding some random data.
pub(crate) fn make_repo(repo: &Path) {
    let disks = repo.join("VirtualDisks");
    fs::create_dir_all(&disks).unwrap();
    let mut rng = fastrand::Rng::with_seed(0xca7a);
    let paths: Vec<PathBuf> = DISKS.iter().map(|d| disks.join(d)).collect();
    for p in &paths {
        let f = fs::File::create(p).unwrap();
        f.set_len(DISK_SIZE).unwrap();
        for k in 0..3u64 {
            let mut b = vec![0u8; 256 << 10];
            rng.fill(&mut b);
            f.write_all_at(&b, k * (1 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    write_vm_cfg(
        repo,
        VM,
        "0004fb00-0006-0000-0000-0000000ca7a0",
        "catalog",
        &refs,
    );
}

/// Writes a few random blocks into each disk of the VM.
fn change_disks(repo: &Path, rng: &mut fastrand::Rng) {
    for d in DISKS {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(repo.join("VirtualDisks").join(d))
            .unwrap();
        for _ in 0..4 {
            let mut b = vec![0u8; 64 << 10];
            rng.fill(&mut b);
            f.write_all_at(&b, rng.u64(0..DISK_SIZE - (64 << 10)))
                .unwrap();
        }
        f.sync_all().unwrap();
    }
}

/// One node of the pool: an exporter with its own folder (certificate,
/// config, database) and owner id.
struct Node {
    server: Server,
    dir: Scratch,
    name: &'static str,
}

impl Node {
    fn start(repo: &Path, name: &'static str, lease: u64) -> Node {
        let dir = Scratch::temp(&format!("catalog-{name}"));
        let extra = format!("[store]\nowner = \"{name}\"\nlease_seconds = {lease}\n");
        let server = Server::start_with(
            &dir.dir,
            repo,
            &mut fastrand::Rng::new(),
            Setup {
                extra: &extra,
                ..Setup::default()
            },
        );
        Node { server, dir, name }
    }

    /// The client binary against this node; its output.
    fn client(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("client")
            .args(args)
            .env("XDG_CACHE_HOME", self.dir.path("cache"));
        self.server.client_env(&mut cmd);
        cmd.output().unwrap()
    }

    /// The client, expected to succeed.
    fn client_ok(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert!(
            out.status.success(),
            "node {}: client {args:?}: {:?}\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The admin subcommand `cmd` on this node's config (server stopped).
    fn admin(&self, cmd: &str) -> String {
        let out = Command::new(BIN)
            .arg(cmd)
            .arg("-config")
            .arg(self.server.config_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn create(api: &Api) -> Value {
    api.post_json("create", &paths::snapshots(VM)).unwrap()
}

pub(crate) fn list(api: &Api) -> Value {
    api.get_json("list", &paths::snapshots(VM)).unwrap()
}

fn ids(api: &Api) -> Vec<String> {
    list(api)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) fn id_of(s: &Value) -> String {
    s["id"].as_str().unwrap().to_owned()
}

/// `GET` a diff: (status, JSON answer or error body).
fn diff(api: &Api, snap: &str, base: &str) -> (u16, Value) {
    let r = api
        .get(
            "diff",
            &format!("{}?compareTo={base}", paths::snapshot(VM, snap)),
        )
        .unwrap();
    let status = r.status().as_u16();
    (status, read_json("diff", r).unwrap())
}

/// The clone of disk `d` of snapshot `snap` on the repository.
fn clone_path(repo: &Path, snap: &str, d: &str) -> PathBuf {
    repo.join(SNAPS).join(snap).join(d)
}

/// The replicas in `out` equal the clones of `snap`, byte for byte.
fn assert_replica(repo: &Path, out: &Path, snap: &str) {
    for d in DISKS {
        let want = fs::read(clone_path(repo, snap, d)).unwrap();
        let got = fs::read(out.join(d)).unwrap();
        assert!(
            got == want,
            "replica of {d} differs from snapshot {snap} (cmp)"
        );
    }
}

/// The entries of `CoriolisSnapshots` other than the generation token.
pub(crate) fn on_disk(repo: &Path) -> BTreeSet<String> {
    match fs::read_dir(repo.join(SNAPS)) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".coriolis-generation")
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn two_nodes_serve_one_catalog(fs_kind: Fs) {
    let scratch = fs_kind.scratch("catalog-two");
    let repo = scratch.path("repo");
    make_repo(&repo);
    let a = Node::start(&repo, "node-a", 1800);
    let mut b = Node::start(&repo, "node-b", 1800);
    let (api_a, api_b) = (a.server.api(), b.server.api());
    let mut rng = fastrand::Rng::with_seed(15);
    let out = scratch.path("replica");
    let out_s = out.to_str().unwrap();

    // Made on A, listed the same on B (chunks and all); a full copy
    // through B.
    let s1 = id_of(&create(&api_a));
    assert_eq!(ids(&api_b), vec![s1.clone()]);
    assert_eq!(list(&api_a), list(&api_b));
    b.client_ok(&["download", VM, &s1, "--out", out_s]);
    assert_replica(&repo, &out, &s1);

    // The chain continues on the other node: made on B, diffed against
    // A's snapshot the same on both nodes, applied through A by the
    // stream; then made on A, applied through B by ranges.
    change_disks(&repo, &mut rng);
    let s2 = id_of(&create(&api_b));
    let (st, d_a) = diff(&api_a, &s2, &s1);
    assert_eq!(st, 200, "{d_a}");
    assert_eq!(diff(&api_b, &s2, &s1), (200, d_a));
    a.client_ok(&[
        "download",
        VM,
        &s2,
        "--diff-from",
        &s1,
        "--out",
        out_s,
        "--transport",
        "stream",
    ]);
    assert_replica(&repo, &out, &s2);
    change_disks(&repo, &mut rng);
    let s3 = id_of(&create(&api_a));
    b.client_ok(&[
        "download",
        VM,
        &s3,
        "--diff-from",
        &s2,
        "--out",
        out_s,
        "--transport",
        "ranges",
        "--verify",
    ]);
    assert_replica(&repo, &out, &s3);
    assert_eq!(ids(&api_a), vec![s1.clone(), s2.clone(), s3.clone()]);
    assert_eq!(list(&api_a), list(&api_b));

    // rebuild-db and reconcile on the new layout: B's database rebuilt
    // from the repository adopts every snapshot, whoever made it.
    b.server.stop();
    let rebuilt = b.admin("rebuild-db");
    assert_eq!(rebuilt.matches("adopted").count(), 3, "{rebuilt}");
    let reconciled = b.admin("reconcile");
    assert!(!reconciled.contains("removed"), "{reconciled}");
    b.server.restart();
    let api_b = b.server.api();
    assert_eq!(list(&api_a), list(&api_b));

    // Deleted on B (a snapshot A made), gone on A and on disk.
    b.client_ok(&["snapshots", "delete", VM, &s1]);
    assert_eq!(ids(&api_a), vec![s2.clone(), s3.clone()]);
    assert!(!repo.join(SNAPS).join(&s1).exists());

    // Lost bases, each with its code, the same on both nodes.
    let (st, body) = diff(&api_a, &s3, &s1);
    assert_eq!(
        (st, body["code"].as_str()),
        (404, Some("base_unavailable")),
        "{body}"
    );
    assert_eq!(diff(&api_b, &s3, &s1), (st, body.clone()));
    assert!(
        body["details"].as_str().unwrap().contains("full copy"),
        "{body}"
    );
    // A base whose clone changed (a replica of it made before).
    let fresh = scratch.path("fresh");
    let fresh_s = fresh.to_str().unwrap();
    a.client_ok(&["download", VM, &s2, "--out", fresh_s]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(clone_path(&repo, &s2, DISKS[0]))
        .unwrap();
    f.write_all_at(b"tampered", 8192).unwrap();
    drop(f);
    for api in [&api_a, &api_b] {
        let (st, body) = diff(api, &s3, &s2);
        assert_eq!(
            (st, body["code"].as_str()),
            (409, Some("base_changed")),
            "{body}"
        );
    }
    // The client says a full copy is needed, and makes it when allowed.
    let refused = a.client(&["download", VM, &s3, "--diff-from", &s2, "--out", out_s]);
    assert_eq!(refused.status.code(), Some(exit::CONFLICT));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("base_changed") && stderr.contains("--full-if-needed"),
        "{stderr}"
    );
    let err = a.client(&[
        "download",
        VM,
        &s3,
        "--diff-from",
        &s2,
        "--out",
        fresh_s,
        "--full-if-needed",
    ]);
    assert!(
        err.status.success(),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    assert!(String::from_utf8_lossy(&err.stderr).contains("full copy"));
    assert_replica(&repo, &fresh, &s3);
    // A disk replaced by another file (a restore): no diff across it.
    let disk = repo.join("VirtualDisks").join(DISKS[1]);
    let copy = repo.join("VirtualDisks").join("restored.tmp");
    fs::copy(&disk, &copy).unwrap();
    fs::rename(&copy, &disk).unwrap();
    let s4 = id_of(&create(&api_b));
    for api in [&api_a, &api_b] {
        let (st, body) = diff(api, &s4, &s3);
        assert_eq!(
            (st, body["code"].as_str()),
            (409, Some("disk_replaced")),
            "{body}"
        );
    }

    // Purged on A: gone on B and on disk.
    a.client_ok(&["snapshots", "purge", VM, "--yes"]);
    assert!(ids(&api_b).is_empty());
    assert_eq!(on_disk(&repo), BTreeSet::new());
    drop((a, b));
}

#[test]
fn two_nodes_serve_one_catalog_xfs() {
    two_nodes_serve_one_catalog(Fs::Xfs);
}

#[test]
fn two_nodes_serve_one_catalog_btrfs() {
    two_nodes_serve_one_catalog(Fs::Btrfs);
}

/// Sets the mtime of `p` (file or folder) `ago` in the past.
fn age_by(p: &Path, ago: Duration) {
    fs::File::open(p)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

/// A repository as the exporter wrote it before the catalog (published
/// folders with owner mark, clones and a manifest without `parent_ino`; no
/// generation token; half-made folders without manifest) is adopted
/// whole by new exporters with empty databases.
#[test]
fn a_repository_of_the_previous_format_is_adopted_without_loss() {
    let scratch = Fs::Xfs.scratch("catalog-upgrade");
    let repo = scratch.path("repo");
    make_repo(&repo);
    let mut rng = fastrand::Rng::with_seed(16);
    let (s1, s2) = {
        let old = Node::start(&repo, "old-node", 1800);
        let api = old.server.api();
        let s1 = id_of(&create(&api));
        change_disks(&repo, &mut rng);
        let s2 = id_of(&create(&api));
        (s1, s2)
    };
    // Back to the previous format.
    let snaps = repo.join(SNAPS);
    fs::remove_file(snaps.join(".coriolis-generation")).unwrap();
    for s in [&s1, &s2] {
        let m = snaps.join(s).join(".coriolis-manifest.json");
        let mut v: Value = serde_json::from_slice(&fs::read(&m).unwrap()).unwrap();
        for d in v["disks"].as_array_mut().unwrap() {
            d.as_object_mut().unwrap().remove("parent_ino").unwrap();
        }
        fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
    // A create of the old node interrupted long ago, and one just now.
    let stale = uuid::Uuid::new_v4().to_string();
    let recent = uuid::Uuid::new_v4().to_string();
    for h in [&stale, &recent] {
        fs::create_dir(snaps.join(h)).unwrap();
        fs::write(snaps.join(h).join(".coriolis-owner"), "old-node\n").unwrap();
        fs::write(snaps.join(h).join(DISKS[0]), "partial").unwrap();
    }
    for p in [
        snaps.join(&stale).join(".coriolis-owner"),
        snaps.join(&stale).join(DISKS[0]),
        snaps.join(&stale),
    ] {
        age_by(&p, Duration::from_secs(7200));
    }

    let a = Node::start(&repo, "node-a", 1800);
    let b = Node::start(&repo, "node-b", 1800);
    let (api_a, api_b) = (a.server.api(), b.server.api());
    assert_eq!(ids(&api_a), vec![s1.clone(), s2.clone()]);
    assert_eq!(list(&api_a), list(&api_b));
    // The old node's stale half-made folder went (lease expired); the
    // recent one stays until its lease expires.
    assert_eq!(
        on_disk(&repo),
        BTreeSet::from([s1.clone(), s2.clone(), recent.clone()])
    );
    // Nothing lost: a full copy of s1 and the diff to s2, byte-identical.
    let out = scratch.path("replica");
    let out_s = out.to_str().unwrap();
    a.client_ok(&["download", VM, &s1, "--out", out_s]);
    b.client_ok(&["download", VM, &s2, "--diff-from", &s1, "--out", out_s]);
    assert_replica(&repo, &out, &s2);
}

/// A create's `Idempotency-Key` travels in its manifest: a retry through
/// another node (the first one died before answering, or the endpoint
/// moved) answers the same snapshot, and so does a database rebuilt from
/// the manifests.
#[test]
fn an_idempotency_key_is_honoured_by_every_node() {
    use coriolis_ovm_exporter::snapshot::{Manager, StoreConfig};

    let scratch = Fs::Xfs.scratch("catalog-idem");
    let repo = scratch.path("repo");
    let inv = Arc::new(crate::snapshot::Inventory::default());
    let vm = crate::snapshot::vm_with(&repo, "vm", &["a.img"]);
    fs::write(&vm.disks[0].path, vec![7u8; 1 << 20]).unwrap();
    inv.set(vm);
    let open = |name: &str| {
        let cfg = StoreConfig {
            owner: Some(name.into()),
            ..StoreConfig::default()
        };
        let m = Manager::open(
            &scratch.path(&format!("{name}/exporter.db")),
            &cfg,
            inv.clone(),
        )
        .unwrap();
        m.reconcile(std::slice::from_ref(&repo)).unwrap();
        m
    };
    let (a, b) = (open("node-a"), open("node-b"));
    let (made, replayed) = a.create_keyed("vm", Some("key-1")).unwrap();
    assert!(!replayed);
    let (again, replayed) = b.create_keyed("vm", Some("key-1")).unwrap();
    assert!(replayed, "node B made another snapshot for the same key");
    assert_eq!(again.id, made.id);
    assert_eq!(b.ids("vm").unwrap(), vec![made.id.clone()]);
    // Another key makes another snapshot.
    let (other, replayed) = b.create_keyed("vm", Some("key-2")).unwrap();
    assert!(!replayed && other.id != made.id);
    // A rebuilt database still knows the keys.
    b.rebuild(std::slice::from_ref(&repo)).unwrap();
    let (third, replayed) = b.create_keyed("vm", Some("key-2")).unwrap();
    assert!(replayed);
    assert_eq!(third.id, other.id);
    assert_eq!(a.ids("vm").unwrap(), vec![made.id, other.id]);
}

/// `GET /vms` refreshes the catalog once for the whole list: the
/// repository's generation token is opened once per request, not once per
/// VM (inotify on `CoriolisSnapshots` sees every open of it).
#[test]
fn listing_the_vms_reads_the_repository_token_once() {
    use rustix::fs::inotify;

    let scratch = Fs::Xfs.scratch("catalog-vms");
    let repo = scratch.path("repo");
    make_repo(&repo);
    // Four more VMs on the same repository, one small disk each.
    let mut vms = vec![VM.to_owned()];
    for i in 0..4u8 {
        let vm = format!("0004fb00000600000000000000ca7b0{i}");
        let disk = repo.join("VirtualDisks").join(format!("{vm}.img"));
        fs::write(&disk, vec![i; 64 << 10]).unwrap();
        let uuid = format!("0004fb00-0006-0000-0000-0000000ca7b{i}");
        write_vm_cfg(&repo, &vm, &uuid, &format!("more-{i}"), &[disk.as_path()]);
        vms.push(vm);
    }
    let node = Node::start(&repo, "node-a", 1800);
    let api = node.server.api();
    // A snapshot writes the token; a first list rescans and sweeps.
    create(&api);
    let list_vms = || -> BTreeSet<String> {
        let v: Value = api.get_json("vms", &paths::vms()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(list_vms(), vms.iter().cloned().collect());

    let ino =
        inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&ino, repo.join(SNAPS), inotify::WatchFlags::OPEN).unwrap();
    assert_eq!(list_vms().len(), 5);
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 << 10];
    let mut reader = inotify::Reader::new(&ino, &mut buf);
    let mut opens = 0;
    loop {
        match reader.next() {
            Ok(e) => {
                if e.file_name()
                    .is_some_and(|n| n.to_bytes() == b".coriolis-generation")
                {
                    opens += 1;
                }
            }
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("inotify: {e}"),
        }
    }
    assert_eq!(
        opens, 1,
        "GET /vms of 5 VMs on one repository opened its token {opens} times"
    );
}

/// Half-made folders are removed only by their maker (at its start) or,
/// once their lease expired, by any node; a fresh or renewed one of another
/// node is left alone. Never is a published snapshot touched. Ages are set
/// on the files (no test waits for a lease to pass).
#[test]
fn debris_goes_only_by_its_maker_or_after_the_lease() {
    let scratch = Fs::Xfs.scratch("catalog-debris");
    let repo = scratch.path("repo");
    make_repo(&repo);
    // Node A sweeps every half second (lease 1 s): only aged debris is
    // put where it looks.
    let a = Node::start(&repo, "node-a", 1);
    let api_a = a.server.api();
    let kept = id_of(&create(&api_a));
    let snaps = repo.join(SNAPS);
    let half = |name: &str, owner: &str, age: Option<Duration>| {
        let dir = snaps.join(name);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(".coriolis-owner"), owner).unwrap();
        fs::write(dir.join(DISKS[0]), "partial").unwrap();
        if let Some(ago) = age {
            for p in [dir.join(DISKS[0]), dir.join(".coriolis-owner"), dir] {
                age_by(&p, ago);
            }
        }
    };
    let id = || uuid::Uuid::new_v4().to_string();
    let long_ago = Some(Duration::from_secs(7200));
    let (mine, fresh, renewed, expired, trash, old_format) = (
        format!(".coriolis-staging-{}", id()),
        format!(".coriolis-staging-{}", id()),
        format!(".coriolis-staging-{}", id()),
        format!(".coriolis-staging-{}", id()),
        format!(".coriolis-trash-{}", id()),
        id(),
    );
    half(&mine, "node-b\n", long_ago);
    half(&fresh, "node-x\n", None);
    half(&renewed, "node-x\n", long_ago);
    // Its maker renewed the lease: the owner mark touched now.
    fs::File::open(snaps.join(&renewed).join(".coriolis-owner"))
        .unwrap()
        .set_modified(SystemTime::now())
        .unwrap();
    half(&expired, "node-x\n", long_ago);
    half(&trash, "node-x\n", long_ago);
    half(&old_format, "node-x\n", long_ago);
    // Node B (lease 1800 s) starts: its own half-made folder goes (no
    // create of its own can be running), so do the expired ones, the trash
    // and an old-format folder without manifest whose lease expired; the
    // fresh and the renewed ones of another maker stay.
    let b = Node::start(&repo, "node-b", 1800);
    let api_b = b.server.api();
    assert_eq!(ids(&api_b), vec![kept.clone()]);
    assert_eq!(
        on_disk(&repo),
        BTreeSet::from([kept.clone(), fresh.clone(), renewed.clone()])
    );
    // Once they are past the lease, a running node's next requests remove
    // them; the snapshot stays.
    for name in [&fresh, &renewed] {
        for p in [
            snaps.join(name).join(DISKS[0]),
            snaps.join(name).join(".coriolis-owner"),
            snaps.join(name),
        ] {
            age_by(&p, Duration::from_secs(7200));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while on_disk(&repo) != BTreeSet::from([kept.clone()]) {
        assert!(
            Instant::now() < deadline,
            "debris never went: {:?}",
            on_disk(&repo)
        );
        assert_eq!(ids(&api_a), vec![kept.clone()]);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(ids(&api_b), vec![kept]);
}

/// One create, delete or purge sent to a node, and what came of it. Times
/// are wall-clock nanoseconds, so that logs of nodes in two guests compare.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Op {
    node: usize,
    kind: String,
    /// The id created or deleted (None for a purge, or a create without
    /// answer).
    id: Option<String>,
    started: u128,
    ended: u128,
    answered: bool,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `n` random operations on `api` (node `node`): creates, deletes of a
/// listed snapshot, now and then a purge. After an op without answer (the
/// node was killed) it waits until the node answers again.
pub(crate) fn race_ops(api: &Api, node: usize, seed: u64, n: usize) -> Vec<Op> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(n);
    let mut errors = 0;
    for _ in 0..n {
        let started = now_ns();
        let roll = rng.u32(0..100);
        let listed: Vec<String> = match api.get_json::<Value>("list", &paths::snapshots(VM)) {
            Ok(v) => v.as_array().unwrap().iter().map(id_of).collect(),
            Err(_) => Vec::new(),
        };
        let (kind, id, error) = if roll < 8 {
            let r = api.delete("purge", &paths::snapshots(VM));
            ("purge", None, r.err())
        } else if roll < 45 && !listed.is_empty() {
            let id = listed[rng.usize(0..listed.len())].clone();
            let r = api.delete("delete", &paths::snapshot(VM, &id));
            ("delete", Some(id), r.err())
        } else {
            match api.post_json::<Value>("create", &paths::snapshots(VM)) {
                Ok(v) => ("create", Some(id_of(&v)), None),
                Err(e) => ("create", None, Some(e)),
            }
        };
        let answered = error.is_none();
        if let Some(e) = &error {
            if errors < 5 {
                eprintln!("node {node}: {kind} failed: {}", e.chain());
            }
            errors += 1;
        }
        out.push(Op {
            node,
            kind: kind.into(),
            id,
            started,
            ended: now_ns(),
            answered,
        });
        if !answered {
            // The node is down: wait until the killer restarted it.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(60)
                && !api
                    .get("health", "/health")
                    .is_ok_and(|r| r.status().is_success())
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    out
}

/// The kill -9 loop of a race, until `done`: kills one of `nodes` (picked
/// by `pick`, given the kills so far), restarts it, with a fault point
/// armed when `arm` says so (it then dies in the middle of its next create
/// or delete). Counts the kills in `kills`.
pub(crate) fn race_killer(
    nodes: &[Arc<Mutex<Server>>],
    done: &std::sync::atomic::AtomicBool,
    kills: &std::sync::atomic::AtomicUsize,
    seed: u64,
    pause_ms: std::ops::Range<u64>,
    pick: impl Fn(usize, &mut fastrand::Rng) -> (usize, bool),
) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut rng = fastrand::Rng::with_seed(seed);
    while !done.load(SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.u64(pause_ms.clone())));
        let (which, arm) = pick(kills.load(SeqCst), &mut rng);
        let mut n = nodes[which].lock().unwrap();
        n.kill();
        kills.fetch_add(1, SeqCst);
        if arm {
            let p = fault::POINTS[rng.usize(0..fault::POINTS.len())];
            n.set_env(&[(fault::ENV, p)]);
        } else {
            n.set_env(&[]);
        }
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        n.restart_tolerating_faults();
    }
}

/// More ops on `api` until the killer killed `min` times (a fast machine
/// may finish the planned ones first); at most two minutes.
pub(crate) fn race_until_killed(
    api: &Api,
    node: usize,
    kills: &std::sync::atomic::AtomicUsize,
    min: usize,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let t = Instant::now();
    let mut seed = 1000;
    while kills.load(std::sync::atomic::Ordering::SeqCst) < min {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the killer is stuck"
        );
        ops.extend(race_ops(api, node, seed, 2));
        seed += 1;
    }
    ops
}

/// After a race, on a node whose listing (`listed`) equals the disk: every
/// listed snapshot is complete, nothing half-made is left, every snapshot
/// answered as made is listed unless a delete named it or a purge still
/// ran after it started (`slack_ns` for clocks of two machines), and no
/// snapshot answered as deleted is back.
pub(crate) fn check_race(
    repo: &Path,
    disks: &[&str],
    disk_size: u64,
    listed: &BTreeSet<String>,
    ops: &[Op],
    slack_ns: u128,
) {
    let disk = on_disk(repo);
    assert_eq!(&disk, listed, "the listing is not what is on disk");
    for id in listed {
        for d in disks {
            let p = repo.join(SNAPS).join(id).join(d);
            assert_eq!(
                fs::metadata(&p).unwrap().len(),
                disk_size,
                "{}",
                p.display()
            );
        }
        assert!(repo
            .join(SNAPS)
            .join(id)
            .join(".coriolis-manifest.json")
            .is_file());
    }
    assert!(
        disk.iter().all(|n| !n.starts_with('.')),
        "half-made left: {disk:?}"
    );
    for c in ops.iter().filter(|o| o.kind == "create" && o.answered) {
        let id = c.id.as_deref().unwrap();
        if disk.contains(id) {
            continue;
        }
        let explained = ops.iter().any(|o| {
            (o.kind == "delete" && o.id.as_deref() == Some(id))
                || (o.kind == "purge" && o.ended + slack_ns >= c.started)
        });
        assert!(
            explained,
            "snapshot {id} (made on node {}) was lost",
            c.node
        );
    }
    for d in ops.iter().filter(|o| o.kind == "delete" && o.answered) {
        assert!(!disk.contains(d.id.as_deref().unwrap()), "{d:?} is back");
    }
}

/// Counts of (sent, answered) per kind.
pub(crate) fn op_counts(ops: &[Op]) -> std::collections::BTreeMap<String, (usize, usize)> {
    let mut by_kind = std::collections::BTreeMap::new();
    for o in ops {
        let e: &mut (usize, usize) = by_kind.entry(o.kind.clone()).or_default();
        e.0 += 1;
        e.1 += usize::from(o.answered);
    }
    by_kind
}

fn racing(fs_kind: Fs) {
    const LEASE: u64 = 2;
    const WORKERS_PER_NODE: usize = 2;
    const OPS_PER_WORKER: usize = 70;
    let scratch = fs_kind.scratch("catalog-race");
    let repo = scratch.path("repo");
    make_repo(&repo);
    let nodes: Vec<Node> = ["race-a", "race-b"]
        .into_iter()
        .map(|n| Node::start(&repo, n, LEASE))
        .collect();
    // Tokens stay valid across restarts (same JWT secret).
    let apis: Vec<Arc<Api>> = nodes.iter().map(|n| Arc::new(n.server.api())).collect();
    let (servers, _dirs): (Vec<Arc<Mutex<Server>>>, Vec<Scratch>) = nodes
        .into_iter()
        .map(|n| (Arc::new(Mutex::new(n.server)), n.dir))
        .unzip();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kills = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // Node B is killed only early on (and never armed): for the rest of
    // the run its cache must follow A's changes alone.
    let killer = {
        let (servers, done, kills) = (servers.clone(), done.clone(), kills.clone());
        std::thread::spawn(move || {
            race_killer(&servers, &done, &kills, 0x9, 200..800, |kills, rng| {
                if kills < 3 {
                    let which = rng.usize(0..2);
                    (which, which == 0 && rng.bool())
                } else {
                    (0, rng.bool())
                }
            })
        })
    };
    let workers: Vec<_> = (0..2 * WORKERS_PER_NODE)
        .map(|w| {
            let api = apis[w % 2].clone();
            std::thread::spawn(move || race_ops(&api, w % 2, w as u64 + 100, OPS_PER_WORKER))
        })
        .collect();
    let mut ops: Vec<Op> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    ops.extend(race_until_killed(&apis[0], 0, &kills, 3));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    killer.join().unwrap();
    let kills = kills.load(std::sync::atomic::Ordering::SeqCst);
    let answered = ops.iter().filter(|o| o.answered).count();
    eprintln!(
        "race on {fs_kind:?}: {} ops ({answered} answered), {kills} kills; (sent, answered) by kind: {:?}",
        ops.len(),
        op_counts(&ops)
    );
    assert!(
        ops.len() >= 200 && kills >= 3,
        "{} ops, {kills} kills",
        ops.len()
    );

    // A node that is down or has a fault point armed is restarted without
    // one; a node that is up keeps running (its cache must have followed
    // the other node's changes by itself). Past the lease every node's
    // next request sweeps what the dead left half-made.
    let mut restarted = 0;
    for s in &servers {
        let mut s = s.lock().unwrap();
        if !s.running() || s.has_env() {
            s.set_env(&[]);
            s.restart();
            restarted += 1;
        }
    }
    eprintln!("race on {fs_kind:?}: {restarted} node(s) restarted at the end");
    std::thread::sleep(Duration::from_secs(LEASE * 2 + 1));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (list_a, list_b) = loop {
        let (list_a, list_b) = (list(&apis[0]), list(&apis[1]));
        let listed: BTreeSet<String> = list_a.as_array().unwrap().iter().map(id_of).collect();
        if list_a == list_b && on_disk(&repo) == listed {
            break (list_a, list_b);
        }
        let ids_of =
            |l: &Value| -> Vec<String> { l.as_array().unwrap().iter().map(id_of).collect() };
        assert!(
            Instant::now() < deadline,
            "listings and disk never agreed:\nA {:?}\nB {:?}\ndisk {:?}",
            ids_of(&list_a),
            ids_of(&list_b),
            on_disk(&repo)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(list_a, list_b);
    let listed: BTreeSet<String> = list_a.as_array().unwrap().iter().map(id_of).collect();
    check_race(&repo, &DISKS, DISK_SIZE, &listed, &ops, 0);
}

#[test]
fn racing_creates_deletes_and_purges_with_kills_xfs() {
    racing(Fs::Xfs);
}

#[test]
fn racing_creates_deletes_and_purges_with_kills_btrfs() {
    racing(Fs::Btrfs);
}
