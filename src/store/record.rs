//! What the store remembers of a snapshot, apart from its extent maps.
//!
//! Records are small and read often, so they are JSON (readable with
//! `mdb_dump` when something goes wrong); the extent maps, which are large,
//! live in their own database in the binary encoding of [`super::codec`].
//! The same disk descriptions go into the manifest in each snapshot folder,
//! from which a lost database is rebuilt.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The identity of a file at one point in time: if any of these changed,
/// the file is not the one whose extent map was recorded, and no diff may
/// be answered from that map (SEMANTICS.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub ctime_sec: i64,
    pub ctime_nsec: i64,
}

impl Fingerprint {
    /// The fingerprint of an open file.
    pub fn of(fd: impl std::os::fd::AsFd) -> std::io::Result<Self> {
        let st = rustix::fs::fstat(fd)?;
        // Field widths differ between targets; these are the usual casts.
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        Ok(Fingerprint {
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime_sec: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as i64,
            ctime_sec: st.st_ctime as i64,
            ctime_nsec: st.st_ctime_nsec as i64,
        })
    }
}

/// One disk of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The disk's file name: the `{disk}` of the API and the name of the
    /// clone inside the snapshot folder.
    pub name: String,
    /// The disk file that was cloned.
    pub parent_path: PathBuf,
    /// Mount point of the repository holding both.
    pub repo_mount: PathBuf,
    /// Size of the clone in bytes.
    pub size: u64,
    /// The clone as it was when its extent map was recorded.
    pub fingerprint: Fingerprint,
    /// Number of extents in the recorded map (informative).
    pub extents: u64,
    /// Inode number of the disk file cloned (`parent_path` when the
    /// snapshot was made); absent in records and manifests of older
    /// builds. A later snapshot whose disk has another inode is of a
    /// replaced disk: no diff against this one (`disk_replaced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_ino: Option<u64>,
}

/// One snapshot: every disk of one VM, cloned under one id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// UUIDv4, hyphenated lower case.
    pub id: String,
    /// The VM's name (the `{vm}` of the API).
    pub vm: String,
    /// Creation order among all snapshots of this store, assigned by
    /// [`super::Store::insert`]: a snapshot is older than another exactly
    /// when its `seq` is smaller.
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock creation time, nanoseconds since the Unix epoch.
    pub created_at_ns: u64,
    /// Which exporter made it (see `StoreConfig::owner`).
    pub owner: String,
    pub disks: Vec<DiskRecord>,
    /// The `Idempotency-Key` of the create that made it, if any. In the
    /// manifest too, so that any node of the pool (and a database rebuilt
    /// from the manifests) answers a retry with this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl SnapshotRecord {
    /// Where the clone of `disk` lives: `<repo>/CoriolisSnapshots/<id>/<name>`.
    pub fn disk_path(&self, disk: &DiskRecord) -> PathBuf {
        disk.repo_mount
            .join(crate::sys::path::SNAPSHOTS_DIR)
            .join(&self.id)
            .join(&disk.name)
    }
}
