//! The producer of one body: submits planned batches with bounded
//! read-ahead, slices completed buffers into frames (gluing small ones,
//! [`Glue`]) and sends them with the framing bytes, in order.
//!
//! A batch of the buffered descriptor whose bytes are all in the page cache
//! is read here, on the producer's own task, with `preadv2(RWF_NOWAIT)`
//! ([`read_cached`]), and not handed to the backend: the kernel copies the
//! same bytes either way, but through the backend every 1 MiB batch costs
//! an eventfd write, a wakeup of the ring thread, one of an io-wq worker
//! (the ring punts reads, `uring_async`), one of the ring thread again and
//! one of this task (about four context switches per MiB, a fifth of the
//! exporter's CPU on a download from the page cache). `RWF_NOWAIT` never
//! waits for the disk: a batch that is not cached whole goes to the
//! backend as before, and after such a miss the next few batches go there
//! straight away ([`CACHED_RETRY`]). `O_DIRECT` reads always go to the
//! backend (they wait for the device).

use std::collections::VecDeque;
use std::fs::File;
use std::io::IoSliceMut;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::backend::{Batch, BatchDone, Segment};
use super::buffer::PooledBuf;
use super::error::IoError;
use super::file::DiskFile;
use super::framing::Framing;
use super::glue::Glue;
use super::inflight::InFlight;
use super::planner::{Plan, Planner};
use super::shared::EngineInner;
use crate::error::chain as error_chain;

/// Fault point (`COE_FAULT`, see `sys::fault`): the first disk read at or
/// past [`FAULT_READ_EIO_FROM`] fails with EIO.
pub const FAULT_READ_EIO: &str = "io-read-eio";
/// Where [`FAULT_READ_EIO`] strikes: past the first frames of a body.
pub const FAULT_READ_EIO_FROM: u64 = 8 << 20;

/// Sends frames to the stream, gluing small ones together ([`Glue`]) so
/// 100,000 small records do not become 300,000 writes; large frames pass
/// through untouched.
pub(super) struct Out {
    pub(super) tx: mpsc::Sender<Result<Bytes, IoError>>,
    pub(super) glue: Glue,
}

/// The receiver is gone: stop producing.
pub(super) struct Closed;

impl Out {
    async fn push(&mut self, b: Bytes) -> Result<(), Closed> {
        for frame in self.glue.push(b) {
            self.send(frame).await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        match self.glue.flush() {
            Some(frame) => self.send(frame).await,
            None => Ok(()),
        }
    }

    async fn send(&self, frame: Bytes) -> Result<(), Closed> {
        self.tx.send(Ok(frame)).await.map_err(|_| Closed)
    }

    async fn fail(&mut self, e: IoError) {
        // Frames before the error are delivered first, so the client sees
        // the body break where the failure was.
        if self.flush().await.is_ok() {
            let _ = self.tx.send(Err(e)).await;
        }
    }
}

/// Batches sent straight to the backend after one was not all in the page
/// cache: a stream read from the disk does not try (and partly copy) every
/// batch twice.
const CACHED_RETRY: u32 = 8;

pub(super) struct Producer {
    pub(super) engine: Arc<EngineInner>,
    /// Batches still to send to the backend without trying the page cache
    /// first (see the module doc).
    pub(super) skip_cached: u32,
    pub(super) file: DiskFile,
    pub(super) planner: Planner,
    /// The stream's read-ahead bound (see the module doc).
    pub(super) permits: Arc<Semaphore>,
    /// The share of the stream's owner, if it has one (see `owner`).
    pub(super) owner: Option<Arc<Semaphore>>,
    /// Reads parked for this stream by the request before it ([`prefetch`]),
    /// already fitted to its range: they come before the planner's.
    pub(super) adopted: VecDeque<InFlight>,
    /// Set for a single-range stream that [`prefetch`] follows; taken when
    /// the reads of the next range are parked.
    pub(super) seq: Option<Sequence>,
    pub(super) out: Out,
}

/// The range of a stream [`prefetch`] follows.
pub(super) struct Sequence {
    pub(super) start: u64,
    pub(super) end: u64,
    /// Whether this range continued an earlier one: only then are reads
    /// started for the next (a first request parks only a marker).
    pub(super) continues: bool,
}

impl Producer {
    pub(super) async fn run<F: Framing>(mut self, mut framing: F) {
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
                // The stream permit waits on our own client only; the
                // buffer comes from the reserved share or the overflow when
                // other streams (stalled ones) hold the rest of the pool.
                // The owner's permit waits on that owner's streams only,
                // and is taken before the buffer: an owner at its bound
                // holds no pool buffer while it waits.
                let buf = if inflight.is_empty() {
                    let permit = Arc::clone(&self.permits)
                        .acquire_owned()
                        .await
                        .expect("never closed");
                    let owner = match &self.owner {
                        Some(share) => Some(match Arc::clone(share).try_acquire_owned() {
                            Ok(o) => o,
                            Err(_) => {
                                self.engine.owners.note_wait();
                                tokio::select! {
                                    o = Arc::clone(share).acquire_owned() => o.expect("never closed"),
                                    () = self.out.tx.closed() => return Err(None),
                                }
                            }
                        }),
                        None => None,
                    };
                    let mut buf = self.first_buffer(depth).await;
                    buf.attach_permit(permit);
                    if let Some(o) = owner {
                        buf.attach_owner(o);
                    }
                    buf
                } else {
                    let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                        break;
                    };
                    let owner = match &self.owner {
                        Some(share) => match Arc::clone(share).try_acquire_owned() {
                            Ok(o) => Some(o),
                            Err(_) => break,
                        },
                        None => None,
                    };
                    let Some(mut buf) = self.engine.pool.try_get_extra() else {
                        break;
                    };
                    buf.attach_permit(permit);
                    if let Some(o) = owner {
                        buf.attach_owner(o);
                    }
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
                    owner: None,
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

    /// A buffer when none is in flight. A stream that holds none (all its
    /// frames were sent) may take the reserved share or the overflow; one
    /// whose frames still wait in hyper or the socket (a stalled client)
    /// waits for a shared buffer above the reserve or for its own frames to
    /// go, whichever comes first: it never takes more than one buffer from
    /// the reserve or the overflow, and only when it holds none.
    async fn first_buffer(&self, depth: usize) -> PooledBuf {
        // The caller holds one of our `depth` permits.
        if self.permits.available_permits() + 1 >= depth {
            return self.engine.pool.get_first().await;
        }
        let others = u32::try_from(depth - 1).unwrap_or(u32::MAX);
        tokio::select! {
            b = self.engine.pool.get_extra() => b,
            all = self.permits.acquire_many(others) => {
                drop(all);
                self.engine.pool.get_first().await
            }
        }
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
        let engine = Arc::clone(&self.engine);
        let parking = &engine.parking;
        let key = self.file.inner.key;
        let size = self.file.size();
        let cfg = &engine.cfg;
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
            // Speculative: never from the reserved share.
            let Some(buf) = self.engine.pool.try_get_extra() else {
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
                owner: None,
            });
        }
        parking.park(key, seq.end, jobs, promised);
    }

    fn submit(
        &mut self,
        (file, direct): (Arc<File>, bool),
        mut buf: PooledBuf,
        plan: &Plan,
    ) -> oneshot::Receiver<BatchDone> {
        let (reply, rx) = oneshot::channel();
        if !direct {
            if self.skip_cached > 0 {
                self.skip_cached -= 1;
            } else if let Some(results) = read_cached(&file, &mut buf, &plan.segments) {
                // Nobody waits on `rx` yet: no wakeup.
                let _ = reply.send(BatchDone { buf, results });
                return rx;
            } else {
                self.skip_cached = CACHED_RETRY;
            }
        }
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
                    let reader = self.file.reader();
                    job.rx = self.submit(reader, done.buf, &job.plan);
                    job.direct = false;
                    continue;
                }
            }
            let BatchDone { buf, results } = done;
            let mut got = Vec::with_capacity(results.len());
            for (seg, res) in job.plan.segments.iter().zip(results) {
                // Fault point (tests): the first read at or past 8 MiB
                // fails with EIO, as a bad sector under the disk would.
                let res = if seg.file_offset >= FAULT_READ_EIO_FROM
                    && crate::sys::fault::once(FAULT_READ_EIO)
                {
                    Err(std::io::Error::from_raw_os_error(
                        rustix::io::Errno::IO.raw_os_error(),
                    ))
                } else {
                    res
                };
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
            if let Some(owner) = job.owner.take() {
                buf.attach_owner(owner);
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

/// Reads every segment of a batch from the page cache without waiting
/// (`preadv2` with `RWF_NOWAIT`), each until full or end of file: the
/// results a backend would give. `None` when any part is not cached (the
/// kernel answers `EAGAIN`), or on any error, which the backend then meets
/// and reports itself; what was copied is read again there.
fn read_cached(
    file: &File,
    buf: &mut PooledBuf,
    segments: &[Segment],
) -> Option<Vec<std::io::Result<usize>>> {
    let mem = buf.as_mut_slice();
    let mut results = Vec::with_capacity(segments.len());
    for s in segments {
        let dst = &mut mem[s.buf_offset..s.buf_offset + s.len];
        let mut done = 0;
        while done < dst.len() {
            match rustix::io::preadv2(
                file,
                &mut [IoSliceMut::new(&mut dst[done..])],
                s.file_offset + done as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return None,
            }
        }
        results.push(Ok(done));
    }
    Some(results)
}
