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
//! No I/O here.

use std::ops::Range;

use bytes::{Buf, Bytes};

/// First 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"COE-INCR";
/// Format version this module writes and reads.
pub const VERSION: u16 = 1;
/// Stream header length (version 1).
pub const HEADER_LEN: usize = 40;
/// Record header length.
pub const RECORD_LEN: usize = 32;
/// Trailer after a data record's bytes: CRC-32 of the data, 4 reserved bytes.
pub const TRAILER_LEN: usize = 8;
/// Record kinds (byte 0 of a record header).
pub const KIND_DATA: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_END: u8 = 3;
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
    #[error("stream version {0} is not supported (this reads version {VERSION})")]
    Version(u16),
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
    pub records: u64,
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
            header: StreamHeader { disk_size, records },
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
    Header,
    Record,
    Data { offset: u64, len: u64, pos: u64 },
    Trailer { offset: u64, len: u64 },
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
    fixed: [u8; HEADER_LEN],
    fill: usize,
    header: StreamHeader,
    records: u64,
    data_bytes: u64,
    prev_end: u64,
    hasher: crc32fast::Hasher,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            state: State::Header,
            fixed: [0; HEADER_LEN],
            fill: 0,
            header: StreamHeader {
                disk_size: 0,
                records: 0,
            },
            records: 0,
            data_bytes: 0,
            prev_end: 0,
            hasher: crc32fast::Hasher::new(),
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
                    if !self.gather(input, HEADER_LEN) {
                        return Ok(None);
                    }
                    return self.parse_header().map(Some);
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
        let n = (need - self.fill).min(input.len());
        self.fixed[self.fill..self.fill + n].copy_from_slice(&input[..n]);
        input.advance(n);
        self.fill += n;
        if self.fill == need {
            self.fill = 0;
            true
        } else {
            false
        }
    }

    fn parse_header(&mut self) -> Result<Event, StreamError> {
        let b = &self.fixed;
        if b[0..8] != MAGIC {
            return Err(StreamError::Magic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        if le_u32(&b[32..36]) != crc(&b[..32]) {
            return Err(StreamError::HeaderChecksum { what: "stream" });
        }
        if u16::from_le_bytes([b[10], b[11]]) as usize != HEADER_LEN
            || le_u32(&b[12..16]) != 0
            || le_u32(&b[36..40]) != 0
        {
            return Err(StreamError::Reserved {
                what: "stream header",
            });
        }
        self.header = StreamHeader {
            disk_size: le_u64(&b[16..24]),
            records: le_u64(&b[24..32]),
        };
        self.state = State::Record;
        Ok(Event::Header(self.header))
    }

    fn parse_record(&mut self) -> Result<Option<Event>, StreamError> {
        let r = &self.fixed[..RECORD_LEN];
        if le_u32(&r[24..28]) != crc(&r[..24]) {
            return Err(StreamError::HeaderChecksum { what: "record" });
        }
        if r[1..8].iter().any(|&b| b != 0) || le_u32(&r[28..32]) != 0 {
            return Err(StreamError::Reserved { what: "record" });
        }
        let (kind, a, b) = (r[0], le_u64(&r[8..16]), le_u64(&r[16..24]));
        match kind {
            KIND_DATA | KIND_ZERO => {
                if self.records == self.header.records {
                    return Err(StreamError::TooManyRecords {
                        declared: self.header.records,
                    });
                }
                check_record(a, b, self.header.disk_size, self.prev_end)?;
                self.records += 1;
                self.prev_end = a + b;
                if kind == KIND_ZERO {
                    return Ok(Some(Event::Zero { offset: a, len: b }));
                }
                self.data_bytes += b;
                self.state = State::Data {
                    offset: a,
                    len: b,
                    pos: 0,
                };
                Ok(Some(Event::DataStart { offset: a, len: b }))
            }
            KIND_END => {
                if a != self.records || b != self.data_bytes || a != self.header.records {
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
            State::Header => Err(StreamError::Truncated("the stream header")),
            State::Record => Err(StreamError::Truncated("a record header")),
            State::Data { .. } => Err(StreamError::Truncated("a data record")),
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
    for piece in bytes.chunks(chunk.max(1)) {
        let mut input = Bytes::copy_from_slice(piece);
        while let Some(ev) = d.decode(&mut input)? {
            match (events.last_mut(), ev) {
                (
                    Some(Event::Data { offset, bytes }),
                    Event::Data {
                        offset: o,
                        bytes: more,
                    },
                ) if *offset + bytes.len() as u64 == o => {
                    let mut v = bytes.to_vec();
                    v.extend_from_slice(&more);
                    *bytes = Bytes::from(v);
                }
                (_, ev) => events.push(ev),
            }
        }
    }
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
            assert_eq!(
                events[0],
                Event::Header(StreamHeader {
                    disk_size: 1000,
                    records: 4
                })
            );
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
}
