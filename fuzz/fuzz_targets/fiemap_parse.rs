//! FIEMAP buffer parsing never panics, and what it returns is consistent
//! with the header it was given.
#![no_main]

use coriolis_ovm_exporter::sys::fiemap::{parse, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if let Ok(batch) = parse(data, &mut out) {
        assert!(data.len() >= HEADER_LEN);
        assert!(out.len() <= batch.mapped as usize);
        for e in &out {
            assert!(e.length > 0);
            assert!(e.logical.checked_add(e.length).is_some());
        }
    }
});
