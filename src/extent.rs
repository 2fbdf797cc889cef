//! Extent maps and their algebra: squash, diff, clip.
//!
//! An extent map is what FIEMAP says about a file: which logical byte ranges
//! are allocated, at which physical address, with which flags. Two reflink
//! snapshots of one disk share physical blocks wherever the disk did not
//! change between them, so comparing their maps tells what changed without
//! reading a byte of data (SEMANTICS.md §2).
//!
//! This module owns the rules and nothing else: no I/O, no allocation beyond
//! the output vectors, every operation one linear pass. It is fuzzed
//! (`fuzz/fuzz_targets/diff.rs`) and benchmarked (`benches/extent.rs`).
//!
//! The rule that must never break: [`diff`]`(a, b)` covers, in `changed` or
//! `zeroed`, every byte whose content in `b` may differ from its content in
//! `a`. Over-reporting is allowed; a miss is silent corruption of a replica.

use serde::{Deserialize, Serialize};

/// FIEMAP extent flags, from `include/uapi/linux/fiemap.h`.
pub mod flags {
    /// Last extent in the file.
    pub const LAST: u32 = 0x0000_0001;
    /// Data location unknown.
    pub const UNKNOWN: u32 = 0x0000_0002;
    /// Location still pending (delayed allocation); sets `UNKNOWN` too.
    pub const DELALLOC: u32 = 0x0000_0004;
    /// Data cannot be read while the filesystem is unmounted (compressed).
    pub const ENCODED: u32 = 0x0000_0008;
    /// Data is encrypted by the filesystem; sets `ENCODED` too.
    pub const DATA_ENCRYPTED: u32 = 0x0000_0080;
    /// Extent offsets may not be block aligned.
    pub const NOT_ALIGNED: u32 = 0x0000_0100;
    /// Data mixed with metadata (inline); sets `NOT_ALIGNED` too.
    pub const DATA_INLINE: u32 = 0x0000_0200;
    /// Multiple files in one block (tail packing); sets `NOT_ALIGNED` too.
    pub const DATA_TAIL: u32 = 0x0000_0400;
    /// Space allocated but not written: reads as zeros.
    pub const UNWRITTEN: u32 = 0x0000_0800;
    /// File does not natively support extents; result merged for efficiency.
    pub const MERGED: u32 = 0x0000_1000;
    /// Space shared with other files (reflinks, snapshots).
    pub const SHARED: u32 = 0x0000_2000;

    /// Flags under which the physical address does not identify the bytes
    /// of this logical range alone, so equality of addresses proves nothing.
    pub const NOT_PLAIN: u32 = UNKNOWN
        | DELALLOC
        | ENCODED
        | DATA_ENCRYPTED
        | NOT_ALIGNED
        | DATA_INLINE
        | DATA_TAIL
        | UNWRITTEN;

    /// Flags that make an `UNWRITTEN` extent's "reads as zeros" uncertain.
    pub const UNCERTAIN: u32 = UNKNOWN | DELALLOC | ENCODED | DATA_ENCRYPTED | DATA_INLINE;
}

/// One mapped range of a file: `length` bytes at logical offset `logical`
/// live at byte address `physical` on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    /// One past the last logical byte (saturating: maps are validated so this
    /// never saturates in a valid [`ExtentMap`]).
    #[inline]
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    /// True when the physical address identifies this range's bytes.
    #[inline]
    pub fn is_plain(&self) -> bool {
        self.flags & flags::NOT_PLAIN == 0
    }

    /// True when the range certainly reads as zeros (allocated, unwritten).
    #[inline]
    pub fn reads_zero(&self) -> bool {
        self.flags & flags::UNWRITTEN != 0 && self.flags & flags::UNCERTAIN == 0
    }

    /// The physical address of logical offset `pos` inside this extent.
    #[inline]
    fn physical_at(&self, pos: u64) -> u64 {
        self.physical.wrapping_add(pos - self.logical)
    }
}

/// A plain byte range of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    pub start: u64,
    pub length: u64,
}

impl ByteRange {
    #[inline]
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.length)
    }
}

/// Why a list of extents is not a valid map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("extent {index} at offset {logical} has length 0")]
    EmptyExtent { index: usize, logical: u64 },
    #[error(
        "extent {index} at offset {logical} with length {length} overflows the 64-bit offset space"
    )]
    Overflow {
        index: usize,
        logical: u64,
        length: u64,
    },
    #[error("extent {index} at offset {logical} starts before the previous extent ends at {previous_end}")]
    Overlap {
        index: usize,
        logical: u64,
        previous_end: u64,
    },
}

/// A validated extent map: sorted by logical offset, no overlaps, no empty
/// extents, no offset overflow. Every algorithm here relies on that.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Extent>", into = "Vec<Extent>")]
pub struct ExtentMap {
    extents: Vec<Extent>,
}

impl ExtentMap {
    /// Validates `extents` as given (they must already be sorted).
    pub fn new(extents: Vec<Extent>) -> Result<Self, MapError> {
        let mut previous_end = 0u64;
        for (index, e) in extents.iter().enumerate() {
            if e.length == 0 {
                return Err(MapError::EmptyExtent {
                    index,
                    logical: e.logical,
                });
            }
            let Some(end) = e.logical.checked_add(e.length) else {
                return Err(MapError::Overflow {
                    index,
                    logical: e.logical,
                    length: e.length,
                });
            };
            if index > 0 && e.logical < previous_end {
                return Err(MapError::Overlap {
                    index,
                    logical: e.logical,
                    previous_end,
                });
            }
            previous_end = end;
        }
        Ok(Self { extents })
    }

    /// Sorts, drops empty extents, then validates.
    pub fn from_unsorted(mut extents: Vec<Extent>) -> Result<Self, MapError> {
        extents.retain(|e| e.length != 0);
        extents.sort_unstable_by_key(|e| e.logical);
        Self::new(extents)
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    pub fn into_extents(self) -> Vec<Extent> {
        self.extents
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Total mapped bytes.
    pub fn mapped_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }

    /// The map cut to `[0, size)`: FIEMAP reports whole blocks, so the last
    /// extent may reach past the end of the file.
    pub fn clip(&self, size: u64) -> ExtentMap {
        let mut out = Vec::with_capacity(self.extents.len());
        for e in &self.extents {
            if e.logical >= size {
                break;
            }
            let mut e = *e;
            e.length = e.length.min(size - e.logical);
            out.push(e);
        }
        ExtentMap { extents: out }
    }
}

impl TryFrom<Vec<Extent>> for ExtentMap {
    type Error = MapError;
    fn try_from(v: Vec<Extent>) -> Result<Self, MapError> {
        ExtentMap::new(v)
    }
}

impl From<ExtentMap> for Vec<Extent> {
    fn from(m: ExtentMap) -> Self {
        m.extents
    }
}

/// Merges extents that are contiguous in logical offset into one, keeping
/// the first one's physical address and the union of the flags. This is the
/// old service's `squashChunks`: it describes what to read, not where it is.
pub fn squash(extents: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len().min(1024));
    for e in extents {
        match out.last_mut() {
            Some(last) if last.end() == e.logical => {
                last.length += e.length;
                last.flags |= e.flags & !flags::LAST;
            }
            _ => out.push(*e),
        }
    }
    out
}

/// What a client must do to turn a replica of `a` into a replica of `b`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Ranges of `b` holding data that may differ from `a`: copy them. Each
    /// carries `b`'s physical address and flags for that range.
    pub changed: Vec<Extent>,
    /// Ranges that were data in `a` and read as zeros in `b` (hole or
    /// unwritten): zero them (or copy them: they read as zeros).
    pub zeroed: Vec<ByteRange>,
}

impl Diff {
    pub fn changed_bytes(&self) -> u64 {
        self.changed.iter().map(|e| e.length).sum()
    }

    pub fn zeroed_bytes(&self) -> u64 {
        self.zeroed.iter().map(|r| r.length).sum()
    }

    /// `changed` and `zeroed` merged in logical order, zeroed ranges as
    /// extents with physical address 0 and the `UNWRITTEN` flag: what an old
    /// client that only copies `chunks` needs to end with a correct replica.
    pub fn chunks_with_zeroed(&self) -> Vec<Extent> {
        let mut out = Vec::with_capacity(self.changed.len() + self.zeroed.len());
        let (mut i, mut j) = (0, 0);
        while i < self.changed.len() || j < self.zeroed.len() {
            let take_changed = match (self.changed.get(i), self.zeroed.get(j)) {
                (Some(c), Some(z)) => c.logical <= z.start,
                (Some(_), None) => true,
                _ => false,
            };
            if take_changed {
                out.push(self.changed[i]);
                i += 1;
            } else {
                let z = self.zeroed[j];
                out.push(Extent {
                    logical: z.start,
                    physical: 0,
                    length: z.length,
                    flags: flags::UNWRITTEN,
                });
                j += 1;
            }
        }
        out
    }
}

/// Cursor over a map yielding, for a position, the extent covering it or the
/// start of the next one.
struct Cursor<'a> {
    extents: &'a [Extent],
    index: usize,
}

impl<'a> Cursor<'a> {
    fn new(map: &'a ExtentMap) -> Self {
        Self {
            extents: &map.extents,
            index: 0,
        }
    }

    /// Advances past extents ending at or before `pos`; returns the extent
    /// covering `pos` (if any) and the next boundary after `pos`.
    #[inline]
    fn at(&mut self, pos: u64) -> (Option<&'a Extent>, u64) {
        while let Some(e) = self.extents.get(self.index) {
            if e.end() <= pos {
                self.index += 1;
            } else {
                break;
            }
        }
        match self.extents.get(self.index) {
            Some(e) if e.logical <= pos => (Some(e), e.end()),
            Some(e) => (None, e.logical),
            None => (None, u64::MAX),
        }
    }
}

/// Compares two snapshots of one disk by their extent maps (SEMANTICS.md §2).
///
/// One linear walk over both maps. At each position the covering extents of
/// `a` and `b` decide:
/// - `b` holds data: unchanged only where both extents are plain and map the
///   position to the same physical address; otherwise changed (only the
///   differing part of a partially overlapping extent is reported);
/// - `b` reads as zeros (hole or unwritten) and `a` held data: zeroed;
/// - both read as zeros: nothing.
///
/// The caller guarantees that `a`'s file still exists unchanged, so none of
/// its blocks can have been reused for other data.
pub fn diff(a: &ExtentMap, b: &ExtentMap) -> Diff {
    let mut out = Diff {
        changed: Vec::new(),
        zeroed: Vec::new(),
    };
    let mut ca = Cursor::new(a);
    let mut cb = Cursor::new(b);
    let mut pos = 0u64;
    loop {
        let (ea, next_a) = ca.at(pos);
        let (eb, next_b) = cb.at(pos);
        if ea.is_none() && eb.is_none() {
            // Both are in a gap: jump to the next extent of either map.
            let next = next_a.min(next_b);
            if next == u64::MAX {
                break;
            }
            pos = next;
            continue;
        }
        let end = next_a.min(next_b);
        let b_data = eb.filter(|e| !e.reads_zero());
        let a_data = ea.filter(|e| !e.reads_zero());
        match (a_data, b_data) {
            (_, Some(eb)) => {
                let same = match ea {
                    Some(ea) => {
                        ea.is_plain() && eb.is_plain() && ea.physical_at(pos) == eb.physical_at(pos)
                    }
                    None => false,
                };
                if !same {
                    push_changed(&mut out.changed, eb, pos, end);
                }
            }
            (Some(_), None) => push_range(&mut out.zeroed, pos, end),
            (None, None) => {}
        }
        if end == u64::MAX {
            break;
        }
        pos = end;
    }
    out
}

fn push_changed(out: &mut Vec<Extent>, e: &Extent, start: u64, end: u64) {
    let physical = e.physical_at(start);
    let flags = e.flags & !flags::LAST;
    if let Some(last) = out.last_mut() {
        if last.end() == start
            && last.flags == flags
            && last.physical.wrapping_add(last.length) == physical
        {
            last.length += end - start;
            return;
        }
    }
    out.push(Extent {
        logical: start,
        physical,
        length: end - start,
        flags,
    });
}

/// The granularity of refinement by content: one 4 KiB block.
pub const REFINE_BLOCK: u64 = 4096;

/// Refinement by content of one candidate range (SEMANTICS.md §2, #19).
///
/// `old` and `new` hold the bytes of `[base, base + len)` of the older and
/// the newer snapshot (same length, `base` a multiple of
/// [`REFINE_BLOCK`]) and `candidate` lies inside that window. For each
/// 4 KiB block of the window that `candidate` touches, the bytes of
/// `candidate`'s part of it are compared: byte-identical parts are dropped,
/// parts that differ and read all zeros in `new` are appended to `out.zeroed`,
/// the others to `out.changed` (with the candidate's physical address and
/// flags). A byte is dropped only when it is equal in both snapshots, so the
/// refined diff still covers every changed byte. Output stays in logical
/// order when candidates are refined in logical order.
pub fn refine(candidate: &Extent, base: u64, old: &[u8], new: &[u8], out: &mut Diff) {
    assert_eq!(old.len(), new.len(), "refine: windows of different lengths");
    assert!(
        candidate.logical >= base && candidate.end() <= base + new.len() as u64,
        "refine: candidate {candidate:?} outside the window at {base} of {} bytes",
        new.len()
    );
    let mut pos = candidate.logical;
    while pos < candidate.end() {
        let block_end = (pos / REFINE_BLOCK + 1) * REFINE_BLOCK;
        let end = block_end.min(candidate.end());
        let (i, j) = ((pos - base) as usize, (end - base) as usize);
        let (o, n) = (&old[i..j], &new[i..j]);
        if o != n {
            if n.iter().all(|&x| x == 0) {
                push_range(&mut out.zeroed, pos, end);
            } else {
                push_changed(&mut out.changed, candidate, pos, end);
            }
        }
        pos = end;
    }
}

/// `a` and `b` merged in logical order, touching ranges joined (both are
/// sorted and disjoint from each other).
pub fn merge_ranges(a: &[ByteRange], b: &[ByteRange]) -> Vec<ByteRange> {
    let mut all: Vec<ByteRange> = a.iter().chain(b).copied().collect();
    all.sort_unstable_by_key(|r| r.start);
    let mut out = Vec::with_capacity(all.len());
    for r in all {
        push_range(&mut out, r.start, r.end());
    }
    out
}

/// `a` and `b` (sorted, disjoint) merged in logical order, contiguous
/// pieces of one extent joined again.
pub fn merge_extents(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut all: Vec<Extent> = a.iter().chain(b).copied().collect();
    all.sort_unstable_by_key(|e| e.logical);
    let mut out = Vec::with_capacity(all.len());
    for e in all {
        push_changed(&mut out, &e, e.logical, e.end());
    }
    out
}

/// `changed` without the parts in `remove` (both sorted; every extent of
/// `remove` lies inside one of `changed`).
pub fn subtract(changed: &[Extent], remove: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(changed.len());
    let mut j = 0;
    for c in changed {
        let mut pos = c.logical;
        while j < remove.len() && remove[j].logical < c.end() {
            let r = remove[j];
            if r.logical > pos {
                push_changed(&mut out, c, pos, r.logical);
            }
            pos = pos.max(r.end());
            j += 1;
        }
        if pos < c.end() {
            push_changed(&mut out, c, pos, c.end());
        }
    }
    out
}

fn push_range(out: &mut Vec<ByteRange>, start: u64, end: u64) {
    if let Some(last) = out.last_mut() {
        if last.end() == start {
            last.length += end - start;
            return;
        }
    }
    out.push(ByteRange {
        start,
        length: end - start,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    fn map(v: Vec<Extent>) -> ExtentMap {
        ExtentMap::new(v).unwrap()
    }

    #[test]
    fn validation_rejects_bad_maps() {
        assert_eq!(
            ExtentMap::new(vec![ext(0, 0, 0)]),
            Err(MapError::EmptyExtent {
                index: 0,
                logical: 0
            })
        );
        assert!(matches!(
            ExtentMap::new(vec![ext(0, 0, 10), ext(5, 0, 10)]),
            Err(MapError::Overlap { index: 1, .. })
        ));
        assert!(matches!(
            ExtentMap::new(vec![ext(u64::MAX - 1, 0, 10)]),
            Err(MapError::Overflow { .. })
        ));
        assert!(ExtentMap::from_unsorted(vec![ext(10, 0, 5), ext(0, 0, 10)]).is_ok());
    }

    #[test]
    fn identical_maps_have_no_diff() {
        let a = map(vec![ext(0, 1000, 100), ext(200, 5000, 50)]);
        assert_eq!(diff(&a, &a), Diff::default());
    }

    #[test]
    fn small_write_into_big_shared_extent_is_split() {
        let a = map(vec![ext(0, 1 << 20, 1 << 30)]);
        let b = map(vec![
            ext(0, 1 << 20, 8192),
            ext(8192, 9 << 40, 4096),
            ext(12288, (1 << 20) + 12288, (1 << 30) - 12288),
        ]);
        let d = diff(&a, &b);
        assert_eq!(d.changed, vec![ext(8192, 9 << 40, 4096)]);
        assert!(d.zeroed.is_empty());
    }

    #[test]
    fn punched_hole_is_zeroed_and_new_data_changed() {
        let a = map(vec![ext(0, 100, 300)]);
        let b = map(vec![ext(0, 100, 100), ext(400, 7000, 100)]);
        let d = diff(&a, &b);
        assert_eq!(d.changed, vec![ext(400, 7000, 100)]);
        assert_eq!(
            d.zeroed,
            vec![ByteRange {
                start: 100,
                length: 200
            }]
        );
        let merged = d.chunks_with_zeroed();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].logical, 100);
        assert_eq!(merged[1].logical, 400);
    }

    #[test]
    fn same_physical_at_a_different_offset_is_changed() {
        // Same physical start but shifted logical: content moved.
        let a = map(vec![ext(0, 1000, 100)]);
        let b = map(vec![ext(50, 1000, 100)]);
        let d = diff(&a, &b);
        assert_eq!(d.changed, vec![ext(50, 1000, 100)]);
        assert_eq!(
            d.zeroed,
            vec![ByteRange {
                start: 0,
                length: 50
            }]
        );
    }

    #[test]
    fn encoded_extents_are_always_changed() {
        let mut e = ext(0, 1000, 100);
        e.flags = flags::ENCODED;
        let a = map(vec![e]);
        let d = diff(&a, &a);
        assert_eq!(d.changed_bytes(), 100);
    }

    #[test]
    fn unwritten_over_hole_is_nothing_and_over_data_is_zeroed() {
        let mut u = ext(0, 1000, 100);
        u.flags = flags::UNWRITTEN;
        let empty = map(vec![]);
        assert_eq!(diff(&empty, &map(vec![u])), Diff::default());
        let d = diff(&map(vec![ext(0, 50, 100)]), &map(vec![u]));
        assert!(d.changed.is_empty());
        assert_eq!(d.zeroed_bytes(), 100);
        // Unwritten with delalloc is not certain to read as zeros.
        u.flags |= flags::DELALLOC;
        assert_eq!(diff(&empty, &map(vec![u])).changed_bytes(), 100);
    }

    #[test]
    fn new_disk_is_reported_whole() {
        let b = map(vec![ext(0, 10, 10), ext(30, 40, 10)]);
        let d = diff(&ExtentMap::default(), &b);
        assert_eq!(d.changed, b.extents().to_vec());
    }

    #[test]
    fn squash_merges_logically_contiguous() {
        let v = vec![ext(0, 100, 10), ext(10, 500, 10), ext(30, 0, 5)];
        assert_eq!(squash(&v), vec![ext(0, 100, 20), ext(30, 0, 5)]);
    }

    #[test]
    fn clip_cuts_at_size() {
        let m = map(vec![ext(0, 0, 4096), ext(8192, 0, 4096)]);
        assert_eq!(m.clip(5000).extents(), &[ext(0, 0, 4096)]);
        assert_eq!(m.clip(9000).extents()[1].length, 808);
    }

    /// Byte classes of a reference model: what a byte of a file is.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Class {
        Zero,
        /// Data at a physical address, plain or not.
        Data(u64, bool),
    }

    fn model(m: &ExtentMap, len: u64) -> Vec<Class> {
        let mut v = vec![Class::Zero; len as usize];
        for e in m.extents() {
            for p in e.logical..e.end().min(len) {
                v[p as usize] = if e.reads_zero() {
                    Class::Zero
                } else {
                    Class::Data(e.physical_at(p), e.is_plain())
                };
            }
        }
        v
    }

    fn random_map(rng: &mut fastrand::Rng, len: u64) -> ExtentMap {
        let mut v = Vec::new();
        let mut pos = rng.u64(0..8);
        while pos < len {
            let l = rng.u64(1..24).min(len - pos);
            let flags = match rng.u8(0..10) {
                0 => flags::UNWRITTEN,
                1 => flags::ENCODED,
                2 => flags::UNWRITTEN | flags::DELALLOC,
                _ => 0,
            };
            // Small physical space so that equal addresses happen often.
            v.push(Extent {
                logical: pos,
                physical: rng.u64(0..64),
                length: l,
                flags,
            });
            pos += l + rng.u64(0..6);
        }
        ExtentMap::new(v).unwrap()
    }

    /// Exhaustive check against a per-byte model on many random small maps:
    /// the diff is exactly the set of bytes the rule says, nothing missed,
    /// nothing extra, output sorted and disjoint.
    #[test]
    fn diff_matches_per_byte_model() {
        let mut rng = fastrand::Rng::with_seed(7);
        const LEN: u64 = 200;
        for _ in 0..3000 {
            let a = random_map(&mut rng, LEN);
            let b = random_map(&mut rng, LEN);
            let d = diff(&a, &b);
            let (ma, mb) = (model(&a, LEN + 32), model(&b, LEN + 32));
            let mut changed = vec![false; (LEN + 32) as usize];
            let mut zeroed = vec![false; (LEN + 32) as usize];
            let mut last_end = 0;
            for e in &d.changed {
                assert!(e.logical >= last_end, "changed not sorted/disjoint");
                last_end = e.end();
                for p in e.logical..e.end() {
                    changed[p as usize] = true;
                    // The physical address reported is b's.
                    assert_eq!(mb[p as usize], Class::Data(e.physical_at(p), e.is_plain()));
                }
            }
            last_end = 0;
            for r in &d.zeroed {
                assert!(r.start >= last_end, "zeroed not sorted/disjoint");
                last_end = r.end();
                for p in r.start..r.end() {
                    zeroed[p as usize] = true;
                }
            }
            for p in 0..(LEN + 32) as usize {
                let want_changed = match (ma[p], mb[p]) {
                    (Class::Data(pa, true), Class::Data(pb, true)) => pa != pb,
                    (_, Class::Data(..)) => true,
                    _ => false,
                };
                let want_zeroed = matches!((ma[p], mb[p]), (Class::Data(..), Class::Zero));
                assert_eq!(changed[p], want_changed, "byte {p}: a={a:?} b={b:?}");
                assert_eq!(zeroed[p], want_zeroed, "byte {p}: a={a:?} b={b:?}");
            }
        }
    }

    /// A per-byte model of refinement: for random windows, every 4 KiB part
    /// of the candidate whose bytes differ is reported (changed, or zeroed
    /// when the new bytes are all zero), nothing identical is, and the pieces
    /// keep the candidate's address.
    #[test]
    fn refine_keeps_exactly_the_differing_blocks() {
        let mut rng = fastrand::Rng::with_seed(19);
        for _ in 0..500 {
            let blocks = rng.usize(1..12);
            let len = blocks * REFINE_BLOCK as usize;
            let base = REFINE_BLOCK * rng.u64(0..100);
            let old: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let mut new = old.clone();
            for _ in 0..rng.usize(0..6) {
                let at = rng.usize(0..len);
                let n = rng.usize(1..=(len - at).min(9000));
                let zero = rng.bool();
                for b in &mut new[at..at + n] {
                    *b = if zero { 0 } else { rng.u8(..) };
                }
            }
            let start = base + rng.u64(0..len as u64);
            let cand = Extent {
                logical: start,
                physical: 1 << 30,
                length: rng.u64(1..=base + len as u64 - start),
                flags: flags::SHARED,
            };
            let mut out = Diff::default();
            refine(&cand, base, &old, &new, &mut out);
            let mut covered = vec![0u8; len]; // 1 changed, 2 zeroed
            for c in &out.changed {
                assert_eq!(c.physical, cand.physical + (c.logical - cand.logical));
                assert_eq!(c.flags, flags::SHARED);
                for p in c.logical..c.end() {
                    covered[(p - base) as usize] = 1;
                }
            }
            for z in &out.zeroed {
                for p in z.start..z.end() {
                    covered[(p - base) as usize] = 2;
                }
            }
            for p in cand.logical..cand.end() {
                let i = (p - base) as usize;
                let blk = (p - base) / REFINE_BLOCK;
                let (lo, hi) = (
                    (base + blk * REFINE_BLOCK).max(cand.logical),
                    (base + (blk + 1) * REFINE_BLOCK).min(cand.end()),
                );
                let r = (lo - base) as usize..(hi - base) as usize;
                let want = if old[r.clone()] == new[r.clone()] {
                    0
                } else if new[r].iter().all(|&b| b == 0) {
                    2
                } else {
                    1
                };
                assert_eq!(covered[i], want, "byte {p} of {cand:?}");
            }
            for (i, &c) in covered.iter().enumerate() {
                let p = base + i as u64;
                if p < cand.logical || p >= cand.end() {
                    assert_eq!(c, 0, "byte {p} outside the candidate reported");
                }
            }
        }
    }

    #[test]
    fn subtract_and_merge_split_and_join_changed() {
        let changed = vec![ext(4096, 9000, 24576)]; // [4K, 28K)
        let parts = vec![ext(4096, 9000, 4096), ext(20480, 9000 + 16384, 8192)];
        let rest = subtract(&changed, &parts);
        assert_eq!(rest, vec![ext(8192, 9000 + 4096, 12288)]);
        assert_eq!(merge_extents(&rest, &parts), changed);
        let r = |start, length| ByteRange { start, length };
        assert_eq!(
            merge_ranges(&[r(0, 10), r(30, 5)], &[r(10, 5), r(20, 5)]),
            vec![r(0, 15), r(20, 5), r(30, 5)]
        );
    }
}
