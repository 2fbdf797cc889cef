//! What every request shares: the backend, tokens, login check, metrics
//! and the io core.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::api::auth::{Login, Tokens};
use crate::api::backend::Backend;
use crate::api::config::MetricsAuth;
use crate::api::metrics::Metrics;
use crate::io::IoEngine;

/// Time for a client to send a request body (a login) once its headers are
/// in; a body that trickles in longer is answered 408 (`api.body_read_timeout`).
pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Credential checks running at once (each can hold an Argon2 buffer or a
/// Manager connection); more wait.
const LOGIN_CONCURRENCY: usize = 16;

/// Everything a request needs, shared by all connections.
pub struct State {
    pub backend: Arc<dyn Backend>,
    pub tokens: Tokens,
    pub login: Arc<Login>,
    pub metrics: Arc<Metrics>,
    pub metrics_auth: MetricsAuth,
    /// The io core every disk byte is read through.
    pub engine: IoEngine,
    pub(super) login_permits: Semaphore,
    /// Time a request body (a login) may take to arrive; set by the server
    /// from `api.body_read_timeout` before the state is shared.
    pub body_read_timeout: std::time::Duration,
    /// The last health check and when it started: concurrent `/health`
    /// and `/metrics` requests share one check in flight
    /// ([`crate::api::health::check`]).
    pub(crate) last_health: tokio::sync::Mutex<Option<(tokio::time::Instant, crate::wire::Health)>>,
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
            last_health: tokio::sync::Mutex::new(None),
        })
    }
}
