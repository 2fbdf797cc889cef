//! The planner: ranges cut into batches of aligned segments that fill one
//! buffer each, small ranges packed together.

use std::ops::Range;

use super::backend::Segment;
use super::buffer::ALIGN;

/// Where the data of one range's piece sits in a planned batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) range: usize,
    /// Segment index in the batch that reads it.
    pub(super) segment: usize,
    pub(super) buf_offset: usize,
    pub(super) len: usize,
    /// File offset one past the piece: the segment must reach it.
    pub(super) file_end: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) segments: Vec<Segment>,
    pub(super) pieces: Vec<Piece>,
}

/// Cuts ranges into batches lazily (a multi-terabyte range is never planned
/// all at once). Every segment is [`ALIGN`]-aligned in the file and in the
/// buffer, so the same plan serves `O_DIRECT` and buffered reads; small
/// ranges share a buffer, large ones fill whole buffers.
pub(super) struct Planner {
    pub(super) ranges: Vec<Range<u64>>,
    pub(super) idx: usize,
    pub(super) pos: u64,
    pub(super) buf_len: usize,
}

/// Most segments in one batch; bounds per-batch bookkeeping.
pub(super) const MAX_SEGMENTS: usize = 256;

impl Planner {
    pub(super) fn new(ranges: Vec<Range<u64>>, buf_len: usize) -> Planner {
        let pos = ranges.first().map_or(0, |r| r.start);
        Planner {
            ranges,
            idx: 0,
            pos,
            buf_len,
        }
    }

    pub(super) fn next_plan(&mut self) -> Option<Plan> {
        let align = ALIGN as u64;
        let mut plan = Plan::default();
        let mut used = 0usize;
        while let Some(r) = self.ranges.get(self.idx) {
            let space = self.buf_len - used;
            if space < ALIGN || plan.segments.len() == MAX_SEGMENTS {
                break;
            }
            let start = self.pos;
            let aligned = start - start % align;
            let head = (start - aligned) as usize;
            let take = (r.end - start).min((space - head) as u64) as usize;
            let read_len = (head + take).div_ceil(ALIGN) * ALIGN;
            let seg = match plan.segments.last_mut() {
                // Contiguous in the file and the buffer: one longer read.
                Some(last)
                    if last.file_offset + last.len as u64 == aligned
                        && last.buf_offset + last.len == used =>
                {
                    last.len += read_len;
                    plan.segments.len() - 1
                }
                _ => {
                    plan.segments.push(Segment {
                        file_offset: aligned,
                        buf_offset: used,
                        len: read_len,
                    });
                    plan.segments.len() - 1
                }
            };
            plan.pieces.push(Piece {
                range: self.idx,
                segment: seg,
                buf_offset: used + head,
                len: take,
                file_end: start + take as u64,
            });
            used += read_len;
            self.pos = start + take as u64;
            if self.pos == r.end {
                self.idx += 1;
                if let Some(n) = self.ranges.get(self.idx) {
                    self.pos = n.start;
                }
            }
        }
        (!plan.pieces.is_empty()).then_some(plan)
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn check_plan(ranges: Vec<Range<u64>>, buf_len: usize) -> Vec<Plan> {
        let mut planner = Planner::new(ranges.clone(), buf_len);
        let mut plans = Vec::new();
        while let Some(p) = planner.next_plan() {
            plans.push(p);
        }
        // Pieces cover every range exactly, in order.
        let mut covered: Vec<Range<u64>> = Vec::new();
        for plan in &plans {
            let mut used = 0;
            for s in &plan.segments {
                assert_eq!(s.file_offset % ALIGN as u64, 0);
                assert_eq!(s.buf_offset % ALIGN, 0);
                assert_eq!(s.len % ALIGN, 0);
                assert!(s.buf_offset >= used, "segments overlap in the buffer");
                used = s.buf_offset + s.len;
            }
            assert!(used <= buf_len);
            for p in &plan.pieces {
                let s = plan.segments[p.segment];
                let start = p.file_end - p.len as u64;
                assert_eq!(
                    start - s.file_offset,
                    (p.buf_offset - s.buf_offset) as u64,
                    "piece offset inside its segment"
                );
                assert!(p.file_end <= s.file_offset + s.len as u64);
                match covered.last_mut() {
                    Some(c) if c.end == start && ranges[p.range].start != start => {
                        c.end = p.file_end
                    }
                    _ => covered.push(start..p.file_end),
                }
            }
        }
        assert_eq!(covered, ranges);
        plans
    }

    #[test]
    fn planner_large_range_fills_whole_buffers() {
        let plans = check_plan(vec![0..(10 << 20)], 1 << 20);
        assert_eq!(plans.len(), 10);
        assert!(plans
            .iter()
            .all(|p| p.segments.len() == 1 && p.segments[0].len == 1 << 20));
    }

    #[test]
    fn planner_unaligned_ranges() {
        check_plan(vec![1..2, 4095..4097, 5000..9000, 12_288..20_000], 8192);
        check_plan(vec![3..(3 << 20) + 17], 1 << 20);
        check_plan(vec![4096 * 7 + 5..4096 * 300 + 1], 4096);
    }

    #[test]
    fn planner_packs_small_ranges_into_one_buffer() {
        let ranges: Vec<_> = (0..100u64)
            .map(|i| i * 1_000_000..i * 1_000_000 + 4096)
            .collect();
        let plans = check_plan(ranges, 1 << 20);
        assert_eq!(plans.len(), 1, "100 4 KiB ranges fit one 1 MiB buffer");
        assert_eq!(plans[0].segments.len(), 100);
    }

    #[test]
    fn planner_random() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let mut pos = 0u64;
            let mut ranges = Vec::new();
            for _ in 0..rng.usize(1..20) {
                let start = pos + rng.u64(1..20_000);
                let end = start + rng.u64(1..50_000);
                ranges.push(start..end);
                pos = end;
            }
            check_plan(ranges, ALIGN * rng.usize(1..8));
        }
    }
}
