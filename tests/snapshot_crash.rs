//! Crash tests: the real binary is killed with SIGKILL at every fault point
//! inside create and delete (`COE_FAULT`, src/snapshot/fault.rs), then
//! `reconcile` runs and the result is checked: every listed snapshot is
//! complete and readable, no orphan folder is left, no record lacks its
//! files; the database keeps working; and a lost database is rebuilt from
//! the manifests.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coriolis_ovm_exporter::snapshot::fault;
use coriolis_ovm_exporter::store::{Store, StoreOptions, SNAPSHOTS_DIR};

use crate::common::{Fs, Scratch};
use crate::snapshot::folders;

const BIN: &str = env!("CARGO_BIN_EXE_coriolis-ovm-exporter");

struct Node {
    scratch: Scratch,
    /// Where the database lives: local storage (OCFS2 refuses LMDB).
    local: Scratch,
}

impl Node {
    fn new(fs: Fs, tag: &str) -> Node {
        let scratch = fs.scratch(tag);
        let disks = scratch.path("repo/VirtualDisks");
        std::fs::create_dir_all(&disks).unwrap();
        let mut rng = fastrand::Rng::with_seed(42);
        for (name, size) in [("a.img", 3 << 20), ("b.img", 1 << 20)] {
            let bytes: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
            std::fs::write(disks.join(name), bytes).unwrap();
        }
        Node {
            scratch,
            local: Scratch::temp(tag),
        }
    }

    fn repo(&self) -> PathBuf {
        self.scratch.path("repo")
    }

    fn db(&self) -> PathBuf {
        self.local.path("db/exporter.db")
    }

    fn run(&self, args: &[&str], fault_point: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--db")
            .arg(self.db())
            .arg("--owner")
            .arg("crash-node");
        if args[0] == "snapshot" {
            cmd.args(["--vm", "vm"]);
        }
        match fault_point {
            Some(p) => cmd.env(fault::ENV, p),
            None => cmd.env_remove(fault::ENV),
        };
        cmd.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn create(&self) -> String {
        let repo = self.repo();
        let a = repo.join("VirtualDisks/a.img");
        let b = repo.join("VirtualDisks/b.img");
        let out = self.ok(&[
            "snapshot",
            "create",
            "--repo",
            repo.to_str().unwrap(),
            "--disk",
            a.to_str().unwrap(),
            "--disk",
            b.to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    fn create_args(&self) -> Vec<String> {
        let repo = self.repo();
        vec![
            "snapshot".into(),
            "create".into(),
            "--repo".into(),
            repo.display().to_string(),
            "--disk".into(),
            repo.join("VirtualDisks/a.img").display().to_string(),
            "--disk".into(),
            repo.join("VirtualDisks/b.img").display().to_string(),
        ]
    }

    fn reconcile(&self) -> String {
        self.ok(&["reconcile", "--repo", self.repo().to_str().unwrap()])
    }

    /// The listed snapshots, after checking the invariants of the module doc.
    fn check(&self) -> Vec<String> {
        let list: serde_json::Value =
            serde_json::from_str(&self.ok(&["snapshot", "list"])).unwrap();
        let mut ids = Vec::new();
        for s in list.as_array().unwrap() {
            let id = s["id"].as_str().unwrap().to_owned();
            let disks = s["disks"].as_array().unwrap();
            assert_eq!(disks.len(), 2, "snapshot {id} incomplete");
            for d in disks {
                let path = Path::new(d["path"].as_str().unwrap());
                let parent = Path::new(d["parent_path"].as_str().unwrap());
                let got = std::fs::read(path)
                    .unwrap_or_else(|e| panic!("listed snapshot {id}: {}: {e}", path.display()));
                assert!(
                    got == std::fs::read(parent).unwrap(),
                    "{} differs",
                    path.display()
                );
            }
            // Nothing left over inside: the two clones and our two files.
            let mut inside = folders_in(&self.repo().join(SNAPSHOTS_DIR).join(&id));
            inside.sort();
            assert_eq!(
                inside,
                [
                    ".coriolis-manifest.json",
                    ".coriolis-owner",
                    "a.img",
                    "b.img"
                ]
            );
            ids.push(id);
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(
            folders(&self.repo()),
            sorted,
            "orphan folders or missing files"
        );
        ids
    }
}

fn folders_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn assert_killed(out: &Output, point: &str) {
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{point}: the process was not killed at the fault point: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_kill_at_any_point_of_create_or_delete_leaves_a_consistent_state() {
    kill_at_every_point(Fs::Xfs);
}

/// `kill -9` at every fault point of create and delete on `fs`, then
/// reconcile: the invariants of the module doc hold.
pub(crate) fn kill_at_every_point(fs: Fs) {
    // An empty list (or one side missing) would pass without a crash.
    let creates = fault::POINTS.iter().filter(|p| p.starts_with("create"));
    let deletes = fault::POINTS.iter().filter(|p| p.starts_with("delete"));
    assert!(
        creates.count() >= 2 && deletes.count() >= 1,
        "fault points: {:?}",
        fault::POINTS
    );
    for &point in fault::POINTS {
        let node = Node::new(fs, &format!("crash-{point}"));
        let base = node.create();
        let out = if point.starts_with("create") {
            let args = node.create_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node.run(&args, Some(point))
        } else {
            node.run(&["snapshot", "delete", "--id", &base], Some(point))
        };
        assert_killed(&out, point);

        let report = node.reconcile();
        let ids = node.check();
        match point {
            fault::CREATE_AFTER_MANIFEST | fault::CREATE_AFTER_COMMIT => {
                // Complete before the kill: kept (committed) or adopted.
                assert_eq!(ids.len(), 2, "{point}: {ids:?}\n{report}");
                assert_eq!(ids[0], base);
                if point == fault::CREATE_AFTER_MANIFEST {
                    assert!(report.contains("adopted"), "{report}");
                }
            }
            p if p.starts_with("create") => {
                assert_eq!(ids, vec![base.clone()], "{point}\n{report}");
                assert!(report.contains("removed-folder"), "{point}: {report}");
            }
            _ => {
                assert_eq!(
                    ids,
                    Vec::<String>::new(),
                    "{point}: deleted snapshot is back\n{report}"
                );
            }
        }
        // The database works after the crash, and reconcile is idempotent.
        let again = node.create();
        assert!(node.check().contains(&again));
        node.ok(&["snapshot", "delete", "--id", &again]);
        let second = node.reconcile();
        assert!(second.ends_with("0 actions\n"), "{point}: {second}");
    }
}

#[test]
fn a_lost_database_is_rebuilt_from_the_manifests_by_the_subcommand() {
    let node = Node::new(Fs::Xfs, "crash-rebuild");
    let ids = [node.create(), node.create(), node.create()];
    node.ok(&["snapshot", "delete", "--id", &ids[1]]);
    std::fs::remove_dir_all(node.local.path("db")).unwrap();
    let listed: serde_json::Value = serde_json::from_str(&node.ok(&["snapshot", "list"])).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([]),
        "a fresh database lists nothing"
    );
    let out = node.ok(&["rebuild-db", "--repo", node.repo().to_str().unwrap()]);
    assert_eq!(out.matches("adopted").count(), 2, "{out}");
    assert_eq!(node.check(), vec![ids[0].clone(), ids[2].clone()]);
}

#[test]
fn admin_commands_refuse_while_another_process_holds_the_database() {
    let node = Node::new(Fs::Xfs, "crash-busy");
    // Hold the database from this process, as a running service would.
    let inv = std::sync::Arc::new(crate::snapshot::Inventory::default());
    let _mgr =
        coriolis_ovm_exporter::snapshot::Manager::open(&node.db(), &crate::snapshot::config(), inv)
            .unwrap();
    let out = node.run(
        &["reconcile", "--repo", node.repo().to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_reader_killed_inside_a_transaction_leaves_no_lasting_damage() {
    let node = Node::new(Fs::Xfs, "crash-reader");
    let id = node.create();
    // Another process keeps the environment open (LMDB resets the reader
    // table when the last user goes, so a stale slot needs a survivor).
    let store = Store::open(&node.db(), &StoreOptions::default()).unwrap();
    let out = node.run(&["snapshot", "list"], Some(fault::STORE_IN_READ_TXN));
    assert_killed(&out, fault::STORE_IN_READ_TXN);
    assert_eq!(
        store.clear_stale_readers().unwrap(),
        1,
        "the dead reader's slot"
    );
    assert_eq!(store.clear_stale_readers().unwrap(), 0);
    assert_eq!(store.list_vm("vm").unwrap().len(), 1);
    drop(store);
    // And the next open of the service works as before.
    let listed: serde_json::Value = serde_json::from_str(&node.ok(&["snapshot", "list"])).unwrap();
    assert_eq!(listed[0]["id"], serde_json::json!(id));
}
