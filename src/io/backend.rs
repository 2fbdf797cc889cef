//! The read backend's contract: a [`Batch`] of aligned segments of one
//! file into one pooled buffer, answered with a [`BatchDone`].

use std::fs::File;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::buffer::PooledBuf;
use super::config::BackendKind;

/// One read of a [`Batch`]: `len` bytes of the file at `file_offset` into
/// `buf[buf_offset..buf_offset + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

/// Work for a backend: fill segments of one buffer from one file.
pub struct Batch {
    pub file: Arc<File>,
    /// Whether `file` was opened with `O_DIRECT`.
    pub direct: bool,
    pub buf: PooledBuf,
    pub segments: Vec<Segment>,
    pub reply: oneshot::Sender<BatchDone>,
}

/// A finished [`Batch`]: the buffer back, and per segment the bytes read
/// (fewer than asked only at end of file) or the error.
pub struct BatchDone {
    pub buf: PooledBuf,
    pub results: Vec<std::io::Result<usize>>,
}

/// A read backend. `submit` never blocks on disk I/O; the backend answers on
/// `batch.reply` (dropping it unanswered only when it is shutting down).
/// Each segment is read completely unless end of file comes first.
pub trait ReadBackend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;
    fn submit(&self, batch: Batch);
}
