//! The io_uring backend: the `io-uring` crate driven by dedicated ring
//! threads that complete into channels.
//!
//! Why not tokio-uring: its runtime is one current-thread tokio runtime
//! per ring with `!Send` futures, and it is barely maintained. The HTTP
//! server runs a multi-thread tokio runtime; a ring thread that takes
//! [`Batch`]es from a queue, keeps every segment of every batch in flight at
//! once, and answers each batch on its oneshot channel serves any number of
//! network threads, and keeps this module the only place that knows about
//! io_uring (ARCHITECTURE.md: the io core's trait hides it).
//!
//! The ring thread sleeps in `io_uring_enter` waiting for completions; a
//! read of an eventfd is always armed on the ring, so a submitter wakes it by
//! writing the eventfd after queuing a batch.
//!
//! [`UringBackend::start`] is the probe: it creates a ring, asks the kernel
//! which opcodes it supports (`IORING_OP_READ` needs 5.6), and runs a NOP
//! through it, so a kernel without io_uring, a seccomp filter (EPERM), the
//! `kernel.io_uring_disabled` sysctl or RLIMIT_MEMLOCK (ENOMEM on older
//! kernels) all show up there as an [`IoError::UringUnavailable`] saying why.
//!
//! `unsafe`: pushing a submission entry is `unsafe` in the `io-uring` crate
//! because the kernel writes through the entry's pointer until the
//! completion arrives. That is the only `unsafe` here: [`push`] and its
//! three callers (the probe's NOP, the eventfd read, the disk reads), each
//! allowed by name and with its SAFETY comment. Registered buffers are not used: the
//! pool grows lazily and buffers are shared by all rings, and the
//! benchmarks (`benches/io.rs`) do not show the page pinning to be the
//! bottleneck at 1 MiB reads.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use rustix::event::EventfdFlags;

use super::backend::{Batch, BatchDone, ReadBackend};
use super::config::BackendKind;
use super::error::IoError;

/// `user_data` of the eventfd read that wakes the ring thread.
const WAKE: u64 = u64::MAX;
/// Low bits of `user_data` hold the segment index (batches have at most
/// `MAX_SEGMENTS` = 256 segments), the high bits the job slot.
const SEG_BITS: u32 = 16;

pub struct UringBackend {
    rings: Vec<RingHandle>,
    next: AtomicUsize,
}

struct RingHandle {
    /// `None` once dropping: the ring thread sees the queue closed.
    tx: Option<mpsc::Sender<Batch>>,
    wake: Arc<OwnedFd>,
}

fn unavailable(reason: &str, source: std::io::Error) -> IoError {
    IoError::UringUnavailable {
        reason: reason.to_owned(),
        source: Some(source),
    }
}

impl UringBackend {
    /// Creates `rings` rings of `entries` submission entries, each driven by
    /// its own thread; fails (so `auto` falls back to threads) when io_uring
    /// is missing or refused.
    ///
    /// `punt` sets `IOSQE_ASYNC` on every read: the kernel then runs it on
    /// its io-wq workers instead of trying it inline in the ring thread's
    /// `io_uring_enter`. Inline, a read of cached data is copied by the ring
    /// thread itself (one core for all streams of the ring), and a direct
    /// read on a device that cannot take a non-blocking submission (a loop
    /// device, for one) blocks the ring thread; punted, both run in
    /// parallel, and the ring thread never stalls every stream of its ring
    /// behind one slow device (OVM repositories sit on SAN LUNs). The
    /// default is on for that robustness; `benches/io.rs` prints both modes
    /// against the threads backend in the same run, so a host can choose by
    /// measurement (on the shared 2-core build machine the two modes were
    /// within the run-to-run noise of each other).
    pub fn start(rings: usize, entries: u32, punt: bool) -> Result<UringBackend, IoError> {
        let mut handles = Vec::with_capacity(rings);
        for i in 0..rings {
            let mut ring =
                IoUring::new(entries).map_err(|e| unavailable("io_uring_setup failed", e))?;
            let mut probe = Probe::new();
            ring.submitter()
                .register_probe(&mut probe)
                .map_err(|e| unavailable("IORING_REGISTER_PROBE failed (kernel before 5.6?)", e))?;
            if !probe.is_supported(opcode::Read::CODE) {
                return Err(IoError::UringUnavailable {
                    reason: "the kernel does not support IORING_OP_READ".into(),
                    source: None,
                });
            }
            nop_round_trip(&mut ring)?;
            let wake = Arc::new(
                rustix::event::eventfd(0, EventfdFlags::CLOEXEC)
                    .map_err(|e| unavailable("eventfd failed", e.into()))?,
            );
            let (tx, rx) = mpsc::channel();
            let thread_wake = Arc::clone(&wake);
            std::thread::Builder::new()
                .name(format!("io-uring-{i}"))
                .spawn(move || RingThread::new(ring, rx, thread_wake, punt).run())
                .map_err(|e| IoError::Spawn("io_uring", e))?;
            handles.push(RingHandle { tx: Some(tx), wake });
        }
        Ok(UringBackend {
            rings: handles,
            next: AtomicUsize::new(0),
        })
    }
}

/// Pushes one entry.
///
/// # Safety
/// Every buffer and descriptor `entry` points to must stay valid and
/// untouched by Rust code until its completion has been reaped.
#[allow(unsafe_code)]
unsafe fn push(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), squeue::PushError> {
    // SAFETY: forwarded to the caller (this function's contract).
    unsafe { ring.submission().push(entry) }
}

#[allow(unsafe_code)]
fn nop_round_trip(ring: &mut IoUring) -> Result<(), IoError> {
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP points to no memory and no descriptor.
    unsafe { push(ring, &nop) }.map_err(|_| IoError::UringUnavailable {
        reason: "a fresh ring has no room for one entry".into(),
        source: None,
    })?;
    ring.submit_and_wait(1)
        .map_err(|e| unavailable("io_uring_enter failed (seccomp?)", e))?;
    let res = ring.completion().next().map(|c| c.result());
    match res {
        Some(r) if r >= 0 => Ok(()),
        Some(r) => Err(unavailable(
            "a NOP failed",
            std::io::Error::from_raw_os_error(-r),
        )),
        None => Err(IoError::UringUnavailable {
            reason: "a NOP did not complete".into(),
            source: None,
        }),
    }
}

impl ReadBackend for UringBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::IoUring
    }

    fn submit(&self, batch: Batch) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        let ring = &self.rings[i];
        let Some(tx) = ring.tx.as_ref() else { return };
        if tx.send(batch).is_ok() {
            // A failed wake cannot happen for an eventfd short of counter
            // overflow; the batch would then wait for the next wake.
            let _ = rustix::io::write(&*ring.wake, &1u64.to_ne_bytes());
        }
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        for ring in &mut self.rings {
            // Close the queue first, then wake: the thread sees the queue
            // closed, finishes what is in flight and exits.
            ring.tx.take();
            let _ = rustix::io::write(&*ring.wake, &1u64.to_ne_bytes());
        }
    }
}

/// A batch on the ring.
struct Job {
    batch: Batch,
    /// Start of the batch's buffer, taken once before any read was pushed:
    /// from then on the buffer is only reached through this pointer (the
    /// kernel writes into it), never through a Rust reference.
    base: *mut u8,
    /// Bytes read so far and the error, per segment.
    done: Vec<usize>,
    errors: Vec<Option<std::io::Error>>,
    /// Segments not yet finished.
    pending: usize,
}

struct RingThread {
    ring: IoUring,
    rx: mpsc::Receiver<Batch>,
    wake: Arc<OwnedFd>,
    /// Target of the armed eventfd read; boxed so its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    jobs: Vec<Option<Job>>,
    free: Vec<usize>,
    /// Set `IOSQE_ASYNC` on reads (see [`UringBackend::start`]).
    punt: bool,
    /// Segments (job slot, segment) waiting for room in the ring.
    queue: VecDeque<(usize, usize)>,
    /// Reads pushed and not yet completed; kept below the CQ size.
    inflight: usize,
    closing: bool,
}

impl RingThread {
    fn new(ring: IoUring, rx: mpsc::Receiver<Batch>, wake: Arc<OwnedFd>, punt: bool) -> RingThread {
        RingThread {
            punt,
            ring,
            rx,
            wake,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            jobs: Vec::new(),
            free: Vec::new(),
            queue: VecDeque::new(),
            inflight: 0,
            closing: false,
        }
    }

    #[allow(unsafe_code)]
    fn run(mut self) {
        let cq_cap = self.ring.params().cq_entries() as usize;
        let mut reaped: Vec<(u64, i32)> = Vec::with_capacity(cq_cap);
        loop {
            self.take_new_batches();
            if !self.closing && !self.wake_armed {
                let entry = opcode::Read::new(
                    types::Fd(self.wake.as_raw_fd()),
                    self.wake_buf.as_mut_ptr(),
                    8,
                )
                .build()
                .user_data(WAKE);
                // SAFETY: `wake_buf` is a Box owned by this thread, not
                // touched until the WAKE completion is reaped, and leaked if
                // the thread ever exits with the read armed (`abandon`); the
                // eventfd is kept open by `self.wake`.
                if unsafe { push(&mut self.ring, &entry) }.is_ok() {
                    self.wake_armed = true;
                }
            }
            while self.inflight + 1 < cq_cap {
                let Some(&(slot, seg)) = self.queue.front() else {
                    break;
                };
                let entry = self.read_entry(slot, seg);
                // SAFETY: the entry points into the job's buffer (kept alive
                // in `self.jobs` until every segment completes; only reached
                // through `Job::base` meanwhile, at disjoint ranges per
                // segment) and at its file (an `Arc<File>` in the same job).
                if unsafe { push(&mut self.ring, &entry) }.is_err() {
                    // Submission queue full: hand what is there to the
                    // kernel and try again.
                    if let Err(e) = self.ring.submit() {
                        if !transient(&e) {
                            return self.abandon(&e);
                        }
                        break;
                    }
                    continue;
                }
                self.queue.pop_front();
                self.inflight += 1;
            }
            if self.closing && self.inflight == 0 && !self.wake_armed && self.queue.is_empty() {
                return;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if !transient(&e) {
                    return self.abandon(&e);
                }
            }
            reaped.clear();
            reaped.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, res) in &reaped {
                self.complete(user_data, res);
            }
        }
    }

    fn take_new_batches(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(mut batch) => {
                    let n = batch.segments.len();
                    let base = batch.buf.as_mut_slice().as_mut_ptr();
                    let job = Job {
                        batch,
                        base,
                        done: vec![0; n],
                        errors: (0..n).map(|_| None).collect(),
                        pending: n,
                    };
                    let slot = match self.free.pop() {
                        Some(s) => {
                            self.jobs[s] = Some(job);
                            s
                        }
                        None => {
                            self.jobs.push(Some(job));
                            self.jobs.len() - 1
                        }
                    };
                    if n == 0 {
                        self.finish(slot);
                    }
                    self.queue.extend((0..n).map(|seg| (slot, seg)));
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    /// The read of what is still missing of segment `seg` of job `slot`.
    fn read_entry(&self, slot: usize, seg: usize) -> squeue::Entry {
        let job = self.jobs[slot].as_ref().expect("queued job exists");
        let s = job.batch.segments[seg];
        let done = job.done[seg];
        // `wrapping_add` stays inside the buffer: the planner keeps
        // `buf_offset + len` within it and `done < len`.
        let ptr = job.base.wrapping_add(s.buf_offset + done);
        let entry = opcode::Read::new(
            types::Fd(job.batch.file.as_raw_fd()),
            ptr,
            (s.len - done) as u32,
        )
        .offset(s.file_offset + done as u64)
        .build()
        .user_data(((slot as u64) << SEG_BITS) | seg as u64);
        if self.punt {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        }
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        if user_data == WAKE {
            self.wake_armed = false;
            return;
        }
        self.inflight -= 1;
        let slot = (user_data >> SEG_BITS) as usize;
        let seg = (user_data & ((1 << SEG_BITS) - 1)) as usize;
        let job = self.jobs[slot].as_mut().expect("completed job exists");
        let len = job.batch.segments[seg].len;
        let finished = match res {
            r if r < 0 => {
                let e = std::io::Error::from_raw_os_error(-r);
                if transient(&e) {
                    false
                } else {
                    job.errors[seg] = Some(e);
                    true
                }
            }
            0 => true,
            n => {
                job.done[seg] += n as usize;
                job.done[seg] >= len
            }
        };
        if !finished {
            self.queue.push_back((slot, seg));
            return;
        }
        job.pending -= 1;
        if job.pending == 0 {
            self.finish(slot);
        }
    }

    fn finish(&mut self, slot: usize) {
        let job = self.jobs[slot].take().expect("finished job exists");
        self.free.push(slot);
        let results = job
            .done
            .into_iter()
            .zip(job.errors)
            .map(|(n, e)| match e {
                Some(e) => Err(e),
                None => Ok(n),
            })
            .collect();
        let _ = job.batch.reply.send(BatchDone {
            buf: job.batch.buf,
            results,
        });
    }

    /// The ring failed for good. The kernel may still write into buffers of
    /// reads in flight, so they are leaked rather than returned to the pool;
    /// the streams waiting for them see the backend gone.
    fn abandon(self, e: &std::io::Error) {
        tracing::error!(error = %e, "io_uring ring failed; its reads are abandoned");
        let RingThread {
            jobs,
            wake_buf,
            ring,
            ..
        } = self;
        for job in jobs.into_iter().flatten() {
            let Batch {
                file, buf, reply, ..
            } = job.batch;
            std::mem::forget(buf);
            std::mem::forget(file);
            drop(reply);
        }
        Box::leak(wake_buf);
        std::mem::forget(ring);
    }
}

/// Errors after which the same call is simply retried.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == rustix::io::Errno::INTR.raw_os_error()
            || c == rustix::io::Errno::AGAIN.raw_os_error()
            || c == rustix::io::Errno::BUSY.raw_os_error()
    )
}
