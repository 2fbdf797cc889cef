//! The Berkeley DB hash reader never panics, hangs or over-allocates on
//! arbitrary bytes, and a lookup agrees with the full iteration: it never
//! returns data the iteration does not hold under that key, and when the
//! file was not written with the default hash (a lookup scans every bucket)
//! it finds the first pair of the key.
#![no_main]

use coriolis_ovm_exporter::ovm::bdb::HashDb;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(db) = HashDb::open(data) else { return };
    let Ok(pairs) = db.pairs() else {
        let _ = db.get(b"manager_ip");
        return;
    };
    // Every data byte returned came from a distinct part of the file
    // (each page is read at most once per walk); keys repeat only across a
    // duplicate set.
    let total: usize = pairs.iter().map(|(_, v)| v.len()).sum();
    assert!(total <= data.len());
    let mut keys: Vec<&[u8]> = pairs.iter().map(|(k, _)| k.as_slice()).take(8).collect();
    keys.push(b"manager_ip");
    keys.push(b"");
    for k in keys {
        let first = pairs.iter().find(|(pk, _)| pk.as_slice() == k);
        match db.get(k) {
            Ok(Some(v)) => assert!(
                pairs.iter().any(|(pk, pv)| pk.as_slice() == k && *pv == v),
                "get({k:?}) returned data the iteration does not hold"
            ),
            // A lookup walks only the key's bucket (default hash): on a
            // damaged file the key may sit in another one.
            Ok(None) if db.meta().default_hash_function() => {}
            Ok(None) => assert!(first.is_none(), "get({k:?}) missed a key"),
            Err(_) => {}
        }
        if !db.meta().default_hash_function() {
            if let (Some((_, want)), Ok(got)) = (first, db.get(k)) {
                assert_eq!(got.as_ref(), Some(want), "get({k:?}) is not the first pair");
            }
        }
    }
});
