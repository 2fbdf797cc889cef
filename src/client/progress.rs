//! Download progress on stderr, and the optional rate limit.
//!
//! Workers add the bytes they wrote to shared atomics; the coordinating
//! thread calls [`Progress::tick`] a few times a second. On a terminal that
//! redraws one bar line (`\r`); otherwise (logs, CI) it prints a plain line
//! every few seconds. Hand-rolled: a bar is a dozen lines, not a dependency.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Width of the bar, in characters.
const BAR_WIDTH: usize = 30;
/// Interval between plain progress lines when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// Bytes as a human reads them (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `512`, `64K`, `20M`, `2G`, `1T` (binary multiples; `KiB` etc. too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with an optional K, M, G or T"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// How long a transfer that has moved `done` bytes in `elapsed` must pause
/// to stay at `limit` bytes per second (zero when it is not ahead, or
/// without a limit).
fn pace(done: u64, limit: Option<u64>, elapsed: Duration) -> Duration {
    match limit.filter(|&l| l > 0) {
        Some(limit) => Duration::from_secs_f64(done as f64 / limit as f64).saturating_sub(elapsed),
        None => Duration::ZERO,
    }
}

/// Shared progress of one download.
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    start: Instant,
    /// Bytes per second, when limited.
    limit: Option<u64>,
    tty: bool,
    enabled: bool,
    last_line: Mutex<Instant>,
}

impl Progress {
    /// `enabled` false prints nothing (`--quiet`).
    pub fn new(total: u64, limit: Option<u64>, enabled: bool) -> Progress {
        let now = Instant::now();
        Progress {
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            start: now,
            limit,
            tty: std::io::stderr().is_terminal(),
            enabled,
            last_line: Mutex::new(now),
        }
    }

    /// Bytes transferred so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back bytes of a piece that failed and will be fetched again.
    pub fn sub(&self, n: u64) {
        self.done.fetch_sub(n.min(self.done()), Ordering::Relaxed);
    }

    /// Records `n` bytes written and, under `--limit-rate`, sleeps for as
    /// long as the transfer is ahead of the limit.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if self.limit.is_some() {
            let wait = pace(done, self.limit, self.start.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
    }

    fn line(&self) -> String {
        let done = self.done();
        let total = self.total.load(Ordering::Relaxed).max(done);
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let eta = if rate > 0.0 && total > done {
            format!("  ETA {}s", ((total - done) as f64 / rate).ceil() as u64)
        } else {
            String::new()
        };
        format!(
            "{:5.1}% {} / {}  {}/s{eta}",
            pct,
            human_bytes(done),
            human_bytes(total),
            human_bytes(rate as u64)
        )
    }

    /// Redraws the bar (terminal) or prints a line when one is due.
    pub fn tick(&self) {
        if !self.enabled {
            return;
        }
        if self.tty {
            let done = self.done();
            let total = self.total.load(Ordering::Relaxed).max(done).max(1);
            let filled = ((done as u128 * BAR_WIDTH as u128) / total as u128) as usize;
            let bar: String = "#".repeat(filled) + &" ".repeat(BAR_WIDTH - filled.min(BAR_WIDTH));
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K[{bar}] {}", self.line());
            let _ = err.flush();
        } else {
            let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= LINE_INTERVAL {
                *last = Instant::now();
                eprintln!("progress: {}", self.line());
            }
        }
    }

    /// The last state, and a newline after a bar.
    pub fn finish(&self) {
        if !self.enabled {
            return;
        }
        if self.tty {
            self.tick();
            eprintln!();
        } else {
            eprintln!(
                "progress: {} in {:.1}s",
                self.line(),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("20M").unwrap(), 20 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("M").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn the_pause_is_what_the_transfer_is_ahead_of_the_limit() {
        let ms = Duration::from_millis;
        // (bytes done, limit, elapsed, pause)
        let rows = [
            (1 << 20, Some(4 << 20), ms(0), ms(250)),
            (1 << 20, Some(4 << 20), ms(100), ms(150)),
            (1 << 20, Some(4 << 20), ms(250), ms(0)),
            (1 << 20, Some(4 << 20), ms(900), ms(0)),
            (3 << 20, Some(1 << 20), ms(1000), ms(2000)),
            (1 << 30, None, ms(0), ms(0)),
            (1 << 30, Some(0), ms(0), ms(0)),
        ];
        for (done, limit, elapsed, want) in rows {
            let got = pace(done, limit, elapsed);
            assert!(
                got.abs_diff(want) < Duration::from_micros(10),
                "pace({done}, {limit:?}, {elapsed:?}) = {got:?}, want {want:?}"
            );
        }
    }

    /// Wall clock, a lower bound only: a busy machine can only make it
    /// slower, never make it fail.
    #[test]
    fn the_rate_limit_holds_the_pace() {
        // 1 MiB at 4 MiB/s cannot take less than a quarter second.
        let p = Progress::new(1 << 20, Some(4 << 20), false);
        let t = Instant::now();
        for _ in 0..16 {
            p.add(64 << 10);
        }
        assert!(
            t.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(p.done(), 1 << 20);
    }
}
