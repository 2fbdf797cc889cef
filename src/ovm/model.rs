//! The inventory's model: what the rest of the service knows of a node.
//!
//! Shared contract between the inventory (which fills it) and the snapshot
//! manager and API (which read it). The API's VM JSON is made from these.

use std::path::PathBuf;

/// A storage repository: a mounted filesystem holding VM disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repository {
    /// Repository id (32 hex chars on Oracle VM; any name in a static inventory).
    pub id: String,
    pub mount_point: PathBuf,
    /// Filesystem as ovs-agent or the config names it (`ocfs2`, `nfs`, ...).
    pub filesystem: String,
    pub alias: String,
}

/// How one repository of the inventory fared in the last listing (for
/// health and metrics): a repository that is skipped (not mounted, cannot
/// be read) or cannot clone shows here with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositoryStatus {
    pub id: String,
    /// Mounted and its folders could be read.
    pub readable: bool,
    /// The clone probe passed.
    pub cloneable: bool,
    /// Why not, when not: an OS error or a short description, never a path.
    pub reason: Option<String>,
}

/// A virtual machine and all its disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// The VM id (`name` in vm.cfg, 32 hex chars on Oracle VM): the `{vm}`
    /// of the API.
    pub name: String,
    pub uuid: String,
    pub friendly_name: String,
    /// Every disk of the VM, compatible or not, in vm.cfg order.
    pub disks: Vec<Disk>,
}

impl Vm {
    /// A VM can be snapshotted only when every one of its disks can.
    pub fn snapshot_compatible(&self) -> bool {
        self.disks.iter().all(|d| d.snapshot_compatible)
    }
}

/// One disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The disk's file name (`0004fb...img`): the `{disk}` of the API.
    pub name: String,
    /// Full path of the disk file (or device for `phy:` disks).
    pub path: PathBuf,
    /// Guest device (`xvda`), without a `:cdrom` suffix.
    pub device_name: String,
    /// `w` or `r` as in vm.cfg.
    pub mode: String,
    /// The repository holding the disk file, when there is one.
    pub repository: Option<Repository>,
    /// Whether the disk can be cloned: a file on a repository that passed the
    /// clone probe, a virtual disk (not an ISO or cdrom).
    pub snapshot_compatible: bool,
    /// Why it cannot be snapshotted, for logs and error messages.
    pub incompatible_reason: Option<String>,
}
