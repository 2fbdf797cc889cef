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
//!
//! The number of arenas is capped ([`arena_max`]). glibc gives each new
//! thread an arena of its own, up to 8 per core (16 on a 2-core machine,
//! 256 on a 32-core node), and the blocking pool (disk work, argon2, the
//! database) runs up to 512 threads. An arena keeps memory that no trim
//! returns: the top of its heap, up to glibc's trim threshold (128 KiB),
//! and pages held by a few live blocks among free ones. After the soak's
//! warm-up all 15 arenas the process had made held 4.0 MiB of RssAnon, 13
//! of them ~132 KiB each for a few KiB of live blocks. The threads that
//! allocate most are the runtime's: its workers (one per core) and the main
//! thread, which accepts connections; an arena each lets them allocate
//! without waiting on each other, and the blocking pool's threads share
//! those (their allocations are few: read buffers are pooled mappings,
//! above). Most small blocks never take an arena's lock anyway: glibc's
//! per-thread cache serves them. Measured on the 2-core build machine (3
//! arenas): the 3-minute soak's start RssAnon 8.2 -> 7.1 MiB and its growth
//! over the storm 1.0 -> 0.7 MiB, the storm's probe p50/p99 unchanged (65 /
//! 103 ms against 67 / 104); one 1 GiB range (`scripts/bench/a_single_range.sh`,
//! warm, two interleaved rounds of 3 runs) 1,736 and 1,728 MB/s over
//! HTTP/1.1 against 1,268 and 1,744 uncapped, 1,595 and 1,649 over HTTP/2
//! against 1,395 and 1,726: within the noise of a shared machine.

/// Allocations from this size up get their own mapping (glibc's initial
/// threshold is 128 KiB; 256 KiB keeps small and medium blocks on the heap).
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// The most malloc arenas the process may have with `cores` cores: one
/// per runtime thread, the workers (one per core) and the main thread.
pub fn arena_max(cores: usize) -> usize {
    cores + 1
}

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] and caps its arenas
/// at [`arena_max`] of the cores the process may use. Call once at start,
/// before threads are spawned; false where refused or not glibc.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(arena_max(cores)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a glibc malloc parameter (under its own
        // lock); M_MMAP_THRESHOLD with a value below glibc's maximum (32 MiB
        // on 64-bit) and M_ARENA_MAX with any positive value are valid, and
        // no pointer is involved.
        #[allow(unsafe_code)]
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
        };
        ok
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
