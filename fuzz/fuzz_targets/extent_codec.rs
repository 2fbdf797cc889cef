//! The stored extent-map decoding never panics or over-allocates; what it
//! accepts is a valid map that encodes back to the same bytes.
#![no_main]

use coriolis_ovm_exporter::store::codec::{decode_map, encode_map};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = decode_map(data) {
        // At least four bytes per extent were read: allocation is bounded.
        assert!(map.len() <= data.len() / 4);
        // Re-encoding gives a map that decodes to the same extents (the
        // bytes may differ: the encoder picks the largest common shift).
        let again = decode_map(&encode_map(&map)).expect("own encoding decodes");
        assert_eq!(again, map);
    }
});
