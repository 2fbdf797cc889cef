//! Fuzz the API's parsers of request bytes: path ids, query strings and Go
//! booleans (the `Range` header has its own target, `range_parse`). Each must return, never panic, and keep
//! its invariants on any input.
#![no_main]

use coriolis_ovm_exporter::api::router::{decode_id, parse_go_bool, query_param, MAX_ID_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (segment, query) = input;
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
