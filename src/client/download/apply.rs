//! Applying an incremental stream onto the replica: records decoded with
//! `crate::wire::stream`, each checked before it counts as done; and the
//! fallback by ranges (zeroed ranges punched locally, changed ones fetched).
//! The stream is asked in format version 2 (zero blocks; `--compress`;
//! `--jobs` shards, each on its own thread; a broken shard resumed with
//! `from`); a server that predates it answers version 1, applied whole.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::fetch::{
    fetch_pieces, lock, read_full, retryable, Ctx, IO_BUF, PIECE_LEN, RETRIES, RETRY_BACKOFF,
};
use crate::client::error::{ClientError, Result};
use crate::client::http::{check, paths, seg};
use crate::client::ranges::pieces;
use crate::wire::stream::{self, Decoder, Event, StreamError};

/// How applying the incremental stream ended.
pub(super) enum StreamOutcome {
    /// Every record applied and the end record verified.
    Done { zeroed: u64 },
    /// The server has no stream endpoint (404).
    Unavailable,
    /// A record failed its checksum: what was applied before it stands,
    /// the rest must come another way.
    Broken { why: String, zeroed: u64 },
}

/// The stream's URL: format version 2 with the options asked for (zero
/// blocks always; zstd; the shard; the resume position). A server that
/// predates version 2 ignores the parameters and answers version 1.
fn stream_url(c: &Ctx<'_>, base: Option<&str>, shard: (u32, u32), from: Option<u64>) -> String {
    let mut url = format!(
        "{}/incremental?version=2",
        paths::disk(&c.o.vm, &c.o.snap, c.disk)
    );
    if let Some(b) = base {
        url += &format!("&compareTo={}", seg(b));
    }
    if let Some(l) = c.o.zstd {
        url += &format!("&compress=zstd&level={l}");
    }
    if shard.1 > 1 {
        url += &format!("&shard={}&shards={}", shard.0, shard.1);
    }
    if let Some(f) = from {
        url += &format!("&from={f}");
    }
    url
}

type Body = Box<dyn Read + Send>;

/// Opens one stream body; `None` when the server has no stream (404).
fn open_stream(c: &Ctx<'_>, url: &str) -> Result<Option<Body>> {
    let what = format!("incremental stream of disk {}", c.disk);
    let resp = c.api.get(&what, url)?;
    if resp.status().as_u16() == 404 {
        let _ = check(&what, resp);
        // A 404 is a missing endpoint only if the disk is still there: a
        // snapshot deleted meanwhile is "not found" (exit 4).
        c.api.still_there(&c.o.vm, &c.o.snap, c.disk)?;
        return Ok(None);
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
    Ok(Some(Box::new(resp.into_body().into_reader())))
}

/// The incremental stream onto the replica: over `--jobs` shards when the
/// server speaks format version 2 (shard 0 is asked first; its header says
/// which version came), each shard resumed with `from` where it broke.
pub(super) fn apply_stream(c: &Ctx<'_>, base: Option<&str>, size: u64) -> Result<StreamOutcome> {
    let shards = (c.o.jobs.max(1) as u32).min(stream::MAX_SHARDS);
    let Some(mut first) = open_stream(c, &stream_url(c, base, (0, shards), None))? else {
        return Ok(StreamOutcome::Unavailable);
    };
    // The header decides: read it before starting the other shards.
    let stream_err = |source| ClientError::Stream {
        disk: c.disk.to_owned(),
        source,
    };
    let mut pre = Vec::new();
    let header = loop {
        let mut b = [0u8; stream::HEADER_LEN];
        let n = first.read(&mut b).map_err(|source| ClientError::Body {
            disk: c.disk.to_owned(),
            source,
        })?;
        if n == 0 {
            return Err(stream_err(StreamError::Truncated("the stream header")));
        }
        pre.extend_from_slice(&b[..n]);
        let mut input = Bytes::copy_from_slice(&pre);
        if let Some(Event::Header(h)) = Decoder::new().decode(&mut input).map_err(stream_err)? {
            break h;
        }
    };
    let first: Body = Box::new(std::io::Cursor::new(pre).chain(first));
    if header.version == stream::VERSION || shards == 1 {
        return apply_shard(c, base, size, (0, shards), first, header.version);
    }
    let failed: Mutex<Option<ClientError>> = Mutex::new(None);
    let zeroed = AtomicUsize::new(0);
    let broken: Mutex<Option<String>> = Mutex::new(None);
    let first = Mutex::new(Some(first));
    std::thread::scope(|s| {
        for i in 0..shards {
            let (failed, zeroed, broken, first) = (&failed, &zeroed, &broken, &first);
            s.spawn(move || {
                let r = if i == 0 {
                    let body = lock(first).take().expect("once");
                    apply_shard(c, base, size, (0, shards), body, stream::VERSION_2)
                } else {
                    match open_stream(c, &stream_url(c, base, (i, shards), None)) {
                        Ok(Some(body)) => {
                            apply_shard(c, base, size, (i, shards), body, stream::VERSION_2)
                        }
                        Ok(None) => Ok(StreamOutcome::Unavailable),
                        Err(e) => Err(e),
                    }
                };
                match r {
                    Ok(StreamOutcome::Done { zeroed: z }) => {
                        zeroed.fetch_add(z as usize, Ordering::Relaxed);
                    }
                    Ok(StreamOutcome::Broken { why, zeroed: z }) => {
                        zeroed.fetch_add(z as usize, Ordering::Relaxed);
                        lock(broken).get_or_insert(why);
                    }
                    Ok(StreamOutcome::Unavailable) => {
                        lock(broken).get_or_insert(format!("shard {i} has no stream"));
                    }
                    Err(e) => {
                        lock(failed).get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let zeroed = zeroed.into_inner() as u64;
    Ok(
        match broken.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => StreamOutcome::Broken { why, zeroed },
            None => StreamOutcome::Done { zeroed },
        },
    )
}

/// Applies one stream body (one shard, or the whole stream) and, for
/// format version 2, resumes it with `from` after a broken connection or a
/// record that failed its checksum: the body continues at the end of the
/// last record applied whole, bit for bit what the broken one would have
/// sent.
fn apply_shard(
    c: &Ctx<'_>,
    base: Option<&str>,
    size: u64,
    shard: (u32, u32),
    body: Body,
    version: u16,
) -> Result<StreamOutcome> {
    let what = format!("incremental stream of disk {}", c.disk);
    let mut body = Some(body);
    let mut resume_at: Option<u64> = None;
    let mut zeroed = 0u64;
    let mut attempt = 0;
    loop {
        let mut b = match body.take() {
            Some(b) => b,
            None => match open_stream(c, &stream_url(c, base, shard, resume_at))? {
                Some(b) => b,
                None => return Ok(StreamOutcome::Unavailable),
            },
        };
        let mut written = 0;
        let r = apply_stream_body(c, &mut b, size, what.clone(), &mut resume_at, &mut written);
        match r {
            Ok(StreamOutcome::Done { zeroed: z }) => {
                return Ok(StreamOutcome::Done { zeroed: zeroed + z })
            }
            Ok(StreamOutcome::Broken { why, zeroed: z }) if version == stream::VERSION => {
                return Ok(StreamOutcome::Broken {
                    why,
                    zeroed: zeroed + z,
                })
            }
            Ok(StreamOutcome::Broken { why, zeroed: z }) if attempt < RETRIES => {
                zeroed += z;
                attempt += 1;
                c.progress.sub(written);
                eprintln!(
                    "warning: disk {}: {why}; resuming the stream at {} (retry {attempt} of \
                     {RETRIES})",
                    c.disk,
                    resume_at.unwrap_or(0)
                );
            }
            Ok(other) => return Ok(other),
            Err(e) if version == stream::VERSION_2 && attempt < RETRIES && retryable(&e) => {
                attempt += 1;
                c.progress.sub(written);
                eprintln!(
                    "warning: {}; resuming the stream at {} (retry {attempt} of {RETRIES})",
                    e.chain(),
                    resume_at.unwrap_or(0)
                );
                std::thread::sleep(RETRY_BACKOFF * attempt);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Applies an incremental stream read from `body` to the replica: data
/// written at its offsets, zero records punched, each record marked done
/// once complete (a data record only after its checksum matched).
/// `resume_at` follows the end of the last record applied whole (from the
/// header's span start on): where a version 2 stream resumes. `written`
/// counts the data bytes written, verified or not.
pub(super) fn apply_stream_body(
    c: &Ctx<'_>,
    body: &mut impl Read,
    size: u64,
    what: String,
    resume_at: &mut Option<u64>,
    written: &mut u64,
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
            dec.finish().map_err(|e| match e {
                // A version 2 body cut short is a broken connection: resumable.
                StreamError::Truncated(_) if resume_at.is_some() => ClientError::Body {
                    disk: c.disk.to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e),
                },
                e => stream_err(e),
            })?;
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
                        if h.version == stream::VERSION_2 {
                            resume_at.get_or_insert(h.start);
                        }
                    }
                    Event::Zero { offset, len } => {
                        c.replica.zero(offset, len)?;
                        zeroed += len;
                        c.tracker.mark(offset, offset + len);
                        if resume_at.is_some() {
                            *resume_at = Some(offset + len);
                        }
                    }
                    Event::DataStart { .. } | Event::End { .. } => {}
                    Event::Data { offset, bytes } => {
                        c.replica.write_at(offset, &bytes)?;
                        c.progress.add(bytes.len() as u64);
                        *written += bytes.len() as u64;
                    }
                    Event::DataEnd { offset, len } => {
                        c.tracker.mark(offset, offset + len);
                        *written = 0;
                        if resume_at.is_some() {
                            *resume_at = Some(offset + len);
                        }
                    }
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
pub(super) fn apply_ranges(c: &Ctx<'_>, data: &[(u64, u64)], zero: &[(u64, u64)]) -> Result<u64> {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;
    use crate::client::download::fetch::Tracker;
    use crate::client::download::options::{Options, Transport};
    use crate::client::http::{Api, TlsOptions};
    use crate::client::progress::Progress;
    use crate::client::ranges::RangeSet;
    use crate::client::replica::{DownloadState, Replica, ZeroBlocks};
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
                    zstd: None,
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
            let r = apply_stream_body(&c, &mut &stream[..], size, "test".into(), &mut None, &mut 0);
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
