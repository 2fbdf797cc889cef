//! `--verify`: compares a replica with the snapshot block by block, by the
//! CRC-32s of the server's checksums endpoint (ENDPOINTS.md:
//! `GET .../disks/{disk}/checksums?blockSize=N`).
//!
//! The server computes hole blocks without reading them; so does this side:
//! blocks with no data (`SEEK_DATA`) take the CRC of zeros, computed once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{ClientError, Result};
use super::http::{check, paths, read_json, Api};

/// Block size asked for: the endpoint's default (4 MiB), a good balance of
/// answer size (4 bytes per 4 MiB) and precision of the mismatch report.
pub const DEFAULT_BLOCK: u64 = 4 << 20;
/// Smallest and largest block sizes the endpoint accepts (ENDPOINTS.md).
const MIN_BLOCK: u64 = 64 << 10;
const MAX_BLOCK: u64 = 64 << 20;
/// Mismatched blocks listed in a report before it just counts them.
const MAX_LISTED: usize = 20;

#[derive(Deserialize)]
struct Checksums {
    size: u64,
    block_size: u64,
    algorithm: String,
    crc32: Vec<u32>,
}

/// What a verification found for one disk.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyOutcome {
    pub disk: String,
    pub size: u64,
    pub local_size: u64,
    pub block_size: u64,
    pub blocks: u64,
    /// Indexes of blocks that differ (block i covers
    /// `[i*block_size, (i+1)*block_size)`).
    pub mismatched: Vec<u64>,
}

impl VerifyOutcome {
    pub fn ok(&self) -> bool {
        self.size == self.local_size && self.mismatched.is_empty()
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        if self.ok() {
            return format!("{}: {} blocks match", self.disk, self.blocks);
        }
        let mut s = format!("{}:", self.disk);
        if self.size != self.local_size {
            s += &format!(
                " size {} locally, {} on the server;",
                self.local_size, self.size
            );
        }
        if !self.mismatched.is_empty() {
            let listed: Vec<String> = self
                .mismatched
                .iter()
                .take(MAX_LISTED)
                .map(|b| format!("{}", b * self.block_size))
                .collect();
            s += &format!(
                " {} of {} blocks of {} bytes differ (at offsets {}{})",
                self.mismatched.len(),
                self.blocks,
                self.block_size,
                listed.join(", "),
                if self.mismatched.len() > MAX_LISTED {
                    ", ..."
                } else {
                    ""
                }
            );
        }
        s
    }
}

/// Checks the replica at `path` against the snapshot's disk.
pub fn verify_disk(
    api: &Api,
    vm: &str,
    snap: &str,
    disk: &str,
    path: &Path,
    block_size: u64,
) -> Result<VerifyOutcome> {
    let what = format!("checksums of disk {disk}");
    let url = format!(
        "{}/checksums?blockSize={block_size}",
        paths::disk(vm, snap, disk)
    );
    let resp = api.get(&what, &url)?;
    if resp.status().as_u16() == 404 {
        let err = check(&what, resp).err();
        // A 404 is a missing endpoint only if the disk is still there: a
        // snapshot deleted meanwhile is "not found" (exit 4).
        api.still_there(vm, snap, disk)?;
        let details = match err {
            Some(ClientError::Http { details, .. }) => details,
            _ => String::new(),
        };
        return Err(ClientError::ChecksumsUnavailable {
            disk: disk.to_owned(),
            details: format!("404: {details}"),
        });
    }
    let sums: Checksums = read_json(&what, check(&what, resp)?)?;
    let bad = |problem: String| ClientError::Protocol {
        what: what.clone(),
        problem,
    };
    if sums.algorithm != "crc32" {
        return Err(bad(format!(
            "algorithm {:?}, expected crc32",
            sums.algorithm
        )));
    }
    let bs = sums.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) {
        return Err(bad(format!("block size {bs} out of range")));
    }
    let blocks = sums.size.div_ceil(bs);
    if sums.crc32.len() as u64 != blocks {
        return Err(bad(format!(
            "{} checksums for {} blocks",
            sums.crc32.len(),
            blocks
        )));
    }
    let (local_size, mismatched) = compare_blocks(path, sums.size, bs, &sums.crc32)?;
    Ok(VerifyOutcome {
        disk: disk.to_owned(),
        size: sums.size,
        local_size,
        block_size: bs,
        blocks,
        mismatched,
    })
}

/// Compares the file at `path` block by block with `crcs` (block i covers
/// `[i*bs, min((i+1)*bs, size))`); its size and the indexes of the blocks
/// that differ. Holes are not read: their CRC is that of zeros.
pub fn compare_blocks(path: &Path, size: u64, bs: u64, crcs: &[u32]) -> Result<(u64, Vec<u64>)> {
    let file = File::open(path).map_err(|source| ClientError::Local {
        what: "cannot open the replica",
        path: path.to_owned(),
        source,
    })?;
    let local_size = file
        .metadata()
        .map_err(|source| ClientError::Local {
            what: "cannot stat the replica",
            path: path.to_owned(),
            source,
        })?
        .len();
    let mut mismatched = Vec::new();
    let mut buf = vec![0u8; bs as usize];
    let mut zero_crc: Option<u32> = None;
    // Next offset holding data; u64::MAX when none is left.
    let mut next_data = 0u64;
    for (i, &want) in crcs.iter().enumerate() {
        let start = i as u64 * bs;
        let end = (start + bs).min(size);
        let len = (end - start) as usize;
        if next_data < end {
            next_data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(start)) {
                Ok(p) => p,
                // ENXIO: no data at or past `start`.
                Err(rustix::io::Errno::NXIO) => u64::MAX,
                Err(e) => {
                    return Err(ClientError::Local {
                        what: "cannot seek in the replica",
                        path: path.to_owned(),
                        source: e.into(),
                    })
                }
            };
        }
        let got = if next_data >= end && end <= local_size {
            // A hole: zeros, without reading them.
            if len as u64 == bs {
                *zero_crc.get_or_insert_with(|| crc32fast::hash(&vec![0u8; bs as usize]))
            } else {
                crc32fast::hash(&vec![0u8; len])
            }
        } else {
            match file.read_exact_at(&mut buf[..len], start) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // Past the local end: a short replica differs here.
                    mismatched.push(i as u64);
                    continue;
                }
                Err(source) => {
                    return Err(ClientError::Local {
                        what: "cannot read the replica",
                        path: path.to_owned(),
                        source,
                    })
                }
            }
            crc32fast::hash(&buf[..len])
        };
        if got != want {
            mismatched.push(i as u64);
        }
    }
    Ok((local_size, mismatched))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn blocks_are_compared_with_holes_unread_and_differences_found() {
        let bs = MIN_BLOCK;
        let path = std::env::temp_dir().join(format!("coe-verify-{}", std::process::id()));
        // 5.5 blocks: data in block 1, a hole in 0, 2, 3, data at the end.
        let size = 5 * bs + bs / 2;
        let mut disk = vec![0u8; size as usize];
        for (i, b) in disk[bs as usize..2 * bs as usize].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let tail = size as usize - 1000;
        disk[tail..].fill(7);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&disk[bs as usize..2 * bs as usize], bs)
            .unwrap();
        f.write_all_at(&disk[tail..], tail as u64).unwrap();
        drop(f);
        let crcs: Vec<u32> = disk.chunks(bs as usize).map(crc32fast::hash).collect();
        assert_eq!(crcs.len(), 6);
        assert_eq!(
            compare_blocks(&path, size, bs, &crcs).unwrap(),
            (size, vec![])
        );
        // One byte written into a hole, one flipped in the data.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1], 3 * bs + 17).unwrap();
        f.write_all_at(&[0], bs + 5).unwrap();
        drop(f);
        assert_eq!(
            compare_blocks(&path, size, bs, &crcs).unwrap().1,
            vec![1, 3]
        );
        // A replica cut short differs in the blocks it lacks.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4 * bs)
            .unwrap();
        let (local, bad) = compare_blocks(&path, size, bs, &crcs).unwrap();
        assert_eq!(local, 4 * bs);
        assert!(bad.contains(&4) && bad.contains(&5), "{bad:?}");
        std::fs::remove_file(&path).unwrap();
    }
}
