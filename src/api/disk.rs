//! Disk bytes: `GET`/`HEAD .../disks/{disk}` (API.md "Disk bytes") and the
//! two extensions over the same file, `.../incremental` and
//! `.../checksums` (`docs/incremental-stream.md`, `docs/checksums.md`,
//! `docs/openapi.yaml`).
//!
//! Every byte goes through the io core ([`IoEngine`]): the snapshot file the
//! backend opened (from its records, never from a request path) is taken
//! over with [`IoEngine::open_file`] (`O_DIRECT` where accepted), and read
//! into pooled buffers that become response frames without a copy. The
//! `Range` header is parsed by [`range::parse`]: one range answers 206, several
//! a `multipart/byteranges` body (sorted, coalesced, at most
//! [`range::DEFAULT_MAX_RANGES`] parts), anything invalid, unsatisfiable or
//! past the cap 416 with `Content-Range: bytes */size` (never a silent 200
//! with the whole disk: a backup client that asked for a range and got the
//! whole file would corrupt its replica). Memory per answer is the engine's
//! `read_ahead` buffers; a failed read aborts the connection (see
//! [`ApiBody::stream`]).

use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::backend::BackendError;
use super::body::{error_chain, ApiBody};
use super::error::ApiError;
use super::framing::{V2Options, WireReads};
use crate::io::{DiskFile, IoEngine};
use crate::wire::digest::{self, Algorithm, DigestAnswer};
use crate::wire::range::{self, Multipart};
use crate::wire::stream::{self, CONTENT_TYPE as INCREMENTAL_CONTENT_TYPE};
use crate::wire::SnapshotDisk;

/// Content type of disk bytes and of each multipart part.
const OCTETS: &str = "application/octet-stream";
/// Default checksum block (`docs/checksums.md`): 4 MiB.
pub const DEFAULT_CHECKSUM_BLOCK: u64 = 4 << 20;
/// Smallest checksum block (`docs/checksums.md`): 64 KiB.
pub const MIN_CHECKSUM_BLOCK: u64 = 64 << 10;
/// Largest checksum block (`docs/checksums.md`): 64 MiB.
pub const MAX_CHECKSUM_BLOCK: u64 = 64 << 20;
/// Most blocks in one CRC-32 answer. The answer is streamed, so the
/// server's memory does not depend on it (see [`checksums`]); the cap
/// bounds what the client must take: under 185 MiB of JSON (at most 11
/// bytes per block) and 64 MiB of CRCs, below the client's 1 GiB limit
/// for a JSON answer. That is 1 TiB at the smallest `blockSize`, 64 TiB at
/// the default; a bigger disk must ask for bigger blocks (the 400 names
/// the smallest it may ask for).
pub const MAX_CHECKSUM_BLOCKS: u64 = 1 << 24;
/// JSON bytes of the CRC-32 answer gathered before they are handed to the
/// HTTP layer as one frame.
const CHECKSUM_FRAME: usize = 64 << 10;
/// Frames of the CRC-32 answer queued for the HTTP layer: with the one
/// being filled, the answer's own memory is at most 3 frames (192 KiB),
/// plus the read-ahead of its disk read.
const CHECKSUM_SLOTS: usize = 2;
/// Zeros hashed per step when computing the CRC of a hole block.
const ZERO_CHUNK: usize = 64 << 10;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

fn internal(what: &str, e: &dyn std::error::Error) -> ApiError {
    ApiError::Internal(format!("{what}: {}", error_chain(e)))
}

/// Takes over the backend's open file in the io core (a second open through
/// `/proc/self/fd`: blocking, so call it on the blocking pool, in the same
/// task as the backend's open) and checks its size against the one the
/// backend recorded.
pub fn open(
    engine: &IoEngine,
    file: File,
    size: u64,
    label: &str,
) -> Result<DiskFile, BackendError> {
    let disk = engine
        .open_file(file, &PathBuf::from(label))
        .map_err(|e| BackendError::Internal(format!("opening the disk: {}", error_chain(&e))))?;
    if disk.size() != size {
        return Err(BackendError::Internal(format!(
            "disk file is {} bytes, the snapshot recorded {size}",
            disk.size()
        )));
    }
    Ok(disk)
}

/// The answer for a disk read: headers, and unless `head`, the bytes. The
/// bool says whether the answer is a stream.
pub fn respond(
    engine: &IoEngine,
    disk: &DiskFile,
    range: Option<&HeaderValue>,
    head: bool,
) -> Result<(Response<ApiBody>, bool), ApiError> {
    let size = disk.size();
    let unsatisfiable = |reason: String| ApiError::RangeNotSatisfiable { size, reason };
    let ranges = match range {
        None => None,
        Some(v) => Some(
            range::parse(v.as_bytes(), size, range::DEFAULT_MAX_RANGES)
                .map_err(|e| unsatisfiable(e.to_string()))?,
        ),
    };
    let builder = Response::builder().header(header::ACCEPT_RANGES, "bytes");
    let stream_err = |e: crate::io::IoError| internal("starting the disk read", &e);
    let (builder, len, body) = match ranges {
        None => {
            let body = (!head && size > 0)
                .then(|| engine.read(disk, 0..size))
                .transpose()
                .map_err(stream_err)?;
            let b = builder
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, OCTETS);
            (b, size, body)
        }
        Some(ranges) if ranges.len() == 1 => {
            let r = ranges[0].clone();
            let b = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_TYPE, OCTETS)
                .header(header::CONTENT_RANGE, range::content_range(&r, size));
            let len = r.end - r.start;
            let body = (!head)
                .then(|| engine.read(disk, r))
                .transpose()
                .map_err(stream_err)?;
            (b, len, body)
        }
        Some(ranges) => {
            let multipart = Multipart::new(OCTETS);
            let len = multipart.body_len(&ranges, size);
            let b = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_TYPE, multipart.content_type());
            let body = (!head)
                .then(|| engine.read_multipart(disk, ranges, multipart))
                .transpose()
                .map_err(stream_err)?;
            (b, len, body)
        }
    };
    finish(builder, len, body)
}

fn finish(
    builder: http::response::Builder,
    len: u64,
    body: Option<crate::io::ReadStream>,
) -> Result<(Response<ApiBody>, bool), ApiError> {
    let streaming = body.is_some();
    let body = match body {
        Some(s) => ApiBody::stream(s, len),
        None => ApiBody::empty(),
    };
    builder
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .map(|r| (r, streaming))
        .map_err(|e| ApiError::Internal(format!("building the disk answer: {e}")))
}

/// The allocated (data) ranges of a snapshot disk, or with a diff, the
/// ranges to copy; clipped to `size`.
pub fn data_ranges(d: &SnapshotDisk, size: u64) -> Vec<Range<u64>> {
    d.chunk_ranges(size)
}

/// The incremental stream of one disk: `d` is the disk of the snapshot as
/// `get_snapshot` answered it (with `compare_to` and `zeroed_separate`, or
/// without for a full sparse copy). Format version 1 (a known length)
/// unless `v2` (asked for by query parameters, [`stream_params`]).
pub fn incremental(
    engine: &IoEngine,
    disk: &DiskFile,
    d: &SnapshotDisk,
    v2: Option<V2Options>,
) -> Result<(Response<ApiBody>, bool), ApiError> {
    let size = disk.size();
    let data = data_ranges(d, size);
    let zeroed = d.zeroed_ranges(size);
    let changes = stream::plan_changes(&data, &zeroed);
    if let Some(o) = v2 {
        let (rx, span) = engine
            .incremental_v2_body(disk, changes, o)
            .map_err(|e| internal("starting the incremental stream", &e))?;
        tracing::debug!(
            start = span.start,
            end = span.end,
            ?o,
            "incremental stream, format 2"
        );
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, INCREMENTAL_CONTENT_TYPE)
            .body(ApiBody::chunked(rx))
            .map(|r| (r, true))
            .map_err(|e| ApiError::Internal(format!("building the disk answer: {e}")));
    }
    let len = stream::encoded_len(&changes);
    let body = engine
        .incremental(disk, changes)
        .map_err(|e| internal("starting the incremental stream", &e))?;
    let b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, INCREMENTAL_CONTENT_TYPE);
    finish(b, len, Some(body))
}

/// The incremental stream's query parameters (docs/incremental-stream.md):
/// `None` for format version 1 (nothing asked: today's bytes), else the
/// version 2 options. `get` looks a parameter up. Any version 2 parameter
/// asks for version 2; `version=1` with one of them is refused.
pub fn stream_params(get: impl Fn(&str) -> Option<String>) -> Result<Option<V2Options>, ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    let num = |name: &str| -> Result<Option<u64>, ApiError> {
        match get(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                ApiError::BadRequest(format!("{name}={v:?}: expected a non-negative integer"))
            }),
        }
    };
    let version = num("version")?;
    let compress = get("compress").filter(|v| !v.is_empty());
    let level = num("level")?;
    let (shard, shards, from) = (num("shard")?, num("shards")?, num("from")?);
    let mut o = V2Options::default();
    match compress.as_deref() {
        None => {
            if level.is_some() {
                return bad("level: only with compress=zstd".into());
            }
        }
        Some("zstd") => {
            let l = level.map_or(Ok(stream::DEFAULT_ZSTD_LEVEL), |l| {
                i32::try_from(l)
                    .ok()
                    .filter(|l| stream::ZSTD_LEVELS.contains(l))
                    .ok_or(())
            });
            match l {
                Ok(l) => o.zstd = Some(l),
                Err(()) => {
                    return bad(format!(
                        "level={}: expected {} to {}",
                        level.unwrap_or(0),
                        stream::ZSTD_LEVELS.start(),
                        stream::ZSTD_LEVELS.end()
                    ))
                }
            }
        }
        Some(c) => return bad(format!("compress={c:?}: expected \"zstd\"")),
    }
    match (shard, shards) {
        (None, None) => {}
        (Some(i), Some(n)) if n >= 1 && n <= stream::MAX_SHARDS as u64 && i < n => {
            o.shard = (n > 1).then_some((i as u32, n as u32));
        }
        _ => {
            return bad(format!(
                "shard and shards: both, with 0 <= shard < shards <= {}",
                stream::MAX_SHARDS
            ))
        }
    }
    o.from = from;
    let wants_v2 = o != V2Options::default() || shards.is_some();
    match version {
        None => Ok(wants_v2.then_some(o)),
        Some(1) if !wants_v2 => Ok(None),
        Some(2) => Ok(Some(o)),
        Some(1) => bad("compress, shard and from need version 2".into()),
        Some(v) => bad(format!("version={v}: expected 1 or 2")),
    }
}

/// The checksums answer (`docs/checksums.md`) as it would be built whole:
/// [`checksums`] streams exactly the bytes `json_response` makes of it.
#[derive(Debug, Serialize)]
pub struct Checksums {
    pub size: u64,
    pub block_size: u64,
    pub algorithm: &'static str,
    pub crc32: Vec<u32>,
}

/// `blockSize`: absent is the default; else a power of two in bounds.
pub fn checksum_block(param: Option<&str>) -> Result<u64, ApiError> {
    let Some(v) = param.filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_CHECKSUM_BLOCK);
    };
    match v.parse::<u64>() {
        Ok(n) if n.is_power_of_two() && (MIN_CHECKSUM_BLOCK..=MAX_CHECKSUM_BLOCK).contains(&n) => {
            Ok(n)
        }
        _ => Err(ApiError::BadRequest(format!(
            "blockSize={v:?}: expected a power of two from {MIN_CHECKSUM_BLOCK} to \
             {MAX_CHECKSUM_BLOCK}"
        ))),
    }
}

/// The 400's text when a disk has more than [`MAX_CHECKSUM_BLOCKS`] blocks
/// of `block` bytes: the smallest block size that fits, or that none does.
fn too_many_blocks(size: u64, block: u64) -> String {
    let blocks = size.div_ceil(block);
    let need = size
        .div_ceil(MAX_CHECKSUM_BLOCKS)
        .next_power_of_two()
        .max(MIN_CHECKSUM_BLOCK);
    if need <= MAX_CHECKSUM_BLOCK {
        format!(
            "{blocks} blocks of {block} bytes: at most {MAX_CHECKSUM_BLOCKS} per answer; \
             the smallest blockSize for this {size}-byte disk is {need}"
        )
    } else {
        format!(
            "{blocks} blocks of {block} bytes: at most {MAX_CHECKSUM_BLOCKS} per answer, and \
             this {size}-byte disk has more even with the largest blockSize \
             ({MAX_CHECKSUM_BLOCK}); checksum it in ranges with the disk route instead"
        )
    }
}

/// CRC-32 of `len` zero bytes, without reading anything.
fn zero_crc(len: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZERO_CHUNK as u64) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
    h.finalize()
}

/// Runs of blocks (half-open block indices) that hold any data byte.
fn data_block_runs(data: &[Range<u64>], block: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for r in data {
        let run = r.start / block..(r.end - 1) / block + 1;
        match runs.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => runs.push(run),
        }
    }
    runs
}

/// The CRC-32 answer (`docs/checksums.md`): a CRC-32 per block of `disk`,
/// blocks with a data byte (per `data`, the snapshot's extent map) read
/// through the engine, hole blocks the CRC of zeros, computed.
///
/// The answer is streamed as it is computed, byte for byte what
/// `json_response` makes of [`Checksums`]: a producer task reads the disk
/// in order, writes the JSON into frames of [`CHECKSUM_FRAME`] bytes and
/// hands them over a channel of [`CHECKSUM_SLOTS`]; a client that reads
/// slowly makes the producer wait, which stops the disk read once its
/// read-ahead is full. Its memory is therefore a few frames and the
/// read-ahead, whatever the disk's size or the client's pace; the
/// watchdog's `send_timeout` cuts a client that stops. A read that fails
/// once the answer has started breaks it (the connection is aborted, an
/// HTTP/2 stream reset), never ends it cleanly.
pub fn checksums(
    engine: &IoEngine,
    disk: &DiskFile,
    data: &[Range<u64>],
    block: u64,
) -> Result<Response<ApiBody>, ApiError> {
    let size = disk.size();
    let blocks = size.div_ceil(block);
    if blocks > MAX_CHECKSUM_BLOCKS {
        return Err(ApiError::BadRequest(too_many_blocks(size, block)));
    }
    let runs = data_block_runs(data, block);
    let byte_ranges: Vec<Range<u64>> = runs
        .iter()
        .map(|r| r.start * block..(r.end * block).min(size))
        .collect();
    let reads = if byte_ranges.is_empty() {
        None
    } else {
        Some(
            engine
                .read_ranges(disk, byte_ranges)
                .map_err(|e| internal("starting the checksum read", &e))?,
        )
    };
    let (tx, rx) = tokio::sync::mpsc::channel(CHECKSUM_SLOTS);
    let producer = CrcProducer {
        tx,
        reads,
        carry: bytes::Bytes::new(),
        out: Vec::with_capacity(CHECKSUM_FRAME + 16),
        size,
        block,
    };
    tokio::spawn(producer.run(runs));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(ApiBody::chunked(rx))
        .map_err(|e| ApiError::Internal(format!("building the checksums answer: {e}")))
}

/// Why the CRC-32 producer stopped early.
enum CrcStop {
    /// The client went away.
    Gone,
    Failed(std::io::Error),
}

/// Computes and writes the CRC-32 answer (see [`checksums`]).
struct CrcProducer {
    tx: tokio::sync::mpsc::Sender<super::body::Chunk>,
    reads: Option<crate::io::ReadStream>,
    /// Read bytes not yet hashed.
    carry: bytes::Bytes,
    /// The frame being filled.
    out: Vec<u8>,
    size: u64,
    block: u64,
}

impl CrcProducer {
    async fn run(mut self, runs: Vec<Range<u64>>) {
        use super::body::Chunk;
        match self.pump(runs).await {
            Ok(()) => {
                let _ = self.tx.send(Chunk::End).await;
            }
            Err(CrcStop::Gone) => {}
            Err(CrcStop::Failed(e)) => {
                let _ = self.tx.send(Chunk::Fail(e)).await;
            }
        }
    }

    fn block_len(&self, i: u64) -> u64 {
        self.block.min(self.size - i * self.block)
    }

    async fn pump(&mut self, runs: Vec<Range<u64>>) -> Result<(), CrcStop> {
        let blocks = self.size.div_ceil(self.block);
        let full_zero = zero_crc(self.block);
        let tail_zero = zero_crc(self.size % self.block);
        let (size, block) = (self.size, self.block);
        let hole = move |i: u64| {
            if (i + 1) * block <= size {
                full_zero
            } else {
                tail_zero
            }
        };
        // `Checksums` as serde_json writes it: fields in order, no spaces.
        self.out.extend_from_slice(
            format!(
                "{{\"size\":{},\"block_size\":{},\"algorithm\":\"crc32\",\"crc32\":[",
                self.size, self.block
            )
            .as_bytes(),
        );
        let mut next = 0u64;
        for run in runs {
            while next < run.start {
                self.push(next, hole(next)).await?;
                next += 1;
            }
            while next < run.end {
                let crc = self.data_crc(self.block_len(next)).await?;
                self.push(next, crc).await?;
                next += 1;
            }
        }
        while next < blocks {
            self.push(next, hole(next)).await?;
            next += 1;
        }
        let more = match self.reads.as_mut() {
            Some(r) => !self.carry.is_empty() || r.next().await.is_some(),
            None => false,
        };
        if more {
            return Err(CrcStop::Failed(std::io::Error::other(
                "checksum read returned more bytes than asked",
            )));
        }
        self.out.extend_from_slice(b"]}\n");
        self.flush().await
    }

    /// Appends block `i`'s CRC, handing the frame over once full.
    async fn push(&mut self, i: u64, crc: u32) -> Result<(), CrcStop> {
        if i > 0 {
            self.out.push(b',');
        }
        use std::io::Write as _;
        let _ = write!(self.out, "{crc}");
        if self.out.len() >= CHECKSUM_FRAME {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands the frame being filled to the HTTP layer (waiting while the
    /// client is behind).
    async fn flush(&mut self) -> Result<(), CrcStop> {
        let frame = std::mem::replace(&mut self.out, Vec::with_capacity(CHECKSUM_FRAME + 16));
        self.tx
            .send(super::body::Chunk::Data(frame.into()))
            .await
            .map_err(|_| CrcStop::Gone)
    }

    /// The CRC-32 of the next `len` bytes of the disk read.
    async fn data_crc(&mut self, len: u64) -> Result<u32, CrcStop> {
        let mut h = crc32fast::Hasher::new();
        let mut left = len;
        while left > 0 {
            if self.carry.is_empty() {
                let next = match self.reads.as_mut() {
                    Some(r) => r.next().await,
                    None => None,
                };
                self.carry = match next {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => {
                        return Err(CrcStop::Failed(std::io::Error::other(format!(
                            "reading for checksums: {}",
                            error_chain(&e)
                        ))))
                    }
                    None => {
                        return Err(CrcStop::Failed(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "checksum read ended before the last block",
                        )))
                    }
                };
                continue;
            }
            let n = left.min(self.carry.len() as u64) as usize;
            h.update(&self.carry[..n]);
            bytes::Buf::advance(&mut self.carry, n);
            left -= n as u64;
        }
        Ok(h.finalize())
    }
}

/// Most blocks in one strong-digest answer (`algorithm=blake3|sha256`):
/// 67 bytes of JSON per block, so under 2.2 MiB; 2 TiB at the largest
/// blockSize. Bigger disks: checksum them in ranges, or CRC-32.
pub const MAX_DIGEST_BLOCKS: u64 = 1 << 15;

/// `algorithm`: `None` for the CRC-32 answer (absent or `crc32`), else the
/// strong digest asked for.
pub fn checksum_algorithm(param: Option<&str>) -> Result<Option<Algorithm>, ApiError> {
    match param.filter(|v| !v.is_empty()) {
        None | Some("crc32") => Ok(None),
        Some(v) => Algorithm::parse(v).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "algorithm={v:?}: expected \"crc32\", \"blake3\" or \"sha256\""
            ))
        }),
    }
}

/// The strong digests of `disk` (`crate::wire::digest` has the exact
/// construction): blocks with a data byte are read through the engine and
/// hashed on the blocking pool, hole blocks are the digest of zeros,
/// computed once without reading.
pub async fn digests(
    engine: &IoEngine,
    disk: &DiskFile,
    data: &[Range<u64>],
    block: u64,
    alg: Algorithm,
) -> Result<DigestAnswer, ApiError> {
    let size = disk.size();
    let blocks = size.div_ceil(block);
    if blocks > MAX_DIGEST_BLOCKS {
        let need = size
            .div_ceil(MAX_DIGEST_BLOCKS)
            .next_power_of_two()
            .max(MIN_CHECKSUM_BLOCK);
        return Err(ApiError::BadRequest(if need <= MAX_CHECKSUM_BLOCK {
            format!(
                "{blocks} blocks of {block} bytes: at most {MAX_DIGEST_BLOCKS} per {} answer; \
                 the smallest blockSize for this {size}-byte disk is {need}",
                alg.name()
            )
        } else {
            format!(
                "{blocks} blocks of {block} bytes: at most {MAX_DIGEST_BLOCKS} per {} answer \
                 even with the largest blockSize ({MAX_CHECKSUM_BLOCK})",
                alg.name()
            )
        }));
    }
    let block_len = move |i: u64| block.min(size - i * block);
    let runs = data_block_runs(data, block);
    let byte_ranges: Vec<Range<u64>> = runs
        .iter()
        .map(|r| r.start * block..(r.end * block).min(size))
        .collect();
    let data_blocks: Vec<u64> = runs.iter().flat_map(|r| r.clone()).collect();
    // The reads feed a hashing task on the blocking pool through a small
    // channel: the network threads only move frames.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let lens: Vec<u64> = data_blocks.iter().map(|&i| block_len(i)).collect();
    let hashing = tokio::task::spawn_blocking(move || -> Result<Vec<[u8; 32]>, &'static str> {
        let mut out = Vec::with_capacity(lens.len());
        let mut h = alg.hasher();
        let mut left = lens.first().copied().unwrap_or(0);
        while let Some(frame) = rx.blocking_recv() {
            let mut f: &[u8] = &frame;
            while !f.is_empty() {
                if out.len() >= lens.len() {
                    return Err("the read returned more bytes than asked");
                }
                let n = left.min(f.len() as u64) as usize;
                h.update(&f[..n]);
                f = &f[n..];
                left -= n as u64;
                if left == 0 {
                    out.push(std::mem::replace(&mut h, alg.hasher()).finalize());
                    left = lens.get(out.len()).copied().unwrap_or(0);
                }
            }
        }
        if out.len() != lens.len() {
            return Err("the read ended before the last block");
        }
        Ok(out)
    });
    if !byte_ranges.is_empty() {
        let mut s = engine
            .read_ranges(disk, byte_ranges)
            .map_err(|e| internal("starting the digest read", &e))?;
        while let Some(frame) = s.next().await {
            let frame = frame.map_err(|e| internal("reading for digests", &e))?;
            if tx.send(frame).await.is_err() {
                break; // the hasher failed: its error is below
            }
        }
    }
    drop(tx);
    let data_digests = hashing
        .await
        .map_err(|e| ApiError::Internal(format!("digest task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("digests: {e}")))?;
    let (full_zero, tail_zero) =
        tokio::task::spawn_blocking(move || (alg.zeros(block.min(size)), alg.zeros(size % block)))
            .await
            .map_err(|e| ApiError::Internal(format!("digest task failed: {e}")))?;
    let mut all = Vec::with_capacity(blocks as usize);
    let mut d = data_blocks.iter().zip(&data_digests).peekable();
    for i in 0..blocks {
        match d.peek() {
            Some((&bi, &x)) if bi == i => {
                all.push(x);
                d.next();
            }
            _ if block_len(i) == block => all.push(full_zero),
            _ => all.push(tail_zero),
        }
    }
    let whole = alg.disk_digest(size, block, &all);
    Ok(DigestAnswer {
        size,
        block_size: block,
        algorithm: alg.name().to_owned(),
        blocks: all.iter().map(digest::hex).collect(),
        digest: digest::hex(&whole),
    })
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[test]
    fn zero_crc_matches_hashing_zeros() {
        for len in [0u64, 1, 4095, 65_536, 65_537, 4 << 20] {
            let v = vec![0u8; len as usize];
            assert_eq!(zero_crc(len), crc32fast::hash(&v), "{len}");
        }
    }

    #[test]
    fn too_many_blocks_names_the_smallest_block_that_fits() {
        let tib = 1u64 << 40;
        let m = too_many_blocks(64 * tib, 1 << 20);
        assert!(
            m.contains("smallest blockSize") && m.contains("4194304"),
            "{m}"
        );
        assert_eq!(tib.div_ceil(64 << 10), MAX_CHECKSUM_BLOCKS);
        let m = too_many_blocks(64 * tib + 1, 4 << 20);
        assert!(m.contains("8388608"), "{m}");
        let m = too_many_blocks(1024 * tib + 1, 64 << 20);
        assert!(m.contains("largest blockSize"), "{m}");
    }

    /// The streamed CRC-32 answer of a disk of holes, collected.
    fn streamed(size: u64, block: u64) -> Vec<u8> {
        use crate::api::body::Chunk;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(CHECKSUM_SLOTS);
            let p = CrcProducer {
                tx,
                reads: None,
                carry: bytes::Bytes::new(),
                out: Vec::new(),
                size,
                block,
            };
            tokio::spawn(p.run(Vec::new()));
            let mut out = Vec::new();
            loop {
                match rx.recv().await {
                    Some(Chunk::Data(b)) => {
                        assert!(b.len() <= CHECKSUM_FRAME + 16, "{}", b.len());
                        out.extend_from_slice(&b);
                    }
                    Some(Chunk::End) => return out,
                    Some(Chunk::Fail(e)) => panic!("{e}"),
                    None => panic!("the producer stopped without an end"),
                }
            }
        })
    }

    #[test]
    fn the_streamed_answer_is_the_built_one_byte_for_byte() {
        // Empty, one short block, a short tail, exact blocks, and answers
        // of many frames.
        for (size, block) in [
            (0u64, 65_536u64),
            (1, 65_536),
            (65_536 * 3 + 5, 65_536),
            (4 << 20, 4 << 20),
            (1 << 36, 1 << 16),
            ((1 << 30) + 12_345, 1 << 16),
        ] {
            let blocks = size.div_ceil(block);
            let (full, tail) = (zero_crc(block), zero_crc(size % block));
            let crc32 = (0..blocks)
                .map(|i| if (i + 1) * block <= size { full } else { tail })
                .collect();
            let built = crate::api::body::json_response(
                StatusCode::OK,
                &Checksums {
                    size,
                    block_size: block,
                    algorithm: "crc32",
                    crc32,
                },
            );
            let mut built = built.into_body();
            let built = match std::pin::Pin::new(&mut built)
                .poll_frame(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            {
                std::task::Poll::Ready(Some(Ok(f))) => f.into_data().unwrap(),
                _ => panic!("a built answer is one frame"),
            };
            let got = streamed(size, block);
            assert!(got == built, "size {size}, block {block}");
        }
    }

    #[test]
    fn block_runs_merge_touching_blocks() {
        #[allow(clippy::single_range_in_vec_init)]
        let one = [10..20];
        assert_eq!(data_block_runs(&one, 8), vec![1..3]);
        assert_eq!(data_block_runs(&[0..1, 7..9, 30..31], 8), vec![0..2, 3..4]);
        assert_eq!(data_block_runs(&[], 8), Vec::<Range<u64>>::new());
    }

    #[test]
    fn block_size_param() {
        assert_eq!(checksum_block(None).unwrap(), DEFAULT_CHECKSUM_BLOCK);
        assert_eq!(checksum_block(Some("65536")).unwrap(), 65_536);
        assert_eq!(checksum_block(Some("67108864")).unwrap(), 64 << 20);
        for bad in ["32768", "65537", "134217728", "x", "-1", "0"] {
            assert!(checksum_block(Some(bad)).is_err(), "{bad}");
        }
    }
}
