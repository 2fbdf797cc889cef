//! End to end: the real binary serving a repository on a real reflink
//! filesystem (XFS and btrfs) over real TLS (a certificate made here with
//! rcgen), a local user, and the real client binary as a separate process:
//! full copy, disk changes (writes, hole punches, growth, shrinking),
//! incremental onto the copy by the stream or by ranges, an interrupted
//! download resumed (client killed, or server lost), `--verify` (and
//! against a server without the checksums endpoint), exit codes, the token
//! cache; and the demo command started, used and stopped.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::server::{Server, Setup, USER};
use crate::common::{free_port, write_vm_cfg, Fs, Scratch};

const BIN: &str = env!("CARGO_BIN_EXE_coriolis-ovm-exporter");
const VM: &str = "0004fb00000600000000000000e2e001";
const DISK_A: &str = "0004fb00001200000000000000e2e0aa.img";
const DISK_B: &str = "0004fb00001200000000000000e2e0bb.img";
/// Apparent size of the test disks.
const DISK_SIZE: u64 = 48 << 20;
/// How long a server or the demo may take to answer health (debug build,
/// two busy cores).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An HTTPS front of a [`Server`] standing in for a server without the
/// checksums endpoint (the old service): every `.../checksums` path answers
/// 404 with the API's error body, everything else is passed through, one
/// request per connection (`Connection: close`). Counts the 404s it made.
struct NoChecksums {
    url: String,
    hidden: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl NoChecksums {
    fn start(server: &Server, dir: &Path) -> NoChecksums {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use std::io::{Read, Write};
        use std::sync::Arc;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("srv-pub.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("srv-key.pem")).unwrap();
        let front = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs.clone(), key)
                .unwrap(),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certs[0].clone()).unwrap();
        let back = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let upstream = server.url.trim_start_matches("https://").to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let hidden = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = hidden.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (front, back, upstream, count) =
                    (front.clone(), back.clone(), upstream.clone(), count.clone());
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(START_TIMEOUT));
                    let conn = rustls::ServerConnection::new(front).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let Some(head) = crate::common::manager::read_head(&mut tls) else {
                        return;
                    };
                    let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                    if path.split('?').next().unwrap().ends_with("/checksums")
                        || path.split('?').next().unwrap().ends_with("/checksums/")
                    {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = r#"{"error":"Not Found","details":"no such route"}"#;
                        let _ = write!(
                            tls,
                            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    } else {
                        let length = crate::common::http::content_length(&head).unwrap_or(0);
                        let mut body = vec![0u8; length];
                        if tls.read_exact(&mut body).is_err() {
                            return;
                        }
                        let mut request: String = head
                            .trim_end()
                            .lines()
                            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                            .map(|l| format!("{l}\r\n"))
                            .collect();
                        request += "Connection: close\r\n\r\n";
                        let tcp = std::net::TcpStream::connect(&upstream).unwrap();
                        let name = ServerName::try_from("127.0.0.1").unwrap();
                        let conn = rustls::ClientConnection::new(back, name).unwrap();
                        let mut up = rustls::StreamOwned::new(conn, tcp);
                        if up.write_all(request.as_bytes()).is_err() || up.write_all(&body).is_err()
                        {
                            return;
                        }
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            match up.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if tls.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        NoChecksums { url, hidden }
    }

    fn hidden(&self) -> usize {
        self.hidden.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The client binary with a given environment.
pub(crate) struct Client {
    env: HashMap<&'static str, String>,
    /// Strings no output may contain (the password, the token).
    secrets: Vec<String>,
}

impl Client {
    pub(crate) fn new(server: &Server, cache: &Path) -> Client {
        let mut env = HashMap::new();
        env.insert("COE_URL", server.url.clone());
        env.insert("COE_USER", USER.to_owned());
        env.insert("COE_PASSWORD", server.password.clone());
        env.insert("COE_CA_FILE", server.ca.display().to_string());
        env.insert("XDG_CACHE_HOME", cache.display().to_string());
        Client {
            env,
            secrets: vec![server.password.clone()],
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("client").args(args);
        for k in [
            "COE_URL",
            "COE_USER",
            "COE_PASSWORD",
            "COE_CA_FILE",
            "XDG_CACHE_HOME",
        ] {
            c.env_remove(k);
        }
        c.envs(&self.env);
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for s in &self.secrets {
            assert!(
                !text.contains(s.as_str()),
                "a secret was printed by {args:?}"
            );
        }
        out
    }

    /// Runs and expects success; the JSON on stdout.
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "client {args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn code(&self, args: &[&str]) -> i32 {
        self.run(args).status.code().unwrap_or(-1)
    }
}

/// Writes `len` random bytes at `off`.
fn write_random(f: &fs::File, rng: &mut fastrand::Rng, off: u64, len: usize) {
    let mut b = vec![0u8; len];
    rng.fill(&mut b);
    f.write_all_at(&b, off).unwrap();
}

fn punch(f: &fs::File, off: u64, len: u64) {
    rustix::fs::fallocate(
        f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        off,
        len,
    )
    .unwrap();
}

/// A sample repository: one VM with two sparse disks holding some data.
fn make_repo(repo: &Path, rng: &mut fastrand::Rng) {
    make_repo_sized(repo, rng, DISK_SIZE, true);
}

fn make_repo_sized(repo: &Path, rng: &mut fastrand::Rng, size: u64, long_extent: bool) {
    let disks = repo.join("VirtualDisks");
    fs::create_dir_all(&disks).unwrap();
    for name in [DISK_A, DISK_B] {
        let f = fs::File::create(disks.join(name)).unwrap();
        f.set_len(size).unwrap();
        // A few extents of data, the rest holes; one all-zero written
        // extent (it must read back as zeros, allocated or not).
        for _ in 0..5 {
            let off = rng.u64(0..size - (2 << 20)) & !4095;
            let len = rng.usize(64 << 10..if long_extent { 2 << 20 } else { 512 << 10 });
            write_random(&f, rng, off, len);
        }
        f.write_all_at(&vec![0u8; 256 << 10], size / 6 * 5).unwrap();
        // Data at the start, which the changes punch on disk B, and one
        // long extent: at the interrupted download's rate limit it takes
        // seconds, so the interruption always lands in the middle.
        write_random(&f, rng, 0, 1 << 20);
        if long_extent {
            write_random(&f, rng, 8 << 20, 8 << 20);
        }
        f.sync_all().unwrap();
    }
    write_vm_cfg(
        repo,
        VM,
        "0004fb00-0006-0000-0000-00000000e001",
        "e2e",
        &[&disks.join(DISK_A), &disks.join(DISK_B)],
    );
}

/// The repository of [`make_repo`] at a sixth of the size (8 MiB disks,
/// about 1.5 MiB of data each), for the slow TCG guests.
fn make_small_repo(repo: &Path, rng: &mut fastrand::Rng) {
    make_repo_sized(repo, rng, SMALL_DISK_SIZE, false);
}

const SMALL_DISK_SIZE: u64 = 8 << 20;

/// How much [`change_disks`] changes: random writes and punched holes of
/// disk A up to a length, data appended past its end, a hole punched at
/// the start of disk B, which shrinks.
struct Changes {
    /// The disks' size.
    size: u64,
    writes: usize,
    max_write: usize,
    punches: usize,
    max_punch: u64,
    appended: usize,
    b_punched: u64,
}

const CHANGES: Changes = Changes {
    size: DISK_SIZE,
    writes: 20,
    max_write: 256 << 10,
    punches: 5,
    max_punch: 1 << 20,
    appended: 1 << 20,
    b_punched: 4 << 20,
};

/// [`CHANGES`] for the small disks.
const SMALL_CHANGES: Changes = Changes {
    size: SMALL_DISK_SIZE,
    writes: 10,
    max_write: 64 << 10,
    punches: 3,
    max_punch: 256 << 10,
    appended: 100_000,
    b_punched: 1 << 20,
};

/// Changes both disks: writes in data and holes, punched holes, disk A
/// grows (data appended past the end), disk B shrinks.
fn change_disks(repo: &Path, rng: &mut fastrand::Rng, c: &Changes) {
    let a = fs::OpenOptions::new()
        .write(true)
        .open(repo.join("VirtualDisks").join(DISK_A))
        .unwrap();
    for _ in 0..c.writes {
        let off = rng.u64(0..c.size - c.max_write as u64);
        let len = rng.usize(1..c.max_write);
        write_random(&a, rng, off, len);
    }
    for _ in 0..c.punches {
        punch(
            &a,
            rng.u64(0..c.size - c.max_punch),
            rng.u64(1..c.max_punch),
        );
    }
    write_random(&a, rng, c.size + (512 << 10), c.appended);
    a.sync_all().unwrap();
    let b = fs::OpenOptions::new()
        .write(true)
        .open(repo.join("VirtualDisks").join(DISK_B))
        .unwrap();
    punch(&b, 0, c.b_punched);
    write_random(&b, rng, 3 << 20, 5000);
    b.set_len(c.size - (1 << 20) - 123).unwrap();
    b.sync_all().unwrap();
}

fn snapshot_paths(snap: &Value) -> HashMap<String, PathBuf> {
    snap["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                PathBuf::from(d["path"].as_str().unwrap()),
            )
        })
        .collect()
}

/// Every replica in `out` equals its snapshot file byte for byte, and is
/// sparse.
fn assert_replicas(out: &Path, snap: &Value) {
    for (name, path) in snapshot_paths(snap) {
        let want = fs::read(&path).unwrap();
        assert_replica(&name, &out.join(&name), &want);
    }
}

/// The replica at `path` holds `want` byte for byte, is private, and holds
/// no block of zeros (README: holes and all-zero 4 KiB blocks are not
/// written, or are punched when a replica is updated).
fn assert_replica(name: &str, path: &Path, want: &[u8]) {
    let got = fs::read(path).unwrap();
    assert_eq!(got.len(), want.len(), "{name}: size");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{name}: replica differs from the snapshot first at byte {i}");
    }
    let f = fs::File::open(path).unwrap();
    let m = f.metadata().unwrap();
    assert_eq!(m.mode() & 0o077, 0, "{name}: replica mode {:o}", m.mode());
    let mut zero_blocks = 0;
    for (start, end) in data_ranges(&f) {
        for block in start / 4096..end.div_ceil(4096) {
            let b = (block * 4096) as usize;
            let e = (b + 4096).min(want.len());
            if b < e && want[b..e].iter().all(|&x| x == 0) {
                zero_blocks += 1;
            }
        }
    }
    assert_eq!(
        zero_blocks,
        0,
        "{name}: {zero_blocks} all-zero 4 KiB blocks of the replica are allocated ({} bytes \
         allocated of {})",
        m.blocks() * 512,
        m.len()
    );
}

/// The byte ranges of `f` the filesystem holds data for (SEEK_DATA and
/// SEEK_HOLE: written or unwritten extents, not holes).
fn data_ranges(f: &fs::File) -> Vec<(u64, u64)> {
    let len = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let end = rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(start)).unwrap();
        out.push((start, end));
        pos = end;
    }
    out
}

fn state_file(out: &Path, disk: &str) -> PathBuf {
    out.join(format!(".{disk}.coe-download.json"))
}

/// Starts a rate-limited download of disk A of `snap` into `out` (its
/// stderr to `stderr`) and waits until its state file records a first
/// range done, the download still running.
fn download_until_checkpoint(client: &Client, snap: &str, out: &Path, stderr: Stdio) -> Child {
    let out_s = out.display().to_string();
    let mut child = client
        .command(&[
            "download",
            VM,
            snap,
            "--out",
            &out_s,
            "--jobs",
            "1",
            "--limit-rate",
            "2M",
            "--disk",
            DISK_A,
            "--quiet",
        ])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let state = state_file(out, DISK_A);
    let t = Instant::now();
    let progressed = || {
        fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| !v["done"].as_array().unwrap().is_empty())
    };
    while !progressed() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the rate-limited download ended before its first checkpoint"
        );
        assert!(t.elapsed() < START_TIMEOUT, "no checkpoint written");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The core of the client story, sized for a TCG guest: a server with its
/// repository on `fs_kind` and its database, config and certificates on
/// local storage (the store refuses LMDB on OCFS2; an Oracle VM node keeps
/// it on its local disk), cloning with `extra_config` (e.g. OCFS2's own
/// ioctl); a full copy, the disks changed, an incremental by the stream
/// and one by ranges, each replica byte-identical to its snapshot.
pub(crate) fn full_and_incremental_on(fs_kind: Fs, extra_config: &str) {
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let scratch = fs_kind.scratch("e2e-core");
    let local = Scratch::temp("e2e-core-local");
    let mut rng = fastrand::Rng::with_seed(0xe2e1 + fs_kind as u64);
    let repo = scratch.path("repo");
    make_small_repo(&repo, &mut rng);
    step("repository made");
    let server = Server::start_with(
        &local.dir,
        &repo,
        &mut rng,
        Setup {
            extra: extra_config,
            ..Setup::default()
        },
    );
    step("server up");
    let client = Client::new(&server, &local.path("cache"));
    let s1 = client.json(&["snapshots", "create", VM]);
    let s1_id = s1["id"].as_str().unwrap().to_owned();
    step("snapshot 1");
    let out = local.path("replica");
    let out2 = local.path("replica-ranges");
    let (out_s, out2_s) = (out.display().to_string(), out2.display().to_string());
    for o in [&out_s, &out2_s] {
        let r = client.json(&["download", VM, &s1_id, "--out", o]);
        assert_eq!(r["disks"][0]["mode"], "full", "{r}");
    }
    assert_replicas(&out, &s1);
    assert_replicas(&out2, &s1);
    step("full copies");
    change_disks(&repo, &mut rng, &SMALL_CHANGES);
    let s2 = client.json(&["snapshots", "create", VM]);
    let s2_id = s2["id"].as_str().unwrap().to_owned();
    step("snapshot 2");
    let inc = client.json(&[
        "download",
        VM,
        &s2_id,
        "--out",
        &out_s,
        "--diff-from",
        &s1_id,
    ]);
    for d in inc["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "incremental", "{inc}");
        assert_eq!(d["transport"], "stream", "{inc}");
    }
    assert_replicas(&out, &s2);
    let by_ranges = client.json(&[
        "download",
        VM,
        &s2_id,
        "--out",
        &out2_s,
        "--diff-from",
        &s1_id,
        "--transport",
        "ranges",
    ]);
    assert_eq!(by_ranges["disks"][0]["mode"], "incremental", "{by_ranges}");
    assert_replicas(&out2, &s2);
    step("incrementals");
    for id in [&s1_id, &s2_id] {
        let out = client.run(&["snapshots", "delete", VM, id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        fs::read_dir(repo.join("CoriolisSnapshots"))
            .map(|d| {
                // The catalog's generation token stays (docs/catalog.md).
                d.filter(|e| e.as_ref().unwrap().file_name() != ".coriolis-generation")
                    .count()
            })
            .unwrap_or(0)
            == 0,
        "snapshot folders left after deleting every snapshot"
    );
    step("snapshots deleted");
}

/// The whole client story on `fs_kind`.
pub(crate) fn e2e_on(fs_kind: Fs) {
    let scratch = fs_kind.scratch("e2e");
    let mut rng = fastrand::Rng::with_seed(0xe2e0 + fs_kind as u64);
    let repo = scratch.path("repo");
    make_repo(&repo, &mut rng);
    let server = Server::start(&scratch.dir, &repo, &mut rng);
    let cache = scratch.path("cache");
    let mut client = Client::new(&server, &cache);

    // Login: the token is cached privately, reused, never printed.
    let login = client.json(&["login"]);
    assert_eq!(login["user"], USER);
    let tokens = cache.join("coriolis-ovm-exporter/tokens.json");
    let mode = fs::metadata(&tokens).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "token cache mode {mode:o}");
    let cached: Value = serde_json::from_slice(&fs::read(&tokens).unwrap()).unwrap();
    let token = cached["tokens"][&server.url]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!fs::read_to_string(&tokens)
        .unwrap()
        .contains(&server.password));
    client.secrets.push(token);
    // With the token cached, no password is needed.
    let mut no_pw = Client::new(&server, &cache);
    no_pw.env.remove("COE_PASSWORD");
    no_pw.secrets = client.secrets.clone();
    let vms = no_pw.json(&["vms", "list"]);
    assert_eq!(vms.as_array().unwrap().len(), 1);
    assert_eq!(vms[0]["name"], VM);
    assert_eq!(
        no_pw.json(&["vms", "show", VM])["disks"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A cached token the server refuses (another secret, say) is replaced
    // by a fresh login when the password is at hand; without it, exit 3.
    let stale_cache = scratch.path("stale-cache");
    let stale_dir = stale_cache.join("coriolis-ovm-exporter");
    fs::create_dir_all(&stale_dir).unwrap();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let forged = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"user":"{USER}","exp":{exp},"iss":"coriolis-ovm-exporter"}}"#
        )),
        b64("not the signature")
    );
    let stale_file =
        serde_json::json!({"tokens": {&server.url: {"user": USER, "token": forged, "exp": exp}}});
    fs::write(stale_dir.join("tokens.json"), stale_file.to_string()).unwrap();
    let mut stale = Client::new(&server, &stale_cache);
    stale.env.remove("COE_PASSWORD");
    assert_eq!(stale.code(&["vms", "list"]), 3);
    stale.env.insert("COE_PASSWORD", server.password.clone());
    assert_eq!(stale.json(&["vms", "list"]).as_array().unwrap().len(), 1);
    assert!(!fs::read_to_string(stale_dir.join("tokens.json"))
        .unwrap()
        .contains(&forged));

    // Exit codes.
    assert_eq!(
        client.code(&["vms", "show", "0004fb0000060000000000000000dead"]),
        4
    );
    let mut wrong = Client::new(&server, &scratch.path("other-cache"));
    wrong.env.insert("COE_PASSWORD", "not the password".into());
    assert_eq!(wrong.code(&["vms", "list"]), 3);
    wrong.env.remove("COE_PASSWORD");
    assert_eq!(wrong.code(&["vms", "list"]), 3);
    assert_eq!(client.code(&["snapshots", "purge", VM]), 2);
    assert_eq!(client.code(&["snapshots", "frobnicate"]), 2);
    let mut no_trust = Client::new(&server, &cache);
    no_trust.env.remove("COE_CA_FILE");
    assert_eq!(no_trust.code(&["vms", "list"]), 2);
    // A certificate that is not the server's is refused.
    let other = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    fs::write(scratch.path("other-ca.pem"), other.pem()).unwrap();
    no_trust.env.insert(
        "COE_CA_FILE",
        scratch.path("other-ca.pem").display().to_string(),
    );
    assert_eq!(no_trust.code(&["vms", "list"]), 1);

    // Snapshot 1 and a full copy.
    let s1 = client.json(&["snapshots", "create", VM]);
    let s1_id = s1["id"].as_str().unwrap().to_owned();
    let out = scratch.path("replica");
    let out_s = out.display().to_string();
    let r = client.json(&["download", VM, &s1_id, "--out", &out_s, "--jobs", "3"]);
    assert_eq!(r["disks"].as_array().unwrap().len(), 2);
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "full");
        assert_eq!(d["transport"], "ranges");
    }
    assert_replicas(&out, &s1);
    // Again: already complete, nothing fetched.
    let again = client.json(&["download", VM, &s1_id, "--out", &out_s]);
    assert_eq!(again["bytes"], 0);
    assert!(again["disks"][0]["up_to_date"].as_bool().unwrap());
    // A full copy through the stream (format 2: zstd records over 3
    // shards, zero blocks skipped) gives the same replicas.
    let out_z = scratch.path("replica-zstd");
    let out_z_s = out_z.display().to_string();
    let z = client.json(&[
        "download",
        VM,
        &s1_id,
        "--out",
        &out_z_s,
        "--transport",
        "stream",
        "--compress",
        "zstd",
        "--jobs",
        "3",
    ]);
    for d in z["disks"].as_array().unwrap() {
        assert_eq!(d["transport"], "stream", "{z}");
    }
    assert_replicas(&out_z, &s1);
    // A second copy, to apply the incremental by ranges too.
    let out2 = scratch.path("replica-ranges");
    let out2_s = out2.display().to_string();
    client.json(&["download", VM, &s1_id, "--out", &out2_s]);

    // Change the disks; snapshot 2; incremental onto the copies.
    change_disks(&repo, &mut rng, &CHANGES);
    let s2 = client.json(&["snapshots", "create", VM]);
    let s2_id = s2["id"].as_str().unwrap().to_owned();
    let allocated: u64 = s2["disks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["chunks"].as_array().unwrap().iter())
        .map(|c| c["length"].as_u64().unwrap())
        .sum();
    let inc = client.json(&[
        "download",
        VM,
        &s2_id,
        "--out",
        &out_s,
        "--diff-from",
        &s1_id,
    ]);
    // The server has the incremental stream: the default transport uses it.
    for d in inc["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "incremental");
        assert_eq!(d["transport"], "stream", "{inc}");
    }
    let fetched = inc["bytes"].as_u64().unwrap();
    assert!(
        fetched < allocated,
        "the incremental fetched {fetched} bytes, the whole snapshot holds {allocated}"
    );
    assert!(inc["disks"][1]["zeroed"].as_u64().unwrap() > 0, "{inc}");
    assert_replicas(&out, &s2);
    let by_ranges = client.json(&[
        "download",
        VM,
        &s2_id,
        "--out",
        &out2_s,
        "--diff-from",
        &s1_id,
        "--transport",
        "ranges",
    ]);
    assert_eq!(by_ranges["disks"][0]["transport"], "ranges");
    assert_replicas(&out2, &s2);
    // The replica is now of S2: applying S1→S2 again is a no-op, applying a
    // diff from S1 onto it for another snapshot is refused.
    let noop = client.json(&[
        "download",
        VM,
        &s2_id,
        "--out",
        &out_s,
        "--diff-from",
        &s1_id,
    ]);
    assert_eq!(noop["bytes"], 0);
    let s3 = client.json(&["snapshots", "create", VM]);
    let s3_id = s3["id"].as_str().unwrap().to_owned();
    let refused = client.run(&[
        "download",
        VM,
        &s3_id,
        "--out",
        &out_s,
        "--diff-from",
        &s1_id,
    ]);
    assert_eq!(
        refused.status.code(),
        Some(6),
        "a diff from S1 applied onto a replica of S2: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_replicas(&out, &s2);
    for d in [DISK_A, DISK_B] {
        let st: Value = serde_json::from_slice(&fs::read(state_file(&out, d)).unwrap()).unwrap();
        assert_eq!(st["snapshot"], s2_id.as_str(), "{d}: {st}");
        assert_eq!(st["complete"], true, "{d}: {st}");
    }
    client.json(&["snapshots", "delete", VM, &s3_id]);

    // An interrupted full copy of S2, resumed.
    let out3 = scratch.path("replica-resume");
    let out3_s = out3.display().to_string();
    let mut child = download_until_checkpoint(&client, &s2_id, &out3, Stdio::null());
    let state = state_file(&out3, DISK_A);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    child.wait().unwrap();
    let partial: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(partial["complete"], false);
    assert_eq!(partial["snapshot"], s2_id.as_str());
    // A partial copy of S2 is not a replica of S1: an incremental is refused.
    assert_eq!(
        client.code(&[
            "download",
            VM,
            &s2_id,
            "--out",
            &out3_s,
            "--diff-from",
            &s1_id,
            "--disk",
            DISK_A,
        ]),
        6
    );
    let resumed = client.json(&["download", VM, &s2_id, "--out", &out3_s, "--disk", DISK_A]);
    assert!(
        resumed["disks"][0]["resumed"].as_bool().unwrap(),
        "{resumed}"
    );
    assert_fetched_less_than_disk_a(&resumed, &s2);
    let want = fs::read(snapshot_paths(&s2)[DISK_A].clone()).unwrap();
    assert_replica("resumed copy", &out3.join(DISK_A), &want);

    // --verify against the server's checksums.
    let v = client.run(&["verify", VM, &s2_id, "--out", &out_s]);
    let stderr = String::from_utf8_lossy(&v.stderr).into_owned();
    {
        assert_eq!(v.status.code(), Some(0), "{stderr}");
        // One flipped byte is found, with exit status 5.
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(out.join(DISK_A))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 12345).unwrap();
        // The whole-disk digest agrees before the flip, not after.
        let d = client.json(&[
            "verify",
            VM,
            &s2_id,
            "--out",
            &out_s,
            "--verify-with",
            "blake3",
        ]);
        for disk in d["disks"].as_array().unwrap() {
            assert_eq!(disk["digest_match"], true, "{d}");
        }
        f.write_all_at(&[b[0] ^ 0xff], 12345).unwrap();
        assert_eq!(client.code(&["verify", VM, &s2_id, "--out", &out_s]), 5);
        assert_eq!(
            client.code(&[
                "verify",
                VM,
                &s2_id,
                "--out",
                &out_s,
                "--verify-with",
                "sha256"
            ]),
            5
        );
        let dl = client.run(&[
            "download", VM, &s2_id, "--out", &out2_s, "--verify", "--json",
        ]);
        assert_eq!(dl.status.code(), Some(0));
    }

    // A server without the checksums endpoint (the old service): --verify
    // cannot check, says so and exits 1; the rest of the API works through
    // the same front, so the 1 is the missing endpoint.
    let old = NoChecksums::start(&server, &scratch.dir);
    let mut via_old = Client::new(&server, &scratch.path("old-cache"));
    via_old.env.insert("COE_URL", old.url.clone());
    assert_eq!(via_old.json(&["vms", "list"]).as_array().unwrap().len(), 1);
    for args in [
        &["verify", VM, &s2_id, "--out", &out2_s][..],
        &["download", VM, &s2_id, "--out", &out2_s, "--verify"],
    ] {
        let before = old.hidden();
        let v = via_old.run(args);
        let stderr = String::from_utf8_lossy(&v.stderr).into_owned();
        assert_eq!(v.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("checksums"), "{args:?}: {stderr}");
        assert!(old.hidden() > before, "{args:?} never asked for checksums");
    }

    // Delete and purge.
    client.json(&["snapshots", "delete", VM, &s1_id]);
    let left = client.json(&["snapshots", "list", VM]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    client.json(&["snapshots", "purge", VM, "--yes"]);
    assert!(client
        .json(&["snapshots", "list", VM])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(client.code(&["logout"]), 0);
    assert!(!fs::read_to_string(&tokens).unwrap().contains(&server.url));
}

#[test]
fn client_copies_and_updates_replicas_on_xfs() {
    e2e_on(Fs::Xfs);
}

#[test]
fn client_copies_and_updates_replicas_on_btrfs() {
    e2e_on(Fs::Btrfs);
}

/// README: a rerun after a lost connection fetches only what is missing.
/// The server dies mid-download (every connection lost at once, nothing
/// answers the retries): the client gives up with exit 1, its state file
/// saying what it has; with the server back, the same command resumes.
#[test]
fn a_download_cut_by_a_lost_connection_resumes() {
    let scratch = Fs::Xfs.scratch("e2e-lost");
    let mut rng = fastrand::Rng::with_seed(0x1057);
    let repo = scratch.path("repo");
    make_repo(&repo, &mut rng);
    let mut server = Server::start(&scratch.dir, &repo, &mut rng);
    let client = Client::new(&server, &scratch.path("cache"));
    let snap = client.json(&["snapshots", "create", VM]);
    let id = snap["id"].as_str().unwrap().to_owned();
    let out = scratch.path("replica");
    let out_s = out.display().to_string();
    let mut child = download_until_checkpoint(&client, &id, &out, Stdio::piped());
    let state = state_file(&out, DISK_A);
    server.kill();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < START_TIMEOUT,
            "the client never gave up on a dead server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lost = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&lost.stderr).into_owned();
    assert_eq!(lost.status.code(), Some(1), "{stderr}");
    let partial: Value = serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
    assert_eq!(partial["complete"], false, "{partial}");
    assert!(!partial["done"].as_array().unwrap().is_empty(), "{partial}");

    server.restart();
    let resumed = client.json(&["download", VM, &id, "--out", &out_s, "--disk", DISK_A]);
    assert!(
        resumed["disks"][0]["resumed"].as_bool().unwrap(),
        "{resumed}"
    );
    assert_fetched_less_than_disk_a(&resumed, &snap);
    let want = fs::read(snapshot_paths(&snap)[DISK_A].clone()).unwrap();
    assert_replica("resumed copy", &out.join(DISK_A), &want);
}

/// The client's help, with COE_PASSWORD set, names the variable but never
/// shows its value; the value of a variable that is not secret (COE_URL) is
/// shown, so the check would see a password printed the same way.
#[test]
fn help_never_shows_the_password_from_the_environment() {
    let secret = "pw-from-the-environment-7f3a9c";
    let url = "https://help-test.invalid:5544";
    for args in [
        &["client", "--help"][..],
        &["client", "-h"],
        &["client", "download", "--help"],
        &["client", "vms", "list", "--help"],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env("COE_PASSWORD", secret)
            .env("COE_URL", url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("COE_PASSWORD"), "{args:?}:\n{text}");
        assert!(text.contains(url), "{args:?} hides every value:\n{text}");
        assert!(
            !text.contains(secret),
            "{args:?} shows the password:\n{text}"
        );
    }
}

#[test]
fn demo_serves_with_printed_credentials_and_cleans_up_on_sigterm() {
    demo_on(Fs::Xfs);
}

/// `demo --dir` on a folder of `fs`: it serves, keeps its database on local
/// storage, and removes everything it made on SIGTERM.
pub(crate) fn demo_on(fs: Fs) {
    let scratch = fs.scratch("demo");
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(&scratch.dir)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(fs::File::create(scratch.dir.with_extension("demo.log")).unwrap())
        .spawn()
        .unwrap();
    // The banner ends with the Ctrl-C line.
    let mut fields = HashMap::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some((k, v)) = line.split_once(": ") {
            fields.insert(k.to_owned(), v.to_owned());
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    let url = fields.get("url").expect("the demo printed no url").clone();
    assert_eq!(url, format!("https://127.0.0.1:{port}"));
    let ca = fields["ca-file"].clone();
    let cache = scratch.path("cache");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("client")
            .args(args)
            .env("COE_URL", &url)
            .env("COE_USER", &fields["user"])
            .env("COE_PASSWORD", &fields["password"])
            .env("COE_CA_FILE", &ca)
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap()
    };
    let t = Instant::now();
    while !run(&["health"]).status.success() {
        assert!(
            t.elapsed() < START_TIMEOUT,
            "the demo never answered health"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let login = run(&["login"]);
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let vms = run(&["vms", "list", "--json"]);
    let vms: Value = serde_json::from_slice(&vms.stdout).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 2, "{vms}");
    assert!(vms
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["snapshot_compatible"] == true));
    let made: Vec<_> = fs::read_dir(&scratch.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("coe-demo-"))
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    // Config and database are local, not in --dir.
    let config = PathBuf::from(&fields["config"]);
    let local = config.parent().unwrap().to_owned();
    assert!(!config.starts_with(&scratch.dir), "{}", config.display());
    assert!(local.join("exporter.db").exists(), "{}", local.display());

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < START_TIMEOUT,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    // Drain what the demo printed after the banner.
    for l in lines {
        let _ = l;
    }
    let left: Vec<_> = fs::read_dir(&scratch.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("coe-demo-"))
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
    assert!(!local.exists(), "the demo left {}", local.display());
    let _ = fs::remove_file(scratch.dir.with_extension("demo.log"));
}

/// Losing `db_file` loses no snapshot: with the service stopped,
/// `rebuild-db -config` adopts every complete snapshot folder back from its
/// manifest, and the restarted service lists and diffs them as before.
#[test]
fn lost_database_is_rebuilt_from_the_manifests_with_the_config() {
    let scratch = Fs::Xfs.scratch("e2e-rebuild");
    let mut rng = fastrand::Rng::with_seed(0x2eb1);
    let repo = scratch.path("repo");
    make_repo(&repo, &mut rng);
    let cache = scratch.path("cache");
    let (first, second, diff_before) = {
        let server = Server::start(&scratch.dir, &repo, &mut rng);
        let client = Client::new(&server, &cache);
        let first = client.json(&["snapshots", "create", VM])["id"]
            .as_str()
            .unwrap()
            .to_owned();
        change_disks(&repo, &mut rng, &CHANGES);
        let second = client.json(&["snapshots", "create", VM])["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let diff = client.json(&["snapshots", "show", VM, &second, "--compare-to", &first]);
        (first, second, diff)
    };
    // The server is stopped (dropped). Lose the database.
    let db = scratch.path("exporter.db");
    fs::remove_file(&db).unwrap();
    let out = Command::new(BIN)
        .arg("rebuild-db")
        .arg("-config")
        .arg(scratch.path("config.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rebuild-db failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("adopt")).count(),
        2,
        "two snapshots adopted: {text}"
    );
    let server = Server::start(&scratch.dir, &repo, &mut rng);
    let client = Client::new(&server, &cache);
    let ids: Vec<String> = client
        .json(&["snapshots", "list", VM])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        vec![first.clone(), second.clone()],
        "creation order kept"
    );
    let diff_after = client.json(&["snapshots", "show", VM, &second, "--compare-to", &first]);
    assert_eq!(diff_after, diff_before, "the same diff after the rebuild");
    // Reconciling again with the config finds nothing to do.
    drop(server);
    let out = Command::new(BIN)
        .arg("reconcile")
        .arg("--config")
        .arg(scratch.path("config.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "reconcile failed: {text}");
    assert!(text.contains("2 kept, 0 actions"), "{text}");
}

/// A resumed download of `DISK_A` fetched less than the disk's allocated
/// chunks in `snap`: it did not start over.
fn assert_fetched_less_than_disk_a(resumed: &Value, snap: &Value) {
    let a_alloc: u64 = snap["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["name"] == DISK_A)
        .flat_map(|d| d["chunks"].as_array().unwrap().iter())
        .map(|c| c["length"].as_u64().unwrap())
        .sum();
    assert!(
        resumed["bytes"].as_u64().unwrap() < a_alloc,
        "the resumed download fetched everything again: {resumed}"
    );
}
