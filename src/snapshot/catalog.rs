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
//!
//! This file holds the rules (names, renames, tokens, leases, what makes a
//! manifest adoptable); `cache.rs` keeps the node's store in step with
//! them.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use super::manifest::{Manifest, MANIFEST_FORMAT, MAX_OWNER_BYTES, OWNER_MARK, RESERVED_PREFIX};
use crate::sys::path::{self, SNAPSHOTS_DIR};

/// Prefix of a create in progress: `.coriolis-staging-<id>`.
pub const STAGING_PREFIX: &str = ".coriolis-staging-";
/// Prefix of a folder being removed: `.coriolis-trash-<uuid>`.
pub const TRASH_PREFIX: &str = ".coriolis-trash-";
/// The repository's generation token.
pub const GENERATION: &str = ".coriolis-generation";
/// Prefix of a token being written (then renamed to [`GENERATION`]).
pub(super) const GENERATION_TMP_PREFIX: &str = ".coriolis-generation-";
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
    pub(super) inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    /// The repositories to refresh (reconcile's, plus those of every
    /// record and create).
    pub(super) repos: Vec<PathBuf>,
    /// The token each repository had when the cache was filled from it
    /// (None: it had none).
    pub(super) tokens: HashMap<PathBuf, Option<Vec<u8>>>,
    pub(super) last_sweep: Option<Instant>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
pub(super) fn read_token(mount: &Path) -> std::io::Result<Option<Vec<u8>>> {
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
