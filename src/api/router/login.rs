//! `POST /auth/login`: rate limit, bounded body read with a timeout,
//! credentials checked off the event loop, a token.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::api::auth::Verdict;
use crate::api::body::json_response;
use crate::api::body::ApiBody;
use crate::api::error::ApiError;
use crate::api::state::State;
use crate::wire::{LoginRequest, LoginResponse};

/// Largest login body read. The real one is under 1 KiB; bigger ones are
/// refused (413) without being read whole.
pub const MAX_LOGIN_BODY: usize = 16 * 1024;

/// `POST /auth/login`: rate limit, bounded body, credentials check off the
/// event loop, token.
pub(super) async fn login<B>(
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
    // At most `login_max_failures` checks per address, counting those in
    // flight: a burst of logins sent at once cannot get more tries than
    // the limit (each could reach the Manager's account lockout).
    let attempt = state.login.limiter.begin(ip).map_err(|wait| {
        state.metrics.login_failure("rate_limited");
        ApiError::TooManyRequests {
            retry_after_secs: wait.as_secs().max(1),
        }
    })?;
    let _permit = state
        .login_permits
        .acquire()
        .await
        .map_err(|_| ApiError::Internal("login checks closed".into()))?;
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
            attempt.succeeded();
            let token = state
                .tokens
                .issue(&username)
                .map_err(|e| ApiError::Internal(format!("signing the token: {e}")))?;
            // `?`: the name comes from the client, escaped in the log.
            tracing::info!(user = ?username, %peer, "login accepted");
            Ok(json_response(StatusCode::OK, &LoginResponse { token }))
        }
        Ok(Verdict::Rejected) => {
            attempt.failed();
            state.metrics.login_failure("rejected");
            tracing::warn!(user = ?username, %peer, "login rejected");
            Err(ApiError::Unauthorized(
                "invalid username or password".into(),
            ))
        }
        Err(e) => {
            let reason = match e {
                crate::api::auth::ManagerError::TlsRejected(_) => "manager_tls",
                _ => "manager_unreachable",
            };
            // A failure too: a Manager that can be made to fail must not
            // give unlimited tries.
            attempt.failed();
            state.metrics.login_failure(reason);
            tracing::warn!(user = ?username, %peer, error = %e, "login check failed");
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
