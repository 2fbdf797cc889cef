//! The HTTP API: routes, JSON types, auth, disk answers, metrics, and the
//! one place where errors become HTTP statuses and error bodies ([`error`]).
//!
//! Wire contract: `shared/design/API.md` ("Compatible surface" exactly) and
//! `docs/openapi.yaml`. The api layer knows nothing of sockets or TLS (that
//! is `server`), nor of filesystems (that is the [`Backend`]): it turns a
//! request into calls on a backend, on the blocking pool, and their results
//! into answers.

pub mod auth;
pub mod backend;
pub mod body;
pub mod config;
pub mod disk;
pub mod error;
pub mod framing;
pub mod health;
pub mod metrics;
pub mod router;
pub mod state;

pub use auth::{Login, Tokens};
pub use backend::{Backend, BackendError};
pub use body::{json_response, ApiBody};
pub use config::{
    check_password_hash, AuthConfig, JwtConfig, LocalUser, ManagerConfig, MetricsAuth, SettingError,
};
pub use error::ApiError;
pub use router::handle;
pub use state::State;
