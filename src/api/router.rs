//! Routing: the static route table, the one auth check, and the handlers.
//!
//! Every request goes: match the path against [`ROUTES`] (trailing slash
//! optional, ids percent-decoded and checked for length and charset, never
//! used as paths) → check access once (bearer JWT, metrics auth, or none) →
//! the handler, which calls the [`Backend`] on the blocking pool → one
//! error mapping ([`ApiError`]). Unknown paths answer 404 with the error
//! body, known paths with another method 405.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::auth::{Login, Tokens, Verdict};
use super::body::{AccessRecord, ApiBody};
use super::config::MetricsAuth;
use super::metrics::Metrics;
use super::{blocking, disk, json_response, ApiError, Backend};
use crate::io::IoEngine;
use crate::wire::{LoginRequest, LoginResponse};

/// Largest login body read. The real one is under 1 KiB; bigger ones are
/// refused (413) without being read whole.
pub const MAX_LOGIN_BODY: usize = 16 * 1024;
/// Longest accepted path id: VM ids are 32 hex, snapshot ids 36, disk file
/// names about 40; room for static-inventory names, none for abuse.
pub const MAX_ID_LEN: usize = 128;
/// Time for a client to send a request body (a login) once its headers are
/// in; a body that trickles in longer is answered 408 (`api.body_read_timeout`).
pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Credential checks running at once (each can hold an Argon2 buffer or a
/// Manager connection); more wait.
const LOGIN_CONCURRENCY: usize = 16;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (login, health).
    Public,
    /// `Authorization: Bearer <jwt>`.
    Bearer,
    /// As `[metrics] auth` says.
    Metrics,
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Login,
    Health,
    Metrics,
    ListVms,
    GetVm,
    ListSnapshots,
    CreateSnapshot,
    PurgeSnapshots,
    GetSnapshot,
    DeleteSnapshot,
    Disk,
    /// Extension (ENDPOINTS.md): a disk's changes as one incremental stream.
    Incremental,
    /// Extension (ENDPOINTS.md): CRC-32 per block of a disk.
    Checksums,
}

/// One route: method, path template (`{name}` segments are ids), access.
#[derive(Debug)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub handler: Handler,
}

const VM: &str = "/api/v1/vms/{vm}";
const SNAPS: &str = "/api/v1/vms/{vm}/snapshots";
const SNAP: &str = "/api/v1/vms/{vm}/snapshots/{snap}";
const DISK: &str = "/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk}";
const INCREMENTAL: &str = "/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk}/incremental";
const CHECKSUMS: &str = "/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk}/checksums";

/// Every route of the service (API.md). `docs/openapi.yaml` lists exactly
/// these; a test keeps the two in step.
pub static ROUTES: &[Route] = &[
    Route {
        method: Method::POST,
        path: "/api/v1/auth/login",
        access: Access::Public,
        handler: Handler::Login,
    },
    Route {
        method: Method::GET,
        path: "/api/v1/health",
        access: Access::Public,
        handler: Handler::Health,
    },
    Route {
        method: Method::GET,
        path: "/metrics",
        access: Access::Metrics,
        handler: Handler::Metrics,
    },
    Route {
        method: Method::GET,
        path: "/api/v1/vms",
        access: Access::Bearer,
        handler: Handler::ListVms,
    },
    Route {
        method: Method::GET,
        path: VM,
        access: Access::Bearer,
        handler: Handler::GetVm,
    },
    Route {
        method: Method::GET,
        path: SNAPS,
        access: Access::Bearer,
        handler: Handler::ListSnapshots,
    },
    Route {
        method: Method::POST,
        path: SNAPS,
        access: Access::Bearer,
        handler: Handler::CreateSnapshot,
    },
    Route {
        method: Method::DELETE,
        path: SNAPS,
        access: Access::Bearer,
        handler: Handler::PurgeSnapshots,
    },
    Route {
        method: Method::GET,
        path: SNAP,
        access: Access::Bearer,
        handler: Handler::GetSnapshot,
    },
    Route {
        method: Method::DELETE,
        path: SNAP,
        access: Access::Bearer,
        handler: Handler::DeleteSnapshot,
    },
    Route {
        method: Method::GET,
        path: DISK,
        access: Access::Bearer,
        handler: Handler::Disk,
    },
    Route {
        method: Method::HEAD,
        path: DISK,
        access: Access::Bearer,
        handler: Handler::Disk,
    },
    Route {
        method: Method::GET,
        path: INCREMENTAL,
        access: Access::Bearer,
        handler: Handler::Incremental,
    },
    Route {
        method: Method::GET,
        path: CHECKSUMS,
        access: Access::Bearer,
        handler: Handler::Checksums,
    },
];

/// Everything a request needs, shared by all connections.
pub struct State {
    pub backend: Arc<dyn Backend>,
    pub tokens: Tokens,
    pub login: Arc<Login>,
    pub metrics: Arc<Metrics>,
    pub metrics_auth: MetricsAuth,
    /// The io core every disk byte is read through.
    pub engine: IoEngine,
    login_permits: Semaphore,
    /// Time a request body (a login) may take to arrive; set by the server
    /// from `api.body_read_timeout` before the state is shared.
    pub body_read_timeout: std::time::Duration,
}

impl State {
    /// A state from its parts (the server builds them from its config).
    pub fn from_parts(
        backend: Arc<dyn Backend>,
        tokens: Tokens,
        login: Arc<Login>,
        metrics_auth: MetricsAuth,
        engine: IoEngine,
    ) -> Arc<State> {
        Arc::new(State {
            backend,
            tokens,
            login,
            metrics: Arc::new(Metrics::default()),
            metrics_auth,
            engine,
            login_permits: Semaphore::new(LOGIN_CONCURRENCY),
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
        })
    }
}

/// The ids of a matched path, in template order.
type Params = Vec<String>;

/// Why a path did not match a route.
enum NoMatch {
    /// No template has this shape.
    NotFound,
    /// A template matched with another method; the allowed ones.
    Method(String),
    /// The shape matched but an id is malformed.
    BadId(String),
}

/// Find the route of `method` `path`.
fn find(method: &Method, path: &str) -> Result<(&'static Route, Params), NoMatch> {
    // One trailing slash is allowed on every route (API.md).
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let segs: Vec<&str> = path.split('/').collect();
    let mut allowed: Vec<&'static str> = Vec::new();
    let mut bad_id = None;
    for route in ROUTES {
        let tmpl: Vec<&str> = route.path.split('/').collect();
        if tmpl.len() != segs.len() {
            continue;
        }
        let mut params = Vec::new();
        let mut ok = true;
        for (t, s) in tmpl.iter().zip(&segs) {
            if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                // An empty segment (`//`) is no id at all: not this route.
                if s.is_empty() {
                    ok = false;
                    break;
                }
                match decode_id(s) {
                    Ok(id) => params.push(id),
                    Err(why) => {
                        bad_id.get_or_insert_with(|| format!("invalid {name} id: {why}"));
                        ok = false;
                        break;
                    }
                }
            } else if t != s {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        if route.method == *method {
            return Ok((route, params));
        }
        allowed.push(route.method.as_str());
    }
    if !allowed.is_empty() {
        return Err(NoMatch::Method(allowed.join(", ")));
    }
    match bad_id {
        Some(why) => Err(NoMatch::BadId(why)),
        None => Err(NoMatch::NotFound),
    }
}

/// Percent-decode a path segment and check it is a plausible id:
/// 1..=MAX_ID_LEN of `[A-Za-z0-9._-]`, not starting with a dot. Ids are
/// looked up, never joined to a path; the check keeps junk out of logs and
/// backends all the same.
pub fn decode_id(seg: &str) -> Result<String, String> {
    let bytes = percent_decode(seg.as_bytes()).ok_or("bad percent-encoding")?;
    if bytes.is_empty() {
        return Err("empty".into());
    }
    if bytes.len() > MAX_ID_LEN {
        return Err(format!("longer than {MAX_ID_LEN} bytes"));
    }
    if bytes[0] == b'.' {
        return Err("starts with a dot".into());
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only letters, digits, '.', '_' and '-' are allowed".into());
    }
    // All ASCII by the check above.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// RFC 3986 percent-decoding; `None` on a malformed escape. Bounded by the
/// input length.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The first value of query parameter `name` (form-decoded, `+` is a
/// space, like Go's `URL.Query().Get`); `None` when absent.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode(s.replace('+', " ").as_bytes())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        if decode(k).as_deref() == Some(name) {
            return Some(decode(v).unwrap_or_default());
        }
    }
    None
}

/// Go's `strconv.ParseBool`: `Some` for `1 t T TRUE true True` and
/// `0 f F FALSE false False`, `None` otherwise.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `squashChunks` as the old service read it: absent or empty is true,
/// unparsable is false.
fn squash_param(query: Option<&str>) -> bool {
    match query_param(query, "squashChunks") {
        None => true,
        Some(v) if v.is_empty() => true,
        Some(v) => parse_go_bool(&v).unwrap_or(false),
    }
}

/// Handle one request. Never fails: every error becomes an answer. The
/// access-log line is written when the answer's body is done.
pub async fn handle<B>(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<B>,
) -> Result<Response<ApiBody>, std::convert::Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let start = Instant::now();
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let mut user = None;
    let mut route_label = "unmatched";
    let result = async {
        let (route, params) = match find(&method, req.uri().path()) {
            Ok(found) => found,
            Err(NoMatch::NotFound) => {
                return Err(ApiError::NotFound(format!(
                    "no such resource: {}",
                    req.uri().path().chars().take(200).collect::<String>()
                )))
            }
            Err(NoMatch::Method(allow)) => return Err(ApiError::MethodNotAllowed { allow }),
            Err(NoMatch::BadId(why)) => return Err(ApiError::BadRequest(why)),
        };
        route_label = route.path;
        // The one access check, before any handler runs.
        match route.access {
            Access::Public => {}
            Access::Bearer => {
                let claims = bearer(&state, &req)?;
                user = Some(claims.user);
            }
            Access::Metrics => match &state.metrics_auth {
                MetricsAuth::None => {}
                MetricsAuth::Jwt => user = Some(bearer(&state, &req)?.user),
                MetricsAuth::Token(t) => {
                    let want = format!("Bearer {t}");
                    let got = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .map(|v| v.as_bytes())
                        .unwrap_or_default();
                    if !constant_time_eq(got, want.as_bytes()) {
                        return Err(ApiError::Unauthorized(
                            "bad or missing metrics token".into(),
                        ));
                    }
                }
            },
        }
        dispatch(&state, route, params, peer, req, &mut user).await
    }
    .await;
    let (mut resp, stream) = match result {
        Ok(ok) => ok,
        Err(e) => (e.into_response(), false),
    };
    let status = resp.status().as_u16();
    resp.body_mut().set_record(AccessRecord {
        metrics: state.metrics.clone(),
        method,
        target,
        route: route_label,
        status,
        user,
        peer,
        start,
        stream,
    });
    Ok(resp)
}

fn bearer<B>(state: &State, req: &Request<B>) -> Result<super::auth::Claims, ApiError> {
    state
        .tokens
        .verify_header(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Time a snapshot operation into the metrics.
async fn timed<T, F>(state: &State, op: &'static str, f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, super::BackendError> + Send + 'static,
    T: Send + 'static,
{
    let start = Instant::now();
    let r = blocking(f).await;
    state.metrics.snapshot_op(op, r.is_ok(), start.elapsed());
    r
}

fn empty_ok() -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::empty());
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, http::HeaderValue::from(0u64));
    r
}

/// Run the handler of a matched, authorized route. The bool says whether the
/// answer is a disk stream.
async fn dispatch<B>(
    state: &Arc<State>,
    route: &Route,
    params: Params,
    peer: SocketAddr,
    req: Request<B>,
    user: &mut Option<String>,
) -> Result<(Response<ApiBody>, bool), ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let be = state.backend.clone();
    let query = req.uri().query().map(str::to_owned);
    let q = query.as_deref();
    let p = |i: usize| params.get(i).cloned().unwrap_or_default();
    let ok = |v: Response<ApiBody>| Ok((v, false));
    match route.handler {
        Handler::Login => login(state, peer, req, user).await.map(|r| (r, false)),
        Handler::Health => {
            let h = super::health::check(state).await;
            let status = if h.status == "ok" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            ok(json_response(status, &h))
        }
        Handler::Metrics => {
            // The gauges show the health checks as of now.
            super::health::check(state).await;
            let mut r = Response::new(ApiBody::full(
                state.metrics.render(state.engine.prefetch_stats()),
            ));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            ok(r)
        }
        Handler::ListVms => ok(json_response(
            StatusCode::OK,
            &blocking(move || be.list_vms()).await?,
        )),
        Handler::GetVm => {
            let vm = p(0);
            ok(json_response(
                StatusCode::OK,
                &blocking(move || be.get_vm(&vm)).await?,
            ))
        }
        Handler::ListSnapshots => {
            let (vm, squash) = (p(0), squash_param(q));
            let snaps = timed(state, "list", move || be.list_snapshots(&vm, squash)).await?;
            ok(json_response(StatusCode::OK, &snaps))
        }
        Handler::CreateSnapshot => {
            let vm = p(0);
            let snap = timed(state, "create", move || be.create_snapshot(&vm)).await?;
            tracing::info!(vm = %snap.vm_id, snapshot = %snap.id, "snapshot created");
            ok(json_response(StatusCode::OK, &snap))
        }
        Handler::PurgeSnapshots => {
            let vm = p(0);
            timed(state, "purge", move || be.purge_snapshots(&vm)).await?;
            state.engine.drop_prefetched(); // as for a delete, below
            ok(empty_ok())
        }
        Handler::GetSnapshot => {
            let (vm, snap, squash) = (p(0), p(1), squash_param(q));
            let compare_to = compare_to_param(q)?;
            let zeroed_separate = match query_param(q, "zeroed").as_deref() {
                None | Some("" | "include") => false,
                Some("separate") => true,
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "zeroed={other:?}: expected \"separate\" or \"include\""
                    )))
                }
            };
            let op = if compare_to.is_some() { "diff" } else { "get" };
            let s = timed(state, op, move || {
                be.get_snapshot(&vm, &snap, squash, compare_to.as_deref(), zeroed_separate)
            })
            .await?;
            ok(json_response(StatusCode::OK, &s))
        }
        Handler::DeleteSnapshot => {
            let (vm, snap) = (p(0), p(1));
            timed(state, "delete", move || be.delete_snapshot(&vm, &snap)).await?;
            // Reads started ahead hold their files open: let go of them so
            // the deleted snapshot's space is freed now, not when they
            // would have expired.
            state.engine.drop_prefetched();
            ok(empty_ok())
        }
        Handler::Disk => {
            let (vm, snap, disk) = (p(0), p(1), p(2));
            let engine = state.engine.clone();
            // One trip to the blocking pool: the backend's open, then the
            // engine's O_DIRECT open of the same file.
            let file = blocking(move || {
                let (file, size) = be.open_disk(&vm, &snap, &disk)?;
                disk::open(&engine, file, size, &format!("{vm}/{snap}/{disk}"))
            })
            .await?;
            let head = req.method() == Method::HEAD;
            disk::respond(&state.engine, &file, req.headers().get(header::RANGE), head)
        }
        Handler::Incremental => {
            let (vm, snap, disk) = (p(0), p(1), p(2));
            let compare_to = compare_to_param(q)?;
            let engine = state.engine.clone();
            let op = if compare_to.is_some() { "diff" } else { "get" };
            let (d, file) = timed(state, op, move || {
                snapshot_disk(&*be, &engine, &vm, &snap, &disk, compare_to)
            })
            .await?;
            disk::incremental(&state.engine, &file, &d)
        }
        Handler::Checksums => {
            let (vm, snap, disk) = (p(0), p(1), p(2));
            let block = disk::checksum_block(query_param(q, "blockSize").as_deref())?;
            let engine = state.engine.clone();
            let (d, file) =
                blocking(move || snapshot_disk(&*be, &engine, &vm, &snap, &disk, None)).await?;
            let data = disk::data_ranges(&d, file.size());
            let sums = disk::checksums(&state.engine, &file, &data, block).await?;
            ok(json_response(StatusCode::OK, &sums))
        }
    }
}

/// `compareTo`: absent or empty is none; else a checked id.
fn compare_to_param(q: Option<&str>) -> Result<Option<String>, ApiError> {
    match query_param(q, "compareTo") {
        Some(c) if !c.is_empty() => {
            Ok(Some(decode_id(&c).map_err(|w| {
                ApiError::BadRequest(format!("invalid compareTo id: {w}"))
            })?))
        }
        _ => Ok(None),
    }
}

/// One disk of a snapshot (its extent map, or with `compare_to` the diff
/// with zeroed ranges apart) and its file, open in the engine.
fn snapshot_disk(
    be: &dyn Backend,
    engine: &IoEngine,
    vm: &str,
    snap: &str,
    disk: &str,
    compare_to: Option<String>,
) -> Result<(crate::wire::SnapshotDisk, crate::io::DiskFile), super::BackendError> {
    let s = be.get_snapshot(vm, snap, true, compare_to.as_deref(), true)?;
    let d = s
        .disks
        .into_iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| super::BackendError::NotFound(format!("disk {disk} of snapshot {snap}")))?;
    let (file, size) = be.open_disk(vm, snap, disk)?;
    let file = disk::open(engine, file, size, &format!("{vm}/{snap}/{disk}"))?;
    Ok((d, file))
}

/// `POST /auth/login`: rate limit, bounded body, credentials check off the
/// event loop, token.
async fn login<B>(
    state: &Arc<State>,
    peer: SocketAddr,
    req: Request<B>,
    user: &mut Option<String>,
) -> Result<Response<ApiBody>, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ip = peer.ip();
    let rate_limited = || match state.login.limiter.blocked(ip) {
        Some(wait) => {
            state.metrics.login_failure("rate_limited");
            Err(ApiError::TooManyRequests {
                retry_after_secs: wait.as_secs().max(1),
            })
        }
        None => Ok(()),
    };
    rate_limited()?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_LOGIN_BODY as u64) {
        return Err(ApiError::PayloadTooLarge(format!(
            "login body over {MAX_LOGIN_BODY} bytes"
        )));
    }
    // A body that trickles in (or never comes) holds a connection and a
    // task: it gets `api.body_read_timeout`, then 408.
    let collected = tokio::time::timeout(
        state.body_read_timeout,
        http_body_util::Limited::new(req.into_body(), MAX_LOGIN_BODY).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::RequestTimeout(format!(
            "the login body did not arrive within {} s (api.body_read_timeout)",
            state.body_read_timeout.as_secs_f64()
        ))
    })?;
    let body = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge(format!("login body over {MAX_LOGIN_BODY} bytes"))
            } else {
                ApiError::BadRequest(format!("reading the body: {e}"))
            }
        })?
        .to_bytes();
    let bad = |why: String| {
        ApiError::BadRequest(format!(
            "expected {{\"username\": \"...\", \"password\": \"...\"}}: {why}"
        ))
    };
    // A JSON object only: serde would also take `["user", "pw"]` for the
    // struct, which the old service (Go's decoder) refused.
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad(e.classify_message()))?;
    if !value.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    let creds: LoginRequest =
        serde_json::from_value(value).map_err(|e| bad(e.classify_message()))?;
    *user = Some(creds.username.clone());
    let _permit = state
        .login_permits
        .acquire()
        .await
        .map_err(|_| ApiError::Internal("login checks closed".into()))?;
    // Again after the wait: a burst of logins sent at once all passed the
    // first check, and the failures of those ahead may have blocked this
    // address meanwhile (each check can reach the Manager's lockout).
    rate_limited()?;
    let login = state.login.clone();
    let be = state.backend.clone();
    let username = creds.username.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        let fallback = be.manager_endpoint();
        login.check(&creds.username, &creds.password, fallback)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("login task failed: {e}")))?;
    match verdict {
        Ok(Verdict::Valid) => {
            state.login.limiter.succeeded(ip);
            let token = state
                .tokens
                .issue(&username)
                .map_err(|e| ApiError::Internal(format!("signing the token: {e}")))?;
            tracing::info!(user = %username, %peer, "login accepted");
            Ok(json_response(StatusCode::OK, &LoginResponse { token }))
        }
        Ok(Verdict::Rejected) => {
            state.login.limiter.failed(ip);
            state.metrics.login_failure("rejected");
            tracing::warn!(user = %username, %peer, "login rejected");
            Err(ApiError::Unauthorized(
                "invalid username or password".into(),
            ))
        }
        Err(e) => {
            let reason = match e {
                super::auth::ManagerError::TlsRejected(_) => "manager_tls",
                _ => "manager_unreachable",
            };
            state.metrics.login_failure(reason);
            tracing::warn!(user = %username, %peer, error = %e, "login check failed");
            Err(ApiError::BadGateway(e.to_string()))
        }
    }
}

/// A short reason for a JSON error that never echoes values from the body
/// (which could hold a password).
trait ClassifyMessage {
    fn classify_message(&self) -> String;
}

impl ClassifyMessage for serde_json::Error {
    fn classify_message(&self) -> String {
        use serde_json::error::Category;
        match self.classify() {
            Category::Io => "unreadable body".into(),
            Category::Syntax => format!(
                "malformed JSON at line {} column {}",
                self.line(),
                self.column()
            ),
            Category::Data => "missing field or wrong type".into(),
            Category::Eof => "truncated JSON".into(),
        }
    }
}

#[cfg(test)]
mod tests;
