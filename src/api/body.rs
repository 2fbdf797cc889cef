//! The response body type, and the access log written when it ends.
//!
//! A body is either fully in memory (JSON, metrics, errors), an io core
//! [`ReadStream`] of a known length (disk bytes, incremental streams of
//! format version 1), or [`Chunked`]: frames of a length nobody knows ahead
//! (format version 2, whose zero blocks and compression are found while
//! reading), sent with HTTP/1.1 chunked encoding and ended by an explicit
//! [`Chunk::End`], so a producer that dies is a broken body, never a short
//! one. A stream that fails yields an error
//! frame, so hyper aborts the connection instead of ending the body cleanly:
//! the client sees a broken transfer, never a short file. Each body carries
//! the request's [`AccessRecord`]; when hyper drops the body (sent, or the
//! client went away) the record is written as one access-log line and into
//! the metrics, with the bytes actually handed to hyper. So the log says
//! what was sent, not what was planned.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::io::ReadStream;

/// What the access-log line says of a request (never a password or token).
pub struct AccessRecord {
    pub metrics: Arc<Metrics>,
    pub method: http::Method,
    /// The request path and query, as received (escaped when logged).
    pub target: String,
    pub route: &'static str,
    pub status: u16,
    pub user: Option<String>,
    pub peer: std::net::SocketAddr,
    pub start: Instant,
    /// Whether this body is a disk stream (counted in streams in flight).
    pub stream: bool,
}

/// Longest request target written to the log; longer ones are cut.
const MAX_LOGGED_TARGET: usize = 512;

enum Kind {
    Full(Option<Bytes>),
    Stream { stream: ReadStream, remaining: u64 },
    Chunked { rx: Chunked, ended: bool },
}

/// One message of a [`Chunked`] body's producer.
pub enum Chunk {
    Data(Bytes),
    /// The body is complete.
    End,
    /// The body is broken: the connection is aborted.
    Fail(std::io::Error),
}

/// The receiving end of a body of unknown length.
pub type Chunked = mpsc::Receiver<Chunk>;

/// The body of every response.
pub struct ApiBody {
    kind: Kind,
    sent: u64,
    failed: bool,
    record: Option<AccessRecord>,
    /// What the server ties to this body's life (its connection's count
    /// of requests in flight), told of every poll, dropped with the body.
    guard: Option<Box<dyn PollObserver>>,
}

/// Told how the HTTP layer polls a body: `Some(true)` a frame was taken,
/// `Some(false)` the body had nothing yet (it will wake the HTTP layer),
/// `None` the body ended. A body that is not polled for long while it has
/// not ended is one its client does not take (an HTTP/2 stream whose flow
/// control window stays shut): the server's watchdog cuts it.
pub trait PollObserver: Send {
    fn polled(&self, outcome: Option<bool>);
}

impl ApiBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        ApiBody::new(Kind::Full((!b.is_empty()).then_some(b)))
    }

    pub fn empty() -> Self {
        ApiBody::new(Kind::Full(None))
    }

    /// A body of exactly `len` bytes from an io core stream.
    pub fn stream(stream: ReadStream, len: u64) -> Self {
        ApiBody::new(Kind::Stream {
            stream,
            remaining: len,
        })
    }

    /// A body of unknown length: `rx`'s data until its [`Chunk::End`].
    pub fn chunked(rx: Chunked) -> Self {
        ApiBody::new(Kind::Chunked { rx, ended: false })
    }

    fn new(kind: Kind) -> Self {
        ApiBody {
            kind,
            sent: 0,
            failed: false,
            record: None,
            guard: None,
        }
    }

    /// Keep `guard` until this body is dropped (sent, or abandoned with its
    /// connection), telling it of every poll.
    pub fn attach(&mut self, guard: impl PollObserver + 'static) {
        self.guard = Some(Box::new(guard));
    }

    /// Attach the access record: it is written when the body is dropped.
    pub fn set_record(&mut self, record: AccessRecord) {
        if record.stream {
            record.metrics.stream_started();
        }
        self.record = Some(record);
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(Ok)),
            Kind::Stream { stream, remaining } => {
                if *remaining == 0 {
                    Poll::Ready(None)
                } else {
                    match stream.poll_next_frame(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Some(Ok(b))) => {
                            let n = b.len() as u64;
                            if n > *remaining {
                                Poll::Ready(Some(Err(std::io::Error::other(
                                    "disk stream sent more than the announced length",
                                ))))
                            } else {
                                *remaining -= n;
                                Poll::Ready(Some(Ok(b)))
                            }
                        }
                        Poll::Ready(Some(Err(e))) => {
                            tracing::warn!(error = %error_chain(&e), "disk stream failed: aborting the answer");
                            Poll::Ready(Some(Err(std::io::Error::other(e))))
                        }
                        Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "disk stream stopped before the announced length",
                        )))),
                    }
                }
            }
            Kind::Chunked { ended: true, .. } => Poll::Ready(None),
            Kind::Chunked { rx, ended } => match rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Chunk::Data(b))) => Poll::Ready(Some(Ok(b))),
                Poll::Ready(Some(Chunk::End)) => {
                    *ended = true;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Chunk::Fail(e))) => {
                    tracing::warn!(error = %error_chain(&e), "disk stream failed: aborting the answer");
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "disk stream producer stopped before the end",
                )))),
            },
        };
        if let Some(g) = &this.guard {
            g.polled(match &polled {
                Poll::Ready(Some(Ok(_))) => Some(true),
                Poll::Pending => Some(false),
                Poll::Ready(_) => None,
            });
        }
        match polled {
            Poll::Ready(Some(Ok(b))) => {
                this.sent += b.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream { remaining, .. } => *remaining == 0,
            Kind::Chunked { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { remaining, .. } => SizeHint::with_exact(*remaining),
            Kind::Chunked { .. } => SizeHint::default(),
        }
    }
}

impl Drop for ApiBody {
    fn drop(&mut self) {
        let Some(r) = self.record.take() else {
            return;
        };
        if r.stream {
            r.metrics.stream_ended();
        }
        r.metrics
            .request(r.route, method_label(&r.method), r.status, self.sent);
        let mut target = r.target;
        if target.len() > MAX_LOGGED_TARGET {
            let mut cut = MAX_LOGGED_TARGET;
            while !target.is_char_boundary(cut) {
                cut -= 1;
            }
            target.truncate(cut);
            target.push_str("...");
        }
        let complete = !self.failed && self.is_end_stream();
        tracing::info!(
            target: "access",
            peer = %r.peer,
            method = %r.method,
            path = ?target,
            status = r.status,
            bytes = self.sent,
            complete,
            duration_ms = r.start.elapsed().as_secs_f64() * 1000.0,
            // From the client (a login's user name): escaped.
            user = ?r.user.as_deref().unwrap_or("-"),
        );
    }
}

pub use crate::error::chain as error_chain;

/// A bounded label for a method (metrics must not grow with junk methods).
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// A JSON answer. Serialization of our own types cannot fail; if it ever
/// did, the answer is a plain 500 rather than a panic.
pub fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    let (status, bytes) = match serde_json::to_vec(value) {
        Ok(mut v) => {
            // Like the old service (Go's json.Encoder): a trailing newline.
            v.push(b'\n');
            (status, v)
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"Server error","details":"cannot encode the answer"}"#.to_vec(),
        ),
    };
    let mut resp = Response::new(ApiBody::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
