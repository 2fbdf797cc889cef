//! The wire: everything a client and the server must agree on, and nothing
//! else. The JSON shapes of the API ([`json`]), the HTTP `Range` grammar and
//! `multipart/byteranges` framing ([`range`]), the incremental-stream codec
//! ([`stream`]) and the content types.
//!
//! Pure: no I/O, no HTTP types, no state. Both sides use these same
//! definitions (the server's `api` and `client/`), so a change here is a
//! change of the contract (`shared/design/API.md`,
//! `docs/incremental-stream.md`) and needs a compatibility test. Its only
//! import from the crate is `extent::ByteRange`, the `zeroed` ranges'
//! shape. Conversions from the server's own types (inventory VMs, extent
//! maps) into these live on the server side.

pub mod digest;
pub mod json;
pub mod query;
pub mod range;
pub mod stream;

/// The `{start, length}` of `zeroed` ranges: the extent algebra's own type.
pub use crate::extent::ByteRange;
pub use json::{
    needs_full_copy, Chunk, Disk, ErrorBody, Health, HealthCheck, LoginRequest, LoginResponse,
    Snapshot, SnapshotDisk, Vm, CODE_BASE_CHANGED, CODE_BASE_UNAVAILABLE, CODE_DISK_REPLACED,
};
pub use query::GetOptions;
