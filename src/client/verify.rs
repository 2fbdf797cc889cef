//! `--verify`: compares a replica with the snapshot block by block, by the
//! CRC-32s of the server's checksums endpoint (`docs/checksums.md`:
//! `GET .../disks/{disk}/checksums?blockSize=N`).
//!
//! The server computes hole blocks without reading them; so does this side:
//! blocks with no data (`SEEK_DATA`) take the CRC of zeros, computed once.
//!
//! `--verify-with blake3|sha256` asks the endpoint's strong digests instead
//! (`crate::wire::digest`): per-block digests locate differences, and the
//! whole-disk digest, recomputed here over the replica, proves it equal.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{ClientError, Result};
use super::http::{check, paths, read_json, Api};
use crate::wire::digest::{self, Algorithm, DigestAnswer};

/// What `--verify` compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyWith {
    /// CRC-32 per block (any server with the checksums endpoint).
    #[default]
    Crc32,
    /// BLAKE3 per block and over the whole disk.
    Blake3,
    /// SHA-256 per block and over the whole disk.
    Sha256,
}

/// Block size asked for: the endpoint's default (4 MiB), a good balance of
/// answer size (4 bytes per 4 MiB) and precision of the mismatch report.
pub const DEFAULT_BLOCK: u64 = 4 << 20;
/// Smallest and largest block sizes the endpoint accepts (`docs/checksums.md`).
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
    /// With a strong digest: `algorithm:hex` of the whole disk, as the
    /// server sent it and this side recomputed it over the replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// With a strong digest: whether the replica's whole-disk digest
    /// equals the server's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_match: Option<bool>,
}

impl VerifyOutcome {
    pub fn ok(&self) -> bool {
        self.size == self.local_size
            && self.mismatched.is_empty()
            && self.digest_match != Some(false)
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        if self.ok() {
            return match &self.digest {
                Some(d) => format!(
                    "{}: {} blocks and the disk digest {d} match",
                    self.disk, self.blocks
                ),
                None => format!("{}: {} blocks match", self.disk, self.blocks),
            };
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

/// Checks the replica at `path` against the snapshot's disk by CRC-32s.
pub fn verify_disk(
    api: &Api,
    vm: &str,
    snap: &str,
    disk: &str,
    path: &Path,
    block_size: u64,
) -> Result<VerifyOutcome> {
    verify_disk_with(api, vm, snap, disk, path, block_size, VerifyWith::Crc32)
}

/// Checks the replica at `path` against the snapshot's disk, comparing
/// what `with` says.
pub fn verify_disk_with(
    api: &Api,
    vm: &str,
    snap: &str,
    disk: &str,
    path: &Path,
    block_size: u64,
    with: VerifyWith,
) -> Result<VerifyOutcome> {
    let what = format!("checksums of disk {disk}");
    let alg = match with {
        VerifyWith::Crc32 => None,
        VerifyWith::Blake3 => Some(Algorithm::Blake3),
        VerifyWith::Sha256 => Some(Algorithm::Sha256),
    };
    let url = format!(
        "{}/checksums?blockSize={block_size}{}",
        paths::disk(vm, snap, disk),
        alg.map(|a| format!("&algorithm={}", a.name()))
            .unwrap_or_default()
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
    let resp = check(&what, resp)?;
    if let Some(alg) = alg {
        let sums: DigestAnswer = read_json(&what, resp)?;
        return verify_digests(disk, path, alg, sums, &what);
    }
    let sums: Checksums = read_json(&what, resp)?;
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
        digest: None,
        digest_match: None,
    })
}

/// The strong-digest comparison: the answer checked for consistency (its
/// disk digest over its block digests), the replica's blocks hashed (holes
/// not read) and its disk digest recomputed.
fn verify_digests(
    disk: &str,
    path: &Path,
    alg: Algorithm,
    sums: DigestAnswer,
    what: &str,
) -> Result<VerifyOutcome> {
    let bad = |problem: String| ClientError::Protocol {
        what: what.to_owned(),
        problem,
    };
    if sums.algorithm != alg.name() {
        return Err(bad(format!(
            "algorithm {:?}, expected {}",
            sums.algorithm,
            alg.name()
        )));
    }
    let bs = sums.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) {
        return Err(bad(format!("block size {bs} out of range")));
    }
    let blocks = sums.size.div_ceil(bs);
    let want: Vec<[u8; 32]> = sums
        .blocks
        .iter()
        .map(|h| digest::from_hex(h))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a block digest is not 64 hex digits".to_owned()))?;
    if want.len() as u64 != blocks {
        return Err(bad(format!("{} digests for {blocks} blocks", want.len())));
    }
    let server = digest::from_hex(&sums.digest)
        .ok_or_else(|| bad("the disk digest is not 64 hex digits".to_owned()))?;
    if alg.disk_digest(sums.size, bs, &want) != server {
        return Err(bad(
            "the disk digest is not the digest of the block digests".to_owned(),
        ));
    }
    let zero_full = alg.zeros(bs);
    let (local_size, mismatched, local) = compare_with(
        path,
        sums.size,
        bs,
        &want,
        |b| {
            let mut h = alg.hasher();
            h.update(b);
            h.finalize()
        },
        |len| if len == bs { zero_full } else { alg.zeros(len) },
    )?;
    let local_digest = alg.disk_digest(local_size, bs, &local);
    Ok(VerifyOutcome {
        disk: disk.to_owned(),
        size: sums.size,
        local_size,
        block_size: bs,
        blocks,
        mismatched,
        digest: Some(format!("{}:{}", alg.name(), sums.digest)),
        digest_match: Some(local_digest == server),
    })
}

/// Compares the file at `path` block by block with `crcs` (block i covers
/// `[i*bs, min((i+1)*bs, size))`); its size and the indexes of the blocks
/// that differ. Holes are not read: their CRC is that of zeros.
pub fn compare_blocks(path: &Path, size: u64, bs: u64, crcs: &[u32]) -> Result<(u64, Vec<u64>)> {
    let mut zero_crc: Option<u32> = None;
    let (local_size, mismatched, _) = compare_with(path, size, bs, crcs, crc32fast::hash, |len| {
        if len == bs {
            *zero_crc.get_or_insert_with(|| crc32fast::hash(&vec![0u8; bs as usize]))
        } else {
            crc32fast::hash(&vec![0u8; len as usize])
        }
    })?;
    Ok((local_size, mismatched))
}

/// [`compare_blocks`] for any per-block digest: `hash` of a block's bytes,
/// `zeros` of a hole block's length (never read). Also the replica's
/// digest per block (the server's where a block could not be read: it is
/// listed as different anyway).
fn compare_with<D: Copy + PartialEq>(
    path: &Path,
    size: u64,
    bs: u64,
    want: &[D],
    hash: impl Fn(&[u8]) -> D,
    mut zeros: impl FnMut(u64) -> D,
) -> Result<(u64, Vec<u64>, Vec<D>)> {
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
    let mut local = Vec::with_capacity(want.len());
    let mut buf = vec![0u8; bs as usize];
    // Next offset holding data; u64::MAX when none is left.
    let mut next_data = 0u64;
    for (i, &want) in want.iter().enumerate() {
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
            zeros(len as u64)
        } else {
            match file.read_exact_at(&mut buf[..len], start) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // Past the local end: a short replica differs here.
                    mismatched.push(i as u64);
                    local.push(want);
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
            hash(&buf[..len])
        };
        if got != want {
            mismatched.push(i as u64);
        }
        local.push(got);
    }
    Ok((local_size, mismatched, local))
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
