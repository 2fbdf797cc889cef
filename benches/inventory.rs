//! Inventory listing benchmarks.
//!
//! `cargo bench --bench inventory`. A node of 20 repositories holding 500
//! VMs (2 disks each, one of them on another repository), with ovs-agent's
//! `repository` database made by the real `db5.3_load` (through
//! `scripts/make-ovm-fixtures.py`), in a temporary folder.
//!
//! Target: listing all 500 VMs in under 50 ms (`vms/warm`, the steady state
//! of a running service: files are stat'ed, nothing unchanged is re-read,
//! the clone probe is cached). `vms/cold` is the first listing of a fresh
//! inventory (every file read and parsed, every repository probed).

use std::fs;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion};

use coriolis_ovm_exporter::ovm::agent_records::RepositoryRecord;
use coriolis_ovm_exporter::ovm::bdb::HashDb;
use coriolis_ovm_exporter::ovm::{
    vmcfg, Inventory, InventoryConfig, InventorySource, NodeInventory,
};

const REPOS: usize = 20;
const VMS_PER_REPO: usize = 25;

struct Node {
    root: PathBuf,
    db_dir: PathBuf,
    vm_names: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn make_node() -> Node {
    let root = std::env::temp_dir().join(format!("coe-bench-inventory-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let base = root.join("Repositories");
    let db_dir = root.join("db");
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-ovm-fixtures.py"))
        .arg(&db_dir)
        .args(["--repos", &REPOS.to_string(), "--big-alias", "100"])
        .arg("--mount-base")
        .arg(&base)
        .status()
        .expect("python3 runs (scripts/deps.sh installs it)");
    assert!(
        status.success(),
        "fixture script failed (db5.3_load installed?)"
    );
    let exp: serde_json::Value =
        serde_json::from_slice(&fs::read(db_dir.join("expected.json")).unwrap()).unwrap();
    let ids: Vec<String> = exp["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let mut vm_names = Vec::new();
    for (ri, id) in ids.iter().enumerate() {
        let repo = base.join(id);
        let other = base.join(&ids[(ri + 1) % ids.len()]);
        let mut meta = serde_json::Map::new();
        for v in 0..VMS_PER_REPO {
            let name = format!("0004fb0000060000{:08x}{:08x}", ri, v);
            let sys = format!("{name}-sys.img");
            let data = format!("{name}-data.img");
            for (r, d) in [(&repo, &sys), (&other, &data)] {
                let p = r.join("VirtualDisks").join(d);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
            }
            meta.insert(
                sys.clone(),
                serde_json::json!({"OBJECT_TYPE": "VIRTUAL_DISK", "SIMPLE_NAME": sys}),
            );
            let vm_dir = repo.join("VirtualMachines").join(&name);
            fs::create_dir_all(&vm_dir).unwrap();
            fs::write(
                vm_dir.join("vm.cfg"),
                format!(
                    "vif = ['mac=00:21:f6:00:00:01,bridge=0004fb0010']\n\
                     OVM_simple_name = 'vm {ri}-{v}'\n\
                     disk = ['file:{}/VirtualDisks/{sys},xvda,w',\n\
                             'file:{}/VirtualDisks/{data},xvdb,w',\n\
                             ',xvdc:cdrom,r']\n\
                     uuid = '{name}'\nmemory = 2048\nvcpus = 2\n\
                     OVM_high_availability = False\nname = '{name}'\n",
                    repo.display(),
                    other.display()
                ),
            )
            .unwrap();
            vm_names.push(name);
        }
        fs::write(repo.join(".ovsmeta"), serde_json::to_vec(&meta).unwrap()).unwrap();
    }
    Node {
        root,
        db_dir,
        vm_names,
    }
}

fn config(node: &Node) -> InventoryConfig {
    InventoryConfig {
        source: InventorySource::OvsAgent,
        ovs_agent_db_dir: node.db_dir.clone(),
        check_mounted: false,
        ..Default::default()
    }
}

fn bench_inventory(c: &mut Criterion) {
    let node = make_node();
    let inv = NodeInventory::open(&config(&node)).unwrap();
    let vms = inv.vms().unwrap();
    assert_eq!(vms.len(), REPOS * VMS_PER_REPO);
    // The empty cdrom drive is not a disk.
    assert!(vms.iter().all(|v| v.disks.len() == 2));

    let mut g = c.benchmark_group("vms");
    g.bench_function("warm_500_vms_20_repos", |b| {
        b.iter(|| black_box(inv.vms().unwrap()))
    });
    g.bench_function("cold_500_vms_20_repos", |b| {
        b.iter(|| {
            let fresh = NodeInventory::open(&config(&node)).unwrap();
            black_box(fresh.vms().unwrap())
        })
    });
    g.bench_function("lookup_one_of_500", |b| {
        let name = &node.vm_names[node.vm_names.len() / 2];
        b.iter(|| black_box(inv.vm(name).unwrap().unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("parse");
    let db = fs::read(node.db_dir.join("repository")).unwrap();
    g.bench_function("repository_db_20_records", |b| {
        b.iter(|| {
            let h = HashDb::open(&db).unwrap();
            let pairs = h.pairs().unwrap();
            let recs: Vec<_> = pairs
                .iter()
                .map(|(k, v)| RepositoryRecord::from_pickle(k, v).unwrap())
                .collect();
            black_box(recs)
        })
    });
    let cfg = fs::read(
        vms[0].disks[0]
            .repository
            .as_ref()
            .unwrap()
            .mount_point
            .join("VirtualMachines")
            .join(&vms[0].name)
            .join("vm.cfg"),
    )
    .unwrap();
    g.bench_function("vm_cfg", |b| {
        b.iter(|| black_box(vmcfg::vm_config(&cfg).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_inventory);
criterion_main!(benches);
