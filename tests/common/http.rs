//! HTTP/1.1 by hand (request bytes, an answer parsed from a
//! `Connection: close` exchange, chunked bodies included) and one HTTP/2
//! `GET` with hyper's client.

use std::io::Read;
use std::sync::Arc;

use rustls::pki_types::ServerName;

/// The `Content-Length` of a request or answer head, if it has one.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

pub fn http_request(
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        r += &format!("Authorization: Bearer {t}\r\n");
    }
    for (k, v) in headers {
        r += &format!("{k}: {v}\r\n");
    }
    if !body.is_empty() || method == "POST" {
        r += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    r += "\r\n";
    r += body;
    r.into_bytes()
}

/// Whether a read that failed with `kind` saw the server abort the
/// connection (a reset, or the TCP stream ended without TLS's
/// `close_notify`), as opposed to an orderly end or any other failure.
pub fn is_abort(kind: std::io::ErrorKind) -> bool {
    matches!(
        kind,
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
    )
}

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The error contract: status, JSON content type, `error` and `details`.
    pub fn assert_error(&self, status: u16, short: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        assert_eq!(v["error"], short, "{}", self.text());
        assert!(v["details"].as_str().is_some_and(|d| !d.is_empty()));
    }
}

/// Read a whole HTTP/1.1 answer from a `Connection: close` exchange.
pub fn read_answer(r: &mut impl Read) -> Answer {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A peer closing without close_notify after a complete answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => panic!("reading the answer: {e} (got {} bytes)", raw.len()),
        }
    }
    parse_answer(&raw)
}

pub fn parse_answer(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// One `GET` over HTTP/2 (ALPN h2) with hyper's client: the version, the
/// status and the whole body.
pub fn h2_get(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, String)],
) -> (http::Version, http::StatusCode, bytes::Bytes) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::get(format!("https://localhost:{port}{path}"));
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let (version, status) = (resp.version(), resp.status());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (version, status, body)
    })
}
