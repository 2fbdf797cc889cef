//! Write coalescing under HTTP/2: the frames of a download reach TLS as
//! full records in a few large writes, not as one record pair and one
//! `writev` per 16 KiB frame.
//!
//! h2 sends a body as DATA frames of at most the peer's
//! `SETTINGS_MAX_FRAME_SIZE`, which every common client leaves at the
//! protocol's 16 KiB (curl, Go, browsers), and writes each frame on its own
//! (a 9-byte head and the payload, vectored) followed by a flush. Straight
//! into rustls, every frame became two TLS records (16,384 bytes, the most
//! a record holds, and the 9 left over), each sealed and framed on its own,
//! and one `writev` to the socket: HTTP/2 ran at about 0.8 of HTTP/1.1 on
//! one big download, and spent a quarter more CPU per byte.
//!
//! [`Coalesce`] sits between h2 and the TLS stream and copies what h2
//! writes into one buffer of [`CAPACITY`] bytes (four full records), which
//! goes to TLS when full: four records and one `writev` per 64 KiB. The
//! copy is cheap next to what it saves (the plaintext is in cache, and
//! rustls copies it into its record anyway).
//!
//! Flushes: h2 also flushes after every frame (it makes room for the next
//! one that way), so a flush cannot simply be passed on. A flush that
//! follows new bytes is deferred by one turn of the task: the task is woken
//! at once and the flush answers ready; every poll of an h2 connection ends
//! with a flush, so on that next poll either more frames came (and join the
//! buffer) or nothing was written since, and then the flush is passed on
//! and the buffer written out. A response's last bytes thus wait at most
//! one poll of their own connection, and a shutdown writes everything
//! first. HTTP/1.1 needs none of this: hyper hands TLS its 1 MiB frames
//! whole.
//!
//! Memory: the buffer exists only while it holds bytes (allocated on the
//! first write after a flush, freed when a flush empties it), so an idle
//! connection costs nothing here and a busy one [`CAPACITY`].
//!
//! Whole records only: rustls seals what it is handed at once, as records
//! of up to 16 KiB, and takes no more than its buffer limit (64 KiB of
//! sealed bytes not yet written) less what it still holds. Handed a buffer
//! while the socket is full, it took exactly the room the socket had just
//! made, one frame's worth, and sealed it as a full record and a 9-byte
//! one: once started, the pattern held for the whole download (a `writev`
//! and a record pair per frame again, measured on one 1 GiB range over
//! HTTP/2 with curl: the client made 1.6 times the reads and spent 0.77
//! s/GiB against 0.68 with nginx). So a buffer goes to TLS only once TLS
//! has written out everything it held ([`Backlog`]), and then it is taken
//! whole: full records, whatever the socket's pace.
//!
//! What the watchdog ([`super::watch`]) sees is unchanged: a write that
//! waits on the peer still answers `Pending` (once the buffer is full),
//! and so does a flush that cannot write out.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before they go to TLS: four records of 16 KiB, which is
/// also what rustls takes in one write before it must send (its default
/// buffer limit, 64 KiB).
pub const CAPACITY: usize = 64 << 10;

/// Whether the writer below still holds bytes it has taken but not yet
/// written out (rustls' sealed records, see the module doc).
pub trait Backlog {
    fn backlog(&self) -> bool;
}

impl<IO> Backlog for tokio_rustls::server::TlsStream<IO> {
    fn backlog(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

/// A writer that gathers small writes and defers flushes by one poll (see
/// the module doc).
pub struct Coalesce<T> {
    inner: T,
    /// Bytes not yet handed to `inner`, from `sent` on; empty with no
    /// capacity while nothing is pending.
    buf: Vec<u8>,
    /// How much of `buf` `inner` has taken.
    sent: usize,
    /// Bytes were written since the last flush.
    fresh: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            sent: 0,
            fresh: false,
        }
    }
}

impl<T: AsyncWrite + Backlog + Unpin> Coalesce<T> {
    /// Ready once `inner` holds nothing unwritten, so that what it is
    /// handed next it takes whole (see the module doc).
    fn poll_clear(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.inner.backlog() {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Hands every buffered byte to `inner` (the buffer keeps its memory
    /// for the next ones).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            ready!(self.poll_clear(cx))?;
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Ready when the buffer has room (writing it out if it is full).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Copies from `bufs` into the buffer while it has room; starts writing
    /// it out once full. Returns the bytes taken.
    fn gather(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CAPACITY);
        }
        let mut taken = 0;
        for b in bufs {
            let n = (CAPACITY - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..n]);
            taken += n;
            if n < b.len() {
                break;
            }
        }
        self.fresh |= taken > 0;
        if self.buf.len() >= CAPACITY {
            // Start now; if the socket is full, the waker is set and the
            // next write or flush goes on from here.
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Err(e);
            }
        }
        Ok(taken)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Backlog + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        ready!(this.poll_room(cx))?;
        if this.buf.is_empty() && buf.len() >= CAPACITY {
            // Already large: no copy.
            ready!(this.poll_clear(cx))?;
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        Poll::Ready(this.gather(cx, &[buf]))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        ready!(this.poll_room(cx))?;
        if this.buf.is_empty() && total >= CAPACITY {
            ready!(this.poll_clear(cx))?;
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        Poll::Ready(this.gather(cx, &slices))
    }

    fn is_write_vectored(&self) -> bool {
        // h2 then hands frame heads and payloads as separate slices (no
        // copy of its own); they are gathered here either way.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.fresh && !this.buf.is_empty() {
            // More frames may come on this very turn: look again on the
            // next poll, which h2 ends with another flush.
            this.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        this.fresh = false;
        ready!(this.poll_drain(cx))?;
        // Idle from here on, as far as we know: give the memory back.
        this.buf = Vec::new();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Records every write's length; accepts at most `limit` per write.
    #[derive(Clone, Default)]
    struct Log {
        writes: Arc<Mutex<Vec<usize>>>,
        flushes: Arc<Mutex<usize>>,
        bytes: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Log {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.lock().unwrap().push(buf.len());
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            *self.flushes.lock().unwrap() += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Backlog for Log {
        fn backlog(&self) -> bool {
            false
        }
    }

    /// Behaves like rustls over a slow socket: takes at most `LIMIT` less
    /// what it still holds, and the socket makes room for one frame pair's
    /// worth (a 16 KiB record and a 9-byte one) per call.
    #[derive(Default)]
    struct SlowTls {
        held: usize,
        /// The size of every write it took something of.
        taken: Vec<usize>,
    }

    impl SlowTls {
        const LIMIT: usize = 64 << 10;
        const ROOM: usize = 16_437;

        fn drain(&mut self) {
            self.held = self.held.saturating_sub(Self::ROOM);
        }
    }

    impl Backlog for SlowTls {
        fn backlog(&self) -> bool {
            self.held > 0
        }
    }

    impl AsyncWrite for SlowTls {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.drain();
            let n = buf.len().min(Self::LIMIT - self.held);
            if n == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.held += n;
            self.taken.push(n);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.drain();
            if self.held > 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_slow_socket_still_gets_whole_buffers() {
        let mut c = Coalesce::new(SlowTls::default());
        for i in 0..64 {
            let (head, payload) = frame(i);
            let all = [head.as_slice(), payload.as_slice()].concat();
            c.write_all(&all).await.unwrap();
            c.flush().await.unwrap();
        }
        c.flush().await.unwrap();
        let taken = &c.inner.taken;
        let total: usize = taken.iter().sum();
        assert_eq!(total, 64 * (9 + (16 << 10)));
        // Every buffer went in whole; only the last, a flush's tail, is
        // short. Without waiting for TLS to write out first, each write
        // took one frame pair's room (16,393 bytes).
        let (last, full) = taken.split_last().unwrap();
        assert!(full.iter().all(|&n| n == CAPACITY), "{taken:?}");
        assert_eq!(*last, total - full.len() * CAPACITY);
    }

    fn frame(i: usize) -> (Vec<u8>, Vec<u8>) {
        (vec![i as u8; 9], vec![(i + 1) as u8; 16 << 10])
    }

    #[tokio::test]
    async fn frames_go_out_in_full_buffers_and_flushes_wait_one_turn() {
        let log = Log::default();
        let mut c = Coalesce::new(log.clone());
        let mut want = Vec::new();
        // h2's pattern: a vectored frame, then a flush, eight times.
        for i in 0..8 {
            let (head, payload) = frame(i);
            want.extend_from_slice(&head);
            want.extend_from_slice(&payload);
            let mut off = 0;
            let total = head.len() + payload.len();
            while off < total {
                let all = [head.as_slice(), payload.as_slice()].concat();
                let n = c
                    .write_vectored(&[io::IoSlice::new(&all[off..])])
                    .await
                    .unwrap();
                off += n;
            }
            c.flush().await.unwrap();
        }
        // Two full buffers went out, each as one write; the tail waits.
        assert_eq!(*log.writes.lock().unwrap(), vec![CAPACITY, CAPACITY]);
        assert_eq!(*log.flushes.lock().unwrap(), 0);
        // A flush with nothing new since the last one is passed on.
        c.flush().await.unwrap();
        assert_eq!(*log.flushes.lock().unwrap(), 1);
        assert_eq!(*log.bytes.lock().unwrap(), want);
        assert_eq!(c.buf.capacity(), 0, "an empty buffer is freed");
    }

    #[tokio::test]
    async fn a_deferred_flush_wakes_its_task() {
        let log = Log::default();
        let mut c = Coalesce::new(log.clone());
        c.write_all(b"end of a response").await.unwrap();
        let waker = futures_task_waker();
        let mut cx = Context::from_waker(&waker.0);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(waker.1.count(), 1, "woken to flush on the next poll");
        assert!(log.bytes.lock().unwrap().is_empty());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(&log.bytes.lock().unwrap()[..], b"end of a response");
    }

    #[tokio::test]
    async fn shutdown_and_large_writes_pass_everything() {
        let log = Log::default();
        let mut c = Coalesce::new(log.clone());
        c.write_all(b"abc").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(&log.bytes.lock().unwrap()[..], b"abc");
        let big = vec![7u8; 3 * CAPACITY];
        let n = c.write(&big).await.unwrap();
        assert_eq!(n, big.len(), "a large write is not copied");
    }

    /// A waker that counts its wakes.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl Counter {
        fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn futures_task_waker() -> (std::task::Waker, Arc<Counter>) {
        let c = Arc::new(Counter(std::sync::atomic::AtomicUsize::new(0)));
        (std::task::Waker::from(Arc::clone(&c)), c)
    }
}
