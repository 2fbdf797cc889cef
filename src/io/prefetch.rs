//! Read-ahead across requests, for `O_DIRECT` reads.
//!
//! The Coriolis client pulls a disk as consecutive ranges, one request
//! after the other over one connection. Buffered reads get the kernel's
//! read-ahead across those requests; `O_DIRECT` reads get none, so every
//! request would start by waiting for the disk while the connection sits
//! idle. So when a single-range read that itself continued where an
//! earlier one ended has planned its last read, the reads of the next range
//! of the same length (at most `read_ahead` buffers) are started and parked
//! here under the file's identity and their offset; the request that starts
//! exactly there adopts them as its first reads in flight.
//!
//! Bounds: parked reads take only idle buffers (never waiting for one), at
//! most [`Parking::new`]'s `max_buffers` in all (half the pool: streams
//! being answered always keep the other half), and wait at most
//! [`PARK_TTL`] for their request. A read that is never adopted costs one
//! disk read; its buffer returns to the pool when the read completes. The
//! first request of a sequence parks only a marker (no reads), so random
//! single-range requests never read anything they did not ask for.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::inflight::InFlight;

/// How long parked reads wait for the request that continues them.
pub const PARK_TTL: Duration = Duration::from_secs(5);
/// Most parked entries (markers included).
const MAX_ENTRIES: usize = 1024;

/// The identity of a file's contents: the inode, and its size and change
/// times, so a file changed in place (snapshot files never are) or an inode
/// number reused for another file never matches reads parked for the old
/// one. (A parked read holds its file open, so its inode cannot be freed
/// and reused while it is parked anyway.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    pub(super) fn of(m: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

struct Parked {
    key: FileKey,
    offset: u64,
    since: Instant,
    jobs: VecDeque<InFlight>,
}

struct State {
    entries: Vec<Parked>,
    /// Buffers parked or promised to a read about to park.
    reserved: usize,
    adopted: u64,
    parked: u64,
}

/// How often parked reads were used (for tests and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefetchStats {
    /// Reads parked for a following request.
    pub parked: u64,
    /// Parked reads a following request took over and used.
    pub adopted: u64,
    /// Buffers parked right now.
    pub buffers: usize,
    /// Shared pool buffers handed out right now (the engine fills it in).
    pub pool_in_use: usize,
    /// Overflow buffers alive right now (the engine fills it in).
    pub overflow_in_use: usize,
    /// Streams that waited because their owner's streams held
    /// `io.owner_buffers` (the engine fills it in).
    pub owner_waits: u64,
}

/// The parked reads of one engine.
pub(super) struct Parking {
    state: Mutex<State>,
    max_buffers: usize,
}

impl Parking {
    pub(super) fn new(max_buffers: usize) -> Parking {
        Parking {
            state: Mutex::new(State {
                entries: Vec::new(),
                reserved: 0,
                adopted: 0,
                parked: 0,
            }),
            max_buffers,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was parked for a read of `key` starting at `offset`: `None` if
    /// the read does not continue an earlier one, else the reads started
    /// for it (none when only a marker was parked).
    pub(super) fn take(&self, key: FileKey, offset: u64) -> Option<VecDeque<InFlight>> {
        let mut s = self.lock();
        sweep(&mut s, Instant::now());
        let i = s
            .entries
            .iter()
            .position(|p| p.key == key && p.offset == offset)?;
        let p = s.entries.swap_remove(i);
        s.reserved -= p.jobs.len();
        Some(p.jobs)
    }

    /// Counts reads a request kept of those it took.
    pub(super) fn note_adopted(&self, n: usize) {
        self.lock().adopted += n as u64;
    }

    /// Promises up to `want` buffers to a read about to park; the caller
    /// passes the promise to [`Parking::park`] whatever it got.
    pub(super) fn reserve(&self, want: usize) -> usize {
        let mut s = self.lock();
        sweep(&mut s, Instant::now());
        let n = want.min(self.max_buffers.saturating_sub(s.reserved));
        s.reserved += n;
        n
    }

    /// Parks `jobs` (possibly none: a marker that a sequence goes on at
    /// `offset`), settling a promise of `promised` buffers.
    pub(super) fn park(
        &self,
        key: FileKey,
        offset: u64,
        jobs: VecDeque<InFlight>,
        promised: usize,
    ) {
        let mut s = self.lock();
        s.reserved = s.reserved + jobs.len() - promised;
        s.parked += jobs.len() as u64;
        if let Some(i) = s
            .entries
            .iter()
            .position(|p| p.key == key && p.offset == offset)
        {
            let old = s.entries.swap_remove(i);
            s.reserved -= old.jobs.len();
        }
        if s.entries.len() >= MAX_ENTRIES {
            if let Some(i) = (0..s.entries.len()).min_by_key(|&i| s.entries[i].since) {
                let old = s.entries.swap_remove(i);
                s.reserved -= old.jobs.len();
            }
        }
        s.entries.push(Parked {
            key,
            offset,
            since: Instant::now(),
            jobs,
        });
    }

    pub(super) fn stats(&self) -> PrefetchStats {
        let s = self.lock();
        PrefetchStats {
            parked: s.parked,
            adopted: s.adopted,
            buffers: s.entries.iter().map(|p| p.jobs.len()).sum(),
            ..PrefetchStats::default()
        }
    }

    /// Drops every parked read (their buffers return to the pool as the
    /// reads complete).
    pub(super) fn clear(&self) {
        let mut s = self.lock();
        let jobs: usize = s.entries.iter().map(|p| p.jobs.len()).sum();
        s.reserved -= jobs;
        s.entries.clear();
    }
}

/// Drops entries older than [`PARK_TTL`].
fn sweep(s: &mut State, now: Instant) {
    let mut freed = 0;
    s.entries.retain(|p| {
        let keep = now.duration_since(p.since) < PARK_TTL;
        if !keep {
            freed += p.jobs.len();
        }
        keep
    });
    s.reserved -= freed;
}
