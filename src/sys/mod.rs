//! The syscall layer: the safe-path layer (every path open, `openat`-style),
//! reflink clones, FIEMAP, statfs, fault points.
//!
//! This is the only module allowed `unsafe` for syscalls; every block says
//! why it is sound. Its ioctls (FIEMAP, the OCFS2 reflink) go through one
//! [`rustix::ioctl::Ioctl`] implementation (`ioctl.rs`). Everything here
//! blocks (a clone of a big file can take seconds): callers run it on a
//! blocking pool, never on an event loop.
//! The byte layouts the kernel reads and writes are parsed and built by pure
//! functions ([`fiemap::parse`], [`clone::Ocfs2ReflinkArgs::encode`]) so they
//! can be tested and fuzzed without a filesystem.

pub mod clone;
pub mod fault;
pub mod fiemap;
mod ioctl;
pub mod memory;
pub mod path;
pub mod socket;
pub mod statfs;

pub use clone::{reflink, CloneError, CloneMethod, ClonePolicy};
pub use fiemap::{extent_map, FiemapError};
pub use statfs::{fs_type, FsType};
