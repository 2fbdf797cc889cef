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

pub mod buffer;
pub mod prefetch;
pub mod threads;
pub mod uring;

use crate::error::chain as error_chain;
use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use rustix::fs::{Mode, OFlags};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use buffer::{BufferPool, PooledBuf, ALIGN};
use prefetch::{FileKey, Parking, PrefetchStats};

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// io_uring when the probe accepts it, else threads.
    #[default]
    Auto,
    /// io_uring or fail to start.
    IoUring,
    /// The `pread` thread pool.
    Threads,
}

/// The backend actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    IoUring,
    Threads,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::IoUring => "io_uring",
            BackendKind::Threads => "threads",
        })
    }
}

/// Default buffer (and largest frame) size: 1 MiB frames stream far faster
/// through hyper and TLS than small ones (ARCHITECTURE.md).
pub const DEFAULT_BUFFER_SIZE: usize = 1 << 20;
/// Default buffers per stream: 4 MiB in flight keeps a disk and a 10 Gbit/s
/// link busy while 16 streams stay under 64 MiB.
pub const DEFAULT_READ_AHEAD: usize = 4;
/// Default buffers in the whole process (64 MiB at the default size).
pub const DEFAULT_POOL_BUFFERS: usize = 64;
/// Default `pread` threads: enough outstanding reads to keep an SSD queue
/// busy; they sleep in the kernel, so more threads than cores is right.
pub const DEFAULT_THREADS: usize = 16;
/// Default ring threads: one ring keeps many reads in flight by itself.
pub const DEFAULT_RINGS: usize = 1;
/// Default submission queue entries per ring.
pub const DEFAULT_RING_ENTRIES: u32 = 256;
/// Largest accepted buffer: a read's length is a `u32` in an SQE, and frames
/// past 16 MiB only add latency.
pub const MAX_BUFFER_SIZE: usize = 16 << 20;
/// Frames at most this long are copied into a shared frame with their
/// neighbours instead of being sent alone: record headers and small ranges
/// would otherwise become one TLS record and one write each.
const COALESCE_MAX: usize = 16 << 10;
/// Size at which a frame of coalesced small pieces is sent.
const COALESCE_TARGET: usize = 256 << 10;
/// Channel slots between a producer and its [`ReadStream`]; memory is
/// bounded by the stream permits, this only bounds message count.
const CHANNEL_SLOTS: usize = 64;

/// The `[io]` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoConfig {
    /// `auto` (default), `io_uring` or `threads`.
    pub backend: BackendChoice,
    /// Read with `O_DIRECT` where accepted (default true).
    pub direct_io: bool,
    /// Bytes per buffer (multiple of 4096, at most 16 MiB).
    pub buffer_size: usize,
    /// Buffers one stream may hold (in flight plus unsent frames).
    pub read_ahead: usize,
    /// Start the reads of the next range before it is asked for, when a
    /// client reads a file in consecutive ranges with `O_DIRECT` (which
    /// gets no kernel read-ahead): see [`prefetch`]. Default true.
    pub prefetch: bool,
    /// Buffers in the whole process.
    pub pool_buffers: usize,
    /// Threads of the `threads` backend.
    pub threads: usize,
    /// Ring threads of the `io_uring` backend.
    pub rings: usize,
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Hand every io_uring read to the kernel's io-wq workers
    /// (`IOSQE_ASYNC`) instead of trying it inline in the ring thread
    /// (default true: the ring thread never blocks; see
    /// `uring::UringBackend::start`).
    pub uring_async: bool,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            backend: BackendChoice::Auto,
            direct_io: true,
            buffer_size: DEFAULT_BUFFER_SIZE,
            read_ahead: DEFAULT_READ_AHEAD,
            prefetch: true,
            pool_buffers: DEFAULT_POOL_BUFFERS,
            threads: DEFAULT_THREADS,
            rings: DEFAULT_RINGS,
            ring_entries: DEFAULT_RING_ENTRIES,
            uring_async: true,
        }
    }
}

impl IoConfig {
    pub fn validate(&self) -> Result<(), IoError> {
        let bad = |what: &'static str| Err(IoError::Config(what));
        if self.buffer_size == 0
            || self.buffer_size % ALIGN != 0
            || self.buffer_size > MAX_BUFFER_SIZE
        {
            return bad("buffer_size must be a non-zero multiple of 4096 up to 16 MiB");
        }
        if self.read_ahead == 0 || self.pool_buffers < self.read_ahead {
            return bad("read_ahead must be at least 1 and pool_buffers at least read_ahead");
        }
        if self.threads == 0 || self.rings == 0 || self.ring_entries < 2 {
            return bad("threads and rings must be at least 1, ring_entries at least 2");
        }
        Ok(())
    }
}

/// Errors of the io core, one variant per failed step.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("invalid io config: {0}")]
    Config(&'static str),
    #[error("io_uring is unavailable: {reason}")]
    UringUnavailable {
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("cannot start the {0} backend thread")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("range {start}..{end} is not inside the {size}-byte file")]
    OutOfBounds { start: u64, end: u64, size: u64 },
    /// A framing refused its plan (the wire format's own error inside).
    #[error("invalid stream plan: {0}")]
    Plan(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("read of {len} bytes at {offset} failed")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("file ended at {at} while reading up to {wanted} (truncated while streaming?)")]
    ShortRead { at: u64, wanted: u64 },
    #[error("the io backend stopped")]
    BackendGone,
    #[error("streams need a tokio runtime")]
    NoRuntime,
}

/// One read of a [`Batch`]: `len` bytes of the file at `file_offset` into
/// `buf[buf_offset..buf_offset + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

/// Work for a backend: fill segments of one buffer from one file.
pub struct Batch {
    pub file: Arc<File>,
    /// Whether `file` was opened with `O_DIRECT`.
    pub direct: bool,
    pub buf: PooledBuf,
    pub segments: Vec<Segment>,
    pub reply: oneshot::Sender<BatchDone>,
}

/// A finished [`Batch`]: the buffer back, and per segment the bytes read
/// (fewer than asked only at end of file) or the error.
pub struct BatchDone {
    pub buf: PooledBuf,
    pub results: Vec<std::io::Result<usize>>,
}

/// A read backend. `submit` never blocks on disk I/O; the backend answers on
/// `batch.reply` (dropping it unanswered only when it is shutting down).
/// Each segment is read completely unless end of file comes first.
pub trait ReadBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;
    fn submit(&self, batch: Batch);
}

/// An open disk file, ready for streams. Cheap to clone.
#[derive(Clone)]
pub struct DiskFile {
    inner: Arc<FileInner>,
}

struct FileInner {
    path: PathBuf,
    size: u64,
    key: FileKey,
    buffered: Arc<File>,
    /// The `O_DIRECT` descriptor, when the open accepted it.
    direct: Option<Arc<File>>,
    /// Cleared for good when a direct read fails with `EINVAL`.
    use_direct: AtomicBool,
}

impl DiskFile {
    /// Size in bytes when opened.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Whether reads currently go through `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.inner.direct.is_some() && self.inner.use_direct.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn reader(&self) -> (Arc<File>, bool) {
        match &self.inner.direct {
            Some(d) if self.inner.use_direct.load(Ordering::Relaxed) => (Arc::clone(d), true),
            _ => (Arc::clone(&self.inner.buffered), false),
        }
    }

    fn give_up_direct(&self, err: &std::io::Error) {
        if self.inner.use_direct.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                path = %self.inner.path.display(),
                error = %err,
                "O_DIRECT read refused; this file falls back to buffered reads"
            );
        }
    }
}

/// The io core. Cheap to clone; every clone shares the backend and pool.
#[derive(Clone)]
pub struct IoEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    backend: Box<dyn ReadBackend>,
    pool: BufferPool,
    cfg: IoConfig,
    /// Reads started ahead of the request that will want them.
    parking: Parking,
}

impl IoEngine {
    /// Starts the configured backend. `auto` probes io_uring (a ring and an
    /// opcode probe) and falls back to threads on any refusal; the log says
    /// which backend runs and why.
    pub fn start(cfg: &IoConfig) -> Result<IoEngine, IoError> {
        cfg.validate()?;
        let backend: Box<dyn ReadBackend> = match cfg.backend {
            BackendChoice::Threads => {
                tracing::info!(backend = "threads", "io backend chosen by config");
                Box::new(threads::ThreadsBackend::start(cfg.threads)?)
            }
            BackendChoice::IoUring => {
                let b = uring::UringBackend::start(cfg.rings, cfg.ring_entries, cfg.uring_async)?;
                tracing::info!(backend = "io_uring", "io backend chosen by config");
                Box::new(b)
            }
            BackendChoice::Auto => {
                match uring::UringBackend::start(cfg.rings, cfg.ring_entries, cfg.uring_async) {
                    Ok(b) => {
                        tracing::info!(backend = "io_uring", "io backend: io_uring probe passed");
                        Box::new(b)
                    }
                    Err(e) => {
                        tracing::warn!(
                            backend = "threads",
                            reason = %error_chain(&e),
                            "io backend: io_uring refused, using the pread thread pool"
                        );
                        Box::new(threads::ThreadsBackend::start(cfg.threads)?)
                    }
                }
            }
        };
        IoEngine::with_backend(cfg, backend)
    }

    /// An engine on a given backend (tests wrap a real backend to inject
    /// failures no local filesystem produces on demand).
    pub fn with_backend(
        cfg: &IoConfig,
        backend: Box<dyn ReadBackend>,
    ) -> Result<IoEngine, IoError> {
        cfg.validate()?;
        Ok(IoEngine {
            inner: Arc::new(EngineInner {
                backend,
                pool: BufferPool::new(cfg.buffer_size, cfg.pool_buffers),
                cfg: cfg.clone(),
                parking: Parking::new(cfg.pool_buffers / 2),
            }),
        })
    }

    pub fn backend(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    pub fn config(&self) -> &IoConfig {
        &self.inner.cfg
    }

    /// How the read-ahead across requests has fared ([`prefetch`]).
    pub fn prefetch_stats(&self) -> PrefetchStats {
        self.inner.parking.stats()
    }

    /// Drops every read parked for a following request; their buffers
    /// return to the pool as the reads complete.
    pub fn drop_prefetched(&self) {
        self.inner.parking.clear();
    }

    pub fn pool(&self) -> &BufferPool {
        &self.inner.pool
    }

    /// Opens a disk file read-only, without following a final symlink, with
    /// `O_DIRECT` too when configured and accepted. Blocking but short (two
    /// opens and an fstat); call it from `spawn_blocking` if the path is on a
    /// filesystem that can hang.
    pub fn open(&self, path: &Path) -> Result<DiskFile, IoError> {
        let base = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let buffered =
            File::from(
                rustix::fs::open(path, base, Mode::empty()).map_err(|e| IoError::Open {
                    path: path.to_owned(),
                    source: e.into(),
                })?,
            );
        self.finish_open(buffered, path, path)
    }

    /// Takes over a file some other layer already opened (the snapshot
    /// manager opens from its records with `O_NOFOLLOW`; nothing from a
    /// request becomes a path here). The `O_DIRECT` descriptor is a second
    /// open of the same inode through `/proc/self/fd/N`, which names the
    /// open file itself, not a path that could have been swapped since.
    /// `label` only names the file in errors and logs.
    pub fn open_file(&self, file: File, label: &Path) -> Result<DiskFile, IoError> {
        use std::os::fd::AsRawFd;
        let via = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        self.finish_open(file, &via, label)
    }

    /// Size, read-ahead hint and the optional `O_DIRECT` descriptor of an
    /// open file; `direct_path` is opened again with `O_DIRECT`.
    fn finish_open(
        &self,
        buffered: File,
        direct_path: &Path,
        label: &Path,
    ) -> Result<DiskFile, IoError> {
        // Streams read front to back: let the kernel read ahead further on
        // the buffered path (a hint; failure changes nothing).
        let _ = rustix::fs::fadvise(&buffered, 0, None, rustix::fs::Advice::Sequential);
        let meta = buffered.metadata().map_err(|source| IoError::Stat {
            path: label.to_owned(),
            source,
        })?;
        let size = meta.len();
        let direct = if self.inner.cfg.direct_io {
            // NOFOLLOW only for real paths: `/proc/self/fd/N` is a magic
            // link that must be followed to reach the open file.
            let mut flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::DIRECT;
            if direct_path == label {
                flags |= OFlags::NOFOLLOW;
            }
            match rustix::fs::open(direct_path, flags, Mode::empty()) {
                Ok(f) => Some(Arc::new(File::from(f))),
                Err(e) => {
                    tracing::info!(path = %label.display(), error = %e,
                        "O_DIRECT open refused; reading this file buffered");
                    None
                }
            }
        } else {
            None
        };
        Ok(DiskFile {
            inner: Arc::new(FileInner {
                path: label.to_owned(),
                size,
                key: FileKey::of(&meta),
                buffered: Arc::new(buffered),
                use_direct: AtomicBool::new(direct.is_some()),
                direct,
            }),
        })
    }

    /// The bytes of `range` (half-open; must lie inside the file): a stream
    /// of frames whose lengths add up to the range's length.
    /// An empty range (e.g. the whole of an empty file) gives an empty
    /// stream.
    pub fn read(&self, file: &DiskFile, range: Range<u64>) -> Result<ReadStream, IoError> {
        if range.start == range.end && range.end <= file.size() {
            return self.spawn(file, Vec::new(), Plain, false);
        }
        self.spawn(file, vec![range], Plain, true)
    }

    /// The bytes of several `ranges` (sorted, disjoint, inside the file),
    /// concatenated in order with no framing (for readers that compute over
    /// the bytes, like per-block checksums, rather than send them).
    pub fn read_ranges(
        &self,
        file: &DiskFile,
        ranges: Vec<Range<u64>>,
    ) -> Result<ReadStream, IoError> {
        self.spawn(file, ranges, Plain, false)
    }

    /// The bytes of several `ranges` (sorted, disjoint, inside the file)
    /// with the bytes `framing` puts around them: the body of a wire format
    /// this module does not know (multipart, the incremental stream).
    pub fn read_framed<F: Framing>(
        &self,
        file: &DiskFile,
        ranges: Vec<Range<u64>>,
        framing: F,
    ) -> Result<ReadStream, IoError> {
        self.spawn(file, ranges, framing, false)
    }

    /// Starts the producer of a stream. `sequential`: a single range a
    /// client may continue with the next one, so [`prefetch`] applies.
    fn spawn<F: Framing>(
        &self,
        file: &DiskFile,
        mut ranges: Vec<Range<u64>>,
        framing: F,
        sequential: bool,
    ) -> Result<ReadStream, IoError> {
        for r in &ranges {
            if r.start >= r.end || r.end > file.size() {
                return Err(IoError::OutOfBounds {
                    start: r.start,
                    end: r.end,
                    size: file.size(),
                });
            }
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| IoError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(CHANNEL_SLOTS);
        let permits = Arc::new(Semaphore::new(self.inner.cfg.read_ahead));
        let mut adopted = VecDeque::new();
        let mut seq = None;
        if sequential && self.inner.cfg.prefetch && file.is_direct() {
            let r = ranges[0].clone();
            let parked = self.inner.parking.take(file.inner.key, r.start);
            let continues = parked.is_some();
            for mut job in fit(parked.unwrap_or_default(), r.clone()) {
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    break; // more than read_ahead parked: the rest is dropped
                };
                job.permit = Some(permit);
                adopted.push_back(job);
            }
            self.inner.parking.note_adopted(adopted.len());
            let covered = adopted
                .back()
                .and_then(|j| j.plan.pieces.last())
                .map_or(r.start, |p| p.file_end);
            ranges = if covered < r.end {
                std::iter::once(covered..r.end).collect()
            } else {
                Vec::new()
            };
            seq = Some(Sequence {
                start: r.start,
                end: r.end,
                continues,
            });
        }
        let producer = Producer {
            engine: Arc::clone(&self.inner),
            file: file.clone(),
            planner: Planner::new(ranges, self.inner.cfg.buffer_size),
            permits,
            adopted,
            seq,
            out: Out {
                tx,
                acc: BytesMut::new(),
            },
        };
        handle.spawn(producer.run(framing));
        Ok(ReadStream { rx })
    }
}

/// The frames of one response body, in order. Ends after the last frame or
/// after the first error (the body is then broken: the HTTP layer must abort
/// the connection, never end the body cleanly).
pub struct ReadStream {
    rx: mpsc::Receiver<Result<Bytes, IoError>>,
}

impl ReadStream {
    pub async fn next(&mut self) -> Option<Result<Bytes, IoError>> {
        self.rx.recv().await
    }

    /// Poll form of [`ReadStream::next`], for a hand-written
    /// `http_body::Body::poll_frame`.
    pub fn poll_next_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, IoError>>> {
        self.rx.poll_recv(cx)
    }

    /// Reads the whole stream into memory (tests and small bodies).
    pub async fn collect(mut self) -> Result<Vec<u8>, IoError> {
        let mut v = Vec::new();
        while let Some(f) = self.next().await {
            v.extend_from_slice(&f?);
        }
        Ok(v)
    }
}

impl futures_core::Stream for ReadStream {
    type Item = Result<Bytes, IoError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// What surrounds the data of each range in a body. The io core calls it
/// in body order (`start`, then per range `range_start`, every `data` frame,
/// `range_end`, then `finish`) and sends what it returns; the wire formats
/// implement it above this layer.
pub trait Framing: Send + 'static {
    /// Bytes before the body's first range (or before `finish` if none).
    fn start(&mut self) -> Option<Bytes> {
        None
    }
    /// Bytes before range `i`'s data.
    fn range_start(&mut self, _i: usize) -> Option<Bytes> {
        None
    }
    /// Sees every data frame of range `i`, in order.
    fn data(&mut self, _i: usize, _frame: &[u8]) {}
    /// Bytes after range `i`'s data.
    fn range_end(&mut self, _i: usize) -> Option<Bytes> {
        None
    }
    /// Bytes after everything.
    fn finish(&mut self) -> Option<Bytes> {
        None
    }
}

struct Plain;
impl Framing for Plain {}

/// Where the data of one range's piece sits in a planned batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    range: usize,
    /// Segment index in the batch that reads it.
    segment: usize,
    buf_offset: usize,
    len: usize,
    /// File offset one past the piece: the segment must reach it.
    file_end: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    segments: Vec<Segment>,
    pieces: Vec<Piece>,
}

/// Cuts ranges into batches lazily (a multi-terabyte range is never planned
/// all at once). Every segment is [`ALIGN`]-aligned in the file and in the
/// buffer, so the same plan serves `O_DIRECT` and buffered reads; small
/// ranges share a buffer, large ones fill whole buffers.
struct Planner {
    ranges: Vec<Range<u64>>,
    idx: usize,
    pos: u64,
    buf_len: usize,
}

/// Most segments in one batch; bounds per-batch bookkeeping.
const MAX_SEGMENTS: usize = 256;

impl Planner {
    fn new(ranges: Vec<Range<u64>>, buf_len: usize) -> Planner {
        let pos = ranges.first().map_or(0, |r| r.start);
        Planner {
            ranges,
            idx: 0,
            pos,
            buf_len,
        }
    }

    fn next_plan(&mut self) -> Option<Plan> {
        let align = ALIGN as u64;
        let mut plan = Plan::default();
        let mut used = 0usize;
        while let Some(r) = self.ranges.get(self.idx) {
            let space = self.buf_len - used;
            if space < ALIGN || plan.segments.len() == MAX_SEGMENTS {
                break;
            }
            let start = self.pos;
            let aligned = start - start % align;
            let head = (start - aligned) as usize;
            let take = (r.end - start).min((space - head) as u64) as usize;
            let read_len = (head + take).div_ceil(ALIGN) * ALIGN;
            let seg = match plan.segments.last_mut() {
                // Contiguous in the file and the buffer: one longer read.
                Some(last)
                    if last.file_offset + last.len as u64 == aligned
                        && last.buf_offset + last.len == used =>
                {
                    last.len += read_len;
                    plan.segments.len() - 1
                }
                _ => {
                    plan.segments.push(Segment {
                        file_offset: aligned,
                        buf_offset: used,
                        len: read_len,
                    });
                    plan.segments.len() - 1
                }
            };
            plan.pieces.push(Piece {
                range: self.idx,
                segment: seg,
                buf_offset: used + head,
                len: take,
                file_end: start + take as u64,
            });
            used += read_len;
            self.pos = start + take as u64;
            if self.pos == r.end {
                self.idx += 1;
                if let Some(n) = self.ranges.get(self.idx) {
                    self.pos = n.start;
                }
            }
        }
        (!plan.pieces.is_empty()).then_some(plan)
    }
}

/// Sends frames to the stream, gluing small ones together (a copy of at
/// most [`COALESCE_MAX`] bytes each) so 100,000 small records do not become
/// 300,000 writes; large frames pass through untouched.
struct Out {
    tx: mpsc::Sender<Result<Bytes, IoError>>,
    acc: BytesMut,
}

/// The receiver is gone: stop producing.
struct Closed;

impl Out {
    async fn push(&mut self, b: Bytes) -> Result<(), Closed> {
        if b.len() <= COALESCE_MAX {
            self.acc.extend_from_slice(&b);
            if self.acc.len() >= COALESCE_TARGET {
                self.flush().await?;
            }
            return Ok(());
        }
        self.flush().await?;
        self.tx.send(Ok(b)).await.map_err(|_| Closed)
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        if self.acc.is_empty() {
            return Ok(());
        }
        let b = self.acc.split().freeze();
        self.tx.send(Ok(b)).await.map_err(|_| Closed)
    }

    async fn fail(&mut self, e: IoError) {
        // Frames before the error are delivered first, so the client sees
        // the body break where the failure was.
        if self.flush().await.is_ok() {
            let _ = self.tx.send(Err(e)).await;
        }
    }
}

struct Producer {
    engine: Arc<EngineInner>,
    file: DiskFile,
    planner: Planner,
    /// The stream's read-ahead bound (see the module doc).
    permits: Arc<Semaphore>,
    /// Reads parked for this stream by the request before it ([`prefetch`]),
    /// already fitted to its range: they come before the planner's.
    adopted: VecDeque<InFlight>,
    /// Set for a single-range stream that [`prefetch`] follows; taken when
    /// the reads of the next range are parked.
    seq: Option<Sequence>,
    out: Out,
}

/// The range of a stream [`prefetch`] follows.
struct Sequence {
    start: u64,
    end: u64,
    /// Whether this range continued an earlier one: only then are reads
    /// started for the next (a first request parks only a marker).
    continues: bool,
}

struct InFlight {
    plan: Plan,
    rx: oneshot::Receiver<BatchDone>,
    direct: bool,
    /// The stream permit of a read started before its stream existed
    /// (parked by [`prefetch`]), tied to the buffer when the read completes.
    permit: Option<OwnedSemaphorePermit>,
}

/// Fits reads parked at `range.start` to `range`: drops the pieces (and
/// whole reads) past its end, cuts the one across it, and keeps reads only
/// while they cover the range contiguously from its start.
fn fit(jobs: VecDeque<InFlight>, range: Range<u64>) -> VecDeque<InFlight> {
    let mut kept = VecDeque::new();
    let mut covered = range.start;
    for mut job in jobs {
        if covered >= range.end {
            break; // dropped: its buffer returns to the pool when read
        }
        let pieces = &mut job.plan.pieces;
        pieces.retain(|p| p.file_end - (p.len as u64) < range.end);
        for p in pieces.iter_mut() {
            if p.file_end > range.end {
                p.len -= (p.file_end - range.end) as usize;
                p.file_end = range.end;
            }
        }
        match pieces.last() {
            // Parked reads are planned from `range.start` on, contiguous.
            Some(last) if pieces[0].file_end - pieces[0].len as u64 == covered => {
                covered = last.file_end;
                kept.push_back(job);
            }
            _ => break,
        }
    }
    kept
}

impl Producer {
    async fn run<F: Framing>(mut self, mut framing: F) {
        if let Err(e) = self.pump(&mut framing).await {
            if let Some(e) = e {
                tracing::warn!(
                    path = %self.file.path().display(),
                    error = %error_chain(&e),
                    "disk read failed; the response body is cut short"
                );
                self.out.fail(e).await;
            }
            return;
        }
        if let Some(b) = framing.finish() {
            if self.out.push(b).await.is_err() {
                return;
            }
        }
        let _ = self.out.flush().await;
    }

    /// `Err(None)`: the client went away; `Err(Some)`: a failure to report.
    async fn pump<F: Framing>(&mut self, framing: &mut F) -> Result<(), Option<IoError>> {
        if let Some(b) = framing.start() {
            self.push(b).await?;
        }
        let depth = self.engine.cfg.read_ahead;
        let mut inflight: VecDeque<InFlight> = std::mem::take(&mut self.adopted);
        let mut next_plan = self.planner.next_plan();
        let mut current: Option<usize> = None;
        loop {
            while inflight.len() < depth && next_plan.is_some() {
                if self.out.tx.is_closed() {
                    return Err(None);
                }
                // Wait for memory only when nothing is in flight: otherwise
                // our own undelivered frames could hold what we wait for.
                let buf = if inflight.is_empty() {
                    let permit = Arc::clone(&self.permits)
                        .acquire_owned()
                        .await
                        .expect("never closed");
                    let mut buf = self.engine.pool.get().await;
                    buf.attach_permit(permit);
                    buf
                } else {
                    let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                        break;
                    };
                    let Some(mut buf) = self.engine.pool.try_get() else {
                        break;
                    };
                    buf.attach_permit(permit);
                    buf
                };
                let plan = next_plan.take().expect("checked");
                let reader = self.file.reader();
                let direct = reader.1;
                let rx = self.submit(reader, buf, &plan);
                inflight.push_back(InFlight {
                    plan,
                    rx,
                    direct,
                    permit: None,
                });
                next_plan = self.planner.next_plan();
            }
            if next_plan.is_none() {
                // Everything asked for is read or being read: start on
                // what the client will likely ask for next.
                self.park_next();
            }
            let Some(job) = inflight.pop_front() else {
                break;
            };
            let frame = self.complete(job).await?;
            for p in &frame.1.pieces {
                if current != Some(p.range) {
                    if let Some(c) = current {
                        if let Some(b) = framing.range_end(c) {
                            self.push(b).await?;
                        }
                    }
                    if let Some(b) = framing.range_start(p.range) {
                        self.push(b).await?;
                    }
                    current = Some(p.range);
                }
                let piece = frame.0.slice(p.buf_offset..p.buf_offset + p.len);
                framing.data(p.range, &piece);
                self.push(piece).await?;
            }
        }
        if let Some(c) = current {
            if let Some(b) = framing.range_end(c) {
                self.push(b).await?;
            }
        }
        Ok(())
    }

    async fn push(&mut self, b: Bytes) -> Result<(), Option<IoError>> {
        self.out.push(b).await.map_err(|Closed| None)
    }

    /// Once per followed stream: parks the reads of the range after this
    /// one, as long as this one (see [`prefetch`]), or only a marker when
    /// this range did not itself continue an earlier one.
    fn park_next(&mut self) {
        let Some(seq) = self.seq.take() else {
            return;
        };
        let parking = &self.engine.parking;
        let key = self.file.inner.key;
        let size = self.file.size();
        let cfg = &self.engine.cfg;
        let window = (seq.end - seq.start).min((cfg.read_ahead * cfg.buffer_size) as u64);
        let next = seq.end..(seq.end + window).min(size);
        if !seq.continues || next.is_empty() {
            parking.park(key, seq.end, VecDeque::new(), 0);
            return;
        }
        let promised = parking.reserve(cfg.read_ahead);
        let mut planner = Planner::new(std::iter::once(next).collect(), cfg.buffer_size);
        let mut jobs = VecDeque::new();
        while jobs.len() < promised {
            let reader = self.file.reader();
            if !reader.1 {
                break; // the file fell back to buffered reads: the kernel reads ahead
            }
            let Some(buf) = self.engine.pool.try_get() else {
                break;
            };
            let Some(plan) = planner.next_plan() else {
                break;
            };
            let rx = self.submit(reader, buf, &plan);
            jobs.push_back(InFlight {
                plan,
                rx,
                direct: true,
                permit: None,
            });
        }
        parking.park(key, seq.end, jobs, promised);
    }

    fn submit(
        &self,
        (file, direct): (Arc<File>, bool),
        buf: PooledBuf,
        plan: &Plan,
    ) -> oneshot::Receiver<BatchDone> {
        let (reply, rx) = oneshot::channel();
        self.engine.backend.submit(Batch {
            file,
            direct,
            buf,
            segments: plan.segments.clone(),
            reply,
        });
        rx
    }

    /// Waits for a batch and checks it; a direct batch refused with `EINVAL`
    /// is read again buffered. Returns the filled buffer as one frame.
    async fn complete(&mut self, mut job: InFlight) -> Result<(Bytes, Plan), Option<IoError>> {
        loop {
            let done = job.rx.await.map_err(|_| Some(IoError::BackendGone))?;
            let einval = done
                .results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .find(|e| e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()));
            if job.direct {
                if let Some(e) = einval {
                    self.file.give_up_direct(e);
                    job.rx = self.submit(self.file.reader(), done.buf, &job.plan);
                    job.direct = false;
                    continue;
                }
            }
            let BatchDone { buf, results } = done;
            let mut got = Vec::with_capacity(results.len());
            for (seg, res) in job.plan.segments.iter().zip(results) {
                match res {
                    Ok(n) => got.push(n),
                    Err(source) => {
                        return Err(Some(IoError::Read {
                            offset: seg.file_offset,
                            len: seg.len,
                            source,
                        }))
                    }
                }
            }
            for p in &job.plan.pieces {
                let seg = job.plan.segments[p.segment];
                let end = seg.file_offset + got[p.segment] as u64;
                if end < p.file_end {
                    return Err(Some(IoError::ShortRead {
                        at: end,
                        wanted: p.file_end,
                    }));
                }
            }
            let mut buf = buf;
            if let Some(permit) = job.permit.take() {
                buf.attach_permit(permit);
            }
            let filled = job
                .plan
                .pieces
                .iter()
                .map(|p| p.buf_offset + p.len)
                .max()
                .unwrap_or(0);
            buf.set_filled(filled);
            return Ok((buf.freeze(), job.plan));
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn check_plan(ranges: Vec<Range<u64>>, buf_len: usize) -> Vec<Plan> {
        let mut planner = Planner::new(ranges.clone(), buf_len);
        let mut plans = Vec::new();
        while let Some(p) = planner.next_plan() {
            plans.push(p);
        }
        // Pieces cover every range exactly, in order.
        let mut covered: Vec<Range<u64>> = Vec::new();
        for plan in &plans {
            let mut used = 0;
            for s in &plan.segments {
                assert_eq!(s.file_offset % ALIGN as u64, 0);
                assert_eq!(s.buf_offset % ALIGN, 0);
                assert_eq!(s.len % ALIGN, 0);
                assert!(s.buf_offset >= used, "segments overlap in the buffer");
                used = s.buf_offset + s.len;
            }
            assert!(used <= buf_len);
            for p in &plan.pieces {
                let s = plan.segments[p.segment];
                let start = p.file_end - p.len as u64;
                assert_eq!(
                    start - s.file_offset,
                    (p.buf_offset - s.buf_offset) as u64,
                    "piece offset inside its segment"
                );
                assert!(p.file_end <= s.file_offset + s.len as u64);
                match covered.last_mut() {
                    Some(c) if c.end == start && ranges[p.range].start != start => {
                        c.end = p.file_end
                    }
                    _ => covered.push(start..p.file_end),
                }
            }
        }
        assert_eq!(covered, ranges);
        plans
    }

    #[test]
    fn planner_large_range_fills_whole_buffers() {
        let plans = check_plan(vec![0..(10 << 20)], 1 << 20);
        assert_eq!(plans.len(), 10);
        assert!(plans
            .iter()
            .all(|p| p.segments.len() == 1 && p.segments[0].len == 1 << 20));
    }

    #[test]
    fn planner_unaligned_ranges() {
        check_plan(vec![1..2, 4095..4097, 5000..9000, 12_288..20_000], 8192);
        check_plan(vec![3..(3 << 20) + 17], 1 << 20);
        check_plan(vec![4096 * 7 + 5..4096 * 300 + 1], 4096);
    }

    #[test]
    fn planner_packs_small_ranges_into_one_buffer() {
        let ranges: Vec<_> = (0..100u64)
            .map(|i| i * 1_000_000..i * 1_000_000 + 4096)
            .collect();
        let plans = check_plan(ranges, 1 << 20);
        assert_eq!(plans.len(), 1, "100 4 KiB ranges fit one 1 MiB buffer");
        assert_eq!(plans[0].segments.len(), 100);
    }

    #[test]
    fn planner_random() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let mut pos = 0u64;
            let mut ranges = Vec::new();
            for _ in 0..rng.usize(1..20) {
                let start = pos + rng.u64(1..20_000);
                let end = start + rng.u64(1..50_000);
                ranges.push(start..end);
                pos = end;
            }
            check_plan(ranges, ALIGN * rng.usize(1..8));
        }
    }

    #[test]
    fn handles_cross_threads_as_hyper_needs() {
        fn send_sync<T: Send + Sync + 'static>() {}
        fn send<T: Send + 'static>() {}
        send_sync::<IoEngine>();
        send_sync::<DiskFile>();
        send_sync::<IoError>();
        send::<ReadStream>();
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg: IoConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, IoConfig::default());
        assert!(cfg.direct_io);
        assert_eq!(cfg.backend, BackendChoice::Auto);
        let cfg: IoConfig =
            serde_json::from_str(r#"{"backend": "io_uring", "direct_io": false}"#).unwrap();
        assert_eq!(cfg.backend, BackendChoice::IoUring);
        assert!(serde_json::from_str::<IoConfig>(r#"{"backend": "aio"}"#).is_err());
        assert!(serde_json::from_str::<IoConfig>(r#"{"bogus": 1}"#).is_err());
        for bad in [
            IoConfig {
                buffer_size: 1000,
                ..IoConfig::default()
            },
            IoConfig {
                buffer_size: 32 << 20,
                ..IoConfig::default()
            },
            IoConfig {
                read_ahead: 0,
                ..IoConfig::default()
            },
            IoConfig {
                pool_buffers: 2,
                read_ahead: 4,
                ..IoConfig::default()
            },
            IoConfig {
                threads: 0,
                ..IoConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(IoError::Config(_))), "{bad:?}");
        }
    }
}
