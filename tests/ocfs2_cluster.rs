//! Two nodes, one OCFS2: the pool's shared repository as Oracle VM has it.
//!
//! `scripts/test.sh` boots two QEMU guests (`scripts/ocfs2/guest.sh run
//! --nodes 2`) sharing one raw image formatted as a two-node o2cb cluster,
//! and runs this module's tests in both at once, `COE_OCFS2_NODE` telling
//! each which node it is. The nodes meet through marker files on the shared
//! filesystem (OCFS2 is coherent across the cluster). Outside such a pair of
//! guests these tests fail, saying so.
//!
//! An exporter runs on each node over the shared repository, with its own
//! database on local storage and its own owner id (as `/etc/machine-id`
//! differs between real nodes). Each snapshots its own VM; each lists and
//! serves the other's snapshot too (the pool-wide catalog, docs/catalog.md),
//! also after a restart, without changing the other's folder; each deletes
//! its own, and the other sees it gone. Then both race creates, deletes
//! and purges of one VM while each kills its own exporter with `kill -9`
//! (sometimes at a fault point inside a create or delete) and restarts it:
//! afterwards both listings equal each other and the disk, nothing complete
//! is lost and nothing half-made is listed or left after the lease.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::server::{Server, Setup};
use crate::common::{write_vm_cfg, Fs, Scratch};
use crate::e2e::Client;

/// How long a node waits for the other one (the other guest may boot and
/// run much slower under TCG on a busy machine).
const PEER_WAIT: Duration = Duration::from_secs(900);
const DISK_SIZE: u64 = 8 << 20;

fn vm_id(node: u32) -> String {
    format!("0004fb000006000000000000000c1a5{node}")
}

fn disk_name(node: u32) -> String {
    format!("0004fb000012000000000000000c1a5{node}.img")
}

/// This node's number (1 or 2), from the guest harness.
fn this_node() -> u32 {
    let node = std::env::var("COE_OCFS2_NODE").ok();
    let nodes = std::env::var("COE_OCFS2_NODES").ok();
    match (node.as_deref(), nodes.as_deref()) {
        (Some(n @ ("1" | "2")), Some("2")) => n.parse().unwrap(),
        _ => panic!(
            "COE_OCFS2_NODE={node:?}, COE_OCFS2_NODES={nodes:?}: the ocfs2_cluster tests run in \
             two QEMU guests sharing one OCFS2 (`scripts/ocfs2/guest.sh run --nodes 2`); run \
             them with `./scripts/test.sh` as root"
        ),
    }
}

/// Says `what` to the other node: a marker file, written then renamed.
fn signal(root: &Path, node: u32, what: &str, body: &str) {
    let tmp = root.join(format!(".{what}-{node}.tmp"));
    fs::write(&tmp, body).unwrap();
    fs::File::open(&tmp).unwrap().sync_all().unwrap();
    fs::rename(&tmp, root.join(format!("{what}-{node}"))).unwrap();
}

/// Waits until `node` said `what`; its body.
fn wait_for(root: &Path, node: u32, what: &str) -> String {
    let p = root.join(format!("{what}-{node}"));
    let t = Instant::now();
    loop {
        if let Ok(s) = fs::read_to_string(&p) {
            return s;
        }
        assert!(
            t.elapsed() < PEER_WAIT,
            "node {node} never said {what:?} within {PEER_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The shared repository: one VM per node, one sparse disk each with some
/// data. Made by node 1.
fn make_repo(repo: &Path) {
    let disks = repo.join("VirtualDisks");
    fs::create_dir_all(&disks).unwrap();
    let mut rng = fastrand::Rng::with_seed(0xc1a5);
    for node in [1, 2] {
        let path = disks.join(disk_name(node));
        let f = fs::File::create(&path).unwrap();
        f.set_len(DISK_SIZE).unwrap();
        for i in 0..4u64 {
            let mut b = vec![0u8; 256 << 10];
            rng.fill(&mut b);
            std::os::unix::fs::FileExt::write_all_at(&f, &b, i * (2 << 20)).unwrap();
        }
        f.sync_all().unwrap();
        write_vm_cfg(
            repo,
            &vm_id(node),
            &format!("0004fb00-0006-0000-0000-000000c1a5{node:02}"),
            &format!("node{node}-vm"),
            &[&path],
        );
    }
}

/// The snapshot folder of a snapshot as the API shows it.
fn folder_of(snap: &serde_json::Value) -> PathBuf {
    let disk = PathBuf::from(snap["disks"][0]["path"].as_str().unwrap());
    disk.parent().unwrap().to_owned()
}

/// Every file of a folder with its bytes.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn snapshot_ids(client: &Client, vm: &str) -> Vec<String> {
    let list = client.json(&["snapshots", "list", vm]);
    list.as_array()
        .unwrap_or_else(|| panic!("snapshots list: {list}"))
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn two_exporters_share_one_catalog_and_serve_each_others_snapshots() {
    let node = this_node();
    let other = 3 - node;
    let root = Fs::Ocfs2.root().join("cluster");
    let repo = root.join("repo");
    if node == 1 {
        fs::create_dir_all(&root).unwrap();
        make_repo(&repo);
        signal(&root, 1, "repo-ready", "");
    } else {
        let t = Instant::now();
        while !root.is_dir() {
            assert!(t.elapsed() < PEER_WAIT, "node 1 never made the repository");
            std::thread::sleep(Duration::from_millis(300));
        }
        wait_for(&root, 1, "repo-ready");
    }
    let (mine, theirs) = (vm_id(node), vm_id(other));

    // An exporter on this node: local database, its own owner id.
    let local = Scratch::temp("cluster");
    let config = format!("[store]\nowner = \"cluster-node-{node}\"\n");
    let setup = Setup {
        extra: &config,
        ..Setup::default()
    };
    let mut rng = fastrand::Rng::with_seed(u64::from(node));
    let server = Server::start_with(&local.dir, &repo, &mut rng, setup);
    let client = Client::new(&server, &local.path("cache"));
    let vms = client.json(&["vms", "list"]);
    assert_eq!(vms.as_array().unwrap().len(), 2, "{vms}");

    // Each node snapshots its own VM and copies it.
    let snap = client.json(&["snapshots", "create", &mine]);
    let id = snap["id"].as_str().unwrap().to_owned();
    let folder = folder_of(&snap);
    assert!(folder.starts_with(&repo), "{}", folder.display());
    let out = local.path("replica");
    client.json(&["download", &mine, &id, "--out", out.to_str().unwrap()]);
    assert_eq!(
        fs::read(out.join(disk_name(node))).unwrap(),
        fs::read(repo.join("VirtualDisks").join(disk_name(node))).unwrap(),
        "the copy differs from the disk"
    );
    signal(&root, node, "snapshot", &folder.display().to_string());
    let their_folder = PathBuf::from(wait_for(&root, other, "snapshot"));
    assert_ne!(their_folder, folder);
    let theirs_before = contents(&their_folder);
    assert!(
        theirs_before.iter().any(|(n, _)| n == ".coriolis-owner"),
        "{theirs_before:?}"
    );

    // This exporter lists the other node's snapshot and serves it (a full
    // copy identical to the other node's disk), also after a restart whose
    // reconcile sees that folder in the repository.
    let their_id = their_folder
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(snapshot_ids(&client, &mine), vec![id.clone()]);
    assert_eq!(snapshot_ids(&client, &theirs), vec![their_id.clone()]);
    let theirs_out = local.path("their-replica");
    client.json(&[
        "download",
        &theirs,
        &their_id,
        "--out",
        theirs_out.to_str().unwrap(),
    ]);
    assert_eq!(
        fs::read(theirs_out.join(disk_name(other))).unwrap(),
        fs::read(their_folder.join(disk_name(other))).unwrap(),
        "the copy of node {other}'s snapshot differs from its clone"
    );
    drop(client);
    drop(server);
    let server = Server::start_with(&local.dir, &repo, &mut rng, setup);
    let client = Client::new(&server, &local.path("cache"));
    assert_eq!(snapshot_ids(&client, &mine), vec![id.clone()]);
    assert_eq!(snapshot_ids(&client, &theirs), vec![their_id.clone()]);
    assert_eq!(
        contents(&their_folder),
        theirs_before,
        "node {node} changed node {other}'s snapshot folder"
    );
    signal(&root, node, "checked", "");
    wait_for(&root, other, "checked");

    // Deleting this node's snapshot removes its folder, and only it.
    let del = client.run(&["snapshots", "delete", &mine, &id]);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert!(!folder.exists(), "{} left after delete", folder.display());
    signal(&root, node, "deleted", "");
    wait_for(&root, other, "deleted");
    assert!(
        !their_folder.exists(),
        "node {other} did not delete its own"
    );
    assert!(
        snapshot_ids(&client, &theirs).is_empty(),
        "node {other}'s delete is not seen here"
    );
    drop(client);
    drop(server);
}

/// The race of `catalog::racing` across the two guests: each node drives
/// and kills its own exporter over the shared repository; the op logs are
/// exchanged through the filesystem for the final checks.
#[test]
fn two_exporters_race_creates_deletes_and_purges_with_kills() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::catalog::{self, Op};

    /// Short, so that the test waits little for debris to expire; far
    /// longer than one create under TCG.
    const LEASE: u64 = 6;
    /// Few: under TCG an op takes about a second and a restart several
    /// (the host runs the 280-op race, `catalog::racing_*`).
    const OPS: usize = 12;
    let node = this_node();
    let other = 3 - node;
    let root = Fs::Ocfs2.root().join("cluster-race");
    let repo = root.join("repo");
    if node == 1 {
        fs::create_dir_all(&root).unwrap();
        catalog::make_repo(&repo);
        signal(&root, 1, "repo-ready", "");
    } else {
        let t = Instant::now();
        while !root.is_dir() {
            assert!(t.elapsed() < PEER_WAIT, "node 1 never made the repository");
            std::thread::sleep(Duration::from_millis(300));
        }
        wait_for(&root, 1, "repo-ready");
    }
    let local = Scratch::temp("cluster-race");
    let config = format!("[store]\nowner = \"race-node-{node}\"\nlease_seconds = {LEASE}\n");
    let setup = Setup {
        extra: &config,
        ..Setup::default()
    };
    let mut rng = fastrand::Rng::with_seed(u64::from(node) + 50);
    let server = Server::start_with(&local.dir, &repo, &mut rng, setup);
    let api = Arc::new(server.api());
    let servers = vec![Arc::new(Mutex::new(server))];
    signal(&root, node, "up", "");
    wait_for(&root, other, "up");

    let done = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (servers, done, kills) = (servers.clone(), done.clone(), kills.clone());
        std::thread::spawn(move || {
            // Under TCG a start takes seconds: kill less often, arm less.
            catalog::race_killer(
                &servers,
                &done,
                &kills,
                u64::from(node),
                6000..12000,
                |_, rng| (0, rng.u32(0..3) == 0),
            )
        })
    };
    let mut ops = catalog::race_ops(&api, node as usize, u64::from(node) + 7, OPS);
    ops.extend(catalog::race_until_killed(&api, node as usize, &kills, 2));
    done.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    let kills = kills.load(Ordering::SeqCst);
    eprintln!(
        "node {node}: {} ops, {kills} kills; (sent, answered) by kind: {:?}",
        ops.len(),
        catalog::op_counts(&ops)
    );
    assert!(kills >= 2, "{kills} kills");
    {
        let mut s = servers[0].lock().unwrap();
        if !s.running() || s.has_env() {
            s.set_env(&[]);
            s.restart();
        }
    }
    signal(&root, node, "ops", &serde_json::to_string(&ops).unwrap());
    let theirs: Vec<Op> = serde_json::from_str(&wait_for(&root, other, "ops")).unwrap();

    // Both idle now: past the lease, the first requests sweep.
    std::thread::sleep(Duration::from_secs(LEASE * 2 + 1));
    let deadline = Instant::now() + Duration::from_secs(120);
    let listed = loop {
        let l = catalog::list(&api);
        let listed: std::collections::BTreeSet<String> =
            l.as_array().unwrap().iter().map(catalog::id_of).collect();
        let disk = catalog::on_disk(&repo);
        if disk == listed && disk.iter().all(|n| !n.starts_with('.')) {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "node {node}: listing {listed:?} never matched the disk {disk:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let all: Vec<Op> = ops.into_iter().chain(theirs).collect();
    // The guests' clocks come from one host: a second of slack.
    catalog::check_race(
        &repo,
        &catalog::DISKS,
        catalog::DISK_SIZE,
        &listed,
        &all,
        1_000_000_000,
    );
    signal(
        &root,
        node,
        "listed",
        &serde_json::to_string(&listed).unwrap(),
    );
    let their_list: std::collections::BTreeSet<String> =
        serde_json::from_str(&wait_for(&root, other, "listed")).unwrap();
    assert_eq!(listed, their_list, "the two nodes list different snapshots");
}
