//! Logging: `tracing` to stderr, or appended to `log_file`.
//!
//! One subscriber for the process. Access-log lines use the `access` target
//! (see `api::body`); values are written escaped, so nothing a client sends
//! can forge a log line. A log file is reopened on SIGHUP (see
//! `server::run`), so logrotate can move it away and signal.
//!
//! The HTTP/2 library warns on its own, without the peer's address, once
//! per connection it closes for a reset flood (CVE-2023-44487 class) or
//! too many errors: an attacker opening connections as fast as the
//! connection budget admits them would write a line each. [`Throttle`]
//! lets at most one of those warnings through per [`H2_WARN_PERIOD`]; the
//! server's own lines (which name the peer and are rate-limited where a
//! client can repeat them) are not touched.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing::subscriber::Interest;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// At most one warning of the HTTP/2 library per this period.
pub const H2_WARN_PERIOD: Duration = Duration::from_secs(10);

/// Drops the HTTP/2 library's warnings and errors that come sooner than
/// `period` after the last one let through (see the module doc).
pub struct Throttle {
    period: Duration,
    start: Instant,
    /// When the last one went through, in ms since `start` plus one (0:
    /// none yet).
    last: AtomicU64,
}

impl Throttle {
    pub fn new(period: Duration) -> Self {
        Throttle {
            period,
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn throttled(m: &Metadata<'_>) -> bool {
        *m.level() <= Level::WARN && (m.target() == "h2" || m.target().starts_with("h2::"))
    }

    /// Takes the period's one slot if it is free.
    fn admit(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let period = self.period.as_millis() as u64;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + period {
            return false;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

impl<S: Subscriber> Layer<S> for Throttle {
    fn register_callsite(&self, m: &'static Metadata<'static>) -> Interest {
        if Self::throttled(m) {
            // Asked again at every event, not cached.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }

    fn enabled(&self, m: &Metadata<'_>, _: Context<'_, S>) -> bool {
        !Self::throttled(m) || self.admit()
    }
}

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
    let throttle = Throttle::new(H2_WARN_PERIOD);
    match log_file {
        Some(path) => {
            let file = open(path)?;
            let log = LOG_FILE.get_or_init(|| LogFile {
                path: path.to_owned(),
                file: Mutex::new(file),
            });
            let _ = builder
                .with_writer(FileMaker(log))
                .finish()
                .with(throttle)
                .try_init();
        }
        None => {
            let _ = builder
                .with_writer(std::io::stderr)
                .finish()
                .with(throttle)
                .try_init();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Counts the events that reach it, by target.
    #[derive(Clone, Default)]
    struct Count(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Count {
        fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
            self.0
                .lock()
                .unwrap()
                .push(e.metadata().target().to_owned());
        }
    }

    #[test]
    fn h2_warnings_pass_once_per_period_and_others_always() {
        let count = Count::default();
        let sub = tracing_subscriber::registry()
            .with(Throttle::new(Duration::from_millis(300)))
            .with(count.clone());
        tracing::subscriber::with_default(sub, || {
            for _ in 0..50 {
                tracing::warn!(target: "h2::proto::streams", "reset flood");
                tracing::warn!(target: "coriolis_ovm_exporter::server", "ours");
            }
            tracing::info!(target: "h2::codec", "not a warning: passes the throttle");
            std::thread::sleep(Duration::from_millis(350));
            tracing::error!(target: "h2", "the next period's one");
            tracing::warn!(target: "h2", "dropped");
        });
        let seen = count.0.lock().unwrap();
        let h2 = seen.iter().filter(|t| t.starts_with("h2")).count();
        let ours = seen.iter().filter(|t| t.starts_with("coriolis")).count();
        assert_eq!(ours, 50);
        assert_eq!(h2, 3, "one warning per period and the info line: {seen:?}");
    }
}
