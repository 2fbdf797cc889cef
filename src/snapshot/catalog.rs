//! The pool-wide catalog (docs/catalog.md): the snapshot folders on a
//! repository are the truth, this node's [`Store`](crate::store::Store) a
//! cache of them, and nodes sharing a repository coordinate through the
//! repository alone.
//!
//! # Names in `CoriolisSnapshots`
//! ```text
//! <id>/                       a published snapshot (manifest inside)
//! .coriolis-staging-<id>/     a create in progress, never listed
//! .coriolis-trash-<uuid>/     a snapshot or debris being removed
//! .coriolis-generation        a random token, replaced after each change
//! .coriolis-generation-<uuid> the next token, before its rename
//! ```
//!
//! # Rules
//! - Only `mkdir`, `O_EXCL` creates and `rename` decide anything between
//!   nodes. Publishing is `rename(staging, id)`; unpublishing and claiming
//!   debris are `rename(name, trash)`. Of two renames of one name exactly
//!   one succeeds (on OCFS2 under the parent folder's cluster lock), so a
//!   maker and a claimer never both win.
//! - The cache is refreshed before every answer by reading each
//!   repository's token (one small read); a token that changed makes that
//!   repository be rescanned, remembering the token read *before* the scan.
//! - A folder of another maker is claimed only when its lease expired: its
//!   age (the newest mtime of the folder and its owner mark) exceeds the
//!   lease. Trash is anyone's to finish.
//!
//! # What this module must not do
//! Take a name from a request: every name here comes from a directory
//! listing, a record, or a fresh UUID.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use super::{
    Manager, Manifest, SnapshotError, MANIFEST, MANIFEST_FORMAT, MAX_MANIFEST_BYTES,
    MAX_OWNER_BYTES, OWNER_MARK, RESERVED_PREFIX,
};
use crate::store::{Fingerprint, SnapshotRecord};
use crate::sys::path::{self, SNAPSHOTS_DIR};

/// Prefix of a create in progress: `.coriolis-staging-<id>`.
pub const STAGING_PREFIX: &str = ".coriolis-staging-";
/// Prefix of a folder being removed: `.coriolis-trash-<uuid>`.
pub const TRASH_PREFIX: &str = ".coriolis-trash-";
/// The repository's generation token.
pub const GENERATION: &str = ".coriolis-generation";
/// Prefix of a token being written (then renamed to [`GENERATION`]).
const GENERATION_TMP_PREFIX: &str = ".coriolis-generation-";
/// Tokens are 16 random bytes as hex; anything up to this is read.
const MAX_TOKEN_BYTES: u64 = 256;
/// Default lease of a maker on its half-made folders (docs/catalog.md).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30 * 60);

/// What the node remembers of the repositories between requests.
#[derive(Debug, Default)]
pub(super) struct CatalogState {
    /// Serialises rescans with the local changes of the cache (publish and
    /// record, unpublish and unrecord), so that a rescan never adopts a
    /// snapshot a local create is about to record, or re-adopts one a
    /// local delete just removed.
    pub(super) lock: Mutex<()>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The repositories to refresh (reconcile's, plus those of every
    /// record and create).
    repos: Vec<PathBuf>,
    /// The token each repository had when the cache was filled from it
    /// (None: it had none).
    tokens: HashMap<PathBuf, Option<Vec<u8>>>,
    last_sweep: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh trash name.
pub(super) fn trash_name() -> String {
    format!("{TRASH_PREFIX}{}", Uuid::new_v4())
}

/// The staging name of snapshot `id`.
pub(super) fn staging_name(id: &str) -> String {
    format!("{STAGING_PREFIX}{id}")
}

/// Whether `name` is a canonical snapshot id (hyphenated lower-case UUID).
pub(super) fn is_snapshot_id(name: &str) -> bool {
    Uuid::parse_str(name)
        .map(|u| u.hyphenated().to_string() == name)
        .unwrap_or(false)
}

/// Renames `from` to `to` inside `dir`. Ok(false) when `from` is gone: the
/// other side of the race won.
pub(super) fn rename_in(dir: BorrowedFd<'_>, from: &str, to: &str) -> std::io::Result<bool> {
    let (f, t) = (path::cname(from)?, path::cname(to)?);
    match rustix::fs::renameat(dir, f.as_c_str(), dir, t.as_c_str()) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Claims `name` in `snaps` (renames it to a fresh trash name) and removes
/// it. Ok(false): somebody else renamed it first (published or claimed).
pub(super) fn claim_and_remove(snaps: BorrowedFd<'_>, name: &str) -> std::io::Result<bool> {
    let trash = trash_name();
    if !rename_in(snaps, name, &trash)? {
        return Ok(false);
    }
    path::remove_tree_flat(snaps, &trash)?;
    Ok(true)
}

/// Opens `<mount>/CoriolisSnapshots`.
pub(super) fn open_snaps(mount: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    let repo = path::open_dir(mount)?;
    path::open_dir_at(repo.as_fd(), SNAPSHOTS_DIR)
}

/// The token of the repository at `mount`: Ok(None) when it has none.
fn read_token(mount: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let snaps = open_snaps(mount)?;
    path::read_small(snaps.as_fd(), GENERATION, MAX_TOKEN_BYTES)
}

/// Replaces the token of the repository whose `CoriolisSnapshots` is
/// `snaps` with a fresh random one (written under a unique name, then
/// renamed over the old one: two nodes bumping at once both leave a new
/// token).
pub(super) fn bump(snaps: BorrowedFd<'_>) -> std::io::Result<()> {
    let token = Uuid::new_v4().simple().to_string();
    let tmp = format!("{GENERATION_TMP_PREFIX}{token}");
    path::write_new(snaps, &tmp, token.as_bytes())?;
    let (t, g) = (path::cname(&tmp)?, path::cname(GENERATION)?);
    if let Err(e) = rustix::fs::renameat(snaps, t.as_c_str(), snaps, g.as_c_str()) {
        let _ = path::unlink_at(snaps, &tmp);
        return Err(e.into());
    }
    path::fsync_dir(snaps)
}

/// How long ago `name` in `dir` (and its owner mark, for a folder) last
/// changed; None when it cannot be stat'ed (gone).
pub(super) fn age(dir: BorrowedFd<'_>, name: &str) -> Option<Duration> {
    let c = path::cname(name).ok()?;
    let st = rustix::fs::statat(dir, c.as_c_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
    #[allow(clippy::unnecessary_cast)]
    let mut newest = (st.st_mtime as i64, st.st_mtime_nsec as i64);
    if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() {
        if let Ok(sub) = path::open_dir_at(dir, name) {
            if let Ok(mark) = path::cname(OWNER_MARK) {
                if let Ok(m) =
                    rustix::fs::statat(&sub, mark.as_c_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                {
                    #[allow(clippy::unnecessary_cast)]
                    let t = (m.st_mtime as i64, m.st_mtime_nsec as i64);
                    newest = newest.max(t);
                }
            }
        }
    }
    let then = if newest.0 >= 0 {
        SystemTime::UNIX_EPOCH
            + Duration::new(newest.0 as u64, newest.1.clamp(0, 999_999_999) as u32)
    } else {
        SystemTime::UNIX_EPOCH
    };
    Some(SystemTime::now().duration_since(then).unwrap_or_default())
}

/// The owner mark of folder `name` in `snaps`, trimmed.
pub(super) fn owner_of(snaps: BorrowedFd<'_>, name: &str) -> Option<String> {
    let dir = path::open_dir_at(snaps, name).ok()?;
    path::read_small(dir.as_fd(), OWNER_MARK, MAX_OWNER_BYTES)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
}

/// Renews a maker's lease on its folder: touches its owner mark.
pub(super) fn renew(dir: BorrowedFd<'_>) -> std::io::Result<()> {
    let f = path::open_file_at(dir, OWNER_MARK)?;
    f.set_modified(SystemTime::now())
}

/// Whether a manifest is one this build can adopt as the folder `name`.
pub(super) fn manifest_problem(m: &Manifest, name: &str) -> Option<String> {
    if m.format != MANIFEST_FORMAT {
        return Some(format!("unknown manifest format {}", m.format));
    }
    if m.snapshot.id != name {
        return Some(format!("manifest names snapshot {}", m.snapshot.id));
    }
    if m.snapshot.disks.is_empty() || m.snapshot.vm.len() > crate::store::MAX_VM_NAME {
        return Some("manifest lists no disk or a bad VM name".into());
    }
    for d in &m.snapshot.disks {
        if path::cname(&d.name).is_err() || d.name.starts_with(RESERVED_PREFIX) {
            return Some(format!("manifest names a bad disk {:?}", d.name));
        }
        if !d.repo_mount.is_absolute() {
            return Some("manifest names a relative repository".into());
        }
    }
    None
}

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
            self.know_repos(super::repo_mounts(&rec));
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
            let (_, dir, _) = super::open_snapshot_folder(&d.repo_mount, &rec.id)
                .map_err(|e| inc(e.to_string()))?;
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
        self.store
            .insert(&mut rec, &maps)
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
