//! End-to-end tests of the HTTPS API: the real binary, real TLS with
//! certificates made here by the `openssl` CLI, and a stand-in OVM Manager
//! (a small HTTPS server speaking the Manager's real login endpoint with
//! basic auth); the harness is in `tests/common/`. Route-level behaviour
//! over a backend with VMs is tested in `src/api/router/tests.rs`; here the
//! binary serves an empty node.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::common::{
    free_port, h2_get, http_request, is_abort, read_answer, Client, Exporter, Options, Pki,
    Scratch, StandInManager, BIN, LOCAL_PASS, LOCAL_USER, MGR_PASS, MGR_USER, SECRET, SLOW_USER,
    WAIT,
};

fn jwt(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    key: Option<(&str, &[u8])>,
) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = match key {
        None => String::new(),
        Some((alg, secret)) => {
            let alg = match alg {
                "HS256" => jsonwebtoken::Algorithm::HS256,
                "HS384" => jsonwebtoken::Algorithm::HS384,
                "HS512" => jsonwebtoken::Algorithm::HS512,
                other => panic!("{other}"),
            };
            jsonwebtoken::crypto::sign(
                signing_input.as_bytes(),
                &jsonwebtoken::EncodingKey::from_secret(secret),
                alg,
            )
            .unwrap()
        }
    };
    format!("{signing_input}.{sig}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---- the tests ------------------------------------------------------------

#[test]
fn version_flags() {
    for flag in ["-version", "--version"] {
        let out = Command::new(BIN).arg(flag).output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("coriolis-ovm-exporter {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn bad_configs_stop_the_start_with_one_line_naming_the_key() {
    let pki = Pki::new();
    let dir = Scratch::temp("badcfg");
    let good = Exporter::config(&pki, &dir, 5544, &Options::default());
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace(&format!("secret = {SECRET:?}\n"), ""),
            "jwt.secret: missing",
        ),
        (
            good.replace(&format!("secret = {SECRET:?}"), "secret = \"short\""),
            "jwt.secret: 5 bytes long",
        ),
        (
            good.replace("port = 5544", "port = 70000"),
            "api.port: 70000",
        ),
        (good.replace("port = 5544", "port = 0"), "api.port: 0"),
        (
            good.replace("bind = \"127.0.0.1\"", "bind = \"not-an-address\""),
            "api.bind",
        ),
        (
            good.replace(
                pki.path("srv.pem").to_str().unwrap(),
                "/nonexistent/srv.pem",
            ),
            "api.tls.certificate",
        ),
        (
            good.replace(
                pki.path("srv.key").to_str().unwrap(),
                pki.path("stray.key").to_str().unwrap(),
            ),
            "api.tls.key",
        ),
        (
            good.replace("time_to_live = \"1h\"", "time_to_live = \"forever\""),
            "jwt.time_to_live",
        ),
        (
            good.clone() + "\n[metrics]\nauth = \"maybe\"\n",
            "metrics.auth",
        ),
        (
            good.replace(
                "[manager]\n",
                "[manager]\nca_certificate = \"/nonexistent/ca.pem\"\n",
            ),
            "manager.ca_certificate",
        ),
        (
            good.replace(
                "[auth]\n",
                "[auth]\nusers = [{username = \"u\", password_hash = \"plain\"}]\n",
            ),
            "auth.users.password_hash",
        ),
        (
            good.clone() + "\nunknown_key = 1\n",
            "unknown field `unknown_key`",
        ),
        (
            good.replace("[api]\n", "[api]\ntcp_notsent_lowat = 100\n"),
            "api.tcp_notsent_lowat: 100",
        ),
        (
            good.clone() + "\n[io]\nbuffer_size = 1000\n",
            "io: buffer_size must be a non-zero multiple of 4096",
        ),
        (
            good.clone() + "\n[io]\nread_ahead = 8\npool_buffers = 4\n",
            "io: read_ahead must be at least 1 and pool_buffers at least read_ahead",
        ),
        (
            good.clone() + "\n[io]\nbackend = \"aio\"\n",
            "unknown variant `aio`",
        ),
        (
            good.clone() + "\n[io]\nqueue_depth = 4\n",
            "unknown field `queue_depth`",
        ),
    ];
    for (text, want) in cases {
        let path = dir.path("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(BIN)
            .arg("-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{want}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line for {want}: {err}");
        assert!(err.contains(want), "{want:?} not in {err:?}");
        assert!(!err.contains(SECRET), "the secret leaked: {err}");
    }
    let out = Command::new(BIN)
        .arg("-config")
        .arg(dir.path("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn login_against_the_manager_and_bearer_tokens() {
    let pki = Pki::new();
    let mgr = StandInManager::start(&pki);
    let ex = Exporter::start(
        &pki,
        Options {
            manager: Some(mgr.endpoint()),
            manager_ca: Some(pki.path("mgr-ca.pem")),
            ..Options::default()
        },
    );
    let login = ex.login(MGR_USER, MGR_PASS);
    assert_eq!(login.status, 200, "{}", login.text());
    assert_eq!(login.header("content-type"), Some("application/json"));
    assert_eq!(mgr.hits(), 1);
    let token = login.json()["token"].as_str().unwrap().to_owned();
    // The claims API.md names, signed HS256 with the configured secret.
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_issuer(&["coriolis-ovm-exporter"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["user"], MGR_USER);
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        exp > now() + 3500 && exp <= now() + 3600,
        "time_to_live is 1h: {exp}"
    );

    // An empty node: no VMs, and VM routes 404 with the error body.
    let vms = ex.request("GET", "/api/v1/vms/", Some(&token), "");
    assert_eq!(vms.status, 200);
    assert_eq!(vms.json(), serde_json::json!([]));
    for path in [
        "/api/v1/vms/0004fb0000060000ccaf98a0baa2c186",
        "/api/v1/vms/0004fb0000060000ccaf98a0baa2c186/snapshots",
        "/api/v1/vms/0004fb0000060000ccaf98a0baa2c186/snapshots/9633d114-8270-41eb-bffc-67cc342957d9",
        "/api/v1/vms/0004fb0000060000ccaf98a0baa2c186/snapshots/9633d114-8270-41eb-bffc-67cc342957d9/disks/d.img",
    ] {
        ex.request("GET", path, Some(&token), "").assert_error(404, "Not Found");
    }
    let head = ex.raw(&http_request("HEAD", "/api/v1/vms/0004fb0000060000ccaf98a0baa2c186/snapshots/9633d114-8270-41eb-bffc-67cc342957d9/disks/d.img", Some(&token), &[], ""));
    assert_eq!(head.status, 404);

    // Rejected credentials: 401, and the Manager was asked.
    ex.login(MGR_USER, "wrong")
        .assert_error(401, "Not Authorized");
    assert_eq!(mgr.hits(), 2);

    // Forged and expired tokens.
    let claims = |exp: u64| serde_json::json!({"user": MGR_USER, "exp": exp, "iss": "coriolis-ovm-exporter"});
    let hs = |alg: &str| serde_json::json!({"alg": alg, "typ": "JWT"});
    let forged = [
        (
            "none",
            jwt(
                &serde_json::json!({"alg": "none", "typ": "JWT"}),
                &claims(now() + 600),
                None,
            ),
        ),
        (
            "HS384",
            jwt(
                &hs("HS384"),
                &claims(now() + 600),
                Some(("HS384", SECRET.as_bytes())),
            ),
        ),
        (
            "HS512",
            jwt(
                &hs("HS512"),
                &claims(now() + 600),
                Some(("HS512", SECRET.as_bytes())),
            ),
        ),
        (
            "wrong secret",
            jwt(
                &hs("HS256"),
                &claims(now() + 600),
                Some(("HS256", b"not-the-secret-not-the-secret-32b!")),
            ),
        ),
        (
            "expired",
            jwt(
                &hs("HS256"),
                &claims(now() - 120),
                Some(("HS256", SECRET.as_bytes())),
            ),
        ),
        (
            "no exp",
            jwt(
                &hs("HS256"),
                &serde_json::json!({"user": "x", "iss": "coriolis-ovm-exporter"}),
                Some(("HS256", SECRET.as_bytes())),
            ),
        ),
        (
            "other iss",
            jwt(
                &hs("HS256"),
                &serde_json::json!({"user": "x", "exp": now() + 600, "iss": "gopherbin"}),
                Some(("HS256", SECRET.as_bytes())),
            ),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        (
            "alg none, HS256 signature",
            format!(
                "{}.{}",
                jwt(
                    &serde_json::json!({"alg": "none"}),
                    &claims(now() + 600),
                    None
                )
                .trim_end_matches('.'),
                token.rsplit('.').next().unwrap()
            ),
        ),
    ];
    for (what, t) in &forged {
        let a = ex.request("GET", "/api/v1/vms", Some(t), "");
        assert_eq!(a.status, 401, "{what} was accepted");
        a.assert_error(401, "Not Authorized");
    }
    // The control: the same construction with the right key and claims works.
    let good = jwt(
        &hs("HS256"),
        &claims(now() + 600),
        Some(("HS256", SECRET.as_bytes())),
    );
    assert_eq!(
        ex.request("GET", "/api/v1/vms", Some(&good), "").status,
        200
    );
    ex.request("GET", "/api/v1/vms", None, "")
        .assert_error(401, "Not Authorized");

    // The access log: a line per request, never a password or token.
    let log = ex.log();
    assert!(
        log.contains("access") && log.contains("\"/api/v1/vms/\"") && log.contains("status=200"),
        "{log}"
    );
    assert!(
        log.contains("user=\"admin\"") || log.contains("user=admin"),
        "{log}"
    );
    assert!(!log.contains(MGR_PASS), "a password reached the log");
    assert!(!log.contains(&token), "a token reached the log");
}

#[test]
fn manager_unreachable_or_untrusted_is_502_and_failures_are_rate_limited() {
    let pki = Pki::new();
    let mgr = StandInManager::start(&pki);
    // Trusting the exporter's CA, not the one that signed the Manager.
    let untrusted = Exporter::start(
        &pki,
        Options {
            manager: Some(mgr.endpoint()),
            manager_ca: Some(pki.path("ca.pem")),
            ..Options::default()
        },
    );
    let a = untrusted.login(MGR_USER, MGR_PASS);
    a.assert_error(502, "Bad Gateway");
    assert!(
        a.json()["details"]
            .as_str()
            .unwrap()
            .contains("TLS identity rejected"),
        "{}",
        a.text()
    );
    assert_eq!(mgr.hits(), 0, "no request may follow a refused handshake");

    let closed = format!("https://127.0.0.1:{}", free_port());
    let unreachable = Exporter::start(
        &pki,
        Options {
            manager: Some(closed),
            ..Options::default()
        },
    );
    let a = unreachable.login(MGR_USER, MGR_PASS);
    a.assert_error(502, "Bad Gateway");
    assert!(
        a.json()["details"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{}",
        a.text()
    );

    // Without a Manager CA: not verified (old behaviour), warned at start.
    let lax = Exporter::start(
        &pki,
        Options {
            manager: Some(mgr.endpoint()),
            ..Options::default()
        },
    );
    assert!(lax.log().contains("NOT verified"), "{}", lax.log());
    assert!(!lax.log().contains("chmod 600"), "{}", lax.log());
    assert_eq!(lax.login(MGR_USER, MGR_PASS).status, 200);
    let before = mgr.hits();
    for _ in 0..3 {
        lax.login(MGR_USER, "guess")
            .assert_error(401, "Not Authorized");
    }
    assert_eq!(mgr.hits(), before + 3);
    // Limit reached: refused before the Manager is asked, even when right.
    let limited = lax.login(MGR_USER, MGR_PASS);
    limited.assert_error(429, "Too Many Requests");
    assert!(
        limited
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(
        mgr.hits(),
        before + 3,
        "a rate-limited login reached the Manager"
    );
    let metrics = lax.request("GET", "/metrics", None, "").text();
    assert!(
        metrics.contains("coe_login_failures_total{reason=\"rejected\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("coe_login_failures_total{reason=\"rate_limited\"} 1"),
        "{metrics}"
    );
}

#[test]
fn local_users_bodies_routes_and_ids() {
    let pki = Pki::new();
    let ex = Exporter::start(
        &pki,
        Options {
            local_users: true,
            metrics_token: Some("t".repeat(40)),
            ..Options::default()
        },
    );
    let token = ex.token(LOCAL_USER, LOCAL_PASS);
    assert_eq!(
        ex.request("GET", "/api/v1/vms", Some(&token), "").status,
        200
    );
    ex.login(LOCAL_USER, "nope")
        .assert_error(401, "Not Authorized");
    // No Manager configured: unknown users are rejected, not 502.
    ex.login("someone", "else")
        .assert_error(401, "Not Authorized");

    for body in [
        "{",
        "not json",
        r#"{"username": "backup"}"#,
        r#"["backup", "local-pass-42"]"#,
        r#"{"username": 5, "password": "x"}"#,
    ] {
        ex.request("POST", "/api/v1/auth/login/", None, body)
            .assert_error(400, "Bad Request");
    }

    // Health without auth; metrics with the static token only.
    let h = ex.request("GET", "/api/v1/health", None, "");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    ex.request("GET", "/metrics", None, "")
        .assert_error(401, "Not Authorized");
    let m = ex.request("GET", "/metrics/", Some(&"t".repeat(40)), "");
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains(
            "coe_http_requests_total{route=\"/api/v1/health\",method=\"GET\",status=\"200\"} 1"
        ),
        "{}",
        m.text()
    );
    assert!(m.text().contains("coe_connections_open"));

    ex.request("GET", "/api/v1/nothing", Some(&token), "")
        .assert_error(404, "Not Found");
    ex.request("GET", "/nothing", None, "")
        .assert_error(404, "Not Found");
    ex.request("PUT", "/api/v1/vms", Some(&token), "")
        .assert_error(405, "Method Not Allowed");
    let long = "a".repeat(4000);
    for path in [
        "/api/v1/vms/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/api/v1/vms/x/snapshots/..%2F..%2F..%2Fetc/disks/passwd".to_owned(),
        format!("/api/v1/vms/{long}"),
    ] {
        ex.request("GET", &path, Some(&token), "")
            .assert_error(400, "Bad Request");
    }
    // Dot segments sent raw are no route at all.
    ex.request("GET", "/api/v1/vms/../../etc/passwd", Some(&token), "")
        .assert_error(404, "Not Found");

    // logrotate: move the log away, SIGHUP, and logging goes on in a new file.
    std::fs::rename(ex.dir.path("exporter.log"), ex.dir.path("exporter.log.1")).unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &ex.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + WAIT;
    while !ex.dir.path("exporter.log").exists() {
        assert!(Instant::now() < deadline, "the log was not reopened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ex.request("GET", "/api/v1/health", None, "").status, 200);
    let fresh = std::fs::read_to_string(ex.dir.path("exporter.log")).unwrap();
    assert!(
        fresh.contains("log file reopened") && fresh.contains("\"/api/v1/health\""),
        "{fresh}"
    );
    let rotated = std::fs::read_to_string(ex.dir.path("exporter.log.1")).unwrap();
    assert!(rotated.contains("access"), "{rotated}");
}

#[test]
fn header_limits_timeouts_and_big_bodies() {
    let pki = Pki::new();
    let ex = Exporter::start(
        &pki,
        Options {
            local_users: true,
            ..Options::default()
        },
    );
    let pad: Vec<(String, String)> = (0..200)
        .map(|i| (format!("X-Pad-{i}"), "v".to_owned()))
        .collect();
    let pad_ref = |n: usize| {
        pad[..n]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ex.raw(&http_request(
            "GET",
            "/api/v1/health",
            None,
            &pad_ref(50),
            ""
        ))
        .status,
        200
    );
    assert_eq!(
        ex.raw(&http_request(
            "GET",
            "/api/v1/health",
            None,
            &pad_ref(200),
            ""
        ))
        .status,
        431
    );
    let huge = "h".repeat(100 * 1024);
    assert_eq!(
        ex.raw(&http_request(
            "GET",
            "/api/v1/health",
            None,
            &[("X-Huge", &huge)],
            ""
        ))
        .status,
        431
    );

    // A slow-header client is cut after header_read_timeout (1s): the
    // server closes (never the client's own read timeout, WAIT), and not
    // before the timeout (a lower bound cannot flake on a slow machine).
    let mut tls = ex.connect();
    tls.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    tls.flush().unwrap();
    let start = Instant::now();
    let got = read_until_closed(&mut tls, "a slow-header connection");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    // hyper may say 408 before closing; it never serves the request.
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    // An idle keep-alive connection is cut too: a slot is not held forever.
    let mut tls = ex.connect();
    let keep = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n";
    tls.write_all(keep).unwrap();
    tls.flush().unwrap();
    let got = read_until_closed(&mut tls, "an idle keep-alive connection");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    // A client that never starts TLS is cut after tls_handshake_timeout (2s).
    let mut tcp = TcpStream::connect(("127.0.0.1", ex.port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    let got = read_until_closed(&mut tcp, "a connection without a TLS handshake");
    assert!(got.is_empty(), "the server sent {got:?}");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");

    // A 10 MB login body is refused without being read, and the server lives on.
    let ten_mb = 10 * 1024 * 1024;
    let mut tls = ex.connect();
    let head = format!("POST /api/v1/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {ten_mb}\r\n\r\n");
    tls.write_all(head.as_bytes()).unwrap();
    tls.write_all(&vec![b' '; 64 * 1024]).unwrap();
    tls.flush().unwrap();
    let a = read_answer(&mut tls);
    a.assert_error(413, "Payload Too Large");
    // The same body sent without a length (chunked) is cut at the limit too.
    let mut tls = ex.connect();
    let head =
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
    tls.write_all(head.as_bytes()).unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 32 * 1024, " ".repeat(32 * 1024));
    tls.write_all(chunk.as_bytes()).unwrap();
    tls.flush().unwrap();
    read_answer(&mut tls).assert_error(413, "Payload Too Large");
    assert_eq!(ex.request("GET", "/api/v1/health", None, "").status, 200);
}

#[test]
fn tls_versions_alpn_and_mtls() {
    let pki = Pki::new();
    let ex = Exporter::start(&pki, Options::default());
    // TLS 1.2 works; HTTP/2 is chosen by ALPN.
    let mut t12 = ex
        .connect_with(ex.client_config(None, &[b"http/1.1"], true))
        .unwrap();
    assert_eq!(
        t12.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    t12.write_all(&http_request("GET", "/api/v1/health", None, &[], ""))
        .unwrap();
    assert_eq!(read_answer(&mut t12).status, 200);
    let h2 = ex
        .connect_with(ex.client_config(None, &[b"h2", b"http/1.1"], false))
        .unwrap();
    assert_eq!(h2.conn.alpn_protocol(), Some(b"h2".as_slice()));
    assert_eq!(
        h2.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(h2);
    h2_health(&ex);

    // A TLS 1.1 ClientHello (no supported_versions extension) gets a fatal
    // alert (handshake_failure or protocol_version), never a ServerHello.
    let mut tcp = TcpStream::connect(("127.0.0.1", ex.port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(&tls11_client_hello()).unwrap();
    let mut reply = [0u8; 7];
    tcp.read_exact(&mut reply).unwrap();
    // Record type alert (21), level fatal (2), handshake_failure (40) or
    // protocol_version (70) (RFC 5246 7.2).
    assert_eq!(reply[0], 21, "expected an alert record, got {reply:?}");
    assert_eq!(reply[5], 2, "{reply:?}");
    assert!([40, 70].contains(&reply[6]), "{reply:?}");

    // mTLS: no certificate, no service; the CA's client certificate works.
    let mtls = Exporter::start(
        &pki,
        Options {
            mtls: true,
            ..Options::default()
        },
    );
    let refused = mtls
        .connect_with(mtls.client_config(None, &[b"http/1.1"], false))
        .and_then(|mut t| {
            t.write_all(&http_request("GET", "/api/v1/health", None, &[], ""))?;
            t.flush()?;
            let mut b = Vec::new();
            t.read_to_end(&mut b).map(|_| b)
        });
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|b| b.is_empty()),
        "served without a client certificate: {refused:?}"
    );
    let mut ok = mtls
        .connect_with(mtls.client_config(Some(&pki), &[b"http/1.1"], false))
        .unwrap();
    ok.write_all(&http_request("GET", "/api/v1/health", None, &[], ""))
        .unwrap();
    assert_eq!(read_answer(&mut ok).status, 200);
}

/// `GET /api/v1/health` over HTTP/2 with hyper's client.
fn h2_health(ex: &Exporter) {
    let config = ex.client_config(None, &[b"h2"], false);
    let (version, status, _) = h2_get(ex.port, config, "/api/v1/health", &[]);
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(status, 200);
}

/// Reads until the server closes the connection (end of stream, a TLS
/// close without close_notify, or a reset) and returns what it sent. Panics
/// when the client's own read timeout (WAIT) fires first: the server never
/// closed.
fn read_until_closed(r: &mut impl Read, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_abort(e.kind()) => return got,
            Err(e) => panic!(
                "{what} was not closed by the server within {WAIT:?} ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// A minimal TLS 1.1 ClientHello (RFC 4346 7.4.1.2): version 3.2, AES-CBC
/// suites, no extensions.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // no session id
    let suites: [u16; 3] = [0x002f, 0x0035, 0xc013]; // AES128-SHA, AES256-SHA, ECDHE-RSA-AES128-SHA
    hello.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend_from_slice(&s.to_be_bytes());
    }
    hello.extend_from_slice(&[1, 0]); // compression: null
    let mut hs = vec![1]; // ClientHello
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut rec = vec![22, 0x03, 0x01]; // handshake record, TLS 1.0 record version
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let pki = Pki::new();
    let mgr = StandInManager::start(&pki);
    let mut ex = Exporter::start(
        &pki,
        Options {
            manager: Some(mgr.endpoint()),
            ..Options::default()
        },
    );
    // A login the Manager holds until released, in flight when SIGTERM comes.
    let mut tls = ex.connect();
    let body = serde_json::json!({"username": SLOW_USER, "password": MGR_PASS}).to_string();
    tls.write_all(&http_request(
        "POST",
        "/api/v1/auth/login",
        None,
        &[],
        &body,
    ))
    .unwrap();
    tls.flush().unwrap();
    let start = Instant::now();
    while mgr.hits() == 0 {
        assert!(
            start.elapsed() < WAIT,
            "the login never reached the Manager"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ex.sigterm();
    assert_eq!(ex.notification(), "STOPPING=1");
    // New connections are refused once the listener is closed.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", ex.port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only now does the Manager answer: the login was in flight all along.
    mgr.release_slow();
    let a = read_answer(&mut tls);
    assert_eq!(a.status, 200, "the in-flight login was cut: {}", a.text());
    let status = ex.wait_exit();
    assert!(status.success(), "{status:?}; log:\n{}", ex.log());
    assert!(ex.log().contains("SIGTERM"), "{}", ex.log());
}

// ---- disk bytes over the wire, with an in-test backend ----------------------

const WIRE_VM: &str = "0004fb0000060000ccaf98a0baa2c186";
const WIRE_SNAP: &str = "9633d114-8270-41eb-bffc-67cc342957d9";
const WIRE_DISK: &str = "0004fb000012000005bcf25e906ce843.img";

/// A node with one snapshot of one disk: a real file. Everything else is
/// unknown.
struct FileNode {
    disk: PathBuf,
}

impl coriolis_ovm_exporter::api::Backend for FileNode {
    fn list_vms(&self) -> Result<Vec<coriolis_ovm_exporter::wire::Vm>, BackendError> {
        Ok(Vec::new())
    }
    fn get_vm(&self, vm: &str) -> Result<coriolis_ovm_exporter::wire::Vm, BackendError> {
        Err(BackendError::NotFound(format!("VM {vm} not found")))
    }
    fn list_snapshots(&self, vm: &str, _: bool) -> Result<Vec<Snapshot>, BackendError> {
        Err(BackendError::NotFound(format!("VM {vm} not found")))
    }
    fn create_snapshot(&self, vm: &str) -> Result<Snapshot, BackendError> {
        Err(BackendError::NotFound(format!("VM {vm} not found")))
    }
    fn get_snapshot(
        &self,
        vm: &str,
        _: &str,
        _: &coriolis_ovm_exporter::wire::GetOptions,
        _: &coriolis_ovm_exporter::snapshot::Cancel,
    ) -> Result<Snapshot, BackendError> {
        Err(BackendError::NotFound(format!("VM {vm} not found")))
    }
    fn delete_snapshot(&self, _: &str, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    fn purge_snapshots(&self, vm: &str) -> Result<(), BackendError> {
        Err(BackendError::NotFound(format!("VM {vm} not found")))
    }
    fn open_disk(
        &self,
        vm: &str,
        snap: &str,
        disk: &str,
    ) -> Result<(std::fs::File, u64), BackendError> {
        if (vm, snap, disk) != (WIRE_VM, WIRE_SNAP, WIRE_DISK) {
            return Err(BackendError::NotFound("no such disk".into()));
        }
        let f =
            std::fs::File::open(&self.disk).map_err(|e| BackendError::Internal(e.to_string()))?;
        let size = f
            .metadata()
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .len();
        Ok((f, size))
    }
}

use coriolis_ovm_exporter::api::BackendError;
use coriolis_ovm_exporter::wire::Snapshot;

#[test]
fn disk_bytes_over_tls_with_http1_and_http2_threads() {
    disk_bytes_over_tls_with_http1_and_http2("threads");
}

#[test]
fn disk_bytes_over_tls_with_http1_and_http2_io_uring() {
    disk_bytes_over_tls_with_http1_and_http2("io_uring");
}

fn disk_bytes_over_tls_with_http1_and_http2(backend: &str) {
    let pki = Pki::new();
    let dir = Scratch::temp("wire");
    // Five 1 MiB frames and a bit, so bodies span several frames.
    let size = 5 * (1 << 20) + 77;
    let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(dir.path(WIRE_DISK), &bytes).unwrap();
    let port = free_port();
    let text = Exporter::config(
        &pki,
        &dir,
        port,
        &Options {
            local_users: true,
            ..Options::default()
        },
    ) + &format!("\n[io]\nbackend = {backend:?}\n");
    let config =
        coriolis_ovm_exporter::server::Config::parse(&text, &dir.path("config.toml")).unwrap();
    let backend = Arc::new(FileNode {
        disk: dir.path(WIRE_DISK),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(coriolis_ovm_exporter::server::serve(
            Arc::new(config),
            backend,
            async {
                let _ = stop_rx.await;
            },
            move |addr| ready_tx.send(addr).unwrap(),
        ))
    });
    let addr = ready_rx
        .recv_timeout(WAIT)
        .expect("the server did not start");
    assert_eq!(addr.port(), port);
    let client = Client {
        port,
        ca: pki.certs("ca.pem"),
    };
    let token = client.token(LOCAL_USER, LOCAL_PASS);
    let path = format!("/api/v1/vms/{WIRE_VM}/snapshots/{WIRE_SNAP}/disks/{WIRE_DISK}");

    let whole = client.request("GET", &path, Some(&token), "");
    assert_eq!(whole.status, 200);
    assert_eq!(
        whole.header("content-length"),
        Some(size.to_string().as_str())
    );
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(
        whole.body == bytes,
        "whole body differs ({} bytes)",
        whole.body.len()
    );

    // The Python client's request: one range per chunk.
    let (a, b) = ((1 << 20) - 3, 3 * (1 << 20) + 5);
    let range = format!("bytes={a}-{b}");
    let part = client.raw(&http_request(
        "GET",
        &path,
        Some(&token),
        &[("Range", &range)],
        "",
    ));
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes {a}-{b}/{size}").as_str())
    );
    assert!(part.body == bytes[a..=b], "range body differs");
    let tail = client.raw(&http_request(
        "GET",
        &path,
        Some(&token),
        &[("Range", "bytes=-10")],
        "",
    ));
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, bytes[size - 10..]);
    let bad = client.raw(&http_request(
        "GET",
        &path,
        Some(&token),
        &[("Range", &format!("bytes={size}-"))],
        "",
    ));
    bad.assert_error(416, "Range Not Satisfiable");
    assert_eq!(
        bad.header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );

    // HEAD: the headers of the whole answer, no body.
    let head = client.raw(&http_request("HEAD", &path, Some(&token), &[], ""));
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(size.to_string().as_str())
    );
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    assert!(head.body.is_empty());

    // The same range over HTTP/2.
    let config = client.client_config(None, &[b"h2"], false);
    let headers = [
        ("authorization", format!("Bearer {token}")),
        ("range", range.to_string()),
    ];
    let (version, status, body) = h2_get(port, config, &path, &headers);
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(status, 206);
    assert!(body == bytes[a..=b], "HTTP/2 range body differs");

    stop_tx.send(()).unwrap();
    server.join().unwrap().unwrap();
}
