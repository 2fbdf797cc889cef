//! The snapshot store: durable metadata of every snapshot, in LMDB (heed).
//!
//! # What lives here
//! One LMDB environment at `db_file` (a single data file plus `<db_file>-lock`,
//! `MDB_NOSUBDIR`), holding five databases:
//!
//! | database    | key                                  | value                        |
//! | ----------- | ------------------------------------ | ---------------------------- |
//! | `meta`      | `schema`, `next_seq`                 | u32 / u64, big endian        |
//! | `snapshots` | snapshot id (16 bytes)               | [`SnapshotRecord`] as JSON   |
//! | `by_vm`     | `u16 len, vm, u64 seq` (big endian)  | snapshot id                  |
//! | `maps`      | `id, u32 disk index`                 | extent map ([`codec`])       |
//! | `idempotency` | `u16 len, vm, Idempotency-Key`     | id, u64 created_at_ns        |
//!
//! Each database is typed with the heed codecs of [`keys`], which write
//! exactly these layouts (schema 1; pinned byte for byte by its tests).
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
//!
//! # Recovery without an operator
//! Some LMDB errors leave the environment unusable: after a failed write
//! of a meta page LMDB answers every later transaction with `MDB_PANIC`,
//! and an I/O error on commit (EIO, ENOSPC) says the disk under it failed.
//! The failing operation marks its environment poisoned (no lock taken);
//! the next operation retires it and opens the file again, re-checking the
//! schema, and serves once that works. A retired environment closes when
//! its last transaction ends (heed refuses a second open of one path
//! until then, so the reopen waits up to 2 s for it). Repeated
//! failures back off (100 ms doubling to 5 s); meanwhile
//! operations answer [`StoreError::Unavailable`] (HTTP 503). A write that
//! failed committed nothing (LMDB's meta page is the commit point), and a
//! record only gets its sequence number once committed. [`Store::health`]
//! says whether the store can write, probing with a small write while the
//! last one failed. Read errors of the memory map itself (SIGBUS) are not
//! recoverable in-process.
//!
//! This module knows nothing of files on repositories: the snapshot manager
//! decides what to record, the store only keeps it.

pub mod codec;
pub mod keys;
pub mod record;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use heed::types::{Bytes, Str};
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, MdbError, WithoutTls};
use uuid::Uuid;

use crate::error::{Class, Classify};
use crate::extent::ExtentMap;
use crate::sys::FsType;
use keys::{BeU32, BeU64, IdKey, IdemEntry, IdemKey, IndexKey, MapKey, VmPrefix};

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
/// Fault point (see `sys::fault::once`): the first commit of the store
/// fails as after a failed meta-page write (MDB_PANIC), once per process;
/// the store must reopen its environment and serve again. It does not kill.
pub const STORE_COMMIT_FAILS: &str = "store-commit-fails";

/// Default map size: 64 GiB. LMDB's map is address space, not disk: the file
/// grows with the data. A million-extent map takes ~6 MiB, so this holds
/// thousands of snapshots of heavily fragmented disks.
pub const DEFAULT_MAP_SIZE: usize = 64 << 30;
/// Default reader slots. LMDB's own default is 126; the API runs reads on a
/// blocking pool of up to 512 threads.
pub const DEFAULT_MAX_READERS: u32 = 1024;
/// Named databases in the environment (five used, room to grow).
const MAX_DBS: u32 = 8;
/// A VM name is part of an LMDB key, whose size is capped at 511 bytes
/// (`MDB_MAXKEYSIZE`); 2 + name + 8 must fit with room to spare.
pub const MAX_VM_NAME: usize = 400;

/// How long an `Idempotency-Key` of a create is remembered: a retry of a
/// create within this window answers the snapshot the first one made.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Longest idempotency key accepted (with the VM name it is an LMDB key).
pub const MAX_IDEMPOTENCY_KEY: usize = 64;

const KEY_SCHEMA: &str = "schema";
const KEY_NEXT_SEQ: &str = "next_seq";
/// A counter the health probe writes (proof that a write commits).
const KEY_PROBE: &str = "probe";

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
    #[error("an idempotency key of {len} bytes: 1 to {MAX_IDEMPOTENCY_KEY} accepted")]
    BadIdempotencyKey { len: usize },
    /// The environment failed and could not be reopened yet (HTTP 503).
    #[error("the snapshot database is unavailable (retried in {retry_in:?}): {reason}")]
    Unavailable { reason: String, retry_in: Duration },
}

impl Classify for StoreError {
    fn class(&self) -> Class {
        match self {
            StoreError::BadIdempotencyKey { .. } => Class::BadRequest,
            // Reopening the database after a disk error: retry shortly.
            StoreError::Unavailable { .. } => Class::Unavailable,
            _ => Class::Internal,
        }
    }
}

impl StoreError {
    /// True when the write failed because the map is full: nothing was
    /// written, and reads still work.
    pub fn is_map_full(&self) -> bool {
        matches!(self, StoreError::MapFull { .. })
    }

    /// True when the store cannot serve now but may after a retry (the
    /// environment failed and is being reopened).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// True for errors after which the LMDB environment must not be used
    /// again: MDB_PANIC (a failed meta-page write or an earlier fatal
    /// error; LMDB refuses every later transaction) and I/O errors (EIO,
    /// ENOSPC on commit). The store closes the environment and reopens the
    /// file on the next request.
    pub fn poisons(&self) -> bool {
        match self {
            StoreError::Lmdb { source, .. } => {
                matches!(
                    source,
                    heed::Error::Mdb(MdbError::Panic) | heed::Error::Io(_)
                )
            }
            _ => false,
        }
    }
}

/// One open LMDB environment and its databases. Every operation holds an
/// `Arc` of the handle it started on, so that a handle retired after a
/// fatal error closes only when its last transaction has ended.
pub struct Handle {
    env: Env<WithoutTls>,
    /// Counters; the schema version is read through [`Handle::schema`].
    meta: Database<'static, Str, BeU64>,
    snapshots: Database<'static, IdKey, Bytes>,
    by_vm: Database<'static, IndexKey, IdKey>,
    maps: Database<'static, MapKey, Bytes>,
    idem: Database<'static, IdemKey, IdemEntry>,
    map_size: usize,
    /// An operation on this environment failed in a way that leaves it
    /// unusable (see [`StoreError::poisons`]): the next operation retires it
    /// and opens the file again. Set without any lock, by the failing
    /// thread.
    poisoned: AtomicBool,
    /// Test fault point fired: every transaction fails with MDB_PANIC, as
    /// LMDB's own do after a fatal error.
    fatal: AtomicBool,
}

/// The environment in force, or why there is none.
enum EnvState {
    Open(Arc<Handle>),
    Closed {
        /// The error that retired the last environment, or the last failed
        /// reopen.
        reason: String,
        /// No reopen is tried before this.
        retry_at: Instant,
    },
}

/// The store: the path of the LMDB environment and the environment in
/// force, reopened after errors that poison it (module docs).
pub struct Store {
    path: PathBuf,
    options: StoreOptions,
    state: RwLock<EnvState>,
    stale_readers_cleared: usize,
    /// Poisoning errors (and failed reopens) since the last write that
    /// succeeded: sets the backoff between reopens.
    failures: AtomicU32,
    /// False from a write that failed for the disk's sake until a write
    /// succeeds again; [`Store::health`] probes it.
    write_ok: AtomicBool,
    /// The last error that made the store unwritable, for health.
    last_error: Mutex<Option<String>>,
    last_probe: Mutex<Option<Instant>>,
    reopens: AtomicU64,
    /// Test fault point: commits left to fail as a fatal LMDB error would.
    fail_commits: AtomicU32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("map_size", &self.map_size())
            .finish()
    }
}

/// What the store can do now (`GET /health`, metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreHealth {
    /// An environment is open (reads work).
    pub open: bool,
    /// The last write, or a probe write, succeeded.
    pub writable: bool,
    /// Why not, when not (an LMDB or I/O error; no path).
    pub reason: Option<String>,
    /// Times the environment was reopened after a fatal error.
    pub reopens: u64,
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

/// How long a reopen waits for the last transactions of a retired
/// environment to end (heed refuses a second environment on one path).
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The backoff between reopens after repeated failures: 100 ms doubling up
/// to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// `GET /health` probes an unwritable store at most this often.
const PROBE_EVERY: Duration = Duration::from_secs(1);

fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 2).min(16)).min(MAX_BACKOFF),
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens the LMDB environment at `path` and checks its schema.
fn open_env(path: &Path, options: &StoreOptions) -> Result<(Handle, usize), StoreError> {
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
    // service opens its db_file once per process at a time (a retired
    // environment is closed before the next is opened, and heed refuses a
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
            let found = match dbo.open_database::<Str, BeU32>(rtxn, Some("meta"))? {
                Some(meta) => meta.get(rtxn, KEY_SCHEMA)?,
                None => None,
            };
            Ok(CommitOrAbort::<(), _>::Abort(found))
        })
        .map_err(|e| match e {
            heed::Error::Decoding(_) => StoreError::Corrupt {
                what: "schema version",
            },
            e => open_err(e),
        })?;
    if let CommitOrAbort::Abort(Some(found)) = found {
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }

    let wtxn = env.write_txn().map_err(open_err)?;
    let (meta, snapshots, by_vm, maps, idem) = env
        .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_, heed::Error> {
            let meta = dbo.create_database::<Str, BeU64>(wtxn, Some("meta"))?;
            let snapshots = dbo.create_database::<IdKey, Bytes>(wtxn, Some("snapshots"))?;
            let by_vm = dbo.create_database::<IndexKey, IdKey>(wtxn, Some("by_vm"))?;
            let maps = dbo.create_database::<MapKey, Bytes>(wtxn, Some("maps"))?;
            // Added beside schema 1 without a bump: older builds ignore it.
            let idem = dbo.create_database::<IdemKey, IdemEntry>(wtxn, Some("idempotency"))?;
            // Schema: new databases get ours; older ones would be
            // migrated here; newer ones were refused above.
            let schema = meta.remap_data_type::<BeU32>();
            if schema.get(wtxn, KEY_SCHEMA)?.is_none() {
                schema.put(wtxn, KEY_SCHEMA, &SCHEMA_VERSION)?;
            }
            Ok(CommitOrAbort::<_, ()>::Commit((
                meta, snapshots, by_vm, maps, idem,
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
    Ok((
        Handle {
            env,
            meta,
            snapshots,
            by_vm,
            maps,
            idem,
            map_size,
            poisoned: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
        },
        stale_readers_cleared,
    ))
}

impl Store {
    /// Opens (creating if needed) the store at `path`, a file path: LMDB
    /// keeps its data in `path` and its lock table in `<path>-lock`.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let (handle, stale_readers_cleared) = open_env(path, options)?;
        Ok(Store {
            path: path.to_path_buf(),
            options: options.clone(),
            state: RwLock::new(EnvState::Open(Arc::new(handle))),
            stale_readers_cleared,
            failures: AtomicU32::new(0),
            write_ok: AtomicBool::new(true),
            last_error: Mutex::new(None),
            last_probe: Mutex::new(None),
            reopens: AtomicU64::new(0),
            fail_commits: AtomicU32::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The map size in force (0 while no environment is open).
    pub fn map_size(&self) -> usize {
        match &*read(&self.state) {
            EnvState::Open(h) => h.map_size,
            EnvState::Closed { .. } => 0,
        }
    }

    /// The environment to run an operation on: the one in force, or a new
    /// one when the last was poisoned (after the backoff).
    fn handle(&self) -> Result<Arc<Handle>, StoreError> {
        if let EnvState::Open(h) = &*read(&self.state) {
            if !h.poisoned.load(Ordering::Acquire) {
                return Ok(h.clone());
            }
        }
        self.reopen()
    }

    fn reopen(&self) -> Result<Arc<Handle>, StoreError> {
        let mut state = write(&self.state);
        if let EnvState::Open(h) = &*state {
            if !h.poisoned.load(Ordering::Acquire) {
                return Ok(h.clone());
            }
            // Retire it: LMDB closes it when the last operation holding it
            // ends (those fail fast now, or finish their reads).
            let reason = lock(&self.last_error)
                .clone()
                .unwrap_or_else(|| "a fatal LMDB error".into());
            let failures = self.failures.load(Ordering::Relaxed);
            *state = EnvState::Closed {
                reason,
                retry_at: Instant::now() + backoff(failures),
            };
            tracing::warn!(db = %self.path.display(), failures, "closing the LMDB environment after a fatal error");
        }
        let EnvState::Closed { reason, retry_at } = &mut *state else {
            unreachable!("replaced above");
        };
        let now = Instant::now();
        if now < *retry_at {
            return Err(StoreError::Unavailable {
                reason: reason.clone(),
                retry_in: *retry_at - now,
            });
        }
        let deadline = now + CLOSE_WAIT;
        let opened = loop {
            match open_env(&self.path, &self.options) {
                // The retired environment has operations still running.
                Err(StoreError::Open {
                    source: heed::Error::EnvAlreadyOpened,
                    ..
                }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                r => break r,
            }
        };
        match opened {
            Ok((h, _)) => {
                let h = Arc::new(h);
                *state = EnvState::Open(h.clone());
                self.reopens.fetch_add(1, Ordering::Relaxed);
                tracing::info!(db = %self.path.display(), "reopened the LMDB environment");
                Ok(h)
            }
            Err(e) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let wait = backoff(failures).max(Duration::from_millis(100));
                *reason = crate::error::chain(&e);
                *retry_at = Instant::now() + wait;
                tracing::warn!(db = %self.path.display(), error = %reason, retry_in_ms = wait.as_millis() as u64,
                    "cannot reopen the LMDB environment");
                Err(StoreError::Unavailable {
                    reason: reason.clone(),
                    retry_in: wait,
                })
            }
        }
    }

    /// Runs `f` on the environment in force; an error that poisons it
    /// retires the environment for the next operation to reopen.
    fn with<T>(&self, f: impl FnOnce(&Handle) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let h = self.handle()?;
        let r = f(&h);
        if let Err(e) = &r {
            if e.poisons() {
                self.poisoned(&h, e);
            }
        }
        r
    }

    fn poisoned(&self, h: &Handle, e: &StoreError) {
        let msg = crate::error::chain(e);
        tracing::error!(db = %self.path.display(), error = %msg,
            "the LMDB environment failed; it is reopened on the next request");
        *lock(&self.last_error) = Some(msg);
        self.write_ok.store(false, Ordering::Release);
        self.failures.fetch_add(1, Ordering::Relaxed);
        h.poisoned.store(true, Ordering::Release);
    }

    /// Clears the reader slots of dead processes sharing this environment;
    /// returns how many. Done at open and whenever the reader table is full.
    pub fn clear_stale_readers(&self) -> Result<usize, StoreError> {
        self.with(|h| {
            h.env
                .clear_stale_readers()
                .map_err(|e| lmdb("reader check", e))
        })
    }

    /// Reader slots of dead processes cleared when the store was opened.
    pub fn stale_readers_cleared(&self) -> usize {
        self.stale_readers_cleared
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.with(|h| {
            let txn = h.read_txn()?;
            h.schema()
                .get(&txn, KEY_SCHEMA)
                .map_err(|source| corrupt_or("schema version", "read schema", source))?
                .ok_or(StoreError::Corrupt {
                    what: "missing schema version",
                })
        })
    }

    /// Sets the schema version (tests of the refusal to open newer schemas).
    #[doc(hidden)]
    pub fn force_schema_version(&self, v: u32) -> Result<(), StoreError> {
        self.write(|h, wtxn| {
            h.schema()
                .put(wtxn, KEY_SCHEMA, &v)
                .map_err(|e| h.write_err("write schema", e))
        })
    }

    /// Fault point for tests: the next `n` commits fail as LMDB does after
    /// a failed meta-page write (MDB_PANIC), and the environment stays
    /// failed, as LMDB's does, until the store reopens it.
    #[doc(hidden)]
    pub fn fail_next_commits(&self, n: u32) {
        self.fail_commits.store(n, Ordering::Release);
    }

    /// What the store can do now. When the last write failed, probes with a
    /// small write (at most once a second) so that health turns good again
    /// once the disk is.
    pub fn health(&self) -> StoreHealth {
        if !self.write_ok.load(Ordering::Acquire) {
            let due = {
                let mut last = lock(&self.last_probe);
                let due = last.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            if due {
                let _ = self.probe();
            }
        }
        let open = match &*read(&self.state) {
            EnvState::Open(h) => !h.poisoned.load(Ordering::Acquire),
            EnvState::Closed { .. } => false,
        };
        let writable = self.write_ok.load(Ordering::Acquire);
        StoreHealth {
            open,
            writable,
            reason: (!writable).then(|| {
                lock(&self.last_error)
                    .clone()
                    .unwrap_or_else(|| "the last write failed".into())
            }),
            reopens: self.reopens.load(Ordering::Relaxed),
        }
    }

    /// One small write transaction (a counter in `meta`): proves the store
    /// can write.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.write(|h, wtxn| {
            let n = match h.meta.get(wtxn, KEY_PROBE) {
                Ok(n) => n.unwrap_or(0),
                // A damaged counter restarts: the probe is the write.
                Err(heed::Error::Decoding(_)) => 0,
                Err(e) => return Err(lmdb("read probe", e)),
            };
            h.meta
                .put(wtxn, KEY_PROBE, &n.wrapping_add(1))
                .map_err(|e| h.write_err("write probe", e))
        })
    }

    /// Runs `f` in one write transaction, committed if it returns Ok and
    /// aborted (nothing written) otherwise.
    fn write<T>(
        &self,
        f: impl FnOnce(&Handle, &mut heed::RwTxn<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = self.with(|h| {
            h.check_fatal("begin write transaction")?;
            let mut wtxn = h
                .env
                .write_txn()
                .map_err(|e| h.write_err("begin write transaction", e))?;
            let out = f(h, &mut wtxn)?;
            let fault = self
                .fail_commits
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
                || crate::sys::fault::once(STORE_COMMIT_FAILS);
            if fault {
                wtxn.abort();
                h.fatal.store(true, Ordering::Release);
                return Err(h.write_err("commit", heed::Error::Mdb(MdbError::Panic)));
            }
            wtxn.commit().map_err(|e| h.write_err("commit", e))?;
            Ok(out)
        });
        if r.is_ok() && !self.write_ok.load(Ordering::Acquire) {
            self.write_ok.store(true, Ordering::Release);
            self.failures.store(0, Ordering::Relaxed);
            *lock(&self.last_error) = None;
            tracing::info!(db = %self.path.display(), "the snapshot database is writable again");
        }
        r
    }

    /// Records a new snapshot with one extent map per disk (same order), in
    /// one transaction. Assigns and returns `record.seq`, which orders it
    /// after every snapshot recorded before.
    pub fn insert(
        &self,
        record: &mut SnapshotRecord,
        maps: &[ExtentMap],
    ) -> Result<u64, StoreError> {
        self.insert_keyed(record, maps, None)
    }

    /// [`Store::insert`], recording in the same transaction that the
    /// idempotency key `key` (of `record.vm`) made this snapshot: a commit
    /// has both or neither. Keys older than [`IDEMPOTENCY_WINDOW`] are
    /// dropped in passing.
    pub fn insert_keyed(
        &self,
        record: &mut SnapshotRecord,
        maps: &[ExtentMap],
        key: Option<&str>,
    ) -> Result<u64, StoreError> {
        if let Some(k) = key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
                return Err(StoreError::BadIdempotencyKey { len: k.len() });
            }
        }
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
        let mut staged = record.clone();
        let seq = self.write(|h, wtxn| {
            // Recorded already (adopted by a rescan of the pool's catalog
            // meanwhile): keep that record, add the key.
            if let Some(existing) = h.get_in(wtxn, &id)? {
                if let Some(k) = key {
                    h.idem
                        .put(
                            wtxn,
                            &(existing.vm.as_str(), k),
                            &(id, staged.created_at_ns),
                        )
                        .map_err(|e| h.write_err("write idempotency key", e))?;
                }
                return Ok(existing.seq);
            }
            let seq = h
                .meta
                .get(wtxn, KEY_NEXT_SEQ)
                .map_err(|e| corrupt_or("sequence number", "read sequence", e))?
                .unwrap_or(1);
            staged.seq = seq;
            let json = serde_json::to_vec(&staged).map_err(|source| StoreError::CorruptRecord {
                id: staged.id.clone(),
                source,
            })?;
            h.meta
                .put(wtxn, KEY_NEXT_SEQ, &(seq + 1))
                .map_err(|e| h.write_err("write sequence", e))?;
            h.snapshots
                .put(wtxn, &id, &json)
                .map_err(|e| h.write_err("write record", e))?;
            h.by_vm
                .put(wtxn, &(staged.vm.as_str(), seq), &id)
                .map_err(|e| h.write_err("write index", e))?;
            for (i, m) in encoded.iter().enumerate() {
                h.maps
                    .put(wtxn, &(id, i as u32), m)
                    .map_err(|e| h.write_err("write extent map", e))?;
            }
            if let Some(k) = key {
                h.drop_expired_keys(wtxn, staged.created_at_ns)?;
                h.idem
                    .put(wtxn, &(staged.vm.as_str(), k), &(id, staged.created_at_ns))
                    .map_err(|e| h.write_err("write idempotency key", e))?;
            }
            Ok(seq)
        })?;
        // Only a committed record gets its sequence number.
        record.seq = seq;
        Ok(seq)
    }

    /// The snapshot id the idempotency key `key` of `vm` made less than
    /// [`IDEMPOTENCY_WINDOW`] before `now_ns`, if any (its snapshot may
    /// have been deleted since: the caller checks).
    pub fn idempotent(
        &self,
        vm: &str,
        key: &str,
        now_ns: u64,
    ) -> Result<Option<String>, StoreError> {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || vm.len() > MAX_VM_NAME {
            return Ok(None);
        }
        self.with(|h| {
            let txn = h.read_txn()?;
            let Some((id, at)) = h
                .idem
                .get(&txn, &(vm, key))
                .map_err(|e| corrupt_or("idempotency entry", "read idempotency key", e))?
            else {
                return Ok(None);
            };
            if now_ns.saturating_sub(at) > IDEMPOTENCY_WINDOW.as_nanos() as u64 {
                return Ok(None);
            }
            Ok(Some(Uuid::from_bytes(id).to_string()))
        })
    }

    /// The record of snapshot `id`, if there is one. An id that is not a
    /// UUID is simply unknown.
    pub fn get(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let Ok(key) = id_key(id) else {
            return Ok(None);
        };
        self.with(|h| {
            let txn = h.read_txn()?;
            h.get_in(&txn, &key)
        })
    }

    /// The extent map of disk number `disk` (index in `record.disks`).
    pub fn map(&self, id: &str, disk: u32) -> Result<ExtentMap, StoreError> {
        let key = id_key(id)?;
        self.with(|h| {
            let txn = h.read_txn()?;
            let raw = h
                .maps
                .get(&txn, &(key, disk))
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
        })
    }

    /// The raw encoded map (benchmarks and size reports).
    pub fn map_bytes(&self, id: &str, disk: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let key = id_key(id)?;
        self.with(|h| {
            let txn = h.read_txn()?;
            Ok(h.maps
                .get(&txn, &(key, disk))
                .map_err(|e| lmdb("read extent map", e))?
                .map(<[u8]>::to_vec))
        })
    }

    /// The snapshots of `vm`, oldest first.
    pub fn list_vm(&self, vm: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        if vm.len() > MAX_VM_NAME {
            return Ok(Vec::new());
        }
        self.with(|h| {
            let txn = h.read_txn()?;
            crate::sys::fault::point(STORE_IN_READ_TXN);
            let iter = h
                .by_vm
                .remap_key_type::<VmPrefix>()
                .prefix_iter(&txn, vm)
                .map_err(|e| lmdb("scan index", e))?
                .remap_key_type::<IndexKey>();
            let mut out = Vec::new();
            for entry in iter {
                let (_, key) = entry.map_err(|e| corrupt_or("index entry", "scan index", e))?;
                match h.get_in(&txn, &key)? {
                    Some(r) => out.push(r),
                    None => {
                        return Err(StoreError::Corrupt {
                            what: "index entry without record",
                        })
                    }
                }
            }
            Ok(out)
        })
    }

    /// Every snapshot record, in no particular order.
    pub fn list_all(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.with(|h| {
            let txn = h.read_txn()?;
            let iter = h
                .snapshots
                .iter(&txn)
                .map_err(|e| lmdb("scan records", e))?;
            let mut out = Vec::new();
            for entry in iter {
                let (key, raw) = entry.map_err(|e| corrupt_or("record key", "scan records", e))?;
                let rec: SnapshotRecord =
                    serde_json::from_slice(raw).map_err(|source| StoreError::CorruptRecord {
                        id: Uuid::from_bytes(key).to_string(),
                        source,
                    })?;
                out.push(rec);
            }
            out.sort_by_key(|r| r.seq);
            Ok(out)
        })
    }

    /// Removes snapshot `id` (record, index entry, maps) in one transaction.
    /// Returns the removed record, or None if there was none.
    pub fn remove(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let Ok(key) = id_key(id) else {
            return Ok(None);
        };
        self.write(|h, wtxn| {
            let Some(rec) = h.get_in(wtxn, &key)? else {
                return Ok(None);
            };
            h.snapshots
                .delete(wtxn, &key)
                .map_err(|e| h.write_err("delete record", e))?;
            h.by_vm
                .delete(wtxn, &(rec.vm.as_str(), rec.seq))
                .map_err(|e| h.write_err("delete index entry", e))?;
            for i in 0..rec.disks.len() {
                h.maps
                    .delete(wtxn, &(key, i as u32))
                    .map_err(|e| h.write_err("delete extent map", e))?;
            }
            Ok(Some(rec))
        })
    }

    /// Forgets every snapshot (the first step of a rebuild from manifests).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.write(|h, wtxn| {
            h.snapshots
                .clear(wtxn)
                .map_err(|e| h.write_err("clear records", e))?;
            h.by_vm
                .clear(wtxn)
                .map_err(|e| h.write_err("clear index", e))?;
            h.maps
                .clear(wtxn)
                .map_err(|e| h.write_err("clear maps", e))?;
            Ok(())
        })
    }
}

impl Handle {
    /// `meta` as it holds the schema version (a u32; the rest are u64).
    fn schema(&self) -> Database<'static, Str, BeU32> {
        self.meta.remap_data_type()
    }

    /// Drops the idempotency keys older than the window (a few per day:
    /// the scan is short).
    fn drop_expired_keys(&self, wtxn: &mut heed::RwTxn<'_>, now_ns: u64) -> Result<(), StoreError> {
        let window = IDEMPOTENCY_WINDOW.as_nanos() as u64;
        // Raw keys: they are only collected and deleted, never looked into.
        let idem = self.idem.remap_key_type::<Bytes>();
        let mut expired = Vec::new();
        for entry in idem
            .iter(wtxn)
            .map_err(|e| lmdb("scan idempotency keys", e))?
        {
            let (k, (_, at)) =
                entry.map_err(|e| corrupt_or("idempotency entry", "scan idempotency keys", e))?;
            if now_ns.saturating_sub(at) > window {
                expired.push(k.to_vec());
            }
        }
        for k in expired {
            idem.delete(wtxn, &k)
                .map_err(|e| self.write_err("drop idempotency key", e))?;
        }
        Ok(())
    }

    fn check_fatal(&self, step: &'static str) -> Result<(), StoreError> {
        if self.fatal.load(Ordering::Acquire) {
            return Err(lmdb(step, heed::Error::Mdb(MdbError::Panic)));
        }
        Ok(())
    }

    fn read_txn(&self) -> Result<heed::RoTxn<'_, WithoutTls>, StoreError> {
        self.check_fatal("begin read transaction")?;
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
}

/// A read error, or [`StoreError::Corrupt`] when the bytes read do not
/// decode as `what` (see [`keys`]).
fn corrupt_or(what: &'static str, step: &'static str, source: heed::Error) -> StoreError {
    match source {
        heed::Error::Decoding(_) => StoreError::Corrupt { what },
        source => lmdb(step, source),
    }
}

fn lmdb(step: &'static str, source: heed::Error) -> StoreError {
    StoreError::Lmdb { step, source }
}

#[cfg(test)]
mod tests;
