//! The interface between the HTTP layer and the node: what the API needs
//! from the inventory, the snapshot manager and the disk reader.
//!
//! Every method is synchronous and may block (clones, FIEMAP, LMDB
//! transactions, opening files): the API calls them through
//! `tokio::task::spawn_blocking`, never on the event loop. A lower layer's
//! error passes through typed ([`BackendError::Layer`]) and says its own
//! [`Class`]; the api module maps the class to a status and an error body in
//! one place (`api::ApiError`). Ids reaching a backend have passed the router's
//! charset and length check, but a backend must still treat them as lookup
//! keys, never as path components.

use std::fs::File;

use crate::error::{Class, Classify};
use crate::snapshot::Cancel;
use crate::wire::{GetOptions, HealthCheck, Snapshot, Vm};

/// Why a backend call failed. A lower layer's error stays typed
/// ([`BackendError::Layer`]); the message variants are for failures that have
/// no typed cause (an id the backend does not know, a size that does not
/// match), each with a message for `details`.
#[derive(Debug)]
pub enum BackendError {
    /// A lower layer's error (the snapshot manager's, the inventory's), with
    /// its sources; its [`Class`] decides the status.
    Layer(Box<dyn Classify>),
    /// Unknown VM, snapshot or disk (404).
    NotFound(String),
    /// The object exists but belongs elsewhere or is busy (409).
    Conflict(String),
    /// The request cannot be honoured as asked (400), e.g. `compareTo` not
    /// older than the snapshot.
    BadRequest(String),
    /// The service cannot serve this now but may shortly (503), e.g. the
    /// snapshot database is being reopened after a disk error.
    Unavailable(String),
    /// Anything else (500). The message is logged and sent as `details`:
    /// it must not hold secrets.
    Internal(String),
}

// By hand: a layer's error is transparent (its own text and sources), which
// `thiserror` cannot say of a boxed trait object.
impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Layer(e) => e.fmt(f),
            BackendError::NotFound(m)
            | BackendError::Conflict(m)
            | BackendError::BadRequest(m)
            | BackendError::Unavailable(m)
            | BackendError::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackendError::Layer(e) => e.source(),
            _ => None,
        }
    }
}

impl<E: Classify> From<E> for BackendError {
    fn from(e: E) -> Self {
        BackendError::Layer(Box::new(e))
    }
}

impl BackendError {
    /// The class of the failure.
    pub fn class(&self) -> Class {
        match self {
            BackendError::Layer(e) => e.class(),
            BackendError::NotFound(_) => Class::NotFound,
            BackendError::Conflict(_) => Class::Conflict,
            BackendError::BadRequest(_) => Class::BadRequest,
            BackendError::Unavailable(_) => Class::Unavailable,
            BackendError::Internal(_) => Class::Internal,
        }
    }
}

/// What the API serves. Implemented by the glue over the inventory and the
/// snapshot manager; tests implement it over real files.
pub trait Backend: Send + Sync + 'static {
    /// Every VM of the node, each with its snapshot ids oldest first.
    fn list_vms(&self) -> Result<Vec<Vm>, BackendError>;

    /// One VM by its `name`.
    fn get_vm(&self, vm: &str) -> Result<Vm, BackendError>;

    /// Every snapshot of a VM, oldest first; `squash` merges chunks that are
    /// contiguous in logical offset.
    fn list_snapshots(&self, vm: &str, squash: bool) -> Result<Vec<Snapshot>, BackendError>;

    /// Clone every disk of the VM under one new id; chunks not squashed.
    fn create_snapshot(&self, vm: &str) -> Result<Snapshot, BackendError>;

    /// [`Backend::create_snapshot`] with the request's `Idempotency-Key`:
    /// a retry with the same key within the window answers the snapshot
    /// the first request made (true: replayed) instead of making another.
    /// By default the key is not remembered (a plain create).
    fn create_snapshot_keyed(&self, vm: &str, key: &str) -> Result<(Snapshot, bool), BackendError> {
        let _ = key;
        self.create_snapshot(vm).map(|s| (s, false))
    }

    /// One snapshot. `squash` merges contiguous chunks; with `compare_to`,
    /// chunks are the ranges to copy from the older snapshot (SEMANTICS.md),
    /// `size` and `zeroed` are filled, and `zeroed_separate` leaves the
    /// zeroed ranges out of `chunks`. A long answer (a diff refined by
    /// content) stops once `cancel` is set: its asker went away.
    fn get_snapshot(
        &self,
        vm: &str,
        snap: &str,
        options: &GetOptions,
        cancel: &Cancel,
    ) -> Result<Snapshot, BackendError>;

    /// Delete one snapshot: Ok when it is unknown (idempotent), Conflict
    /// when it belongs to another VM.
    fn delete_snapshot(&self, vm: &str, snap: &str) -> Result<(), BackendError>;

    /// Delete every snapshot of the VM.
    fn purge_snapshots(&self, vm: &str) -> Result<(), BackendError>;

    /// Open the snapshot file of one disk for reading, with its size in
    /// bytes.
    fn open_disk(&self, vm: &str, snap: &str, disk: &str) -> Result<(File, u64), BackendError>;

    /// The OVM Manager's base URL when the node knows it (ovs-agent's
    /// `manager_ip`, as `https://<ip>:7002`); used for logins when the
    /// config has no `ovm_endpoint`. None by default.
    fn manager_endpoint(&self) -> Option<String> {
        None
    }

    /// The backend's checks for `GET /health` and the metrics: the store
    /// writable, each repository readable and cloneable. None by default.
    fn health(&self) -> Vec<HealthCheck> {
        Vec::new()
    }
}
