//! A read in flight: a planned batch submitted to the backend, waiting for
//! its buffer; and how reads started ahead (parked by [`super::prefetch`])
//! are fitted to the range that adopts them.

use std::collections::VecDeque;
use std::ops::Range;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::backend::BatchDone;
use super::planner::Plan;

pub(super) struct InFlight {
    pub(super) plan: Plan,
    pub(super) rx: oneshot::Receiver<BatchDone>,
    pub(super) direct: bool,
    /// The stream permit of a read started before its stream existed
    /// (parked by [`prefetch`]), tied to the buffer when the read completes.
    pub(super) permit: Option<OwnedSemaphorePermit>,
    /// Its permit of the owner's share, likewise (taken on adoption: a
    /// parked read belongs to no owner).
    pub(super) owner: Option<OwnedSemaphorePermit>,
}

/// Fits reads parked at `range.start` to `range`: drops the pieces (and
/// whole reads) past its end, cuts the one across it, and keeps reads only
/// while they cover the range contiguously from its start.
pub(super) fn fit(jobs: VecDeque<InFlight>, range: Range<u64>) -> VecDeque<InFlight> {
    let mut kept = VecDeque::new();
    let mut covered = range.start;
    for mut job in jobs {
        if covered >= range.end {
            break; // dropped: its buffer returns to the pool when read
        }
        let pieces = &mut job.plan.pieces;
        pieces.retain(|p| p.file_end - (p.len as u64) < range.end);
        for p in pieces.iter_mut() {
            if p.file_end > range.end {
                p.len -= (p.file_end - range.end) as usize;
                p.file_end = range.end;
            }
        }
        match pieces.last() {
            // Parked reads are planned from `range.start` on, contiguous.
            Some(last) if pieces[0].file_end - pieces[0].len as u64 == covered => {
                covered = last.file_end;
                kept.push_back(job);
            }
            _ => break,
        }
    }
    kept
}
