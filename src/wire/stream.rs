//! The incremental stream: every changed range of a disk between two
//! snapshots, and the ranges that now read as zeros, in one response body
//! with a checksum per range. The byte format is specified in
//! `docs/incremental-stream.md`; this module is its only implementation.
//!
//! [`Encoder`] is a pure state machine that produces the framing bytes
//! (stream header, record headers, checksum trailers, end record) around
//! data frames it is shown but never copies: the io core sends the data
//! frames themselves. [`Decoder`] is a push parser over untrusted bytes for
//! the client and the tests: it never allocates more than a record header,
//! hands data out as zero-copy slices of its input, and rejects anything that
//! does not follow the spec with a typed [`StreamError`]. It is fuzzed.
//!
//! Format version 2 (asked for with query parameters; a client that asks
//! nothing gets version 1, byte for byte as before) adds what a stream needs
//! over a WAN: all-zero blocks of the data ranges as zero records,
//! zstd-compressed data records, shards and resumption at a position. Its
//! records are cut by fixed rules from the plan and the data alone
//! ([`pieces`], [`encode_piece`]), so the records of a body resumed with
//! `from`, or of a shard, are the bytes an uninterrupted, unsharded stream
//! sends for the same span. The decoder reads both versions.
//!
//! No I/O here (zstd is computation on memory).

use std::ops::Range;

use bytes::{Buf, Bytes};

/// First 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"COE-INCR";
/// Format version 1: what a client that asks for nothing gets.
pub const VERSION: u16 = 1;
/// Format version 2 (zero blocks, zstd records, shards, resumption).
pub const VERSION_2: u16 = 2;
/// Stream header length (version 1).
pub const HEADER_LEN: usize = 40;
/// Stream header length (version 2).
pub const HEADER_LEN_2: usize = 64;
/// Version 2 header flag: zstd data records (kind 4) may follow.
pub const FLAG_ZSTD: u32 = 1;
/// Version 2 header flag: all-zero [`ZERO_BLOCK`]s inside the data ranges
/// are sent as zero records (always set by this server in version 2).
pub const FLAG_ZERO_BLOCKS: u32 = 2;
/// Version 2 header flag: the body is one shard of several.
pub const FLAG_SHARD: u32 = 4;
/// Version 2 header flag: the body resumes a stream (`from`).
pub const FLAG_RESUMED: u32 = 8;
const KNOWN_FLAGS: u32 = FLAG_ZSTD | FLAG_ZERO_BLOCKS | FLAG_SHARD | FLAG_RESUMED;
/// Version 2: largest data record (kinds 1 and 4), and the grid data ranges
/// are cut on (records never cross a multiple of it).
pub const RECORD_MAX: u64 = 1 << 20;
/// Version 2: the block size of zero detection (aligned in the disk).
pub const ZERO_BLOCK: u64 = 4096;
/// Version 2: default zstd level (fast, and most of the ratio on disks).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Version 2: accepted zstd levels.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
/// Most shards of one stream.
pub const MAX_SHARDS: u32 = 64;
/// Record header length.
pub const RECORD_LEN: usize = 32;
/// Trailer after a data record's bytes: CRC-32 of the data, 4 reserved bytes.
pub const TRAILER_LEN: usize = 8;
/// Record kinds (byte 0 of a record header).
pub const KIND_DATA: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_END: u8 = 3;
/// Version 2: a data record whose bytes are one zstd frame.
pub const KIND_ZSTD: u8 = 4;
/// `Content-Type` of the stream.
pub const CONTENT_TYPE: &str = "application/vnd.coriolis-ovm-exporter.incremental";

/// What the stream carries for one range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The range's bytes follow.
    Data,
    /// The range reads as zeros; no bytes follow.
    Zero,
}

/// One range of the stream, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub offset: u64,
    pub len: u64,
}

/// Format and plan errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("not an incremental stream (bad magic)")]
    Magic,
    #[error("stream version {0} is not supported (this reads versions {VERSION} and {VERSION_2})")]
    Version(u16),
    #[error("stream header: {0}")]
    BadHeader(&'static str),
    #[error("compressed record at {offset}+{len}: {why}")]
    Compressed {
        offset: u64,
        len: u64,
        why: &'static str,
    },
    #[error("{what} header checksum mismatch")]
    HeaderChecksum { what: &'static str },
    #[error("reserved field of the {what} is not zero")]
    Reserved { what: &'static str },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("record {offset}+{len} is empty, overflows, or lies past the {size}-byte disk")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("record at {offset} starts before the previous one ended at {prev_end}")]
    Order { offset: u64, prev_end: u64 },
    #[error("more records than the {declared} the header declared")]
    TooManyRecords { declared: u64 },
    #[error("end record says {records} records and {data_bytes} data bytes, the stream had {seen_records} and {seen_bytes}")]
    EndMismatch {
        records: u64,
        data_bytes: u64,
        seen_records: u64,
        seen_bytes: u64,
    },
    #[error("data of the record at {offset}+{len} fails its checksum")]
    DataChecksum { offset: u64, len: u64 },
    #[error("bytes after the end record")]
    Trailing,
    #[error("stream ended inside {0}")]
    Truncated(&'static str),
    #[error("encoder misuse: {0}")]
    Encoder(&'static str),
    #[error("the stream already failed")]
    Failed,
}

/// Checks a plan: non-empty ranges, sorted, disjoint, inside the disk.
pub fn validate_changes(changes: &[Change], size: u64) -> Result<(), StreamError> {
    let mut prev_end = 0;
    for c in changes {
        check_record(c.offset, c.len, size, prev_end)?;
        prev_end = c.offset + c.len;
    }
    Ok(())
}

fn check_record(offset: u64, len: u64, size: u64, prev_end: u64) -> Result<(), StreamError> {
    match offset.checked_add(len) {
        Some(end) if len > 0 && end <= size => {}
        _ => return Err(StreamError::OutOfBounds { offset, len, size }),
    }
    if offset < prev_end {
        return Err(StreamError::Order { offset, prev_end });
    }
    Ok(())
}

/// Exact length of the stream for `changes`: the `Content-Length`.
pub fn encoded_len(changes: &[Change]) -> u64 {
    let records: u64 = changes
        .iter()
        .map(|c| match c.kind {
            ChangeKind::Data => (RECORD_LEN + TRAILER_LEN) as u64 + c.len,
            ChangeKind::Zero => RECORD_LEN as u64,
        })
        .sum();
    (HEADER_LEN + RECORD_LEN) as u64 + records
}

/// Merges a diff's ranges to copy and its zeroed ranges (each sorted and
/// disjoint, as the extent algebra returns them) into one plan. A byte in
/// both is sent as zero: a zeroed range reads as zeros in the newer
/// snapshot, and the API by default also lists it among the chunks.
pub fn plan_changes(data: &[Range<u64>], zeroed: &[Range<u64>]) -> Vec<Change> {
    let mut out = Vec::with_capacity(data.len() + zeroed.len());
    let mut z = 0;
    for d in data.iter().filter(|r| r.start < r.end) {
        let mut pos = d.start;
        while pos < d.end {
            while z < zeroed.len() && zeroed[z].end <= pos {
                push_zero(&mut out, &zeroed[z]);
                z += 1;
            }
            match zeroed.get(z) {
                Some(zr) if zr.start < d.end => {
                    if zr.start > pos {
                        push(&mut out, ChangeKind::Data, pos..zr.start);
                    }
                    pos = zr.end.min(d.end).max(pos);
                    if zr.end <= d.end {
                        push_zero(&mut out, zr);
                        z += 1;
                    }
                }
                _ => {
                    push(&mut out, ChangeKind::Data, pos..d.end);
                    pos = d.end;
                }
            }
        }
    }
    for zr in &zeroed[z..] {
        push_zero(&mut out, zr);
    }
    out
}

fn push_zero(out: &mut Vec<Change>, r: &Range<u64>) {
    // A zero range that started inside an earlier data range was already
    // partly covered by it: only its part past the last record goes out.
    let start = out
        .last()
        .map_or(r.start, |c| r.start.max(c.offset + c.len));
    if start < r.end {
        push(out, ChangeKind::Zero, start..r.end);
    }
}

fn push(out: &mut Vec<Change>, kind: ChangeKind, r: Range<u64>) {
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.offset + last.len == r.start {
            last.len += r.end - r.start;
            return;
        }
    }
    out.push(Change {
        kind,
        offset: r.start,
        len: r.end - r.start,
    });
}

/// The decoded stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub disk_size: u64,
    /// Version 1: the records that follow. Version 2 does not know it ahead
    /// (zero blocks are found while reading): 0 there, see
    /// [`StreamHeader::version`].
    pub records: u64,
    /// 1 or 2.
    pub version: u16,
    /// Version 2 `FLAG_*` bits; 0 in version 1.
    pub flags: u32,
    /// The span of the disk this body covers, `start..end` (version 1: the
    /// whole disk): every record lies inside it.
    pub start: u64,
    pub end: u64,
    /// Shard index and count (0 and 1 unless [`FLAG_SHARD`]).
    pub shard: u32,
    pub shards: u32,
}

impl StreamHeader {
    /// A version 1 header.
    pub fn v1(disk_size: u64, records: u64) -> StreamHeader {
        StreamHeader {
            disk_size,
            records,
            version: VERSION,
            flags: 0,
            start: 0,
            end: disk_size,
            shard: 0,
            shards: 1,
        }
    }
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn encode_header(h: &StreamHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    // 12..16: flags, none defined in version 1.
    b[16..24].copy_from_slice(&h.disk_size.to_le_bytes());
    b[24..32].copy_from_slice(&h.records.to_le_bytes());
    let c = crc(&b[..32]);
    b[32..36].copy_from_slice(&c.to_le_bytes());
    b
}

fn encode_record(kind: u8, a: u64, b: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = kind;
    r[8..16].copy_from_slice(&a.to_le_bytes());
    r[16..24].copy_from_slice(&b.to_le_bytes());
    let c = crc(&r[..24]);
    r[24..28].copy_from_slice(&c.to_le_bytes());
    r
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Produces the framing of one stream. Call order: [`header`], then per
/// change either [`zero`] or [`begin_data`], [`data`] for each frame,
/// [`end_data`]; then [`finish`]. Misuse is an error, not a panic.
///
/// [`header`]: Encoder::header
/// [`zero`]: Encoder::zero
/// [`begin_data`]: Encoder::begin_data
/// [`data`]: Encoder::data
/// [`end_data`]: Encoder::end_data
/// [`finish`]: Encoder::finish
pub struct Encoder {
    header: StreamHeader,
    written: u64,
    data_bytes: u64,
    prev_end: u64,
    /// Bytes still due for the open data record, and its checksum so far.
    open: Option<(u64, crc32fast::Hasher)>,
}

impl Encoder {
    pub fn new(disk_size: u64, records: u64) -> Encoder {
        Encoder {
            header: StreamHeader::v1(disk_size, records),
            written: 0,
            data_bytes: 0,
            prev_end: 0,
            open: None,
        }
    }

    pub fn header(&self) -> Bytes {
        Bytes::copy_from_slice(&encode_header(&self.header))
    }

    fn record(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        if self.open.is_some() {
            return Err(StreamError::Encoder("a data record is still open"));
        }
        if self.written == self.header.records {
            return Err(StreamError::TooManyRecords {
                declared: self.header.records,
            });
        }
        check_record(offset, len, self.header.disk_size, self.prev_end)?;
        self.written += 1;
        self.prev_end = offset + len;
        Ok(())
    }

    pub fn zero(&mut self, offset: u64, len: u64) -> Result<Bytes, StreamError> {
        self.record(offset, len)?;
        Ok(Bytes::copy_from_slice(&encode_record(
            KIND_ZERO, offset, len,
        )))
    }

    pub fn begin_data(&mut self, offset: u64, len: u64) -> Result<Bytes, StreamError> {
        self.record(offset, len)?;
        self.open = Some((len, crc32fast::Hasher::new()));
        Ok(Bytes::copy_from_slice(&encode_record(
            KIND_DATA, offset, len,
        )))
    }

    /// Accounts one frame of the open record's data (sent by the caller).
    pub fn data(&mut self, frame: &[u8]) -> Result<(), StreamError> {
        let (due, hasher) = self
            .open
            .as_mut()
            .ok_or(StreamError::Encoder("data outside a data record"))?;
        if frame.len() as u64 > *due {
            return Err(StreamError::Encoder("more data than the record's length"));
        }
        *due -= frame.len() as u64;
        hasher.update(frame);
        self.data_bytes += frame.len() as u64;
        Ok(())
    }

    pub fn end_data(&mut self) -> Result<Bytes, StreamError> {
        match self.open.take() {
            Some((0, hasher)) => {
                let mut t = [0u8; TRAILER_LEN];
                t[..4].copy_from_slice(&hasher.finalize().to_le_bytes());
                Ok(Bytes::copy_from_slice(&t))
            }
            Some(open) => {
                self.open = Some(open);
                Err(StreamError::Encoder("data record ended short"))
            }
            None => Err(StreamError::Encoder("no data record open")),
        }
    }

    pub fn finish(&mut self) -> Result<Bytes, StreamError> {
        if self.open.is_some() || self.written != self.header.records {
            return Err(StreamError::Encoder(
                "finish before every record was written",
            ));
        }
        Ok(Bytes::copy_from_slice(&encode_record(
            KIND_END,
            self.written,
            self.data_bytes,
        )))
    }
}

/// Version 2: the header of a body covering `h.start..h.end`.
pub fn header_v2(h: &StreamHeader) -> Bytes {
    let mut b = [0u8; HEADER_LEN_2];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION_2.to_le_bytes());
    b[10..12].copy_from_slice(&(HEADER_LEN_2 as u16).to_le_bytes());
    b[12..16].copy_from_slice(&h.flags.to_le_bytes());
    b[16..24].copy_from_slice(&h.disk_size.to_le_bytes());
    b[24..32].copy_from_slice(&h.start.to_le_bytes());
    b[32..40].copy_from_slice(&h.end.to_le_bytes());
    b[40..44].copy_from_slice(&h.shard.to_le_bytes());
    b[44..48].copy_from_slice(&h.shards.to_le_bytes());
    // 48..56 reserved.
    let c = crc(&b[..56]);
    b[56..60].copy_from_slice(&c.to_le_bytes());
    Bytes::copy_from_slice(&b)
}

fn encode_record_v2(kind: u8, stored: u32, a: u64, b: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = kind;
    r[4..8].copy_from_slice(&stored.to_le_bytes());
    r[8..16].copy_from_slice(&a.to_le_bytes());
    r[16..24].copy_from_slice(&b.to_le_bytes());
    let c = crc(&r[..24]);
    r[24..28].copy_from_slice(&c.to_le_bytes());
    r
}

/// Version 2: a zero record (the same bytes as in version 1).
pub fn zero_record(offset: u64, len: u64) -> Bytes {
    Bytes::copy_from_slice(&encode_record_v2(KIND_ZERO, 0, offset, len))
}

/// Version 2: the end record of a body of `records` records carrying
/// `data_bytes` bytes of data (uncompressed).
pub fn end_record(records: u64, data_bytes: u64) -> Bytes {
    Bytes::copy_from_slice(&encode_record_v2(KIND_END, 0, records, data_bytes))
}

/// Version 2: the body's records are the plan's changes inside `span`,
/// cut at its ends (`from`, shard boundaries).
pub fn clip(changes: &[Change], span: Range<u64>) -> Vec<Change> {
    changes
        .iter()
        .filter_map(|c| {
            let s = c.offset.max(span.start);
            let e = (c.offset + c.len).min(span.end);
            (s < e).then(|| Change {
                kind: c.kind,
                offset: s,
                len: e - s,
            })
        })
        .collect()
}

/// Version 2: the plan's data changes cut on the [`RECORD_MAX`] grid of the
/// disk (each piece is encoded by [`encode_piece`] into one or more
/// records); zero changes stay whole.
pub fn pieces(changes: &[Change]) -> Vec<Change> {
    let mut out = Vec::with_capacity(changes.len());
    for c in changes {
        if c.kind == ChangeKind::Zero {
            out.push(*c);
            continue;
        }
        let end = c.offset + c.len;
        let mut pos = c.offset;
        while pos < end {
            let next = ((pos / RECORD_MAX + 1) * RECORD_MAX).min(end);
            out.push(Change {
                kind: ChangeKind::Data,
                offset: pos,
                len: next - pos,
            });
            pos = next;
        }
    }
    out
}

/// Version 2: the span of shard `shard` of `shards`: the disk cut on the
/// [`RECORD_MAX`] grid so each shard holds about the same data bytes of the
/// plan (the cut after the `k`-th shard is the first grid line at or past
/// the byte where `ceil(k * total / shards)` data bytes are reached).
pub fn shard_span(changes: &[Change], size: u64, shard: u32, shards: u32) -> Range<u64> {
    let total: u64 = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::Data)
        .map(|c| c.len)
        .sum();
    let cut = |k: u32| -> u64 {
        if k == 0 {
            return 0;
        }
        if k >= shards {
            return size;
        }
        let target = (k as u128 * total as u128).div_ceil(shards as u128) as u64;
        let mut seen = 0u64;
        let mut at = 0u64;
        for c in changes.iter().filter(|c| c.kind == ChangeKind::Data) {
            if seen + c.len >= target {
                at = c.offset + (target - seen);
                break;
            }
            seen += c.len;
        }
        (at.div_ceil(RECORD_MAX) * RECORD_MAX).min(size)
    };
    cut(shard)..cut(shard + 1)
}

/// The records of one version 2 data piece.
#[derive(Debug, Default)]
pub struct EncodedPiece {
    pub bytes: Vec<u8>,
    pub records: u64,
    /// Uncompressed data bytes (zero blocks excluded).
    pub data_bytes: u64,
}

thread_local! {
    /// One zstd context per thread and level (a context is about 1 MiB to
    /// set up; pieces are encoded on the blocking pool's threads).
    static ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

thread_local! {
    /// The level-1 context of [`worth_compressing`]'s samples (kept apart
    /// from [`ZSTD`], whose context is rebuilt when its level changes).
    static SAMPLER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Version 2: a data record shorter than this is always compressed whole.
pub const SAMPLE_MIN: usize = 64 << 10;
/// Version 2: samples [`worth_compressing`] takes of a longer record.
const SAMPLES: usize = 8;
/// Version 2: bytes per sample.
const SAMPLE_LEN: usize = 4096;

/// Whether a data record is worth compressing whole, from its own bytes
/// alone (so a resumed body or a shard decides the same): a record of at
/// least [`SAMPLE_MIN`] bytes is sampled, [`SAMPLES`] slices of
/// [`SAMPLE_LEN`] bytes starting at `k × len / SAMPLES` (`k = 0..SAMPLES`),
/// concatenated and compressed at zstd level 1; when that saves less than
/// 1/32 of the sample, the record goes raw without compressing it whole.
/// Already-compressed or encrypted data (packages, media, random blocks)
/// then costs a 32 KiB probe per MiB instead of a full compression that is
/// thrown away.
pub fn worth_compressing(data: &[u8]) -> bool {
    if data.len() < SAMPLE_MIN {
        return true;
    }
    let mut sample = [0u8; SAMPLES * SAMPLE_LEN];
    for k in 0..SAMPLES {
        let at = k * data.len() / SAMPLES;
        sample[k * SAMPLE_LEN..(k + 1) * SAMPLE_LEN].copy_from_slice(&data[at..at + SAMPLE_LEN]);
    }
    SAMPLER.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = zstd::bulk::Compressor::new(1).ok();
        }
        let Some(c) = z.as_mut() else { return true };
        // Room for less than 31/32 of the sample: a frame that does not
        // save that much fails to fit (as a zstd failure would: the whole
        // record would not compress either).
        let mut out = Vec::with_capacity(sample.len() * 31 / 32 - 1);
        matches!(c.compress_to_buffer(&sample[..], &mut out), Ok(n) if n * 32 < sample.len() * 31)
    })
}

/// zstd frame of `data` when it is shorter than `data`.
fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        if z.as_ref().map(|(l, _)| *l) != Some(level) {
            *z = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = z.as_mut()?;
        // Room for one byte less than the data: a frame that does not
        // shrink fails to fit and the record goes raw.
        let mut out = Vec::with_capacity(data.len().saturating_sub(1));
        c.compress_to_buffer(data, &mut out).ok()?;
        (!out.is_empty() && out.len() < data.len()).then_some(out)
    })
}

/// Version 2: the records of the data piece at `offset` (one of
/// [`pieces`]; at most [`RECORD_MAX`] bytes): every [`ZERO_BLOCK`]-aligned
/// block of the disk that lies wholly inside the piece and is all zeros
/// becomes part of a zero record (consecutive ones merged), the bytes
/// between become data records, each compressed with zstd at `level` when
/// its sample compresses ([`worth_compressing`]) and the frame is shorter
/// than the data (kind 4), and sent raw otherwise (kind 1).
pub fn encode_piece(offset: u64, data: &[u8], level: Option<i32>) -> EncodedPiece {
    static ZEROS: [u8; ZERO_BLOCK as usize] = [0; ZERO_BLOCK as usize];
    let mut out = EncodedPiece {
        bytes: Vec::with_capacity(data.len() / 2 + 256),
        ..Default::default()
    };
    let end = offset + data.len() as u64;
    // Runs of (is_zero, start, end) in disk offsets.
    let mut runs: Vec<(bool, u64, u64)> = Vec::new();
    let mut push = |zero: bool, s: u64, e: u64| match runs.last_mut() {
        Some(last) if last.0 == zero && last.2 == s => last.2 = e,
        _ => runs.push((zero, s, e)),
    };
    let mut pos = offset;
    while pos < end {
        let block_end = ((pos / ZERO_BLOCK + 1) * ZERO_BLOCK).min(end);
        let whole = pos % ZERO_BLOCK == 0 && block_end - pos == ZERO_BLOCK;
        let bytes = &data[(pos - offset) as usize..(block_end - offset) as usize];
        push(whole && bytes == &ZEROS[..], pos, block_end);
        pos = block_end;
    }
    for (zero, s, e) in runs {
        out.records += 1;
        if zero {
            out.bytes
                .extend_from_slice(&encode_record_v2(KIND_ZERO, 0, s, e - s));
            continue;
        }
        let bytes = &data[(s - offset) as usize..(e - offset) as usize];
        out.data_bytes += e - s;
        match level
            .filter(|_| worth_compressing(bytes))
            .and_then(|l| compress(bytes, l))
        {
            Some(packed) => {
                out.bytes.extend_from_slice(&encode_record_v2(
                    KIND_ZSTD,
                    packed.len() as u32,
                    s,
                    e - s,
                ));
                out.bytes.extend_from_slice(&packed);
            }
            None => {
                out.bytes
                    .extend_from_slice(&encode_record_v2(KIND_DATA, 0, s, e - s));
                out.bytes.extend_from_slice(bytes);
            }
        }
        let mut t = [0u8; TRAILER_LEN];
        t[..4].copy_from_slice(&crc(bytes).to_le_bytes());
        out.bytes.extend_from_slice(&t);
    }
    out
}

/// The records of one version 2 data piece without compression, its data
/// left in the input's buffers ([`encode_piece_raw`]).
#[derive(Debug, Default)]
pub struct RawPiece {
    /// The body bytes in order: record headers and trailers (small, new)
    /// and data (slices of the input segments, not copied).
    pub parts: Vec<Bytes>,
    pub records: u64,
    /// Uncompressed data bytes (zero blocks excluded).
    pub data_bytes: u64,
}

/// Version 2 without zstd: the records of the data piece at `offset` whose
/// bytes are `segs` in order (as read, cut anywhere): the same body bytes
/// as [`encode_piece`] with no level, but the data records' bytes are
/// slices of `segs` (shared, never copied), so a raw stream moves no more
/// bytes than version 1 does.
pub fn encode_piece_raw(offset: u64, segs: &[Bytes]) -> RawPiece {
    static ZEROS: [u8; ZERO_BLOCK as usize] = [0; ZERO_BLOCK as usize];
    let len: u64 = segs.iter().map(|s| s.len() as u64).sum();
    let end = offset + len;
    // Segment `i` holds disk bytes [starts[i], starts[i + 1]).
    let mut starts = Vec::with_capacity(segs.len() + 1);
    let mut at = offset;
    for s in segs {
        starts.push(at);
        at += s.len() as u64;
    }
    starts.push(at);
    // The slices of the segments covering disk bytes [s, e), in order.
    let starts = &starts[..];
    let slices = |s: u64, e: u64| {
        let first = starts.partition_point(|&x| x <= s).saturating_sub(1);
        (first..segs.len())
            .take_while(move |&i| starts[i] < e)
            .filter_map(move |i| {
                let a = s.max(starts[i]) - starts[i];
                let b = e.min(starts[i + 1]) - starts[i];
                (a < b).then(|| segs[i].slice(a as usize..b as usize))
            })
    };
    let mut out = RawPiece::default();
    let mut runs: Vec<(bool, u64, u64)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let block_end = ((pos / ZERO_BLOCK + 1) * ZERO_BLOCK).min(end);
        let whole = pos % ZERO_BLOCK == 0 && block_end - pos == ZERO_BLOCK;
        let zero = whole && slices(pos, block_end).all(|b| b[..] == ZEROS[..b.len()]);
        match runs.last_mut() {
            Some(last) if last.0 == zero && last.2 == pos => last.2 = block_end,
            _ => runs.push((zero, pos, block_end)),
        }
        pos = block_end;
    }
    for (zero, s, e) in runs {
        out.records += 1;
        if zero {
            out.parts.push(Bytes::copy_from_slice(&encode_record_v2(
                KIND_ZERO,
                0,
                s,
                e - s,
            )));
            continue;
        }
        out.data_bytes += e - s;
        out.parts.push(Bytes::copy_from_slice(&encode_record_v2(
            KIND_DATA,
            0,
            s,
            e - s,
        )));
        let mut h = crc32fast::Hasher::new();
        for b in slices(s, e) {
            h.update(&b);
            out.parts.push(b);
        }
        let mut t = [0u8; TRAILER_LEN];
        t[..4].copy_from_slice(&h.finalize().to_le_bytes());
        out.parts.push(Bytes::copy_from_slice(&t));
    }
    out
}

/// Version 2: a whole body in memory (tests, fuzzing, the bench): the
/// records of `changes` (a plan, see [`plan_changes`]) over `disk` inside
/// `span`, header and end record included.
pub fn encode_v2(
    disk: &[u8],
    changes: &[Change],
    header: &StreamHeader,
    level: Option<i32>,
) -> Vec<u8> {
    let mut out = header_v2(header).to_vec();
    let (mut records, mut data_bytes) = (0, 0);
    for p in pieces(&clip(changes, header.start..header.end)) {
        match p.kind {
            ChangeKind::Zero => {
                out.extend_from_slice(&zero_record(p.offset, p.len));
                records += 1;
            }
            ChangeKind::Data => {
                let e = encode_piece(
                    p.offset,
                    &disk[p.offset as usize..(p.offset + p.len) as usize],
                    level,
                );
                out.extend_from_slice(&e.bytes);
                records += e.records;
                data_bytes += e.data_bytes;
            }
        }
    }
    out.extend_from_slice(&end_record(records, data_bytes));
    out
}

/// What the decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Header(StreamHeader),
    /// The range reads as zeros.
    Zero {
        offset: u64,
        len: u64,
    },
    /// A data record begins; [`Event::Data`] chunks follow.
    DataStart {
        offset: u64,
        len: u64,
    },
    /// Bytes of the open data record, at `offset` of the disk. Not yet
    /// verified: a client writes them, and must redo the record's range if
    /// its [`Event::DataEnd`] does not come.
    Data {
        offset: u64,
        bytes: Bytes,
    },
    /// The data record's checksum matched.
    DataEnd {
        offset: u64,
        len: u64,
    },
    /// The end record: the stream is complete and consistent.
    End {
        records: u64,
        data_bytes: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Magic, version and header length (the first [`HEADER_PREFIX`] bytes).
    Header,
    /// The rest of a header of `len` bytes.
    HeaderRest {
        len: usize,
    },
    Record,
    /// The zstd frame of a kind-4 record, `stored` bytes.
    Packed {
        offset: u64,
        len: u64,
        stored: usize,
    },
    Data {
        offset: u64,
        len: u64,
        pos: u64,
    },
    Trailer {
        offset: u64,
        len: u64,
    },
    Done,
    Failed,
}

/// Push parser of the stream. Feed it the body as it arrives with
/// [`decode`]; call [`finish`] at the end of the body.
///
/// [`decode`]: Decoder::decode
/// [`finish`]: Decoder::finish
pub struct Decoder {
    state: State,
    /// A fixed-size header being assembled across input chunks.
    fixed: [u8; HEADER_LEN_2],
    fill: usize,
    header: StreamHeader,
    records: u64,
    data_bytes: u64,
    prev_end: u64,
    hasher: crc32fast::Hasher,
    /// The zstd frame of a kind-4 record being gathered (at most
    /// [`RECORD_MAX`] bytes: a frame must be shorter than its record).
    packed: Vec<u8>,
    unzstd: Option<zstd::bulk::Decompressor<'static>>,
}

/// Bytes of a stream header a reader needs to know its version and length.
const HEADER_PREFIX: usize = 12;

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            state: State::Header,
            fixed: [0; HEADER_LEN_2],
            fill: 0,
            header: StreamHeader::v1(0, 0),
            records: 0,
            data_bytes: 0,
            prev_end: 0,
            hasher: crc32fast::Hasher::new(),
            packed: Vec::new(),
            unzstd: None,
        }
    }

    /// The next event from `input`, consuming what it used. `Ok(None)`
    /// means `input` is exhausted and more is needed (or the stream is
    /// complete). After an error every call fails.
    pub fn decode(&mut self, input: &mut Bytes) -> Result<Option<Event>, StreamError> {
        let r = self.step(input);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(&mut self, input: &mut Bytes) -> Result<Option<Event>, StreamError> {
        loop {
            match self.state {
                State::Failed => return Err(StreamError::Failed),
                State::Done => {
                    return if input.is_empty() {
                        Ok(None)
                    } else {
                        Err(StreamError::Trailing)
                    }
                }
                State::Header => {
                    if !self.gather_keep(input, HEADER_PREFIX) {
                        return Ok(None);
                    }
                    let len = self.parse_prefix()?;
                    self.state = State::HeaderRest { len };
                }
                State::HeaderRest { len } => {
                    if !self.gather_keep(input, len) {
                        return Ok(None);
                    }
                    self.fill = 0;
                    return self.parse_header().map(Some);
                }
                State::Packed {
                    offset,
                    len,
                    stored,
                } => {
                    let n = (stored - self.packed.len()).min(input.len());
                    self.packed.extend_from_slice(&input[..n]);
                    input.advance(n);
                    if self.packed.len() < stored {
                        return Ok(None);
                    }
                    let bad = |why| StreamError::Compressed { offset, len, why };
                    let unzstd = match &mut self.unzstd {
                        Some(d) => d,
                        None => self.unzstd.insert(
                            zstd::bulk::Decompressor::new()
                                .map_err(|_| bad("no zstd decompressor"))?,
                        ),
                    };
                    // The capacity bounds the output: a frame that claims
                    // or makes more than the record's length fails here.
                    let data = unzstd
                        .decompress(&self.packed, len as usize)
                        .map_err(|_| bad("not a valid zstd frame of the record's length"))?;
                    if data.len() as u64 != len {
                        return Err(bad("decompresses to another length"));
                    }
                    self.packed.clear();
                    self.hasher.update(&data);
                    self.state = State::Trailer { offset, len };
                    return Ok(Some(Event::Data {
                        offset,
                        bytes: Bytes::from(data),
                    }));
                }
                State::Record => {
                    if !self.gather(input, RECORD_LEN) {
                        return Ok(None);
                    }
                    if let Some(ev) = self.parse_record()? {
                        return Ok(Some(ev));
                    }
                }
                State::Data { offset, len, pos } => {
                    if pos == len {
                        self.state = State::Trailer { offset, len };
                        continue;
                    }
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let n = (len - pos).min(input.len() as u64) as usize;
                    let bytes = input.split_to(n);
                    self.hasher.update(&bytes);
                    self.state = State::Data {
                        offset,
                        len,
                        pos: pos + n as u64,
                    };
                    return Ok(Some(Event::Data {
                        offset: offset + pos,
                        bytes,
                    }));
                }
                State::Trailer { offset, len } => {
                    if !self.gather(input, TRAILER_LEN) {
                        return Ok(None);
                    }
                    let t = &self.fixed[..TRAILER_LEN];
                    let sum = std::mem::replace(&mut self.hasher, crc32fast::Hasher::new());
                    if le_u32(&t[..4]) != sum.finalize() {
                        return Err(StreamError::DataChecksum { offset, len });
                    }
                    if le_u32(&t[4..8]) != 0 {
                        return Err(StreamError::Reserved { what: "trailer" });
                    }
                    self.state = State::Record;
                    return Ok(Some(Event::DataEnd { offset, len }));
                }
            }
        }
    }

    /// Collects `need` bytes into `fixed`; true when complete (and resets the
    /// fill for the next one).
    fn gather(&mut self, input: &mut Bytes, need: usize) -> bool {
        if self.gather_keep(input, need) {
            self.fill = 0;
            true
        } else {
            false
        }
    }

    /// As [`Decoder::gather`], keeping the fill (a header read in two steps).
    fn gather_keep(&mut self, input: &mut Bytes, need: usize) -> bool {
        let n = (need - self.fill).min(input.len());
        self.fixed[self.fill..self.fill + n].copy_from_slice(&input[..n]);
        input.advance(n);
        self.fill += n;
        self.fill == need
    }

    /// Magic, version and header length: the header's full length.
    fn parse_prefix(&mut self) -> Result<usize, StreamError> {
        let b = &self.fixed;
        if b[0..8] != MAGIC {
            return Err(StreamError::Magic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        let len = match version {
            VERSION => HEADER_LEN,
            VERSION_2 => HEADER_LEN_2,
            v => return Err(StreamError::Version(v)),
        };
        self.header.version = version;
        Ok(len)
    }

    fn parse_header(&mut self) -> Result<Event, StreamError> {
        let b = &self.fixed;
        let (len, crc_at) = match self.header.version {
            VERSION => (HEADER_LEN, 32),
            _ => (HEADER_LEN_2, 56),
        };
        if le_u32(&b[crc_at..crc_at + 4]) != crc(&b[..crc_at]) {
            return Err(StreamError::HeaderChecksum { what: "stream" });
        }
        if u16::from_le_bytes([b[10], b[11]]) as usize != len
            || le_u32(&b[crc_at + 4..crc_at + 8]) != 0
        {
            return Err(StreamError::Reserved {
                what: "stream header",
            });
        }
        let disk_size = le_u64(&b[16..24]);
        if self.header.version == VERSION {
            if le_u32(&b[12..16]) != 0 {
                return Err(StreamError::Reserved {
                    what: "stream header",
                });
            }
            self.header = StreamHeader::v1(disk_size, le_u64(&b[24..32]));
        } else {
            let flags = le_u32(&b[12..16]);
            let (start, end) = (le_u64(&b[24..32]), le_u64(&b[32..40]));
            let (shard, shards) = (le_u32(&b[40..44]), le_u32(&b[44..48]));
            if flags & !KNOWN_FLAGS != 0 || le_u64(&b[48..56]) != 0 {
                return Err(StreamError::Reserved {
                    what: "stream header",
                });
            }
            if start > end || end > disk_size {
                return Err(StreamError::BadHeader("span outside the disk"));
            }
            let sharded = flags & FLAG_SHARD != 0;
            if shards == 0 || shard >= shards || shards > MAX_SHARDS || sharded != (shards > 1) {
                return Err(StreamError::BadHeader("shard fields"));
            }
            self.header = StreamHeader {
                disk_size,
                records: 0,
                version: VERSION_2,
                flags,
                start,
                end,
                shard,
                shards,
            };
            self.prev_end = start;
        }
        self.state = State::Record;
        Ok(Event::Header(self.header))
    }

    fn parse_record(&mut self) -> Result<Option<Event>, StreamError> {
        let r = &self.fixed[..RECORD_LEN];
        if le_u32(&r[24..28]) != crc(&r[..24]) {
            return Err(StreamError::HeaderChecksum { what: "record" });
        }
        let v2 = self.header.version == VERSION_2;
        // Version 2 gives bytes 4..8 a meaning: the stored length of a
        // kind-4 record (zero for every other kind).
        let reserved = if v2 { &r[1..4] } else { &r[1..8] };
        if reserved.iter().any(|&b| b != 0) || le_u32(&r[28..32]) != 0 {
            return Err(StreamError::Reserved { what: "record" });
        }
        let (kind, a, b) = (r[0], le_u64(&r[8..16]), le_u64(&r[16..24]));
        let stored = le_u32(&r[4..8]) as u64;
        if v2 && kind != KIND_ZSTD && stored != 0 {
            return Err(StreamError::Reserved { what: "record" });
        }
        match kind {
            KIND_DATA | KIND_ZERO | KIND_ZSTD => {
                if kind == KIND_ZSTD && !(v2 && self.header.flags & FLAG_ZSTD != 0) {
                    return Err(StreamError::Kind(kind));
                }
                if !v2 && self.records == self.header.records {
                    return Err(StreamError::TooManyRecords {
                        declared: self.header.records,
                    });
                }
                let limit = if v2 {
                    self.header.end
                } else {
                    self.header.disk_size
                };
                check_record(a, b, limit, self.prev_end)?;
                if v2 && kind != KIND_ZERO && b > RECORD_MAX {
                    return Err(StreamError::OutOfBounds {
                        offset: a,
                        len: b,
                        size: limit,
                    });
                }
                if kind == KIND_ZSTD && (stored == 0 || stored >= b) {
                    return Err(StreamError::Compressed {
                        offset: a,
                        len: b,
                        why: "stored length not between 1 and the record's length",
                    });
                }
                self.records += 1;
                self.prev_end = a + b;
                if kind == KIND_ZERO {
                    return Ok(Some(Event::Zero { offset: a, len: b }));
                }
                self.data_bytes += b;
                self.state = if kind == KIND_ZSTD {
                    self.packed.reserve_exact(stored as usize);
                    State::Packed {
                        offset: a,
                        len: b,
                        stored: stored as usize,
                    }
                } else {
                    State::Data {
                        offset: a,
                        len: b,
                        pos: 0,
                    }
                };
                Ok(Some(Event::DataStart { offset: a, len: b }))
            }
            KIND_END => {
                let declared = if v2 { a } else { self.header.records };
                if a != self.records || b != self.data_bytes || a != declared || stored != 0 {
                    return Err(StreamError::EndMismatch {
                        records: a,
                        data_bytes: b,
                        seen_records: self.records,
                        seen_bytes: self.data_bytes,
                    });
                }
                self.state = State::Done;
                Ok(Some(Event::End {
                    records: a,
                    data_bytes: b,
                }))
            }
            k => Err(StreamError::Kind(k)),
        }
    }

    /// Call at the end of the body: an error unless the end record was read.
    pub fn finish(&self) -> Result<(), StreamError> {
        match self.state {
            State::Done => Ok(()),
            State::Failed => Err(StreamError::Failed),
            State::Header | State::HeaderRest { .. } => {
                Err(StreamError::Truncated("the stream header"))
            }
            State::Record => Err(StreamError::Truncated("a record header")),
            State::Data { .. } | State::Packed { .. } => {
                Err(StreamError::Truncated("a data record"))
            }
            State::Trailer { .. } => Err(StreamError::Truncated("a checksum trailer")),
        }
    }

    /// Whether the end record has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

/// Decodes a whole stream held in memory, fed in chunks of `chunk` bytes
/// (tests, fuzzing). Data events are merged per record.
pub fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<Event>, StreamError> {
    let mut d = Decoder::new();
    let mut events: Vec<Event> = Vec::new();
    // The data run being merged: appended to in place (amortised linear),
    // not copied whole for every piece, so 1-byte chunks stay cheap.
    let mut run: Option<(u64, Vec<u8>)> = None;
    let flush = |run: &mut Option<(u64, Vec<u8>)>, events: &mut Vec<Event>| {
        if let Some((offset, v)) = run.take() {
            events.push(Event::Data {
                offset,
                bytes: Bytes::from(v),
            });
        }
    };
    for piece in bytes.chunks(chunk.max(1)) {
        let mut input = Bytes::copy_from_slice(piece);
        while let Some(ev) = d.decode(&mut input)? {
            match (&mut run, ev) {
                (Some((offset, v)), Event::Data { offset: o, bytes })
                    if *offset + v.len() as u64 == o =>
                {
                    v.extend_from_slice(&bytes)
                }
                (_, Event::Data { offset, bytes }) => {
                    flush(&mut run, &mut events);
                    run = Some((offset, bytes.to_vec()));
                }
                (_, ev) => {
                    flush(&mut run, &mut events);
                    events.push(ev);
                }
            }
        }
    }
    flush(&mut run, &mut events);
    d.finish()?;
    Ok(events)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    /// Encodes `changes` of `disk` (data read from it) in one buffer.
    fn encode(disk: &[u8], changes: &[Change]) -> Vec<u8> {
        let mut e = Encoder::new(disk.len() as u64, changes.len() as u64);
        let mut out = e.header().to_vec();
        for c in changes {
            match c.kind {
                ChangeKind::Zero => out.extend_from_slice(&e.zero(c.offset, c.len).unwrap()),
                ChangeKind::Data => {
                    out.extend_from_slice(&e.begin_data(c.offset, c.len).unwrap());
                    let data = &disk[c.offset as usize..(c.offset + c.len) as usize];
                    // Frames of uneven sizes, as the io core produces.
                    for f in data.chunks(3) {
                        e.data(f).unwrap();
                        out.extend_from_slice(f);
                    }
                    out.extend_from_slice(&e.end_data().unwrap());
                }
            }
        }
        out.extend_from_slice(&e.finish().unwrap());
        out
    }

    /// Applies a decoded stream onto `replica`.
    fn apply(replica: &mut [u8], events: &[Event]) {
        for ev in events {
            match ev {
                Event::Zero { offset, len } => {
                    replica[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                Event::Data { offset, bytes } => {
                    replica[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes)
                }
                _ => {}
            }
        }
    }

    fn sample() -> (Vec<u8>, Vec<Change>) {
        let disk: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let changes = vec![
            Change {
                kind: ChangeKind::Data,
                offset: 0,
                len: 10,
            },
            Change {
                kind: ChangeKind::Zero,
                offset: 10,
                len: 90,
            },
            Change {
                kind: ChangeKind::Data,
                offset: 500,
                len: 17,
            },
            Change {
                kind: ChangeKind::Data,
                offset: 999,
                len: 1,
            },
        ];
        (disk, changes)
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let (disk, changes) = sample();
        let stream = encode(&disk, &changes);
        assert_eq!(
            stream.len(),
            HEADER_LEN + 5 * RECORD_LEN + 3 * TRAILER_LEN + 28,
            "layout as the spec says"
        );
        assert_eq!(encoded_len(&changes), stream.len() as u64);
        for chunk in [1, 2, 7, 32, 40, 41, 1000, stream.len()] {
            let events = decode_all(&stream, chunk).unwrap();
            assert_eq!(events[0], Event::Header(StreamHeader::v1(1000, 4)));
            assert_eq!(
                events.last(),
                Some(&Event::End {
                    records: 4,
                    data_bytes: 28
                })
            );
            let mut replica = vec![0xEEu8; 1000];
            apply(&mut replica, &events);
            for c in &changes {
                let r = c.offset as usize..(c.offset + c.len) as usize;
                match c.kind {
                    ChangeKind::Data => assert_eq!(replica[r.clone()], disk[r]),
                    ChangeKind::Zero => assert!(replica[r].iter().all(|&b| b == 0)),
                }
            }
        }
    }

    #[test]
    fn empty_stream_round_trips() {
        let stream = encode(&[0; 10], &[]);
        let events = decode_all(&stream, 5).unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let (disk, changes) = sample();
        let stream = encode(&disk, &changes);
        for byte in 0..stream.len() {
            for bit in 0..8 {
                let mut bad = stream.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode_all(&bad, 64).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_at_every_length_is_detected() {
        let (disk, changes) = sample();
        let stream = encode(&disk, &changes);
        for len in 0..stream.len() {
            assert!(decode_all(&stream[..len], 16).is_err(), "cut at {len}");
        }
        let mut long = stream.clone();
        long.push(0);
        assert_eq!(decode_all(&long, 16), Err(StreamError::Trailing));
    }

    #[test]
    fn checksum_mismatch_names_the_range() {
        let (disk, changes) = sample();
        let mut stream = encode(&disk, &changes);
        // First data byte of the record at 500.
        let at = HEADER_LEN + RECORD_LEN + 10 + TRAILER_LEN + RECORD_LEN + RECORD_LEN;
        assert_eq!(stream[at], disk[500]);
        stream[at] ^= 0xFF;
        assert_eq!(
            decode_all(&stream, 100),
            Err(StreamError::DataChecksum {
                offset: 500,
                len: 17
            })
        );
    }

    #[test]
    fn encoder_refuses_misuse() {
        let mut e = Encoder::new(100, 2);
        assert!(e.zero(0, 0).is_err(), "empty record");
        assert!(e.zero(90, 11).is_err(), "past the disk");
        e.zero(10, 10).unwrap();
        assert!(matches!(e.zero(15, 1), Err(StreamError::Order { .. })));
        e.begin_data(20, 4).unwrap();
        assert!(e.data(&[0; 5]).is_err());
        e.data(&[0; 3]).unwrap();
        assert!(e.end_data().is_err(), "short record");
        e.data(&[0; 1]).unwrap();
        e.end_data().unwrap();
        assert!(matches!(
            e.zero(50, 1),
            Err(StreamError::TooManyRecords { .. })
        ));
        e.finish().unwrap();
        assert!(Encoder::new(100, 1).finish().is_err());
    }

    #[test]
    fn decoder_rejects_lies_it_cannot_checksum_away() {
        // A well-formed record header (valid CRC) describing a range past the
        // disk must fail before any data is read or allocated.
        let mut e = Encoder::new(u64::MAX, 1);
        let mut s = Encoder::new(10, 1).header().to_vec();
        s.extend_from_slice(&e.begin_data(0, u64::MAX - 1).unwrap());
        assert!(matches!(
            decode_all(&s, 64),
            Err(StreamError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn plan_merges_data_and_zeroed() {
        let c = |k, o, l| Change {
            kind: k,
            offset: o,
            len: l,
        };
        use ChangeKind::{Data as D, Zero as Z};
        assert_eq!(
            plan_changes(&[0..10, 20..30], &[5..8, 40..50]),
            vec![
                c(D, 0, 5),
                c(Z, 5, 3),
                c(D, 8, 2),
                c(D, 20, 10),
                c(Z, 40, 10)
            ]
        );
        // Zeroed ranges inside the chunks (the API's default listing).
        assert_eq!(
            plan_changes(&[0..100], &[0..10, 90..100]),
            vec![c(Z, 0, 10), c(D, 10, 80), c(Z, 90, 10)]
        );
        // Zero range spanning two data ranges.
        assert_eq!(
            plan_changes(&[0..10, 20..30], &[5..25]),
            vec![c(D, 0, 5), c(Z, 5, 20), c(D, 25, 5)]
        );
        assert_eq!(plan_changes(&[], &[1..2]), vec![c(Z, 1, 1)]);
    }

    #[test]
    fn plan_is_always_valid_and_covers_the_union() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..2000 {
            let gen = |rng: &mut fastrand::Rng| {
                let mut v = Vec::new();
                let mut pos = 0;
                for _ in 0..rng.usize(0..6) {
                    let s = pos + rng.u64(0..20);
                    let e = s + rng.u64(1..20);
                    v.push(s..e);
                    pos = e + 1;
                }
                v
            };
            let (d, z) = (gen(&mut rng), gen(&mut rng));
            let plan = plan_changes(&d, &z);
            validate_changes(&plan, 1000).unwrap();
            for x in 0..300u64 {
                let in_d = d.iter().any(|r| r.contains(&x));
                let in_z = z.iter().any(|r| r.contains(&x));
                let got = plan.iter().find(|c| c.offset <= x && x < c.offset + c.len);
                let want = match (in_d, in_z) {
                    (_, true) => Some(ChangeKind::Zero),
                    (true, false) => Some(ChangeKind::Data),
                    _ => None,
                };
                assert_eq!(got.map(|c| c.kind), want, "byte {x} of {d:?} / {z:?}");
            }
        }
    }

    /// A disk of 3 MiB + 100 bytes: random bytes, all-zero blocks inside
    /// data ranges, compressible text; and a plan over it.
    fn v2_sample() -> (Vec<u8>, Vec<Change>) {
        let mut rng = fastrand::Rng::with_seed(5);
        let size = 3 * RECORD_MAX as usize + 100;
        let mut disk: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
        for b in [2usize, 3, 4, 100, 256, 257, 700] {
            disk[b * 4096..(b + 1) * 4096].fill(0);
        }
        for (i, b) in disk[1_500_000..2_400_000].iter_mut().enumerate() {
            *b = b"the quick brown fox "[i % 20];
        }
        let data = vec![
            100..40_000,
            200_000..1_100_000,
            1_400_000..2_900_000,
            3 * RECORD_MAX..3 * RECORD_MAX + 100,
        ];
        let zeroed = vec![50_000..60_000, 3_000_000..3_100_000];
        (disk, plan_changes(&data, &zeroed))
    }

    fn v2_header(size: u64, flags: u32, span: Range<u64>) -> StreamHeader {
        StreamHeader {
            disk_size: size,
            records: 0,
            version: VERSION_2,
            flags,
            start: span.start,
            end: span.end,
            shard: 0,
            shards: 1,
        }
    }

    /// (byte position in the body, disk offset) of every record.
    fn record_starts(body: &[u8]) -> Vec<(usize, u64)> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for (i, b) in body.iter().enumerate() {
            let mut input = Bytes::copy_from_slice(&[*b]);
            while let Some(ev) = d.decode(&mut input).unwrap() {
                if let Event::Zero { offset, .. } | Event::DataStart { offset, .. } = ev {
                    out.push((i + 1 - RECORD_LEN, offset));
                }
            }
        }
        out
    }

    #[test]
    fn v2_round_trips_with_zero_blocks_and_zstd() {
        let (disk, plan) = v2_sample();
        let size = disk.len() as u64;
        for level in [None, Some(DEFAULT_ZSTD_LEVEL)] {
            let flags = FLAG_ZERO_BLOCKS | if level.is_some() { FLAG_ZSTD } else { 0 };
            let body = encode_v2(&disk, &plan, &v2_header(size, flags, 0..size), level);
            let events = decode_all(&body, 70_001).unwrap();
            let mut replica = vec![0xEEu8; disk.len()];
            apply(&mut replica, &events);
            for c in &plan {
                let r = c.offset as usize..(c.offset + c.len) as usize;
                match c.kind {
                    ChangeKind::Data => assert_eq!(replica[r.clone()], disk[r]),
                    ChangeKind::Zero => assert!(replica[r].iter().all(|&b| b == 0)),
                }
            }
            // The zero blocks inside data ranges are zero records.
            let zeros: Vec<(u64, u64)> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Zero { offset, len } => Some((*offset, *len)),
                    _ => None,
                })
                .collect();
            assert!(zeros.contains(&(2 * 4096, 3 * 4096)), "{zeros:?}");
            assert!(zeros.contains(&(256 * 4096, 2 * 4096)), "{zeros:?}");
            let kinds: Vec<u8> = record_starts(&body)
                .iter()
                .map(|&(at, _)| body[at])
                .collect();
            assert_eq!(kinds.contains(&KIND_ZSTD), level.is_some());
            if level.is_some() {
                let raw = encode_v2(
                    &disk,
                    &plan,
                    &v2_header(size, FLAG_ZERO_BLOCKS, 0..size),
                    None,
                );
                assert!(
                    body.len() < raw.len() - 500_000,
                    "{} vs {}",
                    body.len(),
                    raw.len()
                );
            }
        }
    }

    #[test]
    fn v2_records_whose_sample_does_not_compress_go_raw() {
        let mut rng = fastrand::Rng::with_seed(9);
        let random: Vec<u8> = (0..RECORD_MAX as usize).map(|_| rng.u8(..)).collect();
        let text: Vec<u8> = (0..RECORD_MAX as usize)
            .map(|i| b"the quick brown fox "[i % 20])
            .collect();
        assert!(!worth_compressing(&random));
        assert!(worth_compressing(&text));
        // Half and half: half the samples compress.
        let mut half = random.clone();
        half[..RECORD_MAX as usize / 2].copy_from_slice(&text[..RECORD_MAX as usize / 2]);
        assert!(worth_compressing(&half));
        // Short records are not sampled: compressed whole, raw when the
        // frame does not shrink.
        assert!(worth_compressing(&random[..SAMPLE_MIN - 1]));
        let kind = |data: &[u8]| encode_piece(0, data, Some(DEFAULT_ZSTD_LEVEL)).bytes[0];
        assert_eq!(kind(&random), KIND_DATA);
        assert_eq!(kind(&random[..SAMPLE_MIN - 1]), KIND_DATA);
        assert_eq!(kind(&text), KIND_ZSTD);
        assert_eq!(kind(&half), KIND_ZSTD);
        // The decision is the record's bytes alone: a compressible island
        // between the samples does not make the record compressed (the
        // price of not compressing every incompressible MiB whole).
        let mut island = random.clone();
        island[8192..8192 + 100_000].copy_from_slice(&text[..100_000]);
        assert!(!worth_compressing(&island));
        assert_eq!(kind(&island), KIND_DATA);
        // Every record still round-trips.
        for data in [&random, &text, &half, &island] {
            let e = encode_piece(0, data, Some(DEFAULT_ZSTD_LEVEL));
            let mut body = header_v2(&v2_header(
                RECORD_MAX,
                FLAG_ZERO_BLOCKS | FLAG_ZSTD,
                0..RECORD_MAX,
            ))
            .to_vec();
            body.extend_from_slice(&e.bytes);
            body.extend_from_slice(&end_record(e.records, e.data_bytes));
            let mut replica = vec![0u8; data.len()];
            apply(&mut replica, &decode_all(&body, 100_000).unwrap());
            assert!(&replica == data);
        }
    }

    #[test]
    fn v2_raw_pieces_from_segments_are_the_bytes_of_encode_piece() {
        let mut rng = fastrand::Rng::with_seed(21);
        for trial in 0..200 {
            let len = rng.usize(1..=RECORD_MAX as usize / 4);
            let offset = rng.u64(0..1 << 30) / if trial % 2 == 0 { 1 } else { 4096 };
            let mut data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            // Zero runs of any length at any place, some aligned blocks.
            for _ in 0..rng.usize(0..6) {
                let a = rng.usize(0..len);
                let b = (a + rng.usize(0..20_000)).min(len);
                data[a..b].fill(0);
            }
            // Cut anywhere, empty segments included.
            let mut cuts: Vec<usize> = (0..rng.usize(0..6)).map(|_| rng.usize(0..=len)).collect();
            cuts.extend([0, len]);
            cuts.sort_unstable();
            let segs: Vec<Bytes> = cuts
                .windows(2)
                .map(|w| Bytes::copy_from_slice(&data[w[0]..w[1]]))
                .collect();
            let want = encode_piece(offset, &data, None);
            let got = encode_piece_raw(offset, &segs);
            assert!(got.parts.concat() == want.bytes, "trial {trial}");
            assert_eq!(
                (got.records, got.data_bytes),
                (want.records, want.data_bytes)
            );
        }
    }

    #[test]
    fn v2_resumed_bodies_are_the_rest_of_the_stream() {
        let (disk, plan) = v2_sample();
        let size = disk.len() as u64;
        let flags = FLAG_ZERO_BLOCKS | FLAG_ZSTD;
        let full = encode_v2(&disk, &plan, &v2_header(size, flags, 0..size), Some(1));
        let records = &full[HEADER_LEN_2..full.len() - RECORD_LEN];
        let starts = record_starts(&full);
        assert!(starts.len() > 10);
        for &(at, offset) in &starts {
            let h = v2_header(size, flags | FLAG_RESUMED, offset..size);
            let rest = encode_v2(&disk, &plan, &h, Some(1));
            assert_eq!(
                &rest[HEADER_LEN_2..rest.len() - RECORD_LEN],
                &records[at - HEADER_LEN_2..],
                "resumed at {offset}"
            );
            decode_all(&rest, 4096).unwrap();
        }
    }

    #[test]
    fn v2_shards_are_disjoint_balanced_and_cover_the_stream() {
        let (disk, plan) = v2_sample();
        let size = disk.len() as u64;
        let full = encode_v2(
            &disk,
            &plan,
            &v2_header(size, FLAG_ZERO_BLOCKS, 0..size),
            None,
        );
        for n in [1u32, 2, 3, 4, 7] {
            let mut joined = Vec::new();
            let mut prev = 0;
            for i in 0..n {
                let span = shard_span(&plan, size, i, n);
                assert_eq!(span.start, prev);
                prev = span.end;
                let mut h = v2_header(size, FLAG_ZERO_BLOCKS, span);
                if n > 1 {
                    h.flags |= FLAG_SHARD;
                    (h.shard, h.shards) = (i, n);
                }
                let body = encode_v2(&disk, &plan, &h, None);
                decode_all(&body, 9999).unwrap();
                joined.extend_from_slice(&body[HEADER_LEN_2..body.len() - RECORD_LEN]);
            }
            assert_eq!(prev, size);
            // No zero change of the sample crosses a grid line: the shards'
            // records are the whole stream's.
            assert_eq!(
                joined,
                &full[HEADER_LEN_2..full.len() - RECORD_LEN],
                "{n} shards"
            );
        }
        let data: u64 = plan
            .iter()
            .filter(|c| c.kind == ChangeKind::Data)
            .map(|c| c.len)
            .sum();
        for i in 0..2 {
            let s = shard_span(&plan, size, i, 2);
            let inside: u64 = clip(&plan, s)
                .iter()
                .filter(|c| c.kind == ChangeKind::Data)
                .map(|c| c.len)
                .sum();
            assert!(
                inside.abs_diff(data / 2) <= RECORD_MAX,
                "shard {i}: {inside} of {data}"
            );
        }
    }

    #[test]
    fn v2_every_single_bit_flip_is_detected() {
        let mut disk = vec![0u8; 3 * 4096 + 10];
        for (i, b) in disk[..4096].iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        disk[8192 + 5] = 1;
        let plan = plan_changes(&[0..3 * 4096 + 10], &[]);
        let size = disk.len() as u64;
        let body = encode_v2(
            &disk,
            &plan,
            &v2_header(size, FLAG_ZERO_BLOCKS | FLAG_ZSTD, 0..size),
            Some(3),
        );
        let kinds: Vec<u8> = record_starts(&body)
            .iter()
            .map(|&(at, _)| body[at])
            .collect();
        assert_eq!(kinds, vec![KIND_ZSTD, KIND_ZERO, KIND_ZSTD]);
        let mut harmless = 0;
        for byte in 0..body.len() {
            for bit in 0..8 {
                let mut bad = body.clone();
                bad[byte] ^= 1 << bit;
                // Inside a zstd frame a flip can hit a bit the format
                // ignores (the frame header's unused bit): harmless, and
                // what the data's CRC guarantees is that no wrong byte is
                // ever accepted.
                if let Ok(events) = decode_all(&bad, 64) {
                    let mut replica = vec![0xEEu8; disk.len()];
                    apply(&mut replica, &events);
                    assert_eq!(
                        replica, disk,
                        "bit {bit} of byte {byte} accepted, data differs"
                    );
                    assert!(
                        (HEADER_LEN_2 + RECORD_LEN..body.len() - RECORD_LEN).contains(&byte),
                        "bit {bit} of byte {byte} outside a frame accepted"
                    );
                    harmless += 1;
                }
            }
        }
        assert!(harmless <= 4, "{harmless} flips accepted");
        for len in 0..body.len() {
            assert!(decode_all(&body[..len], 16).is_err(), "cut at {len}");
        }
    }

    #[test]
    fn v1_decoder_refuses_v2_records_and_v2_bounds_records() {
        // A kind-4 record in a version 1 stream is an unknown kind.
        let mut s = Encoder::new(100, 1).header().to_vec();
        s.extend_from_slice(&encode_record_v2(KIND_ZSTD, 5, 0, 10));
        assert_eq!(
            decode_all(&s, 64),
            Err(StreamError::Reserved { what: "record" })
        );
        // Version 2 without FLAG_ZSTD: no kind 4.
        let mut s = header_v2(&v2_header(100, FLAG_ZERO_BLOCKS, 0..100)).to_vec();
        s.extend_from_slice(&encode_record_v2(KIND_ZSTD, 5, 0, 10));
        assert_eq!(decode_all(&s, 64), Err(StreamError::Kind(KIND_ZSTD)));
        // Records outside the span, or data records past RECORD_MAX.
        let big = 4 * RECORD_MAX;
        let mut s = header_v2(&v2_header(big, FLAG_ZERO_BLOCKS, 10..big)).to_vec();
        s.extend_from_slice(&encode_record_v2(KIND_DATA, 0, 0, 10));
        assert!(matches!(decode_all(&s, 64), Err(StreamError::Order { .. })));
        let mut s = header_v2(&v2_header(big, FLAG_ZERO_BLOCKS, 0..big)).to_vec();
        s.extend_from_slice(&encode_record_v2(KIND_DATA, 0, 0, RECORD_MAX + 1));
        assert!(matches!(
            decode_all(&s, 64),
            Err(StreamError::OutOfBounds { .. })
        ));
        // A zstd frame claiming more than its record.
        let frame = zstd::bulk::compress(&[7u8; 5000], 3).unwrap();
        let mut s = header_v2(&v2_header(big, FLAG_ZERO_BLOCKS | FLAG_ZSTD, 0..big)).to_vec();
        s.extend_from_slice(&encode_record_v2(KIND_ZSTD, frame.len() as u32, 0, 4000));
        s.extend_from_slice(&frame);
        assert!(matches!(
            decode_all(&s, 64),
            Err(StreamError::Compressed { .. })
        ));
    }
}
