//! The one [`Ioctl`] implementation of the syscall layer: an ioctl whose
//! argument is a pointer to a block of `u64` words the caller owns (so the
//! block is 8-byte aligned, as the kernel's structs of `__u64` fields
//! want), and whose only result is success or an errno.
//!
//! FIEMAP and the OCFS2 reflink are both of that shape; what differs is
//! what the kernel does with the block, and that is the caller's to say:
//! [`call`]`::<false>` for a block the kernel only reads, `::<true>` for
//! one it fills in. It is `unsafe` because the soundness of a call depends
//! on the opcode, which only the caller knows: each call site says, in its
//! own SAFETY comment, how much the kernel reads and writes there and what
//! any pointer inside the block points to.

use std::os::fd::AsFd;

use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};

/// An ioctl over `words`; `WRITES` says whether the kernel writes into them.
struct WordsCall<'a, const WRITES: bool> {
    opcode: Opcode,
    words: &'a mut [u64],
}

// SAFETY: `as_ptr` gives the start of `words`, valid for reads and writes
// of `words.len() * 8` bytes and exclusively borrowed for the call (the
// borrow outlives the `WordsCall`). `IS_MUTATING` is `WRITES`, which the
// caller of `call` promises matches what the opcode does. `output_from_ptr` reads nothing: the result is the
// ioctl's success alone.
#[allow(unsafe_code)]
unsafe impl<const WRITES: bool> Ioctl for WordsCall<'_, WRITES> {
    type Output = ();
    const IS_MUTATING: bool = WRITES;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        self.words.as_mut_ptr().cast()
    }

    #[allow(unsafe_code)]
    unsafe fn output_from_ptr(
        _out: IoctlOutput,
        _extract_output: *mut core::ffi::c_void,
    ) -> rustix::io::Result<()> {
        Ok(())
    }
}

/// Issues `opcode` on `fd` with a pointer to `words`, which the kernel
/// reads and, when `WRITES`, fills in.
///
/// # Safety
///
/// For `opcode`, the kernel must read at most `words.len() * 8` bytes at
/// the pointer, write there only when `WRITES` (and then at most as many
/// bytes), and touch no other user memory than what pointers the words
/// carry point to, which must be valid for that until this returns.
#[allow(unsafe_code)]
pub(super) unsafe fn call<const WRITES: bool>(
    fd: impl AsFd,
    opcode: Opcode,
    words: &mut [u64],
) -> Result<(), Errno> {
    // SAFETY: the caller's promise (see `# Safety`) is what `WordsCall`'s
    // `IS_MUTATING = WRITES` and `rustix::ioctl::ioctl` need.
    unsafe { rustix::ioctl::ioctl(fd, WordsCall::<WRITES> { opcode, words }) }
}
