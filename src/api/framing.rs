//! The wire formats of disk bodies as framings of the io core's reads: a
//! `multipart/byteranges` body ([`wire::range::Multipart`]) and the
//! incremental stream ([`wire::stream::Encoder`]). The io core fills
//! buffers and calls a [`Framing`] for the bytes around each range; this
//! module is where the two meet, so neither `io` nor `wire` knows the other.
//!
//! [`WireReads`] gives [`IoEngine`] the two reads by name.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::io::{DiskFile, Framing, IoEngine, IoError, ReadStream};
use crate::wire::range::Multipart;
use crate::wire::stream::{self, Change, ChangeKind, Encoder};

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
