//! The snapshot manager's errors: one variant per kind of failure, so the
//! API can map them to HTTP statuses (it does, not this module).

use std::path::PathBuf;

use crate::error::{Class, Classify};
use crate::ovm::InventoryError;
use crate::store::{Fingerprint, StoreError};
use crate::sys::{CloneError, FiemapError};

/// Why a snapshot's disk file is not the one its record describes.
#[derive(Debug, thiserror::Error)]
pub enum Unverified {
    #[error("cannot open it")]
    Open(#[source] std::io::Error),
    #[error("cannot stat it")]
    Stat(#[source] std::io::Error),
    #[error("recorded {recorded:?}, now {now:?}")]
    Changed {
        recorded: Box<Fingerprint>,
        now: Box<Fingerprint>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An unknown VM, snapshot or disk (HTTP 404).
    #[error("{what} not found")]
    NotFound { what: String },
    /// The snapshot belongs to another VM (HTTP 409).
    #[error("{what}")]
    Conflict { what: String },
    /// A request that cannot be answered as asked (HTTP 400), e.g. a
    /// `compareTo` that is not older.
    #[error("{reason}")]
    BadRequest { reason: String },
    /// The base snapshot of a diff is no longer the one its extent maps
    /// describe: answering would risk a missed change (SEMANTICS.md §2).
    #[error(
        "base snapshot {id}: disk {disk} changed since it was recorded; a full copy is needed"
    )]
    BaseChanged {
        id: String,
        disk: String,
        #[source]
        cause: Unverified,
    },
    /// The base of a diff is not in the pool's catalog, or its clone is
    /// gone (HTTP 404, code `base_unavailable`).
    #[error("base snapshot {id} cannot be used: {reason}; a full copy is needed")]
    BaseUnavailable { id: String, reason: String },
    /// A disk of the snapshot is another file than the one the base cloned
    /// (HTTP 409, code `disk_replaced`).
    #[error("disk {disk} was replaced since base snapshot {id} was made; a full copy is needed")]
    DiskReplaced { id: String, disk: String },
    /// A create lost its half-made folder to another node's sweep (its
    /// lease had expired): nothing was published (HTTP 503: retry).
    #[error(
        "snapshot {id}: its folder was claimed by another node before it was published \
         (the create outlived its lease, `[store] lease_seconds`); nothing was made"
    )]
    LeaseLost { id: String },
    /// The snapshot itself is damaged on disk (file gone or changed).
    #[error("snapshot {id}: disk {disk} is damaged")]
    Damaged {
        id: String,
        disk: String,
        #[source]
        cause: Unverified,
    },
    /// The VM has a disk that cannot be cloned (HTTP 400); nothing created.
    #[error("disk {disk} cannot be snapshotted: {reason}")]
    Incompatible { disk: String, reason: String },
    #[error("cloning disk {disk} failed")]
    Clone {
        disk: String,
        #[source]
        source: CloneError,
    },
    #[error("mapping the extents of disk {disk} failed")]
    Fiemap {
        disk: String,
        #[source]
        source: FiemapError,
    },
    #[error("snapshot metadata")]
    Store(#[from] StoreError),
    /// A filesystem step failed: `step` says which, `what` on which disk or
    /// folder.
    #[error("{step} ({what}) failed")]
    Io {
        step: &'static str,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The inventory could not answer.
    #[error("inventory lookup failed")]
    Inventory(#[source] InventoryError),
    /// Another process holds the database (a running service).
    #[error(
        "the snapshot database {path:?} is in use by another process (stop the service \
         before running this command, or use the API)"
    )]
    Busy { path: PathBuf },
    /// Refining a diff by content failed (or its client went away).
    #[error("refining the diff of disk {disk} by content failed")]
    Refine {
        disk: String,
        #[source]
        source: super::exact::RefineError,
    },
}

impl SnapshotError {
    pub(crate) fn io(step: &'static str, what: impl Into<String>, source: std::io::Error) -> Self {
        SnapshotError::Io {
            step,
            what: what.into(),
            source,
        }
    }

    /// True when the store ran out of map space (nothing was recorded).
    pub fn is_map_full(&self) -> bool {
        matches!(self, SnapshotError::Store(e) if e.is_map_full())
    }
}

impl Classify for SnapshotError {
    fn code(&self) -> Option<&'static str> {
        SnapshotError::code(self)
    }

    fn class(&self) -> Class {
        match self {
            SnapshotError::NotFound { .. } => Class::NotFound,
            SnapshotError::Conflict { .. } => Class::Conflict,
            SnapshotError::BadRequest { .. } | SnapshotError::Incompatible { .. } => {
                Class::BadRequest
            }
            // The base of a diff is gone or changed: answering would risk a
            // missed change, and retrying will not help.
            SnapshotError::BaseChanged { .. } | SnapshotError::DiskReplaced { .. } => {
                Class::Conflict
            }
            SnapshotError::BaseUnavailable { .. } => Class::NotFound,
            SnapshotError::LeaseLost { .. } => Class::Unavailable,
            SnapshotError::Busy { .. } => Class::Conflict,
            SnapshotError::Store(s) => s.class(),
            SnapshotError::Inventory(e) => e.class(),
            // A full filesystem (or quota) is the operator's to fix, and
            // says so: 507, not a bare 500.
            e @ (SnapshotError::Clone { .. } | SnapshotError::Io { .. }) if out_of_space(e) => {
                Class::InsufficientStorage
            }
            SnapshotError::Damaged { .. }
            | SnapshotError::Clone { .. }
            | SnapshotError::Fiemap { .. }
            | SnapshotError::Io { .. }
            | SnapshotError::Refine { .. } => Class::Internal,
        }
    }
}

impl SnapshotError {
    /// The stable machine-readable `code` of the error body, for the
    /// failures a client can act on (API.md, docs/catalog.md).
    pub fn code(&self) -> Option<&'static str> {
        match self {
            SnapshotError::BaseUnavailable { .. } => Some(crate::wire::CODE_BASE_UNAVAILABLE),
            SnapshotError::BaseChanged { .. } => Some(crate::wire::CODE_BASE_CHANGED),
            SnapshotError::DiskReplaced { .. } => Some(crate::wire::CODE_DISK_REPLACED),
            _ => None,
        }
    }
}

/// Whether an error's chain holds ENOSPC or EDQUOT.
fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.raw_os_error().map(rustix::io::Errno::from_raw_os_error),
                Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT)
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
