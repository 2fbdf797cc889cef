//! Which filesystem a descriptor lives on, from `fstatfs`'s magic number.
//!
//! Used for diagnostics only: whether a repository can clone is decided by
//! a probe clone, never by the filesystem's name.

use std::os::fd::AsFd;

/// Magic numbers from `include/uapi/linux/magic.h` (OCFS2's from
/// `fs/ocfs2/ocfs2_fs.h`).
const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;
const OCFS2_SUPER_MAGIC: u64 = 0x7461_636f;
const EXT4_SUPER_MAGIC: u64 = 0xef53;
const NFS_SUPER_MAGIC: u64 = 0x6969;
const TMPFS_MAGIC: u64 = 0x0102_1994;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Xfs,
    Btrfs,
    Ocfs2,
    Ext4,
    Nfs,
    Tmpfs,
    Other(u64),
}

impl FsType {
    pub fn from_magic(magic: u64) -> Self {
        match magic {
            XFS_SUPER_MAGIC => FsType::Xfs,
            BTRFS_SUPER_MAGIC => FsType::Btrfs,
            OCFS2_SUPER_MAGIC => FsType::Ocfs2,
            EXT4_SUPER_MAGIC => FsType::Ext4,
            NFS_SUPER_MAGIC => FsType::Nfs,
            TMPFS_MAGIC => FsType::Tmpfs,
            other => FsType::Other(other),
        }
    }

    pub fn name(&self) -> String {
        match self {
            FsType::Xfs => "xfs".into(),
            FsType::Btrfs => "btrfs".into(),
            FsType::Ocfs2 => "ocfs2".into(),
            FsType::Ext4 => "ext4".into(),
            FsType::Nfs => "nfs".into(),
            FsType::Tmpfs => "tmpfs".into(),
            FsType::Other(m) => format!("unknown (magic {m:#x})"),
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The filesystem type of an open file or directory.
pub fn fs_type(fd: impl AsFd) -> std::io::Result<FsType> {
    let st = rustix::fs::fstatfs(fd)?;
    // f_type is a signed word on some targets; the magic is its bit pattern.
    #[allow(clippy::unnecessary_cast)]
    Ok(FsType::from_magic(st.f_type as u64 & 0xffff_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers_map_to_names() {
        assert_eq!(FsType::from_magic(0x5846_5342), FsType::Xfs);
        assert_eq!(FsType::from_magic(0x9123_683e), FsType::Btrfs);
        assert_eq!(FsType::from_magic(0x7461_636f).name(), "ocfs2");
        assert_eq!(FsType::from_magic(1).name(), "unknown (magic 0x1)");
    }

    #[test]
    fn fs_type_of_proc_is_other() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(fs_type(&f).unwrap(), FsType::Other(0x9fa0)));
    }
}
