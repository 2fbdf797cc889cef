//! The watchdog of one connection: cuts a response that makes no progress
//! (`api.send_timeout`) and an HTTP/2 connection left idle
//! (`api.http2_idle_timeout`).
//!
//! hyper has neither. A client that stops reading a download leaves hyper
//! blocked on a socket write forever, holding the frames it was given and,
//! behind them, the stream's read-ahead buffers; an HTTP/2 client may keep
//! a connection open with no stream at all. So every connection's socket is
//! wrapped in [`Watched`], which notes when a write starts to wait on the
//! peer and when bytes go out again, and the connection task polls
//! [`Activity::verdict`] beside the connection: when a write has waited
//! `send_timeout` with no byte sent, or an HTTP/2 connection has had no
//! request for `http2_idle_timeout`, the task drops the connection, which
//! drops its response bodies and returns their buffers.
//!
//! A request counts as active from the moment hyper hands it to the service
//! until its response body is dropped (sent or abandoned): the service
//! attaches an [`ActiveGuard`] to every response body. A long request that
//! writes nothing (a snapshot being created) is not cut: only a write that
//! waits on the peer is, or a response body that hyper stops asking frames
//! of although it has not ended and is not waiting on a disk read: an
//! HTTP/2 stream whose client keeps its flow-control window shut (the
//! socket is then not blocked at all). That cuts the whole connection, the
//! only way to take back the frames hyper holds for the stream.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why the watchdog cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A write waited on the peer for `api.send_timeout`.
    SendTimeout,
    /// An HTTP/2 connection had no request for `api.http2_idle_timeout`.
    Idle,
}

/// What the watchdog knows of one connection. Times are milliseconds since
/// `base`; 0 means "not waiting".
pub struct Activity {
    base: Instant,
    active: AtomicUsize,
    /// The response bodies being sent, to find one its client does not
    /// take (see [`BodyState`]).
    bodies: std::sync::Mutex<Vec<std::sync::Weak<BodyState>>>,
    /// Last time a request started or ended.
    last_change: AtomicU64,
    /// When the current wait of a write on the peer began (0: none).
    write_blocked_since: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            active: AtomicUsize::new(0),
            bodies: std::sync::Mutex::new(Vec::new()),
            last_change: AtomicU64::new(1),
            write_blocked_since: AtomicU64::new(0),
        })
    }

    /// Now, in this connection's milliseconds (never 0).
    fn now(&self) -> u64 {
        (self.base.elapsed().as_millis() as u64).max(1)
    }

    /// A request starts; it ends when the guard is dropped.
    pub fn request(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.last_change.store(self.now(), Ordering::Relaxed);
        ActiveGuard {
            activity: Arc::clone(self),
            body: Arc::new(BodyState {
                since: AtomicU64::new(0),
            }),
        }
    }

    /// Whether a response body has waited on its client (not polled while
    /// it had not ended and was not waiting on us) for `limit`.
    fn body_stalled(&self, now: u64, limit: u64) -> bool {
        let mut bodies = self
            .bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bodies.retain(|w| w.strong_count() > 0);
        bodies.iter().filter_map(std::sync::Weak::upgrade).any(|b| {
            let since = b.since.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) >= limit
        })
    }

    fn write_waits(&self) {
        let _ = self.write_blocked_since.compare_exchange(
            0,
            self.now(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn write_progressed(&self) {
        self.write_blocked_since.store(0, Ordering::Relaxed);
    }

    /// Whether the connection must be cut now. `idle` is `None` for
    /// HTTP/1.1 (hyper's header read timeout covers its idle connections).
    pub fn verdict(&self, send_timeout: Duration, idle: Option<Duration>) -> Option<Cut> {
        let now = self.now();
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        let limit = send_timeout.as_millis() as u64;
        if blocked != 0 && now.saturating_sub(blocked) >= limit {
            return Some(Cut::SendTimeout);
        }
        if self.body_stalled(now, limit) {
            return Some(Cut::SendTimeout);
        }
        if let Some(idle) = idle {
            let since = self.last_change.load(Ordering::Relaxed);
            if self.active.load(Ordering::Relaxed) == 0
                && blocked == 0
                && now.saturating_sub(since) >= idle.as_millis() as u64
            {
                return Some(Cut::Idle);
            }
        }
        None
    }
}

/// A request in flight on a connection (see the module doc). Attached to
/// its response body, it also watches how hyper polls that body.
pub struct ActiveGuard {
    activity: Arc<Activity>,
    body: Arc<BodyState>,
}

/// How a response body is being taken: `since` is when it last handed a
/// frame out (or was attached) and has not been polled since; 0 while it
/// waits on us (a disk read) or before it exists.
pub struct BodyState {
    since: AtomicU64,
}

impl ActiveGuard {
    /// The handler is done and its body starts: watch how it is taken.
    pub fn body_starts(&self) {
        self.body
            .since
            .store(self.activity.now(), Ordering::Relaxed);
        self.activity
            .bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::downgrade(&self.body));
    }
}

impl crate::api::body::PollObserver for ActiveGuard {
    fn polled(&self, outcome: Option<bool>) {
        let v = match outcome {
            // A frame went out: from now on it waits for the next poll.
            Some(true) => self.activity.now(),
            // Waiting on us, or done: not the client's doing.
            Some(false) | None => 0,
        };
        self.body.since.store(v, Ordering::Relaxed);
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.activity.active.fetch_sub(1, Ordering::Relaxed);
        self.activity
            .last_change
            .store(self.activity.now(), Ordering::Relaxed);
    }
}

/// A socket whose writes report to an [`Activity`].
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }

    fn note<R>(&self, p: &Poll<io::Result<R>>, progressed: impl Fn(&R) -> bool) {
        match p {
            Poll::Pending => self.activity.write_waits(),
            Poll::Ready(Ok(r)) if progressed(r) => self.activity.write_progressed(),
            Poll::Ready(_) => {}
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&p, |n| *n > 0);
        p
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&p, |n| *n > 0);
        p
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(&p, |_| true);
        p
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(&p, |_| true);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let a = Activity::new();
        let long = Duration::from_secs(3600);
        assert_eq!(a.verdict(long, Some(long)), None);
        // Idle only for HTTP/2, and only with no request active.
        assert_eq!(a.verdict(long, Some(Duration::ZERO)), Some(Cut::Idle));
        assert_eq!(a.verdict(long, None), None);
        let g = a.request();
        assert_eq!(a.verdict(long, Some(Duration::ZERO)), None);
        // A write that waits is cut at the send timeout, and not once bytes
        // went out again.
        a.write_waits();
        assert_eq!(a.verdict(Duration::ZERO, None), Some(Cut::SendTimeout));
        assert_eq!(a.verdict(long, None), None);
        a.write_progressed();
        assert_eq!(a.verdict(Duration::ZERO, None), None);
        drop(g);
        assert_eq!(a.verdict(long, Some(Duration::ZERO)), Some(Cut::Idle));
    }

    #[test]
    fn a_body_not_taken_is_cut() {
        use crate::api::body::PollObserver;
        let a = Activity::new();
        let long = Duration::from_secs(3600);
        let g = a.request();
        // In the handler: not watched yet.
        assert_eq!(a.verdict(Duration::ZERO, None), None);
        g.body_starts();
        assert_eq!(a.verdict(Duration::ZERO, None), Some(Cut::SendTimeout));
        assert_eq!(a.verdict(long, None), None);
        // Waiting on a disk read is not the client's doing.
        g.polled(Some(false));
        assert_eq!(a.verdict(Duration::ZERO, None), None);
        // A frame went out and nobody asks for the next one.
        g.polled(Some(true));
        assert_eq!(a.verdict(Duration::ZERO, None), Some(Cut::SendTimeout));
        g.polled(None);
        assert_eq!(a.verdict(Duration::ZERO, None), None);
        g.polled(Some(true));
        drop(g);
        assert_eq!(
            a.verdict(Duration::ZERO, None),
            None,
            "a dropped body is gone"
        );
    }
}
