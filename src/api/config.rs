//! The api layer's sections of the config file: `[jwt]`, `[manager]`,
//! `[auth]` and `[metrics]`, as the layer uses them once validated (the
//! server's config puts the sections together).

use std::path::PathBuf;
use std::time::Duration;

/// How `GET /metrics` is protected.
#[derive(Clone, PartialEq, Eq)]
pub enum MetricsAuth {
    /// Open: the metrics hold counters by route template, no ids or names.
    None,
    /// A bearer JWT from `/auth/login`, like every other route.
    Jwt,
    /// A static bearer token (what Prometheus' `authorization` sends).
    Token(String),
}

// Secrets never reach a log line, even through `{:?}` of the config.
impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAuth::None => f.write_str("None"),
            MetricsAuth::Jwt => f.write_str("Jwt"),
            MetricsAuth::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// A local user (non-OVM hosts, or an account independent of the Manager).
#[derive(Clone, Debug)]
pub struct LocalUser {
    pub username: String,
    /// Argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    pub password_hash: String,
}

/// `[jwt]`: the tokens' signing secret and lifetime.
#[derive(Clone)]
pub struct JwtConfig {
    pub secret: Vec<u8>,
    pub time_to_live: Duration,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &"<redacted>")
            .field("time_to_live", &self.time_to_live)
            .finish()
    }
}

/// `[manager]`: how the login check reaches the OVM Manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// CA to verify the Manager with; `None` means not verified (warned).
    pub ca_certificate: Option<PathBuf>,
    pub timeout: Duration,
    /// `manager.allow_http`: an `http://` endpoint was accepted (warned at
    /// start: credentials cross the network in clear text).
    pub allow_http: bool,
}

/// `[auth]`: local users and the rate limit on failed logins.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub users: Vec<LocalUser>,
    pub login_max_failures: u32,
    pub login_window: Duration,
}
