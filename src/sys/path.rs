//! The safe-path layer: every file and folder the service opens below a
//! repository's mount point is reached here, `openat`-style, from a
//! directory descriptor.
//!
//! Rules (SEMANTICS.md §1): a name is one path component (no slash, not `.`
//! or `..`, no NUL) checked before use, and none comes from a request;
//! directories are opened with `O_DIRECTORY | O_NOFOLLOW` one name at a
//! time, files with `O_NOFOLLOW`, new files exclusively (`O_CREAT |
//! O_EXCL`, mode 0600), so a symlink planted in `CoriolisSnapshots` or a
//! snapshot folder is never followed. A path of several components (a
//! `vm.cfg` beneath a repository) is resolved by [`resolve_beneath`], which
//! refuses a symlink in any component and anything outside the starting
//! directory. Functions hand descriptors up; nothing re-resolves a path.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// The folder under a repository's mount point that holds the snapshots
/// (and the clone probe's short-lived files). Fixed by API.md.
pub const SNAPSHOTS_DIR: &str = "CoriolisSnapshots";
/// Mode of snapshot folders and `CoriolisSnapshots`: only the service.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files the service writes (clones, manifests, owner markers).
pub const FILE_MODE: u32 = 0o600;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// `O_NONBLOCK` so that opening a FIFO (or a device) planted where a file
/// is expected returns at once instead of waiting for a writer; it is
/// cleared again ([`blocking`]) before the descriptor is handed up, so reads
/// of regular files (io_uring included) behave as usual.
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY)
    .union(OFlags::NONBLOCK);
const NEW_FILE_FLAGS: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Why a regular file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotRegular,
}

impl From<OpenError> for std::io::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io(e) => e,
            OpenError::NotRegular => std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        }
    }
}

/// Whether `name` is one plain path component.
pub fn is_plain_name(name: impl AsRef<OsStr>) -> bool {
    let b = name.as_ref().as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}

/// A single path component usable with `openat`.
pub fn cname(name: impl AsRef<OsStr>) -> std::io::Result<CString> {
    let name = name.as_ref();
    if !is_plain_name(name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    // A plain name has no NUL byte.
    CString::new(name.as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Opens a directory by absolute path; the last component must not be a
/// symlink.
pub fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `name` inside `dir`, never following a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: impl AsRef<OsStr>) -> std::io::Result<OwnedFd> {
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
pub fn open_regular_at(dir: BorrowedFd<'_>, name: impl AsRef<OsStr>) -> Result<File, OpenError> {
    let fd = rustix::fs::openat(dir, cname(name)?.as_c_str(), FILE_FLAGS, Mode::empty())
        .map_err(std::io::Error::from)?;
    let st = rustix::fs::fstat(&fd).map_err(std::io::Error::from)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(OpenError::NotRegular);
    }
    Ok(File::from(blocking(fd)?))
}

/// Clears the `O_NONBLOCK` that [`FILE_FLAGS`] opens with.
fn blocking(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
    Ok(fd)
}

/// [`open_regular_at`] with every failure as an `io::Error`.
pub fn open_file_at(dir: BorrowedFd<'_>, name: impl AsRef<OsStr>) -> std::io::Result<File> {
    Ok(open_regular_at(dir, name)?)
}

/// Creates the file `name` in `dir` for writing: exclusively (it must not
/// exist, not even as a symlink), mode 0600.
pub fn create_new_at(dir: BorrowedFd<'_>, name: impl AsRef<OsStr>) -> std::io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        cname(name)?.as_c_str(),
        NEW_FILE_FLAGS,
        Mode::from_raw_mode(FILE_MODE),
    )?;
    Ok(File::from(fd))
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
    let mut f = create_new_at(dir, tmp)?;
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
    let mut f = create_new_at(dir, name)?;
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
pub fn unlink_at(dir: BorrowedFd<'_>, name: impl AsRef<OsStr>) -> std::io::Result<()> {
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

/// Opens `relative` beneath `dir` read-only, with no symlink in any
/// component and nothing outside `dir` (no `..`, not absolute). Uses
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel has it
/// (Linux 5.6), else walks the path one component at a time with
/// `O_NOFOLLOW`. The result may be a file or a directory.
pub fn resolve_beneath(dir: BorrowedFd<'_>, relative: &Path) -> std::io::Result<OwnedFd> {
    let names = components(relative)?;
    let fd = match openat2_beneath(dir, relative) {
        Err(Errno::NOSYS) => walk_beneath(dir, &names)?,
        other => other?,
    };
    blocking(fd)
}

/// The plain names of `relative`; `.` components are dropped, `..`, a root
/// and an empty path refused.
fn components(relative: &Path) -> std::io::Result<Vec<&OsStr>> {
    let mut names = Vec::new();
    for c in relative.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{relative:?} leaves its directory"),
                ))
            }
        }
    }
    if names.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty path",
        ));
    }
    Ok(names)
}

fn openat2_beneath(dir: BorrowedFd<'_>, relative: &Path) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        relative,
        FILE_FLAGS,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The fallback of [`resolve_beneath`]: every component but the last is
/// opened as a directory, each with `O_NOFOLLOW` (a symlink answers ELOOP
/// or ENOTDIR); `..` never reaches here.
fn walk_beneath(dir: BorrowedFd<'_>, names: &[&OsStr]) -> std::io::Result<OwnedFd> {
    let (last, parents) = names
        .split_last()
        .expect("components() refuses an empty path");
    let mut held: Option<OwnedFd> = None;
    for name in parents {
        let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
        held = Some(open_dir_at(at, name)?);
    }
    let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
    Ok(rustix::fs::openat(
        at,
        cname(last)?.as_c_str(),
        FILE_FLAGS,
        Mode::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(std::path::PathBuf);

    impl Tmp {
        fn new(tag: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!("coe-path-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `a/b/vm.cfg`, a symlinked folder `link -> a`, a symlinked file
    /// `a/b/cfg-link -> vm.cfg`, and a file outside.
    fn tree(tag: &str) -> (Tmp, OwnedFd) {
        let t = Tmp::new(tag);
        std::fs::create_dir_all(t.0.join("a/b")).unwrap();
        std::fs::write(t.0.join("a/b/vm.cfg"), b"name = 'x'\n").unwrap();
        std::os::unix::fs::symlink("a", t.0.join("link")).unwrap();
        std::os::unix::fs::symlink("vm.cfg", t.0.join("a/b/cfg-link")).unwrap();
        let fd = open_dir(&t.0).unwrap();
        (t, fd)
    }

    fn read(fd: OwnedFd) -> String {
        std::io::read_to_string(File::from(fd)).unwrap()
    }

    /// Runs `f` on a thread and fails the test if it has not returned
    /// within 30 s (an open that waits for a FIFO's writer never does).
    fn within_30s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("the open blocked: a FIFO must not wait for a writer")
    }

    #[test]
    fn a_fifo_where_a_file_is_expected_never_blocks_the_open() {
        let t = Tmp::new("fifo");
        std::fs::create_dir_all(t.0.join("a")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.0.join("a/vm.cfg"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let dir = t.0.clone();
        let regular = within_30s(move || {
            let root = open_dir(&dir).unwrap();
            let a = open_dir_at(root.as_fd(), "a").unwrap();
            open_regular_at(a.as_fd(), "vm.cfg").map(|_| ())
        });
        assert!(matches!(regular, Err(OpenError::NotRegular)), "{regular:?}");
        let dir = t.0.clone();
        let (flags, kind) = within_30s(move || {
            let root = open_dir(&dir).unwrap();
            let fd = resolve_beneath(root.as_fd(), Path::new("a/vm.cfg")).unwrap();
            let st = rustix::fs::fstat(&fd).unwrap();
            (
                rustix::fs::fcntl_getfl(&fd).unwrap(),
                rustix::fs::FileType::from_raw_mode(st.st_mode),
            )
        });
        assert_eq!(kind, rustix::fs::FileType::Fifo);
        assert!(!flags.contains(OFlags::NONBLOCK), "handed up non-blocking");
    }

    #[test]
    fn regular_files_are_handed_up_blocking() {
        let (_t, root) = tree("blocking");
        let fd = resolve_beneath(root.as_fd(), Path::new("a/b/vm.cfg")).unwrap();
        assert!(!rustix::fs::fcntl_getfl(&fd)
            .unwrap()
            .contains(OFlags::NONBLOCK));
        let b = open_dir_at(root.as_fd(), "a").unwrap();
        let b = open_dir_at(b.as_fd(), "b").unwrap();
        let f = open_regular_at(b.as_fd(), "vm.cfg").unwrap();
        assert!(!rustix::fs::fcntl_getfl(&f)
            .unwrap()
            .contains(OFlags::NONBLOCK));
    }

    #[test]
    fn names_with_slashes_dots_or_nul_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(cname(bad).is_err(), "{bad:?}");
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        assert!(cname("disk.img").is_ok());
        assert!(is_plain_name(".hidden"));
    }

    /// Both strategies must agree: this runs each against the same cases.
    fn resolve_cases(resolve: impl Fn(BorrowedFd<'_>, &Path) -> std::io::Result<OwnedFd>) {
        let (_t, root) = tree("resolve");
        let ok = resolve(root.as_fd(), Path::new("a/b/vm.cfg")).unwrap();
        assert_eq!(read(ok), "name = 'x'\n");
        let ok = resolve(root.as_fd(), Path::new("./a/./b/vm.cfg")).unwrap();
        assert_eq!(read(ok), "name = 'x'\n");
        for bad in [
            "link/b/vm.cfg",
            "a/b/cfg-link",
            "a/../a/b/vm.cfg",
            "../x",
            "/etc/passwd",
            "",
            "a/b/missing",
        ] {
            assert!(resolve(root.as_fd(), Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolve_beneath_refuses_symlinks_and_escapes() {
        resolve_cases(resolve_beneath);
    }

    #[test]
    fn the_component_walk_refuses_the_same() {
        resolve_cases(|dir, p| walk_beneath(dir, &components(p)?));
    }

    #[test]
    fn files_are_created_exclusively_and_opened_without_following() {
        let (t, root) = tree("files");
        let b = open_dir_at(open_dir_at(root.as_fd(), "a").unwrap().as_fd(), "b").unwrap();
        assert!(create_new_at(b.as_fd(), "vm.cfg").is_err());
        assert!(create_new_at(b.as_fd(), "cfg-link").is_err());
        assert!(matches!(
            open_regular_at(b.as_fd(), "cfg-link"),
            Err(OpenError::Io(_))
        ));
        assert!(matches!(
            open_regular_at(root.as_fd(), "a"),
            Err(OpenError::NotRegular)
        ));
        assert!(open_dir_at(root.as_fd(), "link").is_err());
        write_atomic(b.as_fd(), ".tmp", "new", b"one").unwrap();
        write_atomic(b.as_fd(), ".tmp", "new", b"two").unwrap();
        assert_eq!(std::fs::read(t.0.join("a/b/new")).unwrap(), b"two");
        assert!(!t.0.join("a/b/.tmp").exists());
    }
}
