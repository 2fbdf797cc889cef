//! The one place where errors become HTTP statuses and error bodies:
//! [`ApiError`], every way a request can fail; the table from a lower
//! layer's class (through [`BackendError`]) to a status; the error answer.

use http::{header, HeaderValue, Response, StatusCode};

use super::backend::BackendError;
use super::body::{json_response, ApiBody};
use crate::error::Class;

/// Every way a request can fail, by HTTP status. Mapped to a response in
/// [`ApiError::into_response`] and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed { allow: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("range not satisfiable: {reason}")]
    RangeNotSatisfiable { size: u64, reason: String },
    #[error("too many failed logins from this address")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Unavailable(String),
    /// `inner` with a machine-readable `code` in its error body.
    #[error("{inner}")]
    Coded {
        code: &'static str,
        inner: Box<ApiError>,
    },
}

/// The one table from a failure's class to its answer: every layer's error
/// reaches here typed (through [`BackendError`]) and says its [`Class`];
/// `details` is the whole error chain.
impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let class = e.class();
        let code = match &e {
            BackendError::Layer(l) => l.code(),
            _ => None,
        };
        let details = match e {
            BackendError::Layer(e) => crate::error::chain(&*e),
            BackendError::NotFound(m)
            | BackendError::Conflict(m)
            | BackendError::BadRequest(m)
            | BackendError::Unavailable(m)
            | BackendError::Internal(m) => m,
        };
        let e = match class {
            Class::NotFound => ApiError::NotFound(details),
            Class::Conflict => ApiError::Conflict(details),
            Class::BadRequest => ApiError::BadRequest(details),
            Class::Unavailable => ApiError::Unavailable(details),
            Class::Internal => ApiError::Internal(details),
            Class::InsufficientStorage => ApiError::InsufficientStorage(details),
        };
        match code {
            Some(code) => ApiError::Coded {
                code,
                inner: Box::new(e),
            },
            None => e,
        }
    }
}

impl ApiError {
    /// The status and the old service's `error` short (API.md).
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad Request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Not Authorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "Not Found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
            }
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "Request Timeout"),
            ApiError::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "Insufficient Storage")
            }
            ApiError::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "Range Not Satisfiable")
            }
            ApiError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Server error"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "Bad Gateway"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"),
            ApiError::Coded { inner, .. } => inner.status(),
        }
    }

    /// The error answer: status, JSON error body, and the headers the status
    /// calls for (`WWW-Authenticate`, `Allow`, `Content-Range`, `Retry-After`).
    pub fn into_response(self) -> Response<ApiBody> {
        let (status, short) = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), details = ?self.to_string(), "request failed");
        }
        let body = crate::wire::ErrorBody {
            error: short.to_owned(),
            details: self.to_string(),
            code: match &self {
                ApiError::Coded { code, .. } => Some((*code).to_owned()),
                _ => None,
            },
        };
        let mut resp = json_response(status, &body);
        let h = resp.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    h.insert(header::ALLOW, v);
                }
            }
            ApiError::RangeNotSatisfiable { size, .. } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            ApiError::TooManyRequests { retry_after_secs } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        resp
    }
}
