//! A read-only reader for Berkeley DB **hash** database files.
//!
//! ovs-agent keeps its state in Berkeley DB hash files (`repository`,
//! `server`). This module owns reading them from bytes: the meta page, the
//! bucket chains of hash pages, key/data pairs on them (on-page items,
//! on-page duplicate sets and items moved to overflow pages). It reads hash
//! format versions 8 (Berkeley DB 4.3 to 4.5, unsorted pages) and 9 (4.6 to
//! 5.3, sorted pages), little endian, without encryption or checksums.
//!
//! It must not write, lock or recover anything: it is a pure function of the
//! file's bytes, which are untrusted. Every offset is checked, every page is
//! visited at most once per walk (so a looping chain is an error, not a
//! hang), and nothing is allocated beyond what the file's own size allows.
//!
//! The layout follows Berkeley DB's public `dbinc/db_page.h` (structures
//! `DBMETA`, `HMETA`, `PAGE`, `HOFFPAGE`) and `hash/hash_func.c`; it was
//! checked byte by byte against files written by `db5.3_load -t hash`.

use std::ops::ControlFlow;

/// `DB_HASHMAGIC` (db.h): the meta page magic of a hash database.
pub const DB_HASHMAGIC: u32 = 0x0006_1561;
/// `DB_BTREEMAGIC` (db.h), recognised only to say what the file is.
const DB_BTREEMAGIC: u32 = 0x0005_3162;
/// `DB_QAMMAGIC` (db.h).
const DB_QAMMAGIC: u32 = 0x0004_2253;
/// `DB_HEAPMAGIC` (db.h, 5.2 and later).
const DB_HEAPMAGIC: u32 = 0x0007_4582;

/// Hash format versions read here: 8 (`DB_HASHOLDVER` era, 4.3-4.5,
/// `P_HASH_UNSORTED` pages) and 9 (`DB_HASHVERSION` of 4.6-5.3, `P_HASH`).
pub const SUPPORTED_VERSIONS: [u32; 2] = [8, 9];

// --- DBMETA, the generic meta page header (db_page.h), byte offsets ---
/// `DBMETA.pgno`: page number of the meta page itself (0).
const META_PGNO: usize = 8;
/// `DBMETA.magic`.
const META_MAGIC: usize = 12;
/// `DBMETA.version`.
const META_VERSION: usize = 16;
/// `DBMETA.pagesize`.
const META_PAGESIZE: usize = 20;
/// `DBMETA.encrypt_alg` (u8): non-zero when the file is encrypted.
const META_ENCRYPT_ALG: usize = 24;
/// `DBMETA.type` (u8): `P_HASHMETA` for a hash database.
const META_TYPE: usize = 25;
/// `DBMETA.metaflags` (u8).
const META_METAFLAGS: usize = 26;
/// `DBMETA.last_pgno`: the last page of the file.
const META_LAST_PGNO: usize = 32;

// --- HMETA, the hash meta page (db_page.h), after the 72-byte DBMETA ---
/// `HMETA.max_bucket`: highest bucket in use.
const HMETA_MAX_BUCKET: usize = 72;
/// `HMETA.high_mask`: mask of the hash into the whole table.
const HMETA_HIGH_MASK: usize = 76;
/// `HMETA.low_mask`: mask into the lower half of the table.
const HMETA_LOW_MASK: usize = 80;
/// `HMETA.nelem`: number of keys (a hint; not trusted).
const HMETA_NELEM: usize = 88;
/// `HMETA.h_charkey`: hash of `CHARKEY`, to tell which hash function wrote
/// the file.
const HMETA_H_CHARKEY: usize = 92;
/// `HMETA.spares[NCACHED]`: first page of each doubling of the table.
const HMETA_SPARES: usize = 96;
/// `NCACHED` (hash.h): the number of spares.
const NCACHED: usize = 32;
/// `HMETA.crypto_magic`: non-zero when the file is encrypted.
const HMETA_CRYPTO_MAGIC: usize = 460;
/// `HMETA`'s size on disk: the meta page must hold at least this much.
const HMETA_LEN: usize = 512;

/// `DBMETA_CHKSUM` (db_page.h `metaflags`): pages carry checksums, which
/// moves every item; not written by ovs-agent and not read here.
const DBMETA_CHKSUM: u8 = 0x01;

// --- PAGE, the header of every other page (db_page.h) ---
/// `PAGE.pgno`.
const PG_PGNO: usize = 8;
/// `PAGE.next_pgno`: the next page of a bucket chain or overflow chain.
const PG_NEXT: usize = 16;
/// `PAGE.entries`: number of items on the page.
const PG_ENTRIES: usize = 20;
/// `PAGE.hf_offset`: on overflow pages, the number of data bytes (`OV_LEN`).
const PG_HF_OFFSET: usize = 22;
/// `PAGE.type` (u8).
const PG_TYPE: usize = 25;
/// `SIZEOF_PAGE`: the header is 26 bytes; the item index (`inp[]`) or the
/// overflow data follows.
const PAGE_HEADER_LEN: usize = 26;

// --- page types (db_page.h) ---
/// `P_INVALID`: an all-zero page (an empty bucket never written).
const P_INVALID: u8 = 0;
/// `P_HASH_UNSORTED`: hash pages of format version 8.
const P_HASH_UNSORTED: u8 = 2;
/// `P_OVERFLOW`: a page of a big item.
const P_OVERFLOW: u8 = 7;
/// `P_HASHMETA`: the hash meta page.
const P_HASHMETA: u8 = 8;
/// `P_HASH`: sorted hash pages of format version 9.
const P_HASH: u8 = 13;

// --- hash item types, the first byte of every item (db_page.h) ---
/// `H_KEYDATA`: the bytes follow on the page.
const H_KEYDATA: u8 = 1;
/// `H_DUPLICATE`: a set of duplicate data items on the page.
const H_DUPLICATE: u8 = 2;
/// `H_OFFPAGE`: an `HOFFPAGE` pointing at an overflow chain.
const H_OFFPAGE: u8 = 3;
/// `H_OFFDUP`: duplicates moved to a btree (not read here).
const H_OFFDUP: u8 = 4;
/// `HOFFPAGE.pgno`: first overflow page (after type and 3 unused bytes).
const HOFFPAGE_PGNO: usize = 4;
/// `HOFFPAGE.tlen`: total length of the item.
const HOFFPAGE_TLEN: usize = 8;
/// `HOFFPAGE`'s size.
const HOFFPAGE_LEN: usize = 12;

/// `DB_MIN_PGSIZE` and `DB_MAX_PGSIZE` (db_int.h).
const MIN_PAGESIZE: u32 = 512;
const MAX_PAGESIZE: u32 = 65536;

/// `CHARKEY` (hash.h): the key whose hash is stored in `h_charkey`. Berkeley
/// DB hashes `sizeof(CHARKEY)` bytes, so the C string's NUL is included.
const CHARKEY: &[u8] = b"%$sniglet^&\0";
/// The FNV prime `__ham_func5` multiplies by (hash_func.c).
const FNV_PRIME: u32 = 16_777_619;

/// What can be wrong with a hash database file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdbError {
    #[error("the file is {len} bytes, too short for a Berkeley DB meta page")]
    TooShort { len: usize },
    #[error("bad magic {magic:#010x}: not a Berkeley DB file")]
    BadMagic { magic: u32 },
    #[error("big-endian Berkeley DB file: only little-endian files are read")]
    BigEndian,
    #[error("a Berkeley DB {kind} database, not a hash database")]
    NotHash { kind: &'static str },
    #[error("unsupported hash format version {version} (versions 8 and 9 are read)")]
    UnsupportedVersion { version: u32 },
    #[error("unsupported meta page type {page_type} (expected {P_HASHMETA}, hash meta)")]
    UnsupportedType { page_type: u8 },
    #[error("bad page size {pagesize} (a power of two from 512 to 65536)")]
    BadPageSize { pagesize: u32 },
    #[error("the file is encrypted: not supported")]
    Encrypted,
    #[error("the file has page checksums: not supported")]
    Checksummed,
    #[error("bad meta page: {what}")]
    BadMeta { what: String },
    #[error("page {pgno} is truncated: the file ends at byte {file_len}")]
    TruncatedPage { pgno: u32, file_len: usize },
    #[error("page number {pgno} is out of range (last page {last_pgno})")]
    PageOutOfRange { pgno: u32, last_pgno: u32 },
    #[error("page chain cycle: page {pgno} reached twice")]
    Cycle { pgno: u32 },
    #[error("page {pgno}: {what}")]
    BadPage { pgno: u32, what: String },
    #[error("page {pgno}, item {index}: {what}")]
    BadItem {
        pgno: u32,
        index: usize,
        what: String,
    },
    #[error("page {pgno}, item {index}: unsupported item type {item_type}")]
    UnsupportedItem {
        pgno: u32,
        index: usize,
        item_type: u8,
    },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    // Callers check lengths first; a short slice reads as zeros rather
    // than panicking.
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0)
}

/// `__ham_func5`: the FNV-1 style hash every Berkeley DB since 2.x uses by
/// default for hash databases (starting from 0, not the FNV offset basis).
pub fn default_hash(key: &[u8]) -> u32 {
    key.iter()
        .fold(0u32, |h, &b| h.wrapping_mul(FNV_PRIME) ^ u32::from(b))
}

/// `__db_log2`: the smallest `i` with `2^i >= n`.
fn db_log2(n: u32) -> u32 {
    let mut i = 0;
    let mut limit: u64 = 1;
    while limit < u64::from(n) {
        limit <<= 1;
        i += 1;
    }
    i
}

/// The fields of the hash meta page this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashMeta {
    pub version: u32,
    pub pagesize: u32,
    pub last_pgno: u32,
    pub max_bucket: u32,
    pub high_mask: u32,
    pub low_mask: u32,
    /// The key count hint of the meta page (not trusted).
    pub nelem: u32,
    pub h_charkey: u32,
    pub spares: [u32; NCACHED],
}

impl HashMeta {
    /// Whether the file was written with the default hash function, so a
    /// lookup can go straight to the key's bucket (otherwise it scans).
    pub fn default_hash_function(&self) -> bool {
        self.h_charkey == default_hash(CHARKEY)
    }

    /// `__ham_call_hash`'s bucket choice for a hash value.
    fn bucket_of(&self, hash: u32) -> u32 {
        let b = hash & self.high_mask;
        if b > self.max_bucket {
            b & self.low_mask
        } else {
            b
        }
    }

    /// `BS_TO_PAGE`: the first page of a bucket.
    fn bucket_page(&self, bucket: u32) -> Result<u32, BdbError> {
        let idx = db_log2(bucket.saturating_add(1)) as usize;
        let spare = *self.spares.get(idx).ok_or_else(|| BdbError::BadMeta {
            what: format!("bucket {bucket} has no spares entry"),
        })?;
        bucket.checked_add(spare).ok_or_else(|| BdbError::BadMeta {
            what: format!("bucket {bucket} maps past the largest page number"),
        })
    }
}

/// A key and its data, copied out of the file.
pub type Pair = (Vec<u8>, Vec<u8>);

/// A hash database over the bytes of its file.
#[derive(Debug, Clone)]
pub struct HashDb<'a> {
    data: &'a [u8],
    meta: HashMeta,
    /// Pages actually present in `data` (a partial last page is not one).
    pages_in_file: u32,
}

/// One item of a hash page.
enum Item<'a> {
    Inline(&'a [u8]),
    OffPage { pgno: u32, tlen: u32 },
    Duplicates(&'a [u8]),
}

/// Pages already walked: each page may be read once per walk.
struct Visited {
    bits: Vec<u64>,
}

impl Visited {
    fn new(pages: u32) -> Self {
        Visited {
            bits: vec![0; (pages as usize).div_ceil(64)],
        }
    }

    fn visit(&mut self, pgno: u32) -> Result<(), BdbError> {
        let (w, b) = ((pgno / 64) as usize, pgno % 64);
        // Callers only pass page numbers below pages_in_file.
        let word = self.bits.get_mut(w).ok_or(BdbError::Cycle { pgno })?;
        if *word & (1 << b) != 0 {
            return Err(BdbError::Cycle { pgno });
        }
        *word |= 1 << b;
        Ok(())
    }
}

impl<'a> HashDb<'a> {
    /// Checks the meta page. Pages are checked as they are read.
    pub fn open(data: &'a [u8]) -> Result<Self, BdbError> {
        if data.len() < HMETA_LEN {
            return Err(BdbError::TooShort { len: data.len() });
        }
        let magic = u32_at(data, META_MAGIC);
        match magic {
            DB_HASHMAGIC => {}
            DB_BTREEMAGIC => return Err(BdbError::NotHash { kind: "btree" }),
            DB_QAMMAGIC => return Err(BdbError::NotHash { kind: "queue" }),
            DB_HEAPMAGIC => return Err(BdbError::NotHash { kind: "heap" }),
            m if m.swap_bytes() == DB_HASHMAGIC => return Err(BdbError::BigEndian),
            m => return Err(BdbError::BadMagic { magic: m }),
        }
        let version = u32_at(data, META_VERSION);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(BdbError::UnsupportedVersion { version });
        }
        let page_type = data[META_TYPE];
        if page_type != P_HASHMETA {
            return Err(BdbError::UnsupportedType { page_type });
        }
        let pagesize = u32_at(data, META_PAGESIZE);
        if !(MIN_PAGESIZE..=MAX_PAGESIZE).contains(&pagesize) || !pagesize.is_power_of_two() {
            return Err(BdbError::BadPageSize { pagesize });
        }
        if data[META_ENCRYPT_ALG] != 0 || u32_at(data, HMETA_CRYPTO_MAGIC) != 0 {
            return Err(BdbError::Encrypted);
        }
        if data[META_METAFLAGS] & DBMETA_CHKSUM != 0 {
            return Err(BdbError::Checksummed);
        }
        if u32_at(data, META_PGNO) != 0 {
            return Err(BdbError::BadMeta {
                what: format!("meta page says it is page {}", u32_at(data, META_PGNO)),
            });
        }
        let mut spares = [0u32; NCACHED];
        for (i, s) in spares.iter_mut().enumerate() {
            *s = u32_at(data, HMETA_SPARES + 4 * i);
        }
        let meta = HashMeta {
            version,
            pagesize,
            last_pgno: u32_at(data, META_LAST_PGNO),
            max_bucket: u32_at(data, HMETA_MAX_BUCKET),
            high_mask: u32_at(data, HMETA_HIGH_MASK),
            low_mask: u32_at(data, HMETA_LOW_MASK),
            nelem: u32_at(data, HMETA_NELEM),
            h_charkey: u32_at(data, HMETA_H_CHARKEY),
            spares,
        };
        let pages_in_file = u32::try_from(data.len() / pagesize as usize).unwrap_or(u32::MAX);
        // Every bucket has its own first page after the meta page: more
        // buckets than pages can only be a damaged meta page.
        if u64::from(meta.max_bucket) + 1 > u64::from(meta.last_pgno) {
            return Err(BdbError::BadMeta {
                what: format!(
                    "max_bucket {} needs more pages than last_pgno {}",
                    meta.max_bucket, meta.last_pgno
                ),
            });
        }
        Ok(HashDb {
            data,
            meta,
            pages_in_file,
        })
    }

    pub fn meta(&self) -> &HashMeta {
        &self.meta
    }

    /// The bytes of page `pgno`, checked to be in range and in the file.
    fn page(&self, pgno: u32) -> Result<&'a [u8], BdbError> {
        if pgno == 0 || pgno > self.meta.last_pgno {
            return Err(BdbError::PageOutOfRange {
                pgno,
                last_pgno: self.meta.last_pgno,
            });
        }
        if pgno >= self.pages_in_file {
            return Err(BdbError::TruncatedPage {
                pgno,
                file_len: self.data.len(),
            });
        }
        let ps = self.meta.pagesize as usize;
        let start = pgno as usize * ps;
        Ok(&self.data[start..start + ps])
    }

    fn new_visited(&self) -> Visited {
        Visited::new(self.pages_in_file)
    }

    /// Calls `f` with every key/data pair, bucket by bucket. A duplicate set
    /// gives one call per data item. Stops early when `f` breaks.
    pub fn for_each<F>(&self, mut f: F) -> Result<(), BdbError>
    where
        F: FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    {
        let mut visited = self.new_visited();
        for bucket in 0..=self.meta.max_bucket {
            let first = self.meta.bucket_page(bucket)?;
            if self.walk_bucket(first, &mut visited, &mut f)?.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Every key/data pair, copied.
    pub fn pairs(&self) -> Result<Vec<Pair>, BdbError> {
        let mut out = Vec::new();
        self.for_each(|k, v| {
            out.push((k.to_vec(), v.to_vec()));
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// The data of `key` (the first one of a duplicate set), if present.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BdbError> {
        let mut found = None;
        let mut look = |k: &[u8], v: &[u8]| {
            if k == key {
                found = Some(v.to_vec());
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        if self.meta.default_hash_function() {
            let bucket = self.meta.bucket_of(default_hash(key));
            let first = self.meta.bucket_page(bucket)?;
            // Whether it stopped early does not matter: `found` says it.
            let _ = self.walk_bucket(first, &mut self.new_visited(), &mut look)?;
        } else {
            // Another hash function wrote the file: scan every bucket.
            self.for_each(look)?;
        }
        Ok(found)
    }

    fn walk_bucket<F>(
        &self,
        first: u32,
        visited: &mut Visited,
        f: &mut F,
    ) -> Result<ControlFlow<()>, BdbError>
    where
        F: FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    {
        let mut pgno = first;
        let mut head = true;
        loop {
            let page = self.page(pgno)?;
            visited.visit(pgno)?;
            let page_type = page[PG_TYPE];
            if head && page_type == P_INVALID && u16_at(page, PG_ENTRIES) == 0 {
                // A bucket page allocated but never written is empty.
                return Ok(ControlFlow::Continue(()));
            }
            head = false;
            if page_type != P_HASH && page_type != P_HASH_UNSORTED {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("type {page_type} where a hash page was expected"),
                });
            }
            if u32_at(page, PG_PGNO) != pgno {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("header says it is page {}", u32_at(page, PG_PGNO)),
                });
            }
            let entries = usize::from(u16_at(page, PG_ENTRIES));
            if entries % 2 != 0 {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("odd number of items ({entries}) on a hash page"),
                });
            }
            if PAGE_HEADER_LEN + 2 * entries > page.len() {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("{entries} items do not fit the page"),
                });
            }
            for pair in 0..entries / 2 {
                let key = self.item(page, pgno, 2 * pair)?;
                let data = self.item(page, pgno, 2 * pair + 1)?;
                if self.emit(pgno, 2 * pair, key, data, visited, f)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            match u32_at(page, PG_NEXT) {
                0 => return Ok(ControlFlow::Continue(())),
                next => pgno = next,
            }
        }
    }

    /// Item `index` of hash page `page` (`LEN_HITEM`: an item ends where the
    /// previous one starts, the first one at the end of the page).
    fn item(&self, page: &'a [u8], pgno: u32, index: usize) -> Result<Item<'a>, BdbError> {
        let entries = usize::from(u16_at(page, PG_ENTRIES));
        let bad = |what: String| BdbError::BadItem { pgno, index, what };
        let off = usize::from(u16_at(page, PAGE_HEADER_LEN + 2 * index));
        let end = if index == 0 {
            page.len()
        } else {
            usize::from(u16_at(page, PAGE_HEADER_LEN + 2 * (index - 1)))
        };
        if off < PAGE_HEADER_LEN + 2 * entries || off >= end || end > page.len() {
            return Err(bad(format!(
                "offset {off} to {end} is outside the data area"
            )));
        }
        let bytes = &page[off..end];
        match bytes[0] {
            H_KEYDATA => Ok(Item::Inline(&bytes[1..])),
            H_DUPLICATE => Ok(Item::Duplicates(&bytes[1..])),
            H_OFFPAGE => {
                if bytes.len() < HOFFPAGE_LEN {
                    return Err(bad(format!("off-page item of {} bytes", bytes.len())));
                }
                Ok(Item::OffPage {
                    pgno: u32_at(bytes, HOFFPAGE_PGNO),
                    tlen: u32_at(bytes, HOFFPAGE_TLEN),
                })
            }
            // Off-page duplicate trees (H_OFFDUP) need a btree reader:
            // ovs-agent never stores duplicates.
            H_OFFDUP => Err(BdbError::UnsupportedItem {
                pgno,
                index,
                item_type: H_OFFDUP,
            }),
            item_type => Err(BdbError::UnsupportedItem {
                pgno,
                index,
                item_type,
            }),
        }
    }

    fn emit<F>(
        &self,
        pgno: u32,
        index: usize,
        key: Item<'a>,
        data: Item<'a>,
        visited: &mut Visited,
        f: &mut F,
    ) -> Result<ControlFlow<()>, BdbError>
    where
        F: FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    {
        let key_owned;
        let key: &[u8] = match key {
            Item::Inline(k) => k,
            Item::OffPage { pgno, tlen } => {
                key_owned = self.overflow(pgno, tlen, visited)?;
                &key_owned
            }
            Item::Duplicates(_) => {
                return Err(BdbError::BadItem {
                    pgno,
                    index,
                    what: "a key cannot be a duplicate set".into(),
                })
            }
        };
        match data {
            Item::Inline(d) => Ok(f(key, d)),
            Item::OffPage { pgno, tlen } => {
                let d = self.overflow(pgno, tlen, visited)?;
                Ok(f(key, &d))
            }
            Item::Duplicates(mut set) => {
                // Each duplicate is `len:u16, bytes, len:u16` (HKEYDATA
                // duplicate format, db_page.h).
                while !set.is_empty() {
                    let len = usize::from(u16_at(set, 0));
                    let bad = || BdbError::BadItem {
                        pgno,
                        index: index + 1,
                        what: "malformed duplicate set".into(),
                    };
                    let rest = set.get(2..).ok_or_else(bad)?;
                    let d = rest.get(..len).ok_or_else(bad)?;
                    if rest.len() < len + 2 || usize::from(u16_at(rest, len)) != len {
                        return Err(bad());
                    }
                    if f(key, d).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                    set = &rest[len + 2..];
                }
                Ok(ControlFlow::Continue(()))
            }
        }
    }

    /// Reassembles a big item from its overflow chain.
    fn overflow(&self, first: u32, tlen: u32, visited: &mut Visited) -> Result<Vec<u8>, BdbError> {
        let ps = self.meta.pagesize as usize;
        // Never trust tlen for the allocation: the chain cannot hold more
        // than the file's pages.
        let bound = (self.pages_in_file as usize).saturating_mul(ps - PAGE_HEADER_LEN);
        let mut out = Vec::with_capacity((tlen as usize).min(bound));
        let mut pgno = first;
        loop {
            let page = self.page(pgno)?;
            visited.visit(pgno)?;
            if page[PG_TYPE] != P_OVERFLOW {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("type {} where an overflow page was expected", page[PG_TYPE]),
                });
            }
            if u32_at(page, PG_PGNO) != pgno {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("header says it is page {}", u32_at(page, PG_PGNO)),
                });
            }
            let len = usize::from(u16_at(page, PG_HF_OFFSET));
            let chunk = page
                .get(PAGE_HEADER_LEN..PAGE_HEADER_LEN + len)
                .ok_or_else(|| BdbError::BadPage {
                    pgno,
                    what: format!("overflow length {len} does not fit the page"),
                })?;
            if out.len() + chunk.len() > tlen as usize {
                return Err(BdbError::BadPage {
                    pgno,
                    what: format!("overflow chain longer than the item's {tlen} bytes"),
                });
            }
            out.extend_from_slice(chunk);
            match u32_at(page, PG_NEXT) {
                0 => break,
                next => pgno = next,
            }
        }
        if out.len() != tlen as usize {
            return Err(BdbError::BadPage {
                pgno,
                what: format!(
                    "overflow chain holds {} bytes, the item says {tlen}",
                    out.len()
                ),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal version-9 file built by hand: meta page, one bucket page
    /// holding `pairs` inline. Mirrors what db5.3_load wrote (checked with
    /// xxd): items packed from the page's end down, index after the header.
    fn tiny_db(pairs: &[(&[u8], &[u8])], page_type: u8) -> Vec<u8> {
        let ps = 512usize;
        let mut f = vec![0u8; ps * 2];
        f[META_MAGIC..META_MAGIC + 4].copy_from_slice(&DB_HASHMAGIC.to_le_bytes());
        f[META_VERSION..META_VERSION + 4].copy_from_slice(&9u32.to_le_bytes());
        f[META_PAGESIZE..META_PAGESIZE + 4].copy_from_slice(&(ps as u32).to_le_bytes());
        f[META_TYPE] = P_HASHMETA;
        f[META_LAST_PGNO..META_LAST_PGNO + 4].copy_from_slice(&1u32.to_le_bytes());
        // max_bucket 0, masks 0: one bucket at page 0 + spares[0] = 1.
        f[HMETA_H_CHARKEY..HMETA_H_CHARKEY + 4]
            .copy_from_slice(&default_hash(CHARKEY).to_le_bytes());
        f[HMETA_SPARES..HMETA_SPARES + 4].copy_from_slice(&1u32.to_le_bytes());
        let page = &mut f[ps..];
        page[PG_PGNO..PG_PGNO + 4].copy_from_slice(&1u32.to_le_bytes());
        page[PG_TYPE] = page_type;
        let mut top = ps;
        let mut idx = 0;
        for (k, v) in pairs {
            for item in [k, v] {
                top -= item.len() + 1;
                page[top] = H_KEYDATA;
                page[top + 1..top + 1 + item.len()].copy_from_slice(item);
                let at = PAGE_HEADER_LEN + 2 * idx;
                page[at..at + 2].copy_from_slice(&(top as u16).to_le_bytes());
                idx += 1;
            }
        }
        page[PG_ENTRIES..PG_ENTRIES + 2].copy_from_slice(&(idx as u16).to_le_bytes());
        f
    }

    #[test]
    fn charkey_hash_matches_what_db53_writes() {
        // h_charkey of every file db5.3_load wrote on this machine.
        assert_eq!(default_hash(CHARKEY), 0x5e68_8dd1);
    }

    #[test]
    fn log2_matches_db_log2() {
        let got: Vec<u32> = [1, 2, 3, 4, 5, 8, 9].iter().map(|&n| db_log2(n)).collect();
        assert_eq!(got, vec![0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn reads_hand_built_pages_of_both_types() {
        for t in [P_HASH, P_HASH_UNSORTED] {
            let f = tiny_db(&[(b"k1", b"v1"), (b"key2", b"")], t);
            let db = HashDb::open(&f).unwrap();
            assert_eq!(
                db.pairs().unwrap(),
                vec![
                    (b"k1".to_vec(), b"v1".to_vec()),
                    (b"key2".to_vec(), Vec::new())
                ]
            );
            assert_eq!(db.get(b"key2").unwrap(), Some(Vec::new()));
            assert_eq!(db.get(b"nope").unwrap(), None);
        }
    }

    #[test]
    fn another_hash_function_falls_back_to_a_scan() {
        let mut f = tiny_db(&[(b"k1", b"v1"), (b"k2", b"v2")], P_HASH);
        f[HMETA_H_CHARKEY..HMETA_H_CHARKEY + 4].copy_from_slice(&7u32.to_le_bytes());
        let db = HashDb::open(&f).unwrap();
        assert!(!db.meta().default_hash_function());
        assert_eq!(db.get(b"k2").unwrap(), Some(b"v2".to_vec()));
    }

    #[test]
    fn meta_errors_are_typed() {
        let good = tiny_db(&[(b"a", b"b")], P_HASH);
        assert_eq!(
            HashDb::open(&good[..100]).unwrap_err(),
            BdbError::TooShort { len: 100 }
        );
        let mut f = good.clone();
        f[META_MAGIC..META_MAGIC + 4].copy_from_slice(&DB_HASHMAGIC.to_be_bytes());
        assert_eq!(HashDb::open(&f).unwrap_err(), BdbError::BigEndian);
        f[META_MAGIC..META_MAGIC + 4].copy_from_slice(&DB_BTREEMAGIC.to_le_bytes());
        assert_eq!(
            HashDb::open(&f).unwrap_err(),
            BdbError::NotHash { kind: "btree" }
        );
        let mut f = good.clone();
        f[META_VERSION] = 10;
        assert_eq!(
            HashDb::open(&f).unwrap_err(),
            BdbError::UnsupportedVersion { version: 10 }
        );
        let mut f = good.clone();
        f[META_PAGESIZE..META_PAGESIZE + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            HashDb::open(&f).unwrap_err(),
            BdbError::BadPageSize { pagesize: 1000 }
        );
        let mut f = good.clone();
        f[META_METAFLAGS] = DBMETA_CHKSUM;
        assert_eq!(HashDb::open(&f).unwrap_err(), BdbError::Checksummed);
        let mut f = good;
        f[META_TYPE] = 9;
        assert_eq!(
            HashDb::open(&f).unwrap_err(),
            BdbError::UnsupportedType { page_type: 9 }
        );
    }

    #[test]
    fn self_loop_and_range_errors() {
        let mut f = tiny_db(&[(b"a", b"b")], P_HASH);
        // next_pgno of page 1 pointing at itself.
        f[512 + PG_NEXT..512 + PG_NEXT + 4].copy_from_slice(&1u32.to_le_bytes());
        let db = HashDb::open(&f).unwrap();
        assert_eq!(db.pairs().unwrap_err(), BdbError::Cycle { pgno: 1 });
        f[512 + PG_NEXT..512 + PG_NEXT + 4].copy_from_slice(&7u32.to_le_bytes());
        let db = HashDb::open(&f).unwrap();
        assert_eq!(
            db.pairs().unwrap_err(),
            BdbError::PageOutOfRange {
                pgno: 7,
                last_pgno: 1
            }
        );
        let db = HashDb::open(&f[..700]).unwrap();
        assert_eq!(
            db.pairs().unwrap_err(),
            BdbError::TruncatedPage {
                pgno: 1,
                file_len: 700
            }
        );
    }

    #[test]
    fn item_offsets_outside_the_page_are_refused() {
        let mut f = tiny_db(&[(b"a", b"b")], P_HASH);
        f[512 + PAGE_HEADER_LEN..512 + PAGE_HEADER_LEN + 2].copy_from_slice(&3u16.to_le_bytes());
        let db = HashDb::open(&f).unwrap();
        assert!(matches!(
            db.pairs().unwrap_err(),
            BdbError::BadItem {
                pgno: 1,
                index: 0,
                ..
            }
        ));
    }
}
