//! `download`: a snapshot's disks into sparse local replicas, as a full copy
//! or as an incremental applied onto a replica of an older snapshot.
//!
//! - Full copy: the snapshot's `chunks` (allocated extents) cut into pieces
//!   of at most [`PIECE_LEN`], one `Range` request per piece, `--jobs` in
//!   flight, each written with `pwrite` at its offset into a fresh sparse
//!   file; holes stay holes.
//! - Incremental (`--diff-from OLD`): the replica is resized to the new
//!   disk size, then the diff is applied: through the incremental stream
//!   endpoint (one request per disk, `crate::wire::stream` decoding) when the
//!   server has it, else (404) from `?compareTo=OLD&zeroed=separate`:
//!   zeroed ranges punched locally, changed ranges fetched by `Range`.
//! - Resume: the state file beside each replica
//!   ([`crate::client::replica::DownloadState`]) is
//!   written before the replica is touched and checkpointed every second
//!   (replica synced first), so a rerun after an interruption fetches only
//!   what is not done, and an incremental is refused on a replica that is
//!   not a complete copy of `OLD`.

mod apply;
mod fetch;
mod options;
mod plan;
mod run;

pub use fetch::PIECE_LEN;
pub use options::{Compress, Options, Transport};
pub use run::{download, DiskReport, Report};
