//! The `[io]` section: which backend, buffer sizes, read-ahead.

use serde::Deserialize;

use super::buffer::ALIGN;
use super::error::IoError;

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// io_uring when the probe accepts it, else threads.
    #[default]
    Auto,
    /// io_uring or fail to start.
    IoUring,
    /// The `pread` thread pool.
    Threads,
}

/// The backend actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    IoUring,
    Threads,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::IoUring => "io_uring",
            BackendKind::Threads => "threads",
        })
    }
}

/// Default buffer (and largest frame) size: 1 MiB frames stream far faster
/// through hyper and TLS than small ones (ARCHITECTURE.md).
pub const DEFAULT_BUFFER_SIZE: usize = 1 << 20;
/// Default buffers per stream, frames not yet sent included: of 8, some
/// wait in hyper and TLS for the socket (and with `O_DIRECT` no kernel
/// read-ahead helps), so reads in flight stay deep enough to keep the disk
/// busy. One 1 GiB range from a cold disk, `O_DIRECT`: 1,219 MB/s with 4,
/// 1,371-1,413 with 8 (5 runs each, interleaved, load 1.2-1.5). The pool
/// still bounds all streams together.
pub const DEFAULT_READ_AHEAD: usize = 8;
/// Default buffers in the whole process (24 MiB at the default size): the
/// bound of the service's read memory, which keeps its peak RSS under
/// 48 MiB with 16 streams (README, "Where the memory goes"); streams
/// beyond 6 share it. 16 busy streams get one or two buffers each, which
/// keeps the page cache, a disk and the TLS of two cores busy (measured: the
/// same throughput as with 32).
pub const DEFAULT_POOL_BUFFERS: usize = 24;
/// Default buffers made beyond the pool for streams that hold none while
/// the pool is used up (see `buffer::BufferPool::get_first`).
pub const DEFAULT_OVERFLOW_BUFFERS: usize = 64;
/// Default `pread` threads: enough outstanding reads to keep an SSD queue
/// busy; they sleep in the kernel, so more threads than cores is right.
pub const DEFAULT_THREADS: usize = 16;
/// Default ring threads: one ring keeps many reads in flight by itself.
pub const DEFAULT_RINGS: usize = 1;
/// Default submission queue entries per ring.
pub const DEFAULT_RING_ENTRIES: u32 = 256;
/// Largest accepted buffer: a read's length is a `u32` in an SQE, and frames
/// past 16 MiB only add latency.
pub const MAX_BUFFER_SIZE: usize = 16 << 20;
/// The `[io]` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoConfig {
    /// `auto` (default), `io_uring` or `threads`.
    pub backend: BackendChoice,
    /// Read with `O_DIRECT` where accepted (default true).
    pub direct_io: bool,
    /// Bytes per buffer (multiple of 4096, at most 16 MiB).
    pub buffer_size: usize,
    /// Buffers one stream may hold (in flight plus unsent frames).
    pub read_ahead: usize,
    /// Start the reads of the next range before it is asked for, when a
    /// client reads a file in consecutive ranges with `O_DIRECT` (which
    /// gets no kernel read-ahead): see [`prefetch`]. Default true.
    pub prefetch: bool,
    /// Shared buffers in the whole process.
    pub pool_buffers: usize,
    /// Of `pool_buffers`, how many only go to streams that hold none (a
    /// stream's first buffer): streams that already hold some, stalled
    /// ones included, cannot take them. Default `pool_buffers / 4`.
    pub reserved_buffers: Option<usize>,
    /// Buffers made beyond the pool, one per stream that holds none while
    /// the pool is empty, freed after use. Default 64.
    pub overflow_buffers: usize,
    /// Buffers (shared and overflow) the streams of one owner hold at once
    /// (`api`: one client address, an IPv6 client by its /64); a stream of
    /// an owner at its bound waits for that owner's buffers to come back.
    /// Default half of `pool_buffers + overflow_buffers` (see the module
    /// doc of `io`).
    pub owner_buffers: Option<usize>,
    /// Threads of the `threads` backend.
    pub threads: usize,
    /// Ring threads of the `io_uring` backend.
    pub rings: usize,
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Hand every io_uring read to the kernel's io-wq workers
    /// (`IOSQE_ASYNC`) instead of trying it inline in the ring thread
    /// (default true: the ring thread never blocks; see
    /// `uring::UringBackend::start`).
    pub uring_async: bool,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            backend: BackendChoice::Auto,
            direct_io: true,
            buffer_size: DEFAULT_BUFFER_SIZE,
            read_ahead: DEFAULT_READ_AHEAD,
            prefetch: true,
            pool_buffers: DEFAULT_POOL_BUFFERS,
            reserved_buffers: None,
            overflow_buffers: DEFAULT_OVERFLOW_BUFFERS,
            owner_buffers: None,
            threads: DEFAULT_THREADS,
            rings: DEFAULT_RINGS,
            ring_entries: DEFAULT_RING_ENTRIES,
            uring_async: true,
        }
    }
}

impl IoConfig {
    /// `reserved_buffers`, or its default: a quarter of the pool.
    pub fn reserved(&self) -> usize {
        self.reserved_buffers.unwrap_or(self.pool_buffers / 4)
    }

    /// `owner_buffers`, or its default: half of the pool and the overflow
    /// together (at least one).
    pub fn owner_bound(&self) -> usize {
        self.owner_buffers
            .unwrap_or((self.pool_buffers + self.overflow_buffers) / 2)
            .max(1)
    }

    /// The most disk-read memory the engine holds, whatever the clients
    /// do: every shared buffer and every overflow buffer at once.
    pub fn memory_bound(&self) -> usize {
        (self.pool_buffers + self.overflow_buffers) * self.buffer_size
    }

    pub fn validate(&self) -> Result<(), IoError> {
        let bad = |what: &'static str| Err(IoError::Config(what));
        if self.buffer_size == 0
            || self.buffer_size % ALIGN != 0
            || self.buffer_size > MAX_BUFFER_SIZE
        {
            return bad("buffer_size must be a non-zero multiple of 4096 up to 16 MiB");
        }
        if self.read_ahead == 0 || self.pool_buffers < self.read_ahead {
            return bad("read_ahead must be at least 1 and pool_buffers at least read_ahead");
        }
        if self.reserved() >= self.pool_buffers {
            return bad("reserved_buffers must be less than pool_buffers");
        }
        if self.owner_buffers == Some(0) {
            return bad("owner_buffers must be at least 1");
        }
        if self.threads == 0 || self.rings == 0 || self.ring_entries < 2 {
            return bad("threads and rings must be at least 1, ring_entries at least 2");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let cfg: IoConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, IoConfig::default());
        assert!(cfg.direct_io);
        assert_eq!(cfg.backend, BackendChoice::Auto);
        assert_eq!(cfg.owner_bound(), 44);
        let cfg: IoConfig =
            serde_json::from_str(r#"{"backend": "io_uring", "direct_io": false}"#).unwrap();
        assert_eq!(cfg.backend, BackendChoice::IoUring);
        assert!(serde_json::from_str::<IoConfig>(r#"{"backend": "aio"}"#).is_err());
        assert!(serde_json::from_str::<IoConfig>(r#"{"bogus": 1}"#).is_err());
        for bad in [
            IoConfig {
                buffer_size: 1000,
                ..IoConfig::default()
            },
            IoConfig {
                buffer_size: 32 << 20,
                ..IoConfig::default()
            },
            IoConfig {
                read_ahead: 0,
                ..IoConfig::default()
            },
            IoConfig {
                pool_buffers: 2,
                read_ahead: 4,
                ..IoConfig::default()
            },
            IoConfig {
                owner_buffers: Some(0),
                ..IoConfig::default()
            },
            IoConfig {
                threads: 0,
                ..IoConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(IoError::Config(_))), "{bad:?}");
        }
    }
}
