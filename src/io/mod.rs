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
//! The shares above are fair between streams, not between clients: a
//! stream's first buffer may come from anywhere, and one address may open
//! `api.max_connections_per_address` connections (128), each with HTTP/2
//! streams, each stalled stream holding its first buffer until
//! `api.send_timeout` (120 s) cuts it. One address's stalled readers could
//! so hold the whole pool and the overflow, and clients on other addresses
//! would wait on them. So every stream also has an *owner*, an opaque
//! [`Owner`] its caller gives ([`IoEngine::for_owner`]; `api` passes the
//! client's address, an IPv6 client by its /64, the key the connection
//! budget and the login limiter count by), and the buffers of one owner's
//! streams, shared and overflow alike, are bounded by `owner_buffers`
//! ([`owner`]; default half of `pool_buffers + overflow_buffers`, 44 with
//! the defaults). A stream takes its owner's permit before its buffer and
//! gives it back with the buffer (with the last frame made from it): its
//! first buffer waits for a permit of its own owner (it holds no pool buffer
//! meanwhile), a further one is taken only if a permit is free at once. An
//! owner at its bound thus slows down only its own streams, and the rest of
//! the pool and the overflow, at least half of them, stays for everyone
//! else. Half, because an honest client (a Coriolis worker pulling a few
//! disks at once, `read_ahead` buffers each) fits well within it, while a
//! single flooding address leaves as much to the others; several flooding
//! addresses are the connection budget's part (`server::budget`). Reads
//! parked ahead belong to no owner (they are bounded as a whole, above);
//! the stream that adopts one takes its owner's permit for it or drops it.
//!
//! The owner's bound adds no deadlock: a stream waits for its owner's
//! permit only when it has nothing in flight, holding no pool buffer, and
//! the permits it waits for are held by buffers of that owner's other
//! streams, which come back as their reads complete and their clients read
//! their frames, or when `api.send_timeout` cuts a stalled one; none of
//! them waits on the waiting stream (a further buffer never waits for a
//! permit, and a first buffer's wait for the pool is served as argued
//! above, whatever the owners). Each owner's waiting streams are served in
//! turn (tokio's semaphore is FIFO). A client that starts more streams than
//! its bound at once and then reads them only one after the other (the
//! first to its end before the next) would wait on itself until
//! `api.send_timeout` cuts one; clients of parallel streams read them
//! together, as HTTP/2 clients and parallel workers do.
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
pub mod owner;
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
pub use owner::Owner;
