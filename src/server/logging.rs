//! Logging: `tracing` to stderr, or appended to `log_file`.
//!
//! One subscriber for the process. Access-log lines use the `access` target
//! (see `api::body`); values are written escaped, so nothing a client sends
//! can forge a log line.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::filter::LevelFilter;

/// Install the subscriber. `log_file` is opened for appending (created
/// 0640-ish by the umask); a file that cannot be opened is an error.
pub fn init(log_file: Option<&Path>) -> std::io::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::INFO)
        .with_target(true)
        .with_ansi(false);
    // A second init (tests) keeps the first subscriber.
    match log_file {
        Some(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let _ = builder.with_writer(Mutex::new(file)).try_init();
        }
        None => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
    Ok(())
}
