//! Logging: `tracing` to stderr, or appended to `log_file`.
//!
//! One subscriber for the process. Access-log lines use the `access` target
//! (see `api::body`); values are written escaped, so nothing a client sends
//! can forge a log line. A log file is reopened on SIGHUP (see
//! `server::run`), so logrotate can move it away and signal.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The log file of the process, when there is one.
static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

/// Created 0600 whatever the umask: access lines name users and addresses.
fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// A locked handle on the log file for one event.
pub struct LogWriter(MutexGuard<'static, File>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

struct FileMaker(&'static LogFile);

impl<'a> MakeWriter<'a> for FileMaker {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        // A poisoned lock only means a panic mid-write: keep logging.
        LogWriter(self.0.file.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Install the subscriber. `log_file` is opened for appending; a file that
/// cannot be opened is an error. A second call (tests) keeps the first.
pub fn init(log_file: Option<&Path>) -> std::io::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::INFO)
        .with_target(true)
        .with_ansi(false);
    match log_file {
        Some(path) => {
            let file = open(path)?;
            let log = LOG_FILE.get_or_init(|| LogFile {
                path: path.to_owned(),
                file: Mutex::new(file),
            });
            let _ = builder.with_writer(FileMaker(log)).try_init();
        }
        None => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
    Ok(())
}

/// Reopen the log file (after logrotate moved it). Without a log file this
/// does nothing.
pub fn reopen() -> std::io::Result<()> {
    let Some(log) = LOG_FILE.get() else {
        return Ok(());
    };
    let fresh = open(&log.path)?;
    *log.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    tracing::info!(path = %log.path.display(), "log file reopened");
    Ok(())
}
