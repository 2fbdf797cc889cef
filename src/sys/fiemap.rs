//! FIEMAP: the complete extent map of a file.
//!
//! The kernel fills a caller-sized buffer with at most `fm_extent_count`
//! extents per call, so a file with many extents takes many calls: each one
//! starts where the previous batch ended, until an extent carries
//! `FIEMAP_EXTENT_LAST` or a call maps nothing. The buffer layout is parsed
//! by [`parse`], a pure function over bytes (fuzzed, benchmarked).

use std::os::fd::AsFd;

use rustix::ioctl::{opcode, Opcode};
use zerocopy::IntoBytes;

use super::ioctl;
use crate::extent::{flags, Extent, ExtentMap, MapError};

/// `struct fiemap` header size (`include/uapi/linux/fiemap.h`).
pub const HEADER_LEN: usize = 32;
/// `struct fiemap_extent` size.
pub const EXTENT_LEN: usize = 56;
/// Offsets in `struct fiemap`.
const FM_START: usize = 0;
const FM_LENGTH: usize = 8;
const FM_FLAGS: usize = 16;
const FM_MAPPED_EXTENTS: usize = 20;
const FM_EXTENT_COUNT: usize = 24;
/// Offsets in `struct fiemap_extent`.
const FE_LOGICAL: usize = 0;
const FE_PHYSICAL: usize = 8;
const FE_LENGTH: usize = 16;
const FE_FLAGS: usize = 40;
/// `FIEMAP_FLAG_SYNC`: flush dirty data before mapping.
pub const FLAG_SYNC: u32 = 0x1;
/// `FIEMAP_MAX_OFFSET`.
const MAX_OFFSET: u64 = u64::MAX;
/// `FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap)`.
pub const FS_IOC_FIEMAP: Opcode = opcode::read_write::<[u8; HEADER_LEN]>(b'f', 11);
/// Extents asked for per call: 2048 × 56 bytes ≈ 112 KiB of buffer, so a
/// million-extent file takes ~500 calls.
pub const BATCH: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum FiemapError {
    #[error("FIEMAP buffer of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    ShortHeader { len: usize },
    #[error("FIEMAP says {mapped} extents were mapped but only {capacity} were asked for")]
    TooManyMapped { mapped: u32, capacity: u32 },
    #[error("FIEMAP buffer of {len} bytes cannot hold {mapped} extents")]
    ShortBuffer { len: usize, mapped: u32 },
    #[error("FIEMAP extent at {logical} with length {length} overflows the offset space")]
    Overflow { logical: u64, length: u64 },
    #[error("FIEMAP made no progress at offset {offset}")]
    NoProgress { offset: u64 },
    #[error("FIEMAP ioctl failed")]
    Ioctl(#[source] std::io::Error),
    #[error("FIEMAP returned an invalid extent map")]
    InvalidMap(#[source] MapError),
}

/// What one FIEMAP buffer said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Extents appended to the output by this batch.
    pub mapped: u32,
    /// One of them carried `FIEMAP_EXTENT_LAST`.
    pub last: bool,
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses a FIEMAP buffer (header and extents, native endian, as the kernel
/// left it) and appends its extents to `out`. Zero-length extents are
/// dropped. Never panics, whatever the bytes.
pub fn parse(buf: &[u8], out: &mut Vec<Extent>) -> Result<Batch, FiemapError> {
    if buf.len() < HEADER_LEN {
        return Err(FiemapError::ShortHeader { len: buf.len() });
    }
    let mapped = u32_at(buf, FM_MAPPED_EXTENTS);
    let capacity = u32_at(buf, FM_EXTENT_COUNT);
    if mapped > capacity {
        return Err(FiemapError::TooManyMapped { mapped, capacity });
    }
    let needed = (mapped as usize)
        .checked_mul(EXTENT_LEN)
        .and_then(|n| n.checked_add(HEADER_LEN));
    if needed.is_none_or(|n| n > buf.len()) {
        return Err(FiemapError::ShortBuffer {
            len: buf.len(),
            mapped,
        });
    }
    let mut batch = Batch {
        mapped,
        last: false,
    };
    out.reserve(mapped as usize);
    for raw in buf[HEADER_LEN..]
        .chunks_exact(EXTENT_LEN)
        .take(mapped as usize)
    {
        let e = Extent {
            logical: u64_at(raw, FE_LOGICAL),
            physical: u64_at(raw, FE_PHYSICAL),
            length: u64_at(raw, FE_LENGTH),
            flags: u32_at(raw, FE_FLAGS),
        };
        if e.logical.checked_add(e.length).is_none() {
            return Err(FiemapError::Overflow {
                logical: e.logical,
                length: e.length,
            });
        }
        batch.last |= e.flags & flags::LAST != 0;
        if e.length != 0 {
            out.push(e);
        }
    }
    Ok(batch)
}

/// Writes a request header for `capacity` extents from `start` on.
pub fn encode_request(buf: &mut [u8], start: u64, fm_flags: u32, capacity: u32) {
    buf[..HEADER_LEN].fill(0);
    buf[FM_START..FM_START + 8].copy_from_slice(&start.to_ne_bytes());
    buf[FM_LENGTH..FM_LENGTH + 8].copy_from_slice(&(MAX_OFFSET - start).to_ne_bytes());
    buf[FM_FLAGS..FM_FLAGS + 4].copy_from_slice(&fm_flags.to_ne_bytes());
    buf[FM_EXTENT_COUNT..FM_EXTENT_COUNT + 4].copy_from_slice(&capacity.to_ne_bytes());
}

/// The complete extent map of an open file, any number of extents.
///
/// `sync` asks the kernel to flush dirty data first (`FIEMAP_FLAG_SYNC`) so
/// that no extent is reported as delayed allocation.
pub fn extent_map(fd: impl AsFd, sync: bool) -> Result<ExtentMap, FiemapError> {
    extent_map_batched(fd, sync, BATCH)
}

/// [`extent_map`] with a chosen batch size (tests use tiny batches to
/// exercise the iteration).
pub fn extent_map_batched(
    fd: impl AsFd,
    sync: bool,
    batch: usize,
) -> Result<ExtentMap, FiemapError> {
    let batch = batch.clamp(1, u32::MAX as usize / EXTENT_LEN);
    let words = (HEADER_LEN + batch * EXTENT_LEN).div_ceil(8);
    let mut buf = vec![0u64; words];
    let mut extents: Vec<Extent> = Vec::new();
    let mut start = 0u64;
    let mut fm_flags = if sync { FLAG_SYNC } else { 0 };
    let mut scratch = Vec::with_capacity(batch);
    loop {
        {
            let bytes = buf.as_mut_bytes();
            encode_request(bytes, start, fm_flags, batch as u32);
        }
        // SAFETY: FS_IOC_FIEMAP reads the 32-byte header, writes its
        // `fm_flags` and `fm_mapped_extents` back and at most
        // `fm_extent_count` 56-byte extents after it, and touches no other
        // user memory (the header carries no pointer): `call::<true>`.
        // `buf` (`u64`s, so 8-byte aligned as `struct fiemap` requires)
        // holds the header and room for `batch` extents, and `batch` is the
        // `fm_extent_count` just encoded.
        #[allow(unsafe_code)]
        unsafe { ioctl::call::<true>(&fd, FS_IOC_FIEMAP, &mut buf) }
            .map_err(|e| FiemapError::Ioctl(e.into()))?;
        fm_flags &= !FLAG_SYNC;
        scratch.clear();
        let got = parse(buf.as_bytes(), &mut scratch)?;
        if got.mapped == 0 {
            break;
        }
        // A batch starting inside an extent may report it from its own start:
        // keep only what lies at or after `start` (it was covered before).
        for mut e in scratch.drain(..) {
            if e.end() <= start {
                continue;
            }
            if e.logical < start {
                let cut = start - e.logical;
                e.physical = e.physical.wrapping_add(cut);
                e.length -= cut;
                e.logical = start;
            }
            extents.push(e);
        }
        if got.last {
            break;
        }
        let next = extents.last().map_or(start, |e| e.end());
        if next <= start {
            return Err(FiemapError::NoProgress { offset: start });
        }
        start = next;
    }
    ExtentMap::new(extents).map_err(FiemapError::InvalidMap)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn buffer(mapped: u32, capacity: u32, extents: &[(u64, u64, u64, u32)]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + extents.len() * EXTENT_LEN];
        encode_request(&mut buf, 0, 0, capacity);
        buf[FM_MAPPED_EXTENTS..FM_MAPPED_EXTENTS + 4].copy_from_slice(&mapped.to_ne_bytes());
        for (i, &(l, p, n, f)) in extents.iter().enumerate() {
            let at = HEADER_LEN + i * EXTENT_LEN;
            buf[at..at + 8].copy_from_slice(&l.to_ne_bytes());
            buf[at + 8..at + 16].copy_from_slice(&p.to_ne_bytes());
            buf[at + 16..at + 24].copy_from_slice(&n.to_ne_bytes());
            buf[at + 40..at + 44].copy_from_slice(&f.to_ne_bytes());
        }
        buf
    }

    #[test]
    fn opcode_matches_the_c_macro() {
        // _IOWR('f', 11, struct fiemap) from <linux/fs.h>.
        assert_eq!(FS_IOC_FIEMAP as u64, 0xC020_660B);
    }

    #[test]
    fn parses_extents_and_last_flag() {
        let buf = buffer(2, 4, &[(0, 4096, 8192, 0), (8192, 0, 4096, flags::LAST)]);
        let mut out = Vec::new();
        let b = parse(&buf, &mut out).unwrap();
        assert_eq!(
            b,
            Batch {
                mapped: 2,
                last: true
            }
        );
        assert_eq!(out[1].logical, 8192);
        assert_eq!(out[0].physical, 4096);
    }

    #[test]
    fn rejects_lies_about_counts() {
        let mut out = Vec::new();
        assert!(matches!(
            parse(&buffer(5, 4, &[]), &mut out),
            Err(FiemapError::TooManyMapped { .. })
        ));
        assert!(matches!(
            parse(&buffer(3, 4, &[(0, 0, 1, 0)]), &mut out),
            Err(FiemapError::ShortBuffer { .. })
        ));
        assert!(matches!(
            parse(&[0u8; 8], &mut out),
            Err(FiemapError::ShortHeader { len: 8 })
        ));
        assert!(matches!(
            parse(&buffer(1, 1, &[(u64::MAX, 0, 2, 0)]), &mut out),
            Err(FiemapError::Overflow { .. })
        ));
    }
}
