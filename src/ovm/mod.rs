//! The node inventory: repositories, VMs and their disks.
//!
//! Read from ovs-agent's Berkeley DB files ([`bdb`], [`pickle`],
//! [`agent_records`]), `vm.cfg`
//! and `.ovsmeta` ([`vmcfg`]) on an Oracle VM Server, or from the static
//! inventory of the config ([`config`]) elsewhere. Whether a repository can
//! clone is probed ([`probe`]), not guessed. Everything here reads untrusted
//! bytes and never panics on them; a broken repository or VM is logged and
//! skipped, never fails the whole listing.
//!
//! Callers use the [`Inventory`] trait from [`open_inventory`]. VM names
//! coming from requests are looked up in the listing, never joined into a
//! path.

pub mod agent_records;
pub mod bdb;
pub mod config;
mod inventory;
pub mod model;
pub mod pickle;
pub mod probe;
pub mod vmcfg;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Class, Classify};

pub use config::{InventoryConfig, InventorySource, StaticDisk, StaticRepository, StaticVm};
pub use inventory::NodeInventory;
pub use model::{Disk, Repository, RepositoryStatus, Vm};
pub use probe::CloneProbe;

/// File name of ovs-agent's repository database in its db folder.
pub const REPOSITORY_DB: &str = "repository";
/// File name of ovs-agent's server database in its db folder.
pub const SERVER_DB: &str = "server";
/// Key of the Manager's address in the server database.
pub const MANAGER_IP_KEY: &[u8] = b"manager_ip";
/// Largest ovs-agent database file read (they hold a few KiB to MiB).
pub const MAX_DB_FILE: u64 = 256 << 20;

/// The errors of the inventory layer.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("invalid inventory configuration: {0}")]
    Config(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is not a readable Berkeley DB hash database")]
    Db {
        path: PathBuf,
        #[source]
        source: bdb::BdbError,
    },
    #[error("{path}: the value of key {key:?} is not usable")]
    Record {
        path: PathBuf,
        key: String,
        #[source]
        source: agent_records::RecordError,
    },
}

impl Classify for InventoryError {
    fn class(&self) -> Class {
        Class::Internal
    }
}

/// What the snapshot manager and the API know of the node.
pub trait Inventory: Send + Sync {
    /// Every VM, sorted by name, each with every disk (compatible or not).
    fn vms(&self) -> Result<Vec<Vm>, InventoryError>;
    /// The VM named `name` (its id), if listed.
    fn vm(&self, name: &str) -> Result<Option<Vm>, InventoryError>;
    /// Every usable repository (mounted and readable), sorted by id.
    fn repositories(&self) -> Result<Vec<Repository>, InventoryError>;
    /// The clone probe of each usable repository, for health and
    /// diagnostics (filesystem type, method, error). Probes are cached.
    fn clone_probes(&self) -> Result<Vec<(Repository, CloneProbe)>, InventoryError> {
        Ok(Vec::new())
    }
    /// Every repository the inventory names, usable or skipped, as the
    /// last listing found it (health and metrics).
    fn repository_status(&self) -> Result<Vec<RepositoryStatus>, InventoryError> {
        Ok(self
            .clone_probes()?
            .into_iter()
            .map(|(r, p)| RepositoryStatus {
                id: r.id,
                readable: true,
                cloneable: p.can_clone,
                reason: p.error,
            })
            .collect())
    }
}

/// Opens the inventory the config describes. With `source = "auto"`, the
/// ovs-agent databases are used when `<ovs_agent_db_dir>/repository`
/// exists, else the static inventory.
pub fn open_inventory(cfg: &InventoryConfig) -> Result<Arc<dyn Inventory>, InventoryError> {
    Ok(Arc::new(NodeInventory::open(cfg)?))
}

pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, InventoryError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|source| InventoryError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
    if buf.len() as u64 > max {
        return Err(InventoryError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(buf)
}

/// A file beneath a repository's mount point, opened with no symlink in
/// any component and nothing outside the mount ([`crate::sys::path::resolve_beneath`]):
/// `path` must lie beneath `mount`. The errors say which rule refused it.
pub(crate) fn open_beneath(mount: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    let rel = path.strip_prefix(mount).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not beneath the repository's mount point {}",
                mount.display()
            ),
        )
    })?;
    let dir = crate::sys::path::open_dir(mount)?;
    let fd = crate::sys::path::resolve_beneath(std::os::fd::AsFd::as_fd(&dir), rel).map_err(|e| {
        match e.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::LOOP.raw_os_error()
                    || code == rustix::io::Errno::XDEV.raw_os_error()
                    || code == rustix::io::Errno::NOTDIR.raw_os_error() =>
            {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "a component of the path is a symlink or leads out of {} (not followed): {e}",
                        mount.display()
                    ),
                )
            }
            _ => e,
        }
    })?;
    Ok(std::fs::File::from(fd))
}

/// [`read_bounded`] of a file beneath a repository's mount, through
/// [`open_beneath`] (vm.cfg, `.ovsmeta`: a symlink in any component is not
/// followed).
pub(crate) fn read_bounded_beneath(
    mount: &Path,
    path: &Path,
    max: u64,
) -> Result<Vec<u8>, InventoryError> {
    use std::io::Read;
    let read = |source| InventoryError::Read {
        path: path.to_owned(),
        source,
    };
    let f = open_beneath(mount, path).map_err(read)?;
    if !f.metadata().map_err(read)?.is_file() {
        return Err(read(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf).map_err(read)?;
    if buf.len() as u64 > max {
        return Err(InventoryError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(buf)
}

/// The OVM Manager's address recorded by ovs-agent (`manager_ip` in
/// `<db_dir>/server`). `None` when the file or the key is absent (a node
/// not yet owned by a Manager).
pub fn manager_ip(db_dir: &Path) -> Result<Option<String>, InventoryError> {
    let path = db_dir.join(SERVER_DB);
    let bytes = match read_bounded(&path, MAX_DB_FILE) {
        Ok(b) => b,
        Err(InventoryError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let db = bdb::HashDb::open(&bytes).map_err(|source| InventoryError::Db {
        path: path.clone(),
        source,
    })?;
    let Some(value) = db
        .get(MANAGER_IP_KEY)
        .map_err(|source| InventoryError::Db {
            path: path.clone(),
            source,
        })?
    else {
        return Ok(None);
    };
    let ip =
        agent_records::manager_ip_from_pickle(&value).map_err(|source| InventoryError::Record {
            path,
            key: "manager_ip".into(),
            source,
        })?;
    let ip = ip.trim();
    Ok((!ip.is_empty()).then(|| ip.to_owned()))
}
