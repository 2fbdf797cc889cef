//! The `pread` thread-pool backend: the fallback where io_uring is missing
//! (kernels before 5.6 such as Oracle VM 3.4's UEK4), refused (seccomp,
//! `kernel.io_uring_disabled`), or not wanted (config `backend = "threads"`).
//!
//! A fixed set of threads takes [`Batch`]es from one queue and reads their
//! segments with `pread` (`FileExt::read_at`, no `unsafe`), completing into
//! each batch's oneshot channel. The threads sleep in the kernel during a
//! read, which is why there are more of them than cores. They exit when the
//! backend is dropped and the queue drains.

use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use super::backend::{Batch, BatchDone, ReadBackend};
use super::config::BackendKind;
use super::error::IoError;

pub struct ThreadsBackend {
    /// Dropping it (with the backend) closes the queue: every worker ends
    /// once the queue drains.
    tx: mpsc::Sender<Batch>,
}

impl ThreadsBackend {
    pub fn start(threads: usize) -> Result<ThreadsBackend, IoError> {
        let (tx, rx) = mpsc::channel::<Batch>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("io-pread-{i}"))
                .spawn(move || worker(&rx))
                .map_err(|e| IoError::Spawn("threads", e))?;
        }
        Ok(ThreadsBackend { tx })
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Batch>>) {
    loop {
        // The lock is held only while waiting for the next batch.
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(mut batch) = next else { return };
        let results = batch
            .segments
            .iter()
            .map(|s| {
                let buf = &mut batch.buf.as_mut_slice()[s.buf_offset..s.buf_offset + s.len];
                read_full(&batch.file, buf, s.file_offset)
            })
            .collect();
        let _ = batch.reply.send(BatchDone {
            buf: batch.buf,
            results,
        });
    }
}

/// Reads until `buf` is full or end of file; retries `EINTR`.
pub(crate) fn read_full(
    file: &std::fs::File,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl ReadBackend for ThreadsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Threads
    }

    fn submit(&self, batch: Batch) {
        // A send error means the workers are gone; dropping the batch drops
        // its reply, which the stream reports as BackendGone.
        let _ = self.tx.send(batch);
    }
}
