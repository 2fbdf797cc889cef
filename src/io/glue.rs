//! Gluing small frames together before they go to hyper.
//!
//! A body made of many small parts (record headers, trailers, zero records,
//! short ranges) would otherwise reach the socket as one chunk, one TLS
//! record and one write per part: 100,000 small records would become
//! 300,000 writes. [`Glue`] copies parts of at most [`COALESCE_MAX`] bytes
//! into one frame and hands it out when it reaches [`COALESCE_TARGET`]
//! bytes; a larger part (a slice of a read buffer) passes through without
//! a copy, after the glued parts before it, so the order of the bytes is
//! kept.
//!
//! It is synchronous and knows no channel: the io core's producer
//! (`Result<Bytes, IoError>` frames) and the version 2 stream producer of
//! `api` (its own chunk type) both send what it gives back, in order.

use bytes::{Bytes, BytesMut};

/// Parts at most this long are copied into the glued frame instead of
/// being sent alone.
pub const COALESCE_MAX: usize = 16 << 10;
/// Size at which the glued frame is handed out.
pub const COALESCE_TARGET: usize = 256 << 10;

/// Glues small parts into frames of about [`COALESCE_TARGET`] bytes (a
/// copy of at most [`COALESCE_MAX`] bytes each); large parts pass through
/// untouched. Holds at most `COALESCE_TARGET + COALESCE_MAX` bytes.
#[derive(Debug, Default)]
pub struct Glue {
    acc: BytesMut,
}

/// The frames [`Glue::push`] made ready, in the order they are to be sent:
/// at most two (the glued parts, then a large part).
#[derive(Debug, Default)]
pub struct Ready {
    first: Option<Bytes>,
    second: Option<Bytes>,
}

impl Iterator for Ready {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.second.take())
    }
}

impl Glue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `b`, after every part pushed before it, and returns the frames
    /// to send now: the glued frame once it is full, or, for a part longer
    /// than [`COALESCE_MAX`], the glued parts before it and then `b` itself
    /// (not copied).
    pub fn push(&mut self, b: Bytes) -> Ready {
        if b.len() <= COALESCE_MAX {
            self.acc.extend_from_slice(&b);
            let first = if self.acc.len() >= COALESCE_TARGET {
                self.flush()
            } else {
                None
            };
            return Ready {
                first,
                second: None,
            };
        }
        Ready {
            first: self.flush(),
            second: Some(b),
        }
    }

    /// The glued parts not yet handed out, if any: to send before anything
    /// else (an error, the end of the body).
    pub fn flush(&mut self) -> Option<Bytes> {
        if self.acc.is_empty() {
            return None;
        }
        Some(self.acc.split().freeze())
    }

    /// Bytes glued and not yet handed out.
    pub fn pending(&self) -> usize {
        self.acc.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(len: usize, byte: u8) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    #[test]
    fn small_parts_are_glued_into_one_frame() {
        let mut g = Glue::new();
        assert_eq!(g.push(Bytes::from_static(b"head")).count(), 0);
        assert_eq!(g.push(Bytes::from_static(b"-zero-")).count(), 0);
        assert_eq!(g.push(Bytes::from_static(b"trailer")).count(), 0);
        assert_eq!(g.pending(), 17);
        assert_eq!(g.flush().unwrap(), Bytes::from_static(b"head-zero-trailer"));
        assert_eq!(g.pending(), 0);
        assert!(g.flush().is_none(), "nothing left after a flush");
    }

    #[test]
    fn a_large_part_passes_through_without_a_copy() {
        let mut g = Glue::new();
        let big = part(COALESCE_MAX + 1, 7);
        let frames: Vec<Bytes> = g.push(big.clone()).collect();
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0].as_ptr(),
            big.as_ptr(),
            "the same buffer, not a copy"
        );
        assert_eq!(frames[0].len(), big.len());
        assert_eq!(g.pending(), 0);
    }

    #[test]
    fn glued_parts_go_before_a_large_part() {
        let mut g = Glue::new();
        assert_eq!(g.push(Bytes::from_static(b"a")).count(), 0);
        assert_eq!(g.push(Bytes::from_static(b"b")).count(), 0);
        let big = part(COALESCE_MAX + 100, 9);
        let frames: Vec<Bytes> = g.push(big.clone()).collect();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], Bytes::from_static(b"ab"));
        assert_eq!(frames[1].as_ptr(), big.as_ptr());
        assert_eq!(g.pending(), 0);
        // And small parts after it start a new frame.
        assert_eq!(g.push(Bytes::from_static(b"c")).count(), 0);
        assert_eq!(g.flush().unwrap(), Bytes::from_static(b"c"));
    }

    #[test]
    fn the_order_of_every_byte_is_kept() {
        let mut g = Glue::new();
        let mut want = Vec::new();
        let mut got = Vec::new();
        for (i, len) in [3, COALESCE_MAX, 1, COALESCE_MAX + 1, 0, 5, 1 << 20, 2]
            .into_iter()
            .enumerate()
        {
            let p = part(len, i as u8);
            want.extend_from_slice(&p);
            for f in g.push(p) {
                got.extend_from_slice(&f);
            }
        }
        if let Some(f) = g.flush() {
            got.extend_from_slice(&f);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn limits() {
        let mut g = Glue::new();
        // Exactly COALESCE_MAX is still glued (copied).
        let at_max = part(COALESCE_MAX, 1);
        assert_eq!(g.push(at_max).count(), 0);
        assert_eq!(g.pending(), COALESCE_MAX);
        g.flush();

        // The glued frame goes once it reaches COALESCE_TARGET, not before.
        let parts = COALESCE_TARGET / COALESCE_MAX;
        for i in 0..parts - 1 {
            assert_eq!(g.push(part(COALESCE_MAX, i as u8)).count(), 0);
        }
        assert_eq!(g.pending(), COALESCE_TARGET - COALESCE_MAX);
        let frames: Vec<Bytes> = g.push(part(COALESCE_MAX, 0xff)).collect();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), COALESCE_TARGET);
        assert_eq!(g.pending(), 0);

        // A glued frame overshoots the target by less than one small part.
        for _ in 0..parts - 1 {
            assert_eq!(g.push(part(COALESCE_MAX, 2)).count(), 0);
        }
        assert_eq!(g.push(part(COALESCE_MAX - 1, 3)).count(), 0);
        let frames: Vec<Bytes> = g.push(part(COALESCE_MAX, 4)).collect();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), COALESCE_TARGET + COALESCE_MAX - 1);
        assert!(frames[0].len() < COALESCE_TARGET + COALESCE_MAX);
    }

    #[test]
    fn nothing_pushed_nothing_flushed() {
        let mut g = Glue::new();
        assert!(g.flush().is_none());
        assert_eq!(g.push(Bytes::new()).count(), 0);
        assert!(g.flush().is_none(), "an empty part adds no frame");
    }
}
