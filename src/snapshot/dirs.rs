//! Directory-handle file operations for snapshot folders.
//!
//! Everything below a repository's mount point is reached by `openat`-style
//! calls on directory descriptors opened with `O_DIRECTORY | O_NOFOLLOW`,
//! one name at a time, so a symlink planted in `CoriolisSnapshots` or in a
//! snapshot folder is never followed (SEMANTICS.md §1). Names are checked
//! (no slash, not `.` or `..`, no NUL) before use; none comes from a request.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

/// Mode of snapshot folders and `CoriolisSnapshots`: only the service.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files the service writes (manifest, owner marker).
pub const FILE_MODE: u32 = 0o600;

/// A single path component usable with `openat`.
pub fn cname(name: &str) -> std::io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} contains a NUL byte"),
        )
    })
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens a directory by absolute path; the last component must not be a
/// symlink.
pub fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `name` inside `dir`, never following a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        cname(name)?.as_c_str(),
        DIR_FLAGS,
        Mode::empty(),
    )?)
}

/// Opens `name` in `dir`, creating it (mode 0700) when missing. Returns the
/// handle and whether it was created here.
pub fn ensure_dir_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<(OwnedFd, bool)> {
    let c = cname(name)?;
    let created = match rustix::fs::mkdirat(dir, c.as_c_str(), Mode::from_raw_mode(DIR_MODE)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    Ok((open_dir_at(dir, name)?, created))
}

/// Creates the directory `name` in `dir` (mode 0700); it must not exist.
pub fn create_dir_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<OwnedFd> {
    let c = cname(name)?;
    rustix::fs::mkdirat(dir, c.as_c_str(), Mode::from_raw_mode(DIR_MODE))?;
    open_dir_at(dir, name)
}

/// Opens the regular file `name` in `dir` read-only, never following a
/// symlink.
pub fn open_file_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<std::fs::File> {
    crate::sys::clone::open_regular_nofollow(dir, Path::new(name)).map_err(|e| match e {
        crate::sys::CloneError::OpenSource { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}

/// Writes `bytes` to `name` in `dir` atomically and durably: a temporary
/// file `tmp` (created exclusively, mode 0600, no symlink followed) is
/// written and fsynced, renamed over `name`, and the directory fsynced.
pub fn write_atomic(
    dir: BorrowedFd<'_>,
    tmp: &str,
    name: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let ctmp = cname(tmp)?;
    let cfinal = cname(name)?;
    // A temporary file left by a crash is ours: replace it.
    let _ = rustix::fs::unlinkat(dir, ctmp.as_c_str(), AtFlags::empty());
    let fd = rustix::fs::openat(
        dir,
        ctmp.as_c_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )?;
    let mut f = std::fs::File::from(fd);
    let result = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            rustix::fs::renameat(dir, ctmp.as_c_str(), dir, cfinal.as_c_str()).map_err(Into::into)
        });
    if let Err(e) = result {
        let _ = rustix::fs::unlinkat(dir, ctmp.as_c_str(), AtFlags::empty());
        return Err(e);
    }
    fsync_dir(dir)
}

/// Writes a small file `name` in `dir` (created exclusively, mode 0600) and
/// fsyncs it and the directory.
pub fn write_new(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let c = cname(name)?;
    let fd = rustix::fs::openat(
        dir,
        c.as_c_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    f.sync_all()?;
    fsync_dir(dir)
}

/// Reads the regular file `name` in `dir`, refusing more than `max` bytes.
/// Returns None when it does not exist.
pub fn read_small(dir: BorrowedFd<'_>, name: &str, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match open_file_at(dir, name) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{name:?} is larger than {max} bytes"),
        ));
    }
    Ok(Some(buf))
}

/// Removes the entry `name` (not a directory) from `dir`; a missing entry is
/// not an error. A symlink is removed itself, never followed.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    match rustix::fs::unlinkat(dir, cname(name)?.as_c_str(), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the empty directory `name` from `dir`; missing is not an error.
pub fn rmdir_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    match rustix::fs::unlinkat(dir, cname(name)?.as_c_str(), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The names in a directory, without `.` and `..`. Names that are not UTF-8
/// are returned lossily (callers only act on names they recognise).
pub fn list(dir: BorrowedFd<'_>) -> std::io::Result<Vec<String>> {
    // read_from opens its own handle on "." so the caller's stays unread.
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(entry) = d.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(out)
}

/// Removes every entry of the directory `name` in `parent` that is not a
/// directory, then the directory itself. Used only on folders this service
/// owns; a subdirectory (never made by us) makes it fail with ENOTEMPTY.
pub fn remove_tree_flat(parent: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    let dir = match open_dir_at(parent, name) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in list(dir.as_fd())? {
        unlink_at(dir.as_fd(), &entry)?;
    }
    drop(dir);
    rmdir_at(parent, name)?;
    fsync_dir(parent)
}

/// Makes a directory's entries durable.
pub fn fsync_dir(dir: BorrowedFd<'_>) -> std::io::Result<()> {
    Ok(rustix::fs::fsync(dir)?)
}

/// Whether `path` as bytes is a plain file name.
pub fn is_plain_name(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}
