//! Exact deltas: refinement by content of a diff (#19, SEMANTICS.md §2).
//!
//! A diff by extent maps never misses a change but may report more than
//! changed: on OCFS2 a write into a shared extent copies a whole run of
//! clusters, so unchanged bytes around it move physically and look changed.
//! This service has both versions of every block on local disk, so it can
//! do better than its tracking granularity: for each changed range inside
//! both files (an overwrite of the older snapshot's data, or a new
//! allocation over its holes, which read zeros), both versions are read and
//! only the 4 KiB blocks whose bytes differ are kept
//! ([`crate::extent::refine`]); all-zero new blocks become zeroed ranges.
//! Past the older snapshot's end nothing is read: that is new data. Bytes are compared, never hashes: a block is
//! dropped only when it is byte-identical in both snapshots.
//!
//! Reads are `O_DIRECT` where the filesystem allows it (falling back to
//! buffered reads where it does not), in windows of [`WINDOW`] bytes into two
//! aligned buffers: memory is bounded per diff whatever the disk size. The
//! work runs on the caller's thread (the API calls the manager on the
//! blocking pool), with one scoped helper thread reading the newer side of
//! each window while the caller reads the older side (the two reads wait on
//! the disk at once), and checks its [`Cancel`] between windows, so a diff
//! whose client went away stops within one window.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use serde::Deserialize;

use super::cancel::Cancel;
use crate::extent::{self, Diff, REFINE_BLOCK};
use crate::io::buffer::AlignedBuf;

/// Bytes read per snapshot per step: two such buffers per refining diff.
pub const WINDOW: usize = 1 << 20;

/// Diffs refined at once in the whole process. Each holds two [`WINDOW`]
/// buffers, a blocking-pool thread and a helper thread reading the disk
/// (one side each), so a client
/// sending many `exact=true` requests in parallel waits for a slot instead
/// of making the process hold `2 * WINDOW` per request: refinement memory
/// is at most `MAX_REFINING * 2 * WINDOW` (8 MiB), and the disk is not
/// flooded by one client's reads.
pub const MAX_REFINING: usize = 4;

static SLOTS: Slots = Slots::new(MAX_REFINING);

/// What refinement did in this process, for `/metrics`.
static STATS: Counters = Counters {
    diffs: AtomicU64::new(0),
    cancelled: AtomicU64::new(0),
    candidate_bytes: AtomicU64::new(0),
    bytes_saved: AtomicU64::new(0),
    nanos: AtomicU64::new(0),
};

struct Counters {
    diffs: AtomicU64,
    cancelled: AtomicU64,
    candidate_bytes: AtomicU64,
    bytes_saved: AtomicU64,
    nanos: AtomicU64,
}

/// The refinement counters of this process since it started (the
/// `coe_exact_*` metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExactStats {
    /// Diffs refined by content (each disk of a snapshot diff counts once).
    pub diffs: u64,
    /// Refinements stopped because their client went away (not in `diffs`).
    pub cancelled: u64,
    /// Diffs being refined now (slots taken, at most [`MAX_REFINING`]).
    pub refining: u64,
    /// Bytes of candidate ranges compared; each was read from both
    /// snapshots (the older side only up to its end).
    pub candidate_bytes: u64,
    /// Data bytes the diffs reported changed before refinement less those
    /// after: bytes the answers no longer ask a client to copy (ranges
    /// found all-zero became zeroed ranges, which carry no data).
    pub bytes_saved: u64,
    /// Time spent refining: reads and compares, waits for a slot excluded.
    pub seconds: f64,
}

/// The counters now.
pub fn stats() -> ExactStats {
    ExactStats {
        diffs: STATS.diffs.load(Ordering::Relaxed),
        cancelled: STATS.cancelled.load(Ordering::Relaxed),
        refining: MAX_REFINING.saturating_sub(*SLOTS.free.lock().unwrap_or_else(|e| e.into_inner()))
            as u64,
        candidate_bytes: STATS.candidate_bytes.load(Ordering::Relaxed),
        bytes_saved: STATS.bytes_saved.load(Ordering::Relaxed),
        seconds: STATS.nanos.load(Ordering::Relaxed) as f64 / 1e9,
    }
}

/// A counting semaphore for blocking threads whose waiters give up when
/// their [`Cancel`] is set (checked every 100 ms).
struct Slots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// One taken slot; dropping it frees it.
struct Slot<'a>(&'a Slots);

impl Slots {
    const fn new(n: usize) -> Slots {
        Slots {
            free: std::sync::Mutex::new(n),
            freed: std::sync::Condvar::new(),
        }
    }

    fn take(&self, cancel: &Cancel) -> Result<Slot<'_>, RefineError> {
        // A poisoned lock only means a holder panicked; the count is intact.
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if cancel.is_cancelled() {
                return Err(RefineError::Cancelled);
            }
            if *free > 0 {
                *free -= 1;
                return Ok(Slot(self));
            }
            free = self
                .freed
                .wait_timeout(free, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// When a diff is refined by content: the `[diff] exact` config key, the
/// default of requests without `exact=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExactMode {
    /// Never: the diff by extent maps as it is.
    Off,
    /// Always.
    On,
    /// Where the extent maps over-report: disks on OCFS2, which copies a
    /// shared extent on write in runs of clusters. XFS and btrfs report
    /// (near) exactly, so reading twice the candidates there buys nothing.
    #[default]
    Auto,
}

/// The `[diff]` section of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffConfig {
    /// `"off"`, `"on"` or `"auto"` (the default).
    pub exact: ExactMode,
}

impl ExactMode {
    /// Whether a diff of a disk stored in `file` is refined, given the
    /// request's `exact=` (None when absent).
    pub fn applies(self, asked: Option<bool>, file: &File) -> bool {
        match (asked, self) {
            (Some(b), _) => b,
            (None, ExactMode::Off) => false,
            (None, ExactMode::On) => true,
            (None, ExactMode::Auto) => is_ocfs2(file),
        }
    }
}

/// True when `file` lives on OCFS2.
pub fn is_ocfs2(file: &File) -> bool {
    crate::sys::fs_type(file).is_ok_and(|t| t == crate::sys::FsType::Ocfs2)
}

/// Why a refinement stopped.
#[derive(Debug, thiserror::Error)]
pub enum RefineError {
    #[error("reading {which} snapshot at {offset} failed")]
    Read {
        which: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The client went away.
    #[error("cancelled")]
    Cancelled,
}

/// `file` reopened for `O_DIRECT` reads where the filesystem allows it
/// (same open file description flags otherwise unchanged).
fn direct(file: &File) {
    use rustix::fs::OFlags;
    if let Ok(fl) = rustix::fs::fcntl_getfl(file) {
        // Refused on filesystems without O_DIRECT (tmpfs): buffered then.
        let _ = rustix::fs::fcntl_setfl(file, fl | OFlags::DIRECT);
    }
}

/// Fills `buf` from `file` at `offset` (a multiple of the alignment);
/// bytes past the end of the file read as zeros.
fn read_window(
    file: &File,
    size: u64,
    buf: &mut [u8],
    offset: u64,
    which: &'static str,
) -> Result<(), RefineError> {
    let mut done = 0;
    // Past the end of the file (a short read there) the window reads as
    // zeros; a short read before it is retried and, under O_DIRECT at an
    // unaligned offset, fails the diff: never zeros guessed for data.
    while done < buf.len() && offset + (done as u64) < size {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(RefineError::Read {
                    which,
                    offset: offset + done as u64,
                    source,
                })
            }
        }
    }
    if offset + (done as u64) < size.min(offset + buf.len() as u64) {
        return Err(RefineError::Read {
            which,
            offset: offset + done as u64,
            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        });
    }
    buf[done..].fill(0);
    Ok(())
}

/// Refines `d`, the diff of `old` and `new`, by content: see the module
/// essay. Both files are switched to `O_DIRECT` reads where possible.
/// Returns the refined diff and the number of candidate bytes read from
/// each snapshot. A refinement stopped by `cancel` is counted
/// (`coe_exact_cancelled_total`).
pub fn refine_diff(
    old: &File,
    new: &File,
    d: Diff,
    cancel: &Cancel,
) -> Result<(Diff, u64), RefineError> {
    let r = refine_uncounted(old, new, d, cancel);
    if matches!(r, Err(RefineError::Cancelled)) {
        STATS.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    r
}

fn refine_uncounted(
    old: &File,
    new: &File,
    d: Diff,
    cancel: &Cancel,
) -> Result<(Diff, u64), RefineError> {
    let size = |f: &File, which| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|source| RefineError::Read {
                which,
                offset: 0,
                source,
            })
    };
    let (old_size, new_size) = (size(old, "the older")?, size(new, "the newer")?);
    // Every changed range inside both files: over the older one's data
    // (an overwrite) and over its holes and unwritten ranges, which read
    // zeros there (a new allocation: OCFS2 allocates whole clusters, so a
    // small write into a hole of a 128 KiB-cluster file reports the whole
    // cluster). Past the older end nothing is read: that is new data.
    let limit = old_size.min(new_size);
    let candidates: Vec<extent::Extent> = d
        .changed
        .iter()
        .filter(|c| c.logical < limit)
        .map(|c| extent::Extent {
            length: c.length.min(limit - c.logical),
            ..*c
        })
        .collect();
    if candidates.is_empty() {
        return Ok((d, 0));
    }
    let _slot = SLOTS.take(cancel)?;
    let started = Instant::now();
    direct(old);
    direct(new);
    let mut refined = Diff::default();
    // The newer side is read by a helper thread while this one reads the
    // older side: the two reads of a window wait on the disk at once.
    let read = std::thread::scope(|scope| {
        let (to_reader, jobs) = mpsc::sync_channel::<(AlignedBuf, u64, usize)>(1);
        let (to_main, results) = mpsc::sync_channel(1);
        // A thread the system cannot make fails this diff, not the process.
        std::thread::Builder::new()
            .name("coe-refine".into())
            .spawn_scoped(scope, move || {
                for (mut buf, base, len) in jobs {
                    let r = read_window(
                        new,
                        new_size,
                        &mut buf.as_mut_slice()[..len],
                        base,
                        "the newer",
                    );
                    if to_main.send((buf, r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| RefineError::Read {
                which: "the newer",
                offset: 0,
                source,
            })?;
        let mut bo = AlignedBuf::new(WINDOW);
        let mut bn = Some(AlignedBuf::new(WINDOW));
        let mut read = 0u64;
        for c in &candidates {
            let mut pos = c.logical;
            while pos < c.end() {
                if cancel.is_cancelled() {
                    return Err(RefineError::Cancelled);
                }
                let base = pos / REFINE_BLOCK * REFINE_BLOCK;
                let end = (base + WINDOW as u64).min(c.end().div_ceil(REFINE_BLOCK) * REFINE_BLOCK);
                let len = (end - base) as usize;
                let reader_gone = || RefineError::Read {
                    which: "the newer",
                    offset: base,
                    source: std::io::Error::other("the reading thread ended"),
                };
                if let Some(b) = bn.take() {
                    to_reader.send((b, base, len)).map_err(|_| reader_gone())?;
                }
                let o = &mut bo.as_mut_slice()[..len];
                let old_read = read_window(old, old_size, o, base, "the older");
                // The newer buffer comes back before any error returns, so
                // the helper never outlives a read of this window.
                let (b, new_read) = results.recv().map_err(|_| reader_gone())?;
                old_read?;
                new_read?;
                let n = &bn.insert(b).as_slice()[..len];
                read += len as u64;
                let piece = extent::Extent {
                    logical: pos,
                    physical: c.physical + (pos - c.logical),
                    length: end.min(c.end()) - pos,
                    flags: c.flags,
                };
                extent::refine(&piece, base, o, n, &mut refined);
                pos = end.min(c.end());
            }
        }
        Ok(read)
    })?;
    let kept = extent::subtract(&d.changed, &candidates);
    let out = Diff {
        changed: extent::merge_extents(&kept, &refined.changed),
        zeroed: extent::merge_ranges(&d.zeroed, &refined.zeroed),
    };
    STATS.diffs.fetch_add(1, Ordering::Relaxed);
    STATS.candidate_bytes.fetch_add(read, Ordering::Relaxed);
    STATS.bytes_saved.fetch_add(
        d.changed_bytes().saturating_sub(out.changed_bytes()),
        Ordering::Relaxed,
    );
    STATS.nanos.fetch_add(
        u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    Ok((out, read))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::extent::{ByteRange, Extent};

    /// An unlinked file holding `bytes` (in the temp folder: tmpfs refuses
    /// O_DIRECT, so the buffered fallback is what runs here).
    fn file(bytes: &[u8]) -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("coe-exact-{}-{n}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// Sixteen threads asking at once never hold more than the slots, all
    /// get one in turn, and a waiter whose client went away gives up.
    #[test]
    fn refinements_wait_for_a_slot_and_cancelled_waiters_give_up() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let slots = Arc::new(Slots::new(2));
        let active = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (slots, active, most) = (slots.clone(), active.clone(), most.clone());
                std::thread::spawn(move || {
                    let _slot = slots.take(&Cancel::default()).unwrap();
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Hold the slot long enough for the others to pile up.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    active.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "more refiners than slots");
        assert_eq!(*slots.free.lock().unwrap(), 2, "every slot came back");

        let (_a, _b) = (
            slots.take(&Cancel::default()).unwrap(),
            slots.take(&Cancel::default()).unwrap(),
        );
        let cancel = Cancel::default();
        let waiter = {
            let (slots, cancel) = (slots.clone(), cancel.clone());
            std::thread::spawn(move || slots.take(&cancel).map(|_| ()))
        };
        cancel.cancel();
        assert!(matches!(
            waiter.join().unwrap(),
            Err(RefineError::Cancelled)
        ));
    }

    /// Four blocks in both files: block 1 differs, block 2 is zeroed in the
    /// newer one, blocks 0 and 3 are equal; a 5th block is only in the
    /// newer file (past the older end: new data, never read). The whole range was
    /// reported changed; refined, only blocks 1, 2 and 4 are left.
    #[test]
    fn refine_diff_reads_both_and_keeps_the_differing_blocks_and_stops_when_cancelled() {
        let old: Vec<u8> = (0..4 * 4096).map(|i| (i % 251 + 1) as u8).collect();
        let mut new = old.clone();
        new[4096 + 17] ^= 0xff;
        new[8192..12288].fill(0);
        new.extend(vec![7u8; 4096]);
        let (fo, fn_) = (file(&old), file(&new));
        let d = Diff {
            changed: vec![Extent {
                logical: 0,
                physical: 8 << 20,
                length: 5 * 4096,
                flags: 0,
            }],
            zeroed: vec![],
        };
        let before = stats();
        let (r, read) = refine_diff(&fo, &fn_, d.clone(), &Cancel::default()).unwrap();
        assert_eq!(read, 4 * 4096);
        // The process counters (other tests may refine at the same time:
        // at least this diff's part). 5 blocks reported, 2 left as data
        // (block 2 became a zeroed range): 3 blocks saved.
        let after = stats();
        assert!(after.diffs > before.diffs);
        assert!(after.candidate_bytes >= before.candidate_bytes + 4 * 4096);
        assert!(after.bytes_saved >= before.bytes_saved + 3 * 4096);
        assert!(after.seconds > before.seconds);
        assert_eq!(
            r.changed,
            vec![
                Extent {
                    logical: 4096,
                    physical: (8 << 20) + 4096,
                    length: 4096,
                    flags: 0
                },
                Extent {
                    logical: 4 * 4096,
                    physical: (8 << 20) + 4 * 4096,
                    length: 4096,
                    flags: 0
                },
            ]
        );
        assert_eq!(
            r.zeroed,
            vec![ByteRange {
                start: 8192,
                length: 4096
            }]
        );
        let cancel = Cancel::default();
        cancel.cancel();
        let before = stats();
        assert!(matches!(
            refine_diff(&fo, &fn_, d, &cancel),
            Err(RefineError::Cancelled)
        ));
        assert!(stats().cancelled > before.cancelled);
    }
}
