//! One line for an error and its causes, for logs and command-line output;
//! and the class of a failure, which each layer's error states beside its
//! type so that errors stay typed up to the one place (`api`) that turns a
//! class into an HTTP status.

/// What kind of failure an error is, as whoever answers a request needs to
/// know it. Not HTTP: `api` maps each class to a status, in one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// An unknown VM, snapshot or disk.
    NotFound,
    /// The object exists but belongs elsewhere, is busy, or changed.
    Conflict,
    /// The request cannot be honoured as asked.
    BadRequest,
    /// Not now, but shortly (a store being reopened).
    Unavailable,
    /// The filesystem is full (ENOSPC, EDQUOT): the operator must make room.
    InsufficientStorage,
    /// Anything else.
    Internal,
}

/// A layer's error that says its own [`Class`].
pub trait Classify: std::error::Error + Send + Sync + 'static {
    fn class(&self) -> Class;

    /// A stable machine-readable code for the error body (`wire::CODE_*`),
    /// for the failures a client can act on; None for the rest.
    fn code(&self) -> Option<&'static str> {
        None
    }
}

/// The error's message followed by each cause, `: `-separated. A cause whose
/// text the line already holds (an error that prints its source itself) is
/// not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cur = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Loud(#[source] std::io::Error);

    #[test]
    fn causes_follow_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::chain(&e), "outer: inner");
        let e = Loud(std::io::Error::other("inner"));
        assert_eq!(super::chain(&e), "wrapped: inner");
    }
}
