//! The data path end to end: the real binary over TLS, a static inventory
//! whose repository is on the test XFS or btrfs, real snapshots, and both io
//! backends. Checks multi-range answers byte for byte, the 416 cases, the
//! incremental stream (applied to a copy of the older snapshot it must give
//! the newer one), checksums against the CRCs of the file's blocks, and that
//! a stream whose read fails aborts the connection instead of ending short.

use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use coriolis_ovm_exporter::wire::stream::{Decoder, Event};

use crate::common::{
    drop_cache, http_request, is_abort, repo_and_disk, resident_bytes, static_inventory, Answer,
    Exporter, Fs, Options, Pki, LOCAL_PASS, LOCAL_USER,
};

/// Not a multiple of 4096, so the tail read under `O_DIRECT` is checked.
const SIZE: u64 = (24 << 20) + 12_345;
const VM: &str = "vm-data-01";

/// Deterministic bytes (a xorshift), different per `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn punch(path: &Path, off: u64, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        off,
        len,
    )
    .unwrap();
}

/// An exporter serving [`VM`], whose one disk is `disk` on `repo`, with
/// the io backend `backend`; its certificates and a token of its local
/// user.
fn start(repo: &Path, disk: &Path, backend: &str) -> (Pki, Exporter, String) {
    let pki = Pki::new();
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        let mut c = Exporter::config(&pki, dir, port, &o);
        c += &static_inventory(repo, &[(VM, vec![disk])]);
        c += &format!("\n[io]\nbackend = {backend:?}\n");
        c
    });
    let log = ex.log();
    assert!(
        log.contains(&format!("backend=\"{backend}\""))
            || log.contains(&format!("backend={backend}")),
        "the log names the io backend {backend}:\n{log}"
    );
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    (pki, ex, token)
}

fn get(ex: &Exporter, path: &str, token: &str, headers: &[(&str, &str)]) -> Answer {
    ex.raw(&http_request("GET", path, Some(token), headers, ""))
}

/// Parses a `multipart/byteranges` body independently of the server's
/// framing code: (range, bytes) per part.
fn multipart(a: &Answer) -> Vec<(Range<u64>, u64, Vec<u8>)> {
    let ct = a.header("content-type").unwrap();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("content-type {ct}"));
    let delim = format!("\r\n--{boundary}");
    let body = &a.body;
    let mut pos = 0;
    let mut parts = Vec::new();
    loop {
        assert_eq!(&body[pos..pos + delim.len()], delim.as_bytes(), "delimiter");
        pos += delim.len();
        if &body[pos..pos + 2] == b"--" {
            assert_eq!(&body[pos..], b"--\r\n", "closing delimiter ends the body");
            break;
        }
        let head_end = pos
            + body[pos..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap();
        let head = std::str::from_utf8(&body[pos..head_end]).unwrap();
        let cr = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Content-Range: bytes "))
            .unwrap_or_else(|| panic!("part without Content-Range: {head}"));
        let (span, total) = cr.split_once('/').unwrap();
        let (first, last) = span.split_once('-').unwrap();
        let (first, last): (u64, u64) = (first.parse().unwrap(), last.parse().unwrap());
        pos = head_end + 4;
        let len = (last - first + 1) as usize;
        parts.push((
            first..last + 1,
            total.parse().unwrap(),
            body[pos..pos + len].to_vec(),
        ));
        pos += len;
    }
    assert_eq!(
        a.header("content-length")
            .map(|v| v.parse::<usize>().unwrap()),
        Some(body.len())
    );
    parts
}

/// Applies an incremental stream to `base`, checking it decodes to the
/// end: (records, data bytes). The data bytes are counted here, as the sum
/// of the payloads of the data records (before any compression: this
/// stream is asked without it), and must equal what the end record says.
fn apply(stream: &[u8], base: &mut Vec<u8>) -> (u64, u64) {
    let mut d = Decoder::new();
    let mut end = None;
    let mut counted = 0u64;
    // Feed it in uneven pieces, as a network would.
    for piece in stream.chunks(100_003) {
        let mut input = Bytes::copy_from_slice(piece);
        while let Some(ev) = d.decode(&mut input).unwrap() {
            match ev {
                Event::Header(h) => base.resize(h.disk_size as usize, 0),
                Event::Zero { offset, len } => {
                    base[offset as usize..(offset + len) as usize].fill(0)
                }
                Event::Data { offset, bytes } => {
                    counted += bytes.len() as u64;
                    base[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes)
                }
                Event::DataStart { .. } | Event::DataEnd { .. } => {}
                Event::End {
                    records,
                    data_bytes,
                } => end = Some((records, data_bytes)),
            }
        }
    }
    d.finish().unwrap();
    let (records, data_bytes) = end.expect("an end record");
    assert_eq!(
        counted, data_bytes,
        "the end record's data bytes differ from the data records'"
    );
    (records, data_bytes)
}

fn run(fs: Fs, backend: &str) {
    let scratch = fs.scratch(&format!("datapath-{backend}"));
    let (repo, disk) = repo_and_disk(&scratch);
    // A sparse disk: data at a few places, holes between.
    {
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(SIZE).unwrap();
        for (off, len, seed) in [
            (0u64, 3 << 20, 1u64),
            (8 << 20, 1 << 20, 2),
            (16 << 20, 5 << 20, 3),
            (SIZE - 20_000, 20_000, 4),
        ] {
            f.write_at(&pattern(len as usize, seed), off).unwrap();
        }
        f.sync_all().unwrap();
    }
    let (_pki, ex, token) = start(&repo, &disk, backend);
    let snaps = format!("/api/v1/vms/{VM}/snapshots");
    let create = || ex.create_snapshot(VM, &token);
    let (snap1, name, path1) = create();
    let v1 = std::fs::read(&disk).unwrap();
    // Changes: scattered 4 KiB writes, a write into a hole, a punched hole
    // where data was (a zeroed range).
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for (i, off) in [4096u64, 1 << 20, (2 << 20) + 8192, 17 << 20]
            .into_iter()
            .enumerate()
        {
            f.write_at(&pattern(4096, 100 + i as u64), off).unwrap();
        }
        f.write_at(&pattern(70_000, 200), 12 << 20).unwrap();
        // A 64 KiB run of data rewritten with its own bytes: the maps
        // report it, refinement by content (exact=true) drops it.
        let same = ((3 << 20)..(12 << 20))
            .step_by(65536)
            .find(|&o: &usize| {
                v1[o..o + 65536]
                    .chunks(4096)
                    .all(|b| b.iter().any(|&x| x != 0))
            })
            .expect("a 64 KiB run of data between 3 and 12 MiB");
        f.write_at(&v1[same..same + 65536], same as u64).unwrap();
        f.sync_all().unwrap();
    }
    punch(&disk, 18 << 20, 1 << 20);
    let (snap2, name2, path2) = create();
    assert_eq!(name, name2);
    let v2 = std::fs::read(&disk).unwrap();
    assert_ne!(v1, v2);
    let disk_url = |snap: &str| format!("{snaps}/{snap}/disks/{name}");

    // Whole files, both snapshots. The first read through the server (with
    // the default O_DIRECT) leaves the snapshot file out of the page cache:
    // an export does not evict the VMs' cache.
    drop_cache(Path::new(&path1));
    assert!(resident_bytes(Path::new(&path1)) < 1 << 20, "cache dropped");
    let w1 = get(&ex, &disk_url(&snap1), &token, &[]);
    assert_eq!(w1.status, 200, "{}", w1.text());
    assert!(w1.body == v1, "snapshot 1 bytes differ");
    let cached = resident_bytes(Path::new(&path1));
    assert!(
        cached < 1 << 20,
        "streaming {SIZE} bytes through the server left {cached} bytes in the page cache"
    );
    let w2 = get(&ex, &disk_url(&snap2), &token, &[]);
    assert!(w2.body == v2, "snapshot 2 bytes differ");

    // Several ranges: sorted, merged, each part byte-exact.
    let ask = format!(
        "bytes=5000-5099, 0-99,4096-4200,50-150, -10, {}-{}",
        (3 << 20) - 5,
        (3 << 20) + 5
    );
    let m = get(&ex, &disk_url(&snap2), &token, &[("Range", &ask)]);
    assert_eq!(m.status, 206, "{}", m.text());
    let parts = multipart(&m);
    let want: Vec<Range<u64>> = vec![
        0..151,
        4096..4201,
        5000..5100,
        (3 << 20) - 5..(3 << 20) + 6,
        SIZE - 10..SIZE,
    ];
    assert_eq!(parts.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), want);
    for (r, total, bytes) in &parts {
        assert_eq!(*total, SIZE);
        assert!(
            bytes[..] == v2[r.start as usize..r.end as usize],
            "part {r:?} differs"
        );
    }
    // HEAD of the same: same length, no body.
    let h = ex.raw(&http_request(
        "HEAD",
        &disk_url(&snap2),
        Some(&token),
        &[("Range", &ask)],
        "",
    ));
    assert_eq!(h.status, 206);
    assert_eq!(h.header("content-length"), m.header("content-length"));
    assert!(h.body.is_empty());
    // One range: plain 206.
    let one = get(
        &ex,
        &disk_url(&snap2),
        &token,
        &[("Range", "bytes=4095-1052671")],
    );
    assert_eq!(one.status, 206);
    assert_eq!(
        one.header("content-range"),
        Some(format!("bytes 4095-1052671/{SIZE}").as_str())
    );
    assert!(one.body == v2[4095..1_052_672]);

    // A client pulling the disk as consecutive 4 MiB ranges, one request
    // after the other (the Coriolis client's pattern): from the third on,
    // reads started ahead serve them (O_DIRECT gets no kernel read-ahead),
    // every byte exact, and /metrics counts them.
    let chunk = 4u64 << 20;
    let mut at = 0;
    while at < SIZE {
        let end = (at + chunk).min(SIZE);
        let ask = format!("bytes={at}-{}", end - 1);
        let a = get(&ex, &disk_url(&snap2), &token, &[("Range", &ask)]);
        assert_eq!(a.status, 206, "{}", a.text());
        assert!(a.body == v2[at as usize..end as usize], "chunk at {at}");
        at = end;
    }
    let metric = |name: &str| ex.metric(&token, name);
    assert!(metric("coe_io_prefetch_used_total") >= 4);

    // 416: past the end, malformed, other unit, too many parts.
    let many: Vec<String> = (0..65).map(|i| format!("{0}-{0}", i * 10)).collect();
    for bad in [
        format!("bytes={SIZE}-"),
        format!("bytes={SIZE}-{}", SIZE + 5),
        "bytes=abc".into(),
        "bytes=5-1".into(),
        "lines=0-1".into(),
        format!("bytes={}", many.join(",")),
    ] {
        let a = get(&ex, &disk_url(&snap2), &token, &[("Range", &bad)]);
        a.assert_error(416, "Range Not Satisfiable");
        assert_eq!(
            a.header("content-range"),
            Some(format!("bytes */{SIZE}").as_str()),
            "{bad}"
        );
    }

    // The incremental stream from snapshot 1 to 2, applied to a copy of 1.
    let inc = get(
        &ex,
        &format!("{}/incremental?compareTo={snap1}", disk_url(&snap2)),
        &token,
        &[],
    );
    assert_eq!(inc.status, 200, "{}", inc.text());
    assert_eq!(
        inc.header("content-type"),
        Some("application/vnd.coriolis-ovm-exporter.incremental")
    );
    assert_eq!(
        inc.header("content-length")
            .map(|v| v.parse::<usize>().unwrap()),
        Some(inc.body.len())
    );
    let mut copy = v1.clone();
    let (records, data_bytes) = apply(&inc.body, &mut copy);
    assert!(copy == v2, "snapshot 1 + incremental stream != snapshot 2");
    assert!(records >= 2, "data and zero records: {records}");
    assert!(
        data_bytes < 4 << 20,
        "an incremental stream carries the changes, not the disk: {data_bytes} bytes"
    );
    // Refined by content (#19): the same replica from no more data.
    let saved_before = metric("coe_exact_bytes_saved_total");
    let diffs_before = metric("coe_exact_diffs_total");
    let exact = get(
        &ex,
        &format!(
            "{}/incremental?compareTo={snap1}&exact=true",
            disk_url(&snap2)
        ),
        &token,
        &[],
    );
    assert_eq!(exact.status, 200, "{}", exact.text());
    let mut copy = v1.clone();
    let (_, exact_bytes) = apply(&exact.body, &mut copy);
    assert!(copy == v2, "snapshot 1 + refined stream != snapshot 2");
    assert!(
        exact_bytes + 65536 <= data_bytes,
        "refined {exact_bytes} bytes, unrefined {data_bytes}: the rewritten run is sent"
    );
    // /metrics counts what refinement took out of this stream: the data
    // bytes the unrefined one carried more.
    assert_eq!(
        metric("coe_exact_bytes_saved_total") - saved_before,
        data_bytes - exact_bytes,
        "coe_exact_bytes_saved_total"
    );
    assert_eq!(metric("coe_exact_diffs_total"), diffs_before + 1);
    assert!(metric("coe_exact_candidate_bytes_total") >= 65536);
    // Without compareTo: a full sparse copy, applied to nothing.
    let full = get(
        &ex,
        &format!("{}/incremental", disk_url(&snap2)),
        &token,
        &[],
    );
    assert_eq!(full.status, 200, "{}", full.text());
    let mut fresh = Vec::new();
    let (_, data_bytes) = apply(&full.body, &mut fresh);
    assert!(fresh == v2, "the full stream rebuilds snapshot 2");
    assert!(data_bytes < SIZE, "holes are not sent: {data_bytes}");
    // Errors as for GET snapshot with compareTo.
    get(
        &ex,
        &format!("{}/incremental?compareTo={snap2}", disk_url(&snap1)),
        &token,
        &[],
    )
    .assert_error(400, "Bad Request");
    get(
        &ex,
        &format!(
            "{}/incremental?compareTo=00000000-0000-0000-0000-000000000000",
            disk_url(&snap2)
        ),
        &token,
        &[],
    )
    .assert_error(404, "Not Found");

    // Checksums equal the CRCs of the file's blocks.
    for (q, block) in [("", 4usize << 20), ("?blockSize=65536", 65_536)] {
        let a = get(
            &ex,
            &format!("{}/checksums{q}", disk_url(&snap2)),
            &token,
            &[],
        );
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        assert_eq!(v["size"], SIZE);
        assert_eq!(v["block_size"], block as u64);
        assert_eq!(v["algorithm"], "crc32");
        let got: Vec<u64> = v["crc32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        let want: Vec<u64> = v2
            .chunks(block)
            .map(|b| u64::from(crc32fast::hash(b)))
            .collect();
        assert_eq!(got, want, "block size {block}");
    }
    get(
        &ex,
        &format!("{}/checksums?blockSize=1000", disk_url(&snap2)),
        &token,
        &[],
    )
    .assert_error(400, "Bad Request");

    // A read that fails mid-stream aborts the connection: the client gets
    // fewer bytes than announced, never a clean short body.
    let mut tls = ex.connect();
    tls.write_all(&http_request(
        "GET",
        &disk_url(&snap2),
        Some(&token),
        &[],
        "",
    ))
    .unwrap();
    let mut first = vec![0u8; 4096];
    let n = tls.read(&mut first).unwrap();
    let head = String::from_utf8_lossy(&first[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {SIZE}")), "{head}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path2)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut rest = Vec::new();
    let ended = tls.read_to_end(&mut rest);
    let got = n + rest.len();
    assert!(
        (got as u64) < SIZE,
        "the body must be cut short ({got} bytes, {ended:?})"
    );
    // An abort, not an orderly end: no TLS close_notify after the short
    // body (a clean close would let a careless client take the bytes as
    // the whole answer).
    match &ended {
        Err(e) if is_abort(e.kind()) => {}
        other => panic!("the cut-short body ended with {other:?}, not an abort"),
    }

    // Deleting a snapshot lets go of the reads started ahead (they hold
    // files open, which would keep a deleted snapshot's space).
    for at in [0, chunk] {
        let ask = format!("bytes={at}-{}", at + chunk - 1);
        let a = get(&ex, &disk_url(&snap1), &token, &[("Range", &ask)]);
        assert_eq!(a.status, 206, "{}", a.text());
    }
    assert!(metric("coe_io_prefetch_buffers") > 0);
    let del = ex.raw(&http_request(
        "DELETE",
        &format!("{snaps}/{snap1}"),
        Some(&token),
        &[],
        "",
    ));
    assert_eq!(del.status, 200, "{}", del.text());
    assert_eq!(metric("coe_io_prefetch_buffers"), 0);
}

#[test]
fn datapath_xfs_threads() {
    run(Fs::Xfs, "threads");
}

#[test]
fn datapath_xfs_io_uring() {
    run(Fs::Xfs, "io_uring");
}

#[test]
fn datapath_btrfs_threads() {
    run(Fs::Btrfs, "threads");
}

#[test]
fn datapath_btrfs_io_uring() {
    run(Fs::Btrfs, "io_uring");
}

/// The WAN figure of issue #19: a dense disk, a snapshot, random 4 KiB
/// writes (one in four of 8 KiB) of random bytes, a second snapshot, and
/// the incremental stream between them as a client that sends no `exact=`
/// gets it (`[diff] exact` default `auto`: refined on OCFS2 only), then
/// with `exact=false` and `exact=true`. Each is applied to a copy of the
/// older snapshot and must give the newer one. The bytes a stream sends
/// before compression are the payloads of its data records, counted by
/// [`apply`] (zero records carry none). The default stream must carry at
/// most `bound` times the bytes of the 4 KiB blocks that differ;
/// `coe_exact_bytes_saved_total` grows by what refinement took out of each
/// refined stream. Returns (changed, default, unrefined, refined) bytes.
pub(crate) fn incremental_after_random_4k_writes(fs: Fs, bound: f64) -> (u64, u64, u64, u64) {
    const DENSE: u64 = 8 << 20;
    let scratch = fs.scratch("datapath-random-4k");
    let (repo, disk) = repo_and_disk(&scratch);
    std::fs::write(&disk, pattern(DENSE as usize, 7)).unwrap();
    let (_pki, ex, token) = start(&repo, &disk, "threads");
    let snaps = format!("/api/v1/vms/{VM}/snapshots");
    let create = || ex.create_snapshot(VM, &token);
    let (snap1, name, _) = create();
    let v1 = std::fs::read(&disk).unwrap();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut rng = fastrand::Rng::with_seed(0x4b_5eed);
        for _ in 0..128 {
            let blocks = if rng.u8(0..4) == 0 { 2 } else { 1 };
            let at = 4096 * rng.u64(0..DENSE / 4096 - blocks + 1);
            let mut buf = vec![0u8; 4096 * blocks as usize];
            rng.fill(&mut buf);
            f.write_all_at(&buf, at).unwrap();
        }
        f.sync_all().unwrap();
    }
    let (snap2, _, _) = create();
    let v2 = std::fs::read(&disk).unwrap();
    let changed = v1
        .chunks(4096)
        .zip(v2.chunks(4096))
        .filter(|(a, b)| a != b)
        .count() as u64
        * 4096;
    let metric = |name: &str| ex.metric(&token, name);
    let stream = |exact: &str| {
        let saved = metric("coe_exact_bytes_saved_total");
        let a = get(
            &ex,
            &format!("{snaps}/{snap2}/disks/{name}/incremental?compareTo={snap1}{exact}"),
            &token,
            &[],
        );
        assert_eq!(a.status, 200, "{}", a.text());
        let mut copy = v1.clone();
        let (_, data) = apply(&a.body, &mut copy);
        assert!(copy == v2, "snapshot 1 + stream{exact} != snapshot 2");
        (data, metric("coe_exact_bytes_saved_total") - saved)
    };
    let (default, _) = stream("");
    let (unrefined, not_saved) = stream("&exact=false");
    let (refined, saved) = stream("&exact=true");
    assert_eq!(not_saved, 0, "exact=false refined nothing");
    assert_eq!(
        saved,
        unrefined - refined,
        "coe_exact_bytes_saved_total grows by what refinement took out"
    );
    let ratio = |b: u64| b as f64 / changed as f64;
    println!(
        "incremental after random 4 KiB writes on {fs:?}: {changed} bytes of changed 4 KiB \
         blocks; data records carry {default} bytes by default ({:.3}x), {unrefined} with \
         exact=false ({:.3}x), {refined} with exact=true ({:.3}x)",
        ratio(default),
        ratio(unrefined),
        ratio(refined)
    );
    assert!(refined >= changed, "a refined stream misses changed blocks");
    assert!(
        ratio(default) <= bound,
        "the default stream carries {default} bytes for {changed} changed: {:.3}x > {bound}x",
        ratio(default)
    );
    (changed, default, unrefined, refined)
}

/// On XFS the maps are exact already: the default (not refined there) is
/// within block rounding, refinement finds nothing more to take out.
#[test]
fn incremental_after_random_4k_writes_xfs() {
    let (changed, default, unrefined, refined) = incremental_after_random_4k_writes(Fs::Xfs, 1.1);
    assert_eq!(default, unrefined, "auto does not refine on XFS");
    assert!(refined <= unrefined);
    assert!(changed > 0);
}

/// A refinement stops when its client goes away (#19): a 384 MiB disk
/// rewritten with its own bytes (every block moves, none changes: 384 MiB
/// of candidates to read from both snapshots), a diff asked with
/// `exact=true` over a connection closed once the refinement runs
/// (`coe_exact_refining`). The
/// refinement ends as cancelled (`coe_exact_cancelled_total`) and never
/// completes (`coe_exact_diffs_total` unchanged); the same diff asked and
/// waited for then completes, with nothing left to copy.
#[test]
fn refinement_stops_when_its_client_goes_away_xfs() {
    const BIG: u64 = 384 << 20;
    let scratch = Fs::Xfs.scratch("datapath-cancel");
    let (repo, disk) = repo_and_disk(&scratch);
    let fill = |path: &Path| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap();
        let block = vec![0x5au8; 1 << 20];
        for i in 0..BIG >> 20 {
            f.write_all_at(&block, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    };
    fill(&disk);
    let (_pki, ex, token) = start(&repo, &disk, "threads");
    let snaps = format!("/api/v1/vms/{VM}/snapshots");
    let create = || {
        let a = ex.request("POST", &snaps, Some(&token), "");
        assert_eq!(a.status, 200, "create: {}\n{}", a.text(), ex.log());
        a.json()["id"].as_str().unwrap().to_owned()
    };
    let snap1 = create();
    fill(&disk);
    let snap2 = create();
    let metric = |name: &str| ex.metric(&token, name);
    let (diffs, cancelled) = (
        metric("coe_exact_diffs_total"),
        metric("coe_exact_cancelled_total"),
    );
    let diff = format!("{snaps}/{snap2}?compareTo={snap1}&exact=true");
    {
        let mut tls = ex.connect();
        tls.write_all(&http_request("GET", &diff, Some(&token), &[], ""))
            .unwrap();
        tls.flush().unwrap();
        // Closed once the refinement runs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while metric("coe_exact_refining") == 0 {
            assert!(
                metric("coe_exact_diffs_total") == diffs,
                "the refinement completed before it was seen running: make the disk bigger"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the refinement did not start within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while metric("coe_exact_cancelled_total") == cancelled {
        assert!(
            std::time::Instant::now() < deadline,
            "the refinement was not cancelled within 120 s (diffs {} -> {})",
            diffs,
            metric("coe_exact_diffs_total")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        metric("coe_exact_diffs_total"),
        diffs,
        "the cancelled refinement completed"
    );
    let a = get(&ex, &diff, &token, &[]);
    assert_eq!(a.status, 200, "{}", a.text());
    let chunks = a.json()["disks"][0]["chunks"].as_array().unwrap().len();
    assert_eq!(chunks, 0, "the rewritten disk has nothing to copy");
    assert_eq!(metric("coe_exact_diffs_total"), diffs + 1);
}
