//! The engine: opening disk files (`O_DIRECT` where accepted) and starting
//! the producer of each response body, which the caller reads as a
//! [`ReadStream`].

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rustix::fs::{Mode, OFlags};
use tokio::sync::{mpsc, Semaphore};

use super::backend::ReadBackend;
use super::buffer::BufferPool;
use super::config::{BackendChoice, BackendKind, IoConfig};
use super::error::IoError;
use super::file::{DiskFile, FileInner};
use super::framing::{Framing, Plain};
use super::glue::Glue;
use super::inflight::fit;
use super::owner::{Owner, Owners};
use super::planner::Planner;
use super::prefetch::{FileKey, Parking, PrefetchStats};
use super::producer::{Out, Producer, Sequence};
use super::shared::EngineInner;
use super::{threads, uring};
use crate::error::chain as error_chain;

/// Channel slots between a producer and its [`ReadStream`]; memory is
/// bounded by the stream permits, this only bounds message count.
pub(super) const CHANNEL_SLOTS: usize = 64;

/// The io core. Cheap to clone; every clone shares the backend and pool.
#[derive(Clone)]
pub struct IoEngine {
    inner: Arc<EngineInner>,
    /// Whom the streams this handle starts are counted against
    /// ([`IoEngine::for_owner`]); `None`: no owner's bound (the service's
    /// own reads, such as the health check's).
    owner: Option<Owner>,
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
                pool: BufferPool::with_shares(
                    cfg.buffer_size,
                    cfg.pool_buffers,
                    cfg.reserved(),
                    cfg.overflow_buffers,
                ),
                cfg: cfg.clone(),
                owners: Owners::new(cfg.owner_bound()),
                parking: Parking::new(cfg.pool_buffers / 2),
            }),
            owner: None,
        })
    }

    /// A handle on the same engine whose streams count against `owner`'s
    /// bound (`io.owner_buffers`): while that owner's streams hold that
    /// many buffers, its next one waits for one of them to come back.
    pub fn for_owner(&self, owner: Owner) -> IoEngine {
        IoEngine {
            inner: Arc::clone(&self.inner),
            owner: Some(owner),
        }
    }

    pub fn backend(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    pub fn config(&self) -> &IoConfig {
        &self.inner.cfg
    }

    /// How the read-ahead across requests has fared ([`prefetch`]).
    pub fn prefetch_stats(&self) -> PrefetchStats {
        PrefetchStats {
            pool_in_use: self.inner.pool.in_use(),
            overflow_in_use: self.inner.pool.overflow_in_use(),
            owner_waits: self.inner.owners.waits(),
            ..self.inner.parking.stats()
        }
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
        let owner = self.owner.map(|o| self.inner.owners.share(o));
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
                // A parked read belongs to no owner: it counts against the
                // one that adopts it, within that owner's bound.
                if let Some(share) = &owner {
                    let Ok(o) = Arc::clone(share).try_acquire_owned() else {
                        break;
                    };
                    job.owner = Some(o);
                }
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
            skip_cached: 0,
            file: file.clone(),
            planner: Planner::new(ranges, self.inner.cfg.buffer_size),
            permits,
            owner,
            adopted,
            seq,
            out: Out {
                tx,
                glue: Glue::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::owner::Owner;

    #[test]
    fn handles_cross_threads_as_hyper_needs() {
        fn send_sync<T: Send + Sync + 'static>() {}
        fn send<T: Send + 'static>() {}
        send_sync::<IoEngine>();
        send_sync::<DiskFile>();
        send_sync::<IoError>();
        send::<ReadStream>();
    }

    /// Waits until `cond` holds, for at most 30 s.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owner_at_its_bound_waits_and_others_are_served() {
        // Buffers larger than the glue's parts: frames are slices of them,
        // not copies, and hold them until read.
        const BUF: usize = 64 << 10;
        const LEN: usize = 16 * BUF;
        /// Removes the scratch folder however the test ends.
        struct Scratch(std::path::PathBuf);
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Scratch(std::env::temp_dir().join(format!("coe-owner-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("disk");
        let data: Vec<u8> = (0..LEN).map(|i| (i / BUF) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        // One buffer per stream, a pool of 4 and no overflow; an owner's
        // streams may hold 2.
        let cfg = IoConfig {
            backend: BackendChoice::Threads,
            direct_io: false,
            prefetch: false,
            buffer_size: BUF,
            read_ahead: 1,
            pool_buffers: 4,
            reserved_buffers: Some(0),
            overflow_buffers: 0,
            owner_buffers: Some(2),
            threads: 2,
            ..IoConfig::default()
        };
        let engine = IoEngine::start(&cfg).unwrap();
        let file = engine.open(&path).unwrap();
        let (a, b) = (
            engine.for_owner(Owner::new(1)),
            engine.for_owner(Owner::new(2)),
        );
        // Two readers of owner A that do not read: each holds its first
        // frame, unsent, and so A's whole share.
        let a1 = a.read(&file, 0..LEN as u64).unwrap();
        let a2 = a.read(&file, 0..LEN as u64).unwrap();
        until("A's readers to hold their buffers", || {
            engine.pool().in_use() == 2
        })
        .await;
        // A third stream of A waits for A's buffers; owner B, with two
        // buffers free in the pool, is served in full meanwhile.
        let mut a3 = a.read(&file, 0..LEN as u64).unwrap();
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            b.read(&file, 0..LEN as u64).unwrap().collect(),
        )
        .await
        .expect("owner B is served while owner A is at its bound")
        .unwrap();
        assert!(got == data);
        assert_eq!(engine.pool().in_use(), 2, "A never held more than 2");
        assert_eq!(engine.prefetch_stats().owner_waits, 1);
        assert!(
            matches!(a3.rx.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
            "A's third stream waits"
        );
        // A's first reader reads on, and its buffers come back: A's third
        // stream is served too (both read at once, as a client of several
        // streams does: one that read them only in turn, with more of them
        // started than its owner's bound, would wait on itself).
        let (r1, r3) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            tokio::join!(a1.collect(), a3.collect())
        })
        .await
        .expect("A's waiting stream is served once A's buffers return");
        assert!(r1.unwrap() == data && r3.unwrap() == data);
        drop(a2);
        until("every buffer to come back", || engine.pool().in_use() == 0).await;
    }
}
