//! The `[inventory]` table of the config file: where the inventory comes
//! from, and the static inventory of hosts without ovs-agent.
//!
//! This module owns the shape, defaults and validation of that table; it
//! reads no file itself. Example:
//!
//! ```toml
//! [inventory]
//! source = "auto"                       # auto | ovs-agent | static
//! ovs_agent_db_dir = "/etc/ovs-agent/db"
//! # check_mounted = true                # ovs-agent repositories must be mounted
//!
//! [[inventory.repositories]]
//! id = "local-xfs"
//! mount_point = "/srv/vms"
//! # filesystem = "xfs"                  # optional, for display only
//! # alias = "Local XFS"                 # optional, defaults to the id
//! # discover_vms = true                 # scan <mount>/VirtualMachines/*/vm.cfg
//!
//! [[inventory.vms]]
//! name = "web01"
//! # uuid = "..."                        # optional, defaults to ""
//! # friendly_name = "Web server"        # optional, defaults to the name
//! disks = [
//!   { path = "/srv/vms/VirtualDisks/web01.img", device_name = "xvda" },
//!   { path = "/srv/vms/ISOs/install.iso", device_name = "xvdb", cdrom = true, mode = "r" },
//! ]
//! ```

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

/// ovs-agent's database folder on Oracle VM Server.
pub const DEFAULT_OVS_AGENT_DB_DIR: &str = "/etc/ovs-agent/db";

/// Where the inventory is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InventorySource {
    /// ovs-agent's databases when `<ovs_agent_db_dir>/repository` exists,
    /// else the static inventory.
    #[default]
    Auto,
    /// ovs-agent's databases (Oracle VM Server); the static lists are
    /// ignored (with a warning when not empty).
    #[serde(alias = "ovs_agent")]
    OvsAgent,
    /// Only the static `repositories` and `vms` of this table.
    Static,
}

/// The `[inventory]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InventoryConfig {
    /// `source`: `auto` (default), `ovs-agent` or `static`.
    pub source: InventorySource,
    /// `ovs_agent_db_dir`: the folder holding ovs-agent's Berkeley DB files
    /// `repository` and `server`. Default `/etc/ovs-agent/db`.
    pub ovs_agent_db_dir: PathBuf,
    /// `check_mounted`: with ovs-agent, skip (with a warning) a repository
    /// whose mount point is not a mounted filesystem, so that nothing is
    /// written into the empty folder an unmounted repository leaves behind.
    /// Default true; false only for test trees.
    pub check_mounted: bool,
    /// `[[inventory.repositories]]`: the static repositories.
    pub repositories: Vec<StaticRepository>,
    /// `[[inventory.vms]]`: VMs listed explicitly, with their disks.
    pub vms: Vec<StaticVm>,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            source: InventorySource::Auto,
            ovs_agent_db_dir: PathBuf::from(DEFAULT_OVS_AGENT_DB_DIR),
            check_mounted: true,
            repositories: Vec::new(),
            vms: Vec::new(),
        }
    }
}

/// A repository of the static inventory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRepository {
    /// `id`: any unique name (Oracle VM uses 32 hex chars).
    pub id: String,
    /// `mount_point`: absolute path of the repository's root; snapshots go
    /// to `<mount_point>/CoriolisSnapshots`.
    pub mount_point: PathBuf,
    /// `filesystem`: shown as the repository's filesystem; when absent, the
    /// one detected at the mount point is shown. Never decides whether
    /// clones work (a probe clone does).
    #[serde(default)]
    pub filesystem: Option<String>,
    /// `alias`: a friendly name; defaults to the id.
    #[serde(default)]
    pub alias: Option<String>,
    /// `discover_vms`: list the VMs of `<mount_point>/VirtualMachines/*/vm.cfg`
    /// (default true).
    #[serde(default = "yes")]
    pub discover_vms: bool,
}

fn yes() -> bool {
    true
}

fn default_mode() -> String {
    "w".to_owned()
}

/// A VM of the static inventory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticVm {
    /// `name`: the VM's id in the API (`/vms/{name}`), unique.
    pub name: String,
    /// `uuid`: optional, defaults to "".
    #[serde(default)]
    pub uuid: Option<String>,
    /// `friendly_name`: optional, defaults to the name.
    #[serde(default)]
    pub friendly_name: Option<String>,
    /// `disks`: the VM's disks, in order.
    #[serde(default)]
    pub disks: Vec<StaticDisk>,
}

/// A disk of a static VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticDisk {
    /// `path`: absolute path of the disk file; it belongs to the static
    /// repository whose `.ovsmeta` names it, else whose mount point holds it.
    pub path: PathBuf,
    /// `device_name`: guest device (`xvda`, `vda`...).
    pub device_name: String,
    /// `mode`: `w` (default) or `r`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `cdrom`: a cdrom drive, never snapshotted (default false).
    #[serde(default)]
    pub cdrom: bool,
}

impl InventoryConfig {
    /// Checks what serde cannot: absolute paths, unique and non-empty ids
    /// and names. The message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.ovs_agent_db_dir.is_absolute() {
            return Err(format!(
                "inventory.ovs_agent_db_dir must be an absolute path, not {:?}",
                self.ovs_agent_db_dir
            ));
        }
        let mut ids = HashSet::new();
        for (i, r) in self.repositories.iter().enumerate() {
            if r.id.is_empty() {
                return Err(format!("inventory.repositories[{i}].id is empty"));
            }
            if !ids.insert(&r.id) {
                return Err(format!(
                    "inventory.repositories[{i}].id {:?} is used twice",
                    r.id
                ));
            }
            if !r.mount_point.is_absolute() {
                return Err(format!(
                    "inventory.repositories[{i}].mount_point must be an absolute path, not {:?}",
                    r.mount_point
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, v) in self.vms.iter().enumerate() {
            if v.name.is_empty() {
                return Err(format!("inventory.vms[{i}].name is empty"));
            }
            if !names.insert(&v.name) {
                return Err(format!(
                    "inventory.vms[{i}].name {:?} is used twice",
                    v.name
                ));
            }
            for (j, d) in v.disks.iter().enumerate() {
                if !d.path.is_absolute() {
                    return Err(format!(
                        "inventory.vms[{i}].disks[{j}].path must be an absolute path, not {:?}",
                        d.path
                    ));
                }
                if d.path.file_name().is_none() {
                    return Err(format!(
                        "inventory.vms[{i}].disks[{j}].path {:?} has no file name",
                        d.path
                    ));
                }
            }
        }
        Ok(())
    }
}
