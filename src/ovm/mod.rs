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
//! `inventory` assembles the listing from those parts; `files` reads
//! bounded files, beneath a repository's mount with no symlink followed;
//! [`agent_db`] names ovs-agent's files and reads the Manager's address.
//!
//! Callers use the [`Inventory`] trait from [`open_inventory`]. VM names
//! coming from requests are looked up in the listing, never joined into a
//! path.

pub mod agent_db;
pub mod agent_records;
pub mod bdb;
pub mod config;
mod error;
mod files;
mod inventory;
pub mod model;
pub mod pickle;
pub mod probe;
mod source;
pub mod vmcfg;

pub use agent_db::{manager_ip, MANAGER_IP_KEY, MAX_DB_FILE, REPOSITORY_DB, SERVER_DB};
pub use config::{InventoryConfig, InventorySource, StaticDisk, StaticRepository, StaticVm};
pub use error::InventoryError;
pub use inventory::{open_inventory, NodeInventory};
pub use model::{Disk, Repository, RepositoryStatus, Vm};
pub use probe::CloneProbe;
pub use source::Inventory;
