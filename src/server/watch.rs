//! The watchdog of one connection: resets an HTTP/2 stream that makes no
//! progress, cuts a connection that makes none (`api.send_timeout`), and
//! closes an HTTP/2 connection left idle (`api.http2_idle_timeout`).
//!
//! hyper has none of these. A client that stops reading a download leaves
//! hyper blocked on a socket write forever, holding the frames it was given
//! and, behind them, the stream's read-ahead buffers; an HTTP/2 client may
//! keep one stream's flow-control window shut (the socket stays writable,
//! hyper simply stops asking that body for frames), or keep a connection
//! open with no stream at all. So every connection's socket is wrapped in
//! [`Watched`], which notes when a write starts to wait on the peer and
//! when bytes go out again, and the connection task polls
//! [`Activity::verdict`] beside the connection.
//!
//! A request counts as active from the moment hyper hands it to the service
//! until its response body is dropped (sent or abandoned): the service
//! attaches an [`ActiveGuard`] to every response body, told of every poll
//! of it. A long request that writes nothing (a snapshot being created) is
//! never cut: only what waits on the peer is.
//!
//! - A write that waits on the peer for `send_timeout` with no byte sent:
//!   the whole connection makes no progress, and the task drops it, which
//!   drops its response bodies and returns their buffers.
//! - A response body that hyper stops asking frames of although it has not
//!   ended and is not waiting on a disk read, for `send_timeout`: on
//!   HTTP/2, a stream whose client keeps its window shut. That stream alone
//!   is reset: hyper runs each HTTP/2 stream as a task of its own, spawned
//!   through [`StreamExec`], which makes every such task resettable (a
//!   [`StreamCut`], known to the body through a task-local); the watchdog
//!   fires it, the task drops the stream, and h2 sends `RST_STREAM`
//!   (`CANCEL`) for it, drops the frames it held for it, and the body's
//!   buffers go back. The connection and its other streams go on. On
//!   HTTP/1.1 (no stream task) the connection is cut, as the only way to
//!   take the body back.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Why the watchdog cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A write waited on the peer for `api.send_timeout`.
    SendTimeout,
    /// An HTTP/2 connection had no request for `api.http2_idle_timeout`.
    Idle,
}

/// What the watchdog decided on one look at a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// The connection must be cut now.
    pub cut: Option<Cut>,
    /// HTTP/2 streams reset on this look (their connection goes on).
    pub streams_reset: usize,
}

tokio::task_local! {
    /// The reset handle of the HTTP/2 stream whose task is running.
    static STREAM: Arc<StreamCut>;
}

/// The reset handle of one HTTP/2 stream's task (see the module doc).
#[derive(Default)]
pub struct StreamCut {
    notify: Notify,
}

impl StreamCut {
    /// Reset the stream: its task drops it the next time it runs (a
    /// permit is kept if the task is not waiting yet).
    fn fire(&self) {
        self.notify.notify_one();
    }
}

/// hyper's executor for HTTP/2 stream tasks: each is spawned on the
/// runtime beside its [`StreamCut`], and dropped (stream reset, body and
/// buffers dropped) when the watchdog fires it.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let cut = Arc::new(StreamCut::default());
        let fired = Arc::clone(&cut);
        tokio::spawn(STREAM.scope(cut, async move {
            tokio::select! {
                _ = fut => {}
                () = fired.notify.notified() => {}
            }
        }));
    }
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
                stream: OnceLock::new(),
                reset: AtomicBool::new(false),
            }),
        }
    }

    /// The response bodies that have waited on their client (not polled
    /// while they had not ended and were not waiting on us) for `limit`:
    /// those of HTTP/2 streams are reset (counted in the answer), any other
    /// makes the answer `true` (the connection must be cut).
    fn stalled_bodies(&self, now: u64, limit: u64) -> (bool, usize) {
        let mut bodies = self
            .bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bodies.retain(|w| w.strong_count() > 0);
        let (mut cut, mut reset) = (false, 0);
        for b in bodies.iter().filter_map(std::sync::Weak::upgrade) {
            let since = b.since.load(Ordering::Relaxed);
            if since == 0 || now.saturating_sub(since) < limit {
                continue;
            }
            match b.stream.get() {
                Some(stream) => {
                    if !b.reset.swap(true, Ordering::Relaxed) {
                        stream.fire();
                        reset += 1;
                    }
                }
                None => cut = true,
            }
        }
        (cut, reset)
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

    /// What to do now: cut the connection, and which stalled HTTP/2
    /// streams were reset. `idle` is `None` for HTTP/1.1 (hyper's header
    /// read timeout covers its idle connections).
    pub fn verdict(&self, send_timeout: Duration, idle: Option<Duration>) -> Verdict {
        let now = self.now();
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        let limit = send_timeout.as_millis() as u64;
        if blocked != 0 && now.saturating_sub(blocked) >= limit {
            return Verdict {
                cut: Some(Cut::SendTimeout),
                streams_reset: 0,
            };
        }
        let (cut, streams_reset) = self.stalled_bodies(now, limit);
        if cut {
            return Verdict {
                cut: Some(Cut::SendTimeout),
                streams_reset,
            };
        }
        if let Some(idle) = idle {
            let since = self.last_change.load(Ordering::Relaxed);
            if self.active.load(Ordering::Relaxed) == 0
                && blocked == 0
                && now.saturating_sub(since) >= idle.as_millis() as u64
            {
                return Verdict {
                    cut: Some(Cut::Idle),
                    streams_reset,
                };
            }
        }
        Verdict {
            cut: None,
            streams_reset,
        }
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
/// waits on us (a disk read) or before it exists. `stream`: the reset
/// handle of its HTTP/2 stream (none on HTTP/1.1); `reset`: fired already.
pub struct BodyState {
    since: AtomicU64,
    stream: OnceLock<Arc<StreamCut>>,
    reset: AtomicBool,
}

impl ActiveGuard {
    /// The handler is done and its body starts: watch how it is taken.
    /// Called from the request's task: on HTTP/2 that is its stream's task
    /// ([`StreamExec`]), whose reset handle the body keeps.
    pub fn body_starts(&self) {
        if let Ok(stream) = STREAM.try_with(Arc::clone) {
            let _ = self.body.stream.set(stream);
        }
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
        assert_eq!(a.verdict(long, Some(long)).cut, None);
        // Idle only for HTTP/2, and only with no request active.
        assert_eq!(a.verdict(long, Some(Duration::ZERO)).cut, Some(Cut::Idle));
        assert_eq!(a.verdict(long, None).cut, None);
        let g = a.request();
        assert_eq!(a.verdict(long, Some(Duration::ZERO)).cut, None);
        // A write that waits is cut at the send timeout, and not once bytes
        // went out again.
        a.write_waits();
        assert_eq!(a.verdict(Duration::ZERO, None).cut, Some(Cut::SendTimeout));
        assert_eq!(a.verdict(long, None).cut, None);
        a.write_progressed();
        assert_eq!(a.verdict(Duration::ZERO, None).cut, None);
        drop(g);
        assert_eq!(a.verdict(long, Some(Duration::ZERO)).cut, Some(Cut::Idle));
    }

    #[test]
    fn a_body_not_taken_is_cut() {
        use crate::api::body::PollObserver;
        let a = Activity::new();
        let long = Duration::from_secs(3600);
        let g = a.request();
        // In the handler: not watched yet.
        assert_eq!(a.verdict(Duration::ZERO, None).cut, None);
        g.body_starts();
        assert_eq!(a.verdict(Duration::ZERO, None).cut, Some(Cut::SendTimeout));
        assert_eq!(a.verdict(long, None).cut, None);
        // Waiting on a disk read is not the client's doing.
        g.polled(Some(false));
        assert_eq!(a.verdict(Duration::ZERO, None).cut, None);
        // A frame went out and nobody asks for the next one.
        g.polled(Some(true));
        assert_eq!(a.verdict(Duration::ZERO, None).cut, Some(Cut::SendTimeout));
        g.polled(None);
        assert_eq!(a.verdict(Duration::ZERO, None).cut, None);
        g.polled(Some(true));
        drop(g);
        assert_eq!(
            a.verdict(Duration::ZERO, None).cut,
            None,
            "a dropped body is gone"
        );
    }

    #[test]
    fn a_stalled_http2_stream_is_reset_alone() {
        use crate::api::body::PollObserver;
        use hyper::rt::Executor;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let a = Activity::new();
            let (stalled_tx, mut stalled_rx) = tokio::sync::mpsc::channel::<()>(1);
            let (flowing_tx, mut flowing_rx) = tokio::sync::mpsc::channel::<()>(1);
            let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(2);
            for (tx, stalls) in [(stalled_tx, true), (flowing_tx, false)] {
                let g = a.request();
                let started = started_tx.clone();
                StreamExec.execute(async move {
                    let _tx = tx; // dropped with the task
                    g.body_starts();
                    if !stalls {
                        // Waiting on us (a disk read): not stalled.
                        g.polled(Some(false));
                    }
                    started.send(()).await.unwrap();
                    std::future::pending::<()>().await;
                });
            }
            started_rx.recv().await.unwrap();
            started_rx.recv().await.unwrap();
            let v = a.verdict(Duration::ZERO, None);
            assert_eq!(v.cut, None, "the connection goes on");
            assert_eq!(v.streams_reset, 1);
            // The stalled stream's task ended (and dropped its body).
            assert!(stalled_rx.recv().await.is_none());
            assert_eq!(a.verdict(Duration::ZERO, None).streams_reset, 0);
            // The other one runs on.
            assert!(matches!(
                flowing_rx.try_recv(),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty)
            ));
        });
    }
}
