//! The client's errors and the exit status each one maps to.
//!
//! One enum for the whole client, a variant per failed step; the exit
//! statuses are part of the client's interface for scripts (README, "Exit
//! status") and are decided here only.

use std::path::PathBuf;

/// Exit statuses of `coriolis-ovm-exporter client`.
pub mod exit {
    /// Everything asked was done.
    pub const OK: i32 = 0;
    /// Any other failure: network, TLS, server error, local I/O.
    pub const ERROR: i32 = 1;
    /// Bad command line (clap's own status for usage errors).
    pub const USAGE: i32 = 2;
    /// No usable credentials, or the server refused them (401/403).
    pub const AUTH: i32 = 3;
    /// The VM, snapshot or disk is unknown to the server (404).
    pub const NOT_FOUND: i32 = 4;
    /// `--verify` found blocks that differ from the server's.
    pub const VERIFY_MISMATCH: i32 = 5;
    /// A conflict: the server answered 409 (e.g. a snapshot of another VM,
    /// or a base snapshot that changed), or the local replica is not a copy
    /// of the snapshot `--diff-from` names.
    pub const CONFLICT: i32 = 6;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NoCredentials(String),
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {0} holds no PEM certificate")]
    CaEmpty(PathBuf),
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The server answered with an error status and (usually) its JSON
    /// error body.
    #[error("{what}: {status} {short}: {details}")]
    Http {
        what: String,
        status: u16,
        short: String,
        details: String,
    },
    /// The server refused a `compareTo` base with a code saying a full copy
    /// is needed (`base_unavailable`, `base_changed`, `disk_replaced`).
    #[error(
        "{what}: the base snapshot cannot be used ({code}): {details}; make a full copy \
         (download again with --full-if-needed, or without --diff-from)"
    )]
    BaseUnusable {
        what: String,
        status: u16,
        code: String,
        details: String,
    },
    #[error("{what}: unexpected answer: {problem}")]
    Protocol { what: String, problem: String },
    #[error("{what}: the answer is not the expected JSON: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} {path}: {source}")]
    Local {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk}: reading the body: {source}")]
    Body {
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk}: incremental stream: {source}")]
    Stream {
        disk: String,
        #[source]
        source: crate::wire::stream::StreamError,
    },
    #[error("{0}")]
    ReplicaConflict(String),
    #[error(
        "cannot verify disk {disk}: the server has no checksums endpoint ({details}); \
         the download itself is complete, but unverified"
    )]
    ChecksumsUnavailable { disk: String, details: String },
    #[error("verification failed: {0}")]
    VerifyMismatch(String),
}

impl ClientError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) => exit::USAGE,
            ClientError::NoCredentials(_) => exit::AUTH,
            ClientError::Http { status, .. } | ClientError::BaseUnusable { status, .. } => {
                match status {
                    401 | 403 => exit::AUTH,
                    404 => exit::NOT_FOUND,
                    409 => exit::CONFLICT,
                    _ => exit::ERROR,
                }
            }
            ClientError::ReplicaConflict(_) => exit::CONFLICT,
            ClientError::VerifyMismatch(_) => exit::VERIFY_MISMATCH,
            _ => exit::ERROR,
        }
    }

    /// The HTTP status, when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Http { status, .. } | ClientError::BaseUnusable { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// Whether the server said the diff's base cannot be used and a full
    /// copy is needed.
    pub fn needs_full_copy(&self) -> bool {
        matches!(self, ClientError::BaseUnusable { .. })
    }

    /// The message with its chain of causes, for the one line printed.
    pub fn chain(&self) -> String {
        crate::error::chain(self)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> ClientError {
        ClientError::Http {
            what: "x".into(),
            status,
            short: String::new(),
            details: String::new(),
        }
    }

    #[test]
    fn statuses_map_to_documented_exit_codes() {
        assert_eq!(http(401).exit_code(), exit::AUTH);
        assert_eq!(http(403).exit_code(), exit::AUTH);
        assert_eq!(http(404).exit_code(), exit::NOT_FOUND);
        assert_eq!(http(409).exit_code(), exit::CONFLICT);
        assert_eq!(http(500).exit_code(), exit::ERROR);
        assert_eq!(http(400).exit_code(), exit::ERROR);
        assert_eq!(
            ClientError::VerifyMismatch(String::new()).exit_code(),
            exit::VERIFY_MISMATCH
        );
        assert_eq!(ClientError::Usage(String::new()).exit_code(), exit::USAGE);
    }
}
