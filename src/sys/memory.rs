//! How the process's allocator gives memory back (glibc).
//!
//! The io core's read buffers are 1 MiB each (`io::buffer`), kept in a pool
//! while reads run and let go when the pool goes idle. glibc serves
//! allocations above its mmap threshold with their own mapping, unmapped on
//! free; but its threshold is dynamic: the first such block freed raises it
//! to that block's size, and from then on the buffers come from the heaps
//! of its arenas, which keep freed memory resident (issue 16: 188 MB held
//! at idle after a soak, 76 MiB when fresh). A fixed threshold (setting it
//! turns the dynamic one off) keeps every buffer a mapping of its own, so
//! a buffer the pool drops is memory the kernel gets back at once. The
//! cost is one mmap and munmap per buffer made, and buffers are reused
//! while the pool is busy.
//!
//! Smaller blocks stay on the arenas' heaps: a storm of connections (TLS
//! and HTTP state, some tens of KiB each) leaves their freed memory
//! resident in the middle of the heaps, where glibc's automatic trim (top
//! of the heap only) does not reach (issue 11: RssAnon 7.7 MiB before a
//! 96 s storm of ~1,100 connections, 21 MiB after it). [`trim`] hands the
//! free pages of every arena back; the server calls it once the
//! connections of a burst have gone, and again once the service has gone
//! idle, when what was freed after the burst is back in the arenas too
//! (`server::trim_memory`).

/// Allocations from this size up get their own mapping (glibc's initial
/// threshold is 128 KiB; 256 KiB keeps small and medium blocks on the heap).
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`]. Call once at start,
/// before threads are spawned; false where refused or not glibc.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a glibc malloc parameter (under its own
        // lock); M_MMAP_THRESHOLD with a value below glibc's maximum (32 MiB
        // on 64-bit) is valid, and no pointer is involved.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
        ok == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives the free pages of every malloc arena back to the kernel (glibc's
/// `malloc_trim(0)`); true when some memory was released. It walks the
/// arenas under their locks, some milliseconds for a heap of tens of MiB:
/// call it rarely, off the network threads.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory of glibc's own
        // arenas (under their locks); 0 keeps no padding. No pointer of
        // ours is involved.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
