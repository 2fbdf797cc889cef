//! What `download` is asked to do, shared by every step.

use std::path::PathBuf;
use std::time::Duration;

/// Progress redraw interval.
pub(super) const TICK: Duration = Duration::from_millis(200);

/// How the bytes of an incremental are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Incremental stream when the server has it, else ranges; full copies
    /// by ranges.
    Auto,
    /// Always the incremental stream (also for full copies); fail without.
    Stream,
    /// Always `Range` requests.
    Ranges,
}

/// What `download` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub vm: String,
    pub snap: String,
    pub out: PathBuf,
    pub diff_from: Option<String>,
    pub jobs: usize,
    pub disks: Vec<String>,
    pub transport: Transport,
    pub limit_rate: Option<u64>,
    pub progress: bool,
    /// `--compress zstd`: the level asked of the stream.
    pub zstd: Option<i32>,
}

/// `--compress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    None,
    Zstd,
}
