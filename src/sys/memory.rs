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
