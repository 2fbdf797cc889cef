//! The wire formats of disk bodies as framings of the io core's reads: a
//! `multipart/byteranges` body ([`wire::range::Multipart`]) and the
//! incremental stream ([`wire::stream::Encoder`]). The io core fills
//! buffers and calls a [`Framing`] for the bytes around each range; this
//! module is where the two meet, so neither `io` nor `wire` knows the other.
//!
//! [`WireReads`] gives [`IoEngine`] the two reads by name.
//!
//! Format version 2 of the incremental stream ([`incremental_v2`]) is not a
//! framing: its records depend on the data (zero blocks, compression). The
//! io core reads the data ranges plainly; a producer task cuts them into
//! the format's pieces (at most [`stream::RECORD_MAX`] each). With zstd it
//! has each piece encoded on the blocking pool (zero detection, zstd, CRC:
//! never on the network threads), several at once, and sends the results
//! in order. Without zstd a piece is a scan for zero blocks and a CRC, the
//! work version 1's framing does: the producer does it itself and passes
//! the data on as slices of the io core's buffers
//! ([`stream::encode_piece_raw`]), so version 2 moves no more bytes than
//! version 1 (copying each piece twice and a hop to the blocking pool made
//! it about half as fast on loopback). Small parts (record headers,
//! trailers, zero records) are glued into frames of about 256 KiB by the
//! io core's [`Glue`], as the io core's own producer glues them.
//!
//! Memory of one version 2 stream, beyond the io core's own `read_ahead`
//! buffers: with zstd, at most [`ENCODE_AHEAD`] pieces being encoded or
//! waiting to be sent (each its input, at most 1 MiB, and its output, at
//! most 1 MiB plus 40 bytes per 4 KiB of zero blocks), plus [`OUT_SLOTS`]
//! encoded pieces in the channel to hyper and the glue's buffer (256 KiB
//! plus at most one small part, under 272 KiB): under 14 MiB. Without
//! zstd, the data in flight are the io core's buffers (held until hyper
//! has written them, as in version 1) and that glue buffer. Encoding in the whole process runs on at most as many blocking
//! threads as there are cores ([`encode_slots`]); a stream that waits for
//! one holds only its bound.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, Semaphore};

use super::body::{Chunk, Chunked};
use crate::io::{DiskFile, Framing, Glue, IoEngine, IoError, ReadStream};
use crate::wire::range::Multipart;
use crate::wire::stream::{self, Change, ChangeKind, Encoder, StreamHeader};

/// The wire-format reads of the io core.
pub trait WireReads {
    /// A `multipart/byteranges` body for `ranges` (as
    /// [`crate::wire::range::parse`] returns them), framed by `multipart`;
    /// its length is [`Multipart::body_len`].
    fn read_multipart(
        &self,
        file: &DiskFile,
        ranges: Vec<Range<u64>>,
        multipart: Multipart,
    ) -> Result<ReadStream, IoError>;

    /// The incremental stream ([`stream`], `docs/incremental-stream.md`) of
    /// `changes` (sorted, disjoint, inside the file): data records carry the
    /// file's bytes, zero records none. A plan that breaks those rules is
    /// [`IoError::Plan`].
    fn incremental(&self, file: &DiskFile, changes: Vec<Change>) -> Result<ReadStream, IoError>;

    /// The incremental stream in format version 2 ([`incremental_v2`]).
    fn incremental_v2_body(
        &self,
        file: &DiskFile,
        changes: Vec<Change>,
        o: V2Options,
    ) -> Result<(Chunked, Range<u64>), IoError>;
}

impl WireReads for IoEngine {
    fn read_multipart(
        &self,
        file: &DiskFile,
        ranges: Vec<Range<u64>>,
        multipart: Multipart,
    ) -> Result<ReadStream, IoError> {
        let framing = MultipartFraming {
            headers: ranges
                .iter()
                .map(|r| multipart.part_header(r, file.size()))
                .collect(),
            trailer: multipart.trailer(),
        };
        self.read_framed(file, ranges, framing)
    }

    fn incremental(&self, file: &DiskFile, changes: Vec<Change>) -> Result<ReadStream, IoError> {
        stream::validate_changes(&changes, file.size()).map_err(|e| IoError::Plan(Box::new(e)))?;
        let encoder = Encoder::new(file.size(), changes.len() as u64);
        let ranges = changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Data)
            .map(|c| c.offset..c.offset + c.len)
            .collect();
        let header = Some(encoder.header());
        let framing = IncrementalFraming {
            changes,
            next: 0,
            encoder,
            header,
        };
        self.read_framed(file, ranges, framing)
    }

    fn incremental_v2_body(
        &self,
        file: &DiskFile,
        changes: Vec<Change>,
        o: V2Options,
    ) -> Result<(Chunked, Range<u64>), IoError> {
        incremental_v2(self, file, changes, o)
    }
}

struct MultipartFraming {
    headers: Vec<String>,
    trailer: String,
}

impl Framing for MultipartFraming {
    fn range_start(&mut self, i: usize) -> Option<Bytes> {
        Some(Bytes::from(std::mem::take(&mut self.headers[i])))
    }
    fn finish(&mut self) -> Option<Bytes> {
        Some(Bytes::from(std::mem::take(&mut self.trailer)))
    }
}

struct IncrementalFraming {
    changes: Vec<Change>,
    /// Next change whose record has not been started.
    next: usize,
    encoder: Encoder,
    header: Option<Bytes>,
}

impl IncrementalFraming {
    /// Zero records up to (not including) the next data change.
    fn zeros_until_data(&mut self, out: &mut BytesMut) {
        while let Some(c) = self.changes.get(self.next) {
            if c.kind == ChangeKind::Data {
                break;
            }
            out.extend_from_slice(&self.encoder.zero(c.offset, c.len).expect("validated plan"));
            self.next += 1;
        }
    }
}

impl Framing for IncrementalFraming {
    fn start(&mut self) -> Option<Bytes> {
        self.header.take()
    }
    fn range_start(&mut self, _i: usize) -> Option<Bytes> {
        let mut out = BytesMut::new();
        self.zeros_until_data(&mut out);
        let c = self.changes[self.next];
        self.next += 1;
        out.extend_from_slice(
            &self
                .encoder
                .begin_data(c.offset, c.len)
                .expect("validated plan"),
        );
        Some(out.freeze())
    }
    fn data(&mut self, _i: usize, frame: &[u8]) {
        self.encoder
            .data(frame)
            .expect("frames add up to the range");
    }
    fn range_end(&mut self, _i: usize) -> Option<Bytes> {
        Some(self.encoder.end_data().expect("frames add up to the range"))
    }
    fn finish(&mut self) -> Option<Bytes> {
        let mut out = BytesMut::new();
        self.zeros_until_data(&mut out);
        out.extend_from_slice(&self.encoder.finish().expect("every record was written"));
        Some(out.freeze())
    }
}

/// Version 2 pieces of one stream encoded or waiting to be sent at once.
pub const ENCODE_AHEAD: usize = 4;
/// Encoded pieces queued for hyper per version 2 stream.
pub const OUT_SLOTS: usize = 4;

/// Pieces being encoded in the whole process: one per core (the work is
/// CPU; more would only queue on the blocking pool).
fn encode_slots() -> Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            Arc::new(Semaphore::new(n))
        })
        .clone()
}

/// What a version 2 body is asked to be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct V2Options {
    /// zstd level, or raw data records.
    pub zstd: Option<i32>,
    /// `(index, count)`.
    pub shard: Option<(u32, u32)>,
    /// Resume position: the body starts here (clamped into the shard).
    pub from: Option<u64>,
}

/// The body of format version 2 for `changes` (a plan: sorted, disjoint,
/// inside the file) and its header's span, for logging.
pub fn incremental_v2(
    engine: &IoEngine,
    file: &DiskFile,
    changes: Vec<Change>,
    o: V2Options,
) -> Result<(Chunked, Range<u64>), IoError> {
    let size = file.size();
    stream::validate_changes(&changes, size).map_err(|e| IoError::Plan(Box::new(e)))?;
    let (shard, shards) = o.shard.unwrap_or((0, 1));
    let span = stream::shard_span(&changes, size, shard, shards);
    let start = o.from.unwrap_or(0).clamp(span.start, span.end);
    let mut flags = stream::FLAG_ZERO_BLOCKS;
    if o.zstd.is_some() {
        flags |= stream::FLAG_ZSTD;
    }
    if shards > 1 {
        flags |= stream::FLAG_SHARD;
    }
    if o.from.is_some() {
        flags |= stream::FLAG_RESUMED;
    }
    let header = StreamHeader {
        disk_size: size,
        records: 0,
        version: stream::VERSION_2,
        flags,
        start,
        end: span.end,
        shard,
        shards,
    };
    let pieces = stream::pieces(&stream::clip(&changes, start..span.end));
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for p in pieces.iter().filter(|p| p.kind == ChangeKind::Data) {
        match ranges.last_mut() {
            Some(last) if last.end == p.offset => last.end = p.offset + p.len,
            _ => ranges.push(p.offset..p.offset + p.len),
        }
    }
    let reads = if ranges.is_empty() {
        None
    } else {
        Some(engine.read_ranges(file, ranges)?)
    };
    let (tx, rx) = mpsc::channel(OUT_SLOTS);
    let producer = V2Producer {
        tx,
        reads,
        carry: Bytes::new(),
        glue: Glue::new(),
        zstd: o.zstd,
        records: 0,
        data_bytes: 0,
    };
    let head = stream::header_v2(&header);
    tokio::spawn(producer.run(head, pieces));
    Ok((rx, start..span.end))
}

enum Pending {
    Ready(Bytes),
    Job(tokio::task::JoinHandle<stream::EncodedPiece>),
}

struct V2Producer {
    tx: mpsc::Sender<Chunk>,
    reads: Option<ReadStream>,
    /// Read bytes not yet given to a piece.
    carry: Bytes,
    /// Small parts (record headers, trailers, zero records, short data)
    /// glued together before they go to hyper.
    glue: Glue,
    zstd: Option<i32>,
    records: u64,
    data_bytes: u64,
}

/// Why the producer stopped early.
enum Stop {
    /// The client went away.
    Gone,
    Failed(std::io::Error),
}

impl V2Producer {
    async fn run(mut self, head: Bytes, pieces: Vec<Change>) {
        match self.pump(head, pieces).await {
            Ok(()) => {
                let _ = self.tx.send(Chunk::End).await;
            }
            Err(Stop::Gone) => {}
            Err(Stop::Failed(e)) => {
                // The records before the failure go first: the client
                // resumes from the last one it got whole.
                if self.flush().await.is_ok() {
                    let _ = self.tx.send(Chunk::Fail(e)).await;
                }
            }
        }
    }

    /// Sends `b` after the parts before it, gluing it to them when small.
    async fn send(&mut self, b: Bytes) -> Result<(), Stop> {
        for frame in self.glue.push(b) {
            self.send_frame(frame).await?;
        }
        Ok(())
    }

    /// Sends the glued small parts.
    async fn flush(&mut self) -> Result<(), Stop> {
        match self.glue.flush() {
            Some(frame) => self.send_frame(frame).await,
            None => Ok(()),
        }
    }

    async fn send_frame(&self, frame: Bytes) -> Result<(), Stop> {
        self.tx
            .send(Chunk::Data(frame))
            .await
            .map_err(|_| Stop::Gone)
    }

    /// Sends the oldest pending piece.
    async fn send_front(&mut self, pending: &mut VecDeque<Pending>) -> Result<(), Stop> {
        let b = match pending.pop_front() {
            None => return Ok(()),
            Some(Pending::Ready(b)) => b,
            Some(Pending::Job(j)) => {
                let e = j.await.map_err(|e| {
                    Stop::Failed(std::io::Error::other(format!("encoding task failed: {e}")))
                })?;
                self.records += e.records;
                self.data_bytes += e.data_bytes;
                Bytes::from(e.bytes)
            }
        };
        self.send(b).await
    }

    /// The next `len` bytes of the reads, as slices of the io core's
    /// buffers, except that what a piece holds when it must wait for the
    /// next read is copied first: the io core's buffers carry its stream's
    /// read-ahead permits, and a piece that held them while waiting for a
    /// read could wait forever (with small buffers or `read_ahead = 1`).
    async fn take_segments(&mut self, len: usize) -> Result<Vec<Bytes>, Stop> {
        let mut segs: Vec<Bytes> = Vec::with_capacity(2);
        let mut got = 0;
        while got < len {
            if self.carry.is_empty() {
                if !segs.is_empty() {
                    let mut own = BytesMut::with_capacity(len);
                    for s in segs.drain(..) {
                        own.extend_from_slice(&s);
                    }
                    segs.push(own.freeze());
                }
                self.refill().await?;
            }
            let n = (len - got).min(self.carry.len());
            segs.push(self.carry.split_to(n));
            got += n;
        }
        Ok(segs)
    }

    /// The next bytes of the reads into `carry`.
    async fn refill(&mut self) -> Result<(), Stop> {
        let reads = self.reads.as_mut().expect("data pieces have reads");
        self.carry = match reads.next().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(Stop::Failed(std::io::Error::other(e))),
            None => {
                return Err(Stop::Failed(std::io::Error::other(
                    "disk read ended before the stream's data",
                )))
            }
        };
        Ok(())
    }

    /// The next `len` bytes of the reads, copied (the io core's buffers
    /// go back to it while the copy waits for an encoding slot).
    async fn take(&mut self, len: usize) -> Result<Vec<u8>, Stop> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            if self.carry.is_empty() {
                self.refill().await?;
            }
            let n = (len - buf.len()).min(self.carry.len());
            buf.extend_from_slice(&self.carry.split_to(n));
        }
        Ok(buf)
    }

    async fn pump(&mut self, head: Bytes, pieces: Vec<Change>) -> Result<(), Stop> {
        // The header at once: a sharding client reads it before it opens
        // the other shards.
        self.send(head).await?;
        self.flush().await?;
        if self.zstd.is_none() {
            return self.pump_raw(pieces).await;
        }
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let slots = encode_slots();
        for p in pieces {
            // Send what is done before waiting on anything else.
            while match pending.front() {
                Some(Pending::Ready(_)) => true,
                Some(Pending::Job(j)) => j.is_finished(),
                None => false,
            } {
                self.send_front(&mut pending).await?;
            }
            match p.kind {
                ChangeKind::Zero => {
                    self.records += 1;
                    pending.push_back(Pending::Ready(stream::zero_record(p.offset, p.len)));
                }
                ChangeKind::Data => {
                    let data = self.take(p.len as usize).await?;
                    let permit = Arc::clone(&slots)
                        .acquire_owned()
                        .await
                        .expect("never closed");
                    let level = self.zstd;
                    pending.push_back(Pending::Job(tokio::task::spawn_blocking(move || {
                        let _slot = permit;
                        stream::encode_piece(p.offset, &data, level)
                    })));
                }
            }
            while pending.len() >= ENCODE_AHEAD {
                self.send_front(&mut pending).await?;
            }
        }
        while !pending.is_empty() {
            self.send_front(&mut pending).await?;
        }
        let end = stream::end_record(self.records, self.data_bytes);
        self.send(end).await?;
        self.flush().await
    }

    /// Without zstd, a piece costs a scan for zero blocks and a CRC (the
    /// work of version 1's framing): done here, in order, and the data go
    /// to hyper as slices of the io core's buffers, as in version 1.
    async fn pump_raw(&mut self, pieces: Vec<Change>) -> Result<(), Stop> {
        for p in pieces {
            match p.kind {
                ChangeKind::Zero => {
                    self.records += 1;
                    self.send(stream::zero_record(p.offset, p.len)).await?;
                }
                ChangeKind::Data => {
                    let segs = self.take_segments(p.len as usize).await?;
                    let e = stream::encode_piece_raw(p.offset, &segs);
                    drop(segs);
                    self.records += e.records;
                    self.data_bytes += e.data_bytes;
                    for b in e.parts {
                        self.send(b).await?;
                    }
                }
            }
        }
        let end = stream::end_record(self.records, self.data_bytes);
        self.send(end).await?;
        self.flush().await
    }
}
