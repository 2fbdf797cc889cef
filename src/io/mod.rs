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
//! A buffered batch whose bytes are all in the page cache skips the
//! backend: the producer copies it itself with `preadv2(RWF_NOWAIT)`, no
//! thread hop and no wakeup (see `producer.rs`).
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
//! ## Memory, and fair sharing of it
//!
//! Every buffer has an owner and a bound. Disk-read memory is at most
//! `(pool_buffers + overflow_buffers) * buffer_size` whatever the clients do
//! ([`config::IoConfig::memory_bound`]; 88 MiB with the defaults), and every
//! stream holds at most `read_ahead` buffers, counting frames already handed
//! to hyper but not yet written (a stream permit rides in each frame's
//! owner). A client that stops reading therefore stalls its own stream and
//! keeps at most its own read-ahead.
//!
//! That alone is not fair: `pool_buffers / read_ahead` stalled streams
//! would hold the whole pool and every new stream would wait on buffers that
//! may never come back. So the pool is shared in three parts
//! ([`buffer::BufferPool::with_shares`]):
//!
//! - a stream's *first* buffer (when it holds none: a new stream, or one
//!   whose frames were all sent) may come from anywhere in the pool;
//! - its further read-ahead buffers only while more than
//!   `reserved_buffers` (default a quarter of the pool) are free, so the
//!   last ones always go to streams that hold none;
//! - when the pool is empty, a stream that holds none gets an *overflow*
//!   buffer, made beyond the pool (at most `overflow_buffers`) and freed
//!   after use.
//!
//! A stream whose frames still wait on its client never takes from the
//! reserve or the overflow: it waits for a buffer above the reserve or for
//! its own frames to go, whichever comes first. The admission cannot
//! deadlock: a stream that waits either holds nothing (and is served by the
//! reserve, the overflow, or the first shared or overflow buffer any stream
//! gives back, waiting in both queues in turn) or waits on its own client.
//! With the defaults, about 75 clients must stall at once before a new
//! stream waits at all, and then it waits for the next buffer a moving
//! stream gives back, or at worst for the first stalled response that
//! `api.send_timeout` cuts (the server's watchdog drops the connection, and
//! with it the frames and their buffers). Reads started ahead for a following request ([`prefetch`])
//! take buffers above the reserve only.
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
pub mod glue;
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
pub use glue::Glue;
