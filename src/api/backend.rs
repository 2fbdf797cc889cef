//! The interface between the HTTP layer and the node: what the API needs
//! from the inventory, the snapshot manager and the disk reader.
//!
//! Every method is synchronous and may block (clones, FIEMAP, LMDB
//! transactions, opening files): the API calls them through
//! `tokio::task::spawn_blocking`, never on the event loop. Errors carry their
//! HTTP class; the api module maps them to a status and an error body in one
//! place (`api::ApiError`). Ids reaching a backend have passed the router's
//! charset and length check, but a backend must still treat them as lookup
//! keys, never as path components.

use std::fs::File;

use crate::wire::{HealthCheck, Snapshot, Vm};

/// Why a backend call failed, by HTTP class, with a message for `details`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Unknown VM, snapshot or disk (404).
    #[error("{0}")]
    NotFound(String),
    /// The object exists but belongs elsewhere or is busy (409).
    #[error("{0}")]
    Conflict(String),
    /// The request cannot be honoured as asked (400), e.g. `compareTo` not
    /// older than the snapshot.
    #[error("{0}")]
    BadRequest(String),
    /// The service cannot serve this now but may shortly (503), e.g. the
    /// snapshot database is being reopened after a disk error.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (500). The message is logged and sent as `details`:
    /// it must not hold secrets.
    #[error("{0}")]
    Internal(String),
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

    /// One snapshot. With `compare_to`, chunks are the ranges to copy from
    /// the older snapshot (SEMANTICS.md), `size` and `zeroed` are filled, and
    /// `zeroed_separate` leaves the zeroed ranges out of `chunks`.
    fn get_snapshot(
        &self,
        vm: &str,
        snap: &str,
        squash: bool,
        compare_to: Option<&str>,
        zeroed_separate: bool,
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

/// The backend of a node with no inventory configured: it has no VM, so
/// every VM route answers 404. This is what the binary serves until the
/// inventory and snapshot manager are wired in.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInventory;

const NO_INVENTORY: &str = "no inventory configured";

impl NoInventory {
    fn missing<T>(vm: &str) -> Result<T, BackendError> {
        Err(BackendError::NotFound(format!(
            "VM {vm} not found: {NO_INVENTORY}"
        )))
    }
}

impl Backend for NoInventory {
    fn list_vms(&self) -> Result<Vec<Vm>, BackendError> {
        Ok(Vec::new())
    }
    fn get_vm(&self, vm: &str) -> Result<Vm, BackendError> {
        Self::missing(vm)
    }
    fn list_snapshots(&self, vm: &str, _: bool) -> Result<Vec<Snapshot>, BackendError> {
        Self::missing(vm)
    }
    fn create_snapshot(&self, vm: &str) -> Result<Snapshot, BackendError> {
        Self::missing(vm)
    }
    fn get_snapshot(
        &self,
        vm: &str,
        _: &str,
        _: bool,
        _: Option<&str>,
        _: bool,
    ) -> Result<Snapshot, BackendError> {
        Self::missing(vm)
    }
    fn delete_snapshot(&self, vm: &str, _: &str) -> Result<(), BackendError> {
        Self::missing(vm)
    }
    fn purge_snapshots(&self, vm: &str) -> Result<(), BackendError> {
        Self::missing(vm)
    }
    fn open_disk(&self, vm: &str, _: &str, _: &str) -> Result<(File, u64), BackendError> {
        Self::missing(vm)
    }
}
