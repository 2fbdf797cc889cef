//! Routing: the static route table, the one auth check, and the handlers.
//!
//! Every request goes ([`pipeline`]): match the path against [`ROUTES`]
//! ([`table`], [`matcher`]: trailing slash optional, ids percent-decoded
//! and checked for length and charset, never used as paths) → check access
//! once (bearer JWT, metrics auth, or none) → the handler ([`handlers`],
//! [`login`]), which calls the [`crate::api::Backend`] on the blocking pool
//! → one error mapping ([`crate::api::ApiError`]). Unknown paths answer 404
//! with the error body, known paths with another method 405.

mod handlers;
mod login;
mod matcher;
mod pipeline;
mod table;

pub use login::MAX_LOGIN_BODY;
pub use matcher::{decode_id, parse_go_bool, query_param, MAX_ID_LEN};
pub use pipeline::handle;
pub use table::{Access, Handler, Route, ROUTES};

#[cfg(test)]
mod tests;
