//! The local replica of a disk and its resume state file.
//!
//! A replica is a sparse file named by the disk's name in the output
//! folder. Bytes are written at their offsets (`pwrite`, from any number of
//! threads); blocks of zeros are not written but left as holes (fresh
//! files) or punched (files being updated), so a copy stays as sparse as the
//! snapshot. Beside it, `.<disk>.coe-download.json` records which snapshot
//! the file is (becoming) a copy of, from which base, and the byte ranges
//! already completed, so an interrupted download resumes where it stopped
//! and an incremental is never applied onto a replica of another snapshot.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;
use serde::{Deserialize, Serialize};

use super::error::{ClientError, Result};
use super::ranges::RangeSet;

/// Granularity of hole detection in written data: the block size of XFS,
/// btrfs and ext4 on x86_64 (and the page size), so a skipped or punched
/// block is a whole filesystem block.
pub const ZERO_BLOCK: u64 = 4096;
/// Buffer for writing zeros where punching holes is not supported.
const ZERO_WRITE_BUF: usize = 1 << 20;
/// A replica holds a VM's disk: readable by its owner only (the umask can
/// only narrow this).
pub const REPLICA_MODE: u32 = 0o600;
/// Format version of the state file.
const STATE_VERSION: u32 = 1;
/// Suffix of the state file beside a replica.
const STATE_SUFFIX: &str = ".coe-download.json";

/// What to do with all-zero blocks in written data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroBlocks {
    /// The region is known to be a hole already (a fresh file): skip.
    Skip,
    /// The region may hold old data: punch a hole.
    Punch,
}

/// A disk name the server sent, checked before it becomes a file name in
/// the output folder: one plain path component, not hidden (state files
/// start with a dot).
pub fn check_disk_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255;
    if ok {
        Ok(())
    } else {
        Err(ClientError::Protocol {
            what: "snapshot".to_owned(),
            problem: format!("disk name {name:?} is not a plain file name"),
        })
    }
}

/// The resume state of one replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadState {
    pub version: u32,
    pub vm: String,
    /// The snapshot the replica is, or is becoming, a copy of.
    pub snapshot: String,
    /// For an incremental: the snapshot the replica was a copy of before.
    pub base: Option<String>,
    pub disk: String,
    /// The disk's size in `snapshot`.
    pub size: u64,
    /// The replica is a complete copy of `snapshot`.
    pub complete: bool,
    /// Ranges already equal to `snapshot` (while not complete).
    pub done: RangeSet,
}

impl DownloadState {
    pub fn new(vm: &str, snapshot: &str, base: Option<&str>, disk: &str, size: u64) -> Self {
        DownloadState {
            version: STATE_VERSION,
            vm: vm.to_owned(),
            snapshot: snapshot.to_owned(),
            base: base.map(str::to_owned),
            disk: disk.to_owned(),
            size,
            complete: false,
            done: RangeSet::new(),
        }
    }

    pub fn path(out: &Path, disk: &str) -> PathBuf {
        out.join(format!(".{disk}{STATE_SUFFIX}"))
    }

    /// The state beside a replica; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<DownloadState>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ClientError::Local {
                    what: "cannot read the download state",
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let s: DownloadState = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::ReplicaConflict(format!(
                "download state {} is unreadable ({e}): the replica beside it is in an unknown \
                 state; remove both and download again",
                path.display()
            ))
        })?;
        if s.version != STATE_VERSION {
            return Err(ClientError::ReplicaConflict(format!(
                "download state {} has version {}; this client writes {STATE_VERSION}",
                path.display(),
                s.version
            )));
        }
        Ok(Some(s))
    }

    /// Replaces the state file atomically (write, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |source| ClientError::Local {
            what: "cannot write the download state",
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).map_err(|source| ClientError::Json {
            what: "download state".to_owned(),
            source,
        })?;
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            // The rename is durable once the folder is synced.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// A replica file open for writing.
pub struct Replica {
    file: File,
    path: PathBuf,
    zeros: ZeroBlocks,
}

impl Replica {
    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
        move |source| ClientError::Local {
            what,
            path: self.path.clone(),
            source,
        }
    }

    /// A new, empty file of `size` bytes (all hole), replacing any.
    pub fn create(path: &Path, size: u64) -> Result<Replica> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(REPLICA_MODE)
            .open(path)
            .map_err(|source| ClientError::Local {
                what: "cannot create the replica",
                path: path.to_owned(),
                source,
            })?;
        let r = Replica {
            file,
            path: path.to_owned(),
            zeros: ZeroBlocks::Skip,
        };
        r.set_len(size)?;
        Ok(r)
    }

    /// An existing replica, to update or to finish.
    pub fn open(path: &Path, zeros: ZeroBlocks) -> Result<Replica> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ClientError::Local {
                what: "cannot open the replica",
                path: path.to_owned(),
                source,
            })?;
        Ok(Replica {
            file,
            path: path.to_owned(),
            zeros,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cuts or extends (with a hole) to `size`.
    pub fn set_len(&self, size: u64) -> Result<()> {
        self.file.set_len(size).map_err(self.err("cannot resize"))
    }

    /// Writes `buf` at `offset`, leaving or punching holes for whole
    /// all-zero blocks.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        // Runs of (is_zero, start, end), merged, then applied.
        let mut run: Option<(bool, u64, u64)> = None;
        while pos < end {
            let block_end = ((pos / ZERO_BLOCK + 1) * ZERO_BLOCK).min(end);
            let slice = &buf[(pos - offset) as usize..(block_end - offset) as usize];
            let whole = pos % ZERO_BLOCK == 0 && block_end - pos == ZERO_BLOCK;
            let zero = whole && slice.iter().all(|&b| b == 0);
            run = match run {
                Some((z, s, _)) if z == zero => Some((z, s, block_end)),
                Some(r) => {
                    self.apply(offset, buf, r)?;
                    Some((zero, pos, block_end))
                }
                None => Some((zero, pos, block_end)),
            };
            pos = block_end;
        }
        if let Some(r) = run {
            self.apply(offset, buf, r)?;
        }
        Ok(())
    }

    fn apply(&self, offset: u64, buf: &[u8], (zero, s, e): (bool, u64, u64)) -> Result<()> {
        if !zero {
            let slice = &buf[(s - offset) as usize..(e - offset) as usize];
            return self
                .file
                .write_all_at(slice, s)
                .map_err(self.err("cannot write"));
        }
        match self.zeros {
            ZeroBlocks::Skip => Ok(()),
            ZeroBlocks::Punch => self.zero(s, e - s),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros: a punched hole, or
    /// written zeros where the filesystem cannot punch.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(self.err("cannot punch a hole in")(e.into())),
        }
        let zeros = vec![0u8; ZERO_WRITE_BUF.min(len as usize)];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], pos)
                .map_err(self.err("cannot write zeros to"))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Data to stable storage (before the state says it is done).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(self.err("cannot sync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("coe-replica-{}-{name}", std::process::id()))
    }

    #[test]
    fn disk_names_must_be_plain_file_names() {
        assert!(check_disk_name("0004fb0000120000763ac50c4e345d0a.img").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a\0b"] {
            assert!(check_disk_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_disk_name(&"x".repeat(256)).is_err());
    }

    /// The byte ranges the filesystem holds data for (SEEK_DATA/SEEK_HOLE).
    fn data_ranges(p: &Path) -> Vec<(u64, u64)> {
        let f = std::fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        let (mut out, mut pos) = (Vec::new(), 0);
        while pos < len {
            let start = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
                Ok(s) => s,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => panic!("SEEK_DATA: {e}"),
            };
            let end = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(start)).unwrap();
            out.push((start, end));
            pos = end;
        }
        out
    }

    #[test]
    fn writes_land_at_offsets_and_zero_blocks_stay_zero() {
        let p = tmp("w");
        let r = Replica::create(&p, 64 * 1024).unwrap();
        let mut buf = vec![0u8; 3 * ZERO_BLOCK as usize + 100];
        buf[5] = 1;
        let last = buf.len() - 1;
        buf[last] = 2;
        r.write_at(1000, &buf).unwrap();
        let back = std::fs::read(&p).unwrap();
        assert_eq!(back.len(), 64 * 1024);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "replica mode {mode:o}");
        let mut expect = vec![0u8; 64 * 1024];
        expect[1000..1000 + buf.len()].copy_from_slice(&buf);
        assert_eq!(back, expect);
        // The two whole zero blocks (4096..12288) were not written: holes.
        assert_eq!(data_ranges(&p), [(0, 4096), (12288, 16384)]);
        // Punch mode clears old data in zero blocks.
        let r = Replica::open(&p, ZeroBlocks::Punch).unwrap();
        r.write_at(0, &vec![7u8; 16 * 1024]).unwrap();
        r.write_at(4096, &vec![0u8; 8192]).unwrap();
        let back = std::fs::read(&p).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 7));
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[12288..16384].iter().all(|&b| b == 7));
        assert_eq!(data_ranges(&p), [(0, 4096), (12288, 16384)], "not punched");
        r.zero(100, 50).unwrap();
        let back = std::fs::read(&p).unwrap();
        assert!(back[100..150].iter().all(|&b| b == 0));
        assert_eq!(back[99], 7);
        assert_eq!(back[150], 7);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn state_round_trips_and_refuses_garbage() {
        let p = tmp("state.json");
        let mut s = DownloadState::new("vm", "s2", Some("s1"), "d.img", 1 << 30);
        s.done.insert(0, 4096);
        s.done.insert(1 << 20, 2 << 20);
        s.save(&p).unwrap();
        assert_eq!(DownloadState::load(&p).unwrap(), Some(s));
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            DownloadState::load(&p),
            Err(ClientError::ReplicaConflict(_))
        ));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(DownloadState::load(&p).unwrap(), None);
    }
}
