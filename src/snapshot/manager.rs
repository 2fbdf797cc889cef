//! The [`Manager`]: create, get (squash, diff), list, delete, purge, open a
//! disk for reading (the module's essay, `snapshot/mod.rs`, says how a
//! snapshot lies on disk and why in that order). Reconcile and the pool's
//! catalog add their methods in `reconcile.rs` and `catalog.rs`.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use crate::extent::{self, Extent, ExtentMap};
use crate::ovm::{InventoryError, Vm};
use crate::store::{DiskRecord, Fingerprint, SnapshotRecord, Store, StoreOptions};
use crate::sys::path::{self, SNAPSHOTS_DIR};
use crate::wire::{Chunk, GetOptions, Snapshot, SnapshotDisk};

use super::cancel::Cancel;
use super::catalog;
use super::config::StoreConfig;
use super::error::{SnapshotError, Unverified};
use super::exact::{self, ExactMode};
use super::fault;
use super::manifest::{
    Manifest, MANIFEST, MANIFEST_FORMAT, MANIFEST_TMP, OWNER_MARK, RESERVED_PREFIX,
};

/// How the manager finds VMs: the inventory implements this.
pub trait VmLookup: Send + Sync {
    /// The VM named `name` (the `{vm}` of the API), or None if unknown. An
    /// Err is a failure of the inventory itself.
    fn vm(&self, name: &str) -> Result<Option<Vm>, InventoryError>;
}

/// A chunk of the answer from an extent of the map (the wire's shape is
/// `crate::wire`'s; this is where the snapshot side converts to it).
impl From<&Extent> for Chunk {
    fn from(e: &Extent) -> Self {
        Chunk {
            start: e.logical,
            length: e.length,
            physical_start: e.physical,
        }
    }
}

/// A disk of the VM, checked and ready to clone.
#[derive(Debug)]
struct PlannedDisk {
    name: String,
    parent_path: PathBuf,
    src_dir: PathBuf,
    src_name: String,
    repo_mount: PathBuf,
}

/// A snapshot folder made by a create in progress: staged under
/// `.coriolis-staging-<id>` until published as `<id>`.
struct Folder {
    repo_mount: PathBuf,
    snaps_dir: OwnedFd,
    dir: OwnedFd,
    published: bool,
}

/// A handle on one VM's lock (see `Manager::vm_mutex`): lock it with
/// [`VmLock::lock`]; dropped after its guard, it removes the VM's entry when
/// nobody else has it.
struct VmLock<'a> {
    locks: &'a Mutex<HashMap<String, Arc<Mutex<()>>>>,
    vm: String,
    mutex: Arc<Mutex<()>>,
}

impl VmLock<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.mutex.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for VmLock<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under the map's lock: 2 (the map's and
        // ours) means nobody else holds or waits for it.
        if Arc::strong_count(&self.mutex) == 2 {
            map.remove(&self.vm);
        }
    }
}

/// The snapshot manager. `Send + Sync`; every method blocks.
pub struct Manager {
    pub(super) store: Store,
    lookup: Arc<dyn VmLookup>,
    pub(super) owner: String,
    /// One mutex per VM name serialises creates, deletes and purges of one
    /// VM (so two creates give two snapshots and a delete never races a
    /// create of the same VM). Entries are never removed: one per VM the
    /// node ever had, a few bytes each.
    vm_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Reconcile takes this exclusively; every mutation shares it, so that
    /// reconcile never mistakes a create in progress for debris.
    pub(super) reconciling: RwLock<()>,
    /// When diffs are refined by content without `exact=` (`[diff] exact`).
    exact: ExactMode,
    /// A maker's lease on its half-made folders (`[store] lease_seconds`).
    pub(super) lease: std::time::Duration,
    /// What the cache holds of each repository (catalog.rs).
    pub(super) catalog: catalog::CatalogState,
    /// Held for the manager's life: a second process (e.g. an admin command
    /// while the service runs) is refused instead of reconciling away the
    /// service's creates in progress.
    _process_lock: File,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("store", &self.store)
            .field("owner", &self.owner)
            .finish()
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The path of the process lock beside the database file.
fn process_lock_path(db_file: &Path) -> PathBuf {
    let mut s = db_file.as_os_str().to_owned();
    s.push(".coe-lock");
    PathBuf::from(s)
}

impl Manager {
    /// Opens the store at `db_file` for this process. Does not reconcile:
    /// call [`Manager::reconcile`] with the inventory's repositories at
    /// start.
    pub fn open(
        db_file: &Path,
        config: &StoreConfig,
        lookup: Arc<dyn VmLookup>,
    ) -> Result<Manager, SnapshotError> {
        if let Some(parent) = db_file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| SnapshotError::io("create the database folder", lossy(parent), e))?;
        }
        let lock_path = process_lock_path(db_file);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| SnapshotError::io("open the database lock", lossy(&lock_path), e))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(SnapshotError::Busy {
                    path: db_file.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(SnapshotError::io(
                    "lock the database",
                    lossy(&lock_path),
                    e.into(),
                ))
            }
        }
        let options = StoreOptions {
            map_size: usize::try_from(config.map_size).unwrap_or(usize::MAX),
            max_readers: config.max_readers,
        };
        let store = Store::open(db_file, &options)?;
        if let Some(p) = fault::armed_point() {
            tracing::warn!(
                point = p,
                "{} is set: this process will kill itself at that point",
                fault::ENV
            );
        }
        Ok(Manager {
            store,
            lookup,
            owner: config.owner_id(),
            vm_locks: Mutex::new(HashMap::new()),
            reconciling: RwLock::new(()),
            _process_lock: lock,
            exact: ExactMode::default(),
            lease: config.lease(),
            catalog: catalog::CatalogState::default(),
        })
    }

    /// The underlying store (read-only uses: metrics, tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This exporter's owner id, written into every snapshot folder.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The lock that serializes create, delete and purge of one VM. Its
    /// entry in `vm_locks` lives only while someone holds or waits for it,
    /// so ids sent to DELETE for VMs that do not exist leave nothing behind.
    fn vm_mutex(&self, vm: &str) -> VmLock<'_> {
        let mut map = self.vm_locks.lock().unwrap_or_else(|e| e.into_inner());
        VmLock {
            locks: &self.vm_locks,
            vm: vm.to_owned(),
            mutex: map.entry(vm.to_owned()).or_default().clone(),
        }
    }

    /// VMs with a lock entry now (tests: entries must not accumulate).
    pub fn vm_lock_entries(&self) -> usize {
        self.vm_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn lookup_vm(&self, name: &str) -> Result<Option<Vm>, SnapshotError> {
        self.lookup.vm(name).map_err(SnapshotError::Inventory)
    }

    /// Snapshots every disk of `vm` under one new id (SEMANTICS.md §1).
    /// Returns the new snapshot with its chunks not squashed.
    pub fn create(&self, vm: &str) -> Result<Snapshot, SnapshotError> {
        self.create_keyed(vm, None).map(|(s, _)| s)
    }

    /// [`Manager::create`] with an idempotency key (the API's
    /// `Idempotency-Key`): if this key of this VM made a snapshot within
    /// the store's window and it still exists, that snapshot is answered
    /// (true: a replay) and nothing is made; else a new one is made and
    /// the key recorded with it, in the same commit, so that a retry after
    /// an answer lost to a crash finds it.
    pub fn create_keyed(
        &self,
        vm: &str,
        key: Option<&str>,
    ) -> Result<(Snapshot, bool), SnapshotError> {
        let _shared = self.reconciling.read().unwrap_or_else(|e| e.into_inner());
        let vm = self.lookup_vm(vm)?.ok_or_else(|| SnapshotError::NotFound {
            what: format!("VM {vm}"),
        })?;
        let plan = plan_disks(&vm)?;
        let m = self.vm_mutex(&vm.name);
        let _one_at_a_time = m.lock();
        if let Some(k) = key {
            // A snapshot of that key deleted through another node is gone.
            self.refresh()?;
            // Under the VM's lock: no create or delete of it runs now.
            if let Some(id) = self.store.idempotent(&vm.name, k, now_ns())? {
                if let Some(rec) = self.store.get(&id)? {
                    let maps = self.maps_of(&rec)?;
                    tracing::info!(snapshot = %rec.id, vm = %rec.vm, "create replayed for its idempotency key");
                    return Ok((info(&rec, &maps, false), true));
                }
            }
        }
        let id = Uuid::new_v4().to_string();
        let mut folders = Vec::new();
        let result = self.create_in(&vm, &plan, &id, &mut folders, key);
        if result.is_err() {
            for f in &folders {
                // Claimed first (renamed to trash): a folder of ours that a
                // sweeper already claimed is simply gone.
                let name = if f.published {
                    id.clone()
                } else {
                    catalog::staging_name(&id)
                };
                if let Err(e) = catalog::claim_and_remove(f.snaps_dir.as_fd(), &name) {
                    // Reconcile removes it at the next start (owner mark).
                    tracing::error!(snapshot = %id, repo = %f.repo_mount.display(), error = %e,
                        "cannot remove the folder of a failed snapshot");
                }
            }
            // Published, then failed (the record could not be written): a
            // node that adopted it meanwhile (this one too) drops it at its
            // next request.
            self.bump_all(
                folders
                    .iter()
                    .filter(|f| f.published)
                    .map(|f| (f.snaps_dir.as_fd(), f.repo_mount.as_path())),
            );
        }
        let (record, maps) = result?;
        tracing::info!(snapshot = %record.id, vm = %record.vm, disks = record.disks.len(), "snapshot created");
        Ok((info(&record, &maps, false), false))
    }

    fn create_in(
        &self,
        vm: &Vm,
        plan: &[PlannedDisk],
        id: &str,
        folders: &mut Vec<Folder>,
        key: Option<&str>,
    ) -> Result<(SnapshotRecord, Vec<ExtentMap>), SnapshotError> {
        // (`folders` is the caller's so that it can clean up on failure.)
        let created_at_ns = now_ns();
        let staging = catalog::staging_name(id);
        self.know_repos(plan.iter().map(|d| d.repo_mount.as_path()));
        for d in plan {
            if folders.iter().any(|f| f.repo_mount == d.repo_mount) {
                continue;
            }
            let what = || lossy(&d.repo_mount);
            let repo = path::open_dir(&d.repo_mount)
                .map_err(|e| SnapshotError::io("open the repository", what(), e))?;
            let (snaps_dir, _) = path::ensure_dir_at(repo.as_fd(), SNAPSHOTS_DIR)
                .map_err(|e| SnapshotError::io("open CoriolisSnapshots", what(), e))?;
            let dir = path::create_dir_at(snaps_dir.as_fd(), &staging)
                .map_err(|e| SnapshotError::io("create the snapshot folder", what(), e))?;
            folders.push(Folder {
                repo_mount: d.repo_mount.clone(),
                snaps_dir,
                dir,
                published: false,
            });
            let f = folders.last().expect("just pushed");
            path::write_new(f.dir.as_fd(), OWNER_MARK, self.owner.as_bytes())
                .map_err(|e| SnapshotError::io("write the owner mark", what(), e))?;
        }
        fault::point(fault::CREATE_AFTER_MKDIR);

        let mut disks = Vec::with_capacity(plan.len());
        let mut maps = Vec::with_capacity(plan.len());
        let mut renewed = std::time::Instant::now();
        for (i, d) in plan.iter().enumerate() {
            let folder = folders
                .iter()
                .find(|f| f.repo_mount == d.repo_mount)
                .expect("a folder per repository");
            // The disk's folder beneath its repository's mount, with no
            // symlink in any component (the inventory checked the same; a
            // path swapped since is refused here, not followed).
            let src_dir = open_src_dir(&d.repo_mount, &d.src_dir)
                .map_err(|e| SnapshotError::io("open the disk's folder", &d.name, e))?;
            if i == 1 {
                for (point, errno) in [
                    (fault::CREATE_CLONE_ENOSPC, rustix::io::Errno::NOSPC),
                    (fault::CREATE_CLONE_EIO, rustix::io::Errno::IO),
                ] {
                    if crate::sys::fault::once(point) {
                        return Err(SnapshotError::Clone {
                            disk: d.name.clone(),
                            source: crate::sys::CloneError::Reflink {
                                name: d.name.clone(),
                                source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
                            },
                        });
                    }
                }
            }
            crate::sys::reflink(
                src_dir.as_fd(),
                Path::new(&d.src_name),
                folder.dir.as_fd(),
                Path::new(&d.name),
            )
            .map_err(|source| SnapshotError::Clone {
                disk: d.name.clone(),
                source,
            })?;
            if i == 0 {
                fault::point(fault::CREATE_AFTER_FIRST_CLONE);
            }
            // The source's identity: a later snapshot whose disk is another
            // file cannot be diffed against this one (`disk_replaced`).
            let parent_ino = path::cname(&d.src_name)
                .ok()
                .and_then(|c| {
                    rustix::fs::statat(
                        src_dir.as_fd(),
                        c.as_c_str(),
                        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .ok()
                })
                // Field widths differ between targets.
                .map(|st| {
                    #[allow(clippy::unnecessary_cast)]
                    let ino = st.st_ino as u64;
                    ino
                });
            let clone = path::open_file_at(folder.dir.as_fd(), &d.name)
                .map_err(|e| SnapshotError::io("open the clone", &d.name, e))?;
            // The record will say this clone exists: make it durable first.
            clone
                .sync_all()
                .map_err(|e| SnapshotError::io("sync the clone", &d.name, e))?;
            let map =
                crate::sys::extent_map(&clone, false).map_err(|source| SnapshotError::Fiemap {
                    disk: d.name.clone(),
                    source,
                })?;
            let fingerprint = Fingerprint::of(&clone)
                .map_err(|e| SnapshotError::io("stat the clone", &d.name, e))?;
            disks.push(DiskRecord {
                name: d.name.clone(),
                parent_path: d.parent_path.clone(),
                repo_mount: d.repo_mount.clone(),
                size: fingerprint.size,
                fingerprint,
                extents: map.len() as u64,
                parent_ino,
            });
            maps.push(map);
            // Renew the lease after each clone (one may take minutes).
            if renewed.elapsed() >= self.lease / 8 {
                self.renew_all(folders)?;
                renewed = std::time::Instant::now();
            }
        }
        for f in folders.iter() {
            path::fsync_dir(f.dir.as_fd()).map_err(|e| {
                SnapshotError::io("sync the snapshot folder", lossy(&f.repo_mount), e)
            })?;
        }
        fault::point(fault::CREATE_AFTER_CLONES);

        let mut record = SnapshotRecord {
            id: id.to_owned(),
            vm: vm.name.clone(),
            seq: 0,
            created_at_ns,
            owner: self.owner.clone(),
            disks,
            idempotency_key: key.map(str::to_owned),
        };
        let manifest = serde_json::to_vec_pretty(&Manifest {
            format: MANIFEST_FORMAT,
            snapshot: record.clone(),
        })
        .map_err(|e| SnapshotError::io("encode the manifest", id, std::io::Error::other(e)))?;
        for f in folders.iter() {
            path::write_atomic(f.dir.as_fd(), MANIFEST_TMP, MANIFEST, &manifest)
                .map_err(|e| SnapshotError::io("write the manifest", lossy(&f.repo_mount), e))?;
        }
        // Publishing takes milliseconds; the lease must cover it whole.
        self.renew_all(folders)?;

        // Publish, record and tell the pool, with rescans of this node
        // held off (a rescan would adopt what we are about to record).
        let _catalog = self.catalog.lock.lock().unwrap_or_else(|e| e.into_inner());
        for f in folders.iter_mut() {
            let won = catalog::rename_in(f.snaps_dir.as_fd(), &staging, id).map_err(|e| {
                SnapshotError::io("publish the snapshot folder", lossy(&f.repo_mount), e)
            })?;
            if !won {
                return Err(SnapshotError::LeaseLost { id: id.to_owned() });
            }
            f.published = true;
            path::fsync_dir(f.snaps_dir.as_fd()).map_err(|e| {
                SnapshotError::io("sync CoriolisSnapshots", lossy(&f.repo_mount), e)
            })?;
        }
        fault::point(fault::CREATE_AFTER_MANIFEST);
        // Every folder is still the one we made (not claimed and replaced).
        for f in folders.iter() {
            let same = path::open_dir_at(f.snaps_dir.as_fd(), id)
                .and_then(|d| Ok((rustix::fs::fstat(&d)?, rustix::fs::fstat(&f.dir)?)))
                .map(|(a, b)| a.st_ino == b.st_ino && a.st_dev == b.st_dev)
                .unwrap_or(false);
            if !same {
                return Err(SnapshotError::LeaseLost { id: id.to_owned() });
            }
        }

        self.store.insert_keyed(&mut record, &maps, key)?;
        self.bump_all(
            folders
                .iter()
                .map(|f| (f.snaps_dir.as_fd(), f.repo_mount.as_path())),
        );
        fault::point(fault::CREATE_AFTER_COMMIT);
        Ok((record, maps))
    }

    /// Renews this maker's lease on every folder of a create.
    fn renew_all(&self, folders: &[Folder]) -> Result<(), SnapshotError> {
        for f in folders {
            catalog::renew(f.dir.as_fd())
                .map_err(|e| SnapshotError::io("renew the lease", lossy(&f.repo_mount), e))?;
        }
        Ok(())
    }

    /// Tells the pool the catalog of each repository changed. A failure is
    /// logged: the change itself is made, and other nodes see it at their
    /// next sweep or rescan.
    fn bump_all<'a>(&self, snaps: impl IntoIterator<Item = (BorrowedFd<'a>, &'a Path)>) {
        for (fd, mount) in snaps {
            if let Err(e) = catalog::bump(fd) {
                tracing::warn!(repo = %mount.display(), error = %e, "cannot renew the catalog token");
            }
        }
    }

    /// The manager with `[diff] exact` = `mode`.
    pub fn with_exact(mut self, mode: ExactMode) -> Manager {
        self.exact = mode;
        self
    }

    /// The record of `snap`, which must belong to `vm`.
    fn record_of(&self, vm: &str, snap: &str) -> Result<SnapshotRecord, SnapshotError> {
        let rec = self
            .store
            .get(snap)?
            .ok_or_else(|| SnapshotError::NotFound {
                what: format!("snapshot {snap}"),
            })?;
        if rec.vm != vm {
            return Err(SnapshotError::Conflict {
                what: format!("snapshot {snap} belongs to another VM"),
            });
        }
        Ok(rec)
    }

    /// One snapshot; with `compare_to`, only what changed since that older
    /// snapshot (SEMANTICS.md §2).
    pub fn get(
        &self,
        vm: &str,
        snap: &str,
        options: &GetOptions,
    ) -> Result<Snapshot, SnapshotError> {
        self.get_cancellable(vm, snap, options, &Cancel::default())
    }

    /// [`Manager::get`] that stops a refining diff once `cancel` is set.
    pub fn get_cancellable(
        &self,
        vm: &str,
        snap: &str,
        options: &GetOptions,
        cancel: &Cancel,
    ) -> Result<Snapshot, SnapshotError> {
        self.refresh()?;
        let rec = self.record_of(vm, snap)?;
        let maps = self.maps_of(&rec)?;
        let Some(base_id) = options.compare_to.as_deref() else {
            return Ok(info(&rec, &maps, options.squash));
        };
        let base = match self.store.get(base_id)? {
            None => {
                return Err(SnapshotError::BaseUnavailable {
                    id: base_id.to_owned(),
                    reason: "it is not in the repository's catalog (deleted, or never made)".into(),
                })
            }
            Some(b) if b.vm != vm => {
                return Err(SnapshotError::Conflict {
                    what: format!("snapshot {base_id} belongs to another VM"),
                })
            }
            Some(b) => b,
        };
        if order(&base) >= order(&rec) {
            return Err(SnapshotError::BadRequest {
                reason: format!("compareTo snapshot {base_id} is not older than {snap}"),
            });
        }
        // A disk that is another file than the one the base cloned: its
        // base clone tells nothing about it.
        for d in &rec.disks {
            if options.only_disk.as_ref().is_some_and(|o| *o != d.name) {
                continue;
            }
            let Some(b) = base.disks.iter().find(|b| b.name == d.name) else {
                continue;
            };
            let other_inode = matches!((b.parent_ino, d.parent_ino), (Some(x), Some(y)) if x != y);
            if b.parent_path != d.parent_path || other_inode {
                return Err(SnapshotError::DiskReplaced {
                    id: base.id.clone(),
                    disk: d.name.clone(),
                });
            }
        }
        // The maps must describe the files as they are: a base whose file
        // was replaced or removed may have had its blocks reused.
        verify(&base).map_err(|(disk, cause)| {
            self.unless_deleted(&base.id, base_error(&base.id, disk, cause))
        })?;
        verify(&rec).map_err(|(disk, cause)| {
            self.unless_deleted(
                &rec.id,
                SnapshotError::Damaged {
                    id: rec.id.clone(),
                    disk,
                    cause,
                },
            )
        })?;
        let base_maps = self.maps_of(&base)?;
        let mut out = info(&rec, &[], false);
        for (i, (d, map)) in rec.disks.iter().zip(&maps).enumerate() {
            if options.only_disk.as_ref().is_some_and(|o| *o != d.name) {
                continue;
            }
            let now = map.clip(d.size);
            let before = base
                .disks
                .iter()
                .position(|b| b.name == d.name)
                // Clipped to the newer size too: past it the client
                // truncates (`size`), and no chunk may point past the end.
                .map(|j| base_maps[j].clip(base.disks[j].size.min(d.size)))
                // A disk new since the base: everything it holds is new.
                .unwrap_or_default();
            let mut diff = extent::diff(&before, &now);
            if let Some(j) = base.disks.iter().position(|b| b.name == d.name) {
                diff = self.refine((&base, j), (&rec, i), diff, options, cancel)?;
            }
            let chunks = if options.zeroed_separate {
                diff.changed.clone()
            } else {
                diff.chunks_with_zeroed()
            };
            let chunks = if options.squash {
                extent::squash(&chunks)
            } else {
                chunks
            };
            let disk = &mut out.disks[i];
            disk.chunks = chunks.iter().map(Chunk::from).collect();
            disk.size = Some(d.size);
            disk.zeroed = Some(diff.zeroed);
        }
        if let Some(only) = &options.only_disk {
            out.disks.retain(|d| d.name == *only);
        }
        Ok(out)
    }

    /// `diff` of disk `i` of `rec` against disk `j` of `base`, refined by
    /// content where `options` and
    /// `[diff] exact` ask for it (exact.rs), until `cancel` is set.
    fn refine(
        &self,
        (base, j): (&SnapshotRecord, usize),
        (rec, i): (&SnapshotRecord, usize),
        diff: extent::Diff,
        options: &GetOptions,
        cancel: &Cancel,
    ) -> Result<extent::Diff, SnapshotError> {
        if options.exact == Some(false) || diff.changed.is_empty() {
            return Ok(diff);
        }
        let d = &rec.disks[i];
        let damaged = |id: &str, disk: &str, cause: Unverified, base_side: bool| {
            let (id, disk) = (id.to_owned(), disk.to_owned());
            let e = if base_side {
                base_error(&id, disk, cause)
            } else {
                SnapshotError::Damaged {
                    id: id.clone(),
                    disk,
                    cause,
                }
            };
            self.unless_deleted(&id, e)
        };
        let new = open_verified(rec, d).map_err(|r| damaged(&rec.id, &d.name, r, false))?;
        if !self.exact.applies(options.exact, &new) {
            return Ok(diff);
        }
        let b = &base.disks[j];
        let old = open_verified(base, b).map_err(|r| damaged(&base.id, &b.name, r, true))?;
        let started = std::time::Instant::now();
        let before_bytes = diff.changed_bytes();
        let (refined, read) = exact::refine_diff(&old, &new, diff, cancel).map_err(|source| {
            SnapshotError::Refine {
                disk: d.name.clone(),
                source,
            }
        })?;
        tracing::debug!(
            snapshot = %rec.id,
            base = %base.id,
            disk = %d.name,
            candidates = read,
            changed_before = before_bytes,
            changed_after = refined.changed_bytes(),
            seconds = started.elapsed().as_secs_f64(),
            "diff refined by content"
        );
        Ok(refined)
    }

    fn maps_of(&self, rec: &SnapshotRecord) -> Result<Vec<ExtentMap>, SnapshotError> {
        (0..rec.disks.len() as u32)
            .map(|i| match self.store.map(&rec.id, i) {
                // Deleted since its record was read.
                Err(crate::store::StoreError::MissingMap { .. }) => Err(SnapshotError::NotFound {
                    what: format!("snapshot {}", rec.id),
                }),
                r => r.map_err(Into::into),
            })
            .collect()
    }

    /// A snapshot whose files are gone or changed is damaged, unless it was
    /// deleted meanwhile: delete removes the record before the files, so a
    /// record gone now means the snapshot is not found (a race with a
    /// delete, not damage).
    fn unless_deleted(&self, id: &str, err: SnapshotError) -> SnapshotError {
        // A local delete unpublishes and unrecords under this lock: past
        // it, the record and the folders agree.
        let _catalog = self.catalog.lock.lock().unwrap_or_else(|e| e.into_inner());
        let deleted = match self.store.get(id) {
            Ok(None) => true,
            // Unpublished by any node (its folder renamed away), whether or
            // not this node's cache has seen it yet.
            Ok(Some(rec)) => repo_mounts(&rec).into_iter().any(|m| {
                matches!(open_snapshot_folder(m, id), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            }),
            Err(_) => false,
        };
        if !deleted {
            return err;
        }
        match err {
            SnapshotError::BaseChanged { .. } | SnapshotError::BaseUnavailable { .. } => {
                SnapshotError::BaseUnavailable {
                    id: id.to_owned(),
                    reason: "it was deleted".into(),
                }
            }
            _ => SnapshotError::NotFound {
                what: format!("snapshot {id}"),
            },
        }
    }

    /// Every snapshot of `vm`, oldest first, chunks squashed. An unknown VM
    /// without snapshots is NotFound. A snapshot deleted while the list is
    /// read is left out, never failing the list.
    pub fn list(&self, vm: &str) -> Result<Vec<Snapshot>, SnapshotError> {
        self.refresh()?;
        let recs = self.records_of_known_vm(vm)?;
        let mut out = Vec::with_capacity(recs.len());
        for r in &recs {
            match self.maps_of(r) {
                Ok(maps) => out.push(info(r, &maps, true)),
                Err(SnapshotError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The ids of `vm`'s snapshots, oldest first (the VM JSON's
    /// `snapshots`); cheap, no extent map is read.
    pub fn ids(&self, vm: &str) -> Result<Vec<String>, SnapshotError> {
        self.refresh()?;
        self.cached_ids(vm)
    }

    /// [`Manager::ids`] of each of `vms`, in their order, after one refresh
    /// for them all: a list of every VM (`GET /vms`) reads each
    /// repository's token once, not once per VM.
    pub fn ids_of<'a>(
        &self,
        vms: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Vec<String>>, SnapshotError> {
        self.refresh()?;
        vms.into_iter().map(|vm| self.cached_ids(vm)).collect()
    }

    /// The ids of `vm`'s snapshots as the cache holds them (no refresh).
    fn cached_ids(&self, vm: &str) -> Result<Vec<String>, SnapshotError> {
        let mut recs = self.store.list_vm(vm)?;
        recs.sort_by(|a, b| order(a).cmp(&order(b)));
        Ok(recs.into_iter().map(|r| r.id).collect())
    }

    /// `vm`'s records, oldest first (the pool's order: creation time, id).
    fn records_of_known_vm(&self, vm: &str) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        let mut recs = self.store.list_vm(vm)?;
        recs.sort_by(|a, b| order(a).cmp(&order(b)));
        if recs.is_empty() && self.lookup_vm(vm)?.is_none() {
            return Err(SnapshotError::NotFound {
                what: format!("VM {vm}"),
            });
        }
        Ok(recs)
    }

    /// Deletes a snapshot. Unknown ids are fine (idempotent); a snapshot of
    /// another VM is a Conflict. Open readers of its files keep reading.
    pub fn delete(&self, vm: &str, snap: &str) -> Result<(), SnapshotError> {
        let _shared = self.reconciling.read().unwrap_or_else(|e| e.into_inner());
        self.refresh()?;
        let m = self.vm_mutex(vm);
        let _one_at_a_time = m.lock();
        let Some(rec) = self.store.get(snap)? else {
            return Ok(());
        };
        if rec.vm != vm {
            return Err(SnapshotError::Conflict {
                what: format!("snapshot {snap} belongs to another VM"),
            });
        }
        self.delete_record(&rec)
    }

    /// Deletes every snapshot of `vm`; returns how many there were.
    pub fn purge(&self, vm: &str) -> Result<usize, SnapshotError> {
        let _shared = self.reconciling.read().unwrap_or_else(|e| e.into_inner());
        self.refresh()?;
        let m = self.vm_mutex(vm);
        let _one_at_a_time = m.lock();
        let recs = self.records_of_known_vm(vm)?;
        for r in &recs {
            self.delete_record(r)?;
        }
        Ok(recs.len())
    }

    fn delete_record(&self, rec: &SnapshotRecord) -> Result<(), SnapshotError> {
        // Unpublish: each folder renamed to a trash name, atomically for
        // every node (a crash from here on never brings it back, and a node
        // deleting it at the same time finds it gone: fine, idempotent).
        let mut trash: Vec<(OwnedFd, String, &Path)> = Vec::new();
        let mut snaps_fds: Vec<(OwnedFd, &Path)> = Vec::new();
        {
            let _catalog = self.catalog.lock.lock().unwrap_or_else(|e| e.into_inner());
            for mount in repo_mounts(rec) {
                let snaps = match catalog::open_snaps(mount) {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(SnapshotError::io("open CoriolisSnapshots", lossy(mount), e))
                    }
                };
                let name = catalog::trash_name();
                let moved = catalog::rename_in(snaps.as_fd(), &rec.id, &name)
                    .and_then(|moved| path::fsync_dir(snaps.as_fd()).map(|()| moved))
                    .map_err(|e| SnapshotError::io("unpublish the snapshot", lossy(mount), e))?;
                if moved {
                    let again = snaps.try_clone().map_err(|e| {
                        SnapshotError::io("open CoriolisSnapshots", lossy(mount), e)
                    })?;
                    trash.push((again, name, mount));
                }
                snaps_fds.push((snaps, mount));
            }
            fault::point(fault::DELETE_AFTER_MANIFEST);
            self.store.remove(&rec.id)?;
            fault::point(fault::DELETE_AFTER_RECORD);
            self.bump_all(snaps_fds.iter().map(|(fd, m)| (fd.as_fd(), *m)));
        }
        let mut first = true;
        for (snaps, name, mount) in &trash {
            let dir = match path::open_dir_at(snaps.as_fd(), name) {
                Ok(d) => d,
                // Finished by a sweeper of another node.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SnapshotError::io("open the trash folder", lossy(mount), e)),
            };
            for d in rec.disks.iter().filter(|d| d.repo_mount == *mount) {
                path::unlink_at(dir.as_fd(), &d.name)
                    .map_err(|e| SnapshotError::io("remove the disk clone", &d.name, e))?;
                if std::mem::take(&mut first) {
                    fault::point(fault::DELETE_AFTER_FIRST_FILE);
                }
            }
            drop(dir);
            path::remove_tree_flat(snaps.as_fd(), name)
                .map_err(|e| SnapshotError::io("remove the snapshot folder", lossy(mount), e))?;
        }
        tracing::info!(snapshot = %rec.id, vm = %rec.vm, "snapshot deleted");
        Ok(())
    }

    /// Opens disk `disk` of snapshot `snap` for reading, with its size. The
    /// file is found from the record (never from a path in the request),
    /// without following symlinks, and must still be the recorded file.
    pub fn open_disk(
        &self,
        vm: &str,
        snap: &str,
        disk: &str,
    ) -> Result<(File, u64), SnapshotError> {
        self.refresh()?;
        let rec = self.record_of(vm, snap)?;
        let d =
            rec.disks
                .iter()
                .find(|d| d.name == disk)
                .ok_or_else(|| SnapshotError::NotFound {
                    what: format!("disk {disk} of snapshot {snap}"),
                })?;
        let damaged = |cause: Unverified| {
            self.unless_deleted(
                &rec.id,
                SnapshotError::Damaged {
                    id: rec.id.clone(),
                    disk: d.name.clone(),
                    cause,
                },
            )
        };
        let file = open_verified(&rec, d).map_err(damaged)?;
        Ok((file, d.size))
    }
}

// The API shares one manager between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Manager>();
};

/// The pool's order of snapshots: creation time, then id (the same on
/// every node; a store's sequence numbers are its own).
fn order(rec: &SnapshotRecord) -> (u64, &str) {
    (rec.created_at_ns, rec.id.as_str())
}

/// The error for a base whose file `disk` is not as recorded: gone
/// (`base_unavailable`) or changed (`base_changed`).
fn base_error(id: &str, disk: String, cause: Unverified) -> SnapshotError {
    match &cause {
        Unverified::Open(e) if e.kind() == std::io::ErrorKind::NotFound => {
            SnapshotError::BaseUnavailable {
                id: id.to_owned(),
                reason: format!("the clone of disk {disk} is gone"),
            }
        }
        _ => SnapshotError::BaseChanged {
            id: id.to_owned(),
            disk,
            cause,
        },
    }
}

/// The distinct repository mount points of a snapshot, in disk order.
pub(super) fn repo_mounts(rec: &SnapshotRecord) -> Vec<&Path> {
    let mut out: Vec<&Path> = Vec::new();
    for d in &rec.disks {
        if !out.contains(&d.repo_mount.as_path()) {
            out.push(&d.repo_mount);
        }
    }
    out
}

/// Opens `<mount>/CoriolisSnapshots/<id>`: (CoriolisSnapshots, folder, mount).
pub(super) fn open_snapshot_folder<'a>(
    mount: &'a Path,
    id: &str,
) -> std::io::Result<(OwnedFd, OwnedFd, &'a Path)> {
    let repo = path::open_dir(mount)?;
    let snaps = path::open_dir_at(repo.as_fd(), SNAPSHOTS_DIR)?;
    let dir = path::open_dir_at(snaps.as_fd(), id)?;
    Ok((snaps, dir, mount))
}

fn open_snapshot_file(rec: &SnapshotRecord, d: &DiskRecord) -> std::io::Result<File> {
    let (_, dir, _) = open_snapshot_folder(&d.repo_mount, &rec.id)?;
    path::open_file_at(dir.as_fd(), &d.name)
}

/// Opens the disk file `d` of `rec` and checks it is the file recorded,
/// unchanged (the whole fingerprint); Err says what is wrong.
fn open_verified(rec: &SnapshotRecord, d: &DiskRecord) -> Result<File, Unverified> {
    let f = open_snapshot_file(rec, d).map_err(Unverified::Open)?;
    let fp = Fingerprint::of(&f).map_err(Unverified::Stat)?;
    if fp != d.fingerprint {
        return Err(Unverified::Changed {
            recorded: Box::new(d.fingerprint),
            now: Box::new(fp),
        });
    }
    Ok(f)
}

/// Checks every disk file of `rec` is present and unchanged; Err names the
/// disk and what is wrong.
fn verify(rec: &SnapshotRecord) -> Result<(), (String, Unverified)> {
    for d in &rec.disks {
        open_verified(rec, d).map_err(|cause| (d.name.clone(), cause))?;
    }
    Ok(())
}

/// The API view of a record; `maps` empty gives disks without chunks.
fn info(rec: &SnapshotRecord, maps: &[ExtentMap], squash: bool) -> Snapshot {
    Snapshot {
        id: rec.id.clone(),
        vm_id: rec.vm.clone(),
        created_at_ns: rec.created_at_ns,
        disks: rec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                // FIEMAP maps whole blocks: cut the last one at the end of
                // the file so that no chunk asks for bytes past it.
                let chunks = match maps.get(i).map(|m| m.clip(d.size)) {
                    Some(m) if squash => extent::squash(m.extents())
                        .iter()
                        .map(Chunk::from)
                        .collect(),
                    Some(m) => m.extents().iter().map(Chunk::from).collect(),
                    None => Vec::new(),
                };
                SnapshotDisk {
                    parent_path: lossy(&d.parent_path),
                    path: lossy(&rec.disk_path(d)),
                    snapshot_id: rec.id.clone(),
                    chunks,
                    name: d.name.clone(),
                    repo_mountpoint: lossy(&d.repo_mount),
                    size: None,
                    zeroed: None,
                    file_size: d.size,
                }
            })
            .collect(),
    }
}

/// `src_dir` (beneath `mount`, plan_disks checked) opened with no symlink
/// in any component below the mount.
fn open_src_dir(mount: &Path, src_dir: &Path) -> std::io::Result<OwnedFd> {
    let repo = path::open_dir(mount)?;
    match src_dir.strip_prefix(mount) {
        Ok(rel) if rel.as_os_str().is_empty() => Ok(repo),
        Ok(rel) => {
            let dir = path::resolve_beneath(repo.as_fd(), rel)?;
            if !rustix::fs::fstat(&dir)
                .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir())
                .unwrap_or(false)
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the disk's folder is not a folder",
                ));
            }
            Ok(dir)
        }
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the disk is not beneath its repository's mount point",
        )),
    }
}

/// Checks that every disk can be cloned and names it; nothing is touched.
fn plan_disks(vm: &Vm) -> Result<Vec<PlannedDisk>, SnapshotError> {
    if vm.disks.is_empty() {
        return Err(SnapshotError::BadRequest {
            reason: format!("VM {} has no disks", vm.name),
        });
    }
    if vm.name.len() > crate::store::MAX_VM_NAME {
        return Err(SnapshotError::BadRequest {
            reason: "the VM name is too long".into(),
        });
    }
    let mut plan: Vec<PlannedDisk> = Vec::with_capacity(vm.disks.len());
    for d in &vm.disks {
        let refuse = |reason: &str| SnapshotError::Incompatible {
            disk: d.name.clone(),
            reason: reason.to_owned(),
        };
        if !d.snapshot_compatible {
            return Err(refuse(
                d.incompatible_reason
                    .as_deref()
                    .unwrap_or("the disk is not snapshot compatible"),
            ));
        }
        let Some(repo) = &d.repository else {
            return Err(refuse("the disk is not on a repository"));
        };
        if path::cname(&d.name).is_err() || d.name.starts_with(RESERVED_PREFIX) {
            return Err(refuse("the disk's name is not a usable file name"));
        }
        if plan.iter().any(|p| p.name == d.name) {
            return Err(refuse("two disks of the VM have the same file name"));
        }
        let (Some(src_dir), Some(src_name)) = (d.path.parent(), d.path.file_name()) else {
            return Err(refuse("the disk's path has no file name"));
        };
        if !d.path.is_absolute() || !path::is_plain_name(src_name) {
            return Err(refuse("the disk's path is not an absolute file path"));
        }
        let Some(src_name) = src_name.to_str() else {
            return Err(refuse("the disk's file name is not UTF-8"));
        };
        if !repo.mount_point.is_absolute() {
            return Err(refuse("the repository's mount point is not absolute"));
        }
        if !d.path.starts_with(&repo.mount_point) {
            return Err(refuse(
                "the disk is outside its repository's mount point: never cloned",
            ));
        }
        plan.push(PlannedDisk {
            name: d.name.clone(),
            parent_path: d.path.clone(),
            src_dir: src_dir.to_path_buf(),
            src_name: src_name.to_owned(),
            repo_mount: repo.mount_point.clone(),
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_config_defaults_and_parses() {
        let c: StoreConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, StoreConfig::default());
        assert_eq!(c.map_size, 64 << 30);
        let c: StoreConfig =
            serde_json::from_str(r#"{"map_size": 1048576, "owner": " node-a "}"#).unwrap();
        assert_eq!(c.map_size, 1 << 20);
        assert_eq!(c.owner_id(), "node-a");
        assert!(serde_json::from_str::<StoreConfig>(r#"{"mapsize": 1}"#).is_err());
        assert!(!StoreConfig::default().owner_id().is_empty());
        assert_eq!(c.clone, crate::sys::ClonePolicy::Auto);
        let c: StoreConfig = serde_json::from_str(r#"{"clone": "ocfs2-reflink"}"#).unwrap();
        assert_eq!(c.clone, crate::sys::ClonePolicy::Ocfs2Reflink);
        assert!(serde_json::from_str::<StoreConfig>(r#"{"clone": "ficlone"}"#).is_err());
    }

    #[test]
    fn snapshot_json_has_the_api_field_names() {
        let d = SnapshotDisk {
            parent_path: "/r/VirtualDisks/a.img".into(),
            path: "/r/CoriolisSnapshots/x/a.img".into(),
            snapshot_id: "x".into(),
            chunks: vec![Chunk {
                start: 0,
                length: 4096,
                physical_start: 1 << 33,
            }],
            name: "a.img".into(),
            repo_mountpoint: "/r".into(),
            size: None,
            zeroed: None,
            file_size: 4096,
        };
        let s = Snapshot {
            id: "x".into(),
            vm_id: "vm".into(),
            disks: vec![d],
            created_at_ns: 5,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "x", "vm_id": "vm", "disks": [{
                "parent_path": "/r/VirtualDisks/a.img",
                "path": "/r/CoriolisSnapshots/x/a.img",
                "snapshot_id": "x",
                "chunks": [{"start": 0, "length": 4096, "physical_start": 8589934592u64}],
                "name": "a.img",
                "repo_mountpoint": "/r"}]})
        );
    }

    fn disk(name: &str, path: &str, ok: bool) -> crate::ovm::Disk {
        crate::ovm::Disk {
            name: name.into(),
            path: path.into(),
            device_name: "xvda".into(),
            mode: "w".into(),
            repository: Some(crate::ovm::Repository {
                id: "r".into(),
                mount_point: "/r".into(),
                filesystem: "xfs".into(),
                alias: "r".into(),
            }),
            snapshot_compatible: ok,
            incompatible_reason: (!ok).then(|| "phy: device".into()),
        }
    }

    #[test]
    fn plans_refuse_what_cannot_be_cloned() {
        let vm = |disks| Vm {
            name: "vm".into(),
            uuid: "u".into(),
            friendly_name: "f".into(),
            disks,
        };
        let ok = plan_disks(&vm(vec![disk("a.img", "/r/VirtualDisks/a.img", true)])).unwrap();
        assert_eq!(ok[0].src_name, "a.img");
        for (disks, want) in [
            (
                vec![
                    disk("a.img", "/r/a.img", true),
                    disk("b", "/dev/sdb", false),
                ],
                "b",
            ),
            (vec![disk("../x", "/r/a.img", true)], "../x"),
            (
                vec![disk(".coriolis-manifest.json", "/r/a.img", true)],
                ".coriolis-manifest.json",
            ),
            (
                vec![
                    disk("a.img", "/r/a.img", true),
                    disk("a.img", "/r/b.img", true),
                ],
                "a.img",
            ),
            (vec![disk("a.img", "relative/a.img", true)], "a.img"),
        ] {
            match plan_disks(&vm(disks)) {
                Err(SnapshotError::Incompatible { disk, .. }) => assert_eq!(disk, want),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            plan_disks(&vm(vec![])),
            Err(SnapshotError::BadRequest { .. })
        ));
    }
}
