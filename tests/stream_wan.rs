//! The incremental stream's format version 2 (issue #14) through the real
//! binary over TLS, on XFS and btrfs: zero blocks kept sparse, zstd
//! records, shards, and resumption with `from` after a cut at a random
//! point giving a replica identical (`cmp`) to the snapshot. Also that a
//! client asking nothing (python-ovmexporterclient) gets format version 1
//! byte for byte, and that `Accept-Encoding: zstd` changes nothing anywhere.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use bytes::Bytes;
use coriolis_ovm_exporter::wire::stream::{self, Decoder, Event, StreamHeader};

use crate::common::{
    exporter, http_request, Answer, Exporter, Fs, Options, Pki, Scratch, LOCAL_PASS, LOCAL_USER,
};

/// 12 MiB and a bit: several 1 MiB record pieces, an unaligned tail.
const SIZE: u64 = (12 << 20) + 5_000;
const VM: &str = "vm-wan-01";

/// `io`: extra `[io]` settings (empty: the defaults).
fn config(pki: &Pki, dir: &Scratch, port: u16, repo: &Path, disk: &Path, io: &str) -> String {
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    let mut c = Exporter::config(pki, dir, port, &o);
    c += &format!(
        "\n[inventory]\nsource = \"static\"\novs_agent_db_dir = \"/nonexistent/db\"\n\
         check_mounted = false\n\n[[inventory.repositories]]\nid = \"repo\"\n\
         mount_point = {repo:?}\n\n[[inventory.vms]]\nname = {VM:?}\n\
         disks = [ {{ path = {disk:?}, device_name = \"xvda\" }} ]\n\n[io]\n{io}\n"
    );
    c
}

fn start(pki: &Pki, repo: &Path, disk: &Path, io: &str) -> Exporter {
    Exporter::start_with(pki, 0o600, |dir, port| {
        config(pki, dir, port, repo, disk, io)
    })
}

/// The exporter with `COE_FAULT=io-read-eio`: the first disk read at or
/// past 8 MiB fails (EIO), once, and aborts the body it was for.
fn start_faulty(pki: &Pki, repo: &Path, disk: &Path) -> Exporter {
    Exporter::start_with_env(pki, 0o600, &[("COE_FAULT", "io-read-eio")], |dir, port| {
        config(pki, dir, port, repo, disk, "")
    })
}

fn get(ex: &Exporter, path: &str, token: &str, headers: &[(&str, &str)]) -> Answer {
    ex.raw(&http_request("GET", path, Some(token), headers, ""))
}

fn random(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Text that compresses about 4:1 with zstd, as file systems full of
/// binaries and logs do.
fn texty(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"lib", b"usr ", b"share/", b"0x7f45 ", b"ELF", b"\n", b"config=", b"true ",
    ];
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(WORDS[rng.usize(..WORDS.len())]);
    }
    v.truncate(len);
    v
}

fn punch(f: &File, off: u64, len: u64) {
    rustix::fs::fallocate(
        f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        off,
        len,
    )
    .unwrap();
}

/// A replica being written from stream bodies, as a client does: data
/// written, zero records punched (so the replica stays sparse).
struct Replica {
    file: File,
    /// Where a resumed body starts: the end of the last record applied whole.
    resume_at: u64,
    header: Option<StreamHeader>,
}

impl Replica {
    fn new(path: &Path) -> Replica {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Replica {
            file,
            resume_at: 0,
            header: None,
        }
    }

    /// Applies `body`; `Ok` when it decoded to its end record, else the
    /// decoder's complaint (a cut body).
    fn apply(&mut self, body: &[u8]) -> Result<(), stream::StreamError> {
        let mut d = Decoder::new();
        for piece in body.chunks(65_537) {
            let mut input = Bytes::copy_from_slice(piece);
            while let Some(ev) = d.decode(&mut input)? {
                match ev {
                    Event::Header(h) => {
                        self.file.set_len(h.disk_size).unwrap();
                        self.resume_at = h.start;
                        self.header = Some(h);
                    }
                    Event::Zero { offset, len } => {
                        punch(&self.file, offset, len);
                        self.resume_at = offset + len;
                    }
                    Event::Data { offset, bytes } => {
                        self.file.write_all_at(&bytes, offset).unwrap()
                    }
                    Event::DataEnd { offset, len } => self.resume_at = offset + len,
                    Event::DataStart { .. } | Event::End { .. } => {}
                }
            }
        }
        d.finish()
    }
}

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {at}", a.display(), b.display());
    }
}

/// The records of a version 2 body: between its header and end record.
fn records(body: &[u8]) -> &[u8] {
    assert_eq!(&body[8..10], &stream::VERSION_2.to_le_bytes());
    &body[stream::HEADER_LEN_2..body.len() - stream::RECORD_LEN]
}

/// The incremental at `url` (a query included) cut at random points and
/// resumed with `from`: the rest is the uninterrupted stream's records, bit
/// for bit, and the replica (a copy of snapshot 1 at `path1`) ends
/// identical to snapshot 2 (`path2`). Then three shards of it: contiguous
/// spans, each applied on its own, together snapshot 2.
fn resume_and_shards(
    ex: &Exporter,
    token: &str,
    scratch: &Scratch,
    url: &str,
    path1: &Path,
    path2: &Path,
    rng: &mut fastrand::Rng,
) {
    let whole = get(ex, url, token, &[]);
    assert_eq!(whole.status, 200, "{url}: {}", whole.text());
    for cut in 0..3 {
        let at = rng.usize(stream::HEADER_LEN_2..whole.body.len() - 1);
        let replica = scratch.path(&format!("resume-{cut}.img"));
        std::fs::copy(path1, &replica).unwrap();
        let mut r = Replica::new(&replica);
        assert!(
            r.apply(&whole.body[..at]).is_err(),
            "a cut body is not complete"
        );
        let from = r.resume_at;
        let rest = get(ex, &format!("{url}&from={from}"), token, &[]);
        assert_eq!(rest.status, 200);
        let tail = records(&rest.body);
        let all = records(&whole.body);
        assert!(
            all.ends_with(tail),
            "{url}: cut at byte {at}, resumed at {from}: not the rest of the stream"
        );
        r.apply(&rest.body).unwrap();
        assert_ne!(r.header.unwrap().flags & stream::FLAG_RESUMED, 0);
        same_file(&replica, path2);
    }
    let replica = scratch.path("shards.img");
    std::fs::copy(path1, &replica).unwrap();
    let mut r = Replica::new(&replica);
    let mut next = 0;
    for i in 0..3 {
        let a = get(ex, &format!("{url}&shard={i}&shards=3"), token, &[]);
        assert_eq!(a.status, 200, "{}", a.text());
        r.apply(&a.body).unwrap();
        let h = r.header.unwrap();
        assert_eq!((h.shard, h.shards, h.start), (i, 3, next));
        next = h.end;
    }
    assert_eq!(next, SIZE);
    same_file(&replica, path2);
}

fn run(fs: Fs, io: &str) {
    let scratch = fs.scratch("stream-wan");
    let repo = scratch.path("repo");
    let disk = repo.join("VirtualDisks/disk01.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    let mut rng = fastrand::Rng::with_seed(14);
    {
        let f = File::create(&disk).unwrap();
        f.set_len(SIZE).unwrap();
        f.write_all_at(&random(&mut rng, 3 << 20), 0).unwrap();
        f.write_all_at(&texty(&mut rng, 4 << 20), 4 << 20).unwrap();
        // Written zeros: allocated, yet no data to send.
        f.write_all_at(&vec![0u8; 1 << 20], 9 << 20).unwrap();
        f.write_all_at(&random(&mut rng, 5_000), SIZE - 5_000)
            .unwrap();
        f.sync_all().unwrap();
    }
    let pki = Pki::new();
    let ex = start(&pki, &repo, &disk, io);
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    let snaps = format!("/api/v1/vms/{VM}/snapshots");
    let create = || ex.create_snapshot(VM, &token);
    let (snap1, name, path1) = create();
    // The change set: random and text writes, zeros written over data,
    // a punched hole, a write into a hole.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for off in [4096u64, (2 << 20) + 8192, 5 << 20] {
            f.write_all_at(&random(&mut rng, 20_000), off).unwrap();
        }
        f.write_all_at(&texty(&mut rng, 600_000), (6 << 20) + 300)
            .unwrap();
        f.write_all_at(&vec![0u8; 256 << 10], 1 << 20).unwrap();
        f.write_all_at(&random(&mut rng, 70_000), 11 << 20).unwrap();
        f.sync_all().unwrap();
        punch(&f, 7 << 20, 1 << 20);
    }
    let (snap2, _, path2) = create();
    let inc = |q: &str| format!("{snaps}/{snap2}/disks/{name}/incremental{q}");

    // A client that asks nothing gets format version 1 with its length;
    // `version=1` is the same bytes; `Accept-Encoding: zstd` changes
    // nothing, here and on the plain disk GET.
    let q = format!("?compareTo={snap1}");
    let v1 = get(&ex, &inc(&q), &token, &[]);
    assert_eq!(v1.status, 200, "{}", v1.text());
    assert_eq!(&v1.body[8..10], &1u16.to_le_bytes());
    assert_eq!(
        v1.header("content-length"),
        Some(v1.body.len().to_string().as_str())
    );
    let v1_again = get(&ex, &inc(&format!("{q}&version=1")), &token, &[]);
    assert!(v1_again.body == v1.body);
    let zstd_habit = get(&ex, &inc(&q), &token, &[("Accept-Encoding", "zstd, gzip")]);
    assert!(zstd_habit.body == v1.body);
    assert_eq!(zstd_habit.header("content-encoding"), None);
    let disk_url = format!("{snaps}/{snap2}/disks/{name}");
    let plain = get(&ex, &disk_url, &token, &[("Accept-Encoding", "zstd")]);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert!(plain.body == std::fs::read(&path2).unwrap());

    // Bad parameters: 400 with the error body.
    for bad in [
        "?compress=gzip",
        "?compress=zstd&level=99",
        "?level=3",
        "?shard=2&shards=2",
        "?shard=0",
        "?shards=65&shard=0",
        "?version=3",
        "?version=1&compress=zstd",
        "?from=x",
    ] {
        get(&ex, &inc(bad), &token, &[]).assert_error(400, "Bad Request");
    }

    // A full copy in version 2 with zstd onto an empty sparse file: the
    // snapshot's bytes, fewer bytes on the wire than data, and the zeros the
    // guest wrote are not allocated in the replica.
    let full = get(&ex, &inc("?compress=zstd"), &token, &[]);
    assert_eq!(full.status, 200, "{}", full.text());
    assert_eq!(full.header("content-length"), None, "chunked");
    let fresh = scratch.path("fresh.img");
    File::create(&fresh).unwrap();
    let mut r = Replica::new(&fresh);
    r.apply(&full.body).unwrap();
    let h = r.header.unwrap();
    assert_eq!(h.flags & stream::FLAG_ZSTD, stream::FLAG_ZSTD);
    same_file(&fresh, &path2);
    let (fresh_blocks, snap_blocks) = (
        std::fs::metadata(&fresh).unwrap().blocks(),
        std::fs::metadata(&path2).unwrap().blocks(),
    );
    assert!(
        fresh_blocks * 512 + (1 << 20) <= snap_blocks * 512,
        "replica allocates {} bytes, the snapshot {}: the written zeros were not skipped",
        fresh_blocks * 512,
        snap_blocks * 512
    );
    let raw = get(&ex, &inc("?version=2"), &token, &[]);
    assert_eq!(raw.status, 200, "{}", raw.text());
    let fresh_raw = scratch.path("fresh-raw.img");
    File::create(&fresh_raw).unwrap();
    Replica::new(&fresh_raw).apply(&raw.body).unwrap();
    same_file(&fresh_raw, &path2);
    assert!(
        full.body.len() * 10 < raw.body.len() * 8,
        "zstd sent {} bytes, raw {}",
        full.body.len(),
        raw.body.len()
    );

    // The incremental cut, resumed and sharded, with zstd records and with
    // raw ones (their data passed on in the io core's buffers).
    for q2 in [
        format!("?compareTo={snap1}&compress=zstd&level=1"),
        format!("?compareTo={snap1}&version=2"),
    ] {
        resume_and_shards(&ex, &token, &scratch, &inc(&q2), &path1, &path2, &mut rng);
    }

    // The whole-disk digest, recomputed here by the documented
    // construction from the snapshot file (hole blocks included).
    let bytes = std::fs::read(&path2).unwrap();
    let block = 1u64 << 20;
    for alg in ["blake3", "sha256"] {
        let h = |b: &[u8]| -> Vec<u8> {
            if alg == "blake3" {
                blake3::hash(b).as_bytes().to_vec()
            } else {
                use sha2::Digest;
                sha2::Sha256::digest(b).to_vec()
            }
        };
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let a = get(
            &ex,
            &format!("{disk_url}/checksums?blockSize={block}&algorithm={alg}"),
            &token,
            &[],
        );
        assert_eq!(a.status, 200, "{}", a.text());
        let v = a.json();
        assert_eq!(v["algorithm"], alg);
        let blocks: Vec<Vec<u8>> = bytes.chunks(block as usize).map(h).collect();
        let listed: Vec<String> = v["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(listed, blocks.iter().map(|b| hex(b)).collect::<Vec<_>>());
        let mut input = b"COE-DISK-DIGEST\0".to_vec();
        input.extend_from_slice(&SIZE.to_le_bytes());
        input.extend_from_slice(&block.to_le_bytes());
        for b in &blocks {
            input.extend_from_slice(b);
        }
        assert_eq!(v["digest"], hex(&h(&input)), "{alg}");
    }
    get(
        &ex,
        &format!("{disk_url}/checksums?algorithm=md5"),
        &token,
        &[],
    )
    .assert_error(400, "Bad Request");
    drop(ex);
}

/// The client's stream transfer broken by a failed disk read on the server
/// (the body aborted past 8 MiB): it resumes with `from` and the replica is
/// the snapshot, byte for byte.
fn client_resumes(fs: Fs) {
    let scratch = fs.scratch("stream-wan-client");
    let repo = scratch.path("repo");
    let disk = repo.join("VirtualDisks/disk01.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    let mut rng = fastrand::Rng::with_seed(41);
    {
        let f = File::create(&disk).unwrap();
        f.set_len(SIZE).unwrap();
        f.write_all_at(&random(&mut rng, 11 << 20), 0).unwrap();
        f.write_all_at(&texty(&mut rng, 5_000), SIZE - 5_000)
            .unwrap();
        f.sync_all().unwrap();
    }
    let pki = Pki::new();
    let ex = start_faulty(&pki, &repo, &disk);
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    let a = ex.request(
        "POST",
        &format!("/api/v1/vms/{VM}/snapshots"),
        Some(&token),
        "",
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    let snap = v["id"].as_str().unwrap().to_owned();
    let name = v["disks"][0]["name"].as_str().unwrap().to_owned();
    let path = std::path::PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    let out = scratch.path("out");
    let run = std::process::Command::new(exporter::BIN)
        .args(["client", "download", VM, &snap, "--out"])
        .arg(&out)
        .args([
            "--transport",
            "stream",
            "--jobs",
            "1",
            "--compress",
            "zstd",
            "--json",
        ])
        .env("COE_URL", format!("https://127.0.0.1:{}", ex.port))
        .env("COE_USER", LOCAL_USER)
        .env("COE_PASSWORD", LOCAL_PASS)
        .env("COE_CA_FILE", pki.path("ca.pem"))
        .env("XDG_CACHE_HOME", scratch.path("cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}\n{}", ex.log());
    assert!(
        stderr.contains("resuming the stream at"),
        "the stream did not break and resume: {stderr}\n{}",
        ex.log()
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["disks"][0]["transport"], "stream", "{report}");
    same_file(&out.join(&name), &path);
}

#[test]
fn stream_v2_client_resumes_a_broken_stream_xfs() {
    client_resumes(Fs::Xfs);
}

#[test]
fn stream_v2_client_resumes_a_broken_stream_btrfs() {
    client_resumes(Fs::Btrfs);
}

#[test]
fn stream_v2_resume_zero_blocks_zstd_shards_xfs() {
    run(Fs::Xfs, "");
}

#[test]
fn stream_v2_resume_zero_blocks_zstd_shards_btrfs() {
    run(Fs::Btrfs, "");
}

/// One 64 KiB read-ahead buffer per stream: a raw record piece (1 MiB) spans
/// many of the io core's buffers, so the producer must not hold them while
/// it waits for the next read (it would wait forever).
#[test]
fn stream_v2_with_one_small_read_ahead_buffer_xfs() {
    run(Fs::Xfs, "read_ahead = 1\nbuffer_size = 65536");
}
