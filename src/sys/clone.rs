//! Reflink clones: `FICLONE`, and OCFS2's own `OCFS2_IOC_REFLINK` where the
//! kernel has no `FICLONE` for OCFS2 (Oracle VM 3.x's UEK4).
//!
//! Both files are addressed through open directory descriptors and names,
//! never through a path string built from input, by the safe-path layer
//! ([`super::path`]): the source is opened with `O_NOFOLLOW`, the
//! destination created with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600,
//! so a symlink planted in a snapshot folder is never followed. The OCFS2 ioctl resolves paths itself; it is given
//! `/proc/self/fd/<dir fd>/<name>` so that only the final name is looked up,
//! relative to the directory we hold open, and the kernel does not follow a
//! final symlink there (it looks the old path up without `LOOKUP_FOLLOW`).
//! Because it looks the name up again, after our `O_NOFOLLOW` open, the name
//! may by then be another file or a symlink (which OCFS2 would clone as a
//! symlink): after the ioctl the source name must still be the file we
//! opened and the clone a regular file, or the clone is removed and the call
//! fails.
//!
//! `[store] clone = "ocfs2-reflink"` ([`ClonePolicy`]) skips `FICLONE`, so
//! that the OCFS2 ioctl is used on a kernel that has both: that is how the
//! tests exercise it on a real OCFS2 (a QEMU guest, `scripts/ocfs2/`), and a
//! way to run as on UEK4 anywhere.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};

use super::ioctl;
use super::path::{self, OpenError};

/// `struct reflink_arguments` from `fs/ocfs2/ocfs2_ioctl.h`:
/// `{ __u64 old_path; __u64 new_path; __u64 preserve; }`.
pub const OCFS2_REFLINK_ARGS_LEN: usize = 24;
/// `OCFS2_IOC_REFLINK = _IOW('o', 4, struct reflink_arguments)`.
pub const OCFS2_IOC_REFLINK: Opcode = opcode::write::<[u8; OCFS2_REFLINK_ARGS_LEN]>(b'o', 4);

/// How a clone was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMethod {
    Ficlone,
    Ocfs2Reflink,
}

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("cannot open the source {name:?}")]
    OpenSource {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the source {name:?} is not a regular file")]
    NotRegular { name: String },
    #[error("cannot create the clone {name:?}")]
    CreateTarget {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the filesystem cannot clone {name:?} (no FICLONE and no OCFS2 reflink)")]
    Unsupported {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the reflink of {name:?} failed")]
    Reflink {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a name contains a NUL byte or a slash: {name:?}")]
    BadName { name: String },
}

/// Which ioctls [`reflink`] may use (`[store] clone` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClonePolicy {
    /// `FICLONE`, and the OCFS2 ioctl where the kernel has no `FICLONE`.
    #[default]
    Auto,
    /// The OCFS2 ioctl only (fails on other filesystems).
    Ocfs2Reflink,
}

static OCFS2_REFLINK_ONLY: AtomicBool = AtomicBool::new(false);

/// Sets the policy [`reflink`] uses in this process (the service sets it
/// once from its config at start).
pub fn set_policy(policy: ClonePolicy) {
    OCFS2_REFLINK_ONLY.store(policy == ClonePolicy::Ocfs2Reflink, Ordering::Relaxed);
}

/// The policy [`reflink`] uses in this process.
pub fn policy() -> ClonePolicy {
    if OCFS2_REFLINK_ONLY.load(Ordering::Relaxed) {
        ClonePolicy::Ocfs2Reflink
    } else {
        ClonePolicy::Auto
    }
}

/// The OCFS2 ioctl's argument block: two user pointers to NUL-terminated
/// paths and a `preserve` flag (keep owner, mode and times).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ocfs2ReflinkArgs {
    pub old_path: u64,
    pub new_path: u64,
    pub preserve: bool,
}

impl Ocfs2ReflinkArgs {
    /// The bytes the kernel copies in (`copy_from_user`), native endian.
    pub fn encode(&self) -> [u8; OCFS2_REFLINK_ARGS_LEN] {
        let mut b = [0u8; OCFS2_REFLINK_ARGS_LEN];
        b[0..8].copy_from_slice(&self.old_path.to_ne_bytes());
        b[8..16].copy_from_slice(&self.new_path.to_ne_bytes());
        b[16..24].copy_from_slice(&u64::from(self.preserve).to_ne_bytes());
        b
    }
}

fn check_name(name: &Path) -> Result<CString, CloneError> {
    path::cname(name).map_err(|_| CloneError::BadName {
        name: name.display().to_string(),
    })
}

/// Opens a regular file `name` in `dir` read-only, never following a symlink.
pub fn open_regular_nofollow(dir: BorrowedFd<'_>, name: &Path) -> Result<File, CloneError> {
    check_name(name)?;
    let shown = || name.display().to_string();
    path::open_regular_at(dir, name).map_err(|e| match e {
        OpenError::Io(source) => CloneError::OpenSource {
            name: shown(),
            source,
        },
        OpenError::NotRegular => CloneError::NotRegular { name: shown() },
    })
}

/// Clones `src_name` in `src_dir` to a new file `dst_name` in `dst_dir`
/// (which must not exist). Tries `FICLONE` first (unless the process's
/// [`policy`] says otherwise); where the kernel does not know it for this
/// filesystem, falls back to the OCFS2 reflink ioctl. On failure nothing is
/// left at `dst_name`.
pub fn reflink(
    src_dir: BorrowedFd<'_>,
    src_name: &Path,
    dst_dir: BorrowedFd<'_>,
    dst_name: &Path,
) -> Result<CloneMethod, CloneError> {
    reflink_with(src_dir, src_name, dst_dir, dst_name, policy(), &mut || {})
}

/// [`reflink`] with an explicit policy, and `before_ocfs2` called just
/// before the OCFS2 ioctl looks the names up again (tests swap names there
/// to check what the ioctl's own path resolution makes of them).
pub fn reflink_with(
    src_dir: BorrowedFd<'_>,
    src_name: &Path,
    dst_dir: BorrowedFd<'_>,
    dst_name: &Path,
    policy: ClonePolicy,
    before_ocfs2: &mut dyn FnMut(),
) -> Result<CloneMethod, CloneError> {
    let src = open_regular_nofollow(src_dir, src_name)?;
    let dst_c = check_name(dst_name)?;
    let dst =
        path::create_new_at(dst_dir, dst_name).map_err(|source| CloneError::CreateTarget {
            name: dst_name.display().to_string(),
            source,
        })?;
    let ficlone = match policy {
        ClonePolicy::Auto => rustix::fs::ioctl_ficlone(&dst, &src),
        // As a kernel without FICLONE answers.
        ClonePolicy::Ocfs2Reflink => Err(Errno::NOTTY),
    };
    match ficlone {
        Ok(()) => Ok(CloneMethod::Ficlone),
        Err(errno) => {
            drop(dst);
            let _ = path::unlink_at(dst_dir, dst_name);
            if !ficlone_unsupported(errno) {
                return Err(CloneError::Reflink {
                    name: src_name.display().to_string(),
                    source: errno.into(),
                });
            }
            let src_c = check_name(src_name)?;
            before_ocfs2();
            ocfs2_reflink(&src, src_dir, &src_c, dst_dir, &dst_c).map_err(|e| {
                if ficlone_unsupported(e) {
                    CloneError::Unsupported {
                        name: src_name.display().to_string(),
                        source: errno.into(),
                    }
                } else {
                    CloneError::Reflink {
                        name: src_name.display().to_string(),
                        source: e.into(),
                    }
                }
            })?;
            // The ioctl looked the source name up itself: it must still be
            // the file we opened, and the clone a regular file.
            let clone = path::open_file_at(dst_dir, dst_name);
            let same = |a: &rustix::fs::Stat, b: &rustix::fs::Stat| {
                a.st_dev == b.st_dev && a.st_ino == b.st_ino
            };
            let ok = match (
                &clone,
                rustix::fs::fstat(&src),
                rustix::fs::statat(
                    src_dir,
                    src_c.as_c_str(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                ),
            ) {
                (Ok(f), Ok(opened), Ok(named)) => {
                    same(&opened, &named)
                        && rustix::fs::fstat(f).is_ok_and(|c| {
                            rustix::fs::FileType::from_raw_mode(c.st_mode)
                                == rustix::fs::FileType::RegularFile
                                && !same(&c, &opened)
                        })
                }
                _ => false,
            };
            if !ok {
                drop(clone);
                let _ = path::unlink_at(dst_dir, dst_name);
                return Err(CloneError::Reflink {
                    name: src_name.display().to_string(),
                    source: std::io::Error::other(
                        "the name changed under the OCFS2 reflink (a symlink or another file \
                         swapped in): clone removed",
                    ),
                });
            }
            // `preserve` copied the source's mode; snapshots stay private.
            if let Ok(f) = &clone {
                let _ = rustix::fs::fchmod(f, Mode::from_raw_mode(path::FILE_MODE));
            }
            Ok(CloneMethod::Ocfs2Reflink)
        }
    }
}

/// Errors by which a kernel says "this filesystem cannot FICLONE", as
/// opposed to "this clone failed": old kernels without the ioctl (ENOTTY),
/// filesystems without `remap_file_range` (EOPNOTSUPP, EINVAL on some),
/// and different filesystems (EXDEV).
fn ficlone_unsupported(e: Errno) -> bool {
    e == Errno::NOTTY || e == Errno::OPNOTSUPP || e == Errno::INVAL || e == Errno::XDEV
}

fn proc_path(dir: BorrowedFd<'_>, name: &CString) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.as_bytes());
    CString::new(p).expect("no NUL: name was checked")
}

fn ocfs2_reflink(
    src: &File,
    src_dir: BorrowedFd<'_>,
    src_name: &CString,
    dst_dir: BorrowedFd<'_>,
    dst_name: &CString,
) -> Result<(), Errno> {
    let old = proc_path(src_dir, src_name);
    let new = proc_path(dst_dir, dst_name);
    let args = Ocfs2ReflinkArgs {
        old_path: old.as_ptr() as u64,
        new_path: new.as_ptr() as u64,
        preserve: true,
    };
    let enc = args.encode();
    let mut words = [
        u64::from_ne_bytes(enc[0..8].try_into().expect("8")),
        u64::from_ne_bytes(enc[8..16].try_into().expect("8")),
        u64::from_ne_bytes(enc[16..24].try_into().expect("8")),
    ];
    // SAFETY: OCFS2_IOC_REFLINK copies 24 bytes in from the pointer (the
    // three words of `words`, `struct reflink_arguments`) and reads the two
    // NUL-terminated strings its first two words point to, `old` and `new`,
    // which live until after the call returns (dropped below). It writes
    // nothing to user memory: `call::<false>`.
    #[allow(unsafe_code)]
    let r = unsafe { ioctl::call::<false>(src.as_fd(), OCFS2_IOC_REFLINK, &mut words) };
    drop((old, new));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ocfs2_opcode_matches_the_c_macro() {
        // _IOW('o', 4, struct reflink_arguments): dir=1 (write) << 30,
        // size 24 << 16, type 'o' << 8, nr 4.
        assert_eq!(OCFS2_IOC_REFLINK as u64, 0x4018_6f04);
    }

    #[test]
    fn ocfs2_args_encoding() {
        let a = Ocfs2ReflinkArgs {
            old_path: 0x1122_3344_5566_7788,
            new_path: 0x99,
            preserve: true,
        };
        let b = a.encode();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[8..16], &0x99u64.to_ne_bytes());
        assert_eq!(&b[16..24], &1u64.to_ne_bytes());
        let b = Ocfs2ReflinkArgs {
            preserve: false,
            ..a
        }
        .encode();
        assert_eq!(&b[16..24], &[0u8; 8]);
    }

    #[test]
    fn names_with_slashes_or_dots_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(matches!(
                check_name(Path::new(bad)),
                Err(CloneError::BadName { .. })
            ));
        }
        assert!(check_name(Path::new("disk.img")).is_ok());
    }

    #[test]
    fn proc_path_is_relative_to_the_dir_fd() {
        let d = File::open("/").unwrap();
        let p = proc_path(d.as_fd(), &CString::new("x.img").unwrap());
        assert_eq!(
            p.to_str().unwrap(),
            format!("/proc/self/fd/{}/x.img", d.as_raw_fd())
        );
    }
}
