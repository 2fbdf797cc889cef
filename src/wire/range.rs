//! HTTP `Range` requests (RFC 9110 §14) resolved against a disk size, and
//! the framing of `multipart/byteranges` bodies (RFC 9110 §14.6).
//!
//! [`parse`] is a pure function from the header value to the byte ranges to
//! send: sorted, with overlapping and adjacent ranges coalesced and their
//! number capped, so one request can never make the server read the same
//! bytes many times (CVE-2011-3192). Anything it cannot satisfy exactly is a
//! [`RangeError`], which the API answers with 416: a backup client that asked
//! for a range and got the whole disk with 200 would corrupt its replica, so
//! this module never degrades to "ignore the header".
//!
//! This module does no I/O and knows nothing of HTTP types: it works on bytes
//! and returns `Range<u64>` (half-open) values.

use std::fmt::Write as _;
use std::ops::Range;

/// Range unit this server supports (RFC 9110 §14.1; compared
/// case-insensitively, as RFC 9110 §14.1 says range units are).
const BYTES_UNIT: &str = "bytes";
/// Most range-specs accepted in one header before coalescing; bounds the work
/// of sorting. Headers are already size-limited by the HTTP layer.
pub const MAX_SPECS: usize = 1024;
/// Default cap on the number of ranges after coalescing (Apache httpd's
/// `MaxRanges` default is 200; a diff client asks for far fewer per request).
pub const DEFAULT_MAX_RANGES: usize = 64;
/// Longest decimal number accepted: u64::MAX has 20 digits.
const MAX_DIGITS: usize = 20;

/// Why a `Range` header cannot be served; every variant answers 416 with
/// `Content-Range: bytes */<size>` ([`unsatisfied_content_range`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range unit is not `bytes`")]
    Unit,
    #[error("malformed range set: {0}")]
    Syntax(&'static str),
    #[error("no range overlaps the {size}-byte representation")]
    Unsatisfiable { size: u64 },
    #[error("{count} ranges requested, at most {max} are served")]
    TooMany { count: usize, max: usize },
}

/// One range-spec as written in the header, before resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// `first-last`, `last` inclusive.
    Closed { first: u64, last: u64 },
    /// `first-`.
    From { first: u64 },
    /// `-length`: the last `length` bytes.
    Suffix { length: u64 },
}

impl Spec {
    /// The half-open byte range this spec selects of a `size`-byte
    /// representation, or `None` when it is unsatisfiable (RFC 9110
    /// §14.1.1: starts at or past the end, or a zero-length suffix).
    pub fn resolve(self, size: u64) -> Option<Range<u64>> {
        match self {
            Spec::Closed { first, last } if first < size => {
                Some(first..last.saturating_add(1).min(size))
            }
            Spec::From { first } if first < size => Some(first..size),
            Spec::Suffix { length } if length > 0 && size > 0 => {
                Some(size.saturating_sub(length)..size)
            }
            _ => None,
        }
    }
}

/// Parses a `Range` header value into range-specs (syntax only, RFC 9110
/// §14.1.1 `ranges-specifier`). Empty list elements are tolerated, as RFC
/// 9110 §5.6.1 asks of recipients; at least one spec is required.
pub fn parse_specs(value: &[u8]) -> Result<Vec<Spec>, RangeError> {
    let value = std::str::from_utf8(value).map_err(|_| RangeError::Syntax("not ASCII"))?;
    let value = value.trim_matches(is_ows);
    let (unit, set) = value.split_once('=').ok_or(RangeError::Syntax("no `=`"))?;
    if !unit.eq_ignore_ascii_case(BYTES_UNIT) {
        return Err(RangeError::Unit);
    }
    let mut specs = Vec::new();
    for elem in set.split(',') {
        let elem = elem.trim_matches(is_ows);
        if elem.is_empty() {
            continue;
        }
        if specs.len() == MAX_SPECS {
            return Err(RangeError::TooMany {
                count: specs.len() + 1,
                max: MAX_SPECS,
            });
        }
        let (first, last) = elem
            .split_once('-')
            .ok_or(RangeError::Syntax("range without `-`"))?;
        let spec = match (first.is_empty(), last.is_empty()) {
            (true, true) => return Err(RangeError::Syntax("empty range `-`")),
            (true, false) => Spec::Suffix {
                length: number(last)?,
            },
            (false, true) => Spec::From {
                first: number(first)?,
            },
            (false, false) => {
                let (first, last) = (number(first)?, number(last)?);
                if last < first {
                    return Err(RangeError::Syntax("last position before first"));
                }
                Spec::Closed { first, last }
            }
        };
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(RangeError::Syntax("no range"));
    }
    Ok(specs)
}

/// The ranges to send for a `Range` header value on a `size`-byte disk:
/// non-empty, sorted, pairwise disjoint and not adjacent, at most
/// `max_ranges` long. One element means a plain 206; more mean
/// `multipart/byteranges`. Unsatisfiable specs are dropped when others are
/// satisfiable (RFC 9110 §14.1.1); every part carries its `Content-Range`,
/// so the client sees exactly which bytes it got.
pub fn parse(value: &[u8], size: u64, max_ranges: usize) -> Result<Vec<Range<u64>>, RangeError> {
    let specs = parse_specs(value)?;
    let mut ranges: Vec<Range<u64>> = specs.iter().filter_map(|s| s.resolve(size)).collect();
    if ranges.is_empty() {
        return Err(RangeError::Unsatisfiable { size });
    }
    let ranges = coalesce(&mut ranges);
    if ranges.len() > max_ranges {
        return Err(RangeError::TooMany {
            count: ranges.len(),
            max: max_ranges,
        });
    }
    Ok(ranges)
}

/// Sorts and merges overlapping and adjacent non-empty ranges.
pub fn coalesce(ranges: &mut [Range<u64>]) -> Vec<Range<u64>> {
    ranges.sort_unstable_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r.clone()),
        }
    }
    out
}

/// `(start, length)` pairs as half-open ranges clipped to `size`, sorted
/// and merged (extent maps can run past the end of file to a block
/// boundary). How both sides read a snapshot disk's `chunks` and `zeroed`.
pub fn clipped(ranges: impl Iterator<Item = (u64, u64)>, size: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges
        .map(|(start, len)| start.min(size)..start.saturating_add(len).min(size))
        .filter(|r| r.start < r.end)
        .collect();
    coalesce(&mut v)
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn number(s: &str) -> Result<u64, RangeError> {
    if s.is_empty() || s.len() > MAX_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Syntax("position is not a decimal number"));
    }
    s.parse()
        .map_err(|_| RangeError::Syntax("position overflows"))
}

/// `Content-Range` of a satisfied part: `bytes first-last/size`.
pub fn content_range(range: &Range<u64>, size: u64) -> String {
    format!("bytes {}-{}/{}", range.start, range.end - 1, size)
}

/// `Content-Range` of a 416 answer: `bytes */size` (RFC 9110 §14.4).
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// Framing of a `multipart/byteranges` body. The body is, per range, a
/// [`Multipart::part_header`] followed by that range's bytes, then
/// [`Multipart::trailer`]; [`Multipart::body_len`] gives the
/// `Content-Length` in advance.
#[derive(Debug, Clone)]
pub struct Multipart {
    boundary: String,
    part_type: String,
}

/// Boundary length: 32 hex digits, well inside RFC 2046's 70-character limit
/// and never found in data by chance in practice.
const BOUNDARY_HEX_DIGITS: usize = 32;

impl Multipart {
    /// Framing with a fresh random boundary; `part_type` is each part's
    /// `Content-Type` (the one a single-range answer would carry).
    pub fn new(part_type: &str) -> Multipart {
        Multipart::with_boundary(random_boundary(), part_type)
    }

    /// Framing with a given boundary (tests, reproducible output).
    pub fn with_boundary(boundary: String, part_type: &str) -> Multipart {
        Multipart {
            boundary,
            part_type: part_type.to_owned(),
        }
    }

    pub fn boundary(&self) -> &str {
        &self.boundary
    }

    /// The response's `Content-Type`.
    pub fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }

    /// Delimiter and headers preceding the bytes of `range`. Every part
    /// starts with CRLF, so the body opens with an (empty) preamble line, as
    /// RFC 2046 §5.1.1 allows and common servers do.
    pub fn part_header(&self, range: &Range<u64>, size: u64) -> String {
        let mut s = String::with_capacity(128);
        let _ = write!(
            s,
            "\r\n--{}\r\nContent-Type: {}\r\nContent-Range: {}\r\n\r\n",
            self.boundary,
            self.part_type,
            content_range(range, size)
        );
        s
    }

    /// The closing delimiter after the last part.
    pub fn trailer(&self) -> String {
        format!("\r\n--{}--\r\n", self.boundary)
    }

    /// Exact body length for these ranges.
    pub fn body_len(&self, ranges: &[Range<u64>], size: u64) -> u64 {
        ranges
            .iter()
            .map(|r| self.part_header(r, size).len() as u64 + (r.end - r.start))
            .sum::<u64>()
            + self.trailer().len() as u64
    }
}

fn random_boundary() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    // Two independently keyed SipHashes: std seeds RandomState from the OS
    // RNG, which is all a boundary needs (unguessable is not required, only
    // absent from the data).
    let mut s = String::with_capacity(BOUNDARY_HEX_DIGITS);
    for _ in 0..BOUNDARY_HEX_DIGITS / 16 {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(s.as_ptr() as usize);
        let _ = write!(s, "{:016x}", h.finish());
    }
    s
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const SIZE: u64 = 10_000;

    fn p(v: &str) -> Result<Vec<Range<u64>>, RangeError> {
        parse(v.as_bytes(), SIZE, DEFAULT_MAX_RANGES)
    }

    /// RFC 9110 §14.1.2 examples, on a 10000-byte representation.
    #[test]
    fn rfc_9110_examples() {
        assert_eq!(p("bytes=0-499").unwrap(), vec![0..500]);
        assert_eq!(p("bytes=500-999").unwrap(), vec![500..1000]);
        assert_eq!(p("bytes=-500").unwrap(), vec![9500..10_000]);
        assert_eq!(p("bytes=9500-").unwrap(), vec![9500..10_000]);
        // "The first and last bytes only": two parts.
        assert_eq!(p("bytes=0-0,-1").unwrap(), vec![0..1, 9999..10_000]);
        // "Other valid (but not canonical) specifications of the second 500
        // bytes": both coalesce to one range.
        assert_eq!(p("bytes=500-600,601-999").unwrap(), vec![500..1000]);
        assert_eq!(p("bytes=500-700,601-999").unwrap(), vec![500..1000]);
    }

    #[test]
    fn last_past_end_is_clamped_and_suffix_longer_than_size_is_all() {
        assert_eq!(p("bytes=9000-20000").unwrap(), vec![9000..10_000]);
        assert_eq!(p("bytes=-20000").unwrap(), vec![0..10_000]);
        assert_eq!(
            p(&format!("bytes=0-{}", u64::MAX)).unwrap(),
            vec![0..10_000]
        );
    }

    #[test]
    fn unsatisfiable() {
        for v in [
            "bytes=10000-",
            "bytes=10000-10001",
            "bytes=-0",
            "bytes=20000-,-0",
        ] {
            assert_eq!(p(v), Err(RangeError::Unsatisfiable { size: SIZE }), "{v}");
        }
        assert_eq!(
            parse(b"bytes=0-", 0, 4),
            Err(RangeError::Unsatisfiable { size: 0 })
        );
        // One satisfiable spec is enough; the others are dropped.
        assert_eq!(p("bytes=20000-,5-9").unwrap(), vec![5..10]);
    }

    #[test]
    fn invalid_is_an_error_never_the_whole_file() {
        for v in [
            "",
            "bytes",
            "bytes=",
            "bytes=,",
            "bytes=-",
            "bytes=a-b",
            "bytes=5-4",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=0x10-",
            "bytes= 1 -2",
            "bytes=--1",
            "bytes=1",
            "bytes=99999999999999999999-",
            "bytes=000000000000000000001-",
        ] {
            assert!(
                matches!(p(v), Err(RangeError::Syntax(_))),
                "{v:?}: {:?}",
                p(v)
            );
        }
        assert_eq!(p("items=0-1"), Err(RangeError::Unit));
        assert_eq!(p("bytes 0-1"), Err(RangeError::Syntax("no `=`")));
        assert!(parse(b"bytes=\xff-1", SIZE, 4).is_err());
    }

    #[test]
    fn whitespace_case_and_empty_elements() {
        assert_eq!(p(" BYTES=0-1 , ,\t4-5,").unwrap(), vec![0..2, 4..6]);
    }

    #[test]
    fn overlapping_and_adjacent_are_coalesced_before_the_cap() {
        // 1000 copies of the same range: the CVE-2011-3192 shape.
        let many = vec!["0-9999"; 1000].join(",");
        assert_eq!(p(&format!("bytes={many}")).unwrap(), vec![0..SIZE]);
        let adjacent: Vec<String> = (0..100)
            .map(|i| format!("{}-{}", i * 10, i * 10 + 9))
            .collect();
        assert_eq!(
            p(&format!("bytes={}", adjacent.join(","))).unwrap(),
            vec![0..1000]
        );
        // Unsorted input comes back sorted.
        assert_eq!(
            p("bytes=50-59,0-9,20-29").unwrap(),
            vec![0..10, 20..30, 50..60]
        );
    }

    #[test]
    fn cap_on_distinct_ranges_and_on_specs() {
        let spread: Vec<String> = (0..5).map(|i| format!("{}-{}", i * 100, i * 100)).collect();
        let v = format!("bytes={}", spread.join(","));
        assert_eq!(parse(v.as_bytes(), SIZE, 5).unwrap().len(), 5);
        assert_eq!(
            parse(v.as_bytes(), SIZE, 4),
            Err(RangeError::TooMany { count: 5, max: 4 })
        );
        let flood = format!("bytes={}", vec!["0-0"; MAX_SPECS + 1].join(","));
        assert!(matches!(p(&flood), Err(RangeError::TooMany { .. })));
    }

    #[test]
    fn content_range_strings() {
        assert_eq!(content_range(&(0..500), 10_000), "bytes 0-499/10000");
        assert_eq!(unsatisfied_content_range(10_000), "bytes */10000");
    }

    #[test]
    fn multipart_framing_and_length() {
        let m = Multipart::with_boundary("B".into(), "application/octet-stream");
        assert_eq!(m.content_type(), "multipart/byteranges; boundary=B");
        let ranges = [0..2, 5..6];
        let body: String = ranges
            .iter()
            .map(|r| m.part_header(r, 8) + &"x".repeat((r.end - r.start) as usize))
            .collect::<String>()
            + &m.trailer();
        assert_eq!(
            body,
            "\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/8\r\n\r\nxx\
             \r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 5-5/8\r\n\r\nx\
             \r\n--B--\r\n"
        );
        assert_eq!(m.body_len(&ranges, 8), body.len() as u64);
    }

    #[test]
    fn boundaries_differ_and_are_token_chars() {
        let a = Multipart::new("x/y");
        let b = Multipart::new("x/y");
        assert_ne!(a.boundary(), b.boundary());
        assert_eq!(a.boundary().len(), BOUNDARY_HEX_DIGITS);
        assert!(a.boundary().bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn clipping_drops_and_cuts_past_the_end() {
        assert_eq!(
            clipped([(0, 10), (8, 4), (100, 5), (20, 0)].into_iter(), 50),
            vec![0..12]
        );
        assert_eq!(clipped([(40, 20)].into_iter(), 50), vec![40..50]);
    }
}
