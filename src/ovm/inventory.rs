//! Assembling the inventory from a node's files, with a cache.
//!
//! This module owns walking the node: ovs-agent's `repository` database (or
//! the static repositories of the config), each repository's `.ovsmeta` and
//! `VirtualMachines/*/vm.cfg`, the disks' files, and the per-repository
//! clone probe. It must not fail a whole listing for one bad repository or
//! VM: those are logged (once per distinct problem) and skipped.
//!
//! Listings are fast because every parsed file is cached under its stamp
//! (device, inode, size, modification and change times): a listing stats
//! the files and re-reads only those whose stamp changed, and re-lists a
//! folder only when its own stamp changed. The clone probe is cached per
//! mount point and device; a failed probe is retried after
//! [`PROBE_RETRY`], a successful one is kept until the device changes
//! (a remount). A repository database that stops parsing (ovs-agent
//! rewriting it, or damage) is read again once, then the last good list is
//! used with a warning; only with no good list yet is the listing an error.

use crate::error::chain as error_chain;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::agent_db::{MAX_DB_FILE, REPOSITORY_DB};
use super::agent_records::RepositoryRecord;
use super::bdb::HashDb;
use super::config::{InventoryConfig, InventorySource, StaticRepository, StaticVm};
use super::error::InventoryError;
use super::files::{open_beneath, read_bounded, read_bounded_beneath};
use super::model::{Disk, Repository, RepositoryStatus, Vm};
use super::pickle::bytes_to_text;
use super::probe::{probe_clone, CloneProbe};
use super::source::Inventory;
use super::vmcfg::{self, DiskSpec, DiskTarget, OvsMetaEntry, VmConfig, OVSMETA_VIRTUAL_DISK};

/// Folder of a repository holding one folder per VM.
pub const VM_DIR: &str = "VirtualMachines";
/// A VM's Xen config file inside its folder.
pub const VM_CFG: &str = "vm.cfg";
/// A repository's object metadata file.
pub const OVSMETA: &str = ".ovsmeta";
/// Largest vm.cfg read (real ones are about 1 KiB).
pub const MAX_VM_CFG: u64 = 1 << 20;
/// Largest .ovsmeta read.
pub const MAX_OVSMETA: u64 = 16 << 20;
/// Pause before reading a database again that did not parse (ovs-agent
/// may have been writing it).
const DB_RETRY_DELAY: Duration = Duration::from_millis(20);
/// How long a failed clone probe is trusted before it is tried again.
pub const PROBE_RETRY: Duration = Duration::from_secs(60);

/// What identifies a version of a file or folder without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    is_dir: bool,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        is_dir: m.is_dir(),
    })
}

struct ProbeEntry {
    dev: u64,
    at: Instant,
    probe: CloneProbe,
}

type OvsMeta = Arc<HashMap<String, OvsMetaEntry>>;

#[derive(Default)]
struct State {
    repo_db: Option<(Stamp, Arc<Vec<Repository>>)>,
    dirs: HashMap<PathBuf, (Stamp, Arc<Vec<OsString>>)>,
    vmcfgs: HashMap<PathBuf, (Stamp, Option<Arc<VmConfig>>)>,
    ovsmeta: HashMap<PathBuf, (Stamp, Option<OvsMeta>)>,
    probes: HashMap<PathBuf, ProbeEntry>,
    /// Problems already logged, by subject, so that a listing every few
    /// seconds does not repeat them; forgotten once fixed.
    warned: HashMap<String, String>,
}

/// One listing's view of a usable repository.
struct RepoView {
    repo: Repository,
    ovsmeta: Option<OvsMeta>,
    probe: CloneProbe,
}

/// What one pass over the node found.
struct Listing {
    repos: Vec<RepoView>,
    vms: Vec<Vm>,
    /// Every candidate repository, usable or skipped, sorted by id.
    status: Vec<RepositoryStatus>,
}

enum Source {
    OvsAgent {
        db_dir: PathBuf,
        check_mounted: bool,
    },
    Static {
        repos: Vec<StaticRepository>,
        vms: Vec<StaticVm>,
    },
}

/// The inventory of this node (ovs-agent or static), cached.
pub struct NodeInventory {
    source: Source,
    state: Mutex<State>,
}

/// Collects this pass's warnings, logging only new ones.
struct Warnings<'a> {
    seen: &'a mut HashMap<String, String>,
    now: HashSet<String>,
}

impl Warnings<'_> {
    fn warn(&mut self, subject: String, msg: String) {
        if self.seen.get(&subject) != Some(&msg) {
            warn!(subject = %subject, "{msg}");
            self.seen.insert(subject.clone(), msg);
        }
        self.now.insert(subject);
    }

    fn finish(self) {
        let now = self.now;
        self.seen.retain(|k, _| now.contains(k));
    }
}

impl NodeInventory {
    pub fn open(cfg: &InventoryConfig) -> Result<Self, InventoryError> {
        cfg.validate().map_err(InventoryError::Config)?;
        let use_agent = match cfg.source {
            InventorySource::OvsAgent => true,
            InventorySource::Static => false,
            InventorySource::Auto => cfg.ovs_agent_db_dir.join(REPOSITORY_DB).exists(),
        };
        let source = if use_agent {
            if !cfg.repositories.is_empty() || !cfg.vms.is_empty() {
                warn!(
                    "the inventory comes from ovs-agent ({}): the static repositories and VMs \
                     of the config are ignored",
                    cfg.ovs_agent_db_dir.display()
                );
            }
            info!(db_dir = %cfg.ovs_agent_db_dir.display(), "inventory from ovs-agent");
            Source::OvsAgent {
                db_dir: cfg.ovs_agent_db_dir.clone(),
                check_mounted: cfg.check_mounted,
            }
        } else {
            info!(
                repositories = cfg.repositories.len(),
                vms = cfg.vms.len(),
                "static inventory"
            );
            Source::Static {
                repos: cfg.repositories.clone(),
                vms: cfg.vms.clone(),
            }
        };
        Ok(NodeInventory {
            source,
            state: Mutex::new(State::default()),
        })
    }

    fn list(&self) -> Result<Listing, InventoryError> {
        // The state is only a cache: a panic that poisoned it left nothing
        // that a re-read does not fix.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        let mut warned = std::mem::take(&mut st.warned);
        let mut w = Warnings {
            seen: &mut warned,
            now: HashSet::new(),
        };
        let result = self.list_locked(st, &mut w);
        w.finish();
        st.warned = warned;
        result
    }

    fn list_locked(&self, st: &mut State, w: &mut Warnings) -> Result<Listing, InventoryError> {
        // (repository, scan its VirtualMachines, must be a mount point)
        let candidates: Vec<(Repository, bool, bool)> = match &self.source {
            Source::OvsAgent {
                db_dir,
                check_mounted,
            } => {
                let repos = repositories_from_db(st, &db_dir.join(REPOSITORY_DB), w)?;
                repos
                    .iter()
                    .map(|r| (r.clone(), true, *check_mounted))
                    .collect()
            }
            Source::Static { repos, .. } => repos
                .iter()
                .map(|r| {
                    (
                        Repository {
                            id: r.id.clone(),
                            mount_point: r.mount_point.clone(),
                            filesystem: r.filesystem.clone().unwrap_or_default(),
                            alias: r.alias.clone().unwrap_or_else(|| r.id.clone()),
                        },
                        r.discover_vms,
                        false,
                    )
                })
                .collect(),
        };

        let mut old_dirs = std::mem::take(&mut st.dirs);
        let mut old_cfgs = std::mem::take(&mut st.vmcfgs);
        let mut old_meta = std::mem::take(&mut st.ovsmeta);
        let mut views = Vec::new();
        let mut status = Vec::new();
        let mut configs: Vec<Arc<VmConfig>> = Vec::new();
        for (mut repo, discover, must_be_mount) in candidates {
            let subject = format!("repository {}", repo.id);
            let mount_stamp = match check_mount(&repo.mount_point, must_be_mount) {
                Ok(s) => s,
                Err(e) => {
                    status.push(RepositoryStatus {
                        id: repo.id.clone(),
                        readable: false,
                        cloneable: false,
                        reason: Some(format!("skipped: {e}")),
                    });
                    w.warn(
                        subject,
                        format!(
                            "repository {} at {} skipped: {e}",
                            repo.id,
                            repo.mount_point.display()
                        ),
                    );
                    continue;
                }
            };
            let probe = cached_probe(&mut st.probes, &repo.mount_point, mount_stamp.dev);
            if repo.filesystem.is_empty() {
                repo.filesystem = probe.fs_type.map(|f| f.name()).unwrap_or_default();
            }
            let meta_path = repo.mount_point.join(OVSMETA);
            let ovsmeta = cached_ovsmeta(
                &mut old_meta,
                &mut st.ovsmeta,
                &repo.mount_point,
                &meta_path,
                w,
            );
            let mut unreadable = None;
            if discover {
                let vm_dir = repo.mount_point.join(VM_DIR);
                let entries = cached_dir(&mut old_dirs, &mut st.dirs, &vm_dir, w, &mut unreadable);
                for entry in entries.iter() {
                    let cfg_path = vm_dir.join(entry).join(VM_CFG);
                    if let Some(c) = cached_vmcfg(
                        &mut old_cfgs,
                        &mut st.vmcfgs,
                        &repo.mount_point,
                        &cfg_path,
                        w,
                    ) {
                        configs.push(c);
                    }
                }
            }
            status.push(RepositoryStatus {
                id: repo.id.clone(),
                readable: unreadable.is_none(),
                cloneable: probe.can_clone,
                reason: unreadable
                    .map(|e| format!("{VM_DIR} cannot be read: {e}"))
                    .or_else(|| probe.error.clone().map(|e| format!("cannot clone: {e}"))),
            });
            views.push(RepoView {
                repo,
                ovsmeta,
                probe,
            });
        }
        if let Source::Static { vms, .. } = &self.source {
            configs.extend(vms.iter().map(|v| Arc::new(static_vm_config(v))));
        }
        // Probes of repositories gone from the listing are forgotten.
        let live: HashSet<&Path> = views.iter().map(|v| v.repo.mount_point.as_path()).collect();
        st.probes.retain(|p, _| live.contains(p.as_path()));

        let index = RepoIndex::new(&views);
        let mut vms: Vec<Vm> = Vec::with_capacity(configs.len());
        let mut names = HashSet::new();
        for c in configs {
            if !names.insert(c.name.clone()) {
                w.warn(
                    format!("vm {}", c.name),
                    format!("VM {} is described twice; the first one is listed", c.name),
                );
                continue;
            }
            vms.push(Vm {
                name: c.name.clone(),
                uuid: c.uuid.clone().unwrap_or_default(),
                friendly_name: c.simple_name.clone().unwrap_or_else(|| c.name.clone()),
                // An empty drive (`',xvdc:cdrom,r'`) holds no data: it is
                // not a disk, and must not make the VM incompatible.
                disks: c
                    .disks
                    .iter()
                    .filter(|d| d.target != DiskTarget::Empty)
                    .map(|d| build_disk(d, &index))
                    .collect(),
            });
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        views.sort_by(|a, b| a.repo.id.cmp(&b.repo.id));
        status.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Listing {
            repos: views,
            vms,
            status,
        })
    }
}

/// Opens the inventory the config describes. With `source = "auto"`, the
/// ovs-agent databases are used when `<ovs_agent_db_dir>/repository`
/// exists, else the static inventory.
pub fn open_inventory(cfg: &InventoryConfig) -> Result<Arc<dyn Inventory>, InventoryError> {
    Ok(Arc::new(NodeInventory::open(cfg)?))
}

impl Inventory for NodeInventory {
    fn vms(&self) -> Result<Vec<Vm>, InventoryError> {
        Ok(self.list()?.vms)
    }

    fn vm(&self, name: &str) -> Result<Option<Vm>, InventoryError> {
        Ok(self.list()?.vms.into_iter().find(|v| v.name == name))
    }

    fn repositories(&self) -> Result<Vec<Repository>, InventoryError> {
        Ok(self.list()?.repos.into_iter().map(|v| v.repo).collect())
    }

    fn clone_probes(&self) -> Result<Vec<(Repository, CloneProbe)>, InventoryError> {
        Ok(self
            .list()?
            .repos
            .into_iter()
            .map(|v| (v.repo, v.probe))
            .collect())
    }

    fn repository_status(&self) -> Result<Vec<RepositoryStatus>, InventoryError> {
        Ok(self.list()?.status)
    }
}

/// The repositories of ovs-agent's `repository` database, cached by stamp.
/// The database itself must be readable; a bad record is skipped.
fn repositories_from_db(
    st: &mut State,
    path: &Path,
    w: &mut Warnings,
) -> Result<Arc<Vec<Repository>>, InventoryError> {
    let s = stamp(path).map_err(|source| InventoryError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Some((old, repos)) = &st.repo_db {
        if *old == s {
            return Ok(repos.clone());
        }
    }
    let pairs = match read_pairs(path) {
        Ok(p) => p,
        Err(_) => {
            // ovs-agent may be rewriting the file right now: look again.
            std::thread::sleep(DB_RETRY_DELAY);
            match read_pairs(path) {
                Ok(p) => p,
                Err(e) => match &st.repo_db {
                    // Better the last good list than no VM at all.
                    Some((_, repos)) => {
                        w.warn(
                            path.display().to_string(),
                            format!("{}; using the repositories read before", error_chain(&e)),
                        );
                        return Ok(repos.clone());
                    }
                    None => return Err(e),
                },
            }
        }
    };
    let mut repos = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        match RepositoryRecord::from_pickle(&k, &v) {
            Ok(r) => repos.push(Repository {
                id: r.id,
                mount_point: r.mount_point,
                filesystem: r.filesystem,
                alias: r.alias,
            }),
            Err(e) => {
                let key = bytes_to_text(&k);
                w.warn(
                    format!("repository record {key}"),
                    format!(
                        "{}: repository {key:?} skipped: {}",
                        path.display(),
                        error_chain(&e)
                    ),
                );
            }
        }
    }
    repos.sort_by(|a, b| a.id.cmp(&b.id));
    let repos = Arc::new(repos);
    st.repo_db = Some((s, repos.clone()));
    Ok(repos)
}

fn read_pairs(path: &Path) -> Result<Vec<crate::ovm::bdb::Pair>, InventoryError> {
    let bytes = read_bounded(path, MAX_DB_FILE)?;
    let db = HashDb::open(&bytes).map_err(|source| InventoryError::Db {
        path: path.to_owned(),
        source,
    })?;
    db.pairs().map_err(|source| InventoryError::Db {
        path: path.to_owned(),
        source,
    })
}

/// A repository is usable when its mount point is a readable folder (and,
/// for ovs-agent's repositories, really mounted: an empty folder left at
/// `/OVS/Repositories/<id>` must not be taken for the repository).
fn check_mount(mount: &Path, must_be_mount: bool) -> Result<Stamp, String> {
    let s = stamp(mount).map_err(|e| format!("mount point unusable: {e}"))?;
    if !s.is_dir {
        return Err("mount point is not a folder".into());
    }
    std::fs::File::open(mount).map_err(|e| format!("mount point unreadable: {e}"))?;
    if must_be_mount {
        if let Some(parent) = mount.parent() {
            if let Ok(p) = stamp(parent) {
                if p.dev == s.dev && p.ino != s.ino {
                    return Err("not mounted (same filesystem as its parent folder)".into());
                }
            }
        }
    }
    Ok(s)
}

fn cached_probe(probes: &mut HashMap<PathBuf, ProbeEntry>, mount: &Path, dev: u64) -> CloneProbe {
    if let Some(e) = probes.get(mount) {
        if e.dev == dev && (e.probe.can_clone || e.at.elapsed() < PROBE_RETRY) {
            return e.probe.clone();
        }
    }
    let probe = probe_clone(mount);
    if probe.can_clone {
        info!(mount = %mount.display(), "clone probe: {}", probe.describe());
    } else {
        warn!(mount = %mount.display(), "clone probe: {}", probe.describe());
    }
    probes.insert(
        mount.to_owned(),
        ProbeEntry {
            dev,
            at: Instant::now(),
            probe: probe.clone(),
        },
    );
    probe
}

/// `.ovsmeta` of a repository; absent is normal, broken is logged.
fn cached_ovsmeta(
    old: &mut HashMap<PathBuf, (Stamp, Option<OvsMeta>)>,
    new: &mut HashMap<PathBuf, (Stamp, Option<OvsMeta>)>,
    mount: &Path,
    path: &Path,
    w: &mut Warnings,
) -> Option<OvsMeta> {
    let subject = path.display().to_string();
    let s = stamp(path).ok()?;
    let entry = match old.remove(path) {
        Some((olds, v)) if olds == s => v,
        _ => {
            let parsed = read_bounded_beneath(mount, path, MAX_OVSMETA)
                .map_err(|e| error_chain(&e))
                .and_then(|b| vmcfg::parse_ovsmeta(&b).map_err(|e| error_chain(&e)));
            match parsed {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    w.warn(subject.clone(), format!("{subject} ignored: {e}"));
                    None
                }
            }
        }
    };
    if entry.is_none() {
        // Keep it warned while it stays broken.
        w.now.insert(subject);
    }
    new.insert(path.to_owned(), (s, entry.clone()));
    entry
}

/// The entries of a folder, sorted; a missing folder is empty. A folder
/// that cannot be read is empty too, with the error in `failed`.
fn cached_dir(
    old: &mut HashMap<PathBuf, (Stamp, Arc<Vec<OsString>>)>,
    new: &mut HashMap<PathBuf, (Stamp, Arc<Vec<OsString>>)>,
    path: &Path,
    w: &mut Warnings,
    failed: &mut Option<String>,
) -> Arc<Vec<OsString>> {
    let subject = path.display().to_string();
    let s = match stamp(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Arc::default(),
        Err(e) => {
            w.warn(subject.clone(), format!("{subject} skipped: {e}"));
            *failed = Some(e.to_string());
            return Arc::default();
        }
    };
    if let Some((olds, v)) = old.remove(path) {
        if olds == s {
            new.insert(path.to_owned(), (s, v.clone()));
            return v;
        }
    }
    let mut names = Vec::new();
    match std::fs::read_dir(path) {
        Ok(rd) => {
            for e in rd {
                match e {
                    Ok(e) => names.push(e.file_name()),
                    Err(err) => {
                        w.warn(subject.clone(), format!("{subject}: listing failed: {err}"));
                        *failed = Some(err.to_string());
                        return Arc::default();
                    }
                }
            }
        }
        Err(e) => {
            w.warn(subject.clone(), format!("{subject} skipped: {e}"));
            *failed = Some(e.to_string());
            return Arc::default();
        }
    }
    names.sort();
    let names = Arc::new(names);
    new.insert(path.to_owned(), (s, names.clone()));
    names
}

/// A VM folder's parsed vm.cfg; a missing or broken one is logged and
/// gives `None` (the VM is skipped, the others are listed).
fn cached_vmcfg(
    old: &mut HashMap<PathBuf, (Stamp, Option<Arc<VmConfig>>)>,
    new: &mut HashMap<PathBuf, (Stamp, Option<Arc<VmConfig>>)>,
    mount: &Path,
    path: &Path,
    w: &mut Warnings,
) -> Option<Arc<VmConfig>> {
    let subject = path.display().to_string();
    let s = match stamp(path) {
        Ok(s) if !s.is_dir => s,
        Ok(_) => {
            w.warn(
                subject.clone(),
                format!("VM skipped: {subject} is a folder"),
            );
            return None;
        }
        Err(e) => {
            // A stray file in VirtualMachines is not a VM folder: quiet.
            if path.parent().is_some_and(|p| p.is_dir()) {
                w.warn(subject.clone(), format!("VM skipped: {subject}: {e}"));
            }
            return None;
        }
    };
    let entry = match old.remove(path) {
        Some((olds, v)) if olds == s => v,
        _ => {
            let parsed = read_bounded_beneath(mount, path, MAX_VM_CFG)
                .map_err(|e| error_chain(&e))
                .and_then(|b| vmcfg::vm_config(&b).map_err(|e| error_chain(&e)));
            match parsed {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    w.warn(subject.clone(), format!("VM skipped: {subject}: {e}"));
                    None
                }
            }
        }
    };
    if entry.is_none() {
        w.now.insert(subject);
    }
    new.insert(path.to_owned(), (s, entry.clone()));
    entry
}

fn static_vm_config(v: &StaticVm) -> VmConfig {
    VmConfig {
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        simple_name: v.friendly_name.clone(),
        disks: v
            .disks
            .iter()
            .map(|d| DiskSpec {
                target: DiskTarget::File(d.path.clone()),
                device: d.device_name.clone(),
                cdrom: d.cdrom,
                mode: d.mode.clone(),
                raw: d.path.display().to_string(),
            })
            .collect(),
    }
}

fn file_name_text(p: &Path) -> String {
    p.file_name()
        .map(|n| {
            use std::os::unix::ffi::OsStrExt;
            bytes_to_text(n.as_bytes())
        })
        .unwrap_or_default()
}

/// Finds the repository of a disk, built once per listing so that 1000
/// disks over 20 repositories cost a hash lookup and a few byte compares
/// each (`Path::starts_with` re-parses components every call).
struct RepoIndex<'a> {
    views: &'a [RepoView],
    /// Each mount point as `/a/b` bytes (`` for `/`); `None` for a mount
    /// point with `..` in it, which nothing is taken to be inside.
    mounts: Vec<Option<Vec<u8>>>,
    /// File name -> the repositories whose `.ovsmeta` names it.
    named: HashMap<&'a str, Vec<usize>>,
}

/// `p` as `/a/b` bytes, `None` if it has `..` or is relative.
fn normalized(p: &Path) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    use std::path::Component;
    let mut out = Vec::with_capacity(p.as_os_str().len());
    let mut rooted = false;
    for c in p.components() {
        match c {
            Component::RootDir => rooted = true,
            Component::Normal(n) => {
                out.push(b'/');
                out.extend_from_slice(n.as_bytes());
            }
            _ => return None,
        }
    }
    rooted.then_some(out)
}

impl<'a> RepoIndex<'a> {
    fn new(views: &'a [RepoView]) -> Self {
        let mut named: HashMap<&'a str, Vec<usize>> = HashMap::new();
        for (i, v) in views.iter().enumerate() {
            for name in v.ovsmeta.iter().flat_map(|m| m.keys()) {
                named.entry(name.as_str()).or_default().push(i);
            }
        }
        RepoIndex {
            views,
            mounts: views
                .iter()
                .map(|v| normalized(&v.repo.mount_point))
                .collect(),
            named,
        }
    }

    /// The repository of a disk file: one whose `.ovsmeta` names it (one
    /// whose mount point also holds the path first), else the deepest mount
    /// point holding the path.
    fn find(&self, path: &Path, name: &str) -> Option<&'a RepoView> {
        let p = normalized(path);
        let inside = |i: &usize| match (&p, &self.mounts[*i]) {
            (Some(p), Some(m)) => p.len() > m.len() && p.starts_with(m) && p[m.len()] == b'/',
            _ => false,
        };
        if let Some(cands) = self.named.get(name) {
            return cands
                .iter()
                .find(|i| inside(i))
                .or(cands.first())
                .map(|&i| &self.views[i]);
        }
        (0..self.views.len())
            .filter(inside)
            .max_by_key(|&i| self.mounts[i].as_ref().map_or(0, Vec::len))
            .map(|i| &self.views[i])
    }
}

fn build_disk(spec: &DiskSpec, repos: &RepoIndex) -> Disk {
    let mut disk = Disk {
        name: String::new(),
        path: PathBuf::new(),
        device_name: spec.device.clone(),
        mode: spec.mode.clone(),
        repository: None,
        snapshot_compatible: false,
        incompatible_reason: None,
    };
    let reason = match &spec.target {
        DiskTarget::Phy(p) => {
            disk.name = file_name_text(p);
            disk.path = p.clone();
            Some(format!(
                "phy: block device {}, not a file on a repository",
                p.display()
            ))
        }
        DiskTarget::Empty => Some("empty drive: no file".to_owned()),
        DiskTarget::Other(_) => Some(format!("unsupported disk spec {:?}", spec.raw)),
        DiskTarget::File(p) if !is_plain_absolute(p) => {
            disk.name = file_name_text(p);
            disk.path = p.clone();
            // A relative path, or one with `.` or `..`, could point anywhere
            // (`<repo>/../../etc/shadow` starts with the repository's path).
            Some(format!(
                "disk path {} is not a plain absolute path",
                p.display()
            ))
        }
        DiskTarget::File(p) => {
            disk.name = file_name_text(p);
            disk.path = p.clone();
            let repo = repos.find(p, &disk.name);
            disk.repository = repo.map(|r| r.repo.clone());
            file_disk_reason(spec, p, &disk.name, repo)
        }
    };
    disk.snapshot_compatible = reason.is_none();
    disk.incompatible_reason = reason;
    disk
}

/// Absolute, without `..` components, with a file name (`.` components
/// are dropped by `Path::components` and change nothing).
fn is_plain_absolute(p: &Path) -> bool {
    use std::path::Component;
    p.is_absolute()
        && p.file_name().is_some()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn file_disk_reason(
    spec: &DiskSpec,
    path: &Path,
    name: &str,
    repo: Option<&RepoView>,
) -> Option<String> {
    if spec.cdrom {
        return Some("cdrom drive".to_owned());
    }
    let meta_type = repo
        .and_then(|r| r.ovsmeta.as_ref())
        .and_then(|m| m.get(name))
        .and_then(|e| e.object_type.clone());
    if let Some(t) = meta_type.filter(|t| t != OVSMETA_VIRTUAL_DISK) {
        return Some(format!(".ovsmeta says {t}, not {OVSMETA_VIRTUAL_DISK}"));
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("iso"))
    {
        return Some("ISO image".to_owned());
    }
    let Some(repo) = repo else {
        return Some("not on a known repository".to_owned());
    };
    if !repo.probe.can_clone {
        return Some(format!(
            "repository {} cannot clone ({})",
            repo.repo.id,
            repo.probe.describe()
        ));
    }
    // Beneath the repository's mount, with no symlink in any component
    // (a disk outside it is never cloned or read).
    if !path.starts_with(&repo.repo.mount_point) {
        return Some(format!(
            "outside the mount point {} of repository {}",
            repo.repo.mount_point.display(),
            repo.repo.id
        ));
    }
    match open_beneath(&repo.repo.mount_point, path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => None,
        Ok(_) => Some("not a regular file".to_owned()),
        Err(e) => Some(format!("disk file unusable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: &str) -> DiskSpec {
        vmcfg::parse_disk_spec(target.as_bytes())
    }

    #[test]
    fn tricky_paths_are_never_compatible() {
        let repos = [RepoView {
            repo: Repository {
                id: "r".into(),
                mount_point: "/OVS/Repositories/r".into(),
                filesystem: "xfs".into(),
                alias: "r".into(),
            },
            ovsmeta: None,
            probe: CloneProbe {
                mount_point: "/OVS/Repositories/r".into(),
                can_clone: true,
                method: None,
                fs_type: None,
                error: None,
            },
        }];
        let repos = RepoIndex::new(&repos);
        for t in [
            "file:/OVS/Repositories/r/../../../etc/shadow,xvda,w",
            "file:relative/x.img,xvda,w",
        ] {
            let d = build_disk(&spec(t), &repos);
            assert!(!d.snapshot_compatible, "{t}");
            assert!(d.repository.is_none(), "{t}");
        }
        let d = build_disk(
            &spec("file:/OVS/Repositories/r/VirtualDisks/x.img,xvda,w"),
            &repos,
        );
        assert_eq!(d.repository.as_ref().unwrap().id, "r");
        // The file does not exist here: that is the only reason left.
        assert!(d.incompatible_reason.unwrap().contains("unusable"));
        let d = build_disk(&spec("file:/OVS/Repositories/rr/x.img,xvda,w"), &repos);
        assert!(
            d.repository.is_none(),
            "a sibling with a longer name is not inside"
        );
    }
}
