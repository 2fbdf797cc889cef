//! The io core: reads byte ranges of disk files into pooled, page-aligned
//! buffers and hands them out as `bytes::Bytes` response frames.
//!
//! ```text
//!  HTTP handler ──► IoEngine::read / read_ranges / read_framed(Framing)
//!                        │ plans batches (aligned segments into one buffer)
//!                        ▼
//!  producer task ──► ReadBackend::submit(Batch) ──► io_uring ring thread
//!   (per stream,          ▲                        or pread thread pool
//!    bounded read-ahead)  └── oneshot BatchDone ◄──┘
//!        │ frames (slices of the buffer, no copy), framing bytes
//!        ▼
//!  ReadStream (a `Stream` of `Result<Bytes, IoError>`) ──► hyper body
//! ```
//!
//! Two backends implement [`ReadBackend`]: [`uring`] (the `io-uring` crate
//! driven by dedicated ring threads that complete into channels, so it works
//! under a multi-thread tokio network runtime) and [`threads`] (`pread` on a
//! thread pool, for kernels without io_uring or where it is refused). Which
//! one runs is decided once, by [`IoEngine::start`], and logged with why.
//!
//! Files are read with `O_DIRECT` where the filesystem accepts it, so an
//! export of a multi-terabyte disk does not evict the page cache of the VMs
//! running next to it. Arbitrary byte ranges are served by reading the
//! [`buffer::ALIGN`]-aligned superset and slicing the frame. When the open or
//! a read fails with `EINVAL` (a filesystem or device that refuses direct
//! I/O, or a larger logical block size), the file falls back to buffered
//! reads, once, with a warning.
//!
//! `O_DIRECT` reads get no kernel read-ahead; [`prefetch`] starts the reads
//! of the next range when a client reads a file in consecutive ranges.
//!
//! Memory is bounded twice: the [`buffer::BufferPool`] caps all buffers of
//! the process, and every stream holds at most `read_ahead` buffers,
//! counting frames already handed to hyper but not yet written (a stream
//! permit rides in each frame's owner). A slow client therefore stalls its
//! own stream, not the process.
//!
//! The io core knows no wire format: a [`Framing`] given by the caller
//! (`api` adapts the multipart and incremental-stream codecs of `wire`)
//! says which bytes go around each range's data.
//!
//! This module does no path lookup (callers pass paths they resolved from
//! ids) and never blocks a tokio worker on disk I/O.

pub mod backend;
pub mod buffer;
pub mod config;
pub mod engine;
pub mod error;
mod file;
pub mod framing;
mod inflight;
mod planner;
pub mod prefetch;
mod producer;
mod shared;
pub mod threads;
pub mod uring;

pub use backend::{Batch, BatchDone, ReadBackend, Segment};
pub use config::{
    BackendChoice, BackendKind, IoConfig, DEFAULT_BUFFER_SIZE, DEFAULT_POOL_BUFFERS,
    DEFAULT_READ_AHEAD, DEFAULT_RINGS, DEFAULT_RING_ENTRIES, DEFAULT_THREADS, MAX_BUFFER_SIZE,
};
pub use engine::{IoEngine, ReadStream};
pub use error::IoError;
pub use file::DiskFile;
pub use framing::Framing;
