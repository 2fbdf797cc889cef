//! The pickle decoder and the record decoding never panic on arbitrary
//! bytes, and stay within their documented bounds: a decoded tree is at
//! most MAX_DEPTH deep and holds at most MAX_NODES values; the string
//! decoders only shrink their input; the record readers agree with the
//! decoder.
#![no_main]

use std::os::unix::ffi::OsStrExt;

use coriolis_ovm_exporter::ovm::agent_records::{self, RepositoryRecord};
use coriolis_ovm_exporter::ovm::pickle::{self, bytes_to_text, Value, MAX_DEPTH, MAX_NODES};
use libfuzzer_sys::fuzz_target;

/// (depth, values) of a tree.
fn size(v: &Value) -> (usize, usize) {
    let children: Vec<&Value> = match v {
        Value::List(x) | Value::Tuple(x) | Value::Set(x) => x.iter().collect(),
        Value::Dict(kv) => kv.iter().flat_map(|(k, v)| [k, v]).collect(),
        Value::Object { args, state, .. } => args.iter().chain(state.as_deref()).collect(),
        _ => Vec::new(),
    };
    children.into_iter().fold((1, 1), |(d, n), c| {
        let (cd, cn) = size(c);
        (d.max(cd + 1), n + cn)
    })
}

fuzz_target!(|data: &[u8]| {
    let decoded = pickle::decode(data);
    if let Ok(v) = &decoded {
        let (depth, nodes) = size(v);
        // The root counts as one level and one value.
        assert!(depth <= MAX_DEPTH + 1, "depth {depth}");
        assert!(nodes <= MAX_NODES + 1, "{nodes} values");
    }
    const ID: &[u8] = b"0004fb00000300006a09d4e1065041cb";
    if let Ok(r) = RepositoryRecord::from_pickle(ID, data) {
        // The record is the dict's (or the object state's): the mount
        // point byte for byte.
        let v = decoded.as_ref().expect("a record decodes");
        let dict = match v {
            Value::Object {
                state: Some(state), ..
            } => state.as_ref(),
            v => v,
        };
        assert_eq!(r.id, bytes_to_text(ID));
        let mount = dict.dict_get("mount_point").and_then(Value::as_bytes);
        assert_eq!(Some(r.mount_point.as_os_str().as_bytes()), mount.as_deref());
    }
    if let Ok(ip) = agent_records::manager_ip_from_pickle(data) {
        let v = decoded.as_ref().expect("the manager_ip decodes");
        assert!(matches!(v, Value::Bytes(_) | Value::Str(_)), "{v:?}");
        assert_eq!(v.as_text().as_deref(), Some(ip.as_str()));
    }
    // The protocol-0 string argument decoders on their own: escapes only
    // ever shrink, each input byte is at most one character.
    if let Ok(s) = pickle::decode_string_repr(data) {
        assert!(s.len() <= data.len());
    }
    if let Ok(s) = pickle::decode_raw_unicode_escape(data) {
        assert!(s.chars().count() <= data.len());
    }
});
