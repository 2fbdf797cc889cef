//! Typed heed codecs for the store's keys and small values.
//!
//! Each database names its key and value types, and the byte layout lives
//! in exactly one `BytesEncode`/`BytesDecode` pair instead of in hand-built
//! vectors at every call site. The layouts are those of schema 1, byte for
//! byte (the tests below pin them), so existing stores open unchanged:
//!
//! | codec          | bytes                                    |
//! | -------------- | ---------------------------------------- |
//! | [`IdKey`]      | snapshot id, 16 bytes                    |
//! | [`IndexKey`]   | `u16 BE len(vm), vm, u64 BE seq`         |
//! | [`VmPrefix`]   | `u16 BE len(vm), vm` (prefix scans)      |
//! | [`MapKey`]     | `id, u32 BE disk index`                  |
//! | [`IdemKey`]    | `u16 BE len(vm), vm, Idempotency-Key`    |
//! | [`IdemEntry`]  | `id, u64 BE created_at_ns`               |
//! | [`BeU32`], [`BeU64`] | big-endian integers (`meta` values) |
//!
//! Big-endian sequence numbers sort numerically, so one prefix scan over
//! [`VmPrefix`] yields a VM's snapshots in creation order; the length prefix
//! keeps a VM whose name extends another's out of that scan. Decoding checks
//! every length exactly: a value of the wrong size is an error (mapped to
//! [`super::StoreError::Corrupt`] by the store), never a guess.
//!
//! Callers check VM names against [`super::MAX_VM_NAME`] before encoding,
//! so the `u16` length never truncates; encoding refuses it anyway.

use std::borrow::Cow;

use heed::{BoxedError, BytesDecode, BytesEncode};

use super::codec::ID_LEN;

/// A snapshot id: 16 bytes.
pub type Id = [u8; ID_LEN];

/// Why bytes read from the store are not the expected key or value.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: expected {expected} bytes, found {found}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{what}: a VM name of {len} bytes does not fit a u16 length")]
    NameTooLong { what: &'static str, len: usize },
    #[error("{what}: not UTF-8")]
    NotUtf8 { what: &'static str },
}

fn exact<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], KeyError> {
    bytes.try_into().map_err(|_| KeyError::Length {
        what,
        expected: N,
        found: bytes.len(),
    })
}

/// Appends `u16 BE len(vm), vm`.
fn put_vm(out: &mut Vec<u8>, what: &'static str, vm: &str) -> Result<(), KeyError> {
    let len = u16::try_from(vm.len()).map_err(|_| KeyError::NameTooLong {
        what,
        len: vm.len(),
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(vm.as_bytes());
    Ok(())
}

/// Splits `u16 BE len(vm), vm, rest` into `(vm, rest)`.
fn take_vm<'a>(what: &'static str, bytes: &'a [u8]) -> Result<(&'a str, &'a [u8]), KeyError> {
    let short = || KeyError::Length {
        what,
        expected: 2,
        found: bytes.len(),
    };
    let (len, rest) = bytes.split_first_chunk::<2>().ok_or_else(short)?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return Err(KeyError::Length {
            what,
            expected: 2 + len,
            found: bytes.len(),
        });
    }
    let (vm, rest) = rest.split_at(len);
    let vm = std::str::from_utf8(vm).map_err(|_| KeyError::NotUtf8 { what })?;
    Ok((vm, rest))
}

/// Key of `snapshots`: the snapshot id.
pub enum IdKey {}

impl<'a> BytesEncode<'a> for IdKey {
    type EItem = Id;

    fn bytes_encode(item: &'a Id) -> Result<Cow<'a, [u8]>, BoxedError> {
        Ok(Cow::Borrowed(item))
    }
}

impl BytesDecode<'_> for IdKey {
    type DItem = Id;

    fn bytes_decode(bytes: &[u8]) -> Result<Id, BoxedError> {
        Ok(exact("snapshot id", bytes)?)
    }
}

/// Key of `by_vm`: `(vm, seq)`.
pub enum IndexKey {}

impl<'a> BytesEncode<'a> for IndexKey {
    type EItem = (&'a str, u64);

    fn bytes_encode(&(vm, seq): &'a (&'a str, u64)) -> Result<Cow<'a, [u8]>, BoxedError> {
        let mut k = Vec::with_capacity(2 + vm.len() + 8);
        put_vm(&mut k, "index key", vm)?;
        k.extend_from_slice(&seq.to_be_bytes());
        Ok(Cow::Owned(k))
    }
}

impl<'a> BytesDecode<'a> for IndexKey {
    type DItem = (&'a str, u64);

    fn bytes_decode(bytes: &'a [u8]) -> Result<(&'a str, u64), BoxedError> {
        let (vm, rest) = take_vm("index key", bytes)?;
        Ok((vm, u64::from_be_bytes(exact("index key sequence", rest)?)))
    }
}

/// The prefix of every [`IndexKey`] of one VM (`by_vm` remapped to it for
/// prefix scans).
pub enum VmPrefix {}

impl BytesEncode<'_> for VmPrefix {
    type EItem = str;

    fn bytes_encode(vm: &str) -> Result<Cow<'_, [u8]>, BoxedError> {
        let mut k = Vec::with_capacity(2 + vm.len());
        put_vm(&mut k, "index prefix", vm)?;
        Ok(Cow::Owned(k))
    }
}

/// Key of `maps`: `(id, disk index)`.
pub enum MapKey {}

impl<'a> BytesEncode<'a> for MapKey {
    type EItem = (Id, u32);

    fn bytes_encode((id, disk): &'a (Id, u32)) -> Result<Cow<'a, [u8]>, BoxedError> {
        let mut k = Vec::with_capacity(ID_LEN + 4);
        k.extend_from_slice(id);
        k.extend_from_slice(&disk.to_be_bytes());
        Ok(Cow::Owned(k))
    }
}

impl BytesDecode<'_> for MapKey {
    type DItem = (Id, u32);

    fn bytes_decode(bytes: &[u8]) -> Result<(Id, u32), BoxedError> {
        let raw: [u8; ID_LEN + 4] = exact("map key", bytes)?;
        let (id, disk) = raw.split_at(ID_LEN);
        Ok((
            exact("map key", id)?,
            u32::from_be_bytes(exact("map key", disk)?),
        ))
    }
}

/// Key of `idempotency`: `(vm, Idempotency-Key)`.
pub enum IdemKey {}

impl<'a> BytesEncode<'a> for IdemKey {
    type EItem = (&'a str, &'a str);

    fn bytes_encode(&(vm, key): &'a (&'a str, &'a str)) -> Result<Cow<'a, [u8]>, BoxedError> {
        let mut k = Vec::with_capacity(2 + vm.len() + key.len());
        put_vm(&mut k, "idempotency key", vm)?;
        k.extend_from_slice(key.as_bytes());
        Ok(Cow::Owned(k))
    }
}

impl<'a> BytesDecode<'a> for IdemKey {
    type DItem = (&'a str, &'a str);

    fn bytes_decode(bytes: &'a [u8]) -> Result<(&'a str, &'a str), BoxedError> {
        let (vm, rest) = take_vm("idempotency key", bytes)?;
        let key = std::str::from_utf8(rest).map_err(|_| KeyError::NotUtf8 {
            what: "idempotency key",
        })?;
        Ok((vm, key))
    }
}

/// Value of `idempotency`: `(id, created_at_ns)`.
pub enum IdemEntry {}

impl<'a> BytesEncode<'a> for IdemEntry {
    type EItem = (Id, u64);

    fn bytes_encode((id, at): &'a (Id, u64)) -> Result<Cow<'a, [u8]>, BoxedError> {
        let mut v = Vec::with_capacity(ID_LEN + 8);
        v.extend_from_slice(id);
        v.extend_from_slice(&at.to_be_bytes());
        Ok(Cow::Owned(v))
    }
}

impl BytesDecode<'_> for IdemEntry {
    type DItem = (Id, u64);

    fn bytes_decode(bytes: &[u8]) -> Result<(Id, u64), BoxedError> {
        let raw: [u8; ID_LEN + 8] = exact("idempotency entry", bytes)?;
        let (id, at) = raw.split_at(ID_LEN);
        Ok((
            exact("idempotency entry", id)?,
            u64::from_be_bytes(exact("idempotency entry", at)?),
        ))
    }
}

/// A `u32`, big endian, exactly 4 bytes (the schema version in `meta`).
pub enum BeU32 {}

impl BytesEncode<'_> for BeU32 {
    type EItem = u32;

    fn bytes_encode(v: &u32) -> Result<Cow<'_, [u8]>, BoxedError> {
        Ok(Cow::Owned(v.to_be_bytes().to_vec()))
    }
}

impl BytesDecode<'_> for BeU32 {
    type DItem = u32;

    fn bytes_decode(bytes: &[u8]) -> Result<u32, BoxedError> {
        Ok(u32::from_be_bytes(exact("u32", bytes)?))
    }
}

/// A `u64`, big endian, exactly 8 bytes (counters in `meta`).
pub enum BeU64 {}

impl BytesEncode<'_> for BeU64 {
    type EItem = u64;

    fn bytes_encode(v: &u64) -> Result<Cow<'_, [u8]>, BoxedError> {
        Ok(Cow::Owned(v.to_be_bytes().to_vec()))
    }
}

impl BytesDecode<'_> for BeU64 {
    type DItem = u64;

    fn bytes_decode(bytes: &[u8]) -> Result<u64, BoxedError> {
        Ok(u64::from_be_bytes(exact("u64", bytes)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The key builders of schema 1 as they were before the typed codecs,
    // kept verbatim as the reference the codecs must match byte for byte.
    fn old_index_prefix(vm: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(2 + vm.len() + 8);
        k.extend_from_slice(&(vm.len() as u16).to_be_bytes());
        k.extend_from_slice(vm.as_bytes());
        k
    }
    fn old_index_key(vm: &str, seq: u64) -> Vec<u8> {
        let mut k = old_index_prefix(vm);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
    fn old_map_key(id: &Id, disk: u32) -> [u8; ID_LEN + 4] {
        let mut k = [0u8; ID_LEN + 4];
        k[..ID_LEN].copy_from_slice(id);
        k[ID_LEN..].copy_from_slice(&disk.to_be_bytes());
        k
    }
    fn old_idem_key(vm: &str, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(2 + vm.len() + key.len());
        k.extend_from_slice(&(vm.len() as u16).to_be_bytes());
        k.extend_from_slice(vm.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }
    fn old_idem_value(id: &Id, at: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(ID_LEN + 8);
        v.extend_from_slice(id);
        v.extend_from_slice(&at.to_be_bytes());
        v
    }

    fn enc<'a, C: BytesEncode<'a>>(item: &'a C::EItem) -> Vec<u8> {
        C::bytes_encode(item).unwrap().into_owned()
    }

    const ID: Id = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ];

    #[test]
    fn codecs_write_and_read_the_schema_1_bytes() {
        let vms = [
            "",
            "vm",
            "vm1",
            "ünïcödé-vm",
            &"v".repeat(super::super::MAX_VM_NAME),
        ];
        let seqs = [0, 1, 255, 256, 1 << 40, u64::MAX];
        for vm in vms {
            assert_eq!(enc::<VmPrefix>(vm), old_index_prefix(vm));
            for seq in seqs {
                let old = old_index_key(vm, seq);
                assert_eq!(enc::<IndexKey>(&(vm, seq)), old);
                assert_eq!(IndexKey::bytes_decode(&old).unwrap(), (vm, seq));
            }
            for key in ["k", "a-much-longer-idempotency-key-0123456789"] {
                let old = old_idem_key(vm, key);
                assert_eq!(enc::<IdemKey>(&(vm, key)), old);
                assert_eq!(IdemKey::bytes_decode(&old).unwrap(), (vm, key));
            }
        }
        for disk in [0, 1, 7, u32::MAX] {
            let old = old_map_key(&ID, disk);
            assert_eq!(enc::<MapKey>(&(ID, disk)), old);
            assert_eq!(MapKey::bytes_decode(&old).unwrap(), (ID, disk));
        }
        for at in seqs {
            let old = old_idem_value(&ID, at);
            assert_eq!(enc::<IdemEntry>(&(ID, at)), old);
            assert_eq!(IdemEntry::bytes_decode(&old).unwrap(), (ID, at));
        }
        assert_eq!(enc::<IdKey>(&ID), ID);
        assert_eq!(IdKey::bytes_decode(&ID).unwrap(), ID);
        assert_eq!(enc::<BeU32>(&1), 1u32.to_be_bytes());
        assert_eq!(enc::<BeU64>(&42), 42u64.to_be_bytes());

        // And hard-coded, so that the reference above cannot drift with
        // the codecs.
        assert_eq!(
            enc::<IndexKey>(&("vm", 0x0102)),
            b"\0\x02vm\0\0\0\0\0\0\x01\x02"
        );
        assert_eq!(enc::<VmPrefix>("vm"), b"\0\x02vm");
        assert_eq!(enc::<IdemKey>(&("ab", "k1")), b"\0\x02abk1");
        let mut map = ID.to_vec();
        map.extend_from_slice(&[0, 0, 0, 3]);
        assert_eq!(enc::<MapKey>(&(ID, 3)), map);
        let mut idem = ID.to_vec();
        idem.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(enc::<IdemEntry>(&(ID, 256)), idem);
        assert_eq!(enc::<BeU32>(&1), [0, 0, 0, 1]);
    }

    #[test]
    fn index_keys_sort_by_vm_then_creation() {
        assert!(enc::<IndexKey>(&("vm", 2)) < enc::<IndexKey>(&("vm", 10)));
        assert!(enc::<IndexKey>(&("vm", 300)) < enc::<IndexKey>(&("vm", 1 << 40)));
        // A VM whose name extends another's never shares its prefix.
        assert!(!enc::<IndexKey>(&("vm1", 0)).starts_with(&enc::<VmPrefix>("vm")));
    }

    #[test]
    fn wrong_sizes_are_errors_not_guesses() {
        assert!(IdKey::bytes_decode(&[0; 15]).is_err());
        assert!(MapKey::bytes_decode(&[0; 21]).is_err());
        assert!(IdemEntry::bytes_decode(&[0; 23]).is_err());
        assert!(IdemEntry::bytes_decode(&[0; 25]).is_err());
        assert!(BeU32::bytes_decode(&[0; 8]).is_err());
        assert!(BeU64::bytes_decode(&[0; 4]).is_err());
        // Truncated name, truncated sequence, trailing bytes.
        assert!(IndexKey::bytes_decode(b"\0\x05vm").is_err());
        assert!(IndexKey::bytes_decode(b"\0\x02vm\0\0").is_err());
        assert!(IndexKey::bytes_decode(b"\0\x02vm\0\0\0\0\0\0\0\0\0").is_err());
        assert!(IdemKey::bytes_decode(b"\0").is_err());
        assert!(VmPrefix::bytes_encode(&"v".repeat(70_000)).is_err());
    }
}
