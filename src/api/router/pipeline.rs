//! One request from start to answer: match, the one access check, the
//! handler, the error mapping, the access-log record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Request, Response};
use subtle::ConstantTimeEq;

use super::handlers::dispatch;
use super::matcher::{find, NoMatch};
use super::table::Access;
use crate::api::body::{AccessRecord, ApiBody};
use crate::api::config::MetricsAuth;
use crate::api::error::ApiError;
use crate::api::state::State;

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
                    if !bool::from(got.ct_eq(want.as_bytes())) {
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

fn bearer<B>(state: &State, req: &Request<B>) -> Result<crate::api::auth::Claims, ApiError> {
    state
        .tokens
        .verify_header(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}
