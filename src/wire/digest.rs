//! The whole-disk digest of the checksums endpoint
//! (`GET .../checksums?algorithm=blake3|sha256`, `docs/checksums.md`): a
//! strong digest per block and one digest over them, so a replica can be
//! proven identical to the snapshot end to end, not only CRC-checked.
//!
//! The construction, exactly (another tool recomputes it from this):
//!
//! - The disk of `size` bytes is cut into blocks of `block_size` bytes
//!   (a power of two); block `i` covers `[i*block_size,
//!   min((i+1)*block_size, size))` (the last may be shorter).
//! - `block_digest[i] = H(bytes of block i)`, `H` being BLAKE3 (32-byte
//!   output, unkeyed) or SHA-256.
//! - `disk_digest = H("COE-DISK-DIGEST\0" || u64le(size) ||
//!   u64le(block_size) || block_digest[0] || ... || block_digest[n-1])`,
//!   the 16-byte ASCII prefix including its NUL, the digests raw (32 bytes
//!   each).
//! - Both are sent as lowercase hex.
//!
//! Blocks the extent map says are holes are the digest of zeros of their
//! length, computed once without reading the disk (both sides).
//!
//! Pure computation; the server hashes on the blocking pool.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Prefix of the whole-disk digest's input.
pub const DISK_DIGEST_PREFIX: &[u8; 16] = b"COE-DISK-DIGEST\0";

/// A strong digest algorithm of the checksums endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Blake3,
    Sha256,
}

impl Algorithm {
    /// The query parameter's value and the answer's `algorithm`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Blake3 => "blake3",
            Algorithm::Sha256 => "sha256",
        }
    }

    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "blake3" => Some(Algorithm::Blake3),
            "sha256" => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Blake3 => Hasher::Blake3(Box::default()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    /// The digest of `len` zero bytes (a hole block), without a buffer of
    /// `len` bytes.
    pub fn zeros(self, len: u64) -> [u8; 32] {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut h = self.hasher();
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            h.update(&ZEROS[..n]);
            left -= n as u64;
        }
        h.finalize()
    }

    /// The whole-disk digest over the block digests (module doc).
    pub fn disk_digest(self, size: u64, block_size: u64, blocks: &[[u8; 32]]) -> [u8; 32] {
        let mut h = self.hasher();
        h.update(DISK_DIGEST_PREFIX);
        h.update(&size.to_le_bytes());
        h.update(&block_size.to_le_bytes());
        for b in blocks {
            h.update(b);
        }
        h.finalize()
    }
}

/// An incremental hash of either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Blake3(Box<blake3::Hasher>),
    Sha256(sha2::Sha256),
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
            Hasher::Sha256(h) => h.finalize().into(),
        }
    }
}

/// Lowercase hex of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A digest from its hex form.
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The checksums answer with `algorithm=blake3|sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestAnswer {
    pub size: u64,
    pub block_size: u64,
    /// `blake3` or `sha256`.
    pub algorithm: String,
    /// Hex digest per block, in order.
    pub blocks: Vec<String>,
    /// Hex digest over the block digests (module doc).
    pub digest: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        // Standard test vectors: "abc".
        let mut h = Algorithm::Sha256.hasher();
        h.update(b"abc");
        assert_eq!(
            hex(&h.finalize()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Algorithm::Blake3.hasher();
        h.update(b"abc");
        assert_eq!(
            hex(&h.finalize()),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn zeros_and_disk_digest_follow_the_construction() {
        for a in [Algorithm::Blake3, Algorithm::Sha256] {
            for len in [0u64, 1, 65_536, 65_537, 200_000] {
                let mut h = a.hasher();
                h.update(&vec![0u8; len as usize]);
                assert_eq!(a.zeros(len), h.finalize(), "{a:?} {len}");
            }
            let blocks = [a.zeros(4), a.zeros(2)];
            let mut input = b"COE-DISK-DIGEST\0".to_vec();
            input.extend_from_slice(&6u64.to_le_bytes());
            input.extend_from_slice(&4u64.to_le_bytes());
            input.extend_from_slice(&blocks[0]);
            input.extend_from_slice(&blocks[1]);
            let mut h = a.hasher();
            h.update(&input);
            assert_eq!(a.disk_digest(6, 4, &blocks), h.finalize());
            let d = a.zeros(3);
            assert_eq!(from_hex(&hex(&d)), Some(d));
        }
        assert_eq!(from_hex("zz"), None);
    }
}
