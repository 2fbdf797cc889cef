//! Fuzz the API's parsers of request bytes: the `Range` header, path ids,
//! query strings and Go booleans. Each must return, never panic, and keep
//! its invariants on any input.
#![no_main]

use coriolis_ovm_exporter::api::disk::{parse_range, RangeAsk};
use coriolis_ovm_exporter::api::router::{decode_id, parse_go_bool, query_param, MAX_ID_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &[u8], &str, &str)| {
    let (size, range, segment, query) = input;
    match parse_range(Some(range), size) {
        RangeAsk::Partial(span) => {
            assert!(span.len > 0 && span.start < size && span.len <= size - span.start);
        }
        RangeAsk::Whole => panic!("a Range header never means the whole file"),
        RangeAsk::Unsatisfiable => {}
    }
    if let Ok(id) = decode_id(segment) {
        assert!(!id.is_empty() && id.len() <= MAX_ID_LEN);
        assert!(!id.starts_with('.') && !id.contains('/') && !id.contains('\0'));
    }
    for name in ["squashChunks", "compareTo", "zeroed"] {
        if let Some(v) = query_param(Some(query), name) {
            let _ = parse_go_bool(&v);
        }
    }
});
