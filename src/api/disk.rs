//! Disk bytes: the `Range` header (RFC 9110 14) and the response body of
//! `GET`/`HEAD /vms/{vm}/snapshots/{snap}/disks/{disk}`.
//!
//! Correctness first: one range (`bytes=a-b`, `bytes=a-`, `bytes=-n`), 206
//! with `Content-Range`, 416 for anything unsatisfiable or invalid (never a
//! silent 200 with the whole disk: a backup client that asked for a range
//! and got the whole file would corrupt its replica). The reader runs on the
//! blocking pool in 1 MiB frames through a bounded channel, so memory per
//! stream is bounded. The io core replaces [`respond`]'s body with its fast
//! path; everything about a disk answer goes through that one function.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Response, StatusCode};
use tokio::sync::mpsc;

use super::body::ApiBody;
use super::ApiError;

/// Frame size of a disk stream: large frames stream far faster than 8 KiB
/// ones (ARCHITECTURE.md), and the Python client reads 1 MiB at a time.
pub const FRAME_BYTES: usize = 1 << 20;
/// Frames read ahead of the socket per stream (memory per stream is about
/// `(FRAME_QUEUE + 2) * FRAME_BYTES`).
const FRAME_QUEUE: usize = 2;

/// A satisfiable byte range: `start..start+len` within the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSpan {
    pub start: u64,
    pub len: u64,
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No `Range` header: the whole file, 200.
    Whole,
    /// One satisfiable range: 206.
    Partial(ByteSpan),
    /// Invalid, several ranges, or past the end: 416.
    Unsatisfiable,
}

/// Parse a `Range` header value against a file of `size` bytes. Pure.
pub fn parse_range(value: Option<&[u8]>, size: u64) -> RangeAsk {
    let Some(value) = value else {
        return RangeAsk::Whole;
    };
    let Ok(value) = std::str::from_utf8(value) else {
        return RangeAsk::Unsatisfiable;
    };
    let Some((unit, set)) = value.trim().split_once('=') else {
        return RangeAsk::Unsatisfiable;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAsk::Unsatisfiable;
    }
    let set = set.trim();
    // Several ranges are multipart/byteranges, the io core's extension.
    if set.contains(',') {
        return RangeAsk::Unsatisfiable;
    }
    let Some((first, last)) = set.split_once('-') else {
        return RangeAsk::Unsatisfiable;
    };
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // More digits than u64 holds: past the end of any file.
        Some(s.parse().unwrap_or(u64::MAX))
    };
    let span = match (first.is_empty(), last.is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match num(last) {
            Some(0) | None => return RangeAsk::Unsatisfiable,
            Some(n) => {
                let n = n.min(size);
                ByteSpan {
                    start: size - n,
                    len: n,
                }
            }
        },
        // bytes=a-: from a to the end.
        (false, true) => match num(first) {
            Some(a) if a < size => ByteSpan {
                start: a,
                len: size - a,
            },
            _ => return RangeAsk::Unsatisfiable,
        },
        // bytes=a-b: inclusive; b past the end is clipped (RFC 9110 14.1.2).
        (false, false) => match (num(first), num(last)) {
            (Some(a), Some(b)) if a <= b && a < size => ByteSpan {
                start: a,
                len: b.min(size - 1) - a + 1,
            },
            _ => return RangeAsk::Unsatisfiable,
        },
        (true, true) => return RangeAsk::Unsatisfiable,
    };
    if span.len == 0 {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Partial(span)
}

/// The answer for a disk read: headers, and unless `head`, the bytes.
pub fn respond(
    file: File,
    size: u64,
    range: Option<&HeaderValue>,
    head: bool,
) -> Result<(Response<ApiBody>, bool), ApiError> {
    let (status, span) = match parse_range(range.map(HeaderValue::as_bytes), size) {
        RangeAsk::Whole => (
            StatusCode::OK,
            ByteSpan {
                start: 0,
                len: size,
            },
        ),
        RangeAsk::Partial(span) => (StatusCode::PARTIAL_CONTENT, span),
        RangeAsk::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, span.len);
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", span.start, span.start + span.len - 1),
        );
    }
    let streaming = !head && span.len > 0;
    let body = if streaming {
        let (tx, rx) = mpsc::channel(FRAME_QUEUE);
        tokio::task::spawn_blocking(move || read_span(&file, span, &tx));
        ApiBody::channel(rx, span.len)
    } else {
        ApiBody::empty()
    };
    builder
        .body(body)
        .map(|r| (r, streaming))
        .map_err(|e| ApiError::Internal(format!("building the disk answer: {e}")))
}

/// Read `span` of `file` in frames into `tx`, on the blocking pool. Stops
/// when the receiver is gone (client left) and sends an error, never a short
/// body, when the file ends early or a read fails.
fn read_span(file: &File, span: ByteSpan, tx: &mpsc::Sender<std::io::Result<Bytes>>) {
    let mut offset = span.start;
    let end = span.start + span.len;
    while offset < end {
        let want = usize::try_from((end - offset).min(FRAME_BYTES as u64)).unwrap_or(FRAME_BYTES);
        let mut buf = BytesMut::zeroed(want);
        let mut filled = 0;
        while filled < want {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "disk file shorter than its announced size",
                    )));
                    return;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        offset += want as u64;
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &str, size: u64) -> RangeAsk {
        parse_range(Some(v.as_bytes()), size)
    }
    fn span(start: u64, len: u64) -> RangeAsk {
        RangeAsk::Partial(ByteSpan { start, len })
    }

    #[test]
    fn single_ranges() {
        assert_eq!(parse_range(None, 10), RangeAsk::Whole);
        assert_eq!(p("bytes=0-9", 10), span(0, 10));
        assert_eq!(p("bytes=2-4", 10), span(2, 3));
        assert_eq!(p("bytes=2-400", 10), span(2, 8));
        assert_eq!(p("bytes=7-", 10), span(7, 3));
        assert_eq!(p("bytes=-3", 10), span(7, 3));
        assert_eq!(p("bytes=-30", 10), span(0, 10));
        assert_eq!(p("Bytes = 1-1", 10), span(1, 1));
        assert_eq!(p("bytes=9-99999999999999999999999", 10), span(9, 1));
    }

    #[test]
    fn unsatisfiable_or_invalid() {
        for v in [
            "bytes=10-",
            "bytes=10-12",
            "bytes=5-4",
            "bytes=-0",
            "bytes=-",
            "bytes=a-b",
            "bytes=1-2,4-5",
            "items=0-1",
            "bytes 0-1",
            "bytes=+1-2",
            "bytes=0x1-2",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(p(v, 10), RangeAsk::Unsatisfiable, "{v}");
        }
        // Nothing in an empty file can be asked for.
        assert_eq!(p("bytes=0-", 0), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=-5", 0), RangeAsk::Unsatisfiable);
    }
}
