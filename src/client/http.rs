//! The client's HTTPS side: one `ureq` agent over rustls, the API's paths,
//! and turning answers into typed values or [`ClientError`]s.
//!
//! It owns TLS trust (a CA file, or `--insecure`, never a silent default
//! that trusts nothing or everything), URL building with every id
//! percent-encoded as one path segment, and the reading of error bodies. It
//! never logs or formats the bearer token or a password.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use ureq::http::{Response, StatusCode};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig, TlsProvider};
use ureq::Body;

use super::error::{ClientError, Result};
use crate::wire::{ErrorBody, LoginResponse};

/// Largest JSON answer read. A snapshot of a big fragmented disk lists
/// millions of chunks at about 70 bytes each; this bounds memory against a
/// broken or hostile server while leaving room for those.
const MAX_JSON_BODY: u64 = 1 << 30;
/// Largest error body read; the server's are a short JSON object.
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// Connecting (TCP + TLS) to the exporter: a node on the same network
/// answers in milliseconds; a minute means it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for any single read of an answer (headers or body bytes): a
/// snapshot or diff of a huge disk can take the server a while to compute,
/// but never minutes of silence.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// Tries of a create whose answer was lost (0.5 + 1 + 2 + 4 + 8 s of
/// waits): enough for a server restart.
pub const CREATE_TRIES: u32 = 6;
/// The API's prefix (API.md: `Base: https://HOST:5544/api/v1`).
const API_PREFIX: &str = "/api/v1";

/// Which server certificates to trust.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM file of the CA (or the self-signed certificate) to trust.
    pub ca_file: Option<PathBuf>,
    /// Do not verify the server at all (warned on stderr by the caller).
    pub insecure: bool,
    /// Client certificate chain and key (PEM) for servers that require mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A connection to one exporter, with or without a token.
pub struct Api {
    agent: ureq::Agent,
    /// `https://host:port` plus any proxy prefix, without a trailing `/`
    /// and without `/api/v1`.
    base: String,
    token: Option<String>,
}

/// Percent-encodes one path segment (RFC 3986 unreserved characters stay).
pub fn seg(s: &str) -> String {
    // `.` and `..` as whole segments would be folded away by any URL
    // normalization on the way; encoded, they stay ids (and are not found).
    if s == "." || s == ".." {
        return s.replace('.', "%2E");
    }
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The API paths (below `/api/v1`) the client uses.
pub mod paths {
    use super::seg;

    pub fn vms() -> String {
        "/vms".to_owned()
    }
    pub fn vm(vm: &str) -> String {
        format!("/vms/{}", seg(vm))
    }
    pub fn snapshots(vm: &str) -> String {
        format!("/vms/{}/snapshots", seg(vm))
    }
    pub fn snapshot(vm: &str, snap: &str) -> String {
        format!("/vms/{}/snapshots/{}", seg(vm), seg(snap))
    }
    pub fn disk(vm: &str, snap: &str, disk: &str) -> String {
        format!(
            "/vms/{}/snapshots/{}/disks/{}",
            seg(vm),
            seg(snap),
            seg(disk)
        )
    }
}

/// `https://host[:port][/prefix]` from what a user typed: trailing slashes
/// and a trailing `/api/v1` are dropped; anything but https is refused (the
/// exporter only speaks TLS, and a token must never cross in clear).
pub fn normalize_url(url: &str) -> Result<String> {
    let u = url.trim();
    let lower = u.to_ascii_lowercase();
    if !lower.starts_with("https://") {
        return Err(ClientError::Usage(format!(
            "--url {u:?}: the exporter is served over HTTPS only; use https://HOST:PORT"
        )));
    }
    let mut u = u.trim_end_matches('/').to_owned();
    if u.to_ascii_lowercase().ends_with(API_PREFIX) {
        u.truncate(u.len() - API_PREFIX.len());
        u = u.trim_end_matches('/').to_owned();
    }
    if u.len() <= "https://".len() {
        return Err(ClientError::Usage(format!("--url {url:?}: no host")));
    }
    Ok(u)
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ClientError::Local {
        what: "cannot read",
        path: path.to_owned(),
        source,
    })
}

fn tls_config(opts: &TlsOptions) -> Result<TlsConfig> {
    let mut b = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(crate::tls::provider());
    if opts.insecure {
        b = b.disable_verification(true);
    } else if let Some(path) = &opts.ca_file {
        let pem = read_pem(path)?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(ClientError::Protocol {
                        what: format!("CA file {}", path.display()),
                        problem: e.to_string(),
                    })
                }
            }
        }
        if certs.is_empty() {
            return Err(ClientError::CaEmpty(path.clone()));
        }
        b = b.root_certs(RootCerts::new_with_certs(&certs));
    } else {
        return Err(ClientError::Usage(
            "no way to verify the server: give --ca-file FILE (or COE_CA_FILE) with the CA or \
             the server's certificate, or --insecure to skip verification"
                .to_owned(),
        ));
    }
    if let Some((cert, key)) = &opts.client_cert {
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&read_pem(cert)?)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(ClientError::CaEmpty(cert.clone()));
        }
        let key_pem = read_pem(key)?;
        let key: PrivateKey<'static> =
            PrivateKey::from_pem(&key_pem).map_err(|e| ClientError::Protocol {
                what: format!("client key {}", key.display()),
                problem: e.to_string(),
            })?;
        b = b.client_cert(Some(ClientCert::new_with_certs(&certs, key)));
    }
    Ok(b.build())
}

impl Api {
    /// An agent for `url` keeping up to `connections` idle connections
    /// (one per download job).
    pub fn new(url: &str, tls: &TlsOptions, connections: usize) -> Result<Api> {
        let base = normalize_url(url)?;
        let config = ureq::Agent::config_builder()
            .tls_config(tls_config(tls)?)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .max_idle_connections_per_host(connections.max(1))
            .max_idle_connections(connections.max(1))
            .user_agent(concat!(
                "coriolis-ovm-exporter-client/",
                env!("CARGO_PKG_VERSION")
            ))
            .build();
        Ok(Api {
            agent: ureq::Agent::new_with_config(config),
            base,
            token: None,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
    }

    fn url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}{path}", self.base)
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn transport(what: &str, e: ureq::Error) -> ClientError {
        ClientError::Transport {
            what: what.to_owned(),
            source: Box::new(e),
        }
    }

    /// `GET path` (below `/api/v1`), with the token.
    pub fn get(&self, what: &str, path_and_query: &str) -> Result<Response<Body>> {
        let mut req = self.agent.get(self.url(path_and_query));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        req.call().map_err(|e| Self::transport(what, e))
    }

    /// `GET` answering JSON, read whole (bounded).
    pub fn get_json<T: DeserializeOwned>(&self, what: &str, path_and_query: &str) -> Result<T> {
        let resp = check(what, self.get(what, path_and_query)?)?;
        read_json(what, resp)
    }

    /// `POST` without a body, answering JSON.
    pub fn post_json<T: DeserializeOwned>(&self, what: &str, path: &str) -> Result<T> {
        let mut req = self.agent.post(self.url(path));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.send_empty().map_err(|e| Self::transport(what, e))?;
        read_json(what, check(what, resp)?)
    }

    /// `POST .../snapshots` with an `Idempotency-Key` (a new UUID per
    /// call): an answer lost to a dropped connection or a server restart,
    /// or a 503 while the server's database reopens, is retried with the
    /// same key, so the server answers the snapshot the first try made
    /// instead of making a second one. Retries back off 0.5 s doubling,
    /// [`CREATE_TRIES`] tries in all.
    pub fn create_snapshot<T: DeserializeOwned>(&self, vm: &str) -> Result<T> {
        let what = format!("snapshot of VM {vm}");
        let key = uuid::Uuid::new_v4().to_string();
        let mut wait = Duration::from_millis(500);
        let mut tries = 0;
        loop {
            tries += 1;
            let mut req = self
                .agent
                .post(self.url(&paths::snapshots(vm)))
                .header("Idempotency-Key", &key);
            if let Some(a) = self.auth() {
                req = req.header("Authorization", a);
            }
            let err = match req.send_empty() {
                Ok(resp) if resp.status().as_u16() == 503 => check(&what, resp).err(),
                Ok(resp) => match check(&what, resp) {
                    Ok(resp) => match read_json(&what, resp) {
                        // The answer was cut on its way: the snapshot may exist.
                        Err(e @ ClientError::Transport { .. }) => Some(e),
                        r => return r,
                    },
                    Err(e) => return Err(e),
                },
                Err(e) => Some(Self::transport(&what, e)),
            };
            let err = err.expect("an error to retry");
            if tries >= CREATE_TRIES {
                return Err(err);
            }
            eprintln!(
                "warning: {what}: {}; retrying in {:?} (same Idempotency-Key)",
                err.chain(),
                wait
            );
            std::thread::sleep(wait);
            wait *= 2;
        }
    }

    /// `DELETE path`; any 2xx is success.
    pub fn delete(&self, what: &str, path: &str) -> Result<()> {
        let mut req = self.agent.delete(self.url(path));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.call().map_err(|e| Self::transport(what, e))?;
        let mut resp = check(what, resp)?;
        // Drain so the connection goes back to the pool.
        let _ = resp
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BODY)
            .read_to_vec();
        Ok(())
    }

    /// `POST /auth/login`; the token.
    pub fn login(&self, user: &str, password: &str) -> Result<String> {
        let what = "login";
        let body = serde_json::to_vec(&serde_json::json!({
            "username": user,
            "password": password,
        }))
        .map_err(|source| ClientError::Json {
            what: what.to_owned(),
            source,
        })?;
        let resp = self
            .agent
            .post(self.url("/auth/login"))
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(|e| Self::transport(what, e))?;
        let r: LoginResponse = read_json(what, check(what, resp)?)?;
        Ok(r.token)
    }

    /// The size of a snapshot's disk: `Content-Length` of a HEAD.
    pub fn disk_size(&self, vm: &str, snap: &str, disk: &str) -> Result<u64> {
        let what = format!("size of disk {disk}");
        let mut req = self.agent.head(self.url(&paths::disk(vm, snap, disk)));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.call().map_err(|e| Self::transport(&what, e))?;
        let resp = check(&what, resp)?;
        header_u64(&resp, "content-length").ok_or_else(|| ClientError::Protocol {
            what,
            problem: "HEAD answered without a Content-Length".to_owned(),
        })
    }

    /// Ok if the disk of the snapshot is still served; a 404 says the
    /// snapshot (or disk) is gone, as "not found" (exit 4). Tells a
    /// snapshot deleted meanwhile from an endpoint the server lacks.
    pub fn still_there(&self, vm: &str, snap: &str, disk: &str) -> Result<()> {
        match self.disk_size(vm, snap, disk) {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Err(ClientError::Http {
                what: format!("disk {disk} of snapshot {snap}"),
                status: 404,
                short: "Not Found".to_owned(),
                details: "not found (the snapshot was deleted while it was being read?)".to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    /// `GET` one byte range `[start, end)` of a disk; the body reader,
    /// after checking the answer is exactly that range (a whole-file 200
    /// written at an offset would corrupt the replica).
    pub fn get_range(
        &self,
        vm: &str,
        snap: &str,
        disk: &str,
        start: u64,
        end: u64,
    ) -> Result<impl Read + 'static> {
        let what = format!("disk {disk} bytes {start}-{}", end - 1);
        let mut req = self
            .agent
            .get(self.url(&paths::disk(vm, snap, disk)))
            .header("Range", format!("bytes={start}-{}", end - 1));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.call().map_err(|e| Self::transport(&what, e))?;
        let resp = check(&what, resp)?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(ClientError::Protocol {
                what,
                problem: format!("status {} instead of 206", resp.status().as_u16()),
            });
        }
        let want = format!("bytes {start}-{}/", end - 1);
        let got = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !got.starts_with(&want) {
            return Err(ClientError::Protocol {
                what,
                problem: format!("Content-Range {got:?} is not the range asked for"),
            });
        }
        Ok(resp.into_body().into_reader())
    }
}

/// A header's value as a number.
pub fn header_u64(resp: &Response<Body>, name: &str) -> Option<u64> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The answer when it is a success; else its error body as a
/// [`ClientError::Http`].
pub fn check(what: &str, resp: Response<Body>) -> Result<Response<Body>> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let mut body = resp.into_body();
    let bytes = body
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_vec()
        .unwrap_or_default();
    let (short, details) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(ErrorBody {
            details,
            code: Some(code),
            ..
        }) if crate::wire::needs_full_copy(&code) => {
            return Err(ClientError::BaseUnusable {
                what: what.to_owned(),
                status: status.as_u16(),
                code,
                details,
            })
        }
        Ok(e) => (e.error, e.details),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_owned(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                .trim()
                .to_owned(),
        ),
    };
    Err(ClientError::Http {
        what: what.to_owned(),
        status: status.as_u16(),
        short,
        details,
    })
}

pub fn read_json<T: DeserializeOwned>(what: &str, resp: Response<Body>) -> Result<T> {
    let mut body = resp.into_body();
    let bytes = body
        .with_config()
        .limit(MAX_JSON_BODY)
        .read_to_vec()
        .map_err(|e| ClientError::Transport {
            what: what.to_owned(),
            source: Box::new(e),
        })?;
    serde_json::from_slice(&bytes).map_err(|source| ClientError::Json {
        what: what.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(seg("0004fb00.img"), "0004fb00.img");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
        assert_eq!(seg(".."), "%2E%2E");
        assert_eq!(seg("a..b"), "a..b");
        assert_eq!(seg("é"), "%C3%A9");
        assert_eq!(
            paths::disk("v m", "s", "d/x"),
            "/vms/v%20m/snapshots/s/disks/d%2Fx"
        );
    }

    #[test]
    fn urls_are_normalized_and_https_only() {
        assert_eq!(normalize_url("https://h:5544/").unwrap(), "https://h:5544");
        assert_eq!(
            normalize_url("https://h:5544/api/v1/").unwrap(),
            "https://h:5544"
        );
        assert_eq!(
            normalize_url("https://h/proxy/api/v1").unwrap(),
            "https://h/proxy"
        );
        assert!(matches!(
            normalize_url("http://h:5544"),
            Err(ClientError::Usage(_))
        ));
        assert!(normalize_url("https://").is_err());
    }

    #[test]
    fn no_trust_setting_is_a_usage_error() {
        assert!(matches!(
            tls_config(&TlsOptions::default()),
            Err(ClientError::Usage(_))
        ));
    }
}
