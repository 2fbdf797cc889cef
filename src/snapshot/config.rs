//! The `[store]` section of the config file: the database's size, this
//! exporter's owner id, the clone ioctls, the lease on half-made folders.

use serde::Deserialize;

use super::catalog;

/// Where the owner id comes from when the config names none: the machine's
/// stable id (systemd, dbus), then the host name.
const MACHINE_ID_FILES: &[&str] = &["/etc/machine-id", "/var/lib/dbus/machine-id"];
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The `[store]` section of the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// LMDB map size in bytes: the most the database can hold. Default 64 GiB
    /// (address space, not disk).
    pub map_size: u64,
    /// LMDB reader slots (concurrent read transactions). Default 1024.
    pub max_readers: u32,
    /// This exporter's identity, written into every snapshot folder so that
    /// exporters on other nodes sharing a repository never remove each
    /// other's snapshots. Default: `/etc/machine-id`, else the host name.
    pub owner: Option<String>,
    /// Which clone ioctls to use: `"auto"` (`FICLONE`, else OCFS2's
    /// `OCFS2_IOC_REFLINK`) or `"ocfs2-reflink"` (OCFS2's only, as on
    /// UEK4; the tests use it to exercise that ioctl on a real OCFS2).
    pub clone: crate::sys::ClonePolicy,
    /// A maker's lease on its half-made snapshot folders, in seconds: once
    /// a folder has not changed for this long, any node of the pool may
    /// remove it (docs/catalog.md). Default 1800.
    pub lease_seconds: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            map_size: crate::store::DEFAULT_MAP_SIZE as u64,
            max_readers: crate::store::DEFAULT_MAX_READERS,
            owner: None,
            clone: crate::sys::ClonePolicy::Auto,
            lease_seconds: None,
        }
    }
}

impl StoreConfig {
    /// The lease in force (at least one second).
    pub fn lease(&self) -> std::time::Duration {
        self.lease_seconds.map_or(catalog::DEFAULT_LEASE, |s| {
            std::time::Duration::from_secs(s.max(1))
        })
    }

    /// The owner id in force: the configured one or the machine's.
    pub fn owner_id(&self) -> String {
        if let Some(o) = self
            .owner
            .as_deref()
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            return o.to_owned();
        }
        for f in MACHINE_ID_FILES.iter().chain([&HOSTNAME_FILE]) {
            if let Ok(s) = std::fs::read_to_string(f) {
                let s = s.trim();
                if !s.is_empty() {
                    return s.to_owned();
                }
            }
        }
        "localhost".to_owned()
    }
}
