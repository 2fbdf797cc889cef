//! Operator subcommands of the snapshot manager: `reconcile`, `rebuild-db`
//! and `snapshot create|delete|list`.
//!
//! These run with the service stopped (the manager's process lock refuses
//! them otherwise). With `-config PATH`, `reconcile` and `rebuild-db` work on
//! the node the config file describes (its database and inventory; see
//! `main.rs`); without it, the database and the VM are described by flags:
//!
//! ```text
//! reconcile  --db PATH [--repo MOUNT]... [--owner ID] [--map-size BYTES]
//! rebuild-db --db PATH  --repo MOUNT...  [--owner ID] [--map-size BYTES]
//! snapshot create --db PATH --vm NAME --repo MOUNT --disk PATH [--disk PATH]...
//! snapshot delete --db PATH --vm NAME --id ID
//! snapshot list   --db PATH --vm NAME
//! ```
//!
//! `--disk` paths must lie below one of the `--repo` mount points; such a
//! disk is taken as snapshot compatible (the clone itself is the test).
//! Output: one line per reconcile action, JSON for snapshots; errors go to
//! stderr with their causes, exit status 1 (2 for usage errors).

use std::path::PathBuf;
use std::sync::Arc;

use super::config::StoreConfig;
use super::error::SnapshotError;
use super::manager::{Manager, VmLookup};
use super::reconcile::ReconcileReport;
use crate::ovm::{Disk, InventoryError, Repository, Vm};
use crate::wire::GetOptions;

/// Exit status of a failed command.
const EXIT_FAILED: i32 = 1;
/// Exit status of a command line that makes no sense.
const EXIT_USAGE: i32 = 2;

/// The flags of every subcommand (each is optional for clap; which ones a
/// subcommand needs is checked by the subcommand).
#[derive(Debug, Default, clap::Args)]
struct Flags {
    /// The snapshot database (LMDB file).
    #[arg(long)]
    db: Option<PathBuf>,
    /// A repository's mount point (repeatable).
    #[arg(long = "repo")]
    repos: Vec<PathBuf>,
    /// A disk of the VM, below one of the `--repo`s (repeatable).
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    #[arg(long)]
    vm: Option<String>,
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    owner: Option<String>,
    /// LMDB map size in bytes.
    #[arg(long = "map-size")]
    map_size: Option<u64>,
}

/// The command line after the subcommand's name.
#[derive(Debug, clap::Parser)]
#[command(no_binary_name = true, disable_help_flag = true)]
struct FlagLine {
    #[command(flatten)]
    flags: Flags,
}

fn parse_flags(args: &[String]) -> Result<Flags, String> {
    use clap::Parser;
    FlagLine::try_parse_from(args)
        .map(|line| line.flags)
        .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_owned())
}

/// The VM described by the flags: its name and its disks, each on the
/// repository whose mount point holds it.
struct FlagVm {
    vm: Option<Vm>,
}

impl VmLookup for FlagVm {
    fn vm(&self, name: &str) -> Result<Option<Vm>, InventoryError> {
        Ok(self.vm.clone().filter(|v| v.name == name))
    }
}

fn flag_vm(f: &Flags) -> Result<Option<Vm>, String> {
    let Some(name) = &f.vm else { return Ok(None) };
    let mut disks = Vec::new();
    for path in &f.disks {
        let repo = f
            .repos
            .iter()
            .find(|r| path.starts_with(r))
            .ok_or_else(|| format!("disk {} is below no --repo", path.display()))?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("disk {} has no UTF-8 file name", path.display()))?;
        disks.push(Disk {
            name: file_name.to_owned(),
            path: path.clone(),
            device_name: format!("xvd{}", (b'a' + (disks.len() % 26) as u8) as char),
            mode: "w".into(),
            repository: Some(Repository {
                id: repo.display().to_string(),
                mount_point: repo.clone(),
                filesystem: String::new(),
                alias: String::new(),
            }),
            snapshot_compatible: true,
            incompatible_reason: None,
        });
    }
    Ok(Some(Vm {
        name: name.clone(),
        uuid: String::new(),
        friendly_name: name.clone(),
        disks,
    }))
}

fn open(f: &Flags) -> Result<Manager, Failure> {
    let db =
        f.db.as_ref()
            .ok_or(Failure::Usage("--db PATH is required".into()))?;
    let mut config = StoreConfig {
        owner: f.owner.clone(),
        ..StoreConfig::default()
    };
    if let Some(m) = f.map_size {
        config.map_size = m;
    }
    let vm = flag_vm(f).map_err(Failure::Usage)?;
    Ok(Manager::open(db, &config, Arc::new(FlagVm { vm }))?)
}

enum Failure {
    Usage(String),
    Failed(SnapshotError),
}

impl From<SnapshotError> for Failure {
    fn from(e: SnapshotError) -> Self {
        Failure::Failed(e)
    }
}

fn print_report(r: &ReconcileReport) {
    for a in &r.actions {
        println!("{a}");
    }
    println!("reconcile: {} kept, {} actions", r.kept, r.actions.len());
}

fn required<'a>(v: &'a Option<String>, flag: &str) -> Result<&'a str, Failure> {
    v.as_deref()
        .ok_or_else(|| Failure::Usage(format!("{flag} is required")))
}

fn run_inner(cmd: &str, args: &[String]) -> Result<(), Failure> {
    let (sub, rest) = if cmd == "snapshot" {
        match args.split_first() {
            Some((s, rest)) => (Some(s.as_str()), rest),
            None => return Err(Failure::Usage("snapshot create|delete|list".into())),
        }
    } else {
        (None, args)
    };
    let f = parse_flags(rest).map_err(Failure::Usage)?;
    match (cmd, sub) {
        ("reconcile", None) => {
            let m = open(&f)?;
            print_report(&m.reconcile(&f.repos)?);
        }
        ("rebuild-db", None) => {
            if f.repos.is_empty() {
                return Err(Failure::Usage(
                    "rebuild-db needs at least one --repo".into(),
                ));
            }
            let m = open(&f)?;
            print_report(&m.rebuild(&f.repos)?);
        }
        ("snapshot", Some("create")) => {
            required(&f.vm, "--vm")?;
            let m = open(&f)?;
            let s = m.create(f.vm.as_deref().unwrap_or_default())?;
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        }
        ("snapshot", Some("delete")) => {
            let vm = required(&f.vm, "--vm")?;
            let id = required(&f.id, "--id")?;
            open(&f)?.delete(vm, id)?;
            println!("deleted {id}");
        }
        ("snapshot", Some("list")) => {
            let vm = required(&f.vm, "--vm")?;
            let m = open(&f)?;
            let list = match m.list(vm) {
                Err(SnapshotError::NotFound { .. }) => Vec::new(),
                other => other?,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
        }
        ("snapshot", Some("get")) => {
            let vm = required(&f.vm, "--vm")?;
            let id = required(&f.id, "--id")?;
            let s = open(&f)?.get(vm, id, &GetOptions::default())?;
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        }
        (_, sub) => {
            return Err(Failure::Usage(format!(
                "unknown command {cmd} {}",
                sub.unwrap_or_default()
            )))
        }
    }
    Ok(())
}

/// Runs subcommand `cmd` (`reconcile`, `rebuild-db` or `snapshot`) with the
/// rest of the command line; returns the process exit status.
pub fn run(cmd: &str, args: &[String]) -> i32 {
    match run_inner(cmd, args) {
        Ok(()) => 0,
        Err(Failure::Usage(msg)) => {
            eprintln!("coriolis-ovm-exporter {cmd}: {msg}");
            eprintln!("usage: see the doc of src/snapshot/admin.rs or the README");
            EXIT_USAGE
        }
        Err(Failure::Failed(e)) => {
            eprintln!("coriolis-ovm-exporter {cmd}: {}", crate::error::chain(&e));
            EXIT_FAILED
        }
    }
}
