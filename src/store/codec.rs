//! Byte encodings of extent maps (keys: [`super::keys`]).
//!
//! Extent maps are the bulk of the database (a fragmented disk has millions
//! of extents, each snapshot of it one map), so they are stored in a compact
//! varint form instead of 28 fixed bytes per extent:
//!
//! ```text
//! u8      format (MAP_FORMAT)
//! varint  count of extents
//! varint  shift: every logical offset, physical address and length is a
//!         multiple of 2^shift (the filesystem block size, typically 12)
//! per extent, every value divided by 2^shift:
//!   varint  gap     logical - end of the previous extent
//!   varint  length
//!   varint  zigzag(physical - (previous physical + previous length))
//!   varint  flags XOR previous flags
//! ```
//!
//! Contiguous extents (physical follows the previous one) cost one byte for
//! the physical delta, an unchanged flag word one byte, so a typical extent
//! takes 5 to 8 bytes (see `benches/store.rs`). Decoding is a pure function
//! over bytes: every count is bounded by the input length before anything is
//! allocated, every addition checked, and the result validated as an
//! [`ExtentMap`]; it is fuzzed (`fuzz/fuzz_targets/extent_codec.rs`).

use crate::extent::{Extent, ExtentMap, MapError};

/// Version byte of the extent map encoding; bumped with the schema.
pub const MAP_FORMAT: u8 = 1;
/// The fewest bytes an encoded extent can take: four one-byte varints. Used
/// to bound the count read from the input before allocating.
const MIN_EXTENT_BYTES: usize = 4;
/// A u64 LEB128 varint is at most ten bytes (ceil(64 / 7)).
const MAX_VARINT_LEN: usize = 10;

/// Why bytes are not an encoded extent map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("the encoded map is empty")]
    Empty,
    #[error("unknown extent map format {0} (this build reads format {MAP_FORMAT})")]
    Format(u8),
    #[error("truncated varint at byte {at}")]
    Truncated { at: usize },
    #[error("varint at byte {at} overflows 64 bits")]
    VarintOverflow { at: usize },
    #[error("the map claims {count} extents but only {len} bytes follow")]
    CountTooLarge { count: u64, len: usize },
    #[error("shift {0} is out of range")]
    Shift(u64),
    #[error("extent {index} overflows the 64-bit offset space")]
    Overflow { index: usize },
    #[error("{0} trailing bytes after the last extent")]
    Trailing(usize),
    #[error("decoded extents are not a valid map")]
    Invalid(#[source] MapError),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, CodecError> {
    // Most values of a map (gaps, flag changes, contiguous deltas) fit in
    // one byte.
    if let Some(&b) = buf.get(*pos) {
        if b < 0x80 {
            *pos += 1;
            return Ok(u64::from(b));
        }
    }
    let start = *pos;
    let mut v = 0u64;
    for i in 0..MAX_VARINT_LEN {
        let Some(&b) = buf.get(*pos) else {
            return Err(CodecError::Truncated { at: start });
        };
        *pos += 1;
        let bits = u64::from(b & 0x7f);
        // The tenth byte may only carry the top bit of the u64.
        if i == MAX_VARINT_LEN - 1 && bits > 1 {
            return Err(CodecError::VarintOverflow { at: start });
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::VarintOverflow { at: start })
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The largest power of two dividing every offset, address and length.
fn common_shift(extents: &[Extent]) -> u32 {
    let all = extents
        .iter()
        .fold(0u64, |acc, e| acc | e.logical | e.physical | e.length);
    if all == 0 {
        0
    } else {
        all.trailing_zeros().min(63)
    }
}

/// Encodes a map (see the module doc for the layout).
pub fn encode_map(map: &ExtentMap) -> Vec<u8> {
    let extents = map.extents();
    let shift = common_shift(extents);
    let mut out = Vec::with_capacity(8 + extents.len() * 6);
    out.push(MAP_FORMAT);
    put_varint(&mut out, extents.len() as u64);
    put_varint(&mut out, u64::from(shift));
    let (mut prev_end, mut prev_phys_end, mut prev_flags) = (0u64, 0u64, 0u32);
    for e in extents {
        put_varint(&mut out, (e.logical - prev_end) >> shift);
        put_varint(&mut out, e.length >> shift);
        // Both are multiples of 2^shift, and so is their difference modulo
        // 2^64: the arithmetic shift is exact.
        let delta = e.physical.wrapping_sub(prev_phys_end) as i64;
        put_varint(&mut out, zigzag(delta >> shift));
        put_varint(&mut out, u64::from(e.flags ^ prev_flags));
        prev_end = e.end();
        prev_phys_end = e.physical.wrapping_add(e.length);
        prev_flags = e.flags;
    }
    out
}

/// Decodes a map written by [`encode_map`]. Never panics; allocates at most
/// in proportion to `buf.len()`.
pub fn decode_map(buf: &[u8]) -> Result<ExtentMap, CodecError> {
    let (&format, _) = buf.split_first().ok_or(CodecError::Empty)?;
    if format != MAP_FORMAT {
        return Err(CodecError::Format(format));
    }
    let mut pos = 1;
    let count = get_varint(buf, &mut pos)?;
    let shift = get_varint(buf, &mut pos)?;
    if shift > 63 {
        return Err(CodecError::Shift(shift));
    }
    let rest = buf.len() - pos;
    if count > (rest / MIN_EXTENT_BYTES) as u64 {
        return Err(CodecError::CountTooLarge { count, len: rest });
    }
    let scale = |v: u64, index: usize| -> Result<u64, CodecError> {
        v.checked_mul(1u64 << shift)
            .ok_or(CodecError::Overflow { index })
    };
    let mut extents = Vec::with_capacity(count as usize);
    let (mut prev_end, mut prev_phys_end, mut prev_flags) = (0u64, 0u64, 0u32);
    for index in 0..count as usize {
        let gap = scale(get_varint(buf, &mut pos)?, index)?;
        let length = scale(get_varint(buf, &mut pos)?, index)?;
        let delta = unzigzag(get_varint(buf, &mut pos)?);
        let flags_x = get_varint(buf, &mut pos)?;
        let logical = prev_end
            .checked_add(gap)
            .ok_or(CodecError::Overflow { index })?;
        let end = logical
            .checked_add(length)
            .ok_or(CodecError::Overflow { index })?;
        let physical = prev_phys_end.wrapping_add((delta.wrapping_shl(shift as u32)) as u64);
        let flags =
            prev_flags ^ u32::try_from(flags_x).map_err(|_| CodecError::Overflow { index })?;
        extents.push(Extent {
            logical,
            physical,
            length,
            flags,
        });
        prev_end = end;
        prev_phys_end = physical.wrapping_add(length);
        prev_flags = flags;
    }
    if pos != buf.len() {
        return Err(CodecError::Trailing(buf.len() - pos));
    }
    ExtentMap::new(extents).map_err(CodecError::Invalid)
}

/// Length in bytes of a snapshot id key (a UUID).
pub const ID_LEN: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::flags;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [0, 1, 127, 128, 16383, 16384, u64::MAX - 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
        let mut pos = 0;
        assert_eq!(
            get_varint(&[0xff; 10], &mut pos),
            Err(CodecError::VarintOverflow { at: 0 })
        );
        let mut pos = 0;
        assert_eq!(
            get_varint(&[0x80], &mut pos),
            Err(CodecError::Truncated { at: 0 })
        );
        for v in [0i64, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn maps_round_trip_including_backward_physical_jumps_and_odd_sizes() {
        let maps = [
            vec![],
            vec![ext(0, 1 << 40, 4096, flags::LAST)],
            vec![
                ext(0, 1 << 30, 65536, flags::SHARED),
                ext(65536, 1 << 20, 4096, 0),
                ext(1 << 33, u64::MAX - 8191, 8192, flags::UNWRITTEN),
                ext((1 << 33) + 8192, 0, 4096, flags::LAST),
            ],
            vec![ext(3, 7, 11, flags::NOT_ALIGNED), ext(20, 2, 1, 0)],
            vec![ext(u64::MAX - 4096, 4096, 4096, 0)],
        ];
        for m in maps {
            let m = ExtentMap::new(m).unwrap();
            let enc = encode_map(&m);
            assert_eq!(decode_map(&enc).unwrap(), m);
        }
    }

    #[test]
    fn typical_extents_are_small() {
        let mut v = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut pos = 0;
        for _ in 0..10_000 {
            let len = 4096 * rng.u64(1..64);
            v.push(ext(
                pos,
                (1 << 30) + 4096 * rng.u64(0..1 << 24),
                len,
                flags::SHARED,
            ));
            pos += len + 4096 * rng.u64(0..4);
        }
        let m = ExtentMap::new(v).unwrap();
        let enc = encode_map(&m);
        assert!(
            enc.len() < m.len() * 9,
            "{} bytes for {} extents",
            enc.len(),
            m.len()
        );
        assert_eq!(decode_map(&enc).unwrap(), m);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert_eq!(decode_map(&[]), Err(CodecError::Empty));
        assert_eq!(decode_map(&[9]), Err(CodecError::Format(9)));
        // A huge count with nothing behind it allocates nothing.
        let mut b = vec![MAP_FORMAT];
        put_varint(&mut b, u64::MAX);
        put_varint(&mut b, 0);
        assert!(matches!(
            decode_map(&b),
            Err(CodecError::CountTooLarge { .. })
        ));
        // Overlapping extents (gap can't be negative, but a zero length can).
        let b = [MAP_FORMAT, 1, 0, 0, 0, 0, 0];
        assert!(matches!(decode_map(&b), Err(CodecError::Invalid(_))));
        // Offsets overflowing.
        let mut b = vec![MAP_FORMAT, 2, 0];
        for v in [u64::MAX - 1, 1, 0, 0, 5, 1, 0, 0] {
            put_varint(&mut b, v);
        }
        assert!(matches!(decode_map(&b), Err(CodecError::Overflow { .. })));
        let m = ExtentMap::new(vec![ext(0, 0, 4096, 0)]).unwrap();
        let mut enc = encode_map(&m);
        enc.push(0);
        assert_eq!(decode_map(&enc), Err(CodecError::Trailing(1)));
        // Every truncation of a valid encoding is an error, not a panic.
        let enc = encode_map(&m);
        for n in 0..enc.len() {
            assert!(decode_map(&enc[..n]).is_err());
        }
    }
}
