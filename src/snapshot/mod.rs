//! The snapshot manager: create, get (squash, diff), list, delete, purge,
//! open a disk for reading, and reconcile the database with the
//! repositories (SEMANTICS.md §1 to §4).
//!
//! # A snapshot on disk
//! ```text
//! <repo mount>/CoriolisSnapshots/<id>/            0700, one per repository
//!     .coriolis-owner          which exporter made it (written first)
//!     <disk name> ...          one reflink clone per disk, 0600
//!     .coriolis-manifest.json  the snapshot's record (written last)
//! ```
//! and its record, extent maps and index entry in the [`Store`], committed
//! in one transaction after the manifests.
//!
//! # Why this order
//! - The owner mark comes first so that reconcile can tell a half-made
//!   folder of this exporter from one of another node sharing the OCFS2
//!   repository (NODE.md): only our own folders are ever removed.
//! - The manifest comes after every clone is made, mapped and synced, and is
//!   renamed into place: a folder with a manifest is complete. A crash
//!   before the manifest leaves a half-made folder that reconcile removes; a
//!   crash after it leaves a complete snapshot that reconcile adopts (as it
//!   adopts every complete folder when the database was lost).
//! - Delete removes the manifests first, so that a crash halfway never
//!   resurrects a deleted snapshot, then the record, then the files.
//!
//! # Files
//! [`Manager`] (`manager.rs`) creates, reads and deletes; `manifest.rs`
//! names what a folder holds; [`StoreConfig`] is the `[store]` section;
//! [`catalog`] holds the pool's rules and `cache.rs` keeps the store in
//! step with them; `reconcile.rs` mends after a crash; [`exact`] refines
//! diffs by content; [`admin`] is the operator's subcommands.
//!
//! # What this module must not do
//! Join anything from a request into a path: snapshot ids are looked up in
//! the store, disk names matched against the record. Follow a symlink below
//! a repository's mount point (every path goes through
//! [`crate::sys::path`]). Block an event loop: every
//! call here blocks (clones, FIEMAP, fsync); the API runs them on a
//! blocking pool. Depend on how the inventory is built: VMs come through
//! [`VmLookup`].

pub mod admin;
mod cache;
mod cancel;
pub mod catalog;
mod config;
pub mod error;
pub mod exact;
pub mod fault;
mod manager;
mod manifest;
mod reconcile;

pub use cancel::Cancel;
pub use config::StoreConfig;
pub use error::{SnapshotError, Unverified};
pub use exact::{DiffConfig, ExactMode};
pub use manager::{Manager, VmLookup};
pub use manifest::{
    Manifest, MANIFEST, MANIFEST_FORMAT, MANIFEST_TMP, MAX_MANIFEST_BYTES, OWNER_MARK,
    RESERVED_PREFIX,
};
pub use reconcile::{Action, ReconcileReport};
