//! Whether a repository can clone: decided by doing it, once, small.
//!
//! A filesystem's name does not say whether reflinks work (XFS without
//! `reflink=1`, NFS with or without 4.2 clone, OCFS2 with or without the
//! feature), so this module makes a tiny file in the repository's
//! `CoriolisSnapshots` folder, clones it with the same code path snapshots
//! use ([`crate::sys::clone::reflink`] through directory descriptors) and
//! removes both files. It owns that probe and nothing else: caching is the
//! inventory's job. The filesystem type is recorded for diagnostics only.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys::path::{self, SNAPSHOTS_DIR};
use crate::sys::{self, CloneMethod, FsType};

/// Prefix of the probe's files, so that a crash-left probe is recognisable.
pub const PROBE_PREFIX: &str = ".coe-clone-probe-";
/// One filesystem block: the smallest file every reflink filesystem clones.
const PROBE_LEN: usize = 4096;

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneProbe {
    pub mount_point: PathBuf,
    /// The clone worked.
    pub can_clone: bool,
    /// How it was made, when it worked.
    pub method: Option<CloneMethod>,
    /// The filesystem at the mount point, when it could be read.
    pub fs_type: Option<FsType>,
    /// Why it did not work.
    pub error: Option<String>,
}

impl CloneProbe {
    /// A one-line description for logs and incompatibility reasons.
    pub fn describe(&self) -> String {
        let fs = self
            .fs_type
            .map_or_else(|| "unknown filesystem".to_owned(), |f| f.name());
        match (&self.method, &self.error) {
            (Some(m), _) => format!("{fs}, clones with {m:?}"),
            (None, Some(e)) => format!("{fs}, cannot clone: {e}"),
            (None, None) => format!("{fs}, cannot clone"),
        }
    }
}

/// Opens `<mount>/CoriolisSnapshots`, creating it (mode 0700) if missing,
/// never following a symlink planted in its place. Returns (mount, folder).
fn open_snapshots_dir(mount: &Path) -> Result<(OwnedFd, OwnedFd), String> {
    let root = path::open_dir(mount).map_err(|e| format!("cannot open the mount point: {e}"))?;
    let (dir, _) = path::ensure_dir_at(root.as_fd(), SNAPSHOTS_DIR)
        .map_err(|e| format!("cannot open {SNAPSHOTS_DIR}: {e}"))?;
    Ok((root, dir))
}

/// Probes `mount`. Never fails: a failure is a "cannot clone" answer with
/// its reason. Leaves no file behind.
pub fn probe_clone(mount: &Path) -> CloneProbe {
    let mut out = CloneProbe {
        mount_point: mount.to_path_buf(),
        can_clone: false,
        method: None,
        fs_type: None,
        error: None,
    };
    let (root, dir) = match open_snapshots_dir(mount) {
        Ok(fds) => fds,
        Err(e) => {
            if let Ok(f) = File::open(mount) {
                out.fs_type = sys::fs_type(&f).ok();
            }
            out.error = Some(e);
            return out;
        }
    };
    out.fs_type = sys::fs_type(&root).ok();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // Unique across processes and nodes sharing an OCFS2 volume.
    let base = format!(
        "{PROBE_PREFIX}{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let src_name = format!("{base}.src");
    let dst_name = format!("{base}.dst");
    let result = (|| -> Result<CloneMethod, String> {
        let mut f = path::create_new_at(dir.as_fd(), &src_name)
            .map_err(|e| format!("cannot create a probe file: {e}"))?;
        f.write_all(&[0x5a; PROBE_LEN])
            .map_err(|e| format!("cannot write a probe file: {e}"))?;
        drop(f);
        sys::reflink(
            dir.as_fd(),
            Path::new(&src_name),
            dir.as_fd(),
            Path::new(&dst_name),
        )
        .map_err(|e| crate::error::chain(&e))
    })();
    for name in [&src_name, &dst_name] {
        let _ = path::unlink_at(dir.as_fd(), name);
    }
    match result {
        Ok(m) => {
            out.can_clone = true;
            out.method = Some(m);
        }
        Err(e) => out.error = Some(e),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_mount_point_is_a_reasoned_no() {
        let p = probe_clone(Path::new("/nonexistent/coe-probe-test"));
        assert!(!p.can_clone);
        assert!(p.error.as_deref().unwrap().contains("mount point"), "{p:?}");
        assert!(p.describe().contains("cannot clone"));
    }

    #[test]
    fn tmpfs_or_ext4_cannot_clone_and_leaves_nothing() {
        // /dev/shm is tmpfs on Linux: no reflink.
        let base = std::env::temp_dir().join(format!("coe-probe-{}", std::process::id()));
        let dir = Path::new("/dev/shm").join(base.file_name().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let p = probe_clone(&dir);
        assert!(!p.can_clone, "{p:?}");
        assert_eq!(p.fs_type, Some(FsType::Tmpfs));
        let left: Vec<_> = std::fs::read_dir(dir.join(SNAPSHOTS_DIR))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "probe files left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
