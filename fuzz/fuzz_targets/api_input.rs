//! Fuzz the API's parsers of request bytes: path ids, query strings and Go
//! booleans (the `Range` header has its own target, `range_parse`). Each
//! must return, never panic, and keep its invariants on any input: an
//! accepted id is 1..=MAX_ID_LEN of `[A-Za-z0-9._-]`, not starting with a
//! dot, and decodes to itself; a query value is never longer than the
//! query; the Go booleans are exactly `strconv.ParseBool`'s.
#![no_main]

use coriolis_ovm_exporter::api::router::{decode_id, parse_go_bool, query_param, MAX_ID_LEN};
use libfuzzer_sys::fuzz_target;

/// Go's `strconv.ParseBool`, from its documentation.
fn go_parse_bool(s: &str) -> Option<bool> {
    const TRUE: [&str; 6] = ["1", "t", "T", "TRUE", "true", "True"];
    const FALSE: [&str; 6] = ["0", "f", "F", "FALSE", "false", "False"];
    if TRUE.contains(&s) {
        Some(true)
    } else if FALSE.contains(&s) {
        Some(false)
    } else {
        None
    }
}

fuzz_target!(|input: (&str, &str)| {
    let (segment, query) = input;
    if let Ok(id) = decode_id(segment) {
        assert!(!id.is_empty() && id.len() <= MAX_ID_LEN);
        assert!(!id.starts_with('.'));
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
        assert_eq!(decode_id(&id).as_deref(), Ok(id.as_str()));
    }
    for name in ["squashChunks", "compareTo", "zeroed"] {
        if let Some(v) = query_param(Some(query), name) {
            assert!(v.len() <= query.len());
            assert_eq!(parse_go_bool(&v), go_parse_bool(&v), "{v:?}");
        }
    }
    assert_eq!(
        parse_go_bool(segment),
        go_parse_bool(segment),
        "{segment:?}"
    );
});
