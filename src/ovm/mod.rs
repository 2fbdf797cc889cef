//! The node inventory: repositories, VMs and their disks.
//!
//! Read from ovs-agent's Berkeley DB files, `vm.cfg` and `.ovsmeta` on an
//! Oracle VM Server, or from the static inventory of the config elsewhere.
//! Everything here reads untrusted bytes and never panics on them.

pub mod model;

pub use model::{Disk, Repository, Vm};
