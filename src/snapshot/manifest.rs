//! What a snapshot folder holds besides its clones: the manifest (the
//! snapshot's record, from which the database can be rebuilt), the owner
//! mark, and the names reserved for the service.

use serde::{Deserialize, Serialize};

use crate::store::SnapshotRecord;

/// File name of the manifest in each snapshot folder.
pub const MANIFEST: &str = ".coriolis-manifest.json";
/// Temporary name the manifest is written under before the rename.
pub const MANIFEST_TMP: &str = ".coriolis-manifest.json.tmp";
/// File name of the owner mark in each snapshot folder.
pub const OWNER_MARK: &str = ".coriolis-owner";
/// Names starting with this are the service's own; a disk so named is
/// refused.
pub const RESERVED_PREFIX: &str = ".coriolis-";
/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;
/// Manifests bigger than this are not read (a VM with hundreds of disks
/// takes a few hundred KiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Owner marks bigger than this are not read.
pub(super) const MAX_OWNER_BYTES: u64 = 4096;

/// The manifest in each snapshot folder: the snapshot's record, from which
/// the database can be rebuilt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    #[serde(flatten)]
    pub snapshot: SnapshotRecord,
}
