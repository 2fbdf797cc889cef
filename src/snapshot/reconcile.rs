//! Reconcile: make the database and the snapshot folders agree again after
//! a crash, a lost database or files removed by hand (SEMANTICS.md §3).
//!
//! The rules, each action logged and reported:
//! - A record whose folder lost its manifest (a delete was interrupted) or
//!   whose files are gone or changed is dropped, and its folders removed.
//!   A record whose repository is not there at all (not mounted) is kept
//!   with a warning: a missing mount is not a lost snapshot, and diffs
//!   against it are refused anyway until its files are back.
//! - A published folder without a record, whoever made it, is adopted when
//!   complete (manifest, every disk present and unchanged): the database
//!   is a cache of the pool's catalog (docs/catalog.md).
//! - Half-made folders (a staging folder, an `<id>` folder without a
//!   usable manifest, a published one that is incomplete) are removed when
//!   this exporter made them (its owner mark: no create of ours runs while
//!   we hold the database), and when another node made them only once
//!   their lease expired. Removal always claims the folder first (renamed
//!   to trash), so a maker publishing at that moment and the claim never
//!   both win. Trash folders are removed. An empty folder without an owner
//!   is removed; other unknown things are left alone.
//!
//! Rebuild is the same walk over an emptied database: every complete folder
//! is adopted, in creation order.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::cache::AdoptError;
use super::catalog::{self, manifest_problem, GENERATION, STAGING_PREFIX, TRASH_PREFIX};
use super::error::SnapshotError;
use super::manager::{open_snapshot_folder, repo_mounts, Manager};
use super::manifest::{Manifest, MANIFEST, MAX_MANIFEST_BYTES, MAX_OWNER_BYTES, OWNER_MARK};
use crate::store::{Fingerprint, SnapshotRecord};
use crate::sys::path::{self, SNAPSHOTS_DIR};

/// One thing reconcile did or decided not to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// A record was removed from the database.
    DroppedRecord {
        id: String,
        vm: String,
        reason: String,
    },
    /// A snapshot folder was removed from a repository.
    RemovedFolder { path: PathBuf, reason: String },
    /// A complete folder without a record was recorded again.
    Adopted { id: String, vm: String },
    /// A record was kept although its files could not be checked.
    KeptUnchecked {
        id: String,
        vm: String,
        reason: String,
    },
    /// Something was left alone.
    Skipped { path: PathBuf, reason: String },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::DroppedRecord { id, vm, reason } => {
                write!(f, "dropped-record {id} vm={vm}: {reason}")
            }
            Action::RemovedFolder { path, reason } => {
                write!(f, "removed-folder {}: {reason}", path.display())
            }
            Action::Adopted { id, vm } => write!(f, "adopted {id} vm={vm}"),
            Action::KeptUnchecked { id, vm, reason } => {
                write!(f, "kept-unchecked {id} vm={vm}: {reason}")
            }
            Action::Skipped { path, reason } => write!(f, "skipped {}: {reason}", path.display()),
        }
    }
}

/// What a reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub actions: Vec<Action>,
    /// Records found complete and kept as they were.
    pub kept: usize,
}

impl ReconcileReport {
    fn push(&mut self, a: Action) {
        match &a {
            Action::Adopted { .. } => tracing::info!("reconcile: {a}"),
            Action::Skipped { .. } => tracing::debug!("reconcile: {a}"),
            _ => tracing::warn!("reconcile: {a}"),
        }
        self.actions.push(a);
    }
}

/// How a record's files look.
enum Health {
    Complete,
    Broken(String),
    Unavailable(String),
}

fn check_record(rec: &SnapshotRecord) -> Health {
    for mount in repo_mounts(rec) {
        let repo = match path::open_dir(mount) {
            Ok(r) => r,
            Err(e) => {
                return Health::Unavailable(format!(
                    "repository {} cannot be opened: {e}",
                    mount.display()
                ))
            }
        };
        let snaps = match path::open_dir_at(repo.as_fd(), SNAPSHOTS_DIR) {
            Ok(s) => s,
            Err(e) => {
                return Health::Unavailable(format!(
                    "{} has no readable {SNAPSHOTS_DIR} (not mounted?): {e}",
                    mount.display()
                ))
            }
        };
        let dir = match path::open_dir_at(snaps.as_fd(), &rec.id) {
            Ok(d) => d,
            Err(e) => return Health::Broken(format!("folder in {}: {e}", mount.display())),
        };
        match path::read_small(dir.as_fd(), MANIFEST, MAX_MANIFEST_BYTES) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Health::Broken(format!(
                    "no manifest in {} (an interrupted delete)",
                    mount.display()
                ))
            }
            Err(e) => return Health::Broken(format!("manifest unreadable: {e}")),
        }
    }
    for d in &rec.disks {
        if let Err(reason) = check_disk_file(&rec.id, &d.repo_mount, &d.name, &d.fingerprint) {
            return Health::Broken(format!("disk {}: {reason}", d.name));
        }
    }
    Health::Complete
}

fn check_disk_file(id: &str, mount: &Path, name: &str, want: &Fingerprint) -> Result<(), String> {
    let (_, dir, _) = open_snapshot_folder(mount, id).map_err(|e| e.to_string())?;
    let f = path::open_file_at(dir.as_fd(), name).map_err(|e| e.to_string())?;
    let fp = Fingerprint::of(&f).map_err(|e| e.to_string())?;
    if &fp != want {
        return Err("changed since it was recorded".into());
    }
    Ok(())
}

impl Manager {
    /// Reconciles the database with the snapshot folders of `repos` (the
    /// mount points of the inventory's repositories; those named by records
    /// are added). Call at start, before serving.
    pub fn reconcile(&self, repos: &[PathBuf]) -> Result<ReconcileReport, SnapshotError> {
        let _exclusive = self.reconciling.write().unwrap_or_else(|e| e.into_inner());
        self.reconcile_locked(repos)
    }

    /// Forgets every record and rebuilds the database from the manifests in
    /// `repos`: every complete snapshot folder of this exporter is adopted.
    pub fn rebuild(&self, repos: &[PathBuf]) -> Result<ReconcileReport, SnapshotError> {
        let _exclusive = self.reconciling.write().unwrap_or_else(|e| e.into_inner());
        tracing::warn!(db = %self.store.path().display(), "rebuilding the snapshot database from manifests");
        self.store.clear()?;
        self.reconcile_locked(repos)
    }

    fn reconcile_locked(&self, repos: &[PathBuf]) -> Result<ReconcileReport, SnapshotError> {
        let _catalog = self.catalog.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = ReconcileReport::default();
        let records = self.store.list_all()?;
        let mut mounts: Vec<PathBuf> = Vec::new();
        for m in repos.iter().chain(
            records
                .iter()
                .flat_map(|r| r.disks.iter().map(|d| &d.repo_mount)),
        ) {
            if !mounts.contains(m) {
                mounts.push(m.clone());
            }
        }
        self.know_repos(mounts.iter().map(PathBuf::as_path));
        // The tokens before the walk: a change during it makes the next
        // request rescan.
        let tokens: Vec<(PathBuf, Option<Vec<u8>>)> = mounts
            .iter()
            .filter_map(|m| {
                let snaps = catalog::open_snaps(m).ok()?;
                let t = path::read_small(snaps.as_fd(), GENERATION, 256).ok()?;
                Some((m.clone(), t))
            })
            .collect();

        // 1. Records: keep the complete ones, drop the broken ones.
        let mut known: HashSet<String> = HashSet::new();
        for rec in &records {
            match check_record(rec) {
                Health::Complete => {
                    report.kept += 1;
                    known.insert(rec.id.clone());
                }
                Health::Unavailable(reason) => {
                    known.insert(rec.id.clone());
                    report.push(Action::KeptUnchecked {
                        id: rec.id.clone(),
                        vm: rec.vm.clone(),
                        reason,
                    });
                }
                Health::Broken(reason) => {
                    self.store.remove(&rec.id)?;
                    report.push(Action::DroppedRecord {
                        id: rec.id.clone(),
                        vm: rec.vm.clone(),
                        reason,
                    });
                    // Its folders are now record-less and handled below.
                }
            }
        }

        // 2. Folders without a record: adopt the complete ones, remove the
        // half-made ones of ours and those whose lease expired.
        let mut candidates: BTreeMap<String, Manifest> = BTreeMap::new();
        let mut to_remove: Vec<(PathBuf, String, String)> = Vec::new();
        for mount in &mounts {
            let Ok(repo) = path::open_dir(mount) else {
                report.push(Action::Skipped {
                    path: mount.clone(),
                    reason: "repository cannot be opened".into(),
                });
                continue;
            };
            let snaps = match path::open_dir_at(repo.as_fd(), SNAPSHOTS_DIR) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    report.push(Action::Skipped {
                        path: mount.join(SNAPSHOTS_DIR),
                        reason: format!("cannot be opened: {e}"),
                    });
                    continue;
                }
            };
            let names = path::list(snaps.as_fd()).map_err(|e| {
                SnapshotError::io("list CoriolisSnapshots", mount.display().to_string(), e)
            })?;
            for name in names {
                let path = mount.join(SNAPSHOTS_DIR).join(&name);
                let expired = || catalog::age(snaps.as_fd(), &name).is_some_and(|a| a > self.lease);
                if name == GENERATION {
                    continue;
                }
                if name.starts_with(GENERATION) {
                    // A token never renamed into place (a crash).
                    if expired() {
                        let _ = path::unlink_at(snaps.as_fd(), &name);
                    }
                    continue;
                }
                if name.starts_with(TRASH_PREFIX) {
                    to_remove.push((
                        mount.clone(),
                        name,
                        "trash of a delete or cleanup interrupted".into(),
                    ));
                    continue;
                }
                if name.starts_with(STAGING_PREFIX) {
                    match catalog::owner_of(snaps.as_fd(), &name) {
                        Some(o) if o == self.owner => to_remove.push((
                            mount.clone(),
                            name,
                            "half-made (not published): create interrupted".into(),
                        )),
                        _ if expired() => to_remove.push((
                            mount.clone(),
                            name,
                            "half-made by another exporter, lease expired".into(),
                        )),
                        o => report.push(Action::Skipped {
                            path,
                            reason: format!(
                                "being made by another exporter ({}), lease not expired",
                                o.unwrap_or_default()
                            ),
                        }),
                    }
                    continue;
                }
                if !catalog::is_snapshot_id(&name) {
                    report.push(Action::Skipped {
                        path,
                        reason: "not a snapshot id".into(),
                    });
                    continue;
                }
                if known.contains(&name) {
                    continue;
                }
                let dir = match path::open_dir_at(snaps.as_fd(), &name) {
                    Ok(d) => d,
                    Err(e) => {
                        report.push(Action::Skipped {
                            path,
                            reason: format!("not a folder we can open: {e}"),
                        });
                        continue;
                    }
                };
                let manifest: Option<Result<Manifest, String>> =
                    match path::read_small(dir.as_fd(), MANIFEST, MAX_MANIFEST_BYTES) {
                        Ok(Some(b)) => Some(serde_json::from_slice(&b).map_err(|e| e.to_string())),
                        Ok(None) => None,
                        Err(e) => Some(Err(e.to_string())),
                    };
                let mark = path::read_small(dir.as_fd(), OWNER_MARK, MAX_OWNER_BYTES)
                    .ok()
                    .flatten()
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
                let owner = match &manifest {
                    Some(Ok(m)) => Some(m.snapshot.owner.clone()),
                    _ => mark,
                };
                let problem = match manifest {
                    Some(Ok(m)) => match manifest_problem(&m, &name) {
                        None => {
                            candidates.entry(name).or_insert(m);
                            continue;
                        }
                        Some(p) => p,
                    },
                    Some(Err(e)) => format!("unreadable manifest: {e}"),
                    None => "half-made (no manifest): create or delete interrupted".into(),
                };
                match owner {
                    Some(o) if o == self.owner => to_remove.push((mount.clone(), name, problem)),
                    Some(o) if expired() => to_remove.push((
                        mount.clone(),
                        name,
                        format!("{problem}; made by another exporter ({o}), lease expired"),
                    )),
                    Some(o) => report.push(Action::Skipped {
                        path,
                        reason: format!(
                            "{problem}; owned by another exporter ({o}), lease not expired"
                        ),
                    }),
                    None => {
                        let empty = path::list(dir.as_fd())
                            .map(|l| l.is_empty())
                            .unwrap_or(false);
                        if empty {
                            to_remove.push((mount.clone(), name, "empty snapshot folder".into()));
                        } else {
                            report.push(Action::Skipped {
                                path,
                                reason: "no manifest and no owner mark: not touched".into(),
                            });
                        }
                    }
                }
            }
        }

        // Adopt complete candidates in creation order, so that the order of
        // snapshots (and thus which may be compared to which) is kept.
        let mut ordered: Vec<Manifest> = candidates.into_values().collect();
        ordered.sort_by_key(|m| (m.snapshot.created_at_ns, m.snapshot.id.clone()));
        for m in ordered {
            let rec = m.snapshot;
            let outside: Vec<&Path> = repo_mounts(&rec)
                .into_iter()
                .filter(|p| !mounts.iter().any(|m| m == p))
                .collect();
            if !outside.is_empty() {
                report.push(Action::Skipped {
                    path: PathBuf::from(&rec.id),
                    reason: format!("names repositories not reconciled: {outside:?}"),
                });
                continue;
            }
            match self.adopt(rec.clone()) {
                Ok(()) => report.push(Action::Adopted {
                    id: rec.id.clone(),
                    vm: rec.vm.clone(),
                }),
                Err(AdoptError::Incomplete(reason)) => {
                    for mount in repo_mounts(&rec) {
                        let expired = catalog::open_snaps(mount)
                            .ok()
                            .and_then(|s| catalog::age(s.as_fd(), &rec.id))
                            .is_some_and(|a| a > self.lease);
                        if rec.owner == self.owner || expired {
                            to_remove.push((mount.to_path_buf(), rec.id.clone(), reason.clone()));
                        } else {
                            report.push(Action::Skipped {
                                path: mount.join(SNAPSHOTS_DIR).join(&rec.id),
                                reason: format!(
                                    "{reason}; made by another exporter ({}), lease not expired",
                                    rec.owner
                                ),
                            });
                        }
                    }
                }
                Err(AdoptError::Fatal(e)) => return Err(e),
            }
        }

        for (mount, name, reason) in to_remove {
            let path = mount.join(SNAPSHOTS_DIR).join(&name);
            let removed = catalog::open_snaps(&mount)
                .and_then(|s| catalog::claim_and_remove(s.as_fd(), &name));
            match removed {
                Ok(true) => report.push(Action::RemovedFolder { path, reason }),
                // Published or claimed by another node meanwhile.
                Ok(false) => {}
                Err(e) => report.push(Action::Skipped {
                    path,
                    reason: format!("should be removed ({reason}) but: {e}"),
                }),
            }
        }
        for (mount, token) in tokens {
            self.set_token(&mount, token);
        }
        Ok(report)
    }
}
