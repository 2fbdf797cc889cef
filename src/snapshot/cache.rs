//! This node's cache of the pool's catalog (catalog.rs, docs/catalog.md):
//! the [`Manager`] keeps its store in step with the snapshot folders of the
//! repositories it knows, refreshing before every answer by one read of
//! each repository's generation token, rescanning a repository whose token
//! changed, adopting complete folders and sweeping debris whose lease
//! expired.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Instant;

use super::catalog::{
    age, claim_and_remove, is_snapshot_id, lock, manifest_problem, open_snaps, owner_of,
    read_token, GENERATION_TMP_PREFIX, STAGING_PREFIX, TRASH_PREFIX,
};
use super::error::SnapshotError;
use super::manager::{open_snapshot_folder, repo_mounts, Manager};
use super::manifest::{Manifest, MANIFEST, MAX_MANIFEST_BYTES};
use crate::store::{Fingerprint, SnapshotRecord};
use crate::sys::path;

impl Manager {
    /// Adds repositories to refresh (reconcile's, a create's).
    pub(super) fn know_repos<'a>(&self, mounts: impl IntoIterator<Item = &'a Path>) {
        let mut inner = lock(&self.catalog.inner);
        for m in mounts {
            if !inner.repos.iter().any(|r| r == m) {
                inner.repos.push(m.to_path_buf());
            }
        }
    }

    /// Remembers `token` as what the cache holds of `mount`.
    pub(super) fn set_token(&self, mount: &Path, token: Option<Vec<u8>>) {
        lock(&self.catalog.inner)
            .tokens
            .insert(mount.to_path_buf(), token);
    }

    /// Reads every known repository's token; one that differs from what the
    /// cache was filled from makes that repository be rescanned. At least
    /// every half lease, debris whose lease expired is swept. Failures to
    /// read a repository leave its cache as it is (logged).
    pub(super) fn refresh(&self) -> Result<(), SnapshotError> {
        let (repos, sweep_due) = {
            let inner = lock(&self.catalog.inner);
            let due = inner
                .last_sweep
                .is_none_or(|t| t.elapsed() >= self.lease / 2);
            (inner.repos.clone(), due)
        };
        let mut stale = Vec::new();
        for mount in &repos {
            match read_token(mount) {
                Ok(token) => {
                    let inner = lock(&self.catalog.inner);
                    if inner.tokens.get(mount) != Some(&token) {
                        stale.push(mount.clone());
                    }
                }
                // No CoriolisSnapshots yet (or not mounted): nothing to see.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(repo = %mount.display(), error = %e, "cannot read the repository's catalog token")
                }
            }
        }
        if stale.is_empty() && !sweep_due {
            return Ok(());
        }
        let _one = lock(&self.catalog.lock);
        for mount in &repos {
            // Read again under the lock: another thread may have rescanned.
            let Ok(token) = read_token(mount) else {
                continue;
            };
            let fresh = lock(&self.catalog.inner).tokens.get(mount) == Some(&token);
            if fresh && !sweep_due {
                continue;
            }
            let snaps = match open_snaps(mount) {
                Ok(s) => s,
                Err(_) => continue,
            };
            let names = match path::list(snaps.as_fd()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(repo = %mount.display(), error = %e, "cannot list CoriolisSnapshots");
                    continue;
                }
            };
            if !fresh {
                self.rescan(mount, &names)?;
                self.set_token(mount, token);
            }
            if sweep_due {
                self.sweep(snaps.as_fd(), mount, &names);
            }
        }
        if sweep_due {
            lock(&self.catalog.inner).last_sweep = Some(Instant::now());
        }
        Ok(())
    }

    /// Makes the cache of `mount` match its listing `names`: records whose
    /// folder is no longer published there are dropped; published folders
    /// not cached are adopted when complete (any maker's). Called with the
    /// catalog lock held.
    fn rescan(&self, mount: &Path, names: &[String]) -> Result<(), SnapshotError> {
        let published: HashSet<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| is_snapshot_id(n))
            .collect();
        let mut cached: HashSet<String> = HashSet::new();
        for rec in self.store.list_all()? {
            if !rec.disks.iter().any(|d| d.repo_mount == mount) {
                cached.insert(rec.id);
                continue;
            }
            if published.contains(rec.id.as_str()) {
                cached.insert(rec.id);
            } else {
                self.store.remove(&rec.id)?;
                tracing::info!(snapshot = %rec.id, vm = %rec.vm, repo = %mount.display(), "catalog: unpublished, dropped from the cache");
            }
        }
        let Ok(snaps) = open_snaps(mount) else {
            return Ok(());
        };
        let mut new: Vec<Manifest> = Vec::new();
        for id in published {
            if cached.contains(id) {
                continue;
            }
            let Ok(dir) = path::open_dir_at(snaps.as_fd(), id) else {
                continue;
            };
            let m: Manifest = match path::read_small(dir.as_fd(), MANIFEST, MAX_MANIFEST_BYTES) {
                Ok(Some(b)) => match serde_json::from_slice(&b) {
                    Ok(m) => m,
                    Err(_) => continue,
                },
                _ => continue,
            };
            if manifest_problem(&m, id).is_some() {
                continue;
            }
            new.push(m);
        }
        new.sort_by_key(|m| (m.snapshot.created_at_ns, m.snapshot.id.clone()));
        for m in new {
            let rec = m.snapshot;
            self.know_repos(repo_mounts(&rec));
            match self.adopt(rec.clone()) {
                Ok(()) => {
                    tracing::info!(snapshot = %rec.id, vm = %rec.vm, owner = %rec.owner, "catalog: adopted")
                }
                Err(AdoptError::Incomplete(reason)) => {
                    tracing::debug!(snapshot = %rec.id, reason, "catalog: published but incomplete; not listed")
                }
                Err(AdoptError::Fatal(e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes debris whose lease expired from the listing `names` of
    /// `snaps`: trash, other makers' staging folders and unpublished
    /// `<id>` folders (an old-format create or delete interrupted), stale
    /// token files. Never this node's own staging (a create of this
    /// process may be running: start-up reconcile removes ours).
    fn sweep(&self, snaps: BorrowedFd<'_>, mount: &Path, names: &[String]) {
        for name in names {
            let expired = || age(snaps, name).is_some_and(|a| a > self.lease);
            let what = if name.starts_with(TRASH_PREFIX) {
                expired().then_some("trash")
            } else if name.starts_with(GENERATION_TMP_PREFIX) {
                if expired() {
                    let _ = path::unlink_at(snaps, name);
                }
                None
            } else if name.starts_with(STAGING_PREFIX) {
                let theirs = owner_of(snaps, name).is_none_or(|o| o != self.owner);
                (theirs && expired()).then_some("staging folder whose lease expired")
            } else if is_snapshot_id(name) {
                let dir = path::open_dir_at(snaps, name).ok();
                let no_manifest = dir.is_some_and(|d| {
                    matches!(
                        path::read_small(d.as_fd(), MANIFEST, MAX_MANIFEST_BYTES),
                        Ok(None)
                    )
                });
                let owner = owner_of(snaps, name);
                let theirs = owner.as_deref().is_some_and(|o| o != self.owner);
                (no_manifest && theirs && expired())
                    .then_some("unpublished folder whose lease expired")
            } else {
                None
            };
            if let Some(why) = what {
                match claim_and_remove(snaps, name) {
                    Ok(true) => {
                        tracing::warn!(repo = %mount.display(), name, "catalog: removed {why}")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(repo = %mount.display(), name, error = %e, "catalog: cannot remove {why}")
                    }
                }
            }
        }
    }

    /// Records a complete folder again, re-reading its extent maps (the
    /// files are immutable, so FIEMAP now says what it said at create).
    pub(super) fn adopt(&self, mut rec: SnapshotRecord) -> Result<(), AdoptError> {
        if self
            .store
            .get(&rec.id)
            .map_err(|e| AdoptError::Fatal(e.into()))?
            .is_some()
        {
            return Ok(());
        }
        let mut maps = Vec::with_capacity(rec.disks.len());
        for d in &rec.disks {
            let inc = |r: String| AdoptError::Incomplete(format!("disk {}: {r}", d.name));
            let (_, dir, _) =
                open_snapshot_folder(&d.repo_mount, &rec.id).map_err(|e| inc(e.to_string()))?;
            path::read_small(dir.as_fd(), MANIFEST, MAX_MANIFEST_BYTES)
                .map_err(|e| inc(e.to_string()))?
                .ok_or_else(|| inc("no manifest beside it".into()))?;
            let f = path::open_file_at(dir.as_fd(), &d.name).map_err(|e| inc(e.to_string()))?;
            let fp = Fingerprint::of(&f).map_err(|e| inc(e.to_string()))?;
            if fp != d.fingerprint {
                return Err(inc("changed since the manifest was written".into()));
            }
            let map = crate::sys::extent_map(&f, true).map_err(|e| inc(e.to_string()))?;
            maps.push(map);
        }
        // Its maker's idempotency key, so that a retry through this node
        // answers it (a key this build would refuse is not recorded).
        let key = rec
            .idempotency_key
            .clone()
            .filter(|k| !k.is_empty() && k.len() <= crate::store::MAX_IDEMPOTENCY_KEY);
        self.store
            .insert_keyed(&mut rec, &maps, key.as_deref())
            .map_err(|e| AdoptError::Fatal(e.into()))?;
        Ok(())
    }
}

/// Why a folder could not be adopted: not (yet) complete, or the store
/// failed.
pub(super) enum AdoptError {
    Incomplete(String),
    Fatal(SnapshotError),
}
