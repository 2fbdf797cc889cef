//! An open disk file: its size, identity for read-ahead, the buffered
//! descriptor and the `O_DIRECT` one while direct reads work.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::prefetch::FileKey;

/// An open disk file, ready for streams. Cheap to clone.
#[derive(Clone)]
pub struct DiskFile {
    pub(super) inner: Arc<FileInner>,
}

pub(super) struct FileInner {
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) key: FileKey,
    pub(super) buffered: Arc<File>,
    /// The `O_DIRECT` descriptor, when the open accepted it.
    pub(super) direct: Option<Arc<File>>,
    /// Cleared for good when a direct read fails with `EINVAL`.
    pub(super) use_direct: AtomicBool,
}

impl DiskFile {
    /// Size in bytes when opened.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Whether reads currently go through `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.inner.direct.is_some() && self.inner.use_direct.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(super) fn reader(&self) -> (Arc<File>, bool) {
        match &self.inner.direct {
            Some(d) if self.inner.use_direct.load(Ordering::Relaxed) => (Arc::clone(d), true),
            _ => (Arc::clone(&self.inner.buffered), false),
        }
    }

    pub(super) fn give_up_direct(&self, err: &std::io::Error) {
        if self.inner.use_direct.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                path = %self.inner.path.display(),
                error = %err,
                "O_DIRECT read refused; this file falls back to buffered reads"
            );
        }
    }
}
