//! The io core's error: one variant per failed step.

use std::path::PathBuf;

/// Errors of the io core, one variant per failed step.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("invalid io config: {0}")]
    Config(&'static str),
    #[error("io_uring is unavailable: {reason}")]
    UringUnavailable {
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("cannot start the {0} backend thread")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("range {start}..{end} is not inside the {size}-byte file")]
    OutOfBounds { start: u64, end: u64, size: u64 },
    /// A framing refused its plan (the wire format's own error inside).
    #[error("invalid stream plan: {0}")]
    Plan(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("read of {len} bytes at {offset} failed")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("file ended at {at} while reading up to {wanted} (truncated while streaming?)")]
    ShortRead { at: u64, wanted: u64 },
    #[error("the io backend stopped")]
    BackendGone,
    #[error("streams need a tokio runtime")]
    NoRuntime,
}
