//! Fault points: named places inside create and delete where a crash test
//! can make the process kill itself.
//!
//! With `COE_FAULT=<point>` in the environment, reaching that point sends
//! SIGKILL to the process itself: no destructor, no flush, exactly what a
//! power cut or `kill -9` leaves behind. The crash tests run the real binary
//! once per point and then check what reconcile makes of the debris.
//!
//! Why always compiled in rather than behind a cargo feature: the tests must
//! kill the very binary that ships (`CARGO_BIN_EXE_…` is built with the
//! package's default features, and `scripts/test.sh` runs plain `cargo
//! test`), and a feature only tests enable would test another build. The
//! cost when unset is one cached environment lookup per point; the service
//! logs a warning at start when the variable is set.

pub use crate::store::STORE_IN_READ_TXN;
pub use crate::sys::fault::{armed_point, point, ENV};

/// Every fault point, in the order an operation reaches them.
pub const POINTS: &[&str] = &[
    CREATE_AFTER_MKDIR,
    CREATE_AFTER_FIRST_CLONE,
    CREATE_AFTER_CLONES,
    CREATE_AFTER_MANIFEST,
    CREATE_AFTER_COMMIT,
    DELETE_AFTER_MANIFEST,
    DELETE_AFTER_RECORD,
    DELETE_AFTER_FIRST_FILE,
];

/// The snapshot folders exist, with their owner marker; nothing cloned.
pub const CREATE_AFTER_MKDIR: &str = "create-after-mkdir";
/// The first disk is cloned, others not yet.
pub const CREATE_AFTER_FIRST_CLONE: &str = "create-after-first-clone";
/// Every disk is cloned and mapped; no manifest.
pub const CREATE_AFTER_CLONES: &str = "create-after-clones";
/// Manifests are written; the database commit has not happened.
pub const CREATE_AFTER_MANIFEST: &str = "create-after-manifest";
/// Committed; the caller has not been answered.
pub const CREATE_AFTER_COMMIT: &str = "create-after-commit";
/// The manifests are removed (the snapshot is invalid); record still there.
pub const DELETE_AFTER_MANIFEST: &str = "delete-after-manifest";
/// The record is gone; the files are still there.
pub const DELETE_AFTER_RECORD: &str = "delete-after-record";
/// One disk file is removed, the rest not yet.
pub const DELETE_AFTER_FIRST_FILE: &str = "delete-after-first-file";

/// Not a kill point: the clone of the second disk fails with ENOSPC (a full
/// filesystem), once; create must leave nothing behind and answer 507.
pub const CREATE_CLONE_ENOSPC: &str = "create-clone-enospc";
/// Not a kill point: the clone of the second disk fails with EIO, once;
/// create must leave nothing behind and answer 500.
pub const CREATE_CLONE_EIO: &str = "create-clone-eio";
