//! Sets of byte ranges: what a download has completed, and what is left.
//!
//! A [`RangeSet`] is a sorted list of disjoint, non-adjacent half-open
//! ranges, merged on insert, so that a download that completed its pieces in
//! any order records them in a few entries. Pure data structure; no I/O.

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, non-adjacent `[start, end)` byte ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl TryFrom<Vec<(u64, u64)>> for RangeSet {
    type Error = String;

    /// Reads a set back from a state file: it must already be in normal
    /// form, so a hand-edited or corrupted file is refused, not guessed at.
    fn try_from(ranges: Vec<(u64, u64)>) -> Result<Self, String> {
        let mut prev_end: Option<u64> = None;
        for &(s, e) in &ranges {
            if s >= e {
                return Err(format!("empty or reversed range {s}..{e}"));
            }
            if prev_end.is_some_and(|p| s <= p) {
                return Err(format!("range {s}..{e} is not sorted, disjoint and apart"));
            }
            prev_end = Some(e);
        }
        Ok(RangeSet { ranges })
    }
}

impl From<RangeSet> for Vec<(u64, u64)> {
    fn from(s: RangeSet) -> Self {
        s.ranges
    }
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Adds `[start, end)`, merging with overlapping or touching ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range that could touch: the first whose end >= start.
        let i = self.ranges.partition_point(|&(_, e)| e < start);
        // One past the last that could touch: the first whose start > end.
        let j = self.ranges.partition_point(|&(s, _)| s <= end);
        if i == j {
            self.ranges.insert(i, (start, end));
            return;
        }
        let s = start.min(self.ranges[i].0);
        let e = end.max(self.ranges[j - 1].1);
        self.ranges.splice(i..j, [(s, e)]);
    }

    /// Whether `[start, end)` is wholly inside the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges
            .get(i)
            .is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        for &(s, e) in &self.ranges[i..] {
            if s >= end {
                break;
            }
            if s > pos {
                out.push((pos, s));
            }
            pos = pos.max(e);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }

    /// Drops everything at or past `size` (a disk that shrank).
    pub fn clip(&mut self, size: u64) {
        self.ranges.retain(|&(s, _)| s < size);
        if let Some(last) = self.ranges.last_mut() {
            last.1 = last.1.min(size);
        }
    }
}

/// Cuts `[start, start + len)` into pieces of at most `piece` bytes whose
/// inner boundaries are multiples of `piece`, so that two runs over the
/// same chunks make the same pieces.
pub fn pieces(start: u64, len: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start.saturating_add(len);
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end || piece == 0 {
            return None;
        }
        let next = ((pos / piece) + 1).saturating_mul(piece).min(end);
        let p = (pos, next);
        pos = next;
        Some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set as a bitmap over a small universe, to check against.
    fn model(set: &RangeSet, n: u64) -> Vec<bool> {
        (0..n)
            .map(|x| set.ranges().iter().any(|&(s, e)| s <= x && x < e))
            .collect()
    }

    #[test]
    fn insert_merges_overlapping_and_touching() {
        let mut s = RangeSet::new();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.ranges(), &[(10, 20), (30, 40)]);
        s.insert(20, 30);
        assert_eq!(s.ranges(), &[(10, 40)]);
        s.insert(0, 5);
        s.insert(50, 60);
        s.insert(3, 55);
        assert_eq!(s.ranges(), &[(0, 60)]);
        s.insert(7, 7);
        assert_eq!(s.total(), 60);
    }

    #[test]
    fn random_inserts_agree_with_a_bitmap() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let mut s = RangeSet::new();
            let mut bits = vec![false; 200];
            for _ in 0..20 {
                let a = next() % 200;
                let b = a + next() % 20;
                let b = b.min(200);
                s.insert(a, b);
                for x in a..b {
                    bits[x as usize] = true;
                }
                assert_eq!(model(&s, 200), bits);
                // Normal form: sorted, apart.
                for w in s.ranges().windows(2) {
                    assert!(w[0].1 < w[1].0, "{:?}", s.ranges());
                }
                let (qa, qb) = (next() % 200, next() % 200);
                let (qa, qb) = (qa.min(qb), qa.max(qb));
                let missing = s.missing(qa, qb);
                let expect: Vec<u64> = (qa..qb).filter(|&x| !bits[x as usize]).collect();
                let got: Vec<u64> = missing.iter().flat_map(|&(a, b)| a..b).collect();
                assert_eq!(got, expect);
                assert_eq!(s.contains(qa, qb), expect.is_empty());
            }
        }
    }

    #[test]
    fn state_form_is_checked_on_read() {
        assert!(RangeSet::try_from(vec![(0, 10), (20, 30)]).is_ok());
        assert!(RangeSet::try_from(vec![(0, 10), (10, 30)]).is_err());
        assert!(RangeSet::try_from(vec![(20, 30), (0, 10)]).is_err());
        assert!(RangeSet::try_from(vec![(5, 5)]).is_err());
    }

    #[test]
    fn clip_cuts_at_the_size() {
        let mut s = RangeSet::try_from(vec![(0, 10), (20, 30), (40, 50)]).unwrap();
        s.clip(25);
        assert_eq!(s.ranges(), &[(0, 10), (20, 25)]);
    }

    #[test]
    fn pieces_are_aligned_and_cover_the_range() {
        let p: Vec<_> = pieces(5, 30, 10).collect();
        assert_eq!(p, vec![(5, 10), (10, 20), (20, 30), (30, 35)]);
        assert_eq!(pieces(0, 0, 10).count(), 0);
        assert_eq!(
            pieces(u64::MAX - 3, 10, 4).last(),
            Some((u64::MAX - 3, u64::MAX))
        );
    }
}
