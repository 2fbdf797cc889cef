//! Fetching by `Range` requests: pieces of at most [`PIECE_LEN`] bytes,
//! `--jobs` workers, retries, and the progress and checkpoint tracker.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::options::{Options, TICK};
use crate::client::error::{ClientError, Result};
use crate::client::http::Api;
use crate::client::progress::Progress;
use crate::client::ranges::RangeSet;
use crate::client::replica::{DownloadState, Replica};

/// Largest byte range asked for in one request: small enough that several
/// requests are in flight on a single big extent and that an interruption
/// loses little, big enough that a request's round trip (about a
/// millisecond on a LAN) is noise next to its transfer.
pub const PIECE_LEN: u64 = 8 << 20;

/// Read and write buffer: 1 MiB, what python-ovmexporterclient streams at
/// a time (API.md) and the top of the server's frame sizes.
pub(super) const IO_BUF: usize = 1 << 20;

/// Resume state checkpoint interval: at most this much work is redone
/// after a crash or Ctrl-C.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Attempts per piece after a network error or a 5xx.
pub(super) const RETRIES: u32 = 3;

/// Backoff after the n-th failed attempt: n times this.
pub(super) const RETRY_BACKOFF: Duration = Duration::from_secs(1);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The replica and its progress while a disk is transferred.
pub(super) struct Tracker<'a> {
    pub(super) replica: &'a Replica,
    pub(super) state: Mutex<DownloadState>,
    pub(super) path: &'a Path,
}

impl Tracker<'_> {
    pub(super) fn mark(&self, start: u64, end: u64) {
        lock(&self.state).done.insert(start, end);
    }

    pub(super) fn done(&self) -> RangeSet {
        lock(&self.state).done.clone()
    }

    /// Persists what is done. The set is taken before the sync, so every
    /// range it lists is on stable storage when the state says so.
    pub(super) fn checkpoint(&self) -> Result<()> {
        let s = lock(&self.state).clone();
        self.replica.sync()?;
        s.save(self.path)
    }

    pub(super) fn finish(&self) -> Result<()> {
        self.replica.sync()?;
        let mut s = lock(&self.state).clone();
        s.complete = true;
        s.done = RangeSet::new();
        s.save(self.path)
    }
}

/// Runs `work` on a thread while this one draws progress and checkpoints.
pub(super) fn monitored<T: Send>(
    progress: &Progress,
    tracker: &Tracker<'_>,
    work: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            let _ = tx.send(work());
        });
        let mut last = Instant::now();
        loop {
            match rx.recv_timeout(TICK) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    progress.tick();
                    if last.elapsed() >= CHECKPOINT_EVERY {
                        if let Err(e) = tracker.checkpoint() {
                            eprintln!("warning: cannot checkpoint: {}", e.chain());
                        }
                        last = Instant::now();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ClientError::Protocol {
                        what: "download".to_owned(),
                        problem: "a worker thread died".to_owned(),
                    })
                }
            }
        }
    })
}

/// Reads until `buf` is full or the body ends; bytes read.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(super) struct Ctx<'a> {
    pub(super) api: &'a Api,
    pub(super) o: &'a Options,
    pub(super) disk: &'a str,
    pub(super) replica: &'a Replica,
    pub(super) tracker: &'a Tracker<'a>,
    pub(super) progress: &'a Progress,
}

pub(super) fn fetch_piece(c: &Ctx<'_>, a: u64, b: u64, written: &mut u64) -> Result<()> {
    let body_err = |source| ClientError::Body {
        disk: c.disk.to_owned(),
        source,
    };
    let mut r = c.api.get_range(&c.o.vm, &c.o.snap, c.disk, a, b)?;
    let mut buf = vec![0u8; IO_BUF.min((b - a) as usize)];
    let mut pos = a;
    while pos < b {
        let want = ((b - pos) as usize).min(buf.len());
        let n = read_full(&mut r, &mut buf[..want]).map_err(body_err)?;
        if n == 0 {
            return Err(ClientError::Protocol {
                what: format!("disk {} bytes {a}-{}", c.disk, b - 1),
                problem: format!("the body ended at {pos}"),
            });
        }
        c.replica.write_at(pos, &buf[..n])?;
        c.progress.add(n as u64);
        *written += n as u64;
        pos += n as u64;
    }
    // Read to the end so the connection goes back to the pool; a body
    // longer than the range asked for is a broken server.
    let mut extra = [0u8; 1];
    if read_full(&mut r, &mut extra).map_err(body_err)? != 0 {
        return Err(ClientError::Protocol {
            what: format!("disk {} bytes {a}-{}", c.disk, b - 1),
            problem: "more bytes than the range asked for".to_owned(),
        });
    }
    Ok(())
}

pub(super) fn retryable(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport { .. } | ClientError::Body { .. })
        || e.status().is_some_and(|s| s >= 500)
}

/// Fetches `pieces` with `--jobs` threads; marks each done as it lands.
pub(super) fn fetch_pieces(c: &Ctx<'_>, pieces: &[(u64, u64)]) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failed: Mutex<Option<ClientError>> = Mutex::new(None);
    let workers = c.o.jobs.max(1).min(pieces.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(a, b)) = pieces.get(i) else { break };
                let mut attempt = 0;
                let result = loop {
                    let mut written = 0;
                    match fetch_piece(c, a, b, &mut written) {
                        Ok(()) => break Ok(()),
                        Err(e) if attempt < RETRIES && retryable(&e) => {
                            c.progress.sub(written);
                            attempt += 1;
                            eprintln!("warning: {} (retry {attempt} of {RETRIES})", e.chain());
                            std::thread::sleep(RETRY_BACKOFF * attempt);
                        }
                        Err(e) => break Err(e),
                    }
                };
                match result {
                    Ok(()) => c.tracker.mark(a, b),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        lock(&failed).get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
