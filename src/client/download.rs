//! `download`: a snapshot's disks into sparse local replicas, as a full copy
//! or as an incremental applied onto a replica of an older snapshot.
//!
//! - Full copy: the snapshot's `chunks` (allocated extents) cut into pieces
//!   of at most [`PIECE_LEN`], one `Range` request per piece, `--jobs` in
//!   flight, each written with `pwrite` at its offset into a fresh sparse
//!   file; holes stay holes.
//! - Incremental (`--diff-from OLD`): the replica is resized to the new
//!   disk size, then the diff is applied: through the incremental stream
//!   endpoint (one request per disk, `crate::wire::stream` decoding) when the
//!   server has it, else (404) from `?compareTo=OLD&zeroed=separate`:
//!   zeroed ranges punched locally, changed ranges fetched by `Range`.
//! - Resume: the state file beside each replica ([`DownloadState`]) is
//!   written before the replica is touched and checkpointed every second
//!   (replica synced first), so a rerun after an interruption fetches only
//!   what is not done, and an incremental is refused on a replica that is
//!   not a complete copy of `OLD`.

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::error::{ClientError, Result};
use super::http::{check, paths, seg, Api};
use super::progress::Progress;
use super::ranges::{pieces, RangeSet};
use super::replica::{check_disk_name, DownloadState, Replica, ZeroBlocks};
use super::verify::VerifyOutcome;
use crate::wire::stream::{self, Decoder, Event, StreamError};
use crate::wire::{Snapshot, SnapshotDisk};

/// Largest byte range asked for in one request: small enough that several
/// requests are in flight on a single big extent and that an interruption
/// loses little, big enough that a request's round trip (about a
/// millisecond on a LAN) is noise next to its transfer.
pub const PIECE_LEN: u64 = 8 << 20;
/// Read and write buffer: 1 MiB, what python-ovmexporterclient streams at
/// a time (API.md) and the top of the server's frame sizes.
const IO_BUF: usize = 1 << 20;
/// Mode of an output folder the client creates.
const OUT_DIR_MODE: u32 = 0o700;
/// Progress redraw interval.
const TICK: Duration = Duration::from_millis(200);
/// Resume state checkpoint interval: at most this much work is redone
/// after a crash or Ctrl-C.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Attempts per piece after a network error or a 5xx.
const RETRIES: u32 = 3;
/// Backoff after the n-th failed attempt: n times this.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// How the bytes of an incremental are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Incremental stream when the server has it, else ranges; full copies
    /// by ranges.
    Auto,
    /// Always the incremental stream (also for full copies); fail without.
    Stream,
    /// Always `Range` requests.
    Ranges,
}

/// What `download` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub vm: String,
    pub snap: String,
    pub out: PathBuf,
    pub diff_from: Option<String>,
    pub jobs: usize,
    pub disks: Vec<String>,
    pub transport: Transport,
    pub limit_rate: Option<u64>,
    pub progress: bool,
}

/// What happened to one disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub disk: String,
    pub path: String,
    pub size: u64,
    /// `full`, `incremental`, or `full (new disk)` for a disk the base did
    /// not have.
    pub mode: &'static str,
    /// `ranges`, `stream`, or `none` (nothing to do).
    pub transport: &'static str,
    /// Data bytes fetched in this run.
    pub bytes: u64,
    /// Bytes made zero locally (punched) in this run.
    pub zeroed: u64,
    /// Continued an interrupted download.
    pub resumed: bool,
    /// Already a complete copy of the snapshot: nothing done.
    pub up_to_date: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyOutcome>,
}

/// What `download` did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub vm: String,
    pub snapshot: String,
    pub base: Option<String>,
    pub out: String,
    pub disks: Vec<DiskReport>,
    pub bytes: u64,
    pub seconds: f64,
}

/// One disk's work, decided before any byte moves.
struct Plan {
    disk: String,
    path: PathBuf,
    state_path: PathBuf,
    state: DownloadState,
    size: u64,
    data: Vec<(u64, u64)>,
    zero: Vec<(u64, u64)>,
    /// The replica is (re)created empty.
    fresh: bool,
    zeros: ZeroBlocks,
    resumed: bool,
    up_to_date: bool,
    /// Try the incremental stream first.
    stream: bool,
    mode: &'static str,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The chunks of a snapshot disk as `[start, end)` ranges inside `size`.
fn chunk_ranges(d: &SnapshotDisk, size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = d
        .chunks
        .iter()
        .map(|c| {
            (
                c.start.min(size),
                c.start.saturating_add(c.length).min(size),
            )
        })
        .filter(|(s, e)| s < e)
        .collect();
    v.sort_unstable();
    v
}

fn minus(ranges: &[(u64, u64)], done: &RangeSet) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .flat_map(|&(s, e)| done.missing(s, e))
        .collect()
}

fn select<'a>(snap: &'a Snapshot, want: &[String]) -> Result<Vec<&'a SnapshotDisk>> {
    for w in want {
        if !snap.disks.iter().any(|d| &d.name == w) {
            let names: Vec<&str> = snap.disks.iter().map(|d| d.name.as_str()).collect();
            return Err(ClientError::Usage(format!(
                "--disk {w}: not a disk of snapshot {} (its disks: {})",
                snap.id,
                names.join(", ")
            )));
        }
    }
    Ok(snap
        .disks
        .iter()
        .filter(|d| want.is_empty() || want.contains(&d.name))
        .collect())
}

fn replica_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

fn up_to_date(plan: &mut Plan) {
    plan.up_to_date = true;
    plan.data.clear();
    plan.zero.clear();
}

fn plan_full(api: &Api, o: &Options) -> Result<Vec<Plan>> {
    let snap: Snapshot = api.get_json("snapshot", &paths::snapshot(&o.vm, &o.snap))?;
    let mut plans = Vec::new();
    for d in select(&snap, &o.disks)? {
        check_disk_name(&d.name)?;
        let size = api.disk_size(&o.vm, &o.snap, &d.name)?;
        let path = o.out.join(&d.name);
        let state_path = DownloadState::path(&o.out, &d.name);
        let prev = DownloadState::load(&state_path)?;
        let chunks = chunk_ranges(d, size);
        let mut plan = Plan {
            disk: d.name.clone(),
            path: path.clone(),
            state_path,
            state: DownloadState::new(&o.vm, &o.snap, None, &d.name, size),
            size,
            data: chunks.clone(),
            zero: Vec::new(),
            fresh: true,
            zeros: ZeroBlocks::Skip,
            resumed: false,
            up_to_date: false,
            stream: o.transport == Transport::Stream,
            mode: "full",
        };
        let have = replica_len(&path) == Some(size);
        match prev {
            Some(s) if s.snapshot == o.snap && s.complete && have => up_to_date(&mut plan),
            Some(s) if s.snapshot == o.snap && s.base.is_none() && s.size == size && have => {
                plan.data = minus(&chunks, &s.done);
                plan.state = s;
                plan.fresh = false;
                plan.resumed = true;
                plan.stream = false;
            }
            _ => {}
        }
        plans.push(plan);
    }
    Ok(plans)
}

fn plan_incremental(api: &Api, o: &Options, base: &str) -> Result<Vec<Plan>> {
    let diff: Snapshot = api.get_json(
        &format!("diff of {} from {base}", o.snap),
        &format!(
            "{}?compareTo={}&zeroed=separate",
            paths::snapshot(&o.vm, &o.snap),
            seg(base)
        ),
    )?;
    let old: Snapshot = api.get_json("base snapshot", &paths::snapshot(&o.vm, base))?;
    let mut plans = Vec::new();
    for d in select(&diff, &o.disks)? {
        check_disk_name(&d.name)?;
        let size = d.size.ok_or_else(|| ClientError::Protocol {
            what: format!("diff of disk {}", d.name),
            problem: "no `size` in the answer: the server is too old for incremental \
                      downloads"
                .to_owned(),
        })?;
        let path = o.out.join(&d.name);
        let state_path = DownloadState::path(&o.out, &d.name);
        let prev = DownloadState::load(&state_path)?;
        let in_base = old.disks.iter().any(|x| x.name == d.name);
        let data = chunk_ranges(d, size);
        let zero: Vec<(u64, u64)> = if in_base {
            let mut z: Vec<(u64, u64)> = d
                .zeroed
                .iter()
                .flatten()
                .map(|r| {
                    (
                        r.start.min(size),
                        r.start.saturating_add(r.length).min(size),
                    )
                })
                .filter(|(s, e)| s < e)
                .collect();
            z.sort_unstable();
            z
        } else {
            Vec::new()
        };
        let mut plan = Plan {
            disk: d.name.clone(),
            path: path.clone(),
            state_path: state_path.clone(),
            state: DownloadState::new(&o.vm, &o.snap, Some(base), &d.name, size),
            size,
            data: data.clone(),
            zero: zero.clone(),
            fresh: !in_base,
            zeros: if in_base {
                ZeroBlocks::Punch
            } else {
                ZeroBlocks::Skip
            },
            resumed: false,
            up_to_date: false,
            stream: o.transport != Transport::Ranges,
            mode: if in_base {
                "incremental"
            } else {
                "full (new disk)"
            },
        };
        let len = replica_len(&path);
        let exists = len.is_some();
        match prev {
            Some(s) if s.snapshot == o.snap && s.complete && len == Some(size) => {
                up_to_date(&mut plan)
            }
            Some(s) if s.snapshot == o.snap && s.base.as_deref() == Some(base) && exists => {
                plan.data = minus(&data, &s.done);
                plan.zero = minus(&zero, &s.done);
                plan.state = s;
                plan.fresh = false;
                plan.resumed = true;
                plan.stream = false;
            }
            _ if !in_base => {}
            Some(s) if s.complete && s.snapshot == base && exists => {}
            None if exists => {}
            None => {
                return Err(ClientError::ReplicaConflict(format!(
                    "no replica of disk {} at {}: make a full copy of snapshot {base} first \
                     (download without --diff-from)",
                    d.name,
                    path.display()
                )))
            }
            Some(s) => {
                return Err(ClientError::ReplicaConflict(format!(
                    "{} is {} of snapshot {}{}, not a complete copy of {base}: applying the \
                     diff from {base} would corrupt it. Download {} again (or remove {} if \
                     you know the replica is a copy of {base})",
                    path.display(),
                    if s.complete {
                        "a complete copy"
                    } else {
                        "an unfinished download"
                    },
                    s.snapshot,
                    s.base
                        .as_deref()
                        .map(|b| format!(" (from {b})"))
                        .unwrap_or_default(),
                    if s.complete { &o.snap } else { &s.snapshot },
                    state_path.display()
                )))
            }
        }
        plans.push(plan);
    }
    Ok(plans)
}

/// The replica and its progress while a disk is transferred.
struct Tracker<'a> {
    replica: &'a Replica,
    state: Mutex<DownloadState>,
    path: &'a Path,
}

impl Tracker<'_> {
    fn mark(&self, start: u64, end: u64) {
        lock(&self.state).done.insert(start, end);
    }

    fn done(&self) -> RangeSet {
        lock(&self.state).done.clone()
    }

    /// Persists what is done. The set is taken before the sync, so every
    /// range it lists is on stable storage when the state says so.
    fn checkpoint(&self) -> Result<()> {
        let s = lock(&self.state).clone();
        self.replica.sync()?;
        s.save(self.path)
    }

    fn finish(&self) -> Result<()> {
        self.replica.sync()?;
        let mut s = lock(&self.state).clone();
        s.complete = true;
        s.done = RangeSet::new();
        s.save(self.path)
    }
}

/// Runs `work` on a thread while this one draws progress and checkpoints.
fn monitored<T: Send>(
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
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
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

struct Ctx<'a> {
    api: &'a Api,
    o: &'a Options,
    disk: &'a str,
    replica: &'a Replica,
    tracker: &'a Tracker<'a>,
    progress: &'a Progress,
}

fn fetch_piece(c: &Ctx<'_>, a: u64, b: u64, written: &mut u64) -> Result<()> {
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

fn retryable(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport { .. } | ClientError::Body { .. })
        || e.status().is_some_and(|s| s >= 500)
}

/// Fetches `pieces` with `--jobs` threads; marks each done as it lands.
fn fetch_pieces(c: &Ctx<'_>, pieces: &[(u64, u64)]) -> Result<()> {
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

/// How applying the incremental stream ended.
enum StreamOutcome {
    /// Every record applied and the end record verified.
    Done { zeroed: u64 },
    /// The server has no stream endpoint (404).
    Unavailable,
    /// A record failed its checksum: what was applied before it stands,
    /// the rest must come another way.
    Broken { why: String, zeroed: u64 },
}

fn apply_stream(c: &Ctx<'_>, base: Option<&str>, size: u64) -> Result<StreamOutcome> {
    let mut url = format!("{}/incremental", paths::disk(&c.o.vm, &c.o.snap, c.disk));
    if let Some(b) = base {
        url += &format!("?compareTo={}", seg(b));
    }
    let what = format!("incremental stream of disk {}", c.disk);
    let resp = c.api.get(&what, &url)?;
    if resp.status().as_u16() == 404 {
        let _ = check(&what, resp);
        // A 404 is a missing endpoint only if the disk is still there: a
        // snapshot deleted meanwhile is "not found" (exit 4).
        c.api.still_there(&c.o.vm, &c.o.snap, c.disk)?;
        return Ok(StreamOutcome::Unavailable);
    }
    let resp = check(&what, resp)?;
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !ct.starts_with(stream::CONTENT_TYPE) {
        return Err(ClientError::Protocol {
            what,
            problem: format!("Content-Type {ct:?}, expected {}", stream::CONTENT_TYPE),
        });
    }
    let mut body = resp.into_body().into_reader();
    apply_stream_body(c, &mut body, size, what)
}

/// Applies an incremental stream read from `body` to the replica: data
/// written at its offsets, zero records punched, each record marked done
/// once complete (a data record only after its checksum matched).
fn apply_stream_body(
    c: &Ctx<'_>,
    body: &mut impl Read,
    size: u64,
    what: String,
) -> Result<StreamOutcome> {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut zeroed = 0u64;
    let stream_err = |source| ClientError::Stream {
        disk: c.disk.to_owned(),
        source,
    };
    loop {
        let n = read_full(body, &mut buf).map_err(|source| ClientError::Body {
            disk: c.disk.to_owned(),
            source,
        })?;
        if n == 0 {
            dec.finish().map_err(stream_err)?;
            return Ok(StreamOutcome::Done { zeroed });
        }
        let mut input = Bytes::copy_from_slice(&buf[..n]);
        loop {
            match dec.decode(&mut input) {
                Ok(None) => break,
                Ok(Some(ev)) => match ev {
                    Event::Header(h) => {
                        if h.disk_size != size {
                            return Err(ClientError::Protocol {
                                what,
                                problem: format!(
                                    "stream says the disk has {} bytes, the snapshot {size}",
                                    h.disk_size
                                ),
                            });
                        }
                    }
                    Event::Zero { offset, len } => {
                        c.replica.zero(offset, len)?;
                        zeroed += len;
                        c.tracker.mark(offset, offset + len);
                    }
                    Event::DataStart { .. } | Event::End { .. } => {}
                    Event::Data { offset, bytes } => {
                        c.replica.write_at(offset, &bytes)?;
                        c.progress.add(bytes.len() as u64);
                    }
                    Event::DataEnd { offset, len } => c.tracker.mark(offset, offset + len),
                },
                Err(StreamError::DataChecksum { offset, len }) => {
                    return Ok(StreamOutcome::Broken {
                        why: format!("the record at {offset}+{len} failed its checksum"),
                        zeroed,
                    })
                }
                Err(e) => return Err(stream_err(e)),
            }
        }
    }
}

/// Zeroes `zero` and fetches `data` by ranges, marking each as done.
fn apply_ranges(c: &Ctx<'_>, data: &[(u64, u64)], zero: &[(u64, u64)]) -> Result<u64> {
    let mut zeroed = 0;
    for &(s, e) in zero {
        c.replica.zero(s, e - s)?;
        zeroed += e - s;
        c.tracker.mark(s, e);
    }
    let list: Vec<(u64, u64)> = data
        .iter()
        .flat_map(|&(s, e)| pieces(s, e - s, PIECE_LEN))
        .collect();
    fetch_pieces(c, &list)?;
    Ok(zeroed)
}

fn run_plan(api: &Api, o: &Options, plan: Plan, progress: &Progress) -> Result<DiskReport> {
    let mut report = DiskReport {
        disk: plan.disk.clone(),
        path: plan.path.display().to_string(),
        size: plan.size,
        mode: plan.mode,
        transport: "none",
        bytes: 0,
        zeroed: 0,
        resumed: plan.resumed,
        up_to_date: plan.up_to_date,
        verify: None,
    };
    if plan.up_to_date {
        return Ok(report);
    }
    // The state goes first: from the next line on, the replica is no longer
    // a copy of the base, and a rerun must know it.
    plan.state.save(&plan.state_path)?;
    let replica = if plan.fresh {
        Replica::create(&plan.path, plan.size)?
    } else {
        let r = Replica::open(&plan.path, plan.zeros)?;
        r.set_len(plan.size)?;
        r
    };
    let tracker = Tracker {
        replica: &replica,
        state: Mutex::new(plan.state.clone()),
        path: &plan.state_path,
    };
    let c = Ctx {
        api,
        o,
        disk: &plan.disk,
        replica: &replica,
        tracker: &tracker,
        progress,
    };
    let before = progress.done();
    let result = monitored(progress, &tracker, || -> Result<(&'static str, u64)> {
        let (mut data, mut zero) = (plan.data.clone(), plan.zero.clone());
        let mut zeroed = 0;
        if plan.stream {
            match apply_stream(&c, o.diff_from.as_deref(), plan.size)? {
                StreamOutcome::Done { zeroed } => return Ok(("stream", zeroed)),
                StreamOutcome::Unavailable if o.transport == Transport::Stream => {
                    return Err(ClientError::Http {
                        what: format!("incremental stream of disk {}", plan.disk),
                        status: 404,
                        short: "Not Found".to_owned(),
                        details: "the server has no incremental stream endpoint; use \
                                  --transport auto or ranges"
                            .to_owned(),
                    })
                }
                StreamOutcome::Unavailable => {}
                StreamOutcome::Broken { why, zeroed: z } => {
                    eprintln!(
                        "warning: disk {}: {why}; fetching the rest by ranges",
                        plan.disk
                    );
                    zeroed = z;
                    let done = tracker.done();
                    data = minus(&data, &done);
                    zero = minus(&zero, &done);
                }
            }
        }
        zeroed += apply_ranges(&c, &data, &zero)?;
        Ok(("ranges", zeroed))
    });
    match result {
        Ok((transport, zeroed)) => {
            tracker.finish()?;
            report.transport = transport;
            report.zeroed = zeroed;
            report.bytes = progress.done() - before;
            Ok(report)
        }
        Err(e) => {
            // Keep what is done for the rerun.
            let _ = tracker.checkpoint();
            Err(e)
        }
    }
}

/// Runs a download to the end; verification is the caller's.
pub fn download(api: &Api, o: &Options) -> Result<Report> {
    // Folders made here are private: they hold VM disks.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(OUT_DIR_MODE)
        .create(&o.out)
        .map_err(|source| ClientError::Local {
            what: "cannot create the output folder",
            path: o.out.clone(),
            source,
        })?;
    let t0 = Instant::now();
    let plans = match &o.diff_from {
        None => plan_full(api, o)?,
        Some(base) => plan_incremental(api, o, base)?,
    };
    let total: u64 = plans
        .iter()
        .flat_map(|p| p.data.iter())
        .map(|(s, e)| e - s)
        .sum();
    let progress = Progress::new(total, o.limit_rate, o.progress);
    let mut disks = Vec::new();
    let mut failure = None;
    for plan in plans {
        match run_plan(api, o, plan, &progress) {
            Ok(r) => disks.push(r),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    progress.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Report {
        vm: o.vm.clone(),
        snapshot: o.snap.clone(),
        base: o.diff_from.clone(),
        out: o.out.display().to_string(),
        bytes: disks.iter().map(|d| d.bytes).sum(),
        disks,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::http::TlsOptions;
    use crate::wire::stream::Encoder;

    /// A stream of `changes` over `disk`, made by the server's encoder.
    fn encode(disk: &[u8], changes: &[(bool, u64, u64)]) -> Vec<u8> {
        let mut e = Encoder::new(disk.len() as u64, changes.len() as u64);
        let mut out = e.header().to_vec();
        for &(data, off, len) in changes {
            if data {
                out.extend_from_slice(&e.begin_data(off, len).unwrap());
                let bytes = &disk[off as usize..(off + len) as usize];
                e.data(bytes).unwrap();
                out.extend_from_slice(bytes);
                out.extend_from_slice(&e.end_data().unwrap());
            } else {
                out.extend_from_slice(&e.zero(off, len).unwrap());
            }
        }
        out.extend_from_slice(&e.finish().unwrap());
        out
    }

    struct Fixture {
        dir: PathBuf,
        api: Api,
        opts: Options,
    }

    impl Fixture {
        fn new(tag: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!("coe-dl-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            // Never connects: the stream comes from memory.
            let tls = TlsOptions {
                insecure: true,
                ..TlsOptions::default()
            };
            Fixture {
                api: Api::new("https://127.0.0.1:9", &tls, 1).unwrap(),
                opts: Options {
                    vm: "vm".into(),
                    snap: "s2".into(),
                    out: dir.clone(),
                    diff_from: Some("s1".into()),
                    jobs: 1,
                    disks: vec![],
                    transport: Transport::Auto,
                    limit_rate: None,
                    progress: false,
                },
                dir,
            }
        }

        /// Applies `stream` onto a replica holding `old`; the outcome, the
        /// replica's bytes and the ranges marked done.
        fn apply(
            &self,
            old: &[u8],
            size: u64,
            stream: &[u8],
        ) -> (Result<StreamOutcome>, Vec<u8>, RangeSet) {
            let path = self.dir.join("d.img");
            std::fs::write(&path, old).unwrap();
            let replica = Replica::open(&path, ZeroBlocks::Punch).unwrap();
            replica.set_len(size).unwrap();
            let tracker = Tracker {
                replica: &replica,
                state: Mutex::new(DownloadState::new("vm", "s2", Some("s1"), "d.img", size)),
                path: &self.dir.join("state.json"),
            };
            let progress = Progress::new(0, None, false);
            let c = Ctx {
                api: &self.api,
                o: &self.opts,
                disk: "d.img",
                replica: &replica,
                tracker: &tracker,
                progress: &progress,
            };
            let r = apply_stream_body(&c, &mut &stream[..], size, "test".into());
            (r, std::fs::read(&path).unwrap(), tracker.done())
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn a_stream_turns_the_old_replica_into_the_new_disk() {
        let f = Fixture::new("ok");
        let old = pattern(300_000, 1);
        // New: grown, a changed range, a zeroed range, data past the old end.
        let mut new = old.clone();
        new.resize(420_000, 0);
        new[1000..9000].copy_from_slice(&pattern(8000, 7));
        for b in &mut new[100_000..180_000] {
            *b = 0;
        }
        new[350_000..410_000].copy_from_slice(&pattern(60_000, 9));
        let stream = encode(
            &new,
            &[
                (true, 1000, 8000),
                (false, 100_000, 80_000),
                (true, 350_000, 60_000),
            ],
        );
        let (r, got, done) = f.apply(&old, new.len() as u64, &stream);
        assert!(matches!(r, Ok(StreamOutcome::Done { zeroed: 80_000 })));
        assert!(got == new, "replica differs from the new disk");
        assert_eq!(
            done.ranges(),
            &[(1000, 9000), (100_000, 180_000), (350_000, 410_000)]
        );
        // The same stream shrinking the disk.
        let short = &new[..250_000];
        let stream = encode(short, &[(true, 1000, 8000), (false, 100_000, 80_000)]);
        let (r, got, _) = f.apply(&old, short.len() as u64, &stream);
        assert!(matches!(r, Ok(StreamOutcome::Done { .. })));
        assert!(got == short);
    }

    #[test]
    fn a_record_failing_its_checksum_is_not_marked_done() {
        let f = Fixture::new("crc");
        let old = vec![0u8; 100_000];
        let new = pattern(100_000, 3);
        let mut stream = encode(&new, &[(true, 0, 10_000), (true, 20_000, 10_000)]);
        // Flip a byte inside the second record's data.
        let second_data = stream::HEADER_LEN
            + stream::RECORD_LEN
            + 10_000
            + stream::TRAILER_LEN
            + stream::RECORD_LEN
            + 5;
        stream[second_data] ^= 0x40;
        let (r, _, done) = f.apply(&old, 100_000, &stream);
        match r {
            Ok(StreamOutcome::Broken { why, .. }) => assert!(why.contains("20000"), "{why}"),
            Ok(_) => panic!("a corrupted record was accepted"),
            Err(e) => panic!("{e}"),
        }
        assert_eq!(done.ranges(), &[(0, 10_000)]);
    }

    #[test]
    fn a_cut_stream_is_an_error_not_a_success() {
        let f = Fixture::new("cut");
        let new = pattern(50_000, 5);
        let stream = encode(&new, &[(true, 0, 50_000)]);
        let (r, _, done) = f.apply(&new, 50_000, &stream[..stream.len() - 10]);
        assert!(
            matches!(r, Err(ClientError::Stream { .. })),
            "{:?}",
            r.err()
        );
        assert_eq!(done.ranges(), &[(0, 50_000)]);
        let (r, _, done) = f.apply(&new, 50_000, &stream[..stream.len() / 2]);
        assert!(matches!(r, Err(ClientError::Stream { .. })));
        assert!(done.is_empty());
        // A stream for a disk of another size is refused before any write.
        let (r, _, _) = f.apply(&new, 40_000, &stream);
        assert!(matches!(r, Err(ClientError::Protocol { .. })));
    }
}
