//! What a source of the node's inventory answers: the [`Inventory`] trait
//! the snapshot manager and the API use (`inventory::NodeInventory` is the
//! source of a real node, tests have their own).

use super::error::InventoryError;
use super::model::{Repository, RepositoryStatus, Vm};
use super::probe::CloneProbe;

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
