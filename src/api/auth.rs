//! Authentication: bearer JWTs, the login check against the OVM Manager or
//! local users, and the rate limit on failed logins.
//!
//! Tokens are HS256 only (RFC 7518; `none` and every other algorithm are
//! refused), with `exp` required and `iss` checked. The Manager check is a
//! blocking ureq call and must only run on the blocking pool. Passwords and
//! tokens never reach a log line or an error message from here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::config::{AuthConfig, LocalUser, ManagerConfig};
use crate::tls;

/// The `iss` of our tokens (the old service's).
pub const TOKEN_ISSUER: &str = "coriolis-ovm-exporter";
/// The Manager's endpoint that the old service used to check credentials:
/// any 2xx answer means the pair is valid (API.md, Login).
pub const MANAGER_CHECK_PATH: &str = "/ovm/core/wsapi/rest/Repository/id";
/// Addresses tracked by the login limiter; past it, expired entries are
/// dropped and then the oldest, so memory stays bounded under a flood.
const MAX_TRACKED_ADDRESSES: usize = 65_536;
/// IPv6 clients are limited per /64: one host usually owns a whole /64.
const IPV6_LIMIT_PREFIX_BITS: u32 = 64;

/// The claims of our tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub user: String,
    pub exp: u64,
    pub iss: String,
}

/// Why a bearer token was refused (all answer 401).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization header is not \"Bearer <token>\"")]
    NotBearer,
    #[error("invalid token: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
}

/// Issues and verifies the service's JWTs.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Only HS256: `Validation::new` already pins it; stated again so a
        // change of default cannot widen it.
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.validate_exp = true;
        // We issue and check on the same clock: no leeway needed.
        validation.leeway = 0;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A fresh token for `user`.
    pub fn issue(&self, user: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.ttl)
            .as_secs();
        let claims = Claims {
            user: user.to_owned(),
            exp,
            iss: TOKEN_ISSUER.to_owned(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(TokenError::Invalid)
    }

    /// The claims of the bearer token of an `Authorization` header value.
    pub fn verify_header(&self, value: Option<&[u8]>) -> Result<Claims, TokenError> {
        let value = value.ok_or(TokenError::Missing)?;
        let value = std::str::from_utf8(value).map_err(|_| TokenError::NotBearer)?;
        let (scheme, token) = value.split_once(' ').ok_or(TokenError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::NotBearer);
        }
        self.verify(token.trim())
    }
}

/// Constant-time check of a password against an Argon2 PHC string. CPU and
/// memory heavy by design: call it on the blocking pool.
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::PasswordVerifier;
    match argon2::PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Outcome of a credentials check that reached a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Rejected,
}

/// Why the Manager could not give a verdict (answered 502).
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("OVM Manager unreachable: {0}")]
    Unreachable(#[source] ureq::Error),
    #[error("OVM Manager TLS identity rejected: {0}")]
    TlsRejected(#[source] ureq::Error),
    #[error("OVM Manager answered HTTP {0}")]
    BadStatus(u16),
}

/// Client of the OVM Manager's login check.
pub struct Manager {
    agent: ureq::Agent,
}

impl Manager {
    /// Build the client: strict verification against `ca` when given, no
    /// verification otherwise (the old service's behaviour; warned at start).
    pub fn new(
        ca: Option<&[rustls::pki_types::CertificateDer<'static>]>,
        timeout: Duration,
    ) -> Self {
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(tls::provider());
        let tls = match ca {
            Some(certs) => tls.root_certs(ureq::tls::RootCerts::new_with_certs(
                &certs
                    .iter()
                    .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                    .collect::<Vec<_>>(),
            )),
            None => tls.disable_verification(true),
        };
        let config = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(timeout))
            // 401/403 are verdicts, not transport errors.
            .http_status_as_error(false)
            // Credentials are never sent on to another URL.
            .max_redirects(0)
            // The Manager is on the management network; a proxy from the
            // environment would see the basic-auth header.
            .proxy(None)
            .build();
        Manager {
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// Ask the Manager whether `username`/`password` is valid. Blocking.
    pub fn check(
        &self,
        endpoint: &str,
        username: &str,
        password: &str,
    ) -> Result<Verdict, ManagerError> {
        let url = format!("{}{MANAGER_CHECK_PATH}", endpoint.trim_end_matches('/'));
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        let answer = self
            .agent
            .get(&url)
            .header("Authorization", format!("Basic {basic}"))
            .header("Accept", "application/json")
            .call();
        match answer {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match status {
                    200..=299 => Ok(Verdict::Valid),
                    401 | 403 => Ok(Verdict::Rejected),
                    other => Err(ManagerError::BadStatus(other)),
                }
            }
            Err(e) => Err(classify(e)),
        }
    }
}

/// Tell a refused TLS identity from an unreachable Manager.
fn classify(e: ureq::Error) -> ManagerError {
    let is_tls = match &e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
        ureq::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => false,
    };
    if is_tls {
        ManagerError::TlsRejected(e)
    } else {
        ManagerError::Unreachable(e)
    }
}

/// Rate limit of failed logins per client address, enforced before any
/// check (so nobody can lock out OVM accounts through this service).
///
/// The limit holds under concurrency: an attempt is admitted by
/// [`LoginLimiter::begin`] only while the address's failures in the window
/// plus its attempts being checked right now are under `max_failures`, so
/// a burst of wrong passwords sent at once gets at most `max_failures`
/// checks and the rest answer 429 before the Manager or argon2 is asked.
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// One address's failures in its window and its attempts in flight.
#[derive(Debug, Clone, Copy)]
struct Entry {
    since: Instant,
    failures: u32,
    in_flight: u32,
}

/// An admitted login attempt; say how it ended with [`Attempt::failed`] or
/// [`Attempt::succeeded`]. Dropped without either (a cancelled request), it
/// counts as nothing but frees its place.
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    key: IpAddr,
}

/// The key a client address is counted under, by the login limiter, the
/// io core's per-owner bound and the server's connection budget: IPv4 (also IPv4-mapped IPv6) as is, IPv6
/// by its /64.
pub(crate) fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & (u128::MAX << (128 - IPV6_LIMIT_PREFIX_BITS));
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// The io core's owner of the streams a client at `addr` starts: its
/// [`address_key`], an IPv4 address as its IPv4-mapped IPv6 form (whose
/// low 64 bits are never all zero, unlike a /64's key).
pub(crate) fn io_owner(addr: IpAddr) -> crate::io::Owner {
    let v6 = match address_key(addr) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    crate::io::Owner::new(u128::from(v6))
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        LoginLimiter {
            max_failures,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(addr: IpAddr) -> IpAddr {
        address_key(addr)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        // A poisoned map only holds counters: keep using it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(retry_after)` when the address has used up its failures.
    pub fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let entries = self.entries();
        let e = entries.get(&Self::key(addr))?;
        let elapsed = now.duration_since(e.since);
        (elapsed < self.window && e.failures >= self.max_failures).then(|| self.window - elapsed)
    }

    /// Admit one attempt from `addr`, or `Err(retry_after)` when its
    /// failures and the attempts it has in flight reach `max_failures`.
    pub fn begin(&self, addr: IpAddr) -> Result<Attempt<'_>, Duration> {
        let now = Instant::now();
        let key = Self::key(addr);
        let mut entries = self.entries();
        if entries.len() >= MAX_TRACKED_ADDRESSES && !entries.contains_key(&key) {
            let window = self.window;
            entries.retain(|_, e| e.in_flight > 0 || now.duration_since(e.since) < window);
            if entries.len() >= MAX_TRACKED_ADDRESSES {
                let oldest = entries
                    .iter()
                    .filter(|(_, e)| e.in_flight == 0)
                    .min_by_key(|(_, e)| e.since)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => {
                        entries.remove(&k);
                    }
                    // Every tracked address has a check running: no room.
                    None => return Err(Duration::from_secs(1)),
                }
            }
        }
        let e = entries.entry(key).or_insert(Entry {
            since: now,
            failures: 0,
            in_flight: 0,
        });
        let elapsed = now.duration_since(e.since);
        if elapsed >= self.window {
            e.since = now;
            e.failures = 0;
        }
        if e.failures.saturating_add(e.in_flight) >= self.max_failures {
            // Blocked by failures: until the window ends; by attempts in
            // flight: a check takes about a second.
            let wait = if e.failures >= self.max_failures {
                self.window.saturating_sub(now.duration_since(e.since))
            } else {
                Duration::from_secs(1)
            };
            return Err(wait);
        }
        e.in_flight += 1;
        Ok(Attempt { limiter: self, key })
    }

    fn end(&self, key: IpAddr, outcome: Option<bool>) {
        let now = Instant::now();
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(&key) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        match outcome {
            Some(true) => e.failures = 0,
            Some(false) => {
                if now.duration_since(e.since) >= self.window {
                    e.since = now;
                    e.failures = 0;
                }
                e.failures = e.failures.saturating_add(1);
            }
            None => {}
        }
        if e.failures == 0 && e.in_flight == 0 {
            entries.remove(&key);
        }
    }

    /// Count a failed login (outside an [`Attempt`]).
    pub fn failed(&self, addr: IpAddr) {
        if let Ok(a) = self.begin(addr) {
            a.failed();
        }
    }

    /// Forget an address's failures after a successful login.
    pub fn succeeded(&self, addr: IpAddr) {
        if let Some(e) = self.entries().get_mut(&Self::key(addr)) {
            e.failures = 0;
        }
    }
}

impl Attempt<'_> {
    /// The credentials were refused, or nobody could vouch for them (a
    /// Manager that did not answer counts too: otherwise an attacker who
    /// can make it fail gets unlimited tries).
    pub fn failed(self) {
        let (l, key) = (self.limiter, self.key);
        std::mem::forget(self);
        l.end(key, Some(false));
    }

    /// The credentials were accepted: the address's failures are forgotten.
    pub fn succeeded(self) {
        let (l, key) = (self.limiter, self.key);
        std::mem::forget(self);
        l.end(key, Some(true));
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.limiter.end(self.key, None);
    }
}

/// Everything the login route needs.
pub struct Login {
    pub users: Vec<LocalUser>,
    pub endpoint: Option<String>,
    pub manager: Manager,
    pub limiter: LoginLimiter,
}

/// Why a login could not be decided (502).
pub type LoginError = ManagerError;

impl Login {
    /// From the `[auth]` and `[manager]` sections and the configured
    /// Manager endpoint (`ovm_endpoint`).
    pub fn from_config(
        auth: &AuthConfig,
        manager: &ManagerConfig,
        endpoint: Option<String>,
    ) -> Result<Arc<Self>, tls::TlsError> {
        let ca = match &manager.ca_certificate {
            Some(p) => Some(tls::load_certs(p)?),
            None => None,
        };
        Ok(Arc::new(Login {
            users: auth.users.clone(),
            endpoint,
            manager: Manager::new(ca.as_deref(), manager.timeout),
            limiter: LoginLimiter::new(auth.login_max_failures, auth.login_window),
        }))
    }

    /// Check credentials: a local user by its hash, anyone else against the
    /// Manager (`endpoint` overrides the configured one when the backend
    /// knows it). Blocking.
    pub fn check(
        &self,
        username: &str,
        password: &str,
        fallback_endpoint: Option<String>,
    ) -> Result<Verdict, LoginError> {
        if username.is_empty() || password.is_empty() {
            return Ok(Verdict::Rejected);
        }
        if let Some(user) = self.users.iter().find(|u| u.username == username) {
            return Ok(if verify_password(&user.password_hash, password) {
                Verdict::Valid
            } else {
                Verdict::Rejected
            });
        }
        // No Manager known and no such local user: nobody can vouch for
        // these credentials.
        match self.endpoint.clone().or(fallback_endpoint) {
            Some(endpoint) => self.manager.check(&endpoint, username, password),
            None => Ok(Verdict::Rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::check_password_hash;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let t = Tokens::new(SECRET, Duration::from_secs(60));
        let tok = t.issue("admin").unwrap();
        assert_eq!(t.verify(&tok).unwrap().user, "admin");
        let other = Tokens::new(
            b"another secret of 32 bytes or more!!",
            Duration::from_secs(60),
        );
        assert!(other.verify(&tok).is_err());
        let mut bad = tok.clone();
        bad.pop();
        assert!(t.verify(&bad).is_err());
        let header = format!("Bearer {tok}");
        assert!(t.verify_header(Some(header.as_bytes())).is_ok());
        assert!(matches!(t.verify_header(None), Err(TokenError::Missing)));
        assert!(matches!(
            t.verify_header(Some(format!("Basic {tok}").as_bytes())),
            Err(TokenError::NotBearer)
        ));
    }

    #[test]
    fn limiter_blocks_after_max_failures_and_forgets_on_success() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(l.blocked(a).is_none());
        l.failed(a);
        assert!(l.blocked(a).is_none());
        l.failed(a);
        assert!(l.blocked(a).is_some());
        assert!(l.blocked(b).is_none());
        l.succeeded(a);
        assert!(l.blocked(a).is_none());
        // Two addresses of one /64 share a counter.
        let c: IpAddr = "2001:db8::1".parse().unwrap();
        let d: IpAddr = "2001:db8::2".parse().unwrap();
        l.failed(c);
        l.failed(d);
        assert!(l.blocked(c).is_some());
    }

    #[test]
    fn limiter_counts_attempts_in_flight() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let attempts: Vec<_> = (0..3).map(|_| l.begin(a).unwrap()).collect();
        // Three checks running: a fourth waits, whatever they will say.
        assert!(l.begin(a).is_err());
        assert!(l.begin("192.0.2.2".parse().unwrap()).is_ok());
        let mut it = attempts.into_iter();
        it.next().unwrap().failed();
        drop(it.next()); // cancelled: counts as nothing
                         // One failure and one check running: room for one more.
        let extra = l.begin(a).unwrap();
        assert!(l.begin(a).is_err());
        drop(extra);
        it.next().unwrap().succeeded();
        assert!(l.blocked(a).is_none());
        assert!(l.entries().is_empty(), "nothing left once all ended well");
        for _ in 0..3 {
            l.begin(a).unwrap().failed();
        }
        let wait = l.begin(a).err().expect("blocked");
        assert!(wait > Duration::from_secs(50), "{wait:?}");
    }

    #[test]
    fn password_hash_check() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"fixed salt 16 by").unwrap();
        let hash = argon2::Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        assert!(check_password_hash(&hash).is_ok());
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3cret "));
        assert!(check_password_hash("s3cret").is_err());
        assert!(check_password_hash("$6$salt$abc").is_err());
    }
}
