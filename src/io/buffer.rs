//! The pool of page-aligned read buffers, and how a filled buffer becomes a
//! response frame without a copy.
//!
//! `O_DIRECT` needs the memory of a read aligned to the device's logical
//! block size; [`ALIGN`] (one page) satisfies every device this serves. The
//! alignment is obtained without `unsafe`: each buffer over-allocates a
//! `Vec<u8>` by `ALIGN - 1` bytes and uses the aligned window inside it. A
//! `Vec`'s heap block never moves while it is not resized, so the window
//! stays aligned for the buffer's whole life (the `Vec` is never resized).
//!
//! The pool bounds the number of buffers alive at once (a semaphore), so the
//! memory of all reads together is capped; a [`PooledBuf`] goes back to the
//! free list when dropped. [`PooledBuf::freeze`] turns a filled buffer into a
//! `bytes::Bytes` whose owner is the buffer itself ([`Bytes::from_owner`]):
//! hyper writes it to the socket and drops it, and that drop returns the
//! buffer to the pool. Each buffer may also carry a permit of the stream that
//! asked for it, which caps the memory a single stream (connection) holds,
//! frames waiting in hyper included.
//!
//! When the last buffer in use comes back the pool is idle, and it frees
//! all but [`IDLE_KEEP`] of its buffers: memory taken for a burst of
//! downloads is given back after it (`sys::memory` makes sure the
//! allocator returns it to the OS).
//!
//! This module must not do I/O; it only owns memory.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Alignment of every buffer: one 4 KiB page, a multiple of every logical
/// block size Linux accepts for `O_DIRECT` on the disks this serves (512 and
/// 4096; `statx` `STATX_DIOALIGN` reports the same on such devices).
pub const ALIGN: usize = 4096;

/// Buffers the pool keeps when it goes idle (no buffer in use): half a
/// stream's read-ahead at the default config, ready for the next request;
/// the others are freed.
pub const IDLE_KEEP: usize = 4;

/// A heap buffer of `len` bytes whose start is aligned to [`ALIGN`].
pub struct AlignedBuf {
    /// Over-allocated by `ALIGN - 1`; never resized, so its heap block (and
    /// the aligned window at `start`) never moves.
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`ALIGN`]. `len` is rounded up
    /// to a multiple of [`ALIGN`].
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.div_ceil(ALIGN).max(1) * ALIGN;
        // Buffers are made lazily, when reads need them (the pool is bounded).
        let mut storage = vec![0u8; len + ALIGN - 1];
        // Fault every page in now. A large calloc is a fresh mapping whose
        // pages are untouched, and btrfs reads O_DIRECT with page faults
        // disabled: a read into untouched pages comes back short and
        // btrfs finishes it through the page cache (an export would then
        // fill the host's cache). `black_box` keeps the stores of zeros
        // into zeroed memory from being optimised away.
        for i in (0..storage.len()).step_by(ALIGN) {
            storage[i] = std::hint::black_box(0);
        }
        // For a `*const u8` the offset is computed exactly at run time; the
        // `min` only keeps the slicing below in bounds if it ever were not.
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN - 1);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// A bounded pool of [`AlignedBuf`]s of one size. Cheap to clone.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    buf_len: usize,
    /// One permit per shared buffer that may exist; a [`PooledBuf`] holds
    /// one (or an overflow permit).
    permits: Arc<Semaphore>,
    /// Buffers allocated earlier and now unused. Allocated lazily, so a pool
    /// that is never busy costs no memory. Overflow buffers are never kept.
    free: Mutex<Vec<AlignedBuf>>,
    capacity: usize,
    /// Shared buffers only a stream holding none may take (see
    /// [`BufferPool::try_get_extra`]).
    reserved: usize,
    /// Permits of the overflow: buffers beyond the pool, for a stream that
    /// holds none when the pool is empty ([`BufferPool::get_first`]).
    overflow: Arc<Semaphore>,
    overflow_capacity: usize,
    /// Woken whenever a shared buffer comes back.
    returned: Notify,
}

impl BufferPool {
    /// A pool of at most `count` buffers of `buf_len` bytes (rounded up to a
    /// multiple of [`ALIGN`]).
    pub fn new(buf_len: usize, count: usize) -> BufferPool {
        BufferPool::with_shares(buf_len, count, 0, 0)
    }

    /// A pool of `count` shared buffers of which `reserved` only go to
    /// streams that hold none, plus up to `overflow` buffers made on demand
    /// for such streams when the pool is empty (see the io module's doc).
    /// Memory is at most `(count + overflow) * buf_len`.
    pub fn with_shares(
        buf_len: usize,
        count: usize,
        reserved: usize,
        overflow: usize,
    ) -> BufferPool {
        let buf_len = buf_len.div_ceil(ALIGN).max(1) * ALIGN;
        BufferPool {
            inner: Arc::new(PoolInner {
                buf_len,
                permits: Arc::new(Semaphore::new(count)),
                free: Mutex::new(Vec::with_capacity(count)),
                capacity: count,
                reserved: reserved.min(count),
                overflow: Arc::new(Semaphore::new(overflow)),
                overflow_capacity: overflow,
                returned: Notify::new(),
            }),
        }
    }

    /// Size of each buffer in bytes.
    pub fn buf_len(&self) -> usize {
        self.inner.buf_len
    }

    /// How many buffers may exist at once.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// How many shared buffers are handed out right now.
    pub fn in_use(&self) -> usize {
        self.inner.capacity - self.inner.permits.available_permits()
    }

    /// How many overflow buffers exist right now.
    pub fn overflow_in_use(&self) -> usize {
        self.inner.overflow_capacity - self.inner.overflow.available_permits()
    }

    /// A buffer beyond a stream's first: only while more than the reserved
    /// share is free, so streams that hold buffers (stalled ones included)
    /// can never take the last ones from a stream that holds none.
    pub fn try_get_extra(&self) -> Option<PooledBuf> {
        if self.inner.permits.available_permits() <= self.inner.reserved {
            return None;
        }
        self.try_get()
    }

    /// A buffer beyond a stream's first, waiting until one is free above
    /// the reserved share ([`BufferPool::try_get_extra`]).
    pub async fn get_extra(&self) -> PooledBuf {
        loop {
            let returned = self.inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(b) = self.try_get_extra() {
                return b;
            }
            returned.await;
        }
    }

    /// The buffer of a stream that holds none: a free shared one (the
    /// reserved share included), else an overflow buffer, else the first
    /// shared *or overflow* one to come back. It waits only when the pool
    /// and the overflow are both used up, and then in both queues (FIFO):
    /// when stalled streams hold every shared buffer until `send_timeout`,
    /// the overflow buffers that streams still moving give back go to the
    /// waiters in turn, not only to the streams that ask without waiting
    /// (issue 11's soak: a new range waited 30 s and more while 16 busy
    /// downloads kept taking the overflow and 64 stalled ones held the pool).
    pub async fn get_first(&self) -> PooledBuf {
        if let Some(b) = self.try_get() {
            return b;
        }
        if let Ok(permit) = Arc::clone(&self.inner.overflow).try_acquire_owned() {
            return self.make_overflow(permit);
        }
        // A permit granted to the losing acquire is given back when it is
        // dropped (tokio's semaphore), so none is lost.
        tokio::select! {
            shared = Arc::clone(&self.inner.permits).acquire_owned() => {
                self.take(shared.expect("the pool semaphore is never closed"))
            }
            overflow = Arc::clone(&self.inner.overflow).acquire_owned() => {
                self.make_overflow(overflow.expect("the overflow semaphore is never closed"))
            }
        }
    }

    fn make_overflow(&self, permit: OwnedSemaphorePermit) -> PooledBuf {
        let mut b = self.make(permit, false);
        b.overflow = true;
        b
    }

    /// Waits for a free buffer.
    pub async fn get(&self) -> PooledBuf {
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .expect("the pool semaphore is never closed");
        self.take(permit)
    }

    /// A free buffer, or `None` when all are handed out.
    pub fn try_get(&self) -> Option<PooledBuf> {
        let permit = Arc::clone(&self.inner.permits).try_acquire_owned().ok()?;
        Some(self.take(permit))
    }

    fn take(&self, permit: OwnedSemaphorePermit) -> PooledBuf {
        self.make(permit, true)
    }

    fn make(&self, permit: OwnedSemaphorePermit, reuse: bool) -> PooledBuf {
        let reused = if reuse {
            self.inner
                .free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
        } else {
            None
        };
        let buf = reused.unwrap_or_else(|| AlignedBuf::new(self.inner.buf_len));
        PooledBuf {
            buf: Some(buf),
            pool: Arc::clone(&self.inner),
            pool_permit: Some(permit),
            stream_permit: None,
            owner_permit: None,
            filled: 0,
            overflow: false,
        }
    }
}

/// A buffer borrowed from a [`BufferPool`]; returns there when dropped.
///
/// `filled` says how many leading bytes hold data (what [`freeze`] exposes):
/// a reused buffer still holds an earlier read's bytes past that point, which
/// must never reach a client.
///
/// [`freeze`]: PooledBuf::freeze
pub struct PooledBuf {
    /// `Some` until dropped.
    buf: Option<AlignedBuf>,
    pool: Arc<PoolInner>,
    /// `Some` until dropped (released before waiters are woken).
    pool_permit: Option<OwnedSemaphorePermit>,
    stream_permit: Option<OwnedSemaphorePermit>,
    /// A permit of the owner's share (`owner`), held as long as the stream
    /// permit.
    owner_permit: Option<OwnedSemaphorePermit>,
    filled: usize,
    /// Made beyond the pool: freed when dropped, not kept for reuse.
    overflow: bool,
}

impl PooledBuf {
    fn buf(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until drop")
    }

    /// The whole buffer, for a read to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf
            .as_mut()
            .expect("present until drop")
            .as_mut_slice()
    }

    pub fn len(&self) -> usize {
        self.buf().len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf().is_empty()
    }

    /// Marks the first `n` bytes as data (clamped to the buffer length).
    pub fn set_filled(&mut self, n: usize) {
        self.filled = n.min(self.len());
    }

    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Ties a per-stream permit to this buffer: it is released when the
    /// buffer (and every frame made from it) is dropped.
    pub fn attach_permit(&mut self, permit: OwnedSemaphorePermit) {
        self.stream_permit = Some(permit);
    }

    /// Ties a permit of the stream owner's share to this buffer, released
    /// as the stream permit is.
    pub fn attach_owner(&mut self, permit: OwnedSemaphorePermit) {
        self.owner_permit = Some(permit);
    }

    /// The filled bytes as a `Bytes` that owns this buffer: no copy; the
    /// buffer returns to the pool when the last clone or slice is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(FrameOwner(self))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take().filter(|_| !self.overflow) {
            let mut free = self
                .pool
                .free
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            free.push(buf);
            // The last buffer in use (this one: its permit is released
            // after this body): the pool goes idle, and all but a few of
            // its buffers go back to the allocator, which returns them to
            // the OS (`sys::memory`). Busy, it keeps them for reuse.
            if self.pool.capacity - self.pool.permits.available_permits() == 1 {
                free.truncate(IDLE_KEEP);
            }
        }
        // Released after the buffer is back on the free list, so a waiter
        // woken by it finds it there; then those waiting for a buffer above
        // the reserve look again.
        drop(self.pool_permit.take());
        if !self.overflow {
            self.pool.returned.notify_waiters();
        }
    }
}

/// The owner behind a frame: exposes only the filled bytes.
struct FrameOwner(PooledBuf);

impl AsRef<[u8]> for FrameOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0.buf().as_slice()[..self.0.filled]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_rounded_up() {
        for len in [1, ALIGN - 1, ALIGN, ALIGN + 1, 1 << 20] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0, "len {len}");
            assert!(b.len() >= len && b.len() % ALIGN == 0);
        }
    }

    #[tokio::test]
    async fn reserved_share_and_overflow_serve_streams_that_hold_none() {
        let pool = BufferPool::with_shares(ALIGN, 4, 1, 2);
        // Streams that already hold buffers take extras down to the
        // reserve, no further.
        let extras: Vec<_> = std::iter::from_fn(|| pool.try_get_extra()).collect();
        assert_eq!(extras.len(), 3);
        // A stream holding none gets the reserved one, then overflow ones.
        let first = pool.get_first().await;
        assert_eq!((pool.in_use(), pool.overflow_in_use()), (4, 0));
        let o1 = pool.get_first().await;
        let o2 = pool.get_first().await;
        assert_eq!(pool.overflow_in_use(), 2);
        // Overflow buffers are freed, not kept: the bound is the pool plus
        // the overflow.
        drop((o1, o2));
        assert_eq!(pool.overflow_in_use(), 0);
        assert_eq!(pool.inner.free.lock().unwrap().len(), 0);
        // With both used up, a first buffer waits for a shared one...
        let _o: Vec<_> = (0..2)
            .map(|_| {
                Arc::clone(&pool.inner.overflow)
                    .try_acquire_owned()
                    .unwrap()
            })
            .collect();
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get_first().await.len() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(waiter.await.unwrap(), ALIGN);
        drop(extras);
    }

    #[tokio::test]
    async fn a_waiting_first_buffer_gets_an_overflow_one_that_comes_back() {
        // The shared buffer is held by a stalled stream; the overflow one
        // cycles among busy streams.
        let pool = BufferPool::with_shares(ALIGN, 1, 0, 1);
        let stalled = pool.get_first().await;
        let busy = pool.get_first().await;
        assert_eq!((pool.in_use(), pool.overflow_in_use()), (1, 1));
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get_first().await.overflow }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // The busy stream's frame is sent, and it asks again at once: the
        // overflow buffer goes to the one that waited.
        drop(busy);
        assert!(pool.try_get().is_none());
        assert!(Arc::clone(&pool.inner.overflow)
            .try_acquire_owned()
            .is_err());
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), waiter)
            .await
            .expect("the waiter got the overflow buffer that came back")
            .unwrap();
        assert!(got);
        // Neither permit was lost to the acquire that lost the race.
        assert_eq!((pool.in_use(), pool.overflow_in_use()), (1, 0));
        drop(stalled);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn pool_is_bounded_and_buffers_come_back() {
        let pool = BufferPool::new(8192, 2);
        let a = pool.try_get().unwrap();
        let b = pool.try_get().unwrap();
        assert!(pool.try_get().is_none(), "a third buffer past the bound");
        assert_eq!(pool.in_use(), 2);
        let a_ptr = a.buf().as_slice().as_ptr();
        drop(a);
        let c = pool.try_get().expect("a dropped buffer is free again");
        assert_eq!(c.buf().as_slice().as_ptr(), a_ptr, "the buffer is reused");
        drop((b, c));
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn an_idle_pool_keeps_only_a_few_buffers() {
        let pool = BufferPool::new(ALIGN, 16);
        let mut held: Vec<PooledBuf> = (0..16).map(|_| pool.try_get().unwrap()).collect();
        let free = |p: &BufferPool| p.inner.free.lock().unwrap().len();
        // Busy: every returned buffer is kept for reuse.
        held.truncate(1);
        assert_eq!(free(&pool), 15);
        // The last one back: idle, all but IDLE_KEEP are freed.
        held.clear();
        assert_eq!(pool.in_use(), 0);
        assert_eq!(free(&pool), IDLE_KEEP);
        // And the pool still serves its whole bound.
        let again: Vec<PooledBuf> = (0..16).map(|_| pool.try_get().unwrap()).collect();
        assert!(pool.try_get().is_none());
        drop(again);
    }

    #[test]
    fn frozen_frame_is_zero_copy_and_returns_on_last_drop() {
        let pool = BufferPool::new(ALIGN, 1);
        let mut buf = pool.try_get().unwrap();
        buf.as_mut_slice()[..5].copy_from_slice(b"hello");
        buf.set_filled(5);
        let ptr = buf.buf().as_slice().as_ptr();
        let frame = buf.freeze();
        assert_eq!(&frame[..], b"hello");
        assert_eq!(frame.as_ptr(), ptr, "the frame points into the buffer");
        let part = frame.slice(1..3);
        drop(frame);
        assert!(pool.try_get().is_none(), "a slice still holds the buffer");
        assert_eq!(&part[..], b"el");
        drop(part);
        assert!(pool.try_get().is_some());
    }

    #[test]
    fn frame_never_shows_bytes_past_filled() {
        let pool = BufferPool::new(ALIGN, 1);
        let mut buf = pool.try_get().unwrap();
        buf.as_mut_slice().fill(0xAA);
        buf.set_filled(3);
        let f = buf.freeze();
        assert_eq!(f.len(), 3);
        drop(f);
        let mut again = pool.try_get().unwrap();
        again.set_filled(0);
        assert!(again.freeze().is_empty());
    }

    #[test]
    fn stream_permit_is_released_with_the_frame() {
        let pool = BufferPool::new(ALIGN, 4);
        let stream = Arc::new(Semaphore::new(1));
        let mut buf = pool.try_get().unwrap();
        buf.attach_permit(Arc::clone(&stream).try_acquire_owned().unwrap());
        let frame = buf.freeze();
        assert_eq!(stream.available_permits(), 0);
        drop(frame);
        assert_eq!(stream.available_permits(), 1);
    }

    #[tokio::test]
    async fn get_waits_for_a_buffer_to_come_back() {
        let pool = BufferPool::new(ALIGN, 1);
        let held = pool.get().await;
        let p2 = pool.clone();
        let waiter = tokio::spawn(async move { p2.get().await.len() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), ALIGN);
    }
}
