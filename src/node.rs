//! The node: the inventory and the snapshot manager behind the API.
//!
//! This is the glue between layers that do not know each other: the
//! inventory (`ovm`) answers which VMs and disks exist, the snapshot manager
//! (`snapshot`) clones, records and compares them, and the API sees both as
//! one [`Backend`]. Errors pass through typed: each layer's error says its
//! class, and the API maps classes to statuses, once.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{Backend, BackendError};
use crate::ovm::{self, Inventory, InventoryConfig, InventoryError};
use crate::server::Config;
use crate::snapshot::{
    Cancel, DiffConfig, Manager, ReconcileReport, SnapshotError, StoreConfig, VmLookup,
};
use crate::wire::{Disk, GetOptions, HealthCheck, Snapshot, Vm};

/// Why the node could not be opened at start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("config {path}: [{section}]: {message}")]
    Section {
        path: PathBuf,
        section: &'static str,
        message: String,
    },
    #[error("the inventory cannot be opened")]
    Inventory(#[source] InventoryError),
    #[error("the snapshot database cannot be opened")]
    Snapshot(#[source] SnapshotError),
}

/// The inventory as the snapshot manager's VM lookup.
struct Lookup(Arc<dyn Inventory>);

impl VmLookup for Lookup {
    fn vm(&self, name: &str) -> Result<Option<ovm::Vm>, InventoryError> {
        self.0.vm(name)
    }
}

/// The node's inventory and snapshots.
pub struct Node {
    inventory: Arc<dyn Inventory>,
    manager: Manager,
    manager_endpoint: Option<String>,
}

/// Parses one raw section of the config into its layer's typed config.
pub fn section<T: serde::de::DeserializeOwned + Default>(
    config: &Config,
    name: &'static str,
    table: &toml::Table,
) -> Result<T, NodeError> {
    if table.is_empty() {
        return Ok(T::default());
    }
    toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| NodeError::Section {
            path: config.path.clone(),
            section: name,
            message: e.message().to_owned(),
        })
}

impl Node {
    /// Opens the inventory and the snapshot database the config names, and
    /// reconciles the database with the repositories (SEMANTICS.md §3).
    pub fn open(config: &Config) -> Result<Node, NodeError> {
        let node = Node::open_only(config)?;
        if let Err(e) = node.reconcile() {
            // Logged, never fatal: the API stays up to serve what is intact.
            tracing::error!(error = %error_chain(&e), "reconcile failed");
        }
        Ok(node)
    }

    /// Opens the node without reconciling (for the `reconcile` and
    /// `rebuild-db` subcommands, which report what they do).
    pub fn open_only(config: &Config) -> Result<Node, NodeError> {
        let inv_cfg: InventoryConfig = section(config, "inventory", &config.inventory)?;
        inv_cfg.validate().map_err(|message| NodeError::Section {
            path: config.path.clone(),
            section: "inventory",
            message,
        })?;
        let store_cfg: StoreConfig = section(config, "store", &config.store)?;
        let diff_cfg: DiffConfig = section(config, "diff", &config.diff)?;
        crate::sys::clone::set_policy(store_cfg.clone);
        let inventory = ovm::open_inventory(&inv_cfg).map_err(NodeError::Inventory)?;
        let manager = Manager::open(
            &config.db_file,
            &store_cfg,
            Arc::new(Lookup(inventory.clone())),
        )
        .map_err(NodeError::Snapshot)?
        .with_exact(diff_cfg.exact);
        let manager_endpoint = match ovm::manager_ip(&inv_cfg.ovs_agent_db_dir) {
            Ok(Some(ip)) => Some(manager_url(&ip)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot read the Manager address from ovs-agent");
                None
            }
        };
        Ok(Node {
            inventory,
            manager,
            manager_endpoint,
        })
    }

    fn repository_mounts(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        self.inventory
            .repositories()
            .map(|r| r.into_iter().map(|r| r.mount_point).collect())
            .map_err(SnapshotError::Inventory)
    }

    /// Reconciles the database with every usable repository: half-made
    /// folders removed, records whose files vanished dropped, complete
    /// folders without a record adopted. Each action is logged.
    pub fn reconcile(&self) -> Result<ReconcileReport, SnapshotError> {
        let report = self.manager.reconcile(&self.repository_mounts()?)?;
        tracing::info!(
            kept = report.kept,
            actions = report.actions.len(),
            "reconciled snapshots with repositories"
        );
        Ok(report)
    }

    /// Forgets every record and rebuilds the database from the manifests on
    /// the repositories.
    pub fn rebuild(&self) -> Result<ReconcileReport, SnapshotError> {
        self.manager.rebuild(&self.repository_mounts()?)
    }

    fn model_vm(&self, vm: &str) -> Result<ovm::Vm, BackendError> {
        self.inventory
            .vm(vm)?
            .ok_or_else(|| BackendError::NotFound(format!("VM {vm} not found")))
    }
}

/// `https://<ip>:7002`, bracketing IPv6 addresses.
fn manager_url(ip: &str) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("https://[{ip}]:7002")
    } else {
        format!("https://{ip}:7002")
    }
}

pub use crate::error::chain as error_chain;

impl Backend for Node {
    fn list_vms(&self) -> Result<Vec<Vm>, BackendError> {
        let vms = self.inventory.vms()?;
        // One catalog refresh for the whole list.
        let ids = self.manager.ids_of(vms.iter().map(|vm| vm.name.as_str()))?;
        Ok(vms
            .iter()
            .zip(ids)
            .map(|(vm, ids)| vm_json(vm, ids))
            .collect())
    }

    fn get_vm(&self, vm: &str) -> Result<Vm, BackendError> {
        let m = self.model_vm(vm)?;
        Ok(vm_json(&m, self.manager.ids(&m.name)?))
    }

    fn list_snapshots(&self, vm: &str, _squash: bool) -> Result<Vec<Snapshot>, BackendError> {
        // API.md: the list always answers squashed chunks.
        Ok(self.manager.list(vm)?)
    }

    fn create_snapshot(&self, vm: &str) -> Result<Snapshot, BackendError> {
        Ok(self.manager.create(vm)?)
    }

    fn create_snapshot_keyed(&self, vm: &str, key: &str) -> Result<(Snapshot, bool), BackendError> {
        Ok(self.manager.create_keyed(vm, Some(key))?)
    }

    fn get_snapshot(
        &self,
        vm: &str,
        snap: &str,
        options: &GetOptions,
        cancel: &Cancel,
    ) -> Result<Snapshot, BackendError> {
        Ok(self.manager.get_cancellable(vm, snap, options, cancel)?)
    }

    fn delete_snapshot(&self, vm: &str, snap: &str) -> Result<(), BackendError> {
        Ok(self.manager.delete(vm, snap)?)
    }

    fn purge_snapshots(&self, vm: &str) -> Result<(), BackendError> {
        self.manager.purge(vm)?;
        Ok(())
    }

    fn open_disk(&self, vm: &str, snap: &str, disk: &str) -> Result<(File, u64), BackendError> {
        Ok(self.manager.open_disk(vm, snap, disk)?)
    }

    fn manager_endpoint(&self) -> Option<String> {
        self.manager_endpoint.clone()
    }

    fn health(&self) -> Vec<HealthCheck> {
        let store = self.manager.store().health();
        let mut checks = vec![HealthCheck::new(
            "store",
            None,
            "writable",
            store.open && store.writable,
            Some(
                store
                    .reason
                    .unwrap_or_else(|| "the database is being reopened".into()),
            ),
        )];
        match self.inventory.repository_status() {
            Ok(repos) => {
                for r in repos {
                    let id = Some(r.id.as_str());
                    checks.push(HealthCheck::new(
                        "repository",
                        id,
                        "readable",
                        r.readable,
                        r.reason.clone(),
                    ));
                    checks.push(HealthCheck::new(
                        "repository",
                        id,
                        "cloneable",
                        r.cloneable,
                        r.reason,
                    ));
                }
            }
            Err(e) => {
                // The details name host paths: the log has them, the public
                // answer does not.
                tracing::warn!(error = %error_chain(&e), "health: the inventory cannot be read");
                checks.push(HealthCheck::new(
                    "inventory",
                    None,
                    "readable",
                    false,
                    Some("the inventory cannot be read (see the service log)".into()),
                ))
            }
        }
        checks
    }
}

/// The API view of an inventory VM with its snapshot ids (oldest first).
fn vm_json(vm: &ovm::Vm, snapshots: Vec<String>) -> Vm {
    Vm {
        friendly_name: vm.friendly_name.clone(),
        name: vm.name.clone(),
        uuid: vm.uuid.clone(),
        disks: vm
            .disks
            .iter()
            .map(|d| Disk {
                name: d.name.clone(),
                path: d.path.to_string_lossy().into_owned(),
                device_name: d.device_name.clone(),
                snapshot_compatible: d.snapshot_compatible,
                mode: d.mode.clone(),
            })
            .collect(),
        snapshot_compatible: vm.snapshot_compatible(),
        snapshots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;

    #[test]
    fn manager_url_brackets_ipv6() {
        assert_eq!(manager_url("10.0.0.5"), "https://10.0.0.5:7002");
        assert_eq!(manager_url("fd00::5"), "https://[fd00::5]:7002");
    }

    #[test]
    fn snapshot_errors_map_to_http_classes() {
        // The classes are decided beside the error type, the statuses by
        // the api's one table: checked here through both, as the node
        // passes them.
        let answer = |e: SnapshotError| ApiError::from(BackendError::from(e));
        let nf = answer(SnapshotError::NotFound {
            what: "snapshot x".into(),
        });
        assert!(matches!(nf, ApiError::NotFound(m) if m.contains("snapshot x")));
        let inc = answer(SnapshotError::Incompatible {
            disk: "d".into(),
            reason: "phy".into(),
        });
        assert!(matches!(inc, ApiError::BadRequest(_)));
        let base = answer(SnapshotError::BaseChanged {
            id: "a".into(),
            disk: "d".into(),
            cause: crate::snapshot::Unverified::Open(std::io::Error::other("inode")),
        });
        assert!(
            matches!(&base, ApiError::Coded { code: "base_changed", inner } if matches!(**inner, ApiError::Conflict(_)))
        );
        assert_eq!(base.status().0, http::StatusCode::CONFLICT);
        let gone = answer(SnapshotError::BaseUnavailable {
            id: "a".into(),
            reason: "deleted".into(),
        });
        assert_eq!(gone.status().0, http::StatusCode::NOT_FOUND);
        let resp = gone.into_response();
        assert_eq!(resp.status(), http::StatusCode::NOT_FOUND);
        let replaced = answer(SnapshotError::DiskReplaced {
            id: "a".into(),
            disk: "d".into(),
        });
        assert!(matches!(
            &replaced,
            ApiError::Coded {
                code: "disk_replaced",
                ..
            }
        ));
        assert_eq!(replaced.status().0, http::StatusCode::CONFLICT);
        let lost = answer(SnapshotError::LeaseLost { id: "a".into() });
        assert!(matches!(lost, ApiError::Unavailable(_)));
    }
}
