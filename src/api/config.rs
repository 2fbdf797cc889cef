//! The api layer's sections of the config file: `[jwt]`, `[manager]`,
//! `[auth]` and `[metrics]`, as written (`Raw*`, read by the server's
//! config) and as the layer uses them once each section has validated
//! itself (`validate`). The server's config only puts the sections
//! together, and names the file in a [`SettingError`]'s message.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::parse_go_duration;
use crate::tls;

/// API.md: `exp` defaults to now + 168h.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(168 * 3600);
/// RFC 7518 3.2: an HS256 key must be at least 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;
/// Whole login exchange with the OVM Manager.
pub const DEFAULT_MANAGER_TIMEOUT: Duration = Duration::from_secs(15);
/// Failed logins allowed per client address within the window.
pub const DEFAULT_LOGIN_MAX_FAILURES: u32 = 5;
/// The window over which failed logins are counted.
pub const DEFAULT_LOGIN_WINDOW: Duration = Duration::from_secs(300);
/// The `[jwt] secret` of `config/config.example.toml`, and the one earlier
/// versions shipped: public, so anyone could sign tokens with them. The
/// service refuses to start with either.
pub const PLACEHOLDER_SECRETS: [&str; 2] = [
    "CHANGE-ME: at least 32 random bytes, e.g. the output of openssl rand -base64 48",
    "change this to at least 32 random bytes of secret!!",
];
/// The password hash of the example user in `config/config.example.toml`
/// (its password, "change-me", is printed next to it): refused as a user's
/// hash.
pub const EXAMPLE_PASSWORD_HASH: &str = "$argon2id$v=19$m=65536,t=3,p=1$UWlWZ3paMm0yWmxVcEMycw$Jfoxi0mb5qgmkeajwhQn0la0+iE4oJfbj+mjIgK6+vg";

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

/// A value of one of these sections that cannot be used: the key as the
/// file names it, and the problem (the server's config adds the file).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct SettingError {
    pub key: &'static str,
    pub problem: String,
}

fn bad(key: &'static str, problem: String) -> SettingError {
    SettingError { key, problem }
}

/// A duration key: `default` when absent.
fn duration(
    key: &'static str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, SettingError> {
    match v {
        None => Ok(default),
        Some(s) => parse_go_duration(&s).map_err(|p| bad(key, format!("{s:?}: {p}"))),
    }
}

/// `[jwt]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    secret: Option<String>,
    time_to_live: Option<String>,
}

impl RawJwt {
    pub fn validate(self) -> Result<JwtConfig, SettingError> {
        let secret = match self.secret {
            None => return Err(bad("jwt.secret", "missing".into())),
            Some(s) if s.len() < MIN_SECRET_BYTES => {
                return Err(bad(
                    "jwt.secret",
                    format!(
                        "{} bytes long, at least {MIN_SECRET_BYTES} needed for HS256 (RFC 7518)",
                        s.len()
                    ),
                ))
            }
            Some(s) if PLACEHOLDER_SECRETS.contains(&s.as_str()) => {
                return Err(bad(
                    "jwt.secret",
                    "still the example's placeholder, which is public (anyone could sign \
                     tokens with it); set your own, e.g. `openssl rand -base64 48`"
                        .into(),
                ))
            }
            Some(s) => s.into_bytes(),
        };
        let time_to_live = duration("jwt.time_to_live", self.time_to_live, DEFAULT_TOKEN_TTL)?;
        if time_to_live.is_zero() {
            return Err(bad("jwt.time_to_live", "must be more than 0".into()));
        }
        Ok(JwtConfig {
            secret,
            time_to_live,
        })
    }
}

/// `[manager]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawManager {
    ca_certificate: Option<PathBuf>,
    timeout: Option<String>,
    allow_http: Option<bool>,
}

impl RawManager {
    /// Also checks the file's top-level `ovm_endpoint` (the old service's
    /// key), which `allow_http` governs.
    pub fn validate(self, ovm_endpoint: Option<&str>) -> Result<ManagerConfig, SettingError> {
        let allow_http = self.allow_http.unwrap_or(false);
        if let Some(endpoint) = ovm_endpoint {
            check_endpoint(endpoint, allow_http).map_err(|p| bad("ovm_endpoint", p))?;
        }

        if let Some(ca) = &self.ca_certificate {
            tls::load_certs(ca).map_err(|e| bad("manager.ca_certificate", e.to_string()))?;
        }
        Ok(ManagerConfig {
            ca_certificate: self.ca_certificate,
            timeout: duration("manager.timeout", self.timeout, DEFAULT_MANAGER_TIMEOUT)?,
            allow_http,
        })
    }
}

/// `ovm_endpoint` must be an https URL with a host; `http://` only with
/// `manager.allow_http` (every login's Manager credentials would cross the
/// network in clear text).
fn check_endpoint(endpoint: &str, allow_http: bool) -> Result<(), String> {
    let rest = match (
        endpoint.strip_prefix("https://"),
        endpoint.strip_prefix("http://"),
    ) {
        (Some(rest), _) => rest,
        (None, Some(rest)) if allow_http => rest,
        (None, Some(_)) => {
            return Err(format!(
                "{endpoint:?}: http:// would send every login's Manager credentials in clear \
                 text; use https://, or set manager.allow_http = true to accept that"
            ))
        }
        (None, None) => return Err(format!("{endpoint:?}: expected https://HOST[:PORT]")),
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{endpoint:?}: no host"));
    }
    Ok(())
}

/// `[auth]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default)]
    users: Vec<RawUser>,
    login_max_failures: Option<i64>,
    login_window: Option<String>,
}

/// One `[[auth.users]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    username: String,
    password_hash: String,
}

impl RawAuth {
    pub fn validate(self) -> Result<AuthConfig, SettingError> {
        let mut users = Vec::with_capacity(self.users.len());
        for u in self.users {
            if u.username.is_empty() {
                return Err(bad("auth.users.username", "empty".into()));
            }
            if u.password_hash == EXAMPLE_PASSWORD_HASH {
                return Err(bad(
                    "auth.users.password_hash",
                    format!(
                        "user {:?}: the example's hash, whose password is public; make your own \
                         (see config/config.example.toml)",
                        u.username
                    ),
                ));
            }
            check_password_hash(&u.password_hash).map_err(|p| {
                bad(
                    "auth.users.password_hash",
                    format!("user {:?}: {p}", u.username),
                )
            })?;
            if users.iter().any(|x: &LocalUser| x.username == u.username) {
                return Err(bad(
                    "auth.users.username",
                    format!("{:?} listed twice", u.username),
                ));
            }
            users.push(LocalUser {
                username: u.username,
                password_hash: u.password_hash,
            });
        }
        let login_max_failures = match self.login_max_failures {
            None => DEFAULT_LOGIN_MAX_FAILURES,
            Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => n as u32,
            Some(n) => {
                return Err(bad(
                    "auth.login_max_failures",
                    format!("{n}: must be at least 1"),
                ))
            }
        };
        Ok(AuthConfig {
            users,
            login_max_failures,
            login_window: duration("auth.login_window", self.login_window, DEFAULT_LOGIN_WINDOW)?,
        })
    }
}

/// Check that a config's password hash is a usable Argon2 PHC string.
pub fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(hash)
        .map_err(|e| format!("not a PHC string ({e}); make one with the argon2 CLI"))?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {}
        other => return Err(format!("algorithm {other:?}: expected argon2id")),
    }
    argon2::Params::try_from(&parsed).map_err(|e| format!("bad parameters: {e}"))?;
    if parsed.hash.is_none() {
        return Err("no hash part".into());
    }
    Ok(())
}

/// `[metrics]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    auth: Option<String>,
    token: Option<String>,
}

impl RawMetrics {
    pub fn validate(self) -> Result<MetricsAuth, SettingError> {
        match (self.auth.as_deref().unwrap_or("none"), self.token) {
            ("none", None) => Ok(MetricsAuth::None),
            ("jwt", None) => Ok(MetricsAuth::Jwt),
            ("token", Some(t)) if t.len() >= MIN_SECRET_BYTES => Ok(MetricsAuth::Token(t)),
            ("token", Some(_)) => Err(bad(
                "metrics.token",
                format!("too short, at least {MIN_SECRET_BYTES} bytes"),
            )),
            ("token", None) => Err(bad("metrics.token", "missing".into())),
            ("none" | "jwt", Some(_)) => Err(bad(
                "metrics.token",
                "set, but metrics.auth is not \"token\"".into(),
            )),
            (other, _) => Err(bad(
                "metrics.auth",
                format!("{other:?}: expected \"none\", \"jwt\" or \"token\""),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_the_config_hides_secrets() {
        let jwt = JwtConfig {
            secret: b"0123456789abcdef0123456789abcdef-secret".to_vec(),
            time_to_live: DEFAULT_TOKEN_TTL,
        };
        let token = MetricsAuth::Token("scrape-token-0123456789abcdef0123".into());
        let shown = format!("{jwt:?} {token:?}");
        assert!(
            !shown.contains("secret\"") && !shown.contains("0123456789abcdef"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }
}
