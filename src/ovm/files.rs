//! Reading the node's files: whole files up to a size, and files beneath a
//! repository's mount point opened with no symlink in any component.

use std::path::Path;

use super::error::InventoryError;

/// The whole file at `path`, refused when larger than `max` bytes.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, InventoryError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|source| InventoryError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
    if buf.len() as u64 > max {
        return Err(InventoryError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(buf)
}

/// A file beneath a repository's mount point, opened with no symlink in
/// any component and nothing outside the mount ([`crate::sys::path::resolve_beneath`]):
/// `path` must lie beneath `mount`. The errors say which rule refused it.
pub(crate) fn open_beneath(mount: &Path, path: &Path) -> std::io::Result<std::fs::File> {
    let rel = path.strip_prefix(mount).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not beneath the repository's mount point {}",
                mount.display()
            ),
        )
    })?;
    let dir = crate::sys::path::open_dir(mount)?;
    let fd = crate::sys::path::resolve_beneath(std::os::fd::AsFd::as_fd(&dir), rel).map_err(|e| {
        match e.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::LOOP.raw_os_error()
                    || code == rustix::io::Errno::XDEV.raw_os_error()
                    || code == rustix::io::Errno::NOTDIR.raw_os_error() =>
            {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "a component of the path is a symlink or leads out of {} (not followed): {e}",
                        mount.display()
                    ),
                )
            }
            _ => e,
        }
    })?;
    Ok(std::fs::File::from(fd))
}

/// [`read_bounded`] of a file beneath a repository's mount, through
/// [`open_beneath`] (vm.cfg, `.ovsmeta`: a symlink in any component is not
/// followed).
pub(crate) fn read_bounded_beneath(
    mount: &Path,
    path: &Path,
    max: u64,
) -> Result<Vec<u8>, InventoryError> {
    use std::io::Read;
    let read = |source| InventoryError::Read {
        path: path.to_owned(),
        source,
    };
    let f = open_beneath(mount, path).map_err(read)?;
    if !f.metadata().map_err(read)?.is_file() {
        return Err(read(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf).map_err(read)?;
    if buf.len() as u64 > max {
        return Err(InventoryError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(buf)
}
