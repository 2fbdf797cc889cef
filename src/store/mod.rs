//! The snapshot store: durable metadata of every snapshot, in LMDB (heed).
//!
//! # What lives here
//! One LMDB environment at `db_file` (a single data file plus `<db_file>-lock`,
//! `MDB_NOSUBDIR`), holding four databases:
//!
//! | database    | key                                  | value                        |
//! | ----------- | ------------------------------------ | ---------------------------- |
//! | `meta`      | `schema`, `next_seq`                 | u32 / u64, big endian        |
//! | `snapshots` | snapshot id (16 bytes)               | [`SnapshotRecord`] as JSON   |
//! | `by_vm`     | `u16 len, vm, u64 seq` (big endian)  | snapshot id                  |
//! | `maps`      | `id, u32 disk index`                 | extent map ([`codec`])       |
//!
//! `by_vm` gives each VM's snapshots in creation order with one prefix scan;
//! `maps` keeps the bulky extent maps out of the records so that listing ids
//! or checking a record never decodes millions of extents.
//!
//! # Rules
//! - Every operation is one transaction: a snapshot's record, index entry and
//!   maps appear and disappear together. LMDB serialises writers; readers see
//!   a consistent snapshot and never block the writer.
//! - The schema version is checked at open; a newer unknown schema is
//!   refused (downgrading the binary must not corrupt the database).
//! - `MDB_MAP_FULL` is an error naming the map size and the config key to
//!   raise, never a crash; reads keep working. Stale reader slots left by a
//!   killed process are cleared at open and again when the reader table is
//!   full.
//! - LMDB must be on a local filesystem and opened once per process: the
//!   store refuses NFS and OCFS2 (the shared repositories) and heed refuses a
//!   second open of the same file.
//!
//! This module knows nothing of files on repositories: the snapshot manager
//! decides what to record, the store only keeps it.

pub mod codec;
pub mod record;

use std::path::{Path, PathBuf};

use heed::types::{Bytes, Str};
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, MdbError, WithoutTls};
use uuid::Uuid;

use crate::extent::ExtentMap;
use crate::sys::FsType;

pub use codec::CodecError;
pub use record::{DiskRecord, Fingerprint, SnapshotRecord};

/// The folder of every repository holding this service's snapshots
/// (API.md: `<repo mount point>/CoriolisSnapshots/<snap id>/<disk name>`).
pub use crate::sys::path::SNAPSHOTS_DIR;

/// The schema this build writes and reads. Bump on any incompatible change
/// of keys or values; older schemas are migrated at open, newer refused.
pub const SCHEMA_VERSION: u32 = 1;

/// Fault point (see `sys::fault`) inside a read transaction of the store
/// (listing a VM's snapshots): a process killed here leaves a stale LMDB
/// reader slot. Not in `snapshot::fault::POINTS`: it is no step of create or
/// delete.
pub const STORE_IN_READ_TXN: &str = "store-in-read-txn";

/// Default map size: 64 GiB. LMDB's map is address space, not disk: the file
/// grows with the data. A million-extent map takes ~6 MiB, so this holds
/// thousands of snapshots of heavily fragmented disks.
pub const DEFAULT_MAP_SIZE: usize = 64 << 30;
/// Default reader slots. LMDB's own default is 126; the API runs reads on a
/// blocking pool of up to 512 threads.
pub const DEFAULT_MAX_READERS: u32 = 1024;
/// Named databases in the environment (four used, room to grow).
const MAX_DBS: u32 = 8;
/// A VM name is part of an LMDB key, whose size is capped at 511 bytes
/// (`MDB_MAXKEYSIZE`); 2 + name + 8 must fit with room to spare.
pub const MAX_VM_NAME: usize = 400;

const KEY_SCHEMA: &str = "schema";
const KEY_NEXT_SEQ: &str = "next_seq";

/// How to open the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// LMDB map size in bytes (rounded up to a page multiple).
    pub map_size: usize,
    pub max_readers: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            map_size: DEFAULT_MAP_SIZE,
            max_readers: DEFAULT_MAX_READERS,
        }
    }
}

/// What went wrong in the store, by step.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the folder of the database {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the database {path:?} is on {fs}: LMDB needs a local filesystem \
         (set db_file to a local path, never a shared repository)"
    )]
    RemoteFilesystem { path: PathBuf, fs: FsType },
    #[error("cannot open the LMDB database {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: heed::Error,
    },
    #[error(
        "the database {path:?} has schema version {found}, newer than the {supported} \
         this build knows: refusing to open it (run the newer exporter, or rebuild \
         a database from the snapshot manifests with `rebuild-db` at another path)"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "the database is full (LMDB map size {map_size} bytes): raise \
         `store.map_size` in the config"
    )]
    MapFull { map_size: usize },
    #[error("database {step} failed")]
    Lmdb {
        step: &'static str,
        #[source]
        source: heed::Error,
    },
    #[error("the record of snapshot {id} is corrupt")]
    CorruptRecord {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the extent map of disk {disk} of snapshot {id} is corrupt")]
    CorruptMap {
        id: String,
        disk: u32,
        #[source]
        source: CodecError,
    },
    #[error("the extent map of disk {disk} of snapshot {id} is missing")]
    MissingMap { id: String, disk: u32 },
    #[error("corrupt {what} in the database")]
    Corrupt { what: &'static str },
    #[error("snapshot id {0:?} is not a UUID")]
    BadId(String),
    #[error("VM name of {len} bytes is longer than the {MAX_VM_NAME} the store accepts")]
    VmNameTooLong { len: usize },
    #[error("{disks} disks but {maps} extent maps given")]
    MapCount { disks: usize, maps: usize },
}

impl StoreError {
    /// True when the write failed because the map is full: nothing was
    /// written, and reads still work.
    pub fn is_map_full(&self) -> bool {
        matches!(self, StoreError::MapFull { .. })
    }
}

/// The LMDB environment and its databases.
pub struct Store {
    env: Env<WithoutTls>,
    meta: Database<'static, Str, Bytes>,
    snapshots: Database<'static, Bytes, Bytes>,
    by_vm: Database<'static, Bytes, Bytes>,
    maps: Database<'static, Bytes, Bytes>,
    path: PathBuf,
    map_size: usize,
    stale_readers_cleared: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("map_size", &self.map_size)
            .finish()
    }
}

/// Parses a snapshot id into its 16 key bytes.
pub fn id_key(id: &str) -> Result<[u8; codec::ID_LEN], StoreError> {
    Uuid::parse_str(id)
        .map(|u| *u.as_bytes())
        .map_err(|_| StoreError::BadId(id.to_owned()))
}

fn page_size() -> usize {
    rustix::param::page_size()
}

impl Store {
    /// Opens (creating if needed) the store at `path`, a file path: LMDB
    /// keeps its data in `path` and its lock table in `<path>-lock`.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|source| StoreError::CreateDir {
            path: parent.clone(),
            source,
        })?;
        let dir = std::fs::File::open(&parent).map_err(|source| StoreError::CreateDir {
            path: parent.clone(),
            source,
        })?;
        if let Ok(fs @ (FsType::Nfs | FsType::Ocfs2)) = crate::sys::fs_type(&dir) {
            return Err(StoreError::RemoteFilesystem {
                path: path.to_path_buf(),
                fs,
            });
        }
        let page = page_size();
        let map_size = options.map_size.max(page).div_ceil(page) * page;
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(map_size)
            .max_dbs(MAX_DBS)
            .max_readers(options.max_readers.max(1));
        // SAFETY: heed marks these unsafe because LMDB's memory map is UB if
        // the file is modified behind its back. The preconditions hold: the
        // flag is NO_SUB_DIR only (no NO_LOCK/NO_SYNC, so LMDB's lock file
        // and durability stay on); `open` above refused network and cluster
        // filesystems (LMDB's locking only works on a local filesystem); the
        // service opens its db_file once per process (heed also refuses a
        // second open of the same path in a process with EnvAlreadyOpened),
        // and nothing else writes the file.
        #[allow(unsafe_code)]
        let env = unsafe {
            opts.flags(EnvFlags::NO_SUB_DIR);
            opts.open(path)
        }
        .map_err(open_err)?;
        // A process killed inside a read transaction leaves its reader slot
        // taken; with enough of them LMDB refuses new readers and the file
        // cannot shrink its free list. Clear them now.
        let stale_readers_cleared = match env.clear_stale_readers() {
            Ok(0) => 0,
            Ok(n) => {
                tracing::info!(db = %path.display(), cleared = n, "cleared stale LMDB reader slots");
                n
            }
            Err(e) => {
                tracing::warn!(db = %path.display(), error = %e, "LMDB reader check failed");
                0
            }
        };

        // Refuse a newer schema before writing anything into it.
        let rtxn = env.read_txn().map_err(open_err)?;
        let found = env
            .open_databases_and_commit(rtxn, |dbo, rtxn| -> Result<_, heed::Error> {
                let found = match dbo.open_database::<Str, Bytes>(rtxn, Some("meta"))? {
                    Some(meta) => meta.get(rtxn, KEY_SCHEMA)?.map(<[u8]>::to_vec),
                    None => None,
                };
                Ok(CommitOrAbort::<(), _>::Abort(found))
            })
            .map_err(open_err)?;
        if let CommitOrAbort::Abort(Some(raw)) = found {
            let raw: [u8; 4] = raw.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                what: "schema version",
            })?;
            let found = u32::from_be_bytes(raw);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    path: path.to_path_buf(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }

        let wtxn = env.write_txn().map_err(open_err)?;
        let (meta, snapshots, by_vm, maps) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_, heed::Error> {
                let meta = dbo.create_database::<Str, Bytes>(wtxn, Some("meta"))?;
                let snapshots = dbo.create_database::<Bytes, Bytes>(wtxn, Some("snapshots"))?;
                let by_vm = dbo.create_database::<Bytes, Bytes>(wtxn, Some("by_vm"))?;
                let maps = dbo.create_database::<Bytes, Bytes>(wtxn, Some("maps"))?;
                // Schema: new databases get ours; older ones would be
                // migrated here; newer ones are refused below.
                if meta.get(wtxn, KEY_SCHEMA)?.is_none() {
                    meta.put(wtxn, KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                }
                Ok(CommitOrAbort::<_, ()>::Commit((
                    meta, snapshots, by_vm, maps,
                )))
            })
            .map_err(|source| match source {
                heed::Error::Mdb(MdbError::MapFull) => StoreError::MapFull { map_size },
                source => StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })?
            .unwrap_commit();
        // LMDB raises the map to what an existing file already uses.
        let map_size = env.info().map_size.max(map_size);
        let store = Store {
            env,
            meta,
            snapshots,
            by_vm,
            maps,
            path: path.to_path_buf(),
            map_size,
            stale_readers_cleared,
        };
        // A newer schema was refused above, before anything was written.
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn map_size(&self) -> usize {
        self.map_size
    }

    /// Clears the reader slots of dead processes sharing this environment;
    /// returns how many. Done at open and whenever the reader table is full.
    pub fn clear_stale_readers(&self) -> Result<usize, StoreError> {
        self.env
            .clear_stale_readers()
            .map_err(|e| lmdb("reader check", e))
    }

    /// Reader slots of dead processes cleared when the store was opened.
    pub fn stale_readers_cleared(&self) -> usize {
        self.stale_readers_cleared
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let txn = self.read_txn()?;
        let raw = self
            .meta
            .get(&txn, KEY_SCHEMA)
            .map_err(|source| lmdb("read schema", source))?
            .ok_or(StoreError::Corrupt {
                what: "missing schema version",
            })?;
        let bytes: [u8; 4] = raw.try_into().map_err(|_| StoreError::Corrupt {
            what: "schema version",
        })?;
        Ok(u32::from_be_bytes(bytes))
    }

    /// Sets the schema version (tests of the refusal to open newer schemas).
    #[doc(hidden)]
    pub fn force_schema_version(&self, v: u32) -> Result<(), StoreError> {
        self.write(|s, wtxn| {
            s.meta
                .put(wtxn, KEY_SCHEMA, &v.to_be_bytes())
                .map_err(|e| s.write_err("write schema", e))
        })
    }

    fn read_txn(&self) -> Result<heed::RoTxn<'_, WithoutTls>, StoreError> {
        match self.env.read_txn() {
            Err(heed::Error::Mdb(MdbError::ReadersFull)) => {
                // Maybe slots of dead processes: clear them and try once more.
                let cleared = self.env.clear_stale_readers().unwrap_or(0);
                tracing::warn!(cleared, "LMDB reader table full; cleared stale slots");
                self.env
                    .read_txn()
                    .map_err(|source| lmdb("begin read transaction", source))
            }
            r => r.map_err(|source| lmdb("begin read transaction", source)),
        }
    }

    fn write_err(&self, step: &'static str, source: heed::Error) -> StoreError {
        match source {
            heed::Error::Mdb(MdbError::MapFull) => StoreError::MapFull {
                map_size: self.map_size,
            },
            source => lmdb(step, source),
        }
    }

    /// Runs `f` in one write transaction, committed if it returns Ok and
    /// aborted (nothing written) otherwise.
    fn write<T>(
        &self,
        f: impl FnOnce(&Self, &mut heed::RwTxn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut wtxn = self
            .env
            .write_txn()
            .map_err(|e| self.write_err("begin write transaction", e))?;
        let out = f(self, &mut wtxn)?;
        wtxn.commit().map_err(|e| self.write_err("commit", e))?;
        Ok(out)
    }

    /// Records a new snapshot with one extent map per disk (same order), in
    /// one transaction. Assigns and returns `record.seq`, which orders it
    /// after every snapshot recorded before.
    pub fn insert(
        &self,
        record: &mut SnapshotRecord,
        maps: &[ExtentMap],
    ) -> Result<u64, StoreError> {
        if record.disks.len() != maps.len() {
            return Err(StoreError::MapCount {
                disks: record.disks.len(),
                maps: maps.len(),
            });
        }
        if record.vm.len() > MAX_VM_NAME {
            return Err(StoreError::VmNameTooLong {
                len: record.vm.len(),
            });
        }
        let id = id_key(&record.id)?;
        // Encode outside the write transaction, which serialises writers.
        let encoded: Vec<Vec<u8>> = maps.iter().map(codec::encode_map).collect();
        self.write(|s, wtxn| {
            let seq = match s
                .meta
                .get(wtxn, KEY_NEXT_SEQ)
                .map_err(|e| lmdb("read sequence", e))?
            {
                Some(raw) => {
                    u64::from_be_bytes(raw.try_into().map_err(|_| StoreError::Corrupt {
                        what: "sequence number",
                    })?)
                }
                None => 1,
            };
            record.seq = seq;
            let json =
                serde_json::to_vec(&*record).map_err(|source| StoreError::CorruptRecord {
                    id: record.id.clone(),
                    source,
                })?;
            s.meta
                .put(wtxn, KEY_NEXT_SEQ, &(seq + 1).to_be_bytes())
                .map_err(|e| s.write_err("write sequence", e))?;
            s.snapshots
                .put(wtxn, &id, &json)
                .map_err(|e| s.write_err("write record", e))?;
            s.by_vm
                .put(wtxn, &codec::index_key(&record.vm, seq), &id)
                .map_err(|e| s.write_err("write index", e))?;
            for (i, m) in encoded.iter().enumerate() {
                s.maps
                    .put(wtxn, &codec::map_key(&id, i as u32), m)
                    .map_err(|e| s.write_err("write extent map", e))?;
            }
            Ok(seq)
        })
    }

    /// The record of snapshot `id`, if there is one. An id that is not a
    /// UUID is simply unknown.
    pub fn get(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let Ok(key) = id_key(id) else {
            return Ok(None);
        };
        let txn = self.read_txn()?;
        self.get_in(&txn, &key)
    }

    fn get_in(
        &self,
        txn: &heed::RoTxn<'_>,
        key: &[u8; codec::ID_LEN],
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let Some(raw) = self
            .snapshots
            .get(txn, key)
            .map_err(|e| lmdb("read record", e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(raw)
            .map(Some)
            .map_err(|source| StoreError::CorruptRecord {
                id: Uuid::from_bytes(*key).to_string(),
                source,
            })
    }

    /// The extent map of disk number `disk` (index in `record.disks`).
    pub fn map(&self, id: &str, disk: u32) -> Result<ExtentMap, StoreError> {
        let key = id_key(id)?;
        let txn = self.read_txn()?;
        let raw = self
            .maps
            .get(&txn, &codec::map_key(&key, disk))
            .map_err(|e| lmdb("read extent map", e))?
            .ok_or_else(|| StoreError::MissingMap {
                id: id.to_owned(),
                disk,
            })?;
        codec::decode_map(raw).map_err(|source| StoreError::CorruptMap {
            id: id.to_owned(),
            disk,
            source,
        })
    }

    /// The raw encoded map (benchmarks and size reports).
    pub fn map_bytes(&self, id: &str, disk: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let key = id_key(id)?;
        let txn = self.read_txn()?;
        Ok(self
            .maps
            .get(&txn, &codec::map_key(&key, disk))
            .map_err(|e| lmdb("read extent map", e))?
            .map(<[u8]>::to_vec))
    }

    /// The snapshots of `vm`, oldest first.
    pub fn list_vm(&self, vm: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        if vm.len() > MAX_VM_NAME {
            return Ok(Vec::new());
        }
        let txn = self.read_txn()?;
        crate::sys::fault::point(STORE_IN_READ_TXN);
        let prefix = codec::index_prefix(vm);
        let iter = self
            .by_vm
            .prefix_iter(&txn, &prefix)
            .map_err(|e| lmdb("scan index", e))?;
        let mut out = Vec::new();
        for entry in iter {
            let (_, id) = entry.map_err(|e| lmdb("scan index", e))?;
            let key: [u8; codec::ID_LEN] = id.try_into().map_err(|_| StoreError::Corrupt {
                what: "index entry",
            })?;
            match self.get_in(&txn, &key)? {
                Some(r) => out.push(r),
                None => {
                    return Err(StoreError::Corrupt {
                        what: "index entry without record",
                    })
                }
            }
        }
        Ok(out)
    }

    /// Every snapshot record, in no particular order.
    pub fn list_all(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let txn = self.read_txn()?;
        let iter = self
            .snapshots
            .iter(&txn)
            .map_err(|e| lmdb("scan records", e))?;
        let mut out = Vec::new();
        for entry in iter {
            let (key, raw) = entry.map_err(|e| lmdb("scan records", e))?;
            let rec: SnapshotRecord =
                serde_json::from_slice(raw).map_err(|source| StoreError::CorruptRecord {
                    id: Uuid::from_slice(key).map_or_else(|_| "?".into(), |u| u.to_string()),
                    source,
                })?;
            out.push(rec);
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    /// Removes snapshot `id` (record, index entry, maps) in one transaction.
    /// Returns the removed record, or None if there was none.
    pub fn remove(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let Ok(key) = id_key(id) else {
            return Ok(None);
        };
        self.write(|s, wtxn| {
            let Some(rec) = s.get_in(wtxn, &key)? else {
                return Ok(None);
            };
            s.snapshots
                .delete(wtxn, &key)
                .map_err(|e| s.write_err("delete record", e))?;
            s.by_vm
                .delete(wtxn, &codec::index_key(&rec.vm, rec.seq))
                .map_err(|e| s.write_err("delete index entry", e))?;
            for i in 0..rec.disks.len() {
                s.maps
                    .delete(wtxn, &codec::map_key(&key, i as u32))
                    .map_err(|e| s.write_err("delete extent map", e))?;
            }
            Ok(Some(rec))
        })
    }

    /// Forgets every snapshot (the first step of a rebuild from manifests).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.write(|s, wtxn| {
            s.snapshots
                .clear(wtxn)
                .map_err(|e| s.write_err("clear records", e))?;
            s.by_vm
                .clear(wtxn)
                .map_err(|e| s.write_err("clear index", e))?;
            s.maps
                .clear(wtxn)
                .map_err(|e| s.write_err("clear maps", e))?;
            Ok(())
        })
    }
}

fn lmdb(step: &'static str, source: heed::Error) -> StoreError {
    StoreError::Lmdb { step, source }
}

#[cfg(test)]
mod tests;
