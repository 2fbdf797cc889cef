//! The hostile-load suite (#11): the real binary over TLS, scaled down for
//! CI (`max_connections = 64`), one test per way a client can stall, flood
//! or attack the service, each checking that an honest client on another
//! address is still served.
//!
//! Clients come from several loopback addresses (127.0.0.1 floods, 127.0.0.2
//! and up are honest), so the per-address limits are exercised for real.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::common::exporter::{Client, Exporter, Options, LOCAL_PASS, LOCAL_USER};
use crate::common::http::{content_length, http_request, read_answer, Answer};
use crate::common::manager::{StandInManager, MGR_PASS, MGR_USER};
use crate::common::pki::Pki;
use crate::common::{repo_and_disk, static_inventory, Fs, Scratch, WAIT};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// The `[api]` limits of these tests: a small budget, short timeouts.
const LIMITS: &str = "max_connections = 64\nbody_read_timeout = \"2s\"\n\
                      send_timeout = \"2s\"\nhttp2_idle_timeout = \"1s\"\n";

/// A TCP connection to the exporter from source address `src`, with a
/// receive buffer of `rcvbuf` bytes when given (set before the connect, so
/// the window the server sees is small from the start).
fn tcp_from(src: &str, port: u16, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let src: std::net::IpAddr = src.parse().unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4()?;
        if let Some(n) = rcvbuf {
            s.set_recv_buffer_size(n)?;
        }
        s.bind((src, 0).into())?;
        let tcp = s.connect(([127, 0, 0, 1], port).into()).await?;
        let tcp = tcp.into_std()?;
        tcp.set_nonblocking(false)?;
        tcp.set_read_timeout(Some(WAIT))?;
        Ok(tcp)
    })
}

/// TLS over `tcp`, handshake done, ALPN `alpn`.
fn tls_over(client: &Client, tcp: TcpStream, alpn: &[u8]) -> std::io::Result<Tls> {
    let config = client.client_config(None, &[alpn], false);
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// One request from source address `src` on a fresh connection.
fn request_from(client: &Client, src: &str, request: &[u8]) -> std::io::Result<Answer> {
    let mut tls = tls_over(client, tcp_from(src, client.port, None)?, b"http/1.1")?;
    tls.write_all(request)?;
    tls.flush()?;
    Ok(read_answer(&mut tls))
}

/// The exporter with the suite's limits, `extra` more config, and a static
/// inventory of one VM whose disk is `disk` in repository `repo`.
fn start(pki: &Pki, extra: &str, disk: Option<(&Path, &Path)>) -> Exporter {
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    Exporter::start_with(pki, 0o600, |dir, port| {
        let mut c = Exporter::config(pki, dir, port, &o);
        c = c.replace("\n[api]\n", &format!("\n[api]\n{LIMITS}"));
        if let Some((repo, disk)) = disk {
            c += &static_vm(repo, disk);
        }
        c + extra
    })
}

/// The config's static inventory of one VM, `vm-hostile`, whose disk is
/// `disk` in repository `repo`.
fn static_vm(repo: &Path, disk: &Path) -> String {
    static_inventory(repo, &[("vm-hostile", vec![disk])])
}

/// A repository in `scratch` with one disk of `size` bytes, its first MiB
/// written, the rest a hole: (repository, disk).
fn sparse_disk(scratch: &Scratch, size: u64) -> (PathBuf, PathBuf) {
    let (repo, disk) = repo_and_disk(scratch);
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &[7u8; 1 << 20], 0).unwrap();
    (repo, disk)
}

/// Creates a snapshot of `vm-hostile`: the path of its disk.
fn snapshot_disk_url(ex: &Exporter, token: &str) -> String {
    let (id, name, _) = ex.create_snapshot("vm-hostile", token);
    format!("/api/v1/vms/vm-hostile/snapshots/{id}/disks/{name}")
}

/// The value of the first `/metrics` line starting with `prefix`, or 0.
fn metric(client: &Client, prefix: &str) -> u64 {
    let a = request_from(
        client,
        "127.0.0.9",
        &http_request("GET", "/metrics", None, &[], ""),
    )
    .expect("metrics");
    a.text()
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `cond` holds, for at most [`WAIT`].
fn wait_for(what: &str, ex: &Exporter, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; log:\n{}",
            ex.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Table row 2 of #11: one address opens far more connections than the
/// budget, each a login whose body never completes. Other addresses are
/// still served at once, and the half-sent logins are answered 408 and let
/// go after `api.body_read_timeout`.
#[test]
fn half_sent_logins_from_one_address_leave_room_for_others() {
    let pki = Pki::new();
    let ex = start(&pki, "", None);
    let head = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
    let mut held = Vec::new();
    for _ in 0..200 {
        let Ok(tcp) = tcp_from("127.0.0.1", ex.port, None) else {
            continue;
        };
        // Refused connections are closed before the handshake ends.
        let Ok(mut tls) = tls_over(&ex, tcp, b"http/1.1") else {
            continue;
        };
        if tls.write_all(head).and_then(|()| tls.flush()).is_ok() {
            held.push(tls);
        }
    }
    assert!(!held.is_empty(), "some of the flood gets in");
    // Others, from other addresses, at once.
    for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let a = request_from(
            &ex,
            src,
            &http_request("GET", "/api/v1/health", None, &[], ""),
        )
        .unwrap_or_else(|e| panic!("health from {src}: {e}; log:\n{}", ex.log()));
        assert_eq!(a.status, 200, "{}", a.text());
        let a = request_from(
            &ex,
            src,
            &http_request(
                "POST",
                "/api/v1/auth/login",
                None,
                &[],
                &serde_json::json!({"username": LOCAL_USER, "password": LOCAL_PASS}).to_string(),
            ),
        )
        .unwrap();
        assert_eq!(a.status, 200, "login from {src}: {}", a.text());
    }
    assert!(metric(&ex, "coe_connections_refused_total{reason=\"per_address\"}") > 0);
    // The half-sent logins get their 408 and the connections go.
    let mut first = held.swap_remove(0);
    let a = read_answer(&mut first);
    a.assert_error(408, "Request Timeout");
    wait_for("the half-sent logins to be let go", &ex, || {
        metric(&ex, "coe_connections_open") <= 2
    });
}

/// A client that stops reading a download is cut after `api.send_timeout`:
/// its body ends short (never cleanly) and the cut is counted.
#[test]
fn a_reader_that_stops_is_cut_after_send_timeout() {
    let scratch = Fs::Xfs.scratch("hostile-stall");
    let size: u64 = 64 << 20;
    let (repo, disk) = sparse_disk(&scratch, size);
    let pki = Pki::new();
    let ex = start(&pki, "", Some((&repo, &disk)));
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    let url = snapshot_disk_url(&ex, &token);
    let mut tls = tls_over(
        &ex,
        tcp_from("127.0.0.5", ex.port, Some(4096)).unwrap(),
        b"http/1.1",
    )
    .unwrap();
    tls.write_all(&http_request("GET", &url, Some(&token), &[], ""))
        .unwrap();
    let mut first = vec![0u8; 1024];
    let n = tls.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // Stop reading; the server's writes wait, and after send_timeout the
    // connection is cut.
    wait_for("the stalled download to be cut", &ex, || {
        metric(&ex, "coe_connections_cut_total{reason=\"send_timeout\"}") >= 1
    });
    let mut rest = Vec::new();
    let ended = tls.read_to_end(&mut rest);
    assert!(
        ((n + rest.len()) as u64) < size,
        "the body is cut short ({} bytes, {ended:?})",
        n + rest.len()
    );
    // And the next client is served.
    let a = request_from(
        &ex,
        "127.0.0.6",
        &http_request(
            "GET",
            &url,
            Some(&token),
            &[("Range", "bytes=0-1048575")],
            "",
        ),
    )
    .unwrap();
    assert_eq!(a.status, 206);
    assert!(a.body == vec![7u8; 1 << 20]);
}

/// An HTTP/2 connection with no request is closed after
/// `api.http2_idle_timeout` (hyper has no such limit).
#[test]
fn idle_http2_connections_are_closed() {
    let pki = Pki::new();
    let ex = start(&pki, "", None);
    let mut tls = tls_over(&ex, tcp_from("127.0.0.7", ex.port, None).unwrap(), b"h2").unwrap();
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
    // The client preface and an empty SETTINGS frame, then nothing.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    tls.flush().unwrap();
    let start = Instant::now();
    let mut sink = Vec::new();
    let _ = tls.read_to_end(&mut sink);
    assert!(
        start.elapsed() < WAIT,
        "the idle connection was closed by the server, not by the read timeout"
    );
    wait_for("the idle cut to be counted", &ex, || {
        metric(&ex, "coe_connections_cut_total{reason=\"idle\"}") >= 1
    });
}

/// Table row 3 of #11: wrong passwords sent at once from one address get at
/// most `login_max_failures` checks (the harness sets 3); the rest answer
/// 429 before the Manager is asked. A Manager that cannot answer counts as
/// a failure too, and user names from clients are escaped in the log.
#[test]
fn concurrent_wrong_logins_get_at_most_max_failures_checks() {
    let pki = Pki::new();
    let mgr = StandInManager::start(&pki);
    let o = Options {
        manager: Some(mgr.endpoint()),
        manager_ca: Some(pki.path("mgr-ca.pem")),
        ..Options::default()
    };
    // 30 connections from one address: above the suite's per-address cap.
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        Exporter::config(&pki, dir, port, &o).replace(
            "\n[api]\n",
            &format!(
                "\n[api]\n{LIMITS}max_connections_per_address = 40\nreserved_connections = 0\n"
            ),
        )
    });
    let body = serde_json::json!({"username": MGR_USER, "password": "wrong"}).to_string();
    let req = http_request("POST", "/api/v1/auth/login", None, &[], &body);
    let barrier = std::sync::Barrier::new(30);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..30)
            .map(|_| {
                s.spawn(|| {
                    let mut tls = tls_over(
                        &ex,
                        tcp_from("127.0.0.1", ex.port, None).unwrap(),
                        b"http/1.1",
                    )
                    .unwrap();
                    barrier.wait();
                    tls.write_all(&req).unwrap();
                    read_answer(&mut tls).status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked + limited, 30, "{statuses:?}");
    assert!(
        checked <= 3,
        "{checked} checks for a limit of 3: {statuses:?}"
    );
    assert!(
        mgr.hits() <= 3,
        "the Manager was asked {} times",
        mgr.hits()
    );
    // Another address is not limited by that.
    let ok = request_from(
        &ex,
        "127.0.0.2",
        &http_request(
            "POST",
            "/api/v1/auth/login",
            None,
            &[],
            &serde_json::json!({"username": MGR_USER, "password": MGR_PASS}).to_string(),
        ),
    )
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());

    // A name that would forge log lines is escaped.
    let evil = "evil\nFAKE line \u{1b}[31m";
    let a = request_from(
        &ex,
        "127.0.0.3",
        &http_request(
            "POST",
            "/api/v1/auth/login",
            None,
            &[],
            &serde_json::json!({"username": evil, "password": "x"}).to_string(),
        ),
    )
    .unwrap();
    assert_eq!(a.status, 401);
    let log = ex.log();
    assert!(
        !log.contains("evil\nFAKE"),
        "raw newline from a client in the log"
    );
    assert!(
        !log.contains('\u{1b}'),
        "raw escape from a client in the log"
    );
    assert!(log.contains("evil\\nFAKE"), "{log}");
}

/// A Manager that does not answer counts as a failed login: after
/// `login_max_failures` of them the address gets 429, and the Manager is
/// not asked again.
#[test]
fn manager_errors_count_as_failures() {
    let pki = Pki::new();
    let dead = format!("https://127.0.0.1:{}", crate::common::free_port());
    let o = Options {
        manager: Some(dead),
        ..Options::default()
    };
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        Exporter::config(&pki, dir, port, &o).replace("\n[api]\n", &format!("\n[api]\n{LIMITS}"))
    });
    let body = serde_json::json!({"username": "someone", "password": "pw"}).to_string();
    let req = http_request("POST", "/api/v1/auth/login", None, &[], &body);
    for _ in 0..3 {
        request_from(&ex, "127.0.0.1", &req)
            .unwrap()
            .assert_error(502, "Bad Gateway");
    }
    let a = request_from(&ex, "127.0.0.1", &req).unwrap();
    a.assert_error(429, "Too Many Requests");
    assert!(a.header("retry-after").is_some());
}

/// `config/config.example.toml` with only its paths (and the Manager,
/// which nothing answers here) changed, as the README has an operator do.
fn installed_example(pki: &Pki, dir: &crate::common::Scratch, port: u16) -> String {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/config.example.toml"
    ))
    .unwrap();
    let etc = "/etc/coriolis-ovm-exporter/";
    example
        .replace(
            &format!("{etc}srv-pub.pem"),
            pki.path("srv.pem").to_str().unwrap(),
        )
        .replace(
            &format!("{etc}srv-key.pem"),
            pki.path("srv.key").to_str().unwrap(),
        )
        .replace(
            &format!("{etc}ca-pub.pem"),
            pki.path("ca.pem").to_str().unwrap(),
        )
        .replace(
            &format!("{etc}exporter.db"),
            dir.path("exporter.db").to_str().unwrap(),
        )
        .replace(
            "/var/log/coriolis-ovm-exporter.log",
            dir.path("exporter.log").to_str().unwrap(),
        )
        .replace("bind = \"0.0.0.0\"", "bind = \"127.0.0.1\"")
        .replace("port = 5544", &format!("port = {port}"))
        .replace(
            "https://ovm-manager.example:7002",
            &format!("https://127.0.0.1:{}", crate::common::free_port()),
        )
}

/// Runs the server on `config` and expects it to refuse to start: exit
/// status 2 and one line on stderr, returned.
fn refused(config: &str) -> String {
    let dir = crate::common::Scratch::temp("refused");
    std::fs::write(dir.path("config.toml"), config).unwrap();
    let out = std::process::Command::new(crate::common::exporter::BIN)
        .arg("--config")
        .arg(dir.path("config.toml"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

/// Table row 4 of #11: the example config installed as the README says
/// does not start (its secret is a public placeholder), and once the
/// secret is set it has no user with a known password. The example user,
/// uncommented, is refused too; so is an http:// Manager unless allowed.
#[test]
fn the_example_config_is_safe_as_installed() {
    let pki = Pki::new();
    let dir = crate::common::Scratch::temp("example");
    let example = installed_example(&pki, &dir, crate::common::free_port());
    let why = refused(&example);
    assert!(
        why.contains("jwt.secret") && why.contains("placeholder"),
        "{why}"
    );
    let with_user = example
        .replace("CHANGE-ME: at least", "a secret of our own, at least")
        .replace("# [[auth.users]]", "[[auth.users]]")
        .replace("# username = ", "username = ")
        .replace("# password_hash = ", "password_hash = ");
    let why = refused(&with_user);
    assert!(why.contains("auth.users.password_hash"), "{why}");
    let http = example
        .replace("CHANGE-ME: at least", "a secret of our own, at least")
        .replace("ovm_endpoint = \"https://", "ovm_endpoint = \"http://");
    let why = refused(&http);
    assert!(
        why.contains("ovm_endpoint") && why.contains("manager.allow_http"),
        "{why}"
    );

    // With a secret of one's own it starts; nobody logs in with the
    // example's password, and the files it made are its own (0600) though
    // this test runs with a common umask.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        installed_example(&pki, dir, port)
            .replace("CHANGE-ME: at least", "a secret of our own, at least")
    });
    rustix::process::umask(old);
    ex.login("coriolis", "change-me")
        .assert_error(502, "Bad Gateway");
    let log = ex.log();
    assert!(!log.contains("allow_http"), "{log}");
    let mut checked = 0;
    for entry in std::fs::read_dir(&ex.dir.dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("exporter.") {
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&entry.metadata().unwrap().permissions());
            assert_eq!(mode & 0o077, 0, "{name} is {mode:o}");
            checked += 1;
        }
    }
    assert!(checked >= 2, "the log and the database at least");

    // An http:// Manager when allowed: it starts, and says so.
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        installed_example(&pki, dir, port)
            .replace("CHANGE-ME: at least", "a secret of our own, at least")
            .replace("ovm_endpoint = \"https://", "ovm_endpoint = \"http://")
            .replace("allow_http = false", "allow_http = true")
    });
    assert!(ex.log().contains("clear text"), "{}", ex.log());
}

/// A VM with one sparse disk of `size` bytes (its first MiB all 7s) on the
/// test XFS, the exporter serving it with `[api]` limits `limits` and
/// `extra` config, a token and the disk's URL in a first snapshot.
struct DiskSetup {
    _scratch: crate::common::Scratch,
    ex: Exporter,
    token: String,
    url: String,
}

/// MiB 0..n of the disk of [`disk_setup`], each one `Range` request from
/// another address (127.0.0.2), each answered 206 in full.
fn honest_ranges(s: &DiskSetup, n: u64) {
    for i in 0..n {
        let a = request_from(
            &s.ex,
            "127.0.0.2",
            &http_request(
                "GET",
                &s.url,
                Some(&s.token),
                &[(
                    "Range",
                    &format!("bytes={}-{}", i << 20, ((i + 1) << 20) - 1),
                )],
                "",
            ),
        )
        .unwrap_or_else(|e| panic!("honest range {i}: {e}; log:\n{}", s.ex.log()));
        assert_eq!(a.status, 206, "{}", a.text());
        let want = if i == 0 { 7u8 } else { 0u8 };
        assert!(
            a.body.len() == 1 << 20 && a.body.iter().all(|b| *b == want),
            "range {i}"
        );
    }
}

fn disk_setup(tag: &str, size: u64, limits: &str, extra: &str) -> DiskSetup {
    let scratch = Fs::Xfs.scratch(tag);
    let (repo, disk) = sparse_disk(&scratch, size);
    let pki = Pki::new();
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        Exporter::config(&pki, dir, port, &o).replace("\n[api]\n", &format!("\n[api]\n{limits}"))
            + &static_vm(&repo, &disk)
            + extra
    });
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    let url = snapshot_disk_url(&ex, &token);
    DiskSetup {
        _scratch: scratch,
        ex,
        token,
        url,
    }
}

/// Starts a full-disk GET from `src` with a tiny receive window and reads
/// only the head: a client that stops reading.
fn stalled_download(s: &DiskSetup, src: &str) -> Tls {
    let mut tls = tls_over(
        &s.ex,
        tcp_from(src, s.ex.port, Some(4096)).unwrap(),
        b"http/1.1",
    )
    .unwrap();
    tls.write_all(&http_request("GET", &s.url, Some(&s.token), &[], ""))
        .unwrap();
    let mut head = vec![0u8; 512];
    let n = tls.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    tls
}

/// Table row 1 of #11: clients that start full-disk downloads and stop
/// reading, more of them than the buffer pool has room for at their
/// read-ahead, do not stop anyone else's download: a new 1 MiB range is
/// served in full while they stall (the send timeout is long, so they are
/// not cut meanwhile), and the disk-read memory stays within the pool plus
/// the overflow.
#[test]
fn stalled_downloads_do_not_stop_other_downloads() {
    // 16 buffers of 1 MiB, 4 per stream: 4 stalled streams took them all
    // before #11.
    let s = disk_setup(
        "hostile-fair",
        256 << 20,
        "max_connections = 64\nsend_timeout = \"120s\"\n",
        "\n[io]\npool_buffers = 16\nread_ahead = 4\noverflow_buffers = 8\n",
    );
    let stalled: Vec<Tls> = (0..12)
        .map(|i| stalled_download(&s, &format!("127.0.0.{}", 10 + i)))
        .collect();
    // The stalled streams have taken what they can.
    wait_for("the stalled streams to hold the shared pool", &s.ex, || {
        metric(&s.ex, "coe_io_buffers_in_use ") >= 12
    });
    honest_ranges(&s, 5);
    assert!(metric(&s.ex, "coe_io_buffers_in_use ") <= 16);
    assert!(metric(&s.ex, "coe_io_overflow_buffers_in_use ") <= 8);
    drop(stalled);
}

/// Item 1 of #11, per address: many stalled downloads from one address
/// (127.0.0.1), twice what the pool and the overflow hold at one buffer
/// each, hold at most `io.owner_buffers` (default half of them, here 12)
/// between them; an honest client on another address is served from the
/// rest at once (before, the flood took every buffer and a new range
/// waited for `api.send_timeout`, 120 s here).
#[test]
fn stalled_downloads_from_one_address_leave_buffers_to_others() {
    let s = disk_setup(
        "hostile-owner",
        256 << 20,
        "max_connections = 64\nmax_connections_per_address = 40\n\
         send_timeout = \"120s\"\n",
        "\n[io]\npool_buffers = 16\nread_ahead = 4\noverflow_buffers = 8\n",
    );
    let stalled: Vec<Tls> = (0..24)
        .map(|_| {
            let mut tls = tls_over(
                &s.ex,
                tcp_from("127.0.0.1", s.ex.port, Some(4096)).unwrap(),
                b"http/1.1",
            )
            .unwrap();
            tls.write_all(&http_request("GET", &s.url, Some(&s.token), &[], ""))
                .unwrap();
            tls.flush().unwrap();
            tls
        })
        .collect();
    wait_for(
        "the stalled downloads to start and hold buffers",
        &s.ex,
        || {
            metric(&s.ex, "coe_disk_streams_in_flight ") >= 24
                && metric(&s.ex, "coe_io_buffers_in_use ")
                    + metric(&s.ex, "coe_io_overflow_buffers_in_use ")
                    >= 12
        },
    );
    honest_ranges(&s, 3);
    // The stalled address holds its bound, no more.
    let held =
        metric(&s.ex, "coe_io_buffers_in_use ") + metric(&s.ex, "coe_io_overflow_buffers_in_use ");
    assert!(held <= 12, "127.0.0.1 holds {held} buffers");
    assert!(metric(&s.ex, "coe_io_owner_waits_total ") >= 1);
    drop(stalled);
}

/// Paths from node files are resolved beneath the repository's mount with
/// no symlink in any component: a disk reached through a symlinked folder,
/// or lying outside its repository, is listed as not snapshot-compatible,
/// and a snapshot of its VM is refused with the reason, cloning nothing.
#[test]
fn disks_behind_symlinks_or_outside_the_repository_are_never_cloned() {
    let scratch = Fs::Xfs.scratch("hostile-paths");
    let repo = scratch.path("repo");
    let elsewhere = scratch.path("elsewhere");
    std::fs::create_dir_all(repo.join("VirtualDisks")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    for p in [
        repo.join("VirtualDisks/good.img"),
        elsewhere.join("secret.img"),
    ] {
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
    }
    // A folder of the repository that is a symlink to a folder outside it.
    std::os::unix::fs::symlink(&elsewhere, repo.join("Linked")).unwrap();
    let cases = [
        ("vm-linked", repo.join("Linked/secret.img"), "symlink"),
        ("vm-outside", elsewhere.join("secret.img"), "repository"),
    ];
    let pki = Pki::new();
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    let good = repo.join("VirtualDisks/good.img");
    let vms: Vec<(&str, Vec<&Path>)> = cases
        .iter()
        .map(|(vm, disk, _)| (*vm, vec![good.as_path(), disk.as_path()]))
        .collect();
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        Exporter::config(&pki, dir, port, &o) + &static_inventory(&repo, &vms)
    });
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    for (vm, _, why) in &cases {
        let v = ex.request("GET", &format!("/api/v1/vms/{vm}"), Some(&token), "");
        assert_eq!(v.status, 200, "{}", v.text());
        let v = v.json();
        assert_eq!(v["snapshot_compatible"], false, "{v}");
        assert_eq!(v["disks"][0]["snapshot_compatible"], true, "{v}");
        assert_eq!(v["disks"][1]["snapshot_compatible"], false, "{v}");
        let a = ex.request(
            "POST",
            &format!("/api/v1/vms/{vm}/snapshots"),
            Some(&token),
            "",
        );
        assert!(
            (400..500).contains(&a.status) && a.text().contains(why),
            "{vm}: {} {}",
            a.status,
            a.text()
        );
    }
    // Nothing was cloned: no snapshot folder holds a file.
    let snaps = repo.join("CoriolisSnapshots");
    let cloned: Vec<_> = walk(&snaps);
    assert!(cloned.is_empty(), "{cloned:?}");
}

/// Every regular file under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// [`Exporter::start_with`] with `COE_FAULT=point` in its environment.
fn start_faulty(
    pki: &Pki,
    point: &str,
    make: impl FnOnce(&crate::common::Scratch, u16) -> String,
) -> Exporter {
    Exporter::start_with_env(pki, 0o600, &[("COE_FAULT", point)], make)
}

/// The exporter's open descriptors now.
fn fds(ex: &Exporter) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", ex.child.id()))
        .unwrap()
        .count()
}

/// A disk read that fails in the middle of a body (EIO, by fault point)
/// aborts that connection, never ends it cleanly; the next request is
/// served, and the buffers and descriptors of the failed one go back.
#[test]
fn a_read_error_mid_body_aborts_the_connection_and_nothing_leaks() {
    let scratch = Fs::Xfs.scratch("hostile-eio");
    let size: u64 = 32 << 20;
    let (repo, disk) = sparse_disk(&scratch, size);
    let pki = Pki::new();
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    let ex = start_faulty(&pki, "io-read-eio", |dir, port| {
        Exporter::config(&pki, dir, port, &o) + &static_vm(&repo, &disk)
    });
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    let url = snapshot_disk_url(&ex, &token);
    // Small answers first, so the baseline has the connections' worth of
    // descriptors settled.
    let first = ex.raw(&http_request(
        "GET",
        &url,
        Some(&token),
        &[("Range", "bytes=0-4095")],
        "",
    ));
    assert_eq!(first.status, 206);
    let base = fds(&ex);
    // The whole disk: the read at 8 MiB fails.
    let mut tls = ex.connect();
    tls.write_all(&http_request("GET", &url, Some(&token), &[], ""))
        .unwrap();
    let mut got = Vec::new();
    let ended = tls.read_to_end(&mut got);
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(String::from_utf8_lossy(&got[..head_end]).contains(&format!("content-length: {size}")));
    assert!(
        ((got.len() - head_end) as u64) < size,
        "the body is cut short, not ended cleanly ({} bytes, {ended:?})",
        got.len() - head_end
    );
    // The next request is served in full.
    let again = ex.raw(&http_request("GET", &url, Some(&token), &[], ""));
    assert_eq!(again.status, 200);
    assert_eq!(again.body.len() as u64, size);
    assert!(again.body[..1 << 20].iter().all(|b| *b == 7));
    // Buffers and descriptors go back.
    wait_for("the buffers and descriptors to go back", &ex, || {
        metric(&ex, "coe_io_buffers_in_use ") == 0 && fds(&ex) <= base
    });
    assert!(ex.log().contains("disk read failed"), "{}", ex.log());
}

/// A clone that fails (ENOSPC, EIO; by fault point, on the second disk of
/// the VM) leaves nothing behind, and answers 507 for a full filesystem and
/// 500 for an I/O error, each with a JSON body that says what failed.
#[test]
fn a_failed_clone_leaves_nothing_and_says_why() {
    for (point, status, short) in [
        ("create-clone-enospc", 507, "Insufficient Storage"),
        ("create-clone-eio", 500, "Server error"),
    ] {
        let scratch = Fs::Xfs.scratch("hostile-clone");
        let repo = scratch.path("repo");
        std::fs::create_dir_all(repo.join("VirtualDisks")).unwrap();
        let disks: Vec<_> = ["a.img", "b.img"]
            .iter()
            .map(|n| {
                let p = repo.join("VirtualDisks").join(n);
                std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
                p
            })
            .collect();
        let pki = Pki::new();
        let o = Options {
            local_users: true,
            ..Options::default()
        };
        let vm = ("vm-hostile", disks.iter().map(PathBuf::as_path).collect());
        let ex = start_faulty(&pki, point, |dir, port| {
            Exporter::config(&pki, dir, port, &o) + &static_inventory(&repo, &[vm])
        });
        let token = ex.token(LOCAL_USER, LOCAL_PASS);
        let a = ex.request("POST", "/api/v1/vms/vm-hostile/snapshots", Some(&token), "");
        a.assert_error(status, short);
        assert!(a.text().contains("b.img"), "{}", a.text());
        let left = walk(&repo.join("CoriolisSnapshots"));
        assert!(left.is_empty(), "{point}: left behind {left:?}");
        let v = ex.request("GET", "/api/v1/vms/vm-hostile", Some(&token), "");
        assert_eq!(v.json()["snapshots"], serde_json::json!([]), "{point}");
        // The next create works (the fault fires once).
        let ok = ex.request("POST", "/api/v1/vms/vm-hostile/snapshots", Some(&token), "");
        assert_eq!(ok.status, 200, "{point}: {}", ok.text());
    }
}

/// One HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The HTTP/2 "rapid reset" (CVE-2023-44487): a client opening streams and
/// resetting them at once gets a GOAWAY and its connection closed, and
/// others are served meanwhile. Three such connections in a row leave one
/// warning of the HTTP/2 library in the log, not one each
/// (`server::logging::Throttle`).
#[test]
fn http2_rapid_resets_end_in_goaway() {
    let pki = Pki::new();
    let ex = start(&pki, "", None);
    for _ in 0..3 {
        rapid_resets(&ex);
    }
    let a = request_from(
        &ex,
        "127.0.0.2",
        &http_request("GET", "/api/v1/health", None, &[], ""),
    )
    .unwrap();
    assert_eq!(a.status, 200);
    let log = ex.log();
    let warned = log
        .lines()
        .filter(|l| l.contains(" h2::") && l.contains("reached limit"))
        .count();
    assert_eq!(warned, 1, "one h2 warning for three floods:\n{log}");
}

/// One connection of HEADERS + RST_STREAM pairs; asserts the GOAWAY.
fn rapid_resets(ex: &Exporter) {
    let mut tls = tls_over(ex, tcp_from("127.0.0.8", ex.port, None).unwrap(), b"h2").unwrap();
    // HPACK: :method GET, :scheme https (static), :path and :authority as
    // literals without indexing.
    let mut block = vec![0x82, 0x87, 0x04, 14];
    block.extend_from_slice(b"/api/v1/health");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    for i in 0..1000u32 {
        let sid = 2 * i + 1;
        out.extend(h2_frame(0x1, 0x5, sid, &block)); // HEADERS, END_STREAM|END_HEADERS
        out.extend(h2_frame(0x3, 0, sid, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    // The server may close before reading it all: a failed write is fine.
    let _ = tls.write_all(&out).and_then(|()| tls.flush());
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let start_at = Instant::now();
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        start_at.elapsed() < WAIT,
        "closed by the server, not the read timeout"
    );
    // Walk the frames the server sent: one is a GOAWAY (type 7).
    let mut at = 0;
    let mut goaway = false;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        goaway |= got[at + 3] == 0x7;
        at += 9 + len;
    }
    assert!(goaway, "no GOAWAY in {} bytes", got.len());
}

/// Sends `req`, a GET of MiB `i` of the disk of [`disk_setup`], and checks
/// the whole answer.
async fn h2_range(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
    i: u64,
) {
    use http_body_util::BodyExt;
    let resp = send.send_request(req).await.expect("the range's answer");
    assert_eq!(resp.status(), 206);
    let body = resp.into_body().collect().await.expect("the range's body");
    let body = body.to_bytes();
    let want = if i == 0 { 7u8 } else { 0u8 };
    assert!(
        body.len() == 1 << 20 && body.iter().all(|b| *b == want),
        "range {i}: {} bytes",
        body.len()
    );
}

/// An HTTP/2 client (hyper's, small stream windows) that asks for a whole
/// disk on one stream and never reads it: that stream alone is reset after
/// `api.send_timeout` (`RST_STREAM`, its buffers back), while a range on
/// another stream of the same connection is served in full, before and
/// after the reset; the connection is never cut.
#[test]
fn a_stalled_http2_stream_is_reset_alone() {
    use http_body_util::BodyExt;
    let s = disk_setup(
        "hostile-h2stall",
        64 << 20,
        LIMITS,
        "\n[io]\npool_buffers = 16\nread_ahead = 4\n",
    );
    let config = s.ex.client_config(None, &[b"h2"], false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ex = &s.ex;
    let metric_now = |prefix: &'static str| {
        let client = Client {
            port: ex.port,
            ca: ex.ca.clone(),
        };
        tokio::task::spawn_blocking(move || metric(&client, prefix))
    };
    let tcp = tcp_from("127.0.0.8", ex.port, None).unwrap();
    tcp.set_nonblocking(true).unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        // Each stream's window is 64 KiB and is opened only as its body is
        // read; the connection's is large, so one shut stream does not
        // shut the others.
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(64 << 20)
                .adaptive_window(false)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let get = |range: Option<u64>| {
            let mut req = http::Request::get(format!("https://localhost:{}{}", ex.port, s.url))
                .header("Authorization", format!("Bearer {}", s.token));
            if let Some(i) = range {
                req = req.header(
                    "Range",
                    format!("bytes={}-{}", i << 20, ((i + 1) << 20) - 1),
                );
            }
            req.body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        // Stream 1: the whole disk, never read past its window.
        let stalled = send.send_request(get(None)).await.unwrap();
        assert_eq!(stalled.status(), 200);
        // Stream 3, on the same connection while stream 1 is stalled.
        h2_range(&mut send, get(Some(0)), 0).await;
        h2_range(&mut send, get(Some(1)), 1).await;
        // Stream 1 is reset on its own...
        let start = Instant::now();
        while metric_now("coe_http2_streams_reset_total ").await.unwrap() < 1 {
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for the stream reset; log:\n{}",
                ex.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // ...its client sees the reset after the bytes its window let
        // through, never a clean end...
        let mut body = stalled.into_body();
        let mut got = 0usize;
        let err = loop {
            match tokio::time::timeout(WAIT, body.frame()).await {
                Err(_) => panic!("stream 1 neither reset nor ended; log:\n{}", ex.log()),
                Ok(Some(Ok(f))) => got += f.into_data().map_or(0, |d| d.len()),
                Ok(Some(Err(e))) => break e,
                Ok(None) => panic!("stream 1 ended cleanly after {got} bytes"),
            }
        };
        assert!(got < 64 << 20, "{got}");
        let why = format!("{err:?}");
        assert!(why.contains("CANCEL"), "{why}");
        // ...and the connection goes on: another range on it.
        h2_range(&mut send, get(Some(2)), 2).await;
        assert!(!conn.is_finished(), "the connection ended");
        assert_eq!(
            metric_now("coe_connections_cut_total{reason=\"send_timeout\"}")
                .await
                .unwrap(),
            0,
            "a connection was cut; log:\n{}",
            ex.log()
        );
        drop(send);
    });
    wait_for("the stream's buffers to go back", ex, || {
        metric(ex, "coe_io_buffers_in_use ") == 0
    });
}

/// A `/proc/<pid>/status` figure of the exporter, in KiB.
fn status_kib(ex: &Exporter, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", ex.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// The CRC-32 answer as the service built it whole before it was
/// streamed (serde_json of these fields, in this order, and a newline).
#[derive(serde::Serialize)]
struct BuiltChecksums {
    size: u64,
    block_size: u64,
    algorithm: &'static str,
    crc32: Vec<u32>,
}

/// Bounded answers (#11): the CRC-32 answer is streamed. A client that asks
/// for the most blocks an answer may have (16,777,216, some 170 MB of
/// JSON) and stops reading holds a few frames of it, not the answer: the
/// server's peak RSS grows by a few MiB (3 MiB measured, under 32 MiB
/// asserted), not by the answer, and the client is cut after
/// `api.send_timeout`. An answer of more blocks than the old cap
/// (262,144) is byte for byte what the answer built whole was.
#[test]
fn checksum_answers_stream_with_bounded_memory() {
    const TIB: u64 = 1 << 40;
    let s = disk_setup("hostile-sums", TIB, LIMITS, "");
    // Reset the peak RSS (proc(5), clear_refs): from now on VmHWM is the
    // peak of this answer.
    std::fs::write(format!("/proc/{}/clear_refs", s.ex.child.id()), "5").unwrap();
    let peak_before = status_kib(&s.ex, "VmRSS:");
    let mut tls = tls_over(
        &s.ex,
        tcp_from("127.0.0.5", s.ex.port, Some(4096)).unwrap(),
        b"http/1.1",
    )
    .unwrap();
    let url = format!("{}/checksums?blockSize=65536", s.url);
    tls.write_all(&http_request("GET", &url, Some(&s.token), &[], ""))
        .unwrap();
    let mut first = vec![0u8; 1024];
    let n = tls.read(&mut first).unwrap();
    let head = String::from_utf8_lossy(&first[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Stop reading: the producer waits on the client, the server's writes
    // wait, and after send_timeout the connection is cut.
    wait_for("the stalled checksums answer to be cut", &s.ex, || {
        metric(&s.ex, "coe_connections_cut_total{reason=\"send_timeout\"}") >= 1
    });
    let grown = status_kib(&s.ex, "VmHWM:").saturating_sub(peak_before);
    assert!(
        grown < 32 << 10,
        "the server's peak RSS grew by {grown} KiB for a stalled answer"
    );
    drop(tls);

    // 1,048,576 blocks of 1 MiB: four times the old cap.
    let a = request_from(
        &s.ex,
        "127.0.0.6",
        &http_request(
            "GET",
            &format!("{}/checksums?blockSize=1048576", s.url),
            Some(&s.token),
            &[],
            "",
        ),
    )
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let block = 1u64 << 20;
    let zero = crc32fast::hash(&vec![0u8; block as usize]);
    let mut crc32 = vec![zero; (TIB / block) as usize];
    crc32[0] = crc32fast::hash(&vec![7u8; block as usize]);
    let mut want = serde_json::to_vec(&BuiltChecksums {
        size: TIB,
        block_size: block,
        algorithm: "crc32",
        crc32,
    })
    .unwrap();
    want.push(b'\n');
    assert!(
        a.body == want,
        "{} bytes, expected {}",
        a.body.len(),
        want.len()
    );
    wait_for("the answers' buffers to go back", &s.ex, || {
        metric(&s.ex, "coe_io_buffers_in_use ") == 0
    });
}

/// `/metrics` over one kept-alive HTTP/1.1 connection: reading it again and
/// again is no new connection (which the server's memory trimmer counts as
/// activity).
struct KeptAlive(Tls);

impl KeptAlive {
    fn open(ex: &Exporter) -> KeptAlive {
        KeptAlive(
            tls_over(
                ex,
                tcp_from("127.0.0.8", ex.port, None).unwrap(),
                b"http/1.1",
            )
            .unwrap(),
        )
    }

    /// The value of the first `/metrics` line starting with `prefix`, or 0.
    fn metric(&mut self, prefix: &str) -> u64 {
        self.0
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        self.0.flush().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.0
                .read_exact(&mut byte)
                .expect("the kept-alive connection was closed");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length = content_length(&head).unwrap_or_else(|| panic!("no Content-Length in {head}"));
        let mut body = vec![0u8; length];
        self.0.read_exact(&mut body).unwrap();
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The soak's idle RSS (#11): the allocator is trimmed once more when the
/// service goes idle (no new connection, no disk stream, for 12 s), not
/// only right after a burst: what is freed later (connections that close
/// after the burst trim, the caches of blocking-pool threads that exit
/// 10 s after their last task) stayed resident, and idle RSS grew with the
/// length of the soak's storm. Once per idle period: requests on a
/// kept-alive connection do not re-arm it, a new connection does.
#[test]
fn the_allocator_is_trimmed_once_each_time_the_service_goes_idle() {
    let pki = Pki::new();
    let o = Options {
        local_users: true,
        ..Options::default()
    };
    // A header timeout longer than the test, so the kept-alive connection
    // stays open between reads.
    let ex = Exporter::start_with(&pki, 0o600, |dir, port| {
        Exporter::config(&pki, dir, port, &o)
            .replace("\n[api]\n", &format!("\n[api]\n{LIMITS}"))
            .replace(
                "header_read_timeout = \"1s\"",
                "header_read_timeout = \"5m\"",
            )
    });
    let idle = "coe_allocator_trims_total{reason=\"idle\"}";
    let mut kept = KeptAlive::open(&ex);
    let burst = |n: usize| {
        for _ in 0..n {
            let a = request_from(
                &ex,
                "127.0.0.2",
                &http_request("GET", "/api/v1/health", None, &[], ""),
            )
            .unwrap();
            assert!(a.status == 200 || a.status == 503, "{}", a.text());
        }
    };
    let wait_for_trims = |kept: &mut KeptAlive, n: u64| {
        let start = Instant::now();
        loop {
            let got = kept.metric(idle);
            assert!(
                got <= n,
                "{got} idle trims, expected {n}; log:\n{}",
                ex.log()
            );
            if got == n {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for idle trim {n}; log:\n{}",
                ex.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    burst(20);
    wait_for_trims(&mut kept, 1);
    // Idle and still read: no second trim within another idle period.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(14) {
        assert_eq!(kept.metric(idle), 1, "trimmed again with no new activity");
        std::thread::sleep(Duration::from_millis(200));
    }
    burst(1);
    wait_for_trims(&mut kept, 2);
}

/// glibc's malloc arenas in the exporter: the main one (`[heap]`) and each
/// other arena's heap, an anonymous mapping aligned to 64 MiB (glibc's
/// HEAP_MAX_SIZE on 64-bit).
fn arenas(ex: &Exporter) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", ex.child.id())).unwrap();
    1 + maps
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let start = u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap();
            f.len() == 5 && f[1].starts_with("rw") && f[4] == "0" && start % (64 << 20) == 0
        })
        .count()
}

/// The soak's idle RSS (#11): glibc's arenas are capped at one per runtime
/// thread (`sys::memory::arena_max`: the workers and the main thread).
/// Logins checked at once, each on a blocking-pool thread of its own, leave
/// no more arenas than that; glibc's default gives each new thread an arena
/// of its own up to 8 per core, each keeping some 130 KiB resident for good.
#[test]
fn threads_of_the_blocking_pool_share_a_capped_set_of_arenas() {
    let pki = Pki::new();
    let ex = start(&pki, "", None);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = coriolis_ovm_exporter::sys::memory::arena_max(cores);
    let body = serde_json::json!({"username": LOCAL_USER, "password": LOCAL_PASS}).to_string();
    let req = http_request("POST", "/api/v1/auth/login", None, &[], &body);
    // One login per address (the login limiter admits a few per address).
    let n = 24;
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        for i in 0..n {
            let (ex, req, barrier) = (&ex, &req, &barrier);
            s.spawn(move || {
                let src = format!("127.0.2.{}", i + 1);
                let mut tls =
                    tls_over(ex, tcp_from(&src, ex.port, None).unwrap(), b"http/1.1").unwrap();
                barrier.wait();
                tls.write_all(req).unwrap();
                let a = read_answer(&mut tls);
                assert_eq!(a.status, 200, "{}", a.text());
            });
        }
    });
    // The blocking pool keeps an idle thread 10 s: all are still there.
    let status = std::fs::read_to_string(format!("/proc/{}/status", ex.child.id())).unwrap();
    let threads: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        .unwrap();
    assert!(
        threads > cap + 2,
        "the logins ran on {threads} threads: too few to tell a cap of {cap} arenas"
    );
    let got = arenas(&ex);
    assert!(
        got <= cap,
        "{got} malloc arenas with {threads} threads, more than the cap of {cap} for {cores} cores"
    );
}
