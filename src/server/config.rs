//! The configuration file: parsing, defaults and validation at start.
//!
//! TOML (NODE.md). The old Go service's keys (`db_file`, `ovm_endpoint`,
//! `log_file`, `[jwt]`, `[api]`, `[api.tls]`) keep their meaning so a config
//! written for it keeps working; new keys are documented in
//! `config/config.example.toml`. A bad config stops the service with one
//! line naming the key and the problem ([`ConfigError`]'s `Display`).
//!
//! Each layer owns the type of its own section and validates it
//! (`api::config` for `[jwt]`, `[manager]`, `[auth]`, `[metrics]`;
//! `tls::TlsConfig` for `[api.tls]`; `io::IoConfig` for `[io]`); this module
//! puts them together and names the file in their errors. It reads the
//! files the config names (certificates, keys) only to check them; it owns
//! no long-lived state and never logs a secret.
//! `[inventory]` and `[store]` are kept as raw tables here: their typed
//! parsing belongs to those layers. `[io]` is the io core's own typed
//! [`IoConfig`], parsed and validated here so a bad value stops the start
//! with the same one line as every other key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::config::{RawAuth, RawJwt, RawManager, RawMetrics};
use crate::api::{AuthConfig, JwtConfig, ManagerConfig, MetricsAuth, SettingError};
use crate::duration::parse_go_duration;
use crate::io::IoConfig;
use crate::tls::{self, TlsConfig};

/// Where the service looks when no `-config` is given (NODE.md).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/coriolis-ovm-exporter/config.toml";
/// The old service's default database path.
pub const DEFAULT_DB_FILE: &str = "/etc/coriolis-ovm-exporter/exporter.db";
/// API.md: `Base: https://HOST:5544/api/v1`.
pub const DEFAULT_PORT: u16 = 5544;
/// The old service listened on every address.
pub const DEFAULT_BIND: &str = "0.0.0.0";
/// Time for a client to send its request line and headers (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a client to finish the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish after SIGTERM before being cut.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Concurrent connections; a backup run uses a handful per disk.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap of connections from one address: an eighth of
/// `max_connections`, at most this (a Coriolis worker exporting many disks
/// at once uses a few connections per disk).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 128;
/// Time for a client to send a request body (a login).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = crate::api::state::DEFAULT_BODY_READ_TIMEOUT;
/// Time a response may wait on a client that reads nothing before the
/// connection is cut and its buffers returned.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// Time an HTTP/2 connection may stay open with no request.
pub const DEFAULT_HTTP2_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// HTTP/2 streams one connection may run at once (RFC 9113 recommends no
/// less than 100).
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: usize = 100;
/// `TCP_NOTSENT_LOWAT` of every connection: at most this many bytes wait
/// unsent in the kernel (`sys::socket`). 64 KiB is four TLS records, a
/// refill every ~50 µs at 10 Gbit/s, and where one 1 GiB range over
/// loopback ran fastest (16 KiB to 512 KiB tried, `docs/profile.md`).
pub const DEFAULT_TCP_NOTSENT_LOWAT: u32 = 64 << 10;
/// Header count limit; clients send about ten.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Request line + headers (HTTP/1) and header list (HTTP/2) size cap.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Group and other permission bits (`chmod 600` clears them).
const OTHERS_BITS: u32 = 0o077;
/// Largest accepted HTTP port number.
const MAX_PORT: i64 = 65535;

/// A config that cannot be used; `Display` is the one line printed at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: line {line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("config {path}: {key}: {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub bind: IpAddr,
    pub port: u16,
    pub tls: TlsConfig,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// Connections one address (IPv6: one /64) may hold.
    pub max_connections_per_address: usize,
    /// Connections kept for addresses that hold few (see `server::budget`).
    pub reserved_connections: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Time to receive a request body once the headers are in.
    pub body_read_timeout: Duration,
    /// A response that makes no progress this long is cut: its connection
    /// when writes wait on the client, its HTTP/2 stream alone when the
    /// client keeps that stream's window shut.
    pub send_timeout: Duration,
    /// An HTTP/2 connection with no request this long is closed.
    pub http2_idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    /// Unsent bytes a connection's socket holds at most; 0 leaves the
    /// kernel's default (the whole send buffer).
    pub tcp_notsent_lowat: u32,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    pub db_file: PathBuf,
    /// The OVM Manager's base URL; when absent the inventory may know it
    /// (ovs-agent's `manager_ip`).
    pub ovm_endpoint: Option<String>,
    pub log_file: Option<PathBuf>,
    pub jwt: JwtConfig,
    pub api: ListenerConfig,
    pub manager: ManagerConfig,
    pub auth: AuthConfig,
    pub metrics: MetricsAuth,
    /// Whether group or others can read the file (it holds the JWT secret);
    /// warned at start.
    pub readable_by_others: bool,
    /// Raw `[inventory]` table, parsed by the inventory layer.
    pub inventory: toml::Table,
    /// Raw `[store]` table, parsed by the snapshot store.
    pub store: toml::Table,
    /// Raw `[diff]` table, parsed by the snapshot layer (`exact`).
    pub diff: toml::Table,
    /// The `[io]` section: the read engine's backend and buffers.
    pub io: IoConfig,
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    db_file: Option<PathBuf>,
    ovm_endpoint: Option<String>,
    log_file: Option<PathBuf>,
    jwt: Option<RawJwt>,
    api: Option<RawApi>,
    manager: Option<RawManager>,
    auth: Option<RawAuth>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    inventory: toml::Table,
    #[serde(default)]
    store: toml::Table,
    #[serde(default)]
    diff: toml::Table,
    #[serde(default)]
    io: IoConfig,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    bind: Option<String>,
    port: Option<i64>,
    tls: Option<RawTls>,
    header_read_timeout: Option<String>,
    tls_handshake_timeout: Option<String>,
    shutdown_grace: Option<String>,
    max_connections: Option<i64>,
    max_connections_per_address: Option<i64>,
    reserved_connections: Option<i64>,
    max_headers: Option<i64>,
    max_header_bytes: Option<i64>,
    body_read_timeout: Option<String>,
    send_timeout: Option<String>,
    http2_idle_timeout: Option<String>,
    http2_max_concurrent_streams: Option<i64>,
    tcp_notsent_lowat: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    ca_certificate: Option<PathBuf>,
    require_client_certificate: Option<bool>,
}

impl Config {
    /// Read, parse and validate the config at `path`, including the TLS
    /// certificate and key it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.readable_by_others = std::fs::metadata(path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & OTHERS_BITS != 0)
            .unwrap_or(false);
        Ok(config)
    }

    /// Parse and validate config text; `path` names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0),
            message: e.message().replace('\n', " "),
        })?;
        let bad = |key: &'static str, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem,
        };
        let duration = |key: &'static str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_go_duration(&s).map_err(|p| bad(key, format!("{s:?}: {p}"))),
        };
        let positive = |key: &'static str, v: Option<i64>, default: usize| match v {
            None => Ok(default),
            Some(n) if n > 0 => usize::try_from(n).map_err(|_| bad(key, format!("{n} too large"))),
            Some(n) => Err(bad(key, format!("{n}: must be at least 1"))),
        };

        // Each section validates itself; `bad` puts the file's path on it.
        let section = |e: SettingError| bad(e.key, e.problem);
        let jwt = raw.jwt.unwrap_or_default().validate().map_err(section)?;

        let api = raw.api.unwrap_or_default();
        let bind_text = api.bind.unwrap_or_else(|| DEFAULT_BIND.to_owned());
        let bind: IpAddr = bind_text
            .parse()
            .map_err(|_| bad("api.bind", format!("{bind_text:?} is not an IP address")))?;
        let port = match api.port {
            None => DEFAULT_PORT,
            Some(p) if (1..=MAX_PORT).contains(&p) => p as u16,
            Some(p) => return Err(bad("api.port", format!("{p} is not a port (1-65535)"))),
        };
        let tls = api.tls.unwrap_or_default();
        let certificate = tls
            .certificate
            .ok_or_else(|| bad("api.tls.certificate", "missing".into()))?;
        let key = tls
            .key
            .ok_or_else(|| bad("api.tls.key", "missing".into()))?;
        let require_client_certificate = tls.require_client_certificate.unwrap_or(false);
        if require_client_certificate && tls.ca_certificate.is_none() {
            return Err(bad(
                "api.tls.ca_certificate",
                "missing, but api.tls.require_client_certificate is true".into(),
            ));
        }
        let tls = TlsConfig {
            certificate,
            key,
            ca_certificate: tls.ca_certificate,
            require_client_certificate,
        };
        tls::check(&tls).map_err(|e| bad(e.key(), e.to_string()))?;
        let max_connections = positive(
            "api.max_connections",
            api.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        )?;
        let max_connections_per_address = positive(
            "api.max_connections_per_address",
            api.max_connections_per_address,
            (max_connections / 8).clamp(1, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS),
        )?;
        if max_connections_per_address > max_connections {
            return Err(bad(
                "api.max_connections_per_address",
                format!("{max_connections_per_address}: more than api.max_connections ({max_connections})"),
            ));
        }
        let reserved_connections = match api.reserved_connections {
            None => max_connections / 4,
            Some(n) if n >= 0 && (n as u64) < max_connections as u64 => n as usize,
            Some(n) => {
                return Err(bad(
                    "api.reserved_connections",
                    format!(
                    "{n}: must be at least 0 and less than api.max_connections ({max_connections})"
                ),
                ))
            }
        };
        let http2_max_concurrent_streams = positive(
            "api.http2_max_concurrent_streams",
            api.http2_max_concurrent_streams,
            DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
        )?;
        let http2_max_concurrent_streams = u32::try_from(http2_max_concurrent_streams)
            .map_err(|_| bad("api.http2_max_concurrent_streams", "too large".into()))?;
        let tcp_notsent_lowat = match api.tcp_notsent_lowat {
            None => DEFAULT_TCP_NOTSENT_LOWAT,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|&n| n == 0 || n >= 4096)
                .ok_or_else(|| {
                    bad(
                        "api.tcp_notsent_lowat",
                        format!("{n}: must be 0 (the kernel's default) or from 4096 to 4294967295 bytes"),
                    )
                })?,
        };
        let api = ListenerConfig {
            bind,
            port,
            tls,
            header_read_timeout: duration(
                "api.header_read_timeout",
                api.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            tls_handshake_timeout: duration(
                "api.tls_handshake_timeout",
                api.tls_handshake_timeout,
                DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            )?,
            shutdown_grace: duration(
                "api.shutdown_grace",
                api.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
            )?,
            max_connections,
            max_connections_per_address,
            reserved_connections,
            max_headers: positive("api.max_headers", api.max_headers, DEFAULT_MAX_HEADERS)?,
            max_header_bytes: positive(
                "api.max_header_bytes",
                api.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
            )?,
            body_read_timeout: duration(
                "api.body_read_timeout",
                api.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
            )?,
            send_timeout: duration("api.send_timeout", api.send_timeout, DEFAULT_SEND_TIMEOUT)?,
            http2_idle_timeout: duration(
                "api.http2_idle_timeout",
                api.http2_idle_timeout,
                DEFAULT_HTTP2_IDLE_TIMEOUT,
            )?,
            http2_max_concurrent_streams,
            tcp_notsent_lowat,
        };
        for (key, d) in [
            ("api.body_read_timeout", api.body_read_timeout),
            ("api.send_timeout", api.send_timeout),
            ("api.http2_idle_timeout", api.http2_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(bad(key, "must be more than 0".into()));
            }
        }
        if api.header_read_timeout.is_zero() {
            return Err(bad("api.header_read_timeout", "must be more than 0".into()));
        }
        // Below a few KiB ordinary clients (a JWT is ~300 bytes, plus cookies from
        // proxies) would be refused; 8 KiB is also hyper's smallest read buffer.
        if api.max_header_bytes < 8192 {
            return Err(bad("api.max_header_bytes", "must be at least 8192".into()));
        }

        let manager = raw
            .manager
            .unwrap_or_default()
            .validate(raw.ovm_endpoint.as_deref())
            .map_err(section)?;
        let auth = raw.auth.unwrap_or_default().validate().map_err(section)?;
        let metrics = raw
            .metrics
            .unwrap_or_default()
            .validate()
            .map_err(section)?;

        raw.io.validate().map_err(|e| bad("io", error_text(&e)))?;

        Ok(Config {
            path: path.to_owned(),
            db_file: raw.db_file.unwrap_or_else(|| DEFAULT_DB_FILE.into()),
            ovm_endpoint: raw.ovm_endpoint.map(|e| e.trim_end_matches('/').to_owned()),
            log_file: raw.log_file,
            jwt,
            api,
            manager,
            auth,
            metrics,
            readable_by_others: false,
            inventory: raw.inventory,
            store: raw.store,
            diff: raw.diff,
            io: raw.io,
        })
    }
}

/// An io config error without its `invalid io config:` prefix (the
/// config line already names the section).
fn error_text(e: &crate::io::IoError) -> String {
    match e {
        crate::io::IoError::Config(what) => (*what).to_owned(),
        other => other.to_string(),
    }
}
