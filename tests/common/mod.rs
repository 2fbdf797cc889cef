//! Shared test helpers: the reflink filesystems of the run, scratch folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A reflink-capable filesystem the test script mounted for this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Xfs,
    Btrfs,
}

impl Fs {
    pub const ALL: [Fs; 2] = [Fs::Xfs, Fs::Btrfs];

    pub fn var(self) -> &'static str {
        match self {
            Fs::Xfs => "COE_TEST_XFS",
            Fs::Btrfs => "COE_TEST_BTRFS",
        }
    }

    /// The root folder of this filesystem for the run. Panics with
    /// instructions when the script did not provide it.
    pub fn root(self) -> PathBuf {
        match std::env::var_os(self.var()) {
            Some(p) if Path::new(&p).is_dir() => PathBuf::from(p),
            _ => panic!(
                "{} is not set to a mounted {:?} folder: this test needs a real reflink \
                 filesystem. Run the suite as root with `./scripts/test.sh`, which makes and \
                 mounts loop images and sets it.",
                self.var(),
                self
            ),
        }
    }

    /// A fresh, empty folder on this filesystem, removed on drop.
    pub fn scratch(self, tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = self.root().join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
}

pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
