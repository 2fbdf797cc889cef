//! coriolis-ovm-exporter: per-node incremental disk exporter.
//!
//! Layers, from the bottom (`docs/architecture.md`; a module imports only
//! from layers below it, checked by `scripts/check-layers.sh`):
//! - [`error`], [`extent`], [`tls`], [`duration`]: the leaves (the error
//!   chain and classes; pure extent-map algebra; the crypto provider and
//!   certificate loading; the config file's duration grammar).
//! - [`sys`]: the only place that issues syscalls needing `unsafe`
//!   (FICLONE, the OCFS2 reflink ioctl, FIEMAP, statfs), and the safe-path
//!   layer every path open goes through.
//! - [`wire`]: what client and server agree on: the JSON shapes, the
//!   `Range` grammar and multipart framing, the incremental-stream codec.
//! - [`io`]: the io core: range reads into pooled aligned buffers on
//!   io_uring or a `pread` thread pool, framed by a [`io::Framing`] it is
//!   given.
//! - [`ovm`]: the node inventory (ovs-agent Berkeley DB, pickles, vm.cfg,
//!   `.ovsmeta`, or the static inventory of the config).
//! - [`store`]: snapshot metadata in LMDB (heed).
//! - [`snapshot`]: the snapshot manager: create, diff, delete, reconcile.
//! - [`api`]: routes, auth, disk answers (the wire framings of the io
//!   core's reads), metrics.
//! - [`server`]: TLS listener, connections, signals, logging; the config
//!   file, which puts each layer's own section together.
//! - [`node`]: the glue: the inventory and the snapshot manager as the
//!   API's backend.
//! - [`client`]: the command-line client (`coriolis-ovm-exporter client`),
//!   beside the server side: it uses `wire` and the leaves only.
//! - [`demo`]: the self-contained demo (`coriolis-ovm-exporter demo`).
#![deny(unsafe_code)]

pub mod api;
pub mod client;
pub mod demo;
pub mod duration;
pub mod error;
pub mod extent;
pub mod io;
pub mod node;
pub mod ovm;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod sys;
pub mod tls;
pub mod wire;
