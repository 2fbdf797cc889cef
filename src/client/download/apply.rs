//! Applying an incremental stream onto the replica: records decoded with
//! `crate::wire::stream`, each checked before it counts as done; and the
//! fallback by ranges (zeroed ranges punched locally, changed ones fetched).

use std::io::Read;

use bytes::Bytes;

use super::fetch::{fetch_pieces, read_full, Ctx, IO_BUF, PIECE_LEN};
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

pub(super) fn apply_stream(c: &Ctx<'_>, base: Option<&str>, size: u64) -> Result<StreamOutcome> {
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
pub(super) fn apply_stream_body(
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
